//! Recognising what a disk already holds, so `create-md` does not destroy a
//! file system by accident.

use crate::slots::MetaDevice;

/// A known on-disk signature: a name, where it sits and what it reads.
struct Signature {
    name: &'static str,
    offset: u64,
    bytes: &'static [u8],
}

const SIGNATURES: &[Signature] = &[
    Signature {
        name: "blkmirror metadata",
        offset: 0,
        bytes: b"BLKMIRMD",
    },
    Signature {
        name: "blkmirror metadata",
        offset: 4096,
        bytes: b"BLKMIRMD",
    },
    Signature {
        name: "ext2/3/4",
        offset: 1080,
        bytes: &[0x53, 0xEF],
    },
    Signature {
        name: "XFS",
        offset: 0,
        bytes: b"XFSB",
    },
    Signature {
        name: "btrfs",
        offset: 65600,
        bytes: b"_BHRfS_M",
    },
    Signature {
        name: "LVM2 physical volume",
        offset: 536,
        bytes: b"LVM2 001",
    },
    Signature {
        name: "GPT partition table",
        offset: 512,
        bytes: b"EFI PART",
    },
    Signature {
        name: "Linux swap",
        offset: 4086,
        bytes: b"SWAPSPACE2",
    },
    Signature {
        name: "LUKS",
        offset: 0,
        bytes: b"LUKS\xba\xbe",
    },
    Signature {
        name: "DOS partition table / boot sector",
        offset: 510,
        bytes: &[0x55, 0xAA],
    },
];

/// Names the first signature found on the device, if any. Regions beyond the
/// end of a small disk are simply not matched.
pub fn detect(dev: &impl MetaDevice, disk_size: u64) -> Option<&'static str> {
    SIGNATURES.iter().find_map(|sig| {
        let end = sig.offset + sig.bytes.len() as u64;
        if end > disk_size {
            return None;
        }
        let mut buf = vec![0u8; sig.bytes.len()];
        dev.read_bytes_at(&mut buf, sig.offset).ok()?;
        (buf == sig.bytes).then_some(sig.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_ext4_and_ignores_zeroes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        assert_eq!(detect(&f, 1 << 20), None);
        f.write_all_at(&[0x53, 0xEF], 1080).unwrap();
        assert_eq!(detect(&f, 1 << 20), Some("ext2/3/4"));
    }
}
