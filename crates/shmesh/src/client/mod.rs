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

mod balanced;
pub(crate) mod call;
mod reconnecting;

use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::doorbell::{WaitPolicy, WaitTimedOut};
use shmesh_shm::pool::AllocError;
use shmesh_shm::ring::PushError;
use shmesh_shm::segment::Segment;
use thiserror::Error;

use crate::deadline;
use crate::endpoint::Endpoint;
use crate::handshake::{FdRole, Hello, Limits, PROTOCOL_VERSION, SchemaHash, ServiceName};
use crate::layout::{self, ClientEnds, LayoutError};
use crate::mailbox::{Mailbox, Waiter};
use crate::metadata::Metadata;
use crate::protocol::{self, MESSAGE, OPEN};
use crate::socket::{self, ConnectError, Connection, PeerCredentials};
use crate::status::{Code, Status};
use crate::{Address, AddressError};

pub use balanced::BalancedChannel;
pub use call::{Call, CallReceiver, CallSender};
pub use reconnecting::{Gap, ReconnectingChannel};

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
    /// The host daemon's socket, for `shm+svc://` addresses (default:
    /// [`daemon_socket`](crate::endpoint::daemon_socket)).
    pub daemon: Option<Address>,
}

impl ChannelOptions {
    /// Default limits for `service` with schema `schema_hash`.
    pub fn new(service: impl Into<String>, schema_hash: SchemaHash) -> Self {
        ChannelOptions {
            service: service.into(),
            schema_hash,
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(5),
            daemon: None,
        }
    }
}

/// Connecting a channel failed.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The address does not parse.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The address is neither a socket nor a service URI.
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// The host daemon's socket is not configured right.
    #[error(transparent)]
    DaemonSocket(#[from] crate::endpoint::DaemonSocketError),
    /// A `shm+svc://` address names another service than the options.
    #[error("address names service {address:?} but the channel is for {options:?}")]
    ServiceMismatch {
        /// The service in the address.
        address: String,
        /// The service in the options.
        options: String,
    },
    /// The host daemon's table of replicas is unusable.
    #[error("the host daemon's table of replicas: {0}")]
    Table(String),
    /// The host daemon brokered the connection but sent no liveness socket.
    #[error("the host daemon sent no liveness socket in its Welcome")]
    NoLiveness,
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

impl ChannelError {
    /// Why the server refused the connection, if it did (a schema or
    /// service mismatch, a version mismatch, limits, busy): for callers
    /// that act on the reason rather than show it.
    ///
    /// ```no_run
    /// # use shmesh::client::{Channel, ChannelOptions};
    /// use shmesh::RefuseReason;
    /// let options = ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]));
    /// if let Err(e) = Channel::connect("shm://@echo", &options) {
    ///     if let Some(RefuseReason::SchemaMismatch { client, server }) = e.refusal() {
    ///         eprintln!("built from another schema: {client} vs {server}");
    ///     }
    /// }
    /// ```
    pub fn refusal(&self) -> Option<&crate::RefuseReason> {
        match self {
            ChannelError::Connect(ConnectError::Refused(refuse)) => Some(refuse.reason()),
            _ => None,
        }
    }
}

/// A call in flight.
pub(crate) struct Pending {
    /// The request's slab: the server reads it until it answers, so it is
    /// freed when the response arrives (a unary response releases its
    /// request), whoever collects the response.
    request: Option<shmesh_shm::handle::SlabHandle>,
    pub(crate) state: CallState,
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
    /// A stream, or a unary call whose answer comes in chunks: everything
    /// for it goes to its mailbox.
    Streaming(Arc<Mailbox>),
}

pub(crate) struct Inner {
    ends_send: Mutex<shmesh_shm::ring::Producer<Descriptor>>,
    pub(crate) ends_recv: Mutex<shmesh_shm::ring::Consumer<Descriptor>>,
    returned: Mutex<shmesh_shm::ring::Consumer<shmesh_shm::handle::SlabHandle>>,
    give_back: Mutex<GiveBack>,
    /// A response slab waiting to ride back on the next unary request
    /// ([`protocol::pack_handle`]; 0 when empty).
    parked_give_back: AtomicU64,
    pool: Arc<shmesh_shm::pool::Pool>,
    /// The largest slab of our pool: larger requests go in chunks.
    pub(crate) max_slab: usize,
    /// The segment number in the server's slab handles.
    peer_segment: u32,
    peer_pool: shmesh_shm::pool::PoolView,
    server_bell: shmesh_shm::doorbell::Doorbell,
    pub(crate) client_bell: shmesh_shm::doorbell::EventDoorbell,
    pub(crate) policy: WaitPolicy,
    granted: Limits,
    max_message: u64,
    next_call: AtomicU64,
    pub(crate) pending: Mutex<HashMap<u64, Pending>>,
    pub(crate) dead: AtomicBool,
    /// Why the channel died, once it has.
    death: Mutex<Option<String>>,
    /// The server's credentials (`SO_PEERCRED` at connect), when the
    /// connection was made to the server's own socket.
    peer: Option<PeerCredentials>,
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

/// Response slabs to give back to the server, and those that did not fit
/// the return ring yet (retried on the next give-back; never waited on).
struct GiveBack {
    ring: shmesh_shm::ring::Producer<shmesh_shm::handle::SlabHandle>,
    overflow: Vec<shmesh_shm::handle::SlabHandle>,
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
/// (A buffer larger than the largest slab lives on the heap and is sent in
/// chunks.) One from [`Channel::loan_with`] also holds the call's metadata,
/// encoded ahead of the bytes it derefs to, and opens its call with it.
pub struct RequestBuf {
    pub(crate) body: RequestBody,
    /// The metadata block's length, ahead of the message (0: none).
    pub(crate) head: usize,
    pub(crate) len: usize,
}

pub(crate) enum RequestBody {
    Empty,
    Slab(shmesh_shm::pool::OwnedSlab),
    Heap(Vec<u8>),
}

impl std::ops::Deref for RequestBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.body {
            RequestBody::Empty => &[],
            RequestBody::Slab(s) => &s[self.head..self.head + self.len],
            RequestBody::Heap(v) => &v[self.head..],
        }
    }
}

impl std::ops::DerefMut for RequestBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let (head, len) = (self.head, self.len);
        match &mut self.body {
            RequestBody::Empty => &mut [],
            RequestBody::Slab(s) => &mut s[head..head + len],
            RequestBody::Heap(v) => &mut v[head..],
        }
    }
}

impl RequestBuf {
    /// The metadata block and the message, if the buffer is on the heap
    /// (larger than a slab).
    pub(crate) fn heap(&self) -> Option<(&[u8], &[u8])> {
        match &self.body {
            RequestBody::Heap(v) => Some(v.split_at(self.head)),
            _ => None,
        }
    }

    /// Whether the buffer carries its call's metadata.
    pub fn has_metadata(&self) -> bool {
        self.head > 0
    }
}

impl std::fmt::Debug for RequestBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBuf")
            .field("len", &self.len)
            .field("metadata_len", &self.head)
            .finish()
    }
}

/// A response (or a message of a stream) in shared memory: derefs to its
/// bytes, read in place, and gives its slab back to the server when
/// dropped. (A message larger than a slab came in chunks and was assembled
/// on the heap.)
pub struct Response {
    body: ResponseBody,
}

enum ResponseBody {
    Shared {
        inner: Arc<Inner>,
        descriptor: Descriptor,
    },
    Owned(Vec<u8>),
}

impl Response {
    /// A message assembled from chunks.
    pub(crate) fn owned(bytes: Vec<u8>) -> Self {
        Response {
            body: ResponseBody::Owned(bytes),
        }
    }

    /// The message `d` carries, in place (its handle already checked).
    pub(crate) fn shared(inner: Arc<Inner>, d: Descriptor) -> Self {
        Response {
            body: ResponseBody::Shared {
                inner,
                descriptor: d,
            },
        }
    }
}

impl std::ops::Deref for Response {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.body {
            ResponseBody::Shared { inner, descriptor } => {
                if !descriptor.flags.contains(Flags::PAYLOAD) {
                    return &[];
                }
                // Checked when the response was accepted.
                inner
                    .peer_pool
                    .read(descriptor.payload, descriptor.len.into())
                    .unwrap_or(&[])
            }
            ResponseBody::Owned(v) => v,
        }
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
        if let ResponseBody::Shared { inner, descriptor } = &self.body
            && descriptor.flags.contains(Flags::PAYLOAD)
        {
            inner.give_back_slab(descriptor.payload);
        }
    }
}

impl Channel {
    /// Connects to the server at `address` (`shm:///path` or `shm://@name`).
    pub fn connect(address: &str, options: &ChannelOptions) -> Result<Channel, ChannelError> {
        let endpoint: Endpoint = address.parse()?;
        let socket_address = match &endpoint {
            Endpoint::Socket(address) => address.clone(),
            Endpoint::Service(name) => {
                if name.as_str() != options.service {
                    return Err(ChannelError::ServiceMismatch {
                        address: name.to_string(),
                        options: options.service.clone(),
                    });
                }
                match &options.daemon {
                    Some(daemon) => daemon.clone(),
                    None => crate::endpoint::daemon_socket()?,
                }
            }
        };
        let mut conn = socket::connect(&socket_address)?;
        conn.set_read_timeout(Some(options.connect_timeout))
            .map_err(ChannelError::Socket)?;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            service: ServiceName::new(options.service.clone())?,
            schema_hash: options.schema_hash,
            requested: options.limits.clone(),
        };
        let (welcome, fds) = socket::client_handshake(&mut conn, &hello)?;
        let via_daemon = matches!(endpoint, Endpoint::Service(_));
        Self::from_welcome(conn, welcome, fds, via_daemon)
    }

    /// Builds the channel from an accepted handshake: `conn` is the socket
    /// the Welcome came on, `fds` its fds in the order of its roles.
    pub(crate) fn from_welcome(
        conn: Connection,
        welcome: crate::handshake::Welcome,
        fds: Vec<std::os::fd::OwnedFd>,
        via_daemon: bool,
    ) -> Result<Channel, ChannelError> {
        let mut segment_fd = None;
        let mut bell_fd = None;
        let mut liveness_fd = None;
        for (role, fd) in welcome.fds.as_slice().iter().zip(fds) {
            match role {
                FdRole::Segment => segment_fd = Some(fd),
                FdRole::ClientDoorbell => bell_fd = Some(fd),
                FdRole::Liveness => liveness_fd = Some(fd),
                FdRole::ServerDoorbell => {}
            }
        }
        // Through the daemon, the socket is the daemon's: its credentials
        // would name the daemon, not the server.
        let peer = if via_daemon {
            None
        } else {
            Some(conn.peer_credentials().map_err(ChannelError::Socket)?)
        };
        // Through the daemon, the server is at the other end of a socket
        // pair the daemon made; the daemon's own socket is done with.
        let conn = match (liveness_fd, via_daemon) {
            (Some(fd), _) => Connection::from(std::os::unix::net::UnixStream::from(fd)),
            (None, true) => return Err(ChannelError::NoLiveness),
            (None, false) => conn,
        };
        let segment_fd = segment_fd.ok_or(ChannelError::NoSegment)?;
        let bell_fd = bell_fd.ok_or(ChannelError::NoDoorbell)?;
        let segment = Segment::open(segment_fd)?;
        Self::from_handed_over(crate::socket::HandedOver {
            conn,
            connection_id: welcome.connection_id,
            granted: welcome.granted,
            segment,
            client_bell: bell_fd,
            peer,
        })
    }

    /// The client's side of a connection set up by someone else (the host
    /// daemon, which creates the segment and the socket pair and forwards
    /// calls through channels of its own): `handed.conn` is the liveness
    /// socket whose other end the server holds.
    pub fn from_handed_over(handed: crate::socket::HandedOver) -> Result<Channel, ChannelError> {
        let crate::socket::HandedOver {
            conn,
            granted,
            segment,
            client_bell: bell_fd,
            peer,
            ..
        } = handed;
        let ends = ClientEnds::open(&segment, bell_fd)?;
        let max_slab = ends
            .pool
            .layout()
            .classes
            .last()
            .map_or(0, |c| usize::try_from(c.slab_size).unwrap_or(usize::MAX));
        let socket = std::os::fd::AsFd::as_fd(&conn)
            .try_clone_to_owned()
            .map_err(ChannelError::Socket)?;
        let inner = Arc::new(Inner {
            ends_send: Mutex::new(ends.requests),
            ends_recv: Mutex::new(ends.responses),
            returned: Mutex::new(ends.returned),
            give_back: Mutex::new(GiveBack {
                ring: ends.give_back,
                overflow: Vec::new(),
            }),
            parked_give_back: AtomicU64::new(0),
            peer_segment: ends.peer_pool.layout().segment,
            pool: Arc::new(ends.pool),
            max_slab,
            peer_pool: ends.peer_pool,
            server_bell: ends.server_bell,
            client_bell: ends.client_bell,
            policy: layout::wait_policy(&granted),
            max_message: granted.max_message,
            granted,
            next_call: AtomicU64::new(1),
            pending: Mutex::new(HashMap::default()),
            dead: AtomicBool::new(false),
            death: Mutex::new(None),
            peer,
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
        self.inner
            .loan(len, &Metadata::new(), timeout.map(|t| Instant::now() + t))
    }

    /// [`Channel::loan`] for a call that carries `metadata`: the buffer
    /// holds the encoded metadata ahead of the `len` bytes it derefs to,
    /// and the call it opens ([`Channel::send`],
    /// [`Channel::server_stream_buf`], or the first message of a
    /// [`Call`]) carries it, still in one descriptor. Empty metadata makes
    /// a plain loan. `ResourceExhausted` if the encoded metadata does not
    /// fit the connection's largest slab.
    ///
    /// ```no_run
    /// # use shmesh::client::{Channel, ChannelOptions};
    /// use shmesh::Metadata;
    /// # let channel = Channel::connect("shm://@echo", &ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]))).unwrap();
    /// let mut metadata = Metadata::new();
    /// metadata.insert("tenant", "blue").unwrap();
    /// let mut request = channel.loan_with(5, &metadata, None).unwrap();
    /// request.copy_from_slice(b"hello");
    /// let response = channel.send(1, request, None).unwrap();
    /// ```
    pub fn loan_with(
        &self,
        len: usize,
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<RequestBuf, Status> {
        self.inner
            .loan(len, metadata, timeout.map(|t| Instant::now() + t))
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
        self.inner.call(method, request, &Metadata::new(), timeout)
    }

    /// [`Channel::call`] with `metadata`: the handler reads it with
    /// [`Request::metadata`](crate::server::Request::metadata). Still one
    /// descriptor each way; without metadata the same as
    /// [`Channel::call`].
    ///
    /// ```no_run
    /// # use shmesh::client::{Channel, ChannelOptions};
    /// use shmesh::Metadata;
    /// # let channel = Channel::connect("shm://@echo", &ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]))).unwrap();
    /// let mut metadata = Metadata::new();
    /// metadata.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?;
    /// let response = channel.call_with(1, b"hello", &metadata, None)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn call_with(
        &self,
        method: u32,
        request: &[u8],
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        self.inner.call(method, request, metadata, timeout)
    }

    /// Opens a streaming call to `method` (client streaming or
    /// bidirectional): send messages on the returned [`Call`], then close
    /// its sending side and receive. The whole call must end within
    /// `timeout`.
    pub fn open(&self, method: u32, timeout: Option<Duration>) -> Result<Call, Status> {
        self.open_with(method, &Metadata::new(), timeout)
    }

    /// [`Channel::open`] with `metadata`, sent with the call's opening
    /// descriptor; the handler reads it with
    /// [`ServerStream::metadata`](crate::server::ServerStream::metadata).
    pub fn open_with(
        &self,
        method: u32,
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<Call, Status> {
        let mut call = Call::start(
            &self.inner,
            method,
            timeout,
            timeout.map(|t| Instant::now() + t),
            call::Kind::OpenWithMessage,
        )?;
        call.set_metadata(metadata)?;
        call.open_now()?;
        Ok(call)
    }

    /// [`Channel::server_stream`] with `metadata`.
    pub fn server_stream_with(
        &self,
        method: u32,
        request: &[u8],
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<Call, Status> {
        let mut call = Call::start(
            &self.inner,
            method,
            timeout,
            timeout.map(|t| Instant::now() + t),
            call::Kind::OpenWithMessage,
        )?;
        call.set_metadata(metadata)?;
        call.send_message(request, true, true)?;
        Ok(call)
    }

    /// Opens a server-streaming call to `method` with its one `request`:
    /// receive the server's messages on the returned [`Call`] until `None`.
    ///
    /// ```no_run
    /// # use shmesh::client::{Channel, ChannelOptions};
    /// # let channel = Channel::connect("shm://@echo", &ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]))).unwrap();
    /// let mut call = channel.server_stream(2, b"count to 3", None).unwrap();
    /// while let Some(message) = call.recv().unwrap() {
    ///     println!("{} bytes", message.len());
    /// }
    /// ```
    pub fn server_stream(
        &self,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Call, Status> {
        let mut call = Call::start(
            &self.inner,
            method,
            timeout,
            timeout.map(|t| Instant::now() + t),
            call::Kind::OpenWithMessage,
        )?;
        call.send_message(request, true, true)?;
        Ok(call)
    }

    /// [`Channel::server_stream`] with a request written in place into a
    /// buffer from [`Channel::loan`]: no copy.
    pub fn server_stream_buf(
        &self,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
    ) -> Result<Call, Status> {
        let mut call = Call::start(
            &self.inner,
            method,
            timeout,
            timeout.map(|t| Instant::now() + t),
            call::Kind::OpenWithMessage,
        )?;
        call.send_last_buf(request)?;
        Ok(call)
    }

    /// The limits the server granted this channel (ring depth, pool, wait
    /// mode, largest message).
    pub fn limits(&self) -> &Limits {
        &self.inner.granted
    }

    /// The server process's credentials, as the kernel recorded them when
    /// the connection was made (`SO_PEERCRED`): unforgeable, but they
    /// describe the server as it was at connect time. `None` when the host
    /// daemon brokered the connection (`shm+svc://`): the socket was the
    /// daemon's, so the kernel's record names the daemon, not the server.
    ///
    /// ```no_run
    /// # use shmesh::client::{Channel, ChannelOptions};
    /// # let channel = Channel::connect("shm://@echo", &ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]))).unwrap();
    /// if let Some(server) = channel.peer() {
    ///     println!("served by pid {} (uid {})", server.pid, server.uid);
    /// }
    /// ```
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.inner.peer
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
            match &p.state {
                CallState::Waiting(w) => w.wake(),
                CallState::Streaming(mailbox) => mailbox.update(|_| {}),
                _ => {}
            }
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        // Acquire: pairs with the Release store in `kill`.
        self.dead.load(Ordering::Acquire)
    }

    pub(crate) fn unavailable(&self) -> Status {
        let why = lock(&self.death)
            .clone()
            .unwrap_or_else(|| "connection is dead".to_owned());
        Status::unavailable(why)
    }

    /// Gives a response slab back to the server. Never waits: a full return
    /// ring keeps the slab aside until the next give-back.
    pub(crate) fn give_back_slab(&self, handle: shmesh_shm::handle::SlabHandle) {
        if self.is_dead() {
            return;
        }
        // The next unary request carries one slab back for free; park this
        // one for it, and send the one parked before (if any) by the ring.
        let handle = match protocol::pack_handle(handle) {
            Some(word) => {
                // AcqRel: the slot is a hand-over between threads.
                match self.parked_give_back.swap(word, Ordering::AcqRel) {
                    0 => return,
                    previous => protocol::unpack_handle(handle.segment, previous),
                }
            }
            None => handle,
        };
        let mut g = lock(&self.give_back);
        g.overflow.push(handle);
        while let Some(&h) = g.overflow.first() {
            match g.ring.try_push(h) {
                Ok(()) => {
                    g.overflow.swap_remove(0);
                }
                Err(PushError::Full(_)) => break,
                Err(PushError::Corrupt(e)) => {
                    drop(g);
                    self.kill(format!("return ring corrupt: {e}"));
                    return;
                }
            }
        }
    }

    /// Gives back the slab a server descriptor carries, unread.
    /// Wakes the server after a push, if it may be asleep: a server granted
    /// `Poll` never parks, so its bell needs no fence.
    pub(crate) fn ring_server(&self) {
        if self.policy.mode != shmesh_shm::doorbell::WaitMode::Poll {
            self.server_bell.notify();
        }
    }

    /// Takes the parked response slab for a request to carry back.
    fn take_parked_give_back(&self) -> Option<u64> {
        // AcqRel: see `give_back_slab`.
        match self.parked_give_back.swap(0, Ordering::AcqRel) {
            0 => None,
            word => Some(word),
        }
    }

    pub(crate) fn discard(&self, d: &Descriptor) {
        if d.flags.contains(Flags::PAYLOAD) {
            self.give_back_slab(d.payload);
        }
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

    pub(crate) fn broken(&self, why: String) -> Status {
        self.kill(why);
        self.unavailable()
    }

    fn call(
        self: &Arc<Self>,
        method: u32,
        request: &[u8],
        metadata: &Metadata,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut buf = self.loan(request.len(), metadata, deadline)?;
        buf.copy_from_slice(request);
        self.send_until(method, buf, timeout, deadline)
    }

    /// A request buffer of `len` bytes behind `metadata`'s block.
    pub(crate) fn loan(
        &self,
        len: usize,
        metadata: &Metadata,
        deadline: Option<Instant>,
    ) -> Result<RequestBuf, Status> {
        if self.is_dead() {
            return Err(self.unavailable());
        }
        self.check_size(len)?;
        let head = metadata.encoded_len();
        self.check_block(head)?;
        let total = head + len;
        let mut body = if total == 0 {
            RequestBody::Empty
        } else if total > self.max_slab {
            RequestBody::Heap(vec![0; total])
        } else {
            RequestBody::Slab(self.alloc(total, deadline)?)
        };
        match &mut body {
            RequestBody::Slab(slab) => metadata.encode_into(&mut slab[..head]),
            RequestBody::Heap(v) => metadata.encode_into(&mut v[..head]),
            RequestBody::Empty => {}
        }
        Ok(RequestBuf { body, head, len })
    }

    /// A metadata block must fit the opening descriptor's slab whole.
    pub(crate) fn check_block(&self, len: usize) -> Result<(), Status> {
        if len > self.max_slab {
            return Err(Status::resource_exhausted(format!(
                "call metadata of {len} bytes does not fit the connection's largest slab of {} bytes",
                self.max_slab
            )));
        }
        Ok(())
    }

    pub(crate) fn check_size(&self, len: usize) -> Result<(), Status> {
        if len as u64 > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "message of {len} bytes exceeds the connection's limit of {} bytes",
                self.max_message
            )));
        }
        Ok(())
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
        if let Some((block, bytes)) = request.heap() {
            // Larger than a slab: sent in chunks under flow control.
            let mut call = Call::start(self, method, timeout, deadline, call::Kind::ChunkedUnary)?;
            call.set_block(block.to_vec());
            call.send_message(bytes, true, true)?;
            return call.recv_unary();
        }
        // Nobody to wake yet: a caller that leads finds its own answer; one
        // that follows says where it parks before it does.
        let call = self.start(method, request, timeout, deadline, Waiter::Task(None))?;
        let answer = self.wait_for(call.call_id, deadline);
        self.end(call, answer, deadline)
    }

    /// Registers and pushes a unary call; the returned guard abandons it if
    /// the caller goes away before [`Inner::end`].
    pub(crate) fn start(
        self: &Arc<Self>,
        method: u32,
        request: RequestBuf,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
        waiter: Waiter,
    ) -> Result<CallGuard, Status> {
        if self.is_dead() {
            return Err(self.unavailable());
        }
        let call_id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let mut d = Descriptor {
            call_id,
            method_id: method,
            flags: OPEN | MESSAGE | Flags::END,
            deadline_ns: deadline::to_wire(timeout),
            ..Default::default()
        };
        match request.body {
            RequestBody::Empty => {}
            RequestBody::Slab(slab) => {
                if !slab.is_from(&self.pool) {
                    return Err(Status::invalid_argument(
                        "request buffer loaned from another channel",
                    ));
                }
                d.len = (request.head + request.len) as u32;
                d.flags = d.flags | Flags::PAYLOAD;
                if request.head > 0 {
                    d.flags = d.flags | protocol::METADATA;
                }
                d.payload = slab.send();
            }
            RequestBody::Heap(_) => {
                return Err(Status::internal("a chunked request took the unary path"));
            }
        }
        let request_slab = d.flags.contains(Flags::PAYLOAD).then_some(d.payload);
        let carried = self.take_parked_give_back();
        if let Some(word) = carried {
            d.flags = d.flags | protocol::GIVES_BACK;
            d.aux = word;
        }
        lock(&self.pending).insert(
            call_id,
            Pending {
                request: request_slab,
                state: CallState::Waiting(waiter),
            },
        );
        if let Err(status) = self.push_request(d, deadline) {
            lock(&self.pending).remove(&call_id);
            if let Some(word) = carried {
                // Not sent: back by the ring (or parked again).
                self.give_back_slab(protocol::unpack_handle(self.peer_segment, word));
            }
            if d.flags.contains(Flags::PAYLOAD) {
                // Never published: the slab is still ours; take it back as
                // if the server had returned it.
                let _ = self.pool.release_returned(d.payload);
            }
            return Err(status);
        }
        self.ring_server();
        Ok(CallGuard {
            inner: self.clone(),
            call_id,
            ended: false,
        })
    }

    /// Ends a unary call with the outcome of its wait.
    pub(crate) fn end(
        self: &Arc<Self>,
        mut call: CallGuard,
        answer: Result<Answer, Status>,
        deadline: Option<Instant>,
    ) -> Result<Response, Status> {
        match answer {
            Ok(Answer::Done(d)) => {
                call.ended = true;
                drop(call);
                self.finish(d)
            }
            Ok(Answer::Streamed(mailbox)) => {
                // The answer comes in chunks: read it as a stream.
                let result = Call::resume(self, call.call_id, mailbox, deadline).recv_unary();
                call.ended = true;
                result
            }
            Err(status) => Err(status),
        }
    }

    /// A caller gives up on `call_id`: the server is told (it may stop
    /// working on it); if the request's slab is still with the server, the
    /// entry stays until the answer comes to free it.
    pub(crate) fn abandon(&self, call_id: u64) {
        let mut pending = lock(&self.pending);
        let Some(p) = pending.get_mut(&call_id) else {
            // Ended already.
            return;
        };
        if self.is_dead() {
            pending.remove(&call_id);
            return;
        }
        let old = if p.request.is_some() {
            std::mem::replace(&mut p.state, CallState::Abandoned)
        } else {
            pending
                .remove(&call_id)
                .map_or(CallState::Abandoned, |p| p.state)
        };
        drop(pending);
        if let CallState::Streaming(mailbox) = old {
            let unread = std::mem::take(&mut mailbox.lock().inbox);
            for d in unread {
                self.discard(&d);
            }
        }
        self.send_control(protocol::cancel(call_id));
    }

    /// Sends a control descriptor (credit, cancel). Waits a little while
    /// the ring is full; a control message that cannot go is dropped, which
    /// costs at worst a stalled stream of a caller that is going away.
    pub(crate) fn send_control(&self, d: Descriptor) {
        let give_up = Instant::now() + Duration::from_millis(100);
        if self.push_request(d, Some(give_up)).is_ok() {
            self.ring_server();
        }
    }

    /// Records a server descriptor `d`: frees the request's slab when the
    /// call ends, then hands `d` to its call (`mine` is the collecting
    /// caller's own call) or, if nobody wants it, gives its slab back.
    /// Returns the collecting caller's answer if `d` brought it.
    fn complete(&self, d: Descriptor, mine: u64) -> Result<Option<Mine>, Status> {
        let mut pending = lock(&self.pending);
        let Some(entry) = pending.get_mut(&d.call_id) else {
            drop(pending);
            // An id we never used, or a call that ended or was abandoned.
            self.discard(&d);
            return Ok(None);
        };
        let ends = d.flags.contains(Flags::END);
        if ends
            && let Some(h) = entry.request.take()
            && let Err(e) = self.pool.release_returned(h)
        {
            drop(pending);
            return Err(self.broken(format!("request slab of call {}: {e}", d.call_id)));
        }
        match &mut entry.state {
            CallState::Waiting(_) if ends && !d.flags.contains(protocol::MORE) => {
                if d.call_id == mine {
                    pending.remove(&mine);
                    return Ok(Some(Mine {
                        answer: Answer::Done(d),
                        others: !pending.is_empty(),
                    }));
                }
                if let CallState::Waiting(w) =
                    std::mem::replace(&mut entry.state, CallState::Done(d))
                {
                    w.wake();
                }
            }
            CallState::Waiting(_) => {
                // More than one descriptor: a chunked answer.
                let mailbox = Arc::new(Mailbox::default());
                call::deliver(&mailbox, d);
                let old =
                    std::mem::replace(&mut entry.state, CallState::Streaming(mailbox.clone()));
                if ends {
                    pending.remove(&d.call_id);
                }
                if d.call_id == mine {
                    return Ok(Some(Mine {
                        answer: Answer::Streamed(mailbox),
                        others: true,
                    }));
                }
                if let CallState::Waiting(w) = old {
                    w.wake();
                }
            }
            CallState::Streaming(mailbox) => {
                let mailbox = mailbox.clone();
                if ends {
                    pending.remove(&d.call_id);
                }
                drop(pending);
                call::deliver(&mailbox, d);
            }
            CallState::Abandoned => {
                if ends {
                    pending.remove(&d.call_id);
                }
                drop(pending);
                self.discard(&d);
            }
            CallState::Done(_) => {
                // A second answer to one call: keep the first.
                drop(pending);
                self.discard(&d);
            }
        }
        Ok(None)
    }

    /// A slab for `len` bytes if one is free (after taking back those the
    /// server returned).
    pub(crate) fn try_alloc(
        &self,
        len: usize,
    ) -> Result<Option<shmesh_shm::pool::OwnedSlab>, Status> {
        match self.pool.alloc_owned(len) {
            Ok(slab) => Ok(Some(slab)),
            Err(AllocError::Exhausted { .. }) => {
                self.drain_returned()?;
                Ok(self.pool.alloc_owned(len).ok())
            }
            Err(e @ AllocError::TooLarge { .. }) => Err(Status::resource_exhausted(e.to_string())),
        }
    }

    pub(crate) fn alloc(
        &self,
        len: usize,
        deadline: Option<Instant>,
    ) -> Result<shmesh_shm::pool::OwnedSlab, Status> {
        loop {
            if let Some(slab) = self.try_alloc(len)? {
                return Ok(slab);
            }
            if self.is_dead() {
                return Err(self.unavailable());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Status::deadline_exceeded(
                    "no free slab before the deadline (pool exhausted)",
                ));
            }
            std::thread::yield_now();
        }
    }

    pub(crate) fn push_request(
        &self,
        d: Descriptor,
        deadline: Option<Instant>,
    ) -> Result<(), Status> {
        let mut d = d;
        loop {
            let pushed = lock(&self.ends_send).try_push(d);
            match pushed {
                Ok(()) => return Ok(()),
                Err(PushError::Full(back)) => {
                    d = back;
                    if self.is_dead() {
                        return Err(self.unavailable());
                    }
                    // The server may be waiting for room for its answers:
                    // take them in while we wait (call id 0 is never ours,
                    // so every answer goes to its caller).
                    if let Ok(mut ring) = self.ends_recv.try_lock() {
                        self.collect(&mut ring, 0)?;
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

    /// Waits for unary call `call_id`'s answer.
    fn wait_for(&self, call_id: u64, deadline: Option<Instant>) -> Result<Answer, Status> {
        loop {
            if let Some(a) = take_if_done(&mut lock(&self.pending), call_id) {
                return Ok(a);
            }
            if self.is_dead() {
                return Err(self.unavailable());
            }
            // The clock is read only when a wait ran out, not on every pass.
            let waited_out = match self.ends_recv.try_lock() {
                Ok(mut ring) => {
                    // While we hold the ring nobody else collects: our
                    // answer can only come through us, so lead until it does
                    // (or a wait runs out) without looking at the table.
                    loop {
                        match self.lead(&mut ring, call_id, deadline, &|| false)? {
                            Led::Mine(m) => {
                                drop(ring);
                                if m.others {
                                    self.promote_a_follower();
                                }
                                return Ok(m.answer);
                            }
                            Led::Woken if self.is_dead() => break false,
                            Led::Woken => {}
                            Led::WaitedOut => break true,
                        }
                    }
                }
                Err(_) => {
                    if !self.park_here(call_id) {
                        // The answer is in.
                        continue;
                    }
                    // Registered first, then looked again: a leader that
                    // left before the registration left the ring free.
                    if self.ends_recv.try_lock().is_ok() {
                        continue;
                    }
                    std::thread::park_timeout(LIVENESS_SLICE);
                    true
                }
            };
            if waited_out && deadline.is_some_and(|t| Instant::now() >= t) {
                return Err(Status::deadline_exceeded("no response before the deadline"));
            }
        }
    }

    /// Registers this thread to be woken when unary call `call_id`'s answer
    /// is in; `false` if it is in already (or the call is gone).
    fn park_here(&self, call_id: u64) -> bool {
        let mut pending = lock(&self.pending);
        match pending.get_mut(&call_id) {
            Some(p) if matches!(p.state, CallState::Waiting(_)) => {
                p.state = CallState::Waiting(Waiter::Thread(std::thread::current()));
                true
            }
            _ => false,
        }
    }

    /// Waits until `ready` holds for a streaming call's mailbox, leading
    /// the collection of responses when nobody else does.
    pub(crate) fn wait_mailbox(
        &self,
        call_id: u64,
        mailbox: &Mailbox,
        deadline: Option<Instant>,
        ready: &dyn Fn(&crate::mailbox::MailboxState) -> bool,
    ) -> Result<(), Status> {
        loop {
            {
                let mut state = mailbox.lock();
                if ready(&state) {
                    return Ok(());
                }
                // Registered before looking for a leader, so a hand-over
                // between the look and the park is not lost.
                state.wait_with(Waiter::Thread(std::thread::current()));
            }
            if self.is_dead() {
                return Err(self.unavailable());
            }
            let is_ready = || ready(&mailbox.lock());
            let waited_out = match self.ends_recv.try_lock() {
                Ok(mut ring) => match self.lead(&mut ring, call_id, deadline, &is_ready)? {
                    Led::Mine(_) | Led::Woken => false,
                    Led::WaitedOut => true,
                },
                Err(_) => {
                    std::thread::park_timeout(LIVENESS_SLICE);
                    true
                }
            };
            if is_ready() {
                self.promote_a_follower();
                return Ok(());
            }
            if waited_out && deadline.is_some_and(|t| Instant::now() >= t) {
                return Err(Status::deadline_exceeded("no response before the deadline"));
            }
        }
    }

    /// As the leader: pops responses, hands out others', returns ours if in.
    /// Waits on the doorbell for at most one liveness slice, unless `done`.
    fn lead(
        &self,
        ring: &mut shmesh_shm::ring::Consumer<Descriptor>,
        call_id: u64,
        deadline: Option<Instant>,
        done: &dyn Fn() -> bool,
    ) -> Result<Led, Status> {
        if let Some(m) = self.collect_mine(ring, call_id)? {
            return Ok(Led::Mine(m));
        }
        if done() {
            return Ok(Led::Woken);
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
    /// `call_id`'s answer if it was among them.
    pub(crate) fn collect(
        &self,
        ring: &mut shmesh_shm::ring::Consumer<Descriptor>,
        call_id: u64,
    ) -> Result<Option<Answer>, Status> {
        Ok(self.collect_mine(ring, call_id)?.map(|m| m.answer))
    }

    /// [`Inner::collect`], also saying whether other calls were pending
    /// when ours came (so a follower may need promoting).
    fn collect_mine(
        &self,
        ring: &mut shmesh_shm::ring::Consumer<Descriptor>,
        call_id: u64,
    ) -> Result<Option<Mine>, Status> {
        let mut mine = None;
        loop {
            match ring.try_pop() {
                Ok(Some(d)) => {
                    if let Some(m) = self.complete(d, call_id)? {
                        mine = Some(m);
                    }
                }
                Ok(None) => return Ok(mine),
                Err(e) => return Err(self.broken(format!("response ring corrupt: {e}"))),
            }
        }
    }

    /// Wakes one waiting caller so it takes over reading responses.
    pub(crate) fn promote_a_follower(&self) {
        let pending = lock(&self.pending);
        for p in pending.values() {
            match &p.state {
                CallState::Waiting(w) if w.is_parked() => {
                    w.wake();
                    return;
                }
                CallState::Streaming(mailbox) if mailbox.wake_waiters() => return,
                _ => {}
            }
        }
    }

    /// Turns a unary response descriptor into the caller's result.
    fn finish(self: &Arc<Self>, d: Descriptor) -> Result<Response, Status> {
        if d.flags.contains(Flags::PAYLOAD)
            && let Err(e) = self.peer_pool.read(d.payload, d.len.into())
        {
            return Err(self.broken(format!("server sent a bad response handle: {e}")));
        }
        let response = Response::shared(self.clone(), d);
        if d.flags.contains(Flags::STATUS) && d.status != Code::Ok as u32 {
            let status = Status::decode(d.status, &response[..]).unwrap_or_else(|e| {
                Status::internal(format!("undecodable status from server: {e}"))
            });
            return Err(status);
        }
        Ok(response)
    }
}

/// A unary call's answer, as its wait found it.
pub(crate) enum Answer {
    /// One descriptor.
    Done(Descriptor),
    /// In chunks: the rest arrives in this mailbox.
    Streamed(Arc<Mailbox>),
}

/// A collecting caller's own answer.
struct Mine {
    answer: Answer,
    /// Other calls were pending: a follower may be waiting to lead.
    others: bool,
}

/// What a leader's turn came to.
enum Led {
    /// Our own answer.
    Mine(Mine),
    /// Something arrived (or the channel died): look again.
    Woken,
    /// The wait ran out: time to check the deadline.
    WaitedOut,
}

/// A unary call between [`Inner::start`] and [`Inner::end`]. Dropped early
/// (a timed-out wait, a cancelled future), it abandons the call: the server
/// is told, and the entry stays until the answer comes and frees the slabs.
pub(crate) struct CallGuard {
    inner: Arc<Inner>,
    pub(crate) call_id: u64,
    ended: bool,
}

impl CallGuard {
    /// The call is someone else's to end now.
    pub(crate) fn disarm(mut self) {
        self.ended = true;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.inner.abandon(self.call_id);
        }
    }
}

/// Takes a unary call's answer if it is in.
pub(crate) fn take_if_done(pending: &mut HashMap<u64, Pending>, call_id: u64) -> Option<Answer> {
    match pending.get(&call_id).map(|p| &p.state) {
        Some(CallState::Done(_)) => match pending.remove(&call_id)?.state {
            CallState::Done(d) => Some(Answer::Done(d)),
            _ => None,
        },
        Some(CallState::Streaming(mailbox)) => Some(Answer::Streamed(mailbox.clone())),
        _ => None,
    }
}
