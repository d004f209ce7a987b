//! The node's command line, shared by the `drs-server` binary and `drs-cli node-serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use crate::NodeConfig;
use drs_proto::ClusterMap;
use tokio::sync::watch;

/// Options of a node process.
#[derive(Parser, Debug, Clone)]
#[command(name = "drs-server", version, about = "A DRS storage node")]
pub struct ServeArgs {
    /// The cluster file (written by `drs-cli cluster up`).
    #[arg(long)]
    pub cluster: PathBuf,
    /// This node's id in the cluster file.
    #[arg(long)]
    pub node: u32,
    /// Data directory (default: the node's `data_dir` in the cluster file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on (default: the node's `addr` in the cluster file).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Milliseconds to wait after start before verifying blocks against their stripes
    /// (must exceed the clients' reconnect backoff, 1 s by default).
    #[arg(long, default_value_t = 1500)]
    pub settle_ms: u64,
    /// Milliseconds a block may know of an update it has not applied before it is
    /// rebuilt from its stripe.
    #[arg(long, default_value_t = 5000)]
    pub stuck_ms: u64,
    /// Milliseconds between comparisons of every block with its stripe (0: never).
    #[arg(long, default_value_t = 30000)]
    pub verify_interval_ms: u64,
    /// With a metadata service: milliseconds of silence after which a storage node
    /// is marked down (by the replica this node may host).
    #[arg(long, default_value_t = 3000)]
    pub down_after_ms: u64,
    /// MiB per second this node rebuilds blocks at most when it rejoins or replaces
    /// another (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    pub rebuild_rate_mib: f64,
    /// Seconds between the starts of two background scrub passes, which read every
    /// block and check it against its checksum (0: never; the first pass starts at
    /// most 5 minutes after the node).
    #[arg(long, default_value_t = 86400)]
    pub scrub_every_s: u64,
    /// MiB per second the background scrubber reads at most (0: no limit).
    #[arg(long, default_value_t = 8.0)]
    pub scrub_rate_mib: f64,
    /// Run without a cluster key file: connections are not authenticated, and anyone
    /// who can reach the node can read and write its blocks. Without this flag a node
    /// whose cluster has no key file refuses to start.
    #[arg(long)]
    pub open: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Checkpoint the block store when its log exceeds this many MiB.
    #[arg(long, default_value_t = 64)]
    pub checkpoint_mib: u64,
    /// Fault injection, for tests of network partitions: SIGUSR1 cuts this node's
    /// metadata replica off from the other replicas, SIGUSR2 heals it. Never in
    /// production.
    #[arg(long)]
    pub fault_signals: bool,
}

/// Runs a node until SIGTERM or SIGINT.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let map = ClusterMap::load(&args.cluster)?;
    let key = drs_proto::ClusterKey::for_cluster_file(&args.cluster)?;
    let Some(entry) = map.node(args.node).cloned() else {
        bail!(
            "node {} is not in cluster file {}",
            args.node,
            args.cluster.display()
        );
    };
    let data_dir = match (args.data_dir, entry.data_dir) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => bail!(
            "no data directory: pass --data-dir or set data_dir for node {} in the cluster file",
            args.node
        ),
    };
    let listen = args.listen.unwrap_or(entry.addr);
    let mut cfg = NodeConfig::new(args.node, data_dir);
    cfg.settle = Duration::from_millis(args.settle_ms);
    cfg.stuck_after = Duration::from_millis(args.stuck_ms);
    cfg.verify_interval = Duration::from_millis(args.verify_interval_ms);
    cfg.checkpoint_bytes = args.checkpoint_mib << 20;
    cfg.meta_down_after = Duration::from_millis(args.down_after_ms.max(100));
    if !(args.rebuild_rate_mib.is_finite() && args.rebuild_rate_mib >= 0.0) {
        bail!("--rebuild-rate-mib must be a number of MiB per second, 0 or more");
    }
    cfg.rebuild_rate = (args.rebuild_rate_mib * 1048576.0) as u64;
    if !(args.scrub_rate_mib.is_finite() && args.scrub_rate_mib >= 0.0) {
        bail!("--scrub-rate-mib must be a number of MiB per second, 0 or more");
    }
    cfg.scrub_rate = (args.scrub_rate_mib * 1048576.0) as u64;
    cfg.scrub_every = Duration::from_secs(args.scrub_every_s);
    cfg.metrics = args.metrics;
    cfg.fault_signals = args.fault_signals;
    if key.is_open() {
        let path = drs_proto::ClusterKey::path_for(&args.cluster);
        if !args.open {
            bail!(
                "no cluster key at {} (`drs-cli cluster up` writes it; copy it there, or pass --open to run without authentication)",
                path.display()
            );
        }
        tracing::warn!(
            key_file = %path.display(),
            "running open (--open): connections are not authenticated; anyone who can reach this node can use it"
        );
    }
    cfg.key = key;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen}"))?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        });
        crate::run(cfg, map, listener, rx).await
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
