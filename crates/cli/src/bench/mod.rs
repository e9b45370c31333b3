//! `shmesh bench`: shmesh beside tonic gRPC and the raw shared-memory
//! floors, on the same machine, client and server always in separate
//! processes.
//!
//! Every peer runs the same echo (the reply is the request's bytes; every
//! client checks the whole reply), except `shmesh-rkyv` and `shmesh-prost`,
//! which send and answer an order book of the payload size as an rkyv
//! archive or a protobuf message ([`structured`]). Each server is this program started as a
//! hidden `__bench-peer` subcommand, which reports its own CPU time over a
//! control pipe (see [`control`]). Per peer, payload size and calls in
//! flight, a row records round-trip percentiles from an HDR histogram, calls
//! per second, and CPU time per call on each side (see [`measure`]).
//!
//! The modules: [`measure`] (closed-loop callers, histograms, getrusage),
//! [`control`] (server processes), [`shmesh_peer`], [`structured`],
//! [`tonic_peer`] and [`raw`] (the peers).

pub mod control;
pub mod measure;
pub mod raw;
pub mod shmesh_peer;
pub mod structured;
pub mod tonic_peer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use measure::{Measured, Window};

/// A peer under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Peer {
    /// shmesh unary calls, blocking client, both sides polling.
    ShmeshPoll,
    /// shmesh unary calls, blocking client, adaptive waiting.
    ShmeshAdaptive,
    /// shmesh unary calls, blocking client, parking at once.
    ShmeshBlock,
    /// shmesh unary calls, tokio client (`AsyncChannel`), adaptive waiting.
    ShmeshAsyncAdaptive,
    /// shmesh-poll through the host daemon on the direct path (connection
    /// brokered by shmeshd, calls straight to the replica).
    ShmeshDirectDaemon,
    /// Through shmeshd on the mediated path (metrics, access control and a
    /// rate limit in the daemon), adaptive waiting.
    ShmeshMediated,
    /// shmesh-mediated while the rate limiter is upgraded live over and
    /// over (`--during-upgrades`; not in the default run).
    ShmeshMediatedUpgrading,
    /// shmesh-mediated with the tracing engine too: a trace started per
    /// call, its context forwarded as metadata, a span queued for an OTLP
    /// endpoint (nothing listens there: batches fail fast).
    ShmeshMediatedTraced,
    /// shmesh-poll carrying an order book as an rkyv archive, read in place
    /// on both sides (shmesh-rkyv).
    ShmeshRkyv,
    /// shmesh-poll carrying the same order book encoded with prost.
    ShmeshProst,
    /// tonic gRPC over TCP on 127.0.0.1.
    TonicTcp,
    /// tonic gRPC over a Unix domain socket.
    TonicUds,
    /// A spinning shared-memory ping-pong that copies the payload.
    RawFloor,
    /// A futex shared-memory ping-pong that copies the payload.
    RawFutex,
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: [Peer; 14] = [
        Peer::ShmeshPoll,
        Peer::ShmeshAdaptive,
        Peer::ShmeshBlock,
        Peer::ShmeshAsyncAdaptive,
        Peer::ShmeshDirectDaemon,
        Peer::ShmeshMediated,
        Peer::ShmeshMediatedUpgrading,
        Peer::ShmeshMediatedTraced,
        Peer::ShmeshRkyv,
        Peer::ShmeshProst,
        Peer::TonicTcp,
        Peer::TonicUds,
        Peer::RawFloor,
        Peer::RawFutex,
    ];

    /// The name in the table, the JSON output and `--peers`.
    pub fn name(self) -> &'static str {
        match self {
            Peer::ShmeshPoll => "shmesh-poll",
            Peer::ShmeshAdaptive => "shmesh-adaptive",
            Peer::ShmeshBlock => "shmesh-block",
            Peer::ShmeshAsyncAdaptive => "shmesh-async-adaptive",
            Peer::ShmeshDirectDaemon => "shmesh-direct-daemon",
            Peer::ShmeshMediated => "shmesh-mediated",
            Peer::ShmeshMediatedUpgrading => "shmesh-mediated-upgrading",
            Peer::ShmeshMediatedTraced => "shmesh-mediated-traced",
            Peer::ShmeshRkyv => "shmesh-rkyv",
            Peer::ShmeshProst => "shmesh-prost",
            Peer::TonicTcp => "tonic-tcp",
            Peer::TonicUds => "tonic-uds",
            Peer::RawFloor => "raw-floor",
            Peer::RawFutex => "raw-futex",
        }
    }

    /// Whether the peer can keep `inflight` calls in flight (the raw floors
    /// are one-at-a-time ping-pongs).
    pub fn supports_inflight(self, inflight: usize) -> bool {
        !matches!(self, Peer::RawFloor | Peer::RawFutex) || inflight == 1
    }
}

/// Arguments of `shmesh bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Measured time per row, e.g. 1s or 250ms; a warm-up of a fifth (10 to
    /// 300 ms) comes first [default: 1s, 150ms with --quick].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Payload sizes in bytes, comma separated; K/KiB and M/MiB suffixes
    /// allowed.
    #[arg(long, value_delimiter = ',', value_parser = parse_size,
          default_values = ["64", "4KiB", "64KiB", "1MiB"])]
    pub sizes: Vec<usize>,
    /// Calls in flight per row, comma separated (the raw floors, one-at-a-time
    /// ping-pongs, run only the rows with 1).
    #[arg(long, value_delimiter = ',', default_values = ["1", "32"],
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub inflight: Vec<u32>,
    /// Peers to measure, comma separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub peers: Vec<Peer>,
    /// A quick run: 150 ms rows (about 15 s with the defaults).
    #[arg(long)]
    pub quick: bool,
    /// Also measure the mediated path while its rate-limit engine is
    /// upgraded live, again and again (row shmesh-mediated-upgrading, beside
    /// shmesh-mediated), to compare their tails.
    #[arg(long)]
    pub during_upgrades: bool,
    /// Print one JSON object per row on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of the hidden `__bench-peer` subcommand: one server process.
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// Which server to run.
    #[command(subcommand)]
    pub server: PeerServer,
}

/// The servers `shmesh bench` starts.
#[derive(Debug, clap::Subcommand)]
pub enum PeerServer {
    /// A shmesh echo server.
    Shmesh {
        /// Where to listen (`shm://…`).
        address: String,
    },
    /// A host daemon listening in DIR.
    ShmeshDaemon {
        /// The daemon's directory.
        dir: PathBuf,
        /// Serve the echo on the mediated path.
        #[arg(long)]
        mediated: bool,
        /// With the tracing engine too (implies `--mediated`).
        #[arg(long)]
        traced: bool,
    },
    /// A shmesh echo registered with the daemon at SOCKET.
    ShmeshReplica {
        /// The daemon's socket.
        socket: PathBuf,
    },
    /// A tonic echo server on an ephemeral TCP port of 127.0.0.1.
    TonicTcp,
    /// A tonic echo server on a Unix domain socket.
    TonicUds {
        /// The socket's path.
        path: PathBuf,
    },
    /// The server side of a raw floor.
    Raw {
        /// The inherited fd of the segment.
        #[arg(long)]
        fd: i32,
        /// How to wait.
        #[arg(long, value_parser = ["spin", "futex"])]
        waiting: String,
    },
}

/// Runs one server process (`__bench-peer`); the process's exit code.
pub fn run_peer(args: &PeerArgs) -> ExitCode {
    let result: Result<()> = match &args.server {
        PeerServer::Shmesh { address } => shmesh_peer::serve(address).map_err(Into::into),
        PeerServer::ShmeshDaemon {
            dir,
            mediated,
            traced,
        } => shmesh_peer::serve_daemon(dir, *mediated || *traced, *traced).map_err(Into::into),
        PeerServer::ShmeshReplica { socket } => {
            shmesh_peer::serve_replica(socket).map_err(Into::into)
        }
        PeerServer::TonicTcp => {
            tonic_peer::serve(tonic_peer::Transport::Tcp, None).map_err(Into::into)
        }
        PeerServer::TonicUds { path } => {
            tonic_peer::serve(tonic_peer::Transport::Uds, Some(path)).map_err(Into::into)
        }
        PeerServer::Raw { fd, waiting } => {
            let waiting = if waiting == "futex" {
                raw::Waiting::Futex
            } else {
                raw::Waiting::Spin
            };
            raw::serve(*fd, waiting).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmesh bench server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `1s`, `250ms`, `1.5s`, `500us`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} needs a unit: us, ms or s"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration"))?;
    let seconds = match unit.trim() {
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        other => return Err(format!("unknown unit {other:?}: use us, ms or s")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

/// Parses `64`, `4K`, `4KiB`, `1M`, `1MiB` (binary multiples).
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        other => return Err(format!("unknown size unit {other:?}: use K or M")),
    };
    number
        .checked_mul(1 << shift)
        .filter(|&n| n <= 64 << 20)
        .ok_or_else(|| format!("{text:?} is too large (at most 64 MiB)"))
}

/// A size as people read it.
fn human_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// The figures of a measured row.
#[derive(Debug, Clone, Copy)]
struct Stats {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    calls_per_s: f64,
    calls: u64,
    client_cpu_us_per_call: f64,
    server_cpu_us_per_call: f64,
}

impl Stats {
    fn from_measured(m: &Measured) -> Result<Stats, String> {
        if m.calls == 0 {
            return Err("no call completed in the window".into());
        }
        let us = |q: f64| m.hist.value_at_quantile(q) as f64 / 1000.0;
        let per_call = |d: Duration| d.as_secs_f64() * 1e6 / m.calls as f64;
        Ok(Stats {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            calls_per_s: m.calls as f64 / m.elapsed.as_secs_f64(),
            calls: m.calls,
            client_cpu_us_per_call: per_call(m.client_cpu.total()),
            server_cpu_us_per_call: per_call(m.server_cpu.total()),
        })
    }

    fn cpu_us_per_call(&self) -> f64 {
        self.client_cpu_us_per_call + self.server_cpu_us_per_call
    }
}

/// One row of the report: measured, or skipped with the reason.
#[derive(Debug, Clone)]
struct Row {
    peer: Peer,
    size: usize,
    inflight: usize,
    outcome: Result<Stats, String>,
}

/// A row as a line of `--json` output.
#[derive(Debug, Serialize)]
struct JsonRow<'a> {
    peer: &'static str,
    size: usize,
    inflight: usize,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    calls_per_s: Option<f64>,
    cpu_us_per_call: Option<f64>,
    client_cpu_us_per_call: Option<f64>,
    server_cpu_us_per_call: Option<f64>,
    calls: Option<u64>,
    /// This row's p50 over shmesh-poll's (same size and calls in flight).
    p50_vs_shmesh_poll: Option<f64>,
    /// This row's calls/s over shmesh-poll's.
    calls_per_s_vs_shmesh_poll: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<&'a str>,
}

/// A running peer: its server process and client.
enum Session {
    Shmesh(shmesh_peer::Session),
    Tonic(tonic_peer::Session),
    Raw(raw::Session),
}

impl Session {
    fn start(peer: Peer, exe: &Path, max_size: usize) -> Result<Session> {
        use shmesh::WaitMode;
        use shmesh_peer::{Codec, Route};
        let shmesh = |mode, asynchronous, route, codec| -> Result<Session> {
            Ok(Session::Shmesh(shmesh_peer::Session::start(
                exe,
                peer.name(),
                mode,
                asynchronous,
                route,
                codec,
            )?))
        };
        let bytes = Codec::Bytes;
        Ok(match peer {
            Peer::ShmeshPoll => shmesh(WaitMode::Poll, false, Route::Socket, bytes)?,
            Peer::ShmeshAdaptive => shmesh(WaitMode::Adaptive, false, Route::Socket, bytes)?,
            Peer::ShmeshBlock => shmesh(WaitMode::Block, false, Route::Socket, bytes)?,
            Peer::ShmeshAsyncAdaptive => shmesh(WaitMode::Adaptive, true, Route::Socket, bytes)?,
            Peer::ShmeshDirectDaemon => shmesh(WaitMode::Poll, false, Route::DaemonDirect, bytes)?,
            Peer::ShmeshMediated => {
                shmesh(WaitMode::Adaptive, false, Route::DaemonMediated, bytes)?
            }
            Peer::ShmeshMediatedUpgrading => shmesh(
                WaitMode::Adaptive,
                false,
                Route::DaemonMediatedUpgrading,
                bytes,
            )?,
            Peer::ShmeshMediatedTraced => shmesh(
                WaitMode::Adaptive,
                false,
                Route::DaemonMediatedTraced,
                bytes,
            )?,
            Peer::ShmeshRkyv => shmesh(WaitMode::Poll, false, Route::Socket, Codec::Rkyv)?,
            Peer::ShmeshProst => shmesh(WaitMode::Poll, false, Route::Socket, Codec::Prost)?,
            Peer::TonicTcp => {
                Session::Tonic(tonic_peer::Session::start(exe, tonic_peer::Transport::Tcp)?)
            }
            Peer::TonicUds => {
                Session::Tonic(tonic_peer::Session::start(exe, tonic_peer::Transport::Uds)?)
            }
            Peer::RawFloor => Session::Raw(raw::Session::start(exe, raw::Waiting::Spin, max_size)?),
            Peer::RawFutex => {
                Session::Raw(raw::Session::start(exe, raw::Waiting::Futex, max_size)?)
            }
        })
    }

    fn measure(&mut self, size: usize, inflight: usize, window: Window) -> Result<Measured> {
        Ok(match self {
            Session::Shmesh(s) => s.measure(size, inflight, window)?,
            Session::Tonic(s) => s.measure(size, inflight, window)?,
            Session::Raw(s) => s.measure(size, window)?,
        })
    }

    fn finish(self) -> Result<()> {
        match self {
            Session::Shmesh(s) => s.finish()?,
            Session::Tonic(s) => s.finish()?,
            Session::Raw(s) => s.finish()?,
        }
        Ok(())
    }
}

/// Runs `shmesh bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to start the servers")?;
    let duration = args.duration.unwrap_or(if args.quick {
        Duration::from_millis(150)
    } else {
        Duration::from_secs(1)
    });
    let window = Window {
        warmup: (duration / 5).clamp(Duration::from_millis(10), Duration::from_millis(300)),
        duration,
    };
    let mut peers = if args.peers.is_empty() {
        Peer::ALL
            .into_iter()
            .filter(|&p| p != Peer::ShmeshMediatedUpgrading)
            .collect()
    } else {
        args.peers.clone()
    };
    if args.during_upgrades {
        peers.extend([Peer::ShmeshMediated, Peer::ShmeshMediatedUpgrading]);
    }
    peers.sort();
    peers.dedup();
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let mut inflights: Vec<usize> = args.inflight.iter().map(|&n| n as usize).collect();
    inflights.sort_unstable();
    inflights.dedup();
    let max_size = sizes.iter().copied().max().unwrap_or(64);

    let mut plan: Vec<(Peer, usize, usize)> = Vec::new();
    for &peer in &peers {
        for &size in &sizes {
            for &inflight in &inflights {
                if peer.supports_inflight(inflight) {
                    plan.push((peer, size, inflight));
                }
            }
        }
    }
    let bar = ProgressBar::new(plan.len() as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} rows  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    tracing::info!(rows = plan.len(), ?window, "shmesh bench starting");

    let mut rows = Vec::with_capacity(plan.len());
    for &peer in &peers {
        let mine: Vec<_> = plan.iter().filter(|(p, _, _)| *p == peer).collect();
        if mine.is_empty() {
            continue;
        }
        bar.set_message(format!("{}: starting", peer.name()));
        tracing::debug!(peer = peer.name(), "starting the server process");
        let mut session = match Session::start(peer, &exe, max_size) {
            Ok(session) => session,
            Err(e) => {
                tracing::warn!(peer = peer.name(), "did not start: {e:#}");
                for &&(peer, size, inflight) in &mine {
                    rows.push(Row {
                        peer,
                        size,
                        inflight,
                        outcome: Err(format!("peer did not start: {e:#}")),
                    });
                    bar.inc(1);
                }
                continue;
            }
        };
        for &&(peer, size, inflight) in &mine {
            bar.set_message(format!("{} {} ×{inflight}", peer.name(), human_size(size)));
            let outcome = match session.measure(size, inflight, window) {
                Ok(m) => Stats::from_measured(&m),
                Err(e) => {
                    tracing::warn!(peer = peer.name(), size, inflight, "row skipped: {e:#}");
                    Err(format!("{e:#}"))
                }
            };
            rows.push(Row {
                peer,
                size,
                inflight,
                outcome,
            });
            bar.inc(1);
        }
        if let Err(e) = session.finish() {
            tracing::warn!(peer = peer.name(), "did not stop cleanly: {e:#}");
        }
    }
    bar.finish_and_clear();
    rows.sort_by_key(|r| (r.size, r.inflight, r.peer));
    if args.json {
        print_json(&rows)
    } else {
        print_table(&rows, window);
        Ok(())
    }
}

/// shmesh-poll's figures for the same size and calls in flight.
fn reference(rows: &[Row], row: &Row) -> Option<Stats> {
    rows.iter()
        .find(|r| r.peer == Peer::ShmeshPoll && r.size == row.size && r.inflight == row.inflight)
        .and_then(|r| r.outcome.as_ref().ok().copied())
}

fn print_json(rows: &[Row]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for row in rows {
        let stats = row.outcome.as_ref().ok();
        let reference = reference(rows, row);
        let line = JsonRow {
            peer: row.peer.name(),
            size: row.size,
            inflight: row.inflight,
            p50_us: stats.map(|s| s.p50_us),
            p99_us: stats.map(|s| s.p99_us),
            p999_us: stats.map(|s| s.p999_us),
            calls_per_s: stats.map(|s| s.calls_per_s),
            cpu_us_per_call: stats.map(Stats::cpu_us_per_call),
            client_cpu_us_per_call: stats.map(|s| s.client_cpu_us_per_call),
            server_cpu_us_per_call: stats.map(|s| s.server_cpu_us_per_call),
            calls: stats.map(|s| s.calls),
            p50_vs_shmesh_poll: stats.zip(reference).map(|(s, r)| s.p50_us / r.p50_us),
            calls_per_s_vs_shmesh_poll: stats
                .zip(reference)
                .map(|(s, r)| s.calls_per_s / r.calls_per_s),
            skipped: row.outcome.as_ref().err().map(String::as_str),
        };
        serde_json::to_writer(&mut out, &line).context("cannot write JSON")?;
        writeln!(out).context("cannot write JSON")?;
    }
    out.flush().context("cannot write JSON")?;
    Ok(())
}

fn print_table(rows: &[Row], window: Window) {
    println!(
        "shmesh bench: echo round trips, client and server in separate processes; \
         {:?} per row after a {:?} warm-up",
        window.duration, window.warmup
    );
    println!(
        "{:<22} {:>8} {:>4} {:>9} {:>9} {:>9} {:>11} {:>26} {:>9} {:>9}",
        "peer",
        "payload",
        "infl",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "calls/s",
        "cpu µs/call cli+srv",
        "p50/poll",
        "rate/poll"
    );
    let mut group = None;
    for row in rows {
        if group.is_some_and(|g| g != (row.size, row.inflight)) {
            println!();
        }
        group = Some((row.size, row.inflight));
        let head = format!(
            "{:<22} {:>8} {:>4}",
            row.peer.name(),
            human_size(row.size),
            row.inflight
        );
        match &row.outcome {
            Ok(s) => {
                let reference = reference(rows, row);
                let ratio = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}×"));
                let cpu = format!(
                    "{:.2} ({:.2}+{:.2})",
                    s.cpu_us_per_call(),
                    s.client_cpu_us_per_call,
                    s.server_cpu_us_per_call
                );
                println!(
                    "{head} {:>9.2} {:>9.2} {:>9.2} {:>11.0} {:>26} {:>9} {:>9}",
                    s.p50_us,
                    s.p99_us,
                    s.p999_us,
                    s.calls_per_s,
                    cpu,
                    ratio(reference.map(|r| s.p50_us / r.p50_us)),
                    ratio(reference.map(|r| s.calls_per_s / r.calls_per_s)),
                );
            }
            Err(reason) => println!("{head}  skipped: {reason}"),
        }
    }
    println!(
        "\nEvery client checks the whole echo. shmesh: request written in place into a \
         loaned slab, echoed in place by the server. tonic: the same echo from \
         proto/echo.proto, one HTTP/2 connection. shmesh-rkyv / shmesh-prost: shmesh-poll \
         carrying an order book (strings and a vector of price levels) as large as fits the \
         payload size, as an rkyv archive read in place on both sides / encoded and decoded \
         with prost; each side reads and checks every field. raw-floor / raw-futex: two processes \
         ping-ponging on a shared word (spinning / parking on a shmesh-shm doorbell in Block \
         mode, which looks a few dozen times before it parks), copying the payload in \
         and out on both sides, no RPC layer; one call at a time.\n\
         cpu: CPU time (user+system) per call of the client process and of the server \
         process during the window. p50/poll, rate/poll: this row's p50 and calls/s over \
         shmesh-poll's at the same size and calls in flight."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1h").is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("1G").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn peer_names_match_clap() {
        use clap::ValueEnum;
        for peer in Peer::ALL {
            let value = peer.to_possible_value().map(|v| v.get_name().to_owned());
            assert_eq!(value.as_deref(), Some(peer.name()));
        }
    }
}
