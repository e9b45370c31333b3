//! The tracing engine with real processes: a client calls a mediated
//! service through `shmeshd`, the replica sees the trace continued with
//! the daemon's span as parent, and an OTLP receiver (a tonic
//! `TraceService` in this test process) gets the daemon's span; without an
//! endpoint, spans are logged and calls work the same.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use shmesh::Metadata;
use shmesh::client::Channel;
use shmesh_daemon::engine::tracing::TraceParent;

/// The entry point of child processes (see [`common::run_child`]).
#[test]
#[ignore = "run as a child process by the other tests"]
fn child() {
    run_child();
}

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Spans received, with their resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

struct Receiver(Received);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let name = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    received.push((name.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a runtime of its own; its address.
fn start_receiver() -> (tokio::runtime::Runtime, SocketAddr, Received) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let received = Received::default();
    let incoming = {
        let _in = runtime.enter();
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap()
    };
    let address = incoming.local_addr().unwrap();
    let service = TraceServiceServer::new(Receiver(received.clone()));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    (runtime, address, received)
}

fn mediated_daemon(dir: &std::path::Path, engine: &str) -> Daemon {
    let config = dir.join("shmeshd.toml");
    std::fs::write(
        &config,
        format!("[[services]]\nname = \"echo\"\npath = \"mediated\"\n\n[[engines]]\nkind = \"tracing\"\n{engine}"),
    )
    .unwrap();
    Daemon::start(&dir.join("d.sock"), Some(&config))
}

/// The `traceparent` the replica saw for a call with `metadata`.
fn seen_by_replica(channel: &Channel, metadata: &Metadata) -> TraceParent {
    let answer = channel
        .call_with(
            TRACEPARENT_SEEN,
            b"",
            metadata,
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    let text = std::str::from_utf8(&answer).unwrap();
    TraceParent::parse(text).unwrap_or_else(|| panic!("replica saw {text:?}"))
}

/// Waits (generously) for a span of `trace_id` to arrive.
fn span_of(received: &Received, trace_id: [u8; 16], daemon: &Daemon) -> (String, Span) {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(found) = received
            .lock()
            .unwrap()
            .iter()
            .find(|(_, s)| s.trace_id == trace_id)
        {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no span of trace {trace_id:02x?} within {WATCHDOG:?}; log:\n{}",
            daemon.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

#[test]
fn traces_go_on_through_the_daemon_and_its_spans_reach_the_otlp_receiver() {
    let _serial = serial();
    let (_runtime, receiver, received) = start_receiver();
    let dir = scratch("tracing-otlp");
    let daemon = mediated_daemon(
        &dir,
        &format!("otlp_endpoint = \"http://{receiver}\"\nservice_name = \"shmeshd-test\"\n"),
    );
    let _replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("a replica", |r| replicas(r, "echo") == 1);
    let channel = connect(&daemon, "echo");

    // A call that comes with a trace: continued, the daemon's span between.
    let incoming = TraceParent::parse(INCOMING).unwrap();
    let mut metadata = Metadata::new();
    metadata.insert("traceparent", INCOMING).unwrap();
    metadata.insert("tenant", "blue").unwrap();
    let seen = seen_by_replica(&channel, &metadata);
    assert_eq!(seen.trace_id, incoming.trace_id);
    assert_ne!(seen.parent_id, incoming.parent_id);
    assert!(seen.sampled());

    let (service_name, span) = span_of(&received, incoming.trace_id, &daemon);
    assert_eq!(service_name, "shmeshd-test");
    assert_eq!(
        span.span_id, seen.parent_id,
        "the replica's parent is the daemon's span"
    );
    assert_eq!(span.parent_span_id, incoming.parent_id);
    assert_eq!(span.name, format!("echo/{TRACEPARENT_SEEN}"));
    assert_eq!(
        attribute(&span, "rpc.service"),
        Some(Value::StringValue("echo".into()))
    );
    assert_eq!(
        attribute(&span, "rpc.method"),
        Some(Value::StringValue(TRACEPARENT_SEEN.to_string()))
    );
    assert_eq!(
        attribute(&span, "shmesh.caller.pid"),
        Some(Value::IntValue(i64::from(std::process::id())))
    );
    assert_eq!(
        attribute(&span, "rpc.grpc.status_code"),
        Some(Value::IntValue(0))
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);

    // Other metadata reaches the replica too (the echo of a call with it
    // works), and a call without a trace starts one.
    assert_eq!(
        channel
            .call_with(ECHO, b"hi", &metadata, Some(Duration::from_secs(10)))
            .unwrap()[..],
        b"hi"[..]
    );
    let fresh = seen_by_replica(&channel, &Metadata::new());
    assert_ne!(fresh.trace_id, incoming.trace_id);
    let (_, span) = span_of(&received, fresh.trace_id, &daemon);
    assert_eq!(span.span_id, fresh.parent_id);
    assert!(span.parent_span_id.is_empty(), "a new trace has no parent");

    // A stream carries its trace through the daemon the same way.
    let mut call = channel
        .server_stream_with(
            TRACEPARENT_SEEN_STREAM,
            b"",
            &metadata,
            Some(Duration::from_secs(10)),
        )
        .unwrap();
    let answer = call.recv().unwrap().unwrap();
    let text = std::str::from_utf8(&answer).unwrap();
    let seen = TraceParent::parse(text).unwrap_or_else(|| panic!("replica saw {text:?}"));
    assert_eq!(seen.trace_id, incoming.trace_id);
    assert_ne!(seen.parent_id, incoming.parent_id);
    drop(answer);
    assert!(call.recv().unwrap().is_none());

    // An invalid traceparent is treated as absent.
    let mut bad = Metadata::new();
    bad.insert("traceparent", "00-nonsense").unwrap();
    let restarted = seen_by_replica(&channel, &bad);
    span_of(&received, restarted.trace_id, &daemon);
    let described = daemon.wait_for("the engine's counts", |r| {
        r.engines
            .iter()
            .any(|e| e.description.contains("1 invalid traceparents"))
    });
    let _ = described;
}

#[test]
fn without_an_endpoint_spans_are_logged_and_calls_work() {
    let _serial = serial();
    let dir = scratch("tracing-log");
    let daemon = mediated_daemon(&dir, "");
    let _replica = spawn_child("replica", &daemon, "echo");
    daemon.wait_for("a replica", |r| replicas(r, "echo") == 1);
    let channel = connect(&daemon, "echo");
    for n in 0..20u8 {
        assert_eq!(echo(&channel, &[n]).unwrap(), [n]);
    }
    let seen = seen_by_replica(&channel, &Metadata::new());
    let trace = seen
        .trace_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let log = daemon.log.lock().unwrap().clone();
        if log
            .lines()
            .any(|l| l.contains("shmesh::trace") && l.contains(&trace))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span of {trace} logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
