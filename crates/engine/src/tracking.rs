//! Change tracking for a volume: the dirty bitmap of what the peer lacks,
//! and the activity log that keeps it crash-safe without writing bitmap
//! pages on every write.
//!
//! Order on the write path: (1) if the write touches an extent outside the
//! activity log, persist a log transaction naming it (flushing the bitmap
//! first when that evicts an extent); (2) mark the bitmap in memory; (3)
//! issue the data write. After a crash, every extent of the last log
//! transaction is marked dirty, which covers every write that was in flight.

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
    /// Held across the log write, so a second write to a newly added extent
    /// waits until the transaction naming it is durable.
    log: tokio::sync::Mutex<ActivityLog>,
    recovered: Recovered,
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
            log: tokio::sync::Mutex::new(ActivityLog::new(layout, al_extents, recovered.sequence)),
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

    /// Runs before a data write to `[offset, offset + len)` of the data area.
    /// `peer_missing`: the peer will not get this write, so mark it dirty.
    pub async fn before_write(
        &self,
        store: &Store,
        offset: u64,
        len: u64,
        peer_missing: bool,
    ) -> Result<(), Error> {
        let mut log = self.log.lock().await;
        if let Some(transaction) = log.note_write(offset, len) {
            if !transaction.evicted.is_empty() {
                self.flush(store).await?;
            }
            let slot = AlignedBuf::from_slice(&transaction.slot);
            store.write(transaction.disk_offset, slot, true).await?;
        }
        drop(log);
        if peer_missing {
            self.bitmap.lock().unwrap().mark(offset, len);
        }
        Ok(())
    }

    /// Writes every changed bitmap page and makes them durable.
    pub async fn flush(&self, store: &Store) -> Result<(), Error> {
        let pages = self.bitmap.lock().unwrap().take_unflushed(&self.layout);
        if pages.is_empty() {
            return Ok(());
        }
        for (disk_offset, page) in pages {
            store
                .write(disk_offset, AlignedBuf::from_slice(&page), false)
                .await?;
        }
        store.flush().await?;
        Ok(())
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
}
