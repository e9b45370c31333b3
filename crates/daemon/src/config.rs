//! The daemon's configuration: TOML, every key optional, unknown keys an
//! error naming the file, line and key.
//!
//! ```toml
//! # Where processes reach the daemon (default: $XDG_RUNTIME_DIR/shmesh/shmeshd.sock,
//! # else /run/shmesh/shmeshd.sock).
//! socket = "/run/shmesh/shmeshd.sock"
//!
//! [metrics]
//! enabled = true
//! listen = "127.0.0.1:9464"   # Prometheus text format at /metrics
//!
//! [access]
//! default = "allow"           # what happens when no rule matches
//!
//! [[access.rules]]            # first match wins
//! action = "deny"
//! service = "billing"         # a service name, or "*"
//! uid = 1000                  # optional: the caller's effective uid
//! app = "curl"                # optional: the caller's program name
//!
//! [[services]]                # services not listed take the direct path
//! name = "billing"
//! path = "mediated"           # calls pass through the engines below
//! replica_uid = 1000          # only this uid (or root) may serve it
//!
//! [[engines]]                 # the pipeline of mediated calls, in order
//! kind = "rate-limit"         # access, rate-limit, qos, metrics
//! service = "billing"         # default "*"
//! rate = 1000.0               # see shmesh_daemon::engine for each kind's keys
//! burst = 100
//! ```
//!
//! # Example
//!
//! ```
//! use shmesh_daemon::config::Config;
//!
//! let config = Config::parse("[metrics]\nenabled = false\n", "inline.toml").unwrap();
//! assert!(!config.metrics.enabled);
//!
//! let err = Config::parse("[metrics]\nport = 1\n", "inline.toml").unwrap_err();
//! assert_eq!(err.to_string().lines().next().unwrap(),
//!            "inline.toml:2:1: key `port`: unknown field `port`, expected `enabled` or `listen`");
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Everything the daemon can be told.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The daemon's socket (default:
    /// [`default_daemon_socket`](shmesh::endpoint::default_daemon_socket)).
    pub socket: Option<PathBuf>,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Who may connect to which service.
    pub access: AccessConfig,
    /// Per-service settings (services not listed take the direct path).
    pub services: Vec<ServiceConfig>,
    /// The engine pipeline of mediated calls, in order.
    pub engines: Vec<crate::engine::EngineSpec>,
}

/// A `[[services]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's name.
    pub name: String,
    /// Its data path (default `direct`).
    #[serde(default)]
    pub path: DataPath,
    /// The only uid (besides root) whose processes may register as its
    /// replicas. Unset: the uid of the replicas already registered, if any.
    #[serde(default)]
    pub replica_uid: Option<u32>,
}

/// How a service's calls travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// Client and replica share rings; the daemon only grants.
    #[default]
    Direct,
    /// Calls pass through the daemon's engine pipeline.
    Mediated,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether to serve `/metrics` at all (default true).
    pub enabled: bool,
    /// Where (default `127.0.0.1:9464`; port 0 picks a free one).
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// The `[access]` table: rules checked in order, first match wins.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// What happens when no rule matches (default `allow`).
    pub default: Action,
    /// The rules.
    pub rules: Vec<Rule>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the call through.
    #[default]
    Allow,
    /// Refuse it.
    Deny,
}

/// One access rule: matches when every given field matches.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// The service, or `"*"` for all.
    pub service: String,
    /// The caller's effective uid, if the rule is about one user.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The caller's program name (`/proc/PID/comm`), if the rule is about
    /// one program.
    #[serde(default)]
    pub app: Option<String>,
}

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not fit the schema.
    #[error("{file}:{line}:{column}: {key}{message}")]
    Invalid {
        /// The file (as given).
        file: String,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// `key `NAME`: ` when the key is known, else empty.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// The uid configured to serve `service`, if any.
    pub fn replica_uid(&self, service: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.replica_uid)
    }

    /// The data path of `service`.
    pub fn path_of(&self, service: &str) -> DataPath {
        self.services
            .iter()
            .find(|s| s.name == service)
            .map_or(DataPath::Direct, |s| s.path)
    }

    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        parse_toml(text, file)
    }

    /// The socket to listen on: the configured one or the default.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(shmesh::endpoint::default_daemon_socket)
    }
}

/// Parses TOML into `T`; errors name `file`, the line, column and key.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let offset = e.span().map_or(0, |span| span.start);
        let (line, column) = line_column(text, offset);
        let key = key_at(text, offset)
            .map(|k| format!("key `{k}`: "))
            .unwrap_or_default();
        ConfigError::Invalid {
            file: file.to_owned(),
            line,
            column,
            key,
            message: e.message().trim_end().to_owned(),
        }
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key on the line holding byte `offset`: the text before `=`, or the
/// table name of a `[table]` line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text
        .get(..offset.min(text.len()))?
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?.trim();
    let key = match line.split_once('=') {
        Some((key, _)) => key.trim(),
        None => line.trim_matches(|c| c == '[' || c == ']').trim(),
    };
    (!key.is_empty()).then(|| key.trim_matches('"').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
    }

    #[test]
    fn a_full_file_parses() {
        let text = r#"
socket = "/tmp/d.sock"
[metrics]
enabled = true
listen = "127.0.0.1:0"
[access]
default = "deny"
[[access.rules]]
action = "allow"
service = "echo"
uid = 1000
[[access.rules]]
action = "allow"
service = "*"
app = "ops"
"#;
        let config = Config::parse(text, "x").unwrap();
        assert_eq!(config.socket_path(), PathBuf::from("/tmp/d.sock"));
        assert_eq!(config.access.default, Action::Deny);
        assert_eq!(config.access.rules.len(), 2);
        assert_eq!(config.access.rules[1].app.as_deref(), Some("ops"));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let text = "[access]\ndefault = \"allow\"\n\n[[access.rules]]\naction = \"maybe\"\nservice = \"*\"\n";
        let err = Config::parse(text, "/etc/shmesh/shmeshd.toml").unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with(
                "/etc/shmesh/shmeshd.toml:5:10: key `action`: unknown variant `maybe`"
            ),
            "{shown}"
        );

        let err = Config::parse("[metrics]\nlisten = 9464\n", "f.toml").unwrap_err();
        assert!(
            err.to_string().starts_with("f.toml:2:10: key `listen`: "),
            "{err}"
        );

        let err =
            Config::parse("[access]\n[[access.rules]]\naction = \"deny\"\n", "f.toml").unwrap_err();
        assert!(err.to_string().contains("missing field `service`"), "{err}");
    }
}
