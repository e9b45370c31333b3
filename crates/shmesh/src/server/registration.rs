//! Serving through the host daemon (`shm+svc://NAME`): the replica
//! registers, then adopts the connections the daemon hands over.
//!
//! The registration connection stays open: it is how the daemon learns of
//! this replica's death, how it hands over connections ([`FromDaemon::Adopt`]
//! with the liveness socket, the segment and the client's doorbell),
//! revokes them and asks for counters. If the daemon goes away, the
//! connections it handed over go on (they never touch it) and
//! [`Server::serve`](super::Server::serve) registers again, with backoff,
//! until the daemon is back or the server shuts down.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustc_hash::FxHashMap as HashMap;
use shmesh_shm::segment::Segment;
use thiserror::Error;

use crate::addr::Address;
use crate::control::{self, Adoption, ControlError, FromDaemon, Registration, ToDaemon};
use crate::handshake::{self, FdRole, Hello, Msg, PROTOCOL_VERSION, ServerPolicy};
use crate::server::dispatch::Established;
use crate::socket::{self, ConnectError, Connection, PeerCredentials, RecvError, SendError};

/// How long the daemon may take to answer a registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Registering with the host daemon failed.
#[derive(Debug, Error)]
pub enum RegisterError {
    /// The daemon's socket is not configured right.
    #[error(transparent)]
    DaemonSocket(#[from] crate::endpoint::DaemonSocketError),
    /// The daemon could not be reached (is `shmesh daemon` running?).
    #[error("cannot reach the host daemon at {daemon}: {source}")]
    Unreachable {
        /// Its socket.
        daemon: Address,
        /// Why.
        source: Box<ConnectError>,
    },
    /// The registration could not be sent.
    #[error("cannot register with the host daemon: {0}")]
    Send(#[from] SendError),
    /// The daemon's answer did not arrive.
    #[error("no answer from the host daemon: {0}")]
    Recv(#[from] RecvError),
    /// The daemon's answer does not decode.
    #[error("the host daemon's answer is unreadable: {0}")]
    Malformed(#[from] ControlError),
    /// The daemon answered something else than a registration's answer.
    #[error("the host daemon answered a registration with {0}")]
    Unexpected(&'static str),
    /// The daemon refused the registration.
    #[error("the host daemon refused the registration: {0}")]
    Refused(String),
    /// A socket option could not be set.
    #[error("cannot set up the registration socket: {0}")]
    Socket(std::io::Error),
    /// The page this replica publishes its load in could not be made.
    #[error(transparent)]
    Load(#[from] shmesh_shm::load::LoadError),
}

/// A connection the daemon handed over that cannot be served.
#[derive(Debug, Error)]
pub(crate) enum AdoptError {
    #[error("its Welcome does not decode: {0}")]
    Welcome(String),
    #[error("it carries {fds} fds for {roles} roles")]
    FdCount { fds: usize, roles: usize },
    #[error("it lacks its {0}")]
    Missing(&'static str),
    #[error("its segment: {0}")]
    Segment(#[from] shmesh_shm::segment::OpenError),
    #[error("it was granted more than this server allows")]
    Grant,
}

/// Where a registered server gets its connections.
pub(crate) struct DaemonSource {
    pub daemon: Address,
    registration: Registration,
    /// The registration connection in use, so shutdown can close it.
    pub current: Arc<Mutex<Option<OwnedFd>>>,
    /// The liveness socket of each adopted connection, to revoke it.
    pub live: Arc<Mutex<HashMap<u64, OwnedFd>>>,
    /// Where this replica publishes its load; the daemon hands it to
    /// clients, read-only.
    pub load: Arc<shmesh_shm::load::LoadPage>,
}

/// One registration: read messages on `recv`, answer on `send`.
pub(crate) struct Session {
    pub recv: Connection,
    pub send: Arc<Mutex<Connection>>,
    pub replica: u64,
}

impl DaemonSource {
    /// A source registering `policy` with the daemon at `daemon`.
    pub fn new(daemon: Address, policy: &ServerPolicy, app: String) -> Result<Self, RegisterError> {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            service: policy.service.clone(),
            schema_hash: policy.schema_hash,
            requested: policy.max.clone(),
        };
        Ok(DaemonSource {
            daemon,
            registration: Registration {
                app,
                policy: handshake::encode(&Msg::Hello(hello)),
            },
            current: Arc::new(Mutex::new(None)),
            live: Arc::new(Mutex::new(HashMap::default())),
            load: Arc::new(shmesh_shm::load::LoadPage::create()?),
        })
    }

    /// Registers (again); the policy's limits may have changed since.
    pub fn register(&self, policy: &ServerPolicy) -> Result<Session, RegisterError> {
        let mut conn =
            socket::connect(&self.daemon).map_err(|source| RegisterError::Unreachable {
                daemon: self.daemon.clone(),
                source: Box::new(source),
            })?;
        conn.set_read_timeout(Some(REGISTER_TIMEOUT))
            .map_err(RegisterError::Socket)?;
        let mut registration = self.registration.clone();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            service: policy.service.clone(),
            schema_hash: policy.schema_hash,
            requested: policy.max.clone(),
        };
        registration.policy = handshake::encode(&Msg::Hello(hello));
        conn.send_msg(
            &control::encode(&ToDaemon::Register(registration)),
            &[self.load.fd()],
        )?;
        let (bytes, _) = conn.recv_msg(0)?;
        let replica = match control::decode_from_daemon(&bytes)? {
            FromDaemon::Registered { replica } => replica,
            FromDaemon::Refused { message } => return Err(RegisterError::Refused(message)),
            other => return Err(RegisterError::Unexpected(kind(&other))),
        };
        conn.set_read_timeout(None).map_err(RegisterError::Socket)?;
        let fd = conn
            .as_fd()
            .try_clone_to_owned()
            .map_err(RegisterError::Socket)?;
        let send = Connection::from(UnixStream::from(
            fd.try_clone().map_err(RegisterError::Socket)?,
        ));
        *crate::client::lock(&self.current) = Some(fd);
        Ok(Session {
            recv: conn,
            send: Arc::new(Mutex::new(send)),
            replica,
        })
    }

    /// Closes the registration connection, which ends a blocked read.
    pub fn close(current: &Mutex<Option<OwnedFd>>) {
        if let Some(fd) = crate::client::lock(current).as_ref() {
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
        }
    }

    /// Closes an adopted connection's liveness socket: its connection ends
    /// as if the client had gone.
    pub fn revoke(&self, connection: u64) -> bool {
        match crate::client::lock(&self.live).get(&connection) {
            Some(fd) => {
                let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
                true
            }
            None => false,
        }
    }

    /// Turns an adoption and its fds into a connection to serve.
    pub fn adopt(
        &self,
        adoption: &Adoption,
        fds: Vec<OwnedFd>,
        max: &handshake::Limits,
    ) -> Result<Established, AdoptError> {
        let welcome = match handshake::decode(&adoption.welcome) {
            Ok(Msg::Welcome(welcome)) => welcome,
            Ok(other) => return Err(AdoptError::Welcome(format!("a {}", other.kind()))),
            Err(e) => return Err(AdoptError::Welcome(e.to_string())),
        };
        if fds.len() != welcome.fds.len() {
            return Err(AdoptError::FdCount {
                fds: fds.len(),
                roles: welcome.fds.len(),
            });
        }
        handshake::check_grant(max, &welcome.granted).map_err(|_| AdoptError::Grant)?;
        let (mut liveness, mut segment, mut bell) = (None, None, None);
        for (role, fd) in welcome.fds.iter().zip(fds) {
            match role {
                FdRole::Liveness => liveness = Some(fd),
                FdRole::Segment => segment = Some(fd),
                FdRole::ClientDoorbell => bell = Some(fd),
                FdRole::ServerDoorbell => {}
            }
        }
        let liveness = liveness.ok_or(AdoptError::Missing("liveness socket"))?;
        let segment = Segment::open(segment.ok_or(AdoptError::Missing("segment"))?)?;
        let client_bell = bell.ok_or(AdoptError::Missing("client doorbell"))?;
        if let Ok(copy) = liveness.try_clone() {
            crate::client::lock(&self.live).insert(welcome.connection_id, copy);
        }
        let caller = &adoption.caller;
        Ok(Established {
            conn: Connection::from(UnixStream::from(liveness)),
            id: welcome.connection_id,
            granted: welcome.granted,
            segment,
            client_bell,
            peer: PeerCredentials {
                pid: caller.pid,
                uid: caller.uid,
                gid: caller.gid,
            },
        })
    }
}

/// A message's name, for errors.
pub(crate) fn kind(m: &FromDaemon) -> &'static str {
    match m {
        FromDaemon::Registered { .. } => "Registered",
        FromDaemon::Refused { .. } => "Refused",
        FromDaemon::Adopt(_) => "Adopt",
        FromDaemon::Revoke { .. } => "Revoke",
        FromDaemon::Status(_) => "Status",
        FromDaemon::Policy(_) => "Policy",
        FromDaemon::Replicas(_) => "Replicas",
    }
}
