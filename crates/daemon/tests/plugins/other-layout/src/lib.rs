//! A test fixture: a library that claims engine ABI 1.0.0 but exports a
//! root module of its own (another package, another shape), as one built
//! against a fork of the interface would. The daemon must refuse it by
//! its layout, before calling anything in it. (Field-by-field layout
//! differences are tested in process in shmesh-engine-abi.)
// A fixture: its fields, and the static `#[export_root_module]` adds, go
// undocumented.
#![allow(missing_docs)]

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr, RString};
use abi_stable::{StableAbi, export_root_module, sabi_extern_fn};

/// A root module with the right name and version, and the wrong shape.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = EngineModuleRef)))]
pub struct EngineModule {
    pub kind: RStr<'static>,
    #[sabi(last_prefix_field)]
    pub new_engine: extern "C" fn(config: RStr<'_>, verbose: bool) -> RResult<u64, RString>,
}

impl RootModule for EngineModuleRef {
    abi_stable::declare_root_module_statics! {EngineModuleRef}
    const BASE_NAME: &'static str = "shmesh_engine";
    const NAME: &'static str = "shmesh engine plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("1.0.0");
}

#[sabi_extern_fn]
fn new_engine(_config: RStr<'_>, _verbose: bool) -> RResult<u64, RString> {
    RResult::RErr("never called".into())
}

#[export_root_module]
pub fn root_module() -> EngineModuleRef {
    EngineModule {
        kind: abi_stable::rstr!("other"),
        new_engine,
    }
    .leak_into_prefix()
}
