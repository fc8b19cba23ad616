//! The messages two nodes exchange, and their payload encoding.
//!
//! A message's kind travels in the frame header; its payload is a fixed
//! little-endian layout per kind. Decoding checks every length against the
//! bytes actually present and refuses trailing bytes, so an untrusted payload
//! can produce an error but never a panic or an over-read.

use crate::frame::FrameHeader;

pub const NODE_NAME_MAX_BYTES: usize = 64;
pub const NONCE_BYTES: usize = 32;
pub const MAC_BYTES: usize = 32;
/// Longest bitmap chunk: 64 KiB of bitmap (2 GiB of data at 4 KiB granularity).
pub const BITMAP_CHUNK_MAX_BYTES: usize = 64 * 1024;
/// Most answers one `Ack` carries.
pub const ACK_ENTRIES_MAX: usize = 1024;
/// A `Bitmap`'s fields before its bits.
const BITMAP_FIXED_BYTES: usize = 16;
/// Ample for any message without data (a Hello is the largest, with a node
/// name of at most `NODE_NAME_MAX_BYTES`).
const CONTROL_PAYLOAD_MAX_BYTES: u32 = 1024;
/// An `Ack` entry on the wire: sequence number, kind, errno.
const ACK_ENTRY_BYTES: usize = 13;

/// Write flags carried with replicated data.
pub const WRITE_FLAG_FUA: u32 = 1 << 0;
/// The write must be preceded by a flush of everything before it.
pub const WRITE_FLAG_PREFLUSH: u32 = 1 << 1;
/// Zero the range instead: `data` holds its length (u64, little-endian).
pub const WRITE_FLAG_ZERO: u32 = 1 << 2;
/// With WRITE_FLAG_ZERO: the space may be deallocated.
pub const WRITE_FLAG_UNMAP: u32 = 1 << 3;
/// The sender wants an `Ack` of kind `Received` as soon as the write
/// arrives, before it is written (protocol B).
pub const WRITE_FLAG_ACK_RECEIVED: u32 = 1 << 4;

/// Message kinds (the frame header's `kind`).
pub mod kind {
    pub const HELLO: u16 = 1;
    pub const AUTH_CHALLENGE: u16 = 2;
    pub const AUTH_RESPONSE: u16 = 3;
    pub const WRITE: u16 = 10;
    pub const ACK: u16 = 11;
    pub const BARRIER: u16 = 12;
    pub const BITMAP: u16 = 20;
    pub const RESYNC_REQUEST: u16 = 21;
    pub const RESYNC_DATA: u16 = 22;
    pub const RESYNC_CHECKSUM: u16 = 23;
    pub const RESYNC_DONE: u16 = 24;
    pub const RESYNC_PROGRESS: u16 = 25;
    pub const PING: u16 = 30;
    pub const PONG: u16 = 31;
    pub const RECEIVED: u16 = 32;
    pub const READ: u16 = 33;
    pub const READ_REPLY: u16 = 34;
    pub const STATE: u16 = 40;
    pub const DISCONNECT: u16 = 41;
    pub const PROMOTE_ASK: u16 = 42;
}

/// Generation identifiers as exchanged on connect (see the metadata crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

/// The first message on every link, in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub volume_uuid: [u8; 16],
    pub node_name: String,
    /// Which of the node's links this connection is (0 or 1).
    pub link_index: u8,
    pub data_size: u64,
    pub granularity: u32,
    pub generations: Generations,
    /// The sender's metadata flags (consistent, up-to-date, primary, ...).
    pub flags: u32,
    /// Random per process start, so a peer can tell a restart from a
    /// second link of the same run.
    pub session: u64,
    /// Bytes the sender's dirty bitmap marks: what it changed (or may have
    /// changed) that the peer may lack.
    pub dirty_bytes: u64,
    pub shared: SharedSettings,
}

/// Settings of the sender's config that both nodes must share: a peer
/// whose differ is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedSettings {
    /// The replication protocol: `b'A'`, `b'B'` or `b'C'`.
    pub protocol: u8,
    /// The split-brain policy when neither node is primary, as the engine
    /// numbers them.
    pub after_sb_0pri: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// The peer has the data in memory (protocol B).
    Received,
    /// The peer's disk has the data (protocol C), or whatever else the
    /// frame asked for is done.
    Written,
}

/// The answer to one sequenced frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckEntry {
    /// The sequence number of the frame answered.
    pub seq: u64,
    pub kind: AckKind,
    /// 0 on success, else the peer's error for that frame.
    pub errno: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    AuthChallenge {
        nonce: [u8; NONCE_BYTES],
    },
    AuthResponse {
        mac: [u8; MAC_BYTES],
    },
    /// A replicated application write, ordered (and answered) by the
    /// sequence number of its frame.
    Write {
        offset: u64,
        flags: u32,
        data: Vec<u8>,
    },
    /// Answers to earlier frames (1 to `ACK_ENTRIES_MAX`), in the order
    /// they were given: a receiver that finishes many writes at once
    /// answers them in one frame.
    Ack {
        entries: Vec<AckEntry>,
    },
    /// Closes epoch `epoch`: every write before it precedes every write
    /// after. Its answer is an `Ack` once the peer's disk is flushed.
    Barrier {
        epoch: u64,
    },
    /// A slice of the sender's dirty bitmap, starting at bit `first_bit`
    /// (a multiple of 8) of `total_bits`, one bit per granule of the
    /// sender's granularity. Bit `k` of the slice is bit `k % 8` of byte
    /// `k / 8`, least significant first: see [`bitmap_runs`].
    Bitmap {
        first_bit: u64,
        total_bits: u64,
        bits: Vec<u8>,
    },
    /// Asks for a range; with `checksum_only` the answer is its checksum.
    ResyncRequest {
        offset: u64,
        len: u32,
        checksum_only: bool,
    },
    ResyncData {
        offset: u64,
        data: Vec<u8>,
    },
    /// The source's digest of a range (see [`chunk_digest`]): the target
    /// answers 0 when its own matches, so the data need not travel.
    ResyncChecksum {
        offset: u64,
        len: u32,
        digest: [u8; 32],
    },
    /// The resync is complete: the target now holds generation `current`.
    ResyncDone {
        current: u64,
    },
    /// How far the sync source has got, for the target to show (sent
    /// about every second while a resync runs).
    ResyncProgress {
        done_bytes: u64,
        total_bytes: u64,
        bytes_per_s: u64,
    },
    Ping {
        token: u64,
    },
    Pong {
        token: u64,
    },
    /// Every sequenced frame up to `upto` has arrived and been taken in
    /// order: the sender may forget them (it keeps each frame until then,
    /// to send it again on another link if its own link dies).
    Received {
        upto: u64,
    },
    /// A primary without a usable disk reads from its peer.
    Read {
        offset: u64,
        len: u32,
    },
    /// The answer to the `Read` of frame `seq`: its data, or the peer's
    /// errno (and no data).
    ReadReply {
        seq: u64,
        errno: u32,
        data: Vec<u8>,
    },
    /// The sender's role and disk state changed.
    State {
        role: u8,
        disk_state: u8,
        flags: u32,
    },
    /// The sender's operator ends the session: the receiver first makes
    /// durable on the sender, with a barrier, every write it sent that was
    /// answered, so that ending the session leaves none to resync.
    Disconnect,
    /// The sender's operator asks to make it primary: the receiver answers
    /// with an `Ack` whose errno is 0 to let it, anything else to refuse,
    /// so that of two nodes promoted at once only one becomes primary
    /// (EAGAIN: the receiver asks the same, and the sender is to ask again).
    PromoteAsk,
}

/// The set bits of a `Bitmap` slice, as runs `(first, count)` of bit
/// numbers counted from the slice's start, in order.
pub fn bitmap_runs(bits: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let total = bits.len() as u64 * 8;
    let is_set = move |k: u64| bits[(k / 8) as usize] & (1 << (k % 8)) != 0;
    let mut k = 0u64;
    std::iter::from_fn(move || {
        // To the next set bit, over clean bytes whole.
        loop {
            if k >= total {
                return None;
            }
            if k.is_multiple_of(8) && bits[(k / 8) as usize] == 0 {
                k += 8;
            } else if is_set(k) {
                break;
            } else {
                k += 1;
            }
        }
        let first = k;
        while k < total && is_set(k) {
            k += 1;
        }
        Some((first, k - first))
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("Unknown message kind {0}")]
    UnknownKind(u16),
    #[error("Message kind {kind} payload is truncated")]
    Truncated { kind: u16 },
    #[error("Message kind {kind} has {extra} trailing bytes")]
    Trailing { kind: u16, extra: usize },
    #[error("Message kind {kind} with a {len}-byte payload, where at most {max} bytes fit")]
    TooLarge { kind: u16, len: u32, max: u32 },
    #[error("Message kind {kind}: {what}")]
    Invalid { kind: u16, what: &'static str },
}

impl Message {
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::AuthChallenge { .. } => kind::AUTH_CHALLENGE,
            Message::AuthResponse { .. } => kind::AUTH_RESPONSE,
            Message::Write { .. } => kind::WRITE,
            Message::Ack { .. } => kind::ACK,
            Message::Barrier { .. } => kind::BARRIER,
            Message::Bitmap { .. } => kind::BITMAP,
            Message::ResyncRequest { .. } => kind::RESYNC_REQUEST,
            Message::ResyncData { .. } => kind::RESYNC_DATA,
            Message::ResyncChecksum { .. } => kind::RESYNC_CHECKSUM,
            Message::ResyncDone { .. } => kind::RESYNC_DONE,
            Message::ResyncProgress { .. } => kind::RESYNC_PROGRESS,
            Message::Ping { .. } => kind::PING,
            Message::Pong { .. } => kind::PONG,
            Message::Received { .. } => kind::RECEIVED,
            Message::State { .. } => kind::STATE,
            Message::Read { .. } => kind::READ,
            Message::ReadReply { .. } => kind::READ_REPLY,
            Message::Disconnect => kind::DISCONNECT,
            Message::PromoteAsk => kind::PROMOTE_ASK,
        }
    }

    pub fn encode_payload(&self) -> Vec<u8> {
        let mut w = Vec::new();
        self.encode_payload_into(&mut w);
        w
    }

    /// Appends the payload to `w` (lets a frame be built in one buffer).
    pub fn encode_payload_into(&self, w: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                w.extend_from_slice(&h.volume_uuid);
                put_bytes16(w, h.node_name.as_bytes());
                w.push(h.link_index);
                w.extend_from_slice(&h.data_size.to_le_bytes());
                w.extend_from_slice(&h.granularity.to_le_bytes());
                for g in [
                    h.generations.current,
                    h.generations.bitmap,
                    h.generations.history[0],
                    h.generations.history[1],
                ] {
                    w.extend_from_slice(&g.to_le_bytes());
                }
                w.extend_from_slice(&h.flags.to_le_bytes());
                w.extend_from_slice(&h.session.to_le_bytes());
                w.extend_from_slice(&h.dirty_bytes.to_le_bytes());
                w.push(h.shared.protocol);
                w.push(h.shared.after_sb_0pri);
            }
            Message::AuthChallenge { nonce } => w.extend_from_slice(nonce),
            Message::AuthResponse { mac } => w.extend_from_slice(mac),
            Message::Write {
                offset,
                flags,
                data,
            } => encode_write_payload_into(w, *offset, *flags, data),
            Message::Ack { entries } => {
                for entry in entries {
                    w.extend_from_slice(&entry.seq.to_le_bytes());
                    w.push(match entry.kind {
                        AckKind::Received => 0,
                        AckKind::Written => 1,
                    });
                    w.extend_from_slice(&entry.errno.to_le_bytes());
                }
            }
            Message::Barrier { epoch } => w.extend_from_slice(&epoch.to_le_bytes()),
            Message::Bitmap {
                first_bit,
                total_bits,
                bits,
            } => {
                w.extend_from_slice(&first_bit.to_le_bytes());
                w.extend_from_slice(&total_bits.to_le_bytes());
                w.extend_from_slice(bits);
            }
            Message::ResyncRequest {
                offset,
                len,
                checksum_only,
            } => {
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(&len.to_le_bytes());
                w.push(u8::from(*checksum_only));
            }
            Message::ResyncData { offset, data } => {
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(data);
            }
            Message::ResyncChecksum {
                offset,
                len,
                digest,
            } => {
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(&len.to_le_bytes());
                w.extend_from_slice(digest);
            }
            Message::Ping { token }
            | Message::Pong { token }
            | Message::Received { upto: token }
            | Message::ResyncDone { current: token } => w.extend_from_slice(&token.to_le_bytes()),
            Message::ResyncProgress {
                done_bytes,
                total_bytes,
                bytes_per_s,
            } => {
                for figure in [done_bytes, total_bytes, bytes_per_s] {
                    w.extend_from_slice(&figure.to_le_bytes());
                }
            }
            Message::State {
                role,
                disk_state,
                flags,
            } => {
                w.push(*role);
                w.push(*disk_state);
                w.extend_from_slice(&flags.to_le_bytes());
            }
            Message::Read { offset, len } => {
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(&len.to_le_bytes());
            }
            Message::ReadReply { seq, errno, data } => {
                w.extend_from_slice(&seq.to_le_bytes());
                w.extend_from_slice(&errno.to_le_bytes());
                w.extend_from_slice(data);
            }
            Message::Disconnect | Message::PromoteAsk => {}
        }
    }

    /// Decodes the payload of a frame whose header has been checked.
    pub fn decode(header: &FrameHeader, payload: &[u8]) -> Result<Message, MessageError> {
        Message::decode_payload(header.kind, payload)
    }

    pub fn decode_payload(kind: u16, payload: &[u8]) -> Result<Message, MessageError> {
        Message::decode_split(kind, payload, Vec::new())
    }

    /// Checks a header's payload length against the largest payload its
    /// kind can carry. A receiver checks this before it allocates the
    /// payload, so no frame holds more memory than its kind needs.
    pub fn check_payload_len(kind: u16, len: u32) -> Result<(), MessageError> {
        let max = Message::payload_max_bytes(kind).ok_or(MessageError::UnknownKind(kind))?;
        if len > max {
            return Err(MessageError::TooLarge { kind, len, max });
        }
        Ok(())
    }

    /// The largest payload a frame of `kind` can carry; `None` for a kind
    /// this side does not know.
    fn payload_max_bytes(kind: u16) -> Option<u32> {
        match kind {
            kind::WRITE | kind::RESYNC_DATA | kind::READ_REPLY => Some(crate::PAYLOAD_MAX_BYTES),
            kind::ACK => Some((ACK_ENTRIES_MAX * ACK_ENTRY_BYTES) as u32),
            kind::BITMAP => Some((BITMAP_FIXED_BYTES + BITMAP_CHUNK_MAX_BYTES) as u32),
            kind::HELLO
            | kind::AUTH_CHALLENGE
            | kind::AUTH_RESPONSE
            | kind::BARRIER
            | kind::RESYNC_REQUEST
            | kind::RESYNC_CHECKSUM
            | kind::RESYNC_DONE
            | kind::RESYNC_PROGRESS
            | kind::PING
            | kind::PONG
            | kind::RECEIVED
            | kind::READ
            | kind::STATE
            | kind::DISCONNECT
            | kind::PROMOTE_ASK => Some(CONTROL_PAYLOAD_MAX_BYTES),
            _ => None,
        }
    }

    /// Where the data of a kind that ends in data starts in its payload: a
    /// receiver can read the data straight into a buffer of its own and hand
    /// it to `decode_split`, with no copy out of the payload.
    pub fn data_offset(kind: u16) -> Option<usize> {
        match kind {
            kind::WRITE => Some(WRITE_FIXED_BYTES),
            kind::RESYNC_DATA => Some(RESYNC_DATA_FIXED_BYTES),
            kind::READ_REPLY => Some(READ_REPLY_FIXED_BYTES),
            _ => None,
        }
    }

    /// Decodes a payload received in two pieces, `head` then `tail` (the
    /// data, when `head` ends at `data_offset`): the same as decoding the
    /// two joined, but the tail becomes the message's data as it is.
    pub fn decode_split(kind: u16, head: &[u8], tail: Vec<u8>) -> Result<Message, MessageError> {
        let mut r = Reader {
            kind,
            buf: head,
            tail,
        };
        let message = match kind {
            kind::HELLO => {
                let volume_uuid = r.array::<16>()?;
                let name = r.bytes16()?;
                if name.len() > NODE_NAME_MAX_BYTES {
                    return Err(r.invalid("node name too long"));
                }
                let node_name = std::str::from_utf8(name)
                    .map_err(|_| r.invalid("node name is not UTF-8"))?
                    .to_string();
                let link_index = r.u8()?;
                if link_index > 1 {
                    return Err(r.invalid("link index above 1"));
                }
                Message::Hello(Hello {
                    volume_uuid,
                    node_name,
                    link_index,
                    data_size: r.u64()?,
                    granularity: r.u32()?,
                    generations: Generations {
                        current: r.u64()?,
                        bitmap: r.u64()?,
                        history: [r.u64()?, r.u64()?],
                    },
                    flags: r.u32()?,
                    session: r.u64()?,
                    dirty_bytes: r.u64()?,
                    shared: SharedSettings {
                        protocol: r.u8()?,
                        after_sb_0pri: r.u8()?,
                    },
                })
            }
            kind::AUTH_CHALLENGE => Message::AuthChallenge { nonce: r.array()? },
            kind::AUTH_RESPONSE => Message::AuthResponse { mac: r.array()? },
            kind::WRITE => Message::Write {
                offset: r.u64()?,
                flags: r.u32()?,
                data: r.rest(),
            },
            kind::ACK => {
                // Counted before anything is allocated for them.
                let count = r.buf.len() / ACK_ENTRY_BYTES;
                if count == 0 {
                    return Err(r.invalid("no answers"));
                }
                if count > ACK_ENTRIES_MAX {
                    return Err(r.invalid("too many answers"));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(AckEntry {
                        seq: r.u64()?,
                        kind: match r.u8()? {
                            0 => AckKind::Received,
                            1 => AckKind::Written,
                            _ => return Err(r.invalid("unknown ack kind")),
                        },
                        errno: r.u32()?,
                    });
                }
                Message::Ack { entries }
            }
            kind::BARRIER => Message::Barrier { epoch: r.u64()? },
            kind::BITMAP => {
                let first_bit = r.u64()?;
                let total_bits = r.u64()?;
                let bits = r.rest();
                if bits.len() > BITMAP_CHUNK_MAX_BYTES {
                    return Err(r.invalid("bitmap chunk too large"));
                }
                // In bytes, which no u64 can overflow.
                if first_bit % 8 != 0 || first_bit / 8 + bits.len() as u64 > total_bits.div_ceil(8)
                {
                    return Err(r.invalid("bitmap chunk outside the bitmap"));
                }
                Message::Bitmap {
                    first_bit,
                    total_bits,
                    bits,
                }
            }
            kind::RESYNC_REQUEST => Message::ResyncRequest {
                offset: r.u64()?,
                len: r.u32()?,
                checksum_only: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.invalid("checksum flag is not 0 or 1")),
                },
            },
            kind::RESYNC_DATA => Message::ResyncData {
                offset: r.u64()?,
                data: r.rest(),
            },
            kind::RESYNC_CHECKSUM => Message::ResyncChecksum {
                offset: r.u64()?,
                len: r.u32()?,
                digest: r.array()?,
            },
            kind::RESYNC_DONE => Message::ResyncDone { current: r.u64()? },
            kind::RESYNC_PROGRESS => Message::ResyncProgress {
                done_bytes: r.u64()?,
                total_bytes: r.u64()?,
                bytes_per_s: r.u64()?,
            },
            kind::PING => Message::Ping { token: r.u64()? },
            kind::PONG => Message::Pong { token: r.u64()? },
            kind::RECEIVED => Message::Received { upto: r.u64()? },
            kind::STATE => Message::State {
                role: r.u8()?,
                disk_state: r.u8()?,
                flags: r.u32()?,
            },
            kind::READ => Message::Read {
                offset: r.u64()?,
                len: r.u32()?,
            },
            kind::READ_REPLY => Message::ReadReply {
                seq: r.u64()?,
                errno: r.u32()?,
                data: r.rest(),
            },
            kind::DISCONNECT => Message::Disconnect,
            kind::PROMOTE_ASK => Message::PromoteAsk,
            other => return Err(MessageError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

/// A `Write` payload's bytes before its data: offset and flags.
pub const WRITE_FIXED_BYTES: usize = 12;
/// A `ResyncData` payload's bytes before its data: offset.
const RESYNC_DATA_FIXED_BYTES: usize = 8;
/// A `ReadReply` payload's bytes before its data: sequence number and errno.
const READ_REPLY_FIXED_BYTES: usize = 12;

/// Appends a `Write` payload to `w`.
pub fn encode_write_payload_into(w: &mut Vec<u8>, offset: u64, flags: u32, data: &[u8]) {
    w.extend_from_slice(&offset.to_le_bytes());
    w.extend_from_slice(&flags.to_le_bytes());
    w.extend_from_slice(data);
}

fn put_bytes16(w: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("short strings only");
    w.extend_from_slice(&len.to_le_bytes());
    w.extend_from_slice(bytes);
}

/// The digest by which resync and `verify` compare a range on both nodes:
/// SHA-256, so that two chunks that differ never match in practice, by
/// chance or by the shape of the difference (a CRC matches whenever the
/// difference is a multiple of its polynomial).
pub fn chunk_digest(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

struct Reader<'a> {
    kind: u16,
    buf: &'a [u8],
    /// Bytes after `buf`, already in a buffer of their own.
    tail: Vec<u8>,
}

impl<'a> Reader<'a> {
    /// The next `n` bytes of the head (fixed fields never reach into the
    /// tail: see `data_offset`).
    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        if self.buf.len() < n {
            return Err(MessageError::Truncated { kind: self.kind });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        Ok(self.take(N)?.try_into().expect("took exactly N"))
    }
    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes16(&mut self) -> Result<&'a [u8], MessageError> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        self.take(len)
    }
    fn rest(&mut self) -> Vec<u8> {
        let head = std::mem::take(&mut self.buf);
        let tail = std::mem::take(&mut self.tail);
        if head.is_empty() {
            tail
        } else {
            [head, &tail].concat()
        }
    }
    fn invalid(&self, what: &'static str) -> MessageError {
        MessageError::Invalid {
            kind: self.kind,
            what,
        }
    }
    fn finish(self) -> Result<(), MessageError> {
        match self.buf.len() + self.tail.len() {
            0 => Ok(()),
            extra => Err(MessageError::Trailing {
                kind: self.kind,
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..512);
        prop_oneof![
            (
                any::<[u8; 16]>(),
                "[a-z]{1,64}",
                0u8..2,
                any::<u64>(),
                any::<u32>(),
                any::<[u64; 4]>(),
                any::<u32>(),
                any::<[u64; 2]>(),
                any::<[u8; 2]>()
            )
                .prop_map(
                    |(
                        volume_uuid,
                        node_name,
                        link_index,
                        data_size,
                        granularity,
                        g,
                        flags,
                        [session, dirty_bytes],
                        [protocol, after_sb_0pri],
                    )| {
                        Message::Hello(Hello {
                            volume_uuid,
                            node_name,
                            link_index,
                            data_size,
                            granularity,
                            generations: Generations {
                                current: g[0],
                                bitmap: g[1],
                                history: [g[2], g[3]],
                            },
                            flags,
                            session,
                            dirty_bytes,
                            shared: SharedSettings {
                                protocol,
                                after_sb_0pri,
                            },
                        })
                    }
                ),
            any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge { nonce }),
            any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }),
            (any::<u64>(), any::<u32>(), bytes()).prop_map(|(offset, flags, data)| {
                Message::Write {
                    offset,
                    flags,
                    data,
                }
            }),
            proptest::collection::vec(
                (any::<u64>(), any::<bool>(), any::<u32>()).prop_map(|(seq, written, errno)| {
                    AckEntry {
                        seq,
                        kind: if written {
                            AckKind::Written
                        } else {
                            AckKind::Received
                        },
                        errno,
                    }
                }),
                1..40
            )
            .prop_map(|entries| Message::Ack { entries }),
            any::<u64>().prop_map(|epoch| Message::Barrier { epoch }),
            (0u64..1 << 40, bytes()).prop_map(|(first_byte, bits)| Message::Bitmap {
                first_bit: first_byte * 8,
                total_bits: first_byte * 8 + bits.len() as u64 * 8,
                bits
            }),
            (any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(offset, len, checksum_only)| {
                Message::ResyncRequest {
                    offset,
                    len,
                    checksum_only,
                }
            }),
            (any::<u64>(), bytes()).prop_map(|(offset, data)| Message::ResyncData { offset, data }),
            (any::<u64>(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(offset, len, digest)| {
                Message::ResyncChecksum {
                    offset,
                    len,
                    digest,
                }
            }),
            any::<u64>().prop_map(|current| Message::ResyncDone { current }),
            any::<[u64; 3]>().prop_map(|[done_bytes, total_bytes, bytes_per_s]| {
                Message::ResyncProgress {
                    done_bytes,
                    total_bytes,
                    bytes_per_s,
                }
            }),
            any::<u64>().prop_map(|token| Message::Ping { token }),
            any::<u64>().prop_map(|token| Message::Pong { token }),
            any::<u64>().prop_map(|upto| Message::Received { upto }),
            (any::<u8>(), any::<u8>(), any::<u32>()).prop_map(|(role, disk_state, flags)| {
                Message::State {
                    role,
                    disk_state,
                    flags,
                }
            }),
            (any::<u64>(), any::<u32>()).prop_map(|(offset, len)| Message::Read { offset, len }),
            (any::<u64>(), any::<u32>(), bytes())
                .prop_map(|(seq, errno, data)| Message::ReadReply { seq, errno, data }),
            Just(Message::Disconnect),
            Just(Message::PromoteAsk),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(message in arb_message()) {
            let payload = message.encode_payload();
            prop_assert_eq!(Message::decode_payload(message.kind(), &payload), Ok(message));
        }

        #[test]
        fn every_message_fits_the_bound_of_its_kind(message in arb_message()) {
            let len = message.encode_payload().len() as u32;
            prop_assert_eq!(Message::check_payload_len(message.kind(), len), Ok(()));
        }

        #[test]
        fn arbitrary_payloads_never_panic(kind in 0u16..64, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode_payload(kind, &payload);
        }

        #[test]
        fn truncation_is_an_error(message in arb_message(), cut in 1usize..8) {
            let payload = message.encode_payload();
            // Kinds ending in a variable-length tail cannot tell a cut from
            // shorter data; an empty payload has nothing to cut.
            prop_assume!(!payload.is_empty());
            prop_assume!(!matches!(message, Message::Write { .. } | Message::ResyncData { .. } | Message::Bitmap { .. } | Message::ReadReply { .. }));
            let cut = cut.min(payload.len());
            prop_assert!(Message::decode_payload(message.kind(), &payload[..payload.len() - cut]).is_err());
        }
    }

    proptest! {
        #[test]
        fn a_payload_in_two_pieces_decodes_alike(message in arb_message(), cut in 0usize..64) {
            let payload = message.encode_payload();
            let kind = message.kind();
            // At the data's start (as a receiver splits), and anywhere else.
            for at in [Message::data_offset(kind).unwrap_or(payload.len()), cut] {
                let at = at.min(payload.len());
                let split = Message::decode_split(kind, &payload[..at], payload[at..].to_vec());
                if Message::data_offset(kind) == Some(at) || at == payload.len() {
                    prop_assert_eq!(split, Ok(message.clone()));
                } else if let Ok(decoded) = split {
                    // A cut inside the fixed fields may only fail, never differ.
                    prop_assert_eq!(decoded, message.clone());
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut payload = Message::Ping { token: 1 }.encode_payload();
        payload.push(0);
        assert_eq!(
            Message::decode_payload(kind::PING, &payload),
            Err(MessageError::Trailing {
                kind: kind::PING,
                extra: 1
            })
        );
    }

    proptest! {
        #[test]
        fn bitmap_runs_are_exactly_the_set_bits(bits in proptest::collection::vec(any::<u8>(), 0..64)) {
            let runs: Vec<(u64, u64)> = bitmap_runs(&bits).collect();
            let mut from_runs = vec![false; bits.len() * 8];
            let mut last_end = None;
            for &(first, count) in &runs {
                prop_assert!(count > 0);
                // In order, and adjacent runs are merged.
                prop_assert!(last_end.is_none_or(|end| first > end));
                last_end = Some(first + count);
                for k in first..first + count {
                    from_runs[k as usize] = true;
                }
            }
            for (k, &set) in from_runs.iter().enumerate() {
                prop_assert_eq!(set, bits[k / 8] & (1 << (k % 8)) != 0, "bit {}", k);
            }
        }
    }

    #[test]
    fn bitmap_runs_read_bits_least_significant_first() {
        let runs: Vec<_> = bitmap_runs(&[0b0000_0110, 0, 0b1000_0000, 0b0000_0001]).collect();
        assert_eq!(runs, vec![(1, 2), (23, 2)]);
    }

    #[test]
    fn the_largest_messages_of_a_kind_fit_its_bound_exactly() {
        let largest = [
            Message::Ack {
                entries: vec![
                    AckEntry {
                        seq: 1,
                        kind: AckKind::Written,
                        errno: 0,
                    };
                    ACK_ENTRIES_MAX
                ],
            },
            Message::Bitmap {
                first_bit: 0,
                total_bits: BITMAP_CHUNK_MAX_BYTES as u64 * 8,
                bits: vec![0xff; BITMAP_CHUNK_MAX_BYTES],
            },
            Message::Hello(Hello {
                volume_uuid: [1; 16],
                node_name: "n".repeat(NODE_NAME_MAX_BYTES),
                link_index: 1,
                data_size: 1,
                granularity: 4096,
                generations: Generations::default(),
                flags: 0,
                session: 1,
                dirty_bytes: 0,
                shared: SharedSettings {
                    protocol: b'C',
                    after_sb_0pri: 0,
                },
            }),
        ];
        for message in largest {
            let len = message.encode_payload().len() as u32;
            assert_eq!(Message::check_payload_len(message.kind(), len), Ok(()));
            if !matches!(message, Message::Hello(_)) {
                assert!(Message::check_payload_len(message.kind(), len + 1).is_err());
            }
        }
        assert_eq!(
            Message::check_payload_len(kind::PING, 4096),
            Err(MessageError::TooLarge {
                kind: kind::PING,
                len: 4096,
                max: CONTROL_PAYLOAD_MAX_BYTES
            })
        );
        assert_eq!(
            Message::check_payload_len(63, 0),
            Err(MessageError::UnknownKind(63))
        );
    }

    #[test]
    fn ack_holds_one_to_the_most_answers() {
        let ack = |count: usize| Message::Ack {
            entries: (0..count as u64)
                .map(|seq| AckEntry {
                    seq,
                    kind: AckKind::Written,
                    errno: 0,
                })
                .collect(),
        };
        let decode = |payload: &[u8]| Message::decode_payload(kind::ACK, payload);
        assert!(decode(&[]).is_err(), "an Ack answers something");
        let most = ack(ACK_ENTRIES_MAX);
        assert_eq!(decode(&most.encode_payload()), Ok(most));
        assert!(decode(&ack(ACK_ENTRIES_MAX + 1).encode_payload()).is_err());
        let mut bad_kind = ack(2).encode_payload();
        bad_kind[ACK_ENTRY_BYTES + 8] = 2;
        assert!(decode(&bad_kind).is_err());
    }

    #[test]
    fn bitmap_chunk_beyond_its_bitmap_is_refused() {
        let chunk = |first_bit, total_bits| Message::Bitmap {
            first_bit,
            total_bits,
            bits: vec![0xff],
        };
        let decode = |m: Message| Message::decode_payload(kind::BITMAP, &m.encode_payload());
        assert!(decode(chunk(8, 8)).is_err());
        assert!(
            decode(chunk(8, 9)).is_ok(),
            "the last byte may reach past the last bit"
        );
        assert!(decode(chunk(0, u64::MAX)).is_ok());
        assert!(decode(chunk(u64::MAX - 7, u64::MAX)).is_ok());
        assert!(decode(chunk(u64::MAX - 7, u64::MAX - 8)).is_err());
        assert!(decode(chunk(4, 64)).is_err(), "a chunk starts on a byte");
    }
}
