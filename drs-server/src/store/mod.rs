//! The durable block store of one volume at one node.
//!
//! The store owns, for every stripe the node is a member of, one block (its *slot*):
//! the bytes in a preallocated data file at `stripe * block_size`, and a header with
//! the versions the bytes reflect, their crc32, and flags. It guarantees:
//!
//! - **Logged before acknowledged.** An update is a write-ahead-log record, made
//!   durable by a group-committed fsync, before it is acknowledged and before the
//!   data file changes ([`wal`]). A restart replays the log idempotently.
//! - **Applied in version order** (DESIGN-NOTES I3): an update that takes data block i
//!   to version v is applied only after v - 1; one that arrives early is logged as
//!   pending and applied when the gap fills.
//! - **Checked on every read** (I6): the whole block is hashed and compared with its
//!   stored crc32; a mismatch marks the slot corrupt and its bytes are never returned.
//! - **Reads see whole updates.** Readers hold the slot's read lock while they copy
//!   the bytes and the versions; the writer holds its write lock while it changes both.
//!
//! One writer thread per store does every mutation (log, apply, install,
//! checkpoint), so decisions about versions are made in one place, in one order.
//! Readers run on any thread.

pub mod headers;
pub mod wal;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use drs_codec::{Codec, Coefficients};
use drs_proto::{
    Applied, BlockUpdate, Geometry, NodeId, ReadMode, SlotInfo, SlotState, StripeId, UpdateId,
    Version, VolumeConfig, WireError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use self::headers::{HeaderRecord, FLAG_CORRUPT, FLAG_WRITTEN};
use self::wal::{Wal, WalCtrl, WalRecord};

/// Updates kept per slot so an as-of read can undo them.
const UNDO_PER_SLOT: usize = 4;
/// Update ids remembered per slot to recognise retried updates.
const RECENT_IDS: usize = 32;
/// Most jobs the writer takes into one group commit.
const BATCH_JOBS: usize = 512;
/// Most payload bytes the writer takes into one group commit.
const BATCH_BYTES: usize = 32 * 1024 * 1024;
/// Jobs queued for the writer before senders wait.
const QUEUE: usize = 1024;
/// Skipped version ranges remembered per slot (see [`Skip`]); beyond, the oldest go.
const SKIPS_PER_SLOT: usize = 16;
/// Version ranges installs jumped over, remembered per slot (`Slot::installed`).
const INSTALLS_PER_SLOT: usize = 4;

/// Settings of one store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    pub node: NodeId,
    pub cluster_id: u64,
    pub volume: VolumeConfig,
    /// Checkpoint when the log grows past this many bytes.
    pub checkpoint_bytes: u64,
    /// Most updates held pending (waiting for an earlier version) per store.
    pub max_pending: usize,
    /// Most bytes of undo deltas kept in memory per store (for as-of reads).
    pub undo_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Wal(#[from] wal::WalError),
    #[error("data directory {dir} belongs to {found}, not to {expected}; refusing to use it")]
    Identity {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    #[error("coefficient table: {0}")]
    Codec(#[from] drs_codec::CodecError),
    #[error("the store's writer has stopped")]
    Stopped,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What the data directory was created for; checked at every open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    cluster_id: u64,
    node: NodeId,
    volume: u32,
    k: u8,
    m: u8,
    block_size: u32,
    blocks: u64,
    coefficients: Vec<Vec<u8>>,
}

/// An update received but not yet applicable.
#[derive(Debug, Clone)]
struct Pending {
    id: UpdateId,
    index: u8,
    version: Version,
    /// The version it applies to (see `BlockUpdate::base`).
    base: Version,
    offset: u32,
    delta: Bytes,
}

/// Versions of data block `index` that a lock granted here told its owner to skip:
/// `(from, to]`, between the highest version known here and the `fenced` hint of the
/// lock reply (versions a fenced holder may have given out).
///
/// While `owner` is `Some`, the record is *tentative*: the owner holds the lock and
/// has not sent its update here, and whether it really skips them depends on what
/// the other members told it (another may know one of them: the owner then builds
/// on it). A relayed update with such a version waits (node.rs) until the record is
/// settled: by the owner's update, whose base says which versions it skipped (the
/// record becomes *definite*, `owner: None`, or goes), or by the owner's lock going
/// without an update here (released, or its client fenced), which ends the record.
/// A definite record's versions are void: updates with them are refused
/// (`StaleVersion`), so a dead client's update that lands late can never take the
/// place of the update built past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Skip {
    index: u8,
    from: Version,
    to: Version,
    owner: Option<u64>,
}

/// An applied update's effect on this slot, kept briefly for as-of reads.
#[derive(Debug, Clone)]
struct Undo {
    before: Vec<Version>,
    offset: u32,
    /// old XOR new over the range.
    delta: Bytes,
}

/// In-memory state of one slot.
#[derive(Debug, Clone)]
struct Slot {
    member: bool,
    position: u8,
    /// Applied versions, one per data index (a data slot tracks only its own).
    versions: Vec<Version>,
    /// Highest versions seen (applied, logged pending, or recorded by an unlock).
    known: Vec<Version>,
    /// Highest versions a lock holder fenced here may have given out unseen (see
    /// `LockReply::fenced`); memory only.
    fenced: Vec<Version>,
    /// Versions the locks granted here with a `fenced` hint skipped; memory only,
    /// changed only under the slot's lock (never by the writer's copy).
    skipped: Vec<Skip>,
    /// `(index, from, to)`: an install (a rebuild) took data block `index` from
    /// version `from` to `to`, so the installed bytes hold the update with version
    /// `to`: arriving afterwards, it is a duplicate, not stale. Memory only; the
    /// newest [`INSTALLS_PER_SLOT`].
    installed: Vec<(u8, Version, Version)>,
    crc: u32,
    written: bool,
    corrupt: bool,
    verified: bool,
    pending: Vec<Pending>,
    undo: VecDeque<Undo>,
    recent: VecDeque<UpdateId>,
    /// Since when the slot has known of a version it has not applied.
    behind_since: Option<Instant>,
}

impl Slot {
    fn is_behind(&self, tracked: std::ops::Range<usize>) -> bool {
        tracked
            .into_iter()
            .any(|i| self.known[i] > self.versions[i])
    }
}

/// For some blocks of a slot: the versions known given out, and those a fenced lock
/// holder may have given out beyond them (a lock reply's `known` and `fenced`).
pub type Known = (Vec<(u8, Version)>, Vec<(u8, Version)>);

/// Counters, readable by anyone.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub updates: AtomicU64,
    pub bytes_updated: AtomicU64,
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub corrupt_found: AtomicU64,
    pub repairs_installed: AtomicU64,
    pub pending: AtomicU64,
    pub wal_bytes: AtomicU64,
    pub fsyncs: AtomicU64,
}

/// What [`VolumeStore::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The bytes match their checksum.
    Clean,
    /// Marked corrupt: `found` by this check, or already marked before it.
    Corrupt { found: bool },
    /// Not verified yet (the node is rejoining): recovery compares it.
    Unverified,
    /// This node holds no block of the stripe.
    NotMember,
    /// The disk would not read (not a checksum question).
    Error(String),
}

/// A read that cannot be answered yet: updates the read must see are still pending,
/// or the versions asked for are not there yet. Wait for [`VolumeStore::applied`] to
/// change and try again.
#[derive(Debug)]
pub enum ReadOutcome {
    Done { versions: Vec<Version>, data: Bytes },
    Wait,
}

enum Job {
    Update {
        stripe: StripeId,
        update: BlockUpdate,
        delta: Bytes,
        /// Keep the update durably until settled ([`VolumeStore::kept`]).
        keep: bool,
        deadline: Instant,
        reply: oneshot::Sender<Result<Applied, WireError>>,
    },
    Install {
        stripe: StripeId,
        versions: Vec<Version>,
        data: Bytes,
        force: bool,
        reply: oneshot::Sender<Result<bool, WireError>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<(), WireError>>,
    },
}

impl Job {
    fn bytes(&self) -> usize {
        match self {
            Job::Update { delta, .. } => delta.len(),
            Job::Install { data, .. } => data.len(),
            Job::Checkpoint { .. } => 0,
        }
    }
}

/// The store of one volume; cheap to share behind an `Arc`.
pub struct VolumeStore {
    cfg: StoreConfig,
    geo: Geometry,
    codec: Codec,
    data_path: PathBuf,
    data: File,
    slots: Vec<RwLock<Slot>>,
    jobs: mpsc::Sender<Job>,
    applied: watch::Sender<u64>,
    /// Bytes of undo deltas held by all slots (bounded by `undo_bytes`).
    undo_total: std::sync::atomic::AtomicUsize,
    /// Raised by every [`VolumeStore::all_unverified`]: a verification that began
    /// before it must not mark a block verified after it.
    unverified_gen: AtomicU64,
    /// Member slots, and how many of them are verified (kept with every change of
    /// `Slot::verified`, so a ping or a heartbeat need not scan the slots).
    members: u64,
    verified: AtomicU64,
    /// Updates kept durably until every member holds them (`WalCtrl::Kept`): taken
    /// while the block's data node did not take part, so the parity members may hold
    /// their only copies. The node passes them on after a restart and drops them
    /// once settled ([`VolumeStore::retain_kept`]).
    kept: Mutex<BTreeMap<UpdateId, Kept>>,
    pub stats: StoreStats,
}

/// An update kept durably until settled.
#[derive(Debug, Clone)]
pub struct Kept {
    pub stripe: StripeId,
    pub update: BlockUpdate,
    pub delta: Bytes,
    /// The node tracks it as unsettled ([`VolumeStore::adopt_kept`]); only then may
    /// [`VolumeStore::retain_kept`] drop it.
    pub adopted: bool,
}

/// Replies a job with an error if the writer stopped before answering it.
fn stopped() -> WireError {
    WireError::ShuttingDown
}

impl VolumeStore {
    /// Opens (creating if needed) the store in `cfg.dir`, replays its log, and starts
    /// its writer thread. Every slot starts unverified.
    pub fn open(cfg: StoreConfig) -> Result<Arc<VolumeStore>, StoreError> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let geo = cfg.volume.geometry();
        let coefficients = Coefficients::from_rows(geo.k, geo.m, cfg.volume.coefficients.clone())?;
        let codec = Codec::new(coefficients);
        check_identity(&cfg)?;

        let stripes = geo.stripes();
        let block = geo.block_size as u64;
        let data_path = dir.join("blocks.dat");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io_err("open", &data_path))?;
        let want = stripes * block;
        let have = data.metadata().map_err(io_err("stat", &data_path))?.len();
        if have < want {
            // Reserve the space now, so applying a logged update never meets a full disk.
            nix::fcntl::posix_fallocate(&data, 0, want as i64).map_err(|e| StoreError::Io {
                what: "preallocate",
                path: data_path.clone(),
                source: e.into(),
            })?;
        }

        let zero_crc = crc32fast::hash(&vec![0u8; geo.block_size]);
        let mut slots: Vec<Slot> = (0..stripes)
            .map(|s| {
                let pos = geo.position_of(s, cfg.node);
                Slot {
                    member: pos.is_some(),
                    position: pos.map(|p| p as u8).unwrap_or(u8::MAX),
                    versions: vec![0; geo.k],
                    known: vec![0; geo.k],
                    fenced: vec![0; geo.k],
                    skipped: Vec::new(),
                    installed: Vec::new(),
                    crc: zero_crc,
                    written: false,
                    corrupt: false,
                    verified: false,
                    pending: Vec::new(),
                    undo: VecDeque::new(),
                    recent: VecDeque::new(),
                    behind_since: None,
                }
            })
            .collect();

        let headers_path = dir.join("headers");
        match std::fs::read(&headers_path) {
            Ok(raw) => match headers::decode(&raw, geo.k, stripes) {
                Ok(recs) => {
                    for (slot, r) in slots.iter_mut().zip(recs) {
                        if slot.member && r.position == slot.position {
                            slot.versions = r.versions;
                            slot.crc = r.crc;
                            slot.written = r.flags & FLAG_WRITTEN != 0;
                            slot.corrupt = r.flags & FLAG_CORRUPT != 0;
                        }
                    }
                }
                Err(e) => {
                    // Without trustworthy headers no block can be trusted: every slot
                    // is rebuilt from its stripe.
                    tracing::error!(path = %headers_path.display(), error = %e, "block headers unusable; all blocks will be rebuilt");
                    for slot in slots.iter_mut() {
                        slot.corrupt = true;
                        slot.written = true;
                    }
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read", &headers_path)(e)),
        }

        let wal_path = dir.join("wal.log");
        let (wal, records, stop) = Wal::open(&wal_path)?;
        if stop == wal::Stop::Damaged {
            tracing::warn!(path = %wal_path.display(), "log ends in a torn or damaged record; it was cut off and never applied");
        }
        let replayed = records.len();
        let mut kept = BTreeMap::new();
        for rec in records {
            replay(&geo, &data, &data_path, &mut slots, &mut kept, rec)?;
        }
        for slot in slots.iter_mut() {
            for p in &slot.pending {
                let i = p.index as usize;
                slot.known[i] = slot.known[i].max(p.version);
            }
            for i in 0..geo.k {
                slot.known[i] = slot.known[i].max(slot.versions[i]);
            }
            if slot.member && slot.is_behind(tracked_range(&geo, slot.position)) {
                slot.behind_since = Some(Instant::now());
            }
        }
        let pending: usize = slots.iter().map(|s| s.pending.len()).sum();
        tracing::info!(
            volume = cfg.volume.id,
            stripes,
            replayed,
            pending,
            kept = kept.len(),
            "store opened"
        );

        let (tx, rx) = mpsc::channel(QUEUE);
        let (applied, _) = watch::channel(0u64);
        let members = slots.iter().filter(|s| s.member).count() as u64;
        let store = Arc::new(VolumeStore {
            cfg,
            geo,
            codec,
            data_path,
            data,
            slots: slots.into_iter().map(RwLock::new).collect(),
            jobs: tx,
            applied,
            undo_total: Default::default(),
            unverified_gen: AtomicU64::new(0),
            members,
            verified: AtomicU64::new(0),
            kept: Mutex::new(kept),
            stats: StoreStats::default(),
        });
        store.stats.pending.store(pending as u64, Ordering::Relaxed);
        store.stats.wal_bytes.store(wal.len(), Ordering::Relaxed);
        let writer = Writer {
            store: Arc::downgrade(&store),
            floor: 0,
            wal,
            wal_path,
            rx,
        };
        std::thread::Builder::new()
            .name(format!("drs-store-{}", store.cfg.volume.id))
            .spawn(move || writer.run())
            .map_err(io_err("spawn writer for", &dir))?;
        Ok(store)
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    pub fn volume(&self) -> &VolumeConfig {
        &self.cfg.volume
    }

    /// Changes whenever the writer applied something; readers waiting for pending
    /// updates watch it.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn slot_read(&self, stripe: StripeId) -> RwLockReadGuard<'_, Slot> {
        // A poisoned lock means a writer panicked mid-change; the data is still the
        // last committed state, which is what we want to read.
        self.slots[stripe as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn slot_write(&self, stripe: StripeId) -> RwLockWriteGuard<'_, Slot> {
        self.slots[stripe as usize]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that this node holds `position` of `stripe`.
    pub fn check_member(&self, stripe: StripeId, position: u8) -> Result<(), WireError> {
        if stripe >= self.geo.stripes() {
            return Err(WireError::StripeOutOfRange {
                stripe,
                stripes: self.geo.stripes(),
            });
        }
        let s = self.slot_read(stripe);
        if !s.member || s.position != position {
            return Err(WireError::NotMember {
                node: self.cfg.node,
                stripe,
                position,
            });
        }
        Ok(())
    }

    /// This node's position in `stripe`, if it is a member.
    pub fn position(&self, stripe: StripeId) -> Option<u8> {
        if stripe >= self.geo.stripes() {
            return None;
        }
        let s = self.slot_read(stripe);
        s.member.then_some(s.position)
    }

    fn check_range(&self, offset: u32, len: u32) -> Result<(), WireError> {
        let bs = self.geo.block_size as u64;
        if offset as u64 + len as u64 > bs {
            return Err(WireError::BadRange {
                offset,
                len,
                block_size: bs as u32,
            });
        }
        Ok(())
    }

    /// Indices of the version vector a slot at `position` tracks.
    fn tracked(&self, position: u8) -> std::ops::Range<usize> {
        tracked_range(&self.geo, position)
    }

    /// Reads `[offset, offset + len)` of the slot. Blocking (disk I/O).
    pub fn read(
        &self,
        stripe: StripeId,
        position: u8,
        offset: u32,
        len: u32,
        mode: &ReadMode,
    ) -> Result<ReadOutcome, WireError> {
        self.check_member(stripe, position)?;
        self.check_range(offset, len)?;
        let tracked = self.tracked(position);
        let slot = self.slot_read(stripe);
        if slot.corrupt {
            return Err(WireError::Corrupt { stripe, position });
        }
        let mut undo_to: Option<&[Version]> = None;
        match mode {
            ReadMode::Current => {
                if !slot.verified {
                    return Err(WireError::Recovering { stripe });
                }
                if slot.is_behind(tracked.clone()) {
                    return Ok(ReadOutcome::Wait);
                }
            }
            ReadMode::Applied => {}
            ReadMode::AsOf(want) => {
                if want.len() != self.geo.k {
                    return Err(WireError::Invalid {
                        what: drs_proto::error::InvalidReason::VersionLength,
                    });
                }
                if tracked.clone().any(|i| slot.versions[i] < want[i]) {
                    return Ok(ReadOutcome::Wait);
                }
                if tracked.clone().any(|i| slot.versions[i] != want[i]) {
                    undo_to = Some(want);
                }
            }
        }
        let mut block = vec![0u8; self.geo.block_size];
        let at = stripe * self.geo.block_size as u64;
        let short = match self.data.read_exact_at(&mut block, at) {
            Ok(()) => false,
            // The data file ends before the block: truncated under the node.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(io_wire(&e)),
        };
        if short || crc32fast::hash(&block) != slot.crc {
            let versions = slot.versions.clone();
            drop(slot);
            self.mark_corrupt(stripe, &versions);
            return Err(WireError::Corrupt { stripe, position });
        }
        let mut versions = slot.versions.clone();
        if let Some(want) = undo_to {
            for u in slot.undo.iter().rev() {
                if tracked.clone().all(|i| versions[i] == want[i]) {
                    break;
                }
                let (o, n) = (u.offset as usize, u.delta.len());
                let _ = Codec::xor_into(&u.delta, &mut block[o..o + n]);
                versions = u.before.clone();
            }
            if !tracked.clone().all(|i| versions[i] == want[i]) {
                return Err(WireError::VersionUnavailable {
                    stripe,
                    wanted: want.to_vec(),
                    current: slot.versions.clone(),
                });
            }
        }
        drop(slot);
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        let (o, n) = (offset as usize, len as usize);
        let data = if o == 0 && n == block.len() {
            Bytes::from(block)
        } else {
            Bytes::copy_from_slice(&block[o..o + n])
        };
        Ok(ReadOutcome::Done { versions, data })
    }

    /// True when the slot's block was never written (it is all zeros) and no update
    /// for it is known.
    pub fn is_zero(&self, stripe: StripeId) -> bool {
        let s = self.slot_read(stripe);
        !s.written && !s.corrupt && s.known.iter().all(|v| *v == 0)
    }

    /// Reads this node's block of `stripe` and compares it with its stored crc32, for
    /// the background scrubber. A mismatch, or a data file cut short before the block
    /// ends (a torn or truncated file), marks the slot corrupt, as a client read
    /// would. Blocking (disk I/O).
    pub fn check(&self, stripe: StripeId) -> Check {
        if self.position(stripe).is_none() {
            return Check::NotMember;
        }
        let slot = self.slot_read(stripe);
        if slot.corrupt {
            return Check::Corrupt { found: false };
        }
        if !slot.verified {
            return Check::Unverified;
        }
        let mut block = vec![0u8; self.geo.block_size];
        let at = stripe * self.geo.block_size as u64;
        let bad = match self.data.read_exact_at(&mut block, at) {
            Ok(()) => crc32fast::hash(&block) != slot.crc,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
            Err(e) => return Check::Error(e.to_string()),
        };
        if !bad {
            return Check::Clean;
        }
        let versions = slot.versions.clone();
        drop(slot);
        let before = self.stats.corrupt_found.load(Ordering::Relaxed);
        self.mark_corrupt(stripe, &versions);
        Check::Corrupt {
            found: self.stats.corrupt_found.load(Ordering::Relaxed) != before,
        }
    }

    fn mark_corrupt(&self, stripe: StripeId, seen: &[Version]) {
        let mut s = self.slot_write(stripe);
        // Only if nothing was applied since the failed read.
        if s.versions == seen && !s.corrupt {
            s.corrupt = true;
            self.stats.corrupt_found.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                stripe,
                position = s.position,
                "block failed its checksum; marked for repair"
            );
        }
    }

    /// For the tracked indices among `indices` (for lock replies): the versions known
    /// given out, and those a fenced holder may have given out beyond them.
    pub fn known(&self, stripe: StripeId, indices: &[u8]) -> Known {
        let s = self.slot_read(stripe);
        let tracked = self.tracked(s.position);
        let mine = || {
            indices
                .iter()
                .map(|i| *i as usize)
                .filter(|i| tracked.contains(i))
        };
        let known = mine().map(|i| (i as u8, s.known[i])).collect();
        let fenced = mine()
            .filter(|i| s.fenced[*i] > s.known[*i])
            .map(|i| (i as u8, s.fenced[i]))
            .collect();
        (known, fenced)
    }

    /// [`VolumeStore::known`] for a lock just granted to `owner` on `indices`: the
    /// versions between the known ones and a `fenced` hint the reply carries are
    /// recorded as tentatively skipped by the owner (see [`Skip`]).
    pub fn note_granted(&self, stripe: StripeId, indices: &[u8], owner: u64) -> Known {
        let mut s = self.slot_write(stripe);
        let tracked = self.tracked(s.position);
        let mut known = Vec::new();
        let mut fenced = Vec::new();
        for i in indices.iter().map(|i| *i as usize) {
            if !tracked.contains(&i) {
                continue;
            }
            known.push((i as u8, s.known[i]));
            if s.fenced[i] > s.known[i] {
                fenced.push((i as u8, s.fenced[i]));
                let skip = Skip {
                    index: i as u8,
                    from: s.known[i],
                    to: s.fenced[i],
                    owner: Some(owner),
                };
                // Ranges the block has passed are moot: their versions are stale.
                let versions = s.versions.clone();
                s.skipped.retain(|k| {
                    k.to > versions[k.index as usize]
                        && !(k.index == skip.index && k.owner == skip.owner)
                });
                if s.skipped.len() >= SKIPS_PER_SLOT {
                    tracing::warn!(
                        stripe,
                        "too many skipped version ranges kept for one block; the oldest is forgotten"
                    );
                    s.skipped.remove(0);
                }
                s.skipped.push(skip);
            }
        }
        (known, fenced)
    }

    /// `owner`'s update of data block `index`, built on `base`, was admitted here:
    /// of the versions its grant tentatively skipped, those above `base` are void
    /// (definite); if `base` is past them all, it skipped nothing.
    pub fn note_owner_update(&self, stripe: StripeId, index: u8, owner: u64, base: Version) {
        let mut s = self.slot_write(stripe);
        if s.skipped.is_empty() {
            return;
        }
        s.skipped.retain_mut(|k| {
            if k.index != index || k.owner != Some(owner) {
                return true;
            }
            k.owner = None;
            k.from = k.from.max(base);
            k.from < k.to
        });
        drop(s);
        // Relays waiting for the outcome go on.
        self.applied.send_modify(|n| *n += 1);
    }

    /// The locks on `indices` of `owner` (of any owner: `None`) went without an
    /// update of those blocks here (released, or its client fenced): their tentative
    /// records end. (Had the owner given out a version this node missed, the node is
    /// behind and rebuilds the block; a void update it takes meanwhile goes with it.)
    pub fn note_lock_gone(&self, stripe: StripeId, indices: &[u8], owner: Option<u64>) {
        let mut s = self.slot_write(stripe);
        if s.skipped.is_empty() {
            return;
        }
        s.skipped.retain(|k| {
            let theirs = match owner {
                Some(o) => k.owner == Some(o),
                None => k.owner.is_some(),
            };
            !(theirs && indices.contains(&k.index))
        });
        drop(s);
        self.applied.send_modify(|n| *n += 1);
    }

    /// True if `version` of data block `index` is definitely void: a lock granted
    /// here skipped it, and its owner's update said so.
    fn is_skipped(&self, stripe: StripeId, index: u8, version: Version) -> bool {
        self.slot_read(stripe)
            .skipped
            .iter()
            .any(|k| k.owner.is_none() && k.index == index && k.from < version && version <= k.to)
    }

    /// True while a lock granted here tentatively skipped `version` of data block
    /// `index`: an update with it must wait for the owner's update or its lock's end.
    pub fn skip_undecided(&self, stripe: StripeId, index: u8, version: Version) -> bool {
        self.slot_read(stripe)
            .skipped
            .iter()
            .any(|k| k.owner.is_some() && k.index == index && k.from < version && version <= k.to)
    }

    /// The holder of these locks was fenced, not unlocked: it may have given out the
    /// next version of each block to some member without this one learning of it.
    /// The next lock here reports that version as `fenced`, so the next update skips
    /// it (report 5.3.3; see `BlockUpdate::base`).
    ///
    /// The holder's next version was one past everything its lock replies reported:
    /// the known and applied versions, and an earlier hint (a holder granted with a
    /// hint skipped past it). So the new hint is one past the highest of the three.
    pub fn note_fenced(&self, stripe: StripeId, indices: &[u8]) {
        let mut s = self.slot_write(stripe);
        let tracked = self.tracked(s.position);
        for &i in indices {
            let i = i as usize;
            if tracked.contains(&i) {
                let past = s.known[i].max(s.versions[i]).max(s.fenced[i]) + 1;
                s.fenced[i] = past;
            }
        }
    }

    /// Records versions a lock holder gave out (from its unlock).
    pub fn record_known(&self, stripe: StripeId, blocks: &[(u8, Version)]) {
        let mut s = self.slot_write(stripe);
        let tracked = self.tracked(s.position);
        for &(i, v) in blocks {
            let i = i as usize;
            if tracked.contains(&i) && i < s.known.len() {
                s.known[i] = s.known[i].max(v);
            }
        }
        if s.is_behind(tracked) && s.behind_since.is_none() {
            s.behind_since = Some(Instant::now());
        }
    }

    /// Forgets versions the slot heard of (from unlocks) that never arrived and that
    /// a rebuild could not find anywhere in the stripe, so the block stops waiting for
    /// them. Pending updates stay.
    pub fn forget_unseen(&self, stripe: StripeId) {
        let mut s = self.slot_write(stripe);
        let tracked = self.tracked(s.position);
        let mut known = s.versions.clone();
        for p in &s.pending {
            known[p.index as usize] = known[p.index as usize].max(p.version);
        }
        for i in tracked.clone() {
            s.known[i] = known[i];
        }
        if !s.is_behind(tracked) {
            s.behind_since = None;
        }
        drop(s);
        // Reads waiting for those versions may go on now.
        self.applied.send_modify(|n| *n += 1);
    }

    /// Marks a slot verified (it is known to be up to date with its stripe).
    pub fn set_verified(&self, stripe: StripeId, verified: bool) {
        let mut s = self.slot_write(stripe);
        self.mark_verified(&mut s, verified);
    }

    /// Sets a slot's `verified` under its lock, keeping the count.
    fn mark_verified(&self, s: &mut Slot, verified: bool) {
        if s.verified == verified {
            return;
        }
        s.verified = verified;
        if s.member {
            if verified {
                self.verified.fetch_add(1, Ordering::AcqRel);
            } else {
                self.verified.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Marks every slot unverified (restart, a pause, declared down).
    pub fn all_unverified(&self) {
        self.unverified_gen.fetch_add(1, Ordering::AcqRel);
        for s in 0..self.geo.stripes() {
            self.set_verified(s, false);
        }
    }

    /// Taken before a verification looks at a block and its stripe: see
    /// [`VolumeStore::set_verified_since`].
    pub fn unverified_generation(&self) -> u64 {
        self.unverified_gen.load(Ordering::Acquire)
    }

    /// Marks a slot verified unless every slot was marked unverified since `gen` was
    /// taken (the node was paused or declared down meanwhile: what the verification
    /// saw may be old). True if marked. Checked under the slot's lock, so a
    /// concurrent [`VolumeStore::all_unverified`] either sees the mark and undoes it,
    /// or comes first and the mark is refused.
    pub fn set_verified_since(&self, stripe: StripeId, gen: u64) -> bool {
        let mut s = self.slot_write(stripe);
        if self.unverified_gen.load(Ordering::Acquire) != gen {
            return false;
        }
        self.mark_verified(&mut s, true);
        true
    }

    /// (verified, member slots).
    pub fn verified_count(&self) -> (u64, u64) {
        (self.verified.load(Ordering::Acquire), self.members)
    }

    /// Stripes whose block has known of an unapplied version for longer than `age`:
    /// the node missed an update of that block and must rebuild it from the stripe.
    pub fn stuck(&self, age: Duration) -> Vec<StripeId> {
        let now = Instant::now();
        (0..self.geo.stripes())
            .filter(|s| {
                let slot = self.slot_read(*s);
                slot.behind_since
                    .is_some_and(|t| now.duration_since(t) > age)
            })
            .collect()
    }

    /// A page of slot descriptions, starting at `from`.
    pub fn list(
        &self,
        from: StripeId,
        max: usize,
        locks: impl Fn(StripeId) -> Vec<drs_proto::LockInfo>,
    ) -> (Vec<SlotInfo>, Option<StripeId>) {
        let mut out = Vec::new();
        let mut s = from;
        let end = self.geo.stripes();
        while s < end && out.len() < max {
            let slot = self.slot_read(s);
            if slot.member {
                let state = if slot.corrupt {
                    SlotState::Corrupt
                } else if !slot.verified {
                    SlotState::Unverified
                } else {
                    SlotState::Ok
                };
                out.push(SlotInfo {
                    stripe: s,
                    position: slot.position,
                    versions: slot.versions.clone(),
                    known: slot.known.clone(),
                    state,
                    locks: locks(s),
                    // The node's all-or-nothing state, not the store's: filled in
                    // by the node.
                    unsettled: Vec::new(),
                    pending: {
                        let mut p: Vec<u8> = slot.pending.iter().map(|p| p.index).collect();
                        p.sort_unstable();
                        p.dedup();
                        p
                    },
                });
            }
            s += 1;
        }
        (out, (s < end).then_some(s))
    }

    /// Logs and applies one block update at `stripe` (this node holding `position`);
    /// answers once it is durable. `delta` is the data block's old XOR new over the
    /// update's range (a parity node scales it). With `keep`, the update is also kept
    /// durably, with its delta, until [`VolumeStore::retain_kept`] drops it.
    pub async fn update(
        &self,
        stripe: StripeId,
        position: u8,
        update: BlockUpdate,
        delta: Bytes,
        keep: bool,
        deadline: Instant,
    ) -> Result<Applied, WireError> {
        self.validate_update(stripe, position, &update, &delta)?;
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Update {
                stripe,
                update,
                delta,
                keep,
                deadline,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Installs a whole block at `versions` (repair, rebuild). Returns whether it was
    /// installed (false: the node already had those versions and a good block).
    pub async fn install(
        &self,
        stripe: StripeId,
        position: u8,
        versions: Vec<Version>,
        data: Bytes,
        force: bool,
    ) -> Result<bool, WireError> {
        self.check_member(stripe, position)?;
        if versions.len() != self.geo.k {
            return Err(WireError::Invalid {
                what: drs_proto::error::InvalidReason::VersionLength,
            });
        }
        if data.len() != self.geo.block_size {
            return Err(WireError::BadRange {
                offset: 0,
                len: data.len() as u32,
                block_size: self.geo.block_size as u32,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Install {
                stripe,
                versions,
                data,
                force,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// The updates kept until settled (after a restart: those the log held).
    pub fn kept(&self) -> Vec<Kept> {
        lock_kept(&self.kept).values().cloned().collect()
    }

    /// Marks kept updates as tracked by the node's unsettled set.
    pub fn adopt_kept(&self, ids: &[UpdateId]) {
        let mut kept = lock_kept(&self.kept);
        for id in ids {
            if let Some(k) = kept.get_mut(id) {
                k.adopted = true;
            }
        }
    }

    /// Drops the adopted kept updates that `unsettled` says are settled (every member
    /// holds them, or they were given up). Their log records go at the next
    /// checkpoint; a restart before it passes them on again, which members that hold
    /// them answer as duplicates.
    pub fn retain_kept(&self, mut unsettled: impl FnMut(&Kept) -> bool) {
        lock_kept(&self.kept).retain(|_, k| !k.adopted || unsettled(k));
    }

    /// Forces a checkpoint (flush the data file, persist headers, shrink the log).
    pub async fn checkpoint(&self) -> Result<(), WireError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Checkpoint { reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    fn validate_update(
        &self,
        stripe: StripeId,
        position: u8,
        u: &BlockUpdate,
        delta: &Bytes,
    ) -> Result<(), WireError> {
        use drs_proto::error::InvalidReason as R;
        self.check_member(stripe, position)?;
        if delta.len() != u.len as usize {
            return Err(WireError::BadRange {
                offset: u.offset,
                len: u.len,
                block_size: self.geo.block_size as u32,
            });
        }
        self.check_range(u.offset, u.len)?;
        if u.index as usize >= self.geo.k {
            return Err(WireError::Invalid {
                what: R::IndexOutOfRange,
            });
        }
        if u.version == 0 {
            return Err(WireError::Invalid {
                what: R::ZeroVersion,
            });
        }
        if u.base >= u.version {
            return Err(WireError::Invalid { what: R::BadBase });
        }
        // A data node takes only its own block's updates.
        if (position as usize) < self.geo.k && u.index != position {
            return Err(WireError::Invalid { what: R::WrongRole });
        }
        Ok(())
    }

    fn slot_info_for_writer(&self, stripe: StripeId) -> Slot {
        self.slot_read(stripe).clone()
    }
}

fn tracked_range(geo: &Geometry, position: u8) -> std::ops::Range<usize> {
    geo.tracked(position as usize)
}

fn io_wire(e: &std::io::Error) -> WireError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        WireError::NoSpace
    } else {
        WireError::Io {
            kind: e.kind().to_string(),
        }
    }
}

fn check_identity(cfg: &StoreConfig) -> Result<(), StoreError> {
    let v = &cfg.volume;
    let id = Identity {
        cluster_id: cfg.cluster_id,
        node: cfg.node,
        volume: v.id,
        k: v.k,
        m: v.m,
        block_size: v.block_size,
        blocks: v.blocks,
        coefficients: v.coefficients.clone(),
    };
    let path = cfg.dir.join("identity");
    match std::fs::read(&path) {
        Ok(raw) => {
            let found: Option<Identity> = postcard::from_bytes(&raw).ok();
            if found.as_ref() != Some(&id) {
                let describe = |i: &Identity| {
                    format!(
                        "cluster {:016x} node {} volume {} ({}+{}, {} blocks of {} bytes)",
                        i.cluster_id, i.node, i.volume, i.k, i.m, i.blocks, i.block_size
                    )
                };
                return Err(StoreError::Identity {
                    dir: cfg.dir.clone(),
                    found: found
                        .as_ref()
                        .map(describe)
                        .unwrap_or_else(|| "an unreadable identity".into()),
                    expected: describe(&id),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let raw = postcard::to_stdvec(&id).map_err(|e| StoreError::Wal(e.into()))?;
            headers::write_atomic(&path, &raw).map_err(io_err("write", &path))
        }
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Re-applies one log record at open.
fn replay(
    geo: &Geometry,
    data: &File,
    path: &Path,
    slots: &mut [Slot],
    kept: &mut BTreeMap<UpdateId, Kept>,
    rec: WalRecord,
) -> Result<(), StoreError> {
    let stripe_of = |s: StripeId| (s < geo.stripes()).then_some(s as usize);
    match rec.ctrl {
        WalCtrl::Apply {
            stripe,
            ids,
            versions,
            offset,
            crc,
        } => {
            let Some(s) = stripe_of(stripe) else {
                return Ok(());
            };
            if offset as usize + rec.data.len() > geo.block_size || versions.len() != geo.k {
                return Ok(());
            }
            data.write_all_at(&rec.data, stripe * geo.block_size as u64 + offset as u64)
                .map_err(io_err("replay into", path))?;
            let slot = &mut slots[s];
            slot.versions = versions;
            slot.crc = crc;
            slot.written = true;
            slot.corrupt = false;
            for id in ids {
                slot.pending.retain(|p| p.id != id);
                push_recent(&mut slot.recent, id);
            }
            let vs = slot.versions.clone();
            slot.pending.retain(|p| p.version > vs[p.index as usize]);
        }
        WalCtrl::Pending {
            stripe,
            id,
            index,
            version,
            base,
            offset,
        } => {
            let Some(s) = stripe_of(stripe) else {
                return Ok(());
            };
            let slot = &mut slots[s];
            if index as usize >= geo.k || base >= version {
                return Ok(());
            }
            let done = version <= slot.versions[index as usize];
            if !done && !slot.pending.iter().any(|p| p.id == id) {
                slot.known[index as usize] = slot.known[index as usize].max(version);
                slot.pending.push(Pending {
                    id,
                    index,
                    version,
                    base,
                    offset,
                    delta: rec.data,
                });
            }
        }
        WalCtrl::Drop { stripe, id } => {
            if let Some(s) = stripe_of(stripe) {
                slots[s].pending.retain(|p| p.id != id);
            }
        }
        WalCtrl::Kept { stripe, update } => {
            let fits = (update.index as usize) < geo.k
                && update.len as usize == rec.data.len()
                && update.offset as usize + rec.data.len() <= geo.block_size
                && update.version > 0
                && update.base < update.version;
            // Only a parity member keeps updates.
            let parity = stripe_of(stripe)
                .is_some_and(|s| slots[s].member && slots[s].position as usize >= geo.k);
            if parity && fits {
                kept.insert(
                    update.id,
                    Kept {
                        stripe,
                        update,
                        delta: rec.data,
                        // Restored into the node's unsettled set at its start.
                        adopted: true,
                    },
                );
            }
        }
    }
    Ok(())
}

/// Appends a record to the batch's log buffer.
fn log_record(log: &mut BytesMut, rec: &WalRecord) -> Result<(), WireError> {
    // Records are bounded by the frame limits checked on receipt, so this cannot fail
    // for a request that passed validation.
    wal::encode_record(rec, log).map_err(|_| WireError::Invalid {
        what: drs_proto::error::InvalidReason::Unexpected,
    })
}

impl Kept {
    /// The log record that keeps this update until it is settled.
    fn record(&self) -> WalRecord {
        WalRecord {
            ctrl: WalCtrl::Kept {
                stripe: self.stripe,
                update: self.update,
            },
            data: self.delta.clone(),
        }
    }
}

impl Pending {
    /// The log record that holds this update until it is applied.
    fn record(&self, stripe: StripeId) -> WalRecord {
        WalRecord {
            ctrl: WalCtrl::Pending {
                stripe,
                id: self.id,
                index: self.index,
                version: self.version,
                base: self.base,
                offset: self.offset,
            },
            data: self.delta.clone(),
        }
    }
}

fn lock_kept(
    m: &Mutex<BTreeMap<UpdateId, Kept>>,
) -> std::sync::MutexGuard<'_, BTreeMap<UpdateId, Kept>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn push_recent(recent: &mut VecDeque<UpdateId>, id: UpdateId) {
    if recent.len() >= RECENT_IDS {
        recent.pop_front();
    }
    recent.push_back(id);
}

/// The writer thread: the only code that changes slots, the log and the data file.
struct Writer {
    store: std::sync::Weak<VolumeStore>,
    wal: Wal,
    /// The log's length after the last checkpoint (0 until the first: a long log
    /// replayed at open is checkpointed at the first batch past the size).
    floor: u64,
    wal_path: PathBuf,
    rx: mpsc::Receiver<Job>,
}

/// A slot as the writer sees it during one group commit.
struct Work {
    slot: Slot,
    /// The whole block, loaded on first use.
    block: Option<Vec<u8>>,
    /// Byte range changed in this batch.
    dirty: Option<(usize, usize)>,
    changed: bool,
    /// Pending updates the slot had before the batch.
    pending_before: usize,
    /// Updates applied in this batch, logged together by [`Work::log_applied`].
    applied: Vec<UpdateId>,
}

/// An answer to send once the batch is durable.
enum Answer {
    Update(
        oneshot::Sender<Result<Applied, WireError>>,
        Result<Applied, WireError>,
    ),
    Install(
        oneshot::Sender<Result<bool, WireError>>,
        Result<bool, WireError>,
    ),
}

impl Work {
    /// Logs the after-image of what this batch's updates changed, with their ids, and
    /// sets the block's checksum.
    fn log_applied(&mut self, stripe: StripeId, log: &mut BytesMut) -> Result<(), WireError> {
        if self.applied.is_empty() {
            return Ok(());
        }
        let (Some(block), Some((a, b))) = (&self.block, self.dirty) else {
            return Ok(());
        };
        let crc = crc32fast::hash(block);
        self.slot.crc = crc;
        let ctrl = WalCtrl::Apply {
            stripe,
            ids: std::mem::take(&mut self.applied),
            versions: self.slot.versions.clone(),
            offset: a as u32,
            crc,
        };
        let whole = a == 0 && b == block.len();
        wal::encode_parts(&ctrl, &block[a..b], whole.then_some(crc), log).map_err(|_| {
            WireError::Invalid {
                what: drs_proto::error::InvalidReason::Unexpected,
            }
        })
    }
}

impl Writer {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut jobs = Vec::with_capacity(16);
            let mut bytes = first.bytes();
            jobs.push(first);
            while jobs.len() < BATCH_JOBS && bytes < BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(j) => {
                        bytes += j.bytes();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let Some(store) = self.store.upgrade() else {
                return;
            };
            self.batch(&store, jobs);
            // What a checkpoint leaves in the log (pending and kept updates) is
            // rewritten by the next one: wait for at least as much new log, so
            // a node with many kept updates (a data node down for minutes) does
            // not rewrite them every few batches.
            let floor = self.floor;
            if self.wal.len() > floor + store.cfg.checkpoint_bytes.max(floor) {
                if let Err(e) = self.checkpoint(&store) {
                    tracing::error!(error = %e, "checkpoint failed");
                }
            }
        }
    }

    fn batch(&mut self, store: &VolumeStore, jobs: Vec<Job>) {
        let mut work: HashMap<StripeId, Work> = HashMap::new();
        let mut log = BytesMut::new();
        let mut answers: Vec<Answer> = Vec::with_capacity(jobs.len());
        let mut checkpoints = Vec::new();
        let mut kept = Vec::new();
        let pending_start = store.stats.pending.load(Ordering::Relaxed) as usize;
        let mut pending_total = pending_start;
        let now = Instant::now();
        for job in jobs {
            match job {
                Job::Update {
                    stripe,
                    update,
                    delta,
                    keep,
                    deadline,
                    reply,
                } => {
                    if now > deadline {
                        answers.push(Answer::Update(reply, Err(WireError::Timeout)));
                        continue;
                    }
                    let w = work_for(&mut work, store, stripe);
                    let res = self.update(
                        store,
                        w,
                        stripe,
                        &update,
                        delta.clone(),
                        &mut log,
                        &mut pending_total,
                    );
                    if keep && res.is_ok() {
                        // Logged after the batch's `Apply` records: a torn tail never
                        // keeps an update whose change it lost.
                        kept.push(Kept {
                            stripe,
                            update,
                            delta,
                            adopted: false,
                        });
                    }
                    answers.push(Answer::Update(reply, res));
                }
                Job::Install {
                    stripe,
                    versions,
                    data,
                    force,
                    reply,
                } => {
                    let w = work_for(&mut work, store, stripe);
                    let res = self.install(store, w, stripe, versions, data, force, &mut log);
                    answers.push(Answer::Install(reply, res));
                }
                Job::Checkpoint { reply } => checkpoints.push(reply),
            }
        }

        let mut failure: Option<WireError> = None;
        for (stripe, w) in work.iter_mut() {
            if let Err(e) = w.log_applied(*stripe, &mut log) {
                // Not logged: nothing of this batch may be applied or answered as done.
                tracing::error!(stripe, error = %e, "cannot encode a log record");
                failure = Some(e);
                break;
            }
        }
        if failure.is_none() {
            for k in &kept {
                if let Err(e) = log_record(&mut log, &k.record()) {
                    tracing::error!(stripe = k.stripe, error = ?e, "cannot encode a log record");
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_some() {
            log.clear();
        } else if !log.is_empty() {
            let r = self.wal.append(&log).and_then(|_| self.wal.sync());
            store.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            store
                .stats
                .wal_bytes
                .store(self.wal.len(), Ordering::Relaxed);
            if let Err(e) = r {
                tracing::error!(error = %e, "write-ahead log append failed; batch refused");
                failure = Some(match &e {
                    wal::WalError::Io { source, .. } => io_wire(source),
                    _ => WireError::Io {
                        kind: e.to_string(),
                    },
                });
            }
        }
        if failure.is_none() {
            let mut held = lock_kept(&store.kept);
            for k in kept {
                // A duplicate keeps the entry (and its adoption) it already has.
                held.entry(k.update.id).or_insert(k);
            }
            drop(held);
            let mut pending_now = pending_start;
            for w in work.values() {
                pending_now = (pending_now + w.slot.pending.len()).saturating_sub(w.pending_before);
            }
            store
                .stats
                .pending
                .store(pending_now as u64, Ordering::Relaxed);
            for (stripe, w) in work {
                if !w.changed {
                    continue;
                }
                if let Err(e) = commit(store, stripe, w) {
                    // The log holds the change; a restart re-applies it. Until then
                    // refuse to pretend it happened.
                    tracing::error!(stripe, error = %e, "applying a logged change to the data file failed");
                    failure = Some(io_wire(&e));
                }
            }
        }
        for a in answers {
            match a {
                Answer::Update(tx, res) => {
                    let res = match (&failure, res) {
                        (Some(f), Ok(_)) => Err(f.clone()),
                        (_, r) => r,
                    };
                    if res.is_ok() {
                        store.stats.updates.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = tx.send(res);
                }
                Answer::Install(tx, res) => {
                    let res = match (&failure, res) {
                        (Some(f), Ok(_)) => Err(f.clone()),
                        (_, r) => r,
                    };
                    if matches!(res, Ok(true)) {
                        store
                            .stats
                            .repairs_installed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = tx.send(res);
                }
            }
        }
        store.applied.send_modify(|n| *n += 1);
        for tx in checkpoints {
            let r = self.checkpoint(store).map_err(|e| WireError::Io {
                kind: e.to_string(),
            });
            let _ = tx.send(r);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn update(
        &mut self,
        store: &VolumeStore,
        w: &mut Work,
        stripe: StripeId,
        u: &BlockUpdate,
        delta: Bytes,
        log: &mut BytesMut,
        pending_total: &mut usize,
    ) -> Result<Applied, WireError> {
        let slot = &mut w.slot;
        if slot.recent.contains(&u.id) || slot.pending.iter().any(|p| p.id == u.id) {
            let applied = !slot.pending.iter().any(|p| p.id == u.id);
            return Ok(Applied {
                applied,
                duplicate: true,
            });
        }
        let i = u.index as usize;
        let cur = slot.versions[i];
        // A rebuild installed the state this update made (it reached the members the
        // rebuild read from first): answered as a duplicate, or the writer would count
        // this member as failing its part of a write it holds. Only the version the
        // install brought the block to: each version is given out once, so the
        // installed bytes hold exactly that update. A version it jumped over may be a
        // void one (a fenced holder's, skipped by the next writer) that no block holds.
        let reflected = slot
            .installed
            .iter()
            .any(|&(ix, from, to)| ix == u.index && from < u.version && u.version == to);
        if u.version <= cur && reflected && !store.is_skipped(stripe, u.index, u.version) {
            push_recent(&mut slot.recent, u.id);
            return Ok(Applied {
                applied: true,
                duplicate: true,
            });
        }
        if u.version <= cur {
            return Err(WireError::StaleVersion {
                stripe,
                index: u.index,
                current: cur,
                got: u.version,
            });
        }
        // A version the owner of a lock granted here skipped (a fenced holder's,
        // void): never applied, even when it fits the block, or it would stand where
        // the update built past it belongs (checked on the live slot, which grants
        // and updates' admissions change).
        if store.is_skipped(stripe, u.index, u.version) {
            tracing::info!(
                stripe,
                index = u.index,
                version = u.version,
                "refusing a version a lock granted here skipped (a fenced client's, void)"
            );
            return Err(WireError::StaleVersion {
                stripe,
                index: u.index,
                current: cur,
                got: u.version,
            });
        }
        slot.known[i] = slot.known[i].max(u.version);
        let p = Pending {
            id: u.id,
            index: u.index,
            version: u.version,
            base: u.base,
            offset: u.offset,
            delta,
        };
        let applicable = !slot.corrupt && p.base == cur;
        if cur > p.base {
            // This block holds a version the writer did not build on: one given out by
            // a client that was fenced, which reached this node only (it was down or
            // cut off), and which the other members skipped. The update waits, the
            // slot is behind, and the stuck-block rebuild replaces the block with the
            // stripe's.
            tracing::warn!(
                stripe,
                index = u.index,
                have = cur,
                base = p.base,
                version = p.version,
                "block holds a version the stripe skipped (a dead client's update that reached only this node); it will be rebuilt"
            );
        }
        if !applicable {
            if *pending_total >= store.cfg.max_pending {
                return Err(WireError::Busy);
            }
            log_record(log, &p.record(stripe))?;
            w.slot.pending.push(p);
            w.changed = true;
            *pending_total += 1;
            return Ok(Applied {
                applied: false,
                duplicate: false,
            });
        }
        let applied = self.apply(store, w, stripe, p, log)?;
        self.drain_pending(store, w, stripe, log)?;
        Ok(Applied {
            applied,
            duplicate: false,
        })
    }

    /// Applies pending updates of the slot that became applicable.
    fn drain_pending(
        &mut self,
        store: &VolumeStore,
        w: &mut Work,
        stripe: StripeId,
        log: &mut BytesMut,
    ) -> Result<(), WireError> {
        loop {
            if w.slot.corrupt {
                return Ok(());
            }
            let vs = &w.slot.versions;
            let Some(idx) = w
                .slot
                .pending
                .iter()
                .position(|p| p.base == vs[p.index as usize])
            else {
                return Ok(());
            };
            let p = w.slot.pending.remove(idx);
            if !self.apply(store, w, stripe, p, log)? {
                return Ok(());
            }
        }
    }

    /// Applies one update to the batch's copy of the block and logs its after-image.
    /// Returns false when the block turned out corrupt: the update is then held
    /// pending until the block is repaired.
    fn apply(
        &mut self,
        store: &VolumeStore,
        w: &mut Work,
        stripe: StripeId,
        p: Pending,
        log: &mut BytesMut,
    ) -> Result<bool, WireError> {
        let geo = &store.geo;
        if w.block.is_none() {
            let mut b = vec![0u8; geo.block_size];
            // A block never written is all zeros: no need to read it.
            if w.slot.written {
                store
                    .data
                    .read_exact_at(&mut b, stripe * geo.block_size as u64)
                    .map_err(|e| io_wire(&e))?;
            }
            if crc32fast::hash(&b) != w.slot.crc {
                // Never fold a delta into bytes we know are wrong: hold the update
                // until the block is repaired.
                w.slot.corrupt = true;
                w.changed = true;
                store.stats.corrupt_found.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    stripe,
                    "block failed its checksum while applying an update; held until repaired"
                );
                log_record(log, &p.record(stripe))?;
                w.slot.pending.push(p);
                return Ok(false);
            }
            w.block = Some(b);
        }
        let Some(block) = w.block.as_mut() else {
            return Ok(false);
        };
        let (o, n) = (p.offset as usize, p.delta.len());
        let position = w.slot.position as usize;
        // What this block changes by: the delta itself, or for a parity block the
        // data delta scaled by its coefficient.
        let effect = if position < geo.k {
            p.delta.clone()
        } else {
            let c = store
                .codec
                .coefficients()
                .get(position - geo.k, p.index as usize);
            let mut e = vec![0u8; n];
            let _ = Codec::mul_xor(c, &p.delta, &mut e);
            Bytes::from(e)
        };
        Codec::xor_into(&effect, &mut block[o..o + n]).map_err(|_| WireError::BadRange {
            offset: p.offset,
            len: n as u32,
            block_size: geo.block_size as u32,
        })?;
        let before = w.slot.versions.clone();
        w.slot.versions[p.index as usize] = p.version;
        w.slot.written = true;
        w.applied.push(p.id);
        store
            .stats
            .bytes_updated
            .fetch_add(n as u64, Ordering::Relaxed);
        w.dirty = Some(match w.dirty {
            None => (o, o + n),
            Some((a, b)) => (a.min(o), b.max(o + n)),
        });
        w.changed = true;
        push_recent(&mut w.slot.recent, p.id);
        // Keep the effect for as-of reads while the store's undo budget allows.
        if store.undo_total.load(Ordering::Relaxed) + n <= store.cfg.undo_bytes {
            if w.slot.undo.len() >= UNDO_PER_SLOT {
                w.slot.undo.pop_front();
            }
            // A copy: the received bytes share their allocation with the whole frame.
            let delta = Bytes::copy_from_slice(&effect);
            w.slot.undo.push_back(Undo {
                before,
                offset: p.offset,
                delta,
            });
        } else {
            w.slot.undo.clear();
        }
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        store: &VolumeStore,
        w: &mut Work,
        stripe: StripeId,
        versions: Vec<Version>,
        data: Bytes,
        force: bool,
        log: &mut BytesMut,
    ) -> Result<bool, WireError> {
        let tracked = store.tracked(w.slot.position);
        let cur = &w.slot.versions;
        let behind = tracked.clone().any(|i| cur[i] < versions[i]);
        let ahead = tracked.clone().any(|i| cur[i] > versions[i]);
        if ahead {
            return Err(WireError::VersionUnavailable {
                stripe,
                wanted: versions,
                current: cur.clone(),
            });
        }
        if !behind && !w.slot.corrupt && !force {
            return Ok(false);
        }
        tracing::debug!(
            stripe,
            from = ?w.slot.versions,
            to = ?versions,
            force,
            "installing a whole block"
        );
        let mut vs = w.slot.versions.clone();
        for i in tracked.clone() {
            vs[i] = versions[i];
            if vs[i] > w.slot.versions[i] {
                if w.slot.installed.len() >= INSTALLS_PER_SLOT {
                    w.slot.installed.remove(0);
                }
                w.slot.installed.push((i as u8, w.slot.versions[i], vs[i]));
            }
        }
        let crc = crc32fast::hash(&data);
        let rec = WalRecord {
            ctrl: WalCtrl::Apply {
                stripe,
                ids: Vec::new(),
                versions: vs.clone(),
                offset: 0,
                crc,
            },
            data: data.clone(),
        };
        log_record(log, &rec)?;
        w.slot.versions = vs.clone();
        w.slot.crc = crc;
        w.slot.written = true;
        w.slot.corrupt = false;
        w.slot.undo.clear();
        for i in tracked {
            w.slot.known[i] = w.slot.known[i].max(vs[i]);
        }
        w.block = Some(data.to_vec());
        w.dirty = Some((0, store.geo.block_size));
        w.changed = true;
        // Pending updates the installed block already reflects are dropped.
        let (keep, drop): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut w.slot.pending)
            .into_iter()
            .partition(|p| p.version > vs[p.index as usize]);
        for p in &drop {
            let rec = WalRecord {
                ctrl: WalCtrl::Drop { stripe, id: p.id },
                data: Bytes::new(),
            };
            log_record(log, &rec)?;
        }
        w.slot.pending = keep;
        self.drain_pending(store, w, stripe, log)?;
        Ok(true)
    }

    /// Makes the data file durable, persists every header, and starts a new log that
    /// holds only the still-pending updates.
    fn checkpoint(&mut self, store: &VolumeStore) -> Result<(), StoreError> {
        store
            .data
            .sync_data()
            .map_err(io_err("sync", &store.data_path))?;
        let mut recs = Vec::with_capacity(store.slots.len());
        let mut pending = BytesMut::new();
        for s in 0..store.geo.stripes() {
            let slot = store.slot_read(s);
            let mut flags = 0;
            if slot.written {
                flags |= FLAG_WRITTEN;
            }
            if slot.corrupt {
                flags |= FLAG_CORRUPT;
            }
            recs.push(HeaderRecord {
                position: slot.position,
                flags,
                crc: slot.crc,
                versions: slot.versions.clone(),
            });
            for p in &slot.pending {
                wal::encode_record(&p.record(s), &mut pending)?;
            }
        }
        let kept: Vec<Kept> = lock_kept(&store.kept).values().cloned().collect();
        for k in &kept {
            wal::encode_record(&k.record(), &mut pending)?;
        }
        let table = headers::encode(store.geo.k, &recs);
        let hpath = store.cfg.dir.join("headers");
        headers::write_atomic(&hpath, &table).map_err(io_err("write", &hpath))?;
        let next = self.wal_path.with_extension("next");
        let _ = std::fs::remove_file(&next);
        {
            let (mut w, _, _) = Wal::open(&next)?;
            w.append(&pending)?;
            w.sync()?;
        }
        std::fs::rename(&next, &self.wal_path).map_err(io_err("rename", &next))?;
        if let Some(dir) = self.wal_path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", dir))?;
        }
        let (w, _, _) = Wal::open(&self.wal_path)?;
        self.wal = w;
        self.floor = self.wal.len();
        store
            .stats
            .wal_bytes
            .store(self.wal.len(), Ordering::Relaxed);
        tracing::debug!(wal = %self.wal.path().display(), "checkpoint done");
        Ok(())
    }
}

fn work_for<'a>(
    work: &'a mut HashMap<StripeId, Work>,
    store: &VolumeStore,
    stripe: StripeId,
) -> &'a mut Work {
    work.entry(stripe).or_insert_with(|| {
        let slot = store.slot_info_for_writer(stripe);
        let pending_before = slot.pending.len();
        Work {
            slot,
            block: None,
            dirty: None,
            changed: false,
            pending_before,
            applied: Vec::new(),
        }
    })
}

/// Writes the batch's changes of one slot to the data file and publishes them.
fn commit(store: &VolumeStore, stripe: StripeId, w: Work) -> std::io::Result<()> {
    let mut slot = store.slot_write(stripe);
    if let (Some(block), Some((a, b))) = (&w.block, w.dirty) {
        store.data.write_all_at(
            &block[a..b],
            stripe * store.geo.block_size as u64 + a as u64,
        )?;
    }
    // `verified` belongs to recovery, and while the batch ran unlocks may have raised
    // `known`, fences `fenced`, and grants added to `skipped`: keep them.
    let undo_bytes = |s: &Slot| s.undo.iter().map(|u| u.delta.len()).sum::<usize>();
    let (was, now) = (undo_bytes(&slot), undo_bytes(&w.slot));
    if now >= was {
        store.undo_total.fetch_add(now - was, Ordering::Relaxed);
    } else {
        store.undo_total.fetch_sub(was - now, Ordering::Relaxed);
    }
    let verified = slot.verified;
    let known = std::mem::take(&mut slot.known);
    let fenced = std::mem::take(&mut slot.fenced);
    let skipped = std::mem::take(&mut slot.skipped);
    let since = slot.behind_since;
    *slot = w.slot;
    slot.verified = verified;
    slot.skipped = skipped;
    for (k, old) in slot.known.iter_mut().zip(known) {
        *k = (*k).max(old);
    }
    for (f, old) in slot.fenced.iter_mut().zip(fenced) {
        *f = (*f).max(old);
    }
    let tracked = tracked_range(&store.geo, slot.position);
    slot.behind_since = if slot.is_behind(tracked) {
        since.or(Some(Instant::now()))
    } else {
        None
    };
    Ok(())
}

#[cfg(test)]
mod tests;
