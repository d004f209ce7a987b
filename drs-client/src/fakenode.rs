//! Fake nodes for the client's unit tests: each keeps a lock table and answers
//! locks, unlocks, updates (taken, not stored) and heartbeats, and counts the
//! heartbeats it answered. One can be told to stop reading a connection once it
//! granted a lock on it, as a node does whose reader waits behind a busy store, to
//! go silent (answer nothing, as a hung node), or to drop unlocks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use drs_proto::{
    Applied, ClientId, ClusterMap, Frame, FrameHeader, FrameKind, LockReply, MemberState,
    NodeEntry, Request, Response, StripeId, UpdateReply, VolumeConfig, WireError,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

pub const CLUSTER: u64 = 0xC3;

/// (stripe, index) -> owner.
pub type Table = Arc<Mutex<HashMap<(StripeId, u8), ClientId>>>;

/// One fake node's state, as the test sees it.
#[derive(Clone, Default)]
pub struct FakeNode {
    pub table: Table,
    pub heartbeats: Arc<AtomicUsize>,
    /// Set: reads requests and answers none.
    pub silent: Arc<AtomicBool>,
    /// Set: takes unlocks but neither applies nor answers them (a node that is
    /// alive, slow with them).
    pub drop_unlocks: Arc<AtomicBool>,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn answer(node: &FakeNode, req: Request) -> Response {
    let mut t = lock(&node.table);
    match req {
        Request::Lock(r) => {
            if let Some((&(_, index), &holder)) = t
                .iter()
                .find(|((s, i), o)| *s == r.stripe && r.indices.contains(i) && **o != r.owner)
            {
                return Response::Error(WireError::Locked {
                    stripe: r.stripe,
                    index,
                    holder,
                    client: holder,
                    contact: None,
                });
            }
            for i in &r.indices {
                t.insert((r.stripe, *i), r.owner);
            }
            Response::Lock(LockReply {
                known: r.indices.iter().map(|i| (*i, 0)).collect(),
                fenced: vec![],
                read: None,
            })
        }
        Request::Unlock(r) => {
            for (i, _) in &r.blocks {
                if t.get(&(r.stripe, *i)) == Some(&r.owner) {
                    t.remove(&(r.stripe, *i));
                }
            }
            Response::Unlocked
        }
        Request::Update(r) => {
            for (i, _) in &r.unlock {
                if t.get(&(r.stripe, *i)) == Some(&r.owner) {
                    t.remove(&(r.stripe, *i));
                }
            }
            Response::Updated(UpdateReply {
                results: r
                    .updates
                    .iter()
                    .map(|_| {
                        Ok(Applied {
                            applied: true,
                            duplicate: false,
                        })
                    })
                    .collect(),
            })
        }
        Request::Heartbeat(h) => {
            node.heartbeats.fetch_add(1, Ordering::Relaxed);
            Response::Alive {
                lease_ms: h.lease_ms,
            }
        }
        _ => Response::Error(WireError::Busy),
    }
}

/// What a fake node does with one request.
pub enum Reply {
    /// Answers it.
    Answer(Response),
    /// Answers it, then never reads that connection again (its frames queue in the
    /// socket).
    AnswerThenStall(Response),
    /// Answers nothing.
    Ignore,
}

/// Serves the node protocol on loopback (cluster [`CLUSTER`], open key), each
/// request as `handle` says.
pub async fn serve(
    handle: impl Fn(Request) -> Reply + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                let key = drs_proto::ClusterKey::open();
                let Ok(session) =
                    drs_proto::auth::accept(&mut sock, &key, CLUSTER, drs_proto::Purpose::Data)
                        .await
                else {
                    return;
                };
                let mut conn = Framed::new(sock, session.frames());
                while let Some(Ok(f)) = conn.next().await {
                    let (resp, stall) = match handle(f.decode_ctrl().unwrap()) {
                        Reply::Answer(r) => (r, false),
                        Reply::AnswerThenStall(r) => (r, true),
                        Reply::Ignore => continue,
                    };
                    let h = FrameHeader {
                        kind: FrameKind::Response,
                        cluster_id: CLUSTER,
                        epoch: 1,
                        request_id: f.header.request_id,
                        deadline_ms: 0,
                    };
                    if conn
                        .send(Frame::new(h, &resp, Bytes::new()).unwrap())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if stall {
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    addr
}

/// A fake node on loopback; with `stall_after_lock`, a connection that was granted
/// a lock is never read again (its frames queue in the socket).
pub async fn start(stall_after_lock: bool) -> (std::net::SocketAddr, FakeNode) {
    let node = FakeNode::default();
    let n = node.clone();
    let addr = serve(move |req| {
        if n.silent.load(Ordering::Relaxed)
            || (matches!(req, Request::Unlock(_)) && n.drop_unlocks.load(Ordering::Relaxed))
        {
            return Reply::Ignore;
        }
        let locked = matches!(req, Request::Lock(_));
        match answer(&n, req) {
            r if locked && stall_after_lock => Reply::AnswerThenStall(r),
            r => Reply::Answer(r),
        }
    })
    .await;
    (addr, node)
}

/// Three fake nodes and the cluster map of a 2+1 volume on them (every member must
/// take a write).
pub async fn cluster(stall_after_lock: bool) -> (ClusterMap, Vec<FakeNode>) {
    cluster_with(stall_after_lock, 3).await
}

/// [`cluster`], with a write durable once `min_write` members took it.
pub async fn cluster_with(stall_after_lock: bool, min_write: u8) -> (ClusterMap, Vec<FakeNode>) {
    let mut nodes = Vec::new();
    let mut fakes = Vec::new();
    for id in 0..3 {
        let (addr, fake) = start(stall_after_lock).await;
        nodes.push(NodeEntry {
            id,
            addr,
            data_dir: None,
            state: MemberState::Up,
            incarnation: 0,
        });
        fakes.push(fake);
    }
    let coef = drs_codec::Coefficients::default_for(2, 1).unwrap();
    let map = ClusterMap {
        cluster_id: CLUSTER,
        epoch: 1,
        nodes,
        volumes: vec![VolumeConfig {
            id: 1,
            k: 2,
            m: 1,
            block_size: 4096,
            blocks: 16,
            min_write,
            coefficients: coef.rows().to_vec(),
            nodes: vec![0, 1, 2],
        }],
        meta: Vec::new(),
    };
    (map, fakes)
}
