//! A replica's registration, for its life: checked (policy, load page, who
//! may serve), entered in the registry, then read until it ends; the
//! replica and its grants leave with it.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use shmesh::control::{self, Caller, FromDaemon, ToDaemon};
use shmesh::handshake::{self, Msg, ServerPolicy};
use shmesh::socket::Connection;

use crate::{State, lock};

/// A replica's registration, for its life.
pub(crate) fn replica_session(
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
    // The link is held from before the replica is listed until its answer
    // is out: a status scrape that finds it listed asks for its counters
    // on the same link, and the replica expects `Registered` first. (No
    // one locks the registry, then a link.)
    let mut sending = lock(&send);
    let id = lock(&state.registry).add_replica(process.clone(), policy, send.clone(), Some(load));
    // Relaxed: mediators only compare it with what they saw last.
    state.generation.fetch_add(1, Ordering::Relaxed);
    let registered = control::encode(&FromDaemon::Registered { replica: id });
    let answered = sending.send_msg(&registered, &[]).is_ok();
    drop(sending);
    if !answered || conn.set_read_timeout(None).is_err() {
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
