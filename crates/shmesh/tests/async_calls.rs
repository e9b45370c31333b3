//! The tokio front-end: many tasks on one channel, mixed with blocking
//! callers, cancellation by dropping a future, and a server that goes away.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use shmesh::SchemaHash;
use shmesh::asynchronous::AsyncChannel;
use shmesh::client::ChannelOptions;
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::Code;

const ECHO: u32 = 1;
const SLOW: u32 = 2;
const SCHEMA: SchemaHash = SchemaHash([3; 32]);

fn start(test: &str) -> (BackgroundServer, String) {
    let addr = format!("shm://@shmesh-async-{test}-{}", std::process::id());
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route(SLOW, |_| {
            std::thread::sleep(Duration::from_millis(200));
            Ok(b"late".to_vec())
        });
    let server = Server::bind(&addr, "async", SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr)
}

async fn connect(addr: &str) -> AsyncChannel {
    AsyncChannel::connect(addr, &ChannelOptions::new("async", SCHEMA))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_and_threads_share_one_channel() {
    let (_server, addr) = start("many");
    let channel = connect(&addr).await;
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..500u64 {
                let request = (t << 32 | i).to_le_bytes();
                let response = channel
                    .call(ECHO, &request, Some(Duration::from_secs(30)))
                    .await
                    .unwrap();
                assert_eq!(&response[..], &request[..]);
            }
        }));
    }
    // Blocking callers on the same connection at the same time.
    let blocking = channel.blocking().clone();
    let thread = std::thread::spawn(move || {
        for i in 0..2000u64 {
            let r = blocking
                .call(ECHO, &i.to_le_bytes(), Some(Duration::from_secs(30)))
                .unwrap();
            assert_eq!(&r[..], &i.to_le_bytes());
        }
    });
    for t in tasks {
        t.await.unwrap();
    }
    thread.join().unwrap();
    assert_eq!(channel.blocking().calls_in_flight(), 0);
    assert_eq!(channel.blocking().pool_in_use(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_async_round_trip() {
    let (_server, addr) = start("loan");
    let channel = connect(&addr).await;
    let mut request = channel.loan(1000).unwrap();
    request.fill(7);
    let response = channel.send(ECHO, request, None).await.unwrap();
    assert!(response.iter().all(|&b| b == 7) && response.len() == 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_call_future_cancels_it() {
    let (_server, addr) = start("cancel");
    let channel = connect(&addr).await;
    let slow = channel.call(SLOW, b"payload", None);
    assert!(
        tokio::time::timeout(Duration::from_millis(20), slow)
            .await
            .is_err()
    );
    assert_eq!(
        channel.blocking().calls_in_flight(),
        1,
        "abandoned until its answer comes"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = channel.call(ECHO, b"next", None).await.unwrap();
    assert_eq!(&r[..], b"next");
    assert_eq!(channel.blocking().calls_in_flight(), 0);
    assert_eq!(channel.blocking().pool_in_use(), 0);
    let err = channel
        .call(SLOW, b"", Some(Duration::from_millis(20)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_going_away_fails_waiting_tasks() {
    let (server, addr) = start("gone");
    let channel = connect(&addr).await;
    let waiting = {
        let channel = channel.clone();
        tokio::spawn(async move { channel.call(SLOW, b"", None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Shutdown lets the server finish the call in progress, then closes.
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(first.is_ok() || first.unwrap_err().code() == Code::Unavailable);
    let err = tokio::time::timeout(Duration::from_secs(10), channel.call(ECHO, b"x", None))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}
