//! What the daemon knows, for `shmesh status` and `/metrics`: the registry
//! plus fresh counters asked of every replica; and the client side of the
//! queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use shmesh::Address;
use shmesh::control::{
    self, Caller, ConnectionStatus, FromDaemon, ReplicaStats, ReplicaStatus, ServiceStatus,
    StatusReport, ToDaemon,
};
use shmesh::handshake;
use thiserror::Error;

use crate::config::DataPath;
use crate::{Link, State, handover, lock, mediator};

/// How long a status query or a scrape waits for the replicas' counters.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);

/// Counter requests in flight to replicas, and their answers.
#[derive(Default)]
pub(crate) struct Scrapes {
    next: AtomicU64,
    answers: Mutex<HashMap<u64, HashMap<u64, ReplicaStats>>>,
    arrived: Condvar,
}

impl Scrapes {
    pub(crate) fn deliver(&self, request: u64, replica: u64, stats: ReplicaStats) {
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
