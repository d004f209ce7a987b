//! Frames: the unit on the wire.
//!
//! ```text
//!  0      4        6     7      8            16        24           32           36         40           44      48
//!  +------+--------+-----+------+------------+---------+------------+------------+----------+------------+-------+---------+---------+
//!  |magic |version |kind |flags |cluster_id  |epoch    |request_id  |deadline_ms |ctrl_len  |payload_len |crc32  | ctrl    | payload |
//!  +------+--------+-----+------+------------+---------+------------+------------+----------+------------+-------+---------+---------+
//! ```
//! All integers are little-endian. `crc32` (IEEE, crc32fast) covers header bytes 0..44,
//! the control section and the payload, so a flipped bit anywhere is detected. The
//! lengths are checked against [`MAX_CTRL_LEN`] and [`MAX_PAYLOAD_LEN`] as soon as the
//! 48 header bytes are in, before any buffer for the body is reserved.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// "DRS1" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DRS1");
/// The protocol version this build speaks. A peer accepts exactly this version.
pub const PROTOCOL_VERSION: u16 = 7;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Largest control section (postcard-encoded message fields).
pub const MAX_CTRL_LEN: usize = 64 * 1024;
/// Largest raw payload: one block of the largest supported block size.
pub const MAX_PAYLOAD_LEN: usize = 8 * 1024 * 1024;

/// Largest encoded frame: what an authenticated record of node frames may hold.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_CTRL_LEN + MAX_PAYLOAD_LEN;

/// Bytes of a control section a page of entries in a reply may fill: the limit, less
/// room for the reply's own fields.
pub const CTRL_PAGE_BUDGET: usize = MAX_CTRL_LEN - 256;

/// How many of `entries`, from the first, fit in `budget` encoded bytes; at least
/// one (if any), so a page always moves on.
pub fn fitting<'a, T: Serialize + 'a>(
    entries: impl IntoIterator<Item = &'a T>,
    budget: usize,
) -> usize {
    let mut used = 0usize;
    let mut n = 0;
    for e in entries {
        used = used.saturating_add(postcard::experimental::serialized_size(e).unwrap_or(budget));
        if used > budget && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

/// Node frames in authenticated records.
pub type SealedFrames = crate::auth::SealedCodec<FrameCodec>;

impl crate::auth::Session {
    /// The codec of node frames over this session.
    pub fn frames(self) -> SealedFrames {
        self.codec(FrameCodec, MAX_FRAME_LEN)
    }
}

/// Whether a frame asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Request = 1,
    Response = 2,
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub cluster_id: u64,
    /// The cluster-map epoch the sender acts in (requests) or the receiver holds (responses).
    pub epoch: u64,
    /// Chosen by the requester, unique per connection; the response carries the same id.
    pub request_id: u64,
    /// Requests: the time budget in milliseconds the requester will wait for an answer;
    /// a node drops work whose budget ran out. Responses: 0.
    pub deadline_ms: u32,
}

/// One whole frame: header, control section and raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FrameHeader,
    pub ctrl: Bytes,
    pub payload: Bytes,
}

/// Why a byte stream is not a valid frame. Any of these ends the connection: after a bad
/// frame the stream cannot be re-synchronised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    BadVersion(u16),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("nonzero reserved flags {0:#04x}")]
    BadFlags(u8),
    #[error("control section of {0} bytes exceeds the limit of {MAX_CTRL_LEN}")]
    CtrlTooLarge(usize),
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD_LEN}")]
    PayloadTooLarge(usize),
    #[error("checksum mismatch: header says {expected:#010x}, frame hashes to {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("malformed control section: {0}")]
    Ctrl(#[from] postcard::Error),
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Frame {
    /// Builds a frame whose control section is `msg` encoded with postcard.
    pub fn new<M: Serialize>(
        header: FrameHeader,
        msg: &M,
        payload: Bytes,
    ) -> Result<Frame, FrameError> {
        let ctrl = postcard::to_stdvec(msg)?;
        if ctrl.len() > MAX_CTRL_LEN {
            return Err(FrameError::CtrlTooLarge(ctrl.len()));
        }
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(FrameError::PayloadTooLarge(payload.len()));
        }
        Ok(Frame {
            header,
            ctrl: Bytes::from(ctrl),
            payload,
        })
    }

    /// Decodes the control section.
    pub fn decode_ctrl<M: DeserializeOwned>(&self) -> Result<M, FrameError> {
        Ok(postcard::from_bytes(&self.ctrl)?)
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode_into(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.ctrl.len() + self.payload.len());
        let start = dst.len();
        dst.put_u32_le(MAGIC);
        dst.put_u16_le(PROTOCOL_VERSION);
        dst.put_u8(self.header.kind as u8);
        dst.put_u8(0);
        dst.put_u64_le(self.header.cluster_id);
        dst.put_u64_le(self.header.epoch);
        dst.put_u64_le(self.header.request_id);
        dst.put_u32_le(self.header.deadline_ms);
        dst.put_u32_le(len_u32(self.ctrl.len()));
        dst.put_u32_le(len_u32(self.payload.len()));
        let mut h = crc32fast::Hasher::new();
        h.update(&dst[start..start + 44]);
        h.update(&self.ctrl);
        h.update(&self.payload);
        dst.put_u32_le(h.finalize());
        dst.extend_from_slice(&self.ctrl);
        dst.extend_from_slice(&self.payload);
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode_into(&mut b);
        b.freeze()
    }
}

fn len_u32(n: usize) -> u32 {
    // Lengths are bounded by MAX_CTRL_LEN / MAX_PAYLOAD_LEN at construction.
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parsed lengths of a validated header.
struct Lengths {
    ctrl: usize,
    payload: usize,
}

fn check_header(buf: &[u8]) -> Result<(FrameHeader, Lengths, u32), FrameError> {
    let mut b = &buf[..HEADER_LEN];
    let magic = b.get_u32_le();
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = b.get_u16_le();
    if version != PROTOCOL_VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let kind = match b.get_u8() {
        1 => FrameKind::Request,
        2 => FrameKind::Response,
        other => return Err(FrameError::BadKind(other)),
    };
    let flags = b.get_u8();
    if flags != 0 {
        return Err(FrameError::BadFlags(flags));
    }
    let cluster_id = b.get_u64_le();
    let epoch = b.get_u64_le();
    let request_id = b.get_u64_le();
    let deadline_ms = b.get_u32_le();
    let ctrl = b.get_u32_le() as usize;
    let payload = b.get_u32_le() as usize;
    let crc = b.get_u32_le();
    if ctrl > MAX_CTRL_LEN {
        return Err(FrameError::CtrlTooLarge(ctrl));
    }
    if payload > MAX_PAYLOAD_LEN {
        return Err(FrameError::PayloadTooLarge(payload));
    }
    let header = FrameHeader {
        kind,
        cluster_id,
        epoch,
        request_id,
        deadline_ms,
    };
    Ok((header, Lengths { ctrl, payload }, crc))
}

/// Decodes one frame from the front of `buf` if it is complete, consuming it.
/// Returns `Ok(None)` when more bytes are needed. The header is validated as soon as
/// it is complete, so an oversized length is refused before anything is reserved.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (header, lens, expected) = check_header(buf)?;
    let total = HEADER_LEN + lens.ctrl + lens.payload;
    if buf.len() < total {
        // Bounded: total <= HEADER_LEN + MAX_CTRL_LEN + MAX_PAYLOAD_LEN.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..44]);
    h.update(&buf[HEADER_LEN..total]);
    let actual = h.finalize();
    if actual != expected {
        return Err(FrameError::Checksum { expected, actual });
    }
    buf.advance(HEADER_LEN);
    let ctrl = buf.split_to(lens.ctrl).freeze();
    let payload = buf.split_to(lens.payload).freeze();
    Ok(Some(Frame {
        header,
        ctrl,
        payload,
    }))
}

/// `tokio-util` codec for [`Frame`]s.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        decode_frame(src)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;
    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        item.encode_into(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Request,
            cluster_id: 0xDEAD_BEEF,
            epoch: 3,
            request_id: 42,
            deadline_ms: 1500,
        }
    }

    #[test]
    fn round_trip() {
        let f = Frame::new(
            header(),
            &(1u8, "x".to_string()),
            Bytes::from_static(b"payload"),
        )
        .unwrap();
        let mut b = BytesMut::from(&f.to_bytes()[..]);
        let g = decode_frame(&mut b).unwrap().unwrap();
        assert_eq!(f, g);
        assert!(b.is_empty());
        let m: (u8, String) = g.decode_ctrl().unwrap();
        assert_eq!(m, (1, "x".to_string()));
    }

    #[test]
    fn partial_input_needs_more() {
        let f = Frame::new(header(), &7u32, Bytes::from(vec![9u8; 1000])).unwrap();
        let all = f.to_bytes();
        for cut in [0, 1, 47, 48, 49, all.len() - 1] {
            let mut b = BytesMut::from(&all[..cut]);
            assert!(decode_frame(&mut b).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_lengths_rejected_before_body_arrives() {
        let f = Frame::new(header(), &7u32, Bytes::new()).unwrap();
        let mut raw = BytesMut::from(&f.to_bytes()[..HEADER_LEN]);
        raw[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&mut raw),
            Err(FrameError::PayloadTooLarge(_))
        ));
        assert!(raw.capacity() < 1024 * 1024, "nothing large reserved");
        let mut raw = BytesMut::from(&f.to_bytes()[..HEADER_LEN]);
        raw[36..40].copy_from_slice(&(MAX_CTRL_LEN as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode_frame(&mut raw),
            Err(FrameError::CtrlTooLarge(_))
        ));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let f = Frame::new(header(), &123u64, Bytes::from_static(b"abc")).unwrap();
        let all = f.to_bytes();
        for byte in 0..all.len() {
            for bit in 0..8 {
                let mut b = BytesMut::from(&all[..]);
                b[byte] ^= 1 << bit;
                match decode_frame(&mut b) {
                    Err(_) => {}
                    // A flip in a length field can make the frame look incomplete.
                    Ok(None) => assert!((36..44).contains(&byte), "byte {byte} bit {bit}"),
                    Ok(Some(_)) => panic!("flip at byte {byte} bit {bit} not detected"),
                }
            }
        }
    }

    #[test]
    fn bad_magic_version_kind_flags() {
        let f = Frame::new(header(), &1u8, Bytes::new()).unwrap();
        let all = f.to_bytes();
        let mut b = BytesMut::from(&all[..]);
        b[0] = b'X';
        assert!(matches!(decode_frame(&mut b), Err(FrameError::BadMagic(_))));
        let mut b = BytesMut::from(&all[..]);
        b[4] = 9;
        assert!(matches!(
            decode_frame(&mut b),
            Err(FrameError::BadVersion(9))
        ));
        let mut b = BytesMut::from(&all[..]);
        b[6] = 7;
        assert!(matches!(decode_frame(&mut b), Err(FrameError::BadKind(7))));
        let mut b = BytesMut::from(&all[..]);
        b[7] = 1;
        assert!(matches!(decode_frame(&mut b), Err(FrameError::BadFlags(1))));
    }

    proptest::proptest! {
        #[test]
        fn decoding_garbage_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&data[..]);
            let _ = decode_frame(&mut b);
        }

        #[test]
        fn frames_round_trip(cluster in 0u64.., epoch in 0u64.., rid in 0u64.., dl in 0u32..,
                             ctrl in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
                             payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let h = FrameHeader { kind: FrameKind::Response, cluster_id: cluster, epoch, request_id: rid, deadline_ms: dl };
            let f = Frame::new(h, &ctrl, Bytes::from(payload)).unwrap();
            let mut b = BytesMut::from(&f.to_bytes()[..]);
            let g = decode_frame(&mut b).unwrap().unwrap();
            proptest::prop_assert_eq!(f, g);
        }
    }
}
