//! Checks the codec against a naive GF(2^8) reference written here (not the library's tables),
//! plus the library traps, table validation and the pinned default tables.

// Test helpers outside #[test] fns are not covered by clippy.toml's allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use drs_codec::{Codec, CodecError, Coefficients, MAX_SHARDS};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Naive reference: GF(2^8) with polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), which is what
// reed-solomon-erasure 6.0.0's build.rs uses (GENERATING_POLYNOMIAL = 29 = 0x1d, plus x^8).
// ---------------------------------------------------------------------------------------------

fn gmul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1d;
        }
        b >>= 1;
    }
    p
}

fn ginv(a: u8) -> u8 {
    assert_ne!(a, 0);
    (1..=255u8).find(|&x| gmul(a, x) == 1).unwrap()
}

/// Naive encode: parity_j[b] = sum_i c(j, i) * d_i[b].
fn naive_encode(rows: &[Vec<u8>], data: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let len = data.first().map_or(0, Vec::len);
    rows.iter()
        .map(|row| {
            (0..len)
                .map(|b| {
                    row.iter()
                        .zip(data)
                        .fold(0u8, |acc, (&c, d)| acc ^ gmul(c, d[b]))
                })
                .collect()
        })
        .collect()
}

/// Naive singularity test of a square matrix.
fn naive_singular(mut a: Vec<Vec<u8>>) -> bool {
    let n = a.len();
    for col in 0..n {
        let Some(p) = (col..n).find(|&r| a[r][col] != 0) else {
            return true;
        };
        a.swap(p, col);
        let inv = ginv(a[col][col]);
        for r in col + 1..n {
            let f = gmul(a[r][col], inv);
            let pivot_row = a[col].clone();
            for (x, &p) in a[r].iter_mut().zip(&pivot_row).skip(col) {
                *x ^= gmul(f, p);
            }
        }
    }
    false
}

/// Tiny deterministic PRNG for test-internal choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

fn encode_vecs(codec: &Codec, data: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let len = data.first().map_or(0, Vec::len);
    let mut parity = vec![vec![0xAAu8; len]; codec.m()];
    let drefs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut prefs: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
    codec.encode(&drefs, &mut prefs).unwrap();
    parity
}

/// All subsets of 0..n of size <= max_size.
fn small_subsets(n: usize, max_size: usize) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    for mask in 1u32..(1u32 << n) {
        if (mask.count_ones() as usize) <= max_size {
            out.push((0..n).filter(|i| mask & (1 << i) != 0).collect());
        }
    }
    out
}

fn binom(n: usize, r: usize) -> usize {
    (0..r).fold(1usize, |acc, i| acc * (n - i) / (i + 1))
}

/// Erasure sets of size <= m: exhaustive when there are at most 400, else 60 sampled ones.
fn erasure_sets(k: usize, m: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let n = k + m;
    let count: usize = (0..=m).map(|e| binom(n, e)).sum();
    if count <= 400 {
        return small_subsets(n, m);
    }
    (0..60)
        .map(|_| {
            let e = rng.below(m + 1);
            let mut all: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut all);
            all.truncate(e);
            all.sort_unstable();
            all
        })
        .collect()
}

/// Checks that reconstructing every position from the shards outside `erased` (in a random
/// order) gives back `shards`.
fn check_reconstruct(codec: &Codec, shards: &[Vec<u8>], erased: &[usize], rng: &mut Rng) {
    let n = codec.k() + codec.m();
    let mut present: Vec<(usize, &[u8])> = (0..n)
        .filter(|p| !erased.contains(p))
        .map(|p| (p, shards[p].as_slice()))
        .collect();
    rng.shuffle(&mut present);
    let wanted: Vec<usize> = (0..n).collect();
    let got = codec.reconstruct(&present, &wanted).unwrap();
    assert_eq!(got, shards, "erased {erased:?}");
    // Only the erased ones, via reconstruct_into.
    let len = shards[0].len();
    let mut bufs = vec![vec![0x55u8; len]; erased.len()];
    let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    codec.reconstruct_into(&present, erased, &mut refs).unwrap();
    for (b, &p) in bufs.iter().zip(erased) {
        assert_eq!(
            b, &shards[p],
            "reconstruct_into erased {erased:?} position {p}"
        );
    }
}

fn geometry_and_data() -> impl Strategy<Value = (usize, usize, Vec<Vec<u8>>, u64)> {
    (1..=10usize, 1..=4usize, 0..=300usize).prop_flat_map(|(k, m, len)| {
        (
            Just(k),
            Just(m),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), len), k),
            any::<u64>(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn encode_matches_naive_and_reconstructs((k, m, data, seed) in geometry_and_data()) {
        let coeffs = Coefficients::default_for(k, m).unwrap();
        let codec = Codec::new(coeffs.clone());
        let parity = encode_vecs(&codec, &data);
        prop_assert_eq!(&parity, &naive_encode(coeffs.rows(), &data));

        let drefs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let prefs: Vec<&[u8]> = parity.iter().map(Vec::as_slice).collect();
        prop_assert!(codec.verify(&drefs, &prefs).unwrap());

        let shards: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
        let mut rng = Rng(seed);
        for erased in erasure_sets(k, m, &mut rng) {
            check_reconstruct(&codec, &shards, &erased, &mut rng);
        }

        // More than m erasures: fewer than k present.
        let n = k + m;
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let keep = rng.below(k); // 0..k-1 present
        let present: Vec<(usize, &[u8])> =
            order[..keep].iter().map(|&p| (p, shards[p].as_slice())).collect();
        prop_assert_eq!(
            codec.reconstruct(&present, &[0]),
            Err(CodecError::NotEnoughShards { have: keep, need: k })
        );
    }

    #[test]
    fn parity_delta_matches_reencode(
        (k, m, data, seed) in geometry_and_data(),
    ) {
        let len = data[0].len();
        let codec = Codec::new(Coefficients::default_for(k, m).unwrap());
        let mut rng = Rng(seed);
        let i = rng.below(k);
        let off = rng.below(len + 1);
        let sub = rng.below(len - off + 1);
        let mut new_data = data.clone();
        let fresh = rng.bytes(sub);
        new_data[i][off..off + sub].copy_from_slice(&fresh);
        let delta: Vec<u8> = data[i][off..off + sub]
            .iter()
            .zip(&fresh)
            .map(|(a, b)| a ^ b)
            .collect();

        let mut parity = encode_vecs(&codec, &data);
        for (j, p) in parity.iter_mut().enumerate() {
            codec.apply_parity_delta(j, i, &delta, &mut p[off..off + sub]).unwrap();
        }
        prop_assert_eq!(&parity, &encode_vecs(&codec, &new_data));
        prop_assert_eq!(&parity, &naive_encode(codec.coefficients().rows(), &new_data));
    }

    #[test]
    fn parity_deltas_running_total(
        (k, m, data, seed) in geometry_and_data(),
        steps in 1..6usize,
    ) {
        let len = data[0].len();
        let codec = Codec::new(Coefficients::default_for(k, m).unwrap());
        let mut rng = Rng(seed);
        let i = rng.below(k);
        // Several successive writes to block i, each a sub-range.
        let mut cur = data.clone();
        let mut deltas = Vec::new(); // full-length deltas
        for _ in 0..steps {
            let off = rng.below(len + 1);
            let sub = rng.below(len - off + 1);
            let fresh = rng.bytes(sub);
            let mut d = vec![0u8; len];
            for (t, &b) in fresh.iter().enumerate() {
                d[off + t] = cur[i][off + t] ^ b;
                cur[i][off + t] = b;
            }
            deltas.push(d);
        }
        let expect = encode_vecs(&codec, &cur);

        // Summed first, applied once.
        let mut total = vec![0u8; len];
        for d in &deltas {
            Codec::xor_into(d, &mut total).unwrap();
        }
        let mut once = encode_vecs(&codec, &data);
        for (j, p) in once.iter_mut().enumerate() {
            codec.apply_parity_delta(j, i, &total, p).unwrap();
        }
        prop_assert_eq!(&once, &expect);

        // One by one, in a random order.
        let mut order: Vec<usize> = (0..deltas.len()).collect();
        rng.shuffle(&mut order);
        let mut each = encode_vecs(&codec, &data);
        for &t in &order {
            for (j, p) in each.iter_mut().enumerate() {
                codec.apply_parity_delta(j, i, &deltas[t], p).unwrap();
            }
        }
        prop_assert_eq!(&each, &expect);
    }

    #[test]
    fn mul_xor_matches_naive(c in any::<u8>(), input in proptest::collection::vec(any::<u8>(), 0..300), seed in any::<u64>()) {
        let mut out = Rng(seed).bytes(input.len());
        let expect: Vec<u8> = out.iter().zip(&input).map(|(o, i)| o ^ gmul(c, *i)).collect();
        Codec::mul_xor(c, &input, &mut out).unwrap();
        prop_assert_eq!(out, expect);
    }
}

#[test]
fn naive_field_is_a_field() {
    // Sanity of the reference itself: x * x^-1 = 1, and generator 2 has order 255.
    for a in 1..=255u8 {
        assert_eq!(gmul(a, ginv(a)), 1);
    }
    let mut x = 1u8;
    for i in 1..=255 {
        x = gmul(x, 2);
        assert_eq!(x == 1, i == 255);
    }
}

#[test]
fn zero_and_odd_lengths_all_erasures() {
    let mut rng = Rng(7);
    for (k, m) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 4)] {
        let codec = Codec::new(Coefficients::default_for(k, m).unwrap());
        for len in [0usize, 1, 3, 15, 16, 17, 33, 4095, 4097, 9001] {
            let data: Vec<Vec<u8>> = (0..k).map(|_| rng.bytes(len)).collect();
            let parity = encode_vecs(&codec, &data);
            assert_eq!(parity, naive_encode(codec.coefficients().rows(), &data));
            let shards: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
            for erased in small_subsets(k + m, m) {
                check_reconstruct(&codec, &shards, &erased, &mut rng);
            }
        }
    }
}

/// A Cauchy table (MDS) that has nothing to do with the library's: encoding and
/// reconstruction must follow the stored table, not the library's matrix.
#[test]
fn custom_table_is_used() {
    let (k, m) = (5, 3);
    let rows: Vec<Vec<u8>> = (0..m)
        .map(|j| (0..k).map(|i| ginv(((k + j) as u8) ^ (i as u8))).collect())
        .collect();
    let coeffs = Coefficients::from_rows(k, m, rows.clone()).unwrap();
    assert_ne!(coeffs, Coefficients::default_for(k, m).unwrap());
    let codec = Codec::new(coeffs);
    let mut rng = Rng(99);
    let data: Vec<Vec<u8>> = (0..k).map(|_| rng.bytes(1000)).collect();
    let parity = encode_vecs(&codec, &data);
    assert_eq!(parity, naive_encode(&rows, &data));
    let shards: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
    for erased in small_subsets(k + m, m) {
        check_reconstruct(&codec, &shards, &erased, &mut rng);
    }
}

#[test]
fn reconstruct_uses_exactly_first_k_entries() {
    let (k, m) = (4, 2);
    let codec = Codec::new(Coefficients::default_for(k, m).unwrap());
    let mut rng = Rng(3);
    let data: Vec<Vec<u8>> = (0..k).map(|_| rng.bytes(64)).collect();
    let parity = encode_vecs(&codec, &data);
    let shards: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
    let garbage = rng.bytes(64);
    let wrong_len = vec![0u8; 3];

    // Garbage (and even a wrong length / bad index / duplicate) after the first k: ignored.
    let present: Vec<(usize, &[u8])> = vec![
        (5, &shards[5]),
        (1, &shards[1]),
        (4, &shards[4]),
        (3, &shards[3]),
        (0, &garbage),
        (2, &wrong_len),
        (99, &garbage),
        (5, &garbage),
    ];
    let got = codec.reconstruct(&present, &[0, 2]).unwrap();
    assert_eq!(got, vec![shards[0].clone(), shards[2].clone()]);

    // Garbage within the first k: it is trusted, so the result is wrong.
    let present: Vec<(usize, &[u8])> = vec![
        (5, &shards[5]),
        (1, &garbage),
        (4, &shards[4]),
        (3, &shards[3]),
        (0, &shards[0]),
        (2, &shards[2]),
    ];
    let got = codec.reconstruct(&present, &[0, 2]).unwrap();
    assert_ne!(got[1], shards[2]);
    // Position 1 is copied from what was given, position 0 computed.
    let got = codec.reconstruct(&present, &[1]).unwrap();
    assert_eq!(got[0], garbage);
}

#[test]
fn reconstruct_errors() {
    let (k, m) = (3, 2);
    let codec = Codec::new(Coefficients::default_for(k, m).unwrap());
    let a = vec![1u8; 8];
    let short = vec![1u8; 7];
    assert_eq!(
        codec.reconstruct(&[(0, &a), (1, &a)], &[2]),
        Err(CodecError::NotEnoughShards { have: 2, need: 3 })
    );
    assert_eq!(
        codec.reconstruct(&[(0, &a), (1, &a), (0, &a), (2, &a)], &[2]),
        Err(CodecError::DuplicateShard { index: 0 })
    );
    assert_eq!(
        codec.reconstruct(&[(0, &a), (1, &a), (5, &a)], &[2]),
        Err(CodecError::IndexOutOfRange { index: 5, k, m })
    );
    assert_eq!(
        codec.reconstruct(&[(0, &a), (1, &a), (2, &a)], &[5]),
        Err(CodecError::IndexOutOfRange { index: 5, k, m })
    );
    assert_eq!(
        codec.reconstruct(&[(0, &a), (1, &short), (2, &a)], &[3]),
        Err(CodecError::LengthMismatch {
            expected: 8,
            got: 7
        })
    );
    let mut o1 = vec![0u8; 8];
    let mut o2 = vec![0u8; 7];
    assert_eq!(
        codec.reconstruct_into(&[(0, &a), (1, &a), (2, &a)], &[3, 4], &mut [&mut o1]),
        Err(CodecError::WrongShardCount {
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        codec.reconstruct_into(
            &[(0, &a), (1, &a), (2, &a)],
            &[3, 4],
            &mut [&mut o1, &mut o2]
        ),
        Err(CodecError::LengthMismatch {
            expected: 8,
            got: 7
        })
    );
    // No wanted positions: fine, nothing to do.
    assert_eq!(
        codec.reconstruct(&[(4, &a), (1, &a), (2, &a)], &[]),
        Ok(vec![])
    );
}

#[test]
fn encode_and_verify_errors() {
    let codec = Codec::new(Coefficients::default_for(3, 2).unwrap());
    let a = vec![1u8; 8];
    let b = vec![1u8; 9];
    let mut p0 = vec![0u8; 8];
    let mut p1 = vec![0u8; 8];
    assert_eq!(
        codec.encode(&[&a, &a], &mut [&mut p0, &mut p1]),
        Err(CodecError::WrongShardCount {
            expected: 3,
            got: 2
        })
    );
    assert_eq!(
        codec.encode(&[&a, &a, &a], &mut [&mut p0]),
        Err(CodecError::WrongShardCount {
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        codec.encode(&[&a, &b, &a], &mut [&mut p0, &mut p1]),
        Err(CodecError::LengthMismatch {
            expected: 8,
            got: 9
        })
    );
    let mut p9 = vec![0u8; 9];
    assert_eq!(
        codec.encode(&[&a, &a, &a], &mut [&mut p0, &mut p9]),
        Err(CodecError::LengthMismatch {
            expected: 8,
            got: 9
        })
    );
    // verify detects a single flipped bit anywhere.
    let mut rng = Rng(11);
    let data: Vec<Vec<u8>> = (0..3).map(|_| rng.bytes(10_000)).collect();
    let mut parity = encode_vecs(&codec, &data);
    let drefs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    for (j, at) in [(0usize, 0usize), (1, 9_999), (1, 4_096), (0, 5_000)] {
        parity[j][at] ^= 0x10;
        let prefs: Vec<&[u8]> = parity.iter().map(Vec::as_slice).collect();
        assert!(!codec.verify(&drefs, &prefs).unwrap());
        parity[j][at] ^= 0x10;
    }
    let prefs: Vec<&[u8]> = parity.iter().map(Vec::as_slice).collect();
    assert!(codec.verify(&drefs, &prefs).unwrap());
    assert_eq!(
        codec.verify(&drefs, &prefs[..1]),
        Err(CodecError::WrongShardCount {
            expected: 2,
            got: 1
        })
    );
}

// ---------------------------------------------------------------------------------------------
// The library traps.
// ---------------------------------------------------------------------------------------------

/// Our default table, used by our encoder, must produce exactly the library's parity (this
/// fails if the column extraction forgets to zero the buffers between calls).
#[test]
fn default_table_encodes_like_the_library() {
    use reed_solomon_erasure::galois_8::ReedSolomon;
    let mut rng = Rng(42);
    for (k, m) in [
        (1, 1),
        (2, 1),
        (2, 2),
        (3, 2),
        (4, 2),
        (6, 3),
        (8, 4),
        (10, 4),
        (12, 3),
        (16, 4),
        (20, 10),
        (200, 55),
    ] {
        let codec = Codec::new(Coefficients::default_for(k, m).unwrap());
        let rs = ReedSolomon::new(k, m).unwrap();
        for len in [1usize, 17, 1000, 65_536 + 3] {
            if k * len > 4_000_000 {
                continue;
            }
            let data: Vec<Vec<u8>> = (0..k).map(|_| rng.bytes(len)).collect();
            let ours = encode_vecs(&codec, &data);
            let mut theirs: Vec<Vec<u8>> = data.clone();
            theirs.extend((0..m).map(|_| vec![0u8; len]));
            rs.encode(&mut theirs).unwrap();
            assert_eq!(ours, theirs[k..], "k={k} m={m} len={len}");
        }
    }
}

#[test]
fn empty_slices_are_noops_and_mismatches_are_errors() {
    let codec = Codec::new(Coefficients::default_for(4, 2).unwrap());
    let mut empty: [u8; 0] = [];
    for c in [0u8, 1, 2, 0x8e, 255] {
        assert_eq!(Codec::mul_xor(c, &[], &mut empty), Ok(()));
    }
    assert_eq!(Codec::xor_into(&[], &mut empty), Ok(()));
    for j in 0..2 {
        for i in 0..4 {
            assert_eq!(codec.apply_parity_delta(j, i, &[], &mut empty), Ok(()));
        }
    }
    // Empty encode / verify / reconstruct.
    let e: &[u8] = &[];
    let mut p0: Vec<u8> = vec![];
    let mut p1: Vec<u8> = vec![];
    codec
        .encode(&[e, e, e, e], &mut [&mut p0, &mut p1])
        .unwrap();
    assert!(codec.verify(&[e, e, e, e], &[e, e]).unwrap());
    assert_eq!(
        codec
            .reconstruct(&[(5, e), (4, e), (1, e), (3, e)], &[0, 2, 5])
            .unwrap(),
        vec![Vec::<u8>::new(); 3]
    );

    // Mismatched lengths: errors, not panics (the SIMD kernels would assert).
    let mut out = vec![7u8; 5];
    let mismatch = CodecError::LengthMismatch {
        expected: 4,
        got: 5,
    };
    for c in [0u8, 1, 2, 255] {
        assert_eq!(
            Codec::mul_xor(c, &[1, 2, 3, 4], &mut out),
            Err(mismatch.clone())
        );
    }
    assert_eq!(
        Codec::xor_into(&[1, 2, 3, 4], &mut out),
        Err(mismatch.clone())
    );
    assert_eq!(
        codec.apply_parity_delta(0, 0, &[1, 2, 3, 4], &mut out),
        Err(mismatch)
    );
    assert_eq!(
        Codec::mul_xor(3, &[], &mut out),
        Err(CodecError::LengthMismatch {
            expected: 0,
            got: 5
        })
    );
    assert_eq!(out, vec![7u8; 5], "failed calls must not write");

    // Out-of-range indices.
    assert_eq!(
        codec.apply_parity_delta(0, 4, &[1], &mut [0]),
        Err(CodecError::IndexOutOfRange {
            index: 4,
            k: 4,
            m: 2
        })
    );
    assert_eq!(
        codec.apply_parity_delta(2, 0, &[1], &mut [0]),
        Err(CodecError::IndexOutOfRange {
            index: 6,
            k: 4,
            m: 2
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Coefficients.
// ---------------------------------------------------------------------------------------------

#[test]
fn from_rows_round_trips_defaults() {
    for k in 1..=16 {
        for m in 1..=6 {
            let c = Coefficients::default_for(k, m).unwrap();
            assert_eq!((c.k(), c.m()), (k, m));
            let again = Coefficients::from_rows(k, m, c.rows().to_vec()).unwrap();
            assert_eq!(c, again);
            for j in 0..m {
                for i in 0..k {
                    assert_eq!(c.get(j, i), c.rows()[j][i]);
                }
            }
        }
    }
}

#[test]
fn geometry_limits() {
    for (k, m) in [(0, 1), (1, 0), (0, 0), (200, 56), (255, 1), (1, 255)] {
        assert_eq!(
            Coefficients::default_for(k, m),
            Err(CodecError::InvalidGeometry { k, m })
        );
        assert_eq!(
            Coefficients::from_rows(k, m, vec![]),
            Err(CodecError::InvalidGeometry { k, m })
        );
    }
    assert!(Coefficients::default_for(254, 1).is_ok());
    assert!(Coefficients::default_for(1, 254).is_ok());
    assert_eq!(MAX_SHARDS, 255);
}

#[test]
fn from_rows_rejects_wrong_shape() {
    let good = Coefficients::default_for(4, 2).unwrap().rows().to_vec();
    assert_eq!(
        Coefficients::from_rows(4, 2, good[..1].to_vec()),
        Err(CodecError::TableShape {
            rows: 1,
            cols: 4,
            k: 4,
            m: 2
        })
    );
    assert_eq!(
        Coefficients::from_rows(4, 2, vec![]),
        Err(CodecError::TableShape {
            rows: 0,
            cols: 0,
            k: 4,
            m: 2
        })
    );
    let mut bad = good.clone();
    bad[1].push(9);
    assert_eq!(
        Coefficients::from_rows(4, 2, bad),
        Err(CodecError::TableShape {
            rows: 2,
            cols: 5,
            k: 4,
            m: 2
        })
    );
    assert!(matches!(
        Coefficients::from_rows(3, 2, good),
        Err(CodecError::TableShape { .. })
    ));
}

#[test]
fn from_rows_rejects_non_mds() {
    // Two identical parity rows: losing data 0 and 1 leaves them dependent.
    let rows = vec![vec![1, 2, 3, 4], vec![1, 2, 3, 4]];
    assert_eq!(
        Coefficients::from_rows(4, 2, rows),
        Err(CodecError::NotMds {
            rows: vec![2, 3, 4, 5]
        })
    );
    // A zero coefficient: parity 1 does not cover data 2.
    let rows = vec![vec![1, 1, 1, 1], vec![1, 2, 0, 4]];
    assert_eq!(
        Coefficients::from_rows(4, 2, rows),
        Err(CodecError::NotMds {
            rows: vec![0, 1, 3, 5]
        })
    );
    // A zero row.
    assert!(matches!(
        Coefficients::from_rows(3, 1, vec![vec![0, 0, 0]]),
        Err(CodecError::NotMds { .. })
    ));
    // Proportional rows (all 2x2 minors zero).
    let rows = vec![vec![1, 2, 3], vec![gmul(5, 1), gmul(5, 2), gmul(5, 3)]];
    assert!(matches!(
        Coefficients::from_rows(3, 2, rows),
        Err(CodecError::NotMds { .. })
    ));
}

/// A 3x3 table whose entries and 2x2 minors are all non-zero but whose determinant is zero:
/// only the order-3 check (exhaustive for k = m = 3) can catch it.
#[test]
fn from_rows_rejects_order_3_dependence() {
    let mut rng = Rng(5);
    let mut found = 0;
    for _ in 0..200_000 {
        let rows: Vec<Vec<u8>> = (0..3).map(|_| rng.bytes(3)).collect();
        if rows.iter().flatten().any(|&c| c == 0) {
            continue;
        }
        let mut minors_ok = true;
        for p in [(0, 1), (0, 2), (1, 2)] {
            for e in [(0, 1), (0, 2), (1, 2)] {
                let sub = vec![
                    vec![rows[p.0][e.0], rows[p.0][e.1]],
                    vec![rows[p.1][e.0], rows[p.1][e.1]],
                ];
                minors_ok &= !naive_singular(sub);
            }
        }
        let full_singular = naive_singular(rows.clone());
        let result = Coefficients::from_rows(3, 3, rows.clone());
        if minors_ok && !full_singular {
            assert!(result.is_ok(), "{rows:?}");
        }
        if minors_ok && full_singular {
            assert_eq!(
                result,
                Err(CodecError::NotMds {
                    rows: vec![3, 4, 5]
                })
            );
            found += 1;
            if found == 5 {
                return;
            }
        }
    }
    panic!("found only {found} order-3-singular tables");
}

/// Random tables for small geometries: `from_rows` accepts exactly the tables for which every
/// choice of k rows of [I; C] is invertible (checked naively, as k x k matrices).
#[test]
fn from_rows_agrees_with_naive_exhaustive_check() {
    let mut rng = Rng(77);
    for (k, m) in [(2, 2), (3, 2), (2, 3), (3, 3), (4, 3)] {
        let n = k + m;
        for _ in 0..300 {
            // Small alphabet so that singular cases are common.
            let rows: Vec<Vec<u8>> = (0..m)
                .map(|_| (0..k).map(|_| [1u8, 2, 3][rng.below(3)]).collect())
                .collect();
            let mut expect_ok = true;
            for mask in 0u32..(1 << n) {
                if mask.count_ones() as usize != k {
                    continue;
                }
                let sub: Vec<Vec<u8>> = (0..n)
                    .filter(|p| mask & (1 << p) != 0)
                    .map(|p| {
                        if p < k {
                            (0..k).map(|i| u8::from(i == p)).collect()
                        } else {
                            rows[p - k].clone()
                        }
                    })
                    .collect();
                if naive_singular(sub) {
                    expect_ok = false;
                }
            }
            let got = Coefficients::from_rows(k, m, rows.clone());
            assert_eq!(got.is_ok(), expect_ok, "k={k} m={m} {rows:?} {got:?}");
            if let Err(CodecError::NotMds { rows: bad }) = got {
                // The reported rows really are dependent.
                assert_eq!(bad.len(), k);
                let sub: Vec<Vec<u8>> = bad
                    .iter()
                    .map(|&p| {
                        if p < k {
                            (0..k).map(|i| u8::from(i == p)).collect()
                        } else {
                            rows[p - k].clone()
                        }
                    })
                    .collect();
                assert!(naive_singular(sub));
            }
        }
    }
}

/// Pinned default tables: a library upgrade that changed its matrix would change the meaning of
/// every stored volume created with the defaults, so it must fail here.
#[test]
fn pinned_default_tables() {
    assert_eq!(
        Coefficients::default_for(4, 2).unwrap().rows(),
        &[vec![27u8, 28, 18, 20], vec![28, 27, 20, 18]][..]
    );
    assert_eq!(
        Coefficients::default_for(2, 1).unwrap().rows(),
        &[vec![3u8, 2]][..]
    );
    assert_eq!(
        Coefficients::default_for(3, 3).unwrap().rows(),
        &[vec![1u8, 1, 1], vec![15, 8, 6], vec![14, 9, 6]][..]
    );
}
