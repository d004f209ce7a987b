//! fio as the file-system load of `bench timeline --fs`: the job files of
//! `bench/fio/` run against a directory (a DRS mount, a GlusterFS mount, bindfs or a
//! local directory), with fio's bandwidth and IOPS logs read back as a timeline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::timeline::{Sample, Workload};

/// The job files: `bench/fio/` of the source tree, or `DRS_FIO_JOBS_DIR`.
pub fn jobs_dir() -> PathBuf {
    std::env::var_os("DRS_FIO_JOBS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fio"))
}

pub fn job_file(w: Workload) -> PathBuf {
    jobs_dir().join(format!("{}.fio", w.name()))
}

/// True when fio can be run.
pub fn available() -> bool {
    crate::report::runs("fio")
}

/// What a job file needs from the environment.
#[derive(Debug, Clone)]
pub struct Job {
    pub workload: Workload,
    /// Where the jobs' files go.
    pub dir: PathBuf,
    /// Bytes of each job's file.
    pub size: u64,
    pub jobs: usize,
    pub seconds: f64,
}

impl Job {
    fn command(&self) -> Command {
        let mut c = Command::new("fio");
        c.arg(job_file(self.workload))
            .env("DRS_FIO_DIR", &self.dir)
            .env("DRS_FIO_SIZE", self.size.to_string())
            .env("DRS_FIO_SECONDS", format!("{}", self.seconds.ceil() as u64))
            .env("DRS_FIO_JOBS", self.jobs.to_string())
            .stdin(Stdio::null());
        c
    }

    /// Lays the jobs' files out (writes them whole), untimed.
    pub fn layout(&self) -> anyhow::Result<()> {
        let out = self
            .command()
            .arg("--create_only=1")
            .output()
            .context("run fio")?;
        if !out.status.success() {
            bail!(
                "fio --create_only on {} failed: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts the timed run, logging bandwidth and IOPS averaged over `interval`.
    pub fn start(&self, logs: &Path, interval: Duration) -> anyhow::Result<Running> {
        std::fs::create_dir_all(logs)?;
        let prefix = logs.join("fio");
        let json = logs.join("fio.json");
        let stderr = std::fs::File::create(logs.join("fio.stderr"))?;
        let child = self
            .command()
            .arg(format!("--write_bw_log={}", prefix.display()))
            .arg(format!("--write_iops_log={}", prefix.display()))
            .arg(format!("--log_avg_msec={}", interval.as_millis()))
            .arg("--output-format=json")
            .arg(format!("--output={}", json.display()))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("start fio")?;
        Ok(Running {
            child,
            logs: logs.to_path_buf(),
            started: Instant::now(),
            interval,
        })
    }
}

/// A timed fio run in progress.
pub struct Running {
    child: Child,
    logs: PathBuf,
    pub started: Instant,
    interval: Duration,
}

/// What a finished run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Running {
    /// Waits for fio (at most `limit`, then kills it) and reads its logs.
    pub fn finish(mut self, limit: Duration) -> anyhow::Result<Outcome> {
        let until = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break Some(st);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut bw = Vec::new();
        let mut iops = Vec::new();
        for e in std::fs::read_dir(&self.logs)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("fio_bw.") {
                bw.push(std::fs::read_to_string(e.path())?);
            } else if name.starts_with("fio_iops.") {
                iops.push(std::fs::read_to_string(e.path())?);
            }
        }
        let samples = samples(&bw, &iops, self.interval);
        let json = std::fs::read_to_string(self.logs.join("fio.json")).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.logs.join("fio.stderr")).unwrap_or_default();
        let (mut errors, mut first_error) = json_errors(&json);
        if first_error.is_none() {
            first_error = stderr
                .lines()
                .find(|l| l.contains("error"))
                .map(|l| l.trim().to_string());
        }
        match status {
            None => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("fio still running after {limit:?}"));
            }
            Some(st) if !st.success() => {
                errors = errors.max(1);
                first_error.get_or_insert_with(|| format!("fio exited with {st}"));
            }
            Some(_) => {}
        }
        Ok(Outcome {
            samples,
            errors,
            first_error,
        })
    }
}

/// The lines of one fio log: (milliseconds from the job's start, value).
pub fn parse_log(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            let t = f.next()?.parse().ok()?;
            let v = f.next()?.parse().ok()?;
            Some((t, v))
        })
        .collect()
}

/// Sums the jobs' logs (every job, both directions) into samples `interval` long:
/// bandwidth logs are KiB/s, IOPS logs operations per second, each an average over
/// the interval ending at its time.
pub fn samples(bw: &[String], iops: &[String], interval: Duration) -> Vec<Sample> {
    let ms = interval.as_millis().max(1) as u64;
    let dt = ms as f64 / 1000.0;
    let mut buckets: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
    let bucket = |t: u64| (t + ms / 2) / ms;
    for log in bw {
        for (t, v) in parse_log(log) {
            buckets.entry(bucket(t)).or_default().0 += v as f64 * 1024.0 * dt;
        }
    }
    for log in iops {
        for (t, v) in parse_log(log) {
            buckets.entry(bucket(t)).or_default().1 += v as f64 * dt;
        }
    }
    buckets
        .into_iter()
        .filter(|(b, _)| *b > 0)
        .map(|(b, (bytes, ops))| Sample {
            t: b as f64 * dt,
            dt,
            bytes: bytes.round() as u64,
            ops: ops.round() as u64,
            errors: 0,
        })
        .collect()
}

/// Errors fio counted (`total_err` and `error` of each job), and the first job error.
pub fn json_errors(json: &str) -> (u64, Option<String>) {
    // fio may print warnings before the JSON document.
    let Some(start) = json.find('{') else {
        return (0, None);
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&json[start..]) else {
        return (0, None);
    };
    let mut errors = 0;
    let mut first = None;
    for job in v["jobs"].as_array().into_iter().flatten() {
        let total = job["total_err"].as_u64().unwrap_or(0);
        let code = job["error"].as_u64().unwrap_or(0);
        errors += total.max(u64::from(code != 0));
        if code != 0 && first.is_none() {
            first = Some(format!(
                "fio job {}: error {code} ({})",
                job["jobname"].as_str().unwrap_or("?"),
                std::io::Error::from_raw_os_error(code as i32)
            ));
        }
    }
    (errors, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_summed_over_jobs_and_directions() {
        // Two jobs, 250 ms averages; job 1 logs reads and writes.
        let job1 = "250, 1000, 0, 0, 0\n250, 500, 1, 0, 0\n500, 2000, 0, 0, 0\n";
        let job2 = "251, 100, 0, 0, 0\n499, 100, 0, 0, 0\nnot a line\n";
        let iops = "250, 40, 0, 0, 0\n500, 80, 0, 0, 0\n";
        let s = samples(
            &[job1.into(), job2.into()],
            &[iops.into()],
            Duration::from_millis(250),
        );
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].t, s[0].dt), (0.25, 0.25));
        // (1000 + 500 + 100) KiB/s over 0.25 s.
        assert_eq!(s[0].bytes, 1600 * 1024 / 4);
        assert_eq!(s[0].ops, 10);
        assert_eq!(s[1].t, 0.5);
        assert_eq!(s[1].bytes, 2100 * 1024 / 4);
        assert_eq!(s[1].ops, 20);
        // KiB/s back out of a sample.
        assert_eq!(s[0].value(crate::timeline::Unit::MiBs), 1600.0 / 1024.0);
    }

    #[test]
    fn errors_come_from_the_json_report() {
        let json = r#"fio: some warning
{"fio version": "fio-3.33", "jobs": [
  {"jobname": "seq-read-1m", "error": 5, "total_err": 0},
  {"jobname": "seq-read-1m", "error": 0, "total_err": 3}
]}"#;
        let (n, first) = json_errors(json);
        assert_eq!(n, 4);
        let first = first.unwrap();
        assert!(
            first.contains("error 5") && first.contains("Input/output error"),
            "{first}"
        );
        assert_eq!(json_errors(""), (0, None));
        assert_eq!(
            json_errors(r#"{"jobs": [{"jobname": "x", "error": 0, "total_err": 0}]}"#),
            (0, None)
        );
    }

    #[test]
    fn every_workload_has_a_job_file() {
        for w in Workload::ALL {
            let text = std::fs::read_to_string(job_file(w)).unwrap();
            assert!(text.contains("${DRS_FIO_DIR}") && text.contains("time_based=1"));
            assert!(text.contains(&format!("[{}]", w.name())));
        }
    }
}
