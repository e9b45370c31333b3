//! The generated Greeter client and server over shmesh: in-process with a
//! background server, and between real processes with the binaries.
// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shmesh::SchemaHash;
use shmesh::client::{Channel, ChannelOptions};
use shmesh::server::{BackgroundServer, Router, Server};
use shmesh::status::Code;
use shmesh_example_greeter::helloworld::greeter_blocking_client::GreeterBlockingClient;
use shmesh_example_greeter::helloworld::greeter_client::GreeterClient;
use shmesh_example_greeter::helloworld::greeter_server::{Greeter, GreeterServer};
use shmesh_example_greeter::helloworld::{HelloReply, HelloRequest, greeter_schema};
use shmesh_example_greeter::{MAX_TIMES, MyGreeter};
use shmesh_protobuf::Request;
use shmesh_protobuf::server::ResponseSink;
use shmesh_protobuf::shmesh::status::Status;

fn address(test: &str) -> String {
    format!("shm://@shmesh-greeter-test-{}-{test}", std::process::id())
}

/// A greeter server on a thread of its own (bound outside any runtime, so
/// it runs its handlers on a runtime of its own).
fn serve(test: &str) -> (String, BackgroundServer) {
    let address = address(test);
    let server = GreeterServer::new(MyGreeter).bind(&address).unwrap();
    (address, BackgroundServer::spawn(server).unwrap())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn request(name: &str, times: u32) -> HelloRequest {
    HelloRequest {
        name: name.into(),
        times,
    }
}

#[test]
fn async_unary_call_greets() {
    let (address, _server) = serve("async-unary");
    runtime().block_on(async {
        let client = GreeterClient::connect(&address).await.unwrap();
        let reply = client.say_hello(request("world", 0)).await.unwrap();
        assert_eq!(reply.message, "Hello world!");
        // By reference too, and with a timeout.
        let client = client.with_timeout(Duration::from_secs(5));
        let reply = client.say_hello(&request("shmesh", 0)).await.unwrap();
        assert_eq!(reply.message, "Hello shmesh!");
    });
}

#[test]
fn async_server_streaming_call_sends_every_greeting_then_ends() {
    let (address, _server) = serve("async-stream");
    runtime().block_on(async {
        let client = GreeterClient::connect(&address).await.unwrap();
        let mut replies = client
            .say_hello_many_times(request("stream", 5))
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(reply) = replies.message().await.unwrap() {
            got.push(reply.message);
        }
        let expected: Vec<_> = (1..=5).map(|i| format!("Hello stream #{i}!")).collect();
        assert_eq!(got, expected);

        // The handler's error ends the stream with its status.
        let mut replies = client
            .say_hello_many_times(request("greedy", MAX_TIMES + 1))
            .await
            .unwrap();
        let status = replies.message().await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    });
}

#[test]
fn blocking_client_makes_both_kinds_of_call() {
    let (address, _server) = serve("blocking");
    let client = GreeterBlockingClient::connect(&address).unwrap();
    assert_eq!(
        client.say_hello(request("thread", 0)).unwrap().message,
        "Hello thread!"
    );
    let replies: Vec<_> = client
        .say_hello_many_times(request("iter", 3))
        .unwrap()
        .map(|r| r.unwrap().message)
        .collect();
    assert_eq!(
        replies,
        ["Hello iter #1!", "Hello iter #2!", "Hello iter #3!"]
    );
}

#[test]
fn method_ids_are_positions_in_the_service() {
    assert_eq!(greeter_schema::SAY_HELLO, 1);
    assert_eq!(greeter_schema::SAY_HELLO_MANY_TIMES, 2);
    assert_eq!(greeter_schema::SERVICE_NAME, "helloworld.Greeter");
}

/// A raw channel to the greeter, to send it what no generated client would.
fn raw_channel(address: &str) -> Channel {
    Channel::connect(address, &greeter_schema::channel_options()).unwrap()
}

#[test]
fn a_request_that_does_not_decode_is_internal_naming_its_type() {
    let (address, _server) = serve("garbage");
    let channel = raw_channel(&address);
    let garbage = [0xff, 0xff, 0xff, 0xff];
    for method in [
        greeter_schema::SAY_HELLO,
        greeter_schema::SAY_HELLO_MANY_TIMES,
    ] {
        let status = match method {
            greeter_schema::SAY_HELLO => channel.call(method, &garbage, None).unwrap_err(),
            _ => {
                let mut call = channel.server_stream(method, &garbage, None).unwrap();
                call.recv().unwrap_err()
            }
        };
        assert_eq!(status.code(), Code::Internal, "{status}");
        assert!(
            status.message().contains("helloworld.HelloRequest"),
            "{status}"
        );
    }
    // The server goes on serving.
    let reply = channel.call(greeter_schema::SAY_HELLO, &[], None).unwrap();
    assert_eq!(&reply[..], b"\x0a\x07Hello !");
}

#[test]
fn a_response_that_does_not_decode_is_internal_naming_its_type() {
    // A server that answers SayHello with garbage under the right schema.
    let address = address("bad-reply");
    let router = Router::new().route(greeter_schema::SAY_HELLO, |_| Ok(vec![0xff; 4]));
    let server = Server::bind(
        &address,
        greeter_schema::SERVICE_NAME,
        greeter_schema::SCHEMA_HASH,
        router,
    )
    .unwrap();
    let _server = BackgroundServer::spawn(server).unwrap();
    let client = GreeterBlockingClient::connect(&address).unwrap();
    let status = client.say_hello(request("x", 0)).unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status}");
    assert!(
        status.message().contains("helloworld.HelloReply"),
        "{status}"
    );
}

#[test]
fn an_unknown_method_is_unimplemented() {
    let (address, _server) = serve("unknown");
    let status = raw_channel(&address).call(99, b"", None).unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status}");
}

#[test]
fn another_schema_is_refused_at_connect_naming_both_hashes() {
    let (address, _server) = serve("mismatch");
    let theirs = SchemaHash([7; 32]);
    let options = ChannelOptions::new(greeter_schema::SERVICE_NAME, theirs);
    let error = Channel::connect(&address, &options)
        .unwrap_err()
        .to_string();
    assert!(error.contains("schema mismatch"), "{error}");
    assert!(error.contains(&theirs.to_string()), "{error}");
    assert!(
        error.contains(&greeter_schema::SCHEMA_HASH.to_string()),
        "{error}"
    );
}

/// Reports what the handler saw of the call's metadata.
struct Metadata;

impl Greeter for Metadata {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        let peer = request.peer().ok_or_else(|| Status::internal("no peer"))?;
        let remaining = request.remaining().map_or(0, |r| r.as_millis());
        Ok(HelloReply {
            message: format!("{} {remaining}", peer.pid),
        })
    }

    async fn say_hello_many_times(
        &self,
        _request: Request<HelloRequest>,
        _responses: ResponseSink<HelloReply>,
    ) -> Result<(), Status> {
        Err(Status::unimplemented("not here"))
    }
}

#[test]
fn handlers_see_the_callers_credentials_and_deadline() {
    let address = address("metadata");
    let server = GreeterServer::new(Metadata).bind(&address).unwrap();
    let _server = BackgroundServer::spawn(server).unwrap();
    let client = GreeterBlockingClient::connect(&address)
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    let reply = client.say_hello(request("x", 0)).unwrap().message;
    let (pid, remaining) = reply.split_once(' ').unwrap();
    assert_eq!(pid, std::process::id().to_string());
    let remaining: u128 = remaining.parse().unwrap();
    assert!(remaining > 20_000 && remaining <= 30_000, "{remaining} ms");
}

/// Kills and reaps a child process when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_client_binary_greets_through_the_server_binary() {
    let address = address("processes");
    let _server = Reaped(
        Command::new(Path::new(env!("CARGO_BIN_EXE_greeter-server")))
            .arg(&address)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Wait until the server accepts connections.
    let started = Instant::now();
    while GreeterBlockingClient::connect(&address).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "no server");
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = Command::new(Path::new(env!("CARGO_BIN_EXE_greeter-client")))
        .args(["--address", &address, "--times", "2", "processes"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        "Hello processes!\nHello processes #1!\nHello processes #2!\n"
    );
}
