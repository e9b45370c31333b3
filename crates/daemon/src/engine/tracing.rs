//! The tracing engine: W3C Trace Context carried in call metadata, and a
//! span for the daemon's hop of every mediated call, exported over OTLP
//! (gRPC) when an endpoint is configured, logged otherwise.
//!
//! ```toml
//! [[engines]]
//! kind = "tracing"
//! service = "*"                           # default: every mediated service
//! otlp_endpoint = "http://127.0.0.1:4317" # optional: log spans without it
//! sample = 0.1                            # ratio of new traces kept (default 1.0)
//! service_name = "shmeshd"                # the spans' service.name (default)
//! ```
//!
//! **Propagation.** On `admit`, the engine reads the caller's
//! `traceparent` metadata (`00-<trace id>-<parent span id>-<flags>`). A
//! valid one continues its trace and keeps its sampling decision; a missing
//! one starts a new trace (random id, sampled with probability `sample`);
//! an invalid one is counted and treated as missing. The engine gives the
//! daemon's hop a fresh span id and annotates the call with a
//! `traceparent` of the same trace and that span id as the parent, which
//! the mediator forwards to the replica in place of the caller's.
//!
//! **Spans.** On `done`, a sampled call's span (service, method id, caller
//! pid, uid and program, status code, start and duration, request size) is
//! handed to the exporter, or logged at INFO with target `shmesh::trace`
//! (at most `log_per_second` a second; the rest are counted). The engine
//! keeps nothing per call: what `done` needs is in the call's annotation.
//!
//! **Export** runs on a thread of its own with a bounded queue
//! (`max_queue`): `done` never waits on the network, and never wakes the
//! exporter either (a wake-up is a system call and a context switch per
//! call, ~7 µs of a mediated call on a two-core host when this used a
//! channel): the exporter looks at the queue every 200 ms, or is woken once
//! a full batch waits. A span that finds the queue full is dropped and
//! counted. Spans go in batches (up to 512) as OTLP
//! `ExportTraceServiceRequest`s over gRPC; a failed export is counted and
//! logged (a warning at most every 10 s), never fatal. Counters travel to
//! the replacement on upgrade; the queue does not (the old exporter sends
//! what it holds, then stops).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, span, status};
use serde::{Deserialize, Serialize};
use shmesh::status::{Code, Status};

use super::{
    Admit, BuildError, CallInfo, Engine, EngineState, Outcome, decode_state, encode_state,
};

/// The metadata key of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Spans per OTLP request, at most.
const BATCH: usize = 512;
/// How often the exporter looks for spans when no full batch wakes it.
const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Export failures are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

fn default_sample() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "shmeshd".to_owned()
}

fn default_max_queue() -> usize {
    4096
}

fn default_log_per_second() -> u64 {
    100
}

/// The tracing engine's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The engine's name (default `tracing`).
    #[serde(default)]
    pub name: Option<String>,
    /// The service it applies to (default `"*"`).
    #[serde(default = "super::all_services")]
    pub service: String,
    /// Where to export spans over OTLP/gRPC (`http://host:port`); without
    /// it spans are logged.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The ratio of new traces sampled, 0 to 1 (default 1). A trace that
    /// comes with the call keeps its own decision.
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// The `service.name` of the spans (default `shmeshd`).
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans waiting for export, at most (default 4096); more are dropped.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Spans logged per second, at most, without an endpoint (default 100).
    #[serde(default = "default_log_per_second")]
    pub log_per_second: u64,
}

/// A W3C `traceparent`: trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace's id (never all zero).
    pub trace_id: [u8; 16],
    /// The span the receiver's work is a child of (never all zero).
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0: sampled.
    pub flags: u8,
}

/// Lowercase hex digits into `out`; `None` unless exactly that many.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Writes `bytes` as lowercase hex (no allocation per byte: this runs on
/// every traced call).
fn write_hex(f: &mut impl std::fmt::Write, bytes: &[u8]) -> std::fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        f.write_char(char::from(DIGITS[usize::from(b >> 4)]))?;
        f.write_char(char::from(DIGITS[usize::from(b & 0xf)]))?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    // Writing to a String cannot fail.
    let _ = write_hex(&mut out, bytes);
    out
}

impl TraceParent {
    /// Parses a `traceparent` value per W3C Trace Context: version `00`
    /// exactly as specified; a later version (not `ff`) by its first four
    /// fields, ignoring what follows a `-`.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let version = unhex::<1>(text.get(..2)?)?[0];
        if version == 0xff || text.len() < 55 {
            return None;
        }
        if text.len() > 55 && (version == 0 || text.as_bytes()[55] != b'-') {
            return None;
        }
        let b = text.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = unhex::<16>(&text[3..35])?;
        let parent_id = unhex::<8>(&text[36..52])?;
        let flags = unhex::<1>(&text[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Whether the trace is sampled.
    pub fn sampled(&self) -> bool {
        self.flags & 1 != 0
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("00-")?;
        write_hex(f, &self.trace_id)?;
        f.write_char('-')?;
        write_hex(f, &self.parent_id)?;
        f.write_char('-')?;
        write_hex(f, &[self.flags])
    }
}

/// The engine's counters (kept across upgrades).
#[derive(Debug, Default)]
struct Counters {
    /// Sampled spans finished.
    spans: AtomicU64,
    /// Spans an OTLP receiver accepted.
    exported: AtomicU64,
    /// Spans dropped: the export queue was full or the exporter gone.
    dropped: AtomicU64,
    /// Spans whose export failed or was rejected.
    failed: AtomicU64,
    /// Calls whose `traceparent` did not parse.
    invalid: AtomicU64,
    /// Spans not logged for the log's rate limit.
    unlogged: AtomicU64,
}

/// What travels to a replacement.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TracingState {
    spans: u64,
    exported: u64,
    dropped: u64,
    failed: u64,
    invalid: u64,
    unlogged: u64,
}

/// A finished span, on its way to the exporter.
#[derive(Debug, Clone)]
struct SpanRecord {
    trace: TraceParent,
    /// The caller's span, if the call came with a trace.
    parent: Option<[u8; 8]>,
    service: String,
    method: u32,
    start: SystemTime,
    end: SystemTime,
    code: Code,
    pid: i32,
    uid: u32,
    app: String,
    size: u64,
}

/// The tracing engine.
#[derive(Debug)]
pub struct TracingEngine {
    config: TracingConfig,
    counters: Arc<Counters>,
    /// The export queue, when exporting.
    queue: Option<Arc<SpanQueue>>,
    /// The log's rate limit: the second it counts, and spans logged in it.
    log_window: Mutex<(Instant, u64)>,
}

impl TracingEngine {
    /// Builds the engine, restoring `state` if given; starts its exporter
    /// if it has an endpoint.
    pub fn new(config: TracingConfig, state: Option<&[u8]>) -> Result<Self, BuildError> {
        if !(0.0..=1.0).contains(&config.sample) {
            return Err(BuildError::Config(format!(
                "tracing: sample must be between 0 and 1, not {}",
                config.sample
            )));
        }
        if config.service_name.is_empty() {
            return Err(BuildError::Config("tracing: service_name is empty".into()));
        }
        if config.max_queue == 0 {
            return Err(BuildError::Config(
                "tracing: max_queue must be above 0".into(),
            ));
        }
        let restored: TracingState = match state {
            Some(data) => decode_state("tracing", data)?,
            None => TracingState::default(),
        };
        let counters = Arc::new(Counters {
            spans: AtomicU64::new(restored.spans),
            exported: AtomicU64::new(restored.exported),
            dropped: AtomicU64::new(restored.dropped),
            failed: AtomicU64::new(restored.failed),
            invalid: AtomicU64::new(restored.invalid),
            unlogged: AtomicU64::new(restored.unlogged),
        });
        let queue = match &config.otlp_endpoint {
            Some(endpoint) => Some(Exporter::start(
                endpoint,
                &config.service_name,
                config.max_queue,
                counters.clone(),
            )?),
            None => None,
        };
        Ok(TracingEngine {
            config,
            counters,
            queue,
            log_window: Mutex::new((Instant::now(), 0)),
        })
    }

    /// The caller's trace context, if it sent a valid one (an invalid one
    /// is counted).
    fn incoming(&self, call: &CallInfo<'_>) -> Option<TraceParent> {
        let text = call.metadata.get(TRACEPARENT)?;
        let parsed = TraceParent::parse(text);
        if parsed.is_none() {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
        }
        parsed
    }

    /// Whether a span may be logged now (the log's rate limit).
    fn may_log(&self) -> bool {
        let mut window = self.log_window.lock().unwrap_or_else(|e| e.into_inner());
        if window.0.elapsed() >= Duration::from_secs(1) {
            *window = (Instant::now(), 0);
        }
        window.1 += 1;
        window.1 <= self.config.log_per_second
    }

    fn log(&self, span: &SpanRecord) {
        if !self.may_log() {
            self.counters.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let duration = span.end.duration_since(span.start).unwrap_or_default();
        ::tracing::info!(
            target: "shmesh::trace",
            trace_id = %hex(&span.trace.trace_id),
            span_id = %hex(&span.trace.parent_id),
            parent_span_id = %span.parent.map(|p| hex(&p)).unwrap_or_default(),
            service = %span.service,
            method = span.method,
            code = %span.code,
            duration_us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            size = span.size,
            pid = span.pid,
            uid = span.uid,
            app = %span.app,
            "span"
        );
    }
}

/// Random non-zero bytes.
fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        fastrand::fill(&mut id);
        if id != [0; N] {
            return id;
        }
    }
}

impl Engine for TracingEngine {
    fn kind(&self) -> &'static str {
        "tracing"
    }

    fn admit(&self, call: &mut CallInfo<'_>) -> Result<Admit, Status> {
        let (trace_id, sampled) = match self.incoming(call) {
            Some(parent) => (parent.trace_id, parent.sampled()),
            None => (random_id(), fastrand::f64() < self.config.sample),
        };
        let hop = TraceParent {
            trace_id,
            parent_id: random_id(),
            flags: u8::from(sampled),
        };
        let mut value = String::with_capacity(55);
        // Writing to a String cannot fail.
        let _ = write!(value, "{hop}");
        call.annotations.push((TRACEPARENT.to_owned(), value));
        Ok(Admit::Pass)
    }

    fn done(&self, call: &CallInfo<'_>, outcome: &Outcome) {
        // This hop's context: the last traceparent annotated (ours, unless
        // an engine after this one set another; then that one is the hop).
        let Some(hop) = call
            .annotations
            .iter()
            .rev()
            .find(|(k, _)| k == TRACEPARENT)
            .and_then(|(_, v)| TraceParent::parse(v))
        else {
            return;
        };
        if !hop.sampled() {
            return;
        }
        self.counters.spans.fetch_add(1, Ordering::Relaxed);
        let parent = call
            .metadata
            .get(TRACEPARENT)
            .and_then(TraceParent::parse)
            .filter(|p| p.trace_id == hop.trace_id)
            .map(|p| p.parent_id);
        let end = SystemTime::now();
        let span = SpanRecord {
            trace: hop,
            parent,
            service: call.service.to_owned(),
            method: call.method,
            start: end.checked_sub(outcome.elapsed).unwrap_or(end),
            end,
            code: outcome.code,
            pid: call.caller.pid,
            uid: call.caller.uid,
            app: call.caller.app.clone(),
            size: call.size as u64,
        };
        match &self.queue {
            Some(queue) => {
                if !queue.push(span) {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => self.log(&span),
        }
    }

    fn decompose(&self) -> EngineState {
        let c = &self.counters;
        let state = TracingState {
            spans: c.spans.load(Ordering::Relaxed),
            exported: c.exported.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            invalid: c.invalid.load(Ordering::Relaxed),
            unlogged: c.unlogged.load(Ordering::Relaxed),
        };
        encode_state("tracing", &state)
    }

    fn describe(&self) -> String {
        let c = &self.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let to = match &self.config.otlp_endpoint {
            Some(endpoint) => format!(
                "to {endpoint}: {} exported, {} dropped, {} failed",
                load(&c.exported),
                load(&c.dropped),
                load(&c.failed)
            ),
            None => format!("logged ({} over the rate limit)", load(&c.unlogged)),
        };
        format!(
            "sample {}: {} spans {to}; {} invalid traceparents",
            self.config.sample,
            load(&c.spans),
            load(&c.invalid)
        )
    }
}

/// Sends spans to an OTLP receiver from a thread of its own.
struct Exporter {
    endpoint: tonic::transport::Endpoint,
    resource: Resource,
    counters: Arc<Counters>,
    /// When a failure was last logged, and failures since.
    warned: Option<Instant>,
    quiet_failures: u64,
}

impl Exporter {
    /// Starts the exporter; the queue to feed it. It stops when the queue
    /// is closed (the engine dropped), after sending what it holds.
    fn start(
        endpoint: &str,
        service_name: &str,
        capacity: usize,
        counters: Arc<Counters>,
    ) -> Result<Arc<SpanQueue>, BuildError> {
        let parsed = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| BuildError::Config(format!("tracing: otlp_endpoint {endpoint:?}: {e}")))?
            .timeout(EXPORT_TIMEOUT)
            .connect_timeout(EXPORT_TIMEOUT);
        if !matches!(parsed.uri().scheme_str(), Some("http" | "https")) {
            return Err(BuildError::Config(format!(
                "tracing: otlp_endpoint {endpoint:?} is not an http:// or https:// address"
            )));
        }
        let queue = Arc::new(SpanQueue {
            spans: Mutex::new(Vec::new()),
            capacity,
            batch_ready: Condvar::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let receive = queue.clone();
        let exporter = Exporter {
            endpoint: parsed,
            resource: Resource {
                attributes: vec![string("service.name", service_name)],
                ..Default::default()
            },
            counters,
            warned: None,
            quiet_failures: 0,
        };
        std::thread::Builder::new()
            .name("shmesh-otlp".into())
            .spawn(move || exporter.run(&receive))
            .map_err(|e| BuildError::Config(format!("tracing: cannot start the exporter: {e}")))?;
        Ok(queue)
    }

    fn run(mut self, queue: &SpanQueue) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                // Spans then fill the queue and are counted dropped.
                ::tracing::error!("tracing engine: cannot start the OTLP exporter: {e}");
                return;
            }
        };
        let channel = {
            let _in = runtime.enter();
            self.endpoint.connect_lazy()
        };
        let mut client = TraceServiceClient::new(channel);
        while let Some(batch) = queue.next_batch() {
            let count = batch.len() as u64;
            let request = self.request(batch);
            let result = runtime.block_on(async {
                tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await
            });
            let failure = match result {
                Ok(Ok(response)) => {
                    let rejected = response
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                        .min(count);
                    self.counters
                        .exported
                        .fetch_add(count - rejected, Ordering::Relaxed);
                    self.counters.failed.fetch_add(rejected, Ordering::Relaxed);
                    (rejected > 0).then(|| format!("the receiver rejected {rejected} spans"))
                }
                Ok(Err(status)) => {
                    self.counters.failed.fetch_add(count, Ordering::Relaxed);
                    Some(status.to_string())
                }
                Err(_) => {
                    self.counters.failed.fetch_add(count, Ordering::Relaxed);
                    Some(format!("no answer within {EXPORT_TIMEOUT:?}"))
                }
            };
            if let Some(why) = failure {
                self.warn(&why, count);
            }
        }
    }

    /// Logs an export failure, at most every [`WARN_EVERY`].
    fn warn(&mut self, why: &str, spans: u64) {
        self.quiet_failures += 1;
        if self.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        ::tracing::warn!(
            endpoint = %self.endpoint.uri(),
            spans,
            failures = self.quiet_failures,
            "tracing engine: exporting spans failed: {why}"
        );
        self.warned = Some(Instant::now());
        self.quiet_failures = 0;
    }

    fn request(&self, batch: Vec<SpanRecord>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "shmeshd".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch.into_iter().map(otlp_span).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

/// Spans waiting for the exporter. Pushing takes an uncontended lock and
/// wakes nobody, except once per full batch.
#[derive(Debug)]
struct SpanQueue {
    spans: Mutex<Vec<SpanRecord>>,
    /// Spans it holds, at most (`max_queue`).
    capacity: usize,
    /// Signalled when a full batch waits, or the queue closes.
    batch_ready: Condvar,
    /// The engine is gone: send what is left, then stop.
    closed: std::sync::atomic::AtomicBool,
}

impl SpanQueue {
    fn lock(&self) -> MutexGuard<'_, Vec<SpanRecord>> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `span`; `false` if the queue is full.
    fn push(&self, span: SpanRecord) -> bool {
        let mut spans = self.lock();
        if spans.len() >= self.capacity {
            return false;
        }
        spans.push(span);
        let full_batch = spans.len() == BATCH;
        drop(spans);
        if full_batch {
            self.batch_ready.notify_one();
        }
        true
    }

    /// No more spans will come.
    fn close(&self) {
        // Relaxed: the lock taken below orders it before the exporter's look.
        self.closed.store(true, Ordering::Relaxed);
        let _spans = self.lock();
        self.batch_ready.notify_one();
    }

    /// The next batch (up to [`BATCH`] spans): at once if a full one waits,
    /// else what is there after [`BATCH_WINDOW`]. `None` once the queue is
    /// closed and empty.
    fn next_batch(&self) -> Option<Vec<SpanRecord>> {
        let mut spans = self.lock();
        loop {
            // Relaxed: read under the lock `close` takes after storing it.
            let closed = self.closed.load(Ordering::Relaxed);
            if spans.len() >= BATCH || (closed && !spans.is_empty()) {
                let n = spans.len().min(BATCH);
                return Some(spans.drain(..n).collect());
            }
            if closed {
                return None;
            }
            let (guard, waited) = self
                .batch_ready
                .wait_timeout(spans, BATCH_WINDOW)
                .unwrap_or_else(|e| e.into_inner());
            spans = guard;
            if waited.timed_out() && !spans.is_empty() {
                let n = spans.len().min(BATCH);
                return Some(spans.drain(..n).collect());
            }
        }
    }
}

impl Drop for TracingEngine {
    fn drop(&mut self) {
        if let Some(queue) = &self.queue {
            queue.close();
        }
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A span in OTLP's terms: attributes after OpenTelemetry's RPC
/// conventions where they have one.
fn otlp_span(s: SpanRecord) -> opentelemetry_proto::tonic::trace::v1::Span {
    let status = if s.code.is_ok() {
        opentelemetry_proto::tonic::trace::v1::Status::default()
    } else {
        opentelemetry_proto::tonic::trace::v1::Status {
            message: s.code.to_string(),
            code: status::StatusCode::Error as i32,
        }
    };
    opentelemetry_proto::tonic::trace::v1::Span {
        trace_id: s.trace.trace_id.to_vec(),
        span_id: s.trace.parent_id.to_vec(),
        parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(s.trace.flags),
        name: format!("{}/{}", s.service, s.method),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: unix_ns(s.start),
        end_time_unix_nano: unix_ns(s.end),
        attributes: vec![
            string("rpc.system", "shmesh"),
            string("rpc.service", &s.service),
            string("rpc.method", &s.method.to_string()),
            int("rpc.grpc.status_code", i64::from(s.code.as_u32())),
            int("shmesh.caller.pid", i64::from(s.pid)),
            int("shmesh.caller.uid", i64::from(s.uid)),
            string("shmesh.caller.app", &s.app),
            int(
                "shmesh.request.size",
                i64::try_from(s.size).unwrap_or(i64::MAX),
            ),
        ],
        status: Some(status),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineSpec;
    use shmesh::Metadata;
    use shmesh::control::Caller;

    static CALLER: std::sync::LazyLock<Caller> = std::sync::LazyLock::new(|| Caller {
        pid: 7,
        uid: 1000,
        gid: 1000,
        app: "client".into(),
    });

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn config(extra: &str) -> TracingConfig {
        match EngineSpec::parse(&format!("kind = \"tracing\"\n{extra}"), "t").unwrap() {
            EngineSpec::Tracing(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn call(metadata: &Metadata) -> CallInfo<'_> {
        CallInfo {
            caller: &CALLER,
            service: "echo",
            method: 3,
            size: 5,
            deadline: None,
            metadata,
            annotations: Vec::new(),
        }
    }

    fn annotated(call: &CallInfo<'_>) -> TraceParent {
        let (_, v) = call
            .annotations
            .iter()
            .find(|(k, _)| k == TRACEPARENT)
            .unwrap();
        TraceParent::parse(v).unwrap()
    }

    #[test]
    fn traceparent_parses_per_the_spec() {
        let t = TraceParent::parse(PARENT).unwrap();
        assert_eq!(t.to_string(), PARENT);
        assert!(t.sampled());
        assert_eq!(hex(&t.parent_id), "00f067aa0ba902b7");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn a_trace_that_comes_in_goes_on_with_the_daemons_span_as_parent() {
        let engine = TracingEngine::new(config(""), None).unwrap();
        let mut metadata = Metadata::new();
        metadata.insert(TRACEPARENT, PARENT).unwrap();
        let mut c = call(&metadata);
        engine.admit(&mut c).unwrap();
        let hop = annotated(&c);
        let incoming = TraceParent::parse(PARENT).unwrap();
        assert_eq!(hop.trace_id, incoming.trace_id);
        assert_ne!(hop.parent_id, incoming.parent_id);
        assert!(hop.sampled());
        engine.done(
            &c,
            &Outcome {
                code: Code::Ok,
                elapsed: Duration::from_micros(30),
            },
        );
        assert_eq!(engine.counters.spans.load(Ordering::Relaxed), 1);
        assert!(
            engine.describe().contains("1 spans"),
            "{}",
            engine.describe()
        );
    }

    #[test]
    fn without_a_trace_one_starts_sampled_by_ratio() {
        let never = TracingEngine::new(config("sample = 0.0"), None).unwrap();
        let always = TracingEngine::new(config(""), None).unwrap();
        let none = Metadata::new();
        let mut bad = Metadata::new();
        bad.insert(TRACEPARENT, "nonsense").unwrap();
        for (engine, sampled) in [(&never, false), (&always, true)] {
            for metadata in [&none, &bad] {
                let mut c = call(metadata);
                engine.admit(&mut c).unwrap();
                let hop = annotated(&c);
                assert_eq!(hop.sampled(), sampled);
                assert_ne!(hop.trace_id, TraceParent::parse(PARENT).unwrap().trace_id);
                engine.done(
                    &c,
                    &Outcome {
                        code: Code::Unavailable,
                        elapsed: Duration::ZERO,
                    },
                );
            }
        }
        assert_eq!(never.counters.spans.load(Ordering::Relaxed), 0);
        assert_eq!(always.counters.spans.load(Ordering::Relaxed), 2);
        assert_eq!(always.counters.invalid.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn counters_survive_an_upgrade_and_bad_settings_are_refused() {
        let engine = TracingEngine::new(config(""), None).unwrap();
        engine.counters.invalid.store(4, Ordering::Relaxed);
        engine.counters.spans.store(9, Ordering::Relaxed);
        let state = engine.decompose();
        let next = TracingEngine::new(config("sample = 0.5"), Some(&state.data)).unwrap();
        assert_eq!(next.counters.invalid.load(Ordering::Relaxed), 4);
        assert_eq!(next.counters.spans.load(Ordering::Relaxed), 9);
        for bad in [
            "sample = 1.5",
            "sample = -0.1",
            "service_name = \"\"",
            "max_queue = 0",
            "otlp_endpoint = \"not a uri\"",
            "otlp_endpoint = \"ftp://127.0.0.1:4317\"",
        ] {
            assert!(TracingEngine::new(config(bad), None).is_err(), "{bad}");
        }
        assert!(EngineSpec::parse("kind = \"tracing\"\nendpoint = \"x\"\n", "t").is_err());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        // Nothing listens there: exports fail, spans pile up, the rest drop.
        let engine = TracingEngine::new(
            config("otlp_endpoint = \"http://127.0.0.1:9\"\nmax_queue = 1"),
            None,
        )
        .unwrap();
        let none = Metadata::new();
        for _ in 0..2000 {
            let mut c = call(&none);
            engine.admit(&mut c).unwrap();
            engine.done(
                &c,
                &Outcome {
                    code: Code::Ok,
                    elapsed: Duration::ZERO,
                },
            );
        }
        assert!(engine.counters.dropped.load(Ordering::Relaxed) > 0);
        assert_eq!(engine.counters.spans.load(Ordering::Relaxed), 2000);
    }
}
