//! Cache groups (report 5.3.3, 5.5): a writer whose write-back cache keeps copies of
//! its unflushed changes at two nodes is SIGKILLed mid-workload; every write it had
//! acknowledged must be on the volume once the group wrote its cache back, and its
//! locks must be free within seconds.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{eventually, s, Cluster, CLI};

/// Acknowledged writes in a load journal.
fn acks(journal: &std::path::Path) -> usize {
    std::fs::read_to_string(journal)
        .map(|j| j.lines().filter(|l| l.starts_with("A ")).count())
        .unwrap_or(0)
}

/// Starts `drs-cli load` with `extra` in the background, writing a journal; SIGKILLs
/// it once it has acknowledged some writes. Returns the journal.
fn load_then_kill(c: &Cluster, extra: &[&str]) -> std::path::PathBuf {
    let journal = c.dir.join("journal");
    let mut args = vec![
        "load",
        "--cluster",
        c.f(),
        "--clients",
        "3",
        "--duration",
        "120",
        "--blocks",
        "64",
        "--write-ratio",
        "0.8",
        "--journal",
        s(&journal),
    ];
    args.extend_from_slice(extra);
    let mut child = Command::new(CLI)
        .args(&args)
        .env("DRS_LEASE_MS", "1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn drs-cli load");
    let started = Instant::now();
    let busy = eventually(Duration::from_secs(60), || acks(&journal) >= 300);
    child.kill().expect("SIGKILL the load");
    let _ = child.wait();
    assert!(
        busy,
        "the load acknowledged only {} writes in {:?}",
        acks(&journal),
        started.elapsed()
    );
    journal
}

fn locks_free(c: &Cluster) -> bool {
    let out = c.cmd(&["locks"], &["--json"]).run().ok();
    out.json().as_array().is_some_and(|a| a.is_empty())
}

fn written_back(c: &Cluster) -> u64 {
    let (_, st) = c.status_json();
    st["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["stats"]["cache_blocks_written_back"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_cache_group_keeps_every_acknowledged_write_of_a_killed_writer() {
    let c = Cluster::up(256);
    let journal = load_then_kill(&c, &["--cache-group", "2", "--flush-every", "16"]);
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(20), || locks_free(&c)),
        "the killed writer's locks are still held after {:?}",
        killed.elapsed()
    );
    let freed = killed.elapsed();
    // The lease (1 s), then the group writes back and the stripes' nodes release the
    // locks as soon as the group holds no copy any more, not after their longest wait.
    assert!(
        freed < Duration::from_secs(5),
        "locks free only after {freed:?}"
    );
    assert!(
        written_back(&c) > 0,
        "no node wrote a cached block back (the writer had nothing unflushed?)"
    );
    let out = c
        .cmd(
            &["load"],
            &["--blocks", "64", "--check-journal", s(&journal)],
        )
        .run();
    assert_eq!(
        out.code,
        Some(0),
        "acknowledged writes lost ({} acknowledged, locks free after {freed:?}): {out}",
        acks(&journal)
    );
    assert!(out.text().contains("no failure"), "{out}");
    let scrub = c.scrub(&[]).ok();
    assert!(scrub.text().contains("0 unrecoverable"), "{scrub}");
}

#[test]
fn without_a_group_the_check_sees_unflushed_writes_die() {
    // The check this file relies on can fail: the same kill with a cache and no group
    // loses the writes that were acknowledged into the cache and never flushed.
    let c = Cluster::up(256);
    let journal = load_then_kill(&c, &["--cache", "--flush-every", "64"]);
    assert!(eventually(Duration::from_secs(20), || locks_free(&c)));
    let out = c
        .cmd(
            &["load"],
            &["--blocks", "64", "--check-journal", s(&journal)],
        )
        .run();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.text().contains("VERIFICATION FAILED"), "{out}");
}
