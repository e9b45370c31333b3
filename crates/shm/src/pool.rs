//! The payload pool: size-classed slabs, written once in place and read in
//! place by the peer.
//!
//! # Ownership
//!
//! A pool has one owner process. Only the owner allocates; the slab's bytes
//! live in a shared segment, but every piece of bookkeeping (free lists,
//! slab states, generations) lives in the owner's *private* memory. A slab
//! moves through three states:
//!
//! ```text
//!            alloc              send
//!   Free ───────────▶ Loaned ─────────▶ Sent ──┐
//!    ▲                  │ drop                  │ peer returns the handle,
//!    └──────────────────┴───────────────────────┘ or the peer dies (reclaim)
//! ```
//!
//! # Why a return ring, not a shared free list
//!
//! The peer gives a consumed slab back by pushing its [`SlabHandle`] on a
//! *return ring* (an SPSC [`crate::ring`] of handles, peer to owner), and the
//! owner calls [`Pool::release_returned`] on each. The alternative, a
//! lock-free free list in shared memory that both sides push to, was rejected:
//!
//! - A free list in shared memory is the allocator's own state, so a buggy or
//!   hostile peer could link a slab in twice, form a cycle, or point a link
//!   outside the pool, and the owner would hand the same slab to two callers.
//!   With a return ring the peer can only *propose* handles; the owner checks
//!   each one (segment, bounds, alignment, generation, state) before reuse,
//!   and a bad one is a [`BadHandle`] error, never a corrupted allocator.
//! - Reclaiming a dead peer's slabs needs to know which slabs the peer held.
//!   The owner's private `Sent` state says exactly that; nothing the peer
//!   wrote has to be believed.
//! - Returns batch naturally: the owner drains many handles with one index
//!   store, and the peer pushes without any compare-and-swap loop.
//!
//! # Concurrency
//!
//! [`Pool`] is `Sync`: many owner threads allocate and release at once. Each
//! size class keeps its free slabs on a Treiber stack whose head packs a
//! 32-bit ABA tag with a 32-bit slab index; links and slab states are
//! atomics in private memory. Allocation and release take no lock and make no
//! system call.

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

use thiserror::Error;

use crate::handle::{BadHandle, SlabHandle};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Smallest slab size: one cache line.
pub const MIN_SLAB_SIZE: u64 = 64;
/// Largest slab size in one class (larger messages are the RPC layer's job).
pub const MAX_SLAB_SIZE: u64 = 64 << 20;
/// Most slabs in one class (slab indices must fit the free-list encoding).
pub const MAX_SLABS_PER_CLASS: u64 = 1 << 20;
/// Most size classes in one pool.
pub const MAX_CLASSES: usize = 16;

/// One size class: `count` slabs of `slab_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassConfig {
    /// Bytes per slab: a power of two from [`MIN_SLAB_SIZE`] to [`MAX_SLAB_SIZE`].
    pub slab_size: u64,
    /// Number of slabs, 1 to [`MAX_SLABS_PER_CLASS`].
    pub count: u64,
}

/// The size classes of a pool.
///
/// # Example
///
/// ```
/// use shmesh_shm::pool::{ClassConfig, PoolConfig};
///
/// let config = PoolConfig::new(vec![
///     ClassConfig { slab_size: 256, count: 64 },
///     ClassConfig { slab_size: 4096, count: 16 },
/// ]).unwrap();
/// assert_eq!(config.data_len(), 256 * 64 + 4096 * 16);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    classes: Vec<ClassConfig>,
}

impl Default for PoolConfig {
    /// 256 B × 1024, 4 KiB × 256, 64 KiB × 32, 1 MiB × 4: about 7.3 MiB, enough
    /// for a deep ring of small calls and a few large ones in flight.
    fn default() -> Self {
        PoolConfig {
            classes: vec![
                ClassConfig {
                    slab_size: 256,
                    count: 1024,
                },
                ClassConfig {
                    slab_size: 4 << 10,
                    count: 256,
                },
                ClassConfig {
                    slab_size: 64 << 10,
                    count: 32,
                },
                ClassConfig {
                    slab_size: 1 << 20,
                    count: 4,
                },
            ],
        }
    }
}

/// A pool configuration or layout that breaks the rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolConfigError {
    /// No size class at all.
    #[error("a pool needs at least one size class")]
    NoClasses,
    /// More classes than [`MAX_CLASSES`].
    #[error("{count} size classes, at most {max} allowed")]
    TooManyClasses {
        /// Classes given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A slab size that is not a power of two in range.
    #[error("slab size {size} must be a power of two from {min} to {max}")]
    BadSlabSize {
        /// The size given.
        size: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A slab count of zero or above the limit.
    #[error("slab count {count} must be from 1 to {max}")]
    BadSlabCount {
        /// The count given.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// Classes not in strictly increasing slab size.
    #[error("size classes must have strictly increasing slab sizes ({prev} then {next})")]
    Unordered {
        /// The earlier class's slab size.
        prev: u64,
        /// The later class's slab size.
        next: u64,
    },
}

impl PoolConfig {
    /// Checks and wraps a list of size classes, smallest first.
    pub fn new(classes: Vec<ClassConfig>) -> Result<Self, PoolConfigError> {
        if classes.is_empty() {
            return Err(PoolConfigError::NoClasses);
        }
        if classes.len() > MAX_CLASSES {
            return Err(PoolConfigError::TooManyClasses {
                count: classes.len(),
                max: MAX_CLASSES,
            });
        }
        for c in &classes {
            check_class(c.slab_size, c.count)?;
        }
        for pair in classes.windows(2) {
            if pair[1].slab_size <= pair[0].slab_size {
                return Err(PoolConfigError::Unordered {
                    prev: pair[0].slab_size,
                    next: pair[1].slab_size,
                });
            }
        }
        Ok(PoolConfig { classes })
    }

    /// The classes, smallest first.
    pub fn classes(&self) -> &[ClassConfig] {
        &self.classes
    }

    /// Bytes of slab data the pool needs.
    pub fn data_len(&self) -> u64 {
        self.classes.iter().map(|c| c.slab_size * c.count).sum()
    }

    /// The largest payload one slab can hold.
    pub fn max_slab_size(&self) -> u64 {
        self.classes.last().map_or(0, |c| c.slab_size)
    }
}

pub(crate) fn check_class(slab_size: u64, count: u64) -> Result<(), PoolConfigError> {
    if !slab_size.is_power_of_two() || !(MIN_SLAB_SIZE..=MAX_SLAB_SIZE).contains(&slab_size) {
        return Err(PoolConfigError::BadSlabSize {
            size: slab_size,
            min: MIN_SLAB_SIZE,
            max: MAX_SLAB_SIZE,
        });
    }
    if !(1..=MAX_SLABS_PER_CLASS).contains(&count) {
        return Err(PoolConfigError::BadSlabCount {
            count,
            max: MAX_SLABS_PER_CLASS,
        });
    }
    Ok(())
}

/// Where one size class's slabs are, relative to the start of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassLayout {
    /// Offset of the first slab from the start of the segment.
    pub base: u64,
    /// Bytes per slab.
    pub slab_size: u64,
    /// Number of slabs.
    pub count: u64,
}

/// A slab that a handle was checked to name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlabLocation {
    /// Index of the size class.
    pub class: usize,
    /// Index of the slab in its class.
    pub index: u64,
    /// Offset of the slab from the start of the segment.
    pub offset: u64,
    /// Bytes in the slab.
    pub slab_size: u64,
}

/// The geometry of a pool in its segment: all a reader needs to check a
/// handle. Pure data, no memory access, so it is what the fuzzer drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLayout {
    /// The segment's number, as written in every handle of this pool.
    pub segment: u32,
    /// The classes, smallest slab first.
    pub classes: Vec<ClassLayout>,
}

impl PoolLayout {
    /// Lays `config` out contiguously from `base`.
    pub fn contiguous(segment: u32, base: u64, config: &PoolConfig) -> Self {
        let mut at = base;
        let classes = config
            .classes()
            .iter()
            .map(|c| {
                let class = ClassLayout {
                    base: at,
                    slab_size: c.slab_size,
                    count: c.count,
                };
                at += c.slab_size * c.count;
                class
            })
            .collect();
        PoolLayout { segment, classes }
    }

    /// Checks that `handle` names the start of a slab of this pool and that
    /// `len` bytes fit in it. Does not check the generation: only the owner
    /// knows it (see [`Pool::release_returned`]).
    pub fn resolve(&self, handle: SlabHandle, len: u64) -> Result<SlabLocation, BadHandle> {
        if handle.segment != self.segment {
            return Err(BadHandle::WrongSegment {
                expected: self.segment,
                found: handle.segment,
            });
        }
        let offset = handle.offset;
        for (class, c) in self.classes.iter().enumerate() {
            let rel = offset.wrapping_sub(c.base);
            // Saturating: a layout built by hand (not from a validated header)
            // may hold absurd sizes; that must not overflow.
            if offset < c.base || rel >= c.slab_size.saturating_mul(c.count) {
                continue;
            }
            if rel % c.slab_size != 0 {
                return Err(BadHandle::Misaligned {
                    offset,
                    slab_size: c.slab_size,
                });
            }
            if len > c.slab_size {
                return Err(BadHandle::TooLong {
                    len,
                    slab_size: c.slab_size,
                });
            }
            return Ok(SlabLocation {
                class,
                index: rel / c.slab_size,
                offset,
                slab_size: c.slab_size,
            });
        }
        Err(BadHandle::OutOfBounds { offset })
    }

    /// The end of the furthest class, from the start of the segment.
    pub fn end(&self) -> u64 {
        self.classes
            .iter()
            .map(|c| c.base.saturating_add(c.slab_size.saturating_mul(c.count)))
            .max()
            .unwrap_or(0)
    }
}

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocError {
    /// The payload is larger than the largest slab.
    #[error("payload of {len} bytes exceeds the largest slab ({max} bytes)")]
    TooLarge {
        /// Bytes asked for.
        len: u64,
        /// Largest slab size.
        max: u64,
    },
    /// Every slab large enough is in use: backpressure.
    #[error("pool exhausted: no free slab of {len} bytes or more")]
    Exhausted {
        /// Bytes asked for.
        len: u64,
    },
}

/// Slab states, in the low two bits of a slab's state word; the generation
/// is in the upper 30 bits.
const FREE: u32 = 0;
const LOANED: u32 = 1;
const SENT: u32 = 2;
const STATE_MASK: u32 = 0b11;
const GENERATION_MASK: u32 = u32::MAX >> 2;
/// Empty free list marker.
const NIL: u32 = u32::MAX;

fn state_word(generation: u32, state: u32) -> u32 {
    ((generation & GENERATION_MASK) << 2) | state
}

/// The owner's private bookkeeping for one size class.
struct ClassState {
    layout: ClassLayout,
    /// Treiber stack head: ABA tag in the high 32 bits, slab index (or NIL)
    /// in the low 32.
    free_head: AtomicU64,
    /// Free-list links, one per slab.
    next: Box<[AtomicU32]>,
    /// Generation and state, one per slab.
    states: Box<[AtomicU32]>,
    /// Slabs not free (statistics only).
    in_use: AtomicU64,
}

impl ClassState {
    fn new(layout: ClassLayout) -> Self {
        let count = layout.count as usize;
        // Initially every slab is free, linked 0 → 1 → … → NIL.
        let next = (0..count)
            .map(|i| AtomicU32::new(if i + 1 < count { i as u32 + 1 } else { NIL }))
            .collect();
        ClassState {
            layout,
            free_head: AtomicU64::new(0),
            next,
            states: (0..count)
                .map(|_| AtomicU32::new(state_word(0, FREE)))
                .collect(),
            in_use: AtomicU64::new(0),
        }
    }

    fn pop_free(&self) -> Option<u32> {
        // Acquire: pairs with the Release CAS in `push_free`, so the link we
        // read next (and the slab's released state) is the one it wrote.
        let mut head = self.free_head.load(Ordering::Acquire);
        loop {
            let index = head as u32;
            if index == NIL {
                return None;
            }
            // Relaxed: ordered by the Acquire load of `head` above. If another
            // thread pops this slab first, the tag in `head` has changed and
            // our CAS fails, so a stale link is never installed.
            let next = self.next[index as usize].load(Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            match self.free_head.compare_exchange_weak(
                head,
                (tag << 32) | u64::from(next),
                // Acquire on success: we now own the slab; see the Release in
                // `push_free`.
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(index),
                Err(current) => head = current,
            }
        }
    }

    fn push_free(&self, index: u32) {
        let mut head = self.free_head.load(Ordering::Relaxed);
        loop {
            // Relaxed: published by the Release CAS below.
            self.next[index as usize].store(head as u32, Ordering::Relaxed);
            let tag = (head >> 32).wrapping_add(1);
            match self.free_head.compare_exchange_weak(
                head,
                (tag << 32) | u64::from(index),
                // Release: the link above and the slab's state become visible
                // to the thread whose Acquire pop takes this slab.
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }
}

/// How full a pool is: the figure leak checks compare before and after.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Occupancy {
    /// Per class, smallest first: (slab size, slabs in use, slabs in total).
    pub classes: Vec<(u64, u64, u64)>,
}

impl Occupancy {
    /// Slabs in use across all classes.
    pub fn in_use(&self) -> u64 {
        self.classes.iter().map(|c| c.1).sum()
    }
}

/// The owner's side of a payload pool: allocates slabs, takes back handles.
///
/// # Example
///
/// ```
/// use shmesh_shm::pool::{Pool, PoolConfig};
///
/// let pool = Pool::new_heap(0, &PoolConfig::default()).unwrap();
/// let mut slab = pool.alloc(5).unwrap();
/// slab[..5].copy_from_slice(b"hello");
/// let handle = slab.send();                      // now owned by the peer
/// assert_eq!(pool.occupancy().in_use(), 1);
/// pool.release_returned(handle).unwrap();        // the peer gave it back
/// assert!(pool.release_returned(handle).is_err()); // … only once
/// assert_eq!(pool.occupancy().in_use(), 0);
/// ```
pub struct Pool {
    layout: PoolLayout,
    classes: Box<[ClassState]>,
    /// Start of the segment the layout's offsets are relative to.
    base: NonNull<u8>,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: `base` points into memory kept alive by `_owner`; slab bytes are
// handed out only to the holder of a slab's `Loaned` state, which the atomic
// state machine gives to one thread at a time. All other state is atomics.
unsafe impl Send for Pool {}
// SAFETY: as above; every `&self` method synchronises through atomics.
unsafe impl Sync for Pool {}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("layout", &self.layout)
            .field("occupancy", &self.occupancy())
            .finish()
    }
}

/// Heap memory standing in for a segment's pool area.
struct HeapData(Box<[std::cell::UnsafeCell<u8>]>);
// SAFETY: bytes are only reached through `Pool`, whose slab state machine
// gives each slab to one holder at a time.
unsafe impl Sync for HeapData {}
// SAFETY: plain bytes.
unsafe impl Send for HeapData {}

impl Pool {
    /// A pool in private heap memory, for tests and in-process use. Handles
    /// carry segment number `segment`.
    pub fn new_heap(segment: u32, config: &PoolConfig) -> Result<Self, PoolConfigError> {
        let layout = PoolLayout::contiguous(segment, 0, config);
        let len = layout.end() as usize;
        let data = Arc::new(HeapData(
            (0..len.max(1))
                .map(|_| std::cell::UnsafeCell::new(0))
                .collect(),
        ));
        let base = NonNull::new(data.0[0].get()).unwrap_or(NonNull::dangling());
        // SAFETY: `data` holds `layout.end()` bytes from `base` and lives as
        // long as the pool, which keeps it as its owner.
        Ok(unsafe { Pool::from_raw(layout, base, data) })
    }

    /// Builds the owner side over memory the layout describes.
    ///
    /// # Safety
    ///
    /// Every class of `layout` must lie within memory starting at `base` that
    /// is valid for reads and writes for as long as `owner` lives, and no
    /// other `Pool` may be built over the same slabs.
    pub(crate) unsafe fn from_raw(
        layout: PoolLayout,
        base: NonNull<u8>,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        let classes = layout.classes.iter().map(|c| ClassState::new(*c)).collect();
        Pool {
            layout,
            classes,
            base,
            _owner: owner,
        }
    }

    /// The pool's geometry, to pass to the peer's [`PoolView`].
    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    /// Loans a slab that holds at least `len` bytes: the smallest class that
    /// fits, or a larger one when that class is exhausted.
    pub fn alloc(&self, len: usize) -> Result<SlabMut<'_>, AllocError> {
        self.take_slab(len).map(|(class, index, handle)| Slab {
            pool: self,
            class,
            index,
            handle,
            sent: false,
        })
    }

    /// As [`Pool::alloc`], for a loan that must outlive a borrow of the pool
    /// (a request buffer handed to the caller, say).
    pub fn alloc_owned(self: &Arc<Self>, len: usize) -> Result<OwnedSlab, AllocError> {
        self.take_slab(len).map(|(class, index, handle)| Slab {
            pool: self.clone(),
            class,
            index,
            handle,
            sent: false,
        })
    }

    /// Takes a free slab of at least `len` bytes: (class, index, handle).
    fn take_slab(&self, len: usize) -> Result<(usize, u32, SlabHandle), AllocError> {
        let len = len as u64;
        let mut fits = false;
        for (class_index, class) in self.classes.iter().enumerate() {
            if class.layout.slab_size < len {
                continue;
            }
            fits = true;
            let Some(index) = class.pop_free() else {
                continue;
            };
            let state = &class.states[index as usize];
            // Relaxed: the Acquire pop made us the slab's only holder.
            let generation = ((state.load(Ordering::Relaxed) >> 2) + 1) & GENERATION_MASK;
            // Relaxed: nobody else looks at a loaned slab's state until it is
            // sent, and sending is ordered by the ring's Release/Acquire.
            state.store(state_word(generation, LOANED), Ordering::Relaxed);
            // Relaxed: statistics.
            class.in_use.fetch_add(1, Ordering::Relaxed);
            let offset = class.layout.base + u64::from(index) * class.layout.slab_size;
            let handle = SlabHandle {
                segment: self.layout.segment,
                generation,
                offset,
            };
            return Ok((class_index, index, handle));
        }
        if fits {
            Err(AllocError::Exhausted { len })
        } else {
            Err(AllocError::TooLarge {
                len,
                max: self.layout.classes.last().map_or(0, |c| c.slab_size),
            })
        }
    }

    /// Takes back a slab the peer returned, after checking the handle names a
    /// slab that was sent to the peer in that very generation.
    pub fn release_returned(&self, handle: SlabHandle) -> Result<(), BadHandle> {
        let loc = self.layout.resolve(handle, 0)?;
        let class = &self.classes[loc.class];
        let state = &class.states[loc.index as usize];
        // Relaxed: the handle reached us through rings whose Release/Acquire
        // pairs order our earlier `send` before this load; the CAS below
        // arbitrates between concurrent releases of the same handle.
        let mut current = state.load(Ordering::Relaxed);
        loop {
            let generation = current >> 2;
            if generation != handle.generation {
                return Err(BadHandle::Stale {
                    found: handle.generation,
                    current: generation,
                });
            }
            match current & STATE_MASK {
                SENT => {}
                LOANED => return Err(BadHandle::NotSent { offset: loc.offset }),
                _ => {
                    return Err(BadHandle::DoubleRelease {
                        offset: loc.offset,
                        generation: handle.generation,
                    });
                }
            }
            match state.compare_exchange(
                current,
                state_word(generation, FREE),
                // Relaxed: the free-list push that follows is the Release
                // that publishes the new state to the next allocator.
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        // Relaxed: statistics.
        class.in_use.fetch_sub(1, Ordering::Relaxed);
        class.push_free(loc.index as u32);
        Ok(())
    }

    /// Takes back every slab in the `Sent` state: what a dead peer held.
    /// Returns how many slabs were reclaimed. Handles the peer returns
    /// afterwards are refused as [`BadHandle::DoubleRelease`] or
    /// [`BadHandle::Stale`].
    pub fn reclaim_sent(&self) -> u64 {
        let mut reclaimed = 0;
        for class in self.classes.iter() {
            for (index, state) in class.states.iter().enumerate() {
                // Relaxed: the CAS decides; a slab in any other state is not
                // the peer's.
                let current = state.load(Ordering::Relaxed);
                if current & STATE_MASK != SENT {
                    continue;
                }
                let freed = state_word(current >> 2, FREE);
                if state
                    .compare_exchange(current, freed, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    // Relaxed: statistics.
                    class.in_use.fetch_sub(1, Ordering::Relaxed);
                    class.push_free(index as u32);
                    reclaimed += 1;
                }
            }
        }
        reclaimed
    }

    /// Slabs in use per class.
    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            classes: self
                .classes
                .iter()
                .map(|c| {
                    (
                        c.layout.slab_size,
                        // Relaxed: statistics.
                        c.in_use.load(Ordering::Relaxed),
                        c.layout.count,
                    )
                })
                .collect(),
        }
    }

    fn release_loaned(&self, class: usize, index: u32) {
        let class = &self.classes[class];
        let state = &class.states[index as usize];
        // Relaxed: we hold the loan, nobody else writes this state word.
        let generation = state.load(Ordering::Relaxed) >> 2;
        state.store(state_word(generation, FREE), Ordering::Relaxed);
        // Relaxed: statistics.
        class.in_use.fetch_sub(1, Ordering::Relaxed);
        class.push_free(index);
    }
}

/// A loaned slab the owner writes in place. Dropping it gives it back to the
/// pool; [`Slab::send`] hands it to the peer instead. `P` is how it holds
/// the pool: borrowed ([`SlabMut`]) or shared ([`OwnedSlab`]).
pub struct Slab<P: Deref<Target = Pool>> {
    pool: P,
    class: usize,
    index: u32,
    handle: SlabHandle,
    /// Set by `send`: the slab is the peer's now, not ours to free on drop.
    sent: bool,
}

/// A loan that borrows its pool.
pub type SlabMut<'a> = Slab<&'a Pool>;

/// A loan that keeps its pool alive.
pub type OwnedSlab = Slab<Arc<Pool>>;

impl<P: Deref<Target = Pool>> Slab<P> {
    /// The handle the peer will use to find this slab.
    pub fn handle(&self) -> SlabHandle {
        self.handle
    }

    /// Whether this slab was loaned by `pool` (and not by another pool).
    pub fn is_from(&self, pool: &Pool) -> bool {
        std::ptr::eq(&*self.pool, pool)
    }

    /// Capacity of the slab in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.classes[self.class].layout.slab_size as usize
    }

    /// Marks the slab as held by the peer and returns its handle, to be put
    /// in a descriptor. The slab comes back through
    /// [`Pool::release_returned`] or [`Pool::reclaim_sent`].
    pub fn send(mut self) -> SlabHandle {
        let state = &self.pool.classes[self.class].states[self.index as usize];
        // Relaxed: the peer learns of the slab through a ring push whose
        // Release orders this store (and the payload bytes) before it.
        state.store(state_word(self.handle.generation, SENT), Ordering::Relaxed);
        self.sent = true;
        self.handle
    }
}

impl<P: Deref<Target = Pool>> Deref for Slab<P> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the slab lies inside the pool's memory (layout invariant of
        // `Pool::from_raw`) and the `Loaned` state makes this guard its only
        // holder in this process. A protocol-breaking peer writing into it
        // concurrently can change the bytes we see, never their validity:
        // any byte value is a valid `u8`.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.base.as_ptr().add(self.handle.offset as usize),
                self.capacity(),
            )
        }
    }
}

impl<P: Deref<Target = Pool>> std::ops::DerefMut for Slab<P> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference
        // through the guard.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool.base.as_ptr().add(self.handle.offset as usize),
                self.capacity(),
            )
        }
    }
}

impl<P: Deref<Target = Pool>> Drop for Slab<P> {
    fn drop(&mut self) {
        if !self.sent {
            self.pool.release_loaned(self.class, self.index);
        }
    }
}

/// The peer's read-only view of a pool it does not own: checks handles and
/// gives access to the bytes they name.
pub struct PoolView {
    layout: PoolLayout,
    base: NonNull<u8>,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: `base` points into memory kept alive by `_owner`; the view only
// forms shared byte slices over it.
unsafe impl Send for PoolView {}
// SAFETY: as above.
unsafe impl Sync for PoolView {}

impl PoolView {
    /// Builds a view over memory the layout describes.
    ///
    /// # Safety
    ///
    /// Every class of `layout` must lie within memory starting at `base` that
    /// is valid for reads for as long as `owner` lives.
    #[cfg_attr(loom, allow(dead_code))] // segments are not built under loom
    pub(crate) unsafe fn from_raw(
        layout: PoolLayout,
        base: NonNull<u8>,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        PoolView {
            layout,
            base,
            _owner: owner,
        }
    }

    /// The pool's geometry.
    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    /// The first `len` bytes of the slab `handle` names, after checking that
    /// it is a slab of this pool and that `len` fits.
    pub fn read(&self, handle: SlabHandle, len: u64) -> Result<&[u8], BadHandle> {
        let loc = self.layout.resolve(handle, len)?;
        // SAFETY: `resolve` proved the slab lies within the layout, which lies
        // within live memory (contract of `from_raw`), and `len` fits in the
        // slab. The owner does not write a slab while it is sent to us; a
        // protocol-breaking owner can only change the bytes we read, and any
        // byte value is a valid `u8`.
        Ok(unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(loc.offset as usize), len as usize)
        })
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn small() -> PoolConfig {
        PoolConfig::new(vec![
            ClassConfig {
                slab_size: 64,
                count: 2,
            },
            ClassConfig {
                slab_size: 256,
                count: 1,
            },
        ])
        .unwrap()
    }

    #[test]
    fn config_rules() {
        assert_eq!(PoolConfig::new(vec![]), Err(PoolConfigError::NoClasses));
        assert!(matches!(
            PoolConfig::new(vec![ClassConfig {
                slab_size: 100,
                count: 1
            }]),
            Err(PoolConfigError::BadSlabSize { .. })
        ));
        assert!(matches!(
            PoolConfig::new(vec![ClassConfig {
                slab_size: 32,
                count: 1
            }]),
            Err(PoolConfigError::BadSlabSize { .. })
        ));
        assert!(matches!(
            PoolConfig::new(vec![ClassConfig {
                slab_size: 64,
                count: 0
            }]),
            Err(PoolConfigError::BadSlabCount { .. })
        ));
        assert!(matches!(
            PoolConfig::new(vec![
                ClassConfig {
                    slab_size: 128,
                    count: 1
                },
                ClassConfig {
                    slab_size: 64,
                    count: 1
                },
            ]),
            Err(PoolConfigError::Unordered { .. })
        ));
        let many = (0..17)
            .map(|i| ClassConfig {
                slab_size: 64 << i,
                count: 1,
            })
            .collect();
        assert!(matches!(
            PoolConfig::new(many),
            Err(PoolConfigError::TooManyClasses { .. })
        ));
    }

    #[test]
    fn picks_smallest_class_then_spills_up_then_exhausts() {
        let pool = Pool::new_heap(1, &small()).unwrap();
        let a = pool.alloc(10).unwrap();
        let b = pool.alloc(64).unwrap();
        assert_eq!((a.capacity(), b.capacity()), (64, 64));
        let c = pool.alloc(1).unwrap();
        assert_eq!(c.capacity(), 256, "spills into the larger class");
        assert_eq!(pool.alloc(1).err(), Some(AllocError::Exhausted { len: 1 }));
        assert_eq!(
            pool.alloc(257).err(),
            Some(AllocError::TooLarge { len: 257, max: 256 })
        );
        assert_eq!(pool.occupancy().in_use(), 3);
        drop((a, b, c));
        assert_eq!(pool.occupancy().in_use(), 0);
        assert!(pool.alloc(200).is_ok());
    }

    #[test]
    fn release_checks_every_rule() {
        let pool = Pool::new_heap(1, &small()).unwrap();
        let loaned = pool.alloc(8).unwrap();
        assert_eq!(
            pool.release_returned(loaned.handle()),
            Err(BadHandle::NotSent { offset: 0 })
        );
        let h = loaned.send();
        let mut wrong = h;
        wrong.segment = 2;
        assert!(matches!(
            pool.release_returned(wrong),
            Err(BadHandle::WrongSegment { .. })
        ));
        wrong = h;
        wrong.offset = 10;
        assert!(matches!(
            pool.release_returned(wrong),
            Err(BadHandle::Misaligned { .. })
        ));
        wrong.offset = 64 * 2 + 256;
        assert!(matches!(
            pool.release_returned(wrong),
            Err(BadHandle::OutOfBounds { .. })
        ));
        wrong = h;
        wrong.generation += 1;
        assert!(matches!(
            pool.release_returned(wrong),
            Err(BadHandle::Stale { .. })
        ));
        pool.release_returned(h).unwrap();
        assert!(matches!(
            pool.release_returned(h),
            Err(BadHandle::DoubleRelease { .. })
        ));
        // Reused: the old handle is now stale, the new one is accepted.
        let again = pool.alloc(8).unwrap().send();
        assert_eq!(again.offset, h.offset);
        assert_ne!(again.generation, h.generation);
        assert!(matches!(
            pool.release_returned(h),
            Err(BadHandle::Stale { .. })
        ));
        pool.release_returned(again).unwrap();
    }

    #[test]
    fn reclaims_only_what_was_sent() {
        let pool = Pool::new_heap(1, &small()).unwrap();
        let kept = pool.alloc(8).unwrap();
        let sent1 = pool.alloc(8).unwrap().send();
        let sent2 = pool.alloc(100).unwrap().send();
        assert_eq!(pool.reclaim_sent(), 2);
        assert_eq!(pool.occupancy().in_use(), 1);
        assert!(pool.release_returned(sent1).is_err());
        assert!(pool.release_returned(sent2).is_err());
        drop(kept);
        assert_eq!(pool.occupancy().in_use(), 0);
    }

    #[test]
    fn owned_loans_outlive_a_borrow_and_free_on_drop() {
        let pool = Arc::new(Pool::new_heap(1, &small()).unwrap());
        let make = |pool: &Arc<Pool>| {
            let mut slab = pool.alloc_owned(10).unwrap();
            slab[..2].copy_from_slice(b"ok");
            slab
        };
        let kept = make(&pool);
        let sent = make(&pool).send();
        assert_eq!(pool.occupancy().in_use(), 2);
        assert_eq!(&kept[..2], b"ok");
        drop(kept);
        assert_eq!(pool.occupancy().in_use(), 1);
        pool.release_returned(sent).unwrap();
        assert_eq!(pool.occupancy().in_use(), 0);
        assert_eq!(
            Arc::strong_count(&pool),
            1,
            "a sent loan keeps no reference"
        );
    }

    #[test]
    fn view_reads_what_owner_wrote() {
        let pool = Pool::new_heap(4, &small()).unwrap();
        let mut slab = pool.alloc(5).unwrap();
        slab[..5].copy_from_slice(b"hello");
        let h = slab.send();
        // SAFETY (test): the view shares the pool's heap memory and owner.
        // SAFETY: the view covers the pool's own heap memory and keeps it alive.
        let view =
            unsafe { PoolView::from_raw(pool.layout().clone(), pool.base, pool._owner.clone()) };
        assert_eq!(view.read(h, 5).unwrap(), b"hello");
        assert!(matches!(view.read(h, 65), Err(BadHandle::TooLong { .. })));
    }

    #[test]
    fn concurrent_alloc_release_never_hands_out_a_slab_twice() {
        let pool = Arc::new(
            Pool::new_heap(
                0,
                &PoolConfig::new(vec![ClassConfig {
                    slab_size: 64,
                    count: 8,
                }])
                .unwrap(),
            )
            .unwrap(),
        );
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u32 {
                        if let Ok(mut slab) = pool.alloc(64) {
                            slab.fill(t);
                            std::hint::black_box(i);
                            assert!(slab.iter().all(|&b| b == t), "slab shared between holders");
                            if i % 2 == 0 {
                                let h = slab.send();
                                pool.release_returned(h).unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.occupancy().in_use(), 0);
    }
}
