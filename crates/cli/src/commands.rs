//! One function per CLI command; the CLI's edge, where errors become text.

/// `println!` that reports a closed stdout (`blkmirror status | head`) as an
/// error, which `main` takes for a normal end, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use blkmirror_config::Config;
use blkmirror_engine::control::{self, Request, Response};
use blkmirror_engine::volume::{flag_names, GenerationsView};
use blkmirror_engine::{DiskState, VolumeStatus};
use blkmirror_metadata::activity_log;
use blkmirror_metadata::bitmap::DirtyBitmap;
use blkmirror_metadata::{self as metadata, slots, CreateOptions};
use serde_json::json;

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLKMIRROR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a person at a terminal, not for journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The resource and node a command acts on.
pub struct Target {
    pub config: Config,
    pub node: String,
}

impl Target {
    pub fn resolve(config: Option<PathBuf>, node: Option<String>) -> anyhow::Result<Target> {
        let path =
            config.ok_or_else(|| anyhow!("no config: pass -c FILE or set BLKMIRROR_CONFIG"))?;
        let config = Config::load(&path)?;
        let node = node.ok_or_else(|| {
            anyhow!(
                "no node: pass -n NODE or set BLKMIRROR_NODE (config {} names: {})",
                path.display(),
                config.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        config.node(&node)?;
        Ok(Target { config, node })
    }

    fn node_config(&self) -> &blkmirror_config::NodeConfig {
        self.config.node(&self.node).expect("checked in resolve")
    }

    async fn call(&self, request: Request) -> anyhow::Result<Response> {
        let response = control::call(&self.node_config().control, &request).await?;
        match response {
            Response::Error { message } => bail!("{message}"),
            other => Ok(other),
        }
    }
}

fn open_disk(target: &Target, write: bool) -> anyhow::Result<(std::fs::File, u64)> {
    let disk = &target.node_config().disk;
    let mut file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(disk)
        .with_context(|| {
            format!(
                "cannot open disk {} of node {} (create it first, e.g. `truncate -s 1G {}`, \
                 or point `disk` at a block device)",
                disk.display(),
                target.node,
                disk.display()
            )
        })?;
    let size = file
        .seek(SeekFrom::End(0))
        .with_context(|| format!("cannot size disk {}", disk.display()))?;
    Ok((file, size))
}

pub fn create_md(
    target: &Target,
    force: bool,
    granularity: u32,
    volume_uuid: Option<uuid::Uuid>,
) -> anyhow::Result<()> {
    let (file, disk_size) = open_disk(target, true)?;
    blkmirror_io::file::lock_exclusive(&file, &target.node_config().disk)?;
    let disk = target.node_config().disk.display().to_string();
    let sb = metadata::create(
        &file,
        &CreateOptions {
            node_name: &target.node,
            disk_size,
            granularity,
            volume_uuid: volume_uuid.unwrap_or_else(uuid::Uuid::new_v4),
            force,
        },
    )
    .with_context(|| format!("create-md on disk {disk}"))?;
    out!(
        "created metadata on {disk}: {} bytes of metadata, {} bytes of data, volume {}",
        sb.layout.data_offset,
        sb.layout.data_size,
        sb.volume_uuid
    );
    Ok(())
}

pub fn dump_md(target: &Target, json: bool) -> anyhow::Result<()> {
    let (file, disk_size) = open_disk(target, false)?;
    let disk = target.node_config().disk.display().to_string();
    let slot_states: Vec<String> = (0..2)
        .map(|i| match slots::read_slot(&file, i) {
            Ok(slots::SlotState::Empty) => "empty".to_string(),
            Ok(slots::SlotState::Valid(sb)) => format!("valid, sequence {}", sb.sequence),
            Ok(slots::SlotState::Corrupt(e)) => format!("corrupt: {e}"),
            Err(e) => format!("unreadable: {e}"),
        })
        .collect();
    let loaded =
        metadata::open(&file, disk_size).with_context(|| format!("dump-md on disk {disk}"))?;
    let sb = loaded.superblock;
    let generations = GenerationsView::from(&sb.generations);
    let (bitmap, damaged_pages) = DirtyBitmap::load(&file, &sb.layout)?;
    let log = activity_log::recover(&file, &sb.layout)?;
    let doc = json!({
        "disk": disk,
        "disk_size": disk_size,
        "format_version": metadata::superblock::FORMAT_VERSION,
        "sequence": sb.sequence,
        "node": sb.node_name,
        "volume_uuid": sb.volume_uuid,
        "data_offset": sb.layout.data_offset,
        "data_size": sb.layout.data_size,
        "bitmap_granularity": sb.layout.granularity,
        "bitmap_offset": sb.layout.bitmap_offset,
        "bitmap_size": sb.layout.bitmap_size,
        "activity_log_offset": sb.layout.al_offset,
        "activity_log_size": sb.layout.al_size,
        "flags": flag_names(sb.flags),
        "disk_state": DiskState::from_flags(sb.flags),
        "generations": generations,
        "created_unix_s": sb.created_unix_s,
        "out_of_sync_bytes": bitmap.dirty_bytes(),
        "bitmap_damaged_pages": damaged_pages.len(),
        "activity_log": {
            "sequence": log.sequence,
            "extents": log.extents.len(),
            "damaged_slots": log.damaged_slots,
        },
        "slots": slot_states,
    });
    if json {
        out!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let obj = doc.as_object().expect("built as an object");
    for (key, value) in obj {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out!("{key:<20} {text}");
    }
    Ok(())
}

/// Process-wide setup `up` needs before any thread exists: a node with a
/// ublk device checks the driver and leaves the shared mount namespace
/// (see `blkmirror_ublk::enter_private_mount_namespace`).
pub fn prepare_up(config: Option<PathBuf>, node: Option<String>) -> anyhow::Result<()> {
    let target = Target::resolve(config, node)?;
    if target.node_config().ublk.is_some() {
        blkmirror_ublk::check_driver()?;
        blkmirror_ublk::enter_private_mount_namespace()?;
    }
    Ok(())
}

pub async fn up(target: &Target) -> anyhow::Result<()> {
    blkmirror_engine::node::run(&target.config, &target.node).await?;
    Ok(())
}

pub async fn down(target: &Target) -> anyhow::Result<()> {
    target.call(Request::Down).await?;
    // `down` returns once the node has released its control socket.
    let socket = &target.node_config().control;
    for _ in 0..600 {
        if !socket.exists() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!("node {} did not go down within 30 s", target.node)
}

pub async fn primary(target: &Target, force: bool) -> anyhow::Result<()> {
    target.call(Request::Primary { force }).await.map(drop)
}

pub async fn secondary(target: &Target) -> anyhow::Result<()> {
    target.call(Request::Secondary).await.map(drop)
}

pub async fn fault(target: &Target, spec: String) -> anyhow::Result<()> {
    target.call(Request::Fault { spec }).await.map(drop)
}

pub async fn connect(target: &Target, discard_my_data: bool) -> anyhow::Result<()> {
    target
        .call(Request::Connect { discard_my_data })
        .await
        .map(drop)
}

pub async fn invalidate(target: &Target) -> anyhow::Result<()> {
    target.call(Request::Invalidate).await.map(drop)
}

pub async fn resync(target: &Target, full: bool) -> anyhow::Result<()> {
    target.call(Request::Resync { full }).await.map(drop)
}

pub async fn disconnect(target: &Target) -> anyhow::Result<()> {
    target.call(Request::Disconnect).await.map(drop)
}

/// Starts a verify and waits for its result.
pub async fn verify(target: &Target) -> anyhow::Result<()> {
    target.call(Request::Verify).await?;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let status = fetch_status(target).await?;
        let peer = status
            .peer
            .ok_or_else(|| anyhow!("the node reports no peer"))?;
        let v = &peer.verify;
        if v.running {
            continue;
        }
        if let Some(error) = &v.error {
            bail!("verify stopped after {} bytes: {error}", v.done_bytes);
        }
        if !v.finished {
            bail!("verify stopped after {} bytes", v.done_bytes);
        }
        if v.differing_bytes == 0 {
            out!(
                "verify: {} bytes compared with {}; the replicas are identical",
                v.done_bytes,
                peer.peer_node
            );
        } else {
            out!(
                "verify: {} bytes compared with {}; {} bytes differ, marked out of sync and being resynced",
                v.done_bytes, peer.peer_node, v.differing_bytes
            );
        }
        return Ok(());
    }
}

/// Polls until replication is Established with nothing out of sync and
/// both disks UpToDate. On a terminal it draws a progress bar with rate and
/// ETA; otherwise it prints a line every few seconds.
pub async fn wait_sync(target: &Target, timeout_s: Option<u64>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let started = std::time::Instant::now();
    let deadline = timeout_s.map(|s| started + std::time::Duration::from_secs(s));
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let mut last_line = started;
    loop {
        let status = fetch_status(target).await?;
        let peer = status
            .peer
            .clone()
            .ok_or_else(|| anyhow!("the node reports no peer"))?;
        let replication = format!("{:?}", peer.replication);
        let in_sync = replication == "Established"
            && status.out_of_sync_bytes == 0
            && status.disk_state == DiskState::UpToDate
            // (The target reports UpToDate just after the source is done.)
            && peer.peer_disk_state.as_deref() == Some("UpToDate");
        if in_sync {
            if let Some(bar) = &bar {
                bar.finish_with_message("in sync");
            }
            out!(
                "{} on {}: in sync with {}",
                status.resource,
                status.node,
                peer.peer_node
            );
            return Ok(());
        }
        if peer.connection == blkmirror_engine::peer::ConnectionState::StandAlone {
            // Nothing changes until an operator acts.
            bail!(
                "cannot sync: {} is StandAlone, not connecting to {} (`blkmirror connect` \
                 connects it again){}",
                status.node,
                peer.peer_node,
                peer.last_error
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        if peer.connection == blkmirror_engine::peer::ConnectionState::Refused {
            bail!(
                "cannot sync: {}",
                peer.last_error
                    .as_deref()
                    .unwrap_or("the connection was refused")
            );
        }
        let r = &peer.resync;
        match &bar {
            Some(bar) => {
                bar.set_length(r.total_bytes);
                // (Ranges written again during the resync count twice.)
                bar.set_position(r.done_bytes.min(r.total_bytes));
                bar.set_message(replication.clone());
            }
            None if last_line.elapsed() >= std::time::Duration::from_secs(5) => {
                out!(
                    "{replication}: {} of {} bytes, {} bytes/s, ETA {} s, out of sync {} bytes",
                    r.done_bytes,
                    r.total_bytes,
                    r.bytes_per_s,
                    r.eta_s,
                    status.out_of_sync_bytes
                );
                last_line = std::time::Instant::now();
            }
            None => {}
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            bail!(
                "not in sync after {} s ({replication}, {} bytes out of sync)",
                timeout_s.unwrap_or(0),
                status.out_of_sync_bytes
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

pub async fn fetch_status(target: &Target) -> anyhow::Result<VolumeStatus> {
    match target.call(Request::Status).await? {
        Response::Status(s) => Ok(*s),
        other => bail!("unexpected answer to status: {other:?}"),
    }
}

pub async fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let s = fetch_status(target).await?;
    if json {
        out!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render_status(&s));
    }
    Ok(())
}

pub fn render_status(s: &VolumeStatus) -> String {
    let mut text = format!(
        "{} on {}: role {:?}, disk {:?}\n  data {} bytes on {} ({}{})\n  volume {}, generation {} (bitmap {})\n  out of sync: {} bytes\n  NBD clients attached: {}\n",
        s.resource,
        s.node,
        s.role,
        s.disk_state,
        s.data_size,
        s.disk,
        s.io_engine,
        if s.direct_io { ", O_DIRECT" } else { "" },
        s.volume_uuid,
        s.generations.current,
        s.generations.bitmap,
        s.out_of_sync_bytes,
        s.nbd_clients,
    );
    if let Some(device) = &s.ublk_device {
        text += &format!("  ublk device: {device}\n");
    }
    if let Some(peer) = &s.peer {
        text += &format!(
            "  peer {}: {:?}, {:?}, role {}, disk {}\n",
            peer.peer_node,
            peer.connection,
            peer.replication,
            peer.peer_role
                .map_or("unknown".into(), |r| format!("{r:?}")),
            peer.peer_disk_state.as_deref().unwrap_or("unknown"),
        );
        for (index, link) in peer.links.iter().enumerate() {
            text += &format!("  link {index} to {}: {:?}\n", link.address, link.state);
        }
        let r = &peer.resync;
        if r.total_bytes > 0 && r.done_bytes < r.total_bytes {
            text += &format!(
                "  resync: {} of {} bytes, {} bytes/s, ETA {} s\n",
                r.done_bytes, r.total_bytes, r.bytes_per_s, r.eta_s
            );
        }
        if let Some(error) = &peer.last_error {
            text += &format!("  last error: {error}\n");
        }
    }
    text
}
