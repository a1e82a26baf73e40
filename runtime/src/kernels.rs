//! Float dot-product kernels used by the matrix-vector products.
//!
//! These are the portable scalar references: written so the compiler can
//! auto-vectorize them (16 independent accumulators) but without any
//! instruction-set-specific code. The quantized-weight kernels and their
//! AVX2 / AVX-512 / NEON versions (each beside its scalar reference, picked
//! once at load) belong to the SIMD work and will share this module's shape.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

const LANES: usize = 16;

/// Σ a[i]·b[i] in f32 with 16 independent partial sums.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction of the partial sums.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// Σ w[i]·x[i] with f16 weights, converted in 64-element tiles on the stack.
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut tile = [0f32; 64];
    let mut sum = 0f32;
    for (wc, xc) in w.chunks(64).zip(x.chunks(64)) {
        let t = &mut tile[..wc.len()];
        wc.convert_to_f32_slice(t);
        sum += dot_f32(t, xc);
    }
    sum
}

/// Σ w[i]·x[i] with bf16 weights.
pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut tile = [0f32; 64];
    let mut sum = 0f32;
    for (wc, xc) in w.chunks(64).zip(x.chunks(64)) {
        let t = &mut tile[..wc.len()];
        for (o, v) in t.iter_mut().zip(wc) {
            *o = v.to_f32();
        }
        sum += dot_f32(t, xc);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn dot_kernels_match_f64_reference_on_ragged_lengths() {
        let mut seed = 7;
        for n in [0usize, 1, 7, 15, 16, 17, 63, 64, 65, 172, 576, 1000] {
            let a: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let r = reference(&a, &b);
            let tol = 1e-5 * (n as f64).max(1.0);
            assert!((f64::from(dot_f32(&a, &b)) - r).abs() < tol, "f32 n={n}");
            let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let a16f: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            let r16 = reference(&a16f, &b);
            assert!(
                (f64::from(dot_f16(&a16, &b)) - r16).abs() < tol,
                "f16 n={n}"
            );
            let abf: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let abff: Vec<f32> = abf.iter().map(|v| v.to_f32()).collect();
            let rbf = reference(&abff, &b);
            assert!(
                (f64::from(dot_bf16(&abf, &b)) - rbf).abs() < tol,
                "bf16 n={n}"
            );
        }
    }
}
