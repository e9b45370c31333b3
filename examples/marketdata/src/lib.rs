//! A market-data service over shmesh whose messages are rkyv archives, read
//! where they lie with no deserialization: publishers send order books,
//! readers ask for snapshots.
//!
//! - [`PUBLISH`]: an [`OrderBook`] in, a [`PublishAck`] out. Served on the
//!   connection's thread ([`shmesh_rkyv::RouterExt::route_archived`]): the
//!   handler checks and summarizes the book straight from its archived
//!   form, and keeps its own copy (the one deserialization, because a store
//!   must own what it keeps).
//! - [`SNAPSHOT`]: a [`SnapshotRequest`] in, a [`Snapshot`] out, served by
//!   an async handler ([`shmesh_rkyv::RouterExt::route_archived_async`]).
//!
//! Both report whether the server read the request in place or from a
//! private copy, which the [`TrustPolicy`] the server was started with
//! decides per caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rkyv::{Archive, Deserialize, Serialize};
use shmesh::SchemaHash;
use shmesh::server::Router;
use shmesh::status::Status;
use shmesh_rkyv::{Method, ReadPath, RouterExt, TrustPolicy};

/// The service name both sides use.
pub const SERVICE: &str = "marketdata";
/// The schema hash both sides use.
pub const SCHEMA: SchemaHash = SchemaHash(*b"shmesh-example-marketdata-rkyv-1");
/// Where the binaries meet by default.
pub const DEFAULT_ADDRESS: &str = "shm://@shmesh-marketdata";

/// Publishes an order book; the answer summarizes it.
pub static PUBLISH: Method<OrderBook, PublishAck> = Method::new(1);
/// Asks for the latest books of some symbols.
pub static SNAPSHOT: Method<SnapshotRequest, Snapshot> = Method::new(2);

/// The side of a trade's aggressor.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A buyer lifted an offer.
    Buy,
    /// A seller hit a bid.
    Sell,
}

/// One price level of a book.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// Price in ticks.
    pub price: i64,
    /// Quantity resting at the price.
    pub quantity: u64,
    /// Orders making up the quantity.
    pub orders: u32,
}

/// A trade printed since the last book.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Trade {
    /// Price in ticks.
    pub price: i64,
    /// Quantity traded.
    pub quantity: u64,
    /// Who crossed the spread.
    pub aggressor: Side,
    /// Condition codes ("odd-lot", "auction", …).
    pub conditions: Vec<String>,
}

/// An order book as a venue publishes it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OrderBook {
    /// The venue's name.
    pub venue: String,
    /// The instrument.
    pub symbol: String,
    /// Publication sequence number.
    pub sequence: u64,
    /// Bids, best (highest) first.
    pub bids: Vec<Level>,
    /// Asks, best (lowest) first.
    pub asks: Vec<Level>,
    /// Trades since the previous book.
    pub trades: Vec<Trade>,
}

/// The answer to [`PUBLISH`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PublishAck {
    /// The book's sequence number.
    pub sequence: u64,
    /// Levels on both sides.
    pub levels: u32,
    /// Best ask minus best bid, if both sides have a level.
    pub spread: Option<i64>,
    /// Quantity traded in the book's trades.
    pub traded: u64,
    /// Whether the server read the book in place (else from a copy).
    pub read_in_place: bool,
}

/// The request of [`SNAPSHOT`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The symbols wanted.
    pub symbols: Vec<String>,
    /// Levels per side at most.
    pub depth: u32,
}

/// The answer to [`SNAPSHOT`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The latest book of each symbol asked for that has one, cut to the
    /// depth asked for.
    pub books: Vec<OrderBook>,
    /// The symbols asked for that have none.
    pub missing: Vec<String>,
    /// Whether the server read the request in place (else from a copy).
    pub read_in_place: bool,
}

/// The latest book of each symbol.
#[derive(Debug, Default)]
pub struct Market {
    books: Mutex<HashMap<String, OrderBook>>,
}

impl Market {
    /// Symbols with a book.
    pub fn symbols(&self) -> Vec<String> {
        let mut symbols: Vec<String> = self.lock().keys().cloned().collect();
        symbols.sort();
        symbols
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, OrderBook>> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Checks a book read in place and sums it up.
fn summarize(book: &ArchivedOrderBook) -> Result<(u32, Option<i64>, u64), Status> {
    if book.symbol.is_empty() {
        return Err(Status::invalid_argument("a book needs a symbol"));
    }
    let descending = book
        .bids
        .windows(2)
        .all(|w| w[0].price.to_native() > w[1].price.to_native());
    let ascending = book
        .asks
        .windows(2)
        .all(|w| w[0].price.to_native() < w[1].price.to_native());
    if !descending || !ascending {
        return Err(Status::invalid_argument(format!(
            "{}: bids must fall and asks rise, level by level",
            book.symbol
        )));
    }
    let levels = u32::try_from(book.bids.len() + book.asks.len())
        .map_err(|_| Status::invalid_argument("too many levels"))?;
    let spread = match (book.bids.first(), book.asks.first()) {
        (Some(bid), Some(ask)) => Some(ask.price.to_native() - bid.price.to_native()),
        _ => None,
    };
    let traded = book.trades.iter().map(|t| t.quantity.to_native()).sum();
    Ok((levels, spread, traded))
}

/// The service's handlers over `market`, reading requests as `policy`
/// says.
pub fn router(market: Arc<Market>, policy: TrustPolicy) -> Router {
    let publish_market = market.clone();
    Router::new()
        .route_archived(&PUBLISH, policy, move |book, _call| {
            let (levels, spread, traded) = summarize(book)?;
            // A store keeps its own copy: the one deserialization.
            let owned: OrderBook = rkyv::deserialize::<OrderBook, rkyv::rancor::Error>(&**book)
                .map_err(|e| Status::internal(format!("cannot copy the book: {e}")))?;
            let sequence = owned.sequence;
            publish_market.lock().insert(owned.symbol.clone(), owned);
            Ok(PublishAck {
                sequence,
                levels,
                spread,
                traded,
                read_in_place: book.path() == ReadPath::InPlace,
            })
        })
        .route_archived_async(&SNAPSHOT, policy, move |request| {
            let market = market.clone();
            async move {
                let depth = request.depth.to_native() as usize;
                let mut books = Vec::new();
                let mut missing = Vec::new();
                {
                    let stored = market.lock();
                    for symbol in request.symbols.iter() {
                        match stored.get(symbol.as_str()) {
                            Some(book) => {
                                let mut book = book.clone();
                                book.bids.truncate(depth);
                                book.asks.truncate(depth);
                                books.push(book);
                            }
                            None => missing.push(symbol.to_string()),
                        }
                    }
                }
                Ok(Snapshot {
                    books,
                    missing,
                    read_in_place: request.path() == ReadPath::InPlace,
                })
            }
        })
}

/// A plausible book for `symbol`: `depth` levels a side around a mid price
/// of 10 000 ticks, and a few trades.
pub fn sample_book(venue: &str, symbol: &str, sequence: u64, depth: usize) -> OrderBook {
    let level = |i: usize, sign: i64| Level {
        price: 10_000 + sign * (1 + i as i64),
        quantity: 100 * (1 + i as u64 % 7),
        orders: 1 + (i as u32 % 5),
    };
    OrderBook {
        venue: venue.to_owned(),
        symbol: symbol.to_owned(),
        sequence,
        bids: (0..depth).map(|i| level(i, -1)).collect(),
        asks: (0..depth).map(|i| level(i, 1)).collect(),
        trades: (0..3)
            .map(|i| Trade {
                price: 10_000 + i,
                quantity: 10 * (1 + i as u64),
                aggressor: if i % 2 == 0 { Side::Buy } else { Side::Sell },
                conditions: if i == 0 {
                    vec!["opening-auction".to_owned()]
                } else {
                    Vec::new()
                },
            })
            .collect(),
    }
}

/// Checks an archived book against the book it should be.
pub fn same_book(archived: &ArchivedOrderBook, book: &OrderBook) -> bool {
    let same_levels = |a: &rkyv::vec::ArchivedVec<ArchivedLevel>, b: &[Level]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(a, b)| {
                a.price.to_native() == b.price
                    && a.quantity.to_native() == b.quantity
                    && a.orders.to_native() == b.orders
            })
    };
    archived.venue.as_str() == book.venue
        && archived.symbol.as_str() == book.symbol
        && archived.sequence.to_native() == book.sequence
        && same_levels(&archived.bids, &book.bids)
        && same_levels(&archived.asks, &book.asks)
        && archived.trades.len() == book.trades.len()
        && archived.trades.iter().zip(&book.trades).all(|(a, b)| {
            a.price.to_native() == b.price
                && a.quantity.to_native() == b.quantity
                && matches!(
                    (&a.aggressor, b.aggressor),
                    (ArchivedSide::Buy, Side::Buy) | (ArchivedSide::Sell, Side::Sell)
                )
                && a.conditions
                    .iter()
                    .map(|c| c.as_str())
                    .eq(b.conditions.iter())
        })
}
