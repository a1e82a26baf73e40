//! Dense symmetric positive-definite helpers in f64 for the Hessians of
//! GPTQ (n = a layer's input width, at most a few thousand): Cholesky, the
//! inverse from a Cholesky factor, and the upper factor of that inverse.
//! Row-major `n × n` matrices.

/// Lower Cholesky factor L (A = L·Lᵀ) in place of `a`; `false` if A is not
/// (numerically) positive definite. The upper triangle is zeroed.
pub fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if !(d > 0.0 && d.is_finite()) {
            return false;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let (ri, rj) = (i * n, j * n);
            let mut s = a[ri + j];
            for k in 0..j {
                s -= a[ri + k] * a[rj + k];
            }
            a[ri + j] = s / d;
        }
        for k in j + 1..n {
            a[j * n + k] = 0.0;
        }
    }
    true
}

/// A⁻¹ from its lower Cholesky factor L: A⁻¹ = L⁻ᵀ·L⁻¹ (torch.cholesky_inverse).
pub fn cholesky_inverse(l: &[f64], n: usize) -> Vec<f64> {
    // M = L⁻¹ (lower triangular), by forward substitution column by column.
    let mut m = vec![0f64; n * n];
    for c in 0..n {
        m[c * n + c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let mut s = 0.0;
            for k in c..i {
                s += l[i * n + k] * m[k * n + c];
            }
            m[i * n + c] = -s / l[i * n + i];
        }
    }
    // A⁻¹[i][j] = Σ_k M[k][i]·M[k][j], k ≥ max(i, j).
    let mut inv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = 0.0;
            for k in i..n {
                s += m[k * n + i] * m[k * n + j];
            }
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
        let mut not_pd = vec![1.0, 2.0, 2.0, 1.0];
        assert!(!cholesky_lower(&mut not_pd, 2));
    }
}
