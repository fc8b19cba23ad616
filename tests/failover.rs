//! The failover matrix: two real nodes, faults injected by killing
//! processes, and after each fault the stamped workload checker proves that
//! no acknowledged write was lost and the replicas end byte-identical.

mod common;

use std::time::Duration;

use common::stamped::{Ended, Stamped};
use common::*;

/// Blocks the workload writes: 8 MiB, so the activity log covers few
/// extents of the 63 MiB data area and a crash must not copy it all.
const BLOCKS: u64 = 2048;
const WRITES: u64 = 1_000_000;
const WORKLOAD_LIMIT: Duration = Duration::from_secs(60);

/// Kills `pids` with SIGKILL together after `delay`, from another thread,
/// so the workload is cut off in the middle of its stream.
fn kill_after(delay: Duration, pids: Vec<u32>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        for pid in pids {
            // SAFETY: kill(2) with a pid this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    })
}

fn wait_gone(process: &mut NodeProcess) {
    process.child.wait().unwrap();
}

/// A workload run that the kill cuts off.
async fn run_until_killed(res: &Resource, work: &mut Stamped, node: &str, kill: Vec<u32>) {
    let killer = kill_after(Duration::from_millis(400), kill);
    let ended = work
        .run(&res.nbd_socket(node), RESOURCE, WRITES, WORKLOAD_LIMIT)
        .await;
    killer.join().unwrap();
    assert_eq!(ended, Ended::Broke, "the workload outlived the kill");
    assert!(
        work.acknowledged() > 50,
        "too few writes before the kill: {}",
        work.acknowledged()
    );
}

async fn run_to_end(res: &Resource, work: &mut Stamped, node: &str, writes: u64) {
    let ended = work
        .run(&res.nbd_socket(node), RESOURCE, writes, WORKLOAD_LIMIT)
        .await;
    assert_eq!(ended, Ended::Done, "the workload on {node} broke");
}

/// Matrix 1: the primary is killed mid-write; the secondary is promoted
/// (by force: it cannot know the primary is gone for good), serves writes,
/// and the old primary returns as secondary and takes a differential
/// resync back, including the regions its activity log says it may have
/// written alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_fails_over_and_returns_as_secondary() {
    let res = Resource::new();
    let (mut alpha, _beta) = synced_pair(&res);
    let mut work = Stamped::new(BLOCKS);
    run_until_killed(&res, &mut work, "alpha", vec![alpha.child.id()]).await;
    wait_gone(&mut alpha);
    let checked = work.verify("beta after the primary died", &res.data_area("beta"));
    eprintln!("{checked} written blocks checked on beta");

    let status = res.wait_status("beta", "losing the primary", |s| {
        s["connection"] != "Connected"
    });
    assert_eq!(status["disk_state"], "Consistent", "{status}");
    let refusal = res.fails("beta", &["primary"]);
    assert!(refusal.contains("may have written"), "{refusal}");
    res.ok("beta", &["primary", "--force"]);
    run_to_end(&res, &mut work, "beta", 3000).await;

    let _alpha = res.up("alpha");
    let done = res.wait_status("beta", "a finished resync", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    let alpha_status = res.wait_established("alpha");
    assert_eq!(alpha_status["role"], "Secondary");
    assert_eq!(alpha_status["disk_state"], "UpToDate", "{alpha_status}");
    let moved = done["resync"]["done_bytes"].as_u64().unwrap();
    eprintln!("resync back to alpha moved {moved} bytes");
    assert!(
        moved < DATA_BYTES / 2,
        "a differential resync, not a full copy: {moved}"
    );
    res.assert_identical();
    work.verify("alpha after its return", &res.data_area("alpha"));
    work.verify("beta", &res.data_area("beta"));
}

/// Matrix 2: both nodes are killed at once in the middle of the stream
/// (a power loss). Both restart; the crashed primary is the source, and
/// its activity log bounds what is copied: no full copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_killed_converge_by_a_resync_bounded_by_the_activity_log() {
    let res = Resource::new();
    let (mut alpha, mut beta) = synced_pair(&res);
    let mut work = Stamped::new(BLOCKS);
    let pids = vec![alpha.child.id(), beta.child.id()];
    run_until_killed(&res, &mut work, "alpha", pids).await;
    wait_gone(&mut alpha);
    wait_gone(&mut beta);
    work.verify("alpha after the power loss", &res.data_area("alpha"));
    work.verify("beta after the power loss", &res.data_area("beta"));

    let _beta = res.up("beta");
    let _alpha = res.up("alpha");
    let done = res.wait_status("alpha", "a finished resync", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.wait_established("beta");
    let moved = done["resync"]["done_bytes"].as_u64().unwrap();
    eprintln!("resync after the power loss moved {moved} bytes");
    // The workload touched 8 MiB: two 4 MiB activity-log extents.
    assert!(
        moved <= (BLOCKS * 4096).next_multiple_of(4 << 20) + (4 << 20),
        "the resync went beyond the activity log: {moved} bytes"
    );
    res.assert_identical();
    // Resynced, the crash is forgotten: the other node may become primary
    // and reconnect without alpha being taken for the newer side.
    res.ok("beta", &["primary"]);
    res.ok("beta", &["disconnect"]);
    res.wait_status("beta", "StandAlone", |s| s["connection"] == "StandAlone");
    res.ok("beta", &["connect"]);
    res.wait_established("beta");
    res.wait_established("alpha");
    res.ok("beta", &["secondary"]);
    // The crashed primary may be promoted again: it held the newest data.
    res.ok("alpha", &["primary"]);
    run_to_end(&res, &mut work, "alpha", 500).await;
    res.ok("alpha", &["secondary"]);
    res.wait_status("alpha", "no writes in flight", |s| {
        s["out_of_sync_bytes"] == 0
    });
    res.assert_identical();
    work.verify("alpha", &res.data_area("alpha"));
    work.verify("beta", &res.data_area("beta"));
}

/// Matrix 3: the secondary is disconnected while the primary writes on,
/// then the primary stops. The secondary cannot know what it missed:
/// `primary` is refused, and `--force` (a new generation) is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_that_missed_writes_is_promoted_only_by_force() {
    let res = Resource::new();
    let (alpha, _beta) = synced_pair(&res);
    res.ok("beta", &["disconnect"]);
    res.wait_status("alpha", "the secondary gone", |s| {
        s["connection"] != "Connected"
    });
    let mut work = Stamped::new(BLOCKS);
    run_to_end(&res, &mut work, "alpha", 500).await;
    res.down("alpha", alpha);

    let status = res.status("beta");
    assert_eq!(status["disk_state"], "Consistent", "{status}");
    let refusal = res.fails("beta", &["primary"]);
    assert!(refusal.contains("may have written"), "{refusal}");
    assert!(refusal.contains("--force"), "{refusal}");
    assert_eq!(res.status("beta")["role"], "Secondary");
    let generation = status["generations"]["current"].clone();
    res.ok("beta", &["primary", "--force"]);
    let forced = res.status("beta");
    assert_eq!(forced["role"], "Primary");
    assert_eq!(forced["disk_state"], "UpToDate");
    assert_ne!(
        forced["generations"]["current"], generation,
        "a forced promotion starts a new generation"
    );
}

/// A planned switchover needs no force: a primary that goes down cleanly
/// tells its peer, which stays UpToDate and may be promoted at once. A
/// node refuses to become a second primary while connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_needs_no_force() {
    let res = Resource::new();
    let (alpha, _beta) = synced_pair(&res);
    let refusal = res.fails("beta", &["primary"]);
    assert!(refusal.contains("two primaries"), "{refusal}");
    let mut work = Stamped::new(BLOCKS);
    run_to_end(&res, &mut work, "alpha", 500).await;
    res.down("alpha", alpha);
    let status = res.wait_status("beta", "losing the peer", |s| {
        s["connection"] != "Connected"
    });
    assert_eq!(status["disk_state"], "UpToDate", "{status}");
    res.ok("beta", &["primary"]);
    run_to_end(&res, &mut work, "beta", 500).await;
    let _alpha = res.up("alpha");
    res.wait_status("alpha", "a finished resync", |s| {
        s["replication"] == "Established" && s["disk_state"] == "UpToDate"
    });
    res.ok("beta", &["secondary"]);
    res.assert_identical();
    work.verify("alpha", &res.data_area("alpha"));
}

/// Both nodes write while apart: alpha as the primary it was, beta after a
/// forced promotion. Returns the workload alpha wrote.
async fn split_brain(res: &Resource) -> Stamped {
    res.ok("beta", &["disconnect"]);
    res.wait_status("alpha", "the secondary gone", |s| {
        s["connection"] != "Connected"
    });
    let mut work = Stamped::new(BLOCKS);
    run_to_end(res, &mut work, "alpha", 1000).await;
    res.ok("beta", &["primary", "--force"]);
    // 1 MiB in 256 scattered blocks: beta's report of what it changed
    // goes as a bitmap rather than as 256 ranges.
    let scattered: Vec<String> = (0..256)
        .map(|i| format!("write -P 0x5a {} 4k", (32 << 20) + i * (64 << 10)))
        .collect();
    let commands: Vec<&str> = scattered.iter().map(String::as_str).collect();
    res.qemu_io("beta", &commands);
    res.ok("alpha", &["secondary"]);
    res.ok("beta", &["secondary"]);
    work
}

/// Matrix 4: a split brain is refused and touches nothing; `connect
/// --discard-my-data` on the victim resolves it by a differential resync
/// of both sides' changes from the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_is_resolved_by_discarding_one_side() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    let work = split_brain(&res).await;
    let (alpha_dirty, beta_dirty) = (
        res.status("alpha")["out_of_sync_bytes"].as_u64().unwrap(),
        res.status("beta")["out_of_sync_bytes"].as_u64().unwrap(),
    );
    assert_eq!(beta_dirty, 1 << 20);
    let (alpha_before, beta_before) = (res.data_area("alpha"), res.data_area("beta"));
    res.ok("beta", &["connect"]);
    let status = res.wait_error("alpha", "split brain");
    let advice = status["last_error"].as_str().unwrap();
    assert!(advice.contains("--discard-my-data"), "{advice}");
    assert!(
        res.data_area("alpha") == alpha_before,
        "alpha's data changed"
    );
    assert!(res.data_area("beta") == beta_before, "beta's data changed");

    // The victim must not be primary.
    res.ok("beta", &["primary", "--force"]);
    let refusal = res.fails("beta", &["connect", "--discard-my-data"]);
    assert!(refusal.contains("Demote it first"), "{refusal}");
    res.ok("beta", &["secondary"]);

    res.ok("beta", &["connect", "--discard-my-data"]);
    res.ok("alpha", &["connect"]);
    let done = res.wait_status("alpha", "the resync to beta", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.wait_established("beta");
    let moved = done["resync"]["done_bytes"].as_u64().unwrap();
    eprintln!(
        "split brain resolved: moved {moved} bytes (alpha changed {alpha_dirty}, beta 1 MiB)"
    );
    assert!(
        beta.log().contains("ranges=0 bitmap_pages=1"),
        "beta's 256 scattered blocks went as one page of bits"
    );
    // The two sides changed different blocks: the union is both.
    assert_eq!(
        moved,
        alpha_dirty + beta_dirty,
        "a differential resync of the union"
    );
    res.assert_identical();
    work.verify("beta after discarding its data", &res.data_area("beta"));
    assert_eq!(res.status("beta")["disk_state"], "UpToDate");
}

/// `connect --discard-my-data` on a node promoted before any session used
/// it discards nothing: the promotion calls it off (its clients' writes are
/// not to be discarded), and the split brain stands, both data sets
/// untouched, even once the node is demoted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_calls_off_discard_my_data() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, _beta) = synced_pair(&res);
    let _work = split_brain(&res).await;
    // Alpha stays StandAlone: no session uses the flag meanwhile.
    res.ok("beta", &["connect", "--discard-my-data"]);
    res.ok("beta", &["primary"]);
    res.ok("beta", &["secondary"]);
    let (alpha_before, beta_before) = (res.data_area("alpha"), res.data_area("beta"));
    res.ok("alpha", &["connect"]);
    res.wait_error("alpha", "split brain");
    res.wait_error("beta", "split brain");
    assert!(
        res.data_area("beta") == beta_before,
        "beta's changes were discarded"
    );
    assert!(
        res.data_area("alpha") == alpha_before,
        "alpha's data changed"
    );
}

/// The opt-in `after-sb-0pri = "discard-least-changes"` resolves the same
/// split brain by itself: beta changed less, so beta's changes go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_policy_discards_the_side_with_fewer_changes() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.set("after-sb-0pri", "\"discard-least-changes\"");
    let (_alpha, _beta) = synced_pair(&res);
    let work = split_brain(&res).await;
    assert!(res.status("alpha")["out_of_sync_bytes"].as_u64().unwrap() > 1 << 20);
    res.ok("beta", &["connect"]);
    res.wait_status("beta", "the policy's resync", |s| {
        s["replication"] == "Established" && s["disk_state"] == "UpToDate"
    });
    res.wait_status("alpha", "the policy's resync", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.assert_identical();
    work.verify(
        "beta after the policy discarded its data",
        &res.data_area("beta"),
    );
}

/// Matrix 5, the secondary's disk: its writes fail, so it detaches the
/// disk (Diskless); the primary goes on with no client error, marking what
/// the secondary misses. A replaced disk takes a full copy.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_secondary_disk_is_detached_and_replaced() {
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    let mut work = Stamped::new(BLOCKS);
    run_to_end(&res, &mut work, "alpha", 300).await;
    // Every write to beta's data area fails from now on.
    let data_area = format!("fail-write={DATA_OFFSET}-{DISK_BYTES}");
    res.ok("beta", &["fault", &data_area]);
    run_to_end(&res, &mut work, "alpha", 1000).await;

    let beta_status = res.wait_status("beta", "a detached disk", |s| s["disk_state"] == "Diskless");
    assert_eq!(beta_status["role"], "Secondary");
    let alpha_status = res.wait_error("alpha", "Diskless");
    assert_ne!(alpha_status["replication"], "Established", "{alpha_status}");
    assert!(
        alpha_status["out_of_sync_bytes"].as_u64().unwrap() > 0,
        "the writes beta missed are marked: {alpha_status}"
    );
    assert_eq!(alpha_status["disk_state"], "UpToDate");
    let refusal = res.fails("beta", &["primary", "--force"]);
    assert!(refusal.contains("Diskless"), "{refusal}");
    work.verify("alpha, which went on alone", &res.data_area("alpha"));

    // The operator replaces beta's disk.
    res.down("beta", beta);
    std::fs::write(res.disk("beta"), vec![0u8; DISK_BYTES as usize]).unwrap();
    res.ok("beta", &["create-md"]);
    let _beta = res.up("beta");
    res.wait_status("alpha", "the full copy onto the new disk", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.wait_established("beta");
    res.assert_identical();
    work.verify("beta's new disk", &res.data_area("beta"));
}

/// Matrix 5, the secondary's disk hangs: the secondary still pings but
/// answers nothing. The primary ends the session after `ANSWER_TIMEOUTS`
/// timeouts and goes on alone, with no client error, marking what was not
/// answered. The secondary, its writes held by the disk, opens no new
/// session until they land, so the primary's clients wait for the hung
/// disk once, not again at every reconnection. Once the disk returns, a
/// differential resync makes the replicas identical.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_whose_disk_hangs_is_left_behind_and_resynced_later() {
    secondary_disk_hangs("C", "alpha", "beta").await;
}

/// The same with protocol B, where the primary's writes do not wait for
/// the hung disk: they pile up on the secondary until it holds the most
/// it takes, and it takes no more frames. When the primary ends the
/// session, the secondary's must end too, or it would never drain and
/// reconnect. (Here the secondary is the node that connects: the one that
/// listens would see its old session superseded by the next connection.)
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_full_of_writes_its_disk_holds_still_parts() {
    secondary_disk_hangs("B", "beta", "alpha").await;
}

#[cfg(feature = "fault-injection")]
async fn secondary_disk_hangs(protocol: &str, primary: &str, secondary: &str) {
    let res = Resource::new();
    res.set_protocol(protocol);
    let (alpha, beta) = synced_pair(&res);
    if primary == "beta" {
        res.ok("alpha", &["secondary"]);
        res.ok("beta", &["primary"]);
    }
    let primary_process = if primary == "alpha" { &alpha } else { &beta };
    let mut work = Stamped::new(BLOCKS);
    run_to_end(&res, &mut work, primary, 300).await;
    let data_area = format!("stall-write={DATA_OFFSET}-{DISK_BYTES}");
    res.ok(secondary, &["fault", &data_area]);
    run_to_end(&res, &mut work, primary, 300).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !primary_process.log().contains("answered none") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            primary_process.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let alone = res.status(primary);
    assert_eq!(alone["disk_state"], "UpToDate");
    assert!(
        alone["out_of_sync_bytes"].as_u64().unwrap() > 0,
        "what the secondary did not answer is marked: {alone}"
    );
    work.verify("the primary, which went on alone", &res.data_area(primary));
    res.wait_error(secondary, "have not reached this node's disk");
    if secondary == "beta" {
        // beta listens: alpha's dials are answered with the reason.
        res.wait_error(primary, "have not reached beta's disk");
    }
    // Long enough to see a reconnection (they come within 2 s) hang the
    // writes again, were there one.
    run_to_end(&res, &mut work, primary, 20_000).await;
    let log = primary_process.log();
    assert_eq!(
        log.matches("its disk may hang").count(),
        1,
        "the hung disk held the primary's writes more than once: {log}"
    );

    // The disk returns: its held writes land, and a resync follows.
    res.ok(secondary, &["fault", "none"]);
    res.wait_status(primary, "the resync once the disk returned", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.wait_established(secondary);
    res.assert_identical();
    work.verify(
        "the secondary after its disk returned",
        &res.data_area(secondary),
    );
    let full_copies: usize = [&alpha, &beta]
        .iter()
        .map(|node| node.log().matches("decision=SourceFull").count())
        .sum();
    assert_eq!(full_copies, 1, "only the first build copied everything");
}

/// Matrix 5, the primary's disk: its reads and writes fail, so it detaches
/// the disk and goes on as a diskless primary, reading and writing through
/// its peer, with no client error. To replace the disk the operator moves
/// the primary role to the peer; the new disk takes a full copy.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_primary_disk_leaves_a_diskless_primary() {
    let res = Resource::new();
    let (alpha, _beta) = synced_pair(&res);
    let mut work = Stamped::new(BLOCKS);
    run_to_end(&res, &mut work, "alpha", 300).await;
    // Every write to alpha's disk fails (the activity log's too), and so
    // does every read of its data.
    let whole_disk = format!("fail-write=0-{DISK_BYTES},fail-read={DATA_OFFSET}-{DISK_BYTES}");
    res.ok("alpha", &["fault", &whole_disk]);
    run_to_end(&res, &mut work, "alpha", 1000).await;

    let alpha_status = res.status("alpha");
    assert_eq!(alpha_status["disk_state"], "Diskless", "{alpha_status}");
    assert_eq!(alpha_status["role"], "Primary");
    assert_eq!(alpha_status["replication"], "Established", "{alpha_status}");
    res.wait_status("beta", "a diskless peer", |s| {
        s["peer_disk_state"] == "Diskless"
    });
    // Every acknowledged write reads back through alpha, from beta's disk.
    let checked = work
        .verify_export(
            "reads through the diskless primary",
            &res.nbd_socket("alpha"),
            RESOURCE,
        )
        .await;
    eprintln!("{checked} blocks read back through the diskless primary");
    work.verify("beta, the only copy", &res.data_area("beta"));

    // A lost link does not end the service: beta takes the diskless
    // primary back, with nothing to copy.
    res.ok("alpha", &["disconnect"]);
    res.wait_status("beta", "the diskless primary gone", |s| {
        s["connection"] != "Connected"
    });
    res.ok("alpha", &["connect"]);
    let back = res.wait_established("alpha");
    assert_eq!(back["disk_state"], "Diskless", "{back}");
    run_to_end(&res, &mut work, "alpha", 300).await;
    work.verify_export(
        "after the link came back",
        &res.nbd_socket("alpha"),
        RESOURCE,
    )
    .await;

    // The operator moves the primary role and replaces alpha's disk.
    res.ok("alpha", &["secondary"]);
    res.ok("beta", &["primary"]);
    run_to_end(&res, &mut work, "beta", 300).await;
    res.down("alpha", alpha);
    std::fs::write(res.disk("alpha"), vec![0u8; DISK_BYTES as usize]).unwrap();
    res.ok("alpha", &["create-md"]);
    let _alpha = res.up("alpha");
    res.wait_status("beta", "the full copy onto the new disk", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.wait_established("alpha");
    res.assert_identical();
    work.verify("alpha's new disk", &res.data_area("alpha"));
}

/// A diskless primary's write stands only on its peer's disk: when that
/// disk fails it, the client hears the error, not success. (Here alpha's
/// metadata area still works, so nothing else makes the write fail.)
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_reaches_no_disk_is_not_acknowledged() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, _beta) = synced_pair(&res);
    let write = |offset: u64| {
        let output = std::process::Command::new("qemu-io")
            .args(["-f", "raw", &res.uri("alpha")])
            .args(["-c", &format!("write -P 0x5a {offset} 4k")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr)
    };
    res.ok(
        "alpha",
        &["fault", &format!("fail-write={DATA_OFFSET}-{DISK_BYTES}")],
    );
    let first = write(0);
    assert!(!first.contains("failed"), "beta's disk has it: {first}");
    assert_eq!(res.status("alpha")["disk_state"], "Diskless");

    let block = DATA_OFFSET + 4096;
    res.ok(
        "beta",
        &["fault", &format!("fail-write={block}-{}", block + 4096)],
    );
    let second = write(4096);
    assert!(
        second.contains("write failed"),
        "the client heard success for a write that no disk holds: {second}"
    );
}

/// A client that has just gone, its last write still under way (here held
/// by a hung disk for a moment), does not make `secondary` refuse: the
/// demotion waits a moment for it to finish.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_waits_for_a_client_that_has_just_gone() {
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    let _alpha = res.up_with_faults("alpha", "none");
    res.ok("alpha", &["primary", "--force"]);
    let block = DATA_OFFSET + (1 << 20);
    res.ok(
        "alpha",
        &["fault", &format!("stall-write={block}-{}", block + 4096)],
    );
    let mut client = blkmirror_nbd::Client::connect_unix(&res.nbd_socket("alpha"), RESOURCE)
        .await
        .unwrap();
    let writing = tokio::spawn(async move { client.write(1 << 20, &[7; 4096], false).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    writing.abort();
    assert_eq!(
        res.status("alpha")["nbd_clients"],
        1,
        "the write is under way"
    );
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            res.ok("alpha", &["fault", "none"]);
        });
        res.ok("alpha", &["secondary"]);
    });
    assert!(res.disk_holds("alpha", 1 << 20, 4096, 7));
}

/// A diskless primary answers its peer's barriers (here the one `secondary`
/// on the secondary sends to settle): it serves only through the session,
/// which a refusal would end.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diskless_primary_answers_barriers() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, _beta) = synced_pair(&res);
    let whole_disk = format!("fail-write=0-{DISK_BYTES},fail-read={DATA_OFFSET}-{DISK_BYTES}");
    res.ok("alpha", &["fault", &whole_disk]);
    res.qemu_io("alpha", &["write -P 0x33 0 64k"]);
    assert_eq!(res.status("alpha")["disk_state"], "Diskless");
    res.ok("beta", &["secondary"]);
    let said = res.qemu_io("alpha", &["write -P 0x34 64k 64k"]);
    assert!(!said.contains("failed"), "{said}");
    let status = res.status("alpha");
    assert_eq!(status["connection"], "Connected", "{status}");
    assert!(res.disk_holds("beta", 64 << 10, 64 << 10, 0x34));
}

/// Protocol A: a write the client has heard of but the peer never
/// answered is marked on disk when the node goes down, so the next
/// connection copies it (the clean shutdown means no activity-log replay).
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_unanswered_at_shutdown_is_marked_on_disk() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.set_protocol("A");
    let (alpha, _beta) = synced_pair(&res);
    let block = DATA_OFFSET + (1 << 20);
    res.ok(
        "beta",
        &["fault", &format!("stall-write={block}-{}", block + 4096)],
    );
    res.qemu_io("alpha", &["write -P 0x5a 1M 4k"]);
    res.down("alpha", alpha);
    let metadata = res.json("alpha", &["dump-md", "--json"]);
    assert!(
        metadata["out_of_sync_bytes"].as_u64().unwrap() >= 4096,
        "the unanswered write is not marked: {metadata}"
    );
}

/// `after-sb-0pri = "discard-younger-primary"`: beta was promoted while the
/// two were apart, alpha was primary before they parted, so beta's changes
/// go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_policy_discards_the_younger_primary() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.set("after-sb-0pri", "\"discard-younger-primary\"");
    let (_alpha, _beta) = synced_pair(&res);
    assert!(
        !res.status("alpha")["flags"]
            .as_array()
            .unwrap()
            .contains(&"promoted_apart".into()),
        "alpha's first promotion is forgotten once the pair is in sync"
    );
    let work = split_brain(&res).await;
    assert!(res.status("beta")["flags"]
        .as_array()
        .unwrap()
        .contains(&"promoted_apart".into()));
    res.ok("beta", &["connect"]);
    res.wait_status("alpha", "the policy's resync", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.wait_status("beta", "the policy's resync", |s| {
        s["replication"] == "Established" && s["disk_state"] == "UpToDate"
    });
    res.assert_identical();
    work.verify(
        "beta after the policy discarded its data",
        &res.data_area("beta"),
    );
}
