//! The async front-end on tokio: [`AsyncChannel`], the same connection as
//! [`Channel`], for tasks.
//!
//! Calls share the blocking channel's machinery (the pending-call table,
//! leader/follower collection of responses). A task that leads waits for
//! the server's doorbell through the client's eventfd registered with
//! tokio's reactor (`AsyncFd`): it announces itself in shared memory, looks
//! at the ring once more, and only then awaits the fd, so a busy channel
//! makes no system call and an idle one costs the runtime nothing. A task
//! that follows parks its waker in the table; whoever collects its answer
//! wakes it.
//!
//! Dropping a call's future cancels the call locally: its entry is
//! abandoned, and the answer, when it comes, only frees the slabs.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use shmesh_shm::doorbell::EventDoorbell;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::client::{
    Answer, CallState, Channel, ChannelError, ChannelOptions, Inner, LIVENESS_SLICE, RequestBuf,
    Response, lock, take_if_done,
};
use crate::mailbox::Waiter;
use crate::status::Status;

/// A connection to a shmesh server for async callers. Cheap to clone.
#[derive(Clone)]
pub struct AsyncChannel {
    channel: Channel,
    bell: Arc<AsyncFd<OwnedFd>>,
}

impl std::fmt::Debug for AsyncChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncChannel")
            .field("channel", &self.channel)
            .finish()
    }
}

/// Withdraws a leader's announcement however its wait ends (a cancelled
/// future included), so the server does not go on making wake-up calls.
struct Announced<'a>(&'a EventDoorbell);

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        self.0.retract();
    }
}

impl AsyncChannel {
    /// Connects to the server at `address`. Must be called within a tokio
    /// runtime (the doorbell registers with its reactor).
    pub async fn connect(address: &str, options: &ChannelOptions) -> Result<Self, ChannelError> {
        let (address, options) = (address.to_owned(), options.clone());
        // The handshake is a few blocking socket round trips.
        let channel = tokio::task::spawn_blocking(move || Channel::connect(&address, &options))
            .await
            .map_err(|e| ChannelError::Socket(std::io::Error::other(e)))??;
        Self::from_channel(channel)
    }

    /// An async front-end for an already connected channel (both may be
    /// used at once). Must be called within a tokio runtime.
    pub fn from_channel(channel: Channel) -> Result<Self, ChannelError> {
        let fd = channel
            .inner
            .client_bell
            .as_fd()
            .try_clone_to_owned()
            .map_err(ChannelError::Socket)?;
        // Deprecated in tokio for any `T: AsRawFd`, whose fd might be closed
        // behind the reactor's back; an `OwnedFd` keeps its fd open until the
        // `AsyncFd` drops it, which is the contract of the `unsafe`
        // replacement, so this use is sound without `unsafe` in this crate.
        #[allow(deprecated)]
        let bell = AsyncFd::with_interest(fd, Interest::READABLE).map_err(ChannelError::Socket)?;
        Ok(AsyncChannel {
            channel,
            bell: Arc::new(bell),
        })
    }

    /// The blocking channel underneath.
    pub fn blocking(&self) -> &Channel {
        &self.channel
    }

    /// Loans a request buffer to write in place (see [`Channel::loan`]).
    /// Does not wait for a slab: an exhausted pool is `ResourceExhausted`
    /// after a short retry, as the blocking loan with a zero timeout would.
    pub fn loan(&self, len: usize) -> Result<RequestBuf, Status> {
        self.channel.inner.loan(len, Some(Instant::now()))
    }

    /// Calls `method` with `request`, copied into shared memory.
    pub async fn call(
        &self,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let mut buf = self
            .channel
            .inner
            .loan(request.len(), timeout.map(|t| Instant::now() + t))?;
        buf.copy_from_slice(request);
        self.send(method, buf, timeout).await
    }

    /// Sends a request written in place and awaits the response.
    pub async fn send(
        &self,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let inner = &self.channel.inner;
        let deadline = timeout.map(|t| Instant::now() + t);
        let call = inner.start(method, request, timeout, deadline, Waiter::Task(None))?;
        let answer = self.wait(call.call_id, deadline).await;
        inner.end(call, answer, deadline)
    }

    async fn wait(&self, call_id: u64, deadline: Option<Instant>) -> Result<Answer, Status> {
        let inner: &Arc<Inner> = &self.channel.inner;
        loop {
            if let Some(d) = take_if_done(&mut lock(&inner.pending), call_id) {
                return Ok(d);
            }
            if inner.dead.load(Ordering::Acquire) {
                return Err(inner.unavailable());
            }
            let now = Instant::now();
            if deadline.is_some_and(|t| now >= t) {
                return Err(Status::deadline_exceeded("no response before the deadline"));
            }
            let slice_end = deadline.map_or(now + LIVENESS_SLICE, |t| t.min(now + LIVENESS_SLICE));
            let leading = match inner.ends_recv.try_lock() {
                Ok(mut ring) => {
                    if let Some(d) = inner.collect(&mut ring, call_id)? {
                        drop(ring);
                        inner.promote_a_follower();
                        return Ok(d);
                    }
                    // Announce, then look once more, then await the fd
                    // without holding the ring: the announcement makes the
                    // server ring the eventfd for anything pushed from now on.
                    inner.client_bell.announce();
                    let announced = Announced(&inner.client_bell);
                    if ring.has_pending_hint() || inner.dead.load(Ordering::Acquire) {
                        continue;
                    }
                    drop(ring);
                    Some(announced)
                }
                Err(_) => None,
            };
            let until = tokio::time::Instant::from_std(slice_end);
            match leading {
                Some(announced) => {
                    if let Ok(Ok(mut ready)) =
                        tokio::time::timeout_at(until, self.bell.readable()).await
                    {
                        ready.clear_ready();
                    }
                    // Retracting drains the eventfd.
                    drop(announced);
                }
                None => {
                    let _ = tokio::time::timeout_at(until, follow(inner, call_id)).await;
                }
            }
        }
    }
}

/// Parks this task's waker on its call, and resolves once woken: by the
/// leader handing over the answer, or by a promotion to lead.
async fn follow(inner: &Inner, call_id: u64) {
    let mut parked = false;
    std::future::poll_fn(|cx| {
        if parked {
            return Poll::Ready(());
        }
        let mut pending = lock(&inner.pending);
        match pending.get_mut(&call_id) {
            Some(p) if matches!(p.state, CallState::Waiting(_)) => {
                p.state = CallState::Waiting(Waiter::Task(Some(cx.waker().clone())));
                parked = true;
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    })
    .await
}
