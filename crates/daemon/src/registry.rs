//! Services, their replicas and the connections granted to them: plain
//! data, no IO (each replica's registration link is kept as an opaque
//! handle for the daemon to send on).
//!
//! Replicas of one service may run different schemas (a rolling upgrade):
//! a client is only ever matched with a replica of its own schema hash.
//! Among those, two are drawn at random and the less loaded one is picked
//! (power of two choices): fewer calls in flight by its load page, then
//! fewer live connections, then the lower id. With one or two candidates
//! that is simply the least loaded.

use std::collections::BTreeMap;
use std::time::Instant;

use shmesh::control::Caller;
use shmesh::handshake::{SchemaHash, ServerPolicy};
use shmesh_shm::load::LoadView;

/// A connection grant: who, to which replica, since when.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The client.
    pub caller: Caller,
    /// When it was granted.
    pub since: Instant,
}

/// A registered replica.
#[derive(Debug)]
pub struct Replica<L> {
    /// Its id.
    pub id: u64,
    /// The process serving it.
    pub process: Caller,
    /// What it serves and the most it grants.
    pub policy: ServerPolicy,
    /// How to reach it.
    pub link: L,
    /// Its live connections, by id.
    pub connections: BTreeMap<u64, Grant>,
    /// The load it publishes, read-only.
    pub load: Option<std::sync::Arc<LoadView>>,
}

impl<L> Replica<L> {
    /// What the replica is compared by: calls in flight, connections, id.
    fn busyness(&self) -> (u64, usize, u64) {
        let in_flight = self.load.as_ref().map_or(0, |l| l.read().load.in_flight);
        (in_flight, self.connections.len(), self.id)
    }
}

/// A service: its replicas and counters.
#[derive(Debug)]
pub struct Service<L> {
    /// Replicas by id.
    pub replicas: BTreeMap<u64, Replica<L>>,
    /// Connections granted since the daemon started.
    pub grants_total: u64,
    /// Connection requests refused since the daemon started, by reason.
    pub refusals: BTreeMap<&'static str, u64>,
}

impl<L> Default for Service<L> {
    fn default() -> Self {
        Service {
            replicas: BTreeMap::new(),
            grants_total: 0,
            refusals: BTreeMap::new(),
        }
    }
}

/// What a client's request for `service` with `schema` finds.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    /// This replica (its id).
    Replica(u64),
    /// Replicas exist, but none was built from the client's schema: one of
    /// theirs, for the refusal.
    SchemaMismatch(SchemaHash),
    /// No replica is registered.
    NoReplica,
}

/// Every service, replica and grant.
#[derive(Debug)]
pub struct Registry<L> {
    services: BTreeMap<String, Service<L>>,
    next_replica: u64,
    next_connection: u64,
}

impl<L> Registry<L> {
    /// An empty registry whose connection ids start at `first_connection`
    /// (distinct per daemon run, so a replica that outlives a daemon
    /// restart never sees an id twice).
    pub fn new(first_connection: u64) -> Self {
        Registry {
            services: BTreeMap::new(),
            next_replica: 1,
            next_connection: first_connection.max(1),
        }
    }

    /// Adds a replica; returns its id.
    pub fn add_replica(
        &mut self,
        process: Caller,
        policy: ServerPolicy,
        link: L,
        load: Option<std::sync::Arc<LoadView>>,
    ) -> u64 {
        let id = self.next_replica;
        self.next_replica += 1;
        let service = self
            .services
            .entry(policy.service.as_str().to_owned())
            .or_default();
        service.replicas.insert(
            id,
            Replica {
                id,
                process,
                policy,
                link,
                connections: BTreeMap::new(),
                load,
            },
        );
        id
    }

    /// Removes a replica and its grants; returns it.
    pub fn remove_replica(&mut self, id: u64) -> Option<Replica<L>> {
        for service in self.services.values_mut() {
            if let Some(replica) = service.replicas.remove(&id) {
                return Some(replica);
            }
        }
        None
    }

    /// Picks the replica for a client of `service` built from `schema`.
    pub fn pick(&self, service: &str, schema: SchemaHash) -> Pick {
        let Some(s) = self.services.get(service) else {
            return Pick::NoReplica;
        };
        let candidates: Vec<&Replica<L>> = s
            .replicas
            .values()
            .filter(|r| r.policy.schema_hash == schema)
            .collect();
        let matching = match candidates.len() {
            0..=2 => candidates.iter().min_by_key(|r| r.busyness()).copied(),
            n => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                [candidates[a], candidates[b]]
                    .into_iter()
                    .min_by_key(|r| r.busyness())
            }
        };
        match (matching, s.replicas.values().next()) {
            (Some(r), _) => Pick::Replica(r.id),
            (None, Some(other)) => Pick::SchemaMismatch(other.policy.schema_hash),
            (None, None) => Pick::NoReplica,
        }
    }

    /// A replica by id.
    pub fn replica(&self, id: u64) -> Option<&Replica<L>> {
        self.services.values().find_map(|s| s.replicas.get(&id))
    }

    /// A fresh connection id.
    pub fn next_connection(&mut self) -> u64 {
        let id = self.next_connection;
        self.next_connection += 1;
        id
    }

    /// Records connection `id` of `caller` to `replica`.
    pub fn grant(&mut self, replica: u64, id: u64, caller: Caller) {
        for service in self.services.values_mut() {
            if let Some(r) = service.replicas.get_mut(&replica) {
                r.connections.insert(
                    id,
                    Grant {
                        caller,
                        since: Instant::now(),
                    },
                );
                service.grants_total += 1;
                return;
            }
        }
    }

    /// Forgets connection `id` of `replica`, which ended.
    pub fn close(&mut self, replica: u64, id: u64) -> Option<Grant> {
        self.services
            .values_mut()
            .find_map(|s| s.replicas.get_mut(&replica))
            .and_then(|r| r.connections.remove(&id))
    }

    /// Counts a connection to `service` granted on the mediated path (the
    /// daemon serves it; no replica holds it).
    pub fn granted(&mut self, service: &str) {
        self.services
            .entry(service.to_owned())
            .or_default()
            .grants_total += 1;
    }

    /// Counts a refused request for `service`.
    pub fn refused(&mut self, service: &str, reason: &'static str) {
        let s = self.services.entry(service.to_owned()).or_default();
        *s.refusals.entry(reason).or_insert(0) += 1;
    }

    /// Every service, by name (including ones whose replicas all left).
    pub fn services(&self) -> impl Iterator<Item = (&str, &Service<L>)> {
        self.services.iter().map(|(name, s)| (name.as_str(), s))
    }

    /// Every replica's id and link.
    pub fn links(&self) -> impl Iterator<Item = (u64, &L)> {
        self.services
            .values()
            .flat_map(|s| s.replicas.values().map(|r| (r.id, &r.link)))
    }
}

#[cfg(test)]
mod tests {
    use shmesh::handshake::ServiceName;

    use super::*;

    fn caller(pid: i32) -> Caller {
        Caller {
            pid,
            uid: 0,
            gid: 0,
            app: "t".into(),
        }
    }

    fn policy(service: &str, schema: u8) -> ServerPolicy {
        ServerPolicy::new(ServiceName::new(service).unwrap(), SchemaHash([schema; 32]))
    }

    #[test]
    fn picks_the_least_loaded_replica_of_the_clients_schema() {
        let mut r = Registry::<()>::new(100);
        assert_eq!(r.pick("echo", SchemaHash([1; 32])), Pick::NoReplica);
        let a = r.add_replica(caller(1), policy("echo", 1), (), None);
        let b = r.add_replica(caller(2), policy("echo", 1), (), None);
        let c = r.add_replica(caller(3), policy("echo", 2), (), None);
        assert_eq!(r.pick("echo", SchemaHash([1; 32])), Pick::Replica(a));
        let id = r.next_connection();
        assert_eq!(id, 100);
        r.grant(a, id, caller(9));
        assert_eq!(r.pick("echo", SchemaHash([1; 32])), Pick::Replica(b));
        assert_eq!(r.pick("echo", SchemaHash([2; 32])), Pick::Replica(c));
        assert_eq!(
            r.pick("echo", SchemaHash([3; 32])),
            Pick::SchemaMismatch(SchemaHash([1; 32]))
        );
        assert!(r.close(a, id).is_some());
        assert!(r.close(a, id).is_none());
        assert_eq!(r.pick("echo", SchemaHash([1; 32])), Pick::Replica(a));
    }

    #[test]
    fn removing_a_replica_drops_its_grants() {
        let mut r = Registry::<()>::new(1);
        let a = r.add_replica(caller(1), policy("echo", 1), (), None);
        let id = r.next_connection();
        r.grant(a, id, caller(9));
        let gone = r.remove_replica(a).unwrap();
        assert_eq!(gone.connections.len(), 1);
        assert_eq!(r.pick("echo", SchemaHash([1; 32])), Pick::NoReplica);
        assert_eq!(r.services().next().unwrap().1.grants_total, 1);
    }
}
