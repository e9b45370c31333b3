//! The greeter server: `greeter-server [shm://@shmesh-greeter]`.

use anyhow::{Context, Result};
use clap::Parser;
use shmesh_example_greeter::helloworld::greeter_server::GreeterServer;
use shmesh_example_greeter::{DEFAULT_ADDRESS, MyGreeter};

#[derive(Debug, Parser)]
#[command(about = "Serve helloworld.Greeter over shared memory")]
struct Args {
    /// Where to listen: shm:///path/to.sock or shm://@abstract-name.
    #[arg(default_value = DEFAULT_ADDRESS)]
    address: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let server = GreeterServer::new(MyGreeter)
        .bind(&args.address)
        .with_context(|| format!("cannot serve at {}", args.address))?;
    eprintln!("greeter listening at {}", args.address);
    server.serve();
    Ok(())
}
