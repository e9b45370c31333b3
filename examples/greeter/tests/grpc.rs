//! One Greeter implementation served at once over shmesh and over gRPC
//! (tonic, TCP), called by the generated client over either transport and
//! by a stock tonic client.
// Test helpers outside #[test] functions unwrap too: a failure is the test's.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shmesh::server::BackgroundServer;
use shmesh_example_greeter::helloworld::greeter_client::GreeterClient;
use shmesh_example_greeter::helloworld::greeter_server::{Greeter, GreeterServer};
use shmesh_example_greeter::helloworld::{HelloReply, HelloRequest};
use shmesh_example_greeter::{MAX_TIMES, MyGreeter};
use shmesh_protobuf::Request;
use shmesh_protobuf::server::ResponseSink;
use shmesh_protobuf::shmesh::status::Status;
use tokio_stream::wrappers::TcpListenerStream;

/// A stock tonic client of the same `.proto`.
mod stock {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/tonic/helloworld.rs"));
}

/// [`MyGreeter`], counting the greetings it answers across transports.
#[derive(Default)]
struct Counting {
    calls: AtomicU64,
    greeter: MyGreeter,
}

impl Greeter for Counting {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let transport = if request.peer().is_some() {
            "shmesh"
        } else {
            "grpc"
        };
        let reply = self.greeter.say_hello(request).await?;
        Ok(HelloReply {
            message: format!("{} ({n}, {transport})", reply.message),
        })
    }

    async fn say_hello_many_times(
        &self,
        request: Request<HelloRequest>,
        responses: ResponseSink<HelloReply>,
    ) -> Result<(), Status> {
        self.greeter.say_hello_many_times(request, responses).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_implementation_serves_shmesh_and_grpc_at_once() {
    let greeter = Arc::new(Counting::default());

    // gRPC on a TCP port of the system's choosing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let grpc = GreeterServer::from_arc(greeter.clone()).into_grpc();
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // shmesh beside it.
    let address = format!("shm://@shmesh-greeter-grpc-{}", std::process::id());
    let server = GreeterServer::from_arc(greeter.clone())
        .bind(&address)
        .unwrap();
    let _shmesh_server = BackgroundServer::spawn(server).unwrap();

    let shm = GreeterClient::connect(&address).await.unwrap();
    let mut grpc =
        stock::greeter_client::GreeterClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
    let hello = |name: &str, times| stock::HelloRequest {
        name: name.into(),
        times,
    };

    let reply = shm
        .say_hello(HelloRequest {
            name: "shm".into(),
            times: 0,
        })
        .await
        .unwrap();
    assert_eq!(reply.message, "Hello shm! (1, shmesh)");
    let reply = grpc.say_hello(hello("tcp", 0)).await.unwrap().into_inner();
    assert_eq!(reply.message, "Hello tcp! (2, grpc)");

    // Server streaming over gRPC.
    let mut stream = grpc
        .say_hello_many_times(hello("tcp", 3))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        got.push(reply.message);
    }
    assert_eq!(got, ["Hello tcp #1!", "Hello tcp #2!", "Hello tcp #3!"]);

    // The handler's status reaches the gRPC client with its code.
    let mut stream = grpc
        .say_hello_many_times(hello("greedy", MAX_TIMES + 1))
        .await
        .unwrap()
        .into_inner();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");

    // The generated client over gRPC: the address picks the transport.
    let over_grpc = GreeterClient::connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let reply = over_grpc
        .say_hello(HelloRequest {
            name: "generated".into(),
            times: 0,
        })
        .await
        .unwrap();
    assert_eq!(reply.message, "Hello generated! (3, grpc)");

    assert_eq!(greeter.calls.load(Ordering::SeqCst), 3);
    grpc_server.abort();
}

/// Answers with the call's metadata, `key=value` pairs in order.
struct ShowingMetadata;

fn shown(metadata: &shmesh::metadata::Metadata) -> String {
    let mut pairs: Vec<String> = metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(" ")
}

impl Greeter for ShowingMetadata {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<HelloReply, Status> {
        Ok(HelloReply {
            message: shown(request.metadata()),
        })
    }

    async fn say_hello_many_times(
        &self,
        request: Request<HelloRequest>,
        mut responses: ResponseSink<HelloReply>,
    ) -> Result<(), Status> {
        let message = shown(request.metadata());
        responses.send(&HelloReply { message }).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_the_calls_metadata_over_either_transport() {
    use prost::Message;
    use shmesh::metadata::Metadata;
    use shmesh_example_greeter::helloworld::greeter_schema;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let grpc_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreeterServer::new(ShowingMetadata).into_grpc())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let address = format!("shm://@shmesh-greeter-metadata-{}", std::process::id());
    let server = GreeterServer::new(ShowingMetadata).bind(&address).unwrap();
    let _shmesh_server = BackgroundServer::spawn(server).unwrap();

    // Over shmesh: the call's metadata as sent, unary and streaming.
    let mut metadata = Metadata::new();
    metadata.insert("traceparent", TRACE).unwrap();
    metadata.insert("tenant", "blue").unwrap();
    let expected = format!("tenant=blue traceparent={TRACE}");
    let options = greeter_schema::channel_options();
    let request = HelloRequest {
        name: "x".into(),
        times: 1,
    }
    .encode_to_vec();
    let (reply, streamed) = tokio::task::spawn_blocking({
        let (address, metadata, request) = (address.clone(), metadata.clone(), request.clone());
        move || {
            let channel = shmesh::client::Channel::connect(&address, &options).unwrap();
            let timeout = Some(std::time::Duration::from_secs(10));
            let reply = channel
                .call_with(greeter_schema::SAY_HELLO, &request, &metadata, timeout)
                .unwrap();
            let reply = HelloReply::decode(&reply[..]).unwrap().message;
            let mut call = channel
                .server_stream_with(
                    greeter_schema::SAY_HELLO_MANY_TIMES,
                    &request,
                    &metadata,
                    timeout,
                )
                .unwrap();
            let streamed = HelloReply::decode(&call.recv().unwrap().unwrap()[..])
                .unwrap()
                .message;
            (reply, streamed)
        }
    })
    .await
    .unwrap();
    assert_eq!(reply, expected);
    assert_eq!(streamed, expected);

    // Over gRPC: the ASCII headers that can be metadata, without gRPC's
    // and HTTP's own (content-type, te, user-agent, grpc-timeout) or
    // binary ones.
    let mut grpc =
        stock::greeter_client::GreeterClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
    let with_headers = |times| {
        let mut request = tonic::Request::new(stock::HelloRequest {
            name: "x".into(),
            times,
        });
        request.set_timeout(std::time::Duration::from_secs(10));
        let headers = request.metadata_mut();
        headers.insert("traceparent", TRACE.parse().unwrap());
        headers.insert("tenant", "blue".parse().unwrap());
        headers.insert_bin(
            "trace-bin",
            tonic::metadata::MetadataValue::from_bytes(&[0, 1, 2]),
        );
        request
    };
    let reply = grpc.say_hello(with_headers(0)).await.unwrap().into_inner();
    assert_eq!(reply.message, expected);
    let mut stream = grpc
        .say_hello_many_times(with_headers(1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().message, expected);

    // The generated clients send it too, over either transport.
    let hello = |times| HelloRequest {
        name: "x".into(),
        times,
    };
    for address in [format!("http://127.0.0.1:{port}"), address.clone()] {
        let client = GreeterClient::connect(&address)
            .await
            .unwrap()
            .with_metadata(metadata.clone());
        let reply = client.say_hello(hello(0)).await.unwrap();
        assert_eq!(reply.message, expected, "{address}");
        let mut stream = client.say_hello_many_times(hello(1)).await.unwrap();
        let streamed = stream.message().await.unwrap().unwrap();
        assert_eq!(streamed.message, expected, "{address}");
        // Without: nothing (gRPC adds no header the handler sees).
        let plain = GreeterClient::connect(&address).await.unwrap();
        assert_eq!(plain.say_hello(hello(0)).await.unwrap().message, "");

        let (address, metadata, expected) = (address.clone(), metadata.clone(), expected.clone());
        tokio::task::spawn_blocking(move || {
            use shmesh_example_greeter::helloworld::greeter_blocking_client::GreeterBlockingClient;
            let client = GreeterBlockingClient::connect(&address)
                .unwrap()
                .with_metadata(metadata);
            assert_eq!(client.say_hello(hello(0)).unwrap().message, expected);
            let streamed: Vec<String> = client
                .say_hello_many_times(hello(1))
                .unwrap()
                .map(|r| r.unwrap().message)
                .collect();
            assert_eq!(streamed, [expected], "{address}");
        })
        .await
        .unwrap();
    }
    grpc_server.abort();
}
