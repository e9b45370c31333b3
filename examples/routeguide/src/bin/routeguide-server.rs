//! The RouteGuide server: `routeguide-server [shm://@shmesh-routeguide]`.

use anyhow::{Context, Result};
use clap::Parser;
use shmesh_example_routeguide::routeguide::route_guide_server::RouteGuideServer;
use shmesh_example_routeguide::{DEFAULT_ADDRESS, RouteGuideService};

#[derive(Debug, Parser)]
#[command(about = "Serve routeguide.RouteGuide over shared memory")]
struct Args {
    /// Where to listen: shm:///path/to.sock or shm://@abstract-name.
    #[arg(default_value = DEFAULT_ADDRESS)]
    address: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let server = RouteGuideServer::new(RouteGuideService::default())
        .bind(&args.address)
        .with_context(|| format!("cannot serve at {}", args.address))?;
    eprintln!("routeguide listening at {}", args.address);
    server.serve();
    Ok(())
}
