//! [`LockTable`]: the POSIX byte-range locks (`fcntl` `F_SETLK`, `F_GETLK`; `flock`
//! as a lock of the whole file) that the mounts' processes hold, pure (no I/O).
//!
//! A lock belongs to an [`Owner`]: a mount's session and the kernel's lock owner in
//! that mount (a process's file table for `fcntl` locks, an open file for `flock`).
//! The rules are POSIX's:
//! - a read lock conflicts with another owner's write lock over any common byte, a
//!   write lock with any other owner's lock;
//! - an owner's new lock over a range replaces what it held there (an upgrade or a
//!   downgrade is one step, never a window without a lock), and its adjacent or
//!   overlapping locks of the same kind merge into one;
//! - an unlock of part of a lock splits it.
//!
//! Invariants (checked by [`LockTable::check`], which the tests call after every step):
//! an owner's locks on a file are disjoint, not adjacent when of the same kind, and
//! in order of their start; locks of two owners that overlap are both read locks;
//! every range is non-empty; the count is the number of locks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fs::{Ino, SessionId};

/// Most locks the table holds, over every file and mount (`ENOLCK` past it).
pub const MAX_LOCKS: usize = 100_000;

/// Who holds a lock: a mount's session and a lock owner of that mount's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub session: SessionId,
    pub owner: u64,
}

/// What a lock request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// One lock: bytes `start ..= end` of a file (`end` is `u64::MAX` or the kernel's
/// `OFFSET_MAX` for "to the end of the file, however far it grows").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeLock {
    pub owner: Owner,
    pub start: u64,
    pub end: u64,
    pub write: bool,
    /// The process that took it, as its mount saw it (what `F_GETLK` reports).
    pub pid: u32,
}

impl RangeLock {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// Why a lock request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Another owner holds a conflicting lock.
    #[error("a conflicting lock is held")]
    Conflict,
    /// The table is full ([`MAX_LOCKS`]).
    #[error("too many locks")]
    TooMany,
    /// `start > end`.
    #[error("an empty range")]
    Invalid,
}

/// Every file's locks, and whether they changed since [`LockTable::take_changed`]
/// (a note that is neither serialized nor compared).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LockTable {
    files: BTreeMap<Ino, Vec<RangeLock>>,
    count: usize,
    #[serde(skip)]
    changed: bool,
}

impl PartialEq for LockTable {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files && self.count == other.count
    }
}

impl Eq for LockTable {}

impl LockTable {
    /// Whether the table changed since the last call (the store writes its record
    /// then).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// How many locks are held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The locks on `ino`.
    pub fn of(&self, ino: Ino) -> &[RangeLock] {
        self.files.get(&ino).map_or(&[], |v| v.as_slice())
    }

    /// The first lock on `ino` of an owner other than `owner` that a lock of bytes
    /// `start ..= end` (`write`: a write lock) would conflict with (`F_GETLK`).
    pub fn conflict(
        &self,
        ino: Ino,
        owner: Owner,
        start: u64,
        end: u64,
        write: bool,
    ) -> Option<&RangeLock> {
        self.of(ino)
            .iter()
            .find(|l| l.owner != owner && (write || l.write) && l.overlaps(start, end))
    }

    /// `owner` locks (or unlocks) bytes `start ..= end` of `ino` (`F_SETLK`). A
    /// refusal changes nothing.
    pub fn set(
        &mut self,
        ino: Ino,
        owner: Owner,
        start: u64,
        end: u64,
        kind: LockKind,
        pid: u32,
    ) -> Result<(), LockError> {
        if start > end {
            return Err(LockError::Invalid);
        }
        let write = match kind {
            LockKind::Read => false,
            LockKind::Write => true,
            LockKind::Unlock => {
                if self.of(ino).iter().all(|l| l.owner != owner) {
                    return Ok(());
                }
                false
            }
        };
        if kind != LockKind::Unlock && self.conflict(ino, owner, start, end, write).is_some() {
            return Err(LockError::Conflict);
        }
        let old = self.of(ino);
        let mut new = Vec::with_capacity(old.len() + 2);
        // The owner's coverage of the range goes; the parts outside it stay.
        for l in old {
            if l.owner != owner || !l.overlaps(start, end) {
                new.push(l.clone());
                continue;
            }
            if l.start < start {
                new.push(RangeLock {
                    end: start - 1,
                    ..l.clone()
                });
            }
            if l.end > end {
                new.push(RangeLock {
                    start: end + 1,
                    ..l.clone()
                });
            }
        }
        if kind != LockKind::Unlock {
            let (mut s, mut e) = (start, end);
            // The owner's locks of the same kind that touch the range merge into it.
            new.retain(|l| {
                let touches = l.owner == owner
                    && l.write == write
                    && l.start <= e.saturating_add(1)
                    && s <= l.end.saturating_add(1);
                if touches {
                    s = s.min(l.start);
                    e = e.max(l.end);
                }
                !touches
            });
            new.push(RangeLock {
                owner,
                start: s,
                end: e,
                write,
                pid,
            });
        }
        new.sort_by_key(|l| (l.start, l.owner));
        let count = self.count - old.len() + new.len();
        if count > MAX_LOCKS && new.len() > old.len() {
            return Err(LockError::TooMany);
        }
        self.count = count;
        self.changed = true;
        if new.is_empty() {
            self.files.remove(&ino);
        } else {
            self.files.insert(ino, new);
        }
        Ok(())
    }

    /// Drops every lock of `owner` on `ino` (the owner closed the file); whether it
    /// had any.
    pub fn release(&mut self, ino: Ino, owner: Owner) -> bool {
        self.retain_in(ino, |l| l.owner != owner)
    }

    /// Drops every lock of a mount's session (it ended or expired).
    pub fn release_session(&mut self, session: SessionId) {
        let files: Vec<Ino> = self.files.keys().copied().collect();
        for ino in files {
            self.retain_in(ino, |l| l.owner.session != session);
        }
    }

    /// Drops every lock on `ino` (the file is gone).
    pub fn release_file(&mut self, ino: Ino) {
        if let Some(v) = self.files.remove(&ino) {
            self.count -= v.len();
            self.changed = true;
        }
    }

    /// Keeps the locks on `ino` that `keep` accepts; whether any went.
    fn retain_in(&mut self, ino: Ino, keep: impl Fn(&RangeLock) -> bool) -> bool {
        let Some(v) = self.files.get_mut(&ino) else {
            return false;
        };
        let before = v.len();
        v.retain(keep);
        let gone = before - v.len();
        self.count -= gone;
        self.changed |= gone > 0;
        if v.is_empty() {
            self.files.remove(&ino);
        }
        gone > 0
    }

    /// The files with locks.
    pub fn files(&self) -> impl Iterator<Item = Ino> + '_ {
        self.files.keys().copied()
    }

    /// Checks, in one pass, what the table's own arithmetic relies on: the count is
    /// the number of locks, no list is empty, no range is. A decoded table must pass
    /// this; [`LockTable::check`] checks every invariant (in time quadratic in the
    /// locks of a file, for tests).
    pub fn check_shape(&self) -> Result<(), String> {
        let mut count = 0usize;
        for (ino, locks) in &self.files {
            if locks.is_empty() {
                return Err(format!("inode {ino}: an empty lock list is kept"));
            }
            if let Some(l) = locks.iter().find(|l| l.start > l.end) {
                return Err(format!("inode {ino}: an empty range {l:?}"));
            }
            count += locks.len();
        }
        if count != self.count {
            return Err(format!("{count} locks counted as {}", self.count));
        }
        Ok(())
    }

    /// Checks the invariants of the module's documentation.
    pub fn check(&self) -> Result<(), String> {
        self.check_shape()?;
        for (ino, locks) in &self.files {
            for (i, a) in locks.iter().enumerate() {
                for b in &locks[i + 1..] {
                    if b.start < a.start {
                        return Err(format!("inode {ino}: locks out of order"));
                    }
                    if a.owner == b.owner {
                        if a.overlaps(b.start, b.end) {
                            return Err(format!("inode {ino}: {a:?} overlaps {b:?}"));
                        }
                        if a.write == b.write
                            && (a.end.checked_add(1) == Some(b.start)
                                || b.end.checked_add(1) == Some(a.start))
                        {
                            return Err(format!("inode {ino}: {a:?} and {b:?} not merged"));
                        }
                    } else if (a.write || b.write) && a.overlaps(b.start, b.end) {
                        return Err(format!("inode {ino}: {a:?} conflicts with {b:?}"));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(session: u64, owner: u64) -> Owner {
        Owner { session, owner }
    }

    #[test]
    fn an_upgrade_and_a_partial_unlock_keep_posix_shapes() {
        let mut t = LockTable::default();
        let a = owner(1, 7);
        let b = owner(2, 7);
        t.set(5, a, 0, 99, LockKind::Read, 10).unwrap();
        t.set(5, b, 50, 59, LockKind::Read, 20).unwrap();
        // a cannot upgrade over b's read lock, and nothing changes.
        assert_eq!(
            t.set(5, a, 40, 69, LockKind::Write, 10),
            Err(LockError::Conflict)
        );
        assert_eq!(t.len(), 2);
        // Upgrading a's first part splits its read lock in two around the write.
        t.set(5, a, 10, 19, LockKind::Write, 10).unwrap();
        let mine: Vec<(u64, u64, bool)> = t
            .of(5)
            .iter()
            .filter(|l| l.owner == a)
            .map(|l| (l.start, l.end, l.write))
            .collect();
        assert_eq!(mine, [(0, 9, false), (10, 19, true), (20, 99, false)]);
        // Downgrading it merges the three back into one.
        t.set(5, a, 10, 19, LockKind::Read, 10).unwrap();
        assert_eq!(t.of(5).iter().filter(|l| l.owner == a).count(), 1);
        // b's write over its own range conflicts with a's read there.
        assert_eq!(
            t.conflict(5, b, 50, 59, true).map(|l| l.owner),
            Some(a),
            "a's read lock blocks b's write"
        );
        t.set(5, a, 0, u64::MAX, LockKind::Unlock, 10).unwrap();
        t.set(5, b, 50, 59, LockKind::Write, 20).unwrap();
        t.check().unwrap();
        t.release_session(2);
        assert!(t.is_empty());
        t.check().unwrap();
    }

    #[test]
    fn a_full_table_refuses_a_new_lock_and_a_split_but_not_an_unlock() {
        let mut t = LockTable::default();
        let a = owner(1, 1);
        let full = MAX_LOCKS as u64;
        for ino in 0..full {
            t.set(ino, a, 0, 2, LockKind::Write, 1).unwrap();
        }
        assert_eq!(
            t.set(full, a, 0, 0, LockKind::Read, 1),
            Err(LockError::TooMany)
        );
        // Unlocking the middle byte would split a lock in two.
        assert_eq!(
            t.set(0, a, 1, 1, LockKind::Unlock, 1),
            Err(LockError::TooMany)
        );
        assert_eq!(t.of(0).len(), 1);
        // Changing a lock in place adds nothing.
        t.set(0, a, 0, 2, LockKind::Read, 1).unwrap();
        t.set(0, a, 0, 2, LockKind::Unlock, 1).unwrap();
        assert_eq!(t.len(), MAX_LOCKS - 1);
        t.set(full, a, 0, 0, LockKind::Read, 1).unwrap();
        t.check().unwrap();
    }

    mod model {
        //! The table against a naive model: for every byte of two files, which
        //! owners hold it and how. Byte 48 stands for every byte from 48 on (ranges
        //! end before it or at `u64::MAX`).

        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::super::*;

        const BYTES: u64 = 49;

        #[derive(Debug, Clone)]
        enum Op {
            Set(Ino, Owner, u64, u64, LockKind),
            Release(Ino, Owner),
            ReleaseSession(SessionId),
            ReleaseFile(Ino),
        }

        fn owner() -> impl Strategy<Value = Owner> {
            (1u64..3, 1u64..3).prop_map(|(session, owner)| Owner { session, owner })
        }

        fn op() -> impl Strategy<Value = Op> {
            let kind = prop_oneof![
                Just(LockKind::Read),
                Just(LockKind::Write),
                Just(LockKind::Unlock)
            ];
            let range = (0u64..48, 0u64..49).prop_map(|(s, n)| {
                let e = s + n;
                (s, if e >= 48 { u64::MAX } else { e })
            });
            prop_oneof![
                8 => (0u64..2, owner(), range, kind)
                    .prop_map(|(i, o, (s, e), k)| Op::Set(i, o, s, e, k)),
                1 => (0u64..2, owner()).prop_map(|(i, o)| Op::Release(i, o)),
                1 => (1u64..3).prop_map(Op::ReleaseSession),
                1 => (0u64..2).prop_map(Op::ReleaseFile),
            ]
        }

        /// (file, byte) -> owner -> write.
        type Model = BTreeMap<(Ino, u64), BTreeMap<Owner, bool>>;

        fn bytes(s: u64, e: u64) -> impl Iterator<Item = u64> {
            (s..BYTES).take_while(move |b| *b <= e)
        }

        fn model_conflict(m: &Model, i: Ino, o: Owner, s: u64, e: u64, write: bool) -> bool {
            bytes(s, e).any(|b| {
                m.get(&(i, b))
                    .is_some_and(|h| h.iter().any(|(x, w)| *x != o && (write || *w)))
            })
        }

        fn covered(t: &LockTable) -> Model {
            let mut m = Model::new();
            for i in 0..2 {
                for l in t.of(i) {
                    for b in bytes(l.start, l.end) {
                        let prev = m.entry((i, b)).or_default().insert(l.owner, l.write);
                        assert!(prev.is_none(), "two locks of one owner on byte {b}");
                    }
                }
            }
            m
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]
            #[test]
            fn the_table_matches_a_byte_by_byte_model(
                ops in proptest::collection::vec(op(), 1..60),
                probes in proptest::collection::vec(
                    (0u64..2, owner(), 0u64..49, 0u64..49, any::<bool>()), 8),
            ) {
                let mut t = LockTable::default();
                let mut m = Model::new();
                for op in ops {
                    match op {
                        Op::Set(i, o, s, e, k) => {
                            let write = k == LockKind::Write;
                            let refused = k != LockKind::Unlock
                                && model_conflict(&m, i, o, s, e, write);
                            let got = t.set(i, o, s, e, k, 1);
                            prop_assert_eq!(got.is_err(), refused, "{:?}", got);
                            if !refused {
                                for b in bytes(s, e) {
                                    let h = m.entry((i, b)).or_default();
                                    h.remove(&o);
                                    if k != LockKind::Unlock {
                                        h.insert(o, write);
                                    }
                                }
                            }
                        }
                        Op::Release(i, o) => {
                            t.release(i, o);
                            for (_, h) in m.range_mut((i, 0)..(i + 1, 0)) {
                                h.remove(&o);
                            }
                        }
                        Op::ReleaseSession(s) => {
                            t.release_session(s);
                            for h in m.values_mut() {
                                h.retain(|o, _| o.session != s);
                            }
                        }
                        Op::ReleaseFile(i) => {
                            t.release_file(i);
                            for (_, h) in m.range_mut((i, 0)..(i + 1, 0)) {
                                h.clear();
                            }
                        }
                    }
                    m.retain(|_, h| !h.is_empty());
                    prop_assert_eq!(t.check(), Ok(()));
                    prop_assert_eq!(&covered(&t), &m);
                }
                for (i, o, s, n, write) in probes {
                    let e = (s + n).min(48);
                    prop_assert_eq!(
                        t.conflict(i, o, s, e, write).is_some(),
                        model_conflict(&m, i, o, s, e, write)
                    );
                }
            }
        }
    }
}
