//! Opening the backing disk (a regular file or a block device) and the
//! operations both stores share.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

use crate::aligned::ALIGN_BYTES;
use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    RegularFile,
    BlockDevice,
}

/// The backing disk, opened twice: once with O_DIRECT for aligned I/O (when
/// the file system allows it) and once buffered for the rest. Linux keeps the
/// two coherent: direct I/O writes back and invalidates the page cache range.
#[derive(Debug)]
pub struct BackingFile {
    pub path: PathBuf,
    pub kind: DiskKind,
    pub size: u64,
    pub buffered: File,
    pub direct: Option<File>,
}

/// Takes an exclusive advisory lock on an open disk, held until the file is
/// closed, so no second node process (or `create-md`) works on it at once.
pub fn lock_exclusive(file: &File, path: &Path) -> Result<(), Error> {
    // SAFETY: flock only uses the descriptor number, which `file` keeps open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(Error::InUse(path.to_path_buf()));
    }
    Err(Error::Open {
        path: path.to_path_buf(),
        source,
    })
}

impl BackingFile {
    pub fn open(path: &Path) -> Result<BackingFile, Error> {
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        lock_exclusive(&buffered, path)?;
        let meta = buffered.metadata().map_err(open_err)?;
        let kind = if meta.file_type().is_block_device() {
            DiskKind::BlockDevice
        } else if meta.file_type().is_file() {
            DiskKind::RegularFile
        } else {
            return Err(Error::NotADisk(path.to_path_buf()));
        };
        let size = buffered.seek(SeekFrom::End(0)).map_err(open_err)?;
        let direct = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "O_DIRECT is not available on this file system; using buffered I/O \
                     (writes are still made durable by flush and FUA)"
                );
                None
            }
        };
        Ok(BackingFile {
            path: path.to_path_buf(),
            kind,
            size,
            buffered,
            direct,
        })
    }

    /// The descriptor to use for an I/O at `offset` of `len` bytes from a
    /// buffer at `addr`: direct when everything is aligned, buffered otherwise.
    pub fn fd_for(&self, offset: u64, len: usize, addr: usize) -> &File {
        let aligned = offset.is_multiple_of(ALIGN_BYTES as u64)
            && len.is_multiple_of(ALIGN_BYTES)
            && addr.is_multiple_of(ALIGN_BYTES);
        match &self.direct {
            Some(direct) if aligned => direct,
            _ => &self.buffered,
        }
    }

    pub fn uses_direct_io(&self) -> bool {
        self.direct.is_some()
    }

    /// Makes `[offset, offset+len)` read back as zeroes. With `unmap` the
    /// space may be deallocated (a hole), otherwise it stays allocated.
    pub fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let io_err = |source: std::io::Error| Error::Io {
            op: "zero range",
            offset,
            source,
        };
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            })?;
        // fallocate works on block devices too: there PUNCH_HOLE becomes a
        // WRITE_ZEROES that may deallocate (thin volumes, SSDs), ZERO_RANGE
        // one that keeps the blocks. Either way the range reads back zeroes,
        // which keeps two replicas identical where a plain discard would not.
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let mut modes = vec![FallocateFlags::FALLOC_FL_ZERO_RANGE | keep];
        if unmap {
            modes.insert(0, FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep);
        }
        for mode in modes {
            match fallocate(self.buffered.as_raw_fd(), mode, offset as i64, len as i64) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => continue,
                Err(e) => return Err(io_err(e.into())),
            }
        }
        // Neither is supported here (or the range is unaligned for a block
        // device): write the zeroes.
        let chunk = vec![0u8; 1 << 20];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(chunk.len() as u64) as usize;
            self.buffered
                .write_all_at(&chunk[..n], pos)
                .map_err(io_err)?;
            pos += n as u64;
        }
        Ok(())
    }
}
