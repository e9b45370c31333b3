//! Answering clients: a Hello (or a `ConnectTo` naming the replica a
//! balancing client chose) is checked against the access rules, matched with
//! a replica and handed over; a `Resolve` gets the table of replicas and
//! their load pages.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use shmesh::control::{self, Caller};
use shmesh::handshake::{self, Msg, Refuse, RefuseReason};
use shmesh::socket::Connection;

use crate::config::{Action, DataPath};
use crate::handover::{self, HandOver};
use crate::registry::Pick;
use crate::{State, lock};

/// The replicas of `service` and their load pages, for a balancing
/// client.
pub(crate) fn resolve(
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
pub(crate) fn broker(
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
