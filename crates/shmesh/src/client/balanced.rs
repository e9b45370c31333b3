//! Load balancing in the client: a channel to every replica of a service
//! registered with the host daemon, each call sent to the less loaded of
//! two replicas drawn at random (power of two choices).
//!
//! The daemon hands the client each replica's load page (calls in flight,
//! connections; see `shmesh_shm::load`), read-only; picking reads them and
//! asks no one. Connections to replicas are made on first use, through the
//! daemon (which checks its access rules as for any connection).
//!
//! When a replica dies its channel dies: the calls in flight on it fail with
//! `Unavailable` (they are never resent: the replica may have run them) and
//! later calls go to the others. The table is fetched again when every
//! replica in it has failed, and otherwise every second, so replicas that
//! join are used too.
//!
//! ```no_run
//! use std::time::Duration;
//! use shmesh::client::{BalancedChannel, ChannelOptions};
//!
//! let options = ChannelOptions::new("echo", shmesh::SchemaHash([0; 32]));
//! let channel = BalancedChannel::connect("shm+svc://echo", options)?;
//! let answer = channel.call(1, b"hi", Some(Duration::from_secs(1)))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

use shmesh_shm::load::LoadView;

use crate::Address;
use crate::client::{Channel, ChannelError, ChannelOptions, Response, lock};
use crate::control::{self, FromDaemon, ToDaemon};
use crate::endpoint::Endpoint;
use crate::handshake::{self, Hello, Msg, PROTOCOL_VERSION, ServiceName};
use crate::socket;
use crate::status::Status;

/// How often the table of replicas is fetched again.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// One replica, as this client knows it.
struct Member {
    replica: u64,
    load: LoadView,
    channel: Option<Channel>,
    /// Connecting to it failed, or its channel died.
    failed: bool,
}

struct Table {
    members: Vec<Member>,
    fetched: Instant,
}

/// A client of every replica of a service: calls go to the less loaded of
/// two replicas drawn at random, by their published load; a dead replica is
/// failed over (its in-flight calls fail `Unavailable`, never resent).
pub struct BalancedChannel {
    daemon: Address,
    options: ChannelOptions,
    table: Mutex<Table>,
}

impl std::fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("service", &self.options.service)
            .finish_non_exhaustive()
    }
}

impl BalancedChannel {
    /// Fetches the table of replicas of the service `address` names
    /// (`shm+svc://NAME`, which must be `options.service`).
    pub fn connect(address: &str, options: ChannelOptions) -> Result<Self, ChannelError> {
        let name = match address.parse::<Endpoint>()? {
            Endpoint::Service(name) => name,
            Endpoint::Socket(_) => {
                return Err(ChannelError::ServiceMismatch {
                    address: address.to_owned(),
                    options: format!("a service through the host daemon ({})", options.service),
                });
            }
        };
        if name.as_str() != options.service {
            return Err(ChannelError::ServiceMismatch {
                address: name.to_string(),
                options: options.service.clone(),
            });
        }
        let daemon = match &options.daemon {
            Some(daemon) => daemon.clone(),
            None => crate::endpoint::daemon_socket()?,
        };
        let members = resolve(&daemon, &options)?;
        Ok(BalancedChannel {
            daemon,
            options,
            table: Mutex::new(Table {
                members,
                fetched: Instant::now(),
            }),
        })
    }

    /// The replicas known now, by id (for tests and tools).
    pub fn replicas(&self) -> Vec<u64> {
        lock(&self.table)
            .members
            .iter()
            .map(|m| m.replica)
            .collect()
    }

    /// The replicas not known to have failed: never tried, or with a live
    /// channel.
    pub fn live(&self) -> Vec<u64> {
        lock(&self.table)
            .members
            .iter()
            .filter(|m| !m.failed && m.channel.as_ref().is_none_or(|c| !c.is_dead()))
            .map(|m| m.replica)
            .collect()
    }

    /// Calls `method` on the replica picked for it (see [`Channel::call`]).
    pub fn call(
        &self,
        method: u32,
        request: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let channel = self.pick()?;
        channel.call(method, request, timeout)
    }

    /// [`BalancedChannel::call`] with `metadata` (see
    /// [`Channel::call_with`]).
    pub fn call_with(
        &self,
        method: u32,
        request: &[u8],
        metadata: &crate::Metadata,
        timeout: Option<Duration>,
    ) -> Result<Response, Status> {
        let channel = self.pick()?;
        channel.call_with(method, request, metadata, timeout)
    }

    /// A live channel to the less loaded of two random live replicas.
    pub fn pick(&self) -> Result<Channel, Status> {
        let mut table = lock(&self.table);
        let mut refreshed = false;
        loop {
            let stale = table.fetched.elapsed() >= REFRESH_EVERY;
            if !refreshed && (stale || table.members.iter().all(|m| m.failed)) {
                self.refresh(&mut table)?;
                refreshed = true;
            }
            let live: Vec<usize> = (0..table.members.len())
                .filter(|&i| !table.members[i].failed)
                .collect();
            let Some(i) = choose(&table.members, &live) else {
                return Err(Status::unavailable(format!(
                    "no live replica of {} is registered",
                    self.options.service
                )));
            };
            let member = &mut table.members[i];
            if let Some(channel) = member.channel.as_ref().filter(|c| !c.is_dead()) {
                return Ok(channel.clone());
            }
            match connect_to(&self.daemon, &self.options, member.replica) {
                Ok(channel) => {
                    member.channel = Some(channel.clone());
                    return Ok(channel);
                }
                Err(e) => {
                    tracing::debug!(replica = member.replica, "replica unusable: {e}");
                    member.failed = true;
                    member.channel = None;
                }
            }
        }
    }

    /// Fetches the table again, keeping the channels of replicas still in
    /// it.
    fn refresh(&self, table: &mut Table) -> Result<(), Status> {
        let fresh = resolve(&self.daemon, &self.options)
            .map_err(|e| Status::unavailable(format!("cannot ask the host daemon: {e}")))?;
        let mut old = std::mem::take(&mut table.members);
        table.members = fresh
            .into_iter()
            .map(|mut m| {
                if let Some(known) = old.iter_mut().find(|o| o.replica == m.replica && !o.failed) {
                    m.channel = known.channel.take();
                }
                m
            })
            .collect();
        table.fetched = Instant::now();
        Ok(())
    }
}

/// Power of two choices over the members at `live`: fewer calls in flight
/// (the replica's page, or this client's own if more), then fewer
/// connections; a tie goes to the first drawn.
fn choose(members: &[Member], live: &[usize]) -> Option<usize> {
    let busyness = |i: usize| {
        let m = &members[i];
        let reading = m.load.read().load;
        let own = m.channel.as_ref().map_or(0, |c| c.calls_in_flight() as u64);
        (reading.in_flight.max(own), reading.connections)
    };
    match live.len() {
        0 => None,
        1 => Some(live[0]),
        n => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            [live[a], live[b]].into_iter().min_by_key(|&i| busyness(i))
        }
    }
}

fn hello(options: &ChannelOptions) -> Result<Hello, ChannelError> {
    Ok(Hello {
        protocol_version: PROTOCOL_VERSION,
        service: ServiceName::new(options.service.clone())?,
        schema_hash: options.schema_hash,
        requested: options.limits.clone(),
    })
}

/// Asks the daemon for the service's replicas built from our schema.
fn resolve(daemon: &Address, options: &ChannelOptions) -> Result<Vec<Member>, ChannelError> {
    let mut conn = socket::connect(daemon)?;
    conn.set_read_timeout(Some(options.connect_timeout))
        .map_err(ChannelError::Socket)?;
    let ask = control::encode(&ToDaemon::Resolve {
        service: options.service.clone(),
    });
    conn.send_msg(&ask, &[])
        .map_err(|e| ChannelError::Connect(socket::ConnectError::Send(e)))?;
    let (bytes, fds) = conn
        .recv_msg(control::MAX_TABLE)
        .map_err(|e| ChannelError::Socket(std::io::Error::other(e)))?;
    let entries = match control::decode_from_daemon(&bytes) {
        Ok(FromDaemon::Replicas(entries)) => entries,
        Ok(_) => return Err(ChannelError::Table("an answer to something else".into())),
        Err(e) => return Err(ChannelError::Table(e.to_string())),
    };
    if entries.len() != fds.len() {
        return Err(ChannelError::Table(format!(
            "{} replicas but {} load pages",
            entries.len(),
            fds.len()
        )));
    }
    let mut members = Vec::new();
    for (entry, fd) in entries.into_iter().zip(fds) {
        if entry.schema != options.schema_hash.0 {
            continue;
        }
        match LoadView::open(fd) {
            Ok(load) => members.push(Member {
                replica: entry.replica,
                load,
                channel: None,
                failed: false,
            }),
            Err(e) => tracing::warn!(replica = entry.replica, "unusable load page: {e}"),
        }
    }
    Ok(members)
}

/// Connects to one replica through the daemon.
fn connect_to(
    daemon: &Address,
    options: &ChannelOptions,
    replica: u64,
) -> Result<Channel, ChannelError> {
    let mut conn = socket::connect(daemon)?;
    conn.set_read_timeout(Some(options.connect_timeout))
        .map_err(ChannelError::Socket)?;
    let hello = hello(options)?;
    let ask = control::encode(&ToDaemon::ConnectTo {
        replica,
        hello: handshake::encode(&Msg::Hello(hello.clone())),
    });
    conn.send_msg(&ask, &[])
        .map_err(|e| ChannelError::Connect(socket::ConnectError::Send(e)))?;
    let (welcome, fds) = socket::receive_welcome(&mut conn, &hello)?;
    Channel::from_welcome(conn, welcome, fds, true)
}
