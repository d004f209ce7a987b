//! `block write` and `block read`: byte-for-byte round trips.

use crate::harness::{assert_same_bytes, data, s, Cluster, Model};

const BS: usize = 4096;

/// Goal: data written with `block write` (stdin, and `-i FILE`) reads back byte for
/// byte with `block read` (stdout, and `-o FILE`): several blocks, a zero-padded short
/// last block, an overwrite with a short block, reads spanning several stripes, inputs
/// and reads larger than the CLI's 256-block streaming chunk, and `--count 0`.
///
/// Method: a 6-node 4+2 cluster of 1024 blocks of 4 KiB; every write is mirrored in a
/// model of the volume (unwritten blocks are zeros) that every read is compared with.
#[test]
fn write_and_read_round_trip() {
    let c = Cluster::up(1024);
    let mut model = Model::new(BS);
    let tmp = tempfile::tempdir().unwrap();

    // stdin: 3.5 blocks from LBA 2, across stripes 0 and 1.
    let a = data(1, 3 * BS + BS / 2);
    let out = c.write(2, &a).ok();
    assert!(
        out.stderr.contains("wrote 14336 bytes to blocks 2..5"),
        "{out}"
    );
    model.write(2, &a);
    let out = c.read(2, 4).ok();
    assert_same_bytes(&out.stdout, &model.expect(2, 4), BS, 2);
    assert!(
        out.stdout[a.len()..].iter().all(|b| *b == 0),
        "short last block not zero-padded"
    );

    // -i FILE: 300 blocks and 100 bytes from LBA 600 (more than one 256-block chunk).
    let b = data(2, 300 * BS + 100);
    let input = tmp.path().join("in.bin");
    std::fs::write(&input, &b).unwrap();
    let out = c
        .cmd(&["block", "write"], &["600", "-i", s(&input)])
        .run()
        .ok();
    assert!(
        out.stderr
            .contains(&format!("wrote {} bytes to blocks 600..900", b.len())),
        "{out}"
    );
    model.write(600, &b);
    let output = tmp.path().join("out.bin");
    let out = c
        .cmd(
            &["block", "read"],
            &["600", "--count", "301", "-o", s(&output)],
        )
        .run()
        .ok();
    assert!(out.stdout.is_empty(), "-o still wrote to stdout: {out}");
    let got = std::fs::read(&output).unwrap();
    assert_eq!(got.len(), 301 * BS);
    assert_same_bytes(&got[..b.len()], &b, BS, 600);
    assert!(
        got[b.len()..].iter().all(|x| *x == 0),
        "short last block not zero-padded"
    );

    // A short overwrite replaces the whole block (zero-padded), not just its start.
    let out = c.write(3, b"hello").ok();
    assert!(out.stderr.contains("wrote 5 bytes to blocks 3..3"), "{out}");
    model.write(3, b"hello");
    let out = c.read(3, 1).ok();
    assert_eq!(&out.stdout[..5], b"hello");
    assert_same_bytes(&out.stdout, &model.expect(3, 1), BS, 3);

    // Reads spanning several stripes, written and unwritten blocks mixed.
    let out = c.read(0, 12).ok();
    assert_same_bytes(&out.stdout, &model.expect(0, 12), BS, 0);
    let out = c.read(590, 20).ok();
    assert_same_bytes(&out.stdout, &model.expect(590, 20), BS, 590);

    // The whole volume, to a file (four 256-block chunks).
    let out = c
        .cmd(
            &["block", "read"],
            &["0", "--count", "1024", "-o", s(&output)],
        )
        .run()
        .ok();
    assert!(out.stdout.is_empty(), "{out}");
    assert_same_bytes(
        &std::fs::read(&output).unwrap(),
        &model.expect(0, 1024),
        BS,
        0,
    );

    // Nothing to read is not an error.
    let out = c.read(7, 0).ok();
    assert!(out.stdout.is_empty(), "{out}");
}
