//! The wire decoder (frame header, payload checksum, message) on untrusted
//! bytes never panics, and whatever it accepts encodes back to the same bytes.
#![no_main]

use blkmirror_proto::{decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, message, used))) = decode_frame(data) {
        if header.flags == 0 {
            assert_eq!(encode_frame(&message, header.volume_uuid, header.sequence), &data[..used]);
        }
    }
});
