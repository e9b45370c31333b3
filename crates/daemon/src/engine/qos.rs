//! The QoS engine: at most `max_in_flight` calls of the services it covers
//! go on at once; the rest wait and are let through smallest request first
//! (`order = "smallest-first"`) or earliest deadline first
//! (`"earliest-deadline"`, calls without one last), across every
//! application, arrival order breaking ties.
//!
//! ```toml
//! [[engines]]
//! kind = "qos"
//! max_in_flight = 8
//! order = "earliest-deadline"
//! ```
//!
//! Its state is its counters: calls in flight stay accounted to the engine
//! that admitted them, so right after an upgrade up to twice
//! `max_in_flight` calls may be in flight.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use shmesh::status::Status;

use super::{
    Admit, BuildError, CallInfo, Engine, EngineState, Flush, Outcome, decode_state, encode_state,
    wait_until,
};

/// The QoS engine's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosConfig {
    /// The engine's name (default `qos`).
    #[serde(default)]
    pub name: Option<String>,
    /// The service it applies to (default `"*"`).
    #[serde(default = "super::all_services")]
    pub service: String,
    /// Calls let through at once.
    pub max_in_flight: u32,
    /// Which waiting call goes next (default smallest-first).
    #[serde(default)]
    pub order: Order,
}

/// The order waiting calls leave in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Smallest request first.
    #[default]
    SmallestFirst,
    /// Earliest deadline first.
    EarliestDeadline,
}

/// A waiting call's place: its priority, then its arrival.
type Ticket = (u128, u64);

struct Inner {
    in_flight: u32,
    waiting: BTreeSet<Ticket>,
    next: u64,
    flushes: u64,
    last_flush: Flush,
    /// Calls admitted, and of those, how many waited.
    admitted: u64,
    queued: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    admitted: u64,
    queued: u64,
}

/// The QoS engine.
pub struct Qos {
    config: QosConfig,
    inner: Mutex<Inner>,
    turn: Condvar,
    epoch: Instant,
}

impl std::fmt::Debug for Qos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qos")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Qos {
    /// Builds the engine, restoring `state` if given.
    pub fn new(config: QosConfig, state: Option<&[u8]>) -> Result<Self, BuildError> {
        if config.max_in_flight == 0 {
            return Err(BuildError::Config(
                "max_in_flight must be at least 1".into(),
            ));
        }
        let state: State = match state {
            Some(data) => decode_state("qos", data)?,
            None => State::default(),
        };
        Ok(Qos {
            config,
            inner: Mutex::new(Inner {
                in_flight: 0,
                waiting: BTreeSet::new(),
                next: 0,
                flushes: 0,
                last_flush: Flush::Release,
                admitted: state.admitted,
                queued: state.queued,
            }),
            turn: Condvar::new(),
            epoch: Instant::now(),
        })
    }

    fn priority(&self, call: &CallInfo<'_>) -> u128 {
        match self.config.order {
            Order::SmallestFirst => call.size as u128,
            Order::EarliestDeadline => call.deadline.map_or(u128::MAX, |d| {
                d.saturating_duration_since(self.epoch).as_nanos()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine for Qos {
    fn kind(&self) -> &'static str {
        "qos"
    }

    fn admit(&self, call: &mut CallInfo<'_>) -> Result<Admit, Status> {
        let mut inner = self.lock();
        if inner.in_flight < self.config.max_in_flight && inner.waiting.is_empty() {
            inner.in_flight += 1;
            inner.admitted += 1;
            return Ok(Admit::Pass);
        }
        let ticket = (self.priority(call), inner.next);
        inner.next += 1;
        inner.waiting.insert(ticket);
        inner.queued += 1;
        let flushes = inner.flushes;
        loop {
            if inner.flushes != flushes {
                inner.waiting.remove(&ticket);
                self.turn.notify_all();
                if inner.last_flush == Flush::Requeue {
                    return Ok(Admit::Retry);
                }
                // Released: through at once, still accounted so `done`
                // balances.
                inner.in_flight += 1;
                inner.admitted += 1;
                return Ok(Admit::Pass);
            }
            let first = inner.waiting.first() == Some(&ticket);
            if first && inner.in_flight < self.config.max_in_flight {
                inner.waiting.remove(&ticket);
                inner.in_flight += 1;
                inner.admitted += 1;
                // The next in line may fit too.
                self.turn.notify_all();
                return Ok(Admit::Pass);
            }
            let (guard, in_time) = wait_until(&self.turn, inner, call.deadline);
            inner = guard;
            if !in_time {
                inner.waiting.remove(&ticket);
                self.turn.notify_all();
                return Err(Status::deadline_exceeded(format!(
                    "deadline passed waiting for one of {} QoS slots of {}",
                    self.config.max_in_flight, call.service
                )));
            }
        }
    }

    fn done(&self, _call: &CallInfo<'_>, _outcome: &Outcome) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        self.turn.notify_all();
    }

    fn flush(&self, how: Flush) {
        let mut inner = self.lock();
        inner.flushes += 1;
        inner.last_flush = how;
        self.turn.notify_all();
    }

    fn decompose(&self) -> EngineState {
        let inner = self.lock();
        encode_state(
            "qos",
            &State {
                admitted: inner.admitted,
                queued: inner.queued,
            },
        )
    }

    fn describe(&self) -> String {
        let inner = self.lock();
        format!(
            "{} in flight at most, {:?}; {} in flight, {} waiting, {} admitted ({} after waiting)",
            self.config.max_in_flight,
            self.config.order,
            inner.in_flight,
            inner.waiting.len(),
            inner.admitted,
            inner.queued
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shmesh::control::Caller;
    use shmesh::status::Code;

    use super::*;

    static NO_METADATA: shmesh::Metadata = shmesh::Metadata::new();
    static CALLER: std::sync::LazyLock<Caller> = std::sync::LazyLock::new(|| Caller {
        pid: 1,
        uid: 0,
        gid: 0,
        app: "t".into(),
    });

    fn call(size: usize) -> CallInfo<'static> {
        CallInfo {
            caller: &CALLER,
            service: "echo",
            method: 1,
            size,
            deadline: None,
            metadata: &NO_METADATA,
            annotations: Vec::new(),
        }
    }

    #[test]
    fn waiting_calls_leave_smallest_first() {
        let qos = Arc::new(
            Qos::new(
                QosConfig {
                    name: None,
                    service: "*".into(),
                    max_in_flight: 1,
                    order: Order::SmallestFirst,
                },
                None,
            )
            .unwrap(),
        );
        let first = call(1);
        qos.admit(&mut first.clone()).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for size in [300, 100, 200] {
            let (engine, order) = (qos.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let c = call(size);
                engine.admit(&mut c.clone()).unwrap();
                order.lock().unwrap().push(size);
                engine.done(&c, &outcome());
            }));
            // Each in the queue before the next arrives.
            while qos.lock().waiting.len() < threads.len() {
                std::thread::yield_now();
            }
        }
        qos.done(&first, &outcome());
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [100, 200, 300]);
    }

    #[test]
    fn a_waiting_call_gives_up_at_its_deadline() {
        let qos = Qos::new(
            QosConfig {
                name: None,
                service: "*".into(),
                max_in_flight: 1,
                order: Order::EarliestDeadline,
            },
            None,
        )
        .unwrap();
        qos.admit(&mut call(1)).unwrap();
        let mut late = call(1);
        late.deadline = Some(Instant::now());
        let err = qos.admit(&mut late).unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded);
        assert!(qos.lock().waiting.is_empty());
    }

    fn outcome() -> Outcome {
        Outcome {
            code: Code::Ok,
            elapsed: std::time::Duration::ZERO,
        }
    }
}
