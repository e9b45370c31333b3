//! The server side: [`RouterExt`] mounts rkyv handlers on a shmesh
//! [`Router`]; async handlers get an [`ArchivedRequest`].

use std::borrow::Borrow;
use std::future::Future;
use std::time::Duration;

use shmesh::PeerCredentials;
use shmesh::server::{AsyncRequest, Reply, Request, Router};
use shmesh::status::Status;
use yoke::Yoke;

use crate::client::{exact_len_after, loan_failed, unstable};
use crate::frame::{self, Access, ArchivedBuf, SizeHint, TRAILER_LEN};
use crate::{Error, Message, Method, ReadMode, ReadPath, TrustPolicy, type_name};

/// rkyv handlers on a shmesh [`Router`].
pub trait RouterExt: Sized {
    /// Serves `method` on the connection's thread (the fast path, for
    /// quick handlers, as [`Router::route_in_place`]): the handler gets the
    /// request as an [`Access`], which derefs to `Req`'s archived type and
    /// says which path it took ([`Access::path`]), read as `policy` decides
    /// for the caller, and the [`Request`] (caller's credentials, time
    /// left); the
    /// `Resp` it returns (or anything that borrows as one, an `Arc<Resp>`
    /// say) is serialized straight into the reply's loan, of any size.
    ///
    /// A request that does not validate is answered `Internal` naming
    /// `Req`, without running the handler.
    ///
    /// ```
    /// # use rkyv::{Archive, Serialize};
    /// # #[derive(Archive, Serialize)] struct Query { text: String }
    /// # #[derive(Archive, Serialize)] struct Hits { ids: Vec<u64> }
    /// # static SEARCH: shmesh_rkyv::Method<Query, Hits> = shmesh_rkyv::Method::new(1);
    /// use shmesh::server::Router;
    /// use shmesh_rkyv::{RouterExt, TrustPolicy};
    ///
    /// let router = Router::new().route_archived(&SEARCH, TrustPolicy::CopyAll, |query, call| {
    ///     let ids = (0..query.text.len() as u64).collect();
    ///     println!("query from pid {}", call.peer.pid);
    ///     Ok(Hits { ids })
    /// });
    /// ```
    fn route_archived<Req, Resp, R, F>(
        self,
        method: &Method<Req, Resp>,
        policy: TrustPolicy,
        handler: F,
    ) -> Self
    where
        Req: Message,
        Resp: Message,
        R: Borrow<Resp>,
        F: Fn(&Access<'_, Req>, &Request<'_>) -> Result<R, Status> + Send + Sync + 'static;

    /// Serves `method` with an async handler, a task on the server's tokio
    /// runtime (as [`Router::route_async`]): it gets an [`ArchivedRequest`],
    /// which owns the request (so it can be held across awaits) and derefs
    /// to `Req`'s archived type.
    ///
    /// shmesh's async handlers answer with bytes, so the response is
    /// serialized into a private buffer of its exact length and copied into
    /// shared memory once by shmesh (until shmesh has an async in-place
    /// reply).
    ///
    /// ```
    /// # use rkyv::{Archive, Serialize};
    /// # #[derive(Archive, Serialize)] struct Query { text: String }
    /// # #[derive(Archive, Serialize)] struct Hits { ids: Vec<u64> }
    /// # static SEARCH: shmesh_rkyv::Method<Query, Hits> = shmesh_rkyv::Method::new(1);
    /// use shmesh::server::Router;
    /// use shmesh_rkyv::{RouterExt, TrustPolicy};
    ///
    /// let router = Router::new().route_archived_async(&SEARCH, TrustPolicy::SameUser, |query| async move {
    ///     tokio::task::yield_now().await; // hold the request across awaits
    ///     Ok(Hits { ids: vec![query.text.len() as u64] })
    /// });
    /// ```
    fn route_archived_async<Req, Resp, R, F, Fut>(
        self,
        method: &Method<Req, Resp>,
        policy: TrustPolicy,
        handler: F,
    ) -> Self
    where
        Req: Message,
        Resp: Message,
        R: Borrow<Resp>,
        F: Fn(ArchivedRequest<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Status>> + Send + 'static;
}

impl RouterExt for Router {
    fn route_archived<Req, Resp, R, F>(
        self,
        method: &Method<Req, Resp>,
        policy: TrustPolicy,
        handler: F,
    ) -> Self
    where
        Req: Message,
        Resp: Message,
        R: Borrow<Resp>,
        F: Fn(&Access<'_, Req>, &Request<'_>) -> Result<R, Status> + Send + Sync + 'static,
    {
        let replies = SizeHint::new();
        self.route_in_place(method.id(), move |request, reply| {
            let mode = policy.mode_for(&request.peer);
            let archived = frame::access::<Req>(request.payload, mode)?;
            let response = handler(&archived, request)?;
            write_reply(reply, response.borrow(), &replies)
        })
    }

    fn route_archived_async<Req, Resp, R, F, Fut>(
        self,
        method: &Method<Req, Resp>,
        policy: TrustPolicy,
        handler: F,
    ) -> Self
    where
        Req: Message,
        Resp: Message,
        R: Borrow<Resp>,
        F: Fn(ArchivedRequest<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Status>> + Send + 'static,
    {
        let state = std::sync::Arc::new((handler, SizeHint::new()));
        self.route_async(method.id(), move |request| {
            let state = state.clone();
            async move {
                let mode = policy.mode_for(&request.peer());
                let request = ArchivedRequest::new(request, mode)?;
                let (handler, replies) = &*state;
                let response = handler(request).await?;
                to_frame_vec(response.borrow(), replies)
            }
        })
    }
}

/// Serializes `value` straight into `reply`'s loan: one loan of the hinted
/// length, and at most one more of the exact length.
pub(crate) fn write_reply<T: Message>(
    reply: &mut Reply<'_>,
    value: &T,
    hint: &SizeHint,
) -> Result<(), Status> {
    let mut len = hint.loan_len();
    for attempt in 0..2 {
        let buf = match reply.loan(len) {
            Ok(buf) => buf,
            Err(status) if attempt == 0 => {
                len = exact_len_after(status, len, value)?;
                continue;
            }
            Err(status) => return Err(loan_failed::<T>(status)),
        };
        match frame::write_frame(value, buf) {
            Ok(n) => {
                hint.record(n);
                return Ok(());
            }
            Err(Error::DoesNotFit { needed, .. }) if attempt == 0 => {
                hint.record(needed - TRAILER_LEN);
                // The next loan replaces this one.
                len = needed;
            }
            Err(Error::DoesNotFit { .. }) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Err(unstable::<T>())
}

/// `value` as a frame of its exact length in a private buffer.
pub(crate) fn to_frame_vec<T: Message>(value: &T, hint: &SizeHint) -> Result<Vec<u8>, Status> {
    let mut buf = vec![0u8; hint.loan_len()];
    let n = match frame::write_frame(value, &mut buf) {
        Ok(n) => n,
        Err(Error::DoesNotFit { needed, .. }) => {
            buf.resize(needed, 0);
            frame::write_frame(value, &mut buf)?
        }
        Err(e) => return Err(e.into()),
    };
    hint.record(n);
    // Drop the slack: the trailer moves right after the archive.
    let len = buf.len();
    buf.copy_within(len - TRAILER_LEN.., n);
    buf.truncate(n + TRAILER_LEN);
    Ok(buf)
}

/// An async handler's request: owns the call (so it lives across awaits)
/// and derefs to `Req`'s archived type, validated in place or in a private
/// copy as the route's [`TrustPolicy`] decided for this caller.
pub struct ArchivedRequest<Req: Message> {
    inner: Inner<Req>,
}

enum Inner<Req: Message> {
    InPlace(Yoke<&'static Req::Archived, Box<AsyncRequest>>),
    Copied(AsyncRequest, ArchivedBuf<Req>),
}

impl<Req: Message> ArchivedRequest<Req> {
    /// Reads `request` in `mode` (copied if its bytes are not aligned).
    pub(crate) fn new(request: AsyncRequest, mode: ReadMode) -> Result<Self, Error> {
        let in_place = matches!(mode, ReadMode::InPlace(_)) && frame::aligned(request.payload());
        let inner = if in_place {
            Inner::InPlace(Yoke::try_attach_to_cart(
                Box::new(request),
                |request: &AsyncRequest| match frame::access::<Req>(request.payload(), mode)? {
                    frame::Access::InPlace(archived) => Ok(archived),
                    frame::Access::Copied(_) => Err(Error::Misaligned {
                        type_name: type_name::<Req>(),
                    }),
                },
            )?)
        } else {
            let copy = frame::access_copied::<Req>(request.payload())?;
            Inner::Copied(request, copy)
        };
        Ok(ArchivedRequest { inner })
    }

    /// The call underneath (its raw bytes, cancellation).
    pub fn request(&self) -> &AsyncRequest {
        match &self.inner {
            Inner::InPlace(yoke) => yoke.backing_cart(),
            Inner::Copied(request, _) => request,
        }
    }

    /// Which path the request took.
    pub fn path(&self) -> ReadPath {
        match &self.inner {
            Inner::InPlace(_) => ReadPath::InPlace,
            Inner::Copied(..) => ReadPath::Copied,
        }
    }

    /// Who called: from `SO_PEERCRED` at connect time.
    pub fn peer(&self) -> PeerCredentials {
        self.request().peer()
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        self.request().remaining()
    }

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.request().is_cancelled()
    }
}

impl<Req: Message> std::ops::Deref for ArchivedRequest<Req> {
    type Target = Req::Archived;
    fn deref(&self) -> &Req::Archived {
        match &self.inner {
            Inner::InPlace(yoke) => yoke.get(),
            Inner::Copied(_, buf) => buf,
        }
    }
}

impl<Req: Message> std::fmt::Debug for ArchivedRequest<Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchivedRequest")
            .field("type", &type_name::<Req>())
            .field("path", &self.path())
            .field("request", self.request())
            .finish()
    }
}
