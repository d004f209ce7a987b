//! openraft storage on one redb database: the log, the vote, the committed log id, the
//! purge marker, the state machine and the current snapshot.
//!
//! Tables (file `meta.redb` in the replica's directory):
//! - `raft_log`: log index -> postcard of the openraft entry.
//! - `raft_meta`: `vote`, `committed`, `purged` (last purged log id), `state_head`
//!   (the last applied log id and last membership, the [`MetaState`], the remembered
//!   answers, and the file system's [`FsHead`]: counters, sessions, held freeings) and
//!   `snapshot` (the current snapshot's metadata and bytes).
//! - `fs_inodes`: inode number -> postcard of the [`Inode`].
//! - `fs_free`: first block of a free run -> its length.
//!
//! The state machine is persisted every `persist_every` applied entries and before a
//! snapshot is built: one transaction writes the head and the inodes and free runs
//! that changed since the last time ([`FsState::take_changes`]), so its cost follows
//! what changed (a changed directory is rewritten with all its entries), not the
//! size of the namespace. On restart openraft applies the log entries after the
//! persisted position again. A persist that failed leaves the state machine unable
//! to persist until it restarts: the changes it took are in neither place. A
//! database of the earlier layout (the whole state machine in one `state_machine`
//! record) is rewritten in this one when it is opened.
//!
//! A snapshot is the postcard encoding of the whole state machine ([`SmData`]), sent in
//! chunks when it does not fit one frame. It is encoded from the records a read
//! transaction sees, opened when openraft asks for a snapshot just after the state
//! machine was persisted, on the blocking pool: applying goes on meanwhile, and the
//! namespace is not copied in memory. Installing one replaces the state machine's
//! records and the current snapshot in one transaction. Writes are committed durably
//! (fsync) before they are reported done, except the committed log id, which openraft
//! only needs as a hint and which becomes durable with the next write.
//!
//! Everything read back from disk is size-checked and decoded into typed errors
//! ([`StoreError`]); nothing on this path panics on bad data. redb checks the integrity
//! of the file when it is opened. All database work runs on the blocking thread pool.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState,
    OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::fs::{FsHead, FsState, Ino, Inode, SharedFs};
use crate::locks::LockTable;
use crate::state::{Answered, MetaCommand, MetaResponse, MetaState, ReplicaId};
use crate::TypeConfig;

/// The database file inside a replica's directory.
pub const DB_FILE: &str = "meta.redb";
/// Largest log entry (and vote, marker) read back from or written to the database. It
/// matches the transport's frame limit, so any entry stored can also be sent.
pub const MAX_RECORD_LEN: usize = crate::net::MAX_FRAME_LEN - 64 * 1024;
/// Largest record of the state machine (its head, one inode) and largest snapshot.
/// Snapshots travel in chunks, so this bound is the memory a replica gives one, not
/// the frame's.
pub const MAX_STATE_LEN: usize = 1 << 30;
/// Budget of one replication batch read by [`RaftLogReader::limited_get_log_entries`].
/// openraft gives an AppendEntries one heartbeat interval (150 ms by default) to
/// come back, so a batch stays small enough to cross in that time even while the
/// receiver is busy: a follower whose batches always time out never catches up.
const REPLICATION_BATCH_BYTES: usize = 1 << 20;
/// redb page cache: the metadata is small.
const CACHE_BYTES: usize = 16 << 20;
/// How long `open` waits for a previous instance in this process to release the file.
const OPEN_RETRY: Duration = Duration::from_secs(5);

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";
/// The earlier layout's whole state machine record, migrated when found.
const KEY_SM: &str = "state_machine";
const KEY_HEAD: &str = "state_head";
const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("fs_inodes");
const FREE: TableDefinition<u64, u64> = TableDefinition::new("fs_free");
const KEY_SNAPSHOT: &str = "snapshot";
/// The mounts' byte-range locks ([`LockTable`]), absent while there are none yet.
const KEY_LOCKS: &str = "fs_locks";

type NodeId = u64;
type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("stored record {what} is corrupt: {source}")]
    Decode {
        what: String,
        source: postcard::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("record {what} is {len} bytes, more than the limit of {limit}")]
    TooLarge {
        what: String,
        len: usize,
        limit: usize,
    },
    #[error("log entry stored at index {key} says it is index {index}")]
    Misplaced { key: u64, index: u64 },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("an earlier persist of the state machine failed; restart the replica")]
    Unpersisted,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Encoding a snapshot piece by piece ([`snapshot_from`]).
impl From<postcard::Error> for StoreError {
    fn from(source: postcard::Error) -> Self {
        StoreError::Encode {
            what: "snapshot data",
            source,
        }
    }
}

impl StoreError {
    fn into_raft(self, subject: ErrorSubject<NodeId>, verb: ErrorVerb) -> StorageError<NodeId> {
        StorageError::IO {
            source: StorageIOError::new(subject, verb, AnyError::new(&self)),
        }
    }
}

/// The state machine record: the state with the position it was applied up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    pub state: MetaState,
    /// Answers to recent proposals, so a retried one is not applied twice.
    #[serde(default)]
    pub answered: Answered,
    /// The file system namespace.
    pub fs: SharedFs,
}

/// The state machine record less the inodes and free runs, as written.
#[derive(Serialize)]
struct HeadRef<'a> {
    last_applied: &'a Option<LogId<NodeId>>,
    last_membership: &'a StoredMembership<NodeId, BasicNode>,
    state: &'a MetaState,
    answered: &'a Answered,
    fs: &'a FsHead,
}

/// [`HeadRef`] as read back (the same fields in the same order).
#[derive(Deserialize)]
struct Head {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
    state: MetaState,
    answered: Answered,
    fs: FsHead,
}

/// One persist of the state machine, encoded: the head, and the inodes and free runs
/// to write (`Some`) or delete (`None`); `whole` clears both tables first.
struct Persist {
    head: Vec<u8>,
    /// The lock table, if it changed.
    locks: Option<Vec<u8>>,
    inodes: Vec<(Ino, Option<Vec<u8>>)>,
    free: Vec<(u64, Option<u64>)>,
    whole: bool,
}

impl Persist {
    /// What changed in `sm` since the last persist, or all of it (`whole`).
    fn of(sm: &SmData, whole: bool) -> Result<Persist, StoreError> {
        let mut fs = sm.fs.write();
        let changes = fs.take_changes();
        let locks_changed = fs.take_locks_changed();
        let locks = if whole || locks_changed {
            Some(encode_state("locks", fs.locks())?)
        } else {
            None
        };
        let head = encode_state(
            "state head",
            &HeadRef {
                last_applied: &sm.last_applied,
                last_membership: &sm.last_membership,
                state: &sm.state,
                answered: &sm.answered,
                fs: &fs.head(),
            },
        )?;
        let encode_inode = |ino: Ino, i: &Inode| encode_state("inode", i).map(|b| (ino, Some(b)));
        let (inodes, free) = if whole {
            let inodes = fs.inodes().iter().map(|(n, i)| encode_inode(*n, i));
            let free = fs.free_runs().iter().map(|(s, c)| (*s, Some(*c)));
            (inodes.collect::<Result<_, _>>()?, free.collect())
        } else {
            let inodes = changes.inodes.iter().map(|n| match fs.inode(*n) {
                Some(i) => encode_inode(*n, i),
                None => Ok((*n, None)),
            });
            let free = changes
                .free
                .iter()
                .map(|s| (*s, fs.free_runs().get(s).copied()));
            (inodes.collect::<Result<_, _>>()?, free.collect())
        };
        Ok(Persist {
            head,
            locks,
            inodes,
            free,
            whole,
        })
    }

    /// Writes it, with the current snapshot if one is given, in one durable
    /// transaction; the earlier layout's record goes.
    fn write(self, db: &Database, snapshot: Option<Vec<u8>>) -> Result<(), StoreError> {
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_HEAD, self.head.as_slice())?;
            if let Some(l) = &self.locks {
                meta.insert(KEY_LOCKS, l.as_slice())?;
            }
            meta.remove(KEY_SM)?;
            if let Some(s) = &snapshot {
                meta.insert(KEY_SNAPSHOT, s.as_slice())?;
            }
            let mut inodes = txn.open_table(INODES)?;
            let mut free = txn.open_table(FREE)?;
            if self.whole {
                inodes.retain(|_, _| false)?;
                free.retain(|_, _| false)?;
            }
            for (ino, bytes) in &self.inodes {
                match bytes {
                    Some(b) => inodes.insert(*ino, b.as_slice())?,
                    None => inodes.remove(*ino)?,
                };
            }
            for (start, count) in &self.free {
                match count {
                    Some(c) => free.insert(*start, *c)?,
                    None => free.remove(*start)?,
                };
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// Loads the state machine: from its records, or from the earlier layout's single
/// record (then `true`: it is to be rewritten), or empty.
fn load(db: &Database) -> Result<(SmData, bool), StoreError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    if let Some(v) = meta.get(KEY_HEAD)? {
        let head: Head = decode_state(KEY_HEAD, v.value())?;
        let mut inodes = std::collections::BTreeMap::new();
        for item in txn.open_table(INODES)?.iter()? {
            let (k, v) = item?;
            let ino = k.value();
            inodes.insert(ino, decode_state(&format!("inode {ino}"), v.value())?);
        }
        let mut free = std::collections::BTreeMap::new();
        for item in txn.open_table(FREE)?.iter()? {
            let (k, v) = item?;
            free.insert(k.value(), v.value());
        }
        let mut fs = FsState::from_parts(head.fs, inodes, free);
        if let Some(v) = meta.get(KEY_LOCKS)? {
            fs.set_locks(decode_locks(KEY_LOCKS, v.value())?);
        }
        let sm = SmData {
            last_applied: head.last_applied,
            last_membership: head.last_membership,
            state: head.state,
            answered: head.answered,
            fs: fs.into(),
        };
        return Ok((sm, false));
    }
    match meta.get(KEY_SM)? {
        Some(v) => Ok((decode_state(KEY_SM, v.value())?, true)),
        None => Ok((SmData::default(), false)),
    }
}

/// The current snapshot as stored.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

impl StoredSnapshot {
    /// The record of a snapshot, the bytes postcard makes of a `StoredSnapshot`,
    /// without copying `data` into one first.
    fn encode(meta: &SnapshotMeta<NodeId, BasicNode>, data: &[u8]) -> Result<Vec<u8>, StoreError> {
        let out = Vec::with_capacity(data.len().saturating_add(1024));
        // A byte vector is its length, then its bytes.
        let mut out = postcard::to_extend(&(meta, data.len()), out)?;
        out.extend_from_slice(data);
        if out.len() > MAX_STATE_LEN {
            return Err(StoreError::TooLarge {
                what: "snapshot".into(),
                len: out.len(),
                limit: MAX_STATE_LEN,
            });
        }
        Ok(out)
    }

    /// The metadata of a stored snapshot, without decoding its data.
    fn meta_of(bytes: &[u8]) -> Result<SnapshotMeta<NodeId, BasicNode>, StoreError> {
        postcard::take_from_bytes(bytes)
            .map(|(meta, _)| meta)
            .map_err(|source| StoreError::Decode {
                what: KEY_SNAPSHOT.to_owned(),
                source,
            })
    }
}

/// Opens (or creates) the database in `dir` and loads the state machine.
///
/// Returns the log store, the state machine, and a receiver that sees the state after
/// every applied batch or installed snapshot.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), StoreError> {
    let path = dir.join(DB_FILE);
    let started = Instant::now();
    let db = loop {
        let res = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(&path);
        match res {
            Ok(db) => break db,
            // A previous instance in this process may still be releasing the file.
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < OPEN_RETRY => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => return Err(StoreError::Open { path, source }),
        }
    };
    let txn = db.begin_write()?;
    {
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.open_table(INODES)?;
        txn.open_table(FREE)?;
    }
    txn.commit()?;
    let (sm, earlier_layout) = load(&db)?;
    if earlier_layout {
        Persist::of(&sm, true)?.write(&db, None)?;
        tracing::info!(path = %path.display(), "state machine rewritten in one record per inode");
    }
    let db = Arc::new(db);
    let (state_tx, _) = watch::channel(Arc::new(sm.state.clone()));
    Ok((
        LogStore { db: db.clone() },
        StateMachine {
            db,
            sm,
            state_tx,
            persist_every: 1,
            unpersisted: 0,
            failed: false,
        },
    ))
}

/// Decodes a log entry as the log table stores it (for tools and fuzzing).
pub fn decode_log_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, StoreError> {
    decode("log entry", bytes)
}

/// Decodes a snapshot as stored and as `InstallSnapshot` carries it (for tools and
/// fuzzing): the [`SmData`], then the mounts' byte-range locks, if there are any
/// (a snapshot of a state without locks is the `SmData` alone, as before locks
/// existed).
pub fn decode_snapshot(bytes: &[u8]) -> Result<SmData, StoreError> {
    decode_snapshot_as("snapshot", bytes)
}

fn decode_snapshot_as(what: &str, bytes: &[u8]) -> Result<SmData, StoreError> {
    if bytes.len() > MAX_STATE_LEN {
        return Err(StoreError::TooLarge {
            what: what.to_owned(),
            len: bytes.len(),
            limit: MAX_STATE_LEN,
        });
    }
    let (sm, rest): (SmData, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|source| StoreError::Decode {
            what: what.to_owned(),
            source,
        })?;
    if !rest.is_empty() {
        sm.fs.write().set_locks(decode_locks(what, rest)?);
    }
    Ok(sm)
}

/// The bytes of a snapshot of `sm`, as [`decode_snapshot`] reads them.
pub fn encode_snapshot(sm: &SmData) -> Result<Vec<u8>, StoreError> {
    let out = encode_state("snapshot data", sm)?;
    let fs = sm.fs.read();
    if fs.locks().is_empty() {
        return Ok(out);
    }
    Ok(postcard::to_extend(fs.locks(), out)?)
}

/// Decodes a lock table, which must have the shape its arithmetic relies on.
fn decode_locks(what: &str, bytes: &[u8]) -> Result<LockTable, StoreError> {
    let locks: LockTable = decode_state(what, bytes)?;
    locks
        .check_shape()
        .map_err(|e| StoreError::Snapshot(format!("{what}: the lock table is not valid: {e}")))?;
    Ok(locks)
}

/// Decodes a record of at most `limit` bytes.
fn decode_within<T: DeserializeOwned>(
    what: &str,
    bytes: &[u8],
    limit: usize,
) -> Result<T, StoreError> {
    if bytes.len() > limit {
        return Err(StoreError::TooLarge {
            what: what.to_owned(),
            len: bytes.len(),
            limit,
        });
    }
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode {
        what: what.to_owned(),
        source,
    })
}

/// Encodes a record of at most `limit` bytes.
fn encode_within<T: Serialize>(
    what: &'static str,
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, StoreError> {
    let bytes = postcard::to_stdvec(value).map_err(|source| StoreError::Encode { what, source })?;
    if bytes.len() > limit {
        return Err(StoreError::TooLarge {
            what: what.to_owned(),
            len: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// A log entry or marker ([`MAX_RECORD_LEN`]).
fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_within(what, bytes, MAX_RECORD_LEN)
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    encode_within(what, value, MAX_RECORD_LEN)
}

/// A state machine record or snapshot ([`MAX_STATE_LEN`]).
fn decode_state<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_within(what, bytes, MAX_STATE_LEN)
}

fn encode_state<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    encode_within(what, value, MAX_STATE_LEN)
}

fn get_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, StoreError> {
    get_meta_within(db, key, MAX_RECORD_LEN)
}

fn get_meta_within<T: DeserializeOwned>(
    db: &Database,
    key: &str,
    limit: usize,
) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(META)?;
    let value = table.get(key)?;
    match value {
        None => Ok(None),
        Some(v) => decode_within(key, v.value(), limit).map(Some),
    }
}

fn put_meta(
    db: &Database,
    items: &[(&str, &[u8])],
    durability: Durability,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    {
        let mut table = txn.open_table(META)?;
        for (k, v) in items {
            table.insert(*k, *v)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Runs database work on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// `[start, end)` of a range of log indexes, or `None` if it is empty.
fn index_range<RB: RangeBounds<u64>>(range: &RB) -> Option<(u64, u64)> {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start < end).then_some((start, end))
}

/// Reads entries in `[start, end)`, stopping after `budget` bytes (at least one entry).
fn read_entries(
    db: &Database,
    start: u64,
    end: u64,
    budget: Option<usize>,
) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(LOG)?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for item in table.range(start..end)? {
        let (k, v) = item?;
        let key = k.value();
        let raw = v.value();
        let entry: Entry<TypeConfig> = decode(&format!("log entry {key}"), raw)?;
        if entry.log_id.index != key {
            return Err(StoreError::Misplaced {
                key,
                index: entry.log_id.index,
            });
        }
        bytes = bytes.saturating_add(raw.len());
        out.push(entry);
        if budget.is_some_and(|b| bytes >= b) {
            break;
        }
    }
    Ok(out)
}

/// The Raft log, vote and committed/purged markers. Clones share the database and serve
/// as log readers.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// A handle that tells when every user of the database has let it go (after the
    /// Raft instance using it has shut down).
    pub fn db_weak(&self) -> Weak<Database> {
        Arc::downgrade(&self.db)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let Some((start, end)) = index_range(&range) else {
            return Ok(Vec::new());
        };
        let db = self.db.clone();
        blocking(move || read_entries(&db, start, end, None))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let db = self.db.clone();
        blocking(move || read_entries(&db, start, end, Some(REPLICATION_BATCH_BYTES)))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let db = self.db.clone();
        blocking(move || {
            let purged: Option<LogId<NodeId>> = get_meta(&db, KEY_PURGED)?;
            let txn = db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let last = match table.last()? {
                None => None,
                Some((k, v)) => {
                    let key = k.value();
                    let entry: Entry<TypeConfig> = decode(&format!("log entry {key}"), v.value())?;
                    Some(entry.log_id)
                }
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last.or(purged),
            })
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        let bytes =
            encode("vote", vote).map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))?;
        blocking(move || put_meta(&db, &[(KEY_VOTE, &bytes)], Durability::Immediate))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        let db = self.db.clone();
        blocking(move || get_meta(&db, KEY_VOTE))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let db = self.db.clone();
        let bytes = encode("committed", &committed)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))?;
        // A hint: the state machine is persisted every `persist_every` entries with the
        // id it reached, so losing the latest value in a crash only means re-applying
        // from an older id (the log holds every committed entry since).
        blocking(move || put_meta(&db, &[(KEY_COMMITTED, &bytes)], Durability::None))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let db = self.db.clone();
        blocking(move || Ok(get_meta::<Option<LogId<NodeId>>>(&db, KEY_COMMITTED)?.flatten()))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = encode("log entry", &entry)
                .map_err(|e| e.into_raft(ErrorSubject::Log(entry.log_id), ErrorVerb::Write))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(LOG)?;
                table.retain_in(log_id.index.., |_, _| false)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let db = self.db.clone();
        let marker = encode("purged", &log_id)
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))?;
        blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                meta.insert(KEY_PURGED, marker.as_slice())?;
                let mut table = txn.open_table(LOG)?;
                table.retain_in(..=log_id.index, |_, _| false)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}

/// The state machine: the applied [`MetaState`] and file system, persisted every
/// `persist_every` applied entries and with each snapshot.
pub struct StateMachine {
    db: Arc<Database>,
    sm: SmData,
    state_tx: watch::Sender<Arc<MetaState>>,
    /// Persist the state machine after this many applied entries.
    persist_every: u64,
    /// Entries applied since it was last persisted.
    unpersisted: u64,
    /// A persist failed: the changes it took are not on disk and not noted any more,
    /// so no later persist may write a head that claims them. Cleared by a restart
    /// (which loads what is on disk and replays the log) or an installed snapshot.
    failed: bool,
}

impl StateMachine {
    /// Sees the state after each applied batch or installed snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaState>> {
        self.state_tx.subscribe()
    }

    /// Persists the state machine only every `n` applied entries (default 1: every
    /// batch). Entries applied since are in the Raft log, which keeps them until a
    /// snapshot holds them, and the state machine is persisted before a snapshot is
    /// built; on restart openraft applies them again. Each persist is one durable
    /// transaction (an fsync) writing the head and what changed.
    pub fn set_persist_every(&mut self, n: u64) {
        self.persist_every = n.max(1);
    }

    /// The file system state, shared (not a copy): read it after a linearizable read.
    pub fn fs(&self) -> SharedFs {
        self.sm.fs.share()
    }

    /// The state machine as loaded or last applied.
    pub fn data(&self) -> &SmData {
        &self.sm
    }

    fn publish(&self) {
        let state = &self.sm.state;
        self.state_tx.send_if_modified(|cur| {
            if **cur == *state {
                false
            } else {
                *cur = Arc::new(state.clone());
                true
            }
        });
    }

    /// Writes the head and the inodes and free runs changed since the last persist.
    async fn persist(&mut self) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Unpersisted);
        }
        // The changes are taken before the write: failing here or there loses them.
        self.failed = true;
        let persist = Persist::of(&self.sm, false)?;
        let db = self.db.clone();
        blocking(move || persist.write(&db, None)).await?;
        self.failed = false;
        self.unpersisted = 0;
        Ok(())
    }
}

/// The voters of a membership with their addresses (unparsable addresses are skipped).
fn replicas_of(
    membership: &openraft::Membership<NodeId, BasicNode>,
) -> std::collections::BTreeMap<ReplicaId, std::net::SocketAddr> {
    membership
        .voter_ids()
        .filter_map(|id| {
            let node = membership.get_node(&id)?;
            match node.addr.parse() {
                Ok(addr) => Some((id, addr)),
                Err(_) => {
                    tracing::warn!(replica = id, addr = %node.addr, "unparsable replica address");
                    None
                }
            }
        })
        .collect()
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        Ok((self.sm.last_applied, self.sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<MetaResponse>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            self.sm.last_applied = Some(entry.log_id);
            let unchanged = MetaResponse::Unchanged {
                epoch: self.sm.state.epoch,
            };
            match entry.payload {
                EntryPayload::Blank => responses.push(unchanged),
                EntryPayload::Normal(p) => {
                    let resp = match &p.cmd {
                        MetaCommand::Fs(c) => {
                            let fs = &self.sm.fs;
                            self.sm
                                .answered
                                .apply_with(p.nonce, || MetaResponse::Fs(fs.write().apply(c)))
                        }
                        _ => self.sm.answered.apply(&mut self.sm.state, &p),
                    };
                    tracing::debug!(index = entry.log_id.index, ?p, ?resp, "applied");
                    responses.push(resp);
                }
                EntryPayload::Membership(m) => {
                    self.sm.state.set_replicas(replicas_of(&m));
                    self.sm.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(unchanged);
                }
            }
        }
        if responses.is_empty() {
            return Ok(responses);
        }
        self.unpersisted += responses.len() as u64;
        if self.unpersisted >= self.persist_every {
            self.persist()
                .await
                .map_err(|e| e.into_raft(ErrorSubject::StateMachine, ErrorVerb::Write))?;
        }
        self.publish();
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // openraft purges the log up to the snapshot once it is built: the persisted
        // state machine must not need those entries.
        let persisted = if self.unpersisted > 0 {
            self.persist().await.map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        // The records as of now: the builder encodes them while this goes on.
        let txn = match persisted {
            Ok(()) => {
                let db = self.db.clone();
                blocking(move || Ok(db.begin_read()?))
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        SnapshotBuilder {
            db: self.db.clone(),
            txn,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let data = snapshot.into_inner();
        let mut sm = decode_snapshot_as("received snapshot", &data)
            .map_err(|e| e.into_raft(subject.clone(), ErrorVerb::Read))?;
        if sm.last_applied != meta.last_log_id {
            let e = StoreError::Snapshot(format!(
                "snapshot {} holds state up to {:?}, its metadata says {:?}",
                meta.snapshot_id, sm.last_applied, meta.last_log_id
            ));
            return Err(e.into_raft(subject, ErrorVerb::Read));
        }
        sm.last_membership = meta.last_membership.clone();
        let persist =
            Persist::of(&sm, true).map_err(|e| e.into_raft(subject.clone(), ErrorVerb::Write))?;
        let snap_bytes = StoredSnapshot::encode(meta, &data)
            .map_err(|e| e.into_raft(subject.clone(), ErrorVerb::Write))?;
        drop(data);
        let db = self.db.clone();
        blocking(move || persist.write(&db, Some(snap_bytes)))
            .await
            .map_err(|e| e.into_raft(subject, ErrorVerb::Write))?;
        tracing::info!(snapshot = %meta, epoch = sm.state.epoch, "installed snapshot");
        // Keep the shared file system handle: the query handler holds it.
        let fs = std::mem::take(&mut *sm.fs.write());
        *self.sm.fs.write() = fs;
        sm.fs = self.sm.fs.share();
        self.sm = sm;
        self.unpersisted = 0;
        self.failed = false;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let db = self.db.clone();
        let stored: Option<StoredSnapshot> =
            blocking(move || get_meta_within(&db, KEY_SNAPSHOT, MAX_STATE_LEN))
                .await
                .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// A snapshot as encoded from the store's records.
struct Prepared {
    data: Vec<u8>,
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
}

/// Encodes the state machine as a snapshot from the records a read transaction sees:
/// the bytes postcard makes of the [`SmData`] they hold, without building it (the
/// inodes' records are copied as they are), so the state machine goes on applying
/// meanwhile and the namespace is not copied in memory.
fn snapshot_from(txn: &redb::ReadTransaction) -> Result<Prepared, StoreError> {
    let meta = txn.open_table(META)?;
    let Some(head) = meta.get(KEY_HEAD)? else {
        // Nothing persisted yet: the empty state machine.
        let sm = SmData::default();
        return Ok(Prepared {
            data: encode_snapshot(&sm)?,
            last_applied: sm.last_applied,
            last_membership: sm.last_membership,
        });
    };
    let head: Head = decode_state(KEY_HEAD, head.value())?;
    let parts = (
        &head.last_applied,
        &head.last_membership,
        &head.state,
        &head.answered,
    );
    let out = postcard::to_extend(&parts, Vec::new())?;
    let inodes = txn.open_table(INODES)?;
    let free = txn.open_table(FREE)?;
    let data = head.fs.encode_state_with(
        out,
        |out| {
            let n = usize::try_from(inodes.len()?).unwrap_or(usize::MAX);
            let mut out = postcard::to_extend(&n, out)?;
            for item in inodes.iter()? {
                let (k, v) = item?;
                out = postcard::to_extend(&k.value(), out)?;
                out.extend_from_slice(v.value());
            }
            Ok::<_, StoreError>(out)
        },
        |out| {
            let n = usize::try_from(free.len()?).unwrap_or(usize::MAX);
            let mut out = postcard::to_extend(&n, out)?;
            for item in free.iter()? {
                let (k, v) = item?;
                out = postcard::to_extend(&(k.value(), v.value()), out)?;
            }
            Ok(out)
        },
    )?;
    // The locks follow, as they are stored (postcard of the table), if there are any.
    let mut data = data;
    if let Some(l) = meta.get(KEY_LOCKS)? {
        let locks: LockTable = decode_state(KEY_LOCKS, l.value())?;
        if !locks.is_empty() {
            data.extend_from_slice(l.value());
        }
    }
    if data.len() > MAX_STATE_LEN {
        return Err(StoreError::TooLarge {
            what: "snapshot data".into(),
            len: data.len(),
            limit: MAX_STATE_LEN,
        });
    }
    Ok(Prepared {
        data,
        last_applied: head.last_applied,
        last_membership: head.last_membership,
    })
}

/// Builds the snapshot from the records of the read transaction opened when it was
/// requested, just after the state machine was persisted up to that point.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    /// The read transaction, or why persisting or opening it failed.
    txn: Result<redb::ReadTransaction, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let txn = match std::mem::replace(&mut self.txn, Err("built already".into())) {
            Ok(t) => t,
            Err(e) => {
                let e = StoreError::Snapshot(format!("state machine not persisted: {e}"));
                return Err(e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Write));
            }
        };
        let p = blocking(move || snapshot_from(&txn))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        let data = p.data;
        let snapshot_id = match &p.last_applied {
            Some(l) => format!("{}-{}-{:08x}", l.leader_id, l.index, rand::random::<u32>()),
            None => format!("empty-{:08x}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta {
            last_log_id: p.last_applied,
            last_membership: p.last_membership,
            snapshot_id,
        };
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let bytes = StoredSnapshot::encode(&meta, &data)
            .map_err(|e| e.into_raft(subject.clone(), ErrorVerb::Write))?;
        let db = self.db.clone();
        let last = meta.last_log_id;
        blocking(move || {
            // Never replace a newer snapshot (one installed meanwhile) with this one:
            // compared and written in one transaction, so no install comes between.
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(META)?;
                let newer = match table.get(KEY_SNAPSHOT)? {
                    Some(v) => StoredSnapshot::meta_of(v.value())?.last_log_id > last,
                    None => false,
                };
                if !newer {
                    table.insert(KEY_SNAPSHOT, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(subject, ErrorVerb::Write))?;
        tracing::debug!(snapshot = %meta, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_record_is_encoded_and_read_as_a_stored_snapshot() {
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 77)),
            last_membership: StoredMembership::default(),
            snapshot_id: "3-77-abc".into(),
        };
        for len in [0usize, 1, 127, 128, 300_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let bytes = StoredSnapshot::encode(&meta, &data).expect("encodes");
            let whole = StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            };
            assert_eq!(bytes, postcard::to_stdvec(&whole).expect("encodes"));
            assert_eq!(StoredSnapshot::meta_of(&bytes).expect("decodes"), meta);
        }
    }
}
