//! A node's volume: the backing store, its metadata area, and the role that
//! decides whether this node may serve I/O.

use std::fs::File;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blkmirror_config::{NodeConfig, Protocol};
use blkmirror_io::{AlignedBuf, Engine, Store};
use blkmirror_metadata::activity_log;
use blkmirror_metadata::{self as metadata, fresh_generation, Flags, Generations, Superblock};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use blkmirror_proto::message::{WRITE_FLAG_ACK_RECEIVED, WRITE_FLAG_UNMAP, WRITE_FLAG_ZERO};
use blkmirror_proto::Message;

use crate::gate::{RangeGate, RangeGuard};
use crate::peer::{self, Channel, Lost, Reply, VolatileWrite};
use crate::tracking::{ChangeTracker, LoggedWrite};
use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of this node's data, named as DRBD operators know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    /// Mid-sync or never initialised: the data must not be used.
    Inconsistent,
    /// Consistent, but known to be older than the peer's.
    Outdated,
    /// Consistent, but contact with a primary peer was lost: it may have
    /// written since, and only reconnecting tells whether this is UpToDate.
    Consistent,
    /// The disk failed and was detached: this node holds no data.
    Diskless,
    /// Consistent, and as new as anything this node knows of.
    UpToDate,
}

impl DiskState {
    pub fn from_flags(flags: Flags) -> DiskState {
        if !flags.contains(Flags::CONSISTENT) {
            DiskState::Inconsistent
        } else if flags.contains(Flags::UP_TO_DATE) {
            DiskState::UpToDate
        } else {
            DiskState::Outdated
        }
    }
}

/// The disk state `status` reports and promotion checks: an UpToDate disk
/// whose primary peer went out of contact is only Consistent.
fn disk_state(flags: Flags, connected: bool) -> DiskState {
    match DiskState::from_flags(flags) {
        DiskState::UpToDate if flags.contains(Flags::PEER_PRIMARY) && !connected => {
            DiskState::Consistent
        }
        other => other,
    }
}

/// A diskless primary reads from its peer in pieces of this size.
const PEER_READ_CHUNK_BYTES: u64 = 1 << 20;
/// The most one zeroing write covers: 8 activity-log extents, half of the
/// smallest log, so that it always fits beside other writes.
const ZERO_PIECE_BYTES: u64 = 8 * activity_log::EXTENT_BYTES;

/// How long a primary going down waits for its peer to confirm the goodbye.
const GOODBYE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The answer to a `PromoteAsk` that refuses it (EBUSY).
const PROMOTION_REFUSED: u32 = 16;
/// The answer to a `PromoteAsk` that met the answering node's own question
/// and takes second place (EAGAIN): the asker is to ask again shortly,
/// once the answering node has had its own refusal.
const PROMOTION_COLLIDED: u32 = 11;
/// The longest pause before a node whose question met its peer's asks
/// again (the pauses grow from 1 ms); it asks again for the link's
/// `timeout`, as the peer's own refusal may wait behind a resync's frames.
const PROMOTION_ASK_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// What `status` reports about the volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk_state: DiskState,
    pub disk: String,
    pub data_size: u64,
    pub volume_uuid: Uuid,
    pub generations: GenerationsView,
    pub flags: Vec<String>,
    pub nbd_clients: usize,
    /// The ublk block device this node serves, if any (filled in by the
    /// running node).
    #[serde(default)]
    pub ublk_device: Option<String>,
    /// Bytes the peer lacks (marked in the dirty bitmap).
    pub out_of_sync_bytes: u64,
    pub io_engine: String,
    pub direct_io: bool,
    /// The peer connection, filled in by the running node.
    #[serde(flatten)]
    pub peer: Option<crate::peer::PeerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationsView {
    pub current: String,
    pub bitmap: String,
    pub history: Vec<String>,
}

impl From<&Generations> for GenerationsView {
    fn from(g: &Generations) -> GenerationsView {
        let hex = |v: u64| format!("{v:016X}");
        GenerationsView {
            current: hex(g.current),
            bitmap: hex(g.bitmap),
            history: g.history.iter().map(|&h| hex(h)).collect(),
        }
    }
}

pub fn flag_names(flags: Flags) -> Vec<String> {
    flags
        .iter_names()
        .map(|(name, _)| name.to_lowercase())
        .collect()
}

struct State {
    role: Role,
    superblock: Superblock,
    /// Frontend clients attached; changes only together with the role check.
    clients: usize,
    /// A new data generation was started since the peer was last connected:
    /// further writes without the peer need not start another.
    generation_open: bool,
    /// The disk failed and is detached: this node is Diskless.
    disk_failed: bool,
    /// A session's handshake has told this node the peer's role, which
    /// stands until the session ends (`PEER_PRIMARY` outlives it).
    peer_connected: bool,
    /// A resync to this node is under way: its end is recorded only if
    /// nothing (`invalidate`, a forced promotion) called it off meanwhile.
    sync_target: bool,
    /// A promotion is recorded on disk but not yet open to clients: the
    /// peer is told Primary from now on, so no `State` sent meanwhile
    /// (ahead of the clients' first write) says otherwise.
    promoting: bool,
    /// This node asks its peer to let it become primary: meanwhile it lets
    /// the peer become primary no more than if it were primary already.
    asking_promotion: bool,
}

/// The metadata area's descriptor; in test builds, its writes pass the
/// same fault injection as the store's.
struct MetaFile(File);

impl metadata::MetaDevice for MetaFile {
    fn read_bytes_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_bytes_at(buf, offset)
    }

    fn write_bytes_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        #[cfg(feature = "fault-injection")]
        {
            use blkmirror_io::faults;
            match faults::write_fate(offset, buf.len() as u64) {
                // Metadata is written synchronously: a stall would hold a
                // runtime thread, so it applies to data writes only.
                faults::Fate::Persist | faults::Fate::Stall => {}
                faults::Fate::Drop => return Ok(()),
                faults::Fate::Fail => return Err(faults::injected_error()),
            }
        }
        self.0.write_bytes_at(buf, offset)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

pub struct Volume {
    resource: String,
    node: String,
    disk: String,
    store: Store,
    /// The metadata area is read and written through the buffered descriptor.
    meta: MetaFile,
    data_offset: u64,
    data_size: u64,
    state: Mutex<State>,
    /// Held through a promotion or demotion: each persists the role, tells
    /// the peer and opens or closes the device, in steps that must not
    /// interleave.
    role_change: tokio::sync::Mutex<()>,
    tracker: ChangeTracker,
    /// Orders overlapping writes identically on both nodes.
    gate: Arc<RangeGate>,
    /// Where writes go to reach the peer, while it receives them.
    link: Mutex<Option<Arc<Channel>>>,
    /// The session with the peer, from its handshake on (a sync target has
    /// one long before writes go to the peer): a promotion asks over it.
    peer_session: Mutex<Option<Arc<Channel>>>,
    /// When a write counts as done: see [`Protocol`].
    protocol: Protocol,
    /// Application writes so far (resync yields while they come).
    application_writes: AtomicU64,
    /// Writes under way that go without the peer (they mark the bitmap):
    /// a resync starts only once they are done, so it reads what they wrote.
    unlinked_writes: tokio::sync::watch::Sender<usize>,
    /// Protocol A and B writes the client has heard of whose peer answer
    /// is still awaited: shutdown waits until each is marked or confirmed.
    unanswered_writes: tokio::sync::watch::Sender<usize>,
    /// Random per process start, sent in Hello.
    session: u64,
}

impl State {
    /// Primary, or becoming it: what this node tells its peer.
    fn says_primary(&self) -> bool {
        self.role == Role::Primary || self.promoting
    }
}

/// Whether a node in `state` may be promoted; the disk state it would
/// promote. Only `force` promotes data that is not UpToDate, and nothing
/// promotes beside a connected primary or a failed disk.
fn may_promote(state: &State, force: bool, connected: bool) -> Result<DiskState, Error> {
    if state.peer_connected && state.superblock.flags.contains(Flags::PEER_PRIMARY) {
        return Err(Error::TwoPrimaries);
    }
    if state.disk_failed {
        return Err(Error::DiskFailed);
    }
    let disk_state = disk_state(state.superblock.flags, connected);
    match disk_state {
        DiskState::UpToDate => {}
        _ if force => {}
        DiskState::Consistent => return Err(Error::PeerMayHaveWritten),
        disk_state => return Err(Error::NotUpToDate { disk_state }),
    }
    Ok(disk_state)
}

/// A promotion's question to the peer, outstanding until this is dropped
/// (by then the promotion is recorded, and `promoting` says the rest).
struct AskingPromotion<'a>(&'a Mutex<State>);

impl Drop for AskingPromotion<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap().asking_promotion = false;
    }
}

/// A `State` frame saying this node's role and disk state.
fn state_message(state: &State) -> Message {
    Message::State {
        role: u8::from(state.says_primary()),
        disk_state: if state.disk_failed {
            peer::STATE_DISKLESS
        } else {
            0
        },
        flags: state.superblock.flags.bits(),
    }
}

/// Where a write goes.
enum WriteRoute<'a> {
    Peer(Arc<Channel>),
    /// Only to the local disk, marked in the bitmap.
    LocalOnly(InFlight<'a>),
}

/// Counts an operation in a counter others wait on, until dropped.
struct InFlight<'a>(&'a tokio::sync::watch::Sender<usize>);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a tokio::sync::watch::Sender<usize>) -> InFlight<'a> {
        counter.send_modify(|n| *n += 1);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// Where the peer's half of a replicated write stands when the client may
/// hear success.
enum PeerHalf {
    /// The peer answered (protocol C) the frame `seq`: 0, or its errno.
    Answered { seq: u64, errno: u32 },
    /// Still on its way (protocols A and B); the answer is awaited apart.
    Pending(Reply),
}

impl Volume {
    /// Opens the node's disk (locking it) and checks its metadata. Nothing is
    /// written until [`Volume::start`]; the node starts as Secondary.
    pub fn open(
        resource: &str,
        node: &NodeConfig,
        protocol: Protocol,
        al_extents: usize,
    ) -> Result<Arc<Volume>, Error> {
        let store = Store::open(&node.disk, Engine::Uring)?;
        let meta = store
            .file()
            .buffered
            .try_clone()
            .map_err(|source| Error::Disk {
                disk: node.disk.display().to_string(),
                source: metadata::Error::Io {
                    what: "duplicating the disk descriptor",
                    source,
                },
            })?;
        let meta = MetaFile(meta);
        let disk = node.disk.display().to_string();
        let loaded = metadata::open(&meta, store.file().size).map_err(|source| Error::Disk {
            disk: disk.clone(),
            source,
        })?;
        if let Some(damage) = &loaded.other_slot_damage {
            tracing::warn!(disk, %damage, "one superblock slot is damaged (torn write?); using the other, the next metadata write repairs it");
        }
        let superblock = loaded.superblock;
        if superblock.node_name != node.name {
            return Err(Error::WrongDisk {
                disk,
                found: superblock.node_name,
                expected: node.name.clone(),
            });
        }
        let layout = superblock.layout;
        let tracker = ChangeTracker::open(&meta, &layout, &disk, al_extents)?;
        tracing::info!(
            disk,
            data_offset = layout.data_offset,
            data_size = layout.data_size,
            io_engine = ?store.engine(),
            direct_io = store.file().uses_direct_io(),
            "volume opened"
        );
        Ok(Arc::new(Volume {
            resource: resource.to_string(),
            node: node.name.clone(),
            disk,
            store,
            meta,
            data_offset: layout.data_offset,
            data_size: layout.data_size,
            state: Mutex::new(State {
                role: Role::Secondary,
                superblock,
                clients: 0,
                generation_open: false,
                promoting: false,
                asking_promotion: false,
                disk_failed: false,
                peer_connected: false,
                sync_target: false,
            }),
            role_change: tokio::sync::Mutex::new(()),
            tracker,
            gate: Arc::new(RangeGate::default()),
            link: Mutex::new(None),
            peer_session: Mutex::new(None),
            protocol,
            application_writes: AtomicU64::new(0),
            unlinked_writes: tokio::sync::watch::channel(0).0,
            unanswered_writes: tokio::sync::watch::channel(0).0,
            session: fresh_generation(),
        }))
    }

    /// Records that the node is running: a crash from here on is detectable
    /// because the clean-shutdown flag is gone.
    pub async fn start(&self) -> Result<(), Error> {
        let crashed = !self
            .state
            .lock()
            .unwrap()
            .superblock
            .flags
            .contains(Flags::CLEAN_SHUTDOWN);
        if crashed {
            self.tracker.recover_after_crash(&self.store).await?;
        }
        let mut state = self.state.lock().unwrap();
        self.persist(&mut state, |sb| {
            // Coming up after being primary without a clean shutdown is a crash.
            if sb.flags.contains(Flags::PRIMARY) && !sb.flags.contains(Flags::CLEAN_SHUTDOWN) {
                tracing::warn!(
                    disk = self.disk,
                    "this node was primary and did not shut down cleanly"
                );
                sb.flags.insert(Flags::CRASHED_PRIMARY);
            }
            sb.flags.remove(Flags::CLEAN_SHUTDOWN | Flags::PRIMARY);
        })
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    pub fn role(&self) -> Role {
        self.state.lock().unwrap().role
    }

    /// Primary, or becoming it: what this node tells its peer.
    pub fn says_primary(&self) -> bool {
        self.state.lock().unwrap().says_primary()
    }

    /// Writes a changed copy of the superblock, and adopts it only once it
    /// is on disk: memory never claims a state the disk does not hold.
    fn persist(
        &self,
        state: &mut State,
        change: impl FnOnce(&mut Superblock),
    ) -> Result<(), Error> {
        let mut sb = state.superblock.clone();
        change(&mut sb);
        metadata::store(&self.meta, &mut sb).map_err(|source| Error::Disk {
            disk: self.disk.clone(),
            source,
        })?;
        state.superblock = sb;
        Ok(())
    }

    /// Makes this node primary. Data that is not UpToDate is only promoted
    /// with `force`, which declares it valid and starts a new generation.
    /// A connected peer is told before any client can write: the peer
    /// takes writes only from a primary, and frames arrive in order.
    pub async fn promote(&self, force: bool) -> Result<(), Error> {
        let _changing = self.role_change.lock().await;
        // A session that has ended (its manager may not have seen it yet)
        // has no one to ask.
        let session = self.peer_session.lock().unwrap().clone();
        let session = session.filter(|session| !session.is_closed());
        let _asking = match &session {
            Some(session) => self.ask_peer_to_promote(session, force).await?,
            None => None,
        };
        let link = self.link.lock().unwrap().clone();
        let connected = link.is_some();
        let Some(disk_state) = self.record_promotion(force, connected)? else {
            return Ok(());
        };
        if let Some(link) = link {
            self.tell_role(&link).await;
        }
        let mut state = self.state.lock().unwrap();
        if disk_state != DiskState::UpToDate && !connected {
            // Writes without the peer belong to the generation just started.
            state.generation_open = true;
        }
        state.role = Role::Primary;
        state.promoting = false;
        tracing::info!("promoted to Primary");
        Ok(())
    }

    /// A connected node asks its peer before it becomes primary, and the
    /// peer refuses while it is primary, becoming it, or asking the same
    /// (see `answer_promotion_ask`). So of two nodes promoted at once,
    /// never both become primary. When the two questions meet, the node
    /// whose name sorts first asks again, still asking meanwhile, until the
    /// other has had its refusal: one of the two is promoted. A session
    /// that ends before the answer refuses the promotion too: promoted
    /// again, the node goes on without the peer, as any node alone. The
    /// returned guard stands for the question until the promotion is
    /// recorded; a node primary already asks nothing.
    async fn ask_peer_to_promote(
        &self,
        link: &Channel,
        force: bool,
    ) -> Result<Option<AskingPromotion<'_>>, Error> {
        {
            let mut state = self.state.lock().unwrap();
            if state.role == Role::Primary {
                return Ok(None);
            }
            // A promotion refused here needs no question.
            may_promote(&state, force, true)?;
            state.asking_promotion = true;
        }
        let asking = AskingPromotion(&self.state);
        let give_up = tokio::time::Instant::now() + link.timeout();
        let mut pause = std::time::Duration::from_millis(1);
        loop {
            match Self::ask_peer_once(link).await {
                Ok(0) => return Ok(Some(asking)),
                Ok(PROMOTION_COLLIDED) if tokio::time::Instant::now() < give_up => {
                    tracing::info!(
                        "the peer asked to be promoted at the same moment; this node's name \
                         sorts first, so it asks again"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(PROMOTION_ASK_PAUSE_MAX);
                }
                Ok(_) => return Err(Error::PeerRefusedPromotion),
                Err(Lost) => {
                    return Err(Error::PromotionUnanswered(format!(
                        "the session ended first ({})",
                        link.wait_closed().await
                    )))
                }
            }
        }
    }

    /// Sends one `PromoteAsk` on `link`; the peer's answer.
    async fn ask_peer_once(link: &Channel) -> Result<u32, Lost> {
        // A peer that takes no frames for its timeout has lost the session,
        // as for the role news. The answer has no timeout of its own: it
        // waits behind the frames sent before (a resync's, on a slow link),
        // and a peer that answers nothing loses the session as for any frame.
        match tokio::time::timeout(link.timeout(), link.enqueue(&Message::PromoteAsk)).await {
            Ok(Ok(reply)) => reply.written().await,
            Ok(Err(Lost)) => Err(Lost),
            Err(_) => {
                link.close("the peer took no frames for its timeout; a promotion could not ask it");
                Err(Lost)
            }
        }
    }

    /// Answers the `PromoteAsk` of the peer named `peer`: 0 lets it become
    /// primary. A node asking the same never lets it (both could be
    /// promoted), but tells a peer whose name sorts first to ask again.
    pub fn answer_promotion_ask(&self, peer: &str) -> u32 {
        let state = self.state.lock().unwrap();
        if state.says_primary() {
            PROMOTION_REFUSED
        } else if state.asking_promotion {
            if peer < self.node.as_str() {
                PROMOTION_COLLIDED
            } else {
                PROMOTION_REFUSED
            }
        } else {
            0
        }
    }

    /// Checks and records a promotion on disk; from then on a session that
    /// opens says Primary in its Hello, and every `State` does. Returns the
    /// disk state promoted, or `None` when this node is primary already.
    fn record_promotion(&self, force: bool, connected: bool) -> Result<Option<DiskState>, Error> {
        let mut state = self.state.lock().unwrap();
        if state.role == Role::Primary {
            return Ok(None);
        }
        let disk_state = may_promote(&state, force, connected)?;
        self.persist(&mut state, |sb| {
            if disk_state != DiskState::UpToDate {
                tracing::warn!(
                    ?disk_state,
                    "FORCED PROMOTION: declaring this node's data the newest, in a new generation"
                );
                sb.flags.insert(Flags::CONSISTENT | Flags::UP_TO_DATE);
                sb.flags.remove(Flags::PEER_PRIMARY);
                sb.generations.start_new(fresh_generation());
            } else if sb.generations.is_just_created() {
                sb.generations.start_new(fresh_generation());
            }
            sb.flags.insert(Flags::PRIMARY);
            sb.flags.remove(Flags::CRASHED_PRIMARY);
            if !connected {
                sb.flags.insert(Flags::PROMOTED_APART);
            }
        })?;
        state.promoting = true;
        state.sync_target = false;
        Ok(Some(disk_state))
    }

    /// Makes this node secondary: refused while clients are attached, as a
    /// mounted device cannot be demoted under its users.
    pub async fn demote(&self) -> Result<(), Error> {
        let _changing = self.role_change.lock().await;
        {
            // Checked and switched in one step, so no client attaches between.
            let mut state = self.state.lock().unwrap();
            if state.role == Role::Secondary {
                return Ok(());
            }
            if state.clients > 0 {
                return Err(Error::ClientsAttached(state.clients));
            }
            state.role = Role::Secondary;
            if state.disk_failed {
                tracing::info!("demoted to Secondary (Diskless: nothing recorded on the disk)");
                return Ok(());
            }
        }
        self.store.flush().await?;
        self.settle().await;
        let mut state = self.state.lock().unwrap();
        self.persist(&mut state, |sb| sb.flags.remove(Flags::PRIMARY))?;
        tracing::info!("demoted to Secondary");
        Ok(())
    }

    /// Records whether the connected peer is primary: while it is, losing
    /// it leaves this node's data Consistent rather than UpToDate.
    /// Refused while this node is primary or becoming it: checked in the
    /// same step as a promotion checks the peer's role, so of two nodes
    /// promoted at once, at least one hears of the other.
    pub fn note_peer_role(&self, peer_primary: bool) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        if peer_primary && state.says_primary() {
            return Err(Error::TwoPrimaries);
        }
        state.peer_connected = true;
        if state.superblock.flags.contains(Flags::PEER_PRIMARY) == peer_primary {
            return Ok(());
        }
        self.persist(&mut state, |sb| {
            sb.flags.set(Flags::PEER_PRIMARY, peer_primary)
        })
    }

    /// In sync with the peer again: neither is a younger primary any more,
    /// and the next write the peer misses starts a new generation. (Not
    /// before: a resync cut off, again and again, must leave the target's
    /// generation this node's bitmap generation, or it would fall out of
    /// the history and look unrelated.)
    ///
    /// Not once the session on `link` has ended: a write the peer missed
    /// may have opened the generation (`peer_missed` closes the session
    /// before it marks and opens one), and it must stay open.
    pub fn note_in_sync(&self, link: &Channel) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        if link.is_closed() {
            return Ok(());
        }
        state.generation_open = false;
        if !state.superblock.flags.contains(Flags::PROMOTED_APART) {
            return Ok(());
        }
        self.persist(&mut state, |sb| sb.flags.remove(Flags::PROMOTED_APART))
    }

    /// A primary going down tells the connected peer it is primary no
    /// longer, after every write, so the peer may be promoted without
    /// `--force`. The barrier of `prepare_disconnect`, which follows,
    /// confirms the news. Returns whether it told the peer.
    pub async fn say_goodbye(&self) -> bool {
        let _changing = self.role_change.lock().await;
        let link = self.link.lock().unwrap().clone();
        let Some(link) = link else { return false };
        {
            let mut state = self.state.lock().unwrap();
            if state.role != Role::Primary || state.clients > 0 {
                return false;
            }
            state.role = Role::Secondary;
        }
        self.tell_role(&link).await;
        true
    }

    /// Flushes the data and records a clean shutdown, once every write the
    /// peer left unanswered is marked for resync. Returns whether it did.
    pub async fn shutdown(&self) -> Result<bool, Error> {
        if self.is_diskless() {
            tracing::warn!("the disk failed: nothing recorded on it at shutdown");
            return Ok(false);
        }
        // Writes the peer may not have made durable (no goodbye confirmed).
        let link = self.link.lock().unwrap().take();
        if let Some(link) = link {
            link.close("shutting down");
            self.session_over(&link)?;
        }
        // Closed, the session fails the writes still awaiting the peer's
        // answer; their tasks mark them in the bitmap flushed below.
        let all_marked = tokio::time::timeout(
            GOODBYE_WAIT,
            self.unanswered_writes
                .subscribe()
                .wait_for(|writes| *writes == 0),
        )
        .await
        .is_ok();
        self.tracker.flush(&self.store).await?;
        self.store.flush().await?;
        let mut state = self.state.lock().unwrap();
        state.role = Role::Secondary;
        if state.clients > 0 {
            // Their writes may still land, unmarked, after the flush above:
            // the activity log still names them.
            tracing::warn!(
                clients = state.clients,
                "clients still have requests under way; the shutdown is recorded as a crash"
            );
            return Ok(false);
        }
        if !all_marked {
            // Left as a crash leaves it: the unmarked writes are still in
            // the activity log, which the next start reads.
            tracing::warn!("writes the peer never answered are not all marked; the shutdown is recorded as a crash");
            return Ok(false);
        }
        self.persist(&mut state, |sb| {
            sb.flags.remove(Flags::PRIMARY);
            sb.flags.insert(Flags::CLEAN_SHUTDOWN);
        })?;
        Ok(true)
    }

    pub fn status(&self) -> VolumeStatus {
        let connected = self.link.lock().unwrap().is_some();
        let state = self.state.lock().unwrap();
        let sb = &state.superblock;
        VolumeStatus {
            resource: self.resource.clone(),
            node: self.node.clone(),
            role: state.role,
            disk_state: if state.disk_failed {
                DiskState::Diskless
            } else {
                disk_state(sb.flags, connected)
            },
            disk: self.disk.clone(),
            data_size: self.data_size,
            volume_uuid: sb.volume_uuid,
            generations: (&sb.generations).into(),
            flags: flag_names(sb.flags),
            nbd_clients: state.clients,
            ublk_device: None,
            out_of_sync_bytes: self.tracker.out_of_sync_bytes(),
            io_engine: self.store.engine().name().to_string(),
            direct_io: self.store.file().uses_direct_io(),
            peer: None,
        }
    }

    /// Attaches a frontend client if this node serves I/O (is primary).
    pub fn attach(&self) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        if state.role != Role::Primary {
            return Err(self.not_serving());
        }
        state.clients += 1;
        Ok(())
    }

    /// Frontend clients attached now (NBD connections, and the ublk
    /// device while it is served).
    pub fn attached_clients(&self) -> usize {
        self.state.lock().unwrap().clients
    }

    pub fn detach(&self) {
        let mut state = self.state.lock().unwrap();
        state.clients = state.clients.saturating_sub(1);
    }

    /// Why a client is refused while this node is not primary.
    pub fn not_serving(&self) -> Error {
        Error::NotServing {
            resource: self.resource.clone(),
            node: self.node.clone(),
        }
    }

    /// Checks that I/O may be served and maps a data-area range to the disk.
    fn disk_offset(&self, offset: u64, len: u64) -> Result<u64, Error> {
        if self.role() != Role::Primary {
            return Err(Error::NotPrimary);
        }
        self.range(offset, len)
    }

    /// Maps a data-area range to the disk, refusing what lies outside.
    fn range(&self, offset: u64, len: u64) -> Result<u64, Error> {
        match offset.checked_add(len) {
            Some(end) if end <= self.data_size => Ok(self.data_offset + offset),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.data_size,
            }),
        }
    }

    /// Reads from the local disk, or from the peer once the disk failed.
    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        let at = self.disk_offset(offset, len as u64)?;
        if !self.is_diskless() {
            match self.store.read(at, len).await {
                Err(e @ blkmirror_io::Error::Io { .. }) => self.detach_failed_disk(&e),
                result => return Ok(result?),
            }
        }
        self.read_from_peer(offset, len).await
    }

    /// A diskless primary's read: the peer holds the only copy.
    async fn read_from_peer(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        let link = self.link.lock().unwrap().clone().ok_or(Error::DiskFailed)?;
        // Where the peer lacks data (a resync had not reached it), there is
        // no good copy left to read.
        if self.tracker.any_out_of_sync(offset, len as u64) {
            return Err(Error::DiskFailed);
        }
        let mut data = Vec::with_capacity(len);
        let end = offset + len as u64;
        let mut at = offset;
        while at < end {
            let chunk = (end - at).min(PEER_READ_CHUNK_BYTES) as u32;
            let lost = |_| Error::PeerLost;
            let answer = link
                .enqueue(&Message::Read {
                    offset: at,
                    len: chunk,
                })
                .await
                .map_err(lost)?
                .answer()
                .await
                .map_err(lost)?;
            if answer.errno != 0 || answer.data.len() != chunk as usize {
                return Err(Error::PeerIo {
                    errno: answer.errno,
                });
            }
            data.extend_from_slice(&answer.data);
            at += u64::from(chunk);
        }
        Ok(AlignedBuf::from_slice(&data))
    }

    /// The disk failed and was detached.
    pub fn is_diskless(&self) -> bool {
        self.state.lock().unwrap().disk_failed
    }

    pub async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> Result<(), Error> {
        let len = data.len() as u64;
        let at = self.disk_offset(offset, len)?;
        let (route, logged) = self.prepare_write(offset, len).await?;
        let _guard = self.gate.enter(offset, len).await;
        let link = match route {
            WriteRoute::Peer(link) => link,
            WriteRoute::LocalOnly(unlinked) => {
                self.store.write(at, data, fua).await?;
                drop(unlinked);
                return Ok(());
            }
        };
        let outgoing = self.outgoing_write(&link, offset, peer::fua_flag(fua), &data);
        let local = async {
            if !self.is_diskless() {
                self.store.write(at, data, fua).await?;
            }
            Ok(())
        };
        self.replicate(&link, outgoing, (offset, len), local, logged)
            .await
    }

    /// The protocol a write follows now, and the frame that carries it to
    /// the peer.
    fn outgoing_write(
        &self,
        link: &Channel,
        offset: u64,
        flags: u32,
        data: &[u8],
    ) -> (Protocol, Vec<u8>) {
        // Without a disk of its own, the client hears success only once the
        // peer's disk has the write, whatever the protocol.
        let protocol = if self.is_diskless() {
            Protocol::C
        } else {
            self.protocol
        };
        let flags = match protocol {
            Protocol::B => flags | WRITE_FLAG_ACK_RECEIVED,
            Protocol::A | Protocol::C => flags,
        };
        let frame = blkmirror_proto::encode_write_frame(offset, flags, data, link.volume_uuid(), 0);
        (protocol, frame)
    }

    /// Runs the local half of a write beside sending it to the peer, and
    /// returns once the protocol lets the client hear success: C when both
    /// disks have it, B when the peer has received it, A when it is queued.
    /// With A and B, a write the peer then fails or never confirms is
    /// marked for resync when that is known (a crash before that is covered
    /// by the activity log, which `logged` holds the write in until then).
    async fn replicate(
        self: &Arc<Self>,
        link: &Arc<Channel>,
        (protocol, frame): (Protocol, Vec<u8>),
        (offset, len): (u64, u64),
        local: impl Future<Output = Result<(), Error>>,
        logged: Option<LoggedWrite>,
    ) -> Result<(), Error> {
        let remote = async {
            let mut reply = link.enqueue_frame(frame, protocol == Protocol::B).await?;
            match protocol {
                Protocol::C => {
                    let seq = reply.seq();
                    let errno = reply.written().await?;
                    Ok(PeerHalf::Answered { seq, errno })
                }
                Protocol::B => {
                    reply.received().await?;
                    Ok(PeerHalf::Pending(reply))
                }
                Protocol::A => Ok(PeerHalf::Pending(reply)),
            }
        };
        let (local, remote) = tokio::join!(local, remote);
        if let Err(Error::Io(e @ blkmirror_io::Error::Io { .. })) = &local {
            // The local disk failed: it is detached.
            self.detach_failed_disk(e);
        }
        if self.is_diskless() {
            // No disk here (since now or before): the write stands only if
            // the peer's disk has it.
            let answer = match remote {
                Ok(PeerHalf::Answered { errno, .. }) => Ok(errno),
                Ok(PeerHalf::Pending(reply)) => reply.written().await,
                Err(Lost) => Err(Lost),
            };
            return match (answer, local) {
                (Ok(0), _) => Ok(()),
                (_, Err(e)) => Err(e),
                (_, Ok(())) => Err(Error::DiskFailed),
            };
        }
        let write = VolatileWrite {
            offset,
            len,
            logged,
        };
        if let Err(e) = local {
            // (The store closing at shutdown, say.) The peer may have what
            // this disk has not: the range differs, whatever it answers.
            self.peer_result(link, 0, write, Err(Lost))?;
            return Err(e);
        }
        match remote {
            Ok(PeerHalf::Answered { seq, errno }) => self.peer_result(link, seq, write, Ok(errno)),
            Err(Lost) => self.peer_result(link, 0, write, Err(Lost)),
            Ok(PeerHalf::Pending(reply)) => {
                let (volume, link) = (self.clone(), link.clone());
                // Counted before the task runs, so shutdown cannot miss it.
                self.unanswered_writes.send_modify(|n| *n += 1);
                tokio::spawn(async move {
                    let _counted = InFlight(&volume.unanswered_writes);
                    let seq = reply.seq();
                    let answer = reply.written().await;
                    if let Err(e) = volume.peer_result(&link, seq, write, answer) {
                        tracing::error!(error = %e, offset, "cannot mark an unconfirmed write for resync");
                    }
                });
                Ok(())
            }
        }
    }

    /// Application writes so far (a counter the resync pacing watches).
    pub fn application_writes(&self) -> u64 {
        self.application_writes.load(Ordering::Relaxed)
    }

    /// Before a write: picks the link (if the peer receives writes now),
    /// starts a new generation if it does not, and records the write in the
    /// activity log (and, without the peer, in the bitmap). The write stays
    /// in the activity log until the returned `LoggedWrite` is dropped (none
    /// without a disk).
    async fn prepare_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(WriteRoute<'_>, Option<LoggedWrite>), Error> {
        self.application_writes.fetch_add(1, Ordering::Relaxed);
        let route = {
            let link = self.link.lock().unwrap();
            match &*link {
                Some(link) => WriteRoute::Peer(link.clone()),
                None => WriteRoute::LocalOnly(InFlight::enter(&self.unlinked_writes)),
            }
        };
        if self.is_diskless() {
            // Nothing to record, nowhere to write but the peer.
            return match route {
                WriteRoute::Peer(_) => Ok((route, None)),
                WriteRoute::LocalOnly(_) => Err(Error::DiskFailed),
            };
        }
        if let WriteRoute::LocalOnly(_) = route {
            self.open_generation()?;
        }
        let hurry = || {
            if let WriteRoute::Peer(link) = &route {
                link.hurry_barrier();
            }
        };
        let recorded = self
            .tracker
            .before_write(
                &self.store,
                (offset, len),
                matches!(route, WriteRoute::LocalOnly(_)),
                hurry,
            )
            .await;
        match (recorded, route) {
            // The activity log could not be written: the disk is failing.
            // With the peer there, the write goes on through it alone.
            (Err(Error::Io(e @ blkmirror_io::Error::Io { .. })), WriteRoute::Peer(link)) => {
                self.detach_failed_disk(&e);
                Ok((WriteRoute::Peer(link), None))
            }
            (Err(e), _) => Err(e),
            (Ok(logged), route) => Ok((route, logged)),
        }
    }

    /// Accounts for the peer's answer to `write`, sent in frame `seq`: a
    /// failure or a lost link leaves the range marked for resync before the
    /// client hears success, and before its activity-log hold ends. A
    /// success is remembered until a barrier makes it durable on the peer.
    fn peer_result(
        self: &Arc<Self>,
        link: &Arc<Channel>,
        seq: u64,
        write: VolatileWrite,
        remote: Result<u32, Lost>,
    ) -> Result<(), Error> {
        let (offset, len) = (write.offset, write.len);
        let _unconfirmed = match remote {
            Ok(0) => match link.remember_volatile(seq, write) {
                Ok(()) => {
                    self.schedule_barrier(link);
                    return Ok(());
                }
                Err(write) => {
                    tracing::debug!(offset, "a session ended as the peer answered a write");
                    write
                }
            },
            Ok(errno) => {
                tracing::warn!(offset, errno, "the peer failed a write; marked for resync");
                write
            }
            Err(Lost) => {
                tracing::debug!(
                    offset,
                    "the peer went away with a write in flight; marked for resync"
                );
                write
            }
        };
        self.peer_missed(
            link,
            "the peer did not confirm a write",
            Some((offset, len)),
        )
    }

    /// The peer may lack something this node wrote through `link`: the
    /// range `missed`, or what `session_over` marks. Whatever session
    /// carries writes now ends too (even a newer one, whose handshake did
    /// not know of the mark), so the next handshake sees the mark and
    /// resyncs it.
    fn peer_missed(
        &self,
        link: &Channel,
        why: &str,
        missed: Option<(u64, u64)>,
    ) -> Result<(), Error> {
        link.close(why);
        let current = self.link.lock().unwrap().take();
        if let Some(current) = &current {
            current.close(why);
        }
        // Only now that both are closed: a resync barrier confirmed on
        // either could clear it otherwise (see `mark_in_sync_on`).
        if let Some((offset, len)) = missed {
            self.tracker.mark(offset, len);
        }
        if let Some(current) = current {
            self.session_over(&current)?;
        }
        self.session_over(link)?;
        // A write this node made as primary, even if demoted since; a
        // secondary whose barrier failed has written nothing the peer lacks
        // (and `session_over` starts a generation if it marked anything).
        if missed.is_some() || self.role() == Role::Primary {
            self.open_generation()?;
        }
        Ok(())
    }

    pub async fn flush(self: &Arc<Self>) -> Result<(), Error> {
        if self.role() != Role::Primary {
            return Err(Error::NotPrimary);
        }
        let link = self.link.lock().unwrap().clone();
        let diskless = self.is_diskless();
        let Some(link) = link else {
            if diskless {
                return Err(Error::DiskFailed);
            }
            return Ok(self.store.flush().await?);
        };
        // Every write acknowledged before this flush is on both disks; make
        // both durable.
        let local = async {
            if !diskless {
                self.store.flush().await?;
            }
            Ok::<(), blkmirror_io::Error>(())
        };
        let (local, remote) = tokio::join!(local, self.barrier(&link));
        local?;
        remote
    }

    /// Sends a barrier and waits until the peer has made every write sent
    /// before it durable. If it fails, the session ends, which marks the
    /// writes it would have covered.
    async fn barrier(&self, link: &Arc<Channel>) -> Result<(), Error> {
        match link.barrier().await {
            Ok(0) => Ok(()),
            _ => {
                // What it answered since its last confirmed barrier is
                // remembered, and marked as the session ends.
                tracing::warn!("the peer did not confirm a barrier; the session ends");
                self.peer_missed(link, "the peer did not confirm a barrier", None)
            }
        }
    }

    /// Asks the peer to make durable every write it answered, waiting a
    /// little: a planned change (demotion, `disconnect`) then leaves nothing
    /// to mark.
    pub async fn settle(&self) {
        let link = self.link.lock().unwrap().clone();
        if let Some(link) = link {
            self.settle_on(&link).await;
        }
    }

    /// `settle`, on the session of `link`; false if the peer did not
    /// confirm in time.
    pub async fn settle_on(&self, link: &Arc<Channel>) -> bool {
        // A barrier that fails ends the session.
        let confirmed = tokio::time::timeout(GOODBYE_WAIT, self.barrier(link))
            .await
            .is_ok()
            && !link.is_closed();
        if !confirmed {
            tracing::warn!("the peer did not confirm a barrier in time");
        }
        confirmed
    }

    /// Before `disconnect`: each side makes durable on the other the
    /// writes the other answered, this one with a barrier of its own, the
    /// peer when told of the disconnection, which it answers by ending the
    /// session. So a planned disconnection, on either side, leaves nothing
    /// to resync but what is written after it. Waits for the peer a little.
    /// Returns whether the peer confirmed the barrier: then it also took
    /// every message sent before.
    pub async fn prepare_disconnect(&self) -> bool {
        let link = self.link.lock().unwrap().clone();
        let Some(link) = link else { return false };
        if !self.settle_on(&link).await {
            // A peer that answers nothing will not end the session either.
            return false;
        }
        let parting = async {
            if link.send(&Message::Disconnect).await.is_ok() {
                link.wait_closed().await;
            }
        };
        let ended = tokio::time::timeout(GOODBYE_WAIT, parting).await.is_ok() && link.is_closed();
        if !ended {
            tracing::warn!(
                "the peer did not end the session in time; writes it answered last may be resynced"
            );
        }
        true
    }

    /// Makes sure a barrier will follow the writes the peer answered, soon
    /// enough that few of them wait for it (see `Channel::barrier_due`).
    fn schedule_barrier(self: &Arc<Self>, link: &Arc<Channel>) {
        if !link.schedule_barrier() {
            return;
        }
        let (volume, link) = (self.clone(), link.clone());
        tokio::spawn(async move {
            link.barrier_due().await;
            // (A demotion or `disconnect` may have settled them meanwhile.)
            if !link.is_closed() && link.holds_volatile() {
                // A failure ends the session, which marks what is left.
                let _ = volume.barrier(&link).await;
            }
            link.barrier_sent();
            // A write answered while this barrier was on its way found it
            // scheduled: it needs the next one.
            if link.holds_volatile() {
                volume.schedule_barrier(&link);
            }
        });
    }

    /// The session on `link` is over: the writes the peer answered that no
    /// barrier made durable there may be lost to a power loss on the peer,
    /// so they are marked for resync.
    pub fn session_over(&self, link: &Channel) -> Result<(), Error> {
        let volatile = link.take_volatile();
        // Without a disk this node has no copy to resync them from.
        if volatile.is_empty() || self.is_diskless() {
            return Ok(());
        }
        for write in &volatile {
            self.tracker.mark(write.offset, write.len);
        }
        tracing::info!(
            writes = volatile.len(),
            "writes the peer had not yet made durable are marked for resync"
        );
        // Written as primary, even if this node was demoted since: its data
        // may be newer than the peer's, and the next handshake must see it.
        let mut state = self.state.lock().unwrap();
        self.start_generation(&mut state)
    }

    /// `invalidate`: this node's data is to be overwritten by the peer. It
    /// becomes Inconsistent with no generation, so the next connection takes
    /// a full copy. Only a secondary can do this.
    pub fn invalidate(&self) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        if state.role == Role::Primary {
            return Err(Error::InvalidatePrimary);
        }
        state.sync_target = false;
        self.persist(&mut state, |sb| {
            sb.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE);
            let g = &mut sb.generations;
            if g.current != 0 {
                g.history = [g.current, g.history[0]];
            }
            g.current = 0;
            g.bitmap = 0;
        })?;
        tracing::warn!(
            "invalidated: this node's data will be replaced by a full copy from the peer"
        );
        Ok(())
    }

    /// `resync --full`: everything counts as out of sync, so the next
    /// connection copies all of it from this node.
    pub fn mark_everything_for_resync(&self) {
        self.tracker.mark_all();
    }

    // ---- replication: what the peer connection needs from the volume ----

    /// This node's role and disk state, as the peer is told of them.
    pub fn state_message(&self) -> Message {
        let state = self.state.lock().unwrap();
        state_message(&state)
    }

    /// Tells a connected peer this node's role and disk state.
    pub async fn announce_state(&self) {
        let link = self.link.lock().unwrap().clone();
        if let Some(link) = link {
            self.tell_role(&link).await;
        }
    }

    /// Sends this node's `State` on `link`. A peer that takes no frame for
    /// its timeout (its window full) loses the session rather than hold
    /// the caller: the next session's Hello says the same.
    async fn tell_role(&self, link: &Channel) {
        let message = self.state_message();
        if tokio::time::timeout(link.timeout(), link.send(&message))
            .await
            .is_err()
        {
            link.close("the peer took no frames for its timeout; its role news could not be sent");
        }
    }

    pub fn gate(&self) -> &Arc<RangeGate> {
        &self.gate
    }

    /// From now on writes go to the peer through `link`; returns once every
    /// write that went without it has finished (and marked the bitmap).
    pub async fn link_up(&self, link: Arc<Channel>) {
        let already =
            matches!(&*self.link.lock().unwrap(), Some(current) if Arc::ptr_eq(current, &link));
        if !already {
            // The peer knows this node's role from a Hello that may predate
            // a promotion (which then had no link to tell): say it again
            // before any write takes the link. Under the role lock, so a
            // promotion either sees this link or is announced here. (Not
            // again once the link carries writes: the State would wait
            // behind them for window space.)
            let _changing = self.role_change.lock().await;
            self.tell_role(&link).await;
            self.set_link(Some(link));
        }
        let _ = self
            .unlinked_writes
            .subscribe()
            .wait_for(|writes| *writes == 0)
            .await;
    }

    /// Where writes go while the peer receives them; `None` when it does not.
    pub fn set_link(&self, link: Option<Arc<Channel>>) {
        *self.link.lock().unwrap() = link;
    }

    /// A session with the peer has passed its handshake: from now on a
    /// promotion asks the peer first.
    pub fn session_began(&self, channel: Arc<Channel>) {
        *self.peer_session.lock().unwrap() = Some(channel);
    }

    /// The session with the peer is over (or never opened): writes no
    /// longer go to it, and its role no longer bars a promotion.
    pub fn end_session(&self) {
        self.set_link(None);
        *self.peer_session.lock().unwrap() = None;
        self.state.lock().unwrap().peer_connected = false;
    }

    /// Starts a new data generation before the first write the peer will not
    /// get, so that on reconnect the generations say who is newer. Also on
    /// a node demoted since: the writes it marks were written as primary,
    /// and are acknowledged already under protocols A and B.
    fn open_generation(&self) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        // Without a disk this node has no copy to resync them from.
        if state.disk_failed {
            return Ok(());
        }
        self.start_generation(&mut state)
    }

    /// Starts a new data generation, unless one is open already.
    fn start_generation(&self, state: &mut State) -> Result<(), Error> {
        if state.generation_open {
            return Ok(());
        }
        self.persist(state, |sb| sb.generations.start_new(fresh_generation()))?;
        state.generation_open = true;
        Ok(())
    }

    /// This node's introduction to the peer.
    pub fn hello(
        &self,
        link_index: u8,
        shared: blkmirror_proto::SharedSettings,
    ) -> blkmirror_proto::Hello {
        let state = self.state.lock().unwrap();
        let sb = &state.superblock;
        blkmirror_proto::Hello {
            volume_uuid: *sb.volume_uuid.as_bytes(),
            node_name: self.node.clone(),
            link_index,
            data_size: self.data_size,
            granularity: sb.layout.granularity,
            generations: peer::wire_generations(&sb.generations),
            flags: sb.flags.bits()
                | if state.disk_failed {
                    peer::HELLO_FLAG_DISKLESS
                } else {
                    0
                },
            session: self.session,
            dirty_bytes: self.tracker.out_of_sync_bytes(),
            shared,
        }
    }

    /// A new disk joins the volume of the peer that has data.
    pub fn adopt_volume_uuid(&self, uuid: [u8; 16]) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        tracing::info!(volume = %uuid::Uuid::from_bytes(uuid), "joining the peer's volume");
        self.persist(&mut state, |sb| {
            sb.volume_uuid = uuid::Uuid::from_bytes(uuid)
        })
    }

    pub fn out_of_sync_bytes(&self) -> u64 {
        self.tracker.out_of_sync_bytes()
    }

    /// The first out-of-sync range that ends after byte `from`.
    pub fn dirty_run_from(&self, from: u64) -> Option<(u64, u64)> {
        self.tracker.run_from(from)
    }

    /// Pages of the dirty bitmap, for `dirty_page_bits`.
    pub fn bitmap_page_count(&self) -> usize {
        self.tracker.page_count()
    }

    /// Page `index` of the dirty bitmap, if any of it is dirty: its first
    /// granule and its bits.
    pub fn dirty_page_bits(&self, index: usize) -> Option<(u64, Vec<u8>)> {
        self.tracker.page_bits(index)
    }

    /// Bytes of data per bit of the dirty bitmap.
    pub fn granularity(&self) -> u64 {
        self.tracker.granularity()
    }

    pub fn mark_out_of_sync(&self, offset: u64, len: u64) {
        self.tracker.mark(offset, len);
    }

    pub fn mark_all_out_of_sync(&self) {
        self.tracker.mark_all();
    }

    /// A resync chunk sent on `link` is durable on the peer: in sync, unless
    /// the session has ended. Every mark of a write the peer missed is made
    /// once its session is closed (see `peer_missed` and the peer manager),
    /// so a barrier confirmed just before never clears such a mark.
    pub fn mark_in_sync_on(&self, link: &Channel, offset: u64, len: u64) {
        self.tracker.clear_unless(offset, len, || link.is_closed());
    }

    /// This node is about to be overwritten by the peer: until the resync
    /// completes its data is Inconsistent, even across a crash.
    pub async fn begin_sync_target(&self) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap();
        // The Hellos that decided were built before a promotion (forced)
        // could open this node to clients; from here on it cannot.
        if state.says_primary() {
            return Err(Error::PrimaryAsSyncTarget);
        }
        self.persist(&mut state, |sb| {
            sb.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE)
        })?;
        state.sync_target = true;
        Ok(())
    }

    /// The resync is complete: this node holds the peer's generation.
    pub async fn finish_sync_target(&self, current: u64) -> Result<(), Error> {
        self.tracker.clear_all();
        self.tracker.flush(&self.store).await?;
        self.store.flush().await?;
        let mut state = self.state.lock().unwrap();
        // (The finish may outlive its session: the data is all here.)
        if !state.sync_target || state.says_primary() {
            return Err(Error::ResyncCalledOff);
        }
        state.sync_target = false;
        self.persist(&mut state, |sb| {
            let g = &mut sb.generations;
            if g.current != current && g.current != 0 {
                g.history = [g.current, g.history[0]];
            }
            g.current = current;
            g.bitmap = 0;
            sb.flags.insert(Flags::CONSISTENT | Flags::UP_TO_DATE);
            // A crash here as primary no longer matters: this data is the peer's.
            sb.flags.remove(Flags::CRASHED_PRIMARY);
        })?;
        tracing::info!("resync complete: this node is UpToDate");
        Ok(())
    }

    /// The resync is complete on the source: the bitmap base is history.
    pub async fn finish_sync_source(&self) -> Result<u64, Error> {
        self.tracker.flush(&self.store).await?;
        let mut state = self.state.lock().unwrap();
        self.persist(&mut state, |sb| {
            let g = &mut sb.generations;
            if g.bitmap != 0 {
                g.history = [g.bitmap, g.history[0]];
                g.bitmap = 0;
            }
            // What a crash as primary may have left on this side alone has
            // now been copied: the two sides no longer differ by it.
            sb.flags.remove(Flags::CRASHED_PRIMARY);
        })?;
        tracing::info!("resync complete: the peer is UpToDate");
        Ok(state.superblock.generations.current)
    }

    /// Reads a range for resync while holding it against overlapping writes.
    /// A detached disk is never read: writes since went to the peer alone,
    /// so it may hold older data than the peer (a disk that fails writes
    /// may still read). A write that detaches the disk holds its range
    /// until it returns, so no read of that range starts in between. (A
    /// read error fails the resync but detaches nothing: the peer, a sync
    /// target, has no complete copy to fall back on.)
    pub async fn read_for_resync(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(RangeGuard, AlignedBuf), Error> {
        let guard = self.gate.enter(offset, len).await;
        let at = self.range(offset, len)?;
        if self.is_diskless() {
            return Err(Error::DiskFailed);
        }
        let data = self.store.read(at, len as usize).await?;
        Ok((guard, data))
    }

    /// Applies a write that came from the peer (the caller holds its range).
    /// No activity-log entry: a write the peer never saw confirmed is
    /// already marked in the peer's bitmap, so this side need not remember it.
    pub async fn write_replicated(
        &self,
        offset: u64,
        data: Vec<u8>,
        flags: u32,
    ) -> Result<(), Error> {
        self.on_disk(self.apply_replicated(offset, data, flags))
            .await
    }

    async fn apply_replicated(&self, offset: u64, data: Vec<u8>, flags: u32) -> Result<(), Error> {
        let fua = flags & blkmirror_proto::message::WRITE_FLAG_FUA != 0;
        if flags & WRITE_FLAG_ZERO != 0 {
            let len = data
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("eight bytes")))
                .ok_or(Error::OutOfRange {
                    offset,
                    len: 0,
                    size: self.data_size,
                })?;
            let at = self.range(offset, len)?;
            self.store
                .zero_range(at, len, flags & WRITE_FLAG_UNMAP != 0)
                .await?;
            if fua {
                self.store.flush().await?;
            }
            return Ok(());
        }
        let at = self.range(offset, data.len() as u64)?;
        self.store
            .write(at, AlignedBuf::from_slice(&data), fua)
            .await?;
        Ok(())
    }

    /// Reads a data-area range whatever the role (for resync checksums).
    pub async fn read_local(&self, offset: u64, len: u64) -> Result<AlignedBuf, Error> {
        let at = self.range(offset, len)?;
        self.on_disk(async { Ok(self.store.read(at, len as usize).await?) })
            .await
    }

    pub async fn flush_local(&self) -> Result<(), Error> {
        self.on_disk(async { Ok(self.store.flush().await?) }).await
    }

    /// Runs I/O the peer asked for on this node's disk. A disk I/O error
    /// detaches the disk: from then on this node is Diskless, and the peer
    /// goes on without it (having marked what this node missed).
    async fn on_disk<T>(&self, io: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        if self.state.lock().unwrap().disk_failed {
            return Err(Error::DiskFailed);
        }
        let result = io.await;
        if let Err(Error::Io(e @ blkmirror_io::Error::Io { .. })) = &result {
            self.detach_failed_disk(e);
        }
        result
    }

    fn detach_failed_disk(&self, error: &blkmirror_io::Error) {
        let mut state = self.state.lock().unwrap();
        if std::mem::replace(&mut state.disk_failed, true) {
            return;
        }
        tracing::error!(
            disk = self.disk,
            %error,
            "disk I/O error: the disk is detached and this node is Diskless. Replace the disk, \
             run `create-md` on the new one and restart the node: it takes a full copy"
        );
        // Best effort (the disk may refuse this too): a restart on the same
        // disk must not take it for good data.
        if let Err(e) = self.persist(&mut state, |sb| {
            sb.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE)
        }) {
            tracing::warn!(error = %e, "could not mark the failed disk Inconsistent");
        }
        drop(state);
        // A connected peer learns it now holds the only copy.
        if let Some(link) = self.link.lock().unwrap().clone() {
            let message = self.state_message();
            tokio::spawn(async move { link.send(&message).await });
        }
    }

    /// Zeroes a range (TRIM and WRITE_ZEROES): both read back as zeroes, so
    /// replicas stay byte-identical whatever the device does with discards.
    pub async fn zero(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), Error> {
        self.disk_offset(offset, len)?;
        let end = offset + len;
        let mut at = offset;
        // A client may zero gigabytes at once; the activity log holds a
        // piece at a time.
        while at < end {
            let piece_end = end.min((at / ZERO_PIECE_BYTES + 1) * ZERO_PIECE_BYTES);
            self.zero_piece(at, piece_end - at, unmap, fua).await?;
            at = piece_end;
        }
        Ok(())
    }

    async fn zero_piece(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), Error> {
        let at = self.disk_offset(offset, len)?;
        let (route, logged) = self.prepare_write(offset, len).await?;
        let _guard = self.gate.enter(offset, len).await;
        let local = async {
            if !self.is_diskless() {
                self.store.zero_range(at, len, unmap).await?;
                if fua {
                    self.store.flush().await?;
                }
            }
            Ok::<(), Error>(())
        };
        let link = match route {
            WriteRoute::Peer(link) => link,
            WriteRoute::LocalOnly(unlinked) => {
                local.await?;
                drop(unlinked);
                return Ok(());
            }
        };
        let mut flags = peer::fua_flag(fua) | WRITE_FLAG_ZERO;
        if unmap {
            flags |= WRITE_FLAG_UNMAP;
        }
        let outgoing = self.outgoing_write(&link, offset, flags, &len.to_le_bytes());
        self.replicate(&link, outgoing, (offset, len), local, logged)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::Inbox;
    use blkmirror_config::Endpoint;

    /// A started volume on a fresh 64 MiB disk in `dir`, as node alpha.
    async fn fresh_volume(dir: &std::path::Path) -> Arc<Volume> {
        fresh_volume_with(dir, Protocol::C).await
    }

    async fn fresh_volume_with(dir: &std::path::Path, protocol: Protocol) -> Arc<Volume> {
        let disk = dir.join("alpha.img");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&disk)
            .unwrap();
        file.set_len(64 << 20).unwrap();
        let options = metadata::CreateOptions {
            node_name: "alpha",
            disk_size: 64 << 20,
            granularity: 4096,
            volume_uuid: Uuid::new_v4(),
            force: false,
        };
        metadata::create(&file, &options).unwrap();
        let volume = Volume::open("r0", &alpha_config(dir), protocol, 16).unwrap();
        volume.start().await.unwrap();
        volume
    }

    /// The node configuration `fresh_volume` used, to open its disk again.
    fn alpha_config(dir: &std::path::Path) -> NodeConfig {
        NodeConfig {
            name: "alpha".into(),
            disk: dir.join("alpha.img"),
            links: Vec::new(),
            control: dir.join("alpha.ctl"),
            nbd: Endpoint::Unix(dir.join("alpha.nbd")),
            ublk: None,
        }
    }

    /// Sends frames on `link`, which the peer never takes, until its window
    /// is full to the last unit.
    async fn fill_window(link: &Channel) {
        let large = Message::Write {
            offset: 0,
            flags: 0,
            data: vec![0; 1 << 20],
        };
        let small = Message::Barrier { epoch: 1 };
        for message in [large, small] {
            for _ in 0..300 {
                let sent = tokio::time::timeout(
                    std::time::Duration::from_millis(100),
                    link.send(&message),
                );
                if sent.await.is_err() {
                    break;
                }
            }
        }
    }

    /// Promotes `volume` (forced) over `link`, its peer answering each
    /// promotion request with the next of `errnos`; `answers` is the inbox
    /// of `link`, where the answers arrive.
    async fn promote_answered(
        volume: &Volume,
        (link, answers): (&Channel, &mut Inbox),
        (peer, inbox): (&Arc<Channel>, &mut Inbox),
        errnos: &[u32],
    ) -> Result<(), Error> {
        let answer = async {
            for &errno in errnos {
                answer_the_ask((link, &mut *answers), (peer, &mut *inbox), errno).await;
            }
        };
        let (promoted, ()) = tokio::join!(volume.promote(true), answer);
        promoted
    }

    /// The peer takes the next promotion request on `link` and answers it
    /// with `errno`; the answer reaches `link`, whose inbox is `answers`.
    async fn answer_the_ask(
        (link, answers): (&Channel, &mut Inbox),
        (peer, inbox): (&Arc<Channel>, &mut Inbox),
        errno: u32,
    ) {
        let asked = tokio::time::timeout(std::time::Duration::from_secs(10), inbox.next());
        let (seq, asked) = asked.await.expect("the peer was never asked").unwrap();
        assert!(
            matches!(asked, Message::PromoteAsk),
            "the peer is first asked, not sent a frame of kind {}",
            asked.kind()
        );
        peer.acknowledge(seq, blkmirror_proto::AckKind::Written, errno)
            .await;
        let (_, answered) = answers.next().await.unwrap();
        let Message::Ack { entries } = answered else {
            panic!("a frame of kind {} instead of the answer", answered.kind());
        };
        link.answer(&entries);
    }

    async fn promote_granted(
        volume: &Volume,
        link: (&Channel, &mut Inbox),
        peer: (&Arc<Channel>, &mut Inbox),
    ) {
        promote_answered(volume, link, peer, &[0]).await.unwrap();
    }

    /// A node with a session but no link for writes yet (a sync target
    /// until its resync ends) asks its peer before a promotion too, and
    /// the peer's refusal stands, `--force` or not.
    #[tokio::test]
    async fn a_sync_target_asks_its_peer_before_a_promotion_too() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let ((link, mut answers), (peer, mut inbox)) = peer::channel_pair(1).await;
        volume.session_began(link.clone());
        let refused = promote_answered(
            &volume,
            (&link, &mut answers),
            (&peer, &mut inbox),
            &[PROMOTION_REFUSED],
        )
        .await;
        assert!(
            matches!(refused, Err(Error::PeerRefusedPromotion)),
            "{refused:?}"
        );
        assert_eq!(volume.role(), Role::Secondary);
        assert!(!volume.state.lock().unwrap().asking_promotion);
        assert_eq!(volume.answer_promotion_ask("beta"), 0, "no longer asking");
    }

    /// A node asking to be promoted refuses its peer the same; it tells a
    /// peer whose name sorts first to ask again, and asks again itself when
    /// told so, refusing its peer meanwhile.
    #[tokio::test]
    async fn of_two_questions_that_meet_the_first_name_asks_again() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        volume.state.lock().unwrap().asking_promotion = true;
        assert_eq!(volume.answer_promotion_ask("beta"), PROMOTION_REFUSED);
        assert_eq!(volume.answer_promotion_ask("aaron"), PROMOTION_COLLIDED);
        volume.state.lock().unwrap().asking_promotion = false;
        assert_eq!(volume.answer_promotion_ask("beta"), 0);

        let ((link, mut answers), (peer, mut inbox)) = peer::channel_pair(1).await;
        volume.session_began(link.clone());
        let promoting = promote_answered(
            &volume,
            (&link, &mut answers),
            (&peer, &mut inbox),
            &[PROMOTION_COLLIDED, PROMOTION_COLLIDED, 0],
        );
        let refusing_meanwhile = async {
            while !volume.state.lock().unwrap().asking_promotion {
                tokio::task::yield_now().await;
            }
            assert_eq!(volume.answer_promotion_ask("beta"), PROMOTION_REFUSED);
        };
        let (promoted, ()) = tokio::join!(promoting, refusing_meanwhile);
        promoted.unwrap();
        assert_eq!(volume.role(), Role::Primary);
        assert_eq!(volume.answer_promotion_ask("aaron"), PROMOTION_REFUSED);
    }

    /// A node gives up asking again once the link's timeout has passed:
    /// its peer kept asking too.
    #[tokio::test]
    async fn a_node_asks_again_only_so_long() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let ((link, mut answers), (peer, mut inbox)) = peer::channel_pair(1).await;
        volume.session_began(link.clone());
        let answering_collided = async {
            loop {
                let (link, peer) = ((&*link, &mut answers), (&peer, &mut inbox));
                answer_the_ask(link, peer, PROMOTION_COLLIDED).await;
            }
        };
        let refused = tokio::time::timeout(link.timeout() * 3, async {
            tokio::select! {
                refused = volume.promote(true) => refused,
                () = answering_collided => unreachable!(),
            }
        })
        .await
        .expect("it asked on and on");
        assert!(
            matches!(refused, Err(Error::PeerRefusedPromotion)),
            "{refused:?}"
        );
        assert_eq!(volume.role(), Role::Secondary);
        assert_eq!(volume.answer_promotion_ask("beta"), 0, "no longer asking");
    }

    /// Writes a block in the background, and checks that the peer first
    /// hears this node is primary, then gets the write.
    async fn expect_primary_before_the_write(volume: &Arc<Volume>, peer: &mut Inbox) {
        let writer = volume.clone();
        let _writing = tokio::spawn(async move {
            writer
                .write(0, AlignedBuf::from_slice(&[1; 4096]), false)
                .await
        });
        let (_, first) = peer.next().await.unwrap();
        assert!(
            matches!(first, Message::State { role: 1, .. }),
            "the peer first hears a frame of kind {}",
            first.kind()
        );
        // (A barrier may come first, for the write's activity log extent.)
        loop {
            match peer.next().await.unwrap().1 {
                Message::Write { offset: 0, .. } => break,
                Message::Barrier { .. } => continue,
                other => panic!("unexpected frame of kind {}", other.kind()),
            }
        }
    }

    /// A node promoted while connected tells its peer so before any write
    /// it takes: the peer refuses writes from a node it knows as secondary.
    #[tokio::test]
    async fn a_promotion_reaches_the_peer_before_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let ((link, mut answers), (peer, mut inbox)) = peer::channel_pair(1).await;
        volume.session_began(link.clone());
        volume.set_link(Some(link.clone()));
        promote_granted(&volume, (&link, &mut answers), (&peer, &mut inbox)).await;
        expect_primary_before_the_write(&volume, &mut inbox).await;
    }

    /// A peer that takes no frames cannot hold a promotion: it loses the
    /// session once its timeout has passed, and the promotion is refused;
    /// asked again, the node goes on alone.
    #[tokio::test]
    async fn a_peer_that_takes_no_frames_does_not_hold_a_promotion() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let ((link, _), (_, _peer_never_reads)) = peer::channel_pair(1).await;
        fill_window(&link).await;
        volume.session_began(link.clone());
        volume.set_link(Some(link.clone()));
        let refused =
            tokio::time::timeout(std::time::Duration::from_secs(20), volume.promote(true))
                .await
                .expect("the promotion was held by the peer");
        assert!(
            matches!(refused, Err(Error::PromotionUnanswered(_))),
            "{refused:?}"
        );
        assert!(link.is_closed());
        assert_eq!(volume.role(), Role::Secondary);
        // At once, before the peer manager has ended the session.
        tokio::time::timeout(std::time::Duration::from_secs(1), volume.promote(true))
            .await
            .expect("the promotion asked a session that had ended")
            .unwrap();
        assert_eq!(volume.role(), Role::Primary);
    }

    /// The link a session set up again (a sync source's, once in sync)
    /// carries writes already: it sends no State to wait behind them.
    #[tokio::test]
    async fn a_link_set_up_again_sends_nothing_behind_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let ((link, _), (_, _peer_never_reads)) = peer::channel_pair(1).await;
        volume.link_up(link.clone()).await;
        fill_window(&link).await;
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            volume.link_up(link.clone()),
        )
        .await
        .expect("link_up waited for window space");
        assert!(!link.is_closed());
    }

    /// A node promoted after the handshake chose it as the sync target is
    /// not made one: the resync would overwrite what its clients see.
    #[tokio::test]
    async fn a_primary_is_never_made_a_sync_target() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        volume.promote(true).await.unwrap();
        assert!(matches!(
            volume.begin_sync_target().await,
            Err(Error::PrimaryAsSyncTarget)
        ));
        assert_eq!(volume.status().disk_state, DiskState::UpToDate);
    }

    /// A promotion between a session's Hello and its link coming up had no
    /// link to tell: the link's coming up tells the peer instead.
    #[tokio::test]
    async fn a_link_that_comes_up_after_a_promotion_says_so_first() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        volume.promote(true).await.unwrap();
        let ((link, _), (_, mut peer)) = peer::channel_pair(1).await;
        volume.link_up(link).await;
        expect_primary_before_the_write(&volume, &mut peer).await;
    }

    /// A protocol A volume promoted with its peer's leave, the peer then
    /// answering nothing; the session's ends come back to be kept open.
    async fn primary_with_a_silent_peer(
        dir: &std::path::Path,
    ) -> (Arc<Volume>, (Arc<Channel>, Inbox, Arc<Channel>, Inbox)) {
        let volume = fresh_volume_with(dir, Protocol::A).await;
        let ((link, mut answers), (peer, mut inbox)) = peer::channel_pair(1).await;
        volume.session_began(link.clone());
        volume.set_link(Some(link.clone()));
        promote_granted(&volume, (&link, &mut answers), (&peer, &mut inbox)).await;
        (volume, (link, answers, peer, inbox))
    }

    /// A protocol A write the peer never answered is marked in the bitmap
    /// that a clean shutdown writes out, however late its answer task runs:
    /// the next start, which trusts that bitmap, resyncs it.
    #[tokio::test]
    async fn a_write_unanswered_at_shutdown_is_in_the_bitmap_written_out() {
        let dir = tempfile::tempdir().unwrap();
        let (volume, _session) = primary_with_a_silent_peer(dir.path()).await;
        // From here on the peer answers nothing.
        volume
            .write(8192, AlignedBuf::from_slice(&[7; 4096]), false)
            .await
            .unwrap();
        assert_eq!(
            volume.out_of_sync_bytes(),
            0,
            "answered by protocol A at once"
        );
        assert!(volume.shutdown().await.unwrap(), "a clean shutdown");
        drop(volume);
        let reopened = reopen(dir.path()).await;
        assert!(
            reopened
                .state
                .lock()
                .unwrap()
                .superblock
                .flags
                .contains(Flags::CLEAN_SHUTDOWN),
            "the shutdown was clean"
        );
        assert!(
            reopened.tracker.any_out_of_sync(8192, 4096),
            "the unanswered write is not marked on disk"
        );
    }

    /// A resync barrier confirmed on a session clears its chunks only while
    /// the session is open: a write that the peer then missed is marked
    /// once the session is closed, and stays marked.
    #[tokio::test]
    async fn a_resync_chunk_is_in_sync_only_while_its_session_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let ((link, _answers), (_peer, _inbox)) = peer::channel_pair(1).await;
        volume.mark_out_of_sync(0, 1 << 20);
        volume.mark_in_sync_on(&link, 0, 1 << 20);
        assert_eq!(volume.out_of_sync_bytes(), 0);
        link.close("test");
        volume.mark_out_of_sync(4096, 4096);
        volume.mark_in_sync_on(&link, 0, 1 << 20);
        assert_eq!(volume.out_of_sync_bytes(), 4096);
    }

    /// A disk detached after a failed write may still read, but what it
    /// holds is older than the peer's copy wherever writes went on to the
    /// peer alone: a resync never reads it.
    #[tokio::test]
    async fn a_detached_disk_is_no_resync_source() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        assert!(volume.read_for_resync(0, 4096).await.is_ok());
        volume.detach_failed_disk(&blkmirror_io::Error::Io {
            op: "write",
            offset: 0,
            source: std::io::Error::other("a write failed"),
        });
        let read = volume.read_for_resync(0, 4096).await;
        assert!(matches!(read, Err(Error::DiskFailed)), "read anyway");
    }

    /// A secondary whose barrier fails (the session drops as it settles
    /// before `down` or `disconnect`) has written nothing its peer lacks:
    /// it starts no generation, which would pass for writes of its own.
    #[tokio::test]
    async fn a_secondary_whose_barrier_fails_keeps_its_generation() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let ((link, _answers), (_peer, _inbox)) = peer::channel_pair(1).await;
        volume.session_began(link.clone());
        volume.set_link(Some(link.clone()));
        let before = volume.state.lock().unwrap().superblock.generations;
        link.close("the session drops");
        assert!(!volume.settle_on(&link).await, "confirmed on a closed link");
        let after = volume.state.lock().unwrap().superblock.generations;
        assert_eq!(after, before);
    }

    /// Checks that the disk of `fresh_volume`, shut down, was left as a
    /// primary's crash leaves it: the next start reads the activity log.
    async fn assert_left_as_a_crash(dir: &std::path::Path) {
        let reopened = reopen(dir).await;
        let flags = reopened.state.lock().unwrap().superblock.flags;
        assert!(!flags.contains(Flags::CLEAN_SHUTDOWN), "{flags:?}");
        assert!(flags.contains(Flags::PRIMARY), "{flags:?}");
    }

    /// A client with requests under way at shutdown (its connection
    /// stopped, its writes not) leaves the disk as a crash would.
    #[tokio::test]
    async fn a_shutdown_with_a_client_attached_is_recorded_as_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        volume.promote(true).await.unwrap();
        volume.attach().unwrap();
        assert!(!volume.shutdown().await.unwrap(), "recorded as a crash");
        volume.detach();
        drop(volume);
        assert_left_as_a_crash(dir.path()).await;
    }

    /// A primary that steps down with a write its peer never answered
    /// still starts a new generation as it marks the write: the write was
    /// acknowledged (protocol A), and on reconnection the generations, not
    /// the node names, must make this node the source.
    #[tokio::test]
    async fn a_write_unanswered_after_a_goodbye_starts_a_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (volume, _session) = primary_with_a_silent_peer(dir.path()).await;
        let parted_at = volume.state.lock().unwrap().superblock.generations;
        // From here on the peer answers nothing.
        volume
            .write(8192, AlignedBuf::from_slice(&[7; 4096]), false)
            .await
            .unwrap();
        assert!(volume.say_goodbye().await, "the peer was told");
        assert_eq!(volume.role(), Role::Secondary);
        assert!(volume.shutdown().await.unwrap(), "a clean shutdown");
        drop(volume);
        let reopened = reopen(dir.path()).await;
        assert!(reopened.tracker.any_out_of_sync(8192, 4096));
        let generations = reopened.state.lock().unwrap().superblock.generations;
        assert_eq!(
            generations.bitmap, parted_at.current,
            "no new generation started for the marked write: {generations:?}"
        );
        assert_ne!(generations.current, parted_at.current);
    }

    /// Opens the disk of `fresh_volume` again, once the tasks that held the
    /// volume before have let it go.
    async fn reopen(dir: &std::path::Path) -> Arc<Volume> {
        for _ in 0..500 {
            match Volume::open("r0", &alpha_config(dir), Protocol::A, 16) {
                Ok(volume) => return volume,
                Err(_locked) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        panic!("the disk stayed locked");
    }

    /// When shutdown gives up waiting for a write's answer to be handled,
    /// it leaves the disk as a crash would: the next start reads the
    /// activity log, which still holds the write.
    #[tokio::test]
    async fn a_shutdown_that_cannot_mark_every_write_is_recorded_as_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume_with(dir.path(), Protocol::A).await;
        volume.promote(true).await.unwrap();
        // As an answer task that never runs would leave it.
        volume.unanswered_writes.send_modify(|n| *n += 1);
        assert!(!volume.shutdown().await.unwrap(), "recorded as a crash");
        drop(volume);
        assert_left_as_a_crash(dir.path()).await;
    }

    /// A promotion and the news that the peer became primary are checked
    /// against each other in one step each: while a session says the peer
    /// is primary (from its handshake on, before any link carries writes),
    /// a promotion is refused even with force, and a node that is primary
    /// refuses the news rather than record it.
    #[tokio::test]
    async fn a_promotion_and_a_primary_peer_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        volume.note_peer_role(true).unwrap();
        let refused = volume.promote(true).await.unwrap_err();
        assert!(matches!(refused, Error::TwoPrimaries), "{refused}");
        assert_eq!(volume.role(), Role::Secondary);
        let flags = volume.state.lock().unwrap().superblock.flags;
        assert!(!flags.contains(Flags::PRIMARY), "{flags:?}");

        // The session over, a forced promotion is the operator's call.
        volume.end_session();
        volume.promote(true).await.unwrap();
        let refused = volume.note_peer_role(true).unwrap_err();
        assert!(matches!(refused, Error::TwoPrimaries), "{refused}");
        let flags = volume.state.lock().unwrap().superblock.flags;
        assert!(!flags.contains(Flags::PEER_PRIMARY), "{flags:?}");
    }

    /// A peer that steps down while connected no longer bars a promotion.
    #[tokio::test]
    async fn a_peer_that_steps_down_no_longer_bars_a_promotion() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        volume.note_peer_role(true).unwrap();
        let refused = volume.promote(true).await.unwrap_err();
        assert!(matches!(refused, Error::TwoPrimaries), "{refused}");
        volume.note_peer_role(false).unwrap();
        volume.promote(true).await.unwrap();
        assert_eq!(volume.role(), Role::Primary);
    }

    /// The end of a resync that `invalidate` or a forced promotion called
    /// off while it was being recorded would undo them: it is refused.
    /// Uncalled-off, it is recorded.
    #[tokio::test]
    async fn a_resync_called_off_is_not_recorded_as_finished() {
        let dir = tempfile::tempdir().unwrap();
        let volume = fresh_volume(dir.path()).await;
        let generation = |v: &Volume| v.state.lock().unwrap().superblock.generations.current;
        let up_to_date = |v: &Volume| {
            let flags = v.state.lock().unwrap().superblock.flags;
            flags.contains(Flags::UP_TO_DATE)
        };

        volume.begin_sync_target().await.unwrap();
        volume.invalidate().unwrap();
        let refused = volume.finish_sync_target(0x1234).await.unwrap_err();
        assert!(matches!(refused, Error::ResyncCalledOff), "{refused}");
        assert_eq!(generation(&volume), 0);
        assert!(!up_to_date(&volume));

        volume.begin_sync_target().await.unwrap();
        volume.promote(true).await.unwrap();
        let forced = generation(&volume);
        let refused = volume.finish_sync_target(0x1234).await.unwrap_err();
        assert!(matches!(refused, Error::ResyncCalledOff), "{refused}");
        assert_eq!(generation(&volume), forced);

        volume.demote().await.unwrap();
        volume.begin_sync_target().await.unwrap();
        volume.finish_sync_target(0x1234).await.unwrap();
        assert_eq!(generation(&volume), 0x1234);
        assert!(up_to_date(&volume));
    }
}
