//! The connection to the peer node: its one or two links, the handshake
//! (identity, volume, sizes, generations, optional HMAC authentication), the
//! sync decision, resync in either direction, verify, and the replication of
//! application writes once connected.
//!
//! The node whose name sorts first connects; the other listens on each of
//! its links. The first link to come up carries the handshake that opens a
//! session; the others join that session. A session lives as long as one
//! of its links does (see [`Channel`]).

mod channel;
mod resync;
mod split_brain;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkmirror_config::{AfterSplitBrain, Config, Protocol, LINKS_MAX};
use blkmirror_io::AlignedBuf;
use blkmirror_metadata::superblock::Flags;
use blkmirror_metadata::sync_decision::{decide, SyncDecision};
use blkmirror_proto::message::{
    Generations as WireGenerations, NONCE_BYTES, WRITE_FLAG_ACK_RECEIVED, WRITE_FLAG_FUA,
    WRITE_FLAG_ZERO,
};
use blkmirror_proto::{auth, AckKind, FrameHeader, Hello, Message, SharedSettings, HEADER_BYTES};
use bytes::BufMut;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

#[cfg(test)]
pub(crate) use channel::{tests::pair as channel_pair, Inbox};
pub use channel::{Channel, Lost, Reply, VolatileWrite};
use resync::{ChunkKind, CHECKSUM_DIFFERS};

use crate::volume::{Role, Volume};

const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);
/// After a refusal that needs an operator (split brain, unrelated data),
/// the node tries again only this rarely, and says so each time.
const REFUSED_RETRY_DELAY: Duration = Duration::from_secs(10);
/// Replicated writes being applied at once on this node.
const APPLYING_MAX: u32 = 128;
/// Bytes of data those writes hold, at most.
const APPLYING_BYTES_MAX: u32 = 64 << 20;
const _: () = assert!(blkmirror_proto::PAYLOAD_MAX_BYTES <= APPLYING_BYTES_MAX);
/// Flushes for the peer's barriers running at once.
const FLUSHING_MAX: u32 = 4;
/// Link connections between accepting and their handshake.
const ARRIVALS_QUEUED_MAX: usize = 2 * LINKS_MAX;
/// Link handshakes under way at once on one listening link.
const HANDSHAKES_MAX: usize = 4;
/// How often a sync source tells the target how far it has got.
const PROGRESS_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// `State::disk_state`: the sender's disk failed and is detached (0: its
/// flags tell its disk state).
pub const STATE_DISKLESS: u8 = 1;
/// The most the peer may have this node read at once: a diskless peer's
/// `Read`, or the chunk of a `ResyncChecksum`.
const READ_MAX_BYTES: u32 = 4 << 20;
/// Bytes read for the peer's `Read`s and `ResyncChecksum`s and not yet
/// answered, at most. An honest peer asks for far less at once (a resync
/// has 16 MiB in flight). Each read counts as a page at least, which also
/// bounds how many run.
const READING_BYTES_MAX: u32 = 64 << 20;
const READ_CHARGE_MIN_BYTES: u32 = 4096;
const _: () = assert!(READ_MAX_BYTES <= READING_BYTES_MAX);
/// A flag in Hello: the operator resolved a split brain against this side
/// (`connect --discard-my-data`): its changes go, the peer's data wins.
pub const HELLO_FLAG_DISCARD_MY_DATA: u32 = 1 << 31;
/// A flag in Hello: the sender's disk failed and is detached.
pub const HELLO_FLAG_DISKLESS: u32 = 1 << 29;
/// A flag in Hello: the sender's disk still holds writes of the last
/// session, so it opens no session yet; it only says why.
pub const HELLO_FLAG_DRAINING: u32 = 1 << 28;
/// A flag in Hello: this link joins the session named in the Hello rather
/// than opening a new one.
pub const HELLO_FLAG_JOIN: u32 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    StandAlone,
    Connecting,
    /// This node refused the last attempt for a reason an operator must
    /// settle (both nodes do for split brain, unrelated data, or sizes or
    /// settings that differ); `last_error` says which. Tried again every
    /// 10 s, or at once on `connect`.
    Refused,
    Connected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The peer's address for this link.
    pub address: String,
    pub state: ConnectionState,
    /// Bytes this node sent on the link in the current session.
    pub sent_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub done_bytes: u64,
    /// Of `done_bytes`, how much was all zeroes and went as a zeroing command.
    pub zero_bytes: u64,
    /// Of `done_bytes`, how much the peer already held (checksums matched).
    pub same_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_s: u64,
    pub eta_s: u64,
}

impl ResyncStatus {
    /// Seconds left at the rate so far.
    fn eta(&self) -> u64 {
        let left = self.total_bytes.saturating_sub(self.done_bytes);
        left / self.bytes_per_s.max(1)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyStatus {
    pub running: bool,
    /// Whether a verify has completed since the node started.
    pub finished: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Found different on the two nodes, and marked out of sync.
    pub differing_bytes: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub connection: ConnectionState,
    pub replication: ReplicationState,
    pub peer_node: String,
    pub peer_role: Option<Role>,
    pub peer_disk_state: Option<String>,
    pub links: Vec<LinkStatus>,
    pub resync: ResyncStatus,
    pub verify: VerifyStatus,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("Link I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("Peer sent a bad frame: {0}")]
    Wire(String),
    #[error("Peer was silent for {0:?}")]
    Timeout(Duration),
    #[error("Every link to the peer is down: {0}")]
    LinksLost(String),
    /// The peer opened a new session (it restarted, or lost this one).
    #[error("Peer started a new session")]
    Superseded,
    /// Needs an operator: retried only rarely.
    #[error("{0}")]
    Refused(String),
    /// Waits for something that happens on its own (a promotion).
    #[error("{0}")]
    NotYet(String),
    #[error(transparent)]
    Local(#[from] crate::Error),
}

/// What the node knows of its peer, shared with `status`.
pub struct Peer {
    peer_node: String,
    link_addresses: Vec<SocketAddr>,
    state: Mutex<Shared>,
    /// The current session's channel, for the per-link status.
    channel: Mutex<Option<Arc<Channel>>>,
    /// Whether the operator wants the link up (`connect` / `disconnect`).
    wanted: watch::Sender<bool>,
    /// A planned disconnection is under way: no new session (see `part`).
    parting: AtomicBool,
    /// Ends the current session so the next handshake decides afresh.
    kick: Notify,
    /// `verify` asked for.
    verify_wanted: Notify,
    /// `connect --discard-my-data` is pending: said in every Hello until a
    /// session opens.
    discard_my_data: AtomicBool,
    resync_rate_max_bytes_per_s: Option<u64>,
}

struct Shared {
    connection: ConnectionState,
    replication: ReplicationState,
    peer_role: Option<Role>,
    peer_disk_state: Option<String>,
    last_error: Option<String>,
    resync: ResyncStatus,
    resync_started: Option<Instant>,
    verify: VerifyStatus,
}

impl Peer {
    /// `connect`: (re)establish the link from now on; with
    /// `discard_my_data`, the next session resolves a split brain in the
    /// peer's favour.
    pub fn connect(&self, discard_my_data: bool) {
        if discard_my_data {
            self.discard_my_data.store(true, Ordering::Relaxed);
        }
        self.parting.store(false, Ordering::Relaxed);
        // (Wakes a node waiting after a refusal, too.)
        let was_wanted = self.wanted.send_replace(true);
        // Say so at once: a `wait-sync` right after must not find the node
        // StandAlone, or refused for what the operator has just settled.
        // (A node that could not listen stays StandAlone.)
        self.set(|s| match s.connection {
            ConnectionState::StandAlone if !was_wanted => {
                s.connection = ConnectionState::Connecting;
            }
            ConnectionState::Refused => {
                s.connection = ConnectionState::Connecting;
                s.last_error = None;
            }
            _ => {}
        });
    }

    /// Calls off a `connect --discard-my-data` that no session has used
    /// yet: the node was promoted (its clients' writes are not to be
    /// discarded), or disconnected.
    pub fn keep_my_data(&self) {
        if self.discard_my_data.swap(false, Ordering::Relaxed) {
            tracing::info!("`--discard-my-data` called off: this node's data is kept");
        }
    }

    /// Before a planned disconnection (`disconnect`, `down`): the current
    /// session goes on until it is settled, but no new one starts, so the
    /// peer's answer of ending it is not followed by a reconnection.
    pub fn part(&self) {
        self.parting.store(true, Ordering::Relaxed);
    }

    /// `disconnect`: drop the link and stay StandAlone until `connect`.
    pub fn disconnect(&self) {
        self.wanted.send_replace(false);
    }

    /// Drops the current session; the node reconnects at once and the
    /// handshake decides again (after `invalidate` or `resync`).
    pub fn reconnect(&self) {
        self.kick.notify_waiters();
    }

    /// `verify`: compare both replicas by checksum, online.
    pub fn start_verify(&self) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        if s.replication != ReplicationState::Established {
            return Err(format!(
                "verify needs replication Established with {}; it is {:?}",
                self.peer_node, s.replication
            ));
        }
        if s.verify.running {
            return Err("a verify is already running".into());
        }
        s.verify = VerifyStatus {
            running: true,
            ..VerifyStatus::default()
        };
        self.verify_wanted.notify_one();
        Ok(())
    }

    pub fn status(&self) -> PeerStatus {
        let (links_up, sent_bytes) = self
            .channel
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| (*c.links_up().borrow(), c.sent_bytes()))
            .unwrap_or(([false; LINKS_MAX], [0; LINKS_MAX]));
        let s = self.state.lock().unwrap();
        PeerStatus {
            connection: s.connection,
            replication: s.replication,
            peer_node: self.peer_node.clone(),
            peer_role: s.peer_role,
            peer_disk_state: s.peer_disk_state.clone(),
            links: self
                .link_addresses
                .iter()
                .zip(links_up.into_iter().zip(sent_bytes))
                .map(|(address, (up, sent_bytes))| LinkStatus {
                    address: address.to_string(),
                    state: match (up, s.connection) {
                        (true, _) => ConnectionState::Connected,
                        (false, ConnectionState::Connected) => ConnectionState::Connecting,
                        (false, overall) => overall,
                    },
                    sent_bytes,
                })
                .collect(),
            resync: s.resync.clone(),
            verify: s.verify.clone(),
            last_error: s.last_error.clone(),
        }
    }

    fn set(&self, change: impl FnOnce(&mut Shared)) {
        change(&mut self.state.lock().unwrap());
    }

    fn progress(&self, done_delta: u64, kind: ChunkKind) {
        self.set(|s| {
            s.resync.done_bytes += done_delta;
            match kind {
                ChunkKind::Zero => s.resync.zero_bytes += done_delta,
                ChunkKind::Checksum => s.resync.same_bytes += done_delta,
                ChunkKind::Data => {}
            }
            if let Some(started) = s.resync_started {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                s.resync.bytes_per_s = (s.resync.done_bytes as f64 / secs) as u64;
                s.resync.eta_s = s.resync.eta();
            }
        });
    }

    fn verify_progress(&self, done_delta: u64, differs: bool) {
        self.set(|s| {
            s.verify.done_bytes += done_delta;
            if differs {
                s.verify.differing_bytes += done_delta;
            }
        });
    }
}

/// Starts the peer connection manager for `volume`; it runs until `stop`.
pub fn spawn(
    config: &Config,
    node: &str,
    volume: Arc<Volume>,
    stop: watch::Receiver<bool>,
) -> Arc<Peer> {
    let me = config.node(node).expect("node checked at start-up").clone();
    let peer_config = config
        .peer_of(node)
        .expect("configs name two nodes")
        .clone();
    let peer = Arc::new(Peer {
        peer_node: peer_config.name.clone(),
        link_addresses: peer_config.links.clone(),
        state: Mutex::new(Shared {
            connection: ConnectionState::Connecting,
            replication: ReplicationState::Off,
            peer_role: None,
            peer_disk_state: None,
            last_error: None,
            resync: ResyncStatus::default(),
            resync_started: None,
            verify: VerifyStatus::default(),
        }),
        channel: Mutex::new(None),
        wanted: watch::channel(true).0,
        parting: AtomicBool::new(false),
        kick: Notify::new(),
        verify_wanted: Notify::new(),
        discard_my_data: AtomicBool::new(false),
        resync_rate_max_bytes_per_s: config.resync_rate_max_bytes_per_s,
    });
    let manager = Arc::new(Manager {
        peer: peer.clone(),
        volume,
        my_name: me.name.clone(),
        peer_name: peer_config.name.clone(),
        connects: me.name < peer_config.name,
        my_links: me.links.clone(),
        peer_links: peer_config.links.clone(),
        secret: config.secret.clone(),
        timeout: config.timeout,
        after_sb_0pri: config.after_sb_0pri,
        shared: shared_settings(config),
        last_load: Mutex::new(None),
        draining: AtomicBool::new(false),
        session_changes: AtomicU64::new(0),
    });
    tokio::spawn(manager.run(stop));
    peer
}

struct Manager {
    peer: Arc<Peer>,
    volume: Arc<Volume>,
    my_name: String,
    peer_name: String,
    connects: bool,
    my_links: Vec<SocketAddr>,
    peer_links: Vec<SocketAddr>,
    secret: Option<String>,
    timeout: Duration,
    after_sb_0pri: AfterSplitBrain,
    /// What this node's Hellos say of the settings both nodes must share.
    shared: SharedSettings,
    /// The last session's load: writes it still applies hold a share.
    last_load: Mutex<Option<Arc<PeerLoad>>>,
    /// Set while the last session's writes have not reached the disk: no
    /// link handshake is accepted until they have.
    draining: AtomicBool,
    /// Sessions opened and ended so far, counted together (odd while one
    /// is open). A handshake opens a session only if this has not moved
    /// since its Hello was built: the Hellos say what this node is now.
    session_changes: AtomicU64,
}

/// A link connection that has passed its handshake.
struct Arrival {
    index: usize,
    reader: FrameReader,
    writer: BufWriter<OwnedWriteHalf>,
    local: Hello,
    remote: Hello,
    /// When the handshake ended: a peer that hears nothing for its timeout
    /// after it has given the session up.
    at: Instant,
    /// `Manager::session_changes` as this node's Hello was built.
    session_changes: u64,
}

impl Manager {
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        // The listening side accepts on every link at once; connections
        // arrive here after their handshake.
        let mut arrivals = None;
        let mut _acceptors = Vec::new();
        if !self.connects {
            let (tx, rx) = mpsc::channel(ARRIVALS_QUEUED_MAX);
            for (index, address) in self.my_links.iter().enumerate() {
                let listener = match TcpListener::bind(address).await {
                    Ok(l) => l,
                    Err(e) => {
                        let message = format!("cannot listen on link {index} ({address}): {e}");
                        tracing::error!("{message}");
                        self.peer.set(|s| {
                            s.connection = ConnectionState::StandAlone;
                            s.last_error = Some(message);
                        });
                        return;
                    }
                };
                _acceptors.push(AbortOnDrop(tokio::spawn(self.clone().accept_link(
                    index,
                    listener,
                    tx.clone(),
                ))));
            }
            arrivals = Some(rx);
        }
        let mut delay = RECONNECT_DELAY_MIN;
        let mut wanted = self.peer.wanted.subscribe();
        loop {
            if !*wanted.borrow_and_update() {
                self.peer
                    .set(|s| s.connection = ConnectionState::StandAlone);
                tracing::info!(
                    peer = self.peer_name,
                    "disconnected by the operator; StandAlone until `connect`"
                );
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = wanted.wait_for(|w| *w) => {}
                }
                self.peer
                    .set(|s| s.connection = ConnectionState::Connecting);
                delay = RECONNECT_DELAY_MIN;
            }
            if self.peer.parting.load(Ordering::Relaxed) {
                // A planned disconnection: `disconnect` or shutdown follows
                // (or `connect` calls it off).
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = wanted.changed() => {}
                }
                continue;
            }
            let attempt = async {
                match arrivals.as_mut() {
                    None => self.connector_session().await,
                    Some(arrivals) => self.acceptor_session(arrivals).await,
                }
            };
            let outcome = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = wanted.wait_for(|w| !*w) => Ok(()),
                _ = self.peer.kick.notified() => Ok(()),
                outcome = attempt => outcome,
            };
            // Closed before writes go without it: a write made alone marks
            // the bitmap, and a resync barrier confirmed on this session
            // clears only while it is open (see `mark_in_sync_on`).
            let ended = self.peer.channel.lock().unwrap().take();
            if let Some(channel) = &ended {
                channel.close("session ended");
            }
            self.volume.end_session();
            if let Some(channel) = ended {
                if let Err(e) = self.volume.session_over(&channel) {
                    tracing::error!(error = %e, "cannot mark writes the peer may not have kept");
                }
                // A session was up: the next attempt starts from the
                // shortest delay again.
                delay = RECONNECT_DELAY_MIN;
            }
            let retry_after = match &outcome {
                Err(PeerError::Refused(reason)) => {
                    tracing::error!(peer = self.peer_name, "{reason}");
                    REFUSED_RETRY_DELAY
                }
                Err(PeerError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => delay,
                Err(PeerError::NotYet(reason)) => {
                    tracing::info!(peer = self.peer_name, "waiting: {reason}");
                    delay
                }
                Err(PeerError::Superseded) => {
                    tracing::info!(
                        peer = self.peer_name,
                        "the peer started a new session; it dials again"
                    );
                    Duration::ZERO
                }
                Err(e) => {
                    tracing::warn!(peer = self.peer_name, error = %e, "connection to the peer lost");
                    delay
                }
                Ok(()) => delay,
            };
            self.peer.set(|s| {
                s.connection = match &outcome {
                    Err(PeerError::Refused(_)) => ConnectionState::Refused,
                    _ => ConnectionState::Connecting,
                };
                s.replication = ReplicationState::Off;
                s.peer_role = None;
                s.peer_disk_state = None;
                if s.verify.running {
                    s.verify.running = false;
                    s.verify.error = Some(format!(
                        "cut off: the session with {} ended",
                        self.peer_name
                    ));
                }
                match &outcome {
                    Err(PeerError::Superseded) | Ok(()) => {}
                    Err(e) => s.last_error = Some(e.to_string()),
                }
            });
            let last_load = self.last_load.lock().unwrap().take();
            if let Some(load) = last_load {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = self.drain(&load) => {}
                };
            }
            if self.session_changes.load(Ordering::SeqCst) % 2 == 1 {
                // Its end is recorded and its writes are on the disk:
                // handshakes from now on open a session.
                self.session_changes.fetch_add(1, Ordering::SeqCst);
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = wanted.changed() => {}
                _ = tokio::time::sleep(retry_after) => {}
            }
            delay = (delay * 2).min(RECONNECT_DELAY_MAX);
        }
    }

    /// Accepts connections on link `index` and hands them on after their
    /// handshake; refuses them while the operator wants no connection.
    async fn accept_link(
        self: Arc<Self>,
        index: usize,
        listener: TcpListener,
        arrivals: mpsc::Sender<Arrival>,
    ) {
        // Unauthenticated connections cost memory: only a few at a time.
        let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(link = index, error = %e, "accepting a link connection failed");
                    tokio::time::sleep(RECONNECT_DELAY_MIN).await;
                    continue;
                }
            };
            if !*self.peer.wanted.borrow() || self.peer.parting.load(Ordering::Relaxed) {
                continue;
            }
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(
                    link = index,
                    "too many link handshakes at once; connection dropped"
                );
                continue;
            };
            let (me, arrivals) = (self.clone(), arrivals.clone());
            tokio::spawn(async move {
                let handshake = me.link_handshake(index, stream, 0, false).await;
                drop(permit);
                match handshake {
                    Ok(arrival) if arrival.local.flags & HELLO_FLAG_DRAINING != 0 => {
                        tracing::debug!(link = index, "told the peer why no session opens yet");
                    }
                    Ok(arrival) => {
                        let _ = arrivals.send(arrival).await;
                    }
                    Err(PeerError::Refused(reason)) => {
                        tracing::error!(link = index, "{reason}");
                        // (Not shown as Refused: anyone who reaches the port
                        // could make it so.)
                        me.peer.set(|s| s.last_error = Some(reason));
                    }
                    Err(e) => tracing::debug!(link = index, error = %e, "link handshake failed"),
                }
            });
        }
    }

    /// Connects link `index` from this node's own address for it, so the
    /// traffic takes that link's path.
    async fn dial(&self, index: usize) -> Result<TcpStream, PeerError> {
        let to = self.peer_links[index];
        let socket = if to.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(self.my_links[index].ip(), 0))?;
        tokio::time::timeout(self.timeout, socket.connect(to))
            .await
            .map_err(|_| PeerError::Timeout(self.timeout))?
            .map_err(PeerError::Io)
    }

    /// Exchanges Hellos (and proofs of the secret) on a new link connection.
    /// `session` and `join` say which session the connecting side means.
    async fn link_handshake(
        &self,
        index: usize,
        stream: TcpStream,
        session: u64,
        join: bool,
    ) -> Result<Arrival, PeerError> {
        stream.set_nodelay(true)?;
        let (read_half, write_half) = stream.into_split();
        let mut reader = FrameReader::new(
            BufReader::with_capacity(256 * 1024, read_half),
            self.timeout,
        );
        let mut writer = BufWriter::with_capacity(256 * 1024, write_half);
        let session_changes = self.session_changes.load(Ordering::SeqCst);
        let mut local = self.volume.hello(index as u8, self.shared);
        local.session = session;
        if join {
            local.flags |= HELLO_FLAG_JOIN;
        }
        // (Never from a primary: its clients' writes are not discarded.)
        if self.peer.discard_my_data.load(Ordering::Relaxed)
            && self.volume.role() != crate::volume::Role::Primary
        {
            local.flags |= HELLO_FLAG_DISCARD_MY_DATA;
        }
        if self.draining.load(Ordering::Relaxed) {
            local.flags |= HELLO_FLAG_DRAINING;
        }
        write_frame(
            &mut writer,
            &Message::Hello(local.clone()),
            local.volume_uuid,
        )
        .await?;
        let Message::Hello(remote) = reader.next().await? else {
            return Err(PeerError::Wire("expected Hello".into()));
        };
        if remote.node_name != self.peer_name {
            return Err(PeerError::Refused(format!(
                "peer at link {index} says it is node {:?}, expected {:?}",
                remote.node_name, self.peer_name
            )));
        }
        if usize::from(remote.link_index) != index {
            return Err(PeerError::Refused(format!(
                "the peer's link {} reached this node's link {index}: are the links crossed in the config?",
                remote.link_index
            )));
        }
        if let Some(secret) = &self.secret {
            authenticate(
                &mut reader,
                &mut writer,
                secret.as_bytes(),
                &self.my_name,
                &remote,
                local.volume_uuid,
            )
            .await?;
        }
        Ok(Arrival {
            index,
            reader,
            writer,
            local,
            remote,
            at: Instant::now(),
            session_changes,
        })
    }

    /// The connecting side: the first link to answer opens a new session.
    async fn connector_session(self: &Arc<Self>) -> Result<(), PeerError> {
        // Every link dials at once, but one handshake at a time opens the
        // session, on the first link to connect: the peer decides from the
        // Hellos of the handshake that opens it, and so must this node.
        // Two handshakes at once could carry different Hellos (a write or
        // a promotion in between) and the two nodes decide from different
        // ones. The other links join once the session is open.
        let mut dials = tokio::task::JoinSet::new();
        for index in 0..self.peer_links.len() {
            let me = self.clone();
            dials.spawn(async move { (index, me.dial(index).await) });
        }
        // A refusal says more than a link that is merely down.
        let mut failure: Option<PeerError> = None;
        let failed = |e: PeerError, failure: &mut Option<PeerError>| {
            if !matches!(failure, Some(PeerError::Refused(_))) {
                *failure = Some(e);
            }
        };
        let (first, session) = loop {
            match dials.join_next().await {
                Some(Ok((index, Ok(stream)))) => {
                    // A session number of its own: should the peer have
                    // finished this handshake as this node gave it up, it
                    // takes the next one for a new session, not a join.
                    let session = blkmirror_metadata::fresh_generation().max(1);
                    match self.link_handshake(index, stream, session, false).await {
                        Ok(arrival) => break (arrival, session),
                        Err(e) => failed(e, &mut failure),
                    }
                }
                Some(Ok((_, Err(e)))) => failed(e, &mut failure),
                Some(Err(e)) => failed(
                    PeerError::Wire(format!("link task failed: {e}")),
                    &mut failure,
                ),
                None => {
                    return Err(
                        failure.unwrap_or_else(|| PeerError::Wire("no link configured".into()))
                    )
                }
            }
        };
        drop(dials);
        self.session(first, session, None).await
    }

    /// The listening side: waits for a connection that opens a session.
    async fn acceptor_session(
        self: &Arc<Self>,
        arrivals: &mut mpsc::Receiver<Arrival>,
    ) -> Result<(), PeerError> {
        let first = loop {
            let arrival = arrivals
                .recv()
                .await
                .expect("acceptors live as long as the manager");
            if arrival.session_changes != self.session_changes.load(Ordering::SeqCst) {
                // Its Hello was built while the last session was open, and
                // says nothing of what that session's end recorded. The
                // peer, finding the connection closed, dials again.
                tracing::info!(
                    link = arrival.index,
                    "a handshake made while the last session was open; dropped"
                );
                continue;
            }
            if arrival.at.elapsed() > self.timeout {
                // (Queued while an attempt failed, say.) Its Hellos may be
                // stale, and nothing is to be recorded from them.
                tracing::info!(
                    link = arrival.index,
                    "a handshake too old to open a session (the peer has given it up); dropped"
                );
                continue;
            }
            if arrival.remote.flags & HELLO_FLAG_JOIN == 0 {
                break arrival;
            }
            tracing::debug!(
                link = arrival.index,
                "a link joined a session that is gone; dropped"
            );
        };
        let session = first.remote.session;
        self.session(first, session, Some(arrivals)).await
    }

    /// One session, from the handshake on its first link until every link
    /// is lost (or the peer opens another).
    async fn session(
        self: &Arc<Self>,
        mut first: Arrival,
        session: u64,
        arrivals: Option<&mut mpsc::Receiver<Arrival>>,
    ) -> Result<(), PeerError> {
        self.session_changes.fetch_add(1, Ordering::SeqCst);
        if self.peer.parting.load(Ordering::Relaxed) {
            // A handshake that was under way as the operator disconnected.
            return Err(PeerError::NotYet("this node is disconnecting".into()));
        }
        if first.remote.flags & HELLO_FLAG_DRAINING != 0 {
            return Err(PeerError::NotYet(format!(
                "writes of the last session have not reached {}'s disk (does it hang?): \
                 no new session until they have",
                self.peer_name
            )));
        }
        let volume_uuid = self.check_hello(&first.local, &first.remote)?;
        let decision = self.decide(&first.local, &first.remote)?;
        self.peer.discard_my_data.store(false, Ordering::Relaxed);
        self.volume
            .note_peer_role(first.remote.flags & Flags::PRIMARY.bits() != 0)?;
        tracing::info!(
            peer = self.peer_name,
            link = first.index,
            ?decision,
            "connected"
        );
        let (channel, inbox) = Channel::new(volume_uuid, self.timeout);
        self.volume.session_began(channel.clone());
        let _close = CloseOnDrop(channel.clone());
        first.reader.trust(volume_uuid);
        channel.attach(first.index, first.reader, first.writer);
        *self.peer.channel.lock().unwrap() = Some(channel.clone());
        let remote = &first.remote;
        self.peer.set(|s| {
            s.connection = ConnectionState::Connected;
            s.peer_role = Some(if remote.flags & Flags::PRIMARY.bits() != 0 {
                Role::Primary
            } else {
                Role::Secondary
            });
            s.peer_disk_state = Some(disk_state_name(remote.flags));
            s.last_error = None;
            s.resync = ResyncStatus::default();
        });
        // The connecting side keeps every link of the session up.
        let _keepers: Vec<_> = if self.connects {
            (0..self.peer_links.len())
                .map(|index| {
                    AbortOnDrop(tokio::spawn(self.clone().keep_link(
                        index,
                        channel.clone(),
                        session,
                    )))
                })
                .collect()
        } else {
            Vec::new()
        };
        let run = self.connected(inbox, &channel, decision, u64::from(remote.granularity));
        let Some(arrivals) = arrivals else {
            return run.await;
        };
        tokio::pin!(run);
        loop {
            tokio::select! {
                outcome = &mut run => return outcome,
                arrival = arrivals.recv() => {
                    let mut arrival = arrival.expect("acceptors live as long as the manager");
                    // Another session number: the peer started over. This
                    // connection opens nothing (see `session_changes`).
                    if arrival.remote.flags & HELLO_FLAG_JOIN == 0 && arrival.remote.session != session {
                        return Err(PeerError::Superseded);
                    }
                    if arrival.remote.session != session
                        || arrival.remote.volume_uuid != volume_uuid
                    {
                        tracing::debug!(link = arrival.index, "a link of another session; dropped");
                        continue;
                    }
                    arrival.reader.trust(volume_uuid);
                    channel.attach(arrival.index, arrival.reader, arrival.writer);
                }
            }
        }
    }

    /// Brings link `index` of the session back whenever it is down.
    async fn keep_link(self: Arc<Self>, index: usize, channel: Arc<Channel>, session: u64) {
        let mut links_up = channel.links_up();
        let mut delay = RECONNECT_DELAY_MIN;
        loop {
            if links_up.borrow_and_update()[index] {
                if links_up.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if channel.is_closed() {
                return;
            }
            let joined = async {
                let stream = self.dial(index).await?;
                self.link_handshake(index, stream, session, true).await
            };
            match joined.await {
                Ok(arrival) if arrival.remote.flags & HELLO_FLAG_DRAINING != 0 => {
                    tracing::debug!(
                        link = index,
                        "the peer opens no session yet; link not joined"
                    );
                }
                Ok(mut arrival) if arrival.remote.volume_uuid == channel.volume_uuid() => {
                    arrival.reader.trust(channel.volume_uuid());
                    channel.attach(index, arrival.reader, arrival.writer);
                    delay = RECONNECT_DELAY_MIN;
                    continue;
                }
                Ok(_) => tracing::warn!(link = index, "the peer changed volumes; link not joined"),
                Err(e) => tracing::debug!(link = index, error = %e, "link not up yet"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_DELAY_MAX);
        }
    }

    /// Checks who the peer is and agrees on the volume UUID.
    fn check_hello(&self, local: &Hello, remote: &Hello) -> Result<[u8; 16], PeerError> {
        let differences = setting_differences(&local.shared, &remote.shared);
        if !differences.is_empty() {
            return Err(PeerError::Refused(format!(
                "peer {} is configured differently: {}. Both nodes need the same settings",
                remote.node_name,
                differences.join("; ")
            )));
        }
        if let Err(e) = blkmirror_metadata::layout::check_granularity(remote.granularity) {
            return Err(PeerError::Refused(format!(
                "peer {}: {e}",
                remote.node_name
            )));
        }
        if remote.data_size != local.data_size {
            return Err(PeerError::Refused(format!(
                "peer {} has {} bytes of data, this node {}: the disks must be the same size",
                remote.node_name, remote.data_size, local.data_size
            )));
        }
        if remote.volume_uuid == local.volume_uuid {
            return Ok(local.volume_uuid);
        }
        let local_new = local.generations.current == 0;
        let remote_new = remote.generations.current == 0;
        match (local_new, remote_new) {
            // A new disk joins the volume of the one with data.
            (true, false) => {
                self.volume.adopt_volume_uuid(remote.volume_uuid)?;
                Ok(remote.volume_uuid)
            }
            (false, true) => Ok(local.volume_uuid),
            // Both new: the smaller UUID names the volume on both sides.
            (true, true) if remote.volume_uuid < local.volume_uuid => {
                self.volume.adopt_volume_uuid(remote.volume_uuid)?;
                Ok(remote.volume_uuid)
            }
            (true, true) => Ok(local.volume_uuid),
            (false, false) => Err(PeerError::Refused(format!(
                "peer {} holds a different volume ({}) with data of its own: unrelated data, \
                 refusing to connect; nothing was touched",
                remote.node_name,
                uuid::Uuid::from_bytes(remote.volume_uuid)
            ))),
        }
    }

    fn decide(&self, local: &Hello, remote: &Hello) -> Result<SyncDecision, PeerError> {
        let side = |h: &Hello| blkmirror_metadata::sync_decision::SideState {
            generations: blkmirror_metadata::Generations {
                current: h.generations.current,
                bitmap: h.generations.bitmap,
                history: h.generations.history,
            },
            flags: Flags::from_bits_truncate(h.flags),
        };
        let diskless = |h: &Hello| h.flags & HELLO_FLAG_DISKLESS != 0;
        let primary = |h: &Hello| h.flags & Flags::PRIMARY.bits() != 0;
        let up_to_date = |h: &Hello| {
            let good = (Flags::CONSISTENT | Flags::UP_TO_DATE).bits();
            h.flags & good == good && !diskless(h)
        };
        // A diskless primary holds no data: it is served again by an
        // UpToDate secondary, with nothing to copy either way.
        let serves_diskless = |diskless_side: &Hello, other: &Hello| {
            diskless(diskless_side)
                && primary(diskless_side)
                && up_to_date(other)
                && !primary(other)
        };
        if serves_diskless(local, remote) || serves_diskless(remote, local) {
            return Ok(SyncDecision::InSync);
        }
        if diskless(local) {
            return Err(PeerError::NotYet(
                "this node's disk failed and is detached: replace it, run `create-md` on the new \
                 disk and restart the node; it then takes a full copy"
                    .into(),
            ));
        }
        if diskless(remote) {
            return Err(PeerError::NotYet(format!(
                "{}'s disk failed (Diskless): going on without it until its disk is replaced",
                self.peer_name
            )));
        }
        if primary(local) && primary(remote) {
            return Err(PeerError::Refused(
                "both nodes are primary: refusing to connect two primaries".into(),
            ));
        }
        let mut decision = decide(&side(local), &side(remote));
        // From the two Hellos only, so both nodes decide alike; a mark made
        // since this node's Hello is caught once the link is up.
        let dirty = |h: &Hello| h.dirty_bytes > 0;
        if decision == SyncDecision::InSync && (dirty(local) || dirty(remote)) {
            // Same generation but a crash left regions marked: they are copied
            // from the primary, or from the node named first if neither is.
            let local_is_source =
                primary(local) || (!primary(remote) && self.my_name < self.peer_name);
            decision = if local_is_source {
                SyncDecision::SourceDifferential
            } else {
                SyncDecision::TargetDifferential
            };
        }
        if decision == SyncDecision::SplitBrain {
            decision = self.resolve_split_brain(local, remote)?;
        }
        match decision {
            SyncDecision::Unrelated => Err(PeerError::Refused(format!(
                "node {} holds unrelated data (no common generation): refusing to connect; nothing was touched",
                self.peer_name
            ))),
            SyncDecision::NoConsistentSource => Err(PeerError::NotYet(format!(
                "neither this node nor {} holds Consistent data to copy from (a resync was cut \
                 off): nothing was touched. Promote the node whose data to keep with `blkmirror \
                 primary --force`; it becomes the source",
                self.peer_name
            ))),
            SyncDecision::BothNew => Err(PeerError::NotYet(
                "neither node has valid data yet: promote one with `blkmirror primary --force`".into(),
            )),
            SyncDecision::TargetDifferential | SyncDecision::TargetFull if primary(local) => {
                Err(PeerError::Refused(format!(
                    "this primary holds older data than {}: refusing to overwrite a primary; demote it first",
                    self.peer_name
                )))
            }
            other => Ok(other),
        }
    }

    /// A split brain goes on only when the operator or an opt-in policy
    /// names the side whose changes go; that side becomes the resync target.
    fn resolve_split_brain(
        &self,
        local: &Hello,
        remote: &Hello,
    ) -> Result<SyncDecision, PeerError> {
        let side = |h: &Hello| split_brain::Side {
            discard_my_data: h.flags & HELLO_FLAG_DISCARD_MY_DATA != 0,
            primary: h.flags & Flags::PRIMARY.bits() != 0,
            promoted_apart: h.flags & Flags::PROMOTED_APART.bits() != 0,
            dirty_bytes: h.dirty_bytes,
        };
        let victim = split_brain::victim(self.after_sb_0pri, &side(local), &side(remote)).map_err(
            |why| PeerError::Refused(format!("split brain with {}: {why}", self.peer_name)),
        )?;
        let Some(victim) = victim else {
            return Err(PeerError::Refused(format!(
                "split brain: this node and {peer} both changed the data since they parted. \
                 Nothing was touched. To keep {peer}'s data, run `blkmirror secondary` and then \
                 `blkmirror connect --discard-my-data` here; to keep this node's, do that on {peer}",
                peer = self.peer_name
            )));
        };
        let (loser, changes) = match victim {
            split_brain::Victim::Local => (&self.my_name, local.dirty_bytes),
            split_brain::Victim::Remote => (&self.peer_name, remote.dirty_bytes),
        };
        // Both bitmaps count from the generation they parted at only when
        // they name the same one; otherwise nothing bounds the difference.
        let (l, r) = (&local.generations, &remote.generations);
        let same_base = l.current == r.current || (l.bitmap != 0 && l.bitmap == r.bitmap);
        tracing::warn!(
            peer = self.peer_name,
            policy = ?self.after_sb_0pri,
            "split brain resolved: {loser} discards its {changes} bytes of changes and takes a {} copy",
            if same_base { "differential" } else { "full" }
        );
        Ok(match (victim, same_base) {
            (split_brain::Victim::Local, true) => SyncDecision::TargetDifferential,
            (split_brain::Victim::Local, false) => SyncDecision::TargetFull,
            (split_brain::Victim::Remote, true) => SyncDecision::SourceDifferential,
            (split_brain::Victim::Remote, false) => SyncDecision::SourceFull,
        })
    }

    async fn connected(
        &self,
        mut inbox: channel::Inbox,
        link: &Arc<Channel>,
        decision: SyncDecision,
        peer_granularity: u64,
    ) -> Result<(), PeerError> {
        let volume = &self.volume;
        match decision {
            SyncDecision::InSync => {
                volume.link_up(link.clone()).await;
                // (A diskless node's marks are ranges lost with its disk.)
                if volume.out_of_sync_bytes() > 0 && !volume.is_diskless() {
                    // A write raced the handshake (marked before the link was
                    // set): reconnect, and a differential resync copies it.
                    // Not in sync, so the generation that write opened stays
                    // open: another, opened by the next write made alone,
                    // would leave the peer's generation in the history only,
                    // and a full copy would follow.
                    return Err(PeerError::Wire(
                        "writes raced the handshake; reconnecting to resync them".into(),
                    ));
                }
                self.in_sync(link);
                self.serve(&mut inbox, link, Resyncing::No).await
            }
            SyncDecision::SourceDifferential | SyncDecision::SourceFull => {
                if decision == SyncDecision::SourceFull {
                    volume.mark_all_out_of_sync();
                }
                // The target first says what it changed on its side (which
                // it must get back from here), then its state.
                loop {
                    match inbox.next().await?.1 {
                        Message::ResyncRequest { offset, len, .. } => {
                            volume.mark_out_of_sync(offset, u64::from(len))
                        }
                        Message::Bitmap {
                            first_bit,
                            total_bits,
                            bits,
                        } => resync::mark_reported_bits(
                            volume,
                            peer_granularity,
                            first_bit,
                            total_bits,
                            &bits,
                        )
                        .map_err(PeerError::Wire)?,
                        // (Inconsistent now, as the target of this resync.)
                        Message::State {
                            role,
                            disk_state,
                            flags,
                        } => {
                            self.note_peer_state(role, disk_state, flags)?;
                            break;
                        }
                        other => {
                            return Err(PeerError::Wire(format!(
                                "unexpected {other:?} before resync"
                            )))
                        }
                    }
                }
                volume.link_up(link.clone()).await;
                self.peer.set(|s| {
                    s.replication = ReplicationState::SyncSource;
                    s.resync.total_bytes = volume.out_of_sync_bytes();
                    s.resync_started = Some(Instant::now());
                });
                let (done_tx, done_rx) = oneshot::channel();
                let _source = AbortOnDrop(tokio::spawn(resync::resync_source(
                    volume.clone(),
                    link.clone(),
                    self.peer.clone(),
                    decision == SyncDecision::SourceFull,
                    done_tx,
                )));
                let _reporting = AbortOnDrop(tokio::spawn(report_progress(
                    self.peer.clone(),
                    link.clone(),
                )));
                self.serve(&mut inbox, link, Resyncing::AsSource(done_rx))
                    .await
            }
            SyncDecision::TargetDifferential | SyncDecision::TargetFull => {
                volume.begin_sync_target().await?;
                if decision == SyncDecision::TargetDifferential {
                    let (mut ranges, mut pages) = (0u64, 0u64);
                    for index in 0..volume.bitmap_page_count() {
                        for message in resync::report_dirty_page(volume, index) {
                            match message {
                                Message::Bitmap { .. } => pages += 1,
                                _ => ranges += 1,
                            }
                            link.send(&message)
                                .await
                                .map_err(|_| PeerError::Wire("link closed".into()))?;
                        }
                    }
                    tracing::info!(
                        peer = self.peer_name,
                        ranges,
                        bitmap_pages = pages,
                        "told the sync source what this node changed"
                    );
                }
                link.send(&volume.state_message())
                    .await
                    .map_err(|_| PeerError::Wire("link closed".into()))?;
                self.peer
                    .set(|s| s.replication = ReplicationState::SyncTarget);
                self.serve(&mut inbox, link, Resyncing::AsTarget).await
            }
            _ => unreachable!("refusals returned by decide"),
        }
    }

    async fn established(&self, link: &Arc<Channel>) {
        self.volume.link_up(link.clone()).await;
        self.in_sync(link);
    }

    /// Records that both nodes hold the same data, the link up.
    fn in_sync(&self, link: &Channel) {
        if let Err(e) = self.volume.note_in_sync(link) {
            tracing::error!(error = %e, "cannot record being in sync");
        }
        self.peer.set(|s| {
            s.replication = ReplicationState::Established;
            s.resync_started = None;
        });
        tracing::info!(peer = self.peer_name, "replication established");
    }

    /// Waits until the writes a past session left to apply are on the
    /// disk. A disk that hangs holds them: a new session would only hang
    /// the peer's writes again (a resync's among them), so until then the
    /// peer goes on alone, as after a crash of this node.
    async fn drain(&self, load: &PeerLoad) {
        if load.is_drained() {
            return;
        }
        let message = "writes of the last session have not reached this node's disk (does it \
                       hang?): no new session until they have";
        tracing::warn!(peer = self.peer_name, "{message}");
        self.peer.set(|s| s.last_error = Some(message.into()));
        self.draining.store(true, Ordering::Relaxed);
        load.drained().await;
        self.draining.store(false, Ordering::Relaxed);
        tracing::info!("the last session's writes are on the disk; connecting again");
    }

    /// Handles incoming messages until the link fails.
    async fn serve(
        &self,
        inbox: &mut channel::Inbox,
        link: &Arc<Channel>,
        mut resyncing: Resyncing,
    ) -> Result<(), PeerError> {
        // Incoming writes are applied concurrently, in arrival order per range.
        let load = Arc::new(PeerLoad::new());
        *self.last_load.lock().unwrap() = Some(load.clone());
        let mut _verifying = None;
        let mut _parting = None;
        loop {
            let (seq, message) = tokio::select! {
                message = inbox.next() => message?,
                _ = self.peer.verify_wanted.notified() => {
                    if !self.peer.state.lock().unwrap().verify.running {
                        // Asked for in a session that ended before it began.
                        continue;
                    }
                    _verifying = Some(AbortOnDrop(tokio::spawn(verify(
                        self.volume.clone(),
                        link.clone(),
                        self.peer.clone(),
                    ))));
                    continue;
                }
                done = async {
                    match &mut resyncing {
                        Resyncing::AsSource(done) => done.await,
                        _ => unreachable!("only a source waits"),
                    }
                }, if matches!(resyncing, Resyncing::AsSource(_)) => {
                    resyncing = Resyncing::No;
                    match done {
                        Ok(Ok(())) => { self.established(link).await; continue; }
                        Ok(Err(e)) => return Err(PeerError::Wire(e)),
                        Err(_) => return Err(PeerError::Wire("resync stopped".into())),
                    }
                }
            };
            match message {
                Message::Write {
                    offset,
                    flags,
                    data,
                } => {
                    // Only a primary writes, and a sync source zeroes what
                    // its target lacks. (A node says it is primary, in its
                    // Hello or a State, before its first write.)
                    let peer_primary =
                        self.peer.state.lock().unwrap().peer_role == Some(Role::Primary);
                    if !peer_primary && !matches!(resyncing, Resyncing::AsTarget) {
                        return Err(PeerError::Wire(
                            "the peer sent a write but is not primary".into(),
                        ));
                    }
                    if flags & WRITE_FLAG_ACK_RECEIVED != 0 {
                        link.acknowledge(seq, AckKind::Received, 0).await;
                    }
                    self.apply(link, &load, seq, offset, data, flags).await?
                }
                Message::ResyncData { offset, data } => {
                    resyncing.expect_target("ResyncData")?;
                    self.apply(link, &load, seq, offset, data, 0).await?
                }
                Message::ResyncChecksum {
                    offset,
                    len,
                    digest,
                } => {
                    let answering = link.clone();
                    self.read_for_peer(link, &load, offset, len, move |read| async move {
                        let answer = match read {
                            Ok(data) if blkmirror_proto::chunk_digest(&data) == digest => 0,
                            Ok(_) => CHECKSUM_DIFFERS,
                            Err(errno) => errno,
                        };
                        answering.acknowledge(seq, AckKind::Written, answer).await;
                    })
                    .await?
                }
                Message::Ack { entries } => link.answer(&entries),
                Message::Barrier { .. } => {
                    // Every write before the barrier is on disk before the
                    // flush starts (with protocols A and B the primary does
                    // not wait for them before its flush).
                    let flush = share_unless_closed(link, load.flush()).await?;
                    let volume = self.volume.clone();
                    let link = link.clone();
                    tokio::spawn(async move {
                        let _flush = flush;
                        let errno = match volume.flush_local().await {
                            Ok(()) => 0,
                            // Without a disk, nothing the peer sent is held
                            // here to lose (it went with the disk, which a
                            // full copy replaces). A refusal would end the
                            // session, and a diskless primary serves only
                            // through it.
                            Err(crate::Error::DiskFailed) => 0,
                            Err(e) => e.errno() as u32,
                        };
                        link.acknowledge(seq, AckKind::Written, errno).await;
                    });
                }
                Message::State {
                    role,
                    disk_state,
                    flags,
                } => self.note_peer_state(role, disk_state, flags)?,
                Message::Read { offset, len } => {
                    let answering = link.clone();
                    self.read_for_peer(link, &load, offset, len, move |read| async move {
                        let (errno, data) = match read {
                            Ok(data) => (0, data.to_vec()),
                            Err(errno) => (errno, Vec::new()),
                        };
                        let _ = answering
                            .send(&Message::ReadReply { seq, errno, data })
                            .await;
                    })
                    .await?
                }
                Message::ReadReply { seq, errno, data } => link.answer_with_data(seq, errno, data),
                Message::Disconnect if _parting.is_none() => {
                    // The peer's operator disconnects: the writes it answered
                    // are made durable there first, so that the end of the
                    // session marks none of them for resync.
                    let (volume, link) = (self.volume.clone(), link.clone());
                    _parting = Some(AbortOnDrop(tokio::spawn(async move {
                        volume.settle_on(&link).await;
                        link.close("the peer disconnected");
                    })));
                }
                // Told once is enough.
                Message::Disconnect => {}
                Message::PromoteAsk => {
                    let answer = self.volume.answer_promotion_ask(&self.peer_name);
                    if answer != 0 {
                        tracing::warn!(
                            peer = self.peer_name,
                            "refused the peer's promotion: this node is primary, becoming it, \
                             or asking the same"
                        );
                    }
                    link.acknowledge(seq, AckKind::Written, answer).await;
                }
                Message::ResyncDone { current } => {
                    resyncing.expect_target("ResyncDone")?;
                    if current == 0 {
                        return Err(PeerError::Wire("ResyncDone names no generation".into()));
                    }
                    resyncing = Resyncing::No;
                    // With a share of the load, in a task of its own: a
                    // disk that hangs here holds the next session back (see
                    // `drain`), not this one past the end of its links.
                    let share = share_unless_closed(link, load.flush()).await?;
                    let volume = self.volume.clone();
                    let finishing = tokio::spawn(async move {
                        let _share = share;
                        volume.finish_sync_target(current).await
                    });
                    tokio::select! {
                        finished = finishing => finished.map_err(|e| {
                            PeerError::Io(std::io::Error::other(format!("finishing the resync: {e}")))
                        })??,
                        reason = link.wait_closed() => return Err(PeerError::LinksLost(reason)),
                    }
                    let _ = link.send(&self.volume.state_message()).await;
                    self.peer.set(|s| {
                        s.resync.done_bytes = s.resync.total_bytes;
                        s.resync.eta_s = 0;
                    });
                    self.established(link).await;
                }
                Message::ResyncProgress {
                    done_bytes,
                    total_bytes,
                    bytes_per_s,
                } => {
                    // Only shown. (One sent as the resync ended may follow
                    // its end: dropped.)
                    if matches!(resyncing, Resyncing::AsTarget) {
                        self.peer.set(|s| {
                            s.resync.done_bytes = done_bytes;
                            s.resync.total_bytes = total_bytes;
                            s.resync.bytes_per_s = bytes_per_s;
                            s.resync.eta_s = s.resync.eta();
                        });
                    }
                }
                other => return Err(PeerError::Wire(format!("unexpected message {other:?}"))),
            }
        }
    }

    /// The peer's news of its role and disk state (`State`).
    fn note_peer_state(&self, role: u8, disk_state: u8, flags: u32) -> Result<(), PeerError> {
        // Both promoted at once: neither saw the other primary.
        match self.volume.note_peer_role(role == 1) {
            Err(e @ crate::Error::TwoPrimaries) => {
                return Err(PeerError::Refused(format!("{e}; disconnecting")))
            }
            noted => noted?,
        }
        self.peer.set(|s| {
            s.peer_role = Some(if role == 1 {
                Role::Primary
            } else {
                Role::Secondary
            });
            s.peer_disk_state = Some(if disk_state == STATE_DISKLESS {
                "Diskless".to_string()
            } else {
                disk_state_name(flags)
            });
        });
        Ok(())
    }

    /// Reads a range for the peer (a diskless primary's read, a resync
    /// checksum) and hands the data, or an errno, to `answer`, in a task of
    /// its own: in arrival order with writes to the same range, within the
    /// peer's share of reads. A range larger than any request ever made is
    /// refused EINVAL rather than read whole.
    async fn read_for_peer<Answer, Answered>(
        &self,
        link: &Channel,
        load: &PeerLoad,
        offset: u64,
        len: u32,
        answer: Answer,
    ) -> Result<(), PeerError>
    where
        Answer: FnOnce(Result<AlignedBuf, u32>) -> Answered + Send + 'static,
        Answered: std::future::Future<Output = ()> + Send,
    {
        let share = share_unless_closed(link, load.read(len)).await?;
        let ticket = self.volume.gate().register(offset, u64::from(len));
        let volume = self.volume.clone();
        tokio::spawn(async move {
            let _share = share;
            let _guard = ticket.wait().await;
            let read = if len > READ_MAX_BYTES {
                Err(libc::EINVAL as u32)
            } else {
                volume
                    .read_local(offset, u64::from(len))
                    .await
                    .map_err(|e| e.errno() as u32)
            };
            answer(read).await;
        });
        Ok(())
    }

    /// Applies a write from the peer: its place among overlapping writes is
    /// taken now, in arrival order; the disk write runs concurrently.
    async fn apply(
        &self,
        link: &Arc<Channel>,
        load: &PeerLoad,
        seq: u64,
        offset: u64,
        data: Vec<u8>,
        flags: u32,
    ) -> Result<(), PeerError> {
        if self.volume.says_primary() {
            return Err(PeerError::Refused(
                "the peer sent writes to a primary: two primaries; disconnecting".into(),
            ));
        }
        let share = share_unless_closed(link, load.apply(data.len())).await?;
        let len = if flags & WRITE_FLAG_ZERO != 0 {
            data.get(..8).map_or(0, |b| {
                u64::from_le_bytes(b.try_into().expect("eight bytes"))
            })
        } else {
            data.len() as u64
        };
        let ticket = self.volume.gate().register(offset, len);
        let (volume, link) = (self.volume.clone(), link.clone());
        tokio::spawn(async move {
            let _share = share;
            let _guard = ticket.wait().await;
            let errno = match volume.write_replicated(offset, data, flags).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = %e, offset, "applying a replicated write failed");
                    e.errno() as u32
                }
            };
            link.acknowledge(seq, AckKind::Written, errno).await;
        });
        Ok(())
    }
}

/// The part of a resync a session has yet to finish.
enum Resyncing {
    No,
    /// This node is the source: its resync task says when it is done.
    AsSource(oneshot::Receiver<Result<(), String>>),
    /// This node is the target: the source's `ResyncDone` ends it.
    AsTarget,
}

impl Resyncing {
    /// Resync frames are for a target only: from a peer that is not this
    /// node's source, they would overwrite data unmarked.
    fn expect_target(&self, what: &str) -> Result<(), PeerError> {
        match self {
            Resyncing::AsTarget => Ok(()),
            _ => Err(PeerError::Wire(format!(
                "the peer sent {what}, but this node is not its sync target"
            ))),
        }
    }
}

/// What the peer's requests may hold on this node at once. Beyond it the
/// serve loop waits, and so, once its window fills, does the peer.
struct PeerLoad {
    /// Writes being applied; a barrier takes every permit, to wait for the
    /// writes before it.
    applying: Arc<Semaphore>,
    applying_bytes: Arc<Semaphore>,
    reading_bytes: Arc<Semaphore>,
    flushing: Arc<Semaphore>,
}

/// A request's share of `PeerLoad`, given back when dropped.
type Share = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

impl PeerLoad {
    fn new() -> PeerLoad {
        let semaphore = |permits: u32| Arc::new(Semaphore::new(permits as usize));
        PeerLoad {
            applying: semaphore(APPLYING_MAX),
            applying_bytes: semaphore(APPLYING_BYTES_MAX),
            reading_bytes: semaphore(READING_BYTES_MAX),
            flushing: semaphore(FLUSHING_MAX),
        }
    }

    /// For a write of `bytes` of data.
    async fn apply(&self, bytes: usize) -> Share {
        let count = take(&self.applying, 1).await;
        (count, Some(take(&self.applying_bytes, bytes as u32).await))
    }

    /// For a read of `len` bytes (one too large to serve is refused, and
    /// takes no more than the largest one served).
    async fn read(&self, len: u32) -> Share {
        let charge = len.clamp(READ_CHARGE_MIN_BYTES, READ_MAX_BYTES);
        (take(&self.reading_bytes, charge).await, None)
    }

    /// For a barrier's flush, once every write before it is applied.
    async fn flush(&self) -> Share {
        drop(take(&self.applying, APPLYING_MAX).await);
        (take(&self.flushing, 1).await, None)
    }

    /// No write or flush is under way.
    fn is_drained(&self) -> bool {
        self.applying.available_permits() == APPLYING_MAX as usize
            && self.flushing.available_permits() == FLUSHING_MAX as usize
    }

    /// Returns once no write or flush is under way.
    async fn drained(&self) {
        drop(take(&self.applying, APPLYING_MAX).await);
        drop(take(&self.flushing, FLUSHING_MAX).await);
    }
}

/// A share of the peer's load, or the end of the session if that comes
/// first: writes on a disk that hangs keep their shares, and the session
/// must still end when its links do.
async fn share_unless_closed(
    link: &Channel,
    share: impl std::future::Future<Output = Share>,
) -> Result<Share, PeerError> {
    tokio::select! {
        share = share => Ok(share),
        reason = link.wait_closed() => Err(PeerError::LinksLost(reason)),
    }
}

async fn take(semaphore: &Arc<Semaphore>, permits: u32) -> OwnedSemaphorePermit {
    semaphore
        .clone()
        .acquire_many_owned(permits)
        .await
        .expect("never closed")
}

/// The HMAC-SHA256 challenge-response: each side proves it holds the
/// secret without sending it.
async fn authenticate(
    reader: &mut FrameReader,
    writer: &mut BufWriter<OwnedWriteHalf>,
    secret: &[u8],
    my_name: &str,
    remote: &Hello,
    uuid: [u8; 16],
) -> Result<(), PeerError> {
    let nonce: [u8; NONCE_BYTES] = rand_nonce();
    write_frame(writer, &Message::AuthChallenge { nonce }, uuid).await?;
    let Message::AuthChallenge { nonce: theirs } = reader.next().await? else {
        return Err(PeerError::Refused(format!(
            "peer {} did not authenticate (is `secret` set on both nodes?)",
            remote.node_name
        )));
    };
    let mac = auth::respond(secret, &theirs, my_name);
    write_frame(writer, &Message::AuthResponse { mac }, uuid).await?;
    let Message::AuthResponse { mac } = reader.next().await? else {
        return Err(PeerError::Wire("expected AuthResponse".into()));
    };
    if !auth::verify(secret, &nonce, &remote.node_name, &mac) {
        return Err(PeerError::Refused(format!(
            "peer {} failed authentication: wrong secret; connection refused",
            remote.node_name
        )));
    }
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closes a session's channel however the session ends (even when it is
/// dropped by `disconnect`): its waiters hear `Lost`, its links close.
struct CloseOnDrop(Arc<Channel>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close("session ended");
    }
}

/// Tells the sync target how far the resync has got, at once and then
/// every `PROGRESS_REPORT_INTERVAL`, while this node is its source.
async fn report_progress(peer: Arc<Peer>, link: Arc<Channel>) {
    loop {
        let resync = {
            let s = peer.state.lock().unwrap();
            if s.replication != ReplicationState::SyncSource {
                return;
            }
            s.resync.clone()
        };
        let report = Message::ResyncProgress {
            done_bytes: resync.done_bytes,
            total_bytes: resync.total_bytes,
            bytes_per_s: resync.bytes_per_s,
        };
        if link.send(&report).await.is_err() {
            return;
        }
        tokio::time::sleep(PROGRESS_REPORT_INTERVAL).await;
    }
}

/// Runs a verify and reports it; differing ranges are resynced at once,
/// through a fresh handshake that sees them marked.
async fn verify(volume: Arc<Volume>, link: Arc<Channel>, peer: Arc<Peer>) {
    peer.set(|s| s.verify.total_bytes = volume.data_size());
    tracing::info!("verify started");
    let result = resync::verify(volume, link, peer.clone()).await;
    peer.set(|s| {
        s.verify.running = false;
        s.verify.finished = true;
        s.verify.error = result.as_ref().err().cloned();
    });
    match result {
        Ok(0) => tracing::info!("verify complete: the replicas are identical"),
        Ok(differing_bytes) => {
            tracing::warn!(
                differing_bytes,
                "verify complete: ranges differ; they are marked out of sync and resync now"
            );
            peer.reconnect();
        }
        Err(e) => tracing::warn!(error = e, "verify stopped"),
    }
}

/// A fresh random challenge (generation identifiers come from the same
/// random source).
fn rand_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    for chunk in nonce.chunks_mut(8) {
        chunk.copy_from_slice(&blkmirror_metadata::fresh_generation().to_le_bytes());
    }
    nonce
}

async fn write_frame(
    writer: &mut BufWriter<OwnedWriteHalf>,
    message: &Message,
    uuid: [u8; 16],
) -> Result<(), PeerError> {
    writer
        .write_all(&blkmirror_proto::encode_frame(message, uuid, 0))
        .await?;
    writer.flush().await?;
    Ok(())
}

pub(crate) struct FrameReader {
    inner: BufReader<OwnedReadHalf>,
    timeout: Duration,
    /// Once agreed, every frame must carry it.
    volume_uuid: Option<[u8; 16]>,
    /// Largest payload accepted: small until the peer has proved who it is.
    payload_max_bytes: u32,
}

/// Largest payload before authentication (a Hello or a proof is far smaller).
const HANDSHAKE_PAYLOAD_MAX_BYTES: u32 = 4096;

impl FrameReader {
    fn new(inner: BufReader<OwnedReadHalf>, timeout: Duration) -> FrameReader {
        FrameReader {
            inner,
            timeout,
            volume_uuid: None,
            payload_max_bytes: HANDSHAKE_PAYLOAD_MAX_BYTES,
        }
    }

    /// The handshake is done: frames must name `volume_uuid` and may carry
    /// data.
    fn trust(&mut self, volume_uuid: [u8; 16]) {
        self.volume_uuid = Some(volume_uuid);
        self.payload_max_bytes = blkmirror_proto::PAYLOAD_MAX_BYTES;
    }

    async fn next(&mut self) -> Result<Message, PeerError> {
        Ok(self.next_frame().await?.message)
    }

    /// The next frame.
    async fn next_frame(&mut self) -> Result<ReceivedFrame, PeerError> {
        tokio::time::timeout(self.timeout, self.read())
            .await
            .map_err(|_| PeerError::Timeout(self.timeout))?
    }

    async fn read(&mut self) -> Result<ReceivedFrame, PeerError> {
        let mut header_bytes = [0u8; HEADER_BYTES];
        self.inner.read_exact(&mut header_bytes).await?;
        let header = FrameHeader::decode(&header_bytes).map_err(|e| match e {
            // A node of another release: the operator is to hear of it.
            blkmirror_proto::FrameError::UnsupportedVersion(_) => PeerError::Refused(e.to_string()),
            e => PeerError::Wire(e.to_string()),
        })?;
        if let Some(uuid) = self.volume_uuid {
            if header.volume_uuid != uuid {
                return Err(PeerError::Wire("frame for another volume".into()));
            }
        }
        Message::check_payload_len(header.kind, header.payload_len)
            .map_err(|e| PeerError::Wire(e.to_string()))?;
        if header.payload_len > self.payload_max_bytes {
            return Err(PeerError::Wire(format!(
                "a {}-byte payload where at most {} are allowed now",
                header.payload_len, self.payload_max_bytes
            )));
        }
        // The data a frame carries (a write's, a resync chunk's, a read's)
        // goes straight into the buffer the message keeps: no zeroing, and
        // no second copy out of the payload.
        let len = header.payload_len as usize;
        let head_len = Message::data_offset(header.kind)
            .filter(|&offset| offset <= len)
            .unwrap_or(len);
        let mut head = vec![0u8; head_len];
        self.inner.read_exact(&mut head).await?;
        let mut tail = Vec::with_capacity(len - head_len);
        while tail.len() < len - head_len {
            let want = len - head_len - tail.len();
            if self.inner.read_buf(&mut (&mut tail).limit(want)).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
        header
            .check_payload_split(&head, &tail)
            .map_err(|e| PeerError::Wire(e.to_string()))?;
        let message = Message::decode_split(header.kind, &head, tail)
            .map_err(|e| PeerError::Wire(e.to_string()))?;
        Ok(ReceivedFrame {
            seq: header.sequence,
            message,
            wire_bytes: HEADER_BYTES + len,
        })
    }
}

/// A frame as read from a link.
pub(crate) struct ReceivedFrame {
    pub seq: u64,
    pub message: Message,
    /// Its size on the wire, header included.
    pub wire_bytes: usize,
}

/// Generation identifiers as they travel in a Hello.
/// The settings of `config` that both nodes must share: each decides a
/// split brain by its own `after-sb-0pri`, so two could pick different
/// sources; and `protocol` says what an acknowledged write survives,
/// whichever node is primary.
fn shared_settings(config: &Config) -> SharedSettings {
    SharedSettings {
        protocol: protocol_code(config.protocol),
        after_sb_0pri: policy_code(config.after_sb_0pri),
    }
}

fn protocol_code(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::A => b'A',
        Protocol::B => b'B',
        Protocol::C => b'C',
    }
}

fn policy_code(policy: AfterSplitBrain) -> u8 {
    match policy {
        AfterSplitBrain::Disconnect => 0,
        AfterSplitBrain::DiscardZeroChanges => 1,
        AfterSplitBrain::DiscardYoungerPrimary => 2,
        AfterSplitBrain::DiscardLeastChanges => 3,
    }
}

/// How the peer's shared settings differ from this node's, in words.
fn setting_differences(local: &SharedSettings, remote: &SharedSettings) -> Vec<String> {
    let mut differences = Vec::new();
    if local.protocol != remote.protocol {
        differences.push(format!(
            "protocol {:?} there, {:?} here",
            char::from(remote.protocol),
            char::from(local.protocol)
        ));
    }
    if local.after_sb_0pri != remote.after_sb_0pri {
        let name = |code: u8| {
            AfterSplitBrain::ALL
                .into_iter()
                .find(|&policy| policy_code(policy) == code)
                .map_or_else(|| format!("unknown policy {code}"), |p| p.name().into())
        };
        differences.push(format!(
            "after-sb-0pri {:?} there, {:?} here",
            name(remote.after_sb_0pri),
            name(local.after_sb_0pri)
        ));
    }
    differences
}

pub fn wire_generations(g: &blkmirror_metadata::Generations) -> WireGenerations {
    WireGenerations {
        current: g.current,
        bitmap: g.bitmap,
        history: g.history,
    }
}

/// The flag bits a Hello carries for `flags`, plus the dirty marker.
pub fn fua_flag(fua: bool) -> u32 {
    if fua {
        WRITE_FLAG_FUA
    } else {
        0
    }
}

/// The disk state named by a peer's superblock flags.
fn disk_state_name(flags: u32) -> String {
    format!(
        "{:?}",
        crate::volume::DiskState::from_flags(Flags::from_bits_truncate(flags))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A frame whose kind carries no data but whose header declares 1 MiB
    /// is refused from its header: nothing is allocated or waited for.
    #[tokio::test]
    async fn a_payload_larger_than_its_kind_allows_is_refused_from_the_header() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (receiver, _) = listener.accept().await.unwrap();
        let uuid = [7; 16];
        let mut reader = FrameReader::new(
            BufReader::new(receiver.into_split().0),
            Duration::from_secs(2),
        );
        reader.trust(uuid);
        let header = FrameHeader::for_payload(
            blkmirror_proto::message::kind::PING,
            0,
            uuid,
            1,
            &vec![0; 1 << 20],
        );
        sender.write_all(&header.encode()).await.unwrap();
        match reader.next_frame().await {
            Err(PeerError::Wire(reason)) => assert!(reason.contains("at most"), "{reason}"),
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a frame without its payload was accepted"),
        }
    }

    #[tokio::test]
    async fn the_peers_requests_hold_bounded_memory() {
        let load = PeerLoad::new();
        // Two 32 MiB writes fit; a third waits for one.
        let payload = APPLYING_BYTES_MAX as usize / 2;
        let first = load.apply(payload).await;
        let second = load.apply(payload).await;
        let third = load.apply(payload);
        tokio::pin!(third);
        assert!(third.as_mut().now_or_never().is_none());
        drop(first);
        assert!(third.now_or_never().is_some());

        // Empty reads cost a page each, so their number is bounded too.
        let count = READING_BYTES_MAX / READ_CHARGE_MIN_BYTES;
        let mut reads = Vec::new();
        for _ in 0..count {
            reads.push(load.read(0).await);
        }
        assert!(load.read(0).now_or_never().is_none());
        // A read too large to serve costs no more than the largest served.
        reads.truncate(reads.len() - (READ_MAX_BYTES / READ_CHARGE_MIN_BYTES) as usize);
        assert!(load.read(u32::MAX).now_or_never().is_some());

        // A barrier waits for the writes before it, and few flush at once.
        drop(second);
        let mut flushes = Vec::new();
        for _ in 0..FLUSHING_MAX {
            flushes.push(load.flush().now_or_never().expect("room"));
        }
        assert!(load.flush().now_or_never().is_none());
        flushes.clear();
        let write = load.apply(4096).await;
        assert!(load.flush().now_or_never().is_none());
        drop(write);
        assert!(load.flush().now_or_never().is_some());
    }
}
