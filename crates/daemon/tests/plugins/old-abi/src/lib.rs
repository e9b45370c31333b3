//! A test fixture: an engine plugin as an imagined engine ABI 0.9 had it
//! (its constructor took no state). The daemon must refuse it by its
//! version, before calling anything in it.
// A fixture: its fields, and the static `#[export_root_module]` adds, go
// undocumented.
#![allow(missing_docs)]

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr, RString};
use abi_stable::{StableAbi, export_root_module, sabi_extern_fn};

/// The root module of engine ABI 0.9.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = EngineModuleRef)))]
pub struct EngineModule {
    pub kind: RStr<'static>,
    #[sabi(last_prefix_field)]
    pub new_engine: extern "C" fn(config: RStr<'_>) -> RResult<u64, RString>,
}

impl RootModule for EngineModuleRef {
    abi_stable::declare_root_module_statics! {EngineModuleRef}
    const BASE_NAME: &'static str = "shmesh_engine";
    const NAME: &'static str = "shmesh engine plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("0.9.0");
}

#[sabi_extern_fn]
fn new_engine(_config: RStr<'_>) -> RResult<u64, RString> {
    RResult::RErr("engine ABI 0.9 is not served here".into())
}

#[export_root_module]
pub fn root_module() -> EngineModuleRef {
    EngineModule {
        kind: abi_stable::rstr!("old"),
        new_engine,
    }
    .leak_into_prefix()
}
