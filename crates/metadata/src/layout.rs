//! Where things live on a blkmirror disk.
//!
//! ```text
//! 0        4 KiB     8 KiB          64 KiB            512 KiB              data_offset
//! | slot 0 | slot 1  | (reserved)   | activity log    | dirty bitmap ...   | data area ...
//! ```
//!
//! The metadata area is sized from the disk: the bitmap needs one bit per
//! granule of data, and the whole area is rounded up to a MiB so the data area
//! starts aligned for O_DIRECT on any device.

use serde::Serialize;

use crate::Error;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// Size of one superblock slot; two slots alternate.
pub const SLOT_SIZE_BYTES: u64 = 4 * KIB;
pub const SLOT_COUNT: u64 = 2;
/// Activity log region (used from the replication issue on).
pub const AL_OFFSET_BYTES: u64 = 64 * KIB;
pub const AL_SIZE_BYTES: u64 = 448 * KIB;
/// The on-disk dirty bitmap follows the activity log.
pub const BITMAP_OFFSET_BYTES: u64 = AL_OFFSET_BYTES + AL_SIZE_BYTES;
/// The metadata area is a multiple of this, and at least this large.
pub const MD_ALIGN_BYTES: u64 = MIB;
pub const GRANULARITY_DEFAULT_BYTES: u32 = 4096;
pub const GRANULARITY_MIN_BYTES: u32 = 4096;
/// One resync chunk: a resync clears only granules a chunk covers whole.
pub const GRANULARITY_MAX_BYTES: u32 = 1024 * 1024;
/// Bitmap pages are written whole: a 16-byte header (magic, version, page
/// index, checksum), then the bits.
pub const BITMAP_PAGE_BYTES: u64 = 4 * KIB;
pub const BITMAP_PAGE_HEADER_BYTES: u64 = 16;
pub const BITS_PER_BITMAP_PAGE: u64 = (BITMAP_PAGE_BYTES - BITMAP_PAGE_HEADER_BYTES) * 8;

const _: () = assert!(SLOT_SIZE_BYTES * SLOT_COUNT <= AL_OFFSET_BYTES);
const _: () = assert!(BITMAP_OFFSET_BYTES.is_multiple_of(BITMAP_PAGE_BYTES));
const _: () = assert!(BITMAP_OFFSET_BYTES < MD_ALIGN_BYTES);
const _: () = assert!(MD_ALIGN_BYTES.is_multiple_of(GRANULARITY_MIN_BYTES as u64));

/// The placement of every region on one disk. Stored in the superblock so a
/// later change of the sizing rule never moves existing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub data_offset: u64,
    pub data_size: u64,
    pub al_offset: u64,
    pub al_size: u64,
    pub bitmap_offset: u64,
    pub bitmap_size: u64,
    pub granularity: u32,
}

impl Layout {
    /// Plans a disk of `disk_size` bytes with the given bitmap granularity.
    pub fn for_disk(disk_size: u64, granularity: u32) -> Result<Layout, Error> {
        check_granularity(granularity)?;
        let granularity_bytes = u64::from(granularity);
        // One bit per granule of the whole disk is an upper bound for the data area.
        let bits = disk_size.div_ceil(granularity_bytes);
        let bitmap_size = bits.div_ceil(BITS_PER_BITMAP_PAGE) * BITMAP_PAGE_BYTES;
        let md_size = (BITMAP_OFFSET_BYTES + bitmap_size).next_multiple_of(MD_ALIGN_BYTES);
        let data_size = disk_size.saturating_sub(md_size) / granularity_bytes * granularity_bytes;
        if data_size == 0 {
            return Err(Error::DiskTooSmall {
                disk_size,
                minimum: md_size + granularity_bytes,
            });
        }
        Ok(Layout {
            data_offset: md_size,
            data_size,
            al_offset: AL_OFFSET_BYTES,
            al_size: AL_SIZE_BYTES,
            bitmap_offset: BITMAP_OFFSET_BYTES,
            bitmap_size,
            granularity,
        })
    }

    /// Checks a layout read from disk before anything trusts it.
    pub fn validate(&self, disk_size: u64) -> Result<(), Error> {
        check_granularity(self.granularity)?;
        let invalid = |reason: &str| Err(Error::InvalidLayout(reason.to_string()));
        if !self.data_offset.is_multiple_of(MD_ALIGN_BYTES) || self.data_offset == 0 {
            return invalid("data offset is not a non-zero multiple of 1 MiB");
        }
        if self.al_offset != AL_OFFSET_BYTES || self.al_size != AL_SIZE_BYTES {
            return invalid("activity log is not where format version 1 puts it");
        }
        if self.bitmap_offset != BITMAP_OFFSET_BYTES {
            return invalid("bitmap is not where format version 1 puts it");
        }
        let granules = self.data_size / u64::from(self.granularity);
        if self.data_size == 0 || !self.data_size.is_multiple_of(u64::from(self.granularity)) {
            return invalid("data size is not a non-zero multiple of the granularity");
        }
        if self.bitmap_size < granules.div_ceil(BITS_PER_BITMAP_PAGE) * BITMAP_PAGE_BYTES {
            return invalid("bitmap is too small for the data area");
        }
        match self.bitmap_offset.checked_add(self.bitmap_size) {
            Some(end) if end <= self.data_offset => {}
            _ => return invalid("bitmap overlaps the data area"),
        }
        match self.data_offset.checked_add(self.data_size) {
            Some(end) if end <= disk_size => Ok(()),
            _ => Err(Error::DiskShrank {
                needed: self.data_offset.saturating_add(self.data_size),
                disk_size,
            }),
        }
    }
}

/// A bitmap granularity is a power of two within the supported range.
pub fn check_granularity(granularity: u32) -> Result<(), Error> {
    if !granularity.is_power_of_two()
        || !(GRANULARITY_MIN_BYTES..=GRANULARITY_MAX_BYTES).contains(&granularity)
    {
        return Err(Error::InvalidLayout(format!(
            "bitmap granularity {granularity} is not a power of two between \
             {GRANULARITY_MIN_BYTES} and {GRANULARITY_MAX_BYTES} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_disk_gets_one_mib_of_metadata() {
        let layout = Layout::for_disk(64 * MIB, GRANULARITY_DEFAULT_BYTES).unwrap();
        assert_eq!(layout.data_offset, MIB);
        assert_eq!(layout.data_size, 63 * MIB);
        layout.validate(64 * MIB).unwrap();
    }

    #[test]
    fn terabyte_disk_has_room_for_its_bitmap() {
        let disk = 1024 * 1024 * MIB;
        let layout = Layout::for_disk(disk, GRANULARITY_DEFAULT_BYTES).unwrap();
        // 2^28 granules need 8225 pages of 32640 bits: a little over 32 MiB.
        assert_eq!(layout.bitmap_size, 8225 * BITMAP_PAGE_BYTES);
        assert_eq!(layout.data_offset, 33 * MIB);
        layout.validate(disk).unwrap();
    }

    #[test]
    fn tiny_disk_is_refused() {
        assert!(matches!(
            Layout::for_disk(MIB, GRANULARITY_DEFAULT_BYTES),
            Err(Error::DiskTooSmall { .. })
        ));
    }

    #[test]
    fn odd_granularity_is_refused() {
        assert!(Layout::for_disk(64 * MIB, 5000).is_err());
        assert!(Layout::for_disk(64 * MIB, 512).is_err());
    }

    #[test]
    fn shrunk_disk_is_detected() {
        let layout = Layout::for_disk(64 * MIB, GRANULARITY_DEFAULT_BYTES).unwrap();
        assert!(matches!(
            layout.validate(32 * MIB),
            Err(Error::DiskShrank { .. })
        ));
    }

    #[test]
    fn overflowing_layout_is_an_error_not_a_panic() {
        let mut layout = Layout::for_disk(64 * MIB, GRANULARITY_DEFAULT_BYTES).unwrap();
        layout.data_size = u64::MAX / 4096 * 4096;
        layout.bitmap_size = u64::MAX - 4096;
        assert!(layout.validate(64 * MIB).is_err());
    }
}
