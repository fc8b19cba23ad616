//! The dirty bitmap: one bit per granule of data that may differ from the
//! peer. In memory it is sparse (a page of bits exists only once one of its
//! bits is set), so clean regions cost nothing; on disk it is a run of
//! checksummed 4 KiB pages in the metadata area.
//!
//! On-disk page: magic `BMBP` (u32), version (u16), reserved (u16), page
//! index (u32), CRC32C (u32) over everything else, then 4080 bytes of bits.
//! An all-zero page is a page never written: all clean.

use crate::layout::{Layout, BITMAP_PAGE_BYTES, BITMAP_PAGE_HEADER_BYTES, BITS_PER_BITMAP_PAGE};
use crate::slots::MetaDevice;
use crate::Error;

const PAGE_MAGIC: u32 = u32::from_le_bytes(*b"BMBP");
const PAGE_VERSION: u16 = 1;
const WORDS_PER_PAGE: usize = (BITS_PER_BITMAP_PAGE / 64) as usize;
const _: () = assert!(BITS_PER_BITMAP_PAGE.is_multiple_of(64));

type Page = Box<[u64; WORDS_PER_PAGE]>;

#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    granularity: u64,
    total_bits: u64,
    pages: Vec<Option<Page>>,
    set_per_page: Vec<u32>,
    total_set: u64,
    /// Pages changed in memory since they were last written out.
    unflushed: Vec<bool>,
}

/// Why a page read from disk could not be trusted; it is then taken as all
/// dirty, which can only cost resync time, never data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedPage {
    pub index: u64,
    pub reason: &'static str,
}

impl DirtyBitmap {
    /// A clean bitmap for `data_size` bytes of data.
    pub fn new(data_size: u64, granularity: u32) -> DirtyBitmap {
        let granularity = u64::from(granularity);
        let total_bits = data_size.div_ceil(granularity);
        let page_count = total_bits.div_ceil(BITS_PER_BITMAP_PAGE) as usize;
        DirtyBitmap {
            granularity,
            total_bits,
            pages: (0..page_count).map(|_| None).collect(),
            set_per_page: vec![0; page_count],
            total_set: 0,
            unflushed: vec![false; page_count],
        }
    }

    pub fn for_layout(layout: &Layout) -> DirtyBitmap {
        DirtyBitmap::new(layout.data_size, layout.granularity)
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn total_bits(&self) -> u64 {
        self.total_bits
    }

    pub fn dirty_granules(&self) -> u64 {
        self.total_set
    }

    /// Bytes of data marked out of sync (data sizes are whole granules).
    pub fn dirty_bytes(&self) -> u64 {
        self.total_set * self.granularity
    }

    /// Bytes of memory the set pages take (the clean ones take none).
    pub fn memory_bytes(&self) -> usize {
        let page = std::mem::size_of::<[u64; WORDS_PER_PAGE]>();
        self.pages.iter().flatten().count() * page
            + self.pages.len()
                * (std::mem::size_of::<Option<Page>>() + std::mem::size_of::<u32>() + 1)
    }

    /// Granules touched by `[offset, offset + len)`, clamped to the bitmap.
    fn touched(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.granularity;
        let end = offset.saturating_add(len).div_ceil(self.granularity);
        first.min(self.total_bits)..end.min(self.total_bits)
    }

    /// Granules wholly inside `[offset, offset + len)`.
    fn covered(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset.div_ceil(self.granularity);
        let end = offset.saturating_add(len) / self.granularity;
        // An inverted range (nothing wholly covered) is simply empty.
        first.min(self.total_bits)..end.min(self.total_bits)
    }

    /// Marks every granule the byte range touches. Returns how many were newly set.
    pub fn mark(&mut self, offset: u64, len: u64) -> u64 {
        let range = self.touched(offset, len);
        self.set_bits(range, true)
    }

    /// Clears the granules wholly inside the byte range (a partly covered
    /// granule stays dirty). Returns how many were cleared.
    pub fn clear(&mut self, offset: u64, len: u64) -> u64 {
        let range = self.covered(offset, len);
        self.set_bits(range, false)
    }

    pub fn is_dirty(&self, granule: u64) -> bool {
        if granule >= self.total_bits {
            return false;
        }
        let (page, bit) = split(granule);
        self.pages[page]
            .as_ref()
            .is_some_and(|p| p[bit / 64] & (1 << (bit % 64)) != 0)
    }

    fn set_bits(&mut self, range: std::ops::Range<u64>, value: bool) -> u64 {
        let mut changed = 0;
        let mut granule = range.start;
        while granule < range.end {
            let (page_index, first_bit) = split(granule);
            let page_end = ((page_index as u64 + 1) * BITS_PER_BITMAP_PAGE).min(range.end);
            let count = (page_end - granule) as usize;
            let slot = &mut self.pages[page_index];
            if slot.is_none() && !value {
                granule = page_end;
                continue;
            }
            let page = slot.get_or_insert_with(|| Box::new([0; WORDS_PER_PAGE]));
            // A word at a time: marking a whole volume is 64 bits a step.
            let mut page_changed = 0u32;
            let (mut bit, end) = (first_bit, first_bit + count);
            while bit < end {
                let (word, low) = (bit / 64, bit % 64);
                let high = (end - word * 64).min(64);
                let mask = (!0u64 >> (64 - (high - low))) << low;
                let old = page[word];
                page[word] = if value { old | mask } else { old & !mask };
                page_changed += (old ^ page[word]).count_ones();
                bit = word * 64 + high;
            }
            if page_changed > 0 {
                self.unflushed[page_index] = true;
                if value {
                    self.set_per_page[page_index] += page_changed;
                    self.total_set += u64::from(page_changed);
                } else {
                    self.set_per_page[page_index] -= page_changed;
                    self.total_set -= u64::from(page_changed);
                }
            }
            if self.set_per_page[page_index] == 0 {
                self.pages[page_index] = None; // clean pages cost nothing
            }
            changed += u64::from(page_changed);
            granule = page_end;
        }
        changed
    }

    /// Adds every dirty granule of `other` (the union, for a resync of what
    /// either side changed). Both must describe the same data size.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        assert_eq!(
            self.total_bits, other.total_bits,
            "bitmaps of different volumes"
        );
        for (offset, len) in other.runs() {
            self.mark(offset, len);
        }
    }

    /// Dirty regions as `(offset, len)` byte ranges, adjacent granules merged.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut from = 0u64;
        std::iter::from_fn(move || {
            let (offset, len) = self.run_from(from)?;
            from = offset + len;
            Some((offset, len))
        })
    }

    /// The first dirty region that ends after byte `from`, as `(offset,
    /// len)` (from the start of `from`'s granule if that is dirty), so a
    /// caller can walk the runs without holding the bitmap or collecting
    /// them all.
    pub fn run_from(&self, from: u64) -> Option<(u64, u64)> {
        let start = self.next_dirty(from / self.granularity)?;
        let end = self.next_clean(start);
        Some((start * self.granularity, (end - start) * self.granularity))
    }

    /// Pages of bits, as `page_bits` counts them.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Page `index` of the bitmap, if any of its granules is dirty: its
    /// first granule, and its bits as bytes (granule `first + k` is bit
    /// `k % 8` of byte `k / 8`, least significant first), ending with the
    /// byte that holds the bitmap's last granule.
    pub fn page_bits(&self, index: usize) -> Option<(u64, Vec<u8>)> {
        let page = self.pages.get(index)?.as_ref()?;
        let first = index as u64 * BITS_PER_BITMAP_PAGE;
        let bits = (self.total_bits - first).min(BITS_PER_BITMAP_PAGE);
        let mut bytes: Vec<u8> = page.iter().flat_map(|word| word.to_le_bytes()).collect();
        bytes.truncate(bits.div_ceil(8) as usize);
        Some((first, bytes))
    }

    fn next_dirty(&self, from: u64) -> Option<u64> {
        self.next_with(from, true)
    }

    /// The first clean granule from `from` on (`total_bits` if none).
    fn next_clean(&self, from: u64) -> u64 {
        self.next_with(from, false).unwrap_or(self.total_bits)
    }

    /// The first granule from `from` on that is dirty (or clean), a word at
    /// a time: a run over a whole volume is found quickly.
    fn next_with(&self, from: u64, dirty: bool) -> Option<u64> {
        let wanted = |word: u64| if dirty { word } else { !word };
        let mut granule = from;
        while granule < self.total_bits {
            let (page_index, bit) = split(granule);
            let page_end = (page_index as u64 + 1) * BITS_PER_BITMAP_PAGE;
            let Some(page) = &self.pages[page_index] else {
                // A page never set is all clean.
                if dirty {
                    granule = page_end;
                    continue;
                }
                return Some(granule);
            };
            let (mut word, shift) = (bit / 64, bit % 64);
            let mut bits = wanted(page[word]) & (!0u64 << shift);
            loop {
                if bits != 0 {
                    let found = page_index as u64 * BITS_PER_BITMAP_PAGE
                        + (word * 64) as u64
                        + u64::from(bits.trailing_zeros());
                    // Past the last granule the bits are clean, yet no
                    // granule.
                    return (found < self.total_bits).then_some(found);
                }
                word += 1;
                if word == WORDS_PER_PAGE {
                    break;
                }
                bits = wanted(page[word]);
            }
            granule = page_end;
        }
        None
    }

    /// Reads the on-disk bitmap. Damaged pages come back all dirty, and are
    /// listed so the caller can say so.
    pub fn load(
        dev: &impl MetaDevice,
        layout: &Layout,
    ) -> Result<(DirtyBitmap, Vec<DamagedPage>), Error> {
        let mut bitmap = DirtyBitmap::for_layout(layout);
        let mut damaged = Vec::new();
        let mut buf = vec![0u8; BITMAP_PAGE_BYTES as usize];
        for index in 0..bitmap.pages.len() {
            dev.read_bytes_at(&mut buf, page_offset(layout, index))
                .map_err(|source| Error::Io {
                    what: "reading the dirty bitmap",
                    source,
                })?;
            let first = index as u64 * BITS_PER_BITMAP_PAGE;
            let end = (first + BITS_PER_BITMAP_PAGE).min(bitmap.total_bits);
            match decode_page(&buf, index as u64) {
                Ok(None) => {}
                Ok(Some(words)) => {
                    for granule in first..end {
                        let bit = (granule - first) as usize;
                        if words[bit / 64] & (1 << (bit % 64)) != 0 {
                            bitmap.set_bits(granule..granule + 1, true);
                        }
                    }
                }
                Err(reason) => {
                    damaged.push(DamagedPage {
                        index: index as u64,
                        reason,
                    });
                    bitmap.set_bits(first..end, true);
                }
            }
        }
        bitmap.unflushed.iter_mut().for_each(|u| *u = false);
        for page in &damaged {
            bitmap.unflushed[page.index as usize] = true; // rewrite it whole
        }
        Ok((bitmap, damaged))
    }

    /// Encodes every page changed since the last call, as `(disk offset,
    /// page)`, and counts them as written: the caller must persist them.
    pub fn take_unflushed(&mut self, layout: &Layout) -> Vec<(u64, Vec<u8>)> {
        let mut pages = Vec::new();
        for index in 0..self.pages.len() {
            if std::mem::take(&mut self.unflushed[index]) {
                let page = encode_page(self.pages[index].as_deref(), index as u64);
                pages.push((page_offset(layout, index), page));
            }
        }
        pages
    }

    /// Writes every page changed since the last flush, then syncs.
    pub fn flush(&mut self, dev: &impl MetaDevice, layout: &Layout) -> Result<usize, Error> {
        let io = |source| Error::Io {
            what: "writing the dirty bitmap",
            source,
        };
        let pages = self.take_unflushed(layout);
        for (disk_offset, page) in &pages {
            dev.write_bytes_at(page, *disk_offset).map_err(io)?;
        }
        if !pages.is_empty() {
            dev.sync_data().map_err(io)?;
        }
        Ok(pages.len())
    }
}

fn split(granule: u64) -> (usize, usize) {
    (
        (granule / BITS_PER_BITMAP_PAGE) as usize,
        (granule % BITS_PER_BITMAP_PAGE) as usize,
    )
}

fn page_offset(layout: &Layout, index: usize) -> u64 {
    layout.bitmap_offset + index as u64 * BITMAP_PAGE_BYTES
}

fn page_crc(page: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&page[..12]);
    crc32c::crc32c_append(crc, &page[BITMAP_PAGE_HEADER_BYTES as usize..])
}

pub fn encode_page(words: Option<&[u64; WORDS_PER_PAGE]>, index: u64) -> Vec<u8> {
    let mut page = vec![0u8; BITMAP_PAGE_BYTES as usize];
    page[0..4].copy_from_slice(&PAGE_MAGIC.to_le_bytes());
    page[4..6].copy_from_slice(&PAGE_VERSION.to_le_bytes());
    page[8..12].copy_from_slice(&(index as u32).to_le_bytes());
    if let Some(words) = words {
        for (chunk, word) in page[BITMAP_PAGE_HEADER_BYTES as usize..]
            .chunks_exact_mut(8)
            .zip(words)
        {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
    }
    let crc = page_crc(&page);
    page[12..16].copy_from_slice(&crc.to_le_bytes());
    page
}

/// `Ok(None)` for a never-written (all-zero) page.
pub fn decode_page(
    page: &[u8],
    index: u64,
) -> Result<Option<Box<[u64; WORDS_PER_PAGE]>>, &'static str> {
    if page.len() != BITMAP_PAGE_BYTES as usize {
        return Err("wrong page size");
    }
    if page.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if page[0..4] != PAGE_MAGIC.to_le_bytes() {
        return Err("bad magic");
    }
    if page[4..6] != PAGE_VERSION.to_le_bytes() || page[6..8] != [0, 0] {
        return Err("unsupported version");
    }
    if page[12..16] != page_crc(page).to_le_bytes() {
        return Err("checksum mismatch");
    }
    if page[8..12] != (index as u32).to_le_bytes() {
        return Err("page belongs elsewhere");
    }
    let mut words = Box::new([0u64; WORDS_PER_PAGE]);
    for (word, chunk) in words
        .iter_mut()
        .zip(page[BITMAP_PAGE_HEADER_BYTES as usize..].chunks_exact(8))
    {
        *word = u64::from_le_bytes(chunk.try_into().unwrap());
    }
    Ok(Some(words))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{GRANULARITY_DEFAULT_BYTES, MIB};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const G: u64 = GRANULARITY_DEFAULT_BYTES as u64;

    #[test]
    fn marks_touched_and_clears_covered_granules() {
        let mut b = DirtyBitmap::new(64 * MIB, GRANULARITY_DEFAULT_BYTES);
        assert_eq!(
            b.mark(G - 1, 2),
            2,
            "a 2-byte write across a boundary dirties two granules"
        );
        assert_eq!(
            b.clear(0, G + 1),
            1,
            "only the wholly covered granule is cleared"
        );
        assert!(b.is_dirty(1) && !b.is_dirty(0));
        assert_eq!(b.dirty_bytes(), G);
    }

    #[test]
    fn terabyte_bitmap_is_cheap_while_clean() {
        let mut b = DirtyBitmap::new(1 << 40, GRANULARITY_DEFAULT_BYTES);
        assert!(b.memory_bytes() < 200 * 1024, "{} bytes", b.memory_bytes());
        b.mark(500 << 30, 1);
        b.clear(500 << 30, G);
        assert_eq!(b.dirty_granules(), 0);
        assert!(
            b.pages.iter().all(Option::is_none),
            "a page cleared again is freed"
        );
    }

    #[test]
    fn a_whole_terabyte_marks_and_reads_back_as_one_run() {
        // Word at a time both ways: this takes moments, not seconds.
        let size = (1 << 40) + 5 * G;
        let mut b = DirtyBitmap::new(size, GRANULARITY_DEFAULT_BYTES);
        assert_eq!(b.mark(0, size), size / G);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, size)]);
        b.clear(G, G);
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![(0, G), (2 * G, size - 2 * G)]
        );
    }

    #[test]
    fn runs_merge_neighbours_and_cross_pages() {
        let mut b = DirtyBitmap::new(2 << 30, GRANULARITY_DEFAULT_BYTES);
        let page_bytes = BITS_PER_BITMAP_PAGE * G;
        b.mark(page_bytes - 2 * G, 4 * G);
        b.mark(10 * G, G);
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(runs, vec![(10 * G, G), (page_bytes - 2 * G, 4 * G)]);
    }

    #[test]
    fn run_from_finds_the_run_holding_or_after_an_offset() {
        let mut b = DirtyBitmap::new(2 << 30, GRANULARITY_DEFAULT_BYTES);
        let page_bytes = BITS_PER_BITMAP_PAGE * G;
        b.mark(10 * G, 3 * G);
        b.mark(page_bytes + 5 * G, G);
        assert_eq!(b.run_from(0), Some((10 * G, 3 * G)));
        // From inside a run: from the start of its granule on.
        assert_eq!(b.run_from(11 * G + 100), Some((11 * G, 2 * G)));
        assert_eq!(b.run_from(13 * G), Some((page_bytes + 5 * G, G)));
        assert_eq!(b.run_from(page_bytes + 6 * G), None);
        assert_eq!(b.run_from(4 << 30), None, "beyond the data");
    }

    #[test]
    fn page_bits_hold_each_dirty_granule_and_end_with_the_bitmap() {
        // One full page and a last page of 100 granules.
        let data_size = (BITS_PER_BITMAP_PAGE + 100) * G;
        let mut b = DirtyBitmap::new(data_size, GRANULARITY_DEFAULT_BYTES);
        b.mark(3 * G, 2 * G);
        b.mark((BITS_PER_BITMAP_PAGE + 99) * G, G);
        assert_eq!(b.page_count(), 2);
        let (first, bytes) = b.page_bits(0).unwrap();
        assert_eq!(first, 0);
        assert_eq!(bytes.len() as u64, BITS_PER_BITMAP_PAGE / 8);
        assert_eq!(bytes[0], 0b0001_1000);
        assert!(bytes[1..].iter().all(|&byte| byte == 0));
        let (first, bytes) = b.page_bits(1).unwrap();
        assert_eq!(first, BITS_PER_BITMAP_PAGE);
        assert_eq!(bytes.len(), 13, "100 granules end in byte 12");
        assert_eq!(bytes[12], 1 << 3);
        b.clear(0, 8 * G);
        assert!(b.page_bits(0).is_none(), "a clean page has no bits to tell");
    }

    #[test]
    fn flush_and_load_round_trip_and_damage_is_dirty() {
        let layout = Layout::for_disk(256 * MIB, GRANULARITY_DEFAULT_BYTES).unwrap();
        let dev = tempfile::tempfile().unwrap();
        dev.set_len(256 * MIB).unwrap();
        let mut b = DirtyBitmap::for_layout(&layout);
        b.mark(0, 3 * G);
        b.mark(200 * MIB, 10);
        assert_eq!(b.flush(&dev, &layout).unwrap(), 2);
        assert_eq!(b.flush(&dev, &layout).unwrap(), 0, "nothing changed since");
        let (loaded, damaged) = DirtyBitmap::load(&dev, &layout).unwrap();
        assert!(damaged.is_empty());
        assert_eq!(
            loaded.runs().collect::<Vec<_>>(),
            b.runs().collect::<Vec<_>>()
        );
        // Tear page 0: it comes back all dirty, never clean.
        dev.write_bytes_at(&[0xEE; 8], layout.bitmap_offset + 100)
            .unwrap();
        let (loaded, damaged) = DirtyBitmap::load(&dev, &layout).unwrap();
        assert_eq!(
            damaged,
            vec![DamagedPage {
                index: 0,
                reason: "checksum mismatch"
            }]
        );
        assert!(loaded.dirty_granules() >= BITS_PER_BITMAP_PAGE.min(loaded.total_bits()));
    }

    proptest! {
        #[test]
        fn agrees_with_a_set_model(ops in proptest::collection::vec((any::<bool>(), 0u64..(300 * MIB), 1u64..(2 * MIB)), 1..40)) {
            let size = 256 * MIB;
            let mut b = DirtyBitmap::new(size, GRANULARITY_DEFAULT_BYTES);
            let mut model = BTreeSet::new();
            for (mark, offset, len) in ops {
                if mark {
                    b.mark(offset, len);
                    let end = (offset + len).div_ceil(G).min(size / G);
                    model.extend((offset / G).min(end)..end);
                } else {
                    b.clear(offset, len);
                    let (first, end) = (offset.div_ceil(G), ((offset + len) / G).min(size / G));
                    for g in first..end { model.remove(&g); }
                }
            }
            prop_assert_eq!(b.dirty_granules(), model.len() as u64);
            let from_runs: BTreeSet<u64> = b.runs().flat_map(|(o, l)| (o / G)..((o + l) / G)).collect();
            prop_assert_eq!(from_runs, model);
        }

        #[test]
        fn arbitrary_pages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 4096), index: u64) {
            let _ = decode_page(&bytes, index);
        }
    }
}
