//! A dead client's half-sent update, made by hand (raw protocol messages, so the
//! timing is exact): the client locks block 0 of stripe 0 at every member, sends its
//! update-and-unlock to the data node only, and goes silent. The next writer of the
//! block must never build on that update while only the data node holds it (report
//! 5.3.3, DESIGN-NOTES I2, I5), and must never reuse its version if the data node
//! dies with it.

use std::time::Duration;

use bytes::Bytes;
use drs_client::CallError;
use drs_proto::{
    BlockUpdate, LockReq, NodeId, Request, Response, UpdateId, UpdateReq, Version, WireError,
};

use crate::common::{bytes, read_ok, TestCluster, BS};

/// The dead client: its lease is `data_lease_ms` at the data node of block 0 and
/// `others_lease_ms` at the other members.
struct DeadClient {
    client: u64,
    owner: u64,
}

impl DeadClient {
    fn new() -> DeadClient {
        DeadClient {
            client: rand::random::<u64>() | 1,
            owner: rand::random(),
        }
    }

    /// Locks block 0 of stripe 0 at every member.
    async fn lock(&self, tc: &TestCluster, data_lease_ms: u32, others_lease_ms: u32) {
        let geo = tc.client.geometry().clone();
        for p in 0..geo.width() {
            let req = Request::Lock(LockReq {
                volume: tc.client.volume().id,
                stripe: 0,
                owner: self.owner,
                indices: vec![0],
                read: None,
                client: self.client,
                lease_ms: if p == 0 {
                    data_lease_ms
                } else {
                    others_lease_ms
                },
                completed: vec![],
                contact: None,
                cache_group: vec![],
            });
            let node = geo.member(0, p);
            // The setup's own write may still be settling: retry as a client would.
            let mut tries = 0;
            loop {
                let r = tc.client.call(node, &req, Bytes::new()).await;
                match r {
                    Ok((Response::Lock(_), _)) => break,
                    Err(CallError::Remote(WireError::Settling { .. })) if tries < 100 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("lock at node {node}: {other:?}"),
                }
            }
        }
    }

    /// Update-and-unlock of block 0 to `version` (built on `base`) at the members in
    /// `positions` only; the delta turns `old` into `new`.
    async fn update(
        &self,
        tc: &TestCluster,
        positions: &[usize],
        (base, version): (Version, Version),
        old: &[u8],
        new: &[u8],
    ) {
        let geo = tc.client.geometry().clone();
        let delta: Vec<u8> = old.iter().zip(new).map(|(a, b)| a ^ b).collect();
        for &p in positions {
            let req = Request::Update(UpdateReq {
                volume: tc.client.volume().id,
                stripe: 0,
                position: p as u8,
                owner: self.owner,
                updates: vec![BlockUpdate {
                    id: UpdateId {
                        client: self.client,
                        seq: 1,
                    },
                    index: 0,
                    version,
                    base,
                    offset: 0,
                    len: BS as u32,
                }],
                unlock: vec![(0, version)],
                relay: false,
                on_behalf: false,
                completed: vec![],
                keep: Vec::new(),
            });
            let node = geo.member(0, p);
            let r = tc.client.call(node, &req, Bytes::from(delta.clone())).await;
            assert!(
                matches!(r, Ok((Response::Updated(_), _))),
                "update at node {node}: {r:?}"
            );
        }
    }
}

fn data_node(tc: &TestCluster) -> NodeId {
    tc.client.geometry().member(0, 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_writer_waits_until_a_dead_clients_update_reached_every_member() {
    // The dead client's lease is long at the data node (which therefore would pass the
    // update on only much later) and short at the others (which release its lock
    // early). The next writer must still not be able to build on the update before
    // the others hold it: once its write returns, the data node may die.
    let tc = TestCluster::start("dead-client-settling").await;
    let old = bytes(1, BS);
    tc.client.write(0, 0, &old).await.unwrap();
    let dead = DeadClient::new();
    dead.lock(&tc, 20_000, 300).await;
    let first = bytes(2, BS);
    dead.update(&tc, &[0], (1, 2), &old, &first).await;
    // The other members' leases run out; the data node's does not.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let second = bytes(3, BS);
    tc.client.write(0, 0, &second).await.unwrap();
    tc.kill(data_node(&tc));
    let got = read_ok(&tc.client, 0, "degraded, after the data node died").await;
    assert!(
        got[..] == second[..],
        "the acknowledged write is not readable without the data node (it was built on an update only the data node had): got the {} bytes",
        if got[..] == old[..] { "old" } else if got[..] == first[..] { "dead client's" } else { "wrong" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_clients_version_held_by_a_dead_node_is_never_reused() {
    // The data node takes the dead client's update and dies before passing it on; the
    // others release the dead client's lock; the next write must not give its update
    // the same version, or the returning data node would count its block up to date.
    let tc = TestCluster::start("dead-client-void").await;
    let old = bytes(4, BS);
    tc.client.write(0, 0, &old).await.unwrap();
    let dead = DeadClient::new();
    dead.lock(&tc, 20_000, 300).await;
    let first = bytes(5, BS);
    dead.update(&tc, &[0], (1, 2), &old, &first).await;
    let d = data_node(&tc);
    tc.kill(d);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let second = bytes(6, BS);
    tc.client.write(0, 0, &second).await.unwrap();
    tc.restart(d);
    tc.wait_all_up().await;
    let got = read_ok(&tc.client, 0, "after the data node rejoined").await;
    assert!(
        got[..] == second[..],
        "block 0 does not read as the acknowledged write after the data node rejoined: {}",
        if got[..] == first[..] {
            "it reads as the dead client's update"
        } else {
            "other bytes"
        }
    );
    crate::common::assert_scrub_clean(&tc.client, "after the rejoin").await;
}
