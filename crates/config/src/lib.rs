//! The resource configuration: one TOML file naming both nodes.
//!
//! ```toml
//! name = "r0"
//! protocol = "C"
//! [nodes.alpha]
//! disk = "/var/lib/blkmirror/alpha.img"
//! links = ["127.0.0.1:7801", "127.0.0.1:7811"]
//! control = "/run/blkmirror/r0-alpha.ctl"   # optional
//! nbd = "unix:/run/blkmirror/r0-alpha.nbd"  # optional; or "tcp:127.0.0.1:10809"
//! ublk = { id = 0 }                         # optional: /dev/ublkb0 while primary
//! [nodes.beta]
//! disk = "/var/lib/blkmirror/beta.img"
//! links = ["127.0.0.1:7802", "127.0.0.1:7812"]
//! ```
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where runtime sockets go when the config does not say.
pub const RUN_DIR_DEFAULT: &str = "/run/blkmirror";
pub const LINKS_MAX: usize = 2;
pub const NAME_MAX_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Config {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("Config {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("Config {path} has no node {node:?} (it names: {known})")]
    UnknownNode {
        path: PathBuf,
        node: String,
        known: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// Acknowledged once the local disk has it and it is queued for the peer.
    A,
    /// Acknowledged once the local disk has it and the peer has received it.
    B,
    /// Acknowledged once both disks have it.
    C,
}

/// What to do on split brain when neither node is primary (DRBD's
/// after-sb-0pri). Anything but `Disconnect` throws one side's changes
/// away automatically, so it is never the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSplitBrain {
    /// Refuse, touch nothing, and wait for the operator.
    #[default]
    Disconnect,
    /// If only one side wrote since they parted, the other's data goes.
    DiscardZeroChanges,
    /// The side that became primary after they parted loses its changes.
    DiscardYoungerPrimary,
    /// The side that changed fewer bytes loses its changes.
    DiscardLeastChanges,
}

impl AfterSplitBrain {
    pub const ALL: [AfterSplitBrain; 4] = [
        AfterSplitBrain::Disconnect,
        AfterSplitBrain::DiscardZeroChanges,
        AfterSplitBrain::DiscardYoungerPrimary,
        AfterSplitBrain::DiscardLeastChanges,
    ];

    /// Its name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            AfterSplitBrain::Disconnect => "disconnect",
            AfterSplitBrain::DiscardZeroChanges => "discard-zero-changes",
            AfterSplitBrain::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSplitBrain::DiscardLeastChanges => "discard-least-changes",
        }
    }
}

/// Where a node serves NBD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(Endpoint::Tcp)
                .map_err(|_| format!("{addr:?} is not an IP:PORT address"))
        } else {
            Err(format!("{s:?} must start with unix: or tcp:"))
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub disk: PathBuf,
    pub links: Vec<SocketAddr>,
    pub control: PathBuf,
    pub nbd: Endpoint,
    /// Also serve `/dev/ublkbN` while primary.
    pub ublk: Option<UblkConfig>,
}

/// The ublk block device a node serves while primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UblkConfig {
    /// N in `/dev/ublkbN`; fixed, so a restarted node finds its device.
    pub id: u32,
    /// Hardware queues, each served by a thread of its own.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
}

/// The driver's limits (`UBLK_MAX_UBLKS`, `UBLK_MAX_QUEUE_DEPTH`), and a
/// sane bound on queues.
pub const UBLK_ID_MAX: u32 = (1 << 20) - 1;
pub const UBLK_DEPTH_MAX: u16 = 4096;
pub const UBLK_QUEUES_MAX: u16 = 64;
pub const UBLK_QUEUES_DEFAULT: u16 = 1;
pub const UBLK_DEPTH_DEFAULT: u16 = 64;

#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub path: PathBuf,
    pub name: String,
    pub protocol: Protocol,
    pub nodes: BTreeMap<String, NodeConfig>,
    /// Shared secret both nodes prove they hold (HMAC-SHA256 challenge).
    pub secret: Option<String>,
    /// A peer silent for this long is declared dead.
    pub timeout: std::time::Duration,
    /// A hard cap on resync (and verify) speed; `None`: no cap, only the
    /// controller that yields to application writes.
    pub resync_rate_max_bytes_per_s: Option<u64>,
    pub after_sb_0pri: AfterSplitBrain,
    /// Hot 4 MiB extents the activity log keeps: more means fewer log
    /// writes, and more to resync after a crash.
    pub al_extents: usize,
}

/// Bounds and default of `al-extents` (DRBD's default is 1237 extents of
/// 4 MiB; ours caps what one log slot holds).
pub const AL_EXTENTS_MIN: usize = 16;
pub const AL_EXTENTS_MAX: usize = 1000;
pub const AL_EXTENTS_DEFAULT: usize = AL_EXTENTS_MAX;

/// Peer timeout when the config does not set one (CLUSTERPRO: 30 s, DRBD: 10.5 s).
pub const TIMEOUT_DEFAULT_S: f64 = 6.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    nodes: BTreeMap<String, RawNode>,
    secret: Option<String>,
    /// Seconds.
    timeout: Option<f64>,
    /// Bytes per second: a number, or a size such as "100M" or "1GiB".
    #[serde(rename = "resync-rate-max")]
    resync_rate_max: Option<RawSize>,
    #[serde(rename = "after-sb-0pri", default)]
    after_sb_0pri: AfterSplitBrain,
    #[serde(rename = "al-extents")]
    al_extents: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// Resync below this is surely a typo (and would take days per disk).
pub const RESYNC_RATE_MIN_BYTES_PER_S: u64 = 1 << 20;

fn ublk_config(raw: RawUblk) -> Result<UblkConfig, String> {
    let config = UblkConfig {
        id: raw.id,
        queues: raw.queues.unwrap_or(UBLK_QUEUES_DEFAULT),
        depth: raw.depth.unwrap_or(UBLK_DEPTH_DEFAULT),
    };
    if config.id > UBLK_ID_MAX {
        return Err(format!("id {} is above {UBLK_ID_MAX}", config.id));
    }
    if !(1..=UBLK_QUEUES_MAX).contains(&config.queues) {
        return Err(format!(
            "queues {} is outside 1 to {UBLK_QUEUES_MAX}",
            config.queues
        ));
    }
    if !(1..=UBLK_DEPTH_MAX).contains(&config.depth) {
        return Err(format!(
            "depth {} is outside 1 to {UBLK_DEPTH_MAX}",
            config.depth
        ));
    }
    Ok(config)
}

fn default_protocol() -> Protocol {
    Protocol::C
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    disk: PathBuf,
    links: Vec<String>,
    control: Option<PathBuf>,
    nbd: Option<String>,
    ublk: Option<RawUblk>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUblk {
    id: u32,
    queues: Option<u16>,
    depth: Option<u16>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |key: &str, message: String| Error::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        check_name(&raw.name).map_err(|m| invalid("name", m))?;
        if raw.nodes.len() != 2 {
            return Err(invalid(
                "nodes",
                format!(
                    "a resource names exactly two nodes, found {}",
                    raw.nodes.len()
                ),
            ));
        }
        let mut nodes = BTreeMap::new();
        for (node_name, node) in raw.nodes {
            let key = |field: &str| format!("nodes.{node_name}.{field}");
            check_name(&node_name).map_err(|m| invalid(&format!("nodes.{node_name}"), m))?;
            if node.disk.as_os_str().is_empty() {
                return Err(invalid(
                    &key("disk"),
                    "must name a block device or file".into(),
                ));
            }
            if node.links.is_empty() || node.links.len() > LINKS_MAX {
                return Err(invalid(
                    &key("links"),
                    format!(
                        "needs 1 or {LINKS_MAX} addresses, found {}",
                        node.links.len()
                    ),
                ));
            }
            let links = node
                .links
                .iter()
                .map(|l| {
                    l.parse::<SocketAddr>().map_err(|_| {
                        invalid(&key("links"), format!("{l:?} is not an IP:PORT address"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let run = Path::new(RUN_DIR_DEFAULT);
            let nbd = match node.nbd {
                Some(s) => s.parse().map_err(|m| invalid(&key("nbd"), m))?,
                None => Endpoint::Unix(run.join(format!("{}-{node_name}.nbd", raw.name))),
            };
            let control = node
                .control
                .unwrap_or_else(|| run.join(format!("{}-{node_name}.ctl", raw.name)));
            let ublk = node
                .ublk
                .map(|u| ublk_config(u).map_err(|m| invalid(&key("ublk"), m)))
                .transpose()?;
            nodes.insert(
                node_name.clone(),
                NodeConfig {
                    name: node_name,
                    disk: node.disk,
                    links,
                    control,
                    nbd,
                    ublk,
                },
            );
        }
        if raw.secret.as_deref() == Some("") {
            return Err(invalid(
                "secret",
                "must not be empty (leave it out to disable authentication)".into(),
            ));
        }
        let timeout_s = raw.timeout.unwrap_or(TIMEOUT_DEFAULT_S);
        if !(0.5..=600.0).contains(&timeout_s) {
            return Err(invalid(
                "timeout",
                format!("{timeout_s} s is outside 0.5 to 600 s"),
            ));
        }
        let resync_rate_max_bytes_per_s = match raw.resync_rate_max {
            None => None,
            Some(RawSize::Bytes(n)) => Some(n),
            Some(RawSize::Text(text)) => {
                let size = text.trim().trim_end_matches("/s");
                Some(parse_size::parse_size(size).map_err(|e| {
                    invalid(
                        "resync-rate-max",
                        format!("{text:?} is not a rate such as \"100M\" or \"1GiB\": {e}"),
                    )
                })?)
            }
        };
        if let Some(rate) = resync_rate_max_bytes_per_s {
            if rate < RESYNC_RATE_MIN_BYTES_PER_S {
                return Err(invalid(
                    "resync-rate-max",
                    format!("{rate} bytes/s is below the minimum of 1 MiB/s"),
                ));
            }
        }
        let al_extents = raw.al_extents.unwrap_or(AL_EXTENTS_DEFAULT);
        if !(AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&al_extents) {
            return Err(invalid(
                "al-extents",
                format!("{al_extents} is outside {AL_EXTENTS_MIN} to {AL_EXTENTS_MAX}"),
            ));
        }
        let link_counts: Vec<usize> = nodes.values().map(|n| n.links.len()).collect();
        if link_counts[0] != link_counts[1] {
            return Err(invalid(
                "nodes.*.links",
                "both nodes need the same number of links (link i pairs with the peer's link i)"
                    .into(),
            ));
        }
        Ok(Config {
            path: path.to_path_buf(),
            name: raw.name,
            protocol: raw.protocol,
            nodes,
            secret: raw.secret,
            timeout: std::time::Duration::from_secs_f64(timeout_s),
            resync_rate_max_bytes_per_s,
            after_sb_0pri: raw.after_sb_0pri,
            al_extents,
        })
    }

    pub fn node(&self, name: &str) -> Result<&NodeConfig, Error> {
        self.nodes.get(name).ok_or_else(|| Error::UnknownNode {
            path: self.path.clone(),
            node: name.to_string(),
            known: self.nodes.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// The other node of the pair.
    pub fn peer_of(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.values().find(|n| n.name != name)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX_BYTES {
        return Err(format!("must be 1 to {NAME_MAX_BYTES} bytes long"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{name:?} may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "r0"
[nodes.alpha]
disk = "/tmp/a.img"
links = ["127.0.0.1:7801", "127.0.0.1:7811"]
nbd = "tcp:127.0.0.1:10809"
[nodes.beta]
disk = "/tmp/b.img"
links = ["127.0.0.1:7802", "127.0.0.1:7812"]
control = "/tmp/b.ctl"
"#;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("/etc/blkmirror/r0.toml"))
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_config_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.protocol, Protocol::C);
        let a = c.node("alpha").unwrap();
        assert_eq!(a.nbd, Endpoint::Tcp("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(a.control, Path::new("/run/blkmirror/r0-alpha.ctl"));
        let b = c.node("beta").unwrap();
        assert_eq!(b.nbd, Endpoint::Unix("/run/blkmirror/r0-beta.nbd".into()));
        assert_eq!(b.control, Path::new("/tmp/b.ctl"));
        assert_eq!(c.peer_of("alpha").unwrap().name, "beta");
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = error_of(&GOOD.replace("tcp:127.0.0.1:10809", "http://x"));
        assert!(
            e.contains("/etc/blkmirror/r0.toml") && e.contains("nodes.alpha.nbd"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("127.0.0.1:7811", "nonsense"));
        assert!(
            e.contains("nodes.alpha.links") && e.contains("nonsense"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("name = \"r0\"", "name = \"r 0\""));
        assert!(e.contains("key `name`"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_protocols_are_refused() {
        let e = error_of(&GOOD.replace("name = \"r0\"", "name = \"r0\"\nprotocl = \"C\""));
        assert!(e.contains("protocl"), "{e}");
        let e = error_of(&GOOD.replace("name = \"r0\"", "name = \"r0\"\nprotocol = \"D\""));
        assert!(e.contains("protocol") && e.contains("`D`"), "{e}");
    }

    #[test]
    fn ublk_is_optional_with_defaults_and_bounds() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node("alpha").unwrap().ublk, None);
        let with = |table: &str| {
            parse(&GOOD.replace(
                "nbd = \"tcp:127.0.0.1:10809\"",
                &format!("nbd = \"tcp:127.0.0.1:10809\"\nublk = {table}"),
            ))
        };
        let c = with("{ id = 3 }").unwrap();
        assert_eq!(
            c.node("alpha").unwrap().ublk,
            Some(UblkConfig {
                id: 3,
                queues: UBLK_QUEUES_DEFAULT,
                depth: UBLK_DEPTH_DEFAULT
            })
        );
        let c = with("{ id = 0, queues = 2, depth = 128 }").unwrap();
        assert_eq!(c.node("alpha").unwrap().ublk.unwrap().depth, 128);
        let e = with("{ id = 0, depth = 5000 }").unwrap_err().to_string();
        assert!(
            e.contains("nodes.alpha.ublk") && e.contains("depth 5000"),
            "{e}"
        );
        let e = with("{ id = 2000000 }").unwrap_err().to_string();
        assert!(e.contains("nodes.alpha.ublk") && e.contains("id"), "{e}");
        let e = with("{ id = 0, queues = 0 }").unwrap_err().to_string();
        assert!(e.contains("queues 0"), "{e}");
        let e = with("{ queues = 1 }").unwrap_err().to_string();
        assert!(e.contains("id"), "{e}");
        let e = with("{ id = 0, dev = 1 }").unwrap_err().to_string();
        assert!(e.contains("dev"), "{e}");
    }

    #[test]
    fn al_extents_are_bounded() {
        assert_eq!(parse(GOOD).unwrap().al_extents, AL_EXTENTS_DEFAULT);
        let with = |n: usize| {
            parse(&GOOD.replace("name = \"r0\"", &format!("name = \"r0\"\nal-extents = {n}")))
        };
        assert_eq!(with(64).unwrap().al_extents, 64);
        let e = with(8).unwrap_err().to_string();
        assert!(e.contains("al-extents") && e.contains("16 to 1000"), "{e}");
    }

    #[test]
    fn split_brain_policy_defaults_to_disconnect() {
        assert_eq!(
            parse(GOOD).unwrap().after_sb_0pri,
            AfterSplitBrain::Disconnect
        );
        let with = |policy: &str| {
            parse(&GOOD.replace(
                "name = \"r0\"",
                &format!("name = \"r0\"\nafter-sb-0pri = \"{policy}\""),
            ))
        };
        assert_eq!(
            with("discard-least-changes").unwrap().after_sb_0pri,
            AfterSplitBrain::DiscardLeastChanges
        );
        let e = with("discard-everything").unwrap_err().to_string();
        assert!(e.contains("discard-zero-changes"), "{e}");
        for policy in AfterSplitBrain::ALL {
            assert_eq!(with(policy.name()).unwrap().after_sb_0pri, policy);
        }
    }

    #[test]
    fn link_counts_must_match_and_be_bounded() {
        let e = error_of(&GOOD.replace(", \"127.0.0.1:7812\"", ""));
        assert!(e.contains("same number of links"), "{e}");
        let e = error_of(&GOOD.replace(
            "\"127.0.0.1:7811\"",
            "\"127.0.0.1:7811\", \"127.0.0.1:7821\"",
        ));
        assert!(e.contains("1 or 2"), "{e}");
    }

    #[test]
    fn secret_and_timeout() {
        let c = parse(GOOD).unwrap();
        assert_eq!((c.secret.as_deref(), c.timeout.as_secs()), (None, 6));
        let c = parse(&GOOD.replace(
            "name = \"r0\"",
            "name = \"r0\"\nsecret = \"s3\"\ntimeout = 2.5",
        ))
        .unwrap();
        assert_eq!(
            (c.secret.as_deref(), c.timeout.as_millis()),
            (Some("s3"), 2500)
        );
        let e = error_of(&GOOD.replace("name = \"r0\"", "name = \"r0\"\ntimeout = 0"));
        assert!(e.contains("key `timeout`"), "{e}");
    }

    #[test]
    fn resync_rate_max_takes_numbers_and_sizes() {
        let rate = |value: &str| {
            parse(&GOOD.replace(
                "name = \"r0\"",
                &format!("name = \"r0\"\nresync-rate-max = {value}"),
            ))
            .map(|c| c.resync_rate_max_bytes_per_s)
        };
        assert_eq!(parse(GOOD).unwrap().resync_rate_max_bytes_per_s, None);
        assert_eq!(rate("\"100M\"").unwrap(), Some(100_000_000));
        assert_eq!(rate("\"1GiB/s\"").unwrap(), Some(1 << 30));
        assert_eq!(rate("50000000").unwrap(), Some(50_000_000));
        let e = rate("\"fast\"").unwrap_err().to_string();
        assert!(e.contains("resync-rate-max") && e.contains("fast"), "{e}");
        let e = rate("\"10K\"").unwrap_err().to_string();
        assert!(e.contains("minimum"), "{e}");
    }

    #[test]
    fn exactly_two_nodes() {
        let one = GOOD.split("[nodes.beta]").next().unwrap();
        assert!(error_of(one).contains("exactly two nodes"));
    }

    #[test]
    fn unknown_node_lists_the_known_ones() {
        let c = parse(GOOD).unwrap();
        let e = c.node("gamma").unwrap_err().to_string();
        assert!(e.contains("gamma") && e.contains("alpha, beta"), "{e}");
    }
}
