//! The store the engine talks to: io_uring when the kernel allows it,
//! pread/pwrite otherwise. Offsets are byte offsets into the backing disk.

use std::path::Path;
use std::sync::Arc;

use crate::aligned::AlignedBuf;
use crate::file::BackingFile;
use crate::sync::SyncStore;
use crate::uring::UringStore;
use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Uring,
    Sync,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Uring => "io_uring",
            Engine::Sync => "pread/pwrite",
        }
    }
}

pub enum Store {
    Uring(UringStore),
    Sync(SyncStore),
}

impl Store {
    /// Opens `path` with the preferred engine, falling back to pread/pwrite
    /// (and saying why) when io_uring cannot be set up.
    pub fn open(path: &Path, preferred: Engine) -> Result<Store, Error> {
        let file = Arc::new(BackingFile::open(path)?);
        Ok(match preferred {
            Engine::Sync => Store::Sync(SyncStore::new(file)),
            Engine::Uring => match UringStore::new(file.clone()) {
                Ok(store) => Store::Uring(store),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable; using pread/pwrite");
                    Store::Sync(SyncStore::new(file))
                }
            },
        })
    }

    pub fn engine(&self) -> Engine {
        match self {
            Store::Uring(_) => Engine::Uring,
            Store::Sync(_) => Engine::Sync,
        }
    }

    pub fn file(&self) -> &Arc<BackingFile> {
        match self {
            Store::Uring(s) => s.file(),
            Store::Sync(s) => s.file(),
        }
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        self.check_range(offset, len as u64)?;
        #[cfg(feature = "fault-injection")]
        if crate::faults::read_fails(offset, len as u64) {
            return Err(injected("read", offset));
        }
        match self {
            Store::Uring(s) => s.read(offset, len).await,
            Store::Sync(s) => s.read(offset, len).await,
        }
    }

    /// Writes `buf` at `offset`; with `fua` the data is durable on return.
    /// The buffer is handed back for reuse.
    pub async fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> Result<AlignedBuf, Error> {
        self.check_range(offset, buf.len() as u64)?;
        #[cfg(feature = "fault-injection")]
        match crate::faults::write_fate(offset, buf.len() as u64) {
            crate::faults::Fate::Persist => {}
            crate::faults::Fate::Drop => return Ok(buf),
            crate::faults::Fate::Fail => return Err(injected("write", offset)),
            crate::faults::Fate::Stall => crate::faults::stalled(offset, buf.len() as u64).await,
        }
        match self {
            Store::Uring(s) => s.write(offset, buf, fua).await,
            Store::Sync(s) => s.write(offset, buf, fua).await,
        }
    }

    /// Makes every write completed before the call durable (fdatasync).
    pub async fn flush(&self) -> Result<(), Error> {
        match self {
            Store::Uring(s) => s.flush().await,
            Store::Sync(s) => s.flush().await,
        }
    }

    /// Zeroes a range; with `unmap` its space may be released (discard).
    pub async fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        self.check_range(offset, len)?;
        #[cfg(feature = "fault-injection")]
        match crate::faults::write_fate(offset, len) {
            crate::faults::Fate::Persist => {}
            crate::faults::Fate::Drop => return Ok(()),
            crate::faults::Fate::Fail => return Err(injected("zeroing", offset)),
            crate::faults::Fate::Stall => crate::faults::stalled(offset, len).await,
        }
        let file = self.file().clone();
        tokio::task::spawn_blocking(move || file.zero_range(offset, len, unmap))
            .await
            .map_err(|_| Error::StoreClosed)?
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        let size = self.file().size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }
}

#[cfg(feature = "fault-injection")]
fn injected(op: &'static str, offset: u64) -> Error {
    Error::Io {
        op,
        offset,
        source: crate::faults::injected_error(),
    }
}
