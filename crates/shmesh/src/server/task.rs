//! Async handlers on the tokio runtime: unary ([`Router::route_async`]) and
//! streaming ([`Router::route_stream_async`]).
//!
//! The connection's thread stays a plain thread spinning on the ring (that
//! is where the latency is won); it spawns each async call as a task. A task
//! whose client cancels, or whose deadline passes, is dropped at its next
//! await, the way tonic drops a handler whose stream was reset, and the call
//! ends with `Cancelled` or `DeadlineExceeded`.
//!
//! [`Router::route_async`]: crate::server::Router::route_async
//! [`Router::route_stream_async`]: crate::server::Router::route_stream_async

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::pool::SlabMut;

use crate::deadline;
use crate::mailbox::{Mailbox, Waiter};
use crate::protocol;
use crate::server::dispatch::Payload;
use crate::server::link::{AllocFailed, Gone, Link};
use crate::server::stream::{CallDone, CallEnd, Message, Step};
use crate::socket::PeerCredentials;
use crate::status::Status;

/// The future an async handler returns.
pub type HandlerFuture<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'static>>;

/// An async unary handler.
pub(crate) type AsyncHandler = dyn Fn(AsyncRequest) -> HandlerFuture<Vec<u8>> + Send + Sync;

/// An async streaming handler.
pub(crate) type AsyncStreamHandler = dyn Fn(AsyncServerStream) -> HandlerFuture<()> + Send + Sync;

/// A unary call as an async handler sees it; owned, so the handler's future
/// can keep it across awaits.
pub struct AsyncRequest {
    link: Arc<Link>,
    mailbox: Arc<Mailbox>,
    first: Descriptor,
    payload: Payload,
}

impl std::fmt::Debug for AsyncRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncRequest")
            .field("method", &self.first.method_id)
            .field("len", &self.payload().len())
            .finish()
    }
}

impl AsyncRequest {
    /// The method called.
    pub fn method(&self) -> u32 {
        self.first.method_id
    }

    /// The request's bytes, in place in shared memory (or assembled, if it
    /// came in chunks).
    pub fn payload(&self) -> &[u8] {
        self.payload.bytes(&self.link)
    }

    /// Who called.
    pub fn peer(&self) -> PeerCredentials {
        self.link.peer
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        deadline::remaining(self.first.deadline_ns)
    }

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.mailbox.is_cancelled()
    }

    /// Resolves when the client cancels the call or its connection ends.
    pub async fn cancelled(&self) {
        cancelled(&self.link, &self.mailbox).await;
    }
}

/// A streaming call as its async handler sees it: receive the client's
/// messages, send yours; the handler's result is the call's status.
pub struct AsyncServerStream {
    end: CallEnd,
}

impl std::fmt::Debug for AsyncServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncServerStream")
            .field("call_id", &self.end.call_id)
            .field("method", &self.end.method)
            .finish_non_exhaustive()
    }
}

impl AsyncServerStream {
    /// The method called.
    pub fn method(&self) -> u32 {
        self.end.method
    }

    /// Who called.
    pub fn peer(&self) -> PeerCredentials {
        self.end.link.peer
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        deadline::remaining(self.end.deadline_ns)
    }

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.end.mailbox.is_cancelled()
    }

    /// The client's next message; `None` once it has sent its last.
    pub async fn recv(&mut self) -> Result<Option<Message>, Status> {
        let end = &mut self.end;
        std::future::poll_fn(
            |cx| match end.step(|| Waiter::Task(Some(cx.waker().clone()))) {
                Ok(Step::Ready(m)) => Poll::Ready(Ok(m)),
                Ok(Step::Wait) => Poll::Pending,
                Err(status) => Poll::Ready(Err(status)),
            },
        )
        .await
    }

    /// Sends one message to the client (in chunks if larger than a slab),
    /// waiting while the client has not granted the credit for it.
    pub async fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        if self.end.mailbox.lock().finished {
            return Err(Status::failed_precondition("the call has ended"));
        }
        let (link, mailbox) = (self.end.link.clone(), self.end.mailbox.clone());
        send(
            &link,
            &mailbox,
            self.end.call_id,
            self.end.method,
            message,
            false,
        )
        .await
    }
}

/// Resolves when the call is cancelled or the connection is gone.
async fn cancelled(link: &Link, mailbox: &Mailbox) {
    std::future::poll_fn(|cx| {
        let mut state = mailbox.lock();
        if state.cancelled || link.is_dead() {
            return Poll::Ready(());
        }
        state.wait_with(Waiter::Task(Some(cx.waker().clone())));
        Poll::Pending
    })
    .await
}

/// Sleeps until the caller's deadline, or forever without one.
async fn deadline_passes(deadline_ns: u64) {
    match deadline::remaining(deadline_ns) {
        Some(left) => tokio::time::sleep(left).await,
        None => std::future::pending().await,
    }
}

/// Takes one send credit, waiting for the client to grant more.
async fn take_credit(link: &Link, mailbox: &Mailbox) -> Result<(), Status> {
    std::future::poll_fn(|cx| {
        let mut state = mailbox.lock();
        if state.cancelled {
            return Poll::Ready(Err(Status::cancelled("the client cancelled the call")));
        }
        if state.credit > 0 {
            state.credit -= 1;
            return Poll::Ready(Ok(()));
        }
        if link.is_dead() {
            return Poll::Ready(Err(Gone.into()));
        }
        state.wait_with(Waiter::Task(Some(cx.waker().clone())));
        Poll::Pending
    })
    .await
}

/// A slab of `len` bytes, yielding to the runtime while the pool is
/// exhausted.
async fn alloc(link: &Link, len: usize) -> Result<SlabMut<'_>, AllocFailed> {
    loop {
        if let Some(slab) = link.try_alloc(len)? {
            return Ok(slab);
        }
        tokio::time::sleep(Duration::from_micros(50)).await;
    }
}

/// Sends one message (ending the call with it if `end`), in chunks if
/// larger than a slab, under flow control.
async fn send(
    link: &Link,
    mailbox: &Mailbox,
    call_id: u64,
    method: u32,
    bytes: &[u8],
    end: bool,
) -> Result<(), Status> {
    link.check_size(bytes.len())?;
    let last = if end { Flags::END } else { Flags(0) };
    for (range, flags) in protocol::plan(bytes.len(), link.max_slab, Flags(0), Flags(0), last) {
        if protocol::costs_credit(flags) {
            take_credit(link, mailbox).await?;
        }
        let chunk = &bytes[range];
        let mut d = Descriptor {
            call_id,
            method_id: method,
            flags,
            ..Default::default()
        };
        if !chunk.is_empty() {
            let mut slab = alloc(link, chunk.len()).await?;
            slab[..chunk.len()].copy_from_slice(chunk);
            d.flags = d.flags | Flags::PAYLOAD;
            d.len = chunk.len() as u32;
            d.payload = slab.send();
        }
        link.push(d)?;
    }
    Ok(())
}

/// Spawns an async unary call.
pub(crate) fn spawn_unary(
    runtime: &crate::server::Runtime,
    handler: Arc<AsyncHandler>,
    link: Arc<Link>,
    mailbox: Arc<Mailbox>,
    first: Descriptor,
    payload: Payload,
    started: std::time::Instant,
) {
    let done = CallDone {
        link: link.clone(),
        mailbox: mailbox.clone(),
        call_id: first.call_id,
        method: first.method_id,
        deadline_ns: first.deadline_ns,
        started,
    };
    let Some(runtime) = runtime else {
        done.finish(Err(Status::internal(
            "no async runtime for an async handler",
        )));
        return;
    };
    let shared = matches!(payload, Payload::Shared(_));
    runtime.spawn(async move {
        let request = AsyncRequest {
            link: link.clone(),
            mailbox: mailbox.clone(),
            first,
            payload,
        };
        let result = tokio::select! {
            r = handler(request) => r,
            () = cancelled(&link, &mailbox) => Err(Status::cancelled("the client cancelled the call")),
            () = deadline_passes(first.deadline_ns) => Err(Status::deadline_exceeded("the handler ran past the caller's deadline")),
        };
        // The request is dropped: give its slab back if the client asked.
        if shared {
            let _ = link.discard(&first);
        }
        let result = match result {
            Ok(bytes) => send(&link, &mailbox, first.call_id, first.method_id, &bytes, true).await,
            Err(status) => Err(status),
        };
        link.end_unary(first.call_id, first.method_id, result, started);
    });
}

/// Spawns an async streaming call.
pub(crate) fn spawn_stream(
    runtime: &crate::server::Runtime,
    handler: Arc<AsyncStreamHandler>,
    end: CallEnd,
) {
    let done = end.done();
    let Some(runtime) = runtime else {
        done.finish(Err(Status::internal(
            "no async runtime for an async handler",
        )));
        return;
    };
    let deadline_ns = end.deadline_ns;
    runtime.spawn(async move {
        let stream = AsyncServerStream { end };
        let result = tokio::select! {
            r = handler(stream) => r,
            () = cancelled(&done.link, &done.mailbox) => Err(Status::cancelled("the client cancelled the call")),
            () = deadline_passes(deadline_ns) => Err(Status::deadline_exceeded("the handler ran past the caller's deadline")),
        };
        done.finish(result);
    });
}
