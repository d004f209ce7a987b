//! The client's side of lock groups (report 5.3.3): leases and heartbeats, and the
//! completion notices that let nodes forget updates every member holds.
//!
//! - A lock request renews the client's lease at the node; while the client holds a
//!   lock at a node (or has an unlock or notice still to deliver there) it sends it a
//!   heartbeat every third of the lease. If it stops (it crashed, or is paused longer
//!   than the lease), the node fences it and, once its updates in flight are settled,
//!   releases its locks.
//! - The client knows when its lease was last confirmed at each node (the send time
//!   of the last request the node renewed it with). Before it sends updates it checks
//!   that `min_write` of the members that granted the lock still have a lease well
//!   within its length (a hung member cannot confirm it; it checks the lock itself
//!   when it takes its part); otherwise it stops with `LeaseExpired` instead of
//!   sending updates the nodes would refuse.
//! - When every member that must hold an update (its data node and every parity
//!   node) acknowledged it, its id is *complete*: the client tells those members
//!   (piggybacked on its next lock or update to the node, or with the next
//!   heartbeat), and they drop the copy they keep for relaying. Until then the
//!   members holding it pass it on to the others themselves.
//! - A node that answers `Fenced` ends this client identity: the client takes a new
//!   id (a new lease), and the operation that met it fails with `Fenced`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_proto::{ClientId, HeartbeatReq, NodeId, Request, Response, StripeId, UpdateId, WireError};

use crate::conn::Lane;
use crate::error::CallError;
use crate::Client;

/// Completion notices kept per node before the oldest are dropped (a dropped notice
/// only makes the node relay an update every member already has).
const NOTICES_MAX: usize = 65_536;
/// Completion notices sent with one request, oldest first: 2048 take at most 40 KiB
/// of a frame's 64 KiB control section (two varints of at most 10 bytes each),
/// leaving room for whatever else the request carries.
const NOTICES_PER_REQUEST: usize = 2048;
/// How often the heartbeat task looks at what is due.
const TICK: Duration = Duration::from_millis(50);

#[derive(Default)]
struct NodeLease {
    /// (stripe, owner) of the locks held at the node.
    held: BTreeSet<(StripeId, ClientId)>,
    /// Send time of the last request the node renewed the lease with.
    confirmed_at: Option<Instant>,
    last_heartbeat: Option<Instant>,
    /// A heartbeat is on its way (a hung node must not hold up the others').
    heartbeat_out: bool,
    completed: Vec<UpdateId>,
    /// Dirty cache entries this client keeps a copy of at the node (its cache group,
    /// report 5.5): the node must keep hearing from the client while it holds them.
    copies: BTreeSet<u64>,
}

impl NodeLease {
    fn keep_alive(&self) -> bool {
        !self.held.is_empty() || !self.copies.is_empty()
    }
}

#[derive(Default)]
pub(crate) struct Leases {
    nodes: Mutex<HashMap<NodeId, NodeLease>>,
    running: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The oldest [`NOTICES_PER_REQUEST`] of `pending`, taken.
fn take_notices(pending: &mut Vec<UpdateId>) -> Vec<UpdateId> {
    if pending.len() <= NOTICES_PER_REQUEST {
        return std::mem::take(pending);
    }
    let rest = pending.split_off(NOTICES_PER_REQUEST);
    std::mem::replace(pending, rest)
}

impl Client {
    pub(crate) fn lease_ms(&self) -> u32 {
        self.inner.cfg.lease.as_millis().clamp(1, u32::MAX as u128) as u32
    }

    /// Completion notices for `node`, taken to be sent with a request to it (at most
    /// [`NOTICES_PER_REQUEST`]; the rest wait for the next request or heartbeat).
    pub(crate) fn take_completed(&self, node: NodeId) -> Vec<UpdateId> {
        lock(&self.inner.leases.nodes)
            .get_mut(&node)
            .map(|n| take_notices(&mut n.completed))
            .unwrap_or_default()
    }

    /// Puts back notices that could not be delivered.
    pub(crate) fn return_completed(&self, node: NodeId, ids: Vec<UpdateId>) {
        if ids.is_empty() {
            return;
        }
        self.note_complete(node, ids);
    }

    /// A lock at `node` was granted; the request was sent at `sent_at`.
    pub(crate) fn note_locked(
        &self,
        node: NodeId,
        stripe: StripeId,
        owner: ClientId,
        sent_at: Instant,
    ) {
        {
            let mut nodes = lock(&self.inner.leases.nodes);
            let n = nodes.entry(node).or_default();
            n.held.insert((stripe, owner));
            n.confirmed_at = Some(n.confirmed_at.map_or(sent_at, |t| t.max(sent_at)));
        }
        self.ensure_heartbeats();
    }

    /// The locks of `owner` on `stripe` at `node` are released.
    pub(crate) fn note_unlocked(&self, node: NodeId, stripe: StripeId, owner: ClientId) {
        if let Some(n) = lock(&self.inner.leases.nodes).get_mut(&node) {
            n.held.remove(&(stripe, owner));
        }
    }

    /// Every member holds these updates: tell `node` to forget them.
    pub(crate) fn note_complete(&self, node: NodeId, ids: Vec<UpdateId>) {
        {
            let mut nodes = lock(&self.inner.leases.nodes);
            let n = nodes.entry(node).or_default();
            n.completed.extend(ids);
            let over = n.completed.len().saturating_sub(NOTICES_MAX);
            n.completed.drain(..over);
        }
        self.ensure_heartbeats();
    }

    /// Block `lba`'s pending change was copied to `node` (`true`), or its copy
    /// there dropped.
    pub(crate) fn note_copies(&self, node: NodeId, lba: u64, added: bool) {
        {
            let mut nodes = lock(&self.inner.leases.nodes);
            let n = nodes.entry(node).or_default();
            if added {
                n.copies.insert(lba);
            } else {
                n.copies.remove(&lba);
            }
        }
        if added {
            self.ensure_heartbeats();
        }
    }

    /// True when the lease at `node` was confirmed recently enough that it has at
    /// least a third of its length left.
    pub(crate) fn lease_ok(&self, node: NodeId) -> bool {
        let limit = self.inner.cfg.lease.mul_f64(2.0 / 3.0);
        lock(&self.inner.leases.nodes)
            .get(&node)
            .and_then(|n| n.confirmed_at)
            .is_some_and(|t| t.elapsed() < limit)
    }

    /// Locks this client holds, per node (for tools).
    pub fn held_locks(&self) -> usize {
        lock(&self.inner.leases.nodes)
            .values()
            .map(|n| n.held.len())
            .sum()
    }

    /// A node said this client is fenced: start again under a new identity.
    pub(crate) fn fenced(&self, by: NodeId) {
        let old = self.id();
        let new = rand::random::<u64>() | 1;
        if self
            .inner
            .id
            .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                client = old,
                node = by,
                new_client = new,
                "fenced by a node (lease expired); continuing as a new client"
            );
            lock(&self.inner.leases.nodes).clear();
        }
    }

    fn ensure_heartbeats(&self) {
        if !self.inner.leases.running.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move { me.heartbeats().await });
        }
    }

    /// One heartbeat to `node`, carrying its completion notices.
    async fn heartbeat(&self, node: NodeId, completed: Vec<UpdateId>) {
        let req = Request::Heartbeat(HeartbeatReq {
            client: self.id(),
            lease_ms: self.lease_ms(),
            completed: completed.clone(),
        });
        let sent = Instant::now();
        // On the control connection: behind a data connection's queued updates it
        // could arrive after the lease ran out.
        let r = self.call_on(node, Lane::Control, &req, Bytes::new()).await;
        if let Some(n) = lock(&self.inner.leases.nodes).get_mut(&node) {
            n.heartbeat_out = false;
            if matches!(r, Ok((Response::Alive { .. }, _))) {
                n.confirmed_at = Some(n.confirmed_at.map_or(sent, |t| t.max(sent)));
            }
        }
        match r {
            Ok((Response::Alive { .. }, _)) => {}
            Err(CallError::Remote(WireError::Fenced { .. })) => self.fenced(node),
            _ => self.return_completed(node, completed),
        }
    }

    /// Sends what is due: a heartbeat to every node where the client holds locks (or
    /// has unlocks to deliver) every third of the lease, and completion notices
    /// within a tick. Stops when nothing is held and nothing is to deliver.
    async fn heartbeats(&self) {
        let third = self.inner.cfg.lease / 3;
        loop {
            tokio::time::sleep(TICK).await;
            let now = Instant::now();
            let due: Vec<(NodeId, Vec<UpdateId>)> = {
                let mut nodes = lock(&self.inner.leases.nodes);
                let backlog = self.backlog_nodes();
                nodes
                    .iter_mut()
                    .filter(|(id, n)| {
                        let keep_alive = n.keep_alive() || backlog.contains(id);
                        let stale = n
                            .last_heartbeat
                            .is_none_or(|t| now.duration_since(t) >= third);
                        !n.heartbeat_out && ((keep_alive && stale) || !n.completed.is_empty())
                    })
                    .map(|(id, n)| {
                        n.last_heartbeat = Some(now);
                        n.heartbeat_out = true;
                        (*id, take_notices(&mut n.completed))
                    })
                    .collect()
            };
            for (node, completed) in due {
                let me = self.clone();
                tokio::spawn(async move { me.heartbeat(node, completed).await });
            }
            let idle = {
                let nodes = lock(&self.inner.leases.nodes);
                let backlog = self.backlog_nodes();
                nodes.iter().all(|(id, n)| {
                    !n.keep_alive() && n.completed.is_empty() && !backlog.contains(id)
                })
            };
            if idle {
                self.inner.leases.running.store(false, Ordering::Release);
                // Something may have arrived between the check and the store.
                let again = lock(&self.inner.leases.nodes)
                    .values()
                    .any(|n| n.keep_alive() || !n.completed.is_empty());
                if !again || self.inner.leases.running.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::fakenode;
    use crate::ClientConfig;

    #[tokio::test]
    async fn heartbeats_reach_a_node_that_stopped_reading_the_data_connection() {
        // Each node grants the lock and then reads nothing more on that connection,
        // like a node whose reader waits behind a busy store, with the client's
        // updates queued before any heartbeat. The heartbeats must still arrive, or
        // the node fences a live client when the lease runs out.
        let (map, fakes) = fakenode::cluster(true).await;
        let cfg = ClientConfig {
            lease: Duration::from_millis(600),
            ..ClientConfig::default()
        };
        let client = Client::new(map, 1, cfg).unwrap();
        let locked = client.lock_stripe(0, &[(0, 0, 0)], 0x0E).await.unwrap();
        assert_eq!(locked.live(), 3);
        // Two and a half leases: a heartbeat is due every 200 ms.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for (p, f) in fakes.iter().enumerate() {
            let beats = f.heartbeats.load(Ordering::Relaxed);
            assert!(
                beats >= 3,
                "position {p} got {beats} heartbeats in 2.5 leases"
            );
        }
        for p in 0..3 {
            let node = client.geometry().member(0, p);
            assert!(client.lease_ok(node), "lease at position {p} not confirmed");
        }
    }

    #[tokio::test]
    async fn heartbeats_reach_a_node_declared_down_that_holds_a_lock() {
        // A node declared down while alive (stopped past the failure detector, then
        // continued) still holds this client's lock. Heartbeats must reach it, or the
        // lease there runs out and it fences a live client; data requests do not go.
        let (map, fakes) = fakenode::cluster(false).await;
        let cfg = ClientConfig {
            lease: Duration::from_millis(600),
            ..ClientConfig::default()
        };
        let client = Client::new(map.clone(), 1, cfg).unwrap();
        let _locked = client.lock_stripe(0, &[(0, 0, 0)], 0x0E).await.unwrap();
        let node = client.geometry().member(0, 0);
        let mut down = map.clone();
        down.epoch += 1;
        for n in &mut down.nodes {
            if n.id == node {
                n.state = drs_proto::MemberState::Down;
            }
        }
        assert!(client.set_map(down));
        let before = fakes[node as usize].heartbeats.load(Ordering::Relaxed);
        // A heartbeat is due every 200 ms (a third of the lease).
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let beats = fakes[node as usize].heartbeats.load(Ordering::Relaxed) - before;
        assert!(
            beats >= 3,
            "{beats} heartbeats in 1 s to the node declared down"
        );
        assert!(matches!(
            client.call(node, &Request::Ping, Bytes::new()).await,
            Err(CallError::Unreachable(_))
        ));
    }

    #[tokio::test]
    async fn a_write_goes_on_while_enough_members_confirm_the_lease() {
        // 2+1, durable on 2. One member goes silent (hung) after granting the locks:
        // the lease there is no longer confirmed, but the other two still hold the
        // locks under a confirmed lease, so the write goes on. With two silent, the
        // client cannot know its locks still hold: nothing is sent.
        let (map, fakes) = fakenode::cluster_with(false, 2).await;
        let cfg = ClientConfig {
            lease: Duration::from_millis(600),
            request_timeout: Duration::from_millis(800),
            ..ClientConfig::default()
        };
        let client = Client::new(map, 1, cfg).unwrap();
        let geo = client.geometry().clone();
        let a = client.lock_stripe(0, &[(0, 0, 16)], 0x0E).await.unwrap();
        let b = client.lock_stripe(1, &[(0, 0, 16)], 0x0F).await.unwrap();
        let silence = |p: usize| {
            let node = geo.member(0, p);
            fakes[node as usize].silent.store(true, Ordering::Relaxed);
            node
        };
        let hung = silence(2);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!client.lease_ok(hung));
        let delta = Bytes::from(vec![1u8; 16]);
        client
            .commit_stripe(&a, vec![(0, 0, delta.clone())])
            .await
            .unwrap();
        silence(1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = client.commit_stripe(&b, vec![(0, 0, delta)]).await;
        assert!(
            matches!(r, Err(crate::ClientError::LeaseExpired { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn notices_go_out_oldest_first_a_bounded_number_at_a_time() {
        // Client ids are random 64-bit numbers, sequence numbers grow: the largest
        // encodings (10 bytes each).
        let ids: Vec<UpdateId> = (0..5000)
            .map(|seq| UpdateId {
                client: u64::MAX - 7,
                seq: u64::MAX - seq,
            })
            .collect();
        let mut pending = ids.clone();
        let mut sent = Vec::new();
        while !pending.is_empty() {
            let batch = take_notices(&mut pending);
            assert!(!batch.is_empty() && batch.len() <= NOTICES_PER_REQUEST);
            // Sent with a heartbeat, the batch fits a frame's control section with
            // room to spare for what else a request carries.
            let header = drs_proto::FrameHeader {
                kind: drs_proto::FrameKind::Request,
                cluster_id: 1,
                epoch: 1,
                request_id: 1,
                deadline_ms: 1000,
            };
            let req = drs_proto::Request::Heartbeat(drs_proto::HeartbeatReq {
                client: u64::MAX,
                lease_ms: u32::MAX,
                completed: batch.clone(),
            });
            let frame = drs_proto::Frame::new(header, &req, bytes::Bytes::new()).unwrap();
            assert!(frame.ctrl.len() <= drs_proto::frame::MAX_CTRL_LEN - (16 << 10));
            sent.extend(batch);
        }
        assert_eq!(sent, ids);
    }
}
