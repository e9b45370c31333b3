//! Fixtures shared by the daemon's process tests: `shmeshd` as a child
//! process, replicas and clients as this test binary started again.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmesh::client::{Channel, ChannelOptions};
use shmesh::control::StatusReport;
use shmesh::server::{Router, Server};
use shmesh::{Address, SchemaHash};

pub const SCHEMA: SchemaHash = SchemaHash([7; 32]);
pub const ECHO: u32 = 1;
/// A second method, for per-method rules.
pub const ECHO_TOO: u32 = 2;
/// Server streaming: a request of (count u32, size u32) is answered with
/// `count` messages of `size` bytes (at least 4), message `i` starting with
/// `i` and filled with `i % 251`.
pub const COUNT: u32 = 3;
/// Client streaming: answers the sum of every byte received (u64) and the
/// number of messages (u64).
pub const SUM: u32 = 4;
/// Bidirectional: echoes every message as it comes.
pub const ECHO_STREAM: u32 = 5;
/// Server streaming: numbered messages until the stream is cancelled or
/// cannot go on.
pub const FOREVER: u32 = 6;
/// Answers the `traceparent` metadata the replica saw (empty if none).
pub const TRACEPARENT_SEEN: u32 = 7;
/// Server streaming: one message, the `traceparent` metadata the stream
/// opened with (empty if none).
pub const TRACEPARENT_SEEN_STREAM: u32 = 8;
/// How long any condition may take to come true before the test fails.
pub const WATCHDOG: Duration = Duration::from_secs(30);
/// The variable that makes this binary a child process.
const ROLE: &str = "SHMESHD_TEST_ROLE";

/// These tests start several processes each; one at a time keeps the two
/// cores from being oversubscribed.
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process killed when the test ends, however it ends.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    pub fn kill9(&mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

/// A scratch directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shmeshd-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `shmeshd`, its socket and metrics address, and its log.
pub struct Daemon {
    pub process: Reaped,
    pub socket: PathBuf,
    pub metrics: Option<String>,
    pub log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn start(socket: &Path, config: Option<&Path>) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shmeshd"));
        command
            .arg("--socket")
            .arg(socket)
            .args(["--metrics", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.strip_prefix("metrics at http://") {
                        let _ = tx.send(rest.trim_end_matches("/metrics").to_owned());
                    }
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let process = Reaped(child);
        let metrics = rx.recv_timeout(WATCHDOG).ok();
        assert!(
            metrics.is_some(),
            "shmeshd did not start:\n{}",
            log.lock().unwrap()
        );
        Daemon {
            process,
            socket: socket.to_owned(),
            metrics,
            log,
        }
    }

    pub fn address(&self) -> Address {
        Address::from_path(&self.socket).unwrap()
    }

    pub fn status(&self) -> StatusReport {
        shmesh_daemon::query_status(&self.address()).unwrap()
    }

    /// Waits until the daemon's status satisfies `what`.
    pub fn wait_for(
        &self,
        description: &str,
        what: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let report = self.status();
            if what(&report) {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "waited {WATCHDOG:?} for {description}; last status: {report:#?}\nlog:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metrics_text(&self) -> String {
        let address = self.metrics.as_ref().expect("metrics are on");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: shmeshd\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }
}

pub fn replicas(report: &StatusReport, service: &str) -> usize {
    report
        .services
        .iter()
        .find(|s| s.name == service)
        .map_or(0, |s| s.replicas.len())
}

/// Calls the replicas of `service` say they answered, as they last
/// published it in their load pages (every 10 ms while it changes).
pub fn answered(report: &StatusReport, service: &str) -> u64 {
    report
        .services
        .iter()
        .filter(|s| s.name == service)
        .flat_map(|s| &s.replicas)
        .filter_map(|r| r.stats.as_ref())
        .flat_map(|s| &s.methods)
        .map(|m| m.calls)
        .sum()
}

pub fn connections(report: &StatusReport, service: &str) -> Vec<usize> {
    report
        .services
        .iter()
        .find(|s| s.name == service)
        .map_or(Vec::new(), |s| {
            s.replicas.iter().map(|r| r.connections.len()).collect()
        })
}

/// Starts this binary again as a child playing `role`.
pub fn spawn_child(role: &str, daemon: &Daemon, service: &str) -> Reaped {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--ignored", "--nocapture", "--quiet"])
        .env(ROLE, role)
        .env("SHMESHD_TEST_SOCKET", &daemon.socket)
        .env("SHMESHD_TEST_SERVICE", service)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Reaped(child)
}

pub fn options(daemon: &Daemon, service: &str, schema: SchemaHash) -> ChannelOptions {
    let mut options = ChannelOptions::new(service, schema);
    options.daemon = Some(daemon.address());
    options
}

pub fn connect(daemon: &Daemon, service: &str) -> Channel {
    Channel::connect(
        &format!("shm+svc://{service}"),
        &options(daemon, service, SCHEMA),
    )
    .unwrap()
}

pub fn echo(channel: &Channel, body: &[u8]) -> Result<Vec<u8>, shmesh::status::Status> {
    channel
        .call(ECHO, body, Some(Duration::from_secs(10)))
        .map(|r| r.to_vec())
}

/// The body of each test binary's `child` entry point: a replica serving echo, or a client
/// calling it in a loop. Does nothing unless started by [`spawn_child`].
pub fn run_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = Address::from_path(std::env::var("SHMESHD_TEST_SOCKET").unwrap()).unwrap();
    let service = std::env::var("SHMESHD_TEST_SERVICE").unwrap();
    match role.as_str() {
        "replica" => {
            let router = Router::new()
                .route(ECHO, |request| Ok(request.payload.to_vec()))
                .route(ECHO_TOO, |request| Ok(request.payload.to_vec()))
                .route(TRACEPARENT_SEEN, |request| {
                    let seen = request.metadata().get("traceparent").unwrap_or_default();
                    Ok(seen.as_bytes().to_vec())
                })
                .route_stream(TRACEPARENT_SEEN_STREAM, |call| {
                    let seen = call.metadata().get("traceparent").unwrap_or_default();
                    let seen = seen.as_bytes().to_vec();
                    call.send(&seen)
                })
                .route_stream(COUNT, |call| {
                    let request = call.recv()?.map(|m| m.to_vec()).unwrap_or_default();
                    let word = |i: usize| {
                        request
                            .get(i * 4..i * 4 + 4)
                            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    };
                    let (count, size) = (word(0), word(1) as usize);
                    for i in 0..count {
                        let mut message = call.loan(size.max(4))?;
                        message.fill((i % 251) as u8);
                        message[..4].copy_from_slice(&i.to_le_bytes());
                        call.send_buf(message)?;
                    }
                    Ok(())
                })
                .route_stream(SUM, |call| {
                    let (mut sum, mut count) = (0u64, 0u64);
                    while let Some(message) = call.recv()? {
                        sum += message.iter().map(|&b| u64::from(b)).sum::<u64>();
                        count += 1;
                    }
                    let mut answer = sum.to_le_bytes().to_vec();
                    answer.extend_from_slice(&count.to_le_bytes());
                    call.send(&answer)
                })
                .route_stream(ECHO_STREAM, |call| {
                    while let Some(message) = call.recv()? {
                        call.send(&message)?;
                    }
                    Ok(())
                })
                .route_stream(FOREVER, |call| {
                    call.recv()?;
                    let mut i = 0u64;
                    loop {
                        call.send(&i.to_le_bytes())?;
                        i += 1;
                    }
                });
            let server = Server::register_with(&socket, &service, SCHEMA, router).unwrap();
            server.serve();
        }
        "client" => {
            let mut options = ChannelOptions::new(service.as_str(), SCHEMA);
            options.daemon = Some(socket);
            let channel = Channel::connect(&format!("shm+svc://{service}"), &options).unwrap();
            let mut n = 0u64;
            loop {
                let body = n.to_le_bytes();
                assert_eq!(echo(&channel, &body).unwrap(), body);
                n += 1;
            }
        }
        "streamer" => {
            // Holds a server stream and a bidirectional one open, reading
            // nothing more, until killed; says so in a file beside the
            // daemon's socket.
            let mut options = ChannelOptions::new(service.as_str(), SCHEMA);
            options.daemon = Some(socket);
            let channel = Channel::connect(&format!("shm+svc://{service}"), &options).unwrap();
            let mut forever = channel.server_stream(FOREVER, b"go", None).unwrap();
            for _ in 0..3 {
                forever.recv().unwrap().unwrap();
            }
            let mut echo = channel.open(ECHO_STREAM, None).unwrap();
            echo.send(b"hello").unwrap();
            assert_eq!(&echo.recv().unwrap().unwrap()[..], b"hello");
            let socket = std::env::var("SHMESHD_TEST_SOCKET").unwrap();
            std::fs::write(format!("{socket}.streaming"), b"").unwrap();
            loop {
                std::thread::park();
            }
        }
        other => panic!("unknown role {other}"),
    }
}
