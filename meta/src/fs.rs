//! The file system namespace, replicated with the rest of the metadata, pure (no I/O).
//!
//! [`FsState`] holds every inode (attributes; a directory's entries; a symlink's
//! target; a regular file's extents: file block -> data block address of the volume)
//! and the volume's free data blocks. It changes only through [`FsState::apply`]
//! ([`FsCommand`]s from the Raft log, so every replica makes the same changes) and is
//! read through [`FsState::query`] ([`FsQuery`]s, answered by the leader after a
//! linearizable read). Times come in the commands (the proposer's clock), never from
//! the replica's, so applying is deterministic. Every refusal is a typed [`FsError`]
//! that the FUSE front end maps to an errno.
//!
//! Invariants (checked by [`FsState::check`], which the tests call after every step):
//! - every directory entry names an existing inode; a directory has exactly one entry
//!   naming it (no directory hard links) and its `parent` is that entry's directory;
//! - a file's `nlink` is the number of entries naming it (0: an orphan, open somewhere,
//!   dropped with [`FsCommand::Drop`]); a directory's is 2 + its subdirectories;
//! - no data block belongs to two files, nor to a file and the free list or a held
//!   freeing, and used (files' and held blocks) + free = the volume's blocks;
//! - every held freeing waits for at least one session, and each of those has the
//!   file marked stale with a number at least the freeing's; sessions have open only
//!   inodes that exist;
//! - byte-range locks ([`crate::locks`]) are on inodes that exist and held by
//!   sessions that exist, and keep the lock table's own invariants.
//!
//! Mount sessions ([`Session`]): a mount registers its opens, and blocks freed from a
//! file that other sessions have open are [`Held`] until each of them acknowledged
//! ([`FsCommand::Refreshed`]), so a block map a mount still holds never points into
//! another file (docs/PROTOCOL.md, 7.2).
//!
//! Data blocks are handed out by [`FsCommand::Map`] (for the blocks a write touches,
//! and optionally some blocks ahead of them, for a file being written sequentially).
//! A block handed out is *unwritten* until a [`FsCommand::Written`] names it: every
//! reader treats it as a hole (zeros), and the writing mount writes it whole (zeros
//! around its new bytes) before naming it. So a file never shows another file's old
//! bytes, not even when its mount dies between taking a block and writing it. The
//! mount keeps bytes past the end of file in a file's last block zero (truncation
//! zeroes them), so growing a file shows zeros.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use crate::acl::{self, Acl};
use crate::locks::{LockError, LockKind, LockTable, Owner, RangeLock};
use crate::tracked::Tracked;

/// An inode number.
pub type Ino = u64;
/// A mount's session number (see [`FsCommand::OpenSession`]).
pub type SessionId = u64;
/// The root directory's inode.
pub const ROOT: Ino = 1;
/// Longest name of a directory entry, bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, bytes.
pub const SYMLINK_MAX: usize = 4096;
/// Most links to one inode.
pub const LINK_MAX: u32 = 65_000;
/// Most entries one `ReadDir` answer carries.
pub const READDIR_MAX: usize = 4096;

/// Most inodes one `GetAttrs` asks about.
pub const ATTRS_MAX: usize = 1024;
/// Most bytes of extended attribute names `GetAttrs` returns with one inode.
pub const ATTRS_NAMES_MAX: usize = 1024;
/// Most blocks one `Map` may hand out (a few MiB of file at a time).
pub const MAP_MAX: u64 = 4096;
/// Blocks handed out ahead by one `Map` are at most 1 / this of the space still free
/// after the requested ones. They stay with the file until its writer's last close,
/// so without a bound a few sequential writers would take a small volume and the
/// writers of other files would find it full.
pub const AHEAD_SHARE: u64 = 4;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// A time as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// An inode's attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    /// Permission bits, with set-uid, set-gid and sticky (07777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// Data blocks the file holds.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Grows each time the inode number is given out (never reused here, so always 1).
    pub generation: u64,
}

/// A run of data blocks of the volume: `count` blocks from `lba`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub lba: u64,
    pub count: u64,
}

/// One file block's data block, and whether it is unwritten (`fresh`: its content is
/// undefined, another file's old bytes: read it as zeros, write it whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub block: u64,
    pub lba: u64,
    pub fresh: bool,
}

/// A run of file blocks: `count` blocks from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRange {
    pub first: u64,
    pub count: u64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: Kind,
}

/// Capacity as `statfs` reports it, in data blocks (after redundancy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    pub block_size: u32,
    pub blocks: u64,
    pub free: u64,
    pub files: u64,
    /// Mount sessions.
    pub mounts: u64,
    /// Blocks freed and held for mounts that have not acknowledged yet (not free).
    pub held: u64,
}

/// An inode's attributes, and the names of its extended attributes if they take
/// at most [`ATTRS_NAMES_MAX`] bytes (`None` if more): a `GetAttrs` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrNames {
    pub attr: Attr,
    pub xattrs: Option<Vec<Vec<u8>>>,
}

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub attr: Attr,
    /// A directory's entries.
    pub entries: BTreeMap<Vec<u8>, Ino>,
    /// A directory's parent (the root's is itself).
    pub parent: Ino,
    /// A symlink's target.
    pub target: Vec<u8>,
    /// A regular file's data: first file block -> run of data blocks.
    pub extents: BTreeMap<u64, Extent>,
    /// File blocks handed out and not yet named by a `Written` (read as zeros).
    pub unwritten: BTreeSet<u64>,
    /// Extended attributes: name -> value (see [`XATTR_NAME_MAX`] and the limits
    /// beside it).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A mount's session: the inodes it has open, and the freeings of their blocks it
/// has not acknowledged yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Inode -> how many times it is open (each `Open` counts until its `Close`).
    pub opens: BTreeMap<Ino, u32>,
    /// Inode -> the latest freeing of its blocks ([`Held`]'s number) that this
    /// session has to acknowledge with [`FsCommand::Refreshed`].
    pub stale: BTreeMap<Ino, u64>,
    /// When it was opened.
    pub started: Time,
}

/// Data blocks freed from an inode that other mounts had open: they are not free
/// until each of those mounts acknowledged the freeing, so a block map such a mount
/// still holds never points into another file's blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub ino: Ino,
    pub extents: Vec<Extent>,
    /// The sessions still to acknowledge it.
    pub waiting: BTreeSet<SessionId>,
}

/// Attribute changes (`setattr`); `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Time>,
    pub mtime: Option<Time>,
}

/// A change to the namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FsCommand {
    /// Creates the file system (its root directory) over `blocks` data blocks of
    /// `block_size` bytes; `Exists` if there is one already.
    Format {
        blocks: u64,
        block_size: u32,
        uid: u32,
        gid: u32,
        now: Time,
    },
    /// A new inode named `name` in `parent` with mode `perm` as it is (no ACL
    /// inherited: see [`FsCommand::Umask`]). `target` is a symlink's.
    Create {
        parent: Ino,
        name: Vec<u8>,
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Vec<u8>,
        now: Time,
    },
    /// Another name for a non-directory.
    Link {
        ino: Ino,
        parent: Ino,
        name: Vec<u8>,
        now: Time,
    },
    /// Removes a name (`dir`: rmdir). A file whose last name goes stays as an orphan
    /// until [`FsCommand::Drop`].
    Unlink {
        parent: Ino,
        name: Vec<u8>,
        dir: bool,
        now: Time,
    },
    /// Moves a name, replacing the target unless `noreplace`; `exchange` swaps two.
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        noreplace: bool,
        exchange: bool,
        now: Time,
    },
    /// Changes attributes; a size change frees the blocks past the new end.
    SetAttr { ino: Ino, set: SetAttr, now: Time },
    /// Data blocks for file blocks `first .. first + count`, handing out blocks for
    /// those without one (`NoSpace` if there are not enough), and, as far as a
    /// quarter of the blocks then free goes ([`AHEAD_SHARE`]), for the `ahead` file
    /// blocks after them (`count + ahead` at most [`MAP_MAX`]). The answer covers `first .. first + count + ahead`; blocks handed
    /// out are unwritten.
    Map {
        ino: Ino,
        first: u64,
        count: u64,
        ahead: u64,
    },
    /// A mount wrote data: the blocks of `written` are no longer unwritten, the size
    /// becomes at least `size`, and mtime and ctime `now`. With `trim`, unwritten
    /// blocks past the end of file are freed, if every block there is unwritten (a
    /// mount's last close: what it took ahead and did not use).
    Written {
        ino: Ino,
        size: u64,
        now: Time,
        written: Vec<BlockRange>,
        trim: bool,
    },
    /// Frees an orphan (no names left, closed).
    Drop { ino: Ino },
    /// Sets extended attribute `name` to `value`: with `create`, `Exists` if it is
    /// set; with `replace`, `NoXattr` if it is not. Changes ctime.
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        create: bool,
        replace: bool,
        now: Time,
    },
    /// Removes extended attribute `name` (`NoXattr` if it is not set). Changes ctime.
    RemoveXattr { ino: Ino, name: Vec<u8>, now: Time },
    /// Frees file blocks `first .. first + count` of a regular file, which become
    /// holes (read as zeros); the size stays. mtime and ctime become `now`
    /// (`fallocate` with `FALLOC_FL_PUNCH_HOLE`).
    Punch {
        ino: Ino,
        first: u64,
        count: u64,
        now: Time,
    },
    /// The inode was read at `now`: its atime becomes `now` if it is due (see
    /// [`atime_due`]: relatime's rule); ctime does not change.
    Accessed { ino: Ino, now: Time },
    /// A mount starts: answers its new session's number ([`FsReply::Session`]).
    OpenSession { now: Time },
    /// A mount ends (or its session expired): its opens are closed and its
    /// acknowledgements given.
    EndSession { session: SessionId },
    /// `session` opens `ino` (one `Close` each); answers its attributes. Blocks freed
    /// from the inode while it is open are held for the session
    /// ([`FsCommand::Refreshed`]), and an orphan is not dropped while it is open.
    Open { session: SessionId, ino: Ino },
    /// `session` closes `ino` once; at its last close the session has no block map
    /// of it left (acknowledging its freeings), and an orphan no session has open is
    /// dropped.
    Close { session: SessionId, ino: Ino },
    /// `session` forgot its block map of `ino` after learning of freeing `freeing`
    /// (and every earlier one): the held blocks no other session waits for are free.
    Refreshed {
        session: SessionId,
        ino: Ino,
        freeing: u64,
    },
    /// `cmd` sent by a mount of session `session`: the blocks it frees are not held
    /// for that session (the mount frees only what it no longer uses), and a
    /// `Written` naming blocks of a file with a freeing the session has not
    /// acknowledged is refused (`StaleMap`: the named blocks may no longer be the
    /// ones it wrote).
    From {
        session: SessionId,
        cmd: Box<FsCommand>,
    },
    /// `cmd`, a `Create` of a regular file, and an `Open` of the new inode by
    /// `session`, as one command (a mount's `create`): answers the attributes.
    /// Nothing is done if either would be refused.
    CreateOpen {
        session: SessionId,
        cmd: Box<FsCommand>,
    },
    /// `cmd`, a `Written` of `ino` by `session` (as [`FsCommand::From`]), then a
    /// `Close` of `ino` by `session`, as one command (a mount's last close of a file
    /// it wrote). Nothing is done if either would be refused.
    WrittenClose {
        session: SessionId,
        ino: Ino,
        cmd: Box<FsCommand>,
    },
    /// `session`'s lock owner `owner` locks (or unlocks) bytes `start ..= end` of
    /// `ino` (`fcntl`'s `F_SETLK`, by POSIX's rules: see [`crate::locks`]):
    /// `WouldBlock` if another owner holds a conflicting lock, `NoLocks` if the
    /// table is full. `pid` is the process as its mount saw it.
    SetLock {
        session: SessionId,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        kind: LockKind,
        pid: u32,
    },
    /// Drops every lock of `session`'s lock owner `owner` on `ino` (the owner
    /// closed the file).
    ReleaseLocks {
        session: SessionId,
        ino: Ino,
        owner: u64,
    },
    /// `cmd`, a `Create` whose `perm` is the mode the process asked for, made with
    /// the process's `umask`: a node made in a directory with a default ACL
    /// inherits it (a symlink excepted), the mode asked for masking it, and the
    /// umask does not apply; elsewhere the umask does (see [`crate::acl`]).
    Umask { umask: u16, cmd: Box<FsCommand> },
    /// `cmd`, a `Written`, whose `trim` frees nothing while another session has the
    /// file open: that mount may have written blocks past the end that it took and
    /// has not yet named, and freeing them would drop its data. A mount's last
    /// close sends its `Written` so; a plain one (from a mount of an earlier
    /// version) trims whatever other sessions hold.
    TrimAlone { cmd: Box<FsCommand> },
    /// `cmd`, a `SetXattr` of an access ACL, by a caller with CAP_FSETID
    /// (`fsetid`) or not, and a member of group `member_of` (the file's group as
    /// the mount saw it) or not: the set-gid bit goes unless the caller has
    /// CAP_FSETID or is a member of the file's group as it is when applied, as a
    /// chmod by such a caller would drop it (Linux's `posix_acl_update_mode`).
    AclAs {
        fsetid: bool,
        member_of: Option<u32>,
        cmd: Box<FsCommand>,
    },
    /// `cmd`, an `Unlink` or `Rename`, and the `Drop` of the inode it leaves
    /// without names, in one: freed now if no session has it open, else at the
    /// last `Close`. Answers `Orphaned(None)` (nothing left for the mount to do).
    UnlinkDrop { cmd: Box<FsCommand> },
}

impl FsCommand {
    /// For a command that can grow the namespace by more than a few bytes (a new
    /// inode or name, an extended attribute, blocks mapped in `fs`, an extent split
    /// by a punch), an upper bound of what it adds to the namespace's encoding;
    /// `None` for the others, which are always admitted (so a full namespace can
    /// still be shrunk and its files closed). `fs` is the namespace as it is now.
    pub fn grows_by(&self, fs: &FsState) -> Option<usize> {
        match self {
            FsCommand::Create { name, target, .. } => Some(name.len() + target.len() + 192),
            FsCommand::Link { name, .. } => Some(name.len() + 64),
            FsCommand::Rename { new_name, .. } => Some(new_name.len() + 16),
            FsCommand::SetXattr { name, value, .. } => Some(name.len() + value.len() + 64),
            // Each data block handed out in an extent of its own at worst; blocks
            // the file already has add nothing.
            FsCommand::Map {
                ino,
                first,
                count,
                ahead,
            } => {
                let n = count.saturating_add(*ahead).min(MAP_MAX);
                let new = n.saturating_sub(fs.mapped_count(*ino, *first, n));
                (new > 0).then_some(new as usize * 24 + 64)
            }
            // A split extent and a new free run (or held freeing).
            FsCommand::Punch { .. } => Some(96),
            FsCommand::From { cmd, .. }
            | FsCommand::TrimAlone { cmd }
            | FsCommand::AclAs { cmd, .. }
            | FsCommand::UnlinkDrop { cmd } => cmd.grows_by(fs),
            FsCommand::CreateOpen { cmd, .. } => Some(cmd.grows_by(fs).unwrap_or(0) + 32),
            // The ACLs inherited from the directory's default ACL as it is now: an
            // access ACL, and for a directory the default ACL too (a default ACL
            // set after this is admitted and applied before it may add up to
            // `acl::MAX_LEN` twice, slack the limit leaves).
            FsCommand::Umask { cmd, .. } => {
                let inherited = match &**cmd {
                    FsCommand::Create { parent, kind, .. } if *kind != Kind::Symlink => {
                        let len = fs
                            .inode(*parent)
                            .and_then(|d| d.xattrs.get(acl::DEFAULT))
                            .map_or(0, |v| v.len() + acl::DEFAULT.len() + 16);
                        len * if *kind == Kind::Dir { 2 } else { 1 }
                    }
                    _ => 0,
                };
                Some(cmd.grows_by(fs).unwrap_or(0) + inherited)
            }
            _ => None,
        }
    }
}

/// The most file blocks a file may have on a volume of `blocks` data blocks (1024 per
/// volume block: sparse files may be far larger than the volume).
pub fn max_file_blocks(blocks: u64) -> u64 {
    blocks.max(1).saturating_mul(1024)
}

/// Whether a read at `now` updates an inode's atime, by relatime's rule (Linux's
/// default): the atime is not later than the mtime or the ctime, or is a day old.
pub fn atime_due(a: &Attr, now: Time) -> bool {
    a.atime <= a.mtime || a.atime <= a.ctime || now.secs.saturating_sub(a.atime.secs) >= 86_400
}

/// A read of the namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FsQuery {
    Lookup {
        parent: Ino,
        name: Vec<u8>,
    },
    GetAttr {
        ino: Ino,
    },
    /// Up to [`READDIR_MAX`] entries after `after` (from the start if `None`).
    ReadDir {
        ino: Ino,
        after: Option<Vec<u8>>,
    },
    ReadLink {
        ino: Ino,
    },
    /// The data blocks of file blocks `first .. first + count` that have one.
    Extents {
        ino: Ino,
        first: u64,
        count: u64,
    },
    StatFs,
    /// The value of extended attribute `name` (`NoXattr` if it is not set).
    GetXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    /// The names of the extended attributes, each followed by a zero byte.
    ListXattr {
        ino: Ino,
    },
    /// A mount's heartbeat: the freeings its session has to acknowledge
    /// ([`FsReply::Stale`]); `NoSession` if it expired.
    Session {
        session: SessionId,
    },
    /// The first lock on `ino` of an owner other than `session`'s `owner` that a lock
    /// of bytes `start ..= end` would conflict with (`F_GETLK`;
    /// [`FsReply::Lock`]).
    GetLock {
        session: SessionId,
        ino: Ino,
        owner: u64,
        start: u64,
        end: u64,
        write: bool,
    },
    /// The attributes of up to [`ATTRS_MAX`] entries of directory `parent`, in
    /// order, with the names of their extended attributes; `None` for an entry
    /// whose name no longer names that inode (`.` and `..` name the directory and
    /// its parent): what `readdirplus` returns beside a listing's names, and what
    /// lets a mount answer reads of attributes a file does not have (`ls -l` asks
    /// for two per file).
    GetAttrs {
        parent: Ino,
        entries: Vec<(Vec<u8>, Ino)>,
    },
}

/// The answer to a command or query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FsReply {
    Attr(Attr),
    /// `Unlink` / `Rename`: the inode left without names (drop it once closed).
    Orphaned(Option<Ino>),
    Mapped(Vec<Mapping>),
    Entries(Vec<DirEntry>),
    Target(Vec<u8>),
    StatFs(FsStats),
    /// An extended attribute's value, or the list of names.
    Bytes(Vec<u8>),
    Done,
    /// `OpenSession`: the new session.
    Session(SessionId),
    /// `Session`: (inode, freeing) pairs to acknowledge with `Refreshed`.
    Stale(Vec<(Ino, u64)>),
    /// `GetLock`: the conflicting lock, if there is one.
    Lock(Option<RangeLock>),
    /// `GetAttrs`: each inode's attributes and extended attribute names, `None`
    /// for one that is gone.
    Attrs(Vec<Option<AttrNames>>),
}

/// Why a command or query was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("no space left on the volume")]
    NoSpace,
    #[error("file name too long")]
    NameTooLong,
    #[error("too many links")]
    TooManyLinks,
    #[error("the file system is not formatted")]
    NotFormatted,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("file too large")]
    TooLarge,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("extended attributes of this namespace are not supported")]
    XattrNotSupported,
    #[error("extended attribute name or value too large")]
    XattrTooLarge,
    #[error("the mount's session expired")]
    NoSession,
    /// A `Written` of a session that has not acknowledged a freeing of the file's
    /// blocks: the blocks it names may have been taken from it (refresh, then retry).
    #[error("the mount's block map of the file is stale")]
    StaleMap,
    /// `SetLock`: another owner holds a conflicting lock.
    #[error("a conflicting lock is held")]
    WouldBlock,
    /// `SetLock`: the lock table is full ([`crate::locks::MAX_LOCKS`]).
    #[error("no locks available")]
    NoLocks,
}

type FsResult = Result<FsReply, FsError>;

/// A held freeing, as [`FsState::acknowledge`] selects them.
struct HeldRef {
    number: u64,
    ino: Ino,
}

/// The namespace and the free data blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub formatted: bool,
    pub block_size: u32,
    pub blocks: u64,
    pub used: u64,
    next_ino: Ino,
    inodes: Tracked<Ino, Inode>,
    /// Free data blocks: start -> count, non-adjacent runs.
    free: Tracked<u64, u64>,
    next_session: SessionId,
    /// The mounts' sessions.
    sessions: BTreeMap<SessionId, Session>,
    /// Freeings waiting for acknowledgements, by number (counted in `used`).
    held: BTreeMap<u64, Held>,
    next_freeing: u64,
    /// The mounts' byte-range locks: not part of the namespace's encoding (the store
    /// keeps them in a record of their own, and a snapshot carries them after it).
    #[serde(skip)]
    locks: LockTable,
}

/// The namespace less its inodes and free runs, which the store keeps in a record
/// each (see [`FsState::take_changes`]): the counters, the sessions and the held
/// freeings, stored whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsHead {
    formatted: bool,
    block_size: u32,
    blocks: u64,
    used: u64,
    next_ino: Ino,
    next_session: SessionId,
    sessions: BTreeMap<SessionId, Session>,
    held: BTreeMap<u64, Held>,
    next_freeing: u64,
}

impl FsHead {
    /// Appends to `out` what postcard makes of the [`FsState`] of this head with the
    /// inodes and free runs that `inodes` and `free` append (each a map: its length,
    /// then its entries), without building that state: a snapshot straight from the
    /// store's records. The order is `FsState`'s fields'.
    pub fn encode_state_with<E: From<postcard::Error>>(
        &self,
        out: Vec<u8>,
        inodes: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
        free: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        let first = (
            self.formatted,
            self.block_size,
            self.blocks,
            self.used,
            self.next_ino,
        );
        let out = postcard::to_extend(&first, out)?;
        let out = free(inodes(out)?)?;
        let last = (
            self.next_session,
            &self.sessions,
            &self.held,
            self.next_freeing,
        );
        Ok(postcard::to_extend(&last, out)?)
    }
}

/// The keys of the inodes and free runs changed (set or removed) since the last
/// [`FsState::take_changes`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FsChanges {
    pub inodes: BTreeSet<Ino>,
    pub free: BTreeSet<u64>,
}

/// Longest extended attribute name (as the kernel's `XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
/// Largest value of one extended attribute.
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
/// Most bytes of names and values one inode holds (the namespace is replicated as a
/// whole: attributes are for labels, not data).
pub const XATTR_TOTAL_MAX: usize = 64 * 1024;

/// Checks an extended attribute name: `user.`, `trusted.` and `security.` names are
/// kept (the kernel checks who may set each), and of `system.` names the two POSIX
/// ACLs ([`crate::acl`]; the kernel enforces them); other `system.` names are not
/// supported.
/// Whether `name` may name an extended attribute here: `Invalid` (empty, a zero
/// byte), `XattrTooLarge`, or `XattrNotSupported` (another namespace) if not.
pub fn check_xattr_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name.contains(&0) {
        return Err(FsError::Invalid);
    }
    if name.len() > XATTR_NAME_MAX {
        return Err(FsError::XattrTooLarge);
    }
    if acl::is_acl(name) {
        return Ok(());
    }
    if [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        Ok(())
    } else {
        Err(FsError::XattrNotSupported)
    }
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid);
    }
    if name.contains(&0) {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl FsState {
    /// Everything but the inodes and the free runs.
    pub fn head(&self) -> FsHead {
        FsHead {
            formatted: self.formatted,
            block_size: self.block_size,
            blocks: self.blocks,
            used: self.used,
            next_ino: self.next_ino,
            next_session: self.next_session,
            sessions: self.sessions.clone(),
            held: self.held.clone(),
            next_freeing: self.next_freeing,
        }
    }

    /// The state put back together from what [`FsState::head`], [`FsState::inodes`]
    /// and [`FsState::free_runs`] gave (nothing noted as changed).
    pub fn from_parts(
        head: FsHead,
        inodes: BTreeMap<Ino, Inode>,
        free: BTreeMap<u64, u64>,
    ) -> FsState {
        FsState {
            formatted: head.formatted,
            block_size: head.block_size,
            blocks: head.blocks,
            used: head.used,
            next_ino: head.next_ino,
            inodes: inodes.into(),
            free: free.into(),
            next_session: head.next_session,
            sessions: head.sessions,
            held: head.held,
            next_freeing: head.next_freeing,
            locks: LockTable::default(),
        }
    }

    /// The mounts' byte-range locks.
    pub fn locks(&self) -> &LockTable {
        &self.locks
    }

    /// Puts back the locks that [`FsState::locks`] gave (the store's record, or a
    /// snapshot's), noted as unchanged.
    pub fn set_locks(&mut self, mut locks: LockTable) {
        locks.take_changed();
        self.locks = locks;
    }

    /// Whether the locks changed since the last call (the store then writes them).
    pub fn take_locks_changed(&mut self) -> bool {
        self.locks.take_changed()
    }

    /// Every inode.
    pub fn inodes(&self) -> &BTreeMap<Ino, Inode> {
        &self.inodes
    }

    /// The free data blocks: start -> count.
    pub fn free_runs(&self) -> &BTreeMap<u64, u64> {
        &self.free
    }

    /// The inodes and free runs changed since the last call: the store writes (or
    /// deletes) their records and no others.
    pub fn take_changes(&mut self) -> FsChanges {
        FsChanges {
            inodes: self.inodes.take_changed(),
            free: self.free.take_changed(),
        }
    }

    /// How many of file blocks `first .. first + n` of `ino` have a data block.
    pub fn mapped_count(&self, ino: Ino, first: u64, n: u64) -> u64 {
        self.inodes
            .get(&ino)
            .map_or(0, |i| mapped(i, first, n).len() as u64)
    }

    /// Bytes of the namespace's encoding, as the state machine's record stores it
    /// (a walk of the whole namespace).
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).unwrap_or(usize::MAX)
    }

    pub fn inode(&self, ino: Ino) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    fn get(&self, ino: Ino) -> Result<&Inode, FsError> {
        if !self.formatted {
            return Err(FsError::NotFormatted);
        }
        self.inodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn get_mut(&mut self, ino: Ino) -> Result<&mut Inode, FsError> {
        if !self.formatted {
            return Err(FsError::NotFormatted);
        }
        self.inodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    fn dir(&self, ino: Ino) -> Result<&Inode, FsError> {
        let i = self.get(ino)?;
        if i.attr.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(i)
    }

    fn touch_dir(&mut self, ino: Ino, now: Time) {
        if let Some(d) = self.inodes.get_mut(&ino) {
            d.attr.mtime = now;
            d.attr.ctime = now;
        }
    }

    fn attr(&self, ino: Ino) -> FsResult {
        Ok(FsReply::Attr(self.get(ino)?.attr.clone()))
    }

    /// Answers a query (no change).
    pub fn query(&self, q: &FsQuery) -> FsResult {
        match q {
            FsQuery::Lookup { parent, name } => {
                let d = self.dir(*parent)?;
                let ino = match name.as_slice() {
                    b"." => *parent,
                    b".." => d.parent,
                    // A name no entry can have is too long, not missing (as
                    // a local file system answers).
                    n if n.len() > NAME_MAX => return Err(FsError::NameTooLong),
                    n => *d.entries.get(n).ok_or(FsError::NotFound)?,
                };
                self.attr(ino)
            }
            FsQuery::GetAttr { ino } => self.attr(*ino),
            FsQuery::GetAttrs { parent, entries } => {
                if entries.len() > ATTRS_MAX {
                    return Err(FsError::Invalid);
                }
                self.get(ROOT)?;
                let dir = self.dir(*parent).ok();
                Ok(FsReply::Attrs(
                    entries
                        .iter()
                        .map(|(name, ino)| {
                            let d = dir?;
                            let named = match name.as_slice() {
                                b"." => *parent,
                                b".." => d.parent,
                                n => *d.entries.get(n)?,
                            };
                            if named != *ino {
                                return None;
                            }
                            let n = self.get(*ino).ok()?;
                            let bytes: usize = n.xattrs.keys().map(|k| k.len() + 8).sum();
                            Some(AttrNames {
                                attr: n.attr.clone(),
                                xattrs: (bytes <= ATTRS_NAMES_MAX)
                                    .then(|| n.xattrs.keys().cloned().collect()),
                            })
                        })
                        .collect(),
                ))
            }
            FsQuery::ReadDir { ino, after } => {
                let d = self.dir(*ino)?;
                let range = match after {
                    Some(a) => d
                        .entries
                        .range::<Vec<u8>, _>((
                            std::ops::Bound::Excluded(a),
                            std::ops::Bound::Unbounded,
                        ))
                        .take(READDIR_MAX)
                        .collect::<Vec<_>>(),
                    None => d.entries.iter().take(READDIR_MAX).collect(),
                };
                let mut out = Vec::with_capacity(range.len());
                for (name, ino) in range {
                    let kind = self.get(*ino)?.attr.kind;
                    out.push(DirEntry {
                        name: name.clone(),
                        ino: *ino,
                        kind,
                    });
                }
                Ok(FsReply::Entries(out))
            }
            FsQuery::ReadLink { ino } => {
                let i = self.get(*ino)?;
                if i.attr.kind != Kind::Symlink {
                    return Err(FsError::Invalid);
                }
                Ok(FsReply::Target(i.target.clone()))
            }
            FsQuery::Extents { ino, first, count } => {
                let i = self.get(*ino)?;
                Ok(FsReply::Mapped(mapped(i, *first, (*count).min(MAP_MAX))))
            }
            FsQuery::GetXattr { ino, name } => {
                let i = self.get(*ino)?;
                check_xattr_name(name)?;
                i.xattrs
                    .get(name)
                    .map(|v| FsReply::Bytes(v.clone()))
                    .ok_or(FsError::NoXattr)
            }
            FsQuery::Session { session } => {
                let s = self.sessions.get(session).ok_or(FsError::NoSession)?;
                Ok(FsReply::Stale(
                    s.stale.iter().map(|(i, f)| (*i, *f)).collect(),
                ))
            }
            FsQuery::GetLock {
                session,
                ino,
                owner,
                start,
                end,
                write,
            } => {
                self.get(*ino)?;
                let owner = Owner {
                    session: *session,
                    owner: *owner,
                };
                if start > end {
                    return Err(FsError::Invalid);
                }
                let l = self.locks.conflict(*ino, owner, *start, *end, *write);
                Ok(FsReply::Lock(l.cloned()))
            }
            FsQuery::ListXattr { ino } => {
                let i = self.get(*ino)?;
                let mut out = Vec::new();
                for n in i.xattrs.keys() {
                    out.extend_from_slice(n);
                    out.push(0);
                }
                Ok(FsReply::Bytes(out))
            }
            FsQuery::StatFs => {
                if !self.formatted {
                    return Err(FsError::NotFormatted);
                }
                Ok(FsReply::StatFs(FsStats {
                    block_size: self.block_size,
                    blocks: self.blocks,
                    free: self.blocks - self.used,
                    files: self.inodes.len() as u64,
                    mounts: self.sessions.len() as u64,
                    held: self
                        .held
                        .values()
                        .flat_map(|h| h.extents.iter().map(|e| e.count))
                        .sum(),
                }))
            }
        }
    }

    /// Applies a command; a refusal changes nothing.
    pub fn apply(&mut self, cmd: &FsCommand) -> FsResult {
        self.apply_as(cmd, None)
    }

    /// The mount sessions.
    pub fn sessions(&self) -> &BTreeMap<SessionId, Session> {
        &self.sessions
    }

    /// The freeings waiting for acknowledgements.
    pub fn held(&self) -> &BTreeMap<u64, Held> {
        &self.held
    }

    /// Applies a command of session `by` (if any).
    fn apply_as(&mut self, cmd: &FsCommand, by: Option<SessionId>) -> FsResult {
        match cmd {
            FsCommand::Format {
                blocks,
                block_size,
                uid,
                gid,
                now,
            } => {
                if self.formatted {
                    return Err(FsError::Exists);
                }
                if *blocks == 0 || *block_size == 0 {
                    return Err(FsError::Invalid);
                }
                self.formatted = true;
                self.block_size = *block_size;
                self.blocks = *blocks;
                self.used = 0;
                self.free.replace(BTreeMap::from([(0, *blocks)]));
                self.next_ino = ROOT + 1;
                self.inodes.insert(
                    ROOT,
                    new_inode(ROOT, Kind::Dir, 0o755, *uid, *gid, 0, *now, ROOT),
                );
                self.attr(ROOT)
            }
            FsCommand::Create { .. } => self.create(cmd, None),
            FsCommand::Umask { umask, cmd } => match **cmd {
                FsCommand::Create { .. } => self.create(cmd, Some(*umask)),
                _ => Err(FsError::Invalid),
            },
            FsCommand::Link {
                ino,
                parent,
                name,
                now,
            } => {
                check_name(name)?;
                let i = self.get(*ino)?;
                if i.attr.kind == Kind::Dir {
                    return Err(FsError::NotPermitted);
                }
                if i.attr.nlink == 0 {
                    return Err(FsError::NotFound);
                }
                if i.attr.nlink >= LINK_MAX {
                    return Err(FsError::TooManyLinks);
                }
                if self.dir(*parent)?.entries.contains_key(name) {
                    return Err(FsError::Exists);
                }
                self.get_mut(*parent)?.entries.insert(name.clone(), *ino);
                self.touch_dir(*parent, *now);
                let i = self.get_mut(*ino)?;
                i.attr.nlink += 1;
                i.attr.ctime = *now;
                Ok(FsReply::Attr(i.attr.clone()))
            }
            FsCommand::Unlink {
                parent,
                name,
                dir,
                now,
            } => {
                check_name(name)?;
                let ino = *self
                    .dir(*parent)?
                    .entries
                    .get(name)
                    .ok_or(FsError::NotFound)?;
                let target = self.get(ino)?;
                match (target.attr.kind == Kind::Dir, *dir) {
                    (true, false) => return Err(FsError::IsDir),
                    (false, true) => return Err(FsError::NotDir),
                    (true, true) if !target.entries.is_empty() => return Err(FsError::NotEmpty),
                    _ => {}
                }
                let p = self.get_mut(*parent)?;
                p.entries.remove(name);
                if *dir {
                    p.attr.nlink -= 1;
                }
                self.touch_dir(*parent, *now);
                Ok(FsReply::Orphaned(self.unlinked(ino, *now)))
            }
            FsCommand::Rename {
                parent,
                name,
                new_parent,
                new_name,
                noreplace,
                exchange,
                now,
            } => self.rename(
                *parent,
                name,
                *new_parent,
                new_name,
                *noreplace,
                *exchange,
                *now,
            ),
            FsCommand::SetAttr { ino, set, now } => self.set_attr(*ino, set, *now, by),
            FsCommand::SetXattr {
                ino,
                name,
                value,
                create,
                replace,
                now,
            } => {
                check_xattr_name(name)?;
                if value.len() > XATTR_VALUE_MAX {
                    return Err(FsError::XattrTooLarge);
                }
                let i = self.get(*ino)?;
                // An ACL is kept in the kernel's order; an access ACL sets the
                // mode's bits and is not kept if it says no more than the mode.
                let mut value = value;
                let normalized;
                let mut perm = None;
                if acl::is_acl(name) {
                    let a = Acl::decode(value)?;
                    if name == acl::DEFAULT && i.attr.kind != Kind::Dir {
                        return Err(FsError::Invalid);
                    }
                    normalized = a.encode();
                    value = &normalized;
                    if name == acl::ACCESS {
                        perm = Some((i.attr.perm & !0o777 | a.mode_bits(), a.is_minimal()));
                    }
                }
                let old = i.xattrs.get(name);
                match (old.is_some(), *create, *replace) {
                    (true, true, _) => return Err(FsError::Exists),
                    (false, _, true) => return Err(FsError::NoXattr),
                    _ => {}
                }
                let total: usize = i.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
                // A minimal access ACL is not kept: it only sets the mode.
                let kept = if matches!(perm, Some((_, true))) {
                    0
                } else {
                    name.len() + value.len()
                };
                let after = total - old.map_or(0, |v| name.len() + v.len()) + kept;
                if after > XATTR_TOTAL_MAX {
                    return Err(FsError::NoSpace);
                }
                let i = self.get_mut(*ino)?;
                match perm {
                    Some((perm, minimal)) => {
                        i.attr.perm = perm;
                        if minimal {
                            i.xattrs.remove(name);
                        } else {
                            i.xattrs.insert(name.clone(), value.clone());
                        }
                    }
                    None => {
                        i.xattrs.insert(name.clone(), value.clone());
                    }
                }
                i.attr.ctime = *now;
                Ok(FsReply::Attr(i.attr.clone()))
            }
            FsCommand::RemoveXattr { ino, name, now } => {
                check_xattr_name(name)?;
                let i = self.get_mut(*ino)?;
                if i.xattrs.remove(name).is_none() {
                    return Err(FsError::NoXattr);
                }
                i.attr.ctime = *now;
                Ok(FsReply::Attr(i.attr.clone()))
            }
            FsCommand::Map {
                ino,
                first,
                count,
                ahead,
            } => self.map(*ino, *first, *count, *ahead),
            FsCommand::Written { .. } => self.apply_written(cmd, false, by),
            FsCommand::TrimAlone { cmd } => self.apply_written(cmd, true, by),
            FsCommand::AclAs {
                fsetid,
                member_of,
                cmd,
            } => {
                let FsCommand::SetXattr { ino, name, .. } = &**cmd else {
                    return Err(FsError::Invalid);
                };
                let reply = self.apply_as(cmd, by)?;
                let i = self.get_mut(*ino)?;
                if name == acl::ACCESS && !*fsetid && *member_of != Some(i.attr.gid) {
                    i.attr.perm &= !0o2000;
                }
                match reply {
                    FsReply::Attr(_) => Ok(FsReply::Attr(i.attr.clone())),
                    other => Ok(other),
                }
            }
            FsCommand::Punch {
                ino,
                first,
                count,
                now,
            } => {
                let i = self.get_mut(*ino)?;
                if i.attr.kind != Kind::File {
                    return Err(FsError::Invalid);
                }
                let end = first.saturating_add(*count);
                let freed = cut_range(i, *first, end);
                let gone: Vec<u64> = i.unwritten.range(*first..end).copied().collect();
                for b in gone {
                    i.unwritten.remove(&b);
                }
                i.attr.mtime = *now;
                i.attr.ctime = *now;
                let attr = i.attr.clone();
                self.free_blocks(*ino, freed, by);
                Ok(FsReply::Attr(attr))
            }
            FsCommand::Accessed { ino, now } => {
                let i = self.get_mut(*ino)?;
                if atime_due(&i.attr, *now) && *now > i.attr.atime {
                    i.attr.atime = *now;
                }
                Ok(FsReply::Attr(i.attr.clone()))
            }
            FsCommand::UnlinkDrop { cmd } => {
                if !matches!(**cmd, FsCommand::Unlink { .. } | FsCommand::Rename { .. }) {
                    return Err(FsError::Invalid);
                }
                if let FsReply::Orphaned(Some(ino)) = self.apply_as(cmd, by)? {
                    // An orphan a mount still has open goes at its last `Close`.
                    if !self.is_open(ino) {
                        self.drop_inode(ino);
                    }
                }
                Ok(FsReply::Orphaned(None))
            }
            FsCommand::Drop { ino } => {
                let i = self.get(*ino)?;
                if i.attr.nlink != 0 || *ino == ROOT {
                    return Err(FsError::Invalid);
                }
                // An orphan a mount still has open goes at its last `Close`.
                if !self.is_open(*ino) {
                    self.drop_inode(*ino);
                }
                Ok(FsReply::Done)
            }
            FsCommand::OpenSession { now } => {
                if !self.formatted {
                    return Err(FsError::NotFormatted);
                }
                self.next_session += 1;
                let id = self.next_session;
                self.sessions.insert(
                    id,
                    Session {
                        started: *now,
                        ..Session::default()
                    },
                );
                Ok(FsReply::Session(id))
            }
            FsCommand::EndSession { session } => {
                let Some(s) = self.sessions.remove(session) else {
                    return Ok(FsReply::Done);
                };
                self.acknowledge(*session, |_| true);
                self.locks.release_session(*session);
                for ino in s.opens.keys() {
                    self.drop_if_unused(*ino);
                }
                Ok(FsReply::Done)
            }
            FsCommand::Open { session, ino } => {
                let attr = self.get(*ino)?.attr.clone();
                if attr.kind == Kind::Dir {
                    return Err(FsError::IsDir);
                }
                let s = self.sessions.get_mut(session).ok_or(FsError::NoSession)?;
                *s.opens.entry(*ino).or_default() += 1;
                Ok(FsReply::Attr(attr))
            }
            FsCommand::Close { session, ino } => {
                let s = self.sessions.get_mut(session).ok_or(FsError::NoSession)?;
                let Some(n) = s.opens.get_mut(ino) else {
                    return Err(FsError::Invalid);
                };
                *n -= 1;
                if *n == 0 {
                    s.opens.remove(ino);
                    s.stale.remove(ino);
                    let ino = *ino;
                    self.acknowledge(*session, |h| h.ino == ino);
                    self.drop_if_unused(ino);
                }
                Ok(FsReply::Done)
            }
            FsCommand::Refreshed {
                session,
                ino,
                freeing,
            } => {
                let s = self.sessions.get_mut(session).ok_or(FsError::NoSession)?;
                if s.stale.get(ino).is_some_and(|f| f <= freeing) {
                    s.stale.remove(ino);
                }
                let (ino, freeing) = (*ino, *freeing);
                self.acknowledge(*session, |h| h.ino == ino && h.number <= freeing);
                Ok(FsReply::Done)
            }
            FsCommand::From { session, cmd } => {
                if matches!(**cmd, FsCommand::From { .. }) {
                    return Err(FsError::Invalid);
                }
                // An ended session's maps may name blocks given away since.
                if !self.sessions.contains_key(session) {
                    return Err(FsError::NoSession);
                }
                self.apply_as(cmd, Some(*session))
            }
            FsCommand::CreateOpen { session, cmd } => {
                let create = match &**cmd {
                    FsCommand::Umask { cmd, .. } => cmd,
                    _ => cmd,
                };
                if !matches!(
                    **create,
                    FsCommand::Create {
                        kind: Kind::File,
                        ..
                    }
                ) {
                    return Err(FsError::Invalid);
                }
                if !self.sessions.contains_key(session) {
                    return Err(FsError::NoSession);
                }
                let reply = self.apply_as(cmd, Some(*session))?;
                if let (FsReply::Attr(a), Some(s)) = (&reply, self.sessions.get_mut(session)) {
                    *s.opens.entry(a.ino).or_default() += 1;
                }
                Ok(reply)
            }
            FsCommand::WrittenClose { session, ino, cmd } => {
                let written = match &**cmd {
                    FsCommand::TrimAlone { cmd } => cmd,
                    _ => cmd,
                };
                if !matches!(**written, FsCommand::Written { ino: i, .. } if i == *ino) {
                    return Err(FsError::Invalid);
                }
                let s = self.sessions.get(session).ok_or(FsError::NoSession)?;
                if !s.opens.contains_key(ino) {
                    return Err(FsError::Invalid);
                }
                // Checked first, so the close below cannot be refused once the
                // write is applied.
                let reply = self.apply_as(cmd, Some(*session))?;
                self.apply_as(
                    &FsCommand::Close {
                        session: *session,
                        ino: *ino,
                    },
                    None,
                )?;
                Ok(reply)
            }
            FsCommand::SetLock {
                session,
                ino,
                owner,
                start,
                end,
                kind,
                pid,
            } => {
                self.get(*ino)?;
                if !self.sessions.contains_key(session) {
                    return Err(FsError::NoSession);
                }
                let owner = Owner {
                    session: *session,
                    owner: *owner,
                };
                match self.locks.set(*ino, owner, *start, *end, *kind, *pid) {
                    Ok(()) => Ok(FsReply::Done),
                    Err(LockError::Conflict) => Err(FsError::WouldBlock),
                    Err(LockError::TooMany) => Err(FsError::NoLocks),
                    Err(LockError::Invalid) => Err(FsError::Invalid),
                }
            }
            FsCommand::ReleaseLocks {
                session,
                ino,
                owner,
            } => {
                let owner = Owner {
                    session: *session,
                    owner: *owner,
                };
                self.locks.release(*ino, owner);
                Ok(FsReply::Done)
            }
        }
    }

    /// Applies a `Create` (`umask`: that of a [`FsCommand::Umask`], whose `perm` is
    /// not masked yet).
    fn create(&mut self, cmd: &FsCommand, umask: Option<u16>) -> FsResult {
        let FsCommand::Create {
            parent,
            name,
            kind,
            perm,
            uid,
            gid,
            rdev,
            target,
            now,
        } = cmd
        else {
            return Err(FsError::Invalid);
        };
        {
            check_name(name)?;
            let d = self.dir(*parent)?;
            if d.entries.contains_key(name) {
                return Err(FsError::Exists);
            }
            if *kind == Kind::Symlink && (target.is_empty() || target.len() > SYMLINK_MAX) {
                return Err(if target.is_empty() {
                    FsError::NotFound
                } else {
                    FsError::NameTooLong
                });
            }
            if *kind == Kind::Dir && d.attr.nlink >= LINK_MAX {
                return Err(FsError::TooManyLinks);
            }
            // A default ACL of the directory is inherited (not by a symlink), the
            // mode asked for masking it; else the umask applies.
            // A plain `Create` (a mount of a version before ACLs) inherits none.
            let inherited = match d.xattrs.get(acl::DEFAULT) {
                Some(v) if umask.is_some() && *kind != Kind::Symlink => {
                    Some((Acl::decode(v)?, v.clone()))
                }
                _ => None,
            };
            let mut perm = *perm & 0o7777;
            let mut access = None;
            if let Some((default, _)) = &inherited {
                let (a, mode) = default.inherit(perm);
                perm = mode;
                access = (!a.is_minimal()).then(|| a.encode());
            } else if let (Some(u), false) = (umask, *kind == Kind::Symlink) {
                // (A symlink's mode is never masked.)
                perm &= !(u & 0o777);
            }
            // A set-gid directory gives its group to what is made in it, and
            // its set-gid bit to new directories.
            let (gid, perm) = if d.attr.perm & 0o2000 != 0 {
                let sgid = if *kind == Kind::Dir { 0o2000 } else { 0 };
                (d.attr.gid, perm | sgid)
            } else {
                (*gid, perm)
            };
            let ino = self.next_ino;
            self.next_ino += 1;
            let mut inode = new_inode(ino, *kind, perm, *uid, gid, *rdev, *now, *parent);
            if *kind == Kind::Symlink {
                inode.target = target.clone();
                inode.attr.size = target.len() as u64;
            }
            if let Some(a) = access {
                inode.xattrs.insert(acl::ACCESS.to_vec(), a);
            }
            if let (Some((_, default)), Kind::Dir) = (inherited, *kind) {
                inode.xattrs.insert(acl::DEFAULT.to_vec(), default);
            }
            let attr = inode.attr.clone();
            self.inodes.insert(ino, inode);
            let d = self.get_mut(*parent)?;
            d.entries.insert(name.clone(), ino);
            if *kind == Kind::Dir {
                d.attr.nlink += 1;
            }
            self.touch_dir(*parent, *now);
            Ok(FsReply::Attr(attr))
        }
    }

    /// Whether a mount session has `ino` open.
    fn is_open(&self, ino: Ino) -> bool {
        self.sessions.values().any(|s| s.opens.contains_key(&ino))
    }

    /// Drops `ino` if it is an orphan (a file without names) no session has open.
    fn drop_if_unused(&mut self, ino: Ino) {
        let orphan = self
            .inodes
            .get(&ino)
            .is_some_and(|i| i.attr.nlink == 0 && i.attr.kind != Kind::Dir && ino != ROOT);
        if orphan && !self.is_open(ino) {
            self.drop_inode(ino);
        }
    }

    /// Removes an inode and frees its blocks (no session has it open).
    fn drop_inode(&mut self, ino: Ino) {
        self.locks.release_file(ino);
        if let Some(i) = self.inodes.remove(&ino) {
            for e in i.extents.values() {
                self.release(*e);
            }
        }
    }

    /// Frees blocks cut from `ino`: at once if no session but `by` has the inode
    /// open, else held until each of those sessions acknowledged ([`Held`]).
    fn free_blocks(&mut self, ino: Ino, extents: Vec<Extent>, by: Option<SessionId>) {
        if extents.is_empty() {
            return;
        }
        let waiting: BTreeSet<SessionId> = self
            .sessions
            .iter()
            .filter(|(id, s)| Some(**id) != by && s.opens.contains_key(&ino))
            .map(|(id, _)| *id)
            .collect();
        if waiting.is_empty() {
            for e in extents {
                self.release(e);
            }
            return;
        }
        self.next_freeing += 1;
        let number = self.next_freeing;
        for id in &waiting {
            if let Some(s) = self.sessions.get_mut(id) {
                s.stale.insert(ino, number);
            }
        }
        self.held.insert(
            number,
            Held {
                ino,
                extents,
                waiting,
            },
        );
    }

    /// `session` acknowledges the held freeings `which` accepts: those no session
    /// waits for any more are freed.
    fn acknowledge(&mut self, session: SessionId, which: impl Fn(&HeldRef) -> bool) {
        let mut done = Vec::new();
        for (number, h) in self.held.iter_mut() {
            if which(&HeldRef {
                number: *number,
                ino: h.ino,
            }) {
                h.waiting.remove(&session);
                if h.waiting.is_empty() {
                    done.push(*number);
                }
            }
        }
        for number in done {
            if let Some(h) = self.held.remove(&number) {
                for e in h.extents {
                    self.release(e);
                }
            }
        }
    }

    /// One name of `ino` is gone: lowers its link count; the inode if it has no
    /// names left (a directory is removed at once, a file waits for `Drop`).
    fn unlinked(&mut self, ino: Ino, now: Time) -> Option<Ino> {
        let i = self.inodes.get_mut(&ino)?;
        i.attr.ctime = now;
        if i.attr.kind == Kind::Dir {
            self.inodes.remove(&ino);
            return None;
        }
        i.attr.nlink = i.attr.nlink.saturating_sub(1);
        (i.attr.nlink == 0).then_some(ino)
    }

    /// Whether `ino` is `ancestor` or lies below it.
    fn is_within(&self, mut ino: Ino, ancestor: Ino) -> bool {
        // Parents lead to the root; the bound only guards against a corrupt state.
        for _ in 0..=self.inodes.len() {
            if ino == ancestor {
                return true;
            }
            match self.inodes.get(&ino) {
                Some(i) if i.parent != ino => ino = i.parent,
                _ => return false,
            }
        }
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        noreplace: bool,
        exchange: bool,
        now: Time,
    ) -> FsResult {
        check_name(name)?;
        check_name(new_name)?;
        if noreplace && exchange {
            return Err(FsError::Invalid);
        }
        let src = *self
            .dir(parent)?
            .entries
            .get(name)
            .ok_or(FsError::NotFound)?;
        let dst = self.dir(new_parent)?.entries.get(new_name).copied();
        let src_dir = self.get(src)?.attr.kind == Kind::Dir;
        if src_dir && self.is_within(new_parent, src) {
            return Err(FsError::Invalid);
        }
        if exchange {
            let dst = dst.ok_or(FsError::NotFound)?;
            let dst_dir = self.get(dst)?.attr.kind == Kind::Dir;
            if dst_dir && self.is_within(parent, dst) {
                return Err(FsError::Invalid);
            }
            self.get_mut(parent)?.entries.insert(name.to_vec(), dst);
            self.get_mut(new_parent)?
                .entries
                .insert(new_name.to_vec(), src);
            self.moved(src, src_dir, parent, new_parent, now);
            self.moved(dst, dst_dir, new_parent, parent, now);
            return Ok(FsReply::Orphaned(None));
        }
        let mut orphan = None;
        if let Some(dst) = dst {
            if noreplace {
                return Err(FsError::Exists);
            }
            if dst == src {
                return Ok(FsReply::Orphaned(None));
            }
            let d = self.get(dst)?;
            let dst_dir = d.attr.kind == Kind::Dir;
            match (src_dir, dst_dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !d.entries.is_empty() => return Err(FsError::NotEmpty),
                _ => {}
            }
            if dst_dir {
                self.get_mut(new_parent)?.attr.nlink -= 1;
            }
            orphan = self.unlinked(dst, now);
        }
        self.get_mut(parent)?.entries.remove(name);
        self.get_mut(new_parent)?
            .entries
            .insert(new_name.to_vec(), src);
        self.moved(src, src_dir, parent, new_parent, now);
        Ok(FsReply::Orphaned(orphan))
    }

    /// `ino` moved from directory `from` to `to`: parent links and times.
    fn moved(&mut self, ino: Ino, is_dir: bool, from: Ino, to: Ino, now: Time) {
        if is_dir && from != to {
            if let Some(f) = self.inodes.get_mut(&from) {
                f.attr.nlink -= 1;
            }
            if let Some(t) = self.inodes.get_mut(&to) {
                t.attr.nlink += 1;
            }
        }
        if let Some(i) = self.inodes.get_mut(&ino) {
            if is_dir {
                i.parent = to;
            }
            i.attr.ctime = now;
        }
        self.touch_dir(from, now);
        self.touch_dir(to, now);
    }

    fn set_attr(&mut self, ino: Ino, set: &SetAttr, now: Time, by: Option<SessionId>) -> FsResult {
        let bs = u64::from(self.block_size.max(1));
        let i = self.get(ino)?;
        if let Some(size) = set.size {
            match i.attr.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
            if size.div_ceil(bs) > self.max_file_blocks() {
                return Err(FsError::TooLarge);
            }
            let keep = size.div_ceil(bs);
            let i = self.get_mut(ino)?;
            // Unwritten blocks past the new end go with the rest.
            drop(i.unwritten.split_off(&keep));
            let freed = cut_extents(i, keep);
            self.free_blocks(ino, freed, by);
        }
        let i = self.get_mut(ino)?;
        if let Some(size) = set.size {
            i.attr.size = size;
            i.attr.mtime = now;
        }
        if let Some(p) = set.perm {
            i.attr.perm = p & 0o7777;
            // (A stored ACL is always valid: it was checked when set.)
            if let Some(v) = i.xattrs.get_mut(acl::ACCESS) {
                if let Ok(mut a) = Acl::decode(v) {
                    a.chmod(i.attr.perm);
                    *v = a.encode();
                }
            }
        }
        if let Some(u) = set.uid {
            i.attr.uid = u;
        }
        if let Some(g) = set.gid {
            i.attr.gid = g;
        }
        if let Some(t) = set.atime {
            i.attr.atime = t;
        }
        if let Some(t) = set.mtime {
            i.attr.mtime = t;
        }
        i.attr.ctime = now;
        i.attr.blocks = i.extents.values().map(|e| e.count).sum();
        Ok(FsReply::Attr(i.attr.clone()))
    }

    /// `cmd`, a `Written`; with `alone`, its trim only if no session but `by` has
    /// the file open.
    fn apply_written(&mut self, cmd: &FsCommand, alone: bool, by: Option<SessionId>) -> FsResult {
        let FsCommand::Written {
            ino,
            size,
            now,
            written,
            trim,
        } = cmd
        else {
            return Err(FsError::Invalid);
        };
        let shared = alone
            && self
                .sessions
                .iter()
                .any(|(id, s)| Some(*id) != by && s.opens.contains_key(ino));
        self.written(*ino, *size, *now, written, *trim && !shared, by)
    }

    fn written(
        &mut self,
        ino: Ino,
        size: u64,
        now: Time,
        written: &[BlockRange],
        trim: bool,
        by: Option<SessionId>,
    ) -> FsResult {
        let bs = u64::from(self.block_size.max(1));
        if size.div_ceil(bs) > self.max_file_blocks() || written.len() > MAP_MAX as usize {
            return Err(FsError::TooLarge);
        }
        let i = self.get(ino)?;
        if i.attr.kind != Kind::File {
            return Err(FsError::Invalid);
        }
        let stale = by
            .and_then(|s| self.sessions.get(&s))
            .is_some_and(|s| s.stale.contains_key(&ino));
        if stale && !written.is_empty() {
            return Err(FsError::StaleMap);
        }
        let i = self.get_mut(ino)?;
        for r in written {
            let end = r.first.saturating_add(r.count);
            let gone: Vec<u64> = i.unwritten.range(r.first..end).copied().collect();
            for b in gone {
                i.unwritten.remove(&b);
            }
        }
        i.attr.size = i.attr.size.max(size);
        i.attr.mtime = now;
        i.attr.ctime = now;
        if trim {
            let keep = i.attr.size.div_ceil(bs);
            let past: Vec<u64> = mapped(i, keep, u64::MAX - keep)
                .iter()
                .map(|m| m.block)
                .collect();
            if !past.is_empty() && past.iter().all(|b| i.unwritten.contains(b)) {
                for b in past {
                    i.unwritten.remove(&b);
                }
                let freed = cut_extents(i, keep);
                let attr = i.attr.clone();
                self.free_blocks(ino, freed, by);
                return Ok(FsReply::Attr(attr));
            }
        }
        Ok(FsReply::Attr(i.attr.clone()))
    }

    fn map(&mut self, ino: Ino, first: u64, count: u64, ahead: u64) -> FsResult {
        if count == 0 || count > MAP_MAX || ahead > MAP_MAX - count {
            return Err(FsError::Invalid);
        }
        let end = first.checked_add(count).ok_or(FsError::TooLarge)?;
        if end > self.max_file_blocks() {
            return Err(FsError::TooLarge);
        }
        // Blocks ahead only as far as the file may grow.
        let ahead = ahead.min(self.max_file_blocks() - end);
        let i = self.get(ino)?;
        if i.attr.kind != Kind::File {
            return Err(FsError::Invalid);
        }
        let have = mapped(i, first, count);
        let missing: Vec<u64> = {
            let have: BTreeSet<u64> = have.iter().map(|m| m.block).collect();
            (first..end).filter(|b| !have.contains(b)).collect()
        };
        if missing.len() as u64 > self.blocks - self.used {
            return Err(FsError::NoSpace);
        }
        // Prefer the data block after the previous file block's, for long runs.
        let mut goal = first
            .checked_sub(1)
            .and_then(|p| mapped(i, p, 1).first().map(|m| m.lba + 1));
        let extra: Vec<u64> = if ahead > 0 {
            let have: BTreeSet<u64> = mapped(i, end, ahead).iter().map(|m| m.block).collect();
            (end..end + ahead)
                .filter(|b| !have.contains(b))
                .take(((self.blocks - self.used - missing.len() as u64) / AHEAD_SHARE) as usize)
                .collect()
        } else {
            Vec::new()
        };
        for b in missing.into_iter().chain(extra) {
            let lba = self.take_one(goal).ok_or(FsError::NoSpace)?;
            goal = Some(lba + 1);
            let i = self.get_mut(ino)?;
            insert_block(&mut i.extents, b, lba);
            i.unwritten.insert(b);
            i.attr.blocks += 1;
        }
        let i = self.get(ino)?;
        Ok(FsReply::Mapped(mapped(i, first, count + ahead)))
    }

    /// Takes one free data block, `goal` if it is free.
    fn take_one(&mut self, goal: Option<u64>) -> Option<u64> {
        let (start, count) = match goal.and_then(|g| {
            self.free
                .range(..=g)
                .next_back()
                .filter(|(s, c)| g < *s + *c)
                .map(|(s, c)| (*s, *c))
        }) {
            Some(run) => run,
            None => self.free.iter().next().map(|(s, c)| (*s, *c))?,
        };
        let lba = match goal {
            Some(g) if g >= start && g < start + count => g,
            _ => start,
        };
        self.free.remove(&start);
        if lba > start {
            self.free.insert(start, lba - start);
        }
        if lba + 1 < start + count {
            self.free.insert(lba + 1, start + count - lba - 1);
        }
        self.used += 1;
        Some(lba)
    }

    /// Returns a run of data blocks to the free list, merging neighbours.
    fn release(&mut self, e: Extent) {
        if e.count == 0 {
            return;
        }
        let mut start = e.lba;
        let mut count = e.count;
        if let Some((&s, &c)) = self.free.range(..start).next_back() {
            if s + c == start {
                self.free.remove(&s);
                start = s;
                count += c;
            }
        }
        if let Some(&c) = self.free.get(&(start + count)) {
            self.free.remove(&(start + count));
            count += c;
        }
        self.free.insert(start, count);
        self.used -= e.count.min(self.used);
    }

    /// The largest file, in blocks: 1024 times the volume (files may be sparse).
    pub fn max_file_blocks(&self) -> u64 {
        max_file_blocks(self.blocks)
    }

    /// Checks the invariants of the module documentation; the first violation.
    pub fn check(&self) -> Result<(), String> {
        if !self.formatted {
            return Ok(());
        }
        let mut names: BTreeMap<Ino, u32> = BTreeMap::new();
        let mut subdirs: BTreeMap<Ino, u32> = BTreeMap::new();
        for (ino, i) in &self.inodes {
            for (name, child) in &i.entries {
                let c = self
                    .inodes
                    .get(child)
                    .ok_or(format!("{ino}/{name:?} names missing inode {child}"))?;
                *names.entry(*child).or_default() += 1;
                if c.attr.kind == Kind::Dir {
                    *subdirs.entry(*ino).or_default() += 1;
                    if c.parent != *ino {
                        return Err(format!("dir {child} is in {ino}, parent says {}", c.parent));
                    }
                }
            }
        }
        let mut owned: BTreeMap<u64, Ino> = BTreeMap::new();
        let mut used = 0;
        for (ino, i) in &self.inodes {
            let n = names.get(ino).copied().unwrap_or(0);
            if i.attr.kind == Kind::Dir {
                if *ino != ROOT && n != 1 {
                    return Err(format!("dir {ino} has {n} names"));
                }
                let want = 2 + subdirs.get(ino).copied().unwrap_or(0);
                if i.attr.nlink != want {
                    return Err(format!("dir {ino} nlink {} want {want}", i.attr.nlink));
                }
            } else if i.attr.nlink != n {
                return Err(format!("{ino} nlink {} but {n} names", i.attr.nlink));
            }
            for e in i.extents.values() {
                for lba in e.lba..e.lba + e.count {
                    if let Some(other) = owned.insert(lba, *ino) {
                        return Err(format!("block {lba} in {other} and {ino}"));
                    }
                    used += 1;
                }
            }
            for b in &i.unwritten {
                if mapped(i, *b, 1).is_empty() {
                    return Err(format!("{ino}: unwritten block {b} is not mapped"));
                }
            }
            let blocks: u64 = i.extents.values().map(|e| e.count).sum();
            if blocks != i.attr.blocks {
                return Err(format!(
                    "{ino} counts {} blocks, holds {blocks}",
                    i.attr.blocks
                ));
            }
        }
        for (number, h) in &self.held {
            if h.waiting.is_empty() {
                return Err(format!("freeing {number} waits for no session"));
            }
            for id in &h.waiting {
                let stale = self.sessions.get(id).and_then(|s| s.stale.get(&h.ino));
                if stale.is_none_or(|f| f < number) {
                    return Err(format!(
                        "freeing {number} waits for {id}, which was not told"
                    ));
                }
            }
            for e in &h.extents {
                for lba in e.lba..e.lba + e.count {
                    if let Some(other) = owned.insert(lba, h.ino) {
                        return Err(format!("held block {lba} also in {other}"));
                    }
                    used += 1;
                }
            }
        }
        for (id, s) in &self.sessions {
            if let Some((ino, _)) = s
                .opens
                .iter()
                .find(|(i, n)| **n == 0 || !self.inodes.contains_key(i))
            {
                return Err(format!("session {id} has {ino} open, which is gone"));
            }
        }
        self.locks.check()?;
        for ino in self.locks.files() {
            if !self.inodes.contains_key(&ino) {
                return Err(format!("inode {ino} is gone and has locks"));
            }
            if let Some(l) = self
                .locks
                .of(ino)
                .iter()
                .find(|l| !self.sessions.contains_key(&l.owner.session))
            {
                return Err(format!("inode {ino}: {l:?} of an ended session"));
            }
        }
        let mut free = 0;
        for (s, c) in &self.free {
            if let Some((lba, ino)) = owned.range(s..&(s + c)).next() {
                return Err(format!("free block {lba} belongs to {ino}"));
            }
            free += c;
        }
        if used != self.used || used + free != self.blocks {
            return Err(format!(
                "used {used} (counted {}) + free {free} != {}",
                self.used, self.blocks
            ));
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn new_inode(
    ino: Ino,
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    rdev: u32,
    now: Time,
    parent: Ino,
) -> Inode {
    Inode {
        attr: Attr {
            ino,
            kind,
            perm,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            uid,
            gid,
            rdev,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            generation: 1,
        },
        entries: BTreeMap::new(),
        parent,
        target: Vec::new(),
        extents: BTreeMap::new(),
        unwritten: BTreeSet::new(),
        xattrs: BTreeMap::new(),
    }
}

/// The mapped blocks of `first .. first + count`.
fn mapped(i: &Inode, first: u64, count: u64) -> Vec<Mapping> {
    let end = first.saturating_add(count);
    let mut out = Vec::new();
    let start = i
        .extents
        .range(..=first)
        .next_back()
        .map(|(b, _)| *b)
        .unwrap_or(first);
    for (b, e) in i.extents.range(start..end) {
        for n in 0..e.count {
            let block = b + n;
            if block >= first && block < end {
                out.push(Mapping {
                    block,
                    lba: e.lba + n,
                    fresh: i.unwritten.contains(&block),
                });
            }
        }
    }
    out
}

/// Adds file block `b` -> `lba`, extending a neighbouring run where it continues it.
fn insert_block(extents: &mut BTreeMap<u64, Extent>, b: u64, lba: u64) {
    if let Some((&pb, pe)) = extents.range_mut(..b).next_back() {
        if pb + pe.count == b && pe.lba + pe.count == lba {
            pe.count += 1;
            if let Some(next) = extents.get(&(b + 1)).copied() {
                if next.lba == lba + 1 {
                    extents.remove(&(b + 1));
                    if let Some(pe) = extents.get_mut(&pb) {
                        pe.count += next.count;
                    }
                }
            }
            return;
        }
    }
    if let Some(next) = extents.get(&(b + 1)).copied() {
        if next.lba == lba + 1 {
            extents.remove(&(b + 1));
            extents.insert(
                b,
                Extent {
                    lba,
                    count: next.count + 1,
                },
            );
            return;
        }
    }
    extents.insert(b, Extent { lba, count: 1 });
}

/// Drops every file block from `keep` on; the runs of data blocks freed.
fn cut_extents(i: &mut Inode, keep: u64) -> Vec<Extent> {
    cut_range(i, keep, u64::MAX)
}

/// Removes file blocks `from .. to` from `i`'s extents; returns their data blocks.
fn cut_range(i: &mut Inode, from: u64, to: u64) -> Vec<Extent> {
    let mut freed = Vec::new();
    if from >= to {
        return freed;
    }
    // The extent holding `from`, if one does, and every one starting before `to`.
    let start = i
        .extents
        .range(..=from)
        .next_back()
        .map(|(b, _)| *b)
        .unwrap_or(from);
    let hit: Vec<(u64, Extent)> = i.extents.range(start..to).map(|(b, e)| (*b, *e)).collect();
    for (b, e) in hit {
        let end = b + e.count;
        let (lo, hi) = (b.max(from), end.min(to));
        if lo >= hi {
            continue;
        }
        i.extents.remove(&b);
        if b < lo {
            i.extents.insert(
                b,
                Extent {
                    lba: e.lba,
                    count: lo - b,
                },
            );
        }
        if hi < end {
            i.extents.insert(
                hi,
                Extent {
                    lba: e.lba + (hi - b),
                    count: end - hi,
                },
            );
        }
        freed.push(Extent {
            lba: e.lba + (lo - b),
            count: hi - lo,
        });
    }
    i.attr.blocks = i.extents.values().map(|e| e.count).sum();
    freed
}

/// The file system state as the state machine holds it: shared with the replica's
/// query handler (which reads it under the lock after a linearizable read) without
/// copying. Cloning copies the state.
#[derive(Debug, Default)]
pub struct SharedFs(Arc<RwLock<FsState>>);

impl SharedFs {
    pub fn read(&self) -> RwLockReadGuard<'_, FsState> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, FsState> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Another handle on the same state (not a copy).
    pub fn share(&self) -> SharedFs {
        SharedFs(self.0.clone())
    }
}

impl From<FsState> for SharedFs {
    fn from(fs: FsState) -> SharedFs {
        SharedFs(Arc::new(RwLock::new(fs)))
    }
}

impl Clone for SharedFs {
    fn clone(&self) -> SharedFs {
        SharedFs(Arc::new(RwLock::new(self.read().clone())))
    }
}

impl PartialEq for SharedFs {
    fn eq(&self, other: &SharedFs) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || *self.read() == *other.read()
    }
}

impl Eq for SharedFs {}

impl Serialize for SharedFs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.read().serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedFs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SharedFs, D::Error> {
        Ok(SharedFs(Arc::new(RwLock::new(FsState::deserialize(d)?))))
    }
}
