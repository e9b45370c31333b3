//! Descriptors: the fixed-size records that travel on the rings.
//!
//! A descriptor is seven 64-bit words; with the ring's stamp it fills one
//! cache-line slot (see [`crate::ring`]):
//!
//! | word | contents |
//! |------|----------|
//! | 0 | call id |
//! | 1 | method id (low 32 bits), flags (high 32 bits) |
//! | 2 | payload handle: offset |
//! | 3 | payload handle: segment (low), generation (high) |
//! | 4 | payload length (low 32 bits), status code (high 32 bits) |
//! | 5 | deadline, nanoseconds on `CLOCK_MONOTONIC` (0 = none) |
//! | 6 | auxiliary word for the RPC layer (stream sequence, credits, …) |
//!
//! [`Descriptor::decode`] is the only way to turn shared words into a
//! descriptor; it checks everything that can be checked without a pool
//! (known flags, a payload handle and length only with a payload). The
//! payload handle is then checked against the pool with
//! [`crate::pool::PoolLayout::resolve`].

use thiserror::Error;

use crate::handle::SlabHandle;
use crate::ring::{Entry, EntryWords};

/// Flag bits of a descriptor.
///
/// Bits 0 to 15 belong to this crate and are validated; bits 16 to 31 are
/// free for the RPC layer above and passed through unchecked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// The descriptor carries a payload in the pool (handle and length valid).
    pub const PAYLOAD: Flags = Flags(1 << 0);
    /// Last message of its call or stream.
    pub const END: Flags = Flags(1 << 1);
    /// The status word is meaningful (a response or an error).
    pub const STATUS: Flags = Flags(1 << 2);
    /// The sender cancels the call.
    pub const CANCEL: Flags = Flags(1 << 3);
    /// Bits this crate defines.
    pub const KNOWN: Flags = Flags(0b1111);
    /// Bits reserved for the layer above, passed through unchecked.
    pub const UPPER: Flags = Flags(0xFFFF_0000);

    /// Whether every bit of `other` is set in `self`.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// One message on a ring: which call, which method, and where its payload is.
///
/// # Example
///
/// ```
/// use shmesh_shm::descriptor::{Descriptor, Flags};
///
/// let d = Descriptor { call_id: 42, method_id: 1, flags: Flags::END, ..Default::default() };
/// let words = d.to_words();
/// assert_eq!(Descriptor::decode(&words).unwrap(), d);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// Matches a response to its request.
    pub call_id: u64,
    /// The method (or stream) the message belongs to.
    pub method_id: u32,
    /// See [`Flags`].
    pub flags: Flags,
    /// The payload, if [`Flags::PAYLOAD`] is set; zero otherwise.
    pub payload: SlabHandle,
    /// Payload length in bytes; zero without a payload.
    pub len: u32,
    /// A status code, meaningful with [`Flags::STATUS`].
    pub status: u32,
    /// Absolute deadline in nanoseconds of `CLOCK_MONOTONIC`; 0 means none.
    pub deadline_ns: u64,
    /// A word the RPC layer uses as it likes (stream sequence, credits).
    pub aux: u64,
}

/// Number of 64-bit words a descriptor occupies.
pub const DESCRIPTOR_WORDS: usize = 7;

impl Descriptor {
    /// The descriptor's shared-memory encoding.
    pub fn to_words(&self) -> [u64; DESCRIPTOR_WORDS] {
        let [h0, h1] = self.payload.to_words();
        [
            self.call_id,
            u64::from(self.method_id) | (u64::from(self.flags.0) << 32),
            h0,
            h1,
            u64::from(self.len) | (u64::from(self.status) << 32),
            self.deadline_ns,
            self.aux,
        ]
    }

    /// Decodes and checks a descriptor copied out of shared memory.
    ///
    /// The words must already be a private copy: each was read exactly once.
    pub fn decode(words: &[u64; DESCRIPTOR_WORDS]) -> Result<Self, CorruptDescriptor> {
        // Truncations below are the encoding: two 32-bit fields per word.
        let flags = Flags((words[1] >> 32) as u32);
        let unknown = flags.0 & !(Flags::KNOWN.0 | Flags::UPPER.0);
        if unknown != 0 {
            return Err(CorruptDescriptor::UnknownFlags { bits: unknown });
        }
        let payload = SlabHandle::from_words([words[2], words[3]]);
        let len = words[4] as u32;
        if !flags.contains(Flags::PAYLOAD) && (len != 0 || payload != SlabHandle::default()) {
            return Err(CorruptDescriptor::PayloadWithoutFlag { len });
        }
        Ok(Descriptor {
            call_id: words[0],
            method_id: words[1] as u32,
            flags,
            payload,
            len,
            status: (words[4] >> 32) as u32,
            deadline_ns: words[5],
            aux: words[6],
        })
    }
}

impl Entry for Descriptor {
    const WORDS: usize = DESCRIPTOR_WORDS;
    type Error = CorruptDescriptor;

    fn encode(&self, out: &mut EntryWords) {
        out[..DESCRIPTOR_WORDS].copy_from_slice(&self.to_words());
    }

    fn decode(words: &EntryWords) -> Result<Self, Self::Error> {
        let mut own = [0u64; DESCRIPTOR_WORDS];
        own.copy_from_slice(&words[..DESCRIPTOR_WORDS]);
        Descriptor::decode(&own)
    }
}

/// A descriptor read from shared memory that breaks the format.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CorruptDescriptor {
    /// Flag bits this version does not define are set.
    #[error("descriptor has unknown flag bits {bits:#x}")]
    UnknownFlags {
        /// The offending bits.
        bits: u32,
    },
    /// A payload handle or length is set but the payload flag is not.
    #[error("descriptor names a payload (length {len}) without the payload flag")]
    PayloadWithoutFlag {
        /// The claimed length.
        len: u32,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        Descriptor {
            call_id: u64::MAX - 1,
            method_id: 0xdead_beef,
            flags: Flags::PAYLOAD | Flags::END | Flags(1 << 20),
            payload: SlabHandle {
                segment: 9,
                generation: u32::MAX,
                offset: 1 << 40,
            },
            len: 12345,
            status: 14,
            deadline_ns: 99,
            aux: 7,
        }
    }

    #[test]
    fn round_trips_every_field() {
        let d = sample();
        assert_eq!(Descriptor::decode(&d.to_words()), Ok(d));
    }

    #[test]
    fn rejects_unknown_flags() {
        let mut w = sample().to_words();
        w[1] |= 1 << (32 + 5);
        assert_eq!(
            Descriptor::decode(&w),
            Err(CorruptDescriptor::UnknownFlags { bits: 1 << 5 })
        );
    }

    #[test]
    fn rejects_payload_without_flag() {
        let mut d = sample();
        d.flags = Flags::END;
        assert_eq!(
            Descriptor::decode(&d.to_words()),
            Err(CorruptDescriptor::PayloadWithoutFlag { len: 12345 })
        );
        d.len = 0;
        assert!(Descriptor::decode(&d.to_words()).is_err());
        d.payload = SlabHandle::default();
        assert!(Descriptor::decode(&d.to_words()).is_ok());
    }
}
