//! The structured-message peers, `shmesh-rkyv` and `shmesh-prost`: the same
//! order book (two short strings, a sequence number, a vector of price
//! levels) sent as an rkyv archive read in place (`shmesh-rkyv`) or as a
//! protobuf message encoded with prost (`shmesh-prost`), over the same
//! shmesh connection as `shmesh-poll`.
//!
//! Per payload size, the book gets as many levels as fit: its serialized
//! form (the rkyv frame, trailer included, or the protobuf encoding) is the
//! largest not above the size. The server reads every field of the request
//! (in place and trusted for rkyv: both processes run as the same user;
//! decoded into owned values for prost), checks it against the book it
//! expects, and answers with that book, serialized straight into its reply
//! slab; the client reads every field of the answer and checks it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rkyv::{Archive, Serialize};
use shmesh::server::Router;
use shmesh::status::Status;
use shmesh_rkyv::{Error as RkyvError, Method, RouterExt, TrustPolicy};

/// The rkyv method.
pub const RKYV: u32 = 2;
/// The prost method.
pub const PROST: u32 = 3;

/// The rkyv method, typed.
pub static BOOK: Method<Book, Book> = Method::new(RKYV);

/// One price level.
#[derive(Archive, Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Level {
    /// Price in ticks.
    pub price: i64,
    /// Quantity at the price.
    pub quantity: u64,
    /// Orders at the price.
    pub orders: u32,
    /// Condition flags.
    pub flags: u32,
}

/// The benchmark's order book.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct Book {
    /// Venue name (short: inline in the archive).
    pub venue: String,
    /// Instrument (short: inline in the archive).
    pub symbol: String,
    /// Sequence number.
    pub sequence: u64,
    /// Price levels.
    pub levels: Vec<Level>,
}

/// [`Level`] as a protobuf message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProstLevel {
    /// Price in ticks.
    #[prost(sint64, tag = "1")]
    pub price: i64,
    /// Quantity at the price.
    #[prost(uint64, tag = "2")]
    pub quantity: u64,
    /// Orders at the price.
    #[prost(uint32, tag = "3")]
    pub orders: u32,
    /// Condition flags.
    #[prost(uint32, tag = "4")]
    pub flags: u32,
}

/// [`Book`] as a protobuf message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProstBook {
    /// Venue name.
    #[prost(string, tag = "1")]
    pub venue: String,
    /// Instrument.
    #[prost(string, tag = "2")]
    pub symbol: String,
    /// Sequence number.
    #[prost(uint64, tag = "3")]
    pub sequence: u64,
    /// Price levels.
    #[prost(message, repeated, tag = "4")]
    pub levels: Vec<ProstLevel>,
}

fn level(i: usize) -> Level {
    Level {
        price: 1_000_000 - 25 * i as i64,
        quantity: 100 + (i as u64 * 37) % 1000,
        orders: 1 + (i as u32 % 9),
        flags: i as u32 % 4,
    }
}

/// The book with `levels` levels.
pub fn book(levels: usize) -> Book {
    Book {
        venue: "XSHM".into(),
        symbol: "ACME".into(),
        sequence: levels as u64,
        levels: (0..levels).map(level).collect(),
    }
}

/// The same book as a protobuf message.
pub fn prost_book(levels: usize) -> ProstBook {
    ProstBook {
        venue: "XSHM".into(),
        symbol: "ACME".into(),
        sequence: levels as u64,
        levels: (0..levels)
            .map(level)
            .map(|l| ProstLevel {
                price: l.price,
                quantity: l.quantity,
                orders: l.orders,
                flags: l.flags,
            })
            .collect(),
    }
}

/// The length of `book(levels)`'s rkyv frame.
pub fn rkyv_len(levels: usize) -> usize {
    let book = book(levels);
    let mut buf = vec![0u8; 64];
    match shmesh_rkyv::write_frame(&book, &mut buf) {
        Ok(n) => n + shmesh_rkyv::TRAILER_LEN,
        Err(RkyvError::DoesNotFit { needed, .. }) => needed,
        Err(_) => usize::MAX,
    }
}

/// The length of `prost_book(levels)`'s encoding.
pub fn prost_len(levels: usize) -> usize {
    prost::Message::encoded_len(&prost_book(levels))
}

/// The most levels whose serialized length (by `len`) is at most `size`;
/// `None` if not even an empty book fits.
pub fn levels_for(size: usize, len: impl Fn(usize) -> usize) -> Option<usize> {
    if len(0) > size {
        return None;
    }
    // A level takes at least a few bytes in either encoding.
    let (mut fits, mut too_many) = (0, size / 4 + 2);
    while too_many - fits > 1 {
        let mid = fits + (too_many - fits) / 2;
        if len(mid) <= size {
            fits = mid;
        } else {
            too_many = mid;
        }
    }
    Some(fits)
}

/// Whether an archived book is `book`, every field read.
pub fn same(archived: &ArchivedBook, book: &Book) -> bool {
    archived.venue.as_str() == book.venue
        && archived.symbol.as_str() == book.symbol
        && archived.sequence.to_native() == book.sequence
        && archived.levels.len() == book.levels.len()
        && archived.levels.iter().zip(&book.levels).all(|(a, b)| {
            a.price.to_native() == b.price
                && a.quantity.to_native() == b.quantity
                && a.orders.to_native() == b.orders
                && a.flags.to_native() == b.flags
        })
}

/// The books a server answers with, built once per level count.
struct Books<T> {
    by_levels: Mutex<HashMap<usize, Arc<T>>>,
}

impl<T> Books<T> {
    fn new() -> Self {
        Books {
            by_levels: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, levels: usize, make: impl FnOnce(usize) -> T) -> Arc<T> {
        let mut books = self.by_levels.lock().unwrap_or_else(|e| e.into_inner());
        books
            .entry(levels)
            .or_insert_with(|| Arc::new(make(levels)))
            .clone()
    }
}

/// Adds the rkyv and prost methods to the benchmark server's router.
pub fn routes(router: Router) -> Router {
    let rkyv_books = Books::<Book>::new();
    let prost_books = Books::<ProstBook>::new();
    router
        .route_archived(&BOOK, TrustPolicy::SameUser, move |request, _call| {
            let expected = rkyv_books.get(request.levels.len(), book);
            if !same(request, &expected) {
                return Err(Status::invalid_argument("not the book expected"));
            }
            Ok(expected)
        })
        .route_in_place(PROST, move |request, reply| {
            let decoded: ProstBook = prost::Message::decode(request.payload)
                .map_err(|e| Status::internal(format!("cannot decode a ProstBook: {e}")))?;
            let expected = prost_books.get(decoded.levels.len(), prost_book);
            if decoded != *expected {
                return Err(Status::invalid_argument("not the book expected"));
            }
            let len = prost::Message::encoded_len(&*expected);
            let mut out = reply.loan(len)?;
            prost::Message::encode(&*expected, &mut out)
                .map_err(|e| Status::internal(format!("cannot encode a ProstBook: {e}")))?;
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn books_fill_their_size_class() {
        for size in [64, 256, 4096, 65536, 1 << 20] {
            for len in [rkyv_len as fn(usize) -> usize, prost_len] {
                let Some(levels) = levels_for(size, len) else {
                    panic!("no book fits {size} B");
                };
                assert!(len(levels) <= size);
                assert!(len(levels + 1) > size);
                // Within one level of the size.
                assert!(size - len(levels) <= 32, "{size}: {}", len(levels));
            }
        }
        assert_eq!(levels_for(8, rkyv_len), None);
    }
}
