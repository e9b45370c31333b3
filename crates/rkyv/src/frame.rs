//! Frames: how a message lies in a buffer, how it is written there and how
//! it is read back (validated) in either [`ReadMode`].
//!
//! ```text
//! offset 0                        n                      L-8          L
//! ├── rkyv archive (root at its end) ┼── slack (unread) ──┼─ n: u32 LE ┼─ "shrk" ┤
//! ```
//!
//! The archive is what rkyv writes into a buffer aligned to 16; the slack is
//! whatever the loan held beyond it (a loan's length is chosen before the
//! archive's is known); the trailer gives the archive's length `n` and a tag.
//! A reader takes `n` from the trailer, checks `n ≤ L - 8`, and validates
//! `[0, n)` with bytecheck before it reads anything.
//!
//! ```
//! use rkyv::{Archive, Serialize};
//! use shmesh_rkyv::{ReadMode, ReadPath, TrustedPeer, access, write_frame};
//!
//! #[derive(Archive, Serialize)]
//! struct Tick { symbol: String, price: i64 }
//!
//! let mut buf = rkyv::util::AlignedVec::<16>::new();
//! buf.resize(128, 0);
//! let n = write_frame(&Tick { symbol: "ACME".into(), price: 1234 }, &mut buf)?;
//! assert!(n + shmesh_rkyv::TRAILER_LEN <= 128);
//!
//! let copied = access::<Tick>(&buf, ReadMode::Copied)?;
//! assert_eq!((copied.symbol.as_str(), copied.price.to_native()), ("ACME", 1234));
//! assert_eq!(copied.path(), ReadPath::Copied);
//!
//! let trusted = ReadMode::InPlace(TrustedPeer::assume_trusted());
//! assert_eq!(access::<Tick>(&buf, trusted)?.path(), ReadPath::InPlace);
//! # Ok::<(), shmesh_rkyv::Error>(())
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};

use rkyv::rancor;
use rkyv::ser::{Positional, Writer};
use rkyv::util::AlignedVec;
use yoke::Yoke;

use crate::{Error, Message, ReadMode, ReadPath, TrustedPeer, type_name};

/// The trailer's length: the archive's length (u32 LE) and [`FRAME_TAG`].
pub const TRAILER_LEN: usize = 8;

/// The tag in the last 4 bytes of every frame.
pub const FRAME_TAG: [u8; 4] = *b"shrk";

/// The alignment rkyv's archives are laid out for, and that in-place reads
/// require of a frame's first byte.
pub const ALIGN: usize = 16;

/// rkyv's writer over a loaned buffer: it writes while the archive fits,
/// and past the end it only counts, so a message that does not fit comes
/// out with its exact length (and the retry loans exactly that).
#[derive(Debug)]
pub struct FrameWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> FrameWriter<'a> {
    /// A writer filling `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        FrameWriter { buf, pos: 0 }
    }

    /// Whether everything written so far fit.
    pub fn fits(&self) -> bool {
        self.pos <= self.buf.len()
    }
}

impl Positional for FrameWriter<'_> {
    fn pos(&self) -> usize {
        self.pos
    }
}

impl<E> Writer<E> for FrameWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        let end = self.pos.saturating_add(bytes.len());
        if let Some(out) = self.buf.get_mut(self.pos..end) {
            out.copy_from_slice(bytes);
        }
        self.pos = end;
        Ok(())
    }
}

/// Serializes `value` as a frame filling all of `buf` (see the [module
/// docs](self)): the archive from offset 0, the trailer in the last
/// [`TRAILER_LEN`] bytes. Returns the archive's length, or
/// [`Error::DoesNotFit`] with the exact frame length needed.
pub fn write_frame<T: Message>(value: &T, buf: &mut [u8]) -> Result<usize, Error> {
    let len = buf.len();
    let room = len.saturating_sub(TRAILER_LEN);
    let (archive, trailer) = buf.split_at_mut(room);
    let writer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, FrameWriter::new(archive))
        .map_err(|source| Error::Serialize {
            type_name: type_name::<T>(),
            source,
        })?;
    let n = writer.pos;
    let Ok(n32) = u32::try_from(n) else {
        return Err(Error::TooLarge {
            type_name: type_name::<T>(),
            len: n,
        });
    };
    if !writer.fits() || trailer.len() < TRAILER_LEN {
        return Err(Error::DoesNotFit {
            type_name: type_name::<T>(),
            len,
            needed: n + TRAILER_LEN,
        });
    }
    trailer[..4].copy_from_slice(&n32.to_le_bytes());
    trailer[4..].copy_from_slice(&FRAME_TAG);
    Ok(n)
}

/// The exact frame length of `value` (a serialization that only counts).
pub(crate) fn frame_len<T: Message>(value: &T) -> Result<usize, Error> {
    match write_frame(value, &mut []) {
        Err(Error::DoesNotFit { needed, .. }) => Ok(needed),
        Err(e) => Err(e),
        // An empty buffer has no room for the trailer.
        Ok(n) => Ok(n + TRAILER_LEN),
    }
}

/// The archive in `frame` (a copy of the length is read once from the
/// trailer, then checked).
pub(crate) fn archive_of<T>(frame: &[u8]) -> Result<&[u8], Error> {
    let bad = |why| Error::BadFrame {
        type_name: type_name::<T>(),
        len: frame.len(),
        why,
    };
    let Some(room) = frame.len().checked_sub(TRAILER_LEN) else {
        return Err(bad("shorter than its trailer"));
    };
    let mut trailer = [0u8; TRAILER_LEN];
    trailer.copy_from_slice(&frame[room..]);
    if trailer[4..] != FRAME_TAG {
        return Err(bad("no frame tag"));
    }
    let n = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]) as usize;
    frame
        .get(..n)
        .filter(|_| n <= room)
        .ok_or_else(|| bad("archive length beyond the frame"))
}

/// Validates `archive` (exactly an rkyv archive, root at its end) as a
/// `T`, in place.
fn check<T: Message>(archive: &[u8]) -> Result<&T::Archived, Error> {
    rkyv::access::<T::Archived, rancor::Error>(archive).map_err(|source| Error::Invalid {
        type_name: type_name::<T>(),
        len: archive.len(),
        source,
    })
}

/// Whether `bytes` starts at an address aligned for rkyv.
pub(crate) fn aligned(bytes: &[u8]) -> bool {
    bytes.as_ptr().addr().is_multiple_of(ALIGN)
}

/// Validates the frame `frame` in place and reads it there: no copy. Only
/// for a [`TrustedPeer`] (see the [crate docs](crate)); a frame not aligned
/// to 16 bytes is [`Error::Misaligned`] (use [`access`], which copies it).
pub fn access_in_place<T: Message>(
    frame: &[u8],
    _trust: TrustedPeer,
) -> Result<&T::Archived, Error> {
    if !aligned(frame) {
        return Err(Error::Misaligned {
            type_name: type_name::<T>(),
        });
    }
    check::<T>(archive_of::<T>(frame)?)
}

/// Copies the frame's archive once into a private aligned buffer, then
/// validates and reads it there: sound whatever the peer does to `frame`
/// meanwhile.
pub fn access_copied<T: Message>(frame: &[u8]) -> Result<ArchivedBuf<T>, Error> {
    let archive = archive_of::<T>(frame)?;
    let mut copy = AlignedVec::<ALIGN>::with_capacity(archive.len());
    copy.extend_from_slice(archive);
    ArchivedBuf::new(copy)
}

/// Reads the frame `frame` in `mode`: in place if the mode allows it and
/// the frame is aligned, copied otherwise.
pub fn access<T: Message>(frame: &[u8], mode: ReadMode) -> Result<Access<'_, T>, Error> {
    match mode {
        ReadMode::InPlace(trust) if aligned(frame) => {
            access_in_place::<T>(frame, trust).map(Access::InPlace)
        }
        _ => access_copied::<T>(frame).map(Access::Copied),
    }
}

/// A validated archive in a private buffer: derefs to `T`'s archived type.
pub struct ArchivedBuf<T: Message> {
    yoke: Yoke<&'static T::Archived, Box<AlignedVec<ALIGN>>>,
}

impl<T: Message> ArchivedBuf<T> {
    /// Validates `archive` (exactly an rkyv archive, no frame) as a `T`.
    pub fn new(archive: AlignedVec<ALIGN>) -> Result<Self, Error> {
        Yoke::try_attach_to_cart(Box::new(archive), |bytes: &AlignedVec<ALIGN>| {
            check::<T>(bytes)
        })
        .map(|yoke| ArchivedBuf { yoke })
    }

    /// The archive's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.yoke.backing_cart()
    }
}

impl<T: Message> std::ops::Deref for ArchivedBuf<T> {
    type Target = T::Archived;
    fn deref(&self) -> &T::Archived {
        self.yoke.get()
    }
}

impl<T: Message> std::fmt::Debug for ArchivedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchivedBuf")
            .field("type", &type_name::<T>())
            .field("len", &self.bytes().len())
            .finish()
    }
}

/// A message read by [`access`]: in place (borrowing the frame) or copied.
/// Derefs to `T`'s archived type.
pub enum Access<'a, T: Message> {
    /// Validated where it lies.
    InPlace(&'a T::Archived),
    /// Validated in a private copy.
    Copied(ArchivedBuf<T>),
}

impl<T: Message> Access<'_, T> {
    /// Which path the message took.
    pub fn path(&self) -> ReadPath {
        match self {
            Access::InPlace(_) => ReadPath::InPlace,
            Access::Copied(_) => ReadPath::Copied,
        }
    }
}

impl<T: Message> std::ops::Deref for Access<'_, T> {
    type Target = T::Archived;
    fn deref(&self) -> &T::Archived {
        match self {
            Access::InPlace(archived) => archived,
            Access::Copied(buf) => buf,
        }
    }
}

impl<T: Message> std::fmt::Debug for Access<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("type", &type_name::<T>())
            .field("path", &self.path())
            .finish()
    }
}

/// The archived length of a method's or handler's recent messages, so the
/// next one is serialized straight into a loan of about the right size: it
/// follows a larger message at once and a smaller one slowly (by a
/// sixteenth per message).
#[derive(Debug, Default)]
pub struct SizeHint {
    archived: AtomicUsize,
}

impl SizeHint {
    /// The length a loan takes before anything was remembered.
    pub const FIRST: usize = 256;

    /// Nothing remembered yet.
    pub const fn new() -> Self {
        SizeHint {
            archived: AtomicUsize::new(0),
        }
    }

    /// The archived length remembered (0 before the first message).
    pub fn archived(&self) -> usize {
        // Relaxed: a hint; a stale value costs at most a retry.
        self.archived.load(Ordering::Relaxed)
    }

    /// Remembers a message of `archived` bytes.
    pub fn record(&self, archived: usize) {
        let old = self.archived();
        let new = archived.max(old - old / 16);
        if new != old {
            self.archived.store(new, Ordering::Relaxed);
        }
    }

    /// The frame length to loan for the next message: the remembered
    /// archive and the trailer, plus an eighth of headroom that never
    /// carries the loan past the next power of two (shmesh's slab sizes),
    /// so a message of stable size keeps its slab class.
    pub fn loan_len(&self) -> usize {
        match self.archived() {
            0 => Self::FIRST,
            n => {
                let exact = n.saturating_add(TRAILER_LEN);
                let class = exact.checked_next_power_of_two().unwrap_or(exact);
                exact.saturating_add(n / 8).min(class)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rkyv::{Archive, Serialize};

    #[derive(Archive, Serialize, Debug, Clone, PartialEq)]
    struct Level {
        price: i64,
        quantity: u64,
    }

    #[derive(Archive, Serialize, Debug, Clone, PartialEq)]
    struct Book {
        symbol: String,
        bids: Vec<Level>,
        notes: Vec<String>,
    }

    fn book(levels: usize) -> Book {
        Book {
            symbol: "ACME-2026".into(),
            bids: (0..levels)
                .map(|i| Level {
                    price: 100 - i as i64,
                    quantity: i as u64 * 10,
                })
                .collect(),
            notes: vec!["first".into(), "a longer note than inline".into()],
        }
    }

    fn framed(value: &Book, len: usize) -> AlignedVec<ALIGN> {
        let mut buf = AlignedVec::<ALIGN>::new();
        buf.resize(len, 0xAA);
        write_frame(value, &mut buf).unwrap();
        buf
    }

    fn same(archived: &ArchivedBook, book: &Book) {
        assert_eq!(archived.symbol.as_str(), book.symbol);
        assert_eq!(archived.bids.len(), book.bids.len());
        for (a, b) in archived.bids.iter().zip(&book.bids) {
            assert_eq!(a.price.to_native(), b.price);
            assert_eq!(a.quantity.to_native(), b.quantity);
        }
        let notes: Vec<&str> = archived.notes.iter().map(|n| n.as_str()).collect();
        assert_eq!(notes, book.notes);
    }

    #[test]
    fn frames_round_trip_in_both_modes() {
        let book = book(5);
        let needed = frame_len(&book).unwrap();
        let buf = framed(&book, needed + 40);
        let copied = access::<Book>(&buf, ReadMode::Copied).unwrap();
        assert_eq!(copied.path(), ReadPath::Copied);
        same(&copied, &book);
        let trust = TrustedPeer::assume_trusted();
        let in_place = access::<Book>(&buf, ReadMode::InPlace(trust)).unwrap();
        assert_eq!(in_place.path(), ReadPath::InPlace);
        same(&in_place, &book);
        same(access_in_place::<Book>(&buf, trust).unwrap(), &book);
    }

    #[test]
    fn a_short_buffer_reports_the_exact_length_needed() {
        let book = book(40);
        let needed = frame_len(&book).unwrap();
        let mut small = vec![0u8; needed - 1];
        match write_frame(&book, &mut small) {
            Err(Error::DoesNotFit { needed: n, len, .. }) => {
                assert_eq!((n, len), (needed, needed - 1));
            }
            other => panic!("{other:?}"),
        }
        // Exactly the length needed fits, with no slack.
        let buf = framed(&book, needed);
        same(&access::<Book>(&buf, ReadMode::Copied).unwrap(), &book);
    }

    #[test]
    fn misaligned_frames_are_copied_or_refused_never_read_in_place() {
        let book = book(3);
        let needed = frame_len(&book).unwrap();
        let mut buf = AlignedVec::<ALIGN>::new();
        buf.resize(needed + 1, 0);
        write_frame(&book, &mut buf[1..]).unwrap();
        let shifted = &buf[1..];
        let trust = TrustedPeer::assume_trusted();
        let read = access::<Book>(shifted, ReadMode::InPlace(trust)).unwrap();
        assert_eq!(read.path(), ReadPath::Copied);
        same(&read, &book);
        assert!(matches!(
            access_in_place::<Book>(shifted, trust),
            Err(Error::Misaligned { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error_naming_the_type() {
        let trust = TrustedPeer::assume_trusted();
        let mut buf = AlignedVec::<ALIGN>::new();
        // Too short, no tag, a length beyond the frame, then garbage with a
        // well-formed trailer.
        for (bytes, why) in [
            (&[1u8, 2, 3][..], "shorter"),
            (&[0u8; 64][..], "tag"),
            (&[0xff, 0xff, 0, 0, b's', b'h', b'r', b'k'][..], "beyond"),
        ] {
            buf.clear();
            buf.extend_from_slice(bytes);
            let e = access::<Book>(&buf, ReadMode::Copied).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
            assert!(e.to_string().contains("Book"), "{e}");
        }
        let mut garbage = vec![0xA5u8; 56];
        garbage.extend_from_slice(&56u32.to_le_bytes());
        garbage.extend_from_slice(&FRAME_TAG);
        buf.clear();
        buf.extend_from_slice(&garbage);
        for mode in [ReadMode::Copied, ReadMode::InPlace(trust)] {
            let e = access::<Book>(&buf, mode).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{e}");
            let status = shmesh::status::Status::from(e);
            assert_eq!(status.code(), shmesh::status::Code::Internal);
            assert!(status.message().contains("Book"), "{status}");
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_fails_cleanly_or_reads_valid_data() {
        let book = book(4);
        let buf = framed(&book, frame_len(&book).unwrap());
        let trust = TrustedPeer::assume_trusted();
        let mut copy = AlignedVec::<ALIGN>::new();
        for i in 0..buf.len() {
            for bit in 0..8 {
                copy.clear();
                copy.extend_from_slice(&buf);
                copy[i] ^= 1 << bit;
                // Either an error or a view whose every field can be read.
                if let Ok(read) = access::<Book>(&copy, ReadMode::InPlace(trust)) {
                    let _ = read.symbol.len();
                    let _: u64 = read.bids.iter().map(|l| l.quantity.to_native()).sum();
                    let _: usize = read.notes.iter().map(|n| n.len()).sum();
                }
            }
        }
        for len in 0..buf.len() {
            copy.clear();
            copy.extend_from_slice(&buf[..len]);
            assert!(access::<Book>(&copy, ReadMode::Copied).is_err());
        }
    }

    #[test]
    fn size_hints_grow_at_once_and_shrink_slowly() {
        let hint = SizeHint::new();
        assert_eq!(hint.loan_len(), SizeHint::FIRST);
        hint.record(1000);
        assert_eq!(hint.archived(), 1000);
        assert!(hint.loan_len() >= 1000 + TRAILER_LEN);
        assert!(hint.loan_len() <= 1024);
        hint.record(100);
        assert_eq!(hint.archived(), 1000 - 1000 / 16);
        // A frame of exactly a power of two loans exactly that.
        hint.record(4096 - TRAILER_LEN);
        assert_eq!(hint.loan_len(), 4096);
        hint.record(5000);
        assert_eq!(hint.archived(), 5000);
    }
}
