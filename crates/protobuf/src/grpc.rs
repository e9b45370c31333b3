//! The same service traits served over gRPC with tonic (feature `tonic`):
//! what a generated `FooGrpcServer` calls for each method. Over gRPC,
//! [`Request::peer`] is `None` and deadlines are tonic's business.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use shmesh::status::{Code, Status};
pub use tonic;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, StdError, http};
use tonic_prost::ProstCodec;

use crate::Request;
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
