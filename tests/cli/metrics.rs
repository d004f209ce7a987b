//! Metrics: `cluster up --metrics` has every node serve Prometheus metrics, and a
//! mount serves its own with `--metrics ADDR`.

use std::io::{Read, Write};
use std::time::Duration;

use crate::harness::{data, Cluster};

const BS: usize = 4096;

/// `GET /metrics` at `addr`: the status line and the body.
pub fn scrape(addr: &str) -> (String, String) {
    let mut c = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: drs\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of the sample `name` (exact, with labels) in an exposition.
pub fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Goal: each node of a local cluster serves its counters, state, scrubber progress
/// and request latencies, and they move with the work done.
///
/// Method: `cluster up --metrics`; the metrics addresses come from its output. Write
/// 8 blocks and read them; then every node answers `GET /metrics` with status 200 in
/// the OpenMetrics format (ending in `# EOF`), says it is up, has served reads and
/// updates (summed over the nodes: at least the blocks written and read) and has
/// latency histograms of `read` and `update` requests; another path is a 404.
#[test]
fn nodes_serve_prometheus_metrics() {
    let (c, up) = Cluster::start_sized(64, "4KiB", &["--metrics"]);
    let addrs: Vec<String> = up
        .text()
        .lines()
        .filter_map(|l| l.split_once("metrics http://"))
        .map(|(_, rest)| rest.trim_end_matches("/metrics").to_string())
        .collect();
    assert_eq!(addrs.len(), 6, "{up}");
    c.write(0, &data(5, 8 * BS)).ok();
    c.read(0, 8).ok();

    let (mut reads, mut updates) = (0.0, 0.0);
    for a in &addrs {
        let (status, body) = scrape(a);
        assert!(status.contains("200"), "{a}: {status}");
        assert!(body.trim_end().ends_with("# EOF"), "{a}: {body}");
        assert_eq!(sample(&body, "drs_node_up"), Some(1.0), "{a}: {body}");
        assert!(
            sample(&body, "drs_node_blocks").is_some_and(|n| n > 0.0),
            "{body}"
        );
        assert!(body.contains("drs_scrub_passes_total"), "{body}");
        assert!(body.contains("drs_node_lease_expiries_total"), "{body}");
        reads += sample(&body, "drs_node_reads_total").unwrap_or(0.0);
        updates += sample(&body, "drs_node_updates_total").unwrap_or(0.0);
        for op in ["update", "lock"] {
            let n = sample(
                &body,
                &format!("drs_node_request_seconds_count{{op=\"{op}\"}}"),
            );
            assert!(n.is_some_and(|n| n > 0.0), "{a}: no {op} latency: {body}");
        }
    }
    assert!(reads >= 8.0, "reads served: {reads}");
    assert!(updates >= 8.0, "updates applied: {updates}");

    let mut conn = std::net::TcpStream::connect(&addrs[0]).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: drs\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}
