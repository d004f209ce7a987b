//! The leader's failure detector: nodes that heartbeat stay up, a silent one is marked
//! down within down_after + 1 s, also when it went silent with the leader, and a new
//! leader gives everyone a grace period.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use drs_meta::{ClientConfig, MetaClient, MetaCommand, MetaResponse, NodeState};
use tokio::sync::watch;

const DOWN_AFTER_MS: u64 = 2000;

/// Heartbeats `node` at `incarnation` every 300 ms until told to stop, as a storage
/// node does: to every replica, and to the leader.
fn heartbeater(client: MetaClient, node: u32, incarnation: u64) -> watch::Sender<bool> {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            if *stop_rx.borrow() {
                return;
            }
            let all = client.clone();
            tokio::spawn(async move {
                let replicas = all.replicas();
                all.heartbeat_every_replica(
                    &replicas,
                    node,
                    incarnation,
                    Duration::from_millis(300),
                )
                .await
            });
            let _ = client.heartbeat(node, incarnation).await;
            tokio::select! {
                _ = stop_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    });
    stop_tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_nodes_are_marked_down_and_heartbeating_ones_stay_up() {
    init_tracing();
    let mut c = Cluster::start(3, 8, |cfg| cfg.down_after_ms = DOWN_AFTER_MS).await;
    c.wait_leader(Duration::from_secs(10)).await;
    let hb_client = c.client_with(ClientConfig {
        deadline: Duration::from_secs(3),
        rpc_timeout: Duration::from_secs(1),
        ..ClientConfig::default()
    });
    let client = c.client();
    // Node 3 restarts: registers and heartbeats at its new incarnation while recovering.
    let r = client
        .propose(MetaCommand::Register {
            node: 3,
            addr: node_addr(3),
            nonce: 0,
        })
        .await
        .unwrap();
    let MetaResponse::Registered { incarnation, .. } = r else {
        panic!("{r:?}")
    };
    let mut beating: BTreeMap<u32, watch::Sender<bool>> = BTreeMap::new();
    for node in 0..3 {
        beating.insert(node, heartbeater(hb_client.clone(), node, 1));
    }
    beating.insert(3, heartbeater(hb_client.clone(), 3, incarnation));

    // Nodes 4..8 never heartbeat: marked down after the grace period.
    let leader = c.wait_leader(Duration::from_secs(5)).await;
    let state = c.nodes[&leader].state();
    let t = wait_until(
        Duration::from_secs(10),
        "silent nodes to be marked down",
        || {
            let s = state.borrow();
            (4..8).all(|n| s.nodes[&n].state == NodeState::Down)
        },
    )
    .await;
    eprintln!("never-heard nodes marked down {t:?} after registration settled");
    {
        let s = state.borrow();
        for n in 0..3 {
            assert_eq!(s.nodes[&n].state, NodeState::Up, "node {n}");
        }
        assert_eq!(s.nodes[&3].state, NodeState::Recovering);
        assert_eq!(s.nodes[&3].incarnation, incarnation);
    }

    // Node 2 stops heartbeating.
    let epoch_before = state.borrow().epoch;
    let stopped = Instant::now();
    let _ = beating.remove(&2).unwrap().send(true);
    let t = wait_until(
        Duration::from_millis(DOWN_AFTER_MS + 5000),
        "node 2 to be marked down",
        || state.borrow().nodes[&2].state == NodeState::Down,
    )
    .await;
    eprintln!(
        "node 2 marked down {:?} after its last heartbeat was sent (down_after {DOWN_AFTER_MS} ms)",
        stopped.elapsed()
    );
    assert!(
        t <= Duration::from_millis(DOWN_AFTER_MS + 1000),
        "marked down after {t:?}"
    );
    let s = state.borrow().clone();
    assert_eq!(s.epoch, epoch_before + 1, "one epoch for one state change");
    assert_eq!(s.nodes[&2].incarnation, 1);
    for n in [0, 1] {
        assert_eq!(s.nodes[&n].state, NodeState::Up, "node {n}");
    }
    assert_eq!(s.nodes[&3].state, NodeState::Recovering);

    // The leader's replica stops, and node 1 goes silent with it (a storage node
    // hosting the leader, SIGKILLed): the new leader heard node 1 as a follower, so it
    // marks it down within down_after + 1 s of its last heartbeat, not an election
    // later. The heartbeating nodes stay up through the change.
    let old = leader;
    let silent_at = Instant::now();
    let _ = beating.remove(&1).unwrap().send(true);
    c.stop(old).await;
    let new = c.wait_leader(Duration::from_secs(10)).await;
    let state = c.nodes[&new].state();
    let t = wait_until(
        Duration::from_millis(2 * DOWN_AFTER_MS + 5000),
        "node 1 to be marked down by the new leader",
        || state.borrow().nodes[&1].state == NodeState::Down,
    )
    .await;
    let silent = silent_at.elapsed();
    let elected = silent.saturating_sub(t);
    eprintln!(
        "node 1, silent with the old leader, marked down {silent:?} after its last heartbeat ({elected:?} to elect a new leader)"
    );
    // Down after_ms from its last heartbeat, or a third of it from the election if
    // that is later; not the whole down_after from the election (before nodes
    // heartbeat every replica, it took elected + down_after).
    let bound = Duration::from_millis(DOWN_AFTER_MS)
        .max(elected + Duration::from_millis(DOWN_AFTER_MS / 3))
        + Duration::from_millis(1000);
    assert!(
        silent <= bound,
        "node 1 marked down {silent:?} after it went silent (bound {bound:?})"
    );
    let epoch = state.borrow().epoch;
    let watch_until = Instant::now() + Duration::from_millis(2 * DOWN_AFTER_MS + 500);
    while Instant::now() < watch_until {
        {
            let s = state.borrow();
            assert_eq!(
                s.nodes[&0].state,
                NodeState::Up,
                "node 0 under leader {new}"
            );
            assert_eq!(s.nodes[&3].state, NodeState::Recovering);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        state.borrow().epoch,
        epoch,
        "no state change under the new leader"
    );

    // Node 3 finishes recovering, then goes silent: marked down by the new leader.
    let up = client
        .propose(MetaCommand::MarkUp {
            node: 3,
            incarnation,
        })
        .await
        .unwrap();
    assert!(matches!(up, MetaResponse::Applied { .. }), "{up:?}");
    let _ = beating.remove(&3).unwrap().send(true);
    let t = wait_until(
        Duration::from_millis(DOWN_AFTER_MS + 5000),
        "node 3 to be marked down",
        || state.borrow().nodes[&3].state == NodeState::Down,
    )
    .await;
    eprintln!("node 3 marked down by the new leader after {t:?}");
    assert!(t <= Duration::from_millis(DOWN_AFTER_MS + 1000));
    // A heartbeat does not bring a node back: it must register again.
    let ack = hb_client.heartbeat(3, incarnation).await.unwrap();
    assert_eq!(ack.record.map(|r| r.state), Some(NodeState::Down));

    for (_, stop) in beating {
        let _ = stop.send(true);
    }
    c.shutdown().await;
}

/// Goal: a leader that lost its quorum (so it refused heartbeats meanwhile) and got
/// it back gives every node a fresh grace period, instead of marking down the nodes
/// whose heartbeats it refused during its own outage.
///
/// Method: 3 replicas, nodes 0..3 heartbeating, the silent ones marked down first.
/// Both followers are shut down for 2 x down_after (heartbeats fail meanwhile), then
/// started again on their addresses. Once a leader has a quorum again, nodes 0..3
/// must stay up for down_after + 1 s, and no epoch may pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_back_from_losing_its_quorum_marks_no_heartbeating_node_down() {
    init_tracing();
    let mut c = Cluster::start(3, 8, |cfg| cfg.down_after_ms = DOWN_AFTER_MS).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let hb_client = c.client_with(ClientConfig {
        deadline: Duration::from_secs(1),
        rpc_timeout: Duration::from_millis(500),
        ..ClientConfig::default()
    });
    let beating: Vec<watch::Sender<bool>> = (0..4)
        .map(|n| heartbeater(hb_client.clone(), n, 1))
        .collect();
    let state = c.nodes[&leader].state();
    wait_until(Duration::from_secs(10), "silent nodes marked down", || {
        let s = state.borrow();
        (4..8).all(|n| s.nodes[&n].state == NodeState::Down)
    })
    .await;

    let followers: Vec<u64> = c.addrs.keys().copied().filter(|id| *id != leader).collect();
    for id in &followers {
        c.stop(*id).await;
    }
    tokio::time::sleep(Duration::from_millis(2 * DOWN_AFTER_MS)).await;
    for id in &followers {
        c.start_replica(*id, None).await;
    }
    let back = c.wait_leader(Duration::from_secs(10)).await;
    let state = c.nodes[&back].state();
    let epoch = state.borrow().epoch;
    let watch_until = Instant::now() + Duration::from_millis(DOWN_AFTER_MS + 1000);
    while Instant::now() < watch_until {
        {
            let s = state.borrow();
            for n in 0..4 {
                assert_eq!(
                    s.nodes[&n].state,
                    NodeState::Up,
                    "node {n} marked down after the quorum came back (leader {back}, was {leader})"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state.borrow().epoch, epoch, "no state change");
    for stop in beating {
        let _ = stop.send(true);
    }
    c.shutdown().await;
}
