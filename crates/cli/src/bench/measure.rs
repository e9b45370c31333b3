//! Timing machinery shared by every peer: closed-loop callers on threads or
//! tokio tasks, HDR histograms of round-trip times, and CPU time from
//! `getrusage`.
//!
//! A row runs `inflight` callers, each calling in a loop (the next call
//! starts when the previous one returns). Calls run for a warm-up, then for
//! the measured window; every call that *completes* inside the window is
//! counted and its round trip recorded. CPU time is sampled at both edges of
//! the window, in this process (`RUSAGE_SELF`) and in the server process
//! (which reports its own `RUSAGE_SELF` when asked, see
//! [`super::control`]), so the figures cover exactly the window.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::resource::{UsageWho, getrusage};
use thiserror::Error;

/// An error from one call, whatever the peer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The result of one call.
pub type CallResult = Result<(), BoxError>;

/// Highest round trip the histograms hold (longer ones are clamped).
const MAX_RECORDED_NS: u64 = 60_000_000_000;

/// Measuring a row failed.
#[derive(Debug, Error)]
pub enum MeasureError {
    /// A histogram could not be created or merged.
    #[error("histogram: {0}")]
    Histogram(String),
    /// `getrusage` failed.
    #[error("getrusage: {0}")]
    Rusage(#[from] nix::Error),
    /// The server could not report its CPU time.
    #[error("server CPU time: {0}")]
    ServerCpu(#[from] super::control::ControlError),
    /// A call failed while the row was running.
    #[error("call failed: {0}")]
    Call(BoxError),
    /// A caller thread or task panicked.
    #[error("a caller panicked or was cancelled")]
    CallerLost,
}

/// CPU time a process spent, in user and kernel mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// Time in user mode.
    pub user: Duration,
    /// Time in the kernel on the process's behalf.
    pub system: Duration,
}

impl CpuTime {
    /// This process's CPU time so far (`getrusage(RUSAGE_SELF)`: all threads).
    pub fn of_self() -> Result<Self, MeasureError> {
        let usage = getrusage(UsageWho::RUSAGE_SELF)?;
        let micros = |tv: nix::sys::time::TimeVal| {
            Duration::from_secs(tv.tv_sec().max(0) as u64)
                + Duration::from_micros(tv.tv_usec().max(0) as u64)
        };
        Ok(CpuTime {
            user: micros(usage.user_time()),
            system: micros(usage.system_time()),
        })
    }

    /// User plus system time.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// The time spent between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// Where a row's server CPU time comes from.
pub trait ServerCpu {
    /// The server process's CPU time so far.
    fn server_cpu(&mut self) -> Result<CpuTime, MeasureError>;
}

/// How long a row warms up and how long it is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Calls before the measured window (not recorded).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
}

/// What one row measured.
#[derive(Debug)]
pub struct Measured {
    /// Round trips, in nanoseconds, of the calls completed in the window.
    pub hist: Histogram<u64>,
    /// Calls completed in the window.
    pub calls: u64,
    /// Length of the window.
    pub elapsed: Duration,
    /// CPU time of this (client) process during the window.
    pub client_cpu: CpuTime,
    /// CPU time of the server process during the window.
    pub server_cpu: CpuTime,
}

/// An empty histogram of nanosecond round trips.
pub fn new_histogram() -> Result<Histogram<u64>, MeasureError> {
    Histogram::new_with_bounds(1, MAX_RECORDED_NS, 3)
        .map_err(|e| MeasureError::Histogram(e.to_string()))
}

/// One caller's share of a row.
struct Share {
    hist: Histogram<u64>,
    calls: u64,
}

/// Accumulates one caller's completed calls.
struct Recorder {
    share: Share,
    start: Instant,
    end: Instant,
}

impl Recorder {
    fn new(start: Instant, end: Instant) -> Result<Self, MeasureError> {
        Ok(Recorder {
            share: Share {
                hist: new_histogram()?,
                calls: 0,
            },
            start,
            end,
        })
    }

    /// Records a call that ran from `began` to `done`; false once the
    /// window is over (the caller stops).
    fn record(&mut self, began: Instant, done: Instant) -> bool {
        if done >= self.start && done <= self.end {
            self.share
                .hist
                .saturating_record(done.duration_since(began).as_nanos() as u64);
            self.share.calls += 1;
        }
        done < self.end
    }
}

/// Samples CPU time at the window's edges while the callers run, then
/// merges what the callers return.
fn sample_window(
    server: &mut dyn ServerCpu,
    start: Instant,
    end: Instant,
    join: impl FnOnce() -> Result<Vec<Share>, MeasureError>,
) -> Result<Measured, MeasureError> {
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let client_before = CpuTime::of_self();
    let server_before = server.server_cpu();
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let client_after = CpuTime::of_self();
    let server_after = server.server_cpu();
    // Join before reporting a sampling error: the callers must not outlive
    // the row.
    let shares = join()?;
    let (client_before, client_after) = (client_before?, client_after?);
    let (server_before, server_after) = (server_before?, server_after?);
    let mut hist = new_histogram()?;
    let mut calls = 0;
    for share in shares {
        hist.add(&share.hist)
            .map_err(|e| MeasureError::Histogram(e.to_string()))?;
        calls += share.calls;
    }
    Ok(Measured {
        hist,
        calls,
        elapsed: end.duration_since(start),
        client_cpu: client_after.since(&client_before),
        server_cpu: server_after.since(&server_before),
    })
}

/// Runs `inflight` threads, each calling the caller `make` gives it in a
/// closed loop, for `window`; samples CPU time from this thread.
pub fn run_threads<C>(
    inflight: usize,
    window: Window,
    server: &mut dyn ServerCpu,
    make: impl Fn() -> C,
) -> Result<Measured, MeasureError>
where
    C: FnMut() -> CallResult + Send,
{
    let start = Instant::now() + window.warmup;
    let end = start + window.duration;
    std::thread::scope(|scope| {
        let callers: Vec<_> = (0..inflight.max(1))
            .map(|_| {
                let mut call = make();
                scope.spawn(move || -> Result<Share, MeasureError> {
                    let mut recorder = Recorder::new(start, end)?;
                    loop {
                        let began = Instant::now();
                        call().map_err(MeasureError::Call)?;
                        if !recorder.record(began, Instant::now()) {
                            return Ok(recorder.share);
                        }
                    }
                })
            })
            .collect();
        sample_window(server, start, end, || {
            let mut shares = Vec::with_capacity(callers.len());
            let mut first_error = None;
            for caller in callers {
                match caller.join() {
                    Ok(Ok(share)) => shares.push(share),
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        first_error.get_or_insert(MeasureError::CallerLost);
                    }
                }
            }
            first_error.map_or(Ok(shares), Err)
        })
    })
}

/// Runs `inflight` tokio tasks on `runtime`, each calling the caller `make`
/// gives it in a closed loop, for `window`; samples CPU time from this
/// (non-runtime) thread.
pub fn run_tasks<C, F>(
    runtime: &tokio::runtime::Runtime,
    inflight: usize,
    window: Window,
    server: &mut dyn ServerCpu,
    make: impl Fn() -> C,
) -> Result<Measured, MeasureError>
where
    C: FnMut() -> F + Send + 'static,
    F: Future<Output = CallResult> + Send,
{
    let start = Instant::now() + window.warmup;
    let end = start + window.duration;
    let tasks: Vec<_> = (0..inflight.max(1))
        .map(|_| {
            let mut call = make();
            runtime.spawn(async move {
                let mut recorder = Recorder::new(start, end)?;
                loop {
                    let began = Instant::now();
                    call().await.map_err(MeasureError::Call)?;
                    if !recorder.record(began, Instant::now()) {
                        return Ok::<_, MeasureError>(recorder.share);
                    }
                }
            })
        })
        .collect();
    sample_window(server, start, end, || {
        runtime.block_on(async {
            let mut shares = Vec::with_capacity(tasks.len());
            let mut first_error = None;
            for task in tasks {
                match task.await {
                    Ok(Ok(share)) => shares.push(share),
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        first_error.get_or_insert(MeasureError::CallerLost);
                    }
                }
            }
            first_error.map_or(Ok(shares), Err)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoServer;

    impl ServerCpu for NoServer {
        fn server_cpu(&mut self) -> Result<CpuTime, MeasureError> {
            Ok(CpuTime::default())
        }
    }

    #[test]
    fn threads_count_calls_in_the_window() -> Result<(), MeasureError> {
        let window = Window {
            warmup: Duration::from_millis(5),
            duration: Duration::from_millis(20),
        };
        let m = run_threads(3, window, &mut NoServer, || {
            || {
                std::thread::sleep(Duration::from_micros(200));
                Ok(())
            }
        })?;
        assert!(m.calls > 0);
        assert_eq!(m.calls, m.hist.len());
        assert!(m.hist.value_at_quantile(0.5) >= 200_000);
        Ok(())
    }

    #[test]
    fn a_failing_call_fails_the_row() {
        let window = Window {
            warmup: Duration::ZERO,
            duration: Duration::from_millis(5),
        };
        let r = run_threads(2, window, &mut NoServer, || || Err("no".into()));
        assert!(matches!(r, Err(MeasureError::Call(_))));
    }

    #[test]
    fn tasks_count_calls_in_the_window() -> Result<(), Box<dyn std::error::Error>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let window = Window {
            warmup: Duration::from_millis(5),
            duration: Duration::from_millis(20),
        };
        let m = run_tasks(&runtime, 4, window, &mut NoServer, || {
            || async {
                tokio::task::yield_now().await;
                Ok(())
            }
        })?;
        assert!(m.calls > 0);
        Ok(())
    }

    #[test]
    fn cpu_time_moves_forward() -> Result<(), MeasureError> {
        let before = CpuTime::of_self()?;
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = CpuTime::of_self()?;
        assert!(after.total() >= before.total());
        Ok(())
    }
}
