//! Reads: hedged, then degraded (report 5.3.1, 5.6; DESIGN-NOTES R2, I3, I6).
//!
//! 1. Ask the block's own node.
//! 2. If it fails, or has not answered within `hedge_delay`, ask every other member
//!    of the stripe for the same byte range, while still listening to the first.
//! 3. Return the first of: the node's own answer, or the range decoded from k replies
//!    that reflect one state of the stripe ([`crate::select`]).
//! 4. If the replies disagree (an update is half-way through the stripe), ask the
//!    lagging nodes for the newest state they are missing, then retry a few times.
//! 5. Dropping the remaining requests cancels them at the nodes.
//!
//! A block whose stored checksum fails is an erasure: its node answers `Corrupt`,
//! the read decodes it from the others, and the block is sent for repair.

use std::pin::pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use drs_proto::{ReadMode, ReadReq, Request, Response, StripeId, Version, WireError};
use futures::stream::{FuturesUnordered, StreamExt};

use crate::error::{CallError, ClientError};
use crate::select::{self, Seen};
use crate::Client;

/// Rounds of "replies disagree, ask again" before a read gives up.
const CONSISTENCY_ROUNDS: usize = 4;

/// A read reply: the versions the bytes reflect, and the bytes.
pub type Versioned = (Vec<Version>, Bytes);

/// One read of a byte range of the block at `index` of `stripe`. `ask_own`: ask the
/// block's own node first (a read); without it, decode from the others (a rebuild).
struct Want {
    stripe: StripeId,
    index: usize,
    offset: usize,
    len: usize,
    mode: ReadMode,
    ask_own: bool,
    /// The oldest version of block `index` the caller takes: a writer holding the
    /// block's lock knows the version it must read, and older replies (a member an
    /// update has not reached yet) must not be decoded, however quickly they come.
    at_least: Version,
}

impl Client {
    /// Reads `len` bytes at `offset` of data block `lba`.
    pub async fn read(&self, lba: u64, offset: usize, len: usize) -> Result<Bytes, ClientError> {
        self.check_lba(lba)?;
        self.check_range(offset, len)?;
        let (stripe, index) = self.inner.geo.locate(lba);
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        let (_, data) = self
            .read_range(stripe, index, offset, len, ReadMode::Current)
            .await?;
        Ok(data)
    }

    /// Reads a whole data block.
    pub async fn read_block(&self, lba: u64) -> Result<Bytes, ClientError> {
        self.read(lba, 0, self.inner.geo.block_size).await
    }

    /// Reads `count` consecutive blocks, many stripes at once; returns them in order.
    pub async fn read_blocks(&self, lba: u64, count: u64) -> Result<Vec<Bytes>, ClientError> {
        if count > 0 {
            self.check_lba(lba + count - 1)?;
        }
        futures::stream::iter(lba..lba + count)
            .map(|b| self.read_block(b))
            .buffered(self.inner.cfg.stripes_in_flight * self.inner.geo.k)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// One read request to the member at `position` of `stripe`.
    pub(crate) async fn read_member(
        &self,
        stripe: StripeId,
        position: usize,
        offset: usize,
        len: usize,
        mode: ReadMode,
    ) -> Result<Versioned, CallError> {
        let node = self.inner.geo.member(stripe, position);
        let req = Request::Read(ReadReq {
            volume: self.inner.volume.id,
            stripe,
            position: position as u8,
            offset: offset as u32,
            len: len as u32,
            mode,
        });
        match self.call(node, &req, Bytes::new()).await? {
            (Response::Read(r), data)
                if r.versions.len() == self.inner.geo.k && data.len() == len =>
            {
                Ok((r.versions, data))
            }
            (other, data) => Err(CallError::Protocol(format!(
                "read of {len} bytes answered with {other:?} and {} bytes",
                data.len()
            ))),
        }
    }

    /// Reads a byte range of data block `index` of `stripe`: hedged, then degraded.
    /// Returns the stripe state the bytes reflect. When too few members could answer
    /// but some only said "not now" (recovering, busy, timed out), tries again until
    /// the request deadline.
    pub(crate) async fn read_range(
        &self,
        stripe: StripeId,
        index: usize,
        offset: usize,
        len: usize,
        mode: ReadMode,
    ) -> Result<Versioned, ClientError> {
        self.read_range_from(Want {
            stripe,
            index,
            offset,
            len,
            mode,
            ask_own: true,
            at_least: 0,
        })
        .await
    }

    /// [`Client::read_range`] of block `index` as of version `version` at least (its
    /// reader holds the block's lock, so it is exactly that version).
    pub(crate) async fn read_range_at(
        &self,
        stripe: StripeId,
        index: usize,
        offset: usize,
        len: usize,
        version: Version,
    ) -> Result<Versioned, ClientError> {
        self.read_range_from(Want {
            stripe,
            index,
            offset,
            len,
            mode: ReadMode::Current,
            ask_own: true,
            at_least: version,
        })
        .await
    }

    /// Decodes the whole block at `position` of `stripe` (data or parity) from k other
    /// members that reflect one state of the stripe, without asking the block's own
    /// node: how a node rebuilds a block it lost. Returns the state the bytes reflect.
    pub async fn reconstruct(
        &self,
        stripe: StripeId,
        position: usize,
    ) -> Result<Versioned, ClientError> {
        let geo = &self.inner.geo;
        if stripe >= geo.stripes() || position >= geo.width() {
            return Err(ClientError::NoSuchBlock {
                stripe,
                position,
                stripes: geo.stripes(),
                width: geo.width(),
            });
        }
        let bs = geo.block_size;
        self.read_range_from(Want {
            stripe,
            index: position,
            offset: 0,
            len: bs,
            mode: ReadMode::Applied,
            ask_own: false,
            at_least: 0,
        })
        .await
    }

    async fn read_range_from(&self, want: Want) -> Result<Versioned, ClientError> {
        let until = Instant::now() + self.inner.cfg.request_timeout;
        loop {
            match self.read_range_once(&want).await {
                Err(ClientError::Unavailable {
                    transient: true, ..
                }) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
    }

    async fn read_range_once(&self, want: &Want) -> Result<Versioned, ClientError> {
        let (stripe, index, offset, len, ask_own, at_least) = (
            want.stripe,
            want.index,
            want.offset,
            want.len,
            want.ask_own,
            want.at_least,
        );
        // The block's own node answering with an older version is behind.
        let own_answer = |r: Result<Versioned, CallError>| match r {
            Ok(v) if v.0.get(index).is_some_and(|&x| x < at_least) => {
                Err(CallError::Protocol(format!(
                    "the block's own node is at version {:?}, {at_least} is needed",
                    v.0.get(index)
                )))
            }
            r => r,
        };
        let mode = want.mode.clone();
        let geo = &self.inner.geo;
        let mut transient = false;
        // The last round ended with k members answering but disagreeing.
        let mut disagreed = false;
        let primary_node = geo.member(stripe, index);
        let mut primary = pin!(self.read_member(stripe, index, offset, len, mode.clone()));
        let mut primary_done = false;
        let mut primary_err: Option<CallError> = None;
        if !ask_own {
            primary_done = true;
        } else if !self.is_down(primary_node) {
            tokio::select! {
                r = &mut primary => {
                    primary_done = true;
                    match own_answer(r) {
                        Ok(v) => return Ok(v),
                        Err(e) => primary_err = Some(e),
                    }
                }
                _ = tokio::time::sleep(self.inner.cfg.hedge_delay) => {}
            }
        } else {
            primary_done = true;
            primary_err = Some(CallError::Unreachable(format!(
                "node {primary_node} is down"
            )));
        }
        if ask_own {
            self.inner
                .stats
                .degraded_reads
                .fetch_add(1, Ordering::Relaxed);
        }

        let mut last_detail = String::new();
        let mut best = 0usize;
        let ask = |p: usize| {
            let mode = mode.clone();
            async move { (p, self.read_member(stripe, p, offset, len, mode).await) }
        };
        // The other members, those down in the map last.
        let mut order: Vec<usize> = (0..geo.width()).filter(|p| *p != index).collect();
        order.sort_by_key(|p| self.is_down(geo.member(stripe, *p)));
        // A read asks every other member at once (the first k consistent answers
        // win); a rebuild, which is not waited on, asks k first and the rest only if
        // those do not decode, so it reads k blocks, not k + m - 1.
        let first = if ask_own { order.len() } else { geo.k };
        for round in 0..CONSISTENCY_ROUNDS {
            let mut others = FuturesUnordered::new();
            let mut rest: Vec<usize> = order.clone();
            for p in rest.drain(..first.min(order.len())) {
                others.push(ask(p));
            }
            let mut seen: Vec<Seen> = Vec::new();
            let mut bytes: Vec<Bytes> = Vec::new();
            let mut failures: Vec<(usize, CallError)> = Vec::new();
            loop {
                tokio::select! {
                    r = &mut primary, if !primary_done => {
                        primary_done = true;
                        match own_answer(r) {
                            Ok(v) => return Ok(v),
                            Err(e) => primary_err = Some(e),
                        }
                    }
                    next = others.next(), if !others.is_empty() => {
                        let Some((p, r)) = next else { continue };
                        match r {
                            Ok((versions, data)) => {
                                seen.push(Seen { position: p, versions });
                                bytes.push(data);
                                if let Some(out) = self.try_decode(stripe, index, at_least, &seen, &bytes, primary_err.as_ref()) {
                                    return out;
                                }
                            }
                            Err(e) => failures.push((p, e)),
                        }
                        if others.is_empty() {
                            for p in rest.drain(..) {
                                others.push(ask(p));
                            }
                        }
                    }
                    // Every member answered, the block's own node included.
                    else => break,
                }
            }
            // All answered and no k agree. Ask the laggards for the newest state.
            if seen.len() >= geo.k {
                let target = select::newest(geo.k, &seen);
                let laggards: Vec<usize> = (0..seen.len())
                    .filter(|&i| !select::agrees(geo.k, &seen[i], &target))
                    .collect();
                let mut again: FuturesUnordered<_> = laggards
                    .iter()
                    .map(|&i| {
                        let p = seen[i].position;
                        let t = target.clone();
                        async move {
                            (
                                i,
                                self.read_member(stripe, p, offset, len, ReadMode::AsOf(t))
                                    .await,
                            )
                        }
                    })
                    .collect();
                while let Some((i, r)) = again.next().await {
                    if let Ok((versions, data)) = r {
                        seen[i].versions = versions;
                        bytes[i] = data;
                    }
                }
                if let Some(out) =
                    self.try_decode(stripe, index, at_least, &seen, &bytes, primary_err.as_ref())
                {
                    return out;
                }
            }
            best = best.max(agreeing(geo.k, &seen));
            last_detail = describe(geo, stripe, index, primary_err.as_ref(), &failures);
            transient |= primary_err
                .iter()
                .chain(failures.iter().map(|(_, e)| e))
                .any(|e| match e {
                    CallError::Remote(w) => w.is_transient(),
                    CallError::Timeout(_) => true,
                    _ => false,
                });
            // Only disagreement is worth another round; missing nodes stay missing.
            disagreed = seen.len() >= geo.k;
            if !disagreed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5 << round)).await;
        }
        Err(ClientError::Unavailable {
            stripe,
            have: best,
            need: geo.k,
            width: geo.width(),
            detail: last_detail,
            // k members answered but disagree: an update is still being passed on
            // between them (9.2), which settles, so a read may be tried again until
            // its deadline. (A rebuild has its own retries.)
            transient: transient || (disagreed && ask_own),
        })
    }

    /// Decodes the wanted range if k replies agree on a state with block `index` at
    /// version `at_least` or newer.
    fn try_decode(
        &self,
        stripe: StripeId,
        index: usize,
        at_least: Version,
        seen: &[Seen],
        bytes: &[Bytes],
        primary_err: Option<&CallError>,
    ) -> Option<Result<Versioned, ClientError>> {
        let k = self.inner.geo.k;
        let choice = select::choose_at_least(k, seen, index, at_least)?;
        let present: Vec<(usize, &[u8])> = choice
            .chosen
            .iter()
            .map(|&i| (seen[i].position, &bytes[i][..]))
            .collect();
        let out = match self.inner.codec.reconstruct(&present, &[index]) {
            Ok(mut v) => v.pop().unwrap_or_default(),
            Err(e) => return Some(Err(e.into())),
        };
        self.inner
            .stats
            .reconstructions
            .fetch_add(1, Ordering::Relaxed);
        if let Some(CallError::Remote(WireError::Corrupt { .. })) = primary_err {
            self.inner.stats.repairs.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.repair_position(stripe, index).await {
                    tracing::warn!(stripe, index, error = %e, "repair of a corrupt block failed");
                }
            });
        }
        Some(Ok((choice.versions, Bytes::from(out))))
    }
}

fn agreeing(k: usize, seen: &[Seen]) -> usize {
    let target = select::newest(k, seen);
    seen.iter()
        .filter(|s| select::agrees(k, s, &target))
        .count()
}

/// Says which nodes failed and why, for the user.
fn describe(
    geo: &drs_proto::Geometry,
    stripe: StripeId,
    index: usize,
    primary: Option<&CallError>,
    failures: &[(usize, CallError)],
) -> String {
    let mut parts = Vec::new();
    if let Some(e) = primary {
        parts.push(format!(
            "node {} (block's own): {e}",
            geo.member(stripe, index)
        ));
    }
    for (p, e) in failures {
        parts.push(format!("node {}: {e}", geo.member(stripe, *p)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}
