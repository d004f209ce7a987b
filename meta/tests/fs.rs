//! The file system namespace state machine (`drs_meta::fs`): the POSIX rules one by
//! one, block allocation and freeing, timestamps, the postcard round trip and
//! `SharedFs`, and a property over random command sequences checked after every step
//! against the invariants, the "a refusal changes nothing" rule and a naive model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use drs_meta::fs::{
    Attr, BlockRange, DirEntry, Extent, FsCommand, FsError, FsQuery, FsReply, FsState, FsStats,
    Ino, Kind, Mapping, SetAttr, SharedFs, Time, AHEAD_SHARE, MAP_MAX, NAME_MAX, READDIR_MAX, ROOT,
    SYMLINK_MAX,
};
use proptest::prelude::*;

const BS: u32 = 4096;
const BSZ: u64 = BS as u64;
const TARGET: &[u8] = b"target";

// ---------------------------------------------------------------------------------
// Helpers (public API only).
// ---------------------------------------------------------------------------------

fn t(secs: i64) -> Time {
    Time { secs, nanos: 0 }
}

fn format_cmd(blocks: u64) -> FsCommand {
    FsCommand::Format {
        blocks,
        block_size: BS,
        uid: 0,
        gid: 0,
        now: t(1),
    }
}

fn formatted(blocks: u64) -> FsState {
    let mut fs = FsState::default();
    let root = ok_attr(fs.apply(&format_cmd(blocks)), "format");
    assert_eq!(root.ino, ROOT);
    assert_eq!(root.kind, Kind::Dir);
    assert_eq!(root.nlink, 2);
    assert_eq!(root.ctime, t(1));
    fs.check().unwrap();
    fs
}

fn create_cmd(parent: Ino, name: &[u8], kind: Kind, now: Time) -> FsCommand {
    FsCommand::Create {
        parent,
        name: name.to_vec(),
        kind,
        perm: 0o644,
        uid: 1000,
        gid: 100,
        rdev: 0,
        target: if kind == Kind::Symlink {
            TARGET.to_vec()
        } else {
            Vec::new()
        },
        now,
    }
}

fn link_cmd(ino: Ino, parent: Ino, name: &[u8], now: Time) -> FsCommand {
    FsCommand::Link {
        ino,
        parent,
        name: name.to_vec(),
        now,
    }
}

fn unlink_cmd(parent: Ino, name: &[u8], dir: bool, now: Time) -> FsCommand {
    FsCommand::Unlink {
        parent,
        name: name.to_vec(),
        dir,
        now,
    }
}

fn rename_cmd(
    parent: Ino,
    name: &[u8],
    new_parent: Ino,
    new_name: &[u8],
    noreplace: bool,
    exchange: bool,
    now: Time,
) -> FsCommand {
    FsCommand::Rename {
        parent,
        name: name.to_vec(),
        new_parent,
        new_name: new_name.to_vec(),
        noreplace,
        exchange,
        now,
    }
}

/// A plain rename (no flags).
fn mv(parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], now: Time) -> FsCommand {
    rename_cmd(parent, name, new_parent, new_name, false, false, now)
}

fn size_cmd(ino: Ino, size: u64, now: Time) -> FsCommand {
    FsCommand::SetAttr {
        ino,
        set: SetAttr {
            size: Some(size),
            ..SetAttr::default()
        },
        now,
    }
}

/// A `Map` of `count` blocks from `first`, nothing ahead.
fn map_cmd(ino: Ino, first: u64, count: u64) -> FsCommand {
    map_ahead_cmd(ino, first, count, 0)
}

fn map_ahead_cmd(ino: Ino, first: u64, count: u64, ahead: u64) -> FsCommand {
    FsCommand::Map {
        ino,
        first,
        count,
        ahead,
    }
}

/// A `Written` naming the file block runs `(first, count)` of `written`.
fn written_cmd(ino: Ino, size: u64, now: Time, written: &[(u64, u64)], trim: bool) -> FsCommand {
    FsCommand::Written {
        ino,
        size,
        now,
        written: written
            .iter()
            .map(|&(first, count)| BlockRange { first, count })
            .collect(),
        trim,
    }
}

fn ok_attr(r: Result<FsReply, FsError>, what: &str) -> Attr {
    match r {
        Ok(FsReply::Attr(a)) => a,
        other => panic!("{what}: expected an Attr, got {other:?}"),
    }
}

/// Applies a command that must succeed; checks the invariants after.
fn apply_ok(fs: &mut FsState, cmd: &FsCommand) -> FsReply {
    let r = fs.apply(cmd);
    fs.check()
        .unwrap_or_else(|e| panic!("after {cmd:?}: invariant broken: {e}"));
    r.unwrap_or_else(|e| panic!("{cmd:?} refused: {e:?}"))
}

/// Applies a command that must be refused with `want`, changing nothing.
fn refused(fs: &mut FsState, cmd: &FsCommand, want: FsError) {
    let before = fs.clone();
    assert_eq!(fs.apply(cmd), Err(want), "{cmd:?}");
    assert_eq!(*fs, before, "the refused {cmd:?} changed the state");
    fs.check().unwrap();
}

fn create(fs: &mut FsState, parent: Ino, name: &[u8], kind: Kind, now: Time) -> Ino {
    let cmd = create_cmd(parent, name, kind, now);
    let a = ok_attr(Ok(apply_ok(fs, &cmd)), "create");
    a.ino
}

fn create_attr(fs: &mut FsState, parent: Ino, name: &[u8], kind: Kind, now: Time) -> Attr {
    let ino = create(fs, parent, name, kind, now);
    attr(fs, ino)
}

fn attr(fs: &FsState, ino: Ino) -> Attr {
    ok_attr(fs.query(&FsQuery::GetAttr { ino }), "getattr")
}

fn lookup(fs: &FsState, parent: Ino, name: &[u8]) -> Result<Ino, FsError> {
    match fs.query(&FsQuery::Lookup {
        parent,
        name: name.to_vec(),
    }) {
        Ok(FsReply::Attr(a)) => Ok(a.ino),
        Err(e) => Err(e),
        other => panic!("lookup: {other:?}"),
    }
}

/// Every entry of a directory, following `ReadDir`'s pages (each strictly after the
/// cursor, in name order).
fn read_dir(fs: &FsState, ino: Ino) -> Vec<DirEntry> {
    let mut out: Vec<DirEntry> = Vec::new();
    for _ in 0..1000 {
        let after = out.last().map(|e| e.name.clone());
        match fs.query(&FsQuery::ReadDir {
            ino,
            after: after.clone(),
        }) {
            Ok(FsReply::Entries(page)) => {
                assert!(page.len() <= READDIR_MAX);
                if page.is_empty() {
                    return out;
                }
                let mut last = after;
                for e in &page {
                    assert!(
                        last.as_ref().is_none_or(|l| *l < e.name),
                        "readdir {ino}: {:?} after {last:?}",
                        e.name
                    );
                    last = Some(e.name.clone());
                }
                out.extend(page);
            }
            other => panic!("readdir {ino}: {other:?}"),
        }
    }
    panic!("readdir {ino}: no end");
}

/// The answer to `Extents` of a file's first `MAP_MAX` file blocks.
fn try_extents(fs: &FsState, ino: Ino) -> Result<FsReply, FsError> {
    fs.query(&FsQuery::Extents {
        ino,
        first: 0,
        count: MAP_MAX,
    })
}

/// The mapped blocks of a file's first `MAP_MAX` file blocks.
fn extents(fs: &FsState, ino: Ino) -> Vec<Mapping> {
    match try_extents(fs, ino) {
        Ok(FsReply::Mapped(m)) => m,
        other => panic!("extents {ino}: {other:?}"),
    }
}

/// The property tests' settings: 256 cases, and the minimal failing input printed
/// instead of a regressions file written.
fn property_config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn lbas(fs: &FsState, ino: Ino) -> Vec<u64> {
    extents(fs, ino).iter().map(|m| m.lba).collect()
}

fn map(fs: &mut FsState, ino: Ino, first: u64, count: u64) -> Result<Vec<Mapping>, FsError> {
    map_ahead(fs, ino, first, count, 0)
}

fn map_ahead(
    fs: &mut FsState,
    ino: Ino,
    first: u64,
    count: u64,
    ahead: u64,
) -> Result<Vec<Mapping>, FsError> {
    let before = fs.clone();
    let r = fs.apply(&map_ahead_cmd(ino, first, count, ahead));
    fs.check().unwrap();
    match r {
        Ok(FsReply::Mapped(m)) => Ok(m),
        Err(e) => {
            assert_eq!(*fs, before, "the refused Map changed the state");
            Err(e)
        }
        other => panic!("map: {other:?}"),
    }
}

/// Applies a `Written` that must succeed; its answer.
fn written(
    fs: &mut FsState,
    ino: Ino,
    size: u64,
    now: Time,
    ranges: &[(u64, u64)],
    trim: bool,
) -> Attr {
    let cmd = written_cmd(ino, size, now, ranges, trim);
    ok_attr(Ok(apply_ok(fs, &cmd)), "written")
}

/// The file blocks of `ino` that are unwritten, as `Extents` reports them.
fn fresh_blocks(fs: &FsState, ino: Ino) -> Vec<u64> {
    extents(fs, ino)
        .iter()
        .filter(|m| m.fresh)
        .map(|m| m.block)
        .collect()
}

fn statfs(fs: &FsState) -> FsStats {
    match fs.query(&FsQuery::StatFs) {
        Ok(FsReply::StatFs(s)) => s,
        other => panic!("statfs: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------
// Formatting, statfs.
// ---------------------------------------------------------------------------------

#[test]
fn unformatted_refuses_everything_and_format_once() {
    let mut fs = FsState::default();
    fs.check().unwrap();
    assert_eq!(fs.query(&FsQuery::StatFs), Err(FsError::NotFormatted));
    assert_eq!(
        fs.query(&FsQuery::GetAttr { ino: ROOT }),
        Err(FsError::NotFormatted)
    );
    refused(
        &mut fs,
        &create_cmd(ROOT, b"a", Kind::File, t(2)),
        FsError::NotFormatted,
    );
    refused(&mut fs, &map_cmd(ROOT, 0, 1), FsError::NotFormatted);
    let mut zero = format_cmd(0);
    refused(&mut fs, &zero, FsError::Invalid);
    if let FsCommand::Format {
        blocks, block_size, ..
    } = &mut zero
    {
        *blocks = 8;
        *block_size = 0;
    }
    refused(&mut fs, &zero, FsError::Invalid);

    apply_ok(&mut fs, &format_cmd(64));
    refused(&mut fs, &format_cmd(64), FsError::Exists);
    refused(&mut fs, &format_cmd(128), FsError::Exists);
    assert_eq!(
        statfs(&fs),
        FsStats {
            block_size: BS,
            blocks: 64,
            free: 64,
            files: 1,
            mounts: 0,
            held: 0,
        }
    );
    // The root's "." and ".." are the root.
    assert_eq!(lookup(&fs, ROOT, b"."), Ok(ROOT));
    assert_eq!(lookup(&fs, ROOT, b".."), Ok(ROOT));
    assert!(read_dir(&fs, ROOT).is_empty());
}

#[test]
fn statfs_counts_blocks_free_and_files() {
    let mut fs = formatted(64);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let f = create(&mut fs, d, b"f", Kind::File, t(3));
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(4));
    create(&mut fs, ROOT, b"s", Kind::Symlink, t(5));
    assert_eq!(
        statfs(&fs),
        FsStats {
            block_size: BS,
            blocks: 64,
            free: 64,
            files: 5,
            mounts: 0,
            held: 0,
        }
    );
    map(&mut fs, f, 0, 5).unwrap();
    map(&mut fs, g, 10, 3).unwrap();
    assert_eq!(statfs(&fs).free, 56);
    assert_eq!(attr(&fs, f).blocks, 5);
    assert_eq!(attr(&fs, g).blocks, 3);
    // A hard link is no new file; an orphan still counts until dropped.
    apply_ok(&mut fs, &link_cmd(f, ROOT, b"f2", t(6)));
    assert_eq!(statfs(&fs).files, 5);
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"g", false, t(7)));
    assert_eq!(statfs(&fs).files, 5);
    assert_eq!(statfs(&fs).free, 56);
    apply_ok(&mut fs, &FsCommand::Drop { ino: g });
    assert_eq!(statfs(&fs).files, 4);
    assert_eq!(statfs(&fs).free, 59);
    assert_eq!(fs.inode_count(), 4);
}

// ---------------------------------------------------------------------------------
// Names.
// ---------------------------------------------------------------------------------

#[test]
fn bad_names_are_refused_everywhere() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let long = vec![b'x'; NAME_MAX + 1];
    let bad: [(&[u8], FsError); 8] = [
        (b"", FsError::Invalid),
        (b".", FsError::Invalid),
        (b"..", FsError::Invalid),
        (b"a/b", FsError::Invalid),
        (b"/", FsError::Invalid),
        (b"a\0b", FsError::Invalid),
        (b"\0", FsError::Invalid),
        (&long, FsError::NameTooLong),
    ];
    for (name, err) in bad {
        for kind in [Kind::File, Kind::Dir, Kind::Symlink, Kind::Fifo] {
            refused(&mut fs, &create_cmd(ROOT, name, kind, t(3)), err);
        }
        refused(&mut fs, &link_cmd(f, d, name, t(3)), err);
        refused(&mut fs, &unlink_cmd(ROOT, name, false, t(3)), err);
        refused(&mut fs, &unlink_cmd(ROOT, name, true, t(3)), err);
        refused(&mut fs, &mv(ROOT, b"f", d, name, t(3)), err);
        refused(&mut fs, &mv(ROOT, name, d, b"g", t(3)), err);
        refused(
            &mut fs,
            &rename_cmd(ROOT, b"f", ROOT, name, false, true, t(3)),
            err,
        );
    }
    // 255 bytes is fine, for every operation.
    let max = vec![b'y'; NAME_MAX];
    let e = create(&mut fs, ROOT, &max, Kind::File, t(4));
    assert_eq!(lookup(&fs, ROOT, &max), Ok(e));
    apply_ok(&mut fs, &link_cmd(f, d, &max, t(5)));
    assert_eq!(lookup(&fs, d, &max), Ok(f));
    apply_ok(&mut fs, &unlink_cmd(d, &max, false, t(6)));
    apply_ok(&mut fs, &mv(ROOT, &max, d, &max, t(7)));
    assert_eq!(lookup(&fs, d, &max), Ok(e));
    assert_eq!(lookup(&fs, ROOT, &max), Err(FsError::NotFound));
    // Looking up a name longer than any entry may have is ENAMETOOLONG, not ENOENT.
    assert_eq!(lookup(&fs, ROOT, &long), Err(FsError::NameTooLong));
    assert_eq!(lookup(&fs, d, &long), Err(FsError::NameTooLong));
}

#[test]
fn symlink_targets() {
    let mut fs = formatted(8);
    let s = create(&mut fs, ROOT, b"s", Kind::Symlink, t(2));
    assert_eq!(
        fs.query(&FsQuery::ReadLink { ino: s }),
        Ok(FsReply::Target(TARGET.to_vec()))
    );
    assert_eq!(attr(&fs, s).size, TARGET.len() as u64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    assert_eq!(
        fs.query(&FsQuery::ReadLink { ino: f }),
        Err(FsError::Invalid)
    );
    let with_target = |target: Vec<u8>| FsCommand::Create {
        parent: ROOT,
        name: b"t".to_vec(),
        kind: Kind::Symlink,
        perm: 0o777,
        uid: 0,
        gid: 0,
        rdev: 0,
        target,
        now: t(3),
    };
    refused(&mut fs, &with_target(Vec::new()), FsError::NotFound);
    refused(
        &mut fs,
        &with_target(vec![b'a'; SYMLINK_MAX + 1]),
        FsError::NameTooLong,
    );
    let a = ok_attr(
        Ok(apply_ok(&mut fs, &with_target(vec![b'a'; SYMLINK_MAX]))),
        "symlink",
    );
    assert_eq!(a.size, SYMLINK_MAX as u64);
    // Symlinks hold no blocks and take no size changes.
    refused(&mut fs, &map_cmd(s, 0, 1), FsError::Invalid);
    refused(&mut fs, &size_cmd(s, 0, t(4)), FsError::Invalid);
}

// ---------------------------------------------------------------------------------
// Create, link, unlink, drop.
// ---------------------------------------------------------------------------------

#[test]
fn create_sets_attributes_and_refuses_duplicates() {
    let mut fs = formatted(8);
    let cmd = FsCommand::Create {
        parent: ROOT,
        name: b"c".to_vec(),
        kind: Kind::CharDev,
        perm: 0o170_644,
        uid: 7,
        gid: 8,
        rdev: 0x0501,
        target: Vec::new(),
        now: t(9),
    };
    let a = ok_attr(Ok(apply_ok(&mut fs, &cmd)), "mknod");
    assert_eq!(a.kind, Kind::CharDev);
    assert_eq!(a.perm, 0o644, "perm keeps only 07777");
    assert_eq!((a.uid, a.gid, a.rdev), (7, 8, 0x0501));
    assert_eq!((a.nlink, a.size, a.blocks, a.generation), (1, 0, 0, 1));
    assert_eq!((a.atime, a.mtime, a.ctime), (t(9), t(9), t(9)));
    assert_eq!(attr(&fs, a.ino), a);
    for kind in [Kind::File, Kind::Dir, Kind::Symlink] {
        refused(
            &mut fs,
            &create_cmd(ROOT, b"c", kind, t(10)),
            FsError::Exists,
        );
    }
    // Creating inside a non-directory, or a missing one.
    refused(
        &mut fs,
        &create_cmd(a.ino, b"x", Kind::File, t(10)),
        FsError::NotDir,
    );
    refused(
        &mut fs,
        &create_cmd(999, b"x", Kind::File, t(10)),
        FsError::NotFound,
    );
    // A directory starts with nlink 2 and adds one to its parent.
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(11));
    assert_eq!(attr(&fs, d).nlink, 2);
    assert_eq!(attr(&fs, ROOT).nlink, 3);
    assert_eq!(lookup(&fs, d, b".."), Ok(ROOT));
    assert_eq!(lookup(&fs, d, b"."), Ok(d));
    let names: Vec<(Vec<u8>, Ino, Kind)> = read_dir(&fs, ROOT)
        .into_iter()
        .map(|e| (e.name, e.ino, e.kind))
        .collect();
    assert_eq!(
        names,
        vec![
            (b"c".to_vec(), a.ino, Kind::CharDev),
            (b"d".to_vec(), d, Kind::Dir)
        ]
    );
}

#[test]
fn set_gid_directories_pass_on_their_group() {
    let mut fs = formatted(8);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    apply_ok(
        &mut fs,
        &FsCommand::SetAttr {
            ino: d,
            set: SetAttr {
                perm: Some(0o2775),
                gid: Some(50),
                ..SetAttr::default()
            },
            now: t(3),
        },
    );
    let f = create_attr(&mut fs, d, b"f", Kind::File, t(4));
    assert_eq!((f.gid, f.perm), (50, 0o644));
    let s = create_attr(&mut fs, d, b"s", Kind::Dir, t(4));
    assert_eq!((s.gid, s.perm), (50, 0o2644));
    // And on down.
    let g = create_attr(&mut fs, s.ino, b"g", Kind::Fifo, t(5));
    assert_eq!((g.gid, g.perm), (50, 0o644));
    // Not elsewhere.
    let r = create_attr(&mut fs, ROOT, b"r", Kind::Dir, t(6));
    assert_eq!((r.gid, r.perm), (100, 0o644));
}

#[test]
fn inode_numbers_are_never_reused() {
    let mut fs = formatted(8);
    let a = create(&mut fs, ROOT, b"a", Kind::File, t(2));
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"a", false, t(3)));
    apply_ok(&mut fs, &FsCommand::Drop { ino: a });
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(4));
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"d", true, t(5)));
    let b = create(&mut fs, ROOT, b"a", Kind::File, t(6));
    assert!(a < d && d < b, "{a} {d} {b}");
    assert_eq!(attr(&fs, b).generation, 1);
}

#[test]
fn link_rules() {
    let mut fs = formatted(8);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let s = create(&mut fs, ROOT, b"s", Kind::Symlink, t(2));
    refused(
        &mut fs,
        &link_cmd(d, ROOT, b"d2", t(3)),
        FsError::NotPermitted,
    );
    refused(
        &mut fs,
        &link_cmd(ROOT, d, b"r", t(3)),
        FsError::NotPermitted,
    );
    refused(&mut fs, &link_cmd(f, ROOT, b"s", t(3)), FsError::Exists);
    refused(&mut fs, &link_cmd(f, f, b"x", t(3)), FsError::NotDir);
    refused(&mut fs, &link_cmd(f, 999, b"x", t(3)), FsError::NotFound);
    refused(&mut fs, &link_cmd(999, ROOT, b"x", t(3)), FsError::NotFound);
    let a = ok_attr(Ok(apply_ok(&mut fs, &link_cmd(f, d, b"g", t(4)))), "link");
    assert_eq!((a.ino, a.nlink), (f, 2));
    apply_ok(&mut fs, &link_cmd(s, d, b"s2", t(4)));
    assert_eq!(attr(&fs, s).nlink, 2);
    assert_eq!(lookup(&fs, d, b"g"), Ok(f));
    // Hard links do not count as subdirectories.
    assert_eq!(attr(&fs, d).nlink, 2);
    assert_eq!(attr(&fs, ROOT).nlink, 3);
}

#[test]
fn unlink_last_name_orphans_until_drop_frees_blocks() {
    let mut fs = formatted(64);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    map(&mut fs, f, 0, 10).unwrap();
    let held = lbas(&fs, f);
    assert_eq!(statfs(&fs).free, 54);
    apply_ok(&mut fs, &link_cmd(f, d, b"g", t(3)));

    refused(
        &mut fs,
        &unlink_cmd(ROOT, b"f", true, t(4)),
        FsError::NotDir,
    );
    refused(
        &mut fs,
        &unlink_cmd(ROOT, b"nope", false, t(4)),
        FsError::NotFound,
    );
    refused(&mut fs, &unlink_cmd(f, b"x", false, t(4)), FsError::NotDir);
    refused(&mut fs, &FsCommand::Drop { ino: f }, FsError::Invalid);

    // Not the last name: no orphan.
    assert_eq!(
        apply_ok(&mut fs, &unlink_cmd(ROOT, b"f", false, t(5))),
        FsReply::Orphaned(None)
    );
    assert_eq!(attr(&fs, f).nlink, 1);
    refused(&mut fs, &FsCommand::Drop { ino: f }, FsError::Invalid);
    // The last name: an orphan that keeps its inode and its blocks.
    assert_eq!(
        apply_ok(&mut fs, &unlink_cmd(d, b"g", false, t(6))),
        FsReply::Orphaned(Some(f))
    );
    let a = attr(&fs, f);
    assert_eq!((a.nlink, a.blocks), (0, 10));
    assert_eq!(lbas(&fs, f), held);
    assert_eq!(statfs(&fs).free, 54);
    assert_eq!(statfs(&fs).files, 3);
    assert!(read_dir(&fs, d).is_empty());
    // An open orphan can still be written, but not named again.
    refused(
        &mut fs,
        &link_cmd(f, ROOT, b"back", t(7)),
        FsError::NotFound,
    );
    let more = map(&mut fs, f, 10, 2).unwrap();
    assert!(more.iter().all(|m| m.fresh));
    assert_eq!(statfs(&fs).free, 52);

    // Drop frees everything.
    refused(&mut fs, &FsCommand::Drop { ino: ROOT }, FsError::Invalid);
    refused(&mut fs, &FsCommand::Drop { ino: d }, FsError::Invalid);
    assert_eq!(
        apply_ok(&mut fs, &FsCommand::Drop { ino: f }),
        FsReply::Done
    );
    assert_eq!(statfs(&fs).free, 64);
    assert_eq!(statfs(&fs).files, 2);
    assert!(fs.inode(f).is_none());
    assert_eq!(
        fs.query(&FsQuery::GetAttr { ino: f }),
        Err(FsError::NotFound)
    );
    refused(&mut fs, &FsCommand::Drop { ino: f }, FsError::NotFound);
    // The freed blocks are all usable again.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(8));
    let all: BTreeSet<u64> = map(&mut fs, g, 0, 64)
        .unwrap()
        .iter()
        .map(|m| m.lba)
        .collect();
    assert_eq!(all, (0..64).collect());
    assert_eq!(map(&mut fs, g, 64, 1), Err(FsError::NoSpace));
}

#[test]
fn rmdir_rules() {
    let mut fs = formatted(8);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let e = create(&mut fs, d, b"e", Kind::Dir, t(3));
    assert_eq!(attr(&fs, ROOT).nlink, 3);
    assert_eq!(attr(&fs, d).nlink, 3);
    refused(
        &mut fs,
        &unlink_cmd(ROOT, b"d", true, t(4)),
        FsError::NotEmpty,
    );
    refused(
        &mut fs,
        &unlink_cmd(ROOT, b"d", false, t(4)),
        FsError::IsDir,
    );
    // A directory holding only a file is not empty either.
    create(&mut fs, e, b"f", Kind::File, t(4));
    refused(&mut fs, &unlink_cmd(d, b"e", true, t(5)), FsError::NotEmpty);
    apply_ok(&mut fs, &unlink_cmd(e, b"f", false, t(5)));
    assert_eq!(
        apply_ok(&mut fs, &unlink_cmd(d, b"e", true, t(6))),
        FsReply::Orphaned(None)
    );
    assert!(fs.inode(e).is_none(), "an empty directory goes at once");
    assert_eq!(attr(&fs, d).nlink, 2);
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"d", true, t(7)));
    assert_eq!(attr(&fs, ROOT).nlink, 2);
    assert_eq!(statfs(&fs).files, 2, "root and the orphan f");
    refused(
        &mut fs,
        &create_cmd(d, b"x", Kind::File, t(8)),
        FsError::NotFound,
    );
}

// ---------------------------------------------------------------------------------
// Rename.
// ---------------------------------------------------------------------------------

#[test]
fn rename_directory_into_itself_or_below_is_invalid() {
    let mut fs = formatted(8);
    let a = create(&mut fs, ROOT, b"a", Kind::Dir, t(2));
    let b = create(&mut fs, a, b"b", Kind::Dir, t(2));
    let c = create(&mut fs, b, b"c", Kind::Dir, t(2));
    create(&mut fs, c, b"f", Kind::File, t(2));
    refused(&mut fs, &mv(ROOT, b"a", a, b"z", t(3)), FsError::Invalid);
    refused(&mut fs, &mv(ROOT, b"a", b, b"z", t(3)), FsError::Invalid);
    refused(&mut fs, &mv(ROOT, b"a", c, b"z", t(3)), FsError::Invalid);
    refused(&mut fs, &mv(a, b"b", c, b"z", t(3)), FsError::Invalid);
    // Even over an existing name there, and with either flag.
    refused(&mut fs, &mv(ROOT, b"a", c, b"f", t(3)), FsError::Invalid);
    refused(
        &mut fs,
        &rename_cmd(ROOT, b"a", c, b"z", true, false, t(3)),
        FsError::Invalid,
    );
    // Exchanging a directory with something below it, either way round.
    refused(
        &mut fs,
        &rename_cmd(ROOT, b"a", c, b"f", false, true, t(3)),
        FsError::Invalid,
    );
    refused(
        &mut fs,
        &rename_cmd(c, b"f", ROOT, b"a", false, true, t(3)),
        FsError::Invalid,
    );
    refused(
        &mut fs,
        &rename_cmd(b, b"c", ROOT, b"a", false, true, t(3)),
        FsError::Invalid,
    );
    // Onto an ancestor: it is not empty.
    refused(&mut fs, &mv(b, b"c", ROOT, b"a", t(3)), FsError::NotEmpty);
    // Moving up is fine, and fixes parents and link counts.
    apply_ok(&mut fs, &mv(b, b"c", ROOT, b"c", t(4)));
    assert_eq!(lookup(&fs, c, b".."), Ok(ROOT));
    assert_eq!(attr(&fs, b).nlink, 2);
    assert_eq!(attr(&fs, ROOT).nlink, 4);
    // And now a can move into c.
    apply_ok(&mut fs, &mv(ROOT, b"a", c, b"a", t(5)));
    assert_eq!(lookup(&fs, a, b".."), Ok(c));
    assert_eq!(attr(&fs, ROOT).nlink, 3);
    assert_eq!(attr(&fs, c).nlink, 3);
}

#[test]
fn rename_replacing_checks_kinds_and_emptiness() {
    let mut fs = formatted(8);
    let x = create(&mut fs, ROOT, b"x", Kind::Dir, t(2));
    let y = create(&mut fs, ROOT, b"y", Kind::Dir, t(2));
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(2));
    create(&mut fs, y, b"inside", Kind::File, t(2));
    refused(
        &mut fs,
        &mv(ROOT, b"x", ROOT, b"y", t(3)),
        FsError::NotEmpty,
    );
    refused(&mut fs, &mv(ROOT, b"f", ROOT, b"x", t(3)), FsError::IsDir);
    refused(&mut fs, &mv(ROOT, b"x", ROOT, b"f", t(3)), FsError::NotDir);
    refused(
        &mut fs,
        &rename_cmd(ROOT, b"f", ROOT, b"g", true, false, t(3)),
        FsError::Exists,
    );
    refused(
        &mut fs,
        &rename_cmd(ROOT, b"f", ROOT, b"h", true, true, t(3)),
        FsError::Invalid,
    );
    refused(
        &mut fs,
        &mv(ROOT, b"nope", ROOT, b"h", t(3)),
        FsError::NotFound,
    );
    refused(&mut fs, &mv(ROOT, b"f", g, b"h", t(3)), FsError::NotDir);
    refused(&mut fs, &mv(ROOT, b"f", 999, b"h", t(3)), FsError::NotFound);

    // Over an empty directory: the target goes, link counts follow.
    apply_ok(&mut fs, &unlink_cmd(y, b"inside", false, t(4)));
    assert_eq!(attr(&fs, ROOT).nlink, 4);
    assert_eq!(
        apply_ok(&mut fs, &mv(ROOT, b"x", ROOT, b"y", t(5))),
        FsReply::Orphaned(None)
    );
    assert!(fs.inode(y).is_none());
    assert_eq!(lookup(&fs, ROOT, b"y"), Ok(x));
    assert_eq!(lookup(&fs, ROOT, b"x"), Err(FsError::NotFound));
    assert_eq!(attr(&fs, ROOT).nlink, 3);
    assert_eq!(attr(&fs, x).nlink, 2);

    // Over a file's last name: an orphan to drop.
    map(&mut fs, g, 0, 3).unwrap();
    assert_eq!(
        apply_ok(&mut fs, &mv(ROOT, b"f", ROOT, b"g", t(6))),
        FsReply::Orphaned(Some(g))
    );
    assert_eq!(attr(&fs, g).nlink, 0);
    assert_eq!(attr(&fs, g).ctime, t(6));
    assert_eq!(lookup(&fs, ROOT, b"g"), Ok(f));
    assert_eq!(statfs(&fs).free, 5);
    apply_ok(&mut fs, &FsCommand::Drop { ino: g });
    assert_eq!(statfs(&fs).free, 8);

    // Over a file with another name: no orphan.
    let h = create(&mut fs, ROOT, b"h", Kind::File, t(7));
    apply_ok(&mut fs, &link_cmd(h, x, b"h2", t(7)));
    assert_eq!(
        apply_ok(&mut fs, &mv(ROOT, b"g", ROOT, b"h", t(8))),
        FsReply::Orphaned(None)
    );
    assert_eq!(attr(&fs, h).nlink, 1);
    assert_eq!(lookup(&fs, ROOT, b"h"), Ok(f));
}

#[test]
fn rename_onto_itself_is_a_no_op() {
    let mut fs = formatted(8);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    apply_ok(&mut fs, &link_cmd(f, d, b"g", t(3)));
    let cases = [
        mv(ROOT, b"f", ROOT, b"f", t(9)),
        mv(ROOT, b"d", ROOT, b"d", t(9)),
        mv(ROOT, b"f", d, b"g", t(9)),
        mv(d, b"g", ROOT, b"f", t(9)),
    ];
    for cmd in cases {
        let before = fs.clone();
        assert_eq!(apply_ok(&mut fs, &cmd), FsReply::Orphaned(None), "{cmd:?}");
        assert_eq!(fs, before, "{cmd:?} changed something");
    }
    assert_eq!(attr(&fs, f).nlink, 2);
    assert_eq!(lookup(&fs, ROOT, b"f"), Ok(f));
    assert_eq!(lookup(&fs, d, b"g"), Ok(f));
}

/// Linux's renameat2(RENAME_NOREPLACE) fails with EEXIST whenever the new name exists,
/// checked before the "same inode: do nothing" rule; `FsCommand::Rename` documents
/// "replacing the target unless `noreplace`".
#[test]
fn rename_noreplace_onto_same_inode_is_exists() {
    let mut fs = formatted(8);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    apply_ok(&mut fs, &link_cmd(f, ROOT, b"g", t(3)));
    refused(
        &mut fs,
        &rename_cmd(ROOT, b"f", ROOT, b"g", true, false, t(4)),
        FsError::Exists,
    );
    refused(
        &mut fs,
        &rename_cmd(ROOT, b"f", ROOT, b"f", true, false, t(4)),
        FsError::Exists,
    );
}

#[test]
fn rename_exchange_swaps_and_fixes_parents() {
    let mut fs = formatted(8);
    let d1 = create(&mut fs, ROOT, b"d1", Kind::Dir, t(2));
    let x = create(&mut fs, d1, b"x", Kind::File, t(2));
    let d2 = create(&mut fs, ROOT, b"d2", Kind::Dir, t(2));
    let f = create(&mut fs, d2, b"f", Kind::File, t(2));
    let sub = create(&mut fs, d2, b"sub", Kind::Dir, t(2));
    let d3 = create(&mut fs, ROOT, b"d3", Kind::Dir, t(2));
    assert_eq!(attr(&fs, ROOT).nlink, 5);
    assert_eq!(attr(&fs, d2).nlink, 3);

    refused(
        &mut fs,
        &rename_cmd(ROOT, b"d1", d2, b"missing", false, true, t(3)),
        FsError::NotFound,
    );

    // A directory for a file, across directories.
    assert_eq!(
        apply_ok(
            &mut fs,
            &rename_cmd(ROOT, b"d1", d2, b"f", false, true, t(10))
        ),
        FsReply::Orphaned(None)
    );
    assert_eq!(lookup(&fs, ROOT, b"d1"), Ok(f));
    assert_eq!(lookup(&fs, d2, b"f"), Ok(d1));
    assert_eq!(lookup(&fs, d1, b".."), Ok(d2));
    assert_eq!(lookup(&fs, d1, b"x"), Ok(x), "contents move along");
    assert_eq!(attr(&fs, ROOT).nlink, 4);
    assert_eq!(attr(&fs, d2).nlink, 4);
    assert_eq!(attr(&fs, d1).nlink, 2);
    assert_eq!(attr(&fs, f).nlink, 1);
    assert_eq!(attr(&fs, d1).ctime, t(10));
    assert_eq!(attr(&fs, f).ctime, t(10));
    for dir in [ROOT, d2] {
        assert_eq!(attr(&fs, dir).mtime, t(10));
        assert_eq!(attr(&fs, dir).ctime, t(10));
    }
    assert_eq!(attr(&fs, x).ctime, t(2), "untouched");
    assert_eq!(attr(&fs, d3).ctime, t(2), "untouched");

    // Two directories in different parents: counts stay, parents swap.
    apply_ok(
        &mut fs,
        &rename_cmd(ROOT, b"d3", d2, b"sub", false, true, t(11)),
    );
    assert_eq!(lookup(&fs, ROOT, b"d3"), Ok(sub));
    assert_eq!(lookup(&fs, d2, b"sub"), Ok(d3));
    assert_eq!(lookup(&fs, sub, b".."), Ok(ROOT));
    assert_eq!(lookup(&fs, d3, b".."), Ok(d2));
    assert_eq!(attr(&fs, ROOT).nlink, 4);
    assert_eq!(attr(&fs, d2).nlink, 4);

    // Two names in one directory.
    apply_ok(
        &mut fs,
        &rename_cmd(d2, b"f", d2, b"sub", false, true, t(12)),
    );
    assert_eq!(lookup(&fs, d2, b"f"), Ok(d3));
    assert_eq!(lookup(&fs, d2, b"sub"), Ok(d1));
    assert_eq!(attr(&fs, d2).nlink, 4);
    assert_eq!(lookup(&fs, d1, b".."), Ok(d2));
}

// ---------------------------------------------------------------------------------
// Block mapping, truncation.
// ---------------------------------------------------------------------------------

#[test]
fn map_hands_out_each_block_once() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let first = map(&mut fs, f, 0, 2).unwrap();
    assert_eq!(
        first.iter().map(|m| m.block).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(first.iter().all(|m| m.fresh));
    // Mapped again before any Written names them: the same blocks, still fresh.
    let again = map(&mut fs, f, 1, 3).unwrap();
    assert_eq!(
        again.iter().map(|m| m.block).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(again[0], first[1]);
    assert!(again.iter().all(|m| m.fresh));
    assert_eq!(fresh_blocks(&fs, f), vec![0, 1, 2, 3]);
    // Blocks 0 and 1 written: no longer fresh; 2 and 3 still are.
    written(&mut fs, f, 2 * BSZ, t(3), &[(0, 2)], false);
    let third = map(&mut fs, f, 0, 4).unwrap();
    assert_eq!(
        third.iter().map(|m| m.fresh).collect::<Vec<_>>(),
        vec![false, false, true, true]
    );
    assert_eq!(
        third[..2],
        [
            Mapping {
                fresh: false,
                ..first[0]
            },
            Mapping {
                fresh: false,
                ..first[1]
            }
        ]
    );
    assert_eq!(third[2..], again[1..]);
    // The query answers the same, without handing anything out.
    assert_eq!(extents(&fs, f), third);
    assert_eq!(attr(&fs, f).blocks, 4);
    assert_eq!(statfs(&fs).free, 60);
    let lba: BTreeSet<u64> = third.iter().map(|m| m.lba).collect();
    assert_eq!(lba.len(), 4);
    assert!(lba.iter().all(|l| *l < 64));
    written(&mut fs, f, 4 * BSZ, t(4), &[(2, 2)], false);
    assert!(map(&mut fs, f, 0, 4).unwrap().iter().all(|m| !m.fresh));
    // A hole, then filling it.
    let far = map(&mut fs, f, 20, 1).unwrap();
    assert!(far[0].fresh);
    assert_eq!(extents(&fs, f).len(), 5);
    assert_eq!(
        fs.query(&FsQuery::Extents {
            ino: f,
            first: 4,
            count: 16
        }),
        Ok(FsReply::Mapped(Vec::new()))
    );
    let hole = map(&mut fs, f, 10, 1).unwrap();
    assert!(hole[0].fresh);
    assert_eq!(attr(&fs, f).blocks, 6);
    assert_eq!(fresh_blocks(&fs, f), vec![10, 20]);

    refused(&mut fs, &map_cmd(f, 0, 0), FsError::Invalid);
    refused(&mut fs, &map_cmd(f, 0, MAP_MAX + 1), FsError::Invalid);
    refused(&mut fs, &map_cmd(ROOT, 0, 1), FsError::Invalid);
    refused(&mut fs, &map_cmd(999, 0, 1), FsError::NotFound);
    refused(&mut fs, &map_cmd(f, u64::MAX, 2), FsError::TooLarge);
}

#[test]
fn map_beyond_free_space_is_no_space_and_changes_nothing() {
    let mut fs = formatted(8);
    let a = create(&mut fs, ROOT, b"a", Kind::File, t(2));
    let b = create(&mut fs, ROOT, b"b", Kind::File, t(2));
    map(&mut fs, a, 0, 5).unwrap();
    written(&mut fs, a, 5 * BSZ, t(3), &[(0, 5)], false);
    assert_eq!(map(&mut fs, b, 0, 4), Err(FsError::NoSpace));
    assert_eq!(attr(&fs, b).blocks, 0);
    assert_eq!(statfs(&fs).free, 3);
    // Already-mapped blocks do not count against the free space.
    assert_eq!(map(&mut fs, a, 3, 6), Err(FsError::NoSpace));
    let m = map(&mut fs, a, 3, 5).unwrap();
    assert_eq!(
        m.iter().map(|m| (m.block, m.fresh)).collect::<Vec<_>>(),
        vec![(3, false), (4, false), (5, true), (6, true), (7, true)]
    );
    assert_eq!(statfs(&fs).free, 0);
    assert_eq!(map(&mut fs, b, 0, 1), Err(FsError::NoSpace));
    // Nothing free, but nothing to hand out either.
    assert_eq!(map(&mut fs, a, 0, 8).unwrap().len(), 8);
    let all: BTreeSet<u64> = lbas(&fs, a).into_iter().collect();
    assert_eq!(all, (0..8).collect());
}

#[test]
fn consecutive_maps_give_consecutive_blocks_in_one_extent() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let l0 = map(&mut fs, f, 0, 1).unwrap()[0].lba;
    let l1 = map(&mut fs, f, 1, 1).unwrap()[0].lba;
    let rest: Vec<u64> = map(&mut fs, f, 2, 3)
        .unwrap()
        .iter()
        .map(|m| m.lba)
        .collect();
    assert_eq!(l1, l0 + 1);
    assert_eq!(rest, vec![l0 + 2, l0 + 3, l0 + 4]);
    let runs: Vec<(u64, Extent)> = fs
        .inode(f)
        .unwrap()
        .extents
        .iter()
        .map(|(b, e)| (*b, *e))
        .collect();
    assert_eq!(runs, vec![(0, Extent { lba: l0, count: 5 })]);
    // Another file takes the blocks after the run, then gives them back: the run
    // continues into them.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(3));
    let gl: Vec<u64> = map(&mut fs, g, 0, 4)
        .unwrap()
        .iter()
        .map(|m| m.lba)
        .collect();
    assert!(gl.iter().all(|l| *l < l0 || *l > l0 + 4), "{gl:?}");
    apply_ok(&mut fs, &size_cmd(g, 0, t(4)));
    let next = map(&mut fs, f, 5, 3).unwrap();
    assert_eq!(
        next.iter().map(|m| m.lba).collect::<Vec<_>>(),
        vec![l0 + 5, l0 + 6, l0 + 7]
    );
    assert_eq!(fs.inode(f).unwrap().extents.len(), 1);
    assert_eq!(
        fs.inode(f).unwrap().extents.get(&0),
        Some(&Extent { lba: l0, count: 8 })
    );
}

#[test]
fn truncate_down_frees_the_tail_and_up_keeps_blocks() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let m = map(&mut fs, f, 0, 10).unwrap();
    written(&mut fs, f, 10 * BSZ, t(3), &[(0, 10)], false);
    assert_eq!(statfs(&fs).free, 54);

    // Down to 3 blocks and a byte: 4 blocks stay, with their data blocks.
    let a = ok_attr(
        Ok(apply_ok(&mut fs, &size_cmd(f, 3 * BSZ + 1, t(4)))),
        "truncate",
    );
    assert_eq!((a.size, a.blocks), (3 * BSZ + 1, 4));
    assert_eq!(
        extents(&fs, f),
        m[..4]
            .iter()
            .map(|x| Mapping { fresh: false, ..*x })
            .collect::<Vec<_>>()
    );
    assert_eq!(statfs(&fs).free, 60);
    // Exactly 3 blocks: one more goes.
    apply_ok(&mut fs, &size_cmd(f, 3 * BSZ, t(5)));
    assert_eq!(attr(&fs, f).blocks, 3);
    assert_eq!(statfs(&fs).free, 61);
    // Up: blocks stay, size grows, nothing handed out.
    let a = ok_attr(Ok(apply_ok(&mut fs, &size_cmd(f, 100 * BSZ, t(6)))), "grow");
    assert_eq!((a.size, a.blocks), (100 * BSZ, 3));
    assert_eq!(extents(&fs, f).len(), 3);
    assert_eq!(statfs(&fs).free, 61);
    // A truncated-away block is handed out fresh when written again.
    let again = map(&mut fs, f, 5, 1).unwrap();
    assert!(again[0].fresh);
    // To zero: everything goes.
    apply_ok(&mut fs, &size_cmd(f, 0, t(7)));
    assert_eq!(attr(&fs, f).blocks, 0);
    assert!(extents(&fs, f).is_empty());
    assert_eq!(statfs(&fs).free, 64);
    assert!(map(&mut fs, f, 0, 1).unwrap()[0].fresh);

    // Size changes on the wrong kinds, and too large.
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(8));
    let p = create(&mut fs, ROOT, b"p", Kind::Fifo, t(8));
    refused(&mut fs, &size_cmd(d, 0, t(9)), FsError::IsDir);
    refused(&mut fs, &size_cmd(p, 0, t(9)), FsError::Invalid);
    refused(&mut fs, &size_cmd(f, u64::MAX, t(9)), FsError::TooLarge);
    // The limit is 1024 blocks per volume block; a refused size cuts nothing, even a
    // block mapped far out.
    let limit = 64 * 1024 * BSZ;
    refused(&mut fs, &map_cmd(f, 64 * 1024, 1), FsError::TooLarge);
    let far = map(&mut fs, f, 60_000, 1).unwrap();
    assert_eq!(statfs(&fs).free, 62);
    refused(&mut fs, &size_cmd(f, limit + 1, t(9)), FsError::TooLarge);
    assert_eq!(
        extents(&fs, f).len(),
        1,
        "only the first MAP_MAX blocks show"
    );
    let a = ok_attr(Ok(apply_ok(&mut fs, &size_cmd(f, limit, t(9)))), "truncate");
    assert_eq!(
        (a.size, a.blocks),
        (limit, 2),
        "{far:?} is within the limit"
    );
    assert_eq!(statfs(&fs).free, 62);
    let a = ok_attr(
        Ok(apply_ok(&mut fs, &size_cmd(f, 60_000 * BSZ, t(9)))),
        "truncate",
    );
    assert_eq!((a.size, a.blocks), (60_000 * BSZ, 1));
    assert_eq!(statfs(&fs).free, 63);
    assert_eq!(
        fs.query(&FsQuery::Extents {
            ino: f,
            first: 60_000,
            count: 1
        }),
        Ok(FsReply::Mapped(Vec::new())),
        "{far:?} was cut"
    );
    refused(&mut fs, &size_cmd(999, 0, t(9)), FsError::NotFound);
    // Other attributes on any kind.
    let a = ok_attr(
        Ok(apply_ok(
            &mut fs,
            &FsCommand::SetAttr {
                ino: d,
                set: SetAttr {
                    perm: Some(0o171_700),
                    uid: Some(5),
                    gid: Some(6),
                    ..SetAttr::default()
                },
                now: t(10),
            },
        )),
        "chmod",
    );
    assert_eq!((a.perm, a.uid, a.gid), (0o1700, 5, 6));
    assert_eq!(a.ctime, t(10));
    assert_eq!(a.mtime, t(8));
}

fn punch_cmd(ino: Ino, first: u64, count: u64, now: Time) -> FsCommand {
    FsCommand::Punch {
        ino,
        first,
        count,
        now,
    }
}

/// A punched range becomes holes: its data blocks are free again, the blocks around
/// it keep theirs (an extent split in two), and the size stays.
#[test]
fn punch_frees_the_range_and_keeps_the_rest() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let m = map(&mut fs, f, 0, 10).unwrap();
    written(&mut fs, f, 10 * BSZ, t(3), &[(0, 10)], false);
    assert_eq!(fs.inode(f).unwrap().extents.len(), 1);

    let a = ok_attr(Ok(apply_ok(&mut fs, &punch_cmd(f, 2, 3, t(4)))), "punch");
    fs.check().unwrap();
    assert_eq!((a.size, a.blocks), (10 * BSZ, 7));
    assert_eq!((a.mtime, a.ctime), (t(4), t(4)));
    let kept: Vec<Mapping> = m
        .iter()
        .filter(|x| !(2..5).contains(&x.block))
        .map(|x| Mapping { fresh: false, ..*x })
        .collect();
    assert_eq!(extents(&fs, f), kept);
    assert_eq!(
        fs.inode(f).unwrap().extents.len(),
        2,
        "split around the hole"
    );
    assert_eq!(statfs(&fs).free, 57);

    // Across the hole and into both neighbours; a range past every block is fine.
    apply_ok(&mut fs, &punch_cmd(f, 1, 5, t(5)));
    apply_ok(&mut fs, &punch_cmd(f, 100, 50, t(5)));
    apply_ok(&mut fs, &punch_cmd(f, 3, 0, t(5)));
    fs.check().unwrap();
    assert_eq!(
        extents(&fs, f).iter().map(|x| x.block).collect::<Vec<_>>(),
        vec![0, 6, 7, 8, 9]
    );
    assert_eq!(attr(&fs, f).blocks, 5);
    assert_eq!(statfs(&fs).free, 59);

    // A punched block is handed out fresh when written again; unwritten blocks
    // punched are forgotten as unwritten too.
    assert!(map(&mut fs, f, 3, 1).unwrap()[0].fresh);
    apply_ok(&mut fs, &punch_cmd(f, 3, 1, t(6)));
    assert!(fresh_blocks(&fs, f).is_empty());
    fs.check().unwrap();

    // To the end: as a truncate, but the size stays.
    apply_ok(&mut fs, &punch_cmd(f, 0, u64::MAX, t(7)));
    fs.check().unwrap();
    assert_eq!((attr(&fs, f).size, attr(&fs, f).blocks), (10 * BSZ, 0));
    assert_eq!(statfs(&fs).free, 64);

    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(8));
    refused(&mut fs, &punch_cmd(d, 0, 1, t(9)), FsError::Invalid);
    refused(&mut fs, &punch_cmd(999, 0, 1, t(9)), FsError::NotFound);
}

/// A read moves the atime by relatime's rule and leaves the ctime: when the atime is
/// not after the mtime or ctime, or is a day old; otherwise not at all.
#[test]
fn accessed_follows_relatime() {
    let mut fs = formatted(8);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(100));
    let accessed = |fs: &mut FsState, at: Time| {
        ok_attr(
            Ok(apply_ok(fs, &FsCommand::Accessed { ino: f, now: at })),
            "accessed",
        )
    };
    // Created: atime = mtime = ctime, so the first read moves it.
    let a = accessed(&mut fs, t(200));
    assert_eq!((a.atime, a.mtime, a.ctime), (t(200), t(100), t(100)));
    // Read again within a day of it: no change.
    assert_eq!(accessed(&mut fs, t(300)).atime, t(200));
    // Written after the read: the next read moves it again.
    written(&mut fs, f, 10, t(400), &[], false);
    assert_eq!(accessed(&mut fs, t(500)).atime, t(500));
    assert_eq!(accessed(&mut fs, t(600)).atime, t(500));
    // A day after the last update: moved again.
    assert_eq!(accessed(&mut fs, t(500 + 86_400)).atime, t(500 + 86_400));
    // A changed ctime (chmod) makes it due; a clock behind the atime never moves it
    // back.
    apply_ok(
        &mut fs,
        &FsCommand::SetAttr {
            ino: f,
            set: SetAttr {
                perm: Some(0o600),
                ..SetAttr::default()
            },
            now: t(100_000),
        },
    );
    assert_eq!(accessed(&mut fs, t(50)).atime, t(500 + 86_400));
    let a = accessed(&mut fs, t(100_001));
    assert_eq!((a.atime, a.ctime), (t(100_001), t(100_000)));
    // Directories too; an unknown inode is NotFound.
    apply_ok(
        &mut fs,
        &FsCommand::Accessed {
            ino: ROOT,
            now: t(200_000),
        },
    );
    assert_eq!(attr(&fs, ROOT).atime, t(200_000));
    refused(
        &mut fs,
        &FsCommand::Accessed {
            ino: 999,
            now: t(1),
        },
        FsError::NotFound,
    );
}

/// Freed blocks merge with their free neighbours whatever the order they come back
/// in: the state depends only on what is held, not on the history.
#[test]
fn freed_space_coalesces_in_any_order() {
    let build = |order: [usize; 3]| {
        let mut fs = formatted(16);
        let files: Vec<Ino> = [b"a", b"b", b"c"]
            .iter()
            .map(|n| create(&mut fs, ROOT, *n, Kind::File, t(2)))
            .collect();
        for f in &files {
            map(&mut fs, *f, 0, 2).unwrap();
        }
        for i in order {
            apply_ok(&mut fs, &size_cmd(files[i], 0, t(3)));
        }
        assert_eq!(statfs(&fs).free, 16);
        fs
    };
    let fs = build([0, 1, 2]);
    for order in [[2, 1, 0], [0, 2, 1], [1, 0, 2], [2, 0, 1], [1, 2, 0]] {
        assert_eq!(build(order), fs, "freed in order {order:?}");
    }
    // And it is all one run again: a new file gets the volume in one extent.
    let mut fs = fs;
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(4));
    map(&mut fs, g, 0, 16).unwrap();
    assert_eq!(
        fs.inode(g)
            .unwrap()
            .extents
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![Extent { lba: 0, count: 16 }]
    );
}

#[test]
fn two_files_never_share_a_block() {
    let mut fs = formatted(16);
    let a = create(&mut fs, ROOT, b"a", Kind::File, t(2));
    let b = create(&mut fs, ROOT, b"b", Kind::File, t(2));
    for i in 0..8 {
        map(&mut fs, a, i, 1).unwrap();
        map(&mut fs, b, i, 1).unwrap();
    }
    let la: BTreeSet<u64> = lbas(&fs, a).into_iter().collect();
    let lb: BTreeSet<u64> = lbas(&fs, b).into_iter().collect();
    assert_eq!((la.len(), lb.len()), (8, 8));
    assert!(la.is_disjoint(&lb));
    assert_eq!(
        la.union(&lb).copied().collect::<BTreeSet<_>>(),
        (0..16).collect()
    );
    assert_eq!(map(&mut fs, b, 8, 1), Err(FsError::NoSpace));
    // What a frees, b gets, and only that.
    apply_ok(&mut fs, &size_cmd(a, 2 * BSZ, t(3)));
    let kept: BTreeSet<u64> = lbas(&fs, a).into_iter().collect();
    let got: BTreeSet<u64> = map(&mut fs, b, 8, 6)
        .unwrap()
        .iter()
        .map(|m| m.lba)
        .collect();
    assert_eq!(got, la.difference(&kept).copied().collect());
    assert!(kept.is_disjoint(&lbas(&fs, b).into_iter().collect()));
}

// ---------------------------------------------------------------------------------
// Unwritten blocks: Map ahead, Written, trim, truncation.
// ---------------------------------------------------------------------------------

/// A block handed out reads as fresh (unwritten: a hole) through `Extents` and `Map`
/// until a `Written` names it, whichever call handed it out.
#[test]
fn blocks_stay_fresh_until_a_written_names_them() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(2));
    let m = map(&mut fs, f, 0, 4).unwrap();
    assert!(m.iter().all(|x| x.fresh));
    assert_eq!(extents(&fs, f), m);
    map(&mut fs, g, 0, 4).unwrap();
    // Writes that name nothing, unmapped blocks, or another file's blocks change no
    // flag.
    written(&mut fs, f, 0, t(3), &[], false);
    written(&mut fs, f, 0, t(3), &[(4, 100), (1000, 0), (2, 0)], false);
    written(&mut fs, g, 4 * BSZ, t(3), &[(0, 4)], false);
    assert_eq!(fresh_blocks(&fs, f), vec![0, 1, 2, 3]);
    assert!(fresh_blocks(&fs, g).is_empty());
    // Block 1, then 2 and 3 (overlapping and repeated runs are fine).
    written(&mut fs, f, BSZ, t(4), &[(1, 1)], false);
    assert_eq!(fresh_blocks(&fs, f), vec![0, 2, 3]);
    assert_eq!(
        fs.query(&FsQuery::Extents {
            ino: f,
            first: 1,
            count: 2
        }),
        Ok(FsReply::Mapped(vec![
            Mapping {
                fresh: false,
                ..m[1]
            },
            m[2]
        ]))
    );
    written(&mut fs, f, BSZ, t(5), &[(1, 3), (2, 1), (1, 3)], false);
    assert_eq!(fresh_blocks(&fs, f), vec![0]);
    // Mapping a written block again does not make it fresh.
    let again = map(&mut fs, f, 0, 4).unwrap();
    assert_eq!(
        again.iter().map(|x| x.fresh).collect::<Vec<_>>(),
        vec![true, false, false, false]
    );
    assert_eq!(
        again.iter().map(|x| x.lba).collect::<Vec<_>>(),
        m.iter().map(|x| x.lba).collect::<Vec<_>>()
    );
    // A run reaching the end of the block numbers.
    written(&mut fs, f, BSZ, t(6), &[(0, u64::MAX)], false);
    assert!(fresh_blocks(&fs, f).is_empty());
    assert!(fs.inode(f).unwrap().unwritten.is_empty());
    // A block freed and handed out again is fresh again.
    apply_ok(&mut fs, &size_cmd(f, 0, t(7)));
    assert!(map(&mut fs, f, 3, 1).unwrap()[0].fresh);
    assert_eq!(fresh_blocks(&fs, f), vec![3]);
    assert_eq!(attr(&fs, f).size, 0, "Map does not change the size");
}

/// `Map` hands out the `ahead` blocks too (fresh), best effort: all the requested
/// ones or `NoSpace`, then as many ahead, in block order, as the free space allows.
#[test]
fn map_ahead_is_best_effort() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let m = map_ahead(&mut fs, f, 0, 2, 4).unwrap();
    assert_eq!(
        m.iter().map(|x| (x.block, x.fresh)).collect::<Vec<_>>(),
        (0..6).map(|b| (b, true)).collect::<Vec<_>>()
    );
    assert_eq!(statfs(&fs).free, 58);
    assert_eq!(attr(&fs, f).blocks, 6);
    assert_eq!(extents(&fs, f), m);
    // One run of data blocks.
    assert_eq!(fs.inode(f).unwrap().extents.len(), 1);
    // The blocks taken ahead count as mapped: only 6..9 are new.
    let m2 = map_ahead(&mut fs, f, 4, 2, 3).unwrap();
    assert_eq!(
        m2.iter().map(|x| x.block).collect::<Vec<_>>(),
        (4..9).collect::<Vec<_>>()
    );
    assert_eq!(m2[..2], m[4..]);
    assert!(m2.iter().all(|x| x.fresh));
    assert_eq!(statfs(&fs).free, 55);
    // The answer covers the ahead window, written blocks included (not fresh).
    written(&mut fs, f, 4 * BSZ, t(3), &[(0, 4)], false);
    let m3 = map_ahead(&mut fs, f, 2, 1, 2).unwrap();
    assert_eq!(
        m3.iter().map(|x| (x.block, x.fresh)).collect::<Vec<_>>(),
        vec![(2, false), (3, false), (4, true)]
    );
    assert_eq!(statfs(&fs).free, 55);

    // Fewer free blocks than count + ahead: the requested ones, then the ahead ones
    // that fit, skipping those already mapped.
    let h = create(&mut fs, ROOT, b"h", Kind::File, t(4));
    map(&mut fs, h, 0, 48).unwrap();
    assert_eq!(statfs(&fs).free, 7);
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(4));
    map(&mut fs, g, 3, 1).unwrap();
    written(&mut fs, g, 4 * BSZ, t(4), &[(3, 1)], false);
    map(&mut fs, g, 20, 3).unwrap();
    assert_eq!(statfs(&fs).free, 3);
    let mg = map_ahead(&mut fs, g, 0, 1, 8).unwrap();
    assert_eq!(
        mg.iter().map(|x| (x.block, x.fresh)).collect::<Vec<_>>(),
        vec![(0, true), (3, false)],
        "block 0, and nothing ahead: a quarter of the 2 blocks left is none"
    );
    assert_eq!(statfs(&fs).free, 2);
    assert_eq!(attr(&fs, g).blocks, 5);
    // Nothing free: ahead is no error, the requested blocks are.
    let mg = map_ahead(&mut fs, g, 1, 2, 30).unwrap();
    assert_eq!(
        mg.iter().map(|x| x.block).collect::<Vec<_>>(),
        vec![1, 2, 3, 20, 21, 22]
    );
    assert_eq!(map_ahead(&mut fs, g, 4, 1, 0), Err(FsError::NoSpace));
    assert_eq!(map_ahead(&mut fs, g, 3, 2, 5), Err(FsError::NoSpace));
    // Two free blocks: three requested is NoSpace whatever the ahead; two is fine,
    // with nothing ahead.
    apply_ok(&mut fs, &size_cmd(g, 21 * BSZ, t(5)));
    assert_eq!(statfs(&fs).free, 2);
    assert_eq!(map_ahead(&mut fs, f, 10, 3, 0), Err(FsError::NoSpace));
    assert_eq!(map_ahead(&mut fs, f, 10, 3, 5), Err(FsError::NoSpace));
    let mf = map_ahead(&mut fs, f, 10, 2, 5).unwrap();
    assert_eq!(mf.iter().map(|x| x.block).collect::<Vec<_>>(), vec![10, 11]);
    assert_eq!(statfs(&fs).free, 0);

    // count + ahead at most MAP_MAX; that is checked first.
    refused(&mut fs, &map_ahead_cmd(f, 0, 1, MAP_MAX), FsError::Invalid);
    refused(&mut fs, &map_ahead_cmd(f, 0, MAP_MAX, 1), FsError::Invalid);
    refused(&mut fs, &map_ahead_cmd(f, 0, 0, 5), FsError::Invalid);
    refused(
        &mut fs,
        &map_ahead_cmd(f, 0, MAP_MAX + 1, 0),
        FsError::Invalid,
    );
    refused(
        &mut fs,
        &map_ahead_cmd(f, u64::MAX, 1, MAP_MAX),
        FsError::Invalid,
    );
    refused(
        &mut fs,
        &map_ahead_cmd(999, 0, 1, MAP_MAX),
        FsError::Invalid,
    );
    refused(&mut fs, &map_ahead_cmd(999, 0, 1, 5), FsError::NotFound);
    refused(&mut fs, &map_ahead_cmd(ROOT, 0, 1, 5), FsError::Invalid);
    assert_eq!(map_ahead(&mut fs, f, 0, 1, MAP_MAX - 1).unwrap().len(), 11);
}

/// Four files written sequentially at once, 1 MiB (16 blocks) per `Map` with the
/// mount's 256 blocks ahead, on a volume of 512 blocks that holds all four (64 blocks
/// each) with room to spare: no writer finds it full because the others took blocks
/// ahead. Before the share bound, the first two writers took every block.
#[test]
fn blocks_ahead_leave_room_for_other_writers() {
    let mut fs = formatted(512);
    let files: Vec<Ino> = (0..4u8)
        .map(|i| create(&mut fs, ROOT, &[b'f', b'0' + i], Kind::File, t(2)))
        .collect();
    for step in 0..4 {
        for &f in &files {
            let got = map_ahead(&mut fs, f, step * 16, 16, 256);
            assert!(got.is_ok(), "file {f}, blocks {}..: {got:?}", step * 16);
        }
    }
    let free = statfs(&fs).free;
    assert!(free > 0, "{free}");
    fs.check().unwrap();
}

/// The blocks ahead stop at the largest file; the requested ones may not pass it.
#[test]
fn map_ahead_stops_at_the_largest_file() {
    let mut fs = formatted(16);
    let max = fs.max_file_blocks();
    assert_eq!(max, 16 * 1024);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let m = map_ahead(&mut fs, f, max - 3, 1, 10).unwrap();
    assert_eq!(
        m.iter().map(|x| x.block).collect::<Vec<_>>(),
        vec![max - 3, max - 2, max - 1]
    );
    assert_eq!(statfs(&fs).free, 13);
    let m = map_ahead(&mut fs, f, max - 1, 1, 5).unwrap();
    assert_eq!(m.len(), 1);
    refused(&mut fs, &map_ahead_cmd(f, max, 1, 0), FsError::TooLarge);
    refused(&mut fs, &map_ahead_cmd(f, max - 1, 2, 0), FsError::TooLarge);
    // The file can still be cut back to nothing.
    apply_ok(&mut fs, &size_cmd(f, 0, t(3)));
    assert_eq!(statfs(&fs).free, 16);
}

/// `Written` with `trim` frees what lies past the end of file when all of it is
/// unwritten (what the mount took ahead and never used), and nothing otherwise.
#[test]
fn written_trim_frees_unwritten_blocks_past_the_end() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let m = map_ahead(&mut fs, f, 0, 1, 7).unwrap();
    assert_eq!(m.len(), 8);
    map(&mut fs, f, 12, 1).unwrap();
    assert_eq!(statfs(&fs).free, 55);
    // Without trim, nothing goes.
    written(&mut fs, f, BSZ + 10, t(3), &[(0, 2)], false);
    assert_eq!(statfs(&fs).free, 55);
    // With it: blocks 2.. (all unwritten) go, holes and all.
    let a = written(&mut fs, f, BSZ + 10, t(4), &[], true);
    assert_eq!((a.size, a.blocks, a.mtime), (BSZ + 10, 2, t(4)));
    assert_eq!(attr(&fs, f), a);
    assert_eq!(statfs(&fs).free, 62);
    let written_two: Vec<Mapping> = m[..2]
        .iter()
        .map(|x| Mapping { fresh: false, ..*x })
        .collect();
    assert_eq!(extents(&fs, f), written_two);
    assert!(fs.inode(f).unwrap().unwritten.is_empty());
    // Nothing past the end: nothing to do.
    let before = fs.clone();
    let a = written(&mut fs, f, 0, t(5), &[], true);
    assert_eq!((a.size, a.blocks), (BSZ + 10, 2));
    assert_eq!(statfs(&fs), statfs(&before));

    // The new size counts: writing block 3 makes the end 4 blocks; 4.. go, and an
    // unwritten block before the end stays.
    map_ahead(&mut fs, f, 2, 2, 4).unwrap();
    assert_eq!(statfs(&fs).free, 56);
    let a = written(&mut fs, f, 4 * BSZ, t(6), &[(3, 1)], true);
    assert_eq!((a.size, a.blocks), (4 * BSZ, 4));
    assert_eq!(statfs(&fs).free, 60);
    assert_eq!(fresh_blocks(&fs, f), vec![2]);

    // One block past the end written (by an earlier Written): nothing is freed, not
    // even the unwritten blocks around it.
    map_ahead(&mut fs, f, 4, 1, 3).unwrap();
    assert_eq!(statfs(&fs).free, 56);
    written(&mut fs, f, 0, t(7), &[(5, 1)], false);
    let before = fs.clone();
    let a = written(&mut fs, f, 0, t(8), &[], true);
    assert_eq!((a.size, a.blocks), (4 * BSZ, 8));
    assert_eq!(statfs(&fs).free, 56);
    assert_eq!(fresh_blocks(&fs, f), vec![2, 4, 6, 7]);
    assert_eq!(
        fs.inode(f).unwrap().extents,
        before.inode(f).unwrap().extents
    );
    // Nor when the same Written names a block past the end.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(9));
    map_ahead(&mut fs, g, 0, 1, 3).unwrap();
    let a = written(&mut fs, g, BSZ, t(9), &[(0, 1), (2, 1)], true);
    assert_eq!(a.blocks, 4);
    assert_eq!(fresh_blocks(&fs, g), vec![1, 3]);
    assert_eq!(statfs(&fs).free, 52);
    // A truncation still cuts them (written or not).
    apply_ok(&mut fs, &size_cmd(f, 4 * BSZ, t(10)));
    assert_eq!(attr(&fs, f).blocks, 4);
    assert_eq!(fresh_blocks(&fs, f), vec![2]);
    assert_eq!(statfs(&fs).free, 56);
}

#[test]
fn written_refusals() {
    let mut fs = formatted(16);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let s = create(&mut fs, ROOT, b"s", Kind::Symlink, t(2));
    let p = create(&mut fs, ROOT, b"p", Kind::Fifo, t(2));
    map_ahead(&mut fs, f, 0, 1, 3).unwrap();
    let limit = fs.max_file_blocks() * BSZ;
    // Too large: the size, or too many runs; checked before the inode.
    refused(
        &mut fs,
        &written_cmd(f, limit + 1, t(3), &[(0, 1)], true),
        FsError::TooLarge,
    );
    refused(
        &mut fs,
        &written_cmd(999, u64::MAX, t(3), &[], false),
        FsError::TooLarge,
    );
    let many: Vec<(u64, u64)> = (0..=MAP_MAX).map(|b| (b, 1)).collect();
    refused(
        &mut fs,
        &written_cmd(f, 0, t(3), &many, true),
        FsError::TooLarge,
    );
    for ino in [d, s, p, ROOT] {
        refused(
            &mut fs,
            &written_cmd(ino, 0, t(3), &[(0, 1)], true),
            FsError::Invalid,
        );
    }
    refused(
        &mut fs,
        &written_cmd(999, 0, t(3), &[(0, 1)], true),
        FsError::NotFound,
    );
    let mut blank = FsState::default();
    refused(
        &mut blank,
        &written_cmd(ROOT, 0, t(3), &[], false),
        FsError::NotFormatted,
    );
    // At the limits: fine.
    let a = written(&mut fs, f, limit, t(4), &many[..MAP_MAX as usize], false);
    assert_eq!((a.size, a.blocks), (limit, 4));
    assert!(fresh_blocks(&fs, f).is_empty());
}

/// A truncation drops the unwritten blocks past the new end with the rest; those
/// before it stay unwritten.
#[test]
fn truncation_drops_unwritten_blocks_past_the_end() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(2));
    map_ahead(&mut fs, f, 0, 2, 6).unwrap();
    map(&mut fs, f, 10, 1).unwrap();
    written(&mut fs, f, 2 * BSZ, t(3), &[(0, 2)], false);
    assert_eq!(statfs(&fs).free, 55);
    assert_eq!(
        fs.inode(f).unwrap().unwritten,
        BTreeSet::from([2, 3, 4, 5, 6, 7, 10])
    );
    // Down to 4 blocks and a bit: 5.. go (unwritten or not), 2..5 stay unwritten.
    let a = ok_attr(
        Ok(apply_ok(&mut fs, &size_cmd(f, 5 * BSZ - 1, t(4)))),
        "truncate",
    );
    assert_eq!(a.blocks, 5);
    assert_eq!(fs.inode(f).unwrap().unwritten, BTreeSet::from([2, 3, 4]));
    assert_eq!(fresh_blocks(&fs, f), vec![2, 3, 4]);
    assert_eq!(statfs(&fs).free, 59);
    fs.check().unwrap();
    // Growing keeps them as they are.
    apply_ok(&mut fs, &size_cmd(f, 100 * BSZ, t(5)));
    assert_eq!(fs.inode(f).unwrap().unwritten, BTreeSet::from([2, 3, 4]));
    // Down to a written block: no unwritten block is left.
    apply_ok(&mut fs, &size_cmd(f, BSZ + 1, t(6)));
    assert!(fs.inode(f).unwrap().unwritten.is_empty());
    assert_eq!(statfs(&fs).free, 62);
    // The freed blocks are free: another file takes the whole rest of the volume,
    // fresh.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(7));
    let mg = map(&mut fs, g, 0, 14).unwrap();
    assert!(mg.iter().all(|x| x.fresh));
    let all: BTreeSet<u64> = mg.iter().map(|x| x.lba).chain(lbas(&fs, f)).collect();
    assert_eq!(all, (0..16).collect());
    // To zero, and an orphan's unwritten blocks go with it.
    apply_ok(&mut fs, &size_cmd(f, 0, t(8)));
    assert!(fs.inode(f).unwrap().unwritten.is_empty());
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"g", false, t(9)));
    apply_ok(&mut fs, &FsCommand::Drop { ino: g });
    assert_eq!(statfs(&fs).free, 64);
}

// ---------------------------------------------------------------------------------
// Timestamps.
// ---------------------------------------------------------------------------------

#[test]
fn timestamps_follow_the_commands() {
    let mut fs = formatted(8);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let r = attr(&fs, ROOT);
    assert_eq!((r.mtime, r.ctime), (t(2), t(2)));
    let a = attr(&fs, d);
    assert_eq!((a.atime, a.mtime, a.ctime), (t(2), t(2), t(2)));

    let f = create(&mut fs, d, b"f", Kind::File, t(3));
    let a = attr(&fs, d);
    assert_eq!((a.mtime, a.ctime), (t(3), t(3)));
    assert_eq!(attr(&fs, ROOT).mtime, t(2), "only the parent changes");

    // Link: the inode's ctime, the new parent's mtime and ctime.
    apply_ok(&mut fs, &link_cmd(f, ROOT, b"g", t(4)));
    let a = attr(&fs, f);
    assert_eq!((a.mtime, a.ctime), (t(3), t(4)));
    let r = attr(&fs, ROOT);
    assert_eq!((r.mtime, r.ctime), (t(4), t(4)));
    assert_eq!(attr(&fs, d).mtime, t(3));

    // Unlink: the same.
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"g", false, t(5)));
    let a = attr(&fs, f);
    assert_eq!((a.mtime, a.ctime), (t(3), t(5)));
    let r = attr(&fs, ROOT);
    assert_eq!((r.mtime, r.ctime), (t(5), t(5)));

    // Rename: the inode's ctime, both parents.
    let e = create(&mut fs, ROOT, b"e", Kind::Dir, t(6));
    apply_ok(&mut fs, &mv(d, b"f", e, b"f2", t(7)));
    let a = attr(&fs, f);
    assert_eq!((a.atime, a.mtime, a.ctime), (t(3), t(3), t(7)));
    for dir in [d, e] {
        let a = attr(&fs, dir);
        assert_eq!((a.mtime, a.ctime), (t(7), t(7)));
    }
    assert_eq!(attr(&fs, ROOT).mtime, t(6));
    // Renaming a directory changes its ctime too.
    apply_ok(&mut fs, &mv(ROOT, b"e", d, b"e", t(8)));
    assert_eq!(attr(&fs, e).ctime, t(8));
    assert_eq!(attr(&fs, ROOT).mtime, t(8));
    assert_eq!(attr(&fs, d).mtime, t(8));

    // Written: size only grows; mtime and ctime.
    let a = written(&mut fs, f, 100, t(9), &[], false);
    assert_eq!((a.size, a.mtime, a.ctime, a.atime), (100, t(9), t(9), t(3)));
    let a = written(&mut fs, f, 50, t(10), &[(0, 1)], true);
    assert_eq!((a.size, a.mtime, a.ctime), (100, t(10), t(10)));
    refused(
        &mut fs,
        &written_cmd(d, 1, t(10), &[], false),
        FsError::Invalid,
    );

    // SetAttr: explicit times, ctime now; a size change sets mtime too.
    let a = ok_attr(
        Ok(apply_ok(
            &mut fs,
            &FsCommand::SetAttr {
                ino: f,
                set: SetAttr {
                    atime: Some(t(100)),
                    mtime: Some(t(200)),
                    ..SetAttr::default()
                },
                now: t(11),
            },
        )),
        "utimens",
    );
    assert_eq!((a.atime, a.mtime, a.ctime), (t(100), t(200), t(11)));
    let a = ok_attr(Ok(apply_ok(&mut fs, &size_cmd(f, 10, t(12)))), "truncate");
    assert_eq!(
        (a.atime, a.mtime, a.ctime, a.size),
        (t(100), t(12), t(12), 10)
    );

    // Rmdir: the parent.
    apply_ok(&mut fs, &unlink_cmd(e, b"f2", false, t(13)));
    let a = attr(&fs, e);
    assert_eq!((a.mtime, a.ctime), (t(13), t(13)));
    assert_eq!(attr(&fs, f).ctime, t(13));
    apply_ok(&mut fs, &unlink_cmd(d, b"e", true, t(14)));
    let a = attr(&fs, d);
    assert_eq!((a.mtime, a.ctime), (t(14), t(14)));
}

// ---------------------------------------------------------------------------------
// Serialization and SharedFs.
// ---------------------------------------------------------------------------------

/// A state with a bit of everything: nested directories, hard links, symlinks,
/// mapped and truncated files, an orphan.
fn busy_state() -> (FsState, Vec<FsCommand>) {
    let mut fs = formatted(64);
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let e = create(&mut fs, d, b"e", Kind::Dir, t(3));
    let f = create(&mut fs, e, b"f", Kind::File, t(4));
    let o = create(&mut fs, ROOT, b"o", Kind::File, t(4));
    create(&mut fs, ROOT, b"s", Kind::Symlink, t(5));
    create(&mut fs, d, b"p", Kind::Fifo, t(5));
    let cmds = vec![
        link_cmd(f, ROOT, b"f-link", t(6)),
        map_cmd(f, 0, 7),
        map_cmd(f, 20, 2),
        map_ahead_cmd(o, 0, 3, 4),
        written_cmd(f, 22 * BSZ, t(7), &[(0, 3), (21, 1)], false),
        written_cmd(o, 2 * BSZ, t(7), &[(0, 2)], true),
        size_cmd(f, 5 * BSZ + 7, t(8)),
        unlink_cmd(ROOT, b"o", false, t(9)),
        mv(d, b"e", ROOT, b"e", t(10)),
    ];
    for c in &cmds {
        apply_ok(&mut fs, c);
    }
    (fs, cmds)
}

#[test]
fn postcard_round_trip() {
    let (fs, cmds) = busy_state();
    let bytes = postcard::to_stdvec(&fs).unwrap();
    let mut back: FsState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, fs);
    // Unwritten blocks travel too.
    assert_eq!(back.inode(4).unwrap().unwritten, BTreeSet::from([3, 4, 5]));
    back.check().unwrap();
    assert_eq!(postcard::to_stdvec(&back).unwrap(), bytes);

    // The decoded state behaves the same from here on (allocation included).
    let mut orig = fs.clone();
    let later = vec![
        create_cmd(ROOT, b"new", Kind::File, t(20)),
        map_cmd(4, 30, 4),
        map_ahead_cmd(4, 0, 2, 6),
        written_cmd(4, 9 * BSZ, t(21), &[(0, 3)], true),
        map_cmd(2, 0, 1),
        FsCommand::Drop { ino: 5 },
        create_cmd(ROOT, b"d", Kind::File, t(21)),
        mv(ROOT, b"e", ROOT, b"e2", t(22)),
    ];
    for c in &later {
        assert_eq!(orig.apply(c), back.apply(c), "{c:?}");
        assert_eq!(orig, back);
    }
    back.check().unwrap();

    // An unformatted state, and the commands and replies themselves.
    let empty = FsState::default();
    let b: FsState = postcard::from_bytes(&postcard::to_stdvec(&empty).unwrap()).unwrap();
    assert_eq!(b, empty);
    for c in cmds.iter().chain(&later) {
        let b: FsCommand = postcard::from_bytes(&postcard::to_stdvec(c).unwrap()).unwrap();
        assert_eq!(&b, c);
    }
    let replies = [
        FsReply::Orphaned(Some(7)),
        FsReply::Mapped(vec![Mapping {
            block: 1,
            lba: 2,
            fresh: true,
        }]),
        fs.query(&FsQuery::ReadDir {
            ino: ROOT,
            after: None,
        })
        .unwrap(),
        fs.query(&FsQuery::StatFs).unwrap(),
    ];
    for r in replies {
        let b: FsReply = postcard::from_bytes(&postcard::to_stdvec(&r).unwrap()).unwrap();
        assert_eq!(b, r);
    }
    let e: Result<FsReply, FsError> = Err(FsError::NotEmpty);
    let b: Result<FsReply, FsError> =
        postcard::from_bytes(&postcard::to_stdvec(&e).unwrap()).unwrap();
    assert_eq!(b, e);
}

#[test]
fn shared_fs_clone_copies_share_shares() {
    let shared = SharedFs::default();
    assert!(!shared.read().formatted);
    shared.write().apply(&format_cmd(16)).unwrap();
    let same = shared.share();
    same.write()
        .apply(&create_cmd(ROOT, b"a", Kind::File, t(2)))
        .unwrap();
    assert!(
        lookup(&shared.read(), ROOT, b"a").is_ok(),
        "share() is the same state"
    );
    assert_eq!(same, shared);

    let copy = shared.clone();
    assert_eq!(copy, shared, "a fresh copy has equal contents");
    copy.write()
        .apply(&create_cmd(ROOT, b"b", Kind::File, t(3)))
        .unwrap();
    assert!(lookup(&copy.read(), ROOT, b"b").is_ok());
    assert_eq!(
        lookup(&shared.read(), ROOT, b"b"),
        Err(FsError::NotFound),
        "clone() is a deep copy"
    );
    assert_eq!(lookup(&same.read(), ROOT, b"b"), Err(FsError::NotFound));
    assert_ne!(copy, shared);
    // And the other way round: the original's changes do not reach the copy.
    let a = lookup(&shared.read(), ROOT, b"a").unwrap();
    shared.write().apply(&map_cmd(a, 0, 2)).unwrap();
    assert_eq!(extents(&same.read(), a).len(), 2);
    assert!(extents(&copy.read(), a).is_empty());
    assert_eq!(statfs(&copy.read()).free, 16);
    assert_eq!(statfs(&shared.read()).free, 14);

    // Serializes as the state it holds.
    let bytes = postcard::to_stdvec(&shared).unwrap();
    assert_eq!(bytes, postcard::to_stdvec(&*shared.read()).unwrap());
    let back: SharedFs = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, shared);
    back.write()
        .apply(&create_cmd(ROOT, b"c", Kind::File, t(4)))
        .unwrap();
    assert_eq!(lookup(&shared.read(), ROOT, b"c"), Err(FsError::NotFound));
}

// ---------------------------------------------------------------------------------
// The property: random commands against a naive model.
// ---------------------------------------------------------------------------------

const TOTAL: u64 = 64;
/// The largest file the property's volume allows, in blocks.
const MAX_BLOCKS: u64 = TOTAL * 1024;
/// Names the property uses; the last three are invalid.
const NAMES: [&[u8]; 7] = [b"a", b"b", b"c", b"d", b"", b"..", b"x/y"];
/// An inode number never given out.
const BOGUS: Ino = 9999;

/// Which inode an operation names, resolved against the model at the time.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Dir(u8),
    File(u8),
    Orphan(u8),
    Any(u8),
}

/// Which directory entry: an existing one, or a directory and a name.
#[derive(Debug, Clone, Copy)]
enum Loc {
    Entry(u8),
    Named(Pick, u8),
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        dir: Pick,
        name: u8,
        kind: Kind,
    },
    Link {
        ino: Pick,
        dir: Pick,
        name: u8,
    },
    Unlink {
        at: Loc,
        dir: bool,
    },
    Rename {
        from: Loc,
        to: Loc,
        noreplace: bool,
        exchange: bool,
    },
    SetAttr {
        ino: Pick,
        size: Option<u64>,
        perm: Option<u16>,
        gid: Option<u32>,
    },
    Map {
        ino: Pick,
        first: u64,
        count: u64,
        ahead: u64,
    },
    Written {
        ino: Pick,
        size: u64,
        /// Runs of file blocks, `(first, count)`.
        written: Vec<(u64, u64)>,
        trim: bool,
    },
    Drop {
        ino: Pick,
    },
}

/// What a rename the model allows does.
#[derive(Debug)]
enum Renamed {
    Noop,
    Exchange {
        src: Ino,
        dst: Ino,
    },
    Move {
        src: Ino,
        replaced: Option<Ino>,
        orphan: Option<Ino>,
    },
}

/// The model of a regular file.
#[derive(Debug, Clone, Default)]
struct FileM {
    size: u64,
    /// File block -> data block.
    blocks: BTreeMap<u64, u64>,
    /// The file blocks handed out and not yet named by a `Written`.
    unwritten: BTreeSet<u64>,
}

impl FileM {
    /// Drops every file block from `keep` on.
    fn cut(&mut self, keep: u64) {
        self.blocks.retain(|b, _| *b < keep);
        self.unwritten.retain(|b| *b < keep);
    }

    /// The mappings of file blocks `first .. end`, as the state answers them.
    fn mappings(&self, first: u64, end: u64) -> Vec<Mapping> {
        self.blocks
            .range(first..end)
            .map(|(b, l)| Mapping {
                block: *b,
                lba: *l,
                fresh: self.unwritten.contains(b),
            })
            .collect()
    }
}

/// What a `Map` the model allows hands out.
struct MapPlan {
    /// The requested file blocks without a data block.
    missing: Vec<u64>,
    /// The file blocks handed out ahead.
    extra: Vec<u64>,
    /// The end of the answer (`first + count + ahead`, ahead clamped).
    end: u64,
}

/// The naive model: names and data blocks only.
#[derive(Debug, Clone)]
struct Model {
    kinds: BTreeMap<Ino, Kind>,
    /// Directory -> (parent, entries).
    dirs: BTreeMap<Ino, (Ino, BTreeMap<Vec<u8>, Ino>)>,
    files: BTreeMap<Ino, FileM>,
    max_ino: Ino,
}

fn model_check_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl Model {
    fn new() -> Model {
        Model {
            kinds: BTreeMap::from([(ROOT, Kind::Dir)]),
            dirs: BTreeMap::from([(ROOT, (ROOT, BTreeMap::new()))]),
            files: BTreeMap::new(),
            max_ino: ROOT,
        }
    }

    fn pick(&self, p: Pick) -> Ino {
        fn choose(v: &[Ino], i: u8) -> Ino {
            v[usize::from(i) % v.len()]
        }
        match p {
            Pick::Dir(i) => choose(&self.dirs.keys().copied().collect::<Vec<_>>(), i),
            Pick::File(i) => {
                let v: Vec<Ino> = self.files.keys().copied().collect();
                if v.is_empty() {
                    self.pick(Pick::Any(i))
                } else {
                    choose(&v, i)
                }
            }
            Pick::Orphan(i) => {
                let v: Vec<Ino> = self
                    .kinds
                    .iter()
                    .filter(|(ino, k)| **k != Kind::Dir && self.names(**ino) == 0)
                    .map(|(ino, _)| *ino)
                    .collect();
                if v.is_empty() {
                    self.pick(Pick::File(i))
                } else {
                    choose(&v, i)
                }
            }
            Pick::Any(i) => {
                let mut v: Vec<Ino> = self.kinds.keys().copied().collect();
                v.push(BOGUS);
                choose(&v, i)
            }
        }
    }

    fn loc(&self, l: Loc) -> (Ino, Vec<u8>) {
        match l {
            Loc::Entry(i) => {
                let all: Vec<(Ino, Vec<u8>)> = self
                    .dirs
                    .iter()
                    .flat_map(|(d, (_, e))| e.keys().map(|n| (*d, n.clone())))
                    .collect();
                if all.is_empty() {
                    (ROOT, b"a".to_vec())
                } else {
                    all[usize::from(i) % all.len()].clone()
                }
            }
            Loc::Named(p, n) => (self.pick(p), NAMES[usize::from(n)].to_vec()),
        }
    }

    fn kind(&self, ino: Ino) -> Result<Kind, FsError> {
        self.kinds.get(&ino).copied().ok_or(FsError::NotFound)
    }

    fn dir(&self, ino: Ino) -> Result<&BTreeMap<Vec<u8>, Ino>, FsError> {
        match self.kind(ino)? {
            Kind::Dir => Ok(&self.dirs[&ino].1),
            _ => Err(FsError::NotDir),
        }
    }

    fn entries_mut(&mut self, dir: Ino) -> &mut BTreeMap<Vec<u8>, Ino> {
        &mut self.dirs.get_mut(&dir).unwrap().1
    }

    /// How many entries name `ino`.
    fn names(&self, ino: Ino) -> u32 {
        self.dirs
            .values()
            .map(|(_, e)| e.values().filter(|i| **i == ino).count() as u32)
            .sum()
    }

    fn nlink(&self, ino: Ino) -> u32 {
        match self.dirs.get(&ino) {
            Some((_, e)) => 2 + e.values().filter(|i| self.dirs.contains_key(i)).count() as u32,
            None => self.names(ino),
        }
    }

    /// Whether directory `ino` is `ancestor` or below it.
    fn within(&self, mut ino: Ino, ancestor: Ino) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match self.dirs.get(&ino) {
                Some((p, _)) if *p != ino => ino = *p,
                _ => return false,
            }
        }
    }

    fn used_lbas(&self) -> BTreeSet<u64> {
        self.files
            .values()
            .flat_map(|f| f.blocks.values().copied())
            .collect()
    }

    fn used(&self) -> u64 {
        self.files.values().map(|f| f.blocks.len() as u64).sum()
    }

    fn remove(&mut self, ino: Ino) {
        self.kinds.remove(&ino);
        self.dirs.remove(&ino);
        self.files.remove(&ino);
    }

    fn can_create(&self, parent: Ino, name: &[u8]) -> Result<(), FsError> {
        model_check_name(name)?;
        if self.dir(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        Ok(())
    }

    fn can_link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<(), FsError> {
        model_check_name(name)?;
        if self.kind(ino)? == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if self.names(ino) == 0 {
            return Err(FsError::NotFound);
        }
        if self.dir(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        Ok(())
    }

    /// The inode named, and the orphan the unlink leaves.
    fn can_unlink(
        &self,
        parent: Ino,
        name: &[u8],
        dir: bool,
    ) -> Result<(Ino, Option<Ino>), FsError> {
        model_check_name(name)?;
        let ino = *self.dir(parent)?.get(name).ok_or(FsError::NotFound)?;
        let is_dir = self.kind(ino)? == Kind::Dir;
        match (is_dir, dir) {
            (true, false) => Err(FsError::IsDir),
            (false, true) => Err(FsError::NotDir),
            (true, true) if !self.dirs[&ino].1.is_empty() => Err(FsError::NotEmpty),
            (true, true) => Ok((ino, None)),
            (false, false) => Ok((ino, (self.names(ino) == 1).then_some(ino))),
        }
    }

    fn can_rename(
        &self,
        (p, n): (Ino, &[u8]),
        (np, nn): (Ino, &[u8]),
        noreplace: bool,
        exchange: bool,
    ) -> Result<Renamed, FsError> {
        model_check_name(n)?;
        model_check_name(nn)?;
        if noreplace && exchange {
            return Err(FsError::Invalid);
        }
        let src = *self.dir(p)?.get(n).ok_or(FsError::NotFound)?;
        let dst = self.dir(np)?.get(nn).copied();
        let src_dir = self.kind(src)? == Kind::Dir;
        if src_dir && self.within(np, src) {
            return Err(FsError::Invalid);
        }
        if exchange {
            let dst = dst.ok_or(FsError::NotFound)?;
            if self.kind(dst)? == Kind::Dir && self.within(p, dst) {
                return Err(FsError::Invalid);
            }
            return Ok(Renamed::Exchange { src, dst });
        }
        let Some(dst) = dst else {
            return Ok(Renamed::Move {
                src,
                replaced: None,
                orphan: None,
            });
        };
        if noreplace {
            return Err(FsError::Exists);
        }
        if dst == src {
            return Ok(Renamed::Noop);
        }
        let dst_dir = self.kind(dst)? == Kind::Dir;
        match (src_dir, dst_dir) {
            (true, false) => Err(FsError::NotDir),
            (false, true) => Err(FsError::IsDir),
            (true, true) if !self.dirs[&dst].1.is_empty() => Err(FsError::NotEmpty),
            _ => Ok(Renamed::Move {
                src,
                replaced: Some(dst),
                orphan: (!dst_dir && self.names(dst) == 1).then_some(dst),
            }),
        }
    }

    fn can_set_size(&self, ino: Ino, size: Option<u64>) -> Result<(), FsError> {
        let kind = self.kind(ino)?;
        if let Some(size) = size {
            match kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
            if size.div_ceil(BSZ) > MAX_BLOCKS {
                return Err(FsError::TooLarge);
            }
        }
        Ok(())
    }

    /// The file blocks the map hands out.
    fn can_map(&self, ino: Ino, first: u64, count: u64, ahead: u64) -> Result<MapPlan, FsError> {
        if count == 0 || count > MAP_MAX || count + ahead > MAP_MAX {
            return Err(FsError::Invalid);
        }
        let end = match first.checked_add(count) {
            Some(end) if end <= MAX_BLOCKS => end,
            _ => return Err(FsError::TooLarge),
        };
        if self.kind(ino)? != Kind::File {
            return Err(FsError::Invalid);
        }
        let have = &self.files[&ino].blocks;
        let missing: Vec<u64> = (first..end).filter(|b| !have.contains_key(b)).collect();
        let free = TOTAL - self.used();
        if missing.len() as u64 > free {
            return Err(FsError::NoSpace);
        }
        let ahead_end = end + ahead.min(MAX_BLOCKS - end);
        // Ahead: at most a share of what is then free.
        let extra: Vec<u64> = (end..ahead_end)
            .filter(|b| !have.contains_key(b))
            .take(((free - missing.len() as u64) / AHEAD_SHARE) as usize)
            .collect();
        Ok(MapPlan {
            missing,
            extra,
            end: ahead_end,
        })
    }

    fn can_write(&self, ino: Ino, size: u64, runs: usize) -> Result<(), FsError> {
        if size.div_ceil(BSZ) > MAX_BLOCKS || runs as u64 > MAP_MAX {
            return Err(FsError::TooLarge);
        }
        match self.kind(ino)? {
            Kind::File => Ok(()),
            _ => Err(FsError::Invalid),
        }
    }

    fn can_drop(&self, ino: Ino) -> Result<(), FsError> {
        self.kind(ino)?;
        if ino == ROOT || self.nlink(ino) != 0 {
            return Err(FsError::Invalid);
        }
        Ok(())
    }
}

/// A refusal: the right error, and nothing changed.
fn refusal(
    fs: &FsState,
    before: &FsState,
    cmd: &FsCommand,
    got: Result<FsReply, FsError>,
    want: FsError,
) {
    assert_eq!(got, Err(want), "{cmd:?}");
    assert_eq!(fs, before, "the refused {cmd:?} changed the state");
}

fn succeeded(cmd: &FsCommand, got: Result<FsReply, FsError>) -> FsReply {
    got.unwrap_or_else(|e| panic!("{cmd:?} refused with {e:?}; the model accepts it"))
}

fn assert_touched(fs: &FsState, dir: Ino, now: Time) {
    let a = attr(fs, dir);
    assert_eq!((a.mtime, a.ctime), (now, now), "directory {dir} times");
}

/// Applies one operation to both the state and the model, checking the answer.
fn step(m: &mut Model, fs: &mut FsState, op: &Op, now: Time) {
    let before = fs.clone();
    match *op {
        Op::Create { dir, name, kind } => {
            let parent = m.pick(dir);
            let name = NAMES[usize::from(name)];
            let cmd = FsCommand::Create {
                parent,
                name: name.to_vec(),
                kind,
                perm: 0o170_644,
                uid: 3,
                gid: 4,
                rdev: 0,
                target: TARGET.to_vec(),
                now,
            };
            let got = fs.apply(&cmd);
            if let Err(e) = m.can_create(parent, name) {
                return refusal(fs, &before, &cmd, got, e);
            }
            let a = ok_attr(Ok(succeeded(&cmd, got)), "create");
            assert!(a.ino > m.max_ino, "inode {} given out again", a.ino);
            assert!(a.ino != BOGUS);
            assert_eq!(a.kind, kind);
            // A set-gid directory passes on its group, and its set-gid bit to
            // directories.
            let p = attr(&before, parent);
            let (gid, perm) = match (p.perm & 0o2000 != 0, kind) {
                (false, _) => (4, 0o644),
                (true, Kind::Dir) => (p.gid, 0o2644),
                (true, _) => (p.gid, 0o644),
            };
            assert_eq!(a.perm, perm);
            assert_eq!((a.uid, a.gid, a.blocks), (3, gid, 0));
            assert_eq!(a.nlink, if kind == Kind::Dir { 2 } else { 1 });
            let size = if kind == Kind::Symlink {
                TARGET.len() as u64
            } else {
                0
            };
            assert_eq!(a.size, size);
            assert_eq!((a.atime, a.mtime, a.ctime), (now, now, now));
            m.max_ino = a.ino;
            m.kinds.insert(a.ino, kind);
            m.entries_mut(parent).insert(name.to_vec(), a.ino);
            match kind {
                Kind::Dir => {
                    m.dirs.insert(a.ino, (parent, BTreeMap::new()));
                }
                Kind::File => {
                    m.files.insert(a.ino, FileM::default());
                }
                _ => {}
            }
            assert_touched(fs, parent, now);
        }
        Op::Link { ino, dir, name } => {
            let ino = m.pick(ino);
            let parent = m.pick(dir);
            let name = NAMES[usize::from(name)];
            let cmd = link_cmd(ino, parent, name, now);
            let got = fs.apply(&cmd);
            if let Err(e) = m.can_link(ino, parent, name) {
                return refusal(fs, &before, &cmd, got, e);
            }
            let a = ok_attr(Ok(succeeded(&cmd, got)), "link");
            assert_eq!((a.ino, a.nlink, a.ctime), (ino, m.names(ino) + 1, now));
            m.entries_mut(parent).insert(name.to_vec(), ino);
            assert_touched(fs, parent, now);
        }
        Op::Unlink { at, dir } => {
            let (parent, name) = m.loc(at);
            let cmd = unlink_cmd(parent, &name, dir, now);
            let got = fs.apply(&cmd);
            let (ino, orphan) = match m.can_unlink(parent, &name, dir) {
                Ok(x) => x,
                Err(e) => return refusal(fs, &before, &cmd, got, e),
            };
            assert_eq!(succeeded(&cmd, got), FsReply::Orphaned(orphan), "{cmd:?}");
            m.entries_mut(parent).remove(&name);
            if dir {
                m.remove(ino);
                assert!(fs.inode(ino).is_none(), "rmdir left inode {ino}");
            } else {
                assert_eq!(attr(fs, ino).ctime, now);
            }
            assert_touched(fs, parent, now);
        }
        Op::Rename {
            from,
            to,
            noreplace,
            exchange,
        } => {
            let (p, n) = m.loc(from);
            let (np, nn) = m.loc(to);
            let cmd = rename_cmd(p, &n, np, &nn, noreplace, exchange, now);
            let got = fs.apply(&cmd);
            let renamed = match m.can_rename((p, &n), (np, &nn), noreplace, exchange) {
                Ok(r) => r,
                Err(e) => return refusal(fs, &before, &cmd, got, e),
            };
            match renamed {
                Renamed::Noop => {
                    assert_eq!(succeeded(&cmd, got), FsReply::Orphaned(None));
                    assert_eq!(*fs, before, "{cmd:?} onto itself changed the state");
                }
                Renamed::Exchange { src, dst } => {
                    assert_eq!(succeeded(&cmd, got), FsReply::Orphaned(None));
                    m.entries_mut(p).insert(n.clone(), dst);
                    m.entries_mut(np).insert(nn.clone(), src);
                    if let Some(d) = m.dirs.get_mut(&src) {
                        d.0 = np;
                    }
                    if let Some(d) = m.dirs.get_mut(&dst) {
                        d.0 = p;
                    }
                    assert_eq!(attr(fs, src).ctime, now);
                    assert_eq!(attr(fs, dst).ctime, now);
                    assert_touched(fs, p, now);
                    assert_touched(fs, np, now);
                }
                Renamed::Move {
                    src,
                    replaced,
                    orphan,
                } => {
                    assert_eq!(succeeded(&cmd, got), FsReply::Orphaned(orphan), "{cmd:?}");
                    if let Some(dst) = replaced {
                        if m.kinds[&dst] == Kind::Dir {
                            m.remove(dst);
                            assert!(fs.inode(dst).is_none());
                        } else {
                            assert_eq!(attr(fs, dst).ctime, now);
                        }
                    }
                    m.entries_mut(p).remove(&n);
                    m.entries_mut(np).insert(nn.clone(), src);
                    if let Some(d) = m.dirs.get_mut(&src) {
                        d.0 = np;
                    }
                    assert_eq!(attr(fs, src).ctime, now);
                    assert_touched(fs, p, now);
                    assert_touched(fs, np, now);
                }
            }
        }
        Op::SetAttr {
            ino,
            size,
            perm,
            gid,
        } => {
            let ino = m.pick(ino);
            let cmd = FsCommand::SetAttr {
                ino,
                set: SetAttr {
                    size,
                    perm,
                    gid,
                    ..SetAttr::default()
                },
                now,
            };
            let got = fs.apply(&cmd);
            if let Err(e) = m.can_set_size(ino, size) {
                return refusal(fs, &before, &cmd, got, e);
            }
            let old = attr(&before, ino);
            let a = ok_attr(Ok(succeeded(&cmd, got)), "setattr");
            assert_eq!(a.ctime, now);
            assert_eq!(a.perm, perm.map_or(old.perm, |p| p & 0o7777));
            assert_eq!((a.uid, a.gid), (old.uid, gid.unwrap_or(old.gid)));
            if let Some(size) = size {
                assert_eq!((a.size, a.mtime), (size, now));
                let f = m.files.get_mut(&ino).unwrap();
                f.size = size;
                // Unwritten blocks past the new end go with the rest.
                f.cut(size.div_ceil(BSZ));
                assert_eq!(a.blocks, f.blocks.len() as u64);
            } else {
                assert_eq!(
                    (a.size, a.mtime, a.blocks),
                    (old.size, old.mtime, old.blocks)
                );
            }
        }
        Op::Map {
            ino,
            first,
            count,
            ahead,
        } => {
            let ino = m.pick(ino);
            let cmd = map_ahead_cmd(ino, first, count, ahead);
            let got = fs.apply(&cmd);
            let plan = match m.can_map(ino, first, count, ahead) {
                Ok(x) => x,
                Err(e) => return refusal(fs, &before, &cmd, got, e),
            };
            let FsReply::Mapped(got) = succeeded(&cmd, got) else {
                panic!("{cmd:?}: not Mapped");
            };
            // Every block handed out is a free data block, each once.
            let mut taken = m.used_lbas();
            let file = &m.files[&ino];
            let mut new = BTreeMap::new();
            for x in &got {
                match file.blocks.get(&x.block) {
                    Some(lba) => assert_eq!(x.lba, *lba, "{cmd:?}: {x:?}"),
                    None => {
                        assert!(x.lba < TOTAL, "{cmd:?}: {x:?} past the volume");
                        assert!(taken.insert(x.lba), "{cmd:?}: {x:?} already in use");
                        new.insert(x.block, x.lba);
                    }
                }
            }
            let mut want: Vec<u64> = plan.missing.clone();
            want.extend(&plan.extra);
            assert_eq!(
                new.keys().copied().collect::<Vec<_>>(),
                want,
                "{cmd:?}: the blocks handed out (requested {:?}, ahead {:?})",
                plan.missing,
                plan.extra
            );
            let f = m.files.get_mut(&ino).unwrap();
            f.unwritten.extend(new.keys().copied());
            f.blocks.extend(new);
            // The answer: every mapped block of the window, fresh if unwritten.
            assert_eq!(got, f.mappings(first, plan.end), "{cmd:?}");
            assert!(
                got.iter().filter(|x| x.block < first + count).count() as u64 == count,
                "{cmd:?}: a requested block is missing from {got:?}"
            );
            assert_eq!(attr(fs, ino).blocks, f.blocks.len() as u64);
        }
        Op::Written {
            ino,
            size,
            ref written,
            trim,
        } => {
            let ino = m.pick(ino);
            let cmd = written_cmd(ino, size, now, written, trim);
            let got = fs.apply(&cmd);
            if let Err(e) = m.can_write(ino, size, written.len()) {
                return refusal(fs, &before, &cmd, got, e);
            }
            let a = ok_attr(Ok(succeeded(&cmd, got)), "written");
            let f = m.files.get_mut(&ino).unwrap();
            for &(first, count) in written {
                let end = first.saturating_add(count);
                f.unwritten.retain(|b| !(first..end).contains(b));
            }
            f.size = f.size.max(size);
            if trim {
                let keep = f.size.div_ceil(BSZ);
                let past: Vec<u64> = f.blocks.range(keep..).map(|(b, _)| *b).collect();
                if !past.is_empty() && past.iter().all(|b| f.unwritten.contains(b)) {
                    f.cut(keep);
                }
            }
            assert_eq!(
                (a.size, a.mtime, a.ctime, a.blocks),
                (f.size, now, now, f.blocks.len() as u64),
                "{cmd:?}"
            );
        }
        Op::Drop { ino } => {
            let ino = m.pick(ino);
            let cmd = FsCommand::Drop { ino };
            let got = fs.apply(&cmd);
            if let Err(e) = m.can_drop(ino) {
                return refusal(fs, &before, &cmd, got, e);
            }
            assert_eq!(succeeded(&cmd, got), FsReply::Done);
            m.remove(ino);
        }
    }
}

/// The state agrees with the model, through the queries.
fn agree(m: &Model, fs: &FsState) {
    assert_eq!(
        statfs(fs),
        FsStats {
            block_size: BS,
            blocks: TOTAL,
            free: TOTAL - m.used(),
            files: m.kinds.len() as u64,
            mounts: 0,
            held: 0,
        }
    );
    assert_eq!(fs.inode_count(), m.kinds.len());
    for (&ino, &kind) in &m.kinds {
        let a = attr(fs, ino);
        assert_eq!((a.ino, a.kind), (ino, kind));
        assert_eq!(a.nlink, m.nlink(ino), "nlink of {ino}");
        match kind {
            Kind::Dir => {
                let (parent, entries) = &m.dirs[&ino];
                let want: Vec<DirEntry> = entries
                    .iter()
                    .map(|(name, i)| DirEntry {
                        name: name.clone(),
                        ino: *i,
                        kind: m.kinds[i],
                    })
                    .collect();
                assert_eq!(read_dir(fs, ino), want, "entries of {ino}");
                for (name, i) in entries {
                    assert_eq!(lookup(fs, ino, name), Ok(*i));
                }
                for name in NAMES.iter().take(4) {
                    if !entries.contains_key(*name) {
                        assert_eq!(lookup(fs, ino, name), Err(FsError::NotFound));
                    }
                }
                assert_eq!(lookup(fs, ino, b"."), Ok(ino));
                assert_eq!(lookup(fs, ino, b".."), Ok(*parent));
            }
            Kind::File => {
                let f = &m.files[&ino];
                assert_eq!(a.size, f.size);
                assert_eq!(a.blocks, f.blocks.len() as u64);
                // Both ends of the file's block numbers (Map may reach the last
                // blocks a file may have), fresh exactly when unwritten.
                assert_eq!(extents(fs, ino), f.mappings(0, MAP_MAX), "blocks of {ino}");
                let tail = MAX_BLOCKS - MAP_MAX;
                assert_eq!(
                    fs.query(&FsQuery::Extents {
                        ino,
                        first: tail,
                        count: MAP_MAX
                    }),
                    Ok(FsReply::Mapped(f.mappings(tail, MAX_BLOCKS))),
                    "last blocks of {ino}"
                );
                // The runs say the same.
                let inode = fs.inode(ino).unwrap();
                let runs: BTreeMap<u64, u64> = inode
                    .extents
                    .iter()
                    .flat_map(|(b, e)| (0..e.count).map(move |n| (b + n, e.lba + n)))
                    .collect();
                assert_eq!(runs, f.blocks);
                assert_eq!(inode.unwritten, f.unwritten, "unwritten blocks of {ino}");
            }
            Kind::Symlink => {
                assert_eq!(
                    fs.query(&FsQuery::ReadLink { ino }),
                    Ok(FsReply::Target(TARGET.to_vec()))
                );
            }
            _ => {}
        }
    }
    for ino in (0..=m.max_ino + 1).chain([BOGUS]) {
        if !m.kinds.contains_key(&ino) {
            assert!(fs.inode(ino).is_none());
            assert_eq!(fs.query(&FsQuery::GetAttr { ino }), Err(FsError::NotFound));
        }
    }
}

/// The free space is exactly the blocks no file holds: a new file can take all of
/// them (each one distinct and unowned), and not one more.
fn probe_free_space(m: &Model, fs: &FsState) {
    let mut p = fs.clone();
    let ino = create(&mut p, ROOT, b"probe", Kind::File, t(0));
    let free = TOTAL - m.used();
    let mut taken = m.used_lbas();
    if free > 0 {
        for x in map(&mut p, ino, 0, free).unwrap() {
            assert!(x.fresh && x.lba < TOTAL, "{x:?}");
            assert!(taken.insert(x.lba), "free block {} is in use", x.lba);
        }
    }
    assert_eq!(taken.len() as u64, TOTAL);
    assert_eq!(map(&mut p, ino, free, 1), Err(FsError::NoSpace));
    // Taken ahead, best effort: free blocks, at most a share of those left after
    // the requested one, and no error for the rest.
    let mut p = fs.clone();
    let ino = create(&mut p, ROOT, b"probe", Kind::File, t(0));
    let mut taken = m.used_lbas();
    let got = map_ahead(&mut p, ino, 0, 1, free + 3);
    if free == 0 {
        assert_eq!(got, Err(FsError::NoSpace));
    } else {
        let got = got.unwrap();
        assert_eq!(got.len() as u64, 1 + (free - 1) / AHEAD_SHARE);
        for x in got {
            assert!(x.fresh && x.lba < TOTAL, "{x:?}");
            assert!(taken.insert(x.lba), "free block {} is in use", x.lba);
        }
    }
}

fn pick_dir() -> impl Strategy<Value = Pick> {
    prop_oneof![
        8 => any::<u8>().prop_map(Pick::Dir),
        1 => any::<u8>().prop_map(Pick::Any),
    ]
}

fn pick_ino() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => any::<u8>().prop_map(Pick::File),
        1 => any::<u8>().prop_map(Pick::Dir),
        1 => any::<u8>().prop_map(Pick::Any),
    ]
}

fn name() -> impl Strategy<Value = u8> {
    prop_oneof![20 => 0u8..4, 1 => 4u8..7]
}

fn loc() -> impl Strategy<Value = Loc> {
    prop_oneof![
        3 => any::<u8>().prop_map(Loc::Entry),
        2 => (pick_dir(), name()).prop_map(|(d, n)| Loc::Named(d, n)),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        6 => Just(Kind::File),
        3 => Just(Kind::Dir),
        1 => Just(Kind::Symlink),
        1 => Just(Kind::Fifo),
        1 => Just(Kind::Socket),
        1 => Just(Kind::CharDev),
        1 => Just(Kind::BlockDev),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (pick_dir(), name(), kind()).prop_map(|(dir, name, kind)| Op::Create { dir, name, kind }),
        2 => (pick_ino(), pick_dir(), name()).prop_map(|(ino, dir, name)| Op::Link { ino, dir, name }),
        3 => (loc(), prop::bool::weighted(0.3)).prop_map(|(at, dir)| Op::Unlink { at, dir }),
        5 => (
            loc(),
            loc(),
            prop_oneof![
                5 => Just((false, false)),
                2 => Just((true, false)),
                2 => Just((false, true)),
                1 => Just((true, true)),
            ],
        )
            .prop_map(|(from, to, (noreplace, exchange))| Op::Rename {
                from,
                to,
                noreplace,
                exchange
            }),
        3 => (
            pick_ino(),
            prop_oneof![
                1 => Just(None),
                1 => Just(Some(0u64)),
                4 => (0..24 * BSZ).prop_map(Some),
                1 => (0u64..24).prop_map(|b| Some(b * BSZ)),
                1 => Just(Some(TOTAL * 1024 * BSZ)),
                1 => Just(Some(TOTAL * 1024 * BSZ + 1)),
            ],
            prop::option::of(any::<u16>()),
            prop::option::of(0u32..3),
        )
            .prop_map(|(ino, size, perm, gid)| Op::SetAttr {
                ino,
                size,
                perm,
                gid
            }),
        6 => (
            pick_ino(),
            prop_oneof![
                12 => 0u64..24,
                1 => (MAX_BLOCKS - 8)..(MAX_BLOCKS + 2),
            ],
            prop_oneof![
                10 => 1u64..6,
                1 => Just(0u64),
                4 => 8u64..40,
                1 => 60u64..70,
                1 => Just(MAP_MAX + 1),
            ],
            prop_oneof![
                6 => Just(0u64),
                6 => 1u64..8,
                1 => Just(MAP_MAX - 1),
                1 => Just(MAP_MAX),
            ],
        )
            .prop_map(|(ino, first, count, ahead)| Op::Map {
                ino,
                first,
                count,
                ahead
            }),
        3 => (
            pick_ino(),
            prop_oneof![
                6 => 0..4 * BSZ,
                6 => 0..30 * BSZ,
                1 => Just(MAX_BLOCKS * BSZ),
                1 => Just(MAX_BLOCKS * BSZ + 1),
            ],
            prop::collection::vec(
                prop_oneof![
                    8 => (0u64..30, 0u64..8),
                    1 => (0u64..30, Just(u64::MAX)),
                    1 => ((MAX_BLOCKS - 8)..MAX_BLOCKS, 0u64..8),
                ],
                0..4,
            ),
            prop::bool::weighted(0.5),
        )
            .prop_map(|(ino, size, written, trim)| Op::Written {
                ino,
                size,
                written,
                trim
            }),
        3 => prop_oneof![
            3 => any::<u8>().prop_map(Pick::Orphan),
            1 => pick_ino(),
        ]
        .prop_map(|ino| Op::Drop { ino }),
    ]
}

proptest! {
    #![proptest_config(property_config())]

    #[test]
    fn random_commands_agree_with_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut fs = formatted(TOTAL);
        let mut m = Model::new();
        for (i, op) in ops.iter().enumerate() {
            let now = t(10 + i as i64);
            step(&mut m, &mut fs, op, now);
            if let Err(e) = fs.check() {
                panic!("step {i} {op:?}: invariant broken: {e}");
            }
            agree(&m, &fs);
            probe_free_space(&m, &fs);
        }
    }
}

// ---------------------------------------------------------------------------------
// Extended attributes.
// ---------------------------------------------------------------------------------

fn setx(ino: Ino, name: &[u8], value: &[u8], create: bool, replace: bool, now: Time) -> FsCommand {
    FsCommand::SetXattr {
        ino,
        name: name.to_vec(),
        value: value.to_vec(),
        create,
        replace,
        now,
    }
}

fn getx(fs: &FsState, ino: Ino, name: &[u8]) -> Result<Vec<u8>, FsError> {
    match fs.query(&FsQuery::GetXattr {
        ino,
        name: name.to_vec(),
    })? {
        FsReply::Bytes(b) => Ok(b),
        other => panic!("GetXattr answered {other:?}"),
    }
}

fn listx(fs: &FsState, ino: Ino) -> Vec<u8> {
    match fs.query(&FsQuery::ListXattr { ino }) {
        Ok(FsReply::Bytes(b)) => b,
        other => panic!("ListXattr answered {other:?}"),
    }
}

/// Goal: extended attributes as setxattr(2) describes them: XATTR_CREATE refuses an
/// existing name, XATTR_REPLACE a missing one, removal of a missing one is ENODATA,
/// the list is the names each ending in a zero byte, ctime changes, `system.` names
/// (POSIX ACLs, not enforced here) are refused, sizes are bounded, and the
/// attributes go with the inode (kept across a rename, gone with the inode).
#[test]
fn extended_attributes_follow_setxattr_semantics() {
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(1));
    assert_eq!(listx(&fs, f), b"");
    refused(
        &mut fs,
        &setx(f, b"user.a", b"1", false, true, t(2)),
        FsError::NoXattr,
    );
    let a = ok_attr(
        fs.apply(&setx(f, b"user.a", b"1", true, false, t(2))),
        "set",
    );
    assert_eq!(a.ctime, t(2));
    refused(
        &mut fs,
        &setx(f, b"user.a", b"2", true, false, t(3)),
        FsError::Exists,
    );
    apply_ok(&mut fs, &setx(f, b"user.a", b"22", false, true, t(3)));
    apply_ok(&mut fs, &setx(f, b"security.b", b"", false, false, t(3)));
    assert_eq!(getx(&fs, f, b"user.a"), Ok(b"22".to_vec()));
    assert_eq!(getx(&fs, f, b"security.b"), Ok(Vec::new()));
    assert_eq!(getx(&fs, f, b"user.none"), Err(FsError::NoXattr));
    assert_eq!(listx(&fs, f), b"security.b\0user.a\0");

    for bad in [&b"system.other"[..], b"user.", b"other.x", b"noprefix"] {
        refused(
            &mut fs,
            &setx(f, bad, b"v", false, false, t(4)),
            FsError::XattrNotSupported,
        );
    }
    refused(
        &mut fs,
        &setx(f, b"", b"v", false, false, t(4)),
        FsError::Invalid,
    );
    let long = [b"user.".to_vec(), vec![b'n'; 300]].concat();
    refused(
        &mut fs,
        &setx(f, &long, b"v", false, false, t(4)),
        FsError::XattrTooLarge,
    );
    let big = vec![7u8; 64 * 1024 + 1];
    refused(
        &mut fs,
        &setx(f, b"user.big", &big, false, false, t(4)),
        FsError::XattrTooLarge,
    );
    // The total per inode is bounded too.
    apply_ok(
        &mut fs,
        &setx(f, b"user.c", &vec![1u8; 60 * 1024], false, false, t(4)),
    );
    refused(
        &mut fs,
        &setx(f, b"user.d", &vec![1u8; 8 * 1024], false, false, t(4)),
        FsError::NoSpace,
    );

    let rm = |name: &[u8], now| FsCommand::RemoveXattr {
        ino: f,
        name: name.to_vec(),
        now,
    };
    let a = ok_attr(fs.apply(&rm(b"user.c", t(5))), "remove");
    assert_eq!(a.ctime, t(5));
    refused(&mut fs, &rm(b"user.c", t(6)), FsError::NoXattr);

    // Directories and symlinks carry them too; a rename keeps them.
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(7));
    apply_ok(&mut fs, &setx(d, b"user.dir", b"x", false, false, t(7)));
    apply_ok(&mut fs, &mv(ROOT, b"f", d, b"g", t(8)));
    assert_eq!(getx(&fs, f, b"user.a"), Ok(b"22".to_vec()));
    assert_eq!(getx(&fs, d, b"user.dir"), Ok(b"x".to_vec()));
    // An orphan (unlinked, maybe still open) keeps them; they go with the inode.
    apply_ok(&mut fs, &unlink_cmd(d, b"g", false, t(9)));
    assert_eq!(getx(&fs, f, b"user.a"), Ok(b"22".to_vec()));
    apply_ok(&mut fs, &FsCommand::Drop { ino: f });
    assert_eq!(getx(&fs, f, b"user.a"), Err(FsError::NotFound));
}

// ---------------------------------------------------------------------------------
// Mount sessions: opens, held freeings, acknowledgements, expiry.
// ---------------------------------------------------------------------------------

fn open_session(fs: &mut FsState) -> u64 {
    match apply_ok(fs, &FsCommand::OpenSession { now: t(5) }) {
        FsReply::Session(id) => id,
        other => panic!("open session: {other:?}"),
    }
}

fn stale(fs: &FsState, session: u64) -> Result<Vec<(Ino, u64)>, FsError> {
    match fs.query(&FsQuery::Session { session }) {
        Ok(FsReply::Stale(s)) => Ok(s),
        Err(e) => Err(e),
        other => panic!("session query: {other:?}"),
    }
}

fn from(session: u64, cmd: FsCommand) -> FsCommand {
    FsCommand::From {
        session,
        cmd: Box::new(cmd),
    }
}

/// A mount's last close (`TrimAlone`) trims the blocks past the end only when no
/// other mount has the file open: there, another mount may have written blocks it
/// took and not yet named, and trimming them would drop its data. A plain
/// `Written{trim}` (a mount of an earlier version) trims as it always did.
#[test]
fn a_trim_leaves_the_blocks_another_mount_may_be_writing() {
    let mut fs = formatted(64);
    let a = open_session(&mut fs);
    let b = open_session(&mut fs);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(6));
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: f });
    apply_ok(&mut fs, &FsCommand::Open { session: b, ino: f });
    // b takes blocks 0.. and writes them (not yet named); a writes 10 bytes.
    let b_map = map_ahead(&mut fs, f, 0, 1, 7).unwrap();
    let close = |session, size, now, written: &[(u64, u64)]| FsCommand::WrittenClose {
        session,
        ino: f,
        cmd: Box::new(FsCommand::TrimAlone {
            cmd: Box::new(written_cmd(f, size, now, written, true)),
        }),
    };
    apply_ok(&mut fs, &close(a, 10, t(7), &[]));
    assert_eq!(extents(&fs, f), b_map, "a's close trimmed b's blocks");
    assert_eq!(
        stale(&fs, b).unwrap(),
        vec![],
        "b is asked to forget nothing"
    );
    // b names what it wrote: it is all there; b's own last close, with nobody
    // else left, trims what it did not use.
    let closed = ok_attr(
        Ok(apply_ok(&mut fs, &close(b, 3 * BSZ, t(8), &[(0, 3)]))),
        "b's close",
    );
    assert_eq!((closed.size, closed.blocks), (3 * BSZ, 3));
    let named: Vec<Mapping> = b_map[..3]
        .iter()
        .map(|m| Mapping { fresh: false, ..*m })
        .collect();
    assert_eq!(extents(&fs, f), named);
    // Only a `Written` goes inside.
    refused(
        &mut fs,
        &FsCommand::TrimAlone {
            cmd: Box::new(size_cmd(f, 0, t(9))),
        },
        FsError::Invalid,
    );

    // A plain trim frees what another session holds open.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(10));
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: g });
    apply_ok(&mut fs, &FsCommand::Open { session: b, ino: g });
    map_ahead(&mut fs, g, 0, 1, 7).unwrap();
    apply_ok(&mut fs, &from(a, written_cmd(g, 10, t(11), &[], true)));
    assert_eq!(attr(&fs, g).blocks, 1);
}

#[test]
fn blocks_freed_under_another_mounts_open_file_wait_for_its_acknowledgement() {
    let mut fs = formatted(8);
    let a = open_session(&mut fs);
    let b = open_session(&mut fs);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(6));
    let old = map(&mut fs, f, 0, 4).unwrap();
    written(&mut fs, f, 4 * BSZ, t(7), &[(0, 4)], false);
    ok_attr(
        Ok(apply_ok(&mut fs, &FsCommand::Open { session: a, ino: f })),
        "open",
    );
    apply_ok(&mut fs, &FsCommand::Open { session: b, ino: f });
    assert_eq!(statfs(&fs).free, 4);

    // b truncates: a still holds a map of the blocks, so they are not free.
    apply_ok(&mut fs, &from(b, size_cmd(f, 0, t(8))));
    assert_eq!(statfs(&fs).free, 4, "held blocks are not free");
    assert_eq!((statfs(&fs).mounts, statfs(&fs).held), (2, 4));
    assert_eq!(
        stale(&fs, b).unwrap(),
        vec![],
        "the truncating mount is not asked"
    );
    let notice = stale(&fs, a).unwrap();
    assert_eq!(notice.len(), 1);
    assert_eq!(notice[0].0, f);
    // Another file cannot get them meanwhile.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(9));
    let got = map(&mut fs, g, 0, 4).unwrap();
    let old_lbas: BTreeSet<u64> = old.iter().map(|m| m.lba).collect();
    assert!(got.iter().all(|m| !old_lbas.contains(&m.lba)));
    assert_eq!(map(&mut fs, g, 4, 1), Err(FsError::NoSpace));

    // a's acknowledgement frees them.
    apply_ok(
        &mut fs,
        &FsCommand::Refreshed {
            session: a,
            ino: f,
            freeing: notice[0].1,
        },
    );
    assert_eq!(stale(&fs, a).unwrap(), vec![]);
    assert!(fs.held().is_empty());
    assert_eq!(statfs(&fs).free, 4);
    assert!(map(&mut fs, g, 4, 4).is_ok());

    // An acknowledgement of an earlier freeing does not release a later one.
    let h = create(&mut fs, ROOT, b"h", Kind::File, t(10));
    apply_ok(&mut fs, &from(b, size_cmd(g, 0, t(11))));
    map(&mut fs, h, 0, 2).unwrap();
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: h });
    apply_ok(&mut fs, &from(b, punch_cmd(h, 0, 1, t(12))));
    let first = stale(&fs, a).unwrap()[0].1;
    apply_ok(&mut fs, &from(b, punch_cmd(h, 1, 1, t(13))));
    let second = stale(&fs, a).unwrap()[0].1;
    assert!(second > first);
    apply_ok(
        &mut fs,
        &FsCommand::Refreshed {
            session: a,
            ino: h,
            freeing: first,
        },
    );
    assert_eq!(fs.held().len(), 1, "the later freeing still waits");
    assert_eq!(stale(&fs, a).unwrap(), vec![(h, second)]);
    // The last close acknowledges the rest.
    apply_ok(&mut fs, &FsCommand::Close { session: a, ino: h });
    assert!(fs.held().is_empty());
}

#[test]
fn an_orphan_open_in_a_mount_is_dropped_at_its_last_close_or_session_end() {
    let mut fs = formatted(8);
    let a = open_session(&mut fs);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(6));
    map(&mut fs, f, 0, 2).unwrap();
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: f });
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: f });
    // Another mount unlinks it and drops it: it stays while open.
    assert_eq!(
        apply_ok(&mut fs, &unlink_cmd(ROOT, b"f", false, t(7))),
        FsReply::Orphaned(Some(f))
    );
    apply_ok(&mut fs, &FsCommand::Drop { ino: f });
    assert!(fs.inode(f).is_some(), "dropped while open");
    assert_eq!(statfs(&fs).free, 6);
    apply_ok(&mut fs, &FsCommand::Close { session: a, ino: f });
    assert!(fs.inode(f).is_some(), "dropped while open once more");
    apply_ok(&mut fs, &FsCommand::Close { session: a, ino: f });
    assert!(fs.inode(f).is_none(), "kept after its last close");
    assert_eq!(statfs(&fs).free, 8);
    refused(
        &mut fs,
        &FsCommand::Close { session: a, ino: f },
        FsError::Invalid,
    );

    // A session that ends (its mount died and it expired) closes what it had open.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(8));
    map(&mut fs, g, 0, 3).unwrap();
    let b = open_session(&mut fs);
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: g });
    apply_ok(&mut fs, &from(b, size_cmd(g, 0, t(9))));
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"g", false, t(9)));
    apply_ok(&mut fs, &FsCommand::Drop { ino: g });
    assert_eq!(statfs(&fs).free, 5);
    apply_ok(&mut fs, &FsCommand::EndSession { session: a });
    assert_eq!(statfs(&fs).free, 8);
    assert!(fs.inode(g).is_none());
    assert_eq!(stale(&fs, a), Err(FsError::NoSession));
    refused(
        &mut fs,
        &FsCommand::Open {
            session: a,
            ino: ROOT,
        },
        FsError::IsDir,
    );
    let k = create(&mut fs, ROOT, b"k", Kind::File, t(10));
    refused(
        &mut fs,
        &FsCommand::Open { session: a, ino: k },
        FsError::NoSession,
    );
    refused(
        &mut fs,
        &from(b, from(b, size_cmd(k, 0, t(11)))),
        FsError::Invalid,
    );
}

/// One step of the session property.
#[derive(Debug, Clone)]
enum SessionOp {
    OpenSession,
    EndSession(usize),
    Open(usize, usize),
    /// A close; with a size, as a `WrittenClose` whose `Written` trims to it (with
    /// `true`, as `TrimAlone`: only if no other session has the file open).
    Close(usize, usize, Option<u64>, bool),
    Map(usize, usize, u64, u64),
    Truncate(Option<usize>, usize, u64),
    Punch(Option<usize>, usize, u64, u64),
    Trim(Option<usize>, usize, u64),
    Refresh(usize),
    Unlink(usize),
}

fn session_op() -> impl Strategy<Value = SessionOp> {
    let s = 0..4usize;
    let f = 0..3usize;
    let by = prop::option::of(0..4usize);
    prop_oneof![
        1 => Just(SessionOp::OpenSession),
        1 => s.clone().prop_map(SessionOp::EndSession),
        4 => (s.clone(), f.clone()).prop_map(|(s, f)| SessionOp::Open(s, f)),
        2 => (s.clone(), f.clone(), prop::option::of(0..6u64), any::<bool>()).prop_map(|(s, f, w, alone)| SessionOp::Close(s, f, w, alone)),
        4 => (s.clone(), f.clone(), 0..6u64, 1..4u64).prop_map(|(s, f, a, n)| SessionOp::Map(s, f, a, n)),
        2 => (by.clone(), f.clone(), 0..6u64).prop_map(|(b, f, n)| SessionOp::Truncate(b, f, n)),
        2 => (by.clone(), f.clone(), 0..6u64, 1..3u64).prop_map(|(b, f, a, n)| SessionOp::Punch(b, f, a, n)),
        1 => (by, f.clone(), 0..6u64).prop_map(|(b, f, n)| SessionOp::Trim(b, f, n)),
        3 => s.prop_map(SessionOp::Refresh),
        1 => f.prop_map(SessionOp::Unlink),
    ]
}

/// A session of the model: its id, what it knows of each open file's block map
/// (file block -> data block), and how many times it has each file open.
type ModelSession = (u64, BTreeMap<Ino, BTreeMap<u64, u64>>, BTreeMap<Ino, u32>);

/// File block -> data block of a file, as far as `fs` maps it (none once dropped).
fn block_map(fs: &FsState, ino: Ino) -> BTreeMap<u64, u64> {
    match try_extents(fs, ino) {
        Ok(FsReply::Mapped(m)) => m.iter().map(|m| (m.block, m.lba)).collect(),
        _ => BTreeMap::new(),
    }
}

proptest! {
    #![proptest_config(property_config())]

    /// Whatever other mounts free, a block map a session learned (at open, from its
    /// own `Map`s, after acknowledging) only points at its file's blocks or at held
    /// blocks waiting for that session: never at free space or another file's
    /// blocks. The mount that frees forgets the blocks it freed itself.
    #[test]
    fn a_sessions_block_maps_never_point_into_other_files(ops in prop::collection::vec(session_op(), 1..80)) {
        let mut fs = formatted(24);
        let files: Vec<Ino> = (0..3u8)
            .map(|i| create(&mut fs, ROOT, &[b'f', b'0' + i], Kind::File, t(2)))
            .collect();
        // Session slot -> (id, ino -> known block map, ino -> opens).
        let mut sessions: Vec<Option<ModelSession>> = vec![None; 4];
        for (step, op) in ops.iter().enumerate() {
            let now = t(10 + step as i64);
            let id_of = |slot: Option<usize>, sessions: &Vec<Option<(u64, _, _)>>| {
                slot.and_then(|s| sessions[s].as_ref().map(|(id, _, _)| *id))
            };
            let wrap = |by: Option<u64>, cmd: FsCommand| match by {
                Some(s) => from(s, cmd),
                None => cmd,
            };
            match op {
                SessionOp::OpenSession => {
                    if let Some(slot) = sessions.iter().position(Option::is_none) {
                        let id = open_session(&mut fs);
                        sessions[slot] = Some((id, BTreeMap::new(), BTreeMap::new()));
                    }
                }
                SessionOp::EndSession(s) => {
                    if let Some((id, _, _)) = sessions[*s].take() {
                        apply_ok(&mut fs, &FsCommand::EndSession { session: id });
                    }
                }
                SessionOp::Open(s, f) => {
                    if let Some((id, known, opens)) = sessions[*s].as_mut() {
                        let ino = files[*f];
                        if fs.apply(&FsCommand::Open { session: *id, ino }).is_ok() {
                            *opens.entry(ino).or_default() += 1;
                            // Open re-reads the map when it is the first.
                            if opens[&ino] == 1 {
                                known.insert(ino, block_map(&fs, ino));
                            }
                        }
                    }
                }
                SessionOp::Close(s, f, written, alone) => {
                    if let Some((id, known, opens)) = sessions[*s].as_mut() {
                        let ino = files[*f];
                        if let Some(n) = opens.get_mut(&ino) {
                            match written {
                                None => {
                                    apply_ok(&mut fs, &FsCommand::Close { session: *id, ino });
                                }
                                Some(blocks) => {
                                    let before = block_map(&fs, ino);
                                    let trim = written_cmd(ino, blocks * BSZ, now, &[], true);
                                    let cmd = FsCommand::WrittenClose {
                                        session: *id,
                                        ino,
                                        cmd: Box::new(if *alone {
                                            FsCommand::TrimAlone { cmd: Box::new(trim) }
                                        } else {
                                            trim
                                        }),
                                    };
                                    apply_ok(&mut fs, &cmd);
                                    // The closing mount forgets what it trimmed.
                                    let after = block_map(&fs, ino);
                                    if let Some(k) = known.get_mut(&ino) {
                                        k.retain(|b, _| after.contains_key(b) || !before.contains_key(b));
                                    }
                                }
                            }
                            *n -= 1;
                            if *n == 0 {
                                opens.remove(&ino);
                                known.remove(&ino);
                            }
                        }
                    }
                }
                SessionOp::Map(s, f, first, count) => {
                    let ino = files[*f];
                    if let Ok(FsReply::Mapped(m)) = fs.apply(&map_cmd(ino, *first, *count)) {
                        if let Some((_, known, _)) = sessions[*s].as_mut() {
                            if let Some(k) = known.get_mut(&ino) {
                                k.extend(m.iter().map(|m| (m.block, m.lba)));
                            }
                        }
                    }
                }
                SessionOp::Truncate(by, f, blocks) | SessionOp::Trim(by, f, blocks) => {
                    let ino = files[*f];
                    let id = id_of(*by, &sessions);
                    let cmd = if matches!(op, SessionOp::Truncate(..)) {
                        size_cmd(ino, blocks * BSZ, now)
                    } else {
                        written_cmd(ino, blocks * BSZ, now, &[], true)
                    };
                    let before = block_map(&fs, ino);
                    if fs.apply(&wrap(id, cmd)).is_ok() {
                        let after = block_map(&fs, ino);
                        // The freeing mount forgets what it freed.
                        if let Some((_, known, _)) = by.and_then(|s| sessions[s].as_mut()) {
                            if let Some(k) = known.get_mut(&ino) {
                                k.retain(|b, _| after.contains_key(b) || !before.contains_key(b));
                            }
                        }
                    }
                }
                SessionOp::Punch(by, f, first, count) => {
                    let ino = files[*f];
                    let id = id_of(*by, &sessions);
                    if fs.apply(&wrap(id, punch_cmd(ino, *first, *count, now))).is_ok() {
                        if let Some((_, known, _)) = by.and_then(|s| sessions[s].as_mut()) {
                            if let Some(k) = known.get_mut(&ino) {
                                k.retain(|b, _| !(*first..first + count).contains(b));
                            }
                        }
                    }
                }
                SessionOp::Refresh(s) => {
                    if let Some((id, known, _)) = sessions[*s].as_mut() {
                        for (ino, freeing) in stale(&fs, *id).unwrap() {
                            // Forgets the map (and may fetch it again at once).
                            known.insert(ino, block_map(&fs, ino));
                            apply_ok(&mut fs, &FsCommand::Refreshed { session: *id, ino, freeing });
                        }
                        prop_assert_eq!(stale(&fs, *id).unwrap(), vec![]);
                    }
                }
                SessionOp::Unlink(f) => {
                    let name = [b'f', b'0' + *f as u8];
                    if let Ok(FsReply::Orphaned(Some(ino))) = fs.apply(&unlink_cmd(ROOT, &name, false, now)) {
                        apply_ok(&mut fs, &FsCommand::Drop { ino });
                    }
                }
            }
            if let Err(e) = fs.check() {
                panic!("step {step} {op:?}: invariant broken: {e}");
            }
            for (id, known, _) in sessions.iter().flatten() {
                for (ino, k) in known {
                    let now_mapped: BTreeSet<u64> = block_map(&fs, *ino).values().copied().collect();
                    for lba in k.values() {
                        let held = fs.held().values().any(|h| {
                            h.waiting.contains(id)
                                && h.extents.iter().any(|e| (e.lba..e.lba + e.count).contains(lba))
                        });
                        prop_assert!(
                            now_mapped.contains(lba) || held,
                            "step {} {:?}: session {} maps {} to block {}, which is neither the file's nor held for it",
                            step, op, id, ino, lba
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn a_session_names_written_blocks_only_after_acknowledging_freeings() {
    let mut fs = formatted(8);
    let a = open_session(&mut fs);
    let b = open_session(&mut fs);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(6));
    map(&mut fs, f, 0, 2).unwrap();
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: f });
    apply_ok(&mut fs, &from(b, punch_cmd(f, 1, 1, t(7))));
    // a wrote block 0 before it learned of the punch: it must refresh first.
    refused(
        &mut fs,
        &from(a, written_cmd(f, 2 * BSZ, t(8), &[(0, 1)], false)),
        FsError::StaleMap,
    );
    // A size-only commit is fine.
    apply_ok(&mut fs, &from(a, written_cmd(f, 2 * BSZ, t(8), &[], false)));
    let n = stale(&fs, a).unwrap()[0].1;
    apply_ok(
        &mut fs,
        &FsCommand::Refreshed {
            session: a,
            ino: f,
            freeing: n,
        },
    );
    apply_ok(
        &mut fs,
        &from(a, written_cmd(f, 2 * BSZ, t(9), &[(0, 1)], false)),
    );
    assert_eq!(fresh_blocks(&fs, f), Vec::<u64>::new());
}

#[test]
fn commands_of_an_ended_session_are_refused() {
    let mut fs = formatted(8);
    let a = open_session(&mut fs);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(6));
    map(&mut fs, f, 0, 1).unwrap();
    apply_ok(&mut fs, &FsCommand::EndSession { session: a });
    // Its maps may name blocks given away since: nothing it names is taken.
    refused(
        &mut fs,
        &from(a, written_cmd(f, BSZ, t(7), &[(0, 1)], false)),
        FsError::NoSession,
    );
    refused(&mut fs, &from(a, size_cmd(f, 0, t(7))), FsError::NoSession);
    refused(
        &mut fs,
        &FsCommand::Refreshed {
            session: a,
            ino: f,
            freeing: 1,
        },
        FsError::NoSession,
    );
    // Ending it again changes nothing.
    apply_ok(&mut fs, &FsCommand::EndSession { session: a });
}

/// `CreateOpen` creates a regular file and opens it for the session in one command;
/// `WrittenClose` commits a session's writes and closes its open in one. Each is
/// refused whole, and nothing is done, when either part would be.
#[test]
fn create_open_and_written_close_are_one_command_each() {
    let mut fs = formatted(8);
    let a = open_session(&mut fs);
    let create_open = |session, name: &[u8], kind| FsCommand::CreateOpen {
        session,
        cmd: Box::new(create_cmd(ROOT, name, kind, t(6))),
    };
    let f = ok_attr(
        Ok(apply_ok(&mut fs, &create_open(a, b"f", Kind::File))),
        "create",
    )
    .ino;
    assert_eq!(lookup(&fs, ROOT, b"f"), Ok(f));
    // Open: unlinked, it stays until the session closes it.
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"f", false, t(7)));
    apply_ok(&mut fs, &FsCommand::Drop { ino: f });
    assert!(fs.inode(f).is_some(), "the created file is open");

    // Refused whole: a directory, an unknown session, a name taken, a nested command.
    refused(&mut fs, &create_open(a, b"d", Kind::Dir), FsError::Invalid);
    refused(
        &mut fs,
        &create_open(a + 100, b"g", Kind::File),
        FsError::NoSession,
    );
    create(&mut fs, ROOT, b"taken", Kind::File, t(8));
    refused(
        &mut fs,
        &create_open(a, b"taken", Kind::File),
        FsError::Exists,
    );
    refused(
        &mut fs,
        &FsCommand::CreateOpen {
            session: a,
            cmd: Box::new(from(a, create_cmd(ROOT, b"g", Kind::File, t(8)))),
        },
        FsError::Invalid,
    );

    // WrittenClose: the write is committed and the open closed (the orphan goes).
    map(&mut fs, f, 0, 2).unwrap();
    assert_eq!(statfs(&fs).free, 6);
    let written_close = |session, ino, written: &[(u64, u64)]| FsCommand::WrittenClose {
        session,
        ino,
        cmd: Box::new(written_cmd(ino, 2 * BSZ, t(9), written, false)),
    };
    let g = ok_attr(
        Ok(apply_ok(&mut fs, &create_open(a, b"g", Kind::File))),
        "create",
    )
    .ino;
    map(&mut fs, g, 0, 1).unwrap();
    // Refused whole: a file the session has not open, a `Written` of another file,
    // a stale map (below), an unknown session.
    let h = create(&mut fs, ROOT, b"h", Kind::File, t(8));
    refused(&mut fs, &written_close(a, h, &[]), FsError::Invalid);
    refused(
        &mut fs,
        &FsCommand::WrittenClose {
            session: a,
            ino: g,
            cmd: Box::new(written_cmd(f, 2 * BSZ, t(9), &[], false)),
        },
        FsError::Invalid,
    );
    refused(&mut fs, &written_close(a + 100, g, &[]), FsError::NoSession);
    let b = open_session(&mut fs);
    apply_ok(&mut fs, &from(b, punch_cmd(g, 0, 1, t(9))));
    map(&mut fs, g, 0, 1).unwrap();
    refused(&mut fs, &written_close(a, g, &[(0, 1)]), FsError::StaleMap);

    apply_ok(&mut fs, &written_close(a, f, &[(0, 2)]));
    assert!(fs.inode(f).is_none(), "closed: the orphan was dropped");
    assert_eq!(statfs(&fs).free, 8 - 1 - 1, "f's blocks are free again");
    refused(
        &mut fs,
        &FsCommand::Close { session: a, ino: f },
        FsError::Invalid,
    );
    // A size-only commit of g closes it too; its stale entry goes with the close.
    apply_ok(&mut fs, &written_close(a, g, &[]));
    assert_eq!(attr(&fs, g).size, 2 * BSZ);
    assert_eq!(stale(&fs, a).unwrap(), vec![]);
    assert!(fs.held().is_empty());
    refused(
        &mut fs,
        &FsCommand::Close { session: a, ino: g },
        FsError::Invalid,
    );
}

#[test]
fn a_retried_large_map_is_applied_again_and_changes_nothing_or_maps_afresh() {
    use drs_meta::{Answered, MetaResponse};
    let mut fs = formatted(1 << 16);
    let ino = ok_attr(
        fs.apply(&create_cmd(ROOT, b"big", Kind::File, t(1))),
        "create",
    )
    .ino;
    // 4096 blocks ahead of time (with KEEP_SIZE, say): a large answer, remembered as
    // a marker.
    let map = map_ahead_cmd(ino, 0, 2048, 2048);
    let mut answered = Answered::default();
    let first = answered.apply_with(7, || MetaResponse::Fs(fs.apply(&map)));
    let MetaResponse::Fs(Ok(FsReply::Mapped(m))) = &first else {
        panic!("{first:?}");
    };
    assert_eq!(m.len(), 4096);
    let after_first = fs.clone();
    // The retry is applied again: nothing new is mapped, and the answer is the same.
    let again = answered.apply_with(7, || MetaResponse::Fs(fs.apply(&map)));
    assert_eq!(again, first);
    assert_eq!(fs, after_first);
    // After a punch of them between the tries, it maps afresh, as a new `Map` would
    // (the client never saw the first answer).
    fs.apply(&punch_cmd(ino, 0, 4096, t(2))).unwrap();
    assert_eq!(fs.mapped_count(ino, 0, 4096), 0);
    fs.check().unwrap();
    let afresh = answered.apply_with(7, || MetaResponse::Fs(fs.apply(&map)));
    assert!(matches!(&afresh, MetaResponse::Fs(Ok(FsReply::Mapped(m))) if m.len() == 4096));
    fs.check().unwrap();
}

/// Byte-range locks in the namespace (the table's own rules are a property test
/// against a model in `drs_meta::locks`): they need an inode and a live session,
/// conflict across sessions and owners, `GetLock` names the holder, a release drops
/// one owner's locks on one file, and an ended session's and a dropped file's locks
/// go.
#[test]
fn byte_range_locks_follow_sessions_and_files() {
    use drs_meta::locks::LockKind;
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(1));
    let a = open_session(&mut fs);
    let b = open_session(&mut fs);
    let lock = |session, ino, owner, start, end, kind| FsCommand::SetLock {
        session,
        ino,
        owner,
        start,
        end,
        kind,
        pid: 100 + session as u32,
    };
    let holder =
        |fs: &FsState, session, owner, start, end, write| match fs.query(&FsQuery::GetLock {
            session,
            ino: f,
            owner,
            start,
            end,
            write,
        }) {
            Ok(FsReply::Lock(l)) => l.map(|l| (l.owner.session, l.start, l.end, l.write, l.pid)),
            other => panic!("GetLock: {other:?}"),
        };
    refused(
        &mut fs,
        &lock(a, 999, 1, 0, 9, LockKind::Write),
        FsError::NotFound,
    );
    refused(
        &mut fs,
        &lock(77, f, 1, 0, 9, LockKind::Write),
        FsError::NoSession,
    );
    refused(
        &mut fs,
        &lock(a, f, 1, 9, 0, LockKind::Write),
        FsError::Invalid,
    );
    apply_ok(&mut fs, &lock(a, f, 1, 0, 9, LockKind::Write));
    // Another session, or another owner of the same session, conflicts.
    refused(
        &mut fs,
        &lock(b, f, 1, 5, 5, LockKind::Read),
        FsError::WouldBlock,
    );
    refused(
        &mut fs,
        &lock(a, f, 2, 9, 20, LockKind::Write),
        FsError::WouldBlock,
    );
    assert_eq!(
        holder(&fs, b, 1, 0, u64::MAX, false),
        Some((a, 0, 9, true, 101))
    );
    assert_eq!(holder(&fs, a, 1, 0, u64::MAX, true), None, "its own lock");
    apply_ok(&mut fs, &lock(b, f, 1, 10, u64::MAX, LockKind::Read));
    apply_ok(&mut fs, &lock(a, f, 2, 20, 29, LockKind::Read));
    assert_eq!(fs.locks().len(), 3);
    fs.check().unwrap();
    // The owner's close releases its locks on the file, and no one else's.
    apply_ok(
        &mut fs,
        &FsCommand::ReleaseLocks {
            session: a,
            ino: f,
            owner: 1,
        },
    );
    assert_eq!(holder(&fs, b, 1, 0, 9, true), None);
    assert_eq!(fs.locks().len(), 2);
    // An ended session's locks go.
    apply_ok(&mut fs, &FsCommand::EndSession { session: b });
    assert_eq!(
        holder(&fs, a, 1, 0, u64::MAX, true),
        Some((a, 20, 29, false, 101))
    );
    assert_eq!(fs.locks().len(), 1);
    fs.check().unwrap();
    // A file dropped at its last close loses its locks.
    apply_ok(&mut fs, &FsCommand::Open { session: a, ino: f });
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"f", false, t(2)));
    apply_ok(&mut fs, &FsCommand::Close { session: a, ino: f });
    assert!(fs.inode(f).is_none());
    assert!(fs.locks().is_empty());
    fs.check().unwrap();
}

/// An ACL in the kernel's format: version 2, then (tag, perm, id) entries.
fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

const NO_ID: u32 = u32::MAX;

/// A mount's create: mode `perm` asked for with `umask` (see `FsCommand::Umask`).
fn umask_create(
    parent: Ino,
    name: &[u8],
    kind: Kind,
    perm: u16,
    umask: u16,
    now: Time,
) -> FsCommand {
    let mut cmd = create_cmd(parent, name, kind, now);
    if let FsCommand::Create { perm: p, .. } = &mut cmd {
        *p = perm;
    }
    FsCommand::Umask {
        umask,
        cmd: Box::new(cmd),
    }
}

/// `UnlinkDrop` removes a name and drops the inode it leaves without names in one
/// command: its blocks free at once when no session has it open, at the last
/// `Close` when one has; a rename over a file drops the replaced one the same way;
/// a name that is not the last, or a refused removal, drops nothing; only
/// `Unlink` and `Rename` are wrapped.
#[test]
fn unlink_drop_frees_an_unopened_orphan_at_once() {
    let mut fs = formatted(64);
    let ud = |cmd: FsCommand| FsCommand::UnlinkDrop { cmd: Box::new(cmd) };
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(1));
    map(&mut fs, f, 0, 4).unwrap();
    apply_ok(&mut fs, &link_cmd(f, ROOT, b"f2", t(1)));
    let free = statfs(&fs).free;
    // Not the last name: nothing dropped.
    assert_eq!(
        apply_ok(&mut fs, &ud(unlink_cmd(ROOT, b"f", false, t(2)))),
        FsReply::Orphaned(None)
    );
    assert_eq!(attr(&fs, f).nlink, 1);
    // The last: dropped, its blocks free.
    apply_ok(&mut fs, &ud(unlink_cmd(ROOT, b"f2", false, t(3))));
    assert!(fs.inode(f).is_none());
    assert_eq!(statfs(&fs).free, free + 4);
    // Open in a session: kept, readable, until that session's last close.
    let g = create(&mut fs, ROOT, b"g", Kind::File, t(4));
    map(&mut fs, g, 0, 2).unwrap();
    let s = open_session(&mut fs);
    apply_ok(&mut fs, &FsCommand::Open { session: s, ino: g });
    assert_eq!(
        apply_ok(&mut fs, &ud(unlink_cmd(ROOT, b"g", false, t(5)))),
        FsReply::Orphaned(None)
    );
    assert_eq!(attr(&fs, g).nlink, 0);
    apply_ok(&mut fs, &FsCommand::Close { session: s, ino: g });
    assert!(fs.inode(g).is_none());
    // A rename over a file drops the one replaced.
    let h = create(&mut fs, ROOT, b"h", Kind::File, t(6));
    let k = create(&mut fs, ROOT, b"k", Kind::File, t(6));
    apply_ok(
        &mut fs,
        &ud(rename_cmd(ROOT, b"k", ROOT, b"h", false, false, t(7))),
    );
    assert!(fs.inode(h).is_none());
    assert_eq!(lookup(&fs, ROOT, b"h"), Ok(k));
    // Refused: nothing changes.
    refused(
        &mut fs,
        &ud(unlink_cmd(ROOT, b"none", false, t(8))),
        FsError::NotFound,
    );
    refused(&mut fs, &ud(FsCommand::Drop { ino: k }), FsError::Invalid);
    assert!(fs.inode(k).is_some());
    assert_eq!(statfs(&fs).free, 64);
    fs.check().unwrap();
}

/// `GetAttrs` (what `readdirplus` asks) answers each entry's attributes in the
/// order asked, the same as `GetAttr`, with the names of its extended attributes
/// (`None` past `ATTRS_NAMES_MAX` bytes of them); `None` for a name that no
/// longer names that inode (removed, or renamed over: the inode lives on while
/// open) and for every entry of a directory that is gone; it refuses more than
/// `ATTRS_MAX` entries.
#[test]
fn attributes_of_many_inodes_in_one_query() {
    use drs_meta::fs::{AttrNames, ATTRS_MAX, ATTRS_NAMES_MAX};
    let mut fs = formatted(64);
    let a = create(&mut fs, ROOT, b"a", Kind::File, t(1));
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(2));
    let b = create(&mut fs, d, b"b", Kind::Symlink, t(3));
    let many = create(&mut fs, ROOT, b"many", Kind::File, t(3));
    let c = create(&mut fs, ROOT, b"c", Kind::File, t(3));
    let c2 = create(&mut fs, ROOT, b"c2", Kind::File, t(3));
    apply_ok(&mut fs, &unlink_cmd(d, b"b", false, t(4)));
    apply_ok(&mut fs, &FsCommand::Drop { ino: b });
    // "c" now names c2; c lives on (an orphan, as if open somewhere).
    apply_ok(
        &mut fs,
        &FsCommand::Rename {
            parent: ROOT,
            name: b"c2".to_vec(),
            new_parent: ROOT,
            new_name: b"c".to_vec(),
            noreplace: false,
            exchange: false,
            now: t(4),
        },
    );
    assert!(fs.inode(c).is_some());
    apply_ok(&mut fs, &setx(a, b"user.k", b"v", false, false, t(5)));
    apply_ok(&mut fs, &setx(a, b"security.x", b"", false, false, t(5)));
    let mut named = 0;
    while named * 40 <= ATTRS_NAMES_MAX {
        let name = format!("user.{named:035}");
        apply_ok(
            &mut fs,
            &setx(many, name.as_bytes(), b"", false, false, t(6)),
        );
        named += 1;
    }
    let with = |fs: &FsState, ino: Ino, names: Option<Vec<&[u8]>>| {
        Some(AttrNames {
            attr: attr(fs, ino),
            xattrs: names.map(|n| n.into_iter().map(|x| x.to_vec()).collect()),
        })
    };
    let entry = |name: &[u8], ino: Ino| (name.to_vec(), ino);
    match fs.query(&FsQuery::GetAttrs {
        parent: ROOT,
        entries: vec![
            entry(b".", ROOT),
            entry(b"..", ROOT),
            entry(b"d", d),
            entry(b"a", a),
            entry(b"many", many),
            entry(b"c", c),
            entry(b"c", c2),
            entry(b"c2", c2),
            entry(b"a", a),
        ],
    }) {
        Ok(FsReply::Attrs(got)) => assert_eq!(
            got,
            vec![
                with(&fs, ROOT, Some(vec![])),
                with(&fs, ROOT, Some(vec![])),
                with(&fs, d, Some(vec![])),
                with(&fs, a, Some(vec![b"security.x", b"user.k"])),
                with(&fs, many, None),
                None,
                with(&fs, c2, Some(vec![])),
                None,
                with(&fs, a, Some(vec![b"security.x", b"user.k"])),
            ]
        ),
        other => panic!("{other:?}"),
    }
    // In a directory: its own entries, `..` its parent; a removed name is gone,
    // and so is every entry of a removed directory.
    match fs.query(&FsQuery::GetAttrs {
        parent: d,
        entries: vec![entry(b"..", ROOT), entry(b"b", b), entry(b"..", d)],
    }) {
        Ok(FsReply::Attrs(got)) => {
            assert_eq!(got, vec![with(&fs, ROOT, Some(vec![])), None, None])
        }
        other => panic!("{other:?}"),
    }
    apply_ok(&mut fs, &unlink_cmd(ROOT, b"d", true, t(7)));
    assert_eq!(
        fs.query(&FsQuery::GetAttrs {
            parent: d,
            entries: vec![entry(b".", d)],
        }),
        Ok(FsReply::Attrs(vec![None]))
    );
    assert_eq!(
        fs.query(&FsQuery::GetAttrs {
            parent: ROOT,
            entries: vec![entry(b"a", a); ATTRS_MAX]
        })
        .map(|r| matches!(r, FsReply::Attrs(v) if v.len() == ATTRS_MAX)),
        Ok(true)
    );
    assert_eq!(
        fs.query(&FsQuery::GetAttrs {
            parent: ROOT,
            entries: vec![entry(b"a", a); ATTRS_MAX + 1]
        }),
        Err(FsError::Invalid)
    );
}

/// Setting an access ACL drops the set-gid bit for a caller outside the file's
/// group and without CAP_FSETID, and keeps it for the others (as a chmod would);
/// the group is the file's when the command is applied. Default ACLs and other
/// attributes leave the mode alone, and `AclAs` wraps nothing but a `SetXattr`.
#[test]
fn an_acl_set_by_a_caller_outside_the_group_drops_set_gid() {
    use drs_meta::acl::{ACCESS, DEFAULT};
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(1));
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(1));
    let gid = attr(&fs, f).gid;
    // user::rwx user:1000:r-- group::r-x mask::r-x other::---
    let named = acl_bytes(&[
        (0x01, 7, NO_ID),
        (0x02, 4, 1000),
        (0x04, 5, NO_ID),
        (0x10, 5, NO_ID),
        (0x20, 0, NO_ID),
    ]);
    let sgid = |fs: &mut FsState, ino: Ino| {
        apply_ok(
            fs,
            &FsCommand::SetAttr {
                ino,
                set: SetAttr {
                    perm: Some(0o2750),
                    ..SetAttr::default()
                },
                now: t(2),
            },
        );
    };
    let acl_as = |ino: Ino, name: &[u8], fsetid: bool, member_of: Option<u32>| FsCommand::AclAs {
        fsetid,
        member_of,
        cmd: Box::new(setx(ino, name, &named, false, false, t(3))),
    };
    // A member of the file's group, or a caller with CAP_FSETID: kept.
    for (fsetid, member_of) in [(false, Some(gid)), (true, None), (true, Some(gid + 1))] {
        sgid(&mut fs, f);
        match apply_ok(&mut fs, &acl_as(f, ACCESS, fsetid, member_of)) {
            FsReply::Attr(a) => assert_eq!(a.perm, 0o2750, "{fsetid} {member_of:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(attr(&fs, f).perm, 0o2750);
    }
    // Outside the group (or a member of a group the file no longer has): dropped,
    // and the reply says so.
    for member_of in [None, Some(gid + 1)] {
        sgid(&mut fs, f);
        match apply_ok(&mut fs, &acl_as(f, ACCESS, false, member_of)) {
            FsReply::Attr(a) => assert_eq!(a.perm, 0o750, "{member_of:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(attr(&fs, f).perm, 0o750);
        assert_eq!(getx(&fs, f, ACCESS).unwrap(), named);
    }
    // A default ACL on a set-gid directory leaves its mode alone.
    sgid(&mut fs, d);
    apply_ok(&mut fs, &acl_as(d, DEFAULT, false, None));
    assert_eq!(attr(&fs, d).perm, 0o2750);
    // A refused set changes nothing.
    sgid(&mut fs, f);
    let bad = FsCommand::AclAs {
        fsetid: false,
        member_of: None,
        cmd: Box::new(setx(f, ACCESS, b"not an acl", false, false, t(4))),
    };
    assert!(fs.apply(&bad).is_err());
    assert_eq!(attr(&fs, f).perm, 0o2750);
    // Only a `SetXattr` is wrapped.
    let wrapped = FsCommand::AclAs {
        fsetid: false,
        member_of: None,
        cmd: Box::new(FsCommand::Drop { ino: f }),
    };
    assert_eq!(fs.apply(&wrapped), Err(FsError::Invalid));
    assert!(fs.inode(f).is_some());
    fs.check().unwrap();
}

/// POSIX ACLs in the namespace (their rules one by one are unit tests of
/// `drs_meta::acl`): an access ACL sets the mode and a minimal one is not kept, a
/// chmod changes the ACL, a default ACL is inherited with the mode asked for (the
/// umask not applied) by files and directories but not symlinks, and elsewhere the
/// umask applies.
#[test]
fn acls_follow_the_mode_and_are_inherited() {
    use drs_meta::acl::{ACCESS, DEFAULT};
    let mut fs = formatted(64);
    let f = create(&mut fs, ROOT, b"f", Kind::File, t(1));
    // user::rw- user:1000:rwx group::r-- mask::rwx other::---
    let named = acl_bytes(&[
        (0x01, 6, NO_ID),
        (0x02, 7, 1000),
        (0x04, 4, NO_ID),
        (0x10, 7, NO_ID),
        (0x20, 0, NO_ID),
    ]);
    apply_ok(&mut fs, &setx(f, ACCESS, &named, false, false, t(2)));
    assert_eq!(attr(&fs, f).perm, 0o670, "the group bits are the mask's");
    assert_eq!(attr(&fs, f).ctime, t(2));
    assert_eq!(getx(&fs, f, ACCESS).unwrap(), named);
    // chmod: the owner, mask and other entries follow.
    apply_ok(
        &mut fs,
        &FsCommand::SetAttr {
            ino: f,
            set: SetAttr {
                perm: Some(0o604),
                ..SetAttr::default()
            },
            now: t(3),
        },
    );
    let chmodded = acl_bytes(&[
        (0x01, 6, NO_ID),
        (0x02, 7, 1000),
        (0x04, 4, NO_ID),
        (0x10, 0, NO_ID),
        (0x20, 4, NO_ID),
    ]);
    assert_eq!(getx(&fs, f, ACCESS).unwrap(), chmodded);
    // A minimal ACL is the mode alone.
    let minimal = acl_bytes(&[(0x01, 7, NO_ID), (0x04, 5, NO_ID), (0x20, 1, NO_ID)]);
    apply_ok(&mut fs, &setx(f, ACCESS, &minimal, false, false, t(4)));
    assert_eq!(attr(&fs, f).perm, 0o751);
    assert_eq!(getx(&fs, f, ACCESS), Err(FsError::NoXattr));
    refused(
        &mut fs,
        &setx(f, ACCESS, b"\x02\0\0\0\x01", false, false, t(5)),
        FsError::Invalid,
    );
    refused(
        &mut fs,
        &setx(f, DEFAULT, &minimal, false, false, t(5)),
        FsError::Invalid,
    );
    refused(
        &mut fs,
        &setx(f, b"system.other", b"x", false, false, t(5)),
        FsError::XattrNotSupported,
    );

    // A directory with a default ACL: group rwx, a named group, other r-x.
    let d = create(&mut fs, ROOT, b"d", Kind::Dir, t(6));
    let default = acl_bytes(&[
        (0x01, 7, NO_ID),
        (0x04, 7, NO_ID),
        (0x08, 5, 50),
        (0x10, 7, NO_ID),
        (0x20, 5, NO_ID),
    ]);
    apply_ok(&mut fs, &setx(d, DEFAULT, &default, false, false, t(6)));
    let made = |fs: &mut FsState, name: &[u8], kind: Kind, perm: u16| {
        ok_attr(
            fs.apply(&umask_create(d, name, kind, perm, 0o077, t(7))),
            "create",
        )
    };
    // The umask (077) is not applied; the mode asked for (666) masks the ACL.
    let g = made(&mut fs, b"g", Kind::File, 0o666);
    assert_eq!(g.perm, 0o664);
    assert_eq!(
        getx(&fs, g.ino, ACCESS).unwrap(),
        acl_bytes(&[
            (0x01, 6, NO_ID),
            (0x04, 7, NO_ID),
            (0x08, 5, 50),
            (0x10, 6, NO_ID),
            (0x20, 4, NO_ID),
        ])
    );
    assert_eq!(getx(&fs, g.ino, DEFAULT), Err(FsError::NoXattr));
    let sub = made(&mut fs, b"sub", Kind::Dir, 0o777);
    assert_eq!(sub.perm, 0o775);
    assert_eq!(getx(&fs, sub.ino, DEFAULT).unwrap(), default, "passed on");
    let l = made(&mut fs, b"l", Kind::Symlink, 0o777);
    assert_eq!(getx(&fs, l.ino, ACCESS), Err(FsError::NoXattr));
    // Through `CreateOpen` as well.
    let s = open_session(&mut fs);
    let cmd = FsCommand::CreateOpen {
        session: s,
        cmd: Box::new(umask_create(d, b"h", Kind::File, 0o666, 0o077, t(8))),
    };
    let h = ok_attr(fs.apply(&cmd), "create open");
    assert_eq!(h.perm, 0o664, "the umask is not applied");
    assert!(getx(&fs, h.ino, ACCESS).is_ok());
    // A plain `Create` inherits nothing; a symlink's mode is never masked.
    let old = ok_attr(fs.apply(&create_cmd(d, b"old", Kind::File, t(8))), "create");
    assert_eq!(getx(&fs, old.ino, ACCESS), Err(FsError::NoXattr));
    let link = umask_create(ROOT, b"l2", Kind::Symlink, 0o777, 0o077, t(8));
    let l2 = ok_attr(fs.apply(&link), "symlink");
    assert_eq!(l2.perm, 0o777);
    // Elsewhere the umask applies.
    let plain = umask_create(ROOT, b"p", Kind::File, 0o666, 0o027, t(9));
    let p = ok_attr(fs.apply(&plain), "create");
    assert_eq!(p.perm, 0o640);
    refused(
        &mut fs,
        &FsCommand::Umask {
            umask: 0,
            cmd: Box::new(FsCommand::Drop { ino: p.ino }),
        },
        FsError::Invalid,
    );
    fs.check().unwrap();
}

/// Commands and replies travel and sit in the Raft log as postcard, which numbers
/// an enum's variants in the order they are declared: a variant added anywhere but
/// at the end would make every log, snapshot and peer of an earlier version read
/// the later ones as something else. Their numbers stay as they are.
#[test]
fn command_and_reply_variants_keep_their_numbers() {
    let number = |bytes: Vec<u8>| bytes[0];
    let cmd = |c: FsCommand| number(postcard::to_allocvec(&c).unwrap());
    let created = create_cmd(ROOT, b"f", Kind::File, t(1));
    let written = written_cmd(2, 0, t(1), &[], true);
    assert_eq!(cmd(format_cmd(8)), 0);
    assert_eq!(cmd(created.clone()), 1);
    assert_eq!(cmd(map_cmd(2, 0, 1)), 6);
    assert_eq!(cmd(written.clone()), 7);
    assert_eq!(cmd(FsCommand::Drop { ino: 2 }), 8);
    assert_eq!(cmd(FsCommand::OpenSession { now: t(1) }), 13);
    assert_eq!(cmd(FsCommand::Close { session: 1, ino: 2 }), 16);
    assert_eq!(
        cmd(FsCommand::CreateOpen {
            session: 1,
            cmd: Box::new(created.clone()),
        }),
        19
    );
    assert_eq!(
        cmd(FsCommand::WrittenClose {
            session: 1,
            ino: 2,
            cmd: Box::new(written.clone()),
        }),
        20
    );
    assert_eq!(
        cmd(FsCommand::ReleaseLocks {
            session: 1,
            ino: 2,
            owner: 3,
        }),
        22
    );
    assert_eq!(
        cmd(FsCommand::Umask {
            umask: 0o22,
            cmd: Box::new(created),
        }),
        23
    );
    assert_eq!(
        cmd(FsCommand::TrimAlone {
            cmd: Box::new(written),
        }),
        24
    );
    assert_eq!(
        cmd(FsCommand::AclAs {
            fsetid: false,
            member_of: None,
            cmd: Box::new(setx(2, drs_meta::acl::ACCESS, b"", false, false, t(1))),
        }),
        25
    );
    assert_eq!(
        cmd(FsCommand::UnlinkDrop {
            cmd: Box::new(unlink_cmd(1, b"f", false, t(1))),
        }),
        26
    );
    let reply = |r: FsReply| number(postcard::to_allocvec(&r).unwrap());
    assert_eq!(reply(FsReply::Done), 7);
    assert_eq!(reply(FsReply::Session(1)), 8);
    assert_eq!(reply(FsReply::Lock(None)), 10);
    assert_eq!(reply(FsReply::Attrs(Vec::new())), 11);
    let query = |q: FsQuery| number(postcard::to_allocvec(&q).unwrap());
    assert_eq!(query(FsQuery::GetAttr { ino: 1 }), 1);
    assert_eq!(
        query(FsQuery::GetLock {
            session: 1,
            ino: 2,
            owner: 3,
            start: 0,
            end: 0,
            write: true,
        }),
        9
    );
    assert_eq!(
        query(FsQuery::GetAttrs {
            parent: 1,
            entries: Vec::new()
        }),
        10
    );
    let mut fs = formatted(8);
    let a = create_attr(&mut fs, ROOT, b"f", Kind::File, t(1));
    assert_eq!(reply(FsReply::Attr(a)), 0);
}
