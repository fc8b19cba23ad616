//! `blkmirror demo`: the main job on this machine, with nothing to configure.
//! Builds a resource of two nodes in a temporary directory, runs each node as
//! its own process, writes and reads back through NBD, and restarts the
//! primary to show the data survived.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkmirror_config::Config;
use blkmirror_nbd::{Client, ClientError};

use crate::commands::{self, Target};

const DISK_BYTES: u64 = 256 << 20;
const WRITE_BYTES: u64 = 32 << 20;
const CHUNK_BYTES: usize = 1 << 20;

fn demo_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"# The demo's resource: two nodes on this machine.
name = "demo"
protocol = "C"

[nodes.alpha]
disk = "{d}/alpha.img"
links = ["127.0.0.1:7801"]
control = "{d}/alpha.ctl"
nbd = "unix:{d}/alpha.nbd"

[nodes.beta]
disk = "{d}/beta.img"
links = ["127.0.0.1:7802"]
control = "{d}/beta.ctl"
nbd = "unix:{d}/beta.nbd"
"#
    )
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
    std::fs::write(&config_path, demo_config(dir.path()))?;
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

    step("Starting both nodes, each as its own process (they come up Secondary)");
    let mut alpha_proc = start(&config_path, "alpha", dir.path())?;
    let beta_proc = start(&config_path, "beta", dir.path())?;
    wait_up(&alpha, &mut alpha_proc).await?;
    let mut beta_proc = beta_proc;
    wait_up(&beta, &mut beta_proc).await?;

    step("First promotion of a new volume: `blkmirror primary --force` on alpha");
    commands::primary(&alpha, true).await?;
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
        "Writing {} MiB through NBD on alpha, then reading it back",
        WRITE_BYTES >> 20
    ));
    let mut client = Client::connect_unix(&nbd_path(&alpha)?, "demo").await?;
    println!("    export size {} bytes", client.size());
    let started = Instant::now();
    for chunk in 0..WRITE_BYTES / CHUNK_BYTES as u64 {
        let offset = chunk * CHUNK_BYTES as u64;
        client
            .write(offset, &pattern(offset, CHUNK_BYTES), false)
            .await?;
    }
    client.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "    wrote and flushed in {secs:.2} s ({:.0} MiB/s)",
        (WRITE_BYTES >> 20) as f64 / secs
    );
    verify(&mut client).await?;
    println!("    read back: every byte matches");
    client.disconnect().await?;

    step("Restarting alpha: `down`, `up`, `primary` (no --force: its data is UpToDate)");
    commands::down(&alpha).await?;
    alpha_proc.child.wait()?;
    let mut alpha_proc = start(&config_path, "alpha", dir.path())?;
    wait_up(&alpha, &mut alpha_proc).await?;
    commands::primary(&alpha, false).await?;
    let mut client = Client::connect_unix(&nbd_path(&alpha)?, "demo").await?;
    verify(&mut client).await?;
    println!("    after the restart every byte still matches");
    client.disconnect().await?;

    step("Stopping both nodes");
    commands::down(&alpha).await?;
    commands::down(&beta).await?;
    alpha_proc.child.wait()?;
    beta_proc.child.wait()?;
    println!("\ndemo ok: one node served its volume over NBD, the secondary refused I/O, and the data survived a restart.");
    println!("(Replication to the peer arrives with the replication milestone.)");
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

async fn verify(client: &mut Client) -> anyhow::Result<()> {
    for chunk in 0..WRITE_BYTES / CHUNK_BYTES as u64 {
        let offset = chunk * CHUNK_BYTES as u64;
        let data = client.read(offset, CHUNK_BYTES as u32).await?;
        if data != pattern(offset, CHUNK_BYTES) {
            bail!("data read back at {offset} differs from what was written");
        }
    }
    Ok(())
}
