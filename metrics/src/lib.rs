//! Prometheus metrics of a DRS process: what a node or a mount counts, in the
//! OpenMetrics text format, served at `GET /metrics` on an address of the operator's
//! choice (`--metrics ADDR`).
//!
//! A process keeps its own counters (atomics, and latency histograms from
//! [`latencies`]); at each scrape it builds a [`Snapshot`] from them, so the counters
//! have one owner and nothing is registered twice. The endpoint ([`serve`]) is HTTP/1.1
//! by hyper, with bounded connections and header time; anything but `GET /metrics` is
//! a 404.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use prometheus_client;

/// The content type of the OpenMetrics text format.
pub const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Scrapes served at once.
const CONNECTIONS: usize = 16;
/// A scrape connection's whole life, and the time its request headers may take.
const CONNECTION_TIME: Duration = Duration::from_secs(30);
const HEADER_TIME: Duration = Duration::from_secs(5);

/// Renders the process's metrics, at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The label of a latency: what was timed (a request kind, an operation).
pub type OpLabel = Vec<(&'static str, &'static str)>;
/// Latency histograms in seconds, one per label.
pub type Latencies = Family<OpLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 us .. about 13 s, doubling.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// A new family of latency histograms (seconds).
pub fn latencies() -> Latencies {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// Records `elapsed` for `op` in `family` (label `op`).
pub fn observe(family: &Latencies, op: &'static str, elapsed: Duration) {
    family
        .get_or_create(&vec![("op", op)])
        .observe(elapsed.as_secs_f64());
}

/// The metrics of one scrape.
pub struct Snapshot {
    registry: Registry,
}

impl Default for Snapshot {
    fn default() -> Snapshot {
        Snapshot::new("drs")
    }
}

impl Snapshot {
    /// Metric names start with `prefix_`.
    pub fn new(prefix: &str) -> Snapshot {
        Snapshot {
            registry: Registry::with_prefix(prefix),
        }
    }

    /// A counter (exposed as `prefix_name_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Snapshot {
        self.registry.register(name, help, ConstCounter::new(value));
        self
    }

    /// A gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> &mut Snapshot {
        self.registry.register(name, help, ConstGauge::new(value));
        self
    }

    /// Any metric the process keeps (a clone of a histogram family, say).
    pub fn metric(&mut self, name: &str, help: &str, metric: impl Metric) -> &mut Snapshot {
        self.registry.register(name, help, metric);
        self
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, render: Render, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, &render)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIME)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIME, conn).await;
            drop(permit);
        });
    }
}

fn answer(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(render())));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT));
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: GET /metrics\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_counters_gauges_and_histograms() {
        let lat = latencies();
        observe(&lat, "read", Duration::from_millis(3));
        observe(&lat, "read", Duration::from_millis(5));
        let l2 = lat.clone();
        let render: Render = Arc::new(move || {
            let mut s = Snapshot::default();
            s.counter("reads", "Blocks read.", 42)
                .gauge("pending", "Updates waiting.", 7)
                .metric("request_seconds", "Request latency.", l2.clone());
            s.encode()
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, render, rx));
        let body = get(addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains(CONTENT), "{body}");
        assert!(body.contains("drs_reads_total 42"), "{body}");
        assert!(body.contains("drs_pending 7"), "{body}");
        assert!(
            body.contains("drs_request_seconds_count{op=\"read\"} 2"),
            "{body}"
        );
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        let other = get(addr, "/").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    }
}
