//! Disk faults under running nodes: bit flips, a block rolled back to an older copy, a
//! data file cut short (a torn write), and a full disk. Each is detected by the block
//! checksums (the background scrubber, with no client reading), no wrong byte reaches
//! a reader, what was injected is what gets repaired, and a full disk refuses writes
//! with a reason instead of dropping an acknowledged one.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drs_proto::{NodeId, NodeStats};

use crate::common::*;

/// The node's stats once `cond` holds (bounded wait).
async fn stats_when(
    tc: &TestCluster,
    id: NodeId,
    within: Duration,
    what: &str,
    cond: impl Fn(&NodeStats) -> bool,
) -> NodeStats {
    let until = Instant::now() + within;
    loop {
        let info = tc.info(id).await;
        if cond(&info.stats) {
            return info.stats;
        }
        assert!(
            Instant::now() < until,
            "node {id}: {what} never happened: {:?}",
            info.stats
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes `bytes` over the block a node holds for `stripe`, behind its back.
fn put_slot(tc: &TestCluster, id: NodeId, stripe: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(tc.block_file(id))
        .expect("open blocks.dat");
    f.write_all_at(bytes, stripe * BS as u64)
        .expect("write blocks.dat");
    f.sync_all().expect("sync blocks.dat");
}

/// Goal: with no client reading, the background scrubber finds every fault injected
/// into two nodes' data files (m = 2), marks and rebuilds exactly those blocks, and
/// leaves the data decodable without the two other nodes.
///
/// Method: a 4+2 cluster whose nodes scrub every second at full speed; random data
/// written; one clean pass seen on every node. Node 1: bytes inverted in two blocks,
/// and one block rolled back (its bytes saved, the block overwritten through a client
/// and applied, the saved bytes put back: a stale copy). Node 4: bytes inverted in a
/// parity block, and its data file cut to end half-way through its second-to-last
/// block (two blocks torn). Then wait for the scrubber: each node's `scrub_found`
/// and `scrub_repaired` must reach 3, and `corrupt_found` / `repairs_installed` must
/// have grown by exactly 3 (no fault missed, none counted twice, nothing repaired
/// that was not broken). The nodes' files again hold the exact bytes, and with two
/// other nodes SIGKILLed every block reads back as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_scrubber_finds_and_repairs_every_injected_fault() {
    let tc = TestCluster::with(
        "scrubber",
        Setup {
            scrub_every_s: 1,
            ..Setup::default()
        },
    )
    .await;
    let c = &tc.client;
    let geo = c.geometry().clone();
    let stripes = geo.stripes();
    let mut data = random_blocks(31, c.blocks());
    write_all(c, &data).await;
    let (a, b): (NodeId, NodeId) = (1, 4);
    let mut base = Vec::new();
    for id in [a, b] {
        let s = stats_when(&tc, id, Duration::from_secs(60), "a clean pass", |s| {
            s.scrub_passes >= 1
        })
        .await;
        assert_eq!(s.scrub_found, 0, "node {id} found corruption before any");
        base.push(s);
    }

    // Node a: two blocks with flipped bytes.
    let flipped = [2u64, 5];
    let a_before: Vec<Vec<u8>> = flipped.iter().map(|s| tc.slot_bytes(a, *s)).collect();
    for (i, s) in flipped.iter().enumerate() {
        tc.corrupt(a, *s, 100 + 700 * i, 8);
    }
    // Node a: a block rolled back to an older copy.
    let stale = 7u64;
    let old = tc.slot_bytes(a, stale);
    let pos = geo
        .position_of(stale, a)
        .expect("node a is in every stripe");
    let lba = geo.lba(stale, if pos < geo.k { pos } else { 0 });
    let new = bytes(77, BS);
    c.write(lba, 0, &new).await.expect("overwrite");
    data[lba as usize] = new.clone();
    let until = Instant::now() + Duration::from_secs(10);
    while tc.slot_bytes(a, stale) == old {
        assert!(Instant::now() < until, "node {a} never applied the write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let current = tc.slot_bytes(a, stale);
    put_slot(&tc, a, stale, &old);

    // Node b: a parity block with flipped bytes.
    let parity = (0..stripes / 2)
        .find(|s| ![2, 5, 7].contains(s) && geo.position_of(*s, b).is_some_and(|p| p >= geo.k))
        .expect("node b holds parity of some stripe");
    let b_parity = tc.slot_bytes(b, parity);
    tc.corrupt(b, parity, 4000, 16);
    // Node b: the data file cut half-way through its second-to-last block.
    let torn = [stripes - 2, stripes - 1];
    let b_torn: Vec<Vec<u8>> = torn.iter().map(|s| tc.slot_bytes(b, *s)).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(tc.block_file(b))
        .expect("open blocks.dat")
        .set_len((stripes - 2) * BS as u64 + BS as u64 / 2)
        .expect("truncate blocks.dat");

    for (i, id) in [a, b].into_iter().enumerate() {
        let b0 = &base[i];
        let s = stats_when(
            &tc,
            id,
            Duration::from_secs(60),
            "scrubber repairs of all 3 faults",
            |s| s.scrub_found >= b0.scrub_found + 3 && s.scrub_repaired >= b0.scrub_repaired + 3,
        )
        .await;
        assert_eq!(s.scrub_found - b0.scrub_found, 3, "node {id}: {s:?}");
        assert_eq!(s.scrub_repaired - b0.scrub_repaired, 3, "node {id}: {s:?}");
        assert_eq!(s.corrupt_found - b0.corrupt_found, 3, "node {id}: {s:?}");
        assert_eq!(
            s.repairs_installed - b0.repairs_installed,
            3,
            "node {id}: {s:?}"
        );
    }
    for (s, want) in flipped.iter().zip(&a_before) {
        assert!(
            tc.slot_bytes(a, *s) == *want,
            "node {a} stripe {s} not restored"
        );
    }
    assert!(
        tc.slot_bytes(a, stale) == current,
        "node {a}: the stale block was not brought up to date"
    );
    assert!(
        tc.slot_bytes(b, parity) == b_parity,
        "node {b}: parity not restored"
    );
    for (s, want) in torn.iter().zip(&b_torn) {
        assert!(
            tc.slot_bytes(b, *s) == *want,
            "node {b}: torn stripe {s} not restored"
        );
    }
    let log = std::fs::read_to_string(tc.local.log_path(a)).expect("node log");
    assert!(
        log.contains("scrub pass done: corruption found"),
        "node {a} logged no finding"
    );

    // The repaired blocks are needed to decode once two other nodes are gone.
    for o in [0, 3] {
        tc.kill(o);
    }
    verify(c, &data, "repaired nodes with nodes 0 and 3 dead").await;
    for o in [0, 3] {
        tc.restart(o);
    }
    tc.wait_up(&[0, 3]).await;
    assert_scrub_clean(c, "after the scrubber's repairs").await;
}

/// A tmpfs mounted on `at` (emptied first), `size` bytes; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: u64) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .expect("run cp");
    assert!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fills the file system of `dir` with a file until it is full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    let chunk = vec![0xA5u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

/// Goal: a node whose disk fills up refuses the writes it cannot log, with a reason
/// (ENOSPC) in its log; writers see success only for writes enough other members
/// hold durably; no reader ever gets a wrong byte; once space is back, the node
/// catches up on what it missed, and its blocks are then needed and right.
///
/// Method: node 3's data directory moved onto a tmpfs just large enough, node
/// restarted on it; the tmpfs filled with a filler file. Every block then
/// overwritten (partly) through a client: every write must succeed (min_write = k,
/// five other members); reads verify every block. Node 3's log names the full disk
/// and its stats show no update applied meanwhile. The filler removed, node 3 must
/// bring its blocks up to date (stuck-update rebuilds and periodic comparison), after
/// which, with nodes 0 and 5 SIGKILLed, every block reads back as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_the_node_catches_up_after() {
    let tc = TestCluster::start("fulldisk").await;
    let c = &tc.client;
    let mut data = random_blocks(41, c.blocks());
    write_all(c, &data).await;
    let victim: NodeId = 3;
    let data_dir = tc.local.dir.join(format!("node-{victim}")).join("data");
    tc.terminate(victim).await;
    let saved = tc.local.dir.join("node-3-saved");
    std::fs::rename(&data_dir, &saved).expect("move the data aside");
    let used: u64 = walk_size(&saved);
    let _fs = Tmpfs::mount(&data_dir, used + (4 << 20));
    copy_dir(&saved, &data_dir);
    tc.restart(victim);
    tc.wait_up(&[victim]).await;
    let before = tc.info(victim).await.stats;
    let filler = fill(&data_dir);

    for (lba, block) in data.iter_mut().enumerate() {
        let patch = bytes(1000 + lba as u64, BS / 2);
        block[..BS / 2].copy_from_slice(&patch);
        c.write(lba as u64, 0, &patch)
            .await
            .unwrap_or_else(|e| panic!("write {lba} with node {victim}'s disk full: {e}"));
    }
    verify(c, &data, "node 3's disk full").await;
    let during = tc.info(victim).await.stats;
    assert_eq!(
        during.updates, before.updates,
        "node {victim} counted updates it could not log"
    );
    let log = std::fs::read_to_string(tc.local.log_path(victim)).expect("node log");
    assert!(
        log.contains("No space left on device") || log.contains("no space"),
        "node {victim}'s log does not name the full disk"
    );

    std::fs::remove_file(&filler).expect("remove the filler");
    // Node 3 knows of the versions it missed (every unlock told it): it rebuilds them.
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let s = tc.info(victim).await.stats;
        let geo = c.geometry();
        let behind = (0..geo.stripes())
            .filter(|st| {
                let p = geo.position_of(*st, victim).expect("member");
                let slot = tc.slot_bytes(victim, *st);
                p < geo.k && slot != data[geo.lba(*st, p) as usize]
            })
            .count();
        if behind == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "node {victim} still has {behind} data blocks behind: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for o in [0, 5] {
        tc.kill(o);
    }
    verify(c, &data, "node 3 caught up, nodes 0 and 5 dead").await;
    for o in [0, 5] {
        tc.restart(o);
    }
    tc.wait_up(&[0, 5]).await;
    assert_scrub_clean(c, "after the full disk").await;
}

fn walk_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() {
            walk_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}
