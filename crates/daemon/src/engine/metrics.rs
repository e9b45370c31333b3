//! The metrics engine: calls, status codes and latency per service and
//! method, measured in the daemon (request in to answer out, forwarding
//! included), exported in `/metrics` as `shmesh_mediated_*` and shown by
//! `shmesh status`. Its counters travel to its replacement on upgrade.
//!
//! ```toml
//! [[engines]]
//! kind = "metrics"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use shmesh::control::MethodStats;
use shmesh::stats::LATENCY_BUCKETS;
use shmesh::status::Status;

use super::{
    Admit, BuildError, CallInfo, Engine, EngineState, Outcome, decode_state, encode_state,
};

/// The metrics engine's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The engine's name (default `metrics`).
    #[serde(default)]
    pub name: Option<String>,
    /// The service it applies to (default `"*"`).
    #[serde(default = "super::all_services")]
    pub service: String,
}

/// Counters by service, then method (looked up by `&str`: no allocation
/// per call).
type Counters = HashMap<String, BTreeMap<u32, MethodStats>>;

/// The metrics engine.
#[derive(Debug)]
pub struct MetricsEngine {
    counters: Mutex<Counters>,
}

impl MetricsEngine {
    /// Builds the engine, restoring `state` if given.
    pub fn new(_config: MetricsConfig, state: Option<&[u8]>) -> Result<Self, BuildError> {
        let counters = match state {
            Some(data) => {
                let list: Vec<(String, MethodStats)> = decode_state("metrics", data)?;
                let mut counters = Counters::new();
                for (service, m) in list {
                    counters.entry(service).or_default().insert(m.method, m);
                }
                counters
            }
            None => Counters::new(),
        };
        Ok(MetricsEngine {
            counters: Mutex::new(counters),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine for MetricsEngine {
    fn kind(&self) -> &'static str {
        "metrics"
    }

    fn admit(&self, _call: &mut CallInfo<'_>) -> Result<Admit, Status> {
        Ok(Admit::Pass)
    }

    fn done(&self, call: &CallInfo<'_>, outcome: &Outcome) {
        let ns = u64::try_from(outcome.elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = ((u64::BITS - ns.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1);
        let code = outcome.code as u8;
        let mut counters = self.lock();
        let methods = match counters.get_mut(call.service) {
            Some(methods) => methods,
            None => counters.entry(call.service.to_owned()).or_default(),
        };
        let m = methods.entry(call.method).or_insert_with(|| MethodStats {
            method: call.method,
            latency: vec![0; LATENCY_BUCKETS],
            ..MethodStats::default()
        });
        m.calls += 1;
        match m.by_code.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => m.by_code.push((code, 1)),
        }
        if let Some(n) = m.latency.get_mut(bucket) {
            *n += 1;
        }
    }

    fn decompose(&self) -> EngineState {
        encode_state("metrics", &self.counters())
    }

    fn describe(&self) -> String {
        let calls: u64 = self
            .lock()
            .values()
            .flat_map(|m| m.values())
            .map(|m| m.calls)
            .sum();
        format!("{calls} calls counted")
    }

    fn counters(&self) -> Vec<(String, MethodStats)> {
        self.lock()
            .iter()
            .flat_map(|(service, methods)| methods.values().map(|m| (service.clone(), m.clone())))
            .collect()
    }
}
