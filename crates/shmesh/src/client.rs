//! The blocking client: a [`Channel`] to one server, shared by many threads.
//!
//! Many calls may be in flight on one channel. Requests go out under a short
//! lock on the request ring. Responses come back out of order, matched by
//! call id, and are collected leader/follower style: whichever waiting
//! caller holds the response ring pops everything there is, keeps its own
//! answer, hands the others to their callers and wakes them; a caller whose
//! answer is not in yet parks until it is handed over or it becomes the
//! leader. Only the leader waits on the shared-memory doorbell, so a busy
//! channel makes no system call.
//!
//! The Unix socket stays open as the liveness signal: a watcher thread blocks
//! on it, and when the server dies the socket closes, the channel is marked
//! dead and every caller in flight gets [`Code::Unavailable`] at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::doorbell::{WaitPolicy, WaitTimedOut};
use shmesh_shm::pool::AllocError;
use shmesh_shm::ring::PushError;
use shmesh_shm::segment::Segment;
use thiserror::Error;

use crate::deadline;
use crate::handshake::{FdRole, Hello, Limits, PROTOCOL_VERSION, SchemaHash, ServiceName};
use crate::layout::{self, ClientEnds, LayoutError};
use crate::socket::{self, ConnectError, Connection};
use crate::status::{Code, Status};
use crate::{Address, AddressError};

/// How often a waiting caller re-checks liveness and its deadline when
/// nothing wakes it.
pub(crate) const LIVENESS_SLICE: Duration = Duration::from_millis(20);

/// Options of a [`Channel`].
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// The service to connect to; must match the server's.
    pub service: String,
    /// Hash of the service's schema; must match the server's.
    pub schema_hash: SchemaHash,
    /// What to ask the server for (it may grant less).
    pub limits: Limits,
    /// How long connecting and the handshake may take.
    pub connect_timeout: Duration,
}

impl ChannelOptions {
    /// Default limits for `service` with schema `schema_hash`.
    pub fn new(service: impl Into<String>, schema_hash: SchemaHash) -> Self {
        ChannelOptions {
            service: service.into(),
            schema_hash,
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Connecting a channel failed.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The address does not parse.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The service name is not valid.
    #[error("invalid service name: {0}")]
    Service(#[from] crate::handshake::ServiceNameError),
    /// Setting the socket's timeout failed.
    #[error("cannot set the socket's timeout: {0}")]
    Socket(std::io::Error),
    /// Connecting or the handshake failed (refusals included).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The server sent no segment.
    #[error("server sent no shared-memory segment in its Welcome")]
    NoSegment,
    /// The server sent no eventfd for the client's doorbell.
    #[error("server sent no doorbell eventfd in its Welcome")]
    NoDoorbell,
    /// The segment the server sent is unusable.
    #[error("cannot open the connection's segment: {0}")]
    Segment(#[from] shmesh_shm::segment::OpenError),
    /// The segment does not hold what a connection needs.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The watcher thread could not start.
    #[error("cannot start the liveness watcher: {0}")]
    Thread(std::io::Error),
}

/// A call in flight.
pub(crate) struct Pending {
    /// The request's slab: the server reads it until it answers, so it is
    /// freed when the response arrives (a unary response releases its
    /// request), whoever collects the response.
    request: Option<shmesh_shm::handle::SlabHandle>,
    pub(crate) state: CallState,
}

/// Who to wake when a call's answer is in.
pub(crate) enum Waiter {
    /// A blocking caller.
    Thread(Thread),
    /// An async caller (`None` until its future is first polled).
    Task(Option<std::task::Waker>),
}

impl Waiter {
    fn wake(&self) {
        match self {
            Waiter::Thread(t) => t.unpark(),
            Waiter::Task(Some(w)) => w.wake_by_ref(),
            Waiter::Task(None) => {}
        }
    }
}

/// Where a call's answer is.
pub(crate) enum CallState {
    /// The caller is waiting; wake it when the answer is in.
    Waiting(Waiter),
    /// The answer arrived while its caller was not reading.
    Done(Descriptor),
    /// The caller gave up (deadline); the answer, when it comes, only frees
    /// the slabs.
    Abandoned,
}

pub(crate) struct Inner {
    ends_send: Mutex<shmesh_shm::ring::Producer<Descriptor>>,
    pub(crate) ends_recv: Mutex<shmesh_shm::ring::Consumer<Descriptor>>,
    returned: Mutex<shmesh_shm::ring::Consumer<shmesh_shm::handle::SlabHandle>>,
    give_back: Mutex<shmesh_shm::ring::Producer<shmesh_shm::handle::SlabHandle>>,
    pool: Arc<shmesh_shm::pool::Pool>,
    peer_pool: shmesh_shm::pool::PoolView,
    server_bell: shmesh_shm::doorbell::Doorbell,
    pub(crate) client_bell: shmesh_shm::doorbell::EventDoorbell,
    policy: WaitPolicy,
    granted: Limits,
    max_message: u64,
    next_call: AtomicU64,
    pub(crate) pending: Mutex<HashMap<u64, Pending>>,
    pub(crate) dead: AtomicBool,
    /// Why the channel died, once it has.
    death: Mutex<Option<String>>,
    /// The socket, shut down when the last clone of the channel goes, so the
    /// watcher thread ends and the server sees the connection close.
    socket: std::os::fd::OwnedFd,
    _segment: Arc<Segment>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(&self.socket, rustix::net::Shutdown::Both);
    }
}

/// A connection to a shmesh server, for blocking calls from any number of
/// threads. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct Channel {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("dead", &self.inner.dead.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A request buffer in shared memory, from [`Channel::loan`]: derefs to
/// exactly the bytes asked for. Dropping it unsent gives the slab back.
pub struct RequestBuf {
    slab: Option<shmesh_shm::pool::OwnedSlab>,
    len: usize,
}

impl std::ops::Deref for RequestBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.slab.as_ref().map_or(&[], |s| &s[..self.len])
    }
}

impl std::ops::DerefMut for RequestBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.slab.as_mut().map_or(&mut [], |s| &mut s[..len])
    }
}

impl std::fmt::Debug for RequestBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// A response in shared memory: derefs to its bytes, read in place, and gives
/// its slab back to the server when dropped.
pub struct Response {
    inner: Arc<Inner>,
    descriptor: Descriptor,
}

impl std::ops::Deref for Response {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if !self.descriptor.flags.contains(Flags::PAYLOAD) {
            return &[];
        }
        // Checked when the response was accepted in `finish`.
        self.inner
            .peer_pool
            .read(self.descriptor.payload, self.descriptor.len.into())
            .unwrap_or(&[])
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("len", &self.len())
            .finish()
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        if self.descriptor.flags.contains(Flags::PAYLOAD) {
            self.inner.give_back_slab(self.descriptor.payload);
        }
    }
}

impl Channel {
    /// Connects to the server at `address` (`shm:///path` or `shm://@name`).
    pub fn connect(address: &str, options: &ChannelOptions) -> Result<Channel, ChannelError> {
        let address: Address = address.parse()?;
        let mut conn = socket::connect(&address)?;
        conn.set_read_timeout(Some(options.connect_timeout))
            .map_err(ChannelError::Socket)?;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            service: ServiceName::new(options.service.clone())?,
            schema_hash: options.schema_hash,
            requested: options.limits.clone(),
        };
        let (welcome, fds) = socket::client_handshake(&mut conn, &hello)?;
        let mut segment_fd = None;
        let mut bell_fd = None;
        for (role, fd) in welcome.fds.as_slice().iter().zip(fds) {
            match role {
                FdRole::Segment => segment_fd = Some(fd),
                FdRole::ClientDoorbell => bell_fd = Some(fd),
                FdRole::ServerDoorbell => {}
            }
        }
        let segment_fd = segment_fd.ok_or(ChannelError::NoSegment)?;
        let bell_fd = bell_fd.ok_or(ChannelError::NoDoorbell)?;
        let segment = Segment::open(segment_fd)?;
        let ends = ClientEnds::open(&segment, bell_fd)?;
        let socket = std::os::fd::AsFd::as_fd(&conn)
            .try_clone_to_owned()
            .map_err(ChannelError::Socket)?;
        let inner = Arc::new(Inner {
            ends_send: Mutex::new(ends.requests),
            ends_recv: Mutex::new(ends.responses),
            returned: Mutex::new(ends.returned),
            give_back: Mutex::new(ends.give_back),
            pool: Arc::new(ends.pool),
            peer_pool: ends.peer_pool,
            server_bell: ends.server_bell,
            client_bell: ends.client_bell,
            policy: layout::wait_policy(&welcome.granted),
            max_message: welcome.granted.max_message,
            granted: welcome.granted.clone(),
            next_call: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            death: Mutex::new(None),
            socket,
            _segment: segment,
        });
        conn.set_read_timeout(None).map_err(ChannelError::Socket)?;
        let watched = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("shmesh-liveness".into())
            .spawn(move || watch(conn, watched))
            .map_err(ChannelError::Thread)?;
        Ok(Channel { inner })
    }

    /// Loans a `len`-byte request buffer in shared memory, to write the
    /// request in place and then [`Channel::send`] it: the zero-copy way to
    /// call. Waits up to `timeout` for a free slab (the pool may be busy with
    /// calls in flight).
    ///
    /// ```no_run
    /// # use shmesh::client::{Channel, ChannelOptions};
    /// # let channel = Channel::connect("shm://@echo", &ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]))).unwrap();
    /// let mut request = channel.loan(5, None).unwrap();
    /// request.copy_from_slice(b"hello"); // or encode straight into it
    /// let response = channel.send(1, request, None).unwrap();
    /// assert_eq!(&response[..], b"hello");
    /// ```
    pub fn loan(&self, len: usize, timeout: Option<Duration>) -> Result<RequestBuf, Status> {
        self.inner.loan(len, timeout.map(|t| Instant::now() + t))
    }

    /// Sends a request written in place into a [`RequestBuf`] and waits up
    /// to `timeout` for the response.
    pub fn send(
        &self,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        self.inner.send(method, request, timeout)
    }

    /// Calls `method` with `request`, copied into shared memory, and waits up
    /// to `timeout` for the response.
    pub fn call(
        &self,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        self.inner.call(method, request, timeout)
    }

    /// The limits the server granted this channel (ring depth, pool, wait
    /// mode, largest message).
    pub fn limits(&self) -> &Limits {
        &self.inner.granted
    }

    /// Whether the connection is gone (the server died or closed it).
    pub fn is_dead(&self) -> bool {
        self.inner.dead.load(Ordering::Acquire)
    }

    /// Calls sent and not yet answered, including those whose callers gave up
    /// (their answers still have slabs to free).
    pub fn calls_in_flight(&self) -> usize {
        lock(&self.inner.pending).len()
    }

    /// Slabs of this channel's request pool in use, after taking back those
    /// the server has returned (leak checks: 0 when no call is in flight).
    pub fn pool_in_use(&self) -> u64 {
        // An error here means the channel just died; the count still stands.
        let _ = self.inner.drain_returned();
        self.inner.pool.occupancy().in_use()
    }
}

/// Blocks on the socket until it closes, then marks the channel dead and
/// wakes everyone. The server never sends anything after the handshake.
fn watch(mut conn: Connection, inner: std::sync::Weak<Inner>) {
    let why = match conn.recv_msg(0) {
        Ok(_) => "server sent an unexpected message after the handshake".to_owned(),
        Err(e) => format!("connection to the server lost: {e}"),
    };
    if let Some(inner) = inner.upgrade() {
        inner.kill(why);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn kill(&self, why: String) {
        lock(&self.death).get_or_insert(why);
        // Release: pairs with the Acquire loads of waiters.
        self.dead.store(true, Ordering::Release);
        self.client_bell.notify();
        for p in lock(&self.pending).values() {
            if let CallState::Waiting(w) = &p.state {
                w.wake();
            }
        }
    }

    pub(crate) fn unavailable(&self) -> Status {
        let why = lock(&self.death)
            .clone()
            .unwrap_or_else(|| "connection is dead".to_owned());
        Status::unavailable(why)
    }

    fn give_back_slab(&self, handle: shmesh_shm::handle::SlabHandle) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        let mut ring = lock(&self.give_back);
        // The return ring is twice the response ring's depth, so it is full
        // only if the server stopped draining it; then the slab stays with us
        // until the connection ends (the server reclaims it).
        let _ = ring.try_push(handle);
    }

    fn drain_returned(&self) -> Result<(), Status> {
        let Ok(mut ring) = self.returned.try_lock() else {
            return Ok(());
        };
        loop {
            match ring.try_pop() {
                Ok(Some(h)) => {
                    if let Err(e) = self.pool.release_returned(h) {
                        return Err(self.broken(format!("server returned a bad slab handle: {e}")));
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.broken(format!("return ring corrupt: {e}"))),
            }
        }
    }

    fn broken(&self, why: String) -> Status {
        self.kill(why);
        self.unavailable()
    }

    fn call(
        self: &Arc<Self>,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut buf = self.loan(request.len(), deadline)?;
        buf.copy_from_slice(request);
        self.send_until(method, buf, timeout, deadline)
    }

    pub(crate) fn loan(&self, len: usize, deadline: Option<Instant>) -> Result<RequestBuf, Status> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self.unavailable());
        }
        if len as u64 > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "request of {len} bytes exceeds the connection's limit of {} bytes",
                self.max_message
            )));
        }
        let slab = if len == 0 {
            None
        } else {
            Some(self.alloc(len, deadline)?)
        };
        Ok(RequestBuf { slab, len })
    }

    fn send(
        self: &Arc<Self>,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        self.send_until(
            method,
            request,
            timeout,
            timeout.map(|t| Instant::now() + t),
        )
    }

    /// [`Inner::send`] with the deadline `timeout` gives, already computed.
    fn send_until(
        self: &Arc<Self>,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<Response, Status> {
        let call = self.start(
            method,
            request,
            timeout,
            deadline,
            Waiter::Thread(std::thread::current()),
        )?;
        let answer = self.wait_for(call.call_id, deadline);
        self.end(call, answer)
    }

    /// Registers and pushes a call; the returned guard abandons it if the
    /// caller goes away before [`Inner::end`].
    pub(crate) fn start(
        self: &Arc<Self>,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
        waiter: Waiter,
    ) -> Result<CallGuard, Status> {
        if self.dead.load(Ordering::Acquire) {
            return Err(self.unavailable());
        }
        let call_id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut d = Descriptor {
            call_id,
            method_id: method,
            deadline_ns: deadline::to_wire(timeout),
            ..Default::default()
        };
        if let Some(slab) = request.slab {
            if !slab.is_from(&self.pool) {
                return Err(Status::invalid_argument(
                    "request buffer loaned from another channel",
                ));
            }
            d.len = request.len as u32;
            d.flags = Flags::PAYLOAD;
            d.payload = slab.send();
        }
        let request_slab = d.flags.contains(Flags::PAYLOAD).then_some(d.payload);
        lock(&self.pending).insert(
            call_id,
            Pending {
                request: request_slab,
                state: CallState::Waiting(waiter),
            },
        );
        if let Err(status) = self.push_request(d, deadline) {
            lock(&self.pending).remove(&call_id);
            if d.flags.contains(Flags::PAYLOAD) {
                // Never published: the slab is still ours; take it back as
                // if the server had returned it.
                let _ = self.pool.release_returned(d.payload);
            }
            return Err(status);
        }
        self.server_bell.notify();
        Ok(CallGuard {
            inner: self.clone(),
            call_id,
            ended: false,
        })
    }

    /// Ends a call with the outcome of its wait.
    pub(crate) fn end(
        self: &Arc<Self>,
        mut call: CallGuard,
        answer: Result<Descriptor, Status>,
    ) -> Result<Response, Status> {
        call.ended = answer.is_ok();
        drop(call);
        self.finish(answer?)
    }

    /// A caller gives up on `call_id`: if its request is still with the
    /// server, the entry stays until the answer comes to free the slab.
    fn abandon(&self, call_id: u64) {
        let mut pending = lock(&self.pending);
        match pending.get_mut(&call_id) {
            Some(p) if p.request.is_some() && !self.dead.load(Ordering::Acquire) => {
                p.state = CallState::Abandoned;
            }
            _ => {
                pending.remove(&call_id);
            }
        }
    }

    /// Records the response `d`: frees its request's slab, then hands the
    /// response to its caller (`mine` is the collecting caller's own call)
    /// or, if nobody wants it, gives its slab back. Returns `d` if it is
    /// `mine`.
    fn complete(&self, d: Descriptor, mine: u64) -> Result<Option<Descriptor>, Status> {
        let mut pending = lock(&self.pending);
        let Some(entry) = pending.get_mut(&d.call_id) else {
            drop(pending);
            // An id we never used (or a duplicate): nobody to give it to.
            if d.flags.contains(Flags::PAYLOAD) {
                self.give_back_slab(d.payload);
            }
            return Ok(None);
        };
        if let Some(h) = entry.request.take()
            && let Err(e) = self.pool.release_returned(h)
        {
            drop(pending);
            return Err(self.broken(format!("request slab of call {}: {e}", d.call_id)));
        }
        if d.call_id == mine {
            pending.remove(&mine);
            return Ok(Some(d));
        }
        match std::mem::replace(&mut entry.state, CallState::Done(d)) {
            CallState::Waiting(w) => w.wake(),
            CallState::Abandoned => {
                pending.remove(&d.call_id);
                drop(pending);
                if d.flags.contains(Flags::PAYLOAD) {
                    self.give_back_slab(d.payload);
                }
            }
            // A second response to one call: keep the first.
            CallState::Done(first) => entry.state = CallState::Done(first),
        }
        Ok(None)
    }

    fn alloc(
        &self,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<shmesh_shm::pool::OwnedSlab, Status> {
        loop {
            match self.pool.alloc_owned(len) {
                Ok(slab) => return Ok(slab),
                Err(AllocError::Exhausted { .. }) => {
                    self.drain_returned()?;
                    if let Ok(slab) = self.pool.alloc_owned(len) {
                        return Ok(slab);
                    }
                    if self.dead.load(Ordering::Acquire) {
                        return Err(self.unavailable());
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(Status::deadline_exceeded(
                            "no free slab before the deadline (pool exhausted)",
                        ));
                    }
                    std::thread::yield_now();
                }
                Err(e @ AllocError::TooLarge { .. }) => {
                    return Err(Status::resource_exhausted(e.to_string()));
                }
            }
        }
    }

    fn push_request(&self, d: Descriptor, deadline: Option<Instant>) -> Result<(), Status> {
        let mut d = d;
        loop {
            let pushed = lock(&self.ends_send).try_push(d);
            match pushed {
                Ok(()) => return Ok(()),
                Err(PushError::Full(back)) => {
                    d = back;
                    if self.dead.load(Ordering::Acquire) {
                        return Err(self.unavailable());
                    }
                    if deadline.is_some_and(|t| Instant::now() >= t) {
                        return Err(Status::deadline_exceeded(
                            "request ring stayed full until the deadline",
                        ));
                    }
                    std::thread::yield_now();
                }
                Err(PushError::Corrupt(e)) => {
                    return Err(self.broken(format!("request ring corrupt: {e}")));
                }
            }
        }
    }

    /// Waits for call `call_id`'s response descriptor.
    fn wait_for(&self, call_id: u64, deadline: Option<Instant>) -> Result<Descriptor, Status> {
        loop {
            if let Some(d) = take_if_done(&mut lock(&self.pending), call_id) {
                return Ok(d);
            }
            if self.dead.load(Ordering::Acquire) {
                return Err(self.unavailable());
            }
            // The clock is read only when a wait ran out, not on every pass.
            let waited_out = match self.ends_recv.try_lock() {
                Ok(mut ring) => match self.lead(&mut ring, call_id, deadline)? {
                    Led::Mine(d) => {
                        drop(ring);
                        self.promote_a_follower();
                        return Ok(d);
                    }
                    Led::Woken => false,
                    Led::WaitedOut => true,
                },
                Err(_) => {
                    std::thread::park_timeout(LIVENESS_SLICE);
                    true
                }
            };
            if waited_out && deadline.is_some_and(|t| Instant::now() >= t) {
                return Err(Status::deadline_exceeded("no response before the deadline"));
            }
        }
    }

    /// As the leader: pops responses, hands out others', returns ours if in.
    /// Waits on the doorbell for at most one liveness slice.
    fn lead(
        &self,
        ring: &mut shmesh_shm::ring::Consumer<Descriptor>,
        call_id: u64,
        deadline: Option<Instant>,
    ) -> Result<Led, Status> {
        if let Some(d) = self.collect(ring, call_id)? {
            return Ok(Led::Mine(d));
        }
        let slice = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(LIVENESS_SLICE),
            None => LIVENESS_SLICE,
        };
        let dead = &self.dead;
        let waited = self.client_bell.wait_for(self.policy, slice, || {
            ring.has_pending_hint() || dead.load(Ordering::Acquire)
        });
        Ok(match waited {
            Ok(()) => Led::Woken,
            Err(WaitTimedOut) => Led::WaitedOut,
        })
    }

    /// Pops every response there is, handing each to its caller; returns
    /// `call_id`'s if it was among them.
    pub(crate) fn collect(
        &self,
        ring: &mut shmesh_shm::ring::Consumer<Descriptor>,
        call_id: u64,
    ) -> Result<Option<Descriptor>, Status> {
        let mut mine = None;
        loop {
            match ring.try_pop() {
                Ok(Some(d)) => {
                    if let Some(d) = self.complete(d, call_id)? {
                        mine = Some(d);
                    }
                }
                Ok(None) => return Ok(mine),
                Err(e) => return Err(self.broken(format!("response ring corrupt: {e}"))),
            }
        }
    }

    /// Wakes one waiting caller so it takes over reading responses.
    pub(crate) fn promote_a_follower(&self) {
        if let Some(CallState::Waiting(w)) = lock(&self.pending)
            .values()
            .map(|p| &p.state)
            .find(|s| matches!(s, CallState::Waiting(_)))
        {
            w.wake();
        }
    }

    /// Turns a response descriptor into the caller's result.
    fn finish(self: &Arc<Self>, d: Descriptor) -> Result<Response, Status> {
        if d.flags.contains(Flags::PAYLOAD)
            && let Err(e) = self.peer_pool.read(d.payload, d.len.into())
        {
            return Err(self.broken(format!("server sent a bad response handle: {e}")));
        }
        let response = Response {
            inner: self.clone(),
            descriptor: d,
        };
        if d.flags.contains(Flags::STATUS) && d.status != Code::Ok as u32 {
            let status = Status::decode(d.status, &response[..]).unwrap_or_else(|e| {
                Status::internal(format!("undecodable status from server: {e}"))
            });
            return Err(status);
        }
        Ok(response)
    }
}

/// What a leader's turn came to.
enum Led {
    /// Our own answer.
    Mine(Descriptor),
    /// Something arrived (or the channel died): look again.
    Woken,
    /// The wait ran out: time to check the deadline.
    WaitedOut,
}

/// A call between [`Inner::start`] and [`Inner::end`]. Dropped early (a
/// timed-out wait, a cancelled future), it abandons the call: its entry
/// stays until the answer comes and frees the slabs.
pub(crate) struct CallGuard {
    inner: Arc<Inner>,
    pub(crate) call_id: u64,
    ended: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.inner.abandon(self.call_id);
        }
    }
}

pub(crate) fn take_if_done(
    pending: &mut HashMap<u64, Pending>,
    call_id: u64,
) -> Option<Descriptor> {
    match pending.get(&call_id).map(|p| &p.state) {
        Some(CallState::Done(_)) => match pending.remove(&call_id)?.state {
            CallState::Done(d) => Some(d),
            _ => None,
        },
        _ => None,
    }
}
