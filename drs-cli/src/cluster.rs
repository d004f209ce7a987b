//! `drs-cli cluster up|down`.

use crate::out::say;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use drs_local::{ClusterSpec, LocalCluster, NodeOptions};

use drs_local::size::{human, parse_size};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for the cluster file, node data and logs.
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of node processes.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Data blocks per stripe.
    #[arg(short = 'k', default_value_t = 4)]
    pub k: u8,
    /// Parity blocks per stripe: how many nodes may fail.
    #[arg(short = 'm', default_value_t = 2)]
    pub m: u8,
    /// Block size (e.g. 4KiB, 64KiB, 1MiB).
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub block_size: u64,
    /// Number of data blocks (rounded up to a multiple of k).
    #[arg(long, default_value_t = 4096)]
    pub blocks: u64,
    /// Members that must hold a write before it is acknowledged (k..=k+m; default k).
    #[arg(long)]
    pub min_write: Option<u8>,
    /// Metadata (Raft) replicas, hosted by the first nodes: 3 or 5 outlive 1 or 2
    /// failed replicas (default 2m + 1, at most one per node); 0 keeps the cluster map
    /// static (no failure detection).
    #[arg(long)]
    pub meta: Option<usize>,
    /// Milliseconds of silence after which the metadata service marks a node down.
    #[arg(long, default_value_t = 3000)]
    pub down_after_ms: u64,
    /// Milliseconds of silence after which the metadata service ends a mount's
    /// session (a mount that died: the files it had open are closed, the blocks held
    /// for it freed) [default: 90000].
    #[arg(long)]
    pub session_expiry_ms: Option<u64>,
    /// MiB of file system namespace (encoded; a small file takes about 50 bytes)
    /// past which files are no longer created (ENOSPC); every metadata replica holds
    /// the namespace in memory [default: 64].
    #[arg(long)]
    pub namespace_limit_mib: Option<u64>,
    /// Seconds between the nodes' background scrub passes, which read every block
    /// and check it against its checksum (0: never).
    #[arg(long, default_value_t = 86400)]
    pub scrub_every_s: u64,
    /// MiB per second each node's background scrubber reads at most (0: no limit).
    #[arg(long, default_value_t = 8.0)]
    pub scrub_rate_mib: f64,
    /// Each node serves Prometheus metrics (`GET /metrics`) on a port of 127.0.0.1,
    /// listed in the output.
    #[arg(long)]
    pub metrics: bool,
}

pub async fn up(a: UpArgs) -> anyhow::Result<()> {
    let block_size = u32::try_from(a.block_size).context("block size too large")?;
    let spec = ClusterSpec {
        nodes: a.nodes,
        k: a.k,
        m: a.m,
        block_size,
        blocks: a.blocks,
        min_write: a.min_write,
        meta_replicas: a
            .meta
            .unwrap_or_else(|| drs_local::default_meta_replicas(a.nodes, a.m)),
    };
    let options = NodeOptions {
        down_after_ms: a.down_after_ms,
        scrub_every_s: a.scrub_every_s,
        scrub_rate_mib: a.scrub_rate_mib,
        metrics: a.metrics,
        session_expiry_ms: a.session_expiry_ms,
        namespace_limit_mib: a.namespace_limit_mib,
        ..NodeOptions::default()
    };
    let local = LocalCluster::create(&a.dir, &spec, crate::server_command()?, options)?;
    let started = match local.start_all(true) {
        Ok(()) => {
            local
                .wait_up(&local.node_ids(), Duration::from_secs(30))
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = started {
        // Leave nothing running and nothing half-made: the same command can be
        // run again (the node logs stay for reading).
        let _ = local.down(Duration::from_secs(5));
        let _ = local.remove();
        return Err(e).context("start the nodes");
    }
    let v = &local.map.volumes[0];
    say!(
        "cluster {:016x} is up: {} nodes, {}+{} stripes",
        local.map.cluster_id,
        a.nodes,
        v.k,
        v.m
    );
    say!(
        "volume {}: {} blocks of {} ({} of data), writes need {} nodes",
        v.id,
        v.blocks,
        human(v.block_size as u64),
        human(v.blocks * v.block_size as u64),
        v.min_write
    );
    for n in &local.map.nodes {
        let metrics = if a.metrics {
            format!("  metrics http://{}/metrics", local.metrics_addr(n.id)?)
        } else {
            String::new()
        };
        say!(
            "  node {}  {}  log {}{metrics}",
            n.id,
            n.addr,
            local.log_path(n.id).display()
        );
    }
    say!("cluster file: {}", local.map_path.display());
    if !local.map.meta.is_empty() {
        say!(
            "client locator: {} (the metadata service's addresses; clients may use it instead of the cluster file)",
            local.map_path.with_file_name(drs_local::CLIENT_FILE).display()
        );
    }
    say!(
        "cluster key: {} (every connection proves it; a client needs it beside its cluster file or locator; keep it private)",
        drs_proto::ClusterKey::path_for(&local.map_path).display()
    );
    Ok(())
}

pub fn down(dir: &Path) -> anyhow::Result<()> {
    let local = crate::open_local(&dir.join("cluster.toml"))?;
    local.down(Duration::from_secs(10))?;
    say!("cluster in {} stopped", dir.display());
    Ok(())
}
