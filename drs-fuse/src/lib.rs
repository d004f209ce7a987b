//! `drs-fuse`: DRS mounted as a POSIX file system with FUSE.
//!
//! The namespace (inodes, directory entries, each file's blocks, free blocks) lives in
//! the replicated metadata service ([`drs_meta::fs`]); file data lives in DRS blocks,
//! written and read with [`drs_client::Client`] (locks, deltas, degraded reads).
//!
//! - [`ops`]: the file system logic, kernel-free (tests drive it directly).
//! - [`adapter`]: the fuser adapter, types and errors only.
//! - [`cli`]: the `mount` command's arguments (shared with `drs-cli mount`).
//! - [`errno`]: the one table from errors to errno values.
//! - [`mount`]: connect to a cluster, mount, serve until unmounted (`fusermount3 -u`,
//!   SIGTERM or SIGINT).

pub mod adapter;
pub mod caller;
pub mod cli;
pub mod errno;
pub mod ops;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use drs_proto::ClusterMap;

pub use ops::{OpError, Ops, OpsConfig};

/// What `mount` needs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The cluster file (or client locator).
    pub cluster: PathBuf,
    pub mountpoint: PathBuf,
    /// Let users other than the one mounting use the file system (`-o allow_other`).
    pub allow_other: bool,
    /// Longest an operation may take before it fails with EIO.
    pub op_timeout: Duration,
    /// Threads reading requests from the kernel.
    pub threads: usize,
    /// Let the kernel cache writes and send them later, in large requests. Faster for
    /// small writes, but the kernel then trusts its own idea of a file's size and
    /// mtime, so other mounts' changes to a file this mount has cached are not seen:
    /// for a file system used through one mount only.
    pub writeback_cache: bool,
    /// Never update files' access times (`-o noatime`); by default the first read
    /// after an open updates a file's atime by relatime's rule.
    pub noatime: bool,
    /// Every write is on the storage nodes when it returns (`-o write_through`); by
    /// default writes of parts of blocks go to the mount's write-back cache, written
    /// back at flush, fsync and close, and within about a second.
    pub write_through: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Connects to the cluster of `cluster` (formatting its file system if it has none).
pub async fn connect(cluster: &Path, cfg: OpsConfig) -> anyhow::Result<Arc<Ops>> {
    let map = ClusterMap::load(cluster)
        .with_context(|| format!("read cluster file {}", cluster.display()))?;
    let key = drs_proto::ClusterKey::for_cluster_file(cluster)?;
    let map = drs_local::meta::resolve(map, &key)
        .await
        .map_err(anyhow::Error::msg)?;
    let meta = drs_meta::MetaClient::for_map(&map, &key)
        .context("the cluster has no metadata service, which holds the file system")?;
    let vid = map
        .volumes
        .first()
        .map(|v| v.id)
        .context("the cluster file defines no volume")?;
    let data_cfg = drs_client::ClientConfig {
        key,
        ..drs_client::ClientConfig::default()
    };
    let data = drs_local::meta::client(map, vid, data_cfg)?;
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    Ops::new(meta, data, cfg, uid, gid)
        .await
        .context("open the file system")
}

/// Readahead of the mount, KiB: the kernel gives a FUSE mount 128 KiB, which makes
/// sequential reads wait on round trips of 128 KiB each.
const READAHEAD_KB: u32 = 1024;

/// Raises the kernel's readahead for the mount at `mountpoint` to [`READAHEAD_KB`]
/// (`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`; needs root; best effort). The device
/// number comes from `/proc/self/mountinfo`: a `stat` of the mount point would wait on
/// this very process, whose session is not serving yet.
fn raise_readahead(mountpoint: &Path) {
    let want = mountpoint.to_string_lossy();
    let dev = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| {
            info.lines().rev().find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.get(4) == Some(&want.as_ref())).then(|| f.get(2).map(|d| d.to_string()))?
            })
        });
    let Some(dev) = dev else {
        tracing::info!("mount not found in /proc/self/mountinfo; readahead left as is");
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, READAHEAD_KB.to_string()) {
        Ok(()) => tracing::info!(%path, kb = READAHEAD_KB, "readahead raised"),
        Err(e) => tracing::info!(%path, error = %e, "readahead left as is"),
    }
}

/// Mounts the cluster's file system at `cfg.mountpoint` and serves it until it is
/// unmounted (`fusermount3 -u`, `umount`, SIGTERM or SIGINT).
pub fn mount(cfg: &MountConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(2))
        .enable_all()
        .build()
        .context("start the runtime")?;
    let ops_cfg = OpsConfig {
        op_timeout: cfg.op_timeout,
        atime: !cfg.noatime,
        write_cache: !cfg.write_through,
        ..OpsConfig::default()
    };
    let ops = rt.block_on(connect(&cfg.cluster, ops_cfg))?;
    // Kept until the mount ends: dropping it stops the metrics endpoint.
    let (_metrics_stop, metrics_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = cfg.metrics {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("metrics: listen on {addr}"))?;
        let o = ops.clone();
        let render: drs_metrics::Render = Arc::new(move || o.render_metrics());
        rt.spawn(drs_metrics::serve(listener, render, metrics_rx));
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    let fs = adapter::DrsFuse::new(ops.clone(), rt.handle().clone(), cfg.writeback_cache);
    let notifier = fs.notifier_slot();
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName("drs".into()),
        fuser::MountOption::Subtype("drs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::RW,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    if cfg.allow_other {
        options.acl = fuser::SessionACL::All;
    }
    if cfg.noatime {
        options.mount_options.push(fuser::MountOption::NoAtime);
    }
    options.n_threads = Some(cfg.threads.max(1));
    let mut session = fuser::Session::new(fs, &cfg.mountpoint, &options)
        .with_context(|| format!("mount at {}", cfg.mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    raise_readahead(&cfg.mountpoint);
    let mut unmounter = session.unmount_callable();
    rt.spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::warn!(error = %e, "unmount failed");
        }
    });
    tracing::info!(mountpoint = %cfg.mountpoint.display(), "mounted");
    let served = session.run().context("serve the mount");
    let left = rt.block_on(ops.settle_unlocks(std::time::Duration::from_secs(5)));
    if left > 0 {
        tracing::warn!(
            left,
            "unlocks not acknowledged: their locks go when the lease runs out"
        );
    }
    served?;
    tracing::info!("unmounted");
    Ok(())
}
