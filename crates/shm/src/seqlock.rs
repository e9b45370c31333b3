//! A sequence lock over words of shared memory: one writer publishes a byte
//! string now and then, readers copy it out without ever blocking the
//! writer, and retry when they raced with it.
//!
//! ```text
//! words[0]      sequence: even when stable, odd while the writer writes
//! words[1]      length of the bytes
//! words[2..]    the bytes, little-endian, 8 to a word, the last zero-padded
//! ```
//!
//! Every word is accessed atomically, so a reader racing the writer (or a
//! hostile writer) makes it read wrong bytes, never undefined behaviour; the
//! sequence check then throws the torn copy away. What a reader returns is a
//! private copy, and its length has been checked against the region: a
//! caller still validates the bytes as the untrusted input they are.
//!
//! Used by [`crate::load`] for a replica's counters; `tests/loom.rs`
//! model-checks that a reader never returns a torn copy.

use thiserror::Error;

use crate::sync::{AtomicU64, Ordering, fence};

/// Words before the bytes.
pub(crate) const HEADER_WORDS: usize = 2;

/// How many times a reader retries a copy that raced with the writer.
const READ_ATTEMPTS: usize = 16;

/// Bytes to publish do not fit the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{len} bytes do not fit in a region of {capacity}")]
pub struct TooLarge {
    /// The bytes offered.
    pub len: usize,
    /// What the region holds.
    pub capacity: usize,
}

/// A region could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SeqReadError {
    /// Every attempt raced with a write: a writer publishing non-stop, or
    /// one that left the sequence odd (crashed mid-write, or hostile).
    #[error("the writer kept changing the region ({READ_ATTEMPTS} attempts)")]
    Busy,
    /// The length word says more than the region holds.
    #[error("the region claims {len} bytes but holds at most {capacity}")]
    BadLength {
        /// The length word.
        len: u64,
        /// What the region holds.
        capacity: usize,
    },
}

/// A region on the heap: for tests and the loom model (real regions live in
/// shared memory, see [`crate::load`]); the same code reads and writes both.
///
/// ```
/// use shmesh_shm::seqlock::HeapRegion;
///
/// let region = HeapRegion::new(64);
/// assert_eq!(region.read(), Ok(None));
/// region.write(b"counters").unwrap();
/// assert_eq!(region.read().unwrap().unwrap(), b"counters");
/// ```
#[derive(Debug)]
pub struct HeapRegion {
    words: Box<[AtomicU64]>,
}

impl HeapRegion {
    /// A region that holds `bytes` bytes (rounded up to whole words).
    pub fn new(bytes: usize) -> HeapRegion {
        let words = HEADER_WORDS + bytes.div_ceil(8);
        HeapRegion {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Publishes `bytes`; one writer at a time.
    pub fn write(&self, bytes: &[u8]) -> Result<(), TooLarge> {
        write(&self.words, bytes)
    }

    /// A copy of the last bytes published.
    pub fn read(&self) -> Result<Option<Vec<u8>>, SeqReadError> {
        read(&self.words)
    }
}

/// Bytes `words` can hold.
pub(crate) fn capacity(words: &[AtomicU64]) -> usize {
    words.len().saturating_sub(HEADER_WORDS) * 8
}

/// Publishes `bytes` in `words`. One writer at a time: the caller
/// serialises writers (readers need no coordination).
pub(crate) fn write(words: &[AtomicU64], bytes: &[u8]) -> Result<(), TooLarge> {
    let capacity = capacity(words);
    if bytes.len() > capacity {
        return Err(TooLarge {
            len: bytes.len(),
            capacity,
        });
    }
    let [sequence, len, data @ ..] = words else {
        return Err(TooLarge {
            len: bytes.len(),
            capacity,
        });
    };
    // Relaxed: only this writer stores the sequence.
    let before = sequence.load(Ordering::Relaxed);
    // An odd sequence tells readers a write is under way. Relaxed store, then
    // a Release fence: the fence keeps every data store below from becoming
    // visible before the odd sequence (pairs with the reader's Acquire fence).
    let odd = before | 1;
    sequence.store(odd, Ordering::Relaxed);
    fence(Ordering::Release);
    len.store(bytes.len() as u64, Ordering::Relaxed);
    for (word, chunk) in data.iter().zip(bytes.chunks(8)) {
        let mut le = [0u8; 8];
        le[..chunk.len()].copy_from_slice(chunk);
        word.store(u64::from_le_bytes(le), Ordering::Relaxed);
    }
    // Release: a reader that loads the new even sequence with Acquire sees
    // every store above.
    sequence.store(odd.wrapping_add(1), Ordering::Release);
    Ok(())
}

/// A copy of what `words` holds: `None` if nothing was ever published.
pub(crate) fn read(words: &[AtomicU64]) -> Result<Option<Vec<u8>>, SeqReadError> {
    let capacity = capacity(words);
    let [sequence, len, data @ ..] = words else {
        return Ok(None);
    };
    for _ in 0..READ_ATTEMPTS {
        // Acquire: pairs with the writer's final Release store; the copy
        // below sees everything published under this sequence.
        let before = sequence.load(Ordering::Acquire);
        if before == 0 {
            return Ok(None);
        }
        if before & 1 == 1 {
            crate::sync::spin_hint();
            continue;
        }
        // Relaxed loads: validated by the sequence check below.
        let n = len.load(Ordering::Relaxed);
        let Some(n) = usize::try_from(n).ok().filter(|&n| n <= capacity) else {
            // Torn reads of the length are caught by the sequence check;
            // a stable bad length is the writer's doing.
            fence(Ordering::Acquire);
            if sequence.load(Ordering::Relaxed) == before {
                return Err(SeqReadError::BadLength { len: n, capacity });
            }
            continue;
        };
        let mut bytes = Vec::with_capacity(n.next_multiple_of(8));
        for word in data.iter().take(n.div_ceil(8)) {
            bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        bytes.truncate(n);
        // Acquire fence: pairs with the writer's Release fence; if any load
        // above saw a store of a later write, the sequence load below sees
        // that write's odd sequence (or later) and the copy is thrown away.
        fence(Ordering::Acquire);
        if sequence.load(Ordering::Relaxed) == before {
            return Ok(Some(bytes));
        }
    }
    Err(SeqReadError::Busy)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn region(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn a_reader_gets_what_was_written_last() {
        let words = region(8);
        assert_eq!(read(&words), Ok(None));
        write(&words, b"hello, counters").unwrap();
        assert_eq!(read(&words).unwrap().unwrap(), b"hello, counters");
        write(&words, b"").unwrap();
        assert_eq!(read(&words).unwrap().unwrap(), b"");
        write(&words, &[7; 48]).unwrap();
        assert_eq!(read(&words).unwrap().unwrap(), [7; 48]);
    }

    #[test]
    fn too_much_is_refused_and_changes_nothing() {
        let words = region(4);
        write(&words, b"kept").unwrap();
        assert_eq!(
            write(&words, &[1; 17]),
            Err(TooLarge {
                len: 17,
                capacity: 16
            })
        );
        assert_eq!(read(&words).unwrap().unwrap(), b"kept");
    }

    #[test]
    fn hostile_words_give_errors_not_garbage_lengths() {
        let words = region(4);
        words[0].store(2, Ordering::Relaxed);
        words[1].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(
            read(&words),
            Err(SeqReadError::BadLength {
                len: u64::MAX,
                capacity: 16
            })
        );
        // A writer that died mid-write (odd sequence) is reported, not
        // waited for.
        words[0].store(3, Ordering::Relaxed);
        assert_eq!(read(&words), Err(SeqReadError::Busy));
    }

    #[test]
    fn concurrent_reads_are_never_torn() {
        let region = std::sync::Arc::new(HeapRegion::new(512));
        let writer = {
            let region = region.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u32 {
                    let fill = (i % 251) as u8;
                    let len = 1 + (i as usize * 7) % 511;
                    region.write(&vec![fill; len]).unwrap();
                }
            })
        };
        let mut seen = 0;
        while !writer.is_finished() {
            if let Ok(Some(bytes)) = region.read() {
                // Every copy is one write: a single fill byte throughout.
                assert!(bytes.iter().all(|&b| b == bytes[0]), "torn: {bytes:?}");
                seen += 1;
            }
        }
        writer.join().unwrap();
        assert!(seen > 0);
    }
}
