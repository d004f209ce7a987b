//! The block store's write-ahead log from arbitrary bytes (a torn, corrupt or hostile
//! log file): decoding never panics, stops at the first damaged record, and every
//! record it accepts encodes and decodes back to itself.
//!
//! The first byte picks the mode: odd, the rest is a record body wrapped in a record
//! head with a correct checksum (the layout in `drs_server::store::wal`), so the
//! fuzzer reaches the body's decoder; even, the rest is the log as it is.
#![no_main]

use bytes::BufMut;
use drs_server::store::wal::{decode_records, encode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let wrapped;
    let log = if mode % 2 == 1 {
        let mut rec = Vec::with_capacity(12 + data.len());
        rec.put_u16_le(0xD25A);
        rec.put_u8(1);
        rec.put_u8(0);
        rec.put_u32_le(u32::try_from(data.len()).unwrap_or(u32::MAX));
        let mut h = crc32fast::Hasher::new();
        h.update(&rec[..8]);
        h.update(data);
        rec.put_u32_le(h.finalize());
        rec.extend_from_slice(data);
        wrapped = rec;
        &wrapped[..]
    } else {
        data
    };
    let (records, used, _stop) = decode_records(log);
    assert!(used <= log.len());
    // Accepted records encode, and decode back to themselves (the bytes may differ:
    // postcard accepts an overlong varint that it never writes).
    let mut again = bytes::BytesMut::new();
    for r in &records {
        encode_record(r, &mut again).expect("an accepted record encodes");
    }
    let (back, back_used, _) = decode_records(&again);
    assert_eq!(
        back_used,
        again.len(),
        "a re-encoded log does not decode whole"
    );
    assert_eq!(
        back, records,
        "accepted records do not survive encode + decode"
    );
});
