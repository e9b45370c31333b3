//! Fuzzes `shmesh_rkyv::access` and `access_copied` for the market-data
//! example's `OrderBook`: how a message a peer wrote into shared memory is
//! framed, checked and validated (bytecheck) before anything reads it.
//!
//! Input (via `arbitrary`): where the frame starts relative to a 16-byte
//! boundary, and either raw bytes, bytes framed with a well-formed trailer
//! (so the archive validator sees them), or a valid book's frame with bytes
//! XORed into it (so validation gets deep before it fails).
//!
//! Properties checked:
//!
//! - nothing panics, whatever the bytes and their alignment;
//! - the copied and the in-place (trusted) reads agree on accepting;
//! - an accepted book can be read in full (every string, level and trade),
//!   deserializes, and serializes again into a frame that reads back as
//!   the same book.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rkyv::util::AlignedVec;
use shmesh_example_marketdata::{ArchivedOrderBook, OrderBook, same_book, sample_book};
use shmesh_rkyv::{Error, FRAME_TAG, ReadMode, TrustedPeer, access, access_copied, write_frame};

#[derive(Debug, Arbitrary)]
enum Kind {
    Raw,
    Framed,
    Mutated { depth: u8, at: u16 },
}

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    shift: u8,
    kind: Kind,
    bytes: &'a [u8],
}

fn frame_of(book: &OrderBook) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    match write_frame(book, &mut buf) {
        Ok(_) => buf,
        Err(Error::DoesNotFit { needed, .. }) => {
            buf.resize(needed, 0);
            write_frame(book, &mut buf).expect("an exact buffer fits");
            buf
        }
        Err(e) => panic!("a book does not serialize: {e}"),
    }
}

fn read_all(book: &ArchivedOrderBook) -> u64 {
    let mut sum = (book.venue.len() as u64)
        .wrapping_add(book.symbol.len() as u64)
        .wrapping_add(book.sequence.to_native());
    for level in book.bids.iter().chain(book.asks.iter()) {
        sum = sum
            .wrapping_add(level.price.to_native() as u64)
            .wrapping_add(level.quantity.to_native())
            .wrapping_add(u64::from(level.orders.to_native()));
    }
    for trade in book.trades.iter() {
        sum = sum.wrapping_add(trade.quantity.to_native());
        for condition in trade.conditions.iter() {
            for &b in condition.as_bytes() {
                sum = sum.wrapping_add(u64::from(b));
            }
        }
    }
    sum
}

fuzz_target!(|input: Input<'_>| {
    let frame = match input.kind {
        Kind::Raw => input.bytes.to_vec(),
        Kind::Framed => {
            let mut frame = input.bytes.to_vec();
            frame.extend_from_slice(&(input.bytes.len() as u32).to_le_bytes());
            frame.extend_from_slice(&FRAME_TAG);
            frame
        }
        Kind::Mutated { depth, at } => {
            let mut frame = frame_of(&sample_book("XFUZ", "FUZZ", 1, usize::from(depth % 32)));
            let len = frame.len();
            for (i, b) in input.bytes.iter().enumerate() {
                frame[(usize::from(at) + i) % len] ^= b;
            }
            frame
        }
    };
    let shift = usize::from(input.shift % 16);
    let mut buf = AlignedVec::<16>::with_capacity(shift + frame.len());
    buf.resize(shift, 0);
    buf.extend_from_slice(&frame);
    let frame = &buf[shift..];

    let copied = access_copied::<OrderBook>(frame);
    let in_place = access::<OrderBook>(frame, ReadMode::InPlace(TrustedPeer::assume_trusted()));
    assert_eq!(copied.is_ok(), in_place.is_ok(), "the two reads disagree");
    let (Ok(copied), Ok(in_place)) = (copied, in_place) else {
        return;
    };
    assert_eq!(read_all(&copied), read_all(&in_place));
    let owned: OrderBook = rkyv::deserialize::<OrderBook, rkyv::rancor::Error>(&*copied)
        .expect("a validated book deserializes");
    assert!(same_book(&copied, &owned));
    let again = frame_of(&owned);
    let reread = access_copied::<OrderBook>(&again).expect("a re-serialized book validates");
    assert!(same_book(&reread, &owned));
});
