//! The load-time checks, in process: a root module is checked exactly as
//! the daemon checks one it finds in a library (`LibHeader`), without
//! building one.
#![allow(
    clippy::unwrap_used,
    unsafe_code,
    non_local_definitions,
    missing_docs,
    dead_code
)]

use abi_stable::library::{LibHeader, LibraryError, RootModule};
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RNone, ROk, ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::{StableAbi, sabi_extern_fn};

use super::*;

struct Counter(std::sync::atomic::AtomicU64);

impl PluginEngine for Counter {
    fn admit(&self, call: &CallInfo<'_>, notes: &mut RVec<Note>) -> Verdict {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        notes.push(Note {
            key: "counted".into(),
            value: n.to_string().into(),
        });
        if call.method == 2 {
            Verdict::reject(codes::PERMISSION_DENIED, "not method 2")
        } else {
            Verdict::Pass
        }
    }
    fn done(&self, _call: &CallInfo<'_>, _code: u32, _elapsed_ns: u64) {}
    fn flush(&self, _how: FlushMode) {}
    fn decompose(&self) -> RVec<u8> {
        self.0
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes()
            .to_vec()
            .into()
    }
    fn describe(&self) -> RString {
        "counts".into()
    }
}

#[sabi_extern_fn]
fn new_counter(
    config: RStr<'_>,
    state: ROption<RSlice<'_, u8>>,
) -> RResult<PluginEngineBox, RString> {
    if !config.is_empty() {
        return RResult::RErr("no config expected".into());
    }
    let n = match state {
        ROption::RSome(bytes) => match <[u8; 8]>::try_from(bytes.as_slice()) {
            Ok(b) => u64::from_le_bytes(b),
            Err(_) => return RResult::RErr("bad state".into()),
        },
        ROption::RNone => 0,
    };
    ROk(PluginEngine_TO::from_value(Counter(n.into()), TD_Opaque))
}

fn module() -> EngineModuleRef {
    EngineModule {
        kind: abi_stable::rstr!("counter"),
        new_engine: new_counter,
    }
    .leak_into_prefix()
}

#[test]
fn a_module_of_this_version_loads_and_its_engine_answers() {
    let header = LibHeader::from_module(module());
    let loaded: EngineModuleRef = header.init_root_module().unwrap();
    assert_eq!(loaded.kind().as_str(), "counter");
    let engine = (loaded.new_engine())(RStr::from_str(""), RNone).unwrap();
    let mut notes = RVec::new();
    assert_eq!(
        engine.admit(&CallInfo::example(), &mut notes),
        Verdict::Pass
    );
    let denied = CallInfo {
        method: 2,
        ..CallInfo::example()
    };
    assert_eq!(
        engine.admit(&denied, &mut notes),
        Verdict::reject(codes::PERMISSION_DENIED, "not method 2")
    );
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[1].value.as_str(), "2");
    // The state goes into a replacement.
    let state = engine.decompose();
    let next =
        (loaded.new_engine())(RStr::from_str(""), ROption::RSome(state.as_rslice())).unwrap();
    assert_eq!(next.decompose(), state);
    assert!((loaded.new_engine())(RStr::from_str("x = 1"), RNone).is_err());
}

/// The root module as an imagined earlier draft of this ABI had it: same
/// name, package and version, but `new` took no state.
mod draft {
    use super::*;

    #[repr(C)]
    #[derive(StableAbi)]
    #[sabi(kind(Prefix(prefix_ref = EngineModuleRef)))]
    pub struct EngineModule {
        pub kind: RStr<'static>,
        #[sabi(last_prefix_field)]
        pub new_engine: extern "C" fn(config: RStr<'_>) -> RResult<PluginEngineBox, RString>,
    }

    impl RootModule for EngineModuleRef {
        abi_stable::declare_root_module_statics! {EngineModuleRef}
        const BASE_NAME: &'static str = "shmesh_engine";
        const NAME: &'static str = "shmesh engine plugin";
        const VERSION_STRINGS: VersionStrings = abi_stable::package_version_strings!();
    }

    #[sabi_extern_fn]
    pub fn new(_config: RStr<'_>) -> RResult<PluginEngineBox, RString> {
        RResult::RErr("never called".into())
    }
}

#[test]
fn a_module_of_another_layout_is_refused_before_anything_is_called() {
    let other = draft::EngineModule {
        kind: abi_stable::rstr!("draft"),
        new_engine: draft::new,
    }
    .leak_into_prefix();
    let header = LibHeader::from_module(other);
    let err = header.init_root_module::<EngineModuleRef>().err().unwrap();
    assert!(matches!(err, LibraryError::AbiInstability(_)), "{err}");
}

/// A root module declared for the next major version.
mod next {
    use super::*;

    #[repr(C)]
    #[derive(StableAbi)]
    #[sabi(kind(Prefix(prefix_ref = EngineModuleRef)))]
    pub struct EngineModule {
        pub kind: RStr<'static>,
        #[sabi(last_prefix_field)]
        pub new_engine: extern "C" fn(
            config: RStr<'_>,
            state: ROption<RSlice<'_, u8>>,
        ) -> RResult<PluginEngineBox, RString>,
    }

    impl RootModule for EngineModuleRef {
        abi_stable::declare_root_module_statics! {EngineModuleRef}
        const BASE_NAME: &'static str = "shmesh_engine";
        const NAME: &'static str = "shmesh engine plugin";
        const VERSION_STRINGS: VersionStrings = VersionStrings::new("2.0.0");
    }
}

#[test]
fn a_module_of_another_major_version_is_refused() {
    let other = next::EngineModule {
        kind: abi_stable::rstr!("next"),
        new_engine: new_counter,
    }
    .leak_into_prefix();
    let header = LibHeader::from_module(other);
    let err = header.init_root_module::<EngineModuleRef>().err().unwrap();
    assert!(
        matches!(err, LibraryError::IncompatibleVersionNumber { .. }),
        "{err}"
    );
}
