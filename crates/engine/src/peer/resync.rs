//! Moving out-of-sync ranges to the peer (resync) and comparing both
//! replicas by checksum (verify), paced so application I/O comes first.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkmirror_metadata::layout::GRANULARITY_MAX_BYTES;
use blkmirror_proto::message::WRITE_FLAG_ZERO;
use blkmirror_proto::{bitmap_runs, Message, HEADER_BYTES};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::channel::{Channel, Lost};
use super::Peer;
use crate::volume::Volume;

/// Largest chunk a resync moves in one message.
pub const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
// A chunk that began on a granule boundary and ended inside the granule
// would leave that granule dirty, and the resync would never end.
const _: () = assert!(RESYNC_CHUNK_BYTES.is_multiple_of(GRANULARITY_MAX_BYTES as u64));
/// Chunks in flight while the application is idle: enough to keep two links
/// and both disks busy.
pub const RESYNC_WINDOW_IDLE: usize = 16;
/// Chunks in flight while the application writes: resync yields, yet keeps
/// moving, so it converges under a continuous write load.
pub const RESYNC_WINDOW_BUSY: usize = 2;
/// Application writes this recent count as "busy".
const APPLICATION_QUIET: Duration = Duration::from_millis(100);

/// The answer to a ResyncChecksum whose chunk differs on the target.
pub const CHECKSUM_DIFFERS: u32 = u32::MAX;

/// How a resync chunk travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Data,
    Zero,
    /// Only its checksum, and it matched.
    Checksum,
}

/// Paces resync: the window of chunks in flight shrinks while the
/// application writes, so its I/O comes first, yet never to zero, so resync
/// converges under a continuous write load.
pub struct Pace {
    writes_seen: u64,
    writes_changed: Instant,
}

impl Pace {
    pub fn new() -> Pace {
        Pace {
            writes_seen: 0,
            writes_changed: Instant::now() - APPLICATION_QUIET,
        }
    }

    /// Chunks that may be in flight now.
    pub fn window(&mut self, volume: &Volume) -> usize {
        let writes = volume.application_writes();
        if writes != self.writes_seen {
            self.writes_seen = writes;
            self.writes_changed = Instant::now();
        }
        if self.writes_changed.elapsed() < APPLICATION_QUIET {
            RESYNC_WINDOW_BUSY
        } else {
            RESYNC_WINDOW_IDLE
        }
    }
}

/// `resync-rate-max`: a hard cap on the data resync (and verify) moves, in
/// bytes per second. Chunks that travel as a zeroing command or only as a
/// checksum that matched are not charged: they cost the network nothing.
pub struct RateCap {
    bytes_per_s: u64,
    /// When the bytes admitted so far may all have gone at the cap.
    allowed_until: Mutex<Instant>,
}

impl RateCap {
    pub fn new(bytes_per_s: Option<u64>) -> Option<Arc<RateCap>> {
        bytes_per_s.map(|bytes_per_s| {
            Arc::new(RateCap {
                bytes_per_s: bytes_per_s.max(1),
                allowed_until: Mutex::new(Instant::now()),
            })
        })
    }

    /// Waits until `len` more bytes fit under the cap.
    pub async fn admit(&self, len: u64) {
        let wait = {
            let mut until = self.allowed_until.lock().unwrap();
            let now = Instant::now();
            // No credit for idle time.
            if *until < now {
                *until = now;
            }
            let wait = *until - now;
            *until += Duration::from_secs_f64(len as f64 / self.bytes_per_s as f64);
            wait
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Whether, in a full copy, sending a chunk's checksum before its data is
/// worth it: it is while checksums keep matching (a replaced disk that is
/// mostly right), not on a disk that matches nowhere (a first build), where
/// it only adds a round trip and a read on the target. Every
/// `CHECKSUM_PROBE_EVERY`th chunk still goes by checksum, to notice a change.
pub struct ChecksumOdds {
    /// Recent share of matching checksums, in thousandths (a moving average).
    hits_per_mille: AtomicU32,
    chunks: AtomicU64,
}

const CHECKSUM_PROBE_EVERY: u64 = 16;
const CHECKSUM_WORTH_PER_MILLE: u32 = 250;

impl ChecksumOdds {
    pub fn new() -> ChecksumOdds {
        ChecksumOdds {
            hits_per_mille: AtomicU32::new(1000),
            chunks: AtomicU64::new(0),
        }
    }

    fn worth_it(&self) -> bool {
        let n = self.chunks.fetch_add(1, Ordering::Relaxed);
        n.is_multiple_of(CHECKSUM_PROBE_EVERY)
            || self.hits_per_mille.load(Ordering::Relaxed) >= CHECKSUM_WORTH_PER_MILLE
    }

    fn record(&self, hit: bool) {
        let old = self.hits_per_mille.load(Ordering::Relaxed);
        let new = (old * 7 + if hit { 1000 } else { 0 }) / 8;
        self.hits_per_mille.store(new, Ordering::Relaxed);
    }
}

/// Copies one chunk to the peer; returns it once the peer has answered.
/// It is durable there, and in sync, only after a barrier sent after it.
async fn resync_chunk(
    volume: &Volume,
    link: &Channel,
    peer: &Peer,
    offset: u64,
    len: u64,
    checksum_first: Option<&ChecksumOdds>,
    cap: Option<&RateCap>,
) -> Result<(u64, u64), String> {
    let lost = |_: Lost| "link lost during resync".to_string();
    // Reading and queueing under the range gate orders this chunk before
    // any application write to the same range.
    let (mut guard, mut data) = volume
        .read_for_resync(offset, len)
        .await
        .map_err(|e| e.to_string())?;
    // An all-zero chunk travels as a zeroing command, not as data: a new or
    // mostly empty disk rebuilds at little cost. In a full copy onto a disk
    // that may already be mostly right, only the checksum goes first.
    let mut kind = if is_zero(&data) {
        ChunkKind::Zero
    } else if checksum_first.is_some_and(ChecksumOdds::worth_it) {
        ChunkKind::Checksum
    } else {
        ChunkKind::Data
    };
    if let (ChunkKind::Data, Some(cap)) = (kind, cap) {
        // Never wait holding the range: let writes pass, then read afresh.
        drop(guard);
        cap.admit(len).await;
        (guard, data) = volume
            .read_for_resync(offset, len)
            .await
            .map_err(|e| e.to_string())?;
    }
    let message = match kind {
        ChunkKind::Zero => Message::Write {
            offset,
            flags: WRITE_FLAG_ZERO,
            data: len.to_le_bytes().to_vec(),
        },
        ChunkKind::Checksum => Message::ResyncChecksum {
            offset,
            len: len as u32,
            digest: blkmirror_proto::chunk_digest(&data),
        },
        ChunkKind::Data => Message::ResyncData {
            offset,
            data: data.to_vec(),
        },
    };
    let reply = link.enqueue(&message).await;
    drop(guard);
    let mut answer = reply.map_err(lost)?.written().await.map_err(lost)?;
    if let (ChunkKind::Checksum, Some(odds)) = (kind, checksum_first) {
        odds.record(answer != CHECKSUM_DIFFERS);
    }
    if kind == ChunkKind::Checksum && answer == CHECKSUM_DIFFERS {
        // It differs after all: send the data, read afresh under the gate.
        if let Some(cap) = cap {
            cap.admit(len).await;
        }
        answer = send_range(volume, link, offset, len, "resync", |data| {
            Message::ResyncData {
                offset,
                data: data.to_vec(),
            }
        })
        .await?;
        kind = ChunkKind::Data;
    }
    if answer != 0 {
        return Err(format!(
            "peer failed to write resync data at {offset}: errno {answer}"
        ));
    }
    peer.progress(len, kind);
    Ok((offset, len))
}

/// Resync chunks the peer has answered, waiting for a barrier to make them
/// durable there before they count as in sync: a target that lost power
/// could otherwise lose them from its disk's volatile cache, and no bit
/// would say so.
#[derive(Default)]
struct Answered {
    chunks: Vec<(u64, u64)>,
    bytes: u64,
}

/// Answered chunks that wait for a barrier, at most: then one is sent.
const ANSWERED_BYTES_MAX: u64 = 64 << 20;

impl Answered {
    fn add(&mut self, (offset, len): (u64, u64)) {
        self.chunks.push((offset, len));
        self.bytes += len;
    }

    /// Sends a barrier for the chunks answered so far, in a task of
    /// `barriers`; the task marks them in sync once the peer confirms it.
    fn barrier(
        &mut self,
        volume: &Arc<Volume>,
        link: &Arc<Channel>,
        barriers: &mut tokio::task::JoinSet<Result<(), String>>,
    ) {
        let chunks = std::mem::take(&mut self.chunks);
        self.bytes = 0;
        let (volume, link) = (volume.clone(), link.clone());
        barriers.spawn(async move {
            let errno = link
                .barrier()
                .await
                .map_err(|_: Lost| "link lost during resync".to_string())?;
            if errno != 0 {
                return Err(format!("peer failed to flush resync data: errno {errno}"));
            }
            for (offset, len) in chunks {
                volume.mark_in_sync_on(&link, offset, len);
            }
            Ok(())
        });
    }
}

/// Reads a range under the range gate and queues what `build` makes of it,
/// so it is ordered before any later write to the range; returns the peer's
/// answer. `during` names the work for the error when the link is lost.
async fn send_range(
    volume: &Volume,
    link: &Channel,
    offset: u64,
    len: u64,
    during: &str,
    build: impl FnOnce(&[u8]) -> Message,
) -> Result<u32, String> {
    let lost = |_: Lost| format!("link lost during {during}");
    let (guard, data) = volume
        .read_for_resync(offset, len)
        .await
        .map_err(|e| e.to_string())?;
    let reply = link.enqueue(&build(&data)).await;
    drop(guard);
    reply.map_err(lost)?.written().await.map_err(lost)
}

/// True when every byte is zero (checked eight bytes at a time).
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(8);
    words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("eight bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Splits a byte range into resync chunks.
pub fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    pieces(offset, len, RESYNC_CHUNK_BYTES)
}

/// Splits a byte range into pieces of at most `max` bytes.
fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    (offset..end)
        .step_by(max as usize)
        .map(move |o| (o, (end - o).min(max)))
}

/// Longest range one `ResyncRequest` reports (its length is a u32).
const REPORTED_RANGE_MAX_BYTES: u64 = 1 << 30;

/// What a sync target tells the source about page `index` of its dirty
/// bitmap: the ranges it changed there, which the source must send back.
pub fn report_dirty_page(volume: &Volume, index: usize) -> Vec<Message> {
    match volume.dirty_page_bits(index) {
        Some((first_bit, bits)) => {
            report_page(first_bit, bits, volume.granularity(), volume.data_size())
        }
        None => Vec::new(),
    }
}

/// One page of a dirty bitmap as messages: a `ResyncRequest` per range
/// where they are few, or else the page's bits in one `Bitmap` message,
/// whichever is shorter on the wire. A page scattered with small writes
/// costs one message, not thousands.
fn report_page(first_bit: u64, bits: Vec<u8>, granularity: u64, data_size: u64) -> Vec<Message> {
    let wire_bytes = |m: Message| HEADER_BYTES + m.encode_payload().len();
    let request_wire_bytes = wire_bytes(Message::ResyncRequest {
        offset: 0,
        len: 0,
        checksum_only: false,
    });
    let bitmap_wire_bytes = bits.len()
        + wire_bytes(Message::Bitmap {
            first_bit: 0,
            total_bits: 0,
            bits: Vec::new(),
        });
    // Counted before any is built: past this many, the bits are shorter.
    let ranges_max = bitmap_wire_bytes / request_wire_bytes;
    let requests_per_run =
        |count: u64| (count * granularity).div_ceil(REPORTED_RANGE_MAX_BYTES) as usize;
    let mut requests_needed = 0;
    let ranges_are_shorter = bitmap_runs(&bits).all(|(_, count)| {
        requests_needed += requests_per_run(count);
        requests_needed <= ranges_max
    });
    if !ranges_are_shorter {
        return vec![Message::Bitmap {
            first_bit,
            total_bits: data_size.div_ceil(granularity),
            bits,
        }];
    }
    bit_ranges(&bits, first_bit, granularity)
        .flat_map(|(offset, len)| {
            let len = len.min(data_size - offset);
            pieces(offset, len, REPORTED_RANGE_MAX_BYTES).map(|(offset, len)| {
                Message::ResyncRequest {
                    offset,
                    len: len as u32,
                    checksum_only: false,
                }
            })
        })
        .collect()
}

/// The byte ranges the set bits of a bitmap slice starting at bit
/// `first_bit` stand for, one bit per `granularity` bytes.
fn bit_ranges(
    bits: &[u8],
    first_bit: u64,
    granularity: u64,
) -> impl Iterator<Item = (u64, u64)> + '_ {
    bitmap_runs(bits)
        .map(move |(first, count)| ((first_bit + first) * granularity, count * granularity))
}

/// Marks out of sync what a sync target's `Bitmap` message says it
/// changed; `granularity` is the target's, from its Hello.
pub fn mark_reported_bits(
    volume: &Volume,
    granularity: u64,
    first_bit: u64,
    total_bits: u64,
    bits: &[u8],
) -> Result<(), String> {
    for (offset, len) in
        reported_ranges(granularity, first_bit, total_bits, bits, volume.data_size())?
    {
        volume.mark_out_of_sync(offset, len);
    }
    Ok(())
}

/// The byte ranges a `Bitmap` message marks, in the sender's granularity.
fn reported_ranges(
    granularity: u64,
    first_bit: u64,
    total_bits: u64,
    bits: &[u8],
    data_size: u64,
) -> Result<impl Iterator<Item = (u64, u64)> + '_, String> {
    if granularity == 0 || total_bits != data_size.div_ceil(granularity) {
        return Err(format!(
            "peer sent a bitmap of {total_bits} bits of {granularity} bytes \
             for {data_size} bytes of data"
        ));
    }
    Ok(bit_ranges(bits, first_bit, granularity))
}

/// Streams every out-of-sync range to the peer, clearing each once a
/// barrier after it is confirmed, then tells the peer it is done.
pub async fn resync_source(
    volume: Arc<Volume>,
    link: Arc<Channel>,
    peer: Arc<Peer>,
    checksum_first: bool,
    done: oneshot::Sender<Result<(), String>>,
) {
    let mut pace = Pace::new();
    let cap = RateCap::new(peer.resync_rate_max_bytes_per_s);
    let odds = checksum_first.then(|| Arc::new(ChecksumOdds::new()));
    let mut acks = tokio::task::JoinSet::new();
    let mut answered = Answered::default();
    let mut barriers = tokio::task::JoinSet::new();
    let result: Result<(), String> = async {
        // Rounds until nothing is left: a range marked behind the walk
        // (a write that raced the resync) is picked up next round. The walk
        // reads the bitmap a run at a time: millions of scattered runs cost
        // no list of them.
        loop {
            let mut from = 0;
            let mut found = false;
            while let Some((offset, len)) = volume.dirty_run_from(from) {
                from = offset + len;
                found = true;
                for (chunk_offset, chunk_len) in chunks(offset, len) {
                    while acks.len() >= pace.window(&volume) {
                        answered.add(
                            acks.join_next()
                                .await
                                .expect("not empty")
                                .map_err(|e| e.to_string())??,
                        );
                        if answered.bytes >= ANSWERED_BYTES_MAX {
                            answered.barrier(&volume, &link, &mut barriers);
                        }
                    }
                    let (volume, peer, link) = (volume.clone(), peer.clone(), link.clone());
                    let (cap, odds) = (cap.clone(), odds.clone());
                    // Each chunk in its own task: reads overlap with sending.
                    acks.spawn(async move {
                        resync_chunk(
                            &volume,
                            &link,
                            &peer,
                            chunk_offset,
                            chunk_len,
                            odds.as_deref(),
                            cap.as_deref(),
                        )
                        .await
                    });
                }
            }
            while let Some(joined) = acks.join_next().await {
                answered.add(joined.map_err(|e| e.to_string())??);
            }
            // Everything answered in this round is in sync before the next
            // round looks for what is left.
            if !answered.chunks.is_empty() {
                answered.barrier(&volume, &link, &mut barriers);
            }
            while let Some(joined) = barriers.join_next().await {
                joined.map_err(|e| e.to_string())??;
            }
            if !found {
                break;
            }
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

/// Compares every chunk with the peer by checksum while both serve; marks
/// the chunks that differ out of sync. Returns the bytes that differ.
pub async fn verify(
    volume: Arc<Volume>,
    link: Arc<Channel>,
    peer: Arc<Peer>,
) -> Result<u64, String> {
    let mut pace = Pace::new();
    let cap = RateCap::new(peer.resync_rate_max_bytes_per_s);
    let mut checks = tokio::task::JoinSet::new();
    let mut differing = 0u64;
    let mut account = |joined: Result<Result<(u64, u64, bool), String>, _>| {
        let (offset, len, differs) =
            joined.map_err(|e: tokio::task::JoinError| e.to_string())??;
        if differs {
            volume.mark_out_of_sync(offset, len);
            differing += len;
        }
        peer.verify_progress(len, differs);
        Ok::<(), String>(())
    };
    for (offset, len) in chunks(0, volume.data_size()) {
        while checks.len() >= pace.window(&volume) {
            account(checks.join_next().await.expect("not empty"))?;
        }
        if let Some(cap) = &cap {
            cap.admit(len).await;
        }
        let (volume, link) = (volume.clone(), link.clone());
        checks.spawn(async move {
            let answer = send_range(&volume, &link, offset, len, "verify", |data| {
                Message::ResyncChecksum {
                    offset,
                    len: len as u32,
                    digest: blkmirror_proto::chunk_digest(data),
                }
            })
            .await?;
            match answer {
                0 => Ok((offset, len, false)),
                CHECKSUM_DIFFERS => Ok((offset, len, true)),
                errno => Err(format!("peer failed to read at {offset}: errno {errno}")),
            }
        });
    }
    while let Some(joined) = checks.join_next().await {
        account(joined)?;
    }
    Ok(differing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_and_chunking() {
        assert!(is_zero(&[0u8; 4100]));
        let mut data = vec![0u8; 4100];
        data[4099] = 1;
        assert!(!is_zero(&data));
        let pieces: Vec<_> = chunks(4096, 3 * RESYNC_CHUNK_BYTES + 512).collect();
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces[3], (4096 + 3 * RESYNC_CHUNK_BYTES, 512));
        assert_eq!(
            pieces.iter().map(|p| p.1).sum::<u64>(),
            3 * RESYNC_CHUNK_BYTES + 512
        );
    }

    /// The byte ranges a report's messages mark on the source.
    fn reported_by(messages: &[Message], granularity: u64, data_size: u64) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        for message in messages {
            match message {
                Message::ResyncRequest { offset, len, .. } => {
                    ranges.push((*offset, u64::from(*len)))
                }
                Message::Bitmap {
                    first_bit,
                    total_bits,
                    bits,
                } => ranges.extend(
                    reported_ranges(granularity, *first_bit, *total_bits, bits, data_size).unwrap(),
                ),
                other => panic!("unexpected {other:?}"),
            }
        }
        ranges
    }

    /// The granules a report's messages mark on the source.
    fn marked_by(messages: &[Message], granularity: u64, data_size: u64) -> Vec<u64> {
        let mut granules: Vec<u64> = reported_by(messages, granularity, data_size)
            .into_iter()
            .flat_map(|(offset, len)| offset / granularity..(offset + len).div_ceil(granularity))
            .collect();
        granules.sort_unstable();
        granules
    }

    #[test]
    fn a_report_marks_exactly_the_dirty_granules_in_few_bytes() {
        const G: u64 = 4096;
        let data_size = 64 << 20;
        let first_bit = 8192;
        let total_bits = data_size / G;
        let bits_of = |granules: &[u64]| {
            let mut bits = vec![0u8; ((total_bits - first_bit) / 8) as usize];
            for g in granules {
                let k = g - first_bit;
                bits[(k / 8) as usize] |= 1 << (k % 8);
            }
            bits
        };
        // A few runs travel as ranges.
        let few: Vec<u64> = (9000..9100).chain([10_000, 12_345]).collect();
        let report = report_page(first_bit, bits_of(&few), G, data_size);
        assert!(report
            .iter()
            .all(|m| matches!(m, Message::ResyncRequest { .. })));
        assert_eq!(report.len(), 3);
        assert_eq!(marked_by(&report, G, data_size), few);
        // Every other granule dirty: one Bitmap message, not thousands.
        let scattered: Vec<u64> = (first_bit..total_bits).step_by(2).collect();
        let report = report_page(first_bit, bits_of(&scattered), G, data_size);
        assert!(matches!(report[..], [Message::Bitmap { .. }]));
        assert_eq!(marked_by(&report, G, data_size), scattered);
    }

    #[test]
    fn a_target_bitmap_reaches_the_source_exactly_over_the_wire() {
        use blkmirror_metadata::bitmap::DirtyBitmap;
        use blkmirror_metadata::layout::BITS_PER_BITMAP_PAGE;
        const G: u64 = 4096;
        // Two full pages and a partial third, whose last granule is dirty.
        let data_size = (2 * BITS_PER_BITMAP_PAGE + 1000) * G;
        let mut target = DirtyBitmap::new(data_size, G as u32);
        for granule in (0..BITS_PER_BITMAP_PAGE).step_by(3) {
            target.mark(granule * G, G); // scattered: goes as bits
        }
        target.mark((BITS_PER_BITMAP_PAGE + 5) * G, 300 * G); // few: as ranges
        target.mark(data_size - G, G);
        let mut sent = Vec::new();
        for index in 0..target.page_count() {
            let (first_bit, bits) = target.page_bits(index).unwrap();
            for message in report_page(first_bit, bits, G, data_size) {
                sent.push(
                    Message::decode_payload(message.kind(), &message.encode_payload())
                        .expect("a report decodes"),
                );
            }
        }
        use blkmirror_proto::message::kind;
        let kinds: Vec<u16> = sent.iter().map(Message::kind).collect();
        assert_eq!(
            kinds,
            [kind::BITMAP, kind::RESYNC_REQUEST, kind::RESYNC_REQUEST]
        );
        for source_granularity in [G, 16 * G] {
            let mut source = DirtyBitmap::new(data_size, source_granularity as u32);
            for (offset, len) in reported_by(&sent, G, data_size) {
                source.mark(offset, len);
            }
            let mut expected = DirtyBitmap::new(data_size, source_granularity as u32);
            for (offset, len) in target.runs() {
                expected.mark(offset, len);
            }
            assert!(
                source.runs().eq(expected.runs()),
                "the source marks what the target changed, at granularity {source_granularity}"
            );
        }
    }

    #[test]
    fn a_bitmap_of_another_size_is_refused() {
        assert!(reported_ranges(4096, 0, 1000, &[1], 1001 * 4096).is_err());
        assert!(reported_ranges(0, 0, 1000, &[1], 1000 * 4096).is_err());
        let ranges: Vec<_> = reported_ranges(8192, 0, 500, &[0b101], 1000 * 4096)
            .unwrap()
            .collect();
        assert_eq!(
            ranges,
            vec![(0, 8192), (16384, 8192)],
            "in the sender's granularity"
        );
    }

    #[test]
    fn checksums_go_first_only_while_they_match() {
        let odds = ChecksumOdds::new();
        let used = |odds: &ChecksumOdds, n| (0..n).filter(|_| odds.worth_it()).count();
        assert_eq!(used(&odds, 32), 32, "a fresh copy tries checksums");
        for _ in 0..16 {
            odds.record(false);
        }
        assert_eq!(
            used(&odds, 64),
            64 / CHECKSUM_PROBE_EVERY as usize,
            "a disk that matches nowhere gets only probes"
        );
        for _ in 0..8 {
            odds.record(true);
        }
        assert_eq!(used(&odds, 16), 16, "matches make checksums worth it again");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_spaces_chunks_at_the_rate() {
        let cap = RateCap::new(Some(10 * RESYNC_CHUNK_BYTES)).unwrap();
        let start = tokio::time::Instant::now();
        for _ in 0..21 {
            cap.admit(RESYNC_CHUNK_BYTES).await;
        }
        // 20 chunks' worth of waiting at 10 chunks per second.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1990) && elapsed <= Duration::from_millis(2100),
            "{elapsed:?}"
        );
    }
}
