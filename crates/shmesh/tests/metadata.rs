//! Call metadata over real connections: unary calls of every handler kind
//! (inline, in place, blocking, fallback, async), chunked requests, streams
//! blocking and async, calls without metadata, a raw client writing broken
//! blocks (answered `InvalidArgument`, connection kept), and limits refused
//! on the client.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use shmesh::asynchronous::AsyncChannel;
use shmesh::client::{Channel, ChannelOptions};
use shmesh::handshake::{Hello, Limits, PROTOCOL_VERSION, ServiceName};
use shmesh::protocol::{MESSAGE, METADATA, OPEN, RETURN};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::{Code, Status};
use shmesh::{Metadata, MetadataError, SchemaHash};
use shmesh_shm::descriptor::{Descriptor, Flags};

const SCHEMA: SchemaHash = SchemaHash([11; 32]);
const INLINE: u32 = 1;
const IN_PLACE: u32 = 2;
const BLOCKING: u32 = 3;
const ASYNC: u32 = 4;
const STREAM: u32 = 5;
const ASYNC_STREAM: u32 = 6;
/// Not routed: served by the fallback.
const OTHER: u32 = 99;

/// What a handler saw: the metadata, the message's length and checksum.
fn seen(metadata: &Metadata, payload: &[u8]) -> String {
    let entries: Vec<String> = metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let sum = payload
        .iter()
        .fold(0u64, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)));
    format!("{}|{}|{sum}", entries.join(";"), payload.len())
}

fn start(test: &str) -> (BackgroundServer, String) {
    let addr = format!("shm://@shmesh-metadata-{test}-{}", std::process::id());
    let router = Router::new()
        .route(INLINE, |r| Ok(seen(r.metadata(), r.payload).into_bytes()))
        .route_in_place(IN_PLACE, |r, reply| {
            let answer = seen(r.metadata(), r.payload);
            reply.loan(answer.len())?.copy_from_slice(answer.as_bytes());
            Ok(())
        })
        .route_blocking(BLOCKING, |r| Ok(seen(r.metadata(), r.payload).into_bytes()))
        .route_async(ASYNC, |r| async move {
            Ok(seen(r.metadata(), r.payload()).into_bytes())
        })
        .route_stream(STREAM, |call| {
            // First the metadata, then each message's length and checksum.
            let metadata = call.metadata().clone();
            call.send(seen(&metadata, b"").as_bytes())?;
            while let Some(m) = call.recv()? {
                call.send(seen(&Metadata::new(), &m).as_bytes())?;
            }
            Ok(())
        })
        .route_stream_async(ASYNC_STREAM, |mut call| async move {
            let first = seen(call.metadata(), b"");
            call.send(first.as_bytes()).await?;
            while let Some(m) = call.recv().await? {
                let answer = seen(&Metadata::new(), &m);
                call.send(answer.as_bytes()).await?;
            }
            Ok(())
        })
        .fallback_in_place(|r, reply| {
            let answer = seen(r.metadata(), r.payload);
            reply.loan(answer.len())?.copy_from_slice(answer.as_bytes());
            Ok(())
        });
    let server = Server::bind(&addr, "meta", SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr)
}

fn trace() -> Metadata {
    let mut m = Metadata::new();
    m.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .unwrap();
    m.insert("tenant", "blue green").unwrap();
    m
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn unary_calls_carry_metadata_to_every_kind_of_handler() {
    let (_server, addr) = start("unary");
    let channel = Channel::connect(&addr, &ChannelOptions::new("meta", SCHEMA)).unwrap();
    let md = trace();
    let large = vec![7u8; 3 << 20];
    for method in [INLINE, IN_PLACE, BLOCKING, ASYNC, OTHER] {
        for payload in [&b""[..], b"hello", &large] {
            let answer = channel.call_with(method, payload, &md, None).unwrap();
            assert_eq!(text(&answer), seen(&md, payload), "method {method}");
            // Without metadata: the handler sees none, and the same bytes.
            let answer = channel.call(method, payload, None).unwrap();
            assert_eq!(
                text(&answer),
                seen(&Metadata::new(), payload),
                "method {method}"
            );
        }
        // Loaned in place, then sent: one descriptor with block and
        // message.
        let mut buf = channel.loan_with(5, &md, None).unwrap();
        assert!(buf.has_metadata());
        buf.copy_from_slice(b"world");
        let answer = channel.send(method, buf, None).unwrap();
        assert_eq!(text(&answer), seen(&md, b"world"));
        // Empty metadata is a plain call.
        let answer = channel
            .call_with(method, b"x", &Metadata::new(), None)
            .unwrap();
        assert_eq!(text(&answer), seen(&Metadata::new(), b"x"));
    }
    // Nothing leaked: every request slab came back.
    let give_up = Instant::now() + Duration::from_secs(5);
    while channel.pool_in_use() != 0 {
        assert!(
            Instant::now() < give_up,
            "{} slabs held",
            channel.pool_in_use()
        );
        channel.call(INLINE, b"", None).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn streams_carry_metadata_on_their_opening() {
    let (_server, addr) = start("stream");
    let channel = Channel::connect(&addr, &ChannelOptions::new("meta", SCHEMA)).unwrap();
    let md = trace();
    let large = vec![3u8; (1 << 20) + 17];
    for method in [STREAM, ASYNC_STREAM] {
        // Opened at once (a bare opening with the block), then messages.
        let mut call = channel.open_with(method, &md, None).unwrap();
        assert_eq!(text(&call.recv().unwrap().unwrap()), seen(&md, b""));
        for m in [&b"ab"[..], &large, b""] {
            call.send(m).unwrap();
            assert_eq!(
                text(&call.recv().unwrap().unwrap()),
                seen(&Metadata::new(), m)
            );
        }
        call.close_send().unwrap();
        assert!(call.recv().unwrap().is_none());

        // Server streaming: block and message in the opening descriptor,
        // chunked or not.
        for request in [&b"one"[..], &large] {
            let mut call = channel
                .server_stream_with(method, request, &md, None)
                .unwrap();
            assert_eq!(text(&call.recv().unwrap().unwrap()), seen(&md, b""));
            assert_eq!(
                text(&call.recv().unwrap().unwrap()),
                seen(&Metadata::new(), request)
            );
            assert!(call.recv().unwrap().is_none());
        }

        // A loaned buffer with metadata opens the call.
        let mut buf = channel.loan_with(3, &md, None).unwrap();
        buf.copy_from_slice(b"abc");
        let mut call = channel.server_stream_buf(method, buf, None).unwrap();
        assert_eq!(text(&call.recv().unwrap().unwrap()), seen(&md, b""));
        assert_eq!(
            text(&call.recv().unwrap().unwrap()),
            seen(&Metadata::new(), b"abc")
        );
        assert!(call.recv().unwrap().is_none());

        // Not on a call that has opened.
        let mut call = channel.open(method, None).unwrap();
        let buf = channel.loan_with(3, &md, None).unwrap();
        let refused = call.send_buf(buf).unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
        assert_eq!(
            text(&call.recv().unwrap().unwrap()),
            seen(&Metadata::new(), b"")
        );
        call.close_send().unwrap();
        assert!(call.recv().unwrap().is_none());
    }
}

#[test]
fn async_clients_send_metadata() {
    let (_server, addr) = start("async");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = AsyncChannel::connect(&addr, &ChannelOptions::new("meta", SCHEMA))
            .await
            .unwrap();
        let md = trace();
        let large = vec![9u8; 2 << 20];
        for method in [INLINE, ASYNC, OTHER] {
            for payload in [&b"hi"[..], &large] {
                let answer = channel.call_with(method, payload, &md, None).await.unwrap();
                assert_eq!(text(&answer), seen(&md, payload));
            }
            let mut buf = channel.loan_wait_with(2, &md, None).await.unwrap();
            buf.copy_from_slice(b"yo");
            let answer = channel.send(method, buf, None).await.unwrap();
            assert_eq!(text(&answer), seen(&md, b"yo"));
        }
        for method in [STREAM, ASYNC_STREAM] {
            let mut call = channel.open_with(method, &md, None).unwrap();
            assert_eq!(text(&call.recv().await.unwrap().unwrap()), seen(&md, b""));
            call.send(b"x").await.unwrap();
            assert_eq!(
                text(&call.recv().await.unwrap().unwrap()),
                seen(&Metadata::new(), b"x")
            );
            call.close_send().unwrap();
            assert!(call.recv().await.unwrap().is_none());

            let mut call = channel
                .server_stream_with(method, &large, &md, None)
                .await
                .unwrap();
            assert_eq!(text(&call.recv().await.unwrap().unwrap()), seen(&md, b""));
            assert_eq!(
                text(&call.recv().await.unwrap().unwrap()),
                seen(&Metadata::new(), &large)
            );
            assert!(call.recv().await.unwrap().is_none());
        }
    });
}

#[test]
fn limits_are_refused_on_the_client() {
    let mut md = Metadata::new();
    assert!(matches!(
        md.insert("x", &"v".repeat(2000)),
        Err(MetadataError::ValueTooLong { len: 2000, .. })
    ));
    assert_eq!(
        md.insert("Bad", "v"),
        Err(MetadataError::KeyByte { byte: b'B', at: 0 })
    );
    for i in 0..3 {
        md.insert(&format!("k{i}"), &"v".repeat(1024)).unwrap();
    }
    assert!(matches!(
        md.insert("k3", &"v".repeat(1024)),
        Err(MetadataError::BlockTooLarge { .. })
    ));
    assert_eq!(md.len(), 3);
}

/// A raw client: owns its ends of the rings, writes descriptors as it
/// likes.
struct Raw {
    ends: shmesh::layout::ClientEnds,
    _conn: shmesh::Connection,
    _segment: std::sync::Arc<shmesh_shm::segment::Segment>,
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        let mut conn = shmesh::connect(&addr.parse().unwrap()).unwrap();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            service: ServiceName::new("meta").unwrap(),
            schema_hash: SCHEMA,
            requested: Limits::default(),
        };
        let (_welcome, fds) = shmesh::client_handshake(&mut conn, &hello).unwrap();
        let mut fds = fds.into_iter();
        let segment = shmesh_shm::segment::Segment::open(fds.next().unwrap()).unwrap();
        let ends = shmesh::layout::ClientEnds::open(&segment, fds.next().unwrap()).unwrap();
        Raw {
            ends,
            _conn: conn,
            _segment: segment,
        }
    }

    /// Sends `bytes` (if any) as call `call_id`'s opening with `flags`.
    fn open(&mut self, call_id: u64, method: u32, flags: Flags, bytes: Option<&[u8]>) {
        let mut d = Descriptor {
            call_id,
            method_id: method,
            flags: OPEN | flags,
            ..Default::default()
        };
        if let Some(bytes) = bytes {
            let mut slab = self.ends.pool.alloc(bytes.len().max(1)).unwrap();
            slab[..bytes.len()].copy_from_slice(bytes);
            d.flags = d.flags | Flags::PAYLOAD;
            d.len = bytes.len() as u32;
            d.payload = slab.send();
        }
        self.ends.requests.try_push(d).unwrap();
        self.ends.server_bell.notify();
    }

    /// The call's end: its status and message.
    fn end(&mut self, call_id: u64) -> (Result<Vec<u8>, Status>, Descriptor) {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(d) = self.ends.responses.try_pop().unwrap()
                && d.flags.contains(Flags::END)
            {
                assert_eq!(d.call_id, call_id);
                let bytes = if d.flags.contains(Flags::PAYLOAD) {
                    self.ends
                        .peer_pool
                        .read(d.payload, d.len.into())
                        .unwrap()
                        .to_vec()
                } else {
                    Vec::new()
                };
                let result = if d.flags.contains(Flags::STATUS) {
                    Err(Status::decode(d.status, &bytes).unwrap())
                } else {
                    Ok(bytes)
                };
                return (result, d);
            }
            assert!(Instant::now() < give_up, "no answer to call {call_id}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn broken_blocks_fail_their_call_and_the_connection_goes_on() {
    let (_server, addr) = start("hostile");
    let mut raw = Raw::connect(&addr);
    let unary = MESSAGE | Flags::END;
    let mut good = vec![0u8; trace().encoded_len()];
    trace().encode_into(&mut good);
    let block = |entries: &[u8]| {
        let mut b = (entries.len() as u16).to_le_bytes().to_vec();
        b.extend_from_slice(entries);
        b
    };
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("no payload", None, "claims"),
        ("one byte", Some(vec![7]), "claims"),
        ("overrun", Some(vec![200, 0, 1, b'a']), "claims 200"),
        ("too large", Some(vec![0xff, 0xff]), "exceeds"),
        ("cut key", Some(block(&[9, b'a'])), "inside the key"),
        ("upper key", Some(block(&[1, b'A', 0, 0])), "key holds byte"),
        (
            "control byte",
            Some(block(&[1, b'a', 1, 0, 0x07])),
            "printable",
        ),
        (
            "twice",
            Some(block(&[1, b'a', 0, 0, 1, b'a', 0, 0])),
            "twice",
        ),
    ];
    let mut id = 1;
    for (name, bytes, says) in cases {
        for method in [INLINE, STREAM, ASYNC] {
            raw.open(id, method, unary | METADATA, bytes.as_deref());
            let (result, _) = raw.end(id);
            let status = result.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status}");
            assert!(
                status.message().contains("metadata") && status.message().contains(says),
                "{name}: {status}"
            );
            id += 1;
        }
    }
    // The connection is still served: a good block, then no block at all
    // (a plain opening, exactly as before metadata existed).
    let mut with_message = good.clone();
    with_message.extend_from_slice(b"after");
    raw.open(id, INLINE, unary | METADATA, Some(&with_message));
    assert_eq!(
        text(&raw.end(id).0.unwrap()),
        seen(&trace(), b"after"),
        "a good block"
    );
    id += 1;
    raw.open(id, INLINE, unary, Some(b"plain"));
    assert_eq!(
        text(&raw.end(id).0.unwrap()),
        seen(&Metadata::new(), b"plain")
    );
    id += 1;
    // The flag means nothing off the opening descriptor: a bare opening
    // with the block alone (given back), on a unary method, runs with an
    // empty message.
    raw.open(id, INLINE, Flags::END | METADATA | RETURN, Some(&good));
    assert_eq!(text(&raw.end(id).0.unwrap()), seen(&trace(), b""));
}
