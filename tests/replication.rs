//! Two real `blkmirror up` processes talking TCP: writes reach both disks,
//! a disconnected secondary catches up by differential resync, and refusals
//! (wrong secret, split brain, unrelated data) touch nothing.

mod common;

use std::process::Command;

use common::*;

/// The first connection copies everything to the new secondary; then every
/// write through NBD on the primary lands byte-identical on the secondary,
/// which itself refuses NBD I/O.
#[test]
fn writes_reach_both_disks() {
    if !have("qemu-io") || !have("fio") {
        return;
    }
    let res = Resource::new();
    let (_alpha, _beta) = synced_pair(&res);
    let alpha = res.json("alpha", &["status", "--json"]);
    let beta = res.json("beta", &["status", "--json"]);
    let resync = &alpha["resync"];
    assert_eq!(
        resync["total_bytes"], DATA_BYTES,
        "the first copy is a full one: {alpha}"
    );
    assert_eq!(
        resync["zero_bytes"], DATA_BYTES,
        "an empty volume travels as zeroing commands: {alpha}"
    );
    assert_eq!(
        alpha["volume_uuid"], beta["volume_uuid"],
        "the new disk joined the volume"
    );
    assert_eq!(
        alpha["generations"]["current"],
        beta["generations"]["current"]
    );
    // Zeroes and a discard over written data, so that both must travel.
    res.qemu_io(
        "alpha",
        &[
            "write -P 0xab 0 4M",
            "write -z 1M 64k",
            "write -f -P 0x5a 12345 777",
            "discard 3M 1M",
            "flush",
        ],
    );
    run(&mut res.fio(
        "alpha",
        &[
            "--name=repl",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--offset=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_state_save=0",
        ],
    ));
    assert_eq!(
        res.json("alpha", &["status", "--json"])["out_of_sync_bytes"],
        0
    );
    res.assert_identical();
    assert!(res.disk_holds("beta", 2 << 20, 1 << 20, 0xab));
    assert!(
        res.disk_holds("beta", 1 << 20, 64 << 10, 0),
        "the zeroes reached the secondary"
    );
    assert!(
        res.disk_holds("beta", 3 << 20, 1 << 20, 0),
        "the discard reached the secondary"
    );
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &res.uri("beta"), "-c", "read 0 4k"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the secondary served NBD I/O");
}

/// With the secondary away, the primary counts exactly what changed; on
/// reconnect the resync moves that much and no more, and the replicas end
/// identical.
#[test]
fn differential_resync_moves_only_what_changed() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    res.wait_status("alpha", "disconnected", |s| s["connection"] != "Connected");
    // 3 MiB, one 4 KiB block, and 2 bytes straddling a granule boundary.
    res.qemu_io(
        "alpha",
        &[
            "write -P 0x11 10M 3M",
            "write -P 0x12 40M 4k",
            "write -P 0x13 52428799 2",
        ],
    );
    let dirty = (3 << 20) + 4096 + 2 * 4096;
    let before = res.json("alpha", &["status", "--json"]);
    assert_eq!(before["out_of_sync_bytes"], dirty, "{before}");
    assert_ne!(
        before["generations"]["bitmap"], "0000000000000000",
        "a new generation was started"
    );
    let _beta = res.up("beta");
    let after = res.wait_established("alpha");
    assert_eq!(after["out_of_sync_bytes"], 0);
    assert_eq!(after["resync"]["total_bytes"], dirty, "{after}");
    assert_eq!(
        after["resync"]["done_bytes"], dirty,
        "bytes moved equal the dirty bytes"
    );
    assert_eq!(after["resync"]["zero_bytes"], 0, "{after}");
    assert_eq!(after["resync"]["same_bytes"], 0, "{after}");
    // What this session put on the wire: the dirty data, and besides it
    // only frame headers, the bitmap exchange and keepalives.
    let sent = after["links"][0]["sent_bytes"].as_u64().unwrap();
    assert!(
        (dirty..dirty + WIRE_OVERHEAD_MAX).contains(&sent),
        "{sent} bytes sent for {dirty} dirty"
    );
    res.wait_established("beta");
    res.assert_identical();
}

/// What a resync session may send besides the data it copies, on a 63 MiB
/// volume: the bitmap exchange, frame headers and keepalives.
const WIRE_OVERHEAD_MAX: u64 = 64 << 10;

/// The bitmap granularity may be as coarse as one resync chunk (1 MiB): a
/// write marks whole granules, and the resync copies them and ends. A
/// coarser one is refused.
#[test]
fn coarse_granularity_resyncs_whole_granules() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let refusal = res.fails("alpha", &["create-md", "--granularity", "2097152"]);
    assert!(refusal.contains("between 4096 and 1048576"), "{refusal}");
    for node in ["alpha", "beta"] {
        res.ok(node, &["create-md", "--granularity", "1048576"]);
    }
    let _alpha = res.up("alpha");
    let beta = res.up("beta");
    res.ok("alpha", &["primary", "--force"]);
    res.wait_established("alpha");
    res.wait_established("beta");
    res.down("beta", beta);
    res.wait_status("alpha", "disconnected", |s| s["connection"] != "Connected");
    // Granule 5, and granules 20 and 21.
    res.qemu_io("alpha", &["write -P 0x91 5M 4k", "write -P 0x92 20M 1536k"]);
    let granules = 3 << 20;
    assert_eq!(res.status("alpha")["out_of_sync_bytes"], granules);
    let _beta = res.up("beta");
    let status = res.wait_established("alpha");
    res.wait_established("beta");
    assert_eq!(status["resync"]["total_bytes"], granules, "{status}");
    assert_eq!(status["resync"]["done_bytes"], granules, "{status}");
    res.assert_identical();
}

/// A secondary whose disk was replaced by an empty one (new metadata, all
/// data zero) gets every byte of the volume again.
#[test]
fn a_replaced_empty_secondary_gets_a_full_copy() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    res.qemu_io("alpha", &["write -P 0x71 0 8M", "write -P 0x72 40M 3M"]);
    res.down("beta", beta);
    std::fs::write(res.disk("beta"), vec![0u8; DISK_BYTES as usize]).unwrap();
    res.ok("beta", &["create-md"]);
    let _beta = res.up("beta");
    let status = res.wait_established("alpha");
    res.wait_established("beta");
    let resync = &status["resync"];
    assert_eq!(resync["total_bytes"], DATA_BYTES, "a full copy: {status}");
    assert_eq!(resync["done_bytes"], DATA_BYTES, "{status}");
    assert_eq!(
        resync["same_bytes"], 0,
        "nothing on an empty disk matches: {status}"
    );
    let data = 11 << 20;
    assert_eq!(resync["zero_bytes"], DATA_BYTES - data, "{status}");
    let sent = status["links"][0]["sent_bytes"].as_u64().unwrap();
    assert!(
        (data..data + WIRE_OVERHEAD_MAX).contains(&sent),
        "{sent} bytes sent for {data} of data"
    );
    assert!(res.disk_holds("beta", 0, 8 << 20, 0x71));
    assert!(res.disk_holds("beta", 40 << 20, 3 << 20, 0x72));
    res.assert_identical();
}

/// A peer configured with another `protocol` or `after-sb-0pri` is refused
/// by both nodes, each naming the differences; the primary goes on alone,
/// and once the configs agree the pair resyncs what it wrote meanwhile.
#[test]
fn a_peer_configured_differently_is_refused() {
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    let agreed = std::fs::read_to_string(&res.config).unwrap();
    res.set_protocol("A");
    res.set("after-sb-0pri", "\"discard-least-changes\"");
    let beta = res.up("beta");
    for (node, here, there) in [("alpha", "C", "A"), ("beta", "A", "C")] {
        let status = res.wait_error(node, "configured differently");
        let error = status["last_error"].as_str().unwrap();
        assert!(
            error.contains(&format!("protocol '{there}' there, '{here}' here")),
            "{error}"
        );
        assert!(error.contains("after-sb-0pri"), "{error}");
        assert_eq!(status["connection"], "Refused", "{status}");
        let refusal = res.fails(node, &["wait-sync", "--timeout", "60"]);
        assert!(refusal.contains("configured differently"), "{refusal}");
    }
    res.qemu_io("alpha", &["write -P 0x62 0 64k"]);
    res.down("beta", beta);
    std::fs::write(&res.config, agreed).unwrap();
    let _beta = res.up("beta");
    res.wait_established("beta");
    res.assert_identical();
}

/// A peer with the wrong secret is refused and logged, and nothing is copied.
#[test]
fn wrong_secret_is_refused() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let text = std::fs::read_to_string(&res.config).unwrap();
    std::fs::write(
        &res.config,
        text.replace("timeout = 2", "timeout = 2\nsecret = \"right\""),
    )
    .unwrap();
    let beta_config = res.dir.path().join("beta.toml");
    std::fs::write(
        &beta_config,
        text.replace("timeout = 2", "timeout = 2\nsecret = \"wrong\""),
    )
    .unwrap();
    run(Command::new(BIN)
        .arg("-c")
        .arg(&beta_config)
        .args(["-n", "beta", "create-md"]));
    let _alpha = res.primary("alpha");
    res.qemu_io("alpha", &["write -P 0x61 0 4M"]);
    let _beta = {
        let log = std::fs::File::create(res.dir.path().join("beta.log")).unwrap();
        NodeProcess {
            child: Command::new(BIN)
                .arg("-c")
                .arg(&beta_config)
                .args(["-n", "beta", "up"])
                .stderr(log)
                .spawn()
                .unwrap(),
            log_path: res.dir.path().join("beta.log"),
        }
    };
    res.wait_error("alpha", "authentication");
    // beta keeps trying; each attempt is refused, for a few timeouts.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let status = res.status("alpha");
        assert_ne!(status["connection"], "Connected", "{status}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        res.data_area("beta").iter().all(|&b| b == 0),
        "alpha's data reached beta"
    );
    assert!(res.disk_holds("alpha", 0, 4 << 20, 0x61));
}

/// Both sides writing while apart is split brain: refused with a clear
/// message, both data sets untouched.
#[test]
fn split_brain_is_refused_and_touches_nothing() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    res.qemu_io("alpha", &["write -P 0x21 0 64k"]);
    res.down("alpha", alpha);
    let beta = res.up("beta");
    // beta last saw alpha as primary: alpha may have written since, so
    // beta is only Consistent and is promoted by force alone.
    assert_eq!(res.status("beta")["disk_state"], "Consistent");
    let refusal = res.fails("beta", &["primary"]);
    assert!(refusal.contains("may have written"), "{refusal}");
    res.ok("beta", &["primary", "--force"]);
    res.qemu_io("beta", &["write -P 0x22 1M 64k"]);
    res.ok("beta", &["secondary"]);
    let (alpha_before, beta_before) = (res.data_area("alpha"), res.data_area("beta"));
    let _alpha = res.up("alpha");
    let status = res.wait_error("alpha", "split brain");
    assert_ne!(status["replication"], "Established");
    assert!(
        res.data_area("alpha") == alpha_before,
        "alpha's data changed"
    );
    assert!(res.data_area("beta") == beta_before, "beta's data changed");
    drop(beta);
}

/// Two volumes that each have data of their own never exchange a byte.
#[test]
fn unrelated_data_is_refused() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    res.ok("beta", &["create-md"]);
    // Each becomes primary alone, with its own volume, generation and data.
    for (node, byte) in [("alpha", 0x81), ("beta", 0x82)] {
        let process = res.up(node);
        res.ok(node, &["primary", "--force"]);
        res.qemu_io(node, &[&format!("write -P {byte} 1M 2M")]);
        res.ok(node, &["secondary"]);
        res.down(node, process);
    }
    let (alpha_before, beta_before) = (res.data_area("alpha"), res.data_area("beta"));
    let _alpha = res.up("alpha");
    let _beta = res.up("beta");
    let status = res.wait_error("alpha", "unrelated");
    assert_ne!(status["connection"], "Connected", "{status}");
    let beta = res.wait_error("beta", "unrelated");
    assert_ne!(beta["connection"], "Connected", "{beta}");
    assert!(
        res.data_area("alpha") == alpha_before,
        "alpha's data changed"
    );
    assert!(res.data_area("beta") == beta_before, "beta's data changed");
    assert!(res.disk_holds("beta", 1 << 20, 2 << 20, 0x82));
}

/// Protocol C: the primary is killed with -9 in the middle of a write
/// stream, with writes in flight, and every write a client saw acknowledged
/// is on the secondary (that version of its block or a newer one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_killed_primary() {
    use std::time::{Duration, Instant};
    const BLOCKS: u64 = 4096; // 16 MiB of 4 KiB blocks
    const CLIENTS: u64 = 8; // client c writes the blocks b with b % CLIENTS == c
    const KILL_AFTER: Duration = Duration::from_millis(1500);
    let res = Resource::new();
    let (mut alpha, _beta) = synced_pair(&res);
    // Writes sent and not yet answered, over all clients.
    let outstanding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = res.nbd_socket("alpha");
            let outstanding = outstanding.clone();
            tokio::spawn(async move {
                let mut client = blkmirror_nbd::Client::connect_unix(&socket, RESOURCE)
                    .await
                    .unwrap();
                let mut acked = Vec::new();
                for version in 1..=1_000_000u64 {
                    let block =
                        version.wrapping_mul(2_654_435_761) % (BLOCKS / CLIENTS) * CLIENTS + c;
                    let mut data = vec![0u8; 4096];
                    data[..8].copy_from_slice(&block.to_le_bytes());
                    data[8..16].copy_from_slice(&version.to_le_bytes());
                    let sent = Instant::now();
                    outstanding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let written = client.write(block * 4096, &data, false).await;
                    outstanding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    match written {
                        Ok(()) => acked.push((block, version)),
                        // The primary is gone: when was the failed write sent?
                        Err(_) => return (acked, Some(sent)),
                    }
                }
                (acked, None)
            })
        })
        .collect();
    tokio::time::sleep(KILL_AFTER).await;
    // At a moment when every client waits for an answer: the peer answers
    // them together, so they also stand between two writes together.
    let deadline = Instant::now() + Duration::from_secs(5);
    while outstanding.load(std::sync::atomic::Ordering::SeqCst) < CLIENTS as usize
        && Instant::now() < deadline
    {
        std::hint::spin_loop();
    }
    let killing = Instant::now();
    alpha.child.kill().unwrap();
    let mut acked = vec![0u64; BLOCKS as usize];
    let mut in_flight = 0;
    for writer in writers {
        let (writes, failed) = writer.await.unwrap();
        let failed = failed.expect("a client wrote on past the kill");
        in_flight += usize::from(failed < killing);
        for (block, version) in writes {
            acked[block as usize] = version;
        }
    }
    assert!(in_flight > 0, "no write was in flight at the kill");
    alpha.child.wait().unwrap();
    let beta = res.data_area("beta");
    let mut checked = 0;
    for (block, &version) in acked.iter().enumerate().filter(|(_, &v)| v > 0) {
        let at = block * 4096;
        let found_block = u64::from_le_bytes(beta[at..at + 8].try_into().unwrap());
        let found = u64::from_le_bytes(beta[at + 8..at + 16].try_into().unwrap());
        assert_eq!(
            found_block, block as u64,
            "block {block} holds another block's data"
        );
        assert!(
            found >= version,
            "block {block}: acknowledged version {version}, secondary has {found}"
        );
        checked += 1;
    }
    assert!(checked > 100, "only {checked} blocks were written");
}

/// A write the secondary answered is remembered until a barrier makes it
/// durable there. If the secondary dies before that (a power loss can take
/// its disk's volatile cache), the write is marked and copied again when
/// the secondary returns. After a flush, nothing is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_secondary_never_made_durable_are_resynced() {
    let res = Resource::new();
    let (_alpha, mut beta) = synced_pair(&res);
    let mut client = blkmirror_nbd::Client::connect_unix(&res.nbd_socket("alpha"), RESOURCE)
        .await
        .unwrap();
    // Both answered by the secondary, and killed well before the barrier
    // that follows answered writes within 2 s.
    client.write(1 << 20, &[0x22; 8192], false).await.unwrap();
    client.write(5 << 20, &[0x33; 4096], false).await.unwrap();
    beta.child.kill().unwrap();
    beta.child.wait().unwrap();
    let unflushed = 8192 + 4096;
    let status = res.wait_status("alpha", "the unflushed writes marked", |s| {
        s["connection"] != "Connected" && s["out_of_sync_bytes"] != 0
    });
    assert_eq!(status["out_of_sync_bytes"], unflushed, "{status}");
    let mut beta = res.up("beta");
    let done = res.wait_established("alpha");
    res.wait_established("beta");
    assert_eq!(done["resync"]["total_bytes"], unflushed, "{done}");
    res.assert_identical();

    client.write(9 << 20, &[0x44; 4096], false).await.unwrap();
    client.flush().await.unwrap();
    beta.child.kill().unwrap();
    beta.child.wait().unwrap();
    // The node reports the connection lost once the session's end is
    // handled, marks included.
    let status = res.wait_status("alpha", "the peer lost", |s| s["connection"] != "Connected");
    assert_eq!(
        status["out_of_sync_bytes"], 0,
        "a flushed write was marked: {status}"
    );

    // An operator's `disconnect` asks for a barrier first: nothing to mark.
    let _beta = res.up("beta");
    res.wait_established("alpha");
    client.write(13 << 20, &[0x55; 4096], false).await.unwrap();
    res.ok("alpha", &["disconnect"]);
    let status = res.wait_status("alpha", "StandAlone", |s| s["connection"] == "StandAlone");
    assert_eq!(status["out_of_sync_bytes"], 0, "{status}");
}

/// With the smallest activity log (16 extents of 4 MiB) and random writes
/// over four times that, writes wait for extents that earlier writes hold
/// until the peer has made them durable; nothing stalls, under protocol C
/// or A, and the replicas end identical.
#[test]
fn random_writes_over_a_small_activity_log_do_not_stall() {
    if !have("fio") || !have("qemu-io") {
        return;
    }
    for protocol in ["C", "A"] {
        let res = Resource::new();
        res.set("al-extents", "16");
        res.set_protocol(protocol);
        for node in ["alpha", "beta"] {
            let disk = std::fs::OpenOptions::new()
                .write(true)
                .open(res.disk(node))
                .unwrap();
            disk.set_len(256 << 20).unwrap();
        }
        let (_alpha, _beta) = synced_pair(&res);
        let started = std::time::Instant::now();
        run(&mut res.fio(
            "alpha",
            &[
                "--name=churn",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=240M",
                "--number_ios=8192",
                "--verify=crc32c",
                "--verify_state_save=0",
            ],
        ));
        eprintln!(
            "protocol {protocol}: 8192 writes over 60 extents in {:?}",
            started.elapsed()
        );
        // Protocol A's last answers may still be on their way.
        let status = res.wait_status("alpha", "every answer in", |s| {
            s["out_of_sync_bytes"] == 0 && s["replication"] == "Established"
        });
        assert_eq!(status["connection"], "Connected", "{status}");
        res.qemu_io("alpha", &["flush"]);
        res.assert_identical();
    }
}

/// A peer that goes silent (hung, or cut off) after answering a write costs
/// a resync of that write only: the barrier that was to make it durable is
/// lost with the link, and what it covered is marked, not the whole volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_costs_only_the_writes_it_did_not_make_durable() {
    let res = Resource::new();
    // Longer than the 2 s after which a barrier follows an answered write,
    // so that the barrier is on its way when the link is declared dead.
    res.edit_config(|text| text.replace("timeout = 2", "timeout = 6"));
    let (_alpha, beta) = synced_pair(&res);
    let mut client = blkmirror_nbd::Client::connect_unix(&res.nbd_socket("alpha"), RESOURCE)
        .await
        .unwrap();
    client.write(2 << 20, &[0x55; 4096], false).await.unwrap();
    let pid = beta.child.id() as libc::pid_t;
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let lost = res.wait_status("alpha", "the silent peer given up", |s| {
        s["connection"] != "Connected"
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(lost["out_of_sync_bytes"], 4096, "{lost}");
    let done = res.wait_status("alpha", "resynced", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    assert_eq!(done["resync"]["total_bytes"], 4096, "{done}");
    res.wait_established("beta");
    res.assert_identical();
    drop(beta);
}

/// `disconnect` keeps a node StandAlone while the primary writes on;
/// `connect` brings the link back, and `wait-sync` returns once the
/// difference is copied. `wait-sync` gives up at its timeout otherwise.
#[test]
fn operator_disconnect_connect_and_wait_sync() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, _beta) = synced_pair(&res);
    res.ok("alpha", &["disconnect"]);
    res.wait_status("alpha", "StandAlone", |s| s["connection"] == "StandAlone");
    res.qemu_io("alpha", &["write -P 0x31 2M 256k"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = res.json("alpha", &["status", "--json"]);
    assert_eq!(
        status["connection"], "StandAlone",
        "it stays down until `connect`: {status}"
    );
    assert_eq!(status["out_of_sync_bytes"], 256 << 10);
    let refusal = res.fails("alpha", &["wait-sync", "--timeout", "60"]);
    assert!(
        refusal.contains("alpha is StandAlone") && refusal.contains("blkmirror connect"),
        "wait-sync must say at once that nothing syncs until `connect`: {refusal}"
    );
    let refusal = res.fails("alpha", &["resync"]);
    assert!(refusal.contains("StandAlone"), "{refusal}");
    res.ok("alpha", &["connect"]);
    let said = res.ok("alpha", &["wait-sync", "--timeout", "60"]);
    assert!(said.contains("in sync"), "{said}");
    res.wait_established("beta");
    res.assert_identical();
}

/// `disconnect` right after writes that no barrier has yet made durable on
/// the secondary, on either node, or the secondary going down: the session
/// ends only once they are durable there, so the resync copies what was
/// written apart and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_disconnection_leaves_only_what_is_written_apart() {
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    let mut beta = Some(beta);
    let socket = res.nbd_socket("alpha");
    for (round, node, parting) in [
        (1u8, "beta", "disconnect"),
        (2, "alpha", "disconnect"),
        (3, "beta", "down"),
    ] {
        // No flush from the client: the writes are answered, not durable.
        // (A barrier follows them within 2 s; the parting comes sooner.)
        let mut client = blkmirror_nbd::Client::connect_unix(&socket, RESOURCE)
            .await
            .unwrap();
        for block in 0..64u64 {
            let data = pattern(u64::from(round), block * 4096, 4096);
            client.write(block * 4096, &data, false).await.unwrap();
        }
        match parting {
            "down" => res.down(node, beta.take().unwrap()),
            _ => drop(res.ok(node, &[parting])),
        }
        res.wait_status("alpha", "the peer gone", |s| s["connection"] != "Connected");
        client
            .write((8 << 20) + u64::from(round) * 4096, &[round; 4096], false)
            .await
            .unwrap();
        client.disconnect().await.unwrap();
        let apart = res.status("alpha");
        assert_eq!(
            apart["out_of_sync_bytes"], 4096,
            "round {round}, {node} {parting}: {apart}"
        );
        match parting {
            "down" => beta = Some(res.up(node)),
            _ => drop(res.ok(node, &["connect"])),
        }
        let done = res.wait_status("alpha", "resynced", |s| {
            s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
        });
        assert_eq!(done["resync"]["done_bytes"], 4096, "{done}");
        res.wait_established("beta");
        res.assert_identical();
    }
}

/// A full copy onto a disk that is almost right (its metadata replaced, its
/// data a little behind) compares checksums first and sends data only for
/// the chunks that differ.
#[test]
fn full_copy_onto_an_almost_identical_disk_moves_little() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    res.qemu_io("alpha", &["write -P 0x41 0 8M", "flush"]);
    res.down("beta", beta);
    res.qemu_io("alpha", &["write -P 0x42 1M 4k"]);
    // The replacement: same data, new metadata, so nothing says what differs.
    res.ok("beta", &["create-md", "--force"]);
    let _beta = res.up("beta");
    let status = res.wait_established("alpha");
    res.wait_established("beta");
    let resync = &status["resync"];
    let chunk = 1u64 << 20;
    assert_eq!(resync["total_bytes"], DATA_BYTES, "a full copy: {status}");
    assert_eq!(
        resync["same_bytes"],
        7 * chunk,
        "seven 1 MiB chunks already matched: {status}"
    );
    assert_eq!(resync["zero_bytes"], DATA_BYTES - 8 * chunk, "{status}");
    let sent = status["links"][0]["sent_bytes"].as_u64().unwrap();
    assert!(
        (chunk..chunk + WIRE_OVERHEAD_MAX).contains(&sent),
        "{sent} bytes sent for one differing chunk"
    );
    res.assert_identical();
}

/// `invalidate` is refused on the primary; on the secondary it throws away
/// its claim to the data and a full copy follows. `resync --full` copies
/// everything again. The replicas end identical each time.
#[test]
fn invalidate_and_full_resync_by_the_operator() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, _beta) = synced_pair(&res);
    res.qemu_io("alpha", &["write -P 0x51 0 2M"]);
    let out = res.cli("alpha", &["invalidate"]);
    assert!(!out.status.success(), "a primary was invalidated");
    assert!(String::from_utf8_lossy(&out.stderr).contains("demote it first"));
    res.ok("beta", &["invalidate"]);
    res.wait_status("alpha", "a full resync", |s| {
        s["replication"] == "Established" && s["resync"]["total_bytes"] == DATA_BYTES
    });
    let beta = res.wait_established("beta");
    assert_eq!(beta["disk_state"], "UpToDate", "{beta}");
    res.assert_identical();
    res.ok("alpha", &["resync", "--full"]);
    res.ok("alpha", &["wait-sync", "--timeout", "60"]);
    res.assert_identical();
}

/// `invalidate` is refused while the connected peer's disk is not
/// UpToDate (here, the target of a differential resync, which said
/// UpToDate in its Hello): this node may hold the only good copy.
#[test]
fn invalidate_is_refused_while_the_peer_holds_no_good_copy() {
    let res = Resource::new();
    // 32 MiB to copy at 4 MB/s take some 8 s.
    res.set("resync-rate-max", "\"4M\"");
    let (_alpha, _beta) = synced_pair(&res);
    res.ok("beta", &["disconnect"]);
    res.wait_status("alpha", "alone", |s| s["connection"] != "Connected");
    res.qemu_io("alpha", &["write -P 0x5a 0 32M"]);
    res.ok("beta", &["connect"]);
    res.wait_status("alpha", "a resync under way", |s| {
        s["replication"] == "SyncSource"
    });
    res.ok("alpha", &["secondary"]);
    let refusal = res.fails("alpha", &["invalidate"]);
    assert!(refusal.contains("beta's disk is Inconsistent"), "{refusal}");
    assert_eq!(res.status("alpha")["disk_state"], "UpToDate");
    res.ok("alpha", &["wait-sync", "--timeout", "60"]);
    res.assert_identical();
}

/// A verify cut off by the end of its session fails and says so, however
/// far it got; the next session starts none by itself.
#[test]
fn a_verify_cut_off_fails() {
    let res = Resource::new();
    // The 64 MiB take some 16 s to compare.
    res.set("resync-rate-max", "\"4M\"");
    let (_alpha, _beta) = synced_pair(&res);
    let verify = Command::new(BIN)
        .arg("-c")
        .arg(&res.config)
        .args(["-n", "alpha", "verify"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    res.wait_status("alpha", "a verify under way", |s| {
        s["verify"]["done_bytes"].as_u64() > Some(0)
    });
    res.ok("alpha", &["resync"]);
    let out = verify.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "verify succeeded: {said}");
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("verify stopped after"), "{error}");
    let status = res.wait_established("alpha");
    assert_eq!(status["verify"]["running"], false, "{status}");
}

/// Protocols A and B answer the client before the peer's disk has the
/// write; a flush still reaches both disks, and nothing is left behind.
#[test]
fn protocols_a_and_b_replicate_and_flush_on_both() {
    if !have("qemu-io") || !have("fio") {
        return;
    }
    for protocol in ["A", "B"] {
        let res = Resource::new();
        res.set_protocol(protocol);
        let (_alpha, _beta) = synced_pair(&res);
        run(&mut res.fio(
            "alpha",
            &[
                "--name=async",
                "--rw=randwrite",
                "--bs=4k",
                "--size=8M",
                "--iodepth=32",
                "--verify=crc32c",
                "--verify_state_save=0",
            ],
        ));
        // The flush returns only once the peer has written and flushed
        // everything sent before it.
        res.qemu_io("alpha", &["write -P 0x44 30M 1M", "flush"]);
        res.assert_identical();
        let status = res.json("alpha", &["status", "--json"]);
        assert_eq!(
            (
                status["out_of_sync_bytes"].as_u64(),
                status["replication"].as_str()
            ),
            (Some(0), Some("Established")),
            "protocol {protocol}: {status}"
        );
    }
}

/// `verify` compares both replicas online: identical ones pass; bytes
/// changed behind the secondary's back are found (to the chunk), marked and
/// resynced.
#[test]
fn verify_finds_and_repairs_differences() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    let (_alpha, _beta) = synced_pair(&res);
    res.qemu_io("alpha", &["write -P 0x55 0 8M"]);
    let out = res.ok("alpha", &["verify"]);
    assert!(out.contains("identical"), "{out}");
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(res.disk("beta"))
            .unwrap();
        disk.write_all_at(b"rot", DATA_OFFSET + (5 << 20) + 7)
            .unwrap();
        disk.write_all_at(b"!", DATA_OFFSET + (30 << 20)).unwrap();
        disk.sync_all().unwrap();
    }
    let out = res.ok("alpha", &["verify"]);
    assert!(out.contains(&format!("{} bytes differ", 2 << 20)), "{out}");
    let status = res.wait_status("alpha", "resynced", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    assert_eq!(status["verify"]["differing_bytes"], 2 << 20, "{status}");
    assert_eq!(status["resync"]["total_bytes"], 2 << 20, "{status}");
    res.wait_established("beta");
    res.assert_identical();
    // Verify needs a connected peer.
    let out = res.cli("beta", &["disconnect"]);
    assert!(out.status.success());
    res.wait_status("beta", "StandAlone", |s| s["connection"] == "StandAlone");
    let out = res.cli("beta", &["verify"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Established"),
        "{out:?}"
    );
}

/// `resync-rate-max` caps the data a resync moves per second.
#[test]
fn resync_rate_max_caps_the_resync() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.set("resync-rate-max", "\"8M\"");
    let (_alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    res.wait_status("alpha", "disconnected", |s| s["connection"] != "Connected");
    res.qemu_io("alpha", &["write -P 0x66 0 24M"]);
    let started = std::time::Instant::now();
    let _beta = res.up("beta");
    // The target shows the source's progress.
    let midway = res.wait_status("beta", "progress on the target", |s| {
        s["replication"] == "SyncTarget" && s["resync"]["done_bytes"].as_u64() > Some(0)
    });
    assert_eq!(midway["resync"]["total_bytes"], 24 << 20, "{midway}");
    assert!(
        midway["resync"]["bytes_per_s"].as_u64() > Some(0),
        "{midway}"
    );
    let status = res.wait_status("alpha", "resynced", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(status["resync"]["total_bytes"], 24 << 20);
    // 24 MiB at 8 MB/s takes 3.1 s; the first chunk goes at once.
    assert!(
        elapsed >= 2.8,
        "24 MiB resynced in {elapsed:.2} s despite an 8 MB/s cap"
    );
    let beta = res.wait_established("beta");
    assert_eq!(beta["resync"]["done_bytes"], 24 << 20, "{beta}");
    res.assert_identical();
}

/// A resync cut off again and again, with writes on the primary between
/// the attempts, stays differential: each cut-off keeps the target's
/// generation within the source's history, so the final resync finds the
/// target related and copies only what is marked.
#[test]
fn a_resync_cut_off_again_and_again_stays_differential() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.set("resync-rate-max", "\"4M\"");
    let (alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    res.wait_status("alpha", "disconnected", |s| s["connection"] != "Connected");
    res.qemu_io("alpha", &["write -P 0x71 0 8M"]);
    let _beta = res.up("beta");
    for round in 0..4u64 {
        res.wait_status("alpha", "a resync under way", |s| {
            s["replication"] == "SyncSource" && s["resync"]["done_bytes"].as_u64() > Some(0)
        });
        res.ok("beta", &["disconnect"]);
        res.wait_status("alpha", "the target gone", |s| {
            s["connection"] != "Connected"
        });
        let at = (16 << 20) + round * (1 << 20);
        res.qemu_io("alpha", &[&format!("write -P 0x72 {at} 64k")]);
        res.ok("beta", &["connect"]);
    }
    res.wait_status("alpha", "resynced", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    res.wait_established("beta");
    res.assert_identical();
    let log = alpha.log();
    assert_eq!(
        log.matches("decision=SourceFull").count(),
        1,
        "only the first build copied everything: {log}"
    );
    assert!(
        log.matches("decision=SourceDifferential").count() >= 5,
        "each attempt was a differential resync: {log}"
    );
}

/// Resync chunks the target answered count as in sync only once a barrier
/// after them is confirmed: a target killed in the middle of a resync (as
/// in a power loss, which can take its disk's volatile cache) gets every
/// chunk again.
#[test]
fn resync_chunks_count_only_once_the_target_flushed_them() {
    if !have("qemu-io") {
        return;
    }
    let res = Resource::new();
    res.set("resync-rate-max", "\"4M\"");
    let (_alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    res.wait_status("alpha", "disconnected", |s| s["connection"] != "Connected");
    res.qemu_io("alpha", &["write -P 0x67 0 24M"]);
    let dirty = 24 << 20;
    let mut beta = res.up("beta");
    // At 4 MB/s the 24 MiB take about 6 s: well after the first chunks.
    let midway = res.wait_status("alpha", "some chunks answered", |s| {
        s["replication"] == "SyncSource" && s["resync"]["done_bytes"].as_u64() >= Some(4 << 20)
    });
    beta.child.kill().unwrap();
    beta.child.wait().unwrap();
    assert!(
        midway["resync"]["done_bytes"].as_u64() < Some(dirty),
        "the resync ended before the kill: {midway}"
    );
    let lost = res.wait_status("alpha", "the target lost", |s| {
        s["connection"] != "Connected"
    });
    assert_eq!(
        lost["out_of_sync_bytes"], dirty,
        "answered chunks no barrier confirmed count as out of sync: {lost}"
    );
    let _beta = res.up("beta");
    let done = res.wait_established("alpha");
    res.wait_established("beta");
    assert_eq!(done["resync"]["total_bytes"], dirty, "{done}");
    res.assert_identical();
}

/// Resync runs beside a continuous application write load, yields to it,
/// and still finishes while the load goes on.
#[test]
fn resync_converges_under_continuous_writes() {
    if !have("qemu-io") || !have("fio") {
        return;
    }
    let res = Resource::new();
    let (_alpha, beta) = synced_pair(&res);
    res.down("beta", beta);
    res.wait_status("alpha", "disconnected", |s| s["connection"] != "Connected");
    res.qemu_io("alpha", &["write -P 0x77 0 32M"]);
    let _beta = res.up("beta");
    let mut fio = res
        .fio(
            "alpha",
            &[
                "--name=load",
                "--rw=randwrite",
                "--bs=4k",
                "--size=60M",
                "--iodepth=8",
                "--time_based",
                "--runtime=60",
                // Jobs as threads of the one process, so killing it ends them.
                "--thread",
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let converged = res.wait_status("alpha", "resynced under load", |s| {
        s["replication"] == "Established"
    });
    let still_writing = fio.try_wait().unwrap().is_none();
    let _ = fio.kill();
    let status = fio.wait().unwrap();
    assert!(
        still_writing,
        "the load ended ({status}) before the resync did: {converged}"
    );
    assert_eq!(
        converged["resync"]["done_bytes"],
        converged["resync"]["total_bytes"]
    );
    // The killed client's last writes finish before its connection goes.
    res.wait_status("alpha", "client gone, nothing out of sync", |s| {
        s["nbd_clients"] == 0 && s["out_of_sync_bytes"] == 0
    });
    res.wait_established("beta");
    res.assert_identical();
}

/// A stranger on a link port gets nowhere and harms nothing: garbage, a
/// frame of another protocol version, and a frame announcing a 16 MiB
/// payload before any handshake each end the connection at once (the
/// other version is named in `last_error`). The listening node carries on,
/// and the pair then connects as usual.
#[test]
fn bad_frames_on_a_link_are_refused_without_harm() {
    use std::io::{Read, Write};
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    res.ok("beta", &["create-md"]);
    // beta's name sorts second: it listens.
    let beta = res.up("beta");
    let link = first_link(&res, "beta");
    let header = |kind: u16, version: u16, payload_len: u32| {
        let mut h = blkmirror_proto::FrameHeader::for_payload(kind, 0, [0; 16], 0, &[]);
        h.version = version;
        h.payload_len = payload_len;
        h.encode().to_vec()
    };
    use blkmirror_proto::message::kind;
    use blkmirror_proto::PROTOCOL_VERSION;
    let inputs: [(&str, Vec<u8>); 4] = [
        ("garbage", vec![0x5a; 200]),
        ("another version", header(kind::HELLO, 99, 0)),
        (
            "a Hello larger than any Hello",
            header(kind::HELLO, PROTOCOL_VERSION, 16 << 20),
        ),
        (
            "data before the handshake",
            header(kind::WRITE, PROTOCOL_VERSION, 16 << 20),
        ),
    ];
    for (what, bytes) in inputs {
        let mut stream = std::net::TcpStream::connect(&link).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        stream.write_all(&bytes).unwrap();
        // The node sends its own Hello, then closes: read to the end.
        let mut answer = Vec::new();
        let closed = stream.read_to_end(&mut answer);
        assert!(
            closed.is_ok()
                || closed.as_ref().unwrap_err().kind() == std::io::ErrorKind::ConnectionReset,
            "{what}: the node did not close the connection: {closed:?}"
        );
        assert!(
            answer.len() < 4096,
            "{what}: the node sent {} bytes",
            answer.len()
        );
    }
    // The refusals are logged just after the connection closes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(beta.log().contains("at most 1024 bytes fit") && beta.log().contains("at most 4096")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the oversized payloads were refused before they were read: {}",
            beta.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A node of another release is worth the operator's attention.
    res.wait_error("beta", "protocol version 99");
    let _alpha = res.up("alpha");
    res.ok("alpha", &["primary", "--force"]);
    res.wait_established("alpha");
    res.wait_established("beta");
    res.assert_identical();
}

/// The address of `node`'s first link, from the resource's config.
fn first_link(res: &Resource, node: &str) -> String {
    links(res, node).swap_remove(0)
}

/// The addresses of `node`'s links, from the resource's config.
fn links(res: &Resource, node: &str) -> Vec<String> {
    let config = std::fs::read_to_string(&res.config).unwrap();
    let section = config.split(&format!("[nodes.{node}]")).nth(1).unwrap();
    section
        .lines()
        .find_map(|l| l.strip_prefix("links = [\""))
        .and_then(|l| l.strip_suffix("\"]"))
        .unwrap()
        .split("\", \"")
        .map(str::to_string)
        .collect()
}

/// With two links, alpha opens a session by one handshake at a time: were
/// both links' Hellos in flight at once, each built at its own moment, the
/// two nodes could decide from different ones. A stand-in for beta that
/// listens on both links and answers nothing sees one Hello, and a second
/// (for a session of its own) only once the first handshake has timed out.
#[test]
fn a_session_opens_by_one_handshake_at_a_time() {
    use std::io::Read;
    let res = Resource::new();
    res.add_second_link();
    res.ok("alpha", &["create-md"]);
    let listeners: Vec<_> = links(&res, "beta")
        .iter()
        .map(|at| std::net::TcpListener::bind(at).unwrap())
        .collect();
    let _alpha = res.up("alpha");
    let start = std::time::Instant::now();
    let hellos = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for listener in &listeners {
            let hellos = &hellos;
            scope.spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(6)))
                    .unwrap();
                let mut received = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    received.extend_from_slice(&buf[..n]);
                    let decoded = blkmirror_proto::decode_frame(&received).unwrap();
                    if let Some((_, blkmirror_proto::Message::Hello(hello), _)) = decoded {
                        hellos
                            .lock()
                            .unwrap()
                            .push((start.elapsed(), hello.session));
                        // Held open, unanswered, until both are in.
                        while hellos.lock().unwrap().len() < 2
                            && start.elapsed() < std::time::Duration::from_secs(10)
                        {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                        return;
                    }
                }
            });
        }
    });
    let mut hellos = hellos.into_inner().unwrap();
    hellos.sort();
    assert_eq!(hellos.len(), 2, "{hellos:?}");
    let ((first, first_session), (second, second_session)) = (hellos[0], hellos[1]);
    assert!(
        second - first >= std::time::Duration::from_secs(1),
        "two handshakes at once: {hellos:?}"
    );
    assert_ne!(first_session, second_session);
}

/// A stand-in for alpha that speaks the wire protocol by hand: it passes
/// the handshake as alpha would, in sync with beta, and then sends what a
/// broken peer might.
struct FakeAlpha {
    stream: std::net::TcpStream,
    uuid: [u8; 16],
    received: Vec<u8>,
    /// The Hello beta sent.
    beta: blkmirror_proto::Hello,
}

impl FakeAlpha {
    /// Connects to beta with a copy of beta's own Hello, changed by `adjust`.
    fn connect(res: &Resource, adjust: impl FnOnce(&mut blkmirror_proto::Hello)) -> FakeAlpha {
        FakeAlpha::connect_after(res, adjust, || {})
    }

    /// `connect`, running `meanwhile` once beta has sent its Hello and
    /// before the fake answers with its own.
    fn connect_after(
        res: &Resource,
        adjust: impl FnOnce(&mut blkmirror_proto::Hello),
        meanwhile: impl FnOnce(),
    ) -> FakeAlpha {
        let stream = std::net::TcpStream::connect(first_link(res, "beta")).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut received = Vec::new();
        let Some((_, blkmirror_proto::Message::Hello(beta))) = next_frame(&stream, &mut received)
        else {
            panic!("beta did not say Hello");
        };
        let mut fake = FakeAlpha {
            stream,
            uuid: beta.volume_uuid,
            received,
            beta: beta.clone(),
        };
        let mut alpha = blkmirror_proto::Hello {
            node_name: "alpha".into(),
            session: 7,
            dirty_bytes: 0,
            ..beta
        };
        adjust(&mut alpha);
        meanwhile();
        fake.send(0, &blkmirror_proto::Message::Hello(alpha));
        fake
    }

    fn send(&mut self, seq: u64, message: &blkmirror_proto::Message) {
        use std::io::Write;
        let frame = blkmirror_proto::encode_frame(message, self.uuid, seq);
        self.stream.write_all(&frame).unwrap();
    }

    /// Beta's answer (an errno) to frame `seq`, skipping all else.
    fn answer(&mut self, seq: u64) -> u32 {
        loop {
            let Some(message) = self.next() else {
                panic!("beta closed the connection before answering frame {seq}");
            };
            if let blkmirror_proto::Message::Ack { entries } = message {
                if let Some(entry) = entries.iter().find(|e| e.seq == seq) {
                    return entry.errno;
                }
            }
        }
    }

    /// The next message from beta; `None` once it closed the connection.
    fn next(&mut self) -> Option<blkmirror_proto::Message> {
        next_frame(&self.stream, &mut self.received).map(|(_, message)| message)
    }

    /// Plays an idle secondary until beta closes the connection: answers
    /// its pings, and says yes when it asks to become primary.
    fn play_secondary(mut self) {
        use blkmirror_proto::Message;
        let mut sent = 0;
        while let Some((seq, message)) = next_frame(&self.stream, &mut self.received) {
            match message {
                Message::PromoteAsk => {
                    let yes = blkmirror_proto::AckEntry {
                        seq,
                        kind: blkmirror_proto::AckKind::Written,
                        errno: 0,
                    };
                    sent += 1;
                    self.send(sent, &Message::Ack { entries: vec![yes] });
                }
                Message::Ping { token } => self.send(0, &Message::Pong { token }),
                _ => {}
            }
        }
    }
}

/// The next frame on `stream` (its sequence number and message),
/// `received` holding what came before it.
fn next_frame(
    mut stream: &std::net::TcpStream,
    received: &mut Vec<u8>,
) -> Option<(u64, blkmirror_proto::Message)> {
    use std::io::Read;
    loop {
        if let Some((header, message, used)) = blkmirror_proto::decode_frame(received).unwrap() {
            received.drain(..used);
            return Some((header.sequence, message));
        }
        let mut buf = [0u8; 65536];
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Makes the fake alpha's copy of beta's Hello say secondary, whatever
/// beta is.
fn as_secondary(hello: &mut blkmirror_proto::Hello) {
    hello.flags &= !blkmirror_metadata::Flags::PRIMARY.bits();
}

/// A pair in sync with alpha down: beta waits for a peer, and its
/// generations, to compare after a fake alpha had its say.
fn beta_alone(res: &Resource) -> (NodeProcess, serde_json::Value) {
    let (alpha, beta) = synced_pair(res);
    res.down("alpha", alpha);
    res.wait_status("beta", "alpha gone", |s| s["connection"] != "Connected");
    let generations = res.json("beta", &["dump-md", "--json"])["generations"].clone();
    (beta, generations)
}

/// A write made alone while a handshake is under way, after beta's Hello
/// was built: the Hellos say in sync, and the session ends at once ("writes
/// raced the handshake"). The generation the write opened stays open, so
/// the next write made alone joins it and alpha's generation stays beta's
/// bitmap generation: the reconnection resyncs the difference, not the
/// whole disk.
#[test]
fn a_write_that_races_a_handshake_keeps_the_next_resync_differential() {
    let res = Resource::new();
    let (_beta, generations) = beta_alone(&res);
    res.ok("beta", &["primary"]);
    let mut fake = FakeAlpha::connect_after(&res, as_secondary, || {
        res.qemu_io("beta", &["write -P 0x21 0 4k"]);
    });
    while fake.next().is_some() {}
    res.wait_error("beta", "writes raced the handshake");
    res.qemu_io("beta", &["write -P 0x22 1M 4k"]);
    let now = res.json("beta", &["dump-md", "--json"])["generations"].clone();
    assert_eq!(now["bitmap"], generations["current"], "{now}");
    assert_eq!(res.status("beta")["out_of_sync_bytes"], 8192);
}

/// A handshake that waited in the queue past the timeout (beta waited
/// after a refusal meanwhile) opens no session: its Hellos may be stale,
/// and the peer that sent them has given it up.
#[test]
fn a_handshake_queued_past_the_timeout_opens_no_session() {
    let res = Resource::new();
    let (beta, _) = beta_alone(&res);
    // Refused: beta waits (10 s) before it takes the next handshake.
    let mut refused = FakeAlpha::connect(&res, |hello| {
        as_secondary(hello);
        hello.data_size += 1 << 20;
    });
    while refused.next().is_some() {}
    res.wait_error("beta", "size");
    let mut queued = FakeAlpha::connect(&res, as_secondary);
    // Longer than beta's wait: what ends it is beta closing the connection.
    queued
        .stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let heard = queued.next();
    assert!(heard.is_none(), "a session opened: beta sent {heard:?}");
    assert!(beta.log().contains("a handshake too old"), "{}", beta.log());
}

/// A handshake that starts a new session while one is open (the peer
/// started over) ends that session and opens none: beta's Hello in it was
/// built before what happened since. Here beta was promoted in between,
/// and that Hello says secondary.
#[test]
fn a_handshake_that_starts_over_opens_no_session() {
    let res = Resource::new();
    let (beta, _) = beta_alone(&res);
    let first = FakeAlpha::connect(&res, as_secondary);
    res.wait_status("beta", "connected", |s| s["replication"] == "Established");
    std::thread::scope(|scope| {
        scope.spawn(|| first.play_secondary());
        let mut second = FakeAlpha::connect_after(
            &res,
            |hello| {
                as_secondary(hello);
                hello.session = 8;
            },
            || {
                res.ok("beta", &["primary"]);
            },
        );
        assert_hello_says_secondary(&second);
        let heard = second.next();
        assert!(heard.is_none(), "a session opened: beta sent {heard:?}");
    });
    assert!(
        beta.log().contains("the peer started a new session"),
        "{}",
        beta.log()
    );
    assert_next_handshake_opens_a_session(&res);
}

/// A handshake whose Hello beta built while a session was open, finished
/// once that session is over, opens none either.
#[test]
fn a_handshake_begun_during_a_session_opens_none_after_it() {
    let res = Resource::new();
    let (beta, _) = beta_alone(&res);
    let first = FakeAlpha::connect(&res, as_secondary);
    res.wait_status("beta", "connected", |s| s["replication"] == "Established");
    let first_stream = first.stream.try_clone().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| first.play_secondary());
        let mut second = FakeAlpha::connect_after(&res, as_secondary, || {
            first_stream.shutdown(std::net::Shutdown::Both).unwrap();
            res.wait_status("beta", "alone", |s| s["connection"] != "Connected");
            res.ok("beta", &["primary"]);
        });
        assert_hello_says_secondary(&second);
        let heard = second.next();
        assert!(heard.is_none(), "a session opened: beta sent {heard:?}");
    });
    assert!(
        beta.log()
            .contains("a handshake made while the last session was open"),
        "{}",
        beta.log()
    );
    assert_next_handshake_opens_a_session(&res);
}

/// Beta's Hello to `fake` said secondary (it was built before beta's
/// promotion).
fn assert_hello_says_secondary(fake: &FakeAlpha) {
    let primary = blkmirror_metadata::Flags::PRIMARY.bits();
    assert_eq!(fake.beta.flags & primary, 0, "{:?}", fake.beta);
}

/// A fresh handshake opens a session with beta, now primary, and says so.
/// (Beta may still be recording the end of the last session: a handshake
/// it drops is made again, as the real peer would.)
fn assert_next_handshake_opens_a_session(res: &Resource) {
    for session in 9..30 {
        let mut fake = FakeAlpha::connect(res, |hello| {
            as_secondary(hello);
            hello.session = session;
        });
        if fake.next().is_some() {
            let primary = blkmirror_metadata::Flags::PRIMARY.bits();
            assert_ne!(fake.beta.flags & primary, 0, "{:?}", fake.beta);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no handshake opened a session");
}

/// Resync frames from a peer that is not the sync source are refused: the
/// data would overwrite beta's unmarked, and the end would make beta take
/// the peer's generation as its own. Beta's data and metadata are untouched.
#[test]
fn resync_frames_from_a_peer_that_is_not_the_source_are_refused() {
    let res = Resource::new();
    let (_beta, generations) = beta_alone(&res);
    let data = res.data_area("beta");
    let frames = [
        (
            "ResyncData",
            blkmirror_proto::Message::ResyncData {
                offset: 0,
                data: vec![0xee; 4096],
            },
        ),
        (
            "ResyncDone",
            blkmirror_proto::Message::ResyncDone { current: 12345 },
        ),
    ];
    for (name, frame) in frames {
        let mut fake = FakeAlpha::connect(&res, |_| {});
        fake.send(1, &frame);
        while fake.next().is_some() {}
        let status = res.wait_error("beta", &format!("sent {name}"));
        assert!(
            status["last_error"]
                .as_str()
                .unwrap()
                .contains("not its sync target"),
            "{status}"
        );
    }
    let after = res.json("beta", &["dump-md", "--json"])["generations"].clone();
    assert_eq!(after, generations, "beta's generations are untouched");
    assert!(res.data_area("beta") == data, "beta's data is untouched");
}

/// The end of a resync must name the generation the target takes.
#[test]
fn a_resync_end_naming_no_generation_is_refused() {
    let res = Resource::new();
    let (_beta, _) = beta_alone(&res);
    // The fake wrote alone since it parted from beta: beta becomes its
    // sync target.
    let mut fake = FakeAlpha::connect(&res, |hello| {
        hello.generations.bitmap = hello.generations.current;
        hello.generations.current = 0x5eed;
    });
    fake.send(1, &blkmirror_proto::Message::ResyncDone { current: 0 });
    while fake.next().is_some() {}
    res.wait_error("beta", "names no generation");
    let status = res.status("beta");
    assert_ne!(status["disk_state"], "UpToDate", "{status}");
}

/// A checksum request over more than any resync chunk is answered EINVAL,
/// not read whole.
#[test]
fn an_oversized_checksum_request_is_refused() {
    let res = Resource::new();
    let (_beta, _) = beta_alone(&res);
    let mut fake = FakeAlpha::connect(&res, |_| {});
    let oversized = blkmirror_proto::Message::ResyncChecksum {
        offset: 0,
        len: 5 << 20,
        digest: [0; 32],
    };
    fake.send(1, &oversized);
    assert_eq!(fake.answer(1), libc::EINVAL as u32);
}

/// Only a primary writes: a peer that has not said it is primary (in its
/// Hello or a `State`) has its writes refused, and beta's data stays as it
/// was. Once the same peer says it is primary, its write is applied.
#[test]
fn writes_from_a_peer_that_is_not_primary_are_refused() {
    let res = Resource::new();
    let (_beta, _) = beta_alone(&res);
    let data = res.data_area("beta");
    let write = blkmirror_proto::Message::Write {
        offset: 0,
        flags: 0,
        data: vec![0xee; 4096],
    };
    let mut fake = FakeAlpha::connect(&res, |_| {});
    fake.send(1, &write);
    while fake.next().is_some() {}
    res.wait_error("beta", "not primary");
    assert!(res.data_area("beta") == data, "beta's data is untouched");

    let mut fake = FakeAlpha::connect(&res, |_| {});
    let primary = blkmirror_proto::Message::State {
        role: 1,
        disk_state: 0,
        flags: 0,
    };
    fake.send(1, &primary);
    fake.send(2, &write);
    assert_eq!(fake.answer(2), 0, "beta applied the write");
    assert!(res.data_area("beta")[..4096] == [0xee; 4096]);
}

/// Both nodes promoted at the same moment, round after round: exactly one
/// becomes primary (the other is refused, and says why; when the two
/// questions meet, alpha, whose name sorts first), and the session goes on
/// throughout, with no split brain to resolve.
#[test]
fn nodes_promoted_at_once_never_both_become_primary() {
    const ROUNDS: usize = 20;
    let res = Resource::new();
    let (alpha, beta) = synced_pair(&res);
    res.ok("alpha", &["secondary"]);
    let mut won = [0; 2];
    for round in 0..ROUNDS {
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let promotions = ["alpha", "beta"].map(|node| {
            let mut cmd = Command::new(BIN);
            cmd.arg("-c").arg(&res.config).args(["-n", node, "primary"]);
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                cmd.output().unwrap()
            })
        });
        let outputs = promotions.map(|p| p.join().unwrap());
        let promoted = outputs.each_ref().map(|o| o.status.success());
        assert!(
            !(promoted[0] && promoted[1]),
            "round {round}: both nodes became primary"
        );
        for (node, output) in ["alpha", "beta"].iter().zip(&outputs) {
            let said = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success() || said.contains("Refusing to promote"),
                "round {round}: {node} failed otherwise: {said}"
            );
        }
        for node in ["alpha", "beta"] {
            let s = res.wait_established(node);
            assert_eq!(s["disk_state"], "UpToDate", "round {round}: {s}");
        }
        let winner = promoted.iter().position(|&p| p);
        let winner = winner.unwrap_or_else(|| panic!("round {round}: both were refused"));
        won[winner] += 1;
        let name = ["alpha", "beta"][winner];
        assert_eq!(res.status(name)["role"], "Primary");
        res.wait_status(["beta", "alpha"][winner], "the peer's promotion", |s| {
            s["peer_role"] == "Primary"
        });
        res.ok(name, &["secondary"]);
    }
    let asked_again = alpha.log().matches("so it asks again").count();
    eprintln!(
        "{ROUNDS} rounds: alpha won {}, beta won {}; alpha asked again {asked_again} times",
        won[0], won[1]
    );
    // One at a time, a promotion goes through as ever.
    res.ok("beta", &["primary"]);
    for node in [&alpha, &beta] {
        assert!(
            !node.log().contains("connection to the peer lost"),
            "a session ended: {}",
            node.log()
        );
    }
    res.assert_identical();
}

/// A node answers its peer's request to be promoted: yes while it is
/// secondary, no once it is primary itself; the session goes on either way.
#[test]
fn a_promotion_request_is_granted_only_by_a_secondary() {
    let res = Resource::new();
    let (_beta, _) = beta_alone(&res);
    let mut fake = FakeAlpha::connect(&res, as_secondary);
    fake.send(1, &blkmirror_proto::Message::PromoteAsk);
    assert_eq!(fake.answer(1), 0, "a secondary lets its peer be promoted");
    drop(fake);
    res.wait_status("beta", "the fake alpha gone", |s| {
        s["connection"] != "Connected"
    });
    res.ok("beta", &["primary"]);
    let mut fake = FakeAlpha::connect(&res, as_secondary);
    fake.send(1, &blkmirror_proto::Message::PromoteAsk);
    assert_ne!(fake.answer(1), 0, "a primary refuses a second primary");
    fake.send(2, &blkmirror_proto::Message::Barrier { epoch: 1 });
    assert_eq!(fake.answer(2), 0, "the session goes on after a refusal");
}

/// Two nodes promoted at once each saw the other secondary: the `State`
/// that says the peer became primary too ends the session, before either
/// takes the other's writes.
#[test]
fn a_peer_that_becomes_primary_beside_a_primary_is_refused() {
    let res = Resource::new();
    let (_beta, _) = beta_alone(&res);
    res.ok("beta", &["primary"]);
    let mut fake = FakeAlpha::connect(&res, as_secondary);
    let primary = blkmirror_proto::Message::State {
        role: 1,
        disk_state: 0,
        flags: 0,
    };
    fake.send(1, &primary);
    while fake.next().is_some() {}
    res.wait_error("beta", "two primaries");
    assert_eq!(res.status("beta")["role"], "Primary");
}
