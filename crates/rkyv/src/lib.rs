//! [rkyv](https://docs.rs/rkyv) messages over shmesh: written once into
//! shared memory, read as validated archives (`&Archived<T>`) with no
//! deserialization.
//!
//! A message type derives rkyv's `Archive` and `Serialize` (with
//! `bytecheck`, which rkyv 0.8 enables by default, for validation); any
//! such type is a [`Message`]. A [`Method`] names a unary method and its
//! request and response types; a [`Client`] (blocking, over
//! [`Channel`](shmesh::client::Channel)) or an [`AsyncClient`] (tokio, over
//! [`AsyncChannel`](shmesh::asynchronous::AsyncChannel)) calls it and gets
//! an [`ArchivedResponse`] that derefs to the response's archived type; a
//! server mounts handlers with [`RouterExt::route_archived`] (on the
//! connection's thread, answering in place) or
//! [`RouterExt::route_archived_async`] (on tokio). Handlers receive the
//! request's archived type and return the response, which is serialized
//! straight into the reply.
//!
//! # Example
//!
//! ```
//! use rkyv::{Archive, Serialize};
//! use shmesh::client::{Channel, ChannelOptions};
//! use shmesh::server::{BackgroundServer, Router, Server};
//! use shmesh_rkyv::{Client, Method, RouterExt, TrustPolicy};
//!
//! #[derive(Archive, Serialize)]
//! struct Order { symbol: String, quantities: Vec<u32> }
//!
//! #[derive(Archive, Serialize)]
//! struct Ack { total: u64 }
//!
//! static PLACE: Method<Order, Ack> = Method::new(1);
//!
//! let address = format!("shm://@shmesh-rkyv-doc-{}", std::process::id());
//! let schema = shmesh::SchemaHash([9; 32]);
//! let router = Router::new().route_archived(&PLACE, TrustPolicy::SameUser, |order, _call| {
//!     // `order` is an `&ArchivedOrder`, validated; nothing was deserialized.
//!     let total = order.quantities.iter().map(|q| u64::from(q.to_native())).sum();
//!     Ok(Ack { total })
//! });
//! let _server = BackgroundServer::spawn(Server::bind(&address, "orders", schema, router)?)?;
//!
//! let channel = Channel::connect(&address, &ChannelOptions::new("orders", schema))?;
//! let client = Client::trusting_same_user(channel);
//! let order = Order { symbol: "ACME".into(), quantities: vec![10, 20, 12] };
//! let ack = client.call(&PLACE, &order, None)?;
//! assert_eq!(ack.total, 42);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Soundness: two read modes
//!
//! Validating an archive (bytecheck) proves that its relative pointers and
//! lengths stay inside the buffer, and only for as long as nobody rewrites
//! the bytes. A message read in place lives in the peer's pool in shared
//! memory, which the peer can still write: a hostile peer could rewrite a
//! relative pointer or a length *after* validation and make the reader
//! follow it out of bounds. So a reader picks one of two modes, explicitly
//! ([`ReadMode`]):
//!
//! - **copied** (the default, sound against any peer): the message is
//!   copied once into a private buffer aligned for rkyv
//!   ([`rkyv::util::AlignedVec`]), validated there, and read there. One
//!   `memcpy`, no deserialization, no allocation per field.
//! - **in place** (trust): the message is validated where it lies in the
//!   slab and read there, with no copy. This mode takes a [`TrustedPeer`],
//!   which can only be had from peer credentials showing that the peer runs
//!   as our own effective uid or as root
//!   ([`TrustedPeer::from_credentials`]), or by saying so in code
//!   ([`TrustedPeer::assume_trusted`]).
//!
//! Why the same user or root is enough: such a process can already open
//! our files, and unless the Yama LSM restricts `ptrace`
//! (`kernel.yama.ptrace_scope` ≥ 1) or we made ourselves non-dumpable, it
//! can read and write our memory outright (`ptrace`, `/proc/PID/mem`); root
//! can do that regardless. Reading its messages in place adds little it
//! could not do anyway. What remains: a *buggy* (not hostile) peer of the
//! same user that scribbles on a slab it already sent can now crash us or
//! make us read garbage out of bounds instead of failing one call cleanly;
//! and where Yama or non-dumpable processes do isolate same-uid processes
//! from each other, in-place reads give that isolation up for this
//! connection. Deployments that need it keep the copied mode.
//!
//! Alignment: rkyv's archived types need their natural alignment (up to 16
//! bytes). A slab is aligned to at least 64 bytes, so a message in one slab
//! can be read in place; a message whose bytes are not 16-byte aligned, or
//! (on the client) one larger than the largest slab, which shmesh
//! delivered in chunks and assembled on the heap, takes the copied path
//! whatever the mode ([`ReadPath`] says which path a view took). The
//! validator checks alignment too, so a misaligned archive is an error,
//! never a misaligned read.
//!
//! # Wire format
//!
//! A message is a *frame*: the rkyv archive from offset 0 (laid out as
//! rkyv lays out a buffer aligned to 16), unread slack, then an 8-byte
//! trailer: the archive's length (u32, little-endian) and the tag
//! [`FRAME_TAG`]. The slack exists because the message is serialized
//! straight into a loaned slab whose length must be chosen before the
//! archive's length is known; the trailer tells the reader where the
//! archive ends (rkyv finds the root at the end of the archive). See
//! [`frame`].
//!
//! Errors: a message that does not validate is
//! [`Code::Internal`](shmesh::status::Code::Internal) naming its Rust type;
//! one larger than the connection's message limit is
//! [`Code::ResourceExhausted`](shmesh::status::Code::ResourceExhausted).

#![forbid(unsafe_code)]

mod client;
pub mod frame;
mod server;

use shmesh::PeerCredentials;
use shmesh::status::Status;
use thiserror::Error;

pub use client::{ArchivedResponse, AsyncClient, Client};
pub use frame::{
    Access, ArchivedBuf, FRAME_TAG, FrameWriter, SizeHint, TRAILER_LEN, access, access_copied,
    access_in_place, write_frame,
};
pub use rkyv;
pub use server::{ArchivedRequest, RouterExt};
pub use shmesh;

/// A type that can travel as a shmesh-rkyv message: it derives rkyv's
/// `Archive` and `Serialize` and its archived type can be validated
/// (`bytecheck`). Implemented for every such type.
pub trait Message:
    rkyv::Archive<
        Archived: for<'a> rkyv::bytecheck::CheckBytes<
            rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
        > + Send
                      + Sync
                      + 'static,
    > + for<'a, 'b> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            FrameWriter<'b>,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >
{
}

impl<T> Message for T where
    T: rkyv::Archive<
            Archived: for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            > + Send
                          + Sync
                          + 'static,
        > + for<'a, 'b> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                FrameWriter<'b>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >
{
}

/// The name errors give a message type.
pub(crate) fn type_name<T: ?Sized>() -> &'static str {
    std::any::type_name::<T>()
}

/// Proof that a peer may be read in place (see the [crate docs](crate)):
/// [`ReadMode::InPlace`] takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedPeer {
    _private: (),
}

impl TrustedPeer {
    /// A token if `peer` runs as our own effective uid or as root: a process
    /// that can already read and write our files and (unless Yama restricts
    /// `ptrace`) our memory. `None` for anyone else.
    ///
    /// ```
    /// use shmesh::PeerCredentials;
    /// use shmesh_rkyv::TrustedPeer;
    ///
    /// let me = rustix::process::geteuid().as_raw();
    /// let same_user = PeerCredentials { pid: 1, uid: me, gid: 0 };
    /// assert!(TrustedPeer::from_credentials(&same_user).is_some());
    /// let root = PeerCredentials { pid: 1, uid: 0, gid: 0 };
    /// assert!(TrustedPeer::from_credentials(&root).is_some());
    /// ```
    pub fn from_credentials(peer: &PeerCredentials) -> Option<TrustedPeer> {
        let me = rustix::process::geteuid().as_raw();
        (peer.uid == me || peer.uid == 0).then_some(TrustedPeer { _private: () })
    }

    /// A token for any peer, for deployments that decide to trust every
    /// process that can reach the socket (a sandbox of one tenant, say).
    ///
    /// The consequence: a peer that rewrites a message after it was
    /// validated, by bug or by malice, can make this process read out of
    /// bounds (undefined behaviour: a crash at best, a leak or worse at
    /// worst). Use it only where every peer is as trusted as this process
    /// itself.
    pub fn assume_trusted() -> TrustedPeer {
        TrustedPeer { _private: () }
    }
}

/// How a reader reads a message (see the [crate docs](crate)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// Copy the message once into a private aligned buffer, validate and
    /// read it there: sound against any peer.
    #[default]
    Copied,
    /// Validate and read the message in place in shared memory, no copy;
    /// only for a peer trusted not to rewrite it meanwhile.
    InPlace(TrustedPeer),
}

impl ReadMode {
    /// In place if `peer` earns a [`TrustedPeer`] (same effective uid, or
    /// root), copied otherwise.
    pub fn for_peer(peer: &PeerCredentials) -> ReadMode {
        match TrustedPeer::from_credentials(peer) {
            Some(trust) => ReadMode::InPlace(trust),
            None => ReadMode::Copied,
        }
    }
}

/// How a server reads its requests, decided per connection from the
/// caller's credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TrustPolicy {
    /// Copy every request (sound against any client).
    #[default]
    CopyAll,
    /// Read requests in place from clients of our own effective uid or root
    /// ([`ReadMode::for_peer`]), copy the others'.
    SameUser,
    /// Read every client's requests in place (see
    /// [`TrustedPeer::assume_trusted`] for what that means).
    Everyone(TrustedPeer),
}

impl TrustPolicy {
    /// The read mode for requests from `peer`.
    pub fn mode_for(&self, peer: &PeerCredentials) -> ReadMode {
        match self {
            TrustPolicy::CopyAll => ReadMode::Copied,
            TrustPolicy::SameUser => ReadMode::for_peer(peer),
            TrustPolicy::Everyone(trust) => ReadMode::InPlace(*trust),
        }
    }
}

/// Which path a message took when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// Validated and read in place where it arrived.
    InPlace,
    /// Copied into a private aligned buffer, validated and read there.
    Copied,
}

/// Reading or writing a message failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The archive did not validate: the peer sent garbage, another type,
    /// or a message of another version of the type.
    #[error("invalid archived {type_name} ({len} bytes): {source}")]
    Invalid {
        /// The Rust type expected.
        type_name: &'static str,
        /// The archive's length.
        len: usize,
        /// What bytecheck found.
        source: rkyv::rancor::Error,
    },
    /// The message is not a frame (see [`frame`]): too short, no tag, or a
    /// length that does not fit.
    #[error("not a shmesh-rkyv frame of {type_name} ({len} bytes): {why}")]
    BadFrame {
        /// The Rust type expected.
        type_name: &'static str,
        /// The message's length.
        len: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// In-place access to bytes not aligned for rkyv (16 bytes).
    #[error("{type_name} at an address not aligned to 16 bytes cannot be read in place")]
    Misaligned {
        /// The Rust type expected.
        type_name: &'static str,
    },
    /// Serialization failed for another reason than room.
    #[error("cannot serialize {type_name}: {source}")]
    Serialize {
        /// The Rust type serialized.
        type_name: &'static str,
        /// What rkyv said.
        source: rkyv::rancor::Error,
    },
    /// The buffer is too small for the frame; `needed` is the exact length
    /// of the frame (archive plus trailer).
    #[error("{type_name} needs a frame of {needed} bytes, the buffer has {len}")]
    DoesNotFit {
        /// The Rust type serialized.
        type_name: &'static str,
        /// The buffer's length.
        len: usize,
        /// The frame's exact length.
        needed: usize,
    },
    /// The frame is larger than a frame can say (4 GiB).
    #[error("{type_name} archives to {len} bytes, more than a frame can carry")]
    TooLarge {
        /// The Rust type serialized.
        type_name: &'static str,
        /// The archive's length.
        len: usize,
    },
}

impl From<Error> for Status {
    /// Over-size messages are `ResourceExhausted`; everything else
    /// (invalid archives included) is `Internal`, naming the type.
    fn from(e: Error) -> Status {
        match e {
            Error::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

/// A unary method: its id, its request and response types, and the
/// archived length of its recent requests (so a request is serialized
/// straight into a loan of the right size).
///
/// Declare methods as statics that clients and servers share:
///
/// ```
/// # use rkyv::{Archive, Serialize};
/// # #[derive(Archive, Serialize)] struct Query { text: String }
/// # #[derive(Archive, Serialize)] struct Hits { ids: Vec<u64> }
/// use shmesh_rkyv::Method;
/// pub static SEARCH: Method<Query, Hits> = Method::new(1);
/// assert_eq!(SEARCH.id(), 1);
/// ```
pub struct Method<Req, Resp> {
    id: u32,
    request_size: SizeHint,
    _types: std::marker::PhantomData<fn(&Req) -> Resp>,
}

impl<Req, Resp> std::fmt::Debug for Method<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Method")
            .field("id", &self.id)
            .field("request", &type_name::<Req>())
            .field("response", &type_name::<Resp>())
            .finish()
    }
}

impl<Req, Resp> Method<Req, Resp> {
    /// The method with id `id`.
    pub const fn new(id: u32) -> Self {
        Method {
            id,
            request_size: SizeHint::new(),
            _types: std::marker::PhantomData,
        }
    }

    /// The method's id.
    pub const fn id(&self) -> u32 {
        self.id
    }

    /// What this method remembers of its requests' archived lengths.
    pub fn request_size(&self) -> &SizeHint {
        &self.request_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_comes_from_our_uid_or_root_only() {
        let me = rustix::process::geteuid().as_raw();
        let peer = |uid| PeerCredentials {
            pid: 7,
            uid,
            gid: 0,
        };
        assert!(TrustedPeer::from_credentials(&peer(me)).is_some());
        assert!(TrustedPeer::from_credentials(&peer(0)).is_some());
        let stranger = if me == 4242 { 4243 } else { 4242 };
        assert!(TrustedPeer::from_credentials(&peer(stranger)).is_none());
        assert_eq!(ReadMode::for_peer(&peer(stranger)), ReadMode::Copied);
        assert_eq!(
            TrustPolicy::SameUser.mode_for(&peer(me)),
            ReadMode::InPlace(TrustedPeer::assume_trusted())
        );
        assert_eq!(TrustPolicy::CopyAll.mode_for(&peer(me)), ReadMode::Copied);
        assert_eq!(TrustPolicy::default(), TrustPolicy::CopyAll);
        assert_eq!(ReadMode::default(), ReadMode::Copied);
        assert!(matches!(
            TrustPolicy::Everyone(TrustedPeer::assume_trusted()).mode_for(&peer(stranger)),
            ReadMode::InPlace(_)
        ));
    }

    #[test]
    fn errors_map_to_statuses() {
        use shmesh::status::Code;
        let too_large: Status = Error::TooLarge {
            type_name: "T",
            len: 1,
        }
        .into();
        assert_eq!(too_large.code(), Code::ResourceExhausted);
        let bad: Status = Error::BadFrame {
            type_name: "my::T",
            len: 3,
            why: "short",
        }
        .into();
        assert_eq!(bad.code(), Code::Internal);
        assert!(bad.message().contains("my::T"));
    }
}
