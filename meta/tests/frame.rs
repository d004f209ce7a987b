//! The metadata frame decoder: oversized lengths are refused before any allocation,
//! bad checksums and garbage are refused, nothing panics, and every message survives
//! encode/decode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use bytes::{BufMut, BytesMut};
use drs_meta::net::{
    decode_frame, decode_message, encode_frame, encode_message, FrameError, FullSnapshot,
    HeartbeatAck, MetaCodec, MetaStatus, Request, RequestEnvelope, Response, Role, WireError,
    HEADER_LEN, MAGIC, MAX_FRAME_LEN,
};
use drs_meta::{
    MetaCommand, MetaResponse, MetaState, NodeRecord, NodeState, Proposal, Refusal, TypeConfig,
};
use drs_proto::map::{ClusterMap, MetaReplica, NodeEntry, VolumeConfig};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    StoredMembership, Vote,
};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn header(len: u32, crc: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_slice(&MAGIC);
    b.put_u32_le(len);
    b.put_u32_le(crc);
    b
}

#[test]
fn oversized_lengths_are_refused_before_allocating() {
    for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut buf = header(len, 0);
        let cap = buf.capacity();
        match decode_frame(&mut buf) {
            Err(FrameError::TooLarge { len: l }) => assert_eq!(l, len as usize),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(buf.capacity(), cap, "nothing reserved for the body");
        assert!(buf.capacity() < 1024);
    }
    // At the limit: accepted, waits for the body.
    let mut buf = header(MAX_FRAME_LEN as u32, 0);
    assert!(matches!(decode_frame(&mut buf), Ok(None)));
    // Encoding refuses too.
    let big = vec![0u8; MAX_FRAME_LEN + 1];
    assert!(matches!(
        encode_frame(&big, &mut BytesMut::new()),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn bad_checksums_are_refused() {
    let mut frame = BytesMut::new();
    encode_frame(b"hello metadata", &mut frame).unwrap();
    for bit in 0..(frame.len() - HEADER_LEN) * 8 {
        let mut f = frame.clone();
        f[HEADER_LEN + bit / 8] ^= 1 << (bit % 8);
        assert!(
            matches!(decode_frame(&mut f), Err(FrameError::Checksum { .. })),
            "payload bit {bit}"
        );
    }
    // A flipped checksum byte too.
    let mut f = frame.clone();
    f[9] ^= 0x40;
    assert!(matches!(
        decode_frame(&mut f),
        Err(FrameError::Checksum { .. })
    ));
    // The intact frame decodes.
    let mut f = frame.clone();
    assert_eq!(
        &decode_frame(&mut f).unwrap().unwrap()[..],
        b"hello metadata"
    );
    assert!(f.is_empty());
}

#[test]
fn garbage_is_refused_as_soon_as_the_magic_is_wrong() {
    for garbage in [
        &b"G"[..],
        b"DRX",
        b"GET / HTTP/1.1\r\n",
        b"\0\0\0\0\0\0\0\0\0\0\0\0",
    ] {
        let mut b = BytesMut::from(garbage);
        assert!(
            matches!(decode_frame(&mut b), Err(FrameError::BadMagic(_))),
            "{garbage:?}"
        );
    }
    // A valid frame with a garbage payload: the frame is fine, the message is not.
    let mut f = BytesMut::new();
    encode_frame(&[0xff; 40], &mut f).unwrap();
    let payload = decode_frame(&mut f).unwrap().unwrap();
    assert!(matches!(
        decode_message::<RequestEnvelope>(&payload),
        Err(FrameError::Decode(_))
    ));
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let mut whole = BytesMut::new();
    encode_frame(b"one", &mut whole).unwrap();
    encode_frame(b"two", &mut whole).unwrap();
    let mut codec = MetaCodec;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in whole.iter() {
        buf.put_u8(*byte);
        while let Some(p) = codec.decode(&mut buf).unwrap() {
            out.push(p);
        }
    }
    assert_eq!(out, vec![&b"one"[..], &b"two"[..]]);
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
    ]
}

fn node_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        Just(NodeState::Up),
        Just(NodeState::Down),
        Just(NodeState::Recovering)
    ]
}

fn volume() -> impl Strategy<Value = VolumeConfig> {
    (
        any::<u32>(),
        1u8..6,
        1u8..4,
        any::<u32>(),
        any::<u64>(),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 0..3),
        prop::collection::vec(any::<u32>(), 0..8),
    )
        .prop_map(
            |(id, k, m, block_size, blocks, coefficients, nodes)| VolumeConfig {
                id,
                k,
                m,
                block_size,
                blocks,
                min_write: k,
                coefficients,
                nodes,
            },
        )
}

fn cluster_map() -> impl Strategy<Value = ClusterMap> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(
            (
                any::<u32>(),
                addr(),
                prop::option::of("[a-z/]{1,12}"),
                node_state(),
                any::<u64>(),
            ),
            0..5,
        ),
        prop::collection::vec(volume(), 0..2),
        prop::collection::vec((any::<u64>(), addr(), prop::option::of(any::<u32>())), 0..3),
    )
        .prop_map(|(cluster_id, epoch, nodes, volumes, meta)| ClusterMap {
            cluster_id,
            epoch,
            nodes: nodes
                .into_iter()
                .map(|(id, addr, dir, state, incarnation)| NodeEntry {
                    id,
                    addr,
                    data_dir: dir.map(Into::into),
                    state,
                    incarnation,
                })
                .collect(),
            volumes,
            meta: meta
                .into_iter()
                .map(|(id, addr, host)| MetaReplica {
                    id,
                    addr,
                    host,
                    join: false,
                })
                .collect(),
        })
}

fn command() -> impl Strategy<Value = MetaCommand> {
    prop_oneof![
        cluster_map().prop_map(|map| MetaCommand::Bootstrap { map }),
        (any::<u32>(), addr()).prop_map(|(node, addr)| MetaCommand::Register {
            node,
            addr,
            nonce: 0,
        }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(node, incarnation)| MetaCommand::MarkUp { node, incarnation }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(node, incarnation)| MetaCommand::MarkDown { node, incarnation }),
        (any::<u32>(), addr()).prop_map(|(node, addr)| MetaCommand::Replace { node, addr }),
        (any::<u32>(), addr()).prop_map(|(node, addr)| MetaCommand::AddNode { node, addr }),
        any::<u32>().prop_map(|node| MetaCommand::RemoveNode { node }),
    ]
}

fn record() -> impl Strategy<Value = NodeRecord> {
    (
        addr(),
        any::<u64>(),
        node_state(),
        prop::option::of("[a-z/]{1,12}"),
    )
        .prop_map(|(addr, incarnation, state, dir)| NodeRecord {
            addr,
            incarnation,
            state,
            register_nonce: 0,
            data_dir: dir.map(Into::into),
        })
}

fn meta_state() -> impl Strategy<Value = MetaState> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::collection::btree_map(any::<u32>(), record(), 0..5),
        prop::collection::vec(volume(), 0..2),
        prop::collection::btree_map(any::<u64>(), addr(), 0..4),
        prop::collection::btree_map(any::<u64>(), any::<u32>(), 0..3),
    )
        .prop_map(
            |(cluster_id, epoch, nodes, volumes, replicas, replica_hosts)| MetaState {
                cluster_id,
                epoch,
                nodes,
                volumes,
                replicas,
                replica_hosts,
            },
        )
}

fn log_id() -> impl Strategy<Value = LogId<u64>> {
    (any::<u64>(), any::<u64>(), any::<u64>())
        .prop_map(|(t, n, i)| LogId::new(CommittedLeaderId::new(t, n), i))
}

fn proposal() -> impl Strategy<Value = Proposal> {
    (any::<u64>(), command()).prop_map(|(nonce, cmd)| Proposal { nonce, cmd })
}

fn entry() -> impl Strategy<Value = Entry<TypeConfig>> {
    let payload = prop_oneof![
        Just(EntryPayload::<TypeConfig>::Blank),
        proposal().prop_map(EntryPayload::Normal),
        prop::collection::btree_map(any::<u64>(), "[0-9.:]{0,21}", 1..4).prop_map(|nodes| {
            let ids: BTreeSet<u64> = nodes.keys().copied().collect();
            let nodes: BTreeMap<u64, BasicNode> = nodes
                .into_iter()
                .map(|(k, v)| (k, BasicNode::new(v)))
                .collect();
            EntryPayload::Membership(Membership::new(vec![ids], nodes))
        }),
    ];
    (log_id(), payload).prop_map(|(log_id, payload)| Entry { log_id, payload })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            any::<(u64, u64)>(),
            prop::option::of(log_id()),
            prop::collection::vec(entry(), 0..4),
            prop::option::of(log_id())
        )
            .prop_map(
                |((t, n), prev, entries, commit)| Request::AppendEntries(Box::new(
                    AppendEntriesRequest {
                        vote: Vote::new_committed(t, n),
                        prev_log_id: prev,
                        entries,
                        leader_commit: commit,
                    }
                ))
            ),
        (any::<(u64, u64)>(), prop::option::of(log_id()))
            .prop_map(|((t, n), last)| { Request::Vote(VoteRequest::new(Vote::new(t, n), last)) }),
        (
            any::<(u64, u64)>(),
            prop::option::of(log_id()),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|((t, n), last, data)| Request::FullSnapshot(Box::new(
                FullSnapshot {
                    vote: Vote::new_committed(t, n),
                    meta: SnapshotMeta {
                        last_log_id: last,
                        last_membership: StoredMembership::default(),
                        snapshot_id: format!("{t}-{n}"),
                    },
                    data,
                }
            ))),
        proposal().prop_map(Request::Propose),
        Just(Request::Read),
        Just(Request::Status),
        (any::<u32>(), any::<u64>())
            .prop_map(|(node, incarnation)| Request::Heartbeat { node, incarnation }),
        (any::<u64>(), any::<u32>()).prop_map(|(after_epoch, wait_ms)| Request::Watch {
            after_epoch,
            wait_ms
        }),
        (any::<u64>(), addr()).prop_map(|(id, addr)| Request::AddReplica { id, addr }),
        any::<u64>().prop_map(|id| Request::RemoveReplica { id }),
    ]
}

fn meta_response() -> impl Strategy<Value = MetaResponse> {
    prop_oneof![
        any::<u64>().prop_map(|epoch| MetaResponse::Applied { epoch }),
        any::<u64>().prop_map(|epoch| MetaResponse::Unchanged { epoch }),
        any::<(u64, u64)>()
            .prop_map(|(incarnation, epoch)| MetaResponse::Registered { incarnation, epoch }),
        any::<u32>().prop_map(|n| MetaResponse::Refused(Refusal::UnknownNode(n))),
        (any::<u32>(), node_state()).prop_map(|(node, state)| MetaResponse::Refused(
            Refusal::NotRecovering { node, state }
        )),
        "[ -~]{0,20}".prop_map(|s| MetaResponse::Refused(Refusal::InvalidMap(s))),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(()).prop_map(|_| Response::AppendEntries(AppendEntriesResponse::Success)),
        prop::option::of(log_id())
            .prop_map(|l| Response::AppendEntries(AppendEntriesResponse::PartialSuccess(l))),
        (
            any::<(u64, u64)>(),
            prop::option::of(log_id()),
            any::<bool>()
        )
            .prop_map(|((t, n), last, granted)| Response::Vote(VoteResponse::new(
                Vote::new(t, n),
                last,
                granted
            ))),
        meta_response().prop_map(Response::Proposed),
        meta_state().prop_map(|s| Response::State(Box::new(s))),
        (
            any::<u64>(),
            prop::option::of(any::<u64>()),
            any::<(u64, u64, u64)>(),
            prop::collection::btree_map(any::<u64>(), addr(), 0..4)
        )
            .prop_map(|(id, leader, (term, last_applied, epoch), members)| {
                Response::Status(Box::new(MetaStatus {
                    id,
                    role: Role::Follower,
                    leader,
                    term,
                    last_applied,
                    epoch,
                    members,
                    learners: BTreeMap::new(),
                }))
            }),
        (any::<u64>(), prop::option::of(record()))
            .prop_map(|(epoch, record)| Response::HeartbeatAck(HeartbeatAck { epoch, record })),
        prop::collection::btree_map(any::<u64>(), addr(), 0..4).prop_map(Response::Members),
        prop::option::of((any::<u64>(), prop::option::of(addr())))
            .prop_map(|leader| Response::Error(WireError::ForwardToLeader { leader })),
        "[ -~]{0,20}".prop_map(|s| Response::Error(WireError::Timeout(s))),
    ]
}

/// Through a frame and back, split at an arbitrary point.
fn through_frame(payload: &[u8], split: usize) -> Vec<u8> {
    let mut whole = BytesMut::new();
    encode_frame(payload, &mut whole).unwrap();
    let split = split % (whole.len() + 1);
    let mut buf = BytesMut::from(&whole[..split]);
    let first = decode_frame(&mut buf).unwrap();
    if split < whole.len() {
        assert!(first.is_none());
        buf.extend_from_slice(&whole[split..]);
        decode_frame(&mut buf).unwrap().unwrap().to_vec()
    } else {
        first.unwrap().to_vec()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn commands_and_states_round_trip(cmd in command(), state in meta_state()) {
        let bytes = encode_message(&cmd).unwrap();
        prop_assert_eq!(decode_message::<MetaCommand>(&bytes).unwrap(), cmd);
        let bytes = encode_message(&state).unwrap();
        prop_assert_eq!(decode_message::<MetaState>(&bytes).unwrap(), state);
    }

    #[test]
    fn requests_round_trip(body in request(), cluster_id in any::<u64>(), deadline_ms in any::<u32>(), split in any::<usize>()) {
        let env = RequestEnvelope { cluster_id, deadline_ms, body };
        let bytes = encode_message(&env).unwrap();
        let back: RequestEnvelope = decode_message(&through_frame(&bytes, split)).unwrap();
        prop_assert_eq!(back.cluster_id, cluster_id);
        prop_assert_eq!(back.deadline_ms, deadline_ms);
        // Raft requests have no PartialEq: compare their (deterministic) encodings and
        // their debug forms.
        prop_assert_eq!(format!("{:?}", back.body), format!("{:?}", env.body));
        prop_assert_eq!(encode_message(&back).unwrap(), bytes);
    }

    #[test]
    fn responses_round_trip(resp in response(), split in any::<usize>()) {
        let bytes = encode_message(&resp).unwrap();
        let back: Response = decode_message(&through_frame(&bytes, split)).unwrap();
        prop_assert_eq!(back, resp);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
        let mut buf = BytesMut::new();
        if magic {
            buf.put_slice(&MAGIC);
        }
        buf.put_slice(&bytes);
        let _ = decode_frame(&mut buf);
        let _ = decode_message::<RequestEnvelope>(&bytes);
        let _ = decode_message::<Response>(&bytes);
    }
}
