//! The market-data server: `marketdata-server [--trust copy|same-user] [ADDRESS]`.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use shmesh::server::Server;
use shmesh_example_marketdata::{DEFAULT_ADDRESS, Market, SCHEMA, SERVICE, router};
use shmesh_rkyv::TrustPolicy;

/// How the server reads its clients' requests.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Trust {
    /// Copy every request before reading it (sound against any client).
    Copy,
    /// Read in place the requests of clients running as this user or root.
    SameUser,
}

#[derive(Debug, Parser)]
#[command(about = "Serve order books over shared memory, read in place with rkyv")]
struct Args {
    /// Where to listen: shm:///path/to.sock or shm://@abstract-name.
    #[arg(default_value = DEFAULT_ADDRESS)]
    address: String,
    /// How to read requests.
    #[arg(long, value_enum, default_value = "same-user")]
    trust: Trust,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let policy = match args.trust {
        Trust::Copy => TrustPolicy::CopyAll,
        Trust::SameUser => TrustPolicy::SameUser,
    };
    let market = Arc::new(Market::default());
    let server = Server::bind(&args.address, SERVICE, SCHEMA, router(market, policy))
        .with_context(|| format!("cannot serve at {}", args.address))?;
    eprintln!(
        "marketdata-server: serving {SERVICE} at {} ({:?})",
        args.address, args.trust
    );
    server.serve();
    Ok(())
}
