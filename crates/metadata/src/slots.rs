//! Reading and writing the two alternating superblock slots.
//!
//! A write goes to the slot the previous write did not use, and is synced
//! before it counts, so a torn write can only damage the older copy: the
//! newest valid slot is always a state that was fully on disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::layout::{SLOT_COUNT, SLOT_SIZE_BYTES};
use crate::superblock::{DecodeError, Superblock};
use crate::Error;

/// The persistence a metadata area needs. A trait so tests can stand in a
/// device that stops persisting at a chosen write.
pub trait MetaDevice {
    fn read_bytes_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_bytes_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
}

impl MetaDevice for File {
    fn read_bytes_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_bytes_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Empty,
    Valid(Box<Superblock>),
    Corrupt(DecodeError),
}

pub fn slot_offset(slot: u64) -> u64 {
    slot * SLOT_SIZE_BYTES
}

pub fn read_slot(dev: &impl MetaDevice, slot: u64) -> Result<SlotState, Error> {
    let mut buf = vec![0u8; SLOT_SIZE_BYTES as usize];
    dev.read_bytes_at(&mut buf, slot_offset(slot))
        .map_err(|source| Error::Io {
            what: "reading a superblock slot",
            source,
        })?;
    Ok(match Superblock::decode(&buf) {
        Ok(sb) if sb.sequence % SLOT_COUNT != slot => SlotState::Corrupt(
            DecodeError::InvalidField("sequence does not belong in this slot"),
        ),
        Ok(sb) => SlotState::Valid(Box::new(sb)),
        Err(DecodeError::NoMagic) => SlotState::Empty,
        Err(e) => SlotState::Corrupt(e),
    })
}

/// The superblock in force and what the other slot held.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub superblock: Superblock,
    /// Set when the other slot was damaged (a torn write); the next write repairs it.
    pub other_slot_damage: Option<DecodeError>,
}

/// Loads the newest valid superblock. Corrupt metadata is an error, never a
/// reason to start afresh.
pub fn load(dev: &impl MetaDevice) -> Result<Loaded, Error> {
    let states = [read_slot(dev, 0)?, read_slot(dev, 1)?];
    let newest = states
        .iter()
        .filter_map(|s| match s {
            SlotState::Valid(sb) => Some(sb),
            _ => None,
        })
        .max_by_key(|sb| sb.sequence);
    match newest {
        Some(sb) => {
            let other = &states[((sb.sequence + 1) % SLOT_COUNT) as usize];
            Ok(Loaded {
                superblock: (**sb).clone(),
                other_slot_damage: match other {
                    SlotState::Corrupt(e) => Some(e.clone()),
                    _ => None,
                },
            })
        }
        None => match states {
            [SlotState::Empty, SlotState::Empty] => Err(Error::NoMetadata),
            [a, b] => Err(Error::Corrupt {
                slot0: describe(&a),
                slot1: describe(&b),
            }),
        },
    }
}

fn describe(state: &SlotState) -> String {
    match state {
        SlotState::Empty => "empty".into(),
        SlotState::Valid(sb) => format!("valid (sequence {})", sb.sequence),
        SlotState::Corrupt(e) => e.to_string(),
    }
}

/// Writes `sb` as the next state: bumps its sequence, writes the slot that
/// sequence belongs in, and syncs before returning.
pub fn store(dev: &impl MetaDevice, sb: &mut Superblock) -> Result<(), Error> {
    sb.sequence = sb.sequence.checked_add(1).ok_or(Error::SequenceExhausted)?;
    let mut slot = vec![0u8; SLOT_SIZE_BYTES as usize];
    slot[..crate::superblock::ENCODED_BYTES].copy_from_slice(&sb.encode());
    let io = |what| move |source| Error::Io { what, source };
    dev.write_bytes_at(&slot, slot_offset(sb.sequence % SLOT_COUNT))
        .map_err(io("writing a superblock slot"))?;
    dev.sync_data().map_err(io("syncing the metadata area"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Layout, GRANULARITY_DEFAULT_BYTES, MIB};
    use crate::superblock::{Flags, Generations};
    use uuid::Uuid;

    fn disk() -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 * MIB).unwrap();
        f
    }

    fn superblock() -> Superblock {
        Superblock {
            sequence: 0,
            volume_uuid: Uuid::from_u128(42),
            node_name: "beta".into(),
            layout: Layout::for_disk(8 * MIB, GRANULARITY_DEFAULT_BYTES).unwrap(),
            flags: Flags::empty(),
            generations: Generations::default(),
            created_unix_s: 0,
        }
    }

    #[test]
    fn blank_disk_has_no_metadata() {
        assert!(matches!(load(&disk()), Err(Error::NoMetadata)));
    }

    #[test]
    fn newest_write_wins() {
        let dev = disk();
        let mut sb = superblock();
        for i in 0..5u64 {
            sb.generations.current = i;
            store(&dev, &mut sb).unwrap();
        }
        let loaded = load(&dev).unwrap();
        assert_eq!(loaded.superblock.generations.current, 4);
        assert_eq!(loaded.superblock.sequence, 5);
        assert!(loaded.other_slot_damage.is_none());
    }

    #[test]
    fn torn_newest_slot_falls_back_to_the_previous_state() {
        let dev = disk();
        let mut sb = superblock();
        sb.generations.current = 1;
        store(&dev, &mut sb).unwrap();
        sb.generations.current = 2;
        store(&dev, &mut sb).unwrap();
        // Tear the newest write (sequence 2 lives in slot 0).
        dev.write_all_at(&[0xAB; 100], slot_offset(0) + 50).unwrap();
        let loaded = load(&dev).unwrap();
        assert_eq!(loaded.superblock.generations.current, 1);
        assert!(matches!(
            loaded.other_slot_damage,
            Some(DecodeError::Checksum { .. })
        ));
        // The next write repairs the torn slot.
        let mut next = loaded.superblock;
        store(&dev, &mut next).unwrap();
        assert!(load(&dev).unwrap().other_slot_damage.is_none());
    }

    #[test]
    fn both_slots_corrupt_is_refused_with_both_reasons() {
        let dev = disk();
        let mut sb = superblock();
        store(&dev, &mut sb).unwrap();
        store(&dev, &mut sb).unwrap();
        dev.write_all_at(&[0xFF; 8], slot_offset(0) + 100).unwrap();
        dev.write_all_at(&[0xFF; 8], slot_offset(1) + 100).unwrap();
        match load(&dev) {
            Err(Error::Corrupt { slot0, slot1 }) => {
                assert!(slot0.contains("Checksum"), "{slot0}");
                assert!(slot1.contains("Checksum"), "{slot1}");
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn slot_copied_into_the_wrong_place_is_not_trusted() {
        let dev = disk();
        let mut sb = superblock();
        store(&dev, &mut sb).unwrap(); // sequence 1 in slot 1
        let mut buf = vec![0u8; SLOT_SIZE_BYTES as usize];
        dev.read_bytes_at(&mut buf, slot_offset(1)).unwrap();
        dev.write_all_at(&buf, slot_offset(0)).unwrap();
        assert!(matches!(read_slot(&dev, 0).unwrap(), SlotState::Corrupt(_)));
    }
}
