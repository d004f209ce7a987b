//! `node stop|cont|kill|start` with reads, writes, `status` and `scrub` around them.

use std::time::Duration;

use crate::harness::{alive, assert_same_bytes, data, drs, eventually, Cluster, Model};

const BS: usize = 4096;

/// Goal: the cluster serves correct bytes through node failures and comes back whole:
/// a SIGSTOPped node does not stop reads; with 2 nodes SIGKILLed, reads return the
/// right bytes, writes still succeed, `status` exits 2 (documented in
/// drs-cli/src/status.rs: "exits 0 when every node is up and every stripe healthy, 2
/// when the cluster is degraded") showing them DOWN and listing degraded stripes, and
/// `scrub` reports stripes degraded but exits 0; after `node start` of both, they
/// rejoin (after the 6 s settle period), rebuild what they missed, `scrub` says every
/// stripe is healthy, and every byte reads back.
///
/// Method: a 256-block cluster; data on stripes 0..8 mirrored in a model; `node stop
/// 0` / read / `node cont 0`; `node kill 1`, `node kill 2` (their pids must be gone);
/// read, write, status (text and JSON), scrub; `node start 1`, `node start 2`; poll
/// `status --json` until all up (60 s at most); scrub; read everything back.
#[test]
fn kill_stop_cont_start() {
    let c = Cluster::up(256);
    let mut model = Model::new(BS);
    let a = data(10, 32 * BS);
    c.write(0, &a).ok();
    model.write(0, &a);

    // A hung node: reads go around it (hedged), quickly.
    c.node("stop", 0).ok();
    let out = c.read(0, 32).ok();
    assert_same_bytes(&out.stdout, &model.expect(0, 32), BS, 0);
    assert!(
        out.elapsed < Duration::from_secs(4),
        "a read waited for the stopped node: {out}"
    );
    c.node("cont", 0).ok();
    // It notices the pause on its next 100 ms tick and re-verifies before serving.
    std::thread::sleep(Duration::from_millis(500));
    c.wait_all_up(Duration::from_secs(30));

    // Two nodes dead.
    let pids = c.pids();
    for id in [1, 2] {
        c.node("kill", id).ok();
        let pid = pids.iter().find(|p| p.0 == id).expect("pid").1;
        // `node kill` returns without waiting for the process to end (see
        // cluster::cluster_down_waits_for_its_nodes): allow it a moment.
        assert!(
            eventually(Duration::from_secs(5), || !alive(pid)),
            "node {id} (pid {pid}) still running 5 s after kill"
        );
    }
    let out = c.read_degraded(0, 32).ok();
    assert_same_bytes(&out.stdout, &model.expect(0, 32), BS, 0);

    // Writes still succeed (4 of 6 members, min_write 4); the dead nodes miss them.
    let b = data(11, 6 * BS + 17);
    c.write(5, &b).ok();
    model.write(5, &b);
    let out = c.read_degraded(0, 32).ok();
    assert_same_bytes(&out.stdout, &model.expect(0, 32), BS, 0);

    let out = c.status().code(2);
    let text = out.text();
    for id in [1, 2] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{id} ")) && l.contains("DOWN")),
            "node {id} not DOWN: {out}"
        );
    }
    assert!(
        text.contains("stripes: 64 total, 0 healthy, 64 degraded"),
        "{out}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("  stripe 0: ")
            && l.contains("node 1 not answering")
            && l.contains("node 2 not answering")),
        "{out}"
    );
    assert!(text.contains("... and 14 more"), "{out}");
    let (code, v) = c.status_json();
    assert_eq!(code, Some(2));
    let states: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["up", "down", "down", "up", "up", "up"], "{v:#}");
    assert_eq!(v["stripes"]["degraded"], 64, "{v:#}");
    assert_eq!(
        v["stripes"]["degraded_list"].as_array().map(Vec::len),
        Some(50),
        "{v:#}"
    );

    // Scrub with 2 members down: nothing lost, so exit 0; every stripe is reported
    // degraded (counted per stripe), naming the unreachable members.
    let out = c.scrub(&[]).ok();
    let text = out.text();
    assert!(
        text.starts_with("scrub: 64 stripes checked (")
            && text.contains(": 0 healthy, 0 repaired, 0 found (not repaired), ")
            && text.contains(" 64 degraded (not fully checked), 0 unrecoverable"),
        "{out}"
    );
    assert!(
        text.contains("  degraded: stripe 0 position 1 (node 1): not checked, member unreachable")
            && text.contains(
                "  degraded: stripe 0 position 2 (node 2): not checked, member unreachable"
            ),
        "{out}"
    );

    // Back up.
    for id in [1, 2] {
        let out = c.node("start", id).ok();
        assert!(out.text().contains(&format!("node {id} started")), "{out}");
    }
    let v = c.wait_all_up(Duration::from_secs(60));
    assert_eq!(v["stripes"]["healthy"], 64, "{v:#}");
    let out = c.scrub(&[]).ok();
    assert!(
        out.text().starts_with(
            "scrub: 64 stripes checked (1.5 MiB read): 64 healthy, 0 repaired, 0 found (not repaired), 0 degraded (not fully checked), 0 unrecoverable"
        ),
        "{out}"
    );
    let out = c.read(0, 256).ok();
    assert_same_bytes(&out.stdout, &model.expect(0, 256), BS, 0);
    // The restarted nodes hold what they missed: kill two others, read again.
    for id in [4, 5] {
        c.node("kill", id).ok();
    }
    let out = c.read_degraded(0, 32).ok();
    assert_same_bytes(&out.stdout, &model.expect(0, 32), BS, 0);
}

/// Goal: with m = 2 nodes dead, a read waits for the block's own node when that node
/// is merely slow (here paused for 1 s, well within the 5 s request deadline) instead
/// of failing as soon as the three other live members have answered.
///
/// Method: write block 0 (stripe 0, position 0); `node kill` the nodes at positions 1
/// and 2; `node stop` the block's own node; start `block read 0`; after 1 s `node
/// cont` the node; the read must return the written bytes.
#[test]
fn degraded_read_waits_for_a_slow_block_owner() {
    let c = Cluster::up(256);
    let placement = c.placement();
    let d = data(30, BS);
    c.write(0, &d).ok();
    c.node("kill", placement[1]).ok();
    c.node("kill", placement[2]).ok();
    c.node("stop", placement[0]).ok();
    let reader = {
        let f = c.f().to_string();
        std::thread::spawn(move || drs(&["block", "read", "--cluster", &f, "0"]).run())
    };
    std::thread::sleep(Duration::from_secs(1));
    c.node("cont", placement[0]).ok();
    let out = reader.join().unwrap();
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout == d, "wrong bytes");
}

/// Goal: `node replace` puts a new, empty node in a dead node's place and waits, with
/// its rate limit, until the rebuild is done and the metadata service says it is up,
/// printing progress lines with an ETA when stderr is not a terminal; meanwhile
/// `status --json` shows the node's progress and reads and writes are served; the
/// data then reads back exactly with two other nodes killed. `node add` joins a new
/// node to the map, `node remove` takes it out again, and removing a node that holds
/// blocks is refused with one clear line.
///
/// Method: the whole volume written (the node holds 64 blocks of 4 KiB), then
/// replaced at `--rate 0.05` (MiB/s): the rebuild must take at least 4 s (63 paced
/// blocks at 52 KB/s: 4.9 s; without the limit it takes well under a second).
#[test]
fn replace_add_remove() {
    let c = Cluster::up(256);
    let mut d = data(41, 256 * BS);
    c.write(0, &d).ok();
    c.node("kill", 3).ok();
    let (out, progress) = std::thread::scope(|s| {
        let replace = s.spawn(|| {
            c.cmd(&["node", "replace"], &["3", "--rate", "0.05"])
                .deadline(Duration::from_secs(120))
                .run()
        });
        let mut progress = None;
        while !replace.is_finished() {
            let (_, st) = c.status_json();
            let n3 = st["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["id"] == 3))
                .cloned();
            if let Some(r) = n3.map(|n| n["recovery"].clone()).filter(|r| !r.is_null()) {
                if r["verified"].as_u64() < r["total"].as_u64() {
                    progress.get_or_insert(r);
                }
            }
            // Foreground reads and writes go on during the rebuild.
            if progress.is_some() {
                let back = c.read(0, 256).ok();
                assert!(back.stdout == d, "a read during the rebuild");
                let patch = data(42, BS);
                c.write(7, &patch).ok();
                d[7 * BS..8 * BS].copy_from_slice(&patch);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        (replace.join().expect("replace thread"), progress)
    });
    let out = out.ok();
    assert!(out.text().contains("rebuilt and up"), "{out}");
    let secs: f64 = out
        .text()
        .split("rebuilt and up after ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no rebuild time in {out}"));
    assert!(
        secs >= 4.0,
        "the rate limit held the rebuild back: {secs} s\n{out}"
    );
    assert!(
        out.stderr.lines().any(|l| l.starts_with("rebuild: ")
            && l.contains("blocks verified")
            && l.contains("eta")),
        "progress lines on stderr: {out}"
    );
    let progress = progress.expect("status --json showed the rebuild's progress");
    assert!(
        progress["total"].as_u64().unwrap_or(0) >= 64,
        "the node's blocks counted: {progress}"
    );
    assert!(
        c.node_dir(3).join("data.replaced-1").exists(),
        "old data kept aside"
    );
    let (_, st) = c.status_json();
    let n3 = st["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["id"] == 3))
        .cloned()
        .expect("node 3 in status");
    assert_eq!(n3["map_state"], "up", "{st}");
    assert!(n3["map_incarnation"].as_u64().unwrap_or(0) >= 3, "{st}");

    let out = c.cmd(&["node", "add"], &["9"]).run().ok();
    assert!(out.text().contains("node 9 added"), "{out}");
    assert!(
        eventually(Duration::from_secs(20), || {
            let (_, st) = c.status_json();
            st["nodes"]
                .as_array()
                .is_some_and(|ns| ns.iter().any(|n| n["id"] == 9 && n["map_state"] == "up"))
        }),
        "added node never up in the map"
    );
    c.cmd(&["node", "remove"], &["9"]).run().ok();
    let (_, st) = c.status_json();
    assert!(
        st["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().all(|n| n["id"] != 9)),
        "{st}"
    );
    let out = c.cmd(&["node", "remove"], &["1"]).run().code(1);
    crate::harness::assert_clean_error(&out, &["remove node 1", "NodeInUse"]);

    c.node("kill", 1).ok();
    c.node("kill", 2).ok();
    let back = c.read_degraded(0, 256).ok();
    assert!(
        back.stdout == d,
        "data after the replacement, with nodes 1 and 2 dead"
    );
}

/// Goal: `meta add` and `meta remove` change the metadata service's Raft membership:
/// a replica added on a node that hosts none joins (status lists it answering, as a
/// follower or the leader); `meta add` again on that node finishes or repeats the
/// addition (changing nothing); removing the Raft leader leaves a service that elects
/// another leader and still marks nodes down; data stays readable.
#[test]
fn meta_add_remove() {
    let (c, _) = Cluster::start(&["--blocks", "256", "--block-size", "4KiB", "--meta", "3"]);
    let d = data(43, 8 * BS);
    c.write(0, &d).ok();
    let out = c.cmd(&["meta", "add"], &["--node", "4"]).run().ok();
    assert!(out.text().contains("metadata replica 4 added"), "{out}");
    let replicas = |st: &serde_json::Value| -> Vec<(u64, String)> {
        st["meta"]["replicas"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        (
                            r["id"].as_u64().unwrap_or(0),
                            r["role"].as_str().unwrap_or("none").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(20), || {
            let (_, st) = c.status_json();
            let rs = replicas(&st);
            rs.len() == 4
                && rs
                    .iter()
                    .all(|(_, role)| role == "leader" || role == "follower")
                && st["meta"]["voters"] == serde_json::json!([1, 2, 3, 4])
        }),
        "replica 4 never joined: {}",
        c.status_json().1["meta"]
    );
    let out = c.cmd(&["meta", "add"], &["--node", "4"]).run().ok();
    assert!(out.text().contains("metadata replica 4 added"), "{out}");
    assert_eq!(
        c.status_json().1["meta"]["voters"],
        serde_json::json!([1, 2, 3, 4]),
        "adding the same replica again changed the voters"
    );
    let leader = c.status_json().1["meta"]["leader"]
        .as_u64()
        .expect("a leader");
    c.cmd(&["meta", "remove"], &[&leader.to_string()])
        .run()
        .ok();
    let rest: Vec<u64> = (1..=4).filter(|id| *id != leader).collect();
    assert!(
        eventually(Duration::from_secs(20), || {
            let (_, st) = c.status_json();
            let rs = replicas(&st);
            rs.len() == 3
                && rs.iter().all(|(id, _)| *id != leader)
                && st["meta"]["leader"].as_u64().is_some_and(|l| l != leader)
                && st["meta"]["voters"] == serde_json::json!(rest)
        }),
        "the leader, replica {leader}, not removed: {}",
        c.status_json().1["meta"]
    );
    // The smaller service still works: it marks a killed node down.
    c.node("kill", 5).ok();
    assert!(
        eventually(Duration::from_secs(20), || {
            let (_, st) = c.status_json();
            st["nodes"]
                .as_array()
                .is_some_and(|ns| ns.iter().any(|n| n["id"] == 5 && n["map_state"] == "down"))
        }),
        "node 5 never marked down after the membership changes"
    );
    assert!(c.read(0, 8).ok().stdout == d);
}
