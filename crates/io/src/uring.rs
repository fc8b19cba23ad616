//! The io_uring store, driven from inside the tokio runtime: a caller
//! pushes its operation, and one reaper task both submits and hands results
//! back. The reaper runs after the tasks woken with the caller, so the
//! requests that arrived together go to the kernel in one system call (on a
//! virtual machine, one device doorbell, which is a costly exit to the
//! host). It wakes on the ring's registered eventfd for completions. No
//! thread sits between a request and the kernel.
//!
//! Every buffer in flight lives in the slab entry keyed by the SQE's
//! `user_data` until its completion arrives, so the kernel never writes to
//! memory the caller could have freed, even if the caller stops waiting.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use io_uring::{opcode, squeue, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use crate::aligned::AlignedBuf;
use crate::file::BackingFile;
use crate::Error;

/// Ring size, and the number of operations in flight at once; more wait in
/// a backlog until a slot frees up.
pub const RING_ENTRIES: u32 = 256;
/// Requests this large are submitted on the spot: next to their transfer,
/// the system call costs nothing, and waiting for a batch only delays them.
const SUBMIT_AT_ONCE_BYTES: usize = 64 << 10;

enum Kind {
    Read,
    Write { fua: bool },
    Flush,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write { .. } => "write",
            Kind::Flush => "flush",
        }
    }
}

struct Request {
    kind: Kind,
    offset: u64,
    buf: AlignedBuf,
    reply: oneshot::Sender<Result<AlignedBuf, Error>>,
}

/// A request in flight: `done` counts bytes already transferred, so a short
/// read or write is continued rather than reported.
struct InFlight {
    request: Request,
    done: usize,
}

struct Ring {
    ring: IoUring,
    file: Arc<BackingFile>,
    slab: Vec<Option<InFlight>>,
    free: Vec<usize>,
    backlog: VecDeque<Request>,
}

struct Shared {
    ring: Mutex<Ring>,
    /// Signalled by the kernel whenever completions are posted.
    completions: AsyncFd<EventFd>,
    /// Entries were pushed and wait for the reaper to submit them.
    submit_wanted: tokio::sync::Notify,
}

pub struct UringStore {
    file: Arc<BackingFile>,
    shared: Arc<Shared>,
    reaper: tokio::task::JoinHandle<()>,
}

impl UringStore {
    /// Sets up the ring. Must be called from within a tokio runtime.
    pub fn new(file: Arc<BackingFile>) -> Result<UringStore, Error> {
        let setup = |e: std::io::Error| Error::UringSetup(e);
        let ring = IoUring::new(RING_ENTRIES).map_err(setup)?;
        let eventfd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| setup(e.into()))?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(setup)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(setup(std::io::Error::other(
                "no tokio runtime to drive the ring",
            )));
        }
        // SAFETY: the EventFd owns its descriptor, which stays open and the
        // same for as long as the AsyncFd owns the EventFd.
        let completions = unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) }
            .map_err(|e| setup(e.into()))?;
        let slots = RING_ENTRIES as usize;
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                file: file.clone(),
                slab: (0..slots).map(|_| None).collect(),
                free: (0..slots).rev().collect(),
                backlog: VecDeque::new(),
            }),
            completions,
            submit_wanted: tokio::sync::Notify::new(),
        });
        let reaper = tokio::spawn(reap(shared.clone()));
        Ok(UringStore {
            file,
            shared,
            reaper,
        })
    }

    pub fn file(&self) -> &Arc<BackingFile> {
        &self.file
    }

    async fn submit(&self, kind: Kind, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, Error> {
        let (reply, rx) = oneshot::channel();
        let request = Request {
            kind,
            offset,
            buf,
            reply,
        };
        let large = request.buf.len() >= SUBMIT_AT_ONCE_BYTES;
        {
            let mut ring = self.shared.ring.lock().unwrap();
            ring.start_or_queue(request);
            if large {
                ring.submit();
            }
        }
        if !large {
            // The reaper submits once every task woken with this one has
            // pushed its entry: one system call (and one device doorbell)
            // for the batch.
            self.shared.submit_wanted.notify_one();
        }
        rx.await.map_err(|_| Error::StoreClosed)?
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        self.submit(Kind::Read, offset, AlignedBuf::for_overwrite(len))
            .await
    }

    pub async fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> Result<AlignedBuf, Error> {
        self.submit(Kind::Write { fua }, offset, buf).await
    }

    pub async fn flush(&self) -> Result<(), Error> {
        self.submit(Kind::Flush, 0, AlignedBuf::zeroed(0))
            .await
            .map(drop)
    }
}

impl Drop for UringStore {
    fn drop(&mut self) {
        self.reaper.abort();
        // The kernel may still own buffers of operations in flight: wait for
        // each to complete before the slab (and the ring) can go.
        let mut ring = self.shared.ring.lock().unwrap();
        ring.backlog.clear();
        while ring.in_flight() > 0 {
            match ring.ring.submit_and_wait(1) {
                Ok(_) => ring.reap(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring failed while draining; leaking in-flight buffers");
                    ring.leak_in_flight();
                    break;
                }
            }
        }
    }
}

/// Waits for completion signals and hands results back, for as long as the
/// store lives.
async fn reap(shared: Arc<Shared>) {
    loop {
        let readable = tokio::select! {
            biased;
            readable = shared.completions.readable() => Some(readable),
            () = shared.submit_wanted.notified() => None,
        };
        let mut ring = match readable {
            None => shared.ring.lock().unwrap(),
            Some(Ok(mut guard)) => {
                // Reset the counter before looking at the queue, so
                // completions posted from here on signal again.
                let _ = guard.get_inner().read();
                guard.clear_ready();
                let mut ring = shared.ring.lock().unwrap();
                ring.reap();
                ring
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "io_uring completion eventfd failed");
                return;
            }
        };
        // One system call for all that waits: entries callers pushed, and
        // what reaping pushed (continuations, the backlog).
        if !ring.ring.submission().is_empty() {
            ring.submit();
        }
    }
}

impl Ring {
    fn in_flight(&self) -> usize {
        self.slab.len() - self.free.len()
    }

    fn start_or_queue(&mut self, request: Request) {
        match self.free.pop() {
            Some(slot) => {
                self.slab[slot] = Some(InFlight { request, done: 0 });
                self.issue(slot);
            }
            None => self.backlog.push_back(request),
        }
    }

    /// Submits what has been pushed. A failure here is retried at the next
    /// submission: the entries stay in the queue.
    fn submit(&mut self) {
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring submit failed; retrying on the next request");
                    return;
                }
            }
        }
    }

    /// Pushes an entry. Every entry in the queue holds a slab slot, and the
    /// slab has no more slots than the queue has entries, so there is room
    /// (a full queue is submitted on the spot all the same).
    ///
    /// # Safety
    /// The buffers the entry points at must stay valid until its completion.
    unsafe fn push(&mut self, sqe: &squeue::Entry) {
        // SAFETY: the caller guarantees the entry's buffers outlive it.
        while unsafe { self.ring.submission().push(sqe) }.is_err() {
            self.submit();
        }
    }

    /// Pushes (the rest of) the operation held in `slot`.
    fn issue(&mut self, slot: usize) {
        let entry = self.slab[slot].as_mut().expect("issued slot is occupied");
        let done = entry.done;
        let offset = entry.request.offset + done as u64;
        let remaining = entry.request.buf.len() - done;
        // SAFETY: `done <= len`, so the pointer stays inside the buffer.
        let ptr = unsafe { entry.request.buf.as_mut_ptr().add(done) };
        let fd = types::Fd(
            self.file
                .fd_for(offset, remaining, ptr as usize)
                .as_raw_fd(),
        );
        let sqe = match entry.request.kind {
            Kind::Read => opcode::Read::new(fd, ptr, remaining as u32)
                .offset(offset)
                .build(),
            Kind::Write { fua } => opcode::Write::new(fd, ptr, remaining as u32)
                .offset(offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        let sqe = sqe.user_data(slot as u64);
        // SAFETY: the buffer belongs to the request in slab[slot], which is
        // only taken out in `complete`, after the kernel reports completion.
        unsafe { self.push(&sqe) };
    }

    /// Handles every completion posted so far, then starts queued requests.
    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, result) in completions {
            self.complete(user_data as usize, result);
        }
        while !self.free.is_empty() {
            let Some(request) = self.backlog.pop_front() else {
                break;
            };
            self.start_or_queue(request);
        }
    }

    fn complete(&mut self, slot: usize, result: i32) {
        let entry = self.slab[slot]
            .as_mut()
            .expect("completion for an occupied slot");
        let offset = entry.request.offset + entry.done as u64;
        let io_error = |source: std::io::Error| Error::Io {
            op: entry.request.kind.name(),
            offset,
            source,
        };
        let outcome = if result < 0 {
            if -result == libc::EAGAIN || -result == libc::EINTR {
                return self.issue(slot);
            }
            Err(io_error(std::io::Error::from_raw_os_error(-result)))
        } else if matches!(entry.request.kind, Kind::Flush) {
            Ok(())
        } else if result == 0 && entry.request.buf.len() > entry.done {
            Err(io_error(std::io::ErrorKind::UnexpectedEof.into()))
        } else {
            entry.done += result as usize;
            if entry.done < entry.request.buf.len() {
                return self.issue(slot);
            }
            Ok(())
        };
        let InFlight { request, .. } = self.slab[slot].take().expect("checked above");
        self.free.push(slot);
        let _ = request.reply.send(outcome.map(|()| request.buf));
    }

    fn leak_in_flight(&mut self) {
        for entry in self.slab.iter_mut().filter_map(Option::take) {
            let Request { buf, reply, .. } = entry.request;
            std::mem::forget(buf);
            let _ = reply.send(Err(Error::StoreClosed));
        }
    }
}
