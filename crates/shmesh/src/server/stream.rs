//! What a streaming handler holds: the client's messages coming in, its own
//! going out, under flow control.

use std::sync::Arc;
use std::time::Duration;

use shmesh_shm::descriptor::{Descriptor, Flags};

use crate::deadline;
use crate::mailbox::{Mailbox, MailboxState, Waiter};
use crate::metadata::Metadata;
use crate::protocol::{self, CreditCounter, MESSAGE, MORE, OPEN, RETURN};
use crate::server::link::{Assembly, Gone, LIVENESS_SLICE, Link, ended};
use crate::server::loan::ReplyBuf;
use crate::socket::PeerCredentials;
use crate::status::Status;

/// How long a blocking stream handler spins for the client's next message
/// before it parks.
const STREAM_SPIN: Duration = Duration::from_micros(20);

/// A message from the client: derefs to its bytes, read in place in shared
/// memory (or assembled, if it came in chunks), and gives its slab back
/// when dropped.
pub struct Message {
    body: Body,
}

enum Body {
    /// In place, from `skip` on (past the call's metadata block).
    Shared {
        link: Arc<Link>,
        d: Descriptor,
        skip: usize,
    },
    Owned(Vec<u8>),
}

impl Message {
    pub(crate) fn owned(bytes: Vec<u8>) -> Self {
        Message {
            body: Body::Owned(bytes),
        }
    }
}

impl std::ops::Deref for Message {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.body {
            // Checked when the message was received.
            Body::Shared { link, d, skip } => link
                .peer_pool
                .read(d.payload, d.len.into())
                .ok()
                .and_then(|bytes| bytes.get(*skip..))
                .unwrap_or(&[]),
            Body::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message").field("len", &self.len()).finish()
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Body::Shared { link, d, .. } = &self.body
            && d.flags.contains(RETURN)
        {
            link.give_back(d.payload);
        }
    }
}

/// The receiving and sending state of one call served off the connection's
/// thread; shared by the blocking and the async stream.
pub(crate) struct CallEnd {
    pub link: Arc<Link>,
    pub mailbox: Arc<Mailbox>,
    pub call_id: u64,
    pub method: u32,
    pub deadline_ns: u64,
    /// The call's metadata, checked when it opened.
    pub metadata: Metadata,
    /// The length of the metadata block that starts the opening
    /// descriptor's payload (checked against it when the call opened).
    skip: usize,
    assembling: Option<Assembly>,
    credits: CreditCounter,
    pub started: std::time::Instant,
}

/// What looking at the mailbox came to.
pub(crate) enum Step {
    /// A message, or `None`: the client sends no more.
    Ready(Option<Message>),
    /// Nothing yet: wait for news.
    Wait,
}

impl CallEnd {
    pub(crate) fn new(
        link: Arc<Link>,
        mailbox: Arc<Mailbox>,
        first: &Descriptor,
        metadata: Metadata,
        skip: usize,
    ) -> Self {
        CallEnd {
            link,
            mailbox,
            call_id: first.call_id,
            method: first.method_id,
            deadline_ns: first.deadline_ns,
            metadata,
            skip,
            assembling: None,
            credits: CreditCounter::default(),
            started: std::time::Instant::now(),
        }
    }

    /// Takes what the mailbox has towards the next message. With
    /// `wait_as`, registers that waiter when it must wait.
    pub(crate) fn step(&mut self, wait_as: impl FnOnce() -> Waiter) -> Result<Step, Status> {
        let mut grant = None;
        let mut broken = None;
        let step = {
            let mailbox = self.mailbox.clone();
            let mut state = mailbox.lock();
            self.take(&mut state, &mut grant, &mut broken, wait_as)
        };
        // Not under the mailbox's lock: breaking off cancels every call,
        // this one included.
        if let Some(why) = broken {
            self.link.break_off(why);
        }
        if let Some(n) = grant {
            self.link.push(protocol::credit(self.call_id, n))?;
        }
        step
    }

    fn take(
        &mut self,
        state: &mut MailboxState,
        grant: &mut Option<u32>,
        broken: &mut Option<String>,
        wait_as: impl FnOnce() -> Waiter,
    ) -> Result<Step, Status> {
        loop {
            let Some(d) = state.inbox.pop_front() else {
                if state.cancelled {
                    return Err(Status::cancelled("the client cancelled the call"));
                }
                if state.finished {
                    // Read from a half that outlived its handler.
                    return Err(ended());
                }
                if state.peer_ended {
                    if self.assembling.take().is_some() {
                        return Err(Status::internal(
                            "the client's stream ended inside a message",
                        ));
                    }
                    return Ok(Step::Ready(None));
                }
                if self.link.is_dead() {
                    return Err(Gone.into());
                }
                state.wait_with(wait_as());
                return Ok(Step::Wait);
            };
            if protocol::costs_credit(d.flags)
                && let Some(n) = self.credits.consumed()
            {
                *grant = Some(grant.unwrap_or(0) + n);
            }
            let skip = if d.flags.contains(OPEN) {
                std::mem::take(&mut self.skip)
            } else {
                0
            };
            let bytes: &[u8] = if d.flags.contains(Flags::PAYLOAD) {
                match self.link.peer_pool.read(d.payload, d.len.into()) {
                    Ok(b) => b.get(skip..).unwrap_or(&[]),
                    Err(e) => {
                        *broken = Some(format!("call {}: {e}", d.call_id));
                        return Err(Gone.into());
                    }
                }
            } else {
                &[]
            };
            if d.flags.contains(MORE) || self.assembling.is_some() {
                let link = self.link.clone();
                let assembly = self.assembling.get_or_insert_with(|| Assembly::new(&link));
                let pushed = assembly.push(bytes);
                self.link.discard(&d)?;
                pushed?;
                if d.flags.contains(MORE) {
                    continue;
                }
                let whole = self.assembling.take().map(Assembly::finish);
                return Ok(Step::Ready(Some(Message::owned(whole.unwrap_or_default()))));
            }
            if d.flags.contains(Flags::PAYLOAD) {
                return Ok(Step::Ready(Some(Message {
                    body: Body::Shared {
                        link: self.link.clone(),
                        d,
                        skip,
                    },
                })));
            }
            return Ok(Step::Ready(Some(Message::owned(Vec::new()))));
        }
    }

    /// What ending the call takes, to keep when the end itself is moved
    /// into a handler.
    pub(crate) fn done(&self) -> CallDone {
        CallDone {
            link: self.link.clone(),
            mailbox: self.mailbox.clone(),
            call_id: self.call_id,
            method: self.method,
            deadline_ns: self.deadline_ns,
            started: self.started,
        }
    }
}

/// Ends a call served off the connection's thread.
pub(crate) struct CallDone {
    pub link: Arc<Link>,
    pub mailbox: Arc<Mailbox>,
    pub call_id: u64,
    pub method: u32,
    pub deadline_ns: u64,
    pub started: std::time::Instant,
}

impl CallDone {
    /// Ends the call with `result` unless it has ended already, gives back
    /// whatever the client sent that nobody read, and forgets the call.
    pub(crate) fn finish(&self, result: Result<(), Status>) {
        let (cancelled, unread) = {
            let mut state = self.mailbox.lock();
            let already = std::mem::replace(&mut state.finished, true);
            if already {
                return;
            }
            // Whoever still waits on the call (a half of it in another
            // task) learns it has ended.
            self.mailbox.wake_all(&mut state);
            (state.cancelled, std::mem::take(&mut state.inbox))
        };
        for d in unread {
            if self.link.discard(&d).is_err() {
                break;
            }
        }
        let result = match result {
            Ok(()) if cancelled => Err(Status::cancelled("the client cancelled the call")),
            other => deadline::enforce(other, self.deadline_ns),
        };
        let code = result
            .as_ref()
            .err()
            .map_or(crate::status::Code::Ok, Status::code);
        let end = match result {
            Ok(()) => Descriptor {
                call_id: self.call_id,
                method_id: self.method,
                flags: Flags::END,
                ..Default::default()
            },
            Err(status) => self
                .link
                .status_descriptor(self.call_id, self.method, &status),
        };
        // A dead client takes the end with it.
        let _ = self.link.push(end);
        self.link.record(self.method, code, self.started.elapsed());
        self.link.unregister(self.call_id);
    }
}

/// A streaming call as its blocking handler sees it: receive the client's
/// messages, send yours, then return the call's status.
///
/// Server streaming, client streaming and bidirectional calls all use it:
/// a server-streaming handler receives one message and sends many, a
/// client-streaming one receives until `None` and sends one.
pub struct ServerStream {
    pub(crate) end: CallEnd,
}

impl std::fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStream")
            .field("call_id", &self.end.call_id)
            .field("method", &self.end.method)
            .finish_non_exhaustive()
    }
}

impl ServerStream {
    /// The method called.
    pub fn method(&self) -> u32 {
        self.end.method
    }

    /// Who called.
    pub fn peer(&self) -> PeerCredentials {
        self.end.link.peer
    }

    /// The metadata the caller opened the call with (empty if none).
    pub fn metadata(&self) -> &Metadata {
        &self.end.metadata
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        deadline::remaining(self.end.deadline_ns)
    }

    /// Whether the client cancelled the call (it went away or gave up):
    /// a long handler should check now and then and stop.
    pub fn is_cancelled(&self) -> bool {
        self.end.mailbox.is_cancelled()
    }

    /// The client's next message, waiting for it; `None` once the client
    /// has sent its last. `Cancelled` if the client cancels meanwhile.
    pub fn recv(&mut self) -> Result<Option<Message>, Status> {
        loop {
            let seen = self.end.mailbox.news();
            match self.end.step(|| Waiter::Thread(std::thread::current()))? {
                Step::Ready(m) => return Ok(m),
                Step::Wait => {
                    // Spin a little first: the next message of a busy
                    // stream is usually microseconds away, a park and wake
                    // tens of them.
                    if !self.end.mailbox.spin_for_news(seen, STREAM_SPIN) {
                        std::thread::park_timeout(LIVENESS_SLICE);
                    }
                }
            }
        }
    }

    /// Sends one message to the client, copied into shared memory (in
    /// chunks if larger than a slab), waiting while the client has not
    /// granted the credit for it. [`ServerStream::loan`] and
    /// [`ServerStream::send_buf`] send without the copy.
    pub fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        let end = &self.end;
        end.link
            .send_blocking(&end.mailbox, end.call_id, end.method, message, false)
    }

    /// Loans a buffer of `len` bytes in shared memory to write the next
    /// message into, in place, then send with [`ServerStream::send_buf`];
    /// waits while the pool is exhausted (the client still holds the
    /// slabs of earlier messages). Any size up to the connection's message
    /// limit (`ResourceExhausted` above): above the largest slab the buffer
    /// is on the heap and goes in chunks (see [`ReplyBuf`]).
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// let router = Router::new().route_stream(2, |call| {
    ///     for i in 0..3u8 {
    ///         let mut message = call.loan(1024)?;
    ///         message.fill(i);
    ///         call.send_buf(message)?;
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn loan(&self, len: usize) -> Result<ReplyBuf, Status> {
        self.end.link.loan_blocking(&self.end.mailbox, len)
    }

    /// Sends a message written in place into a buffer from
    /// [`ServerStream::loan`]: the client reads the very bytes written,
    /// once it has granted the credit for them (this waits for it).
    pub fn send_buf(&mut self, message: ReplyBuf) -> Result<(), Status> {
        let end = &self.end;
        end.link
            .send_buf_blocking(&end.mailbox, end.call_id, end.method, message, false)
    }

    /// A handle that sends on this call from another thread while this
    /// one receives: a bidirectional handler that answers while it reads,
    /// or a proxy pumping both ways. It can also end the call early
    /// ([`StreamSender::end`]).
    ///
    /// A sender outlives neither the call nor its cancellation: once the
    /// call has ended its sends fail (`FailedPrecondition`, or `Cancelled`
    /// if the client cancelled), and nothing it sends follows the call's
    /// end.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// // Send ten messages while counting the bytes that come in.
    /// let router = Router::new().route_stream(3, |call| {
    ///     let mut outgoing = call.sender();
    ///     std::thread::scope(|s| {
    ///         let sending = s.spawn(move || {
    ///             for i in 0..10u8 {
    ///                 outgoing.send(&[i; 64])?;
    ///             }
    ///             Ok(())
    ///         });
    ///         let mut bytes = 0;
    ///         while let Some(message) = call.recv()? {
    ///             bytes += message.len();
    ///         }
    ///         let _ = bytes;
    ///         sending.join().unwrap_or(Ok(()))
    ///     })
    /// });
    /// ```
    pub fn sender(&self) -> StreamSender {
        StreamSender {
            done: self.end.done(),
        }
    }

    /// Waits until the client cancels the call or goes away (`true`), or
    /// until the call ends otherwise (`false`: another thread ended it with
    /// [`StreamSender::end`]). For a handler with nothing left to receive
    /// that must still notice a cancellation while another thread works.
    pub fn wait_cancelled(&self) -> bool {
        let end = &self.end;
        loop {
            {
                let mut state = end.mailbox.lock();
                if state.cancelled || end.link.is_dead() {
                    return true;
                }
                if state.finished {
                    return false;
                }
                state.wait_with(Waiter::Thread(std::thread::current()));
            }
            // Woken by the change; the timeout is a backstop against a
            // wake-up lost to a spurious one.
            std::thread::park_timeout(LIVENESS_SLICE);
        }
    }
}

/// Sends on a streaming call from a thread other than its handler's
/// ([`ServerStream::sender`]).
pub struct StreamSender {
    done: CallDone,
}

impl std::fmt::Debug for StreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender")
            .field("call_id", &self.done.call_id)
            .field("method", &self.done.method)
            .finish_non_exhaustive()
    }
}

impl StreamSender {
    /// Sends one message, copied into shared memory (see
    /// [`ServerStream::send`]).
    pub fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        let d = &self.done;
        d.link
            .send_blocking(&d.mailbox, d.call_id, d.method, message, false)
    }

    /// Loans a buffer to write the next message into, in place (see
    /// [`ServerStream::loan`]).
    pub fn loan(&self, len: usize) -> Result<ReplyBuf, Status> {
        self.done.link.loan_blocking(&self.done.mailbox, len)
    }

    /// Sends a message written in place into a buffer from
    /// [`StreamSender::loan`] (see [`ServerStream::send_buf`]).
    pub fn send_buf(&mut self, message: ReplyBuf) -> Result<(), Status> {
        let d = &self.done;
        d.link
            .send_buf_blocking(&d.mailbox, d.call_id, d.method, message, false)
    }

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.done.mailbox.is_cancelled()
    }

    /// Ends the call now with `result`, as the handler returning it would
    /// (a proxy whose upstream ended the call while its client still
    /// sends): the client gets the status, the handler's further receives
    /// and sends fail, and whoever waits on the call is woken. The
    /// handler's own result is then ignored. Does nothing if the call has
    /// ended already.
    pub fn end(self, result: Result<(), Status>) {
        self.done.finish(result);
    }
}

/// Descriptor flags of a message the dispatcher delivers to a mailbox.
pub(crate) fn is_message(d: &Descriptor) -> bool {
    d.flags.contains(MESSAGE)
}
