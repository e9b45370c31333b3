//! The control pipe between `shmesh bench` and each server process it starts.
//!
//! A server process is this same program run as a hidden `__bench-peer`
//! subcommand. Its stdin and stdout are pipes to the benchmark, used for
//! nothing but this line protocol:
//!
//! ```text
//! server → bench   ready <detail>        once serving (detail: an address…)
//! bench  → server  cpu
//! server → bench   cpu <user µs> <system µs>   its own getrusage(RUSAGE_SELF)
//! bench closes the server's stdin        the server exits
//! ```
//!
//! Having the server report its own CPU time on request, rather than reading
//! `RUSAGE_CHILDREN` after it exits, lets one server process serve many rows
//! and still charge each row exactly the server time of its window.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::measure::{CpuTime, MeasureError, ServerCpu};

/// How long a server may take to answer a `cpu` request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to exit once its stdin closes.
const EXIT_TIMEOUT: Duration = Duration::from_secs(3);

/// Talking to a server process failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The process could not be started or its pipes used.
    #[error("server process I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The process exited (or closed stdout) before answering.
    #[error("the server process exited{}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Exited {
        /// Its exit status, if known.
        status: Option<std::process::ExitStatus>,
    },
    /// The process did not answer in time.
    #[error("the server process did not answer within {0:?}")]
    Timeout(Duration),
    /// The process answered something this protocol does not know.
    #[error("unexpected line from the server process: {0:?}")]
    Protocol(String),
    /// `getrusage` failed in the server.
    #[error("getrusage: {0}")]
    Rusage(String),
}

/// A server process started by the benchmark: killed and reaped on drop.
pub struct PeerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
}

impl std::fmt::Debug for PeerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerProcess")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl PeerProcess {
    /// Starts `program args…` with its stdin and stdout piped to us and
    /// waits up to `timeout` for its `ready` line; returns the process and
    /// the line's detail.
    pub fn spawn(
        program: &Path,
        args: &[String],
        timeout: Duration,
    ) -> Result<(Self, String), ControlError> {
        Self::spawn_command(Command::new(program).args(args), timeout)
    }

    /// As [`PeerProcess::spawn`], for a command already set up (inherited
    /// fds, environment).
    pub fn spawn_command(
        command: &mut Command,
        timeout: Duration,
    ) -> Result<(Self, String), ControlError> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let Some(stdout) = stdout else {
            return Err(ControlError::Protocol("no stdout pipe".into()));
        };
        // A reader thread turns the blocking pipe into a channel we can wait
        // on with a timeout; it ends when the process closes its stdout.
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("bench-peer-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if send.send(line).is_err() {
                        return;
                    }
                }
            })?;
        let mut peer = PeerProcess {
            child,
            stdin,
            lines,
        };
        let line = peer.next_line(timeout)?;
        match line.strip_prefix("ready") {
            Some(detail) => Ok((peer, detail.trim().to_owned())),
            None => Err(ControlError::Protocol(line)),
        }
    }

    fn next_line(&mut self, timeout: Duration) -> Result<String, ControlError> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line?),
            Err(RecvTimeoutError::Timeout) => Err(ControlError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => {
                let deadline = Instant::now() + Duration::from_millis(500);
                let status = loop {
                    match self.child.try_wait()? {
                        Some(status) => break Some(status),
                        None if Instant::now() > deadline => break None,
                        None => std::thread::sleep(Duration::from_millis(10)),
                    }
                };
                Err(ControlError::Exited { status })
            }
        }
    }

    /// The server's CPU time so far, as it reports it.
    pub fn cpu(&mut self) -> Result<CpuTime, ControlError> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(ControlError::Exited { status: None });
        };
        stdin.write_all(b"cpu\n")?;
        stdin.flush()?;
        let line = self.next_line(ANSWER_TIMEOUT)?;
        parse_cpu(&line).ok_or(ControlError::Protocol(line))
    }

    /// Closes the server's stdin and waits for it to exit; kills it if it
    /// takes too long. Returns whether it exited successfully by itself.
    pub fn stop(mut self) -> Result<bool, ControlError> {
        self.stdin = None;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                tracing::warn!(pid = self.child.id(), "server did not exit; killing it");
                self.child.kill()?;
                self.child.wait()?;
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl ServerCpu for PeerProcess {
    fn server_cpu(&mut self) -> Result<CpuTime, MeasureError> {
        Ok(self.cpu()?)
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn parse_cpu(line: &str) -> Option<CpuTime> {
    let mut words = line.split_ascii_whitespace();
    if words.next()? != "cpu" {
        return None;
    }
    let user = words.next()?.parse().ok()?;
    let system = words.next()?.parse().ok()?;
    words.next().is_none().then_some(CpuTime {
        user: Duration::from_micros(user),
        system: Duration::from_micros(system),
    })
}

fn format_cpu(cpu: &CpuTime) -> String {
    format!("cpu {} {}", cpu.user.as_micros(), cpu.system.as_micros())
}

/// Server side: announces `ready <detail>` on stdout, then answers the
/// benchmark's requests on a thread of its own; when the benchmark closes
/// our stdin (or dies), exits the process. Call once serving is set up.
pub fn announce_and_answer(detail: &str) -> Result<(), ControlError> {
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready {detail}")?;
        out.flush()?;
    }
    std::thread::Builder::new()
        .name("bench-control".into())
        .spawn(|| {
            let code = match answer() {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("control pipe: {e}");
                    1
                }
            };
            std::process::exit(code);
        })?;
    Ok(())
}

fn answer() -> Result<(), ControlError> {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        match line.trim() {
            "cpu" => {
                let cpu = CpuTime::of_self().map_err(|e| ControlError::Rusage(e.to_string()))?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", format_cpu(&cpu))?;
                out.flush()?;
            }
            other => return Err(ControlError::Protocol(other.to_owned())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_round_trip() {
        let cpu = CpuTime {
            user: Duration::from_micros(1234),
            system: Duration::from_micros(56),
        };
        assert_eq!(parse_cpu(&format_cpu(&cpu)), Some(cpu));
        assert_eq!(parse_cpu("cpu 1"), None);
        assert_eq!(parse_cpu("cpu 1 2 3"), None);
        assert_eq!(parse_cpu("ready x"), None);
    }
}
