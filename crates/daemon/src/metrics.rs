//! Prometheus metrics at `/metrics` (OpenMetrics text format, which
//! Prometheus scrapes natively).
//!
//! Each scrape asks every replica for its counters (over its registration;
//! the replicas count calls anyway, so the direct path pays nothing extra
//! per call) and renders them beside the daemon's own figures:
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `shmesh_replicas` | service | registered replicas |
//! | `shmesh_connections` | service, replica | live granted connections |
//! | `shmesh_grants_total` | service | connections granted |
//! | `shmesh_refusals_total` | service | connection requests refused |
//! | `shmesh_calls_total` | service, replica, method, code | calls answered, by status |
//! | `shmesh_call_duration_seconds` | service, replica, method | handler latency histogram |
//!
//! Series are per replica, so each stays monotonic when replicas come and
//! go; sum over `replica` for a service's figures.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use shmesh::control::StatusReport;
use shmesh::status::Code;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `report` in the OpenMetrics text format.
pub fn render(report: &StatusReport) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReportCollector(report.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct ReportCollector(StatusReport);

type Labels = Vec<(&'static str, String)>;

impl Collector for ReportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let services = &self.0.services;
        let gauge = |encoder: &mut DescriptorEncoder<'_>,
                     name: &str,
                     help: &str,
                     values: Vec<(Labels, i64)>|
         -> Result<(), std::fmt::Error> {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, value) in &values {
                metric.encode_family(labels)?.encode_gauge(value)?;
            }
            Ok(())
        };
        let counter = |encoder: &mut DescriptorEncoder<'_>,
                       name: &str,
                       help: &str,
                       values: Vec<(Labels, u64)>|
         -> Result<(), std::fmt::Error> {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, value) in &values {
                metric
                    .encode_family(labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(value, None)?;
            }
            Ok(())
        };

        gauge(
            &mut encoder,
            "shmesh_replicas",
            "Replicas registered per service.",
            services
                .iter()
                .map(|s| (vec![("service", s.name.clone())], s.replicas.len() as i64))
                .collect(),
        )?;
        gauge(
            &mut encoder,
            "shmesh_connections",
            "Live connections granted per replica.",
            services
                .iter()
                .flat_map(|s| {
                    s.replicas.iter().map(|r| {
                        (
                            vec![("service", s.name.clone()), ("replica", r.id.to_string())],
                            r.connections.len() as i64,
                        )
                    })
                })
                .collect(),
        )?;
        counter(
            &mut encoder,
            "shmesh_grants",
            "Connections granted per service since the daemon started.",
            services
                .iter()
                .map(|s| (vec![("service", s.name.clone())], s.grants_total))
                .collect(),
        )?;
        counter(
            &mut encoder,
            "shmesh_refusals",
            "Connection requests refused per service (access, no replica, schema, limits).",
            services
                .iter()
                .map(|s| (vec![("service", s.name.clone())], s.refusals_total))
                .collect(),
        )?;

        let methods = || {
            services.iter().flat_map(|s| {
                s.replicas.iter().flat_map(move |r| {
                    r.stats.iter().flat_map(move |stats| {
                        stats.methods.iter().map(move |m| {
                            let labels = vec![
                                ("service", s.name.clone()),
                                ("replica", r.id.to_string()),
                                ("method", m.method.to_string()),
                            ];
                            (labels, m)
                        })
                    })
                })
            })
        };
        counter(
            &mut encoder,
            "shmesh_calls",
            "Calls answered per method and status code.",
            methods()
                .flat_map(|(labels, m)| {
                    m.by_code.iter().map(move |&(code, n)| {
                        let mut labels = labels.clone();
                        labels.push(("code", code_name(code)));
                        (labels, n)
                    })
                })
                .collect(),
        )?;

        let mut histogram = encoder.encode_descriptor(
            "shmesh_call_duration_seconds",
            "Handler latency per method.",
            None,
            MetricType::Histogram,
        )?;
        for (labels, m) in methods() {
            let (sum, count, buckets) = histogram_of(&m.latency);
            histogram
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// A status code's name (`Ok`, `NotFound` …).
fn code_name(code: u8) -> String {
    Code::ALL
        .iter()
        .find(|&&c| c as u8 == code)
        .map_or_else(|| code.to_string(), |c| format!("{c:?}"))
}

/// Buckets in seconds from power-of-two nanosecond buckets (per bucket:
/// the encoder makes them cumulative), the count, and an estimated sum
/// (each call at its bucket's midpoint: the replicas keep no exact sum).
fn histogram_of(latency: &[u64]) -> (f64, u64, Vec<(f64, u64)>) {
    let mut buckets = Vec::with_capacity(latency.len());
    let mut count = 0u64;
    let mut sum = 0.0;
    for (i, &n) in latency.iter().enumerate() {
        count = count.saturating_add(n);
        // The encoder writes `f64::MAX` as `+Inf`.
        let upper = if i + 1 == latency.len() {
            f64::MAX
        } else {
            (1u64 << i.min(63)) as f64 / 1e9
        };
        let lower = if i == 0 {
            0.0
        } else {
            (1u64 << (i - 1).min(63)) as f64 / 1e9
        };
        let mid = if upper < f64::MAX {
            (lower + upper) / 2.0
        } else {
            lower
        };
        sum += n as f64 * mid;
        buckets.push((upper, n));
    }
    (sum, count, buckets)
}

/// The `/metrics` HTTP endpoint, bound but not yet serving.
#[derive(Debug)]
pub struct MetricsServer {
    listener: std::net::TcpListener,
    address: SocketAddr,
}

impl MetricsServer {
    /// Binds `address` (port 0 picks a free port).
    pub fn bind(address: SocketAddr) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        Ok(MetricsServer { listener, address })
    }

    /// The address bound.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves `/metrics` with what `render` returns, on a thread of its
    /// own, for the life of the process.
    pub fn start(self, render: impl Fn() -> String + Send + Sync + 'static) {
        let render = Arc::new(render);
        let address = self.address;
        let spawned = std::thread::Builder::new()
            .name("shmeshd-metrics".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!("metrics endpoint cannot start: {e}");
                        return;
                    }
                };
                runtime.block_on(serve(self.listener, render));
            });
        match spawned {
            Ok(_) => tracing::info!("metrics at http://{address}/metrics"),
            Err(e) => tracing::error!("metrics endpoint cannot start: {e}"),
        }
    }
}

async fn serve(listener: std::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("metrics endpoint cannot start: {e}");
            return;
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let render = render.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&request, render).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

async fn answer<B>(
    request: &Request<B>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "shmeshd serves /metrics\n".into(),
        );
    }
    // The scrape waits for the replicas' answers: off the event loop.
    match tokio::task::spawn_blocking(move || render()).await {
        Ok(body) => reply(StatusCode::OK, CONTENT_TYPE, body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use shmesh::control::{Caller, MethodStats, ReplicaStats, ReplicaStatus, ServiceStatus};

    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let mut latency = vec![0; 40];
        latency[10] = 3; // 512 ns to 1 us
        let report = StatusReport {
            services: vec![ServiceStatus {
                name: "echo".into(),
                grants_total: 5,
                refusals_total: 2,
                replicas: vec![ReplicaStatus {
                    id: 7,
                    process: Some(Caller {
                        pid: 1,
                        uid: 0,
                        gid: 0,
                        app: "x".into(),
                    }),
                    connections: vec![],
                    stats: Some(ReplicaStats {
                        methods: vec![MethodStats {
                            method: 1,
                            calls: 3,
                            by_code: vec![(0, 2), (5, 1)],
                            latency,
                        }],
                        connections_total: 5,
                    }),
                }],
                ..ServiceStatus::default()
            }],
            ..StatusReport::default()
        };
        let text = render(&report);
        for line in [
            "shmesh_replicas{service=\"echo\"} 1",
            "shmesh_connections{service=\"echo\",replica=\"7\"} 0",
            "shmesh_grants_total{service=\"echo\"} 5",
            "shmesh_refusals_total{service=\"echo\"} 2",
            "shmesh_calls_total{service=\"echo\",replica=\"7\",method=\"1\",code=\"Ok\"} 2",
            "shmesh_calls_total{service=\"echo\",replica=\"7\",method=\"1\",code=\"NotFound\"} 1",
            "shmesh_call_duration_seconds_count{service=\"echo\",replica=\"7\",method=\"1\"} 3",
            "shmesh_call_duration_seconds_bucket{le=\"5.12e-7\",service=\"echo\",replica=\"7\",method=\"1\"} 0",
            "shmesh_call_duration_seconds_bucket{le=\"0.000001024\",service=\"echo\",replica=\"7\",method=\"1\"} 3",
            "shmesh_call_duration_seconds_bucket{le=\"+Inf\",service=\"echo\",replica=\"7\",method=\"1\"} 3",
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
