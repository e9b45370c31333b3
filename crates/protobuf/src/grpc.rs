//! gRPC with tonic (feature `tonic`), beside shmesh.
//!
//! - Serving: the same service traits over gRPC: what a generated
//!   `FooGrpcServer` calls for each method. Handlers see what gRPC tells
//!   of the call: [`Request::remote_addr`] (on TCP; [`Request::peer`] is
//!   `None`, there are no Unix credentials) and [`Request::remaining`],
//!   from the `grpc-timeout` header ([`parse_timeout`]). The deadline is
//!   enforced as over shmesh: a handler still running when it passes is
//!   dropped, and one that finishes after it is `DeadlineExceeded`.
//! - Calling: a [`Transport`] picked from the address's scheme (`shm://`
//!   for shmesh, `http://` or `https://` for gRPC), which a generated async
//!   client built with `grpc(true)` calls through (the blocking client:
//!   [`crate::grpc_blocking`]). A call that runs out of time is
//!   `DeadlineExceeded` over either (tonic reports its own timer running out
//!   as `Cancelled`).

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmesh::asynchronous::AsyncChannel;
use shmesh::client::{ChannelError, ChannelOptions};
use shmesh::metadata::Metadata;
use shmesh::status::{Code, Status};
pub use tonic;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, StdError, http};
use tonic_prost::ProstCodec;

use crate::client;
use crate::server::{BidiStream, RequestStream, ResponseSink};
use crate::{CallInfo, Request};

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

/// A `grpc-timeout` header that does not follow the gRPC spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    /// Not a number followed by a unit.
    #[error("{0:?} is not a number of at most 8 digits followed by a unit")]
    Malformed(String),
    /// The unit is none of `H`, `M`, `S`, `m`, `u`, `n`.
    #[error("{0:?} has no unit (H, M, S, m, u or n)")]
    Unit(String),
}

/// Parses a `grpc-timeout` header value as the gRPC spec writes it
/// (PROTOCOL-HTTP2.md): a positive integer of at most 8 ASCII digits, then
/// its unit: `H` hours, `M` minutes, `S` seconds, `m` milliseconds, `u`
/// microseconds, `n` nanoseconds. Zero is taken as a deadline already
/// passed; anything else (a sign, spaces, a ninth digit, no unit) is
/// refused.
///
/// ```
/// # use std::time::Duration;
/// use shmesh_protobuf::grpc::parse_timeout;
///
/// assert_eq!(parse_timeout("250m"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_timeout("3S"), Ok(Duration::from_secs(3)));
/// assert!(parse_timeout("-1S").is_err());
/// assert!(parse_timeout("123456789n").is_err());
/// ```
pub fn parse_timeout(value: &str) -> Result<Duration, TimeoutError> {
    let malformed = || TimeoutError::Malformed(value.to_owned());
    let Some(unit) = value.chars().last() else {
        return Err(malformed());
    };
    let per_unit: fn(u64) -> Duration = match unit {
        'H' => |n| Duration::from_secs(n * 3600),
        'M' => |n| Duration::from_secs(n * 60),
        'S' => Duration::from_secs,
        'm' => Duration::from_millis,
        'u' => Duration::from_micros,
        'n' => Duration::from_nanos,
        _ => return Err(TimeoutError::Unit(value.to_owned())),
    };
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    // At most 8 digits: no overflow in any unit.
    digits.parse().map(per_unit).map_err(|_| malformed())
}

/// A gRPC request's message and what it says of its call: the client's
/// address and the deadline of its `grpc-timeout` header. A malformed
/// header fails the call with `Internal`, as grpc-go does.
fn parts<T>(request: tonic::Request<T>) -> Result<(T, CallInfo), Status> {
    let timeout = match request.metadata().get("grpc-timeout") {
        None => None,
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| Status::internal("malformed grpc-timeout: not ASCII"))?;
            let timeout = parse_timeout(value)
                .map_err(|e| Status::internal(format!("malformed grpc-timeout: {e}")))?;
            Some(timeout)
        }
    };
    let info = CallInfo::grpc(
        request.remote_addr(),
        timeout,
        metadata_of(request.metadata()),
    );
    Ok((request.into_inner(), info))
}

/// Headers gRPC and HTTP/2 use themselves, never call metadata.
const TRANSPORT_HEADERS: [&str; 5] = [
    "content-type",
    "te",
    "user-agent",
    "accept-encoding",
    "content-encoding",
];

/// A gRPC request's headers as shmesh call metadata: the ASCII ones that
/// are not gRPC's (`grpc-*`) or HTTP's own and that shmesh metadata can
/// hold (keys `[a-z0-9._-]`, printable values, within its limits); the
/// rest are left out, never an error (binary `-bin` headers included).
pub fn metadata_of(headers: &tonic::metadata::MetadataMap) -> Metadata {
    let mut metadata = Metadata::new();
    for entry in headers.iter() {
        let tonic::metadata::KeyAndValueRef::Ascii(key, value) = entry else {
            continue;
        };
        let key = key.as_str();
        if key.starts_with("grpc-") || TRANSPORT_HEADERS.contains(&key) {
            continue;
        }
        let Ok(value) = value.to_str() else {
            continue;
        };
        // One metadata cannot hold (a key or value it refuses, one too
        // many) is left out, as documented.
        let _ = metadata.insert(key, value);
    }
    metadata
}

/// Runs a handler's future `done` within the call's `deadline`, as shmesh
/// does: dropped when the deadline passes, and `DeadlineExceeded` if it
/// finishes after it.
async fn within<T>(
    deadline: Option<Instant>,
    done: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let Some(deadline) = deadline else {
        return done.await;
    };
    match tokio::time::timeout_at(deadline.into(), done).await {
        Ok(Ok(_)) if Instant::now() >= deadline => Err(Status::deadline_exceeded(
            "the handler finished after the caller's deadline",
        )),
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(
            "the handler ran past the caller's deadline",
        )),
    }
}

/// The future of a call answered with one response: the handler's, as
/// `start` gave it (with the call's deadline), run within the deadline.
fn one<Resp, Fut>(
    start: Result<(Option<Instant>, Fut), Status>,
) -> BoxFuture<tonic::Response<Resp>, tonic::Status>
where
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    Box::pin(async move {
        let (deadline, reply) = start.map_err(to_tonic)?;
        within(deadline, reply)
            .await
            .map(tonic::Response::new)
            .map_err(to_tonic)
    })
}

/// The responses tonic streams out.
type Responses<Resp> = ReceiverStream<Result<Resp, tonic::Status>>;

/// The future of a call answered with a stream: `start` gives the handler's
/// future, sending into the sink it is given; it runs as a task within the
/// call's deadline, and a failure (the deadline's included) ends the
/// stream with its status.
fn streamed<Resp, Fut>(
    start: impl FnOnce(ResponseSink<Resp>) -> Result<(Option<Instant>, Fut), Status>,
) -> BoxFuture<tonic::Response<Responses<Resp>>, tonic::Status>
where
    Resp: Send + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    let start = start(ResponseSink::grpc(tx.clone()));
    Box::pin(async move {
        let (deadline, done) = start.map_err(to_tonic)?;
        tokio::spawn(async move {
            if let Err(status) = within(deadline, done).await {
                // The client may be gone already; then nobody is told.
                let _ = tx.send(Err(to_tonic(status))).await;
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    })
}

/// A handler of the generated trait as a tonic service of any kind: the
/// kind comes from the handler's signature.
struct Bridge<S, F, Resp> {
    service: Arc<S>,
    handler: F,
    _response: PhantomData<fn() -> Resp>,
}

impl<S, F, Resp> Bridge<S, F, Resp> {
    fn new(service: Arc<S>, handler: F) -> Self {
        Bridge {
            service,
            handler,
            _response: PhantomData,
        }
    }
}

impl<S, Req, Resp, F, Fut> tonic::server::UnaryService<Req> for Bridge<S, F, Resp>
where
    F: Fn(Arc<S>, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<tonic::Response<Resp>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        one(parts(request).map(|(message, info)| {
            let deadline = info.deadline();
            let request = Request::with_info(message, info);
            (deadline, (self.handler)(self.service.clone(), request))
        }))
    }
}

impl<S, Req, Resp, F, Fut> tonic::server::ServerStreamingService<Req> for Bridge<S, F, Resp>
where
    Resp: Send + 'static,
    F: Fn(Arc<S>, Request<Req>, ResponseSink<Resp>) -> Fut,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    type Response = Resp;
    type ResponseStream = Responses<Resp>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        streamed(|responses| {
            let (message, info) = parts(request)?;
            let deadline = info.deadline();
            let request = Request::with_info(message, info);
            let done = (self.handler)(self.service.clone(), request, responses);
            Ok((deadline, done))
        })
    }
}

impl<S, Req, Resp, F, Fut> tonic::server::ClientStreamingService<Req> for Bridge<S, F, Resp>
where
    Req: prost::Message + Default,
    F: Fn(Arc<S>, RequestStream<Req>) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<tonic::Response<Resp>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Req>>) -> Self::Future {
        one(parts(request).map(|(requests, info)| {
            let deadline = info.deadline();
            let requests = RequestStream::grpc(requests, info);
            (deadline, (self.handler)(self.service.clone(), requests))
        }))
    }
}

impl<S, Req, Resp, F, Fut> tonic::server::StreamingService<Req> for Bridge<S, F, Resp>
where
    Resp: Send + 'static,
    F: Fn(Arc<S>, BidiStream<Req, Resp>) -> Fut,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    type Response = Resp;
    type ResponseStream = Responses<Resp>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Req>>) -> Self::Future {
        streamed(|responses| {
            let (requests, info) = parts(request)?;
            let deadline = info.deadline();
            let call = BidiStream::grpc(requests, responses, info);
            Ok((deadline, (self.handler)(self.service.clone(), call)))
        })
    }
}

/// tonic's server side of a call with `Req` requests and `Resp` responses.
fn grpc_server<Req, Resp>() -> tonic::server::Grpc<ProstCodec<Resp, Req>>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    tonic::server::Grpc::new(ProstCodec::default())
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
    let bridge = Bridge::new(service, handler);
    Box::pin(async move { Ok(grpc_server().unary(bridge, request).await) })
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
    let bridge = Bridge::new(service, handler);
    Box::pin(async move { Ok(grpc_server().server_streaming(bridge, request).await) })
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
    let bridge = Bridge::new(service, handler);
    Box::pin(async move { Ok(grpc_server().client_streaming(bridge, request).await) })
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
    let bridge = Bridge::new(service, handler);
    Box::pin(async move { Ok(grpc_server().streaming(bridge, request).await) })
}

/// Where a generated client's calls go: a shmesh channel or a gRPC one.
#[derive(Debug, Clone)]
pub enum Transport {
    /// shmesh, for `shm://` addresses.
    Shmesh(AsyncChannel),
    /// gRPC over HTTP/2, for `http://` and `https://` addresses.
    Grpc(GrpcChannel),
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
    /// A blocking client's runtime for gRPC could not be started.
    #[error("cannot start the runtime for gRPC calls: {0}")]
    Runtime(std::io::Error),
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

/// A gRPC client channel.
pub type GrpcChannel = tonic::client::Grpc<tonic::transport::Channel>;

/// A gRPC channel ready for a call.
async fn ready(grpc: &GrpcChannel) -> Result<GrpcChannel, Status> {
    let mut grpc = grpc.clone();
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the gRPC channel is not ready: {e}")))?;
    Ok(grpc)
}

/// A gRPC request carrying `message`, the call's `timeout` and its
/// `metadata` as headers (shmesh metadata is always valid ASCII headers;
/// one that is not is left out rather than failing the call).
fn grpc_request<T>(
    message: T,
    timeout: Option<Duration>,
    metadata: &Metadata,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let headers = request.metadata_mut();
    for (key, value) in metadata.iter() {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(value),
        ) {
            headers.insert(key, value);
        }
    }
    request
}

/// Turns the failure of a call that had to end by `deadline` into
/// shmesh's status: tonic's own timer running out is `Cancelled` there,
/// `DeadlineExceeded` here, as over shmesh.
fn failed(deadline: Option<Instant>) -> impl Fn(tonic::Status) -> Status {
    move |status| {
        let status = from_tonic(status);
        if status.code() == Code::Cancelled && deadline.is_some_and(|d| Instant::now() >= d) {
            return Status::deadline_exceeded(format!(
                "no response before the deadline ({})",
                status.message()
            ));
        }
        status
    }
}

/// A unary call over `transport`: shmesh's method id `method`, gRPC's
/// `path`.
pub async fn call_unary<Req, Resp>(
    transport: &Transport,
    method: u32,
    path: &'static str,
    request: &Req,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<Resp, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::unary(channel, method, request, metadata, timeout, response_type).await
        }
        Transport::Grpc(grpc) => {
            let deadline = timeout.map(|t| Instant::now() + t);
            ready(grpc)
                .await?
                .unary(
                    grpc_request(request.clone(), timeout, metadata),
                    PathAndQuery::from_static(path),
                    ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map(tonic::Response::into_inner)
                .map_err(failed(deadline))
        }
    }
}

/// A server-streaming call over `transport`.
pub async fn call_server_streaming<Req, Resp>(
    transport: &Transport,
    method: u32,
    path: &'static str,
    request: &Req,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<client::Streaming<Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::server_streaming(
                channel,
                method,
                request,
                metadata,
                timeout,
                response_type,
            )
            .await
        }
        Transport::Grpc(grpc) => {
            let deadline = timeout.map(|t| Instant::now() + t);
            let stream = ready(grpc)
                .await?
                .server_streaming(
                    grpc_request(request.clone(), timeout, metadata),
                    PathAndQuery::from_static(path),
                    ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map_err(failed(deadline))?;
            Ok(client::Streaming::grpc(stream.into_inner()))
        }
    }
}

/// A gRPC call whose requests stream up: what feeds them, and the task
/// that makes the call.
type Upstream<Req, Resp> = (
    tokio::sync::mpsc::Sender<Req>,
    tokio::task::JoinHandle<Result<Reply<Resp>, Status>>,
);

/// Starts a gRPC call whose requests stream up: `call` makes it, on a
/// ready channel, with a request fed by the returned sender, as a task on
/// the current tokio runtime.
fn stream_up<Req, Resp, Fut>(
    grpc: &GrpcChannel,
    timeout: Option<Duration>,
    metadata: &Metadata,
    call: impl FnOnce(GrpcChannel, tonic::Request<ReceiverStream<Req>>) -> Fut + Send + 'static,
) -> Result<Upstream<Req, Resp>, Status>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    Fut: Future<Output = Result<Reply<Resp>, tonic::Status>> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| Status::failed_precondition("a gRPC stream needs a tokio runtime"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    let (grpc, deadline) = (grpc.clone(), timeout.map(|t| Instant::now() + t));
    let metadata = metadata.clone();
    let task = runtime.spawn(async move {
        let request = grpc_request(ReceiverStream::new(rx), timeout, &metadata);
        call(ready(&grpc).await?, request)
            .await
            .map_err(failed(deadline))
    });
    Ok((tx, task))
}

/// A client-streaming call over `transport` (over gRPC, run as a task on
/// the current tokio runtime).
pub fn call_client_streaming<Req, Resp>(
    transport: &Transport,
    method: u32,
    path: &'static str,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<client::ClientStreaming<Req, Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::client_streaming(channel, method, metadata, timeout, response_type)
        }
        Transport::Grpc(grpc) => {
            let (tx, call) = stream_up(
                grpc,
                timeout,
                metadata,
                move |mut grpc, request| async move {
                    let codec = ProstCodec::<Req, Resp>::default();
                    let path = PathAndQuery::from_static(path);
                    let reply = grpc.client_streaming(request, path, codec).await?;
                    Ok(Reply::One(reply.into_inner()))
                },
            )?;
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
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<client::BidiStreaming<Req, Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        Transport::Shmesh(channel) => {
            crate::client::bidi_streaming(channel, method, metadata, timeout, response_type)
        }
        Transport::Grpc(grpc) => {
            let (tx, call) = stream_up(
                grpc,
                timeout,
                metadata,
                move |mut grpc, request| async move {
                    let codec = ProstCodec::<Req, Resp>::default();
                    let path = PathAndQuery::from_static(path);
                    let responses = grpc.streaming(request, path, codec).await?;
                    Ok(Reply::Stream(Box::new(responses.into_inner())))
                },
            )?;
            Ok(client::BidiStreaming::grpc(tx, call))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_in_every_unit() {
        let cases = [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("45S", Duration::from_secs(45)),
            ("250m", Duration::from_millis(250)),
            ("1500u", Duration::from_micros(1500)),
            ("99999999n", Duration::from_nanos(99_999_999)),
            ("99999999H", Duration::from_secs(99_999_999 * 3600)),
            ("00000007S", Duration::from_secs(7)),
            ("0m", Duration::ZERO),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_timeout(value), Ok(expected), "{value}");
        }
    }

    #[test]
    fn malformed_timeouts_are_refused() {
        for value in [
            "",
            "S",
            "m",
            "123456789S",
            "-1S",
            "+1S",
            " 1S",
            "1 S",
            "1.5S",
            "1e3m",
            "１S",
        ] {
            assert!(
                matches!(parse_timeout(value), Err(TimeoutError::Malformed(_))),
                "{value:?}: {:?}",
                parse_timeout(value)
            );
        }
        for value in ["1", "10s", "10h", "5ms", "7x"] {
            assert!(
                matches!(parse_timeout(value), Err(TimeoutError::Unit(_))),
                "{value:?}: {:?}",
                parse_timeout(value)
            );
        }
    }

    #[tokio::test]
    async fn a_handler_is_held_to_the_deadline() {
        let soon = Some(Instant::now() + Duration::from_millis(20));
        let never = within(soon, std::future::pending::<Result<(), Status>>()).await;
        assert_eq!(never.unwrap_err().code(), Code::DeadlineExceeded);
        // Finishing late (without yielding) is no better.
        let late = within(soon, async {
            std::thread::sleep(Duration::from_millis(30));
            Ok(())
        })
        .await;
        assert_eq!(late.unwrap_err().code(), Code::DeadlineExceeded);
        let later = Some(Instant::now() + Duration::from_secs(60));
        assert_eq!(within(later, async { Ok(7) }).await.unwrap(), 7);
        assert_eq!(within(None, async { Ok(8) }).await.unwrap(), 8);
    }
}
