//! The mount's byte-range locks: `fcntl` (`F_SETLK`, `F_SETLKW`, `F_GETLK`, and the
//! open file description locks `F_OFD_*`) and `flock`, which the kernel sends as a
//! lock of the whole file. They are held in the metadata service's lock table
//! ([`drs_meta::locks`]) under the mount's session, so processes on every mount of
//! the file system exclude each other.
//!
//! - A lock or an unlock is a metadata command (`SetLock`), `F_GETLK` a linearizable
//!   read (`GetLock`). `F_GETLK` names the holder's process only if it locked
//!   through this mount (else 0).
//! - Data under a lock (as NFS does it): before an unlock or a downgrade the mount
//!   commits its writes of the file, and when a lock is granted it forgets the
//!   file's size and block map and has the kernel drop its cached pages, so a holder
//!   reads what earlier holders wrote, even through a descriptor it kept open. A
//!   `writeback_cache` mount holds writes in the kernel until they are flushed: use
//!   `fsync` before unlocking there.
//! - `F_SETLKW` waits: while the lock conflicts, it asks `GetLock` (a read, no log
//!   entry) at growing intervals up to [`POLL_MAX`], and at once when a lock owner of
//!   this mount unlocks or releases, then tries `SetLock` again. There is no queue,
//!   so waiters are not served in order, and no deadlock detection (`EDEADLK` is
//!   never returned).
//! - The kernel's interrupt requests are not delivered to the file system, so a
//!   waiter watches its own thread instead ([`signal_pending`]): once it has a
//!   signal pending that it does not block, the wait ends with `EINTR`, so a process
//!   killed while it waits returns within a poll interval. Where the mount cannot
//!   read the waiter's `/proc` status (`hidepid`, another pid namespace), a wait
//!   ends only with the lock.
//! - Releases: the kernel flushes a file at every `close` with the closing
//!   process's lock owner, whose locks on the file then go (POSIX: any close drops
//!   the process's locks on the file); at the release of an open file (its last
//!   close) go its `flock` and its open file description locks, whose owner is the
//!   open file. Only owners that took a lock through this mount cost a command. A
//!   release that fails (no metadata quorum within the timeout) leaves the lock to
//!   the owner's next close, or to the session's end.
//! - The locks of a session that ends (unmount) or expires (a mount killed or cut
//!   off for `--session-expiry-ms`) are released by the metadata service. A mount
//!   that finds its session expired has lost its locks, and another mount may
//!   have taken them and changed the file meanwhile. As NFS does it, every open
//!   file through which a lock still held then was taken fails its reads, writes,
//!   fsyncs and new lock requests with EIO until it is closed
//!   ([`OpError::LocksLost`]), so the process does not go on as if it still held
//!   the lock; unlocks succeed without effect, and a new open of the file works.
//!   The mount marks them as soon as it finds the session ended, before reads and
//!   writes go on. Not stopped: a process that locked through one open file and
//!   does its I/O through another, reads the kernel answers from its page cache,
//!   and writes on a `writeback_cache` mount (the kernel sends them through any
//!   open file). A lock request made while the session is being replaced waits
//!   for the new one.
//! - `flock` locks are whole-file locks of the open file, as on NFS: they conflict
//!   with `fcntl` locks of other owners of the same file, even of the same process
//!   (which on a local file system they do not), and one open file's `flock` and
//!   open file description locks are one owner's.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drs_meta::fs::{FsCommand, FsError, FsQuery, FsReply, Ino, SessionId};
use drs_meta::locks::LockKind;

use super::{lock, OpError, OpResult, Ops};

/// First pause of a waiting `F_SETLKW` between its checks of the lock.
const POLL_FIRST: Duration = Duration::from_millis(5);
/// Longest pause between two checks of a waiting `F_SETLKW`.
pub const POLL_MAX: Duration = Duration::from_millis(200);
/// The kernel's "to the end of the file, however far" (`OFFSET_MAX`); it sends no
/// larger offset and takes none back.
const OFFSET_MAX: u64 = i64::MAX as u64;

/// What this mount knows of its lock owners' locks.
#[derive(Debug, Default)]
pub(super) struct LockBook {
    /// (session, inode, lock owner) that may hold locks: only these cost a
    /// `ReleaseLocks` at a close.
    held: HashSet<(SessionId, Ino, u64)>,
    /// Open file handle -> its inode and the owners that locked through it. An
    /// open file description lock (`F_OFD_*`) is owned by the open file, which the
    /// kernel names at no close: its owner is released with the handle.
    by_fh: HashMap<u64, (Ino, HashSet<u64>)>,
    /// Open file handles through which locks were taken that an expired session
    /// lost: their I/O fails until the kernel releases them.
    lost: HashSet<u64>,
    /// The byte ranges (`start ..= end`, merged) each (session, inode, lock owner)
    /// was granted and has not unlocked: the owners an expired session leaves
    /// without locks they held. (`held` also names owners that only tried.)
    granted: HashMap<(SessionId, Ino, u64), Vec<(u64, u64)>>,
}

/// Adds `start ..= end` to merged ranges `v`.
fn add_range(v: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    v.push((start, end));
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v.drain(..) {
        match merged.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    *v = merged;
}

/// Takes `start ..= end` out of ranges `v`.
fn cut_range(v: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let mut kept = Vec::with_capacity(v.len() + 1);
    for &(s, e) in v.iter() {
        if e < start || s > end {
            kept.push((s, e));
            continue;
        }
        if s < start {
            kept.push((s, start - 1));
        }
        if e > end {
            kept.push((end + 1, e));
        }
    }
    *v = kept;
}

/// A lock request of the kernel: lock owner `owner` of this mount asks, through
/// open file handle `fh`, for bytes `start ..= end` of `ino`.
#[derive(Debug, Clone, Copy)]
pub struct LockRequest {
    pub ino: Ino,
    pub fh: u64,
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
    /// The process the lock is for (the lock's `l_pid`).
    pub pid: u32,
}

/// A conflicting lock, as `F_GETLK` reports it (`typ` is `F_UNLCK` if there is none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockHolder {
    pub start: u64,
    pub end: u64,
    pub typ: i32,
    /// The holder's process if it locked through this mount, else 0 (a process of
    /// another machine has no number here).
    pub pid: u32,
}

fn kind_of(typ: i32) -> OpResult<LockKind> {
    match typ {
        libc::F_RDLCK => Ok(LockKind::Read),
        libc::F_WRLCK => Ok(LockKind::Write),
        libc::F_UNLCK => Ok(LockKind::Unlock),
        _ => Err(OpError::Fs(FsError::Invalid)),
    }
}

impl LockRequest {
    /// The range within what the kernel can express.
    fn clamped(mut self) -> LockRequest {
        self.start = self.start.min(OFFSET_MAX);
        self.end = self.end.min(OFFSET_MAX);
        self
    }
}

impl Ops {
    /// `F_GETLK`: the first lock of another owner that `r` conflicts with.
    pub async fn getlk(&self, r: LockRequest) -> OpResult<LockHolder> {
        let r = r.clamped();
        let kind = kind_of(r.typ)?;
        let none = LockHolder {
            start: r.start,
            end: r.end,
            typ: libc::F_UNLCK,
            pid: 0,
        };
        if kind == LockKind::Unlock {
            return Ok(none);
        }
        Ok(match self.bounded(self.conflict(&r, kind)).await? {
            Some(h) => h,
            None => none,
        })
    }

    /// `F_SETLK` (`wait`: `F_SETLKW`, by thread `waiter` of the mount's pid
    /// namespace, the request's sender). Before an unlock or a downgrade, the
    /// mount commits its writes of the file, so the next holder reads them; after
    /// a lock is granted, it forgets what it knew of the file's size and blocks (the
    /// adapter drops the kernel's cached pages too), so it reads what the last
    /// holder committed.
    pub async fn setlk(&self, r: LockRequest, wait: bool, waiter: u32) -> OpResult<()> {
        let r = r.clamped();
        let kind = kind_of(r.typ)?;
        let known = {
            let book = lock(&self.locks);
            book.held.contains(&(self.session_id(), r.ino, r.owner))
        };
        if kind == LockKind::Unlock && !known {
            // This owner took no lock here (or lost them with an expired session).
            return Ok(());
        }
        self.check_handle(r.fh)?;
        if known && kind != LockKind::Write {
            if let Err(e) = self.flush(r.ino).await {
                // A downgrade fails and changes nothing. An unlock goes on (a lock
                // kept would outlive the error): the writes stay uncommitted, and
                // the file's next flush, fsync or close tries again or fails (a
                // lost write-back is kept for it to report).
                if let OpError::WriteBack(m) = &e {
                    if let Some(o) = lock(&self.open).get_mut(&r.ino) {
                        o.write_error.get_or_insert_with(|| m.clone());
                    }
                }
                if kind == LockKind::Read {
                    return Err(e);
                }
                tracing::warn!(ino = r.ino, error = %e, "unlocking with writes not committed");
            }
        }
        let mut pause = POLL_FIRST;
        loop {
            let session = self.session_id();
            // Noted first: a lock granted whose answer is lost is released at close.
            if kind != LockKind::Unlock {
                self.note_lock(session, &r);
            }
            let cmd = FsCommand::SetLock {
                session,
                ino: r.ino,
                owner: r.owner,
                start: r.start,
                end: r.end,
                kind,
                pid: r.pid,
            };
            // Armed before the attempt, so an unlock here meanwhile is not missed.
            let mut unlocked = Box::pin(self.unlocked.notified());
            unlocked.as_mut().enable();
            match self.bounded(self.command(cmd)).await {
                Ok(_) if kind == LockKind::Unlock => {
                    {
                        let mut book = lock(&self.locks);
                        let key = (session, r.ino, r.owner);
                        if let Some(v) = book.granted.get_mut(&key) {
                            cut_range(v, r.start, r.end);
                            if v.is_empty() {
                                book.granted.remove(&key);
                            }
                        }
                    }
                    self.unlocked.notify_waiters();
                    return Ok(());
                }
                Ok(_) => {
                    // Noted again: a close of the owner may have run meanwhile.
                    self.note_lock(session, &r);
                    add_range(
                        lock(&self.locks)
                            .granted
                            .entry((session, r.ino, r.owner))
                            .or_default(),
                        r.start,
                        r.end,
                    );
                    self.refresh_after_lock(r.ino).await;
                    return Ok(());
                }
                Err(OpError::Fs(FsError::WouldBlock)) if wait => {}
                // The session ended, and its locks with it.
                Err(OpError::Fs(FsError::NoSession)) if kind == LockKind::Unlock => return Ok(()),
                Err(OpError::Fs(FsError::NoSession)) => {
                    self.bounded(async {
                        self.await_new_session(session).await;
                        Ok(())
                    })
                    .await?;
                    // Its earlier locks may have gone with the session.
                    self.check_handle(r.fh)?;
                    continue;
                }
                Err(e) => return Err(e),
            }
            // Wait until the conflicting locks are gone, then try again.
            loop {
                if signal_pending(waiter) {
                    return Err(OpError::Interrupted);
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => pause = (pause * 2).min(POLL_MAX),
                    _ = unlocked.as_mut() => pause = POLL_FIRST,
                }
                unlocked = Box::pin(self.unlocked.notified());
                unlocked.as_mut().enable();
                if self.bounded(self.conflict(&r, kind)).await?.is_none() {
                    break;
                }
            }
        }
    }

    fn note_lock(&self, session: SessionId, r: &LockRequest) {
        let mut book = lock(&self.locks);
        book.held.insert((session, r.ino, r.owner));
        book.by_fh
            .entry(r.fh)
            .or_insert_with(|| (r.ino, HashSet::new()))
            .1
            .insert(r.owner);
    }

    /// After a lock is granted: what this mount knows of the file's size and block
    /// map is forgotten (unless it has writes not yet committed), as at an open.
    async fn refresh_after_lock(&self, ino: Ino) {
        // Alone with the file first: no commit of this mount can come between the
        // attributes read and what is forgotten.
        let _freeing = self.freeing(ino).await;
        let a = self.getattr(ino).await;
        if let Some(o) = lock(&self.open).get_mut(&ino) {
            match &a {
                Ok(a) => o.forget_view(a),
                // The size stays; the block map is read again as needed.
                Err(_) => o.forget_map(),
            }
        }
    }

    /// The kernel flushed `ino` for lock owner `owner` (a `close`), or released an
    /// open file `flock`ed by `owner`: every lock of that owner on the file goes.
    pub async fn release_locks(&self, ino: Ino, owner: u64) -> OpResult<()> {
        self.release_unless(ino, owner, None).await
    }

    /// Releases `owner`'s locks on `ino` if it may hold some, and (`handle`) if it
    /// locked through no open handle of the file but that one: both decided with
    /// the book locked, so a lock noted meanwhile is never released.
    async fn release_unless(&self, ino: Ino, owner: u64, handle: Option<u64>) -> OpResult<()> {
        let session = self.session_id();
        let known = {
            let mut book = lock(&self.locks);
            let elsewhere = handle.is_some_and(|fh| {
                book.by_fh
                    .iter()
                    .any(|(h, (i, o))| *h != fh && *i == ino && o.contains(&owner))
            });
            if elsewhere {
                return Ok(());
            }
            book.held
                .retain(|(s, i, o)| (*i, *o) != (ino, owner) || *s == session);
            book.granted
                .retain(|(s, i, o), _| (*i, *o) != (ino, owner) || *s == session);
            book.held.remove(&(session, ino, owner))
        };
        if !known {
            return Ok(());
        }
        let cmd = FsCommand::ReleaseLocks {
            session,
            ino,
            owner,
        };
        let r = self.bounded(self.command(cmd)).await;
        match r {
            Ok(_) => {
                lock(&self.locks).granted.remove(&(session, ino, owner));
                self.unlocked.notify_waiters()
            }
            // Left to the owner's next close, or the session's end.
            Err(_) => {
                lock(&self.locks).held.insert((session, ino, owner));
            }
        }
        r.map(|_| ())
    }

    /// The kernel released open file handle `fh` (its last close): the locks owned
    /// by the open file itself (`F_OFD_*`, `flock`) go. An owner that also locked
    /// through another handle of this mount is a process's, whose locks its closes
    /// release.
    pub async fn release_handle(&self, fh: u64) -> OpResult<()> {
        let entry = {
            let mut book = lock(&self.locks);
            book.lost.remove(&fh);
            book.by_fh.remove(&fh)
        };
        let Some((ino, owners)) = entry else {
            return Ok(());
        };
        let mut result = Ok(());
        for owner in owners {
            if let Err(e) = self.release_unless(ino, owner, Some(fh)).await {
                result = Err(e);
            }
        }
        result
    }

    /// The session `expired` ended: the metadata service released its locks. The
    /// open files through which the owners that held some took them are marked
    /// lost; how many owners held some.
    pub(super) fn forget_locks(&self, expired: SessionId) -> usize {
        let mut book = lock(&self.locks);
        let gone: HashSet<(Ino, u64)> = book
            .granted
            .iter()
            .filter(|((s, _, _), ranges)| *s == expired && !ranges.is_empty())
            .map(|((_, ino, owner), _)| (*ino, *owner))
            .collect();
        book.held.retain(|(s, _, _)| *s != expired);
        book.granted.retain(|(s, _, _), _| *s != expired);
        let lost: Vec<u64> = book
            .by_fh
            .iter()
            .filter(|(_, (ino, owners))| owners.iter().any(|o| gone.contains(&(*ino, *o))))
            .map(|(fh, _)| *fh)
            .collect();
        book.lost.extend(lost);
        gone.len()
    }

    /// Fails with [`OpError::LocksLost`] if open file handle `fh` lost locks with
    /// an expired session.
    pub fn check_handle(&self, fh: u64) -> OpResult<()> {
        if lock(&self.locks).lost.contains(&fh) {
            return Err(OpError::LocksLost);
        }
        Ok(())
    }

    async fn conflict(&self, r: &LockRequest, kind: LockKind) -> OpResult<Option<LockHolder>> {
        let session = self.session_id();
        let q = FsQuery::GetLock {
            session,
            ino: r.ino,
            owner: r.owner,
            start: r.start,
            end: r.end,
            write: kind == LockKind::Write,
        };
        match self.query(q).await? {
            FsReply::Lock(l) => Ok(l.map(|l| LockHolder {
                start: l.start.min(OFFSET_MAX),
                end: l.end.min(OFFSET_MAX),
                typ: if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                },
                pid: if l.owner.session == session { l.pid } else { 0 },
            })),
            other => Err(OpError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Whether thread `tid` has a signal pending that it does not block (what would
/// make the kernel interrupt its request). A thread whose status cannot be read
/// (`/proc` mounted with `hidepid`, a requester in another pid namespace) is taken to
/// have none, and that is logged once: its waits can then only end with the lock.
pub fn signal_pending(tid: u32) -> bool {
    static UNREADABLE: AtomicBool = AtomicBool::new(false);
    let status = (tid != 0)
        .then(|| std::fs::read_to_string(format!("/proc/{tid}/status")).ok())
        .flatten();
    let Some(status) = status else {
        if !UNREADABLE.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                tid,
                "cannot read a lock waiter's /proc status: a waiting F_SETLKW cannot be \
                 interrupted by a signal"
            );
        }
        return false;
    };
    pending_in(&status)
}

/// [`signal_pending`] of a `/proc/<tid>/status` text: a signal for the thread, or
/// for its process if the process has this one thread, or SIGKILL (which ends
/// every thread). Another signal for a process of several threads may be taken by
/// another thread: an `EINTR` to this one would then reach the caller as a bare
/// restart code.
fn pending_in(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let mask = |name: &str| {
        field(name)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    // A stop signal with no handler stops the process, which then waits on.
    let stops = [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU]
        .iter()
        .fold(0u64, |m, s| m | 1 << (s - 1));
    let ignored = mask("SigBlk:") | (stops & !mask("SigCgt:"));
    let own = mask("SigPnd:") & !ignored;
    let shared = mask("ShdPnd:") & !ignored;
    let kill = 1 << (libc::SIGKILL - 1);
    let alone = field("Threads:").is_some_and(|t| t == "1");
    own != 0 || shared & kill != 0 || (alone && shared != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granted_ranges_merge_and_split() {
        let mut v = Vec::new();
        add_range(&mut v, 10, 19);
        add_range(&mut v, 30, 39);
        add_range(&mut v, 20, 25);
        assert_eq!(v, vec![(10, 25), (30, 39)]);
        cut_range(&mut v, 12, 31);
        assert_eq!(v, vec![(10, 11), (32, 39)]);
        add_range(&mut v, 0, u64::MAX);
        assert_eq!(v, vec![(0, u64::MAX)]);
        cut_range(&mut v, 0, 4);
        cut_range(&mut v, 100, u64::MAX);
        assert_eq!(v, vec![(5, 99)]);
        cut_range(&mut v, 0, u64::MAX);
        assert!(v.is_empty());
    }

    #[test]
    fn a_pending_signal_counts_unless_blocked_or_for_another_thread() {
        let status = |threads: u32, own: &str, shared: &str, blocked: &str| {
            format!(
                "Name:\tx\nThreads:\t{threads}\nSigQ:\t0/1\nSigPnd:\t{own}\n\
                 ShdPnd:\t{shared}\nSigBlk:\t{blocked}\n"
            )
        };
        let none = "0000000000000000";
        let kill = "0000000000000100";
        let term = "0000000000004000";
        assert!(
            pending_in(&status(4, none, kill, none)),
            "SIGKILL ends every thread"
        );
        assert!(pending_in(&status(4, term, none, none)), "the thread's own");
        assert!(
            pending_in(&status(1, none, term, none)),
            "a one-thread process"
        );
        assert!(
            !pending_in(&status(4, none, term, none)),
            "maybe another thread's"
        );
        assert!(!pending_in(&status(1, term, term, term)), "blocked");
        assert!(!pending_in(&status(1, none, none, none)));
        // A stop signal (SIGTSTP, 20) stops the process unless it is caught.
        let tstp = "0000000000080000";
        assert!(!pending_in(&status(1, tstp, none, none)));
        let caught = status(1, tstp, none, none) + "SigCgt:\t0000000000080000\n";
        assert!(pending_in(&caught));
        // This thread has no signal pending.
        let me = std::fs::read_to_string("/proc/thread-self/stat")
            .ok()
            .and_then(|s| s.split(' ').next()?.parse().ok())
            .unwrap_or(0);
        assert_ne!(me, 0);
        assert!(!signal_pending(me));
    }
}
