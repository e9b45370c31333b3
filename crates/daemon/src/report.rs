//! What the daemon knows, for `shmesh status` and `/metrics`: the registry
//! plus the counters every replica publishes in its load page (read from
//! shared memory, no message, no cost per call); and the client side of the
//! queries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shmesh::Address;
use shmesh::control::{
    self, Caller, ConnectionStatus, FromDaemon, ReplicaStats, ReplicaStatus, ServiceStatus,
    StatusReport, ToDaemon,
};
use shmesh::handshake;
use thiserror::Error;

use crate::config::DataPath;
use shmesh_shm::load::LoadView;

use crate::{State, handover, lock, mediator};

/// A replica's counters, as it last published them in its load page
/// (refreshed every 10 ms while they change). `None`, logged, when the page
/// holds nothing readable: the replica's to write, so never trusted.
fn published_counters(replica: u64, load: Option<&LoadView>) -> Option<ReplicaStats> {
    let bytes: Vec<u8> = match load?.read_report() {
        Ok(bytes) => bytes?,
        Err(e) => {
            tracing::warn!(replica, "cannot read the replica's counters: {e}");
            return None;
        }
    };
    control::decode_report(&bytes)
        .inspect_err(|e| tracing::warn!(replica, "the replica's counters are unreadable: {e}"))
        .ok()
}

/// Everything the daemon knows, with the counters the replicas publish.
pub(crate) fn report(state: &State) -> StatusReport {
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
                        app: crate::app_name(c.peer.pid),
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
                    stats: published_counters(r.id, r.load.as_deref()),
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
