//! Nodes that die (SIGKILL) or hang (SIGSTOP): reads degrade and stay correct, writes
//! and reads that cannot succeed fail clearly, and nodes catch up when they return.

use std::time::{Duration, Instant};

use drs_client::{ClientConfig, ClientError};
use drs_proto::{NodeId, NodeState};
use futures::stream::{self, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

/// Goal: any m = 2 nodes may be lost at once without losing or corrupting a byte,
/// and nodes that come back catch up.
///
/// Method: write random data over every block; then for each of the 15 pairs of the
/// 6 nodes: SIGKILL both, read every block back and compare byte for byte, overwrite
/// a few blocks while the pair is down (so the pair must rebuild them), restart both
/// and wait until they report up. Later pairs decode from blocks earlier pairs
/// rebuilt. At the end every block is verified with all nodes up, a scrub finds
/// nothing to repair (every restarted node rebuilt what it missed before reporting
/// up, so there is nothing stale or degraded), and the client's degraded-read counter
/// grew (the degraded path was really exercised).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_of_nodes_can_die() {
    let tc = TestCluster::start("pairs").await;
    let c = &tc.client;
    let mut data = random_blocks(1, c.blocks());
    write_all(c, &data).await;
    verify(c, &data, "after the first write").await;
    let degraded_before = degraded_reads(c);
    let mut rng = StdRng::seed_from_u64(11);
    let ids = tc.ids();
    for (i, &a) in ids.iter().enumerate() {
        for &b in &ids[i + 1..] {
            tc.kill(a);
            tc.kill(b);
            verify(c, &data, &format!("nodes {a} and {b} dead")).await;
            for _ in 0..4 {
                let lba = rng.gen_range(0..c.blocks());
                let new = bytes(rng.gen(), BS);
                tokio::time::timeout(Duration::from_secs(30), c.write(lba, 0, &new))
                    .await
                    .unwrap_or_else(|_| panic!("write to {lba} with {a}, {b} dead hung"))
                    .unwrap_or_else(|e| panic!("write to {lba} with {a}, {b} dead: {e}"));
                data[lba as usize] = new;
            }
            verify(c, &data, &format!("nodes {a} and {b} dead, after writes")).await;
            tc.restart(a);
            tc.restart(b);
            tc.wait_up(&[a, b]).await;
        }
    }
    verify(c, &data, "all nodes back").await;
    verify(
        &tc.new_client(client_config()),
        &data,
        "all nodes back, new client",
    )
    .await;
    assert!(
        degraded_reads(c) > degraded_before,
        "no read took the degraded path"
    );
    assert_scrub_clean(c, "after every pair died and came back").await;
}

/// Goal: with more nodes lost than the code tolerates, operations fail with clear
/// errors in bounded time and never return wrong bytes; everything works again once
/// the nodes return.
///
/// Method: a 7-node cluster (so each stripe of width 6 leaves one node out, and
/// killing 3 nodes leaves some stripes with 3 live members and some with 4); write
/// random data, SIGKILL nodes 0, 1, 2. For every block: if its stripe kept >= k live
/// members, it reads back correctly; if not and its own node is dead, the read fails
/// with `Unavailable` (need = k, have < k) within 15 s; if its own node is alive, the
/// node simply answers, with the right bytes. Writes to a stripe with 3 live members
/// fail with `NotEnoughNodes` (live 3, need 4); writes to a stripe with 4 live succeed.
/// Then restart the three: every block (including the new writes) verifies, writes
/// to previously unavailable stripes work, and a scrub is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dead_nodes_fail_clearly() {
    let tc = TestCluster::with(
        "three-dead",
        Setup {
            nodes: 7,
            ..Setup::default()
        },
    )
    .await;
    let c = &tc.client;
    let geo = c.geometry().clone();
    let mut data = random_blocks(2, c.blocks());
    write_all(c, &data).await;
    let dead: Vec<NodeId> = vec![0, 1, 2];
    for &d in &dead {
        tc.kill(d);
    }
    let lost = |stripe: u64| {
        geo.members(stripe)
            .iter()
            .filter(|n| dead.contains(n))
            .count()
    };
    let stripes = geo.stripes();
    assert!((0..stripes).any(|s| lost(s) == 3) && (0..stripes).any(|s| lost(s) <= 2));

    // Reads of every block, 8 at a time, each bounded.
    let results: Vec<(u64, Duration, Result<bytes::Bytes, ClientError>)> =
        stream::iter(0..c.blocks())
            .map(|lba| async move {
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(15), c.read_block(lba))
                    .await
                    .unwrap_or_else(|_| panic!("read of block {lba} did not end within 15 s"));
                (lba, t.elapsed(), r)
            })
            .buffered(8)
            .collect()
            .await;
    let (mut ok, mut unavailable) = (0, 0);
    for (lba, took, r) in results {
        let (stripe, index) = geo.locate(lba);
        let own_dead = dead.contains(&geo.member(stripe, index));
        match r {
            Ok(b) => {
                assert!(
                    lost(stripe) <= 2 || !own_dead,
                    "block {lba}: stripe {stripe} lost {} members and its own node is dead, \
                     yet the read returned {} bytes",
                    lost(stripe),
                    b.len()
                );
                assert!(b[..] == data[lba as usize][..], "{}", {
                    describe_diff(lba, &b, &data[lba as usize])
                });
                ok += 1;
            }
            Err(ClientError::Unavailable {
                stripe: s,
                have,
                need,
                ..
            }) => {
                assert!(
                    lost(stripe) == 3 && own_dead,
                    "block {lba} (stripe {stripe}, {} lost) unavailable",
                    lost(stripe)
                );
                assert_eq!((s, need), (stripe, 4));
                assert!(have < 4, "have {have}");
                unavailable += 1;
            }
            Err(e) => panic!("block {lba} (stripe {stripe}): unexpected error {e} after {took:?}"),
        }
    }
    assert!(
        ok > 0 && unavailable > 0,
        "ok {ok}, unavailable {unavailable}"
    );

    // Writes.
    let mut wrote_degraded = 0;
    for stripe in 0..stripes {
        let lba = geo.lba(stripe, (stripe % 4) as usize);
        let new = bytes(1000 + stripe, BS);
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(15), c.write(lba, 0, &new))
            .await
            .unwrap_or_else(|_| panic!("write to block {lba} did not end within 15 s"));
        match (lost(stripe), r) {
            (3, Err(ClientError::NotEnoughNodes { live, need, .. })) => {
                assert_eq!((live, need), (3, 4), "stripe {stripe}");
            }
            (3, other) => panic!(
                "write to stripe {stripe} with 3 live members: {other:?} after {:?}",
                t.elapsed()
            ),
            (_, Ok(())) => {
                data[lba as usize] = new;
                wrote_degraded += 1;
            }
            (l, Err(e)) => panic!("write to stripe {stripe} with {l} members lost failed: {e}"),
        }
    }
    assert!(wrote_degraded > 0);
    // What was written with 3 nodes down reads back (degraded where needed).
    for stripe in (0..stripes).filter(|s| lost(*s) <= 2) {
        for i in 0..4 {
            let lba = geo.lba(stripe, i);
            let got = c.read_block(lba).await.unwrap();
            assert!(got[..] == data[lba as usize][..], "block {lba}");
        }
    }

    for &d in &dead {
        tc.restart(d);
    }
    tc.wait_up(&dead).await;
    verify(c, &data, "after the three nodes returned").await;
    for stripe in (0..stripes).filter(|s| lost(*s) == 3).take(5) {
        let lba = geo.lba(stripe, 1);
        let new = bytes(5000 + stripe, BS);
        c.write(lba, 0, &new)
            .await
            .unwrap_or_else(|e| panic!("write to {lba} after the nodes returned: {e}"));
        data[lba as usize] = new;
    }
    verify(c, &data, "after writes with every node back").await;
    assert_scrub_clean(c, "after the three nodes returned").await;
}

/// Goal: `min_write = k + 1` is enforced: a write needs 5 live members of its
/// stripe, reads still need only k.
///
/// Method: a cluster with min_write 5. With one node down, writes (whole blocks and
/// sub-block ranges) succeed. With two nodes down (every stripe of 6 nodes then has 4
/// live members), every write attempted fails with `NotEnoughNodes` (live 4, need 5)
/// and changes nothing, while every block still reads back correctly. After the
/// nodes return: verify everything, writes work again, scrub clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_write_k_plus_one() {
    let tc = TestCluster::with(
        "min-write-5",
        Setup {
            min_write: Some(5),
            ..Setup::default()
        },
    )
    .await;
    let c = &tc.client;
    assert_eq!(c.volume().min_write, 5);
    let mut data = random_blocks(6, c.blocks());
    write_all(c, &data).await;
    let mut rng = StdRng::seed_from_u64(66);

    tc.kill(3);
    for i in 0..24u64 {
        let lba = rng.gen_range(0..c.blocks());
        let off = rng.gen_range(0..BS - 1);
        let len = rng.gen_range(1..=(BS - off).min(700));
        let new = bytes(600 + i, len);
        c.write(lba, off, &new)
            .await
            .unwrap_or_else(|e| panic!("write to {lba} with one node down: {e}"));
        data[lba as usize][off..off + len].copy_from_slice(&new);
    }
    verify(c, &data, "one node down").await;

    tc.kill(0);
    for stripe in 0..c.geometry().stripes() {
        let lba = c.geometry().lba(stripe, (stripe % 4) as usize);
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            c.write(lba, 0, &bytes(9000 + stripe, BS)),
        )
        .await
        .unwrap_or_else(|_| panic!("write to {lba} with two nodes down hung"));
        match r {
            Err(ClientError::NotEnoughNodes { live, need, .. }) => {
                assert_eq!((live, need), (4, 5), "block {lba}")
            }
            other => panic!("write to {lba} with two nodes down and min_write 5: {other:?}"),
        }
    }
    verify(c, &data, "two nodes down, after refused writes").await;

    tc.restart(0);
    tc.restart(3);
    tc.wait_up(&[0, 3]).await;
    verify(c, &data, "after both nodes returned").await;
    let lba = 17;
    let new = bytes(77, BS);
    c.write(lba, 0, &new).await.unwrap();
    data[lba as usize] = new;
    verify(c, &data, "after a write with all nodes up").await;
    assert_scrub_clean(c, "min_write 5").await;
}

/// Goal: a node that hangs (SIGSTOP: its connections stay open, nothing answers)
/// does not hang reads or writes, and catches up after SIGCONT without leaving
/// anything behind (stale blocks, or locks that block other clients).
///
/// Method: write random data; SIGSTOP node 2. Every block whose own node is node 2
/// reads back correctly within 1.5 s (hedged after `hedge_delay`, decoded from the
/// others; the request deadline is 4 s, so a read that waited for the stopped node
/// would fail the bound). Writes in all roles of node 2 (the written block's data
/// node, a parity node, another data node of the stripe) complete within 2 request
/// deadlines + 4 s (at worst the lock request and then the update or unlock sent to
/// node 2 each wait for their deadline). SIGCONT; the node notices it was paused (it reports
/// `Recovering`) and comes back up; every block verifies with the old and a new
/// client; then a *different* client writes every block of the stripes written
/// while node 2 was stopped, with a short lock timeout: a lock node 2 granted after
/// SIGCONT to a request whose client had given up must not block it. Scrub clean.
/// Goal: a node paused (SIGSTOP) for longer than a lease does not fence the live
/// clients whose heartbeats it could not receive meanwhile: a client holding a lock
/// there writes under it once the node is back, and the node fences nobody.
///
/// Method: a client locks block 0 of stripe 2 at every member; the stripe's first
/// parity node is SIGSTOPped for 2.5 leases, then SIGCONTed; after 1.5 s (a fresh
/// heartbeat round), the client commits a delta under its lock: it must succeed, the
/// node's `fenced` count must stay 0, and the block must read back new. Before the
/// node renewed leases on finding itself paused, it fenced the client at once and the
/// commit failed with `Fenced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_fences_no_live_client() {
    let tc = TestCluster::start("paused-node-no-fence").await;
    let c = &tc.client;
    let data = random_blocks(31, c.blocks());
    write_all(c, &data).await;
    let geo = c.geometry().clone();
    let stripe = 2u64;
    let bs = c.block_size();
    let victim = geo.member(stripe, geo.k);
    let locked = c
        .lock_stripe(stripe, &[(0, 0, bs)], rand::random())
        .await
        .unwrap();
    tc.stop(victim).await;
    tokio::time::sleep(c.config().lease * 5 / 2).await;
    tc.local.cont(victim).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let delta = bytes::Bytes::from(vec![0x3cu8; BS]);
    c.commit_stripe(&locked, vec![(0, 0, delta)])
        .await
        .expect("a write under a lock held at a node that was paused");
    let info = tc.info(victim).await;
    assert!(info.stats.pauses >= 1, "the node saw its pause: {info:?}");
    assert_eq!(info.stats.fenced, 0, "the node fenced a live client");
    let lba = geo.lba(stripe, 0);
    let want: Vec<u8> = data[lba as usize].iter().map(|b| b ^ 0x3c).collect();
    let got = read_ok(&tc.new_client(client_config()), lba, "after the commit").await;
    assert!(got[..] == want[..], "{}", describe_diff(lba, &got, &want));
    assert_scrub_clean(c, "after the paused node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_does_not_hang_reads() {
    let cfg = ClientConfig {
        request_timeout: Duration::from_secs(4),
        ..client_config()
    };
    let tc = TestCluster::with(
        "sigstop",
        Setup {
            client: cfg.clone(),
            ..Setup::default()
        },
    )
    .await;
    let c = &tc.client;
    let geo = c.geometry().clone();
    let mut data = random_blocks(7, c.blocks());
    write_all(c, &data).await;
    let stopped: NodeId = 2;
    let pauses_before = tc.info(stopped).await.stats.pauses;
    tc.stop(stopped).await;

    let mut slowest = Duration::ZERO;
    for lba in 0..c.blocks() {
        let (stripe, index) = geo.locate(lba);
        if geo.member(stripe, index) != stopped {
            continue;
        }
        let t = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(10), c.read_block(lba))
            .await
            .unwrap_or_else(|_| panic!("read of {lba} hung with node {stopped} stopped"))
            .unwrap_or_else(|e| panic!("read of {lba} with node {stopped} stopped: {e}"));
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(got[..] == data[lba as usize][..], "block {lba}");
        assert!(
            took < Duration::from_millis(1500),
            "read of block {lba} (own node stopped) took {took:?}"
        );
    }
    eprintln!("sigstop: slowest read with the own node stopped: {slowest:?}");

    // One write per role of the stopped node, in different stripes.
    let bound = cfg.request_timeout * 2 + Duration::from_secs(4);
    let mut touched = Vec::new();
    // (role, is node 2's position in the stripe that role)
    type Role = (&'static str, fn(usize) -> bool);
    let roles: [Role; 3] = [
        ("data node of the block", |p| p == 1),
        ("parity node", |p| p >= 4),
        ("other data node", |p| p < 4 && p != 1),
    ];
    for (role, wanted) in roles {
        let stripe = (0..geo.stripes())
            .find(|s| wanted(geo.position_of(*s, stopped).unwrap()) && !touched.contains(s))
            .unwrap();
        let lba = geo.lba(stripe, 1);
        let new = bytes(700 + stripe, BS);
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), c.write(lba, 0, &new))
            .await
            .unwrap_or_else(|_| panic!("write to {lba} ({role} stopped) hung"))
            .unwrap_or_else(|e| panic!("write to {lba} ({role} stopped): {e}"));
        let took = t.elapsed();
        eprintln!("sigstop: write with the {role} stopped took {took:?}");
        assert!(took < bound, "write ({role} stopped) took {took:?}");
        data[lba as usize] = new;
        touched.push(stripe);
    }
    verify(c, &data, "node stopped, after writes").await;

    tc.local.cont(stopped).unwrap();
    // The node notices it was paused (a sleep of its own ended late) and re-verifies
    // every block before serving it again.
    let until = Instant::now() + Duration::from_secs(10);
    while tc.info(stopped).await.stats.pauses == pauses_before {
        assert!(
            Instant::now() < until,
            "node {stopped} never noticed it was paused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tc.wait_all_up().await;
    verify(c, &data, "after SIGCONT").await;
    let other = tc.new_client(ClientConfig {
        lock_timeout: Duration::from_secs(3),
        ..cfg.clone()
    });
    verify(&other, &data, "after SIGCONT, new client").await;
    // Leave the stuck-update watcher time to act, then check nothing is left locked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut locked = Vec::new();
    for &stripe in &touched {
        for i in 0..4 {
            let lba = geo.lba(stripe, i);
            let new = bytes(800 + lba, BS);
            match other.write(lba, 0, &new).await {
                Ok(()) => data[lba as usize] = new,
                Err(e @ ClientError::Locked { .. }) => locked.push(format!("{lba}: {e}")),
                Err(e) => panic!("write to {lba} after SIGCONT: {e}"),
            }
        }
    }
    let status = c.status().await;
    assert!(
        locked.is_empty(),
        "blocks still locked after SIGCONT (orphan locks at node {stopped}): {}; \
         status locks: {:?}",
        locked.join("; "),
        status.locks
    );
    verify(c, &data, "after writes by another client").await;
    assert_scrub_clean(c, "after SIGSTOP/SIGCONT").await;
}

/// Goal: a read whose own node is alive but slow still returns the block when the
/// rest of the stripe cannot supply k replies (the own node's answer is the only way
/// to get it, and it is coming).
///
/// Method: SIGKILL nodes 0 and 1 (stripe 0 keeps 4 live members); SIGSTOP node 2, the
/// node of block 2 (stripe 0, position 2), for 400 ms (shorter than the node's pause
/// detection), and read block 2 meanwhile with the default 20 ms hedge delay and a 2 s
/// request deadline. The hedged requests to the other members can give only 3
/// replies; node 2 answers as soon as it continues, well within the deadline. The
/// read must return the right bytes (three rounds). The same holds whenever the rest
/// of the stripe has fewer than k live members (e.g. 3 dead nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_waits_for_slow_own_node_in_degraded_stripe() {
    let tc = TestCluster::start("slow-own-node").await;
    let c = &tc.client;
    let data = random_blocks(12, c.blocks());
    write_all(c, &data).await;
    tc.kill(0);
    tc.kill(1);
    verify(c, &data, "nodes 0 and 1 dead").await;
    let geo = c.geometry().clone();
    let lba = geo.lba(0, 2);
    assert_eq!(geo.member(0, 2), 2);
    for round in 0..3 {
        tc.stop(2).await;
        let ((r, took), _) = tokio::join!(
            async {
                let t = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(10), c.read_block(lba)).await;
                (r, t.elapsed())
            },
            async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                tc.local.cont(2).unwrap();
            }
        );
        match r.expect("read hung") {
            Ok(b) => assert!(
                b[..] == data[lba as usize][..],
                "round {round}: wrong bytes"
            ),
            Err(e) => panic!(
                "round {round}: read of block {lba} failed after {took:?} although its own \
                 node was only slow: {e}"
            ),
        }
    }
}

/// Goal: a node concludes it was paused (and re-verifies every block, refusing reads
/// meanwhile) only when it really was paused, not when its own upkeep was slow.
///
/// Method: stuck_ms 3 s. Make nodes learn of a version they never received, the way
/// the protocol does it: lock block 1 of stripe 1, SIGKILL its data node and both
/// parity nodes, send the update (it fails, `NotDurable`; the client queues unlocks
/// carrying the version for the dead nodes), restart the three and wait until up
/// (the queued unlocks reach them; each now sees its block of stripe 1 as behind).
/// Right away SIGSTOP node 1 (data node 0 of stripe 1, not one of the three). When the
/// three rebuild their "stuck" block (stuck_ms after they heard of the version) the
/// scrub of stripe 1 waits for node 1's answer up to the node's peer deadline (3 s).
/// None of the three was paused, so for 9 s each must keep reporting `Up`. Then
/// SIGCONT node 1, wait until everything is up and quiet, verify every block, scrub
/// clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_rebuild_is_not_mistaken_for_a_pause() {
    let tc = TestCluster::with(
        "false-pause",
        Setup {
            stuck_ms: 3000,
            ..Setup::default()
        },
    )
    .await;
    let c = &tc.client;
    let data = random_blocks(13, c.blocks());
    write_all(c, &data).await;
    let geo = c.geometry().clone();
    let (stripe, index) = (1u64, 1usize);
    let stopped: NodeId = geo.member(stripe, 0);
    assert_eq!(stopped, 1);
    let locked = c
        .lock_stripe(stripe, &[(index as u8, 0, c.block_size())], rand::random())
        .await
        .unwrap();
    let victims: Vec<NodeId> = [index, 4, 5]
        .iter()
        .map(|&p| geo.member(stripe, p))
        .collect();
    for &v in &victims {
        tc.kill(v);
    }
    let delta = bytes::Bytes::from(vec![0x5au8; 64]);
    match c.commit_stripe(&locked, vec![(index, 0, delta)]).await {
        Err(ClientError::NotDurable { .. }) => {}
        other => panic!("commit with the data and parity nodes dead: {other:?}"),
    }
    for &v in &victims {
        tc.restart(v);
    }
    tc.wait_up(&victims).await;
    let left = c.settle_unlocks(Duration::from_secs(10)).await;
    assert_eq!(left, 0, "queued unlocks never delivered");
    tc.stop(stopped).await;
    let until = Instant::now() + Duration::from_secs(9);
    let mut states: Vec<(NodeId, NodeState)> = Vec::new();
    while Instant::now() < until {
        for &v in &victims {
            let info = tc.info(v).await;
            if info.state != NodeState::Up && !states.iter().any(|(n, _)| *n == v) {
                states.push((v, info.state));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tc.local.cont(stopped).unwrap();
    tc.wait_all_up().await;
    wait_quiet(&tc, std::slice::from_ref(c)).await;
    verify(c, &data, "after SIGCONT").await;
    assert_scrub_clean(c, "after SIGCONT").await;
    assert!(
        states.is_empty(),
        "nodes that were never paused left the Up state while node {stopped} was stopped: \
         {states:?}"
    );
}
