//! Row 1: encoding stripes in memory against copying the same data bytes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::Context;
use drs_codec::{Codec, Coefficients};
use rand::RngCore;

/// Results of the in-memory phase (best of the repetitions for each).
pub struct EncodeResult {
    /// Data bytes encoded per repetition.
    pub bytes: u64,
    pub encode: Duration,
    pub memcpy: Duration,
}

/// Encodes `total` data bytes (k data blocks of `bs` per stripe, cycling over a
/// working set of `working_set` bytes) with a k+m codec, and copies the same data
/// bytes stripe by stripe into a buffer of the working set's size. Each is timed
/// `reps` times; the best time of each is kept.
pub fn encode_vs_memcpy(
    k: usize,
    m: usize,
    bs: usize,
    working_set: usize,
    total: u64,
    reps: usize,
) -> anyhow::Result<EncodeResult> {
    let codec = Codec::new(Coefficients::default_for(k, m).context("coefficients")?);
    let stripe = k * bs;
    let stripes = (working_set / stripe).max(1);
    let mut src = vec![0u8; stripes * stripe];
    rand::thread_rng().fill_bytes(&mut src);
    // Touch every page of the outputs before timing.
    let mut parity = vec![1u8; stripes * m * bs];
    let mut dst = vec![1u8; stripes * stripe];
    let rounds = (total / stripe as u64).max(1);
    let bytes = rounds * stripe as u64;

    let mut best_encode = Duration::MAX;
    let mut best_copy = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        for r in 0..rounds {
            let s = (r % stripes as u64) as usize;
            let data: Vec<&[u8]> = src[s * stripe..(s + 1) * stripe].chunks(bs).collect();
            let mut out: Vec<&mut [u8]> = parity[s * m * bs..(s + 1) * m * bs]
                .chunks_mut(bs)
                .collect();
            codec.encode(&data, &mut out).context("encode")?;
        }
        black_box(&mut parity);
        best_encode = best_encode.min(t.elapsed());

        let t = Instant::now();
        for r in 0..rounds {
            let s = (r % stripes as u64) as usize;
            dst[s * stripe..(s + 1) * stripe].copy_from_slice(&src[s * stripe..(s + 1) * stripe]);
            black_box(&mut dst);
        }
        best_copy = best_copy.min(t.elapsed());
    }
    // The parity must be right for the timing to mean anything.
    let data: Vec<&[u8]> = src[..stripe].chunks(bs).collect();
    let out: Vec<&[u8]> = parity[..m * bs].chunks(bs).collect();
    if !codec.verify(&data, &out).context("verify")? {
        anyhow::bail!("encoded parity does not verify");
    }
    Ok(EncodeResult {
        bytes,
        encode: best_encode,
        memcpy: best_copy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_counts_whole_stripes() {
        let r = encode_vs_memcpy(4, 2, 4096, 3 * 4 * 4096, 10 * 4 * 4096 + 5, 1).unwrap();
        assert_eq!(r.bytes, 10 * 4 * 4096);
    }
}
