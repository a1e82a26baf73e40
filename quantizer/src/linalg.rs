//! Dense symmetric positive-definite helpers in f64 for the Hessians of
//! GPTQ (n = a layer's input width, at most a few thousand): Cholesky, the
//! inverse of a triangular factor, the inverse from a Cholesky factor, and
//! the upper factor of that inverse. Row-major `n × n` matrices.
//!
//! Why blocked: the textbook loops cost n³/3 scalar multiply-adds that the
//! compiler cannot vectorise (a sum of products is not reassociated), about
//! a second for SmolLM2's 1536-wide down projection, thirty times per model.
//! The blocked forms do the same arithmetic in panels of [`BLOCK`] columns:
//! the small diagonal blocks go through the textbook loops (kept below as
//! the `*_unblocked` references the tests compare against) and everything
//! else through `gemm`, which is ~20× faster.

use nibble_runtime::kernels::matmul_f64;

/// Panel width of the blocked factorizations.
pub const BLOCK: usize = 64;

/// Lower Cholesky factor of the `b × b` block at the start of `a` (row
/// stride `rs`), in place; reads only the lower triangle. `false` if the
/// block is not (numerically) positive definite.
fn cholesky_unblocked_strided(a: &mut [f64], b: usize, rs: usize) -> bool {
    for j in 0..b {
        let d = a[j * rs + j] - a[j * rs..j * rs + j].iter().map(|v| v * v).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return false;
        }
        let d = d.sqrt();
        a[j * rs + j] = d;
        for i in j + 1..b {
            let (head, tail) = a.split_at_mut(i * rs);
            let rj = &head[j * rs..j * rs + j];
            let ri = &mut tail[..j + 1];
            let s: f64 = ri[..j].iter().zip(rj).map(|(x, y)| x * y).sum();
            ri[j] = (ri[j] - s) / d;
        }
    }
    true
}

/// Zero the strict upper triangle of the row-major `n × n` matrix `a`.
fn zero_upper(a: &mut [f64], n: usize) {
    for j in 0..n {
        a[j * n + j + 1..(j + 1) * n].fill(0.0);
    }
}

/// The textbook Cholesky (reference for [`cholesky_lower`]): lower factor
/// L (A = L·Lᵀ) in place of `a`, upper triangle zeroed; `false` if A is not
/// (numerically) positive definite.
pub fn cholesky_lower_unblocked(a: &mut [f64], n: usize) -> bool {
    if !cholesky_unblocked_strided(a, n, n) {
        return false;
    }
    zero_upper(a, n);
    true
}

/// Lower Cholesky factor L (A = L·Lᵀ) in place of `a`; `false` if A is not
/// (numerically) positive definite. Reads the lower triangle; the upper
/// triangle is zeroed. Right-looking blocked form: factor a diagonal block,
/// solve the panel below it with the block's inverse, update the lower
/// triangle of the trailing matrix with one product per column block.
pub fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    assert_eq!(a.len(), n * n, "cholesky_lower: a is not n × n");
    let mut panel = Vec::new();
    for k0 in (0..n).step_by(BLOCK) {
        let k1 = (k0 + BLOCK).min(n);
        let b = k1 - k0;
        if !cholesky_unblocked_strided(&mut a[k0 * n + k0..], b, n) {
            return false;
        }
        if k1 == n {
            break;
        }
        // L21 = A21 · L11⁻ᵀ.
        let l11_inv = lower_inverse_unblocked_strided(&a[k0 * n + k0..], b, n);
        let m = n - k1;
        panel.clear();
        panel.resize(m * b, 0.0);
        matmul_f64(
            (&mut panel, m, b, b, 1),
            (&a[k1 * n + k0..], m, b, n, 1),
            (&l11_inv, b, b, 1, b),
            1.0,
            false,
            1,
        );
        for (i, row) in panel.chunks_exact(b).enumerate() {
            a[(k1 + i) * n + k0..(k1 + i) * n + k1].copy_from_slice(row);
        }
        // A22 −= L21·L21ᵀ, lower triangle (and the diagonal blocks) only.
        for j0 in (k1..n).step_by(BLOCK) {
            let j1 = (j0 + BLOCK).min(n);
            let lhs = &panel[(j0 - k1) * b..];
            matmul_f64(
                (&mut a[j0 * n + j0..], n - j0, j1 - j0, n, 1),
                (lhs, n - j0, b, b, 1),
                (lhs, b, j1 - j0, 1, b),
                -1.0,
                true,
                1,
            );
        }
    }
    zero_upper(a, n);
    true
}

/// L⁻¹ (row-major `b × b`) of the lower-triangular `b × b` block at the
/// start of `l` (row stride `rs`), by forward substitution, one column at a
/// time.
fn lower_inverse_unblocked_strided(l: &[f64], b: usize, rs: usize) -> Vec<f64> {
    // Column c of L⁻¹, built in `col`: X[i][c] = −(Σ_{k=c}^{i−1} L[i][k]·X[k][c]) / L[i][i].
    let mut x = vec![0f64; b * b];
    let mut col = vec![0f64; b];
    for c in 0..b {
        col[c] = 1.0 / l[c * rs + c];
        for i in c + 1..b {
            let li = &l[i * rs + c..i * rs + i];
            let s: f64 = li.iter().zip(&col[c..i]).map(|(p, q)| p * q).sum();
            col[i] = -s / l[i * rs + i];
        }
        for i in c..b {
            x[i * b + c] = col[i];
        }
    }
    x
}

/// The textbook inverse of a lower-triangular `n × n` L (reference for
/// [`lower_inverse`]), row-major.
pub fn lower_inverse_unblocked(l: &[f64], n: usize) -> Vec<f64> {
    lower_inverse_unblocked_strided(l, n, n)
}

/// The inverse X = L⁻¹ of a lower-triangular `n × n` L (nonzero diagonal),
/// row-major. Blocked by rows: `X[I,I] = L[I,I]⁻¹` and
/// `X[I, :I] = −L[I,I]⁻¹ · (L[I, :I] · X[:I, :I])`.
pub fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(l.len(), n * n, "lower_inverse: l is not n × n");
    let mut x = vec![0f64; n * n];
    let mut tmp = Vec::new();
    for i0 in (0..n).step_by(BLOCK) {
        let i1 = (i0 + BLOCK).min(n);
        let b = i1 - i0;
        let inv_ii = lower_inverse_unblocked_strided(&l[i0 * n + i0..], b, n);
        for (r, row) in inv_ii.chunks_exact(b).enumerate() {
            x[(i0 + r) * n + i0..(i0 + r) * n + i1].copy_from_slice(row);
        }
        if i0 == 0 {
            continue;
        }
        let (done, rows) = x.split_at_mut(i0 * n);
        tmp.clear();
        tmp.resize(b * i0, 0.0);
        matmul_f64(
            (&mut tmp, b, i0, i0, 1),
            (&l[i0 * n..], b, i0, n, 1),
            (done, i0, i0, n, 1),
            1.0,
            false,
            1,
        );
        matmul_f64(
            (rows, b, i0, n, 1),
            (&inv_ii, b, b, b, 1),
            (&tmp, b, i0, i0, 1),
            -1.0,
            false,
            1,
        );
    }
    x
}

/// The upper Cholesky factor U of A⁻¹ (A⁻¹ = Uᵀ·U) for SPD `a`, without
/// forming A⁻¹: with J the exchange matrix and J·A·J = L·Lᵀ, A = R·Rᵀ for the
/// upper-triangular R = J·L·J, so A⁻¹ = (R⁻¹)ᵀ·R⁻¹ and U = R⁻¹ = J·L⁻¹·J.
/// One Cholesky and one triangular inverse. None if A is not positive definite.
pub fn upper_factor_of_inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut p: Vec<f64> = (0..n * n)
        .map(|k| a[(n - 1 - k / n) * n + (n - 1 - k % n)])
        .collect();
    if !cholesky_lower(&mut p, n) {
        return None;
    }
    let x = lower_inverse(&p, n);
    // U[i][j] = L⁻¹[n−1−i][n−1−j].
    Some((0..n * n).map(|k| x[n * n - 1 - k]).collect())
}

/// A⁻¹ from its lower Cholesky factor L: A⁻¹ = L⁻ᵀ·L⁻¹ (torch.cholesky_inverse).
pub fn cholesky_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let x = lower_inverse(l, n);
    let mut inv = vec![0f64; n * n];
    matmul_f64(
        (&mut inv, n, n, n, 1),
        (&x, n, n, 1, n),
        (&x, n, n, n, 1),
        1.0,
        false,
        1,
    );
    inv
}

/// Upper Cholesky factor U of a SPD matrix (A = Uᵀ·U), or None.
pub fn cholesky_upper(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = a.to_vec();
    if !cholesky_lower(&mut l, n) {
        return None;
    }
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = l[i * n + j];
        }
    }
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_and_inverse_are_consistent() {
        let n = 7;
        // A = B·Bᵀ + n·I is SPD.
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.5)
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>()
                    + if i == j { n as f64 } else { 0.0 };
            }
        }
        let mut l = a.clone();
        assert!(cholesky_lower(&mut l, n));
        let inv = cholesky_inverse(&l, n);
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|k| a[i * n + k] * inv[k * n + j]).sum();
                assert!((p - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
        let u = cholesky_upper(&inv, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
                assert!((p - inv[i * n + j]).abs() < 1e-12);
                if j < i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
        }
        // The direct route gives the same factor as inverse-then-Cholesky.
        let direct = upper_factor_of_inverse(&a, n).unwrap();
        for (x, y) in direct.iter().zip(&u) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        let mut not_pd = vec![1.0, 2.0, 2.0, 1.0];
        assert!(!cholesky_lower(&mut not_pd, 2));
    }

    /// A seeded SPD matrix B·Bᵀ/k + δ·I with a wide spread of diagonal values.
    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let k = n / 2 + 3;
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let b: Vec<f64> = (0..n * k)
            .map(|i| next() * (1.0 + (i / k % 7) as f64))
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let s: f64 = (0..k).map(|c| b[i * k + c] * b[j * k + c]).sum::<f64>() / k as f64;
                a[i * n + j] = s;
                a[j * n + i] = s;
            }
            a[i * n + i] += 1e-3;
        }
        a
    }

    fn max_rel_diff(x: &[f64], y: &[f64]) -> f64 {
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs()));
        x.iter()
            .zip(y)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs() / scale))
    }

    /// Blocked and textbook forms agree to rounding on sizes below, at and
    /// across the panel width (ragged last panels included).
    #[test]
    fn blocked_forms_equal_the_textbook_ones() {
        for (n, seed) in [
            (1, 1),
            (5, 2),
            (BLOCK, 3),
            (BLOCK + 1, 4),
            (2 * BLOCK + 37, 5),
            (300, 6),
        ] {
            let a = spd(n, seed);
            let mut l = a.clone();
            let mut l_ref = a.clone();
            assert!(cholesky_lower(&mut l, n), "n={n}");
            assert!(cholesky_lower_unblocked(&mut l_ref, n), "n={n}");
            let d = max_rel_diff(&l, &l_ref);
            assert!(d < 1e-12, "cholesky n={n}: {d:e}");
            for i in 0..n {
                assert!(l[i * n + i + 1..(i + 1) * n].iter().all(|&v| v == 0.0));
            }
            let x = lower_inverse(&l_ref, n);
            let x_ref = lower_inverse_unblocked(&l_ref, n);
            let d = max_rel_diff(&x, &x_ref);
            assert!(d < 1e-10, "inverse n={n}: {d:e}");
            // L·L⁻¹ = I.
            for i in 0..n {
                for j in 0..n {
                    let p: f64 = (0..n).map(|k| l_ref[i * n + k] * x[k * n + j]).sum();
                    let want = f64::from(u8::from(i == j));
                    assert!((p - want).abs() < 1e-9, "n={n} ({i},{j}): {p}");
                }
            }
        }
    }

    /// A matrix that stops being positive definite only in a late panel is
    /// refused by the blocked form too.
    #[test]
    fn blocked_cholesky_refuses_a_late_non_pd_pivot() {
        let n = 2 * BLOCK + 10;
        let mut a = spd(n, 9);
        let last = n - 3;
        a[last * n + last] = -1.0;
        assert!(!cholesky_lower(&mut a.clone(), n));
        assert!(!cholesky_lower_unblocked(&mut a, n));
    }
}
