//! Running a node: open the volume, serve NBD and the control socket, and
//! shut down cleanly on `down`, SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkmirror_config::{Config, Endpoint};
use blkmirror_nbd::Listener;
use tokio::io::BufReader;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::control::{self, Request, Response};
use crate::frontend::{NbdExport, UblkFrontend};
use crate::peer::{self, Peer};
use crate::volume::{Role, Volume};
use crate::Error;

/// Runs `node` of `config` in the foreground until it is told to stop.
pub async fn run(config: &Config, node: &str) -> Result<(), Error> {
    let node_config = config.node(node)?;
    // The control socket first: it is how a second `up` of the same node
    // learns it must not touch the disk at all.
    let (control_listener, _control_file) = bind_unix(&node_config.control).await?;
    let volume = Volume::open(
        &config.name,
        node_config,
        config.protocol,
        config.al_extents,
    )?;
    let (nbd_listener, _nbd_file) = match &node_config.nbd {
        Endpoint::Unix(path) => {
            let (listener, file) = bind_unix(path).await?;
            (Listener::Unix(listener), Some(file))
        }
        Endpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Listen {
                    what: format!("NBD on tcp:{addr}"),
                    source,
                })?;
            (Listener::Tcp(listener), None)
        }
    };
    // Only now, with every socket bound, does the node mark its disk as in use.
    volume.start().await?;
    // The clients stop first; the peer only after the goodbye.
    let (stop_peer, peer_stopped) = watch::channel(false);
    let (stop_nbd, nbd_stopped) = watch::channel(false);
    let peer = peer::spawn(config, node, volume.clone(), peer_stopped);
    let nbd_task = tokio::spawn(blkmirror_nbd::accept_loop(
        nbd_listener,
        Arc::new(NbdExport(volume.clone())),
        nbd_stopped,
    ));
    let ublk = node_config
        .ublk
        .map(|settings| UblkFrontend::new(settings, volume.clone()));
    // The ublk device (if any) goes up before the node says it is ready.
    if let Some(ublk) = &ublk {
        resume_ublk(ublk, &volume, &peer, config.timeout).await;
    }
    tracing::info!(
        resource = %config.name,
        node,
        nbd = %node_config.nbd,
        control = %node_config.control.display(),
        role = ?volume.role(),
        "node is up"
    );
    notify_systemd("READY=1");

    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => {
                if may_go_down(ublk.as_ref(), "SIGTERM").await { break; }
            }
            _ = sigint.recv() => {
                if may_go_down(ublk.as_ref(), "SIGINT").await { break; }
            }
            accepted = control_listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if handle_control(stream, &volume, &peer, ublk.as_ref()).await {
                    break;
                }
            }
        }
    }
    notify_systemd("STOPPING=1");
    let _ = stop_nbd.send(true);
    let _ = nbd_task.await;
    peer.part();
    volume.say_goodbye().await;
    volume.prepare_disconnect().await;
    let _ = stop_peer.send(true);
    let clean = volume.shutdown().await?;
    #[cfg(feature = "fault-injection")]
    tracing::info!(
        writes = blkmirror_io::faults::writes(),
        "fault injection: disk writes seen"
    );
    if clean {
        tracing::info!("node is down (clean shutdown recorded)");
    } else {
        tracing::warn!("node is down (no clean shutdown recorded: see above)");
    }
    Ok(())
}

/// A node restarted after dying as primary with a ublk device finds the
/// device waiting, with its users' I/O queued: it becomes primary again
/// (if its data allows) and takes the device over.
async fn resume_ublk(
    ublk: &UblkFrontend,
    volume: &Arc<Volume>,
    peer: &Arc<Peer>,
    peer_timeout: std::time::Duration,
) {
    match ublk.left_by_dead_daemon() {
        Ok(false) => {}
        Ok(true) => {
            tracing::warn!(
                device = %ublk.path().display(),
                "the ublk device was left by a daemon that died; resuming as Primary to serve it"
            );
            // A live peer answers within its timeout; one that took over as
            // primary meanwhile must not be met by a second primary.
            let deadline = tokio::time::Instant::now() + peer_timeout;
            while peer.status().peer_role.is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let peer_status = peer.status();
            let resumed = if peer_status.peer_role == Some(Role::Primary) {
                Err(Error::PeerIsPrimary(peer_status.peer_node))
            } else {
                match volume.promote(false).await {
                    Ok(()) => ublk.start().await,
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = resumed {
                tracing::error!(
                    device = %ublk.path().display(),
                    error = %e,
                    "cannot resume the ublk device: its I/O waits until `blkmirror primary` \
                     succeeds here"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot ask the driver about the ublk device"),
    }
}

/// Removes the ublk device, if the node has one; refused while it is in
/// use (as DRBD refuses to demote or stop a device held open).
async fn stop_ublk(ublk: Option<&UblkFrontend>) -> Result<(), Error> {
    match ublk {
        Some(ublk) => ublk.stop().await,
        None => Ok(()),
    }
}

/// NBD connections attached: the volume's clients, less the ublk device.
fn nbd_clients(volume: &Volume, ublk: Option<&UblkFrontend>) -> usize {
    let held_by_device = usize::from(ublk.and_then(UblkFrontend::serving).is_some());
    volume.attached_clients().saturating_sub(held_by_device)
}

/// A signal asks the node down: it goes once its ublk device is removed,
/// and stays up while the device is in use.
async fn may_go_down(ublk: Option<&UblkFrontend>, why: &str) -> bool {
    match stop_ublk(ublk).await {
        Ok(()) => {
            tracing::info!("{why}: going down");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "{why}: not going down");
            false
        }
    }
}

/// Serves one control request. Returns true when the node must go down.
async fn handle_control(
    stream: UnixStream,
    volume: &Arc<Volume>,
    peer: &Arc<Peer>,
    ublk: Option<&UblkFrontend>,
) -> bool {
    let mut stream = BufReader::new(stream);
    let request = match control::read_request(&mut stream).await {
        Ok(r) => r,
        Err(message) => {
            let _ = control::write_response(&mut stream, &Response::Error { message }).await;
            return false;
        }
    };
    tracing::debug!(?request, "control request");
    let (response, down) = match request {
        Request::Status => {
            let mut status = volume.status();
            status.peer = Some(peer.status());
            status.nbd_clients = nbd_clients(volume, ublk);
            status.ublk_device = ublk
                .and_then(UblkFrontend::serving)
                .map(|device| device.display().to_string());
            (Response::Status(Box::new(status)), false)
        }
        Request::Primary { force } => {
            let mut result = if peer.status().peer_role == Some(Role::Primary) {
                Err(Error::PeerIsPrimary(peer.status().peer_node))
            } else {
                volume.promote(force).await
            };
            if let (Ok(()), Some(ublk)) = (&result, ublk) {
                if let Err(e) = ublk.start().await {
                    if let Err(demote) = volume.demote().await {
                        tracing::error!(error = %demote, "demoting after the ublk device failed");
                    }
                    volume.announce_state().await;
                    result = Err(Error::ExportFailed(Box::new(e)));
                }
            }
            (to_response(result), false)
        }
        Request::Secondary => {
            // NBD clients refuse the demotion anyway: keep the device
            // rather than remove it for nothing.
            let result = match nbd_clients(volume, ublk) {
                0 => stop_ublk(ublk).await,
                clients => Err(Error::ClientsAttached(clients)),
            };
            let result = match result {
                Ok(()) => volume.demote().await,
                Err(e) => Err(e),
            };
            volume.announce_state().await;
            if result.is_ok() {
                // The peer takes frames in order: once it confirms a barrier
                // sent after the news, it knows, and may be promoted at once.
                volume.settle().await;
            }
            (to_response(result), false)
        }
        Request::Connect { discard_my_data } => {
            let result = if discard_my_data && volume.role() == Role::Primary {
                Err(Error::DiscardOnPrimary)
            } else {
                peer.connect(discard_my_data);
                Ok(())
            };
            (to_response(result), false)
        }
        Request::Disconnect => {
            peer.part();
            volume.prepare_disconnect().await;
            peer.disconnect();
            (Response::Ok, false)
        }
        Request::Invalidate => {
            let result = volume.invalidate();
            if result.is_ok() {
                peer.reconnect();
            }
            (to_response(result), false)
        }
        Request::Resync { full } => {
            if full {
                volume.mark_everything_for_resync();
            }
            peer.reconnect();
            (Response::Ok, false)
        }
        Request::Verify => (
            match peer.start_verify() {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            false,
        ),
        Request::Fault { spec } => (inject_faults(&spec), false),
        Request::Down => match stop_ublk(ublk).await {
            Ok(()) => (Response::Ok, true),
            Err(e) => (to_response(Err(e)), false),
        },
    };
    let _ = control::write_response(&mut stream, &response).await;
    down
}

#[cfg(feature = "fault-injection")]
fn inject_faults(spec: &str) -> Response {
    match blkmirror_io::faults::set(spec) {
        Ok(()) => Response::Ok,
        Err(message) => Response::Error { message },
    }
}

#[cfg(not(feature = "fault-injection"))]
fn inject_faults(_spec: &str) -> Response {
    Response::Error {
        message: "this build has no fault injection (a test-only cargo feature)".into(),
    }
}

fn to_response(result: Result<(), Error>) -> Response {
    match result {
        Ok(()) => Response::Ok,
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

/// A socket file this process created; removed when the node stops, however
/// it stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::debug!(path = %self.0.display(), error = %e, "socket already gone");
        }
    }
}

/// Binds a Unix socket, replacing a stale file but never a live node's socket.
async fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), Error> {
    let listen_err = |source| Error::Listen {
        what: format!("unix:{}", path.display()),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::AlreadyUp(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    Ok((listener, SocketFile(path.to_path_buf())))
}

/// Tells systemd (Type=notify) about our state, when run under it.
fn notify_systemd(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let sent = match socket.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        None => sock.send_to(state.as_bytes(), &socket),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
