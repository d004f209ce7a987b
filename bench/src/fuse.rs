//! Rows 12 and 13: 1 MiB sequential writes and reads through the FUSE mount, beside
//! the same through the client library, a local directory and (if installed) a
//! passthrough FUSE mount of that directory (bindfs), all in the same run. Row 14:
//! 4 KiB writes through the mount, with its write-back cache and without. Row 15:
//! small files created and read back, on the mount and in the local directory.
//! Row 16: a byte-range lock and its unlock, beside a chmod.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Bytes per read(2) / write(2).
pub const IO: usize = 1 << 20;

pub fn mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
        })
        .unwrap_or(false)
}

fn wait_mounted(path: &Path, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while !mounted(path) {
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited with {st} before mounting {}", path.display());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{what}: {} not mounted after 60 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// True when bindfs can be run.
pub fn bindfs_installed() -> bool {
    crate::report::runs("bindfs")
}

/// A mount served by a child process; dropping it unmounts it and waits for the
/// process.
pub struct Mount {
    pub path: PathBuf,
    child: Child,
}

impl Mount {
    /// DRS's file system: this binary's `fuse-mount` (the same code as `drs-fuse`);
    /// with `write_through`, as `-o write_through` (no write-back cache).
    pub fn drs(
        cluster: &Path,
        path: &Path,
        log: &Path,
        write_through: bool,
    ) -> anyhow::Result<Mount> {
        fs::create_dir_all(path)?;
        let exe = std::env::current_exe().context("find the bench executable")?;
        let mut child = Command::new(exe)
            .arg("fuse-mount")
            .arg(cluster)
            .arg(path)
            .args(write_through.then_some("write_through"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()
            .context("start the FUSE mount")?;
        wait_mounted(path, &mut child, "the DRS mount")?;
        Ok(Mount {
            path: path.to_path_buf(),
            child,
        })
    }

    /// A passthrough FUSE mount of `source` (bindfs), if bindfs is installed.
    pub fn bindfs(source: &Path, path: &Path) -> anyhow::Result<Option<Mount>> {
        if !bindfs_installed() {
            return Ok(None);
        }
        fs::create_dir_all(path)?;
        // -f: stay in the foreground, so this process owns it.
        let mut child = Command::new("bindfs")
            .arg("-f")
            .arg(source)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start bindfs")?;
        wait_mounted(path, &mut child, "bindfs")?;
        Ok(Some(Mount {
            path: path.to_path_buf(),
            child,
        }))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.path)
            .stderr(Stdio::null())
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.path)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `data` to a new file at `path`, [`IO`] bytes per write(2), then fsync;
/// the time, the fsync included.
pub fn sequential_write(path: &Path, data: &[u8]) -> anyhow::Result<Duration> {
    sequential_write_in(path, data, IO)
}

/// [`sequential_write`], `io` bytes per write(2).
pub fn sequential_write_in(path: &Path, data: &[u8], io: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    for c in data.chunks(io.max(1)) {
        f.write_all(c)
            .with_context(|| format!("write {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    drop(f);
    Ok(t.elapsed())
}

/// Reads the file at `path`, [`IO`] bytes per read(2), and checks it equals `want`;
/// only the reads are timed.
pub fn sequential_read(path: &Path, want: &[u8]) -> anyhow::Result<Duration> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; IO];
    let mut took = Duration::ZERO;
    let mut at = 0;
    loop {
        let t = Instant::now();
        let n = f
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        took += t.elapsed();
        if n == 0 {
            break;
        }
        if at + n > want.len() || buf[..n] != want[at..at + n] {
            bail!(
                "{} differs from what was written at byte {at}",
                path.display()
            );
        }
        at += n;
    }
    if at != want.len() {
        bail!(
            "{} is {at} bytes, {} were written",
            path.display(),
            want.len()
        );
    }
    Ok(took)
}

/// Drops the page cache of a file (written and synced), so the next read goes to the
/// file system below.
pub fn drop_cache(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path)?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )?;
    Ok(())
}

/// Creates `n` files of `content` in directory `dir` (create, write, close each; no
/// fsync), then opens, reads, checks and closes each; the time of each phase.
pub fn small_files(dir: &Path, n: usize, content: &[u8]) -> anyhow::Result<(Duration, Duration)> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let t = Instant::now();
    for i in 0..n {
        let p = dir.join(format!("f{i}"));
        fs::write(&p, content).with_context(|| format!("write {}", p.display()))?;
    }
    let created = t.elapsed();
    let t = Instant::now();
    for i in 0..n {
        let p = dir.join(format!("f{i}"));
        let back = fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        if back != content {
            bail!("{} differs from what was written", p.display());
        }
    }
    Ok((created, t.elapsed()))
}

/// `n` rounds of a write lock of the whole of file `path` and its unlock
/// (`fcntl` `F_SETLK`), and `n` `chmod`s of it; the time of each, sorted.
pub fn lock_rounds(path: &Path, n: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    use std::os::unix::fs::PermissionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let range = |typ: i32| libc::flock {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let (lock, unlock) = (range(libc::F_WRLCK), range(libc::F_UNLCK));
    let mut locks = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLK(&lock)).context("lock")?;
        nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLK(&unlock)).context("unlock")?;
        locks.push(t.elapsed());
    }
    let mut chmods = Vec::with_capacity(n);
    for i in 0..n {
        let mode = if i % 2 == 0 { 0o640 } else { 0o644 };
        let t = Instant::now();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).context("chmod")?;
        chmods.push(t.elapsed());
    }
    locks.sort();
    chmods.sort();
    Ok((locks, chmods))
}
