//! The one place this crate takes its atomics, spin hint and futex from.
//!
//! Every lock-free structure in the crate reaches its synchronisation
//! primitives through this module, so that building with
//! `RUSTFLAGS="--cfg loom"` swaps in [loom]'s model-checked versions and the
//! loom tests (`tests/loom.rs`) explore every interleaving of the real code.
//!
//! Under loom, shared memory cannot be a real `mmap`: loom's atomics carry
//! model state and cannot be cast from raw bytes. The structures therefore
//! build their shared parts with Rust constructors in heap memory (see
//! [`crate::ring::channel`], [`crate::doorbell::Doorbell::new_heap`]); the
//! algorithms that run on them are the same code as in production.
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// Tells the CPU (or, under loom, the model scheduler) that this thread is
/// busy-waiting for another one.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// A value on its own cache-line pair.
///
/// 128 bytes rather than 64 because Intel's adjacent-line prefetcher pulls
/// cache lines in pairs: two indices 64 bytes apart still interfere. The
/// layout is `repr(C)` because it is part of the shared-memory format.
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Futex operations on a 32-bit word that lives in memory shared between
/// processes (so the non-private futex: the kernel keys it by the physical
/// page, not by the process's address space).
#[cfg(not(loom))]
pub(crate) mod futex {
    use std::time::Duration;

    use super::AtomicU32;
    use rustix::thread::futex;

    /// Sleeps while `*word == expected`, for at most `timeout`.
    ///
    /// Returns on a wake-up, on a spurious wake-up, when the word no longer
    /// holds `expected`, or on time-out: the caller re-checks its condition.
    pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
        let ts = timeout.map(|t| rustix::thread::futex::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        // EAGAIN (the word changed), EINTR and ETIMEDOUT all mean "re-check";
        // nothing else can happen for a valid, aligned word.
        let _ = futex::wait(word, futex::Flags::empty(), expected, ts.as_ref());
    }

    /// Wakes every thread (of any process) sleeping on `word`.
    pub(crate) fn wake_all(word: &AtomicU32) {
        let _ = futex::wake(word, futex::Flags::empty(), u32::MAX >> 1);
    }
}

/// A loom model of the futex: a mutex and a condition variable that make
/// "compare the word and go to sleep" atomic with respect to a wake-up, as the
/// kernel does. A lost wake-up therefore shows up as a loom deadlock.
#[cfg(loom)]
pub(crate) mod futex {
    use super::{AtomicU32, Ordering};
    use loom::sync::{Condvar, Mutex};

    /// The wait queue the kernel would keep for one futex word.
    #[derive(Debug, Default)]
    pub(crate) struct WaitQueue {
        lock: Mutex<()>,
        cond: Condvar,
    }

    impl WaitQueue {
        pub(crate) fn wait(&self, word: &AtomicU32, expected: u32) {
            let guard = self.lock.lock().unwrap();
            if word.load(Ordering::SeqCst) == expected {
                drop(self.cond.wait(guard).unwrap());
            }
        }

        pub(crate) fn wake_all(&self) {
            let _guard = self.lock.lock().unwrap();
            self.cond.notify_all();
        }
    }
}
