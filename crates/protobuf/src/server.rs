//! The server side: what a generated `FooServer` mounts on a [`Router`].
//!
//! Each RPC kind has a function that routes one method id to an async
//! handler on the server's tokio runtime, decoding its requests and
//! encoding its responses:
//!
//! | RPC kind | handler receives | handler returns |
//! |---|---|---|
//! | unary ([`unary`]) | [`Request<Req>`] | `Resp` |
//! | server streaming ([`server_streaming`]) | [`Request<Req>`], [`ResponseSink<Resp>`] | `()` |
//! | client streaming ([`client_streaming`]) | [`RequestStream<Req>`] | `Resp` |
//! | bidirectional ([`bidi_streaming`]) | [`BidiStream<Req, Resp>`] | `()` |
//!
//! A request that does not decode ends the call with `Internal`, naming
//! the request's type, before the handler runs. Every response, and every
//! message of a response stream, is encoded by prost straight into a
//! buffer loaned in shared memory (its `encoded_len`, then `encode` into
//! the loan): no intermediate `Vec`, no copy.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shmesh::PeerCredentials;
use shmesh::server::{AsyncServerStream, RecvHalf, ReplyBuf, Router, SendHalf};
use shmesh::status::Status;

use crate::{CallInfo, Request, decode, encode_into};

/// `message` encoded into a buffer of exactly its encoded length, loaned
/// by `loan`.
async fn encoded<T, F>(message: &T, loan: impl FnOnce(usize) -> F) -> Result<ReplyBuf, Status>
where
    T: prost::Message,
    F: Future<Output = Result<ReplyBuf, Status>>,
{
    let mut buf = loan(message.encoded_len()).await?;
    encode_into(message, &mut buf)?;
    Ok(buf)
}

/// What a shmesh stream says of its call.
fn info(call: &AsyncServerStream) -> CallInfo {
    CallInfo::shmesh(call.peer(), call.remaining(), call.metadata())
}

/// Routes the unary `method` to `handler`, called with `service` and the
/// decoded request (of protobuf type `request_type`).
pub fn unary<S, Req, Resp, F, Fut>(
    router: Router,
    method: u32,
    service: Arc<S>,
    request_type: &'static str,
    handler: F,
) -> Router
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + 'static,
    Resp: prost::Message,
    F: Fn(Arc<S>, Request<Req>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    router.route_async_in_place(method, move |request| {
        // Decoded before the handler's future starts; the request stays
        // for its connection to lend the response buffer.
        let reply = decode::<Req>(request.payload(), request_type).map(|message| {
            let info = CallInfo::shmesh(request.peer(), request.remaining(), request.metadata());
            handler(service.clone(), Request::with_info(message, info))
        });
        async move {
            let response = reply?.await?;
            encoded(&response, |len| request.loan(len)).await
        }
    })
}

/// Routes the server-streaming `method` to `handler`, called with
/// `service`, the decoded request (of protobuf type `request_type`) and the
/// sink for its responses.
pub fn server_streaming<S, Req, Resp, F, Fut>(
    router: Router,
    method: u32,
    service: Arc<S>,
    request_type: &'static str,
    handler: F,
) -> Router
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + 'static,
    Resp: prost::Message + 'static,
    F: Fn(Arc<S>, Request<Req>, ResponseSink<Resp>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let handler = Arc::new(handler);
    router.route_stream_async(method, move |mut call| {
        let (service, handler) = (service.clone(), handler.clone());
        async move {
            let message = {
                let Some(first) = call.recv().await? else {
                    return Err(Status::invalid_argument(format!(
                        "the call ended without its {request_type} request"
                    )));
                };
                decode::<Req>(&first, request_type)?
            };
            let request = Request::with_info(message, info(&call));
            // The client sends nothing after its one request.
            let (_, responses) = call.into_split();
            handler(service, request, ResponseSink::shmesh(responses)).await
        }
    })
}

/// Routes the client-streaming `method` to `handler`, called with `service`
/// and the stream of decoded requests (of protobuf type `request_type`);
/// its result is the call's one response.
pub fn client_streaming<S, Req, Resp, F, Fut>(
    router: Router,
    method: u32,
    service: Arc<S>,
    request_type: &'static str,
    handler: F,
) -> Router
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + 'static,
    Resp: prost::Message,
    F: Fn(Arc<S>, RequestStream<Req>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let handler = Arc::new(handler);
    router.route_stream_async(method, move |call| {
        let (service, handler) = (service.clone(), handler.clone());
        async move {
            let info = info(&call);
            let (requests, mut reply) = call.into_split();
            let requests = RequestStream::shmesh(requests, request_type, info);
            let response = handler(service, requests).await?;
            let buf = encoded(&response, |len| reply.loan(len)).await?;
            reply.send_buf(buf).await
        }
    })
}

/// Routes the bidirectional-streaming `method` to `handler`, called with
/// `service` and the call (requests of protobuf type `request_type`).
pub fn bidi_streaming<S, Req, Resp, F, Fut>(
    router: Router,
    method: u32,
    service: Arc<S>,
    request_type: &'static str,
    handler: F,
) -> Router
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + 'static,
    Resp: prost::Message + 'static,
    F: Fn(Arc<S>, BidiStream<Req, Resp>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    router.route_stream_async(method, move |call| {
        let info = info(&call);
        let (requests, responses) = call.into_split();
        let call = BidiStream {
            requests: RequestStream::shmesh(requests, request_type, info),
            responses: ResponseSink::shmesh(responses),
        };
        handler(service.clone(), call)
    })
}

/// Where a server-streaming handler sends its responses.
#[derive(Debug)]
pub struct ResponseSink<T> {
    inner: Outgoing<T>,
}

/// Where responses go.
#[derive(Debug)]
pub(crate) enum Outgoing<T> {
    /// To a shmesh call, each encoded into a buffer loaned there.
    Shmesh(SendHalf, PhantomData<fn(&T)>),
    /// To the stream tonic sends from.
    #[cfg(feature = "tonic")]
    Grpc(tokio::sync::mpsc::Sender<Result<T, tonic::Status>>),
}

impl<T: prost::Message + Clone> Outgoing<T> {
    async fn send(&mut self, message: &T) -> Result<(), Status> {
        match self {
            Outgoing::Shmesh(call, _) => {
                let buf = encoded(message, |len| call.loan(len)).await?;
                call.send_buf(buf).await
            }
            #[cfg(feature = "tonic")]
            Outgoing::Grpc(tx) => tx
                .send(Ok(message.clone()))
                .await
                .map_err(|_| Status::cancelled("the client is gone")),
        }
    }
}

impl<T> ResponseSink<T> {
    fn shmesh(call: SendHalf) -> Self {
        ResponseSink {
            inner: Outgoing::Shmesh(call, PhantomData),
        }
    }

    /// A sink into tonic's response stream.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(tx: tokio::sync::mpsc::Sender<Result<T, tonic::Status>>) -> Self {
        ResponseSink {
            inner: Outgoing::Grpc(tx),
        }
    }
}

impl<T: prost::Message + Clone> ResponseSink<T> {
    /// Sends one response, waiting while the client has not granted the
    /// credit for it. Over shmesh it is encoded straight into shared
    /// memory.
    pub async fn send(&mut self, message: &T) -> Result<(), Status> {
        self.inner.send(message).await
    }
}

/// The requests of a client-streaming call, read one at a time.
#[derive(Debug)]
pub struct RequestStream<T> {
    inner: Incoming<T>,
    info: CallInfo,
}

/// Where requests come from.
#[derive(Debug)]
pub(crate) enum Incoming<T> {
    /// A shmesh call, each request decoded in place.
    Shmesh {
        call: RecvHalf,
        request_type: &'static str,
        _message: PhantomData<fn() -> T>,
    },
    /// tonic's decoded stream.
    #[cfg(feature = "tonic")]
    Grpc(Box<tonic::Streaming<T>>),
}

impl<T: prost::Message + Default> Incoming<T> {
    async fn message(&mut self) -> Result<Option<T>, Status> {
        match self {
            Incoming::Shmesh {
                call, request_type, ..
            } => match call.recv().await? {
                Some(message) => decode(&message, request_type).map(Some),
                None => Ok(None),
            },
            #[cfg(feature = "tonic")]
            Incoming::Grpc(stream) => stream.message().await.map_err(crate::grpc::from_tonic),
        }
    }
}

impl<T> RequestStream<T> {
    /// Requests of a shmesh call (of protobuf type `request_type`), which
    /// `info` describes.
    fn shmesh(call: RecvHalf, request_type: &'static str, info: CallInfo) -> Self {
        RequestStream {
            inner: Incoming::Shmesh {
                call,
                request_type,
                _message: PhantomData,
            },
            info,
        }
    }

    /// Requests from tonic's stream, of the call `info` describes.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(stream: tonic::Streaming<T>, info: CallInfo) -> Self {
        RequestStream {
            inner: Incoming::Grpc(Box::new(stream)),
            info,
        }
    }

    /// The credentials of the calling process (`None` over gRPC).
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.info.peer
    }

    /// The client's address over gRPC on TCP (`None` over shmesh).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        self.info.remaining()
    }

    /// The call's metadata (see [`Request::metadata`]).
    pub fn metadata(&self) -> &shmesh::metadata::Metadata {
        &self.info.metadata
    }
}

impl<T: prost::Message + Default> RequestStream<T> {
    /// The next request; `None` once the client has sent its last.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        self.inner.message().await
    }
}

/// A bidirectional-streaming call as its handler sees it: read requests,
/// send responses, in any order, or from two tasks at once after
/// [`BidiStream::into_split`].
#[derive(Debug)]
pub struct BidiStream<Req, Resp> {
    requests: RequestStream<Req>,
    responses: ResponseSink<Resp>,
}

impl<Req, Resp> BidiStream<Req, Resp> {
    /// A call over tonic's streams.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        requests: tonic::Streaming<Req>,
        responses: ResponseSink<Resp>,
        info: CallInfo,
    ) -> Self {
        BidiStream {
            requests: RequestStream::grpc(requests, info),
            responses,
        }
    }

    /// The credentials of the calling process (`None` over gRPC).
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.requests.peer()
    }

    /// The client's address over gRPC on TCP (`None` over shmesh).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.requests.remote_addr()
    }

    /// The call's metadata (see [`Request::metadata`]).
    pub fn metadata(&self) -> &shmesh::metadata::Metadata {
        self.requests.metadata()
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        self.requests.remaining()
    }

    /// Parts the call into its requests and its response sink, to read
    /// and send from two tasks at once (say, one task answering while
    /// another reads). The call ends when the handler's future completes,
    /// whatever became of the parts: a part moved into a task of its own
    /// fails once the call has ended. Dropping the sink sends nothing more;
    /// dropping the requests leaves the client's further requests unread.
    pub fn into_split(self) -> (RequestStream<Req>, ResponseSink<Resp>) {
        (self.requests, self.responses)
    }
}

impl<Req: prost::Message + Default, Resp: prost::Message + Clone> BidiStream<Req, Resp> {
    /// The next request; `None` once the client has sent its last.
    pub async fn message(&mut self) -> Result<Option<Req>, Status> {
        self.requests.message().await
    }

    /// Sends one response, waiting while the client has not granted the
    /// credit for it. Over shmesh it is encoded straight into shared
    /// memory.
    pub async fn send(&mut self, message: &Resp) -> Result<(), Status> {
        self.responses.send(message).await
    }
}
