//! One-token attention over the KV cache: the query heads that share one KV
//! head (GQA) score every cached position, softmax, and sum the values.
//!
//! Why a kernel: the crate is compiled for the x86-64 baseline (SSE2), so
//! this loop, a sizeable share of each decoded token once the context grows
//! (SmolLM2 at 256 positions: a third of the one-thread time), ran 4 lanes
//! wide. The x86 versions are the *same* Rust code compiled with AVX2 (and
//! AVX-512) enabled, except the dot product and the value sums: the dot
//! product's eight partial sums are written with intrinsics (`dot8_avx`),
//! because LLVM split the portable form into 2-lane pieces, and the value
//! sums keep eight 8-lane accumulators in registers and widen f16 with one
//! `vcvtph2ps` per eight values (`vsum_avx`). Both do the reference's
//! multiplies and adds in the same order
//! (Rust never fuses a multiply and an add on its own), so every version
//! returns the reference's bits, which the tests check. NEON is part of the
//! aarch64 baseline, where the reference is already vectorised.
//!
//! Keys and values are f32 or IEEE half-precision bits ([`KvElem`]: the
//! cache's default, half the bytes to hold and to stream per token), widened
//! exactly to f32 ([`f16_to_f32`]; F16C's `vcvtph2ps` in the x86 dot
//! product, which gives the same values) before any arithmetic.

/// An element type of the KV cache: `f32`, or `u16` holding f16 bits.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// The value as f32, exactly.
    fn to_f32(self) -> f32;
    /// `v` in this type (f16: rounded to nearest, ties to even).
    fn from_f32(v: f32) -> Self;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl KvElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> u16 {
        crate::math::f32_to_f16(v)
    }
}

/// One KV head's attention for the `group = qs.len() / head_dim` query heads
/// that share it, over the cached positions `range`. Each key and value row
/// is read once for the whole group; per head the arithmetic is
/// softmax(q·kᵀ·`scale`)·V in position order.
pub struct Attend<'a, T: KvElem = u16> {
    /// `[group, head_dim]` queries.
    pub qs: &'a [f32],
    /// Keys and values from this KV head's first element of position 0;
    /// position `t` at `t·stride`.
    pub keys: &'a [T],
    pub values: &'a [T],
    pub stride: usize,
    pub range: std::ops::Range<usize>,
    /// Head `j`'s score of position `t` goes to `scores[j·score_stride + t]`.
    pub scores: &'a mut [f32],
    pub score_stride: usize,
    /// `[group, head_dim]` outputs.
    pub out: &'a mut [f32],
    pub head_dim: usize,
    pub scale: f32,
    /// cap·tanh(s/cap) on each score before the softmax; 0 = none.
    pub softcap: f32,
}

/// Runs one [`Attend`] over an f16 cache.
pub type AttendFn = fn(Attend<'_>);
/// Runs one [`Attend`] over an f32 cache.
pub type AttendF32Fn = fn(Attend<'_, f32>);

/// `Σ a[i]·b[i]` in eight partial sums, then the elements past the last
/// multiple of 8 ([`dot_tail`]), the lanes reduced pairwise (scalar
/// reference of the x86 version).
#[inline(always)]
fn dot8<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let main = a.len().min(b.len()) / 8 * 8;
    let s4: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    (s2[0] + s2[1]) + dot_tail(&a[main..], &b[main..])
}

/// The products past the last multiple of 8, summed in order.
#[inline(always)]
fn dot_tail<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let mut tail = 0f32;
    for (x, &y) in a.iter().zip(b) {
        tail += x * y.to_f32();
    }
    tail
}

use crate::math::{exp_shifted_sum, f16_to_f32};

#[inline(always)]
fn attend_body<T: KvElem>(
    dot: impl Fn(&[f32], &[T]) -> f32,
    vsum: impl Fn(&mut [f32; V_COLS], &[f32], &[T], usize, std::ops::Range<usize>),
    a: Attend<'_, T>,
) {
    let Attend {
        qs,
        keys,
        values,
        stride,
        range,
        scores,
        score_stride,
        out,
        head_dim,
        scale,
        softcap,
    } = a;
    let hd = head_dim;
    let group = qs.len() / hd;
    for t in range.clone() {
        let k = &keys[t * stride..][..hd];
        for (j, q) in qs.chunks_exact(hd).enumerate() {
            scores[j * score_stride + t] = dot(q, k) * scale;
        }
    }
    if softcap > 0.0 {
        for j in 0..group {
            for s in &mut scores[j * score_stride + range.start..j * score_stride + range.end] {
                *s = softcap * (*s / softcap).tanh();
            }
        }
    }
    for j in 0..group {
        let sc = &mut scores[j * score_stride + range.start..j * score_stride + range.end];
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum = exp_shifted_sum(sc, max);
        let inv = 1.0 / sum;
        for p in sc.iter_mut() {
            *p *= inv;
        }
    }
    // Σ_t p_t·v_t per head, 64 columns at a time in a local accumulator
    // (registers once vectorised) rather than through `out` per position.
    for (j, o) in out.chunks_exact_mut(hd).enumerate() {
        let sc = &scores[j * score_stride..];
        for c0 in (0..hd).step_by(V_COLS) {
            let w = (hd - c0).min(V_COLS);
            let mut acc = [0f32; V_COLS];
            if w == V_COLS {
                vsum(&mut acc, sc, &values[c0..], stride, range.clone());
            } else {
                for t in range.clone() {
                    let a = sc[t];
                    let v = &values[t * stride + c0..][..w];
                    for (acc, &vv) in acc.iter_mut().zip(v) {
                        *acc += a * vv.to_f32();
                    }
                }
            }
            o[c0..c0 + w].copy_from_slice(&acc[..w]);
        }
    }
}

/// Columns of the value sums kept in one local accumulator.
const V_COLS: usize = 64;

/// `acc[i] += Σ_t sc[t]·values[t·stride + i]` over `range` in position
/// order, for `V_COLS` columns (the x86 versions return its bits).
#[inline(always)]
fn vsum_ref<T: KvElem>(
    acc: &mut [f32; V_COLS],
    sc: &[f32],
    values: &[T],
    stride: usize,
    range: std::ops::Range<usize>,
) {
    for t in range {
        let a = sc[t];
        let v: &[T; V_COLS] = values[t * stride..][..V_COLS].try_into().unwrap();
        for i in 0..V_COLS {
            acc[i] += a * v[i].to_f32();
        }
    }
}

/// Scalar reference of [`AttendFn`].
pub fn attend_group_scalar(a: Attend<'_>) {
    attend_body(dot8, vsum_ref, a)
}

/// Scalar reference of [`AttendF32Fn`].
pub fn attend_group_f32_scalar(a: Attend<'_, f32>) {
    attend_body(dot8, vsum_ref, a)
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`dot8`] on one 256-bit vector: the same multiplies and adds in the
    /// same order (no fused multiply-add), so the same bits. SAFETY
    /// (caller): AVX2 and F16C are available.
    /// Eight cache elements as f32 lanes.
    trait Load8: KvElem {
        /// SAFETY (caller): `p` points at 8 readable elements; AVX2 and
        /// F16C are available.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller's contract.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Load8 for u16 {
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            // SAFETY: the caller's contract (16 bytes, F16C).
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot8_avx<T: Load8>(a: &[f32], b: &[T]) -> f32 {
        let main = a.len().min(b.len()) / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < main {
            // SAFETY: i + 8 ≤ main ≤ both lengths.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    T::load8(b.as_ptr().add(i)),
                )
            };
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
            i += 8;
        }
        // [a0+a4, a1+a5, a2+a6, a3+a7], then [s0+s2, s1+s3], then their sum.
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1) + dot_tail(&a[main..], &b[main..])
    }

    /// [`vsum_ref`] in eight 8-lane accumulators, the values widened by
    /// [`Load8`] (one `vcvtph2ps` per eight f16 values): the same multiplies
    /// and adds in the same order, so the same bits. SAFETY (caller): AVX2
    /// and F16C are available.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn vsum_avx<T: Load8>(
        acc: &mut [f32; V_COLS],
        sc: &[f32],
        values: &[T],
        stride: usize,
        range: std::ops::Range<usize>,
    ) {
        // SAFETY: 8·k + 8 ≤ V_COLS = acc.len().
        let mut v8: [__m256; V_COLS / 8] =
            std::array::from_fn(|k| unsafe { _mm256_loadu_ps(acc.as_ptr().add(8 * k)) });
        for t in range {
            let a = _mm256_set1_ps(sc[t]);
            let row = &values[t * stride..][..V_COLS];
            for (k, acc) in v8.iter_mut().enumerate() {
                // SAFETY: 8·k + 8 ≤ V_COLS = row.len(); this function's features.
                let v = unsafe { T::load8(row.as_ptr().add(8 * k)) };
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(a, v));
            }
        }
        for (k, v) in v8.iter().enumerate() {
            // SAFETY: 8·k + 8 ≤ V_COLS = acc.len().
            unsafe { _mm256_storeu_ps(acc.as_mut_ptr().add(8 * k), *v) };
        }
    }

    macro_rules! multiversion {
        ($name:ident, $name_f32:ident, $inner:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            unsafe fn $inner<T: Load8>(a: Attend<'_, T>) {
                // SAFETY: this function's features include AVX2 and F16C.
                let dot = |x: &[f32], y: &[T]| unsafe { dot8_avx(x, y) };
                // SAFETY: as above.
                let vsum = |acc: &mut [f32; V_COLS], sc: &[f32], v: &[T], stride, range| unsafe {
                    vsum_avx(acc, sc, v, stride, range)
                };
                attend_body(dot, vsum, a)
            }

            /// [`AttendFn`] compiled for these features (module docs).
            pub fn $name(a: Attend<'_>) {
                // SAFETY: the table holding this function is built only
                // when these features were detected; the body is safe Rust.
                unsafe { $inner(a) }
            }

            /// [`AttendF32Fn`] compiled for these features.
            pub fn $name_f32(a: Attend<'_, f32>) {
                // SAFETY: as above.
                unsafe { $inner(a) }
            }
        };
    }

    multiversion!(
        attend_group_avx2,
        attend_group_f32_avx2,
        attend_avx2,
        "avx2,fma,f16c"
    );
    multiversion!(
        attend_group_avx512,
        attend_group_f32_avx512,
        attend_avx512,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::lcg;
    use crate::kernels::{Isa, Kernels};

    /// F16C's widening (the x86 kernels' `Load8`) gives every half the value
    /// the scalar reference's `f16_to_f32` gives.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16c_widening_equals_the_reference_conversion() {
        if !is_x86_feature_detected!("f16c") {
            return;
        }
        #[target_feature(enable = "f16c")]
        fn cvtph(h: u16) -> f32 {
            use std::arch::x86_64::*;
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h as i16)))
        }
        for h in 0..=u16::MAX {
            // SAFETY: F16C was detected above.
            let hw = unsafe { cvtph(h) };
            assert_eq!(hw.to_bits(), f16_to_f32(h).to_bits(), "{h:#06x}");
        }
    }

    #[test]
    fn every_isa_returns_the_reference_bits() {
        let mut seed = 11u64;
        // (head_dim, group, n_ctx, range, soft-cap): SmolLM2's 64 × 3, odd
        // head sizes (ragged 16-lane tails), one position, a sliding-window
        // start; Gemma 2's score soft-cap (small, so that it bites).
        for (hd, group, n_ctx, range, softcap) in [
            (64usize, 3usize, 300usize, 0..257usize, 0f32),
            (64, 1, 8, 0..1, 0.0),
            (8, 2, 40, 5..40, 0.0),
            (72, 4, 33, 0..33, 0.0),
            (100, 2, 20, 3..17, 0.0),
            (1, 1, 5, 0..5, 0.0),
            (64, 2, 50, 0..50, 1.5),
            (24, 3, 17, 2..17, 0.7),
        ] {
            let stride = hd * 2 + 3;
            let half = |v: f32| crate::math::f32_to_f16(v);
            let keys: Vec<u16> = (0..n_ctx * stride)
                .map(|_| half(lcg(&mut seed) * 3.0))
                .collect();
            let values: Vec<u16> = (0..n_ctx * stride).map(|_| half(lcg(&mut seed))).collect();
            let wide = |v: u16| f64::from(f16_to_f32(v));
            // The same values in an f32 cache: f32 and f16 kernels must then
            // return the same bits.
            let keys32: Vec<f32> = keys.iter().map(|&h| f16_to_f32(h)).collect();
            let values32: Vec<f32> = values.iter().map(|&h| f16_to_f32(h)).collect();
            let qs: Vec<f32> = (0..group * hd).map(|_| lcg(&mut seed) * 2.0).collect();
            fn run_with<T: KvElem>(
                f: fn(Attend<'_, T>),
                (qs, keys, values): (&[f32], &[T], &[T]),
                (hd, group, n_ctx, stride, range, softcap): (
                    usize,
                    usize,
                    usize,
                    usize,
                    std::ops::Range<usize>,
                    f32,
                ),
            ) -> (Vec<f32>, Vec<f32>) {
                let mut scores = vec![f32::NAN; group * n_ctx];
                let mut out = vec![f32::NAN; group * hd];
                let scale = 1.0 / (hd as f32).sqrt();
                f(Attend {
                    qs,
                    keys,
                    values,
                    stride,
                    range,
                    scores: &mut scores,
                    score_stride: n_ctx,
                    out: &mut out,
                    head_dim: hd,
                    scale,
                    softcap,
                });
                (scores, out)
            }
            let dims = (hd, group, n_ctx, stride, range.clone(), softcap);
            let run = |f: AttendFn| run_with(f, (&qs, &keys, &values), dims.clone());
            let run32 = |f: AttendF32Fn| run_with(f, (&qs, &keys32, &values32), dims.clone());
            let (s0, o0) = run(attend_group_scalar);
            // The reference against f64 arithmetic.
            for j in 0..group {
                let q = &qs[j * hd..(j + 1) * hd];
                let raw: Vec<f64> = range
                    .clone()
                    .map(|t| {
                        let k = &keys[t * stride..t * stride + hd];
                        q.iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * wide(b))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .map(|r| {
                        let cap = f64::from(softcap);
                        if cap > 0.0 {
                            cap * (r / cap).tanh()
                        } else {
                            r
                        }
                    })
                    .collect();
                let max = raw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = raw.iter().map(|r| (r - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..hd {
                    let want: f64 = range
                        .clone()
                        .zip(&e)
                        .map(|(t, p)| p / sum * wide(values[t * stride + c]))
                        .sum();
                    let got = f64::from(o0[j * hd + c]);
                    assert!(
                        (got - want).abs() < 1e-5,
                        "hd {hd} head {j} col {c}: {got} vs {want}"
                    );
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let check = |(s, o): (Vec<f32>, Vec<f32>), what: String| {
                assert_eq!(bits(&o), bits(&o0), "{what} hd {hd} group {group}");
                for j in 0..group {
                    let r = j * n_ctx + range.start..j * n_ctx + range.end;
                    assert_eq!(bits(&s[r.clone()]), bits(&s0[r]), "{what} scores");
                }
            };
            check(run32(attend_group_f32_scalar), "f32 scalar".into());
            for isa in Isa::available() {
                let k = Kernels::for_isa(isa).unwrap();
                check(run(k.attend), format!("{isa}"));
                check(run32(k.attend_f32), format!("{isa} f32"));
            }
        }
    }
}
