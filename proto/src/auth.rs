//! Authentication: the cluster key, the handshake that opens every connection, and the
//! sealed records that carry every frame after it.
//!
//! Every connection (client to node, node to node, client to client, and every
//! metadata connection) starts with a three-message handshake in which both sides
//! prove they hold the cluster key without sending it:
//!
//! ```text
//!  client -> server  Hello      "DRSA" | version u16 | purpose u8 | keyed u8 | cluster_id u64 | nonce_c [32]   (48 bytes)
//!  server -> client  Challenge  "DRSA" | version u16 | status u8 | 0 u8 | nonce_s [32] | proof_s [32]           (72 bytes)
//!  client -> server  Proof      proof_c [32]                                                                    (32 bytes)
//! ```
//!
//! With `t` = Hello || nonce_s (the transcript), `proof_s` = HMAC(K, "DRS server" || t),
//! `proof_c` = HMAC(K, "DRS client" || t) (sent even when `proof_s` is wrong, so the
//! server logs the mismatch too), and each direction gets its own session key,
//! HMAC(K, "DRS c2s" || t) and HMAC(K, "DRS s2c" || t) (HMAC-SHA256 throughout). Both
//! nonces are fresh random numbers, so a recorded handshake replayed against a server
//! fails (its proof is for another server nonce), and a server cannot be impersonated
//! to a client either.
//!
//! After the handshake every frame travels in a record:
//!
//! ```text
//!  +---------+-------------------+---------------------------------------------+
//!  | len u32 | body (len bytes)  | tag = MAC(session key, seq u64 || len || body) |
//!  +---------+-------------------+---------------------------------------------+
//! ```
//!
//! The record MAC is keyed BLAKE3 (32-byte tag), not HMAC-SHA256: records carry whole
//! blocks, and BLAKE3's tree hashes one in SIMD lanes several times faster, even
//! against SHA extensions (HMAC-SHA256 was a third of all CPU time in a sequential
//! read). The handshake and the session keys keep HMAC-SHA256: they are short.
//!
//! `seq` is not sent: each side counts the records of each direction from 0, so a
//! replayed, dropped, reordered or altered record fails its tag and ends the connection.
//! `len` is checked against the codec's bound before anything is reserved for the body.
//!
//! Records are authenticated, not encrypted: the bytes of a frame can be read on the
//! way. Every integer of the handshake and of a record, and `seq` in a tag, is
//! little-endian.
//!
//! A cluster without a key file runs *open*: the same handshake and tags with an
//! all-zero key, which anyone can compute. The `keyed` flag tells the two apart, so an
//! open peer meeting a keyed one is refused with a clear reason instead of a failed
//! proof.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a cluster key.
pub const KEY_LEN: usize = 32;
/// Bytes of a record's tag.
pub const TAG_LEN: usize = 32;
/// Bytes of the record header (the body length).
pub const RECORD_HEADER_LEN: usize = 4;
/// The first four bytes of a Hello and a Challenge.
pub const MAGIC: [u8; 4] = *b"DRSA";
/// The handshake version this build speaks.
pub const VERSION: u16 = 2;
pub const HELLO_LEN: usize = 48;
pub const CHALLENGE_LEN: usize = 72;
pub const PROOF_LEN: usize = 32;
/// The key file's name, beside the cluster file.
pub const KEY_FILE: &str = "cluster.key";
/// The environment variable naming a key file, over the one beside the cluster file.
pub const KEY_FILE_ENV: &str = "DRS_KEY_FILE";

/// Why a handshake or a record failed. Any of these ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("not a DRS handshake (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported handshake version {0} (this build speaks {VERSION})")]
    BadVersion(u16),
    #[error("the peer speaks the {theirs} protocol, this end the {ours} protocol")]
    WrongPurpose { ours: &'static str, theirs: String },
    #[error("the peer belongs to cluster {theirs:016x}, not {ours:016x}")]
    WrongCluster { ours: u64, theirs: u64 },
    /// At a server: the client has no key, this server has one.
    #[error("the peer has no cluster key, and this end requires one")]
    KeyRequired,
    /// At a server: the client has a key, this server has none.
    #[error("the peer has a cluster key, and this end has none (no key file)")]
    NoKeyHere,
    #[error("the peer refused the handshake: {0}")]
    Refused(String),
    #[error("authentication failed: the peer does not hold this cluster's key")]
    BadProof,
    #[error("record of {len} bytes exceeds the limit of {max}")]
    RecordTooLarge { len: usize, max: usize },
    #[error("record {seq} failed authentication (altered, replayed or out of order)")]
    BadTag { seq: u64 },
    #[error("a record holds other than exactly one frame")]
    BadRecord,
    #[error("bad key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("handshake i/o: {0}")]
    Io(String),
    #[error("no handshake within the time allowed ({0:?})")]
    TimedOut(std::time::Duration),
}

impl AuthError {
    /// The kind of failure, for counting and rate-limiting logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::BadMagic(_) => "bad_magic",
            AuthError::BadVersion(_) => "bad_version",
            AuthError::WrongPurpose { .. } => "wrong_purpose",
            AuthError::WrongCluster { .. } => "wrong_cluster",
            AuthError::KeyRequired => "key_required",
            AuthError::NoKeyHere => "no_key_here",
            AuthError::Refused(_) => "refused",
            AuthError::BadProof => "bad_proof",
            AuthError::RecordTooLarge { .. } => "record_too_large",
            AuthError::BadTag { .. } => "bad_tag",
            AuthError::BadRecord => "bad_record",
            AuthError::KeyFile { .. } => "key_file",
            AuthError::Io(_) => "io",
            AuthError::TimedOut(_) => "timed_out",
        }
    }
}

/// How many refused handshakes of each kind a server logs per second: anyone can
/// open connections, so a flood of them must not flood the log. Each kind's first
/// refusals in a second are logged; the rest are counted, and the count goes with
/// the next line of that kind.
#[derive(Debug, Default)]
pub struct RefusalGate {
    kinds: std::sync::Mutex<std::collections::HashMap<&'static str, GateWindow>>,
}

#[derive(Debug, Clone, Copy)]
struct GateWindow {
    started: std::time::Instant,
    logged: u32,
    skipped: u64,
}

/// Lines logged per kind per second.
pub const REFUSALS_LOGGED_PER_SECOND: u32 = 10;

impl RefusalGate {
    /// Whether to log a refusal of `kind` now; `Some(n)`: log it, saying `n` more were
    /// not logged since the last line of this kind.
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        self.admit_at(kind, std::time::Instant::now())
    }

    /// [`RefusalGate::admit`] at time `now`.
    pub fn admit_at(&self, kind: &'static str, now: std::time::Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: the kinds are the variants of AuthError.
        let w = kinds.entry(kind).or_insert(GateWindow {
            started: now,
            logged: 0,
            skipped: 0,
        });
        if now.saturating_duration_since(w.started) >= std::time::Duration::from_secs(1) {
            w.started = now;
            w.logged = 0;
        }
        if w.logged < REFUSALS_LOGGED_PER_SECOND {
            w.logged += 1;
            Some(std::mem::take(&mut w.skipped))
        } else {
            w.skipped += 1;
            None
        }
    }

    /// The refusals not logged in windows a second old or more, by kind (taken: the
    /// next line of the kind starts counting afresh). A burst shorter than a second
    /// has no later line to say how many it hid: the owner of the gate calls this
    /// every second and logs them.
    pub fn overdue(&self) -> Vec<(&'static str, u64)> {
        self.overdue_at(std::time::Instant::now())
    }

    /// [`RefusalGate::overdue`] at time `now`.
    pub fn overdue_at(&self, now: std::time::Instant) -> Vec<(&'static str, u64)> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .iter_mut()
            .filter(|(_, w)| {
                w.skipped > 0
                    && now.saturating_duration_since(w.started) >= std::time::Duration::from_secs(1)
            })
            .map(|(kind, w)| (*kind, std::mem::take(&mut w.skipped)))
            .collect()
    }

    /// Every second until `stop` completes, passes the refusals the rate limit hid
    /// ([`RefusalGate::overdue`]) to `log`: run beside a server's accept loop.
    pub async fn report_overdue(
        &self,
        stop: impl std::future::Future<Output = ()>,
        mut log: impl FnMut(&'static str, u64),
    ) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => return,
            }
            for (kind, n) in self.overdue() {
                log(kind, n);
            }
        }
    }
}

/// The cluster key, or none (an open cluster). Cheap to clone; never printed.
#[derive(Clone)]
pub struct ClusterKey {
    key: Option<Arc<[u8; KEY_LEN]>>,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.key.is_some() {
            "ClusterKey(keyed)"
        } else {
            "ClusterKey(open)"
        })
    }
}

impl Default for ClusterKey {
    fn default() -> ClusterKey {
        ClusterKey::open()
    }
}

impl ClusterKey {
    /// No key: the handshake runs with an all-zero key anyone can compute.
    pub fn open() -> ClusterKey {
        ClusterKey { key: None }
    }

    /// A new random key.
    pub fn generate() -> ClusterKey {
        ClusterKey::from_bytes(rand::random())
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ClusterKey {
        ClusterKey {
            key: Some(Arc::new(bytes)),
        }
    }

    pub fn is_open(&self) -> bool {
        self.key.is_none()
    }

    fn bytes(&self) -> [u8; KEY_LEN] {
        self.key.as_deref().copied().unwrap_or([0; KEY_LEN])
    }

    /// The key as the text of a key file (64 hex digits and a newline); None when open.
    pub fn to_file_text(&self) -> Option<String> {
        let k = self.key.as_deref()?;
        let mut s: String = k.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        Some(s)
    }

    /// Parses the text of a key file: 64 hex digits, surrounding white space allowed.
    pub fn from_file_text(text: &str) -> Result<ClusterKey, String> {
        let t = text.trim();
        if t.len() != 2 * KEY_LEN || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "expected {} hex digits, found {} characters",
                2 * KEY_LEN,
                t.len()
            ));
        }
        let mut k = [0u8; KEY_LEN];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(ClusterKey::from_bytes(k))
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<ClusterKey, AuthError> {
        let bad = |reason: String| AuthError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        ClusterKey::from_file_text(&text).map_err(bad)
    }

    /// Writes the key file, readable by its owner only. An open key writes nothing.
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        let Some(text) = self.to_file_text() else {
            return Ok(());
        };
        let bad = |e: std::io::Error| AuthError::KeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("key.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(bad)?;
        f.write_all(text.as_bytes()).map_err(bad)?;
        f.sync_all().map_err(bad)?;
        std::fs::rename(&tmp, path).map_err(bad)
    }

    /// Where the key of the cluster file `cluster_file` lives: `$DRS_KEY_FILE` if set,
    /// else [`KEY_FILE`] in the same directory (shared by the cluster file and a
    /// client's locator file beside it).
    pub fn path_for(cluster_file: &Path) -> PathBuf {
        match std::env::var_os(KEY_FILE_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => cluster_file.with_file_name(KEY_FILE),
        }
    }

    /// The key of the cluster file `cluster_file` (see [`ClusterKey::path_for`]); open
    /// when there is no key file beside it. A key file that exists but cannot be read
    /// or parsed is an error, never an open key, and so is a `$DRS_KEY_FILE` naming a
    /// file that is not there (a mistyped path must not turn authentication off).
    pub fn for_cluster_file(cluster_file: &Path) -> Result<ClusterKey, AuthError> {
        let path = ClusterKey::path_for(cluster_file);
        let named = std::env::var_os(KEY_FILE_ENV).is_some_and(|p| !p.is_empty());
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(ClusterKey::open()),
            _ => ClusterKey::load(&path),
        }
    }

    fn mac(&self, label: &[u8], transcript: &[u8]) -> [u8; 32] {
        let mut m = keyed(&self.bytes());
        m.update(label);
        m.update(transcript);
        m.finalize().into_bytes().into()
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// Which protocol a connection carries: the two never accept each other's handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Node frames ([`crate::frame`]): clients and nodes, and clients' peer interface.
    Data = 1,
    /// The metadata service's frames.
    Meta = 2,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Purpose::Data => "data",
            Purpose::Meta => "metadata",
        }
    }
}

fn purpose_name(b: u8) -> String {
    match b {
        1 => "data".into(),
        2 => "metadata".into(),
        n => format!("unknown ({n})"),
    }
}

/// The handshake's answer codes (the Challenge's status byte).
const STATUS_OK: u8 = 0;
const STATUS_WRONG_CLUSTER: u8 = 1;
const STATUS_KEY_REQUIRED: u8 = 2;
const STATUS_NO_KEY_HERE: u8 = 3;
const STATUS_WRONG_PURPOSE: u8 = 4;
const STATUS_BAD_VERSION: u8 = 5;

fn status_reason(s: u8) -> String {
    match s {
        STATUS_WRONG_CLUSTER => "the peer belongs to another cluster".into(),
        STATUS_KEY_REQUIRED => {
            "the peer requires the cluster key, and this end has none (no key file)".into()
        }
        STATUS_NO_KEY_HERE => "the peer has no cluster key, and this end has one".into(),
        STATUS_WRONG_PURPOSE => "the peer serves another protocol on that port".into(),
        STATUS_BAD_VERSION => "the peer speaks another handshake version".into(),
        n => format!("status {n}"),
    }
}

/// One direction's session key and record counter.
#[derive(Clone)]
struct Direction {
    key: [u8; 32],
    seq: u64,
}

impl Direction {
    fn new(key: [u8; 32]) -> Direction {
        Direction { key, seq: 0 }
    }

    /// The tag of the next record (`seq`) of this direction.
    fn tag(&self, record: &[u8]) -> blake3::Hash {
        let mut m = blake3::Hasher::new_keyed(&self.key);
        m.update(&self.seq.to_le_bytes());
        m.update(record);
        m.finalize()
    }
}

/// The keys of an authenticated connection: one per direction.
#[derive(Clone)]
pub struct Session {
    send: Direction,
    recv: Direction,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session {{ sent: {}, received: {} }}",
            self.send.seq, self.recv.seq
        )
    }
}

impl Session {
    fn new(key: &ClusterKey, transcript: &[u8], client: bool) -> Session {
        let c2s = Direction::new(key.mac(b"DRS c2s", transcript));
        let s2c = Direction::new(key.mac(b"DRS s2c", transcript));
        if client {
            Session {
                send: c2s,
                recv: s2c,
            }
        } else {
            Session {
                send: s2c,
                recv: c2s,
            }
        }
    }

    /// A codec carrying `inner`'s frames in sealed records of at most `max_body` bytes.
    /// Clone it for the two halves of a split stream: each uses only its direction.
    pub fn codec<C>(self, inner: C, max_body: usize) -> SealedCodec<C> {
        SealedCodec {
            inner,
            session: self,
            // The length field is a u32, and header + body + tag must not overflow.
            max_body: max_body.min(u32::MAX as usize - RECORD_HEADER_LEN - TAG_LEN),
        }
    }
}

/// The client's half-done handshake: its Hello has been sent.
pub struct ClientHandshake {
    key: ClusterKey,
    hello: [u8; HELLO_LEN],
}

impl ClientHandshake {
    /// Starts a handshake with a fresh nonce; send the returned Hello.
    pub fn start(key: &ClusterKey, cluster_id: u64, purpose: Purpose) -> ClientHandshake {
        ClientHandshake::with_nonce(key, cluster_id, purpose, rand::random())
    }

    /// As [`ClientHandshake::start`] with a chosen nonce: for tests and fuzzing only
    /// (a nonce must never be used twice).
    pub fn with_nonce(
        key: &ClusterKey,
        cluster_id: u64,
        purpose: Purpose,
        nonce: [u8; 32],
    ) -> ClientHandshake {
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4..6].copy_from_slice(&VERSION.to_le_bytes());
        hello[6] = purpose as u8;
        hello[7] = u8::from(!key.is_open());
        hello[8..16].copy_from_slice(&cluster_id.to_le_bytes());
        hello[16..48].copy_from_slice(&nonce);
        ClientHandshake {
            key: key.clone(),
            hello,
        }
    }

    pub fn hello(&self) -> &[u8; HELLO_LEN] {
        &self.hello
    }

    /// Answers the server's Challenge: the Proof to send (None when the Challenge is
    /// a refusal or not a Challenge), and the session, or why there is none. The Proof
    /// is sent even when the server's own proof is wrong, so the server learns (and
    /// logs) that the two do not share a key. It is an HMAC bound to the server's
    /// nonce: a server without the key learns nothing usable of a random 256-bit key
    /// from it (a hand-written, guessable key could be guessed offline from it).
    pub fn finish(
        self,
        challenge: &[u8; CHALLENGE_LEN],
    ) -> (Option<[u8; PROOF_LEN]>, Result<Session, AuthError>) {
        let magic: [u8; 4] = [challenge[0], challenge[1], challenge[2], challenge[3]];
        if magic != MAGIC {
            return (None, Err(AuthError::BadMagic(magic)));
        }
        let version = u16::from_le_bytes([challenge[4], challenge[5]]);
        if version != VERSION {
            return (None, Err(AuthError::BadVersion(version)));
        }
        // The refusal as the server saw it, told from this side.
        if challenge[6] != STATUS_OK {
            return (None, Err(AuthError::Refused(status_reason(challenge[6]))));
        }
        let mut transcript = [0u8; HELLO_LEN + 32];
        transcript[..HELLO_LEN].copy_from_slice(&self.hello);
        transcript[HELLO_LEN..].copy_from_slice(&challenge[8..40]);
        let proof_c = self.key.mac(b"DRS client", &transcript);
        let proof_s = &challenge[40..72];
        if !verify(&self.key, b"DRS server", &transcript, proof_s) {
            return (Some(proof_c), Err(AuthError::BadProof));
        }
        (
            Some(proof_c),
            Ok(Session::new(&self.key, &transcript, true)),
        )
    }
}

fn verify(key: &ClusterKey, label: &[u8], transcript: &[u8], tag: &[u8]) -> bool {
    let mut m = keyed(&key.bytes());
    m.update(label);
    m.update(transcript);
    m.verify_slice(tag).is_ok()
}

/// The server's half-done handshake: its Challenge has been sent.
pub struct ServerHandshake {
    key: ClusterKey,
    transcript: [u8; HELLO_LEN + 32],
}

/// What a server answers to a Hello: the Challenge to send, and either the handshake
/// to finish or the reason it is refused (the Challenge then carries the refusal).
pub type HelloAnswer = ([u8; CHALLENGE_LEN], Result<ServerHandshake, AuthError>);

impl ServerHandshake {
    /// Answers a client's Hello with a fresh nonce.
    pub fn answer(
        key: &ClusterKey,
        cluster_id: u64,
        purpose: Purpose,
        hello: &[u8; HELLO_LEN],
    ) -> Result<HelloAnswer, AuthError> {
        ServerHandshake::answer_with_nonce(key, cluster_id, purpose, hello, rand::random())
    }

    /// As [`ServerHandshake::answer`] with a chosen nonce: for tests and fuzzing only
    /// (a nonce must never be used twice). `Err`: not a handshake at all (nothing is
    /// sent back).
    pub fn answer_with_nonce(
        key: &ClusterKey,
        cluster_id: u64,
        purpose: Purpose,
        hello: &[u8; HELLO_LEN],
        nonce: [u8; 32],
    ) -> Result<HelloAnswer, AuthError> {
        let magic: [u8; 4] = [hello[0], hello[1], hello[2], hello[3]];
        if magic != MAGIC {
            return Err(AuthError::BadMagic(magic));
        }
        let mut challenge = [0u8; CHALLENGE_LEN];
        challenge[..4].copy_from_slice(&MAGIC);
        challenge[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let refuse = |mut c: [u8; CHALLENGE_LEN], status: u8, e: AuthError| {
            c[6] = status;
            Ok((c, Err(e)))
        };
        let version = u16::from_le_bytes([hello[4], hello[5]]);
        if version != VERSION {
            return refuse(
                challenge,
                STATUS_BAD_VERSION,
                AuthError::BadVersion(version),
            );
        }
        if hello[6] != purpose as u8 {
            return refuse(
                challenge,
                STATUS_WRONG_PURPOSE,
                AuthError::WrongPurpose {
                    ours: purpose.name(),
                    theirs: purpose_name(hello[6]),
                },
            );
        }
        let theirs = u64::from_le_bytes([
            hello[8], hello[9], hello[10], hello[11], hello[12], hello[13], hello[14], hello[15],
        ]);
        if theirs != cluster_id {
            return refuse(
                challenge,
                STATUS_WRONG_CLUSTER,
                AuthError::WrongCluster {
                    ours: cluster_id,
                    theirs,
                },
            );
        }
        match (hello[7] != 0, key.is_open()) {
            (false, false) => {
                return refuse(challenge, STATUS_KEY_REQUIRED, AuthError::KeyRequired)
            }
            (true, true) => return refuse(challenge, STATUS_NO_KEY_HERE, AuthError::NoKeyHere),
            _ => {}
        }
        let mut transcript = [0u8; HELLO_LEN + 32];
        transcript[..HELLO_LEN].copy_from_slice(hello);
        transcript[HELLO_LEN..].copy_from_slice(&nonce);
        challenge[8..40].copy_from_slice(&nonce);
        challenge[40..72].copy_from_slice(&key.mac(b"DRS server", &transcript));
        Ok((
            challenge,
            Ok(ServerHandshake {
                key: key.clone(),
                transcript,
            }),
        ))
    }

    /// Checks the client's Proof.
    pub fn finish(self, proof: &[u8; PROOF_LEN]) -> Result<Session, AuthError> {
        if !verify(&self.key, b"DRS client", &self.transcript, proof) {
            return Err(AuthError::BadProof);
        }
        Ok(Session::new(&self.key, &self.transcript, false))
    }
}

fn io(e: std::io::Error) -> AuthError {
    AuthError::Io(e.to_string())
}

/// Runs the client side of the handshake on `stream`. Bound it with a timeout.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    cluster_id: u64,
    purpose: Purpose,
) -> Result<Session, AuthError> {
    let hs = ClientHandshake::start(key, cluster_id, purpose);
    stream.write_all(hs.hello()).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    stream.read_exact(&mut challenge).await.map_err(io)?;
    let (proof, session) = hs.finish(&challenge);
    if let Some(proof) = proof {
        // Best effort when the session failed: the server then logs why.
        let sent = async {
            stream.write_all(&proof).await?;
            stream.flush().await
        };
        if let (Err(e), Ok(_)) = (sent.await, &session) {
            return Err(io(e));
        }
    }
    session
}

/// Runs the server side of the handshake on `stream`. Bound it with a timeout, and log
/// a failure with the peer's address: nothing of the connection was served.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    cluster_id: u64,
    purpose: Purpose,
) -> Result<Session, AuthError> {
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).await.map_err(io)?;
    let (challenge, hs) = ServerHandshake::answer(key, cluster_id, purpose, &hello)?;
    stream.write_all(&challenge).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let hs = hs?;
    let mut proof = [0u8; PROOF_LEN];
    stream.read_exact(&mut proof).await.map_err(io)?;
    hs.finish(&proof)
}

/// [`accept`] within `limit`: what every server runs on a new connection, so a peer
/// that stalls in the handshake cannot hold it for long. Log a failure with the
/// peer's address.
pub async fn accept_within<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    cluster_id: u64,
    purpose: Purpose,
    limit: std::time::Duration,
) -> Result<Session, AuthError> {
    match tokio::time::timeout(limit, accept(stream, key, cluster_id, purpose)).await {
        Ok(r) => r,
        Err(_) => Err(AuthError::TimedOut(limit)),
    }
}

/// A codec that carries another codec's frames in authenticated records.
#[derive(Clone)]
pub struct SealedCodec<C> {
    inner: C,
    session: Session,
    max_body: usize,
}

impl<C> SealedCodec<C> {
    /// Records sent and received so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.session.send.seq, self.session.recv.seq)
    }
}

impl<C> Decoder for SealedCodec<C>
where
    C: Decoder,
    C::Error: From<AuthError>,
{
    type Item = C::Item;
    type Error = C::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<C::Item>, C::Error> {
        if src.len() < RECORD_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_body {
            return Err(AuthError::RecordTooLarge {
                len,
                max: self.max_body,
            }
            .into());
        }
        let whole = RECORD_HEADER_LEN + len + TAG_LEN;
        if src.len() < whole {
            src.reserve(whole - src.len());
            return Ok(None);
        }
        let rx = &mut self.session.recv;
        let body_end = RECORD_HEADER_LEN + len;
        // `Hash` compares in constant time.
        let sent = blake3::Hash::from_slice(&src[body_end..whole])
            .map_err(|_| AuthError::BadTag { seq: rx.seq })?;
        if rx.tag(&src[..body_end]) != sent {
            return Err(AuthError::BadTag { seq: rx.seq }.into());
        }
        rx.seq += 1;
        let mut body = src.split_to(whole);
        body.advance(RECORD_HEADER_LEN);
        body.truncate(len);
        match self.inner.decode(&mut body)? {
            Some(item) if body.is_empty() => Ok(Some(item)),
            _ => Err(AuthError::BadRecord.into()),
        }
    }
}

impl<C, I> Encoder<I> for SealedCodec<C>
where
    C: Encoder<I>,
    C::Error: From<AuthError>,
{
    type Error = C::Error;

    fn encode(&mut self, item: I, dst: &mut BytesMut) -> Result<(), C::Error> {
        let start = dst.len();
        dst.put_u32_le(0);
        if let Err(e) = self.inner.encode(item, dst) {
            dst.truncate(start);
            return Err(e);
        }
        let len = dst.len() - start - RECORD_HEADER_LEN;
        if len > self.max_body {
            dst.truncate(start);
            return Err(AuthError::RecordTooLarge {
                len,
                max: self.max_body,
            }
            .into());
        }
        dst[start..start + RECORD_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
        let tx = &mut self.session.send;
        let tag = tx.tag(&dst[start..]);
        dst.put_slice(tag.as_bytes());
        tx.seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
