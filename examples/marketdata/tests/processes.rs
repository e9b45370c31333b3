//! The market-data server and client as real processes: the client binary
//! against the server binary in both trust settings, calls from this test
//! process with both read modes, garbage from a client, and a server killed
//! under a client's feet.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shmesh::client::{Channel, ChannelOptions};
use shmesh::status::Code;
use shmesh_example_marketdata::{
    PUBLISH, SCHEMA, SERVICE, SNAPSHOT, SnapshotRequest, same_book, sample_book,
};
use shmesh_rkyv::{Client, ReadMode, ReadPath, TrustedPeer};

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(20));

fn address(test: &str) -> String {
    format!(
        "shm://@shmesh-marketdata-proc-{test}-{}",
        std::process::id()
    )
}

/// A child process killed when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(addr: &str, trust: &str) -> Reaped {
    let child = Command::new(Path::new(env!("CARGO_BIN_EXE_marketdata-server")))
        .args([addr, "--trust", trust])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Reaped(child)
}

/// Connects, retrying while the server starts.
fn connect(addr: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::connect(addr, &ChannelOptions::new(SERVICE, SCHEMA)) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("server never came up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn run_client(addr: &str, extra: &[&str]) -> String {
    let output = Command::new(Path::new(env!("CARGO_BIN_EXE_marketdata-client")))
        .args(["--address", addr])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "marketdata-client failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_client_binary_publishes_and_reads_a_snapshot_back() {
    for trust in ["same-user", "copy"] {
        let addr = address(&format!("binary-{trust}"));
        let server = spawn_server(&addr, trust);
        // Wait until it serves.
        drop(connect(&addr));
        let server_reads = if trust == "copy" {
            "copied"
        } else {
            "in place"
        };
        let out = run_client(&addr, &["--depth", "30", "ACME", "INITECH", "GLOBEX"]);
        assert_eq!(
            out.matches(&format!("read {server_reads} by the server"))
                .count(),
            4,
            "{out}"
        );
        assert!(
            out.contains("published GLOBEX #3: 60 levels, spread Some(2)"),
            "{out}"
        );
        assert!(
            out.contains("snapshot INITECH #2: best bid Some(9999)"),
            "{out}"
        );
        assert!(
            out.contains(r#"snapshot: 3 books, missing ["NONE"]"#),
            "{out}"
        );
        assert!(out.contains("read InPlace here"), "{out}");
        let copied = run_client(&addr, &["--copy", "ACME"]);
        assert!(copied.contains("read Copied here"), "{copied}");
        assert!(copied.contains("ack read Copied"), "{copied}");
        drop(server);
    }
}

#[test]
fn another_process_is_read_in_place_only_when_trusted() {
    let addr = address("modes");
    let server = spawn_server(&addr, "same-user");
    let channel = connect(&addr);
    let peer = channel
        .peer()
        .expect("connected to the server's own socket");
    assert_eq!(peer.pid, server.0.id() as i32);
    assert!(TrustedPeer::from_credentials(&peer).is_some());
    for mode in [ReadMode::Copied, ReadMode::for_peer(&peer)] {
        let client = Client::new(channel.clone(), mode);
        for depth in [0, 1, 17, 5000] {
            let book = sample_book("XPROC", "ACME", depth as u64, depth);
            let ack = client.call(&PUBLISH, &book, TIMEOUT).unwrap();
            assert!(ack.read_in_place);
            assert_eq!(ack.levels.to_native() as usize, 2 * depth);
            let snapshot = client
                .call(
                    &SNAPSHOT,
                    &SnapshotRequest {
                        symbols: vec!["ACME".into()],
                        depth: u32::MAX,
                    },
                    TIMEOUT,
                )
                .unwrap();
            let expected = if mode == ReadMode::Copied {
                ReadPath::Copied
            } else {
                ReadPath::InPlace
            };
            assert_eq!((ack.path(), snapshot.path()), (expected, expected));
            assert!(same_book(&snapshot.books[0], &book));
        }
    }
}

#[test]
fn garbage_from_a_client_is_internal_and_the_server_serves_on() {
    let addr = address("garbage");
    let _server = spawn_server(&addr, "same-user");
    let channel = connect(&addr);
    let mut frame = vec![0x5Au8; 200];
    frame.extend_from_slice(&200u32.to_le_bytes());
    frame.extend_from_slice(&shmesh_rkyv::FRAME_TAG);
    for bytes in [&b"garbage"[..], &frame] {
        let status = channel.call(PUBLISH.id(), bytes, TIMEOUT).unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status}");
        assert!(status.message().contains("OrderBook"), "{status}");
    }
    let client = Client::trusting_same_user(connect(&addr));
    let ack = client
        .call(&PUBLISH, &sample_book("XPROC", "OK", 1, 3), TIMEOUT)
        .unwrap();
    assert_eq!(ack.sequence, 1);
}

#[test]
fn a_killed_server_fails_calls_with_unavailable() {
    let addr = address("killed");
    let mut server = spawn_server(&addr, "same-user");
    let client = Client::trusting_same_user(connect(&addr));
    let book = sample_book("XPROC", "ACME", 1, 10);
    client.call(&PUBLISH, &book, TIMEOUT).unwrap();
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    // The process is gone: the call fails at once or when the watcher sees
    // the socket close, never with a response.
    let status = client.call(&PUBLISH, &book, TIMEOUT).unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status}");
}
