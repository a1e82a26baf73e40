//! The float-activation variant of the packed-group kernels: packed weights
//! times **f32** activations, decoding each sub-block of 32 codes to f32 and
//! multiplying with FMA (`vec_dot_q4g_f32` and siblings).
//!
//! The runtime's decode path uses the integer kernels of [`super::qg`]
//! (activations rounded once to int8 blocks); this variant exists to measure
//! that choice (criterion `benches/kernels.rs` runs both on the same shapes)
//! and for callers that want the activations unrounded. Per group `g` with
//! scale `s`, zero `z` or minimum `m`:
//!
//! ```text
//! Σ_j ŵ_j·x_j = Σ_g s_g·(Σ_{j∈g} c_j·x_j − z_g·Σ_{j∈g} x_j)       (zero point)
//!             = Σ_g s_g·Σ_{j∈g} c_j·x_j + m_g·Σ_{j∈g} x_j          (minimum)
//! ```
//!
//! The SIMD versions keep per-lane partial sums of both inner sums and fold
//! them per group with one vector multiply-add each, so they differ from the
//! reference only in the order of float additions (`TOL_QG_F32_VS_SCALAR`).
//! A ragged last sub-block (a row length that is not a multiple of 32) goes
//! through the reference's [`sub_dot_f32_scalar`].

use nibble_format::dtype::{sub_block_bytes, GROUP_HEADER};
use nibble_format::quant::unpack_sub_block;

use super::qg::PackedRows;
use super::SUB_BLOCK;

/// `out[r] = Σ_c ŵ[r, c] · x[c]` with f32 activations (`x.len() == w.cols()`).
pub type QgF32MatvecFn = fn(w: PackedRows<'_>, x: &[f32], out: &mut [f32]);

fn check(w: &PackedRows<'_>, bits: u32, min: bool, x: &[f32], out: &[f32]) {
    assert_eq!(
        w.dtype().quant_bits(),
        Some(bits),
        "qg f32 kernel: weight type"
    );
    assert_eq!(w.dtype().has_float_min(), min, "qg f32 kernel: header kind");
    assert_eq!(out.len(), w.rows(), "qg f32 kernel: output length");
    assert_eq!(x.len(), w.cols(), "qg f32 kernel: input length");
}

/// `(Σ c_j·x_j, Σ x_j)` over one sub-block `sb` (`sub_block_bytes(bits)`
/// bytes) and its `x.len() ≤ 32` activations; codes past `x` are padding.
pub fn sub_dot_f32_scalar(bits: u32, sb: &[u8], x: &[f32]) -> (f32, f32) {
    let mut codes = [0u8; SUB_BLOCK];
    unpack_sub_block(bits, sb, &mut codes);
    let (mut acc, mut xsum) = (0f32, 0f32);
    for (&c, &xv) in codes.iter().zip(x) {
        acc += f32::from(c) * xv;
        xsum += xv;
    }
    (acc, xsum)
}

/// The group header's scale and its zero point (as f32) or minimum.
fn header(row: &[u8], p: usize, min: bool) -> (f32, f32) {
    let scale = half::f16::from_le_bytes([row[p], row[p + 1]]).to_f32();
    let other = if min {
        half::f16::from_le_bytes([row[p + 2], row[p + 3]]).to_f32()
    } else {
        f32::from(row[p + 2])
    };
    (scale, other)
}

/// A group's contribution from its `(Σ c·x, Σ x)`: `scale·acc + min·xsum`
/// or `scale·(acc − zero·xsum)` (the module formula; shared by the
/// reference and the SIMD versions' ragged tails).
fn group_value<const MIN: bool>(scale: f32, other: f32, acc: f32, xsum: f32) -> f32 {
    if MIN {
        scale * acc + other * xsum
    } else {
        scale * (acc - other * xsum)
    }
}

/// Scalar reference for one row.
fn row_dot_f32_scalar<const BITS: u32, const MIN: bool>(row: &[u8], gs: usize, x: &[f32]) -> f32 {
    let sb = sub_block_bytes(BITS);
    let mut p = 0;
    let mut sum = 0f32;
    for xg in x.chunks(gs) {
        let (scale, other) = header(row, p, MIN);
        p += GROUP_HEADER;
        let (mut acc, mut xsum) = (0f32, 0f32);
        for xs in xg.chunks(SUB_BLOCK) {
            let (a, s) = sub_dot_f32_scalar(BITS, &row[p..p + sb], xs);
            acc += a;
            xsum += s;
            p += sb;
        }
        sum += group_value::<MIN>(scale, other, acc, xsum);
    }
    sum
}

fn each_row<const BITS: u32, const MIN: bool>(
    w: PackedRows<'_>,
    x: &[f32],
    out: &mut [f32],
    row_dot: impl Fn(&[u8], usize, &[f32]) -> f32,
) {
    check(&w, BITS, MIN, x, out);
    for (r, o) in out.iter_mut().enumerate() {
        *o = row_dot(w.row(r), w.group_size(), x);
    }
}

/// The public per-type entry points of one driver.
macro_rules! matvec_fns {
    ($driver:ident; $($name:ident = $bits:literal, $min:literal;)*) => {
        $(
            #[doc = concat!("[`QgF32MatvecFn`] for ", $bits, "-bit codes (f16 minima: ", $min, ").")]
            pub fn $name(w: PackedRows<'_>, x: &[f32], out: &mut [f32]) {
                $driver::<$bits, $min>(w, x, out)
            }
        )*
    };
}

fn matvec_scalar<const BITS: u32, const MIN: bool>(w: PackedRows<'_>, x: &[f32], out: &mut [f32]) {
    each_row::<BITS, MIN>(w, x, out, row_dot_f32_scalar::<BITS, MIN>)
}

// The scalar references.
matvec_fns!(matvec_scalar;
    vec_dot_q2g_f32_scalar = 2, false;
    vec_dot_q3g_f32_scalar = 3, false;
    vec_dot_q4g_f32_scalar = 4, false;
    vec_dot_q8g_f32_scalar = 8, false;
    vec_dot_q4gm_f32_scalar = 4, true;
);

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! AVX2 + FMA (also used by the AVX-512 table: the work per weight is the
    //! byte → f32 conversion, which 512-bit registers would not shorten on
    //! this path's memory-bound shapes).
    use super::*;
    use crate::kernels::float::avx2::hsum;
    use crate::kernels::qg::x86::unpack;
    use std::arch::x86_64::*;

    /// The low 8 bytes of `b` as 8 f32.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn f(b: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))
    }

    /// One row. SAFETY (caller): AVX2, FMA and F16C are available, `row`
    /// holds `row_bytes(BITS, x.len(), gs)` bytes (`PackedRows` checked it).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_avx2<const BITS: u32, const MIN: bool>(row: &[u8], gs: usize, x: &[f32]) -> f32 {
        let sb = sub_block_bytes(BITS);
        let cols = x.len();
        let mut tot = _mm256_setzero_ps();
        let mut tail = 0f32;
        let (mut p, mut col) = (0usize, 0usize);
        while col < cols {
            let len = gs.min(cols - col);
            let (scale, other) = header(row, p, MIN);
            p += GROUP_HEADER;
            let (mut a0, mut a1, mut xs) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let mut j = 0;
            // SAFETY: a full sub-block has `sb` bytes at `p` inside the group
            // and 32 activations at `col + j` (j + 32 ≤ len ≤ cols − col).
            unsafe {
                while j + SUB_BLOCK <= len {
                    let c = unpack::<BITS>(row.as_ptr().add(p));
                    let xp = x.as_ptr().add(col + j);
                    let lo = _mm256_castsi256_si128(c);
                    let hi = _mm256_extracti128_si256(c, 1);
                    let (x0, x1) = (_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8)));
                    let (x2, x3) = (_mm256_loadu_ps(xp.add(16)), _mm256_loadu_ps(xp.add(24)));
                    a0 = _mm256_fmadd_ps(f(lo), x0, a0);
                    a1 = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), x1, a1);
                    a0 = _mm256_fmadd_ps(f(hi), x2, a0);
                    a1 = _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), x3, a1);
                    xs = _mm256_add_ps(
                        xs,
                        _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)),
                    );
                    p += sb;
                    j += SUB_BLOCK;
                }
                let acc = _mm256_add_ps(a0, a1);
                tot = _mm256_fmadd_ps(_mm256_set1_ps(scale), acc, tot);
                let k = if MIN { other } else { -scale * other };
                tot = _mm256_fmadd_ps(_mm256_set1_ps(k), xs, tot);
            }
            if j < len {
                // The ragged last sub-block: the reference.
                let (a, s) = sub_dot_f32_scalar(BITS, &row[p..p + sb], &x[col + j..col + len]);
                tail += group_value::<MIN>(scale, other, a, s);
                p += sb;
            }
            col += len;
        }
        // SAFETY: AVX2 is available (caller).
        unsafe { hsum(tot) + tail }
    }

    fn matvec_avx2<const BITS: u32, const MIN: bool>(
        w: PackedRows<'_>,
        x: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: the tables holding this kernel are built only when AVX2, FMA
        // and F16C were detected; `each_row` checked the sizes.
        each_row::<BITS, MIN>(w, x, out, |row, gs, x| unsafe {
            row_avx2::<BITS, MIN>(row, gs, x)
        })
    }

    matvec_fns!(matvec_avx2;
        vec_dot_q2g_f32_avx2 = 2, false;
        vec_dot_q3g_f32_avx2 = 3, false;
        vec_dot_q4g_f32_avx2 = 4, false;
        vec_dot_q8g_f32_avx2 = 8, false;
        vec_dot_q4gm_f32_avx2 = 4, true;
    );
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    //! NEON: the codes arrive as signed bytes from the integer kernels'
    //! unpacker (8-bit ones flipped to c − 128, so their zero shifts by 128),
    //! widened to i16, i32, then converted to f32.
    use super::*;
    use crate::kernels::qg::neon::unpack;
    use std::arch::aarch64::*;

    /// One row. SAFETY (caller): NEON is available, `row` holds
    /// `row_bytes(BITS, x.len(), gs)` bytes.
    #[target_feature(enable = "neon")]
    unsafe fn row_neon<const BITS: u32, const MIN: bool>(row: &[u8], gs: usize, x: &[f32]) -> f32 {
        let sb = sub_block_bytes(BITS);
        let cols = x.len();
        let shift = if BITS == 8 { 128.0 } else { 0.0 };
        let mut tot = vdupq_n_f32(0.0);
        let mut tail = 0f32;
        let (mut p, mut col) = (0usize, 0usize);
        while col < cols {
            let len = gs.min(cols - col);
            let (scale, other) = header(row, p, MIN);
            p += GROUP_HEADER;
            let (mut a0, mut a1, mut xs) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            let mut j = 0;
            // SAFETY: as in the AVX2 version: `sb` bytes at `p` and 32
            // activations at `col + j`.
            unsafe {
                while j + SUB_BLOCK <= len {
                    let (c0, c1) = unpack::<BITS>(row.as_ptr().add(p));
                    let xp = x.as_ptr().add(col + j);
                    for (h, c) in [c0, c1].into_iter().enumerate() {
                        let w16 = [vmovl_s8(vget_low_s8(c)), vmovl_s8(vget_high_s8(c))];
                        for (k, w) in w16.into_iter().enumerate() {
                            let base = xp.add(16 * h + 8 * k);
                            let (xa, xb) = (vld1q_f32(base), vld1q_f32(base.add(4)));
                            let fa = vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
                            let fb = vcvtq_f32_s32(vmovl_s16(vget_high_s16(w)));
                            a0 = vfmaq_f32(a0, fa, xa);
                            a1 = vfmaq_f32(a1, fb, xb);
                            xs = vaddq_f32(xs, vaddq_f32(xa, xb));
                        }
                    }
                    p += sb;
                    j += SUB_BLOCK;
                }
                let acc = vaddq_f32(a0, a1);
                tot = vfmaq_n_f32(tot, acc, scale);
                let k = if MIN { other } else { -scale * (other - shift) };
                tot = vfmaq_n_f32(tot, xs, k);
            }
            if j < len {
                // The ragged last sub-block: the reference (unshifted codes).
                let (a, s) = sub_dot_f32_scalar(BITS, &row[p..p + sb], &x[col + j..col + len]);
                tail += group_value::<MIN>(scale, other, a, s);
                p += sb;
            }
            col += len;
        }
        vaddvq_f32(tot) + tail
    }

    fn matvec_neon<const BITS: u32, const MIN: bool>(
        w: PackedRows<'_>,
        x: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: the table holding this kernel is built only on aarch64 with
        // NEON detected; `each_row` checked the sizes.
        each_row::<BITS, MIN>(w, x, out, |row, gs, x| unsafe {
            row_neon::<BITS, MIN>(row, gs, x)
        })
    }

    matvec_fns!(matvec_neon;
        vec_dot_q2g_f32_neon = 2, false;
        vec_dot_q3g_f32_neon = 3, false;
        vec_dot_q4g_f32_neon = 4, false;
        vec_dot_q8g_f32_neon = 8, false;
        vec_dot_q4gm_f32_neon = 4, true;
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{lcg, make_row};
    use crate::kernels::{Isa, Kernels};
    use nibble_format::dtype::DType;
    use nibble_format::quant::dequantize;

    /// A SIMD kernel against the scalar reference, relative to Σ_j |ŵ_j·x_j|:
    /// the same products, summed in another order.
    const TOL_QG_F32_VS_SCALAR: f64 = 2e-6;
    /// The scalar reference against the f64 dot of the dequantized row,
    /// relative to Σ|ŵ·x| (f32 rounding of the factored form).
    const TOL_QG_F32_VS_F64: f64 = 1e-5;

    const TYPES: [DType; 5] = [DType::Q2G, DType::Q3G, DType::Q4G, DType::Q8G, DType::Q4GM];
    /// (cols, group size): ragged rows (172, 8, 40), groups of 32..128 and whole rows.
    const SHAPES: [(usize, usize); 10] = [
        (32, 32),
        (64, 32),
        (172, 32),
        (172, 64),
        (172, 172),
        (8, 8),
        (40, 40),
        (576, 128),
        (1536, 128),
        (576, 576),
    ];

    fn exact_and_magnitude(dtype: DType, gs: usize, row: &[u8], x: &[f32]) -> (f64, f64) {
        let mut w = vec![0f32; x.len()];
        dequantize(dtype, gs, row, &mut w);
        w.iter().zip(x).fold((0.0, 0.0), |(e, m), (&a, &b)| {
            let p = f64::from(a) * f64::from(b);
            (e + p, m + p.abs())
        })
    }

    #[test]
    fn scalar_reference_equals_the_dequantized_dot() {
        let mut seed = 11u64;
        for dtype in TYPES {
            for (cols, gs) in SHAPES {
                let rows = 3;
                let mut data = Vec::new();
                for r in 0..rows {
                    data.extend(make_row(dtype, cols, gs, &mut seed, r == 0));
                }
                let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                let x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed)).collect();
                let mut out = vec![0f32; rows];
                (Kernels::for_isa(Isa::Scalar).unwrap().matvec_qg_f32(dtype))(w, &x, &mut out);
                for (r, &got) in out.iter().enumerate() {
                    let (want, mag) = exact_and_magnitude(dtype, gs, w.row(r), &x);
                    assert!(
                        (f64::from(got) - want).abs() <= TOL_QG_F32_VS_F64 * mag.max(1e-6),
                        "{dtype} cols {cols} g{gs} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_isa_matches_the_scalar_reference() {
        let scalar = Kernels::for_isa(Isa::Scalar).unwrap();
        let mut seed = 5u64;
        for isa in Isa::available() {
            let k = Kernels::for_isa(isa).unwrap();
            for dtype in TYPES {
                for (cols, gs) in SHAPES {
                    let rows = 5;
                    let mut data = Vec::new();
                    for r in 0..rows {
                        data.extend(make_row(dtype, cols, gs, &mut seed, r == 0));
                    }
                    let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                    let mut x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed) * 4.0).collect();
                    if cols >= 64 {
                        x[32..64].fill(0.0);
                    }
                    let (mut want, mut got) = (vec![0f32; rows], vec![0f32; rows]);
                    (scalar.matvec_qg_f32(dtype))(w, &x, &mut want);
                    (k.matvec_qg_f32(dtype))(w, &x, &mut got);
                    for r in 0..rows {
                        let (_, mag) = exact_and_magnitude(dtype, gs, w.row(r), &x);
                        assert!(
                            (f64::from(got[r]) - f64::from(want[r])).abs()
                                <= TOL_QG_F32_VS_SCALAR * mag.max(1e-9) + 1e-7,
                            "{isa} {dtype} cols {cols} g{gs} row {r}: {} vs {}",
                            got[r],
                            want[r]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn all_zero_inputs_give_zero_and_wrong_lengths_are_refused() {
        for isa in Isa::available() {
            let k = Kernels::for_isa(isa).unwrap();
            for dtype in TYPES {
                let mut seed = 3u64;
                let mut data = Vec::new();
                for _ in 0..2 {
                    data.extend(make_row(dtype, 172, 32, &mut seed, false));
                }
                let w = PackedRows::new(dtype, &data, 2, 172, 32).unwrap();
                let mut out = [1f32; 2];
                (k.matvec_qg_f32(dtype))(w, &[0.0; 172], &mut out);
                assert_eq!(out, [0.0; 2], "{isa} {dtype}");
                let f = k.matvec_qg_f32(dtype);
                let r = std::panic::catch_unwind(move || f(w, &[0.0; 171], &mut [0f32; 2]));
                assert!(r.is_err(), "{isa} {dtype}: 171 inputs for 172 columns");
            }
        }
    }
}
