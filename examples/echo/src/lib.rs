//! The echo service shared by `echo-server` and `echo-client`: its name,
//! schema hash and method ids.

use shmesh::SchemaHash;

/// The service name both sides use.
pub const SERVICE: &str = "echo";
/// The schema hash both sides use (until code generation computes one).
pub const SCHEMA: SchemaHash = SchemaHash(*b"shmesh-example-echo-schema-v1\0\0\0");
/// Answers with the request's bytes.
pub const ECHO: u32 = 1;
/// Answers with the number of live connections, as 8 little-endian bytes.
pub const STATS: u32 = 2;
/// Sleeps for the number of milliseconds in the request (8 LE bytes), then
/// answers with nothing.
pub const SLEEP: u32 = 3;
/// Bidirectional streaming: answers each message with its bytes, in order.
pub const ECHO_STREAM: u32 = 4;
/// Client streaming, a deliberately slow reader: waits 100 ms, then reads
/// every message and answers with their total length (8 LE bytes). Flow
/// control holds a fast sender back meanwhile.
pub const SLOW_SUM: u32 = 5;
