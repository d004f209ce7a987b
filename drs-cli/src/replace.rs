//! `drs-cli node replace`: a new, empty node in a dead node's place, rebuilt from the
//! stripes, with progress and an ETA until the metadata service marks it up.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use drs_meta::NodeState;
use drs_proto::{NodeState as Serving, Request, Response};
use indicatif::{ProgressBar, ProgressStyle};

use crate::out::say;

/// How long the rebuild may go without progress before the command gives up waiting.
const STALL: Duration = Duration::from_secs(120);
/// How often progress is printed as a line when stderr is not a terminal (logs,
/// scripts); a terminal gets a live bar instead.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

pub async fn run(a: crate::ReplaceArgs) -> anyhow::Result<()> {
    if !(a.rate.is_finite() && a.rate >= 0.0) {
        anyhow::bail!("--rate must be a number of MiB per second, 0 or more");
    }
    let mut local = crate::open_local(&a.c.cluster)?;
    local.options.rebuild_rate_mib = a.rate;
    let addr = local
        .replace(a.id, a.addr)
        .await
        .with_context(|| format!("replace node {}", a.id))?;
    say!(
        "node {} replaced: new empty node at {addr} (log {}), rebuilding{}",
        a.id,
        local.log_path(a.id).display(),
        if a.rate > 0.0 {
            format!(" at most {} MiB/s", a.rate)
        } else {
            String::new()
        }
    );
    if a.no_wait {
        return Ok(());
    }
    let client = crate::client(&a.c.cluster).await?;
    let meta = drs_meta::MetaClient::for_map(&local.map, &local.key)
        .context("the cluster has no metadata service")?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "rebuild [{bar:40}] {pos}/{len} blocks verified  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let start = Instant::now();
    let mut last_change = Instant::now();
    let mut last = (0, 0);
    // The first progress seen, and when: the rate and ETA count from there.
    let mut first: Option<(u64, Instant)> = None;
    let mut next_line = Instant::now() + PROGRESS_EVERY;
    loop {
        // Up in the map: every block verified and the service told.
        if let Ok(state) = meta.read().await {
            if let Some(r) = state.nodes.get(&a.id) {
                if r.state == NodeState::Up && r.addr == addr {
                    break;
                }
            }
        }
        if let Ok((Response::Pong(info), _)) =
            client.call(a.id, &Request::Ping, Default::default()).await
        {
            let now = match info.state {
                Serving::Recovering { verified, total } => (verified, total),
                Serving::Up => (last.1.max(1), last.1.max(1)),
            };
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            if let Some(b) = &bar {
                b.set_length(now.1);
                b.set_position(now.0);
            }
            if now.1 > 0 {
                let (v0, t0) = *first.get_or_insert((now.0, Instant::now()));
                if bar.is_none() && Instant::now() >= next_line {
                    next_line = Instant::now() + PROGRESS_EVERY;
                    eprintln!("{}", progress_line(now, v0, t0.elapsed()));
                }
            }
        }
        if local.pid(a.id).is_none() {
            anyhow::bail!("the new node {} exited: {}", a.id, local.last_words(a.id));
        }
        if last_change.elapsed() > STALL {
            anyhow::bail!(
                "no rebuild progress for {} s ({}/{} blocks verified); see {}",
                STALL.as_secs(),
                last.0,
                last.1,
                local.log_path(a.id).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    say!(
        "node {} rebuilt and up after {:.1} s",
        a.id,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A progress line: blocks verified of all, the rate since `from` blocks were
/// verified `elapsed` ago, and the time left at that rate.
fn progress_line((verified, total): (u64, u64), from: u64, elapsed: Duration) -> String {
    let pct = verified as f64 * 100.0 / total.max(1) as f64;
    let rate = verified.saturating_sub(from) as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = if rate > 0.0 {
        format!("{:.0} s", total.saturating_sub(verified) as f64 / rate)
    } else {
        "unknown".to_string()
    };
    format!(
        "rebuild: {verified}/{total} blocks verified ({pct:.0}%), {rate:.1} blocks/s, eta {eta}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_say_rate_and_time_left() {
        let l = progress_line((30, 100), 10, Duration::from_secs(10));
        assert_eq!(
            l,
            "rebuild: 30/100 blocks verified (30%), 2.0 blocks/s, eta 35 s"
        );
        let l = progress_line((0, 100), 0, Duration::from_secs(1));
        assert!(l.ends_with("eta unknown"), "{l}");
    }
}
