//! Helpers: run `drs-cli` with a deadline, local clusters torn down by a guard, a model
//! of the volume's bytes, and process checks through `/proc`.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const CLI: &str = env!("CARGO_BIN_EXE_drs-cli");

/// Deadline of a command unless a test sets another: generous, since tests run in
/// parallel on small machines; a command that takes longer fails the test.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// `drs-server` next to `drs-cli`, if it was built.
pub fn server_bin() -> Option<PathBuf> {
    let p = Path::new(CLI).with_file_name("drs-server");
    p.is_file().then_some(p)
}

/// A path as a command-line argument (temporary directories are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// What a finished command did.
pub struct Out {
    pub what: String,
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stdout = String::from_utf8_lossy(&self.stdout);
        let stdout: String = stdout.chars().take(4000).collect();
        write!(
            f,
            "`{}` exited with {:?} after {:.2?}\n--- stdout\n{}\n--- stderr\n{}",
            self.what, self.code, self.elapsed, stdout, self.stderr
        )
    }
}

impl Out {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts exit 0 and returns self.
    #[track_caller]
    pub fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "expected success: {self}");
        assert_no_panic(&self);
        self
    }

    /// Asserts exit code `code` and returns self.
    #[track_caller]
    pub fn code(self, code: i32) -> Out {
        assert_eq!(self.code, Some(code), "expected exit code {code}: {self}");
        assert_no_panic(&self);
        self
    }

    /// Parses stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }
}

#[track_caller]
pub fn assert_no_panic(out: &Out) {
    let all = format!("{}{}", out.text(), out.stderr);
    assert!(
        !all.contains("panicked") && !all.contains("RUST_BACKTRACE"),
        "panic output: {out}"
    );
}

/// Asserts the failure contract of `drs-cli`: a non-zero exit (not a signal), exactly
/// one line on stderr starting with `drs-cli: error: `, no panic text, and every one
/// of `needles` in the message. Returns the message.
#[track_caller]
pub fn assert_clean_error(out: &Out, needles: &[&str]) -> String {
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "expected a non-zero exit: {out}"
    );
    assert_no_panic(out);
    let msg = out.stderr.trim_end();
    assert_eq!(msg.lines().count(), 1, "expected one line on stderr: {out}");
    assert!(
        msg.starts_with("drs-cli: error: "),
        "expected `drs-cli: error: ...`: {out}"
    );
    for n in needles {
        assert!(msg.contains(n), "error message lacks {n:?}: {out}");
    }
    msg.to_string()
}

/// A `drs-cli` invocation.
pub struct Drs {
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    stdout: Option<Stdio>,
    envs: Vec<(String, String)>,
    deadline: Duration,
}

pub fn drs(args: &[&str]) -> Drs {
    Drs {
        args: args.iter().map(|a| a.to_string()).collect(),
        stdin: None,
        stdout: None,
        envs: Vec::new(),
        deadline: DEADLINE,
    }
}

impl Drs {
    pub fn stdin(mut self, data: &[u8]) -> Drs {
        self.stdin = Some(data.to_vec());
        self
    }

    /// Where stdout goes instead of a pipe this harness reads.
    pub fn stdout(mut self, to: Stdio) -> Drs {
        self.stdout = Some(to);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Drs {
        self.envs.push((k.into(), v.into()));
        self
    }

    pub fn deadline(mut self, d: Duration) -> Drs {
        self.deadline = d;
        self
    }

    /// Runs the command to completion; panics (after killing it) if it outlives its
    /// deadline.
    pub fn run(self) -> Out {
        self.spawn().wait().out
    }
}

/// A temporary directory for a local cluster; whatever a test does, dropping it runs
/// `cluster down` and SIGKILLs any process still mentioning the directory.
pub struct Cluster {
    /// Canonical path of the cluster directory.
    pub dir: PathBuf,
    /// `dir/cluster.toml`.
    pub file: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    pub fn new() -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix("drs-cli-test-")
            .tempdir()
            .expect("create a temporary directory");
        let dir = tmp.path().canonicalize().expect("canonical temp dir");
        Cluster {
            file: dir.join("cluster.toml"),
            dir,
            _tmp: tmp,
        }
    }

    /// `cluster up --dir DIR` with `args`.
    pub fn up_with(&self, args: &[&str]) -> Out {
        let mut all = vec!["cluster", "up", "--dir", s(&self.dir)];
        all.extend_from_slice(args);
        drs(&all).run()
    }

    /// A started 6-node 4+2 cluster of `blocks` blocks of 4 KiB.
    pub fn up(blocks: u64) -> Cluster {
        Cluster::up_sized(blocks, "4KiB", &[])
    }

    /// A started 6-node 4+2 cluster of `blocks` blocks of `block_size`, with `extra`
    /// options of `cluster up`.
    pub fn up_sized(blocks: u64, block_size: &str, extra: &[&str]) -> Cluster {
        Cluster::start_sized(blocks, block_size, extra).0
    }

    /// [`Cluster::up_sized`], with the output of `cluster up`.
    pub fn start_sized(blocks: u64, block_size: &str, extra: &[&str]) -> (Cluster, Out) {
        let blocks = blocks.to_string();
        let mut args = vec![
            "--nodes",
            "6",
            "-k",
            "4",
            "-m",
            "2",
            "--block-size",
            block_size,
            "--blocks",
            &blocks,
        ];
        args.extend_from_slice(extra);
        Cluster::start(&args)
    }

    /// `cluster up` with `args`, which must succeed. One that fails because a node's
    /// port was taken between `cluster up` choosing it and the node binding it (ports
    /// are chosen below the ephemeral range and checked, but another process can
    /// still take one in between) is retried in a new directory, up to 3 times.
    pub fn start(args: &[&str]) -> (Cluster, Out) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let c = Cluster::new();
            let out = c.up_with(args);
            if out.code != Some(0) && attempt < 3 && c.port_taken() {
                eprintln!("retrying `cluster up` after a port race: {out}");
                continue;
            }
            let out = out.ok();
            return (c, out);
        }
    }

    /// True when a node log says its address was in use.
    fn port_taken(&self) -> bool {
        (0..16).any(|id| {
            std::fs::read_to_string(self.node_dir(id).join("log"))
                .is_ok_and(|l| l.contains("Address already in use"))
        })
    }

    pub fn f(&self) -> &str {
        s(&self.file)
    }

    /// Runs `drs-cli <pre..> --cluster FILE <post..>`.
    pub fn cmd(&self, pre: &[&str], post: &[&str]) -> Drs {
        let mut all: Vec<&str> = pre.to_vec();
        all.extend_from_slice(&["--cluster", self.f()]);
        all.extend_from_slice(post);
        drs(&all)
    }

    pub fn status(&self) -> Out {
        self.cmd(&["status"], &[]).run()
    }

    pub fn status_json(&self) -> (Option<i32>, Value) {
        let out = self.cmd(&["status"], &["--json"]).run();
        assert_no_panic(&out);
        (out.code, out.json())
    }

    pub fn node(&self, verb: &str, id: u32) -> Out {
        self.cmd(&["node", verb], &[&id.to_string()]).run()
    }

    pub fn write(&self, lba: u64, data: &[u8]) -> Out {
        self.cmd(&["block", "write"], &[&lba.to_string()])
            .stdin(data)
            .run()
    }

    pub fn read(&self, lba: u64, count: u64) -> Out {
        self.cmd(
            &["block", "read"],
            &[&lba.to_string(), "--count", &count.to_string()],
        )
        .run()
    }

    /// `read` with nodes down (the read hedges and decodes; it must not need retries).
    pub fn read_degraded(&self, lba: u64, count: u64) -> Out {
        self.read(lba, count)
    }

    pub fn scrub(&self, extra: &[&str]) -> Out {
        self.cmd(&["scrub"], extra).run()
    }

    pub fn node_dir(&self, id: u32) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Pids from the `node-*/pid` files, by node id.
    pub fn pids(&self) -> Vec<(u32, u32)> {
        (0..64)
            .filter_map(|id| {
                let t = std::fs::read_to_string(self.node_dir(id).join("pid")).ok()?;
                Some((id, t.trim().parse().ok()?))
            })
            .collect()
    }

    /// Polls `status --json` until every node is up, or panics after `max`.
    pub fn wait_all_up(&self, max: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (code, v) = self.status_json();
            let all_up = v["nodes"]
                .as_array()
                .is_some_and(|ns| ns.iter().all(|n| n["state"] == "up"));
            if all_up && code == Some(0) {
                return v;
            }
            assert!(
                start.elapsed() < max,
                "nodes not all up and healthy after {max:?}: exit {code:?}, {v:#}"
            );
            thread::sleep(Duration::from_millis(300));
        }
    }

    /// The volume's placement list (`nodes = [...]` of `[[volumes]]` in cluster.toml).
    pub fn placement(&self) -> Vec<u32> {
        let text = std::fs::read_to_string(&self.file).expect("read cluster.toml");
        let vol = &text[text.find("[[volumes]]").expect("a volume")..];
        let list = &vol[vol.find("\nnodes = [").expect("a placement list") + 10..];
        let list = &list[..list.find(']').expect("end of list")];
        list.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| t.parse().expect("node id"))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            dump_logs(&self.dir);
        }
        if self.file.exists() {
            let _ = drs(&["cluster", "down", "--dir", s(&self.dir)])
                .deadline(Duration::from_secs(30))
                .run();
        }
        kill_leftovers(&self.dir);
    }
}

/// Prints the end of every node log under `dir` (for a failed test's output).
pub fn dump_logs(dir: &Path) {
    for id in 0..16 {
        let Ok(log) = std::fs::read_to_string(dir.join(format!("node-{id}")).join("log")) else {
            continue;
        };
        let log = crate::ansi::strip_ansi(&log);
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- node {id} log (last lines)");
        for l in &lines[lines.len().saturating_sub(12)..] {
            eprintln!("{l}");
        }
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Live processes (not zombies, not this one) whose command line mentions `path`.
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// SIGKILLs, by pid, processes a test started that still mention its directory.
pub fn kill_leftovers(dir: &Path) {
    for pid in processes_mentioning(dir) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Polls `f` every 50 ms until it is true or `max` has passed; returns the last value.
/// A port of 127.0.0.1 free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn eventually(max: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() >= max {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic pseudo-random bytes (xorshift), different for every seed.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// What the volume should hold: written blocks, zero-padded; the rest zeros.
pub struct Model {
    bs: usize,
    blocks: HashMap<u64, Vec<u8>>,
}

impl Model {
    pub fn new(block_size: usize) -> Model {
        Model {
            bs: block_size,
            blocks: HashMap::new(),
        }
    }

    /// `block write` semantics: consecutive blocks, a short last block zero-padded.
    pub fn write(&mut self, lba: u64, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(self.bs).enumerate() {
            let mut b = vec![0u8; self.bs];
            b[..chunk.len()].copy_from_slice(chunk);
            self.blocks.insert(lba + i as u64, b);
        }
    }

    pub fn expect(&self, lba: u64, count: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(count as usize * self.bs);
        for b in lba..lba + count {
            match self.blocks.get(&b) {
                Some(v) => out.extend_from_slice(v),
                None => out.resize(out.len() + self.bs, 0),
            }
        }
        out
    }
}

/// Asserts two byte strings are equal, naming the first differing block.
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], block_size: usize, first_lba: u64) {
    assert_eq!(got.len(), want.len(), "length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "bytes differ at offset {i} (block {}, byte {} of it): got {:#04x}, want {:#04x}",
            first_lba + (i / block_size) as u64,
            i % block_size,
            got[i],
            want[i]
        );
    }
}

/// A `drs-cli` process running in the background (see [`Drs::spawn`]): its pid, a way
/// to SIGKILL it, and how it ended (exit code or signal). Dropping one that is still
/// running SIGKILLs and reaps it.
pub struct Running {
    pub what: String,
    child: std::process::Child,
    start: Instant,
    deadline: Duration,
    out_reader: Option<thread::JoinHandle<Vec<u8>>>,
    err_reader: Option<thread::JoinHandle<Vec<u8>>>,
    status: Option<(std::process::ExitStatus, Duration)>,
}

/// How a background `drs-cli` process ended.
pub struct Ended {
    pub out: Out,
    /// The signal that ended it (9 for SIGKILL), if one did.
    pub signal: Option<i32>,
}

impl Drs {
    /// Starts the command in the background, with stdout and stderr collected; its
    /// deadline counts from now (see [`Running::wait`]).
    pub fn spawn(mut self) -> Running {
        let what = format!("drs-cli {}", self.args.join(" "));
        let mut cmd = Command::new(CLI);
        cmd.args(&self.args)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        if let Some(server) = server_bin() {
            cmd.env("DRS_SERVER_BIN", server);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(self.stdout.take().unwrap_or_else(Stdio::piped))
        .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        if let Some(mut w) = child.stdin.take() {
            let data = self.stdin.take().unwrap_or_default();
            thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        let out_reader = child.stdout.take().map(|mut r| {
            thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        });
        let err_reader = child.stderr.take().map(|mut r| {
            thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        });
        Running {
            what,
            child,
            start,
            deadline: self.deadline,
            out_reader,
            err_reader,
            status: None,
        }
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True once the process has ended (reaped; the end time is recorded).
    pub fn finished(&mut self) -> bool {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some((st, self.start.elapsed()));
            }
        }
        self.status.is_some()
    }

    /// SIGKILLs the process (from outside, by pid) if it is still running.
    pub fn kill(&mut self) {
        if !self.finished() {
            let _ = self.child.kill();
        }
    }

    /// Waits for the end (SIGKILLing it and panicking if it outlives its deadline).
    pub fn wait(mut self) -> Ended {
        use std::os::unix::process::ExitStatusExt;
        let mut timed_out = false;
        while !self.finished() {
            if self.start.elapsed() > self.deadline {
                timed_out = true;
                let _ = self.child.kill();
                let st = self.child.wait().expect("wait for drs-cli");
                self.status = Some((st, self.start.elapsed()));
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let (status, elapsed) = self.status.expect("ended");
        let stdout = self
            .out_reader
            .take()
            .map(|r| r.join().unwrap_or_default())
            .unwrap_or_default();
        let stderr = self
            .err_reader
            .take()
            .map(|r| r.join().unwrap_or_default())
            .unwrap_or_default();
        let out = Out {
            what: self.what.clone(),
            code: status.code(),
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            elapsed,
        };
        assert!(
            !timed_out,
            "did not finish within {:?}, killed: {out}",
            self.deadline
        );
        Ended {
            out,
            signal: status.signal(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// True while `pid` is stopped (SIGSTOP: state `T` in `/proc/PID/stat`).
pub fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    })
}

/// Sends `signal` (a `kill` name such as `CONT`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{signal} {pid} failed");
}
