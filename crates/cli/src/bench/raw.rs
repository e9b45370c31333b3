//! The raw floors: what a shared-memory round trip costs with no RPC layer
//! at all, between two processes.
//!
//! Unlike `shmesh_pingpong::floor`, which bounces one cache line and no
//! payload, these floors carry the payload and **copy** it, as a
//! byte-stream transport would: the client copies its message into a shared
//! buffer, the server copies it out into private memory and back into a
//! shared reply buffer, and the client copies the reply out and checks it
//! (four copies per round trip, no descriptor, no ring, no allocation). So
//! a large payload written and read in place by shmesh can beat them.
//!
//! The two floors differ only in how each side waits for the other:
//!
//! - `raw-floor` spins on one shared word (the cache-line ping-pong);
//! - `raw-futex` parks on a doorbell (a futex) at once, and is woken by the
//!   other side: the floor for sleeping waiters, a kernel wake-up per
//!   message.
//!
//! The shared word carries a sequence number: odd from the client (a
//! request is ready), the next even from the server (its reply is ready).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmesh_shm::doorbell::{Doorbell, WaitMode, WaitPolicy};
use shmesh_shm::handle::{BadHandle, SlabHandle};
use shmesh_shm::pool::{AllocError, ClassConfig, OwnedSlab, PoolConfig, PoolConfigError, PoolView};
use shmesh_shm::segment::{CreateError, RegionError, Segment, SegmentBuilder, SharedWord};
use thiserror::Error;

use super::control::{self, ControlError, PeerProcess};
use super::measure::{self, CallResult, MeasureError, Measured, Window};

/// Word tags of the floor segment.
mod tags {
    /// The sequence word: odd = request ready, even = reply ready.
    pub const SEQ: u32 = 0;
    /// The request's length in bytes.
    pub const LEN: u32 = 1;
    /// The request buffer's handle (two words).
    pub const REQUEST: [u32; 2] = [2, 3];
    /// The reply buffer's handle (two words).
    pub const REPLY: [u32; 2] = [4, 5];
    /// Doorbell the server waits on (futex floor).
    pub const TO_SERVER: u32 = 0;
    /// Doorbell the client waits on (futex floor).
    pub const TO_CLIENT: u32 = 1;
    /// The client's pool (the request buffer).
    pub const CLIENT_POOL: u32 = 0;
    /// The server's pool (the reply buffer).
    pub const SERVER_POOL: u32 = 1;
}

/// The value that tells the server to stop.
const STOP: u64 = u64::MAX;
/// How long a round trip may take before the row fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a futex wait sleeps before re-checking the deadline.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// How the two sides of a floor wait for each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Spin on the shared word (`raw-floor`).
    Spin,
    /// Park on a futex doorbell at once (`raw-futex`).
    Futex,
}

impl Waiting {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Waiting::Spin => "spin",
            Waiting::Futex => "futex",
        }
    }
}

/// A raw floor failed.
#[derive(Debug, Error)]
pub enum RawError {
    /// The segment could not be created.
    #[error("cannot create the segment: {0}")]
    Create(#[from] CreateError),
    /// The segment lacks a region.
    #[error("segment layout: {0}")]
    Region(#[from] RegionError),
    /// The pool configuration is invalid.
    #[error("pool configuration: {0}")]
    PoolConfig(#[from] PoolConfigError),
    /// No buffer could be allocated.
    #[error("buffer: {0}")]
    Alloc(#[from] AllocError),
    /// A buffer handle does not name a valid slab.
    #[error("bad buffer handle: {0}")]
    BadHandle(#[from] BadHandle),
    /// The inherited segment could not be opened.
    #[error("cannot open the segment: {0}")]
    Open(#[from] shmesh_pingpong::PingPongError),
    /// The server process could not be started or talked to.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The fd could not be duplicated for the child.
    #[error("cannot pass the segment: {0}")]
    Io(#[from] std::io::Error),
    /// The payload does not fit the shared buffers.
    #[error("{size} B does not fit the {capacity} B buffer")]
    TooLarge {
        /// The payload.
        size: usize,
        /// The buffer.
        capacity: usize,
    },
    /// The peer did not answer in time.
    #[error("the server did not answer within {0:?}")]
    TimedOut(Duration),
    /// The echo differs from the request.
    #[error("the echo differs from the request")]
    WrongEcho,
    /// Measuring failed.
    #[error(transparent)]
    Measure(#[from] MeasureError),
}

/// Creates the floor's segment, with buffers of `capacity` bytes.
fn create_segment(capacity: usize) -> Result<Arc<Segment>, RawError> {
    let slab_size = (capacity.max(64) as u64).next_power_of_two();
    let pool = PoolConfig::new(vec![ClassConfig {
        slab_size,
        count: 1,
    }])?;
    let mut builder = SegmentBuilder::new(1);
    for tag in [tags::SEQ, tags::LEN]
        .into_iter()
        .chain(tags::REQUEST)
        .chain(tags::REPLY)
    {
        builder.word(tag);
    }
    builder
        .doorbell(tags::TO_SERVER)
        .doorbell(tags::TO_CLIENT)
        .pool(tags::CLIENT_POOL, &pool)
        .pool(tags::SERVER_POOL, &pool);
    Ok(builder.create("shmesh-bench-raw")?)
}

fn store_handle(
    segment: &Arc<Segment>,
    tags: [u32; 2],
    handle: SlabHandle,
) -> Result<(), RawError> {
    for (tag, word) in tags.into_iter().zip(handle.to_words()) {
        segment.word(tag)?.store(word);
    }
    Ok(())
}

fn load_handle(segment: &Arc<Segment>, tags: [u32; 2]) -> Result<SlabHandle, RawError> {
    Ok(SlabHandle::from_words([
        segment.word(tags[0])?.load(),
        segment.word(tags[1])?.load(),
    ]))
}

/// Waits until `ready()` holds: spinning, or parked on `bell`. Fails after
/// `timeout` if one is given.
fn wait(
    waiting: Waiting,
    bell: &Doorbell,
    timeout: Option<Duration>,
    mut ready: impl FnMut() -> bool,
) -> Result<(), RawError> {
    match waiting {
        Waiting::Spin => {
            let mut turns = 0u32;
            let mut since: Option<Instant> = None;
            while !ready() {
                std::hint::spin_loop();
                turns = turns.wrapping_add(1);
                // Read the clock only on the slow path.
                if turns.is_multiple_of(1 << 16)
                    && let Some(timeout) = timeout
                    && since.get_or_insert_with(Instant::now).elapsed() > timeout
                {
                    return Err(RawError::TimedOut(timeout));
                }
            }
            Ok(())
        }
        Waiting::Futex => {
            let policy = WaitPolicy::new(WaitMode::Block);
            let start = Instant::now();
            loop {
                if bell.wait_for(policy, WAIT_SLICE, &mut ready).is_ok() {
                    return Ok(());
                }
                if let Some(timeout) = timeout
                    && start.elapsed() > timeout
                {
                    return Err(RawError::TimedOut(timeout));
                }
            }
        }
    }
}

/// Server side (`__bench-peer raw`): answers round trips on the segment
/// inherited as fd `fd` until the benchmark closes our stdin.
pub fn serve(fd: i32, waiting: Waiting) -> Result<(), RawError> {
    let segment = shmesh_pingpong::peer::open_inherited(fd)?;
    let pool = Arc::new(segment.pool(tags::SERVER_POOL)?);
    let capacity = pool
        .layout()
        .classes
        .iter()
        .map(|c| c.slab_size as usize)
        .max()
        .unwrap_or(0);
    let mut reply: OwnedSlab = pool.alloc_owned(capacity)?;
    store_handle(&segment, tags::REPLY, reply.handle())?;
    let requests: PoolView = segment.pool_view(tags::CLIENT_POOL)?;
    let request = load_handle(&segment, tags::REQUEST)?;
    let (seq, len) = (segment.word(tags::SEQ)?, segment.word(tags::LEN)?);
    let (to_server, to_client) = (
        segment.doorbell(tags::TO_SERVER)?,
        segment.doorbell(tags::TO_CLIENT)?,
    );
    let mut private = vec![0u8; capacity];
    control::announce_and_answer(waiting.name())?;
    let mut answered = 0u64;
    loop {
        let mut value = 0;
        wait(waiting, &to_server, None, || {
            value = seq.load();
            value % 2 == 1 && value != answered
        })?;
        if value == STOP {
            return Ok(());
        }
        let n = len.load() as usize;
        if n > capacity {
            return Err(RawError::TooLarge { size: n, capacity });
        }
        // Copy out of shared memory, then into the reply: what a server
        // behind a copying transport does.
        private[..n].copy_from_slice(requests.read(request, n as u64)?);
        reply[..n].copy_from_slice(&private[..n]);
        answered = value;
        seq.store(value + 1);
        if waiting == Waiting::Futex {
            to_client.notify();
        }
    }
}

/// The client end of a floor, and its server process.
pub struct Session {
    // The server process goes last: it is stopped after the client's stop.
    client: FloorClient,
    server: PeerProcess,
}

struct FloorClient {
    seq: SharedWord,
    len: SharedWord,
    request: OwnedSlab,
    replies: PoolView,
    reply: SlabHandle,
    to_server: Doorbell,
    to_client: Doorbell,
    waiting: Waiting,
    next: u64,
    /// The length last stored in the shared length word (stored again
    /// only when it changes: at size 0 a round trip is then the bare
    /// cache-line bounce).
    sent_len: Option<u64>,
    private: Vec<u8>,
}

impl Session {
    /// Creates a segment with buffers of `capacity` bytes and starts its
    /// server (`exe __bench-peer raw --fd N --waiting W`).
    pub fn start(exe: &Path, waiting: Waiting, capacity: usize) -> Result<Self, RawError> {
        let segment = create_segment(capacity)?;
        let pool = Arc::new(segment.pool(tags::CLIENT_POOL)?);
        let request = pool.alloc_owned(capacity.max(1))?;
        store_handle(&segment, tags::REQUEST, request.handle())?;
        let (seq, len) = (segment.word(tags::SEQ)?, segment.word(tags::LEN)?);
        seq.store(0);
        // `dup` clears close-on-exec: the child inherits this copy, and ours
        // closes when `inherited` drops after the spawn.
        let inherited: OwnedFd = rustix::io::dup(segment.fd()).map_err(std::io::Error::from)?;
        let (server, _) = PeerProcess::spawn_command(
            Command::new(exe).args([
                "__bench-peer",
                "raw",
                "--fd",
                &inherited.as_raw_fd().to_string(),
                "--waiting",
                waiting.name(),
            ]),
            Duration::from_secs(20),
        )?;
        drop(inherited);
        let client = FloorClient {
            seq,
            len,
            replies: segment.pool_view(tags::SERVER_POOL)?,
            // Stored by the server before it announced itself ready.
            reply: load_handle(&segment, tags::REPLY)?,
            request,
            to_server: segment.doorbell(tags::TO_SERVER)?,
            to_client: segment.doorbell(tags::TO_CLIENT)?,
            waiting,
            next: 1,
            sent_len: None,
            private: vec![0; capacity],
        };
        Ok(Session { client, server })
    }

    /// Measures `size`-byte round trips, one at a time.
    pub fn measure(&mut self, size: usize, window: Window) -> Result<Measured, RawError> {
        let capacity = self
            .client
            .request
            .capacity()
            .min(self.client.private.len());
        if size > capacity {
            return Err(RawError::TooLarge { size, capacity });
        }
        let message: Vec<u8> = (0..size).map(|i| i as u8).collect();
        self.client.round_trip(&message)?;
        // One caller: `make` is called once, so the client moves in and out
        // through a slot.
        let mut slot = Some(&mut self.client);
        let client = std::cell::RefCell::new(&mut slot);
        Ok(measure::run_threads(1, window, &mut self.server, || {
            let mut taken = client.borrow_mut().take();
            let message = &message;
            move || -> CallResult {
                match taken.as_mut() {
                    Some(client) => Ok(client.round_trip(message)?),
                    None => Err("the raw floor has one caller".into()),
                }
            }
        })?)
    }

    /// Stops the server.
    pub fn finish(self) -> Result<(), RawError> {
        let Session { client, server } = self;
        client.seq.store(STOP);
        if client.waiting == Waiting::Futex {
            client.to_server.notify();
        }
        server.stop()?;
        Ok(())
    }
}

impl FloorClient {
    /// One round trip of `message`: copy in, wait, copy out, check.
    fn round_trip(&mut self, message: &[u8]) -> Result<(), RawError> {
        let n = message.len();
        self.request[..n].copy_from_slice(message);
        if self.sent_len != Some(n as u64) {
            self.len.store(n as u64);
            self.sent_len = Some(n as u64);
        }
        self.seq.store(self.next);
        if self.waiting == Waiting::Futex {
            self.to_server.notify();
        }
        let want = self.next + 1;
        let seq = &self.seq;
        wait(self.waiting, &self.to_client, Some(CALL_TIMEOUT), || {
            seq.load() == want
        })?;
        self.private[..n].copy_from_slice(self.replies.read(self.reply, n as u64)?);
        if self.private[..n] != *message {
            return Err(RawError::WrongEcho);
        }
        self.next += 2;
        Ok(())
    }
}
