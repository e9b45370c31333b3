//! shmesh: RPC between co-located processes over shared memory.
//!
//! A server listens on a Unix socket ([`server::Server::bind`]); a client
//! connects ([`client::Channel::connect`], or
//! [`asynchronous::AsyncChannel::connect`] on tokio). The socket carries only
//! the **slow path**: the handshake ([`handshake`]: versions, service name,
//! schema hash, negotiated limits), the connection's shared-memory segment
//! and doorbell passed as fds, the peer's credentials, and liveness (a peer
//! that dies closes its socket and every call in flight fails with
//! `Unavailable`). Calls take the **fast path**: descriptors on rings in the
//! connection's own segment, payloads written and read in place in its
//! pools, no system call while the peer is awake ([`protocol`] has the
//! rules).
//!
//! - unary calls ([`client::Channel::call`], zero-copy with
//!   [`client::Channel::loan`] and [`client::Channel::send`]), server-,
//!   client- and bidirectional streams ([`client::Call`],
//!   [`asynchronous::AsyncCall`]) under flow control;
//! - messages up to 64 MiB by default (chunked above the largest slab);
//! - gRPC's [`status::Status`] codes, deadlines that travel with the call,
//!   cancellation that the handler observes;
//! - handlers per method in a [`server::Router`]: quick ones on the
//!   connection's thread, blocking ones on a worker pool, async ones on
//!   tokio; per-method and per-connection counters ([`stats`]);
//! - through the optional host daemon `shmeshd` ([`endpoint`], [`control`]):
//!   servers register with `shm+svc://NAME` and clients connect by name;
//!   the daemon checks access, creates the segment and steps aside, or
//!   mediates calls through its policy engines.
//!   [`client::BalancedChannel`] spreads calls over a service's replicas by
//!   their published load and fails over; [`client::ReconnectingChannel`]
//!   outlives a lost connection.
//! - zero copy both ways: requests written in place into a loaned
//!   [`client::RequestBuf`], answers into a loaned [`server::Reply`] or
//!   [`server::ReplyBuf`] (unary and async handlers, every stream message),
//!   each read in place by the other side.
//!
//! # Example
//!
//! ```
//! use shmesh::SchemaHash;
//! use shmesh::client::{Channel, ChannelOptions};
//! use shmesh::server::{BackgroundServer, Router, Server};
//!
//! let address = format!("shm://@shmesh-lib-doc-{}", std::process::id());
//! let schema = SchemaHash([1; 32]);
//! let router = Router::new()
//!     .route(1, |request| Ok(request.payload.to_ascii_uppercase()))
//!     .route_stream(2, |call| {
//!         while let Some(word) = call.recv()? {
//!             call.send(&word.repeat(2))?;
//!         }
//!         Ok(())
//!     });
//! let server = BackgroundServer::spawn(Server::bind(&address, "demo", schema, router)?)?;
//!
//! let channel = Channel::connect(&address, &ChannelOptions::new("demo", schema))?;
//! assert_eq!(&channel.call(1, b"hello", None)?[..], b"HELLO");
//!
//! let mut call = channel.open(2, None)?;
//! call.send(b"ab")?;
//! assert_eq!(&call.recv()?.unwrap()[..], b"abab");
//! call.close_send()?;
//! assert!(call.recv()?.is_none());
//! # drop(server);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod addr;
#[cfg(feature = "tokio")]
pub mod asynchronous;
pub mod client;
pub mod control;

/// The blocking front-end, under the name the async one pairs with
/// ([`asynchronous`]).
pub mod blocking {
    pub use crate::client::{Call, Channel, ChannelError, ChannelOptions, RequestBuf, Response};
}
pub mod deadline;
pub mod endpoint;
pub mod handshake;
pub mod layout;
mod mailbox;
pub mod metadata;
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
pub use metadata::{Metadata, MetadataError};
pub use socket::{
    Accepted, BindError, ConnectError, Connection, Listener, NotShmesh, PeerCredentials,
    ProtocolViolation, RecvError, SendError, ServerHandshakeError, client_handshake, connect,
    server_handshake,
};
