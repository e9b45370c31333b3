//! gRPC with tonic (feature `tonic`), beside shmesh.
//!
//! - Serving: the same service traits over gRPC: what a generated
//!   `FooGrpcServer` calls for each method. Over gRPC, [`Request::peer`]
//!   is `None` and deadlines are tonic's business.
//! - Calling: a [`Transport`] picked from the address's scheme (`shm://`
//!   for shmesh, `http://` or `https://` for gRPC), which a generated async
//!   client built with `grpc(true)` calls through.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use shmesh::asynchronous::AsyncChannel;
use shmesh::client::{ChannelError, ChannelOptions};
use shmesh::status::{Code, Status};
pub use tonic;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, StdError, http};
use tonic_prost::ProstCodec;

use crate::Request;
use crate::client;
use crate::server::{BidiStream, RequestStream, ResponseSink};

/// What a generated gRPC service's `call` returns.
pub type GrpcFuture = BoxFuture<http::Response<tonic::body::Body>, Infallible>;

/// How many responses a streaming handler may send ahead of tonic.
const STREAM_BUFFER: usize = 16;

/// A shmesh status as tonic's (the codes are gRPC's on both sides).
pub fn to_tonic(status: Status) -> tonic::Status {
    tonic::Status::new(
        tonic::Code::from(i32::try_from(status.code().as_u32()).unwrap_or(2)),
        status.message(),
    )
}

/// A tonic status as shmesh's (an unknown code is `Unknown`).
pub fn from_tonic(status: tonic::Status) -> Status {
    let code = u32::try_from(status.code() as i32)
        .ok()
        .and_then(Code::from_u32)
        .unwrap_or(Code::Unknown);
    Status::new(code, status.message())
}

/// The answer to a path no method has: `Unimplemented`.
pub fn unimplemented(path: &str) -> GrpcFuture {
    let status = tonic::Status::unimplemented(format!("no method at {path}"));
    Box::pin(async move { Ok(status.into_http()) })
}

struct Unary<S, F> {
    service: Arc<S>,
    handler: F,
}

impl<S, Req, Resp, F, Fut> tonic::server::UnaryService<Req> for Unary<S, F>
where
    F: Fn(Arc<S>, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<tonic::Response<Resp>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let reply = (self.handler)(self.service.clone(), Request::new(request.into_inner()));
        Box::pin(async move { reply.await.map(tonic::Response::new).map_err(to_tonic) })
    }
}

/// Serves a unary gRPC `request` with `handler`.
pub fn unary<S, Req, Resp, F, Fut, B>(
    service: Arc<S>,
    handler: F,
    request: http::Request<B>,
) -> GrpcFuture
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: Fn(Arc<S>, Request<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
        Ok(grpc.unary(Unary { service, handler }, request).await)
    })
}

struct ServerStreaming<S, Resp, F> {
    service: Arc<S>,
    handler: F,
    _response: PhantomData<fn() -> Resp>,
}

impl<S, Req, Resp, F, Fut> tonic::server::ServerStreamingService<Req>
    for ServerStreaming<S, Resp, F>
where
    Resp: Send + 'static,
    F: Fn(Arc<S>, Request<Req>, ResponseSink<Resp>) -> Fut,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    type Response = Resp;
    type ResponseStream = ReceiverStream<Result<Resp, tonic::Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let done = (self.handler)(
            self.service.clone(),
            Request::new(request.into_inner()),
            ResponseSink::grpc(tx.clone()),
        );
        tokio::spawn(ended(done, tx));
        Box::pin(async move { Ok(tonic::Response::new(ReceiverStream::new(rx))) })
    }
}

/// Runs a streaming handler to its end, which ends the stream with its
/// status if it failed.
async fn ended<T>(
    done: impl Future<Output = Result<(), Status>>,
    tx: tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
) {
    if let Err(status) = done.await {
        // The client may be gone already; then nobody is told.
        let _ = tx.send(Err(to_tonic(status))).await;
    }
}

/// Serves a server-streaming gRPC `request` with `handler`.
pub fn server_streaming<S, Req, Resp, F, Fut, B>(
    service: Arc<S>,
    handler: F,
    request: http::Request<B>,
) -> GrpcFuture
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: Fn(Arc<S>, Request<Req>, ResponseSink<Resp>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
        Ok(grpc
            .server_streaming(
                ServerStreaming {
                    service,
                    handler,
                    _response: PhantomData,
                },
                request,
            )
            .await)
    })
}

struct ClientStreaming<S, F> {
    service: Arc<S>,
    handler: F,
}

impl<S, Req, Resp, F, Fut> tonic::server::ClientStreamingService<Req> for ClientStreaming<S, F>
where
    Req: prost::Message + Default,
    F: Fn(Arc<S>, RequestStream<Req>) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<tonic::Response<Resp>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Req>>) -> Self::Future {
        let reply = (self.handler)(
            self.service.clone(),
            RequestStream::grpc(request.into_inner()),
        );
        Box::pin(async move { reply.await.map(tonic::Response::new).map_err(to_tonic) })
    }
}

/// Serves a client-streaming gRPC `request` with `handler`.
pub fn client_streaming<S, Req, Resp, F, Fut, B>(
    service: Arc<S>,
    handler: F,
    request: http::Request<B>,
) -> GrpcFuture
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: Fn(Arc<S>, RequestStream<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
        Ok(grpc
            .client_streaming(ClientStreaming { service, handler }, request)
            .await)
    })
}

struct Bidi<S, Resp, F> {
    service: Arc<S>,
    handler: F,
    _response: PhantomData<fn() -> Resp>,
}

impl<S, Req, Resp, F, Fut> tonic::server::StreamingService<Req> for Bidi<S, Resp, F>
where
    Resp: Send + 'static,
    F: Fn(Arc<S>, BidiStream<Req, Resp>) -> Fut,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    type Response = Resp;
    type ResponseStream = ReceiverStream<Result<Resp, tonic::Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Req>>) -> Self::Future {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let done = (self.handler)(
            self.service.clone(),
            BidiStream::grpc(request.into_inner(), tx.clone()),
        );
        tokio::spawn(ended(done, tx));
        Box::pin(async move { Ok(tonic::Response::new(ReceiverStream::new(rx))) })
    }
}

/// Serves a bidirectional-streaming gRPC `request` with `handler`.
pub fn bidi_streaming<S, Req, Resp, F, Fut, B>(
    service: Arc<S>,
    handler: F,
    request: http::Request<B>,
) -> GrpcFuture
where
    S: Send + Sync + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: Fn(Arc<S>, BidiStream<Req, Resp>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
        Ok(grpc
            .streaming(
                Bidi {
                    service,
                    handler,
                    _response: PhantomData,
                },
                request,
            )
            .await)
    })
}

/// Where a generated client's calls go: a shmesh channel or a gRPC one.
#[derive(Debug, Clone)]
pub enum Transport {
    /// shmesh, for `shm://` addresses.
    Shmesh(AsyncChannel),
    /// gRPC over HTTP/2, for `http://` and `https://` addresses.
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
}

/// Connecting a [`Transport`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is neither `shm://` nor `http(s)://`.
    #[error("cannot tell the transport of {0:?}: expected shm://, http:// or https://")]
    Scheme(String),
    /// Connecting over shmesh failed (a schema mismatch included).
    #[error(transparent)]
    Shmesh(#[from] ChannelError),
    /// Connecting over gRPC failed.
    #[error("cannot connect over gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

impl Transport {
    /// Connects to `address`: over shmesh with `options` for `shm://`
    /// addresses, over gRPC for `http://` and `https://` ones.
    pub async fn connect(address: &str, options: &ChannelOptions) -> Result<Self, ConnectError> {
        if address.starts_with("shm://") {
            Ok(Transport::Shmesh(
                AsyncChannel::connect(address, options).await?,
            ))
        } else if address.starts_with("http://") || address.starts_with("https://") {
            let channel = tonic::transport::Endpoint::from_shared(address.to_owned())?
                .connect()
                .await?;
            Ok(Transport::Grpc(tonic::client::Grpc::new(channel)))
        } else {
            Err(ConnectError::Scheme(address.to_owned()))
        }
    }
}

/// What a streaming gRPC call's task ends with.
#[derive(Debug)]
pub(crate) enum Reply<Resp> {
    /// A client-streaming call's one response.
    One(Resp),
    /// A bidirectional call's responses.
    Stream(Box<tonic::Streaming<Resp>>),
}

/// The result of a streaming gRPC call's task.
pub(crate) async fn joined<T>(
    call: Option<tokio::task::JoinHandle<Result<T, Status>>>,
) -> Result<T, Status> {
    match call {
        Some(call) => call
            .await
            .map_err(|e| Status::internal(format!("the gRPC call's task failed: {e}")))?,
        None => Err(Status::failed_precondition("the call has ended")),
    }
}

/// A gRPC channel ready for a call.
async fn ready(
    grpc: &tonic::client::Grpc<tonic::transport::Channel>,
) -> Result<tonic::client::Grpc<tonic::transport::Channel>, Status> {
    let mut grpc = grpc.clone();
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the gRPC channel is not ready: {e}")))?;
    Ok(grpc)
}

/// A gRPC request carrying `message` and the call's `timeout`.
fn grpc_request<T>(message: T, timeout: Option<Duration>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// The task that runs a streaming gRPC call, with the runtime it runs on.
fn spawn_call<Resp: Send + 'static>(
    call: impl Future<Output = Result<Reply<Resp>, Status>> + Send + 'static,
) -> Result<tokio::task::JoinHandle<Result<Reply<Resp>, Status>>, Status> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| Status::failed_precondition("a gRPC stream needs a tokio runtime"))?;
    Ok(runtime.spawn(call))
}

/// A unary call over `transport`: shmesh's method id `method`, gRPC's
/// `path`.
pub async fn call_unary<Req, Resp>(
    transport: &Transport,
    method: u32,
    path: &'static str,
    request: &Req,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<Resp, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::unary(channel, method, request, timeout, response_type).await
        }
        Transport::Grpc(grpc) => ready(grpc)
            .await?
            .unary(
                grpc_request(request.clone(), timeout),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(from_tonic),
    }
}

/// A server-streaming call over `transport`.
pub async fn call_server_streaming<Req, Resp>(
    transport: &Transport,
    method: u32,
    path: &'static str,
    request: &Req,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<client::Streaming<Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::server_streaming(channel, method, request, timeout, response_type).await
        }
        Transport::Grpc(grpc) => {
            let stream = ready(grpc)
                .await?
                .server_streaming(
                    grpc_request(request.clone(), timeout),
                    PathAndQuery::from_static(path),
                    ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map_err(from_tonic)?;
            Ok(client::Streaming::grpc(stream.into_inner()))
        }
    }
}

/// A client-streaming call over `transport` (over gRPC, run as a task on
/// the current tokio runtime).
pub fn call_client_streaming<Req, Resp>(
    transport: &Transport,
    method: u32,
    path: &'static str,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<client::ClientStreaming<Req, Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::client_streaming(channel, method, timeout, response_type)
        }
        Transport::Grpc(grpc) => {
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
            let grpc = grpc.clone();
            let call = spawn_call(async move {
                let reply = ready(&grpc)
                    .await?
                    .client_streaming(
                        grpc_request(ReceiverStream::new(rx), timeout),
                        PathAndQuery::from_static(path),
                        ProstCodec::<Req, Resp>::default(),
                    )
                    .await
                    .map_err(from_tonic)?;
                Ok(Reply::One(reply.into_inner()))
            })?;
            Ok(client::ClientStreaming::grpc(tx, call))
        }
    }
}

/// A bidirectional-streaming call over `transport` (over gRPC, run as a
/// task on the current tokio runtime).
pub fn call_bidi_streaming<Req, Resp>(
    transport: &Transport,
    method: u32,
    path: &'static str,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<client::BidiStreaming<Req, Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::bidi_streaming(channel, method, timeout, response_type)
        }
        Transport::Grpc(grpc) => {
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
            let grpc = grpc.clone();
            let call = spawn_call(async move {
                let responses = ready(&grpc)
                    .await?
                    .streaming(
                        grpc_request(ReceiverStream::new(rx), timeout),
                        PathAndQuery::from_static(path),
                        ProstCodec::<Req, Resp>::default(),
                    )
                    .await
                    .map_err(from_tonic)?;
                Ok(Reply::Stream(Box::new(responses.into_inner())))
            })?;
            Ok(client::BidiStreaming::grpc(tx, call))
        }
    }
}
