//! shmesh: RPC between co-located processes over shared memory.
//!
//! This crate will be the library services and clients depend on. So far it
//! holds the **slow path**: setting a connection up over a Unix socket,
//! once per connection.
//!
//! - [`addr`]: `shm:///path` and `shm://@name` addresses;
//! - [`handshake`]: the handshake messages, their versioned binary codec and
//!   the server's decision ([`negotiate`]), all sans IO;
//! - [`socket`]: listening and connecting, framed messages with file
//!   descriptors (`SCM_RIGHTS`), peer credentials (`SO_PEERCRED`), and the
//!   handshake over a real socket ([`client_handshake`],
//!   [`server_handshake`]).
//!
//! The socket carries setup, fd passing, credentials and, later, liveness (a
//! peer that dies closes its socket). Data never goes through it: once the
//! handshake has passed the shared-memory segment and the doorbells, calls
//! travel through rings in shared memory (`shmesh-shm`) with no system call
//! while the peer is awake. That **fast path**, the channel and server built
//! on the rings, comes next.
//!
//! # Example
//!
//! ```
//! use shmesh::{Address, Hello, Limits, PROTOCOL_VERSION, SchemaHash, ServerPolicy, ServiceName};
//!
//! let address: Address = format!("shm://@shmesh-lib-doc-{}", std::process::id()).parse().unwrap();
//! let listener = shmesh::Listener::bind(&address).unwrap();
//! let policy = ServerPolicy::new(ServiceName::new("echo").unwrap(), SchemaHash([9; 32]));
//! let server = std::thread::spawn(move || {
//!     let mut conn = listener.accept().unwrap();
//!     shmesh::server_handshake(&mut conn, &policy, 1, |_| Ok::<_, std::io::Error>(Vec::new()))
//! });
//!
//! let mut conn = shmesh::connect(&address).unwrap();
//! let hello = Hello {
//!     protocol_version: PROTOCOL_VERSION,
//!     service: ServiceName::new("echo").unwrap(),
//!     schema_hash: SchemaHash([8; 32]),
//!     requested: Limits::default(),
//! };
//! let err = shmesh::client_handshake(&mut conn, &hello).unwrap_err();
//! assert!(err.to_string().contains(&"08".repeat(32)));
//! assert!(server.join().unwrap().is_err());
//! ```

#![forbid(unsafe_code)]

pub mod addr;
#[cfg(feature = "tokio")]
pub mod asynchronous;
pub mod client;
pub mod deadline;
pub mod handshake;
pub mod layout;
mod mailbox;
pub mod protocol;
pub mod server;
pub mod socket;
pub mod stats;
pub mod status;

pub use addr::{Address, AddressError};
pub use handshake::{
    FdRole, FdRoles, HandshakeError, Hello, Limits, Msg, PROTOCOL_VERSION, PoolClass, PoolClasses,
    Refuse, RefuseReason, SchemaHash, ServerPolicy, ServiceName, WaitMode, Welcome, negotiate,
};
pub use socket::{
    Accepted, BindError, ConnectError, Connection, Listener, NotShmesh, PeerCredentials,
    ProtocolViolation, RecvError, SendError, ServerHandshakeError, client_handshake, connect,
    server_handshake,
};
