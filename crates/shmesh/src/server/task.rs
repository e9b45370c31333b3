//! Async handlers on the tokio runtime: unary ([`Router::route_async`]) and
//! streaming ([`Router::route_stream_async`]).
//!
//! The connection's thread stays a plain thread spinning on the ring (that
//! is where the latency is won); it spawns each async call as a task. A task
//! whose client cancels, or whose deadline passes, is dropped at its next
//! await, the way tonic drops a handler whose stream was reset, and the call
//! ends with `Cancelled` or `DeadlineExceeded`.
//!
//! Answers are written in place when the handler loans them
//! ([`AsyncRequest::loan`], [`SendHalf::loan`]), or copied from the bytes
//! it gives; either way they go out from the task, under flow control.
//!
//! [`Router::route_async`]: crate::server::Router::route_async
//! [`Router::route_stream_async`]: crate::server::Router::route_stream_async

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use shmesh_shm::descriptor::Descriptor;
use shmesh_shm::pool::SlabMut;

use crate::deadline;
use crate::mailbox::{Mailbox, Waiter};
use crate::metadata::Metadata;
use crate::protocol;
use crate::server::dispatch::{Payload, UnaryRequest};
use crate::server::link::{
    AllocFailed, Link, POOL_RETRY, in_place_flags, message, sending_over, try_take_credit,
};
use crate::server::loan::{Outgoing, ReplyBuf};
use crate::server::stream::{CallDone, CallEnd, Message, Step};
use crate::socket::PeerCredentials;
use crate::status::Status;

/// The future an async handler returns.
pub type HandlerFuture<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'static>>;

/// An async unary handler: its answer is a [`ReplyBuf`], loaned and
/// written in place, or made from the bytes a copying handler returned.
pub(crate) type AsyncHandler = dyn Fn(AsyncRequest) -> HandlerFuture<ReplyBuf> + Send + Sync;

/// An async streaming handler.
pub(crate) type AsyncStreamHandler = dyn Fn(AsyncServerStream) -> HandlerFuture<()> + Send + Sync;

/// A unary call as an async handler sees it; owned, so the handler's future
/// can keep it across awaits.
pub struct AsyncRequest {
    link: Arc<Link>,
    mailbox: Arc<Mailbox>,
    first: Descriptor,
    payload: Payload,
    metadata: Metadata,
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

    /// The metadata the caller sent with the call (empty if none).
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
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

    /// Loans the `len`-byte response buffer in shared memory, to write the
    /// response into in place and return from a
    /// [`Router::route_async_in_place`] handler: the client reads the very
    /// bytes written. Awaits a free slab while the pool is exhausted (the
    /// client still holds earlier answers). Any size up to the connection's
    /// message limit (`ResourceExhausted` above): above the largest slab
    /// the buffer is on the heap and goes in chunks (see [`ReplyBuf`]).
    ///
    /// [`Router::route_async_in_place`]: crate::server::Router::route_async_in_place
    pub async fn loan(&self, len: usize) -> Result<ReplyBuf, Status> {
        loan(&self.link, &self.mailbox, len).await
    }
}

/// A streaming call as its async handler sees it: receive the client's
/// messages, send yours; the handler's result is the call's status.
///
/// [`AsyncServerStream::into_split`] parts it into a [`RecvHalf`] and a
/// [`SendHalf`], to receive and send from two tasks at once.
pub struct AsyncServerStream {
    recv: RecvHalf,
    send: SendHalf,
}

impl std::fmt::Debug for AsyncServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncServerStream")
            .field("call_id", &self.send.call_id)
            .field("method", &self.send.method)
            .finish_non_exhaustive()
    }
}

impl AsyncServerStream {
    fn new(end: CallEnd) -> Self {
        let send = SendHalf {
            link: end.link.clone(),
            mailbox: end.mailbox.clone(),
            call_id: end.call_id,
            method: end.method,
        };
        AsyncServerStream {
            recv: RecvHalf { end },
            send,
        }
    }

    /// The method called.
    pub fn method(&self) -> u32 {
        self.send.method
    }

    /// Who called.
    pub fn peer(&self) -> PeerCredentials {
        self.send.link.peer
    }

    /// The metadata the caller opened the call with (empty if none).
    pub fn metadata(&self) -> &Metadata {
        &self.recv.end.metadata
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        deadline::remaining(self.recv.end.deadline_ns)
    }

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.send.is_cancelled()
    }

    /// The client's next message; `None` once it has sent its last.
    pub async fn recv(&mut self) -> Result<Option<Message>, Status> {
        self.recv.recv().await
    }

    /// Sends one message to the client, copied into shared memory (in
    /// chunks if larger than a slab), waiting while the client has not
    /// granted the credit for it. [`AsyncServerStream::loan`] and
    /// [`AsyncServerStream::send_buf`] send without the copy.
    pub async fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        self.send.send(message).await
    }

    /// Loans a buffer of `len` bytes in shared memory to write the next
    /// message into, in place (see [`SendHalf::loan`]).
    pub async fn loan(&self, len: usize) -> Result<ReplyBuf, Status> {
        self.send.loan(len).await
    }

    /// Sends a message written in place into a buffer from
    /// [`AsyncServerStream::loan`] (see [`SendHalf::send_buf`]).
    pub async fn send_buf(&mut self, message: ReplyBuf) -> Result<(), Status> {
        self.send.send_buf(message).await
    }

    /// Parts the call into its receiving and its sending half, so two
    /// tasks can receive and send at once (a bidirectional handler that
    /// answers while it reads). Read what you need of
    /// [`AsyncServerStream::peer`] and [`AsyncServerStream::remaining`]
    /// first.
    ///
    /// The call still ends when the handler's future completes, with its
    /// result, whatever became of the halves. Dropping the [`SendHalf`]
    /// sends nothing (no end); dropping the [`RecvHalf`] stops reading: the
    /// client's further messages wait unread (it gets no more credit once
    /// its window is full) and are given back when the call ends. A half
    /// moved into a task of its own outlives neither the call nor its
    /// cancellation: once the call has ended, its sends and receives fail
    /// (`FailedPrecondition`, or `Cancelled` if the client cancelled) and
    /// nothing it sends follows the call's end.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// use shmesh::status::Status;
    ///
    /// // Send ten messages while counting the bytes that come in.
    /// let router = Router::new().route_stream_async(3, |call| async move {
    ///     let (mut incoming, mut outgoing) = call.into_split();
    ///     let reading = async move {
    ///         let mut bytes = 0;
    ///         while let Some(message) = incoming.recv().await? {
    ///             bytes += message.len();
    ///         }
    ///         Ok::<_, Status>(bytes)
    ///     };
    ///     let sending = async move {
    ///         for i in 0..10u8 {
    ///             let mut message = outgoing.loan(64).await?;
    ///             message.fill(i);
    ///             outgoing.send_buf(message).await?;
    ///         }
    ///         Ok(())
    ///     };
    ///     // Or each in a task of its own (`tokio::spawn`).
    ///     let (_bytes, ()) = tokio::try_join!(reading, sending)?;
    ///     Ok(())
    /// });
    /// ```
    pub fn into_split(self) -> (RecvHalf, SendHalf) {
        (self.recv, self.send)
    }
}

/// The receiving half of an [`AsyncServerStream`]
/// ([`AsyncServerStream::into_split`]).
pub struct RecvHalf {
    end: CallEnd,
}

impl std::fmt::Debug for RecvHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvHalf")
            .field("call_id", &self.end.call_id)
            .finish_non_exhaustive()
    }
}

impl RecvHalf {
    /// The metadata the caller opened the call with (empty if none).
    pub fn metadata(&self) -> &Metadata {
        &self.end.metadata
    }

    /// The client's next message; `None` once it has sent its last.
    /// `Cancelled` if the client cancels meanwhile, `FailedPrecondition`
    /// once the call has ended.
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

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.end.mailbox.is_cancelled()
    }
}

/// The sending half of an [`AsyncServerStream`]
/// ([`AsyncServerStream::into_split`]).
pub struct SendHalf {
    link: Arc<Link>,
    mailbox: Arc<Mailbox>,
    call_id: u64,
    method: u32,
}

impl std::fmt::Debug for SendHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendHalf")
            .field("call_id", &self.call_id)
            .finish_non_exhaustive()
    }
}

impl SendHalf {
    /// Sends one message to the client, copied into shared memory (in
    /// chunks if larger than a slab), waiting while the client has not
    /// granted the credit for it. `Cancelled` if the client cancels,
    /// `FailedPrecondition` once the call has ended.
    pub async fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        let (link, mailbox) = (&*self.link, &*self.mailbox);
        send(link, mailbox, self.call_id, self.method, message, false).await
    }

    /// Loans a buffer of `len` bytes in shared memory to write the next
    /// message into, in place, then send with [`SendHalf::send_buf`];
    /// awaits a free slab while the pool is exhausted (the client still
    /// holds the slabs of earlier messages). Any size up to the
    /// connection's message limit (`ResourceExhausted` above): above the
    /// largest slab the buffer is on the heap and goes in chunks (see
    /// [`ReplyBuf`]).
    pub async fn loan(&self, len: usize) -> Result<ReplyBuf, Status> {
        loan(&self.link, &self.mailbox, len).await
    }

    /// Sends a message written in place into a buffer from
    /// [`SendHalf::loan`]: the client reads the very bytes written, once it
    /// has granted the credit for them (this awaits it).
    pub async fn send_buf(&mut self, message: ReplyBuf) -> Result<(), Status> {
        let (link, mailbox) = (&*self.link, &*self.mailbox);
        send_buf(link, mailbox, self.call_id, self.method, message, false).await
    }

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.mailbox.is_cancelled()
    }

    /// Resolves when the client cancels the call or its connection ends:
    /// for a sending task to stop on.
    pub async fn cancelled(&self) {
        cancelled(&self.link, &self.mailbox).await;
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
        if let Some(taken) = try_take_credit(link, &mut state) {
            return Poll::Ready(taken);
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
        tokio::time::sleep(POOL_RETRY).await;
    }
}

/// A buffer of `len` bytes for an answer of the call whose mailbox is
/// `mailbox`, awaiting a slab while the pool is exhausted (until the call
/// ends or the connection does).
async fn loan(link: &Link, mailbox: &Mailbox, len: usize) -> Result<ReplyBuf, Status> {
    loop {
        if let Some(buf) = link.try_loan(len)? {
            return Ok(buf);
        }
        if let Some(over) = sending_over(&mailbox.lock()) {
            return Err(over);
        }
        tokio::time::sleep(POOL_RETRY).await;
    }
}

/// Sends one message copied from `bytes` (ending the call with it if
/// `end`), in chunks if larger than a slab, under flow control.
async fn send(
    link: &Link,
    mailbox: &Mailbox,
    call_id: u64,
    method: u32,
    bytes: &[u8],
    end: bool,
) -> Result<(), Status> {
    link.check_size(bytes.len())?;
    for (range, flags) in link.plan(bytes.len(), end) {
        if protocol::costs_credit(flags) {
            take_credit(link, mailbox).await?;
        }
        let chunk = &bytes[range];
        let payload = match chunk.len() {
            0 => None,
            n => Some(link.fill(alloc(link, n).await?, chunk)),
        };
        link.push_message(mailbox, message(call_id, method, flags), payload)?;
    }
    Ok(())
}

/// Sends one message written in place into `buf` (ending the call with it
/// if `end`): its slab as it is, under flow control; a heap buffer copied
/// out in chunks.
async fn send_buf(
    link: &Link,
    mailbox: &Mailbox,
    call_id: u64,
    method: u32,
    buf: ReplyBuf,
    end: bool,
) -> Result<(), Status> {
    match buf.into_outgoing(&link.pool)? {
        Outgoing::Copied(bytes) => send(link, mailbox, call_id, method, &bytes, end).await,
        Outgoing::InPlace(payload) => {
            let flags = in_place_flags(end);
            if protocol::costs_credit(flags) {
                take_credit(link, mailbox).await?;
            }
            link.push_message(mailbox, message(call_id, method, flags), payload)
        }
    }
}

/// Spawns an async unary call.
pub(crate) fn spawn_unary(
    runtime: &crate::server::Runtime,
    handler: Arc<AsyncHandler>,
    link: Arc<Link>,
    mailbox: Arc<Mailbox>,
    request: UnaryRequest,
    started: std::time::Instant,
) {
    let UnaryRequest {
        first,
        payload,
        metadata,
    } = request;
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
    let shared = matches!(payload, Payload::Shared(..));
    runtime.spawn(async move {
        let request = AsyncRequest {
            link: link.clone(),
            mailbox: mailbox.clone(),
            first,
            payload,
            metadata,
        };
        let result = tokio::select! {
            r = handler(request) => deadline::enforce(r, first.deadline_ns),
            () = cancelled(&link, &mailbox) => Err(Status::cancelled("the client cancelled the call")),
            () = deadline_passes(first.deadline_ns) => Err(Status::deadline_exceeded("the handler ran past the caller's deadline")),
        };
        // The request is dropped: give its slab back if the client asked.
        if shared {
            let _ = link.discard(&first);
        }
        let result = match result {
            Ok(reply) => {
                let (link, mailbox) = (&*link, &*mailbox);
                send_buf(link, mailbox, first.call_id, first.method_id, reply, true).await
            }
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
        let stream = AsyncServerStream::new(end);
        let result = tokio::select! {
            r = handler(stream) => r,
            () = cancelled(&done.link, &done.mailbox) => Err(Status::cancelled("the client cancelled the call")),
            () = deadline_passes(deadline_ns) => Err(Status::deadline_exceeded("the handler ran past the caller's deadline")),
        };
        done.finish(result);
    });
}
