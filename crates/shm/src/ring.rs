//! Single-producer, single-consumer rings of fixed-size entries.
//!
//! A ring is a power-of-two array of slots plus one shared index, `tail`,
//! written only by the consumer. Each slot holds an entry and, in its last
//! word, a *stamp*: the producer writes the entry's words, then the stamp
//! `index + 1` with `Release`; the consumer polls the stamp of the slot at its
//! tail with `Acquire`. There is no shared head: a message crosses from
//! producer to consumer in exactly one cache line (the slot), which is what
//! keeps a ring round trip close to the floor of one cache line bounced
//! between two cores. The consumer publishes its `tail` so the producer can
//! reuse slots; the producer keeps a cached copy and re-reads it only when
//! the ring looks full.
//!
//! Indices are free-running 64-bit counters, masked into the slot array. A
//! slot at index `i` holds stamp `i + 1` once written; before that, it holds
//! the previous lap's stamp `i + 1 - capacity` (or 0 on the first lap). Any
//! other stamp is corruption.
//!
//! Every word of a slot is an atomic accessed with `Relaxed` ordering, and
//! the stamp and tail stores and loads carry the `Release`/`Acquire` edges.
//! This makes the ring free of data races even when the peer is hostile: a
//! peer that scribbles over slots or the tail can make us read garbage
//! values, never cause undefined behaviour. Garbage is then caught by
//! validation: the stamp must be one of the two legal values, the tail must
//! stay between its last value and our head, and each entry is copied once
//! into a private array and decoded by [`Entry::decode`].
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

/// The most 64-bit words one ring entry may occupy: a slot is at most one
/// 64-byte cache line, and its last word is the stamp.
pub const MAX_ENTRY_WORDS: usize = 7;

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

/// The consumer's shared index, at the start of a ring's region.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingIndices {
    /// Next slot the consumer will read; written by the consumer only.
    tail: CachePadded<AtomicU64>,
}

/// Words per slot for entries of `entry_words` words: the entry plus its
/// stamp, rounded up to a power of two so slots never straddle cache lines.
pub fn slot_words(entry_words: usize) -> usize {
    (entry_words + 1).next_power_of_two()
}

/// Bytes a ring region takes in a segment: the index, then the slots.
pub fn region_len(entry_words: usize, capacity: usize) -> usize {
    std::mem::size_of::<RingIndices>() + capacity * slot_words(entry_words) * 8
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
    /// Words the entry type uses.
    words: usize,
    /// Words per slot; the last is the stamp.
    stride: usize,
    _owner: Arc<dyn Send + Sync>,
}

impl RingMemory {
    fn new(
        indices: NonNull<RingIndices>,
        slots: NonNull<AtomicU64>,
        capacity: u64,
        words: usize,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        RingMemory {
            indices,
            slots,
            capacity,
            words,
            stride: slot_words(words),
            _owner: owner,
        }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: `indices` points at a live, aligned `RingIndices` for as long
        // as `_owner` lives (the contract of `from_raw` and of `channel`), and
        // it is only ever accessed through shared references to atomics.
        unsafe { &self.indices.as_ref().tail }
    }

    /// The atomic words of the slot at free-running `index`; the last one is
    /// the stamp.
    fn slot(&self, index: u64) -> &[AtomicU64] {
        let start = (index & (self.capacity - 1)) as usize * self.stride;
        // SAFETY: `slots` points at `capacity * stride` live, aligned atomics
        // (same contract as above); the masked index is below `capacity`, so
        // `start + stride` is in bounds.
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr().add(start), self.stride) }
    }

    /// The stamp a slot holds before the entry at `index` is written: the
    /// previous lap's, or 0 on the first lap.
    fn empty_stamp(&self, index: u64) -> u64 {
        (index + 1).saturating_sub(self.capacity)
    }
}

/// Heap storage for a ring that does not live in a segment (tests, loom
/// models, in-process use).
struct HeapRing {
    indices: RingIndices,
    slots: HeapSlots,
}

/// Slot words on the heap, aligned like a segment's so that no slot
/// straddles two cache lines.
#[cfg(not(loom))]
struct HeapSlots(Box<[CachePadded<[AtomicU64; 16]>]>);

#[cfg(not(loom))]
impl HeapSlots {
    fn new(words: usize) -> Self {
        HeapSlots(
            (0..words.div_ceil(16))
                .map(|_| CachePadded(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        )
    }

    fn first(&self) -> NonNull<AtomicU64> {
        // 16 words fill a 128-byte `CachePadded` exactly, so the chunks are
        // contiguous words with no padding between them.
        NonNull::from(&self.0[0].0[0])
    }
}

/// Under loom atomics are not 8 bytes and alignment means nothing: a plain
/// array.
#[cfg(loom)]
struct HeapSlots(Box<[AtomicU64]>);

#[cfg(loom)]
impl HeapSlots {
    fn new(words: usize) -> Self {
        HeapSlots((0..words).map(|_| AtomicU64::new(0)).collect())
    }

    fn first(&self) -> NonNull<AtomicU64> {
        NonNull::from(&self.0[0])
    }
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
        slots: HeapSlots::new(capacity * slot_words(E::WORDS)),
    });
    let indices = NonNull::from(&heap.indices);
    let slots = heap.slots.first();
    let owner: Arc<dyn Send + Sync> = heap;
    let mem = |owner| RingMemory::new(indices, slots, capacity as u64, E::WORDS, owner);
    Ok((Producer::new(mem(owner.clone())), Consumer::new(mem(owner))))
}

/// The writing end of a ring.
pub struct Producer<E: Entry> {
    mem: RingMemory,
    /// Next index to write: private, the only copy there is.
    head: u64,
    /// The last consumer index we read.
    cached_tail: u64,
    _entry: PhantomData<fn(E)>,
}

/// The reading end of a ring.
pub struct Consumer<E: Entry> {
    mem: RingMemory,
    /// Next index to read: our own copy, the only one we trust.
    tail: u64,
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
    /// A slot's stamp is neither "written for this index" nor "not yet
    /// written": the producer (or someone) wrote where it must not.
    #[error(
        "ring is corrupt: slot for index {index} has stamp {stamp}, expected {ready} or {empty}"
    )]
    CorruptStamp {
        /// The free-running index read.
        index: u64,
        /// The stamp found.
        stamp: u64,
        /// The stamp of a written slot.
        ready: u64,
        /// The stamp of a slot not yet written.
        empty: u64,
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
    /// `indices` must point at a `RingIndices` (128-byte aligned) and `slots`
    /// at `capacity * slot_words(E::WORDS)` 64-bit words (64-byte aligned),
    /// valid for reads and writes for as long as `owner` lives, and only ever
    /// accessed atomically. `capacity` must have passed [`check_config`]. The
    /// ring must be fresh (all zero).
    #[cfg_attr(loom, allow(dead_code))] // segments are not built under loom
    pub(crate) unsafe fn from_raw(
        indices: NonNull<RingIndices>,
        slots: NonNull<AtomicU64>,
        capacity: u64,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        Producer::new(RingMemory::new(indices, slots, capacity, E::WORDS, owner))
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.mem.capacity as usize
    }

    /// Entries pushed so far.
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
        let tail = self.mem.tail().load(Ordering::Acquire);
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

    /// Writes the entry into the slot at `head` and publishes it.
    fn write_slot(&mut self, entry: &E) {
        let mut words = [0u64; MAX_ENTRY_WORDS];
        entry.encode(&mut words);
        let slot = self.mem.slot(self.head);
        for (cell, word) in slot.iter().zip(&words[..self.mem.words]) {
            // Relaxed: published by the Release store of the stamp below.
            cell.store(*word, Ordering::Relaxed);
        }
        if let Some(stamp) = slot.last() {
            // Release: the entry's words above become visible to the
            // consumer's Acquire load of this stamp.
            stamp.store(self.head + 1, Ordering::Release);
        }
        self.head += 1;
    }

    /// Pushes one entry, or hands it back in [`PushError::Full`].
    pub fn try_push(&mut self, entry: E) -> Result<(), PushError<E>> {
        if self.head - self.cached_tail == self.mem.capacity {
            self.refresh_tail()?;
            if self.head - self.cached_tail == self.mem.capacity {
                return Err(PushError::Full(entry));
            }
        }
        self.write_slot(&entry);
        Ok(())
    }

    /// Pushes as many of `entries` as fit, reading the consumer's index at
    /// most once. Returns how many were pushed (0 when the ring is full).
    pub fn push_batch(&mut self, entries: &[E]) -> Result<usize, CorruptTail> {
        let mut free = self.mem.capacity - (self.head - self.cached_tail);
        if free < entries.len() as u64 {
            self.refresh_tail()?;
            free = self.mem.capacity - (self.head - self.cached_tail);
        }
        let n = entries.len().min(free as usize);
        for entry in &entries[..n] {
            self.write_slot(entry);
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
        Consumer::new(RingMemory::new(indices, slots, capacity, E::WORDS, owner))
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.mem.capacity as usize
    }

    /// Entries popped so far (our private tail).
    pub fn popped(&self) -> u64 {
        self.tail
    }

    /// Whether the slot at `index` holds a written entry, checking its stamp.
    fn is_written(&self, index: u64) -> Result<bool, PopError<E::Error>> {
        let slot = self.mem.slot(index);
        let Some(stamp) = slot.last() else {
            return Ok(false);
        };
        // Acquire: pairs with the producer's Release store of the stamp, so
        // the entry words it wrote before are visible to our Relaxed loads.
        let stamp = stamp.load(Ordering::Acquire);
        let (ready, empty) = (index + 1, self.mem.empty_stamp(index));
        if stamp == ready {
            Ok(true)
        } else if stamp == empty {
            Ok(false)
        } else {
            Err(PopError::CorruptStamp {
                index,
                stamp,
                ready,
                empty,
            })
        }
    }

    /// Number of entries ready to pop. Scans stamps: O(pending).
    pub fn pending(&self) -> Result<usize, PopError<E::Error>> {
        let mut n = 0;
        while (n as u64) < self.mem.capacity && self.is_written(self.tail + n as u64)? {
            n += 1;
        }
        Ok(n)
    }

    /// Copies the entry at `tail` out of shared memory, once, and advances.
    /// The caller has seen its stamp.
    fn take_slot(&mut self) -> Result<E, PopError<E::Error>> {
        let mut words = [0u64; MAX_ENTRY_WORDS];
        for (word, cell) in words.iter_mut().zip(self.mem.slot(self.tail)) {
            // Relaxed: ordered after the Acquire load of the stamp in
            // `is_written`. For short entries the zip also copies padding and
            // the stamp; they are zeroed below before decoding.
            *word = cell.load(Ordering::Relaxed);
        }
        let index = self.tail;
        self.tail += 1;
        words[self.mem.words..].fill(0);
        E::decode(&words).map_err(|source| PopError::CorruptEntry { index, source })
    }

    fn release_slots(&self) {
        // Release: our loads of the consumed slots happen before the
        // producer's Acquire load of `tail` lets it overwrite them.
        self.mem.tail().store(self.tail, Ordering::Release);
    }

    /// Pops one entry, or `None` if the ring is empty.
    pub fn try_pop(&mut self) -> Result<Option<E>, PopError<E::Error>> {
        if !self.is_written(self.tail)? {
            return Ok(None);
        }
        let entry = self.take_slot();
        self.release_slots();
        entry.map(Some)
    }

    /// Pops up to `max` entries into `out` with one index store. Stops at the
    /// first corrupt entry (consumed, reported as the error; the entries before
    /// it stay in `out`). Returns how many were appended.
    pub fn pop_batch(&mut self, out: &mut Vec<E>, max: usize) -> Result<usize, PopError<E::Error>> {
        let mut n = 0;
        let mut result = Ok(());
        while n < max {
            match self.is_written(self.tail) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            match self.take_slot() {
                Ok(entry) => out.push(entry),
                Err(e) => {
                    result = Err(e);
                    n += 1;
                    break;
                }
            }
            n += 1;
        }
        if n > 0 {
            self.release_slots();
        }
        result.map(|()| n)
    }

    /// Whether the next slot looks written (or corrupt, which `try_pop` then
    /// reports). One Acquire load: the condition for wait loops.
    pub fn has_pending_hint(&self) -> bool {
        !matches!(self.is_written(self.tail), Ok(false))
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
        // Set an unknown flag in slot 0, as a hostile producer could.
        rx.mem.slot(0)[1].store(1 << 40, Ordering::Relaxed);
        assert!(matches!(
            rx.try_pop(),
            Err(PopError::CorruptEntry { index: 0, .. })
        ));
        assert_eq!(rx.try_pop().unwrap().unwrap().call_id, 2);
    }

    #[test]
    fn foreign_stamp_is_corruption() {
        let (mut tx, mut rx) = channel::<Descriptor>(4).unwrap();
        assert_eq!(rx.pending().unwrap(), 0);
        tx.try_push(d(0)).unwrap();
        assert_eq!(rx.pending().unwrap(), 1);
        let stamp =
            |rx: &Consumer<Descriptor>, i: u64| rx.mem.slot(i)[7].store(99, Ordering::Relaxed);
        stamp(&rx, 1);
        assert!(matches!(
            rx.pending(),
            Err(PopError::CorruptStamp {
                index: 1,
                stamp: 99,
                ..
            })
        ));
        rx.try_pop().unwrap();
        assert!(
            rx.has_pending_hint(),
            "corruption shows as pending, for pop to report"
        );
        assert!(matches!(
            rx.try_pop(),
            Err(PopError::CorruptStamp {
                index: 1,
                stamp: 99,
                ready: 2,
                empty: 0
            })
        ));
    }

    #[test]
    fn stale_stamp_of_a_past_lap_is_not_an_entry() {
        let (mut tx, mut rx) = channel::<Descriptor>(2).unwrap();
        for i in 0..2 {
            tx.try_push(d(i)).unwrap();
            rx.try_pop().unwrap().unwrap();
        }
        // Slot 0 holds stamp 1 (index 0's); index 2 expects 3 or, empty, 1.
        assert!(rx.try_pop().unwrap().is_none());
        assert!(!rx.has_pending_hint());
        // A replayed stamp from two laps ago is corruption, not an entry.
        tx.try_push(d(2)).unwrap();
        rx.try_pop().unwrap().unwrap();
        rx.mem.slot(1)[7].store(0, Ordering::Relaxed);
        assert!(matches!(
            rx.try_pop(),
            Err(PopError::CorruptStamp {
                index: 3,
                stamp: 0,
                ..
            })
        ));
    }

    #[test]
    fn tail_beyond_head_is_corruption() {
        let (mut tx, _rx) = channel::<Descriptor>(2).unwrap();
        tx.try_push(d(0)).unwrap();
        tx.try_push(d(1)).unwrap();
        tx.mem.tail().store(3, Ordering::Relaxed);
        assert!(matches!(
            tx.try_push(d(2)),
            Err(PushError::Corrupt(CorruptTail { tail: 3, .. }))
        ));
        assert!(tx.free_slots().is_err());
    }

    #[test]
    fn tail_moving_backwards_is_corruption() {
        let (mut tx, mut rx) = channel::<Descriptor>(2).unwrap();
        tx.try_push(d(0)).unwrap();
        rx.try_pop().unwrap();
        assert_eq!(tx.free_slots().unwrap(), 2);
        tx.mem.tail().store(0, Ordering::Relaxed);
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
