//! Small dense GF(2^8) matrices stored row-major in a flat `Vec<u8>`: Gauss-Jordan inversion
//! and a singularity test. Sizes are at most 255 x 255, so everything here is scalar code.

use crate::gf;

/// Inverts the `n x n` matrix `a` (row-major, `a.len() == n * n`) by Gauss-Jordan elimination.
/// Returns `None` if it is singular. `a` is used as scratch.
pub(crate) fn invert(n: usize, a: &mut [u8]) -> Option<Vec<u8>> {
    debug_assert_eq!(a.len(), n * n);
    let mut inv = vec![0u8; n * n];
    for i in 0..n {
        inv[i * n + i] = 1;
    }
    for col in 0..n {
        // Find a pivot at or below the diagonal.
        let pivot = (col..n).find(|&r| a[r * n + col] != 0)?;
        if pivot != col {
            swap_rows(a, n, pivot, col);
            swap_rows(&mut inv, n, pivot, col);
        }
        // Scale the pivot row to make the pivot 1.
        let scale = gf::inv(a[col * n + col])?;
        if scale != 1 {
            for x in &mut a[col * n..(col + 1) * n] {
                *x = gf::mul(*x, scale);
            }
            for x in &mut inv[col * n..(col + 1) * n] {
                *x = gf::mul(*x, scale);
            }
        }
        // Eliminate the column from every other row.
        for r in 0..n {
            if r == col {
                continue;
            }
            let f = a[r * n + col];
            if f == 0 {
                continue;
            }
            for c in 0..n {
                let p = a[col * n + c];
                a[r * n + c] ^= gf::mul(f, p);
                let q = inv[col * n + c];
                inv[r * n + c] ^= gf::mul(f, q);
            }
        }
    }
    Some(inv)
}

/// True iff the `n x n` matrix `a` (row-major) is singular. `a` is used as scratch.
pub(crate) fn is_singular(n: usize, a: &mut [u8]) -> bool {
    debug_assert_eq!(a.len(), n * n);
    for col in 0..n {
        let Some(pivot) = (col..n).find(|&r| a[r * n + col] != 0) else {
            return true;
        };
        if pivot != col {
            swap_rows(a, n, pivot, col);
        }
        let Some(scale) = gf::inv(a[col * n + col]) else {
            return true;
        };
        for r in col + 1..n {
            let f = a[r * n + col];
            if f == 0 {
                continue;
            }
            let f = gf::mul(f, scale);
            for c in col..n {
                let p = a[col * n + c];
                a[r * n + c] ^= gf::mul(f, p);
            }
        }
    }
    false
}

fn swap_rows(a: &mut [u8], n: usize, r1: usize, r2: usize) {
    if r1 == r2 {
        return;
    }
    let (lo, hi) = if r1 < r2 { (r1, r2) } else { (r2, r1) };
    let (head, tail) = a.split_at_mut(hi * n);
    head[lo * n..(lo + 1) * n].swap_with_slice(&mut tail[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mat_mul(n: usize, a: &[u8], b: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; n * n];
        for i in 0..n {
            for j in 0..n {
                let mut s = 0u8;
                for t in 0..n {
                    s ^= gf::mul(a[i * n + t], b[t * n + j]);
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    #[test]
    fn invert_roundtrip_and_singular() {
        // A Vandermonde matrix on distinct points is invertible.
        for n in 1..=12usize {
            let mut a = vec![0u8; n * n];
            for r in 0..n {
                let mut v = 1u8;
                for c in 0..n {
                    a[r * n + c] = v;
                    v = gf::mul(v, (r + 1) as u8);
                }
            }
            let orig = a.clone();
            assert!(!is_singular(n, &mut a.clone()));
            let inv = invert(n, &mut a).unwrap();
            let id = mat_mul(n, &orig, &inv);
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(id[i * n + j], u8::from(i == j));
                }
            }
        }
        // Two equal rows: singular.
        let mut s = vec![3, 7, 9, 3, 7, 9, 1, 2, 4];
        assert!(is_singular(3, &mut s.clone()));
        assert!(invert(3, &mut s).is_none());
        // A zero row: singular.
        let mut z = vec![0, 0, 1, 5];
        assert!(is_singular(2, &mut z.clone()));
        assert!(invert(2, &mut z).is_none());
    }
}
