//! A node's configuration file and environment overrides (`node-serve`, the same
//! options as `drs-server`).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{drs, eventually, s, Cluster, CLI};
use crate::metrics::{sample, scrape};

/// Goal: a node runs from a TOML config file, environment variables override the
/// file, and a bad file gets one clear line and a non-zero exit.
///
/// Method: a 4+2 cluster; node 2 SIGKILLed, then started again by hand with
/// `node-serve --config node-2.toml`, the file naming the cluster, the node, a
/// metrics address and `scrub_every_s = 0` (no scrubbing), and the environment
/// setting `DRS_SCRUB_EVERY_S=1`: the node comes up (status healthy), serves metrics
/// where the file says, and completes scrub passes, so the environment won over the
/// file. A file with an unknown key, one with a wrong type, and no cluster at all
/// each fail with a message naming the problem.
#[test]
fn a_node_runs_from_a_config_file_with_environment_overrides() {
    let c = Cluster::up(64);
    let metrics = format!("127.0.0.1:{}", crate::harness::free_port());
    c.node("kill", 2).ok();
    let conf = c.dir.join("node-2.toml");
    std::fs::write(
        &conf,
        format!(
            "# node 2\ncluster = \"{}\"\nnode = 2\nsettle_ms = 200\nmetrics = \"{metrics}\"\nscrub_every_s = 0\nscrub_rate_mib = 0\n",
            c.file.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(c.dir.join("node-2-by-hand.log")).unwrap();
    let mut child = Command::new(CLI)
        .args(["node-serve", "--config", s(&conf)])
        .env("DRS_SCRUB_EVERY_S", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    c.wait_all_up(Duration::from_secs(60));
    let mut body = String::new();
    let scrubbed = eventually(Duration::from_secs(30), || {
        body = scrape(&metrics).1;
        sample(&body, "drs_scrub_passes_total").is_some_and(|p| p >= 1.0)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        scrubbed,
        "the environment did not override the file: {body}"
    );
    assert_eq!(sample(&body, "drs_node_up"), Some(1.0), "{body}");

    let bad = c.dir.join("bad.toml");
    for (text, needles) in [
        (
            "node = 2\ncolour = \"blue\"\n",
            vec!["bad.toml", "unknown field", "colour", "line 2"],
        ),
        ("node = \"two\"\n", vec!["bad.toml", "line 1"]),
        ("node = 2\n", vec!["no cluster file"]),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = drs(&["node-serve", "--config", s(&bad)]).run();
        assert_eq!(out.code, Some(1), "{out}");
        let msg = out.stderr.trim_end();
        assert_eq!(msg.lines().count(), 1, "{out}");
        assert!(msg.starts_with("drs-server: "), "{out}");
        for n in needles {
            assert!(msg.contains(n), "{n:?} missing: {out}");
        }
    }
}
