//! The metadata area ("cluster partition") at the start of every blkmirror
//! disk: its layout, the two superblock slots, and the generation
//! identifiers that decide which side holds the latest data.
#![forbid(unsafe_code)]

pub mod activity_log;
pub mod bitmap;
pub mod layout;
pub mod signature;
pub mod slots;
pub mod superblock;
pub mod sync_decision;

use std::io;

pub use layout::Layout;
pub use slots::{load, store, Loaded, MetaDevice};
pub use superblock::{fresh_generation, Flags, Generations, Superblock};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("No blkmirror metadata on this disk: run `blkmirror create-md` first")]
    NoMetadata,
    #[error(
        "Metadata is corrupt in both superblock slots (slot 0: {slot0}; slot 1: {slot1}); \
         refusing to serve. Restore the metadata area or recreate it with `create-md --force` \
         and take a full copy from the peer"
    )]
    Corrupt { slot0: String, slot1: String },
    #[error("Invalid metadata layout: {0}")]
    InvalidLayout(String),
    #[error(
        "Disk is {disk_size} bytes but its metadata needs {needed}: was it shrunk or replaced?"
    )]
    DiskShrank { needed: u64, disk_size: u64 },
    #[error("Disk of {disk_size} bytes is too small: blkmirror needs at least {minimum}")]
    DiskTooSmall { disk_size: u64, minimum: u64 },
    #[error("Disk already holds {0}: refusing to overwrite it without --force")]
    InUse(&'static str),
    #[error("Node name {0:?} is longer than 64 bytes")]
    NodeNameTooLong(String),
    #[error("Superblock sequence number exhausted")]
    SequenceExhausted,
    #[error("I/O error {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// How to initialise a disk.
pub struct CreateOptions<'a> {
    pub node_name: &'a str,
    pub disk_size: u64,
    pub granularity: u32,
    pub volume_uuid: Uuid,
    /// Overwrite existing metadata or a file system signature.
    pub force: bool,
}

/// Writes fresh metadata: an empty bitmap and activity log and a superblock
/// whose data is Inconsistent until a first promotion or sync declares it.
pub fn create(dev: &impl MetaDevice, opts: &CreateOptions) -> Result<Superblock, Error> {
    if opts.node_name.len() > superblock::NODE_NAME_MAX_BYTES {
        return Err(Error::NodeNameTooLong(opts.node_name.to_string()));
    }
    let layout = Layout::for_disk(opts.disk_size, opts.granularity)?;
    if !opts.force {
        if let Some(found) = signature::detect(dev, opts.disk_size) {
            return Err(Error::InUse(found));
        }
    }
    let io = |what| move |source| Error::Io { what, source };
    // Both slots and everything up to the data area start zeroed, so no stale
    // superblock, activity log or bitmap from an earlier life survives.
    let zeroes = vec![0u8; layout::MIB as usize];
    let mut offset = 0;
    while offset < layout.data_offset {
        let len = (layout.data_offset - offset).min(layout::MIB) as usize;
        dev.write_bytes_at(&zeroes[..len], offset)
            .map_err(io("zeroing the metadata area"))?;
        offset += len as u64;
    }
    let mut sb = Superblock {
        sequence: 0,
        volume_uuid: opts.volume_uuid,
        node_name: opts.node_name.to_string(),
        layout,
        // Nothing has run on it yet, so nothing can have crashed.
        flags: Flags::CLEAN_SHUTDOWN,
        generations: Generations::default(),
        created_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    store(dev, &mut sb)?;
    Ok(sb)
}

/// Loads and checks the metadata of a disk of `disk_size` bytes.
pub fn open(dev: &impl MetaDevice, disk_size: u64) -> Result<Loaded, Error> {
    let loaded = load(dev)?;
    loaded.superblock.layout.validate(disk_size)?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn opts(force: bool) -> CreateOptions<'static> {
        CreateOptions {
            node_name: "alpha",
            disk_size: 16 * layout::MIB,
            granularity: layout::GRANULARITY_DEFAULT_BYTES,
            volume_uuid: Uuid::from_u128(7),
            force,
        }
    }

    #[test]
    fn create_then_open() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(16 * layout::MIB).unwrap();
        let sb = create(&f, &opts(false)).unwrap();
        let loaded = open(&f, 16 * layout::MIB).unwrap();
        assert_eq!(loaded.superblock, sb);
        assert!(loaded.superblock.generations.is_just_created());
    }

    #[test]
    fn create_refuses_existing_metadata_and_file_systems() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(16 * layout::MIB).unwrap();
        create(&f, &opts(false)).unwrap();
        assert!(matches!(
            create(&f, &opts(false)),
            Err(Error::InUse("blkmirror metadata"))
        ));
        create(&f, &opts(true)).unwrap();

        let g = tempfile::tempfile().unwrap();
        g.set_len(16 * layout::MIB).unwrap();
        g.write_all_at(b"XFSB", 0).unwrap();
        assert!(matches!(create(&g, &opts(false)), Err(Error::InUse("XFS"))));
    }
}
