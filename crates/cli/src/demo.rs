//! `blkmirror demo`: the main job on this machine, with nothing to configure.
//! Builds a resource of two nodes in a temporary directory, runs each node as
//! its own process, mirrors writes made through NBD, lets the secondary go
//! away and catch up by differential resync, and fails over to it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkmirror_config::Config;
use blkmirror_nbd::{Client, ClientError};

use crate::commands::{self, Target};

const DISK_BYTES: u64 = 256 << 20;
const WRITE_BYTES: u64 = 32 << 20;
/// Written while the secondary is away.
const DIFF_OFFSET: u64 = 100 << 20;
const DIFF_BYTES: u64 = 4 << 20;
const CHUNK_BYTES: usize = 1 << 20;

fn demo_config(dir: &Path) -> anyhow::Result<String> {
    let d = dir.display();
    // Link ports the system hands out now, so the demo never collides.
    let port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (alpha_ports, beta_ports) = ([port()?, port()?], [port()?, port()?]);
    Ok(format!(
        r#"# The demo's resource: two nodes on this machine.
name = "demo"
protocol = "C"

[nodes.alpha]
disk = "{d}/alpha.img"
# Two mirror-disk-connect links: both carry traffic, either may fail.
links = ["127.0.0.1:{}", "127.0.0.1:{}"]
control = "{d}/alpha.ctl"
nbd = "unix:{d}/alpha.nbd"

[nodes.beta]
disk = "{d}/beta.img"
links = ["127.0.0.1:{}", "127.0.0.1:{}"]
control = "{d}/beta.ctl"
nbd = "unix:{d}/beta.nbd"
"#,
        alpha_ports[0], alpha_ports[1], beta_ports[0], beta_ports[1]
    ))
}

/// A node process that is killed if the demo fails half-way.
struct NodeProcess {
    name: &'static str,
    child: Child,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("blkmirror-demo-")
        .tempdir()?;
    let config_path = dir.path().join("demo.toml");
    std::fs::write(&config_path, demo_config(dir.path())?)?;
    let config = Config::load(&config_path)?;
    let target = |node: &str| Target {
        config: config.clone(),
        node: node.to_string(),
    };
    let (alpha, beta) = (target("alpha"), target("beta"));

    step(&format!(
        "Resource `demo` in {} (config: demo.toml)",
        dir.path().display()
    ));
    for t in [&alpha, &beta] {
        let disk = &t.config.node(&t.node)?.disk;
        std::fs::File::create(disk)?.set_len(DISK_BYTES)?;
        commands::create_md(
            t,
            false,
            blkmirror_metadata::layout::GRANULARITY_DEFAULT_BYTES,
            None,
        )?;
    }

    step("Starting both nodes, each as its own process (they come up Secondary and connect)");
    let mut alpha_proc = start(&config_path, "alpha", dir.path())?;
    let mut beta_proc = start(&config_path, "beta", dir.path())?;
    wait_up(&alpha, &mut alpha_proc).await?;
    wait_up(&beta, &mut beta_proc).await?;

    step("First promotion of a new volume: `blkmirror primary --force` on alpha; beta takes a full copy");
    commands::primary(&alpha, true).await?;
    let started = Instant::now();
    wait_replication(&beta, "Established").await?;
    println!(
        "    initial full copy done in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    print!(
        "{}",
        commands::render_status(&commands::fetch_status(&alpha).await?)
    );

    step("beta is Secondary, so its NBD export refuses clients (Not Ready)");
    match Client::connect_unix(&nbd_path(&beta)?, "demo").await {
        Err(ClientError::Refused { message, .. }) => println!("    refused: {message}"),
        Ok(_) => bail!("the secondary accepted an NBD client"),
        Err(e) => return Err(e.into()),
    }

    step(&format!(
        "Writing {} MiB through NBD on alpha (protocol C: on both disks before each ack)",
        WRITE_BYTES >> 20
    ));
    let mut client = Client::connect_unix(&nbd_path(&alpha)?, "demo").await?;
    let started = Instant::now();
    write_pattern(&mut client, 0, WRITE_BYTES).await?;
    client.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "    wrote and flushed in {secs:.2} s ({:.0} MiB/s)",
        (WRITE_BYTES >> 20) as f64 / secs
    );
    verify(&mut client, 0, WRITE_BYTES).await?;
    println!("    read back through NBD: every byte matches");
    compare_replicas(&alpha, &beta)?;
    println!("    beta's disk holds the same bytes as alpha's");
    if let Some(peer) = commands::fetch_status(&alpha).await?.peer {
        let sent: Vec<String> = peer
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{:.1} MiB on link {i}", l.sent_bytes as f64 / 1048576.0))
            .collect();
        println!("    alpha sent {}", sent.join(" and "));
    }

    step("beta goes away (`blkmirror down`); alpha keeps serving and counts what beta misses");
    commands::down(&beta).await?;
    beta_proc.child.wait()?;
    write_pattern(&mut client, DIFF_OFFSET, DIFF_BYTES).await?;
    client.flush().await?;
    let status = commands::fetch_status(&alpha).await?;
    println!(
        "    alpha wrote {} MiB more; out of sync: {} bytes",
        DIFF_BYTES >> 20,
        status.out_of_sync_bytes
    );

    step("beta comes back: a differential resync copies only the difference");
    let mut beta_proc = start(&config_path, "beta", dir.path())?;
    wait_up(&beta, &mut beta_proc).await?;
    let started = Instant::now();
    wait_replication(&alpha, "Established").await?;
    let resync = commands::fetch_status(&alpha)
        .await?
        .peer
        .map(|p| p.resync)
        .unwrap_or_default();
    println!(
        "    resynced {} bytes in {:.2} s (a full copy would be {} bytes)",
        resync.done_bytes,
        started.elapsed().as_secs_f64(),
        client.size()
    );
    client.disconnect().await?;
    compare_replicas(&alpha, &beta)?;
    println!("    the replicas are identical again");

    step("Failover: alpha goes down; beta is promoted (its data is UpToDate, no --force)");
    commands::down(&alpha).await?;
    alpha_proc.child.wait()?;
    commands::primary(&beta, false).await?;
    let mut client = Client::connect_unix(&nbd_path(&beta)?, "demo").await?;
    verify(&mut client, 0, WRITE_BYTES).await?;
    verify(&mut client, DIFF_OFFSET, DIFF_BYTES).await?;
    println!("    beta serves every byte alpha acknowledged");
    client.disconnect().await?;

    step("Stopping beta");
    commands::down(&beta).await?;
    beta_proc.child.wait()?;
    println!("\ndemo ok: two nodes mirrored every write, caught up by differential resync, and failed over without losing a byte.");
    Ok(())
}

async fn wait_replication(t: &Target, state: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(status) = commands::fetch_status(t).await {
            if let Some(peer) = &status.peer {
                if format!("{:?}", peer.replication) == state {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "node {} did not reach {state} within 60 s; see its log",
        t.node
    )
}

/// Compares the two data areas straight from the disk files.
fn compare_replicas(a: &Target, b: &Target) -> anyhow::Result<()> {
    let read = |t: &Target| -> anyhow::Result<Vec<u8>> {
        let md = blkmirror_metadata::open(
            &std::fs::File::open(&t.config.node(&t.node)?.disk)?,
            DISK_BYTES,
        )?;
        let mut data = std::fs::read(&t.config.node(&t.node)?.disk)?;
        data.drain(..md.superblock.layout.data_offset as usize);
        Ok(data)
    };
    if read(a)? != read(b)? {
        bail!("the replicas differ");
    }
    Ok(())
}

async fn write_pattern(client: &mut Client, start: u64, len: u64) -> anyhow::Result<()> {
    for offset in (start..start + len).step_by(CHUNK_BYTES) {
        client
            .write(offset, &pattern(offset, CHUNK_BYTES), false)
            .await?;
    }
    Ok(())
}

fn nbd_path(t: &Target) -> anyhow::Result<PathBuf> {
    match &t.config.node(&t.node)?.nbd {
        blkmirror_config::Endpoint::Unix(p) => Ok(p.clone()),
        other => bail!("demo expects a unix NBD socket, found {other}"),
    }
}

fn start(config: &Path, node: &'static str, dir: &Path) -> anyhow::Result<NodeProcess> {
    let log = std::fs::File::create(dir.join(format!("{node}.log")))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["-c"])
        .arg(config)
        .args(["-n", node, "up"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting a node process")?;
    println!("    node {node}: pid {} (log: {node}.log)", child.id());
    Ok(NodeProcess { name: node, child })
}

async fn wait_up(t: &Target, process: &mut NodeProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = process.child.try_wait()? {
            bail!(
                "node {} exited during start-up ({status}); see its log",
                process.name
            );
        }
        if commands::fetch_status(t).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("node {} did not come up within 30 s", process.name)
}

/// Bytes that differ per offset, so a misplaced block cannot pass.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8
        })
        .collect()
}

async fn verify(client: &mut Client, start: u64, len: u64) -> anyhow::Result<()> {
    for offset in (start..start + len).step_by(CHUNK_BYTES) {
        let data = client.read(offset, CHUNK_BYTES as u32).await?;
        if data != pattern(offset, CHUNK_BYTES) {
            bail!("data read back at {offset} differs from what was written");
        }
    }
    Ok(())
}
