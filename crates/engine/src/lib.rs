//! A blkmirror node: the volume with its role and metadata, the data path
//! from frontends to the backing store, and the control socket the CLI uses.
#![forbid(unsafe_code)]

pub mod control;
pub mod frontend;
pub mod gate;
pub mod node;
pub mod peer;
pub mod tracking;
pub mod volume;

pub use volume::{DiskState, Role, Volume, VolumeStatus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] blkmirror_config::Error),
    #[error("Disk {disk}: {source}")]
    Disk {
        disk: String,
        #[source]
        source: blkmirror_metadata::Error,
    },
    #[error(transparent)]
    Io(#[from] blkmirror_io::Error),
    #[error("Disk {disk} carries the metadata of node {found:?}, not {expected:?}: check `disk` in the config")]
    WrongDisk {
        disk: String,
        found: String,
        expected: String,
    },
    #[error("This node is Secondary: only the primary serves I/O")]
    NotPrimary,
    #[error(
        "{resource} is Secondary on node {node} (Not Ready): only the primary serves I/O; \
         promote it with `blkmirror primary`"
    )]
    NotServing { resource: String, node: String },
    #[error(
        "Refusing to promote: this node's data is {disk_state:?}. Use `primary --force` only if \
         you know this node holds the data to keep (it becomes the new generation)"
    )]
    NotUpToDate { disk_state: volume::DiskState },
    #[error(
        "Refusing to promote: this node lost contact with its peer while the peer was primary, \
         so the peer may have written data this node lacks. Reconnect them to find out \
         (`blkmirror connect` on both), or, only if the peer is down for good and its data is \
         to be given up, `primary --force`"
    )]
    PeerMayHaveWritten,
    #[error(
        "This node's disk failed and is detached (Diskless): replace the disk, run `create-md` \
         on the new one and restart the node"
    )]
    DiskFailed,
    #[error("This node has no disk of its own and lost the peer that served its I/O")]
    PeerLost,
    #[error("The peer failed a read for this diskless node (errno {errno})")]
    PeerIo { errno: u32 },
    #[error(
        "Refusing to discard the data of a primary: its clients see it. Demote it first \
         (`blkmirror secondary`), then `connect --discard-my-data`"
    )]
    DiscardOnPrimary,
    #[error("Refusing to promote: the peer {0} is primary, and two primaries are never allowed while connected")]
    PeerIsPrimary(String),
    #[error("The connected peer is primary, and so is this node: two primaries are never allowed")]
    TwoPrimaries,
    #[error(
        "Refusing to promote: the connected peer is primary, becoming it, or asking the same \
         (two primaries are never allowed); try again once it has settled"
    )]
    PeerRefusedPromotion,
    #[error(
        "Refusing to promote: the connected peer did not say whether it may be done: {0}; try \
         again (once the peer is gone, the promotion needs no answer)"
    )]
    PromotionUnanswered(String),
    #[error(
        "The resync to this node was called off (`invalidate`, or a forced promotion) before \
         its end was recorded: the end is not recorded"
    )]
    ResyncCalledOff,
    #[error(
        "This node became primary while the handshake made it the sync target; a primary is \
         never overwritten by a resync: reconnecting, so the peers decide again"
    )]
    PrimaryAsSyncTarget,
    #[error("Refusing to invalidate a primary: its data is what clients see; demote it first")]
    InvalidatePrimary,
    #[error("Refusing to demote: {0} NBD client(s) still attached; disconnect them first")]
    ClientsAttached(usize),
    #[error("Range of {len} bytes at {offset} is outside the volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("Another node is already up on {0}")]
    AlreadyUp(String),
    #[error("Cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Node is not up (no control socket at {socket})")]
    NotUp {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Control socket: {0}")]
    Control(String),
    #[error(transparent)]
    Ublk(#[from] blkmirror_ublk::Error),
    #[error("Promoted, but {0}; demoted again, so this node stays Secondary")]
    ExportFailed(Box<Error>),
    #[error("Cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

impl Error {
    /// The Linux errno a block-device client sees for this error: the one
    /// mapping every frontend (NBD and ublk) uses.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.errno(),
            Error::NotPrimary => 1,         // EPERM
            Error::OutOfRange { .. } => 22, // EINVAL
            _ => 5,                         // EIO
        }
    }
}
