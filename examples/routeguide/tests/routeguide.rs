//! All four kinds of call through the generated RouteGuide client and
//! server: async and blocking clients in-process, and the binaries as real
//! processes.
// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmesh::server::BackgroundServer;
use shmesh::stats::Stats;
use shmesh_example_routeguide::routeguide::route_guide_blocking_client::RouteGuideBlockingClient;
use shmesh_example_routeguide::routeguide::route_guide_client::RouteGuideClient;
use shmesh_example_routeguide::routeguide::route_guide_server::RouteGuideServer;
use shmesh_example_routeguide::routeguide::{Point, Rectangle, RouteNote, route_guide_schema};
use shmesh_example_routeguide::{RouteGuideService, grid_point};

fn address(test: &str) -> String {
    format!(
        "shm://@shmesh-routeguide-test-{}-{test}",
        std::process::id()
    )
}

/// A RouteGuide server on a thread of its own, and its counters.
fn serve(test: &str) -> (String, BackgroundServer, Arc<Stats>) {
    let address = address(test);
    let server = RouteGuideServer::new(RouteGuideService::default())
        .bind(&address)
        .unwrap();
    let stats = server.stats();
    (address, BackgroundServer::spawn(server).unwrap(), stats)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn note(point: Point, message: &str) -> RouteNote {
    RouteNote {
        location: Some(point),
        message: message.into(),
    }
}

fn square() -> Rectangle {
    Rectangle {
        lo: Some(grid_point(2, 2)),
        hi: Some(grid_point(3, 3)),
    }
}

#[test]
fn method_ids_follow_the_proto() {
    assert_eq!(route_guide_schema::GET_FEATURE, 1);
    assert_eq!(route_guide_schema::LIST_FEATURES, 2);
    assert_eq!(route_guide_schema::RECORD_ROUTE, 3);
    assert_eq!(route_guide_schema::ROUTE_CHAT, 4);
}

#[test]
fn async_client_makes_all_four_kinds_of_call() {
    let (address, _server, stats) = serve("async");
    runtime().block_on(async {
        let client = RouteGuideClient::connect(&address).await.unwrap();

        // Unary.
        let feature = client.get_feature(grid_point(1, 2)).await.unwrap();
        assert_eq!(feature.name, "place 1-2");
        let nowhere = Point {
            latitude: 1,
            longitude: 1,
        };
        let feature = client.get_feature(nowhere).await.unwrap();
        assert_eq!(
            (feature.name.as_str(), feature.location),
            ("", Some(nowhere))
        );

        // Server streaming.
        let mut features = client.list_features(square()).await.unwrap();
        let mut names = Vec::new();
        while let Some(feature) = features.message().await.unwrap() {
            names.push(feature.name);
        }
        assert_eq!(names, ["place 2-2", "place 2-3", "place 3-2", "place 3-3"]);

        // Client streaming.
        let mut route = client.record_route().unwrap();
        for j in 0..3 {
            route.send(&grid_point(0, j)).await.unwrap();
        }
        route.send(&nowhere).await.unwrap();
        let summary = route.finish().await.unwrap();
        assert_eq!((summary.point_count, summary.feature_count), (4, 3));
        assert!(summary.distance > 0, "{summary:?}");

        // Bidirectional: a note is answered with the earlier notes at its
        // point, while the client is still sending.
        let mut chat = client.route_chat().unwrap();
        chat.send(&note(grid_point(5, 5), "a")).await.unwrap();
        chat.send(&note(grid_point(6, 6), "b")).await.unwrap();
        chat.send(&note(grid_point(5, 5), "c")).await.unwrap();
        assert_eq!(chat.message().await.unwrap().unwrap().message, "a");
        chat.send(&note(grid_point(6, 6), "d")).await.unwrap();
        assert_eq!(chat.message().await.unwrap().unwrap().message, "b");
        chat.close_send().unwrap();
        assert!(chat.message().await.unwrap().is_none());
    });
    // Every response of every kind was encoded straight into shared
    // memory: the server copied none.
    assert_eq!(stats.snapshot().copied_bytes, 0);
}

#[test]
fn blocking_client_makes_all_four_kinds_of_call() {
    let (address, _server, _) = serve("blocking");
    let client = RouteGuideBlockingClient::connect(&address)
        .unwrap()
        .with_timeout(Duration::from_secs(10));

    assert_eq!(
        client.get_feature(grid_point(9, 9)).unwrap().name,
        "place 9-9"
    );

    let names: Vec<_> = client
        .list_features(square())
        .unwrap()
        .map(|f| f.unwrap().name)
        .collect();
    assert_eq!(names.len(), 4);

    let mut route = client.record_route().unwrap();
    for i in 0..10 {
        route.send(&grid_point(i, 0)).unwrap();
    }
    let summary = route.finish().unwrap();
    assert_eq!((summary.point_count, summary.feature_count), (10, 10));
    // Nine steps of 0.1° of latitude: about 100 km.
    assert!((99_000..101_000).contains(&summary.distance), "{summary:?}");

    let mut chat = client.route_chat().unwrap();
    for message in ["x", "y", "z"] {
        chat.send(&note(grid_point(7, 7), message)).unwrap();
    }
    chat.close_send().unwrap();
    let mut answers = Vec::new();
    while let Some(note) = chat.message().unwrap() {
        answers.push(note.message);
    }
    // "y" is answered with "x", "z" with "x" and "y".
    assert_eq!(answers, ["x", "x", "y"]);
}

#[test]
fn an_empty_route_is_summed_up_too() {
    let (address, _server, _) = serve("empty-route");
    let client = RouteGuideBlockingClient::connect(&address).unwrap();
    let summary = client.record_route().unwrap().finish().unwrap();
    assert_eq!((summary.point_count, summary.distance), (0, 0));
}

/// Kills and reaps a child process when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_client_binary_makes_every_call_to_the_server_binary() {
    let address = address("processes");
    let _server = Reaped(
        Command::new(Path::new(env!("CARGO_BIN_EXE_routeguide-server")))
            .arg(&address)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while RouteGuideBlockingClient::connect(&address).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "no server");
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = Command::new(Path::new(env!("CARGO_BIN_EXE_routeguide-client")))
        .arg(&address)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        "GetFeature: place 1-2\n\
         ListFeatures: place 0-0\n\
         ListFeatures: place 0-1\n\
         ListFeatures: place 1-0\n\
         ListFeatures: place 1-1\n\
         RecordRoute: 3 points, 3 features\n\
         RouteChat: first\n"
    );
}
