//! The redb store: openraft's storage test suite, recovery after reopening, and typed
//! errors (not panics) on corrupt records.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

mod common;

use drs_meta::store::{self, LogStore, StateMachine};
use drs_meta::{MetaCommand, MetaResponse, Proposal, TypeConfig};
use drs_proto::map::{ClusterMap, MemberState, NodeEntry};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader,
    RaftSnapshotBuilder, StorageError, Vote,
};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = store::open(dir.path()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload,
    }
}

fn once(nonce: u64, cmd: MetaCommand) -> Proposal {
    Proposal { nonce, cmd }
}

/// A proposal retried with the same nonce (its first answer was lost to a leader
/// change) gets the first answer again and changes nothing, also after the store is
/// reopened; another nonce applies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_proposal_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let add = |node: u32| MetaCommand::AddNode {
        node,
        addr: SocketAddr::from(([127, 0, 0, 2], 9000 + node as u16)),
    };
    let entries = vec![
        entry(
            1,
            1,
            EntryPayload::Normal(once(0, MetaCommand::Bootstrap { map: small_map() })),
        ),
        entry(1, 2, EntryPayload::Normal(once(41, add(10)))),
        entry(1, 3, EntryPayload::Normal(once(41, add(10)))),
    ];
    {
        let (_log, mut sm) = store::open(dir.path()).unwrap();
        let resp = sm.apply(entries.clone()).await.unwrap();
        assert_eq!(resp[1], MetaResponse::Applied { epoch: 2 });
        assert_eq!(resp[2], resp[1], "the retry gets the first answer");
        assert_eq!(
            sm.subscribe().borrow().epoch,
            2,
            "the retry changed nothing"
        );
    }
    let (_log, mut sm) = store::open(dir.path()).unwrap();
    let resp = sm
        .apply(vec![
            entry(1, 4, EntryPayload::Normal(once(41, add(10)))),
            entry(1, 5, EntryPayload::Normal(once(42, add(10)))),
        ])
        .await
        .unwrap();
    assert_eq!(
        resp[0],
        MetaResponse::Applied { epoch: 2 },
        "remembered across a reopen"
    );
    assert!(
        matches!(resp[1], MetaResponse::Refused(_)),
        "another nonce is another proposal: {:?}",
        resp[1]
    );
}

fn small_map() -> ClusterMap {
    ClusterMap {
        cluster_id: 7,
        epoch: 1,
        nodes: (0..3)
            .map(|i| NodeEntry {
                id: i,
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                data_dir: None,
                state: MemberState::Up,
                incarnation: 0,
            })
            .collect(),
        volumes: vec![],
        meta: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let members: BTreeMap<u64, BasicNode> = [(1, BasicNode::new("127.0.0.1:7001"))].into();
    let ids: BTreeSet<u64> = members.keys().copied().collect();
    let entries = vec![
        entry(
            1,
            1,
            EntryPayload::Membership(Membership::new(vec![ids], members)),
        ),
        entry(
            1,
            2,
            EntryPayload::Normal(once(0, MetaCommand::Bootstrap { map: small_map() })),
        ),
        entry(
            1,
            3,
            EntryPayload::Normal(once(
                0,
                MetaCommand::Register {
                    node: 1,
                    addr: SocketAddr::from(([127, 0, 0, 1], 9001)),
                    nonce: 0,
                },
            )),
        ),
        entry(2, 4, EntryPayload::Blank),
        entry(
            2,
            5,
            EntryPayload::Normal(once(
                0,
                MetaCommand::MarkUp {
                    node: 1,
                    incarnation: 2,
                },
            )),
        ),
    ];
    let state_after;
    {
        let (mut log, mut sm) = store::open(dir.path()).unwrap();
        log.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_committed(Some(log_id(2, 5))).await.unwrap();
        let resp = sm.apply(entries[..3].to_vec()).await.unwrap();
        assert_eq!(resp[1], MetaResponse::Applied { epoch: 1 });
        assert!(matches!(
            resp[2],
            MetaResponse::Registered { incarnation: 2, .. }
        ));
        // A snapshot at index 3, then the log is purged up to it.
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));
        log.purge(log_id(1, 2)).await.unwrap();
        let resp = sm.apply(entries[3..].to_vec()).await.unwrap();
        assert_eq!(resp[1], MetaResponse::Applied { epoch: 3 });
        state_after = sm.subscribe().borrow().clone();
        assert_eq!(state_after.epoch, 3);
        assert_eq!(state_after.replicas.len(), 1);
    }
    let (mut log, mut sm) = store::open(dir.path()).unwrap();
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(2, 1))
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 5)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(st.last_log_id, Some(log_id(2, 5)));
    let got = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(got, entries[2..].to_vec());
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2, 5)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    assert_eq!(*sm.subscribe().borrow().clone(), *state_after);
    let snap = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));

    // The snapshot installs into a fresh store and replaces its state.
    let other = tempfile::tempdir().unwrap();
    let (_log2, mut sm2) = store::open(other.path()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    let s2 = sm2.subscribe().borrow().clone();
    assert_eq!(s2.epoch, 2);
    assert_eq!(sm2.applied_state().await.unwrap().0, Some(log_id(1, 3)));
    drop(sm2);
    drop(_log2);
    let (_log2, mut sm2) = store::open(other.path()).unwrap();
    assert_eq!(sm2.applied_state().await.unwrap().0, Some(log_id(1, 3)));
    assert_eq!(sm2.subscribe().borrow().epoch, 2);

    // Truncation removes the tail.
    log.truncate(log_id(2, 4)).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = store::open(dir.path()).unwrap();
        log.blocking_append(vec![entry(1, 1, EntryPayload::Blank)])
            .await
            .unwrap();
    }
    // Overwrite the vote and a log entry with garbage, behind the store's back.
    {
        let db = redb::Database::create(dir.path().join(store::DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
            let mut t = txn.open_table(meta).unwrap();
            t.insert("vote", &[0xff_u8; 3][..]).unwrap();
            let log: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raft_log");
            let mut t = txn.open_table(log).unwrap();
            t.insert(1, &[0xee_u8; 5][..]).unwrap();
            // An entry stored under the wrong index.
            let wrong = postcard::to_stdvec(&entry(1, 9, EntryPayload::Blank)).unwrap();
            t.insert(2, wrong.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    let e = log.read_vote().await.unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    let e = log.try_get_log_entries(1..2).await.unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    let e = log.try_get_log_entries(2..3).await.unwrap_err();
    assert!(e.to_string().contains("index"), "{e}");
    // A state-machine record that is not one: opening fails with a typed error.
    {
        drop(log);
        drop(_sm);
        let db = redb::Database::create(dir.path().join(store::DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
            let mut t = txn.open_table(meta).unwrap();
            t.insert("state_machine", &[1_u8, 2, 3][..]).unwrap();
        }
        txn.commit().unwrap();
    }
    match store::open(dir.path()) {
        Err(store::StoreError::Decode { what, .. }) => assert_eq!(what, "state_machine"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a corrupt state machine"),
    }
    // A file that is not a database at all.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join(store::DB_FILE), vec![0x5a; 8192]).unwrap();
    assert!(matches!(
        store::open(bad.path()),
        Err(store::StoreError::Open { .. })
    ));
}

mod namespace {
    //! The namespace is stored a record per inode and per free run: what a persist
    //! writes, a reopen reads back whole; a snapshot larger than a frame builds and
    //! installs; the earlier single-record layout is rewritten when opened.

    use super::*;
    use drs_meta::fs::{FsCommand, FsReply, FsState, Time, ROOT};
    use drs_meta::locks::LockKind;
    use drs_meta::store::SmData;

    const NOW: Time = Time { secs: 5, nanos: 0 };

    fn fs_entry(index: u64, cmd: FsCommand) -> Entry<TypeConfig> {
        entry(
            1,
            index,
            EntryPayload::Normal(once(1000 + index, MetaCommand::Fs(cmd))),
        )
    }

    fn create(name: &str) -> FsCommand {
        crate::common::create_file(name.as_bytes(), NOW)
    }

    /// Applies `cmds` one entry each from log index `*next`; the answers.
    async fn apply(sm: &mut StateMachine, next: &mut u64, cmds: Vec<FsCommand>) -> Vec<FsReply> {
        let entries: Vec<_> = cmds
            .into_iter()
            .map(|c| {
                *next += 1;
                fs_entry(*next - 1, c)
            })
            .collect();
        sm.apply(entries)
            .await
            .unwrap()
            .into_iter()
            .map(|r| match r {
                MetaResponse::Fs(Ok(reply)) => reply,
                other => panic!("refused: {other:?}"),
            })
            .collect()
    }

    fn fs_of(sm: &StateMachine) -> FsState {
        sm.fs().read().clone()
    }

    /// Record counts of the two namespace tables, read behind the store's back.
    fn records(dir: &std::path::Path) -> (u64, u64) {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let db = redb::Database::create(dir.join(store::DB_FILE)).unwrap();
        let txn = db.begin_read().unwrap();
        let inodes: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("fs_inodes");
        let free: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("fs_free");
        let n = txn.open_table(inodes).unwrap().len().unwrap();
        let f = txn.open_table(free).unwrap().len().unwrap();
        (n, f)
    }

    /// A membership and a cluster map, then files with data blocks here and there (so
    /// the free runs split and merge), extended attributes, a rename, a mount's
    /// session with a file open that another truncates (a held freeing), and files
    /// removed (their records must go): every part of the state machine set.
    async fn busy_namespace(sm: &mut StateMachine, next: &mut u64) {
        let members: BTreeMap<u64, BasicNode> = [(1, BasicNode::new("127.0.0.1:7001"))].into();
        let ids: BTreeSet<u64> = members.keys().copied().collect();
        let membership = EntryPayload::Membership(Membership::new(vec![ids], members));
        let bootstrap = EntryPayload::Normal(once(3, MetaCommand::Bootstrap { map: small_map() }));
        sm.apply(vec![
            entry(1, *next, membership),
            entry(1, *next + 1, bootstrap),
        ])
        .await
        .unwrap();
        *next += 2;
        apply(sm, next, vec![crate::common::format(10_000, NOW)]).await;
        let made = apply(
            sm,
            next,
            (0..200).map(|i| create(&format!("f{i}"))).collect(),
        )
        .await;
        let inos: Vec<u64> = made
            .iter()
            .map(|r| match r {
                FsReply::Attr(a) => a.ino,
                other => panic!("{other:?}"),
            })
            .collect();
        let maps = inos
            .iter()
            .enumerate()
            .map(|(i, ino)| FsCommand::Map {
                ino: *ino,
                first: (i as u64 % 7) * 3,
                count: 1 + i as u64 % 5,
                ahead: 0,
            })
            .collect();
        apply(sm, next, maps).await;
        let xattrs = inos
            .iter()
            .step_by(9)
            .map(|ino| FsCommand::SetXattr {
                ino: *ino,
                name: b"user.tag".to_vec(),
                value: ino.to_le_bytes().repeat(20),
                create: true,
                replace: false,
                now: NOW,
            })
            .collect();
        apply(sm, next, xattrs).await;
        let rename = FsCommand::Rename {
            parent: ROOT,
            name: b"f1".to_vec(),
            new_parent: ROOT,
            new_name: b"g1".to_vec(),
            noreplace: false,
            exchange: false,
            now: NOW,
        };
        apply(sm, next, vec![rename]).await;
        let [FsReply::Session(session)] =
            apply(sm, next, vec![FsCommand::OpenSession { now: NOW }]).await[..]
        else {
            panic!("no session");
        };
        let open = FsCommand::Open {
            session,
            ino: inos[5],
        };
        let truncate = FsCommand::SetAttr {
            ino: inos[5],
            set: drs_meta::fs::SetAttr {
                size: Some(0),
                ..Default::default()
            },
            now: NOW,
        };
        apply(sm, next, vec![open, truncate]).await;
        // Byte-range locks of the session: a write lock split by an unlock, and a
        // read lock to the end of a file.
        let lock = |ino: u64, start: u64, end: u64, kind: LockKind| FsCommand::SetLock {
            session,
            ino,
            owner: 77,
            start,
            end,
            kind,
            pid: 4321,
        };
        apply(
            sm,
            next,
            vec![
                lock(inos[5], 0, 99, LockKind::Write),
                lock(inos[5], 10, 19, LockKind::Unlock),
                lock(inos[6], 4096, u64::MAX, LockKind::Read),
            ],
        )
        .await;
        assert_eq!(sm.fs().read().locks().len(), 3);
        assert_eq!(
            sm.fs().read().held().len(),
            1,
            "a freeing held for the session"
        );
        let unlinks = (100..160)
            .map(|i| FsCommand::Unlink {
                parent: ROOT,
                name: format!("f{i}").into_bytes(),
                dir: false,
                now: NOW,
            })
            .collect();
        let drops = apply(sm, next, unlinks)
            .await
            .into_iter()
            .filter_map(|r| match r {
                FsReply::Orphaned(Some(ino)) => Some(FsCommand::Drop { ino }),
                _ => None,
            })
            .collect::<Vec<_>>();
        assert_eq!(drops.len(), 60);
        apply(sm, next, drops).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_persisted_namespace_reopens_whole_with_a_record_per_inode() {
        let dir = tempfile::tempdir().unwrap();
        let mut next = 1;
        let expected = {
            let (_log, mut sm) = store::open(dir.path()).unwrap();
            busy_namespace(&mut sm, &mut next).await;
            fs_of(&sm)
        };
        expected.check().unwrap();
        assert_eq!(expected.inode_count(), 141);
        assert_eq!(
            expected.locks().len(),
            3,
            "the locks are part of what reopens"
        );
        let (inodes, free) = records(dir.path());
        assert_eq!(inodes, 141, "one record per inode, the removed ones gone");
        assert_eq!(free, expected.free_runs().len() as u64);
        assert!(free > 1, "the free list is split: {free}");

        // Persisted only every 1000 entries: a snapshot persists first, so what was
        // applied before it is on disk without the log.
        let (_log, mut sm) = store::open(dir.path()).unwrap();
        assert_eq!(fs_of(&sm), expected);
        sm.set_persist_every(1000);
        let unlinks = (0..40)
            .map(|i| FsCommand::Unlink {
                parent: ROOT,
                name: format!("f{}", 2 + i).into_bytes(),
                dir: false,
                now: NOW,
            })
            .collect();
        let drops: Vec<_> = apply(&mut sm, &mut next, unlinks)
            .await
            .into_iter()
            .filter_map(|r| match r {
                FsReply::Orphaned(Some(ino)) => Some(FsCommand::Drop { ino }),
                _ => None,
            })
            .collect();
        apply(&mut sm, &mut next, drops).await;
        apply(&mut sm, &mut next, vec![create("late")]).await;
        let after = fs_of(&sm);
        assert_ne!(after, expected);
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // Encoded from the records: the same bytes as the state machine's own encoding
        // (the `SmData`, then the locks), which decode to the same state.
        let bytes = snap.snapshot.into_inner();
        assert_eq!(bytes, store::encode_snapshot(sm.data()).unwrap());
        let decoded = store::decode_snapshot(&bytes).unwrap();
        assert_eq!(*decoded.fs.read(), after);
        // Without locks, a snapshot is the `SmData` alone, as before locks existed.
        let mut unlocked = after.clone();
        unlocked.set_locks(Default::default());
        let plain = postcard::to_stdvec(&SmData {
            fs: unlocked.clone().into(),
            ..sm.data().clone()
        })
        .unwrap();
        assert_eq!(*store::decode_snapshot(&plain).unwrap().fs.read(), unlocked);
        drop(sm);
        drop(_log);
        let (inodes, _) = records(dir.path());
        assert_eq!(inodes, after.inode_count() as u64);
        let (_log, sm) = store::open(dir.path()).unwrap();
        assert_eq!(fs_of(&sm), after);
        assert_eq!(
            sm.data().last_applied.map(|l| l.index),
            Some(next - 1),
            "persisted up to the snapshot"
        );
    }

    /// A namespace of more than a frame (some 20 MiB of extended attributes) makes a
    /// snapshot that installs whole into another store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_larger_than_a_frame_builds_and_installs() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = store::open(dir.path()).unwrap();
        let mut next = 1;
        busy_namespace(&mut sm, &mut next).await;
        apply(
            &mut sm,
            &mut next,
            (0..200).map(|i| create(&format!("h{i}"))).collect(),
        )
        .await;
        let inos: Vec<u64> = fs_of(&sm).inodes().keys().copied().collect();
        let big = inos
            .iter()
            .map(|ino| FsCommand::SetXattr {
                ino: *ino,
                name: b"user.big".to_vec(),
                value: vec![*ino as u8; 60 << 10],
                create: false,
                replace: false,
                now: NOW,
            })
            .collect::<Vec<_>>();
        for chunk in big.chunks(64) {
            apply(&mut sm, &mut next, chunk.to_vec()).await;
        }
        let expected = fs_of(&sm);
        assert!(expected.encoded_len() > drs_meta::net::MAX_FRAME_LEN);
        let builder = sm.get_snapshot_builder().await;
        // Applied after the request: not in the snapshot, which the records as of the
        // request make.
        let late = vec![fs_entry(next, create("late"))];
        sm.apply(late).await.unwrap();
        let mut builder = builder;
        let snap = builder.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(next - 1));
        assert_eq!(
            store::decode_snapshot(snap.snapshot.get_ref())
                .unwrap()
                .fs
                .read()
                .clone(),
            expected
        );
        let other = tempfile::tempdir().unwrap();
        {
            let (_log2, mut sm2) = store::open(other.path()).unwrap();
            sm2.install_snapshot(&snap.meta, snap.snapshot)
                .await
                .unwrap();
            assert_eq!(fs_of(&sm2), expected);
            let stored = sm2.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(stored.meta, snap.meta);
        }
        let (_log2, sm2) = store::open(other.path()).unwrap();
        assert_eq!(fs_of(&sm2), expected, "the installed namespace reopens");
    }

    /// A database of the earlier layout (the whole state machine in one record) opens
    /// with the same state, rewritten as a record per inode.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_single_record_layout_is_rewritten_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (data, expected): (SmData, FsState) = {
            let scratch = tempfile::tempdir().unwrap();
            let (_log, mut sm) = store::open(scratch.path()).unwrap();
            let mut next = 1;
            busy_namespace(&mut sm, &mut next).await;
            // That layout had no byte-range locks.
            let mut fs = fs_of(&sm);
            fs.set_locks(Default::default());
            (sm.data().clone(), fs)
        };
        {
            let db = redb::Database::create(dir.path().join(store::DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let meta: redb::TableDefinition<&str, &[u8]> =
                    redb::TableDefinition::new("raft_meta");
                let mut t = txn.open_table(meta).unwrap();
                let old = postcard::to_stdvec(&data).unwrap();
                t.insert("state_machine", old.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        {
            let (_log, sm) = store::open(dir.path()).unwrap();
            assert_eq!(fs_of(&sm), expected);
            assert_eq!(sm.data().last_applied, data.last_applied);
            assert_eq!(sm.data().answered, data.answered);
        }
        assert_eq!(records(dir.path()).0, expected.inode_count() as u64);
        {
            use redb::ReadableDatabase;
            let db = redb::Database::create(dir.path().join(store::DB_FILE)).unwrap();
            let txn = db.begin_read().unwrap();
            let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("raft_meta");
            let t = txn.open_table(meta).unwrap();
            assert!(
                t.get("state_machine").unwrap().is_none(),
                "the old record is gone"
            );
            assert!(t.get("state_head").unwrap().is_some());
        }
        let (_log, sm) = store::open(dir.path()).unwrap();
        assert_eq!(fs_of(&sm), expected);
    }
}
