//! The pure parts of the report: rates, ratios, targets, percentiles, the table, the
//! load average and the date.

use std::fmt::Write as _;
use std::time::Duration;

/// What a row's values count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    MiBs,
    Iops,
    /// Files created (or read) per second.
    Files,
    /// A time: lower is better, so the ratio is baseline / DRS.
    Ms,
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::MiBs => "MiB/s",
            Unit::Iops => "IOPS",
            Unit::Files => "files/s",
            Unit::Ms => "ms",
        }
    }
}

/// One measurement beside its baseline, both from the same run.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub unit: Unit,
    /// The DRS value.
    pub drs: f64,
    /// What the baseline is.
    pub baseline_name: String,
    /// The baseline value, as measured.
    pub baseline: f64,
    /// The baseline is compared after scaling by this (k/(k+m) for writes: the DRS
    /// writes k+m blocks for every k of data), 1 otherwise.
    pub scale: f64,
    /// Minimum ratio, if there is a target.
    pub target: Option<f64>,
}

impl Row {
    /// The value DRS is compared with: `baseline * scale`.
    pub fn compared(&self) -> f64 {
        self.baseline * self.scale
    }

    /// DRS / baseline for rates, baseline / DRS for times: higher is better either way.
    pub fn ratio(&self) -> f64 {
        match self.unit {
            Unit::Ms => ratio(self.compared(), self.drs),
            _ => ratio(self.drs, self.compared()),
        }
    }

    /// Whether the target is met; `None` without a target.
    pub fn met(&self) -> Option<bool> {
        self.target.map(|t| meets(self.ratio(), t))
    }
}

/// `value / baseline`; NaN when the baseline is not a positive number.
pub fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline > 0.0 && baseline.is_finite() && value.is_finite() {
        value / baseline
    } else {
        f64::NAN
    }
}

/// True iff `ratio` reaches `target` (a NaN ratio never does).
pub fn meets(ratio: f64, target: f64) -> bool {
    ratio >= target
}

/// MiB per second.
pub fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

/// Operations per second.
pub fn per_s(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The `p`-th percentile (0..=100, nearest rank) of `sorted`; zero if it is empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn value(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "-".into()
    }
}

/// The table: measure, DRS value, baseline, ratio, target, met.
pub fn format_table(rows: &[Row]) -> String {
    let head = [
        "measure".to_string(),
        "unit".into(),
        "DRS".into(),
        "baseline".into(),
        "baseline value".into(),
        "ratio".into(),
        "target".into(),
        "met?".into(),
    ];
    let mut lines: Vec<[String; 8]> = vec![head];
    for r in rows {
        let ratio = r.ratio();
        lines.push([
            r.name.clone(),
            r.unit.label().into(),
            value(r.drs),
            r.baseline_name.clone(),
            value(r.compared()),
            if ratio.is_finite() {
                format!("{ratio:.2}")
            } else {
                "-".into()
            },
            r.target
                .map(|t| format!(">= {t:.2}"))
                .unwrap_or_else(|| "-".into()),
            match r.met() {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            },
        ]);
    }
    let mut widths = [0usize; 8];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let left = [true, true, false, true, false, false, true, true];
    let mut out = String::new();
    for (n, l) in lines.iter().enumerate() {
        let mut line = String::new();
        for (i, c) in l.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if left[i] {
                let _ = write!(line, "{c:<w$}", w = widths[i]);
            } else {
                let _ = write!(line, "{c:>w$}", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if n == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

/// The three load averages of a `/proc/loadavg` line.
pub fn parse_loadavg(s: &str) -> Option<[f64; 3]> {
    let mut it = s.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// `/proc/loadavg` as `1.04 0.94 0.64`, or `unknown`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .as_deref()
        .and_then(parse_loadavg)
        .map(|[a, b, c]| format!("{a:.2} {b:.2} {c:.2} (1, 5, 15 min)"))
        .unwrap_or_else(|| "unknown".into())
}

/// True when `program --version` runs and succeeds (the tool is installed).
pub fn runs(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The 1-minute load average (0 if unknown).
pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .as_deref()
        .and_then(parse_loadavg)
        .map_or(0.0, |[a, _, _]| a)
}

/// The first `model name` of a `/proc/cpuinfo`.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the Unix epoch.
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// User and system CPU seconds of a `/proc/<pid>/stat` line (all its threads), with
/// `ticks` clock ticks per second.
pub fn parse_cpu_secs(stat: &str, ticks: f64) -> Option<(f64, f64)> {
    // Fields after the command name (which may hold spaces), from field 3 on.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime / ticks, stime / ticks))
}

/// CPU seconds (user, system) used so far by process `pid`; zero if it is gone.
/// `/proc` counts in USER_HZ, which is 100 on Linux.
pub fn cpu_secs(pid: u32) -> (f64, f64) {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .as_deref()
        .and_then(|s| parse_cpu_secs(s, 100.0))
        .unwrap_or((0.0, 0.0))
}

/// (busy, total) jiffies of all CPUs from the `cpu` line of a `/proc/stat`; busy is
/// everything but idle and iowait.
pub fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice, counted in user]
    let total: u64 = v.iter().take(8).sum();
    Some((total - v[3] - v[4], total))
}

/// The machine's (busy, total) CPU jiffies so far.
pub fn machine_jiffies() -> (u64, u64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(parse_proc_stat)
        .unwrap_or((0, 0))
}

/// One line on where the CPU went during a phase: `bench` and `nodes` are (user,
/// system) seconds, `wall` the phase's seconds, `cpus` the machine's CPUs, `machine`
/// the share of all CPUs busy with anything (other programs too), 0..=1.
pub fn cpu_line(
    bench: (f64, f64),
    nodes: (f64, f64),
    wall: f64,
    cpus: usize,
    machine: f64,
) -> String {
    let used = bench.0 + bench.1 + nodes.0 + nodes.1;
    let busy = ratio(used, wall * cpus.max(1) as f64) * 100.0;
    format!(
        "CPU: bench {:.2} s (user {:.2} + sys {:.2}), nodes {:.2} s (user {:.2} + sys {:.2}) in {:.2} s on {cpus} CPUs: {busy:.0}% busy (machine {:.0}%)",
        bench.0 + bench.1,
        bench.0,
        bench.1,
        nodes.0 + nodes.1,
        nodes.0,
        nodes.1,
        wall,
        machine * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(drs: f64, baseline: f64, scale: f64, target: Option<f64>) -> Row {
        Row {
            name: "seq write".into(),
            unit: Unit::MiBs,
            drs,
            baseline_name: "local x 4/6".into(),
            baseline,
            scale,
            target,
        }
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(50.0, 100.0), 0.5);
        assert!(ratio(1.0, 0.0).is_nan());
        assert!(ratio(1.0, -3.0).is_nan());
        assert!(ratio(f64::NAN, 1.0).is_nan());
        assert!(ratio(1.0, f64::INFINITY).is_nan());
        assert!(meets(0.5, 0.5));
        assert!(!meets(0.49, 0.5));
        assert!(!meets(f64::NAN, 0.5));
    }

    #[test]
    fn write_ratio_scales_the_baseline_by_k_over_k_plus_m() {
        // DRS 40 MiB/s; local 90 MiB/s; 4+2 -> compared with 60 MiB/s.
        let r = row(40.0, 90.0, 4.0 / 6.0, Some(0.6));
        assert!((r.compared() - 60.0).abs() < 1e-9);
        assert!((r.ratio() - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.met(), Some(true));
        let r = row(30.0, 90.0, 4.0 / 6.0, Some(0.6));
        assert_eq!(r.met(), Some(false));
        let r = row(30.0, 90.0, 1.0, None);
        assert_eq!(r.met(), None);
        assert_eq!(row(1.0, 0.0, 1.0, Some(0.5)).met(), Some(false));
    }

    #[test]
    fn rates() {
        assert_eq!(mib_per_s(3 << 20, Duration::from_secs(2)), 1.5);
        assert_eq!(per_s(500, Duration::from_millis(250)), 2000.0);
        assert!(mib_per_s(1, Duration::ZERO).is_finite());
    }

    #[test]
    fn percentiles() {
        let ms = |v: u64| Duration::from_millis(v);
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&v, 50.0), ms(50));
        assert_eq!(percentile(&v, 99.0), ms(99));
        assert_eq!(percentile(&v, 100.0), ms(100));
        assert_eq!(percentile(&v, 0.0), ms(1));
        assert_eq!(percentile(&[ms(7)], 99.0), ms(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn table_layout() {
        let rows = vec![
            row(40.0, 90.0, 4.0 / 6.0, Some(0.6)),
            Row {
                name: "random 4 KiB overwrite".into(),
                unit: Unit::Iops,
                drs: 812.25,
                baseline_name: "local pwrite".into(),
                baseline: 2000.0,
                scale: 1.0,
                target: None,
            },
            row(10.0, 0.0, 1.0, Some(0.5)),
        ];
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].starts_with("measure"));
        assert!(lines[1].chars().all(|c| c == '-'));
        // Every cell of a column starts at the same place.
        let col = lines[0].find("baseline value").unwrap();
        assert_eq!(lines[1].len(), lines[0].len());
        assert!(lines[2].contains("40.0"));
        assert!(lines[2].contains("60.0"), "compared value is scaled: {t}");
        assert!(lines[2].contains("0.67"));
        assert!(lines[2].contains(">= 0.60"));
        assert!(lines[2].trim_end().ends_with("yes"));
        assert!(lines[3].contains("812.2") || lines[3].contains("812.3"));
        assert!(lines[3].contains("IOPS"));
        assert!(lines[3].trim_end().ends_with('-'));
        assert!(lines[4].trim_end().ends_with("NO"), "{t}");
        for l in &lines[2..] {
            assert!(l.len() > col);
        }
    }

    #[test]
    fn loadavg_and_cpu() {
        assert_eq!(
            parse_loadavg("1.04 0.94 0.64 3/105 26294\n"),
            Some([1.04, 0.94, 0.64])
        );
        assert_eq!(parse_loadavg("1.0 x"), None);
        assert_eq!(parse_loadavg(""), None);
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }

    #[test]
    fn cpu_seconds_from_proc_stat() {
        let line = "4242 (tokio worker) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(parse_cpu_secs(line, 100.0), Some((2.5, 0.75)));
        assert_eq!(parse_cpu_secs("4242 (x) S 1", 100.0), None);
        assert_eq!(parse_cpu_secs("garbage", 100.0), None);
    }

    #[test]
    fn cpu_lines() {
        let l = cpu_line((0.5, 0.25), (1.0, 0.25), 1.0, 2, 0.5);
        assert!(l.contains("bench 0.75 s (user 0.50 + sys 0.25)"), "{l}");
        assert!(l.contains("nodes 1.25 s"), "{l}");
        assert!(l.ends_with("100% busy (machine 50%)"), "{l}");
        assert!(cpu_line((0.0, 0.0), (0.0, 0.0), 0.0, 2, 0.0).contains("NaN% busy"));
    }

    #[test]
    fn proc_stat() {
        let s = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat(s), Some((160, 1000)));
        assert_eq!(parse_proc_stat("cpu 1 2\n"), None);
        assert_eq!(parse_proc_stat("intr 1\n"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc_date(4_107_542_399), "2100-02-28 23:59:59 UTC");
    }
}
