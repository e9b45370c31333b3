//! The server: accepts connections, gives each its own segment, and serves
//! its calls.
//!
//! Each connection has a thread of its own that reads its request ring
//! (`dispatch.rs`). Handlers are registered per method in a [`Router`]:
//!
//! - [`Router::route`] and [`Router::route_in_place`]: quick unary handlers
//!   run on the connection's thread, with no hand-off (the fast path);
//! - [`Router::route_blocking`]: unary handlers that may block, on the
//!   server's worker threads;
//! - [`Router::route_async`] and [`Router::route_async_in_place`]: async
//!   unary handlers, as tasks on a tokio runtime;
//! - [`Router::route_stream`] and [`Router::route_stream_async`]: server-,
//!   client- and bidirectional streaming handlers, on the workers or as
//!   tasks;
//! - [`Router::fallback_in_place`] and [`Router::fallback_stream`]: every
//!   unary call and every stream to a method without a handler of its own
//!   (a proxy).
//!
//! A handler sees the request's bytes in place in shared memory, the
//! caller's credentials, the time left before the caller's deadline and
//! whether the caller cancelled, and returns the response or a [`Status`].
//!
//! # Answers without a copy
//!
//! Every kind of handler can write its answer in place, in a slab of the
//! connection's pool that the client then reads: [`Reply::loan`] for
//! [`Router::route_in_place`], [`AsyncRequest::loan`] for
//! [`Router::route_async_in_place`], and `loan` + `send_buf` on a stream
//! ([`ServerStream`], [`AsyncServerStream`], [`SendHalf`]), each a
//! [`ReplyBuf`]. Loans wait while the pool is exhausted; one larger than
//! the largest slab lives on the heap and is copied out in chunks.
//! Answers given as bytes (`Vec<u8>`, `&[u8]`) are copied into slabs;
//! [`StatsSnapshot::copied_bytes`](crate::stats::StatsSnapshot::copied_bytes)
//! counts those copies.
//! A connection whose peer breaks the protocol (a corrupt ring, a forged
//! handle, a flow-control overrun) is closed with a logged error; the
//! server keeps serving everyone else. A client that dies is noticed when
//! its socket closes, and its connection, segment and slabs go with it.

mod dispatch;
mod link;
mod loan;
mod registration;
mod stream;
#[cfg(feature = "tokio")]
mod task;

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;

use crate::endpoint::Endpoint;
use crate::handshake::{Limits, SchemaHash, ServerPolicy, ServiceName, ServiceNameError};
use crate::mailbox::Mailbox;
use crate::metadata::Metadata;
use crate::socket::{self, Listener, PeerCredentials};
use crate::stats::Stats;
use crate::status::Status;
use crate::{Address, AddressError, BindError};

pub use loan::ReplyBuf;
pub use registration::RegisterError;
pub use stream::{Message, ServerStream, StreamSender};
#[cfg(feature = "tokio")]
pub use task::{AsyncRequest, AsyncServerStream, HandlerFuture, RecvHalf, SendHalf};

/// The runtime async handlers run on, if the server has one.
#[cfg(feature = "tokio")]
pub(crate) type Runtime = Option<tokio::runtime::Handle>;
/// Without tokio there are no async handlers.
#[cfg(not(feature = "tokio"))]
pub(crate) type Runtime = ();

/// One incoming unary call, as a handler sees it.
pub struct Request<'a> {
    /// The method called.
    pub method: u32,
    /// The request's bytes, in place in shared memory (or assembled, if it
    /// came in chunks).
    pub payload: &'a [u8],
    /// Who called: from `SO_PEERCRED` at connect time.
    pub peer: PeerCredentials,
    /// Time left before the caller's deadline, if it set one.
    pub remaining: Option<Duration>,
    /// The call's metadata (empty if it carried none), already checked.
    metadata: &'a Metadata,
    /// The call's mailbox, for a call served off the connection's thread.
    call: Option<&'a Mailbox>,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("len", &self.payload.len())
            .field("peer", &self.peer)
            .field("remaining", &self.remaining)
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl<'a> Request<'a> {
    /// The metadata the caller sent with the call (empty if none): a trace
    /// context, say. Copied out of shared memory and checked before the
    /// handler runs.
    pub fn metadata(&self) -> &'a Metadata {
        self.metadata
    }

    /// Whether the client cancelled the call (it gave up or went away). A
    /// handler on a worker ([`Router::route_blocking`]) that runs long should
    /// check now and then; handlers on the connection's thread are meant to
    /// be quick, and see `false`.
    pub fn is_cancelled(&self) -> bool {
        self.call.is_some_and(Mailbox::is_cancelled)
    }
}

/// A method's handler that returns its response as bytes (copied into
/// shared memory).
pub type Handler = dyn Fn(&Request<'_>) -> Result<Vec<u8>, Status> + Send + Sync;

/// A method's handler that writes its response in place.
pub type InPlaceHandler = dyn Fn(&Request<'_>, &mut Reply<'_>) -> Result<(), Status> + Send + Sync;

/// A streaming method's blocking handler.
pub type StreamHandler = dyn Fn(&mut ServerStream) -> Result<(), Status> + Send + Sync;

enum Route {
    Copying(Box<Handler>),
    InPlace(Box<InPlaceHandler>),
    /// Run on the server's worker threads, off the connection's thread.
    Offloaded(Box<Handler>),
    /// A streaming handler on the worker threads.
    Stream(Arc<StreamHandler>),
    /// An async unary handler on the runtime.
    #[cfg(feature = "tokio")]
    Async(Arc<task::AsyncHandler>),
    /// An async streaming handler on the runtime.
    #[cfg(feature = "tokio")]
    AsyncStream(Arc<task::AsyncStreamHandler>),
}

impl Route {
    fn is_streaming(&self) -> bool {
        match self {
            Route::Stream(_) => true,
            #[cfg(feature = "tokio")]
            Route::AsyncStream(_) => true,
            _ => false,
        }
    }

    #[cfg(feature = "tokio")]
    fn is_async(&self) -> bool {
        matches!(self, Route::Async(_) | Route::AsyncStream(_))
    }
}

/// Where an in-place handler writes its response: a slab of the server's
/// pool, loaned once per call (or, for a response larger than any slab,
/// a buffer sent in chunks).
pub struct Reply<'p> {
    link: &'p link::Link,
    body: ReplyBody<'p>,
}

/// What a [`Reply`] holds.
pub(crate) enum ReplyBody<'p> {
    Empty,
    Slab(shmesh_shm::pool::SlabMut<'p>, usize),
    Heap(Vec<u8>),
}

impl std::fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = match &self.body {
            ReplyBody::Empty => 0,
            ReplyBody::Slab(_, len) => *len,
            ReplyBody::Heap(v) => v.len(),
        };
        f.debug_struct("Reply").field("len", &len).finish()
    }
}

impl<'p> Reply<'p> {
    fn new(link: &'p link::Link) -> Self {
        Reply {
            link,
            body: ReplyBody::Empty,
        }
    }

    fn into_body(self) -> ReplyBody<'p> {
        self.body
    }

    /// Loans the `len`-byte response buffer (once per call; a second loan
    /// replaces the first), waiting while the client holds every slab. A
    /// response larger than the largest slab gets a buffer of its own, sent
    /// in chunks; one larger than the connection's message limit is
    /// `ResourceExhausted`.
    pub fn loan(&mut self, len: usize) -> Result<&mut [u8], Status> {
        self.body = ReplyBody::Empty;
        self.link.check_size(len)?;
        if len > self.link.max_slab {
            self.body = ReplyBody::Heap(vec![0; len]);
        } else if len > 0 {
            self.body = ReplyBody::Slab(self.link.alloc(len)?, len);
        }
        Ok(match &mut self.body {
            ReplyBody::Empty => &mut [],
            ReplyBody::Slab(slab, len) => &mut slab[..*len],
            ReplyBody::Heap(v) => v,
        })
    }
}

/// Handlers by method id.
#[derive(Default)]
pub struct Router {
    handlers: HashMap<u32, Route>,
    /// The route of every unary call to a method without one of its own.
    fallback: Option<Route>,
    /// The route of every stream opened on a method without one of its
    /// own.
    stream_fallback: Option<Route>,
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

    /// Serves every unary call to a method that has no handler of its own
    /// with an in-place handler on the connection's thread (a proxy, say;
    /// the method is in [`Request::method`]). Streams opened on such
    /// methods go to [`Router::fallback_stream`], or are answered
    /// `Unimplemented` without one.
    pub fn fallback_in_place(
        mut self,
        handler: impl Fn(&Request<'_>, &mut Reply<'_>) -> Result<(), Status> + Send + Sync + 'static,
    ) -> Self {
        self.fallback = Some(Route::InPlace(Box::new(handler)));
        self
    }

    /// Serves every stream (server, client or bidirectional streaming)
    /// opened on a method that has no handler of its own with a blocking
    /// handler on the server's worker threads, as [`Router::route_stream`]
    /// does (a proxy, say; the method is in [`ServerStream::method`]).
    ///
    /// The server tells a stream from a unary call by the opening
    /// descriptor's [`STREAM`](crate::protocol::STREAM) flag, which every
    /// stream the client library opens carries: it cannot tell them apart
    /// otherwise without knowing the method. Unary calls to such methods
    /// go to [`Router::fallback_in_place`], or are answered
    /// `Unimplemented` without one.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// // Echo every message of every stream, whatever the method.
    /// let router = Router::new().fallback_stream(|call| {
    ///     while let Some(message) = call.recv()? {
    ///         let echo = message.to_vec();
    ///         call.send(&echo)?;
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn fallback_stream(
        mut self,
        handler: impl Fn(&mut ServerStream) -> Result<(), Status> + Send + Sync + 'static,
    ) -> Self {
        self.stream_fallback = Some(Route::Stream(Arc::new(handler)));
        self
    }

    /// The route for a call to `method`: its own, else the fallback for
    /// its kind (`stream`: opened as a stream).
    fn route_for(&self, method: u32, stream: bool) -> Option<&Route> {
        if let Some(own) = self.handlers.get(&method) {
            return Some(own);
        }
        if stream {
            self.stream_fallback.as_ref()
        } else {
            self.fallback.as_ref()
        }
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

    /// Serves the streaming `method` (server, client or bidirectional
    /// streaming) with a blocking handler, run on the server's worker
    /// threads. The handler receives the client's messages and sends its
    /// own through the [`ServerStream`]; its result ends the call.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// // Server streaming: one request, as many responses as it asks for.
    /// let router = Router::new().route_stream(2, |call| {
    ///     let request = call.recv()?.map(|m| m.to_vec()).unwrap_or_default();
    ///     for i in 0..request.first().copied().unwrap_or(0) {
    ///         call.send(&[i])?;
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn route_stream(
        mut self,
        method: u32,
        handler: impl Fn(&mut ServerStream) -> Result<(), Status> + Send + Sync + 'static,
    ) -> Self {
        self.handlers
            .insert(method, Route::Stream(Arc::new(handler)));
        self
    }

    /// Serves `method` with an async handler, run as a task on the server's
    /// tokio runtime (the one current at [`Server::bind`], or one the server
    /// starts). The task is dropped at its next await if the client cancels
    /// or the deadline passes. The response it returns is copied into
    /// shared memory; [`Router::route_async_in_place`] saves the copy.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// let router = Router::new().route_async(1, |request| async move {
    ///     tokio::task::yield_now().await; // await anything
    ///     Ok(request.payload().to_vec())
    /// });
    /// ```
    #[cfg(feature = "tokio")]
    pub fn route_async<F, Fut>(mut self, method: u32, handler: F) -> Self
    where
        F: Fn(AsyncRequest) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Vec<u8>, Status>> + Send + 'static,
    {
        let boxed = move |request| -> HandlerFuture<ReplyBuf> {
            let reply = handler(request);
            Box::pin(async move { reply.await.map(ReplyBuf::heap) })
        };
        self.handlers.insert(method, Route::Async(Arc::new(boxed)));
        self
    }

    /// Serves `method` with an async handler that writes its response in
    /// place: it loans the response buffer with [`AsyncRequest::loan`]
    /// (awaiting a slab while the pool is exhausted), writes it, and
    /// returns it; the client reads those very bytes. Otherwise as
    /// [`Router::route_async`]: a task on the server's runtime, dropped at
    /// its next await if the client cancels or the deadline passes.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// let router = Router::new().route_async_in_place(1, |request| async move {
    ///     let mut reply = request.loan(request.payload().len()).await?;
    ///     reply.copy_from_slice(request.payload());
    ///     reply.make_ascii_uppercase();
    ///     Ok(reply)
    /// });
    /// ```
    #[cfg(feature = "tokio")]
    pub fn route_async_in_place<F, Fut>(mut self, method: u32, handler: F) -> Self
    where
        F: Fn(AsyncRequest) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<ReplyBuf, Status>> + Send + 'static,
    {
        let boxed = move |request| -> HandlerFuture<ReplyBuf> { Box::pin(handler(request)) };
        self.handlers.insert(method, Route::Async(Arc::new(boxed)));
        self
    }

    /// Serves the streaming `method` with an async handler, run as a task
    /// on the server's tokio runtime; dropped at its next await if the
    /// client cancels or the deadline passes.
    ///
    /// ```
    /// # use shmesh::server::Router;
    /// let router = Router::new().route_stream_async(2, |mut call| async move {
    ///     while let Some(message) = call.recv().await? {
    ///         let echo = message.to_vec();
    ///         call.send(&echo).await?;
    ///     }
    ///     Ok(())
    /// });
    /// ```
    #[cfg(feature = "tokio")]
    pub fn route_stream_async<F, Fut>(mut self, method: u32, handler: F) -> Self
    where
        F: Fn(AsyncServerStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), Status>> + Send + 'static,
    {
        let boxed = move |call| -> HandlerFuture<()> { Box::pin(handler(call)) };
        self.handlers
            .insert(method, Route::AsyncStream(Arc::new(boxed)));
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
    /// The address is neither a socket nor a service URI.
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// A `shm+svc://` address names another service than the one served.
    #[error("address names service {address:?} but the server serves {service:?}")]
    ServiceMismatch {
        /// The service in the address.
        address: String,
        /// The service served.
        service: String,
    },
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Registering with the host daemon failed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The worker threads could not start.
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
}

/// Where a server's connections come from.
enum Source {
    /// Its own socket.
    Socket(Listener),
    /// The host daemon, which hands them over; the registration made at
    /// bind time waits here for [`Server::serve`].
    Daemon {
        source: registration::DaemonSource,
        pending: std::sync::Mutex<Option<registration::Session>>,
    },
    /// Only connections handed over with [`Server::serve_handed_over`].
    Detached,
}

/// A server for one service at one address.
pub struct Server {
    source: Source,
    policy: ServerPolicy,
    router: Arc<Router>,
    shutdown: Arc<AtomicBool>,
    next_connection: AtomicU64,
    live: Arc<AtomicU64>,
    stats: Arc<Stats>,
    workers: Arc<Workers>,
    runtime: Runtime,
    /// How long shutdown waits for calls in progress before it closes their
    /// connections anyway.
    grace: Duration,
    /// The runtime the server started for its async handlers, if none was
    /// current at bind time.
    #[cfg(feature = "tokio")]
    own_runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let address = match &self.source {
            Source::Socket(listener) => listener.address().to_string(),
            Source::Daemon { source, .. } => format!("{} (host daemon)", source.daemon),
            Source::Detached => "(detached)".to_owned(),
        };
        f.debug_struct("Server")
            .field("address", &address)
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "tokio")]
impl Drop for Server {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which tokio forbids inside another
        // runtime; letting its threads go in the background never does.
        if let Some(rt) = self.own_runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A job for a worker thread.
type Job = Box<dyn FnOnce() + Send>;

/// The threads that run blocking handlers (offloaded unary calls, streams,
/// large answers), shared by all connections. A stream holds its thread for
/// as long as it lasts, so the pool grows when every thread is busy (up to
/// [`Workers::MAX`]) and shrinks back when threads stay idle.
struct Workers {
    queue: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    jobs: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<Job>>>,
    /// Threads waiting for a job.
    idle: Arc<AtomicU64>,
    /// Threads alive.
    threads: Arc<AtomicU64>,
}

impl Workers {
    /// The most threads the pool grows to; jobs beyond wait their turn.
    const MAX: u64 = 512;
    /// Threads kept however idle.
    const KEEP: u64 = 2;
    /// How long an extra thread idles before it exits.
    const IDLE_EXIT: Duration = Duration::from_secs(10);

    fn start() -> std::io::Result<Self> {
        let (queue, jobs) = std::sync::mpsc::channel::<Job>();
        let workers = Workers {
            queue: std::sync::Mutex::new(queue),
            jobs: Arc::new(std::sync::Mutex::new(jobs)),
            idle: Arc::new(AtomicU64::new(0)),
            threads: Arc::new(AtomicU64::new(0)),
        };
        for _ in 0..Self::KEEP {
            workers.spawn_thread()?;
        }
        Ok(workers)
    }

    fn spawn_thread(&self) -> std::io::Result<()> {
        let (jobs, idle, threads) = (self.jobs.clone(), self.idle.clone(), self.threads.clone());
        let count = self.threads.clone();
        // Relaxed: counters that steer growth; a stale value only costs a
        // thread more or a job a short wait.
        let n = threads.fetch_add(1, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name(format!("shmesh-worker-{n}"))
            .spawn(move || {
                loop {
                    idle.fetch_add(1, Ordering::Relaxed);
                    let job = {
                        let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
                        rx.recv_timeout(Self::IDLE_EXIT)
                    };
                    idle.fetch_sub(1, Ordering::Relaxed);
                    match job {
                        Ok(job) => job(),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            if threads.load(Ordering::Relaxed) > Self::KEEP {
                                break;
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                threads.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            count.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    /// Queues `job`, starting a thread for it if every thread is busy.
    fn submit(&self, job: Job) -> Result<(), Job> {
        // Relaxed: see `spawn_thread`.
        if self.idle.load(Ordering::Relaxed) == 0
            && self.threads.load(Ordering::Relaxed) < Self::MAX
            && let Err(e) = self.spawn_thread()
        {
            tracing::warn!("cannot start another worker thread: {e}");
        }
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.send(job).map_err(|e| e.0)
    }
}

/// Stops a running [`Server::serve`] from another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    shutdown: Arc<AtomicBool>,
    wake: Wake,
}

/// How to wake a server blocked waiting for its next connection.
#[derive(Debug, Clone)]
enum Wake {
    /// Connect to its socket.
    Connect(Address),
    /// Close its registration with the host daemon.
    Close(Arc<std::sync::Mutex<Option<std::os::fd::OwnedFd>>>),
    /// Nothing to wake: a detached server waits for nothing.
    Nothing,
}

impl ShutdownHandle {
    /// Stops accepting; connections finish the calls already sent (within
    /// the server's grace period), then close. A server registered with the
    /// host daemon withdraws its registration.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        match &self.wake {
            // Wake the accept loop with a connection it will drop at once.
            Wake::Connect(address) => {
                let _ = socket::connect(address);
            }
            Wake::Close(current) => registration::DaemonSource::close(current),
            Wake::Nothing => {}
        }
    }
}

impl Server {
    /// Binds `address` for `service` with schema `schema_hash`.
    ///
    /// `address` is the server's own socket (`shm:///path`, `shm://@name`),
    /// or `shm+svc://SERVICE` to serve through the host daemon found by
    /// [`daemon_socket`](crate::endpoint::daemon_socket): the server then
    /// registers as a replica of the service (failing here if the daemon
    /// cannot be reached or refuses) and serves the connections the daemon
    /// hands over ([`Server::register_with`] names the daemon explicitly).
    pub fn bind(
        address: &str,
        service: &str,
        schema_hash: SchemaHash,
        router: Router,
    ) -> Result<Server, ServerError> {
        match address.parse()? {
            Endpoint::Socket(address) => {
                let policy = ServerPolicy::new(ServiceName::new(service)?, schema_hash);
                Self::with_source(Source::Socket(Listener::bind(&address)?), policy, router)
            }
            Endpoint::Service(name) => {
                if name.as_str() != service {
                    return Err(ServerError::ServiceMismatch {
                        address: name.to_string(),
                        service: service.to_owned(),
                    });
                }
                let daemon = crate::endpoint::daemon_socket().map_err(RegisterError::from)?;
                Self::register_with(&daemon, service, schema_hash, router)
            }
        }
    }

    /// Registers with the host daemon listening at `daemon` as a replica of
    /// `service`, to serve the connections it hands over (see
    /// [`Server::bind`] with a `shm+svc://` address).
    pub fn register_with(
        daemon: &Address,
        service: &str,
        schema_hash: SchemaHash,
        router: Router,
    ) -> Result<Server, ServerError> {
        let policy = ServerPolicy::new(ServiceName::new(service)?, schema_hash);
        let source = registration::DaemonSource::new(daemon.clone(), &policy, String::new())?;
        let session = source.register(&policy)?;
        tracing::info!(
            service,
            daemon = %daemon,
            replica = session.replica,
            "registered with the host daemon"
        );
        let source = Source::Daemon {
            source,
            pending: std::sync::Mutex::new(Some(session)),
        };
        Self::with_source(source, policy, router)
    }

    /// A server with no socket and no registration, for connections set up
    /// by someone else and handed over with [`Server::serve_handed_over`]
    /// (the host daemon's mediated path serves clients this way).
    pub fn detached(
        service: &str,
        schema_hash: SchemaHash,
        router: Router,
    ) -> Result<Server, ServerError> {
        let policy = ServerPolicy::new(ServiceName::new(service)?, schema_hash);
        Self::with_source(Source::Detached, policy, router)
    }

    /// Serves a connection set up by someone else, on a thread of its own,
    /// until it ends (see [`HandedOver`](crate::socket::HandedOver)).
    pub fn serve_handed_over(
        &self,
        handed: crate::socket::HandedOver,
    ) -> Option<std::thread::JoinHandle<()>> {
        let peer = match handed.peer {
            Some(peer) => peer,
            None => match handed.conn.peer_credentials() {
                Ok(peer) => peer,
                Err(e) => {
                    tracing::warn!("cannot identify a handed-over client: {e}");
                    return None;
                }
            },
        };
        let established = dispatch::Established {
            conn: handed.conn,
            id: handed.connection_id,
            granted: handed.granted,
            segment: handed.segment,
            client_bell: handed.client_bell,
            peer,
        };
        self.spawn_connection(established.id, move |context| {
            dispatch::serve_established(established, context)
        })
    }

    fn with_source(
        source: Source,
        policy: ServerPolicy,
        router: Router,
    ) -> Result<Server, ServerError> {
        #[cfg(feature = "tokio")]
        let (runtime, own_runtime) = if router.handlers.values().any(Route::is_async) {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => (Some(handle), None),
                Err(_) => {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name("shmesh-async")
                        .enable_all()
                        .build()
                        .map_err(ServerError::Workers)?;
                    (Some(rt.handle().clone()), Some(rt))
                }
            }
        } else {
            (None, None)
        };
        Ok(Server {
            source,
            policy,
            router: Arc::new(router),
            shutdown: Arc::new(AtomicBool::new(false)),
            next_connection: AtomicU64::new(1),
            live: Arc::new(AtomicU64::new(0)),
            stats: Arc::new(Stats::default()),
            workers: Arc::new(Workers::start().map_err(ServerError::Workers)?),
            grace: Duration::from_secs(30),
            #[cfg(feature = "tokio")]
            runtime,
            #[cfg(feature = "tokio")]
            own_runtime,
            #[cfg(not(feature = "tokio"))]
            runtime: (),
        })
    }

    /// The most a client may be granted (defaults to [`Limits::default`]).
    pub fn set_max_limits(&mut self, max: Limits) {
        self.policy.max = max;
        // The daemon negotiates for a registered server: withdraw the
        // registration (closing it, so the daemon forgets the old limits at
        // once) and register again with the new ones. If that fails,
        // `serve` keeps trying.
        if let Source::Daemon { source, pending } = &self.source {
            let mut pending = crate::client::lock(pending);
            if pending.take().is_some() {
                registration::DaemonSource::close(&source.current);
            }
            match source.register(&self.policy) {
                Ok(session) => *pending = Some(session),
                Err(e) => tracing::warn!("registering again with the new limits: {e}"),
            }
        }
    }

    /// How long a shutdown lets calls in progress (a long stream, a slow
    /// handler) finish before it closes their connections anyway, which
    /// fails them with `Unavailable` on the client (default 30 s).
    pub fn set_shutdown_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// A handle to stop [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        let wake = match &self.source {
            Source::Socket(listener) => Wake::Connect(listener.address().clone()),
            Source::Daemon { source, .. } => Wake::Close(source.current.clone()),
            Source::Detached => Wake::Nothing,
        };
        ShutdownHandle {
            shutdown: self.shutdown.clone(),
            wake,
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
        let connections = match &self.source {
            Source::Socket(listener) => self.serve_socket(listener),
            Source::Daemon { source, pending } => {
                let session = crate::client::lock(pending).take();
                self.serve_daemon(source, session)
            }
            Source::Detached => Vec::new(),
        };
        for c in connections {
            let _ = c.join();
        }
    }

    fn serve_socket(&self, listener: &Listener) -> Vec<std::thread::JoinHandle<()>> {
        let mut connections = Vec::new();
        while !self.shutdown.load(Ordering::Acquire) {
            let conn = match listener.accept() {
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
            connections.extend(self.spawn_connection(id, move |context| {
                dispatch::serve_connection(conn, id, context)
            }));
            connections.retain(|c| !c.is_finished());
        }
        connections
    }

    /// Serves what the host daemon hands over; registers again whenever the
    /// daemon goes away, until shut down.
    fn serve_daemon(
        &self,
        source: &registration::DaemonSource,
        mut session: Option<registration::Session>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        const RETRY_FIRST: Duration = Duration::from_millis(50);
        const RETRY_MAX: Duration = Duration::from_secs(2);
        /// How often the load page is refreshed (and its counters, when
        /// they changed).
        const PUBLISH_EVERY: Duration = Duration::from_millis(10);
        let mut connections = Vec::new();
        {
            let (page, stats, shutdown) = (
                source.load.clone(),
                self.stats.clone(),
                self.shutdown.clone(),
            );
            let publisher = std::thread::Builder::new()
                .name("shmesh-load".into())
                .spawn(move || {
                    // The daemon reads the counters from the page for
                    // `/metrics` and `shmesh status`: no message, no cost
                    // per call (they are recorded in process memory, and
                    // copied here at most every tick).
                    let mut published = Vec::new();
                    let mut too_large_logged = false;
                    while !shutdown.load(Ordering::Acquire) {
                        let (in_flight, connections) = stats.load();
                        page.publish(shmesh_shm::load::Load {
                            in_flight,
                            connections,
                        });
                        let report =
                            crate::control::encode_report(&crate::control::ReplicaStats::from(&stats.snapshot()));
                        if report != published {
                            match page.publish_report(&report) {
                                Ok(()) => published = report,
                                Err(e) if !too_large_logged => {
                                    too_large_logged = true;
                                    tracing::warn!(
                                        "this replica's counters no longer fit its load page ({e}); the daemon sees the last that did"
                                    );
                                }
                                Err(_) => {}
                            }
                        }
                        std::thread::sleep(PUBLISH_EVERY);
                    }
                });
            if let Err(e) = publisher {
                tracing::warn!("cannot publish this replica's load: {e}");
            }
        }
        let mut retry = RETRY_FIRST;
        while !self.shutdown.load(Ordering::Acquire) {
            let current = match session.take() {
                Some(current) => current,
                None => match source.register(&self.policy) {
                    Ok(current) => {
                        tracing::info!(
                            service = %self.policy.service,
                            replica = current.replica,
                            "registered with the host daemon"
                        );
                        retry = RETRY_FIRST;
                        current
                    }
                    Err(e) => {
                        tracing::debug!("registering again: {e}");
                        let until = std::time::Instant::now() + retry;
                        while std::time::Instant::now() < until
                            && !self.shutdown.load(Ordering::Acquire)
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        retry = (retry * 2).min(RETRY_MAX);
                        continue;
                    }
                },
            };
            self.serve_session(source, current, &mut connections);
            if !self.shutdown.load(Ordering::Acquire) {
                tracing::warn!(
                    service = %self.policy.service,
                    daemon = %source.daemon,
                    "lost the host daemon; its connections go on, registering again"
                );
            }
        }
        connections
    }

    /// Reads one registration's messages until it ends.
    fn serve_session(
        &self,
        source: &registration::DaemonSource,
        mut session: registration::Session,
        connections: &mut Vec<std::thread::JoinHandle<()>>,
    ) {
        use crate::control::{self, FromDaemon, ToDaemon};
        /// Fds an adoption carries: liveness, segment, doorbell.
        const ADOPT_FDS: usize = 3;
        loop {
            let (bytes, fds) = match session.recv.recv_msg(ADOPT_FDS) {
                Ok(message) => message,
                Err(_) => return,
            };
            match control::decode_from_daemon(&bytes) {
                Ok(FromDaemon::Adopt(adoption)) => {
                    let established = match source.adopt(&adoption, fds, &self.policy.max) {
                        Ok(established) => established,
                        Err(e) => {
                            tracing::warn!("cannot serve a connection from the host daemon: {e}");
                            continue;
                        }
                    };
                    let id = established.id;
                    let send = session.send.clone();
                    let live = source.live.clone();
                    let closed = move || {
                        crate::client::lock(&live).remove(&id);
                        let message = control::encode(&ToDaemon::Closed { connection: id });
                        // A daemon that is gone learns nothing; the next
                        // one never knew of this connection.
                        let _ = crate::client::lock(&send).send_msg(&message, &[]);
                    };
                    connections.extend(self.spawn_connection(id, move |context| {
                        let result = dispatch::serve_established(established, context);
                        closed();
                        result
                    }));
                    connections.retain(|c| !c.is_finished());
                }
                Ok(FromDaemon::Revoke { connection }) => {
                    if source.revoke(connection) {
                        tracing::info!(connection, "the host daemon revoked a connection");
                    }
                }
                Ok(other) => {
                    tracing::warn!(
                        "unexpected {} from the host daemon",
                        registration::kind(&other)
                    );
                }
                Err(e) => {
                    tracing::warn!("unreadable message from the host daemon: {e}");
                    return;
                }
            }
        }
    }

    /// Runs `serve` for connection `id` on a thread of its own.
    fn spawn_connection(
        &self,
        id: u64,
        serve: impl FnOnce(&dispatch::ServerContext<'_>) -> Result<(), dispatch::ConnectionError>
        + Send
        + 'static,
    ) -> Option<std::thread::JoinHandle<()>> {
        let grace = self.grace;
        let (policy, router, shutdown, live, stats, workers, runtime) = (
            self.policy.clone(),
            self.router.clone(),
            self.shutdown.clone(),
            self.live.clone(),
            self.stats.clone(),
            self.workers.clone(),
            self.runtime.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("shmesh-conn-{id}"))
            .spawn(move || {
                live.fetch_add(1, Ordering::AcqRel);
                let context = dispatch::ServerContext {
                    policy: &policy,
                    router: &router,
                    shutdown: &shutdown,
                    stats: &stats,
                    workers: &workers,
                    runtime: &runtime,
                    grace,
                };
                if let Err(e) = serve(&context) {
                    tracing::warn!(connection = id, "connection closed: {e}");
                }
                live.fetch_sub(1, Ordering::AcqRel);
            });
        match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!("cannot start a connection thread: {e}");
                None
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
