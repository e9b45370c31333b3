//! A call's mailbox: the messages that came in for it, the credit it has to
//! send, whether it was cancelled or ended, and whom to wake when any of
//! that changes.
//!
//! One side fills it (the thread reading the ring), another empties it (the
//! caller or handler of the call); a plain mutex is enough, since a mailbox
//! is only used by streams and other calls that already left the fast path.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;
use std::thread::Thread;
use std::time::{Duration, Instant};

use shmesh_shm::descriptor::Descriptor;

use crate::protocol::WINDOW;

/// Who to wake when a call has news.
pub(crate) enum Waiter {
    /// A blocking caller or handler.
    Thread(Thread),
    /// An async one (`None` until it parks: nobody to wake yet).
    Task(Option<Waker>),
}

impl Waiter {
    /// Whether waking `other` would wake the same thread or task.
    fn same_as(&self, other: &Waiter) -> bool {
        match (self, other) {
            (Waiter::Thread(a), Waiter::Thread(b)) => a.id() == b.id(),
            (Waiter::Task(Some(a)), Waiter::Task(Some(b))) => a.will_wake(b),
            _ => false,
        }
    }

    /// Whether someone is parked here to be woken.
    pub(crate) fn is_parked(&self) -> bool {
        !matches!(self, Waiter::Task(None))
    }

    pub(crate) fn wake(&self) {
        match self {
            Waiter::Thread(t) => t.unpark(),
            Waiter::Task(Some(w)) => w.wake_by_ref(),
            Waiter::Task(None) => {}
        }
    }
}

/// What a mailbox holds.
pub(crate) struct MailboxState {
    /// Descriptors received for the call, oldest first.
    pub inbox: VecDeque<Descriptor>,
    /// Payload descriptors this side may still send.
    pub credit: u32,
    /// The peer will send nothing more (it sent `END`).
    pub peer_ended: bool,
    /// The client cancelled the call.
    pub cancelled: bool,
    /// This side ended the call (its `END` is sent or being sent): later
    /// sends are refused.
    pub finished: bool,
    /// Waiting for news (a handler and its cancellation watch may both
    /// wait).
    pub waiters: Vec<Waiter>,
}

/// A call's mailbox.
pub(crate) struct Mailbox {
    state: Mutex<MailboxState>,
    /// Bumped on every change, so a waiter can spin on one word before it
    /// parks (a park and wake cost tens of microseconds here).
    news: AtomicU64,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox {
            state: Mutex::new(MailboxState {
                inbox: VecDeque::new(),
                credit: WINDOW,
                peer_ended: false,
                cancelled: false,
                finished: false,
                waiters: Vec::new(),
            }),
            news: AtomicU64::new(0),
        }
    }
}

impl Mailbox {
    /// Locks the mailbox. A panic while it was held leaves plain data.
    pub(crate) fn lock(&self) -> MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state with `f`, then wakes whoever waits.
    pub(crate) fn update(&self, f: impl FnOnce(&mut MailboxState)) {
        let mut state = self.lock();
        f(&mut state);
        self.wake_all(&mut state);
    }

    /// Tells every waiter the state changed (call with the state locked).
    pub(crate) fn wake_all(&self, state: &mut MailboxState) {
        // Relaxed: a hint for spinners, who then read the state under its
        // lock.
        self.news.fetch_add(1, Ordering::Relaxed);
        for w in state.waiters.drain(..) {
            w.wake();
        }
    }

    /// Spins up to `budget` for a change after `seen` (a value of
    /// [`Mailbox::news`]); says whether one came.
    pub(crate) fn spin_for_news(&self, seen: u64, budget: Duration) -> bool {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            // Relaxed: see `wake_all`.
            if self.news.load(Ordering::Relaxed) != seen {
                return true;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                if start.elapsed() >= budget {
                    return false;
                }
                // On an oversubscribed machine the sender may need our CPU.
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
    }

    /// The change counter, for [`Mailbox::spin_for_news`].
    pub(crate) fn news(&self) -> u64 {
        // Relaxed: see `wake_all`.
        self.news.load(Ordering::Relaxed)
    }

    /// Wakes whoever waits, if anyone does; says whether someone did.
    pub(crate) fn wake_waiters(&self) -> bool {
        let mut state = self.lock();
        let any = !state.waiters.is_empty();
        self.wake_all(&mut state);
        any
    }

    /// Whether the call was cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }
}

impl MailboxState {
    /// Registers `waiter` to be woken by the next [`Mailbox::update`].
    pub(crate) fn wait_with(&mut self, waiter: Waiter) {
        let known = self.waiters.iter().any(|w| w.same_as(&waiter));
        if !known {
            self.waiters.push(waiter);
        }
    }
}
