//! The greeter client: `greeter-client [--address A] [--times N] NAME`
//! says hello once, then asks for N more greetings on a stream.
//!
//! With `--bench CALLS`, it times instead: `CALLS` unary greetings of a
//! name `--name-len` bytes long (so a reply a few bytes longer), one at a
//! time, then one stream of as many greetings as the server allows, and
//! prints the round trip's median and 99th percentile and the stream's
//! throughput.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use shmesh_example_greeter::helloworld::HelloRequest;
use shmesh_example_greeter::helloworld::greeter_client::GreeterClient;
use shmesh_example_greeter::{DEFAULT_ADDRESS, MAX_TIMES};

#[derive(Debug, Parser)]
#[command(about = "Greet through a helloworld.Greeter server over shared memory")]
struct Args {
    /// The server's address: shm:///path/to.sock or shm://@abstract-name,
    /// or http://host:port for its gRPC front-end.
    #[arg(long, default_value = DEFAULT_ADDRESS)]
    address: String,
    /// How many greetings to ask for on a stream after the first.
    #[arg(long, default_value_t = 3)]
    times: u32,
    /// Time this many unary greetings (and one stream) instead of greeting.
    #[arg(long)]
    bench: Option<u32>,
    /// With `--bench`: the length of the name sent (the reply is 7 bytes
    /// longer).
    #[arg(long, default_value_t = 65_000)]
    name_len: usize,
    /// Who to greet.
    #[arg(default_value = "world")]
    name: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = GreeterClient::connect(&args.address)
        .await
        .with_context(|| format!("cannot connect to {}", args.address))?;
    if let Some(calls) = args.bench {
        return bench(&client, calls, args.name_len).await;
    }
    let request = HelloRequest {
        name: args.name,
        times: args.times,
    };
    let reply = client.say_hello(&request).await?;
    println!("{}", reply.message);
    let mut replies = client.say_hello_many_times(&request).await?;
    while let Some(reply) = replies.message().await? {
        println!("{}", reply.message);
    }
    Ok(())
}

/// Times `calls` unary greetings one at a time, then one stream.
async fn bench(client: &GreeterClient, calls: u32, name_len: usize) -> Result<()> {
    anyhow::ensure!(calls > 0, "--bench needs at least one call");
    let request = HelloRequest {
        name: "x".repeat(name_len),
        times: MAX_TIMES,
    };
    let reply_len = name_len + "Hello !".len();
    // Warm up: pools touched, runtime threads started.
    for _ in 0..calls.min(1000) {
        client.say_hello(&request).await?;
    }
    let mut took: Vec<Duration> = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        let start = Instant::now();
        let reply = client.say_hello(&request).await?;
        took.push(start.elapsed());
        anyhow::ensure!(reply.message.len() == reply_len, "a short reply");
    }
    took.sort_unstable();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "unary, {reply_len}-byte reply: p50 {:.1} us, p99 {:.1} us over {calls} calls",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
    );
    let start = Instant::now();
    let mut replies = client.say_hello_many_times(&request).await?;
    let mut n = 0u64;
    while let Some(reply) = replies.message().await? {
        anyhow::ensure!(reply.message.len() >= reply_len, "a short reply");
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "stream, {n} replies of about {reply_len} bytes: {:.1} us each, {:.0} MB/s",
        secs * 1e6 / n as f64,
        (n as f64 * reply_len as f64) / secs / 1e6,
    );
    Ok(())
}
