//! Block store tests against a real directory: version ordering, duplicates, replay,
//! torn logs, corruption, checkpoints and as-of reads.

use super::*;
use drs_proto::UpdateId;

const BS: usize = 4096;

fn volume() -> VolumeConfig {
    let coef = drs_codec::Coefficients::default_for(2, 1).unwrap();
    VolumeConfig {
        id: 1,
        k: 2,
        m: 1,
        block_size: BS as u32,
        blocks: 8,
        min_write: 2,
        coefficients: coef.rows().to_vec(),
        nodes: vec![0, 1, 2],
    }
}

fn cfg(dir: &Path, node: NodeId) -> StoreConfig {
    StoreConfig {
        dir: dir.to_owned(),
        node,
        cluster_id: 7,
        volume: volume(),
        checkpoint_bytes: 1 << 30,
        max_pending: 100,
        undo_bytes: 1 << 20,
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// An update of data block `index` to `version` at `stripe`, for the node holding
/// `position`.
struct U {
    stripe: StripeId,
    position: u8,
    seq: u64,
    index: u8,
    version: Version,
    /// The version it applies to (default: the one before).
    base: Option<Version>,
    offset: u32,
}

impl U {
    fn on(mut self, base: Version) -> U {
        self.base = Some(base);
        self
    }
}

fn upd(
    stripe: StripeId,
    position: u8,
    seq: u64,
    (index, version): (u8, Version),
    offset: u32,
) -> U {
    U {
        stripe,
        position,
        seq,
        index,
        version,
        base: None,
        offset,
    }
}

async fn put(s: &VolumeStore, u: U, delta: Bytes, deadline: Instant) -> Result<Applied, WireError> {
    let b = BlockUpdate {
        id: UpdateId {
            client: 1,
            seq: u.seq,
        },
        index: u.index,
        version: u.version,
        base: u.base.unwrap_or(u.version.saturating_sub(1)),
        offset: u.offset,
        len: delta.len() as u32,
    };
    s.update(u.stripe, u.position, b, delta, false, deadline)
        .await
}

fn read_all(s: &VolumeStore, stripe: StripeId, pos: u8, mode: ReadMode) -> (Vec<Version>, Vec<u8>) {
    match s.read(stripe, pos, 0, BS as u32, &mode).unwrap() {
        ReadOutcome::Done { versions, data } => (versions, data.to_vec()),
        ReadOutcome::Wait => panic!("read would wait"),
    }
}

/// The position node `node` holds in stripe `s` (nodes 0..3, rotation placement).
fn pos(node: NodeId, s: StripeId) -> u8 {
    volume().geometry().position_of(s, node).unwrap() as u8
}

fn verify_all(s: &VolumeStore) {
    for st in 0..s.geometry().stripes() {
        s.set_verified(st, true);
    }
}

#[tokio::test]
async fn data_update_applies_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = pos(0, 0);
    assert_eq!(p, 0);
    {
        let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
        verify_all(&s);
        assert!(s.is_zero(0));
        let r = put(
            &s,
            upd(0, p, 1, (0, 1), 10),
            Bytes::from_static(b"hello"),
            far(),
        )
        .await
        .unwrap();
        assert!(r.applied && !r.duplicate);
        let (v, d) = read_all(&s, 0, p, ReadMode::Current);
        assert_eq!(v, vec![1, 0]);
        assert_eq!(&d[10..15], b"hello");
        assert!(d[..10].iter().all(|b| *b == 0));
        // A second delta XORs in.
        put(
            &s,
            upd(0, p, 2, (0, 2), 10),
            Bytes::from_static(b"hello"),
            far(),
        )
        .await
        .unwrap();
        let (v, d) = read_all(&s, 0, p, ReadMode::Current);
        assert_eq!(v, vec![2, 0]);
        assert!(d.iter().all(|b| *b == 0));
        put(
            &s,
            upd(0, p, 3, (0, 3), 0),
            Bytes::from_static(b"abc"),
            far(),
        )
        .await
        .unwrap();
    }
    // Restart: the log is replayed.
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    let (v, d) = read_all(&s, 0, p, ReadMode::Applied);
    assert_eq!(v, vec![3, 0]);
    assert_eq!(&d[..3], b"abc");
    assert!(
        matches!(
            s.read(0, p, 0, 10, &ReadMode::Current),
            Err(WireError::Recovering { .. })
        ),
        "unverified after restart"
    );
}

#[tokio::test]
async fn parity_scales_data_deltas_and_xors_parity_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 2)).unwrap();
    verify_all(&s);
    let p = pos(2, 0);
    assert_eq!(p, 2, "node 2 is the parity node of stripe 0");
    let c0 = s.codec().coefficients().get(0, 0);
    let c1 = s.codec().coefficients().get(0, 1);
    let delta0 = vec![0x5Au8; 64];
    put(
        &s,
        upd(0, p, 1, (0, 1), 100),
        Bytes::from(delta0.clone()),
        far(),
    )
    .await
    .unwrap();
    let mut expect = vec![0u8; BS];
    Codec::mul_xor(c0, &delta0, &mut expect[100..164]).unwrap();
    let (v, d) = read_all(&s, 0, p, ReadMode::Current);
    assert_eq!(v, vec![1, 0]);
    assert_eq!(d, expect);
    // Two more, for both data blocks: each scaled by its own coefficient.
    let delta1 = vec![0x33u8; 64];
    put(
        &s,
        upd(0, p, 2, (0, 2), 100),
        Bytes::from(delta0.clone()),
        far(),
    )
    .await
    .unwrap();
    put(
        &s,
        upd(0, p, 3, (1, 1), 100),
        Bytes::from(delta1.clone()),
        far(),
    )
    .await
    .unwrap();
    Codec::mul_xor(c0, &delta0, &mut expect[100..164]).unwrap();
    Codec::mul_xor(c1, &delta1, &mut expect[100..164]).unwrap();
    let (v, d) = read_all(&s, 0, p, ReadMode::Current);
    assert_eq!(v, vec![2, 1]);
    assert_eq!(d, expect);
}

#[tokio::test]
async fn out_of_order_updates_wait_for_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    let r = put(
        &s,
        upd(0, 0, 2, (0, 2), 0),
        Bytes::from_static(b"\x02"),
        far(),
    )
    .await
    .unwrap();
    assert!(!r.applied, "version 2 before version 1 is held");
    assert!(matches!(
        s.read(0, 0, 0, 1, &ReadMode::Current).unwrap(),
        ReadOutcome::Wait
    ));
    let (v, _) = read_all(&s, 0, 0, ReadMode::Applied);
    assert_eq!(v, vec![0, 0]);
    assert_eq!(s.stats.pending.load(Ordering::Relaxed), 1);
    assert_eq!(s.stuck(Duration::ZERO), vec![0]);
    put(
        &s,
        upd(0, 0, 1, (0, 1), 0),
        Bytes::from_static(b"\x01"),
        far(),
    )
    .await
    .unwrap();
    let (v, d) = read_all(&s, 0, 0, ReadMode::Current);
    assert_eq!(v, vec![2, 0]);
    assert_eq!(d[0], 3);
    assert_eq!(s.stats.pending.load(Ordering::Relaxed), 0);
    assert!(s.stuck(Duration::ZERO).is_empty());
}

#[tokio::test]
async fn pending_updates_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
        put(
            &s,
            upd(0, 0, 2, (0, 2), 0),
            Bytes::from_static(b"\x02"),
            far(),
        )
        .await
        .unwrap();
    }
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    assert_eq!(s.known(0, &[0]), (vec![(0, 2)], vec![]));
    put(
        &s,
        upd(0, 0, 1, (0, 1), 0),
        Bytes::from_static(b"\x01"),
        far(),
    )
    .await
    .unwrap();
    let (v, d) = read_all(&s, 0, 0, ReadMode::Current);
    assert_eq!((v[0], d[0]), (2, 3));
}

#[tokio::test]
async fn duplicates_and_stale_versions() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    put(
        &s,
        upd(0, 0, 1, (0, 1), 0),
        Bytes::from_static(b"\x07"),
        far(),
    )
    .await
    .unwrap();
    let r = put(
        &s,
        upd(0, 0, 1, (0, 1), 0),
        Bytes::from_static(b"\x07"),
        far(),
    )
    .await
    .unwrap();
    assert!(r.duplicate, "a retried update is recognised");
    let (_, d) = read_all(&s, 0, 0, ReadMode::Current);
    assert_eq!(d[0], 7, "and not applied twice");
    let other = upd(0, 0, 99, (0, 1), 0);
    assert!(matches!(
        put(&s, other, Bytes::from_static(b"\x01"), far()).await,
        Err(WireError::StaleVersion {
            current: 1,
            got: 1,
            ..
        })
    ));
}

#[tokio::test]
async fn malformed_updates_get_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    let cases = vec![
        (
            upd(0, 1, 1, (1, 1), 0),
            WireError::NotMember {
                node: 0,
                stripe: 0,
                position: 1,
            },
        ),
        (
            upd(99, 0, 1, (0, 1), 0),
            WireError::StripeOutOfRange {
                stripe: 99,
                stripes: 4,
            },
        ),
        (
            upd(0, 0, 1, (1, 1), 0),
            WireError::Invalid {
                what: drs_proto::error::InvalidReason::WrongRole,
            },
        ),
        (
            upd(0, 0, 1, (0, 0), 0),
            WireError::Invalid {
                what: drs_proto::error::InvalidReason::ZeroVersion,
            },
        ),
        (
            upd(0, 0, 1, (5, 1), 0),
            WireError::Invalid {
                what: drs_proto::error::InvalidReason::IndexOutOfRange,
            },
        ),
        (
            upd(0, 0, 1, (0, 2), 0).on(2),
            WireError::Invalid {
                what: drs_proto::error::InvalidReason::BadBase,
            },
        ),
        (
            upd(0, 0, 1, (0, 1), BS as u32 - 1),
            WireError::BadRange {
                offset: BS as u32 - 1,
                len: 2,
                block_size: BS as u32,
            },
        ),
    ];
    for (u, e) in cases {
        assert_eq!(put(&s, u, Bytes::from_static(b"xy"), far()).await, Err(e));
    }
    let expired = Instant::now() - Duration::from_millis(1);
    assert_eq!(
        put(
            &s,
            upd(0, 0, 1, (0, 1), 0),
            Bytes::from_static(b"x"),
            expired
        )
        .await,
        Err(WireError::Timeout)
    );
}

#[tokio::test]
async fn a_torn_log_tail_is_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
        for v in 1..=3u64 {
            put(
                &s,
                upd(0, 0, v, (0, v), 0),
                Bytes::from(vec![v as u8; 8]),
                far(),
            )
            .await
            .unwrap();
        }
    }
    let wal = dir.path().join("wal.log");
    let len = std::fs::metadata(&wal).unwrap().len();
    let f = OpenOptions::new().write(true).open(&wal).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    let (v, d) = read_all(&s, 0, 0, ReadMode::Applied);
    assert_eq!(v[0], 2, "the torn third record is dropped");
    assert_eq!(d[0], 1 ^ 2);
}

#[tokio::test]
async fn replay_repairs_a_torn_data_write() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
        put(
            &s,
            upd(0, 0, 1, (0, 1), 0),
            Bytes::from(vec![9u8; BS]),
            far(),
        )
        .await
        .unwrap();
    }
    // Simulate a crash half-way through writing the block: scribble over part of it.
    let f = OpenOptions::new()
        .write(true)
        .open(dir.path().join("blocks.dat"))
        .unwrap();
    f.write_all_at(&[0xEE; 100], 50).unwrap();
    drop(f);
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    let (v, d) = read_all(&s, 0, 0, ReadMode::Applied);
    assert_eq!(v[0], 1);
    assert!(
        d.iter().all(|b| *b == 9),
        "the after-image in the log restored the block"
    );
}

#[tokio::test]
async fn corruption_is_detected_never_returned_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    put(
        &s,
        upd(0, 0, 1, (0, 1), 0),
        Bytes::from(vec![5u8; BS]),
        far(),
    )
    .await
    .unwrap();
    s.checkpoint().await.unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(dir.path().join("blocks.dat"))
        .unwrap();
    f.write_all_at(&[4], 17).unwrap();
    drop(f);
    assert_eq!(
        s.read(0, 0, 0, 4, &ReadMode::Current).unwrap_err(),
        WireError::Corrupt {
            stripe: 0,
            position: 0
        }
    );
    assert_eq!(s.stats.corrupt_found.load(Ordering::Relaxed), 1);
    // An update to a corrupt block is held, never folded into wrong bytes.
    let r = put(
        &s,
        upd(0, 0, 2, (0, 2), 0),
        Bytes::from_static(b"\x01"),
        far(),
    )
    .await
    .unwrap();
    assert!(!r.applied);
    // Repair at version 1; the held update then applies.
    assert!(s
        .install(0, 0, vec![1, 0], Bytes::from(vec![5u8; BS]), false)
        .await
        .unwrap());
    let (v, d) = read_all(&s, 0, 0, ReadMode::Current);
    assert_eq!(v[0], 2);
    assert_eq!(d[0], 4);
    assert!(d[1..].iter().all(|b| *b == 5));
    // A repair older than what the node holds is refused.
    assert!(matches!(
        s.install(0, 0, vec![1, 0], Bytes::from(vec![0u8; BS]), false)
            .await,
        Err(WireError::VersionUnavailable { .. })
    ));
    // Equal versions and a good block: nothing to do unless forced.
    assert!(!s
        .install(0, 0, vec![2, 0], Bytes::from(vec![0u8; BS]), false)
        .await
        .unwrap());
}

/// A recovering node rebuilds a block from members that already applied an update
/// whose own copy for this node is still on its way. When it arrives, the installed
/// bytes hold it: it is a duplicate, not stale, or the writer would count this node as
/// failing its part of a write that it holds. Only the version the install brought
/// the block to: one it jumped over may be void (skipped by the next writer, in no
/// block), and versions applied before stay stale too.
#[tokio::test]
async fn an_update_an_install_jumped_over_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    put(
        &s,
        upd(0, 0, 1, (0, 1), 0),
        Bytes::from_static(b"\x01"),
        far(),
    )
    .await
    .unwrap();
    // The rebuild: versions 2 and 3 applied elsewhere (bytes 1 ^ 2 ^ 3).
    let mut block = vec![0u8; BS];
    block[0] = 1 ^ 2 ^ 3;
    assert!(s
        .install(0, 0, vec![3, 0], Bytes::from(block), false)
        .await
        .unwrap());
    let r = put(
        &s,
        upd(0, 0, 13, (0, 3), 0),
        Bytes::from_static(b"\x03"),
        far(),
    )
    .await
    .unwrap();
    assert!(r.applied && r.duplicate, "{r:?}");
    // The (current, got) of a refusal as stale.
    let store = &s;
    let stale = |seq: u64, version: Version| async move {
        match put(
            store,
            upd(0, 0, seq, (0, version), 0),
            Bytes::from_static(b"\x09"),
            far(),
        )
        .await
        {
            Err(WireError::StaleVersion { current, got, .. }) => Some((current, got)),
            _ => None,
        }
    };
    assert_eq!(stale(12, 2).await, Some((3, 2)), "jumped over: maybe void");
    let (v, d) = read_all(&s, 0, 0, ReadMode::Current);
    assert_eq!((v[0], d[0]), (3, 1 ^ 2 ^ 3), "nothing applied twice");
    // Version 1 was applied here before the install: another update with it is stale.
    assert_eq!(stale(99, 1).await, Some((3, 1)));
    // And the next version applies on top.
    put(
        &s,
        upd(0, 0, 4, (0, 4), 0),
        Bytes::from_static(b"\x04"),
        far(),
    )
    .await
    .unwrap();
    let (v, d) = read_all(&s, 0, 0, ReadMode::Current);
    let all = [1u8, 2, 3, 4].iter().fold(0, |a, b| a ^ b);
    assert_eq!((v[0], d[0]), (4, all));
}

/// A verification that began before every block was marked unverified (the node
/// was paused meanwhile) must not mark its block verified from what it saw.
#[test]
fn a_verification_older_than_an_unverify_marks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    let gen = s.unverified_generation();
    s.all_unverified();
    assert!(!s.set_verified_since(0, gen));
    assert_eq!(s.check(0), Check::Unverified);
    let gen = s.unverified_generation();
    assert!(s.set_verified_since(0, gen));
    assert_ne!(s.check(0), Check::Unverified);
}

#[test]
fn the_verified_count_follows_every_change_of_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    // Four nodes for a stripe of three: node 0 holds no block of some stripes.
    let mut c = cfg(dir.path(), 0);
    c.volume.nodes = vec![0, 1, 2, 3];
    let s = VolumeStore::open(c).unwrap();
    let (held, other): (Vec<StripeId>, Vec<StripeId>) =
        (0..s.geometry().stripes()).partition(|st| s.position(*st).is_some());
    let members = held.len() as u64;
    assert!(members > 1 && !other.is_empty());
    assert_eq!(s.verified_count(), (0, members));
    verify_all(&s);
    assert_eq!(s.verified_count(), (members, members));
    // Marking twice counts once; a stripe the node holds no block of is not counted.
    s.set_verified(held[0], false);
    s.set_verified(held[0], false);
    s.set_verified(other[0], false);
    assert_eq!(s.verified_count(), (members - 1, members));
    let gen = s.unverified_generation();
    assert!(s.set_verified_since(held[0], gen));
    assert!(s.set_verified_since(held[0], gen));
    assert_eq!(s.verified_count(), (members, members));
    s.all_unverified();
    assert_eq!(s.verified_count(), (0, members));
}

#[tokio::test]
async fn install_drops_pending_updates_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    // The node missed version 1; versions 2 and 3 wait.
    for v in [2u64, 3] {
        put(
            &s,
            upd(0, 0, v, (0, v), 0),
            Bytes::from(vec![v as u8]),
            far(),
        )
        .await
        .unwrap();
    }
    // A rebuild at version 2 (bytes = 1 ^ 2) covers version 2; version 3 then applies.
    let mut block = vec![0u8; BS];
    block[0] = 1 ^ 2;
    assert!(s
        .install(0, 0, vec![2, 0], Bytes::from(block), false)
        .await
        .unwrap());
    let (v, d) = read_all(&s, 0, 0, ReadMode::Current);
    assert_eq!((v[0], d[0]), (3, 1 ^ 2 ^ 3));
    assert_eq!(s.stats.pending.load(Ordering::Relaxed), 0);
    drop(s);
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    let (v, d) = read_all(&s, 0, 0, ReadMode::Applied);
    assert_eq!((v[0], d[0]), (3, 1 ^ 2 ^ 3), "same after replay");
    assert_eq!(s.stats.pending.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn checkpoint_shrinks_the_log_and_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut c = cfg(dir.path(), 2);
        c.checkpoint_bytes = 20_000;
        let s = VolumeStore::open(c).unwrap();
        for st in 0..4u64 {
            let p = pos(2, st);
            for v in 1..=5u64 {
                let entry = if (p as usize) < 2 { (p, v) } else { (0, v) };
                put(
                    &s,
                    upd(st, p, st * 100 + v, entry, 0),
                    Bytes::from(vec![v as u8; 3000]),
                    far(),
                )
                .await
                .unwrap();
            }
        }
        // A pending one must survive the checkpoint too.
        let p = pos(2, 0);
        put(
            &s,
            upd(0, p, 999, (1, 2), 0),
            Bytes::from_static(b"\x01"),
            far(),
        )
        .await
        .unwrap();
        s.checkpoint().await.unwrap();
        assert!(std::fs::metadata(dir.path().join("wal.log")).unwrap().len() < 20_000);
    }
    let s = VolumeStore::open(cfg(dir.path(), 2)).unwrap();
    assert_eq!(s.stats.pending.load(Ordering::Relaxed), 1);
    for st in 0..4u64 {
        let p = pos(2, st);
        let (v, _) = read_all(&s, st, p, ReadMode::Applied);
        let i = if (p as usize) < 2 { p as usize } else { 0 };
        assert_eq!(v[i], 5, "stripe {st}");
    }
}

#[tokio::test]
async fn as_of_reads_undo_recent_updates() {
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 2)).unwrap();
    verify_all(&s);
    let p = pos(2, 0);
    for v in 1..=3u64 {
        put(
            &s,
            upd(0, p, v, (0, v), 0),
            Bytes::from(vec![v as u8; 4]),
            far(),
        )
        .await
        .unwrap();
    }
    put(
        &s,
        upd(0, p, 10, (1, 1), 0),
        Bytes::from(vec![0x40; 4]),
        far(),
    )
    .await
    .unwrap();
    // The parity node scales data block 0's deltas by c(0, 0).
    let scaled = |x: u8| {
        let mut out = [0u8];
        Codec::mul_xor(s.codec().coefficients().get(0, 0), &[x], &mut out).unwrap();
        out[0]
    };
    let (v, d) = read_all(&s, 0, p, ReadMode::AsOf(vec![1, 0]));
    assert_eq!(v, vec![1, 0]);
    assert_eq!(d[0], scaled(1));
    let (v, d) = read_all(&s, 0, p, ReadMode::AsOf(vec![3, 0]));
    assert_eq!((v, d[0]), (vec![3, 0], scaled(1 ^ 2 ^ 3)));
    // Versions the node has not reached make the read wait.
    assert!(matches!(
        s.read(0, p, 0, 4, &ReadMode::AsOf(vec![4, 1])).unwrap(),
        ReadOutcome::Wait
    ));
    // A combination that never existed is unavailable.
    assert!(matches!(
        s.read(0, p, 0, 4, &ReadMode::AsOf(vec![0, 1])),
        Err(WireError::VersionUnavailable { .. })
    ));
}

#[tokio::test]
async fn a_data_directory_of_another_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(VolumeStore::open(cfg(dir.path(), 0)).unwrap());
    let mut other = cfg(dir.path(), 0);
    other.cluster_id = 8;
    assert!(matches!(
        VolumeStore::open(other),
        Err(StoreError::Identity { .. })
    ));
    assert!(matches!(
        VolumeStore::open(cfg(dir.path(), 1)),
        Err(StoreError::Identity { .. })
    ));
}

#[tokio::test]
async fn damaged_headers_make_every_block_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
        put(
            &s,
            upd(0, 0, 1, (0, 1), 0),
            Bytes::from_static(b"\x01"),
            far(),
        )
        .await
        .unwrap();
        s.checkpoint().await.unwrap();
    }
    let h = dir.path().join("headers");
    let mut raw = std::fs::read(&h).unwrap();
    raw[30] ^= 1;
    std::fs::write(&h, raw).unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    let (infos, _) = s.list(0, 100, |_| vec![]);
    assert!(infos.iter().all(|i| i.state == SlotState::Corrupt));
}

#[tokio::test]
async fn updates_of_one_block_in_a_batch_share_one_log_record() {
    // A parity block changed by both data blocks of a stripe write logs one
    // after-image for both, and after a restart knows both ids.
    let dir = tempfile::tempdir().unwrap();
    let p = pos(2, 0);
    let (d0, d1) = (vec![0x11u8; BS], vec![0x22u8; BS]);
    {
        let s = VolumeStore::open(cfg(dir.path(), 2)).unwrap();
        verify_all(&s);
        // Hold the writer in the commit of an update of another stripe (it needs that
        // slot's write lock), so the next two queue up and form one batch.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let s = s.clone();
            move || {
                let _guard = s.slot_read(1);
                let _ = held_tx.send(());
                let _ = release_rx.recv();
            }
        });
        held_rx.recv().unwrap();
        let first = tokio::spawn({
            let s = s.clone();
            let q = pos(2, 1);
            let index = if q < 2 { q } else { 0 };
            async move {
                put(
                    &s,
                    upd(1, q, 1, (index, 1), 0),
                    Bytes::from(vec![0x01u8; 8]),
                    far(),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (a, b) = (s.clone(), s.clone());
        let (d0c, d1c) = (d0.clone(), d1.clone());
        let second =
            tokio::spawn(
                async move { put(&a, upd(0, p, 2, (0, 1), 0), Bytes::from(d0c), far()).await },
            );
        let third =
            tokio::spawn(
                async move { put(&b, upd(0, p, 3, (1, 1), 0), Bytes::from(d1c), far()).await },
            );
        tokio::time::sleep(Duration::from_millis(200)).await;
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        for t in [first, second, third] {
            assert!(t.await.unwrap().unwrap().applied);
        }
    }
    let log = std::fs::read(dir.path().join("wal.log")).unwrap();
    let (records, _, stop) = wal::decode_records(&log);
    assert_eq!(stop, wal::Stop::End);
    let applies: Vec<&Vec<UpdateId>> = records
        .iter()
        .filter_map(|r| match &r.ctrl {
            WalCtrl::Apply { ids, .. } => Some(ids),
            _ => None,
        })
        .collect();
    assert_eq!(applies.len(), 2, "one record per batch: {applies:?}");
    assert_eq!(
        applies[1].len(),
        2,
        "the second batch's two updates in one record"
    );
    // After a restart: the bytes, the versions, and both ids known as applied.
    let s = VolumeStore::open(cfg(dir.path(), 2)).unwrap();
    verify_all(&s);
    let (v, d) = read_all(&s, 0, p, ReadMode::Current);
    assert_eq!(v, vec![1, 1]);
    let coef = s.codec().coefficients();
    let mut expect = vec![0u8; BS];
    Codec::mul_xor(coef.get(0, 0), &d0, &mut expect).unwrap();
    Codec::mul_xor(coef.get(0, 1), &d1, &mut expect).unwrap();
    assert_eq!(d, expect);
    let again = put(&s, upd(0, p, 3, (1, 1), 0), Bytes::from(d1), far())
        .await
        .unwrap();
    assert!(
        again.duplicate,
        "the id was restored from the shared record"
    );
}

#[tokio::test]
async fn an_update_applies_on_its_base_and_skips_void_versions() {
    // Versions 2 of block 0 was given out by a fenced client and reached no live
    // member: the next update is built on 1 and takes the block to 3.
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    let p = pos(0, 0);
    put(
        &s,
        upd(0, p, 1, (0, 1), 0),
        Bytes::from_static(b"aa"),
        far(),
    )
    .await
    .unwrap();
    s.note_fenced(0, &[0]);
    assert_eq!(
        s.known(0, &[0]),
        (vec![(0, 1)], vec![(0, 2)]),
        "a lock reports the possible void version"
    );
    let r = put(
        &s,
        upd(0, p, 2, (0, 3), 0).on(1),
        Bytes::from_static(b"bb"),
        far(),
    )
    .await
    .unwrap();
    assert!(r.applied, "applies on its base, skipping 2");
    let (v, d) = read_all(&s, 0, p, ReadMode::Current);
    assert_eq!(v, vec![3, 0]);
    assert_eq!(&d[..2], &[b'a' ^ b'b', b'a' ^ b'b']);
    assert_eq!(
        s.known(0, &[0]),
        (vec![(0, 3)], vec![]),
        "the hint is moot once passed"
    );
    // The relay of the void update arriving late is stale.
    assert!(matches!(
        put(
            &s,
            upd(0, p, 3, (0, 2), 0),
            Bytes::from_static(b"zz"),
            far()
        )
        .await,
        Err(WireError::StaleVersion { .. })
    ));
    // Restart: the base survives in the log.
    drop(s);
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    assert_eq!(read_all(&s, 0, p, ReadMode::Applied).0, vec![3, 0]);
}

#[tokio::test]
async fn a_block_holding_a_void_version_waits_and_is_rebuilt() {
    // This node took version 2 (a dead client's update nobody else got); the stripe
    // voided it: the next update (3, built on 1) must not be applied on top of it.
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    let p = pos(0, 0);
    for (seq, v) in [(1, 1), (2, 2)] {
        put(
            &s,
            upd(0, p, seq, (0, v), 0),
            Bytes::from_static(b"q"),
            far(),
        )
        .await
        .unwrap();
    }
    let r = put(
        &s,
        upd(0, p, 3, (0, 3), 0).on(1),
        Bytes::from_static(b"r"),
        far(),
    )
    .await
    .unwrap();
    assert!(
        !r.applied,
        "logged, not applied on a version it was not built on"
    );
    assert_eq!(read_all(&s, 0, p, ReadMode::Applied).0, vec![2, 0]);
    // Behind: the stuck-block rebuild will replace it with the stripe's block.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(s.stuck(Duration::from_millis(10)), vec![0]);
    // The rebuild installs the stripe's version 3; the waiting update is dropped.
    let mut block = vec![0u8; BS];
    block[0] = b'r';
    assert!(s
        .install(0, p, vec![3, 0], Bytes::from(block.clone()), false)
        .await
        .unwrap());
    let (v, d) = read_all(&s, 0, p, ReadMode::Current);
    assert_eq!((v, d), (vec![3, 0], block));
    assert!(s.stuck(Duration::ZERO).is_empty());
}

#[tokio::test]
async fn the_fenced_hint_goes_past_the_hint_a_fenced_holder_skipped_past() {
    // A dies holding the lock of block 0: version 1 is noted as possibly given out.
    // B is granted the lock with that hint, so its update takes version 2 (built on
    // 0); B reaches some other member only and dies holding the lock here too. The
    // hint noted for B must be 2: the next writer takes 3, never B's 2 again.
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    s.note_fenced(0, &[0]);
    assert_eq!(s.note_granted(0, &[0], 9), (vec![(0, 0)], vec![(0, 1)]));
    s.note_fenced(0, &[0]);
    assert_eq!(
        s.known(0, &[0]),
        (vec![(0, 0)], vec![(0, 2)]),
        "one past the version the fenced holder itself was told to take"
    );
}

#[tokio::test]
async fn a_version_a_granted_lock_skipped_is_refused_even_when_it_fits() {
    // A fenced holder may have given out version 1 of block 0. A lock granted here
    // with that hint makes its owner build on 0 and take 2 (unless another member
    // knows 1). Until the owner's update comes, whether 1 is void is undecided; the
    // owner's update, built on 0, decides it is. A's version 1, arriving afterwards
    // (by relay, from a member whose log sync stalled), fits the block (its base is
    // 0) but is void: applying it would hold the owner's version 2 pending for ever
    // behind it.
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    let p = pos(0, 0);
    s.note_fenced(0, &[0]);
    assert_eq!(s.note_granted(0, &[0], 9), (vec![(0, 0)], vec![(0, 1)]));
    assert!(s.skip_undecided(0, 0, 1) && !s.skip_undecided(0, 0, 2));
    s.note_owner_update(0, 0, 9, 0);
    assert!(!s.skip_undecided(0, 0, 1), "decided by the owner's update");
    assert!(matches!(
        put(&s, upd(0, p, 1, (0, 1), 0), Bytes::from_static(b"a"), far()).await,
        Err(WireError::StaleVersion {
            current: 0,
            got: 1,
            ..
        })
    ));
    let r = put(
        &s,
        upd(0, p, 2, (0, 2), 0).on(0),
        Bytes::from_static(b"b"),
        far(),
    )
    .await
    .unwrap();
    assert!(r.applied, "the owner's update applies on its base");
    assert_eq!(read_all(&s, 0, p, ReadMode::Current).0, vec![2, 0]);
    // A fenced hint alone, with no lock granted on it, skips nothing (another stripe,
    // where this node is the parity node).
    let q = pos(0, 1);
    s.note_fenced(1, &[0]);
    assert!(
        put(&s, upd(1, q, 3, (0, 1), 0), Bytes::from_static(b"c"), far())
            .await
            .unwrap()
            .applied
    );
    // A second fenced holder and grant: only the new range is skipped.
    s.note_fenced(0, &[0]);
    assert_eq!(s.note_granted(0, &[0], 9), (vec![(0, 2)], vec![(0, 3)]));
    s.note_owner_update(0, 0, 9, 2);
    assert!(matches!(
        put(
            &s,
            upd(0, p, 4, (0, 3), 0).on(2),
            Bytes::from_static(b"d"),
            far()
        )
        .await,
        Err(WireError::StaleVersion { .. })
    ));
    assert!(
        put(
            &s,
            upd(0, p, 5, (0, 4), 0).on(2),
            Bytes::from_static(b"e"),
            far()
        )
        .await
        .unwrap()
        .applied
    );
    // A grant without a hint skips nothing.
    assert_eq!(s.note_granted(0, &[0], 9), (vec![(0, 4)], vec![]));
    assert!(
        put(&s, upd(0, p, 6, (0, 5), 0), Bytes::from_static(b"f"), far())
            .await
            .unwrap()
            .applied
    );
}

#[tokio::test]
async fn a_skip_the_owner_did_not_make_is_no_skip() {
    // Locks granted here with a `fenced` hint (version 1 possibly given out) whose
    // owners then skipped nothing: one released its lock without an update (a failed
    // lock attempt), one built on version 1 (another member knew it). Version 1 is
    // not void on their account: undecided while they held the lock, then accepted.
    let dir = tempfile::tempdir().unwrap();
    let s = VolumeStore::open(cfg(dir.path(), 0)).unwrap();
    verify_all(&s);
    let p = pos(0, 0);
    s.note_fenced(0, &[0]);
    assert_eq!(s.note_granted(0, &[0], 7), (vec![(0, 0)], vec![(0, 1)]));
    s.note_lock_gone(0, &[0], Some(7));
    assert!(!s.skip_undecided(0, 0, 1), "released: nothing was skipped");
    assert_eq!(s.note_granted(0, &[0], 8), (vec![(0, 0)], vec![(0, 1)]));
    assert!(s.skip_undecided(0, 0, 1));
    s.note_lock_gone(0, &[1], Some(8));
    s.note_lock_gone(0, &[0], Some(7));
    assert!(s.skip_undecided(0, 0, 1), "another block, another owner");
    s.note_owner_update(0, 0, 8, 1);
    assert!(!s.skip_undecided(0, 0, 1), "built on 1: nothing skipped");
    assert!(
        put(&s, upd(0, p, 1, (0, 1), 0), Bytes::from_static(b"a"), far())
            .await
            .unwrap()
            .applied
    );
    assert!(
        put(
            &s,
            upd(0, p, 2, (0, 2), 0).on(1),
            Bytes::from_static(b"b"),
            far()
        )
        .await
        .unwrap()
        .applied
    );
    // A fenced owner's lock goes without an update here: undecided no more.
    s.note_fenced(0, &[0]);
    assert_eq!(s.note_granted(0, &[0], 9), (vec![(0, 2)], vec![(0, 3)]));
    s.note_lock_gone(0, &[0], None);
    assert!(!s.skip_undecided(0, 0, 3));
}

/// An update taken with `keep` (its data node did not take part) is kept over a
/// restart, with its delta, until it is adopted and then settled; a checkpoint after
/// that leaves it out, one before keeps it.
#[tokio::test]
async fn kept_updates_survive_restarts_until_settled() {
    let dir = tempfile::tempdir().unwrap();
    let node = (0..3).find(|n| pos(*n, 0) == 2).unwrap();
    let update = |seq: u64, version: Version| BlockUpdate {
        id: UpdateId { client: 9, seq },
        index: 1,
        version,
        base: version - 1,
        offset: 100,
        len: 3,
    };
    let delta = Bytes::from_static(b"abc");
    let ids = |s: &VolumeStore| -> Vec<u64> { s.kept().iter().map(|k| k.update.id.seq).collect() };
    {
        let s = VolumeStore::open(cfg(dir.path(), node)).unwrap();
        s.update(0, 2, update(1, 1), delta.clone(), true, far())
            .await
            .unwrap();
        s.update(0, 2, update(2, 2), delta.clone(), false, far())
            .await
            .unwrap();
        assert_eq!(ids(&s), vec![1], "only the update with keep is kept");
        // Not adopted yet: the node has not put it in its unsettled set.
        s.retain_kept(|_| false);
        assert_eq!(ids(&s), vec![1], "an update not adopted is never dropped");
    }
    {
        let s = VolumeStore::open(cfg(dir.path(), node)).unwrap();
        let kept = s.kept();
        assert_eq!(ids(&s), vec![1], "kept over a restart (log replay)");
        assert_eq!(kept[0].update, update(1, 1));
        assert_eq!(kept[0].stripe, 0);
        assert_eq!(&kept[0].delta[..], b"abc");
        s.checkpoint().await.unwrap();
    }
    {
        let s = VolumeStore::open(cfg(dir.path(), node)).unwrap();
        assert_eq!(ids(&s), vec![1], "kept over a checkpoint and a restart");
        // Restored updates are adopted: settled, they go.
        s.retain_kept(|_| false);
        assert!(s.kept().is_empty());
        s.checkpoint().await.unwrap();
    }
    let s = VolumeStore::open(cfg(dir.path(), node)).unwrap();
    assert!(
        s.kept().is_empty(),
        "a settled update is left out at the checkpoint"
    );
    assert_eq!(read_all(&s, 0, 2, ReadMode::Applied).0, vec![0, 2]);
}

/// What a checkpoint leaves in the log (kept updates) does not make every following
/// batch checkpoint again: the next one waits for as much new log.
#[tokio::test]
async fn kept_updates_do_not_make_every_batch_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let node = (0..3).find(|n| pos(*n, 0) == 2).unwrap();
    let mut c = cfg(dir.path(), node);
    c.checkpoint_bytes = 8 << 10;
    let s = VolumeStore::open(c).unwrap();
    let update = |seq: u64| BlockUpdate {
        id: UpdateId { client: 9, seq },
        index: 1,
        version: 1,
        base: 0,
        offset: 0,
        len: BS as u32,
    };
    // Kept updates of 2 stripes (this node holds their parity): 8 KiB of deltas, the
    // checkpoint size.
    for stripe in [0u64, 3] {
        let p = pos(node, stripe);
        assert_eq!(p, 2);
        s.update(
            stripe,
            p,
            update(stripe + 1),
            Bytes::from(vec![7u8; BS]),
            true,
            far(),
        )
        .await
        .unwrap();
    }
    let kept = s.kept().len();
    assert!(kept >= 2, "{kept} kept updates");
    s.checkpoint().await.unwrap();
    let floor = s.stats.wal_bytes.load(Ordering::Relaxed);
    assert!(
        floor > (kept * BS) as u64,
        "the kept updates stay in the log"
    );
    // A small update of another block: the log grows past the checkpoint size, but
    // not by as much as the checkpoint left in it.
    let p = pos(node, 1);
    put(
        &s,
        upd(1, p, 100, (if p < 2 { p } else { 0 }, 1), 0),
        Bytes::from_static(b"x"),
        far(),
    )
    .await
    .unwrap();
    let now = s.stats.wal_bytes.load(Ordering::Relaxed);
    assert!(
        now > floor,
        "checkpointed again at once: log {now} bytes, {floor} before"
    );
}
