//! Random descriptor sequences from a client that owns its ends of the
//! rings: whatever it sends, the server neither panics nor hangs, and keeps
//! serving an honest client on another connection.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use shmesh::handshake::{Hello, Limits, PROTOCOL_VERSION, ServiceName};
use shmesh::protocol::{CREDIT, MESSAGE, MORE, OPEN, RETURN, STREAM};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::{SchemaHash, client::Channel, client::ChannelOptions};
use shmesh_shm::descriptor::{Descriptor, Flags};
use shmesh_shm::handle::SlabHandle;

const SCHEMA: SchemaHash = SchemaHash([6; 32]);
const ECHO: u32 = 1;
const ECHO_STREAM: u32 = 2;
const SUM_STREAM: u32 = 3;

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn server() -> (BackgroundServer, String) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let addr = format!("shm://@shmesh-hostile-props-{}", std::process::id());
    let router = Router::new()
        .route(ECHO, |r| Ok(r.payload.to_vec()))
        .route_stream(ECHO_STREAM, |call| {
            while let Some(m) = call.recv()? {
                call.send(&m)?;
            }
            Ok(())
        })
        .route_stream(SUM_STREAM, |call| {
            let mut n = 0u64;
            while let Some(m) = call.recv()? {
                n += m.len() as u64;
            }
            call.send(&n.to_le_bytes())
        });
    let server = Server::bind(&addr, "hostile", SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr)
}

/// One descriptor, described loosely enough to be mostly nonsense.
#[derive(Debug, Clone)]
struct Move {
    call: u64,
    method: u32,
    flags: u32,
    /// Index of a real slab to carry, or a forged handle.
    payload: Option<Result<usize, (u32, u64)>>,
    len: u32,
    aux: u64,
}

fn moves() -> impl Strategy<Value = Vec<Move>> {
    let flag = prop::sample::select(vec![
        OPEN.0,
        MESSAGE.0,
        MORE.0,
        RETURN.0,
        STREAM.0,
        CREDIT.0,
        Flags::END.0,
        Flags::CANCEL.0,
        Flags::STATUS.0,
    ]);
    let one = (
        0u64..4,
        prop::sample::select(vec![ECHO, ECHO_STREAM, SUM_STREAM, 99]),
        prop::collection::vec(flag, 0..4),
        prop::option::of(prop_oneof![
            (0usize..8).prop_map(Ok),
            (any::<u32>(), any::<u64>()).prop_map(Err),
        ]),
        prop_oneof![Just(0u32), 1u32..300, any::<u32>()],
        prop_oneof![Just(0u64), 1u64..40, any::<u64>()],
    )
        .prop_map(|(call, method, flags, payload, len, aux)| Move {
            call,
            method,
            flags: flags.into_iter().fold(0, |a, f| a | f),
            payload,
            len,
            aux,
        });
    prop::collection::vec(one, 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn nothing_a_client_writes_breaks_the_server(moves in moves()) {
        static SERVER: std::sync::OnceLock<(std::sync::Mutex<Option<BackgroundServer>>, String)> =
            std::sync::OnceLock::new();
        let (_, addr) = SERVER.get_or_init(|| {
            let (s, a) = server();
            (std::sync::Mutex::new(Some(s)), a)
        });
        let honest = Channel::connect(addr, &ChannelOptions::new("hostile", SCHEMA)).unwrap();

        let mut conn = shmesh::connect(&addr.parse().unwrap()).unwrap();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            service: ServiceName::new("hostile").unwrap(),
            schema_hash: SCHEMA,
            requested: Limits::default(),
        };
        let (_, fds) = shmesh::client_handshake(&mut conn, &hello).unwrap();
        let mut fds = fds.into_iter();
        let segment = shmesh_shm::segment::Segment::open(fds.next().unwrap()).unwrap();
        let mut ends = shmesh::layout::ClientEnds::open(&segment, fds.next().unwrap()).unwrap();
        let slabs: Vec<SlabHandle> = (0..8)
            .map(|i| ends.pool.alloc(64 + i * 300).unwrap().send())
            .collect();
        for m in &moves {
            let mut d = Descriptor {
                call_id: m.call,
                method_id: m.method,
                flags: Flags(m.flags),
                aux: m.aux,
                ..Default::default()
            };
            match m.payload {
                Some(Ok(i)) => {
                    d.flags = d.flags | Flags::PAYLOAD;
                    d.payload = slabs[i];
                    d.len = m.len.min(64);
                }
                Some(Err((segment, offset))) => {
                    d.flags = d.flags | Flags::PAYLOAD;
                    d.payload = SlabHandle { segment, generation: 1, offset };
                    d.len = m.len;
                }
                None => {}
            }
            if ends.requests.try_push(d).is_err() {
                break;
            }
        }
        ends.server_bell.notify();
        // Let the server take all of it, or hang up, before looking.
        conn.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let give_up = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if ends.requests.is_drained().unwrap_or(true) {
                break;
            }
            if matches!(conn.recv_msg(0), Err(shmesh::RecvError::Closed)) {
                break;
            }
            prop_assert!(std::time::Instant::now() < give_up, "the server neither read nor hung up");
        }
        std::thread::sleep(Duration::from_millis(5));
        // Whatever happened to that connection, the server serves others
        // promptly and nothing panicked.
        let answer = honest.call(ECHO, b"still here", Some(Duration::from_secs(20))).unwrap();
        prop_assert_eq!(&answer[..], b"still here");
        drop(conn);
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }
}
