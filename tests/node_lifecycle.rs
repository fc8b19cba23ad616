//! A node's life across processes: restarts, torn and corrupt metadata,
//! create-md safety, config errors, roles, signals and crashes, and refusals,
//! each against real `blkmirror` processes on sparse disk files.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use blkmirror_nbd::client::{Client, ClientError};
use common::*;
use serde_json::Value;

/// How long a command that must refuse to start may take.
const REFUSAL_LIMIT: Duration = Duration::from_secs(20);
/// How long a node may take to react to a signal or a state change.
const REACTION_LIMIT: Duration = Duration::from_secs(20);
const SLOT_BYTES: u64 = 4096;

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The command must fail; returns its stderr.
fn refused(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} unexpectedly succeeded: stdout {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr_of(out)
}

/// `blkmirror -c CONFIG -n NODE ARGS...`, not yet run.
fn blkmirror(config: &Path, node: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("-c").arg(config).args(["-n", node]).args(args);
    cmd
}

/// Runs a command to completion, killing it (and failing) past `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // The child may have exited just now; the panic is what matters.
            let _ = send_signal(pid, libc::SIGKILL);
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

/// Sends `sig` to a process this test started.
fn send_signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // `pid` is a child this test spawned and has not yet reaped.
    match unsafe { libc::kill(pid, sig) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    send_signal(pid, sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// Waits (bounded) for a node process to exit.
fn wait_exit(process: &mut NodeProcess, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "node did not exit within {limit:?}: {}",
            process.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` until it holds, failing after `limit`.
fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dump_md(res: &Resource, node: &str) -> Value {
    res.json(node, &["dump-md", "--json"])
}

fn flags(doc: &Value) -> Vec<String> {
    doc["flags"]
        .as_array()
        .unwrap_or_else(|| panic!("no flags in {doc}"))
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

fn has_flag(doc: &Value, flag: &str) -> bool {
    flags(doc).iter().any(|f| f == flag)
}

fn slots(doc: &Value) -> Vec<String> {
    doc["slots"]
        .as_array()
        .unwrap_or_else(|| panic!("no slots in {doc}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A hash of a whole file, to prove a refusing command wrote nothing.
fn file_hash(path: &Path) -> u64 {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buf[..n]);
    }
}

/// Inverts one byte of a file in place.
fn flip_byte(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[!byte[0]], offset).unwrap();
    file.sync_all().unwrap();
}

async fn connect(res: &Resource, node: &str) -> Client {
    match Client::connect_unix(&res.nbd_socket(node), RESOURCE).await {
        Ok(client) => client,
        Err(e) => panic!("NBD connect to {node} failed: {e}"),
    }
}

/// An in-memory copy of what the data area must hold.
struct Model(Vec<u8>);

impl Model {
    fn new() -> Model {
        Model(vec![0u8; DATA_BYTES as usize])
    }

    async fn write(&mut self, client: &mut Client, seed: u64, offset: u64, len: usize, fua: bool) {
        let data = pattern(seed, offset, len);
        client.write(offset, &data, fua).await.unwrap();
        self.0[offset as usize..offset as usize + len].copy_from_slice(&data);
    }

    /// Reads the whole export through NBD and compares it with the model.
    async fn check_nbd(&self, client: &mut Client) {
        assert_eq!(client.size(), DATA_BYTES);
        let chunk = 1u64 << 20;
        let mut offset = 0;
        while offset < DATA_BYTES {
            let len = chunk.min(DATA_BYTES - offset);
            let got = client.read(offset, len as u32).await.unwrap();
            let want = &self.0[offset as usize..(offset + len) as usize];
            assert!(
                got == want,
                "NBD read at {offset} differs from what was written (first difference at {})",
                offset + first_difference(&got, want) as u64
            );
            offset += len;
        }
    }

    /// Compares the backing file's data area with the model.
    fn check_disk(&self, res: &Resource, node: &str) {
        let got = res.data_on_disk(node, 0, DATA_BYTES as usize);
        assert!(
            got == self.0,
            "data area of {node}'s disk differs from what was written (first difference at {})",
            first_difference(&got, &self.0)
        );
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

/// Writes a mix of aligned, unaligned, FUA and overlapping writes.
async fn write_mix(model: &mut Model, client: &mut Client) {
    let mib = 1u64 << 20;
    model.write(client, 1, 0, 4096, false).await;
    model.write(client, 2, 12_345, 1000, false).await;
    model.write(client, 3, mib + 7, 65_539, true).await;
    model.write(client, 4, 20 * mib, 8192, false).await;
    model.write(client, 5, 20 * mib + 100, 1000, true).await; // overwrites part of seed 4
    model
        .write(client, 6, 40 * mib + 512, 128 << 10, false)
        .await;
    model.write(client, 7, DATA_BYTES - 8192, 4096, true).await;
    model.write(client, 8, DATA_BYTES - 3, 3, false).await;
}

/// Data written through NBD (aligned or not, FUA or not) survives `down` and
/// `up`, reads back identically, and sits at the right place in the backing file.
#[tokio::test]
async fn restart_keeps_data() {
    let res = Resource::new();
    let alpha = res.primary("alpha");
    let mut model = Model::new();
    let mut client = connect(&res, "alpha").await;
    write_mix(&mut model, &mut client).await;
    model.check_nbd(&mut client).await;
    client.disconnect().await.unwrap();
    let generation = res.status("alpha")["generations"]["current"].clone();
    res.down("alpha", alpha);

    let alpha = res.up("alpha");
    let s = res.status("alpha");
    assert_eq!(s["role"], "Secondary", "{s}");
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    // UpToDate data is promoted without --force, and stays in its generation.
    res.ok("alpha", &["primary"]);
    let s = res.status("alpha");
    assert_eq!(s["role"], "Primary", "{s}");
    assert_eq!(s["generations"]["current"], generation, "{s}");
    let mut client = connect(&res, "alpha").await;
    model.check_nbd(&mut client).await;
    client.disconnect().await.unwrap();
    res.down("alpha", alpha);
    model.check_disk(&res, "alpha");
}

/// A torn newest superblock slot falls back to the previous state without
/// losing data; with both slots corrupt the node refuses to start and writes nothing.
#[tokio::test]
async fn torn_and_corrupt_superblocks() {
    let res = Resource::new();
    let alpha = res.primary("alpha");
    let mut model = Model::new();
    let mut client = connect(&res, "alpha").await;
    write_mix(&mut model, &mut client).await;
    client.disconnect().await.unwrap();
    res.down("alpha", alpha);

    let md = dump_md(&res, "alpha");
    let sequence = md["sequence"].as_u64().unwrap();
    assert!(
        sequence >= 3,
        "create-md, up, primary and down each write: {md}"
    );
    let newest = sequence % 2;
    let older = 1 - newest;
    let slot_states = slots(&md);
    assert_eq!(
        slot_states[newest as usize],
        format!("valid, sequence {sequence}")
    );
    assert_eq!(
        slot_states[older as usize],
        format!("valid, sequence {}", sequence - 1)
    );
    assert!(has_flag(&md, "clean_shutdown"), "{md}");
    let data_before = res.data_on_disk("alpha", 0, DATA_BYTES as usize);

    // Tear the newest slot: the previous state is used.
    flip_byte(&res.disk("alpha"), newest * SLOT_BYTES + 100);
    let md = dump_md(&res, "alpha");
    assert_eq!(md["sequence"].as_u64(), Some(sequence - 1), "{md}");
    let slot_states = slots(&md);
    assert!(slot_states[newest as usize].starts_with("corrupt"), "{md}");
    assert_eq!(
        slot_states[older as usize],
        format!("valid, sequence {}", sequence - 1)
    );
    assert_eq!(md["disk_state"], "UpToDate", "{md}");
    // The state before the torn write is the primary's, not yet shut down.
    assert!(!has_flag(&md, "clean_shutdown"), "{md}");

    let alpha = res.up("alpha");
    let s = res.status("alpha");
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    assert_eq!(s["role"], "Secondary", "{s}");
    // Without the record of the clean shutdown, the node must assume a crash.
    assert!(has_flag(&s, "crashed_primary"), "{s}");
    // Coming up wrote the next state over the torn slot, repairing it.
    let md = dump_md(&res, "alpha");
    assert_eq!(md["sequence"].as_u64(), Some(sequence), "{md}");
    assert!(
        slots(&md).iter().all(|s| s.starts_with("valid")),
        "the torn slot was not repaired: {md}"
    );
    res.ok("alpha", &["primary"]);
    let mut client = connect(&res, "alpha").await;
    model.check_nbd(&mut client).await;
    client.disconnect().await.unwrap();
    res.down("alpha", alpha);
    assert!(
        res.data_on_disk("alpha", 0, DATA_BYTES as usize) == data_before,
        "data area changed across the torn-slot recovery"
    );

    // Corrupt both slots: the node must refuse, and leave the disk alone.
    flip_byte(&res.disk("alpha"), 100);
    flip_byte(&res.disk("alpha"), SLOT_BYTES + 100);
    let disk_before = file_hash(&res.disk("alpha"));
    let started = Instant::now();
    let out = run_bounded(blkmirror(&res.config, "alpha", &["up"]), REFUSAL_LIMIT);
    let err = refused(&out, "up on corrupt metadata");
    assert!(err.contains("corrupt"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusing took {:?}",
        started.elapsed()
    );
    assert!(!res.cli("alpha", &["status"]).status.success());
    let err = refused(
        &res.cli("alpha", &["dump-md", "--json"]),
        "dump-md on corrupt metadata",
    );
    assert!(
        err.contains("corrupt") && err.contains("slot 0") && err.contains("slot 1"),
        "{err}"
    );
    let err = refused(
        &res.cli("alpha", &["dump-md"]),
        "dump-md on corrupt metadata",
    );
    assert!(err.contains("corrupt"), "{err}");
    assert_eq!(
        file_hash(&res.disk("alpha")),
        disk_before,
        "a refused start wrote to the disk"
    );
    assert!(
        res.data_on_disk("alpha", 0, DATA_BYTES as usize) == data_before,
        "data area changed"
    );
    model.check_disk(&res, "alpha");
}

/// create-md refuses to overwrite existing metadata or a file system without
/// --force, leaving the disk as it was, and does so with --force.
#[test]
fn create_md_refuses_to_overwrite() {
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    let uuid = dump_md(&res, "alpha")["volume_uuid"].clone();
    let disk_before = file_hash(&res.disk("alpha"));
    let err = refused(&res.cli("alpha", &["create-md"]), "second create-md");
    assert!(
        err.contains("--force") && err.contains("blkmirror metadata"),
        "{err}"
    );
    assert_eq!(
        file_hash(&res.disk("alpha")),
        disk_before,
        "a refused create-md wrote"
    );
    res.ok("alpha", &["create-md", "--force"]);
    let md = dump_md(&res, "alpha");
    assert_ne!(
        md["volume_uuid"], uuid,
        "--force did not create new metadata: {md}"
    );
    assert_eq!(md["disk_state"], "Inconsistent", "{md}");

    // An ext4 superblock magic on a fresh disk.
    let beta_disk = res.disk("beta");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&beta_disk)
        .unwrap()
        .write_all_at(&[0x53, 0xEF], 1080)
        .unwrap();
    let disk_before = file_hash(&beta_disk);
    let err = refused(&res.cli("beta", &["create-md"]), "create-md over ext4");
    assert!(err.contains("--force") && err.contains("ext"), "{err}");
    assert_eq!(
        file_hash(&beta_disk),
        disk_before,
        "a refused create-md wrote"
    );
    refused(&res.cli("beta", &["dump-md"]), "dump-md without metadata");
    res.ok("beta", &["create-md", "--force"]);
    let md = dump_md(&res, "beta");
    assert_eq!(md["data_offset"].as_u64(), Some(DATA_OFFSET), "{md}");
    assert_eq!(md["data_size"].as_u64(), Some(DATA_BYTES), "{md}");
    let mut magic = [0u8; 2];
    std::fs::File::open(&beta_disk)
        .unwrap()
        .read_exact_at(&mut magic, 1080)
        .unwrap();
    assert_eq!(
        magic,
        [0, 0],
        "the old file system signature survived create-md"
    );
}

/// Config errors name the file and the key, unknown nodes name the known ones,
/// and a missing file is named.
#[test]
fn config_errors_are_precise() {
    let res = Resource::new();
    let good = std::fs::read_to_string(&res.config).unwrap();
    let alpha_nbd = format!("nbd = \"unix:{}\"", res.nbd_socket("alpha").display());
    assert!(good.contains(&alpha_nbd), "{good}");
    let bad_path = res.dir.path().join("bad.toml");
    std::fs::write(&bad_path, good.replace(&alpha_nbd, "nbd = \"http://x\"")).unwrap();
    let bad = bad_path.display().to_string();
    let disk_before = file_hash(&res.disk("alpha"));
    for (node, args) in [
        ("alpha", &["status"][..]),
        ("alpha", &["dump-md", "--json"]),
        ("alpha", &["create-md"]),
        ("alpha", &["up"]),
        ("alpha", &["down"]),
        ("alpha", &["primary", "--force"]),
        ("beta", &["status"]),
    ] {
        let out = run_bounded(blkmirror(&bad_path, node, args), REFUSAL_LIMIT);
        let err = refused(&out, &format!("{args:?} with a bad config"));
        assert!(
            err.contains(&bad) && err.contains("nodes.alpha.nbd") && err.contains("http://x"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        file_hash(&res.disk("alpha")),
        disk_before,
        "a bad config wrote"
    );
    assert!(!res.nbd_socket("alpha").exists() && !res.dir.path().join("alpha.ctl").exists());

    let err = refused(&res.cli("gamma", &["status"]), "unknown node");
    assert!(
        err.contains("gamma")
            && err.contains("alpha, beta")
            && err.contains(&res.config.display().to_string()),
        "{err}"
    );

    let missing = res.dir.path().join("nowhere").join("r9.toml");
    let err = refused(
        &blkmirror(&missing, "alpha", &["status"]).output().unwrap(),
        "missing config",
    );
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let out = Command::new(BIN)
        .args(["-n", "alpha", "status"])
        .env_remove("BLKMIRROR_CONFIG")
        .output()
        .unwrap();
    let err = refused(&out, "no config at all");
    assert!(
        err.contains("-c") && err.contains("BLKMIRROR_CONFIG"),
        "{err}"
    );
}

/// Roles and disk states follow up and primary; promotion of Inconsistent data
/// needs --force; demotion waits for NBD clients to leave.
#[tokio::test]
async fn roles_disk_states_and_demotion() {
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    let alpha = res.up("alpha");
    let s = res.status("alpha");
    assert_eq!(s["role"], "Secondary", "{s}");
    assert_eq!(s["disk_state"], "Inconsistent", "{s}");
    assert_eq!(s["nbd_clients"], 0, "{s}");

    let err = refused(
        &res.cli("alpha", &["primary"]),
        "promoting Inconsistent data",
    );
    assert!(
        err.contains("--force") && err.contains("Inconsistent"),
        "{err}"
    );
    let s = res.status("alpha");
    assert_eq!(
        s["role"], "Secondary",
        "a refused promotion changed the role: {s}"
    );

    res.ok("alpha", &["primary", "--force"]);
    let s = res.status("alpha");
    assert_eq!(s["role"], "Primary", "{s}");
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    assert_ne!(s["generations"]["current"], "0000000000000000", "{s}");

    let mut client = connect(&res, "alpha").await;
    wait_until("nbd_clients to reach 1", REACTION_LIMIT, || {
        res.status("alpha")["nbd_clients"] == 1
    });
    let err = refused(&res.cli("alpha", &["secondary"]), "demotion under a client");
    assert!(err.contains("client"), "{err}");
    assert_eq!(res.status("alpha")["role"], "Primary");
    // The attached client still works.
    client.write(0, &pattern(9, 0, 4096), true).await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), pattern(9, 0, 4096));
    client.disconnect().await.unwrap();

    wait_until("nbd_clients to reach 0", REACTION_LIMIT, || {
        res.status("alpha")["nbd_clients"] == 0
    });
    res.ok("alpha", &["secondary"]);
    let s = res.status("alpha");
    assert_eq!(s["role"], "Secondary", "{s}");
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    assert!(!has_flag(&s, "primary"), "{s}");
    // Demoted: the export refuses new clients.
    match Client::connect_unix(&res.nbd_socket("alpha"), RESOURCE).await {
        Err(ClientError::Refused { message, .. }) => {
            assert!(message.contains("Secondary"), "{message}")
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a demoted node accepted an NBD client"),
    }
    res.down("alpha", alpha);
    assert_eq!(res.data_on_disk("alpha", 0, 4096), pattern(9, 0, 4096));
}

/// SIGTERM shuts a node down cleanly (exit 0, clean_shutdown recorded);
/// SIGKILL of a primary does not, and the next start flags crashed_primary.
#[test]
fn sigterm_is_clean_and_sigkill_is_a_crash() {
    let res = Resource::new();
    let mut alpha = res.primary("alpha");
    assert!(has_flag(&dump_md(&res, "alpha"), "primary"));
    signal(alpha.child.id(), libc::SIGTERM);
    let status_code = wait_exit(&mut alpha, REACTION_LIMIT);
    assert!(
        status_code.success(),
        "SIGTERM exit: {status_code}: {}",
        alpha.log()
    );
    let md = dump_md(&res, "alpha");
    assert!(has_flag(&md, "clean_shutdown"), "{md}");
    assert!(
        !has_flag(&md, "primary") && !has_flag(&md, "crashed_primary"),
        "{md}"
    );
    assert!(
        !res.dir.path().join("alpha.ctl").exists() && !res.nbd_socket("alpha").exists(),
        "sockets left behind after SIGTERM"
    );

    // A clean restart is no crash.
    let mut alpha = res.up("alpha");
    let s = res.status("alpha");
    assert!(!has_flag(&s, "crashed_primary"), "{s}");
    assert!(
        !has_flag(&s, "clean_shutdown"),
        "a running node claims a clean shutdown: {s}"
    );
    res.ok("alpha", &["primary"]);
    let md = dump_md(&res, "alpha");
    assert!(
        has_flag(&md, "primary") && !has_flag(&md, "clean_shutdown"),
        "{md}"
    );

    signal(alpha.child.id(), libc::SIGKILL);
    let status_code = wait_exit(&mut alpha, REACTION_LIMIT);
    assert!(!status_code.success(), "SIGKILL exit: {status_code}");
    drop(alpha);
    let md = dump_md(&res, "alpha");
    assert!(!has_flag(&md, "clean_shutdown"), "{md}");
    assert!(has_flag(&md, "primary"), "{md}");

    // The next start notices, despite the stale sockets the crash left.
    let alpha = res.up("alpha");
    let s = res.status("alpha");
    assert!(has_flag(&s, "crashed_primary"), "{s}");
    assert_eq!(s["role"], "Secondary", "{s}");
    assert_eq!(s["disk_state"], "UpToDate", "{s}");
    let md = dump_md(&res, "alpha");
    assert!(has_flag(&md, "crashed_primary"), "{md}");
    assert!(!has_flag(&md, "primary"), "{md}");
    // Promotion starts a fresh, non-crashed primary life.
    res.ok("alpha", &["primary"]);
    assert!(!has_flag(&res.status("alpha"), "crashed_primary"));
    res.down("alpha", alpha);
    let md = dump_md(&res, "alpha");
    assert!(
        has_flag(&md, "clean_shutdown") && !has_flag(&md, "crashed_primary"),
        "{md}"
    );
}

/// Control requests do not wait for one another: a client that connects
/// and says nothing holds up neither `status` nor `down` (and is told so
/// after a while), and a `disconnect` waiting for a silent peer does not
/// hold up `status`. Changes wait for the one in progress, `down` too, and
/// none runs after `down`.
#[test]
fn control_requests_do_not_wait_for_one_another() {
    use std::io::BufRead;
    let res = Resource::new();
    // The goodbye's wait (5 s), not the peer's timeout, ends the disconnect.
    res.edit_config(|text| text.replace("timeout = 2", "timeout = 10"));
    let (mut alpha, beta) = synced_pair(&res);
    let control = res.dir.path().join("alpha.ctl");
    let silent = std::os::unix::net::UnixStream::connect(&control).unwrap();
    let bounded =
        |args: &[&str]| run_bounded(blkmirror(&res.config, "alpha", args), REACTION_LIMIT);
    let status = bounded(&["status", "--json"]);
    let s: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["role"], "Primary", "{s}");
    // The silent client is told it took too long.
    silent.set_read_timeout(Some(REACTION_LIMIT)).unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(&silent)
        .read_line(&mut answer)
        .unwrap();
    assert!(answer.contains("no request within"), "{answer:?}");
    let _silent_still = std::os::unix::net::UnixStream::connect(&control).unwrap();

    // The peer stops answering; disconnecting waits for its goodbye.
    signal(beta.child.id(), libc::SIGSTOP);
    let in_background = |args: &'static [&'static str]| {
        let cmd = blkmirror(&res.config, "alpha", args);
        std::thread::spawn(move || run_bounded(cmd, REACTION_LIMIT))
    };
    let disconnect = in_background(&["disconnect"]);
    std::thread::sleep(Duration::from_millis(500));
    let status = bounded(&["status", "--json"]);
    assert!(status.status.success(), "{}", stderr_of(&status));
    assert!(
        !disconnect.is_finished(),
        "`status` waited for `disconnect` (or the peer's goodbye took no wait)"
    );
    let down = in_background(&["down"]);
    std::thread::sleep(Duration::from_millis(300));
    let connect = bounded(&["connect"]);
    assert!(
        stderr_of(&connect).contains("the node is going down"),
        "a change queued behind `down`: {}",
        stderr_of(&connect)
    );
    let disconnected = disconnect.join().unwrap();
    assert!(
        disconnected.status.success(),
        "{}",
        stderr_of(&disconnected)
    );
    let down = down.join().unwrap();
    assert!(down.status.success(), "{}", stderr_of(&down));
    let exit = wait_exit(&mut alpha, REACTION_LIMIT);
    assert!(exit.success(), "alpha's exit: {exit}: {}", alpha.log());
    assert!(has_flag(&dump_md(&res, "alpha"), "clean_shutdown"));
    signal(beta.child.id(), libc::SIGCONT);
    res.down("beta", beta);
}

/// Only the owner may reach the control socket (it promotes, invalidates
/// and stops the node), even when the node starts with umask 000.
#[test]
fn the_control_socket_is_for_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    let alpha = res.up_with("alpha", &["sh", "-c", "umask 000; exec \"$@\"", "sh"]);
    let mode = std::fs::metadata(res.dir.path().join("alpha.ctl"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    res.down("alpha", alpha);
}

/// A second `up` of a running node is refused, and so is a node pointed at
/// its peer's disk.
#[test]
fn up_refuses_a_running_node_and_a_foreign_disk() {
    let res = Resource::new();
    let mut alpha = res.primary("alpha");
    let out = run_bounded(blkmirror(&res.config, "alpha", &["up"]), REFUSAL_LIMIT);
    let err = refused(&out, "second up");
    assert!(err.contains("already up"), "{err}");
    assert!(alpha.is_running(), "the first node died: {}", alpha.log());
    let s = res.status("alpha");
    assert_eq!(s["role"], "Primary", "{s}");
    res.down("alpha", alpha);

    // alpha's config pointing at beta's disk.
    res.ok("beta", &["create-md"]);
    let good = std::fs::read_to_string(&res.config).unwrap();
    let alpha_disk = format!("disk = \"{}\"", res.disk("alpha").display());
    assert!(good.contains(&alpha_disk), "{good}");
    let swapped = res.dir.path().join("swapped.toml");
    std::fs::write(
        &swapped,
        good.replace(
            &alpha_disk,
            &format!("disk = \"{}\"", res.disk("beta").display()),
        ),
    )
    .unwrap();
    let beta_before = file_hash(&res.disk("beta"));
    let out = run_bounded(blkmirror(&swapped, "alpha", &["up"]), REFUSAL_LIMIT);
    let err = refused(&out, "up on the peer's disk");
    assert!(err.contains("alpha") && err.contains("beta"), "{err}");
    assert!(
        err.contains(&res.disk("beta").display().to_string()),
        "{err}"
    );
    assert_eq!(
        file_hash(&res.disk("beta")),
        beta_before,
        "a refused up wrote to beta's disk"
    );
    assert!(
        !res.dir.path().join("alpha.ctl").exists(),
        "a refused up left its control socket"
    );
}

/// Where the kernel has no ublk driver (as here), `up` of a node with a
/// ublk device fails at once, names the module, and touches nothing.
#[test]
fn up_with_ublk_fails_at_once_without_the_driver() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        common::skip("this kernel has the ublk driver loaded; the VM lab covers ublk");
        return;
    }
    let res = Resource::new();
    res.ok("alpha", &["create-md"]);
    let before = file_hash(&res.disk("alpha"));
    res.edit_config(|text| text.replacen("[nodes.beta]", "ublk = { id = 0 }\n[nodes.beta]", 1));
    let started = std::time::Instant::now();
    let out = run_bounded(blkmirror(&res.config, "alpha", &["up"]), REFUSAL_LIMIT);
    let err = refused(&out, "up with ublk and no driver");
    assert!(
        err.contains("ublk_drv") && err.contains("/dev/ublk-control"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        file_hash(&res.disk("alpha")),
        before,
        "the refused up wrote"
    );
    assert!(!res.dir.path().join("alpha.ctl").exists());
    // The peer, without ublk, is unaffected by the key.
    res.ok("beta", &["create-md"]);
    let beta = res.up("beta");
    res.down("beta", beta);
}

/// A refused second `up` leaves the running primary's metadata alone, so a
/// later crash of that primary is still detected.
#[test]
fn refused_second_up_leaves_metadata_alone() {
    let res = Resource::new();
    let mut alpha = res.primary("alpha");
    let before = dump_md(&res, "alpha");
    let out = run_bounded(blkmirror(&res.config, "alpha", &["up"]), REFUSAL_LIMIT);
    refused(&out, "second up");
    let after = dump_md(&res, "alpha");
    assert_eq!(
        after["sequence"], before["sequence"],
        "a refused up wrote metadata: {after}"
    );
    assert!(has_flag(&after, "primary"), "{after}");
    signal(alpha.child.id(), libc::SIGKILL);
    wait_exit(&mut alpha, REACTION_LIMIT);
    drop(alpha);
    let _alpha = res.up("alpha");
    let s = res.status("alpha");
    assert!(
        has_flag(&s, "crashed_primary"),
        "a crash went unnoticed: {s}"
    );
}

/// The secondary's NBD export refuses clients by role, while the primary's
/// serves, and the data reaches the secondary by replication.
#[tokio::test]
async fn secondary_export_refuses_clients() {
    let res = Resource::new();
    let _alpha = res.primary("alpha");
    res.ok("beta", &["create-md"]);
    let _beta = res.up("beta");
    assert_eq!(res.status("beta")["role"], "Secondary");

    match Client::connect_unix(&res.nbd_socket("beta"), RESOURCE).await {
        Err(ClientError::Refused { export, message }) => {
            assert_eq!(export, RESOURCE);
            assert!(message.contains("Secondary"), "{message}");
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("the secondary accepted an NBD client"),
    }
    assert_eq!(res.status("beta")["nbd_clients"], 0);

    let mut client = connect(&res, "alpha").await;
    assert_eq!(client.size(), DATA_BYTES);
    client
        .write(4096, &pattern(3, 4096, 512), false)
        .await
        .unwrap();
    client.flush().await.unwrap();
    client.disconnect().await.unwrap();
    assert_eq!(res.data_on_disk("alpha", 4096, 512), pattern(3, 4096, 512));
    // The secondary gets the data by replication, never through its own export.
    res.wait_established("beta");
    assert_eq!(res.data_on_disk("beta", 4096, 512), pattern(3, 4096, 512));
}
