//! Call metadata: a small ordered list of ASCII key/value pairs that rides
//! with a call's opening descriptor (a trace context, a tenant, a request
//! id), like gRPC's ASCII metadata.
//!
//! # Rules
//!
//! - keys: 1 to [`MAX_KEY_LEN`] bytes of lowercase ASCII letters, digits,
//!   `.`, `_` and `-` (`traceparent`, `x-request-id`);
//! - values: at most [`MAX_VALUE_LEN`] bytes of printable ASCII (space to
//!   `~`), possibly empty;
//! - at most [`MAX_ENTRIES`] entries, each key once, and an encoded block of
//!   at most [`MAX_BLOCK_LEN`] bytes.
//!
//! # Wire format
//!
//! When the call's `OPEN` descriptor carries
//! [`METADATA`](crate::protocol::METADATA), its payload starts with the
//! block, and the message (if the descriptor carries one) follows it:
//!
//! ```text
//! u16 LE  n: the length of the entries that follow
//! n bytes of entries, each:
//!     u8      key length k (1..=64)
//!     k bytes key
//!     u16 LE  value length v (0..=1024)
//!     v bytes value
//! ```
//!
//! Everything about the block is checked: lengths within the block, the
//! block within the payload, every byte of every key and value, no key
//! twice, the entry count. A block that breaks any rule fails the call with
//! `InvalidArgument` naming the rule ([`MetadataError`]); the connection
//! stays up.
//!
//! # Untrusted memory
//!
//! The receiver's block lies in the sender's pool, which the sender can
//! still write. [`Metadata::decode`] therefore copies the block once
//! (reading its length once) into private memory and validates the copy;
//! nothing reads the shared bytes again. At most 4 KiB, and only for calls
//! that carry metadata.
//!
//! ```
//! use shmesh::metadata::Metadata;
//!
//! let mut metadata = Metadata::new();
//! metadata.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?;
//! metadata.insert("tenant", "blue")?;
//! metadata.insert("tenant", "green")?; // replaces, keeps its place
//! assert_eq!(metadata.get("tenant"), Some("green"));
//! assert_eq!(metadata.len(), 2);
//!
//! let mut block = vec![0; metadata.encoded_len()];
//! metadata.encode_into(&mut block);
//! let (decoded, used) = Metadata::decode(&block)?;
//! assert_eq!((decoded, used), (metadata, block.len()));
//! # Ok::<(), shmesh::metadata::MetadataError>(())
//! ```

use thiserror::Error;

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 64;
/// The longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;
/// The most entries a call carries.
pub const MAX_ENTRIES: usize = 32;
/// The largest encoded block, its length prefix included.
pub const MAX_BLOCK_LEN: usize = 4096;
/// Bytes of the block's length prefix.
const PREFIX_LEN: usize = 2;

/// Metadata that breaks the rules: made by [`Metadata::insert`], or found
/// by [`Metadata::decode`] in a block a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetadataError {
    /// A key is empty.
    #[error("metadata key is empty")]
    EmptyKey,
    /// A key is longer than [`MAX_KEY_LEN`].
    #[error("metadata key of {len} bytes is longer than {MAX_KEY_LEN}")]
    KeyTooLong {
        /// Its length.
        len: usize,
    },
    /// A key holds a byte other than `a-z`, `0-9`, `.`, `_`, `-`.
    #[error(
        "metadata key holds byte {byte:#04x} at {at}; keys are lowercase a-z, 0-9, '.', '_', '-'"
    )]
    KeyByte {
        /// The byte.
        byte: u8,
        /// Where in the key.
        at: usize,
    },
    /// A value is longer than [`MAX_VALUE_LEN`].
    #[error("metadata value of {key:?} is {len} bytes, longer than {MAX_VALUE_LEN}")]
    ValueTooLong {
        /// Its key.
        key: String,
        /// Its length.
        len: usize,
    },
    /// A value holds a byte that is not printable ASCII.
    #[error("metadata value of {key:?} holds byte {byte:#04x} at {at}; values are printable ASCII")]
    ValueByte {
        /// Its key.
        key: String,
        /// The byte.
        byte: u8,
        /// Where in the value.
        at: usize,
    },
    /// More than [`MAX_ENTRIES`] entries.
    #[error("metadata holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// The encoded block would exceed [`MAX_BLOCK_LEN`].
    #[error("metadata block of {len} bytes exceeds {MAX_BLOCK_LEN}")]
    BlockTooLarge {
        /// The block's length, prefix included.
        len: usize,
    },
    /// The block's length runs past the bytes that carry it.
    #[error("metadata block claims {claimed} bytes but {available} follow its length")]
    BlockOverrun {
        /// The length in the prefix.
        claimed: usize,
        /// The bytes there are.
        available: usize,
    },
    /// The block ends inside an entry.
    #[error("metadata block ends inside the {what} of entry {entry}")]
    Truncated {
        /// What was cut: `key length`, `key`, `value length`, `value`.
        what: &'static str,
        /// The entry's index.
        entry: usize,
    },
    /// A key appears twice.
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
}

/// A call's metadata: ordered key/value pairs, kept in their wire
/// encoding so that sending them costs one copy of the block.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Metadata {
    /// The entries, encoded as on the wire (without the length prefix),
    /// always valid.
    entries: Vec<u8>,
    /// How many entries.
    count: usize,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Checks a key against the rules.
pub fn check_key(key: &[u8]) -> Result<(), MetadataError> {
    if key.is_empty() {
        return Err(MetadataError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(MetadataError::KeyTooLong { len: key.len() });
    }
    match key
        .iter()
        .position(|b| !matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
    {
        Some(at) => Err(MetadataError::KeyByte { byte: key[at], at }),
        None => Ok(()),
    }
}

/// Checks `key`'s value against the rules.
fn check_value(key: &str, value: &[u8]) -> Result<(), MetadataError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(MetadataError::ValueTooLong {
            key: key.to_owned(),
            len: value.len(),
        });
    }
    match value.iter().position(|b| !(b' '..=b'~').contains(b)) {
        Some(at) => Err(MetadataError::ValueByte {
            key: key.to_owned(),
            byte: value[at],
            at,
        }),
        None => Ok(()),
    }
}

/// One entry's position in the encoded entries.
struct Span {
    /// Where the entry starts (its key length byte).
    start: usize,
    key: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

/// Reads the entry at `at` of `bytes` (entry number `entry`), checking only
/// that its lengths stay within `bytes`.
fn entry_at(bytes: &[u8], at: usize, entry: usize) -> Result<Span, MetadataError> {
    let cut = |what| MetadataError::Truncated { what, entry };
    let key_len = usize::from(*bytes.get(at).ok_or(cut("key length"))?);
    let key = at + 1..at + 1 + key_len;
    if key.end > bytes.len() {
        return Err(cut("key"));
    }
    let len = bytes.get(key.end..key.end + 2).ok_or(cut("value length"))?;
    let value_len = usize::from(u16::from_le_bytes([len[0], len[1]]));
    let value = key.end + 2..key.end + 2 + value_len;
    if value.end > bytes.len() {
        return Err(cut("value"));
    }
    Ok(Span {
        start: at,
        key,
        value,
    })
}

impl Metadata {
    /// No entries. Allocates nothing.
    pub const fn new() -> Self {
        Metadata {
            entries: Vec::new(),
            count: 0,
        }
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no entries (a call with none sends no block).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries in order, as `(key, value)`.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            bytes: &self.entries,
            at: 0,
        }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Sets `key` to `value`: replaces the value of an existing key in its
    /// place, or appends. Refused (and nothing changed) if the key or the
    /// value breaks the rules, or the metadata would grow past
    /// [`MAX_ENTRIES`] or [`MAX_BLOCK_LEN`].
    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), MetadataError> {
        check_key(key.as_bytes())?;
        check_value(key, value.as_bytes())?;
        let mut encoded = Vec::with_capacity(3 + key.len() + value.len());
        // Both fit: checked above.
        encoded.push(key.len() as u8);
        encoded.extend_from_slice(key.as_bytes());
        encoded.extend_from_slice(&(value.len() as u16).to_le_bytes());
        encoded.extend_from_slice(value.as_bytes());
        let existing = self
            .spans()
            .find(|s| &self.entries[s.key.clone()] == key.as_bytes());
        let (replaced, count) = match &existing {
            Some(s) => (s.start..s.value.end, self.count),
            None => (self.entries.len()..self.entries.len(), self.count + 1),
        };
        if count > MAX_ENTRIES {
            return Err(MetadataError::TooManyEntries);
        }
        let len = PREFIX_LEN + self.entries.len() - replaced.len() + encoded.len();
        if len > MAX_BLOCK_LEN {
            return Err(MetadataError::BlockTooLarge { len });
        }
        self.entries.splice(replaced, encoded);
        self.count = count;
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        let Some(s) = self
            .spans()
            .find(|s| &self.entries[s.key.clone()] == key.as_bytes())
        else {
            return false;
        };
        self.entries.drain(s.start..s.value.end);
        self.count -= 1;
        true
    }

    /// The length of the encoded block, prefix included; 0 when empty (no
    /// block is sent then).
    pub fn encoded_len(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            PREFIX_LEN + self.entries.len()
        }
    }

    /// Writes the block into the first [`Metadata::encoded_len`] bytes of
    /// `out` (nothing when empty).
    ///
    /// # Panics
    ///
    /// If `out` is shorter than [`Metadata::encoded_len`].
    pub fn encode_into(&self, out: &mut [u8]) {
        if self.is_empty() {
            return;
        }
        // At most MAX_BLOCK_LEN - 2: fits a u16.
        out[..PREFIX_LEN].copy_from_slice(&(self.entries.len() as u16).to_le_bytes());
        out[PREFIX_LEN..PREFIX_LEN + self.entries.len()].copy_from_slice(&self.entries);
    }

    /// Decodes the block at the start of `bytes` (the rest is the message):
    /// the metadata and the block's length. `bytes` may be shared memory
    /// the peer can still write: the block is copied once into private
    /// memory and only the copy is checked and kept.
    pub fn decode(bytes: &[u8]) -> Result<(Metadata, usize), MetadataError> {
        let Some(prefix) = bytes.get(..PREFIX_LEN) else {
            return Err(MetadataError::BlockOverrun {
                claimed: PREFIX_LEN,
                available: bytes.len(),
            });
        };
        let claimed = usize::from(u16::from_le_bytes([prefix[0], prefix[1]]));
        if PREFIX_LEN + claimed > MAX_BLOCK_LEN {
            return Err(MetadataError::BlockTooLarge {
                len: PREFIX_LEN + claimed,
            });
        }
        let Some(shared) = bytes.get(PREFIX_LEN..PREFIX_LEN + claimed) else {
            return Err(MetadataError::BlockOverrun {
                claimed,
                available: bytes.len() - PREFIX_LEN,
            });
        };
        let entries = shared.to_vec();
        let count = Self::validate(&entries)?;
        Ok((Metadata { entries, count }, PREFIX_LEN + claimed))
    }

    /// Checks encoded entries (private memory); their count.
    fn validate(entries: &[u8]) -> Result<usize, MetadataError> {
        let mut at = 0;
        let mut count = 0;
        while at < entries.len() {
            if count == MAX_ENTRIES {
                return Err(MetadataError::TooManyEntries);
            }
            let span = entry_at(entries, at, count)?;
            let key = &entries[span.key.clone()];
            check_key(key)?;
            // Checked: ASCII.
            let key_text = std::str::from_utf8(key).unwrap_or_default();
            check_value(key_text, &entries[span.value.clone()])?;
            let mut earlier = EntrySpans {
                bytes: entries,
                at: 0,
            };
            if earlier.any(|s| s.start < span.start && &entries[s.key] == key) {
                return Err(MetadataError::DuplicateKey(key_text.to_owned()));
            }
            at = span.value.end;
            count += 1;
        }
        Ok(count)
    }

    fn spans(&self) -> EntrySpans<'_> {
        EntrySpans {
            bytes: &self.entries,
            at: 0,
        }
    }
}

impl<'a> IntoIterator for &'a Metadata {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// The positions of the entries of valid encoded entries.
struct EntrySpans<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Iterator for EntrySpans<'_> {
    type Item = Span;
    fn next(&mut self) -> Option<Span> {
        if self.at >= self.bytes.len() {
            return None;
        }
        // Valid by construction; a failure would end the walk, not panic.
        let span = entry_at(self.bytes, self.at, 0).ok()?;
        self.at = span.value.end;
        Some(span)
    }
}

/// The entries of a [`Metadata`], in order ([`Metadata::iter`]).
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);
    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        let mut spans = EntrySpans {
            bytes: self.bytes,
            at: self.at,
        };
        let span = spans.next()?;
        self.at = spans.at;
        // ASCII by construction: these never fail.
        let key = std::str::from_utf8(&self.bytes[span.key]).ok()?;
        let value = std::str::from_utf8(&self.bytes[span.value]).ok()?;
        Some((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(m: &Metadata) -> Vec<u8> {
        let mut out = vec![0; m.encoded_len()];
        m.encode_into(&mut out);
        out
    }

    #[test]
    fn round_trips_in_order_with_a_message_after() {
        let mut m = Metadata::new();
        m.insert("b", "2").unwrap();
        m.insert("a", "").unwrap();
        m.insert("b", "22").unwrap();
        assert_eq!(m.iter().collect::<Vec<_>>(), [("b", "22"), ("a", "")]);
        let mut wire = encode(&m);
        let block = wire.len();
        wire.extend_from_slice(b"the message");
        let (back, used) = Metadata::decode(&wire).unwrap();
        assert_eq!(back, m);
        assert_eq!(&wire[used..], b"the message");
        assert_eq!(used, block);
        assert!(m.remove("b"));
        assert!(!m.remove("b"));
        assert_eq!(m.len(), 1);
        assert_eq!(m.get("a"), Some(""));
    }

    #[test]
    fn empty_metadata_encodes_to_nothing() {
        let m = Metadata::new();
        assert_eq!(m.encoded_len(), 0);
        assert!(m.is_empty());
        // An empty block on the wire is accepted.
        assert_eq!(Metadata::decode(&[0, 0]).unwrap(), (Metadata::new(), 2));
    }

    #[test]
    fn insert_names_what_is_wrong() {
        let mut m = Metadata::new();
        assert_eq!(m.insert("", "x"), Err(MetadataError::EmptyKey));
        assert_eq!(
            m.insert(&"k".repeat(65), "x"),
            Err(MetadataError::KeyTooLong { len: 65 })
        );
        assert_eq!(
            m.insert("Trace", "x"),
            Err(MetadataError::KeyByte { byte: b'T', at: 0 })
        );
        assert!(matches!(
            m.insert("k", &"v".repeat(1025)),
            Err(MetadataError::ValueTooLong { len: 1025, .. })
        ));
        assert!(matches!(
            m.insert("k", "a\nb"),
            Err(MetadataError::ValueByte {
                byte: b'\n',
                at: 1,
                ..
            })
        ));
        for i in 0..MAX_ENTRIES {
            m.insert(&format!("k{i}"), "v").unwrap();
        }
        assert_eq!(
            m.insert("one-more", "v"),
            Err(MetadataError::TooManyEntries)
        );
        // Replacing is still fine when full.
        m.insert("k0", "w").unwrap();
        let mut big = Metadata::new();
        for i in 0..3 {
            big.insert(&format!("k{i}"), &"v".repeat(1024)).unwrap();
        }
        assert!(matches!(
            big.insert("k3", &"v".repeat(1024)),
            Err(MetadataError::BlockTooLarge { .. })
        ));
        assert_eq!(big.len(), 3);
    }

    /// The fuzz target's properties (`fuzz/fuzz_targets/metadata.rs`), on
    /// random bytes and on valid blocks with bytes flipped.
    fn check_decoded(bytes: &[u8]) {
        let Ok((metadata, used)) = Metadata::decode(bytes) else {
            return;
        };
        assert!(used >= 2 && used <= bytes.len() && used <= MAX_BLOCK_LEN);
        assert!(metadata.len() <= MAX_ENTRIES);
        assert_eq!(metadata.iter().count(), metadata.len());
        if metadata.is_empty() {
            assert_eq!(&bytes[..used], &[0, 0]);
        } else {
            assert_eq!(encode(&metadata), &bytes[..used]);
        }
        let mut rebuilt = Metadata::new();
        for (key, value) in &metadata {
            rebuilt.insert(key, value).unwrap();
        }
        assert_eq!(rebuilt, metadata);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            check_decoded(&bytes);
        }

        #[test]
        fn damaged_blocks_decode_or_fail_cleanly(
            entries in proptest::collection::vec(("[a-z0-9._-]{1,8}", "[ -~]{0,12}"), 0..6),
            flips in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 0..4),
        ) {
            let mut m = Metadata::new();
            for (k, v) in &entries {
                m.insert(k, v).unwrap();
            }
            let mut bytes = encode(&m);
            check_decoded(&bytes);
            for (at, byte) in flips {
                if let Some(b) = bytes.get_mut(at) {
                    *b = byte;
                }
                check_decoded(&bytes);
            }
        }
    }

    #[test]
    fn decode_refuses_every_broken_rule() {
        let block = |entries: &[u8]| {
            let mut b = (entries.len() as u16).to_le_bytes().to_vec();
            b.extend_from_slice(entries);
            b
        };
        let err = |bytes: &[u8]| Metadata::decode(bytes).unwrap_err();
        assert!(matches!(err(&[5]), MetadataError::BlockOverrun { .. }));
        assert!(matches!(
            err(&[9, 0, 1]),
            MetadataError::BlockOverrun {
                claimed: 9,
                available: 1
            }
        ));
        assert!(matches!(
            err(&[0xff, 0xff]),
            MetadataError::BlockTooLarge { .. }
        ));
        assert!(matches!(
            err(&block(&[3, b'a'])),
            MetadataError::Truncated { what: "key", .. }
        ));
        assert!(matches!(
            err(&block(&[1, b'a', 0])),
            MetadataError::Truncated {
                what: "value length",
                ..
            }
        ));
        assert!(matches!(
            err(&block(&[1, b'a', 2, 0, b'x'])),
            MetadataError::Truncated { what: "value", .. }
        ));
        assert_eq!(err(&block(&[0, 0, 0])), MetadataError::EmptyKey);
        assert!(matches!(
            err(&block(&[1, b'A', 0, 0])),
            MetadataError::KeyByte { byte: b'A', .. }
        ));
        assert!(matches!(
            err(&block(&[1, b'a', 1, 0, 0x7f])),
            MetadataError::ValueByte { byte: 0x7f, .. }
        ));
        assert_eq!(
            err(&block(&[1, b'a', 0, 0, 1, b'a', 0, 0])),
            MetadataError::DuplicateKey("a".into())
        );
        let mut many = Vec::new();
        for i in 0..=MAX_ENTRIES as u8 {
            many.extend_from_slice(&[2, b'k', b'a' + i % 26, 0, 0]);
        }
        // Distinct keys where it matters: the 33rd entry is refused first.
        let mut distinct = Vec::new();
        for i in 0..=MAX_ENTRIES {
            let key = format!("k{i:02}");
            distinct.push(key.len() as u8);
            distinct.extend_from_slice(key.as_bytes());
            distinct.extend_from_slice(&[0, 0]);
        }
        assert_eq!(err(&block(&distinct)), MetadataError::TooManyEntries);
        assert!(Metadata::decode(&block(&many)).is_err());
    }
}
