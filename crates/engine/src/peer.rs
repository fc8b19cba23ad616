//! The connection to the peer node: connecting and reconnecting, the
//! handshake (identity, volume, sizes, generations, optional HMAC
//! authentication), the sync decision, resync in either direction, and the
//! replication of application writes once connected.
//!
//! One link for now: link 0 of the config. The node whose name sorts first
//! connects; the other listens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkmirror_config::Config;
use blkmirror_metadata::superblock::Flags;
use blkmirror_metadata::sync_decision::{decide, SyncDecision};
use blkmirror_proto::message::{
    Generations as WireGenerations, NONCE_BYTES, WRITE_FLAG_FUA, WRITE_FLAG_ZERO,
};
use blkmirror_proto::{auth, AckKind, FrameHeader, Hello, Message, HEADER_BYTES};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::volume::{Role, Volume};

/// Largest chunk a resync moves in one message.
pub const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
/// Resync chunks in flight at once.
pub const RESYNC_WINDOW: usize = 8;
/// Frames queued for the socket before senders wait.
const OUTGOING_QUEUE_MAX: usize = 256;
const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);
/// After a refusal that needs an operator (split brain, unrelated data),
/// the node tries again only this rarely, and says so each time.
const REFUSED_RETRY_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    StandAlone,
    Connecting,
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
    pub address: String,
    pub state: ConnectionState,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub connection: ConnectionState,
    pub replication: ReplicationState,
    pub peer_node: String,
    pub peer_role: Option<Role>,
    pub peer_disk_state: Option<String>,
    pub links: Vec<LinkStatus>,
    pub resync: ResyncStatus,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("Link I/O failed")]
    Io(#[from] std::io::Error),
    #[error("Peer sent a bad frame: {0}")]
    Wire(String),
    #[error("Peer was silent for {0:?}")]
    Timeout(Duration),
    /// Needs an operator: retried only rarely.
    #[error("{0}")]
    Refused(String),
    /// Waits for something that happens on its own (a promotion).
    #[error("{0}")]
    NotYet(String),
    #[error(transparent)]
    Local(#[from] crate::Error),
}

/// The sending side of an established link: application writes and resync
/// data go out through it, and acknowledgements come back to their waiters.
pub struct LinkTx {
    out: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<u32>>>,
    next_seq: AtomicU64,
    volume_uuid: [u8; 16],
}

/// The peer did not confirm: the link went away first.
#[derive(Debug)]
pub struct Lost;

impl LinkTx {
    /// Sends the message built for a fresh sequence number and waits for the
    /// peer's answer to it (its errno, 0 for success).
    pub async fn request(&self, build: impl FnOnce(u64) -> Message) -> Result<u32, Lost> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.enqueue_seq(seq, build(seq))
            .await?
            .await
            .map_err(|_| Lost)
    }

    /// Queues a message that the peer answers by the frame's sequence number;
    /// returns the receiver of that answer. Once this returns, the message is
    /// ordered before anything queued later.
    pub async fn enqueue(
        &self,
        build: impl FnOnce(u64) -> Message,
    ) -> Result<oneshot::Receiver<u32>, Lost> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.enqueue_seq(seq, build(seq)).await
    }

    async fn enqueue_seq(
        &self,
        seq: u64,
        message: Message,
    ) -> Result<oneshot::Receiver<u32>, Lost> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(seq, tx);
        let frame = blkmirror_proto::encode_frame(&message, self.volume_uuid, seq);
        if self.out.send(frame).await.is_err() {
            self.pending.lock().unwrap().remove(&seq);
            return Err(Lost);
        }
        Ok(rx)
    }

    pub async fn send(&self, message: &Message) -> Result<(), Lost> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let frame = blkmirror_proto::encode_frame(message, self.volume_uuid, seq);
        self.out.send(frame).await.map_err(|_| Lost)
    }

    /// Sends if the queue has room, else drops the message.
    fn try_send(&self, message: &Message) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let _ = self.out.try_send(blkmirror_proto::encode_frame(
            message,
            self.volume_uuid,
            seq,
        ));
    }

    fn answer(&self, seq: u64, errno: u32) {
        if let Some(waiter) = self.pending.lock().unwrap().remove(&seq) {
            let _ = waiter.send(errno);
        }
    }

    /// Fails every waiter: the link is gone.
    fn fail_all(&self) {
        self.pending.lock().unwrap().clear();
    }
}

/// What the node knows of its peer, shared with `status`.
pub struct Peer {
    peer_node: String,
    link_address: SocketAddr,
    state: Mutex<Shared>,
    /// Whether the operator wants the link up (`connect` / `disconnect`).
    wanted: watch::Sender<bool>,
    /// Ends the current session so the next handshake decides afresh.
    kick: tokio::sync::Notify,
}

struct Shared {
    connection: ConnectionState,
    replication: ReplicationState,
    peer_role: Option<Role>,
    peer_disk_state: Option<String>,
    last_error: Option<String>,
    resync: ResyncStatus,
    resync_started: Option<Instant>,
}

impl Peer {
    /// `connect`: (re)establish the link from now on.
    pub fn connect(&self) {
        self.wanted.send_replace(true);
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

    pub fn status(&self) -> PeerStatus {
        let s = self.state.lock().unwrap();
        PeerStatus {
            connection: s.connection,
            replication: s.replication,
            peer_node: self.peer_node.clone(),
            peer_role: s.peer_role,
            peer_disk_state: s.peer_disk_state.clone(),
            links: vec![LinkStatus {
                address: self.link_address.to_string(),
                state: s.connection,
            }],
            resync: s.resync.clone(),
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
                let left = s.resync.total_bytes.saturating_sub(s.resync.done_bytes);
                s.resync.eta_s = left.checked_div(s.resync.bytes_per_s.max(1)).unwrap_or(0);
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
        link_address: peer_config.links[0],
        state: Mutex::new(Shared {
            connection: ConnectionState::Connecting,
            replication: ReplicationState::Off,
            peer_role: None,
            peer_disk_state: None,
            last_error: None,
            resync: ResyncStatus::default(),
            resync_started: None,
        }),
        wanted: watch::channel(true).0,
        kick: tokio::sync::Notify::new(),
    });
    let manager = Manager {
        peer: peer.clone(),
        volume,
        my_name: me.name.clone(),
        peer_name: peer_config.name.clone(),
        connects: me.name < peer_config.name,
        my_address: me.links[0],
        peer_address: peer_config.links[0],
        secret: config.secret.clone(),
        timeout: config.timeout,
    };
    tokio::spawn(manager.run(stop));
    peer
}

struct Manager {
    peer: Arc<Peer>,
    volume: Arc<Volume>,
    my_name: String,
    peer_name: String,
    connects: bool,
    my_address: SocketAddr,
    peer_address: SocketAddr,
    secret: Option<String>,
    timeout: Duration,
}

impl Manager {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let listener = if self.connects {
            None
        } else {
            match TcpListener::bind(self.my_address).await {
                Ok(l) => Some(l),
                Err(e) => {
                    let message = format!("cannot listen on link {}: {e}", self.my_address);
                    tracing::error!("{message}");
                    self.peer.set(|s| {
                        s.connection = ConnectionState::StandAlone;
                        s.last_error = Some(message);
                    });
                    return;
                }
            }
        };
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
            let attempt = async {
                let stream = match &listener {
                    Some(l) => l.accept().await?.0,
                    None => TcpStream::connect(self.peer_address).await?,
                };
                stream.set_nodelay(true)?;
                self.session(stream).await
            };
            let outcome = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = wanted.wait_for(|w| !*w) => Ok(()),
                _ = self.peer.kick.notified() => Ok(()),
                outcome = attempt => outcome,
            };
            self.volume.set_link(None);
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
                Err(e) => {
                    tracing::warn!(peer = self.peer_name, error = %e, "link to the peer lost");
                    delay
                }
                Ok(()) => delay,
            };
            self.peer.set(|s| {
                s.connection = ConnectionState::Connecting;
                s.replication = ReplicationState::Off;
                s.peer_role = None;
                s.peer_disk_state = None;
                if let Err(e) = &outcome {
                    s.last_error = Some(e.to_string());
                }
            });
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = wanted.changed() => {}
                _ = tokio::time::sleep(retry_after) => {}
            }
            delay = (delay * 2).min(RECONNECT_DELAY_MAX);
        }
    }

    /// One connection, from handshake to loss.
    async fn session(&self, stream: TcpStream) -> Result<(), PeerError> {
        let (read_half, write_half) = stream.into_split();
        let mut reader = FrameReader {
            inner: BufReader::with_capacity(256 * 1024, read_half),
            timeout: self.timeout,
            volume_uuid: None,
        };
        let mut writer = BufWriter::with_capacity(256 * 1024, write_half);

        // Identity and volume.
        let local = self.volume.hello(0);
        write_frame(
            &mut writer,
            &Message::Hello(local.clone()),
            local.volume_uuid,
        )
        .await?;
        let Message::Hello(remote) = reader.next().await? else {
            return Err(PeerError::Wire("expected Hello".into()));
        };
        if let Some(secret) = &self.secret {
            self.authenticate(
                &mut reader,
                &mut writer,
                secret.as_bytes(),
                &remote,
                local.volume_uuid,
            )
            .await?;
        }
        let volume_uuid = self.check_hello(&local, &remote)?;
        reader.volume_uuid = Some(volume_uuid);
        let decision = self.decide(&local, &remote)?;
        tracing::info!(peer = self.peer_name, ?decision, "connected");

        // From here on frames go through the writer task.
        let (out, out_rx) = mpsc::channel(OUTGOING_QUEUE_MAX);
        let link = Arc::new(LinkTx {
            out,
            pending: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            volume_uuid,
        });
        // Tied to this session: gone with it, however it ends (even when the
        // session itself is dropped by `disconnect`).
        let _writer_task = AbortOnDrop(tokio::spawn(write_frames(writer, out_rx)));
        let _pinger = AbortOnDrop(tokio::spawn(ping(link.clone(), self.timeout / 3)));
        self.peer.set(|s| {
            s.connection = ConnectionState::Connected;
            s.peer_role = Some(if remote.flags & Flags::PRIMARY.bits() != 0 {
                Role::Primary
            } else {
                Role::Secondary
            });
            s.peer_disk_state = Some(format!(
                "{:?}",
                crate::volume::DiskState::from_flags(Flags::from_bits_truncate(remote.flags))
            ));
            s.last_error = None;
            s.resync = ResyncStatus::default();
        });
        let _fail_waiters = FailOnDrop(link.clone());
        self.connected(&mut reader, &link, decision).await
    }

    async fn authenticate(
        &self,
        reader: &mut FrameReader,
        writer: &mut BufWriter<OwnedWriteHalf>,
        secret: &[u8],
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
        let mac = auth::respond(secret, &theirs, &self.my_name);
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

    /// Checks who the peer is and agrees on the volume UUID.
    fn check_hello(&self, local: &Hello, remote: &Hello) -> Result<[u8; 16], PeerError> {
        if remote.node_name != self.peer_name {
            return Err(PeerError::Refused(format!(
                "peer at {} says it is node {:?}, expected {:?}",
                self.peer_address, remote.node_name, self.peer_name
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
        let primary = |h: &Hello| h.flags & Flags::PRIMARY.bits() != 0;
        if primary(local) && primary(remote) {
            return Err(PeerError::Refused(
                "both nodes are primary: refusing to connect two primaries".into(),
            ));
        }
        let mut decision = decide(&side(local), &side(remote));
        if decision == SyncDecision::InSync
            && (self.volume.out_of_sync_bytes() > 0 || remote.flags & HELLO_FLAG_DIRTY != 0)
        {
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
        match decision {
            SyncDecision::SplitBrain => Err(PeerError::Refused(format!(
                "split brain: this node and {} both changed the data since they parted. \
                 Nothing was touched; decide which data to keep",
                self.peer_name
            ))),
            SyncDecision::Unrelated => Err(PeerError::Refused(format!(
                "node {} holds unrelated data (no common generation): refusing to connect; nothing was touched",
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

    async fn connected(
        &self,
        reader: &mut FrameReader,
        link: &Arc<LinkTx>,
        decision: SyncDecision,
    ) -> Result<(), PeerError> {
        let volume = &self.volume;
        match decision {
            SyncDecision::InSync => {
                self.established(link);
                if volume.out_of_sync_bytes() > 0 {
                    // A write raced the handshake (marked before the link was
                    // set): reconnect, and a differential resync copies it.
                    return Err(PeerError::Wire(
                        "writes raced the handshake; reconnecting to resync them".into(),
                    ));
                }
                self.serve(reader, link, None).await
            }
            SyncDecision::SourceDifferential | SyncDecision::SourceFull => {
                if decision == SyncDecision::SourceFull {
                    volume.mark_all_out_of_sync();
                }
                // The target first says what it lacks on its side, then its state.
                loop {
                    match reader.next().await? {
                        Message::ResyncRequest { offset, len, .. } => {
                            volume.mark_out_of_sync(offset, u64::from(len))
                        }
                        Message::State { .. } => break,
                        other => {
                            return Err(PeerError::Wire(format!(
                                "unexpected {other:?} before resync"
                            )))
                        }
                    }
                }
                volume.set_link(Some(link.clone()));
                self.peer.set(|s| {
                    s.replication = ReplicationState::SyncSource;
                    s.resync.total_bytes = volume.out_of_sync_bytes();
                    s.resync_started = Some(Instant::now());
                });
                let (done_tx, done_rx) = oneshot::channel();
                let _source = AbortOnDrop(tokio::spawn(resync_source(
                    volume.clone(),
                    link.clone(),
                    self.peer.clone(),
                    decision == SyncDecision::SourceFull,
                    done_tx,
                )));
                self.serve(reader, link, Some(done_rx)).await
            }
            SyncDecision::TargetDifferential | SyncDecision::TargetFull => {
                volume.begin_sync_target().await?;
                if decision == SyncDecision::TargetDifferential {
                    for (offset, len) in volume.dirty_runs() {
                        for (chunk_offset, chunk_len) in chunks(offset, len) {
                            link.send(&Message::ResyncRequest {
                                offset: chunk_offset,
                                len: chunk_len as u32,
                                checksum_only: false,
                            })
                            .await
                            .map_err(|_| PeerError::Wire("link closed".into()))?;
                        }
                    }
                }
                link.send(&Message::State {
                    role: 0,
                    disk_state: 0,
                    flags: 0,
                })
                .await
                .map_err(|_| PeerError::Wire("link closed".into()))?;
                self.peer
                    .set(|s| s.replication = ReplicationState::SyncTarget);
                self.serve(reader, link, None).await
            }
            _ => unreachable!("refusals returned by decide"),
        }
    }

    fn established(&self, link: &Arc<LinkTx>) {
        self.volume.set_link(Some(link.clone()));
        self.peer.set(|s| {
            s.replication = ReplicationState::Established;
            s.resync_started = None;
        });
        tracing::info!(peer = self.peer_name, "replication established");
    }

    /// Handles incoming messages until the link fails.
    async fn serve(
        &self,
        reader: &mut FrameReader,
        link: &Arc<LinkTx>,
        mut resync_done: Option<oneshot::Receiver<Result<(), String>>>,
    ) -> Result<(), PeerError> {
        // Incoming writes are applied concurrently, in arrival order per range.
        let applying = Arc::new(Semaphore::new(APPLYING_MAX));
        loop {
            let (seq, message) = tokio::select! {
                message = reader.next_with_seq() => message?,
                done = async { resync_done.as_mut().unwrap().await }, if resync_done.is_some() => {
                    resync_done = None;
                    match done {
                        Ok(Ok(())) => { self.established(link); continue; }
                        Ok(Err(e)) => return Err(PeerError::Wire(e)),
                        Err(_) => return Err(PeerError::Wire("resync stopped".into())),
                    }
                }
            };
            match message {
                Message::Write {
                    seq,
                    offset,
                    flags,
                    data,
                } => {
                    self.apply(link, &applying, seq, offset, data, flags)
                        .await?
                }
                Message::ResyncData { offset, data } => {
                    self.apply(link, &applying, seq, offset, data, 0).await?
                }
                Message::ResyncChecksum { offset, len, crc } => {
                    // Compared in arrival order with writes to the same range.
                    let ticket = self.volume.gate().register(offset, u64::from(len));
                    let (volume, link) = (self.volume.clone(), link.clone());
                    tokio::spawn(async move {
                        let _guard = ticket.wait().await;
                        let answer = match volume.read_local(offset, u64::from(len)).await {
                            Ok(data) if crc32c::crc32c(&data) == crc => 0,
                            Ok(_) => CHECKSUM_DIFFERS,
                            Err(e) => e.errno() as u32,
                        };
                        let _ = link
                            .send(&Message::Ack {
                                seq,
                                kind: AckKind::Written,
                                errno: answer,
                            })
                            .await;
                    });
                }
                Message::Ack { seq, errno, .. } => link.answer(seq, errno),
                Message::BarrierAck { epoch } => link.answer(epoch, 0),
                Message::Barrier { epoch } => {
                    let volume = self.volume.clone();
                    let link = link.clone();
                    tokio::spawn(async move {
                        let errno = match volume.flush_local().await {
                            Ok(()) => 0,
                            Err(e) => e.errno() as u32,
                        };
                        let _ = link
                            .send(&Message::Ack {
                                seq: epoch,
                                kind: AckKind::Written,
                                errno,
                            })
                            .await;
                    });
                }
                // Never block the reader on the outgoing queue: if it is full,
                // the data in it shows the peer we are alive anyway.
                Message::Ping { token } => link.try_send(&Message::Pong { token }),
                Message::Pong { .. } => {}
                Message::State { role, .. } => self.peer.set(|s| {
                    s.peer_role = Some(if role == 1 {
                        Role::Primary
                    } else {
                        Role::Secondary
                    })
                }),
                Message::ResyncDone { current } => {
                    self.volume.finish_sync_target(current).await?;
                    self.established(link);
                }
                other => return Err(PeerError::Wire(format!("unexpected message {other:?}"))),
            }
        }
    }

    /// Applies a write from the peer: its place among overlapping writes is
    /// taken now, in arrival order; the disk write runs concurrently.
    async fn apply(
        &self,
        link: &Arc<LinkTx>,
        applying: &Arc<Semaphore>,
        seq: u64,
        offset: u64,
        data: Vec<u8>,
        flags: u32,
    ) -> Result<(), PeerError> {
        if self.volume.role() == Role::Primary {
            return Err(PeerError::Refused(
                "the peer sent writes to a primary: two primaries; disconnecting".into(),
            ));
        }
        let permit = applying
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
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
            let _permit = permit;
            let _guard = ticket.wait().await;
            let errno = match volume.write_replicated(offset, data, flags).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = %e, offset, "applying a replicated write failed");
                    e.errno() as u32
                }
            };
            let _ = link
                .send(&Message::Ack {
                    seq,
                    kind: AckKind::Written,
                    errno,
                })
                .await;
        });
        Ok(())
    }
}

/// Replicated writes being applied at once on this node.
const APPLYING_MAX: usize = 128;

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fails every waiter of a link when its session ends.
struct FailOnDrop(Arc<LinkTx>);

impl Drop for FailOnDrop {
    fn drop(&mut self) {
        self.0.fail_all();
    }
}

/// A flag in Hello: this side's bitmap is not empty.
pub const HELLO_FLAG_DIRTY: u32 = 1 << 31;

/// A fresh random challenge (generation identifiers come from the same
/// random source).
fn rand_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    for chunk in nonce.chunks_mut(8) {
        chunk.copy_from_slice(&blkmirror_metadata::fresh_generation().to_le_bytes());
    }
    nonce
}

/// Copies one chunk to the peer and marks it in sync once confirmed.
async fn resync_chunk(
    volume: &Volume,
    link: &LinkTx,
    peer: &Peer,
    offset: u64,
    len: u64,
    checksum_first: bool,
) -> Result<(), String> {
    let lost = || "link lost during resync".to_string();
    // Reading and queueing under the range gate orders this chunk before
    // any application write to the same range.
    let (guard, data) = volume
        .read_for_resync(offset, len)
        .await
        .map_err(|e| e.to_string())?;
    // An all-zero chunk travels as a zeroing command, not as data: a new or
    // mostly empty disk rebuilds at little cost. In a full copy onto a disk
    // that may already be mostly right, only the checksum goes first.
    let mut kind = if is_zero(&data) {
        ChunkKind::Zero
    } else if checksum_first {
        ChunkKind::Checksum
    } else {
        ChunkKind::Data
    };
    let ack = match kind {
        ChunkKind::Zero => {
            link.enqueue(|seq| Message::Write {
                seq,
                offset,
                flags: WRITE_FLAG_ZERO,
                data: len.to_le_bytes().to_vec(),
            })
            .await
        }
        ChunkKind::Checksum => {
            link.enqueue(|_| Message::ResyncChecksum {
                offset,
                len: len as u32,
                crc: crc32c::crc32c(&data),
            })
            .await
        }
        ChunkKind::Data => {
            link.enqueue(|_| Message::ResyncData {
                offset,
                data: data.to_vec(),
            })
            .await
        }
    };
    drop(guard);
    let mut answer = ack.map_err(|Lost| lost())?.await.map_err(|_| lost())?;
    if kind == ChunkKind::Checksum && answer == CHECKSUM_DIFFERS {
        // It differs after all: send the data, read afresh under the gate.
        let (guard, data) = volume
            .read_for_resync(offset, len)
            .await
            .map_err(|e| e.to_string())?;
        let rx = link
            .enqueue(|_| Message::ResyncData {
                offset,
                data: data.to_vec(),
            })
            .await
            .map_err(|Lost| lost())?;
        drop(guard);
        answer = rx.await.map_err(|_| lost())?;
        kind = ChunkKind::Data;
    }
    if answer != 0 {
        return Err(format!(
            "peer failed to write resync data at {offset}: errno {answer}"
        ));
    }
    volume.mark_in_sync(offset, len);
    peer.progress(len, kind);
    Ok(())
}

/// How a resync chunk travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkKind {
    Data,
    Zero,
    /// Only its checksum, and it matched.
    Checksum,
}

/// The answer to a ResyncChecksum whose chunk differs on the target.
const CHECKSUM_DIFFERS: u32 = u32::MAX;

/// True when every byte is zero (checked eight bytes at a time).
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("eight bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Splits a byte range into resync chunks.
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    (offset..end)
        .step_by(RESYNC_CHUNK_BYTES as usize)
        .map(move |o| (o, (end - o).min(RESYNC_CHUNK_BYTES)))
}

/// Streams every out-of-sync range to the peer, clearing each as it is
/// acknowledged, then tells the peer it is done.
async fn resync_source(
    volume: Arc<Volume>,
    link: Arc<LinkTx>,
    peer: Arc<Peer>,
    checksum_first: bool,
    done: oneshot::Sender<Result<(), String>>,
) {
    let window = Arc::new(Semaphore::new(RESYNC_WINDOW));
    let mut acks = tokio::task::JoinSet::new();
    let result: Result<(), String> = async {
        // Rounds until nothing is left: a write that raced the start of the
        // resync (marked after the first snapshot) is picked up next round.
        loop {
            let runs = volume.dirty_runs();
            if runs.is_empty() {
                break;
            }
            for (offset, len) in runs {
                for (chunk_offset, chunk_len) in chunks(offset, len) {
                    let permit = window.clone().acquire_owned().await.expect("never closed");
                    while let Some(joined) = acks.try_join_next() {
                        joined.map_err(|e| e.to_string())??;
                    }
                    let (volume, peer, link) = (volume.clone(), peer.clone(), link.clone());
                    // Each chunk in its own task: reads overlap with sending.
                    acks.spawn(async move {
                        let _permit = permit;
                        resync_chunk(
                            &volume,
                            &link,
                            &peer,
                            chunk_offset,
                            chunk_len,
                            checksum_first,
                        )
                        .await
                    });
                }
            }
            while let Some(joined) = acks.join_next().await {
                joined.map_err(|e| e.to_string())??;
            }
        }
        while let Some(joined) = acks.join_next().await {
            joined.map_err(|e| e.to_string())??;
        }
        let current = volume
            .finish_sync_source()
            .await
            .map_err(|e| e.to_string())?;
        link.send(&Message::ResyncDone { current })
            .await
            .map_err(|_| "link lost".to_string())?;
        Ok(())
    }
    .await;
    let _ = done.send(result);
}

async fn ping(link: Arc<LinkTx>, every: Duration) {
    let mut token = 0u64;
    loop {
        tokio::time::sleep(every).await;
        token += 1;
        if link.send(&Message::Ping { token }).await.is_err() {
            return;
        }
    }
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

async fn write_frames(
    mut writer: BufWriter<OwnedWriteHalf>,
    mut frames: mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    while let Some(frame) = frames.recv().await {
        writer.write_all(&frame).await?;
        while let Ok(frame) = frames.try_recv() {
            writer.write_all(&frame).await?;
        }
        writer.flush().await?;
    }
    Ok(())
}

struct FrameReader {
    inner: BufReader<OwnedReadHalf>,
    timeout: Duration,
    /// Once agreed, every frame must carry it.
    volume_uuid: Option<[u8; 16]>,
}

impl FrameReader {
    async fn next(&mut self) -> Result<Message, PeerError> {
        Ok(self.next_with_seq().await?.1)
    }

    /// The next message and the sequence number of its frame.
    async fn next_with_seq(&mut self) -> Result<(u64, Message), PeerError> {
        tokio::time::timeout(self.timeout, self.read())
            .await
            .map_err(|_| PeerError::Timeout(self.timeout))?
    }

    async fn read(&mut self) -> Result<(u64, Message), PeerError> {
        let mut header_bytes = [0u8; HEADER_BYTES];
        self.inner.read_exact(&mut header_bytes).await?;
        let header =
            FrameHeader::decode(&header_bytes).map_err(|e| PeerError::Wire(e.to_string()))?;
        if let Some(uuid) = self.volume_uuid {
            if header.volume_uuid != uuid {
                return Err(PeerError::Wire("frame for another volume".into()));
            }
        }
        let mut payload = vec![0u8; header.payload_len as usize];
        self.inner.read_exact(&mut payload).await?;
        header
            .check_payload(&payload)
            .map_err(|e| PeerError::Wire(e.to_string()))?;
        let message =
            Message::decode(&header, &payload).map_err(|e| PeerError::Wire(e.to_string()))?;
        Ok((header.sequence, message))
    }
}

/// Generation identifiers as they travel in a Hello.
pub fn wire_generations(g: &blkmirror_metadata::Generations) -> WireGenerations {
    WireGenerations {
        current: g.current,
        bitmap: g.bitmap,
        history: g.history,
    }
}

/// The flag bits a Hello carries for `flags`, plus the dirty marker.
pub fn hello_flags(flags: Flags, dirty: bool) -> u32 {
    flags.bits() | if dirty { HELLO_FLAG_DIRTY } else { 0 }
}

pub fn fua_flag(fua: bool) -> u32 {
    if fua {
        WRITE_FLAG_FUA
    } else {
        0
    }
}
