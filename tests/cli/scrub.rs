//! `scrub` finds and repairs blocks corrupted on a node's disk.

use std::os::unix::fs::FileExt;

use crate::harness::{assert_same_bytes, data, Cluster, Model};

const BS: usize = 4096;
const K: u64 = 4;

/// Inverts `len` bytes at `offset` of the block node `node` holds for `stripe`, in
/// its `blocks.dat`, behind its back.
fn invert(c: &Cluster, node: u32, stripe: u64, offset: u64, len: usize) {
    let path = c
        .node_dir(node)
        .join("data")
        .join("volume-1")
        .join("blocks.dat");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let at = stripe * BS as u64 + offset;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at).unwrap();
    for x in &mut b {
        *x = !*x;
    }
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// Goal: `scrub --no-repair` reports corrupted blocks (data and parity) and leaves them
/// (a second run finds them again, `status` shows them, exit 2); `scrub` repairs them
/// (exit 0, "2 repaired", naming stripe, position and node); a further `scrub` is
/// clean; reads return the written bytes.
///
/// Method: write blocks 0..24 (stripes 0..6); flip bytes in
/// `node-<n>/data/volume-1/blocks.dat` at offset `stripe * block_size` for data block
/// LBA 9 (stripe 2, position 1) and for parity position 5 of stripe 3, where position
/// p of stripe s lives on node `placement[(s + p) % 6]` (placement read from
/// cluster.toml).
#[test]
fn scrub_finds_and_repairs_corruption() {
    let c = Cluster::up(256);
    let mut model = Model::new(BS);
    let a = data(20, 24 * BS);
    c.write(0, &a).ok();
    model.write(0, &a);
    let placement = c.placement();
    assert_eq!(placement.len(), 6, "{placement:?}");
    let node_of = |stripe: u64, position: u64| placement[((stripe + position) % 6) as usize];

    let lba = 9;
    let (s1, p1) = (lba / K, lba % K);
    let n1 = node_of(s1, p1);
    let (s2, p2) = (3, 5);
    let n2 = node_of(s2, p2);
    for (node, stripe) in [(n1, s1), (n2, s2)] {
        invert(&c, node, stripe, 100, 8);
    }
    let line1 = format!("stripe {s1} position {p1} (node {n1}): block failed its checksum");
    let line2 = format!("stripe {s2} position {p2} (node {n2}): block failed its checksum");

    // Report only, twice: the corruption stays.
    for _ in 0..2 {
        let out = c.scrub(&["--no-repair"]).ok();
        let text = out.text();
        assert!(
            text.starts_with("scrub: 64 stripes checked")
                && text.contains(
                    "62 healthy, 0 repaired, 2 found (not repaired), 0 degraded (not fully checked), 0 unrecoverable"
                ),
            "{out}"
        );
        assert!(text.contains(&format!("  found: {line1}")), "{out}");
        assert!(text.contains(&format!("  found: {line2}")), "{out}");
    }
    let out = c.status().code(2);
    assert!(
        out.text()
            .contains("stripes: 64 total, 62 healthy, 2 degraded"),
        "{out}"
    );
    assert!(
        out.text()
            .contains(&format!("  stripe {s1}: node {n1} block corrupt")),
        "{out}"
    );

    // Repair.
    let out = c.scrub(&[]).ok();
    let text = out.text();
    assert!(
        text.contains(
            "62 healthy, 2 repaired, 0 found (not repaired), 0 degraded (not fully checked), 0 unrecoverable"
        ),
        "{out}"
    );
    assert!(text.contains(&format!("  repaired: {line1}")), "{out}");
    assert!(text.contains(&format!("  repaired: {line2}")), "{out}");

    // Clean afterwards.
    let out = c.scrub(&[]).ok();
    assert!(
        out.text().contains(
            "64 healthy, 0 repaired, 0 found (not repaired), 0 degraded (not fully checked), 0 unrecoverable"
        ),
        "{out}"
    );
    c.status().ok();
    let out = c.read(0, 24).ok();
    assert_same_bytes(&out.stdout, &model.expect(0, 24), BS, 0);
}

/// Goal: the nodes' background scrubber, set up by `cluster up --scrub-every-s` and
/// `--scrub-rate-mib`, finds a corrupted block with nobody reading it, repairs it,
/// and `status` reports it (text and JSON).
///
/// Method: a cluster scrubbing every second at 1 MiB/s; a block written, then bytes
/// of it inverted in its node's `blocks.dat`; `status --json` polled (no block read)
/// until that node's scrub shows 1 corrupt block found and 1 repaired; the status
/// table shows the scrub column; the block reads back as written and a `scrub` run
/// finds nothing left.
#[test]
fn the_background_scrubber_repairs_without_a_reader() {
    let c = Cluster::up_sized(
        64,
        "4KiB",
        &["--scrub-every-s", "1", "--scrub-rate-mib", "1"],
    );
    let block = data(30, BS);
    c.write(6, &block).ok();
    let placement = c.placement();
    let (stripe, pos) = (6 / K, 6 % K);
    let node = placement[((stripe + pos) % 6) as usize];
    invert(&c, node, stripe, 2000, 4);

    let scrub_of = |v: &serde_json::Value| {
        v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["id"] == node))
            .map(|n| n["stats"]["scrub"].clone())
            .unwrap_or_default()
    };
    let mut last = serde_json::Value::Null;
    let found = crate::harness::eventually(std::time::Duration::from_secs(60), || {
        let (_, v) = c.status_json();
        last = scrub_of(&v);
        last["corrupt_found"] == 1
            && last["repaired"] == 1
            && last["passes"].as_u64().is_some_and(|p| p >= 1)
    });
    assert!(
        found,
        "node {node}'s scrubber did not report the repair: {last}"
    );
    let out = c.status().ok();
    assert!(out.text().contains("scrub (passes, found)"), "{out}");
    assert!(out.text().contains("passes, 1 found"), "{out}");
    assert_eq!(c.read(6, 1).ok().stdout, block);
    let out = c.scrub(&[]).ok();
    assert!(out.text().contains("0 repaired, 0 found"), "{out}");
}
