//! Matrix 6: a crash at every point of the metadata update sequence. The
//! node runs on a store that persists only its first N writes (data,
//! activity log, bitmap pages and superblocks alike) and drops the rest, as
//! a power cut after write N would; then it restarts on what reached the
//! disk. For every N it must come up with consistent metadata, and the
//! pair must converge to identical replicas: whatever reached one disk and
//! not the other is covered by the bitmap or the activity log.
//!
//! Needs the `fault-injection` feature (test builds only).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// The disk writes a node's log says it made, from its last clean exit.
fn writes_seen(log: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains("disk writes seen"))
        .expect("the node logs its write count on the way down");
    let count = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("writes="))
        .expect("writes=N in the line");
    count.parse().unwrap()
}

fn snapshot(res: &Resource) -> [Vec<u8>; 2] {
    ["alpha", "beta"].map(|node| std::fs::read(res.disk(node)).unwrap())
}

fn restore(res: &Resource, disks: &[Vec<u8>; 2]) {
    for (node, bytes) in ["alpha", "beta"].iter().zip(disks) {
        std::fs::write(res.disk(node), bytes).unwrap();
    }
}

/// Writes through the primary's NBD export: scattered, some sharing an
/// activity-log extent, one crossing an extent boundary.
async fn write_some(socket: &Path) {
    let mut client = blkmirror_nbd::Client::connect_unix(socket, RESOURCE)
        .await
        .unwrap();
    for (i, offset) in [0u64, 64 << 10, 10 << 20, (8 << 20) - 4096, 40 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, offset, 8192);
        client.write(offset, &data, false).await.unwrap();
    }
    client.disconnect().await.unwrap();
}

/// Runs `sequence` on a node that persists only its first `persist`
/// writes, then brings both nodes up normally and checks that the node
/// came up and the pair converges to identical replicas. Returns the writes
/// the node saw.
async fn crash_at(
    res: &Resource,
    node: &str,
    persist: u64,
    sequence: impl AsyncFnOnce(&Resource),
) -> u64 {
    let faulty = res.up_with_faults(node, &format!("persist={persist}"));
    let log_path = faulty.log_path.clone();
    sequence(res).await;
    res.down(node, faulty);
    let seen = writes_seen(&std::fs::read_to_string(log_path).unwrap());
    // What is on the disks now is what a power cut after write `persist`
    // would have left.
    let alpha = res.up("alpha");
    let beta = res.up("beta");
    let status = res.wait_status(node, "in sync after the crash", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    assert_ne!(status["disk_state"], "Inconsistent", "{status}");
    res.wait_status(
        if node == "alpha" { "beta" } else { "alpha" },
        "in sync",
        |s| s["replication"] == "Established" && s["out_of_sync_bytes"] == 0,
    );
    res.assert_identical();
    res.down("alpha", alpha);
    res.down("beta", beta);
    seen
}

/// Runs `sequence` crashing after every possible write in turn, from the
/// same starting disks each time.
async fn every_crash_point(res: &Resource, node: &str, sequence: impl AsyncFn(&Resource)) {
    let start = snapshot(res);
    let total = crash_at(res, node, u64::MAX, &sequence).await;
    eprintln!("{node}'s sequence makes {total} disk writes");
    assert!(total > 5, "the sequence wrote almost nothing: {total}");
    for persist in 0..total {
        restore(res, &start);
        crash_at(res, node, persist, &sequence).await;
    }
}

/// A primary that writes without its peer: a new generation, activity-log
/// transactions, data, then a clean shutdown that writes the bitmap and the
/// superblock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_writing_alone() {
    let res = Resource::new();
    let (alpha, beta) = synced_pair(&res);
    res.down("alpha", alpha);
    res.down("beta", beta);
    every_crash_point(&res, "alpha", async |res: &Resource| {
        res.ok("alpha", &["primary"]);
        write_some(&res.nbd_socket("alpha")).await;
        res.ok("alpha", &["secondary"]);
    })
    .await;
}

/// A secondary taking a differential resync: its data, the bitmap it
/// clears and the superblock that declares it UpToDate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_taking_a_resync() {
    let res = Resource::new();
    let (alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    write_some(&res.nbd_socket("alpha")).await;
    res.ok("alpha", &["secondary"]);
    res.down("alpha", alpha);
    every_crash_point(&res, "beta", async |res: &Resource| {
        let alpha = res.up("alpha");
        res.wait_status("beta", "the resync", |s| {
            s["replication"] == "Established" && s["disk_state"] == "UpToDate"
        });
        res.down("alpha", alpha);
        std::thread::sleep(Duration::from_millis(50));
    })
    .await;
}
