//! The runtime of the code [`shmesh-build`] generates from `.proto` files:
//! typed clients and servers over shmesh whose messages are
//! [prost](https://docs.rs/prost) messages.
//!
//! Add this crate as a normal dependency and `shmesh-build` as a
//! build-dependency; the generated code refers to this crate only (it
//! re-exports [`prost`] and [`shmesh`]), so those need not be direct
//! dependencies.
//!
//! - [`client`]: the async client side, over
//!   [`AsyncChannel`](shmesh::asynchronous::AsyncChannel);
//! - [`blocking`]: the same over the blocking
//!   [`Channel`](shmesh::client::Channel);
//! - [`server`]: the server side, mounted on a
//!   [`Router`](shmesh::server::Router) with async handlers;
//! - `grpc` (feature `tonic`): the same service traits served over gRPC
//!   with tonic;
//! - [`Request`]: a message with the call's metadata (the caller's
//!   credentials or address, the time left before its deadline).
//!
//! Messages are encoded by prost straight into a buffer loaned in shared
//! memory ([`encode_into`]), with no intermediate `Vec`: requests on the
//! client, and on the server every response and every message of a
//! response stream. They are decoded straight from the bytes in place
//! ([`decode`]); a message that does not decode is
//! [`Code::Internal`](shmesh::status::Code::Internal), naming its type.
//!
//! [`shmesh-build`]: https://example.invalid/shmesh

#![forbid(unsafe_code)]

pub mod blocking;
pub mod client;
#[cfg(feature = "tonic")]
pub mod grpc;
#[cfg(feature = "tonic")]
pub mod grpc_blocking;
pub mod server;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use prost;
pub use shmesh;
use shmesh::PeerCredentials;
use shmesh::metadata::Metadata;
use shmesh::status::Status;

/// What a server knows of a call besides its messages: who made it, until
/// when it may run, and the metadata it came with. Over shmesh the
/// caller's credentials (from the kernel), the deadline that travelled
/// with the call and its metadata; over gRPC the client's address, the
/// deadline of its `grpc-timeout` header and its other ASCII headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallInfo {
    peer: Option<PeerCredentials>,
    remote_addr: Option<SocketAddr>,
    deadline: Option<Instant>,
    metadata: Metadata,
}

impl CallInfo {
    /// A shmesh call from `peer` with `remaining` time before its deadline
    /// and `metadata`.
    pub(crate) fn shmesh(
        peer: PeerCredentials,
        remaining: Option<Duration>,
        metadata: &Metadata,
    ) -> Self {
        CallInfo {
            peer: Some(peer),
            remote_addr: None,
            deadline: remaining.map(|r| Instant::now() + r),
            metadata: metadata.clone(),
        }
    }

    /// A gRPC call from `remote_addr` (when the transport has one) that
    /// must end within `timeout` of now, with `metadata` from its headers.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        remote_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
        metadata: Metadata,
    ) -> Self {
        CallInfo {
            peer: None,
            remote_addr,
            deadline: timeout.map(|t| Instant::now() + t),
            metadata,
        }
    }

    /// When the call must have ended.
    #[cfg(feature = "tonic")]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// A message with the metadata of the call it came with.
///
/// On the server, [`Request::peer`] is the calling process's credentials
/// over shmesh (from the kernel, unforgeable), [`Request::remote_addr`]
/// the client's address over gRPC on TCP, and [`Request::remaining`] the
/// time left before the caller's deadline on either transport.
#[derive(Debug, Clone)]
pub struct Request<T> {
    message: T,
    info: CallInfo,
}

impl<T> Request<T> {
    /// A request carrying `message` and no metadata.
    pub fn new(message: T) -> Self {
        Request {
            message,
            info: CallInfo::default(),
        }
    }

    /// A request carrying `message` from `peer`, with `remaining` time
    /// before its deadline (counted from now).
    pub fn from_parts(message: T, peer: PeerCredentials, remaining: Option<Duration>) -> Self {
        Request::with_info(message, CallInfo::shmesh(peer, remaining, &Metadata::new()))
    }

    /// A request carrying `message` of the call `info` describes.
    pub(crate) fn with_info(message: T, info: CallInfo) -> Self {
        Request { message, info }
    }

    /// The message.
    pub fn get_ref(&self) -> &T {
        &self.message
    }

    /// The message, to change.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.message
    }

    /// The message, without the metadata.
    pub fn into_inner(self) -> T {
        self.message
    }

    /// The credentials of the calling process: `None` over gRPC (a TCP
    /// peer has none) and on a request not received from a peer.
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.info.peer
    }

    /// The client's address over gRPC on TCP; `None` over shmesh (see
    /// [`Request::peer`]) and over transports without addresses.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }

    /// Time left before the caller's deadline, if it set one (zero once it
    /// has passed). Over gRPC, the deadline of the `grpc-timeout` header.
    pub fn remaining(&self) -> Option<Duration> {
        self.info.remaining()
    }

    /// The call's metadata (a W3C `traceparent`, say): over shmesh what
    /// the client sent with the call; over gRPC its ASCII headers that are
    /// valid shmesh metadata, less gRPC's and HTTP's own
    /// ([`grpc::metadata_of`](crate::grpc::metadata_of)).
    pub fn metadata(&self) -> &Metadata {
        &self.info.metadata
    }
}

/// Decodes a `T` (whose protobuf name is `type_name`, used in the error)
/// from `bytes`, read in place. A failure is `Internal`, naming the type.
pub fn decode<T: prost::Message + Default>(bytes: &[u8], type_name: &str) -> Result<T, Status> {
    T::decode(bytes).map_err(|e| {
        Status::internal(format!(
            "cannot decode a {type_name} from {} bytes: {e}",
            bytes.len()
        ))
    })
}

/// Encodes `message` into `buf`, which must be exactly
/// `message.encoded_len()` bytes long (a loaned buffer is).
pub fn encode_into<T: prost::Message>(message: &T, buf: &mut [u8]) -> Result<(), Status> {
    let len = buf.len();
    let mut out = buf;
    message
        .encode(&mut out)
        .map_err(|e| Status::internal(format!("cannot encode a message into {len} bytes: {e}")))?;
    if !out.is_empty() {
        return Err(Status::internal(format!(
            "the message took {} of the {len} bytes its encoded length promised",
            len - out.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shmesh::status::Code;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Greeting {
        #[prost(string, tag = "1")]
        name: String,
    }

    #[test]
    fn encode_into_then_decode_round_trips() {
        let greeting = Greeting {
            name: "world".into(),
        };
        let mut buf = vec![0; prost::Message::encoded_len(&greeting)];
        encode_into(&greeting, &mut buf).unwrap();
        assert_eq!(decode::<Greeting>(&buf, "test.Greeting").unwrap(), greeting);
    }

    #[test]
    fn encode_into_a_wrong_size_fails() {
        let greeting = Greeting {
            name: "world".into(),
        };
        let len = prost::Message::encoded_len(&greeting);
        let mut short = vec![0; len - 1];
        assert_eq!(
            encode_into(&greeting, &mut short).unwrap_err().code(),
            Code::Internal
        );
        let mut long = vec![0; len + 1];
        assert_eq!(
            encode_into(&greeting, &mut long).unwrap_err().code(),
            Code::Internal
        );
    }

    #[test]
    fn garbage_is_internal_naming_the_type() {
        let status = decode::<Greeting>(&[0xff, 0xff, 0xff], "test.Greeting").unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("test.Greeting"), "{status}");
    }

    #[test]
    fn remaining_counts_down_from_the_deadline() {
        let peer = PeerCredentials {
            pid: 1,
            uid: 2,
            gid: 3,
        };
        let request = Request::from_parts(7, peer, Some(Duration::from_secs(60)));
        assert_eq!(request.peer(), Some(peer));
        let left = request.remaining().unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        assert_eq!(Request::new(7).remaining(), None);
        assert_eq!(request.into_inner(), 7);
    }
}
