//! The transport: accept connections, read frames, run each request as its own task
//! (many in flight per connection), write the answers back.
//!
//! Everything is bounded: connections (a semaphore), requests in flight per
//! connection, answers queued for the writer, and frame sizes (checked in the frame
//! header before anything is allocated). A frame that does not decode closes the
//! connection: a byte stream cannot be re-synchronised after a bad frame. So does a
//! frame that stops arriving half-way ([`FRAME_STALL`] without a byte of progress): a
//! peer that stalls mid-frame would otherwise hold a connection slot for ever. An
//! idle connection between frames is left open (clients pool them).
//!
//! Every connection opens with the handshake of [`drs_proto::auth`] (bounded by
//! [`HANDSHAKE_TIMEOUT`]); a peer that cannot prove the cluster key is logged and
//! closed before any frame of it is read, and every frame after it travels in an
//! authenticated record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_proto::frame::SealedFrames;
use drs_proto::{Frame, FrameHeader, FrameKind, Purpose, Request, Response, WireError};
use futures::{SinkExt, StreamExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::node::{Admitted, Node};

/// Requests handled at once per connection.
const IN_FLIGHT: usize = 256;
/// Answers queued for a connection's writer.
const ANSWERS: usize = 256;
/// A frame begun that makes no progress for this long closes its connection.
pub const FRAME_STALL: Duration = Duration::from_secs(5);
/// A connection must finish its handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline applied to a request that names none, and the longest one honoured.
const DEADLINE_MAX: Duration = Duration::from_secs(60);

/// Every second, logs how many refused handshakes the rate limit hid (a burst
/// shorter than a second has no later line to say so), until `shutdown`.
async fn report_hidden_refusals(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    node.refusals
        .report_overdue(stop, |kind, n| {
            tracing::warn!(kind, not_logged = n, "handshakes refused and not logged");
        })
        .await;
}

/// Serves `listener` until `shutdown` turns true.
pub async fn serve(node: Arc<Node>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let conns = Arc::new(Semaphore::new(node.cfg.max_connections));
    tokio::spawn(report_hidden_refusals(node.clone(), shutdown.clone()));
    loop {
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let node = node.clone();
                let sd = shutdown.clone();
                tokio::spawn(async move {
                    connection(node, stream, sd).await;
                    tracing::trace!(%peer, "connection closed");
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The next frame, an error, or None at the end of the stream or when a frame begun
/// made no progress for [`FRAME_STALL`] (logged).
async fn next_frame(
    frames: &mut FramedRead<OwnedReadHalf, SealedFrames>,
    peer: Option<std::net::SocketAddr>,
) -> Option<Result<Frame, drs_proto::FrameError>> {
    // Bytes of an unfinished frame at the last check.
    let mut partial: Option<usize> = None;
    loop {
        // Cancel-safe: what has arrived stays in the reader's buffer.
        match tokio::time::timeout(FRAME_STALL, frames.next()).await {
            Ok(n) => return n,
            Err(_) => {
                let have = frames.read_buffer().len();
                if have == 0 {
                    partial = None;
                } else if partial == Some(have) {
                    tracing::warn!(
                        ?peer,
                        bytes = have,
                        stall_s = FRAME_STALL.as_secs(),
                        "a frame stopped arriving half-way; closing the connection"
                    );
                    return None;
                } else {
                    partial = Some(have);
                }
            }
        }
    }
}

async fn connection(node: Arc<Node>, mut stream: TcpStream, mut shutdown: watch::Receiver<bool>) {
    let peer = stream.peer_addr().ok();
    let handshake = drs_proto::auth::accept_within(
        &mut stream,
        &node.cfg.key,
        node.map.cluster_id,
        Purpose::Data,
        HANDSHAKE_TIMEOUT,
    );
    let session = match handshake.await {
        Ok(s) => s,
        Err(e) => {
            if let Some(skipped) = node.refusals.admit(e.kind()) {
                tracing::warn!(?peer, error = %e, not_logged = skipped, "handshake refused; closing the connection");
            }
            return;
        }
    };
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, session.clone().frames());
    let (tx, mut rx) = mpsc::channel::<Frame>(ANSWERS);
    let writer = tokio::spawn(async move {
        let mut sink = FramedWrite::new(wr, session.frames());
        while let Some(f) = rx.recv().await {
            if sink.feed(f).await.is_err() {
                return;
            }
            while let Ok(f) = rx.try_recv() {
                if sink.feed(f).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let running: Arc<Mutex<HashMap<u64, AbortHandle>>> = Arc::default();
    loop {
        let next = tokio::select! {
            n = next_frame(&mut frames, peer) => n,
            _ = shutdown.changed() => break,
        };
        let frame = match next {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                tracing::warn!(?peer, error = %e, "bad frame; closing the connection");
                break;
            }
            None => break,
        };
        if frame.header.kind != FrameKind::Request {
            tracing::warn!(
                ?peer,
                "response frame sent to a node; closing the connection"
            );
            break;
        }
        let header = frame.header;
        let received = Instant::now();
        let req: Request = match frame.decode_ctrl() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(?peer, error = %e, "undecodable request");
                let _ = tx
                    .send(answer(
                        &node,
                        &header,
                        Response::Error(WireError::Malformed),
                        Bytes::new(),
                    ))
                    .await;
                continue;
            }
        };
        if let Request::Cancel(c) = &req {
            if let Some(h) = lock(&running).remove(&c.request_id) {
                h.abort();
            }
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let budget = match header.deadline_ms {
            0 => DEADLINE_MAX,
            ms => Duration::from_millis(ms as u64).min(DEADLINE_MAX),
        };
        let deadline = received + budget;
        let cancellable = matches!(req, Request::Read(_));
        let kind = req.kind_name();
        // First stage in arrival order (the lock table), the rest concurrently.
        let admitted = node.admit(&header, req);
        if let Admitted::Answer(resp) = admitted {
            drop(permit);
            drs_metrics::observe(&node.latencies, kind, received.elapsed());
            if tx
                .send(answer(&node, &header, resp, Bytes::new()))
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        let node2 = node.clone();
        let tx2 = tx.clone();
        let running2 = running.clone();
        let id = header.request_id;
        // Register before the task can finish: it removes itself under the same lock.
        let mut reg = lock(&running);
        let task = tokio::spawn(async move {
            let (resp, data) = node2.run(admitted, frame.payload, deadline).await;
            drs_metrics::observe(&node2.latencies, kind, received.elapsed());
            lock(&running2).remove(&id);
            let _ = tx2.send(answer(&node2, &header, resp, data)).await;
            drop(permit);
        });
        if cancellable {
            reg.insert(id, task.abort_handle());
        }
        drop(reg);
    }
    for (_, h) in lock(&running).drain() {
        h.abort();
    }
    drop(tx);
    let _ = writer.await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn answer(node: &Node, req: &FrameHeader, resp: Response, data: Bytes) -> Frame {
    let header = FrameHeader {
        kind: FrameKind::Response,
        cluster_id: node.map.cluster_id,
        epoch: node.epoch(),
        request_id: req.request_id,
        deadline_ms: 0,
    };
    match Frame::new(header, &resp, data) {
        Ok(f) => f,
        Err(e) => {
            // Only a response larger than the frame limits could fail; say so instead.
            tracing::error!(error = %e, "response could not be framed");
            Frame {
                header,
                ctrl: Bytes::new(),
                payload: Bytes::new(),
            }
        }
    }
}
