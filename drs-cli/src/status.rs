//! `drs-cli status`.

use crate::out::say;
use std::path::Path;

use std::net::SocketAddr;
use std::time::Duration;

use drs_meta::{MetaState, MetaStatus, Role};
use drs_proto::{ClusterMap, NodeState};
use serde_json::json;

use drs_local::size::human;

/// Prints the status; returns 0 when every node is up and every stripe healthy, 2
/// otherwise (1 is for errors).
pub async fn run(cluster: &Path, as_json: bool) -> anyhow::Result<i32> {
    let client = crate::client(cluster).await?;
    let meta = MetaView::gather(&client.map(), &client.config().key).await?;
    let st = client.status().await;
    let v = client.volume();
    let member = |id: u32| {
        meta.as_ref()
            .and_then(|m| m.state.as_ref())
            .and_then(|s| s.nodes.get(&id))
    };
    if as_json {
        let nodes: Vec<_> = st
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id,
                    "addr": n.addr.to_string(),
                    "state": match &n.info {
                        Some(i) => match i.state {
                            NodeState::Up => "up".to_string(),
                            NodeState::Recovering { .. } => "recovering".to_string(),
                        },
                        None => "down".to_string(),
                    },
                    "error": n.error,
                    // Blocks verified against their stripes (a recovering or
                    // rebuilding node's progress).
                    "recovery": n.info.as_ref().and_then(|i| match i.state {
                        NodeState::Recovering { verified, total } => Some(json!({
                            "verified": verified,
                            "total": total,
                        })),
                        NodeState::Up => None,
                    }),
                    "incarnation": n.info.as_ref().map(|i| i.incarnation),
                    "map_state": member(n.id).map(|r| r.state.as_str()),
                    "map_incarnation": member(n.id).map(|r| r.incarnation),
                    "stats": n.info.as_ref().map(|i| json!({
                        "reads": i.stats.reads,
                        "updates": i.stats.updates,
                        "bytes_read": i.stats.bytes_read,
                        "bytes_updated": i.stats.bytes_updated,
                        "corrupt_found": i.stats.corrupt_found,
                        "repairs_installed": i.stats.repairs_installed,
                        "pending_updates": i.stats.pending_updates,
                        "locks_granted": i.stats.locks_granted,
                        "locks_denied": i.stats.locks_denied,
                        "clients_fenced": i.stats.fenced,
                        "updates_relayed": i.stats.relayed,
                        "cache_blocks_written_back": i.stats.written_back,
                        "pauses": i.stats.pauses,
                        "scrub": {
                            "passes": i.stats.scrub_passes,
                            "blocks_checked": i.stats.scrub_checked,
                            "corrupt_found": i.stats.scrub_found,
                            "repaired": i.stats.scrub_repaired,
                            "pass_position": i.stats.scrub_position,
                            "pass_blocks": i.stats.scrub_total,
                        },
                    })),
                })
            })
            .collect();
        let out = json!({
            "cluster_id": format!("{:016x}", client.map().cluster_id),
            "epoch": meta.as_ref().and_then(|m| m.state.as_ref()).map_or(client.map().epoch, |s| s.epoch),
            "meta": meta.as_ref().map(MetaView::json),
            "volume": { "id": v.id, "k": v.k, "m": v.m, "block_size": v.block_size, "blocks": v.blocks, "min_write": v.min_write },
            "nodes": nodes,
            "stripes": { "total": st.stripes, "healthy": st.healthy, "degraded": st.degraded,
                         "degraded_list": st.degraded_list.iter().map(|(s, w)| json!({"stripe": s, "why": w})).collect::<Vec<_>>() },
            "locks": crate::locks::json(&st.locks),
        });
        say!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        say!(
            "cluster {:016x}  epoch {}  volume {}: {}+{}, {} blocks of {} ({}), min_write {}",
            client.map().cluster_id,
            meta.as_ref()
                .and_then(|m| m.state.as_ref())
                .map_or(client.map().epoch, |s| s.epoch),
            v.id,
            v.k,
            v.m,
            v.blocks,
            human(v.block_size as u64),
            human(v.blocks * v.block_size as u64),
            v.min_write
        );
        if let Some(m) = &meta {
            m.print();
        }
        say!(
            "{:<5} {:<22} {:<22} {:>5} {:>10} {:>10} {:>8} {:>8}  {}",
            "node",
            "address",
            "state",
            "inc",
            "reads",
            "updates",
            "corrupt",
            "repairs",
            "scrub (passes, found)"
        );
        for n in &st.nodes {
            match &n.info {
                Some(i) => {
                    let mut state = match i.state {
                        NodeState::Up => "up".to_string(),
                        NodeState::Recovering { verified, total } => {
                            format!("recovering {verified}/{total}")
                        }
                    };
                    if let Some(r) = member(n.id).filter(|r| !r.state.is_up()) {
                        state = format!("{state} (map: {})", r.state.as_str());
                    }
                    say!(
                        "{:<5} {:<22} {:<22} {:>5} {:>10} {:>10} {:>8} {:>8}  {}",
                        n.id,
                        n.addr,
                        state,
                        member(n.id).map_or(i.incarnation, |r| r.incarnation),
                        i.stats.reads,
                        i.stats.updates,
                        i.stats.corrupt_found,
                        i.stats.repairs_installed,
                        scrub_column(&i.stats)
                    );
                }
                None => say!(
                    "{:<5} {:<22} DOWN ({})",
                    n.id,
                    n.addr,
                    n.error.as_deref().unwrap_or("no answer")
                ),
            }
        }
        say!(
            "stripes: {} total, {} healthy, {} degraded",
            st.stripes,
            st.healthy,
            st.degraded
        );
        for (s, why) in &st.degraded_list {
            say!("  stripe {s}: {why}");
        }
        if st.degraded > st.degraded_list.len() as u64 {
            say!(
                "  ... and {} more",
                st.degraded - st.degraded_list.len() as u64
            );
        }
        if !st.locks.is_empty() {
            say!("locks held: {}", st.locks.len());
        }
    }
    let all_up = st.nodes.iter().all(|n| {
        matches!(n.info.as_ref().map(|i| i.state), Some(NodeState::Up))
            && member(n.id).is_none_or(|r| r.state.is_up())
    }) && meta.as_ref().is_none_or(|m| m.state.is_some());
    Ok(if all_up && st.degraded == 0 { 0 } else { 2 })
}

/// What the metadata service says: its state (read at the leader) and each
/// replica's own view.
struct MetaView {
    state: Option<MetaState>,
    error: Option<String>,
    replicas: Vec<(u64, SocketAddr, Result<MetaStatus, String>)>,
    /// The file system's capacity and mounts, if it is formatted.
    fs: Option<drs_meta::fs::FsStats>,
}

impl MetaView {
    /// None without a metadata service; an error when it refuses this client's key.
    async fn gather(
        map: &ClusterMap,
        key: &drs_proto::ClusterKey,
    ) -> anyhow::Result<Option<MetaView>> {
        let Some(meta) = drs_meta::MetaClient::for_map(map, key) else {
            return Ok(None);
        };
        let meta = meta.with_deadline(Duration::from_secs(5));
        let (state, error) = match meta.read().await {
            Ok(s) => (Some(s), None),
            Err(e @ drs_meta::MetaError::Auth { .. }) => return Err(e.into()),
            Err(e) => (None, Some(e.to_string())),
        };
        let mut replicas = Vec::new();
        for r in &map.meta {
            let st = meta.status_of(r.addr).await.map_err(|e| e.to_string());
            replicas.push((r.id, r.addr, st));
        }
        let fs = match meta.fs_query(drs_meta::fs::FsQuery::StatFs).await {
            Ok(Ok(drs_meta::fs::FsReply::StatFs(s))) => Some(s),
            _ => None,
        };
        Ok(Some(MetaView {
            state,
            error,
            replicas,
            fs,
        }))
    }

    fn leader(&self) -> Option<&MetaStatus> {
        self.replicas
            .iter()
            .filter_map(|(_, _, s)| s.as_ref().ok())
            .find(|s| s.role == Role::Leader)
    }

    fn print(&self) {
        match (self.leader(), &self.error) {
            (Some(l), None) => say!(
                "metadata: leader {} (term {}), {} of {} replicas answering",
                l.id,
                l.term,
                self.replicas.iter().filter(|r| r.2.is_ok()).count(),
                self.replicas.len()
            ),
            (_, e) => say!(
                "metadata: NO LEADER ({})",
                e.as_deref().unwrap_or("no replica says it leads")
            ),
        }
        for (id, addr, st) in &self.replicas {
            match st {
                Ok(s) => say!(
                    "  replica {id} {addr}: {:?}, term {}, applied {}, epoch {}",
                    s.role,
                    s.term,
                    s.last_applied,
                    s.epoch
                ),
                Err(e) => say!("  replica {id} {addr}: no answer ({e})"),
            }
        }
        if let Some(f) = &self.fs {
            let bs = u64::from(f.block_size);
            say!(
                "file system: {} files, {} of {} free, {} mount(s), {} held for mounts",
                f.files,
                human(f.free * bs),
                human(f.blocks * bs),
                f.mounts,
                human(f.held * bs)
            );
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "leader": self.leader().map(|l| l.id),
            "term": self.leader().map(|l| l.term),
            "voters": self.leader().map(|l| l.members.keys().copied().collect::<Vec<_>>()),
            "epoch": self.state.as_ref().map(|s| s.epoch),
            "error": self.error,
            "file_system": self.fs.map(|f| json!({
                "files": f.files, "block_size": f.block_size, "blocks": f.blocks,
                "free": f.free, "mounts": f.mounts, "held": f.held,
            })),
            "replicas": self.replicas.iter().map(|(id, addr, st)| match st {
                Ok(s) => json!({"id": id, "addr": addr.to_string(), "role": format!("{:?}", s.role).to_lowercase(),
                                "term": s.term, "last_applied": s.last_applied, "epoch": s.epoch}),
                Err(e) => json!({"id": id, "addr": addr.to_string(), "error": e}),
            }).collect::<Vec<_>>(),
        })
    }
}

/// The background scrubber's column: passes done and corrupt blocks found, and the
/// position of a pass under way.
fn scrub_column(s: &drs_proto::NodeStats) -> String {
    let mut out = format!("{} passes, {} found", s.scrub_passes, s.scrub_found);
    if s.scrub_position > 0 && s.scrub_total > 0 {
        out.push_str(&format!(
            ", pass at {}%",
            s.scrub_position * 100 / s.scrub_total
        ));
    }
    out
}
