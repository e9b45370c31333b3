//! The blocking server: accepts connections, gives each its own segment, and
//! serves its calls on a thread of its own.
//!
//! A handler sees the request's bytes in place in shared memory, the
//! caller's credentials and the time left before the caller's deadline, and
//! returns the response bytes or a [`Status`]. A connection whose peer
//! breaks the protocol (a corrupt ring, a forged handle) is closed with a
//! logged error; the server keeps serving everyone else. A client that dies
//! is noticed when its socket closes, and its connection, segment and slabs
//! go with it.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::pool::AllocError;
use shmesh_shm::ring::{Consumer, Entry, Producer, PushError};
use shmesh_shm::segment::Segment;
use thiserror::Error;

use crate::deadline;
use crate::handshake::{FdRole, Limits, SchemaHash, ServerPolicy, ServiceName, ServiceNameError};
use crate::layout::{self, LayoutError, ServerEnds};
use crate::socket::{self, Connection, Listener, PeerCredentials};
use crate::stats::{ConnectionRecorder, Stats};
use crate::status::{Code, Status};
use crate::{Address, AddressError, BindError};

/// How often an idle connection re-checks liveness and shutdown.
const LIVENESS_SLICE: Duration = Duration::from_millis(20);
/// How long a client may take to say Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One incoming call, as a handler sees it.
#[derive(Debug)]
pub struct Request<'a> {
    /// The method called.
    pub method: u32,
    /// The request's bytes, in place in shared memory.
    pub payload: &'a [u8],
    /// Who called: from `SO_PEERCRED` at connect time.
    pub peer: PeerCredentials,
    /// Time left before the caller's deadline, if it set one.
    pub remaining: Option<Duration>,
}

/// A method's handler that returns its response as bytes (copied into
/// shared memory).
pub type Handler = dyn Fn(&Request<'_>) -> Result<Vec<u8>, Status> + Send + Sync;

/// A method's handler that writes its response in place.
pub type InPlaceHandler = dyn Fn(&Request<'_>, &mut Reply<'_>) -> Result<(), Status> + Send + Sync;

enum Route {
    Copying(Box<Handler>),
    InPlace(Box<InPlaceHandler>),
    /// Run on the server's worker threads, off the connection's thread.
    Offloaded(Box<Handler>),
}

/// Where an in-place handler writes its response: a slab of the server's
/// pool, loaned once per call.
pub struct Reply<'p> {
    pool: &'p shmesh_shm::pool::Pool,
    slab: Option<shmesh_shm::pool::SlabMut<'p>>,
    len: usize,
}

impl std::fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("len", &self.len).finish()
    }
}

impl Reply<'_> {
    /// Loans the `len`-byte response buffer (once per call; a second loan
    /// replaces the first). A response larger than the largest slab, or a
    /// server pool exhausted by the client holding responses, is
    /// `ResourceExhausted`.
    pub fn loan(&mut self, len: usize) -> Result<&mut [u8], Status> {
        self.slab = None;
        let slab = self
            .pool
            .alloc(len)
            .map_err(|e| Status::resource_exhausted(format!("response buffer: {e}")))?;
        self.len = len;
        let slab = self.slab.insert(slab);
        Ok(&mut slab[..len])
    }
}

/// Handlers by method id.
#[derive(Default)]
pub struct Router {
    handlers: HashMap<u32, Route>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("methods", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Router {
    /// An empty router: every method answers `Unimplemented`.
    pub fn new() -> Self {
        Router::default()
    }

    /// Serves `method` with `handler` (replacing any earlier handler).
    pub fn route(
        mut self,
        method: u32,
        handler: impl Fn(&Request<'_>) -> Result<Vec<u8>, Status> + Send + Sync + 'static,
    ) -> Self {
        self.handlers
            .insert(method, Route::Copying(Box::new(handler)));
        self
    }

    /// Serves `method` with a handler that may block (I/O, long work): it runs
    /// on the server's worker threads, so the connection goes on serving its
    /// other calls meanwhile, and answers may overtake each other. Costs two
    /// thread hand-offs per call; handlers that return quickly belong in
    /// [`Router::route`], which runs them on the connection's own thread.
    pub fn route_blocking(
        mut self,
        method: u32,
        handler: impl Fn(&Request<'_>) -> Result<Vec<u8>, Status> + Send + Sync + 'static,
    ) -> Self {
        self.handlers
            .insert(method, Route::Offloaded(Box::new(handler)));
        self
    }

    /// Serves `method` with a handler that writes its response in place:
    /// the zero-copy way to answer.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// let router = Router::new().route_in_place(1, |request, reply| {
    ///     reply.loan(request.payload.len())?.copy_from_slice(request.payload);
    ///     Ok(())
    /// });
    /// ```
    pub fn route_in_place(
        mut self,
        method: u32,
        handler: impl Fn(&Request<'_>, &mut Reply<'_>) -> Result<(), Status> + Send + Sync + 'static,
    ) -> Self {
        self.handlers
            .insert(method, Route::InPlace(Box::new(handler)));
        self
    }
}

/// Starting the server failed.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The address does not parse.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The service name is not valid.
    #[error("invalid service name: {0}")]
    Service(#[from] ServiceNameError),
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The worker threads could not start.
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
}

/// A server for one service at one address.
pub struct Server {
    listener: Listener,
    policy: ServerPolicy,
    router: Arc<Router>,
    shutdown: Arc<AtomicBool>,
    next_connection: AtomicU64,
    live: Arc<AtomicU64>,
    stats: Arc<Stats>,
    workers: Workers,
}

/// A job for a worker thread.
type Job = Box<dyn FnOnce() + Send>;

/// The threads that run offloaded handlers, shared by all connections.
/// They exit when the server (the queue's sender) is dropped.
struct Workers {
    queue: std::sync::mpsc::Sender<Job>,
}

impl Workers {
    fn start(count: usize) -> std::io::Result<Self> {
        let (queue, jobs) = std::sync::mpsc::channel::<Job>();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        for n in 0..count.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("shmesh-worker-{n}"))
                .spawn(move || {
                    loop {
                        let job = match jobs.lock() {
                            Ok(rx) => rx.recv(),
                            Err(poisoned) => poisoned.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Workers { queue })
    }
}

/// Answers of offloaded handlers, waiting for the connection's thread to
/// send them (only it may push to the response ring).
#[derive(Default)]
struct Completions {
    ready: std::sync::Mutex<Vec<Completion>>,
    /// Completions waiting in `ready`: the condition the connection waits on.
    queued: AtomicU64,
    /// Offloaded calls not yet answered.
    outstanding: AtomicU64,
}

struct Completion {
    response: Descriptor,
    code: Code,
    elapsed: Duration,
}

/// Stops a running [`Server::serve`] from another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    shutdown: Arc<AtomicBool>,
    address: Address,
}

impl ShutdownHandle {
    /// Stops accepting; connections finish the calls already sent, then close.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        // Wake the accept loop with a connection it will drop at once.
        let _ = socket::connect(&self.address);
    }
}

impl Server {
    /// Binds `address` for `service` with schema `schema_hash`.
    pub fn bind(
        address: &str,
        service: &str,
        schema_hash: SchemaHash,
        router: Router,
    ) -> Result<Server, ServerError> {
        let address: Address = address.parse()?;
        let policy = ServerPolicy::new(ServiceName::new(service)?, schema_hash);
        Ok(Server {
            listener: Listener::bind(&address)?,
            policy,
            router: Arc::new(router),
            shutdown: Arc::new(AtomicBool::new(false)),
            next_connection: AtomicU64::new(1),
            live: Arc::new(AtomicU64::new(0)),
            stats: Arc::new(Stats::default()),
            workers: Workers::start(std::thread::available_parallelism().map_or(2, |n| n.get()))
                .map_err(ServerError::Workers)?,
        })
    }

    /// The most a client may be granted (defaults to [`Limits::default`]).
    pub fn set_max_limits(&mut self, max: Limits) {
        self.policy.max = max;
    }

    /// A handle to stop [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shutdown: self.shutdown.clone(),
            address: self.listener.address().clone(),
        }
    }

    /// Connections being served now.
    pub fn live_connections(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }

    /// The server's call and connection counters; take a
    /// [`Stats::snapshot`] at any time, from any thread.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The counter behind [`Server::live_connections`], to read from a
    /// handler or another thread while [`Server::serve`] runs.
    pub fn live_counter(&self) -> Arc<AtomicU64> {
        self.live.clone()
    }

    /// Accepts and serves connections until shut down; then waits for the
    /// connections to finish their calls.
    pub fn serve(&self) {
        let mut workers = Vec::new();
        while !self.shutdown.load(Ordering::Acquire) {
            let conn = match self.listener.accept() {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if self.shutdown.load(Ordering::Acquire) {
                break;
            }
            let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
            let (policy, router, shutdown, live, stats) = (
                self.policy.clone(),
                self.router.clone(),
                self.shutdown.clone(),
                self.live.clone(),
                self.stats.clone(),
            );
            let jobs = self.workers.queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("shmesh-conn-{id}"))
                .spawn(move || {
                    live.fetch_add(1, Ordering::AcqRel);
                    if let Err(e) =
                        serve_connection(conn, id, &policy, &router, &shutdown, &stats, &jobs)
                    {
                        tracing::warn!(connection = id, "connection closed: {e}");
                    }
                    live.fetch_sub(1, Ordering::AcqRel);
                });
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => tracing::error!("cannot start a connection thread: {e}"),
            }
            workers.retain(|w| !w.is_finished());
        }
        for w in workers {
            let _ = w.join();
        }
    }
}

/// Why one connection ended badly.
#[derive(Debug, Error)]
enum ConnectionError {
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("connection segment: {0}")]
    Layout(#[from] LayoutError),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("cannot start the liveness watcher: {0}")]
    Thread(std::io::Error),
}

fn serve_connection(
    mut conn: Connection,
    id: u64,
    policy: &ServerPolicy,
    router: &Arc<Router>,
    shutdown: &AtomicBool,
    stats: &Arc<Stats>,
    jobs: &std::sync::mpsc::Sender<Job>,
) -> Result<(), ConnectionError> {
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    let mut made: Option<(Arc<Segment>, OwnedFd)> = None;
    let accepted = socket::server_handshake(&mut conn, policy, id, |limits| {
        let segment = layout::create(id as u32, limits)?;
        let share = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(|e| {
                LayoutError::Create(shmesh_shm::segment::CreateError::System {
                    step: "share",
                    source: e,
                })
            })
        };
        let segment_fd = share(segment.fd())?;
        let bell = layout::client_bell_fd()?;
        let bell_for_client = share(bell.as_fd())?;
        made = Some((segment, bell));
        Ok::<_, LayoutError>(vec![
            (FdRole::Segment, segment_fd),
            (FdRole::ClientDoorbell, bell_for_client),
        ])
    })
    .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    let Some((segment, client_bell)) = made else {
        return Err(ConnectionError::Handshake("no segment was made".into()));
    };
    let peer = accepted.peer;
    let granted = accepted.welcome.granted.clone();
    tracing::debug!(
        connection = id,
        pid = peer.pid,
        uid = peer.uid,
        "client connected"
    );
    let mut ends = ServerEnds::open(&segment, client_bell)?;
    let policy_wait = layout::wait_policy(&granted);

    // The socket is the liveness signal: it closes when the client dies.
    let dead = Arc::new(AtomicBool::new(false));
    conn.set_read_timeout(None)
        .map_err(|e| ConnectionError::Handshake(e.to_string()))?;
    let watcher_conn = conn
        .as_fd()
        .try_clone_to_owned()
        .map_err(ConnectionError::Thread)?;
    {
        let dead = dead.clone();
        let bell_segment = segment.clone();
        std::thread::Builder::new()
            .name(format!("shmesh-watch-{id}"))
            .spawn(move || {
                let mut conn = Connection::from(std::os::unix::net::UnixStream::from(watcher_conn));
                let _ = conn.recv_msg(0);
                dead.store(true, Ordering::Release);
                if let Ok(bell) = layout::server_bell(&bell_segment) {
                    bell.notify();
                }
            })
            .map_err(ConnectionError::Thread)?;
    }

    let mut connection = ConnectionState {
        router: router.clone(),
        peer,
        dead,
        recorder: stats.connection(id, peer),
        completions: Arc::new(Completions::default()),
        jobs: jobs.clone(),
    };
    let result = call_loop(&mut ends, &mut connection, policy_wait, shutdown);
    // Shut the socket down rather than only close it: the watcher holds a
    // duplicate of it, and both must see the end. The client learns we are
    // gone.
    let _ = rustix::net::shutdown(&conn, rustix::net::Shutdown::Both);
    result
}

/// What the connection's thread holds about its connection.
struct ConnectionState {
    router: Arc<Router>,
    peer: PeerCredentials,
    dead: Arc<AtomicBool>,
    recorder: ConnectionRecorder,
    completions: Arc<Completions>,
    jobs: std::sync::mpsc::Sender<Job>,
}

fn call_loop(
    ends: &mut ServerEnds,
    conn: &mut ConnectionState,
    policy: shmesh_shm::doorbell::WaitPolicy,
    shutdown: &AtomicBool,
) -> Result<(), ConnectionError> {
    loop {
        send_completions(ends, conn)?;
        // Take back the response slabs the client returned, once per pass:
        // handlers (here and on the workers) allocate from the pool next.
        // One load when there is nothing.
        drain_returned(&mut ends.returned, &ends.pool)?;
        let request = match ends.requests.try_pop() {
            Ok(Some(d)) => d,
            Ok(None) => {
                let dead = &conn.dead;
                let completions = &conn.completions;
                // Relaxed: a count, re-checked under its lock when taken.
                let idle = completions.outstanding.load(Ordering::Relaxed) == 0;
                if dead.load(Ordering::Acquire) || (shutdown.load(Ordering::Acquire) && idle) {
                    return Ok(());
                }
                let requests = &ends.requests;
                let _ = ends.server_bell.wait_for(policy, LIVENESS_SLICE, || {
                    requests.has_pending_hint()
                        || completions.queued.load(Ordering::Acquire) > 0
                        || dead.load(Ordering::Acquire)
                        || shutdown.load(Ordering::Acquire)
                });
                continue;
            }
            Err(e) => return Err(ConnectionError::Protocol(format!("request ring: {e}"))),
        };
        serve_one(ends, conn, request)?;
    }
}

/// Sends the answers offloaded handlers have finished.
fn send_completions(
    ends: &mut ServerEnds,
    conn: &mut ConnectionState,
) -> Result<(), ConnectionError> {
    // Acquire: pairs with the Release increment of a worker that queued one.
    if conn.completions.queued.load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    let ready = std::mem::take(
        &mut *conn
            .completions
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    // Relaxed: counts; the lock above ordered the completions themselves.
    conn.completions
        .queued
        .fetch_sub(ready.len() as u64, Ordering::Relaxed);
    conn.completions
        .outstanding
        .fetch_sub(ready.len() as u64, Ordering::Relaxed);
    for c in ready {
        conn.recorder
            .record(c.response.method_id, c.code, c.elapsed);
        send_response(ends, c.response, &conn.dead)?;
    }
    Ok(())
}

/// What a handler answered.
enum Answer<'p> {
    /// Bytes to copy into a response slab.
    Bytes(Vec<u8>),
    /// A response written in place (no slab: an empty response).
    InPlace(Option<shmesh_shm::pool::SlabMut<'p>>, usize),
    /// An error status.
    Failed(Status),
}

fn serve_one(
    ends: &mut ServerEnds,
    conn: &mut ConnectionState,
    d: Descriptor,
) -> Result<(), ConnectionError> {
    let started = std::time::Instant::now();
    let payload: &[u8] = if d.flags.contains(Flags::PAYLOAD) {
        ends.peer_pool
            .read(d.payload, d.len.into())
            .map_err(|e| ConnectionError::Protocol(format!("call {}: {e}", d.call_id)))?
    } else {
        &[]
    };
    let remaining = deadline::remaining(d.deadline_ns);
    let request = Request {
        method: d.method_id,
        payload,
        peer: conn.peer,
        remaining,
    };
    let answer = if remaining.is_some_and(|r| r.is_zero()) {
        Answer::Failed(Status::deadline_exceeded(
            "deadline passed before the server started the call",
        ))
    } else {
        match conn.router.handlers.get(&d.method_id) {
            None => Answer::Failed(Status::unimplemented(format!(
                "method {} is not served here",
                d.method_id
            ))),
            Some(Route::Copying(handler)) => match handler(&request) {
                Ok(bytes) => Answer::Bytes(bytes),
                Err(status) => Answer::Failed(status),
            },
            Some(Route::InPlace(handler)) => {
                let mut reply = Reply {
                    pool: &ends.pool,
                    slab: None,
                    len: 0,
                };
                match handler(&request, &mut reply) {
                    Ok(()) => Answer::InPlace(reply.slab, reply.len),
                    Err(status) => Answer::Failed(status),
                }
            }
            Some(Route::Offloaded(_)) => return offload(ends, conn, d, started),
        }
    };
    let code = match &answer {
        Answer::Failed(status) => status.code(),
        _ => Code::Ok,
    };
    conn.recorder.record(d.method_id, code, started.elapsed());
    // The request's slab needs no giving back: a unary response releases
    // its request (the client frees the slab when the answer arrives).
    // While the pool is exhausted, this thread is the one that can take
    // slabs back from the client.
    let pool = ends.pool.clone();
    let returned = &mut ends.returned;
    let response = build_response(&pool, &d, answer, &conn.dead, &mut || {
        drain_returned(returned, &pool)
    })?;
    send_response(ends, response, &conn.dead)
}

/// Hands call `d` to a worker thread; its answer comes back through the
/// connection's completions.
fn offload(
    ends: &ServerEnds,
    conn: &ConnectionState,
    d: Descriptor,
    started: std::time::Instant,
) -> Result<(), ConnectionError> {
    let (router, pool, peer_pool, bell) = (
        conn.router.clone(),
        ends.pool.clone(),
        ends.peer_pool.clone(),
        ends.server_bell.clone(),
    );
    let (completions, dead, peer) = (conn.completions.clone(), conn.dead.clone(), conn.peer);
    // Relaxed: a count for the shutdown condition.
    completions.outstanding.fetch_add(1, Ordering::Relaxed);
    let job: Job = Box::new(move || {
        // Checked by the connection's thread before the hand-off; the slab
        // stays the server's to read until it answers.
        let payload = if d.flags.contains(Flags::PAYLOAD) {
            peer_pool.read(d.payload, d.len.into()).unwrap_or(&[])
        } else {
            &[]
        };
        let request = Request {
            method: d.method_id,
            payload,
            peer,
            remaining: deadline::remaining(d.deadline_ns),
        };
        let answer = match router.handlers.get(&d.method_id) {
            Some(Route::Offloaded(handler)) => match handler(&request) {
                Ok(bytes) => Answer::Bytes(bytes),
                Err(status) => Answer::Failed(status),
            },
            _ => Answer::Failed(Status::internal("offloaded method has no blocking handler")),
        };
        let code = match &answer {
            Answer::Failed(status) => status.code(),
            _ => Code::Ok,
        };
        // A client that died meanwhile takes its answer with it.
        // The connection's thread takes slabs back; a worker waits for it.
        let Ok(response) = build_response(&pool, &d, answer, &dead, &mut || Ok(())) else {
            return;
        };
        let mut ready = completions.ready.lock().unwrap_or_else(|e| e.into_inner());
        ready.push(Completion {
            response,
            code,
            elapsed: started.elapsed(),
        });
        drop(ready);
        // Release: the completion above is visible to the connection's
        // thread once it sees the count.
        completions.queued.fetch_add(1, Ordering::Release);
        bell.notify();
    });
    conn.jobs
        .send(job)
        .map_err(|_| ConnectionError::Protocol("the server's workers are gone".into()))
}

/// Turns a handler's answer into the response descriptor, writing its
/// payload (bytes or an error status) into a slab of `pool`.
fn build_response(
    pool: &shmesh_shm::pool::Pool,
    d: &Descriptor,
    answer: Answer<'_>,
    dead: &AtomicBool,
    reclaim: &mut dyn FnMut() -> Result<(), ConnectionError>,
) -> Result<Descriptor, ConnectionError> {
    let mut response = Descriptor {
        call_id: d.call_id,
        method_id: d.method_id,
        flags: Flags::END,
        ..Default::default()
    };
    match answer {
        Answer::InPlace(None, _) => {}
        Answer::InPlace(Some(slab), len) => {
            response.flags = response.flags | Flags::PAYLOAD;
            response.len = len as u32;
            response.payload = slab.send();
        }
        Answer::Bytes(bytes) if bytes.is_empty() => {}
        Answer::Bytes(bytes) => {
            if let Some(mut slab) = alloc_retrying(pool, bytes.len(), dead, reclaim, &mut response)?
            {
                slab[..bytes.len()].copy_from_slice(&bytes);
                response.flags = response.flags | Flags::PAYLOAD;
                response.len = bytes.len() as u32;
                response.payload = slab.send();
            }
        }
        Answer::Failed(status) => {
            response.flags = response.flags | Flags::STATUS;
            response.status = status.code() as u32;
            let len = status.encoded_len();
            if let Some(mut slab) = alloc_retrying(pool, len, dead, reclaim, &mut response)?
                && let Ok(n) = status.encode_into(&mut slab)
            {
                response.flags = response.flags | Flags::PAYLOAD;
                response.len = n as u32;
                response.payload = slab.send();
            }
        }
    }
    Ok(response)
}

/// A slab for a response of `len` bytes, taking slabs back (`reclaim`) and
/// waiting for the client to return more while the pool is exhausted. A
/// response too large for any slab becomes a `ResourceExhausted` status
/// (written into `response`, no slab).
fn alloc_retrying<'p>(
    pool: &'p shmesh_shm::pool::Pool,
    len: usize,
    dead: &AtomicBool,
    reclaim: &mut dyn FnMut() -> Result<(), ConnectionError>,
    response: &mut Descriptor,
) -> Result<Option<shmesh_shm::pool::SlabMut<'p>>, ConnectionError> {
    loop {
        match pool.alloc(len) {
            Ok(slab) => return Ok(Some(slab)),
            Err(AllocError::Exhausted { .. }) => {
                if dead.load(Ordering::Acquire) {
                    return Err(ConnectionError::Protocol("client died".into()));
                }
                reclaim()?;
                std::thread::yield_now();
            }
            Err(e @ AllocError::TooLarge { .. }) => {
                response.flags = Flags::END | Flags::STATUS;
                response.status = Code::ResourceExhausted as u32;
                tracing::warn!("response dropped: {e}");
                return Ok(None);
            }
        }
    }
}

fn send_response(
    ends: &mut ServerEnds,
    response: Descriptor,
    dead: &AtomicBool,
) -> Result<(), ConnectionError> {
    push_retrying(&mut ends.responses, response, dead, "response ring")?;
    ends.client_bell.notify();
    Ok(())
}

/// Gives every response slab the client returned back to the pool.
fn drain_returned(
    returned: &mut Consumer<shmesh_shm::handle::SlabHandle>,
    pool: &shmesh_shm::pool::Pool,
) -> Result<(), ConnectionError> {
    loop {
        match returned.try_pop() {
            Ok(Some(h)) => pool
                .release_returned(h)
                .map_err(|e| ConnectionError::Protocol(format!("returned slab: {e}")))?,
            Ok(None) => return Ok(()),
            Err(e) => return Err(ConnectionError::Protocol(format!("return ring: {e}"))),
        }
    }
}

/// Pushes `entry`, yielding while the ring is full (the client drains it),
/// until it fits or the client dies (then the entry has nobody to go to).
fn push_retrying<E: Entry>(
    ring: &mut Producer<E>,
    entry: E,
    dead: &AtomicBool,
    what: &str,
) -> Result<(), ConnectionError> {
    let mut entry = entry;
    loop {
        match ring.try_push(entry) {
            Ok(()) => return Ok(()),
            Err(PushError::Full(back)) => {
                if dead.load(Ordering::Acquire) {
                    return Ok(());
                }
                entry = back;
                std::thread::yield_now();
            }
            Err(PushError::Corrupt(e)) => {
                return Err(ConnectionError::Protocol(format!("{what}: {e}")));
            }
        }
    }
}

/// A server running on a thread of its own, for tests and examples: shut
/// down and joined on drop.
pub struct BackgroundServer {
    handle: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    live: Arc<AtomicU64>,
}

impl BackgroundServer {
    /// Runs `server` on a new thread.
    pub fn spawn(server: Server) -> std::io::Result<Self> {
        let handle = server.shutdown_handle();
        let live = server.live.clone();
        let thread = std::thread::Builder::new()
            .name("shmesh-server".into())
            .spawn(move || server.serve())?;
        Ok(BackgroundServer {
            handle,
            thread: Some(thread),
            live,
        })
    }

    /// Connections being served now.
    pub fn live_connections(&self) -> u64 {
        self.live.load(Ordering::Acquire)
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
