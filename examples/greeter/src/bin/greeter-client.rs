//! The greeter client: `greeter-client [--address A] [--times N] NAME`
//! says hello once, then asks for N more greetings on a stream.

use anyhow::{Context, Result};
use clap::Parser;
use shmesh_example_greeter::DEFAULT_ADDRESS;
use shmesh_example_greeter::helloworld::HelloRequest;
use shmesh_example_greeter::helloworld::greeter_client::GreeterClient;

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
