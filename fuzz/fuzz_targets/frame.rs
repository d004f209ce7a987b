//! Node frames from arbitrary bytes, as a connection delivers them (in pieces): the
//! decoder never panics, never keeps more than it was given, and every frame it
//! accepts has a control section that decodes (or fails cleanly) as a request and as
//! a response, and that encodes back to the same frame.
//!
//! The first byte picks the mode: odd, the rest is a control section (and payload)
//! wrapped in a frame with a correct checksum, so the fuzzer reaches the message
//! decoders past the checksum; even, the rest is the raw byte stream, in pieces of
//! that byte's size.
#![no_main]

use bytes::{Bytes, BytesMut};
use drs_proto::frame::{decode_frame, MAX_CTRL_LEN};
use drs_proto::{Frame, FrameHeader, FrameKind, Request, Response};
use libfuzzer_sys::fuzz_target;

fn check(frame: &Frame) {
    let _ = frame.decode_ctrl::<Request>();
    let _ = frame.decode_ctrl::<Response>();
    let mut again = BytesMut::new();
    frame.encode_into(&mut again);
    let back = decode_frame(&mut again);
    assert!(
        matches!(&back, Ok(Some(f)) if f == frame),
        "a decoded frame does not survive encode + decode: {back:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    if mode % 2 == 1 {
        let split = data.len().min(MAX_CTRL_LEN).min(usize::from(mode) * 8);
        let frame = Frame {
            header: FrameHeader {
                kind: FrameKind::Request,
                cluster_id: 7,
                epoch: 1,
                request_id: 1,
                deadline_ms: 1000,
            },
            ctrl: Bytes::copy_from_slice(&data[..split]),
            payload: Bytes::copy_from_slice(&data[split..]),
        };
        check(&frame);
        return;
    }
    let step = usize::from(mode).max(1);
    let mut buf = BytesMut::new();
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame(&mut buf) {
                Ok(Some(frame)) => check(&frame),
                Ok(None) => break,
                // A bad frame closes the connection: nothing after it is read.
                Err(_) => return,
            }
        }
        assert!(buf.len() <= data.len());
    }
});
