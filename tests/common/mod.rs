//! Shared helpers for the multi-process tests: a resource in a temporary
//! directory, real `blkmirror up` processes, and third-party tools that are
//! skipped with a printed reason when missing.
#![allow(dead_code)] // each test binary uses its own subset

pub mod stamped;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blkmirror");
pub const RESOURCE: &str = "r0";
pub const DISK_BYTES: u64 = 64 << 20;
/// Metadata area of a 64 MiB disk.
pub const DATA_OFFSET: u64 = 1 << 20;
pub const DATA_BYTES: u64 = DISK_BYTES - DATA_OFFSET;

/// Returns false (after saying why) when `tool` is not installed.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        skip(&format!(
            "{tool} is not installed (scripts/install-test-deps installs it)"
        ));
    }
    found
}

/// Says why a test is skipped, on stderr directly so the test harness's
/// output capture does not swallow it.
pub fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "skipped: {reason}");
}

/// A TCP port nothing listens on right now, and that no outgoing
/// connection will take before a node binds it: ports the kernel hands out
/// itself (32768 and up) could go to any test's connection in between.
/// Each call in a test binary gets a port of its own.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries of different runs start at different places.
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "ran out of test ports");
        let port = FIRST + (start + n) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A two-node resource in a temporary directory; NBD over Unix sockets.
pub struct Resource {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Resource {
    pub fn new() -> Resource {
        Resource::with_nbd(|dir, node| format!("unix:{}/{node}.nbd", dir.display()))
    }

    pub fn with_nbd(nbd: impl Fn(&Path, &str) -> String) -> Resource {
        let dir = tempfile::Builder::new()
            .prefix("blkmirror-test-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let mut text = format!("name = \"{RESOURCE}\"\nprotocol = \"C\"\ntimeout = 2\n");
        // Link ports of their own, so tests running side by side never meet.
        for (node, port) in [("alpha", free_port()), ("beta", free_port())] {
            text.push_str(&format!(
                "[nodes.{node}]\ndisk = \"{d}/{node}.img\"\nlinks = [\"127.0.0.1:{port}\"]\n\
                 control = \"{d}/{node}.ctl\"\nnbd = \"{}\"\n",
                nbd(d, node),
                d = d.display()
            ));
            std::fs::File::create(d.join(format!("{node}.img")))
                .unwrap()
                .set_len(DISK_BYTES)
                .unwrap();
        }
        let config = d.join("r0.toml");
        std::fs::write(&config, text).unwrap();
        Resource { dir, config }
    }

    pub fn disk(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.img"))
    }

    pub fn nbd_socket(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.nbd"))
    }

    /// The NBD URI of a node's export, for libnbd and qemu tools.
    pub fn uri(&self, node: &str) -> String {
        format!(
            "nbd+unix:///{RESOURCE}?socket={}",
            self.nbd_socket(node).display()
        )
    }

    /// Runs `blkmirror -c CONFIG -n NODE ARGS...` to completion.
    pub fn cli(&self, node: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("-c")
            .arg(&self.config)
            .args(["-n", node])
            .args(args)
            .output()
            .unwrap()
    }

    /// Like `cli`, but the command must fail; returns its error output.
    pub fn fails(&self, node: &str, args: &[&str]) -> String {
        let out = self.cli(node, args);
        assert!(
            !out.status.success(),
            "blkmirror {args:?} on {node} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `status --json` of a running node.
    pub fn status(&self, node: &str) -> serde_json::Value {
        self.json(node, &["status", "--json"])
    }

    /// Like `cli`, but the command must succeed; returns its stdout.
    pub fn ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.cli(node, args);
        assert!(
            out.status.success(),
            "blkmirror {args:?} on {node} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(node, args)).unwrap()
    }

    /// Rewrites the config file.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, edit(text)).unwrap();
    }

    /// Sets a top-level key (before the node tables).
    pub fn set(&self, key: &str, value: &str) {
        self.edit_config(|text| text.replacen("[nodes.", &format!("{key} = {value}\n[nodes."), 1));
    }

    /// Replaces the default replication protocol (C).
    pub fn set_protocol(&self, protocol: &str) {
        self.edit_config(|text| {
            text.replace("protocol = \"C\"", &format!("protocol = \"{protocol}\""))
        });
    }

    /// Gives each node a second link on loopback.
    pub fn add_second_link(&self) {
        self.edit_config(|text| {
            text.lines()
                .map(|line| match line.strip_suffix("\"]") {
                    Some(start) if line.starts_with("links = ") => {
                        format!("{start}\", \"127.0.0.1:{}\"]", free_port())
                    }
                    _ => line.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        });
    }

    /// Starts `up` for a node and waits until its control socket answers.
    pub fn up(&self, node: &str) -> NodeProcess {
        self.up_with(node, &[])
    }

    /// Like `up`, with the node started through `prefix` (such as
    /// `ip netns exec NS`).
    pub fn up_with(&self, node: &str, prefix: &[&str]) -> NodeProcess {
        self.start_node(node, prefix, &[])
    }

    /// Like `up`, with disk faults injected from the start (a build with
    /// the `fault-injection` feature; rules as in `BLKMIRROR_FAULTS`).
    pub fn up_with_faults(&self, node: &str, faults: &str) -> NodeProcess {
        self.start_node(node, &[], &[("BLKMIRROR_FAULTS", faults)])
    }

    fn start_node(&self, node: &str, prefix: &[&str], env: &[(&str, &str)]) -> NodeProcess {
        let log_path = self.dir.path().join(format!("{node}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut command = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .arg("-c")
            .arg(&self.config)
            .args(["-n", node, "up"])
            .env("BLKMIRROR_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut process = NodeProcess { child, log_path };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!(
                    "node {node} exited at start-up ({status}): {}",
                    process.log()
                );
            }
            if self.cli(node, &["status"]).status.success() {
                return process;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} did not come up: {}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// create-md, up, primary --force: a standalone primary ready for I/O.
    pub fn primary(&self, node: &str) -> NodeProcess {
        self.ok(node, &["create-md"]);
        let process = self.up(node);
        self.ok(node, &["primary", "--force"]);
        process
    }

    /// `down`, then waits for the process to exit successfully.
    pub fn down(&self, node: &str, mut process: NodeProcess) {
        self.ok(node, &["down"]);
        let status = process.child.wait().unwrap();
        assert!(
            status.success(),
            "node {node} exited with {status}: {}",
            process.log()
        );
    }

    /// Reads bytes of a node's data area straight from its backing file.
    pub fn data_on_disk(&self, node: &str, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(self.disk(node)).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, DATA_OFFSET + offset).unwrap();
        buf
    }
}

impl Resource {
    /// True when `len` bytes of the node's data area at `offset` all equal `byte`.
    pub fn disk_holds(&self, node: &str, offset: u64, len: usize, byte: u8) -> bool {
        self.data_on_disk(node, offset, len)
            .iter()
            .all(|&b| b == byte)
    }
}

pub struct NodeProcess {
    pub child: Child,
    pub log_path: PathBuf,
}

impl NodeProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Deterministic bytes that differ per offset.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            ((offset + i)
                .wrapping_add(seed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                >> 56) as u8
        })
        .collect()
}

impl Resource {
    /// Polls `status --json` of a node until `check` holds (at most 60 s).
    pub fn wait_status(
        &self,
        node: &str,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.cli(node, &["status", "--json"]);
            if out.status.success() {
                let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if check(&status) {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "{node} never reached {what}: {status}"
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "{node} never reached {what}: status failed"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a node's `last_error` mentions `words`.
    pub fn wait_error(&self, node: &str, words: &str) -> serde_json::Value {
        self.wait_status(node, &format!("an error about {words}"), |s| {
            s["last_error"].as_str().is_some_and(|e| e.contains(words))
        })
    }

    /// Runs fio's nbd engine against a node's export, in the test's
    /// directory; `args` add the job.
    pub fn fio(&self, node: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("fio");
        cmd.current_dir(self.dir.path())
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", self.uri(node)))
            .args(args);
        cmd
    }

    /// Waits until a node reports replication Established.
    pub fn wait_established(&self, node: &str) -> serde_json::Value {
        self.wait_status(node, "Established", |s| s["replication"] == "Established")
    }

    /// The whole data area of a node's disk.
    pub fn data_area(&self, node: &str) -> Vec<u8> {
        let mut data = std::fs::read(self.disk(node)).unwrap();
        data.drain(..DATA_OFFSET as usize);
        data
    }

    /// Runs qemu-io against a node's export; each entry is one `-c` command.
    pub fn qemu_io(&self, node: &str, commands: &[&str]) -> String {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &self.uri(node)]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        run(&mut cmd)
    }

    /// Both data areas are byte-identical (reports the first difference).
    pub fn assert_identical(&self) {
        let (a, b) = (self.data_area("alpha"), self.data_area("beta"));
        assert_eq!(a.len(), b.len());
        if let Some(pos) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("replicas differ first at data offset {pos}");
        }
    }
}

/// A pair where alpha is primary and beta has taken the initial full copy.
pub fn synced_pair(res: &Resource) -> (NodeProcess, NodeProcess) {
    synced_pair_with(res, &[], &[])
}

/// `synced_pair`, with each node started through a prefix command.
pub fn synced_pair_with(
    res: &Resource,
    alpha_prefix: &[&str],
    beta_prefix: &[&str],
) -> (NodeProcess, NodeProcess) {
    res.ok("alpha", &["create-md"]);
    res.ok("beta", &["create-md"]);
    let alpha = res.up_with("alpha", alpha_prefix);
    let beta = res.up_with("beta", beta_prefix);
    res.ok("alpha", &["primary", "--force"]);
    res.wait_established("alpha");
    let beta_status = res.wait_established("beta");
    assert_eq!(beta_status["disk_state"], "UpToDate", "{beta_status}");
    assert_eq!(beta_status["peer_disk_state"], "UpToDate", "{beta_status}");
    // The target tells the source its new state once the copy is done.
    res.wait_status("alpha", "the peer's disk reported UpToDate", |s| {
        s["peer_disk_state"] == "UpToDate"
    });
    (alpha, beta)
}
