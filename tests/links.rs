//! Two links between two real nodes: both carry traffic, one dying breaks
//! nothing and costs no resync, both dying degrades to the dirty bitmap.
//! The cut-a-link tests put each node in a network namespace of its own,
//! joined by two veth pairs that the test takes down and up.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Two network namespaces joined by two veth pairs: link i is
/// 10.77.i.1 (namespace `a`) <-> 10.77.i.2 (namespace `b`).
struct NetPair {
    a: String,
    b: String,
}

impl NetPair {
    /// None (after saying why) where namespaces cannot be made here.
    fn new() -> Option<NetPair> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        if !have("ip") {
            return None;
        }
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pair = NetPair {
            a: format!("bm-{id}-a"),
            b: format!("bm-{id}-b"),
        };
        for ns in [&pair.a, &pair.b] {
            if !ip(&["netns", "add", ns]) {
                skip("cannot create network namespaces (needs root and netns support)");
                return None;
            }
            assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
        }
        for link in 0..2 {
            let (dev_a, dev_b) = (format!("a{link}"), format!("b{link}"));
            assert!(
                ip(&[
                    "link", "add", &dev_a, "netns", &pair.a, "type", "veth", "peer", "name",
                    &dev_b, "netns", &pair.b,
                ]),
                "cannot create a veth pair"
            );
            for (ns, dev, host) in [(&pair.a, &dev_a, 1), (&pair.b, &dev_b, 2)] {
                assert!(ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("10.77.{link}.{host}/24"),
                    "dev",
                    dev
                ]));
                assert!(ip(&["-n", ns, "link", "set", dev, "up"]));
            }
        }
        Some(pair)
    }

    /// `ip netns exec NS` for node `alpha` (namespace a) or `beta` (b).
    fn exec(&self, node: &str) -> [&str; 4] {
        let ns = if node == "alpha" { &self.a } else { &self.b };
        ["ip", "netns", "exec", ns]
    }

    /// Takes link `index` down (or up) on alpha's side; the veth peer loses
    /// its carrier with it.
    fn set_link(&self, index: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        assert!(ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &format!("a{index}"),
            state
        ]));
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            ip(&["netns", "del", ns]);
        }
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Points both nodes' links at the namespaces' addresses.
fn use_netns_links(res: &Resource) {
    res.edit_config(|text| {
        let (head, beta) = text.split_once("[nodes.beta]").unwrap();
        let relink = |part: &str, host: u8| {
            part.lines()
                .map(|line| {
                    if line.starts_with("links = ") {
                        format!("links = [\"10.77.0.{host}:7100\", \"10.77.1.{host}:7101\"]")
                    } else {
                        line.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!("{}\n[nodes.beta]{}\n", relink(head, 1), relink(beta, 2))
    });
}

fn link_state(status: &serde_json::Value, index: usize) -> String {
    status["links"][index]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn sent_bytes(status: &serde_json::Value, index: usize) -> u64 {
    status["links"][index]["sent_bytes"].as_u64().unwrap()
}

fn both_links_up(res: &Resource, node: &str) -> serde_json::Value {
    res.wait_status(node, "both links Connected", |s| {
        link_state(s, 0) == "Connected" && link_state(s, 1) == "Connected"
    })
}

/// Sessions this node has opened, from its log.
fn sessions(process: &NodeProcess) -> usize {
    process.log().matches("decision=").count()
}

/// On loopback: with two links, replicated writes go out on both.
#[test]
fn two_links_share_the_traffic() {
    if !have("fio") {
        return;
    }
    let res = Resource::new();
    res.add_second_link();
    let (_alpha, _beta) = synced_pair(&res);
    let before = both_links_up(&res, "alpha");
    both_links_up(&res, "beta");
    run(&mut res.fio(
        "alpha",
        &[
            "--name=share",
            "--rw=write",
            "--bs=256k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_state_save=0",
        ],
    ));
    let after = res.json("alpha", &["status", "--json"]);
    for link in 0..2 {
        let carried = sent_bytes(&after, link) - sent_bytes(&before, link);
        assert!(
            carried >= 4 << 20,
            "link {link} carried only {carried} bytes of 32 MiB: {after}"
        );
    }
    assert_eq!(after["out_of_sync_bytes"], 0);
    res.assert_identical();
}

/// Cutting one of two links under a running fio write stream: no client
/// error, no new session, no resync; the link is used again once back.
/// Cutting both degrades to the bitmap, and their return resyncs only what
/// was written meanwhile.
#[test]
fn a_link_cut_under_load_loses_nothing() {
    if !have("fio") || !have("qemu-io") {
        return;
    }
    let Some(net) = NetPair::new() else {
        return;
    };
    let res = Resource::new();
    use_netns_links(&res);
    let (alpha, _beta) = synced_pair_with(&res, &net.exec("alpha"), &net.exec("beta"));
    let idle = both_links_up(&res, "alpha");
    assert_eq!(sessions(&alpha), 1, "{}", alpha.log());

    // About 8 s of writes at 8 MiB/s, then fio reads everything back.
    let mut fio = res
        .fio(
            "alpha",
            &[
                "--name=cut",
                "--rw=randwrite",
                "--bs=64k",
                "--size=64M",
                "--rate=8m",
                "--iodepth=8",
                "--verify=crc32c",
                "--verify_state_save=0",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let loaded = res.json("alpha", &["status", "--json"]);
    assert!(
        sent_bytes(&loaded, 1) > sent_bytes(&idle, 1) + (1 << 20),
        "link 1 carried the stream before the cut: {loaded}"
    );
    net.set_link(1, false);
    let cut = res.wait_status("alpha", "link 1 declared down", |s| {
        link_state(s, 1) != "Connected"
    });
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio was done before link 1 was declared down"
    );
    assert_eq!(link_state(&cut, 0), "Connected", "{cut}");
    assert_eq!(cut["replication"], "Established", "{cut}");
    net.set_link(1, true);
    let deadline = Instant::now() + Duration::from_secs(120);
    let fio_out = loop {
        if let Some(status) = fio.try_wait().unwrap() {
            let out = fio.wait_with_output().unwrap();
            assert!(
                status.success(),
                "fio saw an error while a link was cut: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            break out;
        }
        assert!(Instant::now() < deadline, "fio did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(String::from_utf8_lossy(&fio_out.stdout).contains("cut"));
    let status = res.json("alpha", &["status", "--json"]);
    assert_eq!(
        (status["out_of_sync_bytes"].as_u64(), sessions(&alpha)),
        (Some(0), 1),
        "one link's loss must not end the session or mark anything: {status}"
    );
    assert!(
        alpha.log().contains("carrying on over the other link"),
        "the loss was noticed: {}",
        alpha.log()
    );
    let back = both_links_up(&res, "alpha");
    // Sixteen frames, not one: a frame goes on one link.
    let writes: Vec<String> = (0..16).map(|m| format!("write -P 0x3c {m}M 1M")).collect();
    let mut commands: Vec<&str> = writes.iter().map(String::as_str).collect();
    commands.push("flush");
    res.qemu_io("alpha", &commands);
    let later = res.json("alpha", &["status", "--json"]);
    assert!(
        sent_bytes(&later, 1) > sent_bytes(&back, 1) + (2 << 20),
        "the returned link carries traffic again: {later}"
    );
    res.assert_identical();

    // Both links down: degraded, and the writes are remembered.
    net.set_link(0, false);
    net.set_link(1, false);
    res.wait_status("alpha", "disconnected", |s| s["connection"] != "Connected");
    res.qemu_io("alpha", &["write -P 0x7e 20M 4M"]);
    let degraded = res.json("alpha", &["status", "--json"]);
    assert_eq!(degraded["out_of_sync_bytes"], 4 << 20, "{degraded}");
    net.set_link(0, true);
    net.set_link(1, true);
    let synced = res.wait_status("alpha", "in sync again", |s| {
        s["replication"] == "Established" && s["out_of_sync_bytes"] == 0
    });
    assert_eq!(
        synced["resync"]["total_bytes"],
        4 << 20,
        "a differential resync of what was written: {synced}"
    );
    res.wait_status("beta", "in sync again", |s| s["disk_state"] == "UpToDate");
    res.assert_identical();
}
