//! Compiles `.proto` files, from a `build.rs`, into prost messages plus
//! shmesh clients and servers, with no system `protoc`:
//! [protox](https://docs.rs/protox) parses the files, prost-build writes
//! the messages, and this crate writes, for each service, modules that
//! read like tonic's.
//!
//! ```no_run
//! // build.rs
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     shmesh_build::compile_protos(&["proto/greeter.proto"], &["proto"])?;
//!     Ok(())
//! }
//! ```
//!
//! and in the crate, which depends on `shmesh-protobuf` (the generated
//! code's runtime) and `tokio`:
//!
//! ```ignore
//! pub mod helloworld {
//!     include!(concat!(env!("OUT_DIR"), "/helloworld.rs"));
//! }
//! ```
//!
//! # What is generated
//!
//! For a service `Greeter` in package `helloworld`, beside its messages:
//!
//! - `greeter_schema`: `SERVICE_NAME` (the fully qualified name,
//!   `"helloworld.Greeter"`, which the handshake checks), `SCHEMA_HASH`
//!   (see [`schema`] for what changes it), and one method id constant per
//!   RPC, `SAY_HELLO: u32 = 1` and so on: **a method's id is its 1-based
//!   position in the service**;
//! - `greeter_client::GreeterClient`: async, over shmesh's
//!   `AsyncChannel`: `GreeterClient::connect("shm://@greeter").await`, then
//!   one method per RPC: unary ones return the response, server-streaming
//!   ones a `Streaming` to read with `message().await`, client-streaming
//!   ones a `ClientStreaming` to `send` on and `finish`, bidirectional ones
//!   a `BidiStreaming` to do both; `with_timeout` and `with_metadata`
//!   (call metadata such as a `traceparent`) apply to every call of the
//!   client they return;
//! - `greeter_blocking_client::GreeterBlockingClient`: the same over the
//!   blocking `Channel`;
//! - `greeter_server`: the `Greeter` trait, one method per RPC returning a
//!   `Send` future (implement it with `async fn`), and `GreeterServer`,
//!   which mounts an implementation on a shmesh `Router`
//!   (`into_router`) or binds a `Server` at an address (`bind`).
//! - with [`Builder::grpc`], also `greeter_server::GreeterGrpcServer`
//!   (from `GreeterServer::into_grpc`): the same trait implementation as a
//!   tonic service, to serve over gRPC (HTTP/2, TCP) beside shmesh; and
//!   both clients connect through a transport picked from the address's
//!   scheme: `shm://` for shmesh, `http://` or `https://` for gRPC (the
//!   blocking one runs its gRPC calls on a one-thread runtime of its own).
//!
//! The runtime types named there live in the `shmesh-protobuf` crate.

#![forbid(unsafe_code)]

mod generator;
pub mod schema;

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Compiling `.proto` files failed.
#[derive(Debug, Error)]
pub enum Error {
    /// A `.proto` file could not be read, parsed or resolved.
    #[error("cannot compile the .proto files: {0}")]
    Parse(#[from] protox::Error),
    /// Writing the generated code failed.
    #[error("cannot generate code: {0}")]
    Generate(#[from] std::io::Error),
}

/// Compiles `protos` (looked up in `includes`) into `OUT_DIR`, one file per
/// protobuf package (`helloworld.rs` for `package helloworld;`), with
/// clients and servers for every service; asks cargo to rerun the build
/// when any of them (or the include directories) change.
pub fn compile_protos(
    protos: &[impl AsRef<Path>],
    includes: &[impl AsRef<Path>],
) -> Result<(), Error> {
    configure().compile_protos(protos, includes)
}

/// A [`Builder`] with the defaults: clients and servers, into `OUT_DIR`.
pub fn configure() -> Builder {
    Builder {
        out_dir: None,
        build_client: true,
        build_server: true,
        grpc: false,
        runtime_crate: "::shmesh_protobuf".to_owned(),
    }
}

/// What to generate, and where.
#[derive(Debug, Clone)]
pub struct Builder {
    out_dir: Option<PathBuf>,
    build_client: bool,
    build_server: bool,
    grpc: bool,
    runtime_crate: String,
}

impl Default for Builder {
    fn default() -> Self {
        configure()
    }
}

impl Builder {
    /// Writes the generated files into `out_dir` instead of `OUT_DIR`.
    pub fn out_dir(mut self, out_dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(out_dir.into());
        self
    }

    /// Whether to generate the clients (default: yes).
    pub fn build_client(mut self, enable: bool) -> Self {
        self.build_client = enable;
        self
    }

    /// Whether to generate the servers (default: yes).
    pub fn build_server(mut self, enable: bool) -> Self {
        self.build_server = enable;
        self
    }

    /// Whether each server also gets a gRPC front-end (default: no):
    /// `FooServer::into_grpc` turns it into a `FooGrpcServer`, a tonic
    /// service to add to a `tonic::transport::Server`, serving the same
    /// trait implementation over HTTP/2; and the async client connects
    /// over gRPC to `http://` and `https://` addresses (over shmesh to
    /// `shm://` ones). Needs `shmesh-protobuf`'s `tonic` feature.
    pub fn grpc(mut self, enable: bool) -> Self {
        self.grpc = enable;
        self
    }

    /// The path the generated code names the runtime by (default
    /// `::shmesh_protobuf`), for a crate that renames it or re-exports it.
    pub fn runtime_crate(mut self, path: impl Into<String>) -> Self {
        self.runtime_crate = path.into();
        self
    }

    /// Compiles `protos`, looked up in `includes` (see [`compile_protos`]).
    pub fn compile_protos(
        self,
        protos: &[impl AsRef<Path>],
        includes: &[impl AsRef<Path>],
    ) -> Result<(), Error> {
        self.compile_with_config(prost_build::Config::new(), protos, includes)
    }

    /// Compiles `protos` with prost-build configured as in `config` (for
    /// its type attributes, `bytes` fields and so on); its service
    /// generator and prost path (the runtime's re-export of prost) are
    /// replaced, and its output directory too if [`Builder::out_dir`] was
    /// set.
    pub fn compile_with_config(
        self,
        mut config: prost_build::Config,
        protos: &[impl AsRef<Path>],
        includes: &[impl AsRef<Path>],
    ) -> Result<(), Error> {
        let paths = protos.iter().map(AsRef::as_ref);
        for path in paths.chain(includes.iter().map(AsRef::as_ref)) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        let descriptors = protox::compile(protos, includes)?;
        if let Some(out_dir) = &self.out_dir {
            config.out_dir(out_dir);
        }
        // The messages derive prost's traits through the runtime's
        // re-export, so the crate needs no direct dependency on prost.
        config.prost_path(format!("{}::prost", self.runtime_crate));
        config.service_generator(Box::new(generator::Generator {
            client: self.build_client,
            server: self.build_server,
            grpc: self.grpc,
            runtime: self.runtime_crate,
        }));
        config.compile_fds(descriptors)?;
        Ok(())
    }
}
