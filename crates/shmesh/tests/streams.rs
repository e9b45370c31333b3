//! Streaming calls, messages larger than a slab, flow control, async
//! handlers and cancellation, client and server in one process (the server
//! on its own threads).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shmesh::SchemaHash;
use shmesh::client::{Channel, ChannelOptions};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::{Code, Status};

const ECHO: u32 = 1;
const COUNT: u32 = 2;
const SUM: u32 = 3;
const ECHO_STREAM: u32 = 4;
const SPIN_UNTIL_CANCELLED: u32 = 5;
const STREAM_UNTIL_CANCELLED: u32 = 6;
const ASYNC_ECHO: u32 = 7;
const ASYNC_ECHO_STREAM: u32 = 8;
const ASYNC_FOREVER: u32 = 9;
const FLOOD: u32 = 10;
const SCHEMA: SchemaHash = SchemaHash([5; 32]);

/// What the handlers saw, for the tests to check.
#[derive(Default)]
struct Seen {
    blocking_cancelled: AtomicBool,
    stream_cancelled: AtomicBool,
    async_dropped: AtomicBool,
}

/// Sets its flag when dropped: shows a handler's future was dropped.
struct SetOnDrop(Arc<Seen>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.async_dropped.store(true, Ordering::SeqCst);
    }
}

fn start(test: &str) -> (BackgroundServer, String, Arc<Seen>) {
    let addr = format!("shm://@shmesh-streams-{test}-{}", std::process::id());
    let seen = Arc::new(Seen::default());
    let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route_stream(COUNT, |call| {
            let request = call.recv()?.unwrap();
            let n = u32::from_le_bytes(request[..4].try_into().unwrap());
            let size = u32::from_le_bytes(request[4..8].try_into().unwrap()) as usize;
            drop(request);
            for i in 0..n {
                let mut message = vec![(i % 251) as u8; size.max(4)];
                message[..4].copy_from_slice(&i.to_le_bytes());
                call.send(&message)?;
            }
            Ok(())
        })
        .route_stream(SUM, |call| {
            let mut sum = 0u64;
            let mut count = 0u64;
            while let Some(m) = call.recv()? {
                sum += m.iter().map(|&b| u64::from(b)).sum::<u64>();
                count += 1;
            }
            let mut out = sum.to_le_bytes().to_vec();
            out.extend_from_slice(&count.to_le_bytes());
            call.send(&out)
        })
        .route_stream(ECHO_STREAM, |call| {
            while let Some(m) = call.recv()? {
                call.send(&m)?;
            }
            Ok(())
        })
        .route_blocking(SPIN_UNTIL_CANCELLED, move |r| {
            let give_up = Instant::now() + Duration::from_secs(20);
            while !r.is_cancelled() && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(1));
            }
            s1.blocking_cancelled
                .store(r.is_cancelled(), Ordering::SeqCst);
            Ok(Vec::new())
        })
        .route_stream(STREAM_UNTIL_CANCELLED, move |call| {
            let give_up = Instant::now() + Duration::from_secs(20);
            while !call.is_cancelled() && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(1));
            }
            s2.stream_cancelled
                .store(call.is_cancelled(), Ordering::SeqCst);
            Ok(())
        })
        .route_async(ASYNC_ECHO, |request| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(request.payload().to_vec())
            })
        })
        .route_stream_async(ASYNC_ECHO_STREAM, |mut call| {
            Box::pin(async move {
                while let Some(m) = call.recv().await? {
                    let bytes = m.to_vec();
                    drop(m);
                    call.send(&bytes).await?;
                }
                Ok(())
            })
        })
        .route_async(ASYNC_FOREVER, move |_| {
            let guard = SetOnDrop(s3.clone());
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(Vec::new())
            })
        })
        .route_stream(FLOOD, |call| {
            for i in 0..20_000u32 {
                call.send(&[i as u8; 4096])?;
            }
            Ok(())
        });
    let server = Server::bind(&addr, "streams", SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr, seen)
}

fn connect(addr: &str) -> Channel {
    Channel::connect(addr, &ChannelOptions::new("streams", SCHEMA)).unwrap()
}

/// Waits up to 20 s for `cond` (a watchdog, not a timing assertion).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < give_up, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn count_request(n: u32, size: u32) -> Vec<u8> {
    let mut r = n.to_le_bytes().to_vec();
    r.extend_from_slice(&size.to_le_bytes());
    r
}

#[test]
fn server_streaming_delivers_every_message_in_order() {
    let (_server, addr, _) = start("server-streaming");
    let channel = connect(&addr);
    // Far more messages than the flow-control window, of several sizes,
    // including one larger than the largest slab.
    for (n, size) in [(0u32, 8u32), (1, 8), (1000, 64), (200, 5000), (3, 3 << 20)] {
        let mut call = channel
            .server_stream(COUNT, &count_request(n, size), None)
            .unwrap();
        let mut next = 0u32;
        while let Some(m) = call.recv().unwrap() {
            assert_eq!(u32::from_le_bytes(m[..4].try_into().unwrap()), next);
            assert_eq!(m.len(), (size as usize).max(4));
            next += 1;
        }
        assert_eq!(next, n);
        assert!(call.recv().unwrap().is_none(), "the end stays the end");
    }
    eventually("slabs return", || channel.pool_in_use() == 0);
    assert_eq!(channel.calls_in_flight(), 0);
}

#[test]
fn client_streaming_gets_one_answer() {
    let (_server, addr, _) = start("client-streaming");
    let channel = connect(&addr);
    let mut call = channel.open(SUM, None).unwrap();
    let mut expected = 0u64;
    for i in 0..2000u64 {
        let message = vec![(i % 256) as u8; (i % 300) as usize];
        expected += message.iter().map(|&b| u64::from(b)).sum::<u64>();
        call.send(&message).unwrap();
    }
    // Zero-copy too, and a message larger than a slab.
    let mut buf = channel.loan(100, None).unwrap();
    buf.fill(3);
    expected += 300;
    call.send_buf(buf).unwrap();
    call.send(&vec![1u8; 3 << 20]).unwrap();
    expected += 3 << 20;
    let answer = call.finish().unwrap();
    assert_eq!(
        u64::from_le_bytes(answer[..8].try_into().unwrap()),
        expected
    );
    assert_eq!(u64::from_le_bytes(answer[8..16].try_into().unwrap()), 2002);
    drop(answer);
    // A stream with no message at all.
    let answer = channel.open(SUM, None).unwrap().finish().unwrap();
    assert_eq!(&answer[..], &[0u8; 16]);
    drop(answer);
    eventually("slabs return", || channel.pool_in_use() == 0);
}

#[test]
fn bidirectional_echo_interleaves() {
    let (_server, addr, _) = start("bidi");
    let channel = connect(&addr);
    for method in [ECHO_STREAM, ASYNC_ECHO_STREAM] {
        let mut call = channel.open(method, Some(Duration::from_secs(60))).unwrap();
        for round in 0..50u32 {
            let batch: Vec<Vec<u8>> = (0..10u32)
                .map(|k| {
                    let mut m = (round * 10 + k).to_le_bytes().to_vec();
                    m.resize(4 + (k as usize * 997) % 6000, k as u8);
                    m
                })
                .collect();
            for m in &batch {
                call.send(m).unwrap();
            }
            for m in &batch {
                assert_eq!(
                    &call.recv().unwrap().unwrap()[..],
                    &m[..],
                    "method {method}"
                );
            }
        }
        call.send(&vec![9u8; (1 << 20) + 17]).unwrap();
        assert_eq!(call.recv().unwrap().unwrap().len(), (1 << 20) + 17);
        call.close_send().unwrap();
        assert!(call.recv().unwrap().is_none());
        let err = call.send(b"late").unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    }
    eventually("slabs return", || channel.pool_in_use() == 0);
}

#[test]
fn messages_up_to_the_limit_travel_in_chunks() {
    let (_server, addr, _) = start("large");
    let channel = connect(&addr);
    let limit = channel.limits().max_message as usize;
    for len in [(1 << 20) + 1, 5 << 20, limit] {
        let request: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
        for method in [ECHO, ASYNC_ECHO] {
            let response = channel.call(method, &request, None).unwrap();
            assert_eq!(response.len(), len);
            assert!(response[..] == request[..], "len {len} method {method}");
        }
    }
    let err = channel.call(ECHO, &vec![0; limit + 1], None).unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains(&limit.to_string()), "{err}");
    eventually("slabs return", || channel.pool_in_use() == 0);
    assert_eq!(channel.calls_in_flight(), 0);
}

#[test]
fn a_slow_reader_holds_back_a_fast_sender() {
    let (_server, addr, _) = start("flow");
    let channel = connect(&addr);
    let mut call = channel.server_stream(FLOOD, b"", None).unwrap();
    // Read nothing for a while: the server must wait, not fail or fill the
    // pool (4 KiB slabs: 256 of them; the window is far smaller).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(call.recv().unwrap().unwrap()[0], 0);
    // That receive collected everything the server had sent meanwhile.
    assert!(
        call.queued() < shmesh::protocol::WINDOW as usize,
        "{} messages queued",
        call.queued()
    );
    let mut n = 1u32;
    while let Some(m) = call.recv().unwrap() {
        assert_eq!(m[0], n as u8);
        n += 1;
    }
    assert_eq!(n, 20_000);
    eventually("slabs return", || channel.pool_in_use() == 0);
}

#[test]
fn a_blocking_handler_observes_cancellation() {
    let (_server, addr, seen) = start("cancel-blocking");
    let channel = connect(&addr);
    let err = channel
        .call(SPIN_UNTIL_CANCELLED, b"", Some(Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    eventually("the handler saw the cancellation", || {
        seen.blocking_cancelled.load(Ordering::SeqCst)
    });
    eventually("the call is answered", || channel.calls_in_flight() == 0);
    assert_eq!(
        &channel.call(ECHO, b"still fine", None).unwrap()[..],
        b"still fine"
    );
}

#[test]
fn dropping_a_stream_cancels_its_handler() {
    let (_server, addr, seen) = start("cancel-stream");
    let channel = connect(&addr);
    let call = channel.open(STREAM_UNTIL_CANCELLED, None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(call);
    eventually("the handler saw the cancellation", || {
        seen.stream_cancelled.load(Ordering::SeqCst)
    });
    assert_eq!(&channel.call(ECHO, b"ok", None).unwrap()[..], b"ok");
}

#[test]
fn an_async_handler_is_dropped_when_its_caller_gives_up() {
    let (_server, addr, seen) = start("cancel-async");
    let channel = connect(&addr);
    let err = channel
        .call(ASYNC_FOREVER, b"", Some(Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    eventually("the handler's future was dropped", || {
        seen.async_dropped.load(Ordering::SeqCst)
    });
    eventually("the call is answered", || channel.calls_in_flight() == 0);
}

#[test]
fn a_stream_past_its_deadline_fails_with_deadline_exceeded() {
    let (_server, addr, _) = start("stream-deadline");
    let channel = connect(&addr);
    let mut call = channel
        .open(STREAM_UNTIL_CANCELLED, Some(Duration::from_millis(100)))
        .unwrap();
    let err = call.recv().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
}

#[test]
fn many_streams_at_once_each_get_their_own_messages() {
    let (_server, addr, _) = start("many-streams");
    let channel = connect(&addr);
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..16u32)
        .map(|t| {
            let (channel, done) = (channel.clone(), done.clone());
            std::thread::spawn(move || {
                let mut call = channel.open(ECHO_STREAM, None).unwrap();
                for i in 0..300u32 {
                    let m = [t.to_le_bytes(), i.to_le_bytes()].concat();
                    call.send(&m).unwrap();
                    assert_eq!(&call.recv().unwrap().unwrap()[..], &m[..]);
                }
                call.close_send().unwrap();
                assert!(call.recv().unwrap().is_none());
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 16);
    eventually("slabs return", || channel.pool_in_use() == 0);
}

#[test]
fn unknown_streaming_method_is_unimplemented() {
    let (_server, addr, _) = start("unknown-stream");
    let channel = connect(&addr);
    let mut call = channel.open(999, None).unwrap();
    let err = call.recv().unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    let status: Status = err;
    assert!(status.message().contains("999"));
}

#[test]
fn shutdown_closes_streams_that_outlive_the_grace_period() {
    let addr = format!("shm://@shmesh-streams-grace-{}", std::process::id());
    let router = Router::new().route_stream(ECHO_STREAM, |call| {
        while let Some(m) = call.recv()? {
            call.send(&m)?;
        }
        Ok(())
    });
    let mut server = Server::bind(&addr, "streams", SCHEMA, router).unwrap();
    server.set_shutdown_grace(Duration::from_millis(200));
    let server = BackgroundServer::spawn(server).unwrap();
    let channel = connect(&addr);
    let mut call = channel.open(ECHO_STREAM, None).unwrap();
    call.send(b"before").unwrap();
    assert_eq!(&call.recv().unwrap().unwrap()[..], b"before");
    // Shut down with the stream open: after the grace period the server
    // closes the connection and returns.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(20))
        .expect("shutdown waited for a stream that never ends");
    let err = call.recv().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

#[test]
fn streams_opened_and_closed_from_loaned_buffers() {
    let (_server, addr, _) = start("zero-copy-streams");
    let channel = connect(&addr);
    let mut request = channel.loan(8, None).unwrap();
    request.copy_from_slice(&count_request(40, 16));
    let mut call = channel.server_stream_buf(COUNT, request, None).unwrap();
    let mut n = 0u32;
    while let Some(m) = call.recv().unwrap() {
        assert_eq!(u32::from_le_bytes(m[..4].try_into().unwrap()), n);
        n += 1;
    }
    assert_eq!(n, 40);
    // A client stream whose last message closes it.
    let mut call = channel.open(SUM, None).unwrap();
    call.send(&[1; 10]).unwrap();
    let mut last = channel.loan(5, None).unwrap();
    last.fill(2);
    call.send_last_buf(last).unwrap();
    assert_eq!(
        call.send(b"late").unwrap_err().code(),
        Code::FailedPrecondition
    );
    let answer = call.recv().unwrap().unwrap();
    assert_eq!(u64::from_le_bytes(answer[..8].try_into().unwrap()), 20);
    assert_eq!(u64::from_le_bytes(answer[8..16].try_into().unwrap()), 2);
    drop(answer);
    assert!(call.recv().unwrap().is_none());
    eventually("slabs return", || channel.pool_in_use() == 0);
}
