//! Rejoining after a restart, and catching up on missed updates (DESIGN-NOTES R13;
//! Circus sections 13-15).
//!
//! A node that starts does not know what it missed while it was down, so every block
//! starts *unverified*: client reads of it are refused (`Recovering`), and clients
//! decode it from the rest of the stripe instead. Updates, locks and unlocks are
//! served meanwhile, so nothing new is missed.
//!
//! 0. **Registered.** With a metadata service, wait until this start of the node is
//!    registered (its record in the map has the new incarnation and is not down)
//!    and every other member has reached that map's epoch, but those the map says
//!    are down (for at most 10 s; [`await_registration`]). Members refuse requests of an older epoch, so from
//!    then on every write a member takes comes from a client whose map names this
//!    node recovering, and is sent here too. (Clients send nothing to a node their
//!    map says is down: without this step, a registration slower than the settle
//!    time let writes skip the node after its blocks were compared, and it was then
//!    marked up with stale blocks.)
//! 1. **Settle.** Wait `settle` (1.5 s): longer than a client's reconnect backoff
//!    (1 s), so every client that saw this node down has tried it again, and no new
//!    write skips it.
//! 2. **Compare.** List the blocks of the other members. A write that skipped this
//!    node while it was down holds its locks at the other members until its
//!    update-and-unlock reaches them; after that its versions are visible there. So a
//!    block is up to date when no other member holds a lock on a data block it
//!    tracks, and its versions are at least the newest versions the others report.
//!    That needs answers from at least m other members of the stripe: an
//!    acknowledged write reached at least `min_write` >= k members, so any m others
//!    include one that has it. A block whose stripe is locked is compared again later.
//! 3. **Rebuild** a block that is behind or corrupt: scrub the stripe, which decodes
//!    the block from k members agreeing on the newest state and installs it here.
//!    Updates logged meanwhile wait and apply on top. When another member is ahead
//!    with updates no k members agree on (every node crashed while they were in
//!    flight), the scrub settles the stripe under its locks (a data member's own
//!    updates roll forward, those only parity members held are voided), so the
//!    block can reach the newest versions (`drs_client::scrub`).
//! 4. Mark it verified. The node is `Up` once all its blocks are, and the metadata
//!    service is told so only if the registration did not change meanwhile
//!    (`Node::verified_for`); otherwise everything is compared again from step 0.
//!
//! Afterwards [`lifecycle`] keeps the node honest:
//! - a block that has known of an update for longer than `stuck_after` without applying
//!   it (the node missed the update: an unlock told it the version) is rebuilt;
//! - if the node finds it was paused (SIGSTOP, a frozen VM: a 100 ms sleep of its own
//!   ends more than `pause_threshold` late), clients may have written around it, so
//!   it goes through steps 1-4 again; from the moment it resumes until the watcher
//!   has marked every block unverified, it serves no `Current` read
//!   (`Node::may_have_been_paused`);
//! - every `verify_interval` it compares all its blocks with their stripes again and
//!   rebuilds any that fell behind without it noticing (a dropped connection).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_client::select::{self, Seen};
use drs_client::{CallError, Client};
use drs_proto::{MemberState, NodeId, Request, Response, SlotInfo, SlotState, StripeId, VolumeId};
use futures::future::join_all;
use futures::stream::{self, StreamExt};
use tokio::sync::watch;

use crate::node::Node;
use crate::store::VolumeStore;

/// Stripes compared or rebuilt at once (each holds at most a stripe's blocks in
/// memory while it is decoded). More does not rebuild faster on a small machine; it
/// takes more from the foreground traffic.
const CONCURRENCY: usize = 4;

/// Longest a rejoining node waits for the other members to reach the epoch that
/// registered it (step 0).
const EPOCH_WAIT: Duration = Duration::from_secs(10);

/// Paces rebuilds to a rate in bytes per second (0: as fast as they go), so a node
/// rebuilding its blocks leaves room for the foreground traffic.
pub struct Pace {
    rate: u64,
    next: tokio::sync::Mutex<Instant>,
}

impl Pace {
    pub fn new(rate: u64) -> Pace {
        Pace {
            rate,
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// Waits for the turn of `bytes` more.
    pub async fn take(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let turn = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            // No credit for idle time beyond one block: a burst stays one block.
            let turn = (*next).max(now);
            *next = turn + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            turn
        };
        tokio::time::sleep_until(turn.into()).await;
    }
}

/// Recovery at start, then the upkeep described in the module docs, until shutdown.
pub async fn lifecycle(
    node: Arc<Node>,
    peers: HashMap<VolumeId, Client>,
    mut reverify: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let pace = Pace::new(node.cfg.rebuild_rate);
    if !recover(&node, &peers, &pace, node.cfg.settle, &mut shutdown).await {
        return;
    }
    tokio::spawn(watch_for_pauses(node.clone(), shutdown.clone()));
    let mut seen_pauses = 0;
    let mut last_stuck = Instant::now();
    let mut last_compare = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let p = node.pauses.load(Ordering::Acquire);
        // Declared down by the metadata service (the member loop already marked
        // every block unverified).
        let declared_down = reverify.has_changed().unwrap_or(false);
        if p != seen_pauses || declared_down {
            seen_pauses = p;
            reverify.borrow_and_update();
            tracing::warn!(
                "the node was paused or declared down; clients may have written around it: re-verifying every block"
            );
            for v in node.volumes.values() {
                v.store.all_unverified();
            }
            if !recover(&node, &peers, &pace, node.cfg.settle, &mut shutdown).await {
                return;
            }
            continue;
        }
        if now.duration_since(last_stuck) >= Duration::from_secs(1) {
            last_stuck = now;
            rebuild_stuck(&node, &peers, &pace).await;
        }
        let interval = node.cfg.verify_interval;
        if !interval.is_zero() && now.duration_since(last_compare) >= interval {
            last_compare = now;
            for (vid, client) in &peers {
                if let Some(vol) = node.volumes.get(vid) {
                    let left = verify_round(&node, &vol.store, client, &pace, true).await;
                    if left > 0 {
                        tracing::warn!(
                            volume = vid,
                            left,
                            "blocks behind their stripes not rebuilt yet"
                        );
                    }
                }
            }
        }
    }
}

/// Counts the times this process was paused (SIGSTOP, a frozen VM) in `node.pauses`:
/// a 100 ms sleep that ended more than `pause_threshold` late.
///
/// Every block is marked unverified here, at once, before the pause is counted and
/// before the watcher says it is on time again (`Node::pause_tick`): until then
/// `Node::may_have_been_paused` holds and no `Current` read is served, so a block
/// that clients wrote around during the pause is never read from this node.
async fn watch_for_pauses(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let tick = crate::node::PAUSE_TICK;
    let threshold = (tick + node.cfg.pause_threshold).as_millis() as u64;
    node.pause_tick.store(node.now_ms(), Ordering::Release);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
        // One clock for both: the gap since the tick the reads compare with, so a
        // pause anywhere in the loop is either counted here or still ahead.
        let now = node.now_ms();
        let gap = now.saturating_sub(node.pause_tick.load(Ordering::Acquire));
        if gap > threshold {
            for v in node.volumes.values() {
                v.store.all_unverified();
            }
            tracing::warn!(
                paused_ms = gap - tick.as_millis() as u64,
                "process was paused"
            );
            node.pauses.fetch_add(1, Ordering::Release);
        }
        node.pause_tick.store(now, Ordering::Release);
    }
}

/// Runs steps 1-4 for every volume of the node until all blocks are verified; false
/// if shutdown came first.
async fn recover(
    node: &Node,
    peers: &HashMap<VolumeId, Client>,
    pace: &Pace,
    settle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        let Some(incarnation) = await_registration(node, peers, shutdown).await else {
            return false;
        };
        if !verify_all(node, peers, pace, settle, shutdown).await {
            return false;
        }
        // Declared down (or registered again) while comparing: what was compared may
        // have been written around since. Compare everything again under the new
        // registration.
        if node.registered.load(Ordering::Acquire) != incarnation {
            tracing::warn!(
                incarnation,
                "the registration changed while blocks were compared; comparing again"
            );
            for v in node.volumes.values() {
                v.store.all_unverified();
            }
            continue;
        }
        node.verified_for.store(incarnation, Ordering::Release);
        let (v, t) = node.verified();
        tracing::info!(verified = v, total = t, "all blocks verified; node is up");
        node.all_verified.notify_one();
        return true;
    }
}

/// Steps 1-4 of [`recover`]: settle, then compare and rebuild until every block is
/// verified; false if shutdown came first.
async fn verify_all(
    node: &Node,
    peers: &HashMap<VolumeId, Client>,
    pace: &Pace,
    settle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    if !settle.is_zero() {
        tracing::info!(
            settle_ms = settle.as_millis() as u64,
            "waiting for writes that skipped this node to settle"
        );
        tokio::select! {
            _ = tokio::time::sleep(settle) => {}
            _ = shutdown.changed() => return false,
        }
    }
    for (vid, client) in peers {
        let Some(vol) = node.volumes.get(vid) else {
            continue;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let left = verify_round(node, &vol.store, client, pace, false).await;
            if left == 0 {
                break;
            }
            tracing::info!(volume = vid, left, "blocks not yet verified; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return false,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    true
}

/// Step 0 of [`recover`]: waits until this start of the node is in the map as
/// registered and not down, then until every other member of its volumes has reached
/// that map's epoch (polled by `Ping`, for at most [`EPOCH_WAIT`]). A member its map
/// says is down (or that is not in it) is not waited for: clients send it nothing
/// and it refuses their older epochs once it learns the map. No wait without a
/// metadata service (a static map names every node up). The incarnation it waited
/// for (0 without a service); None if shutdown came first.
async fn await_registration(
    node: &Node,
    peers: &HashMap<VolumeId, Client>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<u64> {
    if node.map.meta.is_empty() {
        return Some(0);
    }
    let me = node.cfg.node;
    let mut next_log = Instant::now();
    let (incarnation, epoch) = loop {
        let incarnation = node.registered.load(Ordering::Acquire);
        if incarnation != 0 {
            let map = node.live_map();
            let listed = map.nodes.iter().any(|n| {
                n.id == me && n.incarnation == incarnation && n.state != MemberState::Down
            });
            if listed {
                break (incarnation, map.epoch);
            }
        }
        if Instant::now() >= next_log {
            next_log = Instant::now() + Duration::from_secs(30);
            tracing::warn!("waiting for the metadata service to register this start of the node before comparing blocks");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.changed() => return None,
        }
    };
    let Some(client) = peers.values().next() else {
        return Some(incarnation);
    };
    let mut behind: BTreeSet<NodeId> = node
        .volumes
        .values()
        .flat_map(|v| v.store.geometry().nodes.clone())
        .filter(|n| *n != me)
        .collect();
    let deadline = Instant::now() + EPOCH_WAIT;
    loop {
        let answers = join_all(behind.iter().map(|n| async move {
            let r = client.call(*n, &Request::Ping, Bytes::new()).await;
            (*n, r)
        }))
        .await;
        for (n, r) in answers {
            match r {
                Ok((Response::Pong(info), _)) if info.epoch >= epoch => {
                    behind.remove(&n);
                }
                // Down in this node's map, or not in it: nobody writes through it.
                Err(CallError::Unreachable(_)) => {
                    behind.remove(&n);
                }
                // Behind, slow or busy: asked again.
                _ => {}
            }
        }
        if behind.is_empty() {
            return Some(incarnation);
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                epoch,
                ?behind,
                "members still behind the epoch that registered this node (or not answering); comparing anyway"
            );
            return Some(incarnation);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

/// One pass of compare-and-rebuild over the unverified blocks (with `all`: over every
/// block); returns how many blocks are still unverified.
async fn verify_round(
    node: &Node,
    store: &Arc<VolumeStore>,
    client: &Client,
    pace: &Pace,
    all: bool,
) -> usize {
    let geo = store.geometry().clone();
    let gen = store.unverified_generation();
    let (own, _) = store.list(0, usize::MAX, |_| Vec::new());
    let todo: Vec<SlotInfo> = own
        .into_iter()
        .filter(|s| all || s.state != SlotState::Ok)
        .collect();
    if todo.is_empty() {
        return 0;
    }
    let others: Vec<_> = geo
        .nodes
        .iter()
        .copied()
        .filter(|n| *n != node.cfg.node)
        .collect();
    let listings = join_all(others.iter().map(|n| client.list_node(*n))).await;
    let mut peers: BTreeMap<StripeId, Vec<SlotInfo>> = BTreeMap::new();
    for (_, slots) in listings.into_iter().flatten() {
        for s in slots {
            peers.entry(s.stripe).or_default().push(s);
        }
    }
    let installed = || store.stats.repairs_installed.load(Ordering::Relaxed);
    let before = installed();
    let started = Instant::now();
    let results: Vec<bool> = stream::iter(todo)
        .map(|mine| {
            let theirs = peers.get(&mine.stripe).cloned().unwrap_or_default();
            async move { verify_slot(store, client, pace, &mine, &theirs, gen).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let rebuilt = installed().saturating_sub(before);
    let left = results.iter().filter(|ok| !**ok).count();
    if rebuilt > 0 {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        tracing::info!(
            rebuilt,
            left,
            mib_per_s = (rebuilt * geo.block_size as u64) as f64 / secs / (1 << 20) as f64,
            "rebuilt blocks that were missing, behind or corrupt"
        );
    }
    left
}

/// Verifies (rebuilding if needed) one block; true when verified.
async fn verify_slot(
    store: &Arc<VolumeStore>,
    client: &Client,
    pace: &Pace,
    mine: &SlotInfo,
    theirs: &[SlotInfo],
    gen: u64,
) -> bool {
    let geo = store.geometry();
    if theirs.len() < geo.m {
        return mine.state == SlotState::Ok;
    }
    let seen: Vec<Seen> = theirs
        .iter()
        .map(|s| Seen {
            position: s.position as usize,
            versions: s.versions.clone(),
        })
        .collect();
    let target = select::newest(geo.k, &seen);
    // A lock held at a peer on a block this one tracks may be a write in flight that
    // skipped this node: wait until it is released (its versions are then visible).
    let tracked = geo.tracked(mine.position as usize);
    let in_flight = theirs.iter().any(|t| {
        t.locks
            .iter()
            .any(|l| tracked.contains(&(l.index as usize)))
    });
    if mine.state != SlotState::Ok && in_flight {
        return false;
    }
    let up_to_date = |s: &SlotInfo| {
        s.state != SlotState::Corrupt
            && geo
                .tracked(s.position as usize)
                .all(|i| s.versions[i] >= target[i])
    };
    // Ahead of the others on a block: this node holds an update they lack (taken
    // just before a crash): a scrub rolls it forward from the blocks' contents, or
    // voids it if no k members can reproduce it and only parity members hold it.
    let ahead = geo
        .tracked(mine.position as usize)
        .any(|i| mine.versions[i] > target[i]);
    if ahead || !up_to_date(mine) {
        tracing::debug!(
            stripe = mine.stripe,
            position = mine.position,
            mine = ?mine.versions,
            ?target,
            ahead,
            in_flight,
            "block differs from its stripe"
        );
    }
    if ahead && !in_flight {
        let findings = client.scrub_one(mine.stripe, true).await;
        tracing::info!(
            stripe = mine.stripe,
            ?findings,
            "rolled an update forward that other members lacked"
        );
    }
    if !up_to_date(mine) {
        // Stop serving it until it is rebuilt.
        store.set_verified(mine.stripe, false);
        pace.take(geo.block_size as u64).await;
        let now_up_to_date = || {
            let (now, _) = store.list(mine.stripe, 1, |_| Vec::new());
            now.first().is_some_and(up_to_date)
        };
        // Decode it from k other members that agree on one state and install it
        // here; if that fails (members disagree, too few answer), a scrub of the
        // whole stripe decides.
        if !rebuild_here(store, client, mine).await || !now_up_to_date() {
            let findings = client.scrub_one(mine.stripe, true).await;
            tracing::info!(
                stripe = mine.stripe,
                position = mine.position,
                ?findings,
                "rebuilt a block by scrubbing its stripe"
            );
            if !now_up_to_date() {
                return false;
            }
        }
    }
    store.set_verified_since(mine.stripe, gen)
}

/// Decodes this node's block of `mine.stripe` from the other members and installs it
/// in the local store (updates logged meanwhile apply on top); true if installed.
async fn rebuild_here(store: &VolumeStore, client: &Client, mine: &SlotInfo) -> bool {
    let position = mine.position as usize;
    match client.reconstruct(mine.stripe, position).await {
        Ok((versions, data)) => match store
            .install(mine.stripe, mine.position, versions, data, false)
            .await
        {
            Ok(installed) => installed,
            Err(e) => {
                tracing::warn!(stripe = mine.stripe, error = %e, "installing a rebuilt block failed");
                false
            }
        },
        Err(e) => {
            tracing::debug!(stripe = mine.stripe, error = %e, "decoding a block to rebuild failed");
            false
        }
    }
}

/// Rebuilds blocks stuck behind a missed update.
async fn rebuild_stuck(node: &Node, peers: &HashMap<VolumeId, Client>, pace: &Pace) {
    for (vid, client) in peers {
        let Some(vol) = node.volumes.get(vid) else {
            continue;
        };
        for stripe in vol.store.stuck(node.cfg.stuck_after) {
            tracing::warn!(
                volume = vid,
                stripe,
                "block missed an update; rebuilding it from the stripe"
            );
            pace.take(vol.store.geometry().block_size as u64).await;
            let findings = client.scrub_one(stripe, true).await;
            tracing::info!(stripe, ?findings, "rebuild after a missed update");
            vol.store.forget_unseen(stripe);
        }
    }
}
