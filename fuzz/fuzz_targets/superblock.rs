//! The superblock decoder on untrusted bytes never panics, and whatever it
//! accepts encodes back to the same bytes.
#![no_main]

use blkmirror_metadata::superblock::{Superblock, ENCODED_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data) {
        assert_eq!(&sb.encode()[..], &data[..ENCODED_BYTES]);
    }
});
