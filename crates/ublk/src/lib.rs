//! The ublk frontend: serves a [`Backend`] as the block device
//! `/dev/ublkbN` through the Linux ublk driver (`ublk_drv`), using libublk.
//!
//! The driver hands each request to a queue thread of ours (one per
//! hardware queue); the backend runs on the node's tokio runtime, so a
//! queue thread passes every request there and is woken by a doorbell
//! (an eventfd in its io_uring) when the answer is ready.
//!
//! Devices are created with user recovery and reissue: when the daemon
//! dies, the kernel keeps `/dev/ublkbN` and queues its I/O, and the next
//! daemon takes the device over ([`Export::start`] finds it quiesced).
//! Requests in flight at the crash are issued again; a block device write
//! may be repeated without harm, as the replication path applies it again
//! in full on both nodes.
#![forbid(unsafe_code)]

mod device;
mod holders;
mod queue;
mod request;

use std::future::Future;
use std::path::{Path, PathBuf};

pub use device::{device_state, DeviceState, Export};
pub use request::Request;

/// Where the driver's control device lives once `ublk_drv` is loaded.
pub const CONTROL_DEVICE: &str = "/dev/ublk-control";

/// What the device serves: the volume behind it. Errors are Linux errno
/// values (positive), handed to the block layer as they are.
pub trait Backend: Send + Sync + 'static {
    /// A buffer the backend can do I/O from (e.g. aligned for O_DIRECT).
    type Buf: AsRef<[u8]> + AsMut<[u8]> + Send + 'static;

    fn size(&self) -> u64;
    fn alloc(&self, len: usize) -> Self::Buf;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Self::Buf, i32>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Self::Buf,
        fua: bool,
    ) -> impl Future<Output = Result<(), i32>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), i32>> + Send;
    /// Zeroes a range; `unmap` allows deallocating it (DISCARD, or
    /// WRITE_ZEROES without NOUNMAP).
    fn zero(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), i32>> + Send;
}

/// How the device is laid out for the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// N in `/dev/ublkbN`.
    pub id: u32,
    /// Hardware queues, each served by a thread of its own.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the ublk driver is not loaded ({CONTROL_DEVICE} is missing): load the kernel module \
         with `modprobe ublk_drv` (Linux 6.0 or newer, CONFIG_BLK_DEV_UBLK), or serve NBD instead"
    )]
    DriverMissing,
    #[error("ublk device {id}: {what}: {message}")]
    Control {
        id: u32,
        what: &'static str,
        message: String,
    },
    #[error("ublk device {id} is served by another process (pid {pid})")]
    ServedElsewhere { id: u32, pid: i32 },
    #[error(
        "ublk device {id} waiting for recovery has {device_bytes} bytes, this volume \
         {volume_bytes}: it is not this node's device (check `ublk.id` in the config)"
    )]
    NotOurs {
        id: u32,
        device_bytes: u64,
        volume_bytes: u64,
    },
    #[error("{} is in use (mounted, or held open exclusively): unmount it first", .0.display())]
    InUse(PathBuf),
    #[error("{} is open by {holders}: close it first", .path.display())]
    OpenBy { path: PathBuf, holders: String },
    #[error("entering a mount namespace of our own failed: {0}")]
    MountNamespace(nix::Error),
}

/// Fails at once, naming the module, when the driver is not there.
pub fn check_driver() -> Result<(), Error> {
    if Path::new(CONTROL_DEVICE).exists() {
        Ok(())
    } else {
        Err(Error::DriverMissing)
    }
}

/// The block device the kernel makes for device `id`.
pub fn block_device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// Moves this process into a mount namespace of its own, with no mount
/// events shared back. A daemon that shares its namespace with a file
/// system mounted on its own device can deadlock at exit: the unmount that
/// exit triggers waits for I/O that only the exiting daemon would serve.
///
/// Call it before any thread is started (unshare refuses otherwise).
pub fn enter_private_mount_namespace() -> Result<(), Error> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(Error::MountNamespace)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(Error::MountNamespace)
}
