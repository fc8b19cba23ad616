//! The io_uring store: one thread owns the ring; callers hand it requests
//! over a channel and an eventfd, and get their buffers back with the result.
//!
//! Every buffer in flight lives in the slab entry keyed by the SQE's
//! `user_data` until its completion arrives, so the kernel never writes to
//! memory the caller could have freed.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;

use crate::aligned::AlignedBuf;
use crate::file::BackingFile;
use crate::Error;

/// Ring size; the number of operations in flight at once is one less (one
/// entry stays armed on the wake-up eventfd).
pub const RING_ENTRIES: u32 = 256;
const WAKE_USER_DATA: u64 = u64::MAX;

enum Kind {
    Read,
    Write { fua: bool },
    Flush,
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

enum Message {
    Submit(Request),
    Shutdown,
}

/// Wakes the ring thread at most once per batch of submissions: a submitter
/// writes the eventfd only when it is the first since the thread last
/// drained the channel (the thread zeroes the count before draining, so a
/// message sent after that always triggers a fresh wake-up).
struct Doorbell {
    eventfd: EventFd,
    pending: AtomicUsize,
}

impl Doorbell {
    fn ring(&self) -> Result<(), Error> {
        if self.pending.fetch_add(1, Ordering::AcqRel) == 0 {
            self.eventfd
                .write(1)
                .map_err(|e| Error::UringSetup(e.into()))?;
        }
        Ok(())
    }
}

pub struct UringStore {
    file: Arc<BackingFile>,
    tx: mpsc::Sender<Message>,
    wake: Arc<Doorbell>,
    thread: Option<JoinHandle<()>>,
}

impl UringStore {
    pub fn new(file: Arc<BackingFile>) -> Result<UringStore, Error> {
        let ring = IoUring::new(RING_ENTRIES).map_err(Error::UringSetup)?;
        let wake = Arc::new(Doorbell {
            eventfd: EventFd::from_flags(EfdFlags::EFD_CLOEXEC)
                .map_err(|e| Error::UringSetup(e.into()))?,
            pending: AtomicUsize::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let thread = {
            let file = file.clone();
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("blkmirror-uring".into())
                .spawn(move || RingLoop::new(ring, file, wake, rx).run())
                .map_err(Error::UringSetup)?
        };
        Ok(UringStore {
            file,
            tx,
            wake,
            thread: Some(thread),
        })
    }

    pub fn file(&self) -> &Arc<BackingFile> {
        &self.file
    }

    async fn submit(&self, kind: Kind, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Message::Submit(Request {
                kind,
                offset,
                buf,
                reply,
            }))
            .map_err(|_| Error::StoreClosed)?;
        self.wake.ring()?;
        rx.await.map_err(|_| Error::StoreClosed)?
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, Error> {
        self.submit(Kind::Read, offset, AlignedBuf::zeroed(len))
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
        let _ = self.tx.send(Message::Shutdown);
        let _ = self.wake.eventfd.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct RingLoop {
    ring: IoUring,
    file: Arc<BackingFile>,
    wake: Arc<Doorbell>,
    wake_buf: Box<[u8; 8]>,
    rx: mpsc::Receiver<Message>,
    slab: Vec<Option<InFlight>>,
    free: Vec<usize>,
    backlog: VecDeque<Request>,
    shutting_down: bool,
}

impl RingLoop {
    fn new(
        ring: IoUring,
        file: Arc<BackingFile>,
        wake: Arc<Doorbell>,
        rx: mpsc::Receiver<Message>,
    ) -> RingLoop {
        let slots = (RING_ENTRIES - 1) as usize;
        RingLoop {
            ring,
            file,
            wake,
            wake_buf: Box::new([0; 8]),
            rx,
            slab: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            backlog: VecDeque::new(),
            shutting_down: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.slab.len() - self.free.len()
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::error!(error = %e, "io_uring submit failed; failing all requests");
                self.fail_all();
                return;
            }
            let completions: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user_data, result) in completions {
                if user_data == WAKE_USER_DATA {
                    self.drain_channel();
                    if !self.shutting_down {
                        self.arm_wake();
                    }
                } else {
                    self.complete(user_data as usize, result);
                }
            }
            while !self.free.is_empty() {
                let Some(request) = self.backlog.pop_front() else {
                    break;
                };
                self.start(request);
            }
            if self.shutting_down && self.in_flight() == 0 && self.backlog.is_empty() {
                return;
            }
        }
    }

    fn drain_channel(&mut self) {
        self.wake.pending.store(0, Ordering::Release);
        loop {
            match self.rx.try_recv() {
                Ok(Message::Submit(request)) => self.backlog.push_back(request),
                Ok(Message::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.shutting_down = true;
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => return,
            }
        }
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.wake.eventfd.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_USER_DATA);
        // SAFETY: wake_buf is a boxed field of self, which lives until the
        // ring is dropped with it; the eventfd is kept open by self.wake.
        unsafe { self.push(&sqe) };
    }

    /// Pushes an entry, submitting first if the queue is full. The slab holds
    /// fewer entries than the ring, so there is always room after a submit.
    ///
    /// # Safety
    /// The buffers the entry points at must stay valid until its completion.
    unsafe fn push(&mut self, sqe: &squeue::Entry) {
        // SAFETY: the caller guarantees the entry's buffers outlive it.
        while unsafe { self.ring.submission().push(sqe) }.is_err() {
            let _ = self.ring.submit();
        }
    }

    fn start(&mut self, request: Request) {
        let slot = self
            .free
            .pop()
            .expect("start is only called with a free slot");
        self.slab[slot] = Some(InFlight { request, done: 0 });
        self.issue(slot);
    }

    /// Submits (the rest of) the operation held in `slot`.
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

    fn complete(&mut self, slot: usize, result: i32) {
        let entry = self.slab[slot]
            .as_mut()
            .expect("completion for an occupied slot");
        let offset = entry.request.offset + entry.done as u64;
        let outcome = if result < 0 {
            if -result == libc::EAGAIN || -result == libc::EINTR {
                return self.issue(slot);
            }
            Err(Error::Io {
                op: entry.request.kind.name(),
                offset,
                source: std::io::Error::from_raw_os_error(-result),
            })
        } else if matches!(entry.request.kind, Kind::Flush) {
            Ok(())
        } else if result == 0 && entry.request.buf.len() > entry.done {
            Err(Error::Io {
                op: entry.request.kind.name(),
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })
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

    fn fail_all(&mut self) {
        // Only reached when the ring itself broke. The kernel may still own
        // buffers of operations in flight, so those are leaked, never freed.
        for entry in self.slab.iter_mut().filter_map(Option::take) {
            let Request { buf, reply, .. } = entry.request;
            std::mem::forget(buf);
            let _ = reply.send(Err(Error::StoreClosed));
        }
        for request in self.backlog.drain(..) {
            let _ = request.reply.send(Err(Error::StoreClosed));
        }
    }
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
