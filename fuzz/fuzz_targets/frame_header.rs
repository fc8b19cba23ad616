//! The wire frame header decoder on untrusted bytes never panics, and
//! whatever it accepts encodes back to the same bytes.
#![no_main]

use blkmirror_proto::{FrameHeader, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(bytes) = data.first_chunk::<HEADER_BYTES>() else { return };
    if let Ok(header) = FrameHeader::decode(bytes) {
        assert_eq!(&header.encode(), bytes);
    }
});
