//! An echo server: `echo-server shm://@echo` (or `shm:///path/echo.sock`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use shmesh::server::{Router, Server};
use shmesh::status::Status;
use shmesh_example_echo::{ECHO, ECHO_STREAM, SCHEMA, SERVICE, SLEEP, SLOW_SUM, STATS};

#[derive(Debug, Parser)]
#[command(about = "Serve the echo service over shared memory")]
struct Args {
    /// Where to listen: shm:///path/to.sock or shm://@abstract-name.
    address: String,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let live = Arc::new(AtomicU64::new(0));
    let stats = live.clone();
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route(STATS, move |_| {
            Ok(stats.load(Ordering::Acquire).to_le_bytes().to_vec())
        })
        .route(SLEEP, |r| {
            let ms: [u8; 8] = r
                .payload
                .try_into()
                .map_err(|_| Status::invalid_argument("SLEEP takes 8 little-endian bytes"))?;
            std::thread::sleep(Duration::from_millis(u64::from_le_bytes(ms)));
            Ok(Vec::new())
        })
        .route_stream(ECHO_STREAM, |call| {
            while let Some(message) = call.recv()? {
                call.send(&message)?;
            }
            Ok(())
        })
        .route_stream(SLOW_SUM, |call| {
            std::thread::sleep(Duration::from_millis(100));
            let mut total = 0u64;
            while let Some(message) = call.recv()? {
                total += message.len() as u64;
            }
            call.send(&total.to_le_bytes())
        });
    let server = Server::bind(&args.address, SERVICE, SCHEMA, router)
        .with_context(|| format!("cannot serve at {}", args.address))?;
    let counter = server.live_counter();
    std::thread::spawn(move || {
        loop {
            live.store(counter.load(Ordering::Acquire), Ordering::Release);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    eprintln!("echo-server: serving {SERVICE} at {}", args.address);
    server.serve();
    Ok(())
}
