//! Deadlines and call metadata the same over shmesh and gRPC: one Greeter
//! served over both, called by the generated client over each transport
//! with the same assertions (the handler sees the deadline; a handler past
//! it is dropped; one finishing after it is `DeadlineExceeded`), and the
//! gRPC bridge called without a transport, so its own status shows.
// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shmesh::server::BackgroundServer;
use shmesh_example_greeter::helloworld::greeter_client::GreeterClient;
use shmesh_example_greeter::helloworld::greeter_server::{Greeter, GreeterServer};
use shmesh_example_greeter::helloworld::{HelloReply, HelloRequest};
use shmesh_protobuf::Request;
use shmesh_protobuf::server::ResponseSink;
use shmesh_protobuf::shmesh::status::{Code, Status};
use tokio_stream::wrappers::TcpListenerStream;

/// A stock tonic client of the same `.proto`.
mod stock {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tonic/helloworld.rs"));
}

/// Held by a handler while it runs: counts a handler future dropped before
/// it ended.
struct Unfinished {
    dropped: Arc<AtomicU64>,
    running: bool,
}

impl Unfinished {
    fn new(dropped: &Arc<AtomicU64>) -> Self {
        Unfinished {
            dropped: dropped.clone(),
            running: true,
        }
    }

    fn finished(mut self) {
        self.running = false;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.running {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Says what it sees of each call; `slow` never answers, `late` answers
/// after the deadline without yielding; its stream greets until stopped.
#[derive(Default)]
struct Watchful {
    dropped: Arc<AtomicU64>,
}

/// `remaining ms|none;peer pid|none;remote address|none`.
fn seen<T>(request: &Request<T>) -> String {
    let or_none = |s: Option<String>| s.unwrap_or_else(|| "none".into());
    format!(
        "{};{};{}",
        or_none(request.remaining().map(|r| r.as_millis().to_string())),
        or_none(request.peer().map(|p| p.pid.to_string())),
        or_none(request.remote_addr().map(|a| a.to_string())),
    )
}

impl Greeter for Watchful {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        match request.get_ref().name.as_str() {
            "slow" => {
                let unfinished = Unfinished::new(&self.dropped);
                std::future::pending::<()>().await;
                unfinished.finished();
                Err(Status::internal("unreachable"))
            }
            "late" => {
                let left = request.remaining().unwrap_or_default();
                std::thread::sleep(left + Duration::from_millis(100));
                Ok(HelloReply {
                    message: "too late".into(),
                })
            }
            _ => Ok(HelloReply {
                message: seen(&request),
            }),
        }
    }

    async fn say_hello_many_times(
        &self,
        request: Request<HelloRequest>,
        mut responses: ResponseSink<HelloReply>,
    ) -> Result<(), Status> {
        let unfinished = Unfinished::new(&self.dropped);
        let greeted = async {
            responses
                .send(&HelloReply {
                    message: seen(&request),
                })
                .await?;
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                responses
                    .send(&HelloReply {
                        message: "again".into(),
                    })
                    .await?;
            }
        };
        let result: Result<(), Status> = greeted.await;
        unfinished.finished();
        result
    }
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest {
        name: name.into(),
        times: 0,
    }
}

/// The shmesh address and the gRPC port one [`Watchful`] is served at.
struct Served {
    greeter: Arc<Watchful>,
    shm: String,
    grpc: SocketAddr,
    _shmesh: BackgroundServer,
    grpc_server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.grpc_server.abort();
    }
}

async fn serve(test: &str) -> Served {
    let greeter = Arc::new(Watchful::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreeterServer::from_arc(greeter.clone()).into_grpc())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let shm = format!(
        "shm://@shmesh-greeter-deadlines-{test}-{}",
        std::process::id()
    );
    let server = GreeterServer::from_arc(greeter.clone()).bind(&shm).unwrap();
    Served {
        greeter,
        shm,
        grpc,
        _shmesh: BackgroundServer::spawn(server).unwrap(),
        grpc_server,
    }
}

impl Served {
    /// The generated client over each transport, named.
    async fn clients(&self) -> [(&'static str, GreeterClient); 2] {
        let shm = GreeterClient::connect(&self.shm).await.unwrap();
        let grpc = GreeterClient::connect(&format!("http://{}", self.grpc))
            .await
            .unwrap();
        [("shmesh", shm), ("grpc", grpc)]
    }

    fn dropped(&self) -> u64 {
        self.greeter.dropped.load(Ordering::SeqCst)
    }

    /// Waits until `n` handler futures in all were dropped unfinished.
    async fn dropped_reaches(&self, n: u64, transport: &str) {
        let give_up = Instant::now() + Duration::from_secs(20);
        while self.dropped() < n {
            assert!(
                Instant::now() < give_up,
                "{transport}: the handler was never dropped"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// `seen`'s three parts.
fn parts(message: &str) -> (String, String, String) {
    let mut parts = message.split(';').map(str::to_owned);
    let mut next = || parts.next().unwrap();
    (next(), next(), next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handlers_see_the_deadline_and_the_caller_over_both_transports() {
    let served = serve("seen").await;
    for (transport, client) in served.clients().await {
        let reply = client.say_hello(hello("x")).await.unwrap();
        let (remaining, peer, addr) = parts(&reply.message);
        assert_eq!(remaining, "none", "{transport}");

        let timed = client.clone().with_timeout(Duration::from_secs(30));
        let reply = timed.say_hello(hello("x")).await.unwrap();
        let (remaining, ..) = parts(&reply.message);
        let ms: u64 = remaining.parse().unwrap();
        assert!(ms > 20_000 && ms <= 30_000, "{transport}: {ms} ms");

        // A stream's handler sees it too.
        let mut replies = timed.say_hello_many_times(hello("x")).await.unwrap();
        let first = replies.message().await.unwrap().unwrap();
        let (remaining, ..) = parts(&first.message);
        let ms: u64 = remaining.parse().unwrap();
        assert!(ms > 20_000 && ms <= 30_000, "{transport}: {ms} ms");
        drop(replies);

        // Who called: credentials over shmesh, an address over TCP.
        match transport {
            "shmesh" => {
                assert_eq!(peer, std::process::id().to_string());
                assert_eq!(addr, "none");
            }
            _ => {
                assert_eq!(peer, "none");
                let addr: SocketAddr = addr.parse().unwrap();
                assert!(addr.ip().is_loopback(), "{addr}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_past_the_deadline_is_dropped_over_both_transports() {
    let served = serve("dropped").await;
    for (transport, client) in served.clients().await {
        let before = served.dropped();
        let client = client.with_timeout(Duration::from_millis(200));
        let err = client.say_hello(hello("slow")).await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{transport}: {err}");
        served.dropped_reaches(before + 1, transport).await;

        // A stream too: it ends with the deadline, its handler dropped.
        let mut replies = client.say_hello_many_times(hello("x")).await.unwrap();
        let err = loop {
            match replies.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("{transport}: the stream ended without its deadline"),
                Err(status) => break status,
            }
        };
        assert_eq!(err.code(), Code::DeadlineExceeded, "{transport}: {err}");
        served.dropped_reaches(before + 2, transport).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_finishing_after_the_deadline_is_deadline_exceeded_over_both_transports() {
    let served = serve("late").await;
    for (transport, client) in served.clients().await {
        let client = client.with_timeout(Duration::from_millis(100));
        let err = client.say_hello(hello("late")).await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{transport}: {err}");
    }
}

/// The gRPC front-end called in process, with no transport and so no
/// timer of tonic's in the way: its own answers show.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_grpc_bridge_enforces_grpc_timeout_itself() {
    let greeter = Arc::new(Watchful::default());
    let service = GreeterServer::from_arc(greeter.clone()).into_grpc();
    let mut client = stock::greeter_client::GreeterClient::new(service);
    let hello = |name: &str| stock::HelloRequest {
        name: name.into(),
        times: 0,
    };
    let timed = |name: &str, timeout: Duration| {
        let mut request = tonic::Request::new(hello(name));
        request.set_timeout(timeout);
        request
    };

    // The header's deadline reaches the handler; no address in process.
    let reply = client
        .say_hello(timed("x", Duration::from_secs(30)))
        .await
        .unwrap()
        .into_inner();
    let (remaining, peer, addr) = parts(&reply.message);
    let ms: u64 = remaining.parse().unwrap();
    assert!(ms > 20_000 && ms <= 30_000, "{ms} ms");
    assert_eq!((peer.as_str(), addr.as_str()), ("none", "none"));

    // Past the deadline: dropped, DeadlineExceeded (nothing else would
    // stop this call).
    let slow = client.say_hello(timed("slow", Duration::from_millis(100)));
    let status = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the bridge never gave up on the handler")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
    assert_eq!(greeter.dropped.load(Ordering::SeqCst), 1);

    // Finished after it: DeadlineExceeded, not the late answer.
    let status = client
        .say_hello(timed("late", Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");

    // A stream's end carries it too.
    let mut replies = client
        .say_hello_many_times(timed("x", Duration::from_millis(100)))
        .await
        .unwrap()
        .into_inner();
    let ended = async {
        loop {
            match replies.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without its deadline"),
                Err(status) => break status,
            }
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(20), ended)
        .await
        .expect("the bridge never ended the stream");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");

    // A malformed header is refused before the handler runs.
    for value in ["soon", "-5S", "123456789m", "10"] {
        let mut request = tonic::Request::new(hello("x"));
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
        let status = client.say_hello(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{value}: {status}");
        assert!(status.message().contains("grpc-timeout"), "{status}");
    }
}
