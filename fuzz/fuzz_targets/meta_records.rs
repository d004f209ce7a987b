//! The metadata store's records from arbitrary bytes (a damaged database or a hostile
//! snapshot sent by a peer): log entries, snapshots and commands decode or fail
//! cleanly, never panic, and refuse oversized input before decoding; a decoded
//! snapshot's lock table takes locks, unlocks and releases without panicking; an
//! ACL decodes or is refused, and a valid one stays valid through a chmod and an
//! inheritance.
#![no_main]

use drs_meta::locks::{LockKind, Owner};
use drs_meta::store::{decode_log_entry, decode_snapshot};
use drs_meta::MetaCommand;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_log_entry(data);
    if let Ok(sm) = decode_snapshot(data) {
        let mut locks = sm.fs.read().locks().clone();
        let files: Vec<u64> = locks.files().take(8).collect();
        for ino in files {
            let owner = Owner {
                session: 1,
                owner: ino,
            };
            let _ = locks.set(ino, owner, 5, 9, LockKind::Write, 0);
            let _ = locks.set(ino, owner, 0, u64::MAX, LockKind::Unlock, 0);
            locks.release(ino, owner);
        }
        locks.release_session(2);
    }
    let _ = postcard::from_bytes::<MetaCommand>(data);
    // An ACL a mount sends to be kept: decoded and, if valid, changed and encoded.
    if let Ok(mut acl) = drs_meta::acl::Acl::decode(data) {
        acl.chmod(0o754);
        let (inherited, _) = acl.inherit(0o666);
        assert!(drs_meta::acl::Acl::decode(&inherited.encode()).is_ok());
    }
});
