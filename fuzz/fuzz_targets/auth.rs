//! The handshake and the authenticated records from arbitrary bytes: a server answering
//! any Hello and Proof, a client given any Challenge, and a record decoder given any
//! byte stream (in pieces) never panic, and never accept what the key did not seal.
//! Records correctly sealed around arbitrary bytes reach the frame decoder behind
//! them, and every frame that decodes there encodes back to itself.
//!
//! The first byte picks the mode (mod 4) and the piece size for streams.
#![no_main]

use bytes::BytesMut;
use drs_proto::auth::{
    ClientHandshake, Purpose, ServerHandshake, CHALLENGE_LEN, HELLO_LEN, PROOF_LEN,
};
use drs_proto::{ClusterKey, FrameError, Session};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

const CLUSTER: u64 = 7;

fn key() -> ClusterKey {
    ClusterKey::from_bytes([0x5a; 32])
}

/// A client and a server session of one handshake with fixed nonces.
fn sessions() -> (Session, Session) {
    let c = ClientHandshake::with_nonce(&key(), CLUSTER, Purpose::Data, [1; 32]);
    let Ok((challenge, Ok(s))) =
        ServerHandshake::answer_with_nonce(&key(), CLUSTER, Purpose::Data, c.hello(), [2; 32])
    else {
        panic!("a good handshake failed");
    };
    let (Some(proof), Ok(client)) = c.finish(&challenge) else {
        panic!("a good challenge was refused");
    };
    let Ok(server) = s.finish(&proof) else {
        panic!("a good proof was refused");
    };
    (client, server)
}

/// Seals raw bytes, to put anything inside a well-sealed record.
struct Raw;

impl Encoder<Vec<u8>> for Raw {
    type Error = FrameError;

    fn encode(&mut self, item: Vec<u8>, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

fn take<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    for (d, s) in a.iter_mut().zip(data) {
        *d = *s;
    }
    a
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let hello = take::<HELLO_LEN>(data);
            if let Ok((_, Ok(hs))) =
                ServerHandshake::answer(&key(), CLUSTER, Purpose::Data, &hello)
            {
                let proof = take::<PROOF_LEN>(data.get(HELLO_LEN..).unwrap_or(&[]));
                assert!(hs.finish(&proof).is_err(), "a forged proof was accepted");
            }
        }
        1 => {
            let c = ClientHandshake::with_nonce(&key(), CLUSTER, Purpose::Data, [3; 32]);
            let challenge = take::<CHALLENGE_LEN>(data);
            assert!(c.finish(&challenge).1.is_err(), "a forged challenge was accepted");
        }
        2 => {
            let (_, server) = sessions();
            let mut dec = server.frames();
            let step = usize::from(mode / 4).max(1);
            let mut buf = BytesMut::new();
            for piece in data.chunks(step) {
                buf.extend_from_slice(piece);
                match dec.decode(&mut buf) {
                    Ok(None) => {}
                    Ok(Some(_)) => panic!("an unsealed record decoded"),
                    Err(_) => return,
                }
            }
        }
        _ => {
            let (client, server) = sessions();
            let mut wire = BytesMut::new();
            if client
                .codec(Raw, drs_proto::frame::MAX_FRAME_LEN)
                .encode(data.to_vec(), &mut wire)
                .is_err()
            {
                return;
            }
            let mut dec = server.frames();
            if let Ok(Some(frame)) = dec.decode(&mut wire) {
                assert_eq!(frame.to_bytes()[..], data[..], "frame does not re-encode");
            }
        }
    }
});
