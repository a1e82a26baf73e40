//! GGUF block types run as stored (`Q5_0`, `Q2_K`…`Q6_K`, `IQ4_NL`,
//! `IQ4_XS`) times int8 activation blocks ([`super::q8`]): `vec_dot_q4k_q8`
//! and its siblings, the scalar reference and the SIMD versions.
//!
//! A GGUF block is 32 or 256 weights; every type reads as sub-blocks of 32
//! in the integer form of [`nibble_format::gguf_blocks::IntSub`] (weight =
//! `a·w1 + b·w2`), so against activation block `k` (`x ≈ d_k·q`):
//!
//! ```text
//! Σ_j ŵ_j·x_j ≈ Σ_k d_k · (a_k · Σ w1·q + b_k · Σ w2·q)
//! ```
//!
//! with both integer sums exact. Where `w2` is constant over the sub-block
//! (K-quant minimums), `Σ w2·q = w2 · Σ q` comes from the block's `ds`.
//! The reference computes exactly this per sub-block; the SIMD versions
//! keep per-lane partial sums (float order differs, hence the tolerance of
//! the tests).
//!
//! AVX2 and NEON (with and without `sdot`) versions exist for every type:
//! codes unpack with AND/shift (nibbles, 2-bit codes), a byte compare or bit
//! test (fifth bits, Q3_K's high bits) or a table lookup (`pshufb` / `tbl`,
//! the non-linear IQ4 grid); on x86 `vpmaddubsw` then `vpmaddwd`, whose i16
//! pairs take the 16-weight scales of Q2_K, Q3_K and Q6_K per 128-bit half.
//!
//! K-quant rows (Q2_K…Q6_K) take [`Q8Ref::super256`] activations, one scale
//! per 256 as llama.cpp's `Q8_K` ([`super::q8::Q8Kind`]). The reference and
//! the NEON, Q2_K and Q3_K kernels read either flavour; the x86 Q4_K, Q5_K
//! and Q6_K kernels add a whole super-block's scaled integer sums in i32
//! and apply one float multiply-add per token (per-32 blocks, which the
//! runtime never gives them, go to the reference). They come in AVX2 and
//! AVX-512 (two sub-blocks per 512-bit step, `vpdpwssd`) versions, for one
//! token and for prompts ([`GgufMatmulFn`]: each sub-block unpacked once
//! for four tokens on AVX2, eight on AVX-512). Qwen2.5-Coder-1.5B Q4_K_M,
//! AVX-512, tg64: 6.4 → 6.9 tok/s at one thread, 11.0 → 12.9 at two; pp128
//! 17.9 → 33.1 (docs/BENCHMARKS.md).
//!
//! Q5_0 has AVX2 and AVX-512 VNNI kernels of the same shape (one token, and
//! four or eight for prompts; AVX-512: two blocks per step, the fifth bits as a byte mask,
//! `vpdpbusd` with the activations offset by 128). The models run Q5_0
//! from a copy interleaved by eight rows where they can
//! ([`super::qg_x8`], 2× these kernels' prompt speed); these serve
//! `--prefill int8` and weights without the copy. The AVX-512 table takes
//! the AVX2 versions of the remaining types.

use nibble_format::gguf::GgmlType;
use nibble_format::gguf_blocks::{unpack_int, IntSub};
use nibble_format::DType;

use super::q8::{Q8Kind, Q8Ref};
use super::qg::PackedRows;
use super::SUB_BLOCK;

/// The ggml type of a native block `dtype` (panics for other types: the
/// tables only hold these kernels under block types).
fn ggml(dtype: DType) -> GgmlType {
    GgmlType::of_block_dtype(dtype).expect("a GGUF block type")
}

/// The preconditions every kernel relies on, checked once per call.
fn check(w: &PackedRows<'_>, want: DType, x: &Q8Ref<'_>, out: &[f32]) {
    assert_eq!(w.dtype(), want, "gguf kernel: weight type");
    assert_eq!(out.len(), w.rows(), "gguf kernel: output length");
    let nb = w.cols() / SUB_BLOCK;
    assert!(
        w.cols().is_multiple_of(SUB_BLOCK)
            && x.len == w.cols()
            && x.d.len() == nb
            && x.ds.len() == nb
            && x.qs.len() == nb * SUB_BLOCK,
        "gguf kernel: activation blocks do not match {} columns",
        w.cols()
    );
}

/// Scalar reference for one row: each block in integer form, then per
/// sub-block `d · (a · Σ w1·q + b · Σ w2·q)`.
fn row_dot_scalar(ty: GgmlType, row: &[u8], x: &Q8Ref<'_>) -> f32 {
    let (_, bytes) = ty.block();
    let mut subs = [IntSub::ZERO; 8];
    let (mut sum, mut k) = (0f32, 0usize);
    for block in row.chunks_exact(bytes as usize) {
        let n = unpack_int(ty, block, &mut subs).expect("a native block type");
        for s in &subs[..n] {
            let q = &x.qs[k * SUB_BLOCK..(k + 1) * SUB_BLOCK];
            let (mut i1, mut i2) = (0i32, 0i32);
            for ((&w1, &w2), &q) in s.w1.iter().zip(&s.w2).zip(q) {
                i1 += i32::from(w1) * i32::from(q);
                i2 += i32::from(w2) * i32::from(q);
            }
            sum += x.d[k] * (s.a * i1 as f32 + s.b * i2 as f32);
            k += 1;
        }
    }
    sum
}

fn matvec_scalar(dtype: DType, w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
    check(&w, dtype, x, out);
    let ty = ggml(dtype);
    for (r, o) in out.iter_mut().enumerate() {
        *o = row_dot_scalar(ty, w.row(r), x);
    }
}

macro_rules! scalar_kernels {
    ($($name:ident => $dtype:ident),* $(,)?) => {$(
        /// Scalar reference (see the module docs).
        pub fn $name(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
            matvec_scalar(DType::$dtype, w, x, out)
        }
    )*};
}

scalar_kernels!(
    vec_dot_q5_0_q8_scalar => Q5_0,
    vec_dot_q2k_q8_scalar => Q2K,
    vec_dot_q3k_q8_scalar => Q3K,
    vec_dot_q4k_q8_scalar => Q4K,
    vec_dot_q5k_q8_scalar => Q5K,
    vec_dot_q6k_q8_scalar => Q6K,
    vec_dot_iq4nl_q8_scalar => IQ4NL,
    vec_dot_iq4xs_q8_scalar => IQ4XS,
);

/// `out[t·out_rs + r] = row r · token t` for GGUF rows `w` and
/// `x.len / cols` tokens back to back in `x`, each in the activation
/// flavour of the weight type ([`Q8Kind::for_dtype`]: [`Q8Ref::super256`]
/// blocks for the K-quants, per-32 blocks for Q5_0): prompts, a chunk of
/// rows at a time (`forward::gguf_batch`).
pub type GgufMatmulFn = fn(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32], out_rs: usize);

/// Batched kernels in [`DType::GGUF_BLOCKS`] order; `None` where the table
/// has none (the prompt path then decodes tiles for `gemm`).
pub type GgufMatmulTable = [Option<GgufMatmulFn>; 8];

/// The preconditions of a [`GgufMatmulFn`]; the number of tokens.
fn check_batch(w: &PackedRows<'_>, x: &Q8Ref<'_>, out: &[f32], out_rs: usize) -> usize {
    let cols = w.cols();
    let super256 = Q8Kind::for_dtype(w.dtype()) == Q8Kind::Super256;
    assert!(
        cols > 0 && x.len.is_multiple_of(cols) && x.super256 == super256,
        "gguf matmul: activations are not whole rows of {cols} in the {} flavour",
        w.dtype()
    );
    let n_tok = x.len / cols;
    assert!(
        n_tok == 0 || (out_rs >= w.rows() && out.len() >= (n_tok - 1) * out_rs + w.rows()),
        "gguf matmul: output too short"
    );
    n_tok
}

/// Scalar reference of a [`GgufMatmulFn`]: the one-token reference per token.
pub fn matmul_gguf_scalar(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32], out_rs: usize) {
    let n_tok = check_batch(&w, x, out, out_rs);
    for t in 0..n_tok {
        let o = &mut out[t * out_rs..t * out_rs + w.rows()];
        matvec_scalar(w.dtype(), w, &x.tokens(w.cols(), t, 1), o);
    }
}

/// The SIMD row functions' shared driver: sizes checked once (`check`),
/// then `out[r] = row(bytes of row r, x)`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn each_row(
    dtype: DType,
    w: PackedRows<'_>,
    x: &Q8Ref<'_>,
    out: &mut [f32],
    row: unsafe fn(&[u8], &Q8Ref<'_>) -> f32,
) {
    check(&w, dtype, x, out);
    for (r, o) in out.iter_mut().enumerate() {
        // SAFETY: the SIMD kernels sit only in tables built after their
        // features were detected; `check` and `PackedRows` guarantee the row
        // holds cols/block whole blocks and `x` a block per 32 columns.
        *o = unsafe { row(w.row(r), x) };
    }
}

/// The scalar table, in [`DType::GGUF_BLOCKS`] order.
pub const SCALAR: [super::QgMatvecFn; 8] = [
    vec_dot_q5_0_q8_scalar,
    vec_dot_q2k_q8_scalar,
    vec_dot_q3k_q8_scalar,
    vec_dot_q4k_q8_scalar,
    vec_dot_q5k_q8_scalar,
    vec_dot_q6k_q8_scalar,
    vec_dot_iq4nl_q8_scalar,
    vec_dot_iq4xs_q8_scalar,
];

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! AVX2 versions (also in the AVX-512 table: the 256-bit integer dot is
    //! not what limits these kernels, the unpacking is).
    use super::*;
    use crate::kernels::float::avx2::hsum;
    use crate::kernels::qg::x86::half;
    use nibble_format::gguf_blocks::{iq4xs_scale, q3k_scales, scales_mins_k4, KVALUES_IQ4NL};
    use std::arch::x86_64::*;

    /// Σ v·q over 32 lanes, both signed (`v` > −128).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dot_i8_i8(v: __m256i, q: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(q, v));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// 32 nibbles of 16 bytes in the 32-weight block order (low nibbles are
    /// weights 0..16, high ones 16..32). SAFETY (caller): 16 bytes at `p`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn nibbles16(p: *const u8) -> __m256i {
        // SAFETY: guaranteed by the caller.
        let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let m = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m))
    }

    /// Byte `j` = 0xFF where bit `j` of `bits` is set.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn bytes_from_bits(bits: u32) -> __m256i {
        let idx = _mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        );
        let b = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), idx);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit)
    }

    /// Activation block `k` (32 signed bytes). SAFETY (caller): it exists.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn act(x: &Q8Ref<'_>, k: usize) -> __m256i {
        // SAFETY: guaranteed by the caller.
        unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(k * SUB_BLOCK) as *const __m256i) }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: the callers read headers inside checked blocks.
        unsafe { half((p as *const u16).read_unaligned()) }
    }

    /// Q4_K / Q5_K against [`Q8Ref::super256`] activations (one token of
    /// [`rows_q45k_x_avx2`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_q45k_super<const FIVE: bool>(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        // SAFETY: the caller's guarantees for one token of `x.len` values.
        let [v] = unsafe { rows_q45k_x_avx2::<FIVE, 1>(row, x, 0, x.len) };
        v
    }

    /// Q6_K against [`Q8Ref::super256`] activations (one token of
    /// [`rows_q6k_x_avx2`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_q6k_super(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        // SAFETY: the caller's guarantees for one token of `x.len` values.
        let [v] = unsafe { rows_q6k_x_avx2::<1>(row, x, 0, x.len) };
        v
    }

    /// The 2-bit codes of one sub-block of 32: bits `2·j`, `2·j + 1` of
    /// each byte of `q` (`j` = 0..4, the shift of llama.cpp's layout).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn crumbs(q: __m256i, j: usize) -> __m256i {
        let v = match j {
            0 => q,
            1 => _mm256_srli_epi16(q, 2),
            2 => _mm256_srli_epi16(q, 4),
            _ => _mm256_srli_epi16(q, 6),
        };
        _mm256_and_si256(v, _mm256_set1_epi8(3))
    }

    /// Two 16-weight factors as the i16 lanes of one sub-block's pair sums
    /// (lanes 0..8 hold weights 0..16, lanes 8..16 weights 16..32).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn halves(f0: i16, f1: i16) -> __m256i {
        _mm256_set_m128i(_mm_set1_epi16(f1), _mm_set1_epi16(f0))
    }

    /// Q2_K: per 128 weights one 32-byte load of 2-bit codes makes four
    /// sub-blocks (shifts 0, 2, 4, 6); the codes' i16 pair sums take the two
    /// 16-weight scales by `vpmaddwd`, and the activations' own pair sums
    /// the two 16-weight minimums (they differ per 16, so `ds` cannot serve).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_q2k(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        let ones = _mm256_set1_epi8(1);
        let (mut acc, mut minacc) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut k = 0;
        for b in row.chunks_exact(84) {
            let p = b.as_ptr();
            // SAFETY: `b` is one whole block; blocks k..k+8 of `x` exist.
            unsafe {
                let (d, dmin) = (f16_at(p.add(80)), f16_at(p.add(82)));
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(16 + 32 * n) as *const __m256i);
                    for j in 0..4 {
                        let a = act(x, k);
                        let (s0, s1) = (b[8 * n + 2 * j], b[8 * n + 2 * j + 1]);
                        let prod = _mm256_maddubs_epi16(crumbs(q, j), a);
                        let i =
                            _mm256_madd_epi16(prod, halves(i16::from(s0 & 15), i16::from(s1 & 15)));
                        let qsum = _mm256_maddubs_epi16(ones, a);
                        let m =
                            _mm256_madd_epi16(qsum, halves(i16::from(s0 >> 4), i16::from(s1 >> 4)));
                        let dk = x.d[k];
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * dk), _mm256_cvtepi32_ps(i), acc);
                        minacc = _mm256_fmadd_ps(
                            _mm256_set1_ps(dmin * dk),
                            _mm256_cvtepi32_ps(m),
                            minacc,
                        );
                        k += 1;
                    }
                }
            }
        }
        hsum(acc) - hsum(minacc)
    }

    /// Q3_K: the 16 signed scales decoded once per block; per 128 weights
    /// one load of 2-bit codes makes four sub-blocks, each with its bit of
    /// `hmask` (set: code + 4); `Σ (u − 4)·q` as `maddubs(u, q) − maddubs(4,
    /// q)` in i16, then the two 16-weight scales by `vpmaddwd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_q3k(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        let c4 = _mm256_set1_epi8(4);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut k = 0;
        for b in row.chunks_exact(110) {
            let p = b.as_ptr();
            let scales = q3k_scales(&b[96..108]);
            // SAFETY: `b` is one whole block; blocks k..k+8 of `x` exist.
            unsafe {
                let d = f16_at(p.add(108));
                let hm = _mm256_loadu_si256(p as *const __m256i);
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(32 + 32 * n) as *const __m256i);
                    for j in 0..4 {
                        let bit = _mm256_set1_epi8((1u8 << (4 * n + j)) as i8);
                        let clear =
                            _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), _mm256_setzero_si256());
                        let u = _mm256_or_si256(crumbs(q, j), _mm256_andnot_si256(clear, c4));
                        let a = act(x, k);
                        let prod = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(u, a),
                            _mm256_maddubs_epi16(c4, a),
                        );
                        let s = 8 * n + 2 * j;
                        let sc = halves(i16::from(scales[s]) - 32, i16::from(scales[s + 1]) - 32);
                        let i = _mm256_madd_epi16(prod, sc);
                        let f = _mm256_set1_ps(d * x.d[k]);
                        if j % 2 == 0 {
                            acc0 = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(i), acc0);
                        } else {
                            acc1 = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(i), acc1);
                        }
                        k += 1;
                    }
                }
            }
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// Q5_0 block `k` at `p`: its scale and signed codes `c − 16`, straight
    /// from the nibbles: where the fifth bit is clear the byte is
    /// `nibble | 0xF0` (that is `nibble − 16` in two's complement), where it
    /// is set the nibble itself. SAFETY (caller): one whole block at `p`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn q5_0_codes(p: *const u8) -> (f32, __m256i) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let qh = (p.add(2) as *const u32).read_unaligned();
            let low = _mm256_andnot_si256(bytes_from_bits(qh), _mm256_set1_epi8(0xF0u8 as i8));
            (f16_at(p), _mm256_or_si256(nibbles16(p.add(6)), low))
        }
    }

    /// Q5_0 rows against the per-32 activations of `NT` tokens (from `t0`,
    /// `cols` each, back to back in `x`), AVX2: each block's signed codes
    /// made once ([`q5_0_codes`]), then per token a signed dot (`vpsignb`
    /// moves the codes' signs onto the activations) and one float
    /// multiply-add; blocks alternate between two accumulators per token so
    /// that a single token's multiply-adds do not wait on each other.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_q5_0_x_avx2<const NT: usize>(
        row: &[u8],
        x: &Q8Ref<'_>,
        t0: usize,
        cols: usize,
    ) -> [f32; NT] {
        let nb = cols / SUB_BLOCK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; NT];
        for (k, b) in row.chunks_exact(22).enumerate() {
            // SAFETY: `b` is one whole block; block k of every token
            // t0..t0+NT exists (checked by the caller).
            unsafe {
                let (d, c) = q5_0_codes(b.as_ptr());
                let mag = _mm256_abs_epi8(c);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let a = act(x, (t0 + t) * nb + k);
                    let p = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, c));
                    let i = _mm256_madd_epi16(p, ones);
                    let f = _mm256_set1_ps(d * x.d[(t0 + t) * nb + k]);
                    acc[k & 1] = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(i), acc[k & 1]);
                }
            }
        }
        std::array::from_fn(|t| hsum(_mm256_add_ps(acc[t][0], acc[t][1])))
    }

    /// Q5_0 against per-32 activations (one token of [`rows_q5_0_x_avx2`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_q5_0(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        // SAFETY: the caller's guarantees for one token of `x.len` values.
        let [v] = unsafe { rows_q5_0_x_avx2::<1>(row, x, 0, x.len) };
        v
    }

    /// IQ4_NL (`XS` false) and IQ4_XS: indices through `pshufb` into the
    /// signed grid, then a signed dot; IQ4_XS adds a 6-bit scale per 32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_iq4<const XS: bool>(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        // SAFETY: the table is 16 bytes, loaded into both lanes.
        let grid = unsafe {
            let t = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
            _mm256_set_m128i(t, t)
        };
        let mut acc = _mm256_setzero_ps();
        let bytes = if XS { 136 } else { 18 };
        let mut k = 0;
        for b in row.chunks_exact(bytes) {
            let p = b.as_ptr();
            // SAFETY: `b` is one whole block; its blocks of `x` exist.
            unsafe {
                let d = f16_at(p);
                if XS {
                    for ib in 0..8 {
                        let ls = iq4xs_scale(b, ib);
                        let v = _mm256_shuffle_epi8(grid, nibbles16(p.add(8 + 16 * ib)));
                        let i = dot_i8_i8(v, act(x, k));
                        let f = _mm256_set1_ps(d * ls as f32 * x.d[k]);
                        acc = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(i), acc);
                        k += 1;
                    }
                } else {
                    let v = _mm256_shuffle_epi8(grid, nibbles16(p.add(2)));
                    let i = dot_i8_i8(v, act(x, k));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d[k]), _mm256_cvtepi32_ps(i), acc);
                    k += 1;
                }
            }
        }
        hsum(acc)
    }

    /// A Q4_K/Q5_K/Q6_K kernel's driver: the super-block kernel `row` for
    /// [`Q8Ref::super256`] activations (what the runtime gives K-quant
    /// weights, [`crate::kernels::Q8Kind::for_dtype`]); per-32 blocks, which
    /// only direct callers pass, go to the scalar reference.
    fn kquant_rows(
        dtype: DType,
        w: PackedRows<'_>,
        x: &Q8Ref<'_>,
        out: &mut [f32],
        row: unsafe fn(&[u8], &Q8Ref<'_>) -> f32,
    ) {
        if x.super256 {
            each_row(dtype, w, x, out, row)
        } else {
            matvec_scalar(dtype, w, x, out)
        }
    }

    pub fn vec_dot_q2k_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        each_row(DType::Q2K, w, x, out, row_q2k)
    }
    pub fn vec_dot_q3k_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        each_row(DType::Q3K, w, x, out, row_q3k)
    }
    pub fn vec_dot_q4k_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        kquant_rows(DType::Q4K, w, x, out, row_q45k_super::<false>)
    }
    pub fn vec_dot_q5k_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        kquant_rows(DType::Q5K, w, x, out, row_q45k_super::<true>)
    }
    pub fn vec_dot_q6k_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        kquant_rows(DType::Q6K, w, x, out, row_q6k_super)
    }
    pub fn vec_dot_q5_0_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        each_row(DType::Q5_0, w, x, out, row_q5_0)
    }
    pub fn vec_dot_iq4nl_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        each_row(DType::IQ4NL, w, x, out, row_iq4::<false>)
    }
    pub fn vec_dot_iq4xs_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        each_row(DType::IQ4XS, w, x, out, row_iq4::<true>)
    }

    /// Q4_K / Q5_K against [`Q8Ref::super256`] activations, AVX-512 (one
    /// token of [`rows_q45k_x`]).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn row_q45k_super_avx512<const FIVE: bool>(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        // SAFETY: the caller's guarantees for one token of `x.len` values.
        let [v] = unsafe { rows_q45k_x::<FIVE, 1>(row, x, 0, x.len) };
        v
    }

    /// Q6_K against [`Q8Ref::super256`] activations, AVX-512 (one token of
    /// [`rows_q6k_x`]).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn row_q6k_super_avx512(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        // SAFETY: the caller's guarantees for one token of `x.len` values.
        let [v] = unsafe { rows_q6k_x::<1>(row, x, 0, x.len) };
        v
    }

    /// 32 i16 lanes: `lo` in the low 256 bits, `hi` in the high ones.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn halves512(lo: i16, hi: i16) -> __m512i {
        _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
            _mm256_set1_epi16(hi),
            1,
        )
    }

    /// Q4_K / Q5_K rows against the [`Q8Ref::super256`] activations of
    /// `NT` tokens (from `t0`, `cols` each, back to back in `x`), AVX-512:
    /// the eight sub-blocks share each token's activation scale, so their
    /// scaled integer sums add up in i32 and one float multiply-add ends
    /// the super-block. Two sub-blocks per 512-bit step (the 32 bytes of
    /// nibbles broadcast to both halves, shifted by 0 and 4 per half), the
    /// pair's scales as the i16 lanes of each half (`vpermw`), products
    /// summed by VNNI's `vpdpwssd`; each pair unpacked once for every token.
    /// Scales and minimums from the word form ([`scales_mins_k4`]).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn rows_q45k_x<const FIVE: bool, const NT: usize>(
        row: &[u8],
        x: &Q8Ref<'_>,
        t0: usize,
        cols: usize,
    ) -> [f32; NT] {
        let bytes = if FIVE { 176 } else { 144 };
        let nb = cols / SUB_BLOCK;
        let m4 = _mm512_set1_epi8(0x0F);
        let one = _mm512_set1_epi8(1);
        let nib_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
        // Pair n: scales (and fifth bits) 2n and 2n + 1.
        let pair: [__m512i; 4] = std::array::from_fn(|n| halves512(2 * n as i16, 2 * n as i16 + 1));
        let mut acc = [_mm512_setzero_ps(); NT];
        let mut minacc = [_mm256_setzero_ps(); NT];
        let mut k = 0;
        for b in row.chunks_exact(bytes) {
            let p = b.as_ptr();
            let (sc, mn) = scales_mins_k4(&b[4..16]);
            // SAFETY: `b` is one whole block; blocks k..k+8 of every token
            // t0..t0+NT exist (checked by the caller).
            unsafe {
                let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
                let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64)));
                let dm = _mm256_mul_ps(_mm256_set1_ps(dmin), m);
                for (t, ma) in minacc.iter_mut().enumerate() {
                    let ds = _mm256_loadu_ps(x.ds.as_ptr().add((t0 + t) * nb + k));
                    *ma = _mm256_fmadd_ps(dm, ds, *ma);
                }
                let scales =
                    _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
                let qs = p.add(if FIVE { 48 } else { 16 });
                let qh = if FIVE {
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(16) as *const __m256i))
                } else {
                    _mm512_setzero_si512()
                };
                let mut sum = [_mm512_setzero_si512(); NT];
                for (n, &pn) in pair.iter().enumerate() {
                    let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        qs.add(32 * n) as *const __m256i
                    ));
                    let mut c = _mm512_and_si512(_mm512_srlv_epi16(q, nib_shift), m4);
                    if FIVE {
                        let h = _mm512_and_si512(_mm512_srlv_epi16(qh, pn), one);
                        c = _mm512_or_si512(c, _mm512_slli_epi16(h, 4));
                    }
                    let scale = _mm512_permutexvar_epi16(pn, scales);
                    for (t, st) in sum.iter_mut().enumerate() {
                        let at = x.qs.as_ptr().add((t0 + t) * cols + (k + 2 * n) * SUB_BLOCK);
                        let a = _mm512_loadu_si512(at as *const _);
                        *st = _mm512_dpwssd_epi32(*st, _mm512_maddubs_epi16(c, a), scale);
                    }
                }
                for (t, (a, st)) in acc.iter_mut().zip(sum).enumerate() {
                    let f = _mm512_set1_ps(d * x.d[(t0 + t) * nb + k]);
                    *a = _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(st), *a);
                }
            }
            k += 8;
        }
        std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) - hsum(minacc[t]))
    }

    /// Q6_K rows against `NT` tokens' [`Q8Ref::super256`] activations,
    /// AVX-512 (tokens as in [`rows_q45k_x`]): per 128 weights two 512-bit
    /// steps of two sub-blocks each (low nibbles of both 32-byte runs, then
    /// high nibbles; the high pairs of `qh` shifted per half by `vpsrlvw`),
    /// the four 16-weight scales of each step as its i16 lanes (`vpermw`),
    /// `vpdpwssd` into one i32 sum per token and super-block.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn rows_q6k_x<const NT: usize>(
        row: &[u8],
        x: &Q8Ref<'_>,
        t0: usize,
        cols: usize,
    ) -> [f32; NT] {
        let nb = cols / SUB_BLOCK;
        let m4 = _mm512_set1_epi8(0x0F);
        let m2 = _mm512_set1_epi8(3);
        let c32 = _mm512_set1_epi8(32);
        let (h_lo, h_hi) = (halves512(0, 2), halves512(4, 6));
        let idx: [__m512i; 4] = std::array::from_fn(|m| {
            let v: [i16; 32] = std::array::from_fn(|l| (4 * m + l / 8) as i16);
            // SAFETY: 64 bytes read from a 64-byte array.
            unsafe { _mm512_loadu_si512(v.as_ptr() as *const _) }
        });
        let mut acc = [_mm512_setzero_ps(); NT];
        let mut k = 0;
        for b in row.chunks_exact(210) {
            let p = b.as_ptr();
            // SAFETY: `b` is one whole block; blocks k..k+8 of every token
            // t0..t0+NT exist (checked by the caller).
            unsafe {
                let d = f16_at(p.add(208));
                let scales = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(
                    p.add(192) as *const __m128i,
                )));
                let mut sum = [_mm512_setzero_si512(); NT];
                for n in 0..2 {
                    let ql = _mm512_loadu_si512(p.add(64 * n) as *const _);
                    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        p.add(128 + 32 * n) as *const __m256i
                    ));
                    let high = |sh: __m512i| {
                        _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sh), m2), 4)
                    };
                    let codes = [
                        _mm512_or_si512(_mm512_and_si512(ql, m4), high(h_lo)),
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), high(h_hi)),
                    ];
                    for (half, c) in codes.into_iter().enumerate() {
                        let sub = k + 4 * n + 2 * half;
                        let scale = _mm512_permutexvar_epi16(idx[2 * n + half], scales);
                        for (t, st) in sum.iter_mut().enumerate() {
                            let at = x.qs.as_ptr().add((t0 + t) * cols + sub * SUB_BLOCK);
                            let a = _mm512_loadu_si512(at as *const _);
                            let prod = _mm512_sub_epi16(
                                _mm512_maddubs_epi16(c, a),
                                _mm512_maddubs_epi16(c32, a),
                            );
                            *st = _mm512_dpwssd_epi32(*st, prod, scale);
                        }
                    }
                }
                for (t, (a, st)) in acc.iter_mut().zip(sum).enumerate() {
                    let f = _mm512_set1_ps(d * x.d[(t0 + t) * nb + k]);
                    *a = _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(st), *a);
                }
            }
            k += 8;
        }
        std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]))
    }

    /// 16 f32 lanes: `lo` in the low 256 bits, `hi` in the high ones.
    #[target_feature(enable = "avx512f,avx512dq")]
    #[inline]
    unsafe fn halves512_ps(lo: f32, hi: f32) -> __m512 {
        _mm512_insertf32x8(
            _mm512_castps256_ps512(_mm256_set1_ps(lo)),
            _mm256_set1_ps(hi),
            1,
        )
    }

    /// Q5_0 rows against the per-32 activations of `NT` tokens (tokens as
    /// in [`rows_q45k_x`]), AVX-512 VNNI: two blocks per 512-bit step. The
    /// 16 bytes of nibbles of each block go to two 128-bit lanes, shifted
    /// by 0 and 4 (`vpsrlvw`); the 64 fifth bits are a byte mask that keeps
    /// the nibble where set and `nibble − 16` where clear, so the signed
    /// codes `s` are made once per pair. VNNI's `vpdpbusd` multiplies
    /// unsigned by signed bytes, so the activations go in as `a + 128` (one
    /// XOR) and each token's sum starts at `−128·Σ s`, computed once per
    /// pair: `Σ (a + 128)·s − 128·Σ s = Σ a·s`. The block scales multiply
    /// the two halves (`d_w · d_x` per half), one float multiply-add per
    /// token and pair. An odd last block runs as a pair with an empty
    /// second block (masked activation load, zero scale).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn rows_q5_0_x<const NT: usize>(
        row: &[u8],
        x: &Q8Ref<'_>,
        t0: usize,
        cols: usize,
    ) -> [f32; NT] {
        let nb = cols / SUB_BLOCK;
        let m4 = _mm512_set1_epi8(0x0F);
        let c16 = _mm512_set1_epi8(16);
        let flip = _mm512_set1_epi8(i8::MIN);
        // Per 128-bit lane: shift by 0 (low nibbles), 4, 0, 4.
        let shift = _mm512_set_epi64(
            0x0004_0004_0004_0004,
            0x0004_0004_0004_0004,
            0,
            0,
            0x0004_0004_0004_0004,
            0x0004_0004_0004_0004,
            0,
            0,
        );
        let mut acc = [_mm512_setzero_ps(); NT];
        let mut k = 0;
        while k < nb {
            let two = k + 1 < nb;
            // SAFETY: blocks k (and k + 1 where `two`) are whole blocks of
            // `row`; the same blocks of every token t0..t0+NT exist (checked
            // by the caller); the second block's activations are read only
            // where it exists (masked load).
            unsafe {
                let pa = row.as_ptr().add(22 * k);
                let qa = _mm_loadu_si128(pa.add(6) as *const __m128i);
                let (db, qb, hb) = if two {
                    let pb = pa.add(22);
                    let hb = (pb.add(2) as *const u32).read_unaligned();
                    (f16_at(pb), _mm_loadu_si128(pb.add(6) as *const __m128i), hb)
                } else {
                    (0.0, _mm_setzero_si128(), 0)
                };
                let ha = (pa.add(2) as *const u32).read_unaligned();
                let v = _mm512_inserti32x4(
                    _mm512_inserti32x4(
                        _mm512_inserti32x4(_mm512_castsi128_si512(qa), qa, 1),
                        qb,
                        2,
                    ),
                    qb,
                    3,
                );
                let nib = _mm512_and_si512(_mm512_srlv_epi16(v, shift), m4);
                let high = u64::from(ha) | (u64::from(hb) << 32);
                let s = _mm512_mask_mov_epi8(_mm512_sub_epi8(nib, c16), high, nib);
                let zero = _mm512_setzero_si512();
                let start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, s));
                let dw = halves512_ps(f16_at(pa), db);
                let load: u64 = if two { !0 } else { 0xFFFF_FFFF };
                for (t, acc) in acc.iter_mut().enumerate() {
                    let at = x.qs.as_ptr().add((t0 + t) * cols + k * SUB_BLOCK);
                    let a = _mm512_xor_si512(_mm512_maskz_loadu_epi8(load, at), flip);
                    let sum = _mm512_dpbusd_epi32(start, a, s);
                    let dx = x.d.as_ptr().add((t0 + t) * nb + k);
                    let dxb = if two { *dx.add(1) } else { 0.0 };
                    let f = _mm512_mul_ps(dw, halves512_ps(*dx, dxb));
                    *acc = _mm512_fmadd_ps(f, _mm512_cvtepi32_ps(sum), *acc);
                }
            }
            k += 2;
        }
        std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]))
    }

    /// Q5_0 against per-32 activations, AVX-512 (one token of [`rows_q5_0_x`]).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn row_q5_0_avx512(row: &[u8], x: &Q8Ref<'_>) -> f32 {
        // SAFETY: the caller's guarantees for one token of `x.len` values.
        let [v] = unsafe { rows_q5_0_x::<1>(row, x, 0, x.len) };
        v
    }

    /// Q4_K / Q5_K rows against `NT` tokens' [`Q8Ref::super256`]
    /// activations, AVX2 (tokens as in [`rows_q45k_x`]): per 64 weights one
    /// 32-byte load of nibbles (and the fifth bits of `qh`) makes two
    /// sub-blocks, each scale multiplying the i16 products in `vpmaddwd`;
    /// the scaled integer sums add up in i32 over the super-block, one float
    /// multiply-add per token; the minimums against `ds`, eight at a time.
    /// Each sub-block's codes unpacked once for every token.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_q45k_x_avx2<const FIVE: bool, const NT: usize>(
        row: &[u8],
        x: &Q8Ref<'_>,
        t0: usize,
        cols: usize,
    ) -> [f32; NT] {
        let bytes = if FIVE { 176 } else { 144 };
        let nb = cols / SUB_BLOCK;
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut minacc = [_mm256_setzero_ps(); NT];
        let mut k = 0;
        for b in row.chunks_exact(bytes) {
            let p = b.as_ptr();
            let (sc, mn) = scales_mins_k4(&b[4..16]);
            // SAFETY: `b` is one whole block; blocks k..k+8 of every token
            // t0..t0+NT exist (checked by the caller).
            unsafe {
                let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
                let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64)));
                let dm = _mm256_mul_ps(_mm256_set1_ps(dmin), m);
                for (t, ma) in minacc.iter_mut().enumerate() {
                    let ds = _mm256_loadu_ps(x.ds.as_ptr().add((t0 + t) * nb + k));
                    *ma = _mm256_fmadd_ps(dm, ds, *ma);
                }
                let qs = p.add(if FIVE { 48 } else { 16 });
                let mut qh = if FIVE {
                    _mm256_loadu_si256(p.add(16) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                let mut sum = [_mm256_setzero_si256(); NT];
                for n in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * n) as *const __m256i);
                    let mut lo = _mm256_and_si256(q, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    if FIVE {
                        let h0 = _mm256_and_si256(qh, one);
                        let h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 1), one);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
                        qh = _mm256_srli_epi16(qh, 2);
                    }
                    let s0 = _mm256_set1_epi16(((sc >> (16 * n)) & 0xff) as i16);
                    let s1 = _mm256_set1_epi16(((sc >> (16 * n + 8)) & 0xff) as i16);
                    for (t, st) in sum.iter_mut().enumerate() {
                        let at = x.qs.as_ptr().add((t0 + t) * cols + (k + 2 * n) * SUB_BLOCK);
                        let a0 = _mm256_loadu_si256(at as *const __m256i);
                        let a1 = _mm256_loadu_si256(at.add(SUB_BLOCK) as *const __m256i);
                        let i0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), s0);
                        let i1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), s1);
                        *st = _mm256_add_epi32(*st, _mm256_add_epi32(i0, i1));
                    }
                }
                for (t, (a, st)) in acc.iter_mut().zip(sum).enumerate() {
                    let f = _mm256_set1_ps(d * x.d[(t0 + t) * nb + k]);
                    *a = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(st), *a);
                }
            }
            k += 8;
        }
        std::array::from_fn(|t| hsum(acc[t]) - hsum(minacc[t]))
    }

    /// Q6_K rows against `NT` tokens' [`Q8Ref::super256`] activations,
    /// AVX2: per 128 weights two 32-byte loads of low nibbles and one of high
    /// pairs make four sub-blocks; `Σ (c − 32)·q` as `maddubs(c, q) −
    /// maddubs(32, q)` in i16, the two 16-weight scales by `vpmaddwd`, the
    /// scaled sums added in i32 over the super-block; each sub-block's codes
    /// unpacked once for every token.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_q6k_x_avx2<const NT: usize>(
        row: &[u8],
        x: &Q8Ref<'_>,
        t0: usize,
        cols: usize,
    ) -> [f32; NT] {
        let nb = cols / SUB_BLOCK;
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        let c32 = _mm256_set1_epi8(32);
        let mut acc = [_mm256_setzero_ps(); NT];
        let mut k = 0;
        for b in row.chunks_exact(210) {
            let p = b.as_ptr();
            // SAFETY: `b` is one whole block; blocks k..k+8 of every token
            // t0..t0+NT exist (checked by the caller).
            unsafe {
                let d = f16_at(p.add(208));
                let mut sum = [_mm256_setzero_si256(); NT];
                for n in 0..2 {
                    let ql0 = _mm256_loadu_si256(p.add(64 * n) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(p.add(64 * n + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                    let high = |h: __m256i| _mm256_slli_epi16(_mm256_and_si256(h, m2), 4);
                    let codes = [
                        _mm256_or_si256(_mm256_and_si256(ql0, m4), high(qh)),
                        _mm256_or_si256(_mm256_and_si256(ql1, m4), high(_mm256_srli_epi16(qh, 2))),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                            high(_mm256_srli_epi16(qh, 4)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                            high(_mm256_srli_epi16(qh, 6)),
                        ),
                    ];
                    for (part, c) in codes.into_iter().enumerate() {
                        let sub = k + 4 * n + part;
                        let s = 192 + 8 * n + 2 * part;
                        let (s0, s1) = (i16::from(b[s] as i8), i16::from(b[s + 1] as i8));
                        let scale = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                        for (t, st) in sum.iter_mut().enumerate() {
                            let at = x.qs.as_ptr().add((t0 + t) * cols + sub * SUB_BLOCK);
                            let a = _mm256_loadu_si256(at as *const __m256i);
                            let prod = _mm256_sub_epi16(
                                _mm256_maddubs_epi16(c, a),
                                _mm256_maddubs_epi16(c32, a),
                            );
                            *st = _mm256_add_epi32(*st, _mm256_madd_epi16(prod, scale));
                        }
                    }
                }
                for (t, (a, st)) in acc.iter_mut().zip(sum).enumerate() {
                    let f = _mm256_set1_ps(d * x.d[(t0 + t) * nb + k]);
                    *a = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(st), *a);
                }
            }
            k += 8;
        }
        std::array::from_fn(|t| hsum(acc[t]))
    }

    /// A batched-kernel table: the driver `matmul_x86` over each type's
    /// row functions (`$q5_0`, `$q45k`, `$q6k`) at `$g` tokens and at one.
    macro_rules! matmul_table {
        ($g:literal, $q5_0:ident, $q45k:ident, $q6k:ident) => {{
            fn q5_0(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32], out_rs: usize) {
                let (many, one) = ($q5_0::<$g>, $q5_0::<1>);
                matmul_x86(DType::Q5_0, w, x, out, out_rs, many, one)
            }
            fn q4k(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32], out_rs: usize) {
                let (many, one) = ($q45k::<false, $g>, $q45k::<false, 1>);
                matmul_x86(DType::Q4K, w, x, out, out_rs, many, one)
            }
            fn q5k(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32], out_rs: usize) {
                let (many, one) = ($q45k::<true, $g>, $q45k::<true, 1>);
                matmul_x86(DType::Q5K, w, x, out, out_rs, many, one)
            }
            fn q6k(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32], out_rs: usize) {
                let (many, one) = ($q6k::<$g>, $q6k::<1>);
                matmul_x86(DType::Q6K, w, x, out, out_rs, many, one)
            }
            [
                Some(q5_0),
                None,
                None,
                Some(q4k),
                Some(q5k),
                Some(q6k),
                None,
                None,
            ]
        }};
    }

    /// Batched kernels, AVX2 (four tokens per unpacked block: sixteen
    /// vector registers).
    pub const MATMUL_AVX2: GgufMatmulTable =
        matmul_table!(4, rows_q5_0_x_avx2, rows_q45k_x_avx2, rows_q6k_x_avx2);

    /// Batched kernels, AVX-512 VNNI (eight tokens per unpacked block: 32
    /// vector registers hold their sums; against four, Qwen2.5-Coder-1.5B
    /// Q4_K_M pp128 36.6–38.1 → 40.9 tok/s at one thread, 67.9–68.4 →
    /// 74.8–76.6 at two, old and new binaries alternating).
    pub const MATMUL_AVX512: GgufMatmulTable =
        matmul_table!(8, rows_q5_0_x, rows_q45k_x, rows_q6k_x);

    /// The x86 [`GgufMatmulFn`] driver: tokens `G` at a time (the last
    /// ones one at a time), every row of `w` for each group.
    fn matmul_x86<const G: usize>(
        dtype: DType,
        w: PackedRows<'_>,
        x: &Q8Ref<'_>,
        out: &mut [f32],
        out_rs: usize,
        many: unsafe fn(&[u8], &Q8Ref<'_>, usize, usize) -> [f32; G],
        one: unsafe fn(&[u8], &Q8Ref<'_>, usize, usize) -> [f32; 1],
    ) {
        assert_eq!(w.dtype(), dtype, "gguf matmul: weight type");
        let n_tok = check_batch(&w, x, out, out_rs);
        let cols = w.cols();
        let mut t0 = 0;
        while t0 < n_tok {
            let group = if n_tok - t0 >= G { G } else { 1 };
            for r in 0..w.rows() {
                // SAFETY: the tables holding these kernels are built only
                // after their features were detected; `check_batch` and
                // `PackedRows` guarantee whole blocks per row, `cols` per token.
                let got = if group == G {
                    unsafe { many(w.row(r), x, t0, cols) }
                } else {
                    let [v] = unsafe { one(w.row(r), x, t0, cols) };
                    [v; G]
                };
                for (t, &v) in got[..group].iter().enumerate() {
                    out[(t0 + t) * out_rs + r] = v;
                }
            }
            t0 += group;
        }
    }

    pub fn vec_dot_q5_0_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        each_row(DType::Q5_0, w, x, out, row_q5_0_avx512)
    }
    pub fn vec_dot_q4k_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        kquant_rows(DType::Q4K, w, x, out, row_q45k_super_avx512::<false>)
    }
    pub fn vec_dot_q5k_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        kquant_rows(DType::Q5K, w, x, out, row_q45k_super_avx512::<true>)
    }
    pub fn vec_dot_q6k_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        kquant_rows(DType::Q6K, w, x, out, row_q6k_super_avx512)
    }

    /// The AVX-512 table: its own super-block kernels for Q4_K, Q5_K and
    /// Q6_K, the AVX2 ones elsewhere (unpacking, not the dot, limits them).
    pub const AVX512: [crate::kernels::QgMatvecFn; 8] = [
        vec_dot_q5_0_q8_avx512,
        vec_dot_q2k_q8_avx2,
        vec_dot_q3k_q8_avx2,
        vec_dot_q4k_q8_avx512,
        vec_dot_q5k_q8_avx512,
        vec_dot_q6k_q8_avx512,
        vec_dot_iq4nl_q8_avx2,
        vec_dot_iq4xs_q8_avx2,
    ];

    /// The AVX2 table, in [`DType::GGUF_BLOCKS`] order.
    pub const AVX2: [crate::kernels::QgMatvecFn; 8] = [
        vec_dot_q5_0_q8_avx2,
        vec_dot_q2k_q8_avx2,
        vec_dot_q3k_q8_avx2,
        vec_dot_q4k_q8_avx2,
        vec_dot_q5k_q8_avx2,
        vec_dot_q6k_q8_avx2,
        vec_dot_iq4nl_q8_avx2,
        vec_dot_iq4xs_q8_avx2,
    ];
}

#[cfg(target_arch = "aarch64")]
pub mod neon {
    //! NEON versions, with and without the dot-product extension (`sdot`):
    //! codes unpacked to signed bytes per 16 lanes, one integer dot per
    //! sub-block (per 16-weight half for Q6_K's scales), the float scale
    //! applied to its sum.
    use super::*;
    use crate::kernels::qg::neon::{dot16, dot16_sdot};
    use half::f16;
    use nibble_format::gguf_blocks::{iq4xs_scale, q3k_scales, scale_min_k4, KVALUES_IQ4NL};
    use std::arch::aarch64::*;

    fn f16_at(b: &[u8], i: usize) -> f32 {
        f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
    }

    /// Activation block `k` as two halves. SAFETY (caller): it exists.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn act(x: &Q8Ref<'_>, k: usize) -> (int8x16_t, int8x16_t) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let q = x.qs.as_ptr().add(k * SUB_BLOCK);
            (vld1q_s8(q), vld1q_s8(q.add(16)))
        }
    }

    /// Byte `j` of the result = 0x10 where bit `j` of `bits` (16 bits) is set.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn fifth_bits(bits: u32) -> uint8x16_t {
        const MASK: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        // SAFETY: MASK holds 16 bytes.
        let mask = unsafe { vld1q_u8(MASK.as_ptr()) };
        let b = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
        vandq_u8(vtstq_u8(b, mask), vdupq_n_u8(0x10))
    }

    /// The 2-bit codes of 16 bytes at shift `2·j`.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn crumbs(q: uint8x16_t, j: usize) -> uint8x16_t {
        let v = match j {
            0 => q,
            1 => vshrq_n_u8(q, 2),
            2 => vshrq_n_u8(q, 4),
            _ => vshrq_n_u8(q, 6),
        };
        vandq_u8(v, vdupq_n_u8(3))
    }

    macro_rules! neon_rows {
        (
            $q2k:ident, $q3k:ident, $q45k:ident, $q6k:ident, $q50:ident, $iq4:ident,
            $features:literal, $dot:ident
        ) => {
            /// Q2_K: one dot per 16-weight half (its own scale), and the
            /// activations' sum over it for its own minimum. SAFETY
            /// (caller): `row` is whole blocks, `x` has their activation
            /// blocks.
            #[target_feature(enable = $features)]
            unsafe fn $q2k(row: &[u8], x: &Q8Ref<'_>) -> f32 {
                let ones = vdupq_n_s8(1);
                let (mut sum, mut mins, mut k) = (0f32, 0f32, 0usize);
                for b in row.chunks_exact(84) {
                    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                    for n in 0..2 {
                        for j in 0..4 {
                            for half in 0..2 {
                                let sc = b[8 * n + 2 * j + half];
                                // SAFETY: the loads lie inside the block `b`;
                                // block k of `x` exists (caller).
                                let (i, qsum) = unsafe {
                                    let q = vld1q_u8(b.as_ptr().add(16 + 32 * n + 16 * half));
                                    let c = vreinterpretq_s8_u8(crumbs(q, j));
                                    let xq = vld1q_s8(x.qs.as_ptr().add(k * SUB_BLOCK + 16 * half));
                                    (vaddvq_s32($dot(c, xq)), vaddvq_s32($dot(ones, xq)))
                                };
                                sum += d * x.d[k] * (i * i32::from(sc & 15)) as f32;
                                mins += dmin * x.d[k] * (qsum * i32::from(sc >> 4)) as f32;
                            }
                            k += 1;
                        }
                    }
                }
                sum - mins
            }

            /// Q3_K: the 2-bit code plus 4 where its `hmask` bit is set,
            /// minus 4, as signed bytes; one dot per 16-weight half.
            /// SAFETY (caller): as above.
            #[target_feature(enable = $features)]
            unsafe fn $q3k(row: &[u8], x: &Q8Ref<'_>) -> f32 {
                let c4 = vdupq_n_u8(4);
                let (mut sum, mut k) = (0f32, 0usize);
                for b in row.chunks_exact(110) {
                    let d = f16_at(b, 108);
                    let scales = q3k_scales(&b[96..108]);
                    for n in 0..2 {
                        for j in 0..4 {
                            let bit = vdupq_n_u8(1 << (4 * n + j));
                            for half in 0..2 {
                                // SAFETY: the loads lie inside the block `b`;
                                // block k of `x` exists (caller).
                                let i = unsafe {
                                    let q = vld1q_u8(b.as_ptr().add(32 + 32 * n + 16 * half));
                                    let hm = vld1q_u8(b.as_ptr().add(16 * half));
                                    let u = vorrq_u8(crumbs(q, j), vandq_u8(vtstq_u8(hm, bit), c4));
                                    let c =
                                        vsubq_s8(vreinterpretq_s8_u8(u), vreinterpretq_s8_u8(c4));
                                    let xq = vld1q_s8(x.qs.as_ptr().add(k * SUB_BLOCK + 16 * half));
                                    vaddvq_s32($dot(c, xq))
                                };
                                let sc = i32::from(scales[8 * n + 2 * j + half]) - 32;
                                sum += d * x.d[k] * (i * sc) as f32;
                            }
                            k += 1;
                        }
                    }
                }
                sum
            }

            /// Q4_K / Q5_K (`FIVE`). SAFETY (caller): `row` is whole blocks,
            /// `x` has their activation blocks.
            #[target_feature(enable = $features)]
            unsafe fn $q45k<const FIVE: bool>(row: &[u8], x: &Q8Ref<'_>) -> f32 {
                let bytes = if FIVE { 176 } else { 144 };
                let m4 = vdupq_n_u8(0x0F);
                let h16 = vdupq_n_u8(0x10);
                let (mut sum, mut mins, mut k) = (0f32, 0f32, 0usize);
                for b in row.chunks_exact(bytes) {
                    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                    let scales = &b[4..16];
                    let qs = &b[if FIVE { 48 } else { 16 }..];
                    // SAFETY: all loads lie inside the block `b`; blocks
                    // k..k+8 of `x` exist (caller).
                    unsafe {
                        let (qh0, qh1) = if FIVE {
                            (vld1q_u8(b.as_ptr().add(16)), vld1q_u8(b.as_ptr().add(32)))
                        } else {
                            (vdupq_n_u8(0), vdupq_n_u8(0))
                        };
                        for n in 0..4 {
                            let q0 = vld1q_u8(qs.as_ptr().add(32 * n));
                            let q1 = vld1q_u8(qs.as_ptr().add(32 * n + 16));
                            let (mut l0, mut l1) = (vandq_u8(q0, m4), vandq_u8(q1, m4));
                            let (mut h0, mut h1) = (vshrq_n_u8(q0, 4), vshrq_n_u8(q1, 4));
                            if FIVE {
                                let u1 = vdupq_n_u8(1 << (2 * n));
                                let u2 = vdupq_n_u8(2 << (2 * n));
                                l0 = vorrq_u8(l0, vandq_u8(vtstq_u8(qh0, u1), h16));
                                l1 = vorrq_u8(l1, vandq_u8(vtstq_u8(qh1, u1), h16));
                                h0 = vorrq_u8(h0, vandq_u8(vtstq_u8(qh0, u2), h16));
                                h1 = vorrq_u8(h1, vandq_u8(vtstq_u8(qh1, u2), h16));
                            }
                            let (s0, m0) = scale_min_k4(2 * n, scales);
                            let (s1, m1) = scale_min_k4(2 * n + 1, scales);
                            let (x0, x1) = act(x, k);
                            let i0 = vaddvq_s32(vaddq_s32(
                                $dot(vreinterpretq_s8_u8(l0), x0),
                                $dot(vreinterpretq_s8_u8(l1), x1),
                            ));
                            let (x0, x1) = act(x, k + 1);
                            let i1 = vaddvq_s32(vaddq_s32(
                                $dot(vreinterpretq_s8_u8(h0), x0),
                                $dot(vreinterpretq_s8_u8(h1), x1),
                            ));
                            sum += d * f32::from(s0) * x.d[k] * i0 as f32
                                + d * f32::from(s1) * x.d[k + 1] * i1 as f32;
                            mins += dmin * (f32::from(m0) * x.ds[k] + f32::from(m1) * x.ds[k + 1]);
                            k += 2;
                        }
                    }
                }
                sum - mins
            }

            /// Q6_K: codes − 32 as signed bytes, one dot per 16-weight half
            /// (one scale each). SAFETY (caller): as above.
            #[target_feature(enable = $features)]
            unsafe fn $q6k(row: &[u8], x: &Q8Ref<'_>) -> f32 {
                let m4 = vdupq_n_u8(0x0F);
                let m3 = vdupq_n_u8(3);
                let c32 = vdupq_n_s8(32);
                let (mut sum, mut k) = (0f32, 0usize);
                for b in row.chunks_exact(210) {
                    let d = f16_at(b, 208);
                    let p = b.as_ptr();
                    for n in 0..2 {
                        // SAFETY: all loads lie inside the block `b`; its
                        // activation blocks exist (caller).
                        unsafe {
                            for half in 0..2 {
                                let ql0 = vld1q_u8(p.add(64 * n + 16 * half));
                                let ql1 = vld1q_u8(p.add(64 * n + 32 + 16 * half));
                                let qh = vld1q_u8(p.add(128 + 32 * n + 16 * half));
                                let hi = |s: i32| -> uint8x16_t {
                                    let h = match s {
                                        0 => qh,
                                        2 => vshrq_n_u8(qh, 2),
                                        4 => vshrq_n_u8(qh, 4),
                                        _ => vshrq_n_u8(qh, 6),
                                    };
                                    vshlq_n_u8(vandq_u8(h, m3), 4)
                                };
                                let codes = [
                                    vorrq_u8(vandq_u8(ql0, m4), hi(0)),
                                    vorrq_u8(vandq_u8(ql1, m4), hi(2)),
                                    vorrq_u8(vshrq_n_u8(ql0, 4), hi(4)),
                                    vorrq_u8(vshrq_n_u8(ql1, 4), hi(6)),
                                ];
                                for (part, c) in codes.into_iter().enumerate() {
                                    let c = vsubq_s8(vreinterpretq_s8_u8(c), c32);
                                    let kk = k + part;
                                    let q = x.qs.as_ptr().add(kk * SUB_BLOCK + 16 * half);
                                    let i = vaddvq_s32($dot(c, vld1q_s8(q)));
                                    let s = b[192 + 8 * n + 2 * part + half] as i8;
                                    sum += d * x.d[kk] * (i * i32::from(s)) as f32;
                                }
                            }
                        }
                        k += 4;
                    }
                }
                sum
            }

            /// Q5_0: nibbles plus fifth bits, minus 16, as signed bytes.
            /// SAFETY (caller): as above.
            #[target_feature(enable = $features)]
            unsafe fn $q50(row: &[u8], x: &Q8Ref<'_>) -> f32 {
                let m4 = vdupq_n_u8(0x0F);
                let c16 = vdupq_n_s8(16);
                let mut sum = 0f32;
                for (k, b) in row.chunks_exact(22).enumerate() {
                    let d = f16_at(b, 0);
                    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    // SAFETY: the loads lie inside the block `b`; block k of
                    // `x` exists (caller).
                    unsafe {
                        let q = vld1q_u8(b.as_ptr().add(6));
                        let c0 = vorrq_u8(vandq_u8(q, m4), fifth_bits(qh));
                        let c1 = vorrq_u8(vshrq_n_u8(q, 4), fifth_bits(qh >> 16));
                        let c0 = vsubq_s8(vreinterpretq_s8_u8(c0), c16);
                        let c1 = vsubq_s8(vreinterpretq_s8_u8(c1), c16);
                        let (x0, x1) = act(x, k);
                        let i = vaddvq_s32(vaddq_s32($dot(c0, x0), $dot(c1, x1)));
                        sum += d * x.d[k] * i as f32;
                    }
                }
                sum
            }

            /// IQ4_NL (`XS` false) and IQ4_XS: indices through `tbl` into
            /// the signed grid. SAFETY (caller): as above.
            #[target_feature(enable = $features)]
            unsafe fn $iq4<const XS: bool>(row: &[u8], x: &Q8Ref<'_>) -> f32 {
                let m4 = vdupq_n_u8(0x0F);
                // SAFETY: the grid holds 16 values.
                let grid = unsafe { vld1q_s8(KVALUES_IQ4NL.as_ptr()) };
                let bytes = if XS { 136 } else { 18 };
                let (mut sum, mut k) = (0f32, 0usize);
                for b in row.chunks_exact(bytes) {
                    let d = f16_at(b, 0);
                    let n_sub = if XS { 8 } else { 1 };
                    for ib in 0..n_sub {
                        let (scale, at) = if XS {
                            (f32::from(iq4xs_scale(b, ib)), 8 + 16 * ib)
                        } else {
                            (1.0, 2)
                        };
                        // SAFETY: the load lies inside the block `b`; block
                        // k of `x` exists (caller).
                        unsafe {
                            let q = vld1q_u8(b.as_ptr().add(at));
                            let v0 = vqtbl1q_s8(grid, vandq_u8(q, m4));
                            let v1 = vqtbl1q_s8(grid, vshrq_n_u8(q, 4));
                            let (x0, x1) = act(x, k);
                            let i = vaddvq_s32(vaddq_s32($dot(v0, x0), $dot(v1, x1)));
                            sum += d * scale * x.d[k] * i as f32;
                        }
                        k += 1;
                    }
                }
                sum
            }
        };
    }

    neon_rows!(q2k_neon, q3k_neon, q45k_neon, q6k_neon, q5_0_neon, iq4_neon, "neon", dot16);
    neon_rows!(
        q2k_sdot,
        q3k_sdot,
        q45k_sdot,
        q6k_sdot,
        q5_0_sdot,
        iq4_sdot,
        "neon,dotprod",
        dot16_sdot
    );

    macro_rules! neon_table {
        ($name:ident, $q2k:ident, $q3k:ident, $q45k:ident, $q6k:ident, $q50:ident, $iq4:ident) => {
            /// The table, in [`DType::GGUF_BLOCKS`] order.
            pub const $name: [crate::kernels::QgMatvecFn; 8] = [
                |w, x, o| each_row(DType::Q5_0, w, x, o, $q50),
                |w, x, o| each_row(DType::Q2K, w, x, o, $q2k),
                |w, x, o| each_row(DType::Q3K, w, x, o, $q3k),
                |w, x, o| each_row(DType::Q4K, w, x, o, $q45k::<false>),
                |w, x, o| each_row(DType::Q5K, w, x, o, $q45k::<true>),
                |w, x, o| each_row(DType::Q6K, w, x, o, $q6k),
                |w, x, o| each_row(DType::IQ4NL, w, x, o, $iq4::<false>),
                |w, x, o| each_row(DType::IQ4XS, w, x, o, $iq4::<true>),
            ];
        };
    }

    neon_table!(NEON, q2k_neon, q3k_neon, q45k_neon, q6k_neon, q5_0_neon, iq4_neon);
    neon_table!(NEONDOT, q2k_sdot, q3k_sdot, q45k_sdot, q6k_sdot, q5_0_sdot, iq4_sdot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{lcg, make_gguf_rows};
    use crate::kernels::{Isa, Kernels, Q8Buf, Q8Kind};

    /// SIMD against the reference: relative to the sum of |terms|, as for
    /// the group kernels (float order only).
    const TOL: f32 = 2e-5;

    #[test]
    fn every_isa_matches_the_scalar_reference() {
        let mut seed = 42u64;
        let scalar = Kernels::for_isa(Isa::Scalar).unwrap();
        for dtype in DType::GGUF_BLOCKS {
            let (block, _) = dtype.gguf_block().unwrap();
            for (cols, rows, zero) in [
                (block, 3, false),
                (block * 3, 5, true),
                (block * 8, 9, false),
            ] {
                let data = make_gguf_rows(dtype, rows, cols, &mut seed, zero);
                let w = PackedRows::new(dtype, &data, rows, cols, block).unwrap();
                let xs: Vec<f32> = (0..cols).map(|_| lcg(&mut seed) * 3.0).collect();
                for kind in [Q8Kind::Blocks32, Q8Kind::Super256] {
                    let mut xq = Q8Buf::new(cols);
                    xq.quantize_as(kind, scalar.quantize_q8, &xs);
                    let mut want = vec![0f32; rows];
                    scalar.matvec_qg(dtype)(w, &xq.as_ref(), &mut want);
                    // The reference against the decoded weights in f64.
                    let mut deq = vec![0f32; cols];
                    let mut xd = vec![0f32; cols];
                    xq.as_ref().dequantize_into(&mut xd);
                    for (r, &want_r) in want.iter().enumerate() {
                        nibble_format::quant::dequantize(dtype, block, w.row(r), &mut deq);
                        let exact: f64 = deq
                            .iter()
                            .zip(&xd)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        let mag: f64 = deq
                            .iter()
                            .zip(&xd)
                            .map(|(a, b)| f64::from((a * b).abs()))
                            .sum();
                        assert!(
                            (f64::from(want_r) - exact).abs() <= 1e-5 * mag.max(1e-12),
                            "{dtype} reference row {r}: {want_r} vs {exact}"
                        );
                    }
                    for isa in Isa::available() {
                        let k = Kernels::for_isa(isa).unwrap();
                        let mut got = vec![f32::NAN; rows];
                        k.matvec_qg(dtype)(w, &xq.as_ref(), &mut got);
                        for r in 0..rows {
                            nibble_format::quant::dequantize(dtype, block, w.row(r), &mut deq);
                            let mag: f32 = deq.iter().zip(&xd).map(|(a, b)| (a * b).abs()).sum();
                            assert!(
                                (got[r] - want[r]).abs() <= TOL * mag.max(1e-12),
                                "{dtype} {isa} {kind:?} cols {cols} row {r}: {} vs {}",
                                got[r],
                                want[r]
                            );
                        }
                    }
                }
            }
        }
    }

    /// The batched kernels against the scalar reference for every
    /// instruction set that has one: 1, 3, 4, 5 and 9 tokens (groups of four
    /// and the one-at-a-time rest), output rows wider than the weight
    /// (`out_rs`), a zero-scale block, rows of an odd number of 32-blocks
    /// (Q5_0); positions outside the rows untouched.
    #[test]
    fn batched_gguf_kernels_match_the_scalar_reference() {
        let mut seed = 77u64;
        for dtype in [DType::Q5_0, DType::Q4K, DType::Q5K, DType::Q6K] {
            let kind = Q8Kind::for_dtype(dtype);
            let (block, _) = dtype.gguf_block().unwrap();
            for (n_blocks, rows, n_tok) in [
                (1, 3, 1),
                (2, 5, 3),
                (3, 2, 4),
                (1, 7, 5),
                (2, 4, 9),
                (1, 3, 17),
            ] {
                // Q5_0: rows of 32, 64, 96… columns: odd and even block counts.
                let cols = n_blocks * block;
                let data = make_gguf_rows(dtype, rows, cols, &mut seed, true);
                let w = PackedRows::new(dtype, &data, rows, cols, block).unwrap();
                let xs: Vec<f32> = (0..n_tok * cols).map(|_| lcg(&mut seed) * 3.0).collect();
                let mut xq = Q8Buf::new(n_tok * cols);
                xq.quantize_as(kind, super::super::q8::quantize_q8_scalar, &xs);
                let out_rs = rows + 2;
                let mut want = vec![f32::NAN; n_tok * out_rs];
                matmul_gguf_scalar(w, &xq.as_ref(), &mut want, out_rs);
                // The reference is the one-token reference per token.
                for t in 0..n_tok {
                    let mut one = vec![0f32; rows];
                    let mut tq = Q8Buf::new(cols);
                    tq.quantize_as(
                        kind,
                        super::super::q8::quantize_q8_scalar,
                        &xs[t * cols..(t + 1) * cols],
                    );
                    matvec_scalar(dtype, w, &tq.as_ref(), &mut one);
                    assert_eq!(
                        &want[t * out_rs..t * out_rs + rows],
                        &one[..],
                        "{dtype} token {t}"
                    );
                }
                for isa in Isa::available() {
                    let Some(mm) = Kernels::for_isa(isa).unwrap().matmul_gguf(dtype) else {
                        continue;
                    };
                    let mut got = vec![f32::NAN; n_tok * out_rs];
                    mm(w, &xq.as_ref(), &mut got, out_rs);
                    for t in 0..n_tok {
                        for r in 0..out_rs {
                            let (g, e) = (got[t * out_rs + r], want[t * out_rs + r]);
                            if r >= rows {
                                assert!(g.is_nan(), "{dtype} {isa}: wrote outside the rows");
                                continue;
                            }
                            assert!(
                                (g - e).abs() <= TOL * e.abs().max(1.0) * 10.0,
                                "{dtype} {isa} cols {cols} token {t} row {r}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}
