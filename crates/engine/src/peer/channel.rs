//! The channel to the peer over one or two links.
//!
//! Every sequenced frame goes out on the least-queued live link and is kept
//! until the peer says it has taken it in order (`Received`). When a link
//! dies, whatever it carried unconfirmed goes again on a live one, so losing
//! one of two links loses nothing. The receiving side restores order by
//! sequence number and drops what it already has. Frames with sequence 0
//! (handshake, ping, `Received`) belong to one link and are never resent.

use std::collections::{BTreeMap, HashMap};
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkmirror_config::LINKS_MAX;
use blkmirror_proto::message::ACK_ENTRIES_MAX;
use blkmirror_proto::{AckEntry, AckKind, Message};
use bytes::{Buf, Bytes};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::{AbortOnDrop, FrameReader, PeerError, ReceivedFrame};
use crate::tracking::LoggedWrite;

/// Bytes sent but not yet confirmed as received, over all links: bounds the
/// memory kept for resending and the receiver's reordering.
const UNCONFIRMED_BYTES_MAX: usize = 64 << 20;
/// The unit in which the unconfirmed bytes are counted.
const WINDOW_UNIT_BYTES: usize = 4096;
const WINDOW_UNITS: usize = UNCONFIRMED_BYTES_MAX / WINDOW_UNIT_BYTES;
const _: () = assert!(
    blkmirror_proto::PAYLOAD_MAX_BYTES as usize + blkmirror_proto::HEADER_BYTES
        <= UNCONFIRMED_BYTES_MAX
);
/// Frames handed to the socket in one system call, at most, and bytes: a
/// batch counts as sent before it is written, so this also bounds what a
/// broken peer can confirm early.
const WRITE_BATCH_FRAMES: usize = 64;
const WRITE_BATCH_BYTES: usize = 4 << 20;
/// Writes the peer answered before a barrier confirms them durable, at
/// most: more hurry the barrier.
const VOLATILE_WRITES_MAX: usize = 4096;
/// How long a write the peer answered waits for a barrier, at most.
const VOLATILE_AGE_MAX: Duration = Duration::from_secs(2);
/// How many `timeout`s the peer may go without answering any of the frames
/// that wait for it (its disk hung, say) before the session ends and what
/// they wrote is marked for resync, as DRBD's `ko-count` does. Pings alone
/// do not keep a peer that answers nothing.
const ANSWER_TIMEOUTS: u32 = 5;
/// How often the receiver confirms what it has taken.
const RECEIVED_INTERVAL: Duration = Duration::from_millis(5);
/// Answers waiting for a frame, at most: beyond this, whoever answers
/// waits, so a stalled window holds back the writes being answered.
const ACKS_QUEUED_MAX: usize = 4 * ACK_ENTRIES_MAX;

/// A write the peer answered and may not have made durable yet.
pub struct VolatileWrite {
    pub offset: u64,
    pub len: u64,
    /// Its activity-log extents, held until it is durable on the peer too.
    pub logged: Option<LoggedWrite>,
}

/// The peer did not confirm: the channel went away first.
#[derive(Debug)]
pub struct Lost;

/// Whoever waits for the peer's answer to one sequenced frame.
struct Waiter {
    /// Told when the peer has the frame (protocol B).
    received: Option<oneshot::Sender<()>>,
    /// Told the peer's final answer.
    written: oneshot::Sender<Answer>,
}

impl Waiter {
    fn finish(self, errno: u32, data: Vec<u8>) {
        if let Some(tx) = self.received {
            let _ = tx.send(());
        }
        let _ = self.written.send(Answer { errno, data });
    }
}

/// The frames waiting for the peer's answer.
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// When an answer from the peer last arrived (counted by the link
    /// reader, see `is_final_answer`), or it began to owe answers.
    progress: Instant,
}

/// This side's answers to the peer, waiting to go out together.
#[derive(Default)]
struct OutgoingAcks {
    entries: Vec<AckEntry>,
    /// A task is sending them: the next answers join its next `Ack`.
    sending: bool,
}

/// The peer's final answer to a frame.
pub struct Answer {
    /// 0 for success, else the peer's errno.
    pub errno: u32,
    /// What a `Read` asked for (empty otherwise, and on failure).
    pub data: Vec<u8>,
}

/// The peer's answers to one frame.
pub struct Reply {
    seq: u64,
    received: Option<oneshot::Receiver<()>>,
    written: oneshot::Receiver<Answer>,
}

impl Reply {
    /// The frame's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The peer has received the frame (asked for with `enqueue_received`).
    pub async fn received(&mut self) -> Result<(), Lost> {
        match self.received.take() {
            Some(rx) => rx.await.map_err(|_| Lost),
            None => Ok(()),
        }
    }

    /// The peer's final answer: 0, or its errno.
    pub async fn written(self) -> Result<u32, Lost> {
        self.answer().await.map(|a| a.errno)
    }

    /// The peer's final answer, with the data of a `Read`.
    pub async fn answer(self) -> Result<Answer, Lost> {
        self.written.await.map_err(|_| Lost)
    }
}

struct Unconfirmed {
    frame: Bytes,
    link: usize,
    _window: OwnedSemaphorePermit,
}

/// One live link: its queue to the socket and the tasks that serve it.
struct LinkSlot {
    /// Tells a stale task from one of the current connection.
    generation: u64,
    /// Frames for the socket, with their sequence numbers (0: unsequenced).
    queue: mpsc::UnboundedSender<(u64, Bytes)>,
    queued_bytes: Arc<AtomicUsize>,
    _tasks: Vec<AbortOnDrop<()>>,
}

struct SendState {
    next_seq: u64,
    unconfirmed: BTreeMap<u64, Unconfirmed>,
    links: [Option<LinkSlot>; LINKS_MAX],
    next_generation: u64,
    closed: bool,
}

pub struct Channel {
    volume_uuid: [u8; 16],
    timeout: Duration,
    send: Mutex<SendState>,
    window: Arc<Semaphore>,
    pending: Mutex<Pending>,
    acks: Mutex<OutgoingAcks>,
    /// Told when answers leave the queue (or are dropped).
    acks_taken: Notify,
    /// Sequenced frames received and not yet taken by the inbox.
    arrivals: Mutex<Arrivals>,
    /// Told when the frame the inbox takes next has arrived.
    arrived: Notify,
    /// Highest sequence number taken in order, and the last one confirmed
    /// on each link (every link confirms, so a link that died unnoticed
    /// does not hold the sender's window).
    taken: AtomicU64,
    confirmed: [AtomicU64; LINKS_MAX],
    /// Which links are up; all false once the channel is closed.
    links_up: watch::Sender<[bool; LINKS_MAX]>,
    closed: watch::Sender<Option<String>>,
    epoch: AtomicU64,
    /// Bytes written to each link's socket in this session.
    sent_bytes: [AtomicU64; LINKS_MAX],
    /// The highest sequence number handed to a link's socket: a peer that
    /// confirms more is broken. This keeps a peer that reads nothing from
    /// freeing the window of frames still queued here; with two links it
    /// may free those queued behind a higher one sent on the other link,
    /// which the least-queued choice of link keeps to about one window.
    handed_to_socket: AtomicU64,
    /// Writes the peer answered that no barrier it confirmed has yet made
    /// durable there, by sequence number; `None` once taken at the end of
    /// the session.
    volatile: Mutex<Option<BTreeMap<u64, VolatileWrite>>>,
    /// A barrier to make `volatile` durable is on its way or scheduled.
    barrier_scheduled: AtomicBool,
    /// Told when `volatile` holds `VOLATILE_WRITES_MAX` writes.
    volatile_full: Notify,
}

/// The receiving end: sequenced messages in order.
pub struct Inbox {
    channel: Arc<Channel>,
    closed: watch::Receiver<Option<String>>,
}

/// Sequenced frames received from every link, waiting to be taken in order.
///
/// An honest peer never has more unconfirmed than its window, and nothing
/// here is confirmed yet, so these frames fit in `WINDOW_UNITS` counted as
/// the sender counts them. A peer that sends more is broken (or hostile):
/// it loses the session instead of making this node hold without bound.
struct Arrivals {
    /// The sequence number the inbox takes next.
    next: u64,
    /// Frames at or after `next`, with the window units each one costs.
    frames: BTreeMap<u64, (Message, usize)>,
    units: usize,
}

impl Arrivals {
    /// Keeps frame `seq`, unless it is a copy of one already here or taken
    /// (sent again after a link died). True if it is the one taken next.
    fn keep(&mut self, seq: u64, message: Message, wire_bytes: usize) -> Result<bool, String> {
        if seq < self.next || self.frames.contains_key(&seq) {
            return Ok(false);
        }
        let units = wire_bytes.div_ceil(WINDOW_UNIT_BYTES);
        if self.units + units > WINDOW_UNITS {
            return Err(format!(
                "the peer sent more than its {UNCONFIRMED_BYTES_MAX}-byte window \
                 ahead of frame {}: {} frames held",
                self.next,
                self.frames.len()
            ));
        }
        self.units += units;
        self.frames.insert(seq, (message, units));
        Ok(seq == self.next)
    }

    /// The frame numbered `next`, if it has arrived.
    fn take(&mut self) -> Option<(u64, Message)> {
        let seq = self.next;
        let (message, units) = self.frames.remove(&seq)?;
        self.units -= units;
        self.next += 1;
        Some((seq, message))
    }
}

impl Channel {
    pub fn new(volume_uuid: [u8; 16], timeout: Duration) -> (Arc<Channel>, Inbox) {
        let channel = Arc::new(Channel {
            volume_uuid,
            timeout,
            send: Mutex::new(SendState {
                next_seq: 1,
                unconfirmed: BTreeMap::new(),
                links: [None, None],
                next_generation: 1,
                closed: false,
            }),
            window: Arc::new(Semaphore::new(WINDOW_UNITS)),
            pending: Mutex::new(Pending {
                waiters: HashMap::new(),
                progress: Instant::now(),
            }),
            acks: Mutex::default(),
            acks_taken: Notify::new(),
            arrivals: Mutex::new(Arrivals {
                next: 1,
                frames: BTreeMap::new(),
                units: 0,
            }),
            arrived: Notify::new(),
            taken: AtomicU64::new(0),
            confirmed: Default::default(),
            links_up: watch::channel([false; LINKS_MAX]).0,
            closed: watch::channel(None).0,
            epoch: AtomicU64::new(0),
            sent_bytes: Default::default(),
            handed_to_socket: AtomicU64::new(0),
            volatile: Mutex::new(Some(BTreeMap::new())),
            barrier_scheduled: AtomicBool::new(false),
            volatile_full: Notify::new(),
        });
        let inbox = Inbox {
            channel: channel.clone(),
            closed: channel.closed.subscribe(),
        };
        (channel, inbox)
    }

    pub fn volume_uuid(&self) -> [u8; 16] {
        self.volume_uuid
    }

    /// Remembers a write the peer answered until a barrier sent after it
    /// (`seq`) is confirmed: the peer's disk may hold it only in a volatile
    /// cache until then, so it keeps its activity-log extents too. Handed
    /// back once the session is over: the caller must treat the write as
    /// unconfirmed.
    pub fn remember_volatile(&self, seq: u64, write: VolatileWrite) -> Result<(), VolatileWrite> {
        let mut volatile = self.volatile.lock().unwrap();
        let Some(writes) = volatile.as_mut() else {
            return Err(write);
        };
        writes.insert(seq, write);
        if writes.len() >= VOLATILE_WRITES_MAX {
            self.volatile_full.notify_one();
        }
        Ok(())
    }

    /// The peer confirmed the barrier with sequence number `seq`: every
    /// write sent before it is durable there.
    pub fn durable_before(&self, seq: u64) {
        let durable = match self.volatile.lock().unwrap().as_mut() {
            Some(writes) => {
                let later = writes.split_off(&seq);
                std::mem::replace(writes, later)
            }
            None => return,
        };
        // Released outside the lock: this ends their activity-log holds.
        drop(durable);
    }

    /// Ends the record at the end of the session: the writes the peer
    /// answered and may still lose (to a power loss, say).
    pub fn take_volatile(&self) -> Vec<VolatileWrite> {
        let taken = self.volatile.lock().unwrap().take();
        taken
            .map(|writes| writes.into_values().collect())
            .unwrap_or_default()
    }

    /// Sends the barrier for volatile writes now rather than later: writes
    /// wait for the activity-log extents they hold.
    pub fn hurry_barrier(&self) {
        self.volatile_full.notify_one();
    }

    /// Whether any write the peer answered still waits for a barrier.
    pub fn holds_volatile(&self) -> bool {
        self.volatile
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|writes| !writes.is_empty())
    }

    /// Claims the scheduling of the next barrier for volatile writes:
    /// true for one caller until `barrier_sent`.
    pub fn schedule_barrier(&self) -> bool {
        !self.barrier_scheduled.swap(true, Ordering::AcqRel)
    }

    /// The scheduled barrier was answered (or the session ended).
    pub fn barrier_sent(&self) {
        self.barrier_scheduled.store(false, Ordering::Release);
    }

    /// Waits until volatile writes have waited `VOLATILE_AGE_MAX`, or sooner
    /// once they are `VOLATILE_WRITES_MAX`.
    pub async fn barrier_due(&self) {
        tokio::select! {
            _ = tokio::time::sleep(VOLATILE_AGE_MAX) => {}
            _ = self.volatile_full.notified() => {}
        }
    }

    /// Sends a barrier and waits for the peer's answer: 0 once every frame
    /// sent before it is durable there, which ends what is volatile. A peer
    /// whose flush hangs while its writes go on (answered, so the session
    /// looks alive) loses the session after as long as a silent one: what
    /// is volatile meanwhile grows with every write, and client flushes wait.
    /// The time counts from when every frame before the barrier is
    /// answered: until then the peer is still writing, not flushing.
    pub async fn barrier(&self) -> Result<u32, Lost> {
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let reply = self.enqueue(&Message::Barrier { epoch }).await?;
        let seq = reply.seq();
        let limit = self.timeout * ANSWER_TIMEOUTS;
        let written = reply.written();
        tokio::pin!(written);
        let mut flushing_since = None;
        let answer = loop {
            match tokio::time::timeout(limit / 8, &mut written).await {
                Ok(answer) => break answer,
                Err(_) if self.answers_owed_before(seq) => flushing_since = None,
                Err(_) => {
                    let since = *flushing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= limit {
                        self.close(&format!(
                            "the peer made nothing durable in {limit:?} (barrier {epoch} \
                             unanswered): its disk may hang"
                        ));
                        return Err(Lost);
                    }
                }
            }
        };
        let errno = answer?;
        if errno == 0 {
            self.durable_before(seq);
        }
        Ok(errno)
    }

    /// Queues `message` for an answer. Once this returns, the message is
    /// ordered before anything queued later.
    pub async fn enqueue(&self, message: &Message) -> Result<Reply, Lost> {
        self.push(message, Some(false))
            .await
            .map(|r| r.expect("asked"))
    }

    /// Sends a sequenced message that needs no answer.
    pub async fn send(&self, message: &Message) -> Result<(), Lost> {
        self.push(message, None).await.map(|_| ())
    }

    /// As `enqueue`, for a frame already encoded (with sequence 0: the
    /// channel stamps its own). With `with_received`, the reply also tells
    /// when the peer has received the frame (protocol B).
    pub async fn enqueue_frame(&self, frame: Vec<u8>, with_received: bool) -> Result<Reply, Lost> {
        self.push_frame(frame, Some(with_received))
            .await
            .map(|r| r.expect("asked"))
    }

    async fn push(&self, message: &Message, reply: Option<bool>) -> Result<Option<Reply>, Lost> {
        let frame = blkmirror_proto::encode_frame(message, self.volume_uuid, 0);
        self.push_frame(frame, reply).await
    }

    async fn push_frame(
        &self,
        mut frame: Vec<u8>,
        reply: Option<bool>,
    ) -> Result<Option<Reply>, Lost> {
        let units = frame.len().div_ceil(WINDOW_UNIT_BYTES) as u32;
        let permit = self
            .window
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| Lost)?;
        let mut send = self.send.lock().unwrap();
        if send.closed {
            return Err(Lost);
        }
        let seq = send.next_seq;
        let link = least_queued(&send.links, seq).ok_or(Lost)?;
        send.next_seq += 1;
        blkmirror_proto::stamp_sequence(&mut frame, seq);
        let frame = Bytes::from(frame);
        let reply = reply.map(|with_received| {
            let (written, written_rx) = oneshot::channel();
            let (received, received_rx) = if with_received {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let mut pending = self.pending.lock().unwrap();
            if pending.waiters.is_empty() {
                pending.progress = Instant::now();
            }
            pending.waiters.insert(seq, Waiter { received, written });
            Reply {
                seq,
                received: received_rx,
                written: written_rx,
            }
        });
        queue_on(&send.links, link, seq, frame.clone());
        send.unconfirmed.insert(
            seq,
            Unconfirmed {
                frame,
                link,
                _window: permit,
            },
        );
        Ok(reply)
    }

    /// Answers the peer's frame `seq` (errno 0 for success). Answers given
    /// together, such as writes that finish in one batch of completions,
    /// travel in one `Ack`: the task that sends them is queued behind the
    /// tasks already woken. Waits only while `ACKS_QUEUED_MAX` answers are
    /// queued. A lost channel needs no answer: the peer resends or resyncs
    /// what it did not hear of.
    pub async fn acknowledge(self: &Arc<Self>, seq: u64, kind: AckKind, errno: u32) {
        loop {
            // Created before the check, so no wake-up falls in between.
            let taken = self.acks_taken.notified();
            {
                let mut acks = self.acks.lock().unwrap();
                if acks.entries.len() < ACKS_QUEUED_MAX {
                    acks.entries.push(AckEntry { seq, kind, errno });
                    if !acks.sending {
                        acks.sending = true;
                        tokio::spawn(self.clone().send_acks());
                    }
                    return;
                }
            }
            taken.await;
        }
    }

    /// Sends the waiting answers, in the order given, until none are left.
    async fn send_acks(self: Arc<Self>) {
        loop {
            let entries = {
                let mut acks = self.acks.lock().unwrap();
                if acks.entries.is_empty() {
                    acks.sending = false;
                    return;
                }
                if acks.entries.len() <= ACK_ENTRIES_MAX {
                    std::mem::take(&mut acks.entries)
                } else {
                    acks.entries.drain(..ACK_ENTRIES_MAX).collect()
                }
            };
            self.acks_taken.notify_waiters();
            if self.send(&Message::Ack { entries }).await.is_err() {
                let mut acks = self.acks.lock().unwrap();
                acks.entries.clear();
                acks.sending = false;
                drop(acks);
                self.acks_taken.notify_waiters();
                return;
            }
        }
    }

    /// Routes the peer's answers to their waiters.
    pub fn answer(&self, entries: &[AckEntry]) {
        let mut pending = self.pending.lock().unwrap();
        for entry in entries {
            match entry.kind {
                AckKind::Received => {
                    let waiter = pending.waiters.get_mut(&entry.seq);
                    if let Some(tx) = waiter.and_then(|w| w.received.take()) {
                        let _ = tx.send(());
                    }
                }
                AckKind::Written => {
                    if let Some(waiter) = pending.waiters.remove(&entry.seq) {
                        waiter.finish(entry.errno, Vec::new());
                    }
                }
            }
        }
    }

    /// Routes the peer's final answer to frame `seq`, with data (a `Read`'s).
    pub fn answer_with_data(&self, seq: u64, errno: u32, data: Vec<u8>) {
        if let Some(waiter) = self.pending.lock().unwrap().waiters.remove(&seq) {
            waiter.finish(errno, data);
        }
    }

    /// The peer has taken every frame up to `upto`: forget them. A claim
    /// beyond what was sent is a broken peer.
    fn confirm(&self, upto: u64) -> Result<(), String> {
        let handed = self.handed_to_socket.load(Ordering::Acquire);
        if upto > handed {
            return Err(format!(
                "peer confirmed frame {upto}, but only frames up to {handed} were sent"
            ));
        }
        let mut send = self.send.lock().unwrap();
        let keep = send.unconfirmed.split_off(&(upto + 1));
        send.unconfirmed = keep;
        Ok(())
    }

    /// Which links are up now, and a way to wait for changes.
    pub fn links_up(&self) -> watch::Receiver<[bool; LINKS_MAX]> {
        self.links_up.subscribe()
    }

    /// Bytes written to each link in this session.
    pub fn sent_bytes(&self) -> [u64; LINKS_MAX] {
        std::array::from_fn(|i| self.sent_bytes[i].load(Ordering::Relaxed))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Returns once the channel is closed, with the reason.
    pub async fn wait_closed(&self) -> String {
        let mut closed = self.closed.subscribe();
        let reason = closed.wait_for(Option::is_some).await;
        reason.ok().and_then(|r| r.clone()).unwrap_or_default()
    }

    /// Takes an established connection as link `index` (replacing a
    /// previous one on that index) and starts serving it.
    pub(crate) fn attach(
        self: &Arc<Self>,
        index: usize,
        reader: FrameReader,
        writer: BufWriter<OwnedWriteHalf>,
    ) {
        let mut send = self.send.lock().unwrap();
        if send.closed {
            return;
        }
        let generation = send.next_generation;
        send.next_generation += 1;
        let (queue, queue_rx) = mpsc::unbounded_channel();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let tasks = vec![
            AbortOnDrop(tokio::spawn(self.clone().write_link(
                index,
                generation,
                writer,
                queue_rx,
                queued_bytes.clone(),
            ))),
            AbortOnDrop(tokio::spawn(
                self.clone().read_link(index, generation, reader),
            )),
            AbortOnDrop(tokio::spawn(self.clone().ping_link(index, generation))),
        ];
        let replaced = send.links[index].replace(LinkSlot {
            generation,
            queue,
            queued_bytes,
            _tasks: tasks,
        });
        // The peer redialled a link this side had not yet seen die: what the
        // old connection carried unconfirmed goes again on the new one.
        if replaced.is_some() {
            let state = &mut *send;
            for (&seq, entry) in state.unconfirmed.iter().filter(|(_, e)| e.link == index) {
                queue_on(&state.links, index, seq, entry.frame.clone());
            }
        }
        // The new connection has confirmed nothing yet.
        self.confirmed[index].store(0, Ordering::Relaxed);
        self.links_up
            .send_replace(std::array::from_fn(|i| send.links[i].is_some()));
        drop(send);
        drop(replaced);
        if index > 0 || self.links_up.borrow().iter().filter(|up| **up).count() > 1 {
            tracing::info!(link = index, "link to the peer is up");
        }
    }

    /// Link `index` (of `generation`) failed: what it carried unconfirmed
    /// goes again on a live link; with none left, the channel closes.
    fn link_down(&self, index: usize, generation: u64, reason: &str) {
        let mut send = self.send.lock().unwrap();
        if send.links[index]
            .as_ref()
            .is_none_or(|slot| slot.generation != generation)
        {
            return;
        }
        let dead = send.links[index].take();
        self.links_up
            .send_replace(std::array::from_fn(|i| send.links[i].is_some()));
        let Some(survivor) = least_queued(&send.links, 0) else {
            drop(send);
            self.close(reason);
            drop(dead);
            return;
        };
        tracing::warn!(
            link = index,
            survivor,
            reason,
            "link to the peer lost; carrying on over the other link"
        );
        let state = &mut *send;
        let mut resent = 0usize;
        for (&seq, entry) in state.unconfirmed.iter_mut() {
            if entry.link == index {
                entry.link = survivor;
                queue_on(&state.links, survivor, seq, entry.frame.clone());
                resent += 1;
            }
        }
        tracing::debug!(link = index, resent, "frames sent again");
        drop(send);
        // Dropped last: this may be the failing link's own task.
        drop(dead);
    }

    /// How long the peer may stay silent before a link counts as dead.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Ends the channel: every waiter hears `Lost`, every link is dropped.
    pub fn close(&self, reason: &str) {
        let links = {
            let mut send = self.send.lock().unwrap();
            send.closed = true;
            send.unconfirmed.clear();
            std::mem::take(&mut send.links)
        };
        self.window.close();
        self.pending.lock().unwrap().waiters.clear();
        self.links_up.send_replace([false; LINKS_MAX]);
        self.closed.send_if_modified(|closed| {
            if closed.is_none() {
                *closed = Some(reason.to_string());
                true
            } else {
                false
            }
        });
        drop(links);
    }

    /// Sends an unsequenced frame on link `index` (`None`: the least queued).
    fn send_unsequenced(&self, index: Option<usize>, message: &Message) {
        let frame = Bytes::from(blkmirror_proto::encode_frame(message, self.volume_uuid, 0));
        let send = self.send.lock().unwrap();
        if let Some(index) = index.or_else(|| least_queued(&send.links, 0)) {
            queue_on(&send.links, index, 0, frame);
        }
    }

    async fn write_link(
        self: Arc<Self>,
        index: usize,
        generation: u64,
        mut writer: BufWriter<OwnedWriteHalf>,
        mut queue: mpsc::UnboundedReceiver<(u64, Bytes)>,
        queued_bytes: Arc<AtomicUsize>,
    ) {
        let result: std::io::Result<()> = async {
            // Frames go to the socket straight from where they were encoded,
            // as many as are queued in one system call.
            writer.flush().await?;
            let mut socket = writer.into_inner();
            let mut batch = Vec::with_capacity(WRITE_BATCH_FRAMES);
            while let Some((seq, frame)) = queue.recv().await {
                batch.push(frame);
                let mut last_seq = seq;
                let mut written = batch[0].len();
                while batch.len() < WRITE_BATCH_FRAMES && written < WRITE_BATCH_BYTES {
                    match queue.try_recv() {
                        Ok((seq, frame)) => {
                            written += frame.len();
                            batch.push(frame);
                            last_seq = last_seq.max(seq);
                        }
                        Err(_) => break,
                    }
                }
                // Counted before the write, so the peer's confirmation can
                // never arrive first.
                self.handed_to_socket.fetch_max(last_seq, Ordering::Release);
                write_all_vectored(&mut socket, &mut batch).await?;
                queued_bytes.fetch_sub(written, Ordering::Relaxed);
                self.sent_bytes[index].fetch_add(written as u64, Ordering::Relaxed);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            self.link_down(index, generation, &format!("sending failed: {e}"));
        }
    }

    async fn read_link(self: Arc<Self>, index: usize, generation: u64, mut reader: FrameReader) {
        let reason = loop {
            let frame = match reader.next_frame().await {
                Ok(frame) => frame,
                Err(e) => break e.to_string(),
            };
            match frame {
                ReceivedFrame {
                    seq: 0,
                    message: Message::Received { upto },
                    ..
                } => {
                    if let Err(e) = self.confirm(upto) {
                        // Not the link's fault: the peer is broken.
                        self.close(&e);
                        return;
                    }
                }
                ReceivedFrame {
                    seq: 0,
                    message: Message::Ping { .. } | Message::Pong { .. },
                    ..
                } => {}
                ReceivedFrame {
                    seq: 0, message, ..
                } => {
                    break format!("unexpected unsequenced {message:?}");
                }
                ReceivedFrame {
                    seq,
                    message,
                    wire_bytes,
                } => {
                    if is_final_answer(&message) {
                        // The peer answers: whether this node has caught up
                        // with its answers is not the peer's concern.
                        self.pending.lock().unwrap().progress = Instant::now();
                    }
                    let kept = self.arrivals.lock().unwrap().keep(seq, message, wire_bytes);
                    match kept {
                        Ok(true) => self.arrived.notify_one(),
                        Ok(false) => {}
                        Err(e) => {
                            // Not the link's fault: the peer is broken.
                            self.close(&e);
                            return;
                        }
                    }
                }
            }
        };
        self.link_down(index, generation, &reason);
    }

    /// Whether the peer still owes an answer to a frame sent before `seq`.
    fn answers_owed_before(&self, seq: u64) -> bool {
        self.pending
            .lock()
            .unwrap()
            .waiters
            .keys()
            .any(|&k| k < seq)
    }

    /// Says why, if frames have waited longer than `limit` with no answer
    /// to any of them.
    fn unanswered_for(&self, limit: Duration) -> Option<String> {
        let pending = self.pending.lock().unwrap();
        let waited = pending.progress.elapsed();
        (!pending.waiters.is_empty() && waited > limit).then(|| {
            format!(
                "the peer answered none of {} frames in {:.0?}: its disk may hang",
                pending.waiters.len(),
                waited
            )
        })
    }

    /// Keeps the link visibly alive, and confirms what the inbox has taken.
    async fn ping_link(self: Arc<Self>, index: usize, generation: u64) {
        let ping_every = self.timeout / 3;
        let mut last_ping = tokio::time::Instant::now();
        let mut token = 0u64;
        loop {
            tokio::time::sleep(RECEIVED_INTERVAL).await;
            let taken = self.taken.load(Ordering::Relaxed);
            if taken > self.confirmed[index].load(Ordering::Relaxed) {
                self.confirmed[index].store(taken, Ordering::Relaxed);
                self.send_unsequenced(Some(index), &Message::Received { upto: taken });
            }
            if last_ping.elapsed() >= ping_every {
                if let Some(silence) = self.unanswered_for(self.timeout * ANSWER_TIMEOUTS) {
                    self.close(&silence);
                    return;
                }
                last_ping = tokio::time::Instant::now();
                token += 1;
                self.send_unsequenced(Some(index), &Message::Ping { token });
            }
            let send = self.send.lock().unwrap();
            if send.links[index]
                .as_ref()
                .is_none_or(|slot| slot.generation != generation)
            {
                return;
            }
        }
    }
}

impl Inbox {
    /// The next sequenced message, in order.
    pub async fn next(&mut self) -> Result<(u64, Message), PeerError> {
        loop {
            if let Some(reason) = self.closed.borrow().clone() {
                return Err(PeerError::LinksLost(reason));
            }
            let taken = self.channel.arrivals.lock().unwrap().take();
            if let Some((seq, message)) = taken {
                self.channel.taken.store(seq, Ordering::Relaxed);
                return Ok((seq, message));
            }
            // A wake-up given before this wait is kept for it (`notify_one`).
            tokio::select! {
                _ = self.channel.arrived.notified() => {}
                _ = self.closed.changed() => {}
            }
        }
    }
}

/// Writes every frame of `batch` (and empties it), a system call for as
/// many as the socket takes at once.
async fn write_all_vectored(
    socket: &mut OwnedWriteHalf,
    batch: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let slices: Vec<IoSlice<'_>> = batch[first..].iter().map(|f| IoSlice::new(f)).collect();
        let mut n = socket.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let frame = &mut batch[first];
            let taken = n.min(frame.len());
            frame.advance(taken);
            n -= taken;
            if frame.is_empty() {
                first += 1;
            }
        }
    }
    batch.clear();
    Ok(())
}

/// Whether `message` finishes something the peer was asked (an answer that
/// it merely received the frame does not).
fn is_final_answer(message: &Message) -> bool {
    match message {
        Message::Ack { entries } => entries.iter().any(|e| e.kind == AckKind::Written),
        Message::ReadReply { .. } => true,
        _ => false,
    }
}

/// The live link with the fewest bytes waiting; ties go round by `turn`,
/// so two idle links share the traffic.
fn least_queued(links: &[Option<LinkSlot>; LINKS_MAX], turn: u64) -> Option<usize> {
    (0..LINKS_MAX)
        .map(|k| (k + turn as usize) % LINKS_MAX)
        .filter_map(|i| Some((i, links[i].as_ref()?.queued_bytes.load(Ordering::Relaxed))))
        .min_by_key(|&(_, queued)| queued)
        .map(|(i, _)| i)
}

fn queue_on(links: &[Option<LinkSlot>; LINKS_MAX], index: usize, seq: u64, frame: Bytes) {
    if let Some(slot) = &links[index] {
        slot.queued_bytes.fetch_add(frame.len(), Ordering::Relaxed);
        let _ = slot.queue.send((seq, frame));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::BufReader;
    use tokio::net::{TcpSocket, TcpStream};

    const UUID: [u8; 16] = [7; 16];

    type Ends = (FrameReader, BufWriter<OwnedWriteHalf>);

    /// One loopback TCP connection: the two ends' reader and writer.
    async fn connection() -> (Ends, Ends) {
        connection_buffered(None).await
    }

    /// The same, with the socket buffers `buffer_bytes` long: from the
    /// first end to the second, few bytes are in flight.
    async fn connection_buffered(buffer_bytes: Option<u32>) -> (Ends, Ends) {
        let listening = TcpSocket::new_v4().unwrap();
        let connecting = TcpSocket::new_v4().unwrap();
        if let Some(bytes) = buffer_bytes {
            listening.set_send_buffer_size(bytes).unwrap();
            connecting.set_recv_buffer_size(bytes).unwrap();
        }
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(1).unwrap();
        let (a, b) = tokio::join!(
            connecting.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let ends = |stream: TcpStream| {
            let (r, w) = stream.into_split();
            let mut reader = FrameReader::new(BufReader::new(r), Duration::from_secs(2));
            reader.trust(UUID);
            (reader, BufWriter::new(w))
        };
        (ends(b.unwrap().0), ends(a.unwrap()))
    }

    /// Two channels joined by `links` connections.
    pub(crate) async fn pair(links: usize) -> ((Arc<Channel>, Inbox), (Arc<Channel>, Inbox)) {
        pair_timed(links, Duration::from_secs(2)).await
    }

    async fn pair_timed(
        links: usize,
        timeout: Duration,
    ) -> ((Arc<Channel>, Inbox), (Arc<Channel>, Inbox)) {
        let a = Channel::new(UUID, timeout);
        let b = Channel::new(UUID, timeout);
        for index in 0..links {
            let ((ra, wa), (rb, wb)) = connection().await;
            a.0.attach(index, ra, wa);
            b.0.attach(index, rb, wb);
        }
        (a, b)
    }

    fn write(n: u64) -> Message {
        Message::Write {
            offset: n * 4096,
            flags: 0,
            data: n.to_le_bytes().repeat(64),
        }
    }

    /// Receives `count` messages and checks they are writes `first..` in order.
    async fn expect_in_order(inbox: &mut Inbox, first: u64, count: u64) {
        for n in first..first + count {
            let (_, message) = tokio::time::timeout(Duration::from_secs(10), inbox.next())
                .await
                .expect("a message in time")
                .unwrap();
            assert_eq!(message, write(n), "message {n} in order");
        }
    }

    #[tokio::test]
    async fn two_links_deliver_in_order_and_share_the_load() {
        let ((a, _a_inbox), (_b, mut b_inbox)) = pair(2).await;
        for n in 0..2000 {
            a.send(&write(n)).await.unwrap();
        }
        expect_in_order(&mut b_inbox, 0, 2000).await;
        let sent = a.sent_bytes();
        assert!(
            sent[0] > 0 && sent[1] > 0,
            "both links carried frames: {sent:?}"
        );
    }

    #[tokio::test]
    async fn a_dead_link_loses_nothing_and_a_replaced_one_takes_over() {
        let ((a, _a_inbox), (b, mut b_inbox)) = pair(2).await;
        for n in 0..500 {
            a.send(&write(n)).await.unwrap();
        }
        // Link 1 dies on b's side only; a learns of it from the closed socket
        // and sends again what link 1 carried unconfirmed.
        b.send.lock().unwrap().links[1] = None;
        for n in 500..1000 {
            a.send(&write(n)).await.unwrap();
        }
        expect_in_order(&mut b_inbox, 0, 1000).await;
        // A new connection replaces link 0 on both sides while a still holds
        // the old one: its unconfirmed frames move to the new connection.
        for n in 1000..1500 {
            a.send(&write(n)).await.unwrap();
        }
        assert!(
            a.send
                .lock()
                .unwrap()
                .unconfirmed
                .values()
                .any(|e| e.link == 0),
            "link 0 holds unconfirmed frames to move"
        );
        let ((ra, wa), (rb, wb)) = connection().await;
        a.attach(0, ra, wa);
        b.attach(0, rb, wb);
        expect_in_order(&mut b_inbox, 1000, 500).await;
        // Everything was confirmed in the end: the window is whole again.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !a.send.lock().unwrap().unconfirmed.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("every frame confirmed");
    }

    /// Why `channel` closes, once it does.
    async fn closing_reason(channel: &Channel) -> String {
        let mut closed = channel.closed.subscribe();
        let reason =
            tokio::time::timeout(Duration::from_secs(10), closed.wait_for(Option::is_some))
                .await
                .expect("closed in time")
                .unwrap()
                .clone();
        reason.unwrap()
    }

    /// A frame of `units` window units exactly, numbered `seq`.
    fn frame_of_units(seq: u64, units: usize) -> Vec<u8> {
        let overhead = blkmirror_proto::encode_frame(&write_of(0, 0), UUID, seq).len();
        let frame = blkmirror_proto::encode_frame(
            &write_of(seq, units * WINDOW_UNIT_BYTES - overhead),
            UUID,
            seq,
        );
        assert_eq!(frame.len(), units * WINDOW_UNIT_BYTES);
        frame
    }

    fn write_of(seq: u64, len: usize) -> Message {
        Message::Write {
            offset: seq * 4096,
            flags: 0,
            data: vec![seq as u8; len],
        }
    }

    #[tokio::test]
    async fn a_peer_that_sends_beyond_its_window_loses_the_session() {
        let (b, mut b_inbox) = Channel::new(UUID, Duration::from_secs(2));
        let ((reader, writer), (_raw_reader, mut raw)) = connection().await;
        b.attach(0, reader, writer);
        // Frames 1 to 65 fill the window exactly; 1 comes last.
        let units = |seq| match seq {
            1 => 1,
            65 => WINDOW_UNITS / 64 - 1,
            _ => WINDOW_UNITS / 64,
        };
        for seq in 2..=65 {
            raw.write_all(&frame_of_units(seq, units(seq)))
                .await
                .unwrap();
        }
        // Copies of frames already held (as a redialled link resends) cost
        // nothing.
        for seq in [2, 30, 65] {
            raw.write_all(&frame_of_units(seq, units(seq)))
                .await
                .unwrap();
        }
        raw.write_all(&frame_of_units(1, 1)).await.unwrap();
        raw.flush().await.unwrap();
        let (seq, message) = tokio::time::timeout(Duration::from_secs(10), b_inbox.next())
            .await
            .expect("frame 1 in time")
            .unwrap();
        assert_eq!(seq, 1);
        assert!(matches!(message, Message::Write { offset: 4096, .. }));
        assert!(!b.is_closed(), "a full window and copies are within bounds");
        assert_eq!(b.arrivals.lock().unwrap().units, WINDOW_UNITS - 1);
        // Frame 1 taken frees its unit, and no more: two is a broken peer.
        raw.write_all(&frame_of_units(66, 2)).await.unwrap();
        raw.flush().await.unwrap();
        let reason = closing_reason(&b).await;
        assert!(reason.contains("window"), "{reason}");
        assert!(
            matches!(b_inbox.next().await, Err(PeerError::LinksLost(_))),
            "the inbox ends with the session"
        );
    }

    #[tokio::test]
    async fn a_peer_that_confirms_frames_it_cannot_have_loses_the_session() {
        let (a, _a_inbox) = Channel::new(UUID, Duration::from_secs(2));
        let ((reader, writer), (_raw_reader, mut raw)) = connection_buffered(Some(64 << 10)).await;
        a.attach(0, reader, writer);
        // The raw end reads nothing: the socket fills, the rest waits here.
        let mut last = 0;
        for n in 0..48 {
            let frame = blkmirror_proto::encode_frame(&write_of(n, 1 << 20), UUID, 0);
            last = a.enqueue_frame(frame, false).await.unwrap().seq();
        }
        let queued = || {
            a.send.lock().unwrap().links[0]
                .as_ref()
                .unwrap()
                .queued_bytes
                .load(Ordering::Relaxed)
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while queued() < 16 << 20 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("frames wait for the socket");
        let received = Message::Received { upto: last };
        raw.write_all(&blkmirror_proto::encode_frame(&received, UUID, 0))
            .await
            .unwrap();
        raw.flush().await.unwrap();
        let reason = closing_reason(&a).await;
        assert!(
            reason.contains(&format!("confirmed frame {last}")),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn a_peer_that_takes_frames_but_answers_none_loses_the_session() {
        let timeout = Duration::from_millis(400);
        let deadline = timeout * ANSWER_TIMEOUTS;
        let ((a, mut a_inbox), (b, mut b_inbox)) = pair_timed(1, timeout).await;
        // Answered writes keep the session well past the deadline.
        let start = Instant::now();
        while start.elapsed() < deadline * 2 {
            let answered = answered_write((&a, &mut a_inbox), (&b, &mut b_inbox));
            let answer = tokio::time::timeout(Duration::from_secs(10), answered).await;
            assert_eq!(answer.expect("answered in time").unwrap(), 0);
            tokio::time::sleep(timeout / 2).await;
        }
        assert!(!a.is_closed());
        // Then b takes a write and never answers it, while its pings go on.
        let reply = a.enqueue(&write(2)).await.unwrap();
        let (_, message) = b_inbox.next().await.unwrap();
        assert_eq!(message, write(2));
        let reason = closing_reason(&a).await;
        assert!(reason.contains("answered none of 1 frames"), "{reason}");
        assert!(start.elapsed() > deadline * 2 + deadline);
        assert!(
            reply.written().await.is_err(),
            "the write is lost, not answered"
        );
    }

    /// A peer that answers writes but never a barrier (its flush hangs)
    /// loses the session once the barrier has waited as long as a silent
    /// peer would be given.
    #[tokio::test]
    async fn a_peer_whose_flush_hangs_loses_the_session() {
        let timeout = Duration::from_millis(200);
        let deadline = timeout * ANSWER_TIMEOUTS;
        let ((a, mut a_inbox), (b, mut b_inbox)) = pair_timed(1, timeout).await;
        let start = Instant::now();
        let barrier = {
            let a = a.clone();
            tokio::spawn(async move { a.barrier().await })
        };
        let (_, message) = b_inbox.next().await.unwrap();
        assert!(matches!(message, Message::Barrier { .. }), "{message:?}");
        // Writes after it are answered all along.
        while !a.is_closed() && start.elapsed() < deadline * 3 {
            let _ = answered_write((&a, &mut a_inbox), (&b, &mut b_inbox)).await;
            tokio::time::sleep(timeout / 4).await;
        }
        let barrier = tokio::time::timeout(Duration::from_secs(10), barrier).await;
        let barrier = barrier.expect("the barrier waits on and on");
        assert!(barrier.unwrap().is_err(), "the barrier was answered");
        let reason = closing_reason(&a).await;
        assert!(reason.contains("made nothing durable"), "{reason}");
        assert!(start.elapsed() >= deadline);
    }

    /// A barrier behind writes the peer is slow to answer waits for them:
    /// its time counts only once they are answered.
    #[tokio::test]
    async fn a_barrier_waits_as_long_as_the_writes_before_it() {
        let timeout = Duration::from_millis(100);
        let deadline = timeout * ANSWER_TIMEOUTS;
        let ((a, mut a_inbox), (b, mut b_inbox)) = pair_timed(1, timeout).await;
        let slow = a.enqueue(&write(1)).await.unwrap();
        let (slow_seq, _) = b_inbox.next().await.unwrap();
        let barrier = {
            let a = a.clone();
            tokio::spawn(async move { a.barrier().await })
        };
        let (barrier_seq, _) = b_inbox.next().await.unwrap();
        // Later writes are answered, so the peer is seen alive.
        let start = Instant::now();
        while start.elapsed() < deadline * 2 {
            answered_write((&a, &mut a_inbox), (&b, &mut b_inbox))
                .await
                .unwrap();
            tokio::time::sleep(timeout / 4).await;
        }
        for seq in [slow_seq, barrier_seq] {
            b.acknowledge(seq, AckKind::Written, 0).await;
            let (arrived, _) = answers(&mut a_inbox, 1).await;
            a.answer(&arrived);
        }
        assert_eq!(slow.written().await.unwrap(), 0);
        let answered = barrier.await.unwrap();
        assert!(matches!(answered, Ok(0)), "{:?}", a.closed.borrow());
        assert!(!a.is_closed());
    }

    #[tokio::test]
    async fn a_barrier_ends_what_was_volatile_before_it_and_the_rest_is_handed_back() {
        let (a, _inbox) = Channel::new([0; 16], Duration::from_secs(6));
        let write = |offset, len| VolatileWrite {
            offset,
            len,
            logged: None,
        };
        for seq in [3, 5, 9] {
            assert!(a.remember_volatile(seq, write(seq << 12, 4096)).is_ok());
        }
        a.durable_before(5);
        assert!(a.remember_volatile(4, write(4 << 12, 512)).is_ok()); // answered late
        let mut left: Vec<_> = a
            .take_volatile()
            .iter()
            .map(|w| (w.offset, w.len))
            .collect();
        left.sort_unstable();
        assert_eq!(left, [(4 << 12, 512), (5 << 12, 4096), (9 << 12, 4096)]);
        assert!(
            a.remember_volatile(10, write(0, 1)).is_err(),
            "the session is over"
        );
        assert!(a.take_volatile().is_empty());
    }

    #[tokio::test]
    async fn answers_reach_their_waiters_and_a_closed_channel_fails_them() {
        let ((a, _a_inbox), (b, mut b_inbox)) = pair(1).await;
        let reply = a.enqueue(&write(1)).await.unwrap();
        let (seq, _) = b_inbox.next().await.unwrap();
        b.acknowledge(seq, AckKind::Written, 0).await;
        let mut a_inbox = _a_inbox;
        let (_, ack) = a_inbox.next().await.unwrap();
        let Message::Ack { entries } = ack else {
            panic!("expected an Ack, got {ack:?}");
        };
        a.answer(&entries);
        assert_eq!(reply.written().await.unwrap(), 0);
        let pending = a.enqueue(&write(2)).await.unwrap();
        a.close("test");
        assert!(
            pending.written().await.is_err(),
            "a closed channel fails its waiters"
        );
        assert!(a.send(&write(3)).await.is_err());
    }

    #[tokio::test]
    async fn answers_given_together_travel_together_in_order() {
        let ((_a, mut a_inbox), (b, _b_inbox)) = pair(1).await;
        let total = 2 * ACK_ENTRIES_MAX as u64 + 100;
        let given: Vec<AckEntry> = (1..=total)
            .map(|seq| AckEntry {
                seq,
                kind: if seq % 3 == 0 {
                    AckKind::Received
                } else {
                    AckKind::Written
                },
                errno: (seq % 7) as u32,
            })
            .collect();
        for entry in &given {
            b.acknowledge(entry.seq, entry.kind, entry.errno).await;
        }
        let (arrived, frames) = answers(&mut a_inbox, given.len()).await;
        assert_eq!(arrived, given);
        assert_eq!(frames, 3, "as few frames as the largest Ack allows");

        // Once the channel is lost, answers are dropped, not kept.
        b.close("test");
        b.acknowledge(1, AckKind::Written, 0).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            while b.acks.lock().unwrap().sending {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the sender gives up");
        assert!(b.acks.lock().unwrap().entries.is_empty());
    }

    /// Sends a write from `a` that `b` answers at once with 0; `a`'s answer
    /// (`Lost` if the session closes first, as it may at any moment).
    async fn answered_write(
        (a, a_inbox): (&Channel, &mut Inbox),
        (b, b_inbox): (&Arc<Channel>, &mut Inbox),
    ) -> Result<u32, Lost> {
        let reply = a.enqueue(&write(1)).await?;
        let Ok((seq, _)) = b_inbox.next().await else {
            return Err(Lost);
        };
        b.acknowledge(seq, AckKind::Written, 0).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), a_inbox.next()).await;
        match answer.expect("an answer in time") {
            Ok((_, Message::Ack { entries })) => a.answer(&entries),
            Ok((_, other)) => panic!("expected an Ack, got {other:?}"),
            Err(_) => return Err(Lost),
        }
        reply.written().await
    }

    /// Receives Acks until `count` answers have come: the answers, and how
    /// many frames brought them.
    async fn answers(inbox: &mut Inbox, count: usize) -> (Vec<AckEntry>, usize) {
        let (mut arrived, mut frames) = (Vec::new(), 0);
        while arrived.len() < count {
            let (_, message) = tokio::time::timeout(Duration::from_secs(10), inbox.next())
                .await
                .expect("answers in time")
                .unwrap();
            let Message::Ack { entries } = message else {
                panic!("expected an Ack, got {message:?}");
            };
            frames += 1;
            arrived.extend(entries);
        }
        (arrived, frames)
    }

    fn written(seqs: std::ops::RangeInclusive<u64>) -> Vec<AckEntry> {
        seqs.map(|seq| AckEntry {
            seq,
            kind: AckKind::Written,
            errno: 0,
        })
        .collect()
    }

    /// Fills `channel`'s window, then answers frame 1: its Ack is taken
    /// for sending and waits, until the returned permits are dropped.
    async fn hold_the_first_ack(channel: &Arc<Channel>) -> OwnedSemaphorePermit {
        let window = channel
            .window
            .clone()
            .acquire_many_owned(WINDOW_UNITS as u32)
            .await
            .unwrap();
        channel.acknowledge(1, AckKind::Written, 0).await;
        tokio::task::yield_now().await;
        assert!(
            channel.acks.lock().unwrap().entries.is_empty(),
            "1 is being sent"
        );
        window
    }

    #[tokio::test]
    async fn answers_given_while_a_send_waits_join_the_next_ack() {
        let ((_a, mut a_inbox), (b, _b_inbox)) = pair(1).await;
        let window = hold_the_first_ack(&b).await;
        for seq in 2..=10 {
            b.acknowledge(seq, AckKind::Written, 0).await;
        }
        tokio::task::yield_now().await;
        b.acknowledge(11, AckKind::Written, 0).await;
        drop(window);
        let (arrived, frames) = answers(&mut a_inbox, 11).await;
        assert_eq!(arrived, written(1..=11));
        assert_eq!(frames, 2, "one sender: 2 to 11 went together");
    }

    #[tokio::test]
    async fn a_full_queue_of_answers_makes_the_next_one_wait() {
        let ((_a, mut a_inbox), (b, _b_inbox)) = pair(1).await;
        let window = hold_the_first_ack(&b).await;
        // The queue fills behind it.
        let last = ACKS_QUEUED_MAX as u64 + 2;
        for seq in 2..last {
            b.acknowledge(seq, AckKind::Written, 0).await;
        }
        let blocked = b.acknowledge(last, AckKind::Written, 0);
        tokio::pin!(blocked);
        assert!(
            blocked.as_mut().now_or_never().is_none(),
            "no room: the answer waits"
        );
        drop(window);
        tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("room once the window opens");
        let (arrived, _) = answers(&mut a_inbox, last as usize).await;
        assert_eq!(arrived, written(1..=last));
    }
}
