//! `drs-cli scrub`.

use crate::out::say;
use std::io::IsTerminal;
use std::path::Path;

use drs_client::ScrubOptions;
use indicatif::{ProgressBar, ProgressStyle};

use drs_local::size::human;

pub async fn run(
    cluster: &Path,
    repair: bool,
    rate_mib: Option<f64>,
    parallel: usize,
) -> anyhow::Result<i32> {
    let client = crate::client(cluster).await?;
    let opts = ScrubOptions {
        repair,
        concurrency: parallel.max(1),
        rate_bytes_per_sec: rate_mib.map(|r| (r * 1048576.0) as u64),
    };
    let report = scrub_with_progress(&client, &opts).await;
    print_report(&report);
    Ok(if report.unrecoverable.is_empty() {
        0
    } else {
        1
    })
}

/// Scrubs with a progress bar when stderr is a terminal.
pub async fn scrub_with_progress(
    client: &drs_client::Client,
    opts: &ScrubOptions,
) -> drs_client::ScrubReport {
    let total = client.geometry().stripes();
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "scrub [{bar:40}] {pos}/{len} stripes  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let report = client
        .scrub(opts, &|done, _| {
            if let Some(b) = &bar {
                b.set_position(done);
            }
        })
        .await;
    // A repair unlocks as it goes, without waiting for the answers: let them reach
    // the nodes before the command exits.
    client
        .settle_unlocks(std::time::Duration::from_secs(5))
        .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    report
}

pub fn print_report(r: &drs_client::ScrubReport) {
    say!(
        "scrub: {} stripes checked ({} read): {} healthy, {} repaired, {} found (not repaired), {} degraded (not fully checked), {} unrecoverable",
        r.stripes,
        human(r.bytes_read),
        r.healthy,
        r.repaired.len(),
        r.found.len(),
        r.degraded_stripes(),
        r.unrecoverable.len()
    );
    for (label, list) in [
        ("repaired", &r.repaired),
        ("found", &r.found),
        ("degraded", &r.degraded),
        ("UNRECOVERABLE", &r.unrecoverable),
    ] {
        for f in list.iter().take(20) {
            say!("  {label}: {f}");
        }
        if list.len() > 20 {
            say!("  {label}: ... and {} more", list.len() - 20);
        }
    }
}
