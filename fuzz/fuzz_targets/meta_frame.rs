//! Metadata service frames from arbitrary bytes, in pieces: the decoder never panics,
//! and every payload it accepts decodes (or fails cleanly) as each message type of
//! the service: requests, responses, and the envelope requests travel in.
#![no_main]

use bytes::BytesMut;
use drs_meta::net::{decode_frame, decode_message, Request, RequestEnvelope, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut buf = BytesMut::new();
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame(&mut buf) {
                Ok(Some(payload)) => {
                    let _ = decode_message::<RequestEnvelope>(&payload);
                    let _ = decode_message::<Request>(&payload);
                    let _ = decode_message::<Response>(&payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    // Whole inputs as payloads too (most random bytes never pass the frame checksum).
    let _ = decode_message::<RequestEnvelope>(data);
    let _ = decode_message::<Request>(data);
    let _ = decode_message::<Response>(data);
});
