//! The `mount` command's arguments, shared by `drs-fuse mount` and `drs-cli mount`.

use std::path::PathBuf;
use std::time::Duration;

use crate::MountConfig;

/// Mount a DRS cluster's file system.
#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// The cluster file (or client locator) of the cluster.
    #[arg(long)]
    pub cluster: PathBuf,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Mount options, comma-separated: `allow_other` lets other users in;
    /// `writeback_cache` lets the kernel cache writes (faster small writes, for a file
    /// system used through this mount only: other mounts' changes to files this mount
    /// has cached are then not seen); `noatime` does not update files' access times
    /// (by default a read updates them by relatime's rule); `write_through` puts every
    /// write on the storage nodes before it returns (by default writes of parts of
    /// blocks are cached by the mount and written back at flush, fsync and close, and
    /// within about a second).
    #[arg(short = 'o', value_delimiter = ',')]
    pub options: Vec<String>,
    /// Seconds an operation may take before it fails with EIO (when more than m nodes
    /// are down, or the metadata service has no quorum).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Threads reading requests from the kernel.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
}

impl MountArgs {
    pub fn config(&self) -> MountConfig {
        MountConfig {
            cluster: self.cluster.clone(),
            mountpoint: self.mountpoint.clone(),
            allow_other: self.options.iter().any(|o| o == "allow_other"),
            op_timeout: Duration::from_secs(self.timeout.max(1)),
            threads: self.threads.clamp(1, 64),
            writeback_cache: self.options.iter().any(|o| o == "writeback_cache"),
            noatime: self.options.iter().any(|o| o == "noatime"),
            write_through: self.options.iter().any(|o| o == "write_through"),
            metrics: self.metrics,
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info, but for fuser's session:
/// once the kernel ended it, after an unmount from outside, it tries to unmount
/// again and warns that it could not; [`crate::mount`] says so itself when the
/// mount is in fact left behind).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::session=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
