//! Handing connections over: the parts the daemon makes for each
//! connection (segment, doorbell, socket pair, Welcome), the direct path
//! (to a replica and its client), the mediated path (the daemon serves the
//! client and is itself a client of the replicas), and policy requests.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use shmesh::control::{self, Adoption, Caller, FromDaemon};
use shmesh::handshake::{
    self, FdRole, FdRoles, Hello, Msg, Refuse, RefuseReason, SchemaHash, ServerPolicy, Welcome,
};
use shmesh::layout;
use shmesh::socket::{Connection, HandedOver};
use thiserror::Error;

use crate::{Link, State, engine, lock, mediator};

/// Why a hand-over failed.
#[derive(Debug, Error)]
pub(crate) enum HandOver {
    /// The daemon could not make the connection's parts.
    #[error("{0}")]
    Setup(String),
    /// The replica could not be told.
    #[error("{0}")]
    Replica(String),
    /// The client could not be told.
    #[error("{0}")]
    Client(String),
}

/// A connection's parts, made by the daemon.
struct Parts {
    segment: Arc<shmesh_shm::segment::Segment>,
    bell: OwnedFd,
    server_end: UnixStream,
    client_end: UnixStream,
    /// The Welcome both sides get, in the handshake's encoding.
    welcome: Vec<u8>,
}

/// Creates connection `id`'s segment, doorbell and socket pair.
fn make_parts(
    protocol_version: u16,
    granted: &handshake::Limits,
    id: u64,
) -> Result<Parts, HandOver> {
    let setup = |e: &dyn std::fmt::Display| HandOver::Setup(e.to_string());
    // The segment number only names the memfd and tags handles; the
    // connection id's low bits keep it distinct among live connections.
    let segment = layout::create(id as u32, granted).map_err(|e| setup(&e))?;
    let bell = layout::client_bell_fd().map_err(|e| setup(&e))?;
    let (server_end, client_end) = UnixStream::pair().map_err(|e| setup(&e))?;
    let roles = FdRoles::new(vec![
        FdRole::Liveness,
        FdRole::Segment,
        FdRole::ClientDoorbell,
    ])
    .map_err(|e| setup(&e))?;
    let welcome = handshake::encode(&Msg::Welcome(Welcome {
        protocol_version,
        granted: granted.clone(),
        connection_id: id,
        fds: roles,
    }));
    Ok(Parts {
        segment,
        bell,
        server_end,
        client_end,
        welcome,
    })
}

/// Sends a replica its ends of a connection.
fn adopt(replica: &Link, parts: &Parts, caller: &Caller) -> Result<(), HandOver> {
    let message = control::encode(&FromDaemon::Adopt(Adoption {
        welcome: parts.welcome.clone(),
        caller: caller.clone(),
    }));
    let fds: [BorrowedFd<'_>; 3] = [
        parts.server_end.as_fd(),
        parts.segment.fd(),
        parts.bell.as_fd(),
    ];
    lock(replica)
        .send_msg(&message, &fds)
        .map_err(|e| HandOver::Replica(e.to_string()))
}

/// Sends a client its ends of a connection, with the Welcome.
fn welcome(client: &mut Connection, parts: &Parts) -> Result<(), HandOver> {
    let fds: [BorrowedFd<'_>; 3] = [
        parts.client_end.as_fd(),
        parts.segment.fd(),
        parts.bell.as_fd(),
    ];
    client
        .send_msg(&parts.welcome, &fds)
        .map_err(|e| HandOver::Client(e.to_string()))
}

/// The direct path: creates connection `id`'s parts, gives the replica its
/// ends, then the client its own. The daemon's copies go when this
/// returns: from then on only the two sides map the segment and hold the
/// socket pair.
pub(crate) fn hand_over(
    client: &mut Connection,
    hello: &Hello,
    granted: &handshake::Limits,
    id: u64,
    caller: &Caller,
    replica: &Link,
) -> Result<(), HandOver> {
    let parts = make_parts(hello.protocol_version, granted, id)?;
    adopt(replica, &parts, caller)?;
    welcome(client, &parts)
}

fn refuse_busy(conn: &mut Connection, message: String) {
    let refusal = Refuse::new(RefuseReason::Busy, message);
    let _ = conn.send_msg(&handshake::encode(&Msg::Refuse(refusal)), &[]);
}

/// The mediated path: the daemon serves the client itself (see
/// [`mediator`]).
/// The limits of a connection on the mediated path: its waits give the CPU
/// away between checks ([`handshake::WaitMode::Yield`]) unless they park at
/// once. Every call there runs three processes in turn (client, daemon,
/// replica); on a machine with fewer cores than spinning threads, a waiter
/// that spins first keeps the one with work from running (measured in
/// BENCHMARKS.md: 64 B mediated p50 5.4 → 4.x µs). Idle connections still
/// park after the spin budget.
fn relayed(limits: &handshake::Limits) -> handshake::Limits {
    let mut limits = limits.clone();
    if limits.wait_mode != handshake::WaitMode::Block {
        limits.wait_mode = handshake::WaitMode::Yield;
    }
    limits
}

pub(crate) fn mediate(
    mut conn: Connection,
    hello: &Hello,
    granted: &handshake::Limits,
    id: u64,
    caller: Caller,
    state: &Arc<State>,
) {
    let service = hello.service.as_str().to_owned();
    let granted = &relayed(granted);
    let mediator = match mediator_for(state, &service, hello.schema_hash) {
        Ok(mediator) => mediator,
        Err(e) => {
            tracing::error!(service, "cannot mediate: {e}");
            return refuse_busy(
                &mut conn,
                format!("the daemon cannot mediate {service}: {e}"),
            );
        }
    };
    let parts = match make_parts(hello.protocol_version, granted, id) {
        Ok(parts) => parts,
        Err(e) => return refuse_busy(&mut conn, e.to_string()),
    };
    let (server_end, bell) = match (parts.server_end.try_clone(), parts.bell.try_clone()) {
        (Ok(end), Ok(bell)) => (end, bell),
        (Err(e), _) | (_, Err(e)) => {
            return refuse_busy(&mut conn, format!("the daemon is out of fds: {e}"));
        }
    };
    mediator.add_caller(caller.clone());
    let handed = HandedOver {
        conn: Connection::from(server_end),
        connection_id: id,
        granted: granted.clone(),
        segment: parts.segment.clone(),
        client_bell: bell,
        peer: Some(shmesh::PeerCredentials {
            pid: caller.pid,
            uid: caller.uid,
            gid: caller.gid,
        }),
    };
    if let Err(e) = welcome(&mut conn, &parts) {
        tracing::info!(
            service,
            client = caller.pid,
            "client left during the hand-over: {e}"
        );
        return;
    }
    drop(parts);
    if mediator.server.serve_handed_over(handed).is_some() {
        lock(&state.registry).granted(&service);
        tracing::info!(
            service,
            connection = id,
            client = caller.pid,
            app = caller.app,
            "connection granted (mediated)"
        );
    }
}

/// The mediator of `service` for clients built from `schema`, made on
/// first use.
pub(crate) fn mediator_for(
    state: &Arc<State>,
    service: &str,
    schema: SchemaHash,
) -> Result<Arc<mediator::Mediator>, shmesh::server::ServerError> {
    let mut mediators = lock(&state.mediators);
    if let Some(m) = mediators.get(&(service.to_owned(), schema)) {
        return Ok(m.clone());
    }
    let weak = Arc::downgrade(state);
    let connect: Arc<mediator::ConnectUpstream> = Arc::new(move |service, schema, have| {
        let state = weak
            .upgrade()
            .ok_or_else(|| "the daemon is stopping".to_owned())?;
        Ok(connect_upstream(&state, service, schema, have))
    });
    let m = Arc::new(mediator::Mediator::new(
        service,
        schema,
        state.pipeline.clone(),
        state.generation.clone(),
        connect,
    )?);
    mediators.insert((service.to_owned(), schema), m.clone());
    Ok(m)
}

/// Connects the daemon, as a client, to every replica of `service` built
/// from `schema` it has no channel to yet.
fn connect_upstream(
    state: &Arc<State>,
    service: &str,
    schema: SchemaHash,
    have: &[u64],
) -> Vec<(u64, shmesh::client::Channel)> {
    let wanted: Vec<(u64, ServerPolicy, Link, u64)> = {
        let mut registry = lock(&state.registry);
        let replicas: Vec<(u64, ServerPolicy, Link)> = registry
            .services()
            .filter(|(name, _)| *name == service)
            .flat_map(|(_, s)| s.replicas.values())
            .filter(|r| r.policy.schema_hash == schema && !have.contains(&r.id))
            .map(|r| (r.id, r.policy.clone(), r.link.clone()))
            .collect();
        replicas
            .into_iter()
            .map(|(id, policy, link)| (id, policy, link, registry.next_connection()))
            .collect()
    };
    let mut channels = Vec::new();
    for (replica, policy, link, id) in wanted {
        let requested = relayed(&policy.max);
        let hello = Hello {
            protocol_version: handshake::PROTOCOL_VERSION,
            service: policy.service.clone(),
            schema_hash: schema,
            requested,
        };
        let granted = match handshake::negotiate(&hello, &policy) {
            Ok(granted) => granted,
            Err(refusal) => {
                tracing::warn!(
                    service,
                    replica,
                    "the replica refuses the daemon: {refusal}"
                );
                continue;
            }
        };
        // Recorded first, so the replica's `Closed` can never come before.
        lock(&state.registry).grant(replica, id, state.identity.clone());
        let connected = make_parts(hello.protocol_version, &granted, id).and_then(|parts| {
            adopt(&link, &parts, &state.identity)?;
            shmesh::client::Channel::from_handed_over(HandedOver {
                conn: Connection::from(parts.client_end),
                connection_id: id,
                granted,
                segment: parts.segment,
                client_bell: parts.bell,
                peer: None,
            })
            .map_err(|e| HandOver::Setup(e.to_string()))
        });
        match connected {
            Ok(channel) => channels.push((replica, channel)),
            Err(e) => {
                lock(&state.registry).close(replica, id);
                tracing::warn!(service, replica, "cannot connect to the replica: {e}");
            }
        }
    }
    channels
}

/// Carries out a policy request from `caller`: listing is open to all,
/// changes to root and the daemon's own user.
pub(crate) fn policy(
    state: &State,
    caller: &Caller,
    request: control::PolicyRequest,
) -> control::PolicyAnswer {
    use control::PolicyRequest;
    let own_uid = state.identity.uid;
    let allowed = caller.uid == 0 || caller.uid == own_uid;
    let parse = |spec: &str| engine::EngineSpec::parse(spec, "spec").map_err(|e| e.to_string());
    let result = match request {
        PolicyRequest::List => Ok(()),
        _ if !allowed => Err(format!(
            "uid {} may not change the pipeline (root or uid {own_uid} may)",
            caller.uid
        )),
        PolicyRequest::Add { spec, position } => parse(&spec).and_then(|spec| {
            let position = position.map(|p| p as usize);
            state
                .pipeline
                .add(spec, position)
                .map_err(|e| e.to_string())
        }),
        PolicyRequest::Remove { name } => state.pipeline.remove(&name).map_err(|e| e.to_string()),
        PolicyRequest::Upgrade { name, spec } => parse(&spec).and_then(|spec| {
            state
                .pipeline
                .upgrade(&name, spec)
                .map_err(|e| e.to_string())
        }),
    };
    match &result {
        Err(e) => tracing::warn!(uid = caller.uid, "policy request refused: {e}"),
        Ok(()) => tracing::info!(uid = caller.uid, "pipeline: {:?}", state.pipeline),
    }
    control::PolicyAnswer {
        error: result.err(),
        engines: engines(&state.pipeline),
    }
}

/// The pipeline, for status and policy answers.
pub(crate) fn engines(pipeline: &engine::Pipeline) -> Vec<control::EngineStatus> {
    pipeline
        .stages()
        .iter()
        .map(|stage| control::EngineStatus {
            name: stage.name.clone(),
            kind: stage.engine.kind().to_owned(),
            service: stage.spec.service().to_owned(),
            description: stage.engine.describe(),
        })
        .collect()
}
