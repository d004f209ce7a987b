//! The file system's logic without the kernel: two `drs_fuse::Ops` (as two mounts
//! would hold) over real node processes and the metadata service, called directly.
//! The same behaviours run through real FUSE mounts in `tests/cli/fuse.rs`; here they
//! run anywhere, with no `/dev/fuse`.

use std::sync::Arc;

use drs_fuse::{Ops, OpsConfig};
use drs_meta::fs::{Ino, Kind, SetAttr, ROOT};

use crate::common::*;

async fn mount(tc: &TestCluster) -> Arc<Ops> {
    drs_fuse::connect(&tc.local.map_path, OpsConfig::default())
        .await
        .expect("connect the file system")
}

async fn cluster(name: &str) -> TestCluster {
    TestCluster::with(
        name,
        Setup {
            blocks: 2048,
            meta_replicas: 3,
            ..Setup::default()
        },
    )
    .await
}

/// Creates a regular file and opens it (as create(2) does).
async fn create(ops: &Ops, parent: Ino, name: &[u8]) -> Ino {
    let a = ops
        .create_open(parent, name, 0o644, 0, 0, 0)
        .await
        .expect("create");
    a.ino
}

/// Writes `data` at `offset` in pieces of 32 KiB, as the kernel would.
async fn write(ops: &Ops, ino: Ino, offset: u64, data: &[u8]) {
    for (i, piece) in data.chunks(32 * 1024).enumerate() {
        let at = offset + (i * 32 * 1024) as u64;
        let n = ops.write(ino, at, piece).await.expect("write");
        assert_eq!(n, piece.len());
    }
}

/// Opens `ino`, reads its first 100 bytes and closes it.
async fn open_and_read(ops: &Ops, ino: Ino) -> Vec<u8> {
    ops.open(ino).await.expect("open");
    let got = ops.read(ino, 0, 100).await.expect("read");
    ops.release(ino).await.expect("close");
    got
}

/// Opens `ino`, reads all of it and closes it (what another mount sees now).
async fn open_read_all(ops: &Ops, ino: Ino) -> Vec<u8> {
    ops.open(ino).await.expect("open");
    let all = read_all(ops, ino).await;
    ops.release(ino).await.expect("close");
    all
}

async fn read_all(ops: &Ops, ino: Ino) -> Vec<u8> {
    let size = ops.getattr(ino).await.expect("getattr").size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let want = (size - out.len() as u64).min(1 << 20) as usize;
        let got = ops.read(ino, out.len() as u64, want).await.expect("read");
        assert!(!got.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&got);
    }
    out
}

/// Goal: the file system's operations keep POSIX semantics and close-to-open
/// consistency when called without the kernel, and give every block back.
///
/// Method: mounts `a` and `b`. `a` writes 100 KiB: it reads its own writes before
/// closing; `b` sees the file empty until `a` closes, then every byte. A write 1 MiB
/// further makes a hole that reads as zeros; truncating down and up again reads
/// zeros past the cut. Extended attributes set by `a` are read by `b`. A directory,
/// a rename into it and a listing. `a` unlinks the file it holds open: it still
/// reads it to the end, and its blocks come back at its last close. Finally every
/// name is removed and the free block count is back where it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_system_operations_without_the_kernel() {
    let tc = cluster("fsops").await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let free_at_start = a.statfs().await.expect("statfs").free;

    let f = create(&a, ROOT, b"f").await;
    let data = bytes(1, 100 * 1024);
    write(&a, f, 0, &data).await;
    assert!(read_all(&a, f).await == data, "a reads its own writes");
    assert_eq!(
        b.open(f).await.expect("open").size,
        0,
        "b sees it before a closes"
    );
    b.release(f).await.expect("release");
    a.release(f).await.expect("a's last close");
    b.open(f).await.expect("open");
    assert!(read_all(&b, f).await == data, "b reads what a closed");
    b.release(f).await.expect("release");

    // A hole, then truncate down and up.
    a.open(f).await.expect("open");
    let far = (1 << 20) + 10;
    write(&a, f, far, b"after the hole").await;
    a.release(f).await.expect("release");
    b.open(f).await.expect("open");
    let all = read_all(&b, f).await;
    assert_eq!(all.len() as u64, far + 14);
    assert!(
        all[100 * 1024..far as usize].iter().all(|x| *x == 0),
        "the hole"
    );
    assert_eq!(&all[far as usize..], b"after the hole");
    b.release(f).await.expect("release");
    for size in [5000u64, 20_000] {
        a.setattr(
            f,
            SetAttr {
                size: Some(size),
                ..SetAttr::default()
            },
        )
        .await
        .expect("truncate");
    }
    b.open(f).await.expect("open");
    let cut = read_all(&b, f).await;
    assert_eq!(cut.len(), 20_000);
    assert!(cut[..5000] == data[..5000], "kept below the cut");
    assert!(cut[5000..].iter().all(|x| *x == 0), "zeros past the cut");
    b.release(f).await.expect("release");

    // Extended attributes.
    a.setxattr(f, b"user.k".to_vec(), b"v".to_vec(), true, false)
        .await
        .expect("setxattr");
    assert_eq!(
        b.getxattr(f, b"user.k".to_vec()).await.expect("getxattr"),
        b"v"
    );
    assert_eq!(b.listxattr(f).await.expect("listxattr"), b"user.k\0");

    // Directories and rename.
    let d = a
        .create(ROOT, b"d", Kind::Dir, 0o755, 0, 0, 0, 0, b"")
        .await
        .expect("mkdir")
        .ino;
    a.rename(ROOT, b"f", d, b"g", false, false)
        .await
        .expect("rename");
    let names: Vec<Vec<u8>> = b
        .readdir(d)
        .await
        .expect("readdir")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"g".to_vec()]);

    // Unlinked while open by the mount holding it: still readable, freed at the
    // last close (across mounts:
    // `another_mounts_truncate_or_unlink_never_gives_an_open_files_blocks_away`).
    a.open(f).await.expect("open");
    a.unlink(d, b"g", false).await.expect("unlink");
    assert!(
        b.lookup(d, b"g").await.is_err(),
        "the name is gone for b too"
    );
    assert!(
        read_all(&a, f).await == cut,
        "an unlinked open file reads to the end"
    );
    a.release(f).await.expect("last close");
    b.unlink(ROOT, b"d", true).await.expect("rmdir");
    let free = a.statfs().await.expect("statfs").free;
    assert_eq!(free, free_at_start, "blocks leaked");
}

/// Goal: `fallocate` keeps the mount's own uncommitted writes, frees exactly the
/// whole blocks of a punched range, and refuses the modes it does not do.
///
/// Method: `a` writes 6 blocks and, before any close, punches from the middle of
/// block 1 to the middle of block 4; `b` reads the written bytes with zeros in the
/// punched range, and the volume has 2 more free blocks. Zeroing a range past the end
/// grows the file; a mode it does not do is `Unsupported`, a punch that would
/// change the size or a zero length `Invalid`. Asking for more blocks than are free
/// (more than one `Map` holds) is `NoSpace` and takes none; past the largest file
/// it is `TooLarge`. Blocks reserved past the end with `KEEP_SIZE` stay after the
/// last close of a mount that took blocks ahead. Removing the files gives every
/// block back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallocate_without_the_kernel() {
    let tc = TestCluster::with(
        "fsops-fallocate",
        Setup {
            blocks: 8192,
            meta_replicas: 3,
            ..Setup::default()
        },
    )
    .await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let free_at_start = a.statfs().await.expect("statfs").free;
    let bs = a.block_size();

    let f = create(&a, ROOT, b"f").await;
    let mut want = bytes(3, 6 * bs as usize);
    write(&a, f, 0, &want).await;
    let taken = free_at_start - a.statfs().await.expect("statfs").free;
    let (at, len) = (bs + bs / 2, 3 * bs);
    let (keep, punch, zero) = (
        libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_PUNCH_HOLE,
        libc::FALLOC_FL_ZERO_RANGE,
    );
    a.fallocate(f, at, len, punch | keep).await.expect("punch");
    want[at as usize..(at + len) as usize].fill(0);
    assert_eq!(
        free_at_start - a.statfs().await.expect("statfs").free,
        taken - 2,
        "blocks 2 and 3 freed, no other"
    );
    assert_eq!(a.getattr(f).await.expect("getattr").size, 6 * bs);
    assert!(read_all(&a, f).await == want, "a reads the hole");
    a.release(f).await.expect("close");
    b.open(f).await.expect("open");
    assert!(read_all(&b, f).await == want, "b reads the hole");

    b.fallocate(f, 6 * bs, 10, zero).await.expect("zero range");
    want.extend_from_slice(&[0u8; 10]);
    assert!(read_all(&b, f).await == want, "zeroed past the end");
    for (mode, len) in [(punch, bs), (punch | zero | keep, bs), (0, 0)] {
        assert!(
            matches!(
                b.fallocate(f, 0, len, mode).await,
                Err(drs_fuse::OpError::Fs(drs_meta::fs::FsError::Invalid))
            ),
            "mode {mode:#x}, length {len}"
        );
    }
    assert!(matches!(
        b.fallocate(f, 0, bs, libc::FALLOC_FL_COLLAPSE_RANGE).await,
        Err(drs_fuse::OpError::Unsupported(_))
    ));
    assert!(read_all(&b, f).await == want, "refusals changed nothing");

    // All or nothing: more than are free, in more than one Map's worth.
    let free = b.statfs().await.expect("statfs").free;
    assert!(free > drs_meta::fs::MAP_MAX, "{free} free blocks");
    assert!(matches!(
        b.fallocate(f, 0, (free + 10) * bs, 0).await,
        Err(drs_fuse::OpError::Fs(drs_meta::fs::FsError::NoSpace))
    ));
    assert_eq!(
        b.statfs().await.expect("statfs").free,
        free,
        "nothing taken"
    );
    assert!(matches!(
        b.fallocate(f, 1 << 60, 1 << 60, 0).await,
        Err(drs_fuse::OpError::Fs(drs_meta::fs::FsError::TooLarge))
    ));
    assert_eq!(
        b.statfs().await.expect("statfs").free,
        free,
        "nothing taken"
    );
    b.release(f).await.expect("close");
    b.unlink(ROOT, b"f", false).await.expect("unlink");

    // A writer at the end takes blocks ahead, then reserves 4 more far past the end:
    // its last close gives back neither.
    let g = create(&a, ROOT, b"g").await;
    write(&a, g, 0, &bytes(4, bs as usize)).await;
    a.fallocate(g, 100 * bs, 4 * bs, keep)
        .await
        .expect("reserve");
    a.release(g).await.expect("close");
    let held = b.getattr(g).await.expect("getattr").blocks;
    assert!(held >= 5, "{held} blocks held after the close");
    a.unlink(ROOT, b"g", false).await.expect("unlink");
    let free = a.statfs().await.expect("statfs").free;
    assert_eq!(free, free_at_start, "blocks leaked");
}

/// Goal: a last close that gives back blocks taken ahead never frees or hides a block
/// a new open of the same file in the same mount is reading or writing (the kernel
/// sends the last release in the background, so an application's next open can
/// overlap it).
///
/// Method: 25 rounds. Each creates a file and writes a few bytes near its start (the
/// write takes blocks ahead), flushes, then runs the last release together with an
/// open that reads those bytes and writes one block past the end. The read must see
/// the bytes; once every handle is closed, a second mount reads both writes; finally
/// every block is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_close_overlapping_the_next_open_loses_nothing() {
    let tc = cluster("fsops-reopen").await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let free_at_start = a.statfs().await.expect("statfs").free;
    let bs = a.block_size();
    for round in 0..25u8 {
        let name = format!("f{round}");
        let f = create(&a, ROOT, name.as_bytes()).await;
        write(&a, f, 1, b"data").await;
        a.flush(f).await.expect("flush");
        let later = bytes(u64::from(round), bs as usize);
        let (closed, got) = tokio::join!(a.release(f), async {
            a.open(f).await.expect("open");
            let got = a.read(f, 1, 4).await.expect("read");
            write(&a, f, 2 * bs, &later).await;
            got
        });
        closed.expect("the last close");
        assert_eq!(got, b"data", "round {round}: the reopened file's bytes");
        a.release(f).await.expect("close");
        let all = open_read_all(&b, f).await;
        assert_eq!(all.len() as u64, 3 * bs, "round {round}: size");
        assert!(&all[1..5] == b"data", "round {round}: the first write");
        assert!(
            all[2 * bs as usize..] == later,
            "round {round}: the later write"
        );
        a.unlink(ROOT, name.as_bytes(), false)
            .await
            .expect("unlink");
    }
    let free = a.statfs().await.expect("statfs").free;
    assert_eq!(free, free_at_start, "blocks leaked");
}

/// Goal: a new file costs a fixed number of metadata commands, whatever its size up
/// to what one `Map` takes ahead (`CreateOpen`, its first write's `Map`, the
/// `Written` of the close's flush, the release's `WrittenClose`), the blocks
/// taken ahead and not used come back, and a removal is one command
/// (`UnlinkDrop`) that frees the file's blocks.
///
/// Method: files of 100 bytes, 3 blocks and a bit, and 32 blocks, each created,
/// written, flushed and released, counting the mount's metadata commands. Every
/// file reads back, and the volume has as many free blocks fewer than at the start
/// as the files hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_costs_four_metadata_commands_and_gives_back_what_it_took_ahead() {
    let tc = cluster("fsops-commands").await;
    let a = mount(&tc).await;
    let bs = a.block_size();
    let bsz = bs as usize;
    let free_at_start = a.statfs().await.expect("statfs").free;
    let mut held = 0;
    let mut files = Vec::new();
    for (n, len) in [100, 3 * bsz + 100, 32 * bsz].into_iter().enumerate() {
        let name = format!("f{n}");
        let data = bytes(n as u64, len);
        let before = a.metadata_commands();
        let f = create(&a, ROOT, name.as_bytes()).await;
        write(&a, f, 0, &data).await;
        a.flush(f).await.expect("flush");
        a.release(f).await.expect("close");
        assert_eq!(
            a.metadata_commands() - before,
            4,
            "metadata commands for a file of {len} bytes"
        );
        held += (len as u64).div_ceil(bs);
        files.push((f, data));
    }
    // Read back after counting: a read sends an atime update in the background.
    for (f, data) in files {
        assert!(open_read_all(&a, f).await == data, "file {f} read back");
    }
    let free = a.statfs().await.expect("statfs").free;
    assert_eq!(
        free,
        free_at_start - held,
        "blocks taken and not given back"
    );
    // Removing a file is one command, which frees its blocks.
    let before = a.metadata_commands();
    a.unlink(ROOT, b"f2", false).await.expect("unlink");
    assert_eq!(
        a.metadata_commands() - before,
        1,
        "metadata commands for an unlink"
    );
    assert_eq!(
        a.statfs().await.expect("statfs").free,
        free + 32,
        "the removed file's blocks"
    );
}

/// Goal: a mount's last close gives back the blocks it took ahead, but not those
/// another mount with the file open has written into and not yet committed.
///
/// Method: `a` creates a file and writes 10 bytes (taking blocks ahead); `b` opens
/// it and writes three whole blocks after the first (into blocks `a` took); `a`
/// closes first, then `b`. A fresh read shows `a`'s bytes and every one of `b`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_close_keeps_the_blocks_another_mount_wrote_past_the_end() {
    let tc = cluster("fsops-trim").await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let bs = a.block_size();
    let f = create(&a, ROOT, b"f").await;
    write(&a, f, 0, b"0123456789").await;
    b.open(f).await.expect("open");
    let theirs = bytes(7, 3 * bs as usize);
    write(&b, f, bs, &theirs).await;
    a.release(f).await.expect("a's close");
    b.release(f).await.expect("b's close");
    let all = open_read_all(&a, f).await;
    assert_eq!(all.len() as u64, 4 * bs, "size");
    assert_eq!(&all[..10], b"0123456789");
    assert!(all[bs as usize..] == theirs, "b's blocks were lost");
}

/// Goal: writes of parts of blocks go through the mount's write-back cache: many
/// small writes to a block cost one write-back, the writer reads its own cached
/// bytes, another mount sees them after the close (close-to-open) and within about a
/// second without it, whole blocks bypass the cache, and `write_cache: false`
/// (`-o write_through`) caches nothing.
///
/// Method: `a` writes a block in 256 pieces of 256 bytes and a whole block after
/// it; 256 writes went to the cache, and the cache wrote back fewer than 16 times
/// (a write-through mount sends one update per write). `a` reads the pieces back
/// before closing. A second, still-open write is read by `b` after 3 s without any
/// close (the background write-back). After the close `b` reads every byte. A
/// write-through mount writing the same pieces caches none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_go_through_the_write_back_cache() {
    use std::sync::atomic::Ordering::Relaxed;
    let tc = cluster("fsops-cache").await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let bs = a.block_size() as usize;
    let f = create(&a, ROOT, b"f").await;
    let mut want = bytes(7, 2 * bs);
    let piece = bs / 256;
    for (i, p) in want[..bs].chunks(piece).enumerate() {
        a.write(f, (i * piece) as u64, p).await.expect("write");
    }
    a.write(f, bs as u64, &want[bs..])
        .await
        .expect("whole block");
    let stats = a.cache_stats();
    assert_eq!(stats.writes.load(Relaxed), 256, "writes the cache took");
    let backs = stats.write_backs.load(Relaxed);
    assert!(backs < 16, "{backs} write-backs for one block's 256 writes");
    assert!(read_all(&a, f).await == want, "a reads its cached writes");
    a.flush(f).await.expect("flush");
    assert!(open_read_all(&b, f).await == want, "b after a's flush");

    // Still open, not flushed: written back within about a second.
    a.write(f, 10, b"later").await.expect("write");
    want[10..15].copy_from_slice(b"later");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let got = b.read(f, 10, 5).await.expect("read");
    assert_eq!(got, b"later", "b reads a's cached write without a close");
    a.release(f).await.expect("close");
    assert!(open_read_all(&b, f).await == want, "b after a's close");
    assert_eq!(stats.failed.load(Relaxed), 0);

    let through = drs_fuse::connect(
        &tc.local.map_path,
        OpsConfig {
            write_cache: false,
            ..OpsConfig::default()
        },
    )
    .await
    .expect("connect");
    through.open(f).await.expect("open");
    for i in 0..8u8 {
        through
            .write(f, u64::from(i) * 100, &[i; 10])
            .await
            .expect("write");
        want[usize::from(i) * 100..usize::from(i) * 100 + 10].fill(i);
    }
    assert_eq!(through.cache_stats().writes.load(Relaxed), 0);
    through.release(f).await.expect("close");
    assert!(
        open_read_all(&b, f).await == want,
        "b after the write-through mount"
    );
}

/// Goal: a write that the cache took but could not write back is reported, by the
/// file's next flush (EIO), and its block is never shown with another file's old
/// bytes.
///
/// Method: file `g` fills 8 blocks and is removed (its blocks are free, their bytes
/// still on the nodes). `f` writes 100 bytes into each of its first 8 blocks (fresh
/// blocks: cached, zeros around the bytes). Three nodes (m + 1) are SIGKILLed before
/// the write-back: the background write-back fails, and the next flush reports it. The nodes return; a second mount reads `f`: no
/// byte of it is one of `g`'s (each block is whole and zero around the bytes, or all
/// zeros). The close after the nodes returned succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_back_is_reported_and_shows_no_old_bytes() {
    let tc = cluster("fsops-cache-fail").await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let bs = a.block_size() as usize;
    let g = create(&a, ROOT, b"g").await;
    let old = vec![0xeeu8; 8 * bs];
    write(&a, g, 0, &old).await;
    a.release(g).await.expect("close");
    a.unlink(ROOT, b"g", false).await.expect("unlink");

    let f = create(&a, ROOT, b"f").await;
    for i in 0..8 {
        a.write(f, (i * bs) as u64, &[7u8; 100])
            .await
            .expect("write");
    }
    for id in [3, 4, 5] {
        tc.kill(id);
    }
    // The background write-back (after about a second) fails first; the flush
    // finds nothing left to write back, and reports that failure.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let failures = a
        .cache_stats()
        .failed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(failures >= 1, "no background write-back failed");
    let flushed = a.flush(f).await;
    assert!(
        matches!(flushed, Err(drs_fuse::OpError::WriteBack(_))),
        "flush with m + 1 nodes down: {flushed:?}"
    );
    for id in [3, 4, 5] {
        tc.restart(id);
    }
    tc.wait_all_up().await;
    a.release(f).await.expect("close once the nodes are back");
    let all = open_read_all(&b, f).await;
    assert!(
        !all.contains(&0xee),
        "another file's old bytes show through a failed write-back"
    );
    for (i, block) in all.chunks(bs).enumerate() {
        let written = block[..100].iter().all(|x| *x == 7) && block[100..].iter().all(|x| *x == 0);
        let unwritten = block.iter().all(|x| *x == 0);
        assert!(
            written || unwritten,
            "block {i} is neither written nor zeros"
        );
    }
}

/// Goal: the absence of `security.capability`, which the kernel asks for before
/// every write, is remembered while a file is open, and never hides a capability
/// set through the same mount, or through another one before the next open.
///
/// Method: `a` opens a file and asks twice: absent. `a` sets it: read back. `a`
/// removes it: absent again. `b` sets it while `a` holds the file open; `a` opens
/// the file again and sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capability_absence_is_remembered_while_open_only() {
    let tc = cluster("fsops-caps").await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let cap = b"security.capability".to_vec();
    let absent = |r: Result<Vec<u8>, drs_fuse::OpError>| {
        matches!(
            r,
            Err(drs_fuse::OpError::Fs(drs_meta::fs::FsError::NoXattr))
        )
    };
    let f = create(&a, ROOT, b"f").await;
    for _ in 0..2 {
        assert!(absent(a.getxattr(f, cap.clone()).await));
    }
    a.setxattr(f, cap.clone(), b"caps".to_vec(), false, false)
        .await
        .expect("setxattr");
    assert_eq!(a.getxattr(f, cap.clone()).await.expect("getxattr"), b"caps");
    a.removexattr(f, cap.clone()).await.expect("removexattr");
    assert!(absent(a.getxattr(f, cap.clone()).await));
    b.setxattr(f, cap.clone(), b"other".to_vec(), false, false)
        .await
        .expect("setxattr in b");
    a.open(f).await.expect("open again");
    assert_eq!(
        a.getxattr(f, cap.clone()).await.expect("getxattr"),
        b"other"
    );
    a.release(f).await.expect("close");
    a.release(f).await.expect("close");
}

/// Goal: a read updates a file's atime by relatime's rule, without changing its
/// ctime, and a mount with `atime: false` (`-o noatime`) never does.
///
/// Method: `a` writes a file and closes it; `b` opens and reads it: the atime
/// becomes later than the mtime (the update runs in the background: polled for up to
/// 10 s), the ctime stays. Reading it again leaves the atime. A `noatime` mount reads
/// it after another write: the atime stays. The same for a directory's listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_update_the_atime_by_relatime() {
    let tc = cluster("fsops-atime").await;
    let (a, b) = (mount(&tc).await, mount(&tc).await);
    let f = create(&a, ROOT, b"f").await;
    write(&a, f, 0, b"read me").await;
    a.release(f).await.expect("close");
    let before = a.getattr(f).await.expect("getattr");
    assert!(before.atime <= before.mtime);

    assert_eq!(open_and_read(&b, f).await, b"read me");
    let started = std::time::Instant::now();
    let read = loop {
        let now = a.getattr(f).await.expect("getattr");
        if now.atime > now.mtime {
            break now;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "atime not updated after a read: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(read.ctime, before.ctime, "a read changed the ctime");
    open_and_read(&b, f).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        a.getattr(f).await.expect("getattr").atime,
        read.atime,
        "read again within a day: no update"
    );

    let quiet = drs_fuse::connect(
        &tc.local.map_path,
        OpsConfig {
            atime: false,
            ..OpsConfig::default()
        },
    )
    .await
    .expect("connect");
    a.open(f).await.expect("open");
    write(&a, f, 0, b"READ ME").await;
    a.release(f).await.expect("close");
    let written = a.getattr(f).await.expect("getattr");
    assert!(written.atime <= written.mtime);
    assert_eq!(open_and_read(&quiet, f).await, b"READ ME");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        a.getattr(f).await.expect("getattr").atime,
        written.atime,
        "a noatime mount changed the atime"
    );

    // Directories: a listing updates the atime the same way.
    let d = a
        .create(ROOT, b"d", Kind::Dir, 0o755, 0, 0, 0, 0, b"")
        .await
        .expect("mkdir")
        .ino;
    create(&a, d, b"inside").await;
    let made = a.getattr(d).await.expect("getattr");
    assert!(made.atime <= made.mtime);
    assert_eq!(quiet.readdir(d).await.expect("readdir").len(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        a.getattr(d).await.expect("getattr").atime,
        made.atime,
        "a noatime mount's listing changed the atime"
    );
    assert_eq!(b.readdir(d).await.expect("readdir").len(), 1);
    let started = std::time::Instant::now();
    loop {
        let now = a.getattr(d).await.expect("getattr");
        if now.atime > now.mtime {
            assert_eq!(now.ctime, made.ctime, "a listing changed the ctime");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "directory atime not updated after a listing: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Goal: file data written and read through the file system's operations survives
/// m = 2 storage nodes SIGKILLed mid-way, with no error.
///
/// Method: 2 MiB written; nodes 4 and 5 (not hosting metadata replicas) SIGKILLed;
/// 1 MiB more appended; a fresh mount reads all 3 MiB back exactly (degraded reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_data_survives_m_nodes_killed_without_the_kernel() {
    let tc = cluster("fsops-kill").await;
    let a = mount(&tc).await;
    let f = create(&a, ROOT, b"big").await;
    let mut data = bytes(2, 3 << 20);
    write(&a, f, 0, &data[..2 << 20]).await;
    a.flush(f).await.expect("flush");
    for id in [4, 5] {
        tc.kill(id);
    }
    write(&a, f, 2 << 20, &data[2 << 20..]).await;
    a.release(f).await.expect("close with two nodes down");
    let fresh = mount(&tc).await;
    fresh.open(f).await.expect("open");
    let back = read_all(&fresh, f).await;
    assert_eq!(back.len(), data.len());
    if back != data {
        let at = back
            .iter()
            .zip(&data)
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        data.truncate(0);
        panic!("first wrong byte at {at}");
    }
}

/// Free data blocks, as `statfs` reports them.
async fn free_blocks(ops: &Ops) -> u64 {
    ops.statfs().await.expect("statfs").free
}

/// Waits up to `within` for `ops`'s free blocks to become `want`.
async fn wait_free(ops: &Ops, want: u64, within: std::time::Duration, what: &str) {
    let started = std::time::Instant::now();
    loop {
        let free = free_blocks(ops).await;
        if free == want {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{what}: {free} blocks free after {within:?}, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Goal: another mount's truncate or unlink of a file this mount has open never
/// hands the file's blocks to another file while this mount may still use its map
/// of them: the other file's bytes survive this mount's writes through the old
/// map, an unlinked open file reads back whole, and the blocks come free once this
/// mount has refreshed its map or closed the file.
///
/// Method: mount A writes 4 whole blocks and keeps the file open; mount B truncates
/// it to 0 and writes a new file of 4 blocks (without the held blocks it would get
/// the freed ones), then A writes its file's block 1 at once (through its old map).
/// B's new file must read back exactly. After A's heartbeat refreshes its map, a
/// write by A must reach the file (B reads it). Then the same with an unlink: A
/// reads its unlinked file whole after B filled the volume's other blocks, and the
/// blocks come free at A's close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_mounts_truncate_or_unlink_never_gives_an_open_files_blocks_away() {
    let tc = TestCluster::with(
        "fsops-stale-maps",
        Setup {
            blocks: 64,
            meta_replicas: 3,
            ..Setup::default()
        },
    )
    .await;
    let a = mount(&tc).await;
    let b = mount(&tc).await;
    let bs = BS as u64;

    // Truncate.
    let x = create(&a, ROOT, b"x").await;
    write(&a, x, 0, &bytes(1, 4 * BS)).await;
    a.flush(x).await.expect("flush x");
    let free = free_blocks(&b).await;
    // With the blocks a took ahead of its writes.
    let x_blocks = b.getattr(x).await.expect("getattr").blocks;
    assert!(x_blocks >= 4);
    b.open(x).await.expect("b opens x");
    b.setattr(
        x,
        SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    )
    .await
    .expect("b truncates x");
    b.release(x).await.expect("b closes x");
    assert_eq!(free_blocks(&b).await, free, "x's blocks are held for a");
    let y = create(&b, ROOT, b"y").await;
    let y_data = bytes(2, 4 * BS);
    write(&b, y, 0, &y_data).await;
    b.release(y).await.expect("b closes y");
    // a still writes through its old map of x.
    write(&a, x, bs, &bytes(3, BS)).await;
    assert!(
        open_read_all(&b, y).await == y_data,
        "another mount's write through a stale map reached a new file's blocks"
    );
    // a's heartbeat refreshes its map and gives the held blocks back.
    let refreshed = free - 4 + x_blocks;
    wait_free(
        &b,
        refreshed,
        std::time::Duration::from_secs(10),
        "after a's refresh",
    )
    .await;
    let after = bytes(4, BS);
    write(&a, x, 0, &after).await;
    a.release(x).await.expect("a closes x");
    let back = open_read_all(&b, x).await;
    // (a commits the size it knew, 4 blocks: past block 0, holes.)
    assert_eq!(back.len(), 4 * BS);
    assert!(
        back[..BS] == after[..],
        "a's write after its refresh is lost"
    );
    assert!(
        back[2 * BS..].iter().all(|&x| x == 0),
        "truncated bytes came back"
    );

    // Unlink.
    let z = create(&a, ROOT, b"z").await;
    let z_data = bytes(5, 4 * BS);
    write(&a, z, 0, &z_data).await;
    a.flush(z).await.expect("flush z");
    let before = free_blocks(&b).await;
    let z_blocks = b.getattr(z).await.expect("getattr").blocks;
    b.unlink(ROOT, b"z", false).await.expect("b unlinks z");
    assert_eq!(
        free_blocks(&b).await,
        before,
        "an open file's blocks are kept"
    );
    let w = create(&b, ROOT, b"w").await;
    let w_data = bytes(6, before as usize * BS);
    write(&b, w, 0, &w_data).await;
    b.release(w).await.expect("b closes w");
    assert_eq!(free_blocks(&b).await, 0);
    assert!(
        read_all(&a, z).await == z_data,
        "an unlinked open file changed"
    );
    write(&a, z, 0, &bytes(7, 4 * BS)).await;
    a.release(z).await.expect("a closes z");
    assert!(
        open_read_all(&b, w).await == w_data,
        "a write to an unlinked open file reached another file"
    );
    wait_free(
        &b,
        z_blocks,
        std::time::Duration::from_secs(5),
        "after the last close of z",
    )
    .await;
}

/// Goal: the session of a mount that died ends after `--session-expiry-ms`, so an
/// unlinked file it had open is dropped and its blocks come free; a live mount whose
/// session was ended opens a new one and carries on with the files it has open,
/// while a file dropped meanwhile fails with EIO instead of showing other bytes.
///
/// Method: a cluster with a 3 s session expiry. Mount A opens a file and is dropped
/// without closing it (its heartbeats stop); B unlinks the file: its blocks stay
/// taken, then come free within the expiry plus a few seconds. Mount C has two files
/// open; its session is ended by hand (`EndSession`, as the leader does for a silent
/// mount) after the second was unlinked: C's next heartbeat opens a new session, the
/// first file still reads back exactly, the second fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_mounts_session_expires_and_a_live_one_resumes() {
    let tc = TestCluster::with(
        "fsops-sessions",
        Setup {
            blocks: 256,
            meta_replicas: 3,
            session_expiry_ms: Some(3000),
            ..Setup::default()
        },
    )
    .await;
    let b = mount(&tc).await;
    let free = free_blocks(&b).await;
    {
        let a = mount(&tc).await;
        let f = create(&a, ROOT, b"f").await;
        write(&a, f, 0, &bytes(1, 3 * BS)).await;
        a.flush(f).await.expect("flush");
        // a dies with f open.
    }
    b.unlink(ROOT, b"f", false).await.expect("unlink");
    assert!(
        free_blocks(&b).await < free,
        "the dead mount's open file was dropped at once"
    );
    wait_free(
        &b,
        free,
        std::time::Duration::from_secs(15),
        "after the dead mount's session expired",
    )
    .await;

    let c = mount(&tc).await;
    let keep = create(&c, ROOT, b"keep").await;
    let keep_data = bytes(2, 2 * BS + 100);
    write(&c, keep, 0, &keep_data).await;
    c.flush(keep).await.expect("flush keep");
    let gone = create(&c, ROOT, b"gone").await;
    write(&c, gone, 0, &bytes(3, BS)).await;
    c.flush(gone).await.expect("flush gone");
    b.unlink(ROOT, b"gone", false).await.expect("unlink gone");
    let old = c.session_id();
    let meta =
        drs_meta::MetaClient::for_map(&tc.local.map, &tc.local.key).expect("metadata client");
    meta.fs(drs_meta::fs::FsCommand::EndSession { session: old })
        .await
        .expect("end c's session")
        .expect("ended");
    let started = std::time::Instant::now();
    while c.session_id() == old {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "c never opened a new session"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        read_all(&c, keep).await == keep_data,
        "an open file after a new session"
    );
    assert!(
        matches!(c.read(gone, 0, BS).await, Err(drs_fuse::OpError::Lost)),
        "a file dropped while the session was ended must fail"
    );
    c.release(gone).await.ok();
    c.release(keep).await.expect("close keep");
}
