//! Unary calls over shared memory, client and server in one process (the
//! server on its own threads): many callers, statuses, deadlines, limits.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use shmesh::SchemaHash;
use shmesh::client::{Channel, ChannelOptions};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::{Code, Status};

const ECHO: u32 = 1;
const FAIL: u32 = 2;
const SLOW: u32 = 3;
const WHO: u32 = 4;
const ECHO_IN_PLACE: u32 = 5;
const SCHEMA: SchemaHash = SchemaHash([7; 32]);

fn address(test: &str) -> String {
    format!("shm://@shmesh-test-{test}-{}", std::process::id())
}

fn start(test: &str) -> (BackgroundServer, String) {
    let addr = address(test);
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route(FAIL, |r| {
            Err(
                Status::new(Code::FailedPrecondition, String::from_utf8_lossy(r.payload))
                    .with_details(vec![1, 2, 3]),
            )
        })
        .route(SLOW, |r| {
            std::thread::sleep(Duration::from_millis(200));
            Ok(format!("{:?}", r.remaining.is_some()).into_bytes())
        })
        .route(WHO, |r| Ok(r.peer.pid.to_le_bytes().to_vec()))
        .route_in_place(ECHO_IN_PLACE, |r, reply| {
            if r.payload.is_empty() {
                return Ok(());
            }
            let out = reply.loan(r.payload.len() * 2)?;
            out[..r.payload.len()].copy_from_slice(r.payload);
            out[r.payload.len()..].copy_from_slice(r.payload);
            Ok(())
        });
    let server = Server::bind(&addr, "test", SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr)
}

fn connect(addr: &str) -> Channel {
    Channel::connect(addr, &ChannelOptions::new("test", SCHEMA)).unwrap()
}

#[test]
fn echo_from_many_threads_matches_every_response() {
    let (_server, addr) = start("many");
    let channel = connect(&addr);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let channel = channel.clone();
            std::thread::spawn(move || {
                for i in 0..5_000u64 {
                    let len = ((t * 7919 + i * 104729) % 3000) as usize;
                    let request: Vec<u8> = (0..len).map(|k| (k as u64 ^ t ^ i) as u8).collect();
                    let mut tagged = (t << 32 | i).to_le_bytes().to_vec();
                    tagged.extend_from_slice(&request);
                    let response = channel
                        .call(ECHO, &tagged, Some(Duration::from_secs(30)))
                        .unwrap();
                    assert_eq!(&response[..], &tagged[..], "thread {t} call {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let empty = channel.call(ECHO, &[], None).unwrap();
    assert!(empty.is_empty());
    assert_eq!(channel.calls_in_flight(), 0);
    assert_eq!(channel.pool_in_use(), 0);
}

#[test]
fn handler_status_reaches_the_caller() {
    let (_server, addr) = start("status");
    let channel = connect(&addr);
    let err = channel.call(FAIL, b"no such thing", None).unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "no such thing");
    assert_eq!(err.details(), &[1, 2, 3]);
    let err = channel.call(99, b"", None).unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // The channel still works after errors.
    assert_eq!(&channel.call(ECHO, b"ok", None).unwrap()[..], b"ok");
}

#[test]
fn deadlines_travel_and_expire() {
    let (_server, addr) = start("deadline");
    let channel = connect(&addr);
    let err = channel
        .call(SLOW, b"", Some(Duration::from_millis(20)))
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    let ok = channel
        .call(SLOW, b"", Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(&ok[..], b"true", "the server sees the deadline");
    let ok = channel.call(SLOW, b"", None).unwrap();
    assert_eq!(&ok[..], b"false");
    // The late answer to the first call was discarded, its slab given back.
    assert_eq!(&channel.call(ECHO, b"after", None).unwrap()[..], b"after");
    assert_eq!(channel.calls_in_flight(), 0);
    // An abandoned call's request slab is freed when its answer comes.
    let err = channel
        .call(SLOW, b"payload", Some(Duration::from_millis(20)))
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(channel.calls_in_flight(), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(&channel.call(ECHO, b"later", None).unwrap()[..], b"later");
    assert_eq!(channel.calls_in_flight(), 0);
    assert_eq!(channel.pool_in_use(), 0);
}

#[test]
fn oversize_request_is_resource_exhausted() {
    let (_server, addr) = start("oversize");
    let channel = connect(&addr);
    let limit = channel.limits().max_message;
    assert_eq!(limit, 64 << 20, "the default limit");
    let err = channel
        .call(ECHO, &vec![0; limit as usize + 1], None)
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("67108864"), "{err}");
    assert_eq!(channel.pool_in_use(), 0);
}

#[test]
fn handlers_see_the_callers_pid() {
    let (_server, addr) = start("who");
    let channel = connect(&addr);
    let pid = channel.call(WHO, b"", None).unwrap();
    assert_eq!(
        i32::from_le_bytes(pid[..4].try_into().unwrap()),
        std::process::id() as i32
    );
}

#[test]
fn channels_see_the_servers_credentials() {
    let (_server, addr) = start("server-creds");
    let channel = connect(&addr);
    let peer = channel
        .peer()
        .expect("connected to the server's own socket");
    // The server runs on a thread of this process.
    assert_eq!(peer.pid, std::process::id() as i32);
    assert_eq!(peer.uid, rustix::process::geteuid().as_raw());
    assert_eq!(peer.gid, rustix::process::getegid().as_raw());
}

#[test]
fn schema_mismatch_names_both_hashes() {
    let (_server, addr) = start("schema");
    let err =
        Channel::connect(&addr, &ChannelOptions::new("test", SchemaHash([8; 32]))).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&"07".repeat(32)) && text.contains(&"08".repeat(32)),
        "{text}"
    );
    assert_eq!(
        err.refusal(),
        Some(&shmesh::RefuseReason::SchemaMismatch {
            client: SchemaHash([8; 32]),
            server: SCHEMA,
        })
    );
}

#[test]
fn server_shutdown_fails_calls_with_unavailable() {
    let (server, addr) = start("shutdown");
    let channel = connect(&addr);
    assert_eq!(&channel.call(ECHO, b"x", None).unwrap()[..], b"x");
    drop(server);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !channel.is_dead() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = channel
        .call(ECHO, b"x", Some(Duration::from_secs(5)))
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
}

#[test]
fn zero_copy_both_ways() {
    let (_server, addr) = start("in-place");
    let channel = connect(&addr);
    for len in [1usize, 100, 4000, 60_000] {
        let mut request = channel.loan(len, None).unwrap();
        for (i, b) in request.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let expected: Vec<u8> = request.iter().chain(request.iter()).copied().collect();
        let response = channel.send(ECHO_IN_PLACE, request, None).unwrap();
        assert_eq!(&response[..], &expected[..], "len {len}");
    }
    let empty = channel
        .send(ECHO_IN_PLACE, channel.loan(0, None).unwrap(), None)
        .unwrap();
    assert!(empty.is_empty());
    // A reply larger than the largest slab travels in chunks, and so does a
    // request loaned larger than a slab.
    for len in [600_000usize, 3 << 20] {
        let mut big = channel.loan(len, None).unwrap();
        for (i, b) in big.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let expected: Vec<u8> = big.iter().chain(big.iter()).copied().collect();
        let response = channel.send(ECHO_IN_PLACE, big, None).unwrap();
        assert!(response[..] == expected[..], "len {len}");
    }
    // A loan dropped unsent goes back to the pool.
    drop(channel.loan(100, None).unwrap());
    assert_eq!(channel.pool_in_use(), 0);
}

#[test]
fn a_loan_from_another_channel_is_refused() {
    let (_server, addr) = start("foreign-loan");
    let (a, b) = (connect(&addr), connect(&addr));
    let foreign = a.loan(10, None).unwrap();
    let err = b.send(ECHO, foreign, None).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(a.pool_in_use(), 0, "the refused loan went back to its pool");
}

#[test]
fn server_counts_calls_by_method_code_and_connection() {
    let addr = address("stats");
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route(FAIL, |_| Err(Status::not_found("nothing")));
    let server = Server::bind(&addr, "test", SCHEMA, router).unwrap();
    let stats = server.stats();
    let _server = BackgroundServer::spawn(server).unwrap();
    let channel = connect(&addr);
    for _ in 0..10 {
        channel.call(ECHO, b"abc", None).unwrap();
    }
    for _ in 0..3 {
        channel.call(FAIL, b"", None).unwrap_err();
    }
    channel.call(42, b"", None).unwrap_err();
    let snap = stats.snapshot();
    assert_eq!(snap.methods[&ECHO].calls, 10);
    assert_eq!(snap.methods[&ECHO].by_code[&Code::Ok], 10);
    assert_eq!(snap.methods[&FAIL].by_code[&Code::NotFound], 3);
    assert_eq!(snap.methods[&42].by_code[&Code::Unimplemented], 1);
    assert!(snap.methods[&ECHO].latency_quantile(0.5).is_some());
    assert_eq!(snap.connections.len(), 1);
    let conn = &snap.connections[0];
    assert_eq!((conn.calls, conn.errors), (14, 4));
    assert_eq!(conn.peer.pid, std::process::id() as i32);
    drop(channel);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stats.snapshot().connections.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "closed connection still counted live"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stats.snapshot().connections_total, 1);
}

/// A blocking handler runs off the connection's thread: while it waits,
/// other calls on the same connection are served, and its answer overtakes
/// nothing it should not.
#[test]
fn blocking_handlers_do_not_hold_up_the_connection() {
    use std::sync::{Arc, Condvar, Mutex};
    const GATED: u32 = 10;
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let addr = address("offload");
    let handler_gate = gate.clone();
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route_blocking(GATED, move |r| {
            let (open, cv) = &*handler_gate;
            let mut open = open.lock().unwrap();
            while !*open {
                let (guard, timeout) = cv.wait_timeout(open, Duration::from_secs(30)).unwrap();
                open = guard;
                if timeout.timed_out() {
                    return Err(Status::aborted("the test never opened the gate"));
                }
            }
            Ok([r.payload, b" done"].concat())
        });
    let server = Server::bind(&addr, "test", SCHEMA, router).unwrap();
    let stats = server.stats();
    let _server = BackgroundServer::spawn(server).unwrap();
    let channel = connect(&addr);
    let gated: Vec<_> = (0..3u8)
        .map(|i| {
            let channel = channel.clone();
            std::thread::spawn(move || {
                channel.call(GATED, &[b'a' + i], Some(Duration::from_secs(60)))
            })
        })
        .collect();
    // The gated calls are in the server's hands; the connection still serves.
    for i in 0..200u32 {
        let r = channel
            .call(ECHO, &i.to_le_bytes(), Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(&r[..], &i.to_le_bytes());
    }
    let (open, cv) = &*gate;
    *open.lock().unwrap() = true;
    cv.notify_all();
    for (i, t) in gated.into_iter().enumerate() {
        let r = t.join().unwrap().unwrap();
        assert_eq!(&r[..], [&[b'a' + i as u8][..], b" done"].concat());
    }
    assert_eq!(channel.calls_in_flight(), 0);
    assert_eq!(channel.pool_in_use(), 0);
    // A call is counted just after its answer goes out.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.snapshot().methods.get(&GATED).map(|m| m.calls) != Some(3) {
        assert!(std::time::Instant::now() < deadline, "calls not counted");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn both_sides_report_a_deadline_the_handler_overran() {
    let addr = address("late");
    let router = Router::new()
        .route(SLOW, |_| {
            std::thread::sleep(Duration::from_millis(200));
            Ok(b"late".to_vec())
        })
        .route_blocking(SLOW + 100, |_| {
            std::thread::sleep(Duration::from_millis(200));
            Ok(b"late".to_vec())
        });
    let server = Server::bind(&addr, "test", SCHEMA, router).unwrap();
    let stats = server.stats();
    let _server = BackgroundServer::spawn(server).unwrap();
    let channel = connect(&addr);
    for method in [SLOW, SLOW + 100] {
        let err = channel
            .call(method, b"", Some(Duration::from_millis(50)))
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "method {method}");
    }
    // The server counts them as it answered them: late, so exceeded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snap = stats.snapshot();
        let late = |m: u32| {
            snap.methods
                .get(&m)
                .and_then(|s| s.by_code.get(&Code::DeadlineExceeded))
                .copied()
        };
        if late(SLOW) == Some(1) && late(SLOW + 100) == Some(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not report DeadlineExceeded: {:?}",
            snap.methods
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(&channel.call(SLOW, b"", None).unwrap()[..], b"late");
}
