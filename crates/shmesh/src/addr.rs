//! Addresses of shmesh endpoints: `shm://` URIs naming a Unix socket.
//!
//! Two forms are understood:
//!
//! | URI | socket |
//! |---|---|
//! | `shm:///run/app/echo.sock` | the file-system path `/run/app/echo.sock` |
//! | `shm://@echo` | the Linux abstract socket name `echo` |
//!
//! Everything after `shm://` is taken verbatim: there is no host part, no
//! percent-decoding, no query and no fragment (a `?` or `#` is part of the
//! name), so [`Address`]'s `Display` and `FromStr` are exact inverses. The
//! scheme is matched without regard to case and always printed as `shm`.
//!
//! A name must fit in `sockaddr_un`'s 108-byte `sun_path`: a path takes at
//! most [`MAX_PATH_LEN`] bytes (one is left for the terminating NUL), an
//! abstract name at most [`MAX_ABSTRACT_LEN`] (one goes to the leading NUL
//! that marks the abstract namespace; one more is kept in reserve so that
//! tools which treat the name as a C string still see all of it). Neither
//! may contain a NUL byte. Paths must be absolute: a relative path would
//! mean different sockets to processes with different working directories.
//!
//! # Example
//!
//! ```
//! use shmesh::Address;
//!
//! let a: Address = "shm:///run/app/echo.sock".parse().unwrap();
//! assert_eq!(a.as_path().unwrap().to_str(), Some("/run/app/echo.sock"));
//! assert_eq!(a.to_string(), "shm:///run/app/echo.sock");
//!
//! let b: Address = "shm://@echo".parse().unwrap();
//! assert_eq!(b.as_abstract_name(), Some("echo"));
//!
//! assert!("unix:///tmp/x".parse::<Address>().is_err());
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

/// The URI scheme, with its separator.
const PREFIX: &str = "shm://";

/// Longest file-system path, in bytes: `sun_path` less its terminating NUL.
pub const MAX_PATH_LEN: usize = 107;

/// Longest abstract socket name, in bytes: `sun_path` less the leading NUL
/// and one byte kept in reserve.
pub const MAX_ABSTRACT_LEN: usize = 106;

/// The address of a shmesh endpoint: a Unix socket, by path or by abstract
/// name. Always valid: every constructor checks the rules in the
/// [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// An absolute path, valid UTF-8, no NUL, at most `MAX_PATH_LEN` bytes.
    Path(PathBuf),
    /// A name in Linux's abstract namespace, no NUL, 1 to
    /// `MAX_ABSTRACT_LEN` bytes.
    Abstract(String),
}

/// A string or path that is not a valid shmesh address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddressError {
    /// The URI does not start with `shm://`.
    #[error("{uri:?} is not a shmesh address: expected shm:///path or shm://@name")]
    WrongScheme {
        /// The string given.
        uri: String,
    },
    /// Nothing follows `shm://`.
    #[error("empty address: expected shm:///path or shm://@name")]
    Empty,
    /// `shm://@` with no name after the `@`.
    #[error("empty abstract socket name after shm://@")]
    EmptyName,
    /// The path does not start with `/` (in a URI: `shm://dir/x` rather than
    /// `shm:///dir/x`).
    #[error("socket path {path:?} is relative: it must start with '/' (shm:///path)")]
    RelativePath {
        /// The path given.
        path: String,
    },
    /// The path ends with `/`, so it names a directory, not a socket.
    #[error("socket path {path:?} ends with '/': it names a directory, not a socket")]
    DirectoryPath {
        /// The path given.
        path: String,
    },
    /// The path or name does not fit in `sockaddr_un`.
    #[error("socket {what} is {len} bytes long; at most {max} fit in sockaddr_un")]
    TooLong {
        /// `"path"` or `"abstract name"`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The path or name contains a NUL byte.
    #[error("socket {what} contains a NUL byte at offset {offset}")]
    ContainsNul {
        /// `"path"` or `"abstract name"`.
        what: &'static str,
        /// Offset of the first NUL.
        offset: usize,
    },
    /// A path given to [`Address::from_path`] is not valid UTF-8, so it could not
    /// be written as a URI.
    #[error("socket path {path:?} is not valid UTF-8")]
    NotUtf8 {
        /// The path, lossily converted.
        path: String,
    },
}

impl Address {
    /// The address of the socket at an absolute file-system path.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, AddressError> {
        let path = path.as_ref();
        let text = path.to_str().ok_or_else(|| AddressError::NotUtf8 {
            path: path.to_string_lossy().into_owned(),
        })?;
        check_path(text)?;
        Ok(Address {
            kind: Kind::Path(PathBuf::from(text)),
        })
    }

    /// The address of the socket with this name in Linux's abstract
    /// namespace (without the leading NUL or `@`).
    pub fn from_abstract_name(name: &str) -> Result<Self, AddressError> {
        check_abstract(name)?;
        Ok(Address {
            kind: Kind::Abstract(name.to_owned()),
        })
    }

    /// The file-system path, if this is a path address.
    pub fn as_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Path(path) => Some(path),
            Kind::Abstract(_) => None,
        }
    }

    /// The abstract name, if this is an abstract address.
    pub fn as_abstract_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Path(_) => None,
            Kind::Abstract(name) => Some(name),
        }
    }
}

/// What an [`Address`] names, borrowed.
pub(crate) enum Target<'a> {
    /// A file-system path.
    Path(&'a Path),
    /// An abstract name.
    Abstract(&'a str),
}

impl Address {
    /// What the address names.
    pub(crate) fn target(&self) -> Target<'_> {
        match &self.kind {
            Kind::Path(path) => Target::Path(path),
            Kind::Abstract(name) => Target::Abstract(name),
        }
    }
}

fn check_path(path: &str) -> Result<(), AddressError> {
    if path.is_empty() {
        return Err(AddressError::Empty);
    }
    if !path.starts_with('/') {
        return Err(AddressError::RelativePath {
            path: path.to_owned(),
        });
    }
    if path.ends_with('/') {
        return Err(AddressError::DirectoryPath {
            path: path.to_owned(),
        });
    }
    check_bytes("path", path, MAX_PATH_LEN)
}

fn check_abstract(name: &str) -> Result<(), AddressError> {
    if name.is_empty() {
        return Err(AddressError::EmptyName);
    }
    check_bytes("abstract name", name, MAX_ABSTRACT_LEN)
}

fn check_bytes(what: &'static str, s: &str, max: usize) -> Result<(), AddressError> {
    if let Some(offset) = s.bytes().position(|b| b == 0) {
        return Err(AddressError::ContainsNul { what, offset });
    }
    if s.len() > max {
        return Err(AddressError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri
            .get(..PREFIX.len())
            .filter(|scheme| scheme.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| uri.get(PREFIX.len()..))
            .ok_or_else(|| AddressError::WrongScheme {
                uri: uri.to_owned(),
            })?;
        match rest.strip_prefix('@') {
            Some(name) => Address::from_abstract_name(name),
            None => {
                check_path(rest)?;
                Ok(Address {
                    kind: Kind::Path(PathBuf::from(rest)),
                })
            }
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            // Constructors only accept UTF-8 paths, so `display` is exact.
            Kind::Path(path) => write!(f, "{PREFIX}{}", path.display()),
            Kind::Abstract(name) => write!(f, "{PREFIX}@{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Address, AddressError> {
        s.parse()
    }

    #[test]
    fn path_uri_round_trips() {
        let a = parse("shm:///run/app/echo.sock").unwrap();
        assert_eq!(a.as_path(), Some(Path::new("/run/app/echo.sock")));
        assert_eq!(a.as_abstract_name(), None);
        assert_eq!(a.to_string(), "shm:///run/app/echo.sock");
        assert_eq!(parse(&a.to_string()).unwrap(), a);
    }

    #[test]
    fn abstract_uri_round_trips() {
        let a = parse("shm://@echo").unwrap();
        assert_eq!(a.as_abstract_name(), Some("echo"));
        assert_eq!(a.as_path(), None);
        assert_eq!(a.to_string(), "shm://@echo");
        assert_eq!(parse(&a.to_string()).unwrap(), a);
    }

    #[test]
    fn names_are_verbatim() {
        for uri in [
            "shm:///tmp/a b#c?d",
            "shm://@svc/with/slashes",
            "shm://@@double",
            "shm://@ünïcødé",
            "shm:///tmp/%20",
        ] {
            let a = parse(uri).unwrap();
            assert_eq!(a.to_string(), uri);
        }
        assert_eq!(
            parse("shm://@@double").unwrap().as_abstract_name(),
            Some("@double")
        );
    }

    #[test]
    fn scheme_is_case_insensitive_and_printed_lowercase() {
        let a = parse("SHM://@echo").unwrap();
        assert_eq!(a.to_string(), "shm://@echo");
        assert_eq!(a, parse("shm://@echo").unwrap());
    }

    #[test]
    fn wrong_scheme() {
        for uri in [
            "unix:///tmp/x",
            "/tmp/x",
            "shm:/tmp/x",
            "shm:",
            "",
            "shm//@x",
            "shé://@x",
        ] {
            assert_eq!(
                parse(uri),
                Err(AddressError::WrongScheme {
                    uri: uri.to_owned()
                }),
                "{uri}"
            );
        }
    }

    #[test]
    fn empty() {
        assert_eq!(parse("shm://"), Err(AddressError::Empty));
        assert_eq!(Address::from_path(""), Err(AddressError::Empty));
        assert_eq!(parse("shm://@"), Err(AddressError::EmptyName));
        assert_eq!(
            Address::from_abstract_name(""),
            Err(AddressError::EmptyName)
        );
    }

    #[test]
    fn relative_path() {
        assert_eq!(
            parse("shm://run/app.sock"),
            Err(AddressError::RelativePath {
                path: "run/app.sock".into()
            })
        );
        assert_eq!(
            Address::from_path("app.sock"),
            Err(AddressError::RelativePath {
                path: "app.sock".into()
            })
        );
    }

    #[test]
    fn directory_path() {
        assert_eq!(
            parse("shm:///run/app/"),
            Err(AddressError::DirectoryPath {
                path: "/run/app/".into()
            })
        );
        assert_eq!(
            parse("shm:///"),
            Err(AddressError::DirectoryPath { path: "/".into() })
        );
    }

    #[test]
    fn path_length_limit() {
        let longest = format!("/{}", "p".repeat(MAX_PATH_LEN - 1));
        let a = parse(&format!("shm://{longest}")).unwrap();
        assert_eq!(a.as_path().unwrap().as_os_str().len(), MAX_PATH_LEN);

        let too_long = format!("/{}", "p".repeat(MAX_PATH_LEN));
        assert_eq!(
            parse(&format!("shm://{too_long}")),
            Err(AddressError::TooLong {
                what: "path",
                len: MAX_PATH_LEN + 1,
                max: MAX_PATH_LEN
            })
        );
    }

    #[test]
    fn abstract_length_limit() {
        let longest = "n".repeat(MAX_ABSTRACT_LEN);
        assert!(parse(&format!("shm://@{longest}")).is_ok());
        let too_long = "n".repeat(MAX_ABSTRACT_LEN + 1);
        assert_eq!(
            parse(&format!("shm://@{too_long}")),
            Err(AddressError::TooLong {
                what: "abstract name",
                len: MAX_ABSTRACT_LEN + 1,
                max: MAX_ABSTRACT_LEN
            })
        );
        // Multi-byte characters count in bytes.
        let wide = "é".repeat(MAX_ABSTRACT_LEN / 2 + 1);
        assert!(matches!(
            Address::from_abstract_name(&wide),
            Err(AddressError::TooLong { .. })
        ));
    }

    #[test]
    fn nul_bytes() {
        assert_eq!(
            parse("shm:///tmp/a\0b"),
            Err(AddressError::ContainsNul {
                what: "path",
                offset: 6
            })
        );
        assert_eq!(
            parse("shm://@ab\0"),
            Err(AddressError::ContainsNul {
                what: "abstract name",
                offset: 2
            })
        );
    }

    #[test]
    fn non_utf8_path() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let path = Path::new(OsStr::from_bytes(b"/tmp/\xff.sock"));
        assert!(matches!(
            Address::from_path(path),
            Err(AddressError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn constructors_agree_with_parsing() {
        assert_eq!(
            Address::from_path("/run/x.sock").unwrap(),
            parse("shm:///run/x.sock").unwrap()
        );
        assert_eq!(
            Address::from_abstract_name("x").unwrap(),
            parse("shm://@x").unwrap()
        );
    }

    #[test]
    fn errors_read_well() {
        let e = parse("http://x").unwrap_err().to_string();
        assert!(e.contains("http://x") && e.contains("shm:///path"), "{e}");
        let e = parse("shm://rel").unwrap_err().to_string();
        assert!(e.contains("relative"), "{e}");
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Whatever parses prints back as it was written (scheme in
            /// lower case), and parses again to the same address.
            #[test]
            fn accepted_uris_round_trip(
                scheme in prop::sample::select(vec!["shm://", "SHM://", "Shm://", "shm:/", "x://"]),
                at in any::<bool>(),
                rest in prop::collection::vec(
                    prop_oneof![Just('/'), Just('\0'), Just('@'), any::<char>()],
                    0..120,
                ),
            ) {
                let rest: String = rest.into_iter().collect();
                let uri = format!("{scheme}{}{rest}", if at { "@" } else { "" });
                if let Ok(a) = uri.parse::<Address>() {
                    let printed = a.to_string();
                    prop_assert_eq!(&printed[PREFIX.len()..], &uri[PREFIX.len()..]);
                    prop_assert!(printed.starts_with(PREFIX));
                    prop_assert_eq!(printed.parse::<Address>(), Ok(a));
                }
            }

            /// Every valid name makes an address that round-trips.
            #[test]
            fn valid_names_round_trip(name in "[^\\x00]{1,26}") {
                prop_assume!(name.len() <= MAX_ABSTRACT_LEN);
                let a = Address::from_abstract_name(&name).unwrap();
                prop_assert_eq!(a.to_string().parse::<Address>(), Ok(a.clone()));
                let path = format!("/{}", name.trim_end_matches('/'));
                prop_assume!(!path.ends_with('/') && path.len() <= MAX_PATH_LEN);
                let p = Address::from_path(&path).unwrap();
                prop_assert_eq!(p.to_string().parse::<Address>(), Ok(p));
            }
        }
    }
}
