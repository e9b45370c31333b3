//! Policy engines on RPCs: the pipeline every call of a *mediated* service
//! passes through in the daemon.
//!
//! Every engine has the same shape: a **config** ([`EngineSpec`], TOML), the
//! **engine** ([`Engine`]: it sees each call's [`CallInfo`] and passes it,
//! delays it, reorders it among others, rejects it with a [`Status`], or
//! annotates it), and its **state** ([`EngineState`]), which
//! [`Engine::decompose`] takes out and [`build`] restores into a
//! replacement, so an engine is upgraded without losing its token counts,
//! counters or queued calls.
//!
//! The [`Pipeline`] is swapped as a whole ([`arc_swap`]): a call runs on the
//! pipeline it loaded, and is told `done` by exactly the engines that
//! admitted it, so adding, removing or upgrading an engine never strands a
//! call:
//! - **remove**: the engine is unlinked, then [flushed](Engine::flush) with
//!   [`Flush::Release`]: calls it holds go on downstream;
//! - **upgrade**: the new engine is built from the old one's state and
//!   linked in its place, then the old one is flushed with
//!   [`Flush::Requeue`]: calls it holds enter the new engine (in the order
//!   they arrive there).
//!
//! Built in: [`access`] (caller × service × method rules), [`rate_limit`]
//! (token buckets per caller or per service, delaying or rejecting),
//! [`qos`] (a bounded number of calls in flight, the rest served smallest
//! or earliest-deadline first), [`metrics`] (counts, codes and latency per
//! service and method, in `/metrics`), [`tracing`] (W3C trace context
//! propagated in call metadata, spans exported over OTLP or logged).
//! Others are loaded from dynamic libraries through a stable ABI:
//! [`plugin`].

pub mod access;
pub mod metrics;
pub mod plugin;
pub mod qos;
pub mod rate_limit;
pub mod tracing;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use shmesh::Metadata;
use shmesh::control::Caller;
use shmesh::status::{Code, Status};
use thiserror::Error;

/// What an engine sees of a call (borrowed: the mediated path builds one
/// per call without allocating).
#[derive(Debug, Clone)]
pub struct CallInfo<'a> {
    /// Who calls.
    pub caller: &'a Caller,
    /// The service called.
    pub service: &'a str,
    /// The method id.
    pub method: u32,
    /// The request's size in bytes.
    pub size: usize,
    /// When the caller gives up, if it set a deadline.
    pub deadline: Option<Instant>,
    /// The metadata the caller sent with the call (empty if none).
    pub metadata: &'a Metadata,
    /// Notes engines attach for the engines after them and for the
    /// replica: the call is forwarded with the caller's metadata and these
    /// (a note replaces the caller's value of the same key; one whose key
    /// or value is not valid metadata is not forwarded).
    pub annotations: Vec<(String, String)>,
}

/// How a call ended, for [`Engine::done`].
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The status code it ended with.
    pub code: Code,
    /// From admission by the first engine to the answer.
    pub elapsed: Duration,
}

/// An engine's answer to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// On to the next engine (after however long the engine held it).
    Pass,
    /// The engine was replaced while it held the call: run it through the
    /// current pipeline from the replacement on.
    Retry,
}

/// How [`Engine::flush`] lets go of the calls an engine holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// The engine is removed: held calls go on downstream.
    Release,
    /// The engine is upgraded: held calls enter its replacement.
    Requeue,
}

/// An engine's state, taken out for its replacement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineState {
    /// The kind of engine it came from.
    pub kind: String,
    /// The state, in that kind's own encoding (postcard).
    pub data: Vec<u8>,
}

/// A policy engine. Implementations must not panic on any call; `admit`
/// may block (that is how a call is delayed or queued).
pub trait Engine: Send + Sync + 'static {
    /// The engine's kind (`"rate-limit"` …).
    fn kind(&self) -> &'static str;
    /// Decides on a call: [`Admit::Pass`] (at once or after holding it), or
    /// `Err` to reject it with that status.
    fn admit(&self, call: &mut CallInfo<'_>) -> Result<Admit, Status>;
    /// An admitted call is answered (or failed downstream).
    fn done(&self, _call: &CallInfo<'_>, _outcome: &Outcome) {}
    /// Lets go of every call the engine holds (see [`Flush`]).
    fn flush(&self, _how: Flush) {}
    /// The engine's state, for its replacement.
    fn decompose(&self) -> EngineState;
    /// One line on what it does, for `shmesh policy list`.
    fn describe(&self) -> String;
    /// Daemon-side counters, if the engine keeps them (the metrics engine).
    fn counters(&self) -> Vec<(String, shmesh::control::MethodStats)> {
        Vec::new()
    }
}

/// Which services an engine applies to, by default.
pub(crate) fn all_services() -> String {
    "*".to_owned()
}

/// An engine's configuration: TOML with a `kind`, an optional `name`
/// (default: the kind), the `service` it applies to (default `"*"`), and
/// that kind's keys; unknown keys are errors.
///
/// ```
/// use shmesh_daemon::engine::EngineSpec;
///
/// let spec = EngineSpec::parse(r#"
///     name = "limit"
///     kind = "rate-limit"
///     rate = 1000.0
///     burst = 50
/// "#, "inline").unwrap();
/// assert_eq!(spec.name(), "limit");
/// assert_eq!(spec.kind(), "rate-limit");
/// assert!(EngineSpec::parse("kind = \"rate-limit\"\nrate = 1.0\nburst = 1\nspeed = 2\n", "x").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EngineSpec {
    /// Allow/deny rules on caller × method.
    Access(access::AccessConfig),
    /// Token buckets.
    RateLimit(rate_limit::RateLimitConfig),
    /// A scheduler across applications.
    Qos(qos::QosConfig),
    /// Counters and latency per method.
    Metrics(metrics::MetricsConfig),
    /// Trace context propagation and spans.
    Tracing(tracing::TracingConfig),
    /// An engine loaded from a dynamic library.
    Plugin(plugin::PluginConfig),
}

impl EngineSpec {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineSpec::Access(_) => "access",
            EngineSpec::RateLimit(_) => "rate-limit",
            EngineSpec::Qos(_) => "qos",
            EngineSpec::Metrics(_) => "metrics",
            EngineSpec::Tracing(_) => "tracing",
            EngineSpec::Plugin(_) => "plugin",
        }
    }

    fn common(&self) -> (&Option<String>, &str) {
        match self {
            EngineSpec::Access(c) => (&c.name, &c.service),
            EngineSpec::RateLimit(c) => (&c.name, &c.service),
            EngineSpec::Qos(c) => (&c.name, &c.service),
            EngineSpec::Metrics(c) => (&c.name, &c.service),
            EngineSpec::Tracing(c) => (&c.name, &c.service),
            EngineSpec::Plugin(c) => (&c.name, &c.service),
        }
    }

    /// The engine's name: the given one, else its kind.
    pub fn name(&self) -> &str {
        self.common().0.as_deref().unwrap_or(self.kind())
    }

    /// The service it applies to, or `"*"`.
    pub fn service(&self) -> &str {
        self.common().1
    }

    /// Parses a spec from TOML; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<EngineSpec, crate::config::ConfigError> {
        crate::config::parse_toml(text, file)
    }
}

/// An engine cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BuildError {
    /// The state comes from another kind of engine.
    #[error("cannot restore the state of a {from} engine into a {into} engine")]
    KindMismatch {
        /// The state's kind.
        from: String,
        /// The new engine's kind.
        into: &'static str,
    },
    /// The state does not decode.
    #[error("the {kind} state does not decode: {reason}")]
    State {
        /// The kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// The settings are not usable.
    #[error("{0}")]
    Config(String),
    /// A plugin cannot be loaded or started.
    #[error("plugin {}: {source}", path.display())]
    Plugin {
        /// The library.
        path: std::path::PathBuf,
        /// Why.
        source: plugin::PluginError,
    },
}

/// Builds the engine `spec` describes, restoring `state` if given.
pub fn build(
    spec: &EngineSpec,
    state: Option<&EngineState>,
) -> Result<Arc<dyn Engine>, BuildError> {
    let kind = spec.kind();
    if let Some(state) = state
        && state.kind != kind
        // A plugin's kind is its library's: checked once that is loaded.
        && !matches!(spec, EngineSpec::Plugin(_))
    {
        return Err(BuildError::KindMismatch {
            from: state.kind.clone(),
            into: kind,
        });
    }
    let data = state.map(|s| s.data.as_slice());
    Ok(match spec {
        EngineSpec::Access(c) => Arc::new(access::AccessEngine::new(c.clone(), data)?),
        EngineSpec::RateLimit(c) => Arc::new(rate_limit::RateLimiter::new(c.clone(), data)?),
        EngineSpec::Qos(c) => Arc::new(qos::Qos::new(c.clone(), data)?),
        EngineSpec::Metrics(c) => Arc::new(metrics::MetricsEngine::new(c.clone(), data)?),
        EngineSpec::Tracing(c) => Arc::new(tracing::TracingEngine::new(c.clone(), data)?),
        EngineSpec::Plugin(c) => Arc::new(plugin::PluginEngine::new(c, state)?),
    })
}

/// Decodes a kind's state.
pub(crate) fn decode_state<'a, T: Deserialize<'a>>(
    kind: &'static str,
    data: &'a [u8],
) -> Result<T, BuildError> {
    postcard::from_bytes(data).map_err(|e| BuildError::State {
        kind,
        reason: e.to_string(),
    })
}

/// Encodes a kind's state.
pub(crate) fn encode_state<T: Serialize>(kind: &'static str, state: &T) -> EngineState {
    EngineState {
        kind: kind.to_owned(),
        data: postcard::to_allocvec(state).unwrap_or_default(),
    }
}

/// One engine in the pipeline.
#[derive(Clone)]
pub struct Stage {
    /// Its name.
    pub name: String,
    /// Its spec.
    pub spec: EngineSpec,
    /// The engine.
    pub engine: Arc<dyn Engine>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("name", &self.name)
            .field("kind", &self.engine.kind())
            .finish()
    }
}

impl Stage {
    fn applies_to(&self, service: &str) -> bool {
        let wanted = self.spec.service();
        wanted == "*" || wanted == service
    }
}

/// A change to the pipeline cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PipelineError {
    /// An engine of that name is already in.
    #[error("an engine named {0:?} is already in the pipeline")]
    Duplicate(String),
    /// The pipeline holds [`MAX_STAGES`] engines already.
    #[error("the pipeline holds {MAX_STAGES} engines, the most it can")]
    Full,
    /// No engine of that name.
    #[error("no engine named {0:?} in the pipeline")]
    Unknown(String),
    /// The engine cannot be built.
    #[error("engine {name:?}: {source}")]
    Build {
        /// Its name.
        name: String,
        /// Why.
        source: BuildError,
    },
}

/// The engines every mediated call passes through, in order.
pub struct Pipeline {
    stages: ArcSwap<Vec<Stage>>,
    /// Serialises changes (calls never take it).
    change: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.stages.load().iter()).finish()
    }
}

/// The most engines a pipeline holds.
pub const MAX_STAGES: usize = 64;

/// The engines that admitted a call, to tell them when it is done: a bit
/// per stage of the snapshot the call ran on (no allocation per call), and
/// the engines of earlier snapshots if an upgrade made it start over.
pub struct Admitted {
    snapshot: Arc<Vec<Stage>>,
    mask: u64,
    earlier: Vec<Arc<dyn Engine>>,
    started: Instant,
}

impl Admitted {
    /// Tells every engine that admitted the call how it ended, last first.
    pub fn done(self, call: &CallInfo<'_>, code: Code) {
        let outcome = Outcome {
            code,
            elapsed: self.started.elapsed(),
        };
        for (i, stage) in self.snapshot.iter().enumerate().rev() {
            if self.mask & (1 << i) != 0 {
                stage.engine.done(call, &outcome);
            }
        }
        for engine in self.earlier.iter().rev() {
            engine.done(call, &outcome);
        }
    }
}

impl Pipeline {
    /// A pipeline of `specs`, in order.
    pub fn new(specs: &[EngineSpec]) -> Result<Pipeline, PipelineError> {
        if specs.len() > MAX_STAGES {
            return Err(PipelineError::Full);
        }
        let mut stages = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = spec.name().to_owned();
            if stages.iter().any(|s: &Stage| s.name == name) {
                return Err(PipelineError::Duplicate(name));
            }
            let engine = build(spec, None).map_err(|source| PipelineError::Build {
                name: name.clone(),
                source,
            })?;
            stages.push(Stage {
                name,
                spec: spec.clone(),
                engine,
            });
        }
        Ok(Pipeline {
            stages: ArcSwap::from_pointee(stages),
            change: std::sync::Mutex::new(()),
        })
    }

    /// Runs `call` through every engine that applies to its service.
    /// `Err` is the rejection of one engine; the engines that had admitted
    /// the call are told it failed.
    pub fn admit(&self, call: &mut CallInfo<'_>) -> Result<Admitted, Status> {
        let mut admitted = Admitted {
            snapshot: self.stages.load_full(),
            mask: 0,
            earlier: Vec::new(),
            started: Instant::now(),
        };
        let mut next = 0;
        while let Some(stage) = admitted.snapshot.get(next) {
            if !stage.applies_to(call.service) {
                next += 1;
                continue;
            }
            match stage.engine.admit(call) {
                Ok(Admit::Pass) => {
                    admitted.mask |= 1 << next;
                    next += 1;
                }
                Ok(Admit::Retry) => {
                    // Replaced while holding the call: go on from its
                    // replacement, or from where it stood if it is gone;
                    // the engines that admitted it so far stay to be told.
                    let name = stage.name.clone();
                    let fresh = self.stages.load_full();
                    next = fresh.iter().position(|s| s.name == name).unwrap_or(next);
                    let old = std::mem::replace(&mut admitted.snapshot, fresh);
                    admitted.earlier.extend(
                        old.iter()
                            .enumerate()
                            .filter(|(i, _)| admitted.mask & (1 << i) != 0)
                            .map(|(_, s)| s.engine.clone()),
                    );
                    admitted.mask = 0;
                }
                Err(status) => {
                    let code = status.code();
                    admitted.done(call, code);
                    return Err(status);
                }
            }
        }
        Ok(admitted)
    }

    /// The engines, in order.
    pub fn stages(&self) -> Arc<Vec<Stage>> {
        self.stages.load_full()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.change.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an engine at `position` (the end if `None` or past it).
    pub fn add(&self, spec: EngineSpec, position: Option<usize>) -> Result<(), PipelineError> {
        let _change = self.lock();
        let name = spec.name().to_owned();
        let current = self.stages.load_full();
        if current.iter().any(|s| s.name == name) {
            return Err(PipelineError::Duplicate(name));
        }
        if current.len() >= MAX_STAGES {
            return Err(PipelineError::Full);
        }
        let engine = build(&spec, None).map_err(|source| PipelineError::Build {
            name: name.clone(),
            source,
        })?;
        let mut stages = (*current).clone();
        let at = position.unwrap_or(stages.len()).min(stages.len());
        stages.insert(at, Stage { name, spec, engine });
        self.stages.store(Arc::new(stages));
        Ok(())
    }

    /// The current stages and where engine `name` stands in them.
    fn find(&self, name: &str) -> Result<(Arc<Vec<Stage>>, usize), PipelineError> {
        let current = self.stages.load_full();
        let at = current
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| PipelineError::Unknown(name.to_owned()))?;
        Ok((current, at))
    }

    /// Removes an engine; the calls it holds go on downstream.
    pub fn remove(&self, name: &str) -> Result<(), PipelineError> {
        let _change = self.lock();
        let (current, at) = self.find(name)?;
        let mut stages = (*current).clone();
        let removed = stages.remove(at);
        self.stages.store(Arc::new(stages));
        removed.engine.flush(Flush::Release);
        Ok(())
    }

    /// Replaces engine `name` by one built from `spec` (of any name; the
    /// stage keeps its place) with the old one's state; the calls the old
    /// one holds enter the new one.
    pub fn upgrade(&self, name: &str, spec: EngineSpec) -> Result<(), PipelineError> {
        let _change = self.lock();
        let (current, at) = self.find(name)?;
        let old = &current[at];
        let state = old.engine.decompose();
        let engine = build(&spec, Some(&state)).map_err(|source| PipelineError::Build {
            name: name.to_owned(),
            source,
        })?;
        let mut stages = (*current).clone();
        // The stage keeps its name, so held calls find their way back.
        stages[at] = Stage {
            name: name.to_owned(),
            spec,
            engine,
        };
        self.stages.store(Arc::new(stages));
        old.engine.flush(Flush::Requeue);
        Ok(())
    }
}

/// A deadline-aware wait on a condition variable: `true` if woken before
/// `until` (or no deadline), `false` once `until` has passed.
pub(crate) fn wait_until<'a, T>(
    cv: &std::sync::Condvar,
    guard: std::sync::MutexGuard<'a, T>,
    until: Option<Instant>,
) -> (std::sync::MutexGuard<'a, T>, bool) {
    match until {
        None => (cv.wait(guard).unwrap_or_else(|e| e.into_inner()), true),
        Some(until) => {
            let now = Instant::now();
            if now >= until {
                return (guard, false);
            }
            let (guard, _) = cv
                .wait_timeout(guard, until - now)
                .unwrap_or_else(|e| e.into_inner());
            (guard, Instant::now() < until)
        }
    }
}
