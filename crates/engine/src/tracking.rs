//! Change tracking for a volume: the dirty bitmap of what the peer lacks,
//! and the activity log that keeps it crash-safe without writing bitmap
//! pages on every write.
//!
//! Order on the write path: (1) if the write touches an extent outside the
//! activity log, persist a log transaction naming it (flushing the bitmap
//! first when that evicts an extent); (2) mark the bitmap in memory; (3)
//! issue the data write; (4) once it is durable on both disks (a barrier
//! confirmed it on the peer), or the bitmap marks what the peer lacks, end
//! the write in the log. An extent with a write
//! between (1) and (4) is never evicted, so after a crash, marking every
//! extent of the last log transaction dirty covers every unfinished write.

use std::sync::Arc;

use blkmirror_io::{AlignedBuf, Store};
use blkmirror_metadata::activity_log::{self, ActivityLog, Recovered};
use blkmirror_metadata::bitmap::DirtyBitmap;
use blkmirror_metadata::{Layout, MetaDevice};

use crate::Error;

// The config's bounds must fit the on-disk log.
const _: () = assert!(
    blkmirror_config::AL_EXTENTS_MIN >= activity_log::EXTENTS_MIN
        && blkmirror_config::AL_EXTENTS_MAX <= activity_log::EXTENTS_MAX
);

pub struct ChangeTracker {
    layout: Layout,
    disk: String,
    bitmap: std::sync::Mutex<DirtyBitmap>,
    log: Arc<SharedLog>,
    /// Held across the log write, so a second write to a newly added extent
    /// waits until the transaction naming it is durable.
    transactions: tokio::sync::Mutex<()>,
    /// Held from taking the changed bitmap pages to their flush: a flush
    /// that finds them taken waits until they are durable, and two copies
    /// of one page never reach the disk out of order.
    page_writes: tokio::sync::Mutex<()>,
    recovered: Recovered,
}

/// The activity log, shared with the writes that end in it.
struct SharedLog {
    log: std::sync::Mutex<ActivityLog>,
    /// Notified whenever a write ends: its extents may now be evicted.
    write_ended: tokio::sync::Notify,
}

/// A write the activity log covers: its extents stay in the log until this
/// is dropped, once the write is durable on both disks or the bitmap marks
/// what the peer lacks.
pub struct LoggedWrite {
    log: Arc<SharedLog>,
    offset: u64,
    len: u64,
}

impl Drop for LoggedWrite {
    fn drop(&mut self) {
        self.log
            .log
            .lock()
            .unwrap()
            .end_write(self.offset, self.len);
        self.log.write_ended.notify_waiters();
    }
}

impl ChangeTracker {
    /// Loads the on-disk bitmap and the activity log's last transaction.
    /// `al_extents`: hot extents the log keeps; after a crash at most that
    /// many times 4 MiB is resynced.
    pub fn open(
        meta: &impl MetaDevice,
        layout: &Layout,
        disk: &str,
        al_extents: usize,
    ) -> Result<ChangeTracker, Error> {
        let disk_err = |source| Error::Disk {
            disk: disk.to_string(),
            source,
        };
        let (bitmap, damaged) = DirtyBitmap::load(meta, layout).map_err(disk_err)?;
        for page in &damaged {
            tracing::warn!(
                disk,
                page = page.index,
                reason = page.reason,
                "damaged bitmap page: its whole range counts as out of sync"
            );
        }
        let recovered = activity_log::recover(meta, layout).map_err(disk_err)?;
        if recovered.damaged_slots > 0 {
            tracing::warn!(
                disk,
                slots = recovered.damaged_slots,
                "damaged activity-log slots ignored (torn writes?)"
            );
        }
        Ok(ChangeTracker {
            layout: *layout,
            disk: disk.to_string(),
            bitmap: std::sync::Mutex::new(bitmap),
            log: Arc::new(SharedLog {
                log: std::sync::Mutex::new(ActivityLog::new(
                    layout,
                    al_extents,
                    recovered.sequence,
                )),
                write_ended: tokio::sync::Notify::new(),
            }),
            transactions: tokio::sync::Mutex::new(()),
            page_writes: tokio::sync::Mutex::new(()),
            recovered,
        })
    }

    /// After a crash: everything the last log transaction named may differ
    /// from the peer. Marked dirty and written out before any new transaction
    /// can drop those extents from the log.
    pub async fn recover_after_crash(&self, store: &Store) -> Result<u64, Error> {
        let before = self.out_of_sync_bytes();
        {
            let mut bitmap = self.bitmap.lock().unwrap();
            self.recovered.mark_dirty(&mut bitmap);
        }
        self.flush(store).await?;
        let added = self.out_of_sync_bytes() - before;
        tracing::warn!(
            disk = self.disk,
            extents = self.recovered.extents.len(),
            added_bytes = added,
            "crash recovery: the activity log's extents are marked out of sync"
        );
        Ok(added)
    }

    /// Runs before a data write to `[offset, offset + len)` of the data area,
    /// which must span fewer than `al-extents` extents. `peer_missing`: the
    /// peer will not get this write, so mark it dirty. When every extent in
    /// the log has a write in flight and this write needs a new one, a
    /// write the peer gets waits for one of them to end; a write it misses
    /// does not wait (those in flight may wait for the peer), and is covered
    /// by its bitmap pages, made durable first. `None`: no extent held.
    /// `hurry` is called before each wait: extents are also held by writes
    /// that wait for a barrier on the peer.
    pub async fn before_write(
        &self,
        store: &Store,
        (offset, len): (u64, u64),
        peer_missing: bool,
        hurry: impl Fn(),
    ) -> Result<Option<LoggedWrite>, Error> {
        loop {
            let ended = self.log.write_ended.notified();
            tokio::pin!(ended);
            // Registered before looking, so an end in between is not missed.
            ended.as_mut().enable();
            let serial = self.transactions.lock().await;
            let begun = self.log.log.lock().unwrap().begin_write(offset, len);
            match begun {
                Ok(transaction) => {
                    let logged = LoggedWrite {
                        log: self.log.clone(),
                        offset,
                        len,
                    };
                    if let Some(transaction) = transaction {
                        if !transaction.evicted.is_empty() {
                            // Once the log stops naming the evicted extents,
                            // neither their writes nor their bitmap pages may
                            // sit in a cache.
                            self.flush_with_data(store).await?;
                        }
                        let slot = AlignedBuf::from_slice(&transaction.slot);
                        store.write(transaction.disk_offset, slot, true).await?;
                    }
                    drop(serial);
                    if peer_missing {
                        self.bitmap.lock().unwrap().mark(offset, len);
                    }
                    return Ok(Some(logged));
                }
                Err(_) if peer_missing => {
                    self.bitmap.lock().unwrap().mark(offset, len);
                    self.flush_with_data(store).await?;
                    return Ok(None);
                }
                // Waits without holding up other writes' transactions.
                Err(_) => {
                    drop(serial);
                    hurry();
                }
            }
            ended.await;
        }
    }

    /// Writes every changed bitmap page and makes them durable.
    pub async fn flush(&self, store: &Store) -> Result<(), Error> {
        let _writing = self.page_writes.lock().await;
        if self.write_pages(store).await? {
            store.flush().await?;
        }
        Ok(())
    }

    /// Writes every changed bitmap page and flushes the disk even if none
    /// changed, so that the data written before is durable too.
    async fn flush_with_data(&self, store: &Store) -> Result<(), Error> {
        let _writing = self.page_writes.lock().await;
        self.write_pages(store).await?;
        Ok(store.flush().await?)
    }

    /// Writes every changed bitmap page; true if there were any. The
    /// caller holds `page_writes` until they are flushed.
    async fn write_pages(&self, store: &Store) -> Result<bool, Error> {
        let pages = self.bitmap.lock().unwrap().take_unflushed(&self.layout);
        let any = !pages.is_empty();
        for (disk_offset, page) in pages {
            store
                .write(disk_offset, AlignedBuf::from_slice(&page), false)
                .await?;
        }
        Ok(any)
    }

    /// Marks a range the peer lacks (a write it never confirmed).
    pub fn mark(&self, offset: u64, len: u64) {
        self.bitmap.lock().unwrap().mark(offset, len);
    }

    /// Whether any part of a range is marked: the peer may lack it.
    pub fn any_out_of_sync(&self, offset: u64, len: u64) -> bool {
        let bitmap = self.bitmap.lock().unwrap();
        let granularity = bitmap.granularity();
        let end = (offset + len).div_ceil(granularity);
        (offset / granularity..end).any(|granule| bitmap.is_dirty(granule))
    }

    /// Marks a range the peer now has (resync confirmed it).
    pub fn clear(&self, offset: u64, len: u64) {
        self.bitmap.lock().unwrap().clear(offset, len);
    }

    /// `clear`, unless `stale` says otherwise when the bitmap is taken: a
    /// mark made since that check waits for the clear, so it stands.
    pub fn clear_unless(&self, offset: u64, len: u64, stale: impl FnOnce() -> bool) {
        let mut bitmap = self.bitmap.lock().unwrap();
        if !stale() {
            bitmap.clear(offset, len);
        }
    }

    pub fn mark_all(&self) {
        self.mark(0, self.layout.data_size);
    }

    pub fn clear_all(&self) {
        self.clear(0, self.layout.data_size);
    }

    /// The first out-of-sync range that ends after byte `from`, as
    /// `(offset, len)`.
    pub fn run_from(&self, from: u64) -> Option<(u64, u64)> {
        self.bitmap.lock().unwrap().run_from(from)
    }

    /// Pages of the bitmap, for `page_bits`.
    pub fn page_count(&self) -> usize {
        self.bitmap.lock().unwrap().page_count()
    }

    /// Page `index` of the bitmap, if any of it is dirty: its first granule
    /// and its bits (see `DirtyBitmap::page_bits`).
    pub fn page_bits(&self, index: usize) -> Option<(u64, Vec<u8>)> {
        self.bitmap.lock().unwrap().page_bits(index)
    }

    pub fn granularity(&self) -> u64 {
        u64::from(self.layout.granularity)
    }

    pub fn out_of_sync_bytes(&self) -> u64 {
        self.bitmap.lock().unwrap().dirty_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmirror_metadata::layout::{GRANULARITY_DEFAULT_BYTES, MIB};

    #[test]
    fn any_out_of_sync_sees_every_granule_a_range_touches() {
        let disk = tempfile::tempfile().unwrap();
        disk.set_len(16 * MIB).unwrap();
        let layout = Layout::for_disk(16 * MIB, GRANULARITY_DEFAULT_BYTES).unwrap();
        let tracker = ChangeTracker::open(&disk, &layout, "test", 16).unwrap();
        tracker.mark(8192, 1);
        assert!(tracker.any_out_of_sync(8192, 1));
        assert!(
            tracker.any_out_of_sync(0, 8193),
            "ends in the marked granule"
        );
        assert!(tracker.any_out_of_sync(12287, 10), "starts in it");
        assert!(!tracker.any_out_of_sync(0, 8192));
        assert!(!tracker.any_out_of_sync(12288, MIB));
    }

    /// With a write in flight in every extent of a full log, a write to a
    /// new extent waits, and goes on, evicting that extent, once one of
    /// them ends; writes to extents in the log do not wait.
    #[tokio::test]
    async fn a_new_extent_waits_for_a_write_in_flight_to_end() {
        use activity_log::{EXTENTS_MIN, EXTENT_BYTES};
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let size = 256 * MIB;
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let layout = Layout::for_disk(size, GRANULARITY_DEFAULT_BYTES).unwrap();
        let tracker = ChangeTracker::open(
            &std::fs::File::open(&path).unwrap(),
            &layout,
            "test",
            EXTENTS_MIN,
        )
        .unwrap();
        let store = Store::open(&path, blkmirror_io::Engine::Sync).unwrap();
        let mut in_flight = Vec::new();
        for extent in 0..EXTENTS_MIN as u64 {
            in_flight.push(
                tracker
                    .before_write(&store, (extent * EXTENT_BYTES, 4096), false, || {})
                    .await
                    .unwrap()
                    .expect("an extent held"),
            );
        }
        let hot = tracker
            .before_write(&store, (5 * EXTENT_BYTES + 8192, 4096), false, || {})
            .now_or_never()
            .expect("an extent in the log does not wait")
            .unwrap();
        drop(hot);
        let hurried = std::cell::Cell::new(0);
        let hurry = || hurried.set(hurried.get() + 1);
        let mut new =
            Box::pin(tracker.before_write(&store, (40 * EXTENT_BYTES, 4096), false, hurry));
        assert!((&mut new).now_or_never().is_none(), "no extent can leave");
        assert_eq!(hurried.get(), 1, "asked for the barrier that frees extents");
        drop(in_flight.remove(9));
        let logged = tokio::time::timeout(std::time::Duration::from_secs(10), new)
            .await
            .expect("a write ended: room for the new extent")
            .unwrap();
        let extents = tracker.log.log.lock().unwrap().active_extents();
        assert!(
            extents.contains(&40) && !extents.contains(&9),
            "{extents:?}"
        );

        // With every extent busy again, a write the peer misses does not
        // wait: its bitmap pages, durable before it, cover it instead.
        let missed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tracker.before_write(&store, (60 * EXTENT_BYTES, 4096), true, || {}),
        )
        .await
        .expect("a write the peer misses does not wait")
        .unwrap();
        assert!(missed.is_none(), "no extent to hold");
        drop(logged);
        let disk = std::fs::File::open(&path).unwrap();
        let (on_disk, _) = DirtyBitmap::load(&disk, &layout).unwrap();
        assert_eq!(
            on_disk.dirty_bytes(),
            4096,
            "marked on disk before the write"
        );
    }
}
