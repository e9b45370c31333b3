//! The market-data client: publishes a few books, then asks for a snapshot.
//!
//! `marketdata-client [--address A] [--depth N] [--copy] SYMBOL...`

use anyhow::{Context, Result};
use clap::Parser;
use shmesh::client::{Channel, ChannelOptions};
use shmesh_example_marketdata::{
    DEFAULT_ADDRESS, PUBLISH, SCHEMA, SERVICE, SNAPSHOT, SnapshotRequest, same_book, sample_book,
};
use shmesh_rkyv::{Client, ReadMode};

#[derive(Debug, Parser)]
#[command(about = "Publish order books to a marketdata server and read a snapshot back")]
struct Args {
    /// The server's address: shm:///path/to.sock or shm://@abstract-name.
    #[arg(long, default_value = DEFAULT_ADDRESS)]
    address: String,
    /// Levels per side of each book.
    #[arg(long, default_value_t = 10)]
    depth: usize,
    /// Copy responses before reading them, even from a server of this user.
    #[arg(long)]
    copy: bool,
    /// The symbols to publish (a snapshot also asks for "NONE").
    #[arg(default_values = ["ACME", "INITECH"])]
    symbols: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let channel = Channel::connect(&args.address, &ChannelOptions::new(SERVICE, SCHEMA))
        .with_context(|| format!("cannot connect to {}", args.address))?;
    let client = if args.copy {
        Client::new(channel, ReadMode::Copied)
    } else {
        Client::trusting_same_user(channel)
    };
    for (i, symbol) in args.symbols.iter().enumerate() {
        let book = sample_book("XSHM", symbol, i as u64 + 1, args.depth);
        let ack = client.call(&PUBLISH, &book, None)?;
        println!(
            "published {symbol} #{}: {} levels, spread {:?}, traded {}, read {} by the server, ack read {:?}",
            ack.sequence,
            ack.levels,
            ack.spread.as_ref().map(|s| s.to_native()),
            ack.traded,
            if ack.read_in_place {
                "in place"
            } else {
                "copied"
            },
            ack.path(),
        );
    }
    let mut symbols = args.symbols.clone();
    symbols.push("NONE".to_owned());
    let snapshot = client.call(&SNAPSHOT, &SnapshotRequest { symbols, depth: 5 }, None)?;
    for (i, book) in snapshot.books.iter().enumerate() {
        let mut expected = sample_book("XSHM", book.symbol.as_str(), i as u64 + 1, args.depth);
        expected.bids.truncate(5);
        expected.asks.truncate(5);
        anyhow::ensure!(
            same_book(book, &expected),
            "the snapshot of {} differs from what was published",
            book.symbol
        );
        println!(
            "snapshot {} #{}: best bid {:?}, best ask {:?}",
            book.symbol,
            book.sequence,
            book.bids.first().map(|l| l.price.to_native()),
            book.asks.first().map(|l| l.price.to_native()),
        );
    }
    let missing: Vec<&str> = snapshot.missing.iter().map(|s| s.as_str()).collect();
    println!(
        "snapshot: {} books, missing {missing:?}, read {} by the server, read {:?} here",
        snapshot.books.len(),
        if snapshot.read_in_place {
            "in place"
        } else {
            "copied"
        },
        snapshot.path(),
    );
    Ok(())
}
