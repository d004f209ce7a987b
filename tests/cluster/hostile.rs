//! Hostile input at a real node process: ten thousand connections sending garbage,
//! frames with a flipped byte, oversized length prefixes and truncated bodies. The
//! node closes each with a logged reason, its memory grows by less than 16 MiB, and a
//! client reading meanwhile is served throughout, every byte right.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use drs_proto::{Frame, FrameHeader, FrameKind, Request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::common::*;

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The bytes one hostile connection sends (four kinds in turn).
fn garbage(i: u64, cluster_id: u64, rng: &mut StdRng) -> Vec<u8> {
    let ping = || {
        let header = FrameHeader {
            kind: FrameKind::Request,
            cluster_id,
            epoch: 0,
            request_id: i,
            deadline_ms: 1000,
        };
        Frame::new(header, &Request::Ping, Bytes::new())
            .expect("frame")
            .to_bytes()
            .to_vec()
    };
    match i % 4 {
        // Random bytes, at least a header's worth.
        0 => (0..rng.gen_range(48..4096)).map(|_| rng.gen()).collect(),
        // A valid frame with one byte flipped: the checksum fails.
        1 => {
            let mut f = ping();
            let at = rng.gen_range(0..f.len());
            f[at] ^= 1 << rng.gen_range(0..8);
            f
        }
        // A valid header whose control length is 4 GiB: refused before allocation.
        2 => {
            let mut f = ping();
            f[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
            f
        }
        // A header announcing an 8 MiB payload, then 4 KiB of it and the end.
        _ => {
            let mut f = ping();
            f[40..44].copy_from_slice(&(8u32 << 20).to_le_bytes());
            f.extend((0..4096).map(|_| rng.gen::<u8>()));
            f
        }
    }
}

/// `n` hostile connections to `addr`, 64 at a time; each sends its garbage, closes
/// its side and waits (up to 5 s) for the node to close. Returns how many the node
/// closed.
async fn flood(addr: std::net::SocketAddr, cluster_id: u64, n: u64, seed: u64) -> u64 {
    let closed = Arc::new(AtomicU64::new(0));
    let mut next = 0;
    while next < n {
        let batch: Vec<_> = (next..(next + 64).min(n))
            .map(|i| {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed ^ i);
                    let bytes = garbage(i, cluster_id, &mut rng);
                    // From 127.0.0.2, so these ten thousand source ports never
                    // take a port another test's node is about to listen on.
                    let Ok(sock) = TcpSocket::new_v4() else {
                        return;
                    };
                    if sock.bind(([127, 0, 0, 2], 0).into()).is_err() {
                        return;
                    }
                    let Ok(mut s) = sock.connect(addr).await else {
                        return;
                    };
                    let _ = s.write_all(&bytes).await;
                    let _ = s.shutdown().await;
                    let mut sink = [0u8; 4096];
                    let ended = tokio::time::timeout(Duration::from_secs(5), async {
                        loop {
                            match s.read(&mut sink).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    if ended.is_ok() {
                        closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in batch {
            t.await.expect("connection task");
        }
        next += 64;
    }
    closed.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_garbage_connections_leaves_memory_and_service_intact() {
    const FLOOD: u64 = 10_000;
    let tc = TestCluster::start("hostile").await;
    let blocks = random_blocks(21, tc.client.blocks());
    write_all(&tc.client, &blocks).await;
    let victim = 0;
    let pid = tc.local.pid(victim).expect("node runs");
    let addr = tc.local.map.node(victim).expect("node").addr;
    let cluster_id = tc.local.map.cluster_id;

    // A first, small flood, so one-time allocations (thread stacks, pools) are in
    // the baseline.
    flood(addr, cluster_id, 256, 1).await;
    let before = rss(pid);

    // A reader of every block, all through the flood.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let client = tc.new_client(client_config());
        let blocks = blocks.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (lba, want) in blocks.iter().enumerate() {
                    let got = client
                        .read_block(lba as u64)
                        .await
                        .unwrap_or_else(|e| panic!("read {lba} during the flood: {e}"));
                    assert!(got == want[..], "block {lba} read wrong during the flood");
                    reads += 1;
                }
            }
            reads
        })
    };
    let closed = flood(addr, cluster_id, FLOOD, 2).await;
    let after = rss(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.await.expect("the reader failed");
    eprintln!(
        "{closed} of {FLOOD} hostile connections closed by the node; rss {} KiB -> {} KiB; {reads} reads served meanwhile",
        before / 1024,
        after / 1024
    );
    assert_eq!(closed, FLOOD, "the node left hostile connections open");
    assert!(
        after.saturating_sub(before) < 16 << 20,
        "memory grew by {} KiB",
        after.saturating_sub(before) / 1024
    );
    assert!(reads > 0, "no read was served during the flood");
    assert!(
        tc.local.pid(victim) == Some(pid),
        "the node restarted or died"
    );
    let log = std::fs::read_to_string(tc.local.log_path(victim)).expect("node log");
    for reason in ["bad magic", "checksum mismatch", "exceeds the limit"] {
        assert!(
            log.contains(reason),
            "the node's log gives no '{reason}' reason"
        );
    }
    verify(&tc.client, &blocks, "after the flood").await;
}

/// One Ping frame on a raw connection; true if a frame came back within 5 s.
async fn ping(s: &mut tokio::net::TcpStream, cluster_id: u64) -> bool {
    let header = FrameHeader {
        kind: FrameKind::Request,
        cluster_id,
        epoch: 0,
        request_id: 1,
        deadline_ms: 1000,
    };
    let bytes = Frame::new(header, &Request::Ping, Bytes::new())
        .expect("frame")
        .to_bytes();
    if s.write_all(&bytes).await.is_err() {
        return false;
    }
    let mut buf = bytes::BytesMut::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Some(_)) = drs_proto::frame::decode_frame(&mut buf) {
                return true;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or(false)
}

async fn connect_from_127_0_0_2(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(([127, 0, 0, 2], 0).into())
        .expect("bind 127.0.0.2");
    sock.connect(addr).await.expect("connect")
}

/// More connections than a node has slots (1024) each send the first 10 bytes of a
/// frame and then nothing: the node closes every one once it has made no progress
/// for `FRAME_STALL` (5 s), so its slots come back, while a connection idle between
/// whole frames stays open and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_stalled_mid_frame_are_closed() {
    const STALLED: usize = 1100;
    let tc = TestCluster::start("stalled").await;
    let addr = tc.local.map.node(0).expect("node").addr;
    let cluster_id = tc.local.map.cluster_id;
    let mut idle = connect_from_127_0_0_2(addr).await;
    assert!(ping(&mut idle, cluster_id).await, "no answer to a ping");
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut s = connect_from_127_0_0_2(addr).await;
        s.write_all(b"DRS1\x01\x00\x01\x00\x07\x00")
            .await
            .expect("write part of a header");
        stalled.push(s);
    }
    let start = std::time::Instant::now();
    let mut closed = 0;
    for mut s in stalled {
        let left = Duration::from_secs(40).saturating_sub(start.elapsed());
        let mut b = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(left, s.read(&mut b)).await {
            closed += 1;
        }
    }
    eprintln!(
        "{closed} of {STALLED} stalled connections closed by the node after {:?}",
        start.elapsed()
    );
    assert_eq!(closed, STALLED, "stalled connections left open");
    assert!(
        ping(&mut idle, cluster_id).await,
        "a connection idle between frames was closed"
    );
    let mut fresh = connect_from_127_0_0_2(addr).await;
    assert!(
        ping(&mut fresh, cluster_id).await,
        "a new connection got no answer"
    );
    let log = std::fs::read_to_string(tc.local.log_path(0)).expect("node log");
    assert!(
        log.contains("a frame stopped arriving half-way"),
        "the node logged no reason"
    );
}
