//! The workload checker of the failure tests: it writes 4 KiB blocks
//! stamped with (block, version) through NBD, records every write the
//! client saw acknowledged, and checks a data area afterwards: each block
//! must hold its last acknowledged version or a newer one. A write that
//! failed or was cut off may or may not have landed; an acknowledged one
//! must never be lost.

use std::path::Path;
use std::time::{Duration, Instant};

use blkmirror_nbd::Client;

pub const BLOCK: usize = 4096;

pub struct Stamped {
    /// The last acknowledged version of each block (0: never written).
    acked: Vec<u64>,
    /// The newest version ever sent for each block, acknowledged or not.
    sent: Vec<u64>,
    next_version: u64,
}

/// How a run of the workload ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// All the writes asked for were acknowledged.
    Done,
    /// A write failed or the connection broke (the node went away).
    Broke,
    /// The time limit passed before all the writes were made.
    OutOfTime,
}

impl Stamped {
    pub fn new(blocks: u64) -> Stamped {
        Stamped {
            acked: vec![0; blocks as usize],
            sent: vec![0; blocks as usize],
            next_version: 1,
        }
    }

    fn block_data(block: u64, version: u64) -> Vec<u8> {
        let mut data = vec![0u8; BLOCK];
        for (i, word) in data.chunks_exact_mut(16).enumerate() {
            word[..8].copy_from_slice(&block.to_le_bytes());
            word[8..].copy_from_slice(&(version ^ i as u64).to_le_bytes());
        }
        data
    }

    /// Writes up to `count` stamped blocks at pseudo-random places, or
    /// until `limit` has passed, stopping at the first failure.
    pub async fn run(&mut self, socket: &Path, export: &str, count: u64, limit: Duration) -> Ended {
        let Ok(mut client) = Client::connect_unix(socket, export).await else {
            return Ended::Broke;
        };
        let blocks = self.acked.len() as u64;
        let deadline = Instant::now() + limit;
        for _ in 0..count {
            if Instant::now() > deadline {
                return Ended::OutOfTime;
            }
            let version = self.next_version;
            self.next_version += 1;
            let block = version.wrapping_mul(2_654_435_761) % blocks;
            self.sent[block as usize] = version;
            let data = Self::block_data(block, version);
            // A write that never completes ends the run too, at the limit.
            let write = client.write(block * BLOCK as u64, &data, false);
            match tokio::time::timeout_at(deadline.into(), write).await {
                Ok(Ok(())) => self.acked[block as usize] = version,
                Ok(Err(_)) => return Ended::Broke,
                Err(_) => return Ended::OutOfTime,
            }
        }
        let _ = client.disconnect().await;
        Ended::Done
    }

    /// Reads the written blocks back through a node's NBD export and
    /// checks them as `verify` does.
    pub async fn verify_export(&self, what: &str, socket: &Path, export: &str) -> usize {
        let mut client = Client::connect_unix(socket, export).await.unwrap();
        let bytes = (self.acked.len() * BLOCK) as u64;
        let mut data = Vec::with_capacity(bytes as usize);
        while (data.len() as u64) < bytes {
            let len = (bytes - data.len() as u64).min(1 << 20) as u32;
            let piece = client.read(data.len() as u64, len).await.unwrap();
            data.extend_from_slice(&piece);
        }
        let _ = client.disconnect().await;
        self.verify(what, &data)
    }

    /// Acknowledged writes so far.
    pub fn acknowledged(&self) -> usize {
        self.acked.iter().filter(|&&v| v > 0).count()
    }

    /// Checks a data area; returns how many written blocks it checked.
    /// Panics, naming the block, if an acknowledged write is missing or a
    /// block holds anything but one of its own stamped versions.
    pub fn verify(&self, what: &str, data: &[u8]) -> usize {
        let mut checked = 0;
        for (block, (&acked, &sent)) in self.acked.iter().zip(&self.sent).enumerate() {
            if sent == 0 {
                continue;
            }
            let at = block * BLOCK;
            let found = &data[at..at + BLOCK];
            let version = u64::from_le_bytes(found[8..16].try_into().unwrap());
            let whole = found == Self::block_data(block as u64, version).as_slice();
            assert!(
                whole || (acked == 0 && found.iter().all(|&b| b == 0)),
                "{what}: block {block} holds neither a stamped version of itself nor zeroes"
            );
            assert!(
                version >= acked,
                "{what}: block {block} lost acknowledged version {acked} (holds {version})"
            );
            assert!(
                version <= sent,
                "{what}: block {block} holds version {version}, never written (newest sent {sent})"
            );
            checked += 1;
        }
        checked
    }
}
