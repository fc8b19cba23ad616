//! A request as the driver describes it (`ublksrv_io_desc`), decoded.

use libublk::sys;

/// The largest DISCARD or WRITE_ZEROES the device advertises: the kernel
/// splits bigger ones, and each holds its range against other writes.
pub(crate) const ZERO_MAX_BYTES: u32 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    /// DISCARD (`unmap`) or WRITE_ZEROES.
    Zero {
        offset: u64,
        len: u32,
        unmap: bool,
        fua: bool,
    },
}

impl Request {
    /// Decodes a request; `Err` holds the errno to fail it with. Reads and
    /// writes must fit the tag's buffer of `buf_bytes`.
    pub fn decode(
        op_flags: u32,
        start_sector: u64,
        nr_sectors: u32,
        buf_bytes: usize,
    ) -> Result<Request, i32> {
        let op = op_flags & 0xff;
        if op == sys::UBLK_IO_OP_FLUSH {
            // A flush has no range: its sector fields mean nothing.
            return Ok(Request::Flush);
        }
        let offset = start_sector.checked_mul(512).ok_or(libc::EINVAL)?;
        let len = nr_sectors.checked_mul(512).ok_or(libc::EINVAL)?;
        let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
        let fits = || {
            if len as usize <= buf_bytes {
                Ok(())
            } else {
                Err(libc::EINVAL)
            }
        };
        match op {
            sys::UBLK_IO_OP_READ => fits().map(|()| Request::Read { offset, len }),
            sys::UBLK_IO_OP_WRITE => fits().map(|()| Request::Write { offset, len, fua }),
            sys::UBLK_IO_OP_DISCARD => Ok(Request::Zero {
                offset,
                len,
                unmap: true,
                fua: false,
            }),
            sys::UBLK_IO_OP_WRITE_ZEROES => Ok(Request::Zero {
                offset,
                len,
                unmap: op_flags & sys::UBLK_IO_F_NOUNMAP == 0,
                fua,
            }),
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    /// What the driver is told on success: bytes moved for reads and
    /// writes, 0 for the rest.
    pub fn success(&self) -> i32 {
        match *self {
            Request::Read { len, .. } | Request::Write { len, .. } => len as i32,
            Request::Flush | Request::Zero { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUF: usize = 512 << 10;

    #[test]
    fn reads_and_writes_carry_their_range_and_fua() {
        assert_eq!(
            Request::decode(sys::UBLK_IO_OP_READ, 8, 16, BUF),
            Ok(Request::Read {
                offset: 4096,
                len: 8192
            })
        );
        assert_eq!(
            Request::decode(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 1, 1, BUF),
            Ok(Request::Write {
                offset: 512,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            Request::decode(sys::UBLK_IO_OP_FLUSH, 0, 0, BUF),
            Ok(Request::Flush)
        );
        // A flush's sector fields are whatever the driver left there.
        assert_eq!(
            Request::decode(sys::UBLK_IO_OP_FLUSH, u64::MAX, u32::MAX, BUF),
            Ok(Request::Flush)
        );
    }

    #[test]
    fn discard_unmaps_and_write_zeroes_follows_nounmap() {
        let discard = Request::decode(sys::UBLK_IO_OP_DISCARD, 0, 8, BUF).unwrap();
        assert!(matches!(discard, Request::Zero { unmap: true, .. }));
        let zeroes = Request::decode(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 8, BUF).unwrap();
        assert!(matches!(zeroes, Request::Zero { unmap: true, .. }));
        let keep = Request::decode(
            sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP | sys::UBLK_IO_F_FUA,
            0,
            8,
            BUF,
        )
        .unwrap();
        assert_eq!(
            keep,
            Request::Zero {
                offset: 0,
                len: 4096,
                unmap: false,
                fua: true
            }
        );
    }

    #[test]
    fn unknown_ops_oversized_transfers_and_overflow_are_refused() {
        assert_eq!(
            Request::decode(sys::UBLK_IO_OP_ZONE_APPEND, 0, 8, BUF),
            Err(libc::EOPNOTSUPP)
        );
        let too_big = (BUF / 512 + 1) as u32;
        assert_eq!(
            Request::decode(sys::UBLK_IO_OP_WRITE, 0, too_big, BUF),
            Err(libc::EINVAL)
        );
        assert_eq!(
            Request::decode(sys::UBLK_IO_OP_READ, u64::MAX / 256, 1, BUF),
            Err(libc::EINVAL)
        );
        // A zeroing request is not bounded by the buffer: it carries no data.
        assert!(Request::decode(sys::UBLK_IO_OP_DISCARD, 0, too_big, BUF).is_ok());
    }

    #[test]
    fn success_reports_bytes_for_data_and_zero_otherwise() {
        assert_eq!(
            Request::Read {
                offset: 0,
                len: 4096
            }
            .success(),
            4096
        );
        assert_eq!(Request::Flush.success(), 0);
    }
}
