//! A client that starts large messages and never finishes them cannot make
//! the server hold more than its connection's assembly budget (twice the
//! largest message): the call that would pass it fails with
//! `ResourceExhausted`. Driven by a raw client that owns its ends of the
//! rings, so the order is exact.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use shmesh::SchemaHash;
use shmesh::handshake::{Hello, Limits, PROTOCOL_VERSION, PoolClass, PoolClasses, ServiceName};
use shmesh::protocol::{MESSAGE, MORE, OPEN, RETURN};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::{Code, Status};
use shmesh_shm::descriptor::{Descriptor, Flags};

const SCHEMA: SchemaHash = SchemaHash([2; 32]);
const ECHO: u32 = 1;
const MIB: u64 = 1 << 20;

fn limits() -> Limits {
    Limits {
        pool_classes: PoolClasses::new(vec![
            PoolClass {
                slab_size: 4096,
                count: 64,
            },
            PoolClass {
                slab_size: MIB,
                count: 8,
            },
        ])
        .unwrap(),
        // A budget of 4 MiB.
        max_message: 2 * MIB,
        ..Limits::default()
    }
}

#[test]
fn unfinished_large_messages_are_bounded_per_connection() {
    let addr = format!("shm://@shmesh-assembly-budget-{}", std::process::id());
    let router = Router::new().route(ECHO, |r| Ok(r.payload.to_vec()));
    let mut server = Server::bind(&addr, "budget", SCHEMA, router).unwrap();
    server.set_max_limits(limits());
    let _server = BackgroundServer::spawn(server).unwrap();

    let mut conn = shmesh::connect(&addr.parse().unwrap()).unwrap();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        service: ServiceName::new("budget").unwrap(),
        schema_hash: SCHEMA,
        requested: limits(),
    };
    let (welcome, fds) = shmesh::client_handshake(&mut conn, &hello).unwrap();
    assert_eq!(welcome.granted.max_message, 2 * MIB);
    let mut fds = fds.into_iter();
    let segment = shmesh_shm::segment::Segment::open(fds.next().unwrap()).unwrap();
    let mut ends = shmesh::layout::ClientEnds::open(&segment, fds.next().unwrap()).unwrap();

    // Calls 1 and 2 each send 2 MiB of a message that says there is more:
    // 4 MiB held, the whole budget. Call 3's first chunk passes it.
    let chunk = |call_id: u64, first: bool| {
        let slab = ends.pool.alloc(MIB as usize).unwrap();
        let mut flags = MESSAGE | MORE | RETURN | Flags::PAYLOAD;
        if first {
            flags = flags | OPEN;
        }
        Descriptor {
            call_id,
            method_id: ECHO,
            flags,
            payload: slab.send(),
            len: MIB as u32,
            ..Default::default()
        }
    };
    let sent = [
        chunk(1, true),
        chunk(1, false),
        chunk(2, true),
        chunk(2, false),
        chunk(3, true),
    ];
    for d in sent {
        ends.requests.try_push(d).unwrap();
    }
    ends.server_bell.notify();

    let give_up = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        if let Some(d) = ends.responses.try_pop().unwrap()
            && d.flags.contains(Flags::END)
        {
            break d;
        }
        assert!(
            Instant::now() < give_up,
            "no answer to the call past the budget"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(answer.call_id, 3);
    assert_eq!(answer.status, Code::ResourceExhausted as u32);
    let details = ends
        .peer_pool
        .read(answer.payload, answer.len.into())
        .unwrap();
    let status = Status::decode(answer.status, details).unwrap();
    assert!(status.message().contains("4194304"), "{status}");
}
