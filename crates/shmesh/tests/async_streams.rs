//! Streams and chunked messages through the tokio front-end, against
//! blocking and async handlers, many tasks at once, and cancellation by
//! dropping a future.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shmesh::SchemaHash;
use shmesh::asynchronous::AsyncChannel;
use shmesh::client::ChannelOptions;
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::Code;

const ECHO: u32 = 1;
const COUNT: u32 = 2;
const SUM: u32 = 3;
const ECHO_STREAM: u32 = 4;
const ASYNC_ECHO_STREAM: u32 = 5;
const WAIT_FOR_CANCEL: u32 = 6;
const SCHEMA: SchemaHash = SchemaHash([4; 32]);

/// Sets its flag when dropped: shows a handler's future was dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn start(test: &str, cancelled: Arc<AtomicBool>) -> (BackgroundServer, String) {
    let addr = format!("shm://@shmesh-async-streams-{test}-{}", std::process::id());
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route_stream(COUNT, |call| {
            let request = call.recv()?.unwrap();
            let n = u32::from_le_bytes(request[..4].try_into().unwrap());
            drop(request);
            for i in 0..n {
                call.send(&i.to_le_bytes())?;
            }
            Ok(())
        })
        .route_stream(SUM, |call| {
            let mut sum = 0u64;
            while let Some(m) = call.recv()? {
                sum += m.len() as u64;
            }
            call.send(&sum.to_le_bytes())
        })
        .route_stream(ECHO_STREAM, |call| {
            while let Some(m) = call.recv()? {
                call.send(&m)?;
            }
            Ok(())
        })
        .route_stream_async(ASYNC_ECHO_STREAM, |mut call| {
            Box::pin(async move {
                while let Some(m) = call.recv().await? {
                    let bytes = m.to_vec();
                    call.send(&bytes).await?;
                }
                Ok(())
            })
        })
        .route_stream_async(WAIT_FOR_CANCEL, move |_call| {
            // Dropped with the handler's future when the client cancels.
            let guard = SetOnDrop(cancelled.clone());
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(())
            })
        });
    let server = Server::bind(&addr, "async-streams", SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr)
}

async fn connect(addr: &str) -> AsyncChannel {
    AsyncChannel::connect(addr, &ChannelOptions::new("async-streams", SCHEMA))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_client_and_bidi_streams_from_many_tasks() {
    let (_server, addr) = start("kinds", Arc::default());
    let channel = connect(&addr).await;
    let mut tasks = Vec::new();
    for t in 0..12u32 {
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            // Server streaming, beyond the window.
            let mut call = channel
                .server_stream(COUNT, &(100 + t).to_le_bytes(), None)
                .await
                .unwrap();
            let mut next = 0u32;
            while let Some(m) = call.recv().await.unwrap() {
                assert_eq!(u32::from_le_bytes(m[..4].try_into().unwrap()), next);
                next += 1;
            }
            assert_eq!(next, 100 + t);
            // Client streaming.
            let mut call = channel.open(SUM, None).unwrap();
            for i in 0..50usize {
                call.send(&vec![1; i]).await.unwrap();
            }
            let sum = call.finish().await.unwrap();
            assert_eq!(u64::from_le_bytes(sum[..8].try_into().unwrap()), 1225);
            // Bidirectional, against blocking and async handlers.
            for method in [ECHO_STREAM, ASYNC_ECHO_STREAM] {
                let mut call = channel.open(method, None).unwrap();
                for i in 0..40u32 {
                    let m = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    call.send(&m).await.unwrap();
                    assert_eq!(&call.recv().await.unwrap().unwrap()[..], &m[..]);
                }
                call.close_send().unwrap();
                assert!(call.recv().await.unwrap().is_none());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(channel.blocking().calls_in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_unary_and_stream_messages() {
    let (_server, addr) = start("chunked", Arc::default());
    let channel = connect(&addr).await;
    for len in [(1 << 20) + 3, 9 << 20] {
        let request: Vec<u8> = (0..len).map(|i| (i % 239) as u8).collect();
        let response = channel.call(ECHO, &request, None).await.unwrap();
        assert!(response[..] == request[..], "len {len}");
        let mut call = channel.open(ASYNC_ECHO_STREAM, None).unwrap();
        call.send(&request).await.unwrap();
        assert!(call.recv().await.unwrap().unwrap()[..] == request[..]);
        call.close_send().unwrap();
        assert!(call.recv().await.unwrap().is_none());
    }
    let limit = channel.blocking().limits().max_message as usize;
    let err = channel
        .call(ECHO, &vec![0; limit + 1], None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_async_stream_cancels_the_handler() {
    let cancelled = Arc::new(AtomicBool::new(false));
    let (_server, addr) = start("cancel", cancelled.clone());
    let channel = connect(&addr).await;
    let mut call = channel.open(WAIT_FOR_CANCEL, None).unwrap();
    // A receive that never completes, abandoned by a timeout.
    let waited = tokio::time::timeout(Duration::from_millis(50), call.recv()).await;
    assert!(waited.is_err());
    drop(call);
    let give_up = Instant::now() + Duration::from_secs(20);
    while !cancelled.load(Ordering::SeqCst) {
        assert!(Instant::now() < give_up, "the handler was never dropped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_loans_open_and_close_streams_without_copies() {
    let (_server, addr) = start("zero-copy", Arc::default());
    let channel = connect(&addr).await;
    let mut request = channel.loan_wait(4, None).await.unwrap();
    request.copy_from_slice(&25u32.to_le_bytes());
    let mut call = channel
        .server_stream_buf(COUNT, request, None)
        .await
        .unwrap();
    let mut n = 0u32;
    while let Some(m) = call.recv().await.unwrap() {
        assert_eq!(u32::from_le_bytes(m[..4].try_into().unwrap()), n);
        n += 1;
    }
    assert_eq!(n, 25);
    let mut call = channel.open(SUM, None).unwrap();
    call.send(&[0; 7]).await.unwrap();
    let last = channel.loan_wait(3 << 20, None).await.unwrap();
    call.send_last_buf(last).await.unwrap();
    let sum = call.recv().await.unwrap().unwrap();
    assert_eq!(
        u64::from_le_bytes(sum[..8].try_into().unwrap()),
        7 + (3 << 20)
    );
}
