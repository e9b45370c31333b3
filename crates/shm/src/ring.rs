//! Single-producer, single-consumer rings of fixed-size entries.
//!
//! A ring is a power-of-two array of slots plus two indices, each on its own
//! cache-line pair: `head`, written only by the producer, and `tail`, written
//! only by the consumer. Indices are free-running 64-bit counters (they never
//! wrap in practice) and are masked into the slot array. Each side keeps a
//! private copy of its own index and a cached copy of the other side's, so an
//! uncontended push or pop touches the shared index lines only when the cache
//! says the ring looks full or empty.
//!
//! Every word of a slot is an atomic accessed with `Relaxed` ordering, and the
//! index stores and loads carry the `Release`/`Acquire` edges. This makes the
//! ring free of data races even when the peer is hostile: a peer that
//! scribbles over slots or indices can make us read garbage values, never
//! cause undefined behaviour. Garbage is then caught by validation: the
//! peer's index must stay within `capacity` of ours, and each entry is copied
//! once into a private array and decoded by [`Entry::decode`].
//!
//! A full ring is reported as [`PushError::Full`], handing the entry back; it
//! is never overwritten.
//!
//! # Example
//!
//! ```
//! use shmesh_shm::descriptor::Descriptor;
//! use shmesh_shm::ring;
//!
//! let (mut tx, mut rx) = ring::channel::<Descriptor>(4).unwrap();
//! tx.try_push(Descriptor { call_id: 1, ..Default::default() }).unwrap();
//! let got = rx.try_pop().unwrap().unwrap();
//! assert_eq!(got.call_id, 1);
//! assert!(rx.try_pop().unwrap().is_none());
//! ```

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use thiserror::Error;

use crate::sync::{AtomicU64, CachePadded, Ordering};

/// The most 64-bit words one ring entry may occupy.
pub const MAX_ENTRY_WORDS: usize = 8;

/// Scratch space one entry is encoded into or decoded from.
pub type EntryWords = [u64; MAX_ENTRY_WORDS];

/// A fixed-size record that can travel on a ring.
pub trait Entry: Sized {
    /// Number of 64-bit words the entry occupies (1 to [`MAX_ENTRY_WORDS`]).
    const WORDS: usize;
    /// What decoding reports for words that are not a valid entry.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Writes the entry into the first [`Self::WORDS`] words of `out`.
    fn encode(&self, out: &mut EntryWords);

    /// Decodes a private copy of an entry's words. Must accept any input
    /// without panicking: the words come from an untrusted peer.
    fn decode(words: &EntryWords) -> Result<Self, Self::Error>;
}

/// The two shared indices of a ring, at the start of its region.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingIndices {
    /// Next slot the producer will fill; written by the producer only.
    head: CachePadded<AtomicU64>,
    /// Next slot the consumer will read; written by the consumer only.
    tail: CachePadded<AtomicU64>,
}

/// Bytes a ring region takes in a segment: the indices, then the slots.
pub fn region_len(entry_words: usize, capacity: usize) -> usize {
    std::mem::size_of::<RingIndices>() + capacity * entry_words * 8
}

/// A ring's capacity that is not a power of two from 2 to 2^24, or an entry
/// size outside the supported range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RingConfigError {
    /// The capacity is zero, one, too large, or not a power of two.
    #[error("ring capacity {capacity} must be a power of two from 2 to {max}")]
    BadCapacity {
        /// The capacity asked for.
        capacity: u64,
        /// The largest capacity allowed.
        max: u64,
    },
    /// The entry type occupies more words than a slot can hold.
    #[error("ring entry of {words} words is outside 1..={max}")]
    BadEntrySize {
        /// The entry's size in words.
        words: usize,
        /// The largest entry allowed.
        max: usize,
    },
}

/// Largest ring capacity: bounds the memory a peer can make us map.
pub const MAX_CAPACITY: u64 = 1 << 24;

pub(crate) fn check_config(entry_words: usize, capacity: u64) -> Result<(), RingConfigError> {
    if !(1..=MAX_ENTRY_WORDS).contains(&entry_words) {
        return Err(RingConfigError::BadEntrySize {
            words: entry_words,
            max: MAX_ENTRY_WORDS,
        });
    }
    if !(2..=MAX_CAPACITY).contains(&capacity) || !capacity.is_power_of_two() {
        return Err(RingConfigError::BadCapacity {
            capacity,
            max: MAX_CAPACITY,
        });
    }
    Ok(())
}

/// Where a ring's shared part lives, and what keeps that memory alive.
struct RingMemory {
    indices: NonNull<RingIndices>,
    slots: NonNull<AtomicU64>,
    capacity: u64,
    words: usize,
    _owner: Arc<dyn Send + Sync>,
}

impl RingMemory {
    fn indices(&self) -> &RingIndices {
        // SAFETY: `indices` points at a live, aligned `RingIndices` for as long
        // as `_owner` lives (the contract of `Producer::from_raw` and of
        // `channel`), and it is only ever accessed through shared references
        // to atomics.
        unsafe { self.indices.as_ref() }
    }

    /// The atomic words of the slot at free-running `index`.
    fn slot(&self, index: u64) -> &[AtomicU64] {
        let start = (index & (self.capacity - 1)) as usize * self.words;
        // SAFETY: `slots` points at `capacity * words` live, aligned atomics
        // (same contract as above); the masked index is below `capacity`, so
        // `start + words` is in bounds.
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr().add(start), self.words) }
    }
}

/// Heap storage for a ring that does not live in a segment (tests, loom
/// models, in-process use).
struct HeapRing {
    indices: RingIndices,
    slots: Box<[AtomicU64]>,
}

/// Creates a ring in heap memory and returns its two ends.
///
/// Segment-backed rings, shared between processes, come from
/// [`crate::segment::Segment::ring_producer`] and
/// [`crate::segment::Segment::ring_consumer`].
pub fn channel<E: Entry>(capacity: usize) -> Result<(Producer<E>, Consumer<E>), RingConfigError> {
    check_config(E::WORDS, capacity as u64)?;
    let heap = Arc::new(HeapRing {
        indices: RingIndices::default(),
        slots: (0..capacity * E::WORDS)
            .map(|_| AtomicU64::new(0))
            .collect(),
    });
    let indices = NonNull::from(&heap.indices);
    let slots = NonNull::from(&heap.slots[0]);
    let owner: Arc<dyn Send + Sync> = heap;
    let mem = |owner: Arc<dyn Send + Sync>| RingMemory {
        indices,
        slots,
        capacity: capacity as u64,
        words: E::WORDS,
        _owner: owner,
    };
    Ok((Producer::new(mem(owner.clone())), Consumer::new(mem(owner))))
}

/// The writing end of a ring.
pub struct Producer<E: Entry> {
    mem: RingMemory,
    /// Our own index: the only copy we trust.
    head: u64,
    /// The last consumer index we read.
    cached_tail: u64,
    _entry: PhantomData<fn(E)>,
}

/// The reading end of a ring.
pub struct Consumer<E: Entry> {
    mem: RingMemory,
    /// Our own index: the only copy we trust.
    tail: u64,
    /// The last producer index we read.
    cached_head: u64,
    _entry: PhantomData<fn() -> E>,
}

// SAFETY: the raw pointers in `RingMemory` point into memory kept alive by the
// `Arc` beside them and accessed only through atomics, so an end may move to
// another thread. Neither end is `Sync`: push and pop take `&mut self`.
unsafe impl<E: Entry> Send for Producer<E> {}
// SAFETY: as for `Producer`.
unsafe impl<E: Entry> Send for Consumer<E> {}

/// The consumer's index is not where a correct consumer could have put it:
/// behind the last value we saw, or past our head.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("ring is corrupt: consumer tail {tail} is outside [{prev_tail}, {head}]")]
pub struct CorruptTail {
    /// The tail read from shared memory.
    pub tail: u64,
    /// The tail read before.
    pub prev_tail: u64,
    /// Our head.
    pub head: u64,
}

/// Why a push did not happen.
#[derive(Debug, Error)]
pub enum PushError<E> {
    /// The ring is full; the entry is handed back.
    #[error("ring is full")]
    Full(E),
    /// The consumer corrupted its index; the ring is broken.
    #[error(transparent)]
    Corrupt(#[from] CorruptTail),
}

/// Why a pop failed. The ring should be considered broken afterwards.
#[derive(Debug, Error)]
pub enum PopError<D: std::error::Error + 'static> {
    /// The producer's index is not where a correct producer could have put it.
    #[error("ring is corrupt: producer head {head} is outside [{prev_head}, {tail} + {capacity}]")]
    CorruptIndex {
        /// The head read from shared memory.
        head: u64,
        /// The head read before.
        prev_head: u64,
        /// Our tail.
        tail: u64,
        /// The ring's capacity.
        capacity: u64,
    },
    /// An entry failed to decode. It has been consumed.
    #[error("ring entry at index {index} is corrupt")]
    CorruptEntry {
        /// The free-running index of the entry.
        index: u64,
        /// What was wrong with it.
        #[source]
        source: D,
    },
}

impl<E: Entry> Producer<E> {
    fn new(mem: RingMemory) -> Self {
        Producer {
            mem,
            head: 0,
            cached_tail: 0,
            _entry: PhantomData,
        }
    }

    /// Builds the producer end over shared memory.
    ///
    /// # Safety
    ///
    /// `indices` must point at a `RingIndices` and `slots` at
    /// `capacity * E::WORDS` 64-bit words, both 8-byte aligned (indices
    /// 128-byte aligned), valid for reads and writes for as long as `owner`
    /// lives, and only ever accessed atomically. `capacity` must have passed
    /// [`check_config`]. The ring must be fresh (both indices zero) or this
    /// must be its one producer picking up where it left off at index 0.
    #[cfg_attr(loom, allow(dead_code))] // segments are not built under loom
    pub(crate) unsafe fn from_raw(
        indices: NonNull<RingIndices>,
        slots: NonNull<AtomicU64>,
        capacity: u64,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        Producer::new(RingMemory {
            indices,
            slots,
            capacity,
            words: E::WORDS,
            _owner: owner,
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.mem.capacity as usize
    }

    /// Entries pushed so far (our private head).
    pub fn pushed(&self) -> u64 {
        self.head
    }

    /// Free slots, refreshing the consumer's index from shared memory.
    pub fn free_slots(&mut self) -> Result<usize, CorruptTail> {
        self.refresh_tail()?;
        Ok((self.mem.capacity - (self.head - self.cached_tail)) as usize)
    }

    /// Re-reads the consumer's tail and checks it.
    fn refresh_tail(&mut self) -> Result<(), CorruptTail> {
        // Acquire: pairs with the consumer's Release store of `tail`, so its
        // reads of the slots it freed happen before our writes into them.
        let tail = self.mem.indices().tail.load(Ordering::Acquire);
        // A correct consumer only moves its tail forward and never past our
        // head: anything else is corruption.
        if tail.wrapping_sub(self.cached_tail) > self.head.wrapping_sub(self.cached_tail) {
            return Err(CorruptTail {
                tail,
                prev_tail: self.cached_tail,
                head: self.head,
            });
        }
        self.cached_tail = tail;
        Ok(())
    }

    fn write_slot(&self, index: u64, entry: &E) {
        let mut words = [0u64; MAX_ENTRY_WORDS];
        entry.encode(&mut words);
        for (slot, word) in self.mem.slot(index).iter().zip(words) {
            // Relaxed: published by the Release store of `head` that follows.
            slot.store(word, Ordering::Relaxed);
        }
    }

    fn publish(&self) {
        // Release: makes the slot writes above visible to the consumer's
        // Acquire load of `head`.
        self.mem.indices().head.store(self.head, Ordering::Release);
    }

    /// Pushes one entry, or hands it back in [`PushError::Full`].
    pub fn try_push(&mut self, entry: E) -> Result<(), PushError<E>> {
        if self.head - self.cached_tail == self.mem.capacity {
            self.refresh_tail()?;
            if self.head - self.cached_tail == self.mem.capacity {
                return Err(PushError::Full(entry));
            }
        }
        self.write_slot(self.head, &entry);
        self.head += 1;
        self.publish();
        Ok(())
    }

    /// Pushes as many of `entries` as fit, publishing them with one index
    /// store. Returns how many were pushed (0 when the ring is full).
    pub fn push_batch(&mut self, entries: &[E]) -> Result<usize, CorruptTail> {
        let mut free = self.mem.capacity - (self.head - self.cached_tail);
        if free < entries.len() as u64 {
            self.refresh_tail()?;
            free = self.mem.capacity - (self.head - self.cached_tail);
        }
        let n = entries.len().min(free as usize);
        for entry in &entries[..n] {
            self.write_slot(self.head, entry);
            self.head += 1;
        }
        if n > 0 {
            self.publish();
        }
        Ok(n)
    }

    /// Whether the consumer has taken everything pushed so far.
    pub fn is_drained(&mut self) -> Result<bool, CorruptTail> {
        self.refresh_tail()?;
        Ok(self.cached_tail == self.head)
    }
}

impl<E: Entry> Consumer<E> {
    fn new(mem: RingMemory) -> Self {
        Consumer {
            mem,
            tail: 0,
            cached_head: 0,
            _entry: PhantomData,
        }
    }

    /// Builds the consumer end over shared memory.
    ///
    /// # Safety
    ///
    /// The same contract as [`Producer::from_raw`].
    #[cfg_attr(loom, allow(dead_code))] // segments are not built under loom
    pub(crate) unsafe fn from_raw(
        indices: NonNull<RingIndices>,
        slots: NonNull<AtomicU64>,
        capacity: u64,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        Consumer::new(RingMemory {
            indices,
            slots,
            capacity,
            words: E::WORDS,
            _owner: owner,
        })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.mem.capacity as usize
    }

    /// Entries popped so far (our private tail).
    pub fn popped(&self) -> u64 {
        self.tail
    }

    /// Re-reads the producer's head and checks it.
    fn refresh_head(&mut self) -> Result<(), PopError<E::Error>> {
        // Acquire: pairs with the producer's Release store of `head`, so the
        // slot words it wrote before are visible to our Relaxed loads.
        let head = self.mem.indices().head.load(Ordering::Acquire);
        // A correct producer only moves its head forward and never more than
        // `capacity` ahead of our tail.
        let forward = head.wrapping_sub(self.cached_head);
        let ahead = head.wrapping_sub(self.tail);
        if forward > self.mem.capacity || ahead > self.mem.capacity {
            return Err(PopError::CorruptIndex {
                head,
                prev_head: self.cached_head,
                tail: self.tail,
                capacity: self.mem.capacity,
            });
        }
        self.cached_head = head;
        Ok(())
    }

    /// Number of entries ready to pop, refreshing the producer's index.
    pub fn pending(&mut self) -> Result<usize, PopError<E::Error>> {
        self.refresh_head()?;
        Ok((self.cached_head - self.tail) as usize)
    }

    /// Copies the entry at `tail` out of shared memory, once, and advances.
    fn take_slot(&mut self) -> Result<E, PopError<E::Error>> {
        let mut words = [0u64; MAX_ENTRY_WORDS];
        for (word, slot) in words.iter_mut().zip(self.mem.slot(self.tail)) {
            // Relaxed: ordered after the Acquire load of `head` in
            // `refresh_head` that showed this slot as filled.
            *word = slot.load(Ordering::Relaxed);
        }
        let index = self.tail;
        self.tail += 1;
        E::decode(&words).map_err(|source| PopError::CorruptEntry { index, source })
    }

    fn release_slots(&self) {
        // Release: our loads of the consumed slots happen before the
        // producer's Acquire load of `tail` lets it overwrite them.
        self.mem.indices().tail.store(self.tail, Ordering::Release);
    }

    /// Pops one entry, or `None` if the ring is empty.
    pub fn try_pop(&mut self) -> Result<Option<E>, PopError<E::Error>> {
        if self.tail == self.cached_head {
            self.refresh_head()?;
            if self.tail == self.cached_head {
                return Ok(None);
            }
        }
        let entry = self.take_slot();
        self.release_slots();
        entry.map(Some)
    }

    /// Pops up to `max` entries into `out` with one index store. Stops at the
    /// first corrupt entry (consumed, reported as the error; the entries before
    /// it stay in `out`). Returns how many were appended.
    pub fn pop_batch(&mut self, out: &mut Vec<E>, max: usize) -> Result<usize, PopError<E::Error>> {
        if (self.cached_head - self.tail) < max as u64 {
            self.refresh_head()?;
        }
        let n = ((self.cached_head - self.tail) as usize).min(max);
        let mut result = Ok(n);
        for _ in 0..n {
            match self.take_slot() {
                Ok(entry) => out.push(entry),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if n > 0 {
            self.release_slots();
        }
        result
    }

    /// Whether the producer has published entries we have not popped. Reads
    /// the shared head without validating it: a hint for wait loops.
    pub fn has_pending_hint(&self) -> bool {
        self.tail != self.cached_head
            // Acquire: as in `refresh_head`; a waiter that sees the new head
            // goes on to pop, which re-reads and validates it.
            || self.mem.indices().head.load(Ordering::Acquire) != self.tail
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::descriptor::Descriptor;
    use crate::handle::SlabHandle;

    fn d(id: u64) -> Descriptor {
        Descriptor {
            call_id: id,
            ..Default::default()
        }
    }

    #[test]
    fn rejects_bad_capacity() {
        for cap in [0, 1, 3, 6, (1 << 24) + 1, 1 << 25] {
            assert!(matches!(
                channel::<Descriptor>(cap),
                Err(RingConfigError::BadCapacity { .. })
            ));
        }
    }

    #[test]
    fn full_and_empty_and_wraparound() {
        let (mut tx, mut rx) = channel::<Descriptor>(4).unwrap();
        assert!(rx.try_pop().unwrap().is_none());
        for round in 0..10u64 {
            for i in 0..4 {
                tx.try_push(d(round * 4 + i)).unwrap();
            }
            match tx.try_push(d(999)) {
                Err(PushError::Full(e)) => assert_eq!(e.call_id, 999),
                other => panic!("expected Full, got {other:?}"),
            }
            for i in 0..4 {
                assert_eq!(rx.try_pop().unwrap().unwrap().call_id, round * 4 + i);
            }
            assert!(rx.try_pop().unwrap().is_none());
        }
        assert_eq!(tx.pushed(), 40);
        assert_eq!(rx.popped(), 40);
    }

    #[test]
    fn batches_respect_capacity() {
        let (mut tx, mut rx) = channel::<SlabHandle>(8).unwrap();
        let items: Vec<_> = (0..20)
            .map(|i| SlabHandle {
                offset: i,
                ..Default::default()
            })
            .collect();
        assert_eq!(tx.push_batch(&items).unwrap(), 8);
        assert_eq!(tx.push_batch(&items[8..]).unwrap(), 0);
        let mut out = Vec::new();
        assert_eq!(rx.pop_batch(&mut out, 5).unwrap(), 5);
        assert_eq!(tx.push_batch(&items[8..]).unwrap(), 5);
        assert_eq!(rx.pop_batch(&mut out, 100).unwrap(), 8);
        assert_eq!(
            out.iter().map(|h| h.offset).collect::<Vec<_>>(),
            (0..13).collect::<Vec<_>>()
        );
        assert_eq!(tx.free_slots().unwrap(), 8);
        assert!(tx.is_drained().unwrap());
    }

    #[test]
    fn corrupt_entry_is_consumed_and_reported() {
        let (mut tx, mut rx) = channel::<Descriptor>(4).unwrap();
        tx.try_push(d(1)).unwrap();
        tx.try_push(d(2)).unwrap();
        // Scribble the reserved word of slot 0, as a hostile producer could.
        rx.mem.slot(0)[7].store(5, Ordering::Relaxed);
        assert!(matches!(
            rx.try_pop(),
            Err(PopError::CorruptEntry { index: 0, .. })
        ));
        assert_eq!(rx.try_pop().unwrap().unwrap().call_id, 2);
    }

    #[test]
    fn head_beyond_capacity_is_corruption() {
        let (_tx, mut rx) = channel::<Descriptor>(4).unwrap();
        rx.mem.indices().head.store(5, Ordering::Relaxed);
        assert!(matches!(
            rx.try_pop(),
            Err(PopError::CorruptIndex { head: 5, .. })
        ));
        rx.mem.indices().head.store(u64::MAX, Ordering::Relaxed);
        assert!(matches!(rx.pending(), Err(PopError::CorruptIndex { .. })));
    }

    #[test]
    fn head_moving_backwards_is_corruption() {
        let (mut tx, mut rx) = channel::<Descriptor>(4).unwrap();
        for i in 0..3 {
            tx.try_push(d(i)).unwrap();
        }
        assert_eq!(rx.pending().unwrap(), 3);
        rx.mem.indices().head.store(1, Ordering::Relaxed);
        rx.try_pop().unwrap();
        rx.try_pop().unwrap();
        rx.try_pop().unwrap();
        assert!(matches!(
            rx.try_pop(),
            Err(PopError::CorruptIndex { head: 1, .. })
        ));
    }

    #[test]
    fn tail_beyond_head_is_corruption() {
        let (mut tx, _rx) = channel::<Descriptor>(2).unwrap();
        tx.try_push(d(0)).unwrap();
        tx.try_push(d(1)).unwrap();
        tx.mem.indices().tail.store(3, Ordering::Relaxed);
        assert!(matches!(
            tx.try_push(d(2)),
            Err(PushError::Corrupt(CorruptTail { tail: 3, .. }))
        ));
        assert!(tx.free_slots().is_err());
    }

    #[test]
    fn ends_move_across_threads() {
        let (mut tx, mut rx) = channel::<SlabHandle>(16).unwrap();
        const N: u64 = 100_000;
        let producer = std::thread::spawn(move || {
            for i in 0..N {
                let mut h = SlabHandle {
                    offset: i,
                    ..Default::default()
                };
                loop {
                    match tx.try_push(h) {
                        Ok(()) => break,
                        Err(PushError::Full(back)) => {
                            h = back;
                            std::hint::spin_loop();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        let mut next = 0;
        while next < N {
            if let Some(h) = rx.try_pop().unwrap() {
                assert_eq!(h.offset, next);
                next += 1;
            }
        }
        producer.join().unwrap();
    }
}
