//! The RouteGuide client: makes one call of each kind and prints what
//! comes back.

use anyhow::{Context, Result};
use clap::Parser;
use shmesh_example_routeguide::routeguide::route_guide_client::RouteGuideClient;
use shmesh_example_routeguide::routeguide::{Rectangle, RouteNote};
use shmesh_example_routeguide::{DEFAULT_ADDRESS, grid_point};

#[derive(Debug, Parser)]
#[command(about = "Make one call of each kind to a routeguide.RouteGuide server")]
struct Args {
    /// The server's address: shm:///path/to.sock or shm://@abstract-name.
    #[arg(default_value = DEFAULT_ADDRESS)]
    address: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = RouteGuideClient::connect(&args.address)
        .await
        .with_context(|| format!("cannot connect to {}", args.address))?;

    let feature = client.get_feature(grid_point(1, 2)).await?;
    println!("GetFeature: {}", feature.name);

    let mut features = client
        .list_features(Rectangle {
            lo: Some(grid_point(0, 0)),
            hi: Some(grid_point(1, 1)),
        })
        .await?;
    while let Some(feature) = features.message().await? {
        println!("ListFeatures: {}", feature.name);
    }

    let mut route = client.record_route()?;
    for j in 0..3 {
        route.send(&grid_point(0, j)).await?;
    }
    let summary = route.finish().await?;
    println!(
        "RecordRoute: {} points, {} features",
        summary.point_count, summary.feature_count
    );

    let mut chat = client.route_chat()?;
    for message in ["first", "second"] {
        chat.send(&RouteNote {
            location: Some(grid_point(5, 5)),
            message: message.into(),
        })
        .await?;
    }
    chat.close_send()?;
    while let Some(note) = chat.message().await? {
        println!("RouteChat: {}", note.message);
    }
    Ok(())
}
