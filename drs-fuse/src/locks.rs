//! The mount's byte-range locks: `fcntl` (`F_SETLK`, `F_SETLKW`, `F_GETLK`, and the
//! open file description locks `F_OFD_*`) and `flock`, which the kernel sends as a
//! lock of the whole file. They are held in the metadata service's lock table
//! ([`drs_meta::locks`]) under the mount's session, so processes on every mount of
//! the file system exclude each other, as on one machine.
//!
//! - A lock or an unlock is a metadata command (`SetLock`), `F_GETLK` a linearizable
//!   read (`GetLock`).
//! - `F_SETLKW` waits: while the lock conflicts, it asks `GetLock` (a read, no log
//!   entry) at growing intervals up to [`POLL_MAX`], and at once when a lock owner of
//!   this mount unlocks or releases, then tries `SetLock` again. There is no queue,
//!   so waiters are not served in order, and no deadlock detection (`EDEADLK` is
//!   never returned).
//! - The kernel's interrupt requests are not delivered to the file system, so a
//!   waiter watches its own process instead: once the waiting thread has a signal
//!   pending that it does not block (`/proc/<tid>/status`), the wait ends with
//!   `EINTR`. A process killed while it waits thus returns at once.
//! - The kernel flushes a file at every `close` with the closing process's lock
//!   owner: that owner's locks on the file are released (POSIX: any close drops the
//!   process's locks on the file), and so is a `flock` at the release of its open
//!   file. Only owners that took a lock in this mount cost a command.
//! - The locks of a session that ends (unmount) or expires (a mount killed or cut
//!   off for `--session-expiry-ms`) are released by the metadata service. A mount
//!   that finds its session expired has lost its locks: it logs it, and later
//!   unlocks of them succeed without effect.
//! - `flock` locks are whole-file locks of the open file's owner, as on NFS: they
//!   conflict with `fcntl` locks of other owners on the same file, which on a local
//!   file system they do not.

use std::time::Duration;

use drs_meta::fs::{FsCommand, FsError, FsQuery, FsReply, Ino};
use drs_meta::locks::LockKind;

use super::{lock, OpError, OpResult, Ops};

/// First pause of a waiting `F_SETLKW` between its checks of the lock.
const POLL_FIRST: Duration = Duration::from_millis(5);
/// Longest pause between two checks of a waiting `F_SETLKW`.
pub const POLL_MAX: Duration = Duration::from_millis(200);

/// A lock request of the kernel: lock owner `owner` of this mount asks for bytes
/// `start ..= end` of `ino`.
#[derive(Debug, Clone, Copy)]
pub struct LockRequest {
    pub ino: Ino,
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

impl Ops {
    /// `F_GETLK`: the first lock of another owner that `r` conflicts with.
    pub async fn getlk(&self, r: LockRequest) -> OpResult<LockHolder> {
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
    /// namespace, the request's sender).
    pub async fn setlk(&self, r: LockRequest, wait: bool, waiter: u32) -> OpResult<()> {
        let kind = kind_of(r.typ)?;
        if kind == LockKind::Unlock && !lock(&self.locked).contains(&(r.ino, r.owner)) {
            // This owner took no lock here (or lost them with an expired session).
            return Ok(());
        }
        let mut pause = POLL_FIRST;
        loop {
            // Noted first: a lock granted whose answer is lost is released at close.
            if kind != LockKind::Unlock {
                lock(&self.locked).insert((r.ino, r.owner));
            }
            let cmd = FsCommand::SetLock {
                session: self.session_id(),
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
                Ok(_) => {
                    if kind == LockKind::Unlock {
                        self.unlocked.notify_waiters();
                    }
                    return Ok(());
                }
                Err(OpError::Fs(FsError::WouldBlock)) if wait => {}
                Err(e) => return Err(e),
            }
            // Wait until the conflicting locks are gone, then try again.
            loop {
                if signal_pending(waiter) {
                    return Err(OpError::Interrupted);
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => pause = (pause * 2).min(POLL_MAX),
                    _ = unlocked.as_mut() => {}
                }
                unlocked = Box::pin(self.unlocked.notified());
                unlocked.as_mut().enable();
                if self.bounded(self.conflict(&r, kind)).await?.is_none() {
                    break;
                }
            }
        }
    }

    /// The kernel flushed `ino` for lock owner `owner` (a `close`), or released an
    /// open file `flock`ed by `owner`: every lock of that owner on the file goes.
    pub async fn release_locks(&self, ino: Ino, owner: u64) -> OpResult<()> {
        if !lock(&self.locked).remove(&(ino, owner)) {
            return Ok(());
        }
        let cmd = FsCommand::ReleaseLocks {
            session: self.session_id(),
            ino,
            owner,
        };
        let r = self.bounded(self.command(cmd)).await;
        match r {
            Ok(_) => self.unlocked.notify_waiters(),
            // The next close of this owner tries again (or the session's end).
            Err(_) => {
                lock(&self.locked).insert((ino, owner));
            }
        }
        r.map(|_| ())
    }

    /// The lock owners of this mount that may hold locks: after the session
    /// expired, none do.
    pub(super) fn forget_locks(&self) -> usize {
        std::mem::take(&mut *lock(&self.locked)).len()
    }

    async fn conflict(&self, r: &LockRequest, kind: LockKind) -> OpResult<Option<LockHolder>> {
        let q = FsQuery::GetLock {
            session: self.session_id(),
            ino: r.ino,
            owner: r.owner,
            start: r.start,
            end: r.end,
            write: kind == LockKind::Write,
        };
        match self.query(q).await? {
            FsReply::Lock(l) => Ok(l.map(|l| LockHolder {
                start: l.start,
                end: l.end,
                typ: if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                },
                pid: l.pid,
            })),
            other => Err(OpError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Whether thread `tid` has a signal pending that it does not block (what would
/// make the kernel interrupt its request). A thread whose status cannot be read
/// (another pid namespace) is taken to have none.
pub fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    pending_in(&status)
}

/// [`signal_pending`] of a `/proc/<tid>/status` text.
fn pending_in(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = field("SigPnd:") | field("ShdPnd:");
    pending & !field("SigBlk:") != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_signal_counts_unless_blocked() {
        let status = "Name:\tx\nSigQ:\t0/1\nSigPnd:\t0000000000000000\n\
                      ShdPnd:\t0000000000000100\nSigBlk:\t0000000000000000\n";
        // SIGKILL (9) pending for the process.
        assert!(pending_in(status));
        let blocked = status.replace("SigBlk:\t0000000000000000", "SigBlk:\t0000000000000100");
        assert!(!pending_in(&blocked));
        let none = status.replace("0000000000000100", "0000000000000000");
        assert!(!pending_in(&none));
        // This thread has no signal pending.
        assert!(!signal_pending(
            std::fs::read_to_string("/proc/thread-self/stat")
                .ok()
                .and_then(|s| s.split(' ').next()?.parse().ok())
                .unwrap_or(0)
        ));
    }
}
