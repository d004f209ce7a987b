//! The metadata service with real node processes: failure detection, clients routing
//! around a down node, rejoin with a new incarnation, and a Raft leader killed while
//! metadata changes stream in.

use std::time::{Duration, Instant};

use drs_meta::{MetaClient, MetaCommand, MetaResponse, MetaState, NodeState, Role};
use drs_proto::{NodeId, Request};

use crate::common::*;

const DOWN_AFTER_MS: u64 = 1500;

fn setup() -> Setup {
    Setup {
        down_after_ms: DOWN_AFTER_MS,
        meta_replicas: 3,
        ..Setup::default()
    }
}

fn meta(tc: &TestCluster) -> MetaClient {
    drs_meta::MetaClient::for_map(&tc.local.map, &tc.local.key)
        .expect("the cluster has a metadata service")
}

/// Polls the metadata service until `pred` holds; the state that satisfied it.
async fn wait_state(
    meta: &MetaClient,
    what: &str,
    within: Duration,
    pred: impl Fn(&MetaState) -> bool,
) -> MetaState {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < within {
        match meta.read().await {
            Ok(s) if pred(&s) => return s,
            Ok(s) => last = Some(format!("epoch {} nodes {:?}", s.epoch, s.nodes)),
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {within:?}; last seen: {last:?}");
}

/// The failure detector's promise: a silent node is marked down within its timeout,
/// give or take the detector's tick, a Raft commit and this test's 100 ms polling
/// (2.5 s of slack on a busy machine).
fn assert_detected_in_time(detected: Duration) {
    let bound = Duration::from_millis(DOWN_AFTER_MS + 2500);
    assert!(
        detected <= bound,
        "marked down {detected:?} after it fell silent; the timeout is {DOWN_AFTER_MS} ms"
    );
}

/// SIGKILLs `node` and waits until the metadata service marks it down, within the
/// failure detector's promise ([`assert_detected_in_time`]).
async fn kill_until_down(tc: &TestCluster, meta: &MetaClient, node: NodeId) {
    tc.kill(node);
    let killed_at = Instant::now();
    wait_state(
        meta,
        "killed node marked down",
        Duration::from_secs(20),
        |s| state_of(s, node).0 == NodeState::Down,
    )
    .await;
    assert_detected_in_time(killed_at.elapsed());
}

/// Waits (up to 10 s) until the test's client's map gives `node` `state`.
async fn client_learns(tc: &TestCluster, node: NodeId, state: drs_proto::MemberState) {
    let until = Instant::now() + Duration::from_secs(10);
    while tc.client.map().node_state(node) != state {
        assert!(
            Instant::now() < until,
            "client never learned node {node} is {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of(s: &MetaState, id: NodeId) -> (NodeState, u64) {
    let r = s.nodes.get(&id).expect("node in the map");
    (r.state, r.incarnation)
}

/// A hung node (SIGSTOP) is marked down within the timeout; from then on clients do
/// not call it at all (reads and writes go around it at once); when it resumes it
/// learns it was declared down, re-verifies, registers again with a new incarnation
/// and comes back up, and the data verifies with scrub clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_node_is_marked_down_and_routed_around() {
    let tc = TestCluster::with("member-hung", setup()).await;
    let meta = meta(&tc);
    let victim: NodeId = 4;
    let before = wait_state(&meta, "every node up", Duration::from_secs(30), |s| {
        s.nodes.values().all(|r| r.state == NodeState::Up)
    })
    .await;
    let (_, inc_before) = state_of(&before, victim);
    let mut blocks = random_blocks(1, tc.client.blocks());
    write_all(&tc.client, &blocks).await;

    tc.stop(victim).await;
    let stopped_at = Instant::now();
    let down = wait_state(
        &meta,
        "hung node marked down",
        Duration::from_secs(20),
        |s| state_of(s, victim).0 == NodeState::Down,
    )
    .await;
    let detected = stopped_at.elapsed();
    assert!(down.epoch > before.epoch, "marking down raises the epoch");
    eprintln!("node {victim} marked down {detected:?} after SIGSTOP (timeout {DOWN_AFTER_MS} ms)");
    assert_detected_in_time(detected);

    // The client learns the new map (watch) and stops calling the node.
    client_learns(&tc, victim, drs_proto::MemberState::Down).await;
    match tc
        .client
        .call(victim, &Request::Ping, Default::default())
        .await
    {
        Err(e) => assert!(
            e.to_string().contains("down in the cluster map"),
            "expected a refusal without a call, got {e}"
        ),
        Ok(r) => panic!("a stopped node answered: {r:?}"),
    }
    // Writes and reads go on around it.
    let degraded_before = degraded_reads(&tc.client);
    for lba in (0..tc.client.blocks()).step_by(3) {
        blocks[lba as usize] = bytes(1000 + lba, BS);
        tc.client
            .write(lba, 0, &blocks[lba as usize])
            .await
            .unwrap_or_else(|e| panic!("write {lba} with node {victim} down: {e}"));
    }
    verify(&tc.client, &blocks, "with a node down in the map").await;
    assert!(
        degraded_reads(&tc.client) > degraded_before,
        "reads of the down node's blocks were reconstructed"
    );

    // Resume: declared down, it registers again and rejoins.
    tc.local.cont(victim).expect("SIGCONT");
    let back = wait_state(&meta, "node back up", Duration::from_secs(60), |s| {
        let (st, inc) = state_of(s, victim);
        st == NodeState::Up && inc > inc_before
    })
    .await;
    assert!(back.epoch > down.epoch);
    tc.wait_all_up().await;
    verify(&tc.client, &blocks, "after the node rejoined").await;
    assert_scrub_clean(&tc.client, "after the node rejoined").await;
}

/// SIGKILL a node: marked down; writes go on; restarted, it registers with a new
/// incarnation as recovering, catches up on what it missed, and only then is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_recovers_before_it_is_up() {
    // A settle of 1.5 s keeps the node recovering long enough for the polls below
    // to see it so.
    let tc = TestCluster::with(
        "member-restart",
        Setup {
            settle_ms: 1500,
            ..setup()
        },
    )
    .await;
    let meta = meta(&tc);
    let victim: NodeId = 1;
    let mut blocks = random_blocks(2, tc.client.blocks());
    write_all(&tc.client, &blocks).await;
    let inc_before = state_of(&meta.read().await.expect("read"), victim).1;

    kill_until_down(&tc, &meta, victim).await;
    // Clients learn it and read around the node without calling it.
    client_learns(&tc, victim, drs_proto::MemberState::Down).await;
    let degraded_before = degraded_reads(&tc.client);
    verify(&tc.client, &blocks, "with the node down in the map").await;
    assert!(
        degraded_reads(&tc.client) > degraded_before,
        "reads of the dead node's blocks were reconstructed"
    );
    for lba in (1..tc.client.blocks()).step_by(2) {
        blocks[lba as usize] = bytes(2000 + lba, BS);
        tc.client
            .write(lba, 0, &blocks[lba as usize])
            .await
            .unwrap_or_else(|e| panic!("write {lba} with node {victim} dead: {e}"));
    }

    tc.restart(victim);
    // Its new incarnation shows first as recovering, then up.
    let rejoined = wait_state(
        &meta,
        "restarted node registered",
        Duration::from_secs(30),
        |s| state_of(s, victim).1 > inc_before,
    )
    .await;
    assert_eq!(
        state_of(&rejoined, victim).0,
        NodeState::Recovering,
        "a restarted node is recovering before it is up"
    );
    let back = wait_state(&meta, "restarted node up", Duration::from_secs(60), |s| {
        let (st, inc) = state_of(s, victim);
        st == NodeState::Up && inc > inc_before
    })
    .await;
    eprintln!("node {victim} up again at epoch {}", back.epoch);
    // Up means every block verified: the node now serves its blocks directly.
    let info = tc.info(victim).await;
    assert_eq!(info.state, drs_proto::NodeState::Up, "{info:?}");
    verify(&tc.client, &blocks, "after the restart").await;
    assert_scrub_clean(&tc.client, "after the restart").await;
}

/// A restarted node whose registration is slow (the metadata service has no quorum
/// when it starts) compares its blocks only once it is registered and the other
/// members know it: clients keep writing around it until then (their map still says
/// it is down), and a node that had compared before would be marked up with stale
/// blocks the moment its registration lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_registered_late_is_up_only_after_catching_up() {
    use nix::sys::signal::Signal;
    let tc = TestCluster::with(
        "member-late-register",
        Setup {
            fault_signals: true,
            ..setup()
        },
    )
    .await;
    let meta = meta(&tc);
    let replicas = tc.local.map.meta.clone();
    let hosts: Vec<NodeId> = replicas.iter().filter_map(|r| r.host).collect();
    let victim = tc
        .ids()
        .into_iter()
        .find(|id| !hosts.contains(id))
        .expect("a node hosting no replica");
    wait_state(&meta, "every node up", Duration::from_secs(30), |s| {
        s.nodes.values().all(|r| r.state == NodeState::Up)
    })
    .await;
    let mut blocks = random_blocks(3, tc.client.blocks());
    write_all(&tc.client, &blocks).await;
    let inc_before = state_of(&meta.read().await.expect("read"), victim).1;

    kill_until_down(&tc, &meta, victim).await;
    client_learns(&tc, victim, drs_proto::MemberState::Down).await;
    // Two of the three replicas cut off: nothing commits, so the restarted node
    // cannot register, and every map still says it is down.
    for host in &hosts[..2] {
        tc.local.signal(*host, Signal::SIGUSR1).expect("cut off");
    }
    tc.restart(victim);
    // Long enough for the node to settle and compare every block, had it not waited.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for lba in 0..tc.client.blocks() {
        blocks[lba as usize] = bytes(3000 + lba, BS);
        tc.client
            .write(lba, 0, &blocks[lba as usize])
            .await
            .unwrap_or_else(|e| panic!("write {lba} around the unregistered node: {e}"));
    }
    for host in &hosts[..2] {
        tc.local.signal(*host, Signal::SIGUSR2).expect("heal");
    }
    wait_state(&meta, "restarted node up", Duration::from_secs(60), |s| {
        let (st, inc) = state_of(s, victim);
        st == NodeState::Up && inc > inc_before
    })
    .await;
    // Up: the node serves its blocks itself, and they are the ones written around it.
    client_learns(&tc, victim, drs_proto::MemberState::Up).await;
    let direct_before = tc.info(victim).await.stats.reads;
    verify(&tc.client, &blocks, "after the late registration").await;
    assert!(
        tc.info(victim).await.stats.reads > direct_before,
        "the node served reads of its blocks"
    );
    assert_scrub_clean(&tc.client, "after the late registration").await;
}

/// SIGKILL the node hosting the Raft leader while metadata changes stream in: a new
/// leader takes over within seconds, every acknowledged change is in the final state,
/// and the killed node is marked down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_metadata_leader_loses_no_acknowledged_change() {
    let tc = TestCluster::with("member-leader", setup()).await;
    let meta = meta(&tc);
    wait_state(&meta, "bootstrapped", Duration::from_secs(30), |s| {
        !s.nodes.is_empty()
    })
    .await;
    let leader_host = async {
        for r in &tc.local.map.meta {
            if let Ok(st) = meta.status_of(r.addr).await {
                if st.role == Role::Leader {
                    return r.host.expect("local replicas have hosts");
                }
            }
        }
        panic!("no leader");
    }
    .await;

    // A stream of changes: nodes added (ids 100..), each acknowledged or not.
    let streamer = {
        let meta = meta.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..60u32 {
                let addr = format!("127.0.0.2:{}", 20000 + i).parse().expect("addr");
                match meta
                    .propose(MetaCommand::AddNode {
                        node: 100 + i,
                        addr,
                    })
                    .await
                {
                    Ok(MetaResponse::Applied { .. }) => acked.push(100 + i),
                    Ok(other) => panic!("add node {}: {other:?}", 100 + i),
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (acked, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let killed_at = Instant::now();
    tc.kill(leader_host);

    // A new leader, elsewhere.
    let start = Instant::now();
    let new_leader = loop {
        let mut found = None;
        for r in tc
            .local
            .map
            .meta
            .iter()
            .filter(|r| r.host != Some(leader_host))
        {
            if let Ok(st) = meta.status_of(r.addr).await {
                if st.role == Role::Leader {
                    found = Some(r.id);
                }
            }
        }
        if let Some(id) = found {
            break id;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elected = killed_at.elapsed();
    eprintln!("new leader {new_leader} {elected:?} after the kill");
    assert!(
        elected <= Duration::from_secs(5),
        "a new leader {elected:?} after the kill: not within a few seconds"
    );

    let (acked, failed) = streamer.await.expect("streamer");
    let end = meta.read().await.expect("read after the kill");
    for id in &acked {
        assert!(end.nodes.contains_key(id), "acknowledged AddNode {id} lost");
    }
    assert!(
        acked.len() > 10,
        "too few changes acknowledged: {acked:?}, {failed} failed"
    );
    eprintln!(
        "{} changes acknowledged, {failed} failed during the leader change",
        acked.len()
    );
    wait_state(
        &meta,
        "leader host marked down",
        Duration::from_secs(20),
        |s| state_of(s, leader_host).0 == NodeState::Down,
    )
    .await;
}

/// Replace a dead node with a new, empty one while a writer keeps writing: the new
/// node rebuilds every block from the stripes and is marked up; then, with m other
/// nodes SIGKILLed, every block (old and newly written) verifies, so the rebuilt
/// blocks are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_node_rebuilds_everything_under_load() {
    let mut tc = TestCluster::with("member-replace", setup()).await;
    let meta = meta(&tc);
    let victim: NodeId = 5;
    let mut blocks = random_blocks(3, tc.client.blocks());
    write_all(&tc.client, &blocks).await;
    tc.kill(victim);

    // Foreground writes and reads (each checked) from before the replacement until
    // the new node is up.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let replaced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer =
        {
            let client = tc.new_client(client_config());
            let mut model = blocks.clone();
            let (stop, replaced) = (stop.clone(), replaced.clone());
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::Acquire;
                let n = client.blocks();
                // Rounds of one write and one checked read after the replacement began.
                let (mut during, mut i) = (0u64, 0u64);
                while !stop.load(Acquire) {
                    let lba = (i * 7) % n;
                    let data = bytes(5000 + i, BS);
                    client.write(lba, 0, &data).await.unwrap_or_else(|e| {
                        panic!("foreground write {lba} during the rebuild: {e}")
                    });
                    model[lba as usize] = data;
                    let other = (i * 13 + 1) % n;
                    let got = client.read_block(other).await.unwrap_or_else(|e| {
                        panic!("foreground read {other} during the rebuild: {e}")
                    });
                    assert!(
                        got[..] == model[other as usize][..],
                        "foreground read {other} during the rebuild: wrong bytes"
                    );
                    if replaced.load(Acquire) {
                        during += 1;
                    }
                    i += 1;
                }
                (model, during)
            })
        };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = tc.local.replace(victim, None).await.expect("replace");
    replaced.store(true, std::sync::atomic::Ordering::Release);
    let up = wait_state(&meta, "replaced node up", Duration::from_secs(90), |s| {
        s.nodes
            .get(&victim)
            .is_some_and(|r| r.state == NodeState::Up && r.addr == addr)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    eprintln!(
        "replacement of node {victim} at {addr} up at epoch {}",
        up.epoch
    );
    let (model, rounds) = writer.await.expect("writer");
    blocks = model;
    eprintln!("{rounds} writes and as many checked reads while the node rebuilt");
    assert!(
        rounds > 0,
        "foreground traffic was served during the rebuild"
    );
    assert_scrub_clean(&tc.client, "after the replacement").await;
    assert!(
        tc.local
            .dir
            .join(format!("node-{victim}"))
            .join("data.replaced-1")
            .exists(),
        "the old data was moved aside"
    );
    // The replacement's own blocks must be right: kill m = 2 others, then read all.
    for other in [0, 1] {
        tc.kill(other);
    }
    verify(&tc.client, &blocks, "replaced node, m others dead").await;
}

/// Cut the Raft leader and one more metadata replica (a minority of 2 of 5) off from
/// the other replicas (`--fault-signals`: the replicas drop each other's Raft traffic
/// both ways, as in a network partition): the majority elects a leader and commits;
/// the minority commits nothing (a change proposed to the old leader is never
/// applied anywhere) and falls behind; the data path carries on; once healed, the
/// minority catches up with the majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_minority_of_replicas_commits_nothing_and_catches_up() {
    use nix::sys::signal::Signal;
    let tc = TestCluster::with(
        "member-partition",
        Setup {
            meta_replicas: 5,
            fault_signals: true,
            ..setup()
        },
    )
    .await;
    let meta = meta(&tc);
    let replicas = tc.local.map.meta.clone();
    assert_eq!(replicas.len(), 5, "five metadata replicas");
    let status = |addr| {
        let meta = meta.clone();
        async move { meta.status_of(addr).await }
    };
    let old = {
        let start = Instant::now();
        loop {
            let mut found = None;
            for r in &replicas {
                if let Ok(st) = status(r.addr).await {
                    if st.role == Role::Leader {
                        found = Some((r.clone(), st.term));
                    }
                }
            }
            if let Some(f) = found {
                break f;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (old_leader, old_term) = old;
    let other = replicas
        .iter()
        .find(|r| r.id != old_leader.id)
        .expect("a second replica")
        .clone();
    let minority = [old_leader.clone(), other.clone()];
    let majority: Vec<_> = replicas
        .iter()
        .filter(|r| !minority.iter().any(|m| m.id == r.id))
        .cloned()
        .collect();
    for r in &minority {
        let host = r.host.expect("local replicas have hosts");
        tc.local
            .signal(host, Signal::SIGUSR1)
            .expect("cut the replica off");
    }
    eprintln!(
        "cut off replicas {} (leader, term {old_term}) and {}",
        old_leader.id, other.id
    );

    // The majority elects a leader of a later term.
    let start = Instant::now();
    loop {
        let mut led = false;
        for r in &majority {
            if let Ok(st) = status(r.addr).await {
                led |= st.role == Role::Leader && st.term > old_term;
            }
        }
        if led {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the majority elected no leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("majority leader after {:?}", start.elapsed());

    // The minority cannot commit: a change proposed to the old leader fails.
    let cut = keyed_client(&tc, vec![old_leader.addr]).with_deadline(Duration::from_secs(4));
    let lost_id: NodeId = 300;
    let r = cut
        .propose(MetaCommand::AddNode {
            node: lost_id,
            addr: "127.0.0.2:30000".parse().expect("addr"),
        })
        .await;
    assert!(
        !matches!(r, Ok(MetaResponse::Applied { .. })),
        "a cut-off minority committed a change: {r:?}"
    );
    // Refused for lack of a quorum, not at the door.
    assert!(
        !matches!(r, Err(drs_meta::MetaError::Auth { .. })),
        "the cut-off leader refused the client's key: {r:?}"
    );

    // The majority commits.
    let majority_client = keyed_client(&tc, majority.iter().map(|r| r.addr).collect());
    for i in 0..5u32 {
        let node = 200 + i;
        let addr = format!("127.0.0.2:{}", 21000 + i).parse().expect("addr");
        let start = Instant::now();
        loop {
            match majority_client
                .propose(MetaCommand::AddNode { node, addr })
                .await
            {
                Ok(MetaResponse::Applied { .. }) => break,
                other => {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "the majority did not commit AddNode {node}: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    let ahead = majority_client.read().await.expect("read at the majority");
    // Every storage node kept heartbeating the leader that counts (a deposed leader
    // cut off from the quorum refuses heartbeats), so none was marked down.
    for id in tc.ids() {
        assert_eq!(
            state_of(&ahead, id).0,
            NodeState::Up,
            "node {id} marked down during the partition: {:?}",
            ahead.nodes.get(&id)
        );
    }
    for r in &minority {
        let st = status(r.addr)
            .await
            .expect("a cut-off replica still answers");
        assert!(
            st.epoch < ahead.epoch,
            "replica {} applied epoch {} while cut off (majority at {})",
            r.id,
            st.epoch,
            ahead.epoch
        );
    }

    // The data path does not need the metadata service to write and read.
    let data = bytes(4242, BS);
    tc.client
        .write(7, 0, &data)
        .await
        .expect("write during the partition");
    assert_eq!(
        tc.client.read_block(7).await.expect("read back"),
        data,
        "read during the partition"
    );

    // Healed: the minority catches up, and the change proposed to it never applies.
    for r in &minority {
        let host = r.host.expect("local replicas have hosts");
        tc.local.signal(host, Signal::SIGUSR2).expect("heal");
    }
    let start = Instant::now();
    for r in &minority {
        loop {
            match status(r.addr).await {
                Ok(st) if st.epoch >= ahead.epoch && st.term > old_term => break,
                other => {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "replica {} did not catch up: {other:?} (majority at epoch {})",
                        r.id,
                        ahead.epoch
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    eprintln!("minority caught up {:?} after the heal", start.elapsed());
    let end = meta.read().await.expect("read after the heal");
    for i in 0..5u32 {
        assert!(
            end.nodes.contains_key(&(200 + i)),
            "AddNode {} lost",
            200 + i
        );
    }
    assert!(
        !end.nodes.contains_key(&lost_id),
        "a change proposed to the cut-off minority was applied"
    );
}

/// `Client::reconstruct`, which a rebuilding node uses: every block of a stripe, data
/// or parity, decoded from the other members without asking its own node, equals what
/// was written (data) and the parity of what was written (parity), also with the
/// block's own node and one more SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_block_decodes_from_the_rest_of_its_stripe() {
    let tc = TestCluster::start("reconstruct").await;
    let blocks = random_blocks(11, tc.client.blocks());
    write_all(&tc.client, &blocks).await;
    let geo = tc.client.geometry().clone();
    let vol = tc.client.volume().clone();
    let codec = drs_codec::Codec::new(
        drs_codec::Coefficients::from_rows(geo.k, geo.m, vol.coefficients.clone())
            .expect("coefficients"),
    );
    let expected = |stripe: u64| -> Vec<Vec<u8>> {
        let data: Vec<&[u8]> = (0..geo.k)
            .map(|i| &blocks[(stripe * geo.k as u64 + i as u64) as usize][..])
            .collect();
        let mut parity = vec![vec![0u8; BS]; geo.m];
        let mut refs: Vec<&mut [u8]> = parity.iter_mut().map(|p| &mut p[..]).collect();
        codec.encode(&data, &mut refs).expect("encode");
        data.iter().map(|d| d.to_vec()).chain(parity).collect()
    };
    let check = |stripe: u64, position: usize, got: &[u8], what: &str| {
        assert!(
            got == &expected(stripe)[position][..],
            "{what}: block {position} of stripe {stripe} decoded wrong"
        );
    };
    for stripe in 0..geo.stripes() {
        for position in 0..geo.width() {
            let (_, got) = tc
                .client
                .reconstruct(stripe, position)
                .await
                .unwrap_or_else(|e| panic!("reconstruct {position} of {stripe}: {e}"));
            check(stripe, position, &got, "all up");
        }
    }
    // Node 0 and node 1 dead: blocks they hold decode from the rest.
    tc.kill(0);
    tc.kill(1);
    for stripe in 0..geo.stripes() {
        for position in 0..geo.width() {
            if geo.member(stripe, position) != 0 {
                continue;
            }
            let (_, got) = tc
                .client
                .reconstruct(stripe, position)
                .await
                .unwrap_or_else(|e| panic!("reconstruct {position} of {stripe}: {e}"));
            check(stripe, position, &got, "nodes 0 and 1 dead");
        }
    }
    assert!(
        tc.client.reconstruct(geo.stripes(), 0).await.is_err(),
        "a stripe past the end is refused"
    );
}

/// A metadata client of `replicas` proving the cluster's key.
fn keyed_client(tc: &TestCluster, replicas: Vec<std::net::SocketAddr>) -> MetaClient {
    MetaClient::with_config(
        replicas,
        tc.local.map.cluster_id,
        drs_meta::ClientConfig {
            key: tc.local.key.clone(),
            ..drs_meta::ClientConfig::default()
        },
    )
}
