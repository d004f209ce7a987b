//! The node's request handling over a real socket, in process: typed errors for
//! requests that do not fit, closed connections for bad frames, pipelining,
//! cancellation and lock contention.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use drs_proto::error::InvalidReason;
use drs_proto::{
    Applied, BlockUpdate, CancelReq, ClusterMap, Frame, FrameHeader, FrameKind, HeartbeatReq,
    LockReq, NodeEntry, ReadMode, ReadReq, Request, Response, UnlockReq, UpdateId, UpdateReq,
    VolumeConfig, WireError,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::codec::Framed;

use crate::{run, NodeConfig};

const CLUSTER: u64 = 0xC1u64;

struct TestNode {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The map of a 2 + 1 volume of 16 blocks on nodes 0, 1, 2; node 0 listens at `node0`
/// (the others at an address nothing answers).
pub(crate) fn map_2_1(cluster_id: u64, node0: std::net::SocketAddr) -> ClusterMap {
    let coef = drs_codec::Coefficients::default_for(2, 1).unwrap();
    ClusterMap {
        cluster_id,
        epoch: 1,
        nodes: (0..3)
            .map(|i| NodeEntry {
                id: i,
                addr: if i == 0 {
                    node0
                } else {
                    "127.0.0.1:9".parse().unwrap()
                },
                data_dir: None,
                state: drs_proto::MemberState::Up,
                incarnation: 0,
            })
            .collect(),
        volumes: vec![VolumeConfig {
            id: 1,
            k: 2,
            m: 1,
            block_size: 4096,
            blocks: 16,
            min_write: 2,
            coefficients: coef.rows().to_vec(),
            nodes: vec![0, 1, 2],
        }],
        meta: Vec::new(),
    }
}

async fn start() -> TestNode {
    start_with(|_| {}).await
}

/// [`start`], with the map changed by `edit` first.
async fn start_with(edit: impl FnOnce(&mut ClusterMap)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut map = map_2_1(CLUSTER, addr);
    edit(&mut map);
    let mut cfg = NodeConfig::new(0, dir.path().to_owned());
    cfg.settle = Duration::ZERO;
    let (stop, rx) = watch::channel(false);
    tokio::spawn(async move {
        let _ = run(cfg, map, listener, rx).await;
    });
    TestNode {
        addr,
        _dir: dir,
        stop,
    }
}

type Conn = Framed<TcpStream, drs_proto::frame::SealedFrames>;

async fn connect(n: &TestNode) -> Conn {
    let mut s = TcpStream::connect(n.addr).await.unwrap();
    let key = drs_proto::ClusterKey::open();
    let session = drs_proto::auth::connect(&mut s, &key, CLUSTER, drs_proto::Purpose::Data)
        .await
        .unwrap();
    Framed::new(s, session.frames())
}

fn header(id: u64) -> FrameHeader {
    FrameHeader {
        kind: FrameKind::Request,
        cluster_id: CLUSTER,
        epoch: 1,
        request_id: id,
        deadline_ms: 5000,
    }
}

async fn ask_with(
    c: &mut Conn,
    h: FrameHeader,
    req: &Request,
    payload: Bytes,
) -> (Response, Bytes) {
    c.send(Frame::new(h, req, payload).unwrap()).await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(f.header.request_id, h.request_id);
    assert_eq!(f.header.kind, FrameKind::Response);
    (f.decode_ctrl().unwrap(), f.payload)
}

async fn ask(c: &mut Conn, id: u64, req: &Request) -> Response {
    ask_with(c, header(id), req, Bytes::new()).await.0
}

/// An update of data block 0 of `stripe` (the node holds position 0 of stripes 0, 3,
/// 6, ...), by client 5 under lock owner `owner`; `relay`: passed on by a
/// member, so no lock is needed. Its payload is one byte.
fn update(stripe: u64, seq: u64, version: u64, owner: u64, relay: bool) -> Request {
    Request::Update(UpdateReq {
        volume: 1,
        stripe,
        position: 0,
        owner,
        updates: vec![BlockUpdate {
            id: UpdateId { client: 5, seq },
            index: 0,
            version,
            base: version.saturating_sub(1),
            offset: 0,
            len: 1,
        }],
        unlock: vec![],
        relay,
        on_behalf: false,
        completed: vec![],
        keep: Vec::new(),
    })
}

fn lock_req(stripe: u64, indices: Vec<u8>, owner: u64, client: u64, lease_ms: u32) -> Request {
    Request::Lock(LockReq {
        volume: 1,
        stripe,
        owner,
        indices,
        read: None,
        client,
        lease_ms,
        completed: vec![],
        contact: None,
        cache_group: vec![],
    })
}

/// The outcome of the first update of an `Updated` answer.
fn first(r: &Response) -> Result<Applied, WireError> {
    match r {
        Response::Updated(u) => u.results[0].clone(),
        Response::Error(e) => Err(e.clone()),
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Client 5 locks block 0 of `stripe` for `owner` (with `lease_ms`) and writes one
/// byte to it as update `seq` giving `version` (request ids `id` and `id + 1`); both
/// must be taken.
async fn lock_and_write(
    c: &mut Conn,
    id: u64,
    stripe: u64,
    owner: u64,
    lease_ms: u32,
    seq: u64,
    version: u64,
) {
    assert!(matches!(
        ask(c, id, &lock_req(stripe, vec![0], owner, 5, lease_ms)).await,
        Response::Lock(_)
    ));
    let (r, _) = ask_with(
        c,
        header(id + 1),
        &update(stripe, seq, version, owner, false),
        Bytes::from_static(b"a"),
    )
    .await;
    assert!(first(&r).is_ok(), "{r:?}");
}

#[tokio::test]
async fn requests_that_do_not_fit_get_typed_errors() {
    let n = start().await;
    let mut c = connect(&n).await;
    assert!(matches!(
        ask(&mut c, 1, &Request::Ping).await,
        Response::Pong(_)
    ));
    let mut h = header(2);
    h.cluster_id = 99;
    let (r, _) = ask_with(&mut c, h, &Request::Ping, Bytes::new()).await;
    assert_eq!(
        r,
        Response::Error(WireError::WrongCluster { expected: CLUSTER })
    );
    // An older epoch is refused; a newer one only means the node has not heard yet.
    let mut h = header(3);
    h.epoch = 0;
    let (r, _) = ask_with(&mut c, h, &Request::Ping, Bytes::new()).await;
    assert_eq!(
        r,
        Response::Error(WireError::StaleEpoch {
            node_epoch: 1,
            request_epoch: 0
        })
    );
    let mut h = header(4);
    h.epoch = 7;
    let (r, _) = ask_with(&mut c, h, &Request::Ping, Bytes::new()).await;
    assert!(matches!(r, Response::Pong(_)), "{r:?}");
    // Except a heartbeat: a live client catching up with the map keeps its lease.
    let mut h = header(5);
    h.epoch = 0;
    let hb = Request::Heartbeat(HeartbeatReq {
        client: 9,
        lease_ms: 3000,
        completed: vec![],
    });
    let (r, _) = ask_with(&mut c, h, &hb, Bytes::new()).await;
    assert_eq!(r, Response::Alive { lease_ms: 3000 });
    let read = |volume, stripe, position| {
        Request::Read(ReadReq {
            volume,
            stripe,
            position,
            offset: 0,
            len: 16,
            mode: ReadMode::Applied,
        })
    };
    assert_eq!(
        ask(&mut c, 4, &read(9, 0, 0)).await,
        Response::Error(WireError::UnknownVolume { volume: 9 })
    );
    assert_eq!(
        ask(&mut c, 5, &read(1, 99, 0)).await,
        Response::Error(WireError::StripeOutOfRange {
            stripe: 99,
            stripes: 8
        })
    );
    assert_eq!(
        ask(&mut c, 6, &read(1, 0, 1)).await,
        Response::Error(WireError::NotMember {
            node: 0,
            stripe: 0,
            position: 1
        })
    );
    let lock = lock_req(0, vec![], 1, 1, 3000);
    assert_eq!(
        ask(&mut c, 7, &lock).await,
        Response::Error(WireError::Invalid {
            what: InvalidReason::NoBlocks
        })
    );
    // A direct update whose owner holds no lock is refused.
    let (r, _) = ask_with(
        &mut c,
        header(8),
        &update(0, 1, 1, 40, false),
        Bytes::from_static(b"x"),
    )
    .await;
    assert_eq!(
        first(&r),
        Err(WireError::NotLocked {
            stripe: 0,
            index: 0
        })
    );
    // A stale version: version 1 applied by one update, then claimed by another.
    let (r, _) = ask_with(
        &mut c,
        header(9),
        &update(0, 1, 1, 0, true),
        Bytes::from_static(b"x"),
    )
    .await;
    assert!(first(&r).is_ok(), "{r:?}");
    let (r, _) = ask_with(
        &mut c,
        header(10),
        &update(0, 2, 1, 0, true),
        Bytes::from_static(b"y"),
    )
    .await;
    assert!(
        matches!(
            first(&r),
            Err(WireError::StaleVersion {
                current: 1,
                got: 1,
                ..
            })
        ),
        "{r:?}"
    );
    // A payload that does not match the updates' lengths.
    let (r, _) = ask_with(
        &mut c,
        header(11),
        &update(0, 3, 2, 0, true),
        Bytes::from_static(b"yz"),
    )
    .await;
    assert!(
        matches!(r, Response::Error(WireError::BadRange { .. })),
        "{r:?}"
    );
    // A frame whose control section is not a request.
    let f = Frame::new(header(12), &(1u8, 2u8, 3u8, 250u8), Bytes::new()).unwrap();
    c.send(f).await.unwrap();
    let f = c.next().await.unwrap().unwrap();
    assert_eq!(
        f.decode_ctrl::<Response>().unwrap(),
        Response::Error(WireError::Malformed)
    );
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let n = start().await;
    for garbage in [
        b"GARBAGE GARBAGE GARBAGE GARBAGE GARBAGE GARBAGE GARBAGE".to_vec(),
        {
            // A valid-looking header announcing a 4 GiB payload.
            let mut b = Frame::new(header(1), &Request::Ping, Bytes::new())
                .unwrap()
                .to_bytes()
                .to_vec();
            b[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
            b
        },
    ] {
        let mut s = TcpStream::connect(n.addr).await.unwrap();
        s.write_all(&garbage).await.unwrap();
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(got, Ok(0) | Err(_)),
            "the node closes the connection"
        );
    }
    let mut c = connect(&n).await;
    assert!(
        matches!(ask(&mut c, 1, &Request::Ping).await, Response::Pong(_)),
        "and keeps serving others"
    );
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    let n = start().await;
    let mut c = connect(&n).await;
    for id in 0..200u64 {
        c.feed(Frame::new(header(id), &Request::Ping, Bytes::new()).unwrap())
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    let mut seen = [false; 200];
    for _ in 0..200 {
        let f = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!std::mem::replace(
            &mut seen[f.header.request_id as usize],
            true
        ));
    }
    assert!(seen.iter().all(|s| *s));
}

#[tokio::test]
async fn a_cancelled_read_gets_no_answer() {
    let n = start().await;
    let mut c = connect(&n).await;
    // Versions the node will not reach: the read waits.
    let waiting = Request::Read(ReadReq {
        volume: 1,
        stripe: 0,
        position: 0,
        offset: 0,
        len: 8,
        mode: ReadMode::AsOf(vec![5, 0]),
    });
    // Without the cancel it would answer `Timeout` after 300 ms.
    let mut h = header(1);
    h.deadline_ms = 300;
    c.send(Frame::new(h, &waiting, Bytes::new()).unwrap())
        .await
        .unwrap();
    c.send(
        Frame::new(
            header(2),
            &Request::Cancel(CancelReq { request_id: 1 }),
            Bytes::new(),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let (r, _) = ask_with(&mut c, header(3), &Request::Ping, Bytes::new()).await;
    assert!(matches!(r, Response::Pong(_)));
    let more = tokio::time::timeout(Duration::from_millis(700), c.next()).await;
    assert!(more.is_err(), "no answer for the cancelled read: {more:?}");
}

#[tokio::test]
async fn a_waiting_read_times_out_at_its_deadline() {
    let n = start().await;
    let mut c = connect(&n).await;
    let waiting = Request::Read(ReadReq {
        volume: 1,
        stripe: 0,
        position: 0,
        offset: 0,
        len: 8,
        mode: ReadMode::AsOf(vec![5, 0]),
    });
    let mut h = header(1);
    h.deadline_ms = 300;
    let t = std::time::Instant::now();
    let (r, _) = ask_with(&mut c, h, &waiting, Bytes::new()).await;
    assert_eq!(r, Response::Error(WireError::Timeout));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn one_lock_holder_at_a_time() {
    let n = start().await;
    let mut c = connect(&n).await;
    let lock = |client| lock_req(0, vec![0, 1], client, client, 3000);
    assert!(matches!(ask(&mut c, 1, &lock(10)).await, Response::Lock(_)));
    assert!(
        matches!(ask(&mut c, 2, &lock(10)).await, Response::Lock(_)),
        "re-entrant"
    );
    assert_eq!(
        ask(&mut c, 3, &lock(11)).await,
        Response::Error(WireError::Locked {
            stripe: 0,
            index: 0,
            holder: 10,
            client: 10,
            contact: None
        })
    );
    let unlock = |client| {
        Request::Unlock(UnlockReq {
            volume: 1,
            stripe: 0,
            owner: client,
            blocks: vec![(0, 0), (1, 0)],
        })
    };
    assert_eq!(ask(&mut c, 4, &unlock(11)).await, Response::Unlocked);
    assert!(
        matches!(
            ask(&mut c, 5, &lock(11)).await,
            Response::Error(WireError::Locked { .. })
        ),
        "only the holder unlocks"
    );
    assert_eq!(ask(&mut c, 6, &unlock(10)).await, Response::Unlocked);
    assert!(matches!(ask(&mut c, 7, &lock(11)).await, Response::Lock(_)));
}

#[tokio::test]
async fn lock_and_unlock_apply_in_the_order_sent() {
    let n = start().await;
    let mut c = connect(&n).await;
    // Pipelined, never waiting: each unlock must find its lock already granted.
    for i in 0..200u64 {
        let lock = lock_req(0, vec![0], 100 + i, 1, 3000);
        let unlock = Request::Unlock(UnlockReq {
            volume: 1,
            stripe: 0,
            owner: 100 + i,
            blocks: vec![(0, 0)],
        });
        c.feed(Frame::new(header(2 * i), &lock, Bytes::new()).unwrap())
            .await
            .unwrap();
        c.feed(Frame::new(header(2 * i + 1), &unlock, Bytes::new()).unwrap())
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    for _ in 0..400 {
        let f = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let r: Response = f.decode_ctrl().unwrap();
        assert!(matches!(r, Response::Lock(_) | Response::Unlocked), "{r:?}");
    }
    let probe = lock_req(0, vec![0], 7, 2, 3000);
    assert!(
        matches!(ask(&mut c, 9999, &probe).await, Response::Lock(_)),
        "no lock left behind"
    );
}

#[tokio::test]
async fn updates_need_the_lock_and_a_live_lease() {
    let n = start().await;
    let mut c = connect(&n).await;
    // Client 5, owner 50, a short lease.
    assert!(matches!(
        ask(&mut c, 1, &lock_req(3, vec![0], 50, 5, 300)).await,
        Response::Lock(_)
    ));
    let (r, _) = ask_with(
        &mut c,
        header(2),
        &update(3, 1, 1, 50, false),
        Bytes::from_static(b"a"),
    )
    .await;
    assert!(
        first(&r).is_ok(),
        "the lock holder's update is taken: {r:?}"
    );
    let (r, _) = ask_with(
        &mut c,
        header(3),
        &update(3, 2, 2, 51, false),
        Bytes::from_static(b"b"),
    )
    .await;
    assert_eq!(
        first(&r),
        Err(WireError::NotLocked {
            stripe: 3,
            index: 0
        }),
        "another owner's is not"
    );
    let hb = Request::Heartbeat(HeartbeatReq {
        client: 5,
        lease_ms: 300,
        completed: vec![],
    });
    assert_eq!(ask(&mut c, 4, &hb).await, Response::Alive { lease_ms: 300 });
    // No heartbeat for longer than the lease: the node fences client 5 and, once its
    // updates are settled, releases its lock.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        ask(&mut c, 5, &hb).await,
        Response::Error(WireError::Fenced { client: 5 })
    );
    let (r, _) = ask_with(
        &mut c,
        header(6),
        &update(3, 3, 2, 50, false),
        Bytes::from_static(b"c"),
    )
    .await;
    assert_eq!(
        first(&r),
        Err(WireError::Fenced { client: 5 }),
        "a fenced client's update is refused"
    );
    assert_eq!(
        ask(&mut c, 7, &lock_req(6, vec![0], 52, 5, 300)).await,
        Response::Error(WireError::Fenced { client: 5 })
    );
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ask(&mut c, 8, &lock_req(3, vec![0], 60, 6, 3000)).await {
            Response::Lock(l) => {
                assert_eq!(l.known, vec![(0, 1)], "the fenced client's update is kept");
                break;
            }
            other => {
                assert!(
                    std::time::Instant::now() < until,
                    "the fenced client's lock was never released: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(fenced_count(&mut c, 9).await, 1);
}

/// Client 5 (owner 50, the lease given) writes version 1 of block 0 of stripe 3
/// and unlocks (request ids 1 to 3).
async fn write_and_unlock(c: &mut Conn, lease_ms: u32) {
    lock_and_write(c, 1, 3, 50, lease_ms, 1, 1).await;
    let unlock = Request::Unlock(UnlockReq {
        volume: 1,
        stripe: 3,
        owner: 50,
        blocks: vec![(0, 1)],
    });
    assert_eq!(ask(c, 3, &unlock).await, Response::Unlocked);
}

/// The clients the node has fenced so far (its `Pong` stats).
async fn fenced_count(c: &mut Conn, id: u64) -> u64 {
    match ask(c, id, &Request::Ping).await {
        Response::Pong(i) => i.stats.fenced,
        other => panic!("ping answered {other:?}"),
    }
}

#[tokio::test]
async fn updates_keep_a_lease_running_without_heartbeats() {
    // A client busy sending updates whose heartbeats are late (queued behind them)
    // is alive: each update it sent renews its lease.
    let n = start().await;
    let mut c = connect(&n).await;
    assert!(matches!(
        ask(&mut c, 1, &lock_req(3, vec![0], 50, 5, 400)).await,
        Response::Lock(_)
    ));
    // Two and a half leases of updates, one every 100 ms, and no heartbeat.
    for seq in 1..=10u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (r, _) = ask_with(
            &mut c,
            header(1 + seq),
            &update(3, seq, seq, 50, false),
            Bytes::from_static(b"a"),
        )
        .await;
        assert!(first(&r).is_ok(), "update {seq} refused: {r:?}");
    }
    let hb = Request::Heartbeat(HeartbeatReq {
        client: 5,
        lease_ms: 400,
        completed: vec![],
    });
    assert_eq!(
        ask(&mut c, 20, &hb).await,
        Response::Alive { lease_ms: 400 }
    );
    assert_eq!(fenced_count(&mut c, 21).await, 0);
}

#[tokio::test]
async fn an_idle_client_whose_updates_are_unsettled_is_not_fenced() {
    // Client 5 writes block 0 of stripe 3 and unlocks. The other members are
    // unreachable, so its update never completes and stays unsettled here. Idle
    // past its lease, it holds nothing here: it must not be fenced.
    let n = start().await;
    let mut c = connect(&n).await;
    write_and_unlock(&mut c, 300).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(fenced_count(&mut c, 4).await, 0);
    // Its next write goes on: a lock on another stripe, and an update under it.
    lock_and_write(&mut c, 5, 6, 51, 300, 2, 1).await;
}

/// A member that completes the handshake, then reads requests and never answers an
/// update (a node busy rebuilding); it answers anything else `Busy`, so it looks
/// alive. Counts the updates it receives.
async fn silent_member() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let updates = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = updates.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen.clone();
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
                    if let Ok(Request::Update(_)) = f.decode_ctrl::<Request>() {
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    let h = FrameHeader {
                        kind: FrameKind::Response,
                        deadline_ms: 0,
                        ..f.header
                    };
                    let busy = Response::Error(WireError::Busy);
                    if conn
                        .send(Frame::new(h, &busy, Bytes::new()).unwrap())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, updates)
}

#[tokio::test]
async fn an_expired_clients_unsettled_updates_are_passed_on_at_once() {
    // Client 5 writes block 0 of stripe 3 here and dies before reaching the other
    // members (up, and never answering an update). Its lease (300 ms) runs out: it
    // held no lock here, so it is not fenced, but its update is passed on now, not
    // when it is due (2 s after it was taken): the members it did not reach lack it
    // until then.
    let (silent, updates) = silent_member().await;
    let n = start_with(|map| {
        for e in map.nodes.iter_mut().filter(|e| e.id != 0) {
            e.addr = silent;
        }
    })
    .await;
    let mut c = connect(&n).await;
    write_and_unlock(&mut c, 300).await;
    let written = std::time::Instant::now();
    while updates.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            written.elapsed() < Duration::from_millis(1500),
            "the expired client's update was not passed on within 1.5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fenced_count(&mut c, 4).await, 0);
}

#[tokio::test]
async fn a_lock_does_not_wait_for_a_relay_to_a_recovering_member() {
    // Nodes 1 and 2 are recovering and never answer an update. Client 5 writes block 0 of
    // stripe 3; its update stays unsettled here. Client 6 then locks the block: the
    // node refuses (`Settling`) until the update was passed on to the members that
    // lack it. It is sent to the recovering ones, but not waited for: the lock is
    // granted at once, not after their relays time out (3 s).
    let (silent, updates) = silent_member().await;
    let n = start_with(|map| {
        for e in map.nodes.iter_mut().filter(|e| e.id != 0) {
            e.addr = silent;
            e.state = drs_proto::MemberState::Recovering;
        }
    })
    .await;
    let mut c = connect(&n).await;
    write_and_unlock(&mut c, 3000).await;
    let started = std::time::Instant::now();
    let mut id = 10;
    loop {
        id += 1;
        match ask(&mut c, id, &lock_req(3, vec![0], 60, 6, 3000)).await {
            Response::Lock(l) => {
                assert_eq!(l.known, vec![(0, 1)]);
                break;
            }
            Response::Error(WireError::Settling { .. }) => {
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "the lock waited for the relay to a recovering member"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    // It was sent all the same (the member answers nothing, so it is sent again).
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while updates.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < until,
            "never relayed to the recovering member"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_listing_of_many_blocks_comes_in_pages_that_fit_a_frame() {
    // An 8 + 1 volume of 9000 stripes, each with a block here: 4096 idle entries
    // (the most a page holds) encode to more than a frame's control section.
    const STRIPES: u64 = 9000;
    let n = start_with(|map| {
        let mut extra = map.nodes[1].clone();
        for id in 3..9 {
            extra.id = id;
            map.nodes.push(extra.clone());
        }
        let v = &mut map.volumes[0];
        (v.k, v.m, v.min_write) = (8, 1, 8);
        v.coefficients = drs_codec::Coefficients::default_for(8, 1)
            .unwrap()
            .rows()
            .to_vec();
        v.nodes = (0..9).collect();
        v.blocks = 8 * STRIPES;
    })
    .await;
    let mut c = connect(&n).await;
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut from = 0;
    loop {
        pages += 1;
        let req = Request::List(drs_proto::ListReq {
            volume: 1,
            from_stripe: from,
            max: u32::MAX,
        });
        let Response::List(page) = ask(&mut c, pages, &req).await else {
            panic!("page {pages} was not a listing");
        };
        assert!(!page.slots.is_empty(), "an empty page before the end");
        seen.extend(page.slots.iter().map(|s| s.stripe));
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    assert_eq!(seen, (0..STRIPES).collect::<Vec<_>>());
    assert!(pages >= 3, "{STRIPES} entries came in {pages} pages");
}

#[tokio::test]
async fn a_cache_groups_copies_come_back_in_pages_that_fit_a_frame() {
    // 2500 copies of 4 KiB blocks: 10 MiB, more than a frame's payload, and their
    // requests more than its control section.
    const BLOCKS: u64 = 2500;
    let n = start_with(|map| map.volumes[0].blocks = 2 * BLOCKS).await;
    let mut c = connect(&n).await;
    let fill = |lba: u64| Bytes::from(vec![(lba % 251) as u8; 4096]);
    for lba in 0..BLOCKS {
        let put = Request::CachePut(drs_proto::CachePutReq {
            volume: 1,
            client: 9,
            lba,
            stripe: lba / 2,
            update: BlockUpdate {
                id: UpdateId {
                    client: 9,
                    seq: lba,
                },
                index: (lba % 2) as u8,
                version: 1,
                base: 0,
                offset: 0,
                len: 4096,
            },
            owner: 90,
            granted: vec![0, 1, 2],
            unlock: vec![((lba % 2) as u8, 1)],
            seq: 1,
            group: vec![0],
            lease_ms: 60_000,
        });
        let (r, _) = ask_with(&mut c, header(lba + 1), &put, fill(lba)).await;
        assert_eq!(r, Response::CacheStored, "put of block {lba}");
    }
    let (mut seen, mut pages, mut from_lba) = (Vec::new(), 0, 0);
    loop {
        pages += 1;
        let get = Request::CacheGet(drs_proto::CacheGetReq {
            volume: 1,
            client: 9,
            from_lba,
        });
        let (r, payload) = ask_with(&mut c, header(BLOCKS + pages), &get, Bytes::new()).await;
        let Response::CacheCopies(page) = r else {
            panic!("page {pages}: {r:?}");
        };
        assert!(!page.copies.is_empty(), "an empty page before the end");
        assert_eq!(payload.len(), 4096 * page.copies.len());
        for (i, copy) in page.copies.iter().enumerate() {
            assert_eq!(payload.slice(i * 4096..(i + 1) * 4096), fill(copy.lba));
            seen.push(copy.lba);
        }
        match page.next {
            Some(next) => from_lba = next,
            None => break,
        }
    }
    assert_eq!(seen, (0..BLOCKS).collect::<Vec<_>>());
    assert!(pages >= 3, "{BLOCKS} copies came in {pages} pages");
}

#[tokio::test]
async fn a_map_of_hundreds_of_nodes_comes_whole_whatever_the_epoch() {
    // 1000 nodes with their data directories: the TOML is well over a frame's 64 KiB
    // control section.
    let n = start_with(|map| {
        let mut extra = map.nodes[1].clone();
        for id in 3..1000 {
            extra.id = id;
            extra.addr = SocketAddr::from(([127, 0, 1, (id % 250) as u8], 7000 + id as u16));
            extra.data_dir = Some(format!("/srv/drs/rack-{}/node-{id}", id / 40).into());
            map.nodes.push(extra.clone());
        }
    })
    .await;
    let mut c = connect(&n).await;
    // A sender with an older epoch still gets it.
    let mut h = header(1);
    h.epoch = 0;
    let (resp, toml) = ask_with(&mut c, h, &Request::GetMap, Bytes::new()).await;
    assert!(matches!(resp, Response::Map), "{resp:?}");
    assert!(
        toml.len() > drs_proto::frame::MAX_CTRL_LEN,
        "{} bytes",
        toml.len()
    );
    let map = drs_proto::map::ClusterMap::from_toml(std::str::from_utf8(&toml).unwrap()).unwrap();
    assert_eq!(map.nodes.len(), 1000);
    assert_eq!(map.nodes[999].id, 999);
}
