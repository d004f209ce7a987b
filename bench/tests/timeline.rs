//! `bench timeline` end to end on a real local cluster (library runs; no timing
//! assertions): a node SIGKILLed, and a node replaced by an empty one, each run
//! writing its CSV, charts and summary row with every byte checked and no error.

use std::process::Command;

#[test]
fn kill_and_replace_runs_write_their_timelines() {
    let out = tempfile::tempdir().unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "timeline",
            "--seconds",
            "4",
            "--size",
            "8MiB",
            "--scenario",
            "kill-1,replace",
            "--workload",
            "seq-write",
            "--out",
        ])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(st.success(), "bench timeline failed: {st}");
    let read = |f: &str| {
        std::fs::read_to_string(out.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let kill = read("drs-4-2_kill-1_seq-write-1m.csv");
    assert!(kill.starts_with("t_s,interval_s,mib_per_s,ops_per_s,errors,event\n"));
    assert!(kill.contains("SIGKILL node 1"), "{kill}");
    let replace = read("drs-4-2_replace_seq-write-1m.csv");
    assert!(replace.contains("SIGKILL node 1"), "{replace}");
    assert!(
        replace.contains("replace node 1 by an empty node"),
        "{replace}"
    );
    // Samples every 200 ms over 4 s, with throughput in them.
    let rows: Vec<&str> = kill.lines().skip(1).collect();
    assert!(rows.len() >= 15, "{} samples", rows.len());
    assert!(rows
        .iter()
        .any(|r| r.split(',').nth(2).and_then(|v| v.parse::<f64>().ok()) > Some(0.0)));
    for stem in [
        "drs-4-2_kill-1_seq-write-1m",
        "drs-4-2_replace_seq-write-1m",
    ] {
        assert!(read(&format!("{stem}.svg")).starts_with("<svg"));
        let png = std::fs::read(out.path().join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
    }
    let summary = read("summary.md");
    for scenario in ["kill-1", "replace"] {
        let row = summary
            .lines()
            .find(|l| l.starts_with(&format!("| DRS 4+2 | {scenario} | seq-write-1m |")))
            .unwrap_or_else(|| panic!("no {scenario} row in:\n{summary}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[11], "0", "errors in {row}");
    }
}
