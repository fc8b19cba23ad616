//! Frames: the fixed header every message travels behind.
//!
//! Every message is a frame: a fixed 64-byte header followed by a payload.
//! The header carries its own CRC32C and a separate one for the payload, so
//! the header (and with it the payload length) can be trusted before a
//! single payload byte is read. The volume UUID in every header keeps two
//! unrelated volumes from ever exchanging data.

pub const MAGIC: u32 = 0x424d_5250; // "BMRP"
/// 2: writes are ordered by the frame's sequence number alone, and
/// `Received` confirms frames for resending over a second link.
/// 3: the Hello carries the bytes the sender's bitmap marks.
/// 4: a sync target may report what it changed as `Bitmap` slices.
/// 5: an `Ack` carries many answers; the unused `BarrierAck` is gone.
/// 6: `Disconnect` lets a secondary end a session with nothing to resync.
/// 7: `PromoteAsk`: a connected node asks its peer before it becomes primary.
/// 8: `ResyncChecksum` carries a SHA-256 digest instead of a CRC32C.
/// 9: the Hello carries the settings both nodes must share.
/// 10: the sync source reports its progress to the target (`ResyncProgress`).
pub const PROTOCOL_VERSION: u16 = 10;
pub const HEADER_BYTES: usize = 64;
/// Largest payload a peer may send: one maximal write (32 MiB) plus room for
/// its own fields. Anything larger is refused before allocation.
pub const PAYLOAD_MAX_BYTES: u32 = (32 << 20) + 4096;

const _: () = assert!(HEADER_BYTES.is_multiple_of(8));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    /// The message kind; interpreted by the layer above.
    pub kind: u16,
    pub flags: u32,
    pub volume_uuid: [u8; 16],
    pub sequence: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("Bad frame magic {0:#010x}: the peer is not speaking blkmirror")]
    BadMagic(u32),
    #[error("Peer speaks protocol version {0}; this build speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u16),
    #[error("Frame header checksum mismatch")]
    HeaderChecksum,
    #[error("Frame payload of {0} bytes exceeds the {PAYLOAD_MAX_BYTES}-byte maximum")]
    PayloadTooLarge(u32),
    #[error("Frame payload checksum mismatch")]
    PayloadChecksum,
    #[error("Reserved header bytes are not zero")]
    Reserved,
}

impl FrameHeader {
    /// A header for `payload`, with its checksum filled in.
    pub fn for_payload(
        kind: u16,
        flags: u32,
        volume_uuid: [u8; 16],
        sequence: u64,
        payload: &[u8],
    ) -> FrameHeader {
        FrameHeader {
            version: PROTOCOL_VERSION,
            kind,
            flags,
            volume_uuid,
            sequence,
            payload_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..28].copy_from_slice(&self.volume_uuid);
        out[28..36].copy_from_slice(&self.sequence.to_le_bytes());
        out[36..40].copy_from_slice(&self.payload_len.to_le_bytes());
        out[40..44].copy_from_slice(&self.payload_crc.to_le_bytes());
        // 44..60 reserved, zero.
        let crc = crc32c::crc32c(&out[..HEADER_BYTES - 4]);
        out[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header from untrusted bytes. Never panics.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if u32_at(HEADER_BYTES - 4) != crc32c::crc32c(&bytes[..HEADER_BYTES - 4]) {
            return Err(FrameError::HeaderChecksum);
        }
        let version = u16_at(4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        if bytes[44..60].iter().any(|&b| b != 0) {
            return Err(FrameError::Reserved);
        }
        let payload_len = u32_at(36);
        if payload_len > PAYLOAD_MAX_BYTES {
            return Err(FrameError::PayloadTooLarge(payload_len));
        }
        Ok(FrameHeader {
            version,
            kind: u16_at(6),
            flags: u32_at(8),
            volume_uuid: bytes[12..28].try_into().unwrap(),
            sequence: u64::from_le_bytes(bytes[28..36].try_into().unwrap()),
            payload_len,
            payload_crc: u32_at(40),
        })
    }

    /// Checks a received payload against this header.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FrameError> {
        self.check_payload_split(payload, &[])
    }

    /// Checks a payload received in two pieces, `head` then `tail`.
    pub fn check_payload_split(&self, head: &[u8], tail: &[u8]) -> Result<(), FrameError> {
        let crc = crc32c::crc32c_append(crc32c::crc32c(head), tail);
        if head.len() + tail.len() != self.payload_len as usize || crc != self.payload_crc {
            return Err(FrameError::PayloadChecksum);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn corrupt_payload_is_caught_after_a_good_header() {
        let payload = b"a write of some bytes";
        let header = FrameHeader::for_payload(3, 1, [7; 16], 42, payload);
        let decoded = FrameHeader::decode(&header.encode()).unwrap();
        decoded.check_payload(payload).unwrap();
        assert_eq!(
            decoded.check_payload(b"a write of some bytez"),
            Err(FrameError::PayloadChecksum)
        );
    }

    #[test]
    fn oversize_payload_is_refused_from_the_header() {
        let mut header = FrameHeader::for_payload(1, 0, [0; 16], 0, b"");
        header.payload_len = PAYLOAD_MAX_BYTES + 1;
        assert_eq!(
            FrameHeader::decode(&header.encode()),
            Err(FrameError::PayloadTooLarge(PAYLOAD_MAX_BYTES + 1))
        );
    }

    #[test]
    fn every_header_bit_flip_is_caught() {
        let encoded = FrameHeader::for_payload(9, 2, [1; 16], 5, b"x").encode();
        for bit in 0..HEADER_BYTES * 8 {
            let mut bad = encoded;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                FrameHeader::decode(&bad).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    proptest! {
        #[test]
        fn round_trip(kind: u16, flags: u32, uuid: [u8; 16], sequence: u64, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let header = FrameHeader::for_payload(kind, flags, uuid, sequence, &payload);
            let decoded = FrameHeader::decode(&header.encode()).unwrap();
            prop_assert_eq!(decoded, header);
            prop_assert!(decoded.check_payload(&payload).is_ok());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: [u8; 64]) {
            let _ = FrameHeader::decode(&bytes);
        }
    }
}
