//! `cluster up`, `status`, `cluster down`.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{alive, drs, eventually, kill_leftovers, processes_mentioning, s, Cluster};

/// Goal: `cluster up` starts a 6-node 4+2 cluster and describes it; `status` (text and
/// JSON) shows every node up and every stripe healthy; `cluster down` stops every node;
/// `status` of a stopped cluster exits 2 with every node DOWN.
///
/// Method: real processes in a temporary directory; node pids from `node-*/pid`; after
/// `cluster down`, the pids must be gone (not running, or zombies of an exited
/// parent) within 5 s, and no process may mention the directory. (Not immediately:
/// `cluster_down_waits_for_its_nodes` shows why.)
#[test]
fn up_status_down() {
    let (c, out) = Cluster::start(&[
        "--nodes",
        "6",
        "-k",
        "4",
        "-m",
        "2",
        "--block-size",
        "4KiB",
        "--blocks",
        "256",
    ]);
    let text = out.text();
    assert!(text.contains("is up: 6 nodes, 4+2 stripes"), "{out}");
    assert!(
        text.contains("volume 1: 256 blocks of 4.0 KiB (1.0 MiB of data), writes need 4 nodes"),
        "{out}"
    );
    for id in 0..6 {
        let node_line = format!("  node {id}  127.0.0.1:");
        assert!(
            text.lines().any(|l| l.starts_with(&node_line)),
            "no line for node {id}: {out}"
        );
    }
    assert!(
        text.contains(&format!("cluster file: {}", c.file.display())),
        "{out}"
    );
    assert!(c.file.is_file(), "no {}", c.file.display());

    let pids = c.pids();
    assert_eq!(
        pids.iter().map(|p| p.0).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>(),
        "pid files"
    );
    for &(id, pid) in &pids {
        assert!(alive(pid), "node {id} (pid {pid}) is not running after up");
    }

    // Text status: six rows "id address up ...", the stripe summary, exit 0.
    let out = c.status().ok();
    let text = out.text();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.first().is_some_and(|t| t.parse::<u32>().is_ok()))
        .collect();
    assert_eq!(rows.len(), 6, "node rows: {out}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[0], i.to_string(), "{out}");
        assert!(r[1].starts_with("127.0.0.1:"), "{out}");
        assert_eq!(r[2], "up", "{out}");
    }
    assert!(
        text.contains("stripes: 64 total, 64 healthy, 0 degraded"),
        "{out}"
    );
    assert!(!text.contains("DOWN"), "{out}");

    // JSON status.
    let (code, v) = c.status_json();
    assert_eq!(code, Some(0), "{v:#}");
    let nodes = v["nodes"].as_array().expect("nodes array");
    assert_eq!(nodes.len(), 6, "{v:#}");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["id"], i, "{v:#}");
        assert_eq!(n["state"], "up", "{v:#}");
    }
    assert_eq!(v["stripes"]["total"], 64, "{v:#}");
    assert_eq!(v["stripes"]["healthy"], v["stripes"]["total"], "{v:#}");
    assert_eq!(v["stripes"]["degraded"], 0, "{v:#}");
    let vol = &v["volume"];
    assert_eq!(
        (
            &vol["k"],
            &vol["m"],
            &vol["block_size"],
            &vol["blocks"],
            &vol["min_write"]
        ),
        (&4.into(), &2.into(), &4096.into(), &256.into(), &4.into()),
        "{v:#}"
    );

    // Down.
    let out = drs(&["cluster", "down", "--dir", s(&c.dir)]).run().ok();
    assert!(
        out.text()
            .contains(&format!("cluster in {} stopped", c.dir.display())),
        "{out}"
    );
    assert!(
        eventually(Duration::from_secs(5), || pids
            .iter()
            .all(|&(_, p)| !alive(p))),
        "nodes still running 5 s after down: {:?}",
        pids.iter().filter(|p| alive(p.1)).collect::<Vec<_>>()
    );
    assert_eq!(processes_mentioning(&c.dir), Vec::<u32>::new());

    // Status of a stopped cluster: every node DOWN, exit 2, quickly (refused connects).
    let out = c.status().code(2);
    assert!(out.elapsed < Duration::from_secs(15), "{out}");
    assert_eq!(out.text().matches(" DOWN (").count(), 6, "{out}");
    assert!(
        out.text()
            .contains("stripes: 64 total, 0 healthy, 64 degraded"),
        "{out}"
    );
}

/// Goal: `cluster down` returns only once every node has exited, SIGKILLing (after its
/// 10 s grace) a node that does not exit on SIGTERM, as `LocalCluster::down` documents.
///
/// Method: start a cluster; replace node 5 with a stand-in for a wedged node (a shell
/// that ignores SIGTERM, registered in `node-5/pid`); run `cluster down`; right after it
/// returns, no node pid and not the stand-in may still run.
#[test]
fn cluster_down_waits_for_its_nodes() {
    let c = Cluster::up(256);
    let pids = c.pids();
    c.node("kill", 5).ok();
    let mut stub = Command::new("sh")
        .args(["-c", "trap '' TERM; exec sleep 120"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let stub_pid = stub.id();
    // Wait for the exec, so SIGTERM is already ignored.
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read(format!("/proc/{stub_pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep"))
    }));
    std::fs::write(c.node_dir(5).join("pid"), stub_pid.to_string()).unwrap();

    drs(&["cluster", "down", "--dir", s(&c.dir)])
        .deadline(Duration::from_secs(40))
        .run()
        .ok();
    let mut problems = Vec::new();
    for &(id, pid) in pids.iter().filter(|p| p.0 != 5) {
        if alive(pid) {
            problems.push(format!(
                "node {id} (pid {pid}) still running when `cluster down` returned"
            ));
        }
    }
    if alive(stub_pid) {
        problems.push(format!(
            "node 5 (pid {stub_pid}, ignores SIGTERM) still running: never SIGKILLed"
        ));
    }
    let _ = stub.kill();
    let _ = stub.wait();
    kill_leftovers(&c.dir);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Goal: a `cluster up` that fails part-way (here node 3 cannot open its log) stops the
/// nodes it already started, and says which node failed, in one line.
///
/// Method: make `DIR/node-3/log` a directory before `cluster up --dir DIR`; expect a
/// clean one-line error naming the log, and no node process left afterwards.
#[test]
fn failed_up_leaves_no_nodes_running() {
    let c = Cluster::new();
    std::fs::create_dir_all(c.node_dir(3).join("log")).unwrap();
    let out = c.up_with(&["--block-size", "4KiB", "--blocks", "256"]);
    crate::harness::assert_clean_error(&out, &["node-3/log"]);
    let left = processes_mentioning(&c.dir);
    assert!(
        left.is_empty(),
        "node processes left running after a failed `cluster up`: {left:?}"
    );
}

/// Goal: `cluster up` writes a client locator (`client.toml`) beside the cluster file
/// that names only the metadata service, and every client command works with it:
/// the live map (nodes, volumes, epoch) comes from the service.
#[test]
fn clients_find_the_cluster_through_the_locator() {
    let (c, out) = Cluster::start(&["--blocks", "256", "--block-size", "4KiB"]);
    let locator = c.dir.join("client.toml");
    assert!(out.text().contains("client.toml"), "{out}");
    let text = std::fs::read_to_string(&locator).expect("client.toml written");
    assert!(text.contains("[[meta]]"), "{text}");
    assert!(
        !text.contains("volumes") && !text.contains("[[nodes]]"),
        "{text}"
    );
    let l = s(&locator);
    let d = crate::harness::data(77, 4096 * 2);
    drs(&["block", "write", "--cluster", l, "5"])
        .stdin(&d)
        .run()
        .ok();
    let back = drs(&["block", "read", "--cluster", l, "5", "--count", "2"])
        .run()
        .ok();
    assert!(back.stdout == d, "bytes read through the locator differ");
    // Exit 0 or 2 (a node may be briefly recovering on a loaded machine): either way
    // the JSON describes the live cluster.
    let out = drs(&["status", "--cluster", l, "--json"]).run();
    assert!(matches!(out.code, Some(0 | 2)), "{out}");
    let st = out.json();
    assert_eq!(st["volume"]["k"], 4, "{st}");
    assert_eq!(st["nodes"].as_array().map(|n| n.len()), Some(6), "{st}");
    assert!(
        st["epoch"].as_u64().unwrap_or(0) > 1,
        "the live epoch, not the file's: {st}"
    );
}
