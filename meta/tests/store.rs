//! The redb store: openraft's storage test suite, recovery after reopening, and typed
//! errors (not panics) on corrupt records.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

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
