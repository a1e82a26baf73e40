//! Elementary functions of the forward passes, written so the compiler can
//! vectorise them.
//!
//! Why: `f32::exp` is a libm call the compiler cannot vectorise, and a
//! forward pass takes one per hidden unit for SwiGLU (46 k per token on
//! SmolLM2) and one per attention score; the quantizer's calibration forward
//! takes 1.2 M per 512-token window and block. [`exp_f32`] is plain
//! branch-free arithmetic on `f32`/`i32` bits, so a loop over a slice
//! becomes SIMD code on every target without `unsafe` or feature detection.
//! Rust never fuses a multiply and an add on its own, so the same code
//! compiled for any instruction set (the kernels' multiversioned copies
//! included) computes the same bits, which the kernel tests rely on.

/// log2(e).
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split into a part exact in f32 and the remainder (Cody–Waite), so
/// `x − n·ln2` loses nothing for |n| ≤ 128.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding then subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the
/// nearest integer (ties to even) without a rounding instruction.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// exp(x) overflows f32 above this, and is subnormal below the lower bound.
const EXP_HI: f32 = 88.0;
const EXP_LO: f32 = -87.336_54;

/// e^x with relative error below [`EXP_F32_MAX_REL_ERR`] for x in
/// [−87.3, 88]. Inputs are clamped to that range (so e^−∞ and e^−100 give
/// ~1.2e−38 rather than 0, which no softmax or SiLU notices); NaN stays NaN.
/// e^x = 2ⁿ·e^r with n = round(x·log2 e), |r| ≤ ln2/2, and e^r by its
/// degree-7 Taylor polynomial (truncation error 5e−9).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2ⁿ from its exponent bits: n ∈ [−126, 127] after the clamp.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * two_n
}

/// The largest relative error of [`exp_f32`] against the correctly rounded
/// e^x over its range (tested).
pub const EXP_F32_MAX_REL_ERR: f64 = 5e-7;

/// `v ← e^(v − max)` for every element; returns their sum (in eight
/// partial sums, so this loop too is vectorised).
#[inline(always)]
pub fn exp_shifted_sum(v: &mut [f32], max: f32) -> f32 {
    for x in v.iter_mut() {
        *x = exp_f32(*x - max);
    }
    let mut acc = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// The largest element (−∞ when empty; NaNs are passed over, as
/// `f32::max` does), in sixteen independent partial maxima, so the
/// compiler can keep them in vector lanes.
#[inline(always)]
pub fn max_f32(v: &[f32]) -> f32 {
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = larger(*a, x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| larger(m, x));
    acc.iter().fold(tail, |m, &a| larger(m, a))
}

/// SiLU, x·σ(x) = x / (1 + e^−x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// tanh(x) = 1 − 2/(e^{2x} + 1), branch-free (saturates to ±1; absolute
/// error below 1e−6 near 0, where the form cancels).
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * x) + 1.0)
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`, PyTorch's
/// `gelu(approximate="tanh")`): ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh_f32(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e−7 in exact
/// arithmetic), branch-free: odd symmetry through the sign bit.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_f32(-a * a);
    f32::from_bits(y.to_bits() | (x.to_bits() & 0x8000_0000))
}

/// Exact GELU, ½x(1 + erf(x/√2)) (PyTorch's default `gelu`).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The f32 value of the IEEE half-precision number with bits `h`, exactly
/// (NaNs quieted, as x86's `vcvtph2ps` does, so the kernels that convert
/// with that instruction return the same bits). Branch-free arithmetic, so
/// a loop over a slice vectorises; the KV cache is stored in this format.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Exponent and mantissa moved to f32's places, then scaled by 2^112
    // (the bias difference): exact for normal and subnormal halves.
    let finite = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let nan = 0x7fc0_0000 | ((em & 0x3ff) << 13);
    let bits = if em > 0x7c00 {
        nan
    } else if em == 0x7c00 {
        0x7f80_0000
    } else {
        finite
    };
    f32::from_bits(bits | sign)
}

/// The bits of `x` rounded to the nearest half-precision number (ties to
/// even), as `half::f16::from_f32` and x86's `vcvtps2ph` round.
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_f32_is_the_fold_of_f32_max() {
        let mut seed = 9u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 200.0 - 100.0
        };
        for n in [0usize, 1, 15, 16, 17, 33, 512, 515] {
            let mut v: Vec<f32> = (0..n).map(|_| next()).collect();
            let fold = |v: &[f32]| v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max_f32(&v), fold(&v), "n {n}");
            if n > 3 {
                // The largest in the ragged tail, in a lane, a NaN beside it.
                v[n - 1] = 500.0;
                assert_eq!(max_f32(&v), 500.0, "n {n}");
                v[n - 1] = -1.0;
                v[2] = f32::NAN;
                v[1] = 400.0;
                assert_eq!(max_f32(&v), 400.0, "n {n}");
            }
        }
        assert_eq!(max_f32(&[f32::NEG_INFINITY; 20]), f32::NEG_INFINITY);
    }

    #[test]
    fn exp_matches_libm_across_its_range() {
        let mut worst = 0f64;
        let mut x = -87.3f64;
        while x < 88.0 {
            let xf = x as f32;
            let want = f64::from(xf).exp();
            let got = f64::from(exp_f32(xf));
            worst = worst.max((got - want).abs() / want);
            x += 0.001_37;
        }
        assert!(
            worst < EXP_F32_MAX_REL_ERR,
            "worst relative error {worst:e}"
        );
        for (x, want) in [
            (0f32, 1f32),
            (1.0, std::f32::consts::E),
            (-1.0, 1.0 / std::f32::consts::E),
        ] {
            assert!(
                (exp_f32(x) - want).abs() <= 2.0 * f32::EPSILON * want,
                "{x}"
            );
        }
        // Clamped ends, NaN.
        assert!(exp_f32(f32::NEG_INFINITY) < 1.3e-38 && exp_f32(f32::NEG_INFINITY) > 0.0);
        assert!(exp_f32(-1e6) < 1.3e-38);
        assert!(exp_f32(1e6).is_finite() && exp_f32(1e6) > 1e38);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn f16_conversions_are_exact() {
        // Every half: the value half computes, NaNs by class (quieted).
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan() && got.to_bits() & 0x0040_0000 != 0, "{h:#06x}");
                assert_eq!(got.is_sign_negative(), want.is_sign_negative());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
            // Round trip of every non-NaN half.
            if !want.is_nan() {
                assert_eq!(f32_to_f16(got), h, "{h:#06x}");
            }
        }
        // Rounding: ties to even, overflow to infinity, underflow to zero.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        assert_eq!(f32_to_f16(1e-9), 0);
    }

    #[test]
    fn shifted_sum_and_silu() {
        let mut v: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 4.0).collect();
        let want: Vec<f64> = v.iter().map(|&x| (f64::from(x) - 5.0).exp()).collect();
        let sum = exp_shifted_sum(&mut v, 5.0);
        let want_sum: f64 = want.iter().sum();
        assert!((f64::from(sum) - want_sum).abs() < 1e-6 * want_sum);
        for (g, w) in v.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-6 * w);
        }
        for x in [-20f32, -1.0, 0.0, 0.5, 3.0, 30.0] {
            let want = f64::from(x) / (1.0 + (-f64::from(x)).exp());
            assert!(
                (f64::from(silu(x)) - want).abs() <= 1e-6 * want.abs().max(1e-6),
                "{x}"
            );
        }
    }
}
