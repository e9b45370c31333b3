//! The RouteGuide implementation served over gRPC (tonic, TCP) through the
//! generated front-end: all four kinds of call from a stock tonic client.
// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use shmesh_example_routeguide::RouteGuideService;
use shmesh_example_routeguide::routeguide::route_guide_server::RouteGuideServer;
use tokio_stream::wrappers::TcpListenerStream;

/// A stock tonic client of the same `.proto`.
mod stock {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tonic/routeguide.rs"));
}

use stock::route_guide_client::RouteGuideClient;
use stock::{Point, Rectangle, RouteNote};

fn point(i: i32, j: i32) -> Point {
    let p = shmesh_example_routeguide::grid_point(i, j);
    Point {
        latitude: p.latitude,
        longitude: p.longitude,
    }
}

fn note(p: Point, message: &str) -> RouteNote {
    RouteNote {
        location: Some(p),
        message: message.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_grpc_client_makes_all_four_kinds_of_call() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = RouteGuideServer::new(RouteGuideService::default()).into_grpc();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut client = RouteGuideClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();

    // Unary.
    let feature = client.get_feature(point(4, 4)).await.unwrap().into_inner();
    assert_eq!(feature.name, "place 4-4");

    // Server streaming.
    let mut features = client
        .list_features(Rectangle {
            lo: Some(point(0, 0)),
            hi: Some(point(0, 2)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    while let Some(feature) = features.message().await.unwrap() {
        names.push(feature.name);
    }
    assert_eq!(names, ["place 0-0", "place 0-1", "place 0-2"]);

    // Client streaming.
    let route = tokio_stream::iter((0..5).map(|i| point(i, 1)));
    let summary = client.record_route(route).await.unwrap().into_inner();
    assert_eq!((summary.point_count, summary.feature_count), (5, 5));

    // Bidirectional.
    let notes = tokio_stream::iter([
        note(point(8, 8), "a"),
        note(point(8, 8), "b"),
        note(point(8, 8), "c"),
    ]);
    let mut answers = client.route_chat(notes).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(note) = answers.message().await.unwrap() {
        got.push(note.message);
    }
    assert_eq!(got, ["a", "a", "b"]);

    server.abort();
}
