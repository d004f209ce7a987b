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
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A mount as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    /// Its device number, `MAJOR:MINOR`.
    dev: String,
    /// Where it is mounted (canonical, unescaped).
    path: PathBuf,
    fstype: String,
    source: String,
}

/// The mount table's entries, from the text of a `mountinfo` file (oldest first:
/// of entries at one path, the last is the one on top).
fn mount_table(info: &str) -> Vec<MountEntry> {
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let mut after = f.iter().skip_while(|x| **x != "-").skip(1);
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                path: unescape(f.get(4)?),
                fstype: after.next()?.to_string(),
                source: after.next()?.to_string(),
            })
        })
        .collect()
}

/// A `mountinfo` path field, its octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The DRS mount on top at `mountpoint` (canonical), if it is one.
fn drs_mount_at(mountpoint: &Path) -> Option<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_table(&info)
        .into_iter()
        .rev()
        .find(|e| e.path == mountpoint)
        // `fuse`, or `fuse.drs` where mounted through fusermount3; source `drs`.
        .filter(|e| (e.fstype == "fuse" || e.fstype == "fuse.drs") && e.source == "drs")
}

/// Raises the kernel's readahead for the mount `ours` to [`READAHEAD_KB`]
/// (`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`; needs root; best effort).
fn raise_readahead(ours: &MountEntry) {
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", ours.dev);
    match std::fs::write(&path, READAHEAD_KB.to_string()) {
        Ok(()) => tracing::info!(%path, kb = READAHEAD_KB, "readahead raised"),
        Err(e) => tracing::info!(%path, error = %e, "readahead left as is"),
    }
}

/// Longest the end of a mount waits for each of its steps (committing each open
/// file, writing the cache back, each unlock).
const SHUT_DOWN_MAX: Duration = Duration::from_secs(5);

/// How long a SIGTERM waits for an unmount to end the session before it takes the
/// mount as busy.
const UNMOUNT_GRACE: Duration = Duration::from_secs(2);

/// Longest a SIGTERM waits for the kernel to write back the pages it holds.
const SYNC_MAX: Duration = Duration::from_secs(10);

/// On SIGTERM or SIGINT, unmounts. First the kernel writes back the file pages it
/// holds (`syncfs`: a `writeback_cache` mount, shared mappings). A mount that is
/// not busy then ends as with `fusermount3 -u` (the kernel closes every file, and
/// `session.run` returns). A busy one (files open, or a process's working
/// directory in it) is detached (as `umount -l`), [`Ops::shut_down`] commits what
/// the open files wrote, and the process exits (1 if a commit failed); processes
/// that still hold files there get ENOTCONN, as from any FUSE file system whose
/// process is gone.
async fn on_signal(
    mut unmounter: fuser::SessionUnmounter,
    ops: Arc<Ops>,
    ours: Option<MountEntry>,
    mountpoint: PathBuf,
    served_out: Arc<AtomicBool>,
) {
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
    let root = mountpoint.clone();
    let sync = tokio::task::spawn_blocking(move || {
        let dir = std::fs::File::open(&root)?;
        nix::unistd::syncfs(&dir).map_err(std::io::Error::from)
    });
    match tokio::time::timeout(SYNC_MAX, sync).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "syncfs of the mount failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "syncfs of the mount ended"),
        Err(_) => tracing::warn!(?SYNC_MAX, "syncfs of the mount took too long"),
    }
    // As root a plain umount(2), refused while busy; otherwise `fusermount3 -u -z`,
    // which detaches at once and leaves open files served.
    if let Err(e) = tokio::task::block_in_place(|| unmounter.unmount()) {
        tracing::info!(error = %e, "the mount is busy");
    }
    let waited = std::time::Instant::now();
    while waited.elapsed() < UNMOUNT_GRACE && !served_out.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if served_out.load(Ordering::SeqCst) {
        // Unmounted: the main thread ends the mount.
        return;
    }
    tracing::info!(
        "files or directories are still in use: detaching, then committing what open files wrote"
    );
    if let Some(ours) = &ours {
        detach(ours);
    }
    let end = ops.shut_down(SHUT_DOWN_MAX).await;
    report(&end);
    if end.uncommitted > 0 {
        tracing::error!(
            files = end.uncommitted,
            "unmounted (detached), but open files could not be committed: what they wrote since their last fsync may be lost"
        );
        std::process::exit(1);
    }
    tracing::info!("unmounted (detached): processes still using it get ENOTCONN");
    // Closing the FUSE device ends the kernel's connection.
    std::process::exit(0);
}

/// Logs what [`Ops::shut_down`] left.
fn report(end: &ops::ShutDown) {
    if end.unlocks_left > 0 {
        tracing::warn!(
            left = end.unlocks_left,
            "unlocks not acknowledged: their locks go when the lease runs out"
        );
    }
}

/// Detaches the mount `ours` lazily (`umount2(MNT_DETACH)`, or `fusermount3 -u
/// -z` where that is not permitted), if it is still the one on top at its path;
/// best effort.
fn detach(ours: &MountEntry) {
    if drs_mount_at(&ours.path).is_none_or(|top| top.dev != ours.dev) {
        tracing::info!(path = %ours.path.display(), "the mount is no longer on top there");
        return;
    }
    if nix::mount::umount2(&ours.path, nix::mount::MntFlags::MNT_DETACH).is_ok() {
        return;
    }
    match std::process::Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(&ours.path)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => tracing::warn!(
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "fusermount3 -u -z failed"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot run fusermount3"),
    }
}

/// Mounts the cluster's file system at `cfg.mountpoint` and serves it until it is
/// unmounted (`fusermount3 -u`, `umount`, SIGTERM or SIGINT).
pub fn mount(cfg: &MountConfig) -> anyhow::Result<()> {
    // Canonical, as the mount table has it.
    let mountpoint = cfg
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", cfg.mountpoint.display()))?;
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
    let mut session = fuser::Session::new(fs, &mountpoint, &options)
        .with_context(|| format!("mount at {}", mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    // From the mount table: a `stat` of the mount point would wait on this very
    // process, whose session is not serving yet.
    let ours = drs_mount_at(&mountpoint);
    match &ours {
        Some(ours) => raise_readahead(ours),
        None => tracing::warn!("the mount is not in /proc/self/mountinfo"),
    }
    let served_out = Arc::new(AtomicBool::new(false));
    let our_dev = ours.as_ref().map(|o| o.dev.clone());
    rt.spawn(on_signal(
        session.unmount_callable(),
        ops.clone(),
        ours,
        mountpoint.clone(),
        served_out.clone(),
    ));
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    let served = session.run().context("serve the mount");
    served_out.store(true, Ordering::SeqCst);
    // The session, gone with `run`, unmounts if it ended with the mount in place (an
    // error); fuser's own warning when that fails is not logged
    // (`cli::init_logging`), so it is said here.
    if let Some(left) = drs_mount_at(&mountpoint).filter(|e| Some(&e.dev) == our_dev.as_ref()) {
        tracing::warn!(
            mountpoint = %left.path.display(),
            "the mount is still in the mount table, with nothing serving it: `fusermount3 -u -z` it"
        );
    }
    let end = rt.block_on(ops.shut_down(SHUT_DOWN_MAX));
    report(&end);
    served?;
    if end.uncommitted > 0 {
        anyhow::bail!(
            "unmounted, but {} open files could not be committed: what they wrote since their last fsync may be lost",
            end.uncommitted
        );
    }
    tracing::info!("unmounted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_table_is_read_with_escapes_undone() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:40 / /tmp/a\\040b rw,nosuid - fuse drs rw,user_id=0\n\
                    41 40 0:41 / /tmp/a\\040b rw - fuse.drs drs rw\n\
                    42 22 0:42 / /mnt/x\\134y rw - fuse.sshfs host:/ rw\n";
        let t = mount_table(info);
        assert_eq!(t.len(), 4);
        assert_eq!(t[1].path, Path::new("/tmp/a b"));
        assert_eq!(t[1].dev, "0:40");
        assert_eq!(
            (t[2].fstype.as_str(), t[2].source.as_str()),
            ("fuse.drs", "drs")
        );
        assert_eq!(t[3].path, Path::new("/mnt/x\\y"));
        assert_eq!(unescape("plain"), Path::new("plain"));
        assert_eq!(unescape("a\\09"), Path::new("a\\09"), "not an octal escape");
    }

    #[test]
    fn this_process_mount_table_has_its_root() {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(mount_table(&info).iter().any(|e| e.path == Path::new("/")));
        assert!(drs_mount_at(Path::new("/")).is_none(), "/ is no DRS mount");
    }
}
