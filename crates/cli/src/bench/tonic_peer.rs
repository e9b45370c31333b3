//! The gRPC peers: the same echo, as the `Echo` service of
//! `proto/echo.proto`, through tonic over TCP on 127.0.0.1 or over a Unix
//! domain socket, to a tonic server in another process.
//!
//! One client (one HTTP/2 connection) carries every call of a row; with
//! `inflight` above one, that many tasks call on clones of it at once. Both
//! sides run tokio's multi-threaded runtime, with `TCP_NODELAY` and HTTP/2
//! windows large enough that a 1 MiB message is not throttled by flow
//! control.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::bytes::Bytes;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Server};

use super::control::{self, ControlError, PeerProcess};
use super::measure::{self, BoxError, MeasureError, Measured, Window};

/// Code generated from `proto/echo.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("shmesh.bench.v1");
}

use proto::echo_client::EchoClient;
use proto::echo_server::{Echo, EchoServer};
use proto::{EchoReply, EchoRequest};

/// Largest message either side accepts.
const MAX_MESSAGE: usize = 8 << 20;
/// HTTP/2 stream window.
const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection window.
const CONNECTION_WINDOW: u32 = 64 << 20;
/// How long one call may take before the row fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Which transport carries the gRPC calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP on 127.0.0.1.
    Tcp,
    /// A Unix domain socket.
    Uds,
}

/// A tonic peer failed.
#[derive(Debug, Error)]
pub enum TonicPeerError {
    /// The server process could not be started or talked to.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Socket setup failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// tonic's transport failed (connect, serve).
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A call failed.
    #[error("call failed: {0}")]
    Call(#[from] tonic::Status),
    /// The echo differs from the request.
    #[error("the echo differs from the request")]
    WrongEcho,
    /// The server process announced an address this side cannot use.
    #[error("bad address from the server: {0:?}")]
    BadAddress(String),
    /// Measuring failed.
    #[error(transparent)]
    Measure(#[from] MeasureError),
}

/// The echo service.
#[derive(Debug, Default)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            payload: request.into_inner().payload,
        }))
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Server side (`__bench-peer tonic-tcp` / `tonic-uds PATH`): serves the
/// echo until the benchmark closes our stdin. Over TCP it binds an
/// ephemeral port on 127.0.0.1 and announces it.
pub fn serve(transport: Transport, uds_path: Option<&Path>) -> Result<(), TonicPeerError> {
    let runtime = runtime()?;
    runtime.block_on(async {
        let service = EchoServer::new(EchoService)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let builder = || {
            Server::builder()
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
        };
        match (transport, uds_path) {
            (Transport::Tcp, _) => {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
                let address = listener.local_addr()?;
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                control::announce_and_answer(&address.to_string())?;
                builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await?;
            }
            (Transport::Uds, path) => {
                let path = path.ok_or_else(|| TonicPeerError::BadAddress(String::new()))?;
                let listener = tokio::net::UnixListener::bind(path)?;
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                control::announce_and_answer(&path.display().to_string())?;
                builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await?;
            }
        }
        Ok(())
    })
}

/// One server process and one client connection to it, for all rows of a
/// peer.
pub struct Session {
    client: EchoClient<Channel>,
    runtime: tokio::runtime::Runtime,
    server: PeerProcess,
    /// The socket file to remove afterwards (UDS).
    socket: Option<PathBuf>,
}

impl Session {
    /// Starts a server process and connects to it over `transport`.
    pub fn start(exe: &Path, transport: Transport) -> Result<Self, TonicPeerError> {
        let runtime = runtime()?;
        let (args, socket) = match transport {
            Transport::Tcp => (vec!["__bench-peer".into(), "tonic-tcp".into()], None),
            Transport::Uds => {
                let path = std::env::temp_dir().join(format!(
                    "shmesh-bench-{}-{}.sock",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos())
                ));
                (
                    vec![
                        "__bench-peer".into(),
                        "tonic-uds".into(),
                        path.display().to_string(),
                    ],
                    Some(path),
                )
            }
        };
        let (server, address) = PeerProcess::spawn(exe, &args, Duration::from_secs(20))?;
        let endpoint = |uri: String| -> Result<Endpoint, TonicPeerError> {
            Ok(Endpoint::from_shared(uri)?
                .tcp_nodelay(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .connect_timeout(Duration::from_secs(10)))
        };
        let channel = runtime.block_on(async {
            match transport {
                Transport::Tcp => {
                    let address: std::net::SocketAddr = address
                        .parse()
                        .map_err(|_| TonicPeerError::BadAddress(address.clone()))?;
                    Ok::<_, TonicPeerError>(endpoint(format!("http://{address}"))?.connect().await?)
                }
                Transport::Uds => {
                    let path = PathBuf::from(&address);
                    // The URI is a placeholder: the connector ignores it.
                    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    });
                    Ok(endpoint("http://localhost".into())?
                        .connect_with_connector(connector)
                        .await?)
                }
            }
        })?;
        let client = EchoClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Session {
            client,
            runtime,
            server,
            socket,
        })
    }

    /// Measures `size`-byte echoes with `inflight` calls in flight.
    pub fn measure(
        &mut self,
        size: usize,
        inflight: usize,
        window: Window,
    ) -> Result<Measured, TonicPeerError> {
        let message: Bytes = (0..size).map(|i| i as u8).collect::<Vec<u8>>().into();
        self.runtime
            .block_on(call(self.client.clone(), message.clone()))?;
        Ok(measure::run_tasks(
            &self.runtime,
            inflight,
            window,
            &mut self.server,
            || {
                let (client, message) = (self.client.clone(), message.clone());
                move || {
                    let (client, message) = (client.clone(), message.clone());
                    async move { Ok::<(), BoxError>(call(client, message).await?) }
                }
            },
        )?)
    }

    /// Closes the connection and stops the server.
    pub fn finish(self) -> Result<(), TonicPeerError> {
        let Session {
            client,
            runtime,
            server,
            socket,
        } = self;
        drop(client);
        drop(runtime);
        let stopped = server.stop();
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        stopped?;
        Ok(())
    }
}

/// One echo: the request carries `message` (a reference-counted buffer,
/// not copied by the client), and the reply is checked against it.
async fn call(mut client: EchoClient<Channel>, message: Bytes) -> Result<(), TonicPeerError> {
    let mut request = tonic::Request::new(EchoRequest {
        payload: message.clone(),
    });
    request.set_timeout(CALL_TIMEOUT);
    let reply = client.echo(request).await?.into_inner();
    if reply.payload != message {
        return Err(TonicPeerError::WrongEcho);
    }
    Ok(())
}
