//! The node's Prometheus metrics (`--metrics ADDR`, `GET /metrics`): requests served
//! and their latency by kind, bytes, locks, lease expiries (fenced clients), relays,
//! corrupt blocks and repairs, recovery and rebuild progress (blocks verified), the
//! background scrubber's passes and position, the log and pending updates.

use drs_metrics::Snapshot;
use drs_proto::NodeState;

use crate::node::Node;

/// The node's metrics as OpenMetrics text.
pub fn render(node: &Node) -> String {
    let info = node.info();
    let s = &info.stats;
    let (verified, total) = match info.state {
        NodeState::Up => {
            let (v, t) = node.verified();
            (v, t)
        }
        NodeState::Recovering { verified, total } => (verified, total),
    };
    let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut m = Snapshot::default();
    m.gauge(
        "node_up",
        "1 when every block is verified and served, 0 while the node recovers or rebuilds.",
        i64::from(matches!(info.state, NodeState::Up)),
    )
    .gauge(
        "node_blocks_verified",
        "Blocks verified against their stripes (recovery and rebuild progress).",
        g(verified),
    )
    .gauge("node_blocks", "Blocks this node holds.", g(total))
    .gauge(
        "node_epoch",
        "Cluster map epoch the node knows.",
        g(info.epoch),
    )
    .gauge(
        "node_incarnation",
        "Incarnation of this start of the node.",
        g(info.incarnation),
    )
    .counter("node_reads", "Block reads served.", s.reads)
    .counter("node_read_bytes", "Bytes of blocks read.", s.bytes_read)
    .counter("node_updates", "Updates (deltas) applied.", s.updates)
    .counter(
        "node_update_bytes",
        "Bytes of updates applied.",
        s.bytes_updated,
    )
    .counter(
        "node_locks_granted",
        "Lock requests granted.",
        s.locks_granted,
    )
    .counter(
        "node_locks_denied",
        "Lock requests refused (held by another client).",
        s.locks_denied,
    )
    .counter(
        "node_lease_expiries",
        "Clients fenced because their lease ran out while they held locks.",
        s.fenced,
    )
    .counter(
        "node_updates_relayed",
        "Updates passed on to members that lacked them.",
        s.relayed,
    )
    .counter(
        "node_cache_blocks_written_back",
        "Cached blocks written back for dead clients.",
        s.written_back,
    )
    .counter(
        "node_corrupt_found",
        "Blocks found failing their checksum (reads and scrubber).",
        s.corrupt_found,
    )
    .counter(
        "node_repairs_installed",
        "Blocks rebuilt from their stripes and installed.",
        s.repairs_installed,
    )
    .counter(
        "node_pauses",
        "Times the process found it had been paused.",
        s.pauses,
    )
    .gauge(
        "node_pending_updates",
        "Updates logged and waiting for an earlier version.",
        g(s.pending_updates),
    )
    .gauge(
        "node_wal_bytes",
        "Bytes in the write-ahead log.",
        g(s.wal_bytes),
    )
    .counter("node_fsyncs", "Write-ahead log syncs.", s.fsyncs)
    .counter(
        "scrub_passes",
        "Background scrub passes completed.",
        s.scrub_passes,
    )
    .counter(
        "scrub_blocks_checked",
        "Blocks the background scrubber checked.",
        s.scrub_checked,
    )
    .counter(
        "scrub_corrupt_found",
        "Blocks the background scrubber found corrupt.",
        s.scrub_found,
    )
    .counter(
        "scrub_repaired",
        "Blocks the background scrubber rebuilt.",
        s.scrub_repaired,
    )
    .gauge(
        "scrub_pass_position",
        "Blocks checked in the pass under way (0 between passes).",
        g(s.scrub_position),
    )
    .gauge(
        "scrub_pass_blocks",
        "Blocks in one scrub pass.",
        g(s.scrub_total),
    )
    .metric(
        "node_request_seconds",
        "Time from a request's arrival to its answer, by kind.",
        node.latencies.clone(),
    );
    m.encode()
}
