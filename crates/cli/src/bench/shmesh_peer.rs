//! The shmesh peers: unary echo calls through `shmesh::client::Channel`
//! (blocking, one thread per call in flight) or `AsyncChannel` (tokio, one
//! task per call in flight), to a `shmesh::server::Server` in another
//! process.
//!
//! The request is written in place into a loaned slab, the server's handler
//! copies it in place into its reply slab, and the client checks the reply
//! against the message where it lies.
//!
//! The same server also serves the structured peers ([`structured`]): an
//! order book as an rkyv archive or a prost message, on the blocking
//! client in `Poll` mode, for comparison with the bytes of `shmesh-poll`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shmesh::client::{Channel, ChannelError, ChannelOptions};
use shmesh::server::{Router, Server, ServerError};
use shmesh::status::Code;
use shmesh::{Limits, PoolClass, PoolClasses, SchemaHash, WaitMode};
use thiserror::Error;

use super::control::{self, ControlError, PeerProcess};
use super::measure::{self, CallResult, MeasureError, Measured, Window};
use super::structured;

/// The benchmark's echo service.
pub const SERVICE: &str = "shmesh-bench-echo";
/// Its schema hash (any fixed value both sides share).
pub const SCHEMA: SchemaHash = SchemaHash(*b"shmesh bench echo service, v1 ..");
/// The echo method.
pub const ECHO: u32 = 1;
/// Largest message the benchmark asks for: 1 MiB must fit.
pub const MAX_MESSAGE: u64 = 1 << 20;
/// How long one call (or one loan) may take before the row fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A shmesh peer failed.
#[derive(Debug, Error)]
pub enum ShmeshPeerError {
    /// The server process could not be started or talked to.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The server could not bind.
    #[error("cannot serve: {0}")]
    Serve(#[from] ServerError),
    /// The pool classes are invalid.
    #[error("pool classes: {0}")]
    Pool(#[from] shmesh::handshake::PoolClassesError),
    /// The client could not connect.
    #[error("cannot connect: {0}")]
    Connect(#[from] ChannelError),
    /// The tokio runtime could not start.
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// The size cannot be served by this channel.
    #[error("{0}")]
    Unservable(String),
    /// A call failed.
    #[error("call failed: {0}")]
    Call(#[from] shmesh::status::Status),
    /// The echo differs from the request.
    #[error("the echo differs from the request")]
    WrongEcho,
    /// Measuring failed.
    #[error(transparent)]
    Measure(#[from] MeasureError),
}

/// The limits the benchmark asks for (and its server allows): room for 32
/// calls of 1 MiB in flight, messages up to [`MAX_MESSAGE`].
pub fn limits(wait_mode: WaitMode) -> Result<Limits, ShmeshPeerError> {
    let class = |slab_size: u64, count: u32| PoolClass { slab_size, count };
    Ok(Limits {
        pool_classes: PoolClasses::new(vec![
            class(256, 1024),
            class(4 << 10, 256),
            class(64 << 10, 64),
            class(MAX_MESSAGE, 34),
        ])?,
        wait_mode,
        max_message: MAX_MESSAGE,
        ..Limits::default()
    })
}

/// Server side (`__bench-peer shmesh`): serves the echo at `address` until
/// the benchmark closes our stdin.
pub fn serve(address: &str) -> Result<(), ShmeshPeerError> {
    let router = structured::routes(Router::new().route_in_place(ECHO, |request, reply| {
        if !request.payload.is_empty() {
            reply
                .loan(request.payload.len())?
                .copy_from_slice(request.payload);
        }
        Ok(())
    }));
    let mut server = Server::bind(address, SERVICE, SCHEMA, router)?;
    // Let the client choose any wait mode, polling included.
    server.set_max_limits(Limits {
        spin_ns: u64::MAX,
        ..limits(WaitMode::Poll)?
    });
    control::announce_and_answer(address)?;
    server.serve();
    Ok(())
}

/// Which client a session uses.
enum Client {
    Blocking(Channel),
    Async {
        runtime: tokio::runtime::Runtime,
        channel: shmesh::asynchronous::AsyncChannel,
    },
}

/// What the calls of a session carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Bytes, echoed (the `shmesh-*` peers).
    Bytes,
    /// An order book as an rkyv archive, read in place on both sides.
    Rkyv,
    /// The same order book as a protobuf message (prost).
    Prost,
}

/// One server process and one connection to it, for all rows of a peer.
pub struct Session {
    // The client goes first: the server must outlive the connection.
    client: Client,
    server: PeerProcess,
    codec: Codec,
}

impl Session {
    /// Starts a server process (`exe __bench-peer shmesh ADDRESS`) and
    /// connects to it in `mode`, with the async client if `asynchronous`,
    /// to make calls carrying `codec`; `label` (unique per session of this
    /// process) names the address.
    pub fn start(
        exe: &Path,
        label: &str,
        mode: WaitMode,
        asynchronous: bool,
        codec: Codec,
    ) -> Result<Self, ShmeshPeerError> {
        let address = format!("shm://@shmesh-bench-{}-{label}", std::process::id());
        tracing::debug!(%address, mode = mode_name(mode), asynchronous, "starting a shmesh peer");
        let args = ["__bench-peer", "shmesh", &address].map(String::from);
        let (server, _) = PeerProcess::spawn(exe, &args, Duration::from_secs(20))?;
        let mut options = ChannelOptions::new(SERVICE, SCHEMA);
        options.limits = limits(mode)?;
        let channel = Channel::connect(&address, &options)?;
        let granted = channel.limits();
        if granted.wait_mode != mode {
            tracing::warn!(asked = ?mode, granted = ?granted.wait_mode, "server granted another wait mode");
        }
        let client = if asynchronous {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(ShmeshPeerError::Runtime)?;
            let channel = {
                let _entered = runtime.enter();
                shmesh::asynchronous::AsyncChannel::from_channel(channel)?
            };
            Client::Async { runtime, channel }
        } else {
            Client::Blocking(channel)
        };
        Ok(Session {
            client,
            server,
            codec,
        })
    }

    /// Measures `size`-byte echoes with `inflight` calls in flight.
    pub fn measure(
        &mut self,
        size: usize,
        inflight: usize,
        window: Window,
    ) -> Result<Measured, ShmeshPeerError> {
        let blocking = match &self.client {
            Client::Blocking(channel) => channel,
            Client::Async { channel, .. } => channel.blocking(),
        };
        let granted = blocking.limits();
        let largest_slab = granted
            .pool_classes
            .as_slice()
            .iter()
            .map(|c| c.slab_size)
            .max()
            .unwrap_or(0);
        if size as u64 > granted.max_message || size as u64 > largest_slab {
            return Err(ShmeshPeerError::Unservable(format!(
                "{size} B does not fit the granted limits (largest message {} B, largest slab {largest_slab} B)",
                granted.max_message
            )));
        }
        match (self.codec, &self.client) {
            (Codec::Bytes, _) => {}
            (codec, Client::Blocking(channel)) => {
                return structured_rows(channel, codec, size, inflight, window, &mut self.server);
            }
            (_, Client::Async { .. }) => {
                return Err(ShmeshPeerError::Unservable(
                    "structured messages are measured on the blocking client".into(),
                ));
            }
        }
        let message: Arc<[u8]> = (0..size).map(|i| i as u8).collect();
        // One call first: a size the pool cannot carry is a skipped row, not
        // a failed run.
        blocking_call(blocking, &message).map_err(unservable)?;
        match &self.client {
            Client::Blocking(channel) => Ok(measure::run_threads(
                inflight,
                window,
                &mut self.server,
                || {
                    let (channel, message) = (channel.clone(), message.clone());
                    move || -> CallResult { Ok(blocking_call(&channel, &message)?) }
                },
            )?),
            Client::Async { runtime, channel } => Ok(measure::run_tasks(
                runtime,
                inflight,
                window,
                &mut self.server,
                || {
                    let (channel, message) = (channel.clone(), message.clone());
                    move || {
                        let (channel, message) = (channel.clone(), message.clone());
                        async move { Ok(async_call(channel, message).await?) }
                    }
                },
            )?),
        }
    }

    /// Closes the connection and stops the server.
    pub fn finish(self) -> Result<(), ShmeshPeerError> {
        let Session { client, server, .. } = self;
        drop(client);
        server.stop()?;
        Ok(())
    }
}

/// Measures `codec`'s order book of the size class `size` on `channel`.
fn structured_rows(
    channel: &Channel,
    codec: Codec,
    size: usize,
    inflight: usize,
    window: Window,
    server: &mut PeerProcess,
) -> Result<Measured, ShmeshPeerError> {
    let len = match codec {
        Codec::Prost => structured::prost_len,
        _ => structured::rkyv_len,
    };
    let levels = structured::levels_for(size, len).ok_or_else(|| {
        ShmeshPeerError::Unservable(format!(
            "an empty book takes {} B, more than {size} B",
            len(0)
        ))
    })?;
    tracing::debug!(
        ?codec,
        size,
        levels,
        bytes = len(levels),
        "structured message for the row"
    );
    if codec == Codec::Prost {
        let book = Arc::new(structured::prost_book(levels));
        prost_call(channel, &book).map_err(unservable)?;
        return Ok(measure::run_threads(inflight, window, server, || {
            let (channel, book) = (channel.clone(), book.clone());
            move || -> CallResult { Ok(prost_call(&channel, &book)?) }
        })?);
    }
    // Both processes run as this user: responses are read in place.
    let client = shmesh_rkyv::Client::trusting_same_user(channel.clone());
    let book = Arc::new(structured::book(levels));
    rkyv_call(&client, &book).map_err(unservable)?;
    Ok(measure::run_threads(inflight, window, server, || {
        let (client, book) = (client.clone(), book.clone());
        move || -> CallResult { Ok(rkyv_call(&client, &book)?) }
    })?)
}

/// One order book as rkyv: serialized into a loaned slab, read in place
/// by the server, answered in place, checked in place.
fn rkyv_call(client: &shmesh_rkyv::Client, book: &structured::Book) -> Result<(), ShmeshPeerError> {
    let answer = client.call(&structured::BOOK, book, Some(CALL_TIMEOUT))?;
    if !structured::same(&answer, book) {
        return Err(ShmeshPeerError::WrongEcho);
    }
    Ok(())
}

/// One order book as protobuf: encoded into a loaned slab, decoded by the
/// server, answered encoded into its slab, decoded and checked.
fn prost_call(channel: &Channel, book: &structured::ProstBook) -> Result<(), ShmeshPeerError> {
    let len = prost::Message::encoded_len(book);
    let mut request = channel.loan(len, Some(CALL_TIMEOUT))?;
    let mut out = &mut request[..];
    prost::Message::encode(book, &mut out)
        .map_err(|e| shmesh::status::Status::internal(e.to_string()))?;
    let response = channel.send(structured::PROST, request, Some(CALL_TIMEOUT))?;
    let answer: structured::ProstBook = prost::Message::decode(&response[..])
        .map_err(|e| shmesh::status::Status::internal(e.to_string()))?;
    if answer != *book {
        return Err(ShmeshPeerError::WrongEcho);
    }
    Ok(())
}

/// A call that fails for lack of room is a size this channel cannot serve.
fn unservable(e: ShmeshPeerError) -> ShmeshPeerError {
    match e {
        ShmeshPeerError::Call(status)
            if matches!(
                status.code(),
                Code::ResourceExhausted | Code::InvalidArgument | Code::OutOfRange
            ) =>
        {
            ShmeshPeerError::Unservable(format!("not served: {status}"))
        }
        other => other,
    }
}

/// One echo on the blocking client: loan, write in place, send, check.
fn blocking_call(channel: &Channel, message: &[u8]) -> Result<(), ShmeshPeerError> {
    let mut request = channel.loan(message.len(), Some(CALL_TIMEOUT))?;
    request.copy_from_slice(message);
    let response = channel.send(ECHO, request, Some(CALL_TIMEOUT))?;
    if response[..] != message[..] {
        return Err(ShmeshPeerError::WrongEcho);
    }
    Ok(())
}

/// One echo on the async client; retries a loan while the pool is busy.
async fn async_call(
    channel: shmesh::asynchronous::AsyncChannel,
    message: Arc<[u8]>,
) -> Result<(), ShmeshPeerError> {
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    let mut request = loop {
        match channel.loan(message.len()) {
            Ok(request) => break request,
            Err(status)
                if status.code() == Code::ResourceExhausted
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::task::yield_now().await;
            }
            Err(status) => return Err(status.into()),
        }
    };
    request.copy_from_slice(&message);
    let response = channel.send(ECHO, request, Some(CALL_TIMEOUT)).await?;
    if response[..] != message[..] {
        return Err(ShmeshPeerError::WrongEcho);
    }
    Ok(())
}

/// The wait mode's command-line name.
pub fn mode_name(mode: WaitMode) -> &'static str {
    match mode {
        WaitMode::Poll => "poll",
        WaitMode::Adaptive => "adaptive",
        WaitMode::Block => "block",
    }
}
