//! GF(2^8) arithmetic (polynomial x^8 + x^4 + x^3 + x^2 + 1 = 0x11d, the one
//! `reed-solomon-erasure` 6.0.0 generates its tables from).
//!
//! Scalar operations go through the library's public table functions; slice kernels wrap the
//! library's SIMD `mul_slice` / `mul_slice_xor` so that they never panic: empty slices are a
//! no-op, unequal lengths are an error, and the coefficients 0 and 1 take their own fast paths
//! (skip / plain XOR or copy).

use reed_solomon_erasure::galois_8;

use crate::CodecError;

/// `a * b` in GF(2^8).
#[inline]
pub(crate) fn mul(a: u8, b: u8) -> u8 {
    galois_8::mul(a, b)
}

/// Multiplicative inverse of a non-zero element; `None` for zero.
#[inline]
pub(crate) fn inv(a: u8) -> Option<u8> {
    if a == 0 {
        None
    } else {
        Some(galois_8::div(1, a))
    }
}

/// Errors unless `input` and `out` have equal lengths.
#[inline]
pub(crate) fn check_len(input: &[u8], out: &[u8]) -> Result<(), CodecError> {
    if input.len() == out.len() {
        Ok(())
    } else {
        Err(CodecError::LengthMismatch {
            expected: input.len(),
            got: out.len(),
        })
    }
}

/// Width of the blocks the XOR loop works on; a multiple of every vector width, so that the
/// inner loop compiles to straight SIMD loads/xors/stores.
const XOR_BLOCK: usize = 64;

/// `out ^= input`, lengths already checked equal.
#[inline]
pub(crate) fn xor_unchecked(input: &[u8], out: &mut [u8]) {
    let mut out_blocks = out.chunks_exact_mut(XOR_BLOCK);
    let mut in_blocks = input.chunks_exact(XOR_BLOCK);
    for (o, i) in (&mut out_blocks).zip(&mut in_blocks) {
        for (ob, ib) in o.iter_mut().zip(i) {
            *ob ^= *ib;
        }
    }
    for (ob, ib) in out_blocks
        .into_remainder()
        .iter_mut()
        .zip(in_blocks.remainder())
    {
        *ob ^= *ib;
    }
}

/// `out = c * input`, lengths already checked equal.
#[inline]
pub(crate) fn mul_slice_unchecked(c: u8, input: &[u8], out: &mut [u8]) {
    if input.is_empty() {
        return;
    }
    match c {
        0 => out.fill(0),
        1 => out.copy_from_slice(input),
        _ => galois_8::mul_slice(c, input, out),
    }
}

/// `out ^= c * input`, lengths already checked equal.
#[inline]
pub(crate) fn mul_slice_xor_unchecked(c: u8, input: &[u8], out: &mut [u8]) {
    if input.is_empty() {
        return;
    }
    match c {
        0 => {}
        1 => xor_unchecked(input, out),
        _ => galois_8::mul_slice_xor(c, input, out),
    }
}

/// `out ^= c * input`; empty slices are a no-op, unequal lengths an error.
pub(crate) fn mul_slice_xor(c: u8, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    check_len(input, out)?;
    mul_slice_xor_unchecked(c, input, out);
    Ok(())
}

/// `out ^= input`; empty slices are a no-op, unequal lengths an error.
pub(crate) fn xor(input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    check_len(input, out)?;
    xor_unchecked(input, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_all_lengths() {
        for len in 0..200 {
            let a: Vec<u8> = (0..len).map(|x| (x * 7 + 3) as u8).collect();
            let mut b: Vec<u8> = (0..len).map(|x| (x * 13 + 1) as u8).collect();
            let expect: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x ^ y).collect();
            xor(&a, &mut b).unwrap();
            assert_eq!(b, expect);
        }
    }

    #[test]
    fn inverse_is_inverse() {
        assert_eq!(inv(0), None);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a).unwrap()), 1);
        }
    }
}
