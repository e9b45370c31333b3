//! The rate-limit engine: a token bucket per caller (uid and program) or
//! per service. A call takes a token; with none left it waits for one
//! (`when_empty = "delay"`, never past its deadline nor `max_delay_ms`) or
//! is refused `ResourceExhausted` (`"reject"`).
//!
//! ```toml
//! [[engines]]
//! kind = "rate-limit"
//! rate = 1000.0           # tokens per second
//! burst = 100             # bucket size
//! per = "caller"          # or "service"
//! when_empty = "delay"    # or "reject"
//! max_delay_ms = 1000
//! ```
//!
//! Waiting calls reserve their token (the bucket goes below zero), so they
//! leave in arrival order, each when its token would have refilled. The
//! state handed to a replacement holds every bucket's level with the
//! reservations of the waiting calls given back, since those calls enter
//! the replacement and reserve again there.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shmesh::status::Status;

use super::{
    Admit, BuildError, CallInfo, Engine, EngineState, Flush, decode_state, encode_state, wait_until,
};

/// The rate limiter's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The engine's name (default `rate-limit`).
    #[serde(default)]
    pub name: Option<String>,
    /// The service it applies to (default `"*"`).
    #[serde(default = "super::all_services")]
    pub service: String,
    /// Tokens added per second.
    pub rate: f64,
    /// The most tokens a bucket holds.
    pub burst: u32,
    /// One bucket per caller or per service (default caller).
    #[serde(default)]
    pub per: Per,
    /// What a call finding no token gets (default delay).
    #[serde(default)]
    pub when_empty: WhenEmpty,
    /// The longest a call is delayed (default 1000 ms).
    #[serde(default = "default_max_delay")]
    pub max_delay_ms: u64,
}

fn default_max_delay() -> u64 {
    1000
}

/// What a bucket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// Each caller (uid and program).
    #[default]
    Caller,
    /// Each service.
    Service,
}

/// What happens without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenEmpty {
    /// Wait for one.
    #[default]
    Delay,
    /// Refuse with `ResourceExhausted`.
    Reject,
}

/// A bucket's level and its waiting calls.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    waiting: u32,
}

/// What travels to a replacement.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    /// Bucket key (uid or `u32::MAX`, then program or service), its level
    /// (reservations of waiting calls given back) and how long ago it was
    /// last refilled, in ns.
    buckets: Vec<(u32, String, f64, u64)>,
    admitted: u64,
    delayed: u64,
    rejected: u64,
}

/// Buckets by uid (or `u32::MAX`), then program (or service): looked up by
/// `&str`, so a call allocates nothing once its bucket exists.
type Buckets = HashMap<u32, HashMap<String, Bucket>>;

struct Inner {
    buckets: Buckets,
    /// Bumped by every flush; a waiter that sees it change stops waiting.
    flushes: u64,
    last_flush: Flush,
    admitted: u64,
    delayed: u64,
    rejected: u64,
}

/// The rate-limit engine.
pub struct RateLimiter {
    config: RateLimitConfig,
    inner: Mutex<Inner>,
    woken: Condvar,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Builds the engine, restoring `state` if given.
    pub fn new(config: RateLimitConfig, state: Option<&[u8]>) -> Result<Self, BuildError> {
        if !(config.rate.is_finite() && config.rate > 0.0) {
            return Err(BuildError::Config(format!(
                "rate must be a positive number of calls per second, not {}",
                config.rate
            )));
        }
        if config.burst == 0 {
            return Err(BuildError::Config("burst must be at least 1".into()));
        }
        let mut inner = Inner {
            buckets: HashMap::new(),
            flushes: 0,
            last_flush: Flush::Release,
            admitted: 0,
            delayed: 0,
            rejected: 0,
        };
        if let Some(data) = state {
            let state: State = decode_state("rate-limit", data)?;
            let now = Instant::now();
            for (uid, name, tokens, age_ns) in state.buckets {
                let refilled = now.checked_sub(Duration::from_nanos(age_ns)).unwrap_or(now);
                let tokens = tokens.min(f64::from(config.burst));
                inner.buckets.entry(uid).or_default().insert(
                    name,
                    Bucket {
                        tokens,
                        refilled,
                        waiting: 0,
                    },
                );
            }
            inner.admitted = state.admitted;
            inner.delayed = state.delayed;
            inner.rejected = state.rejected;
        }
        Ok(RateLimiter {
            config,
            inner: Mutex::new(inner),
            woken: Condvar::new(),
        })
    }

    /// The bucket's key: the caller's uid and program, or `u32::MAX` and
    /// the service.
    fn key<'c>(&self, call: &CallInfo<'c>) -> (u32, &'c str) {
        match self.config.per {
            Per::Caller => (call.caller.uid, call.caller.app.as_str()),
            Per::Service => (u32::MAX, call.service),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let added = now.duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + added).min(burst);
        self.refilled = now;
    }
}

impl Engine for RateLimiter {
    fn kind(&self) -> &'static str {
        "rate-limit"
    }

    fn admit(&self, call: &mut CallInfo<'_>) -> Result<Admit, Status> {
        let (uid, name) = self.key(call);
        let (rate, burst) = (self.config.rate, f64::from(self.config.burst));
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let named = inner.buckets.entry(uid).or_default();
        let bucket = match named.get_mut(name) {
            Some(bucket) => bucket,
            None => named.entry(name.to_owned()).or_insert(Bucket {
                tokens: burst,
                refilled: now,
                waiting: 0,
            }),
        };
        bucket.refill(now, rate, burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            inner.admitted += 1;
            return Ok(Admit::Pass);
        }
        let key = if uid == u32::MAX {
            name.to_owned()
        } else {
            format!("uid {uid} ({name})")
        };
        // The wait for this call's token, behind those already waiting.
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
        let limit = Duration::from_millis(self.config.max_delay_ms);
        let past_deadline = call.deadline.is_some_and(|d| now + wait > d);
        if self.config.when_empty == WhenEmpty::Reject || wait > limit || past_deadline {
            inner.rejected += 1;
            let why = if past_deadline {
                "past the call's deadline".to_owned()
            } else {
                format!("over {} ms", limit.as_millis())
            };
            return Err(Status::resource_exhausted(format!(
                "rate limit of {} calls/s (burst {}) for {key}: the next token is {} ms away, {why}",
                self.config.rate,
                self.config.burst,
                wait.as_millis()
            )));
        }
        bucket.tokens -= 1.0;
        bucket.waiting += 1;
        inner.delayed += 1;
        let until = now + wait;
        let flushes = inner.flushes;
        let mut inner = guard;
        call.annotations
            .push(("rate-limit.delay_us".into(), wait.as_micros().to_string()));
        let mut flushed = None;
        loop {
            if inner.flushes != flushes {
                flushed = Some(inner.last_flush);
                break;
            }
            let (guard, in_time) = wait_until(&self.woken, inner, Some(until));
            inner = guard;
            if !in_time {
                break;
            }
        }
        if let Some(b) = inner.buckets.get_mut(&uid).and_then(|n| n.get_mut(name)) {
            b.waiting = b.waiting.saturating_sub(1);
            if flushed == Some(Flush::Requeue) {
                // Its reservation goes with the state; it reserves again in
                // the replacement.
                b.tokens += 1.0;
            }
        }
        match flushed {
            Some(Flush::Requeue) => Ok(Admit::Retry),
            _ => {
                inner.admitted += 1;
                Ok(Admit::Pass)
            }
        }
    }

    fn flush(&self, how: Flush) {
        let mut inner = self.lock();
        inner.flushes += 1;
        inner.last_flush = how;
        self.woken.notify_all();
    }

    fn decompose(&self) -> EngineState {
        let inner = self.lock();
        let now = Instant::now();
        let buckets = inner
            .buckets
            .iter()
            .flat_map(|(&uid, named)| named.iter().map(move |(name, b)| (uid, name, b)))
            .map(|(uid, name, b)| {
                let age = now.duration_since(b.refilled).as_nanos();
                (
                    uid,
                    name.clone(),
                    b.tokens + f64::from(b.waiting),
                    u64::try_from(age).unwrap_or(u64::MAX),
                )
            })
            .collect();
        encode_state(
            "rate-limit",
            &State {
                buckets,
                admitted: inner.admitted,
                delayed: inner.delayed,
                rejected: inner.rejected,
            },
        )
    }

    fn describe(&self) -> String {
        let inner = self.lock();
        format!(
            "{} calls/s, burst {}, per {:?}, {:?} when empty; {} admitted, {} delayed, {} rejected",
            self.config.rate,
            self.config.burst,
            self.config.per,
            self.config.when_empty,
            inner.admitted,
            inner.delayed,
            inner.rejected
        )
        .to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use shmesh::control::Caller;
    use shmesh::status::Code;

    use super::*;

    static NO_METADATA: shmesh::Metadata = shmesh::Metadata::new();
    static CALLER: std::sync::LazyLock<Caller> = std::sync::LazyLock::new(|| Caller {
        pid: 1,
        uid: 1000,
        gid: 1000,
        app: "t".into(),
    });

    fn call() -> CallInfo<'static> {
        CallInfo {
            caller: &CALLER,
            service: "echo",
            method: 1,
            size: 8,
            deadline: None,
            metadata: &NO_METADATA,
            annotations: Vec::new(),
        }
    }

    fn config(when_empty: WhenEmpty) -> RateLimitConfig {
        RateLimitConfig {
            name: None,
            service: "*".into(),
            rate: 0.001,
            burst: 2,
            per: Per::Caller,
            when_empty,
            max_delay_ms: 1000,
        }
    }

    #[test]
    fn the_burst_passes_then_calls_are_refused() {
        let limiter = RateLimiter::new(config(WhenEmpty::Reject), None).unwrap();
        assert_eq!(limiter.admit(&mut call()), Ok(Admit::Pass));
        assert_eq!(limiter.admit(&mut call()), Ok(Admit::Pass));
        let err = limiter.admit(&mut call()).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.message().contains("uid 1000 (t)"), "{err}");
    }

    #[test]
    fn an_upgrade_keeps_the_bucket_level() {
        let limiter = RateLimiter::new(config(WhenEmpty::Reject), None).unwrap();
        limiter.admit(&mut call()).unwrap();
        limiter.admit(&mut call()).unwrap();
        let state = limiter.decompose();
        let next = RateLimiter::new(config(WhenEmpty::Reject), Some(&state.data)).unwrap();
        // The bucket is still empty in the replacement.
        assert!(next.admit(&mut call()).is_err());
        assert!(RateLimiter::new(config(WhenEmpty::Reject), Some(b"\xff\xff\xff")).is_err());
    }

    #[test]
    fn a_delayed_call_is_released_or_requeued_by_a_flush() {
        for (how, expected) in [
            (Flush::Release, Admit::Pass),
            (Flush::Requeue, Admit::Retry),
        ] {
            let limiter = std::sync::Arc::new(
                RateLimiter::new(
                    RateLimitConfig {
                        max_delay_ms: 3_600_000,
                        ..config(WhenEmpty::Delay)
                    },
                    None,
                )
                .unwrap(),
            );
            limiter.admit(&mut call()).unwrap();
            limiter.admit(&mut call()).unwrap();
            let waiting = {
                let limiter = limiter.clone();
                std::thread::spawn(move || limiter.admit(&mut call()))
            };
            while limiter
                .lock()
                .buckets
                .values()
                .flat_map(|n| n.values())
                .all(|b| b.waiting == 0)
            {
                std::thread::yield_now();
            }
            limiter.flush(how);
            assert_eq!(waiting.join().unwrap(), Ok(expected));
        }
    }
}
