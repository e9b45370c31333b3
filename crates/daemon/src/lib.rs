//! `shmeshd`, the shmesh host daemon: a registry of services and their
//! replicas that brokers shared-memory connections between processes,
//! checks who may talk to whom, and exports what it sees.
//!
//! - **Registry**: a server started with `shm+svc://NAME` registers as a
//!   replica of `NAME` ([`shmesh::server::Server::bind`]); a client that
//!   connects to `shm+svc://NAME` asks the daemon instead of a socket of the
//!   server's own.
//! - **Grants**: the daemon authenticates both sides with `SO_PEERCRED`,
//!   applies its [access rules](access), picks a replica of the client's
//!   schema (the least loaded), negotiates limits with the replica's
//!   policy, creates the connection's segment and doorbell itself and hands
//!   them to both sides with the two ends of a socket pair; then it is out
//!   of the way (the *direct* path: calls never pass through it). A
//!   process only maps segments it was granted.
//! - **Liveness**: a replica's registration stays open; when the replica
//!   dies the daemon drops it and its grants. A client that dies closes its
//!   end of the socket pair; the replica ends the connection and tells the
//!   daemon. The segment goes when the last process unmaps it.
//! - **Seeing it**: `shmesh status` ([`ToDaemon::Status`]) and Prometheus
//!   text at `/metrics` ([`metrics`]), from the registry and the replicas'
//!   own counters.
//!
//! # Example
//!
//! ```no_run
//! use shmesh_daemon::{Daemon, config::Config};
//!
//! let daemon = Daemon::bind(Config::default())?;
//! eprintln!("listening on {}", daemon.socket().display());
//! daemon.run();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod access;
mod broker;
pub mod cli;
pub mod config;
pub mod engine;
mod handover;
mod mediator;
pub mod metrics;
pub mod registry;
mod replica;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shmesh::Address;
use shmesh::control::{self, Caller, FromDaemon, ToDaemon};
use shmesh::handshake;
use shmesh::socket::{Connection, Listener};
use thiserror::Error;

use crate::access::AccessRules;
use crate::config::Config;
use crate::registry::Registry;

/// How long a process may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon could not start.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The socket's directory cannot be made.
    #[error("cannot create the socket directory {path}: {source}")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket path is not usable.
    #[error("socket path {path}: {source}")]
    SocketPath {
        /// The path.
        path: PathBuf,
        /// Why.
        source: shmesh::AddressError,
    },
    /// The socket cannot be bound (another daemon may be running).
    #[error(transparent)]
    Bind(#[from] shmesh::BindError),
    /// The configured engine pipeline cannot be built.
    #[error("config: {0}")]
    Pipeline(#[from] engine::PipelineError),
    /// The metrics endpoint cannot start.
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How the daemon reaches a replica: the sending half of its registration.
type Link = Arc<Mutex<Connection>>;

/// What every thread of the daemon shares.
pub(crate) struct State {
    registry: Mutex<Registry<Link>>,
    /// Bumped whenever a replica comes or goes (the mediators watch it).
    generation: Arc<AtomicU64>,
    access: AccessRules,
    config: Config,
    pipeline: Arc<engine::Pipeline>,
    /// Mediated services, by name and schema.
    mediators: Mutex<HashMap<(String, handshake::SchemaHash), Arc<mediator::Mediator>>>,
    /// The daemon as a client of replicas.
    identity: Caller,
    started: Instant,
    metrics: Option<std::net::SocketAddr>,
    shutdown: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind every lock: a panicking holder leaves it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bound daemon, ready to [`run`](Daemon::run).
pub struct Daemon {
    listener: Listener,
    socket: PathBuf,
    state: Arc<State>,
    metrics_server: Option<metrics::MetricsServer>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket)
            .field("metrics", &self.state.metrics)
            .finish_non_exhaustive()
    }
}

/// Stops a running daemon from another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    state: Arc<State>,
    socket: Address,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl ShutdownHandle {
    /// Stops accepting and returns from [`Daemon::run`]. Connections
    /// already granted go on (they never touch the daemon).
    pub fn shutdown(&self) {
        self.state.shutdown.store(true, Ordering::Release);
        let _ = shmesh::socket::connect(&self.socket);
    }
}

impl Daemon {
    /// Binds the socket (creating its directory) and starts the metrics
    /// endpoint, as `config` says.
    pub fn bind(config: Config) -> Result<Daemon, DaemonError> {
        let socket = config.socket_path();
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DaemonError::SocketDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let address = Address::from_path(&socket).map_err(|source| DaemonError::SocketPath {
            path: socket.clone(),
            source,
        })?;
        let listener = Listener::bind(&address)?;
        // Any local process may ask; the access rules decide who gets what.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) =
                std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            {
                tracing::warn!("cannot open {} to all users: {e}", socket.display());
            }
        }
        let metrics_server = if config.metrics.enabled {
            Some(
                metrics::MetricsServer::bind(config.metrics.listen).map_err(|source| {
                    DaemonError::Metrics {
                        address: config.metrics.listen,
                        source,
                    }
                })?,
            )
        } else {
            None
        };
        // Connection ids distinct per daemon run: a replica that outlives a
        // restart keeps serving connections from the previous run.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        let pipeline = Arc::new(engine::Pipeline::new(&config.engines)?);
        let state = Arc::new(State {
            registry: Mutex::new(Registry::new(epoch << 24)),
            generation: Arc::new(AtomicU64::new(0)),
            access: AccessRules::new(config.access.clone()),
            config: config.clone(),
            pipeline,
            mediators: Mutex::new(HashMap::new()),
            identity: Caller {
                pid: std::process::id() as i32,
                uid: rustix::process::geteuid().as_raw(),
                gid: rustix::process::getegid().as_raw(),
                app: "shmeshd".into(),
            },
            started: Instant::now(),
            metrics: metrics_server.as_ref().map(|m| m.address()),
            shutdown: AtomicBool::new(false),
        });
        Ok(Daemon {
            listener,
            socket,
            state,
            metrics_server,
        })
    }

    /// The socket processes reach the daemon on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.state.metrics
    }

    /// A handle to stop [`Daemon::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            state: self.state.clone(),
            socket: self.listener.address().clone(),
        }
    }

    /// Serves until shut down.
    pub fn run(mut self) {
        if let Some(server) = self.metrics_server.take() {
            let state = self.state.clone();
            server.start(move || metrics::render(&report::report(&state)));
        }
        while !self.state.shutdown.load(Ordering::Acquire) {
            let conn = match self.listener.accept() {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if self.state.shutdown.load(Ordering::Acquire) {
                break;
            }
            let state = self.state.clone();
            let spawned = std::thread::Builder::new()
                .name("shmeshd-conn".into())
                .spawn(move || serve(conn, &state));
            if let Err(e) = spawned {
                tracing::error!("cannot start a thread for a process: {e}");
            }
        }
        tracing::info!("shmeshd stopped");
    }
}

/// The program name of process `pid` (`/proc/PID/comm`), empty if gone.
pub(crate) fn app_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// Who is at the other end of `conn`.
fn identify(conn: &Connection) -> std::io::Result<Caller> {
    let creds = conn.peer_credentials()?;
    let app = app_name(creds.pid);
    Ok(Caller {
        pid: creds.pid,
        uid: creds.uid,
        gid: creds.gid,
        app,
    })
}

/// Serves one process from its first message on.
fn serve(mut conn: Connection, state: &Arc<State>) {
    let caller = match identify(&conn) {
        Ok(caller) => caller,
        Err(e) => {
            tracing::warn!("cannot identify a process: {e}");
            return;
        }
    };
    if conn.set_read_timeout(Some(FIRST_MESSAGE_TIMEOUT)).is_err() {
        return;
    }
    // One fd at most: a registration's load page.
    let (bytes, mut fds) = match conn.recv_msg(1) {
        Ok(message) => message,
        Err(e) => {
            tracing::debug!(pid = caller.pid, "no first message: {e}");
            return;
        }
    };
    if !control::is_control(&bytes) {
        broker::broker(conn, caller, &bytes, None, state);
        return;
    }
    match control::decode_to_daemon(&bytes) {
        Ok(ToDaemon::Register(registration)) => {
            replica::replica_session(conn, caller, &registration, fds.pop(), state);
        }
        Ok(ToDaemon::Status) => {
            let answer = control::encode(&FromDaemon::Status(report::report(state)));
            let _ = conn.send_msg(&answer, &[]);
        }
        Ok(ToDaemon::ConnectTo { replica, hello }) => {
            broker::broker(conn, caller, &hello, Some(replica), state);
        }
        Ok(ToDaemon::Resolve { service }) => {
            let answer = broker::resolve(state, &service);
            let fds: Vec<std::os::fd::BorrowedFd<'_>> =
                answer.iter().map(|(_, load)| load.fd()).collect();
            let entries = answer.iter().map(|(entry, _)| entry.clone()).collect();
            let _ = conn.send_msg(&control::encode(&FromDaemon::Replicas(entries)), &fds);
        }
        Ok(ToDaemon::Policy(request)) => {
            let answer = handover::policy(state, &caller, request);
            let _ = conn.send_msg(&control::encode(&FromDaemon::Policy(answer)), &[]);
        }
        Ok(other) => tracing::warn!(
            pid = caller.pid,
            "unexpected first message {other:?}; closing"
        ),
        Err(e) => tracing::warn!(pid = caller.pid, "unreadable control message: {e}"),
    }
}

pub use report::{StatusError, query_policy, query_status};
