//! Backing-store I/O for blkmirror: the io_uring engine, the pread/pwrite
//! engine it is tested against, aligned buffers, and discard/zeroing.
//!
//! This is the one crate of the workspace that contains `unsafe` code; every
//! block says who owns the memory involved until the kernel is done with it.

pub mod aligned;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod file;
pub mod store;
pub mod sync;
pub mod uring;

use std::path::PathBuf;

pub use aligned::AlignedBuf;
pub use file::{BackingFile, DiskKind};
pub use store::{Engine, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Disk {0} is in use by another process (is a node already up on it?)")]
    InUse(PathBuf),
    #[error("Disk {0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    #[error("Cannot set up io_uring (is it disabled by sysctl kernel.io_uring_disabled?)")]
    UringSetup(#[source] std::io::Error),
    #[error("Disk {op} failed at byte {offset}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("Range of {len} bytes at {offset} is outside the disk of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("The I/O engine has shut down")]
    StoreClosed,
}

impl Error {
    /// The Linux errno that best describes this error to a block-device client.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::Open { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => libc::ENOSPC,
                _ => libc::EIO,
            },
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::InUse(_) | Error::NotADisk(_) | Error::UringSetup(_) | Error::StoreClosed => {
                libc::EIO
            }
        }
    }
}
