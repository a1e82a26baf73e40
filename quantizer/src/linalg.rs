//! Dense symmetric positive-definite helpers in f64 for the Hessians of
//! GPTQ (n = a layer's input width, at most a few thousand): Cholesky, the
//! inverse from a Cholesky factor, and the upper factor of that inverse.
//! Row-major `n × n` matrices.

/// Lower Cholesky factor L (A = L·Lᵀ) in place of `a`; `false` if A is not
/// (numerically) positive definite. The upper triangle is zeroed.
pub fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let d = a[j * n + j] - a[j * n..j * n + j].iter().map(|v| v * v).sum::<f64>();
        if !(d > 0.0 && d.is_finite()) {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let (head, tail) = a.split_at_mut(i * n);
            let rj = &head[j * n..j * n + j];
            let ri = &mut tail[..n];
            let s: f64 = ri[..j].iter().zip(rj).map(|(x, y)| x * y).sum();
            ri[j] = (ri[j] - s) / d;
        }
        for k in j + 1..n {
            a[j * n + k] = 0.0;
        }
    }
    true
}

/// The inverse of a lower-triangular L, transposed: `mt[c][k]` = L⁻¹[k][c]
/// (so that every inner loop runs over contiguous memory).
fn lower_inverse_transposed(l: &[f64], n: usize) -> Vec<f64> {
    // Forward substitution, one column c of L⁻¹ at a time, stored as row c of mt:
    // L⁻¹[i][c] = −(Σ_{k=c}^{i−1} L[i][k]·L⁻¹[k][c]) / L[i][i].
    let mut mt = vec![0f64; n * n];
    for c in 0..n {
        let row = &mut mt[c * n..(c + 1) * n];
        row[c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let li = &l[i * n + c..i * n + i];
            let s: f64 = li.iter().zip(&row[c..i]).map(|(a, b)| a * b).sum();
            row[i] = -s / l[i * n + i];
        }
    }
    mt
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
    let mt = lower_inverse_transposed(&p, n);
    // U[i][j] = L⁻¹[n−1−i][n−1−j] = mt[n−1−j][n−1−i].
    Some(
        (0..n * n)
            .map(|k| mt[(n - 1 - k % n) * n + (n - 1 - k / n)])
            .collect(),
    )
}

/// A⁻¹ from its lower Cholesky factor L: A⁻¹ = L⁻ᵀ·L⁻¹ (torch.cholesky_inverse).
pub fn cholesky_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mt = lower_inverse_transposed(l, n);
    // A⁻¹[i][j] = Σ_{k ≥ max(i,j)} L⁻¹[k][i]·L⁻¹[k][j] = Σ_k mt[i][k]·mt[j][k].
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = mt[i * n + i..(i + 1) * n]
                .iter()
                .zip(&mt[j * n + i..(j + 1) * n])
                .map(|(a, b)| a * b)
                .sum();
            inv[i * n + j] = s;
            inv[j * n + i] = s;
        }
    }
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
}
