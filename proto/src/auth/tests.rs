use super::*;
use crate::frame::{Frame, FrameCodec, FrameError, FrameHeader, FrameKind};
use crate::msg::Request;
use bytes::Bytes;
use proptest::prelude::*;

const CLUSTER: u64 = 0x00C1_u64;

fn key(b: u8) -> ClusterKey {
    ClusterKey::from_bytes([b; KEY_LEN])
}

/// Both sides of a handshake, in memory; the server's Challenge refusal or success.
fn handshake(
    client_key: &ClusterKey,
    server_key: &ClusterKey,
) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
    let c = ClientHandshake::start(client_key, CLUSTER, Purpose::Data);
    let (challenge, s) =
        match ServerHandshake::answer(server_key, CLUSTER, Purpose::Data, c.hello()) {
            Ok(a) => a,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
    let (proof, client) = c.finish(&challenge);
    let server = match (s, proof) {
        (Ok(s), Some(proof)) => s.finish(&proof),
        (Err(e), _) => Err(e),
        (Ok(_), None) => Err(AuthError::Io("no proof".into())),
    };
    (client, server)
}

fn ping(id: u64, payload: &[u8]) -> Frame {
    let h = FrameHeader {
        kind: FrameKind::Request,
        cluster_id: CLUSTER,
        epoch: 3,
        request_id: id,
        deadline_ms: 1000,
    };
    Frame::new(h, &Request::Ping, Bytes::copy_from_slice(payload)).unwrap()
}

fn sealed_pair(k: &ClusterKey) -> (SealedCodec<FrameCodec>, SealedCodec<FrameCodec>) {
    let (c, s) = handshake(k, k);
    (
        c.unwrap().codec(FrameCodec, 1 << 20),
        s.unwrap().codec(FrameCodec, 1 << 20),
    )
}

fn encode_all(codec: &mut SealedCodec<FrameCodec>, frames: &[Frame]) -> Vec<BytesMut> {
    frames
        .iter()
        .map(|f| {
            let mut b = BytesMut::new();
            codec.encode(f.clone(), &mut b).unwrap();
            b
        })
        .collect()
}

#[test]
fn same_key_agrees_and_frames_pass_both_ways() {
    for k in [key(7), ClusterKey::open()] {
        let (mut c, mut s) = sealed_pair(&k);
        let frames: Vec<Frame> = (0..5).map(|i| ping(i, &[i as u8; 100])).collect();
        let mut wire = BytesMut::new();
        for r in encode_all(&mut c, &frames) {
            wire.extend_from_slice(&r);
        }
        let mut got = Vec::new();
        while let Some(f) = s.decode(&mut wire).unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames);
        assert!(wire.is_empty());
        // And back.
        let mut back = encode_all(&mut s, &frames[..1]).remove(0);
        assert_eq!(c.decode(&mut back).unwrap(), Some(frames[0].clone()));
        assert_eq!(c.counts(), (5, 1));
    }
}

#[test]
fn a_wrong_key_fails_on_both_sides() {
    let (c, s) = handshake(&key(1), &key(2));
    // The client sees the server cannot prove the key, and the server sees the
    // client's proof (sent anyway) fail.
    assert_eq!(c.unwrap_err(), AuthError::BadProof);
    assert_eq!(s.unwrap_err(), AuthError::BadProof);
    // A forged proof over the right transcript with another key is refused too.
    let hs = ClientHandshake::start(&key(1), CLUSTER, Purpose::Data);
    let (_, server) = ServerHandshake::answer(&key(2), CLUSTER, Purpose::Data, hs.hello()).unwrap();
    let forged = key(1).mac(b"DRS client", &server.as_ref().unwrap().transcript);
    assert_eq!(
        server.unwrap().finish(&forged).unwrap_err(),
        AuthError::BadProof
    );
}

#[test]
fn a_recorded_handshake_replayed_to_a_server_fails() {
    let k = key(9);
    // An eavesdropper records a whole good handshake...
    let c = ClientHandshake::with_nonce(&k, CLUSTER, Purpose::Data, [5; 32]);
    let hello = *c.hello();
    let (challenge, s) =
        ServerHandshake::answer_with_nonce(&k, CLUSTER, Purpose::Data, &hello, [6; 32]).unwrap();
    let (proof, session) = c.finish(&challenge);
    assert!(session.is_ok());
    let proof = proof.unwrap();
    assert!(s.unwrap().finish(&proof).is_ok());
    // ...and replays the client's messages: the server's new nonce makes them stale.
    let (_, s2) =
        ServerHandshake::answer_with_nonce(&k, CLUSTER, Purpose::Data, &hello, [7; 32]).unwrap();
    assert_eq!(s2.unwrap().finish(&proof).unwrap_err(), AuthError::BadProof);
    // A server replaying an old Challenge to a client fails the same way.
    let c3 = ClientHandshake::with_nonce(&k, CLUSTER, Purpose::Data, [8; 32]);
    assert_eq!(c3.finish(&challenge).1.unwrap_err(), AuthError::BadProof);
}

#[test]
fn keyed_and_open_peers_refuse_each_other_with_a_reason() {
    let (c, s) = handshake(&ClusterKey::open(), &key(3));
    let c = c.unwrap_err().to_string();
    assert!(c.contains("requires the cluster key"), "{c}");
    assert_eq!(s.unwrap_err(), AuthError::KeyRequired);
    let (c, s) = handshake(&key(3), &ClusterKey::open());
    let c = c.unwrap_err().to_string();
    assert!(c.contains("the peer has no cluster key"), "{c}");
    assert_eq!(s.unwrap_err(), AuthError::NoKeyHere);
}

#[test]
fn other_clusters_protocols_and_versions_are_refused() {
    let k = key(4);
    let c = ClientHandshake::start(&k, CLUSTER + 1, Purpose::Data);
    let (ch, s) = ServerHandshake::answer(&k, CLUSTER, Purpose::Data, c.hello()).unwrap();
    assert!(matches!(s, Err(AuthError::WrongCluster { .. })));
    assert!(matches!(c.finish(&ch), (None, Err(AuthError::Refused(_)))));

    let c = ClientHandshake::start(&k, CLUSTER, Purpose::Meta);
    let (ch, s) = ServerHandshake::answer(&k, CLUSTER, Purpose::Data, c.hello()).unwrap();
    assert!(matches!(s, Err(AuthError::WrongPurpose { .. })));
    assert!(matches!(c.finish(&ch), (None, Err(AuthError::Refused(_)))));

    let c = ClientHandshake::start(&k, CLUSTER, Purpose::Data);
    let mut hello = *c.hello();
    hello[4] = 9;
    let (ch, s) = ServerHandshake::answer(&k, CLUSTER, Purpose::Data, &hello).unwrap();
    assert_eq!(s.err(), Some(AuthError::BadVersion(9)));
    assert!(matches!(c.finish(&ch), (None, Err(AuthError::Refused(_)))));

    // An old client's first frame is not a handshake: nothing is answered.
    let frame = ping(1, b"").to_bytes();
    let mut hello = [0u8; HELLO_LEN];
    hello.copy_from_slice(&frame[..HELLO_LEN]);
    assert!(matches!(
        ServerHandshake::answer(&k, CLUSTER, Purpose::Data, &hello),
        Err(AuthError::BadMagic(_))
    ));
}

#[test]
fn every_flipped_bit_of_a_record_is_refused() {
    let (mut c, s) = sealed_pair(&key(5));
    let record = encode_all(&mut c, &[ping(1, b"payload")]).remove(0);
    for i in 0..record.len() * 8 {
        let mut bad = record.clone();
        bad[i / 8] ^= 1 << (i % 8);
        let mut s = s.clone();
        match s.decode(&mut bad) {
            Err(FrameError::Auth(_)) | Ok(None) => {}
            other => panic!("bit {i}: {other:?}"),
        }
    }
    let mut good = record.clone();
    assert!(s.clone().decode(&mut good).unwrap().is_some());
}

#[test]
fn replayed_dropped_and_reordered_records_are_refused() {
    let (mut c, s) = sealed_pair(&key(6));
    let rs = encode_all(&mut c, &[ping(1, b"a"), ping(2, b"b"), ping(3, b"c")]);
    // Replay of the first record.
    let mut s1 = s.clone();
    assert!(s1.decode(&mut rs[0].clone()).unwrap().is_some());
    assert_eq!(
        s1.decode(&mut rs[0].clone()).unwrap_err().to_string(),
        FrameError::Auth(AuthError::BadTag { seq: 1 }).to_string()
    );
    // The second dropped.
    let mut s2 = s.clone();
    assert!(s2.decode(&mut rs[0].clone()).unwrap().is_some());
    assert!(s2.decode(&mut rs[2].clone()).is_err());
    // Reordered.
    let mut s3 = s.clone();
    assert!(s3.decode(&mut rs[1].clone()).is_err());
    // A record reflected back to its sender: the directions have different keys.
    let (mut c5, _) = sealed_pair(&key(6));
    let mine = encode_all(&mut c5, &[ping(1, b"a")]).remove(0);
    assert!(c5.decode(&mut mine.clone()).is_err());
    // A record of another connection with the same key.
    let (mut c4, _) = sealed_pair(&key(6));
    let other = encode_all(&mut c4, &[ping(1, b"a")]).remove(0);
    assert!(s.clone().decode(&mut other.clone()).is_err());
}

#[test]
fn an_oversized_length_is_refused_before_allocation() {
    let (_, mut s) = sealed_pair(&key(8));
    let mut b = BytesMut::new();
    b.put_u32_le(u32::MAX);
    assert!(matches!(
        s.decode(&mut b),
        Err(FrameError::Auth(AuthError::RecordTooLarge { .. }))
    ));
    assert!(b.capacity() < 1024);
}

#[test]
fn a_record_must_hold_exactly_one_frame() {
    let (c, s) = handshake(&key(2), &key(2));
    let (c, mut s) = (c.unwrap(), s.unwrap().codec(FrameCodec, 1 << 20));
    // Two frames in one record, sealed by hand.
    let mut body = BytesMut::new();
    ping(1, b"x").encode_into(&mut body);
    ping(2, b"y").encode_into(&mut body);
    let mut rec = BytesMut::new();
    rec.put_u32_le(body.len() as u32);
    rec.extend_from_slice(&body);
    let tag = c.send.tag(&rec);
    rec.extend_from_slice(tag.as_bytes());
    assert!(matches!(
        s.decode(&mut rec),
        Err(FrameError::Auth(AuthError::BadRecord))
    ));
}

#[tokio::test]
async fn handshake_over_a_stream() {
    let (mut a, mut b) = tokio::io::duplex(4096);
    let k = key(11);
    let k2 = k.clone();
    let server = tokio::spawn(async move { accept(&mut b, &k2, CLUSTER, Purpose::Meta).await });
    let client = connect(&mut a, &k, CLUSTER, Purpose::Meta).await;
    assert!(client.is_ok());
    assert!(server.await.unwrap().is_ok());

    let (mut a, mut b) = tokio::io::duplex(4096);
    let server =
        tokio::spawn(async move { accept(&mut b, &key(12), CLUSTER, Purpose::Meta).await });
    assert_eq!(
        connect(&mut a, &key(13), CLUSTER, Purpose::Meta)
            .await
            .unwrap_err(),
        AuthError::BadProof
    );
    drop(a);
    assert_eq!(server.await.unwrap().unwrap_err(), AuthError::BadProof);
}

#[test]
fn refusals_are_logged_at_a_bounded_rate_per_kind() {
    let gate = RefusalGate::default();
    let t0 = std::time::Instant::now();
    for _ in 0..REFUSALS_LOGGED_PER_SECOND {
        assert_eq!(gate.admit_at("bad_proof", t0), Some(0));
    }
    for _ in 0..5 {
        assert_eq!(gate.admit_at("bad_proof", t0), None);
    }
    // Another kind is not held back by the first.
    assert_eq!(gate.admit_at("bad_magic", t0), Some(0));
    // A second later the next line says how many were not logged.
    let t1 = t0 + std::time::Duration::from_secs(1);
    assert_eq!(gate.admit_at("bad_proof", t1), Some(5));
    assert_eq!(gate.admit_at("bad_proof", t1), Some(0));
    assert_eq!(AuthError::BadProof.kind(), "bad_proof");

    // A burst with no later refusal: its hidden count is overdue a second on, once.
    let gate = RefusalGate::default();
    for _ in 0..REFUSALS_LOGGED_PER_SECOND + 7 {
        gate.admit_at("bad_magic", t0);
    }
    assert!(gate.overdue_at(t0).is_empty(), "not before the window ends");
    assert_eq!(gate.overdue_at(t1), vec![("bad_magic", 7)]);
    assert!(gate.overdue_at(t1).is_empty(), "counted once");
    assert_eq!(gate.admit_at("bad_magic", t1), Some(0));
}

#[tokio::test]
async fn a_hidden_burst_is_reported_a_second_later_and_the_report_stops() {
    let gate = RefusalGate::default();
    for _ in 0..REFUSALS_LOGGED_PER_SECOND + 3 {
        gate.admit("bad_proof");
    }
    let mut logged = Vec::new();
    let stop = tokio::time::sleep(std::time::Duration::from_millis(2500));
    gate.report_overdue(stop, |kind, n| logged.push((kind, n)))
        .await;
    assert_eq!(logged, vec![("bad_proof", 3)]);
}

#[test]
fn key_files_round_trip_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile_dir();
    let cluster = dir.join("cluster.toml");
    assert_eq!(ClusterKey::path_for(&cluster), dir.join("cluster.key"));
    assert!(ClusterKey::for_cluster_file(&cluster).unwrap().is_open());
    let k = ClusterKey::generate();
    k.save(&dir.join("cluster.key")).unwrap();
    let mode = std::fs::metadata(dir.join("cluster.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let back = ClusterKey::for_cluster_file(&cluster).unwrap();
    assert_eq!(back.to_file_text(), k.to_file_text());
    assert!(format!("{back:?}").contains("keyed"));
    assert!(!format!("{back:?}").contains(&k.to_file_text().unwrap()[..8]));
    // A key file that is there but bad is an error, never an open cluster.
    // (DRS_KEY_FILE naming a missing file is an error too: not tested here, as the
    // environment is shared by the tests of this process.)
    std::fs::write(dir.join("cluster.key"), "not a key\n").unwrap();
    assert!(matches!(
        ClusterKey::for_cluster_file(&cluster),
        Err(AuthError::KeyFile { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "drs-auth-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

proptest! {
    #[test]
    fn garbage_never_panics_or_decodes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let (_, s) = sealed_pair(&key(1));
        let mut s = s;
        let mut b = BytesMut::from(&bytes[..]);
        // Without the session key no input decodes to a frame.
        prop_assert!(!matches!(s.decode(&mut b), Ok(Some(_))));
        let mut hello = [0u8; HELLO_LEN];
        for (d, x) in hello.iter_mut().zip(bytes.iter()) {
            *d = *x;
        }
        let _ = ServerHandshake::answer(&key(1), CLUSTER, Purpose::Data, &hello);
    }
}
