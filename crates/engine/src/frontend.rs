//! The NBD frontend's view of a volume, and the one place engine errors
//! become NBD error values.

use std::sync::Arc;

use blkmirror_io::AlignedBuf;
use blkmirror_nbd::proto::Errno;
use blkmirror_nbd::{Backend, BackendError};

use crate::volume::{Role, Volume};
use crate::Error;

impl From<Error> for BackendError {
    fn from(e: Error) -> BackendError {
        BackendError {
            errno: Errno::from_linux(e.errno()),
            message: e.to_string(),
        }
    }
}

/// Exports a volume over NBD under the resource name.
pub struct NbdExport(pub Arc<Volume>);

impl Backend for NbdExport {
    type Buf = AlignedBuf;

    fn export_name(&self) -> &str {
        self.0.resource()
    }

    fn description(&self) -> String {
        format!(
            "blkmirror resource {} on node {}",
            self.0.resource(),
            self.0.node()
        )
    }

    fn size(&self) -> u64 {
        self.0.data_size()
    }

    fn refusal(&self) -> Option<String> {
        (self.0.role() != Role::Primary).then(|| self.0.not_serving().to_string())
    }

    fn attach(&self) -> Result<(), String> {
        self.0.attach().map_err(|e| e.to_string())
    }

    fn detach(&self) {
        self.0.detach();
    }

    fn alloc(&self, len: usize) -> AlignedBuf {
        AlignedBuf::for_overwrite(len)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, BackendError> {
        Ok(self.0.read(offset, len as usize).await?)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BackendError> {
        Ok(self.0.write(offset, data, fua).await?)
    }

    async fn flush(&self) -> Result<(), BackendError> {
        Ok(self.0.flush().await?)
    }

    async fn zero(
        &self,
        offset: u64,
        len: u32,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        Ok(self.0.zero(offset, u64::from(len), unmap, fua).await?)
    }
}
