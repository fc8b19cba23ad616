//! The metadata-area decoders (superblock, bitmap page, activity-log slot)
//! on untrusted bytes never panic, and what they accept encodes back to the
//! same bytes.
#![no_main]

use blkmirror_metadata::activity_log::{decode_slot, encode_slot};
use blkmirror_metadata::bitmap::{decode_page, encode_page};
use blkmirror_metadata::superblock::{Superblock, ENCODED_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data) {
        assert_eq!(&sb.encode()[..], &data[..ENCODED_BYTES]);
    }
    // Pages and slots are 4 KiB; shorter input is padded with zeroes.
    let mut block = [0u8; 4096];
    let n = data.len().min(4096);
    block[..n].copy_from_slice(&data[..n]);
    let index = u64::from(data.first().copied().unwrap_or(0));
    if let Ok(Some(words)) = decode_page(&block, index) {
        assert_eq!(encode_page(Some(&words), index), block);
    }
    if let Ok(Some((sequence, extents))) = decode_slot(&block) {
        assert_eq!(encode_slot(sequence, &extents), block);
    }
});
