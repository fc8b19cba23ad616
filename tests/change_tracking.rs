//! The dirty bitmap and activity log of a running node: writes the peer
//! lacks are counted to the granule, survive a clean restart, and after a
//! crash the activity log bounds what is marked.

mod common;

use std::process::Command;

use common::*;

const GRANULE: u64 = 4096;
const EXTENT: u64 = 4 << 20;

fn out_of_sync(res: &Resource) -> u64 {
    res.json("alpha", &["status", "--json"])["out_of_sync_bytes"]
        .as_u64()
        .unwrap()
}

fn on_disk(res: &Resource) -> serde_json::Value {
    res.json("alpha", &["dump-md", "--json"])
}

/// Out-of-sync bytes match what was written, to the granule, and the
/// count survives `down` and `up` through the on-disk bitmap.
#[test]
fn written_ranges_are_counted_and_persisted() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let alpha = res.primary("alpha");
    assert_eq!(out_of_sync(&res), 0, "nothing written yet");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &res.uri("alpha"),
        "-c",
        "write -P 1 0 1M",
        "-c",
        "write -P 2 10M 4k",
        "-c",
        // One byte either side of a granule boundary dirties both granules.
        "write -P 3 20971519 2",
        "-c",
        "write -z 30M 64k",
    ]));
    let expected = (1 << 20) + GRANULE + 2 * GRANULE + (64 << 10);
    assert_eq!(out_of_sync(&res), expected);
    res.down("alpha", alpha);
    let md = on_disk(&res);
    assert_eq!(md["out_of_sync_bytes"], expected, "{md}");
    assert_eq!(md["bitmap_damaged_pages"], 0);
    let _alpha = res.up("alpha");
    assert_eq!(
        out_of_sync(&res),
        expected,
        "the bitmap came back from disk"
    );
}

/// After kill -9, the extents named by the activity log are marked out of
/// sync: every write that may have been in flight is covered, and no more
/// than those extents is added.
#[test]
fn crash_marks_the_activity_log_extents() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let mut alpha = res.primary("alpha");
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &res.uri("alpha"),
        "-c",
        "write -P 1 0 4k",
        "-c",
        "write -P 2 41943040 4k", // extent 10
    ]));
    assert_eq!(out_of_sync(&res), 2 * GRANULE);
    alpha.child.kill().unwrap();
    alpha.child.wait().unwrap();
    let md = on_disk(&res);
    assert_eq!(md["activity_log"]["extents"], 2, "{md}");
    // The bitmap pages were never written: only the log knows.
    assert_eq!(md["out_of_sync_bytes"], 0, "{md}");
    let _alpha = res.up("alpha");
    assert_eq!(out_of_sync(&res), 2 * EXTENT, "both hot extents, whole");
    // Recovery persisted the marks before anything else could drop them.
    let md = on_disk(&res);
    assert_eq!(md["out_of_sync_bytes"], 2 * EXTENT, "{md}");
}

/// A damaged bitmap page counts as wholly out of sync, never as clean.
#[test]
fn damaged_bitmap_page_counts_as_dirty() {
    let res = Resource::new();
    let alpha = res.primary("alpha");
    res.down("alpha", alpha);
    let md = on_disk(&res);
    let bitmap_offset = md["bitmap_offset"].as_u64().unwrap();
    // Write a non-zero, non-checksummed page in place of bitmap page 0.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(res.disk("alpha"))
            .unwrap();
        f.write_all_at(&[0x42; 64], bitmap_offset).unwrap();
    }
    let md = on_disk(&res);
    assert_eq!(md["bitmap_damaged_pages"], 1, "{md}");
    // Page 0 covers more than this 63 MiB volume: all of it is out of sync.
    assert_eq!(md["out_of_sync_bytes"], DATA_BYTES, "{md}");
    let _alpha = res.up("alpha");
    assert_eq!(out_of_sync(&res), DATA_BYTES);
}
