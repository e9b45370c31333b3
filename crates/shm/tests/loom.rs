//! loom models of every lock-free structure in the crate: the ring, the
//! pool's free lists and slab states, the doorbell's announce/park/wake
//! race, and the sequence lock of the load pages' reports. loom runs each model under every interleaving (up to
//! `LOOM_MAX_PREEMPTIONS` preemptions) and with every allowed weaker memory
//! ordering outcome, so a missing Acquire/Release or a lost wake-up fails here.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test -p shmesh-shm --test loom --release --target-dir target/loom
//! ```
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use loom::thread;
use shmesh_shm::descriptor::Descriptor;
use shmesh_shm::doorbell::{Doorbell, WaitMode, WaitPolicy};
use shmesh_shm::handle::SlabHandle;
use shmesh_shm::pool::{ClassConfig, Pool, PoolConfig};
use shmesh_shm::ring::{self, PushError};
use shmesh_shm::seqlock::{HeapRegion, SeqReadError};

fn handle(i: u64) -> SlabHandle {
    SlabHandle {
        segment: 1,
        generation: i as u32,
        offset: i,
    }
}

/// Three entries through a two-slot ring: the producer sees `Full` in some
/// interleavings and reuses a slot; the consumer gets every entry once, in
/// order, with every word written (a Relaxed stamp store fails this model).
///
/// The Release on the consumer's `tail` store guards the opposite hazard: the
/// producer overwriting a slot whose words the consumer has not finished
/// loading. That is load buffering, a reordering loom does not explore (a
/// load only ever reads stores already made in its schedule), so it rests on
/// the argument in `ring.rs` rather than on this model.
#[test]
fn ring_delivers_every_entry_in_order() {
    loom::model(|| {
        let (mut tx, mut rx) = ring::channel::<SlabHandle>(2).unwrap();
        let producer = thread::spawn(move || {
            for i in 1..=3 {
                let mut entry = handle(i);
                loop {
                    match tx.try_push(entry) {
                        Ok(()) => break,
                        Err(PushError::Full(back)) => {
                            entry = back;
                            thread::yield_now();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        let mut next = 1;
        while next <= 3 {
            match rx.try_pop().unwrap() {
                Some(h) => {
                    assert_eq!(h, handle(next));
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        assert!(rx.try_pop().unwrap().is_none());
        producer.join().unwrap();
    });
}

/// A batch's entries are each published by their own stamp: the consumer
/// never sees a descriptor with some words of a previous lap.
#[test]
fn ring_batches_publish_whole_entries() {
    loom::model(|| {
        let (mut tx, mut rx) = ring::channel::<Descriptor>(2).unwrap();
        let producer = thread::spawn(move || {
            let batch: Vec<Descriptor> = (1..=2)
                .map(|i| Descriptor {
                    call_id: i,
                    method_id: i as u32,
                    aux: i,
                    ..Default::default()
                })
                .collect();
            assert_eq!(tx.push_batch(&batch).unwrap(), 2);
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            if rx.pop_batch(&mut got, 2).unwrap() == 0 {
                thread::yield_now();
            }
        }
        for (i, d) in got.iter().enumerate() {
            let i = i as u64 + 1;
            assert_eq!((d.call_id, u64::from(d.method_id), d.aux), (i, i, i));
        }
        producer.join().unwrap();
    });
}

fn one_class(count: u64) -> PoolConfig {
    PoolConfig::new(vec![ClassConfig {
        slab_size: 64,
        count,
    }])
    .unwrap()
}

/// Two threads allocate from a two-slab class at once and release again:
/// they never get the same slab, and afterwards both slabs are free. This
/// exercises the Treiber stack's ABA tag and its Acquire/Release pairs.
#[test]
fn pool_never_hands_out_a_slab_twice() {
    loom::model(|| {
        let pool = Arc::new(Pool::new_heap(0, &one_class(2)).unwrap());
        let other = {
            let pool = pool.clone();
            thread::spawn(move || {
                let a = pool.alloc(8).unwrap();
                let offset = a.handle().offset;
                let h = a.send();
                pool.release_returned(h).unwrap();
                offset
            })
        };
        let b = pool.alloc(8).unwrap();
        let mine = b.handle().offset;
        drop(b);
        let _ = (mine, other.join().unwrap());
        assert_eq!(pool.occupancy().in_use(), 0);
        let x = pool.alloc(8).unwrap();
        let y = pool.alloc(8).unwrap();
        assert_ne!(x.handle().offset, y.handle().offset);
    });
}

/// Holding slabs concurrently: both allocations succeed only with distinct
/// slabs, and a third fails while they are held.
#[test]
fn pool_concurrent_holders_are_distinct() {
    loom::model(|| {
        let pool = Arc::new(Pool::new_heap(0, &one_class(2)).unwrap());
        let other = {
            let pool = pool.clone();
            thread::spawn(move || pool.alloc(8).unwrap().send())
        };
        let mine = pool.alloc(8).unwrap().send();
        let theirs = other.join().unwrap();
        assert_ne!(mine.offset, theirs.offset);
        assert!(pool.alloc(8).is_err());
        pool.release_returned(mine).unwrap();
        pool.release_returned(theirs).unwrap();
    });
}

/// The classic ABA schedule on the free list: one thread is about to pop
/// slab 0 (it has read that slab 1 is next) when another pops 0, pops 1 and
/// pushes 0 back. Without the tag in the list head, the first thread's
/// compare-and-swap would still succeed and put slab 1, which the other
/// thread holds, back at the head of the list for the next caller.
#[test]
fn pool_free_list_survives_aba() {
    loom::model(|| {
        let pool = Arc::new(Pool::new_heap(0, &one_class(2)).unwrap());
        let other = {
            let pool = pool.clone();
            thread::spawn(move || {
                let x = pool.alloc(8).ok().map(|s| s.send());
                let y = pool.alloc(8).ok().map(|s| s.send());
                if let Some(x) = x {
                    pool.release_returned(x).unwrap();
                }
                y
            })
        };
        let mine = pool.alloc(8).ok().map(|s| s.send());
        let theirs = other.join().unwrap();
        if let (Some(a), Some(b)) = (mine, theirs) {
            assert_ne!(a.offset, b.offset, "one slab handed out twice");
            assert!(pool.alloc(8).is_err(), "a held slab is on the free list");
        }
    });
}

/// Two threads give back the same handle: exactly one release succeeds.
#[test]
fn pool_double_release_race_has_one_winner() {
    loom::model(|| {
        let pool = Arc::new(Pool::new_heap(0, &one_class(1)).unwrap());
        let h = pool.alloc(8).unwrap().send();
        let other = {
            let pool = pool.clone();
            thread::spawn(move || pool.release_returned(h).is_ok())
        };
        let mine = pool.release_returned(h).is_ok();
        let theirs = other.join().unwrap();
        assert!(mine ^ theirs, "exactly one release wins");
        assert_eq!(pool.occupancy().in_use(), 0);
    });
}

/// The doorbell's lost-wake-up race, in each mode that parks: the waiter
/// announces, re-checks and parks while the notifier publishes and rings.
/// With the futex modelled as "compare and sleep atomically", a lost wake-up
/// leaves the waiter asleep forever, which loom reports as a deadlock.
#[test]
fn doorbell_never_loses_a_wake_up() {
    for mode in [WaitMode::Block, WaitMode::Adaptive] {
        loom::model(move || {
            let bell = Arc::new(Doorbell::new_heap());
            let flag = Arc::new(loom::sync::atomic::AtomicBool::new(false));
            let notifier = {
                let (bell, flag) = (bell.clone(), flag.clone());
                thread::spawn(move || {
                    flag.store(true, loom::sync::atomic::Ordering::Release);
                    bell.notify();
                })
            };
            bell.wait_until(WaitPolicy::new(mode), || {
                flag.load(loom::sync::atomic::Ordering::Acquire)
            });
            notifier.join().unwrap();
        });
    }
}

/// Two messages, two wake-ups: a waiter that goes back to sleep after the
/// first still gets the second.
#[test]
fn doorbell_wakes_for_each_message() {
    loom::model(|| {
        let bell = Arc::new(Doorbell::new_heap());
        let count = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
        let notifier = {
            let (bell, count) = (bell.clone(), count.clone());
            thread::spawn(move || {
                for _ in 0..2 {
                    count.fetch_add(1, loom::sync::atomic::Ordering::Release);
                    bell.notify();
                }
            })
        };
        for seen in 1..=2 {
            bell.wait_until(WaitPolicy::new(WaitMode::Block), || {
                count.load(loom::sync::atomic::Ordering::Acquire) >= seen
            });
        }
        notifier.join().unwrap();
    });
}

#[test]
fn seqlock_readers_never_see_a_torn_report() {
    loom::model(|| {
        // Two words of bytes: a torn copy would mix two writes' fills.
        let region = Arc::new(HeapRegion::new(16));
        region.write(&[1; 16]).unwrap();
        let writer = {
            let region = region.clone();
            thread::spawn(move || {
                region.write(&[2; 16]).unwrap();
            })
        };
        match region.read() {
            Ok(Some(bytes)) => {
                assert!(bytes == [1; 16] || bytes == [2; 16], "torn: {bytes:?}");
            }
            // A reader that only ever raced the writer gives up; never
            // with a mixed copy.
            Err(SeqReadError::Busy) => {}
            other => panic!("unexpected {other:?}"),
        }
        writer.join().unwrap();
        assert_eq!(region.read().unwrap().unwrap(), [2; 16]);
    });
}
