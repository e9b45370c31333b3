//! Spin-budget study: the evidence behind `shmesh_shm::doorbell::DEFAULT_SPIN`.
//!
//! For each wait mode (`block`, `adaptive` with spin budgets of 0, 2, 10, 50
//! and 200 µs, and `poll`) a fresh echo child is spawned and the parent makes
//! 64-byte calls, one in flight. Between two calls the client "thinks" for
//! 0, 20, 100 or 500 µs (a busy spin on its own core), so the server waits
//! that long for the next request and its spin budget decides whether it
//! parks, and whether the client then pays for a futex wake. A second,
//! shorter section pins both processes to one CPU, as on a machine with more
//! runnable threads than cores, where a spinning waiter keeps its own peer
//! off the CPU.
//!
//! Per cell it prints the p50, p99 and p99.9 round-trip latency (think time
//! excluded), the CPU time per call of the client (think time subtracted) and
//! of the server, how often each side parked per call (voluntary context
//! switches), and how busy the rest of the machine was meanwhile (from
//! `/proc/stat`: other work skews a cell). CPU and switches come from
//! `/proc/<pid>/task/*/schedstat` and `…/status`, sampled around the measured
//! window of the live processes, so start-up and warm-up are not counted
//! (`rustix` 1.x has no `getrusage`, and this crate does not depend on
//! `libc`).
//!
//! Run with `cargo bench -p shmesh-pingpong --bench spin_budget` (about 80 s
//! on a quiet machine). A quick run: append `-- --quick`, or set
//! `SHMESH_BENCH_QUICK=1` (about 10 s). `SHMESH_BENCH_SECS=S` sets the
//! measuring time per cell (default 2 s; the shared-CPU section takes half).
//! A cell disturbed by other work on the machine is measured again once,
//! after waiting up to 5 s for the machine to go quiet
//! (`SHMESH_BENCH_RETRIES=N` to change). `SHMESH_BENCH_SPINS` and
//! `SHMESH_BENCH_THINKS` replace the lists of spin budgets and think times
//! (comma-separated µs), and `SHMESH_BENCH_SHARED=0` skips the shared-CPU
//! section. Run without `--bench` (as
//! `cargo test --benches` does), it makes a short smoke run.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
use shmesh_pingpong::{Client, PeerRole, PingPongConfig, mode_name};
use shmesh_shm::doorbell::{DEFAULT_SPIN, WaitMode};

/// Payload bytes per call.
const PAYLOAD: usize = 64;
/// Client think times between calls, in µs.
const THINKS_US: [u64; 4] = [0, 20, 100, 500];
/// Think times of the one-shared-CPU section, in µs.
const SHARED_THINKS_US: [u64; 2] = [0, 100];
/// Spin budgets of the adaptive mode, in µs.
const SPINS_US: [u64; 5] = [0, 2, 10, 50, 200];
/// A cell during which the rest of the machine used more than this share of
/// a CPU (in percent) is measured again, up to `SHMESH_BENCH_RETRIES` times
/// (default 1) after waiting for the machine to go quiet, and the quietest
/// run is kept.
const NOISY_PCT: f64 = 25.0;
/// Most samples kept per cell.
const MAX_SAMPLES: usize = 2_000_000;

fn peer() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shmesh-pingpong-peer"))
}

/// What one process has used so far, over all its threads.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// Nanoseconds on a CPU.
    cpu_ns: u64,
    /// Voluntary context switches: parks (and other blocking calls).
    voluntary: u64,
}

impl Usage {
    /// Reads `/proc/<pid>/task/*/{schedstat,status}`.
    fn of(pid: &str) -> Usage {
        let mut usage = Usage::default();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        for task in tasks {
            let dir = task.unwrap().path();
            // A thread may exit between the listing and the reads.
            if let Ok(s) = std::fs::read_to_string(dir.join("schedstat")) {
                usage.cpu_ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Ok(s) = std::fs::read_to_string(dir.join("status")) {
                usage.voluntary += s
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        usage
    }

    fn since(self, before: Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
        }
    }
}

/// Busy and total ticks of the whole machine (summed over its CPUs), and
/// its number of CPUs, from `/proc/stat`.
fn machine_ticks() -> (u64, u64, usize) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let total: u64 = fields.iter().sum();
    // Fields 3 and 4 are idle and iowait.
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    (total - idle, total, cpus)
}

/// Waits, up to `max`, until the machine has been nearly idle for 200 ms.
fn wait_for_quiet(max: Duration) {
    let start = Instant::now();
    while start.elapsed() < max {
        let (busy0, total0, cpus) = machine_ticks();
        std::thread::sleep(Duration::from_millis(200));
        let (busy1, total1, _) = machine_ticks();
        let busy_cpus = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * cpus as f64;
        if busy_cpus * 100.0 < NOISY_PCT {
            return;
        }
    }
}

/// Restricts the calling thread, and the children it spawns from then on,
/// to its first allowed CPU. Returns the previous set, to restore.
fn pin_to_one_cpu() -> CpuSet {
    let before = sched_getaffinity(None).unwrap();
    let first = (0..CpuSet::MAX_CPU).find(|&c| before.is_set(c)).unwrap();
    let mut one = CpuSet::new();
    one.set(first);
    sched_setaffinity(None, &one).unwrap();
    before
}

/// One measured configuration.
#[derive(Debug, Clone, Copy)]
struct Cell {
    mode: WaitMode,
    spin: Duration,
    think: Duration,
    /// Client and server share one CPU, as on an oversubscribed machine.
    one_core: bool,
}

/// What one cell measured.
struct Row {
    cell: Cell,
    calls: usize,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    client_cpu_us: f64,
    server_cpu_us: f64,
    client_parks: f64,
    server_parks: f64,
    /// CPU used by everything else on the machine during the window, in
    /// percent of one CPU: how noisy the cell was.
    background_pct: f64,
}

/// Busy-waits for `d`; returns how long it actually spun.
fn think(d: Duration) -> Duration {
    if d.is_zero() {
        return Duration::ZERO;
    }
    let start = Instant::now();
    let until = start + d;
    loop {
        let now = Instant::now();
        if now >= until {
            return now - start;
        }
        std::hint::spin_loop();
    }
}

fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    let i = ((sorted_ns.len() as f64 * q) as usize).min(sorted_ns.len() - 1);
    sorted_ns[i] as f64 / 1e3
}

fn measure(cell: Cell, warm_up: Duration, window: Duration) -> Row {
    let mut config = PingPongConfig::new(cell.mode, PAYLOAD).unwrap();
    config.policy.spin = cell.spin;
    let affinity = cell.one_core.then(pin_to_one_cpu);
    let mut client = Client::spawn(&config, peer(), &[], PeerRole::Echo).unwrap();
    let child = client.peer_pid().unwrap().to_string();

    // Warm up: the first call waits for the child to start.
    let start = Instant::now();
    while start.elapsed() < warm_up {
        think(cell.think);
        client
            .call(PAYLOAD, Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
    }

    let mut samples = Vec::with_capacity(1 << 16);
    let mut thought = Duration::ZERO;
    let (client_before, server_before) = (Usage::of("self"), Usage::of(&child));
    let (busy_before, total_before, _) = machine_ticks();
    let window_start = Instant::now();
    let end = Instant::now() + window;
    loop {
        thought += think(cell.think);
        let t0 = Instant::now();
        client.call(PAYLOAD, None).unwrap();
        let t1 = Instant::now();
        samples.push((t1 - t0).as_nanos() as u64);
        if t1 >= end || samples.len() >= MAX_SAMPLES {
            break;
        }
    }
    let (client_used, server_used) = (
        Usage::of("self").since(client_before),
        Usage::of(&child).since(server_before),
    );
    let (busy_after, total_after, cpus) = machine_ticks();
    let wall = window_start.elapsed();
    let status = client.shutdown().unwrap().unwrap();
    assert!(status.success(), "echo peer failed: {status}");
    if let Some(set) = affinity {
        sched_setaffinity(None, &set).unwrap();
    }
    // Ticks are summed over the CPUs: busy / total × CPUs is how many CPUs
    // were busy on average.
    let busy_cpus = (busy_after - busy_before) as f64 / (total_after - total_before).max(1) as f64
        * cpus as f64;
    let ours_cpus = (client_used.cpu_ns + server_used.cpu_ns) as f64 / wall.as_nanos() as f64;
    let background_pct = ((busy_cpus - ours_cpus) * 100.0).max(0.0);

    samples.sort_unstable();
    let calls = samples.len();
    let per_call = |x: u64| x as f64 / calls as f64;
    let client_cpu_ns = client_used.cpu_ns.saturating_sub(thought.as_nanos() as u64);
    Row {
        cell,
        calls,
        p50_us: percentile_us(&samples, 0.50),
        p99_us: percentile_us(&samples, 0.99),
        p999_us: percentile_us(&samples, 0.999),
        client_cpu_us: per_call(client_cpu_ns) / 1e3,
        server_cpu_us: per_call(server_used.cpu_ns) / 1e3,
        client_parks: per_call(client_used.voluntary),
        server_parks: per_call(server_used.voluntary),
        background_pct,
    }
}

fn header() {
    println!(
        "{:<9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>14} {:>14} {:>10} {:>10} {:>7}",
        "mode",
        "spin µs",
        "think µs",
        "calls",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "cli CPU µs/c",
        "srv CPU µs/c",
        "cli park/c",
        "srv park/c",
        "other %"
    );
}

fn print_row(r: &Row) {
    let spin = match r.cell.mode {
        WaitMode::Adaptive | WaitMode::Yield => format!("{}", r.cell.spin.as_micros()),
        _ => "-".to_owned(),
    };
    println!(
        "{:<9} {:>8} {:>9} {:>8} {:>8.1} {:>8.1} {:>9.1} {:>14.2} {:>14.2} {:>10.3} {:>10.3} {:>7.0}",
        mode_name(r.cell.mode),
        spin,
        r.cell.think.as_micros(),
        r.calls,
        r.p50_us,
        r.p99_us,
        r.p999_us,
        r.client_cpu_us,
        r.server_cpu_us,
        r.client_parks,
        r.server_parks,
        r.background_pct
    );
}

/// A comma-separated list of µs values from the environment.
fn list_var(name: &str) -> Option<Vec<u64>> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .split(',')
            .map(|v| {
                v.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: bad value {v:?}"))
            })
            .collect(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let as_bench = args.iter().any(|a| a == "--bench");
    let quick = !as_bench
        || args.iter().any(|a| a == "--quick")
        || std::env::var_os("SHMESH_BENCH_QUICK").is_some_and(|v| v != "0");
    let window = std::env::var("SHMESH_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(if quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        });
    let retries = std::env::var("SHMESH_BENCH_RETRIES")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(if quick { 0 } else { 1 });
    let warm_up = if quick {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(200)
    };

    let spins = list_var("SHMESH_BENCH_SPINS").unwrap_or(SPINS_US.to_vec());
    let mut modes = vec![(WaitMode::Block, Duration::ZERO)];
    modes.extend(
        spins
            .iter()
            .map(|&us| (WaitMode::Adaptive, Duration::from_micros(us))),
    );
    modes.push((WaitMode::Poll, Duration::ZERO));
    let default_thinks: &[u64] = if as_bench { &THINKS_US } else { &[0, 100] };
    let thinks = list_var("SHMESH_BENCH_THINKS").unwrap_or(default_thinks.to_vec());
    let shared_thinks: &[u64] = match std::env::var("SHMESH_BENCH_SHARED").as_deref() {
        Ok("0") => &[],
        _ if as_bench => &SHARED_THINKS_US,
        _ => &[0],
    };

    println!(
        "spin-budget study: {PAYLOAD}-byte echo calls, one in flight, {:.1} s per cell \
         (DEFAULT_SPIN = {} µs)",
        window.as_secs_f64(),
        DEFAULT_SPIN.as_micros()
    );
    println!(
        "latency excludes the think time; client CPU has it subtracted; \
         'other %' is the CPU the rest of the machine used meanwhile \
         (cells over {NOISY_PCT}% are measured up to {retries} more time(s), the quietest kept)"
    );
    let started = Instant::now();
    let sections = [
        (
            "client and server on their own cores",
            &thinks[..],
            false,
            window,
        ),
        (
            "client and server pinned to one shared CPU (an oversubscribed machine)",
            shared_thinks,
            true,
            window / 2,
        ),
    ];
    for (title, thinks, one_core, window) in sections {
        if thinks.is_empty() {
            continue;
        }
        println!();
        println!("== {title}");
        header();
        for &think_us in thinks {
            for &(mode, spin) in &modes {
                let cell = Cell {
                    mode,
                    spin,
                    think: Duration::from_micros(think_us),
                    one_core,
                };
                let mut row = measure(cell, warm_up, window);
                for _ in 0..retries {
                    if row.background_pct <= NOISY_PCT {
                        break;
                    }
                    wait_for_quiet(Duration::from_secs(5));
                    let again = measure(cell, warm_up, window);
                    if again.background_pct < row.background_pct {
                        row = again;
                    }
                }
                print_row(&row);
            }
            println!();
        }
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
}
