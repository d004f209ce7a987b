//! The `drs-fuse` binary's command line: usage errors and a missing cluster file
//! give one clear line and a non-zero status, before anything is mounted. Its
//! mounts are tested with real clusters in tests/cli/fuse.rs, which runs the binary
//! that cargo builds for this test (so `cargo test --workspace` builds it).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_drs-fuse");

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let out = Command::new(BIN).arg("mount").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cluster"), "{err}");

    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("drs-fuse "));
}

#[test]
fn a_missing_cluster_file_is_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let out = Command::new(BIN)
        .arg("mount")
        .arg("--cluster")
        .arg(&missing)
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("drs-fuse:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("nowhere.toml"), "{err}");
}
