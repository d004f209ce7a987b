//! `drs-cli locks`: the locks held right now, who holds them, and how much of the
//! holder's lease is left (a lock whose holder died goes when its lease runs out).

use std::path::Path;

use drs_client::status::HeldLock;
use serde_json::{json, Value};

use crate::out::say;

pub async fn run(cluster: &Path, as_json: bool) -> anyhow::Result<i32> {
    let client = crate::client(cluster).await?;
    let st = client.status().await;
    if as_json {
        say!("{}", serde_json::to_string_pretty(&json(&st.locks))?);
        return Ok(0);
    }
    if st.locks.is_empty() {
        say!("no locks held");
        return Ok(0);
    }
    say!(
        "{:>8} {:>6} {:>5} {:>18} {:>18} {:>8} {:>10}",
        "block",
        "stripe",
        "index",
        "owner",
        "client",
        "members",
        "lease left"
    );
    for l in &st.locks {
        say!(
            "{:>8} {:>6} {:>5} {:>18} {:>18} {:>8} {:>9.1}s",
            l.lba,
            l.stripe,
            l.index,
            format!("{:016x}", l.owner),
            format!("{:016x}", l.client),
            l.members,
            l.lease_left_ms as f64 / 1000.0
        );
    }
    let down = st.nodes.iter().filter(|n| n.info.is_none()).count();
    if down > 0 {
        say!("({down} node(s) did not answer: locks they hold are not shown)");
    }
    Ok(0)
}

/// The locks as JSON, for `locks --json` and `status --json`.
pub fn json(locks: &[HeldLock]) -> Value {
    Value::Array(
        locks
            .iter()
            .map(|l| {
                json!({
                    "block": l.lba,
                    "stripe": l.stripe,
                    "index": l.index,
                    "owner": format!("{:016x}", l.owner),
                    "client": format!("{:016x}", l.client),
                    "members": l.members,
                    "lease_left_ms": l.lease_left_ms,
                })
            })
            .collect(),
    )
}
