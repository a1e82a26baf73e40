//! SwiGLU's element-wise step, `gate ← silu(gate) · up`, once per layer and
//! token over the feed-forward width (1536 on SmolLM2).
//!
//! Why a kernel: the crate is compiled for the x86-64 baseline (SSE2), where
//! this loop runs 4 lanes wide; with libm's `expf` it did not vectorise at
//! all (`expf` alone was 1.6 % of a decoded token in `perf record nibble
//! bench -p 0 -n 64 -t 1` on SmolLM2's Q4_0 blocks). The x86 versions are the *same*
//! Rust code ([`crate::math::silu`], branch-free) compiled with AVX2 or
//! AVX-512 enabled, so they run 8 or 16 lanes wide and, since Rust never
//! fuses a multiply and an add on its own, return the reference's bits
//! (tested). On aarch64 the baseline already has NEON.

use crate::math::silu;

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

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::swiglu_body;

    macro_rules! multiversion {
        ($name:ident, $inner:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            fn $inner(gate: &mut [f32], up: &[f32]) {
                swiglu_body(gate, up)
            }

            /// [`super::SwigluFn`] compiled for these features (module docs).
            pub fn $name(gate: &mut [f32], up: &[f32]) {
                // SAFETY: the table holding this function is built only
                // when these features were detected; the body is safe Rust.
                unsafe { $inner(gate, up) }
            }
        };
    }

    multiversion!(swiglu_avx2, swiglu_avx2_inner, "avx2,fma");
    multiversion!(
        swiglu_avx512,
        swiglu_avx512_inner,
        "avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"
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
}
