//! A ublk device's life: create it (or take over one a dead daemon left
//! quiesced), serve it from queue threads, and remove it.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

use crate::queue::{self, QueueContext};
use crate::request::ZERO_MAX_BYTES;
use crate::{block_device_path, check_driver, holders, Backend, Error, Settings};

/// Each tag's data buffer: the largest request the kernel sends us.
const IO_BUF_BYTES: u32 = 512 << 10;
/// Creating the device and starting its queues; generous, for slow
/// (emulated) machines.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long demotion waits for the device's openers to close it before it
/// refuses: long enough for a udev or blkid probe of a new device.
const HOLDERS_GRACE: Duration = Duration::from_secs(2);

/// What the driver says of device N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Absent,
    /// Served by the daemon with this pid (or, just after that daemon died,
    /// not yet noticed by the driver).
    Live {
        pid: i32,
    },
    /// Its daemon died; I/O waits for a new one to recover it.
    Quiesced,
    /// Its daemon died; I/O fails until a new one recovers it.
    FailIo,
    /// Stopped, not yet removed.
    Dead,
}

/// libublk keeps its control ring per thread; make sure this one has it.
fn control_ring_ready() -> Result<(), Error> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| control_error(u32::MAX, "control ring", e))
}

fn control_error(id: u32, what: &'static str, e: UblkError) -> Error {
    let message = match e {
        UblkError::OtherError(errno) | UblkError::UringIOError(errno) => {
            std::io::Error::from_raw_os_error(errno.abs()).to_string()
        }
        other => other.to_string(),
    };
    Error::Control { id, what, message }
}

/// Asks the driver about device `id`.
pub fn device_state(id: u32) -> Result<DeviceState, Error> {
    check_driver()?;
    if !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return Ok(DeviceState::Absent);
    }
    control_ring_ready()?;
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| control_error(id, "get info", e))?;
    let info = ctrl.dev_info();
    Ok(match u32::from(info.state) {
        sys::UBLK_S_DEV_LIVE => DeviceState::Live {
            pid: info.ublksrv_pid,
        },
        sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
        _ => DeviceState::Dead,
    })
}

fn process_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

impl DeviceState {
    /// Whether a daemon died serving the device and left it for the next
    /// one: its users wait (or fail, with FailIo) until it is recovered.
    pub fn awaits_recovery(self) -> bool {
        match self {
            DeviceState::Quiesced | DeviceState::FailIo => true,
            // The driver notices a dead daemon a moment late; our own pid
            // here means a previous life of this process id (a restart).
            DeviceState::Live { pid } => !process_alive(pid) || pid == std::process::id() as i32,
            DeviceState::Absent | DeviceState::Dead => false,
        }
    }
}

/// `/dev/ublkbN`, served by this process.
pub struct Export {
    settings: Settings,
    ctrl: Arc<UblkCtrl>,
    thread: Option<JoinHandle<()>>,
    /// True when this daemon took the device over from a dead one.
    recovered: bool,
}

impl Export {
    /// Creates device `settings.id` serving `backend`, or recovers it when
    /// a dead daemon left it behind; returns once `/dev/ublkbN` serves I/O.
    /// Blocking: call it off the runtime's threads.
    pub fn start<B: Backend>(
        settings: Settings,
        backend: Arc<B>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Export, Error> {
        let id = settings.id;
        let state = device_state(id)?;
        let recovered = state.awaits_recovery();
        match state {
            _ if recovered => check_size(id, backend.size())?,
            DeviceState::Live { pid } => return Err(Error::ServedElsewhere { id, pid }),
            DeviceState::Dead => {
                tracing::info!(id, "removing a stopped ublk device left behind");
                UblkCtrl::new_simple(id as i32)
                    .and_then(|c| c.del_dev())
                    .map_err(|e| control_error(id, "remove stale device", e))?;
            }
            DeviceState::Absent | DeviceState::Quiesced | DeviceState::FailIo => {}
        }
        let (ctrl_tx, ctrl_rx) = mpsc::channel();
        let (started_tx, started_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ublk{id}"))
            .spawn(move || {
                let result =
                    run_device(settings, recovered, backend, runtime, &ctrl_tx, started_tx);
                if let Err(e) = result {
                    let _ = ctrl_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Control {
                id,
                what: "start thread",
                message: e.to_string(),
            })?;
        // The device thread first hands over its control handle (or an
        // error), then says when the device is up.
        let ctrl = match ctrl_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(ctrl)) => ctrl,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(Error::Control {
                    id,
                    what: "create",
                    message: "no answer from the driver".into(),
                })
            }
        };
        let export = Export {
            settings,
            ctrl,
            thread: Some(thread),
            recovered,
        };
        match started_rx.recv_timeout(START_TIMEOUT) {
            Ok(()) => Ok(export),
            Err(_) => {
                // Failed or hung while starting: take down what exists.
                let error = ctrl_rx.try_recv().ok().and_then(Result::err);
                let _ = export.remove(None);
                Err(error.unwrap_or(Error::Control {
                    id,
                    what: "start",
                    message: "the device did not start".into(),
                }))
            }
        }
    }

    /// True when this daemon took the device over from a dead one.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    pub fn path(&self) -> std::path::PathBuf {
        block_device_path(self.settings.id)
    }

    /// Removes the device unless something holds it: a mounted file
    /// system, an exclusive opener, or any process with it open for longer
    /// than `HOLDERS_GRACE`. The check holds the device exclusively until it
    /// is gone, so nothing can mount it in between (a plain open in that
    /// moment still can). Refused, the export comes back. Blocking.
    pub fn remove_unless_in_use(self) -> Result<(), (Box<Export>, Error)> {
        let claim = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(self.path());
        let open_by = claim
            .as_ref()
            .ok()
            .and_then(|file| file.metadata().ok())
            .map(|m| holders::lasting_holders(m.rdev(), HOLDERS_GRACE))
            .unwrap_or_default();
        match claim {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let path = self.path();
                Err((Box::new(self), Error::InUse(path)))
            }
            Ok(_) if !open_by.is_empty() => {
                let path = self.path();
                let holders = holders::describe(&open_by);
                Err((Box::new(self), Error::OpenBy { path, holders }))
            }
            claim => {
                if let Err(e) = self.remove(claim.ok()) {
                    // Gone or going either way: report, do not hand it back.
                    tracing::warn!(error = %e, "removing the ublk device");
                }
                Ok(())
            }
        }
    }

    /// Stops the queues and deletes the device, in use or not. Blocking.
    /// `claim`, an exclusive open, is held until the block device is gone
    /// (nothing can mount it after that), and no longer: deleting waits
    /// for every opener to leave.
    fn remove(mut self, claim: Option<std::fs::File>) -> Result<(), Error> {
        let id = self.settings.id;
        control_ring_ready()?;
        let stopped = self.ctrl.kill_dev();
        drop(claim);
        if let Err(e) = stopped {
            // The queues may never stop: do not wait for them.
            return Err(control_error(id, "stop", e));
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        match self.ctrl.del_dev() {
            Ok(_) => Ok(()),
            Err(UblkError::OtherError(errno) | UblkError::UringIOError(errno))
                if errno.abs() == libc::ENODEV =>
            {
                Ok(())
            }
            Err(e) => Err(control_error(id, "delete", e)),
        }
    }
}

/// A device left for recovery must be the size of this volume: a
/// different size means another resource's device under the same id.
fn check_size(id: u32, volume_bytes: u64) -> Result<(), Error> {
    let sysfs = std::fs::read_to_string(format!("/sys/block/ublkb{id}/size"));
    let sectors = sysfs.ok().and_then(|text| text.trim().parse().ok());
    compare_size(id, sectors, volume_bytes)
}

/// `sectors`: the device's size in 512-byte sectors, if the kernel told.
fn compare_size(id: u32, sectors: Option<u64>, volume_bytes: u64) -> Result<(), Error> {
    match sectors {
        // The device has the volume's whole sectors (see set_parameters).
        Some(sectors) if sectors != volume_bytes >> 9 => Err(Error::NotOurs {
            id,
            device_bytes: sectors * 512,
            volume_bytes,
        }),
        _ => Ok(()),
    }
}

/// The device thread: creates or recovers the device and runs it until
/// its queues end.
fn run_device<B: Backend>(
    settings: Settings,
    recovered: bool,
    backend: Arc<B>,
    runtime: tokio::runtime::Handle,
    ctrl_tx: &mpsc::Sender<Result<Arc<UblkCtrl>, Error>>,
    started_tx: mpsc::Sender<()>,
) -> Result<(), Error> {
    let id = settings.id;
    control_ring_ready()?;
    let lifecycle = if recovered {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("blkmirror")
        .id(id as i32)
        .nr_queues(settings.queues)
        .depth(settings.depth)
        .io_buf_bytes(IO_BUF_BYTES)
        .ctrl_flags(u64::from(
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        ))
        .dev_flags(lifecycle)
        .build()
        .map_err(|e| control_error(id, if recovered { "open" } else { "add" }, e))?;
    if recovered {
        // Retries while the driver still quiesces the device (EBUSY), then
        // reports a failure as a negative value, not an error.
        match ctrl.start_user_recover() {
            Ok(r) if r < 0 => {
                return Err(control_error(
                    id,
                    "start recovery",
                    UblkError::OtherError(r),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(control_error(id, "start recovery", e)),
        }
    }
    let ctrl = Arc::new(ctrl);
    let _ = ctrl_tx.send(Ok(ctrl.clone()));
    let size = backend.size();
    let ctx = Arc::new(QueueContext { backend, runtime });
    ctrl.run_target(
        |dev: &mut UblkDev| {
            set_parameters(dev, size);
            Ok(())
        },
        move |qid, dev: &UblkDev| queue::serve(qid, dev, &ctx),
        move |_| {
            let _ = started_tx.send(());
        },
    )
    .map_err(|e| control_error(id, "start", e))?;
    tracing::debug!(id, "ublk device thread ends");
    Ok(())
}

/// Block sizes, the write cache and FUA, and zeroing limits.
fn set_parameters(dev: &mut UblkDev, size: u64) {
    dev.set_default_params(size);
    let params = &mut dev.tgt.params;
    params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
    // A write is only durable after FLUSH, or with FUA: tell the kernel
    // so, or it would never send either.
    params.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    params.discard = sys::ublk_param_discard {
        discard_granularity: 4096,
        max_discard_sectors: ZERO_MAX_BYTES >> 9,
        max_write_zeroes_sectors: ZERO_MAX_BYTES >> 9,
        max_discard_segments: 1,
        ..Default::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_of_the_volume_size_is_ours_and_another_size_is_not() {
        let volume = 166_723_584;
        assert!(compare_size(0, Some(volume >> 9), volume).is_ok());
        let e = compare_size(3, Some(1 << 11), volume).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NotOurs {
                    id: 3,
                    device_bytes: 1_048_576,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("ublk.id"), "{e}");
        // The kernel did not say: nothing to hold against the device.
        assert!(compare_size(0, None, volume).is_ok());
    }
}
