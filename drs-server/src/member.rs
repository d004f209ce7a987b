//! Membership: the node's side of the metadata service (report 2.3-2.10, the binding
//! agent of sections 13-15).
//!
//! When the cluster map names metadata replicas, a node process:
//! - hosts the replica whose `host` is this node ([`start_replica`]), its database
//!   under `DATA_DIR/meta`, and offers the initial map for the first bootstrap;
//! - registers each start with the service, which gives it a new incarnation and
//!   marks it *recovering* in a new epoch;
//! - heartbeats the leader, whose failure detector marks a silent node *down*;
//! - follows the map (the epoch it accepts requests from, and the map its peer
//!   clients use to route around down nodes);
//! - reports itself *up* once every block is verified against its stripe;
//! - and, if the service declared it down while it was alive (paused, cut off),
//!   re-verifies every block and registers again: clients wrote around it meanwhile.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use drs_client::Client;
use drs_meta::{MetaClient, MetaCommand, MetaConfig, MetaNode, MetaResponse, MetaState, NodeState};
use drs_proto::{ClusterMap, VolumeId};
use tokio::sync::watch;

use crate::Node;

/// Starts the metadata replica this node hosts, if the map names one.
pub async fn start_replica(
    node: &Node,
    map: &ClusterMap,
    down_after: Duration,
) -> anyhow::Result<Option<MetaNode>> {
    let Some(me) = map.meta.iter().find(|r| r.host == Some(node.cfg.node)) else {
        return Ok(None);
    };
    let dir = replica_dir(&node.cfg.data_dir);
    let mut cfg = MetaConfig::new(me.id, me.addr, dir.clone(), map.cluster_id);
    cfg.down_after_ms = down_after.as_millis() as u64;
    cfg.session_expiry_ms = node.cfg.session_expiry.as_millis() as u64;
    cfg.namespace_limit = node.cfg.namespace_limit;
    cfg.key = node.cfg.key.clone();
    let meta = MetaNode::start(cfg)
        .await
        .with_context(|| format!("start metadata replica {} at {}", me.id, me.addr))?;
    if me.join {
        // Added after the bootstrap: the leader adds it; it must not start a group
        // of its own.
        tracing::info!(replica = me.id, addr = %me.addr, "metadata replica started; waiting to be added");
        return Ok(Some(meta));
    }
    let replicas = map
        .meta
        .iter()
        .filter(|r| !r.join)
        .map(|r| (r.id, r.addr))
        .collect();
    // Every replica offers the same first map; whichever bootstraps, the others see
    // it already done. Done in the background: it needs a quorum of replicas.
    let init = meta.clone();
    let first = map.clone();
    tokio::spawn(async move {
        if let Err(e) = init.initialize(replicas, first).await {
            tracing::warn!(error = %e, "metadata bootstrap did not complete here");
        }
    });
    tracing::info!(replica = me.id, addr = %me.addr, dir = %dir.display(), "metadata replica started");
    Ok(Some(meta))
}

/// Fault injection for partition tests (`--fault-signals`): SIGUSR1 isolates the
/// hosted replica from the other replicas, SIGUSR2 heals it. Client requests (reads,
/// heartbeats, proposals) still reach it, as in a partition that cuts only the
/// replicas' links to each other.
pub fn isolate_on_signals(
    meta: MetaNode,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut cut = signal(SignalKind::user_defined1()).context("install SIGUSR1 handler")?;
    let mut heal = signal(SignalKind::user_defined2()).context("install SIGUSR2 handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cut.recv() => meta.set_isolated(true),
                _ = heal.recv() => meta.set_isolated(false),
                _ = shutdown.changed() => return,
            }
        }
    });
    Ok(())
}

/// The node's membership loop: register, heartbeat, follow the map, report up, and
/// register again after being declared down. Ends at shutdown.
pub async fn run(
    node: Arc<Node>,
    peers: HashMap<VolumeId, Client>,
    meta: MetaClient,
    addr: SocketAddr,
    down_after: Duration,
    reverify: watch::Sender<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let beat = (down_after / 6).max(Duration::from_millis(100));
    let id = node.cfg.node;
    // The incarnation heartbeats name (0: not registered yet).
    let beating = Arc::new(AtomicU64::new(0));
    tokio::spawn(heartbeats(
        node.clone(),
        // A beat that cannot get through soon is better replaced by the next one.
        meta.with_deadline((down_after / 2).max(beat)),
        beating.clone(),
        beat,
        shutdown.clone(),
    ));
    let mut backoff = beat;
    'register: loop {
        let Some(incarnation) = register(&node, &meta, addr, &mut shutdown).await else {
            return;
        };
        beating.store(incarnation, Ordering::Release);
        node.registered.store(incarnation, Ordering::Release);
        tracing::info!(
            node = id,
            incarnation,
            "registered with the metadata service"
        );
        let mut epoch = 0;
        let mut marked_up = false;
        loop {
            // The map: follow it, and see what the service thinks of this node.
            let state = tokio::select! {
                s = meta.watch(epoch) => s,
                _ = shutdown.changed() => return,
            };
            let state = match state {
                Ok(s) => {
                    backoff = beat;
                    s
                }
                Err(e) => {
                    tracing::debug!(error = %e, "metadata watch failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            epoch = epoch.max(state.epoch);
            follow(&node, &peers, &state);
            let Some(record) = state.nodes.get(&id) else {
                tracing::error!(node = id, "this node is no longer in the cluster map");
                continue;
            };
            if record.incarnation != incarnation || record.state == NodeState::Down {
                tracing::warn!(
                    node = id,
                    incarnation,
                    recorded = record.incarnation,
                    state = record.state.as_str(),
                    "declared down by the metadata service: re-verifying every block, then registering again"
                );
                for v in node.volumes.values() {
                    v.store.all_unverified();
                }
                // Not registered until the next `Register` is applied: recovery
                // waits for it (`recover::await_registration`).
                node.registered.store(0, Ordering::Release);
                reverify.send_modify(|n| *n += 1);
                continue 'register;
            }
            if record.state == NodeState::Recovering
                && !marked_up
                && all_verified(&node, incarnation)
            {
                match meta
                    .propose(MetaCommand::MarkUp {
                        node: id,
                        incarnation,
                    })
                    .await
                {
                    Ok(MetaResponse::Applied { epoch: e })
                    | Ok(MetaResponse::Unchanged { epoch: e }) => {
                        marked_up = true;
                        tracing::info!(node = id, epoch = e, "every block verified: up");
                    }
                    Ok(other) => {
                        tracing::warn!(?other, "the metadata service refused to mark this node up")
                    }
                    Err(e) => tracing::debug!(error = %e, "marking this node up failed; retrying"),
                }
            }
            if record.state == NodeState::Recovering && !all_verified(&node, incarnation) {
                // Not yet: look again when recovery says so, or soon (a block
                // verified by other means), rather than at the next epoch.
                epoch = state.epoch.saturating_sub(1);
                tokio::select! {
                    _ = node.all_verified.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// Registers this start of the node; its new incarnation, or None at shutdown.
async fn register(
    node: &Node,
    meta: &MetaClient,
    addr: SocketAddr,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<u64> {
    let mut backoff = Duration::from_millis(100);
    // One registration, however many times it is sent: a retry whose first attempt
    // was applied (its answer lost to a leader change) gets the same incarnation.
    let nonce = rand::random::<u64>() | 1;
    loop {
        let cmd = MetaCommand::Register {
            node: node.cfg.node,
            addr,
            nonce,
        };
        match meta.propose(cmd).await {
            // The node's epoch moves only with whole maps (see `follow`), so a client
            // it refuses can always catch up from it.
            Ok(MetaResponse::Registered { incarnation, .. }) => return Some(incarnation),
            Ok(other) => {
                tracing::warn!(?other, "the metadata service refused to register this node")
            }
            Err(e) => tracing::info!(error = %e, "metadata service not reachable yet; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Heartbeats the metadata leader every `beat` with the incarnation in `beating`
/// (once there is one), whatever the watch is doing.
async fn heartbeats(
    node: Arc<Node>,
    meta: MetaClient,
    beating: Arc<AtomicU64>,
    beat: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let incarnation = beating.load(Ordering::Acquire);
        if incarnation == 0 {
            continue;
        }
        // To every replica of the current map too, in the background (each bounded by
        // a beat): a replica that becomes leader then knows who was alive just before.
        let id = node.cfg.node;
        let replicas: Vec<_> = node.live_map().meta.iter().map(|r| r.addr).collect();
        let all = meta.clone();
        tokio::spawn(async move {
            all.heartbeat_every_replica(&replicas, id, incarnation, beat)
                .await
        });
        // Bounded by the client's deadline; a slow answer delays the next beat only.
        if let Err(e) = meta.heartbeat(id, incarnation).await {
            tracing::debug!(error = %e, "heartbeat to the metadata service failed");
        }
    }
}

/// Takes a newer map: the node's epoch, and its peer clients' view of the nodes.
fn follow(node: &Node, peers: &HashMap<VolumeId, Client>, state: &MetaState) {
    let map = state.cluster_map();
    node.set_live_map(map.clone());
    for client in peers.values() {
        client.set_map(map.clone());
    }
}

/// True once every block of the node is verified against its stripe, by a pass
/// that ran under registration `incarnation` (see [`Node::verified_for`]).
fn all_verified(node: &Node, incarnation: u64) -> bool {
    node.info().state == drs_proto::NodeState::Up
        && node.verified_for.load(Ordering::Acquire) == incarnation
}

/// The directory of the replica a node hosts, under its data directory.
pub fn replica_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("meta")
}
