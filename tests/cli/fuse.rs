//! The file system on real FUSE mounts (`drs-cli mount`, the same code as `drs-fuse
//! mount`) over real node processes: POSIX behaviour, two mounts at once, a copy with
//! m nodes SIGKILLed during it, EIO within the bound with m + 1 down, and unmounting.
//!
//! Data is verified through a second mount where the kernel's page cache of the
//! writing mount could otherwise answer the read.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::harness::{s, Cluster, CLI};

/// A 6-node 4+2 cluster of `blocks` blocks of 64 KiB, with its metadata service
/// (which holds the namespace) and a short failure-detection timeout.
fn cluster(blocks: u64) -> Cluster {
    Cluster::up_sized(blocks, "64KiB", &["--down-after-ms", "1000"])
}

/// A mount served by a `drs-cli mount` process; dropping it unmounts and stops it.
struct Mount {
    path: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// The device number (`MAJOR:MINOR`) of the mount on top at `path`, from
/// `/proc/self/mountinfo`.
fn mount_dev(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want.as_ref())).then(|| f.get(2).map(|d| d.to_string()))?
    })
}

fn mounted(path: &Path) -> bool {
    mount_dev(path).is_some()
}

impl Mount {
    fn new(c: &Cluster, name: &str, extra: &[&str]) -> Mount {
        Mount::with(Path::new(CLI), c, name, extra)
    }

    /// As [`Mount::new`], mounted by `bin`: `drs-cli` or `drs-fuse`, which both
    /// take `mount --cluster FILE DIR`.
    fn with(bin: &Path, c: &Cluster, name: &str, extra: &[&str]) -> Mount {
        let path = c.dir.join(name);
        fs::create_dir_all(&path).unwrap();
        let log = c.dir.join(format!("{name}.log"));
        let mut args = vec!["mount", "--cluster", s(&c.file), s(&path)];
        args.extend_from_slice(extra);
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(c.dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        let mut m = Mount {
            path,
            log,
            child: Some(child),
        };
        let started = Instant::now();
        while !mounted(&m.path) {
            if let Some(st) = m.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("{} mount exited with {st}: {}", bin.display(), m.stderr());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "not mounted after 60 s: {}",
                m.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Unmounts with `fusermount3 -u` and waits for the process to end; its status.
    fn unmount(&mut self) -> Option<std::process::ExitStatus> {
        let out = Command::new("fusermount3")
            .args(["-u", s(&self.path)])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("fusermount3 -u: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.wait(Duration::from_secs(20))
    }

    fn wait(&mut self, max: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if started.elapsed() > max {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- mount {} stderr (last lines)", self.path.display());
            let err = self.stderr();
            let lines: Vec<&str> = err.lines().collect();
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("{l}");
            }
        }
        if self.child.is_some() && self.unmount().is_none() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z", s(&self.path)])
                .status();
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // A mount whose process a test killed stays in the mount table, dead.
        if mounted(&self.path) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z", s(&self.path)])
                .status();
        }
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// Where `got` first differs from `want`, and whether the wrong bytes are zeros.
fn diff(got: &[u8], want: &[u8]) -> String {
    if got.len() != want.len() {
        return format!("{} bytes, want {}", got.len(), want.len());
    }
    let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) else {
        return "equal".into();
    };
    let bad = got[at..]
        .iter()
        .zip(&want[at..])
        .take_while(|(a, b)| a != b)
        .count();
    let zeros = got[at..at + bad].iter().all(|x| *x == 0);
    format!(
        "first difference at byte {at} (block {} of 64 KiB), {bad} bytes differ there, {}",
        at / 65536,
        if zeros { "all zeros" } else { "not zeros" }
    )
}

fn statvfs(p: &Path) -> nix::sys::statvfs::Statvfs {
    nix::sys::statvfs::statvfs(p).unwrap()
}

#[test]
fn files_directories_links_and_special_files() {
    let c = cluster(2048);
    let m = Mount::new(&c, "mnt", &[]);
    let other = Mount::new(&c, "mnt2", &[]);

    // Regular files, read back through the other mount.
    fs::write(m.p("a.txt"), b"hello, world\n").unwrap();
    assert_eq!(fs::read(other.p("a.txt")).unwrap(), b"hello, world\n");
    // Directories, nested; rmdir of a non-empty one fails.
    fs::create_dir_all(m.p("d1/d2/d3")).unwrap();
    fs::write(m.p("d1/d2/d3/f"), b"deep").unwrap();
    let e = fs::remove_dir(m.p("d1/d2")).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOTEMPTY);
    assert_eq!(fs::metadata(m.p("d1")).unwrap().nlink(), 3, "d1: . .. d2");
    // Hard links share the inode and count links.
    fs::hard_link(m.p("a.txt"), m.p("d1/link")).unwrap();
    let (a, l) = (
        fs::metadata(m.p("a.txt")).unwrap(),
        fs::metadata(m.p("d1/link")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (l.ino(), 2));
    // Symlinks.
    std::os::unix::fs::symlink("a.txt", m.p("sym")).unwrap();
    assert_eq!(fs::read_link(m.p("sym")).unwrap(), Path::new("a.txt"));
    assert_eq!(fs::read(m.p("sym")).unwrap(), b"hello, world\n");
    // Special files keep their type and device number.
    nix::unistd::mkfifo(
        &m.p("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &m.p("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let fifo = fs::symlink_metadata(other.p("fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));
    let dev = fs::symlink_metadata(other.p("null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &dev.file_type()
    ));
    assert_eq!(dev.rdev(), nix::sys::stat::makedev(1, 3));
    // A block device, and a socket a server listens on (the kernel keeps the
    // socket itself; the file names it).
    nix::sys::stat::mknod(
        &m.p("loop"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o660),
        nix::sys::stat::makedev(7, 42),
    )
    .unwrap();
    let blk = fs::symlink_metadata(other.p("loop")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(
        &blk.file_type()
    ));
    assert_eq!(blk.rdev(), nix::sys::stat::makedev(7, 42));
    let listener = std::os::unix::net::UnixListener::bind(m.p("sock")).unwrap();
    let sock = fs::symlink_metadata(other.p("sock")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&sock.file_type()));
    let mut client = std::os::unix::net::UnixStream::connect(m.p("sock")).unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    listener.accept().unwrap().0.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    drop((client, listener));
    // Rename: atomic replace, across directories, and a directory into itself.
    fs::write(m.p("new"), b"new content").unwrap();
    fs::write(m.p("d1/old"), b"old content").unwrap();
    fs::rename(m.p("new"), m.p("d1/old")).unwrap();
    assert_eq!(fs::read(other.p("d1/old")).unwrap(), b"new content");
    assert!(!m.p("new").exists());
    let e = fs::rename(m.p("d1"), m.p("d1/d2/inside")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EINVAL);
    fs::rename(m.p("d1/d2"), m.p("moved")).unwrap();
    assert_eq!(fs::read(other.p("moved/d3/f")).unwrap(), b"deep");
    // renameat2: RENAME_NOREPLACE refuses an existing target; RENAME_EXCHANGE
    // swaps two names at once.
    let renameat2 = |from: &str, to: &str, flags| {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &m.p(from),
            nix::fcntl::AT_FDCWD,
            &m.p(to),
            flags,
        )
    };
    fs::write(m.p("x1"), b"one").unwrap();
    fs::write(other.p("x2"), b"two").unwrap();
    assert_eq!(
        renameat2("x1", "x2", nix::fcntl::RenameFlags::RENAME_NOREPLACE),
        Err(nix::errno::Errno::EEXIST)
    );
    renameat2("x1", "x2", nix::fcntl::RenameFlags::RENAME_EXCHANGE).unwrap();
    // (Read where the exchange was made: the other mount's kernel may keep its
    // names of x1 and x2 for the entry timeout, a second.)
    assert_eq!(fs::read(m.p("x1")).unwrap(), b"two");
    assert_eq!(fs::read(m.p("x2")).unwrap(), b"one");
    fs::remove_file(m.p("x1")).unwrap();
    fs::remove_file(m.p("x2")).unwrap();
    assert_eq!(fs::metadata(m.p("d1")).unwrap().nlink(), 2);
    // Listing.
    let mut names: Vec<String> = fs::read_dir(other.p(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a.txt", "d1", "fifo", "loop", "moved", "null", "sock", "sym"]
    );
    // Extended attributes, seen through the other mount.
    let f = m.p("d1/old");
    xattr::set(&f, "user.colour", b"blue", 0).unwrap();
    xattr::set(&f, "user.empty", b"", 0).unwrap();
    // `trusted.` names (CAP_SYS_ADMIN's: the kernel checks), kept as well.
    if has_capability(21) {
        xattr::set(&f, "trusted.origin", b"cli", 0).unwrap();
        assert_eq!(
            xattr::get(&other.p("d1/old"), "trusted.origin").unwrap(),
            b"cli"
        );
        xattr::remove(&f, "trusted.origin").unwrap();
    }
    assert_eq!(
        xattr::get(&other.p("d1/old"), "user.colour").unwrap(),
        b"blue"
    );
    assert_eq!(xattr::get(&other.p("d1/old"), "user.empty").unwrap(), b"");
    assert_eq!(
        xattr::list(&other.p("d1/old")).unwrap(),
        b"user.colour\0user.empty\0"
    );
    assert_eq!(
        xattr::set(&f, "user.colour", b"red", libc::XATTR_CREATE).unwrap_err(),
        libc::EEXIST
    );
    assert_eq!(
        xattr::set(&f, "user.none", b"x", libc::XATTR_REPLACE).unwrap_err(),
        libc::ENODATA
    );
    assert_eq!(xattr::get(&f, "user.none").unwrap_err(), libc::ENODATA);
    // A malformed POSIX ACL is refused (by the kernel, or by the file system); the
    // ACLs themselves are `posix_acls_are_enforced_inherited_and_follow_the_mode`.
    assert!(xattr::set(&f, "system.posix_acl_access", b"x", 0).is_err());
    xattr::remove(&f, "user.empty").unwrap();
    assert_eq!(xattr::list(&f).unwrap(), b"user.colour\0");
    // Unlink.
    fs::remove_file(m.p("a.txt")).unwrap();
    assert_eq!(fs::metadata(m.p("d1/link")).unwrap().nlink(), 1);
    assert_eq!(
        errno_of(&fs::metadata(m.p("a.txt")).unwrap_err()),
        libc::ENOENT
    );
}

/// Extended attribute calls (getxattr(2) and friends, by rustix), errors as errno
/// values.
mod xattr {
    use rustix::fs::XattrFlags;
    use std::path::Path;

    fn flags(f: i32) -> XattrFlags {
        match f {
            libc::XATTR_CREATE => XattrFlags::CREATE,
            libc::XATTR_REPLACE => XattrFlags::REPLACE,
            _ => XattrFlags::empty(),
        }
    }

    pub fn set(p: &Path, name: &str, value: &[u8], f: i32) -> Result<(), i32> {
        rustix::fs::setxattr(p, name, value, flags(f)).map_err(|e| e.raw_os_error())
    }

    pub fn get(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; 65536];
        let n = rustix::fs::getxattr(p, name, &mut buf[..]).map_err(|e| e.raw_os_error())?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn list(p: &Path) -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; 65536];
        let n = rustix::fs::listxattr(p, &mut buf[..]).map_err(|e| e.raw_os_error())?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn remove(p: &Path, name: &str) -> Result<(), i32> {
        rustix::fs::removexattr(p, name).map_err(|e| e.raw_os_error())
    }
}

#[test]
fn truncate_sparse_append_and_unlinked_open_files() {
    let c = cluster(2048);
    let m = Mount::new(&c, "mnt", &[]);
    let other = Mount::new(&c, "mnt2", &[]);
    let bs = 64 * 1024u64;

    // Truncate down then up: the cut bytes come back as zeros.
    let data = random_bytes(1, 200_000);
    fs::write(m.p("t"), &data).unwrap();
    let f = OpenOptions::new().write(true).open(m.p("t")).unwrap();
    f.set_len(70_000).unwrap();
    f.set_len(150_000).unwrap();
    drop(f);
    let got = fs::read(other.p("t")).unwrap();
    assert_eq!(got.len(), 150_000);
    assert_eq!(&got[..70_000], &data[..70_000]);
    assert!(
        got[70_000..].iter().all(|b| *b == 0),
        "bytes past a truncation are zero"
    );

    // Sparse: a hole reads as zeros and holds no blocks.
    let mut f = File::create(m.p("sparse")).unwrap();
    f.seek(SeekFrom::Start(100 * bs + 17)).unwrap();
    f.write_all(b"tail").unwrap();
    drop(f);
    let md = fs::metadata(other.p("sparse")).unwrap();
    assert_eq!(md.len(), 100 * bs + 21);
    // The writer took blocks ahead; the kernel's release after the close gives them
    // back (it comes after close(2) has returned).
    let started = Instant::now();
    loop {
        let md = fs::metadata(other.p("sparse")).unwrap();
        if md.blocks() * 512 <= 2 * bs {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} blocks of 512 for a sparse file",
            md.blocks()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let mut hole = vec![1u8; 4096];
    File::open(other.p("sparse"))
        .unwrap()
        .read_exact_at(&mut hole, 50 * bs)
        .unwrap();
    assert!(hole.iter().all(|b| *b == 0));

    // O_APPEND appends.
    for line in ["one\n", "two\n", "three\n"] {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(m.p("log"))
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
    }
    assert_eq!(fs::read(other.p("log")).unwrap(), b"one\ntwo\nthree\n");

    // A removed file stays readable through an open descriptor; its blocks are freed
    // at the close.
    let before = statvfs(&m.path).blocks_free();
    let big = random_bytes(2, 4 << 20);
    fs::write(m.p("doomed"), &big).unwrap();
    let mut f = File::open(m.p("doomed")).unwrap();
    fs::remove_file(m.p("doomed")).unwrap();
    assert!(!other.p("doomed").exists());
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert!(back == big, "an unlinked open file reads its data");
    drop(f);
    let started = Instant::now();
    while statvfs(&m.path).blocks_free() < before {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "blocks of the closed unlinked file not freed: {} free, {before} before",
            statvfs(&m.path).blocks_free()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// fallocate(2): mode 0 takes blocks and grows the size, `KEEP_SIZE` takes blocks
/// past the end and leaves the size, `PUNCH_HOLE` frees the whole blocks of a range
/// and zeroes the rest of it, `ZERO_RANGE` zeroes a range and leaves it allocated;
/// more than the volume holds is ENOSPC and changes nothing. Contents are read back
/// through a second mount.
#[test]
fn fallocate_reserves_punches_and_zeroes() {
    use nix::errno::Errno;
    use nix::fcntl::{fallocate, FallocateFlags as F};
    let c = cluster(2048);
    let m = Mount::new(&c, "mnt", &[]);
    let other = Mount::new(&c, "mnt2", &[]);
    let bs = 64 * 1024u64;
    let free = |p: &Path| {
        let st = statvfs(p);
        st.blocks_free() * st.fragment_size()
    };
    let used = |p: &Path| fs::metadata(p).unwrap().blocks() * 512;

    // Mode 0: 11 blocks taken, the size grown, zeros to read. (Block counts are
    // read through the writing mount: the other one caches attributes for a second.)
    let free0 = free(&m.path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("pre"))
        .unwrap();
    let size = 10 * bs + 100;
    fallocate(&f, F::empty(), 0, size as i64).unwrap();
    assert_eq!(fs::metadata(other.p("pre")).unwrap().len(), size);
    assert_eq!(used(&m.p("pre")), 11 * bs);
    assert_eq!(free0 - free(&m.path), 11 * bs, "the blocks are taken");
    let got = fs::read(other.p("pre")).unwrap();
    assert!(got.len() as u64 == size && got.iter().all(|b| *b == 0));

    // KEEP_SIZE: 4 blocks past the end, the size stays; they stay after the close.
    fallocate(
        &f,
        F::FALLOC_FL_KEEP_SIZE,
        (20 * bs) as i64,
        (4 * bs) as i64,
    )
    .unwrap();
    assert_eq!(fs::metadata(other.p("pre")).unwrap().len(), size);
    assert_eq!(used(&m.p("pre")), 15 * bs);

    // A punched hole: the whole blocks in it are freed, the ends of it zeroed.
    let data = random_bytes(7, size as usize);
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    let (at, len) = (bs + 100, 3 * bs);
    fallocate(
        &f,
        F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
        at as i64,
        len as i64,
    )
    .unwrap();
    let mut want = data.clone();
    want[at as usize..(at + len) as usize].fill(0);
    assert_eq!(used(&m.p("pre")), 13 * bs, "blocks 2 and 3 are holes");
    let got = fs::read(other.p("pre")).unwrap();
    assert!(got == want, "after the punch: {}", diff(&got, &want));

    // ZERO_RANGE across two whole blocks and parts of two more: zeros, still
    // allocated.
    let (at, len) = (6 * bs - 10, 2 * bs + 20);
    fallocate(&f, F::FALLOC_FL_ZERO_RANGE, at as i64, len as i64).unwrap();
    want[at as usize..(at + len) as usize].fill(0);
    assert_eq!(used(&m.p("pre")), 13 * bs);
    let got = fs::read(other.p("pre")).unwrap();
    assert!(got == want, "after the zeroing: {}", diff(&got, &want));
    // ZERO_RANGE past the end grows the file.
    fallocate(&f, F::FALLOC_FL_ZERO_RANGE, size as i64, 100).unwrap();
    want.extend_from_slice(&[0u8; 100]);
    let got = fs::read(other.p("pre")).unwrap();
    assert!(
        got == want,
        "after zeroing past the end: {}",
        diff(&got, &want)
    );

    // More than the volume holds: ENOSPC, nothing taken.
    let before = free(&m.path);
    assert_eq!(
        fallocate(&f, F::empty(), 0, (8192 * bs) as i64),
        Err(Errno::ENOSPC)
    );
    assert_eq!(free(&m.path), before);
    // Modes it does not do are EOPNOTSUPP (the kernel's own answer for some).
    assert_eq!(
        fallocate(&f, F::FALLOC_FL_COLLAPSE_RANGE, 0, bs as i64),
        Err(Errno::EOPNOTSUPP)
    );
    drop(f);
    // Past the attribute cache's second, the other mount sees the same.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(used(&other.p("pre")), 13 * bs, "kept after the last close");
    let got = fs::read(other.p("pre")).unwrap();
    assert!(got == want, "after the close: {}", diff(&got, &want));
}

/// `copy_file_range` (what `cp` and Rust's `io::copy` use between files) copies inside
/// the mount: to an unaligned offset, across blocks, into the middle of a file, and
/// 0 bytes at the source's end; the bytes verify through another mount. The mount
/// answers it itself (the kernel would otherwise copy through read and write, and
/// fuser log the request as not implemented).
#[test]
fn copy_file_range_copies_inside_the_mount() {
    // Between two files, `io::copy` is `copy_file_range` (from the files' offsets).
    fn copy(mut from: &File, from_at: u64, mut to: &File, to_at: u64, len: u64) -> u64 {
        from.seek(SeekFrom::Start(from_at)).unwrap();
        to.seek(SeekFrom::Start(to_at)).unwrap();
        std::io::copy(&mut from.take(len), &mut to).unwrap()
    }
    let c = cluster(2048);
    let metrics = format!("127.0.0.1:{}", crate::harness::free_port());
    let m = Mount::new(&c, "mnt", &["--metrics", &metrics]);
    let other = Mount::new(&c, "mnt2", &[]);
    let src_bytes = random_bytes(31, 9 << 20 | 1000);
    fs::write(m.p("src"), &src_bytes).unwrap();
    let old = random_bytes(32, 1 << 20);
    fs::write(m.p("dst"), &old).unwrap();

    let src = File::open(m.p("src")).unwrap();
    let dst = OpenOptions::new().write(true).open(m.p("dst")).unwrap();
    // All of it, at an offset that is not a block's, in more than one request.
    assert_eq!(
        copy(&src, 0, &dst, 100, src_bytes.len() as u64),
        src_bytes.len() as u64
    );
    let mut want = old[..100].to_vec();
    want.extend_from_slice(&src_bytes);
    // A range from the middle into the middle.
    assert_eq!(copy(&src, 5000, &dst, 2_000_000, 70_000), 70_000);
    want[2_000_000..2_070_000].copy_from_slice(&src_bytes[5000..75_000]);
    // Past the source's end: nothing.
    assert_eq!(copy(&src, src_bytes.len() as u64 + 10, &dst, 0, 4096), 0);
    drop((src, dst));

    let got = fs::read(m.p("dst")).unwrap();
    assert!(
        got == want,
        "through the copying mount: {}",
        diff(&got, &want)
    );
    let got = fs::read(other.p("dst")).unwrap();
    assert!(got == want, "through another mount: {}", diff(&got, &want));
    let body = crate::metrics::scrape(&metrics).1;
    let served = crate::metrics::sample(&body, "drs_fs_op_seconds_count{op=\"copy_file_range\"}");
    // 9 MiB + 1000 bytes take three requests of at most 4 MiB; the range one more.
    assert!(
        served.is_some_and(|n| n >= 4.0),
        "the mount did not answer copy_file_range itself ({served:?}): {}",
        m.stderr()
    );
}

/// `lseek` with `SEEK_DATA` and `SEEK_HOLE` (what `cp` and `tar` use to keep a sparse
/// file sparse) follows the file's blocks: written blocks are data, blocks never
/// written or punched are holes, the end of the file is a hole, and past the last
/// data is ENXIO; the same through another mount. (Without it the kernel calls the
/// whole file data.)
#[test]
fn seek_data_and_hole_follow_the_blocks() {
    use nix::errno::Errno;
    use nix::fcntl::{fallocate, FallocateFlags as F};
    use nix::unistd::{lseek, Whence};
    let c = cluster(2048);
    let m = Mount::new(&c, "mnt", &[]);
    let other = Mount::new(&c, "mnt2", &[]);
    let bs = 64 * 1024i64;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.p("sparse"))
        .unwrap();
    // Block 0 and part of block 3 written; blocks 1, 2, 4 and 5 holes.
    f.write_all_at(&random_bytes(41, bs as usize), 0).unwrap();
    f.write_all_at(&random_bytes(42, 100), 3 * bs as u64 + 10)
        .unwrap();
    f.set_len(6 * bs as u64).unwrap();
    let check = |f: &File, at: i64, want: &[(Whence, Result<i64, Errno>)], what: &str| {
        for (whence, expected) in want {
            assert_eq!(
                lseek(f, at, *whence),
                *expected,
                "{what}: {whence:?} from {at}"
            );
        }
    };
    let layout = |f: &File, what: &str| {
        check(
            f,
            0,
            &[(Whence::SeekData, Ok(0)), (Whence::SeekHole, Ok(bs))],
            what,
        );
        check(f, 10, &[(Whence::SeekData, Ok(10))], what);
        check(
            f,
            bs,
            &[(Whence::SeekData, Ok(3 * bs)), (Whence::SeekHole, Ok(bs))],
            what,
        );
        check(f, bs + 5, &[(Whence::SeekData, Ok(3 * bs))], what);
        check(f, 3 * bs + 7, &[(Whence::SeekHole, Ok(4 * bs))], what);
        check(
            f,
            4 * bs,
            &[
                (Whence::SeekData, Err(Errno::ENXIO)),
                (Whence::SeekHole, Ok(4 * bs)),
            ],
            what,
        );
        check(
            f,
            6 * bs,
            &[
                (Whence::SeekData, Err(Errno::ENXIO)),
                (Whence::SeekHole, Err(Errno::ENXIO)),
            ],
            what,
        );
    };
    layout(&f, "the writing mount");
    f.sync_all().unwrap();
    layout(&File::open(other.p("sparse")).unwrap(), "another mount");

    // A punched block is a hole.
    fallocate(&f, F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE, 0, bs).unwrap();
    check(
        &f,
        0,
        &[(Whence::SeekData, Ok(3 * bs)), (Whence::SeekHole, Ok(0))],
        "after the punch",
    );

    // An ioctl (lsattr's FS_IOC_GETFLAGS) is refused as on a file system without
    // file flags (the mount answers ENOTTY, which kernels pass on as such or as
    // EOPNOTSUPP), and the mount logs nothing as not implemented.
    if let Ok(out) = Command::new("lsattr").arg(m.p("sparse")).output() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && (err.contains("not supported") || err.contains("Inappropriate ioctl")),
            "lsattr: {err}"
        );
    }
    assert!(!m.stderr().contains("Not Implemented"), "{}", m.stderr());

    // On a writeback_cache mount the kernel may hold pages the mount has not seen:
    // the whole file is data there.
    let wb = Mount::new(&c, "wb", &["-o", "writeback_cache"]);
    let g = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(wb.p("sparse-wb"))
        .unwrap();
    g.write_all_at(b"data", 0).unwrap();
    g.set_len(4 * bs as u64).unwrap();
    check(
        &g,
        0,
        &[(Whence::SeekData, Ok(0)), (Whence::SeekHole, Ok(4 * bs))],
        "a writeback_cache mount",
    );
}

/// A tool `tests/posix/install.sh` installs under the target directory, if there.
fn installed_tool(name: &str) -> Option<PathBuf> {
    let target = Path::new(CLI).parent()?.parent()?;
    let bin = target.join(name).join("bin").join(name);
    bin.is_file().then_some(bin)
}

/// The pjdfstest binary `tests/posix/install.sh` puts under the target directory.
fn pjdfstest() -> Option<PathBuf> {
    installed_tool("pjdfstest")
}

/// fsx (the File System eXerciser: crates.io `fsx`, the Rust rewrite of the fsx of
/// Apple, FreeBSD and xfstests) on a real mount. It applies a seeded random sequence
/// of pread / pwrite, mmap reads and writes with msync, truncates up and down,
/// posix_fallocate, hole punches, copy_file_range, sendfile, fadvise, fsync and
/// close-and-reopen to one file of up to 2 MiB, and checks every byte it reads (and
/// the size) against its own model of the file. Blocks of 4 KiB, so most writes
/// cover parts of blocks (the mount's write-back cache) and many cross stripes.
///
/// Two runs: one on a plain mount during which two nodes (m) are SIGKILLed and,
/// later, restarted (they rebuild under the load); one on a `writeback_cache` mount.
/// Any error of a call or any wrong byte fails the run; its operation log is printed.
///
/// Needs fsx (`bash tests/posix/install.sh`; `.ci/run` does it). It is skipped
/// without it, unless `DRS_POSIX_SUITE=1` (set by `.ci/run`) makes that a failure.
#[test]
fn fsx_with_m_nodes_killed_and_restarted() {
    let required = std::env::var("DRS_POSIX_SUITE").is_ok_and(|v| v == "1");
    let Some(bin) = installed_tool("fsx") else {
        assert!(
            !required,
            "DRS_POSIX_SUITE=1 but fsx is not installed (run tests/posix/install.sh)"
        );
        eprintln!("skipped: needs fsx (bash tests/posix/install.sh)");
        return;
    };
    let c = Cluster::up_sized(8192, "4KiB", &["--down-after-ms", "1000"]);
    let config = c.dir.join("fsx.toml");
    fs::write(
        &config,
        "flen = 2097152\n[opsize]\nmax = 131072\n[weights]\nclose_open = 2\nread = 10\n\
         write = 10\nmapread = 5\nmapwrite = 5\ninvalidate = 1\ntruncate = 3\nfsync = 1\n\
         fdatasync = 1\nposix_fallocate = 2\npunch_hole = 2\nsendfile = 2\n\
         posix_fadvise = 2\ncopy_file_range = 2\n",
    )
    .unwrap();
    let run = |m: &Mount, name: &str, seed: u64, ops: u64| {
        let artifacts = c.dir.join(format!("fsx-{name}"));
        fs::create_dir_all(&artifacts).unwrap();
        Command::new(&bin)
            .args(["-f", s(&config), "-N", &ops.to_string()])
            .args(["-S", &seed.to_string(), "-P", s(&artifacts)])
            .arg(m.p(name))
            .env("NO_COLOR", "1")
            .current_dir(&artifacts)
            .output()
            .unwrap()
    };
    let check = |out: &std::process::Output, m: &Mount, what: &str| {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail = |t: &str| {
            let l: Vec<&str> = t.lines().collect();
            l[l.len().saturating_sub(40)..].join("\n")
        };
        if !(out.status.success() && stdout.contains("All operations completed A-OK!")) {
            crate::harness::dump_logs(&c.dir);
            panic!(
                "fsx {what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- mount log\n{}",
                out.status,
                tail(&stdout),
                tail(&stderr),
                tail(&m.stderr()),
            );
        }
    };

    let m = Mount::new(&c, "mnt", &[]);
    let out = thread::scope(|scope| {
        scope.spawn(|| {
            thread::sleep(Duration::from_secs(3));
            c.node("kill", 1).ok();
            thread::sleep(Duration::from_millis(500));
            c.node("kill", 4).ok();
            thread::sleep(Duration::from_secs(5));
            c.node("start", 1).ok();
            c.node("start", 4).ok();
        });
        let started = Instant::now();
        let out = run(&m, "killed", 1, 2500);
        // Both nodes died, and came back, under the load.
        assert!(
            started.elapsed() > Duration::from_secs(9),
            "fsx finished in {:?}, before the nodes were restarted: give it more operations",
            started.elapsed()
        );
        out
    });
    check(&out, &m, "with nodes 1 and 4 SIGKILLed and restarted");
    drop(m);

    let wb = Mount::new(&c, "wb", &["-o", "writeback_cache"]);
    let out = run(&wb, "writeback", 2, 1500);
    check(&out, &wb, "on a writeback_cache mount");
}

/// The pjdfstest POSIX conformance suite (the Rust rewrite of the FreeBSD suite:
/// about 400 cases over chmod, chown, link, mkdir, mkfifo, mknod, open, rename, rmdir,
/// symlink, truncate, unlink, utimensat and posix_fallocate, their errors, times and
/// permission checks for other users), run as root on a mount with `allow_other`;
/// every case must pass. Only the EROFS cases are left out: they remount read-only
/// with `mount -o remount,ro`, which goes through a FUSE helper that does not know
/// DRS (the kernel's own remount, `mount -i -o remount,ro`, works).
///
/// Needs root and the suite (`bash tests/posix/install.sh`; `.ci/run` does it). It is
/// skipped without them, unless `DRS_POSIX_SUITE=1` (set by `.ci/run`) makes that a
/// failure.
#[test]
fn posix_conformance_suite() {
    let required = std::env::var("DRS_POSIX_SUITE").is_ok_and(|v| v == "1");
    let root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let Some(bin) = pjdfstest().filter(|_| root) else {
        assert!(
            !required,
            "DRS_POSIX_SUITE=1 but {} (run tests/posix/install.sh as root)",
            if root {
                "pjdfstest is not installed"
            } else {
                "not root"
            }
        );
        eprintln!("skipped: needs root and pjdfstest (bash tests/posix/install.sh)");
        return;
    };
    let c = cluster(4096);
    let m = Mount::new(&c, "mnt", &["-o", "allow_other"]);
    // Every directory on the way is searchable by the suite's other users.
    for dir in [&c.dir, &m.path] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let work = m.p("t");
    fs::create_dir(&work).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o777)).unwrap();
    let second = c.dir.join("second");
    fs::create_dir(&second).unwrap();
    let groups = fs::read_to_string("/etc/group").unwrap_or_default();
    let nogroup = if groups.lines().any(|l| l.starts_with("nogroup:")) {
        "nogroup"
    } else {
        "nobody"
    };
    let config = c.dir.join("pjdfstest.toml");
    fs::write(
        &config,
        format!(
            "[features]\nposix_fallocate = {{}}\nrename_ctime = {{}}\nutime_now = {{}}\n\
             utimensat = {{}}\n\n[settings]\nnaptime = 0.01\nallow_remount = false\n\n\
             [dummy_auth]\nentries = [[\"nobody\", \"{nogroup}\"], [\"tests\", \"tests\"]]\n"
        ),
    )
    .unwrap();
    let out = Command::new(&bin)
        .args(["-c", s(&config), "-p", s(&work), "-s", s(&second)])
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        .env_remove("RUST_BACKTRACE")
        .current_dir(&work)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // A failed case prints its name and FAILED, then its panic message on the next
    // line: both are kept, and they come last in the assertion's message.
    let lines: Vec<&str> = stdout.lines().collect();
    let failed: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with("FAILED"))
        .flat_map(|(i, l)| std::iter::once(*l).chain(lines.get(i + 1).copied()))
        .collect();
    let summary = stdout
        .lines()
        .rfind(|l| l.starts_with("Summary"))
        .unwrap_or("no summary");
    eprintln!("pjdfstest: {summary}");
    // Unmount and stop the cluster first: their logs, printed when a test panics with
    // them alive, would bury the failed cases.
    let mount_log = m.stderr();
    let mount_log: Vec<&str> = mount_log.lines().collect();
    drop(m);
    drop(c);
    assert!(
        out.status.success() && failed.is_empty() && summary.contains(" 0 failed"),
        "pjdfstest failed ({}): {summary}\n--- output (last 40 lines)\n{}\n--- stderr\n{}\n\
         --- mount log (last lines)\n{}\n--- failed cases\n{}",
        out.status,
        lines[lines.len().saturating_sub(40)..].join("\n"),
        String::from_utf8_lossy(&out.stderr),
        mount_log[mount_log.len().saturating_sub(20)..].join("\n"),
        failed.join("\n"),
    );
    // The suite ran its cases: a run that skipped them all would pass too.
    let passed: u32 = summary
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" passed")?.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 350, "only {passed} cases passed: {summary}");
}

#[test]
fn permissions_ownership_and_times() {
    let c = cluster(1024);
    let m = Mount::new(&c, "mnt", &["-o", "allow_other"]);
    fs::set_permissions(&m.path, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.p("secret"), b"root only").unwrap();
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.p("public"), b"everyone").unwrap();
    fs::set_permissions(m.p("public"), fs::Permissions::from_mode(0o644)).unwrap();
    let denied = as_nobody(&["cat", s(&m.p("secret"))]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let allowed = as_nobody(&["cat", s(&m.p("public"))]);
    assert!(allowed.status.success());
    assert_eq!(allowed.stdout, b"everyone");
    let write = as_nobody(&["sh", "-c", &format!("echo x > {}", s(&m.p("public")))]);
    assert!(
        !write.status.success(),
        "nobody may not write a 0644 root file"
    );
    let create = as_nobody(&["touch", s(&m.p("new"))]);
    assert!(
        !create.status.success(),
        "nobody may not create in a 0755 root dir"
    );

    // chown hands the file over; the new owner may then write it.
    std::os::unix::fs::chown(m.p("public"), Some(65534), Some(65534)).unwrap();
    let md = fs::metadata(m.p("public")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    let write = as_nobody(&["sh", "-c", &format!("echo mine > {}", s(&m.p("public")))]);
    assert!(
        write.status.success(),
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );
    assert_eq!(fs::read(m.p("public")).unwrap(), b"mine\n");

    // Times: chmod changes ctime only; a write changes mtime and ctime; utimens sets
    // what it is given.
    let md0 = fs::metadata(m.p("secret")).unwrap();
    thread::sleep(Duration::from_millis(20));
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o640)).unwrap();
    let md1 = fs::metadata(m.p("secret")).unwrap();
    assert_eq!(md1.mode() & 0o7777, 0o640);
    assert!(md1.ctime_nsec() != md0.ctime_nsec() || md1.ctime() > md0.ctime());
    assert_eq!(
        (md1.mtime(), md1.mtime_nsec()),
        (md0.mtime(), md0.mtime_nsec())
    );
    thread::sleep(Duration::from_millis(20));
    OpenOptions::new()
        .write(true)
        .open(m.p("secret"))
        .unwrap()
        .write_all(b"ROOT")
        .unwrap();
    let md2 = fs::metadata(m.p("secret")).unwrap();
    assert!((md2.mtime(), md2.mtime_nsec()) > (md1.mtime(), md1.mtime_nsec()));
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(m.p("secret"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(when).set_accessed(when))
        .unwrap();
    let md3 = fs::metadata(m.p("secret")).unwrap();
    assert_eq!(md3.mtime(), 1_000_000_000);
    assert_eq!(md3.atime(), 1_000_000_000);
    // A read updates the atime (relatime: it is not after the ctime), not the ctime;
    // seen once the attribute cache's second has passed.
    assert_eq!(fs::read(m.p("secret")).unwrap(), b"ROOT only");
    let started = Instant::now();
    let md4 = loop {
        let md = fs::metadata(m.p("secret")).unwrap();
        if md.atime() > 1_000_000_000 {
            break md;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "atime not updated by a read"
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(md4.atime() >= md3.ctime());
    assert_eq!(
        (md4.ctime(), md4.ctime_nsec()),
        (md3.ctime(), md3.ctime_nsec())
    );

    // statfs reports the capacity after redundancy: the volume's data blocks.
    let st = statvfs(&m.path);
    assert_eq!(st.blocks() * st.fragment_size(), 1024 * 64 * 1024);
}

/// The metadata queries a mount serving metrics at `metrics` has made.
fn metadata_queries(metrics: &str) -> f64 {
    let body = crate::metrics::scrape(metrics).1;
    crate::metrics::sample(&body, "drs_fs_metadata_queries_total")
        .expect("the mount counts its metadata queries")
}

/// Goal: the kernel's question before a write (does the file have a
/// `security.capability` to remove?) costs no metadata query on a file this mount
/// has just created: a new inode has none. On a file opened again it is asked once
/// (close-to-open), so the check below can see it.
#[test]
fn a_new_files_first_write_asks_no_metadata_query() {
    let c = cluster(1024);
    let metrics = format!("127.0.0.1:{}", crate::harness::free_port());
    let m = Mount::new(&c, "mnt", &["--metrics", &metrics]);
    let queries = || metadata_queries(&metrics);
    let mut f = File::create(m.p("new")).unwrap();
    let before = queries();
    f.write_all(b"first").unwrap();
    assert_eq!(queries() - before, 0.0, "the first write of a new file");
    drop(f);
    let mut f = OpenOptions::new().write(true).open(m.p("new")).unwrap();
    let before = queries();
    f.write_all(b"again").unwrap();
    assert!(
        queries() - before >= 1.0,
        "a write after an open asks for the capability"
    );
    drop(f);
    assert_eq!(fs::read(m.p("new")).unwrap(), b"again");
}

/// Goal: a directory of 2000 files made by one mount (four threads at once) lists
/// whole and in order in another, and `ls -l` there costs no lookup per name (the listing carries the
/// attributes: `readdirplus`) and shows each file's size.
#[test]
fn thousands_of_files_in_one_directory() {
    // Each small file takes one 64 KiB block: room for them all.
    let c = cluster(4096);
    let m = Mount::new(&c, "mnt", &[]);
    let metrics = format!("127.0.0.1:{}", crate::harness::free_port());
    let other = Mount::new(&c, "mnt2", &["--metrics", &metrics]);
    fs::create_dir(m.p("many")).unwrap();
    let n = 2000;
    // Four writers at once, as an unpacking tool's threads would.
    let writers = 4;
    thread::scope(|scope| {
        for w in 0..writers {
            let m = &m;
            scope.spawn(move || {
                for i in (w..n).step_by(writers) {
                    // Without the kernel's writeback cache a write fails in write(2)
                    // itself, so an error cannot hide in the close.
                    let mut f = File::create(m.p(&format!("many/file-{i:05}"))).unwrap();
                    f.write_all(format!("{i}").as_bytes()).unwrap();
                }
            });
        }
    });
    let mut names: Vec<String> = fs::read_dir(other.p("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), n);
    for (i, name) in names.iter().enumerate() {
        assert_eq!(name, &format!("file-{i:05}"));
    }
    assert_eq!(
        fs::read_to_string(other.p("many/file-01234")).unwrap(),
        "1234"
    );

    // `ls -l` in a fresh directory listing: sizes right, and few metadata
    // queries (not a lookup and two attribute reads, an ACL and a security label,
    // per file; an entry whose attributes expired on a slow machine is looked up
    // again).
    xattr::set(&m.p("many/file-00007"), "user.tag", b"seven", 0).unwrap();
    let lookups = || metadata_queries(&metrics);
    thread::sleep(Duration::from_millis(1500));
    let before = lookups();
    assert!(before > 0.0, "the listing above made queries");
    let out = Command::new("ls")
        .args(["-l", "--time-style=+"])
        .arg(other.p("many"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    let files: Vec<(u64, &str)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(4)?.parse().ok()?, *f.last()?))
        })
        .collect();
    assert_eq!(files.len(), n, "{listing}");
    for (i, (size, name)) in files.iter().enumerate() {
        assert_eq!(*name, format!("file-{i:05}"));
        assert_eq!(*size, format!("{i}").len() as u64, "{name}");
    }
    let looked_up = lookups() - before;
    assert!(
        looked_up < (n / 4) as f64,
        "ls -l of {n} files made {looked_up} metadata queries"
    );
    // What the listing said of attributes the files have, and this mount's own
    // changes of them, are read as they are.
    assert_eq!(
        xattr::get(&other.p("many/file-00007"), "user.tag").unwrap(),
        b"seven"
    );
    xattr::set(&other.p("many/file-00008"), "user.new", b"eight", 0).unwrap();
    assert_eq!(
        xattr::get(&other.p("many/file-00008"), "user.new").unwrap(),
        b"eight"
    );
}

/// Goal: a full namespace fails what would grow it with ENOSPC (never EIO, never a
/// hang), lets files be removed, and has room again afterwards.
///
/// Method: nodes started with `--namespace-limit-mib 1`; files with 60 KiB extended
/// attributes made until the mount answers ENOSPC, then empty files until three
/// creates 1.5 s apart are refused (once full, the leader measures the namespace
/// again at most every 100 ms, or ten times as long as a walk of it takes, and until
/// then counts what it admitted at its upper bound: a refusal may come from those
/// bounds; one measured afresh with nothing admitted since comes within 3 s unless a
/// walk takes over 300 ms); then making a directory with a 250-byte name and a 1 MiB write to a
/// file that has no blocks yet (16 new blocks) fail with ENOSPC (each counts some
/// 200 bytes more than a create, more than the opens and closes in between change),
/// while reading works; once half the files are gone (and the
/// leader has measured again), renaming over works and a new file is written and
/// reads back the same through a second mount.
#[test]
fn a_full_namespace_fails_with_enospc_then_has_room_again() {
    let c = Cluster::up_sized(
        1024,
        "64KiB",
        &["--down-after-ms", "1000", "--namespace-limit-mib", "1"],
    );
    let m = Mount::new(&c, "mnt", &[]);
    let enospc = |r: std::io::Result<()>, what: &str| match r {
        Err(e) if errno_of(&e) == libc::ENOSPC => {}
        other => panic!("{what}: {other:?}, not ENOSPC"),
    };
    let fill = vec![0x5a_u8; 60 << 10];
    let mut made = 0;
    let full = loop {
        let path = m.p(&format!("f{made:03}"));
        let r = match File::create(&path) {
            Ok(_) => xattr::set(&path, "user.fill", &fill, 0),
            Err(e) => Err(errno_of(&e)),
        };
        match r {
            Ok(()) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 64, "{made} files of 60 KiB under a 1 MiB limit");
    };
    assert_eq!(full, libc::ENOSPC, "errno {full}");
    assert!(made >= 8, "only {made} files before the limit");
    let mut empty = 0;
    let mut refused = 0;
    while refused < 3 {
        match File::create(m.p(&format!("e{empty:04}"))) {
            Ok(_) => {
                empty += 1;
                refused = 0;
            }
            Err(e) => {
                assert_eq!(errno_of(&e), libc::ENOSPC, "{e}");
                refused += 1;
                thread::sleep(Duration::from_millis(1500));
            }
        }
        assert!(empty < 5000, "{empty} empty files and not full");
    }
    enospc(fs::create_dir(m.p(&"d".repeat(250))), "mkdir");
    let mut f = OpenOptions::new().write(true).open(m.p("f000")).unwrap();
    enospc(
        f.write_all(&random_bytes(1, 1 << 20))
            .and_then(|_| f.sync_all()),
        "a write to new blocks",
    );
    drop(f);
    assert_eq!(xattr::get(&m.p("f001"), "user.fill").unwrap(), fill);
    for i in (3..made).step_by(2) {
        fs::remove_file(m.p(&format!("f{i:03}"))).unwrap();
    }
    thread::sleep(Duration::from_secs(1));
    fs::rename(m.p("f002"), m.p("f001")).unwrap();
    let data = random_bytes(2, 200_000);
    fs::write(m.p("after"), &data).unwrap();
    let other = Mount::new(&c, "mnt2", &[]);
    assert_eq!(fs::read(other.p("after")).unwrap(), data);
    assert!(!other.p("f002").exists());
    assert_eq!(xattr::get(&other.p("f001"), "user.fill").unwrap(), fill);
}

/// Goal: `O_APPEND` writes land at the end of the file across mounts, as on NFS:
/// what another mount appended and closed before an open is appended after, also
/// when this mount's kernel still holds an older size (it appended itself within
/// the attribute timeout); and appends through one mount from several threads at
/// once never overlap.
///
/// Method: mounts a and b append lines in turn, each through a new descriptor
/// (no `fstat`, as a shell's `>>` does), 20 rounds; the file reads back with every
/// line, in order, through both. Then 4 threads of a append 50 records of 100
/// bytes each; every record is whole and the size is the sum.
#[test]
fn appends_from_two_mounts_land_at_the_end() {
    let c = cluster(1024);
    let a = Mount::new(&c, "a", &[]);
    let b = Mount::new(&c, "b", &[]);
    let append = |path: &Path, line: &[u8]| {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(line).unwrap();
    };
    File::create(a.p("log")).unwrap();
    let mut want = Vec::new();
    for i in 0..20 {
        for (m, who) in [(&a, "A"), (&b, "B")] {
            let line = format!("{who}{i}\n");
            append(&m.p("log"), line.as_bytes());
            want.extend_from_slice(line.as_bytes());
        }
    }
    for m in [&a, &b] {
        let got = fs::read(m.p("log")).unwrap();
        assert!(
            got == want,
            "{}:\n{}",
            m.path.display(),
            String::from_utf8_lossy(&got)
        );
    }

    File::create(a.p("records")).unwrap();
    let path = a.p("records");
    let writers: Vec<_> = (0..4u8)
        .map(|t| {
            let path = path.clone();
            thread::spawn(move || {
                let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                for n in 0..50u8 {
                    let mut rec = vec![b'a' + t; 99];
                    rec[0] = n;
                    rec.push(b'\n');
                    f.write_all(&rec).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let got = fs::read(b.p("records")).unwrap();
    assert_eq!(got.len(), 4 * 50 * 100);
    let mut seen = std::collections::BTreeSet::new();
    for rec in got.chunks(100) {
        let t = rec[1];
        assert!((b'a'..b'e').contains(&t), "a torn record: {rec:?}");
        assert!(
            rec[1..99].iter().all(|x| *x == t) && rec[99] == b'\n',
            "{rec:?}"
        );
        assert!(seen.insert((t, rec[0])), "a record twice: {rec:?}");
    }
    assert_eq!(seen.len(), 200);
}

/// Goal: a rename over a file is atomic as another mount sees it: a process
/// there that opens the name while one mount replaces the file again and again
/// reads one whole version, and never finds the name missing.
///
/// Method: mount A writes 150 versions of `current` (each a new file renamed over
/// it); meanwhile mount B reads `current` in a loop and stats it. B's kernel keeps
/// the name's inode for a second, so most of its opens start from an inode A has
/// replaced and freed: the mount answers ESTALE, and the kernel looks the name up
/// again. Every read must be a whole version, and no call may fail with ENOENT.
/// One lookup-then-open can still lose a race with a rename landing between the
/// two twice over (then ESTALE reaches the caller, as on NFS): fewer than one
/// read or stat in five may (measured: none in 600). Without the ESTALE answer
/// nearly every read fails. B must have read versions past the 100th, and the
/// last one at the end.
#[test]
fn renames_over_a_file_are_atomic_to_another_mount() {
    let c = cluster(1024);
    let a = Mount::new(&c, "a", &[]);
    let b = Mount::new(&c, "b", &[]);
    let version = |i: usize| format!("version {i:05} ").repeat(300).into_bytes();
    fs::write(a.p("current"), version(0)).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    // Set when the writer ends, also by a panic: the reader then stops.
    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let (reads, stale, wrong, newest) = thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let (mut reads, mut stale, mut wrong, mut newest) = (0, 0, Vec::new(), 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                reads += 1;
                match fs::read(b.p("current")) {
                    Ok(d) => {
                        let i = std::str::from_utf8(&d[..d.len().min(13)])
                            .ok()
                            .and_then(|t| t.strip_prefix("version ")?.parse().ok());
                        match i {
                            Some(i) if d == version(i) => newest = newest.max(i),
                            _ => wrong.push(format!("a torn read of {} bytes", d.len())),
                        }
                    }
                    Err(e) if errno_of(&e) == libc::ESTALE => stale += 1,
                    Err(e) => wrong.push(format!("read: {e}")),
                }
                match fs::metadata(b.p("current")) {
                    Ok(md) if md.len() == version(0).len() as u64 => {}
                    Ok(md) => wrong.push(format!("stat: {} bytes", md.len())),
                    Err(e) if errno_of(&e) == libc::ESTALE => stale += 1,
                    Err(e) => wrong.push(format!("stat: {e}")),
                }
            }
            (reads, stale, wrong, newest)
        });
        let finished = Done(&done);
        for i in 1..=150 {
            fs::write(a.p("next"), version(i)).unwrap();
            fs::rename(a.p("next"), a.p("current")).unwrap();
        }
        drop(finished);
        reader.join().unwrap()
    });
    assert!(
        wrong.is_empty(),
        "{} of {reads} reads went wrong: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(reads >= 20, "only {reads} reads");
    // Reads followed the renames: B saw versions made long after the first.
    assert!(newest >= 100, "the newest version read was {newest}");
    assert_eq!(fs::read(b.p("current")).unwrap(), version(150));
    assert!(
        stale * 5 < reads * 2,
        "{stale} of {} reads and stats failed with ESTALE",
        reads * 2
    );
    eprintln!("{reads} reads and stats each; {stale} ESTALE; newest version read {newest}");
}

/// Close-to-open across two mounts, both ways, also when the reader's kernel
/// holds attributes read before the writer's close; unmounting ends a session.
#[test]
fn a_reader_in_another_mount_sees_closed_writes() {
    let c = cluster(1024);
    let a = Mount::new(&c, "a", &[]);
    let b = Mount::new(&c, "b", &[]);
    for round in 0..5u64 {
        let data = random_bytes(round, 300_000 + round as usize * 1000);
        fs::write(a.p("shared"), &data).unwrap();
        assert!(fs::read(b.p("shared")).unwrap() == data, "round {round}");
        // And back the other way, overwriting part of it.
        let f = OpenOptions::new().write(true).open(b.p("shared")).unwrap();
        f.write_all_at(b"from b", 1000).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let mut want = data.clone();
        want[1000..1006].copy_from_slice(b"from b");
        assert!(fs::read(a.p("shared")).unwrap() == want, "round {round}");
    }
    // What a writer fsynced, with the file still open, a reader in another mount
    // reads at its next open.
    let w = OpenOptions::new().write(true).open(a.p("shared")).unwrap();
    let synced = random_bytes(9, 200_000);
    w.write_all_at(&synced, 50_000).unwrap();
    w.sync_all().unwrap();
    let got = fs::read(b.p("shared")).unwrap();
    assert!(
        got[50_000..250_000] == synced[..],
        "fsynced bytes, writer still open"
    );
    drop(w);
    // A reader whose kernel holds the file's attributes (a stat within the
    // attribute timeout) still reads all that another mount appended and closed
    // before the reader's open, at once.
    let mut want = fs::read(a.p("shared")).unwrap();
    for round in 0..10u8 {
        assert_eq!(
            fs::metadata(b.p("shared")).unwrap().len(),
            want.len() as u64
        );
        let more = [round; 100];
        let mut f = OpenOptions::new().append(true).open(a.p("shared")).unwrap();
        f.write_all(&more).unwrap();
        drop(f);
        want.extend_from_slice(&more);
        let got = fs::read(b.p("shared")).unwrap();
        assert_eq!(got.len(), want.len(), "round {round}");
        assert!(got == want, "round {round}");
    }
    // `status` shows the file system with its two mounts.
    let out = crate::harness::drs(&["status", "--cluster", s(&c.file), "--json"]).run();
    assert!(matches!(out.code, Some(0 | 2)), "{out}");
    let st = out.json();
    let f = &st["meta"]["file_system"];
    assert_eq!(f["mounts"], 2, "{st}");
    assert_eq!(f["files"], 2, "the root and shared: {st}");
    assert_eq!(f["held"], 0, "{st}");
    drop(b);
    // An unmount ends its session.
    let started = Instant::now();
    loop {
        let st = crate::harness::drs(&["status", "--cluster", s(&c.file), "--json"])
            .run()
            .json();
        if st["meta"]["file_system"]["mounts"] == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{st}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// Small writes go through the mount's write-back cache: another mount sees them
/// within a few seconds even while the writer keeps the file open, a writer in
/// another mount to the same blocks waits on the cached blocks' locks only briefly
/// and neither write is lost, and a `-o write_through` mount writes the same way.
#[test]
fn small_writes_reach_other_mounts_through_the_cache() {
    let c = cluster(1024);
    let a = Mount::new(&c, "a", &[]);
    let b = Mount::new(&c, "b", &[]);
    let through = Mount::new(&c, "through", &["-o", "write_through"]);
    let mut want = random_bytes(3, 256 * 1024);
    fs::write(a.p("f"), &want).unwrap();
    let new = random_bytes(4, 256 * 1024);
    let f = OpenOptions::new().write(true).open(a.p("f")).unwrap();
    for (i, piece) in new.chunks(4096).enumerate() {
        f.write_all_at(piece, (i * 4096) as u64).unwrap();
    }
    want.copy_from_slice(&new);
    // Still open in a: b sees the bytes once the background write-back ran.
    let until = Instant::now() + Duration::from_secs(10);
    while fs::read(b.p("f")).unwrap() != want {
        assert!(Instant::now() < until, "b never saw a's cached writes");
        thread::sleep(Duration::from_millis(200));
    }
    // a caches block 0 again; b writes into the same block meanwhile.
    f.write_all_at(b"from a", 10).unwrap();
    let started = Instant::now();
    let g = OpenOptions::new().write(true).open(b.p("f")).unwrap();
    g.write_all_at(b"from b", 100).unwrap();
    g.sync_all().unwrap();
    drop(g);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "b waited {waited:?}");
    f.sync_all().unwrap();
    drop(f);
    want[10..16].copy_from_slice(b"from a");
    want[100..106].copy_from_slice(b"from b");
    for m in [&a, &b, &through] {
        assert!(fs::read(m.p("f")).unwrap() == want, "{}", m.path.display());
    }
    // The write-through mount: small writes, read back everywhere.
    let h = OpenOptions::new().write(true).open(through.p("f")).unwrap();
    for i in 0..16u8 {
        h.write_all_at(&[i; 100], u64::from(i) * 1000).unwrap();
        want[usize::from(i) * 1000..usize::from(i) * 1000 + 100].fill(i);
    }
    drop(h);
    for m in [&a, &b, &through] {
        assert!(fs::read(m.p("f")).unwrap() == want, "{}", m.path.display());
    }
}

/// The peak resident memory of process `pid`, bytes (`VmHWM`).
fn peak_memory(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

/// Goal: a file larger than a mount's memory is written and read whole: neither
/// the writing mount nor the reading one holds the file (the write-back cache
/// holds at most 64 blocks of a file, each for about a second; reads stream).
///
/// Method: 160 MB written through one mount in writes of 100,000 bytes (each
/// ends inside a 64 KiB block, so every block passes through the write-back
/// cache), then read back through another mount in 1 MiB reads and compared
/// piece by piece (the test never holds the file either). Each mount's peak
/// resident memory (`VmHWM`) must stay under half the file's size (measured: some
/// 40 MiB for the 153 MiB file, debug build).
#[test]
fn a_file_larger_than_the_mounts_memory() {
    let c = cluster(4096);
    let w = Mount::new(&c, "w", &[]);
    let r = Mount::new(&c, "r", &[]);
    let (piece, pieces) = (100_000usize, 1600usize);
    let total = (piece * pieces) as u64;
    let part = |i: usize| random_bytes(1000 + i as u64, piece);
    let mut f = File::create(w.p("big")).unwrap();
    for i in 0..pieces {
        f.write_all(&part(i)).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let mut f = File::open(r.p("big")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), total);
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut want) = (0usize, Vec::new());
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let mut got = &buf[..n];
        while !got.is_empty() {
            if want.is_empty() {
                want = part(at / piece);
                want.drain(..at % piece);
            }
            let k = got.len().min(want.len());
            assert!(got[..k] == want[..k], "bytes differ in 0x{at:x}..+{k}");
            want.drain(..k);
            got = &got[k..];
            at += k;
        }
    }
    assert_eq!(at as u64, total);
    for (m, what) in [(&w, "writing"), (&r, "reading")] {
        let peak = peak_memory(m.child.as_ref().unwrap().id());
        eprintln!("{what} mount: peak memory {} MiB", peak >> 20);
        assert!(
            peak < total / 2,
            "the {what} mount peaked at {} MiB for a file of {} MiB",
            peak >> 20,
            total >> 20
        );
    }
}

/// Goal: the kernel sends the mount requests of 1 MiB (`max_write`, `max_pages`),
/// not one per 128 KiB or per page, and, as root, reads ahead 1 MiB.
///
/// Method: an 8 MiB file written with one `write(2)`, then read in 128 KiB reads
/// through another mount; the mounts' own counts of write and read requests
/// (`drs_fs_op_seconds_count`): at most 16 of each (with 128 KiB requests it
/// would be 64, with pages 2048). Where the mount could raise its readahead (root,
/// a writable /sys: CI), that of the second in `/sys/class/bdi` must be 1024 KiB.
#[test]
fn requests_are_a_mebibyte_and_reads_read_ahead() {
    let c = cluster(1024);
    let wm = format!("127.0.0.1:{}", crate::harness::free_port());
    let rm = format!("127.0.0.1:{}", crate::harness::free_port());
    let w = Mount::new(&c, "w", &["--metrics", &wm]);
    let r = Mount::new(&c, "r", &["--metrics", &rm]);
    let count = |addr: &str, op: &str| {
        let body = crate::metrics::scrape(addr).1;
        crate::metrics::sample(&body, &format!("drs_fs_op_seconds_count{{op=\"{op}\"}}"))
            .unwrap_or(0.0)
    };
    let data = random_bytes(21, 8 << 20);
    let before = count(&wm, "write");
    let mut f = File::create(w.p("f")).unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    let writes = count(&wm, "write") - before;
    assert!(
        (1.0..=16.0).contains(&writes),
        "8 MiB in one write(2) took {writes} write requests"
    );
    let before = count(&rm, "read");
    let mut f = File::open(r.p("f")).unwrap();
    let (mut buf, mut back) = (vec![0u8; 128 << 10], Vec::new());
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(back == data, "read back differs");
    let reads = count(&rm, "read") - before;
    // The mount found itself in the mount table and tried; writing the setting
    // needs root and a writable /sys.
    let log = r.stderr();
    assert!(
        log.contains("readahead raised") || log.contains("readahead left as is"),
        "{log}"
    );
    if log.contains("readahead raised") {
        assert!(
            (1.0..=16.0).contains(&reads),
            "8 MiB read in 128 KiB reads took {reads} read requests"
        );
        let dev = mount_dev(&r.path).expect("the mount in the mount table");
        let ra = fs::read_to_string(format!("/sys/class/bdi/{dev}/read_ahead_kb")).unwrap();
        assert_eq!(ra.trim(), "1024");
    } else {
        eprintln!("readahead left as the kernel set it; {reads} read requests");
    }
}

#[test]
fn a_copy_with_m_nodes_killed_during_it_verifies() {
    let c = cluster(2048);
    let m = Mount::new(&c, "mnt", &[]);
    let src = c.dir.join("source");
    let data = random_bytes(7, 48 << 20);
    fs::write(&src, &data).unwrap();
    let dst = m.p("copy");
    let copier = {
        let (src, dst) = (src.clone(), dst.clone());
        thread::spawn(move || -> std::io::Result<()> {
            let mut from = File::open(src)?;
            let mut to = File::create(dst)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = from.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                to.write_all(&buf[..n])?;
                thread::sleep(Duration::from_millis(20));
            }
            to.sync_all()
        })
    };
    thread::sleep(Duration::from_millis(400));
    c.node("kill", 1).ok();
    thread::sleep(Duration::from_millis(300));
    c.node("kill", 4).ok();
    assert!(
        !copier.is_finished(),
        "the copy ended before both nodes were killed"
    );
    if let Err(e) = copier.join().unwrap() {
        crate::harness::dump_logs(&c.dir);
        panic!(
            "the copy saw an error with m nodes down: {e}\n--- mount log ---\n{}",
            m.stderr()
        );
    }
    // Read back through a new mount (no page cache of the writer), with the nodes
    // still dead: degraded reads, which its metrics count.
    let metrics = format!("127.0.0.1:{}", crate::harness::free_port());
    let reader = Mount::new(&c, "reader", &["--metrics", &metrics]);
    let back = fs::read(reader.p("copy")).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(
        back == data,
        "the copy differs from its source: {}",
        diff(&back, &data)
    );
    let body = crate::metrics::scrape(&metrics).1;
    for name in [
        "drs_client_degraded_reads_total",
        "drs_client_reconstructions_total",
        "drs_fs_op_seconds_count{op=\"read\"}",
        "drs_fs_metadata_commands_total",
    ] {
        assert!(
            crate::metrics::sample(&body, name).is_some_and(|v| v > 0.0),
            "{name} not counted: {body}"
        );
    }
}

/// Goal: with m + 1 storage nodes down, reads, writes and fsyncs fail with EIO
/// within the mount's `--timeout` (never hang, never succeed), first with the
/// metadata service healthy (the data path decides), then with a metadata quorum
/// lost too; each time the same mount carries on once the nodes are back.
///
/// Method: 6 nodes (4+2), metadata replicas on nodes 0-4. Nodes 3, 4 and 5 are
/// SIGKILLed (3 of 5 replicas stay): a new mount reads a file written before (its
/// kernel holds no page of it), a 1 MiB file is written, and a file opened before
/// gets a small write and an fsync; each must fail with EIO within 5 s + slack.
/// They are restarted, and the mount writes again. Then nodes 0, 1 and 2 (3
/// replicas) are killed: a write fails with EIO; they are restarted and the mount
/// carries on, with every file whole.
#[test]
fn more_than_m_nodes_down_fails_with_eio_in_bounded_time_then_recovers() {
    let c = cluster(1024);
    let m = Mount::new(&c, "mnt", &["--timeout", "5"]);
    fs::write(m.p("before"), b"written while healthy").unwrap();
    let kept = random_bytes(4, 1 << 20);
    fs::write(m.p("kept"), &kept).unwrap();
    let mut open = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.p("open"))
        .unwrap();
    open.write_all(b"durable").unwrap();
    open.sync_all().unwrap();
    let bound = Duration::from_secs(15);
    let eio_within = |what: &str, f: &mut dyn FnMut() -> std::io::Result<()>| {
        let started = Instant::now();
        let res = f();
        let waited = started.elapsed();
        match res {
            Err(e) => assert_eq!(errno_of(&e), libc::EIO, "{what}: {e}"),
            Ok(()) => panic!("{what} succeeded with m + 1 nodes down"),
        }
        assert!(waited < bound, "{what} failed after {waited:?}");
    };
    // The data path alone: the metadata service keeps its quorum.
    for id in [3, 4, 5] {
        c.node("kill", id).ok();
    }
    let reader = Mount::new(&c, "reader", &["--timeout", "5"]);
    eio_within("a read", &mut || fs::read(reader.p("kept")).map(drop));
    eio_within("a 1 MiB write", &mut || {
        fs::write(m.p("new"), random_bytes(5, 1 << 20))
    });
    eio_within("an fsync", &mut || {
        open.write_all_at(b"not durable", 4096)?;
        open.sync_all()
    });
    drop(open);
    drop(reader);
    // The nodes restarted, the same mount carries on.
    let restart_and_write = |ids: [u32; 3], name: &str| {
        for id in ids {
            c.node("start", id).ok();
        }
        c.wait_all_up(Duration::from_secs(60));
        let started = Instant::now();
        loop {
            match fs::write(m.p(name), b"written after the nodes came back") {
                Ok(()) => break,
                Err(e) => assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the mount did not recover: {e}"
                ),
            }
            thread::sleep(Duration::from_millis(500));
        }
    };
    restart_and_write([3, 4, 5], "new");
    assert!(fs::read(m.p("kept")).unwrap() == kept);
    assert_eq!(&fs::read(m.p("open")).unwrap()[..7], b"durable");

    // And with a metadata quorum lost as well.
    for id in [0, 1, 2] {
        c.node("kill", id).ok();
    }
    eio_within("a write without a metadata quorum", &mut || {
        fs::write(m.p("after"), random_bytes(3, 1 << 20))
    });
    restart_and_write([0, 1, 2], "after");
    assert_eq!(fs::read(m.p("before")).unwrap(), b"written while healthy");
    assert_eq!(
        fs::read(m.p("after")).unwrap(),
        b"written after the nodes came back"
    );
    assert!(fs::read(m.p("kept")).unwrap() == kept);
}

#[test]
fn sigterm_unmounts_cleanly() {
    let c = cluster(512);
    // `fusermount3 -u` of a mount not in use: the process ends with status 0.
    let mut m = Mount::new(&c, "mnt", &[]);
    fs::write(m.p("f"), b"x").unwrap();
    let st = m
        .unmount()
        .expect("the mount process ends after fusermount3 -u");
    assert!(st.success(), "{st}: {}", m.stderr());
    assert!(!mounted(&m.path), "still mounted after fusermount3 -u");
    // An unmount from outside is the normal end, not a warning.
    let log = m.stderr();
    assert!(
        log.contains("unmounted") && !log.contains("WARN"),
        "the mount's log after fusermount3 -u:\n{log}"
    );
    let mut m = Mount::new(&c, "mnt", &[]);
    assert_eq!(fs::read(m.p("f")).unwrap(), b"x");
    signal_mount(&m, nix::sys::signal::Signal::SIGTERM);
    let st = m
        .wait(Duration::from_secs(20))
        .expect("the mount process ends");
    assert!(st.success(), "{st}");
    assert!(!mounted(&m.path), "still mounted after SIGTERM");
    // And it mounts again with the data there.
    let again = Mount::new(&c, "mnt", &[]);
    assert_eq!(fs::read(again.p("f")).unwrap(), b"x");
}

/// Whether this process has capability `bit` (21: CAP_SYS_ADMIN) in effect.
fn has_capability(bit: u32) -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            let hex = st.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// The `drs-fuse` binary, beside `drs-cli`: `cargo test --workspace` builds it
/// (for drs-fuse's own tests); `cargo test -p drs-cli` alone does not, and may
/// find an older one.
fn drs_fuse_bin() -> PathBuf {
    let bin = Path::new(CLI).with_file_name("drs-fuse");
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build -p drs-fuse` (or `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// Goal: SIGTERM ends a busy mount too (a file open for writing, a working
/// directory in it), without losing what was written: the kernel writes back the
/// pages it holds, the mount commits the open file's cached writes, detaches, and
/// exits; the process holding the file then gets ENOTCONN, as from any FUSE file
/// system whose process is gone.
///
/// Method: the `drs-fuse` binary mounts, once plain and once with `-o
/// writeback_cache` (where the written pages stay in the kernel until it writes
/// them back); 300,000 bytes written to an open file (its last block partly, so
/// held in the write-back cache) that another mount still sees empty; a process
/// sits in a directory of the mount, and `fusermount3 -u` must refuse (busy);
/// then SIGTERM (SIGINT, as Ctrl-C, for the second); the mount process must exit 0
/// within 30 s (some 2.5 s here), unmounted; on the plain mount a write to the still-open file fails
/// with ENOTCONN; a new mount reads exactly the bytes written.
#[test]
fn sigterm_with_files_open_commits_them_and_detaches() {
    let c = cluster(512);
    let other = Mount::new(&c, "other", &[]);
    // Killed when dropped, also if the test fails first.
    struct Sitter(Child);
    impl Drop for Sitter {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    for (name, opts) in [("plain", &[][..]), ("wb", &["-o", "writeback_cache"][..])] {
        let mut m = Mount::with(&drs_fuse_bin(), &c, name, opts);
        let dir = m.p(&format!("{name}-dir"));
        fs::create_dir(&dir).unwrap();
        let sitter = Sitter(
            Command::new("sleep")
                .arg("600")
                .current_dir(&dir)
                .spawn()
                .unwrap(),
        );
        // Busy by the working directory alone.
        let busy = Command::new("fusermount3")
            .args(["-u", s(&m.path)])
            .output()
            .unwrap();
        assert!(
            !busy.status.success(),
            "{name}: fusermount3 -u of a mount with a working directory in it"
        );
        assert!(mounted(&m.path) && dir.exists(), "{name}: still served");
        let data = random_bytes(11, 300_000);
        let mut f = File::create(m.p(name)).unwrap();
        f.write_all(&data).unwrap();
        assert_eq!(
            fs::metadata(other.p(name)).unwrap().len(),
            0,
            "{name}: written but neither closed nor synced: not committed yet"
        );
        let sent = Instant::now();
        let signal = if opts.is_empty() {
            nix::sys::signal::Signal::SIGTERM
        } else {
            nix::sys::signal::Signal::SIGINT
        };
        signal_mount(&m, signal);
        // Its steps are bounded (under a minute in all); on a working cluster it
        // takes some 2.5 s (the 2 s grace, then the commit).
        let st = m.wait(Duration::from_secs(60));
        drop(sitter);
        let Some(st) = st else {
            // Killed before `f` closes: a close would wait on the stuck process.
            if let Some(child) = m.child.as_mut() {
                let _ = child.kill();
            }
            panic!(
                "{name}: the busy mount's process did not end: {}",
                m.stderr()
            );
        };
        assert!(st.success(), "{name}: {st}: {}", m.stderr());
        assert!(
            sent.elapsed() < Duration::from_secs(30),
            "{name}: took {:?}",
            sent.elapsed()
        );
        assert!(!mounted(&m.path), "{name}: still mounted after SIGTERM");
        if opts.is_empty() {
            // (With writeback_cache the kernel may take it into its page cache.)
            let e = f.write_all(b"more").unwrap_err();
            assert_eq!(errno_of(&e), libc::ENOTCONN, "{e}");
        }
        drop(f);
        let again = Mount::new(&c, &format!("{name}-again"), &[]);
        assert!(
            fs::read(again.p(name)).unwrap() == data,
            "{name}: the open file's bytes were not all committed"
        );
    }
}

/// The storage node hosting the metadata leader, from `status --json` and the
/// cluster file's `[[meta]]` entries.
fn leader_host(c: &Cluster) -> u32 {
    let (_, st) = c.status_json();
    let leader = st["meta"]["leader"].as_u64().expect("a metadata leader");
    let file = fs::read_to_string(&c.file).unwrap();
    let mut id = None;
    for line in file.lines() {
        if let Some(v) = line.strip_prefix("id = ") {
            id = v.trim().parse::<u64>().ok();
        }
        if let Some(v) = line.strip_prefix("host = ") {
            if id == Some(leader) {
                return v.trim().parse().unwrap();
            }
        }
    }
    panic!("no host for metadata replica {leader} in {file}");
}

#[test]
fn a_metadata_leader_kill_pauses_operations_then_they_continue() {
    let c = cluster(1024);
    let m = Mount::new(&c, "mnt", &[]);
    fs::create_dir(m.p("w")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (m.p("w"), stop.clone());
        thread::spawn(move || -> Result<(usize, Duration), String> {
            let mut slowest = Duration::ZERO;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                fs::write(dir.join(format!("f{i}")), random_bytes(i as u64, 100_000))
                    .map_err(|e| format!("file {i}: {e}"))?;
                slowest = slowest.max(started.elapsed());
                i += 1;
            }
            Ok((i, slowest))
        })
    };
    thread::sleep(Duration::from_millis(1500));
    let host = leader_host(&c);
    c.node("kill", host).ok();
    thread::sleep(Duration::from_secs(6));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (files, slowest) = writer.join().unwrap().expect("no operation fails");
    assert!(
        slowest < Duration::from_secs(15),
        "an operation took {slowest:?}"
    );
    // The service has a new leader on another node.
    assert_ne!(leader_host(&c), host);
    let reader = Mount::new(&c, "reader", &[]);
    for i in 0..files {
        let got = fs::read(reader.p(&format!("w/f{i}"))).unwrap();
        let want = random_bytes(i as u64, 100_000);
        assert!(got == want, "file {i} differs: {}", diff(&got, &want));
    }
    eprintln!("{files} files written; the slowest took {slowest:?}");
}

/// Goal: what a mount fsynced survives SIGKILL of the mount (whole blocks, and
/// parts of blocks held in its write-back cache), and the blocks the killed mount
/// had taken never show another file's old bytes.
#[test]
fn blocks_of_a_killed_mount_never_show_another_files_bytes() {
    let c = cluster(1024);
    let a = Mount::new(&c, "a", &[]);
    // A file whose blocks go back to the free list.
    let old = vec![0xA5u8; 8 << 20];
    fs::write(a.p("old"), &old).unwrap();
    fs::remove_file(a.p("old")).unwrap();
    // A new file takes blocks (the writer takes some ahead); 1 MiB is made durable,
    // more is written, and the mount process dies before closing.
    let mut f = File::create(a.p("new")).unwrap();
    let mut first = random_bytes(5, 1 << 20);
    f.write_all(&first).unwrap();
    f.sync_all().unwrap();
    // Parts of blocks changed (held in the write-back cache), then fsynced: durable
    // too.
    for (at, bytes) in [(1000, &b"partial"[..]), (200_000, &[0x5a; 3000][..])] {
        f.write_all_at(bytes, at as u64).unwrap();
        first[at..at + bytes.len()].copy_from_slice(bytes);
    }
    f.sync_data().unwrap();
    f.write_all(&random_bytes(6, 1 << 20)).unwrap();
    let mut a = a;
    signal_mount(&a, nix::sys::signal::Signal::SIGKILL);
    a.wait(Duration::from_secs(10));
    drop(f);
    drop(a);
    // Another mount grows the file over every block the dead one may have taken.
    let b = Mount::new(&c, "b", &[]);
    let f = OpenOptions::new().write(true).open(b.p("new")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20, "the durable size");
    f.set_len(24 << 20).unwrap();
    drop(f);
    let got = fs::read(b.p("new")).unwrap();
    assert!(
        got[..1 << 20] == first[..],
        "the fsynced megabyte, with its fsynced partial writes"
    );
    assert!(
        got[1 << 20..].iter().all(|x| *x == 0),
        "bytes past the durable size read as zeros, never the old file's"
    );
}

/// A POSIX lock of `len` bytes from `start` (0: to the end of the file).
fn byte_range(typ: i32, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: typ as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

fn setlk(f: &File, typ: i32, start: i64, len: i64) -> nix::Result<()> {
    let l = byte_range(typ, start, len);
    nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETLK(&l)).map(|_| ())
}

/// `fcntl(F_GETLK)`: the conflicting lock (`l_type` `F_UNLCK` if none).
fn getlk(f: &File, typ: i32, start: i64, len: i64) -> libc::flock {
    let mut l = byte_range(typ, start, len);
    nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_GETLK(&mut l)).unwrap();
    l
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

/// Polls `ok` for up to 20 s.
fn until(ok: impl Fn() -> bool, what: &str) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < Duration::from_secs(20), "{what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until process `pid` is asleep in a request to a FUSE file system (its
/// `wchan`), for up to 10 s.
fn wait_in_lock_request(pid: u32) {
    let started = Instant::now();
    loop {
        let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("fuse") || wchan.contains("request_wait") {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "process {pid} is not waiting in the file system (wchan {wchan:?})"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `flock(1)` on `path` without waiting: whether it got the lock (exit 0) or found
/// it held (exit 75).
fn flock_now(path: &Path) -> bool {
    let st = Command::new("flock")
        .args(["-n", "-E", "75", s(path), "true"])
        .status()
        .unwrap();
    assert!(matches!(st.code(), Some(0 | 75)), "flock: {st}");
    st.success()
}

/// A cluster whose mount sessions expire after 4 s of silence, and two mounts of
/// it, `a` and `b`.
fn two_mounts_with_short_sessions() -> (Cluster, Mount, Mount) {
    let c = Cluster::up_sized(
        1024,
        "64KiB",
        &["--down-after-ms", "1000", "--session-expiry-ms", "4000"],
    );
    let a = Mount::new(&c, "a", &[]);
    let b = Mount::new(&c, "b", &[]);
    (c, a, b)
}

/// `fcntl` and `flock` locks taken through one mount hold against processes of
/// another (each mount is a machine of its own): conflicts, `F_GETLK` naming the
/// holder, shared read locks, a downgrade, `F_SETLKW` waiting until the holder
/// closes the file, a process killed while it waits returning at once, a killed
/// holder's lock released with its files, and the locks of a killed mount released
/// when its session expires.
#[test]
fn byte_range_and_flock_locks_hold_across_mounts() {
    let (_cluster, a, b) = two_mounts_with_short_sessions();
    fs::write(a.p("f"), vec![7u8; 4096]).unwrap();
    let fa = open_rw(&a.p("f"));
    let fb = open_rw(&b.p("f"));
    let busy = Err(nix::errno::Errno::EAGAIN);

    // A write lock through a excludes b over its bytes, and only those.
    setlk(&fa, libc::F_WRLCK, 0, 100).unwrap();
    assert_eq!(setlk(&fb, libc::F_WRLCK, 50, 10), busy);
    assert_eq!(setlk(&fb, libc::F_RDLCK, 99, 1), busy);
    setlk(&fb, libc::F_RDLCK, 100, 10).unwrap();
    let held = getlk(&fb, libc::F_WRLCK, 0, 0);
    assert_eq!(held.l_type, libc::F_WRLCK as libc::c_short);
    assert_eq!((held.l_start, held.l_len), (0, 100));
    // A process of another mount has no number here.
    assert_eq!(held.l_pid, 0);
    // Nothing conflicts past b's own read lock.
    let free = getlk(&fb, libc::F_WRLCK, 110, 0);
    assert_eq!(free.l_type, libc::F_UNLCK as libc::c_short);

    // Downgraded to a read lock, it is shared; b cannot take it for writing.
    setlk(&fa, libc::F_RDLCK, 0, 100).unwrap();
    setlk(&fb, libc::F_RDLCK, 0, 100).unwrap();
    assert_eq!(setlk(&fb, libc::F_WRLCK, 0, 100), busy);
    assert_eq!(setlk(&fa, libc::F_WRLCK, 100, 1), busy);

    // F_SETLKW through b waits for a's read lock, which goes when a's file closes.
    let waiter = {
        let fb = fb.try_clone().unwrap();
        thread::spawn(move || {
            let l = byte_range(libc::F_WRLCK, 0, 100);
            let r = nix::fcntl::fcntl(&fb, nix::fcntl::FcntlArg::F_SETLKW(&l));
            // Kept open: closing any descriptor of the file drops this process's
            // locks on it.
            (r, Instant::now(), fb)
        })
    };
    thread::sleep(Duration::from_millis(800));
    assert!(
        !waiter.is_finished(),
        "F_SETLKW returned while a held a read lock"
    );
    let closed = Instant::now();
    drop(fa);
    let (r, got, fb2) = waiter.join().unwrap();
    r.unwrap();
    assert!(got >= closed, "the waiter got the lock before a's close");
    eprintln!(
        "F_SETLKW granted {:?} after the holder's close",
        got - closed
    );
    let fa = open_rw(&a.p("f"));
    assert_eq!(setlk(&fa, libc::F_RDLCK, 0, 1), busy);

    // flock: a whole-file lock, held through b against a.
    fs::write(a.p("g"), b"g").unwrap();
    let gb = File::open(b.p("g")).unwrap();
    // The plain call: `Flock`'s guard unlocks before it closes, and this checks
    // the release at close.
    #[allow(deprecated)]
    nix::fcntl::flock(
        std::os::fd::AsRawFd::as_raw_fd(&gb),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    assert!(!flock_now(&a.p("g")), "a took b's flock");
    // A process waiting for it through a and killed meanwhile returns at once.
    let mut blocked = Command::new("flock")
        .args([s(&a.p("g")), "true"])
        .spawn()
        .unwrap();
    wait_in_lock_request(blocked.id());
    assert!(blocked.try_wait().unwrap().is_none(), "flock did not wait");
    blocked.kill().unwrap();
    let killed = Instant::now();
    while blocked.try_wait().unwrap().is_none() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "a process killed while it waited for a lock did not end"
        );
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("a killed waiter ended after {:?}", killed.elapsed());
    // The lock goes with the last close of b's open file (not unlocked first; the
    // kernel's release of the file comes after the close returns).
    drop(gb);
    until(|| flock_now(&a.p("g")), "b's flock outlived its file");

    // A waiter on the same mount as the holder looks again as soon as the holder
    // closes (not at its next poll): printed, as timings on a busy machine vary.
    let ha = open_rw(&a.p("g"));
    // The check's own flock goes with its file's release, just after its process
    // ended: the lock may still be held for a moment.
    until(
        || setlk(&ha, libc::F_WRLCK, 0, 0).is_ok(),
        "the check's flock outlived its file",
    );
    let mut same = Command::new("flock")
        .args([s(&a.p("g")), "true"])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    assert!(same.try_wait().unwrap().is_none(), "flock did not wait");
    let closed = Instant::now();
    drop(ha);
    assert!(same.wait().unwrap().success());
    eprintln!(
        "a waiter on the holder's mount got the lock {:?} after its close",
        closed.elapsed()
    );

    // A holder killed: its files close, and its lock goes with them.
    let mut holder = Command::new("flock")
        .args(["-o", s(&b.p("g")), "sleep", "60"])
        .process_group(0)
        .spawn()
        .unwrap();
    let started = Instant::now();
    while flock_now(&a.p("g")) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "flock -o never locked"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The whole group: flock and the sleep it runs.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    holder.wait().unwrap();
    let started = Instant::now();
    while !flock_now(&a.p("g")) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a killed holder's flock was not released"
        );
        thread::sleep(Duration::from_millis(50));
    }

    // An open file description lock goes with the open file's last close.
    let ofd = open_rw(&a.p("f"));
    let l = byte_range(libc::F_WRLCK, 200, 100);
    nix::fcntl::fcntl(&ofd, nix::fcntl::FcntlArg::F_OFD_SETLK(&l)).unwrap();
    assert_eq!(setlk(&fb2, libc::F_RDLCK, 250, 1), busy);
    drop(ofd);
    until(
        || setlk(&fb2, libc::F_RDLCK, 250, 1).is_ok(),
        "an open file description lock outlived its file",
    );

    // Locks order writes and reads across mounts: what a writes under its lock, b
    // reads under its own, through a descriptor it read the file with before (so
    // the kernel had its pages cached).
    fs::write(a.p("c"), vec![b'x'; 8192]).unwrap();
    let cb = open_rw(&b.p("c"));
    let mut before = vec![0u8; 8192];
    cb.read_exact_at(&mut before, 0).unwrap();
    assert!(before.iter().all(|x| *x == b'x'));
    let ca = open_rw(&a.p("c"));
    setlk(&ca, libc::F_WRLCK, 0, 0).unwrap();
    ca.write_all_at(&[b'y'; 100], 4000).unwrap();
    setlk(&ca, libc::F_UNLCK, 0, 0).unwrap();
    setlk(&cb, libc::F_RDLCK, 0, 0).unwrap();
    let mut after = vec![0u8; 8192];
    cb.read_exact_at(&mut after, 0).unwrap();
    assert!(
        after[4000..4100].iter().all(|x| *x == b'y'),
        "b read what it had cached, not a's write under the lock"
    );
    assert!(after[..4000]
        .iter()
        .chain(&after[4100..])
        .all(|x| *x == b'x'));
    drop((ca, cb));

    // Mount b killed while its write lock on f is held: the lock goes when b's
    // session expires (4 s here), and a's F_SETLKW gets it then.
    let mut b = b;
    signal_mount(&b, nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    b.wait(Duration::from_secs(10));
    until(
        || setlk(&fa, libc::F_WRLCK, 0, 0).is_ok(),
        "a killed mount's locks were never released",
    );
    let after = killed.elapsed();
    eprintln!("a killed mount's lock taken through another after {after:?}");
    assert!(
        after < Duration::from_secs(20),
        "a killed mount's locks held for {after:?}"
    );
    drop((fb, fb2));
    drop(b);
}

/// Sends `sig` to a mount's process.
fn signal_mount(m: &Mount, sig: nix::sys::signal::Signal) {
    let pid = m.child.as_ref().unwrap().id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// A mount cut off (SIGSTOPped) for longer than its session expiry loses its locks:
/// another mount takes the lock and writes, and once the first mount is back every
/// read, write, fsync and lock request through the open file that held the lock
/// fails with EIO until it is closed, so its process cannot go on as if it still
/// held the lock; another open file of the same mount (which held a lock of its
/// own and gave it up before) reads the other mount's write, and a new open locks
/// and writes again.
#[test]
fn a_mount_cut_off_past_its_session_expiry_fails_io_through_files_whose_locks_it_lost() {
    let (_cluster, a, b) = two_mounts_with_short_sessions();
    fs::write(a.p("f"), vec![b'a'; 8192]).unwrap();
    let other = open_rw(&a.p("f"));
    // An open file that held a lock and gave it up before is not stopped later.
    for typ in [libc::F_RDLCK, libc::F_UNLCK] {
        let l = byte_range(typ, 200, 10);
        nix::fcntl::fcntl(&other, nix::fcntl::FcntlArg::F_OFD_SETLK(&l)).unwrap();
    }
    let locked = open_rw(&a.p("f"));
    setlk(&locked, libc::F_WRLCK, 0, 0).unwrap();
    let fb = open_rw(&b.p("f"));
    assert_eq!(
        setlk(&fb, libc::F_WRLCK, 0, 0),
        Err(nix::errno::Errno::EAGAIN)
    );

    // Mount a stopped past its session's expiry: b gets the lock and writes.
    signal_mount(&a, nix::sys::signal::Signal::SIGSTOP);
    until(
        || setlk(&fb, libc::F_WRLCK, 0, 0).is_ok(),
        "a stopped mount's lock was never released",
    );
    fb.write_all_at(&[b'b'; 100], 0).unwrap();
    setlk(&fb, libc::F_UNLCK, 0, 0).unwrap();

    // a goes on, finds its session ended and opens a new one.
    signal_mount(&a, nix::sys::signal::Signal::SIGCONT);
    until(
        || a.stderr().contains("new session open"),
        "mount a never opened a new session",
    );
    let eio = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(errno_of(&e), libc::EIO, "{what}: {e}");
    };
    let mut buf = vec![0u8; 8192];
    eio(
        locked.read_exact_at(&mut buf, 0),
        "a read through the open file that lost its lock",
    );
    other.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..100].iter().all(|x| *x == b'b'), "b's write not seen");
    assert!(buf[100..].iter().all(|x| *x == b'a'));
    eio(
        locked.write_all_at(b"late", 0),
        "a write through the open file that lost its lock",
    );
    eio(
        locked.sync_all(),
        "an fsync of the open file that lost its lock",
    );
    assert_eq!(
        setlk(&locked, libc::F_WRLCK, 0, 0),
        Err(nix::errno::Errno::EIO)
    );
    setlk(&locked, libc::F_UNLCK, 0, 0).unwrap();

    // Closed, and opened again: it locks and writes as before.
    drop((locked, other));
    let again = open_rw(&a.p("f"));
    setlk(&again, libc::F_WRLCK, 0, 0).unwrap();
    again.write_all_at(b"again", 0).unwrap();
    setlk(&again, libc::F_UNLCK, 0, 0).unwrap();
    drop(again);
    let mut seen = vec![0u8; 5];
    File::open(b.p("f"))
        .unwrap()
        .read_exact_at(&mut seen, 0)
        .unwrap();
    assert_eq!(&seen, b"again");
    drop(fb);
}

/// Runs `cmd` as user `nobody` (uid and gid 65534, no other groups).
fn as_nobody(cmd: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(cmd)
        .output()
        .unwrap()
}

fn run_ok(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// POSIX ACLs on a real mount, by `setfacl` and `getfacl`: a named user's entry
/// lets that user read a 0600 file (the kernel enforces it), the mask follows a
/// chmod, a directory's default ACL is inherited by new files and directories with
/// the mode asked for instead of the umask, another mount sees the ACLs and their
/// removal, and an ACL set by a caller outside the file's group drops set-gid.
///
/// Needs root and `setfacl` (Debian: `acl`; `.ci/run` installs it); skipped
/// without them, unless `DRS_POSIX_SUITE=1` makes that a failure.
#[test]
fn posix_acls_are_enforced_inherited_and_follow_the_mode() {
    let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let tools = ["setfacl", "getfacl"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !root || !tools {
        assert!(
            std::env::var("DRS_POSIX_SUITE").map_or(true, |v| v != "1"),
            "DRS_POSIX_SUITE=1 but {}",
            if root {
                "setfacl is not installed"
            } else {
                "not root"
            }
        );
        eprintln!("skipped: needs root and setfacl (apt-get install acl)");
        return;
    }
    let c = cluster(1024);
    let a = Mount::new(&c, "a", &["-o", "allow_other"]);
    let b = Mount::new(&c, "b", &["-o", "allow_other"]);
    for dir in [&c.dir, &a.path, &b.path] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let secret = a.p("secret");
    fs::write(&secret, b"for nobody").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!as_nobody(&["cat", s(&secret)]).status.success());

    // A named entry grants nobody reading; the group bits show the mask.
    run_ok(&["setfacl", "-m", "u:nobody:r", s(&secret)]);
    assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o777, 0o640);
    let acl = run_ok(&["getfacl", "-c", s(&secret)]);
    assert!(acl.contains("user:nobody:r--"), "{acl}");
    let read = as_nobody(&["cat", s(&secret)]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert_eq!(read.stdout, b"for nobody");
    // Another mount sees it and enforces it.
    assert!(run_ok(&["getfacl", "-c", s(&b.p("secret"))]).contains("user:nobody:r--"));
    assert!(as_nobody(&["cat", s(&b.p("secret"))]).status.success());
    // A chmod sets the mask: the named entry no longer grants anything.
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let acl = run_ok(&["getfacl", "-c", s(&secret)]);
    assert!(acl.contains("mask::---"), "{acl}");
    assert!(!as_nobody(&["cat", s(&secret)]).status.success());
    // Removed on a, it is gone on b once b's attributes time out (1 s).
    run_ok(&["setfacl", "-b", s(&secret)]);
    thread::sleep(Duration::from_millis(1500));
    let acl = run_ok(&["getfacl", "-c", s(&b.p("secret"))]);
    assert!(
        !acl.contains("nobody"),
        "b still shows a removed ACL: {acl}"
    );

    // An access ACL set by a caller outside the file's group drops the set-gid
    // bit, as a chmod by that caller would; set by a member of the group, the bit
    // stays (both as on a local file system).
    // A supplementary group counts (read from the process's /proc status).
    for (name, group, groups, kept) in [
        ("sgid-out", 0, "--clear-groups", false),
        ("sgid-in", 65534, "--clear-groups", true),
        ("sgid-supplementary", 0, "--groups=0", true),
    ] {
        let f = a.p(name);
        fs::write(&f, b"x").unwrap();
        std::os::unix::fs::chown(&f, Some(65534), Some(group)).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o2770)).unwrap();
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o2770);
        let set = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", groups])
            .args(["setfacl", "-m", "u:root:r", s(&f)])
            .output()
            .unwrap();
        assert!(
            set.status.success(),
            "{}",
            String::from_utf8_lossy(&set.stderr)
        );
        let mode = fs::metadata(&f).unwrap().mode() & 0o7777;
        assert_eq!(mode & 0o2000 != 0, kept, "{name}: mode {mode:o}");
        assert_eq!(mode & 0o777, 0o770, "{name}: mode {mode:o}");
    }

    // A directory's default ACL is inherited; the umask does not apply.
    let shared = a.p("shared");
    fs::create_dir(&shared).unwrap();
    run_ok(&["setfacl", "-m", "u:nobody:rwx", s(&shared)]);
    run_ok(&["setfacl", "-d", "-m", "u:nobody:rwx", s(&shared)]);
    let f = shared.join("f");
    let sub = shared.join("sub");
    run_ok(&[
        "sh",
        "-c",
        &format!("umask 077; echo hi > {}; mkdir {}", s(&f), s(&sub)),
    ]);
    assert_eq!(
        fs::metadata(&f).unwrap().mode() & 0o777,
        0o664,
        "666 masked by the ACL"
    );
    assert_eq!(fs::metadata(&sub).unwrap().mode() & 0o777, 0o775);
    assert!(run_ok(&["getfacl", "-c", s(&f)]).contains("user:nobody:rwx"));
    assert!(run_ok(&["getfacl", "-c", s(&sub)]).contains("default:user:nobody:rwx"));
    let append = as_nobody(&["sh", "-c", &format!("echo more >> {}", s(&f))]);
    assert!(
        append.status.success(),
        "{}",
        String::from_utf8_lossy(&append.stderr)
    );
    assert_eq!(fs::read(&f).unwrap(), b"hi\nmore\n");
    // Without a default ACL the umask applies as before.
    run_ok(&[
        "sh",
        "-c",
        &format!("umask 077; echo x > {}", s(&a.p("plain"))),
    ]);
    assert_eq!(fs::metadata(a.p("plain")).unwrap().mode() & 0o777, 0o600);
}
