//! The NBD request parser on untrusted bytes: decoding a stream of requests
//! and checking each against an export size never panics, and every request
//! it accepts lies inside the export.
#![no_main]

use blkmirror_nbd::proto::{decode_stream, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((size_bytes, stream)) = data.split_first_chunk::<8>() else { return };
    let size = u64::from_be_bytes(*size_bytes);
    for (header, verdict) in decode_stream(stream, size).into_iter().flatten() {
        if verdict.is_ok() && !matches!(header.command, Command::Flush | Command::Disconnect) {
            let end = header.offset.checked_add(u64::from(header.length));
            assert!(end.is_some_and(|e| e <= size), "accepted an out-of-range request");
        }
    }
});
