//! `blkmirror`: the command-line tool and the node daemon (`up`).
#![forbid(unsafe_code)]

mod commands;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blkmirror",
    version,
    about = "Two-node block-level mirror with userspace block I/O"
)]
struct Cli {
    /// The resource's config file.
    #[arg(short = 'c', long = "config", env = "BLKMIRROR_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// This node's name in the config.
    #[arg(short = 'n', long = "node", env = "BLKMIRROR_NODE", global = true)]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Initialise the metadata area on this node's disk.
    CreateMd {
        /// Overwrite existing metadata or a file system signature.
        #[arg(long)]
        force: bool,
        /// Dirty-bitmap granularity in bytes (a power of two, 4096 to 1 MiB).
        #[arg(long, default_value_t = blkmirror_metadata::layout::GRANULARITY_DEFAULT_BYTES)]
        granularity: u32,
        /// Volume UUID to record (default: a new random one).
        #[arg(long)]
        volume_uuid: Option<uuid::Uuid>,
    },
    /// Print the metadata area of this node's disk.
    DumpMd {
        #[arg(long)]
        json: bool,
    },
    /// Run this node in the foreground until `down`, SIGTERM or SIGINT.
    Up,
    /// Stop a running node cleanly.
    Down,
    /// Promote this node to primary.
    Primary {
        /// Promote even if the data is not UpToDate, declaring it valid.
        #[arg(long)]
        force: bool,
    },
    /// Demote this node to secondary.
    Secondary,
    /// Connect to the peer (again, after `disconnect`).
    Connect {
        /// Resolve a split brain: this node's changes since the nodes
        /// parted are thrown away and it takes the peer's data instead.
        /// Only on a secondary; applies to the next connection only.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the link to the peer and stay StandAlone until `connect`.
    Disconnect,
    /// Mark this node's data to be overwritten by the peer (full copy).
    Invalidate,
    /// Reconnect and resync what is out of sync; with --full, all of the
    /// data, copied from the primary (or, with none, the node named first).
    Resync {
        #[arg(long)]
        full: bool,
    },
    /// Test builds only: replace the injected disk faults of a running
    /// node (rules as in BLKMIRROR_FAULTS; "none" clears them).
    #[command(hide = true)]
    Fault { spec: String },
    /// Compare both replicas by checksum while they serve; differing
    /// ranges are reported, marked out of sync and resynced.
    Verify,
    /// Wait until this node and its peer are in sync, showing progress.
    WaitSync {
        /// Give up (exit 1) after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Show this node's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run the main job on this machine with an embedded default config.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_logging();
    if let Command::Up = cli.command {
        // Before the runtime starts threads: unshare refuses a threaded process.
        if let Err(e) = commands::prepare_up(cli.config.clone(), cli.node.clone()) {
            eprintln!("blkmirror: error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`, `| grep -q`).
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkmirror: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo = cli.command {
        return demo::run().await;
    }
    let target = commands::Target::resolve(cli.config, cli.node)?;
    match cli.command {
        Command::CreateMd {
            force,
            granularity,
            volume_uuid,
        } => commands::create_md(&target, force, granularity, volume_uuid),
        Command::DumpMd { json } => commands::dump_md(&target, json),
        Command::Up => commands::up(&target).await,
        Command::Down => commands::down(&target).await,
        Command::Primary { force } => commands::primary(&target, force).await,
        Command::Secondary => commands::secondary(&target).await,
        Command::Connect { discard_my_data } => commands::connect(&target, discard_my_data).await,
        Command::Invalidate => commands::invalidate(&target).await,
        Command::Resync { full } => commands::resync(&target, full).await,
        Command::Disconnect => commands::disconnect(&target).await,
        Command::Verify => commands::verify(&target).await,
        Command::Fault { spec } => commands::fault(&target, spec).await,
        Command::WaitSync { timeout } => commands::wait_sync(&target, timeout).await,
        Command::Status { json } => commands::status(&target, json).await,
        Command::Demo => unreachable!("handled above"),
    }
}
