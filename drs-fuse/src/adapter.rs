//! The thin layer between the kernel (fuser) and [`Ops`]: each request runs as a task
//! on the tokio runtime and replies when done, so slow requests do not hold up others.
//! Nothing here decides file system behaviour; it converts types and errors.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drs_meta::fs::{Attr, DirEntry, Kind, SetAttr, Time};
use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::caller;
use crate::errno::errno;
use crate::ops::locks::LockRequest;
use crate::ops::{time_of, OpError, Ops};

/// How long the kernel may trust attributes and names without asking again.
const TTL: Duration = Duration::from_secs(1);

/// Entries whose attributes one `readdirplus` reads (a 32 KiB reply holds about 200).
const PLUS_CHUNK: usize = 256;
/// Largest write and readahead the kernel sends.
pub const MAX_IO: u32 = 1 << 20;

/// The fuser file system over [`Ops`].
pub struct DrsFuse {
    ops: Arc<Ops>,
    rt: tokio::runtime::Handle,
    next_fh: AtomicU64,
    /// Ask the kernel for its writeback cache (see [`crate::MountConfig`]).
    writeback_cache: bool,
    /// Open directories: the entries read at opendir (offsets index into it).
    dirs: Arc<Mutex<HashMap<u64, Arc<Listing>>>>,
    /// Notifications to the kernel, once the session is made (see
    /// [`DrsFuse::notifier_slot`]).
    notifier: Arc<OnceLock<Notifier>>,
    /// The kernel enforces POSIX ACLs and leaves the umask to the file system.
    acls: AtomicBool,
    /// Handles opened for writing with `O_APPEND`, given direct I/O: their appends
    /// go to the end of the file (see [`Ops::append`]).
    appending: Arc<Mutex<HashSet<u64>>>,
}

/// A directory as read at opendir: (inode, type, name), `.` and `..` first.
type Listing = Vec<(u64, FileType, Vec<u8>)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DrsFuse {
    pub fn new(ops: Arc<Ops>, rt: tokio::runtime::Handle, writeback_cache: bool) -> DrsFuse {
        DrsFuse {
            ops,
            rt,
            next_fh: AtomicU64::new(1),
            writeback_cache,
            dirs: Arc::new(Mutex::new(HashMap::new())),
            notifier: Arc::default(),
            acls: AtomicBool::new(false),
            appending: Arc::default(),
        }
    }

    /// How a new handle opened with `flags` is served, once opened: one opened
    /// for writing with `O_APPEND` gets direct I/O (no page cache, so the mount
    /// may put its appends elsewhere than the kernel thought), and is noted in
    /// `appending`. Not on a `writeback_cache` mount: pages other handles have not
    /// written back yet are past the end this mount knows, so there the kernel
    /// places appends by the size it holds (a documented limit across mounts).
    fn open_as(&self, flags: i32) -> impl FnOnce(u64) -> FopenFlags + Send + 'static {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let append = flags & libc::O_APPEND != 0 && writable && !self.writeback_cache;
        let appending = self.appending.clone();
        move |fh| {
            if append {
                lock(&appending).insert(fh);
                FopenFlags::FOPEN_DIRECT_IO
            } else {
                FopenFlags::empty()
            }
        }
    }

    /// Whether `name` is an ACL this mount may not set (its kernel does not
    /// enforce them).
    fn acl_refused(&self, name: &OsStr) -> bool {
        drs_meta::acl::is_acl(name.as_bytes()) && !self.acls.load(Ordering::Relaxed)
    }

    /// Where the mount puts the session's notifier, once it has the session.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// Runs operation `op` on the runtime, timing it for the metrics.
    fn spawn<F>(&self, op: &'static str, f: impl FnOnce(Arc<Ops>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let ops = self.ops.clone();
        let fut = f(ops.clone());
        self.rt.spawn(async move {
            let started = std::time::Instant::now();
            fut.await;
            drs_metrics::observe(ops.latencies(), op, started.elapsed());
        });
    }
}

fn fail(e: &OpError) -> Errno {
    if !matches!(
        e,
        OpError::Fs(_)
            | OpError::Unsupported(_)
            | OpError::Interrupted
            | OpError::Stale
            | OpError::Unmounting
            | OpError::NoData
    ) {
        tracing::warn!(error = %e, "operation failed");
    }
    Errno::from_i32(errno(e))
}

/// Has the kernel drop its cached pages and attributes of `ino` (on the blocking
/// pool: the kernel may wait for pages under reads in flight).
async fn drop_cached_pages(notifier: &Arc<OnceLock<Notifier>>, ino: INodeNo) {
    invalidate(notifier, ino, 0).await
}

/// Has the kernel drop its cached attributes of `ino` (no pages: nothing waits).
async fn drop_cached_attrs(notifier: &Arc<OnceLock<Notifier>>, ino: INodeNo) {
    invalidate(notifier, ino, -1).await
}

/// `FUSE_NOTIFY_INVAL_INODE` of `ino`: its attributes, and its pages from `offset`
/// on (none if negative).
async fn invalidate(notifier: &Arc<OnceLock<Notifier>>, ino: INodeNo, offset: i64) {
    let notifier = notifier.clone();
    let done = tokio::task::spawn_blocking(move || match notifier.get() {
        Some(n) => n.inval_inode(ino, offset, 0),
        None => Ok(()),
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        // The kernel has forgotten the inode: nothing is cached.
        Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Ok(Err(e)) => {
            tracing::warn!(ino = ino.0, error = %e, "cannot drop the kernel's cached pages")
        }
        Err(e) => tracing::warn!(error = %e, "the page invalidation task ended"),
    }
}

fn system_time(t: Time) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nanos))
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

/// The kind a `mknod` mode asks for.
fn kind_of_mode(mode: u32) -> Option<Kind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Some(Kind::File),
        libc::S_IFDIR => Some(Kind::Dir),
        libc::S_IFLNK => Some(Kind::Symlink),
        libc::S_IFIFO => Some(Kind::Fifo),
        libc::S_IFSOCK => Some(Kind::Socket),
        libc::S_IFCHR => Some(Kind::CharDev),
        libc::S_IFBLK => Some(Kind::BlockDev),
        _ => None,
    }
}

/// `a` as the kernel is given it, noted as given (see [`Ops::shown_to_kernel`]).
fn shown(ops: &Ops, a: &Attr) -> FileAttr {
    ops.shown_to_kernel(a);
    file_attr(a, ops.block_size())
}

fn file_attr(a: &Attr, block_size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks * block_size / 512,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: MAX_IO,
        flags: 0,
    }
}

fn when(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::SpecificTime(t) => time_of(t),
        TimeOrNow::Now => crate::ops::now(),
    }
}

/// The permission bits a process asked for, and its umask (applied by the
/// namespace: see `drs_meta::acl`). Where the kernel does not enforce ACLs, the
/// umask is applied here and none is sent, so nothing inherits an ACL past it.
fn perm_of(mode: u32, umask: u32, acls: bool) -> (u16, u16) {
    if acls {
        ((mode & 0o7777) as u16, (umask & 0o777) as u16)
    } else {
        ((mode & !umask & 0o7777) as u16, 0)
    }
}

impl Filesystem for DrsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        let mut flags = vec![
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            // Byte-range and flock locks go to the metadata service (ops::locks),
            // so they hold across mounts.
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
            // POSIX ACLs: the kernel enforces them; the namespace keeps them and
            // applies the umask itself (not where a default ACL is inherited).
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_DONT_MASK,
            // Listing a directory returns its entries' attributes (one metadata
            // query per reply), so `ls -l`, `find` or `rm -r` need no lookup per
            // name. Every listing, not only those the kernel sees lookups follow
            // (`FUSE_READDIRPLUS_AUTO`): `ls -l` reads a whole directory before
            // its first `lstat`.
            InitFlags::FUSE_DO_READDIRPLUS,
            // Shared mmap of a handle given direct I/O (an `O_APPEND` writer).
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ];
        if self.writeback_cache {
            flags.push(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        let mut refused = Vec::new();
        for flag in flags {
            if config.add_capabilities(flag).is_err() {
                tracing::info!(?flag, "the kernel does not offer this capability");
                refused.push(flag);
            }
        }
        // A kernel that would not enforce ACLs (or would apply the umask itself)
        // is not given any: their mode bits alone would then grant the mask's
        // rights to the owning group.
        let acls = !refused
            .iter()
            .any(|f| *f == InitFlags::FUSE_POSIX_ACL || *f == InitFlags::FUSE_DONT_MASK);
        self.acls.store(acls, Ordering::Relaxed);
        if !acls {
            tracing::warn!("POSIX ACLs are not supported by this kernel: setting one fails");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        self.spawn("lookup", |ops| async move {
            entry(reply, &ops, ops.lookup(parent.0, &name).await)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.spawn("getattr", |ops| async move {
            attr(
                reply,
                &ops,
                ops.getattr(ino.0).await.map_err(OpError::on_inode),
            )
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: atime.map(when),
            mtime: mtime.map(when),
        };
        self.spawn("setattr", |ops| async move {
            attr(
                reply,
                &ops,
                ops.setattr(ino.0, set).await.map_err(OpError::on_inode),
            )
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if position != 0 {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        if self.acl_refused(name) {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        let create = flags & libc::XATTR_CREATE != 0;
        let replace = flags & libc::XATTR_REPLACE != 0;
        // Who sets an access ACL decides whether the set-gid bit stays.
        let caller = (name == drs_meta::acl::ACCESS).then(|| caller::creds(req.pid(), req.gid()));
        self.spawn("setxattr", |ops| async move {
            empty(
                reply,
                ops.setxattr_as(ino.0, name, value, create, replace, caller.as_ref())
                    .await
                    .map_err(OpError::on_inode),
            )
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.spawn("getxattr", |ops| async move {
            xattr(
                reply,
                size,
                ops.getxattr(ino.0, name).await.map_err(OpError::on_inode),
            )
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn("listxattr", |ops| async move {
            xattr(
                reply,
                size,
                ops.listxattr(ino.0).await.map_err(OpError::on_inode),
            )
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if self.acl_refused(name) {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let name = name.as_bytes().to_vec();
        self.spawn("removexattr", |ops| async move {
            empty(
                reply,
                ops.removexattr(ino.0, name)
                    .await
                    .map_err(OpError::on_inode),
            )
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn("readlink", |ops| async move {
            data(reply, ops.readlink(ino.0).await.map_err(OpError::on_inode))
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = kind_of_mode(mode) else {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        };
        self.make(
            req,
            parent,
            name,
            kind,
            perm_of(mode, umask, self.acls.load(Ordering::Relaxed)),
            rdev,
            Vec::new(),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(
            req,
            parent,
            name,
            Kind::Dir,
            perm_of(mode, umask, self.acls.load(Ordering::Relaxed)),
            0,
            Vec::new(),
            reply,
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str().as_bytes().to_vec();
        self.make(
            req,
            parent,
            link_name,
            Kind::Symlink,
            (0o777, 0),
            0,
            target,
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn("unlink", |ops| async move {
            empty(reply, ops.unlink(parent.0, &name, false).await)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn("rmdir", |ops| async move {
            empty(reply, ops.unlink(parent.0, &name, true).await)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let name = name.as_bytes().to_vec();
        let newname = newname.as_bytes().to_vec();
        let bits = flags.bits();
        let noreplace = bits & libc::RENAME_NOREPLACE != 0;
        let exchange = bits & libc::RENAME_EXCHANGE != 0;
        if bits & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        self.spawn("rename", |ops| async move {
            let r = ops
                .rename(parent.0, &name, newparent.0, &newname, noreplace, exchange)
                .await;
            empty(reply, r)
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let name = newname.as_bytes().to_vec();
        self.spawn("link", |ops| async move {
            entry(reply, &ops, ops.link(ino.0, newparent.0, &name).await)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let notifier = self.notifier.clone();
        let fopen = self.open_as(flags.0);
        self.spawn("open", |ops| async move {
            // No FOPEN_KEEP_CACHE: each open drops the kernel's cached pages of the
            // file, so what other mounts closed is read afresh (close-to-open). So
            // are its attributes, if the kernel may hold a size or mtime read
            // before another mount changed the file: it would read only up to that
            // size until they time out.
            match ops.open(ino.0).await.map_err(OpError::on_inode) {
                Ok(a) => {
                    if ops.kernel_may_be_stale(&a) {
                        drop_cached_attrs(&notifier, ino).await;
                    }
                    reply.opened(FileHandle(fh), fopen(fh))
                }
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn("read", |ops| async move {
            let read = match ops.check_handle(fh.0) {
                Ok(()) => ops.read(ino.0, offset, size as usize).await,
                Err(e) => Err(e),
            };
            data(reply, read)
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        // The kernel puts an append at the size it holds, which may be older than
        // another mount's appends (it keeps attributes for their timeout): the
        // mount puts it at the end it knows instead.
        let append = flags.0 & libc::O_APPEND != 0 && lock(&self.appending).contains(&fh.0);
        let notifier = self.notifier.clone();
        self.spawn("write", |ops| async move {
            let done = match ops.check_handle(fh.0) {
                Ok(()) if append => match ops.append(ino.0, offset, &data).await {
                    // Put elsewhere than the kernel thought: the pages it holds of
                    // the file (other handles') and its size are not what it is.
                    Ok((n, at)) if at != offset => {
                        drop_cached_pages(&notifier, ino).await;
                        Ok(n)
                    }
                    r => r.map(|(n, _)| n),
                },
                Ok(()) => ops.write(ino.0, offset, &data).await,
                Err(e) => Err(e),
            };
            written(reply, done)
        });
    }

    /// No ioctl is a DRS file's (`lsattr`'s `FS_IOC_GETFLAGS`, say): ENOTTY, as a
    /// file system without them answers, and nothing logged.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // With the kernel's write-back cache, it may hold written pages (and a size)
        // the mount has not seen, and it asks without sending them first: ENOSYS,
        // and the kernel calls the whole file data from then on, which is never
        // wrong.
        if self.writeback_cache {
            reply.error(Errno::ENOSYS);
            return;
        }
        // The kernel does SEEK_SET, SEEK_CUR and SEEK_END itself.
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => {
                reply.error(Errno::from_i32(libc::EINVAL));
                return;
            }
        };
        let Ok(offset) = u64::try_from(offset) else {
            reply.error(Errno::from_i32(libc::ENXIO));
            return;
        };
        self.spawn("lseek", |ops| async move {
            match ops.seek(ino.0, offset, data).await {
                Ok(at) => reply.offset(i64::try_from(at).unwrap_or(i64::MAX)),
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if !flags.is_empty() {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        }
        self.spawn("copy_file_range", |ops| async move {
            let copied = match ops.check_handle(fh_in.0).and(ops.check_handle(fh_out.0)) {
                Ok(()) => {
                    ops.copy_range((ino_in.0, offset_in), (ino_out.0, offset_out), len)
                        .await
                }
                Err(e) => Err(e),
            };
            written(reply, copied)
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn("flush", |ops| async move {
            let flushed = ops.flush(ino.0).await;
            // A close drops the closing process's locks on the file, whatever the
            // flush did.
            let released = ops.release_locks(ino.0, lock_owner.0).await;
            empty(reply, flushed.and(released))
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.appending).remove(&fh.0);
        self.spawn("release", |ops| async move {
            // The open file's own locks: its `flock` (the kernel names its owner)
            // and open file description locks.
            // After the last writes are committed, for the next holder to read.
            let released = ops.release(ino.0).await;
            let flock = match lock_owner {
                Some(o) => ops.release_locks(ino.0, o.0).await,
                None => Ok(()),
            };
            let own = ops.release_handle(fh.0).await;
            empty(reply, released.and(flock).and(own))
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let r = LockRequest {
            ino: ino.0,
            fh: fh.0,
            owner: lock_owner.0,
            start,
            end,
            typ,
            pid,
        };
        self.spawn("getlk", |ops| async move {
            match ops.getlk(r).await {
                Ok(h) => reply.locked(h.start, h.end, h.typ, h.pid),
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let r = LockRequest {
            ino: ino.0,
            fh: fh.0,
            owner: lock_owner.0,
            start,
            end,
            typ,
            pid,
        };
        let waiter = req.pid();
        let notifier = self.notifier.clone();
        self.spawn("setlk", |ops| async move {
            let res = ops.setlk(r, sleep, waiter).await;
            if res.is_ok() && typ != libc::F_UNLCK {
                // The pages the kernel cached of the file may be older than what
                // the lock's last holder wrote.
                drop_cached_pages(&notifier, ino).await;
            }
            empty(reply, res)
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsync", |ops| async move {
            let synced = match ops.check_handle(fh.0) {
                Ok(()) => ops.fsync(ino.0).await,
                Err(e) => Err(e),
            };
            empty(reply, synced)
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.spawn("fallocate", |ops| async move {
            empty(reply, ops.fallocate(ino.0, offset, length, mode).await)
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let dirs = self.dirs.clone();
        self.spawn("opendir", |ops| async move {
            let listed = async {
                let parent = ops.lookup(ino.0, b"..").await?;
                let entries: Vec<DirEntry> = ops.readdir(ino.0).await?;
                let mut all = Vec::with_capacity(entries.len() + 2);
                all.push((ino.0, FileType::Directory, b".".to_vec()));
                all.push((parent.ino, FileType::Directory, b"..".to_vec()));
                all.extend(
                    entries
                        .into_iter()
                        .map(|e| (e.ino, file_type(e.kind), e.name)),
                );
                Ok::<_, OpError>(all)
            };
            match listed.await.map_err(OpError::on_inode) {
                Ok(all) => {
                    lock(&dirs).insert(fh, Arc::new(all));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::from_i32(libc::EBADF));
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(start) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    /// As `readdir`, with each entry's attributes, read when the kernel asks (it
    /// keeps them for the attribute timeout). Entries gone since the directory was
    /// opened are left out.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::from_i32(libc::EBADF));
            return;
        };
        let mut at = usize::try_from(offset).unwrap_or(usize::MAX);
        self.spawn("readdirplus", |ops| async move {
            let bs = ops.block_size();
            while at < entries.len() {
                // A reply of the kernel's size (a page, or up to max_pages pages)
                // may hold fewer entries than a chunk: the rest are read again for
                // the next reply (attributes kept between replies could miss this
                // mount's own changes made in between).
                let chunk = &entries[at..entries.len().min(at + PLUS_CHUNK)];
                let asked = chunk.iter().map(|(i, _, n)| (n.clone(), *i)).collect();
                let attrs = match ops.attrs(ino.0, asked).await {
                    Ok(a) => a,
                    Err(e) => return reply.error(fail(&e)),
                };
                let mut added = false;
                for (i, a) in attrs.iter().enumerate() {
                    let Some(a) = a else { continue };
                    let (entry, _, name) = &entries[at + i];
                    let attr = file_attr(a, bs);
                    let (offset, generation) = ((at + i + 1) as u64, Generation(a.generation));
                    if reply.add(
                        INodeNo(*entry),
                        offset,
                        OsStr::from_bytes(name),
                        &TTL,
                        &attr,
                        generation,
                    ) {
                        return reply.ok();
                    }
                    ops.shown_to_kernel(a);
                    added = true;
                }
                // An empty reply ends the listing: only when nothing is left.
                at += chunk.len();
                if added {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Namespace changes are committed through Raft before they are answered.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn("statfs", |ops| async move {
            match ops.statfs().await {
                Ok(s) => {
                    let files = s.files.max(1 << 20);
                    reply.statfs(
                        s.blocks,
                        s.free,
                        s.free,
                        files,
                        files - s.files.min(files),
                        s.block_size,
                        drs_meta::fs::NAME_MAX as u32,
                        s.block_size,
                    )
                }
                Err(e) => reply.error(fail(&e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let fopen = self.open_as(flags);
        let (perm, umask) = perm_of(mode, umask, self.acls.load(Ordering::Relaxed));
        self.spawn("create", |ops| async move {
            match ops
                .create_open(parent.0, &name, perm, umask, uid, gid)
                .await
            {
                Ok(a) => reply.created(
                    &TTL,
                    &shown(&ops, &a),
                    Generation(a.generation),
                    FileHandle(fh),
                    fopen(fh),
                ),
                Err(e) => reply.error(fail(&e)),
            }
        });
    }
}

impl DrsFuse {
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: Kind,
        (perm, umask): (u16, u16),
        rdev: u32,
        target: Vec<u8>,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("make_node", |ops| async move {
            let r = ops
                .create(parent.0, &name, kind, perm, umask, uid, gid, rdev, &target)
                .await;
            entry(reply, &ops, r)
        });
    }
}

fn entry(reply: ReplyEntry, ops: &Ops, r: Result<Attr, OpError>) {
    match r {
        Ok(a) => reply.entry(&TTL, &shown(ops, &a), Generation(a.generation)),
        Err(e) => reply.error(fail(&e)),
    }
}

fn attr(reply: ReplyAttr, ops: &Ops, r: Result<Attr, OpError>) {
    match r {
        Ok(a) => reply.attr(&TTL, &shown(ops, &a)),
        Err(e) => reply.error(fail(&e)),
    }
}

fn data(reply: ReplyData, r: Result<Vec<u8>, OpError>) {
    match r {
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(fail(&e)),
    }
}

/// An extended attribute's value or list: its size when asked for the size (`size`
/// 0), the bytes when they fit, ERANGE when they do not.
fn xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, OpError>) {
    match r {
        Ok(d) if size == 0 => reply.size(u32::try_from(d.len()).unwrap_or(u32::MAX)),
        Ok(d) if d.len() <= size as usize => reply.data(&d),
        Ok(_) => reply.error(Errno::from_i32(libc::ERANGE)),
        Err(e) => reply.error(fail(&e)),
    }
}

fn written(reply: ReplyWrite, r: Result<usize, OpError>) {
    match r {
        Ok(n) => reply.written(u32::try_from(n).unwrap_or(u32::MAX)),
        Err(e) => reply.error(fail(&e)),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), OpError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(fail(&e)),
    }
}
