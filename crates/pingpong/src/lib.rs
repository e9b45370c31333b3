//! A two-process echo over the shared-memory primitives of `shmesh-shm`.
//!
//! The parent creates one segment holding everything a pair of processes
//! needs to exchange payload-carrying descriptors, spawns a child that maps it
//! from an inherited fd, and calls it:
//!
//! ```text
//!  parent (Client)                     segment                      child (Server)
//!  pool 0 ── alloc, write ──▶ ring REQUESTS  + bell REQUESTS ──▶ read in place, check
//!          ◀── read in place ── ring RESPONSES + bell RESPONSES ◀── pool 1: alloc, write
//!  release ◀────────────────── ring RETURNS_TO_PARENT ◀──────────── give request slab back
//!          ────────────────────▶ ring RETURNS_TO_CHILD ────────────▶ release
//! ```
//!
//! Every payload is checksummed by its writer and checked by its reader, and
//! every call id is checked for order, so a lost, duplicated or corrupted
//! message is an error, not a statistic. The same code serves `shmesh demo`,
//! the two-process tests and the ping-pong benchmarks. The raw floor, a bare
//! cache-line ping-pong through one [`SharedWord`], lives in [`floor`].
//!
//! [`SharedWord`]: shmesh_shm::segment::SharedWord

pub mod floor;
pub mod peer;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmesh_shm::descriptor::{CorruptDescriptor, Descriptor, Flags};
use shmesh_shm::doorbell::{Doorbell, WaitMode, WaitPolicy, WaitTimedOut};
use shmesh_shm::handle::{BadHandle, SlabHandle};
use shmesh_shm::pool::{AllocError, ClassConfig, Pool, PoolConfig, PoolConfigError, PoolView};
use shmesh_shm::ring::{Consumer, CorruptTail, Entry, PopError, Producer, PushError};
use shmesh_shm::segment::{CreateError, OpenError, RegionError, Segment, SegmentBuilder};
use thiserror::Error;

/// Ring, doorbell and pool tags of the ping-pong segment.
pub mod tags {
    /// Parent → child descriptors, and the doorbell the child waits on.
    pub const REQUESTS: u32 = 0;
    /// Child → parent descriptors, and the doorbell the parent waits on.
    pub const RESPONSES: u32 = 1;
    /// Child → parent: request slabs given back.
    pub const RETURNS_TO_PARENT: u32 = 2;
    /// Parent → child: response slabs given back.
    pub const RETURNS_TO_CHILD: u32 = 3;
    /// The parent's pool (requests).
    pub const PARENT_POOL: u32 = 0;
    /// The child's pool (responses).
    pub const CHILD_POOL: u32 = 1;
    /// The word the raw floor ping-pongs on.
    pub const FLOOR_WORD: u32 = 0;
}

/// Method id the parent sends to make the child exit.
pub const METHOD_SHUTDOWN: u32 = u32::MAX;
/// Method id of an echo call.
pub const METHOD_ECHO: u32 = 1;

/// The shape of a ping-pong segment.
#[derive(Debug, Clone)]
pub struct PingPongConfig {
    /// Slots per ring (a power of two); also the most calls in flight.
    pub ring_depth: usize,
    /// Size classes of each side's pool.
    pub pool: PoolConfig,
    /// How both sides wait.
    pub policy: WaitPolicy,
}

impl PingPongConfig {
    /// A ring of 256 and pools sized for `max_payload`-byte messages.
    pub fn new(mode: WaitMode, max_payload: usize) -> Result<Self, PoolConfigError> {
        let big = (max_payload.max(64) as u64).next_power_of_two();
        let mut classes = vec![ClassConfig {
            slab_size: 256,
            count: 512,
        }];
        if big > 256 {
            classes.push(ClassConfig {
                slab_size: big,
                count: (64 << 20) / big.max(1 << 16) * 4,
            });
        }
        Ok(PingPongConfig {
            ring_depth: 256,
            pool: PoolConfig::new(classes)?,
            policy: WaitPolicy::new(mode),
        })
    }
}

/// Everything that can go wrong between the two processes.
#[derive(Debug, Error)]
pub enum PingPongError {
    /// The segment could not be created.
    #[error("cannot create the segment: {0}")]
    Create(#[from] CreateError),
    /// The segment received could not be opened.
    #[error("cannot open the segment: {0}")]
    Open(#[from] OpenError),
    /// The segment lacks a region this program needs.
    #[error("segment layout: {0}")]
    Region(#[from] RegionError),
    /// The pool configuration is invalid.
    #[error("pool configuration: {0}")]
    PoolConfig(#[from] PoolConfigError),
    /// The peer process could not be started or waited for.
    #[error("peer process: {0}")]
    Process(#[from] std::io::Error),
    /// The peer exited while we expected it to serve.
    #[error("peer exited: {0}")]
    PeerExited(std::process::ExitStatus),
    /// A ring index was corrupted by the peer.
    #[error(transparent)]
    CorruptTail(#[from] CorruptTail),
    /// A descriptor ring delivered a corrupt index or entry.
    #[error(transparent)]
    CorruptDescriptor(#[from] PopError<CorruptDescriptor>),
    /// A return ring delivered a corrupt index.
    #[error(transparent)]
    CorruptReturn(#[from] PopError<std::convert::Infallible>),
    /// A handle from the peer does not name a valid slab.
    #[error("bad handle from peer: {0}")]
    BadHandle(#[from] BadHandle),
    /// No slab available.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The peer did not answer before the deadline.
    #[error("peer did not answer before the deadline")]
    TimedOut,
    /// A message arrived out of order, or twice, or not at all.
    #[error("expected call {expected}, got call {found}")]
    OutOfOrder {
        /// The call id expected next.
        expected: u64,
        /// The call id received.
        found: u64,
    },
    /// A payload's bytes do not match its checksum.
    #[error("call {call_id}: payload checksum {found:#x}, sender wrote {expected:#x}")]
    Corrupted {
        /// The call.
        call_id: u64,
        /// Checksum the sender wrote in the descriptor.
        expected: u64,
        /// Checksum of the bytes received.
        found: u64,
    },
    /// A response whose length differs from its request's.
    #[error("call {call_id}: response of {found} bytes to a request of {expected}")]
    WrongLength {
        /// The call.
        call_id: u64,
        /// Request length.
        expected: u32,
        /// Response length.
        found: u32,
    },
    /// A ring stayed full for longer than the call's deadline.
    #[error("ring stayed full")]
    RingFull,
    /// An earlier error broke the connection; it takes no more calls.
    #[error("connection broken by an earlier error")]
    Broken,
}

/// Creates the segment both sides map.
pub fn create_segment(config: &PingPongConfig) -> Result<Arc<Segment>, PingPongError> {
    let mut b = SegmentBuilder::new(1);
    b.ring::<Descriptor>(tags::REQUESTS, config.ring_depth)
        .ring::<Descriptor>(tags::RESPONSES, config.ring_depth)
        .ring::<SlabHandle>(tags::RETURNS_TO_PARENT, config.ring_depth * 2)
        .ring::<SlabHandle>(tags::RETURNS_TO_CHILD, config.ring_depth * 2)
        .doorbell(tags::REQUESTS)
        .doorbell(tags::RESPONSES)
        .pool(tags::PARENT_POOL, &config.pool)
        .pool(tags::CHILD_POOL, &config.pool)
        .word(tags::FLOOR_WORD);
    Ok(b.create("pingpong")?)
}

/// A cheap checksum of a payload: four independent lanes of
/// add-rotate-multiply over 64-bit words, so it runs near memory speed while
/// catching flipped, swapped or replaced words.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut lanes = [
        0x243f_6a88_85a3_08d3u64,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    let mut chunks = bytes.chunks_exact(32);
    for chunk in &mut chunks {
        for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            *lane = (lane.wrapping_add(u64::from_le_bytes(w)))
                .rotate_left(23)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    let mut tail = [0u8; 32];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    let mut h = bytes.len() as u64;
    for (lane, word) in lanes.iter().zip(tail.chunks_exact(8)) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        h = (h ^ lane ^ u64::from_le_bytes(w))
            .rotate_left(29)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }
    h
}

/// Fills a payload for `call_id`: its id in the first word, then a byte that
/// depends on the id and the direction, so a slab delivered to the wrong call
/// is caught even if its checksum matches.
pub fn fill_payload(buf: &mut [u8], call_id: u64, salt: u8) {
    buf.fill((call_id as u8) ^ salt);
    let id = call_id.to_le_bytes();
    let n = buf.len().min(8);
    buf[..n].copy_from_slice(&id[..n]);
}

/// Checks a received payload: checksum first, then its content for the call.
fn check_payload(
    bytes: &[u8],
    call_id: u64,
    salt: u8,
    expected_sum: u64,
) -> Result<(), PingPongError> {
    let found = checksum(bytes);
    if found != expected_sum {
        return Err(PingPongError::Corrupted {
            call_id,
            expected: expected_sum,
            found,
        });
    }
    let id = call_id.to_le_bytes();
    let n = bytes.len().min(8);
    let fill = (call_id as u8) ^ salt;
    if bytes[..n] != id[..n] || bytes[n..].iter().any(|&b| b != fill) {
        return Err(PingPongError::Corrupted {
            call_id,
            expected: expected_sum,
            found: !found,
        });
    }
    Ok(())
}

/// Sends between two looks at the return ring.
const RETURN_BATCH: u64 = 16;

/// How often a waiting client checks that its child is still alive.
const LIVENESS_SLICE: Duration = Duration::from_millis(20);

/// Salts of the two directions.
const REQUEST_SALT: u8 = 0x5a;
const RESPONSE_SALT: u8 = 0xa5;

/// How long [`pop_wait`] may wait.
#[derive(Debug, Clone, Copy)]
enum WaitLimit {
    /// Until this instant (or forever).
    Until(Option<Instant>),
    /// For about this long, without reading the clock if the wait is short.
    For(Duration),
}

/// Pops one descriptor, waiting per `policy` within `limit`.
fn pop_wait(
    rx: &mut Consumer<Descriptor>,
    bell: &Doorbell,
    policy: WaitPolicy,
    limit: WaitLimit,
) -> Result<Option<Descriptor>, PingPongError> {
    loop {
        if let Some(d) = rx.try_pop()? {
            return Ok(Some(d));
        }
        let waited = match limit {
            WaitLimit::Until(deadline) => {
                bell.wait_until(policy, deadline, || rx.has_pending_hint())
            }
            WaitLimit::For(timeout) => bell.wait_for(policy, timeout, || rx.has_pending_hint()),
        };
        if let Err(WaitTimedOut) = waited {
            return Ok(rx.try_pop()?);
        }
    }
}

/// Pushes one entry, yielding while the ring is full (the peer drains it
/// without waiting on us), until `deadline`. Return rings are twice as deep
/// as request rings, so they fill only if the peer stops draining them.
fn push_wait<E: Entry>(
    tx: &mut Producer<E>,
    entry: E,
    deadline: Option<Instant>,
) -> Result<(), PingPongError> {
    let mut entry = entry;
    loop {
        match tx.try_push(entry) {
            Ok(()) => return Ok(()),
            Err(PushError::Full(back)) => {
                if deadline.is_some_and(|t| Instant::now() >= t) {
                    return Err(PingPongError::RingFull);
                }
                entry = back;
                std::thread::yield_now();
            }
            Err(PushError::Corrupt(e)) => return Err(e.into()),
        }
    }
}

/// Gives every handle on a return ring back to its pool.
fn drain_returns(rx: &mut Consumer<SlabHandle>, pool: &Pool) -> Result<usize, PingPongError> {
    let mut n = 0;
    while let Some(h) = rx.try_pop()? {
        pool.release_returned(h)?;
        n += 1;
    }
    Ok(n)
}

/// The parent's side: sends echo calls and checks every answer.
pub struct Client {
    segment: Arc<Segment>,
    child: Option<Child>,
    requests: Producer<Descriptor>,
    responses: Consumer<Descriptor>,
    returns_in: Consumer<SlabHandle>,
    returns_out: Producer<SlabHandle>,
    pool: Pool,
    peer_pool: PoolView,
    request_bell: Doorbell,
    response_bell: Doorbell,
    policy: WaitPolicy,
    next_call: u64,
    next_response: u64,
    /// Request lengths of calls in flight, by call id modulo ring depth.
    in_flight_len: Vec<u32>,
    broken: bool,
}

/// What the child should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// Serve echo calls until told to stop.
    Echo,
    /// Serve echo calls while scribbling random bytes over the segment.
    Hostile,
    /// The raw cache-line ping-pong floor.
    Floor,
}

impl PeerRole {
    /// The role's command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Echo => "echo",
            PeerRole::Hostile => "hostile",
            PeerRole::Floor => "floor",
        }
    }
}

/// The command-line name of a wait mode.
pub fn mode_name(mode: WaitMode) -> &'static str {
    match mode {
        WaitMode::Poll => "poll",
        WaitMode::Adaptive => "adaptive",
        WaitMode::Block => "block",
        WaitMode::Yield => "yield",
    }
}

/// Starts `program` (with `args` before the peer's own arguments) as the
/// peer, handing it the segment's fd. The child receives
/// `--fd N --role ROLE --mode MODE --spin-ns NS`.
pub fn spawn_peer(
    program: &Path,
    args: &[&str],
    segment: &Segment,
    role: PeerRole,
    policy: WaitPolicy,
) -> Result<Child, PingPongError> {
    // `dup` clears close-on-exec, so the child inherits this copy; ours is
    // closed when `inherited` drops after the spawn.
    let inherited: OwnedFd = rustix::io::dup(segment.fd()).map_err(std::io::Error::from)?;
    let child = Command::new(program)
        .args(args)
        .arg("--fd")
        .arg(inherited.as_raw_fd().to_string())
        .arg("--role")
        .arg(role.as_str())
        .arg("--mode")
        .arg(mode_name(policy.mode))
        .arg("--spin-ns")
        .arg(policy.spin.as_nanos().to_string())
        .stdin(Stdio::null())
        .spawn()?;
    drop(inherited);
    Ok(child)
}

impl Client {
    /// Creates a segment, spawns the peer with `program args…` in `role`, and
    /// returns the client end.
    pub fn spawn(
        config: &PingPongConfig,
        program: &Path,
        args: &[&str],
        role: PeerRole,
    ) -> Result<Self, PingPongError> {
        let segment = create_segment(config)?;
        let child = spawn_peer(program, args, &segment, role, config.policy)?;
        let mut client = Client::over(segment, config.policy)?;
        client.child = Some(child);
        Ok(client)
    }

    /// The client end over an existing segment (the peer is started by the
    /// caller, or runs on a thread).
    pub fn over(segment: Arc<Segment>, policy: WaitPolicy) -> Result<Self, PingPongError> {
        let requests = segment.ring_producer(tags::REQUESTS)?;
        let depth = requests.capacity();
        Ok(Client {
            responses: segment.ring_consumer(tags::RESPONSES)?,
            returns_in: segment.ring_consumer(tags::RETURNS_TO_PARENT)?,
            returns_out: segment.ring_producer(tags::RETURNS_TO_CHILD)?,
            pool: segment.pool(tags::PARENT_POOL)?,
            peer_pool: segment.pool_view(tags::CHILD_POOL)?,
            request_bell: segment.doorbell(tags::REQUESTS)?,
            response_bell: segment.doorbell(tags::RESPONSES)?,
            requests,
            segment,
            child: None,
            policy,
            next_call: 0,
            next_response: 0,
            in_flight_len: vec![0; depth],
            broken: false,
        })
    }

    /// The segment, for tests that inspect it.
    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    /// The client's pool, for leak checks.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The peer's process id, when it is a child of ours.
    pub fn peer_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// After the peer died: takes back the slabs it returned and then every
    /// slab still marked as sent to it. Returns how many were reclaimed.
    pub fn reclaim_from_dead_peer(&mut self) -> Result<u64, PingPongError> {
        // Handles the peer managed to return are released normally; a
        // corrupt return ring does not stop the reclaim.
        let returned = drain_returns(&mut self.returns_in, &self.pool).unwrap_or(0) as u64;
        self.broken = true;
        Ok(returned + self.pool.reclaim_sent())
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u64 {
        self.next_call - self.next_response
    }

    /// Sends call number `next_call` with a `len`-byte payload (0: none).
    pub fn send(&mut self, len: usize, deadline: Option<Instant>) -> Result<u64, PingPongError> {
        self.guard(|c| c.send_inner(len, deadline))
    }

    fn send_inner(&mut self, len: usize, deadline: Option<Instant>) -> Result<u64, PingPongError> {
        let call_id = self.next_call;
        // Take returned slabs back in batches: each look at the return ring
        // can cost a cache-line transfer, and the pool has room to spare.
        if call_id.is_multiple_of(RETURN_BATCH) {
            drain_returns(&mut self.returns_in, &self.pool)?;
        }
        let mut d = Descriptor {
            call_id,
            method_id: METHOD_ECHO,
            ..Default::default()
        };
        if len > 0 {
            let mut slab = loop {
                match self.pool.alloc(len) {
                    Ok(slab) => break slab,
                    Err(AllocError::Exhausted { .. })
                        if deadline.is_none_or(|t| Instant::now() < t) =>
                    {
                        std::thread::yield_now();
                        drain_returns(&mut self.returns_in, &self.pool)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            fill_payload(&mut slab[..len], call_id, REQUEST_SALT);
            d.aux = checksum(&slab[..len]);
            d.len = len as u32;
            d.flags = Flags::PAYLOAD;
            d.payload = slab.send();
        }
        push_wait(&mut self.requests, d, deadline)?;
        self.request_bell.notify();
        let slot = (call_id % self.in_flight_len.len() as u64) as usize;
        self.in_flight_len[slot] = d.len;
        self.next_call += 1;
        Ok(call_id)
    }

    /// Waits for the next response, checks it and gives its slab back.
    pub fn recv(&mut self, deadline: Option<Instant>) -> Result<u64, PingPongError> {
        self.guard(|c| c.recv_inner(deadline))
    }

    fn recv_inner(&mut self, deadline: Option<Instant>) -> Result<u64, PingPongError> {
        // Wait in slices so a dead child is noticed promptly, not at the
        // deadline: this crate has no socket to signal death (the RPC layer
        // does).
        let d = loop {
            let limit = match deadline {
                // No clock read on the fast path: the slice is relative.
                None => WaitLimit::For(LIVENESS_SLICE),
                Some(t) => WaitLimit::Until(Some(t.min(Instant::now() + LIVENESS_SLICE))),
            };
            if let Some(d) = pop_wait(&mut self.responses, &self.response_bell, self.policy, limit)?
            {
                break d;
            }
            if let Some(status) = self.child_exit()? {
                return Err(PingPongError::PeerExited(status));
            }
            if deadline.is_some_and(|t| Instant::now() >= t) {
                return Err(PingPongError::TimedOut);
            }
        };
        if d.call_id != self.next_response {
            return Err(PingPongError::OutOfOrder {
                expected: self.next_response,
                found: d.call_id,
            });
        }
        let slot = (d.call_id % self.in_flight_len.len() as u64) as usize;
        let expected_len = self.in_flight_len[slot];
        if d.len != expected_len {
            return Err(PingPongError::WrongLength {
                call_id: d.call_id,
                expected: expected_len,
                found: d.len,
            });
        }
        if d.flags.contains(Flags::PAYLOAD) {
            let bytes = self.peer_pool.read(d.payload, d.len.into())?;
            check_payload(bytes, d.call_id, RESPONSE_SALT, d.aux)?;
            push_wait(&mut self.returns_out, d.payload, deadline)?;
        }
        self.next_response += 1;
        Ok(d.call_id)
    }

    /// One round trip with a `len`-byte payload.
    pub fn call(&mut self, len: usize, deadline: Option<Instant>) -> Result<(), PingPongError> {
        self.send(len, deadline)?;
        self.recv(deadline)?;
        Ok(())
    }

    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, PingPongError>,
    ) -> Result<T, PingPongError> {
        if self.broken {
            return Err(PingPongError::Broken);
        }
        let r = f(self);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn child_exit(&mut self) -> Result<Option<std::process::ExitStatus>, PingPongError> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// Tells the peer to exit and waits for it. Returns its exit status
    /// (`None` when the peer is not a child of ours).
    pub fn shutdown(mut self) -> Result<Option<std::process::ExitStatus>, PingPongError> {
        self.stop_child(Duration::from_secs(10))
    }

    fn stop_child(
        &mut self,
        grace: Duration,
    ) -> Result<Option<std::process::ExitStatus>, PingPongError> {
        let stop = Descriptor {
            call_id: self.next_call,
            method_id: METHOD_SHUTDOWN,
            flags: Flags::END,
            ..Default::default()
        };
        let deadline = Instant::now() + grace;
        let sent = !self.broken && push_wait(&mut self.requests, stop, Some(deadline)).is_ok();
        self.request_bell.notify();
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        while sent && Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        Ok(Some(child.wait()?))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_child(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn checksum_sees_changes() {
        let mut buf = vec![7u8; 4099];
        let base = checksum(&buf);
        for i in [0, 7, 8, 31, 32, 4000, 4098] {
            buf[i] ^= 1;
            assert_ne!(checksum(&buf), base, "flip at {i}");
            buf[i] ^= 1;
        }
        assert_ne!(checksum(&buf[..4098]), base);
        buf.swap(0, 100);
        assert_eq!(checksum(&buf), base, "equal bytes swapped: same content");
        buf[0] = 1;
        buf[8] = 2;
        let a = checksum(&buf);
        buf.swap(0, 8);
        assert_ne!(checksum(&buf), a, "swapped words differ");
    }

    #[test]
    fn payload_check_catches_wrong_call() {
        let mut buf = vec![0u8; 100];
        fill_payload(&mut buf, 42, REQUEST_SALT);
        let sum = checksum(&buf);
        assert!(check_payload(&buf, 42, REQUEST_SALT, sum).is_ok());
        assert!(check_payload(&buf, 43, REQUEST_SALT, sum).is_err());
        assert!(check_payload(&buf, 42, RESPONSE_SALT, sum).is_err());
        buf[50] ^= 0x80;
        assert!(check_payload(&buf, 42, REQUEST_SALT, sum).is_err());
    }

    /// The full protocol with the server on a thread of this process (the
    /// real two-process tests are in `tests/`).
    #[test]
    fn echo_between_threads() {
        let config = PingPongConfig::new(WaitMode::Adaptive, 8192).unwrap();
        let segment = create_segment(&config).unwrap();
        let server_seg = segment.clone();
        let policy = config.policy;
        let server = std::thread::spawn(move || peer::serve(&server_seg, policy, None));
        let mut client = Client::over(segment, policy).unwrap();
        for i in 0..2000usize {
            client.call([0, 1, 64, 300, 8192][i % 5], None).unwrap();
        }
        for _ in 0..100 {
            client.send(100, None).unwrap();
        }
        for _ in 0..100 {
            client.recv(None).unwrap();
        }
        let _ = client.stop_child(Duration::from_secs(1));
        let served = server.join().unwrap().unwrap();
        assert_eq!(served, 2100);
        drain_returns(&mut client.returns_in, &client.pool).unwrap();
        assert_eq!(client.pool.occupancy().in_use(), 0);
    }
}
