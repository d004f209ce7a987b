//! Cluster status: each node's state, and each stripe healthy or degraded, from the
//! nodes' own listings of their blocks (no block bytes are read).

use std::collections::BTreeMap;

use bytes::Bytes;
use drs_proto::{ListReq, NodeId, NodeInfo, Request, Response, SlotInfo, SlotState, StripeId};
use futures::future::join_all;

use crate::select::{self, Seen};
use crate::Client;

/// Entries asked for per listing page.
const PAGE: u32 = 4096;
/// Degraded stripes listed by name in a status (the count is always exact).
const LIST_MAX: usize = 50;

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub id: NodeId,
    pub addr: std::net::SocketAddr,
    /// The node's own report, if it answered.
    pub info: Option<NodeInfo>,
    /// Why it did not answer.
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ClusterStatus {
    pub nodes: Vec<NodeStatus>,
    pub stripes: u64,
    pub healthy: u64,
    pub degraded: u64,
    /// The first degraded stripes, with why.
    pub degraded_list: Vec<(StripeId, String)>,
    /// Blocks locked right now.
    pub locks: Vec<HeldLock>,
}

/// A lock held at one or more members of a stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    pub stripe: StripeId,
    pub index: u8,
    /// The data block's number in the volume.
    pub lba: u64,
    pub owner: u64,
    /// The client whose lease keeps it.
    pub client: u64,
    /// Members holding it.
    pub members: usize,
    /// The longest lease left at any of them.
    pub lease_left_ms: u64,
}

impl Client {
    /// Asks every node for its state and its blocks' versions.
    pub async fn status(&self) -> ClusterStatus {
        let geo = &self.inner.geo;
        let nodes = self.map().nodes.clone();
        let pings = join_all(nodes.iter().map(|n| async move {
            match self.call(n.id, &Request::Ping, Bytes::new()).await {
                Ok((Response::Pong(info), _)) => (Some(info), None),
                Ok((other, _)) => (None, Some(format!("unexpected answer {other:?}"))),
                Err(e) => (None, Some(e.to_string())),
            }
        }))
        .await;
        let statuses: Vec<NodeStatus> = nodes
            .iter()
            .zip(pings)
            .map(|(n, (info, error))| NodeStatus {
                id: n.id,
                addr: n.addr,
                info,
                error,
            })
            .collect();
        let listings = join_all(
            statuses
                .iter()
                .filter(|s| s.info.is_some())
                .map(|s| self.list_node(s.id)),
        )
        .await;
        let mut by_stripe: BTreeMap<StripeId, Vec<(NodeId, SlotInfo)>> = BTreeMap::new();
        for (node, slots) in listings.into_iter().flatten() {
            for s in slots {
                by_stripe.entry(s.stripe).or_default().push((node, s));
            }
        }
        let mut healthy = 0;
        let mut degraded = 0;
        let mut degraded_list = Vec::new();
        let mut locks = Vec::new();
        for stripe in 0..geo.stripes() {
            let slots = by_stripe.remove(&stripe).unwrap_or_default();
            let mut why = Vec::new();
            for p in 0..geo.width() {
                let node = geo.member(stripe, p);
                if !slots
                    .iter()
                    .any(|(n, s)| *n == node && s.position as usize == p)
                {
                    why.push(format!("node {node} not answering"));
                }
            }
            let seen: Vec<Seen> = slots
                .iter()
                .map(|(_, s)| Seen {
                    position: s.position as usize,
                    versions: s.versions.clone(),
                })
                .collect();
            let newest = select::newest(geo.k, &seen);
            for (i, (n, s)) in slots.iter().enumerate() {
                match s.state {
                    SlotState::Corrupt => why.push(format!("node {n} block corrupt")),
                    SlotState::Unverified => why.push(format!("node {n} recovering")),
                    SlotState::Ok => {}
                }
                if !select::agrees(geo.k, &seen[i], &newest) {
                    why.push(format!("node {n} behind"));
                }
                for l in &s.locks {
                    match locks.iter_mut().find(|h: &&mut HeldLock| {
                        (h.stripe, h.index, h.owner) == (stripe, l.index, l.owner)
                    }) {
                        Some(h) => {
                            h.members += 1;
                            h.lease_left_ms = h.lease_left_ms.max(l.lease_left_ms);
                        }
                        None => locks.push(HeldLock {
                            stripe,
                            index: l.index,
                            lba: geo.lba(stripe, l.index as usize),
                            owner: l.owner,
                            client: l.client,
                            members: 1,
                            lease_left_ms: l.lease_left_ms,
                        }),
                    }
                }
            }
            if why.is_empty() {
                healthy += 1;
            } else {
                degraded += 1;
                if degraded_list.len() < LIST_MAX {
                    degraded_list.push((stripe, why.join(", ")));
                }
            }
        }
        ClusterStatus {
            nodes: statuses,
            stripes: geo.stripes(),
            healthy,
            degraded,
            degraded_list,
            locks,
        }
    }

    /// Every block a node holds, with versions and state, page by page; `None` if it
    /// does not answer.
    pub async fn list_node(&self, node: NodeId) -> Option<(NodeId, Vec<SlotInfo>)> {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let req = Request::List(ListReq {
                volume: self.inner.volume.id,
                from_stripe: from,
                max: PAGE,
            });
            match self.call(node, &req, Bytes::new()).await {
                Ok((Response::List(page), _)) => {
                    out.extend(page.slots);
                    match page.next {
                        Some(n) if n > from => from = n,
                        _ => return Some((node, out)),
                    }
                }
                _ => return None,
            }
        }
    }
}
