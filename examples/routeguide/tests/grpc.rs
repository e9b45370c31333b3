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

/// The generated client, which picks its transport from the address.
mod generated {
    pub use shmesh_example_routeguide::grid_point;
    pub use shmesh_example_routeguide::routeguide::route_guide_client::RouteGuideClient;
    pub use shmesh_example_routeguide::routeguide::{Rectangle, RouteNote};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_client_makes_all_four_kinds_of_call_over_either_transport() {
    use generated::{Rectangle, RouteGuideClient, RouteNote, grid_point};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RouteGuideServer::new(RouteGuideService::default()).into_grpc())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let address = format!("shm://@shmesh-routeguide-either-{}", std::process::id());
    let shmesh = RouteGuideServer::new(RouteGuideService::default())
        .bind(&address)
        .unwrap();
    let _shmesh = shmesh::server::BackgroundServer::spawn(shmesh).unwrap();

    for address in [format!("http://127.0.0.1:{port}"), address] {
        let client = RouteGuideClient::connect(&address).await.unwrap();

        let feature = client.get_feature(grid_point(3, 7)).await.unwrap();
        assert_eq!(feature.name, "place 3-7", "{address}");

        let mut features = client
            .list_features(Rectangle {
                lo: Some(grid_point(9, 8)),
                hi: Some(grid_point(9, 9)),
            })
            .await
            .unwrap();
        let mut names = Vec::new();
        while let Some(feature) = features.message().await.unwrap() {
            names.push(feature.name);
        }
        assert_eq!(names, ["place 9-8", "place 9-9"], "{address}");

        let mut route = client.record_route().unwrap();
        for i in 0..4 {
            route.send(&grid_point(i, i)).await.unwrap();
        }
        let summary = route.finish().await.unwrap();
        assert_eq!((summary.point_count, summary.feature_count), (4, 4));

        let mut chat = client.route_chat().unwrap();
        let here = |message: &str| RouteNote {
            location: Some(grid_point(2, 8)),
            message: message.into(),
        };
        chat.send(&here("one")).await.unwrap();
        chat.send(&here("two")).await.unwrap();
        assert_eq!(chat.message().await.unwrap().unwrap().message, "one");
        chat.close_send().unwrap();
        assert!(chat.message().await.unwrap().is_none(), "{address}");
    }
    server.abort();
}

#[tokio::test]
async fn an_address_of_no_known_scheme_is_refused() {
    let error = generated::RouteGuideClient::connect("ftp://example")
        .await
        .unwrap_err();
    assert!(error.to_string().contains("ftp://example"), "{error}");
}

#[test]
fn the_generated_blocking_client_makes_all_four_kinds_of_call_over_either_transport() {
    use generated::{Rectangle, RouteNote, grid_point};
    use shmesh_example_routeguide::routeguide::route_guide_blocking_client::RouteGuideBlockingClient;

    // A gRPC server on a runtime of the test's; the client brings its own.
    let server_runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = server_runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let _server = server_runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(RouteGuideServer::new(RouteGuideService::default()).into_grpc())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let address = format!("shm://@shmesh-routeguide-blocking-{}", std::process::id());
    let shmesh = RouteGuideServer::new(RouteGuideService::default())
        .bind(&address)
        .unwrap();
    let _shmesh = shmesh::server::BackgroundServer::spawn(shmesh).unwrap();

    for address in [format!("http://127.0.0.1:{port}"), address] {
        let client = RouteGuideBlockingClient::connect(&address)
            .unwrap()
            .with_timeout(std::time::Duration::from_secs(10));

        let feature = client.get_feature(grid_point(3, 7)).unwrap();
        assert_eq!(feature.name, "place 3-7", "{address}");

        let names: Vec<String> = client
            .list_features(Rectangle {
                lo: Some(grid_point(9, 7)),
                hi: Some(grid_point(9, 9)),
            })
            .unwrap()
            .map(|f| f.unwrap().name)
            .collect();
        assert_eq!(names, ["place 9-7", "place 9-8", "place 9-9"], "{address}");

        let mut route = client.record_route().unwrap();
        for i in 0..4 {
            route.send(&grid_point(i, i)).unwrap();
        }
        let summary = route.finish().unwrap();
        assert_eq!((summary.point_count, summary.feature_count), (4, 4));

        let mut chat = client.route_chat().unwrap();
        let here = |message: &str| RouteNote {
            location: Some(grid_point(2, 8)),
            message: message.into(),
        };
        chat.send(&here("one")).unwrap();
        chat.send(&here("two")).unwrap();
        assert_eq!(chat.message().unwrap().unwrap().message, "one");
        chat.close_send().unwrap();
        assert!(chat.message().unwrap().is_none(), "{address}");

        // Calls from several threads share the client (and, over gRPC, its
        // runtime).
        std::thread::scope(|s| {
            for t in 0..4 {
                let client = &client;
                s.spawn(move || {
                    let feature = client.get_feature(grid_point(t, 1)).unwrap();
                    assert_eq!(feature.name, format!("place {t}-1"));
                });
            }
        });
    }
    let error = RouteGuideBlockingClient::connect("ftp://example").unwrap_err();
    assert!(error.to_string().contains("ftp://example"), "{error}");
}
