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
//! the request's type, before the handler runs.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use shmesh::PeerCredentials;
use shmesh::server::{AsyncRequest, AsyncServerStream, Router};
use shmesh::status::Status;

use crate::{Request, decode};

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
    router.route_async(method, move |request: AsyncRequest| {
        // Decoded before the task's first await, so the request's slab
        // goes back at once.
        let reply = decode::<Req>(request.payload(), request_type).map(|message| {
            let request = Request::from_parts(message, request.peer(), request.remaining());
            handler(service.clone(), request)
        });
        async move { Ok(reply?.await?.encode_to_vec()) }
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
    router.route_stream_async(method, move |mut call: AsyncServerStream| {
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
            let request = Request::from_parts(message, call.peer(), call.remaining());
            handler(service, request, ResponseSink::shmesh(call)).await
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
    router.route_stream_async(method, move |call: AsyncServerStream| {
        let (service, handler) = (service.clone(), handler.clone());
        async move {
            let (peer, remaining) = (call.peer(), call.remaining());
            let call = Arc::new(tokio::sync::Mutex::new(call));
            let requests = RequestStream {
                inner: Incoming::Shmesh {
                    call: call.clone(),
                    request_type,
                    _message: PhantomData,
                },
                peer: Some(peer),
                remaining,
            };
            let reply = handler(service, requests).await?.encode_to_vec();
            call.lock().await.send(&reply).await
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
    router.route_stream_async(method, move |call: AsyncServerStream| {
        handler(
            service.clone(),
            BidiStream {
                inner: Bidi::Shmesh {
                    call,
                    buf: Vec::new(),
                    request_type,
                    _messages: PhantomData,
                },
            },
        )
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
    /// To a shmesh call, each encoded into the reused `buf`.
    Shmesh {
        call: AsyncServerStream,
        buf: Vec<u8>,
        _message: PhantomData<fn(&T)>,
    },
    /// To the stream tonic sends from.
    #[cfg(feature = "tonic")]
    Grpc(tokio::sync::mpsc::Sender<Result<T, tonic::Status>>),
}

impl<T: prost::Message + Clone> Outgoing<T> {
    async fn send(&mut self, message: &T) -> Result<(), Status> {
        match self {
            Outgoing::Shmesh { call, buf, .. } => {
                buf.clear();
                message
                    .encode(buf)
                    .map_err(|e| Status::internal(format!("cannot encode a response: {e}")))?;
                call.send(buf).await
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
    fn shmesh(call: AsyncServerStream) -> Self {
        ResponseSink {
            inner: Outgoing::Shmesh {
                call,
                buf: Vec::new(),
                _message: PhantomData,
            },
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
    /// credit for it.
    pub async fn send(&mut self, message: &T) -> Result<(), Status> {
        self.inner.send(message).await
    }
}

/// The requests of a client-streaming call, read one at a time.
#[derive(Debug)]
pub struct RequestStream<T> {
    inner: Incoming<T>,
    peer: Option<PeerCredentials>,
    remaining: Option<Duration>,
}

/// Where requests come from.
#[derive(Debug)]
pub(crate) enum Incoming<T> {
    /// A shmesh call, shared with the reply sent after the handler.
    Shmesh {
        call: Arc<tokio::sync::Mutex<AsyncServerStream>>,
        request_type: &'static str,
        _message: PhantomData<fn() -> T>,
    },
    /// tonic's decoded stream.
    #[cfg(feature = "tonic")]
    Grpc(Box<tonic::Streaming<T>>),
}

impl<T: prost::Message + Default> RequestStream<T> {
    /// Requests from tonic's stream.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(stream: tonic::Streaming<T>) -> Self {
        RequestStream {
            inner: Incoming::Grpc(Box::new(stream)),
            peer: None,
            remaining: None,
        }
    }

    /// The next request; `None` once the client has sent its last.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        match &mut self.inner {
            Incoming::Shmesh {
                call, request_type, ..
            } => match call.lock().await.recv().await? {
                Some(message) => decode(&message, request_type).map(Some),
                None => Ok(None),
            },
            #[cfg(feature = "tonic")]
            Incoming::Grpc(stream) => stream.message().await.map_err(crate::grpc::from_tonic),
        }
    }

    /// The credentials of the calling process (`None` over gRPC).
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.peer
    }

    /// Time left before the caller's deadline (as it was when the call
    /// reached the handler), if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        self.remaining
    }
}

/// A bidirectional-streaming call as its handler sees it: read requests,
/// send responses, in any order.
#[derive(Debug)]
pub struct BidiStream<Req, Resp> {
    inner: Bidi<Req, Resp>,
}

#[derive(Debug)]
enum Bidi<Req, Resp> {
    Shmesh {
        call: AsyncServerStream,
        buf: Vec<u8>,
        request_type: &'static str,
        _messages: PhantomData<fn(&Resp) -> Req>,
    },
    #[cfg(feature = "tonic")]
    Grpc {
        incoming: Box<tonic::Streaming<Req>>,
        outgoing: Outgoing<Resp>,
    },
}

impl<Req, Resp> BidiStream<Req, Resp> {
    /// A call over tonic's streams.
    #[cfg(feature = "tonic")]
    pub(crate) fn grpc(
        incoming: tonic::Streaming<Req>,
        outgoing: tokio::sync::mpsc::Sender<Result<Resp, tonic::Status>>,
    ) -> Self {
        BidiStream {
            inner: Bidi::Grpc {
                incoming: Box::new(incoming),
                outgoing: Outgoing::Grpc(outgoing),
            },
        }
    }
}

impl<Req: prost::Message + Default, Resp: prost::Message + Clone> BidiStream<Req, Resp> {
    /// The next request; `None` once the client has sent its last.
    pub async fn message(&mut self) -> Result<Option<Req>, Status> {
        match &mut self.inner {
            Bidi::Shmesh {
                call, request_type, ..
            } => match call.recv().await? {
                Some(message) => decode(&message, request_type).map(Some),
                None => Ok(None),
            },
            #[cfg(feature = "tonic")]
            Bidi::Grpc { incoming, .. } => {
                incoming.message().await.map_err(crate::grpc::from_tonic)
            }
        }
    }

    /// Sends one response, waiting while the client has not granted the
    /// credit for it.
    pub async fn send(&mut self, message: &Resp) -> Result<(), Status> {
        match &mut self.inner {
            Bidi::Shmesh { call, buf, .. } => {
                buf.clear();
                message
                    .encode(buf)
                    .map_err(|e| Status::internal(format!("cannot encode a response: {e}")))?;
                call.send(buf).await
            }
            #[cfg(feature = "tonic")]
            Bidi::Grpc { outgoing, .. } => outgoing.send(message).await,
        }
    }

    /// The credentials of the calling process (`None` over gRPC).
    pub fn peer(&self) -> Option<PeerCredentials> {
        match &self.inner {
            Bidi::Shmesh { call, .. } => Some(call.peer()),
            #[cfg(feature = "tonic")]
            Bidi::Grpc { .. } => None,
        }
    }

    /// Time left before the caller's deadline, if it set one (`None` over
    /// gRPC).
    pub fn remaining(&self) -> Option<Duration> {
        match &self.inner {
            Bidi::Shmesh { call, .. } => call.remaining(),
            #[cfg(feature = "tonic")]
            Bidi::Grpc { .. } => None,
        }
    }
}
