//! The market-data service in one process (the server on its own threads):
//! nested books round-trip in both read modes on both sides, garbage is
//! `Internal` naming the type, messages above the largest slab travel in
//! chunks and are read from a copy, over-size messages are
//! `ResourceExhausted`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use shmesh::asynchronous::AsyncChannel;
use shmesh::client::{Channel, ChannelOptions};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::Code;
use shmesh_example_marketdata::{
    Market, OrderBook, PUBLISH, SCHEMA, SERVICE, SNAPSHOT, SnapshotRequest, router, same_book,
    sample_book,
};
use shmesh_rkyv::{
    AsyncClient, Client, FRAME_TAG, Method, ReadMode, ReadPath, RouterExt, TrustPolicy, TrustedPeer,
};

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(20));

fn address(test: &str) -> String {
    format!(
        "shm://@shmesh-marketdata-test-{test}-{}",
        std::process::id()
    )
}

fn serve(test: &str, router: Router) -> (BackgroundServer, String) {
    let addr = address(test);
    let server = Server::bind(&addr, SERVICE, SCHEMA, router).unwrap();
    (BackgroundServer::spawn(server).unwrap(), addr)
}

fn market(test: &str, policy: TrustPolicy) -> (BackgroundServer, String) {
    serve(test, router(Arc::new(Market::default()), policy))
}

fn connect(addr: &str) -> Channel {
    Channel::connect(addr, &ChannelOptions::new(SERVICE, SCHEMA)).unwrap()
}

fn snapshot_of(symbols: &[&str], depth: u32) -> SnapshotRequest {
    SnapshotRequest {
        symbols: symbols.iter().map(|s| s.to_string()).collect(),
        depth,
    }
}

#[test]
fn nested_books_round_trip_in_every_read_mode() {
    for (n, policy) in [TrustPolicy::CopyAll, TrustPolicy::SameUser]
        .into_iter()
        .enumerate()
    {
        let (_server, addr) = market(&format!("modes-{n}"), policy);
        let trusted = ReadMode::InPlace(TrustedPeer::assume_trusted());
        for mode in [ReadMode::Copied, trusted] {
            let client = Client::new(connect(&addr), mode);
            let expected_path = if mode == ReadMode::Copied {
                ReadPath::Copied
            } else {
                ReadPath::InPlace
            };
            let book = sample_book("XSHM", "ACME", 7, 50);
            let ack = client.call(&PUBLISH, &book, TIMEOUT).unwrap();
            assert_eq!(ack.path(), expected_path);
            assert_eq!(ack.sequence, 7);
            assert_eq!(ack.levels, 100);
            assert_eq!(ack.spread.as_ref().map(|s| s.to_native()), Some(2));
            assert_eq!(ack.traded, 60);
            // The server reads in place exactly when its policy trusts us.
            assert_eq!(ack.read_in_place, policy == TrustPolicy::SameUser);

            let snapshot = client
                .call(&SNAPSHOT, &snapshot_of(&["ACME", "NOPE"], 60), TIMEOUT)
                .unwrap();
            assert_eq!(snapshot.path(), expected_path);
            assert_eq!(snapshot.read_in_place, policy == TrustPolicy::SameUser);
            assert_eq!(snapshot.books.len(), 1);
            assert!(same_book(&snapshot.books[0], &book));
            let missing: Vec<&str> = snapshot.missing.iter().map(|s| s.as_str()).collect();
            assert_eq!(missing, ["NOPE"]);

            // Cut to a depth: nested vectors shorter than published.
            let cut = client
                .call(&SNAPSHOT, &snapshot_of(&["ACME"], 3), TIMEOUT)
                .unwrap();
            let mut expected = book.clone();
            expected.bids.truncate(3);
            expected.asks.truncate(3);
            assert!(same_book(&cut.books[0], &expected));
        }
    }
    assert!(PUBLISH.request_size().archived() > 0);
}

#[test]
fn same_user_clients_trust_a_server_of_this_process() {
    let (_server, addr) = market("same-user", TrustPolicy::SameUser);
    let channel = connect(&addr);
    assert!(TrustedPeer::from_credentials(&channel.peer().unwrap()).is_some());
    let client = Client::trusting_same_user(channel);
    assert!(matches!(client.mode(), ReadMode::InPlace(_)));
    let ack = client
        .call(&PUBLISH, &sample_book("XSHM", "ACME", 1, 4), TIMEOUT)
        .unwrap();
    assert_eq!(ack.path(), ReadPath::InPlace);
    assert!(ack.read_in_place);
}

#[test]
fn the_async_client_round_trips_too() {
    let (_server, addr) = market("async", TrustPolicy::SameUser);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let options = ChannelOptions::new(SERVICE, SCHEMA);
        let channel = AsyncChannel::connect(&addr, &options).await.unwrap();
        for client in [
            AsyncClient::trusting_same_user(channel.clone()),
            AsyncClient::new(channel, ReadMode::Copied),
        ] {
            let calls = (0..8u64).map(|i| {
                let client = client.clone();
                async move {
                    let symbol = format!("SYM{i}");
                    let book = sample_book("XASY", &symbol, i, 1 + i as usize * 10);
                    let ack = client.call(&PUBLISH, &book, TIMEOUT).await.unwrap();
                    assert_eq!(ack.sequence, i);
                    let snapshot = client
                        .call(&SNAPSHOT, &snapshot_of(&[&symbol], 1000), TIMEOUT)
                        .await
                        .unwrap();
                    assert!(same_book(&snapshot.books[0], &book));
                    snapshot.path()
                }
            });
            let mut tasks = Vec::new();
            for call in calls {
                tasks.push(tokio::spawn(call));
            }
            for task in tasks {
                let path = task.await.unwrap();
                let expected = match client.mode() {
                    ReadMode::Copied => ReadPath::Copied,
                    ReadMode::InPlace(_) => ReadPath::InPlace,
                };
                assert_eq!(path, expected);
            }
        }
    });
}

/// Bytes that are no frame, and frames whose archive is garbage.
fn garbage() -> Vec<Vec<u8>> {
    let mut framed = vec![0xA5u8; 120];
    framed.extend_from_slice(&120u32.to_le_bytes());
    framed.extend_from_slice(&FRAME_TAG);
    let mut lying = vec![0u8; 64];
    lying.extend_from_slice(&u32::MAX.to_le_bytes());
    lying.extend_from_slice(&FRAME_TAG);
    vec![
        Vec::new(),
        b"not a frame at all".to_vec(),
        vec![0xff; 4096],
        framed,
        lying,
    ]
}

#[test]
fn garbage_requests_are_internal_naming_the_type_and_the_server_goes_on() {
    for (n, policy) in [TrustPolicy::CopyAll, TrustPolicy::SameUser]
        .into_iter()
        .enumerate()
    {
        let (_server, addr) = market(&format!("garbage-req-{n}"), policy);
        let channel = connect(&addr);
        for bytes in garbage() {
            for method in [PUBLISH.id(), SNAPSHOT.id()] {
                let status = channel.call(method, &bytes, TIMEOUT).unwrap_err();
                assert_eq!(status.code(), Code::Internal, "{status}");
                let type_name = if method == PUBLISH.id() {
                    "OrderBook"
                } else {
                    "SnapshotRequest"
                };
                assert!(status.message().contains(type_name), "{status}");
            }
        }
        // Still serving, the same connection included.
        let client = Client::trusting_same_user(channel);
        let ack = client
            .call(&PUBLISH, &sample_book("XSHM", "ACME", 3, 2), TIMEOUT)
            .unwrap();
        assert_eq!(ack.sequence, 3);
    }
}

#[test]
fn garbage_responses_are_internal_naming_the_type() {
    let answers = Arc::new(garbage());
    let count = answers.len();
    let served = answers.clone();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = Router::new().route(PUBLISH.id(), move |_| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(served[i % count].clone())
    });
    let (_server, addr) = serve("garbage-resp", router);
    let trusted = ReadMode::InPlace(TrustedPeer::assume_trusted());
    for mode in [ReadMode::Copied, trusted] {
        let client = Client::new(connect(&addr), mode);
        for _ in 0..count {
            let status = client
                .call(&PUBLISH, &sample_book("XSHM", "ACME", 1, 1), TIMEOUT)
                .unwrap_err();
            assert_eq!(status.code(), Code::Internal, "{status}");
            assert!(status.message().contains("PublishAck"), "{status}");
        }
    }
}

#[test]
fn messages_above_the_largest_slab_travel_in_chunks_and_are_read_from_a_copy() {
    let (_server, addr) = market("large", TrustPolicy::SameUser);
    let channel = connect(&addr);
    let largest = channel
        .limits()
        .pool_classes
        .as_slice()
        .iter()
        .map(|c| c.slab_size)
        .max()
        .unwrap();
    // 24 bytes a level: well above the largest slab (1 MiB by default).
    let depth = (largest as usize / 48) * 3 / 2;
    let book = sample_book("XBIG", "HUGE", 1, depth);
    let client = Client::new(channel, ReadMode::InPlace(TrustedPeer::assume_trusted()));
    let ack = client.call(&PUBLISH, &book, TIMEOUT).unwrap();
    assert_eq!(ack.levels.to_native() as usize, 2 * depth);
    // The small ack came in one slab: read in place.
    assert_eq!(ack.path(), ReadPath::InPlace);
    // The large snapshot came in chunks, assembled on the heap: copied into
    // an aligned buffer, whatever the mode.
    let snapshot = client
        .call(&SNAPSHOT, &snapshot_of(&["HUGE"], u32::MAX), TIMEOUT)
        .unwrap();
    assert_eq!(snapshot.path(), ReadPath::Copied);
    assert!(same_book(&snapshot.books[0], &book));
    // The request size was learnt: the next large request fits the first
    // loan, and a small one after it still works.
    assert!(PUBLISH.request_size().archived() > largest as usize);
    let again = sample_book("XBIG", "HUGE", 2, depth);
    assert_eq!(client.call(&PUBLISH, &again, TIMEOUT).unwrap().sequence, 2);
    let small = sample_book("XBIG", "TINY", 3, 1);
    assert_eq!(client.call(&PUBLISH, &small, TIMEOUT).unwrap().sequence, 3);
}

#[test]
fn over_size_messages_are_resource_exhausted() {
    let (_server, addr) = market("over-size", TrustPolicy::SameUser);
    // A normal channel publishes a large book.
    let big = sample_book("XBIG", "WIDE", 1, 20_000);
    Client::trusting_same_user(connect(&addr))
        .call(&PUBLISH, &big, TIMEOUT)
        .unwrap();
    // A channel limited to 64 KiB messages can neither send nor receive it.
    let mut options = ChannelOptions::new(SERVICE, SCHEMA);
    options.limits.max_message = 64 << 10;
    let client = Client::trusting_same_user(Channel::connect(&addr, &options).unwrap());
    let status = client.call(&PUBLISH, &big, TIMEOUT).unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("OrderBook"), "{status}");
    let status = client
        .call(&SNAPSHOT, &snapshot_of(&["WIDE"], u32::MAX), TIMEOUT)
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    // Small messages still pass on it.
    let ack = client
        .call(&PUBLISH, &sample_book("XSHM", "SMALL", 5, 3), TIMEOUT)
        .unwrap();
    assert_eq!(ack.sequence, 5);
}

/// A method whose handler answers with a `Resp` it keeps, through an `Arc`
/// (the bench's way), and a blocking server reading replies of any size.
#[test]
fn handlers_may_answer_with_a_shared_response() {
    static ECHO_BOOK: Method<OrderBook, OrderBook> = Method::new(9);
    let kept = Arc::new(sample_book("XKEEP", "KEPT", 9, 300));
    let answer = kept.clone();
    let router = Router::new().route_archived(&ECHO_BOOK, TrustPolicy::SameUser, move |book, _| {
        if !same_book(book, &answer) {
            return Err(shmesh::status::Status::invalid_argument(
                "not the kept book",
            ));
        }
        Ok(answer.clone())
    });
    let (_server, addr) = serve("shared", router);
    let client = Client::trusting_same_user(connect(&addr));
    for _ in 0..3 {
        let echoed = client.call(&ECHO_BOOK, &kept, TIMEOUT).unwrap();
        assert!(same_book(&echoed, &kept));
    }
}
