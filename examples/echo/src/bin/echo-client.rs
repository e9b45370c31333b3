//! An echo client: `echo-client shm://@echo --calls 1000 --size 64`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use shmesh::client::{Channel, ChannelOptions};
use shmesh_example_echo::{ECHO, SCHEMA, SERVICE};

#[derive(Debug, Parser)]
#[command(about = "Call the echo service over shared memory")]
struct Args {
    /// The server's address: shm:///path/to.sock or shm://@abstract-name.
    address: String,
    /// Calls to make (0: forever).
    #[arg(long, default_value_t = 1000)]
    calls: u64,
    /// Request size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Per-call timeout in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let channel = Channel::connect(&args.address, &ChannelOptions::new(SERVICE, SCHEMA))
        .with_context(|| format!("cannot connect to {}", args.address))?;
    let request: Vec<u8> = (0..args.size).map(|i| i as u8).collect();
    let start = Instant::now();
    let mut done = 0u64;
    while args.calls == 0 || done < args.calls {
        let response =
            channel.call(ECHO, &request, Some(Duration::from_millis(args.timeout_ms)))?;
        if response[..] != request[..] {
            bail!("call {done}: the echo differs from the request");
        }
        done += 1;
    }
    let elapsed = start.elapsed();
    println!(
        "{done} calls of {} bytes in {:.3} s: {:.2} µs per call",
        args.size,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / done.max(1) as f64
    );
    Ok(())
}
