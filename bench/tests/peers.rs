//! `bench timeline --fs --gluster` end to end (no timing assertions): DRS through
//! its FUSE mount driven by fio, beside a GlusterFS dispersed volume (its own
//! glusterd, 6 bricks, redundancy 2), bindfs over a local directory and the local
//! directory itself, with a node (brick) SIGKILLed; then nothing the harness
//! started is left running or mounted.
//!
//! It needs fio, bindfs and GlusterFS (Debian: `apt-get install fio bindfs
//! glusterfs-server glusterfs-client`), root and /dev/fuse. Without them it says so
//! and passes, unless `DRS_BENCH_PEERS=1` (set by `.ci/run`, which installs them):
//! then their absence fails it.

use std::path::Path;
use std::process::Command;

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Process ids of running processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .filter(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&*dir)))
        .map(str::to_string)
        .collect()
}

#[test]
fn drs_fuse_glusterfs_bindfs_and_local_run_side_by_side_and_leave_nothing() {
    let missing: Vec<&str> = ["fio", "bindfs", "glusterd", "gluster", "glusterfs"]
        .into_iter()
        .filter(|t| !installed(t))
        .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("DRS_BENCH_PEERS").is_none(),
            "DRS_BENCH_PEERS is set but these are not installed: {missing:?}"
        );
        eprintln!("skipped: not installed: {missing:?} (see bench/README.md)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "timeline",
            "--fs",
            "--gluster",
            "--seconds",
            "4",
            "--size",
            "32MiB",
            "--scenario",
            "healthy,kill-1",
            "--workload",
            "seq-write",
            "--out",
        ])
        .arg(out.path())
        .arg("--dir")
        .arg(work.path())
        .status()
        .unwrap();
    let read = |f: &str| {
        std::fs::read_to_string(out.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    assert!(
        st.success(),
        "bench timeline failed: {st}; summary:\n{}",
        std::fs::read_to_string(out.path().join("summary.md")).unwrap_or_default()
    );
    // Every system ran, with throughput, and the kills landed in both clusters.
    for stem in [
        "drs-4-2-fuse_healthy_seq-write-1m",
        "glusterfs-4-2_healthy_seq-write-1m",
        "bindfs-over-local_healthy_seq-write-1m",
        "local-directory_healthy_seq-write-1m",
        "drs-4-2-fuse_kill-1_seq-write-1m",
        "glusterfs-4-2_kill-1_seq-write-1m",
    ] {
        let csv = read(&format!("{stem}.csv"));
        assert!(csv.starts_with("t_s,interval_s,mib_per_s,ops_per_s,errors,event\n"));
        assert!(
            csv.lines()
                .skip(1)
                .any(|r| r.split(',').nth(2).and_then(|v| v.parse::<f64>().ok()) > Some(0.0)),
            "no throughput in {stem}:\n{csv}"
        );
        if stem.contains("kill-1") {
            assert!(csv.contains("SIGKILL"), "no kill in {stem}:\n{csv}");
        }
    }
    let summary = read("summary.md");
    for (system, scenario) in [
        ("DRS 4+2 FUSE", "healthy"),
        ("GlusterFS 4+2", "healthy"),
        ("bindfs over local", "healthy"),
        ("local directory", "healthy"),
        ("DRS 4+2 FUSE", "kill-1"),
        ("GlusterFS 4+2", "kill-1"),
    ] {
        let row = summary
            .lines()
            .find(|l| l.starts_with(&format!("| {system} | {scenario} | seq-write-1m |")))
            .unwrap_or_else(|| panic!("no {system} {scenario} row in:\n{summary}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[11], "0", "errors in {row}");
    }
    // The ratios table sets DRS's mount beside each peer.
    for peer in ["GlusterFS 4+2", "bindfs over local", "local directory"] {
        let row = format!("| healthy | seq-write-1m | MiB/s | DRS 4+2 FUSE | {peer} |");
        assert!(
            summary.contains(&row),
            "no {row} in:
{summary}"
        );
    }
    // Torn down: no mount under the work directory, no process of its clusters.
    assert!(
        mounts_under(work.path()).is_empty(),
        "{:?}",
        mounts_under(work.path())
    );
    let left = processes_mentioning(&work.path().to_string_lossy());
    assert!(left.is_empty(), "left running: {left:#?}");
}
