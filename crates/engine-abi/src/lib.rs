//! The stable ABI between `shmeshd` and policy engines loaded from dynamic
//! libraries ("engine plugins").
//!
//! A plugin is a `cdylib` that exports one [`EngineModule`] with
//! [`abi_stable`]'s `#[export_root_module]`. The daemon loads it when a
//! pipeline change names it:
//!
//! ```toml
//! kind = "plugin"
//! name = "quota"                                  # the stage's name
//! service = "billing"                             # default "*"
//! path = "/opt/shmesh/plugins/quota-1.3.so"       # absolute
//! config = { default_calls = 1000 }               # handed to the plugin as TOML text
//! ```
//!
//! Everything that crosses the boundary is `#[repr(C)]` and derives
//! [`StableAbi`](abi_stable::StableAbi): the library carries the type
//! layout of its root module (and, through it, of every type and
//! trait-object vtable reachable from it), and the daemon compares it with
//! its own when it loads the library, before it calls anything in it. A plugin built against another version
//! of this interface is refused with an error that names the difference,
//! not called into.
//!
//! # Versions
//!
//! This crate's version is the ABI version ([`ABI_VERSION`]), independent
//! of the workspace's: abi_stable refuses a library whose root module was
//! declared with another major version (or, below 1.0, another minor),
//! and records the version in every type layout. Within one major
//! version, the only compatible changes are those abi_stable allows: new
//! fields at the end of [`EngineModule`] and new methods at the end of
//! [`PluginEngine`] (after the `last_prefix_field`), which an older daemon
//! does not see and a newer daemon finds missing (`None`) in an older
//! plugin. Anything else is a new major version.
//!
//! # Writing a plugin
//!
//! ```toml
//! # Cargo.toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! abi_stable = { version = "0.11.3", default-features = false }
//! shmesh-engine-abi = "1"
//! ```
//!
//! ```
//! use abi_stable::export_root_module;
//! use abi_stable::prefix_type::PrefixTypeTrait;
//! use abi_stable::sabi_extern_fn;
//! use abi_stable::sabi_trait::TD_Opaque;
//! use abi_stable::std_types::{RErr, ROk, ROption, RResult, RSlice, RStr, RString, RVec};
//! use shmesh_engine_abi::{
//!     CallInfo, EngineModule, EngineModuleRef, FlushMode, Note, PluginEngine, PluginEngineBox,
//!     PluginEngine_TO, Verdict, codes,
//! };
//!
//! /// Refuses calls bigger than a limit.
//! struct MaxSize {
//!     limit: u64,
//! }
//!
//! impl PluginEngine for MaxSize {
//!     fn admit(&self, call: &CallInfo<'_>, _notes: &mut RVec<Note>) -> Verdict {
//!         if call.size > self.limit {
//!             return Verdict::reject(codes::RESOURCE_EXHAUSTED, "request too big");
//!         }
//!         Verdict::Pass
//!     }
//!     fn done(&self, _call: &CallInfo<'_>, _code: u32, _elapsed_ns: u64) {}
//!     fn flush(&self, _how: FlushMode) {}
//!     fn decompose(&self) -> RVec<u8> {
//!         RVec::new() // no state to carry over
//!     }
//!     fn describe(&self) -> RString {
//!         format!("at most {} bytes", self.limit).into()
//!     }
//! }
//!
//! #[sabi_extern_fn]
//! fn new(config: RStr<'_>, _state: ROption<RSlice<'_, u8>>) -> RResult<PluginEngineBox, RString> {
//!     // `config` is the spec's `config` table as TOML text: parse it with
//!     // the `toml` crate; here, one key by hand.
//!     let limit = config
//!         .as_str()
//!         .trim()
//!         .strip_prefix("limit = ")
//!         .and_then(|n| n.parse().ok());
//!     match limit {
//!         Some(limit) => ROk(PluginEngine_TO::from_value(MaxSize { limit }, TD_Opaque)),
//!         None => RErr("config: `limit` (bytes) is required".into()),
//!     }
//! }
//!
//! /// The library's root module: what the daemon looks up and checks.
//! #[export_root_module]
//! pub fn root_module() -> EngineModuleRef {
//!     EngineModule { kind: abi_stable::rstr!("max-size"), new_engine: new }.leak_into_prefix()
//! }
//! # fn main() {
//! #     let engine = (root_module().new_engine())("limit = 4096".into(), abi_stable::std_types::RNone).unwrap();
//! #     let call = CallInfo::example();
//! #     assert_eq!(engine.admit(&call, &mut RVec::new()), Verdict::Pass);
//! # }
//! ```
//!
//! The rules a plugin lives by:
//!
//! - **It runs inside the daemon**, with the daemon's privileges, and is
//!   never unloaded (abi_stable leaks every library it loads, so no
//!   reference into one can dangle). Only root or the daemon's own user may
//!   change the pipeline, and so load a library.
//! - **It must not panic.** Wrap your `new_engine` function in
//!   `#[sabi_extern_fn]` (the trait's methods are wrapped already): a
//!   panic that reaches the boundary aborts the daemon rather than unwind
//!   through foreign frames.
//! - **`admit` may block** to delay or queue a call (the call's thread
//!   waits); [`FlushMode`] says what the calls it holds must do when the
//!   engine is removed ([`Verdict::Pass`]) or upgraded ([`Verdict::Retry`]).
//! - **Its kind is `plugin:` + [`EngineModule::kind`].** `decompose` hands
//!   its state, in its own encoding, to the engine replacing it, which is
//!   built only if its kind is the same: a new build of the same plugin
//!   restores it, anything else refuses it. Keep the encoding readable by
//!   later builds.
//! - **A new build goes to a new path.** The dynamic loader returns a
//!   library already loaded under the same path without reading the file
//!   again, so the daemon refuses a file replaced in place; install each
//!   build under its own name (`quota-1.3.so`, `quota-1.4.so`) and upgrade
//!   to it.

// `#[sabi_trait]` and `#[derive(StableAbi)]` expand to `unsafe` code (the
// type-erased vtables, `unsafe impl StableAbi`) and to impls inside a
// generated module (`non_local_definitions`); this crate writes no `unsafe`
// of its own. Those expansions are contained in `ffi` below, which allows
// exactly those two lints.
#![deny(unsafe_code)]

pub use ffi::*;

/// The version of this interface, which is the ABI version: a plugin must
/// have been built against the same major version.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The status codes a plugin rejects calls with (gRPC's numbering, as
/// `shmesh::status::Code`).
pub mod codes {
    /// The operation was cancelled.
    pub const CANCELLED: u32 = 1;
    /// Unknown error.
    pub const UNKNOWN: u32 = 2;
    /// The request is invalid.
    pub const INVALID_ARGUMENT: u32 = 3;
    /// The deadline passed.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// Something asked for was not found.
    pub const NOT_FOUND: u32 = 5;
    /// Something to create exists already.
    pub const ALREADY_EXISTS: u32 = 6;
    /// The caller may not make this call.
    pub const PERMISSION_DENIED: u32 = 7;
    /// A quota or a resource ran out.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// The system is not in the state the call needs.
    pub const FAILED_PRECONDITION: u32 = 9;
    /// Aborted, typically by a concurrency conflict.
    pub const ABORTED: u32 = 10;
    /// Past the valid range.
    pub const OUT_OF_RANGE: u32 = 11;
    /// Not implemented.
    pub const UNIMPLEMENTED: u32 = 12;
    /// An invariant is broken.
    pub const INTERNAL: u32 = 13;
    /// Unavailable; retrying may succeed.
    pub const UNAVAILABLE: u32 = 14;
    /// Data was lost.
    pub const DATA_LOSS: u32 = 15;
    /// The caller is not authenticated.
    pub const UNAUTHENTICATED: u32 = 16;
}

#[allow(unsafe_code, non_local_definitions)]
mod ffi {
    use abi_stable::library::RootModule;
    use abi_stable::sabi_types::VersionStrings;
    use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
    use abi_stable::{StableAbi, sabi_trait};

    /// A note an engine attaches to a call, for the engines after it (and
    /// the log); an engine adds its own through `admit`'s `notes`.
    #[repr(C)]
    #[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
    pub struct Note {
        /// What it is about.
        pub key: RString,
        /// What it says.
        pub value: RString,
    }

    /// A note already on a call, borrowed for the length of a call into the
    /// plugin.
    #[repr(C)]
    #[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
    pub struct NoteRef<'a> {
        /// What it is about.
        pub key: RStr<'a>,
        /// What it says.
        pub value: RStr<'a>,
    }

    /// What an engine sees of a call (borrowed for the length of one call
    /// into the plugin: copy what you keep).
    #[repr(C)]
    #[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CallInfo<'a> {
        /// The caller's process id (in the daemon's pid namespace).
        pub pid: i32,
        /// The caller's effective user id.
        pub uid: u32,
        /// The caller's effective group id.
        pub gid: u32,
        /// The caller's program name.
        pub app: RStr<'a>,
        /// The service called.
        pub service: RStr<'a>,
        /// The method id.
        pub method: u32,
        /// The request's size in bytes.
        pub size: u64,
        /// The time left before the caller's deadline, in nanoseconds (0 if
        /// it has passed), if it set one.
        pub deadline_ns: ROption<u64>,
        /// Notes engines before this one attached.
        pub annotations: RSlice<'a, NoteRef<'a>>,
    }

    impl CallInfo<'static> {
        /// A call of method 1 of service `"example"` by uid 1000 (`app`),
        /// 64 bytes, no deadline: for a plugin's unit tests.
        pub fn example() -> CallInfo<'static> {
            CallInfo {
                pid: 1,
                uid: 1000,
                gid: 1000,
                app: RStr::from_str("app"),
                service: RStr::from_str("example"),
                method: 1,
                size: 64,
                deadline_ns: ROption::RNone,
                annotations: RSlice::EMPTY,
            }
        }
    }

    /// An engine's answer to a call.
    #[repr(u8)]
    #[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
    pub enum Verdict {
        /// On to the next engine (after however long `admit` held it).
        Pass,
        /// The engine was flushed with [`FlushMode::Requeue`] while it held
        /// the call: the daemon runs it again through its replacement.
        Retry,
        /// Refuse the call with this status.
        Reject {
            /// The status code (see [`crate::codes`]; 0 or an unknown code
            /// reaches the caller as `UNKNOWN`).
            code: u32,
            /// The status message.
            message: RString,
        },
    }

    impl Verdict {
        /// [`Verdict::Reject`] with `code` and `message`.
        pub fn reject(code: u32, message: impl Into<RString>) -> Verdict {
            Verdict::Reject {
                code,
                message: message.into(),
            }
        }
    }

    /// How [`PluginEngine::flush`] lets go of the calls the engine holds.
    #[repr(u8)]
    #[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
    pub enum FlushMode {
        /// The engine is removed: held calls return [`Verdict::Pass`] and go
        /// on downstream.
        Release,
        /// The engine is upgraded: held calls return [`Verdict::Retry`] and
        /// enter its replacement.
        Requeue,
    }

    /// A policy engine implemented by a plugin: the daemon's `Engine`
    /// trait across the ABI. Called from many threads at once.
    #[sabi_trait]
    pub trait PluginEngine: Send + Sync {
        /// Decides on a call; may block to delay or queue it. Notes pushed
        /// onto `notes` are attached to the call.
        fn admit(&self, call: &CallInfo<'_>, notes: &mut RVec<Note>) -> Verdict;

        /// A call this engine admitted ended with status `code` after
        /// `elapsed_ns` nanoseconds (from its admission by the first
        /// engine).
        fn done(&self, call: &CallInfo<'_>, code: u32, elapsed_ns: u64);

        /// Lets go of every call the engine holds (see [`FlushMode`]).
        fn flush(&self, how: FlushMode);

        /// The engine's state, in its own encoding, for its replacement
        /// (the `state` of [`EngineModule::new_engine`]).
        fn decompose(&self) -> RVec<u8>;

        /// One line on what it does, for `shmesh policy list`.
        #[sabi(last_prefix_field)]
        fn describe(&self) -> RString;
    }

    /// A plugin engine as the daemon holds it: boxed behind its vtable.
    pub type PluginEngineBox = PluginEngine_TO<'static, RBox<()>>;

    /// A plugin's root module, exported with `#[export_root_module]`.
    #[repr(C)]
    #[derive(StableAbi)]
    #[sabi(kind(Prefix(prefix_ref = EngineModuleRef)))]
    pub struct EngineModule {
        /// The engine's kind, without the `plugin:` the daemon puts before
        /// it (`"quota"`).
        pub kind: RStr<'static>,
        /// Builds an engine: `config` is the spec's `config` table as TOML
        /// text (empty if there is none), `state` what a previous engine of
        /// the same kind decomposed into, if this one replaces it. An `RErr`
        /// is shown to whoever asked for the change.
        ///
        /// (Spelled out here rather than through a type alias: the layout
        /// derive reads function pointer signatures from the field's type.)
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
        const VERSION_STRINGS: VersionStrings = abi_stable::package_version_strings!();
    }
}

#[cfg(test)]
mod tests;
