//! Ordering of overlapping writes. Two writes to overlapping ranges must
//! reach both disks in the same order, so the later waits until the earlier
//! is done; writes to disjoint ranges run in parallel.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    /// Closed when the entry is released; waiters see it at once.
    done: Arc<Semaphore>,
}

#[derive(Default)]
pub struct RangeGate {
    entries: Mutex<(u64, Vec<Entry>)>,
}

/// Holds a range until dropped.
pub struct RangeGuard {
    gate: Arc<RangeGate>,
    id: u64,
}

/// A place in line for a range: taken at once, waited on later, so the order
/// of arrival is fixed even when the waiting happens in another task.
pub struct Ticket {
    guard: RangeGuard,
    earlier: Vec<Arc<Semaphore>>,
}

impl Ticket {
    /// Waits until every earlier overlapping holder has finished.
    pub async fn wait(self) -> RangeGuard {
        for done in self.earlier {
            // Err(Closed) is the signal: that holder has finished.
            let _ = done.acquire().await;
        }
        self.guard
    }
}

impl RangeGate {
    /// Waits until no earlier holder overlaps `[offset, offset + len)`, then
    /// holds it. Holders are ordered by arrival: one that arrives later never
    /// overtakes an earlier overlapping one.
    pub async fn enter(self: &Arc<Self>, offset: u64, len: u64) -> RangeGuard {
        self.register(offset, len).wait().await
    }

    /// Takes a place in line for `[offset, offset + len)` without waiting.
    pub fn register(self: &Arc<Self>, offset: u64, len: u64) -> Ticket {
        let (start, end) = (offset, offset.saturating_add(len.max(1)));
        let (id, earlier) = {
            let mut guard = self.entries.lock().unwrap();
            let (next_id, entries) = &mut *guard;
            let id = *next_id;
            *next_id += 1;
            let earlier: Vec<Arc<Semaphore>> = entries
                .iter()
                .filter(|e| e.start < end && start < e.end)
                .map(|e| e.done.clone())
                .collect();
            entries.push(Entry {
                id,
                start,
                end,
                done: Arc::new(Semaphore::new(0)),
            });
            (id, earlier)
        };
        Ticket {
            guard: RangeGuard {
                gate: self.clone(),
                id,
            },
            earlier,
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut guard = self.gate.entries.lock().unwrap();
        let entries = &mut guard.1;
        if let Some(pos) = entries.iter().position(|e| e.id == self.id) {
            entries.swap_remove(pos).done.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_holders_run_in_arrival_order() {
        let gate = Arc::new(RangeGate::default());
        let first = gate.enter(0, 4096).await;
        let disjoint =
            tokio::time::timeout(Duration::from_millis(50), gate.enter(8192, 4096)).await;
        assert!(disjoint.is_ok(), "disjoint ranges do not wait");
        drop(disjoint);
        // The second and third overlap the first and each other. The third
        // starts waiting before the second does, and still goes after it.
        let second = gate.register(100, 10);
        let third = gate.register(0, 200);
        let order = Arc::new(Mutex::new(Vec::new()));
        let hold = |ticket: Ticket, name: &'static str| {
            let order = order.clone();
            tokio::spawn(async move {
                let _held = ticket.wait().await;
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(10)).await;
            })
        };
        let third = hold(third, "third");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = hold(second, "second");
        tokio::time::sleep(Duration::from_millis(20)).await;
        order.lock().unwrap().push("first");
        drop(first);
        second.await.unwrap();
        third.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["first", "second", "third"]);
    }
}
