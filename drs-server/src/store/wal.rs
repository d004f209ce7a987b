//! The write-ahead log of one volume's block store.
//!
//! Every change to a block is a record here, made durable (group-committed fsync)
//! before the change is acknowledged and before the block file is touched.
//!
//! ```text
//! record := magic u16 | kind u8 (=1) | reserved u8 (=0) | body_len u32 | crc32 u32 | body
//! body   := ctrl_len u32 | ctrl (postcard WalCtrl) | data
//! ```
//! `crc32` covers the first 8 bytes of the record and the whole body. Replay stops at
//! the first record that is incomplete, oversized or fails its checksum (a torn write
//! at the tail): that record and anything after it are never applied.
//!
//! An `Apply` record carries the *after-image* of the byte range it changed, plus the
//! block's versions and checksum afterwards. Replaying it writes those bytes again,
//! which is idempotent however much of the original write reached the block file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use drs_proto::{BlockUpdate, StripeId, UpdateId, Version};
use serde::{Deserialize, Serialize};

const MAGIC: u16 = 0xD25A;
const KIND: u8 = 1;
const HEAD: usize = 12;
/// Largest control section of a record.
pub const MAX_CTRL: usize = 64 * 1024;
/// Largest record body.
pub const MAX_BODY: usize = 4 + MAX_CTRL + drs_proto::frame::MAX_PAYLOAD_LEN;

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalCtrl {
    /// The block at `stripe` now holds `data` in `[offset, offset + data.len())`, and
    /// as a whole has `versions` and checksum `crc`. `ids` name the updates that did
    /// it, all applied in one group commit (none for a repair or rebuild): a parity
    /// block changed by every block of a stripe write logs one after-image, not one
    /// per update.
    Apply {
        stripe: StripeId,
        ids: Vec<UpdateId>,
        versions: Vec<Version>,
        offset: u32,
        crc: u32,
    },
    /// An update logged but not yet applicable (it waits for an earlier version);
    /// `data` is its delta.
    Pending {
        stripe: StripeId,
        id: UpdateId,
        index: u8,
        version: Version,
        base: Version,
        offset: u32,
    },
    /// A pending update that will never be applied (a later install covered it).
    Drop { stripe: StripeId, id: UpdateId },
    /// An update this node took while the block's data node did not take part: it is
    /// *kept* (passed on after a restart) until settled (a member lacking it
    /// confirmed it, or its completion notice came), since the parity members may
    /// hold its only copies. Written after the batch's `Apply` records. `data` is
    /// its delta.
    Kept {
        stripe: StripeId,
        update: BlockUpdate,
    },
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub ctrl: WalCtrl,
    pub data: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("wal record control section: {0}")]
    Encode(#[from] postcard::Error),
    #[error("wal record too large ({0} bytes)")]
    TooLarge(usize),
}

/// Appends `rec` to `buf`.
pub fn encode_record(rec: &WalRecord, buf: &mut BytesMut) -> Result<(), WalError> {
    encode_parts(&rec.ctrl, &rec.data, None, buf)
}

/// Appends a record made of `ctrl` and `data` to `buf`. `data_crc`, when the caller
/// already has crc32(`data`), saves hashing the bytes a second time.
pub fn encode_parts(
    ctrl: &WalCtrl,
    data: &[u8],
    data_crc: Option<u32>,
    buf: &mut BytesMut,
) -> Result<(), WalError> {
    let ctrl = postcard::to_stdvec(ctrl)?;
    if ctrl.len() > MAX_CTRL {
        return Err(WalError::TooLarge(ctrl.len()));
    }
    let body_len = 4 + ctrl.len() + data.len();
    if body_len > MAX_BODY {
        return Err(WalError::TooLarge(body_len));
    }
    let start = buf.len();
    buf.reserve(HEAD + body_len);
    buf.put_u16_le(MAGIC);
    buf.put_u8(KIND);
    buf.put_u8(0);
    buf.put_u32_le(body_len as u32);
    buf.put_u32_le(0); // crc, filled below
    buf.put_u32_le(ctrl.len() as u32);
    buf.extend_from_slice(&ctrl);
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[start..start + 8]);
    h.update(&buf[start + HEAD..]);
    match data_crc {
        Some(c) => h.combine(&crc32fast::Hasher::new_with_initial_len(
            c,
            data.len() as u64,
        )),
        None => h.update(data),
    }
    buf.extend_from_slice(data);
    let crc = h.finalize();
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Clean end of the log.
    End,
    /// A torn or corrupt record starts at this offset; it and the rest are ignored.
    Damaged,
}

/// Decodes records from the front of `buf`. Returns the records, how many bytes they
/// span, and why decoding stopped. Never panics and never allocates more than the
/// input's size.
pub fn decode_records(buf: &[u8]) -> (Vec<WalRecord>, usize, Stop) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = &buf[pos..];
        if rest.is_empty() {
            return (out, pos, Stop::End);
        }
        match decode_one(rest) {
            Some((rec, used)) => {
                out.push(rec);
                pos += used;
            }
            None => return (out, pos, Stop::Damaged),
        }
    }
}

fn decode_one(rest: &[u8]) -> Option<(WalRecord, usize)> {
    if rest.len() < HEAD {
        return None;
    }
    let mut h = &rest[..HEAD];
    if h.get_u16_le() != MAGIC || h.get_u8() != KIND || h.get_u8() != 0 {
        return None;
    }
    let body_len = h.get_u32_le() as usize;
    let crc = h.get_u32_le();
    if !(4..=MAX_BODY).contains(&body_len) || rest.len() < HEAD + body_len {
        return None;
    }
    let body = &rest[HEAD..HEAD + body_len];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&rest[..8]);
    hasher.update(body);
    if hasher.finalize() != crc {
        return None;
    }
    let mut b = body;
    let ctrl_len = b.get_u32_le() as usize;
    if ctrl_len > MAX_CTRL || ctrl_len > b.len() {
        return None;
    }
    let ctrl: WalCtrl = postcard::from_bytes(&b[..ctrl_len]).ok()?;
    let data = Bytes::copy_from_slice(&b[ctrl_len..]);
    Some((WalRecord { ctrl, data }, HEAD + body_len))
}

/// The open log file, appended to by the store's writer thread only.
pub struct Wal {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Wal {
    /// Opens (creating if needed) the log at `path`, returns it with the records it
    /// holds. A damaged tail is cut off so new records follow the last good one.
    pub fn open(path: &Path) -> Result<(Wal, Vec<WalRecord>, Stop), WalError> {
        let io = |source| WalError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut raw = Vec::new();
        file.read_to_end(&mut raw).map_err(io)?;
        let (records, good, stop) = decode_records(&raw);
        if good < raw.len() {
            file.set_len(good as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        Ok((
            Wal {
                path: path.to_owned(),
                file,
                len: good as u64,
            },
            records,
            stop,
        ))
    }

    /// Appends encoded records (not yet durable). On failure the file is cut back to
    /// its previous length, so a partial append never precedes later records.
    pub fn append(&mut self, encoded: &[u8]) -> Result<(), WalError> {
        if let Err(source) = self.file.write_all(encoded) {
            let _ = self.file.set_len(self.len);
            return Err(WalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.len += encoded.len() as u64;
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.file.sync_data().map_err(|source| WalError::Io {
            path: self.path.clone(),
            source,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u64) -> WalRecord {
        if i.is_multiple_of(2) {
            WalRecord {
                ctrl: WalCtrl::Apply {
                    stripe: i,
                    ids: vec![
                        UpdateId { client: 3, seq: i },
                        UpdateId {
                            client: 3,
                            seq: i + 1,
                        },
                    ],
                    versions: vec![i, 0, 2],
                    offset: 16,
                    crc: 0xABCD,
                },
                data: Bytes::from(vec![i as u8; 100 + i as usize]),
            }
        } else {
            WalRecord {
                ctrl: WalCtrl::Pending {
                    stripe: i,
                    id: UpdateId { client: 4, seq: i },
                    index: 1,
                    version: i,
                    base: i.saturating_sub(1),
                    offset: 0,
                },
                data: Bytes::from(vec![7u8; 33]),
            }
        }
    }

    fn encode_all(recs: &[WalRecord]) -> BytesMut {
        let mut b = BytesMut::new();
        for r in recs {
            encode_record(r, &mut b).unwrap();
        }
        b
    }

    #[test]
    fn round_trip_and_every_truncation_is_detected() {
        let recs: Vec<WalRecord> = (0..6).map(sample).collect();
        let all = encode_all(&recs);
        let (got, used, stop) = decode_records(&all);
        assert_eq!(got, recs);
        assert_eq!(used, all.len());
        assert_eq!(stop, Stop::End);
        // A torn tail: every prefix decodes to the whole records it contains, no more.
        let mut boundaries = vec![0usize];
        let mut b = BytesMut::new();
        for r in &recs {
            encode_record(r, &mut b).unwrap();
            boundaries.push(b.len());
        }
        for cut in 0..all.len() {
            let (got, used, stop) = decode_records(&all[..cut]);
            let whole = boundaries.iter().filter(|&&x| x <= cut).count() - 1;
            assert_eq!(got.len(), whole, "cut {cut}");
            assert_eq!(used, boundaries[whole]);
            assert_eq!(
                stop,
                if cut == used {
                    Stop::End
                } else {
                    Stop::Damaged
                }
            );
        }
    }

    #[test]
    fn a_precomputed_data_crc_gives_the_same_record() {
        let rec = sample(4);
        let mut a = BytesMut::new();
        let mut b = BytesMut::new();
        encode_record(&rec, &mut a).unwrap();
        encode_parts(
            &rec.ctrl,
            &rec.data,
            Some(crc32fast::hash(&rec.data)),
            &mut b,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_flipped_bit_is_never_applied() {
        let recs: Vec<WalRecord> = (0..3).map(sample).collect();
        let all = encode_all(&recs);
        for byte in 0..all.len() {
            let mut b = all.to_vec();
            b[byte] ^= 0x10;
            let (got, _, _) = decode_records(&b);
            for (g, r) in got.iter().zip(&recs) {
                assert_eq!(g, r, "a damaged record decoded (byte {byte})");
            }
            assert!(got.len() < recs.len(), "flip at {byte} went unnoticed");
        }
    }

    #[test]
    fn open_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.log");
        let recs: Vec<WalRecord> = (0..4).map(sample).collect();
        let all = encode_all(&recs);
        std::fs::write(&path, &all[..all.len() - 5]).unwrap();
        let (mut wal, got, stop) = Wal::open(&path).unwrap();
        assert_eq!(got, recs[..3].to_vec());
        assert_eq!(stop, Stop::Damaged);
        let mut b = BytesMut::new();
        encode_record(&recs[3], &mut b).unwrap();
        wal.append(&b).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, got, stop) = Wal::open(&path).unwrap();
        assert_eq!(got, recs);
        assert_eq!(stop, Stop::End);
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode_records(&data);
        }
    }
}
