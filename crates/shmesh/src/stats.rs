//! Counters a server keeps about its calls, as plain data: per method (calls,
//! errors by status code, a latency histogram), per live connection (who,
//! calls, errors), and how many bytes of its answers it copied into shared
//! memory instead of having them written there in place. The daemon
//! exports them; tests and tools read a [`StatsSnapshot`].
//!
//! Recording is a few relaxed atomic increments on the serving thread, made
//! just after the call's answer is sent (off the caller's critical path); a
//! snapshot reads them without stopping anyone, so a call whose answer just
//! arrived may not be counted yet.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::socket::PeerCredentials;
use crate::status::Code;

/// Latency buckets: bucket `i` counts calls that took less than 2^i ns
/// (and at least 2^(i-1)); the last one counts everything slower.
pub const LATENCY_BUCKETS: usize = 40;

/// Counters of one method.
#[derive(Debug)]
struct MethodCounters {
    calls: AtomicU64,
    by_code: [AtomicU64; 17],
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for MethodCounters {
    fn default() -> Self {
        MethodCounters {
            calls: AtomicU64::new(0),
            by_code: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Counters of one connection.
#[derive(Debug)]
struct ConnectionCounters {
    peer: PeerCredentials,
    /// Calls opened; `started - calls` are in flight.
    started: AtomicU64,
    calls: AtomicU64,
    errors: AtomicU64,
}

/// All of a server's counters. Shared by its connection threads.
#[derive(Debug, Default)]
pub struct Stats {
    methods: Mutex<HashMap<u32, Arc<MethodCounters>>>,
    connections: Mutex<BTreeMap<u64, Arc<ConnectionCounters>>>,
    connections_total: AtomicU64,
    copied_bytes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bucket a duration falls in.
fn bucket(elapsed: Duration) -> usize {
    let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    (u64::BITS - ns.leading_zeros()).min(LATENCY_BUCKETS as u32 - 1) as usize
}

/// What one connection records into; dropped when the connection ends.
#[derive(Debug)]
pub struct ConnectionRecorder {
    stats: Arc<Stats>,
    id: u64,
    counters: Arc<ConnectionCounters>,
    /// This connection's view of the method table, so a call takes no lock
    /// once its method has been seen.
    methods: HashMap<u32, Arc<MethodCounters>>,
    /// Whether dropping this recorder ends the connection's registration
    /// (false for a [`ConnectionRecorder::fork`]).
    owner: bool,
}

impl Stats {
    /// Registers connection `id` from `peer`.
    pub fn connection(self: &Arc<Self>, id: u64, peer: PeerCredentials) -> ConnectionRecorder {
        let counters = Arc::new(ConnectionCounters {
            peer,
            started: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        lock(&self.connections).insert(id, counters.clone());
        // Relaxed: a statistic.
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        ConnectionRecorder {
            stats: self.clone(),
            id,
            counters,
            methods: HashMap::default(),
            owner: true,
        }
    }

    /// Calls opened and not yet answered, over the live connections, and
    /// the number of live connections: the server's load, as it publishes
    /// it for load balancing.
    pub fn load(&self) -> (u64, u64) {
        let connections = lock(&self.connections);
        // Relaxed: statistics. `calls` may run ahead of `started` for a
        // moment (another thread's record seen first): saturate.
        let in_flight = connections
            .values()
            .map(|c| {
                c.started
                    .load(Ordering::Relaxed)
                    .saturating_sub(c.calls.load(Ordering::Relaxed))
            })
            .sum();
        (in_flight, connections.len() as u64)
    }

    /// Counts `bytes` of an answer copied into shared memory (rather than
    /// written there in place).
    pub(crate) fn record_copy(&self, bytes: usize) {
        // Relaxed: a statistic.
        self.copied_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        // Relaxed loads throughout: statistics.
        let methods = lock(&self.methods)
            .iter()
            .map(|(&method, c)| {
                let by_code = Code::ALL
                    .iter()
                    .map(|&code| (code, c.by_code[code as usize].load(Ordering::Relaxed)))
                    .filter(|&(_, n)| n > 0)
                    .collect();
                let snapshot = MethodSnapshot {
                    calls: c.calls.load(Ordering::Relaxed),
                    by_code,
                    latency: std::array::from_fn(|i| c.latency[i].load(Ordering::Relaxed)),
                };
                (method, snapshot)
            })
            .collect();
        let connections = lock(&self.connections)
            .iter()
            .map(|(&id, c)| ConnectionSnapshot {
                id,
                peer: c.peer,
                calls: c.calls.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
            })
            .collect();
        StatsSnapshot {
            methods,
            connections,
            connections_total: self.connections_total.load(Ordering::Relaxed),
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
        }
    }
}

impl ConnectionRecorder {
    /// Records one call of `method` that ended with `code` after `elapsed`.
    pub fn record(&mut self, method: u32, code: Code, elapsed: Duration) {
        let counters = self
            .methods
            .entry(method)
            .or_insert_with(|| lock(&self.stats.methods).entry(method).or_default().clone());
        // Relaxed increments: statistics, read by snapshots only.
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters.by_code[code as usize].fetch_add(1, Ordering::Relaxed);
        counters.latency[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        if code != Code::Ok {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ConnectionRecorder {
    /// Counts a call opened on this connection (answered calls are counted
    /// by [`ConnectionRecorder::record`]; the difference is in flight).
    pub fn started_call(&self) {
        // Relaxed: a statistic, read by `Stats::load` only.
        self.counters.started.fetch_add(1, Ordering::Relaxed);
    }

    /// The server's counters this connection records into.
    pub(crate) fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// A second recorder into the same connection's counters, for another
    /// thread (dropping it leaves the connection registered).
    pub fn fork(&self) -> ConnectionRecorder {
        ConnectionRecorder {
            stats: self.stats.clone(),
            id: self.id,
            counters: self.counters.clone(),
            methods: HashMap::default(),
            owner: false,
        }
    }
}

impl Drop for ConnectionRecorder {
    fn drop(&mut self) {
        if self.owner {
            lock(&self.stats.connections).remove(&self.id);
        }
    }
}

/// A copy of a server's counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Per method id.
    pub methods: BTreeMap<u32, MethodSnapshot>,
    /// The live connections, by id.
    pub connections: Vec<ConnectionSnapshot>,
    /// Connections accepted since the server started.
    pub connections_total: u64,
    /// Bytes of answers (responses and stream messages) the server copied
    /// into shared memory since it started: those handlers returned as
    /// bytes or slices, and those too large for one slab, which travel in
    /// chunks. Answers written in place into a loaned slab
    /// ([`Router::route_in_place`](crate::server::Router::route_in_place),
    /// [`ReplyBuf`](crate::server::ReplyBuf)) add nothing: a service that
    /// answers only that way keeps this at zero.
    pub copied_bytes: u64,
}

/// A copy of one method's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSnapshot {
    /// Calls served.
    pub calls: u64,
    /// Calls by the status they ended with (codes never seen are left out).
    pub by_code: BTreeMap<Code, u64>,
    /// Handler latency histogram: `latency[i]` counts calls under 2^i ns.
    pub latency: [u64; LATENCY_BUCKETS],
}

impl MethodSnapshot {
    /// The upper bound of the bucket holding the `q` quantile (0 to 1) of
    /// handler latency; `None` before any call.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_nanos(1u64 << i.min(63)));
            }
        }
        None
    }
}

/// A copy of one connection's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSnapshot {
    /// The server's number for the connection.
    pub id: u64,
    /// Who connected.
    pub peer: PeerCredentials,
    /// Calls served on it.
    pub calls: u64,
    /// Of which ended with an error status.
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerCredentials {
        PeerCredentials {
            pid: 1,
            uid: 2,
            gid: 3,
        }
    }

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_nanos(1)), 1);
        assert_eq!(bucket(Duration::from_nanos(1000)), 10);
        assert_eq!(bucket(Duration::from_secs(100_000)), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn records_per_method_and_connection() {
        let stats = Arc::new(Stats::default());
        let mut a = stats.connection(1, peer());
        let mut b = stats.connection(2, peer());
        a.record(7, Code::Ok, Duration::from_nanos(900));
        a.record(7, Code::NotFound, Duration::from_micros(3));
        b.record(7, Code::Ok, Duration::from_nanos(800));
        b.record(8, Code::Ok, Duration::from_nanos(10));
        let snap = stats.snapshot();
        let m7 = &snap.methods[&7];
        assert_eq!(m7.calls, 3);
        assert_eq!(m7.by_code[&Code::Ok], 2);
        assert_eq!(m7.by_code[&Code::NotFound], 1);
        assert_eq!(m7.latency_quantile(0.5), Some(Duration::from_nanos(1024)));
        assert_eq!(m7.latency_quantile(1.0), Some(Duration::from_nanos(4096)));
        assert_eq!(snap.connections.len(), 2);
        assert_eq!(
            (snap.connections[0].calls, snap.connections[0].errors),
            (2, 1)
        );
        drop(a);
        let snap = stats.snapshot();
        assert_eq!(snap.connections.len(), 1);
        assert_eq!(snap.connections_total, 2);
        assert_eq!(
            snap.methods[&8].latency_quantile(0.9),
            Some(Duration::from_nanos(16))
        );
    }
}
