//! The node's command line, shared by the `drs-server` binary and `drs-cli node-serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use crate::NodeConfig;
use drs_proto::ClusterMap;
use tokio::sync::watch;

/// Options of a node process. Each comes from, in order: the command line, the
/// environment variable named beside it, the `--config` file (the same name with `_`
/// for `-`), the default. docs/CONFIG.md lists them all.
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "drs-server", version, about = "A DRS storage node")]
pub struct ServeArgs {
    /// A TOML file of these options (keys as below with `_` for `-`).
    #[arg(long, env = "DRS_CONFIG")]
    pub config: Option<PathBuf>,
    /// The cluster file (written by `drs-cli cluster up`); required.
    #[arg(long, env = "DRS_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// This node's id in the cluster file; required.
    #[arg(long, env = "DRS_NODE")]
    pub node: Option<u32>,
    /// Data directory (default: the node's `data_dir` in the cluster file).
    #[arg(long, env = "DRS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on (default: the node's `addr` in the cluster file).
    #[arg(long, env = "DRS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Milliseconds to wait after start before verifying blocks against their stripes
    /// (must exceed the clients' reconnect backoff, 1 s) [default: 1500].
    #[arg(long, env = "DRS_SETTLE_MS")]
    pub settle_ms: Option<u64>,
    /// Milliseconds a block may know of an update it has not applied before it is
    /// rebuilt from its stripe [default: 5000].
    #[arg(long, env = "DRS_STUCK_MS")]
    pub stuck_ms: Option<u64>,
    /// Milliseconds between comparisons of every block with its stripe (0: never)
    /// [default: 30000].
    #[arg(long, env = "DRS_VERIFY_INTERVAL_MS")]
    pub verify_interval_ms: Option<u64>,
    /// With a metadata service: milliseconds of silence after which a storage node
    /// is marked down (by the replica this node may host) [default: 3000].
    #[arg(long, env = "DRS_DOWN_AFTER_MS")]
    pub down_after_ms: Option<u64>,
    /// With a metadata service: milliseconds of silence after which a mount's
    /// session is ended by the replica this node may host (its opens closed, blocks
    /// held for it freed) [default: 90000].
    #[arg(long, env = "DRS_SESSION_EXPIRY_MS")]
    pub session_expiry_ms: Option<u64>,
    /// With a metadata service: MiB of file system namespace (encoded; a small file
    /// takes about 50 bytes) past which files are no longer created (ENOSPC). Every
    /// metadata replica holds the namespace in memory, about 12 times this at the
    /// limit; set it alike on every node that hosts one [default: 64].
    #[arg(long, env = "DRS_NAMESPACE_LIMIT_MIB")]
    pub namespace_limit_mib: Option<u64>,
    /// MiB per second this node rebuilds blocks at most when it rejoins or replaces
    /// another (0: no limit) [default: 0].
    #[arg(long, env = "DRS_REBUILD_RATE_MIB")]
    pub rebuild_rate_mib: Option<f64>,
    /// Seconds between the starts of two background scrub passes, which read every
    /// block and check it against its checksum (0: never; the first pass starts at
    /// most 5 minutes after the node) [default: 86400].
    #[arg(long, env = "DRS_SCRUB_EVERY_S")]
    pub scrub_every_s: Option<u64>,
    /// MiB per second the background scrubber reads at most (0: no limit)
    /// [default: 8].
    #[arg(long, env = "DRS_SCRUB_RATE_MIB")]
    pub scrub_rate_mib: Option<f64>,
    /// Run without a cluster key file: connections are not authenticated, and anyone
    /// who can reach the node can read and write its blocks. Without this a node
    /// whose cluster has no key file refuses to start.
    #[arg(long, env = "DRS_OPEN", num_args = 0..=1, default_missing_value = "true")]
    pub open: Option<bool>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "DRS_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Checkpoint the block store when its log exceeds this many MiB [default: 64].
    #[arg(long, env = "DRS_CHECKPOINT_MIB")]
    pub checkpoint_mib: Option<u64>,
    /// Fault injection, for tests of network partitions: SIGUSR1 cuts this node's
    /// metadata replica off from the other replicas, SIGUSR2 heals it. Never in
    /// production (command line only).
    #[arg(long)]
    pub fault_signals: bool,
}

/// The `--config` file: the options of [`ServeArgs`], every one optional.
#[derive(serde::Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub cluster: Option<PathBuf>,
    pub node: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub settle_ms: Option<u64>,
    pub stuck_ms: Option<u64>,
    pub verify_interval_ms: Option<u64>,
    pub down_after_ms: Option<u64>,
    pub session_expiry_ms: Option<u64>,
    pub namespace_limit_mib: Option<u64>,
    pub rebuild_rate_mib: Option<f64>,
    pub scrub_every_s: Option<u64>,
    pub scrub_rate_mib: Option<f64>,
    pub open: Option<bool>,
    pub metrics: Option<SocketAddr>,
    pub checkpoint_mib: Option<u64>,
}

impl ConfigFile {
    /// Reads and parses a config file; an error names the file and the line.
    pub fn load(path: &std::path::Path) -> anyhow::Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    format!(" (line {})", before.matches('\n').count() + 1)
                })
                .unwrap_or_default();
            anyhow::anyhow!(
                "config file {}: {}{at}",
                path.display(),
                e.message().trim().replace('\n', " ")
            )
        })
    }
}

impl ServeArgs {
    /// Fills what the command line and the environment left unset from the config
    /// file, if one is named.
    pub fn merged(mut self) -> anyhow::Result<ServeArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let f = ConfigFile::load(&path)?;
        macro_rules! fill {
            ($($field:ident),*) => { $( if self.$field.is_none() { self.$field = f.$field.clone(); } )* };
        }
        fill!(
            cluster,
            node,
            data_dir,
            listen,
            settle_ms,
            stuck_ms,
            verify_interval_ms,
            down_after_ms,
            session_expiry_ms,
            namespace_limit_mib,
            rebuild_rate_mib,
            scrub_every_s,
            scrub_rate_mib,
            open,
            metrics,
            checkpoint_mib
        );
        Ok(self)
    }
}

/// A rate in MiB per second as bytes per second, or a clear error.
fn rate(name: &str, mib: f64) -> anyhow::Result<u64> {
    if !(mib.is_finite() && mib >= 0.0) {
        bail!("{name} must be a number of MiB per second, 0 or more (got {mib})");
    }
    Ok((mib * 1048576.0) as u64)
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
    let args = args.merged()?;
    let Some(cluster) = args.cluster.clone() else {
        bail!("no cluster file: pass --cluster FILE, set DRS_CLUSTER, or set cluster in the --config file");
    };
    let Some(node) = args.node else {
        bail!("no node id: pass --node ID, set DRS_NODE, or set node in the --config file");
    };
    let map = ClusterMap::load(&cluster)?;
    let key = drs_proto::ClusterKey::for_cluster_file(&cluster)?;
    let Some(entry) = map.node(node).cloned() else {
        bail!("node {node} is not in cluster file {}", cluster.display());
    };
    let data_dir = match (args.data_dir, entry.data_dir) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => bail!(
            "no data directory: pass --data-dir or set data_dir for node {node} in the cluster file"
        ),
    };
    let listen = args.listen.unwrap_or(entry.addr);
    let mut cfg = NodeConfig::new(node, data_dir);
    cfg.settle = Duration::from_millis(args.settle_ms.unwrap_or(1500));
    cfg.stuck_after = Duration::from_millis(args.stuck_ms.unwrap_or(5000));
    cfg.verify_interval = Duration::from_millis(args.verify_interval_ms.unwrap_or(30_000));
    cfg.checkpoint_bytes = args.checkpoint_mib.unwrap_or(64) << 20;
    cfg.meta_down_after = Duration::from_millis(args.down_after_ms.unwrap_or(3000).max(100));
    cfg.session_expiry = args
        .session_expiry_ms
        .map_or(drs_meta::DEFAULT_SESSION_EXPIRY, Duration::from_millis)
        .max(Duration::from_millis(500));
    if let Some(mib) = args.namespace_limit_mib {
        let max = (drs_meta::store::MAX_STATE_LEN >> 20) / 2;
        if mib == 0 || mib as usize > max {
            bail!("--namespace-limit-mib must be between 1 and {max} (got {mib})");
        }
        cfg.namespace_limit = (mib as usize) << 20;
    }
    if cfg.session_expiry < Duration::from_secs(60) {
        tracing::warn!(
            expiry_ms = cfg.session_expiry.as_millis() as u64,
            "--session-expiry-ms is below 60000: a mount cut off from the metadata service \
             stops using its block maps 30 s after its last answer and may have operations \
             of up to 30 s under way, so blocks freed for it may be reused while it still \
             writes them (for tests only)"
        );
    }
    cfg.rebuild_rate = rate("rebuild-rate-mib", args.rebuild_rate_mib.unwrap_or(0.0))?;
    cfg.scrub_rate = rate("scrub-rate-mib", args.scrub_rate_mib.unwrap_or(8.0))?;
    cfg.scrub_every = Duration::from_secs(args.scrub_every_s.unwrap_or(86_400));
    cfg.metrics = args.metrics;
    cfg.fault_signals = args.fault_signals;
    if key.is_open() {
        let path = drs_proto::ClusterKey::path_for(&cluster);
        if !args.open.unwrap_or(false) {
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
