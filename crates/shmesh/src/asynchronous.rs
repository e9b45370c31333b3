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
use std::task::Poll;
use std::time::{Duration, Instant};

use shmesh_shm::doorbell::EventDoorbell;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::client::call::{Kind, fill_chunk};
use crate::client::{
    Answer, Call, CallState, Channel, ChannelError, ChannelOptions, Inner, LIVENESS_SLICE,
    RequestBody, RequestBuf, Response, lock, take_if_done,
};
use crate::mailbox::{Mailbox, MailboxState, Waiter};
use crate::metadata::Metadata;
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

    /// The server process's credentials from `SO_PEERCRED` at connect, if
    /// the connection was made to the server's own socket (see
    /// [`Channel::peer`]).
    pub fn peer(&self) -> Option<crate::PeerCredentials> {
        self.channel.peer()
    }

    /// Loans a request buffer to write in place (see [`Channel::loan`]).
    /// Does not wait for a slab: an exhausted pool is `ResourceExhausted`
    /// after a short retry, as the blocking loan with a zero timeout would.
    pub fn loan(&self, len: usize) -> Result<RequestBuf, Status> {
        self.channel
            .inner
            .loan(len, &Metadata::new(), Some(Instant::now()))
    }

    /// Loans a request buffer to write in place, awaiting a free slab (up
    /// to `timeout`) while the pool is busy with calls in flight; a buffer
    /// larger than the largest slab lives on the heap and goes in chunks.
    pub async fn loan_wait(
        &self,
        len: usize,
        timeout: Option<Duration>,
    ) -> Result<RequestBuf, Status> {
        self.loan_wait_with(len, &Metadata::new(), timeout).await
    }

    /// [`AsyncChannel::loan_wait`] for a call that carries `metadata`
    /// (see [`Channel::loan_with`]).
    pub async fn loan_wait_with(
        &self,
        len: usize,
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<RequestBuf, Status> {
        self.loan_until(len, metadata, timeout.map(|t| Instant::now() + t))
            .await
    }

    async fn loan_until(
        &self,
        len: usize,
        metadata: &Metadata,
        deadline: Option<Instant>,
    ) -> Result<RequestBuf, Status> {
        let inner = &self.channel.inner;
        if inner.is_dead() {
            return Err(inner.unavailable());
        }
        inner.check_size(len)?;
        let head = metadata.encoded_len();
        inner.check_block(head)?;
        if head + len > inner.max_slab {
            // A heap buffer: nothing to wait for.
            return inner.loan(len, metadata, None);
        }
        let body = match head + len {
            0 => RequestBody::Empty,
            n => {
                let mut slab = self.alloc(n, deadline).await?;
                metadata.encode_into(&mut slab[..head]);
                RequestBody::Slab(slab)
            }
        };
        Ok(RequestBuf { body, head, len })
    }

    /// Calls `method` with `request`, copied into shared memory (in chunks
    /// if it is larger than a slab).
    pub async fn call(
        &self,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        self.call_with(method, request, &Metadata::new(), timeout)
            .await
    }

    /// [`AsyncChannel::call`] with `metadata` (see [`Channel::call_with`]).
    pub async fn call_with(
        &self,
        method: u32,
        request: &[u8],
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut buf = self.loan_until(request.len(), metadata, deadline).await?;
        buf.copy_from_slice(request);
        if let Some((block, bytes)) = buf.heap() {
            return self
                .call_chunked(method, block, bytes, timeout, deadline)
                .await;
        }
        self.send_until(method, buf, timeout, deadline).await
    }

    /// Sends a request written in place and awaits the response.
    pub async fn send(
        &self,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if let Some((block, bytes)) = request.heap() {
            return self
                .call_chunked(method, block, bytes, timeout, deadline)
                .await;
        }
        self.send_until(method, request, timeout, deadline).await
    }

    async fn send_until(
        &self,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<Response, Status> {
        let inner = &self.channel.inner;
        let call = inner.start(method, request, timeout, deadline, Waiter::Task(None))?;
        match self.wait(call.call_id, deadline).await {
            Ok(Answer::Streamed(mailbox)) => {
                // The answer comes in chunks: read it as a stream.
                let mut rest = AsyncCall {
                    call: Call::resume(inner, call.call_id, mailbox, deadline),
                    channel: self.clone(),
                };
                call.disarm();
                rest.recv_unary().await
            }
            answer => inner.end(call, answer, deadline),
        }
    }

    /// A unary call whose request (behind its metadata `block`) is larger
    /// than a slab: sent in chunks.
    async fn call_chunked(
        &self,
        method: u32,
        block: &[u8],
        request: &[u8],
        timeout: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<Response, Status> {
        let mut call = AsyncCall {
            call: Call::start(
                &self.channel.inner,
                method,
                timeout,
                deadline,
                Kind::ChunkedUnary,
            )?,
            channel: self.clone(),
        };
        call.call.set_block(block.to_vec());
        call.send_message(request, true, true).await?;
        call.recv_unary().await
    }

    /// Opens a streaming call (client streaming or bidirectional); see
    /// [`Channel::open`].
    pub fn open(&self, method: u32, timeout: Option<Duration>) -> Result<AsyncCall, Status> {
        self.open_with(method, &Metadata::new(), timeout)
    }

    /// [`AsyncChannel::open`] with `metadata` (see [`Channel::open_with`]).
    pub fn open_with(
        &self,
        method: u32,
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<AsyncCall, Status> {
        Ok(AsyncCall {
            call: self.channel.open_with(method, metadata, timeout)?,
            channel: self.clone(),
        })
    }

    /// [`AsyncChannel::server_stream`] with `metadata`.
    pub async fn server_stream_with(
        &self,
        method: u32,
        request: &[u8],
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<AsyncCall, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut call = AsyncCall {
            call: Call::start(
                &self.channel.inner,
                method,
                timeout,
                deadline,
                Kind::OpenWithMessage,
            )?,
            channel: self.clone(),
        };
        call.call.set_metadata(metadata)?;
        call.send_message(request, true, true).await?;
        Ok(call)
    }

    /// Opens a server-streaming call with its one `request`; see
    /// [`Channel::server_stream`].
    pub async fn server_stream(
        &self,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<AsyncCall, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut call = AsyncCall {
            call: Call::start(
                &self.channel.inner,
                method,
                timeout,
                deadline,
                Kind::OpenWithMessage,
            )?,
            channel: self.clone(),
        };
        call.send_message(request, true, true).await?;
        Ok(call)
    }

    /// [`AsyncChannel::server_stream`] with a request written in place into
    /// a loaned buffer: no copy.
    pub async fn server_stream_buf(
        &self,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
    ) -> Result<AsyncCall, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut call = AsyncCall {
            call: Call::start(
                &self.channel.inner,
                method,
                timeout,
                deadline,
                Kind::OpenWithMessage,
            )?,
            channel: self.clone(),
        };
        call.send_last_buf(request).await?;
        Ok(call)
    }

    /// A slab for `len` bytes, awaiting (not blocking) while the pool is
    /// exhausted.
    async fn alloc(
        &self,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<shmesh_shm::pool::OwnedSlab, Status> {
        let inner = &self.channel.inner;
        loop {
            if let Some(slab) = inner.try_alloc(len)? {
                return Ok(slab);
            }
            if inner.is_dead() {
                return Err(inner.unavailable());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Status::deadline_exceeded(
                    "no free slab before the deadline (pool exhausted)",
                ));
            }
            // Slabs come back as the server answers; no event says so.
            tokio::time::sleep(Duration::from_micros(50)).await;
        }
    }

    async fn wait(&self, call_id: u64, deadline: Option<Instant>) -> Result<Answer, Status> {
        let inner: &Arc<Inner> = &self.channel.inner;
        let mut answer = None;
        self.wait_until(
            call_id,
            deadline,
            &mut |found| {
                if let Some(a) = found {
                    answer = Some(a);
                }
                if answer.is_none() {
                    answer = take_if_done(&mut lock(&inner.pending), call_id);
                }
                answer.is_some()
            },
            &|cx| park_on_call(inner, call_id, cx),
        )
        .await?;
        answer.ok_or_else(|| Status::internal("a unary call's answer went missing"))
    }

    /// Waits until `ready` holds for a streaming call's mailbox.
    async fn wait_mailbox(
        &self,
        call_id: u64,
        mailbox: &Mailbox,
        deadline: Option<Instant>,
        ready: &(dyn Fn(&MailboxState) -> bool + Sync),
    ) -> Result<(), Status> {
        self.wait_until(call_id, deadline, &mut |_| ready(&mailbox.lock()), &|cx| {
            let mut state = mailbox.lock();
            if ready(&state) {
                return false;
            }
            state.wait_with(Waiter::Task(Some(cx.waker().clone())));
            true
        })
        .await
    }

    /// The async wait of a call: checks `done` (given the answer a
    /// collection found for this call, if any); leads the collection of
    /// responses when nobody does, awaiting the eventfd; otherwise parks
    /// with `park` (which says whether it parked) until woken.
    async fn wait_until(
        &self,
        call_id: u64,
        deadline: Option<Instant>,
        done: &mut (dyn FnMut(Option<Answer>) -> bool + Send),
        park: &(dyn Fn(&mut std::task::Context<'_>) -> bool + Sync),
    ) -> Result<(), Status> {
        let inner: &Arc<Inner> = &self.channel.inner;
        let policy = inner.policy;
        // `None`: spin until the answer comes (Poll).
        let spin_until = match policy.mode {
            shmesh_shm::doorbell::WaitMode::Poll => None,
            // The runtime gets the thread back between looks in both.
            shmesh_shm::doorbell::WaitMode::Adaptive | shmesh_shm::doorbell::WaitMode::Yield => {
                Some(Instant::now() + policy.spin)
            }
            shmesh_shm::doorbell::WaitMode::Block => Some(Instant::now()),
        };
        loop {
            if done(None) {
                return Ok(());
            }
            if inner.is_dead() {
                return Err(inner.unavailable());
            }
            let now = Instant::now();
            if deadline.is_some_and(|t| now >= t) {
                return Err(Status::deadline_exceeded("no response before the deadline"));
            }
            let slice_end = deadline.map_or(now + LIVENESS_SLICE, |t| t.min(now + LIVENESS_SLICE));
            let leading = match inner.ends_recv.try_lock() {
                Ok(mut ring) => {
                    let found = inner.collect(&mut ring, call_id)?;
                    if done(found) {
                        drop(ring);
                        inner.promote_a_follower();
                        return Ok(());
                    }
                    // Spin first, as the blocking side does, but
                    // cooperatively: give the runtime back between looks, so
                    // other tasks run and a busy channel makes no system
                    // call.
                    if spin_until.is_none_or(|t| now < t) {
                        drop(ring);
                        None
                    } else {
                        // Announce, then look once more, then await the fd
                        // without holding the ring: the announcement makes the
                        // server ring the eventfd for anything pushed from now on.
                        inner.client_bell.announce();
                        let announced = Announced(&inner.client_bell);
                        if ring.has_pending_hint() || inner.is_dead() {
                            continue;
                        }
                        drop(ring);
                        Some(Some(announced))
                    }
                }
                Err(_) => Some(None),
            };
            let Some(leading) = leading else {
                tokio::task::yield_now().await;
                continue;
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
                    // Registered first, then looked again: a leader that
                    // left before the registration left the ring free.
                    let park_unless_free = |cx: &mut std::task::Context<'_>| {
                        park(cx) && inner.ends_recv.try_lock().is_err()
                    };
                    let _ = tokio::time::timeout_at(until, follow(&park_unless_free)).await;
                }
            }
        }
    }
}

/// Parks this task's waker until woken (by the leader handing over the
/// answer, or by a promotion to lead); `park` registers it, or says there
/// is no need.
async fn follow(park: &(dyn Fn(&mut std::task::Context<'_>) -> bool + Sync)) {
    let mut parked = false;
    std::future::poll_fn(|cx| {
        if parked || !park(cx) {
            return Poll::Ready(());
        }
        parked = true;
        Poll::Pending
    })
    .await
}

/// Registers a unary caller's waker on its call; `false` if the answer is
/// in already (or the call is gone).
fn park_on_call(inner: &Inner, call_id: u64, cx: &mut std::task::Context<'_>) -> bool {
    let mut pending = lock(&inner.pending);
    match pending.get_mut(&call_id) {
        Some(p) if matches!(p.state, CallState::Waiting(_)) => {
            p.state = CallState::Waiting(Waiter::Task(Some(cx.waker().clone())));
            true
        }
        _ => false,
    }
}

/// A streaming call for async callers: the async twin of [`Call`].
/// Dropping it before it ends cancels it.
pub struct AsyncCall {
    call: Call,
    channel: AsyncChannel,
}

impl std::fmt::Debug for AsyncCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AsyncCall").field(&self.call).finish()
    }
}

impl AsyncCall {
    /// Sends one message, copied into shared memory (in chunks if larger
    /// than a slab), awaiting the server's credit when the window is full.
    pub async fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        let open = !self.call.opened();
        self.send_message(message, open, false).await
    }

    /// Sends one message written in place into a loaned buffer.
    pub async fn send_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        self.call.adopt_metadata(&message)?;
        if let Some((_, bytes)) = message.heap() {
            return self.send(bytes).await;
        }
        let (head, len) = (message.head, message.len);
        match message.body {
            RequestBody::Slab(slab) => {
                let flags = self.call.loaned_flags(&slab, head)?;
                self.credit(flags).await?;
                self.call.push_loaned(slab, head + len, flags)
            }
            _ => self.send(&[]).await,
        }
    }

    async fn credit(&mut self, flags: shmesh_shm::descriptor::Flags) -> Result<(), Status> {
        while !self.call.try_take_credit(flags)? {
            let (call_id, mailbox, deadline) = self.call.waiting_on();
            let mailbox = mailbox.clone();
            self.channel
                .wait_mailbox(call_id, &mailbox, deadline, &|s| {
                    s.credit > 0 || s.peer_ended
                })
                .await?;
        }
        Ok(())
    }

    async fn send_message(&mut self, bytes: &[u8], open: bool, end: bool) -> Result<(), Status> {
        let block = self.call.take_block(open);
        for (range, flags) in self.call.plan(block.len(), bytes.len(), open, end)? {
            self.credit(flags).await?;
            let slab = match range.len() {
                0 => None,
                n => {
                    let (_, _, deadline) = self.call.waiting_on();
                    let mut slab = self.channel.alloc(n, deadline).await?;
                    fill_chunk(&mut slab[..n], &block, bytes, range.clone());
                    Some(slab)
                }
            };
            self.call.push_chunk(range.len(), flags, slab)?;
        }
        Ok(())
    }

    /// Sends the last message from a loaned buffer and closes the sending
    /// side in one descriptor (see [`Call::send_last_buf`]).
    pub async fn send_last_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        if let Some((_, bytes)) = message.heap() {
            self.call.adopt_metadata(&message)?;
            let open = !self.call.opened();
            return self.send_message(bytes, open, true).await;
        }
        // A slab (or nothing): the ending descriptor costs no credit.
        self.call.send_last_buf(message)
    }

    /// Closes the sending side (see [`Call::close_send`]).
    pub fn close_send(&mut self) -> Result<(), Status> {
        self.call.close_send()
    }

    /// The server's next message; `None` once the call has ended
    /// successfully, the call's status if it failed.
    pub async fn recv(&mut self) -> Result<Option<Response>, Status> {
        loop {
            if let Some(m) = self.call.try_recv()? {
                return Ok(m);
            }
            let (call_id, mailbox, deadline) = self.call.waiting_on();
            let mailbox = mailbox.clone();
            self.channel
                .wait_mailbox(call_id, &mailbox, deadline, &|s| !s.inbox.is_empty())
                .await?;
        }
    }

    /// Closes the sending side and returns the server's one response.
    pub async fn finish(mut self) -> Result<Response, Status> {
        self.close_send()?;
        self.recv_unary().await
    }

    async fn recv_unary(&mut self) -> Result<Response, Status> {
        let Some(message) = self.recv().await? else {
            return Err(Status::internal(
                "the server ended the call without a response",
            ));
        };
        match self.recv().await? {
            None => Ok(message),
            Some(_) => Err(Status::internal(
                "the server sent more than one response to a call expecting one",
            )),
        }
    }

    /// Messages received and not yet read (see [`Call::queued`]).
    pub fn queued(&self) -> usize {
        self.call.queued()
    }
}
