//! The plain pread/pwrite store: the reference the io_uring store is tested
//! against, and the fallback where io_uring is unavailable.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::aligned::AlignedBuf;
use crate::file::BackingFile;
use crate::Error;

pub struct SyncStore {
    file: Arc<BackingFile>,
}

impl SyncStore {
    pub fn new(file: Arc<BackingFile>) -> SyncStore {
        SyncStore { file }
    }

    pub fn file(&self) -> &Arc<BackingFile> {
        &self.file
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BackingFile) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|_| Error::StoreClosed)?
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        self.blocking(move |file| {
            let mut buf = AlignedBuf::for_overwrite(len);
            file.fd_for(offset, len, buf.as_ptr() as usize)
                .read_exact_at(&mut buf, offset)
                .map_err(|source| Error::Io {
                    op: "read",
                    offset,
                    source,
                })?;
            Ok(buf)
        })
        .await
    }

    pub async fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> Result<AlignedBuf, Error> {
        self.blocking(move |file| {
            let fd = file.fd_for(offset, buf.len(), buf.as_ptr() as usize);
            fd.write_all_at(&buf, offset).map_err(|source| Error::Io {
                op: "write",
                offset,
                source,
            })?;
            if fua {
                fd.sync_data().map_err(|source| Error::Io {
                    op: "flush",
                    offset,
                    source,
                })?;
            }
            Ok(buf)
        })
        .await
    }

    pub async fn flush(&self) -> Result<(), Error> {
        self.blocking(|file| {
            file.buffered.sync_data().map_err(|source| Error::Io {
                op: "flush",
                offset: 0,
                source,
            })
        })
        .await
    }
}
