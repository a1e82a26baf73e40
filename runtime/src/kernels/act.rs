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

use crate::math::{exp_shifted_sum, gelu_erf, gelu_tanh, max_f32, silu};

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

#[inline(always)]
fn geglu_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// Scalar reference of GeGLU's step `gate ← gelu_tanh(gate)·up` (a [`SwigluFn`]).
pub fn geglu_scalar(gate: &mut [f32], up: &[f32]) {
    geglu_body(gate, up)
}

/// An element-wise activation in place (the MLPs without a gate).
pub type UnaryFn = fn(x: &mut [f32]);

#[inline(always)]
fn gelu_tanh_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu_tanh(*v);
    }
}

#[inline(always)]
fn gelu_erf_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu_erf(*v);
    }
}

#[inline(always)]
fn relu_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = v.max(0.0);
    }
}

/// Scalar reference of GELU (tanh form) in place.
pub fn gelu_tanh_scalar(x: &mut [f32]) {
    gelu_tanh_body(x)
}

/// Scalar reference of exact GELU (erf) in place.
pub fn gelu_erf_scalar(x: &mut [f32]) {
    gelu_erf_body(x)
}

/// Scalar reference of ReLU in place.
pub fn relu_scalar(x: &mut [f32]) {
    relu_body(x)
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
    use super::{
        causal_softmax_body, geglu_body, gelu_erf_body, gelu_tanh_body, relu_body, swiglu_body,
    };

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
        geglu_avx2, geglu_avx2_inner, geglu_body, (gate: &mut [f32], up: &[f32]);
        gelu_tanh_avx2, gelu_tanh_avx2_inner, gelu_tanh_body, (x: &mut [f32]);
        gelu_erf_avx2, gelu_erf_avx2_inner, gelu_erf_body, (x: &mut [f32]);
        relu_avx2, relu_avx2_inner, relu_body, (x: &mut [f32]);
        causal_softmax_avx2, causal_softmax_avx2_inner, causal_softmax_body,
            (row: &mut [f32], lo: usize, pos: usize)
    );
    multiversion!("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq",
        swiglu_avx512, swiglu_avx512_inner, swiglu_body, (gate: &mut [f32], up: &[f32]);
        geglu_avx512, geglu_avx512_inner, geglu_body, (gate: &mut [f32], up: &[f32]);
        gelu_tanh_avx512, gelu_tanh_avx512_inner, gelu_tanh_body, (x: &mut [f32]);
        gelu_erf_avx512, gelu_erf_avx512_inner, gelu_erf_body, (x: &mut [f32]);
        relu_avx512, relu_avx512_inner, relu_body, (x: &mut [f32]);
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

    /// Absolute error of the GELU references against f64 (erf by A&S
    /// 7.1.26, ≤ 1.5e−7, tanh through the exp, plus f32 roundings), scaled
    /// by max(1, |x|).
    const TOL_GELU_ABS: f64 = 2e-6;

    /// erf in f64 by its Taylor series (to ~1e−9 for |x| < 4; beyond, 1 −
    /// erf(x) < 1.6e−8, so ±1).
    fn erf_f64(x: f64) -> f64 {
        if x.abs() >= 4.0 {
            return x.signum();
        }
        let mut sum = 0f64;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn activations_match_f64_and_every_isa_returns_the_reference_bits() {
        let mut seed = 9u64;
        for n in [200usize, 1537, 31, 1, 0] {
            let mut x: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 8.0).collect();
            for (i, g) in x.iter_mut().enumerate().take(8) {
                *g = [0.0, -0.0, 30.0, -30.0, 1e-30, -1e-30, 5.5, -5.5][i];
            }
            let up: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 3.0).collect();
            type Exact = fn(f64) -> f64;
            type Pick = fn(&Kernels) -> UnaryFn;
            let unary: [(&str, UnaryFn, Exact, Pick); 3] = [
                (
                    "gelu_tanh",
                    gelu_tanh_scalar,
                    |v| {
                        0.5 * v
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (v + 0.044715 * v * v * v))
                                    .tanh())
                    },
                    |k| k.gelu_tanh,
                ),
                (
                    "gelu_erf",
                    gelu_erf_scalar,
                    |v| 0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2)),
                    |k| k.gelu_erf,
                ),
                ("relu", relu_scalar, |v| v.max(0.0), |k| k.relu),
            ];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (name, reference, exact, pick) in unary {
                let mut want = x.clone();
                reference(&mut want);
                for (&v, &w) in x.iter().zip(&want) {
                    let e = exact(f64::from(v));
                    assert!(
                        (f64::from(w) - e).abs() <= TOL_GELU_ABS * f64::from(v).abs().max(1.0),
                        "{name}({v}) = {w}, exact {e}"
                    );
                }
                for isa in Isa::available() {
                    let mut got = x.clone();
                    pick(Kernels::for_isa(isa).unwrap())(&mut got);
                    assert_eq!(bits(&got), bits(&want), "{name} {isa} n {n}");
                }
            }
            let mut want = x.clone();
            geglu_scalar(&mut want, &up);
            let mut plain = x.clone();
            gelu_tanh_scalar(&mut plain);
            for ((&w, &p), &u) in want.iter().zip(&plain).zip(&up) {
                assert_eq!(w.to_bits(), (p * u).to_bits(), "geglu = gelu_tanh · up");
            }
            for isa in Isa::available() {
                let mut got = x.clone();
                (Kernels::for_isa(isa).unwrap().geglu)(&mut got, &up);
                assert_eq!(bits(&got), bits(&want), "geglu {isa} n {n}");
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
