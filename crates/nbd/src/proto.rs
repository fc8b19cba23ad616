//! NBD wire constants and the transmission-phase codec (fixed newstyle).
//! Everything here is pure: bytes in, values or errors out, never a panic.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;

/// Block sizes we advertise: any alignment works (unaligned I/O takes the
/// buffered path), 4 KiB is preferred, and 32 MiB is the largest payload,
/// the size the spec asks servers to accept from clients that did not ask.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;
pub const BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;
pub const PAYLOAD_MAX_BYTES: u32 = 32 << 20;
/// Longest option payload we accept during the handshake: a name of the
/// spec's 4096-byte string limit plus room for info requests.
pub const OPTION_DATA_MAX_BYTES: u32 = 16 << 10;
/// Larger option payloads are not even drained: the client is dropped.
pub const OPTION_DRAIN_MAX_BYTES: u32 = 1 << 20;
/// Options one connection may send before it is considered abusive.
pub const OPTIONS_PER_CONNECTION_MAX: usize = 256;

const _: () = assert!(PAYLOAD_MAX_BYTES.is_multiple_of(BLOCK_SIZE_PREFERRED_BYTES));

/// NBD error values (they are the Linux errno numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// Maps a Linux errno to the nearest NBD error (the spec's list is short).
    pub fn from_linux(errno: i32) -> Errno {
        match errno {
            1 | 13 | 30 => Errno::Perm, // EPERM, EACCES, EROFS
            12 => Errno::NoMem,
            22 => Errno::Inval,
            27 | 28 | 122 => Errno::NoSpc, // EFBIG, ENOSPC, EDQUOT
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Io,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    Unknown(u16),
}

impl Command {
    fn from_wire(ty: u16) -> Command {
        match ty {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disconnect,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Unknown(other),
        }
    }

    /// Flags this command accepts. FUA is accepted everywhere, as the spec
    /// requires once SEND_FUA is advertised.
    fn allowed_flags(self) -> u16 {
        match self {
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => CMD_FLAG_FUA,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request header cannot be used at all: the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FatalRequest {
    #[error("Bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("Write payload of {0} bytes exceeds the {PAYLOAD_MAX_BYTES}-byte maximum")]
    PayloadTooLarge(u32),
}

impl RequestHeader {
    pub fn decode(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, FatalRequest> {
        let magic = u32::from_be_bytes(bytes[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(FatalRequest::BadMagic(magic));
        }
        let header = RequestHeader {
            flags: u16::from_be_bytes(bytes[4..6].try_into().unwrap()),
            command: Command::from_wire(u16::from_be_bytes(bytes[6..8].try_into().unwrap())),
            handle: u64::from_be_bytes(bytes[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(bytes[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(bytes[24..28].try_into().unwrap()),
        };
        if header.command == Command::Write && header.length > PAYLOAD_MAX_BYTES {
            // We cannot skip that much safely: the stream is lost.
            return Err(FatalRequest::PayloadTooLarge(header.length));
        }
        Ok(header)
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let ty = match self.command {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disconnect => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::Unknown(t) => t,
        };
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&ty.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        match self.command {
            Command::Write => self.length as usize,
            _ => 0,
        }
    }

    /// Checks the request against an export of `size` bytes. An `Err` is
    /// the error to send back; the request must then not touch the disk.
    pub fn check(&self, size: u64) -> Result<(), Errno> {
        let command = self.command;
        if matches!(command, Command::Unknown(_)) {
            return Err(Errno::Inval);
        }
        if self.flags & !command.allowed_flags() != 0 {
            return Err(Errno::Inval);
        }
        if command == Command::Read && self.length > PAYLOAD_MAX_BYTES {
            return Err(Errno::Overflow);
        }
        if matches!(command, Command::Flush | Command::Disconnect) {
            return Ok(());
        }
        let in_range = self
            .offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size);
        if !in_range {
            // The spec's choice: writes past the end are out of space.
            return Err(match command {
                Command::Write | Command::WriteZeroes => Errno::NoSpc,
                _ => Errno::Inval,
            });
        }
        Ok(())
    }
}

pub fn simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

pub fn structured_header(
    flags: u16,
    ty: u16,
    handle: u64,
    length: u32,
) -> [u8; STRUCTURED_REPLY_HEADER_BYTES] {
    let mut out = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&ty.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// A structured ERROR chunk (header and payload) that ends the reply.
pub fn structured_error(handle: u64, error: Errno, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let payload_len = 4 + 2 + message.len();
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_BYTES + payload_len);
    out.extend_from_slice(&structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        payload_len as u32,
    ));
    out.extend_from_slice(&(error as u32).to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A decoded request header and the verdict of [`RequestHeader::check`].
pub type CheckedRequest = (RequestHeader, Result<(), Errno>);

/// Decodes as many whole requests as `bytes` holds, as the server's reader
/// does, and checks each against `size`. Used by the fuzz target and tests.
pub fn decode_stream(mut bytes: &[u8], size: u64) -> Vec<Result<CheckedRequest, FatalRequest>> {
    let mut out = Vec::new();
    while bytes.len() >= REQUEST_HEADER_BYTES {
        let header_bytes: &[u8; REQUEST_HEADER_BYTES] =
            bytes[..REQUEST_HEADER_BYTES].try_into().unwrap();
        match RequestHeader::decode(header_bytes) {
            Err(e) => {
                out.push(Err(e));
                break;
            }
            Ok(header) => {
                let total = REQUEST_HEADER_BYTES + header.payload_len();
                if bytes.len() < total {
                    break;
                }
                out.push(Ok((header, header.check(size))));
                bytes = &bytes[total..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 9,
            offset,
            length,
        }
    }

    #[test]
    fn range_checks_use_the_specs_errors() {
        let size = 1 << 20;
        assert_eq!(req(Command::Read, 0, size - 512, 512).check(size), Ok(()));
        assert_eq!(
            req(Command::Read, 0, size - 511, 512).check(size),
            Err(Errno::Inval)
        );
        assert_eq!(
            req(Command::Write, 0, size, 1).check(size),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            req(Command::WriteZeroes, 0, size, 1).check(size),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            req(Command::Trim, 0, size, 1).check(size),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn offset_overflow_is_an_error_not_a_wrap() {
        assert_eq!(
            req(Command::Read, 0, u64::MAX, 2).check(u64::MAX),
            Err(Errno::Inval)
        );
        assert_eq!(
            req(Command::Write, 0, u64::MAX - 1, 4).check(u64::MAX),
            Err(Errno::NoSpc)
        );
    }

    #[test]
    fn oversize_read_overflows_and_oversize_write_is_fatal() {
        assert_eq!(
            req(Command::Read, 0, 0, PAYLOAD_MAX_BYTES + 1).check(u64::MAX),
            Err(Errno::Overflow)
        );
        let bytes = req(Command::Write, 0, 0, PAYLOAD_MAX_BYTES + 1).encode();
        assert_eq!(
            RequestHeader::decode(&bytes),
            Err(FatalRequest::PayloadTooLarge(PAYLOAD_MAX_BYTES + 1))
        );
    }

    #[test]
    fn unknown_commands_and_flags_are_invalid() {
        assert_eq!(
            req(Command::Unknown(42), 0, 0, 0).check(100),
            Err(Errno::Inval)
        );
        assert_eq!(
            req(Command::Read, CMD_FLAG_NO_HOLE, 0, 1).check(100),
            Err(Errno::Inval)
        );
        assert_eq!(
            req(Command::Write, 1 << 9, 0, 1).check(100),
            Err(Errno::Inval)
        );
        assert_eq!(
            req(Command::WriteZeroes, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 1).check(100),
            Ok(())
        );
        assert_eq!(req(Command::Flush, CMD_FLAG_FUA, 0, 0).check(100), Ok(()));
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut bytes = req(Command::Read, 0, 0, 1).encode();
        bytes[0] ^= 0xff;
        assert!(matches!(
            RequestHeader::decode(&bytes),
            Err(FatalRequest::BadMagic(_))
        ));
    }

    #[test]
    fn errno_mapping_covers_storage_errors() {
        assert_eq!(Errno::from_linux(28), Errno::NoSpc);
        assert_eq!(Errno::from_linux(122), Errno::NoSpc);
        assert_eq!(Errno::from_linux(5), Errno::Io);
        assert_eq!(Errno::from_linux(9999), Errno::Io);
    }

    proptest! {
        #[test]
        fn header_round_trip(flags: u16, ty in 0u16..16, handle: u64, offset: u64, length in 0u32..PAYLOAD_MAX_BYTES) {
            let header = RequestHeader { flags, command: Command::from_wire(ty), handle, offset, length };
            prop_assert_eq!(RequestHeader::decode(&header.encode()), Ok(header));
        }

        #[test]
        fn arbitrary_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), size: u64) {
            let _ = decode_stream(&bytes, size);
        }
    }
}
