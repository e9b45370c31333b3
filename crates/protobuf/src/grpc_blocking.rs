//! The blocking client's transports (feature `tonic`): what a generated
//! `FooBlockingClient` built with `grpc(true)` calls through, picked from
//! the address's scheme like the async client's
//! [`Transport`](crate::grpc::Transport): `shm://` for shmesh, `http://` or
//! `https://` for gRPC.
//!
//! Over gRPC the calls run on a small tokio runtime the transport owns (one
//! worker thread, shared by the transport's clones), and the calling thread
//! waits for them, so a blocking client needs no runtime of its caller's.
//! Like every blocking call, these must not be made from inside an async
//! task.

use std::sync::Arc;
use std::time::Duration;

use shmesh::client::{Channel, ChannelOptions};
use shmesh::metadata::Metadata;
use shmesh::status::Status;

use crate::blocking;
use crate::grpc::{self, ConnectError, GrpcChannel, Transport};

/// Where a generated blocking client's calls go.
#[derive(Debug, Clone)]
pub enum BlockingTransport {
    /// shmesh, for `shm://` addresses.
    Shmesh(Channel),
    /// gRPC over HTTP/2, for `http://` and `https://` addresses, with the
    /// runtime that drives it.
    Grpc {
        /// The gRPC channel.
        channel: GrpcChannel,
        /// Runs the channel's connection and the calls.
        runtime: Arc<tokio::runtime::Runtime>,
    },
}

impl BlockingTransport {
    /// Connects to `address`: over shmesh with `options` for `shm://`
    /// addresses, over gRPC for `http://` and `https://` ones.
    pub fn connect(address: &str, options: &ChannelOptions) -> Result<Self, ConnectError> {
        if address.starts_with("shm://") {
            return Ok(BlockingTransport::Shmesh(Channel::connect(
                address, options,
            )?));
        }
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(ConnectError::Scheme(address.to_owned()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shmesh-grpc")
            .enable_all()
            .build()
            .map_err(ConnectError::Runtime)?;
        let channel = match runtime.block_on(Transport::connect(address, options))? {
            Transport::Grpc(channel) => channel,
            // The scheme was checked above.
            Transport::Shmesh(_) => return Err(ConnectError::Scheme(address.to_owned())),
        };
        Ok(BlockingTransport::Grpc {
            channel,
            runtime: Arc::new(runtime),
        })
    }
}

/// A unary call over `transport`: shmesh's method id `method`, gRPC's
/// `path`.
pub fn call_unary<Req, Resp>(
    transport: &BlockingTransport,
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
        BlockingTransport::Shmesh(channel) => {
            blocking::unary(channel, method, request, metadata, timeout, response_type)
        }
        BlockingTransport::Grpc { channel, runtime } => {
            let grpc = Transport::Grpc(channel.clone());
            runtime.block_on(grpc::call_unary(
                &grpc,
                method,
                path,
                request,
                metadata,
                timeout,
                response_type,
            ))
        }
    }
}

/// A server-streaming call over `transport`.
pub fn call_server_streaming<Req, Resp>(
    transport: &BlockingTransport,
    method: u32,
    path: &'static str,
    request: &Req,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<blocking::Streaming<Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        BlockingTransport::Shmesh(channel) => {
            blocking::server_streaming(channel, method, request, metadata, timeout, response_type)
        }
        BlockingTransport::Grpc { channel, runtime } => {
            let grpc = Transport::Grpc(channel.clone());
            let responses = runtime.block_on(grpc::call_server_streaming(
                &grpc,
                method,
                path,
                request,
                metadata,
                timeout,
                response_type,
            ))?;
            Ok(blocking::Streaming::grpc(runtime.clone(), responses))
        }
    }
}

/// A client-streaming call over `transport`.
pub fn call_client_streaming<Req, Resp>(
    transport: &BlockingTransport,
    method: u32,
    path: &'static str,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<blocking::ClientStreaming<Req, Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        BlockingTransport::Shmesh(channel) => {
            blocking::client_streaming(channel, method, metadata, timeout, response_type)
        }
        BlockingTransport::Grpc { channel, runtime } => {
            // The call runs as a task on our runtime.
            let _in = runtime.enter();
            let call = grpc::call_client_streaming(
                &Transport::Grpc(channel.clone()),
                method,
                path,
                metadata,
                timeout,
                response_type,
            )?;
            Ok(blocking::ClientStreaming::grpc(runtime.clone(), call))
        }
    }
}

/// A bidirectional-streaming call over `transport`.
pub fn call_bidi_streaming<Req, Resp>(
    transport: &BlockingTransport,
    method: u32,
    path: &'static str,
    metadata: &Metadata,
    timeout: Option<Duration>,
    response_type: &'static str,
) -> Result<blocking::BidiStreaming<Req, Resp>, Status>
where
    Req: prost::Message + Clone + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    match transport {
        BlockingTransport::Shmesh(channel) => {
            blocking::bidi_streaming(channel, method, metadata, timeout, response_type)
        }
        BlockingTransport::Grpc { channel, runtime } => {
            let _in = runtime.enter();
            let call = grpc::call_bidi_streaming(
                &Transport::Grpc(channel.clone()),
                method,
                path,
                metadata,
                timeout,
                response_type,
            )?;
            Ok(blocking::BidiStreaming::grpc(runtime.clone(), call))
        }
    }
}
