//! The file system logic, without the kernel: namespace operations go to the metadata
//! service ([`drs_meta::fs`]), file data to DRS blocks through [`drs_client::Client`].
//!
//! What this module owns:
//! - **Open files.** Per inode this mount has open: the open handles, the size and
//!   mtime of writes not yet told to the metadata service, the file's block map as
//!   far as it has been read, and whether the inode lost its last name while open
//!   (it is dropped at the last close).
//! - **Close-to-open consistency.** `open` re-reads the inode and its block map from
//!   the metadata leader; `flush`, `fsync` and `release` tell the leader the new size
//!   and mtime. Data is written to the storage nodes before `write` returns, so what
//!   a close makes visible is already durable.
//! - **Block ownership.** A file's block gets a data block address from the metadata
//!   service (`Map`) the first time it is written; a block handed out fresh is written
//!   whole (zeros around the new bytes), so a file never shows another file's old
//!   bytes. Truncation zeroes the rest of the new last block, so growing a file
//!   later shows zeros.
//! - **Freeing against use.** Blocks of an open file are freed (truncate, punch,
//!   the last close giving back blocks taken ahead) only while no read or write of
//!   it is under way in this mount: a per-file lock, shared by reads and writes and
//!   held alone by freeings. Otherwise a block map fetched before a freeing could
//!   send a write to a block the volume has since given to another file. Freeings
//!   by other mounts are covered by the mount's session (`session.rs`).
//! - **Write-back cache.** A write of part of a block goes to the mount's
//!   [`WriteBackCache`] (report 5.3.1: the block is locked and read once, later
//!   writes change the cached bytes and a running-total delta, one update writes it
//!   back); whole blocks go straight to the nodes. A file's cached blocks are written
//!   back before its size is committed (flush, fsync, close, truncate, fallocate),
//!   when it holds [`CACHE_FILE_BLOCKS`], and by a background task once cached for
//!   [`CACHE_AGE`], so another mount's writer never waits on their locks for long. A
//!   failed write-back is reported by the file's next flush, fsync or close (EIO),
//!   and the blocks it held that were never committed stay unwritten.
//! - **Bounded operations.** Every operation gives up with [`OpError::Timeout`] (EIO)
//!   after the configured time, so an application never hangs on a lost cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use drs_client::{Client, ClientError, WriteBackCache};
use drs_meta::fs::{
    Attr, BlockRange, DirEntry, FsCommand, FsError, FsQuery, FsReply, FsStats, Ino, Kind, Mapping,
    SetAttr, Time, MAP_MAX,
};

/// Blocks a sequential writer takes ahead of its writes with one `Map` (16 MiB of
/// 64 KiB blocks): one metadata round trip per this many blocks instead of per write.
const AHEAD: u64 = 256;
/// Block maps ([`MAP_MAX`] blocks each) one `SEEK_DATA` or `SEEK_HOLE` asks for at
/// most: 4 GiB of a file in 64 KiB blocks.
const SEEK_SCAN: u64 = 16;
/// Bytes one `copy_file_range` request copies at most (held in memory meanwhile).
const COPY_MAX: u64 = 4 << 20;
/// Background atime updates a mount runs at once.
const ATIME_IN_FLIGHT: usize = 64;
/// The extended attribute holding a file's capabilities.
const CAPABILITY: &[u8] = b"security.capability";
/// Blocks one file may hold in the write-back cache; a write past this writes the
/// file's cached blocks back.
const CACHE_FILE_BLOCKS: usize = 64;
/// How long a block stays in the write-back cache (holding its lock) at most, about.
const CACHE_AGE: Duration = Duration::from_secs(1);
/// How often the background task looks for blocks cached longer than [`CACHE_AGE`].
const CACHE_TICK: Duration = Duration::from_millis(250);
use drs_meta::{MetaClient, MetaError};
use futures::stream::{self, StreamExt};

use crate::caller::Creds;

#[path = "session.rs"]
mod session;
pub use session::{SESSION_GUARD, SESSION_TICK};
#[path = "locks.rs"]
pub mod locks;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// The namespace refused it (a POSIX error).
    #[error("{0}")]
    Fs(#[from] FsError),
    #[error("metadata service: {0}")]
    Meta(#[from] MetaError),
    #[error("data: {0}")]
    Data(#[from] ClientError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the metadata service answered {0}")]
    Unexpected(String),
    /// Not something this file system does (EOPNOTSUPP).
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// Writes that had returned were lost: writing them back from the cache failed.
    #[error("writing cached blocks back failed: {0}")]
    WriteBack(String),
    /// No heartbeat of the mount's session was answered for this long: its block
    /// maps may be stale (see [`SESSION_GUARD`]).
    #[error("the metadata service has not answered the mount for {0:?}")]
    SessionLapsed(Duration),
    /// The file was dropped while the mount's session was ended.
    #[error("the file was lost while the mount was cut off")]
    Lost,
    /// A waiting lock request's process got a signal (EINTR).
    #[error("interrupted while waiting for a lock")]
    Interrupted,
    /// The open file's byte-range locks were released while the mount was cut
    /// off (its session expired): its reads, writes and locks fail until it is
    /// closed.
    #[error("the open file's locks were lost while the mount was cut off")]
    LocksLost,
    /// `lseek` found no data at or after the offset (ENXIO).
    #[error("no data at or after the offset")]
    NoData,
    /// The mount is ending (SIGTERM or SIGINT with files still open): what they
    /// wrote is being committed, and their data is no longer read or written
    /// (ENOTCONN, as once the mount process is gone).
    #[error("the mount is being unmounted")]
    Unmounting,
    /// The inode the kernel named is gone: another mount removed or replaced it
    /// since this mount's kernel looked it up (ESTALE, so the kernel looks the path
    /// up again and retries; see [`OpError::on_inode`]).
    #[error("the file was removed by another mount since it was looked up")]
    Stale,
}

impl OpError {
    /// `self`, from an operation on an inode the kernel holds (not on a name in a
    /// directory): a missing inode is [`OpError::Stale`]. The kernel caches a name's
    /// inode for the entry timeout, so after another mount renames a file over it
    /// or unlinks it, an `open`, `stat`, `chmod`, `readlink` or extended attribute
    /// call by path reaches the old inode; with ESTALE the kernel walks the path
    /// again with a fresh lookup and retries once (as it does for NFS), so the
    /// caller sees the new file (or ENOENT if the name is gone), as on a local file
    /// system.
    pub fn on_inode(self) -> OpError {
        match self {
            OpError::Fs(FsError::NotFound) => OpError::Stale,
            e => e,
        }
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// Settings of a mount.
#[derive(Debug, Clone)]
pub struct OpsConfig {
    /// Longest an operation may take before it fails with EIO.
    pub op_timeout: Duration,
    /// Data blocks written or read at once per request.
    pub parallel: usize,
    /// Update a file's atime when it is read, by relatime's rule (`-o noatime`:
    /// never).
    pub atime: bool,
    /// Writes of part of a block go through the write-back cache (`-o
    /// write_through`: never; every write is on the nodes when it returns).
    pub write_cache: bool,
}

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            op_timeout: Duration::from_secs(30),
            parallel: 16,
            atime: true,
            write_cache: true,
        }
    }
}

/// An open inode's state in this mount.
#[derive(Debug, Default)]
struct Open {
    handles: u32,
    /// Size including this mount's writes not yet committed.
    size: u64,
    /// mtime of the last uncommitted write.
    dirty: Option<Time>,
    /// File block -> data block, as far as known.
    blocks: BTreeMap<u64, u64>,
    /// File blocks `.0 .. .1` are all known: in `blocks`, or holes.
    window: (u64, u64),
    /// Blocks of `blocks` that are unwritten (read as zeros; write them whole).
    fresh: BTreeSet<u64>,
    /// Unwritten blocks this mount wrote whole, to name in the next `Written`.
    settled: BTreeSet<u64>,
    /// The time of the last write (for the `Written` of the last close).
    last_write: Option<Time>,
    /// This mount took blocks ahead of its writes: the last close gives back those
    /// it did not use.
    took_ahead: bool,
    /// Its atime is due for an update (relatime) at the next read.
    atime_due: bool,
    /// Held shared by reads and writes, alone by what frees blocks of the file
    /// (truncate, punch, the trim of the last close): a block map is never used
    /// across a freeing.
    freeing: Arc<tokio::sync::RwLock<()>>,
    /// Data blocks of the file in the write-back cache: when a write first put each
    /// there, and the number of its latest write (a write-back forgets a block only
    /// if no write came after it began).
    cached: BTreeMap<u64, (Instant, u64)>,
    /// A write-back of the file's blocks failed: the next flush, fsync or close
    /// reports it.
    write_error: Option<String>,
    /// Data blocks whose write-back failed, with the write number then and when: a
    /// write still under way that had cached one of them before does not count it
    /// written (it fails, and the block stays unwritten if it was).
    failed: BTreeMap<u64, (u64, Instant)>,
    /// The file has no `security.capability` (the kernel asks before every write,
    /// to clear it: answered here while the file is open, set again by a getxattr
    /// after each open, cleared by this mount's setxattr).
    no_capability: bool,
    /// Counts this mount's setxattr calls on the file: an absence read across one
    /// is not remembered.
    xattr_sets: u64,
    /// Held while the file's cached blocks are written back and, by a commit, until
    /// its `Written`: a failure of the background write-back is then either seen by
    /// a commit or happens after it.
    write_back: Arc<tokio::sync::Mutex<()>>,
    /// `fallocate` with `KEEP_SIZE` reserved blocks past the end: the last close keeps
    /// every block past the end (it would otherwise give back those taken ahead).
    preallocated: bool,
    /// The file was dropped while this mount's session was ended: its reads and
    /// writes fail.
    lost: bool,
    /// Operations that registered an open of their own for their length (a
    /// truncate): the entry stays until they end.
    temps: u32,
    /// Held by an append from its reading of the size to its write's end.
    appends: Arc<tokio::sync::Mutex<()>>,
}

impl Open {
    /// File blocks `from .. to` are no longer backed by what this mount knew (the
    /// metadata service freed them): forgets them. The window still covers them:
    /// holes now.
    fn forget_blocks(&mut self, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let gone: Vec<u64> = self.blocks.range(from..to).map(|(b, _)| *b).collect();
        for b in gone {
            self.blocks.remove(&b);
        }
        self.fresh.retain(|b| !(from..to).contains(b));
        self.settled.retain(|b| !(from..to).contains(b));
    }
}

/// What the write-back of cached blocks works with (shared with its tasks).
#[derive(Clone)]
struct WriteBack {
    open: Arc<Mutex<HashMap<Ino, Open>>>,
    cache: WriteBackCache,
    stats: Arc<CacheStats>,
    /// Numbers writes to the cache and write-back failures (see [`Open::cached`],
    /// [`Open::failed`]).
    seq: Arc<AtomicU64>,
    /// How long a failure is remembered for writes under way: longer than any
    /// operation may take.
    keep_failures: Duration,
}

/// What a mount's write-back cache did.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Writes of parts of blocks the cache took.
    pub writes: AtomicU64,
    /// Write-backs, each of a set of blocks (one update per stripe).
    pub write_backs: AtomicU64,
    /// Write-backs that failed.
    pub failed: AtomicU64,
}

/// Answers to ACL reads (`system.posix_acl_*`: the value, or none), each kept for
/// [`ACL_TTL`] at most. The kernel reads a file's ACL to check a permission for
/// anyone but the owner, and forgets it at every attribute refresh: without this,
/// that is a metadata round trip per inode per second of use.
#[derive(Debug, Default)]
struct AclCache {
    /// (inode, attribute name) -> when it was read, and the value if there is one.
    answers: HashMap<(Ino, Vec<u8>), AclAnswer>,
    /// Inode -> when the names of its extended attributes were read (with its
    /// attributes, by `readdirplus`), and the names: a read of any other name
    /// within [`ACL_TTL`] is answered that it has none, without a round trip.
    names: HashMap<Ino, (Instant, Vec<Vec<u8>>)>,
    /// Counts this mount's changes of ACLs and modes: an answer read across one is
    /// not kept.
    changes: u64,
}

/// When an ACL was read, and its value if it had one.
type AclAnswer = (Instant, Option<Vec<u8>>);

/// How long an ACL read is answered from [`AclCache`]: the attribute timeout. The
/// kernel may read a fresh mode and then be answered an ACL read up to this long
/// before, so another mount's ACL change or chmod shows within about twice this.
const ACL_TTL: Duration = Duration::from_secs(1);
/// Most answers [`AclCache`] keeps (it starts over past this).
const ACL_CACHE_MAX: usize = 16_384;

impl AclCache {
    fn get(&self, ino: Ino, name: &[u8]) -> Option<Option<Vec<u8>>> {
        let (at, v) = self.answers.get(&(ino, name.to_vec()))?;
        (at.elapsed() < ACL_TTL).then(|| v.clone())
    }

    fn changed(&mut self, ino: Ino) {
        self.changes += 1;
        self.answers.retain(|(i, _), _| *i != ino);
        self.names.remove(&ino);
    }

    /// Whether `ino` was read within [`ACL_TTL`] without an extended attribute
    /// `name`.
    fn absent(&self, ino: Ino, name: &[u8]) -> bool {
        self.names
            .get(&ino)
            .is_some_and(|(at, names)| at.elapsed() < ACL_TTL && !names.iter().any(|n| n == name))
    }
}

impl Open {
    /// Forgets what this mount knew of the file (its capability, size and block
    /// map), as after another mount's changes: at an open (close-to-open) and when
    /// a byte-range lock is granted. Uncommitted writes (cached blocks, blocks to
    /// name) keep the map they were made with.
    fn forget_view(&mut self, a: &Attr) {
        self.no_capability = false;
        if self.unchanged() {
            self.size = a.size;
            self.forget_map();
        }
    }

    /// Forgets the block map, unless uncommitted writes keep it.
    fn forget_map(&mut self) {
        if self.unchanged() {
            self.blocks.clear();
            self.window = (0, 0);
            self.fresh.clear();
        }
    }

    /// No write of this mount waits to be committed.
    fn unchanged(&self) -> bool {
        self.dirty.is_none() && self.cached.is_empty() && self.settled.is_empty()
    }
}

/// One mount's file system: the namespace in the metadata service, data in DRS.
pub struct Ops {
    meta: MetaClient,
    data: Client,
    cfg: OpsConfig,
    block_size: u64,
    open: Arc<Mutex<HashMap<Ino, Open>>>,
    /// Writes of parts of blocks (none with `write_cache` off).
    cache: Option<WriteBackCache>,
    /// Numbers writes that go to the cache (see [`Open::cached`]).
    write_seq: Arc<AtomicU64>,
    /// What the write-back cache did.
    cache_stats: Arc<CacheStats>,
    /// Background atime updates under way (see [`Ops::touch_atime`]).
    atime_updates: Arc<tokio::sync::Semaphore>,
    /// Time each file system operation took, by operation.
    latencies: drs_metrics::Latencies,
    /// The mount's session with the metadata service.
    session: Arc<session::MountSession>,
    /// Recent answers to the kernel's ACL reads (see [`Ops::getxattr`]).
    acls: Mutex<AclCache>,
    /// What this mount knows of its byte-range locks (see [`locks`]).
    locks: Arc<Mutex<locks::LockBook>>,
    /// Woken when a lock owner of this mount unlocks or releases (waiters look again).
    unlocked: Arc<tokio::sync::Notify>,
    /// The size and mtime last given to the kernel for each regular file (see
    /// [`Ops::kernel_may_be_stale`]).
    shown: Mutex<HashMap<Ino, (u64, Time)>>,
    /// Set when the mount ends: file data is no longer read or written (see
    /// [`Ops::shut_down`]).
    unmounting: AtomicBool,
    /// What [`Ops::shut_down`] did, once it has run (a second caller waits for it).
    shut: tokio::sync::OnceCell<ShutDown>,
}

/// Most files whose attributes given to the kernel a mount remembers; past it, it
/// forgets them all (their next open then has the kernel read them again).
const SHOWN_MAX: usize = 1 << 16;

impl Ops {
    /// Ends the mount, leaving nothing behind: file data is no longer read or
    /// written ([`OpError::Unmounting`]); each file still open (SIGTERM with files
    /// open, or a forced unmount) is committed as at its last close (its cached
    /// writes written back, its size and blocks named, blocks taken ahead given
    /// back), once writes to it under way have ended, up to 16 files at once, each
    /// for up to `max` and all for up to three times `max`; the cache is written
    /// back (up to `max`); unlocks still
    /// on their way to the nodes are waited for, each up to `max` (no lock is left
    /// to a lease); the session ends. Runs once: a second call waits for the first.
    pub async fn shut_down(&self, max: std::time::Duration) -> ShutDown {
        *self.shut.get_or_init(|| self.shut_down_once(max)).await
    }

    async fn shut_down_once(&self, max: std::time::Duration) -> ShutDown {
        self.unmounting.store(true, Ordering::SeqCst);
        let open: Vec<Ino> = lock(&self.open).keys().copied().collect();
        let committed = AtomicU64::new(0);
        let counted = &committed;
        let commits = stream::iter(open.iter().copied())
            .map(|ino| async move {
                let commit = async {
                    // Alone: writes that passed the check above before it was set
                    // end first, and their bytes go with this commit.
                    let _freeing = self.freeing(ino).await;
                    self.commit_as(ino, true, true, &mut Closing::Done).await
                };
                match tokio::time::timeout(max, commit).await {
                    Ok(Ok(())) => {
                        tracing::info!(ino, "open file committed");
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        tracing::error!(ino, error = %e, "committing an open file failed");
                    }
                    Err(_) => {
                        tracing::error!(ino, ?max, "committing an open file took too long");
                    }
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>();
        if tokio::time::timeout(max * 3, commits).await.is_err() {
            tracing::error!(?max, "committing the open files took too long");
        }
        let committed = usize::try_from(committed.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let uncommitted = open.len().saturating_sub(committed);
        if let (Some(cache), Ok(())) = (&self.cache, self.session.check()) {
            // In a task of its own, so the timeout does not cut a write-back short.
            let flush = tokio::spawn({
                let cache = cache.clone();
                async move { cache.flush().await }
            });
            match tokio::time::timeout(max, flush).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "writing cached blocks back failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "the write-back task ended"),
                Err(_) => tracing::warn!(?max, "writing cached blocks back took too long"),
            }
        }
        let unlocks_left = self.data.settle_unlocks(max).await;
        self.end_session().await;
        ShutDown {
            uncommitted,
            unlocks_left,
        }
    }
}

/// What [`Ops::shut_down`] left undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutDown {
    /// Open files whose commit failed: what they wrote since their last fsync or
    /// close may be lost.
    pub uncommitted: usize,
    /// Unlocks the nodes did not acknowledge: those locks go when their lease
    /// runs out.
    pub unlocks_left: usize,
}

/// Where a release's close of the session's open stands ([`Ops::release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// To be sent (with the last `Written`, or on its own).
    ToDo,
    /// Sent with a `Written`; no answer yet.
    Sent,
    /// Applied, or possibly applied: never sent again.
    Done,
}

/// The current time as the namespace stores it.
pub fn now() -> Time {
    time_of(SystemTime::now())
}

/// A system time as the namespace stores it.
pub fn time_of(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Time { secs, nanos }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

macro_rules! expect_reply {
    ($r:expr, $p:pat => $v:expr) => {
        match $r {
            $p => Ok($v),
            other => Err(OpError::Unexpected(format!("{other:?}"))),
        }
    };
}

impl Ops {
    /// The write-back's shared parts, if the mount has a cache.
    fn wb(&self) -> Option<WriteBack> {
        Some(WriteBack {
            open: self.open.clone(),
            cache: self.cache.clone()?,
            stats: self.cache_stats.clone(),
            seq: self.write_seq.clone(),
            keep_failures: self.cfg.op_timeout * 2,
        })
    }

    /// What the write-back cache did.
    pub fn cache_stats(&self) -> &CacheStats {
        &self.cache_stats
    }

    /// Notes what the kernel is given of a file's attributes (it keeps them for the
    /// attribute timeout).
    pub fn shown_to_kernel(&self, a: &Attr) {
        if a.kind == Kind::File {
            let mut shown = lock(&self.shown);
            if shown.len() >= SHOWN_MAX {
                shown.clear();
            }
            shown.insert(a.ino, (a.size, a.mtime));
        }
    }

    /// Whether the kernel may hold another size or mtime of file `a` than `a`'s,
    /// read within the attribute timeout before another mount changed the file:
    /// an open then has the kernel forget them (close-to-open), and this forgets
    /// what it was given.
    pub fn kernel_may_be_stale(&self, a: &Attr) -> bool {
        let mut shown = lock(&self.shown);
        let stale = shown.get(&a.ino) != Some(&(a.size, a.mtime));
        if stale {
            shown.remove(&a.ino);
        }
        stale
    }

    /// Commands this mount has sent to the metadata service (each a Raft commit).
    pub fn metadata_commands(&self) -> u64 {
        self.meta.proposals()
    }

    /// Time each operation took, by operation (filled by the adapter).
    pub fn latencies(&self) -> &drs_metrics::Latencies {
        &self.latencies
    }

    /// The mount's metrics as OpenMetrics text: its operations' latencies and what
    /// its storage client did (reads, degraded reads, reconstructions, writes, lock
    /// waits, repairs sent), and the files it has open.
    pub fn render_metrics(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.data.stats();
        let open = lock(&self.open).len();
        let mut m = drs_metrics::Snapshot::default();
        m.counter("client_reads", "Block reads.", s.reads.load(Relaxed))
            .counter(
                "client_degraded_reads",
                "Reads that asked the rest of the stripe.",
                s.degraded_reads.load(Relaxed),
            )
            .counter(
                "client_reconstructions",
                "Blocks decoded from other blocks.",
                s.reconstructions.load(Relaxed),
            )
            .counter("client_writes", "Block writes.", s.writes.load(Relaxed))
            .counter(
                "client_lock_waits",
                "Lock requests retried because another client held the block.",
                s.lock_retries.load(Relaxed),
            )
            .counter(
                "client_repairs",
                "Blocks found corrupt or stale and sent for repair.",
                s.repairs.load(Relaxed),
            )
            .counter(
                "fs_metadata_commands",
                "Commands sent to the metadata service (each a Raft commit).",
                self.meta.proposals(),
            )
            .counter(
                "fs_metadata_queries",
                "Queries sent to the metadata service (each a linearizable read).",
                self.meta.queries(),
            )
            .counter(
                "fs_cached_writes",
                "Writes of parts of blocks taken by the write-back cache.",
                self.cache_stats.writes.load(Relaxed),
            )
            .counter(
                "fs_write_backs",
                "Write-backs of cached blocks.",
                self.cache_stats.write_backs.load(Relaxed),
            )
            .counter(
                "fs_write_back_failures",
                "Write-backs of cached blocks that failed (reported by the next flush, fsync or close).",
                self.cache_stats.failed.load(Relaxed),
            )
            .gauge(
                "fs_open_files",
                "Files open in this mount.",
                i64::try_from(open).unwrap_or(i64::MAX),
            )
            .metric(
                "fs_op_seconds",
                "Time a file system operation took, by operation.",
                self.latencies.clone(),
            );
        m.encode()
    }

    /// A file system over `data`'s volume, its namespace in `meta`; formats the
    /// volume's file system (root owned by `uid`:`gid`) if it has none.
    pub async fn new(
        meta: MetaClient,
        data: Client,
        cfg: OpsConfig,
        uid: u32,
        gid: u32,
    ) -> OpResult<Arc<Ops>> {
        let block_size = data.block_size() as u64;
        // It never writes back on its own: this module decides when, file by file.
        let cache = cfg
            .write_cache
            .then(|| WriteBackCache::new(data.clone(), usize::MAX));
        let mut ops = Ops {
            meta,
            data,
            cfg,
            block_size,
            open: Arc::new(Mutex::new(HashMap::new())),
            cache,
            write_seq: Arc::new(AtomicU64::new(1)),
            cache_stats: Arc::default(),
            atime_updates: Arc::new(tokio::sync::Semaphore::new(ATIME_IN_FLIGHT)),
            latencies: drs_metrics::latencies(),
            session: Arc::new(session::MountSession::new(0)),
            locks: Arc::default(),
            acls: Mutex::default(),
            unlocked: Arc::default(),
            shown: Mutex::default(),
            unmounting: AtomicBool::new(false),
            shut: tokio::sync::OnceCell::new(),
        };
        let format = FsCommand::Format {
            blocks: ops.data.blocks(),
            block_size: ops.data.block_size() as u32,
            uid,
            gid,
            now: now(),
        };
        match ops.command(format).await {
            Ok(_) | Err(OpError::Fs(FsError::Exists)) => {}
            Err(e) => return Err(e),
        }
        let r = ops.command(FsCommand::OpenSession { now: now() }).await?;
        let id = expect_reply!(r, FsReply::Session(id) => id)?;
        ops.session = Arc::new(session::MountSession::new(id));
        if let Some(wb) = ops.wb() {
            let open = Arc::downgrade(&wb.open);
            let cache = wb.cache.clone();
            tokio::spawn(write_back_aged(open, cache, wb, ops.session.clone()));
        }
        match ops.query(FsQuery::StatFs).await? {
            FsReply::StatFs(s) if u64::from(s.block_size) == block_size => {
                let ops = Arc::new(ops);
                tokio::spawn(session::heartbeat(Arc::downgrade(&ops)));
                Ok(ops)
            }
            FsReply::StatFs(s) => Err(OpError::Unexpected(format!(
                "a file system of {}-byte blocks on a volume of {block_size}-byte blocks",
                s.block_size
            ))),
            other => Err(OpError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Bytes per data block (and file block).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn config(&self) -> &OpsConfig {
        &self.cfg
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = OpResult<T>>) -> OpResult<T> {
        tokio::time::timeout(self.cfg.op_timeout, f)
            .await
            .unwrap_or(Err(OpError::Timeout(self.cfg.op_timeout)))
    }

    async fn command(&self, cmd: FsCommand) -> OpResult<FsReply> {
        Ok(self.meta.fs(cmd).await??)
    }

    async fn query(&self, q: FsQuery) -> OpResult<FsReply> {
        Ok(self.meta.fs_query(q).await??)
    }

    /// `a` with this mount's uncommitted size and mtime.
    fn overlay(&self, mut a: Attr) -> Attr {
        if let Some(o) = lock(&self.open).get(&a.ino) {
            if let Some(t) = o.dirty {
                a.size = a.size.max(o.size);
                a.mtime = t;
                a.ctime = t;
            }
        }
        a
    }

    fn attr_reply(&self, r: FsReply) -> OpResult<Attr> {
        expect_reply!(r, FsReply::Attr(a) => self.overlay(a))
    }

    pub async fn lookup(&self, parent: Ino, name: &[u8]) -> OpResult<Attr> {
        self.bounded(async {
            let r = self
                .query(FsQuery::Lookup {
                    parent,
                    name: name.to_vec(),
                })
                .await?;
            self.attr_reply(r)
        })
        .await
    }

    /// The attributes of entries `(name, inode)` of directory `parent` (at most
    /// [`drs_meta::fs::ATTRS_MAX`]), in order; `None` for a name that no longer
    /// names that inode. One metadata query for all of them (`readdirplus`); the
    /// names of their extended attributes come with them, and reads of others
    /// are answered for [`ACL_TTL`] without asking. Replicas of a version before
    /// `GetAttrs` are asked one entry at a time.
    pub async fn attrs(
        &self,
        parent: Ino,
        entries: Vec<(Vec<u8>, Ino)>,
    ) -> OpResult<Vec<Option<Attr>>> {
        self.bounded(async {
            let changes = lock(&self.acls).changes;
            let read = Instant::now();
            let q = FsQuery::GetAttrs {
                parent,
                entries: entries.clone(),
            };
            let attrs = match self.query(q).await {
                Ok(r) => {
                    let got = expect_reply!(r, FsReply::Attrs(a) => a)?;
                    if got.len() != entries.len() {
                        return Err(OpError::Unexpected(format!(
                            "{} attributes for {} entries",
                            got.len(),
                            entries.len()
                        )));
                    }
                    let mut cache = lock(&self.acls);
                    // Names read across a change of this mount's are not kept.
                    if cache.changes == changes {
                        if cache.names.len() + got.len() > ACL_CACHE_MAX {
                            cache.names.clear();
                        }
                        for a in got.iter().flatten() {
                            if let Some(names) = &a.xattrs {
                                cache.names.insert(a.attr.ino, (read, names.clone()));
                            }
                        }
                    }
                    got.into_iter().map(|a| a.map(|a| a.attr)).collect()
                }
                Err(OpError::Meta(MetaError::BadRequest(_))) => {
                    let mut attrs = Vec::with_capacity(entries.len());
                    for (name, ino) in entries {
                        let q = match name.as_slice() {
                            b"." | b".." => FsQuery::GetAttr { ino },
                            _ => FsQuery::Lookup { parent, name },
                        };
                        attrs.push(match self.query(q).await {
                            Ok(r) => Some(expect_reply!(r, FsReply::Attr(a) => a)?)
                                .filter(|a| a.ino == ino),
                            Err(OpError::Fs(FsError::NotFound)) => None,
                            Err(e) => return Err(e),
                        });
                    }
                    attrs
                }
                Err(e) => return Err(e),
            };
            Ok(attrs
                .into_iter()
                .map(|a| a.map(|a| self.overlay(a)))
                .collect())
        })
        .await
    }

    pub async fn getattr(&self, ino: Ino) -> OpResult<Attr> {
        self.bounded(async { self.attr_reply(self.query(FsQuery::GetAttr { ino }).await?) })
            .await
    }

    /// Creates a node with the mode `perm` a process asked for and its `umask`
    /// (applied unless the directory has a default ACL); `target` is a symlink's.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: Ino,
        name: &[u8],
        kind: Kind,
        perm: u16,
        umask: u16,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: &[u8],
    ) -> OpResult<Attr> {
        let create = FsCommand::Create {
            parent,
            name: name.to_vec(),
            kind,
            perm,
            uid,
            gid,
            rdev,
            target: target.to_vec(),
            now: now(),
        };
        self.attr_command(FsCommand::Umask {
            umask,
            cmd: Box::new(create),
        })
        .await
    }

    pub async fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> OpResult<Attr> {
        self.attr_command(FsCommand::Link {
            ino,
            parent,
            name: name.to_vec(),
            now: now(),
        })
        .await
    }

    pub async fn unlink(&self, parent: Ino, name: &[u8], dir: bool) -> OpResult<()> {
        self.name_command(FsCommand::Unlink {
            parent,
            name: name.to_vec(),
            dir,
            now: now(),
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> OpResult<()> {
        self.name_command(FsCommand::Rename {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            noreplace,
            exchange,
            now: now(),
        })
        .await
    }

    /// A command that answers an inode's attributes (Create, Link), bounded.
    async fn attr_command(&self, cmd: FsCommand) -> OpResult<Attr> {
        self.bounded(async { self.attr_reply(self.command(cmd).await?) })
            .await
    }

    /// A command that removes a name (Unlink, Rename), bounded, sent with the
    /// `Drop` of the inode it leaves without names (`UnlinkDrop`): the metadata
    /// service frees it at once, or at the last close of a mount that has it open.
    async fn name_command(&self, cmd: FsCommand) -> OpResult<()> {
        self.bounded(async {
            let cmd = FsCommand::UnlinkDrop { cmd: Box::new(cmd) };
            let r = self.command(cmd).await?;
            expect_reply!(r, FsReply::Orphaned(_) => ())
        })
        .await
    }

    pub async fn setattr(&self, ino: Ino, mut set: SetAttr) -> OpResult<Attr> {
        self.bounded(async {
            let _gate = self.session.gate().await;
            // A size change registers an open of its own (and keeps the file's
            // entry, whose lock refreshes take) while its tail is zeroed, so no
            // block of the map that takes is given away meanwhile, even if the
            // file's last close here comes in between.
            let _registered = match set.size {
                Some(_) => Some(self.register_while(ino).await?),
                None => None,
            };
            let _freeing = match set.size {
                Some(_) => self.freeing(ino).await,
                None => None,
            };
            self.set_size_and_attr(ino, &mut set).await
        })
        .await
    }

    /// The body of [`Ops::setattr`] (the caller holds the file's freeing lock alone
    /// for a size change).
    async fn set_size_and_attr(&self, ino: Ino, set: &mut SetAttr) -> OpResult<Attr> {
        if let Some(size) = set.size {
            // Uncommitted writes past the new size are cut with the rest.
            self.commit_as(ino, false, true, &mut Closing::Done).await?;
            self.zero_tail(ino, size).await?;
            if let Some(o) = lock(&self.open).get_mut(&ino) {
                o.size = size;
                o.forget_blocks(size.div_ceil(self.block_size), u64::MAX);
            }
        }
        if set.mtime.is_none() && set.size.is_some() {
            set.mtime = Some(now());
        }
        // A chmod changes the access ACL.
        let chmod = set.perm.is_some();
        self.acl_changing(chmod, ino);
        let cmd = FsCommand::SetAttr {
            ino,
            set: set.clone(),
            now: now(),
        };
        // Only a size change frees blocks.
        let cmd = if set.size.is_some() {
            self.mine(cmd)
        } else {
            cmd
        };
        let r = self.command(cmd).await;
        self.acl_changing(chmod, ino);
        self.attr_reply(r?)
    }

    /// Zeroes the bytes from `size` to the end of its block, if that block is mapped,
    /// so that bytes past the end of file stay zero.
    async fn zero_tail(&self, ino: Ino, size: u64) -> OpResult<()> {
        let within = size % self.block_size;
        if within == 0 {
            return Ok(());
        }
        self.zero_within(ino, size / self.block_size, within, self.block_size)
            .await
    }

    /// Zeroes bytes `from .. to` of file block `block`, if it holds data (a hole or
    /// an unwritten block reads as zeros already).
    async fn zero_within(&self, ino: Ino, block: u64, from: u64, to: u64) -> OpResult<()> {
        if from >= to {
            return Ok(());
        }
        self.usable(ino)?;
        let maps = self.mappings(ino, block, 1).await?;
        if let Some((lba, false)) = maps.get(&block) {
            let zeros = vec![0u8; (to - from) as usize];
            self.data.write(*lba, from as usize, &zeros).await?;
        }
        Ok(())
    }

    pub async fn readlink(&self, ino: Ino) -> OpResult<Vec<u8>> {
        self.bounded(async {
            let r = self.query(FsQuery::ReadLink { ino }).await?;
            expect_reply!(r, FsReply::Target(t) => t)
        })
        .await
    }

    /// Sets an extended attribute (`create`: only if not set; `replace`: only if set).
    pub async fn setxattr(
        &self,
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        create: bool,
        replace: bool,
    ) -> OpResult<()> {
        self.setxattr_as(ino, name, value, create, replace, None)
            .await
    }

    /// [`Ops::setxattr`] by a requester whose credentials are `caller`: an access
    /// ACL it sets drops the file's set-gid bit unless it is a member of the
    /// file's group or has CAP_FSETID (as the kernel does for a local file).
    pub async fn setxattr_as(
        &self,
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        create: bool,
        replace: bool,
        caller: Option<&Creds>,
    ) -> OpResult<()> {
        // Before and after: an absence read while the set is under way is neither
        // remembered nor left remembered.
        let forget_absence = || {
            if let Some(o) = lock(&self.open).get_mut(&ino) {
                o.no_capability = false;
                o.xattr_sets += 1;
            }
        };
        forget_absence();
        let acl = drs_meta::acl::is_acl(&name);
        let access = name == drs_meta::acl::ACCESS;
        let mut cmd = FsCommand::SetXattr {
            ino,
            name,
            value,
            create,
            replace,
            now: now(),
        };
        if let Some(c) = caller.filter(|_| access) {
            // The group the file has now: one changed before the command is
            // applied counts as one the caller is not a member of.
            let gid = self.getattr(ino).await?.gid;
            cmd = FsCommand::AclAs {
                fsetid: c.fsetid,
                member_of: c.member_of(gid).then_some(gid),
                cmd: Box::new(cmd),
            };
        }
        self.acl_changing(acl, ino);
        let r = self.attr_command(cmd).await.map(drop);
        self.acl_changing(acl, ino);
        forget_absence();
        r
    }

    /// Before and after this mount changes an ACL (`acl`) or a mode: answers read
    /// meanwhile are not kept. The names of the file's extended attributes go
    /// with any change of one of them (`acl` or not).
    fn acl_changing(&self, acl: bool, ino: Ino) {
        let mut cache = lock(&self.acls);
        if acl {
            cache.changed(ino);
        } else {
            cache.changes += 1;
            cache.names.remove(&ino);
        }
    }

    /// Removes an extended attribute.
    pub async fn removexattr(&self, ino: Ino, name: Vec<u8>) -> OpResult<()> {
        let acl = drs_meta::acl::is_acl(&name);
        let cmd = FsCommand::RemoveXattr {
            ino,
            name,
            now: now(),
        };
        self.acl_changing(acl, ino);
        let r = self.attr_command(cmd).await.map(drop);
        self.acl_changing(acl, ino);
        r
    }

    /// An extended attribute's value. The kernel asks for `security.capability`
    /// before every write (to remove it): while a file is open, its absence is
    /// remembered (close-to-open, as for data), so a write costs no metadata round
    /// trip for it.
    pub async fn getxattr(&self, ino: Ino, name: Vec<u8>) -> OpResult<Vec<u8>> {
        if drs_meta::acl::is_acl(&name) {
            return self.get_acl(ino, name).await;
        }
        let capability = name == CAPABILITY;
        if capability && lock(&self.open).get(&ino).is_some_and(|o| o.no_capability) {
            return Err(FsError::NoXattr.into());
        }
        if drs_meta::fs::check_xattr_name(&name).is_ok() && lock(&self.acls).absent(ino, &name) {
            return Err(FsError::NoXattr.into());
        }
        let sets = lock(&self.open).get(&ino).map(|o| o.xattr_sets);
        self.bounded(async {
            let r = self.query(FsQuery::GetXattr { ino, name }).await;
            if capability && matches!(r, Err(OpError::Fs(FsError::NoXattr))) {
                if let Some(o) = lock(&self.open).get_mut(&ino) {
                    o.no_capability = Some(o.xattr_sets) == sets;
                }
            }
            expect_reply!(r?, FsReply::Bytes(b) => b)
        })
        .await
    }

    /// An ACL, from [`AclCache`] if it was read within [`ACL_TTL`].
    async fn get_acl(&self, ino: Ino, name: Vec<u8>) -> OpResult<Vec<u8>> {
        let changes = {
            let cache = lock(&self.acls);
            if let Some(v) = cache.get(ino, &name) {
                return v.ok_or(OpError::Fs(FsError::NoXattr));
            }
            if cache.absent(ino, &name) {
                return Err(OpError::Fs(FsError::NoXattr));
            }
            cache.changes
        };
        let read = Instant::now();
        let r = self
            .bounded(async {
                let r = self
                    .query(FsQuery::GetXattr {
                        ino,
                        name: name.clone(),
                    })
                    .await;
                match r {
                    Err(OpError::Fs(FsError::NoXattr)) => Ok(None),
                    r => expect_reply!(r?, FsReply::Bytes(b) => Some(b)),
                }
            })
            .await?;
        let mut cache = lock(&self.acls);
        if cache.changes == changes {
            if cache.answers.len() >= ACL_CACHE_MAX {
                cache.answers.clear();
            }
            cache.answers.insert((ino, name), (read, r.clone()));
        }
        r.ok_or(OpError::Fs(FsError::NoXattr))
    }

    /// The names of an inode's extended attributes, each ending in a zero byte.
    pub async fn listxattr(&self, ino: Ino) -> OpResult<Vec<u8>> {
        self.bounded(async {
            let r = self.query(FsQuery::ListXattr { ino }).await?;
            expect_reply!(r, FsReply::Bytes(b) => b)
        })
        .await
    }

    /// Every entry of a directory, in name order.
    /// A directory's entries (all of them: the adapter serves an open directory
    /// from this listing). Listing updates the directory's atime by relatime's rule,
    /// in the background.
    pub async fn readdir(&self, ino: Ino) -> OpResult<Vec<DirEntry>> {
        self.bounded(async {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let r = self.query(FsQuery::ReadDir { ino, after }).await?;
                let page = expect_reply!(r, FsReply::Entries(e) => e)?;
                let Some(last) = page.last() else {
                    if self.cfg.atime {
                        self.touch_atime(ino, true);
                    }
                    return Ok(all);
                };
                after = Some(last.name.clone());
                all.extend(page);
            }
        })
        .await
    }

    pub async fn statfs(&self) -> OpResult<FsStats> {
        self.bounded(async {
            let r = self.query(FsQuery::StatFs).await?;
            expect_reply!(r, FsReply::StatFs(s) => s)
        })
        .await
    }

    /// Opens an inode: re-reads its attributes and forgets its cached block map, so
    /// this mount sees what other mounts closed before (close-to-open).
    pub async fn open(&self, ino: Ino) -> OpResult<Attr> {
        self.bounded(async {
            let a = self
                .register_open(ino, |a| {
                    let mut open = lock(&self.open);
                    let o = open.entry(ino).or_default();
                    o.handles += 1;
                    o.atime_due = self.cfg.atime && drs_meta::fs::atime_due(a, now());
                    o.forget_view(a);
                })
                .await?;
            Ok(self.overlay(a))
        })
        .await
    }

    /// Creates a regular file and opens it (create(2)), registering the open with
    /// the session in the same command (`CreateOpen`).
    pub async fn create_open(
        &self,
        parent: Ino,
        name: &[u8],
        perm: u16,
        umask: u16,
        uid: u32,
        gid: u32,
    ) -> OpResult<Attr> {
        let create = FsCommand::Create {
            parent,
            name: name.to_vec(),
            kind: Kind::File,
            perm,
            uid,
            gid,
            rdev: 0,
            target: Vec::new(),
            now: now(),
        };
        let create = FsCommand::Umask {
            umask,
            cmd: Box::new(create),
        };
        let made = self.register_create(create, |a| {
            let mut open = lock(&self.open);
            let o = open.entry(a.ino).or_default();
            o.handles += 1;
            if o.dirty.is_none() {
                o.size = a.size;
            }
            // A new inode has no `security.capability` (only inherited ACLs): the
            // kernel's ask before the first write is answered here, as after a
            // getxattr found none since the open.
            o.no_capability = true;
        });
        self.bounded(made).await
    }

    /// Tells the metadata service the size and mtime of this mount's writes, and
    /// which unwritten blocks it wrote; with `trim` (the last close), gives back the
    /// blocks taken ahead and not used.
    ///
    /// Data before size: the file's cached blocks are written back first, and a
    /// block still in the cache (written meanwhile) is not named. A write-back that
    /// failed, now or in the background, fails the commit (EIO) after the rest of it
    /// was sent.
    pub async fn commit(&self, ino: Ino, trim: bool) -> OpResult<()> {
        self.commit_as(ino, trim, false, &mut Closing::Done).await
    }

    /// [`Ops::commit`]; `held`: the caller holds the file's freeing lock alone. A
    /// `Written` refused for a stale block map is sent again after a refresh. With
    /// `close` at [`Closing::ToDo`], the session's close of the file goes with the
    /// last `Written` (`WrittenClose`), if one is sent; `close` says how that went.
    async fn commit_as(
        &self,
        ino: Ino,
        trim: bool,
        held: bool,
        close: &mut Closing,
    ) -> OpResult<()> {
        let mut tries = 0;
        loop {
            let r = {
                // Shared with reads and writes: no refresh of the file's map comes
                // between the blocks this commit names and its `Written`.
                let _using = if held { None } else { self.using(ino).await };
                self.commit_once(ino, trim, close).await
            };
            match r {
                Err(OpError::Fs(FsError::StaleMap)) if tries < 3 => {
                    tries += 1;
                    self.refresh_file(ino, None, held).await?;
                }
                r => return r,
            }
        }
    }

    async fn commit_once(&self, ino: Ino, trim: bool, close: &mut Closing) -> OpResult<()> {
        let holds_cached = lock(&self.open)
            .get(&ino)
            .is_some_and(|o| !o.cached.is_empty() || !o.settled.is_empty());
        if holds_cached {
            // What it would write back or name comes from maps that may not hold.
            if let Err(e) = self.session.check() {
                if trim {
                    // The last close: nothing would write these back any more.
                    self.discard_cached(ino).await;
                }
                return Err(e);
            }
        }
        // Held until the `Written` is sent.
        let (written_back, _serial) = self.write_back_now(ino, |_| true).await;
        let failed = lock(&self.open)
            .get_mut(&ino)
            .and_then(|o| o.write_error.take())
            .map(OpError::WriteBack)
            .or(written_back.err());
        let pending = lock(&self.open).get(&ino).and_then(|o| {
            let trim = trim && o.took_ahead && !o.preallocated;
            if o.dirty.is_none() && o.settled.is_empty() && !trim {
                return None;
            }
            let t = o.dirty.or(o.last_write).unwrap_or_else(now);
            let settled: Vec<u64> = o
                .settled
                .iter()
                .filter(|b| o.blocks.get(b).is_none_or(|l| !o.cached.contains_key(l)))
                .copied()
                .collect();
            Some((o.size, t, settled, trim))
        });
        let Some((size, t, settled, trim)) = pending else {
            return failed.map_or(Ok(()), Err);
        };
        let mut ranges: Vec<BlockRange> = Vec::new();
        for b in &settled {
            match ranges.last_mut() {
                Some(r) if r.first + r.count == *b => r.count += 1,
                _ => ranges.push(BlockRange {
                    first: *b,
                    count: 1,
                }),
            }
        }
        let mut chunks: Vec<Vec<BlockRange>> = ranges
            .chunks(MAP_MAX as usize)
            .map(|c| c.to_vec())
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let last = chunks.len() - 1;
        tracing::debug!(ino, size, ?ranges, trim, "commit");
        for (n, written) in chunks.into_iter().enumerate() {
            let written = FsCommand::Written {
                ino,
                size,
                now: t,
                written,
                trim: trim && n == last,
            };
            // Blocks another mount of the file took and wrote past the end stay.
            let cmd = if trim && n == last {
                FsCommand::TrimAlone {
                    cmd: Box::new(written),
                }
            } else {
                written
            };
            let closing = *close == Closing::ToDo && n == last;
            let sent = if closing {
                *close = Closing::Sent;
                let sent = self
                    .command(FsCommand::WrittenClose {
                        session: self.session_id(),
                        ino,
                        cmd: Box::new(cmd.clone()),
                    })
                    .await;
                *close = match &sent {
                    Ok(_) => Closing::Done,
                    // Refused whole (`StaleMap`, `NoSession`, ...): nothing closed.
                    Err(OpError::Fs(_)) => Closing::ToDo,
                    // Unknown outcome: it may have been applied. A close missing
                    // only holds freeings until the session ends; a second one
                    // could close another handle's registration.
                    Err(_) => Closing::Done,
                };
                match sent {
                    // This mount's count and the session's differ: the `Written` on
                    // its own, and the close on its own after it (refused if no open
                    // is registered).
                    Err(OpError::Fs(FsError::Invalid)) => self.command(self.mine(cmd)).await,
                    other => other,
                }
            } else {
                self.command(self.mine(cmd)).await
            };
            if let Err(e) = sent {
                // The failed write-back is still to be reported (after a retry).
                if let (Some(OpError::WriteBack(m)), Some(o)) =
                    (&failed, lock(&self.open).get_mut(&ino))
                {
                    o.write_error.get_or_insert_with(|| m.clone());
                }
                return Err(e);
            }
        }
        if let Some(o) = lock(&self.open).get_mut(&ino) {
            if o.dirty == Some(t) {
                o.dirty = None;
            }
            for b in &settled {
                o.settled.remove(b);
            }
            if trim {
                o.took_ahead = false;
                // What was given back is no longer this file's.
                o.forget_blocks(size.div_ceil(self.block_size), u64::MAX);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Writes back file `ino`'s cached blocks that `due` accepts under the file's
    /// [`Open::write_back`] lock, in a task of its own: a caller cut short by its
    /// timeout does not cut the write-back short (that would lose the blocks' locks,
    /// and what was written back), nor let another start meanwhile. Returns the
    /// lock, for the caller to hold on.
    async fn write_back_now(
        &self,
        ino: Ino,
        due: fn(Instant) -> bool,
    ) -> (OpResult<()>, Option<tokio::sync::OwnedMutexGuard<()>>) {
        let serial = lock(&self.open).get(&ino).map(|o| o.write_back.clone());
        let wb = self.wb();
        let task = tokio::spawn(async move {
            let guard = match serial {
                Some(l) => Some(l.lock_owned().await),
                None => None,
            };
            let r = match wb {
                Some(wb) => write_back_due(&wb, ino, due).await,
                None => Ok(()),
            };
            (r, guard)
        });
        match task.await {
            Ok((r, guard)) => (r.map_err(|e| OpError::WriteBack(e.to_string())), guard),
            Err(e) => (
                Err(OpError::WriteBack(format!(
                    "the write-back task ended: {e}"
                ))),
                None,
            ),
        }
    }

    /// `flush` (each close of a descriptor) and `fsync`: write the file's cached
    /// blocks back, then commit the size and the blocks written. Blocks taken ahead are
    /// kept: a flush is not the last close (a forked child closing an inherited
    /// descriptor sends one too) and writes may still be in flight; `release` gives
    /// them back.
    pub async fn flush(&self, ino: Ino) -> OpResult<()> {
        self.bounded(self.commit(ino, false)).await
    }

    /// `fsync`: as `flush`.
    pub async fn fsync(&self, ino: Ino) -> OpResult<()> {
        self.flush(ino).await
    }

    /// The last handle of this open closes: commit, and drop the inode if it lost its
    /// last name meanwhile.
    pub async fn release(&self, ino: Ino) -> OpResult<()> {
        // The close goes with the last `Written`, if there is one.
        let mut close = Closing::ToDo;
        let mut dropped = false;
        let r = self
            .bounded(async {
                // The close is registered together with the mount's own count.
                let _gate = self.session.gate().await;
                let freeing = self.freeing(ino).await;
                let last = lock(&self.open).get(&ino).is_some_and(|o| o.handles <= 1);
                let res = self.commit_as(ino, last, true, &mut close).await;
                // Under the file's freeing lock, which an `open` of the file in this
                // mount waits for: the session's count and this mount's change
                // together.
                self.drop_handle(ino);
                dropped = true;
                drop(freeing);
                // The metadata service drops an orphan at its last close.
                if close == Closing::ToDo {
                    self.register_close(ino).await;
                }
                res
            })
            .await;
        if !dropped && close != Closing::ToDo {
            // Cut short once the close may have been applied: this mount's count
            // follows it (a map kept without a registered open is never protected).
            self.drop_handle(ino);
        }
        r
    }

    /// One handle of `ino` fewer in this mount; the entry goes with the last.
    fn drop_handle(&self, ino: Ino) {
        let mut open = lock(&self.open);
        if let Some(o) = open.get_mut(&ino) {
            o.handles = o.handles.saturating_sub(1);
            if o.handles == 0 && o.temps == 0 {
                open.remove(&ino);
            }
        }
    }

    /// Takes what the metadata service said of file blocks `first .. end` (all of
    /// them: those not in `maps` are holes) into the open file's map. Callers hold
    /// the file's [`Open::freeing`] lock, so no block of the answer was freed since.
    fn learn(&self, ino: Ino, first: u64, end: u64, maps: &[Mapping]) {
        if let Some(o) = lock(&self.open).get_mut(&ino) {
            for m in maps {
                if o.blocks.insert(m.block, m.lba).is_some_and(|l| l != m.lba) {
                    // Freed by another mount and handed out again: what this mount
                    // wrote to the old data block went with it (the refresh drops
                    // its cached writes there).
                    o.settled.remove(&m.block);
                }
                // A block this mount wrote and has not named yet is not fresh to it.
                if m.fresh && !o.settled.contains(&m.block) {
                    o.fresh.insert(m.block);
                } else {
                    o.fresh.remove(&m.block);
                }
            }
            o.window = if first >= o.window.0 && first <= o.window.1 {
                (o.window.0, end.max(o.window.1))
            } else {
                (first, end)
            };
        }
    }

    /// Sends `Accessed` for `ino` in the background (the state machine applies
    /// relatime's rule); with `check`, only if its attributes say it is due (a
    /// listing: no proposal per `ls`). At most [`ATIME_IN_FLIGHT`] at once; past
    /// that an update is skipped (best effort, as atime is).
    fn touch_atime(&self, ino: Ino, check: bool) {
        let Ok(permit) = self.atime_updates.clone().try_acquire_owned() else {
            return;
        };
        let meta = self.meta.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let now = now();
            if check {
                match meta.fs_query(FsQuery::GetAttr { ino }).await {
                    Ok(Ok(FsReply::Attr(a))) if drs_meta::fs::atime_due(&a, now) => {}
                    _ => return,
                }
            }
            if let Err(e) = meta.fs(FsCommand::Accessed { ino, now }).await {
                tracing::debug!(ino, error = %e, "updating the atime failed");
            }
        });
    }

    /// Whether file data of `ino` may be read and written: the mount is not ending
    /// (see [`Ops::shut_down`]), its session is alive (see [`SESSION_GUARD`]) and
    /// the file was not lost.
    fn usable(&self, ino: Ino) -> OpResult<()> {
        if self.unmounting.load(Ordering::SeqCst) {
            return Err(OpError::Unmounting);
        }
        self.session.check()?;
        if lock(&self.open).get(&ino).is_some_and(|o| o.lost) {
            return Err(OpError::Lost);
        }
        Ok(())
    }

    /// The file's [`Open::freeing`] lock, if this mount has it open.
    fn freeing_lock(&self, ino: Ino) -> Option<Arc<tokio::sync::RwLock<()>>> {
        lock(&self.open).get(&ino).map(|o| o.freeing.clone())
    }

    /// Holds the file's freeing lock shared (reads and writes) until dropped.
    async fn using(&self, ino: Ino) -> Option<tokio::sync::OwnedRwLockReadGuard<()>> {
        Some(self.freeing_lock(ino)?.read_owned().await)
    }

    /// Holds the file's freeing lock alone (what frees blocks) until dropped.
    async fn freeing(&self, ino: Ino) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        Some(self.freeing_lock(ino)?.write_owned().await)
    }

    /// The data blocks of file blocks `first .. first + count` that have one, with
    /// whether each is unwritten, from the open file's map or the metadata service.
    async fn mappings(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> OpResult<BTreeMap<u64, (u64, bool)>> {
        let end = first.saturating_add(count);
        let cached = |o: &Open| -> BTreeMap<u64, (u64, bool)> {
            o.blocks
                .range(first..end)
                .map(|(b, l)| (*b, (*l, o.fresh.contains(b))))
                .collect()
        };
        let known = lock(&self.open).get(&ino).and_then(|o| {
            let got = cached(o);
            let in_window = first >= o.window.0 && end <= o.window.1;
            (in_window || got.len() as u64 == count).then_some(got)
        });
        if let Some(k) = known {
            return Ok(k);
        }
        // Fetch ahead: sequential reads then find the next blocks known.
        let fetch_end = end.max(first.saturating_add(MAP_MAX));
        let mut out = BTreeMap::new();
        let mut at = first;
        while at < fetch_end {
            let n = (fetch_end - at).min(MAP_MAX);
            let r = self
                .query(FsQuery::Extents {
                    ino,
                    first: at,
                    count: n,
                })
                .await?;
            let maps = expect_reply!(r, FsReply::Mapped(m) => m)?;
            self.learn(ino, at, at + n, &maps);
            for m in maps {
                out.insert(m.block, (m.lba, m.fresh));
            }
            at += n;
        }
        // The open file's view (its own unnamed writes are not fresh).
        let view = lock(&self.open).get(&ino).map(cached);
        Ok(view.unwrap_or_else(|| out.range(first..end).map(|(b, v)| (*b, *v)).collect()))
    }

    /// Data blocks for every file block of `first .. first + count`, handing out
    /// blocks where needed (and, for a writer at the end of the file, [`AHEAD`]
    /// blocks more); unwritten ones are marked fresh.
    async fn map_for_write(&self, ino: Ino, first: u64, count: u64) -> OpResult<Vec<Mapping>> {
        self.map_blocks(ino, first, count, true).await
    }

    /// As [`Ops::map_for_write`]; blocks ahead only with `may_take_ahead`.
    async fn map_blocks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
        may_take_ahead: bool,
    ) -> OpResult<Vec<Mapping>> {
        let end = first + count;
        let (known, appending) = lock(&self.open)
            .get(&ino)
            .map(|o| {
                let known: Vec<Mapping> = o
                    .blocks
                    .range(first..end)
                    .map(|(b, l)| Mapping {
                        block: *b,
                        lba: *l,
                        fresh: o.fresh.contains(b),
                    })
                    .collect();
                (known, may_take_ahead && first * self.block_size >= o.size)
            })
            .unwrap_or_default();
        if known.len() as u64 == count {
            return Ok(known);
        }
        let mut out = Vec::with_capacity(count.min(MAP_MAX) as usize);
        let mut at = first;
        while at < end {
            let n = (end - at).min(MAP_MAX);
            // Ahead in proportion to the write: a large sequential write takes
            // [`AHEAD`] blocks, a small file a few.
            let mut ahead = if appending && at + n == end {
                (n * 16).min(AHEAD).min(MAP_MAX - n)
            } else {
                0
            };
            if ahead > 0 {
                // Before it is sent: a first try applied with its answer lost still
                // took blocks ahead, which the last close must give back (a trim
                // frees only unwritten blocks past the end, so it is harmless if
                // none were taken).
                if let Some(o) = lock(&self.open).get_mut(&ino) {
                    o.took_ahead = true;
                }
            }
            let r = loop {
                let r = self
                    .command(FsCommand::Map {
                        ino,
                        first: at,
                        count: n,
                        ahead,
                    })
                    .await;
                match r {
                    // No room for the blocks ahead (a nearly full volume or
                    // namespace): the write's own may still fit.
                    Err(OpError::Fs(FsError::NoSpace)) if ahead > 0 => ahead = 0,
                    r => break r?,
                }
            };
            let maps = expect_reply!(r, FsReply::Mapped(m) => m)?;
            tracing::debug!(
                ino,
                at,
                n,
                ahead,
                mapped = maps.len(),
                fresh = maps.iter().filter(|m| m.fresh).count(),
                "map"
            );
            self.learn(ino, at, at + n + ahead, &maps);
            out.extend(maps.into_iter().filter(|m| m.block < end));
            at += n;
        }
        // The open file's view (its own unnamed writes are not fresh).
        if let Some(o) = lock(&self.open).get(&ino) {
            for m in &mut out {
                m.fresh = o.fresh.contains(&m.block);
            }
        }
        Ok(out)
    }

    /// A file's size: as this mount knows it if the file is open here, else from
    /// the metadata service.
    async fn size_of(&self, ino: Ino) -> OpResult<u64> {
        let known = lock(&self.open).get(&ino).map(|o| o.size);
        match known {
            Some(s) => Ok(s),
            None => {
                let r = self.query(FsQuery::GetAttr { ino }).await?;
                expect_reply!(r, FsReply::Attr(a) => a.size)
            }
        }
    }

    /// `lseek` with `SEEK_DATA` (`data`) or `SEEK_HOLE`: the first offset at or after
    /// `offset` in data (a block written) or in a hole (a block never written,
    /// punched, or reserved and unwritten, as ext4 counts its unwritten extents);
    /// the end of the file counts as a hole. [`OpError::NoData`] (ENXIO) at or past the end, and
    /// for data past the last. At most [`SEEK_SCAN`] block maps are asked for; past
    /// them the answer is the one that is never wrong: data where the scan stopped,
    /// or the end of the file for a hole.
    pub async fn seek(&self, ino: Ino, offset: u64, data: bool) -> OpResult<u64> {
        self.bounded(async {
            let _using = self.using(ino).await;
            self.usable(ino)?;
            let size = self.size_of(ino).await?;
            if offset >= size {
                return Err(OpError::NoData);
            }
            let bs = self.block_size;
            let (mut at, last) = (offset / bs, (size - 1) / bs);
            for _ in 0..SEEK_SCAN {
                if at > last {
                    break;
                }
                let n = (last - at + 1).min(MAP_MAX);
                let maps = self.mappings(ino, at, n).await?;
                let written = |b: &u64| maps.get(b).is_some_and(|(_, fresh)| !fresh);
                if let Some(b) = (at..at + n).find(|b| written(b) == data) {
                    return Ok((b * bs).max(offset));
                }
                at += n;
            }
            match (data, at > last) {
                (true, true) => Err(OpError::NoData),
                (true, false) => Ok(at * bs),
                (false, _) => Ok(size),
            }
        })
        .await
    }

    /// `copy_file_range`: copies up to `len` bytes, at most [`COPY_MAX`] a call (the
    /// caller asks again for the rest), from `from` at `from_at` to `to` at `to_at`,
    /// inside the mount: the bytes do not cross into the kernel and back. The bytes
    /// copied; 0 at the source's end. (The kernel refuses overlapping ranges of one
    /// file and an `O_APPEND` destination before it asks.)
    pub async fn copy_range(
        &self,
        (from, from_at): (Ino, u64),
        (to, to_at): (Ino, u64),
        len: u64,
    ) -> OpResult<usize> {
        let want = usize::try_from(len.min(COPY_MAX)).unwrap_or(0);
        let data = self.read(from, from_at, want).await?;
        if data.is_empty() {
            return Ok(0);
        }
        self.write(to, to_at, &data).await
    }

    /// Reads up to `len` bytes at `offset` (short at the end of file). The first read
    /// after an open whose atime is due (relatime) updates it, in the background.
    pub async fn read(&self, ino: Ino, offset: u64, len: usize) -> OpResult<Vec<u8>> {
        let touch = lock(&self.open)
            .get_mut(&ino)
            .is_some_and(|o| std::mem::take(&mut o.atime_due));
        if touch {
            self.touch_atime(ino, false);
        }
        self.bounded(async {
            let _using = self.using(ino).await;
            self.usable(ino)?;
            let size = self.size_of(ino).await?;
            if offset >= size || len == 0 {
                return Ok(Vec::new());
            }
            let end = size.min(offset + len as u64);
            let bs = self.block_size;
            let first = offset / bs;
            let last = (end - 1) / bs;
            let maps = self.mappings(ino, first, last - first + 1).await?;
            let mut out = vec![0u8; (end - offset) as usize];
            let pieces: Vec<(usize, u64, usize, usize)> = (first..=last)
                .filter_map(|b| {
                    let (lba, fresh) = *maps.get(&b)?;
                    if fresh {
                        // Unwritten: zeros, as `out` already holds.
                        return None;
                    }
                    let from = (b * bs).max(offset);
                    let to = ((b + 1) * bs).min(end);
                    Some((
                        (from - offset) as usize,
                        lba,
                        (from - b * bs) as usize,
                        (to - from) as usize,
                    ))
                })
                .collect();
            // This mount's writes still in the cache are read from it.
            let in_cache: BTreeSet<u64> = lock(&self.open)
                .get(&ino)
                .map(|o| o.cached.keys().copied().collect())
                .unwrap_or_default();
            // Whole blocks at consecutive addresses are read with one call.
            let mut runs: Vec<(usize, u64, usize, usize, u64, bool)> = Vec::new();
            for (at, lba, within, n) in pieces {
                let cached = self.cache.is_some() && in_cache.contains(&lba);
                let whole = within == 0 && n as u64 == bs && !cached;
                match runs.last_mut() {
                    Some(r)
                        if whole
                            && !r.5
                            && r.2 == 0
                            && r.3 as u64 == bs
                            && r.1 + r.4 == lba
                            && r.0 + r.4 as usize * bs as usize == at =>
                    {
                        r.4 += 1
                    }
                    _ => runs.push((at, lba, within, n, 1, cached)),
                }
            }
            let reads: Vec<OpResult<(usize, Vec<Bytes>)>> = stream::iter(runs)
                .map(|(at, lba, within, n, count, cached)| async move {
                    let data = if let Some(cache) = self.cache.as_ref().filter(|_| cached) {
                        vec![cache.read(lba, within, n).await?]
                    } else if count > 1 {
                        self.data.read_blocks(lba, count).await?
                    } else {
                        vec![self.data.read(lba, within, n).await?]
                    };
                    Ok((at, data))
                })
                .buffer_unordered(self.cfg.parallel.max(1))
                .collect()
                .await;
            for r in reads {
                let (mut at, blocks) = r?;
                for data in blocks {
                    let n = data.len().min(out.len().saturating_sub(at));
                    out[at..at + n].copy_from_slice(&data[..n]);
                    at += n;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Writes `data` at the end of the file, one append at a time per file
    /// (`O_APPEND`): the end after this mount's uncommitted writes, or else the
    /// size the metadata service has now. Returns the bytes written and where. So
    /// appends of mounts taking turns all land; two mounts appending at once
    /// between their commits may overwrite each other's (as on NFS). `offset` (the
    /// kernel's) is used if the file is not open here.
    pub async fn append(&self, ino: Ino, offset: u64, data: &[u8]) -> OpResult<(usize, u64)> {
        let serial = lock(&self.open).get(&ino).map(|o| o.appends.clone());
        let Some(serial) = serial else {
            return Ok((self.write(ino, offset, data).await?, offset));
        };
        let _one = serial.lock().await;
        let ours = lock(&self.open)
            .get(&ino)
            .filter(|o| !o.unchanged())
            .map(|o| o.size);
        let end = match ours {
            Some(end) => end,
            None => {
                let end = self.getattr(ino).await?.size;
                // Another mount's truncate lowers it, and freed the blocks past
                // it: the map is read again.
                if let Some(o) = lock(&self.open).get_mut(&ino).filter(|o| o.unchanged()) {
                    if o.size != end {
                        o.size = end;
                        o.forget_map();
                    }
                }
                end
            }
        };
        Ok((self.write(ino, end, data).await?, end))
    }

    /// Writes `data` at `offset`: whole blocks are on the storage nodes on return,
    /// parts of blocks in the write-back cache (see the module documentation), or
    /// on the nodes too with `write_cache` off.
    pub async fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> OpResult<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        self.bounded(async {
            // Shared with the cache write task, which may outlive a timed-out write:
            // nothing frees the file's blocks under it.
            let using = Arc::new(self.using(ino).await);
            self.usable(ino)?;
            let bs = self.block_size;
            let end = offset
                .checked_add(data.len() as u64)
                .ok_or(OpError::Fs(FsError::TooLarge))?;
            let first = offset / bs;
            let last = (end - 1) / bs;
            let maps = self.map_for_write(ino, first, last - first + 1).await?;
            // Only a file open here uses the cache (its commits write it back).
            let in_cache: Option<BTreeSet<u64>> = lock(&self.open)
                .get(&ino)
                .map(|o| o.cached.keys().copied().collect());
            let use_cache = self.cache.is_some() && in_cache.is_some();
            let in_cache = in_cache.unwrap_or_default();
            // (data block, offset, bytes, through the cache): parts of blocks, and
            // blocks the cache holds, go through it.
            let pieces: Vec<(u64, usize, Bytes, bool)> = maps
                .iter()
                .map(|m| {
                    let start = m.block * bs;
                    let from = start.max(offset);
                    let to = (start + bs).min(end);
                    let src = &data[(from - offset) as usize..(to - offset) as usize];
                    let within = (from - start) as usize;
                    let partial = src.len() as u64 != bs;
                    let cached = use_cache && (partial || in_cache.contains(&m.lba));
                    if m.fresh && partial {
                        let mut whole = vec![0u8; bs as usize];
                        whole[within..within + src.len()].copy_from_slice(src);
                        (m.lba, 0, Bytes::from(whole), cached)
                    } else {
                        (m.lba, within, Bytes::copy_from_slice(src), cached)
                    }
                })
                .collect();
            let (to_cache, direct): (Vec<_>, Vec<_>) = pieces.into_iter().partition(|p| p.3);
            // Named in the file's cached set before (so a failed or cut-short write
            // leaves nothing in the cache that a commit would not write back) and
            // after (so a write-back that ran in between does not drop it).
            let started = self.write_seq.fetch_add(1, Ordering::Relaxed);
            let cached_lbas: Vec<u64> = to_cache.iter().map(|p| p.0).collect();
            for lba in &cached_lbas {
                note_cached(&self.open, &self.write_seq, ino, *lba);
            }
            // In a task of its own: a write cut short by its timeout while the cache
            // takes a block's lock would leave the lock held.
            let cache_writes = async {
                let Some(cache) = self.cache.clone().filter(|_| !to_cache.is_empty()) else {
                    return Ok(());
                };
                let (open, stats) = (self.open.clone(), self.cache_stats.clone());
                let seq = self.write_seq.clone();
                let using = using.clone();
                let task = tokio::spawn(async move {
                    let _using = using;
                    for (lba, within, bytes, _) in &to_cache {
                        cache.write(*lba, *within, bytes).await?;
                        note_cached(&open, &seq, ino, *lba);
                        stats.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok::<(), ClientError>(())
                });
                match task.await {
                    Ok(r) => r.map_err(OpError::from),
                    Err(e) => Err(OpError::WriteBack(format!(
                        "the cache write task ended: {e}"
                    ))),
                }
            };
            // Whole blocks at consecutive addresses go in one call (one lock per
            // stripe instead of one per block).
            let mut runs: Vec<(u64, usize, Vec<u8>)> = Vec::new();
            for (lba, within, bytes, _) in direct {
                let whole = within == 0 && bytes.len() as u64 == bs;
                match runs.last_mut() {
                    Some(r)
                        if whole
                            && r.1 == 0
                            && (r.2.len() as u64).is_multiple_of(bs)
                            && r.0 + r.2.len() as u64 / bs == lba =>
                    {
                        r.2.extend_from_slice(&bytes)
                    }
                    _ => runs.push((lba, within, bytes.to_vec())),
                }
            }
            let direct_writes = stream::iter(runs)
                .map(|(lba, within, bytes)| async move {
                    if within == 0 && (bytes.len() as u64).is_multiple_of(bs) {
                        self.data.write_blocks(lba, &bytes).await
                    } else {
                        self.data.write(lba, within, &bytes).await
                    }
                })
                .buffer_unordered(self.cfg.parallel.max(1))
                .collect::<Vec<Result<(), ClientError>>>();
            let (cached, results) = tokio::join!(cache_writes, direct_writes);
            cached?;
            for r in results {
                r?;
            }
            let full = {
                let mut open = lock(&self.open);
                let o = open.entry(ino).or_default();
                // A write-back of this write's cached blocks failed after it began:
                // the write failed, and its fresh blocks stay unwritten.
                if cached_lbas
                    .iter()
                    .any(|l| o.failed.get(l).is_some_and(|(at, _)| *at > started))
                {
                    return Err(OpError::WriteBack(
                        "a write-back of this write's blocks failed".into(),
                    ));
                }
                o.size = o.size.max(end);
                let t = now();
                o.dirty = Some(t);
                o.last_write = Some(t);
                for m in maps.iter().filter(|m| m.fresh) {
                    o.fresh.remove(&m.block);
                    o.settled.insert(m.block);
                }
                o.cached.len() > CACHE_FILE_BLOCKS
            };
            if full {
                self.write_back_now(ino, |_| true).await.0?;
            }
            Ok(data.len())
        })
        .await
    }

    /// `fallocate(2)` on `offset .. offset + length`:
    /// - mode 0 gives every file block of the range a data block (ENOSPC if the
    ///   volume has too few; new ones are unwritten, so they read as zeros) and grows
    ///   the size to cover the range; with `FALLOC_FL_KEEP_SIZE` the size stays;
    /// - `FALLOC_FL_PUNCH_HOLE` (with `KEEP_SIZE`, as Linux requires) frees the whole
    ///   blocks of the range, which become holes, and zeroes its bytes in the blocks
    ///   at either end;
    /// - `FALLOC_FL_ZERO_RANGE` zeroes the range and leaves it allocated.
    ///
    /// mtime and ctime change. Collapsing, inserting and unsharing ranges are
    /// [`OpError::Unsupported`].
    pub async fn fallocate(&self, ino: Ino, offset: u64, length: u64, mode: i32) -> OpResult<()> {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(OpError::Unsupported("this fallocate mode"));
        }
        if length == 0 || (punch && (!keep || zero)) {
            return Err(FsError::Invalid.into());
        }
        let end = offset
            .checked_add(length)
            .ok_or(OpError::Fs(FsError::TooLarge))?;
        self.bounded(async {
            let _freeing = self.freeing(ino).await;
            // This mount's writes first, so the blocks below are the file's.
            self.commit_as(ino, false, true, &mut Closing::Done).await?;
            let bs = self.block_size;
            let (first, last) = (offset / bs, (end - 1) / bs);
            if !punch {
                // All or nothing: blocks are handed out in several `Map`s, so a
                // shortage is found before the first.
                self.check_room(ino, first, last - first + 1).await?;
            }
            if punch || zero {
                // The bytes of the range in the blocks at its ends, unless whole.
                for b in BTreeSet::from([first, last]) {
                    let from = offset.max(b * bs) - b * bs;
                    let to = end.min((b + 1) * bs) - b * bs;
                    if to - from < bs {
                        self.zero_within(ino, b, from, to).await?;
                    }
                }
                let (whole, whole_end) = (offset.div_ceil(bs), end / bs);
                if whole < whole_end {
                    self.command(self.mine(FsCommand::Punch {
                        ino,
                        first: whole,
                        count: whole_end - whole,
                        now: now(),
                    }))
                    .await?;
                    if let Some(o) = lock(&self.open).get_mut(&ino) {
                        o.forget_blocks(whole, whole_end);
                    }
                }
            }
            if !punch {
                self.map_blocks(ino, first, last - first + 1, false).await?;
            }
            let size = if keep { 0 } else { end };
            self.command(self.mine(FsCommand::Written {
                ino,
                size,
                now: now(),
                written: Vec::new(),
                trim: false,
            }))
            .await?;
            if let Some(o) = lock(&self.open).get_mut(&ino) {
                o.size = o.size.max(size);
                if keep && !punch && end > o.size {
                    o.preallocated = true;
                }
            }
            Ok(())
        })
        .await
    }

    /// `TooLarge` past the largest file, `NoSpace` unless the volume has a free
    /// block for every block of file blocks `first .. first + count` without one.
    async fn check_room(&self, ino: Ino, first: u64, count: u64) -> OpResult<()> {
        let r = self.query(FsQuery::StatFs).await?;
        let stats = expect_reply!(r, FsReply::StatFs(s) => s)?;
        if first.saturating_add(count) > drs_meta::fs::max_file_blocks(stats.blocks) {
            return Err(FsError::TooLarge.into());
        }
        if count <= stats.free {
            return Ok(());
        }
        // Only blocks the file holds can make up the difference.
        let r = self.query(FsQuery::GetAttr { ino }).await?;
        let held = expect_reply!(r, FsReply::Attr(a) => a.blocks)?;
        if count > stats.free.saturating_add(held) {
            return Err(FsError::NoSpace.into());
        }
        let have = self.mappings(ino, first, count).await?.len() as u64;
        if count - have.min(count) > stats.free {
            return Err(FsError::NoSpace.into());
        }
        Ok(())
    }
}

/// Names data block `lba` in file `ino`'s cached set, as written now.
fn note_cached(open: &Mutex<HashMap<Ino, Open>>, seq: &AtomicU64, ino: Ino, lba: u64) {
    let seq = seq.fetch_add(1, Ordering::Relaxed);
    if let Some(o) = lock(open).get_mut(&ino) {
        o.cached
            .entry(lba)
            .and_modify(|c| c.1 = seq)
            .or_insert((Instant::now(), seq));
    }
}

/// Writes file `ino`'s cached blocks whose first write was at a time `due` accepts
/// back from the cache; a block no write reached since leaves the file's cached
/// set. If a stripe's write-back fails, its blocks are remembered as failed (see
/// [`Open::failed`]), the file blocks they back that no `Written` named yet become
/// unwritten again (what they hold is not known: the update may or may not have
/// landed), the file's next commit reports it, and the error is returned. Callers
/// hold the file's [`Open::write_back`] lock.
async fn write_back_due(
    wb: &WriteBack,
    ino: Ino,
    due: fn(Instant) -> bool,
) -> Result<(), ClientError> {
    let blocks: Vec<(u64, u64)> = lock(&wb.open)
        .get(&ino)
        .map(|o| {
            o.cached
                .iter()
                .filter(|(_, (since, _))| due(*since))
                .map(|(lba, (_, seq))| (*lba, *seq))
                .collect()
        })
        .unwrap_or_default();
    if blocks.is_empty() {
        return Ok(());
    }
    let lbas: Vec<u64> = blocks.iter().map(|b| b.0).collect();
    let res = wb.cache.flush_blocks(&lbas).await;
    let counter = if res.is_ok() {
        &wb.stats.write_backs
    } else {
        &wb.stats.failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Some(o) = lock(&wb.open).get_mut(&ino) {
        for (lba, seq) in &blocks {
            if o.cached.get(lba).is_some_and(|c| c.1 == *seq) {
                o.cached.remove(lba);
            }
        }
        if let Err((e, failed)) = &res {
            let at = wb.seq.fetch_add(1, Ordering::Relaxed);
            let keep = wb.keep_failures;
            o.failed.retain(|_, (_, when)| when.elapsed() < keep);
            for l in failed {
                o.failed.insert(*l, (at, Instant::now()));
            }
            let failed: BTreeSet<u64> = failed.iter().copied().collect();
            let lost: Vec<u64> = o
                .blocks
                .iter()
                .filter(|(b, l)| failed.contains(l) && o.settled.contains(b))
                .map(|(b, _)| *b)
                .collect();
            for b in lost {
                o.settled.remove(&b);
                o.fresh.insert(b);
            }
            o.write_error.get_or_insert_with(|| e.to_string());
        }
    }
    res.map_err(|(e, _)| e)
}

/// The background write-back: every [`CACHE_TICK`], each open file's blocks cached
/// for [`CACHE_AGE`] or more, under the file's write-back lock (a failure waits for
/// the file's next flush, fsync or close). `wb`'s table of open files is `open`,
/// held weakly: the task ends with the mount's table.
async fn write_back_aged(
    open: Weak<Mutex<HashMap<Ino, Open>>>,
    cache: WriteBackCache,
    wb: WriteBack,
    session: Arc<session::MountSession>,
) {
    let (stats, seq, keep_failures) = (wb.stats, wb.seq, wb.keep_failures);
    drop(wb.open);
    loop {
        tokio::time::sleep(CACHE_TICK).await;
        let Some(open) = open.upgrade() else {
            return;
        };
        // Cached blocks are written back only while the maps that named them hold.
        if session.check().is_err() {
            continue;
        }
        let due: Vec<(Ino, Arc<tokio::sync::Mutex<()>>)> = lock(&open)
            .iter()
            .filter(|(_, o)| {
                o.cached
                    .values()
                    .any(|(since, _)| since.elapsed() >= CACHE_AGE)
            })
            .map(|(ino, o)| (*ino, o.write_back.clone()))
            .collect();
        let wb = WriteBack {
            open,
            cache: cache.clone(),
            stats: stats.clone(),
            seq: seq.clone(),
            keep_failures,
        };
        for (ino, serial) in due {
            let _serial = serial.lock().await;
            if session.check().is_err() {
                break;
            }
            let aged = |since: Instant| since.elapsed() >= CACHE_AGE;
            if let Err(e) = write_back_due(&wb, ino, aged).await {
                tracing::warn!(ino, error = %e, "writing cached blocks back failed");
            }
        }
    }
}
