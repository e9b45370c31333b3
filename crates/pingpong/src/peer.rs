//! The child's side: maps the segment from an inherited fd and serves.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::doorbell::{WaitMode, WaitPolicy};
use shmesh_shm::pool::AllocError;
use shmesh_shm::segment::Segment;

use crate::{
    METHOD_SHUTDOWN, PingPongError, REQUEST_SALT, RESPONSE_SALT, WaitLimit, check_payload,
    checksum, drain_returns, fill_payload, floor, pop_wait, push_wait, tags,
};

/// Arguments the parent passes to its peer (see [`crate::spawn_peer`]).
#[derive(Debug, Clone, Parser)]
#[command(about = "shmesh ping-pong peer (started by its parent, not by hand)")]
pub struct PeerArgs {
    /// The inherited fd of the segment.
    #[arg(long)]
    pub fd: i32,
    /// What to run.
    #[arg(long, value_parser = ["echo", "hostile", "floor"])]
    pub role: String,
    /// How to wait.
    #[arg(long, value_parser = ["poll", "adaptive", "block"], default_value = "adaptive")]
    pub mode: String,
    /// Spin budget of the adaptive mode, in nanoseconds.
    #[arg(long, default_value_t = 50_000)]
    pub spin_ns: u64,
}

/// Opens the segment the parent let us inherit as fd `fd`.
///
/// Reopening through `/proc/self/fd` gives us an owned descriptor without
/// `unsafe` (adopting a raw fd number is unsafe in Rust); a memfd's seals
/// belong to the file, so they carry over.
pub fn open_inherited(fd: i32) -> Result<Arc<Segment>, PingPongError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))?;
    Ok(Segment::open(OwnedFd::from(file))?)
}

/// Runs the peer described by `args`; the process's exit code.
pub fn run(args: &PeerArgs) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmesh peer ({}): {e}", args.role);
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &PeerArgs) -> Result<(), PingPongError> {
    let segment = open_inherited(args.fd)?;
    let mode = match args.mode.as_str() {
        "poll" => WaitMode::Poll,
        "block" => WaitMode::Block,
        "yield" => WaitMode::Yield,
        _ => WaitMode::Adaptive,
    };
    let policy = WaitPolicy {
        mode,
        spin: Duration::from_nanos(args.spin_ns),
    };
    match args.role.as_str() {
        "floor" => floor::serve(&segment),
        "hostile" => {
            let file = File::options()
                .read(true)
                .write(true)
                .open(format!("/proc/self/fd/{}", args.fd))?;
            serve(&segment, policy, Some(Scribbler::new(file, &segment))).map(drop)
        }
        _ => serve(&segment, policy, None).map(drop),
    }
}

/// Writes random bytes at random places of the segment, as a hostile peer
/// would, through the file rather than the mapping: a real concurrent write
/// from another process into pages the parent has mapped.
pub struct Scribbler {
    file: File,
    targets: Vec<(u64, u64)>,
    state: u64,
}

impl Scribbler {
    /// Aims at every region of `segment` and at its header.
    pub fn new(file: File, segment: &Segment) -> Self {
        let mut targets: Vec<(u64, u64)> = segment
            .regions()
            .iter()
            .map(|r| (r.offset, r.len))
            .collect();
        targets.push((0, 4096));
        let seed = u64::from(std::process::id()) ^ Instant::now().elapsed().as_nanos() as u64;
        Scribbler {
            file,
            targets,
            state: seed | 1,
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: plenty for choosing where to scribble.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Scribbles one random 8-byte word.
    pub fn scribble(&mut self) {
        let pick = (self.next() % self.targets.len() as u64) as usize;
        let (offset, len) = self.targets[pick];
        let at = offset + (self.next() % len.max(8)) / 8 * 8;
        let value = match self.next() % 4 {
            0 => 0,
            1 => u64::MAX,
            2 => self.next() % 1024,
            _ => self.next(),
        };
        let _ = self.file.write_at(&value.to_le_bytes(), at);
    }
}

/// Serves echo calls on `segment` until the parent sends
/// [`METHOD_SHUTDOWN`] or dies. Returns the number of calls served.
pub fn serve(
    segment: &Arc<Segment>,
    policy: WaitPolicy,
    mut scribbler: Option<Scribbler>,
) -> Result<u64, PingPongError> {
    let mut requests = segment.ring_consumer::<Descriptor>(tags::REQUESTS)?;
    let mut responses = segment.ring_producer::<Descriptor>(tags::RESPONSES)?;
    let mut returns_out = segment.ring_producer(tags::RETURNS_TO_PARENT)?;
    let mut returns_in = segment.ring_consumer(tags::RETURNS_TO_CHILD)?;
    let pool = segment.pool(tags::CHILD_POOL)?;
    let view = segment.pool_view(tags::PARENT_POOL)?;
    let request_bell = segment.doorbell(tags::REQUESTS)?;
    let response_bell = segment.doorbell(tags::RESPONSES)?;
    let parent = rustix::process::getppid();
    let mut expected = 0u64;
    loop {
        if let Some(s) = scribbler.as_mut() {
            for _ in 0..4 {
                s.scribble();
            }
        }
        // Wake up now and then to notice a dead parent: its death closes no
        // socket here, and `Poll` never parks.
        let limit = WaitLimit::For(Duration::from_millis(500));
        let Some(d) = pop_wait(&mut requests, &request_bell, policy, limit)? else {
            if rustix::process::getppid() != parent {
                return Ok(expected);
            }
            continue;
        };
        if d.method_id == METHOD_SHUTDOWN {
            return Ok(expected);
        }
        if d.call_id != expected {
            return Err(PingPongError::OutOfOrder {
                expected,
                found: d.call_id,
            });
        }
        let mut response = Descriptor {
            call_id: d.call_id,
            method_id: d.method_id,
            flags: Flags::END,
            ..Default::default()
        };
        if d.flags.contains(Flags::PAYLOAD) {
            let len = d.len as usize;
            check_payload(
                view.read(d.payload, len as u64)?,
                d.call_id,
                REQUEST_SALT,
                d.aux,
            )?;
            let mut slab = loop {
                drain_returns(&mut returns_in, &pool)?;
                match pool.alloc(len) {
                    Ok(slab) => break slab,
                    Err(AllocError::Exhausted { .. }) => std::thread::yield_now(),
                    Err(e) => return Err(e.into()),
                }
            };
            fill_payload(&mut slab[..len], d.call_id, RESPONSE_SALT);
            response.aux = checksum(&slab[..len]);
            response.len = d.len;
            response.flags = Flags::END | Flags::PAYLOAD;
            response.payload = slab.send();
            // Give the request's slab back before answering, so the parent
            // finds it on its return ring by the time it sees the response.
            push_wait(&mut returns_out, d.payload, None)?;
        }
        push_wait(&mut responses, response, None)?;
        response_bell.notify();
        expected += 1;
    }
}
