//! Throughput over time while nodes are killed, stopped, restarted or replaced: the
//! model of a run (scenarios, workloads, samples, events), its CSV, and the phase
//! arithmetic (before / during / after the fault). Pure: no I/O but the CSV text;
//! [`crate::timeline_run`] drives a cluster and [`crate::chart`] draws the result.

use std::fmt::Write as _;
use std::time::Duration;

/// What happens to the nodes during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Nothing: the baseline curve.
    Healthy,
    /// One node SIGKILLed at a third of the run, left dead.
    #[value(name = "kill-1")]
    Kill1,
    /// m nodes SIGKILLed at a third of the run, left dead.
    KillM,
    /// One node SIGSTOPped (hung, not dead) at a third, SIGCONTed at two thirds.
    Stop,
    /// One node SIGKILLed at a quarter and restarted at half: it resyncs.
    Restart,
    /// One node SIGKILLed at a quarter and replaced by an empty one at half: it
    /// rebuilds every block under the load.
    Replace,
}

/// Something done to a node at a planned moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill,
    Stop,
    Cont,
    Restart,
    Replace,
}

impl Action {
    pub fn label(&self) -> &'static str {
        match self {
            Action::Kill => "SIGKILL",
            Action::Stop => "SIGSTOP",
            Action::Cont => "SIGCONT",
            Action::Restart => "restart",
            Action::Replace => "replace",
        }
    }
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Healthy,
        Scenario::Kill1,
        Scenario::KillM,
        Scenario::Stop,
        Scenario::Restart,
        Scenario::Replace,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Kill1 => "kill-1",
            Scenario::KillM => "kill-m",
            Scenario::Stop => "stop",
            Scenario::Restart => "restart",
            Scenario::Replace => "replace",
        }
    }

    /// The planned actions: (offset from the start, action, how many nodes).
    pub fn plan(&self, duration: Duration, m: usize) -> Vec<(Duration, Action, usize)> {
        let at = |n: u32, d: u32| duration * n / d;
        match self {
            Scenario::Healthy => Vec::new(),
            Scenario::Kill1 => vec![(at(1, 3), Action::Kill, 1)],
            Scenario::KillM => vec![(at(1, 3), Action::Kill, m)],
            Scenario::Stop => vec![(at(1, 3), Action::Stop, 1), (at(2, 3), Action::Cont, 1)],
            Scenario::Restart => vec![(at(1, 4), Action::Kill, 1), (at(1, 2), Action::Restart, 1)],
            Scenario::Replace => vec![(at(1, 4), Action::Kill, 1), (at(1, 2), Action::Replace, 1)],
        }
    }
}

/// The operations a run repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// 1 MiB sequential writes (whole stripes).
    SeqWrite,
    /// 1 MiB sequential reads.
    SeqRead,
    /// 4 KiB reads at random 4 KiB-aligned offsets.
    RandRead,
    /// 4 KiB overwrites at random 4 KiB-aligned offsets.
    RandWrite,
    /// 70% random 4 KiB reads, 30% random 4 KiB overwrites.
    Mixed,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::SeqWrite,
        Workload::SeqRead,
        Workload::RandRead,
        Workload::RandWrite,
        Workload::Mixed,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Workload::SeqWrite => "seq-write-1m",
            Workload::SeqRead => "seq-read-1m",
            Workload::RandRead => "rand-read-4k",
            Workload::RandWrite => "rand-write-4k",
            Workload::Mixed => "mixed-70-30-4k",
        }
    }

    /// Bytes per operation.
    pub fn io_size(&self) -> usize {
        match self {
            Workload::SeqWrite | Workload::SeqRead => 1 << 20,
            _ => 4096,
        }
    }

    /// Throughput is shown in MiB/s for large operations, operations/s for small.
    pub fn unit(&self) -> Unit {
        if self.io_size() >= 1 << 20 {
            Unit::MiBs
        } else {
            Unit::Iops
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    MiBs,
    Iops,
}

impl Unit {
    pub fn label(&self) -> &'static str {
        match self {
            Unit::MiBs => "MiB/s",
            Unit::Iops => "ops/s",
        }
    }
}

/// What was done in one sampling interval ending at `t` (seconds from the start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t: f64,
    /// Length of the interval in seconds.
    pub dt: f64,
    pub bytes: u64,
    pub ops: u64,
    pub errors: u64,
}

impl Sample {
    pub fn value(&self, unit: Unit) -> f64 {
        if self.dt <= 0.0 {
            return 0.0;
        }
        match unit {
            Unit::MiBs => self.bytes as f64 / self.dt / (1u64 << 20) as f64,
            Unit::Iops => self.ops as f64 / self.dt,
        }
    }
}

/// Whether an event starts a fault, ends one, or only marks a step between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Fault,
    Recovery,
    Mark,
}

/// Something that happened to the cluster, at `t` seconds from the start.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub t: f64,
    pub kind: EventKind,
    pub label: String,
}

/// One run: the samples and the events.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub scenario: Scenario,
    pub workload: Workload,
    /// The system measured ("DRS 4+2", "DRS 1+2 (3 copies)").
    pub system: String,
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
    /// Load average (1 minute) at the start and at the end.
    pub load: (f64, f64),
    /// The first failed operation, if any failed.
    pub first_error: Option<String>,
    /// Bytes a replaced node (or brick) holds once rebuilt, for the rebuild rate.
    pub rebuilt_bytes: Option<u64>,
}

/// Mean throughput of the phases of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phases {
    /// Before the first fault (the whole run if there is none).
    pub before: f64,
    /// From the first fault to the last recovery (to the end if nothing recovers).
    pub during: Option<f64>,
    /// After the last recovery.
    pub after: Option<f64>,
}

impl Phases {
    /// `during / before`: what a fault leaves of the healthy throughput.
    pub fn degraded_ratio(&self) -> Option<f64> {
        ratio(self.during?, self.before)
    }

    /// `after / before`: whether the cluster is back to normal.
    pub fn recovered_ratio(&self) -> Option<f64> {
        ratio(self.after?, self.before)
    }
}

/// `a / b`, or `None` when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

impl Timeline {
    pub fn unit(&self) -> Unit {
        self.workload.unit()
    }

    /// A file name for the run's CSV and charts (without extension).
    pub fn stem(&self) -> String {
        let system: String = self
            .system
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-")
            .to_lowercase();
        format!("{system}_{}_{}", self.scenario.name(), self.workload.name())
    }

    /// MiB/s a replaced node was rebuilt at: its bytes over the time from the
    /// replacement (an event labelled `replace ...`) to the recovery after it.
    pub fn rebuild_rate(&self) -> Option<f64> {
        let bytes = self.rebuilt_bytes?;
        let from = self
            .events
            .iter()
            .find(|e| e.label.starts_with("replace"))?
            .t;
        let to = self
            .events
            .iter()
            .find(|e| e.kind == EventKind::Recovery && e.t >= from)?
            .t;
        ratio(bytes as f64 / (1u64 << 20) as f64, to - from)
    }

    /// The throughput that compares across systems: the mean before the fault for a
    /// healthy run, during it otherwise.
    pub fn headline(&self) -> Option<f64> {
        let p = self.phases();
        if self.scenario == Scenario::Healthy {
            Some(p.before)
        } else {
            p.during
        }
    }

    pub fn total_errors(&self) -> u64 {
        self.samples.iter().map(|s| s.errors).sum()
    }

    /// The time-weighted mean of the samples wholly inside `[from, to)`.
    fn mean(&self, from: f64, to: f64) -> Option<f64> {
        let unit = self.unit();
        let (mut sum, mut time) = (0.0, 0.0);
        for s in &self.samples {
            let start = s.t - s.dt;
            if start >= from - 1e-9 && s.t <= to + 1e-9 {
                sum += s.value(unit) * s.dt;
                time += s.dt;
            }
        }
        (time > 0.0).then(|| sum / time)
    }

    /// Mean throughput before, during and after the fault. The interval an event
    /// falls in belongs to no phase (it is part before, part after).
    pub fn phases(&self) -> Phases {
        let end = self.samples.last().map_or(0.0, |s| s.t);
        let first_fault = self
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Fault)
            .map(|e| e.t)
            .fold(f64::INFINITY, f64::min);
        if !first_fault.is_finite() {
            return Phases {
                before: self.mean(0.0, end).unwrap_or(0.0),
                during: None,
                after: None,
            };
        }
        let last_recovery = self
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Recovery && e.t >= first_fault)
            .map(|e| e.t)
            .fold(f64::NEG_INFINITY, f64::max);
        let before = self.mean(0.0, first_fault).unwrap_or(0.0);
        if last_recovery.is_finite() {
            Phases {
                before,
                during: self.mean(first_fault, last_recovery),
                after: self.mean(last_recovery, end),
            }
        } else {
            Phases {
                before,
                during: self.mean(first_fault, end),
                after: None,
            }
        }
    }

    /// The samples as CSV: `t_s,interval_s,mib_per_s,ops_per_s,errors,event`, one line
    /// per sample; an event is named on the line of the interval it fell in.
    pub fn csv(&self) -> String {
        let mut out = String::from("t_s,interval_s,mib_per_s,ops_per_s,errors,event\n");
        for s in &self.samples {
            let events: Vec<&str> = self
                .events
                .iter()
                .filter(|e| e.t > s.t - s.dt && e.t <= s.t)
                .map(|e| e.label.as_str())
                .collect();
            let _ = writeln!(
                out,
                "{:.3},{:.3},{:.3},{:.1},{},{}",
                s.t,
                s.dt,
                s.value(Unit::MiBs),
                s.value(Unit::Iops),
                s.errors,
                csv_field(&events.join("; "))
            );
        }
        out
    }
}

/// Quotes a CSV field when it needs it.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The summary table of a set of runs, in Markdown.
pub fn summary(runs: &[Timeline]) -> String {
    let mut out = String::from(
        "| system | scenario | workload | unit | before | during | after | during / before | after / before | rebuild MiB/s | errors | load 1m (start, end) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let rat = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for r in runs {
        let p = r.phases();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2}, {:.2} |",
            r.system,
            r.scenario.name(),
            r.workload.name(),
            r.unit().label(),
            num(Some(p.before)),
            num(p.during),
            num(p.after),
            rat(p.degraded_ratio()),
            rat(p.recovered_ratio()),
            num(r.rebuild_rate()),
            r.total_errors(),
            r.load.0,
            r.load.1
        );
    }
    out
}

/// The ratios between systems measured in the same run: for every scenario and
/// workload, `a / b` of their [`Timeline::headline`] for each pair `(a, b)` of
/// system names given (pairs with a side missing are left out); and the rebuild
/// rate of each replace run beside `disk` MiB/s / (k + 1), when `disk` is known
/// (rebuilding a block reads k and writes one).
pub fn ratios(runs: &[Timeline], pairs: &[(String, String)], disk: Option<(f64, u8)>) -> String {
    let mut out = String::from(
        "| scenario | workload | unit | A | B | A | B | A / B |\n|---|---|---|---|---|---|---|---|\n",
    );
    let find = |sys: &str, sc: Scenario, w: Workload| {
        runs.iter()
            .find(|r| r.system == sys && r.scenario == sc && r.workload == w)
    };
    let mut cases: Vec<(Scenario, Workload)> = Vec::new();
    for r in runs {
        if !cases.contains(&(r.scenario, r.workload)) {
            cases.push((r.scenario, r.workload));
        }
    }
    for (sc, w) in cases {
        for (a, b) in pairs {
            let (Some(ra), Some(rb)) = (find(a, sc, w), find(b, sc, w)) else {
                continue;
            };
            let (Some(va), Some(vb)) = (ra.headline(), rb.headline()) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {a} | {b} | {va:.1} | {vb:.1} | {} |",
                sc.name(),
                w.name(),
                w.unit().label(),
                ratio(va, vb).map_or("-".into(), |r| format!("{r:.2}"))
            );
        }
    }
    if let Some((mib, k)) = disk {
        let base = mib / (k as f64 + 1.0);
        for r in runs {
            if let Some(rate) = r.rebuild_rate() {
                let _ = writeln!(
                    out,
                    "| replace | {} | MiB/s | {} rebuild | local read / {} | {rate:.1} | {base:.1} | {} |",
                    r.workload.name(),
                    r.system,
                    k + 1,
                    ratio(rate, base).map_or("-".into(), |x| format!("{x:.2}"))
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(values: &[u64], events: Vec<Event>) -> Timeline {
        Timeline {
            scenario: Scenario::Restart,
            workload: Workload::SeqWrite,
            system: "DRS 4+2".into(),
            samples: values
                .iter()
                .enumerate()
                .map(|(i, v)| Sample {
                    t: (i + 1) as f64 * 0.5,
                    dt: 0.5,
                    bytes: v << 20,
                    ops: *v,
                    errors: 0,
                })
                .collect(),
            events,
            load: (0.5, 1.0),
            first_error: None,
            rebuilt_bytes: None,
        }
    }

    fn ev(t: f64, kind: EventKind) -> Event {
        Event {
            t,
            kind,
            label: format!("{kind:?}"),
        }
    }

    #[test]
    fn phases_split_at_the_events_and_skip_their_intervals() {
        // 0.5 s samples of 50, 50, 50, [fault at 1.6] 10, 10, 10, [recovery at 3.2]
        // 40, 40. MiB per sample = value, so MiB/s = 2 x value.
        let t = run(
            &[25, 25, 25, 5, 5, 5, 20, 20],
            vec![ev(1.6, EventKind::Fault), ev(3.2, EventKind::Recovery)],
        );
        let p = t.phases();
        assert_eq!(p.before, 50.0);
        // The interval (1.5, 2.0] holds the fault and (3.0, 3.5] the recovery.
        assert_eq!(p.during, Some(10.0));
        assert_eq!(p.after, Some(40.0));
        assert_eq!(p.degraded_ratio(), Some(0.2));
        assert_eq!(p.recovered_ratio(), Some(0.8));
    }

    #[test]
    fn a_fault_without_recovery_lasts_to_the_end() {
        let t = run(&[10, 10, 2, 4], vec![ev(1.0, EventKind::Fault)]);
        let p = t.phases();
        assert_eq!(p.before, 20.0);
        assert_eq!(p.during, Some(6.0));
        assert_eq!(p.after, None);
        assert_eq!(p.recovered_ratio(), None);
    }

    #[test]
    fn healthy_runs_have_one_phase() {
        let p = run(&[1, 2, 3], Vec::new()).phases();
        assert_eq!(p.before, 4.0);
        assert_eq!((p.during, p.after), (None, None));
        assert_eq!(ratio(1.0, 0.0), None);
    }

    #[test]
    fn csv_names_events_on_their_interval() {
        let mut t = run(&[1, 2], vec![ev(0.7, EventKind::Fault)]);
        t.events[0].label = "SIGKILL node 1, \"first\"".into();
        let csv = t.csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "t_s,interval_s,mib_per_s,ops_per_s,errors,event");
        assert_eq!(lines[1], "0.500,0.500,2.000,2.0,0,");
        assert_eq!(
            lines[2],
            "1.000,0.500,4.000,4.0,0,\"SIGKILL node 1, \"\"first\"\"\""
        );
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn plans_follow_the_duration() {
        let d = Duration::from_secs(12);
        assert_eq!(Scenario::Healthy.plan(d, 2), vec![]);
        assert_eq!(
            Scenario::KillM.plan(d, 2),
            vec![(Duration::from_secs(4), Action::Kill, 2)]
        );
        assert_eq!(
            Scenario::Replace.plan(d, 2),
            vec![
                (Duration::from_secs(3), Action::Kill, 1),
                (Duration::from_secs(6), Action::Replace, 1)
            ]
        );
    }

    #[test]
    fn summary_has_a_row_per_run_with_ratios() {
        let t = run(
            &[25, 25, 25, 5, 5, 5, 20, 20],
            vec![ev(1.6, EventKind::Fault), ev(3.2, EventKind::Recovery)],
        );
        let s = summary(std::slice::from_ref(&t));
        let row = s.lines().nth(2).unwrap();
        assert_eq!(
            row,
            "| DRS 4+2 | restart | seq-write-1m | MiB/s | 50.0 | 10.0 | 40.0 | 0.20 | 0.80 | - | 0 | 0.50, 1.00 |"
        );
        assert_eq!(t.stem(), "drs-4-2_restart_seq-write-1m");
    }

    #[test]
    fn ratios_pair_systems_and_rate_rebuilds() {
        let mut a = run(&[10, 10], Vec::new());
        a.scenario = Scenario::Healthy;
        let mut b = a.clone();
        b.system = "GlusterFS 4+2".into();
        b.samples.iter_mut().for_each(|s| s.bytes *= 4);
        // A replace run: 64 MiB rebuilt between 1.0 s and 3.0 s.
        let mut r = run(
            &[10, 10, 5, 5, 5, 5, 10, 10],
            vec![
                ev(0.5, EventKind::Fault),
                Event {
                    t: 1.0,
                    kind: EventKind::Mark,
                    label: "replace node 1 by an empty node".into(),
                },
                ev(3.0, EventKind::Recovery),
            ],
        );
        r.scenario = Scenario::Replace;
        r.rebuilt_bytes = Some(64 << 20);
        assert_eq!(r.rebuild_rate(), Some(32.0));
        assert_eq!(a.rebuild_rate(), None);
        let pairs = vec![
            ("DRS 4+2".to_string(), "GlusterFS 4+2".to_string()),
            ("DRS 4+2".to_string(), "nobody".to_string()),
        ];
        let t = ratios(&[a, b, r], &pairs, Some((320.0, 4)));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[2],
            "| healthy | seq-write-1m | MiB/s | DRS 4+2 | GlusterFS 4+2 | 20.0 | 80.0 | 0.25 |"
        );
        assert_eq!(
            lines[3],
            "| replace | seq-write-1m | MiB/s | DRS 4+2 rebuild | local read / 5 | 32.0 | 64.0 | 0.50 |"
        );
        assert_eq!(lines.len(), 4);
    }
}
