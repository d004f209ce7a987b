//! The pure state machine: refusals, the bootstrap round trip, and properties over
//! random command sequences (determinism, epochs, incarnations).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use drs_meta::{MetaCommand, MetaResponse, MetaState, NodeState, Refusal};
use drs_proto::map::{ClusterMap, MemberState, MetaReplica, NodeEntry, VolumeConfig};
use proptest::prelude::*;

fn addr(i: u32) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, (i % 250) as u8], 7000 + (i / 250) as u16))
}

fn map(nodes: u32) -> ClusterMap {
    ClusterMap {
        cluster_id: 0xabc,
        epoch: 5,
        nodes: (0..nodes)
            .map(|i| NodeEntry {
                id: i,
                addr: addr(i),
                data_dir: (i % 2 == 0).then(|| format!("/tmp/n{i}").into()),
                state: MemberState::Up,
                incarnation: 0,
            })
            .collect(),
        volumes: vec![VolumeConfig {
            id: 7,
            k: 2,
            m: 1,
            block_size: 4096,
            blocks: 100,
            min_write: 2,
            coefficients: vec![vec![1, 1]],
            nodes: vec![0, 1, 2],
        }],
        meta: vec![MetaReplica {
            id: 1,
            addr: "127.0.0.1:9000".parse().unwrap(),
            host: Some(0),
            join: false,
        }],
    }
}

fn bootstrapped(nodes: u32) -> MetaState {
    let mut s = MetaState::default();
    let r = s.apply(&MetaCommand::Bootstrap { map: map(nodes) });
    assert_eq!(r, MetaResponse::Applied { epoch: 5 });
    s
}

#[test]
fn bootstrap_gives_back_the_map_with_every_node_up() {
    let mut s = MetaState::default();
    assert!(!s.is_bootstrapped());
    assert_eq!(
        s.apply(&MetaCommand::MarkUp {
            node: 0,
            incarnation: 0
        }),
        MetaResponse::Refused(Refusal::NotBootstrapped)
    );
    // Replica changes before the bootstrap do not make an epoch.
    s.set_replicas([(1, "127.0.0.1:9000".parse().unwrap())].into());
    assert_eq!(s.epoch, 0);
    s.apply(&MetaCommand::Bootstrap { map: map(4) });
    let got = s.cluster_map();
    let mut want = map(4);
    for n in &mut want.nodes {
        n.incarnation = 1;
    }
    assert_eq!(got, want);
    got.validate().unwrap();
    assert!(s.nodes.values().all(|r| r.state == NodeState::Up));
    assert!(matches!(
        s.apply(&MetaCommand::Bootstrap { map: map(4) }),
        MetaResponse::Refused(Refusal::AlreadyBootstrapped { cluster_id: 0xabc })
    ));
    // A bootstrap epoch below the current one still moves forward.
    let mut s = MetaState::default();
    let mut m = map(4);
    m.epoch = 0;
    assert_eq!(
        s.apply(&MetaCommand::Bootstrap { map: m }),
        MetaResponse::Applied { epoch: 1 }
    );
    // An invalid map is refused.
    let mut s = MetaState::default();
    let mut m = map(4);
    m.volumes[0].nodes = vec![0, 1, 9];
    assert!(matches!(
        s.apply(&MetaCommand::Bootstrap { map: m }),
        MetaResponse::Refused(Refusal::InvalidMap(_))
    ));
    assert_eq!(s, MetaState::default());
}

#[test]
fn node_lifecycle_and_refusals() {
    let mut s = bootstrapped(4);
    let reg = |node| MetaCommand::Register {
        node,
        addr: addr(node),
        nonce: 0,
    };
    assert_eq!(
        s.apply(&reg(1)),
        MetaResponse::Registered {
            incarnation: 2,
            epoch: 6
        }
    );
    assert_eq!(s.nodes[&1].state, NodeState::Recovering);
    assert!(matches!(
        s.apply(&MetaCommand::Register {
            node: 1,
            addr: addr(3),
            nonce: 0,
        }),
        MetaResponse::Refused(Refusal::AddressMismatch { node: 1, .. })
    ));
    assert_eq!(
        s.apply(&MetaCommand::MarkUp {
            node: 1,
            incarnation: 1
        }),
        MetaResponse::Refused(Refusal::StaleIncarnation {
            node: 1,
            current: 2,
            given: 1
        })
    );
    assert_eq!(
        s.apply(&MetaCommand::MarkUp {
            node: 1,
            incarnation: 2
        }),
        MetaResponse::Applied { epoch: 7 }
    );
    let down = MetaCommand::MarkDown {
        node: 1,
        incarnation: 2,
    };
    assert_eq!(s.apply(&down), MetaResponse::Applied { epoch: 8 });
    assert_eq!(s.apply(&down), MetaResponse::Unchanged { epoch: 8 });
    // Down -> Up needs a new registration.
    assert_eq!(
        s.apply(&MetaCommand::MarkUp {
            node: 1,
            incarnation: 2
        }),
        MetaResponse::Refused(Refusal::NotRecovering {
            node: 1,
            state: NodeState::Down
        })
    );
    // Replace moves the node, to a free address only.
    assert!(matches!(
        s.apply(&MetaCommand::Replace {
            node: 1,
            addr: addr(2)
        }),
        MetaResponse::Refused(Refusal::AddressInUse { node: 2, .. })
    ));
    assert_eq!(
        s.apply(&MetaCommand::Replace {
            node: 1,
            addr: addr(100)
        }),
        MetaResponse::Applied { epoch: 9 }
    );
    assert_eq!(s.nodes[&1].incarnation, 3);
    assert_eq!(s.nodes[&1].addr, addr(100));
    assert_eq!(s.nodes[&1].state, NodeState::Recovering);
    // Add and remove.
    assert_eq!(
        s.apply(&MetaCommand::AddNode {
            node: 9,
            addr: addr(9)
        }),
        MetaResponse::Applied { epoch: 10 }
    );
    assert_eq!(s.nodes[&9].state, NodeState::Down);
    assert_eq!(s.nodes[&9].incarnation, 0);
    assert_eq!(
        s.apply(&MetaCommand::AddNode {
            node: 9,
            addr: addr(19)
        }),
        MetaResponse::Refused(Refusal::NodeExists(9))
    );
    assert_eq!(
        s.apply(&reg(9)),
        MetaResponse::Registered {
            incarnation: 1,
            epoch: 11
        }
    );
    assert_eq!(
        s.apply(&MetaCommand::RemoveNode { node: 2 }),
        MetaResponse::Refused(Refusal::NodeInUse { node: 2, volume: 7 })
    );
    assert_eq!(
        s.apply(&MetaCommand::RemoveNode { node: 9 }),
        MetaResponse::Applied { epoch: 12 }
    );
    assert_eq!(
        s.apply(&MetaCommand::RemoveNode { node: 9 }),
        MetaResponse::Refused(Refusal::UnknownNode(9))
    );
    // Replica changes move the epoch once bootstrapped; the map lists them.
    s.set_replicas(
        [
            (1, "127.0.0.1:9000".parse().unwrap()),
            (2, "127.0.0.1:9001".parse().unwrap()),
        ]
        .into(),
    );
    assert_eq!(s.epoch, 13);
    s.set_replicas(s.replicas.clone());
    assert_eq!(s.epoch, 13);
    let m = s.cluster_map();
    assert_eq!(m.meta.len(), 2);
    assert_eq!(m.meta[0].host, Some(0));
    assert_eq!(m.meta[1].host, None);
}

/// One step of a random history.
#[derive(Debug, Clone)]
enum Op {
    Cmd(MetaCommand),
    Replicas(BTreeMap<u64, SocketAddr>),
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0u32..10;
    let inc = 0u64..6;
    let a = (0u32..12).prop_map(addr);
    prop_oneof![
        1 => (3u32..8).prop_map(|n| Op::Cmd(MetaCommand::Bootstrap { map: map(n) })),
        3 => (node.clone(), a.clone()).prop_map(|(node, addr)| Op::Cmd(MetaCommand::Register {
            node,
            addr,
            nonce: 0,
        })),
        3 => (node.clone(), inc.clone()).prop_map(|(node, incarnation)| Op::Cmd(MetaCommand::MarkUp { node, incarnation })),
        3 => (node.clone(), inc).prop_map(|(node, incarnation)| Op::Cmd(MetaCommand::MarkDown { node, incarnation })),
        1 => (node.clone(), a.clone()).prop_map(|(node, addr)| Op::Cmd(MetaCommand::Replace { node, addr })),
        1 => (node.clone(), a).prop_map(|(node, addr)| Op::Cmd(MetaCommand::AddNode { node, addr })),
        1 => node.prop_map(|node| Op::Cmd(MetaCommand::RemoveNode { node })),
        1 => prop::collection::btree_map(1u64..4, (0u32..3).prop_map(addr), 0..3).prop_map(Op::Replicas),
    ]
}

/// Everything but the epoch.
fn content(s: &MetaState) -> MetaState {
    MetaState {
        epoch: 0,
        ..s.clone()
    }
}

fn run(ops: &[Op]) -> (MetaState, Vec<Option<MetaResponse>>) {
    let mut s = MetaState::default();
    let out = ops
        .iter()
        .map(|op| match op {
            Op::Cmd(c) => Some(s.apply(c)),
            Op::Replicas(r) => {
                s.set_replicas(r.clone());
                None
            }
        })
        .collect();
    (s, out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn apply_is_deterministic(ops in prop::collection::vec(op(), 0..60)) {
        let (a, ra) = run(&ops);
        let (b, rb) = run(&ops);
        prop_assert_eq!(a, b);
        prop_assert_eq!(ra, rb);
    }

    #[test]
    fn epochs_and_incarnations(ops in prop::collection::vec(op(), 0..60)) {
        let mut s = MetaState::default();
        for op in &ops {
            let before = s.clone();
            let resp = match op {
                Op::Cmd(c) => Some(s.apply(c)),
                Op::Replicas(r) => { s.set_replicas(r.clone()); None }
            };
            // The epoch never decreases, and moves exactly when something it versions
            // changed (the replica list counts only once bootstrapped).
            prop_assert!(s.epoch >= before.epoch);
            let changed = if before.is_bootstrapped() {
                content(&s) != content(&before)
            } else {
                content(&s) != MetaState { replicas: s.replicas.clone(), ..content(&before) }
            };
            prop_assert_eq!(s.epoch > before.epoch, changed, "op {:?}", op);
            let is_bootstrap = matches!(op, Op::Cmd(MetaCommand::Bootstrap { .. }));
            if changed && !is_bootstrap {
                prop_assert_eq!(s.epoch, before.epoch + 1);
            }
            // Incarnations only grow.
            for (id, rec) in &s.nodes {
                if let Some(old) = before.nodes.get(id) {
                    prop_assert!(rec.incarnation >= old.incarnation);
                }
            }
            // A refusal changes nothing; a response's epoch is the state's.
            match &resp {
                Some(MetaResponse::Refused(_)) => prop_assert_eq!(&s, &before),
                Some(r) => prop_assert_eq!(r.epoch(), Some(s.epoch)),
                None => {}
            }
            if let Some(MetaResponse::Registered { incarnation, .. }) = resp {
                let Op::Cmd(MetaCommand::Register { node, .. }) = op else { unreachable!() };
                prop_assert_eq!(s.nodes[node].incarnation, incarnation);
                prop_assert_eq!(s.nodes[node].state, NodeState::Recovering);
            }
            // The data-path map always validates once bootstrapped.
            if s.is_bootstrapped() {
                prop_assert!(s.cluster_map().validate().is_ok());
            }
        }
    }
}

/// A registration sent again (its answer lost, say to a leader change) with the same
/// nonce gets the same incarnation and changes nothing; a new nonce is a new start.
#[test]
fn a_retried_registration_is_applied_once() {
    let mut s = bootstrapped(4);
    let reg = |nonce| MetaCommand::Register {
        node: 2,
        addr: addr(2),
        nonce,
    };
    let first = s.apply(&reg(77));
    let state = s.clone();
    assert_eq!(s.apply(&reg(77)), first, "a retry answers the same");
    assert_eq!(s, state, "a retry changes nothing");
    let MetaResponse::Registered { incarnation, .. } = first else {
        panic!("{first:?}")
    };
    assert!(matches!(
        s.apply(&reg(78)),
        MetaResponse::Registered { incarnation: i, .. } if i == incarnation + 1
    ));
}

#[test]
fn large_map_answers_are_applied_again_on_retry_not_kept() {
    use drs_meta::fs::{FsReply, Mapping};
    use drs_meta::Answered;
    // Answers of `Map`s of 4096 blocks each: some 45 KiB encoded.
    let big = |i: u64| {
        MetaResponse::Fs(Ok(FsReply::Mapped(
            (0..4096)
                .map(|b| Mapping {
                    block: b,
                    lba: 1_000_000 + i * 4096 + b,
                    fresh: true,
                })
                .collect(),
        )))
    };
    let mut a = Answered::default();
    for i in 1..=5000u64 {
        assert_eq!(a.apply_with(i, || big(i)), big(i));
    }
    // The window is still the whole count, in little room.
    assert_eq!(a.len(), Answered::MAX);
    let bytes = postcard::to_stdvec(&a).unwrap().len();
    assert!(bytes < 256 << 10, "{bytes} bytes remembered");
    // A retry of a remembered `Map` is applied again (a `Map` is idempotent), and
    // answered with what that gives.
    let mut again = 0;
    assert_eq!(
        a.apply_with(4000, || {
            again += 1;
            big(4000)
        }),
        big(4000)
    );
    assert_eq!(again, 1);
    // A small answer is answered from memory.
    a.apply_with(6000, || MetaResponse::Unchanged { epoch: 3 });
    assert_eq!(
        a.apply_with(6000, || panic!("a remembered proposal applied again")),
        MetaResponse::Unchanged { epoch: 3 }
    );
}

#[test]
fn remembered_answers_are_bounded_in_bytes_and_evict_alike_after_a_reload() {
    use drs_meta::fs::{DirEntry, FsReply, Kind};
    use drs_meta::Answered;
    // Large answers that are kept whole (no proposal answers so today: the bound
    // guards the record against ones that might).
    let big = |i: u64| {
        MetaResponse::Fs(Ok(FsReply::Entries(
            (0..1000)
                .map(|e| DirEntry {
                    ino: i * 1000 + e,
                    name: format!("entry-{e:08}").into_bytes(),
                    kind: Kind::File,
                })
                .collect(),
        )))
    };
    let mut a = Answered::default();
    let mut applied = 0;
    for i in 1..=200u64 {
        a.apply_with(i, || {
            applied += 1;
            big(i)
        });
    }
    assert_eq!(applied, 200);
    let bytes = postcard::to_stdvec(&a).unwrap().len();
    assert!(
        bytes <= Answered::MAX_BYTES + 64 * 1024,
        "{bytes} bytes remembered"
    );
    assert!(
        a.len() >= 40 && a.len() < 200,
        "{} answers remembered",
        a.len()
    );
    // The newest is still recognised; the oldest was forgotten.
    a.apply_with(200, || panic!("a remembered proposal applied again"));
    let mut again = false;
    a.apply_with(1, || {
        again = true;
        big(1)
    });
    assert!(again);
    // A replica that loads the same answers (its byte count not stored) evicts at
    // the same point as one that kept counting.
    let mut loaded: Answered = postcard::from_bytes(&postcard::to_stdvec(&a).unwrap()).unwrap();
    for i in 300..340u64 {
        a.apply_with(i, || big(i));
        loaded.apply_with(i, || big(i));
        assert_eq!(a, loaded);
        assert_eq!(a.len(), loaded.len());
    }
}
