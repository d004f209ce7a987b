//! The checkpointed block headers of one volume's store: for every block, its
//! versions, checksum and flags, as of the last checkpoint. The write-ahead log holds
//! everything after it.
//!
//! ```text
//! file   := magic "DRSH" | format u32 (=1) | k u32 | reserved u32 (=0) | slots u64 | record * slots | crc32 u32
//! record := position u8 | flags u8 | reserved u16 | crc u32 | versions u64 * k
//! ```
//! Written to a temporary file, synced, then renamed over the old one, so a crash
//! leaves either the old or the new table. The trailing crc32 covers everything
//! before it; a table that fails it is not used.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use bytes::{Buf, BufMut};
use drs_proto::Version;

const MAGIC: u32 = u32::from_le_bytes(*b"DRSH");
const FORMAT: u32 = 1;

/// Flag: the block has been written at least once (otherwise it is all zeros).
pub const FLAG_WRITTEN: u8 = 1;
/// Flag: the block failed its checksum and waits for repair.
pub const FLAG_CORRUPT: u8 = 2;

/// One block's persisted header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRecord {
    pub position: u8,
    pub flags: u8,
    pub crc: u32,
    pub versions: Vec<Version>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadersError {
    #[error("headers i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("headers file is damaged: {0}")]
    Damaged(&'static str),
}

/// Encodes the table.
pub fn encode(k: usize, records: &[HeaderRecord]) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + records.len() * (8 + 8 * k));
    b.put_u32_le(MAGIC);
    b.put_u32_le(FORMAT);
    b.put_u32_le(k as u32);
    b.put_u32_le(0);
    b.put_u64_le(records.len() as u64);
    for r in records {
        b.put_u8(r.position);
        b.put_u8(r.flags);
        b.put_u16_le(0);
        b.put_u32_le(r.crc);
        for i in 0..k {
            b.put_u64_le(r.versions.get(i).copied().unwrap_or(0));
        }
    }
    let crc = crc32fast::hash(&b);
    b.put_u32_le(crc);
    b
}

/// Decodes a table written for `k` and `slots` blocks.
pub fn decode(raw: &[u8], k: usize, slots: u64) -> Result<Vec<HeaderRecord>, HeadersError> {
    if raw.len() < 28 {
        return Err(HeadersError::Damaged("too short"));
    }
    let (body, tail) = raw.split_at(raw.len() - 4);
    let crc = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if crc32fast::hash(body) != crc {
        return Err(HeadersError::Damaged("checksum mismatch"));
    }
    let mut b = body;
    if b.get_u32_le() != MAGIC {
        return Err(HeadersError::Damaged("bad magic"));
    }
    if b.get_u32_le() != FORMAT {
        return Err(HeadersError::Damaged("unknown format"));
    }
    if b.get_u32_le() as usize != k {
        return Err(HeadersError::Damaged("written for another k"));
    }
    let _ = b.get_u32_le();
    let n = b.get_u64_le();
    if n != slots {
        return Err(HeadersError::Damaged(
            "written for another number of stripes",
        ));
    }
    let rec_len = 8 + 8 * k;
    if (b.len() as u64) != n.saturating_mul(rec_len as u64) {
        return Err(HeadersError::Damaged(
            "length does not match the slot count",
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let position = b.get_u8();
        let flags = b.get_u8();
        let _ = b.get_u16_le();
        let crc = b.get_u32_le();
        let versions = (0..k).map(|_| b.get_u64_le()).collect();
        out.push(HeaderRecord {
            position,
            flags,
            crc,
            versions,
        });
    }
    Ok(out)
}

/// Writes the table durably and atomically to `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<HeaderRecord> {
        (0..5)
            .map(|i| HeaderRecord {
                position: i as u8,
                flags: FLAG_WRITTEN,
                crc: 1000 + i,
                versions: vec![i as u64, 2, 3],
            })
            .collect()
    }

    #[test]
    fn round_trip() {
        let t = table();
        let raw = encode(3, &t);
        assert_eq!(decode(&raw, 3, 5).unwrap(), t);
    }

    #[test]
    fn damage_and_mismatch_detected() {
        let raw = encode(3, &table());
        assert!(decode(&raw, 4, 5).is_err(), "other k");
        assert!(decode(&raw, 3, 6).is_err(), "other slot count");
        for i in 0..raw.len() {
            let mut b = raw.clone();
            b[i] ^= 1;
            assert!(decode(&b, 3, 5).is_err(), "flip at {i}");
        }
        assert!(decode(&raw[..raw.len() - 1], 3, 5).is_err());
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), k in 1usize..8, n in 0u64..10) {
            let _ = decode(&data, k, n);
        }
    }
}
