//! `drs-codec`: the systematic Reed-Solomon erasure code of DRS, `k` data blocks plus `m`
//! parity blocks over GF(2^8). Pure: no I/O, no threads, no clock.
//!
//! # What this crate owns
//!
//! * [`Coefficients`]: the `m x k` coefficient table `C` (`rows[j][i]` = c(j, i), the
//!   coefficient by which parity block `j` scales data block `i`). The generator matrix is
//!   `[I_k ; C]`. The table is *ours*: it is stored with the volume, so the on-disk format never
//!   depends on library internals. Tables read back from storage go through
//!   [`Coefficients::from_rows`], which checks the shape and the MDS property.
//! * [`Codec`]: encode, verify, parity deltas (read-modify-write of a sub-range of one data
//!   block), and reconstruction of any positions from any `k` present ones, all driven by the
//!   stored table. Matrix inversion is our own Gauss-Jordan over GF(2^8).
//!
//! `reed-solomon-erasure` 6.0.0 (with `simd-accel`) is used for exactly two things: deriving
//! the *default* table for a `(k, m)` ([`Coefficients::default_for`]) and the SIMD slice
//! kernels `galois_8::mul_slice` / `galois_8::mul_slice_xor`. The field is GF(2^8) with the
//! polynomial 0x11d (the library's `GENERATING_POLYNOMIAL = 29` plus x^8).
//!
//! # Traps in the library (handled here; keep them in mind when touching this crate)
//!
//! * There is no getter for the library's parity matrix. Column `i` is extracted by
//!   `encode_single_sep(i, &[1], &mut parity_bufs)` with one-byte buffers, but that call
//!   OVERWRITES the parity buffers for `i == 0` and ACCUMULATES (xors into them) for `i >= 1`,
//!   so the buffers are zeroed before each call.
//! * With `simd-accel`, `galois_8::mul_slice` and `mul_slice_xor` PANIC on empty slices (they
//!   take `&input[0]`) and assert equal lengths. Every path here checks lengths first (returning
//!   [`CodecError::LengthMismatch`]) and treats empty slices as a no-op, so nothing in this
//!   crate panics on caller input except [`Coefficients::get`] with an out-of-range index.
//! * The library itself allows `k + m` up to 256; we cap it at [`MAX_SHARDS`] = 255.

mod gf;
mod matrix;

use reed_solomon_erasure::galois_8::ReedSolomon;

/// Limit on `k + m` for GF(2^8).
pub const MAX_SHARDS: usize = 255;

/// Number of bytes processed per pass over the inputs in [`Codec::encode`],
/// [`Codec::verify`] and reconstruction, so that the inputs and outputs of one pass stay in L1.
const CHUNK: usize = 4096;

/// Above this many square submatrices of `C`, [`Coefficients::from_rows`] stops checking
/// orders greater than 2 (see there).
const MDS_CHECK_BUDGET: u64 = 20_000;

/// Errors of this crate. Every one is a caller or data error; none is a panic.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("invalid geometry: k={k} m={m} (need k >= 1, m >= 1, k + m <= 255)")]
    InvalidGeometry { k: usize, m: usize },
    #[error("coefficient table is {rows}x{cols}, expected {m}x{k}")]
    TableShape {
        rows: usize,
        cols: usize,
        k: usize,
        m: usize,
    },
    #[error("coefficient table is not MDS: data+parity rows {rows:?} are not independent")]
    NotMds { rows: Vec<usize> },
    #[error("shard length mismatch: expected {expected} bytes, got {got}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("shard index {index} out of range for k={k} m={m}")]
    IndexOutOfRange { index: usize, k: usize, m: usize },
    #[error("not enough shards to reconstruct: have {have}, need {need}")]
    NotEnoughShards { have: usize, need: usize },
    #[error("duplicate shard index {index}")]
    DuplicateShard { index: usize },
    /// A slice-of-shards argument has the wrong number of entries (e.g. `encode` given other
    /// than `k` data slices, or `reconstruct_into` given other than `wanted.len()` outputs).
    #[error("wrong number of shards: expected {expected}, got {got}")]
    WrongShardCount { expected: usize, got: usize },
}

fn check_geometry(k: usize, m: usize) -> Result<(), CodecError> {
    if k == 0 || m == 0 || k.saturating_add(m) > MAX_SHARDS {
        Err(CodecError::InvalidGeometry { k, m })
    } else {
        Ok(())
    }
}

/// The `m x k` coefficient table: `rows[j][i]` = c(j, i), the GF(2^8) coefficient by which
/// parity block `j` scales data block `i`. Serializable as plain nested `Vec<Vec<u8>>` by
/// callers (via [`Coefficients::rows`] and [`Coefficients::from_rows`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coefficients {
    k: usize,
    m: usize,
    rows: Vec<Vec<u8>>,
}

impl Coefficients {
    /// The default table for `(k, m)`: derived from reed-solomon-erasure 6.0.0's encoding
    /// matrix (a Vandermonde matrix times the inverse of its top `k x k` square), which is MDS
    /// by construction.
    pub fn default_for(k: usize, m: usize) -> Result<Coefficients, CodecError> {
        check_geometry(k, m)?;
        let rs = ReedSolomon::new(k, m).map_err(|_| CodecError::InvalidGeometry { k, m })?;
        let mut rows = vec![vec![0u8; k]; m];
        let mut bufs = vec![[0u8; 1]; m];
        for i in 0..k {
            // encode_single_sep overwrites for i == 0 but xors into the buffers for i >= 1:
            // zero them so each call yields exactly column i.
            for b in &mut bufs {
                b[0] = 0;
            }
            rs.encode_single_sep(i, &[1u8], &mut bufs)
                .map_err(|_| CodecError::InvalidGeometry { k, m })?;
            for (row, b) in rows.iter_mut().zip(&bufs) {
                row[i] = b[0];
            }
        }
        Ok(Coefficients { k, m, rows })
    }

    /// A table read from storage, validated for geometry, shape (`m` rows of `k` bytes) and the
    /// MDS property.
    ///
    /// MDS means every `k x k` submatrix of `[I_k ; C]` formed by any `k` of its `k + m` rows is
    /// invertible. Such a submatrix keeps `k - e` identity rows and `e` parity rows `P`; it is
    /// invertible iff the `e x e` submatrix `C[P, E]` is, where `E` are the `e` data columns
    /// whose identity rows were dropped. So the check runs over square submatrices of `C`
    /// ("order" `e` = number of erased data blocks), of which there are
    /// `C(k, e) * C(m, e)` per order, `C(k + m, k) - 1` in all.
    ///
    /// Exactly what is checked:
    /// * order 1 (every coefficient is non-zero) and order 2 (every 2x2 minor is non-zero)
    ///   are always checked completely — every erasure pattern with at most 2 lost data
    ///   blocks is thus guaranteed decodable;
    /// * each higher order `e` (in increasing order) is checked completely as long as the
    ///   total number of submatrices of orders `1..=e` is at most 20 000; the first order over
    ///   that budget and all higher orders are not checked.
    ///
    /// Hence the check is exhaustive whenever `C(k + m, k) - 1 <= 20 000` (e.g. any `m <= 2`,
    /// `k <= 16` with `m <= 4`, `k = 20` with `m = 4`), and otherwise covers at least all
    /// patterns with up to `min(m, 2)` erased data blocks. A table that fails reports the
    /// (sorted) positions of the `k` rows of `[I_k ; C]` that are not independent.
    pub fn from_rows(k: usize, m: usize, rows: Vec<Vec<u8>>) -> Result<Coefficients, CodecError> {
        check_geometry(k, m)?;
        if rows.len() != m || rows.iter().any(|r| r.len() != k) {
            let cols = rows
                .iter()
                .map(Vec::len)
                .find(|&c| c != k)
                .unwrap_or(if rows.is_empty() { 0 } else { k });
            return Err(CodecError::TableShape {
                rows: rows.len(),
                cols,
                k,
                m,
            });
        }
        check_mds(k, m, &rows)?;
        Ok(Coefficients { k, m, rows })
    }

    /// The table rows: `rows()[j][i]` = c(j, i).
    pub fn rows(&self) -> &[Vec<u8>] {
        &self.rows
    }

    /// Number of data blocks.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of parity blocks.
    pub fn m(&self) -> usize {
        self.m
    }

    /// c(parity, data).
    ///
    /// # Panics
    /// If `parity >= m` or `data >= k` (a caller bug).
    pub fn get(&self, parity: usize, data: usize) -> u8 {
        self.rows[parity][data]
    }
}

/// Binomial coefficient, saturating at `u64::MAX`.
fn binomial(n: usize, r: usize) -> u64 {
    if r > n {
        return 0;
    }
    let r = r.min(n - r);
    let mut acc: u128 = 1;
    for i in 0..r {
        // acc * (n - i) / (i + 1) is exact at every step.
        acc = acc * (n - i) as u128 / (i + 1) as u128;
        if acc > u64::MAX as u128 {
            return u64::MAX;
        }
    }
    acc as u64
}

/// Advances `idx` (a strictly increasing selection from `0..n`) to the next combination in
/// lexicographic order; returns false after the last one.
fn next_combination(idx: &mut [usize], n: usize) -> bool {
    let r = idx.len();
    let mut i = r;
    while i > 0 {
        i -= 1;
        if idx[i] < n - r + i {
            idx[i] += 1;
            for t in i + 1..r {
                idx[t] = idx[t - 1] + 1;
            }
            return true;
        }
    }
    false
}

fn not_mds(k: usize, erased_data: &[usize], parity_rows: &[usize]) -> CodecError {
    let mut rows: Vec<usize> = (0..k).filter(|i| !erased_data.contains(i)).collect();
    rows.extend(parity_rows.iter().map(|p| k + p));
    rows.sort_unstable();
    CodecError::NotMds { rows }
}

/// See [`Coefficients::from_rows`] for exactly what this checks.
fn check_mds(k: usize, m: usize, rows: &[Vec<u8>]) -> Result<(), CodecError> {
    // Order 1: every coefficient non-zero.
    for (j, row) in rows.iter().enumerate() {
        if let Some(i) = row.iter().position(|&c| c == 0) {
            return Err(not_mds(k, &[i], &[j]));
        }
    }
    let max_order = k.min(m);
    let mut checked = binomial(k, 1).saturating_mul(binomial(m, 1));
    // Order 2: every 2x2 minor non-zero.
    if max_order >= 2 {
        checked = checked.saturating_add(binomial(k, 2).saturating_mul(binomial(m, 2)));
        for p0 in 0..m {
            for p1 in p0 + 1..m {
                let (r0, r1) = (&rows[p0], &rows[p1]);
                for e0 in 0..k {
                    for e1 in e0 + 1..k {
                        if gf::mul(r0[e0], r1[e1]) == gf::mul(r0[e1], r1[e0]) {
                            return Err(not_mds(k, &[e0, e1], &[p0, p1]));
                        }
                    }
                }
            }
        }
    }
    // Higher orders, while within budget.
    let mut scratch = Vec::new();
    for e in 3..=max_order {
        checked = checked.saturating_add(binomial(k, e).saturating_mul(binomial(m, e)));
        if checked > MDS_CHECK_BUDGET {
            break;
        }
        let mut pset: Vec<usize> = (0..e).collect();
        loop {
            let mut eset: Vec<usize> = (0..e).collect();
            loop {
                scratch.clear();
                for &p in &pset {
                    scratch.extend(eset.iter().map(|&i| rows[p][i]));
                }
                if matrix::is_singular(e, &mut scratch) {
                    return Err(not_mds(k, &eset, &pset));
                }
                if !next_combination(&mut eset, k) {
                    break;
                }
            }
            if !next_combination(&mut pset, m) {
                break;
            }
        }
    }
    Ok(())
}

/// The codec for one volume: immutable, cheap to share (Clone or wrap in Arc by callers).
///
/// Positions: `0..k` are the data blocks, `k..k + m` the parity blocks (parity `j` is position
/// `k + j`).
#[derive(Clone, Debug)]
pub struct Codec {
    coefficients: Coefficients,
}

impl Codec {
    /// A codec driven by `coefficients` (already validated by construction).
    pub fn new(coefficients: Coefficients) -> Codec {
        Codec { coefficients }
    }

    /// Number of data blocks.
    pub fn k(&self) -> usize {
        self.coefficients.k
    }

    /// Number of parity blocks.
    pub fn m(&self) -> usize {
        self.coefficients.m
    }

    /// The coefficient table.
    pub fn coefficients(&self) -> &Coefficients {
        &self.coefficients
    }

    fn index_error(&self, index: usize) -> CodecError {
        CodecError::IndexOutOfRange {
            index,
            k: self.k(),
            m: self.m(),
        }
    }

    /// Checks `k` data and `m` parity slices, all of the length of `data[0]`; returns it.
    fn check_encode_args(
        &self,
        data: &[&[u8]],
        parity_lens: &[usize],
    ) -> Result<usize, CodecError> {
        if data.len() != self.k() {
            return Err(CodecError::WrongShardCount {
                expected: self.k(),
                got: data.len(),
            });
        }
        if parity_lens.len() != self.m() {
            return Err(CodecError::WrongShardCount {
                expected: self.m(),
                got: parity_lens.len(),
            });
        }
        let len = data.first().map_or(0, |d| d.len());
        for got in data
            .iter()
            .map(|d| d.len())
            .chain(parity_lens.iter().copied())
        {
            if got != len {
                return Err(CodecError::LengthMismatch { expected: len, got });
            }
        }
        Ok(len)
    }

    /// Overwrites every parity slice with the encoding of the `k` data slices. All slices equal
    /// length (any length, including 0 and sub-ranges of blocks).
    ///
    /// Errors: [`CodecError::WrongShardCount`] unless there are exactly `k` data and `m` parity
    /// slices; [`CodecError::LengthMismatch`] unless all have the length of `data[0]`.
    pub fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), CodecError> {
        let parity_lens: Vec<usize> = parity.iter().map(|p| p.len()).collect();
        let len = self.check_encode_args(data, &parity_lens)?;
        let mut start = 0;
        while start < len {
            let end = len.min(start + CHUNK);
            for (row, out) in self.coefficients.rows.iter().zip(parity.iter_mut()) {
                let terms = row.iter().copied().zip(data.iter().map(|d| &d[start..end]));
                combine(terms, &mut out[start..end]);
            }
            start = end;
        }
        Ok(())
    }

    /// True iff the parity slices equal the encoding of the data slices. Same argument rules
    /// as [`Codec::encode`].
    pub fn verify(&self, data: &[&[u8]], parity: &[&[u8]]) -> Result<bool, CodecError> {
        let parity_lens: Vec<usize> = parity.iter().map(|p| p.len()).collect();
        let len = self.check_encode_args(data, &parity_lens)?;
        let mut scratch = vec![0u8; len.min(CHUNK)];
        let mut start = 0;
        while start < len {
            let end = len.min(start + CHUNK);
            let buf = &mut scratch[..end - start];
            for (row, have) in self.coefficients.rows.iter().zip(parity) {
                let terms = row.iter().copied().zip(data.iter().map(|d| &d[start..end]));
                combine(terms, buf);
                if *buf != have[start..end] {
                    return Ok(false);
                }
            }
            start = end;
        }
        Ok(true)
    }

    /// `parity ^= c(parity_index, data_index) * delta`: the parity update for a change of data
    /// block `data_index` by `delta` (= old XOR new). `parity` may be a sub-range of a parity
    /// block as long as `delta` is the matching sub-range. Deltas to the same block may be
    /// XOR-ed together first and applied once.
    ///
    /// Errors: [`CodecError::IndexOutOfRange`] if `data_index >= k` (reported as is) or
    /// `parity_index >= m` (reported as the position `k + parity_index`);
    /// [`CodecError::LengthMismatch`] (expected `delta.len()`) if the lengths differ. Empty
    /// slices are a no-op.
    pub fn apply_parity_delta(
        &self,
        parity_index: usize,
        data_index: usize,
        delta: &[u8],
        parity: &mut [u8],
    ) -> Result<(), CodecError> {
        if data_index >= self.k() {
            return Err(self.index_error(data_index));
        }
        if parity_index >= self.m() {
            return Err(self.index_error(self.k().saturating_add(parity_index)));
        }
        let c = self.coefficients.rows[parity_index][data_index];
        gf::mul_slice_xor(c, delta, parity)
    }

    /// `out ^= c * input` (GF(2^8)); empty slices are a no-op; unequal lengths are an error
    /// ([`CodecError::LengthMismatch`], expected `input.len()`).
    pub fn mul_xor(c: u8, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        gf::mul_slice_xor(c, input, out)
    }

    /// `out ^= input`; empty slices are a no-op; unequal lengths are an error
    /// ([`CodecError::LengthMismatch`], expected `input.len()`).
    pub fn xor_into(input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
        gf::xor(input, out)
    }

    /// Reconstruct: `present` holds `(position, bytes)` for at least `k` distinct positions
    /// (positions `0..k` are data blocks, `k..k + m` parity blocks); all equal length.
    /// `wanted` lists positions to compute (any of `0..k + m`, may include positions that are
    /// present — then they are just copied, and may repeat); returns one `Vec<u8>` per wanted
    /// position, in order.
    ///
    /// Uses exactly the first `k` entries of `present` (in the order given); later entries are
    /// not looked at. Callers rely on this to pick which replies to trust.
    ///
    /// Errors: [`CodecError::NotEnoughShards`] if `present.len() < k`;
    /// [`CodecError::IndexOutOfRange`] for a used or wanted position `>= k + m`;
    /// [`CodecError::DuplicateShard`] if a position repeats among the first `k` entries;
    /// [`CodecError::LengthMismatch`] if their lengths differ;
    /// [`CodecError::NotMds`] if the chosen rows are dependent (impossible for a table that
    /// passed the exhaustive MDS check).
    pub fn reconstruct(
        &self,
        present: &[(usize, &[u8])],
        wanted: &[usize],
    ) -> Result<Vec<Vec<u8>>, CodecError> {
        let len = self.check_present(present)?;
        let mut outs: Vec<Vec<u8>> = wanted.iter().map(|_| vec![0u8; len]).collect();
        let mut refs: Vec<&mut [u8]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        self.reconstruct_into(present, wanted, &mut refs)?;
        Ok(outs)
    }

    /// Same as [`Codec::reconstruct`], writing into caller buffers: `out[t]` receives position
    /// `wanted[t]` and must be the shard length ([`CodecError::LengthMismatch`] otherwise);
    /// `out.len()` must equal `wanted.len()` ([`CodecError::WrongShardCount`] otherwise).
    pub fn reconstruct_into(
        &self,
        present: &[(usize, &[u8])],
        wanted: &[usize],
        out: &mut [&mut [u8]],
    ) -> Result<(), CodecError> {
        let k = self.k();
        let len = self.check_present(present)?;
        let used = &present[..k];
        if out.len() != wanted.len() {
            return Err(CodecError::WrongShardCount {
                expected: wanted.len(),
                got: out.len(),
            });
        }
        let total = k + self.m();
        for &w in wanted {
            if w >= total {
                return Err(self.index_error(w));
            }
        }
        for o in out.iter() {
            if o.len() != len {
                return Err(CodecError::LengthMismatch {
                    expected: len,
                    got: o.len(),
                });
            }
        }

        // slot[position] = index into `used` of that position, if used.
        let mut slot = [usize::MAX; MAX_SHARDS];
        for (r, &(p, _)) in used.iter().enumerate() {
            slot[p] = r;
        }

        // Coefficients over the used shards for every wanted position (k bytes each).
        let mut coefs = vec![0u8; wanted.len() * k];
        if wanted.iter().any(|&w| slot[w] == usize::MAX) {
            // Generator rows of the used positions, inverted.
            let mut a = vec![0u8; k * k];
            for (r, &(p, _)) in used.iter().enumerate() {
                if p < k {
                    a[r * k + p] = 1;
                } else {
                    a[r * k..(r + 1) * k].copy_from_slice(&self.coefficients.rows[p - k]);
                }
            }
            let inv = matrix::invert(k, &mut a).ok_or_else(|| {
                let mut rows: Vec<usize> = used.iter().map(|&(p, _)| p).collect();
                rows.sort_unstable();
                CodecError::NotMds { rows }
            })?;
            for (&w, cw) in wanted.iter().zip(coefs.chunks_exact_mut(k)) {
                if slot[w] != usize::MAX {
                    cw[slot[w]] = 1;
                } else if w < k {
                    // Data row w of the inverse: d_w = sum_r inv[w][r] * used_r.
                    cw.copy_from_slice(&inv[w * k..(w + 1) * k]);
                } else {
                    // Parity row: c_j . d = sum_r (sum_t c(j,t) inv[t][r]) * used_r.
                    let crow = &self.coefficients.rows[w - k];
                    for (t, &c) in crow.iter().enumerate() {
                        if c == 0 {
                            continue;
                        }
                        for (dst, &x) in cw.iter_mut().zip(&inv[t * k..(t + 1) * k]) {
                            *dst ^= gf::mul(c, x);
                        }
                    }
                }
            }
        } else {
            for (&w, cw) in wanted.iter().zip(coefs.chunks_exact_mut(k)) {
                cw[slot[w]] = 1;
            }
        }

        let mut start = 0;
        while start < len {
            let end = len.min(start + CHUNK);
            for (cw, o) in coefs.chunks_exact(k).zip(out.iter_mut()) {
                let terms = cw
                    .iter()
                    .copied()
                    .zip(used.iter().map(|(_, s)| &s[start..end]));
                combine(terms, &mut o[start..end]);
            }
            start = end;
        }
        Ok(())
    }

    /// Validates the first `k` entries of `present`; returns the shard length.
    fn check_present(&self, present: &[(usize, &[u8])]) -> Result<usize, CodecError> {
        let k = self.k();
        if present.len() < k {
            return Err(CodecError::NotEnoughShards {
                have: present.len(),
                need: k,
            });
        }
        let used = &present[..k];
        let len = used.first().map_or(0, |(_, s)| s.len());
        let total = k + self.m();
        let mut seen = [false; MAX_SHARDS];
        for &(p, s) in used {
            if p >= total {
                return Err(self.index_error(p));
            }
            if seen[p] {
                return Err(CodecError::DuplicateShard { index: p });
            }
            seen[p] = true;
            if s.len() != len {
                return Err(CodecError::LengthMismatch {
                    expected: len,
                    got: s.len(),
                });
            }
        }
        Ok(len)
    }
}

/// `out = sum c * input` over `terms` (all inputs of `out.len()`, checked by the caller).
/// Zero coefficients are skipped; the first non-zero one overwrites `out`; if every
/// coefficient is zero, `out` is zeroed.
fn combine<'a>(terms: impl Iterator<Item = (u8, &'a [u8])>, out: &mut [u8]) {
    let mut first = true;
    for (c, input) in terms {
        if c == 0 {
            continue;
        }
        if first {
            gf::mul_slice_unchecked(c, input, out);
            first = false;
        } else {
            gf::mul_slice_xor_unchecked(c, input, out);
        }
    }
    if first {
        out.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_values() {
        assert_eq!(binomial(6, 2), 15);
        assert_eq!(binomial(24, 4), 10626);
        assert_eq!(binomial(3, 5), 0);
        assert_eq!(binomial(255, 127), u64::MAX);
    }

    #[test]
    fn combinations_enumerate_all() {
        let mut idx = vec![0, 1, 2];
        let mut count = 1;
        while next_combination(&mut idx, 6) {
            count += 1;
        }
        assert_eq!(count, 20);
    }

    #[test]
    fn big_geometry_from_rows_is_bounded() {
        // Not exhaustive (C(255,127) submatrices) but must finish: orders 1 and 2 only.
        let c = Coefficients::default_for(200, 55).unwrap();
        let again = Coefficients::from_rows(200, 55, c.rows().to_vec()).unwrap();
        assert_eq!(c, again);
    }
}
