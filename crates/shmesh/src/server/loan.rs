//! Answers written in place: a [`ReplyBuf`] is a slab of the connection's
//! pool that a handler fills and then hands over whole, so the bytes it
//! wrote are the bytes the client reads, never copied.

use shmesh_shm::pool::{OwnedSlab, Pool};

use crate::status::Status;

/// A buffer loaned from the connection's pool for one answer (a unary
/// response or one message of a stream), to write in place and send
/// without a copy.
///
/// Get one from the call ([`AsyncRequest::loan`], [`ServerStream::loan`],
/// [`AsyncServerStream::loan`], [`SendHalf::loan`]), write the message
/// into it (it derefs to `[u8]` of exactly the length asked for), and
/// return it from a [`Router::route_async_in_place`] handler or send it
/// with `send_buf`. The client then reads those very bytes in shared
/// memory.
///
/// A buffer larger than the pool's largest slab cannot be one slab: it
/// lives on the heap and is copied out in chunks when sent, as any message
/// that large is ([`ReplyBuf::in_shared_memory`] says which it is). A buffer
/// dropped unsent goes back to the pool. A buffer belongs to the connection
/// it was loaned on: sending it on another is `InvalidArgument`.
///
/// [`AsyncRequest::loan`]: crate::server::AsyncRequest::loan
/// [`ServerStream::loan`]: crate::server::ServerStream::loan
/// [`AsyncServerStream::loan`]: crate::server::AsyncServerStream::loan
/// [`SendHalf::loan`]: crate::server::SendHalf::loan
/// [`Router::route_async_in_place`]: crate::server::Router::route_async_in_place
pub struct ReplyBuf {
    body: Body,
}

enum Body {
    /// An empty message: no slab needed.
    Empty,
    /// The first `len` bytes of a slab of the connection's pool.
    Slab(OwnedSlab, usize),
    /// Larger than any slab (or given as bytes): copied out when sent.
    Heap(Vec<u8>),
}

/// How a [`ReplyBuf`] goes out.
pub(crate) enum Outgoing {
    /// As it is: its slab and the length used (`None`: an empty message).
    InPlace(Option<(OwnedSlab, usize)>),
    /// Copied into slabs, in chunks if need be.
    Copied(Vec<u8>),
}

impl ReplyBuf {
    /// An empty message.
    pub(crate) fn empty() -> Self {
        ReplyBuf { body: Body::Empty }
    }

    /// `len` bytes at the start of `slab`.
    pub(crate) fn slab(slab: OwnedSlab, len: usize) -> Self {
        ReplyBuf {
            body: Body::Slab(slab, len),
        }
    }

    /// Bytes to copy out when sent: a heap buffer of zeros `len` long, or
    /// an answer a handler returned as bytes.
    pub(crate) fn heap(bytes: Vec<u8>) -> Self {
        ReplyBuf {
            body: Body::Heap(bytes),
        }
    }

    /// Whether the bytes are a slab in shared memory already, so sending
    /// them copies nothing. `false` for an empty buffer (there is nothing to
    /// copy) and for one larger than the largest slab (copied out in
    /// chunks).
    pub fn in_shared_memory(&self) -> bool {
        matches!(self.body, Body::Slab(..))
    }

    /// How the buffer goes out on the connection whose pool is `pool`:
    /// `InvalidArgument` if its slab is another connection's.
    pub(crate) fn into_outgoing(self, pool: &Pool) -> Result<Outgoing, Status> {
        match self.body {
            Body::Empty => Ok(Outgoing::InPlace(None)),
            Body::Slab(slab, _) if !slab.is_from(pool) => Err(Status::invalid_argument(
                "a reply buffer loaned on another connection",
            )),
            Body::Slab(slab, len) => Ok(Outgoing::InPlace(Some((slab, len)))),
            Body::Heap(bytes) => Ok(Outgoing::Copied(bytes)),
        }
    }
}

impl std::ops::Deref for ReplyBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.body {
            Body::Empty => &[],
            Body::Slab(slab, len) => &slab[..*len],
            Body::Heap(bytes) => bytes,
        }
    }
}

impl std::ops::DerefMut for ReplyBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.body {
            Body::Empty => &mut [],
            Body::Slab(slab, len) => &mut slab[..*len],
            Body::Heap(bytes) => bytes,
        }
    }
}

impl std::fmt::Debug for ReplyBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyBuf")
            .field("len", &self.len())
            .field("in_shared_memory", &self.in_shared_memory())
            .finish()
    }
}
