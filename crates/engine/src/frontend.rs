//! The frontends' view of a volume: the NBD export, the ublk device (which
//! exists only while this node is primary), and the one place engine
//! errors become their error values.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// The volume as the ublk queues see it.
struct UblkBackend(Arc<Volume>);

impl blkmirror_ublk::Backend for UblkBackend {
    type Buf = AlignedBuf;

    fn size(&self) -> u64 {
        self.0.data_size()
    }

    fn alloc(&self, len: usize) -> AlignedBuf {
        AlignedBuf::for_overwrite(len)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, i32> {
        self.0
            .read(offset, len as usize)
            .await
            .map_err(|e| e.errno())
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), i32> {
        self.0.write(offset, data, fua).await.map_err(|e| e.errno())
    }

    async fn flush(&self) -> Result<(), i32> {
        self.0.flush().await.map_err(|e| e.errno())
    }

    async fn zero(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<(), i32> {
        self.0
            .zero(offset, len, unmap, fua)
            .await
            .map_err(|e| e.errno())
    }
}

/// `/dev/ublkbN` for a node configured with `ublk`: served while the node
/// is primary, counted as one attached client so the volume cannot be
/// demoted under it.
pub struct UblkFrontend {
    settings: blkmirror_ublk::Settings,
    volume: Arc<Volume>,
    export: Mutex<Option<blkmirror_ublk::Export>>,
    /// Whether the device holds its client attachment, set and cleared with
    /// it: during its start or removal, the export is not yet (or no
    /// longer) in `export`.
    attached: AtomicBool,
}

impl UblkFrontend {
    pub fn new(config: blkmirror_config::UblkConfig, volume: Arc<Volume>) -> UblkFrontend {
        UblkFrontend {
            settings: blkmirror_ublk::Settings {
                id: config.id,
                queues: config.queues,
                depth: config.depth,
            },
            volume,
            export: Mutex::new(None),
            attached: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> std::path::PathBuf {
        blkmirror_ublk::block_device_path(self.settings.id)
    }

    /// The device while it is served.
    pub fn serving(&self) -> Option<std::path::PathBuf> {
        self.export.lock().unwrap().as_ref().map(|e| e.path())
    }

    /// Whether the device counts as one of the volume's attached clients.
    pub fn holds_attachment(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
    }

    /// Whether a daemon of ours died serving this device and left it for
    /// the next one (its users wait for us).
    pub fn left_by_dead_daemon(&self) -> Result<bool, Error> {
        Ok(blkmirror_ublk::device_state(self.settings.id)?.awaits_recovery())
    }

    /// Creates the device, or takes it over from a dead daemon. Only on a
    /// primary.
    pub async fn start(&self) -> Result<(), Error> {
        if self.export.lock().unwrap().is_some() {
            return Ok(());
        }
        self.volume.attach()?;
        self.attached.store(true, Ordering::Relaxed);
        let settings = self.settings;
        let backend = Arc::new(UblkBackend(self.volume.clone()));
        let runtime = tokio::runtime::Handle::current();
        let started = tokio::task::spawn_blocking(move || {
            blkmirror_ublk::Export::start(settings, backend, runtime)
        })
        .await
        .expect("ublk start does not panic");
        match started {
            Ok(export) => {
                tracing::info!(
                    device = %export.path().display(),
                    recovered = export.recovered(),
                    queues = settings.queues,
                    depth = settings.depth,
                    "ublk device serving"
                );
                *self.export.lock().unwrap() = Some(export);
                Ok(())
            }
            Err(e) => {
                self.detach();
                Err(e.into())
            }
        }
    }

    /// Removes the device; refused while it is mounted or held open
    /// exclusively.
    pub async fn stop(&self) -> Result<(), Error> {
        let Some(export) = self.export.lock().unwrap().take() else {
            return Ok(());
        };
        let path = export.path();
        let removed = tokio::task::spawn_blocking(move || export.remove_unless_in_use())
            .await
            .expect("ublk removal does not panic");
        match removed {
            Ok(()) => {
                self.detach();
                tracing::info!(device = %path.display(), "ublk device removed");
            }
            Err((export, e)) => {
                *self.export.lock().unwrap() = Some(*export);
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn detach(&self) {
        self.attached.store(false, Ordering::Relaxed);
        self.volume.detach();
    }
}
