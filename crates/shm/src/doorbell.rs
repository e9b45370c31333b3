//! Doorbells: how a waiting side sleeps and how the other side wakes it,
//! without a system call while nobody sleeps.
//!
//! A doorbell is two 32-bit words in shared memory: `seq`, bumped by every
//! wake-up that is sent, and `sleepers`, the number of waiters that announced
//! they are about to park. The protocol is an event count:
//!
//! ```text
//! waiter                                   notifier
//! ──────                                   ────────
//! if ready() → done                        publish data (ring Release store)
//! spin until ready() or budget spent       fence(SeqCst)
//! sleepers += 1                            if sleepers == 0 → done, no syscall
//! fence(SeqCst)                            seq += 1
//! seen = seq                               wake (FUTEX_WAKE / eventfd write)
//! if ready() → sleepers -= 1; done
//! park while seq == seen
//! sleepers -= 1; loop
//! ```
//!
//! The two SeqCst fences form a Dekker pair: either the notifier sees the
//! waiter announced, or the waiter's re-check sees the published data. The futex (or the eventfd's counter) closes the
//! last gap: a wake-up sent between the waiter's re-check and its park makes
//! the park return at once. `tests/loom.rs` checks exactly this race.
//!
//! Waiting has four [`WaitMode`]s: `Poll` spins and never parks (lowest
//! latency, one core burnt), `Block` parks at once (least CPU),
//! `Adaptive` (the default) spins for a budget and then parks, and `Yield`
//! does the same but gives the CPU away between checks (for more spinning
//! threads than cores). On this
//! project's reference VM a futex wake-up costs about 50 µs and a cache-line
//! round trip well under 1 µs, so a short spin catches every reply that is
//! already on its way. See `BENCHMARKS.md` for the measured choice of
//! [`DEFAULT_SPIN`].
//!
//! Two variants share the protocol: [`Doorbell`] parks on a futex on `seq`;
//! [`EventDoorbell`] parks on an eventfd, whose fd can be registered with
//! epoll or tokio's `AsyncFd`.
//!
//! A hostile peer can write any value into these words. The worst it can do
//! is cause spurious wake-ups or useless wake system calls: every wait loop
//! re-checks its own condition.

use std::ptr::NonNull;
use std::sync::Arc;
#[cfg(not(loom))]
use std::time::{Duration, Instant};

#[cfg(not(loom))]
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use thiserror::Error;

use crate::sync::{AtomicU32, Ordering, fence, spin_hint};

/// How a waiter waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum WaitMode {
    /// Spin until the condition holds; never park. Lowest latency, and a
    /// core spent on waiting. Pair it with a deadline or a liveness check in
    /// the condition: a dead peer never rings.
    Poll,
    /// Spin for the policy's budget, then park. The default.
    #[default]
    Adaptive,
    /// Like `Adaptive`, but give the CPU away between checks from the first
    /// one. For a connection whose other side relays to a third process (the
    /// daemon's mediated path: client, daemon and replica): when more
    /// threads spin than there are cores, the thread with work to do may be
    /// queued behind this waiter, and a waiter that spins first keeps it
    /// from running for a whole spin batch.
    Yield,
    /// Park at once. Least CPU, a kernel wake-up per message.
    Block,
}

/// Default spin budget of [`WaitMode::Adaptive`] (see `BENCHMARKS.md`).
#[cfg(not(loom))]
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// A wait mode and, for `Adaptive`, how long to spin before parking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// The mode.
    pub mode: WaitMode,
    /// How long `Adaptive` spins before it parks.
    #[cfg(not(loom))]
    pub spin: Duration,
}

impl WaitPolicy {
    /// A policy with the given mode and the default spin budget.
    pub fn new(mode: WaitMode) -> Self {
        WaitPolicy {
            mode,
            #[cfg(not(loom))]
            spin: DEFAULT_SPIN,
        }
    }
}

impl Default for WaitPolicy {
    fn default() -> Self {
        WaitPolicy::new(WaitMode::default())
    }
}

/// The shared words of a doorbell, in a segment or on the heap.
#[repr(C)]
#[derive(Debug, Default)]
pub struct DoorbellWords {
    /// Bumped by each wake-up sent; the futex word.
    seq: AtomicU32,
    /// Waiters that announced they are about to park.
    sleepers: AtomicU32,
    /// Under loom, the kernel's wait queue for `seq`.
    #[cfg(loom)]
    queue: crate::sync::futex::WaitQueue,
}

/// Bytes a doorbell region takes in a segment (a cache line of its own).
pub const REGION_LEN: usize = 64;

/// A wait ran out of time before its condition held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("wait timed out")]
pub struct WaitTimedOut;

/// What a waiter does once it has announced itself.
trait Park {
    fn words(&self) -> &DoorbellWords;
    /// Sleeps until woken, or `seq` differs from `seen`, or the time-out.
    #[cfg(not(loom))]
    fn park(&self, seen: u32, timeout: Option<Duration>);
    #[cfg(loom)]
    fn park(&self, seen: u32);
    /// Wakes every parked waiter.
    fn unpark(&self);
}

/// Where a doorbell's words live and what keeps that memory alive.
struct WordsRef {
    words: NonNull<DoorbellWords>,
    _owner: Arc<dyn Send + Sync>,
}

impl WordsRef {
    fn get(&self) -> &DoorbellWords {
        // SAFETY: `words` points at a live, aligned `DoorbellWords` for as
        // long as `_owner` lives (contract of the constructors), accessed only
        // through atomics.
        unsafe { self.words.as_ref() }
    }

    fn heap() -> Self {
        let heap = Arc::new(DoorbellWords::default());
        WordsRef {
            words: NonNull::from(&*heap),
            _owner: heap,
        }
    }
}

/// The event-count protocol, shared by both variants.
fn notify(p: &impl Park) -> bool {
    let words = p.words();
    // SeqCst fence: the notifier's half of the Dekker pair with the fence in
    // `announce`. Either this load sees the waiter's increment, or the
    // waiter's re-check sees the data the caller published before calling us.
    fence(Ordering::SeqCst);
    if words.sleepers.load(Ordering::SeqCst) == 0 {
        return false;
    }
    // SeqCst: a waiter that read `seq` before this bump has its park return
    // at once (futex compares `seq`; the eventfd counter stays readable).
    words.seq.fetch_add(1, Ordering::SeqCst);
    p.unpark();
    true
}

/// Announces a waiter about to park; returns the `seq` it must park on.
/// The caller re-checks its condition after this and before parking.
fn announce(words: &DoorbellWords) -> u32 {
    words.sleepers.fetch_add(1, Ordering::SeqCst);
    // SeqCst fence: the waiter's half of the Dekker pair with the fence in
    // `notify`. Between two SeqCst fences, either the notifier's load of
    // `sleepers` sees our increment, or our re-check of the condition sees
    // what the notifier published before its fence. (A SeqCst read-modify-
    // write alone would do on x86, but the language guarantees the pattern
    // only fence to fence, and loom checks it that way.)
    fence(Ordering::SeqCst);
    words.seq.load(Ordering::SeqCst)
}

/// When a wait gives up.
#[cfg(not(loom))]
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Never.
    None,
    /// At this instant.
    At(Instant),
    /// This long after the wait first reads the clock.
    After(Duration),
}

/// How many spins pass between two reads of the clock. A vDSO clock read
/// costs about as much as the cache miss we are waiting for, so the clock is
/// not read at all when the condition comes true within the first batch.
#[cfg(not(loom))]
const SPINS_PER_CLOCK_READ: u32 = 64;

/// How many spins pass before a wait starts yielding the CPU (about 2.5 µs):
/// a peer that is running answers a round trip well within that, so an
/// uncontended wait never pays for a system call.
#[cfg(not(loom))]
const SPINS_BEFORE_YIELDING: u32 = 64;

/// How many spins pass between two yields after that (about 0.3 µs). A wait
/// this long suggests more spinning threads than cores (a client, the
/// daemon's forwarder and a replica on two cores, say): the thread we wait
/// for may be queued behind us on this very CPU, and a yield lets it run at
/// once instead of after a time slice.
#[cfg(not(loom))]
const SPINS_PER_YIELD: u32 = 8;

#[cfg(not(loom))]
fn wait_until(
    p: &impl Park,
    policy: WaitPolicy,
    limit: Limit,
    mut ready: impl FnMut() -> bool,
) -> Result<(), WaitTimedOut> {
    if ready() {
        return Ok(());
    }
    // The clock is read lazily: `start` is the first reading, and relative
    // limits and the spin budget count from it (at most one batch of spins
    // late).
    let mut start: Option<Instant> = None;
    let deadline_from = |start: Instant| match limit {
        Limit::None => None,
        Limit::At(d) => Some(d),
        Limit::After(t) => Some(start + t),
    };
    // Spin phase (none in `Block` mode).
    if policy.mode != WaitMode::Block {
        let (yield_from, yield_every) = if policy.mode == WaitMode::Yield {
            (0, 1)
        } else {
            (SPINS_BEFORE_YIELDING, SPINS_PER_YIELD)
        };
        let mut turns = 0u32;
        loop {
            if ready() {
                return Ok(());
            }
            spin_hint();
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(SPINS_PER_CLOCK_READ) {
                let now = Instant::now();
                let first = *start.get_or_insert(now);
                if deadline_from(first).is_some_and(|d| now >= d) {
                    return if ready() { Ok(()) } else { Err(WaitTimedOut) };
                }
                if policy.mode != WaitMode::Poll && now - first >= policy.spin {
                    break;
                }
            }
            if turns >= yield_from && turns.is_multiple_of(yield_every) {
                // On an oversubscribed machine the peer we wait for may be
                // queued behind us on this very CPU: let it run.
                std::thread::yield_now();
            }
        }
    }
    let deadline = deadline_from(*start.get_or_insert_with(Instant::now));
    let expired = |now: Instant| deadline.is_some_and(|d| now >= d);
    // Park phase.
    let words = p.words();
    loop {
        let seen = announce(words);
        if ready() {
            words.sleepers.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        let timeout = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => {
                    words.sleepers.fetch_sub(1, Ordering::SeqCst);
                    return Err(WaitTimedOut);
                }
            },
            None => None,
        };
        p.park(seen, timeout);
        // SeqCst: keeps the count exact for notifiers; cheap next to a park.
        words.sleepers.fetch_sub(1, Ordering::SeqCst);
        if ready() {
            return Ok(());
        }
        if expired(Instant::now()) {
            return Err(WaitTimedOut);
        }
    }
}

/// Under loom there is no clock: `Adaptive` spins a couple of turns, and
/// there are no deadlines.
#[cfg(loom)]
fn wait_until(p: &impl Park, policy: WaitPolicy, mut ready: impl FnMut() -> bool) {
    let spins = match policy.mode {
        WaitMode::Poll => usize::MAX,
        WaitMode::Adaptive | WaitMode::Yield => 2,
        WaitMode::Block => 0,
    };
    for _ in 0..spins {
        if ready() {
            return;
        }
        spin_hint();
    }
    let words = p.words();
    loop {
        let seen = announce(words);
        if ready() {
            words.sleepers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        p.park(seen);
        words.sleepers.fetch_sub(1, Ordering::SeqCst);
        if ready() {
            return;
        }
    }
}

/// A doorbell that parks on a futex on its `seq` word.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use shmesh_shm::doorbell::{Doorbell, WaitMode, WaitPolicy};
///
/// let bell = Arc::new(Doorbell::new_heap());
/// let flag = Arc::new(AtomicBool::new(false));
/// let (b, f) = (bell.clone(), flag.clone());
/// let t = std::thread::spawn(move || {
///     f.store(true, Ordering::Release);
///     b.notify();
/// });
/// bell.wait_until(WaitPolicy::new(WaitMode::Block), None, || flag.load(Ordering::Acquire))
///     .unwrap();
/// t.join().unwrap();
/// ```
pub struct Doorbell {
    words: WordsRef,
}

// SAFETY: the pointer targets atomics kept alive by the `Arc` beside it.
unsafe impl Send for Doorbell {}
// SAFETY: every method synchronises through atomics and the kernel.
unsafe impl Sync for Doorbell {}

impl Park for Doorbell {
    fn words(&self) -> &DoorbellWords {
        self.words.get()
    }

    #[cfg(not(loom))]
    fn park(&self, seen: u32, timeout: Option<Duration>) {
        crate::sync::futex::wait(&self.words().seq, seen, timeout);
    }

    #[cfg(loom)]
    fn park(&self, seen: u32) {
        let w = self.words();
        w.queue.wait(&w.seq, seen);
    }

    fn unpark(&self) {
        #[cfg(not(loom))]
        crate::sync::futex::wake_all(&self.words().seq);
        #[cfg(loom)]
        self.words().queue.wake_all();
    }
}

impl Doorbell {
    /// A doorbell in heap memory, for use between threads of one process.
    pub fn new_heap() -> Self {
        Doorbell {
            words: WordsRef::heap(),
        }
    }

    /// Builds a doorbell over shared words.
    ///
    /// # Safety
    ///
    /// `words` must point at a `DoorbellWords` (8 bytes, 4-byte aligned)
    /// valid for as long as `owner` lives and accessed only atomically.
    #[cfg(not(loom))]
    pub(crate) unsafe fn from_raw(
        words: NonNull<DoorbellWords>,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        Doorbell {
            words: WordsRef {
                words,
                _owner: owner,
            },
        }
    }

    /// Wakes the waiters if any announced it sleeps. Returns whether a wake
    /// system call was made. Call it after publishing what they wait for.
    pub fn notify(&self) -> bool {
        notify(self)
    }

    /// Waits until `ready()` holds, under `policy`, or until `deadline`.
    /// `ready` is called many times; it must be cheap and must not block.
    #[cfg(not(loom))]
    pub fn wait_until(
        &self,
        policy: WaitPolicy,
        deadline: Option<Instant>,
        ready: impl FnMut() -> bool,
    ) -> Result<(), WaitTimedOut> {
        wait_until(self, policy, deadline.map_or(Limit::None, Limit::At), ready)
    }

    #[cfg(not(loom))]
    /// Waits until `ready()` holds, under `policy`, for about `timeout`
    /// (counted from the wait's first clock reading, which it skips entirely
    /// when `ready()` comes true within the first few dozen spins).
    pub fn wait_for(
        &self,
        policy: WaitPolicy,
        timeout: Duration,
        ready: impl FnMut() -> bool,
    ) -> Result<(), WaitTimedOut> {
        wait_until(self, policy, Limit::After(timeout), ready)
    }

    /// Waits until `ready()` holds (loom build: no deadlines).
    #[cfg(loom)]
    pub fn wait_until(&self, policy: WaitPolicy, ready: impl FnMut() -> bool) {
        wait_until(self, policy, ready)
    }
}

/// A doorbell that parks on an eventfd, so an event loop can wait on it.
///
/// Blocking callers use [`EventDoorbell::wait_until`] exactly like
/// [`Doorbell`]. An async front-end registers [`AsFd::as_fd`] with its
/// reactor and waits in three steps: [`EventDoorbell::announce`], re-check its
/// condition, await readability, then [`EventDoorbell::retract`] (which
/// also drains the eventfd).
#[cfg(not(loom))]
pub struct EventDoorbell {
    words: WordsRef,
    fd: OwnedFd,
}

#[cfg(not(loom))]
// SAFETY: the pointer targets atomics kept alive by the `Arc` beside it.
unsafe impl Send for EventDoorbell {}
#[cfg(not(loom))]
// SAFETY: every method synchronises through atomics and the kernel.
unsafe impl Sync for EventDoorbell {}

#[cfg(not(loom))]
impl Park for EventDoorbell {
    fn words(&self) -> &DoorbellWords {
        self.words.get()
    }

    fn park(&self, seen: u32, timeout: Option<Duration>) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        // Acquire-free fast exit: a wake-up already sent since `seen`.
        if self.words().seq.load(Ordering::SeqCst) != seen {
            return;
        }
        let ts = timeout.map(|t| Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        // EINTR or a time-out: the caller re-checks either way.
        let _ = poll(&mut fds, ts.as_ref());
        self.drain();
    }

    fn unpark(&self) {
        // EAGAIN means the counter is saturated: the fd is readable already.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }
}

/// An eventfd could not be created.
#[cfg(not(loom))]
#[derive(Debug, Error)]
#[error("cannot create eventfd: {0}")]
pub struct EventFdError(#[from] pub std::io::Error);

#[cfg(not(loom))]
impl EventDoorbell {
    /// Creates the eventfd a pair of processes shares for one doorbell
    /// (non-blocking, close-on-exec). Pass it to the peer with `SCM_RIGHTS`.
    pub fn create_fd() -> Result<OwnedFd, EventFdError> {
        use rustix::event::{EventfdFlags, eventfd};
        eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| EventFdError(e.into()))
    }

    /// A heap-backed eventfd doorbell, for use between threads or tasks of
    /// one process.
    pub fn new_heap() -> Result<Self, EventFdError> {
        Ok(EventDoorbell {
            words: WordsRef::heap(),
            fd: Self::create_fd()?,
        })
    }

    /// Builds an eventfd doorbell over shared words.
    ///
    /// # Safety
    ///
    /// As for [`Doorbell::from_raw`]; `fd` should be an eventfd (anything
    /// else only makes waits return early or wake-ups fail silently).
    pub(crate) unsafe fn from_raw(
        words: NonNull<DoorbellWords>,
        owner: Arc<dyn Send + Sync>,
        fd: OwnedFd,
    ) -> Self {
        EventDoorbell {
            words: WordsRef {
                words,
                _owner: owner,
            },
            fd,
        }
    }

    /// See [`Doorbell::notify`].
    pub fn notify(&self) -> bool {
        notify(self)
    }

    /// See [`Doorbell::wait_until`].
    pub fn wait_until(
        &self,
        policy: WaitPolicy,
        deadline: Option<Instant>,
        ready: impl FnMut() -> bool,
    ) -> Result<(), WaitTimedOut> {
        wait_until(self, policy, deadline.map_or(Limit::None, Limit::At), ready)
    }

    /// Waits until `ready()` holds, under `policy`, for about `timeout`
    /// (counted from the wait's first clock reading, which it skips entirely
    /// when `ready()` comes true within the first few dozen spins).
    pub fn wait_for(
        &self,
        policy: WaitPolicy,
        timeout: Duration,
        ready: impl FnMut() -> bool,
    ) -> Result<(), WaitTimedOut> {
        wait_until(self, policy, Limit::After(timeout), ready)
    }

    /// Announces that this waiter is about to sleep on the fd. The caller must
    /// re-check its condition after this and before awaiting the fd, and must
    /// call [`EventDoorbell::retract`] once, whatever happens.
    pub fn announce(&self) {
        announce(self.words());
    }

    /// Withdraws an [`EventDoorbell::announce`] and drains the eventfd.
    pub fn retract(&self) {
        // SeqCst: see `notify`.
        self.words().sleepers.fetch_sub(1, Ordering::SeqCst);
        self.drain();
    }

    /// Resets the eventfd's counter so it is no longer readable.
    fn drain(&self) {
        let mut buf = [0u8; 8];
        // EAGAIN means there was nothing to drain.
        let _ = rustix::io::read(&self.fd, &mut buf);
    }
}

#[cfg(not(loom))]
impl AsFd for EventDoorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64 as StdAtomicU64};

    #[test]
    fn notify_without_sleepers_makes_no_syscall() {
        let bell = Doorbell::new_heap();
        assert!(!bell.notify());
        let ev = EventDoorbell::new_heap().unwrap();
        assert!(!ev.notify());
    }

    #[test]
    fn ready_condition_returns_at_once_in_every_mode() {
        let bell = Doorbell::new_heap();
        for mode in [
            WaitMode::Poll,
            WaitMode::Adaptive,
            WaitMode::Yield,
            WaitMode::Block,
        ] {
            bell.wait_until(WaitPolicy::new(mode), None, || true)
                .unwrap();
        }
    }

    #[test]
    fn deadline_expires_in_every_mode() {
        let bell = Doorbell::new_heap();
        let ev = EventDoorbell::new_heap().unwrap();
        for mode in [
            WaitMode::Poll,
            WaitMode::Adaptive,
            WaitMode::Yield,
            WaitMode::Block,
        ] {
            let deadline = Some(Instant::now() + Duration::from_millis(5));
            assert_eq!(
                bell.wait_until(WaitPolicy::new(mode), deadline, || false),
                Err(WaitTimedOut)
            );
            assert_eq!(
                ev.wait_until(WaitPolicy::new(mode), deadline, || false),
                Err(WaitTimedOut)
            );
        }
        // Nothing left announced after a time-out.
        assert_eq!(bell.words().sleepers.load(Ordering::SeqCst), 0);
        assert_eq!(ev.words().sleepers.load(Ordering::SeqCst), 0);
    }

    /// Ping-pong between two threads through two doorbells: every message
    /// gets through, in every mode, for both variants.
    fn ping_pong<B: Send + Sync + 'static>(
        mk: impl Fn() -> B,
        wait: fn(&B, WaitPolicy, &dyn Fn() -> bool),
        ring: fn(&B) -> bool,
    ) {
        for mode in [
            WaitMode::Poll,
            WaitMode::Adaptive,
            WaitMode::Yield,
            WaitMode::Block,
        ] {
            let policy = WaitPolicy::new(mode);
            let (ping, pong) = (Arc::new(mk()), Arc::new(mk()));
            let counter = Arc::new(StdAtomicU64::new(0));
            const ROUNDS: u64 = 2_000;
            let t = {
                let (ping, pong, counter) = (ping.clone(), pong.clone(), counter.clone());
                std::thread::spawn(move || {
                    for i in 0..ROUNDS {
                        wait(&ping, policy, &|| {
                            counter.load(Ordering::Acquire) == 2 * i + 1
                        });
                        counter.store(2 * i + 2, Ordering::Release);
                        ring(&pong);
                    }
                })
            };
            for i in 0..ROUNDS {
                counter.store(2 * i + 1, Ordering::Release);
                ring(&ping);
                wait(&pong, policy, &|| {
                    counter.load(Ordering::Acquire) == 2 * i + 2
                });
            }
            t.join().unwrap();
        }
    }

    #[test]
    fn futex_ping_pong_in_every_mode() {
        ping_pong(
            Doorbell::new_heap,
            |b, p, f| b.wait_until(p, None, f).unwrap(),
            Doorbell::notify,
        );
    }

    #[test]
    fn eventfd_ping_pong_in_every_mode() {
        ping_pong(
            || EventDoorbell::new_heap().unwrap(),
            |b, p, f| b.wait_until(p, None, f).unwrap(),
            EventDoorbell::notify,
        );
    }

    #[test]
    fn announce_then_notify_makes_fd_readable() {
        use rustix::event::{PollFd, PollFlags, poll};
        let ev = EventDoorbell::new_heap().unwrap();
        let flag = AtomicBool::new(false);
        ev.announce();
        assert!(!flag.load(Ordering::Acquire));
        flag.store(true, Ordering::Release);
        assert!(ev.notify(), "an announced sleeper gets a wake-up");
        let mut fds = [PollFd::new(&ev, PollFlags::IN)];
        assert_eq!(poll(&mut fds, None).unwrap(), 1);
        ev.retract();
        let mut fds = [PollFd::new(&ev, PollFlags::IN)];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        assert_eq!(poll(&mut fds, Some(&zero)).unwrap(), 0, "retract drains");
        assert!(!ev.notify());
    }
}
