//! An example engine plugin for `shmeshd`: **per-method call quotas**.
//!
//! Each method of the services it covers may be called at most so many
//! times per caller (uid and program) or per service, for ever or per
//! period; calls past the quota are refused `RESOURCE_EXHAUSTED`. A call
//! that ends with an error status is given back to the quota (it did not
//! use the service). The counts are the engine's state: an upgrade to a
//! new build of the plugin, or to new limits, carries them over.
//!
//! ```toml
//! kind = "plugin"
//! name = "quota"
//! service = "billing"
//! path = "/opt/shmesh/plugins/libshmesh_example_engine_plugin-1.so"
//!
//! [config]
//! per = "caller"        # or "service" (default caller)
//! default_calls = 1000  # for methods not listed (default: unlimited)
//! period_s = 3600       # the counts start again every hour (default: never)
//! methods = [{ method = 3, calls = 10 }]
//! ```
//!
//! Build it with `cargo build -p shmesh-example-engine-plugin` (the library
//! is `target/debug/libshmesh_example_engine_plugin.so`), copy it where the
//! daemon can read it, under a name of its own for each build, and add it
//! with `shmesh policy add --from quota.toml`. See [`shmesh_engine_abi`]
//! for how a plugin is written.

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use abi_stable::sabi_extern_fn;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RErr, ROk, ROption, RResult, RSlice, RStr, RString, RVec};
use serde::{Deserialize, Serialize};
use shmesh_engine_abi::{
    CallInfo, FlushMode, Note, PluginEngine, PluginEngine_TO, PluginEngineBox, Verdict, codes,
};

/// The engine's kind: the daemon shows it as `plugin:quota`.
pub const KIND: &str = "quota";

/// The plugin's settings (the spec's `config` table).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Whose calls a quota counts (default: each caller's).
    #[serde(default)]
    pub per: Per,
    /// Calls allowed to a method not in `methods` (default: unlimited).
    #[serde(default)]
    pub default_calls: Option<u64>,
    /// Calls allowed per method.
    #[serde(default)]
    pub methods: Vec<MethodQuota>,
    /// Seconds after which every count starts again from zero (default:
    /// never).
    #[serde(default)]
    pub period_s: Option<u64>,
}

/// Whose calls one quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// Each caller (uid and program) has its own.
    #[default]
    Caller,
    /// All callers of a service share one.
    Service,
}

/// One method's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodQuota {
    /// The method id.
    pub method: u32,
    /// Calls allowed.
    pub calls: u64,
}

impl Config {
    /// Parses the spec's `config` table, handed over as TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| format!("config: {e}"))?;
        if config.default_calls.is_none() && config.methods.is_empty() {
            return Err("config: nothing to limit: set `default_calls` or `methods`".into());
        }
        if config.period_s == Some(0) {
            return Err("config: `period_s` must be at least 1".into());
        }
        Ok(config)
    }

    fn limit(&self, method: u32) -> Option<u64> {
        self.methods
            .iter()
            .find(|m| m.method == method)
            .map(|m| m.calls)
            .or(self.default_calls)
    }
}

/// A quota's counter: whose (uid:program, or empty per service), which
/// service, which method.
type Key = (String, String, u32);

/// The state handed to a replacement. The first byte of the encoding is
/// [`STATE_FORMAT`], so that a later build can read an older build's
/// state (or refuse it by name).
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// Every counter with calls in it.
    used: Vec<(String, String, u32, u64)>,
    /// How long ago the current period began, in ns.
    period_age_ns: u64,
    admitted: u64,
    refused: u64,
}

/// The state encoding this build writes and reads.
const STATE_FORMAT: u8 = 1;

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![STATE_FORMAT];
        // Encoding plain vectors and integers into memory cannot fail.
        bytes.extend(postcard::to_allocvec(self).unwrap_or_default());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<State, String> {
        match bytes.split_first() {
            Some((&STATE_FORMAT, rest)) => {
                postcard::from_bytes(rest).map_err(|e| format!("state: {e}"))
            }
            Some((format, _)) => Err(format!(
                "state: format {format} (this build reads format {STATE_FORMAT})"
            )),
            None => Err("state: empty".into()),
        }
    }
}

struct Inner {
    used: HashMap<Key, u64>,
    period_start: Instant,
    admitted: u64,
    refused: u64,
}

/// The quota engine.
pub struct Quota {
    config: Config,
    inner: Mutex<Inner>,
}

impl Quota {
    /// Builds the engine from its config's TOML text, restoring `state`
    /// (what a previous quota engine decomposed into) if given.
    pub fn new(config: &str, state: Option<&[u8]>) -> Result<Quota, String> {
        let config = Config::parse(config)?;
        let state = match state {
            Some(bytes) => State::decode(bytes)?,
            None => State::default(),
        };
        let now = Instant::now();
        let period_start = now
            .checked_sub(Duration::from_nanos(state.period_age_ns))
            .unwrap_or(now);
        let used = state
            .used
            .into_iter()
            .map(|(who, service, method, n)| ((who, service, method), n))
            .collect();
        Ok(Quota {
            config,
            inner: Mutex::new(Inner {
                used,
                period_start,
                admitted: state.admitted,
                refused: state.refused,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, call: &CallInfo<'_>) -> Key {
        let who = match self.config.per {
            Per::Caller => format!("{}:{}", call.uid, call.app),
            Per::Service => String::new(),
        };
        (who, call.service.as_str().to_owned(), call.method)
    }

    /// Starts a new period if the current one is over.
    fn renew(&self, inner: &mut Inner) {
        if let Some(period) = self.config.period_s.map(Duration::from_secs)
            && inner.period_start.elapsed() >= period
        {
            inner.used.clear();
            inner.period_start = Instant::now();
        }
    }
}

impl PluginEngine for Quota {
    fn admit(&self, call: &CallInfo<'_>, notes: &mut RVec<Note>) -> Verdict {
        let Some(limit) = self.config.limit(call.method) else {
            return Verdict::Pass;
        };
        let key = self.key(call);
        let mut inner = self.lock();
        self.renew(&mut inner);
        let used = inner.used.get(&key).copied().unwrap_or(0);
        if used >= limit {
            inner.refused += 1;
            let whose = match self.config.per {
                Per::Caller => format!(" for {}", key.0),
                Per::Service => String::new(),
            };
            return Verdict::reject(
                codes::RESOURCE_EXHAUSTED,
                format!(
                    "quota: the {limit} calls of method {} of {} are used up{whose}",
                    call.method, call.service
                ),
            );
        }
        inner.used.insert(key, used + 1);
        inner.admitted += 1;
        notes.push(Note {
            key: "quota".into(),
            value: format!("{}/{limit}", used + 1).into(),
        });
        Verdict::Pass
    }

    fn done(&self, call: &CallInfo<'_>, code: u32, _elapsed_ns: u64) {
        if code == 0 || self.config.limit(call.method).is_none() {
            return;
        }
        // Failed downstream: give the call back. (A call that outlives its
        // period is given back to the next one: at worst one extra call.)
        let key = self.key(call);
        let mut inner = self.lock();
        if let Some(n) = inner.used.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
    }

    fn flush(&self, _how: FlushMode) {
        // It never holds a call.
    }

    fn decompose(&self) -> RVec<u8> {
        let inner = self.lock();
        let mut used: Vec<_> = inner
            .used
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|((who, service, method), n)| (who.clone(), service.clone(), *method, *n))
            .collect();
        used.sort();
        let age = inner.period_start.elapsed().as_nanos();
        State {
            used,
            period_age_ns: u64::try_from(age).unwrap_or(u64::MAX),
            admitted: inner.admitted,
            refused: inner.refused,
        }
        .encode()
        .into()
    }

    fn describe(&self) -> RString {
        let inner = self.lock();
        let per = match self.config.per {
            Per::Caller => "caller",
            Per::Service => "service",
        };
        format!(
            "{} calls admitted, {} over quota; {} quotas in use, per {per}",
            inner.admitted,
            inner.refused,
            inner.used.values().filter(|n| **n > 0).count()
        )
        .into()
    }
}

/// The plugin's constructor, which the daemon calls through the root
/// module.
#[sabi_extern_fn]
pub fn new_engine(
    config: RStr<'_>,
    state: ROption<RSlice<'_, u8>>,
) -> RResult<PluginEngineBox, RString> {
    let state = state.map(|s| s.as_slice()).into_option();
    match Quota::new(config.as_str(), state) {
        Ok(quota) => ROk(PluginEngine_TO::from_value(quota, TD_Opaque)),
        Err(e) => RErr(e.into()),
    }
}

/// The exported root module (`#[export_root_module]` adds an undocumented
/// static beside it, the symbol the daemon looks up).
#[allow(missing_docs)]
mod export {
    use abi_stable::export_root_module;
    use abi_stable::prefix_type::PrefixTypeTrait;
    use shmesh_engine_abi::{EngineModule, EngineModuleRef};

    /// The library's root module.
    #[export_root_module]
    pub fn root_module() -> EngineModuleRef {
        EngineModule {
            kind: abi_stable::rstr!(super::KIND),
            new_engine: super::new_engine,
        }
        .leak_into_prefix()
    }
}

#[cfg(test)]
mod tests;
