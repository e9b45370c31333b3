//! Slab handles: how a payload is named across a process boundary.
//!
//! A handle is 16 bytes: the segment it lives in, the byte offset of the slab
//! in that segment, and the slab's generation when it was allocated. It is
//! position independent (an offset, never a pointer), so both processes can
//! resolve it in their own mapping, and the generation lets the pool's owner
//! refuse a handle that is stale or given back twice.
//!
//! Decoding a handle from shared memory cannot fail on its own (every bit
//! pattern is a syntactically valid handle); whether it names a real slab is
//! decided by [`crate::pool::PoolLayout::resolve`], which returns
//! [`BadHandle`] when it does not.

use thiserror::Error;

use crate::ring::{Entry, EntryWords};

/// A reference to one slab of a payload pool.
///
/// # Example
///
/// ```
/// use shmesh_shm::handle::SlabHandle;
///
/// let h = SlabHandle { segment: 3, generation: 7, offset: 4096 };
/// let words = h.to_words();
/// assert_eq!(SlabHandle::from_words(words), h);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SlabHandle {
    /// Which segment the slab lives in (the connection numbers its segments).
    pub segment: u32,
    /// The slab's generation when it was allocated; bumped on every release.
    pub generation: u32,
    /// Byte offset of the slab from the start of the segment.
    pub offset: u64,
}

impl SlabHandle {
    /// The handle as the two 64-bit words it occupies in shared memory.
    pub fn to_words(self) -> [u64; 2] {
        [
            self.offset,
            u64::from(self.segment) | (u64::from(self.generation) << 32),
        ]
    }

    /// Reads a handle back from its two words. Never fails: validation is the
    /// pool layout's job, see [`crate::pool::PoolLayout::resolve`].
    pub fn from_words(words: [u64; 2]) -> Self {
        SlabHandle {
            offset: words[0],
            // Truncation is the encoding: low half segment, high half generation.
            segment: words[1] as u32,
            generation: (words[1] >> 32) as u32,
        }
    }
}

/// Handles travel on return rings: the peer gives each consumed slab back to
/// the pool's owner by pushing its handle.
impl Entry for SlabHandle {
    const WORDS: usize = 2;
    type Error = std::convert::Infallible;

    fn encode(&self, out: &mut EntryWords) {
        let [a, b] = self.to_words();
        out[0] = a;
        out[1] = b;
    }

    fn decode(words: &EntryWords) -> Result<Self, Self::Error> {
        Ok(Self::from_words([words[0], words[1]]))
    }
}

/// A handle that does not name a slab the reader may use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BadHandle {
    /// The handle names another segment than the one it was checked against.
    #[error("handle names segment {found}, expected segment {expected}")]
    WrongSegment {
        /// The segment the checker owns.
        expected: u32,
        /// The segment in the handle.
        found: u32,
    },
    /// The offset is not inside any size class of the pool.
    #[error("handle offset {offset} is outside every size class of the pool")]
    OutOfBounds {
        /// The offset in the handle.
        offset: u64,
    },
    /// The offset is inside a size class but not at the start of a slab.
    #[error("handle offset {offset} is not the start of a {slab_size}-byte slab")]
    Misaligned {
        /// The offset in the handle.
        offset: u64,
        /// The slab size of the class the offset falls in.
        slab_size: u64,
    },
    /// The length claimed for the payload does not fit in the slab.
    #[error("payload length {len} does not fit in a {slab_size}-byte slab")]
    TooLong {
        /// The claimed payload length.
        len: u64,
        /// The slab size.
        slab_size: u64,
    },
    /// The generation does not match the slab's current allocation.
    #[error("handle generation {found} is stale: slab is at generation {current}")]
    Stale {
        /// The generation in the handle.
        found: u32,
        /// The slab's current generation.
        current: u32,
    },
    /// The slab was given back already.
    #[error("slab at offset {offset} (generation {generation}) released twice")]
    DoubleRelease {
        /// The slab's offset.
        offset: u64,
        /// The generation in the handle.
        generation: u32,
    },
    /// The peer gave back a slab that was never sent to it.
    #[error("slab at offset {offset} was returned by the peer but never sent to it")]
    NotSent {
        /// The slab's offset.
        offset: u64,
    },
}
