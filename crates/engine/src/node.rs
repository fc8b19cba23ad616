//! Running a node: open the volume, serve NBD and the control socket, and
//! shut down cleanly on `down`, SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkmirror_config::{Config, Endpoint};
use blkmirror_nbd::Listener;
use tokio::io::BufReader;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Notify};

use crate::control::{self, Request, Response};
use crate::frontend::{NbdExport, UblkFrontend};
use crate::peer::{self, ConnectionState, Peer};
use crate::volume::{Role, Volume};
use crate::Error;

/// How long a control client may take to send its request.
const CONTROL_REQUEST_WAIT: Duration = Duration::from_secs(5);
/// How long a node going down waits for the requests its NBD clients sent
/// before; past it, the shutdown is recorded as a crash.
const CLIENTS_DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How long `secondary` waits for NBD clients to go before it refuses: one
/// that has just disconnected stays attached until its last requests end.
const CLIENTS_LEAVING_WAIT: Duration = Duration::from_secs(1);

/// Runs `node` of `config` in the foreground until it is told to stop.
pub async fn run(config: &Config, node: &str) -> Result<(), Error> {
    let node_config = config.node(node)?;
    // Caught from the start: one that comes while the node starts takes it
    // down cleanly once it is up, rather than killing it halfway.
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    // The control socket first: it is how a second `up` of the same node
    // learns it must not touch the disk at all.
    let (control_listener, _control_file) = bind_unix(&node_config.control).await?;
    owner_only(&node_config.control)?;
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

    let control = Arc::new(ControlServer {
        volume: volume.clone(),
        peer: peer.clone(),
        ublk,
        changes: tokio::sync::Mutex::new(()),
        going_down: AtomicBool::new(false),
        down_asked: Notify::new(),
    });
    loop {
        tokio::select! {
            _ = sigterm.recv() => {
                tokio::spawn(control.clone().go_down_on_signal("SIGTERM"));
            }
            _ = sigint.recv() => {
                tokio::spawn(control.clone().go_down_on_signal("SIGINT"));
            }
            accepted = control_listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(control.clone().serve(stream));
                }
            }
            _ = control.down_asked.notified() => break,
        }
    }
    notify_systemd("STOPPING=1");
    let _ = stop_nbd.send(true);
    let _ = nbd_task.await;
    // Requests the clients sent before are still carried out.
    if control.nbd_clients_after(CLIENTS_DRAIN_WAIT).await > 0 {
        tracing::warn!("NBD requests still under way after {CLIENTS_DRAIN_WAIT:?}");
    }
    peer.part();
    let said_goodbye = volume.say_goodbye().await;
    let settled = volume.prepare_disconnect().await;
    match (said_goodbye, settled) {
        (false, _) => {}
        (true, true) => tracing::info!("the peer knows this node is primary no longer"),
        (true, false) => tracing::warn!(
            "the peer did not confirm the goodbye: it will need `primary --force` to take over"
        ),
    }
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
    peer_timeout: Duration,
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
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let peer_status = peer.status();
            let resumed = if peer_status.peer_role == Some(Role::Primary) {
                Err(Error::PeerIsPrimary(peer_status.peer_node))
            } else {
                let mut promoted = volume.promote(false).await;
                if matches!(promoted, Err(Error::PromotionUnanswered(_))) {
                    // The session ended while the peer was asked: now the
                    // node is alone, or in a new session that asks again.
                    promoted = volume.promote(false).await;
                }
                match promoted {
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

/// Serves control requests, each connection in a task of its own, so that
/// `status` answers at once whatever else runs, and a client that never
/// sends its request holds up nothing.
struct ControlServer {
    volume: Arc<Volume>,
    peer: Arc<Peer>,
    ublk: Option<UblkFrontend>,
    /// Requests that change something run one at a time, in the order they
    /// came (tokio's mutex is fair), as DRBD runs its state changes.
    changes: tokio::sync::Mutex<()>,
    /// Set, under the lock on changes, once the node is to go down: no
    /// change runs after that.
    going_down: AtomicBool,
    /// Tells the main loop to take the node down.
    down_asked: Notify,
}

impl ControlServer {
    async fn serve(self: Arc<Self>, stream: UnixStream) {
        let mut stream = BufReader::new(stream);
        let read = tokio::time::timeout(CONTROL_REQUEST_WAIT, control::read_request(&mut stream))
            .await
            .unwrap_or_else(|_| {
                tracing::debug!("a control client sent no request in time");
                Err(format!(
                    "no request within {} s",
                    CONTROL_REQUEST_WAIT.as_secs()
                ))
            });
        let request = match read {
            Ok(request) => request,
            Err(message) => {
                let _ = control::write_response(&mut stream, &Response::Error { message }).await;
                return;
            }
        };
        tracing::debug!(?request, "control request");
        let response = match request {
            Request::Status => self.status(),
            // The disk's behaviour, not a state change: it may have to
            // release a change that waits on the disk.
            Request::Fault { spec } => inject_faults(&spec),
            Request::Down => match self.may_go_down().await {
                Ok(()) => {
                    // Answer first: the process may end soon after.
                    let _ = control::write_response(&mut stream, &Response::Ok).await;
                    self.down_asked.notify_one();
                    return;
                }
                Err(e) => to_response(Err(e)),
            },
            change => {
                let _one_at_a_time = self.changes.lock().await;
                if self.going_down.load(Ordering::Relaxed) {
                    Response::Error {
                        message: "the node is going down".into(),
                    }
                } else {
                    self.change(change).await
                }
            }
        };
        let _ = control::write_response(&mut stream, &response).await;
    }

    fn status(&self) -> Response {
        let mut status = self.volume.status();
        status.peer = Some(self.peer.status());
        status.nbd_clients = self.nbd_clients();
        status.ublk_device = self
            .ublk
            .as_ref()
            .and_then(UblkFrontend::serving)
            .map(|device| device.display().to_string());
        Response::Status(Box::new(status))
    }

    /// Runs a request that changes something; `status`, `down` and `fault`
    /// are not among them.
    async fn change(&self, request: Request) -> Response {
        let (volume, peer) = (&self.volume, &self.peer);
        match request {
            Request::Primary { force } => {
                let mut result = if peer.status().peer_role == Some(Role::Primary) {
                    Err(Error::PeerIsPrimary(peer.status().peer_node))
                } else {
                    volume.promote(force).await
                };
                if result.is_ok() {
                    peer.keep_my_data();
                }
                if let (Ok(()), Some(ublk)) = (&result, &self.ublk) {
                    if let Err(e) = ublk.start().await {
                        if let Err(demote) = volume.demote().await {
                            tracing::error!(error = %demote, "demoting after the ublk device failed");
                        }
                        volume.announce_state().await;
                        result = Err(Error::ExportFailed(Box::new(e)));
                    }
                }
                to_response(result)
            }
            Request::Secondary => {
                // NBD clients refuse the demotion anyway: keep the device
                // rather than remove it for nothing.
                let result = match self.nbd_clients_after(CLIENTS_LEAVING_WAIT).await {
                    0 => self.stop_ublk().await,
                    clients => Err(Error::ClientsAttached(clients)),
                };
                let result = match result {
                    Ok(()) => volume.demote().await,
                    Err(e) => Err(e),
                };
                volume.announce_state().await;
                if result.is_ok() {
                    // The peer takes frames in order: once it confirms a
                    // barrier sent after the news, it knows, and may be
                    // promoted at once.
                    volume.settle().await;
                }
                to_response(result)
            }
            Request::Connect { discard_my_data } => {
                if discard_my_data && volume.role() == Role::Primary {
                    to_response(Err(Error::DiscardOnPrimary))
                } else {
                    peer.connect(discard_my_data);
                    Response::Ok
                }
            }
            Request::Disconnect => {
                peer.keep_my_data();
                peer.part();
                volume.prepare_disconnect().await;
                peer.disconnect();
                Response::Ok
            }
            Request::Invalidate => {
                if let Some(message) = peer_holds_no_good_copy(peer) {
                    return Response::Error { message };
                }
                let result = volume.invalidate();
                if result.is_ok() {
                    peer.reconnect();
                }
                to_response(result)
            }
            Request::Resync { full } => {
                let status = peer.status();
                if status.connection == ConnectionState::StandAlone {
                    return Response::Error {
                        message: format!(
                            "not connecting to {} (StandAlone): `blkmirror connect` first",
                            status.peer_node
                        ),
                    };
                }
                if full {
                    volume.mark_everything_for_resync();
                }
                peer.reconnect();
                Response::Ok
            }
            Request::Verify => match peer.start_verify() {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            Request::Status | Request::Down | Request::Fault { .. } => {
                unreachable!("served without the lock on changes")
            }
        }
    }

    /// Readies the node to go down once the change in progress is done,
    /// but not while its ublk device is in use (as DRBD refuses to stop a
    /// device held open). Asking again is no error. The caller then tells
    /// the main loop.
    async fn may_go_down(&self) -> Result<(), Error> {
        let _one_at_a_time = self.changes.lock().await;
        if self.going_down.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.stop_ublk().await?;
        self.going_down.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// A signal asks the node down: it goes once its ublk device is
    /// removed, and stays up while the device is in use.
    async fn go_down_on_signal(self: Arc<Self>, why: &'static str) {
        match self.may_go_down().await {
            Ok(()) => {
                tracing::info!("{why}: going down");
                self.down_asked.notify_one();
            }
            Err(e) => tracing::error!(error = %e, "{why}: not going down"),
        }
    }

    /// Removes the ublk device, if the node has one; refused while it is in
    /// use.
    async fn stop_ublk(&self) -> Result<(), Error> {
        match &self.ublk {
            Some(ublk) => ublk.stop().await,
            None => Ok(()),
        }
    }

    /// The NBD clients still attached after up to `wait` for them to go.
    async fn nbd_clients_after(&self, wait: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let clients = self.nbd_clients();
            if clients == 0 || tokio::time::Instant::now() >= deadline {
                return clients;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// NBD connections attached: the volume's clients, less the ublk device.
    fn nbd_clients(&self) -> usize {
        let held_by_device = usize::from(
            self.ublk
                .as_ref()
                .is_some_and(UblkFrontend::holds_attachment),
        );
        self.volume
            .attached_clients()
            .saturating_sub(held_by_device)
    }
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

/// Why `invalidate` must not run now: the connected peer's disk is not
/// UpToDate, so this node may hold the only good copy. (Disconnected, the
/// operator's word stands: the peer is checked at the next handshake.)
fn peer_holds_no_good_copy(peer: &Peer) -> Option<String> {
    let status = peer.status();
    if status.connection != ConnectionState::Connected {
        return None;
    }
    let peer_disk = status.peer_disk_state.as_deref().unwrap_or("unknown");
    (peer_disk != "UpToDate").then(|| {
        format!(
            "refusing to invalidate: {}'s disk is {peer_disk}, not UpToDate, and this node may \
             hold the only good copy (`disconnect` first to invalidate it anyway)",
            status.peer_node
        )
    })
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

/// Lets only the socket's owner connect: the control socket promotes,
/// invalidates and stops the node, whatever the umask says.
fn owner_only(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::Listen {
            what: format!("unix:{} (setting its mode to 0600)", path.display()),
            source,
        }
    })
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
