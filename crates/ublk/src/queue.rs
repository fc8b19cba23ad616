//! One hardware queue: a thread with libublk's io_uring and a local
//! executor, running one task per tag. Each request is executed on the
//! node's tokio runtime; the answer comes back through a oneshot channel,
//! and a doorbell (an eventfd polled in the queue's ring) wakes the thread
//! out of its wait for the kernel.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;
use std::sync::Arc;

use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::{Backend, Request};

/// How long a queue thread sleeps in the kernel at most when idle.
const IDLE_WAIT_S: u64 = 20;

/// What every queue thread of a device shares.
pub(crate) struct QueueContext<B> {
    pub backend: Arc<B>,
    pub runtime: tokio::runtime::Handle,
}

/// Serves queue `qid` until the device stops.
pub(crate) fn serve<B: Backend>(qid: u16, dev: &UblkDev, ctx: &Arc<QueueContext<B>>) {
    // A queue that gives up before its tags register their buffers must
    // say so, or the device's start waits for it forever. libublk's only
    // public way to say it is the mlock-failure report; the start then
    // fails (EPERM), and the log says why.
    let give_up = |what: &str, error: &dyn std::fmt::Display| {
        tracing::error!(queue = qid, %error, "ublk queue setup failed: {what}");
        dev.notify_buffer_registration_complete(true);
    };
    let doorbell = match EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC) {
        Ok(fd) => Arc::new(fd),
        Err(e) => return give_up("doorbell eventfd", &e),
    };
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => return give_up("queue", &e),
    };
    let executor = Rc::new(smol::LocalExecutor::new());
    let tags: Vec<_> = queue
        .tags()
        .map(|tag| {
            let queue = queue.clone();
            let tag_ctx = TagContext {
                shared: ctx.clone(),
                doorbell: doorbell.clone(),
            };
            executor.spawn(async move {
                match serve_tag(&queue, tag, &tag_ctx).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => tracing::error!(queue = qid, tag, error = %e, "ublk tag ended"),
                }
            })
        })
        .collect();
    let listener = executor.spawn(listen(doorbell));
    let ticker = executor.clone();
    smol::block_on(executor.run(async move {
        let run_ready_tasks = || while ticker.try_tick() {};
        let all_tags_done = || tags.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(
            &queue,
            Some(IDLE_WAIT_S),
            run_ready_tasks,
            all_tags_done,
        )
        .await
        {
            tracing::error!(queue = qid, error = %e, "ublk queue failed");
        }
    }));
    drop(listener);
    tracing::debug!(queue = qid, "ublk queue stopped");
}

/// Keeps a poll on the doorbell armed in the queue's ring, so that a ring
/// from the runtime ends the queue thread's wait; the tasks it was rung
/// for are already woken by their channels.
async fn listen(doorbell: Arc<EventFd>) {
    loop {
        let poll = io_uring::opcode::PollAdd::new(
            io_uring::types::Fd(doorbell.as_fd().as_raw_fd()),
            libc::POLLIN as u32,
        )
        .build();
        if ublk_submit_sqe_async(poll, UblkUringData::Target as u64)
            .await
            .is_err()
        {
            return;
        }
        // Reset the counter; EAGAIN only means another drain got there first.
        let _ = doorbell.read();
    }
}

struct TagContext<B> {
    shared: Arc<QueueContext<B>>,
    doorbell: Arc<EventFd>,
}

/// Carries a request's result back to its tag. Dropped, it rings the
/// doorbell after the answer is sent or abandoned, so the tag always wakes.
struct Answer<T> {
    tx: Option<tokio::sync::oneshot::Sender<T>>,
    doorbell: Arc<EventFd>,
}

impl<T> Answer<T> {
    fn send(mut self, value: T) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(value);
        }
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        drop(self.tx.take());
        let _ = self.doorbell.write(1);
    }
}

impl<B: Backend> TagContext<B> {
    /// Runs `work` on the node's runtime and waits for its result.
    async fn on_runtime<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, i32>> + Send + 'static,
    ) -> Result<T, i32> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer = Answer {
            tx: Some(tx),
            doorbell: self.doorbell.clone(),
        };
        self.shared
            .runtime
            .spawn(async move { answer.send(work.await) });
        match rx.await {
            Ok(result) => result,
            // The runtime dropped the work undone: the node is going down
            // in a way it did not plan (a plain `down` removes the device
            // first). Failing the request would hand the file system above
            // an I/O error; ending the process instead leaves the device to
            // the kernel, which holds its I/O for the next daemon.
            Err(_) => {
                tracing::error!("the node's runtime is gone under a ublk request: exiting");
                std::process::abort();
            }
        }
    }

    /// Executes one request against the tag's buffer; returns what the
    /// driver is told (bytes or 0, or a negative errno).
    async fn execute(&self, request: Request, buf: &mut [u8]) -> i32 {
        let backend = self.shared.backend.clone();
        let outcome = match request {
            Request::Read { offset, len } => {
                let len = len as usize;
                self.on_runtime(async move { backend.read(offset, len as u32).await })
                    .await
                    .and_then(|data| {
                        let data = data.as_ref();
                        if data.len() < len {
                            return Err(libc::EIO);
                        }
                        buf[..len].copy_from_slice(&data[..len]);
                        Ok(())
                    })
            }
            Request::Write { offset, len, fua } => {
                let len = len as usize;
                let mut data = backend.alloc(len);
                data.as_mut()[..len].copy_from_slice(&buf[..len]);
                self.on_runtime(async move { backend.write(offset, data, fua).await })
                    .await
            }
            Request::Flush => self.on_runtime(async move { backend.flush().await }).await,
            Request::Zero {
                offset,
                len,
                unmap,
                fua,
            } => {
                self.on_runtime(
                    async move { backend.zero(offset, u64::from(len), unmap, fua).await },
                )
                .await
            }
        };
        match outcome {
            Ok(()) => request.success(),
            Err(errno) => {
                tracing::debug!(?request, errno, "ublk request failed");
                -errno
            }
        }
    }
}

/// One tag's life: register its buffer, then answer a request and fetch
/// the next, until the queue goes down.
async fn serve_tag<B: Backend>(
    queue: &UblkQueue<'_>,
    tag: u16,
    ctx: &TagContext<B>,
) -> Result<(), UblkError> {
    let buf_bytes = queue.dev.dev_info.max_io_buf_bytes as usize;
    let mut buf = IoBuf::<u8>::new(buf_bytes);
    queue
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = queue.get_iod(tag);
        let result =
            match Request::decode(iod.op_flags, iod.start_sector, iod.nr_sectors, buf_bytes) {
                Ok(request) => ctx.execute(request, buf.as_mut_slice()).await,
                Err(errno) => {
                    tracing::warn!(op_flags = iod.op_flags, errno, "ublk request refused");
                    -errno
                }
            };
        queue
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), result)
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doorbell() -> Arc<EventFd> {
        Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn an_answer_rings_once_it_is_sent() {
        let bell = doorbell();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        Answer {
            tx: Some(tx),
            doorbell: bell.clone(),
        }
        .send(7);
        assert_eq!(bell.read().unwrap(), 1);
        assert_eq!(rx.try_recv().unwrap(), 7);
    }

    #[test]
    fn an_abandoned_answer_closes_the_channel_and_rings() {
        let bell = doorbell();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<i32>();
        drop(Answer {
            tx: Some(tx),
            doorbell: bell.clone(),
        });
        assert_eq!(bell.read().unwrap(), 1);
        assert!(matches!(
            rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        ));
    }
}
