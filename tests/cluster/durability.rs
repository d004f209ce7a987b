//! What is on disk: corrupted block files are detected and repaired, and the whole
//! cluster survives clean and unclean restarts.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use drs_client::scrub::Problem;
use drs_proto::NodeId;
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

/// Waits (bounded) until `cond` holds for node `id`'s stats.
async fn wait_stats(
    tc: &TestCluster,
    id: NodeId,
    what: &str,
    cond: impl Fn(&drs_proto::NodeStats) -> bool,
) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let info = tc.info(id).await;
        if cond(&info.stats) {
            return;
        }
        assert!(
            Instant::now() < until,
            "node {id}: {what} never happened: {:?}",
            info.stats
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Goal: bit rot in a node's data file is detected by the block checksum, never
/// returned to a reader, and repaired in place (data and parity blocks), including a
/// block that is written while corrupt.
///
/// Method: write random data. (1) Invert 16 bytes of data block 1 of stripe 5 in its
/// node's blocks.dat. Reading the block returns the right bytes (decoded) and sends
/// the block for repair; the node counts the corruption and, soon after, the installed
/// repair (node stats), so a scrub then finds nothing; the node's file again holds the
/// exact data; with 2 OTHER members of the
/// stripe killed, every block of the stripe still reads correctly (the rebuilt block
/// is needed to decode). (2) Invert bytes of parity block 4 of stripe 9: a scrub
/// reports it `Corrupt` and repaired, the file again holds the exact old parity, the
/// next scrub is clean. (3) Corrupt data block 2 of stripe 12, then overwrite part of
/// it (the node holds the update until the block is repaired; the stuck-update
/// watcher or the read's repair rebuilds it): the new bytes read back, the node's file
/// eventually holds them, scrub clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_block_file_is_detected_and_repaired() {
    let tc = TestCluster::start("corrupt").await;
    let c = &tc.client;
    let geo = c.geometry().clone();
    let mut data = random_blocks(5, c.blocks());
    write_all(c, &data).await;

    // (1) A data block.
    let (stripe, pos) = (5u64, 1usize);
    let node = geo.member(stripe, pos);
    let lba = geo.lba(stripe, pos);
    assert!(tc.slot_bytes(node, stripe) == data[lba as usize]);
    let before = tc.info(node).await.stats;
    tc.corrupt(node, stripe, 100, 16);
    let got = read_ok(c, lba, "corrupt block").await;
    assert!(
        got[..] == data[lba as usize][..],
        "read returned bad bytes: {}",
        describe_diff(lba, &got, &data[lba as usize])
    );
    assert!(
        c.stats().repairs.load(Ordering::Relaxed) >= 1,
        "the read did not send the corrupt block for repair"
    );
    // The read's repair (a scrub of the stripe, in the background) rewrites the block.
    wait_stats(&tc, node, "corruption counted and repaired", |s| {
        s.corrupt_found > before.corrupt_found && s.repairs_installed > before.repairs_installed
    })
    .await;
    assert_scrub_clean(c, "after repairing a data block").await;
    assert!(
        tc.slot_bytes(node, stripe) == data[lba as usize],
        "the node's file does not hold the repaired block"
    );
    let others: Vec<NodeId> = (0..6)
        .filter(|p| *p != pos)
        .map(|p| geo.member(stripe, p))
        .take(2)
        .collect();
    for &o in &others {
        tc.kill(o);
    }
    for i in 0..4 {
        let l = geo.lba(stripe, i);
        let got = read_ok(c, l, &format!("{others:?} dead")).await;
        assert!(
            got[..] == data[l as usize][..],
            "with {others:?} dead: {}",
            describe_diff(l, &got, &data[l as usize])
        );
    }
    for &o in &others {
        tc.restart(o);
    }
    tc.wait_up(&others).await;

    // (2) A parity block.
    let (pstripe, ppos) = (9u64, 4usize);
    let pnode = geo.member(pstripe, ppos);
    let original = tc.slot_bytes(pnode, pstripe);
    tc.corrupt(pnode, pstripe, 2000, 64);
    let r = scrub(c).await;
    assert!(
        r.repaired.len() == 1
            && r.repaired[0].stripe == pstripe
            && r.repaired[0].position == Some(ppos)
            && r.repaired[0].problem == Problem::Corrupt
            && r.unrecoverable.is_empty()
            && r.found.is_empty(),
        "scrub after corrupting parity: {}",
        describe_report(&r)
    );
    assert!(
        tc.slot_bytes(pnode, pstripe) == original,
        "the parity block was not restored"
    );
    assert_scrub_clean(c, "after repairing a parity block").await;
    verify(c, &data, "after parity repair").await;

    // (3) A corrupt block that is written before anyone repairs it.
    let (wstripe, wpos) = (12u64, 2usize);
    let wnode = geo.member(wstripe, wpos);
    let wlba = geo.lba(wstripe, wpos);
    tc.corrupt(wnode, wstripe, 0, 8);
    let new = bytes(1212, 1000);
    tokio::time::timeout(Duration::from_secs(30), c.write(wlba, 500, &new))
        .await
        .expect("write to a corrupt block hung")
        .expect("write to a corrupt block");
    data[wlba as usize][500..1500].copy_from_slice(&new);
    let got = read_ok(c, wlba, "corrupt block written").await;
    assert!(
        got[..] == data[wlba as usize][..],
        "{}",
        describe_diff(wlba, &got, &data[wlba as usize])
    );
    let until = Instant::now() + Duration::from_secs(20);
    while tc.slot_bytes(wnode, wstripe) != data[wlba as usize] {
        assert!(
            Instant::now() < until,
            "node {wnode} never rebuilt the corrupt block it had an update for"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    verify(c, &data, "after writing a corrupt block").await;
    assert_scrub_clean(c, "after writing a corrupt block").await;
    let mut rng = StdRng::seed_from_u64(55);
    // A final sweep: random corruption in every node is found and repaired by scrub.
    for id in tc.ids() {
        let s = rng.gen_range(0..geo.stripes());
        tc.corrupt(id, s, rng.gen_range(0..BS - 4), 4);
    }
    let r = scrub(c).await;
    assert!(
        r.repaired.len() == 6 && r.unrecoverable.is_empty(),
        "scrub after corrupting one block per node: {}",
        describe_report(&r)
    );
    assert_scrub_clean(c, "after the sweep").await;
    verify(c, &data, "after the sweep").await;
}

/// Goal: the cluster survives a clean stop of every node, and a crash of every node
/// (SIGKILL, no checkpoint) right after acknowledged writes: acknowledged writes are
/// in the write-ahead logs and are replayed.
///
/// Method: write random data; `down()` (SIGTERM: checkpoint); `start_all(false)`;
/// wait up; verify. Then a burst of 64 concurrent acknowledged writes (whole blocks
/// and byte ranges, many stripes), immediately SIGKILL all 6 nodes, start them all,
/// wait up, verify every byte, scrub clean. A second burst-and-crash with sub-block
/// writes to the same few blocks (several versions of a block in the log) follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_whole_cluster() {
    let tc = TestCluster::start("restart-all").await;
    let c = &tc.client;
    let mut data = random_blocks(9, c.blocks());
    write_all(c, &data).await;

    tc.local.down(Duration::from_secs(10)).unwrap();
    for id in tc.ids() {
        assert!(
            tc.local.pid(id).is_none(),
            "node {id} still runs after down"
        );
    }
    tc.local.start_all(false).unwrap();
    tc.wait_all_up().await;
    verify(c, &data, "after a clean restart of every node").await;

    let mut rng = StdRng::seed_from_u64(99);
    for (burst, distinct) in [(0u64, 64u64), (1, 4)] {
        // Distinct blocks per burst (one write per block in flight at a time).
        let mut lbas: Vec<u64> = Vec::new();
        while (lbas.len() as u64) < distinct {
            let l = rng.gen_range(0..c.blocks());
            if !lbas.contains(&l) {
                lbas.push(l);
            }
        }
        let rounds = 64 / distinct;
        for round in 0..rounds {
            let writes: Vec<(u64, usize, Vec<u8>)> = lbas
                .iter()
                .map(|&l| {
                    let off = if rng.gen_bool(0.5) {
                        0
                    } else {
                        rng.gen_range(0..BS)
                    };
                    let len = if off == 0 {
                        BS
                    } else {
                        rng.gen_range(1..=BS - off)
                    };
                    (l, off, bytes(rng.gen(), len))
                })
                .collect();
            let res = tokio::time::timeout(
                Duration::from_secs(30),
                join_all(writes.iter().map(|(l, o, d)| c.write(*l, *o, d))),
            )
            .await
            .expect("burst hung");
            for ((l, o, d), r) in writes.iter().zip(res) {
                r.unwrap_or_else(|e| panic!("burst {burst} round {round}: write to {l}: {e}"));
                data[*l as usize][*o..*o + d.len()].copy_from_slice(d);
            }
        }
        for id in tc.ids() {
            tc.kill(id);
        }
        tc.local.start_all(false).unwrap();
        tc.wait_all_up().await;
        verify(c, &data, &format!("after crash {burst} of every node")).await;
        verify(
            &tc.new_client(client_config()),
            &data,
            &format!("after crash {burst}, new client"),
        )
        .await;
        assert_scrub_clean(c, &format!("after crash {burst} of every node")).await;
    }
}

/// Goal: a node whose own files were damaged while it was down (its block headers
/// unreadable, the tail of its write-ahead log lost) does not serve wrong or old
/// bytes: it comes back with every block rebuilt from its peers.
///
/// Method: write random data; stop node 3 cleanly (SIGTERM: a checkpoint writes its
/// headers), restart it, overwrite part of every block (so its log holds updates
/// after the checkpoint), SIGKILL it, then invert bytes in the middle of its
/// `headers` file and cut its `wal.log` in half. Restart it and wait until up; every
/// block verifies; with two OTHER nodes killed (so node 3's blocks are needed to
/// decode) every block still verifies; after they return, scrub is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_node_files_are_rebuilt() {
    let tc = TestCluster::start("damaged-files").await;
    let c = &tc.client;
    let mut data = random_blocks(21, c.blocks());
    write_all(c, &data).await;
    let victim: NodeId = 3;
    let vol_dir = tc.block_file(victim).parent().unwrap().to_path_buf();
    tc.terminate(victim).await;
    assert!(vol_dir.join("headers").exists(), "no checkpoint at SIGTERM");
    tc.restart(victim);
    tc.wait_up(&[victim]).await;
    let mut rng = StdRng::seed_from_u64(2121);
    for lba in 0..c.blocks() {
        let off = rng.gen_range(0..BS / 2);
        let new = bytes(rng.gen(), BS / 4);
        c.write(lba, off, &new).await.unwrap();
        data[lba as usize][off..off + new.len()].copy_from_slice(&new);
    }
    tc.kill(victim);
    let headers = vol_dir.join("headers");
    let mut h = std::fs::read(&headers).unwrap();
    let mid = h.len() / 2;
    for b in &mut h[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&headers, &h).unwrap();
    let wal = vol_dir.join("wal.log");
    let len = std::fs::metadata(&wal).unwrap().len();
    assert!(len > 0, "the log is empty");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    tc.restart(victim);
    tc.wait_up(&[victim]).await;
    verify(c, &data, "node 3 back with damaged files").await;
    let others: Vec<NodeId> = vec![0, 5];
    for &o in &others {
        tc.kill(o);
    }
    verify(c, &data, "node 3 back, nodes 0 and 5 dead").await;
    for &o in &others {
        tc.restart(o);
    }
    tc.wait_up(&others).await;
    assert_scrub_clean(c, "after node 3 rebuilt its damaged files").await;
}
