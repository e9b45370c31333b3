//! An echo client: `echo-client shm://@echo --calls 1000 --size 64`
//! (unary calls), or with `--stream`, the same messages on one
//! bidirectional stream.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use shmesh::client::{Channel, ChannelOptions};
use shmesh_example_echo::{ECHO, ECHO_STREAM, SCHEMA, SERVICE};

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
    /// Per-call timeout in milliseconds (with `--stream`: for the stream).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Send the messages on one bidirectional stream instead of as unary
    /// calls.
    #[arg(long)]
    stream: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let channel = Channel::connect(&args.address, &ChannelOptions::new(SERVICE, SCHEMA))
        .with_context(|| format!("cannot connect to {}", args.address))?;
    let request: Vec<u8> = (0..args.size).map(|i| i as u8).collect();
    let timeout = Some(Duration::from_millis(args.timeout_ms));
    let start = Instant::now();
    let mut done = 0u64;
    if args.stream {
        let mut call = channel.open(ECHO_STREAM, timeout)?;
        while args.calls == 0 || done < args.calls {
            call.send(&request)?;
            let Some(response) = call.recv()? else {
                bail!("message {done}: the server ended the stream");
            };
            if response[..] != request[..] {
                bail!("message {done}: the echo differs from the request");
            }
            done += 1;
        }
        call.close_send()?;
        if call.recv()?.is_some() {
            bail!("the server sent more messages than it was sent");
        }
    } else {
        while args.calls == 0 || done < args.calls {
            let response = channel.call(ECHO, &request, timeout)?;
            if response[..] != request[..] {
                bail!("call {done}: the echo differs from the request");
            }
            done += 1;
        }
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
