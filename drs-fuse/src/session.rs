//! The mount's session with the metadata service: what keeps another mount's
//! truncate, punch or unlink from handing this mount's blocks to another file while
//! this mount still holds a map of them.
//!
//! - Every open and close of a file is registered (`Open` / `Close`; a create
//!   registers its open in the same command, `CreateOpen`, and a close that commits
//!   writes its close, `WrittenClose`), so the
//!   metadata service holds blocks freed from a file this mount has open, and keeps
//!   an unlinked file this mount has open, until this mount is done with them.
//! - A heartbeat every [`SESSION_TICK`] (`FsQuery::Session`) answers which files had
//!   blocks freed by others. For each, the mount takes the file's freeing lock alone
//!   (no read or write of it under way), checks what it knows of the file's map
//!   against the current one, forgets what changed (discarding cached writes to
//!   blocks no longer the file's, and names of blocks it wrote that were taken),
//!   and acknowledges (`Refreshed`): only then may the blocks go to another file.
//! - A `Written` naming blocks of a file with an unacknowledged freeing is refused
//!   (`StaleMap`); the commit refreshes and sends it again.
//! - Guard: a mount whose heartbeat has not been answered for [`SESSION_GUARD`]
//!   reads and writes no file data (EIO) until one is, since the service ends a
//!   silent session (`--session-expiry-ms`, 90 s by default, which must exceed this
//!   guard plus the longest operation) and then frees what was held for it. When a
//!   heartbeat is answered again after that, every open file's map is checked as
//!   above before reads and writes go on.
//! - A mount that finds its session ended stops reading and writing file data, opens
//!   a new session, and, with every open file's lock held alone, registers its opens
//!   again and checks every map; a file dropped meanwhile fails with EIO. Opens and
//!   closes hold the session's gate shared (registration and the mount's own count
//!   change together), the resume holds it alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use drs_meta::fs::{Attr, FsCommand, FsError, FsQuery, FsReply, Ino, SessionId, MAP_MAX};
use drs_meta::MetaClient;

use super::{lock, now, OpError, OpResult, Open, Ops};

/// How often a mount heartbeats its session (and learns of blocks freed by others).
pub const SESSION_TICK: Duration = Duration::from_secs(1);
/// A mount whose heartbeat has not been answered for this long reads and writes no
/// file data until one is.
pub const SESSION_GUARD: Duration = Duration::from_secs(30);

/// This mount's session.
pub(super) struct MountSession {
    id: AtomicU64,
    /// When the last answered heartbeat was sent.
    alive: Mutex<Instant>,
    /// The session was found ended: no file data is read or written until a new one
    /// is open and every map checked.
    suspended: AtomicBool,
    /// The mount ended its session: the heartbeat stops.
    ended: AtomicBool,
    /// Files being refreshed by a task of the heartbeat.
    refreshing: Mutex<HashSet<Ino>>,
    /// Held shared by what registers opens and closes, alone by a resume.
    gate: tokio::sync::RwLock<()>,
}

impl MountSession {
    pub(super) fn new(id: SessionId) -> MountSession {
        MountSession {
            id: AtomicU64::new(id),
            alive: Mutex::new(Instant::now()),
            suspended: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            refreshing: Mutex::new(HashSet::new()),
            gate: tokio::sync::RwLock::new(()),
        }
    }

    pub(super) fn id(&self) -> SessionId {
        self.id.load(Ordering::Relaxed)
    }

    /// How long since the last answered heartbeat was sent.
    fn silent(&self) -> Duration {
        lock(&self.alive).elapsed()
    }

    /// Whether this mount may use its block maps (see [`SESSION_GUARD`]).
    pub(super) fn check(&self) -> OpResult<()> {
        if self.suspended.load(Ordering::Relaxed) {
            return Err(OpError::SessionLapsed(self.silent()));
        }
        let since = self.silent();
        if since > SESSION_GUARD {
            return Err(OpError::SessionLapsed(since));
        }
        Ok(())
    }

    /// Holds off opens and closes while a resume runs.
    pub(super) async fn gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }
}

impl Ops {
    /// `cmd` as this mount's: blocks it frees are not held for this mount.
    pub(super) fn mine(&self, cmd: FsCommand) -> FsCommand {
        FsCommand::From {
            session: self.session.id(),
            cmd: Box::new(cmd),
        }
    }

    /// Registers one open of `ino` with the session and applies `local` (the mount's
    /// own count) under the session's gate; waits for a new session if the last one
    /// ended. The inode's attributes.
    pub(super) async fn register_open(
        &self,
        ino: Ino,
        local: impl FnOnce(&Attr),
    ) -> OpResult<Attr> {
        self.register_with(|session| FsCommand::Open { session, ino }, Some(ino), local)
            .await
    }

    /// Creates a regular file and registers one open of it with the session, in one
    /// command (`CreateOpen`; `create` is the `Create`), as [`Ops::register_open`].
    pub(super) async fn register_create(
        &self,
        create: FsCommand,
        local: impl FnOnce(&Attr),
    ) -> OpResult<Attr> {
        self.register_with(
            |session| FsCommand::CreateOpen {
                session,
                cmd: Box::new(create.clone()),
            },
            None,
            local,
        )
        .await
    }

    /// Sends `cmd(session)`, which registers an open, under the session's gate and
    /// applies `local`; with a new session if the last one ended. With `ino`, under
    /// that file's freeing lock (shared) too: a release of the file in this mount,
    /// which closes the session's open and lowers this mount's count under it, comes
    /// wholly before or after.
    async fn register_with(
        &self,
        cmd: impl Fn(SessionId) -> FsCommand,
        ino: Option<Ino>,
        local: impl FnOnce(&Attr),
    ) -> OpResult<Attr> {
        let mut local = Some(local);
        loop {
            let session = self.session.id();
            {
                let _gate = self.session.gate().await;
                let _using = match ino {
                    Some(ino) => self.using(ino).await,
                    None => None,
                };
                match self.registering(session, cmd(session)).await {
                    Ok(a) => {
                        if let Some(f) = local.take() {
                            f(&a);
                        }
                        return Ok(a);
                    }
                    Err(OpError::Fs(FsError::NoSession)) => {}
                    Err(e) => return Err(e),
                }
            }
            self.await_new_session(session).await;
        }
    }

    /// Waits until the mount has a session other than `ended`, which the metadata
    /// service refused as ended: the heartbeat opens the new one (the caller's
    /// bound applies).
    pub(super) async fn await_new_session(&self, ended: SessionId) {
        {
            // Under the gate, which a resume holds alone while it changes the
            // session and lifts the suspension: not set again once it is lifted.
            let _gate = self.session.gate().await;
            if self.session.id() == ended {
                self.session.suspended.store(true, Ordering::Relaxed);
            }
        }
        while self.session.id() == ended {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends one `Open` of `ino` (the caller holds the session's gate). If the
    /// caller is cancelled (its bound) after the `Open` was applied, a `Close`
    /// follows, so a registration is never left behind.
    async fn register_once(&self, ino: Ino) -> OpResult<Attr> {
        let session = self.session.id();
        self.registering(session, FsCommand::Open { session, ino })
            .await
    }

    /// Sends `cmd`, which registers an open with `session` and answers the inode's
    /// attributes, in a task of its own: if the caller is cancelled after it was
    /// applied, a `Close` follows.
    async fn registering(&self, session: SessionId, cmd: FsCommand) -> OpResult<Attr> {
        let state = Arc::new(Mutex::new(Registration::Pending));
        let task = {
            let (meta, state) = (self.meta.clone(), state.clone());
            tokio::spawn(async move {
                let r = meta.fs(cmd).await;
                if let Ok(Ok(FsReply::Attr(a))) = &r {
                    let gave_up = {
                        let mut s = lock(&state);
                        let gave_up = *s == Registration::GaveUp;
                        *s = Registration::Opened(a.ino);
                        gave_up
                    };
                    if gave_up {
                        send_close(&meta, session, a.ino).await;
                    }
                }
                r
            })
        };
        let give_up = GiveUp {
            state: state.clone(),
            meta: self.meta.clone(),
            session,
        };
        let r = task
            .await
            .map_err(|e| OpError::Unexpected(format!("the open task ended: {e}")))?;
        match r {
            Ok(Ok(FsReply::Attr(a))) => {
                *lock(&state) = Registration::Kept;
                drop(give_up);
                Ok(a)
            }
            Ok(Ok(other)) => Err(OpError::Unexpected(format!("{other:?}"))),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers an open of `ino` until the returned guard drops, and keeps an entry
    /// for it meanwhile (so a refresh of it waits for the file's freeing lock). The
    /// caller holds the session's gate.
    pub(super) async fn register_while(&self, ino: Ino) -> OpResult<TempOpen> {
        let a = self.register_once(ino).await?;
        lock(&self.open).entry(a.ino).or_default().temps += 1;
        Ok(TempOpen {
            open: self.open.clone(),
            meta: self.meta.clone(),
            session: self.session.id(),
            ino,
        })
    }

    /// Registers one close of `ino` (the caller holds the session's gate); a failure
    /// leaves the open registered until the session ends (it only delays freeing).
    pub(super) async fn register_close(&self, ino: Ino) {
        let session = self.session.id();
        if let Err(e) = self.command(FsCommand::Close { session, ino }).await {
            tracing::warn!(ino, session, error = %e, "cannot register a close");
        }
    }

    /// The mount's current session.
    pub fn session_id(&self) -> SessionId {
        self.session.id()
    }

    /// Ends the session (the mount ends): what was held for it is freed at once.
    pub async fn end_session(&self) {
        self.session.ended.store(true, Ordering::Relaxed);
        let session = self.session.id();
        if let Err(e) = self.command(FsCommand::EndSession { session }).await {
            tracing::warn!(session, error = %e, "cannot end the mount's session");
        }
    }

    /// Checks what this mount knows of `ino`'s block map against the current map
    /// and forgets what changed; then acknowledges freeing `freeing` (asked for if
    /// `None`). Takes the file's freeing lock alone unless `held` (the caller has
    /// it).
    pub(super) async fn refresh_file(
        &self,
        ino: Ino,
        freeing: Option<u64>,
        held: bool,
    ) -> OpResult<()> {
        let _freeing = if held { None } else { self.freeing(ino).await };
        let session = self.session.id();
        let freeing = match freeing {
            Some(f) => f,
            None => {
                let r = self.query(FsQuery::Session { session }).await?;
                let stale = match r {
                    FsReply::Stale(s) => s,
                    other => return Err(OpError::Unexpected(format!("{other:?}"))),
                };
                match stale.iter().find(|(i, _)| *i == ino) {
                    Some((_, f)) => *f,
                    None => return Ok(()),
                }
            }
        };
        self.revalidate(ino).await?;
        self.command(FsCommand::Refreshed {
            session,
            ino,
            freeing,
        })
        .await?;
        Ok(())
    }

    /// Forgets the blocks of `ino`'s map that the metadata service no longer maps
    /// the same way, and discards cached writes to data blocks that are no longer
    /// the file's (the caller holds the file's freeing lock alone): none of them is
    /// named in a `Written` or written back.
    async fn revalidate(&self, ino: Ino) -> OpResult<()> {
        let known: Vec<(u64, u64)> = lock(&self.open)
            .get(&ino)
            .map(|o| o.blocks.iter().map(|(b, l)| (*b, *l)).collect())
            .unwrap_or_default();
        // A cached block's file block is always in the map (a later answer may have
        // replaced its data block, never removed the file block).
        let windows: BTreeSet<u64> = known.iter().map(|(b, _)| b / MAP_MAX).collect();
        let mut current: BTreeMap<u64, u64> = BTreeMap::new();
        for w in windows {
            let q = FsQuery::Extents {
                ino,
                first: w * MAP_MAX,
                count: MAP_MAX,
            };
            match self.query(q).await {
                Ok(FsReply::Mapped(maps)) => {
                    current.extend(maps.iter().map(|m| (m.block, m.lba)));
                }
                // Dropped: nothing of it is this mount's any more.
                Err(OpError::Fs(FsError::NotFound)) => {
                    current.clear();
                    break;
                }
                Ok(other) => return Err(OpError::Unexpected(format!("{other:?}"))),
                Err(e) => return Err(e),
            }
        }
        let discard: Vec<u64> = match lock(&self.open).get_mut(&ino) {
            Some(o) => forget_changed(o, &known, &current),
            None => Vec::new(),
        };
        self.discard(ino, &discard, "blocks another mount freed")
            .await;
        Ok(())
    }

    /// Drops cached writes to data blocks `lbas` of file `ino` without writing them
    /// back, and releases their locks; `why` is logged.
    async fn discard(&self, ino: Ino, lbas: &[u64], why: &str) {
        if let (Some(cache), false) = (&self.cache, lbas.is_empty()) {
            tracing::warn!(ino, blocks = lbas.len(), why, "cached writes dropped");
            cache.discard_blocks(lbas).await;
        }
    }

    /// Drops the file's cached writes without writing them back (the maps they were
    /// made with may not hold): the last close of a file while the session lapsed.
    pub(super) async fn discard_cached(&self, ino: Ino) {
        let lbas: Vec<u64> = match lock(&self.open).get_mut(&ino) {
            Some(o) => std::mem::take(&mut o.cached).into_keys().collect(),
            None => Vec::new(),
        };
        self.discard(ino, &lbas, "the file was closed while the session lapsed")
            .await;
    }

    /// With the session's gate and every open file's freeing lock held alone:
    /// registers the opens with session `new` (if any; a file that is gone is marked
    /// lost) and checks every file's map.
    async fn recheck_all(&self, new: Option<SessionId>) -> OpResult<()> {
        let mut files: Vec<Ino> = lock(&self.open).keys().copied().collect();
        files.sort_unstable();
        let mut held = Vec::new();
        for ino in &files {
            held.push(self.freeing(*ino).await);
        }
        for ino in files {
            let handles = lock(&self.open).get(&ino).map_or(0, |o| o.handles);
            if let Some(session) = new {
                for _ in 0..handles {
                    match self.command(FsCommand::Open { session, ino }).await {
                        Ok(_) => {}
                        Err(OpError::Fs(FsError::NotFound)) => {
                            if let Some(o) = lock(&self.open).get_mut(&ino) {
                                o.lost = true;
                            }
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            self.revalidate(ino).await?;
        }
        Ok(())
    }

    /// The session `expired` was ended (this mount was cut off from the metadata
    /// service for longer than its expiry): opens a new one, registers the opens and
    /// checks every map ([`Ops::recheck_all`]); only then are reads and writes let
    /// through again. On failure, the new session is ended and the old one stays
    /// suspended (the next heartbeat tries again).
    async fn resume(&self, expired: SessionId) -> OpResult<()> {
        let _gate = self.session.gate.write().await;
        if self.session.id() != expired {
            return Ok(());
        }
        self.session.suspended.store(true, Ordering::Relaxed);
        tracing::warn!(
            session = expired,
            "the mount's session was ended; opening a new one"
        );
        // The session's locks are gone: from now on (no read or write gets past
        // the suspension first), no I/O through an open file that held one.
        let lost = self.forget_locks(expired);
        if lost > 0 {
            tracing::warn!(
                session = expired,
                owners = lost,
                "the expired session's byte-range locks were released by the metadata service; \
                 the open files that held them fail their reads, writes and new locks until closed"
            );
        }
        let r = self.command(FsCommand::OpenSession { now: now() }).await?;
        let id = match r {
            FsReply::Session(id) => id,
            other => return Err(OpError::Unexpected(format!("{other:?}"))),
        };
        if let Err(e) = self.recheck_all(Some(id)).await {
            let _ = self.command(FsCommand::EndSession { session: id }).await;
            return Err(e);
        }
        self.session.id.store(id, Ordering::Relaxed);
        if self.session.ended.load(Ordering::Relaxed) {
            // The mount ended meanwhile (its end named the old session).
            let _ = self.command(FsCommand::EndSession { session: id }).await;
            return Ok(());
        }
        *lock(&self.session.alive) = Instant::now();
        self.session.suspended.store(false, Ordering::Relaxed);
        tracing::info!(session = id, "new session open");
        Ok(())
    }

    /// A heartbeat was answered after the guard had lapsed: checks every map
    /// before reads and writes go on (the session may have been ended and opened
    /// meanwhile by nothing this mount saw).
    async fn recheck_after_lapse(&self) -> OpResult<()> {
        let _gate = self.session.gate.write().await;
        self.recheck_all(None).await
    }
}

/// Where one registering command (`Open`, `CreateOpen`) stands, between the task
/// that sends it and the operation that waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    Pending,
    /// Applied (an open of this inode); the operation has not taken it yet.
    Opened(Ino),
    /// The operation took it (its close will follow).
    Kept,
    /// The operation was cancelled before the answer.
    GaveUp,
}

/// Dropped by an operation cancelled while its `Open` was under way: closes the
/// registration if it was applied (or has the task close it when it is).
struct GiveUp {
    state: Arc<Mutex<Registration>>,
    meta: MetaClient,
    session: SessionId,
}

impl Drop for GiveUp {
    fn drop(&mut self) {
        let close = {
            let mut s = lock(&self.state);
            match *s {
                Registration::Opened(ino) => Some(ino),
                Registration::Pending => {
                    *s = Registration::GaveUp;
                    None
                }
                Registration::Kept | Registration::GaveUp => None,
            }
        };
        if let Some(ino) = close {
            spawn_close(self.meta.clone(), self.session, ino);
        }
    }
}

/// An open registered for the length of one operation ([`Ops::register_while`]):
/// dropping it removes the file's entry (unless the file was opened meanwhile) and
/// closes the registration.
pub(super) struct TempOpen {
    open: Arc<Mutex<HashMap<Ino, Open>>>,
    meta: MetaClient,
    session: SessionId,
    ino: Ino,
}

impl Drop for TempOpen {
    fn drop(&mut self) {
        {
            let mut open = lock(&self.open);
            if let Some(o) = open.get_mut(&self.ino) {
                o.temps = o.temps.saturating_sub(1);
                if o.handles == 0 && o.temps == 0 {
                    open.remove(&self.ino);
                }
            }
        }
        spawn_close(self.meta.clone(), self.session, self.ino);
    }
}

async fn send_close(meta: &MetaClient, session: SessionId, ino: Ino) {
    match meta.fs(FsCommand::Close { session, ino }).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(ino, session, error = %e, "cannot register a close"),
        Err(e) => tracing::warn!(ino, session, error = %e, "cannot register a close"),
    }
}

fn spawn_close(meta: MetaClient, session: SessionId, ino: Ino) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move { send_close(&meta, session, ino).await });
    }
}

/// Forgets the blocks of `known` that `current` does not map the same way; the
/// cached data blocks that `current` does not map any more, to discard.
fn forget_changed(o: &mut Open, known: &[(u64, u64)], current: &BTreeMap<u64, u64>) -> Vec<u64> {
    for (b, l) in known {
        if current.get(b) == Some(l) {
            continue;
        }
        o.blocks.remove(b);
        o.fresh.remove(b);
        o.settled.remove(b);
    }
    let still: HashSet<u64> = current.values().copied().collect();
    let discard: Vec<u64> = o
        .cached
        .keys()
        .filter(|l| !still.contains(l))
        .copied()
        .collect();
    for l in &discard {
        o.cached.remove(l);
    }
    // Holes it knew of may have been filled by others since.
    o.window = (0, 0);
    discard
}

/// The heartbeat: every [`SESSION_TICK`], asks which files had blocks freed by
/// others and refreshes each in a task of its own (a refresh waits for the file's
/// reads and writes; the heartbeat must not). Opens a new session when the last
/// one was ended. Ends with the mount.
pub(super) async fn heartbeat(ops: Weak<Ops>) {
    loop {
        tokio::time::sleep(SESSION_TICK).await;
        let Some(o) = ops.upgrade() else {
            return;
        };
        if o.session.ended.load(Ordering::Relaxed) {
            return;
        }
        let session = o.session.id();
        let sent = Instant::now();
        let asked =
            tokio::time::timeout(SESSION_TICK * 5, o.query(FsQuery::Session { session })).await;
        let stale = match asked {
            Ok(Ok(FsReply::Stale(s))) => s,
            Ok(Err(OpError::Fs(FsError::NoSession))) => {
                if o.session.ended.load(Ordering::Relaxed) {
                    return;
                }
                // No data is read or written with the old maps from now on.
                o.session.suspended.store(true, Ordering::Relaxed);
                if let Err(e) = o.resume(session).await {
                    tracing::warn!(error = %e, "cannot open a new session");
                }
                continue;
            }
            Ok(Ok(other)) => {
                tracing::warn!(?other, "unexpected heartbeat answer");
                continue;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "heartbeat failed");
                continue;
            }
            Err(_) => continue,
        };
        if o.session.silent() > SESSION_GUARD {
            if let Err(e) = o.recheck_after_lapse().await {
                tracing::warn!(error = %e, "cannot check the block maps after a silence");
                continue;
            }
        }
        *lock(&o.session.alive) = sent;
        for (ino, freeing) in stale {
            if !lock(&o.session.refreshing).insert(ino) {
                continue;
            }
            let ops = ops.clone();
            tokio::spawn(async move {
                let Some(o) = ops.upgrade() else {
                    return;
                };
                let r = tokio::time::timeout(
                    o.cfg.op_timeout * 2,
                    o.refresh_file(ino, Some(freeing), false),
                )
                .await;
                match r {
                    Ok(Ok(())) => tracing::debug!(ino, freeing, "block map refreshed"),
                    Ok(Err(e)) => tracing::warn!(ino, error = %e, "cannot refresh a block map"),
                    Err(_) => tracing::warn!(ino, "refreshing a block map took too long"),
                }
                lock(&o.session.refreshing).remove(&ino);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_forgets_changed_blocks_and_discards_writes_to_blocks_gone() {
        // Blocks 0..4 at data blocks 100..104 (3 at 200 since a later answer);
        // 1 and 2 written and not named yet; 101, 102 and 9 (an old data block of
        // block 3) cached.
        let now = Instant::now();
        let mut o = Open {
            blocks: [(0, 100), (1, 101), (2, 102), (3, 200)].into(),
            settled: [1, 2].into(),
            fresh: [3].into(),
            cached: [(101, (now, 1)), (102, (now, 2)), (9, (now, 3))].into(),
            window: (0, 4),
            ..Open::default()
        };
        // Another mount punched block 2 and truncated and re-extended block 1 (now
        // at 300); blocks 0 and 3 are unchanged.
        let current: BTreeMap<u64, u64> = [(0, 100), (1, 300), (3, 200)].into();
        let known: Vec<(u64, u64)> = o.blocks.iter().map(|(b, l)| (*b, *l)).collect();
        let mut discard = forget_changed(&mut o, &known, &current);
        discard.sort_unstable();
        assert_eq!(discard, vec![9, 101, 102]);
        assert_eq!(o.blocks, [(0, 100), (3, 200)].into());
        assert!(o.settled.is_empty(), "a taken block is never named");
        assert_eq!(o.fresh, [3].into());
        assert!(o.cached.is_empty());
        assert_eq!(o.window, (0, 0));
    }
}
