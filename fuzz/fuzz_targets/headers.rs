//! The block store's header table from arbitrary bytes, for any k and block count:
//! decoding never panics and never returns more records than blocks.
#![no_main]

use drs_server::store::headers::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [k, s0, s1, rest @ ..] = data else {
        return;
    };
    let k = usize::from(*k % 32).max(1);
    let slots = u64::from(u16::from_le_bytes([*s0, *s1]));
    if let Ok(records) = decode(rest, k, slots) {
        assert!(records.len() as u64 <= slots);
    }
});
