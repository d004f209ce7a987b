//! Authentication: `cluster up` creates the cluster key; a client with another key, or
//! with none, reads nothing and changes nothing, gets one clear error line, and every
//! node logs the refused handshake.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::harness::{assert_clean_error, data, drs, s, Cluster};

const BS: usize = 4096;

/// A copy of the cluster's client files (cluster file and locator) in `dir`, with
/// `key` (64 hex digits) as its key file, or no key file at all.
fn copy_files(c: &Cluster, dir: &Path, key: Option<&str>) -> std::path::PathBuf {
    for name in ["cluster.toml", "client.toml"] {
        std::fs::copy(c.dir.join(name), dir.join(name)).unwrap();
    }
    if let Some(k) = key {
        std::fs::write(dir.join("cluster.key"), format!("{k}\n")).unwrap();
    }
    dir.join("cluster.toml")
}

/// Goal: nobody without the cluster key reads or changes a block, through the nodes
/// or through the metadata service, and the refusal is explained and logged.
///
/// Method: a 4+2 cluster; a block written with the key. Then, from copies of the
/// cluster file with a wrong key file, with no key file, and with a malformed key
/// file: reads, writes and `status` must each fail with one clear error line (naming
/// authentication or the missing key) within the command deadline. Afterwards the
/// block still reads back exactly as written, and the node logs name the refused
/// handshakes.
#[test]
fn a_client_without_the_key_reads_and_changes_nothing() {
    let (c, up) = Cluster::start_sized(64, "4KiB", &[]);
    assert!(up.text().contains("cluster.key"), "{up}");
    let key_file = c.dir.join("cluster.key");
    let meta = std::fs::metadata(&key_file).expect("cluster up writes cluster.key");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the key file is readable by others"
    );
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.trim().len(), 64, "key file: {key:?}");

    let block = data(7, BS);
    c.write(3, &block).ok();

    let tmp = tempfile::tempdir().unwrap();
    // A wrong key: the handshake fails both at the nodes and at the metadata service.
    let wrong = tmp.path().join("wrong");
    std::fs::create_dir(&wrong).unwrap();
    let wrong_file = copy_files(&c, &wrong, Some(&"ab".repeat(32)));
    let w = s(&wrong_file);
    let out = drs(&["block", "read", "--cluster", w, "3"]).run();
    assert_clean_error(&out, &["authentication failed"]);
    assert!(out.elapsed < Duration::from_secs(20), "too slow: {out}");
    let out = drs(&["block", "write", "--cluster", w, "3"])
        .stdin(&data(8, BS))
        .run();
    assert_clean_error(&out, &["authentication failed"]);
    let out = drs(&["status", "--cluster", w]).run();
    assert_clean_error(&out, &["authentication failed"]);

    // No key file at all: refused with the reason.
    let none = tmp.path().join("none");
    std::fs::create_dir(&none).unwrap();
    let none_file = copy_files(&c, &none, None);
    let out = drs(&["block", "read", "--cluster", s(&none_file), "3"]).run();
    assert_clean_error(&out, &["requires the cluster key"]);

    // A node never starts open by accident: without the key file it refuses to
    // start unless told `--open`.
    let out = drs(&["node-serve", "--cluster", s(&none_file), "--node", "0"]).run();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("no cluster key") && out.stderr.contains("--open"),
        "{out}"
    );
    // DRS_KEY_FILE naming a missing file is an error, not an open client.
    let out = drs(&["block", "read", "--cluster", s(&none_file), "3"])
        .env("DRS_KEY_FILE", s(&none.join("no-such.key")))
        .run();
    assert_clean_error(&out, &["no-such.key"]);

    // A key file that is there but malformed is an error, never an open client.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let bad_file = copy_files(&c, &bad, Some("not-a-key"));
    let out = drs(&["block", "read", "--cluster", s(&bad_file), "3"]).run();
    assert_clean_error(&out, &["cluster.key", "hex digits"]);

    // The key named by DRS_KEY_FILE is used instead of the one beside the file.
    let out = drs(&["block", "read", "--cluster", w, "3"])
        .env("DRS_KEY_FILE", s(&key_file))
        .run()
        .ok();
    assert_eq!(out.stdout, block, "read with DRS_KEY_FILE");

    // Nothing changed, and the nodes said why they refused.
    let out = c.read(3, 1).ok();
    assert_eq!(out.stdout, block, "block 3 changed");
    let logs: String = (0..6)
        .map(|id| std::fs::read_to_string(c.node_dir(id).join("log")).unwrap_or_default())
        .collect();
    for reason in [
        "handshake refused",
        "does not hold this cluster's key",
        "metadata handshake refused",
        "has no cluster key",
    ] {
        assert!(logs.contains(reason), "no node log says {reason:?}");
    }
}
