//! Batched packed-group products for prompts: `out[t, r] = Σ_c ŵ[r, c]·x_t[c]`
//! for many tokens `t` at once (`matmul_q4g_q8` and its siblings), int8
//! activations against the packed weights as stored, with their scalar
//! references and AVX2 / AVX-512 VNNI versions.
//!
//! Why a separate kernel: a matrix-vector product unpacks every weight
//! sub-block for one 32-lane dot, so unpacking, the group header and the
//! loop control cost as much as the multiply. Here each sub-block is
//! unpacked once for a *quad* of four tokens, whose activation blocks lie
//! side by side ([`Q8Batch`](super::q8::Q8Batch)), and the zero-point /
//! minimum corrections of the four go through one 4-lane vector. Compared
//! with decoding tiles of weights to f32 for `gemm`, the weights never leave
//! their packed form and the arithmetic is integer, as in the one-token
//! kernels ([`super::qg`]), so prompt and decode compute the same `Ŵ·x̂`.
//!
//! Loop order: rows in chunks that fit in L2 (the weights of a chunk are
//! read once per quad from cache, not from memory), quads inside.
//!
//! Float order: the SIMD versions accumulate `Σ_b d_b·Σ c·q` per group and
//! token, then multiply by the group scale once; the reference (shared with
//! the one-token reference, `qg::row_dot_blocks`) multiplies
//! `scale·d_b` per block. They differ only by reassociation; the tests name
//! the tolerance.
//!
//! Measured (criterion group `prefill`, 128 tokens, one AVX2 core, G
//! multiply-adds/s): with groups of 128 this is on par with decoding the
//! rows to f32 for `gemm` on the large matrices (gate/up 29.5 vs 27.8, down
//! 24.3 vs 26.0) and slower on the small ones (q/o 30.4 vs 37.7) and with
//! groups of 32 (19–23 vs 24–37): per 32 weights and token, the i32 → f32
//! conversion and the multiply-add by the block scale cost about what the
//! f32 FMAs of `gemm` cost, and the unpacking saved is small beside them.
//! So prompts use decoded tiles by default, and this path is selected with
//! [`PrefillKind::Int8`](crate::PrefillKind) (`nibble bench --prefill int8`)
//! to measure on CPUs with VNNI, where `vpdpbusd` saves one instruction per
//! 32 weights and token. There is no NEON version: on aarch64 (and for the
//! scalar table) `Int8` runs decoded tiles too.

use super::q8::Q8BatchRef;
use super::qg::{row_dot_blocks, PackedRows};
use super::SUB_BLOCK;

/// `out[t·out_rs + r] = Σ_c ŵ[r, c] · x_t[c]` for every token `t` of `x` and
/// row `r` of `w`; other entries of `out` are left as they are.
pub type QgMatmulFn = fn(w: PackedRows<'_>, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize);

/// Bytes of weight rows processed against every quad before moving on: a
/// chunk stays in L2 (1 MiB per core on the machines measured) beside the
/// activations.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const ROW_CHUNK_BYTES: usize = 256 * 1024;

/// The preconditions every batched kernel relies on, checked once per call.
fn check(w: &PackedRows<'_>, bits: u32, min: bool, x: &Q8BatchRef<'_>, out: &[f32], out_rs: usize) {
    assert_eq!(w.dtype().quant_bits(), Some(bits), "qg matmul: weight type");
    assert_eq!(w.dtype().has_float_min(), min, "qg matmul: header kind");
    assert!(
        x.len == w.cols() && x.is_consistent(),
        "qg matmul: activation blocks do not match {} columns",
        w.cols()
    );
    assert!(
        out_rs >= w.rows(),
        "qg matmul: output row stride below the row count"
    );
    assert!(
        x.n_tok == 0 || out.len() >= (x.n_tok - 1) * out_rs + w.rows(),
        "qg matmul: output too short"
    );
}

fn matmul_scalar<const BITS: u32, const MIN: bool>(
    w: PackedRows<'_>,
    x: &Q8BatchRef<'_>,
    out: &mut [f32],
    out_rs: usize,
) {
    check(&w, BITS, MIN, x, out, out_rs);
    for t in 0..x.n_tok {
        for r in 0..w.rows() {
            out[t * out_rs + r] =
                row_dot_blocks::<BITS, MIN>(w.row(r), w.cols(), w.group_size(), |k| {
                    let i = x.index(t, k);
                    (&x.qs[i * SUB_BLOCK..(i + 1) * SUB_BLOCK], x.d[i], x.ds[i])
                });
        }
    }
}

/// Scalar reference, `Q2G`.
pub fn matmul_q2g_q8_scalar(w: PackedRows<'_>, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize) {
    matmul_scalar::<2, false>(w, x, out, out_rs)
}
/// Scalar reference, `Q3G`.
pub fn matmul_q3g_q8_scalar(w: PackedRows<'_>, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize) {
    matmul_scalar::<3, false>(w, x, out, out_rs)
}
/// Scalar reference, `Q4G`.
pub fn matmul_q4g_q8_scalar(w: PackedRows<'_>, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize) {
    matmul_scalar::<4, false>(w, x, out, out_rs)
}
/// Scalar reference, `Q8G`.
pub fn matmul_q8g_q8_scalar(w: PackedRows<'_>, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize) {
    matmul_scalar::<8, false>(w, x, out, out_rs)
}
/// Scalar reference, `Q4GM`.
pub fn matmul_q4gm_q8_scalar(
    w: PackedRows<'_>,
    x: &Q8BatchRef<'_>,
    out: &mut [f32],
    out_rs: usize,
) {
    matmul_scalar::<4, true>(w, x, out, out_rs)
}

/// The scalar references by type, in the kernel table's order.
pub const SCALAR: [QgMatmulFn; 5] = [
    matmul_q2g_q8_scalar,
    matmul_q3g_q8_scalar,
    matmul_q4g_q8_scalar,
    matmul_q8g_q8_scalar,
    matmul_q4gm_q8_scalar,
];

/// Rows per chunk for rows of `row_bytes` (at least one).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn rows_per_chunk(row_bytes: usize) -> usize {
    (ROW_CHUNK_BYTES / row_bytes.max(1)).max(1)
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! AVX2 and AVX-512 VNNI versions: one quad loop (a macro, so each is
    //! compiled with its own target features); only the 32-lane integer dot
    //! differs, as in the one-token kernels.
    use super::*;
    use crate::kernels::q8::QUAD;
    use crate::kernels::qg::x86::{dot_avx2, dot_vnni, half, unpack};
    use nibble_format::dtype::{sub_block_bytes, GROUP_HEADER};
    use std::arch::x86_64::*;

    /// The four 8-lane sums `[Σ a0, Σ a1, Σ a2, Σ a3]`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hsum4(a: [__m256; QUAD]) -> __m128 {
        let h01 = _mm256_hadd_ps(a[0], a[1]);
        let h23 = _mm256_hadd_ps(a[2], a[3]);
        let h = _mm256_hadd_ps(h01, h23);
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
    }

    macro_rules! quad_kernel {
        ($quad:ident, $matmul:ident, $features:literal, $dot:ident, $zero_shift:expr) => {
            /// One row against one quad: the four dot products. SAFETY
            /// (caller): `row` holds `row_bytes(BITS, cols, gs)` bytes and
            /// `qs`/`d`/`ds` point at the quad's `⌈cols/32⌉ · 4` entries.
            #[target_feature(enable = $features)]
            unsafe fn $quad<const BITS: u32, const MIN: bool>(
                row: &[u8],
                cols: usize,
                gs: usize,
                qs: *const i8,
                d: *const f32,
                ds: *const f32,
            ) -> [f32; QUAD] {
                let sb = sub_block_bytes(BITS);
                let mut acc = [_mm256_setzero_ps(); QUAD];
                let mut corr = _mm_setzero_ps();
                let (mut p, mut col, mut blk) = (row.as_ptr(), 0usize, 0usize);
                // SAFETY: the row is groups of a header and ⌈len/32⌉ sub-blocks
                // (FORMAT.md), one activation entry per (block, token) of the
                // quad, as the caller guarantees.
                unsafe {
                    while col < cols {
                        let len = gs.min(cols - col);
                        col += len;
                        let hdr = (p as *const u32).read_unaligned();
                        let scale = half(hdr as u16);
                        p = p.add(GROUP_HEADER);
                        let mut g = [_mm256_setzero_ps(); QUAD];
                        let mut accs = _mm_setzero_ps();
                        for _ in 0..len.div_ceil(SUB_BLOCK) {
                            let c = unpack::<BITS>(p);
                            p = p.add(sb);
                            let e = blk * QUAD;
                            for (t, gt) in g.iter_mut().enumerate() {
                                let q = _mm256_loadu_si256(
                                    qs.add((e + t) * SUB_BLOCK) as *const __m256i
                                );
                                let i = $dot::<BITS>(c, q);
                                *gt = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(i),
                                    _mm256_set1_ps(*d.add(e + t)),
                                    *gt,
                                );
                            }
                            accs = _mm_add_ps(accs, _mm_loadu_ps(ds.add(e)));
                            blk += 1;
                        }
                        let sv = _mm256_set1_ps(scale);
                        for (a, gt) in acc.iter_mut().zip(g) {
                            *a = _mm256_fmadd_ps(gt, sv, *a);
                        }
                        let f = if MIN {
                            -half((hdr >> 16) as u16)
                        } else {
                            let z = ((hdr >> 16) & 0xFF) as i32
                                - if BITS == 8 { $zero_shift } else { 0 };
                            scale * z as f32
                        };
                        corr = _mm_fmadd_ps(accs, _mm_set1_ps(f), corr);
                    }
                    let mut sums = [0f32; QUAD];
                    _mm_storeu_ps(sums.as_mut_ptr(), _mm_sub_ps(hsum4(acc), corr));
                    sums
                }
            }

            fn $matmul<const BITS: u32, const MIN: bool>(
                w: PackedRows<'_>,
                x: &Q8BatchRef<'_>,
                out: &mut [f32],
                out_rs: usize,
            ) {
                check(&w, BITS, MIN, x, out, out_rs);
                let per_quad = x.n_blocks() * QUAD;
                let chunk = rows_per_chunk(w.row_bytes());
                for r0 in (0..w.rows()).step_by(chunk) {
                    for qd in 0..x.n_quads() {
                        let e = qd * per_quad;
                        let here = (x.n_tok - qd * QUAD).min(QUAD);
                        for r in r0..(r0 + chunk).min(w.rows()) {
                            // SAFETY: the table holding this kernel is built
                            // only when its features were detected; `check`
                            // verified the row layout (PackedRows) and that
                            // the batch holds `per_quad` entries per quad.
                            let s = unsafe {
                                $quad::<BITS, MIN>(
                                    w.row(r),
                                    w.cols(),
                                    w.group_size(),
                                    x.qs.as_ptr().add(e * SUB_BLOCK),
                                    x.d.as_ptr().add(e),
                                    x.ds.as_ptr().add(e),
                                )
                            };
                            for (t, &v) in s[..here].iter().enumerate() {
                                out[(qd * QUAD + t) * out_rs + r] = v;
                            }
                        }
                    }
                }
            }
        };
    }

    // AVX2 flips 8-bit codes to signed, so its zero points shift by 128.
    quad_kernel!(quad_avx2, matmul_avx2, "avx2,fma,f16c", dot_avx2, 128);
    quad_kernel!(
        quad_vnni,
        matmul_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
        dot_vnni,
        0
    );

    pub const AVX2: [QgMatmulFn; 5] = [
        matmul_avx2::<2, false>,
        matmul_avx2::<3, false>,
        matmul_avx2::<4, false>,
        matmul_avx2::<8, false>,
        matmul_avx2::<4, true>,
    ];
    pub const AVX512: [QgMatmulFn; 5] = [
        matmul_vnni::<2, false>,
        matmul_vnni::<3, false>,
        matmul_vnni::<4, false>,
        matmul_vnni::<8, false>,
        matmul_vnni::<4, true>,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::q8::{quantize_q8_scalar, Q8Batch, Q8Buf};
    use crate::kernels::test_util::{lcg, make_row};
    use crate::kernels::{Isa, Kernels};
    use nibble_format::dtype::DType;

    /// Tolerance of a SIMD batched kernel against the scalar reference,
    /// relative to Σ_j |ŵ_j·x̂_j| of the row and token: the integer sums are
    /// exact, only the f32 reassociation (per-group accumulation) differs.
    const TOL_QG_MM_VS_SCALAR: f64 = 2e-6;

    const TYPES: [DType; 5] = [DType::Q2G, DType::Q3G, DType::Q4G, DType::Q8G, DType::Q4GM];
    const SHAPES: [(usize, usize); 7] = [
        (32, 32),
        (172, 32),
        (172, 64),
        (172, 172),
        (8, 8),
        (576, 128),
        (1536, 128),
    ];

    fn inputs(n_tok: usize, cols: usize, seed: &mut u64) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n_tok * cols).map(|_| lcg(seed) * 4.0).collect();
        if cols >= 64 && n_tok > 1 {
            x[cols + 32..cols + 64].fill(0.0); // an all-zero block of token 1
        }
        x
    }

    /// The batched reference is the one-token reference, bit for bit, token
    /// by token; every instruction set's batched kernel is within the
    /// tolerance of it, leaves the padding entries of `out` alone and
    /// handles partial quads (1..=9 tokens).
    #[test]
    fn every_isa_matches_the_one_token_reference() {
        let mut seed = 77u64;
        let scalar = Kernels::for_isa(Isa::Scalar).unwrap();
        for (dtype, reference) in TYPES.into_iter().zip(SCALAR) {
            for (cols, gs) in SHAPES {
                let rows = 5;
                let mut data = Vec::new();
                for r in 0..rows {
                    data.extend(make_row(dtype, cols, gs, &mut seed, r == 0));
                }
                let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                for n_tok in [1usize, 3, 4, 5, 9] {
                    let x = inputs(n_tok, cols, &mut seed);
                    let mut batch = Q8Batch::new(16, cols);
                    batch.quantize(quantize_q8_scalar, &x, n_tok, cols, None);
                    let xb = batch.as_ref();
                    let out_rs = rows + 2;
                    let mut want = vec![f32::NAN; n_tok * out_rs];
                    reference(w, &xb, &mut want, out_rs);
                    // Bit-identical to the one-token reference per token.
                    let mut one = Q8Buf::new(cols);
                    let mut mv = vec![0f32; rows];
                    let mut mags = vec![0f64; n_tok * rows];
                    for t in 0..n_tok {
                        one.quantize(quantize_q8_scalar, &x[t * cols..(t + 1) * cols]);
                        (scalar.matvec_qg(dtype))(w, &one.as_ref(), &mut mv);
                        assert_eq!(
                            &want[t * out_rs..t * out_rs + rows],
                            &mv[..],
                            "{dtype} {cols}/{gs} t {t}"
                        );
                        let mut deq = vec![0f32; cols];
                        let o = one.as_ref();
                        for r in 0..rows {
                            nibble_format::quant::dequantize(dtype, gs, w.row(r), &mut deq);
                            mags[t * rows + r] = deq
                                .iter()
                                .enumerate()
                                .map(|(i, &a)| {
                                    (f64::from(a) * f64::from(o.qs[i]) * f64::from(o.d[i / 32]))
                                        .abs()
                                })
                                .sum();
                        }
                    }
                    for isa in Isa::available() {
                        let Some(mm) = Kernels::for_isa(isa).unwrap().matmul_qg(dtype) else {
                            continue;
                        };
                        let mut got = vec![f32::NAN; n_tok * out_rs];
                        mm(w, &xb, &mut got, out_rs);
                        for t in 0..n_tok {
                            for r in 0..rows {
                                let (g, e) = (got[t * out_rs + r], want[t * out_rs + r]);
                                let tol = (TOL_QG_MM_VS_SCALAR * mags[t * rows + r]).max(1e-7);
                                assert!(
                                    (f64::from(g) - f64::from(e)).abs() <= tol,
                                    "{isa:?} {dtype} cols {cols} gs {gs} tokens {n_tok}: t {t} r {r}: {g} vs {e}"
                                );
                            }
                            assert!(got[t * out_rs + rows..(t + 1) * out_rs]
                                .iter()
                                .all(|v| v.is_nan()));
                        }
                    }
                }
            }
        }
    }

    /// Row chunks: more rows than one chunk holds, so the chunk loop and the
    /// quad loop interleave; the result must not depend on it.
    #[test]
    fn many_rows_cross_chunk_boundaries() {
        let (dtype, cols, gs) = (DType::Q4G, 576, 128);
        let row_bytes = nibble_format::dtype::row_bytes(4, cols, gs);
        let rows = rows_per_chunk(row_bytes) + 3;
        let mut seed = 5u64;
        let mut data = Vec::new();
        for _ in 0..rows {
            data.extend(make_row(dtype, cols, gs, &mut seed, false));
        }
        let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
        let n_tok = 6;
        let x = inputs(n_tok, cols, &mut seed);
        let mut batch = Q8Batch::new(n_tok, cols);
        batch.quantize(quantize_q8_scalar, &x, n_tok, cols, None);
        let mut want = vec![0f32; n_tok * rows];
        matmul_q4g_q8_scalar(w, &batch.as_ref(), &mut want, rows);
        for isa in Isa::available() {
            if let Some(mm) = Kernels::for_isa(isa).unwrap().matmul_qg(dtype) {
                let mut got = vec![0f32; n_tok * rows];
                mm(w, &batch.as_ref(), &mut got, rows);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{isa:?}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn batch_layout_gathers_pads_and_slices() {
        let (n_tok, cols) = (6usize, 40usize);
        let mut seed = 8u64;
        let x = inputs(n_tok, cols, &mut seed);
        let perm: Vec<u32> = (0..cols as u32).rev().collect();
        let mut batch = Q8Batch::new(8, 64);
        batch.quantize(quantize_q8_scalar, &x, n_tok, cols, Some(&perm));
        let b = batch.as_ref();
        assert!(b.is_consistent());
        assert_eq!((b.n_blocks(), b.n_quads()), (2, 2));
        let mut one = Q8Buf::new(cols);
        for t in 0..n_tok {
            let g: Vec<f32> = perm.iter().map(|&p| x[t * cols + p as usize]).collect();
            one.quantize(quantize_q8_scalar, &g);
            let o = one.as_ref();
            for k in 0..2 {
                let i = b.index(t, k);
                assert_eq!(&b.qs[i * 32..(i + 1) * 32], &o.qs[k * 32..(k + 1) * 32]);
                assert_eq!((b.d[i], b.ds[i]), (o.d[k], o.ds[k]));
            }
        }
        // Tokens 6 and 7 pad the second quad with zeros.
        for t in 6..8 {
            for k in 0..2 {
                let i = b.index(t, k);
                assert!(b.qs[i * 32..(i + 1) * 32].iter().all(|&q| q == 0));
                assert_eq!((b.d[i], b.ds[i]), (0.0, 0.0));
            }
        }
        let second = b.quads(1, 1);
        assert_eq!((second.n_tok, second.n_quads()), (2, 1));
        assert!(second.is_consistent());
        assert_eq!(second.d[second.index(1, 1)], b.d[b.index(5, 1)]);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn batch_refuses_more_tokens_than_its_capacity() {
        let mut batch = Q8Batch::new(4, 32);
        batch.quantize(quantize_q8_scalar, &[0.0; 5 * 32], 5, 32, None);
    }

    #[test]
    #[should_panic(expected = "output too short")]
    fn kernel_refuses_a_short_output() {
        let mut seed = 1u64;
        let data = make_row(DType::Q4G, 32, 32, &mut seed, false);
        let w = PackedRows::new(DType::Q4G, &data, 1, 32, 32).unwrap();
        let mut batch = Q8Batch::new(4, 32);
        batch.quantize(quantize_q8_scalar, &[0.5; 2 * 32], 2, 32, None);
        matmul_q4g_q8_scalar(w, &batch.as_ref(), &mut [0.0; 1], 1);
    }
}
