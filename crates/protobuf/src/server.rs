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
            handler(service, request, ResponseSink::new(call)).await
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
                call: call.clone(),
                peer,
                remaining,
                request_type,
                _message: PhantomData,
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
        handler(service.clone(), BidiStream::new(call, request_type))
    })
}

/// Where a server-streaming handler sends its responses.
#[derive(Debug)]
pub struct ResponseSink<T> {
    call: AsyncServerStream,
    buf: Vec<u8>,
    _message: PhantomData<fn(&T)>,
}

impl<T: prost::Message> ResponseSink<T> {
    fn new(call: AsyncServerStream) -> Self {
        ResponseSink {
            call,
            buf: Vec::new(),
            _message: PhantomData,
        }
    }

    /// Sends one response, waiting while the client has not granted the
    /// credit for it.
    pub async fn send(&mut self, message: &T) -> Result<(), Status> {
        send(&mut self.call, &mut self.buf, message).await
    }

    /// Whether the client cancelled the call.
    pub fn is_cancelled(&self) -> bool {
        self.call.is_cancelled()
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        self.call.remaining()
    }
}

/// Encodes `message` into `buf` (reused between messages) and sends it.
async fn send<T: prost::Message>(
    call: &mut AsyncServerStream,
    buf: &mut Vec<u8>,
    message: &T,
) -> Result<(), Status> {
    buf.clear();
    message
        .encode(buf)
        .map_err(|e| Status::internal(format!("cannot encode a response: {e}")))?;
    call.send(buf).await
}

/// The requests of a client-streaming call, read one at a time.
#[derive(Debug)]
pub struct RequestStream<T> {
    call: Arc<tokio::sync::Mutex<AsyncServerStream>>,
    peer: PeerCredentials,
    remaining: Option<Duration>,
    request_type: &'static str,
    _message: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> RequestStream<T> {
    /// The next request; `None` once the client has sent its last.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        match self.call.lock().await.recv().await? {
            Some(message) => decode(&message, self.request_type).map(Some),
            None => Ok(None),
        }
    }

    /// The credentials of the calling process.
    pub fn peer(&self) -> PeerCredentials {
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
    call: AsyncServerStream,
    buf: Vec<u8>,
    request_type: &'static str,
    _messages: PhantomData<fn(&Resp) -> Req>,
}

impl<Req: prost::Message + Default, Resp: prost::Message> BidiStream<Req, Resp> {
    fn new(call: AsyncServerStream, request_type: &'static str) -> Self {
        BidiStream {
            call,
            buf: Vec::new(),
            request_type,
            _messages: PhantomData,
        }
    }

    /// The next request; `None` once the client has sent its last.
    pub async fn message(&mut self) -> Result<Option<Req>, Status> {
        match self.call.recv().await? {
            Some(message) => decode(&message, self.request_type).map(Some),
            None => Ok(None),
        }
    }

    /// Sends one response, waiting while the client has not granted the
    /// credit for it.
    pub async fn send(&mut self, message: &Resp) -> Result<(), Status> {
        send(&mut self.call, &mut self.buf, message).await
    }

    /// The credentials of the calling process.
    pub fn peer(&self) -> PeerCredentials {
        self.call.peer()
    }

    /// Time left before the caller's deadline, if it set one.
    pub fn remaining(&self) -> Option<Duration> {
        self.call.remaining()
    }
}
