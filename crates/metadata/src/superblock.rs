//! The superblock: what this disk is, whose it is, and how fresh its data is.
//!
//! Encoded little-endian into the first `ENCODED_BYTES` of a 4 KiB slot. The
//! CRC32C in the last four encoded bytes covers everything before it.

use bitflags::bitflags;
use serde::Serialize;
use uuid::Uuid;

use crate::layout::{Layout, SLOT_SIZE_BYTES};

pub const MAGIC: [u8; 8] = *b"BLKMIRMD";
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a slot the superblock occupies, checksum included.
pub const ENCODED_BYTES: usize = 512;
pub const NODE_NAME_MAX_BYTES: usize = 64;
pub const HISTORY_LEN: usize = 2;
const _: () = assert!(ENCODED_BYTES as u64 <= SLOT_SIZE_BYTES);

bitflags! {
    /// State flags kept across restarts.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
    #[serde(transparent)]
    pub struct Flags: u32 {
        /// The data area is internally consistent (not mid-resync).
        const CONSISTENT = 1 << 0;
        /// The data area holds the newest data this node knows of.
        const UP_TO_DATE = 1 << 1;
        /// The node was primary when this superblock was written.
        const PRIMARY = 1 << 2;
        /// The node came up after being primary without a clean shutdown.
        const CRASHED_PRIMARY = 1 << 3;
        /// The node went down cleanly: the on-disk bitmap is complete.
        const CLEAN_SHUTDOWN = 1 << 4;
        /// The peer was primary when last heard from and has not said
        /// goodbye since: it may have written what this node lacks.
        const PEER_PRIMARY = 1 << 5;
        /// Became primary while out of contact with the peer (the younger
        /// primary of a split brain); cleared once they are in sync.
        const PROMOTED_APART = 1 << 6;
    }
}

/// Generation identifiers, in the manner of DRBD's UUID sets: `current`
/// names the data generation on this disk, `bitmap` the generation the dirty
/// bitmap is relative to (0 when the bitmap is empty), `history` the ones before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Generations {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; HISTORY_LEN],
}

/// The value of `current` on a disk whose data has never been declared valid.
pub const GENERATION_JUST_CREATED: u64 = 0;

impl Generations {
    /// Starts a new data generation: the old one becomes the bitmap base, so
    /// a peer that stayed at the old one can later be resynced differentially.
    pub fn start_new(&mut self, fresh: u64) {
        debug_assert_ne!(fresh, GENERATION_JUST_CREATED);
        if self.current != GENERATION_JUST_CREATED {
            if self.bitmap != 0 {
                self.history.rotate_right(1);
                self.history[0] = self.bitmap;
            }
            self.bitmap = self.current;
        }
        self.current = fresh;
    }

    pub fn is_just_created(&self) -> bool {
        self.current == GENERATION_JUST_CREATED
    }
}

/// Returns a random generation identifier that is never "just created".
pub fn fresh_generation() -> u64 {
    loop {
        let value: u64 = rand::random();
        if value != GENERATION_JUST_CREATED {
            return value;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Superblock {
    /// Increments on every write; the higher of two valid slots wins.
    pub sequence: u64,
    pub volume_uuid: Uuid,
    pub node_name: String,
    pub layout: Layout,
    pub flags: Flags,
    pub generations: Generations,
    pub created_unix_s: u64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("No blkmirror metadata (magic missing)")]
    NoMagic,
    #[error("Unsupported metadata format version {0} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("Checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("Invalid field: {0}")]
    InvalidField(&'static str),
}

impl Superblock {
    pub fn encode(&self) -> [u8; ENCODED_BYTES] {
        let mut out = [0u8; ENCODED_BYTES];
        let mut w = Writer {
            buf: &mut out,
            pos: 0,
        };
        w.put(&MAGIC);
        w.put(&FORMAT_VERSION.to_le_bytes());
        w.put(&(ENCODED_BYTES as u32).to_le_bytes());
        w.put(&self.sequence.to_le_bytes());
        w.put(self.volume_uuid.as_bytes());
        let name = self.node_name.as_bytes();
        assert!(
            name.len() <= NODE_NAME_MAX_BYTES,
            "node name checked at creation"
        );
        w.put(&[name.len() as u8]);
        let mut name_field = [0u8; NODE_NAME_MAX_BYTES];
        name_field[..name.len()].copy_from_slice(name);
        w.put(&name_field);
        let l = &self.layout;
        for v in [
            l.data_offset,
            l.data_size,
            l.al_offset,
            l.al_size,
            l.bitmap_offset,
            l.bitmap_size,
        ] {
            w.put(&v.to_le_bytes());
        }
        w.put(&l.granularity.to_le_bytes());
        w.put(&self.flags.bits().to_le_bytes());
        let g = &self.generations;
        w.put(&g.current.to_le_bytes());
        w.put(&g.bitmap.to_le_bytes());
        for h in g.history {
            w.put(&h.to_le_bytes());
        }
        w.put(&self.created_unix_s.to_le_bytes());
        // The rest up to the checksum is reserved and stays zero.
        let crc = crc32c::crc32c(&out[..ENCODED_BYTES - 4]);
        out[ENCODED_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a slot. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, DecodeError> {
        if bytes.len() < ENCODED_BYTES || bytes[..8] != MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let mut r = Reader { buf: bytes, pos: 8 };
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let stored =
            u32::from_le_bytes(bytes[ENCODED_BYTES - 4..ENCODED_BYTES].try_into().unwrap());
        let computed = crc32c::crc32c(&bytes[..ENCODED_BYTES - 4]);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        if r.u32() as usize != ENCODED_BYTES {
            return Err(DecodeError::InvalidField("encoded size"));
        }
        let sequence = r.u64();
        let volume_uuid = Uuid::from_bytes(r.array::<16>());
        let name_len = usize::from(r.array::<1>()[0]);
        let name_field = r.array::<NODE_NAME_MAX_BYTES>();
        if name_len > NODE_NAME_MAX_BYTES {
            return Err(DecodeError::InvalidField("node name length"));
        }
        let node_name = std::str::from_utf8(&name_field[..name_len])
            .map_err(|_| DecodeError::InvalidField("node name is not UTF-8"))?
            .to_string();
        let layout = Layout {
            data_offset: r.u64(),
            data_size: r.u64(),
            al_offset: r.u64(),
            al_size: r.u64(),
            bitmap_offset: r.u64(),
            bitmap_size: r.u64(),
            granularity: r.u32(),
        };
        let flags =
            Flags::from_bits(r.u32()).ok_or(DecodeError::InvalidField("unknown flag bits"))?;
        let generations = Generations {
            current: r.u64(),
            bitmap: r.u64(),
            history: [r.u64(), r.u64()],
        };
        let created_unix_s = r.u64();
        if bytes[r.pos..ENCODED_BYTES - 4].iter().any(|&b| b != 0) {
            return Err(DecodeError::InvalidField("reserved bytes are not zero"));
        }
        Ok(Superblock {
            sequence,
            volume_uuid,
            node_name,
            layout,
            flags,
            generations,
            created_unix_s,
        })
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
}

/// Reads fixed fields; callers have checked the buffer holds `ENCODED_BYTES`,
/// and the field list is far shorter than that.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let out: [u8; N] = self.buf[self.pos..self.pos + N].try_into().unwrap();
        self.pos += N;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{GRANULARITY_DEFAULT_BYTES, MIB};
    use proptest::prelude::*;

    fn sample() -> Superblock {
        Superblock {
            sequence: 7,
            volume_uuid: Uuid::from_u128(0x1234),
            node_name: "alpha".into(),
            layout: Layout::for_disk(64 * MIB, GRANULARITY_DEFAULT_BYTES).unwrap(),
            flags: Flags::CONSISTENT | Flags::UP_TO_DATE,
            generations: Generations {
                current: 5,
                bitmap: 4,
                history: [3, 2],
            },
            created_unix_s: 1_700_000_000,
        }
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let encoded = sample().encode();
        for bit in 0..ENCODED_BYTES * 8 {
            let mut bad = encoded;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Superblock::decode(&bad).is_err(),
                "bit {bit} flip went unnoticed"
            );
        }
    }

    #[test]
    fn zeroed_slot_has_no_magic() {
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(DecodeError::NoMagic));
        assert_eq!(Superblock::decode(&[]), Err(DecodeError::NoMagic));
    }

    #[test]
    fn newer_format_is_refused_by_name() {
        let mut bytes = sample().encode();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            Superblock::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn new_generation_keeps_the_old_as_bitmap_base() {
        let mut g = Generations::default();
        g.start_new(10);
        assert_eq!(
            (g.current, g.bitmap),
            (10, 0),
            "first generation has no base"
        );
        g.start_new(11);
        assert_eq!((g.current, g.bitmap, g.history), (11, 10, [0, 0]));
        g.start_new(12);
        assert_eq!((g.current, g.bitmap, g.history), (12, 11, [10, 0]));
    }

    fn arb_superblock() -> impl Strategy<Value = Superblock> {
        (
            any::<u64>(),
            any::<u128>(),
            "[a-z0-9_-]{1,64}",
            1u64..1 << 40,
            0u32..32,
            any::<[u64; 4]>(),
            any::<u64>(),
        )
            .prop_map(|(sequence, uuid, node_name, disk_mib, flags, g, created)| {
                Superblock {
                    sequence,
                    volume_uuid: Uuid::from_u128(uuid),
                    node_name,
                    layout: Layout::for_disk((disk_mib + 2) * MIB, GRANULARITY_DEFAULT_BYTES)
                        .unwrap(),
                    flags: Flags::from_bits_truncate(flags),
                    generations: Generations {
                        current: g[0],
                        bitmap: g[1],
                        history: [g[2], g[3]],
                    },
                    created_unix_s: created,
                }
            })
    }

    proptest! {
        #[test]
        fn round_trip(sb in arb_superblock()) {
            let encoded = sb.encode();
            prop_assert_eq!(Superblock::decode(&encoded), Ok(sb));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn arbitrary_bytes_behind_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 504)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend(tail);
            let _ = Superblock::decode(&bytes);
        }
    }
}
