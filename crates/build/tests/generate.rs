//! shmesh-build on `.proto` files of its own: what it writes, and that an
//! unreadable file is an error rather than a panic.
// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

/// A fresh directory under the system's temporary one.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shmesh-build-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const PROTO: &str = r#"
syntax = "proto3";
package demo.v1;

message Ping { int64 at = 1; }
message Pong { int64 at = 1; }

// Every kind of call.
service Kinds {
  rpc One(Ping) returns (Pong);
  rpc Down(Ping) returns (stream Pong);
  rpc Up(stream Ping) returns (Pong);
  rpc Both(stream Ping) returns (stream Pong);
}

service Empty {}
"#;

#[test]
fn generates_schema_clients_and_server_per_service() {
    let dir = scratch("kinds");
    std::fs::write(dir.join("kinds.proto"), PROTO).unwrap();
    shmesh_build::configure()
        .out_dir(&dir)
        .compile_protos(&[dir.join("kinds.proto")], &[&dir])
        .unwrap();
    let code = std::fs::read_to_string(dir.join("demo.v1.rs")).unwrap();
    for expected in [
        "pub mod kinds_schema",
        "pub const SERVICE_NAME: &str = \"demo.v1.Kinds\";",
        "pub const ONE: u32 = 1;",
        "pub const DOWN: u32 = 2;",
        "pub const UP: u32 = 3;",
        "pub const BOTH: u32 = 4;",
        "pub mod kinds_client",
        "pub struct KindsClient",
        "pub mod kinds_blocking_client",
        "pub struct KindsBlockingClient",
        "pub mod kinds_server",
        "pub trait Kinds",
        "pub struct KindsServer<T>",
        "::shmesh_protobuf::server::bidi_streaming(",
        "::shmesh_protobuf::client::ClientStreaming<",
        "/// Every kind of call.",
        "pub mod empty_server",
        "pub const SERVICE_NAME: &str = \"demo.v1.Empty\";",
        "::shmesh_protobuf::prost::Message",
    ] {
        assert!(code.contains(expected), "no {expected:?} in:\n{code}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_hash_in_the_code_is_the_documented_one() {
    let dir = scratch("hash");
    std::fs::write(dir.join("kinds.proto"), PROTO).unwrap();
    shmesh_build::configure()
        .out_dir(&dir)
        .build_client(false)
        .compile_protos(&[dir.join("kinds.proto")], &[&dir])
        .unwrap();
    let code = std::fs::read_to_string(dir.join("demo.v1.rs")).unwrap();
    assert!(!code.contains("kinds_client"), "clients were not asked for");

    use shmesh_build::schema::{MethodSchema, ServiceSchema};
    let method = |name: &str, client_streaming, server_streaming| MethodSchema {
        name: name.into(),
        input_type: "demo.v1.Ping".into(),
        output_type: "demo.v1.Pong".into(),
        client_streaming,
        server_streaming,
    };
    let hash = ServiceSchema {
        name: "demo.v1.Kinds".into(),
        methods: vec![
            method("One", false, false),
            method("Down", false, true),
            method("Up", true, false),
            method("Both", true, true),
        ],
    }
    .hash();
    // The generated array, whitespace aside.
    let flat: String = code.split_whitespace().collect();
    let bytes: Vec<String> = hash.iter().map(|b| format!("{b:#04x}")).collect();
    let expected = format!("SchemaHash([{},]);", bytes.join(","));
    let expected_without_trailing_comma = format!("SchemaHash([{}]);", bytes.join(","));
    assert!(
        flat.contains(&expected) || flat.contains(&expected_without_trailing_comma),
        "hash {hash:02x?} not in:\n{code}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_file_is_an_error() {
    let dir = scratch("missing");
    let error = shmesh_build::configure()
        .out_dir(&dir)
        .compile_protos(&[dir.join("nope.proto")], &[&dir])
        .unwrap_err();
    assert!(error.to_string().contains("nope.proto"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
