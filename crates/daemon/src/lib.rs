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
pub mod cli;
pub mod config;
pub mod engine;
mod handover;
mod mediator;
pub mod metrics;
pub mod registry;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shmesh::Address;
use shmesh::control::{
    self, Caller, ConnectionStatus, FromDaemon, ReplicaStats, ReplicaStatus, ServiceStatus,
    StatusReport, ToDaemon,
};
use shmesh::handshake::{self, Msg, Refuse, RefuseReason, ServerPolicy};
use shmesh::socket::{Connection, Listener};
use thiserror::Error;

use crate::access::AccessRules;
use crate::config::{Action, Config, DataPath};
use crate::handover::HandOver;
use crate::registry::{Pick, Registry};

/// How long a process may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a status query or a scrape waits for the replicas' counters.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);

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
    scrapes: Scrapes,
    shutdown: AtomicBool,
}

/// Counter requests in flight to replicas, and their answers.
#[derive(Default)]
struct Scrapes {
    next: AtomicU64,
    answers: Mutex<HashMap<u64, HashMap<u64, ReplicaStats>>>,
    arrived: Condvar,
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
            scrapes: Scrapes::default(),
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
            server.start(move || metrics::render(&report(&state)));
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

/// Who is at the other end of `conn`.
fn identify(conn: &Connection) -> std::io::Result<Caller> {
    let creds = conn.peer_credentials()?;
    let app = std::fs::read_to_string(format!("/proc/{}/comm", creds.pid))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default();
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
        broker(conn, caller, &bytes, None, state);
        return;
    }
    match control::decode_to_daemon(&bytes) {
        Ok(ToDaemon::Register(registration)) => {
            replica_session(conn, caller, &registration, fds.pop(), state);
        }
        Ok(ToDaemon::Status) => {
            let answer = control::encode(&FromDaemon::Status(report(state)));
            let _ = conn.send_msg(&answer, &[]);
        }
        Ok(ToDaemon::ConnectTo { replica, hello }) => {
            broker(conn, caller, &hello, Some(replica), state);
        }
        Ok(ToDaemon::Resolve { service }) => {
            let answer = resolve(state, &service);
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

/// A replica's registration, for its life.
fn replica_session(
    mut conn: Connection,
    mut process: Caller,
    registration: &control::Registration,
    load_fd: Option<std::os::fd::OwnedFd>,
    state: &Arc<State>,
) {
    let refuse = |conn: &mut Connection, message: String| {
        tracing::warn!(pid = process.pid, "registration refused: {message}");
        let _ = conn.send_msg(&control::encode(&FromDaemon::Refused { message }), &[]);
    };
    let load = match load_fd.map(shmesh_shm::load::LoadView::open) {
        Some(Ok(view)) => Arc::new(view),
        Some(Err(e)) => return refuse(&mut conn, format!("unusable load page: {e}")),
        None => return refuse(&mut conn, "the registration carries no load page".into()),
    };
    let hello = match handshake::decode(&registration.policy) {
        Ok(Msg::Hello(hello)) => hello,
        Ok(other) => return refuse(&mut conn, format!("policy is a {}", other.kind())),
        Err(e) => return refuse(&mut conn, format!("policy does not decode: {e}")),
    };
    if hello.protocol_version != handshake::PROTOCOL_VERSION {
        return refuse(
            &mut conn,
            format!(
                "replica speaks protocol {}, the daemon {}",
                hello.protocol_version,
                handshake::PROTOCOL_VERSION
            ),
        );
    }
    if !registration.app.is_empty() {
        process.app = registration.app.clone();
    }
    let policy = ServerPolicy {
        service: hello.service,
        schema_hash: hello.schema_hash,
        max: hello.requested,
        busy: false,
    };
    let send = match conn.as_fd().try_clone_to_owned() {
        Ok(fd) => Arc::new(Mutex::new(Connection::from(UnixStream::from(fd)))),
        Err(e) => return refuse(&mut conn, format!("daemon out of fds: {e}")),
    };
    let service = policy.service.to_string();
    // Who may serve: the configured uid, else whoever serves it already (a
    // running service cannot be taken over by another user).
    let serving_uid = state.config.replica_uid(&service).or_else(|| {
        lock(&state.registry)
            .services()
            .find(|(name, _)| *name == service)
            .and_then(|(_, s)| s.replicas.values().next())
            .map(|r| r.process.uid)
    });
    if let Some(uid) = serving_uid
        && uid != process.uid
        && process.uid != 0
    {
        return refuse(
            &mut conn,
            format!(
                "service {service:?} is served by uid {uid}; uid {} may not serve it",
                process.uid
            ),
        );
    }
    let id = lock(&state.registry).add_replica(process.clone(), policy, send.clone(), Some(load));
    // Relaxed: mediators only compare it with what they saw last.
    state.generation.fetch_add(1, Ordering::Relaxed);
    let registered = control::encode(&FromDaemon::Registered { replica: id });
    if lock(&send).send_msg(&registered, &[]).is_err() || conn.set_read_timeout(None).is_err() {
        lock(&state.registry).remove_replica(id);
        return;
    }
    tracing::info!(
        service,
        replica = id,
        pid = process.pid,
        app = process.app,
        "replica registered"
    );
    loop {
        let bytes = match conn.recv_msg(0) {
            Ok((bytes, _)) => bytes,
            Err(_) => break,
        };
        match control::decode_to_daemon(&bytes) {
            Ok(ToDaemon::Closed { connection }) => {
                if let Some(grant) = lock(&state.registry).close(id, connection) {
                    tracing::debug!(
                        service,
                        connection,
                        client = grant.caller.pid,
                        "connection ended"
                    );
                }
            }
            Ok(ToDaemon::Stats { request, stats }) => state.scrapes.deliver(request, id, stats),
            Ok(other) => {
                tracing::warn!(
                    service,
                    replica = id,
                    "unexpected {other:?}; dropping the replica"
                );
                break;
            }
            Err(e) => {
                tracing::warn!(
                    service,
                    replica = id,
                    "unreadable message ({e}); dropping the replica"
                );
                break;
            }
        }
    }
    let removed = lock(&state.registry).remove_replica(id);
    state.generation.fetch_add(1, Ordering::Relaxed);
    if let Some(replica) = removed {
        tracing::info!(
            service,
            replica = id,
            pid = replica.process.pid,
            connections = replica.connections.len(),
            "replica gone; its grants are revoked"
        );
    }
}

/// The replicas of `service` and their load pages, for a balancing
/// client.
fn resolve(
    state: &State,
    service: &str,
) -> Vec<(control::TableEntry, Arc<shmesh_shm::load::LoadView>)> {
    lock(&state.registry)
        .services()
        .filter(|(name, _)| *name == service)
        .flat_map(|(_, s)| s.replicas.values())
        .filter_map(|r| {
            let entry = control::TableEntry {
                replica: r.id,
                schema: r.policy.schema_hash.0,
            };
            r.load.clone().map(|load| (entry, load))
        })
        .take(control::MAX_TABLE)
        .collect()
}

/// Answers a client's Hello: refuses, or grants a connection to a replica.
/// `target`: the replica a balancing client chose ([`ToDaemon::ConnectTo`]);
/// `None` lets the daemon pick.
fn broker(
    mut conn: Connection,
    caller: Caller,
    bytes: &[u8],
    target: Option<u64>,
    state: &Arc<State>,
) {
    let hello = match handshake::decode(bytes) {
        Ok(Msg::Hello(hello)) => hello,
        Ok(other) => {
            tracing::warn!(
                pid = caller.pid,
                "a client's first message is a {}",
                other.kind()
            );
            return;
        }
        Err(e) => {
            tracing::warn!(pid = caller.pid, "not a shmesh client: {e}");
            return;
        }
    };
    let service = hello.service.as_str().to_owned();
    let refuse =
        |conn: &mut Connection, reason: RefuseReason, why: &'static str, message: String| {
            tracing::info!(
                service,
                client = caller.pid,
                app = caller.app,
                "refused: {message}"
            );
            lock(&state.registry).refused(&service, why);
            let _ = conn.send_msg(
                &handshake::encode(&Msg::Refuse(Refuse::new(reason, message))),
                &[],
            );
        };

    let decision = state.access.decide(&caller, &service);
    if decision.action == Action::Deny {
        let message = format!(
            "uid {} ({}) may not use service {service:?}: {}",
            caller.uid,
            caller.app,
            state.access.explain(decision)
        );
        return refuse(
            &mut conn,
            RefuseReason::Denied {
                requested: hello.service.clone(),
            },
            "denied",
            message,
        );
    }

    // A replica may die between the pick and the hand-over: try the next.
    for _attempt in 0..3 {
        let (replica, policy, link, id) = {
            let mut registry = lock(&state.registry);
            let pick = match target {
                None => registry.pick(&service, hello.schema_hash),
                Some(id) => match registry.replica(id) {
                    Some(r) if r.policy.service.as_str() != service => Pick::NoReplica,
                    Some(r) if r.policy.schema_hash != hello.schema_hash => {
                        Pick::SchemaMismatch(r.policy.schema_hash)
                    }
                    Some(_) => Pick::Replica(id),
                    None => Pick::NoReplica,
                },
            };
            match pick {
                Pick::Replica(replica) => {
                    let Some(r) = registry.replica(replica) else {
                        continue;
                    };
                    let (policy, link) = (r.policy.clone(), r.link.clone());
                    (replica, policy, link, registry.next_connection())
                }
                Pick::SchemaMismatch(server) => {
                    drop(registry);
                    let reason = RefuseReason::SchemaMismatch {
                        client: hello.schema_hash,
                        server,
                    };
                    let message = format!(
                        "no replica of {service:?} was built from the client's schema {}",
                        hello.schema_hash
                    );
                    return refuse(&mut conn, reason, "schema", message);
                }
                Pick::NoReplica => {
                    drop(registry);
                    let reason = RefuseReason::NoReplica {
                        requested: hello.service.clone(),
                    };
                    let message = format!("no replica of {service:?} is registered");
                    return refuse(&mut conn, reason, "no_replica", message);
                }
            }
        };
        let granted = match handshake::negotiate(&hello, &policy) {
            Ok(granted) => granted,
            Err(refusal) => {
                let why = match refusal.reason() {
                    RefuseReason::VersionMismatch { .. } => "version",
                    RefuseReason::LimitsRefused { .. } => "limits",
                    _ => "other",
                };
                let message = refusal.message().to_owned();
                return refuse(&mut conn, refusal.reason().clone(), why, message);
            }
        };
        if state.config.path_of(&service) == DataPath::Mediated {
            return handover::mediate(conn, &hello, &granted, id, caller, state);
        }
        // Recorded before either side hears of it: the next client's pick
        // counts it, and the replica's `Closed` can never come first.
        lock(&state.registry).grant(replica, id, caller.clone());
        match handover::hand_over(&mut conn, &hello, &granted, id, &caller, &link) {
            Ok(()) => {
                tracing::info!(
                    service,
                    connection = id,
                    replica,
                    client = caller.pid,
                    app = caller.app,
                    "connection granted"
                );
                return;
            }
            Err(HandOver::Replica(e)) => {
                tracing::warn!(
                    service,
                    replica,
                    "cannot hand a connection to the replica: {e}"
                );
                lock(&state.registry).remove_replica(replica);
                state.generation.fetch_add(1, Ordering::Relaxed);
            }
            Err(HandOver::Client(e)) => {
                tracing::info!(
                    service,
                    client = caller.pid,
                    "client left during the hand-over: {e}"
                );
                return;
            }
            Err(HandOver::Setup(e)) => {
                lock(&state.registry).close(replica, id);
                let message = format!("the daemon could not set up the connection: {e}");
                return refuse(&mut conn, RefuseReason::Busy, "setup", message);
            }
        }
    }
    let reason = RefuseReason::NoReplica {
        requested: hello.service.clone(),
    };
    let message = format!("no replica of {service:?} took the connection");
    refuse(&mut conn, reason, "no_replica", message);
}

impl Scrapes {
    fn deliver(&self, request: u64, replica: u64, stats: ReplicaStats) {
        if let Some(answers) = lock(&self.answers).get_mut(&request) {
            answers.insert(replica, stats);
            self.arrived.notify_all();
        }
    }

    /// Asks every replica for its counters; waits up to [`SCRAPE_TIMEOUT`].
    fn collect(&self, links: Vec<(u64, Link)>) -> HashMap<u64, ReplicaStats> {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.answers).insert(request, HashMap::new());
        let ask = control::encode(&FromDaemon::StatsRequest { request });
        let mut asked = 0;
        for (_, link) in &links {
            if lock(link).send_msg(&ask, &[]).is_ok() {
                asked += 1;
            }
        }
        let deadline = Instant::now() + SCRAPE_TIMEOUT;
        let mut answers = lock(&self.answers);
        loop {
            let have = answers.get(&request).map_or(0, HashMap::len);
            let now = Instant::now();
            if have >= asked || now >= deadline {
                break;
            }
            answers = self
                .arrived
                .wait_timeout(answers, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(guard, _)| guard);
        }
        answers.remove(&request).unwrap_or_default()
    }
}

/// Everything the daemon knows, with fresh counters from the replicas.
pub(crate) fn report(state: &State) -> StatusReport {
    let links: Vec<(u64, Link)> = lock(&state.registry)
        .links()
        .map(|(id, link)| (id, link.clone()))
        .collect();
    let mut stats = state.scrapes.collect(links);
    let mediators: Vec<((String, handshake::SchemaHash), Arc<mediator::Mediator>)> =
        lock(&state.mediators)
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
    let stages = state.pipeline.stages();
    let registry = lock(&state.registry);
    let now = Instant::now();
    let services = registry
        .services()
        .map(|(name, service)| ServiceStatus {
            path: match state.config.path_of(name) {
                DataPath::Direct => "direct".into(),
                DataPath::Mediated => "mediated".into(),
            },
            mediated_clients: mediators
                .iter()
                .filter(|((service, _), _)| service == name)
                .flat_map(|(_, m)| m.server.stats().snapshot().connections)
                .map(|c| ConnectionStatus {
                    id: c.id,
                    caller: Caller {
                        pid: c.peer.pid,
                        uid: c.peer.uid,
                        gid: c.peer.gid,
                        app: std::fs::read_to_string(format!("/proc/{}/comm", c.peer.pid))
                            .map(|s| s.trim_end().to_owned())
                            .unwrap_or_default(),
                    },
                    age_secs: 0,
                })
                .collect(),
            mediated: stages
                .iter()
                .flat_map(|stage| stage.engine.counters())
                .filter(|(service, _)| service == name)
                .map(|(_, m)| m)
                .collect(),
            name: name.to_owned(),
            schema: service
                .replicas
                .values()
                .next()
                .map_or([0; 32], |r| r.policy.schema_hash.0),
            grants_total: service.grants_total,
            refusals_total: service.refusals.values().sum(),
            replicas: service
                .replicas
                .values()
                .map(|r| ReplicaStatus {
                    id: r.id,
                    process: Some(r.process.clone()),
                    connections: r
                        .connections
                        .iter()
                        .map(|(&id, grant)| ConnectionStatus {
                            id,
                            caller: grant.caller.clone(),
                            age_secs: now.duration_since(grant.since).as_secs(),
                        })
                        .collect(),
                    stats: stats.remove(&r.id),
                })
                .collect(),
        })
        .collect();
    StatusReport {
        pid: std::process::id() as i32,
        uptime_secs: state.started.elapsed().as_secs(),
        metrics: state.metrics.map(|a| a.to_string()),
        services,
        engines: handover::engines(&state.pipeline),
    }
}

/// Asks the daemon at `socket` for its [`StatusReport`].
pub fn query_status(socket: &Address) -> Result<StatusReport, StatusError> {
    match ask(socket, &ToDaemon::Status)? {
        FromDaemon::Status(report) => Ok(report),
        _ => Err(StatusError::Unexpected),
    }
}

/// Sends the daemon at `socket` a policy request (`shmesh policy`,
/// `shmesh upgrade`); its answer says whether it was carried out.
pub fn query_policy(
    socket: &Address,
    request: control::PolicyRequest,
) -> Result<control::PolicyAnswer, StatusError> {
    match ask(socket, &ToDaemon::Policy(request))? {
        FromDaemon::Policy(answer) => Ok(answer),
        _ => Err(StatusError::Unexpected),
    }
}

/// One question, one answer.
fn ask(socket: &Address, question: &ToDaemon) -> Result<FromDaemon, StatusError> {
    let mut conn = shmesh::socket::connect(socket).map_err(|source| StatusError::Unreachable {
        socket: socket.clone(),
        source: Box::new(source),
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(StatusError::Io)?;
    conn.send_msg(&control::encode(question), &[])
        .map_err(|e| StatusError::Io(std::io::Error::other(e)))?;
    let (bytes, _) = conn
        .recv_msg(0)
        .map_err(|e| StatusError::Io(std::io::Error::other(e)))?;
    Ok(control::decode_from_daemon(&bytes)?)
}

/// A query to the daemon failed.
#[derive(Debug, Error)]
pub enum StatusError {
    /// The daemon is not there.
    #[error("cannot reach shmeshd at {socket} (is `shmesh daemon` running?): {source}")]
    Unreachable {
        /// Its socket.
        socket: Address,
        /// Why.
        source: Box<shmesh::ConnectError>,
    },
    /// The exchange failed.
    #[error("status query failed: {0}")]
    Io(std::io::Error),
    /// The answer does not decode.
    #[error("unreadable status answer: {0}")]
    Malformed(#[from] control::ControlError),
    /// The daemon answered something else.
    #[error("the daemon answered with something else than was asked")]
    Unexpected,
}
