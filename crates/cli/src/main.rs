//! `shmesh`: the command-line tool.
//!
//! `shmesh demo` starts an echo peer in a second process, connected through
//! one shared-memory segment, and measures round trips in each wait mode
//! beside the raw cache-line floor. It needs no daemon and no configuration.
//!
//! `shmesh bench` measures shmesh side by side with tonic gRPC (TCP and Unix
//! socket) and the raw shared-memory floors: latency percentiles, calls per
//! second with 1 and 32 calls in flight, and CPU time per call (see
//! [`bench`]).

mod bench;
mod host;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use shmesh_pingpong::floor::FloorClient;
use shmesh_pingpong::peer::PeerArgs;
use shmesh_pingpong::{Client, PeerRole, PingPongConfig, mode_name};
use shmesh_shm::doorbell::{DEFAULT_SPIN, WaitMode};

#[derive(Debug, Parser)]
#[command(
    name = "shmesh",
    version,
    about = "RPC between co-located processes over shared memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure round trips between two processes over shared memory.
    Demo(DemoArgs),
    /// The peer process `demo` starts (internal).
    #[command(name = "__peer", hide = true)]
    Peer(PeerArgs),
    /// The echo server `demo` starts (internal).
    #[command(name = "__echo-server", hide = true)]
    EchoServer {
        /// Where to listen.
        address: String,
    },
    /// Compare shmesh with tonic gRPC and the raw shared-memory floors:
    /// latency, throughput and CPU per call, each server in its own process.
    Bench(bench::BenchArgs),
    /// A server process `bench` starts (internal).
    #[command(name = "__bench-peer", hide = true)]
    BenchPeer(bench::PeerArgs),
    /// Run shmeshd, the host daemon: service registry, brokered
    /// connections (`shm+svc://NAME`), access control, Prometheus metrics.
    Daemon(shmesh_daemon::cli::DaemonArgs),
    /// Show the daemon's services, replicas, connections and call rates.
    Status(host::StatusArgs),
    /// List, add or remove the policy engines of the mediated path, live.
    Policy(host::PolicyArgs),
    /// Replace a policy engine live, carrying its state over.
    Upgrade(host::UpgradeArgs),
}

/// What `demo` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layer {
    /// Unary calls through the shmesh RPC library (Channel and Server).
    Rpc,
    /// The bare shared-memory echo underneath (rings, pool, doorbells).
    Ring,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Timed round trips per mode and size.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..))]
    calls: u64,
    /// Payload sizes in bytes (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 4096, 65536])]
    sizes: Vec<usize>,
    /// Wait modes to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_values = ["poll", "adaptive", "block"],
          value_parser = ["poll", "adaptive", "yield", "block"])]
    modes: Vec<String>,
    /// What to measure: RPC calls, or the bare ring echo under them.
    #[arg(long, value_enum, default_value_t = Layer::Rpc)]
    layer: Layer,
    /// Spin budget of the adaptive mode, in microseconds.
    #[arg(long, default_value_t = DEFAULT_SPIN.as_micros() as u64)]
    spin_us: u64,
}

/// One measured row.
struct Row {
    label: String,
    size: usize,
    hist: Histogram<u64>,
    elapsed: Duration,
    calls: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Peer(args) => shmesh_pingpong::peer::run(&args),
        Command::EchoServer { address } => match echo_server(&address) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shmesh echo server: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::BenchPeer(args) => bench::run_peer(&args),
        Command::Bench(args) => match bench::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shmesh bench: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Daemon(args) => match shmesh_daemon::cli::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shmesh daemon: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Status(args) => host::status(&args).unwrap_or_else(|e| {
            eprintln!("shmesh status: {e:#}");
            ExitCode::FAILURE
        }),
        Command::Policy(args) => host::policy(&args).unwrap_or_else(|e| {
            eprintln!("shmesh policy: {e:#}");
            ExitCode::FAILURE
        }),
        Command::Upgrade(args) => host::upgrade(&args).unwrap_or_else(|e| {
            eprintln!("shmesh upgrade: {e:#}");
            ExitCode::FAILURE
        }),
        Command::Demo(args) => match demo(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shmesh demo: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn parse_mode(name: &str) -> Result<WaitMode> {
    Ok(match name {
        "poll" => WaitMode::Poll,
        "adaptive" => WaitMode::Adaptive,
        "block" => WaitMode::Block,
        "yield" => WaitMode::Yield,
        other => bail!("unknown wait mode {other:?}"),
    })
}

fn demo(args: &DemoArgs) -> Result<()> {
    let exe: PathBuf =
        std::env::current_exe().context("cannot find this program to start the peer")?;
    let modes: Vec<WaitMode> = args
        .modes
        .iter()
        .map(|m| parse_mode(m))
        .collect::<Result<_>>()?;
    let max_size = args.sizes.iter().copied().max().unwrap_or(64);
    let warmup = (args.calls / 10).max(100);
    let total = (modes.len() * args.sizes.len() + 1) as u64 * (args.calls + warmup);
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} round trips  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    println!(
        "shmesh demo: an echo peer in a second process, one shared-memory segment, \
         {} timed round trips per row",
        args.calls
    );
    let mut rows = Vec::new();

    bar.set_message("raw floor");
    rows.push(measure_floor(&exe, args.calls, warmup, &bar)?);
    match args.layer {
        Layer::Ring => measure_ring(args, &exe, &modes, max_size, warmup, &bar, &mut rows)?,
        Layer::Rpc => measure_rpc(args, &exe, &modes, warmup, &bar, &mut rows)?,
    }
    bar.finish_and_clear();
    print_table(&rows);
    Ok(())
}

/// Records `calls` timed round trips of `call` into a row.
fn timed(
    label: &str,
    size: usize,
    calls: u64,
    bar: &ProgressBar,
    mut call: impl FnMut() -> Result<()>,
) -> Result<Row> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    let start = Instant::now();
    for i in 0..calls {
        let t = Instant::now();
        call().with_context(|| format!("call {i} failed"))?;
        hist.saturating_record(t.elapsed().as_nanos() as u64);
        if i % 256 == 0 {
            bar.inc(256.min(calls - i));
        }
    }
    Ok(Row {
        label: label.to_owned(),
        size,
        hist,
        elapsed: start.elapsed(),
        calls,
    })
}

fn measure_ring(
    args: &DemoArgs,
    exe: &std::path::Path,
    modes: &[WaitMode],
    max_size: usize,
    warmup: u64,
    bar: &ProgressBar,
    rows: &mut Vec<Row>,
) -> Result<()> {
    for &mode in modes {
        let mut config = PingPongConfig::new(mode, max_size).context("pool configuration")?;
        config.policy.spin = Duration::from_micros(args.spin_us);
        let mut client = Client::spawn(&config, exe, &["__peer"], PeerRole::Echo)
            .with_context(|| format!("cannot start the {} peer", mode_name(mode)))?;
        for &size in &args.sizes {
            bar.set_message(format!("ring {} {}", mode_name(mode), human_size(size)));
            for _ in 0..warmup {
                client
                    .call(size, Some(Instant::now() + Duration::from_secs(10)))
                    .context("warm-up call failed")?;
                bar.inc(1);
            }
            // No deadline on timed calls (it would cost a clock read per
            // call): the client still notices a dead peer within 20 ms.
            let label = format!("ring {}", mode_name(mode));
            rows.push(timed(&label, size, args.calls, bar, || {
                Ok(client.call(size, None)?)
            })?);
        }
        let status = client.shutdown().context("peer did not shut down")?;
        if let Some(status) = status.filter(|s| !s.success()) {
            bail!("the {} peer failed: {status}", mode_name(mode));
        }
    }
    Ok(())
}

/// The demo's echo service.
const DEMO_SERVICE: &str = "shmesh-demo-echo";
const DEMO_SCHEMA: shmesh::SchemaHash = shmesh::SchemaHash(*b"shmesh demo echo service, v1....");
const DEMO_ECHO: u32 = 1;

fn echo_server(address: &str) -> Result<()> {
    let router = shmesh::server::Router::new().route_in_place(DEMO_ECHO, |r, reply| {
        if !r.payload.is_empty() {
            reply.loan(r.payload.len())?.copy_from_slice(r.payload);
        }
        Ok(())
    });
    let mut server = shmesh::server::Server::bind(address, DEMO_SERVICE, DEMO_SCHEMA, router)
        .with_context(|| format!("cannot serve at {address}"))?;
    // Let clients choose any wait mode, polling included.
    server.set_max_limits(shmesh::Limits {
        wait_mode: shmesh::WaitMode::Poll,
        spin_ns: u64::MAX,
        ..Default::default()
    });
    server.serve();
    Ok(())
}

/// A child process killed on drop, however the demo ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn measure_rpc(
    args: &DemoArgs,
    exe: &std::path::Path,
    modes: &[WaitMode],
    warmup: u64,
    bar: &ProgressBar,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let address = format!("shm://@shmesh-demo-{}", std::process::id());
    let mut server = Reaped(
        std::process::Command::new(exe)
            .args(["__echo-server", &address])
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("cannot start the echo server")?,
    );
    for &mode in modes {
        let mut options = shmesh::client::ChannelOptions::new(DEMO_SERVICE, DEMO_SCHEMA);
        options.limits.wait_mode = match mode {
            WaitMode::Poll => shmesh::WaitMode::Poll,
            WaitMode::Adaptive => shmesh::WaitMode::Adaptive,
            WaitMode::Block => shmesh::WaitMode::Block,
            WaitMode::Yield => shmesh::WaitMode::Yield,
        };
        options.limits.spin_ns = args.spin_us * 1000;
        let started = Instant::now();
        let channel = loop {
            match shmesh::client::Channel::connect(&address, &options) {
                Ok(channel) => break channel,
                Err(e) if started.elapsed() > Duration::from_secs(10) => {
                    return Err(e).context("the echo server did not come up");
                }
                Err(_) => {
                    if let Some(status) = server.0.try_wait()? {
                        bail!("the echo server exited: {status}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        for &size in &args.sizes {
            bar.set_message(format!("rpc {} {}", mode_name(mode), human_size(size)));
            // The message: what a real caller would serialise into the loan.
            let message: Vec<u8> = (0..size).map(|i| i as u8).collect();
            let call = || -> Result<()> {
                // Written in place into the loaned slab; read in place.
                let mut request = channel.loan(size, None)?;
                request.copy_from_slice(&message);
                let response = channel.send(DEMO_ECHO, request, None)?;
                if response[..] != message[..] {
                    bail!("the echo differs from the request");
                }
                Ok(())
            };
            for _ in 0..warmup {
                call().context("warm-up call failed")?;
                bar.inc(1);
            }
            let label = format!("rpc {}", mode_name(mode));
            rows.push(timed(&label, size, args.calls, bar, call)?);
        }
    }
    Ok(())
}

fn measure_floor(exe: &std::path::Path, calls: u64, warmup: u64, bar: &ProgressBar) -> Result<Row> {
    let config = PingPongConfig::new(WaitMode::Poll, 64).context("pool configuration")?;
    let segment = shmesh_pingpong::create_segment(&config)?;
    let mut child =
        shmesh_pingpong::spawn_peer(exe, &["__peer"], &segment, PeerRole::Floor, config.policy)
            .context("cannot start the floor peer")?;
    let mut floor = FloorClient::new(&segment)?;
    let timeout = Duration::from_secs(10);
    for _ in 0..warmup {
        floor.round_trip(timeout)?;
    }
    bar.inc(warmup);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    let start = Instant::now();
    for i in 0..calls {
        let t = Instant::now();
        floor.round_trip(timeout)?;
        hist.saturating_record(t.elapsed().as_nanos() as u64);
        if i % 256 == 0 {
            bar.inc(256.min(calls - i));
        }
    }
    let elapsed = start.elapsed();
    floor.stop();
    let status = child.wait()?;
    if !status.success() {
        bail!("the floor peer failed: {status}");
    }
    Ok(Row {
        label: "raw floor".to_owned(),
        size: 8,
        hist,
        elapsed,
        calls,
    })
}

fn human_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn print_table(rows: &[Row]) {
    let floor_p50 = rows
        .first()
        .map_or(1.0, |r| r.hist.value_at_quantile(0.5) as f64);
    println!(
        "{:<14} {:>8} {:>10} {:>10} {:>12} {:>10}",
        "mode", "payload", "p50 µs", "p99 µs", "calls/s", "p50/floor"
    );
    for r in rows {
        let p50 = r.hist.value_at_quantile(0.5) as f64;
        let p99 = r.hist.value_at_quantile(0.99) as f64;
        let rate = r.calls as f64 / r.elapsed.as_secs_f64();
        println!(
            "{:<14} {:>8} {:>10.2} {:>10.2} {:>12.0} {:>9.1}×",
            r.label,
            human_size(r.size),
            p50 / 1000.0,
            p99 / 1000.0,
            rate,
            p50 / floor_p50
        );
    }
    println!(
        "raw floor: one cache line bounced between two processes (no ring, no pool). \
         rpc: shmesh unary calls (request written in place, echoed in place, checked). \
         ring: the bare ring echo under them (payloads written in place, checksummed)."
    );
}
