//! The control protocol between processes and the host daemon `shmeshd`,
//! sans IO: message types and their codec.
//!
//! The daemon's socket carries two protocols, told apart by their first
//! four bytes: a client's connection starts with the ordinary
//! [`handshake`](crate::handshake) (`"SHMH"`), and the daemon answers it as
//! a server would, brokering the connection to a replica; a replica's
//! registration or a status query starts with a control message (`"SHMC"`).
//!
//! ```text
//! replica                               shmeshd                           client
//!   │── Register(app, policy as Hello) ──▶│                                   │
//!   │◀─ Registered(replica id) ───────────│◀── Hello(service, schema) ────────│
//!   │                                     │ access rules, pick a replica,     │
//!   │                                     │ negotiate, create the segment     │
//!   │◀─ Adopt(Welcome, caller) + fds ─────│── Welcome + fds ─────────────────▶│
//!   │    (liveness, segment, bell)        │   (segment, bell, liveness)       │
//!   │═══════════ calls over shared memory, liveness over the socket pair ════│
//!   │── Closed(connection) ──────────────▶│                                   │
//!   │══ counters in its load page ═══════▶│  (metrics, `shmesh status`)       │
//! ```
//!
//! A replica's registration connection stays open for the replica's life:
//! the daemon learns of its death when it closes, and the replica of the
//! daemon's (it then registers again when the daemon is back; its
//! connections, which never touch the daemon, go on meanwhile).
//!
//! # Wire format
//!
//! One message per [`socket`](crate::socket) frame: the magic `"SHMC"`, the
//! control version ([`VERSION`], `u16` little-endian), then the message in
//! [postcard](https://docs.rs/postcard)'s encoding of the serde types
//! below, and nothing after it. The handshake messages a control message
//! carries (the replica's policy, the Welcome of an adopted connection) are
//! in the handshake's own canonical encoding, checked by its decoder.
//! [`decode_to_daemon`] and [`decode_from_daemon`] never panic on any input
//! (fuzzed by `fuzz/fuzz_targets/control.rs`).
//!
//! # Example
//!
//! ```
//! use shmesh::control::{self, FromDaemon, ToDaemon};
//!
//! let bytes = control::encode(&ToDaemon::Closed { connection: 7 });
//! assert_eq!(&bytes[..4], b"SHMC");
//! assert_eq!(control::decode_to_daemon(&bytes).unwrap(), ToDaemon::Closed { connection: 7 });
//! assert!(control::decode_from_daemon(&bytes[..5]).is_err());
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The first four bytes of every control message.
pub const MAGIC: [u8; 4] = *b"SHMC";

/// The version of this control protocol.
pub const VERSION: u16 = 2;

/// Bytes before the message: magic and version.
const HEADER_LEN: usize = 6;

/// A message a process sends the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDaemon {
    /// The first message of a replica: serve a service through the daemon.
    /// One fd rides with it: the replica's load page
    /// (`shmesh_shm::load`), sealed so that others can only read it.
    Register(Registration),
    /// A connection the daemon handed over has ended.
    Closed {
        /// The connection's id, from its Welcome.
        connection: u64,
    },
    /// The first and only message of a status query: answered by
    /// [`FromDaemon::Status`], then the daemon closes the connection.
    Status,
    /// The first and only message of a client that balances its calls
    /// itself: answered by [`FromDaemon::Replicas`] with the service's
    /// replicas and their load pages.
    Resolve {
        /// The service.
        service: String,
    },
    /// The first message of a client connecting to one replica it chose:
    /// answered like a handshake (a Welcome with its fds, or a Refuse).
    ConnectTo {
        /// The replica's id, from [`FromDaemon::Replicas`].
        replica: u64,
        /// The client's Hello, in the handshake's encoding.
        hello: Vec<u8>,
    },
    /// The first and only message of a change to (or a listing of) the
    /// engine pipeline: answered by [`FromDaemon::Policy`]. Changes are
    /// accepted from root and from the daemon's own user only.
    Policy(PolicyRequest),
}

/// What to do to the engine pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyRequest {
    /// List the engines.
    List,
    /// Add the engine the TOML spec describes, at `position` (the end if
    /// `None`).
    Add {
        /// The engine's spec (TOML).
        spec: String,
        /// Where it goes.
        position: Option<u32>,
    },
    /// Remove an engine; the calls it holds go on downstream.
    Remove {
        /// Its name.
        name: String,
    },
    /// Replace an engine by the one the spec describes, carrying its state
    /// over; the calls it holds enter the new one.
    Upgrade {
        /// The engine's name.
        name: String,
        /// The new engine's spec (TOML).
        spec: String,
    },
}

/// The answer to a [`PolicyRequest`]: the pipeline after it, or why not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyAnswer {
    /// Why the request was not carried out, if it was not.
    pub error: Option<String>,
    /// The engines, in order.
    pub engines: Vec<EngineStatus>,
}

/// One engine of the pipeline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// The service it applies to, or `*`.
    pub service: String,
    /// What it does and has done.
    pub description: String,
}

/// A replica's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// A name for the program, for status and metrics (its `comm` if empty).
    pub app: String,
    /// What the replica serves and the most it grants, as a handshake
    /// `Hello` in its canonical encoding: `service`, `schema_hash`, and in
    /// `requested` the replica's maximum limits.
    pub policy: Vec<u8>,
}

/// A message the daemon sends a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDaemon {
    /// The registration was accepted.
    Registered {
        /// The replica's id, unique for the daemon's life.
        replica: u64,
    },
    /// The registration was refused; the daemon closes the connection.
    Refused {
        /// Why, for humans.
        message: String,
    },
    /// A client connection for the replica to serve. Three fds ride with
    /// it, in the order the Welcome's roles give: the liveness socket, the
    /// segment and the client's doorbell.
    Adopt(Adoption),
    /// Close this connection: its grant was revoked.
    Revoke {
        /// The connection's id.
        connection: u64,
    },
    /// The answer to [`ToDaemon::Status`].
    Status(StatusReport),
    /// The answer to [`ToDaemon::Policy`].
    Policy(PolicyAnswer),
    /// The answer to [`ToDaemon::Resolve`]: one load page fd rides with it
    /// per replica, in the same order (at most [`MAX_TABLE`]).
    Replicas(Vec<TableEntry>),
}

/// The most replicas one [`FromDaemon::Replicas`] lists (fds per message
/// are bounded by the kernel).
pub const MAX_TABLE: usize = 250;

/// A replica in a [`FromDaemon::Replicas`] table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Its id.
    pub replica: u64,
    /// The schema it was built from.
    pub schema: [u8; 32],
}

/// A client connection handed to a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// The Welcome the client received, in the handshake's encoding: the
    /// connection id, the granted limits and the roles of the fds attached
    /// to this message.
    pub welcome: Vec<u8>,
    /// Who the client is, as the daemon saw it (`SO_PEERCRED`).
    pub caller: Caller,
}

/// A process, as the daemon identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// Process id, in the daemon's pid namespace.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// The program's name (`/proc/PID/comm`, or what it registered as).
    pub app: String,
}

/// A replica's counters, as [`crate::stats::StatsSnapshot`] has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStats {
    /// Per method, in method order.
    pub methods: Vec<MethodStats>,
    /// Connections served since start.
    pub connections_total: u64,
}

/// One method's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodStats {
    /// The method id.
    pub method: u32,
    /// Calls answered.
    pub calls: u64,
    /// Calls per status code (gRPC numbering), only the codes seen.
    pub by_code: Vec<(u8, u64)>,
    /// Latency buckets: bucket `i` counts calls shorter than 2^i ns, the
    /// last everything slower ([`crate::stats::LATENCY_BUCKETS`]).
    pub latency: Vec<u64>,
}

/// What the daemon knows, for `shmesh status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon's process id.
    pub pid: i32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Where `/metrics` is served, if it is.
    pub metrics: Option<String>,
    /// Services with at least one replica, by name.
    pub services: Vec<ServiceStatus>,
    /// The engine pipeline of mediated calls.
    pub engines: Vec<EngineStatus>,
}

/// A service and its replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service's name.
    pub name: String,
    /// Its schema hash.
    pub schema: [u8; 32],
    /// Connections granted since the daemon started.
    pub grants_total: u64,
    /// Connections refused since the daemon started (denied, no replica,
    /// schema or limits).
    pub refusals_total: u64,
    /// Its replicas, by id.
    pub replicas: Vec<ReplicaStatus>,
    /// `direct` or `mediated`.
    pub path: String,
    /// Clients connected to the daemon on the mediated path.
    pub mediated_clients: Vec<ConnectionStatus>,
    /// Calls on the mediated path as the daemon measured them (forwarding
    /// included), from its metrics engines.
    pub mediated: Vec<MethodStats>,
}

/// A replica and its connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The replica's id.
    pub id: u64,
    /// The process serving it.
    pub process: Option<Caller>,
    /// Its live connections.
    pub connections: Vec<ConnectionStatus>,
    /// Its counters, if it answered in time.
    pub stats: Option<ReplicaStats>,
}

/// A connection the daemon granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// The connection's id.
    pub id: u64,
    /// The client.
    pub caller: Caller,
    /// Seconds since it was granted.
    pub age_secs: u64,
}

/// A control message that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ControlError {
    /// Shorter than the magic and version.
    #[error("control message of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// Not a control message.
    #[error("not a shmesh control message (magic {found:02x?})")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A control version this build does not speak.
    #[error("control protocol version {found}; this build speaks {VERSION}")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// The body does not decode.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// Bytes follow the message.
    #[error("{extra} bytes after the control message")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

/// Whether `bytes` starts like a control message (rather than a handshake).
pub fn is_control(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// Encodes a message, header included.
pub fn encode<M: Serialize>(message: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    // Writing serde types of plain data into a Vec cannot fail; should
    // postcard ever disagree, the receiver gets an empty (malformed) body
    // rather than this process a panic.
    match postcard::to_extend(message, out) {
        Ok(out) => out,
        Err(_) => {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&VERSION.to_le_bytes());
            out
        }
    }
}

fn decode<'a, M: Deserialize<'a>>(bytes: &'a [u8]) -> Result<M, ControlError> {
    if bytes.len() < HEADER_LEN {
        return Err(ControlError::Truncated { len: bytes.len() });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(ControlError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(ControlError::UnsupportedVersion { found: version });
    }
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| ControlError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ControlError::TrailingBytes { extra: rest.len() });
    }
    Ok(message)
}

/// Decodes a message sent to the daemon.
pub fn decode_to_daemon(bytes: &[u8]) -> Result<ToDaemon, ControlError> {
    decode(bytes)
}

/// Decodes a message sent by the daemon.
pub fn decode_from_daemon(bytes: &[u8]) -> Result<FromDaemon, ControlError> {
    decode(bytes)
}

/// Encodes a replica's counters for its load page's report
/// (`shmesh_shm::load::LoadPage::publish_report`): the same framing as a
/// message.
pub fn encode_report(stats: &ReplicaStats) -> Vec<u8> {
    encode(stats)
}

/// Decodes the counters a replica published in its load page, and checks
/// they could be ours: at most [`crate::stats::LATENCY_BUCKETS`] latency
/// buckets and known status codes. The page is the replica's to write:
/// anything else is refused, never rendered.
pub fn decode_report(bytes: &[u8]) -> Result<ReplicaStats, ControlError> {
    let stats: ReplicaStats = decode(bytes)?;
    for m in &stats.methods {
        if m.latency.len() > crate::stats::LATENCY_BUCKETS {
            return Err(ControlError::Malformed(format!(
                "method {}: {} latency buckets, at most {}",
                m.method,
                m.latency.len(),
                crate::stats::LATENCY_BUCKETS
            )));
        }
        if let Some((code, _)) = m
            .by_code
            .iter()
            .find(|(c, _)| crate::status::Code::from_u32(u32::from(*c)).is_none())
        {
            return Err(ControlError::Malformed(format!(
                "method {}: unknown status code {code}",
                m.method
            )));
        }
    }
    Ok(stats)
}

impl From<&crate::stats::StatsSnapshot> for ReplicaStats {
    fn from(s: &crate::stats::StatsSnapshot) -> Self {
        ReplicaStats {
            methods: s
                .methods
                .iter()
                .map(|(&method, m)| MethodStats {
                    method,
                    calls: m.calls,
                    by_code: m.by_code.iter().map(|(&c, &n)| (c as u8, n)).collect(),
                    latency: m.latency.to_vec(),
                })
                .collect(),
            connections_total: s.connections_total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_foreign_ones_are_refused() {
        let mut stats = ReplicaStats {
            methods: vec![MethodStats {
                method: 1,
                calls: 2,
                by_code: vec![(0, 2)],
                latency: vec![0; crate::stats::LATENCY_BUCKETS],
            }],
            connections_total: 3,
        };
        assert_eq!(decode_report(&encode_report(&stats)).unwrap(), stats);
        stats.methods[0].by_code.push((17, 1));
        assert!(decode_report(&encode_report(&stats)).is_err());
        stats.methods[0].by_code.pop();
        stats.methods[0].latency.push(1);
        assert!(decode_report(&encode_report(&stats)).is_err());
        assert!(decode_report(b"SHMC").is_err());
    }

    #[test]
    fn every_message_round_trips() {
        let caller = Caller {
            pid: 1,
            uid: 2,
            gid: 3,
            app: "app".into(),
        };
        let to = [
            ToDaemon::Register(Registration {
                app: "a".into(),
                policy: vec![1, 2, 3],
            }),
            ToDaemon::Closed { connection: 9 },
            ToDaemon::Status,
            ToDaemon::Policy(PolicyRequest::Upgrade {
                name: "limit".into(),
                spec: "kind = \"qos\"".into(),
            }),
            ToDaemon::Policy(PolicyRequest::Add {
                spec: String::new(),
                position: Some(0),
            }),
        ];
        for m in to {
            assert_eq!(decode_to_daemon(&encode(&m)).unwrap(), m);
        }
        let from = [
            FromDaemon::Registered { replica: 1 },
            FromDaemon::Refused {
                message: "no".into(),
            },
            FromDaemon::Adopt(Adoption {
                welcome: vec![9; 20],
                caller: caller.clone(),
            }),
            FromDaemon::Revoke { connection: 2 },
            FromDaemon::Policy(PolicyAnswer {
                error: Some("no".into()),
                engines: vec![EngineStatus {
                    name: "limit".into(),
                    kind: "rate-limit".into(),
                    service: "*".into(),
                    description: "1 calls/s".into(),
                }],
            }),
            FromDaemon::Status(StatusReport {
                pid: 1,
                uptime_secs: 2,
                metrics: Some("127.0.0.1:9464".into()),
                engines: Vec::new(),
                services: vec![ServiceStatus {
                    name: "echo".into(),
                    replicas: vec![ReplicaStatus {
                        id: 1,
                        process: Some(caller.clone()),
                        connections: vec![ConnectionStatus {
                            id: 3,
                            caller,
                            age_secs: 4,
                        }],
                        stats: None,
                    }],
                    ..ServiceStatus::default()
                }],
            }),
        ];
        for m in from {
            assert_eq!(decode_from_daemon(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn bad_headers_and_trailing_bytes_are_errors() {
        let good = encode(&ToDaemon::Status);
        assert!(matches!(
            decode_to_daemon(&good[..3]),
            Err(ControlError::Truncated { len: 3 })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_to_daemon(&bad),
            Err(ControlError::BadMagic { .. })
        ));
        let mut bad = good.clone();
        bad[4] = 9;
        assert!(matches!(
            decode_to_daemon(&bad),
            Err(ControlError::UnsupportedVersion { found: 9 })
        ));
        let mut bad = good.clone();
        bad.push(0);
        assert!(matches!(
            decode_to_daemon(&bad),
            Err(ControlError::TrailingBytes { extra: 1 })
        ));
        let mut bad = good;
        bad.truncate(HEADER_LEN);
        bad.push(200);
        assert!(matches!(
            decode_to_daemon(&bad),
            Err(ControlError::Malformed(_))
        ));
    }
}
