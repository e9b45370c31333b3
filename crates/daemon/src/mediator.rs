//! The mediated path: a service's calls pass through the daemon, which runs
//! the engine pipeline on each and forwards it to a replica.
//!
//! ```text
//! client ══ rings ══▶ shmeshd: Server::detached (one thread per client)
//!                       │  pipeline.admit(call)  (access, rate limit, QoS …)
//!                       │  Channel to the least busy replica ══ rings ══▶ replica
//!                       ◀─ answer copied into the client's reply slab
//! ```
//!
//! The daemon serves the client's side exactly as a replica would (the
//! connection is handed over to a detached [`Server`] whose router forwards
//! every method), and is itself a client of each replica, over connections
//! it brokers to itself like any other. Unary calls are forwarded on the
//! client's connection thread ([`Router::fallback_in_place`]); streams of
//! every kind on a worker, pumped both ways (`stream.rs`,
//! [`Router::fallback_stream`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use shmesh::Metadata;
use shmesh::client::Channel;
use shmesh::control::Caller;
use shmesh::handshake::SchemaHash;
use shmesh::server::{Reply, Request, Router, Server, ServerError};
use shmesh::status::{Code, Status};

use crate::engine::{CallInfo, Pipeline};

mod stream;

/// How long a forwarded call may take when the caller set no deadline.
const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects the daemon to a replica of a service: the replica's id and a
/// channel to it.
pub(crate) type ConnectUpstream =
    dyn Fn(&str, SchemaHash, &[u64]) -> Result<Vec<(u64, Channel)>, String> + Send + Sync;

/// One mediated service (for one schema).
pub(crate) struct Mediator {
    /// Serves the clients' side.
    pub server: Server,
    forwarder: Arc<Forwarder>,
}

/// What the forwarding handler needs.
struct Forwarder {
    service: String,
    schema: SchemaHash,
    pipeline: Arc<Pipeline>,
    /// Channels to replicas, by replica id.
    upstream: RwLock<Vec<(u64, Channel)>>,
    /// The registry generation `upstream` was last checked against.
    seen: AtomicU64,
    /// Bumped by the registry whenever replicas come or go.
    generation: Arc<AtomicU64>,
    connect: Arc<ConnectUpstream>,
    /// Serialises reconnecting.
    refresh: Mutex<()>,
    /// Clients by pid, as the daemon identified them.
    callers: RwLock<HashMap<i32, Arc<Caller>>>,
}

impl Mediator {
    /// A mediator for `service` built from `schema`.
    pub fn new(
        service: &str,
        schema: SchemaHash,
        pipeline: Arc<Pipeline>,
        generation: Arc<AtomicU64>,
        connect: Arc<ConnectUpstream>,
    ) -> Result<Mediator, ServerError> {
        let forwarder = Arc::new(Forwarder {
            service: service.to_owned(),
            schema,
            pipeline,
            upstream: RwLock::new(Vec::new()),
            // Never equal to a real generation: the first call connects.
            seen: AtomicU64::new(u64::MAX),
            generation,
            connect,
            refresh: Mutex::new(()),
            callers: RwLock::new(HashMap::new()),
        });
        let handler = forwarder.clone();
        let streams = forwarder.clone();
        let router = Router::new()
            .fallback_in_place(move |request, reply| handler.forward(request, reply))
            .fallback_stream(move |call| streams.forward_stream(call));
        let server = Server::detached(service, schema, router)?;
        Ok(Mediator { server, forwarder })
    }

    /// Remembers who a client is, for the engines.
    pub fn add_caller(&self, caller: Caller) {
        let mut callers = write(&self.forwarder.callers);
        if callers.len() >= 4096 {
            // Keep the map bounded: forget clients whose connections ended.
            let live: Vec<i32> = self
                .server
                .stats()
                .snapshot()
                .connections
                .iter()
                .map(|c| c.peer.pid)
                .collect();
            callers.retain(|pid, _| live.contains(pid));
        }
        callers.insert(caller.pid, Arc::new(caller));
    }
}

/// The metadata a call goes upstream with: the caller's, with the
/// engines' annotations set over it (no copy when there are none).
fn forwarded<'a>(call: &CallInfo<'a>) -> Cow<'a, Metadata> {
    if call.annotations.is_empty() {
        return Cow::Borrowed(call.metadata);
    }
    let mut metadata = call.metadata.clone();
    for (key, value) in &call.annotations {
        if let Err(e) = metadata.insert(key, value) {
            tracing::debug!(key, "an engine's annotation is not forwarded: {e}");
        }
    }
    Cow::Owned(metadata)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl Forwarder {
    /// Who a client is, as the daemon identified it when it connected (its
    /// credentials alone if the daemon never saw it).
    fn caller(&self, peer: shmesh::PeerCredentials) -> Arc<Caller> {
        read(&self.callers)
            .get(&peer.pid)
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(Caller {
                    pid: peer.pid,
                    uid: peer.uid,
                    gid: peer.gid,
                    app: String::new(),
                })
            })
    }

    fn forward(&self, request: &Request<'_>, reply: &mut Reply<'_>) -> Result<(), Status> {
        let now = Instant::now();
        let caller = self.caller(request.peer);
        let mut call = CallInfo {
            caller: &caller,
            service: &self.service,
            method: request.method,
            size: request.payload.len(),
            deadline: request.remaining.map(|r| now + r),
            metadata: request.metadata(),
            annotations: Vec::new(),
        };
        let admitted = self.pipeline.admit(&mut call)?;
        let result = self.call_upstream(&call, request.payload);
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        admitted.done(&call, code);
        let answer = result?;
        let buf = reply.loan(answer.len())?;
        buf.copy_from_slice(&answer);
        Ok(())
    }

    fn call_upstream(
        &self,
        call: &CallInfo<'_>,
        payload: &[u8],
    ) -> Result<shmesh::client::Response, Status> {
        let timeout = match call.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Status::deadline_exceeded(
                        "deadline passed in the daemon's engines",
                    ));
                }
                left
            }
            None => DEFAULT_FORWARD_TIMEOUT,
        };
        let channel = self.pick()?;
        channel.call_with(call.method, payload, &forwarded(call), Some(timeout))
    }

    /// The live channel with the fewest calls in flight, connecting to
    /// replicas first when they changed or none is live: in the common case
    /// one relaxed load and one read lock per call.
    fn pick(&self) -> Result<Channel, Status> {
        // Relaxed: a stale generation only delays a refresh by one call.
        let generation = self.generation.load(Ordering::Relaxed);
        if self.seen.load(Ordering::Relaxed) == generation
            && let Some(channel) = self.least_busy()
        {
            return Ok(channel);
        }
        self.refresh(generation)?;
        self.least_busy().ok_or_else(|| {
            Status::unavailable(format!("no live replica of {} to forward to", self.service))
        })
    }

    /// The live channel with the fewest calls in flight (one read lock).
    fn least_busy(&self) -> Option<Channel> {
        read(&self.upstream)
            .iter()
            .filter(|(_, c)| !c.is_dead())
            .min_by_key(|(_, c)| c.calls_in_flight())
            .map(|(_, c)| c.clone())
    }

    fn refresh(&self, generation: u64) -> Result<(), Status> {
        let _one = self.refresh.lock().unwrap_or_else(|e| e.into_inner());
        // Another caller may have refreshed while this one waited.
        if self.seen.load(Ordering::Relaxed) == generation && self.least_busy().is_some() {
            return Ok(());
        }
        let mut upstream = write(&self.upstream);
        upstream.retain(|(_, c)| !c.is_dead());
        let have: Vec<u64> = upstream.iter().map(|(id, _)| *id).collect();
        match (self.connect)(&self.service, self.schema, &have) {
            Ok(new) => upstream.extend(new),
            Err(e) => tracing::warn!(service = self.service, "cannot reach replicas: {e}"),
        }
        self.seen.store(generation, Ordering::Relaxed);
        if upstream.is_empty() {
            return Err(Status::unavailable(format!(
                "no replica of {} is registered",
                self.service
            )));
        }
        Ok(())
    }
}
