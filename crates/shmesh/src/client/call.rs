//! Streaming calls on the client: [`Call`], and the reading of a call's
//! mailbox that unary calls answered in chunks share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shmesh_shm::descriptor::{Descriptor, Flags};

use crate::client::{CallState, Inner, Pending, RequestBody, RequestBuf, Response, lock};
use crate::deadline;
use crate::mailbox::Mailbox;
use crate::metadata::Metadata;
use crate::protocol::{self, Assembler, CreditCounter, MESSAGE, METADATA, MORE, OPEN, RETURN};
use crate::status::{Code, Status};

/// Hands a server descriptor to a call's mailbox and wakes its reader.
pub(crate) fn deliver(mailbox: &Mailbox, d: Descriptor) {
    mailbox.update(|state| {
        if d.flags.contains(protocol::CREDIT) {
            state.credit = state.credit.saturating_add(protocol::granted(&d));
            return;
        }
        state.inbox.push_back(d);
        if d.flags.contains(Flags::END) {
            state.peer_ended = true;
        }
    });
}

/// Writes `range` of the metadata block and the message, end to end, into
/// `out` (exactly `range.len()` bytes).
pub(crate) fn fill_chunk(
    out: &mut [u8],
    block: &[u8],
    message: &[u8],
    range: std::ops::Range<usize>,
) {
    let head = block.len();
    let in_block = range.start.min(head)..range.end.min(head);
    let from_block = in_block.len();
    out[..from_block].copy_from_slice(&block[in_block]);
    let in_message = range.start.max(head) - head..range.end.max(head) - head;
    out[from_block..].copy_from_slice(&message[in_message]);
}

/// What reading a call's mailbox produced.
pub(crate) enum Event {
    /// A whole message.
    Message(Response),
    /// The call ended, with this status.
    End(Result<(), Status>),
}

/// Reads one call's mailbox: assembles chunked messages, grants credit as
/// messages are consumed, and gives back what nobody will read when
/// dropped.
pub(crate) struct Incoming {
    inner: Arc<Inner>,
    call_id: u64,
    pub(crate) mailbox: Arc<Mailbox>,
    assembling: Option<Assembler>,
    credits: CreditCounter,
    /// An end that arrived on the same descriptor as the last message.
    end_next: Option<Result<(), Status>>,
    ended: bool,
}

impl Incoming {
    pub(crate) fn new(inner: Arc<Inner>, call_id: u64, mailbox: Arc<Mailbox>) -> Self {
        Incoming {
            inner,
            call_id,
            mailbox,
            assembling: None,
            credits: CreditCounter::default(),
            end_next: None,
            ended: false,
        }
    }

    /// The next event, or `None` if the mailbox holds none yet.
    pub(crate) fn step(&mut self) -> Result<Option<Event>, Status> {
        if let Some(end) = self.end_next.take() {
            self.ended = true;
            return Ok(Some(Event::End(end)));
        }
        loop {
            let Some(d) = self.mailbox.lock().inbox.pop_front() else {
                return Ok(None);
            };
            let bytes: &[u8] = if d.flags.contains(Flags::PAYLOAD) {
                match self.inner.peer_pool.read(d.payload, d.len.into()) {
                    Ok(b) => b,
                    Err(e) => {
                        return Err(self.inner.broken(format!("server sent a bad handle: {e}")));
                    }
                }
            } else {
                &[]
            };
            let ends = d.flags.contains(Flags::END);
            if d.flags.contains(Flags::STATUS) && d.status != Code::Ok as u32 {
                let status = Status::decode(d.status, bytes).unwrap_or_else(|e| {
                    Status::internal(format!("undecodable status from server: {e}"))
                });
                self.inner.discard(&d);
                self.assembling = None;
                self.ended = true;
                return Ok(Some(Event::End(Err(status))));
            }
            if !d.flags.contains(MESSAGE) {
                self.inner.discard(&d);
                if ends {
                    self.ended = true;
                    return Ok(Some(Event::End(self.unfinished())));
                }
                continue;
            }
            if protocol::costs_credit(d.flags)
                && let Some(n) = self.credits.consumed()
                && !self.inner.is_dead()
            {
                self.inner.send_control(protocol::credit(self.call_id, n));
            }
            let message = if d.flags.contains(MORE) || self.assembling.is_some() {
                let limit = self.inner.max_message;
                let assembler = self.assembling.get_or_insert_with(|| Assembler::new(limit));
                let pushed = assembler.push(bytes);
                self.inner.discard(&d);
                if let Err(e) = pushed {
                    self.assembling = None;
                    self.ended = true;
                    // The server would go on sending: stop it.
                    self.inner.abandon(self.call_id);
                    self.mailbox.lock().peer_ended = true;
                    return Ok(Some(Event::End(Err(Status::resource_exhausted(format!(
                        "response: {e}"
                    ))))));
                }
                if d.flags.contains(MORE) {
                    if ends {
                        self.ended = true;
                        return Ok(Some(Event::End(self.unfinished())));
                    }
                    continue;
                }
                Response::owned(
                    self.assembling
                        .take()
                        .map(Assembler::finish)
                        .unwrap_or_default(),
                )
            } else {
                Response::shared(self.inner.clone(), d)
            };
            if ends {
                self.end_next = Some(Ok(()));
            }
            return Ok(Some(Event::Message(message)));
        }
    }

    /// The status of a call that ended: an error if it ended inside a
    /// message.
    fn unfinished(&mut self) -> Result<(), Status> {
        match self.assembling.take() {
            Some(_) => Err(Status::internal(
                "the server ended the call inside a message",
            )),
            None => Ok(()),
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let unread = std::mem::take(&mut self.mailbox.lock().inbox);
        for d in unread {
            self.inner.discard(&d);
        }
    }
}

/// A streaming call: send messages, close the sending side, receive
/// messages until the server ends the call.
///
/// One type serves the three kinds of streams: for server streaming, open
/// it with [`Channel::server_stream`](crate::client::Channel::server_stream)
/// and [`Call::recv`] until `None`; for client streaming,
/// [`Channel::open`](crate::client::Channel::open), [`Call::send`] each
/// message, then [`Call::finish`] for the response; bidirectional calls mix
/// both, from two threads if need be ([`Call::split`]). Sending waits while
/// the server has not granted credit (flow control), so a fast sender never
/// exhausts the pool. Dropping a call that has not ended cancels it: the
/// server's handler sees the cancellation.
///
/// ```no_run
/// # use shmesh::client::{Channel, ChannelOptions};
/// # let channel = Channel::connect("shm://@echo", &ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]))).unwrap();
/// let mut call = channel.open(7, None).unwrap();
/// for word in ["to", "be", "or", "not"] {
///     call.send(word.as_bytes()).unwrap();
/// }
/// let total = call.finish().unwrap();
/// # let _ = total;
/// ```
pub struct Call {
    incoming: Incoming,
    outgoing: Outgoing,
}

/// The sending side of a call: what [`CallSender`] borrows.
struct Outgoing {
    inner: Arc<Inner>,
    call_id: u64,
    /// The call's mailbox, where credit arrives.
    mailbox: Arc<Mailbox>,
    method: u32,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    /// Whether the opening descriptor says the call is a stream
    /// ([`protocol::STREAM`]); a unary call sent in chunks is not.
    stream: bool,
    /// Whether the opening descriptor has gone out.
    opened: bool,
    /// Whether our last message has gone out.
    send_closed: bool,
    /// The encoded metadata the opening descriptor is to carry (empty:
    /// none, or sent already).
    block: Vec<u8>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("call_id", &self.incoming.call_id)
            .field("method", &self.outgoing.method)
            .field("send_closed", &self.outgoing.send_closed)
            .field("ended", &self.incoming.ended)
            .finish()
    }
}

/// What kind of call [`Call::start`] registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A stream whose opening descriptor goes out at once, without a
    /// message ([`Channel::open`](crate::client::Channel::open)).
    OpenNow,
    /// A stream opened by its first message.
    OpenWithMessage,
    /// A unary call whose request goes in chunks.
    ChunkedUnary,
}

impl Call {
    /// Registers a call of `kind`.
    pub(crate) fn start(
        inner: &Arc<Inner>,
        method: u32,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
        kind: Kind,
    ) -> Result<Call, Status> {
        if inner.is_dead() {
            return Err(inner.unavailable());
        }
        let call_id = inner
            .next_call
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::default());
        lock(&inner.pending).insert(
            call_id,
            Pending {
                request: None,
                state: CallState::Streaming(mailbox.clone()),
            },
        );
        let mut call = Call {
            incoming: Incoming::new(inner.clone(), call_id, mailbox.clone()),
            outgoing: Outgoing {
                inner: inner.clone(),
                call_id,
                mailbox,
                method,
                timeout,
                deadline,
                stream: kind != Kind::ChunkedUnary,
                opened: false,
                send_closed: false,
                block: Vec::new(),
            },
        };
        if kind == Kind::OpenNow {
            call.outgoing.open_now()?;
        }
        Ok(call)
    }

    /// Sets the metadata the call opens with (before it has opened).
    pub(crate) fn set_metadata(&mut self, metadata: &Metadata) -> Result<(), Status> {
        let len = metadata.encoded_len();
        self.outgoing.inner.check_block(len)?;
        let mut block = vec![0; len];
        metadata.encode_into(&mut block);
        self.set_block(block);
        Ok(())
    }

    /// Sets the encoded metadata block the call opens with.
    pub(crate) fn set_block(&mut self, block: Vec<u8>) {
        self.outgoing.block = block;
    }

    /// Sends the opening descriptor without a message (with the metadata,
    /// if the call has some).
    pub(crate) fn open_now(&mut self) -> Result<(), Status> {
        self.outgoing.open_now()
    }

    /// Takes over a unary call whose answer comes in chunks.
    pub(crate) fn resume(
        inner: &Arc<Inner>,
        call_id: u64,
        mailbox: Arc<Mailbox>,
        deadline: Option<Instant>,
    ) -> Call {
        Call {
            incoming: Incoming::new(inner.clone(), call_id, mailbox.clone()),
            outgoing: Outgoing {
                inner: inner.clone(),
                call_id,
                mailbox,
                method: 0,
                timeout: None,
                deadline,
                stream: false,
                opened: true,
                send_closed: true,
                block: Vec::new(),
            },
        }
    }

    /// Whether the opening descriptor has gone out.
    pub(crate) fn opened(&self) -> bool {
        self.outgoing.opened
    }

    /// Sends one message, copied into shared memory (in chunks if it is
    /// larger than a slab).
    pub fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        self.outgoing.send(message)
    }

    /// Sends one message written in place into a buffer from
    /// [`Channel::loan`](crate::client::Channel::loan): no copy.
    pub fn send_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        self.outgoing.send_buf(message)
    }

    /// Sends the last message, written in place into a loaned buffer, and
    /// closes the sending side in the same descriptor: no copy, one
    /// descriptor fewer than [`Call::send_buf`] then [`Call::close_send`].
    pub fn send_last_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        self.outgoing.send_last_buf(message)
    }

    /// Gets a loaned buffer's metadata ready to go (see
    /// `Outgoing::adopt_metadata`).
    pub(crate) fn adopt_metadata(&mut self, message: &RequestBuf) -> Result<(), Status> {
        self.outgoing.adopt_metadata(message)
    }

    /// Checks a loaned buffer (with a metadata block of `head` bytes ahead
    /// of its message) can go on this call; the flags it goes with.
    pub(crate) fn loaned_flags(
        &self,
        slab: &shmesh_shm::pool::OwnedSlab,
        head: usize,
    ) -> Result<Flags, Status> {
        self.outgoing.loaned_flags(slab, head)
    }

    /// Sends a loaned buffer of `len` bytes (its credit already taken).
    pub(crate) fn push_loaned(
        &mut self,
        slab: shmesh_shm::pool::OwnedSlab,
        len: usize,
        flags: Flags,
    ) -> Result<(), Status> {
        self.outgoing.push_loaned(slab, len, flags)
    }

    /// Sends `bytes` as one message; `open` puts the opening flag on its
    /// first descriptor, `end` the ending flag on its last.
    pub(crate) fn send_message(
        &mut self,
        bytes: &[u8],
        open: bool,
        end: bool,
    ) -> Result<(), Status> {
        self.outgoing.send_message(bytes, open, end)
    }

    /// The metadata block to send ahead of a message: the call's, if the
    /// message opens the call.
    pub(crate) fn take_block(&mut self, open: bool) -> Vec<u8> {
        self.outgoing.take_block(open)
    }

    /// The chunks a `len`-byte message behind a `head`-byte metadata block
    /// goes out as (ranges of block and message end to end), with their
    /// flags.
    pub(crate) fn plan(
        &self,
        head: usize,
        len: usize,
        open: bool,
        end: bool,
    ) -> Result<impl Iterator<Item = (std::ops::Range<usize>, Flags)> + use<>, Status> {
        self.outgoing.plan(head, len, open, end)
    }

    /// Takes the credit a descriptor with `flags` costs, if the server has
    /// granted it; `false` if the caller must wait for a grant.
    pub(crate) fn try_take_credit(&mut self, flags: Flags) -> Result<bool, Status> {
        self.outgoing.try_take_credit(flags)
    }

    /// Sends one chunk of `len` bytes written into `slab` (none for an
    /// empty chunk).
    pub(crate) fn push_chunk(
        &mut self,
        len: usize,
        flags: Flags,
        slab: Option<shmesh_shm::pool::OwnedSlab>,
    ) -> Result<(), Status> {
        self.outgoing.push_chunk(len, flags, slab)
    }

    /// Closes the sending side: the server's handler sees the end of the
    /// client's messages. Further sends fail.
    pub fn close_send(&mut self) -> Result<(), Status> {
        self.outgoing.close_send()
    }

    /// The next message if one is in: `Some(None)` once the call has ended
    /// successfully, `None` if the caller must wait.
    pub(crate) fn try_recv(&mut self) -> Result<Option<Option<Response>>, Status> {
        self.incoming.try_recv()
    }

    /// The call's id and mailbox, for a front-end that waits on it.
    pub(crate) fn waiting_on(&self) -> (u64, &Arc<Mailbox>, Option<Instant>) {
        (
            self.incoming.call_id,
            &self.incoming.mailbox,
            self.outgoing.deadline,
        )
    }

    /// The server's next message, waiting for it; `None` once the server
    /// has ended the call successfully, the call's status if it failed.
    pub fn recv(&mut self) -> Result<Option<Response>, Status> {
        self.incoming.recv(self.outgoing.deadline)
    }

    /// Closes the sending side and returns the server's one response (a
    /// client-streaming call's answer).
    pub fn finish(mut self) -> Result<Response, Status> {
        self.close_send()?;
        self.recv_unary()
    }

    /// Receives exactly one message, then the end.
    pub(crate) fn recv_unary(&mut self) -> Result<Response, Status> {
        let Some(message) = self.recv()? else {
            return Err(Status::internal(
                "the server ended the call without a response",
            ));
        };
        match self.recv()? {
            None => Ok(message),
            Some(_) => Err(Status::internal(
                "the server sent more than one response to a call expecting one",
            )),
        }
    }

    /// Descriptors received for this call and not yet read. Flow control
    /// keeps it within [`protocol::WINDOW`] (plus the call's end) however
    /// fast the server sends.
    pub fn queued(&self) -> usize {
        self.incoming.mailbox.lock().inbox.len()
    }

    /// Parts the call into its receiving and its sending half, so two
    /// threads can receive and send at once (a bidirectional call that
    /// reads the server's messages while it writes its own, or a proxy
    /// pumping both ways).
    ///
    /// The halves borrow the call, which still owns its end: dropping it
    /// before the server ended the call cancels the call, as ever. A half
    /// may [`cancel`](CallSender::cancel) the call for both: the server's
    /// handler sees the cancellation, and the receiving half the call's
    /// end, so a thread blocked on the other half is released.
    ///
    /// ```no_run
    /// # use shmesh::client::{Channel, ChannelOptions};
    /// # let channel = Channel::connect("shm://@echo", &ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]))).unwrap();
    /// let mut call = channel.open(3, None).unwrap();
    /// let (mut incoming, mut outgoing) = call.split();
    /// std::thread::scope(|s| {
    ///     s.spawn(move || {
    ///         for i in 0..100u32 {
    ///             outgoing.send(&i.to_le_bytes())?;
    ///         }
    ///         outgoing.close_send()
    ///     });
    ///     while let Some(echo) = incoming.recv().unwrap() {
    ///         println!("{} bytes", echo.len());
    ///     }
    /// });
    /// ```
    pub fn split(&mut self) -> (CallReceiver<'_>, CallSender<'_>) {
        let deadline = self.outgoing.deadline;
        (
            CallReceiver {
                incoming: &mut self.incoming,
                deadline,
            },
            CallSender {
                outgoing: &mut self.outgoing,
            },
        )
    }

    /// Cancels the call: the server's handler sees it, and no more messages
    /// are delivered. Dropping an unfinished call does the same.
    pub fn cancel(self) {}
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.incoming.ended {
            self.incoming.inner.abandon(self.incoming.call_id);
        }
    }
}

/// The receiving half of a [`Call`] ([`Call::split`]).
pub struct CallReceiver<'a> {
    incoming: &'a mut Incoming,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for CallReceiver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallReceiver")
            .field("call_id", &self.incoming.call_id)
            .field("ended", &self.incoming.ended)
            .finish()
    }
}

impl CallReceiver<'_> {
    /// The server's next message, waiting for it (see [`Call::recv`]).
    pub fn recv(&mut self) -> Result<Option<Response>, Status> {
        self.incoming.recv(self.deadline)
    }

    /// Tells the server the caller gives up (see [`CallSender::cancel`]).
    pub fn cancel(&self) {
        cancel(&self.incoming.inner, self.incoming.call_id);
    }
}

/// The sending half of a [`Call`] ([`Call::split`]).
pub struct CallSender<'a> {
    outgoing: &'a mut Outgoing,
}

impl std::fmt::Debug for CallSender<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSender")
            .field("call_id", &self.outgoing.call_id)
            .field("send_closed", &self.outgoing.send_closed)
            .finish()
    }
}

impl CallSender<'_> {
    /// Sends one message, copied into shared memory (see [`Call::send`]).
    pub fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        self.outgoing.send(message)
    }

    /// Sends one message written in place (see [`Call::send_buf`]).
    pub fn send_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        self.outgoing.send_buf(message)
    }

    /// Sends the last message and closes the sending side in one
    /// descriptor (see [`Call::send_last_buf`]).
    pub fn send_last_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        self.outgoing.send_last_buf(message)
    }

    /// Closes the sending side (see [`Call::close_send`]).
    pub fn close_send(&mut self) -> Result<(), Status> {
        self.outgoing.close_send()
    }

    /// Tells the server the caller gives up, without giving up the call:
    /// the server's handler sees the cancellation and ends the call
    /// (`Cancelled`, unless it ended already), which the receiving half
    /// then receives as its end. A thread blocked receiving or waiting for
    /// credit on the other half is released by that end; a server that
    /// never ends the call holds it until its deadline (or until the
    /// [`Call`] is dropped).
    pub fn cancel(&self) {
        cancel(&self.outgoing.inner, self.outgoing.call_id);
    }
}

/// Sends `CANCEL` for `call_id`, keeping the call registered so that the
/// server's end still reaches whoever waits on it.
fn cancel(inner: &Inner, call_id: u64) {
    if !inner.is_dead() {
        inner.send_control(protocol::cancel(call_id));
    }
}

impl Outgoing {
    fn descriptor(&self, flags: Flags) -> Descriptor {
        let mut d = Descriptor {
            call_id: self.call_id,
            method_id: self.method,
            flags,
            ..Default::default()
        };
        if flags.contains(OPEN) {
            d.deadline_ns = deadline::to_wire(self.timeout);
            if self.stream {
                d.flags = d.flags | protocol::STREAM;
            }
        }
        d
    }

    fn push(&self, d: Descriptor) -> Result<(), Status> {
        self.inner.push_request(d, self.deadline)?;
        self.inner.ring_server();
        Ok(())
    }

    fn open_now(&mut self) -> Result<(), Status> {
        self.push_bare(OPEN)?;
        self.opened = true;
        Ok(())
    }

    /// Pushes a descriptor without a message; an opening one carries the
    /// call's metadata block, alone in a slab the server gives back.
    fn push_bare(&mut self, flags: Flags) -> Result<(), Status> {
        let mut d = self.descriptor(flags);
        if !flags.contains(OPEN) || self.block.is_empty() {
            return self.push(d);
        }
        self.inner.check_block(self.block.len())?;
        let mut slab = self.inner.alloc(self.block.len(), self.deadline)?;
        slab[..self.block.len()].copy_from_slice(&self.block);
        d.flags = d.flags | METADATA | Flags::PAYLOAD | RETURN;
        d.len = self.block.len() as u32;
        d.payload = slab.send();
        if let Err(status) = self.push(d) {
            // Never published: take the slab back.
            let _ = self.inner.pool.release_returned(d.payload);
            return Err(status);
        }
        self.block = Vec::new();
        Ok(())
    }

    /// Gets a loaned buffer's metadata ready to go: a buffer carrying
    /// metadata may only open its call (and one that has none of its own);
    /// a buffer without metadata, on a call whose metadata waits to go,
    /// follows a bare opening that carries it.
    fn adopt_metadata(&mut self, message: &RequestBuf) -> Result<(), Status> {
        if message.head > 0 {
            if self.opened || !self.block.is_empty() {
                return Err(Status::invalid_argument(
                    "a buffer loaned with metadata can only open a call without metadata of its own",
                ));
            }
            if let RequestBody::Heap(bytes) = &message.body {
                // Sent in chunks: the block goes ahead of the first.
                self.block = bytes[..message.head].to_vec();
            }
            return Ok(());
        }
        if !self.opened && !self.block.is_empty() && matches!(message.body, RequestBody::Slab(_)) {
            self.check_open_for_sending()?;
            self.open_now()?;
        }
        Ok(())
    }

    /// The metadata block to send ahead of a message: the call's, if the
    /// message opens the call.
    fn take_block(&mut self, open: bool) -> Vec<u8> {
        if open {
            std::mem::take(&mut self.block)
        } else {
            Vec::new()
        }
    }

    fn send(&mut self, message: &[u8]) -> Result<(), Status> {
        self.send_message(message, !self.opened, false)
    }

    fn send_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        self.adopt_metadata(&message)?;
        match message.body {
            RequestBody::Slab(slab) => {
                let flags = self.loaned_flags(&slab, message.head)?;
                self.take_credit(flags)?;
                self.push_loaned(slab, message.head + message.len, flags)
            }
            RequestBody::Heap(bytes) => self.send(&bytes[message.head..]),
            RequestBody::Empty => self.send(&[]),
        }
    }

    fn send_last_buf(&mut self, message: RequestBuf) -> Result<(), Status> {
        self.adopt_metadata(&message)?;
        match message.body {
            RequestBody::Slab(slab) => {
                let flags = self.loaned_flags(&slab, message.head)? | Flags::END;
                self.take_credit(flags)?;
                self.push_loaned(slab, message.head + message.len, flags)?;
                self.send_closed = true;
                Ok(())
            }
            RequestBody::Heap(bytes) => {
                self.send_message(&bytes[message.head..], !self.opened, true)
            }
            RequestBody::Empty => self.send_message(&[], !self.opened, true),
        }
    }

    fn loaned_flags(
        &self,
        slab: &shmesh_shm::pool::OwnedSlab,
        head: usize,
    ) -> Result<Flags, Status> {
        self.check_open_for_sending()?;
        if !slab.is_from(&self.inner.pool) {
            return Err(Status::invalid_argument(
                "message buffer loaned from another channel",
            ));
        }
        let mut flags = MESSAGE | RETURN;
        if !self.opened {
            flags = flags | OPEN;
        }
        if head > 0 {
            flags = flags | METADATA;
        }
        Ok(flags)
    }

    fn push_loaned(
        &mut self,
        slab: shmesh_shm::pool::OwnedSlab,
        len: usize,
        flags: Flags,
    ) -> Result<(), Status> {
        let mut d = self.descriptor(flags | Flags::PAYLOAD);
        d.len = len as u32;
        d.payload = slab.send();
        if let Err(status) = self.push(d) {
            // Never published: take the slab back.
            let _ = self.inner.pool.release_returned(d.payload);
            return Err(status);
        }
        self.opened = true;
        Ok(())
    }

    fn check_open_for_sending(&self) -> Result<(), Status> {
        if self.send_closed {
            return Err(Status::failed_precondition(
                "the call's sending side is closed",
            ));
        }
        // The receiving side marks the call ended here too when it ends it
        // on its own (an oversized answer).
        if self.mailbox.lock().peer_ended {
            return Err(Status::failed_precondition("the server has ended the call"));
        }
        Ok(())
    }

    fn send_message(&mut self, bytes: &[u8], open: bool, end: bool) -> Result<(), Status> {
        let block = self.take_block(open);
        for (range, flags) in self.plan(block.len(), bytes.len(), open, end)? {
            self.take_credit(flags)?;
            let slab = match range.len() {
                0 => None,
                n => {
                    let mut slab = self.inner.alloc(n, self.deadline)?;
                    fill_chunk(&mut slab[..n], &block, bytes, range.clone());
                    Some(slab)
                }
            };
            self.push_chunk(range.len(), flags, slab)?;
        }
        Ok(())
    }

    /// Borrows nothing, so that the caller may send while it iterates (and
    /// allocates nothing per message).
    fn plan(
        &self,
        head: usize,
        len: usize,
        open: bool,
        end: bool,
    ) -> Result<impl Iterator<Item = (std::ops::Range<usize>, Flags)> + use<>, Status> {
        self.check_open_for_sending()?;
        self.inner.check_size(len)?;
        // The block must sit whole in the first chunk, the opening one.
        self.inner.check_block(head)?;
        let mut first = if open { OPEN } else { Flags(0) };
        if head > 0 {
            first = first | METADATA;
        }
        let last = if end { Flags::END } else { Flags(0) };
        Ok(protocol::plan(
            head + len,
            self.inner.max_slab,
            RETURN,
            first,
            last,
        ))
    }

    fn try_take_credit(&mut self, flags: Flags) -> Result<bool, Status> {
        if !protocol::costs_credit(flags) {
            return Ok(true);
        }
        let mut state = self.mailbox.lock();
        if state.credit > 0 {
            state.credit -= 1;
            return Ok(true);
        }
        if state.peer_ended {
            return Err(Status::failed_precondition("the server has ended the call"));
        }
        Ok(false)
    }

    fn push_chunk(
        &mut self,
        len: usize,
        flags: Flags,
        slab: Option<shmesh_shm::pool::OwnedSlab>,
    ) -> Result<(), Status> {
        let mut d = self.descriptor(flags);
        if let Some(slab) = slab {
            d.flags = d.flags | Flags::PAYLOAD;
            d.len = len as u32;
            d.payload = slab.send();
        }
        if let Err(status) = self.push(d) {
            if d.flags.contains(Flags::PAYLOAD) {
                // Never published: the slab is still ours.
                let _ = self.inner.pool.release_returned(d.payload);
            }
            return Err(status);
        }
        self.opened = true;
        if flags.contains(Flags::END) {
            self.send_closed = true;
        }
        Ok(())
    }

    /// Takes the credit a descriptor with `flags` costs, waiting for the
    /// server to grant it.
    fn take_credit(&mut self, flags: Flags) -> Result<(), Status> {
        let inner = self.inner.clone();
        while !self.try_take_credit(flags)? {
            inner.wait_mailbox(self.call_id, &self.mailbox, self.deadline, &|s| {
                s.credit > 0 || s.peer_ended
            })?;
        }
        Ok(())
    }

    fn close_send(&mut self) -> Result<(), Status> {
        if self.send_closed {
            return Ok(());
        }
        let mut flags = Flags::END;
        if !self.opened {
            flags = flags | OPEN;
        }
        self.push_bare(flags)?;
        self.opened = true;
        self.send_closed = true;
        Ok(())
    }
}

impl Incoming {
    /// The next message if one is in: `Some(None)` once the call has ended
    /// successfully, `None` if the caller must wait.
    fn try_recv(&mut self) -> Result<Option<Option<Response>>, Status> {
        if self.ended {
            return Ok(Some(None));
        }
        match self.step()? {
            Some(Event::Message(m)) => Ok(Some(Some(m))),
            Some(Event::End(result)) => result.map(|()| Some(None)),
            None => Ok(None),
        }
    }

    fn recv(&mut self, deadline: Option<Instant>) -> Result<Option<Response>, Status> {
        loop {
            match self.try_recv()? {
                Some(m) => return Ok(m),
                None => {
                    let inner = self.inner.clone();
                    inner.wait_mailbox(self.call_id, &self.mailbox, deadline, &|s| {
                        !s.inbox.is_empty()
                    })?;
                }
            }
        }
    }
}
