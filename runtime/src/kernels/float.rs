//! Float-weight matrix-vector products (F32, F16, BF16 weights; f32
//! activations): the scalar references and their AVX2 / NEON versions.
//!
//! Float models are not the fast path (packed integer groups are), but F16
//! weights are what `nibble convert` writes by default, so their dot product
//! converts with F16C / widening loads rather than element by element.
//!
//! Every kernel has the signature of [`FloatMatvecFn`]: `w` holds
//! `out.len()` rows of `cols` elements, row-major.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// `out[r] = Σ_c w[r·cols + c] · x[c]`.
pub type FloatMatvecFn<T> = fn(w: &[T], cols: usize, x: &[f32], out: &mut [f32]);

const LANES: usize = 16;

fn check<T>(w: &[T], cols: usize, x: &[f32], out: &[f32]) {
    assert_eq!(x.len(), cols, "float matvec: input length");
    assert_eq!(
        Some(w.len()),
        out.len().checked_mul(cols),
        "float matvec: weight size"
    );
}

/// `Σ a[i]·b[i]` in f32 with 16 independent partial sums (scalar reference).
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
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `Σ w[i]·x[i]` with f16 weights, converted in 64-element tiles on the stack.
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

/// `Σ w[i]·x[i]` with bf16 weights.
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

/// Scalar reference: F32 weights.
pub fn matvec_f32_scalar(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
    check(w, cols, x, out);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols.max(1))) {
        *o = dot_f32(row, x);
    }
}

/// Scalar reference: F16 weights.
pub fn matvec_f16_scalar(w: &[f16], cols: usize, x: &[f32], out: &mut [f32]) {
    check(w, cols, x, out);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols.max(1))) {
        *o = dot_f16(row, x);
    }
}

/// Scalar reference: BF16 weights (no SIMD version; BF16 is an import format).
pub fn matvec_bf16_scalar(w: &[bf16], cols: usize, x: &[f32], out: &mut [f32]) {
    check(w, cols, x, out);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(cols.max(1))) {
        *o = dot_bf16(row, x);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2+FMA: F32 weights. Only reachable through the kernel table built
    /// after `avx2` and `fma` were detected.
    pub fn matvec_f32_avx2(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
        check(w, cols, x, out);
        for (o, row) in out.iter_mut().zip(w.chunks_exact(cols.max(1))) {
            // SAFETY: the table holding this function is built only when
            // avx2+fma are present; `row` and `x` both have `cols` elements.
            *o = unsafe { dot_f32_avx2(row, x) };
        }
    }

    /// AVX2+FMA+F16C: F16 weights.
    pub fn matvec_f16_avx2(w: &[f16], cols: usize, x: &[f32], out: &mut [f32]) {
        check(w, cols, x, out);
        for (o, row) in out.iter_mut().zip(w.chunks_exact(cols.max(1))) {
            // SAFETY: as above, with f16c detected too.
            *o = unsafe { dot_f16_avx2(row, x) };
        }
    }

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let main = n / 32 * 32;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < main {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8k + 8 ≤ main ≤ n, inside both slices.
                let (va, vb) = unsafe {
                    (
                        _mm256_loadu_ps(pa.add(i + 8 * k)),
                        _mm256_loadu_ps(pb.add(i + 8 * k)),
                    )
                };
                *acc = _mm256_fmadd_ps(va, vb, *acc);
            }
            i += 32;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(s) + dot_f32(&a[main..n], &b[main..n])
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16_avx2(a: &[f16], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let main = n / 16 * 16;
        let (pa, pb) = (a.as_ptr() as *const __m128i, b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i < main {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: elements i + 8k .. i + 8k + 8 ≤ main lie inside
                // both slices; f16 is 2 bytes, so 8 of them are one __m128i.
                let (va, vb) = unsafe {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(pa.add((i + 8 * k) / 8))),
                        _mm256_loadu_ps(pb.add(i + 8 * k)),
                    )
                };
                *acc = _mm256_fmadd_ps(va, vb, *acc);
            }
            i += 16;
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) + dot_f16(&a[main..n], &b[main..n])
    }
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// NEON: F32 weights (NEON is part of the aarch64 baseline).
    pub fn matvec_f32_neon(w: &[f32], cols: usize, x: &[f32], out: &mut [f32]) {
        check(w, cols, x, out);
        for (o, row) in out.iter_mut().zip(w.chunks_exact(cols.max(1))) {
            // SAFETY: NEON is always present on aarch64; equal lengths.
            *o = unsafe { dot_f32_neon(row, x) };
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn dot_f32_neon(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let main = n / 16 * 16;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i < main {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: i + 4k + 4 ≤ main ≤ n.
                let (va, vb) =
                    unsafe { (vld1q_f32(pa.add(i + 4 * k)), vld1q_f32(pb.add(i + 4 * k))) };
                *acc = vfmaq_f32(*acc, va, vb);
            }
            i += 16;
        }
        let s = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        vaddvq_f32(s) + dot_f32(&a[main..n], &b[main..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{test_util::lcg, Isa, Kernels};

    fn reference(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    #[test]
    fn dot_references_match_f64_on_ragged_lengths() {
        let mut seed = 7;
        for n in [0usize, 1, 7, 15, 16, 17, 63, 64, 65, 172, 576, 1000] {
            let a: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let tol = 1e-5 * (n as f64).max(1.0);
            assert!((f64::from(dot_f32(&a, &b)) - reference(&a, &b)).abs() < tol);
            let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let a16f: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            assert!((f64::from(dot_f16(&a16, &b)) - reference(&a16f, &b)).abs() < tol);
            let abf: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let abff: Vec<f32> = abf.iter().map(|v| v.to_f32()).collect();
            assert!((f64::from(dot_bf16(&abf, &b)) - reference(&abff, &b)).abs() < tol);
        }
    }

    /// Every instruction set available here against the scalar reference,
    /// on ragged row lengths (SIMD tails) and all-zero rows.
    #[test]
    fn every_isa_matches_the_scalar_float_matvec() {
        // Relative to Σ|w·x| of the row: reassociation only.
        const TOL_F32: f32 = 1e-6;
        let mut seed = 5;
        for isa in Isa::available() {
            let k = Kernels::for_isa(isa).unwrap();
            for cols in [1usize, 7, 8, 15, 16, 17, 31, 33, 64, 172, 576, 1537] {
                let rows = 5;
                let mut w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
                w[..cols].fill(0.0);
                let x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed)).collect();
                let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
                matvec_f32_scalar(&w, cols, &x, &mut a);
                (k.matvec_f32)(&w, cols, &x, &mut b);
                let mut a16 = vec![0f32; rows];
                let mut b16 = vec![0f32; rows];
                matvec_f16_scalar(&w16, cols, &x, &mut a16);
                (k.matvec_f16)(&w16, cols, &x, &mut b16);
                for r in 0..rows {
                    let mag: f32 = w[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| (a * b).abs())
                        .sum();
                    let tol = TOL_F32 * 4.0 * mag.max(1e-6);
                    assert!((a[r] - b[r]).abs() <= tol, "{isa:?} f32 cols {cols}");
                    assert!((a16[r] - b16[r]).abs() <= tol, "{isa:?} f16 cols {cols}");
                }
                assert_eq!(b[0], 0.0);
            }
        }
    }
}
