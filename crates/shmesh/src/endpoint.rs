//! Where a client connects and a server listens: a socket of its own
//! (`shm://…`, see [`Address`]) or a service name resolved by the host
//! daemon `shmeshd` (`shm+svc://NAME`).
//!
//! | URI | meaning |
//! |---|---|
//! | `shm:///run/app/echo.sock`, `shm://@echo` | a server's own socket ([`Address`]) |
//! | `shm+svc://echo` | the service `echo`, through the host daemon |
//!
//! With `shm+svc://`, a server registers with the daemon instead of binding
//! a socket, and a client asks the daemon for a connection to a replica of
//! the service: the daemon checks its access rules, creates the
//! connection's shared-memory segment and hands it to both sides, then
//! stays out of the way (the *direct* path).
//!
//! The daemon's own socket is, in order of preference: the `SHMESH_DAEMON`
//! environment variable (an absolute path), `$XDG_RUNTIME_DIR/shmesh/shmeshd.sock`,
//! or `/run/shmesh/shmeshd.sock` ([`daemon_socket`]).
//!
//! # Example
//!
//! ```
//! use shmesh::endpoint::Endpoint;
//!
//! let direct: Endpoint = "shm://@echo".parse().unwrap();
//! assert!(matches!(direct, Endpoint::Socket(_)));
//!
//! let named: Endpoint = "shm+svc://routeguide.RouteGuide".parse().unwrap();
//! assert_eq!(named.service().map(|s| s.as_str()), Some("routeguide.RouteGuide"));
//! assert_eq!(named.to_string(), "shm+svc://routeguide.RouteGuide");
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use crate::addr::{Address, AddressError};
use crate::handshake::{ServiceName, ServiceNameError};

/// The URI scheme of a service resolved by the host daemon.
const SERVICE_PREFIX: &str = "shm+svc://";

/// The environment variable that overrides the daemon's socket path.
pub const DAEMON_ENV: &str = "SHMESH_DAEMON";

/// A server's socket, or a service the host daemon resolves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `shm:///path` or `shm://@name`: the server's own socket.
    Socket(Address),
    /// `shm+svc://NAME`: a service registered with the host daemon.
    Service(ServiceName),
}

/// A string that is neither a socket address nor a service URI.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EndpointError {
    /// `shm+svc://` with an invalid service name after it.
    #[error("invalid service in {uri:?}: {source}")]
    Service {
        /// The string given.
        uri: String,
        /// What is wrong with the name.
        source: ServiceNameError,
    },
    /// Not a `shm+svc://` URI, and not a valid `shm://` address either.
    #[error("{0} (or shm+svc://SERVICE through the host daemon)")]
    Address(#[from] AddressError),
}

impl Endpoint {
    /// The service name, for a `shm+svc://` endpoint.
    pub fn service(&self) -> Option<&ServiceName> {
        match self {
            Endpoint::Service(name) => Some(name),
            Endpoint::Socket(_) => None,
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let scheme_len = SERVICE_PREFIX.len();
        if uri.len() >= scheme_len
            && uri.is_char_boundary(scheme_len)
            && uri[..scheme_len].eq_ignore_ascii_case(SERVICE_PREFIX)
        {
            let name =
                ServiceName::new(&uri[scheme_len..]).map_err(|source| EndpointError::Service {
                    uri: uri.to_owned(),
                    source,
                })?;
            return Ok(Endpoint::Service(name));
        }
        Ok(Endpoint::Socket(uri.parse()?))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Socket(address) => address.fmt(f),
            Endpoint::Service(name) => write!(f, "{SERVICE_PREFIX}{name}"),
        }
    }
}

/// The daemon's socket path named by the `SHMESH_DAEMON` environment
/// variable could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{DAEMON_ENV}={value:?} is not a usable socket path: {source}")]
pub struct DaemonSocketError {
    /// The variable's value.
    pub value: String,
    /// Why it cannot be used.
    pub source: AddressError,
}

/// The host daemon's socket: `$SHMESH_DAEMON` if set, else
/// `$XDG_RUNTIME_DIR/shmesh/shmeshd.sock` if that variable is set, else
/// `/run/shmesh/shmeshd.sock`.
pub fn daemon_socket() -> Result<Address, DaemonSocketError> {
    let configured = std::env::var_os(DAEMON_ENV).filter(|v| !v.is_empty());
    let path = match configured {
        Some(value) => PathBuf::from(value),
        None => default_daemon_socket(),
    };
    Address::from_path(&path).map_err(|source| DaemonSocketError {
        value: path.to_string_lossy().into_owned(),
        source,
    })
}

/// Where the daemon listens when nothing says otherwise:
/// `$XDG_RUNTIME_DIR/shmesh/shmeshd.sock`, else `/run/shmesh/shmeshd.sock`.
pub fn default_daemon_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("shmesh").join("shmeshd.sock"),
        None => PathBuf::from("/run/shmesh/shmeshd.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_uris_parse_and_print() {
        let e: Endpoint = "SHM+SVC://echo".parse().unwrap();
        assert_eq!(e, Endpoint::Service(ServiceName::new("echo").unwrap()));
        assert_eq!(e.to_string(), "shm+svc://echo");
    }

    #[test]
    fn socket_addresses_still_parse() {
        let e: Endpoint = "shm:///run/x.sock".parse().unwrap();
        assert!(matches!(e, Endpoint::Socket(_)));
        assert_eq!(e.to_string(), "shm:///run/x.sock");
    }

    #[test]
    fn bad_inputs_name_both_schemes() {
        let err = "shm+svc://".parse::<Endpoint>().unwrap_err();
        assert!(matches!(err, EndpointError::Service { .. }), "{err}");
        let err = "http://x".parse::<Endpoint>().unwrap_err();
        assert!(err.to_string().contains("shm+svc://"), "{err}");
    }
}
