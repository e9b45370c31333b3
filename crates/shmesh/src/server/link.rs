//! The sending side of one connection, shared by its thread, the worker
//! threads and the tasks that run its handlers.
//!
//! Only one thread may push to an SPSC ring at a time, so the response ring
//! and the return ring sit behind mutexes here; the connection's thread
//! takes them uncontended on the fast path. Everything that can block (a
//! full ring, an exhausted pool, no credit) gives up once the connection is
//! dead, so no handler outlives its client by more than its own work.

use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::doorbell::{Doorbell, EventDoorbell};
use shmesh_shm::handle::SlabHandle;
use shmesh_shm::pool::{AllocError, OwnedSlab, Pool, PoolView, Slab, SlabMut};
use shmesh_shm::ring::{Consumer, Producer, PushError};
use thiserror::Error;

use crate::mailbox::{Mailbox, MailboxState, Waiter};
use crate::protocol::{self, Assembler, MESSAGE, RETURN};
use crate::server::loan::{Outgoing, ReplyBuf};
use crate::socket::PeerCredentials;
use crate::stats::{ConnectionRecorder, Stats};
use crate::status::{Code, Status};

/// How long a blocked handler sleeps before re-checking liveness.
pub(crate) const LIVENESS_SLICE: Duration = Duration::from_millis(20);

/// How long a loan waiting for a slab sleeps between looks at the
/// exhausted pool: slabs come back as the client reads, and nothing
/// announces them.
pub(crate) const POOL_RETRY: Duration = Duration::from_micros(50);

/// The connection is gone: the client died, or broke the protocol.
#[derive(Debug, Clone, Copy, Error)]
#[error("the connection is closed")]
pub(crate) struct Gone;

impl From<Gone> for Status {
    fn from(_: Gone) -> Status {
        Status::unavailable("the client's connection is closed")
    }
}

/// Slabs to give back to the client, and those that did not fit the ring
/// yet (the client drains it when it next allocates; we never wait on it).
struct GiveBack {
    ring: Producer<SlabHandle>,
    overflow: Vec<SlabHandle>,
}

/// What everything serving one connection shares.
pub(crate) struct Link {
    responses: Mutex<Producer<Descriptor>>,
    give_back: Mutex<GiveBack>,
    /// Set while `give_back.overflow` holds slabs: the connection's thread
    /// retries them each pass.
    overflowing: AtomicBool,
    returned: Mutex<Consumer<SlabHandle>>,
    /// Our pool (responses).
    pub pool: Arc<Pool>,
    /// The client's pool (requests), read-only.
    pub peer_pool: Arc<PoolView>,
    client_bell: EventDoorbell,
    /// Rung to wake the connection's thread.
    pub server_bell: Arc<Doorbell>,
    /// The client is gone or broke the protocol.
    pub dead: Arc<AtomicBool>,
    broken: Mutex<Option<String>>,
    /// Set once `broken` holds a reason: a load, not a lock, per pass.
    is_broken: AtomicBool,
    /// The largest message either side may send.
    pub max_message: u64,
    /// The largest slab of our pool: larger messages go in chunks.
    pub max_slab: usize,
    /// Bytes that messages being assembled from chunks may still take on
    /// this connection, so a client cannot hold unbounded memory by
    /// opening many large messages and never finishing them.
    assembly_room: AtomicU64,
    /// What `assembly_room` starts at.
    assembly_budget: u64,
    /// Calls being served off the connection's thread, by call id.
    calls: Mutex<HashMap<u64, Arc<Mailbox>>>,
    /// Who the client is.
    pub peer: PeerCredentials,
    recorder: Mutex<ConnectionRecorder>,
    /// The server's counters, for the bytes copied into slabs.
    stats: Arc<Stats>,
}

/// The parts a [`Link`] is built from.
pub(crate) struct LinkParts {
    pub responses: Producer<Descriptor>,
    pub give_back: Producer<SlabHandle>,
    pub returned: Consumer<SlabHandle>,
    pub pool: Arc<Pool>,
    pub peer_pool: Arc<PoolView>,
    pub client_bell: EventDoorbell,
    pub server_bell: Arc<Doorbell>,
    pub dead: Arc<AtomicBool>,
    pub max_message: u64,
    pub peer: PeerCredentials,
    pub recorder: ConnectionRecorder,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Link {
    pub(crate) fn new(p: LinkParts) -> Link {
        let max_slab = p
            .pool
            .layout()
            .classes
            .last()
            .map_or(0, |c| usize::try_from(c.slab_size).unwrap_or(usize::MAX));
        Link {
            responses: Mutex::new(p.responses),
            give_back: Mutex::new(GiveBack {
                ring: p.give_back,
                overflow: Vec::new(),
            }),
            overflowing: AtomicBool::new(false),
            returned: Mutex::new(p.returned),
            pool: p.pool,
            peer_pool: p.peer_pool,
            client_bell: p.client_bell,
            server_bell: p.server_bell,
            dead: p.dead,
            broken: Mutex::new(None),
            is_broken: AtomicBool::new(false),
            max_message: p.max_message,
            max_slab,
            assembly_room: AtomicU64::new(assembly_budget(p.max_message)),
            assembly_budget: assembly_budget(p.max_message),
            calls: Mutex::new(HashMap::default()),
            peer: p.peer,
            stats: p.recorder.stats().clone(),
            recorder: Mutex::new(p.recorder),
        }
    }

    /// Whether the connection is gone.
    pub(crate) fn is_dead(&self) -> bool {
        // Acquire: pairs with the Release stores of the watcher and of
        // `break_off`.
        self.dead.load(Ordering::Acquire)
    }

    /// Ends the connection because the client broke the protocol; the
    /// connection's thread reports `why` and, as it leaves, cancels the
    /// calls in progress. Takes no mailbox lock, so any code may call it,
    /// a mailbox's holder included.
    pub(crate) fn break_off(&self, why: String) {
        lock(&self.broken).get_or_insert(why);
        // Relaxed: the reason itself is read under its lock.
        self.is_broken.store(true, Ordering::Relaxed);
        // Release: handlers that see it also see why.
        self.dead.store(true, Ordering::Release);
        self.server_bell.notify();
    }

    /// Why the connection was broken off, if it was.
    pub(crate) fn broken(&self) -> Option<String> {
        // Relaxed: see `break_off`.
        if !self.is_broken.load(Ordering::Relaxed) {
            return None;
        }
        lock(&self.broken).clone()
    }

    /// The connection ended: nothing more is sent on it, and every call in
    /// progress is cancelled (its handler sees `is_cancelled()`), and
    /// whoever waits is woken. Marked dead first, so a handler that answers
    /// its cancellation cannot put an `END(Cancelled)` on the ring before
    /// the client sees the connection close: it sees `Unavailable`.
    pub(crate) fn cancel_all(&self) {
        // Release: pairs with `is_dead`; the mailbox locks below order it
        // before any handler's look at the cancellation too.
        self.dead.store(true, Ordering::Release);
        for mailbox in lock(&self.calls).values() {
            mailbox.update(|s| s.cancelled = true);
        }
    }

    /// Records a finished call in the connection's counters.
    pub(crate) fn record(&self, method: u32, code: Code, elapsed: Duration) {
        lock(&self.recorder).record(method, code, elapsed);
    }

    /// Registers call `call_id` as served off the connection's thread.
    /// Returns `None` if the id is already in use (a protocol violation).
    pub(crate) fn register(&self, call_id: u64) -> Option<Arc<Mailbox>> {
        let mut calls = lock(&self.calls);
        if calls.contains_key(&call_id) {
            return None;
        }
        let mailbox = Arc::new(Mailbox::default());
        calls.insert(call_id, mailbox.clone());
        Some(mailbox)
    }

    /// The mailbox of a call served off the connection's thread.
    pub(crate) fn mailbox(&self, call_id: u64) -> Option<Arc<Mailbox>> {
        lock(&self.calls).get(&call_id).cloned()
    }

    /// Forgets a finished call.
    pub(crate) fn unregister(&self, call_id: u64) {
        lock(&self.calls).remove(&call_id);
        // Shutdown waits for the table to empty.
        self.server_bell.notify();
    }

    /// Calls served off the connection's thread now.
    pub(crate) fn calls_in_progress(&self) -> usize {
        lock(&self.calls).len()
    }

    /// Pushes `d` to the response ring and rings the client's bell, waiting
    /// while the ring is full (the client drains it).
    pub(crate) fn push(&self, d: Descriptor) -> Result<(), Gone> {
        if self.is_dead() {
            return Err(Gone);
        }
        loop {
            let pushed = lock(&self.responses).try_push(d);
            match pushed {
                Ok(()) => {
                    self.client_bell.notify();
                    return Ok(());
                }
                Err(PushError::Full(_)) => {
                    if self.is_dead() {
                        return Err(Gone);
                    }
                    std::thread::yield_now();
                }
                Err(PushError::Corrupt(e)) => {
                    self.break_off(format!("response ring: {e}"));
                    return Err(Gone);
                }
            }
        }
    }

    /// Gives a request slab back to the client. Never waits: a full return
    /// ring keeps the slab aside until the next attempt.
    pub(crate) fn give_back(&self, handle: SlabHandle) {
        let mut g = lock(&self.give_back);
        g.overflow.push(handle);
        self.flush(&mut g);
    }

    /// Retries slabs that did not fit the return ring earlier.
    pub(crate) fn flush_give_back(&self) {
        // Relaxed: a hint; the list itself is read under its lock.
        if self.overflowing.load(Ordering::Relaxed) {
            let mut g = lock(&self.give_back);
            self.flush(&mut g);
        }
    }

    fn flush(&self, g: &mut GiveBack) {
        while let Some(&h) = g.overflow.first() {
            match g.ring.try_push(h) {
                Ok(()) => {
                    g.overflow.swap_remove(0);
                }
                Err(PushError::Full(_)) => break,
                Err(PushError::Corrupt(e)) => {
                    self.break_off(format!("return ring: {e}"));
                    break;
                }
            }
        }
        // Relaxed: see `flush_give_back`.
        self.overflowing
            .store(!g.overflow.is_empty(), Ordering::Relaxed);
    }

    /// Gives back the slab of a client descriptor that asked for it
    /// ([`RETURN`]) once we are done with it, after checking it names a slab
    /// of the client's pool.
    pub(crate) fn discard(&self, d: &Descriptor) -> Result<(), Gone> {
        if d.flags.contains(Flags::PAYLOAD) && d.flags.contains(RETURN) {
            if let Err(e) = self.peer_pool.read(d.payload, d.len.into()) {
                self.break_off(format!("call {}: {e}", d.call_id));
                return Err(Gone);
            }
            self.give_back(d.payload);
        }
        Ok(())
    }

    /// Takes back the response slabs the client returned.
    pub(crate) fn reclaim(&self) -> Result<(), Gone> {
        // Whoever holds the ring is draining it already.
        let Ok(mut ring) = self.returned.try_lock() else {
            return Ok(());
        };
        loop {
            match ring.try_pop() {
                Ok(Some(h)) => {
                    if let Err(e) = self.pool.release_returned(h) {
                        drop(ring);
                        self.break_off(format!("returned slab: {e}"));
                        return Err(Gone);
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    drop(ring);
                    self.break_off(format!("return ring: {e}"));
                    return Err(Gone);
                }
            }
        }
    }

    /// A slab of at least `len` bytes (`len` ≤ the largest slab), waiting
    /// for the client to return some while the pool is exhausted.
    pub(crate) fn alloc(&self, len: usize) -> Result<SlabMut<'_>, AllocFailed> {
        loop {
            if let Some(slab) = self.try_alloc(len)? {
                return Ok(slab);
            }
            std::thread::yield_now();
        }
    }

    /// A slab of at least `len` bytes if one is free, after taking back
    /// those the client returned; `None` while the pool stays exhausted.
    pub(crate) fn try_alloc(&self, len: usize) -> Result<Option<SlabMut<'_>>, AllocFailed> {
        self.try_take(|| self.pool.alloc(len))
    }

    /// [`Link::try_alloc`] for a slab that keeps the pool alive (a loan
    /// handed to a handler).
    fn try_alloc_owned(&self, len: usize) -> Result<Option<OwnedSlab>, AllocFailed> {
        self.try_take(|| self.pool.alloc_owned(len))
    }

    /// What `alloc` gives, or, while the pool is exhausted, what it gives
    /// after taking back the slabs the client returned; `None` if still
    /// nothing.
    fn try_take<T>(
        &self,
        alloc: impl Fn() -> Result<T, AllocError>,
    ) -> Result<Option<T>, AllocFailed> {
        match alloc() {
            Ok(slab) => Ok(Some(slab)),
            Err(AllocError::Exhausted { .. }) => {
                self.reclaim()?;
                match alloc() {
                    Ok(slab) => Ok(Some(slab)),
                    Err(_) if self.is_dead() => Err(AllocFailed::Gone(Gone)),
                    Err(_) => Ok(None),
                }
            }
            Err(e @ AllocError::TooLarge { .. }) => Err(AllocFailed::TooLarge(e)),
        }
    }

    /// A buffer of `len` bytes for an answer, if one can be had now: a slab
    /// (`None` while the pool is exhausted), or, for more than the largest
    /// slab, a heap buffer sent in chunks. `ResourceExhausted` above the
    /// connection's message limit.
    pub(crate) fn try_loan(&self, len: usize) -> Result<Option<ReplyBuf>, Status> {
        self.check_size(len)?;
        if len == 0 {
            return Ok(Some(ReplyBuf::empty()));
        }
        if len > self.max_slab {
            return Ok(Some(ReplyBuf::heap(vec![0; len])));
        }
        Ok(self
            .try_alloc_owned(len)?
            .map(|slab| ReplyBuf::slab(slab, len)))
    }

    /// A buffer of `len` bytes for an answer of the call whose mailbox is
    /// `mailbox`, waiting while the pool is exhausted (until the call ends
    /// or the connection does).
    pub(crate) fn loan_blocking(&self, mailbox: &Mailbox, len: usize) -> Result<ReplyBuf, Status> {
        loop {
            if let Some(buf) = self.try_loan(len)? {
                return Ok(buf);
            }
            if let Some(over) = sending_over(&mailbox.lock()) {
                return Err(over);
            }
            std::thread::sleep(POOL_RETRY);
        }
    }

    /// Copies `bytes` into `slab`, counting the copy; returns the slab with
    /// the length used.
    pub(crate) fn fill<'s>(&self, mut slab: SlabMut<'s>, bytes: &[u8]) -> (SlabMut<'s>, usize) {
        slab[..bytes.len()].copy_from_slice(bytes);
        self.stats.record_copy(bytes.len());
        (slab, bytes.len())
    }

    /// Writes `bytes` into a fresh slab and returns the descriptor that
    /// carries it (`flags` added).
    pub(crate) fn write(
        &self,
        call_id: u64,
        method: u32,
        bytes: &[u8],
        flags: Flags,
    ) -> Result<Descriptor, AllocFailed> {
        let mut d = message(call_id, method, flags);
        if !bytes.is_empty() {
            let (slab, len) = self.fill(self.alloc(bytes.len())?, bytes);
            with_payload(&mut d, slab, len);
        }
        Ok(d)
    }

    /// The descriptor ending call `call_id` with `status`, its details
    /// written to a slab (if one can be had; the code travels regardless).
    pub(crate) fn status_descriptor(
        &self,
        call_id: u64,
        method: u32,
        status: &Status,
    ) -> Descriptor {
        let mut d = Descriptor {
            call_id,
            method_id: method,
            flags: Flags::END | Flags::STATUS,
            status: status.code() as u32,
            ..Default::default()
        };
        if let Ok(mut slab) = self.alloc(status.encoded_len())
            && let Ok(n) = status.encode_into(&mut slab)
        {
            d.flags = d.flags | Flags::PAYLOAD;
            d.len = n as u32;
            d.payload = slab.send();
        }
        d
    }

    /// Pushes descriptor `d` of a call served off the connection's thread,
    /// with `payload` (a slab and the length used) if it carries one,
    /// unless the call has ended. Decided under the call's mailbox lock,
    /// which ending the call takes too: no message ever follows the call's
    /// `END`. A payload not sent goes back to the pool.
    pub(crate) fn push_message<P: std::ops::Deref<Target = Pool>>(
        &self,
        mailbox: &Mailbox,
        mut d: Descriptor,
        payload: Option<(Slab<P>, usize)>,
    ) -> Result<(), Status> {
        let state = mailbox.lock();
        if state.finished {
            return Err(ended());
        }
        if let Some((slab, len)) = payload {
            with_payload(&mut d, slab, len);
        }
        // Under the lock, so the end cannot overtake it; the client drains
        // the ring whatever this call does.
        self.push(d)?;
        drop(state);
        Ok(())
    }

    /// Sends `bytes` as one message of call `call_id`, copied into slabs,
    /// in chunks if it is larger than a slab, taking a credit from
    /// `mailbox` for each chunk that costs one (waiting for grants). With
    /// `end`, the last chunk ends the call (a unary response).
    pub(crate) fn send_blocking(
        &self,
        mailbox: &Mailbox,
        call_id: u64,
        method: u32,
        bytes: &[u8],
        end: bool,
    ) -> Result<(), Status> {
        self.check_size(bytes.len())?;
        for (range, flags) in self.plan(bytes.len(), end) {
            if protocol::costs_credit(flags) {
                take_credit_blocking(self, mailbox)?;
            }
            let chunk = &bytes[range];
            let payload = match chunk.len() {
                0 => None,
                n => Some(self.fill(self.alloc(n)?, chunk)),
            };
            self.push_message(mailbox, message(call_id, method, flags), payload)?;
        }
        Ok(())
    }

    /// Sends a message written in place into `buf` (see
    /// [`Link::send_blocking`]): its slab goes as it is, after the credit
    /// for it; a heap buffer is copied out in chunks.
    pub(crate) fn send_buf_blocking(
        &self,
        mailbox: &Mailbox,
        call_id: u64,
        method: u32,
        buf: ReplyBuf,
        end: bool,
    ) -> Result<(), Status> {
        match buf.into_outgoing(&self.pool)? {
            Outgoing::Copied(bytes) => self.send_blocking(mailbox, call_id, method, &bytes, end),
            Outgoing::InPlace(payload) => {
                let flags = in_place_flags(end);
                if protocol::costs_credit(flags) {
                    take_credit_blocking(self, mailbox)?;
                }
                self.push_message(mailbox, message(call_id, method, flags), payload)
            }
        }
    }

    /// The descriptors a `len`-byte answer goes out as (the last ending
    /// the call with `end`).
    pub(crate) fn plan(
        &self,
        len: usize,
        end: bool,
    ) -> impl Iterator<Item = (std::ops::Range<usize>, Flags)> + use<> {
        let last = if end { Flags::END } else { Flags(0) };
        protocol::plan(len, self.max_slab, Flags(0), Flags(0), last)
    }

    /// Ends a unary call served off the connection's thread: an error
    /// becomes the call's status (unless the client is gone), then the call
    /// is counted and forgotten.
    pub(crate) fn end_unary(
        &self,
        call_id: u64,
        method: u32,
        result: Result<(), Status>,
        started: std::time::Instant,
    ) {
        let code = match result {
            Ok(()) => Code::Ok,
            Err(status) => {
                if !self.is_dead() {
                    let _ = self.push(self.status_descriptor(call_id, method, &status));
                }
                status.code()
            }
        };
        self.record(method, code, started.elapsed());
        self.unregister(call_id);
    }

    /// Checks a message's size against the connection's limit.
    pub(crate) fn check_size(&self, len: usize) -> Result<(), Status> {
        if len as u64 > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "message of {len} bytes exceeds the connection's limit of {} bytes",
                self.max_message
            )));
        }
        Ok(())
    }
}

/// The assembly budget of a connection whose largest message is
/// `max_message`: two such messages at once.
fn assembly_budget(max_message: u64) -> u64 {
    max_message.saturating_mul(2)
}

/// A message being assembled from chunks, its bytes counted against its
/// connection's budget until it is whole (or dropped).
pub(crate) struct Assembly {
    message: Assembler,
    link: Arc<Link>,
    reserved: u64,
}

impl Assembly {
    pub(crate) fn new(link: &Arc<Link>) -> Self {
        Assembly {
            message: Assembler::new(link.max_message),
            link: link.clone(),
            reserved: 0,
        }
    }

    /// Appends one chunk, if the message stays within the connection's
    /// limit and the connection's assembly budget has room.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), Status> {
        let n = chunk.len() as u64;
        // AcqRel: a budget shared by the connection's threads; the count is
        // all it guards.
        let reserved =
            self.link
                .assembly_room
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |room| {
                    room.checked_sub(n)
                });
        if reserved.is_err() {
            return Err(Status::resource_exhausted(format!(
                "messages being assembled on this connection would exceed {} bytes",
                self.link.assembly_budget
            )));
        }
        self.reserved += n;
        self.message
            .push(chunk)
            .map_err(|e| Status::resource_exhausted(e.to_string()))
    }

    /// The whole message; its bytes leave the budget.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let message = std::mem::replace(&mut self.message, Assembler::new(0));
        message.finish()
    }
}

impl Drop for Assembly {
    fn drop(&mut self) {
        // AcqRel: see `push`.
        self.link
            .assembly_room
            .fetch_add(self.reserved, Ordering::AcqRel);
    }
}

/// A slab could not be had.
#[derive(Debug, Error)]
pub(crate) enum AllocFailed {
    /// The connection is gone.
    #[error(transparent)]
    Gone(#[from] Gone),
    /// Larger than any slab (callers chunk, so a bug if it happens).
    #[error(transparent)]
    TooLarge(AllocError),
}

impl From<AllocFailed> for Status {
    fn from(e: AllocFailed) -> Status {
        match e {
            AllocFailed::Gone(g) => g.into(),
            AllocFailed::TooLarge(e) => Status::resource_exhausted(e.to_string()),
        }
    }
}

/// A descriptor of call `call_id` with `flags` and no payload yet.
pub(crate) fn message(call_id: u64, method: u32, flags: Flags) -> Descriptor {
    Descriptor {
        call_id,
        method_id: method,
        flags,
        ..Default::default()
    }
}

/// Makes `d` carry the first `len` bytes of `slab`, which is the client's
/// from now on.
fn with_payload<P: std::ops::Deref<Target = Pool>>(d: &mut Descriptor, slab: Slab<P>, len: usize) {
    d.flags = d.flags | Flags::PAYLOAD;
    // A slab is at most 64 MiB: the length fits.
    d.len = len as u32;
    d.payload = slab.send();
}

/// The flags of a message that fits one descriptor (ending the call with
/// `end`).
pub(crate) fn in_place_flags(end: bool) -> Flags {
    if end { MESSAGE | Flags::END } else { MESSAGE }
}

/// The status of a send on a call that has ended.
pub(crate) fn ended() -> Status {
    Status::failed_precondition("the call has ended")
}

/// Why nothing more may be sent on a call, if nothing may: the client
/// cancelled it, or it has ended.
pub(crate) fn sending_over(state: &MailboxState) -> Option<Status> {
    if state.cancelled {
        return Some(Status::cancelled("the client cancelled the call"));
    }
    state.finished.then(ended)
}

/// Takes one send credit of a call if it has one: `None` while it must
/// wait for the client to grant more, an error if it never will.
pub(crate) fn try_take_credit(link: &Link, state: &mut MailboxState) -> Option<Result<(), Status>> {
    if let Some(over) = sending_over(state) {
        return Some(Err(over));
    }
    if state.credit > 0 {
        state.credit -= 1;
        return Some(Ok(()));
    }
    if link.is_dead() {
        return Some(Err(Gone.into()));
    }
    None
}

/// Takes one send credit of a call, waiting for the client to grant more.
pub(crate) fn take_credit_blocking(link: &Link, mailbox: &Mailbox) -> Result<(), Status> {
    loop {
        {
            let mut state = mailbox.lock();
            if let Some(taken) = try_take_credit(link, &mut state) {
                return taken;
            }
            state.wait_with(Waiter::Thread(std::thread::current()));
        }
        std::thread::park_timeout(LIVENESS_SLICE);
    }
}
