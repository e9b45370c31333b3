//! Fallback routes (a proxy's view: methods it does not know), streams
//! told from unary calls by their opening flag, and the blocking
//! stream's and call's halves used from two threads.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use shmesh::SchemaHash;
use shmesh::client::{Channel, ChannelOptions};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::{Code, Status};

const SCHEMA: SchemaHash = SchemaHash([9; 32]);
/// Ends the stream (`Aborted`) from another thread after the first
/// message, while the client still sends.
const END_EARLY: u32 = 77;
/// Waits for the client to cancel after it half-closed (its state goes
/// from 1, waiting, to 2, cancelled).
const WAIT_CANCEL: u32 = 78;

fn start(test: &str, router: Router) -> (BackgroundServer, String) {
    let addr = format!("shm://@shmesh-fallback-{test}-{}", std::process::id());
    let server = Server::bind(&addr, "fallback", SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr)
}

fn connect(addr: &str) -> Channel {
    Channel::connect(addr, &ChannelOptions::new("fallback", SCHEMA)).unwrap()
}

/// Waits up to 20 s for `cond` (a watchdog, not a timing assertion).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < give_up, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Unary calls answer `u:` + request; streams answer `s<method>:` + each
/// message, from a second thread, and then their message count.
fn both_fallbacks(cancelled: Arc<AtomicU8>) -> Router {
    Router::new()
        .fallback_in_place(|request, reply| {
            let out = reply.loan(request.payload.len() + 2)?;
            out[..2].copy_from_slice(b"u:");
            out[2..].copy_from_slice(request.payload);
            Ok(())
        })
        .fallback_stream(move |call| {
            let method = call.method();
            if method == WAIT_CANCEL {
                while call.recv()?.is_some() {}
                cancelled.store(1, Ordering::SeqCst);
                let seen = call.wait_cancelled();
                cancelled.store(if seen { 2 } else { 3 }, Ordering::SeqCst);
                return Ok(());
            }
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
            let mut sender = call.sender();
            std::thread::scope(|s| {
                let sending = s.spawn(move || {
                    let mut count = 0u32;
                    for message in rx {
                        if method == END_EARLY {
                            sender.end(Err(Status::aborted("enough")));
                            return Ok(());
                        }
                        let tag = format!("s{method}:");
                        let mut out = sender.loan(tag.len() + message.len())?;
                        out[..tag.len()].copy_from_slice(tag.as_bytes());
                        out[tag.len()..].copy_from_slice(&message);
                        sender.send_buf(out)?;
                        count += 1;
                    }
                    sender.send(&count.to_le_bytes())
                });
                let mut received = Ok(());
                loop {
                    match call.recv() {
                        Ok(Some(message)) => {
                            if tx.send(message.to_vec()).is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            received = Err(status);
                            break;
                        }
                    }
                }
                drop(tx);
                let sent = sending
                    .join()
                    .unwrap_or_else(|_| Err(Status::internal("sender panicked")));
                received.and(sent)
            })
        })
}

#[test]
fn streams_and_unary_calls_reach_their_own_fallback() {
    let (_server, addr) = start("both", both_fallbacks(Arc::default()));
    let channel = connect(&addr);
    // Unary, small and in chunks (which opens without END, like a stream).
    assert_eq!(&channel.call(5, b"hi", None).unwrap()[..], b"u:hi");
    let big = vec![7u8; (3 << 20) + 5];
    let answer = channel.call(5, &big, None).unwrap();
    assert_eq!(&answer[..2], b"u:");
    assert!(answer[2..] == big[..]);
    drop(answer);
    // Server streaming with one small request: `OPEN|MESSAGE|END`, like a
    // unary call but for its stream flag.
    let mut call = channel.server_stream(6, b"one", None).unwrap();
    assert_eq!(&call.recv().unwrap().unwrap()[..], b"s6:one");
    assert_eq!(&call.recv().unwrap().unwrap()[..], &1u32.to_le_bytes());
    assert!(call.recv().unwrap().is_none());
    // Server streaming with a request larger than a slab.
    let mut call = channel.server_stream(6, &big, None).unwrap();
    assert_eq!(call.recv().unwrap().unwrap().len(), big.len() + 3);
    assert_eq!(&call.recv().unwrap().unwrap()[..], &1u32.to_le_bytes());
    assert!(call.recv().unwrap().is_none());
    // Client streaming (fewer messages than the window: each is echoed,
    // and this client reads only once it has sent them all), and a stream
    // with no message at all.
    let mut call = channel.open(8, None).unwrap();
    for i in 0..10u8 {
        call.send(&[i]).unwrap();
    }
    call.close_send().unwrap();
    for i in 0..10u8 {
        assert_eq!(&call.recv().unwrap().unwrap()[..], &[b's', b'8', b':', i]);
    }
    assert_eq!(&call.recv().unwrap().unwrap()[..], &10u32.to_le_bytes());
    assert!(call.recv().unwrap().is_none());
    let answer = channel.open(9, None).unwrap().finish().unwrap();
    assert_eq!(&answer[..], &0u32.to_le_bytes());
    drop(answer);
    eventually("slabs return", || channel.pool_in_use() == 0);
    assert_eq!(channel.calls_in_flight(), 0);
}

#[test]
fn a_split_call_sends_and_receives_from_two_threads() {
    let (_server, addr) = start("split", both_fallbacks(Arc::default()));
    let channel = connect(&addr);
    let mut call = channel.open(3, Some(Duration::from_secs(60))).unwrap();
    let (mut incoming, mut outgoing) = call.split();
    // Far more than the flow-control window each way, some in chunks: a
    // proxy pumping both ways at once.
    let sizes =
        |i: u32| 4 + (i as usize * 7919) % 9000 + if i.is_multiple_of(97) { 2 << 20 } else { 0 };
    std::thread::scope(|s| {
        s.spawn(move || {
            for i in 0..500u32 {
                let mut m = i.to_le_bytes().to_vec();
                m.resize(sizes(i), i as u8);
                outgoing.send(&m).unwrap();
            }
            outgoing.close_send().unwrap();
        });
        for i in 0..500u32 {
            let m = incoming.recv().unwrap().unwrap();
            assert_eq!(&m[..3], b"s3:");
            assert_eq!(u32::from_le_bytes(m[3..7].try_into().unwrap()), i);
            assert_eq!(m.len(), 3 + sizes(i));
        }
        assert_eq!(
            &incoming.recv().unwrap().unwrap()[..],
            &500u32.to_le_bytes()
        );
        assert!(incoming.recv().unwrap().is_none());
    });
    drop(call);
    eventually("slabs return", || channel.pool_in_use() == 0);
    assert_eq!(channel.calls_in_flight(), 0);
}

#[test]
fn a_sender_ends_the_call_while_the_client_still_sends() {
    let (_server, addr) = start("end-early", both_fallbacks(Arc::default()));
    let channel = connect(&addr);
    let mut call = channel
        .open(END_EARLY, Some(Duration::from_secs(60)))
        .unwrap();
    call.send(b"first").unwrap();
    let err = call.recv().unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err}");
    drop(call);
    eventually("slabs return", || channel.pool_in_use() == 0);
    assert_eq!(channel.calls_in_flight(), 0);
}

#[test]
fn a_cancel_from_either_half_reaches_the_handler_and_ends_the_call() {
    let cancelled = Arc::new(AtomicU8::new(0));
    let (_server, addr) = start("cancel", both_fallbacks(cancelled.clone()));
    let channel = connect(&addr);
    let mut call = channel
        .open(WAIT_CANCEL, Some(Duration::from_secs(60)))
        .unwrap();
    call.close_send().unwrap();
    eventually("the handler waits", || {
        cancelled.load(Ordering::SeqCst) == 1
    });
    let (mut incoming, outgoing) = call.split();
    outgoing.cancel();
    let err = incoming.recv().unwrap_err();
    assert_eq!(err.code(), Code::Cancelled, "{err}");
    assert_eq!(cancelled.load(Ordering::SeqCst), 2);
    drop(call);
    eventually("slabs return", || channel.pool_in_use() == 0);
    assert_eq!(channel.calls_in_flight(), 0);
}

#[test]
fn without_a_fallback_for_its_kind_a_call_is_unimplemented() {
    let unary_only = Router::new().fallback_in_place(|_, _| Ok(()));
    let (_unary, unary_addr) = start("unary-only", unary_only);
    let channel = connect(&unary_addr);
    channel.call(1, b"x", None).unwrap();
    let err = channel
        .server_stream(1, b"x", None)
        .unwrap()
        .recv()
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");

    let streams_only = Router::new().fallback_stream(|_| Ok(()));
    let (_streams, streams_addr) = start("streams-only", streams_only);
    let channel = connect(&streams_addr);
    assert!(channel.open(1, None).unwrap().recv().unwrap().is_none());
    let err = channel.call(1, b"x", None).unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
}
