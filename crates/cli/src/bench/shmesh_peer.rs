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

/// The echo router: the request copied in place into the reply slab.
fn echo_router() -> Router {
    structured::routes(Router::new().route_in_place(ECHO, |request, reply| {
        if !request.payload.is_empty() {
            reply
                .loan(request.payload.len())?
                .copy_from_slice(request.payload);
        }
        Ok(())
    }))
}

/// The most a benchmark server grants: any wait mode, polling included.
fn server_limits() -> Result<Limits, ShmeshPeerError> {
    Ok(Limits {
        spin_ns: u64::MAX,
        ..limits(WaitMode::Poll)?
    })
}

/// Server side (`__bench-peer shmesh`): serves the echo at `address` until
/// the benchmark closes our stdin.
pub fn serve(address: &str) -> Result<(), ShmeshPeerError> {
    let mut server = Server::bind(address, SERVICE, SCHEMA, echo_router())?;
    server.set_max_limits(server_limits()?);
    control::announce_and_answer(address)?;
    server.serve();
    Ok(())
}

/// A host daemon listening in `dir` (`__bench-peer shmesh-daemon`): a
/// process of its own, as in a deployment. On the mediated path it runs
/// what the issue measures: metrics, access control and a rate limit that
/// never throttles; `traced` adds the tracing engine, exporting to an
/// endpoint where nothing listens ([`UNREACHABLE_COLLECTOR`]). Announces
/// its socket, then serves until the benchmark closes our stdin.
pub fn serve_daemon(dir: &Path, mediated: bool, traced: bool) -> Result<(), ShmeshPeerError> {
    use shmesh_daemon::config::{Config, DataPath, ServiceConfig};
    let socket = dir.join("shmeshd.sock");
    let mut config = Config {
        socket: Some(socket.clone()),
        ..Config::default()
    };
    config.metrics.enabled = false;
    if mediated {
        config.services.push(ServiceConfig {
            name: SERVICE.into(),
            path: DataPath::Mediated,
            replica_uid: None,
        });
        let uid = rustix::process::geteuid().as_raw();
        let tracing = traced
            .then(|| format!("kind = \"tracing\"\notlp_endpoint = \"{UNREACHABLE_COLLECTOR}\"\n"));
        for spec in [
            "kind = \"metrics\"\n".to_owned(),
            format!(
                "kind = \"access\"\ndefault = \"deny\"\n[[rules]]\naction = \"allow\"\nuid = {uid}\n"
            ),
            RATE_LIMIT.to_owned(),
        ]
        .into_iter()
        .chain(tracing)
        {
            let spec = shmesh_daemon::engine::EngineSpec::parse(&spec, "bench engine")
                .map_err(|e| ShmeshPeerError::Unservable(e.to_string()))?;
            config.engines.push(spec);
        }
    }
    let daemon = shmesh_daemon::Daemon::bind(config)
        .map_err(|e| ShmeshPeerError::Unservable(format!("cannot start shmeshd: {e}")))?;
    control::announce_and_answer(&socket.display().to_string())?;
    daemon.run();
    Ok(())
}

/// The echo registered as a replica with the daemon at `socket`
/// (`__bench-peer shmesh-replica`).
pub fn serve_replica(socket: &Path) -> Result<(), ShmeshPeerError> {
    let address = shmesh::Address::from_path(socket)
        .map_err(|e| ShmeshPeerError::Unservable(e.to_string()))?;
    let mut server = Server::register_with(&address, SERVICE, SCHEMA, echo_router())?;
    server.set_max_limits(server_limits()?);
    control::announce_and_answer(&address.to_string())?;
    server.serve();
    Ok(())
}

/// The processes a session's rows are served by: the server (or replica),
/// and the daemon when there is one; the rows' server CPU is theirs
/// together.
pub struct Servers {
    server: PeerProcess,
    daemon: Option<PeerProcess>,
}

impl measure::ServerCpu for Servers {
    fn server_cpu(&mut self) -> Result<measure::CpuTime, MeasureError> {
        let mut cpu = self.server.cpu().map_err(MeasureError::from)?;
        if let Some(daemon) = self.daemon.as_mut() {
            let more = daemon.cpu().map_err(MeasureError::from)?;
            cpu.user += more.user;
            cpu.system += more.system;
        }
        Ok(cpu)
    }
}

/// How a session's client reaches its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The server's own socket.
    Socket,
    /// Through a host daemon, on the direct path.
    DaemonDirect,
    /// Through a host daemon, on the mediated path.
    DaemonMediated,
    /// On the mediated path while the rate limiter is upgraded over and
    /// over.
    DaemonMediatedUpgrading,
    /// On the mediated path with the tracing engine too.
    DaemonMediatedTraced,
}

/// Where the traced row's spans go: a port nothing listens on, so the
/// exporter's batches fail at connect and the row measures the engine on
/// the call path (trace context, span queued), not a collector.
const UNREACHABLE_COLLECTOR: &str = "http://127.0.0.1:9";

/// The rate limiter the mediated rows run (and the upgrades replace with
/// itself, carrying the buckets over).
const RATE_LIMIT: &str = "kind = \"rate-limit\"\nrate = 1e12\nburst = 1000000\n";

/// Upgrades the rate limiter of the daemon at `socket` until told to
/// stop; returns how many upgrades it made.
fn upgrade_until(socket: shmesh::Address, stop: Arc<std::sync::atomic::AtomicBool>) -> u64 {
    let mut upgrades = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let request = shmesh::control::PolicyRequest::Upgrade {
            name: "rate-limit".into(),
            spec: RATE_LIMIT.into(),
        };
        match shmesh_daemon::query_policy(&socket, request) {
            Ok(answer) if answer.error.is_none() => upgrades += 1,
            Ok(answer) => tracing::warn!("upgrade refused: {:?}", answer.error),
            Err(e) => tracing::warn!("upgrade failed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    upgrades
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
    server: Servers,
    codec: Codec,
    /// The daemon's directory, removed at the end.
    dir: Option<std::path::PathBuf>,
    /// The thread upgrading the daemon's rate limiter, and its stop flag.
    upgrader: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
    )>,
}

impl Session {
    /// Starts a server process (`exe __bench-peer shmesh ADDRESS`) and
    /// connects to it in `mode`, with the async client if `asynchronous`;
    /// `label` (unique per session of this process) names the address.
    pub fn start(
        exe: &Path,
        label: &str,
        mode: WaitMode,
        asynchronous: bool,
        route: Route,
        codec: Codec,
    ) -> Result<Self, ShmeshPeerError> {
        let mut options = ChannelOptions::new(SERVICE, SCHEMA);
        options.limits = limits(mode)?;
        let mut dir = None;
        let mut daemon = None;
        let (server, address) = match route {
            Route::Socket => {
                let address = format!("shm://@shmesh-bench-{}-{label}", std::process::id());
                let args = ["__bench-peer", "shmesh", &address].map(String::from);
                let (server, _) = PeerProcess::spawn(exe, &args, Duration::from_secs(20))?;
                (server, address)
            }
            Route::DaemonDirect
            | Route::DaemonMediated
            | Route::DaemonMediatedUpgrading
            | Route::DaemonMediatedTraced => {
                let path = std::env::temp_dir()
                    .join(format!("shmesh-bench-{}-{label}", std::process::id()));
                let mut args = vec![
                    "__bench-peer".to_owned(),
                    "shmesh-daemon".to_owned(),
                    path.display().to_string(),
                ];
                dir = Some(path);
                match route {
                    Route::DaemonDirect => {}
                    Route::DaemonMediatedTraced => args.push("--traced".into()),
                    _ => args.push("--mediated".into()),
                }
                let (process, socket) = PeerProcess::spawn(exe, &args, Duration::from_secs(20))?;
                daemon = Some(process);
                let args = ["__bench-peer", "shmesh-replica", &socket].map(String::from);
                let (server, _) = PeerProcess::spawn(exe, &args, Duration::from_secs(20))?;
                options.daemon = Some(
                    shmesh::Address::from_path(&socket)
                        .map_err(|e| ShmeshPeerError::Unservable(e.to_string()))?,
                );
                (server, format!("shm+svc://{SERVICE}"))
            }
        };
        tracing::debug!(%address, mode = mode_name(mode), asynchronous, "connecting to a shmesh peer");
        let channel = Channel::connect(&address, &options)?;
        let upgrader = match (route, &options.daemon) {
            (Route::DaemonMediatedUpgrading, Some(socket)) => {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (socket, flag) = (socket.clone(), stop.clone());
                let thread = std::thread::Builder::new()
                    .name("bench-upgrader".into())
                    .spawn(move || upgrade_until(socket, flag))
                    .map_err(ShmeshPeerError::Runtime)?;
                Some((stop, thread))
            }
            _ => None,
        };
        let granted = channel.limits();
        // The mediated path's waits yield the CPU by the daemon's choice.
        let expected = match route {
            Route::Socket | Route::DaemonDirect => mode,
            _ => shmesh::WaitMode::Yield,
        };
        if granted.wait_mode != expected {
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
            server: Servers { server, daemon },
            codec,
            dir,
            upgrader,
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
        let Session {
            client,
            server,
            dir,
            upgrader,
            ..
        } = self;
        if let Some((stop, thread)) = upgrader {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let upgrades = thread.join().unwrap_or(0);
            tracing::info!(upgrades, "rate limiter upgraded live during the rows");
        }
        drop(client);
        server.server.stop()?;
        if let Some(daemon) = server.daemon {
            daemon.stop()?;
        }
        if let Some(dir) = dir {
            let _ = std::fs::remove_dir_all(dir);
        }
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
    server: &mut Servers,
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
        WaitMode::Yield => "yield",
    }
}
