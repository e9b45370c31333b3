//! The access engine: allow/deny rules on caller × method, per call (the
//! grant-time rules of [`crate::access`] cannot see methods).
//!
//! ```toml
//! [[engines]]
//! kind = "access"
//! service = "billing"
//! default = "allow"
//! [[engines.rules]]
//! action = "deny"
//! methods = [3, 4]      # the methods it covers (default: all)
//! uid = 1000            # optional
//! app = "curl"          # optional
//! ```

use serde::{Deserialize, Serialize};
use shmesh::status::Status;

use super::{Admit, BuildError, CallInfo, Engine, EngineState, encode_state};
use crate::config::Action;

/// The access engine's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// The engine's name (default `access`).
    #[serde(default)]
    pub name: Option<String>,
    /// The service it applies to (default `"*"`).
    #[serde(default = "super::all_services")]
    pub service: String,
    /// What happens when no rule matches.
    #[serde(default = "allow")]
    pub default: ActionName,
    /// Rules, first match wins.
    #[serde(default)]
    pub rules: Vec<MethodRule>,
}

fn allow() -> ActionName {
    ActionName::Allow
}

/// `allow` or `deny` (serialisable both ways, unlike the grant-time
/// [`Action`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionName {
    /// Let the call through.
    Allow,
    /// Refuse it with `PermissionDenied`.
    Deny,
}

impl From<ActionName> for Action {
    fn from(a: ActionName) -> Self {
        match a {
            ActionName::Allow => Action::Allow,
            ActionName::Deny => Action::Deny,
        }
    }
}

/// One rule: matches when every given field matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodRule {
    /// Allow or deny.
    pub action: ActionName,
    /// The methods it covers (default: all).
    #[serde(default)]
    pub methods: Option<Vec<u32>>,
    /// The caller's effective uid.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The caller's program name.
    #[serde(default)]
    pub app: Option<String>,
}

/// The access engine. Stateless: its rules come from its config.
#[derive(Debug)]
pub struct AccessEngine {
    config: AccessConfig,
}

impl AccessEngine {
    /// Builds the engine (there is no state to restore).
    pub fn new(config: AccessConfig, _state: Option<&[u8]>) -> Result<Self, BuildError> {
        Ok(AccessEngine { config })
    }
}

impl Engine for AccessEngine {
    fn kind(&self) -> &'static str {
        "access"
    }

    fn admit(&self, call: &mut CallInfo<'_>) -> Result<Admit, Status> {
        let hit = self.config.rules.iter().enumerate().find(|(_, r)| {
            r.methods.as_ref().is_none_or(|m| m.contains(&call.method))
                && r.uid.is_none_or(|uid| uid == call.caller.uid)
                && r.app.as_deref().is_none_or(|app| app == call.caller.app)
        });
        let (action, which) = match hit {
            Some((i, rule)) => (rule.action, format!("rule {}", i + 1)),
            None => (self.config.default, "the default".to_owned()),
        };
        match action {
            ActionName::Allow => Ok(Admit::Pass),
            ActionName::Deny => Err(Status::permission_denied(format!(
                "{} (uid {}) may not call method {} of {}: {which} of access engine",
                call.caller.app, call.caller.uid, call.method, call.service
            ))),
        }
    }

    fn decompose(&self) -> EngineState {
        encode_state("access", &())
    }

    fn describe(&self) -> String {
        format!(
            "{} rule(s), default {:?}",
            self.config.rules.len(),
            self.config.default
        )
        .to_lowercase()
    }
}
