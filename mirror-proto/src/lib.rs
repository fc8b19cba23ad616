//! The mirror-disk-connect wire protocol between two blkmirror nodes:
//! frames (a checksummed header, then a checksummed payload) and the
//! messages they carry.
#![forbid(unsafe_code)]

pub mod auth;
pub mod frame;
pub mod message;

pub use frame::{FrameError, FrameHeader, HEADER_BYTES, PAYLOAD_MAX_BYTES, PROTOCOL_VERSION};
pub use message::{
    bitmap_runs, chunk_digest, AckEntry, AckKind, Hello, Message, MessageError, SharedSettings,
};

/// Encodes `message` as one frame: header followed by payload.
pub fn encode_frame(message: &Message, volume_uuid: [u8; 16], sequence: u64) -> Vec<u8> {
    frame_around(message.kind(), volume_uuid, sequence, 0, |w| {
        message.encode_payload_into(w)
    })
}

/// Encodes a `Write` frame straight from the data: the same bytes as
/// [`encode_frame`] of a [`Message::Write`], without first copying the data
/// into a message (every replicated write takes this path).
pub fn encode_write_frame(
    offset: u64,
    flags: u32,
    data: &[u8],
    volume_uuid: [u8; 16],
    sequence: u64,
) -> Vec<u8> {
    let payload_bytes = message::WRITE_FIXED_BYTES + data.len();
    frame_around(
        message::kind::WRITE,
        volume_uuid,
        sequence,
        payload_bytes,
        |w| message::encode_write_payload_into(w, offset, flags, data),
    )
}

/// One buffer for a whole frame: room for the header, the payload that
/// `write_payload` appends after it (`payload_bytes` expected), then the
/// header (which needs the payload's checksum) written in front.
fn frame_around(
    kind: u16,
    volume_uuid: [u8; 16],
    sequence: u64,
    payload_bytes: usize,
    write_payload: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload_bytes);
    out.resize(HEADER_BYTES, 0);
    write_payload(&mut out);
    let header = FrameHeader::for_payload(kind, 0, volume_uuid, sequence, &out[HEADER_BYTES..]);
    out[..HEADER_BYTES].copy_from_slice(&header.encode());
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Decodes one whole frame from untrusted bytes (header, checksums, then
/// the message), returning it and the bytes it used.
/// Rewrites the sequence number of a frame built by [`encode_frame`] (and
/// its header checksum), so a frame can be encoded before its place in the
/// stream is known.
pub fn stamp_sequence(frame: &mut [u8], sequence: u64) {
    let header: &mut [u8; HEADER_BYTES] = frame
        .first_chunk_mut()
        .expect("a frame starts with a whole header");
    header[28..36].copy_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c(&header[..HEADER_BYTES - 4]);
    header[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
}

pub fn decode_frame(bytes: &[u8]) -> Result<Option<(FrameHeader, Message, usize)>, DecodeError> {
    let Some(header_bytes) = bytes.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let header = FrameHeader::decode(header_bytes)?;
    Message::check_payload_len(header.kind, header.payload_len)?;
    let end = HEADER_BYTES + header.payload_len as usize;
    let Some(payload) = bytes.get(HEADER_BYTES..end) else {
        return Ok(None);
    };
    header.check_payload(payload)?;
    Ok(Some((header, Message::decode(&header, payload)?, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_write_frame_from_a_slice_is_the_message_frame(
            offset: u64,
            flags: u32,
            uuid: [u8; 16],
            sequence: u64,
            data in proptest::collection::vec(any::<u8>(), 0..9000),
        ) {
            let direct = encode_write_frame(offset, flags, &data, uuid, sequence);
            let message = Message::Write { offset, flags, data };
            prop_assert_eq!(direct, encode_frame(&message, uuid, sequence));
        }
    }

    #[test]
    fn frame_round_trip_and_partial_input() {
        let message = Message::Write {
            offset: 4096,
            flags: message::WRITE_FLAG_FUA,
            data: vec![1, 2, 3],
        };
        let bytes = encode_frame(&message, [9; 16], 1);
        assert_eq!(
            decode_frame(&bytes[..bytes.len() - 1]),
            Ok(None),
            "incomplete frame waits for more"
        );
        let (header, decoded, used) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(
            (decoded, used, header.volume_uuid),
            (message.clone(), bytes.len(), [9; 16])
        );
        let mut restamped = bytes.clone();
        stamp_sequence(&mut restamped, 42);
        let (header, decoded, _) = decode_frame(&restamped).unwrap().unwrap();
        assert_eq!((header.sequence, &decoded), (42, &message));
        let mut corrupt = bytes.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        assert_eq!(
            decode_frame(&corrupt),
            Err(DecodeError::Frame(FrameError::PayloadChecksum))
        );
    }
}
