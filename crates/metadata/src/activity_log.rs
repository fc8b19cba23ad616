//! The activity log: the set of "hot" extents that writes may be in flight
//! to. Before the first write to an extent outside the set, a transaction
//! naming the new set is made durable; after a crash, only those extents can
//! differ from the peer without the bitmap knowing, so only they are marked
//! dirty. This makes crash safety cheap: the bitmap itself is written only
//! when an extent leaves the set, not on every write. An extent leaves the
//! set only when no write to it is still in flight (locally or to the peer),
//! so the set always covers every unfinished write.
//!
//! On disk: a ring of 4 KiB slots in the activity-log region. Each slot
//! holds a whole transaction: magic `BMAL` (u32), version (u16), reserved
//! (u16), sequence (u64), extent count (u32), CRC32C (u32) over the rest,
//! then the extent numbers (u32 each). The valid slot with the highest
//! sequence is the set in force; a torn newest slot leaves the one before.

use std::collections::HashMap;

use crate::bitmap::DirtyBitmap;
use crate::layout::Layout;
use crate::slots::MetaDevice;
use crate::Error;

/// Data covered by one extent.
pub const EXTENT_BYTES: u64 = 4 << 20;
pub const SLOT_BYTES: u64 = 4096;
const HEADER_BYTES: usize = 24;
/// Extents in the set at most (4 GiB of hot data); one slot holds them all.
pub const EXTENTS_MAX: usize = 1000;
/// Extents in the set at least: one write may touch up to this many less
/// one (60 MiB), and a write never evicts an extent it touches itself.
pub const EXTENTS_MIN: usize = 16;
const MAGIC: u32 = u32::from_le_bytes(*b"BMAL");
const VERSION: u16 = 1;
const _: () = assert!(HEADER_BYTES + EXTENTS_MAX * 4 <= SLOT_BYTES as usize);

/// A transaction the caller must make durable before the write that caused
/// it is issued. If `evicted` is not empty, the bitmap must be flushed first:
/// those extents leave the log, so from then on only the on-disk bitmap
/// remembers whether they are dirty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub sequence: u64,
    pub disk_offset: u64,
    pub slot: Vec<u8>,
    pub evicted: Vec<u32>,
}

/// Every extent in the set has a write in flight, so none can make room
/// for a new one: wait for a write to end and try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentsBusy;

#[derive(Debug, Clone)]
pub struct ActivityLog {
    region_offset: u64,
    slot_count: u64,
    capacity: usize,
    /// Active extents and when each was last used (a logical clock).
    active: HashMap<u32, u64>,
    /// Writes begun and not yet ended, per extent (only extents with some).
    in_flight: HashMap<u32, u32>,
    clock: u64,
    next_sequence: u64,
}

impl ActivityLog {
    /// An empty log continuing after `last_sequence` (0 for a new disk).
    pub fn new(layout: &Layout, capacity: usize, last_sequence: u64) -> ActivityLog {
        ActivityLog {
            region_offset: layout.al_offset,
            slot_count: layout.al_size / SLOT_BYTES,
            capacity: capacity.clamp(EXTENTS_MIN, EXTENTS_MAX),
            active: HashMap::new(),
            in_flight: HashMap::new(),
            clock: 0,
            next_sequence: last_sequence + 1,
        }
    }

    pub fn active_extents(&self) -> Vec<u32> {
        let mut extents: Vec<u32> = self.active.keys().copied().collect();
        extents.sort_unstable();
        extents
    }

    /// Extents a byte range touches.
    pub fn extents_of(offset: u64, len: u64) -> std::ops::Range<u32> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / EXTENT_BYTES;
        let end = offset.saturating_add(len).div_ceil(EXTENT_BYTES);
        first.min(u64::from(u32::MAX)) as u32..end.min(u64::from(u32::MAX)) as u32
    }

    /// Starts a write to `[offset, offset + len)`, which must touch fewer
    /// extents than the log holds. Returns the transaction to persist before
    /// the write is issued, or `None` when every extent was already active.
    /// The write counts as in flight until `end_write`; its extents stay in
    /// the set until then. `ExtentsBusy` changes nothing.
    pub fn begin_write(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Transaction>, ExtentsBusy> {
        let extents = ActivityLog::extents_of(offset, len);
        debug_assert!(extents.len() < self.capacity, "a write larger than the log");
        let missing: Vec<u32> = extents
            .clone()
            .filter(|extent| !self.active.contains_key(extent))
            .collect();
        let room = self.capacity - self.active.len();
        let mut evicted = Vec::new();
        if missing.len() > room {
            let mut idle: Vec<(u64, u32)> = self
                .active
                .iter()
                .filter(|(extent, _)| !self.in_flight.contains_key(extent))
                .filter(|(extent, _)| !extents.contains(extent))
                .map(|(&extent, &used)| (used, extent))
                .collect();
            let needed = missing.len() - room;
            if idle.len() < needed {
                return Err(ExtentsBusy);
            }
            idle.sort_unstable();
            evicted = idle[..needed].iter().map(|&(_, extent)| extent).collect();
        }
        self.clock += 1;
        for extent in &evicted {
            self.active.remove(extent);
        }
        for extent in extents {
            self.active.insert(extent, self.clock);
            *self.in_flight.entry(extent).or_default() += 1;
        }
        Ok((!missing.is_empty()).then(|| self.transaction(evicted)))
    }

    /// Ends a write that `begin_write` started.
    pub fn end_write(&mut self, offset: u64, len: u64) {
        for extent in ActivityLog::extents_of(offset, len) {
            if let Some(count) = self.in_flight.get_mut(&extent) {
                *count -= 1;
                if *count == 0 {
                    self.in_flight.remove(&extent);
                }
            }
        }
    }

    /// A transaction recording the current set (used after recovery too).
    pub fn transaction(&mut self, evicted: Vec<u32>) -> Transaction {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let extents = self.active_extents();
        Transaction {
            sequence,
            disk_offset: self.region_offset + (sequence % self.slot_count) * SLOT_BYTES,
            slot: encode_slot(sequence, &extents),
            evicted,
        }
    }
}

/// What the log said at the last crash.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// 0 when no transaction was ever written.
    pub sequence: u64,
    pub extents: Vec<u32>,
    /// Slots that held something but failed their checks.
    pub damaged_slots: usize,
}

impl Recovered {
    /// Marks every recovered extent dirty: writes may have reached this disk
    /// (and not the peer's, or the reverse) anywhere inside them.
    pub fn mark_dirty(&self, bitmap: &mut DirtyBitmap) {
        for &extent in &self.extents {
            bitmap.mark(u64::from(extent) * EXTENT_BYTES, EXTENT_BYTES);
        }
    }
}

/// Reads every slot and returns the newest valid transaction's set.
pub fn recover(dev: &impl MetaDevice, layout: &Layout) -> Result<Recovered, Error> {
    let mut best = Recovered::default();
    let mut buf = vec![0u8; SLOT_BYTES as usize];
    for slot in 0..layout.al_size / SLOT_BYTES {
        dev.read_bytes_at(&mut buf, layout.al_offset + slot * SLOT_BYTES)
            .map_err(|source| Error::Io {
                what: "reading the activity log",
                source,
            })?;
        match decode_slot(&buf) {
            Ok(None) => {}
            Ok(Some((sequence, extents))) if sequence % (layout.al_size / SLOT_BYTES) == slot => {
                if sequence > best.sequence {
                    best.sequence = sequence;
                    best.extents = extents;
                }
            }
            Ok(Some(_)) | Err(_) => best.damaged_slots += 1,
        }
    }
    Ok(best)
}

pub fn encode_slot(sequence: u64, extents: &[u32]) -> Vec<u8> {
    assert!(extents.len() <= EXTENTS_MAX, "the log never holds more");
    let mut slot = vec![0u8; SLOT_BYTES as usize];
    slot[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    slot[4..6].copy_from_slice(&VERSION.to_le_bytes());
    slot[8..16].copy_from_slice(&sequence.to_le_bytes());
    slot[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (chunk, extent) in slot[HEADER_BYTES..].chunks_exact_mut(4).zip(extents) {
        chunk.copy_from_slice(&extent.to_le_bytes());
    }
    let crc = slot_crc(&slot);
    slot[20..24].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn slot_crc(slot: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&slot[..20]), &slot[HEADER_BYTES..])
}

/// `Ok(None)` for a never-written slot; `Ok(Some((sequence, extents)))`.
pub fn decode_slot(slot: &[u8]) -> Result<Option<(u64, Vec<u32>)>, &'static str> {
    if slot.len() != SLOT_BYTES as usize {
        return Err("wrong slot size");
    }
    if slot.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if slot[0..4] != MAGIC.to_le_bytes() {
        return Err("bad magic");
    }
    if slot[4..6] != VERSION.to_le_bytes() || slot[6..8] != [0, 0] {
        return Err("unsupported version");
    }
    if slot[20..24] != slot_crc(slot).to_le_bytes() {
        return Err("checksum mismatch");
    }
    let count = u32::from_le_bytes(slot[16..20].try_into().unwrap()) as usize;
    if count > EXTENTS_MAX {
        return Err("too many extents");
    }
    let list_end = HEADER_BYTES + count * 4;
    // The writer zeroes the rest; anything else there is not its slot.
    if slot[list_end..].iter().any(|&b| b != 0) {
        return Err("bytes past the extent list are not zero");
    }
    let sequence = u64::from_le_bytes(slot[8..16].try_into().unwrap());
    let extents = slot[HEADER_BYTES..list_end]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(Some((sequence, extents)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GRANULARITY_DEFAULT_BYTES;
    use proptest::prelude::*;

    fn layout() -> Layout {
        Layout::for_disk(2 << 30, GRANULARITY_DEFAULT_BYTES).unwrap()
    }

    fn persist(dev: &std::fs::File, t: &Transaction) {
        dev.write_bytes_at(&t.slot, t.disk_offset).unwrap();
    }

    /// A write that begins and ends at once.
    fn write(log: &mut ActivityLog, offset: u64, len: u64) -> Option<Transaction> {
        let transaction = log.begin_write(offset, len).expect("room in the log");
        log.end_write(offset, len);
        transaction
    }

    #[test]
    fn hot_extents_cost_one_transaction() {
        let mut log = ActivityLog::new(&layout(), EXTENTS_MIN, 0);
        let t = write(&mut log, 0, 4096).expect("first write to extent 0");
        assert_eq!((t.sequence, t.evicted.len()), (1, 0));
        assert!(
            write(&mut log, 100, 4096).is_none(),
            "extent 0 is already active"
        );
        let t = write(&mut log, EXTENT_BYTES - 1, 2).expect("extent 1 is new");
        assert_eq!(decode_slot(&t.slot).unwrap(), Some((2, vec![0, 1])));
    }

    #[test]
    fn the_coldest_extent_is_evicted_and_reported() {
        let mut log = ActivityLog::new(&layout(), EXTENTS_MIN, 0);
        for extent in 0..EXTENTS_MIN as u64 {
            write(&mut log, extent * EXTENT_BYTES, 1);
        }
        write(&mut log, 0, 1); // extent 0 is now the hottest, extent 1 the coldest
        let t = write(&mut log, 100 * EXTENT_BYTES, 1).unwrap();
        assert_eq!(t.evicted, vec![1]);
        assert!(log.active_extents().contains(&0) && log.active_extents().contains(&100));
    }

    #[test]
    fn an_extent_with_a_write_in_flight_stays() {
        let mut log = ActivityLog::new(&layout(), EXTENTS_MIN, 0);
        log.begin_write(0, 1).unwrap(); // extent 0: the coldest, and in flight
        for extent in 1..EXTENTS_MIN as u64 {
            write(&mut log, extent * EXTENT_BYTES, 1);
        }
        let t = write(&mut log, 100 * EXTENT_BYTES, 1).unwrap();
        assert_eq!(t.evicted, vec![1], "the coldest idle extent goes instead");
        log.end_write(0, 1);
        let t = write(&mut log, 101 * EXTENT_BYTES, 1).unwrap();
        assert_eq!(t.evicted, vec![0], "idle now, and the coldest");
    }

    #[test]
    fn a_new_extent_waits_while_every_extent_has_a_write_in_flight() {
        let mut log = ActivityLog::new(&layout(), EXTENTS_MIN, 0);
        for extent in 0..EXTENTS_MIN as u64 {
            log.begin_write(extent * EXTENT_BYTES, 1).unwrap();
        }
        let before = log.clone();
        assert_eq!(log.begin_write(100 * EXTENT_BYTES, 1), Err(ExtentsBusy));
        assert_eq!(log.active_extents(), before.active_extents());
        assert_eq!(
            log.next_sequence, before.next_sequence,
            "nothing to persist"
        );
        // A write to an extent already in the set goes on.
        assert_eq!(log.begin_write(3 * EXTENT_BYTES + 9, 1), Ok(None));
        log.end_write(3 * EXTENT_BYTES + 9, 1);
        assert_eq!(log.begin_write(100 * EXTENT_BYTES, 1), Err(ExtentsBusy));
        log.end_write(7 * EXTENT_BYTES, 1);
        let t = log.begin_write(100 * EXTENT_BYTES, 1).unwrap().unwrap();
        assert_eq!(t.evicted, vec![7]);
    }

    #[test]
    fn recovery_takes_the_newest_intact_transaction() {
        let layout = layout();
        let dev = tempfile::tempfile().unwrap();
        dev.set_len(2 << 30).unwrap();
        assert_eq!(recover(&dev, &layout).unwrap(), Recovered::default());
        let mut log = ActivityLog::new(&layout, EXTENTS_MIN, 0);
        let mut last = None;
        for i in 0..300u64 {
            // Wrap the ring (112 slots) more than twice.
            if let Some(t) = write(&mut log, i * EXTENT_BYTES, 1) {
                persist(&dev, &t);
                last = Some(t);
            }
        }
        let last = last.unwrap();
        let recovered = recover(&dev, &layout).unwrap();
        assert_eq!(recovered.sequence, last.sequence);
        assert_eq!(recovered.extents, log.active_extents());
        // Tear the newest slot: the one before it is in force.
        dev.write_bytes_at(&[0xFF; 16], last.disk_offset + 40)
            .unwrap();
        let recovered = recover(&dev, &layout).unwrap();
        assert_eq!(
            (recovered.sequence, recovered.damaged_slots),
            (last.sequence - 1, 1)
        );
        // Its extents are those in force before the newest write: the
        // EXTENTS_MIN written before it.
        let mut before_newest = recovered.extents.clone();
        before_newest.sort_unstable();
        let newest = 299;
        assert_eq!(
            before_newest,
            (newest - EXTENTS_MIN as u32..newest).collect::<Vec<_>>()
        );
        let mut bitmap = DirtyBitmap::for_layout(&layout);
        recovered.mark_dirty(&mut bitmap);
        assert_eq!(
            bitmap.dirty_bytes(),
            recovered.extents.len() as u64 * EXTENT_BYTES
        );
        assert_eq!(recovered.extents.len(), EXTENTS_MIN);
    }

    /// Found by the fuzzer: a slot with a valid checksum over bytes past its
    /// extent list was accepted, though no writer makes one.
    #[test]
    fn bytes_past_the_extent_list_are_refused() {
        let mut slot = encode_slot(7, &[1, 2]);
        slot[100] = 0x42;
        let crc = slot_crc(&slot);
        slot[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_slot(&slot),
            Err("bytes past the extent list are not zero")
        );
    }

    proptest! {
        #[test]
        fn slot_round_trip(sequence: u64, extents in proptest::collection::vec(any::<u32>(), 0..EXTENTS_MAX)) {
            prop_assert_eq!(decode_slot(&encode_slot(sequence, &extents)), Ok(Some((sequence, extents))));
        }

        #[test]
        fn arbitrary_slots_never_panic(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = decode_slot(&bytes);
        }

        #[test]
        fn the_set_holds_every_write_in_flight_and_never_exceeds_its_capacity(
            writes in proptest::collection::vec(
                (0u64..(64 << 30), 1u64..(32 << 20), any::<bool>()),
                1..200,
            ),
            capacity in EXTENTS_MIN..64,
        ) {
            let mut log = ActivityLog::new(&layout(), capacity, 0);
            let mut in_flight = std::collections::VecDeque::new();
            for (offset, len, keep) in writes {
                // Writes end oldest first when there is no room for this one.
                while log.begin_write(offset, len).is_err() {
                    let (o, l) = in_flight.pop_front().expect("an idle log has room");
                    log.end_write(o, l);
                }
                if keep {
                    in_flight.push_back((offset, len));
                } else {
                    log.end_write(offset, len);
                }
                let active = log.active_extents();
                prop_assert!(active.len() <= capacity);
                for &(o, l) in &in_flight {
                    for extent in ActivityLog::extents_of(o, l) {
                        prop_assert!(active.contains(&extent), "a write in flight lost its extent");
                    }
                }
                for extent in ActivityLog::extents_of(offset, len) {
                    prop_assert!(active.contains(&extent), "a write's own extents are active");
                }
            }
        }
    }
}
