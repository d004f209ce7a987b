//! The client-client interface (report 5.5; DESIGN-NOTES R10).
//!
//! A client that caches blocks (a [`crate::WriteBackCache`] started with `serve`)
//! listens for other clients (a loopback port unless configured) and gives that
//! address, as its *contact*, with every lock it takes. A node that refuses another client the lock names the holder's contact, and
//! that client can then:
//! - read the block through the holder's cache (`PeerRead`),
//! - write it through the holder's cache (`PeerWrite`; with `durable`, the holder
//!   writes the block back to the nodes before it answers, so the answer says the
//!   change reached the storage nodes),
//! - ask the holder to write the block back and let it go (`PeerRelease`), so that
//!   waiting for a cached block never starves;
//! - and the holder tells a writer that serves too when a write-back carried its
//!   changes (`PeerDurable`), so the writer's flush need not ask it.
//!
//! Peer calls are rare. The calling client keeps one connection per contact
//! (`Client::peer_conn`); the serving cache takes at most [`PEER_CONNECTIONS`] at
//! once, and a connection stops being served, and closes, as soon as the cache is
//! dropped (its owner died or let it go): nobody is then told a change is safe in it.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use drs_proto::{
    Frame, FrameHeader, FrameKind, PeerDurableReq, PeerReadReq, PeerReleaseReq, PeerWriteReq,
    Request, Response, WireError,
};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::codec::Framed;

use crate::cache::CacheInner;

use crate::error::CallError;
use crate::Client;

/// Requests served at once per peer connection is one; connections at once are few.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the peer server serves at once.
const PEER_CONNECTIONS: usize = 64;

/// One call to another client's cache.
pub(crate) async fn call(
    client: &Client,
    contact: SocketAddr,
    req: &Request,
    payload: Bytes,
) -> Result<(Response, Bytes), CallError> {
    client
        .peer_conn(contact)
        .call(req, payload, PEER_TIMEOUT)
        .await
}

/// Asks the holder at `contact` to write block `lba` back and release it. True if it
/// held the block. With `since` (a ticket of this client's writes through the
/// holder `instance`; `u64::MAX` for none) the holder fails the call if a write-back
/// of the block holding that write or a later one failed, or if it is not that
/// instance.
pub(crate) async fn ask_release(
    client: &Client,
    contact: SocketAddr,
    lba: u64,
    (since, instance): (u64, u64),
) -> Result<bool, CallError> {
    let req = Request::PeerRelease(PeerReleaseReq {
        volume: client.volume().id,
        lba,
        since,
        instance,
    });
    match call(client, contact, &req, Bytes::new()).await? {
        (Response::PeerReleased { held }, _) => Ok(held),
        (other, _) => Err(CallError::Protocol(format!(
            "peer release answered with {other:?}"
        ))),
    }
}

/// Reads through the holder's cache; `None` if it no longer holds the block.
pub(crate) async fn read(
    client: &Client,
    contact: SocketAddr,
    lba: u64,
    offset: usize,
    len: usize,
) -> Result<Option<Bytes>, CallError> {
    let req = Request::PeerRead(PeerReadReq {
        volume: client.volume().id,
        lba,
        offset: offset as u32,
        len: len as u32,
    });
    match call(client, contact, &req, Bytes::new()).await? {
        (Response::PeerData { held: true }, data) if data.len() == len => Ok(Some(data)),
        (Response::PeerData { held: false }, _) => Ok(None),
        (other, _) => Err(CallError::Protocol(format!(
            "peer read answered with {other:?}"
        ))),
    }
}

/// Writes through the holder's cache; `None` if it no longer holds the block,
/// otherwise whether the change already reached the nodes, and the write's ticket
/// (for [`ask_release`]). The holder tells `reply_to` (the writer's own contact)
/// when a write-back carried the change ([`tell_durable`]).
pub(crate) async fn write(
    client: &Client,
    contact: SocketAddr,
    (lba, offset): (u64, usize),
    data: &[u8],
    durable: bool,
    reply_to: Option<SocketAddr>,
) -> Result<Option<(bool, (u64, u64))>, CallError> {
    let req = Request::PeerWrite(PeerWriteReq {
        volume: client.volume().id,
        lba,
        offset: offset as u32,
        durable,
        reply_to,
    });
    match call(client, contact, &req, Bytes::copy_from_slice(data)).await? {
        (
            Response::PeerWritten {
                held: true,
                durable,
                ticket,
                instance,
            },
            _,
        ) => Ok(Some((durable, (ticket, instance)))),
        (Response::PeerWritten { held: false, .. }, _) => Ok(None),
        (other, _) => Err(CallError::Protocol(format!(
            "peer write answered with {other:?}"
        ))),
    }
}

/// How long a holder waits for a writer to take note of a `PeerDurable` (it may
/// wait behind the writer's own requests on the connection).
const DURABLE_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);

/// Tells a client that wrote through this cache (at its contact `to`) that its
/// changes to block `lba` with tickets from `from` to `through` (one copy of the
/// block) reached the nodes, so its
/// flush need not ask this cache (which may be gone by then). Best effort: a writer
/// not told asks, as before.
pub(crate) async fn tell_durable(
    client: &Client,
    to: SocketAddr,
    req: PeerDurableReq,
) -> Result<(), CallError> {
    let req = Request::PeerDurable(req);
    match client
        .peer_conn(to)
        .call(&req, Bytes::new(), DURABLE_NOTICE_TIMEOUT)
        .await?
    {
        (Response::PeerNoted, _) => Ok(()),
        (other, _) => Err(CallError::Protocol(format!(
            "durability notice answered with {other:?}"
        ))),
    }
}

/// Serves `cache` to other clients on `listener` until the cache is gone or
/// `stop` changes.
pub(crate) async fn serve(
    listener: TcpListener,
    cache: Weak<CacheInner>,
    mut stop: watch::Receiver<()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(PEER_CONNECTIONS));
    // Refused handshakes, logged at a bounded rate; a burst shorter than a second
    // has its hidden count logged a second on. The report ends with the cache (its
    // drop drops the sender of `stop`).
    let refusals = Arc::new(drs_proto::RefusalGate::default());
    let (gate, mut stopped) = (refusals.clone(), stop.clone());
    tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.changed().await;
        };
        gate.report_overdue(stop, |kind, n| {
            tracing::warn!(
                kind,
                not_logged = n,
                "peer handshakes refused and not logged"
            );
        })
        .await;
    });
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        if cache.strong_count() == 0 {
            return;
        }
        let (cache, stop, refusals) = (cache.clone(), stop.clone(), refusals.clone());
        tokio::spawn(async move {
            connection(stream, cache, stop, &refusals).await;
            drop(permit);
        });
    }
}

/// Serves one peer connection. It holds the cache only while it answers a request:
/// a cache its owner dropped (or a client that died) stops serving at once, and the
/// connection closes, so nobody is told a change it forwarded is safe in it.
async fn connection(
    mut stream: TcpStream,
    cache: Weak<CacheInner>,
    mut stop: watch::Receiver<()>,
    refusals: &drs_proto::RefusalGate,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let session = {
        let Some(c) = cache.upgrade() else { return };
        let handshake = drs_proto::auth::accept_within(
            &mut stream,
            c.key(),
            c.cluster_id(),
            drs_proto::Purpose::Data,
            PEER_TIMEOUT,
        );
        match handshake.await {
            Ok(s) => s,
            Err(e) => {
                if let Some(skipped) = refusals.admit(e.kind()) {
                    tracing::warn!(?peer, error = %e, not_logged = skipped, "peer handshake refused; closing the connection");
                }
                return;
            }
        }
    };
    let mut framed = Framed::new(stream, session.frames());
    loop {
        let frame = tokio::select! {
            f = framed.next() => match f {
                Some(Ok(f)) => f,
                _ => return,
            },
            _ = stop.changed() => return,
        };
        let Some(cache) = cache.upgrade() else { return };
        let header = frame.header;
        let (resp, data) = match frame.decode_ctrl::<Request>() {
            _ if header.kind != FrameKind::Request => return,
            _ if header.cluster_id != cache.cluster_id() => (
                Response::Error(WireError::WrongCluster {
                    expected: cache.cluster_id(),
                }),
                Bytes::new(),
            ),
            Ok(req) => match cache.serve_peer(req, frame.payload).await {
                Ok(x) => x,
                Err(e) => (Response::Error(e), Bytes::new()),
            },
            Err(_) => (Response::Error(WireError::Malformed), Bytes::new()),
        };
        let h = FrameHeader {
            kind: FrameKind::Response,
            deadline_ms: 0,
            ..header
        };
        let Ok(f) = Frame::new(h, &resp, data) else {
            return;
        };
        if framed.send(f).await.is_err() {
            return;
        }
    }
}
