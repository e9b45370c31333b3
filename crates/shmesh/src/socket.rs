//! Blocking Unix-socket setup: listen, connect, framed messages with file
//! descriptors, peer credentials, and the handshake over them.
//!
//! This is the slow path: it runs once per connection. It is built on std's
//! [`UnixListener`] and [`UnixStream`] and rustix's safe `sendmsg`/`recvmsg`.
//!
//! # Framing
//!
//! A Unix stream socket has no message boundaries, so [`Connection`] frames
//! each message as a little-endian `u32` byte count and the bytes, at most
//! [`MAX_FRAME_LEN`]. File descriptors ride, as `SCM_RIGHTS`, with the first
//! byte of their frame. The receiver reads exactly the 4-byte prefix and
//! then exactly the announced bytes, never past the frame, so the fds the
//! kernel delivers while it reads a frame are that frame's. A frame whose
//! fds exceed what the receiver accepts is still consumed whole: its fds are
//! closed and the excess reported, and the stream stays in step.
//!
//! An error in the middle of a frame (the peer closed, a timeout, an absurd
//! length) leaves that direction of the stream out of step: every later call
//! in that direction fails with a `Broken` error, and the connection should
//! be dropped. The other direction is unaffected (a client whose Hello met a
//! closed socket can still read the server's last word).
//!
//! # Example
//!
//! ```
//! use shmesh::Address;
//! use shmesh::handshake::{FdRole, Hello, Limits, PROTOCOL_VERSION, SchemaHash, ServerPolicy,
//!                         ServiceName};
//! use shmesh::socket::{Listener, client_handshake, connect, server_handshake};
//!
//! let address: Address = format!("shm://@shmesh-doc-{}", std::process::id()).parse().unwrap();
//! let listener = Listener::bind(&address).unwrap();
//! let policy = ServerPolicy::new(ServiceName::new("echo").unwrap(), SchemaHash([1; 32]));
//!
//! let server = std::thread::spawn(move || {
//!     let mut conn = listener.accept().unwrap();
//!     server_handshake(&mut conn, &policy, 42, |_granted| {
//!         let segment = rustix::fs::memfd_create("segment", rustix::fs::MemfdFlags::CLOEXEC)?;
//!         Ok::<_, std::io::Error>(vec![(FdRole::Segment, segment)])
//!     })
//!     .unwrap()
//! });
//!
//! let mut conn = connect(&address).unwrap();
//! let hello = Hello {
//!     protocol_version: PROTOCOL_VERSION,
//!     service: ServiceName::new("echo").unwrap(),
//!     schema_hash: SchemaHash([1; 32]),
//!     requested: Limits::default(),
//! };
//! let (welcome, fds) = client_handshake(&mut conn, &hello).unwrap();
//! assert_eq!(welcome.connection_id, 42);
//! assert_eq!(welcome.fds.as_slice(), [FdRole::Segment]);
//! assert_eq!(fds.len(), 1);
//! let accepted = server.join().unwrap();
//! assert_eq!(accepted.peer.pid, std::process::id() as i32);
//! ```

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use thiserror::Error;

use crate::addr::{Address, Target};
use crate::handshake::{
    self, FdRole, FdRoles, GrantExceedsRequest, HandshakeError, Hello, Limits, MAX_WELCOME_FDS,
    Msg, Refuse, RefuseReason, ServerPolicy, WIRE_VERSION, Welcome,
};

/// Largest message [`Connection::send_msg`] sends and
/// [`Connection::recv_msg`] accepts, in bytes (not counting the prefix).
pub const MAX_FRAME_LEN: usize = 64 << 10;

/// Most file descriptors one message carries: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS_PER_MSG: usize = 253;

/// Bytes of the length prefix.
const PREFIX_LEN: usize = 4;

/// Control-buffer space for the most fds one `recvmsg` can deliver.
const RECV_CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MSG));

// ---------------------------------------------------------------------------
// Errors

/// [`Listener::bind`] failed.
#[derive(Debug, Error)]
pub enum BindError {
    /// Something other than a socket is at the path; it is left alone.
    #[error(
        "cannot listen on {address}: the path exists and is not a socket; refusing to replace it"
    )]
    NotASocket {
        /// The address.
        address: Address,
    },
    /// Another process is listening on the address.
    #[error("cannot listen on {address}: another process is listening there")]
    InUse {
        /// The address.
        address: Address,
    },
    /// Any other failure (no such directory, permission denied …).
    #[error("cannot listen on {address}: {source}")]
    Io {
        /// The address.
        address: Address,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// [`Listener::accept`] failed.
#[derive(Debug, Error)]
pub enum AcceptError {
    /// The system call failed (out of fds, interrupted by shutdown …).
    #[error("accepting a connection on {address} failed: {source}")]
    Io {
        /// The listener's address.
        address: Address,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// [`Connection::send_msg`] failed.
#[derive(Debug, Error)]
pub enum SendError {
    /// The message is larger than [`MAX_FRAME_LEN`]. Nothing was sent.
    #[error("message of {len} bytes exceeds the {max}-byte frame limit")]
    FrameTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More fds than one message carries ([`MAX_FDS_PER_MSG`]). Nothing was
    /// sent.
    #[error("{count} file descriptors; one message carries at most {max}")]
    TooManyFds {
        /// The number given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// The write timeout expired. If `sent` is not zero the frame is half
    /// sent and sending is broken.
    #[error("write timed out after {sent} of {total} bytes of the frame")]
    TimedOut {
        /// Bytes of the frame (prefix included) sent.
        sent: usize,
        /// Bytes in the frame.
        total: usize,
    },
    /// An earlier error left a frame half sent.
    #[error("sending is broken: an earlier error left a frame half sent")]
    Broken,
    /// Any other failure.
    #[error("sending failed: {0}")]
    Io(#[source] io::Error),
}

/// [`Connection::recv_msg`] failed.
#[derive(Debug, Error)]
pub enum RecvError {
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("the peer closed the connection after {received} of the frame's {expected} bytes")]
    ClosedMidFrame {
        /// Bytes of the frame (prefix included) received.
        received: usize,
        /// Bytes expected so far: the prefix, or prefix and body once the
        /// prefix is known.
        expected: usize,
    },
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes: the
    /// peer does not speak this framing. Receiving is broken.
    #[error("frame announces {len} bytes, more than the {max} allowed")]
    FrameTooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame carried more fds than the caller accepts. The frame was
    /// consumed; its first `max` fds are kept here with its bytes and the
    /// rest closed. The stream is still in step.
    #[error(
        "frame carried {received} file descriptors, at most {max} accepted; the excess was closed"
    )]
    TooManyFds {
        /// Fds that arrived.
        received: usize,
        /// The caller's limit.
        max: usize,
        /// The frame's bytes.
        bytes: Vec<u8>,
        /// Its first `max` fds.
        kept: Vec<OwnedFd>,
    },
    /// The kernel dropped fds of the frame (`MSG_CTRUNC`: more than
    /// [`MAX_FDS_PER_MSG`], or the process is out of fds). The frame was
    /// consumed and the fds that did arrive closed.
    #[error("file descriptors sent with the frame were lost (control data truncated)")]
    FdsTruncated,
    /// The read timeout expired. If `received` is not zero the frame is half
    /// read and receiving broken; otherwise it may be retried.
    #[error("read timed out after {received} bytes of the frame")]
    TimedOut {
        /// Bytes of the frame received.
        received: usize,
    },
    /// An earlier error left a frame half read.
    #[error("receiving is broken: an earlier error left a frame half read")]
    Broken,
    /// Any other failure.
    #[error("receiving failed: {0}")]
    Io(#[source] io::Error),
}

/// The peer is not a shmesh endpoint: what it did instead of a handshake.
#[derive(Debug, Error)]
pub enum NotShmesh {
    /// It closed the connection before sending a handshake message.
    #[error("it closed the connection without sending a handshake message")]
    ClosedEarly,
    /// It closed the connection in the middle of a frame.
    #[error("it closed the connection after {received} of {expected} bytes of a frame")]
    ClosedMidFrame {
        /// Bytes received.
        received: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Its first bytes, read as a frame length, make no sense.
    #[error(
        "its reply does not use shmesh framing (a frame of {len} bytes, at most {max} allowed)"
    )]
    FrameTooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is not a handshake message.
    #[error("its message is not a valid handshake message: {0}")]
    Malformed(#[source] HandshakeError),
}

/// A shmesh peer that broke the handshake's rules.
#[derive(Debug, Error)]
pub enum ProtocolViolation {
    /// A message of the wrong kind.
    #[error("expected {expected}, got {got}")]
    UnexpectedMessage {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The Welcome announces a different number of fds than arrived with it.
    #[error("the Welcome announces {announced} file descriptors but {received} arrived")]
    FdCountMismatch {
        /// Fds announced.
        announced: usize,
        /// Fds received.
        received: usize,
    },
    /// More fds than the handshake allows arrived (all were closed).
    #[error("{received} file descriptors arrived with the message, at most {max} allowed")]
    TooManyFds {
        /// Fds received.
        received: usize,
        /// The limit.
        max: usize,
    },
    /// Fds sent with the message were lost (`MSG_CTRUNC`).
    #[error("file descriptors sent with the message were lost (control data truncated)")]
    FdsTruncated,
    /// The Welcome names another protocol version than the Hello.
    #[error("asked for protocol version {requested}, welcomed with {welcomed}")]
    VersionMismatch {
        /// The Hello's version.
        requested: u16,
        /// The Welcome's.
        welcomed: u16,
    },
    /// The Welcome grants more than the Hello asked for.
    #[error("{0}")]
    GrantExceedsRequest(#[source] GrantExceedsRequest),
}

/// [`connect`] or [`client_handshake`] failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Nothing listens at the address (no socket file, a stale one, or no
    /// such abstract name).
    #[error("cannot connect to {address}: nothing is listening there ({source})")]
    NoListener {
        /// The address.
        address: Address,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Any other failure to connect (permission denied …).
    #[error("cannot connect to {address}: {source}")]
    Io {
        /// The address.
        address: Address,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Sending the Hello failed.
    #[error("handshake failed: could not send Hello: {0}")]
    Send(#[source] SendError),
    /// Receiving the answer failed (timeout, I/O error).
    #[error("handshake failed: {0}")]
    Recv(#[source] RecvError),
    /// The server is not a shmesh endpoint.
    #[error("handshake failed: the peer is not a shmesh server: {0}")]
    NotShmesh(#[source] NotShmesh),
    /// The server broke the handshake's rules.
    #[error("handshake failed: protocol violation by the server: {0}")]
    Protocol(#[source] ProtocolViolation),
    /// The server refused the connection.
    #[error("the server refused the connection: {0}")]
    Refused(Refuse),
}

/// [`server_handshake`] failed. `E` is the error of its `make_fds`.
#[derive(Debug, Error)]
pub enum ServerHandshakeError<E> {
    /// Reading the client's credentials failed.
    #[error("cannot read the client's credentials: {0}")]
    Credentials(#[source] io::Error),
    /// Receiving the Hello failed (timeout, I/O error).
    #[error("handshake failed: {0}")]
    Recv(#[source] RecvError),
    /// The client is not a shmesh endpoint.
    #[error("handshake failed: the peer is not a shmesh client: {0}")]
    NotShmesh(#[source] NotShmesh),
    /// The client broke the handshake's rules.
    #[error("handshake failed: protocol violation by the client: {0}")]
    Protocol(#[source] ProtocolViolation),
    /// The client was refused. `send_error` is set if the Refuse could not
    /// be delivered.
    #[error("refused the client: {refuse}")]
    Refused {
        /// The refusal sent.
        refuse: Refuse,
        /// Why sending it failed, if it did.
        send_error: Option<SendError>,
    },
    /// `make_fds` failed; the client was refused as [`RefuseReason::Busy`].
    #[error("cannot set up the connection's file descriptors: {0}")]
    MakeFds(#[source] E),
    /// `make_fds` returned more fds than a Welcome carries.
    #[error("cannot welcome the client: {0}")]
    TooManyFds(#[source] handshake::TooManyFds),
    /// Sending the Welcome failed.
    #[error("handshake failed: could not send Welcome: {0}")]
    Send(#[source] SendError),
}

// ---------------------------------------------------------------------------
// Listener

/// A listening Unix socket at an [`Address`].
///
/// A path listener removes its socket file when dropped, if the file is
/// still the one it created.
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    address: Address,
    /// Path, device and inode of the socket file this listener created.
    file: Option<(PathBuf, u64, u64)>,
}

impl Listener {
    /// Listens at `address`.
    ///
    /// For a path: an existing file that is not a socket (or a symlink) is
    /// never touched ([`BindError::NotASocket`]). An existing socket is
    /// probed with a non-blocking connect: if something accepts (or its
    /// backlog is full), [`BindError::InUse`]; if the connection is refused,
    /// the file is a stale leftover of a dead server and is replaced. The
    /// probe is a real connection: the live server it finds sees a peer
    /// that closes at once.
    pub fn bind(address: &Address) -> Result<Listener, BindError> {
        let io_err = |source| BindError::Io {
            address: address.clone(),
            source,
        };
        let (listener, file) = match address.target() {
            Target::Path(path) => {
                let listener = bind_path(address, path)?;
                let meta = fs::symlink_metadata(path).map_err(io_err)?;
                (listener, Some((path.to_owned(), meta.dev(), meta.ino())))
            }
            Target::Abstract(name) => {
                let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(io_err)?;
                let listener = UnixListener::bind_addr(&addr).map_err(|e| {
                    if e.kind() == io::ErrorKind::AddrInUse {
                        BindError::InUse {
                            address: address.clone(),
                        }
                    } else {
                        io_err(e)
                    }
                })?;
                (listener, None)
            }
        };
        Ok(Listener {
            listener,
            address: address.clone(),
            file,
        })
    }

    /// Waits for a client and returns its connection (close-on-exec, no
    /// timeouts set).
    pub fn accept(&self) -> Result<Connection, AcceptError> {
        let (stream, _) = self.listener.accept().map_err(|source| AcceptError::Io {
            address: self.address.clone(),
            source,
        })?;
        Ok(Connection::from(stream))
    }

    /// The address this listener listens at.
    pub fn address(&self) -> &Address {
        &self.address
    }
}

fn bind_path(address: &Address, path: &Path) -> Result<UnixListener, BindError> {
    let io_err = |source| BindError::Io {
        address: address.clone(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(listener) => return Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(io_err(e)),
    }
    // Something is at the path: find out what before touching it.
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotASocket {
                address: address.clone(),
            });
        }
        Ok(_) => {
            if probe_listening(path).map_err(io_err)? {
                return Err(BindError::InUse {
                    address: address.clone(),
                });
            }
            // A stale socket: nobody listens. Replace it.
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        // Gone in the meantime: try again.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            // Another process bound it between our removal and our bind.
            BindError::InUse {
                address: address.clone(),
            }
        } else {
            io_err(e)
        }
    })
}

/// Whether something listens on the socket file at `path`. Non-blocking, so
/// a listener with a full backlog answers at once (`EAGAIN`: listening).
fn probe_listening(path: &Path) -> io::Result<bool> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    match rustix::net::connect(&socket, &addr) {
        Ok(()) => Ok(true),
        Err(Errno::AGAIN | Errno::INPROGRESS) => Ok(true),
        Err(Errno::CONNREFUSED) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.file {
            // Remove the socket file only if it is still ours: another
            // server may have replaced it after deciding ours was stale.
            let ours = fs::symlink_metadata(path)
                .map(|meta| meta.dev() == *dev && meta.ino() == *ino)
                .unwrap_or(false);
            if ours {
                // Nothing to do about a failure in a destructor; the next
                // bind treats a leftover file as stale.
                let _ = fs::remove_file(path);
            }
        }
    }
}

/// Connects to the shmesh endpoint at `address` (blocking; close-on-exec;
/// no timeouts set). Then run [`client_handshake`].
pub fn connect(address: &Address) -> Result<Connection, ConnectError> {
    let result = match address.target() {
        Target::Path(path) => UnixStream::connect(path),
        Target::Abstract(name) => SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| UnixStream::connect_addr(&addr)),
    };
    match result {
        Ok(stream) => Ok(Connection::from(stream)),
        Err(source)
            if matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(ConnectError::NoListener {
                address: address.clone(),
                source,
            })
        }
        Err(source) => Err(ConnectError::Io {
            address: address.clone(),
            source,
        }),
    }
}

// ---------------------------------------------------------------------------
// Connection

/// The credentials of the process at the other end of a [`Connection`], as
/// the kernel recorded them when the connection was made (`SO_PEERCRED`):
/// they cannot be forged by the peer, but describe the process as it was at
/// `connect`/`listen` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCredentials {
    /// Process id, in our pid namespace.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// A connection whose set-up someone else did (the host daemon): the
/// liveness socket, the granted limits, the segment and the client's
/// doorbell, for [`Channel::from_handed_over`](crate::client::Channel::from_handed_over)
/// on the client's side and
/// [`Server::serve_handed_over`](crate::server::Server::serve_handed_over)
/// on the server's.
#[derive(Debug)]
pub struct HandedOver {
    /// This side's end of the socket pair: it closes when the other side
    /// dies.
    pub conn: Connection,
    /// The connection's id.
    pub connection_id: u64,
    /// The limits the connection was granted (the segment was made for
    /// them).
    pub granted: Limits,
    /// The connection's segment.
    pub segment: std::sync::Arc<shmesh_shm::segment::Segment>,
    /// The eventfd that wakes the client.
    pub client_bell: OwnedFd,
    /// Who the other side is, if known: the client, for the server's side;
    /// the server, for the client's (the socket pair's own credentials
    /// would name whoever made it).
    pub peer: Option<PeerCredentials>,
}

/// A connected Unix stream socket carrying framed messages with fds (see
/// the [module docs](self)).
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Set when an error left a frame half sent.
    send_broken: bool,
    /// Set when an error left a frame half read.
    recv_broken: bool,
}

impl From<UnixStream> for Connection {
    fn from(stream: UnixStream) -> Self {
        Connection {
            stream,
            send_broken: false,
            recv_broken: false,
        }
    }
}

impl From<Connection> for UnixStream {
    /// The underlying stream (in whatever state the framing left it).
    fn from(conn: Connection) -> Self {
        conn.stream
    }
}

impl From<Connection> for OwnedFd {
    /// The socket's fd, to hand to a child process, say.
    fn from(conn: Connection) -> Self {
        conn.stream.into()
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Connection {
    /// Two connected connections (`socketpair`), for a parent and a child
    /// or for tests.
    pub fn pair() -> io::Result<(Connection, Connection)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Connection::from(a), Connection::from(b)))
    }

    /// Sends one message with `fds` attached (the kernel duplicates them
    /// into the peer; ours stay open). Blocks until all of it is written or
    /// the write timeout expires.
    pub fn send_msg(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SendError> {
        if self.send_broken {
            return Err(SendError::Broken);
        }
        if bytes.len() > MAX_FRAME_LEN {
            return Err(SendError::FrameTooLong {
                len: bytes.len(),
                max: MAX_FRAME_LEN,
            });
        }
        if fds.len() > MAX_FDS_PER_MSG {
            return Err(SendError::TooManyFds {
                count: fds.len(),
                max: MAX_FDS_PER_MSG,
            });
        }
        let mut frame = Vec::with_capacity(PREFIX_LEN + bytes.len());
        // At most `MAX_FRAME_LEN`, checked above.
        frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        frame.extend_from_slice(bytes);

        let mut space =
            vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            // The buffer is sized for exactly these fds.
            return Err(SendError::TooManyFds {
                count: fds.len(),
                max: MAX_FDS_PER_MSG,
            });
        }

        // The first write carries the fds, so they ride with the frame's
        // first byte; the rest of the frame follows without.
        let mut sent = loop {
            match rustix::net::sendmsg(
                &self.stream,
                &[IoSlice::new(&frame)],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => break n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(self.send_failed(e, 0, frame.len())),
            }
        };
        while sent < frame.len() {
            match rustix::net::send(&self.stream, &frame[sent..], SendFlags::NOSIGNAL) {
                Ok(n) => sent += n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(self.send_failed(e, sent, frame.len())),
            }
        }
        Ok(())
    }

    fn send_failed(&mut self, e: Errno, sent: usize, total: usize) -> SendError {
        if sent > 0 {
            self.send_broken = true;
        }
        match e {
            Errno::AGAIN => SendError::TimedOut { sent, total },
            Errno::PIPE | Errno::CONNRESET => SendError::Closed,
            e => SendError::Io(e.into()),
        }
    }

    /// Receives one message and the fds that came with it, accepting at
    /// most `max_fds` of them. Blocks until the whole frame is read or the
    /// read timeout expires. The fds are close-on-exec.
    ///
    /// A frame with more than `max_fds` fds is consumed, the excess fds are
    /// closed, and [`RecvError::TooManyFds`] reports how many came, with the
    /// frame's bytes and its first `max_fds` fds.
    pub fn recv_msg(&mut self, max_fds: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), RecvError> {
        if self.recv_broken {
            return Err(RecvError::Broken);
        }
        let mut fds = Vec::new();
        let mut truncated = false;

        let mut prefix = [0u8; PREFIX_LEN];
        self.recv_exact(&mut prefix, 0, PREFIX_LEN, &mut fds, &mut truncated)?;
        let len = u32::from_le_bytes(prefix) as usize;
        if len > MAX_FRAME_LEN {
            self.recv_broken = true;
            return Err(RecvError::FrameTooLong {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let mut body = vec![0u8; len];
        self.recv_exact(
            &mut body,
            PREFIX_LEN,
            PREFIX_LEN + len,
            &mut fds,
            &mut truncated,
        )?;

        if truncated {
            return Err(RecvError::FdsTruncated);
        }
        if fds.len() > max_fds {
            let received = fds.len();
            fds.truncate(max_fds); // closes the excess
            return Err(RecvError::TooManyFds {
                received,
                max: max_fds,
                bytes: body,
                kept: fds,
            });
        }
        Ok((body, fds))
    }

    /// Fills `buf` with the frame's bytes from offset `done` on, collecting
    /// any fds that arrive. Never reads past `buf`, hence past the frame.
    fn recv_exact(
        &mut self,
        buf: &mut [u8],
        done: usize,
        expected: usize,
        fds: &mut Vec<OwnedFd>,
        truncated: &mut bool,
    ) -> Result<(), RecvError> {
        let mut filled = 0;
        while filled < buf.len() {
            let mut space = [MaybeUninit::<u8>::uninit(); RECV_CMSG_SPACE];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let result = rustix::net::recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut buf[filled..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            );
            let received = done + filled;
            match result {
                Ok(msg) => {
                    if msg.flags.contains(ReturnFlags::CTRUNC) {
                        *truncated = true;
                    }
                    for message in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(rights) = message {
                            fds.extend(rights);
                        }
                    }
                    if msg.bytes == 0 {
                        return Err(self.closed(received, expected));
                    }
                    filled += msg.bytes;
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => {
                    if received > 0 {
                        self.recv_broken = true;
                    }
                    return Err(RecvError::TimedOut { received });
                }
                Err(Errno::CONNRESET) => return Err(self.closed(received, expected)),
                Err(e) => {
                    self.recv_broken = true;
                    return Err(RecvError::Io(e.into()));
                }
            }
        }
        Ok(())
    }

    fn closed(&mut self, received: usize, expected: usize) -> RecvError {
        if received == 0 {
            RecvError::Closed
        } else {
            self.recv_broken = true;
            RecvError::ClosedMidFrame { received, expected }
        }
    }

    /// The peer's credentials (`SO_PEERCRED`).
    pub fn peer_credentials(&self) -> io::Result<PeerCredentials> {
        let cred = rustix::net::sockopt::socket_peercred(&self.stream)?;
        Ok(PeerCredentials {
            pid: cred.pid.as_raw_nonzero().get(),
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
        })
    }

    /// Sets how long [`recv_msg`](Self::recv_msg) waits for data (`None`:
    /// forever). A zero duration is an error, as for [`UnixStream`].
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// Sets how long [`send_msg`](Self::send_msg) waits for buffer space
    /// (`None`: forever). A zero duration is an error.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(timeout)
    }

    /// Whether an earlier error in the middle of a frame left either
    /// direction out of step, so every call in that direction now fails.
    pub fn is_broken(&self) -> bool {
        self.send_broken || self.recv_broken
    }
}

// ---------------------------------------------------------------------------
// Handshake glue

/// How a failed receive or decode of a handshake message is reported.
enum Failure {
    Recv(RecvError),
    NotShmesh(NotShmesh),
    Protocol(ProtocolViolation),
}

fn classify(e: RecvError) -> Failure {
    match e {
        RecvError::Closed => Failure::NotShmesh(NotShmesh::ClosedEarly),
        RecvError::ClosedMidFrame { received, expected } => {
            Failure::NotShmesh(NotShmesh::ClosedMidFrame { received, expected })
        }
        RecvError::FrameTooLong { len, max } => {
            Failure::NotShmesh(NotShmesh::FrameTooLong { len, max })
        }
        RecvError::TooManyFds { received, max, .. } => {
            Failure::Protocol(ProtocolViolation::TooManyFds { received, max })
        }
        RecvError::FdsTruncated => Failure::Protocol(ProtocolViolation::FdsTruncated),
        e => Failure::Recv(e),
    }
}

impl From<Failure> for ConnectError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Recv(e) => ConnectError::Recv(e),
            Failure::NotShmesh(e) => ConnectError::NotShmesh(e),
            Failure::Protocol(e) => ConnectError::Protocol(e),
        }
    }
}

impl<E> From<Failure> for ServerHandshakeError<E> {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Recv(e) => ServerHandshakeError::Recv(e),
            Failure::NotShmesh(e) => ServerHandshakeError::NotShmesh(e),
            Failure::Protocol(e) => ServerHandshakeError::Protocol(e),
        }
    }
}

/// Runs the client's side of the handshake on a fresh connection: sends
/// `hello`, then reads the server's answer.
///
/// On a [`Welcome`], checks that exactly the announced fds arrived, that the
/// protocol version is the one asked for and that nothing was granted
/// beyond the request; returns the Welcome and the fds, in the order of
/// `welcome.fds`. A [`Refuse`] is [`ConnectError::Refused`]. If the server
/// closed the connection before reading the Hello, its answer (a `Busy`
/// refusal, say) is still read.
///
/// Set a read timeout on `conn` first unless the server is trusted to
/// answer.
pub fn client_handshake(
    conn: &mut Connection,
    hello: &Hello,
) -> Result<(Welcome, Vec<OwnedFd>), ConnectError> {
    let bytes = handshake::encode(&Msg::Hello(hello.clone()));
    match conn.send_msg(&bytes, &[]) {
        Ok(()) => {}
        // The server may have answered before closing: read on.
        Err(SendError::Closed) => {}
        Err(e) => return Err(ConnectError::Send(e)),
    }
    receive_welcome(conn, hello)
}

/// The client's half of the handshake once its `hello` has gone out (in a
/// `Hello` message, or inside a control message to the host daemon):
/// reads and checks the answer, as [`client_handshake`] does.
pub fn receive_welcome(
    conn: &mut Connection,
    hello: &Hello,
) -> Result<(Welcome, Vec<OwnedFd>), ConnectError> {
    let (bytes, fds) = conn
        .recv_msg(MAX_WELCOME_FDS)
        .map_err(|e| ConnectError::from(classify(e)))?;
    match handshake::decode(&bytes) {
        Err(e) => Err(ConnectError::NotShmesh(NotShmesh::Malformed(e))),
        Ok(Msg::Welcome(welcome)) => {
            if fds.len() != welcome.fds.len() {
                return Err(ConnectError::Protocol(ProtocolViolation::FdCountMismatch {
                    announced: welcome.fds.len(),
                    received: fds.len(),
                }));
            }
            if welcome.protocol_version != hello.protocol_version {
                return Err(ConnectError::Protocol(ProtocolViolation::VersionMismatch {
                    requested: hello.protocol_version,
                    welcomed: welcome.protocol_version,
                }));
            }
            handshake::check_grant(&hello.requested, &welcome.granted)
                .map_err(|e| ConnectError::Protocol(ProtocolViolation::GrantExceedsRequest(e)))?;
            Ok((welcome, fds))
        }
        Ok(Msg::Refuse(refuse)) => Err(ConnectError::Refused(refuse)),
        Ok(other) => Err(ConnectError::Protocol(
            ProtocolViolation::UnexpectedMessage {
                expected: "Welcome or Refuse",
                got: other.kind(),
            },
        )),
    }
}

/// A client the server accepted.
#[derive(Debug)]
pub struct Accepted {
    /// The client's Hello.
    pub hello: Hello,
    /// The Welcome sent.
    pub welcome: Welcome,
    /// The fds `make_fds` made, as sent (the client holds duplicates).
    pub fds: Vec<(FdRole, OwnedFd)>,
    /// Who the client is.
    pub peer: PeerCredentials,
}

/// Runs the server's side of the handshake on an accepted connection:
/// reads the client's Hello, decides it with
/// [`negotiate`](handshake::negotiate), and answers.
///
/// On acceptance, `make_fds` is called with the granted limits and returns
/// the fds to pass (the segment, the doorbells), which are sent with a
/// [`Welcome`] carrying `connection_id` and their roles. On refusal the
/// [`Refuse`] is sent and returned as [`ServerHandshakeError::Refused`]. A
/// Hello in a wire format this build cannot read is refused as
/// [`RefuseReason::VersionMismatch`] with the two wire format versions. If
/// `make_fds` fails, the client is refused as [`RefuseReason::Busy`] and its
/// error returned. Garbage from the client gets no answer.
///
/// Set a read timeout on `conn` first: a client that connects and says
/// nothing would otherwise hold this call forever.
pub fn server_handshake<E>(
    conn: &mut Connection,
    policy: &ServerPolicy,
    connection_id: u64,
    make_fds: impl FnOnce(&Limits) -> Result<Vec<(FdRole, OwnedFd)>, E>,
) -> Result<Accepted, ServerHandshakeError<E>> {
    let peer = conn
        .peer_credentials()
        .map_err(ServerHandshakeError::Credentials)?;
    let (bytes, _no_fds) = conn
        .recv_msg(0)
        .map_err(|e| ServerHandshakeError::from(classify(e)))?;
    let hello = match handshake::decode(&bytes) {
        Ok(Msg::Hello(hello)) => hello,
        Ok(other) => {
            return Err(ServerHandshakeError::Protocol(
                ProtocolViolation::UnexpectedMessage {
                    expected: "Hello",
                    got: other.kind(),
                },
            ));
        }
        Err(HandshakeError::UnsupportedVersion { found, supported }) => {
            let refuse = Refuse::new(
                RefuseReason::VersionMismatch {
                    client: found,
                    server: supported,
                },
                format!(
                    "handshake wire format {found} is not supported; this server reads {WIRE_VERSION}"
                ),
            );
            return Err(send_refuse(conn, refuse));
        }
        Err(e) => {
            return Err(ServerHandshakeError::NotShmesh(NotShmesh::Malformed(e)));
        }
    };

    let granted = match handshake::negotiate(&hello, policy) {
        Ok(granted) => granted,
        Err(refuse) => return Err(send_refuse(conn, refuse)),
    };
    let fds = match make_fds(&granted) {
        Ok(fds) => fds,
        Err(e) => {
            let refuse = Refuse::new(
                RefuseReason::Busy,
                "the server could not set up the connection",
            );
            // The client learns it was refused; the server's caller learns
            // why. A failure to deliver the refusal adds nothing to that.
            let _ = conn.send_msg(&handshake::encode(&Msg::Refuse(refuse)), &[]);
            return Err(ServerHandshakeError::MakeFds(e));
        }
    };
    let roles = FdRoles::new(fds.iter().map(|(role, _)| *role).collect())
        .map_err(ServerHandshakeError::TooManyFds)?;
    let welcome = Welcome {
        protocol_version: hello.protocol_version,
        granted,
        connection_id,
        fds: roles,
    };
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|(_, fd)| fd.as_fd()).collect();
    conn.send_msg(
        &handshake::encode(&Msg::Welcome(welcome.clone())),
        &borrowed,
    )
    .map_err(ServerHandshakeError::Send)?;
    Ok(Accepted {
        hello,
        welcome,
        fds,
        peer,
    })
}

fn send_refuse<E>(conn: &mut Connection, refuse: Refuse) -> ServerHandshakeError<E> {
    let send_error = conn
        .send_msg(&handshake::encode(&Msg::Refuse(refuse.clone())), &[])
        .err();
    ServerHandshakeError::Refused { refuse, send_error }
}
