//! Engines loaded from dynamic libraries ("plugins"), through the stable
//! ABI of [`shmesh_engine_abi`].
//!
//! ```toml
//! [[engines]]
//! kind = "plugin"
//! name = "quota"
//! service = "billing"
//! path = "/opt/shmesh/plugins/quota-1.3.so"   # absolute
//! config = { default_calls = 1000 }           # handed to the plugin as TOML text
//! ```
//!
//! The library is loaded with [`abi_stable`]'s safe API: before anything
//! in it runs (beyond its static initialisers), abi_stable checks that it
//! was built with a compatible abi_stable, for the same major ABI version
//! ([`shmesh_engine_abi::ABI_VERSION`]), and that the type layout of its
//! root module, and of everything reachable from it, is the one the
//! daemon was built with. Each failure is a [`PluginError`] naming the
//! library. The engine's kind is `plugin:` and the kind the plugin
//! declares (`plugin:quota`), so its state is restored only into another
//! build of the same plugin.
//!
//! **Loading, once per file.** abi_stable never unloads a library (so no
//! reference into one can dangle), and its `RootModule::load_from_file`
//! keeps one module per *type* for the whole process: the first library
//! loaded would answer for every path after it, and a library that failed
//! its checks would stay the answer too. The daemon uses the lower-level
//! safe calls instead (`lib_header_from_path`, then
//! `LibHeader::init_root_module`), which load and check each library on
//! its own, and keeps its own table of the libraries it has loaded, by
//! path. The dynamic loader returns a library already loaded under the
//! same path without reading the file again, so:
//! - the same file under the same path is loaded once, and every engine
//!   built from it shares its module (a failure is remembered the same
//!   way);
//! - a new build must be installed at a new path (`quota-1.4.so`): each
//!   build then lives in the daemon side by side with the earlier ones,
//!   which stay mapped (a few MiB each) until the daemon exits;
//! - a file replaced or rewritten at a path already loaded is refused
//!   ([`PluginError::Replaced`]) rather than silently running the old
//!   code. (Rewriting a loaded library in place, as `cp` over it does, may
//!   also crash the process that maps it; install with a new name, or
//!   with `install`/`mv`, which replace the file instead.)

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use abi_stable::library::{LibraryError, lib_header_from_path};
use abi_stable::std_types::{ROption, RSlice, RStr, RVec};
use serde::{Deserialize, Serialize};
use shmesh::status::{Code, Status};
use shmesh_engine_abi as abi;
use thiserror::Error;

use super::{Admit, BuildError, CallInfo, Engine, EngineState, Flush, Outcome};

/// A plugin engine's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The engine's name (default `plugin`).
    #[serde(default)]
    pub name: Option<String>,
    /// The service it applies to (default `"*"`).
    #[serde(default = "super::all_services")]
    pub service: String,
    /// The library, by absolute path.
    pub path: PathBuf,
    /// The plugin's own settings, handed to it as TOML text.
    #[serde(default)]
    pub config: toml::Table,
}

/// Why a plugin cannot be loaded or started.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PluginError {
    /// The daemon's working directory is not the requester's.
    #[error("the path must be absolute")]
    NotAbsolute,
    /// The file cannot be read.
    #[error("cannot read it: {0}")]
    Unreadable(String),
    /// The dynamic loader refuses it (not a shared library, missing
    /// dependencies, another architecture …).
    #[error("cannot load it as a library: {0}")]
    NotALibrary(String),
    /// A library, but it exports no engine root module.
    #[error(
        "it is not a shmesh engine plugin: it exports no abi_stable root module (`#[export_root_module]`)"
    )]
    NotAPlugin,
    /// Built with an abi_stable whose ABI differs from the daemon's.
    #[error(
        "it was built with an incompatible abi_stable (its ABI {found}, the daemon's {expected})"
    )]
    AbiStable {
        /// The library's abi_stable ABI.
        found: String,
        /// The daemon's.
        expected: String,
    },
    /// Built for another engine ABI version.
    #[error(
        "it was built for engine ABI {found}; this daemon loads engine ABI {expected} (rebuild it against shmesh-engine-abi {expected})"
    )]
    AbiVersion {
        /// The version the plugin was built for.
        found: String,
        /// The daemon's ([`abi::ABI_VERSION`]).
        expected: String,
    },
    /// Its root module is laid out differently from the daemon's.
    #[error(
        "its root module does not have the layout of engine ABI {expected} (built against another shmesh-engine-abi, or not an engine plugin): {detail}"
    )]
    Layout {
        /// The daemon's ABI version.
        expected: String,
        /// abi_stable's account of the first difference.
        detail: String,
    },
    /// Its root module could not be made.
    #[error("its root module failed to initialise: {0}")]
    RootModule(String),
    /// Another file than the one loaded from this path before.
    #[error(
        "the file changed since the daemon loaded it from this path, and the dynamic loader would go on returning the library loaded first; install each build under a path of its own"
    )]
    Replaced,
    /// The plugin refused to build its engine.
    #[error("the plugin refused to start its engine: {0}")]
    Refused(String),
}

/// What identifies the file a library was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(path: &Path) -> Result<FileId, PluginError> {
        let meta = std::fs::metadata(path).map_err(|e| PluginError::Unreadable(e.to_string()))?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        })
    }
}

/// A library the daemon loaded (or tried to, and left loaded), and what
/// came of it.
struct Loaded {
    file: FileId,
    module: Result<(abi::EngineModuleRef, &'static str), PluginError>,
}

/// Every library loaded, by the path it was loaded from.
static LOADED: Mutex<Option<HashMap<PathBuf, Loaded>>> = Mutex::new(None);

/// The kinds of the plugins loaded (`plugin:quota`), each leaked once so
/// that engines can name it for the life of the process like the
/// built-in kinds.
static KINDS: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

fn kind_of(module: &abi::EngineModuleRef) -> &'static str {
    let kind = format!("plugin:{}", module.kind());
    let mut kinds = KINDS.lock().unwrap_or_else(|e| e.into_inner());
    let kinds = kinds.get_or_insert_with(HashSet::new);
    match kinds.get(kind.as_str()) {
        Some(known) => known,
        None => {
            let leaked: &'static str = Box::leak(kind.into_boxed_str());
            kinds.insert(leaked);
            leaked
        }
    }
}

/// Loads and checks the library at `path`, or returns the module loaded
/// from it before.
fn load(path: &Path) -> Result<(abi::EngineModuleRef, &'static str), PluginError> {
    if !path.is_absolute() {
        return Err(PluginError::NotAbsolute);
    }
    let file = FileId::of(path)?;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    let loaded = loaded.get_or_insert_with(HashMap::new);
    if let Some(before) = loaded.get(path) {
        if before.file != file {
            return Err(PluginError::Replaced);
        }
        return before.module.clone();
    }
    let header = match lib_header_from_path(path) {
        Ok(header) => header,
        // The library was unloaded again (these fail before
        // abi_stable keeps it): nothing to remember.
        Err(e) => return Err(library_error(e)),
    };
    // From here on the library stays loaded, whatever comes of it.
    let module = header
        .init_root_module::<abi::EngineModuleRef>()
        .map(|module| (module, kind_of(&module)))
        .map_err(library_error);
    loaded.insert(
        path.to_owned(),
        Loaded {
            file,
            module: module.clone(),
        },
    );
    module
}

/// Names what abi_stable found wrong.
fn library_error(e: LibraryError) -> PluginError {
    let expected = abi::ABI_VERSION.to_owned();
    match e {
        LibraryError::OpenError { err, .. } => PluginError::NotALibrary(err.to_string()),
        LibraryError::GetSymbolError { .. } => PluginError::NotAPlugin,
        LibraryError::InvalidAbiHeader(found) => {
            let ours = abi_stable::library::AbiHeader::VALUE;
            PluginError::AbiStable {
                found: format!("{}.{}", found.abi_major, found.abi_minor),
                expected: format!("{}.{}", ours.abi_major, ours.abi_minor),
            }
        }
        LibraryError::InvalidCAbi { found, expected } => PluginError::AbiStable {
            found: found.to_string(),
            expected: expected.to_string(),
        },
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => PluginError::AbiVersion {
            found: actual_version.to_string(),
            expected,
        },
        LibraryError::ParseVersionError(e) => PluginError::AbiVersion {
            found: format!("(unreadable: {e})"),
            expected,
        },
        LibraryError::AbiInstability(report) => {
            let report = report.to_string();
            tracing::warn!(
                "abi_stable's report on the layout of a plugin's root module:\n{report}"
            );
            PluginError::Layout {
                expected,
                detail: differences(&report),
            }
        }
        LibraryError::RootModule { err, .. } => PluginError::RootModule(one_line(&err.to_string())),
        many @ LibraryError::Many(_) => PluginError::RootModule(one_line(&many.to_string())),
    }
}

/// What abi_stable's layout report finds wrong (its `Error:` lines; the
/// whole report, type layouts and all, goes to the daemon's log).
fn differences(report: &str) -> String {
    let mut found: Vec<&str> = Vec::new();
    for line in report.lines() {
        if let Some(error) = line.trim().strip_prefix("Error:")
            && !found.contains(&error.trim())
        {
            found.push(error.trim());
        }
    }
    if found.is_empty() {
        return one_line(report);
    }
    one_line(&found.join("; "))
}

/// abi_stable's reports run over many lines: the first few non-empty
/// ones, joined.
fn one_line(report: &str) -> String {
    const LINES: usize = 6;
    const CHARS: usize = 600;
    let mut text = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(LINES)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some((cut, _)) = text.char_indices().nth(CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// A loaded plugin's engine, as the daemon's [`Engine`].
pub struct PluginEngine {
    kind: &'static str,
    path: PathBuf,
    engine: abi::PluginEngineBox,
}

impl std::fmt::Debug for PluginEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginEngine")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PluginEngine {
    /// Loads the plugin (once per file) and builds its engine, restoring
    /// `state` if it comes from an engine of the same kind.
    pub fn new(config: &PluginConfig, state: Option<&EngineState>) -> Result<Self, BuildError> {
        let path = config.path.clone();
        let fail = |source: PluginError| BuildError::Plugin {
            path: path.clone(),
            source,
        };
        let (module, kind) = load(&config.path).map_err(fail)?;
        if let Some(state) = state
            && state.kind != kind
        {
            return Err(BuildError::KindMismatch {
                from: state.kind.clone(),
                into: kind,
            });
        }
        let text = toml::to_string(&config.config)
            .map_err(|e| BuildError::Config(format!("config: {e}")))?;
        let data: ROption<RSlice<'_, u8>> = state.map(|s| RSlice::from_slice(&s.data)).into();
        let engine = (module.new_engine())(RStr::from_str(&text), data)
            .into_result()
            .map_err(|e| fail(PluginError::Refused(e.into_string())))?;
        tracing::info!(kind, path = %path.display(), "plugin engine started");
        Ok(PluginEngine { kind, path, engine })
    }

    /// Calls `f` with the plugin's view of `call`, borrowed from it.
    fn with_call<T>(call: &CallInfo, f: impl FnOnce(&abi::CallInfo<'_>) -> T) -> T {
        let notes: Vec<abi::NoteRef<'_>> = call
            .annotations
            .iter()
            .map(|(key, value)| abi::NoteRef {
                key: RStr::from_str(key),
                value: RStr::from_str(value),
            })
            .collect();
        let deadline_ns = call.deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now()).as_nanos();
            u64::try_from(left).unwrap_or(u64::MAX)
        });
        let info = abi::CallInfo {
            pid: call.caller.pid,
            uid: call.caller.uid,
            gid: call.caller.gid,
            app: RStr::from_str(&call.caller.app),
            service: RStr::from_str(call.service),
            method: call.method,
            size: call.size as u64,
            deadline_ns: deadline_ns.into(),
            annotations: RSlice::from_slice(&notes),
        };
        f(&info)
    }
}

impl Engine for PluginEngine {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn admit(&self, call: &mut CallInfo) -> Result<Admit, Status> {
        let mut notes = RVec::new();
        let verdict = Self::with_call(call, |info| self.engine.admit(info, &mut notes));
        call.annotations.extend(
            notes
                .into_iter()
                .map(|n| (n.key.into_string(), n.value.into_string())),
        );
        match verdict {
            abi::Verdict::Pass => Ok(Admit::Pass),
            abi::Verdict::Retry => Ok(Admit::Retry),
            abi::Verdict::Reject { code, message } => {
                let code = Code::from_u32(code)
                    .filter(|c| !c.is_ok())
                    .unwrap_or(Code::Unknown);
                Err(Status::new(code, message.into_string()))
            }
        }
    }

    fn done(&self, call: &CallInfo, outcome: &Outcome) {
        let elapsed = u64::try_from(outcome.elapsed.as_nanos()).unwrap_or(u64::MAX);
        Self::with_call(call, |info| {
            self.engine.done(info, outcome.code.as_u32(), elapsed)
        });
    }

    fn flush(&self, how: Flush) {
        self.engine.flush(match how {
            Flush::Release => abi::FlushMode::Release,
            Flush::Requeue => abi::FlushMode::Requeue,
        });
    }

    fn decompose(&self) -> EngineState {
        EngineState {
            kind: self.kind.to_owned(),
            data: self.engine.decompose().into_vec(),
        }
    }

    fn describe(&self) -> String {
        self.engine.describe().into_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn layout_reports_come_down_to_their_errors() {
        let report = "Compared <this>:\n  --- Type Layout ---\n\nError:too many fields\nExpected:\n    3\n\nError:unexpected field\nExpected:\nError:too many fields\n";
        assert_eq!(differences(report), "too many fields; unexpected field");
        assert_eq!(differences("\nno errors\nhere\n"), "no errors here");
    }

    #[test]
    fn long_reports_are_cut_to_a_line() {
        let report = "\n\nfirst\n   second  \n\n".to_owned() + &"x".repeat(2000);
        let line = one_line(&report);
        assert!(line.starts_with("first second x"), "{line}");
        assert_eq!(line.chars().count(), 601);
    }

    #[test]
    fn paths_must_be_absolute_and_readable() {
        assert_eq!(
            load(Path::new("libquota.so")).err(),
            Some(PluginError::NotAbsolute)
        );
        let missing = load(Path::new("/nonexistent/libquota.so")).err().unwrap();
        assert!(matches!(missing, PluginError::Unreadable(_)), "{missing}");
    }

    #[test]
    fn a_file_that_is_no_library_is_refused_and_not_remembered() {
        let dir = std::env::temp_dir().join(format!("shmeshd-plugin-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("libjunk.so");
        std::fs::write(&file, b"not an ELF file").unwrap();
        let err = load(&file).err().unwrap();
        assert!(matches!(err, PluginError::NotALibrary(_)), "{err}");
        let remembered = LOADED
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|l| l.contains_key(&file));
        assert!(!remembered);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
