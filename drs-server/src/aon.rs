//! All-or-nothing updates and lease expiry at a node (report 5.3.3; DESIGN-NOTES R7,
//! R8, I4, I5).
//!
//! **All-or-nothing.** Every update names one data block and goes, with the same
//! delta, to the block's data node and every parity node. A node that takes one keeps
//! the update and its delta (*unsettled*) until the client says every member holds it
//! (a completion notice, piggybacked on the client's next message to the node). If no
//! notice comes within `relay_after` (the client is slow, crashed, or a member did not
//! answer it), the node passes the update on itself, as a *relay*, to every member
//! that should hold it; they apply it unless they already have it (by update id, or
//! by version). So once any member took an update, every live member ends up taking
//! it, with no coordinator and without the client. (A node that restarts has lost its
//! unsettled set, except the *kept* updates: those taken while their block's data
//! node did not take part, logged durably and passed on again after the restart,
//! since the parity members may hold their only copies. Rejoin then compares
//! versions and scrubs the stripes where it is ahead, which rolls the update forward
//! from the blocks' contents when k members agree on a state that includes it or its
//! data member holds it, and otherwise voids it, see `drs_client::scrub` and
//! docs/PROTOCOL.md 9.2.)
//!
//! **Leases and fencing.** A client renews its lease at a node with every lock request,
//! update and heartbeat. When the lease runs out while the client holds locks (or
//! cache copies) here, the node *fences* it: from then on it refuses the
//! client's locks, heartbeats and updates. It then waits for the client's admitted
//! updates to finish, passes on every unsettled update of the client (so they reach
//! every member, or were never taken anywhere), and only then releases the client's
//! locks. Another client can lock the blocks only once every member released them,
//! so by then the dead client's updates are settled at every member the map says is
//! up (a recovering member is sent them too, and takes them behind its rebuild); and
//! a paused client that wakes up is refused by every member that released its locks.
//!
//! A node that finds it was paused itself first extends every lease that was still
//! running by the pause's length: the heartbeats it missed were not the clients'
//! fault.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_client::{CallError, Client};
use drs_lockgroups::UpdateKey;
use drs_proto::{BlockUpdate, Request, Response, UpdateReq, VolumeId, WireError};
use tokio::sync::{watch, Semaphore};

use crate::cachegroup::TURN;
use crate::node::Node;

/// How often leases and unsettled updates are looked at.
const TICK: Duration = Duration::from_millis(100);
/// Relays in flight at once.
const RELAYS: usize = 32;
/// Relays in flight at once to members not waited for (recovering or down).
const RELAYS_BACKGROUND: usize = 8;
/// Longest a fenced client's admitted updates are waited for before settling.
const INFLIGHT_WAIT: Duration = Duration::from_secs(2);
/// Times an unsettled update is passed on to a member that never confirms it (it is
/// unreachable) before it is given up (at the default `relay_after`, five minutes):
/// a member away that long catches up by comparing its blocks with the stripe.
pub const RELAY_PASSES: u32 = 150;

/// Runs until shutdown.
pub async fn run(
    node: Arc<Node>,
    peers: HashMap<VolumeId, Client>,
    mut shutdown: watch::Receiver<bool>,
) {
    let relays = Arc::new(Semaphore::new(RELAYS));
    let background = Arc::new(Semaphore::new(RELAYS_BACKGROUND));
    let mut last = node.now_ms();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = node.relay_now.notified() => {}
            _ = shutdown.changed() => return,
        }
        // This node was paused (SIGSTOP, a frozen VM, a long stall): the clients'
        // heartbeats could not reach it meanwhile, so leases ran out here through no
        // fault of theirs. Each lease still running when the pause began runs the
        // pause's length longer; a client that is really gone still expires.
        let now = node.now_ms();
        let late = now.saturating_sub(last + TICK.as_millis() as u64);
        if late > node.cfg.pause_threshold.as_millis() as u64 {
            for vol in node.volumes.values() {
                lock(&vol.locks).forgive_pause(last, late);
            }
            tracing::warn!(
                paused_ms = late,
                "this node was paused: the clients' leases here run that much longer"
            );
        }
        last = now;
        for (vid, client) in &peers {
            let Some(vol) = node.volumes.get(vid) else {
                continue;
            };
            let now = node.now_ms();
            // Leases that ran out.
            let expired = lock(&vol.locks).expired(now);
            for c in expired {
                // Only a client holding locks (or cache copies) here is fenced: those
                // are what its release hands on to others. One whose updates are
                // merely unsettled here (a member was down when it wrote, so they
                // never completed; or it died after this member's part of its last
                // write) may be idle or waiting, alive: it is not fenced, and any
                // later update of it needs a new lock, which renews its lease. Its
                // unsettled updates are passed on now, not at their time: it may be
                // dead, and the members it did not reach lack them until then.
                let copies = lock(&node.copies).holds(c);
                let holds = copies || lock(&vol.locks).holds_any(c);
                if holds {
                    lock(&vol.locks).fence(c, now);
                    node.aon.fenced.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        client = c,
                        "client lease expired while it held locks: fenced; settling its updates"
                    );
                    if copies {
                        let (node, peer, vid) = (node.clone(), client.clone(), *vid);
                        tokio::spawn(async move {
                            crate::cachegroup::write_back(&node, &peer, vid, c).await
                        });
                    }
                    let (node, peer, vid) = (node.clone(), client.clone(), *vid);
                    let background = background.clone();
                    tokio::spawn(async move { settle(&node, &peer, vid, c, &background).await });
                } else {
                    lock(&vol.locks).forget(c);
                    lock(&node.cache_groups).remove(&c);
                    let mut unsettled = lock(&vol.unsettled);
                    for key in unsettled.of_client(c) {
                        unsettled.hurry(&key);
                    }
                }
            }
            // Updates some member never confirmed, passed on too often.
            for (_, gone) in lock(&vol.unsettled).worn_out(RELAY_PASSES) {
                tracing::warn!(
                    stripe = gone.stripe,
                    index = gone.index,
                    "an update was passed on {RELAY_PASSES} times and a member never confirmed it; given up (the member catches up by rebuilding)"
                );
            }
            // Kept updates (`UpdateReq::keep`) settled meanwhile are kept no longer.
            {
                let unsettled = lock(&vol.unsettled);
                vol.store.retain_kept(|k| {
                    unsettled
                        .get(&(k.update.id.client, k.update.id.seq))
                        .is_some()
                });
            }
            // Updates whose completion is overdue.
            let due = lock(&vol.unsettled).due(now, node.cfg.relay_after.as_millis() as u64);
            for key in due {
                // Touched only once it is passed on: one left for the next round stays
                // due (and hurried, if it was).
                let Ok(permit) = relays.clone().try_acquire_owned() else {
                    break;
                };
                lock(&vol.unsettled).touch(&key, now);
                let (node, peer, vid) = (node.clone(), client.clone(), *vid);
                let background = background.clone();
                tokio::spawn(async move {
                    relay(&node, &peer, vid, key, &background).await;
                    drop(permit);
                });
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Settles a fenced client: waits for its admitted updates, passes on its unsettled
/// ones, then releases its locks.
async fn settle(
    node: &Arc<Node>,
    peer: &Client,
    vid: VolumeId,
    client: u64,
    background: &Arc<Semaphore>,
) {
    let until = Instant::now() + INFLIGHT_WAIT;
    while node.inflight(client) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some(vol) = node.volumes.get(&vid) else {
        return;
    };
    let keys = lock(&vol.unsettled).of_client(client);
    futures::future::join_all(
        keys.into_iter()
            .map(|k| relay(node, peer, vid, k, background)),
    )
    .await;
    // A client with a cache group: its group writes its cache back under its locks
    // (cachegroup.rs), so they stay until every member of the group says it keeps no
    // copy for the client any more (written back, or there never was one). If
    // members do not answer, for a bounded time; while one that answers still keeps
    // copies, for a longer one.
    let group = lock(&node.cache_groups).remove(&client);
    if let Some(group) = group {
        use crate::cachegroup::{GroupProgress, WRITE_BACK_WAIT, WRITE_BACK_WAIT_HOLDING};
        let start = Instant::now();
        let short = WRITE_BACK_WAIT + TURN * group.len() as u32;
        let long = WRITE_BACK_WAIT_HOLDING + TURN * group.len() as u32;
        while lock(&vol.locks).holds_any(client) {
            let waited = start.elapsed();
            match crate::cachegroup::group_progress(peer, vid, client, &group).await {
                GroupProgress::Done => break,
                GroupProgress::Holding if waited < long => {}
                GroupProgress::Unreachable if waited < short => {}
                progress => {
                    tracing::warn!(
                        client,
                        ?progress,
                        waited_ms = waited.as_millis() as u64,
                        "a dead client's cache group did not write its cache back in time; releasing its locks (cached changes not written back are lost)"
                    );
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let released = lock(&vol.locks).release_client(client);
    // The client may have given out the next version of these blocks to a member that
    // is gone now: the next writer skips it.
    let mut by_stripe: std::collections::BTreeMap<u64, Vec<u8>> = Default::default();
    for (stripe, index) in &released {
        by_stripe.entry(*stripe).or_default().push(*index);
    }
    for (stripe, indices) in by_stripe {
        vol.store.note_fenced(stripe, &indices);
        // Without an update here: what its grants tentatively skipped is not.
        vol.store.note_lock_gone(stripe, &indices, None);
    }
    tracing::info!(
        client,
        locks = released.len(),
        "fenced client's updates settled; its locks released"
    );
}

/// Passes an unsettled update on to every member that has not confirmed it.
/// Sends to members not waited for take a slot of `background` each; with none
/// free, they wait for the next pass.
async fn relay(
    node: &Arc<Node>,
    peer: &Client,
    vid: VolumeId,
    key: UpdateKey,
    background: &Arc<Semaphore>,
) {
    let Some(vol) = node.volumes.get(&vid) else {
        return;
    };
    let Some(e) = lock(&vol.unsettled).get(&key).cloned() else {
        return;
    };
    let geo = vol.store.geometry();
    let (update, delta): (BlockUpdate, Bytes) = e.payload.clone();
    let send = |position: u8| {
        let req = Request::Update(UpdateReq {
            volume: vid,
            stripe: e.stripe,
            position,
            owner: 0,
            updates: vec![update],
            unlock: Vec::new(),
            relay: true,
            on_behalf: false,
            completed: Vec::new(),
            keep: Vec::new(),
        });
        let target = geo.member(e.stripe, position as usize);
        let payload = delta.clone();
        let peer = peer.clone();
        async move { (position, peer.call(target, &req, payload).await) }
    };
    // Every member lacking it is sent it. Those the map says are up are waited for
    // before locks on the block may go ahead. The others are not: a recovering
    // member takes it as a pending update behind its own rebuild, which under load
    // took seconds, and writers of the block were refused (`Settling`) all that
    // time. It still gets the update (and confirms it when it answers); a down one
    // fails at once.
    let map = node.live_map();
    let (up, others): (Vec<u8>, Vec<u8>) = e
        .recipients
        .iter()
        .copied()
        .filter(|p| !e.confirmed.contains(p))
        .partition(|p| map.node_state(geo.member(e.stripe, *p as usize)).is_up());
    for position in others {
        let Ok(slot) = background.clone().try_acquire_owned() else {
            break;
        };
        let (node, one) = (node.clone(), send(position));
        tokio::spawn(async move {
            let (position, r) = one.await;
            confirm_relay(&node, vid, &key, position, r);
            drop(slot);
        });
    }
    for (position, r) in futures::future::join_all(up.into_iter().map(send)).await {
        confirm_relay(node, vid, &key, position, r);
    }
    // Every member lacking it was offered it: a lock on the block may go ahead (a
    // member that did not answer catches up by rejoin or rebuild).
    lock(&vol.unsettled).mark_offered(&key);
}

/// Records that the member at `position` holds the relayed update, if its answer
/// says so.
fn confirm_relay(
    node: &Node,
    vid: VolumeId,
    key: &UpdateKey,
    position: u8,
    r: Result<(Response, Bytes), CallError>,
) {
    let held = match r {
        Ok((Response::Updated(rep), _)) => match rep.results.first() {
            Some(Ok(a)) => {
                if !a.duplicate {
                    node.aon.relayed.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            // It is past this version already (it rebuilt the block).
            Some(Err(WireError::StaleVersion { .. })) => true,
            _ => false,
        },
        Err(CallError::Remote(WireError::StaleVersion { .. })) => true,
        _ => false,
    };
    if let (true, Some(vol)) = (held, node.volumes.get(&vid)) {
        lock(&vol.unsettled).confirm(key, position);
    }
}
