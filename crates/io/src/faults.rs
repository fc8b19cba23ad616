//! Fault injection for the failure tests, compiled only with the
//! `fault-injection` feature: production builds have none of it.
//!
//! Faults are given as a spec, from the `BLKMIRROR_FAULTS` environment
//! variable at start or (through the node's control socket) at run time.
//! Rules are separated by commas; offsets are bytes of the backing disk:
//!
//! - `persist=N`: the first N writes reach the disk, later ones are
//!   silently dropped (a power cut after write N, with the process left
//!   running until the test kills it);
//! - `fail-write=START-END`: writes touching `[START, END)` fail with EIO;
//! - `fail-read=START-END`: reads touching `[START, END)` fail with EIO;
//! - `fail-write-after=N`: every write after the Nth fails with EIO;
//! - `stall-write=START-END`: data writes touching `[START, END)` wait
//!   until the rules change (a hung disk); metadata writes are not held;
//! - `none`: clears every rule.
//!
//! Every write counts: data, bitmap pages, activity-log slots, superblocks.

use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use tokio::sync::watch;

/// What becomes of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Persist,
    /// Reported done, never written.
    Drop,
    Fail,
    /// Held until the rules change, then written.
    Stall,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Faults {
    persist: Option<u64>,
    fail_write_after: Option<u64>,
    fail_writes: Vec<Range<u64>>,
    fail_reads: Vec<Range<u64>>,
    stall_writes: Vec<Range<u64>>,
    /// Writes seen so far.
    writes: u64,
}

pub const ENV: &str = "BLKMIRROR_FAULTS";

static FAULTS: Mutex<Option<Faults>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut Faults) -> T) -> T {
    let mut faults = FAULTS.lock().unwrap();
    let faults = faults.get_or_insert_with(|| match std::env::var(ENV) {
        Ok(spec) => Faults::parse(&spec).unwrap_or_else(|e| panic!("{ENV}: {e}")),
        Err(_) => Faults::default(),
    });
    f(faults)
}

/// Replaces the rules (the write count goes on).
pub fn set(spec: &str) -> Result<(), String> {
    let new = Faults::parse(spec)?;
    with(|faults| {
        let writes = faults.writes;
        *faults = Faults { writes, ..new };
    });
    rules_changed().send_modify(|generation| *generation += 1);
    tracing::warn!(spec, "fault injection rules set");
    Ok(())
}

/// Decides the fate of a write of `len` bytes at `offset`, and counts it.
pub fn write_fate(offset: u64, len: u64) -> Fate {
    with(|faults| faults.write_fate(offset, len))
}

/// Counts rule changes, for stalled writes to wait on.
fn rules_changed() -> &'static watch::Sender<u64> {
    static CHANGED: OnceLock<watch::Sender<u64>> = OnceLock::new();
    CHANGED.get_or_init(|| watch::channel(0).0)
}

/// Waits until no rule stalls a write of `len` bytes at `offset`.
pub async fn stalled(offset: u64, len: u64) {
    loop {
        // Subscribed before the check, so no change falls in between.
        let mut changed = rules_changed().subscribe();
        if !with(|faults| overlaps(&faults.stall_writes, offset, len)) {
            return;
        }
        let _ = changed.changed().await;
    }
}

/// Whether a read of `len` bytes at `offset` fails.
pub fn read_fails(offset: u64, len: u64) -> bool {
    with(|faults| overlaps(&faults.fail_reads, offset, len))
}

/// Writes seen so far (what `persist=N` counts).
pub fn writes() -> u64 {
    with(|faults| faults.writes)
}

/// The error an injected failure reports.
pub fn injected_error() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

fn overlaps(ranges: &[Range<u64>], offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len.max(1));
    ranges.iter().any(|r| offset < r.end && r.start < end)
}

impl Faults {
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut faults = Faults::default();
        for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (key, value) = rule.split_once('=').unwrap_or((rule, ""));
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("rule {rule:?}: {v:?} is not a number"))
            };
            let range = |v: &str| -> Result<Range<u64>, String> {
                let (start, end) = v
                    .split_once('-')
                    .ok_or_else(|| format!("rule {rule:?}: expected START-END"))?;
                let range = number(start)?..number(end)?;
                if range.is_empty() {
                    return Err(format!("rule {rule:?}: empty range"));
                }
                Ok(range)
            };
            match key {
                "none" => faults = Faults::default(),
                "persist" => faults.persist = Some(number(value)?),
                "fail-write-after" => faults.fail_write_after = Some(number(value)?),
                "fail-write" => faults.fail_writes.push(range(value)?),
                "fail-read" => faults.fail_reads.push(range(value)?),
                "stall-write" => faults.stall_writes.push(range(value)?),
                _ => return Err(format!("unknown fault rule {rule:?}")),
            }
        }
        Ok(faults)
    }

    fn write_fate(&mut self, offset: u64, len: u64) -> Fate {
        self.writes += 1;
        let n = self.writes;
        if self.fail_write_after.is_some_and(|after| n > after)
            || overlaps(&self.fail_writes, offset, len)
        {
            Fate::Fail
        } else if self.persist.is_some_and(|persist| n > persist) {
            Fate::Drop
        } else if overlaps(&self.stall_writes, offset, len) {
            Fate::Stall
        } else {
            Fate::Persist
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_apply() {
        let mut f = Faults::parse("persist=2, fail-write=100-200").unwrap();
        assert_eq!(f.write_fate(0, 10), Fate::Persist);
        assert_eq!(f.write_fate(150, 1), Fate::Fail);
        assert_eq!(f.write_fate(0, 10), Fate::Drop);
        assert_eq!(
            f.write_fate(90, 10),
            Fate::Drop,
            "[90, 100) misses the range"
        );
        let mut f = Faults::parse("stall-write=100-200").unwrap();
        assert_eq!(f.write_fate(150, 1), Fate::Stall);
        assert_eq!(f.write_fate(200, 1), Fate::Persist);
        let mut f = Faults::parse("fail-write-after=1").unwrap();
        assert_eq!(f.write_fate(0, 1), Fate::Persist);
        assert_eq!(f.write_fate(0, 1), Fate::Fail);
        assert_eq!(Faults::parse("none").unwrap(), Faults::default());
        let first_block = [0..4096, 1 << 40..1 << 41];
        assert!(overlaps(&first_block, 4095, 1));
        assert!(!overlaps(&first_block, 4096, 1));
    }

    #[test]
    fn bad_specs_are_refused() {
        for spec in [
            "persist",
            "persist=x",
            "fail-read=5",
            "fail-read=9-3",
            "explode",
        ] {
            assert!(Faults::parse(spec).is_err(), "{spec}");
        }
    }
}
