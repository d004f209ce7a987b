//! The DRS storage node.
//!
//! # Layout
//! - [`store`]: the durable block store of one volume (data file, block headers,
//!   write-ahead log, one writer thread).
//! - [`node`]: the node: its stores and lock tables, and the handling of every request.
//! - [`rpc`]: connections and frames.
//! - [`recover`]: rejoining after a restart and catching up on missed updates.
//! - [`aon`]: all-or-nothing updates (relays) and lease expiry (fencing).
//! - [`metrics`]: the Prometheus metrics it serves (`--metrics ADDR`).
//! - [`scrubber`]: the background scrubber (every block against its checksum, at a
//!   bounded rate; corrupt blocks rebuilt from their stripes).
//! - [`member`]: the metadata service: the replica a node may host, registration,
//!   heartbeats, following the cluster map.
//!
//! [`run`] starts all of it on a bound listener, so tests can start a node on port 0.

pub mod aon;
pub mod cachegroup;
pub mod cli;
pub mod member;
pub mod metrics;
pub mod node;
pub mod recover;
pub mod rpc;
#[cfg(test)]
mod rpc_tests;
pub mod scrubber;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use drs_client::{Client, ClientConfig};
use drs_proto::ClusterMap;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use node::{Node, NodeConfig};

/// Settings of the client a node uses to read its peers during recovery.
fn peer_client_config(key: &drs_proto::ClusterKey) -> ClientConfig {
    ClientConfig {
        key: key.clone(),
        request_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_millis(500),
        reconnect_max: Duration::from_millis(500),
        ..ClientConfig::default()
    }
}

/// Opens the node's stores (replaying their logs), then serves `listener` until
/// `shutdown` turns true, recovering in the background. On shutdown, checkpoints the
/// stores so the next start replays little.
pub async fn run(
    cfg: NodeConfig,
    map: ClusterMap,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let node = {
        let map = map.clone();
        tokio::task::spawn_blocking(move || Node::open(cfg, map)).await??
    };
    let node = Arc::new(node);
    let mut peers = HashMap::new();
    for vid in node.volumes.keys() {
        peers.insert(
            *vid,
            Client::new(map.clone(), *vid, peer_client_config(&node.cfg.key))?,
        );
    }
    tracing::info!(
        node = node.cfg.node,
        incarnation = node.incarnation,
        addr = %listener.local_addr()?,
        "serving"
    );
    let replica = member::start_replica(&node, &map, node.cfg.meta_down_after).await?;
    if let (Some(meta), true) = (&replica, node.cfg.fault_signals) {
        member::isolate_on_signals(meta.clone(), shutdown.clone())?;
    }
    let (reverify, reverify_rx) = watch::channel(0u64);
    if let Some(meta) = drs_meta::MetaClient::for_map(&map, &node.cfg.key) {
        let addr = match map.node(node.cfg.node) {
            Some(n) => n.addr,
            None => listener.local_addr()?,
        };
        tokio::spawn(member::run(
            node.clone(),
            peers.clone(),
            meta,
            addr,
            node.cfg.meta_down_after,
            reverify,
            shutdown.clone(),
        ));
    }
    tokio::spawn(aon::run(node.clone(), peers.clone(), shutdown.clone()));
    tokio::spawn(scrubber::run(node.clone(), peers.clone(), shutdown.clone()));
    if let Some(addr) = node.cfg.metrics {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("metrics: listen on {addr}: {e}"))?;
        tracing::info!(%addr, "serving metrics at /metrics");
        let n = node.clone();
        let render: drs_metrics::Render = Arc::new(move || metrics::render(&n));
        tokio::spawn(drs_metrics::serve(listener, render, shutdown.clone()));
    }
    tokio::spawn(recover::lifecycle(
        node.clone(),
        peers,
        reverify_rx,
        shutdown.clone(),
    ));
    rpc::serve(node.clone(), listener, shutdown).await;
    if let Some(meta) = replica {
        if let Err(e) = meta.shutdown().await {
            tracing::warn!(error = %e, "metadata replica shutdown");
        }
    }
    for (vid, v) in &node.volumes {
        if let Err(e) = v.store.checkpoint().await {
            tracing::warn!(volume = vid, error = %e, "checkpoint at shutdown failed");
        }
    }
    Ok(())
}
