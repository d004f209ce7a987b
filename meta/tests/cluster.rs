//! In-process metadata groups on loopback: election and proposals, a leader killed
//! mid-stream, an isolated minority, restarts from disk, membership changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use drs_meta::{ClientConfig, MetaCommand, MetaError, MetaResponse, NodeState, Refusal, Role};

fn add_node(i: u32) -> MetaCommand {
    MetaCommand::AddNode {
        node: i,
        addr: node_addr(i),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_a_leader_and_apply_proposals() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let started = Instant::now();
    // Every replica is told to initialize, concurrently: one bootstrap wins.
    let c = Cluster::start_all_initializing(3, 8).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    eprintln!(
        "leader {leader} elected and bootstrapped in {:?}",
        started.elapsed()
    );

    let client = c.client();
    let s = client.read().await.unwrap();
    assert_eq!(s.cluster_id, CLUSTER_ID);
    assert_eq!(s.epoch, 1);
    assert_eq!(s.nodes.len(), 8);
    assert!(s
        .nodes
        .values()
        .all(|r| r.state == NodeState::Up && r.incarnation == 1));
    assert_eq!(s.replicas, c.addrs);
    let map = s.cluster_map();
    assert_eq!(map.meta.len(), 3);
    map.validate().unwrap();

    // A node restarts: registers, then comes up.
    let r = client
        .propose(MetaCommand::Register {
            node: 3,
            addr: node_addr(3),
            nonce: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        r,
        MetaResponse::Registered {
            incarnation: 2,
            epoch: 2
        }
    );
    let up = MetaCommand::MarkUp {
        node: 3,
        incarnation: 2,
    };
    assert_eq!(
        client.propose(up.clone()).await.unwrap(),
        MetaResponse::Applied { epoch: 3 }
    );
    assert_eq!(
        client.propose(up).await.unwrap(),
        MetaResponse::Unchanged { epoch: 3 }
    );
    let stale = client
        .propose(MetaCommand::MarkDown {
            node: 3,
            incarnation: 1,
        })
        .await
        .unwrap();
    assert!(matches!(
        stale,
        MetaResponse::Refused(Refusal::StaleIncarnation { current: 2, .. })
    ));
    let unknown = client
        .propose(MetaCommand::Register {
            node: 77,
            addr: node_addr(77),
            nonce: 0,
        })
        .await
        .unwrap();
    assert_eq!(unknown, MetaResponse::Refused(Refusal::UnknownNode(77)));

    let s = c.wait_converged(Duration::from_secs(5)).await;
    assert_eq!(s.epoch, 3);
    assert_eq!(s.nodes[&3].state, NodeState::Up);

    // Initialize is idempotent, on any replica.
    for node in c.nodes.values() {
        node.initialize(c.addrs.clone(), test_map(8)).await.unwrap();
    }
    assert_eq!(client.read().await.unwrap().epoch, 3);

    // Every replica agrees on leader and members.
    for node in c.nodes.values() {
        let st = client.status_of(node.local_addr()).await.unwrap();
        assert_eq!(st.leader, Some(leader));
        assert_eq!(st.members, c.addrs);
        assert_eq!(st.epoch, 3);
    }
    // A follower refuses leader-only work with a hint.
    let follower = c.nodes.values().find(|n| n.id() != leader).unwrap();
    match follower.propose(add_node(50)).await {
        Err(MetaError::ForwardToLeader {
            leader: Some((id, Some(addr))),
        }) => {
            assert_eq!(id, leader);
            assert_eq!(addr, c.addrs[&leader]);
        }
        other => panic!("expected a forward, got {other:?}"),
    }
    // Another cluster's client is refused, not retried until its deadline.
    let foreign = drs_meta::MetaClient::new(c.addrs.values().copied().collect(), 1);
    let t = Instant::now();
    match foreign.read().await {
        Err(e @ MetaError::Auth { .. }) => {
            assert!(e.to_string().contains("another cluster"), "{e}")
        }
        other => panic!("expected a refused handshake, got {other:?}"),
    }
    // A client with another key, or with none, is refused at once, and a replica
    // never answers it.
    for (key, says) in [
        (
            drs_proto::ClusterKey::from_bytes([7; 32]),
            "does not hold this cluster's key",
        ),
        (drs_proto::ClusterKey::open(), "requires the cluster key"),
    ] {
        let stranger = drs_meta::MetaClient::with_config(
            c.addrs.values().copied().collect(),
            CLUSTER_ID,
            ClientConfig {
                key,
                ..ClientConfig::default()
            },
        );
        let t = Instant::now();
        match stranger.propose(add_node(60)).await {
            Err(e @ MetaError::Auth { .. }) => assert!(e.to_string().contains(says), "{e}"),
            other => panic!("expected a refused handshake, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    assert!(!client.read().await.unwrap().nodes.contains_key(&60));
    assert!(t.elapsed() < Duration::from_secs(3));

    // Watch: the current state after the wait when nothing changes...
    let watcher = c.client_with(ClientConfig {
        watch_wait: Duration::from_millis(800),
        ..ClientConfig::default()
    });
    let t = Instant::now();
    let s = watcher.watch(3).await.unwrap();
    assert_eq!(s.epoch, 3);
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    // ... and as soon as the epoch passes otherwise.
    let watcher = c.client_with(ClientConfig {
        watch_wait: Duration::from_secs(20),
        ..ClientConfig::default()
    });
    let t = Instant::now();
    let w = tokio::spawn(async move { watcher.watch(3).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.propose(add_node(60)).await.unwrap();
    let s = w.await.unwrap().unwrap();
    eprintln!("watch answered {:?} after it was asked", t.elapsed());
    assert_eq!(s.epoch, 4);
    assert!(s.nodes.contains_key(&60));
    assert!(t.elapsed() < Duration::from_secs(10));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_stream_loses_no_acknowledged_proposal() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut c = Cluster::start(3, 8, |_| {}).await;
    let old = c.wait_leader(Duration::from_secs(10)).await;
    let client = c.client_with(ClientConfig {
        deadline: Duration::from_secs(10),
        rpc_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let proposer = {
        let (stop, acked, failed, client) =
            (stop.clone(), acked.clone(), failed.clone(), client.clone());
        tokio::spawn(async move {
            let mut i = 100u32;
            while !stop.load(Ordering::Relaxed) {
                match client.propose(add_node(i)).await {
                    Ok(MetaResponse::Applied { .. }) => {
                        acked.lock().unwrap().insert(i);
                    }
                    // A retry of a proposal that was applied before the leader died.
                    Ok(MetaResponse::Refused(Refusal::NodeExists(_))) => {}
                    other => failed.lock().unwrap().push((i, format!("{other:?}"))),
                }
                i += 1;
            }
            i - 100
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().len();
    let killed_at = Instant::now();
    c.stop(old).await;
    let new = c.wait_leader(Duration::from_secs(10)).await;
    let election = killed_at.elapsed();
    assert_ne!(new, old);
    // Keep proposing under the new leader for a while.
    let after_election = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = proposer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    eprintln!(
        "leader {old} killed: leader {new} after {election:?}; {sent} proposals, {} acknowledged \
         ({before} before the kill, {after_election} by the election), failed: {failed:?}",
        acked.len()
    );
    assert!(failed.is_empty(), "proposals failed: {failed:?}");
    assert!(
        acked.len() > after_election,
        "no progress under the new leader"
    );

    let s = c.wait_converged(Duration::from_secs(5)).await;
    for i in &acked {
        assert!(s.nodes.contains_key(i), "acknowledged node {i} is missing");
    }
    // Exactly one epoch per node added, after the bootstrap epoch.
    let added = s.nodes.keys().filter(|n| **n >= 100).count() as u64;
    assert!(added >= acked.len() as u64);
    assert_eq!(s.epoch, 1 + added);

    // The old leader comes back from its directory and catches up.
    c.start_replica(old, None).await;
    let t = Instant::now();
    let s2 = c.wait_converged(Duration::from_secs(10)).await;
    eprintln!("old leader {old} caught up in {:?}", t.elapsed());
    assert_eq!(s2, s);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_minority_cannot_commit_and_catches_up_after_healing() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let c = Cluster::start(3, 8, |cfg| cfg.propose_timeout_ms = 2000).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let client = c.client_with(ClientConfig {
        deadline: Duration::from_secs(15),
        rpc_timeout: Duration::from_millis(1500),
        ..ClientConfig::default()
    });
    client.propose(add_node(100)).await.unwrap();
    let before = c.wait_converged(Duration::from_secs(5)).await;

    // Cut the leader off: it cannot commit anything.
    let isolated = c.nodes[&leader].clone();
    isolated.set_isolated(true);
    let t = Instant::now();
    let res = isolated.propose(add_node(999)).await;
    eprintln!(
        "isolated leader {leader}: proposal -> {res:?} after {:?}",
        t.elapsed()
    );
    assert!(
        matches!(
            res,
            Err(MetaError::Timeout(_)) | Err(MetaError::ForwardToLeader { .. })
        ),
        "an isolated replica committed: {res:?}"
    );

    // The majority elects a leader and goes on.
    let t = Instant::now();
    for i in 101..111 {
        let r = client.propose(add_node(i)).await.unwrap();
        assert!(matches!(r, MetaResponse::Applied { .. }), "{r:?}");
    }
    eprintln!("majority applied 10 proposals in {:?}", t.elapsed());
    let majority_leader = c
        .nodes
        .values()
        .find(|n| n.id() != leader && n.status().role == Role::Leader)
        .map(|n| n.id())
        .expect("the majority has a leader");
    let majority_state = c.state_of(majority_leader);
    assert_eq!(majority_state.epoch, before.epoch + 10);
    // Nothing reached the isolated replica.
    assert_eq!(*isolated.state().borrow().clone(), *before);
    // Reading from it fails rather than returning stale data.
    let iso_client = drs_meta::MetaClient::with_config(
        vec![isolated.local_addr()],
        CLUSTER_ID,
        ClientConfig {
            key: test_key(),
            deadline: Duration::from_secs(2),
            rpc_timeout: Duration::from_secs(1),
            ..ClientConfig::default()
        },
    );
    assert!(iso_client.read().await.is_err());

    // Heal: it catches up to the same state; its lone proposal is gone.
    isolated.set_isolated(false);
    let t = Instant::now();
    let s = c.wait_converged(Duration::from_secs(15)).await;
    eprintln!("healed replica {leader} caught up in {:?}", t.elapsed());
    assert!(s.epoch >= before.epoch + 10);
    assert!(!s.nodes.contains_key(&999));
    for i in 101..111 {
        assert!(s.nodes.contains_key(&i));
    }
    // And the group still works.
    client.propose(add_node(111)).await.unwrap();
    let s = c.wait_converged(Duration::from_secs(5)).await;
    assert!(s.nodes.contains_key(&111));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_from_its_directory_has_its_state_and_catches_up() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut c = Cluster::start(3, 8, |_| {}).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let client = c.client();
    for i in 100..110 {
        client.propose(add_node(i)).await.unwrap();
    }
    let s1 = c.wait_converged(Duration::from_secs(5)).await;
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    c.stop(follower).await;
    for i in 110..120 {
        client.propose(add_node(i)).await.unwrap();
    }
    // Restart: the applied state is there before any traffic.
    let node = c.start_replica(follower, None).await;
    assert_eq!(*node.state().borrow().clone(), *s1);
    wait_until(
        Duration::from_secs(2),
        "metrics of the restarted replica",
        || node.status().last_applied > 0,
    )
    .await;
    let s2 = c.wait_converged(Duration::from_secs(10)).await;
    assert_eq!(s2.epoch, s1.epoch + 10);

    // The whole group restarts (every replica from its directory).
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    for id in &ids {
        c.stop(*id).await;
    }
    for id in &ids {
        c.start_replica(*id, None).await;
    }
    for id in &ids {
        assert_eq!(*c.state_of(*id), *s2);
    }
    let t = Instant::now();
    c.wait_leader(Duration::from_secs(10)).await;
    eprintln!("whole group restarted, leader after {:?}", t.elapsed());
    let r = c.client().propose(add_node(120)).await.unwrap();
    assert_eq!(
        r,
        MetaResponse::Applied {
            epoch: s2.epoch + 1
        }
    );

    // With the majority gone, a client gives up at its deadline with a typed error.
    let gone: Vec<u64> = c.nodes.keys().copied().take(2).collect();
    for id in gone {
        c.stop(id).await;
    }
    let client = c.client().with_deadline(Duration::from_secs(2));
    let t = Instant::now();
    let r = client.propose(add_node(121)).await;
    eprintln!("minority: {r:?} after {:?}", t.elapsed());
    assert!(matches!(r, Err(MetaError::NoLeader { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_replica_joins_by_snapshot_and_a_replica_leaves() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    // Snapshot and purge the log often, so the newcomer needs the snapshot.
    let mut c = Cluster::start(3, 8, |cfg| {
        cfg.snapshot_after_logs = 10;
        cfg.logs_kept_after_snapshot = 0;
    })
    .await;
    let client = c.client();
    for i in 100..130 {
        client.propose(add_node(i)).await.unwrap();
    }
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    wait_until(Duration::from_secs(10), "the log to be purged", || {
        c.nodes[&leader].raft().metrics().borrow().purged.is_some()
    })
    .await;
    let epoch_before = c.wait_converged(Duration::from_secs(5)).await.epoch;

    // Replica 4 starts empty and joins.
    let fourth = c.start_replica(4, None).await;
    let t = Instant::now();
    let members = client.add_replica(4, fourth.local_addr()).await.unwrap();
    eprintln!("replica 4 added in {:?}: {members:?}", t.elapsed());
    assert_eq!(members.len(), 4);
    assert_eq!(members[&4], fourth.local_addr());
    let s = c.wait_converged(Duration::from_secs(10)).await;
    assert_eq!(s.replicas, members);
    assert!(s.epoch > epoch_before, "a replica change moves the epoch");
    assert_eq!(
        s.nodes.keys().filter(|n| **n >= 100).count(),
        30,
        "the newcomer has everything"
    );
    assert!(fourth.raft().metrics().borrow().snapshot.is_some());
    // Adding it again is a no-op.
    assert_eq!(
        client.add_replica(4, fourth.local_addr()).await.unwrap(),
        members
    );

    // The leader leaves the group; the others go on without it.
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let members = client.remove_replica(leader).await.unwrap();
    eprintln!("replica {leader} removed: {members:?}");
    assert_eq!(members.len(), 3);
    assert!(!members.contains_key(&leader));
    c.stop(leader).await;
    c.addrs.remove(&leader);
    let new = c.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new, leader);
    let client = c.client();
    let r = client.propose(add_node(200)).await.unwrap();
    assert!(matches!(r, MetaResponse::Applied { .. }));
    let s = c.wait_converged(Duration::from_secs(5)).await;
    assert_eq!(s.replicas, members);
    for node in c.nodes.values() {
        assert_eq!(node.status().members, members);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_addition_promotes_a_learner_only_once_it_has_caught_up() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut c = Cluster::start(3, 8, |_| {}).await;
    let client = c.client();
    for i in 100..110 {
        client.propose(add_node(i)).await.unwrap();
    }
    // Replica 4 answers no Raft request, so an addition stops at the learner.
    let fourth = c.start_replica(4, None).await;
    fourth.set_isolated(true);
    let short = c.client_with(ClientConfig {
        deadline: Duration::from_secs(2),
        rpc_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    });
    let res = short.add_replica(4, fourth.local_addr()).await;
    assert!(res.is_err(), "an unreachable replica was added: {res:?}");
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let st = c.nodes[&leader].status();
    assert!(st.learners.contains_key(&4), "no learner left: {st:?}");
    assert!(!st.members.contains_key(&4));

    // Run again while it is still behind: it stays a learner.
    let res = short.add_replica(4, fourth.local_addr()).await;
    assert!(
        res.is_err(),
        "a learner that never caught up was promoted: {res:?}"
    );
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    assert!(!c.nodes[&leader].status().members.contains_key(&4));
    // At another address: refused, with the address it was begun with.
    let elsewhere: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    match short.add_replica(4, elsewhere).await {
        Err(MetaError::Membership(msg)) => assert!(msg.contains("already a learner"), "{msg}"),
        other => panic!("a learner's address was changed: {other:?}"),
    }

    // Healed, the addition completes, and the new voter has everything.
    fourth.set_isolated(false);
    let members = client.add_replica(4, fourth.local_addr()).await.unwrap();
    assert_eq!(members.len(), 4);
    assert_eq!(members[&4], fourth.local_addr());
    let s = c.wait_converged(Duration::from_secs(10)).await;
    assert_eq!(s.replicas, members);
    assert_eq!(s.nodes.keys().filter(|n| **n >= 100).count(), 10);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_at_its_size_limit_refuses_to_grow_and_can_shrink() {
    use drs_meta::fs::{FsCommand, FsError, FsReply, Time, ROOT};
    // A limit of 16 KiB instead of 64 MiB: some 200 small files.
    let c = Cluster::start(3, 8, |cfg| cfg.namespace_limit = 16 << 10).await;
    c.wait_leader(Duration::from_secs(10)).await;
    let client = c.client();
    let now = Time { secs: 1, nanos: 0 };
    assert!(matches!(
        client.fs(format(1 << 16, now)).await.unwrap(),
        Ok(FsReply::Attr(_))
    ));
    let create = |i: usize| create_file(format!("file-{i:05}").as_bytes(), now);
    // A file with 16 blocks, mapped before the namespace is full.
    let Ok(FsReply::Attr(file)) = client.fs(create(99_999)).await.unwrap() else {
        panic!("create");
    };
    let map = |first: u64| FsCommand::Map {
        ino: file.ino,
        first,
        count: 16,
        ahead: 0,
    };
    assert!(matches!(client.fs(map(0)).await.unwrap(), Ok(FsReply::Mapped(m)) if m.len() == 16));
    // Admission counts generous bounds between measurements (at most every 100 ms
    // once over the limit): full is two refusals in a row, 150 ms apart.
    let mut made = 0;
    let mut refused = 0;
    let full = loop {
        match client.fs(create(made)).await.unwrap() {
            Ok(_) => {
                made += 1;
                refused = 0;
            }
            Err(e) if refused == 1 => break e,
            Err(_) => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        assert!(made < 2000, "2000 files created under a 16 KiB limit");
    };
    assert_eq!(full, FsError::NoSpace);
    assert!(made > 50, "only {made} files before the limit");
    // An extended attribute that would not fit is refused too; removing names is not.
    let xattr = FsCommand::SetXattr {
        ino: ROOT,
        name: b"user.big".to_vec(),
        value: vec![7; 8 << 10],
        create: false,
        replace: false,
        now,
    };
    assert_eq!(client.fs(xattr).await.unwrap(), Err(FsError::NoSpace));
    // Blocks the file has are still mapped (a write over them); new ones are not.
    assert!(matches!(client.fs(map(0)).await.unwrap(), Ok(FsReply::Mapped(m)) if m.len() == 16));
    assert_eq!(client.fs(map(16)).await.unwrap(), Err(FsError::NoSpace));
    for i in 0..made / 2 {
        let unlink = FsCommand::Unlink {
            parent: ROOT,
            name: format!("file-{i:05}").into_bytes(),
            dir: false,
            now,
        };
        match client.fs(unlink).await.unwrap() {
            Ok(FsReply::Orphaned(Some(ino))) => {
                assert!(client.fs(FsCommand::Drop { ino }).await.unwrap().is_ok());
            }
            other => panic!("unlink {i}: {other:?}"),
        }
    }
    // Once measured again (at most 100 ms later), there is room again.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(client.fs(create(made)).await.unwrap().is_ok());
    c.shutdown().await;
}

/// A namespace larger than a frame (some 18 MiB of extended attributes) reaches a
/// replica that joins after the log was purged: the snapshot goes in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_larger_than_a_frame_reaches_a_new_replica_in_chunks() {
    use drs_meta::fs::{FsCommand, FsReply, Time};
    let _serial = SERIAL.lock().await;
    init_tracing();
    // No snapshot until asked for: the one taken holds every write.
    let mut c = Cluster::start(3, 8, |cfg| {
        cfg.snapshot_after_logs = 100_000;
        cfg.logs_kept_after_snapshot = 0;
    })
    .await;
    let client = c.client();
    let now = Time { secs: 1, nanos: 0 };
    assert!(client.fs(format(1 << 16, now)).await.unwrap().is_ok());
    for i in 0..300 {
        let create = create_file(format!("file-{i:04}").as_bytes(), now);
        let Ok(FsReply::Attr(a)) = client.fs(create).await.unwrap() else {
            panic!("create {i}");
        };
        let xattr = FsCommand::SetXattr {
            ino: a.ino,
            name: b"user.payload".to_vec(),
            value: vec![i as u8; 60 << 10],
            create: true,
            replace: false,
            now,
        };
        assert!(client.fs(xattr).await.unwrap().is_ok(), "xattr {i}");
    }
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let size = c.nodes[&leader].fs().read().encoded_len();
    assert!(size > drs_meta::net::MAX_FRAME_LEN, "{size} bytes");
    let raft = c.nodes[&leader].raft().clone();
    raft.trigger().snapshot().await.unwrap();
    let applied = raft.metrics().borrow().last_applied;
    wait_until(Duration::from_secs(20), "a snapshot of everything", || {
        let m = raft.metrics().borrow().clone();
        m.snapshot >= applied && m.purged.is_some()
    })
    .await;

    let fourth = c.start_replica(4, None).await;
    let t = Instant::now();
    let members = client.add_replica(4, fourth.local_addr()).await.unwrap();
    eprintln!("replica 4 added in {:?}", t.elapsed());
    assert_eq!(members.len(), 4);
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    wait_until(Duration::from_secs(20), "the newcomer's snapshot", || {
        fourth.raft().metrics().borrow().snapshot.is_some()
    })
    .await;
    wait_until(Duration::from_secs(20), "the newcomer's namespace", || {
        *fourth.fs().read() == *c.nodes[&leader].fs().read()
    })
    .await;
    assert_eq!(fourth.fs().read().inode_count(), 301);
    let chunks = fourth.snapshot_chunks_received();
    assert!(
        chunks >= 5,
        "{chunks} chunks of 4 MiB for a snapshot of {size} bytes"
    );
    c.shutdown().await;
}

/// An `InstallSnapshot` chunk that does not continue the snapshot being received
/// comes back as openraft's `SnapshotMismatch` (on which its sender starts the
/// snapshot over at offset 0), not as a network error (retried five times at the
/// same offset, then the whole transfer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_chunk_out_of_place_is_answered_as_a_mismatch() {
    use openraft::error::{InstallSnapshotError, RPCError, RaftError};
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::InstallSnapshotRequest;

    let c = Cluster::start(3, 8, |_| {}).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let m = c.nodes[&leader].raft().metrics().borrow().clone();
    let mut factory = drs_meta::net::NetworkFactory::new(
        CLUSTER_ID,
        test_key(),
        Arc::new(AtomicBool::new(false)),
    );
    let node = openraft::BasicNode::new(c.addrs[&follower].to_string());
    let mut client = factory.new_client(follower, &node).await;
    let req = InstallSnapshotRequest {
        vote: m.vote,
        meta: openraft::SnapshotMeta {
            last_log_id: m.last_applied,
            last_membership: m.membership_config.as_ref().clone(),
            snapshot_id: "never-started".into(),
        },
        offset: 4096,
        data: vec![0; 16],
        done: false,
    };
    let r = client
        .install_snapshot(req, RPCOption::new(Duration::from_secs(5)))
        .await;
    match r {
        Err(RPCError::RemoteError(e)) => assert!(
            matches!(
                e.source,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(_))
            ),
            "{e}"
        ),
        other => panic!("expected a snapshot mismatch, got {other:?}"),
    }
    c.shutdown().await;
}
