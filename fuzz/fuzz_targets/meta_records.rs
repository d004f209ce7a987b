//! The metadata store's records from arbitrary bytes (a damaged database or a hostile
//! snapshot sent by a peer): log entries, snapshots and commands decode or fail
//! cleanly, never panic, and refuse oversized input before decoding.
#![no_main]

use drs_meta::store::{decode_log_entry, decode_snapshot};
use drs_meta::MetaCommand;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_log_entry(data);
    let _ = decode_snapshot(data);
    let _ = postcard::from_bytes::<MetaCommand>(data);
});
