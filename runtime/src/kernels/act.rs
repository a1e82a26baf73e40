//! Element-wise activations: SwiGLU's step, `gate ← silu(gate) · up`, once
//! per layer and token over the feed-forward width (1536 on SmolLM2), and
//! the causal softmax of one attention row (batched prompts and the
//! quantizer's calibration forward, whose rows run to 512 keys and more).
//!
//! Why a kernel: the crate is compiled for the x86-64 baseline (SSE2), where
//! this loop runs 4 lanes wide; with libm's `expf` it did not vectorise at
//! all (`expf` alone was 1.6 % of a decoded token in `perf record nibble
//! bench -p 0 -n 64 -t 1` on SmolLM2's Q4_0 blocks). The x86 versions are the *same*
//! Rust code ([`crate::math::silu`], branch-free) compiled with AVX2 or
//! AVX-512 enabled, so they run 8 or 16 lanes wide and, since Rust never
//! fuses a multiply and an add on its own, return the reference's bits
//! (tested). On aarch64 the baseline already has NEON.

use crate::math::{exp_shifted_sum, max_f32, silu};

/// `gate[i] ← silu(gate[i]) · up[i]` over `gate.len()` elements (`up` at
/// least as long).
pub type SwigluFn = fn(gate: &mut [f32], up: &[f32]);

#[inline(always)]
fn swiglu_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// Scalar reference of [`SwigluFn`].
pub fn swiglu_scalar(gate: &mut [f32], up: &[f32]) {
    swiglu_body(gate, up)
}

/// Causal (and sliding-window) softmax of one attention row in place: the
/// entries `lo..=pos` become probabilities, every other entry of `row`
/// becomes 0. `lo ≤ pos < row.len()`.
pub type CausalSoftmaxFn = fn(row: &mut [f32], lo: usize, pos: usize);

#[inline(always)]
fn causal_softmax_body(row: &mut [f32], lo: usize, pos: usize) {
    let live = &mut row[lo..=pos];
    let max = max_f32(live);
    let inv = 1.0 / exp_shifted_sum(live, max);
    for v in live.iter_mut() {
        *v *= inv;
    }
    row[..lo].fill(0.0);
    row[pos + 1..].fill(0.0);
}

/// Scalar reference of [`CausalSoftmaxFn`].
pub fn causal_softmax_scalar(row: &mut [f32], lo: usize, pos: usize) {
    causal_softmax_body(row, lo, pos)
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{causal_softmax_body, swiglu_body};

    macro_rules! multiversion {
        ($features:literal, $($name:ident, $inner:ident, $body:ident, ($($arg:ident: $ty:ty),*));*) => {$(
            #[target_feature(enable = $features)]
            fn $inner($($arg: $ty),*) {
                $body($($arg),*)
            }

            /// The scalar reference compiled for these features (module docs).
            pub fn $name($($arg: $ty),*) {
                // SAFETY: the table holding this function is built only
                // when these features were detected; the body is safe Rust.
                unsafe { $inner($($arg),*) }
            }
        )*};
    }

    multiversion!("avx2,fma",
        swiglu_avx2, swiglu_avx2_inner, swiglu_body, (gate: &mut [f32], up: &[f32]);
        causal_softmax_avx2, causal_softmax_avx2_inner, causal_softmax_body,
            (row: &mut [f32], lo: usize, pos: usize)
    );
    multiversion!("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq",
        swiglu_avx512, swiglu_avx512_inner, swiglu_body, (gate: &mut [f32], up: &[f32]);
        causal_softmax_avx512, causal_softmax_avx512_inner, causal_softmax_body,
            (row: &mut [f32], lo: usize, pos: usize)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::lcg;
    use crate::kernels::{Isa, Kernels};

    /// Relative error of [`swiglu_scalar`] against f64 arithmetic: the exp's
    /// ([`crate::math::EXP_F32_MAX_REL_ERR`]) plus a few f32 roundings.
    const TOL_SWIGLU_REL: f64 = 2e-6;

    #[test]
    fn every_isa_returns_the_reference_bits() {
        let mut seed = 5u64;
        // SmolLM2's width, ragged 16-lane tails, one element, none; large
        // and tiny gates (saturated sigmoid), zeros.
        for n in [1536usize, 1537, 31, 1, 0] {
            let mut gate: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 12.0).collect();
            let up: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 3.0).collect();
            for (i, g) in gate.iter_mut().enumerate().take(8) {
                *g = [0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, 40.0, -40.0][i];
            }
            let mut want = gate.clone();
            swiglu_scalar(&mut want, &up);
            for ((&g, &u), &w) in gate.iter().zip(&up).zip(&want) {
                let (g, u) = (f64::from(g), f64::from(u));
                let exact = g / (1.0 + (-g).exp()) * u;
                assert!(
                    (f64::from(w) - exact).abs() <= TOL_SWIGLU_REL * exact.abs() + 1e-30,
                    "silu({g})·{u}: {w} vs {exact}"
                );
            }
            for isa in Isa::available() {
                let mut got = gate.clone();
                (Kernels::for_isa(isa).unwrap().swiglu)(&mut got, &up);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa} n {n}");
            }
        }
    }

    /// Relative error of [`causal_softmax_scalar`]'s probabilities against
    /// f64: the exp's, the sum's f32 roundings over up to 2048 terms, and
    /// the reciprocal.
    const TOL_SOFTMAX_REL: f64 = 2e-5;

    #[test]
    fn causal_softmax_every_isa_returns_the_reference_bits() {
        let mut seed = 11u64;
        // (row length, lo, pos): a full row, a causal prefix, a sliding
        // window, one live entry, ragged 16-lane tails, a long row.
        for (len, lo, pos) in [
            (512usize, 0usize, 511usize),
            (512, 0, 200),
            (300, 37, 290),
            (33, 5, 5),
            (17, 0, 16),
            (1, 0, 0),
            (2048, 1000, 2047),
        ] {
            let mut row: Vec<f32> = (0..len).map(|_| lcg(&mut seed) * 30.0).collect();
            if pos > lo + 3 {
                row[lo + 1] = 60.0; // dominant entry
                row[lo + 2] = -1e30; // underflows to ~0
            }
            let mut want = row.clone();
            causal_softmax_scalar(&mut want, lo, pos);
            let live = &row[lo..=pos];
            let m = live
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
            let z: f64 = live.iter().map(|&x| (f64::from(x) - m).exp()).sum();
            for (i, &w) in want.iter().enumerate() {
                if (lo..=pos).contains(&i) {
                    let exact = (f64::from(row[i]) - m).exp() / z;
                    assert!(
                        (f64::from(w) - exact).abs() <= TOL_SOFTMAX_REL * exact + 1e-37,
                        "len {len} [{i}]: {w} vs {exact}"
                    );
                } else {
                    assert_eq!(w, 0.0, "len {len} [{i}] is masked");
                }
            }
            for isa in Isa::available() {
                let mut got = row.clone();
                (Kernels::for_isa(isa).unwrap().causal_softmax)(&mut got, lo, pos);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{isa} len {len} lo {lo} pos {pos}");
            }
        }
    }
}
