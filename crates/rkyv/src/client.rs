//! The client side: [`Client`] over a blocking
//! [`Channel`](shmesh::client::Channel), [`AsyncClient`] over an
//! [`AsyncChannel`](shmesh::asynchronous::AsyncChannel), and the
//! [`ArchivedResponse`] both return.

use std::time::Duration;

use shmesh::asynchronous::AsyncChannel;
use shmesh::client::{Channel, RequestBuf, Response};
use shmesh::status::{Code, Status};
use yoke::Yoke;

use crate::frame::{self, ArchivedBuf, SizeHint};
use crate::{Error, Message, Method, ReadMode, ReadPath, type_name};

/// A response read as `Resp`'s archived type, validated: in place in the
/// server's slab (kept until this is dropped) or in a private copy (the
/// slab already given back). Derefs to `Resp::Archived`.
pub struct ArchivedResponse<Resp: Message> {
    inner: Inner<Resp>,
}

enum Inner<Resp: Message> {
    InPlace(Yoke<&'static Resp::Archived, Box<Response>>),
    Copied(ArchivedBuf<Resp>),
}

impl<Resp: Message> ArchivedResponse<Resp> {
    /// Reads `response` in `mode`. In place only if the mode allows it, the
    /// response came in one slab (at most `max_slab` bytes: a larger one was
    /// assembled from chunks on the heap) and it is aligned.
    pub(crate) fn new(response: Response, mode: ReadMode, max_slab: usize) -> Result<Self, Error> {
        let in_place = matches!(mode, ReadMode::InPlace(_))
            && response.len() <= max_slab
            && frame::aligned(&response);
        let inner = if in_place {
            Inner::InPlace(Yoke::try_attach_to_cart(
                Box::new(response),
                |response: &Response| match frame::access::<Resp>(response, mode)? {
                    frame::Access::InPlace(archived) => Ok(archived),
                    frame::Access::Copied(_) => Err(Error::Misaligned {
                        type_name: type_name::<Resp>(),
                    }),
                },
            )?)
        } else {
            // The copy is taken before the slab goes back.
            Inner::Copied(frame::access_copied::<Resp>(&response)?)
        };
        Ok(ArchivedResponse { inner })
    }

    /// Which path the response took.
    pub fn path(&self) -> ReadPath {
        match &self.inner {
            Inner::InPlace(_) => ReadPath::InPlace,
            Inner::Copied(_) => ReadPath::Copied,
        }
    }
}

impl<Resp: Message> std::ops::Deref for ArchivedResponse<Resp> {
    type Target = Resp::Archived;
    fn deref(&self) -> &Resp::Archived {
        match &self.inner {
            Inner::InPlace(yoke) => yoke.get(),
            Inner::Copied(buf) => buf,
        }
    }
}

impl<Resp: Message> std::fmt::Debug for ArchivedResponse<Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchivedResponse")
            .field("type", &type_name::<Resp>())
            .field("path", &self.path())
            .finish()
    }
}

/// The largest slab of a channel's pools (both sides have the same
/// classes): a message larger than that came in chunks.
fn largest_slab(channel: &Channel) -> usize {
    channel
        .limits()
        .pool_classes
        .as_slice()
        .iter()
        .map(|c| usize::try_from(c.slab_size).unwrap_or(usize::MAX))
        .max()
        .unwrap_or(0)
}

/// Names the request type in a loan's `ResourceExhausted` (over-size).
pub(crate) fn loan_failed<T>(status: Status) -> Status {
    if status.code() == Code::ResourceExhausted {
        Status::resource_exhausted(format!("{}: {}", type_name::<T>(), status.message()))
    } else {
        status
    }
}

/// The lengths to loan for `value`, one at a time, given what the first
/// attempt taught: see [`Client::call`].
enum Next {
    Done(RequestBuf),
    Loan(usize),
}

/// Writes `value` into `buf`; on overflow says the exact length to loan.
fn fill<T: Message>(value: &T, mut buf: RequestBuf, hint: &SizeHint) -> Result<Next, Status> {
    match frame::write_frame(value, &mut buf) {
        Ok(n) => {
            hint.record(n);
            Ok(Next::Done(buf))
        }
        Err(Error::DoesNotFit { needed, .. }) => {
            hint.record(needed - frame::TRAILER_LEN);
            Ok(Next::Loan(needed))
        }
        Err(e) => Err(e.into()),
    }
}

/// After a loan of the hinted length failed: if it failed for size, the
/// hint's headroom may be what broke the limit; measure the message exactly.
pub(crate) fn exact_len_after<T: Message>(
    status: Status,
    tried: usize,
    value: &T,
) -> Result<usize, Status> {
    if status.code() != Code::ResourceExhausted {
        return Err(status);
    }
    let needed = frame::frame_len(value)?;
    if needed >= tried {
        return Err(loan_failed::<T>(status));
    }
    Ok(needed)
}

/// An exact loan that still does not fit: the message changed size between
/// two serializations, which a `&T` cannot.
pub(crate) fn unstable<T>() -> Status {
    Status::internal(format!(
        "{} serialized to two different lengths",
        type_name::<T>()
    ))
}

/// A blocking client of rkyv methods over a [`Channel`].
///
/// ```no_run
/// # use rkyv::{Archive, Serialize};
/// # #[derive(Archive, Serialize)] struct Query { text: String }
/// # #[derive(Archive, Serialize)] struct Hits { ids: Vec<u64> }
/// # static SEARCH: shmesh_rkyv::Method<Query, Hits> = shmesh_rkyv::Method::new(1);
/// use shmesh::client::{Channel, ChannelOptions};
/// use shmesh_rkyv::Client;
///
/// let channel = Channel::connect("shm://@search", &ChannelOptions::new("search", shmesh::SchemaHash([0; 32])))?;
/// // Responses are copied before they are read: sound whoever the server is.
/// let client = Client::new(channel, shmesh_rkyv::ReadMode::Copied);
/// let hits = client.call(&SEARCH, &Query { text: "rkyv".into() }, None)?;
/// println!("{} hits", hits.ids.len());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    mode: ReadMode,
    max_slab: usize,
}

impl Client {
    /// A client reading responses in `mode`.
    pub fn new(channel: Channel, mode: ReadMode) -> Self {
        let max_slab = largest_slab(&channel);
        Client {
            channel,
            mode,
            max_slab,
        }
    }

    /// A client reading responses in place if the server runs as our own
    /// effective uid or as root ([`ReadMode::for_peer`] of
    /// [`Channel::peer`]), copied otherwise, and copied when the server's
    /// identity is unknown (a connection brokered by the host daemon).
    pub fn trusting_same_user(channel: Channel) -> Self {
        let mode = channel
            .peer()
            .map_or(ReadMode::Copied, |peer| ReadMode::for_peer(&peer));
        Client::new(channel, mode)
    }

    /// The channel underneath.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// How responses are read.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    /// Calls `method` with `request` and waits up to `timeout` (for a free
    /// slab, then again for the answer).
    ///
    /// The request is serialized once, straight into a loaned slab sized
    /// from the method's [`SizeHint`]; if it does not fit, it is serialized
    /// again into a loan of exactly its length (larger than the largest
    /// slab: a heap buffer sent in chunks). Larger than the connection's
    /// message limit: `ResourceExhausted`. A response that does not
    /// validate: `Internal`, naming `Resp`.
    pub fn call<Req: Message, Resp: Message>(
        &self,
        method: &Method<Req, Resp>,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<ArchivedResponse<Resp>, Status> {
        let buf = self.serialize(request, method.request_size(), timeout)?;
        let response = self.channel.send(method.id(), buf, timeout)?;
        Ok(ArchivedResponse::new(response, self.mode, self.max_slab)?)
    }

    /// `value` serialized into a loaned request buffer.
    pub fn serialize<T: Message>(
        &self,
        value: &T,
        hint: &SizeHint,
        timeout: Option<Duration>,
    ) -> Result<RequestBuf, Status> {
        let mut len = hint.loan_len();
        for attempt in 0..2 {
            let buf = match self.channel.loan(len, timeout) {
                Ok(buf) => buf,
                Err(status) if attempt == 0 => {
                    len = exact_len_after(status, len, value)?;
                    continue;
                }
                Err(status) => return Err(loan_failed::<T>(status)),
            };
            match fill(value, buf, hint)? {
                Next::Done(buf) => return Ok(buf),
                Next::Loan(exact) if attempt == 0 => len = exact,
                Next::Loan(_) => break,
            }
        }
        Err(unstable::<T>())
    }
}

/// An async client of rkyv methods over an [`AsyncChannel`]: the same as
/// [`Client`], for tasks.
///
/// ```no_run
/// # use rkyv::{Archive, Serialize};
/// # #[derive(Archive, Serialize)] struct Query { text: String }
/// # #[derive(Archive, Serialize)] struct Hits { ids: Vec<u64> }
/// # static SEARCH: shmesh_rkyv::Method<Query, Hits> = shmesh_rkyv::Method::new(1);
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use shmesh::asynchronous::AsyncChannel;
/// use shmesh::client::ChannelOptions;
/// use shmesh_rkyv::AsyncClient;
///
/// let options = ChannelOptions::new("search", shmesh::SchemaHash([0; 32]));
/// let client = AsyncClient::trusting_same_user(AsyncChannel::connect("shm://@search", &options).await?);
/// let hits = client.call(&SEARCH, &Query { text: "rkyv".into() }, None).await?;
/// println!("{} hits ({:?})", hits.ids.len(), hits.path());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AsyncClient {
    channel: AsyncChannel,
    mode: ReadMode,
    max_slab: usize,
}

impl AsyncClient {
    /// A client reading responses in `mode`.
    pub fn new(channel: AsyncChannel, mode: ReadMode) -> Self {
        let max_slab = largest_slab(channel.blocking());
        AsyncClient {
            channel,
            mode,
            max_slab,
        }
    }

    /// A client reading responses in place if the server runs as our own
    /// effective uid or as root, copied otherwise (see
    /// [`Client::trusting_same_user`]).
    pub fn trusting_same_user(channel: AsyncChannel) -> Self {
        let mode = channel
            .peer()
            .map_or(ReadMode::Copied, |peer| ReadMode::for_peer(&peer));
        AsyncClient::new(channel, mode)
    }

    /// The channel underneath.
    pub fn channel(&self) -> &AsyncChannel {
        &self.channel
    }

    /// How responses are read.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    /// Calls `method` with `request`; see [`Client::call`]. Awaits (does
    /// not block) while the pool is busy.
    pub async fn call<Req: Message, Resp: Message>(
        &self,
        method: &Method<Req, Resp>,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<ArchivedResponse<Resp>, Status> {
        let buf = self
            .serialize(request, method.request_size(), timeout)
            .await?;
        let response = self.channel.send(method.id(), buf, timeout).await?;
        Ok(ArchivedResponse::new(response, self.mode, self.max_slab)?)
    }

    /// `value` serialized into a loaned request buffer, awaiting a free
    /// slab.
    pub async fn serialize<T: Message>(
        &self,
        value: &T,
        hint: &SizeHint,
        timeout: Option<Duration>,
    ) -> Result<RequestBuf, Status> {
        let mut len = hint.loan_len();
        for attempt in 0..2 {
            let buf = match self.channel.loan_wait(len, timeout).await {
                Ok(buf) => buf,
                Err(status) if attempt == 0 => {
                    len = exact_len_after(status, len, value)?;
                    continue;
                }
                Err(status) => return Err(loan_failed::<T>(status)),
            };
            match fill(value, buf, hint)? {
                Next::Done(buf) => return Ok(buf),
                Next::Loan(exact) if attempt == 0 => len = exact,
                Next::Loan(_) => break,
            }
        }
        Err(unstable::<T>())
    }
}
