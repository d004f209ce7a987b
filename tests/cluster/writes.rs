//! Concurrent writes, writes across a node's death, and the write-back cache.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drs_client::{Client, ClientConfig, ClientError, WriteBackCache};
use drs_proto::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

/// Goal: block locks serialize writers: two clients writing the same block at once
/// leave exactly one of their writes (never a mix of both, never a stripe whose
/// parity disagrees), and two clients writing different blocks of one stripe at
/// once both land.
///
/// Method: two `Client`s (separate connections and client ids), each write on its
/// own task. 30 rounds: both write a different full-block pattern to the same random
/// block; both must succeed (lock retries within `lock_timeout`); the block then reads
/// back, from both clients, as exactly one of the two patterns. Then 30 rounds where
/// they write overlapping byte ranges of different blocks of one stripe: both writes
/// are there afterwards, the stripe's other blocks are unchanged. After each phase
/// every block verifies and a scrub finds nothing to repair (parity matches data
/// everywhere); finally a node is killed and every block verifies again, so blocks
/// whose node it was are decoded from parity written by the concurrent writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_same_block() {
    let tc = TestCluster::start("concurrent").await;
    let c1 = tc.new_client(client_config());
    let c2 = tc.new_client(client_config());
    let mut data = random_blocks(3, tc.client.blocks());
    write_all(&tc.client, &data).await;
    let mut rng = StdRng::seed_from_u64(33);
    let mut winners = [0u32; 2];
    for round in 0..30u64 {
        let lba = rng.gen_range(0..tc.client.blocks());
        let a = bytes(10_000 + round * 2, BS);
        let b = bytes(10_001 + round * 2, BS);
        let (w1, w2) = (c1.clone(), c2.clone());
        let (a2, b2) = (a.clone(), b.clone());
        let t1 = tokio::spawn(async move { w1.write(lba, 0, &a2).await });
        let t2 = tokio::spawn(async move { w2.write(lba, 0, &b2).await });
        let (r1, r2) = tokio::time::timeout(Duration::from_secs(30), async {
            (t1.await.unwrap(), t2.await.unwrap())
        })
        .await
        .expect("concurrent writes hung");
        r1.unwrap_or_else(|e| panic!("round {round}: writer 1: {e}"));
        r2.unwrap_or_else(|e| panic!("round {round}: writer 2: {e}"));
        let g1 = c1.read_block(lba).await.unwrap();
        let g2 = c2.read_block(lba).await.unwrap();
        assert!(
            g1 == g2,
            "round {round}: the two clients read different bytes"
        );
        if g1[..] == a[..] {
            winners[0] += 1;
            data[lba as usize] = a;
        } else if g1[..] == b[..] {
            winners[1] += 1;
            data[lba as usize] = b;
        } else {
            panic!(
                "round {round}: block {lba} is neither write: vs first {}, vs second {}",
                describe_diff(lba, &g1, &a),
                describe_diff(lba, &g1, &b)
            );
        }
    }
    let retries = c1.stats().lock_retries.load(Ordering::Relaxed)
        + c2.stats().lock_retries.load(Ordering::Relaxed);
    eprintln!("same block: last writer wins counts {winners:?}, lock retries {retries}");
    verify(&tc.client, &data, "after same-block rounds").await;
    assert_scrub_clean(&tc.client, "after same-block rounds").await;

    for round in 0..30u64 {
        let stripe = rng.gen_range(0..tc.client.geometry().stripes());
        let i = rng.gen_range(0..4usize);
        let j = (i + rng.gen_range(1..4usize)) % 4;
        let geo = tc.client.geometry();
        let (la, lb) = (geo.lba(stripe, i), geo.lba(stripe, j));
        // Sub-block ranges, so parity nodes apply deltas of two blocks to one range.
        let off = rng.gen_range(0..BS / 2);
        let a = bytes(20_000 + round * 2, BS / 2);
        let b = bytes(20_001 + round * 2, BS / 2);
        let (w1, w2) = (c1.clone(), c2.clone());
        let (a2, b2) = (a.clone(), b.clone());
        let t1 = tokio::spawn(async move { w1.write(la, off, &a2).await });
        let t2 = tokio::spawn(async move { w2.write(lb, off, &b2).await });
        let (r1, r2) = tokio::time::timeout(Duration::from_secs(30), async {
            (t1.await.unwrap(), t2.await.unwrap())
        })
        .await
        .expect("concurrent writes hung");
        r1.unwrap_or_else(|e| panic!("round {round}: writer 1 ({la}): {e}"));
        r2.unwrap_or_else(|e| panic!("round {round}: writer 2 ({lb}): {e}"));
        data[la as usize][off..off + a.len()].copy_from_slice(&a);
        data[lb as usize][off..off + b.len()].copy_from_slice(&b);
        for idx in 0..4 {
            let lba = geo.lba(stripe, idx);
            let got = c1.read_block(lba).await.unwrap();
            assert!(
                got[..] == data[lba as usize][..],
                "round {round}: {}",
                describe_diff(lba, &got, &data[lba as usize])
            );
        }
    }
    verify(&tc.client, &data, "after same-stripe rounds").await;
    assert_scrub_clean(&tc.client, "after concurrent writers").await;
    // Decoded reads (parity from the concurrent writers) agree with the direct ones.
    let victim: NodeId = 4;
    tc.kill(victim);
    verify(&tc.client, &data, "node 4 dead, after concurrent writers").await;
}

/// What a block may hold: every content consistent with the acknowledged writes and
/// with either outcome of the failed ones.
struct BlockModel {
    candidates: Vec<Vec<u8>>,
}

impl BlockModel {
    fn acked(&mut self, off: usize, data: &[u8]) {
        for c in &mut self.candidates {
            c[off..off + data.len()].copy_from_slice(data);
        }
        self.dedup();
    }

    fn unknown(&mut self, off: usize, data: &[u8]) {
        let mut more = self.candidates.clone();
        for c in &mut more {
            c[off..off + data.len()].copy_from_slice(data);
        }
        self.candidates.extend(more);
        self.dedup();
        assert!(
            self.candidates.len() <= 1024,
            "too many failed writes to one block to track"
        );
    }

    fn dedup(&mut self) {
        let set: BTreeSet<Vec<u8>> = self.candidates.drain(..).collect();
        self.candidates = set.into_iter().collect();
    }
}

/// The possible contents of every block.
struct Model {
    blocks: Vec<Mutex<BlockModel>>,
}

impl Model {
    fn new(initial: Vec<Vec<u8>>) -> Arc<Model> {
        Arc::new(Model {
            blocks: initial
                .into_iter()
                .map(|b| {
                    Mutex::new(BlockModel {
                        candidates: vec![b],
                    })
                })
                .collect(),
        })
    }

    /// Reads every block and checks it is one of its candidates; that content is
    /// then the only candidate. Returns the contents.
    async fn check(&self, client: &Client, what: &str) -> Vec<Vec<u8>> {
        let n = self.blocks.len() as u64;
        let got = tokio::time::timeout(Duration::from_secs(60), client.read_blocks(0, n))
            .await
            .unwrap_or_else(|_| panic!("{what}: read back hung"));
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                let detail = match &e {
                    ClientError::Unavailable { stripe, .. } => {
                        describe_stripe(client, *stripe).await
                    }
                    _ => String::new(),
                };
                panic!("{what}: read back failed: {e}\n{detail}");
            }
        };
        let mut bad = Vec::new();
        for (lba, g) in got.iter().enumerate() {
            let mut m = self.blocks[lba].lock().unwrap();
            if m.candidates.iter().any(|c| c[..] == g[..]) {
                m.candidates = vec![g.to_vec()];
            } else {
                bad.push(format!(
                    "{} ({} candidates)",
                    describe_diff(lba as u64, g, &m.candidates[0]),
                    m.candidates.len()
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "{what}: {} blocks match no acknowledged state: {}",
            bad.len(),
            bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
        );
        got.iter().map(|b| b.to_vec()).collect()
    }
}

/// Writer tasks writing random byte ranges of random blocks until stopped; task t of
/// n owns the blocks lba % n == t (so each block's writes are ordered, and blocks of
/// one stripe are written concurrently by different tasks).
struct WriteStream {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WriteStream {
    fn start(clients: &[Client], model: &Arc<Model>, writers: u64, seed: u64) -> WriteStream {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let blocks = model.blocks.len() as u64;
        let tasks = (0..writers)
            .map(|t| {
                let client = clients[t as usize % clients.len()].clone();
                let (stop, acked, errors, model) =
                    (stop.clone(), acked.clone(), errors.clone(), model.clone());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed * 1000 + t);
                    let mut failing = 0;
                    // Many failures in a row: the cluster is gone (the test failed).
                    while !stop.load(Ordering::Relaxed) && failing < 100 {
                        let lba = rng.gen_range(0..blocks / writers) * writers + t;
                        let off = rng.gen_range(0..BS);
                        let len = rng.gen_range(1..=(BS - off).min(1500));
                        let new = bytes(rng.gen(), len);
                        let r = tokio::time::timeout(
                            Duration::from_secs(60),
                            client.write(lba, off, &new),
                        )
                        .await
                        .unwrap_or_else(|_| panic!("write to {lba} hung"));
                        let mut m = model.blocks[lba as usize].lock().unwrap();
                        match r {
                            Ok(()) => {
                                m.acked(off, &new);
                                acked.fetch_add(1, Ordering::Relaxed);
                                failing = 0;
                            }
                            Err(e) => {
                                failing += 1;
                                m.unknown(off, &new);
                                errors.lock().unwrap().push(format!("{lba}: {e}"));
                            }
                        }
                    }
                })
            })
            .collect();
        WriteStream {
            stop,
            acked,
            errors,
            tasks,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops the writers and waits for them; returns (acknowledged, failed writes).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.acked.load(Ordering::Relaxed), errors)
    }
}

/// Goal: a node killed in the middle of a stream of writes loses nothing that was
/// acknowledged, and comes back with every block it missed rebuilt.
///
/// Method: 4 writer tasks over 2 clients; each task owns the blocks lba % 4 == t
/// (so per-block order is its own, and blocks of one stripe are written concurrently
/// by different tasks) and writes random byte ranges of random blocks with
/// `Client::write`, recording each block's possible contents: an acknowledged write
/// sets the range in every candidate, a failed one (unknown outcome) doubles the
/// candidates (old or new). After ~1 s a node is SIGKILLed mid-stream; writers go on
/// for ~1.5 s with it dead, then stop; the node is restarted (writers are quiet, so a
/// short settle is safe) and waited up. Every block must equal one of its
/// candidates (then that content is the truth), reads agree from a new client, a
/// scrub is clean. Repeated for nodes 1, 3 and 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_during_update_stream() {
    let tc = TestCluster::start("kill-mid-stream").await;
    let initial = random_blocks(4, tc.client.blocks());
    write_all(&tc.client, &initial).await;
    let model = Model::new(initial);
    let clients = [
        tc.new_client(client_config()),
        tc.new_client(client_config()),
    ];
    for victim in [1 as NodeId, 3, 5] {
        let stream = WriteStream::start(&clients, &model, 4, 40 + victim as u64);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let before_kill = stream.acked();
        tc.kill(victim);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (total, errs) = stream.finish().await;
        eprintln!(
            "kill node {victim}: {before_kill} writes acked before the kill, {} after, {} failed {:?}",
            total - before_kill,
            errs.len(),
            errs.iter().take(5).collect::<Vec<_>>()
        );
        assert!(
            total > before_kill,
            "no write was acknowledged with node {victim} dead"
        );
        model
            .check(&tc.client, &format!("node {victim} dead, writers stopped"))
            .await;
        tc.restart(victim);
        tc.wait_up(&[victim]).await;
        let truth = model
            .check(
                &tc.client,
                &format!("node {victim} killed mid-stream and back"),
            )
            .await;
        verify(
            &tc.new_client(client_config()),
            &truth,
            &format!("node {victim} back, new client"),
        )
        .await;
        assert_scrub_clean(&tc.client, &format!("after node {victim} came back")).await;
    }
}

/// Goal: a node restarted while writes go on (not only after they stopped) catches up
/// with every write it missed, including writes in flight while it starts: that is
/// what the settle wait is for.
///
/// Method: a cluster whose restarted nodes settle for 2 s; the write stream of
/// `node_killed_during_update_stream` runs throughout; node 2 is SIGKILLed, restarted
/// 1 s later while writers go on, and waited up while writers go on; writers continue
/// 1 s more, then stop. Every block must match an acknowledged state, a new client
/// reads the same, scrub clean. Then the same for node 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restarted_while_writes_continue() {
    let tc = TestCluster::with(
        "restart-mid-stream",
        Setup {
            settle_ms: 2000,
            ..Setup::default()
        },
    )
    .await;
    let initial = random_blocks(14, tc.client.blocks());
    write_all(&tc.client, &initial).await;
    let model = Model::new(initial);
    let clients = [
        tc.new_client(client_config()),
        tc.new_client(client_config()),
    ];
    for victim in [2 as NodeId, 4] {
        let stream = WriteStream::start(&clients, &model, 4, 140 + victim as u64);
        tokio::time::sleep(Duration::from_millis(700)).await;
        tc.kill(victim);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tc.restart(victim);
        let at_restart = stream.acked();
        tc.wait_up(&[victim]).await;
        let at_up = stream.acked();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (total, errs) = stream.finish().await;
        eprintln!(
            "restart node {victim} mid-stream: {at_restart} acked before the restart, {} while \
             it recovered, {} after; {} failed {:?}",
            at_up - at_restart,
            total - at_up,
            errs.len(),
            errs.iter().take(5).collect::<Vec<_>>()
        );
        assert!(at_up > at_restart && total > at_up, "writers stalled");
        let truth = model
            .check(&tc.client, &format!("node {victim} restarted mid-stream"))
            .await;
        verify(
            &tc.new_client(client_config()),
            &truth,
            &format!("node {victim} restarted mid-stream, new client"),
        )
        .await;
        assert_scrub_clean(&tc.client, &format!("node {victim} restarted mid-stream")).await;
    }
}

/// Goal: a node paused (SIGSTOP) while writes go on, and continued while they still
/// go on, ends up with every write (those it got late from its socket, and any it
/// missed), and nothing acknowledged is lost.
///
/// Method: settle 2 s (a node that finds it was paused re-verifies after a settle);
/// the write stream runs throughout; node 3 is SIGSTOPped for 3 s (writes meanwhile
/// wait for its lock answer to time out, 2 s), then continued while writers go on;
/// writers run 2 s more, stop; wait until every node is up; every block matches an
/// acknowledged state, a new client reads the same, scrub clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_paused_during_update_stream() {
    let tc = TestCluster::with(
        "pause-mid-stream",
        Setup {
            settle_ms: 2000,
            ..Setup::default()
        },
    )
    .await;
    let initial = random_blocks(15, tc.client.blocks());
    write_all(&tc.client, &initial).await;
    let model = Model::new(initial);
    let clients = [
        tc.new_client(client_config()),
        tc.new_client(client_config()),
    ];
    let stream = WriteStream::start(&clients, &model, 4, 150);
    tokio::time::sleep(Duration::from_millis(700)).await;
    tc.stop(3).await;
    let at_stop = stream.acked();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    tc.local.cont(3).unwrap();
    let at_cont = stream.acked();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (total, errs) = stream.finish().await;
    eprintln!(
        "pause node 3 mid-stream: {at_stop} acked before the stop, {} while stopped, {} after; \
         {} failed {:?}",
        at_cont - at_stop,
        total - at_cont,
        errs.len(),
        errs.iter().take(5).collect::<Vec<_>>()
    );
    assert!(total > at_cont, "writers stalled after SIGCONT");
    tc.wait_all_up().await;
    let truth = model.check(&tc.client, "node 3 paused mid-stream").await;
    verify(
        &tc.new_client(client_config()),
        &truth,
        "node 3 paused mid-stream, new client",
    )
    .await;
    assert_scrub_clean(&tc.client, "node 3 paused mid-stream").await;
}

/// Goal: a crash of every node at once, with writes in flight, loses no acknowledged
/// write, and leaves every block at a state some sequence of its writes produced
/// (each failed write entirely applied or not at all, never torn between data and
/// parity in a way reads or scrub would expose).
///
/// Method: the write stream runs for 1 s; all 6 nodes are SIGKILLed at once while
/// writes are in flight; writers stop (their last writes fail: unknown outcome);
/// all nodes restart and come up; once the writers' queued unlocks are delivered and
/// the nodes have settled the versions of failed writes (`wait_quiet`), every block
/// matches one of its candidates; a new client reads the same; scrub clean. Twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_every_node_mid_stream() {
    let tc = TestCluster::start("crash-all-mid-stream").await;
    let initial = random_blocks(16, tc.client.blocks());
    write_all(&tc.client, &initial).await;
    let model = Model::new(initial);
    let clients = [
        tc.new_client(client_config()),
        tc.new_client(client_config()),
    ];
    for round in 0..2u64 {
        let stream = WriteStream::start(&clients, &model, 4, 160 + round);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        for id in tc.ids() {
            tc.kill(id);
        }
        let (total, errs) = stream.finish().await;
        eprintln!(
            "crash {round}: {total} writes acked, {} failed {:?}",
            errs.len(),
            errs.iter().take(3).collect::<Vec<_>>()
        );
        tc.local.start_all(false).unwrap();
        tc.wait_all_up().await;
        wait_quiet(&tc, &clients).await;
        let truth = model
            .check(&tc.client, &format!("after crash {round} of every node"))
            .await;
        verify(
            &tc.new_client(client_config()),
            &truth,
            &format!("after crash {round}, new client"),
        )
        .await;
        assert_scrub_clean(&tc.client, &format!("after crash {round} of every node")).await;
    }
}

/// Goal: updates that only one parity member took, when every node then crashes (so
/// no member can pass them on any more), do not leave the stripe's other members
/// recovering forever: the updates were never acknowledged, no k members can decode
/// a state that includes them, and they are voided, so every node comes up, the
/// blocks read exactly their old bytes, scrub is clean and the blocks take new
/// writes.
///
/// Method: lock data blocks 0 and 1 of stripe 5 at every member; SIGKILL every member
/// but the first parity node; commit a delta to both blocks (only that parity node
/// takes them: `NotDurable`); SIGKILL it too; restart all. Without voiding, the data
/// nodes of blocks 0 and 1 and the other parity node never reach the versions the
/// parity node holds, and are never up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreproducible_updates_of_one_member_are_voided_after_a_crash_of_all() {
    let tc = TestCluster::start("void-ahead").await;
    let c = &tc.client;
    let data = random_blocks(23, c.blocks());
    write_all(c, &data).await;
    let geo = c.geometry().clone();
    let stripe = 5u64;
    let bs = c.block_size();
    let before = c
        .list_node(geo.member(stripe, 0))
        .await
        .and_then(|(_, slots)| slots.into_iter().find(|s| s.stripe == stripe))
        .expect("data node 0 lists the stripe");
    assert_eq!(before.versions[0], 1, "one write so far");
    let locked = c
        .lock_stripe(stripe, &[(0, 0, bs), (1, 0, bs)], rand::random())
        .await
        .unwrap();
    let parity = geo.member(stripe, geo.k);
    for id in tc.ids().into_iter().filter(|id| *id != parity) {
        tc.kill(id);
    }
    let delta = |b: u8| bytes::Bytes::from(vec![b; BS]);
    match c
        .commit_stripe(&locked, vec![(0, 0, delta(0x5a)), (1, 0, delta(0xc3))])
        .await
    {
        Err(ClientError::NotDurable { acked, .. }) => assert_eq!(acked, 1),
        other => panic!("commit with one member alive: {other:?}"),
    }
    let versions = |slots: Option<(NodeId, Vec<drs_proto::SlotInfo>)>| {
        let slots = slots.expect("the parity node lists its blocks").1;
        let slot = slots.into_iter().find(|s| s.stripe == stripe).unwrap();
        (slot.versions[0], slot.versions[1])
    };
    let (v0, v1) = versions(c.list_node(parity).await);
    assert!(
        v0 >= 2 && v1 >= 2,
        "the parity node took both updates on top of the initial write: ({v0}, {v1})"
    );
    tc.kill(parity);
    tc.local.start_all(false).unwrap();
    tc.wait_all_up().await;
    let reader = tc.new_client(client_config());
    for index in 0..2 {
        let lba = geo.lba(stripe, index);
        let got = read_ok(&reader, lba, "a voided block").await;
        assert!(
            got[..] == data[lba as usize][..],
            "block {lba}: {}",
            describe_diff(lba, &got, &data[lba as usize])
        );
    }
    verify(&reader, &data, "after voiding").await;
    assert_scrub_clean(&reader, "after voiding").await;
    let lba = geo.lba(stripe, 0);
    let new = bytes(77, BS);
    reader.write_blocks(lba, &new).await.unwrap();
    let got = read_ok(&tc.new_client(client_config()), lba, "rewritten").await;
    assert!(got[..] == new[..], "{}", describe_diff(lba, &got, &new));
    assert_scrub_clean(&reader, "after a new write").await;
}

/// Goal: a write acknowledged without its block's data node survives a crash of
/// every node, even with other updates of the stripe in flight that no k members
/// agree on. Its only copies are at the parity members, which keep it durably
/// (`UpdateReq::keep`) and pass it on after the restart; the settling of the stripe
/// waits for that, so the write is rolled forward, never voided. Two ways in: the
/// data node was down when the write locked (stripe 6), or it granted the lock and
/// died before taking its update (stripe 7: the client asks the parity members to
/// keep it before acknowledging).
///
/// Method: per stripe, get block 3 written and acknowledged without its data node
/// (min_write 4). Lock blocks 0 and 1 of the stripe, then send block 0's update
/// only to the first parity member and block 1's only to the second, as a client
/// would that died mid-multicast (their data nodes granted: nothing kept). Now no k
/// members agree on a state that includes block 3's write. SIGKILL every node,
/// restart all: block 3 of each stripe reads exactly what was acknowledged, blocks 0
/// and 1 either of their contents, from two new clients; scrub is clean. Without the
/// kept copies block 3 came back with its old bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acked_without_its_data_node_survives_a_crash_of_all() {
    let tc = TestCluster::start("kept-over-crash").await;
    let c = &tc.client;
    let mut data = random_blocks(29, c.blocks());
    write_all(c, &data).await;
    let geo = c.geometry().clone();
    let bs = c.block_size();
    let mut acked = Vec::new();
    let mut either = Vec::new();
    for (stripe, down_before_lock) in [(6u64, true), (7, false)] {
        let lba3 = geo.lba(stripe, 3);
        let data_node = geo.member(stripe, 3);
        let new = if down_before_lock {
            tc.kill(data_node);
            let new = bytes(301, BS);
            c.write_blocks(lba3, &new)
                .await
                .expect("a write with its data node down is acknowledged");
            new
        } else {
            let locked = c
                .lock_stripe(stripe, &[(3, 0, bs)], rand::random())
                .await
                .unwrap();
            assert!(locked.granted[3], "the data node granted");
            tc.kill(data_node);
            let delta = bytes(302, BS);
            c.commit_stripe(&locked, vec![(3, 0, bytes::Bytes::from(delta.clone()))])
                .await
                .expect("a write whose data node died after granting is acknowledged");
            data[lba3 as usize]
                .iter()
                .zip(&delta)
                .map(|(a, b)| a ^ b)
                .collect()
        };
        data[lba3 as usize] = new.clone();
        acked.push((lba3, new));
        let locked = c
            .lock_stripe(stripe, &[(0, 0, bs), (1, 0, bs)], rand::random())
            .await
            .unwrap();
        // Each update as a client sends it (its data node granted: nothing kept),
        // to one parity member only: the client died before sending the rest.
        for (position, index, b) in [(geo.k, 0usize, 0x5au8), (geo.k + 1, 1, 0xc3)] {
            let req = drs_proto::Request::Update(drs_proto::UpdateReq {
                volume: c.volume().id,
                stripe,
                position: position as u8,
                owner: locked.owner,
                updates: vec![drs_proto::BlockUpdate {
                    id: drs_proto::UpdateId {
                        client: locked.client,
                        seq: 1_000_000 + stripe * 10 + index as u64,
                    },
                    index: index as u8,
                    version: locked.next_version(index).unwrap(),
                    base: locked.base_version(index).unwrap(),
                    offset: 0,
                    len: BS as u32,
                }],
                unlock: Vec::new(),
                relay: false,
                on_behalf: false,
                completed: Vec::new(),
                keep: Vec::new(),
            });
            let node = geo.member(stripe, position);
            match c.call(node, &req, bytes::Bytes::from(vec![b; BS])).await {
                Ok((drs_proto::Response::Updated(r), _)) => {
                    assert!(r.results.iter().all(|x| x.is_ok()), "{r:?}")
                }
                other => panic!("an update to one parity member: {other:?}"),
            }
            let lba = geo.lba(stripe, index);
            let xored: Vec<u8> = data[lba as usize].iter().map(|x| x ^ b).collect();
            either.push((lba, xored));
        }
    }
    for id in tc.ids() {
        if tc.local.pid(id).is_some() {
            tc.kill(id);
        }
    }
    tc.local.start_all(false).unwrap();
    tc.wait_all_up().await;
    for reader in [
        tc.new_client(client_config()),
        tc.new_client(client_config()),
    ] {
        for (lba, want) in &acked {
            let got = read_ok(&reader, *lba, "an acknowledged block").await;
            assert!(
                got[..] == want[..],
                "an acknowledged write was lost: {}",
                describe_diff(*lba, &got, want)
            );
        }
        for (lba, new) in &either {
            let got = read_ok(&reader, *lba, "a block with a failed write").await;
            assert!(
                got[..] == data[*lba as usize][..] || got[..] == new[..],
                "block {lba} is neither its old nor its new content: {}",
                describe_diff(*lba, &got, &data[*lba as usize])
            );
        }
    }
    assert_scrub_clean(c, "after the crash of all").await;
}

/// Sum of the updates every node applied or logged (node stats).
async fn total_updates(tc: &TestCluster) -> u64 {
    let mut n = 0;
    for id in tc.ids() {
        n += tc.info(id).await.stats.updates;
    }
    n
}

/// Goal: the write-back cache keeps running totals: any number of writes to a cached
/// block are seen by cache reads at once, are invisible to other clients until the
/// flush, and reach the nodes as one update per dirty block at its data node and at
/// each parity node.
///
/// Method: write random data; through a `WriteBackCache` (max_dirty 64) make 300
/// small random writes to 4 blocks in 3 stripes (two blocks share a stripe), checking
/// cache reads against a model as it goes. Before the flush: another client's reads
/// return the OLD bytes (reads take no lock), its write to a cached block fails with
/// `Locked` (the cache holds the locks), and the nodes received no update. Flush:
/// exactly 12 block updates reach the nodes (stripe with 2 dirty blocks: 2 at the
/// data nodes + 2 x 2 at the parity nodes; the other two stripes: 1 + 2 each), the
/// cache is empty, another client reads the
/// new bytes and can write them again; every block verifies; scrub clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_cache_running_totals() {
    let tc = TestCluster::start("cache").await;
    let initial = random_blocks(8, tc.client.blocks());
    write_all(&tc.client, &initial).await;
    let mut model = initial.clone();
    let cache = WriteBackCache::new(tc.new_client(client_config()), 64);
    let other = tc.new_client(ClientConfig {
        lock_timeout: Duration::from_millis(500),
        ..client_config()
    });
    let cached: [u64; 4] = [8, 9, 13, 40];
    let updates_before = total_updates(&tc).await;
    let mut rng = StdRng::seed_from_u64(88);
    for n in 0..300u64 {
        let lba = cached[rng.gen_range(0..cached.len())];
        let off = rng.gen_range(0..BS - 64);
        let len = rng.gen_range(1..=64);
        let new = bytes(3000 + n, len);
        tokio::time::timeout(Duration::from_secs(30), cache.write(lba, off, &new))
            .await
            .expect("cache write hung")
            .unwrap_or_else(|e| panic!("cache write {n} to {lba}: {e}"));
        model[lba as usize][off..off + len].copy_from_slice(&new);
        if n % 25 == 0 {
            let got = cache.read(lba, 0, BS).await.unwrap();
            assert!(
                got[..] == model[lba as usize][..],
                "cache read after write {n}"
            );
        }
    }
    assert_eq!(cache.len().await, 4);
    for &lba in &cached {
        let got = cache.read(lba, 0, BS).await.unwrap();
        assert!(got[..] == model[lba as usize][..], "cache read of {lba}");
        assert!(
            got[..] != initial[lba as usize][..],
            "block {lba} was not changed"
        );
        let seen = other.read_block(lba).await.unwrap();
        assert!(
            seen[..] == initial[lba as usize][..],
            "another client sees unflushed data in {lba}: {}",
            describe_diff(lba, &seen, &initial[lba as usize])
        );
    }
    // A non-cached block reads through to the volume.
    assert!(cache.read(100, 0, BS).await.unwrap()[..] == initial[100][..]);
    match tokio::time::timeout(Duration::from_secs(15), other.write(9, 0, &[1, 2, 3]))
        .await
        .expect("write to a cached block hung")
    {
        Err(ClientError::Locked { lba, .. }) => assert_eq!(lba, 9),
        r => panic!("another client's write to a cached block: {r:?}"),
    }
    assert_eq!(
        total_updates(&tc).await,
        updates_before,
        "updates reached nodes before the flush"
    );

    tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .expect("flush hung")
        .expect("flush");
    assert!(cache.is_empty().await);
    assert_eq!(
        total_updates(&tc).await - updates_before,
        12,
        "one update per dirty block, at its data node and each parity node"
    );
    for &lba in &cached {
        let seen = other.read_block(lba).await.unwrap();
        assert!(
            seen[..] == model[lba as usize][..],
            "after flush: {}",
            describe_diff(lba, &seen, &model[lba as usize])
        );
    }
    verify(&other, &model, "after flush").await;
    // The locks are gone: another client writes a flushed block.
    let new = bytes(4444, BS);
    other
        .write(9, 0, &new)
        .await
        .expect("write after flush (locks released)");
    model[9] = new;
    // And the cache can take the block again and flush it.
    cache.write(13, 5, &[7; 11]).await.unwrap();
    model[13][5..16].copy_from_slice(&[7; 11]);
    cache.flush().await.unwrap();
    verify(&tc.client, &model, "after the second flush").await;
    assert_scrub_clean(&tc.client, "after the cache flushed").await;
}

/// Goal: a write that failed without reaching any node that holds its block's bytes
/// (unknown outcome for the writer; here: not applied anywhere) leaves the block
/// readable, with the old bytes, once every node is back up.
///
/// Method: lock block 1 of stripe 3 (`lock_stripe`, `old_block`), SIGKILL its data
/// node and both parity nodes, then send the update (`commit_stripe`): only the other
/// data nodes' unlocks are answered, so it fails with `NotDurable` and nothing was
/// applied; the client queues the unlocks (with the version the failed write would
/// have had) for the dead nodes. Restart the three, wait until up and until the
/// client has delivered its queued unlocks. From then on, for 3 s, every read of the
/// block (a new client; whole block) must return the old bytes, each within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_leaves_block_readable() {
    let tc = TestCluster::start("failed-write").await;
    let c = &tc.client;
    let data = random_blocks(17, c.blocks());
    write_all(c, &data).await;
    let geo = c.geometry().clone();
    let (stripe, index) = (3u64, 1usize);
    let lba = geo.lba(stripe, index);
    let locked = c
        .lock_stripe(stripe, &[(index as u8, 0, c.block_size())], rand::random())
        .await
        .unwrap();
    let old = c.old_block(&locked, index).await.unwrap();
    assert!(old[..] == data[lba as usize][..]);
    let victims: Vec<NodeId> = [index, 4, 5]
        .iter()
        .map(|&p| geo.member(stripe, p))
        .collect();
    for &v in &victims {
        tc.kill(v);
    }
    let delta = bytes::Bytes::from(vec![0xa5u8; BS]);
    match c.commit_stripe(&locked, vec![(index, 0, delta)]).await {
        Err(ClientError::NotDurable { acked, need, .. }) => assert_eq!((acked, need), (3, 4)),
        other => panic!("commit with the data and parity nodes dead: {other:?}"),
    }
    for &v in &victims {
        tc.restart(v);
    }
    tc.wait_up(&victims).await;
    let left = c.settle_unlocks(Duration::from_secs(20)).await;
    assert_eq!(left, 0, "queued unlocks never delivered");
    let reader = tc.new_client(client_config());
    let until = Instant::now() + Duration::from_secs(3);
    let mut n = 0;
    while Instant::now() < until {
        let t = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), reader.read_block(lba))
            .await
            .expect("read hung");
        let took = t.elapsed();
        match r {
            Ok(b) => assert!(
                b[..] == data[lba as usize][..],
                "read {n}: {}",
                describe_diff(lba, &b, &data[lba as usize])
            ),
            Err(e) => panic!(
                "read {n} of block {lba} failed after {took:?}, all nodes up: {e}\n{}",
                describe_stripe(&reader, stripe).await
            ),
        }
        assert!(took < Duration::from_secs(1), "read {n} took {took:?}");
        n += 1;
    }
    assert_scrub_clean(c, "after the failed write").await;
}

/// Goal: a write-back cache flush that fails because too few nodes are live reports
/// the failure, drops the block from the cache (its outcome is unknown: the member
/// that took the update applied it), leaves no lock behind, and once the nodes are
/// back the stripe converges to one of the two contents (old or new) and scrubs clean.
///
/// Method: write random data; through a `WriteBackCache` change block 1 of stripe 2;
/// SIGKILL both parity nodes and data node 0 of the stripe (block 1's own node stays
/// up, so it takes the update): the flush fails (`NotDurable`) and the cache is
/// empty. Restart the three nodes and wait until up; scrub; the block reads as
/// exactly the old or the new bytes; another client can write it (no lock left
/// behind); every block verifies; scrub clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_flush_failure_is_reported_and_leaves_no_lock() {
    let tc = TestCluster::start("cache-fail").await;
    let c = &tc.client;
    let mut data = random_blocks(18, c.blocks());
    write_all(c, &data).await;
    let geo = c.geometry().clone();
    let (stripe, index) = (2u64, 1usize);
    let lba = geo.lba(stripe, index);
    let cache = WriteBackCache::new(tc.new_client(client_config()), 64);
    let new = bytes(1818, 100);
    cache.write(lba, 50, &new).await.unwrap();
    let old_block = data[lba as usize].clone();
    let mut new_block = old_block.clone();
    new_block[50..150].copy_from_slice(&new);
    let victims: Vec<NodeId> = [0usize, 4, 5]
        .iter()
        .map(|&p| geo.member(stripe, p))
        .collect();
    for &v in &victims {
        tc.kill(v);
    }
    let first = tokio::time::timeout(Duration::from_secs(30), cache.flush())
        .await
        .expect("flush hung");
    match first {
        Err(ClientError::NotDurable { .. }) => {}
        other => panic!("flush with 3 members dead: {other:?}"),
    }
    assert!(cache.is_empty().await, "a failed block leaves the cache");
    for &v in &victims {
        tc.restart(v);
    }
    tc.wait_up(&victims).await;
    let _ = scrub(c).await;
    let got = read_ok(c, lba, "after the failed flush").await;
    assert!(
        got[..] == old_block[..] || got[..] == new_block[..],
        "{}",
        describe_diff(lba, &got, &new_block)
    );
    let other = tc.new_client(ClientConfig {
        lock_timeout: Duration::from_secs(2),
        ..client_config()
    });
    let again = bytes(1819, BS);
    other
        .write(lba, 0, &again)
        .await
        .expect("write after the failed flush: no lock left behind");
    data[lba as usize] = again;
    verify(c, &data, "after the failed flush").await;
    assert_scrub_clean(c, "after the failed flush").await;
}

/// Runs scrubs (with repair) over and over for ~4 s while the write stream runs, then
/// checks what the writes left. Returns the scrubs' complaints about a cluster that
/// was healthy all along (repairs, unrecoverable stripes).
async fn scrubs_under_writes(name: &str, seed: u64) -> Vec<String> {
    let tc = TestCluster::start(name).await;
    let initial = random_blocks(seed, tc.client.blocks());
    write_all(&tc.client, &initial).await;
    let model = Model::new(initial);
    let clients = [
        tc.new_client(client_config()),
        tc.new_client(client_config()),
    ];
    let scrubber = tc.new_client(client_config());
    let stream = WriteStream::start(&clients, &model, 4, seed * 10);
    let until = Instant::now() + Duration::from_secs(4);
    let mut scrubs = 0;
    let mut busy = 0;
    let mut wrong = Vec::new();
    while Instant::now() < until {
        let r = scrub(&scrubber).await;
        if !(r.unrecoverable.is_empty() && r.repaired.is_empty() && r.found.is_empty()) {
            wrong.push(format!("scrub {scrubs}: {}", describe_report(&r)));
        }
        busy += r.degraded.len();
        scrubs += 1;
    }
    let (total, errs) = stream.finish().await;
    eprintln!(
        "{name}: {scrubs} scrubs ({busy} busy stripes, {} with complaints), {total} writes \
         acked, {} failed",
        wrong.len(),
        errs.len()
    );
    assert!(errs.is_empty(), "writes failed under scrubs: {errs:?}");
    let locks = tc.client.status().await.locks;
    assert!(locks.is_empty(), "locks left with no writer: {locks:?}");
    let truth = model.check(&tc.client, "after scrubs under writes").await;
    verify(&scrubber, &truth, "after scrubs under writes, scrubber").await;
    assert_scrub_clean(&tc.client, "after scrubs under writes").await;
    wrong
}

/// Goal: scrub is safe under concurrent writes: it takes no locks, and its repairs
/// are conditional on versions at the node, so it never loses, corrupts or fails a
/// write, and leaves no lock behind.
///
/// Method: the write stream of `node_killed_during_update_stream` (4 tasks, 2
/// clients) runs for ~4 s while a third client scrubs the whole volume with repair
/// over and over. Then writers stop: no write failed, no lock is held, every block
/// matches its acknowledged state (from two clients), and a final scrub is clean.
/// (What the scrubs report meanwhile is checked by
/// `scrub_during_writes_reports_nothing`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_during_writes_is_safe() {
    scrubs_under_writes("scrub-under-writes", 19).await;
}

/// Goal: a scrub of a healthy cluster under concurrent writes reports nothing wrong:
/// a block that has not yet received an update in flight is not "behind", and its
/// stripe is not "unrecoverable" (`drs-cli scrub` exits non-zero on that).
///
/// Method: as `scrub_during_writes_is_safe`; additionally no scrub may report a
/// repaired, found or unrecoverable block (busy/degraded stripes are fine: updates
/// kept changing them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_during_writes_reports_nothing() {
    let wrong = scrubs_under_writes("scrub-reports-under-writes", 20).await;
    assert!(
        wrong.is_empty(),
        "{} scrubs of a healthy cluster under writes reported problems: {}",
        wrong.len(),
        wrong
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

/// Goal: a write whose caller stops waiting (a timeout) does not leave its locks
/// held while its client lives (PROTOCOL.md 9.7): it runs to its end in the
/// background.
///
/// Method: a parity member of block 5's stripe is SIGSTOPped, so client A's write
/// waits for its lock answer, and A's caller gives up after 200 ms. The member is
/// continued; client B then writes block 5 (within its lock timeout), which reads
/// back as B's write, and no lock is left anywhere while A lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_given_up_on_leaves_no_lock_behind() {
    let tc = TestCluster::start("given-up").await;
    let a = tc.new_client(client_config());
    let b = tc.new_client(client_config());
    let geo = tc.client.geometry().clone();
    let (stripe, _) = geo.locate(5);
    let parity = geo.member(stripe, geo.k);
    tc.stop(parity).await;
    let first = bytes(1, BS);
    let write = a.write(5, 0, &first);
    let given_up = tokio::time::timeout(Duration::from_millis(200), write).await;
    assert!(given_up.is_err(), "A's write ended with a member stopped");
    tc.local.cont(parity).unwrap();
    b.write(5, 0, &bytes(2, BS))
        .await
        .expect("B's write after A's caller gave up on A's");
    assert_eq!(read_ok(&b, 5, "after both writes").await, bytes(2, BS));
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let held = tc.client.status().await.locks;
        if held.is_empty() {
            break;
        }
        assert!(Instant::now() < until, "locks left behind: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(a);
}
