//! Packed-group weights (`Q2G`, `Q3G`, `Q4G`, `Q8G`, `Q4GM`) times int8
//! activation blocks ([`super::q8`]): `vec_dot_q4g_q8` and its siblings, the
//! scalar references and their AVX2, AVX-512 VNNI and NEON versions.
//!
//! Per sub-block `b` of 32 columns, the integer dot `Σ c·q` is exact; per
//! group `g` (header: f16 scale `s`, integer zero `z` or f16 minimum `m`):
//!
//! ```text
//! Σ_j ŵ_j·x_j ≈ Σ_g s_g · Σ_{b∈g} d_b·Σ c·q  −  Σ_g s_g·z_g · Σ_{b∈g} ds_b      (zero point)
//!             ≈ Σ_g s_g · Σ_{b∈g} d_b·Σ c·q  +  Σ_g m_g   · Σ_{b∈g} ds_b      (minimum)
//! ```
//!
//! The first term is the vector work; the second is one scalar multiply-add
//! per group. The SIMD versions differ from the reference only in the order
//! of the float additions (per-lane partial sums), hence the named
//! tolerances in the tests.
//!
//! Instruction choices:
//! * AVX2: 4-bit codes unpack with one AND and one shift per 16 bytes; `vpmaddubsw` (u8 × i8 → i16
//!   pairs) then `vpmaddwd` by ones. Codes ≤ 15 cannot saturate the i16 pairs. 8-bit codes can, so
//!   Q8G flips them to signed (c − 128, with z − 128) and uses the `abs`/`sign` form.
//! * AVX-512 VNNI: `vpdpbusd` does u8 × i8 → i32 in one instruction without intermediate
//!   saturation, for every width (on 256-bit registers through AVX-512VL).
//! * NEON: codes as signed bytes (8-bit ones flipped as above), `smull`/`smlal` into i16, pairwise
//!   widening adds into i32; with the dot-product extension, `sdot` (i8 × i8 → i32, four at a time).

use half::f16;
use nibble_format::dtype::{row_bytes, sub_block_bytes, DType, GROUP_HEADER};
use nibble_format::quant::unpack_sub_block;

use super::q8::Q8Ref;
use super::SUB_BLOCK;

/// Rows of one packed weight, validated once: `rows × row_bytes` bytes, each
/// row `cols` columns in groups of `group_size` (FORMAT.md's layout).
#[derive(Clone, Copy, Debug)]
pub struct PackedRows<'a> {
    data: &'a [u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    group_size: usize,
    row_bytes: usize,
}

impl<'a> PackedRows<'a> {
    /// `None` unless `dtype` is packed, the group size is valid and `data`
    /// holds exactly `rows` rows.
    pub fn new(
        dtype: DType,
        data: &'a [u8],
        rows: usize,
        cols: usize,
        group_size: usize,
    ) -> Option<PackedRows<'a>> {
        let rb = if let Some((block, bytes)) = dtype.gguf_block() {
            // GGUF block types: rows of whole blocks, the group is the block.
            if cols == 0 || group_size != block || !cols.is_multiple_of(block) {
                return None;
            }
            cols / block * bytes
        } else {
            let bits = dtype.quant_bits()?;
            if cols == 0 || !nibble_format::dtype::valid_group_size(group_size as u64, cols as u64)
            {
                return None;
            }
            row_bytes(bits, cols, group_size)
        };
        (rows.checked_mul(rb)? == data.len()).then_some(PackedRows {
            data,
            dtype,
            rows,
            cols,
            group_size,
            row_bytes: rb,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// All rows' bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
    /// Rows `r0..r0 + n` as their own view.
    pub fn slice(&self, r0: usize, n: usize) -> PackedRows<'a> {
        assert!(r0 + n <= self.rows, "PackedRows::slice out of range");
        PackedRows {
            data: &self.data[r0 * self.row_bytes..(r0 + n) * self.row_bytes],
            rows: n,
            ..*self
        }
    }
}

/// `out[r] = Σ_c ŵ[r, c] · x[c]` for every row of `w` (`out.len() == w.rows()`).
pub type QgMatvecFn = fn(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]);

/// `out[cols] =` row `r` of `w` decoded to f32 (stored column order), for
/// the batched path's weight tiles. The reference is the format's decoder.
pub type DequantRowFn = fn(w: PackedRows<'_>, r: usize, out: &mut [f32]);

/// Scalar reference of [`DequantRowFn`] (every packed type).
pub fn dequant_row_scalar(w: PackedRows<'_>, r: usize, out: &mut [f32]) {
    assert_eq!(out.len(), w.cols, "dequant: output length");
    nibble_format::quant::dequantize(w.dtype, w.group_size, w.row(r), out)
}

/// The preconditions every kernel relies on, checked once per call.
fn check(w: &PackedRows<'_>, bits: u32, min: bool, x: &Q8Ref<'_>, out: &[f32]) {
    assert_eq!(w.dtype.quant_bits(), Some(bits), "qg kernel: weight type");
    assert_eq!(w.dtype.has_float_min(), min, "qg kernel: header kind");
    assert_eq!(out.len(), w.rows, "qg kernel: output length");
    let nb = w.cols.div_ceil(SUB_BLOCK);
    assert!(
        x.len == w.cols && x.d.len() == nb && x.ds.len() == nb && x.qs.len() == nb * SUB_BLOCK,
        "qg kernel: activation blocks do not match {} columns",
        w.cols
    );
}

fn f16_at(b: &[u8], p: usize) -> f32 {
    f16::from_le_bytes([b[p], b[p + 1]]).to_f32()
}

/// Scalar reference for one row (`MIN`: the header holds an f16 minimum).
fn row_dot_scalar<const BITS: u32, const MIN: bool>(
    row: &[u8],
    cols: usize,
    gs: usize,
    x: &Q8Ref<'_>,
) -> f32 {
    row_dot_blocks::<BITS, MIN>(row, cols, gs, |b| {
        (&x.qs[b * SUB_BLOCK..(b + 1) * SUB_BLOCK], x.d[b], x.ds[b])
    })
}

/// The reference's arithmetic for one row against activation blocks given
/// by `block(b) = (32 codes, d, ds)`, shared by the one-token and the
/// batched references so they compute the same bits.
pub(super) fn row_dot_blocks<'x, const BITS: u32, const MIN: bool>(
    row: &[u8],
    cols: usize,
    gs: usize,
    block: impl Fn(usize) -> (&'x [i8], f32, f32),
) -> f32 {
    let sb = sub_block_bytes(BITS);
    let mut codes = [0u8; SUB_BLOCK];
    let (mut p, mut blk, mut col) = (0, 0, 0);
    let mut sum = 0f32;
    while col < cols {
        let len = gs.min(cols - col);
        col += len;
        let scale = f16_at(row, p);
        let (mut accf, mut accs) = (0f32, 0f32);
        let hp = p;
        p += GROUP_HEADER;
        for _ in 0..len.div_ceil(SUB_BLOCK) {
            unpack_sub_block(BITS, &row[p..p + sb], &mut codes);
            p += sb;
            let (q, d, ds) = block(blk);
            let isum: i32 = codes
                .iter()
                .zip(q)
                .map(|(&c, &q)| i32::from(c) * i32::from(q))
                .sum();
            accf += d * isum as f32;
            accs += ds;
            blk += 1;
        }
        sum += if MIN {
            scale * accf + f16_at(row, hp + 2) * accs
        } else {
            scale * (accf - f32::from(row[hp + 2]) * accs)
        };
    }
    sum
}

/// Every kernel's driver: check the preconditions once (`check`), then
/// `out[r] = row_dot(row r, cols, group size, x)`. The SIMD row functions
/// rely on exactly these checks for their unchecked reads.
fn each_row<const BITS: u32, const MIN: bool>(
    w: PackedRows<'_>,
    x: &Q8Ref<'_>,
    out: &mut [f32],
    row_dot: impl Fn(&[u8], usize, usize, &Q8Ref<'_>) -> f32,
) {
    check(&w, BITS, MIN, x, out);
    for (r, o) in out.iter_mut().enumerate() {
        *o = row_dot(w.row(r), w.cols, w.group_size, x);
    }
}

fn matvec_scalar<const BITS: u32, const MIN: bool>(
    w: PackedRows<'_>,
    x: &Q8Ref<'_>,
    out: &mut [f32],
) {
    each_row::<BITS, MIN>(w, x, out, row_dot_scalar::<BITS, MIN>)
}

/// Scalar reference, `Q2G`.
pub fn vec_dot_q2g_q8_scalar(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
    matvec_scalar::<2, false>(w, x, out)
}
/// Scalar reference, `Q3G`.
pub fn vec_dot_q3g_q8_scalar(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
    matvec_scalar::<3, false>(w, x, out)
}
/// Scalar reference, `Q4G`.
pub fn vec_dot_q4g_q8_scalar(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
    matvec_scalar::<4, false>(w, x, out)
}
/// Scalar reference, `Q8G`.
pub fn vec_dot_q8g_q8_scalar(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
    matvec_scalar::<8, false>(w, x, out)
}
/// Scalar reference, `Q4GM`.
pub fn vec_dot_q4gm_q8_scalar(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
    matvec_scalar::<4, true>(w, x, out)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX2 and AVX-512 VNNI versions. They share one row loop (a macro, so
    //! each is compiled with its own target features); only the 32-lane
    //! integer dot differs.
    use super::*;
    use crate::kernels::float::avx2::hsum;
    use std::arch::x86_64::*;

    /// 32 codes of one sub-block as unsigned bytes (lane j = code j).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn unpack<const BITS: u32>(p: *const u8) -> __m256i {
        // SAFETY (all arms): the caller guarantees `sub_block_bytes(BITS)`
        // readable bytes at `p`.
        unsafe {
            match BITS {
                4 => {
                    let v = _mm_loadu_si128(p as *const __m128i);
                    let m = _mm_set1_epi8(0x0F);
                    let lo = _mm_and_si128(v, m);
                    let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
                    _mm256_set_m128i(hi, lo)
                }
                8 => _mm256_loadu_si256(p as *const __m256i),
                _ => {
                    let v = _mm256_set1_epi64x((p as *const i64).read_unaligned());
                    let v = _mm256_srlv_epi64(v, _mm256_set_epi64x(6, 4, 2, 0));
                    let low = _mm256_and_si256(v, _mm256_set1_epi8(3));
                    if BITS == 2 {
                        return low;
                    }
                    let h = _mm256_set1_epi32((p.add(8) as *const i32).read_unaligned());
                    let idx = _mm256_setr_epi64x(
                        0,
                        0x0101_0101_0101_0101,
                        0x0202_0202_0202_0202,
                        0x0303_0303_0303_0303,
                    );
                    let b = _mm256_shuffle_epi8(h, idx);
                    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
                    _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(4)))
                }
            }
        }
    }

    /// Σ c·q per 4 lanes (8 i32 partial sums), AVX2. For BITS = 8 the codes
    /// arrive flipped to signed (c − 128).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) unsafe fn dot_avx2<const BITS: u32>(c: __m256i, q: __m256i) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        if BITS == 8 {
            let s = _mm256_xor_si256(c, _mm256_set1_epi8(-128));
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(s, s), _mm256_sign_epi8(q, s));
            _mm256_madd_epi16(p, ones)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), ones)
        }
    }

    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    #[inline]
    pub(crate) unsafe fn dot_vnni<const BITS: u32>(c: __m256i, q: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, q)
    }

    #[target_feature(enable = "f16c")]
    #[inline]
    pub(crate) unsafe fn half(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    macro_rules! row_kernel {
        ($sub:ident, $group:ident, $row:ident, $matvec:ident, $features:literal, $dot:ident, $zero_shift:expr) => {
            /// `a + f · Σ c·q` over the sub-block at `p` and activation block `b`.
            /// SAFETY (caller): both exist.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $sub<const BITS: u32>(
                p: *const u8,
                qs: *const i8,
                b: usize,
                f: f32,
                a: __m256,
            ) -> __m256 {
                // SAFETY: guaranteed by the caller.
                unsafe {
                    let c = unpack::<BITS>(p);
                    let q = _mm256_loadu_si256(qs.add(b * SUB_BLOCK) as *const __m256i);
                    let i = $dot::<BITS>(c, q);
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(f), a)
                }
            }

            /// One group of `n` sub-blocks at `p` (header first), whose first
            /// activation block is `blk`: adds scale·d·Σc·q into `a0`/`a1`
            /// (alternating, so consecutive multiply-adds do not wait on each
            /// other) and returns the end of the group and its zero-point /
            /// minimum correction. SAFETY (caller): the group's bytes and
            /// blocks `blk..blk + n` exist.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $group<const BITS: u32, const MIN: bool>(
                p: *const u8,
                n: usize,
                blk: usize,
                x: &Q8Ref<'_>,
                a0: &mut __m256,
                a1: &mut __m256,
            ) -> (*const u8, f32) {
                let sb = sub_block_bytes(BITS);
                let (qs, d, ds) = (x.qs.as_ptr(), x.d.as_ptr(), x.ds.as_ptr());
                // SAFETY: guaranteed by the caller (see above).
                unsafe {
                    let hdr = (p as *const u32).read_unaligned();
                    let scale = half(hdr as u16);
                    let mut p = p.add(GROUP_HEADER);
                    let mut accs = 0f32;
                    let mut k = 0;
                    while k + 2 <= n {
                        let (b0, b1) = (blk + k, blk + k + 1);
                        *a0 = $sub::<BITS>(p, qs, b0, scale * *d.add(b0), *a0);
                        *a1 = $sub::<BITS>(p.add(sb), qs, b1, scale * *d.add(b1), *a1);
                        accs += *ds.add(blk + k) + *ds.add(blk + k + 1);
                        p = p.add(2 * sb);
                        k += 2;
                    }
                    if k < n {
                        *a0 = $sub::<BITS>(p, qs, blk + k, scale * *d.add(blk + k), *a0);
                        accs += *ds.add(blk + k);
                        p = p.add(sb);
                    }
                    let corr = if MIN {
                        -half((hdr >> 16) as u16) * accs
                    } else {
                        let z =
                            ((hdr >> 16) & 0xFF) as i32 - if BITS == 8 { $zero_shift } else { 0 };
                        scale * z as f32 * accs
                    };
                    (p, corr)
                }
            }

            /// One row. SAFETY (caller): `row` holds `row_bytes(BITS, cols, gs)`
            /// bytes and `x` has `⌈cols/32⌉` blocks (`check`).
            #[target_feature(enable = $features)]
            unsafe fn $row<const BITS: u32, const MIN: bool>(
                row: &[u8],
                cols: usize,
                gs: usize,
                x: &Q8Ref<'_>,
            ) -> f32 {
                let nsb = gs.div_ceil(SUB_BLOCK);
                let full = cols / gs;
                let tail = (cols - full * gs).div_ceil(SUB_BLOCK);
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let (mut p, mut corr, mut blk) = (row.as_ptr(), 0f32, 0usize);
                // SAFETY: the row is `full` groups of `nsb` sub-blocks, then a
                // group of `tail` (FORMAT.md), and `x` has a block for each.
                unsafe {
                    if nsb == 1 {
                        // Groups of 32 (GGUF blocks): alternate the accumulators
                        // between groups.
                        let mut g = 0;
                        while g + 2 <= full {
                            let (q, c0) = $group::<BITS, MIN>(p, 1, blk, x, &mut a0, &mut a1);
                            let (q, c1) = $group::<BITS, MIN>(q, 1, blk + 1, x, &mut a1, &mut a0);
                            (p, corr, blk, g) = (q, corr + c0 + c1, blk + 2, g + 2);
                        }
                        if g < full {
                            let (q, c) = $group::<BITS, MIN>(p, 1, blk, x, &mut a0, &mut a1);
                            (p, corr, blk) = (q, corr + c, blk + 1);
                        }
                    } else {
                        for _ in 0..full {
                            let (q, c) = $group::<BITS, MIN>(p, nsb, blk, x, &mut a0, &mut a1);
                            (p, corr, blk) = (q, corr + c, blk + nsb);
                        }
                    }
                    if tail > 0 {
                        let (_, c) = $group::<BITS, MIN>(p, tail, blk, x, &mut a0, &mut a1);
                        corr += c;
                    }
                }
                hsum(_mm256_add_ps(a0, a1)) - corr
            }

            fn $matvec<const BITS: u32, const MIN: bool>(
                w: PackedRows<'_>,
                x: &Q8Ref<'_>,
                out: &mut [f32],
            ) {
                // SAFETY: the table holding this kernel is built only when its
                // features were detected; `each_row` checked the sizes.
                each_row::<BITS, MIN>(w, x, out, |row, cols, gs, x| unsafe {
                    $row::<BITS, MIN>(row, cols, gs, x)
                })
            }
        };
    }

    // AVX2 flips 8-bit codes to signed, so its zero points shift by 128.
    row_kernel!(
        sub_avx2,
        group_avx2,
        row_avx2,
        matvec_avx2,
        "avx2,fma,f16c",
        dot_avx2,
        128
    );

    row_kernel!(
        sub_vnni,
        group_vnni,
        row_vnni,
        matvec_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
        dot_vnni,
        0
    );

    /// AVX2 row decoder for every packed type: the same float operations as
    /// the reference, so the same bits — `scale · (c − z)` for zero points,
    /// `scale · c + min` for Q4GM (a multiply, then an add: never fused).
    pub fn dequant_row_avx2(w: PackedRows<'_>, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), w.cols, "dequant: output length");
        let row = w.row(r);
        // SAFETY: the table holding this function is built only when AVX2,
        // FMA and F16C were detected; `row` has the layout of `w` (PackedRows
        // checked its size) and `out` has `cols` elements.
        unsafe {
            match w.dtype {
                DType::Q4G => deq_avx2::<4, false>(row, w.cols, w.group_size, out),
                DType::Q4GM => deq_avx2::<4, true>(row, w.cols, w.group_size, out),
                DType::Q8G => deq_avx2::<8, false>(row, w.cols, w.group_size, out),
                DType::Q3G => deq_avx2::<3, false>(row, w.cols, w.group_size, out),
                DType::Q2G => deq_avx2::<2, false>(row, w.cols, w.group_size, out),
                _ => dequant_row_scalar(w, r, out),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn deq_avx2<const BITS: u32, const MIN: bool>(
        row: &[u8],
        cols: usize,
        gs: usize,
        out: &mut [f32],
    ) {
        let sb = sub_block_bytes(BITS);
        let (mut p, mut col) = (row.as_ptr(), 0usize);
        let mut buf = [0f32; SUB_BLOCK];
        while col < cols {
            let len = gs.min(cols - col);
            // SAFETY: the group's header and ⌈len/32⌉ sub-blocks are in `row`;
            // full sub-blocks are written to `out[col + j..][..32]`, which
            // exists because j + 32 ≤ len; a partial one goes through `buf`.
            unsafe {
                let hdr = (p as *const u32).read_unaligned();
                let scale = _mm256_set1_ps(half(hdr as u16));
                let other = if MIN {
                    half((hdr >> 16) as u16)
                } else {
                    ((hdr >> 16) & 0xFF) as f32
                };
                let other = _mm256_set1_ps(other);
                p = p.add(GROUP_HEADER);
                let mut j = 0;
                while j < len {
                    let c = unpack::<BITS>(p);
                    p = p.add(sb);
                    let n = (len - j).min(SUB_BLOCK);
                    let dst = if n == SUB_BLOCK {
                        out.as_mut_ptr().add(col + j)
                    } else {
                        buf.as_mut_ptr()
                    };
                    let halves = [_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)];
                    for (h, half8) in halves.iter().enumerate() {
                        for k in 0..2 {
                            let bytes = if k == 0 {
                                *half8
                            } else {
                                _mm_srli_si128(*half8, 8)
                            };
                            let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                            let w = if MIN {
                                _mm256_add_ps(_mm256_mul_ps(scale, v), other)
                            } else {
                                _mm256_mul_ps(scale, _mm256_sub_ps(v, other))
                            };
                            _mm256_storeu_ps(dst.add(16 * h + 8 * k), w);
                        }
                    }
                    if n < SUB_BLOCK {
                        out[col + j..col + j + n].copy_from_slice(&buf[..n]);
                    }
                    j += SUB_BLOCK;
                }
            }
            col += len;
        }
    }

    pub fn vec_dot_q2g_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_avx2::<2, false>(w, x, out)
    }
    pub fn vec_dot_q3g_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_avx2::<3, false>(w, x, out)
    }
    pub fn vec_dot_q4g_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_avx2::<4, false>(w, x, out)
    }
    pub fn vec_dot_q8g_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_avx2::<8, false>(w, x, out)
    }
    pub fn vec_dot_q4gm_q8_avx2(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_avx2::<4, true>(w, x, out)
    }
    pub fn vec_dot_q2g_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_vnni::<2, false>(w, x, out)
    }
    pub fn vec_dot_q3g_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_vnni::<3, false>(w, x, out)
    }
    pub fn vec_dot_q4g_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_vnni::<4, false>(w, x, out)
    }
    pub fn vec_dot_q8g_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_vnni::<8, false>(w, x, out)
    }
    pub fn vec_dot_q4gm_q8_avx512(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_vnni::<4, true>(w, x, out)
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// 32 codes as two signed 16-byte halves (8-bit codes flipped to c − 128).
    #[target_feature(enable = "neon")]
    #[inline]
    pub(crate) unsafe fn unpack<const BITS: u32>(p: *const u8) -> (int8x16_t, int8x16_t) {
        // SAFETY (all arms): the caller guarantees `sub_block_bytes(BITS)`
        // readable bytes at `p`.
        unsafe {
            match BITS {
                4 => {
                    let v = vld1q_u8(p);
                    let m = vdupq_n_u8(0x0F);
                    (
                        vreinterpretq_s8_u8(vandq_u8(v, m)),
                        vreinterpretq_s8_u8(vshrq_n_u8(v, 4)),
                    )
                }
                8 => {
                    let f = vdupq_n_u8(0x80);
                    (
                        vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), f)),
                        vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(16)), f)),
                    )
                }
                _ => {
                    let b = vld1_u8(p);
                    let m = vdupq_n_u8(3);
                    let mut lo = vandq_u8(vcombine_u8(b, vshr_n_u8(b, 2)), m);
                    let mut hi = vandq_u8(vcombine_u8(vshr_n_u8(b, 4), vshr_n_u8(b, 6)), m);
                    if BITS == 3 {
                        let h: [u8; 4] = std::ptr::read_unaligned(p.add(8) as *const [u8; 4]);
                        let bit = vld1_u8([1u8, 2, 4, 8, 16, 32, 64, 128].as_ptr());
                        let four = vdupq_n_u8(4);
                        let e = |k: usize| vtst_u8(vdup_n_u8(h[k]), bit);
                        lo = vorrq_u8(lo, vandq_u8(vcombine_u8(e(0), e(1)), four));
                        hi = vorrq_u8(hi, vandq_u8(vcombine_u8(e(2), e(3)), four));
                    }
                    (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
                }
            }
        }
    }

    /// Σ c·q into 4 i32 partial sums (|c| ≤ 128, |q| ≤ 127: pairs fit i16).
    #[target_feature(enable = "neon")]
    #[inline]
    pub(crate) unsafe fn dot16(c: int8x16_t, q: int8x16_t) -> int32x4_t {
        let p = vmull_s8(vget_low_s8(c), vget_low_s8(q));
        let p = vmlal_s8(p, vget_high_s8(c), vget_high_s8(q));
        vpaddlq_s16(p)
    }

    /// Σ c·q into 4 i32 partial sums with the dot-product extension: `sdot`
    /// through `asm!`, its intrinsic (`vdotq_s32`) not being stable yet.
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    pub(crate) unsafe fn dot16_sdot(c: int8x16_t, q: int8x16_t) -> int32x4_t {
        let mut acc = vdupq_n_s32(0);
        // SAFETY: `sdot` only reads its vector operands and writes `acc`; the
        // table holding this kernel is built only when `dotprod` was detected.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {c:v}.16b, {q:v}.16b",
                acc = inout(vreg) acc,
                c = in(vreg) c,
                q = in(vreg) q,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    macro_rules! neon_kernel {
        ($sub:ident, $group:ident, $row:ident, $matvec:ident, $features:literal, $dot:ident) => {
            /// `a + f · Σ c·q` over the sub-block at `p` and activation block `b`.
            /// SAFETY (caller): both exist.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $sub<const BITS: u32>(
                p: *const u8,
                qs: *const i8,
                b: usize,
                f: f32,
                a: float32x4_t,
            ) -> float32x4_t {
                // SAFETY: guaranteed by the caller.
                unsafe {
                    let (c0, c1) = unpack::<BITS>(p);
                    let q = qs.add(b * SUB_BLOCK);
                    let i = vaddq_s32($dot(c0, vld1q_s8(q)), $dot(c1, vld1q_s8(q.add(16))));
                    vfmaq_n_f32(a, vcvtq_f32_s32(i), f)
                }
            }

            /// One group of `n` sub-blocks at `p` (header first), first
            /// activation block `blk`, into `a0`/`a1` alternately; returns the
            /// end of the group and its zero-point / minimum correction.
            /// SAFETY (caller): the group's bytes and blocks `blk..blk + n` exist.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $group<const BITS: u32, const MIN: bool>(
                p: *const u8,
                n: usize,
                blk: usize,
                x: &Q8Ref<'_>,
                a0: &mut float32x4_t,
                a1: &mut float32x4_t,
            ) -> (*const u8, f32) {
                let sb = sub_block_bytes(BITS);
                let (qs, d, ds) = (x.qs.as_ptr(), x.d.as_ptr(), x.ds.as_ptr());
                // SAFETY: guaranteed by the caller (see above).
                unsafe {
                    let hdr = (p as *const u32).read_unaligned();
                    let scale = f16::from_bits(hdr as u16).to_f32();
                    let mut p = p.add(GROUP_HEADER);
                    let mut accs = 0f32;
                    let mut k = 0;
                    while k + 2 <= n {
                        let (b0, b1) = (blk + k, blk + k + 1);
                        *a0 = $sub::<BITS>(p, qs, b0, scale * *d.add(b0), *a0);
                        *a1 = $sub::<BITS>(p.add(sb), qs, b1, scale * *d.add(b1), *a1);
                        accs += *ds.add(b0) + *ds.add(b1);
                        p = p.add(2 * sb);
                        k += 2;
                    }
                    if k < n {
                        *a0 = $sub::<BITS>(p, qs, blk + k, scale * *d.add(blk + k), *a0);
                        accs += *ds.add(blk + k);
                        p = p.add(sb);
                    }
                    let corr = if MIN {
                        -f16::from_bits((hdr >> 16) as u16).to_f32() * accs
                    } else {
                        let z = ((hdr >> 16) & 0xFF) as i32 - if BITS == 8 { 128 } else { 0 };
                        scale * z as f32 * accs
                    };
                    (p, corr)
                }
            }

            /// One row. SAFETY (caller): `row` holds `row_bytes(BITS, cols, gs)`
            /// bytes and `x` has `⌈cols/32⌉` blocks (`check`).
            #[target_feature(enable = $features)]
            unsafe fn $row<const BITS: u32, const MIN: bool>(
                row: &[u8],
                cols: usize,
                gs: usize,
                x: &Q8Ref<'_>,
            ) -> f32 {
                let nsb = gs.div_ceil(SUB_BLOCK);
                let full = cols / gs;
                let tail = (cols - full * gs).div_ceil(SUB_BLOCK);
                let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                let (mut p, mut corr, mut blk) = (row.as_ptr(), 0f32, 0usize);
                // SAFETY: the row is `full` groups of `nsb` sub-blocks, then a
                // group of `tail` (FORMAT.md), and `x` has a block for each.
                unsafe {
                    if nsb == 1 {
                        let mut g = 0;
                        while g + 2 <= full {
                            let (q, c0) = $group::<BITS, MIN>(p, 1, blk, x, &mut a0, &mut a1);
                            let (q, c1) = $group::<BITS, MIN>(q, 1, blk + 1, x, &mut a1, &mut a0);
                            (p, corr, blk, g) = (q, corr + c0 + c1, blk + 2, g + 2);
                        }
                        if g < full {
                            let (q, c) = $group::<BITS, MIN>(p, 1, blk, x, &mut a0, &mut a1);
                            (p, corr, blk) = (q, corr + c, blk + 1);
                        }
                    } else {
                        for _ in 0..full {
                            let (q, c) = $group::<BITS, MIN>(p, nsb, blk, x, &mut a0, &mut a1);
                            (p, corr, blk) = (q, corr + c, blk + nsb);
                        }
                    }
                    if tail > 0 {
                        let (_, c) = $group::<BITS, MIN>(p, tail, blk, x, &mut a0, &mut a1);
                        corr += c;
                    }
                }
                vaddvq_f32(vaddq_f32(a0, a1)) - corr
            }

            fn $matvec<const BITS: u32, const MIN: bool>(
                w: PackedRows<'_>,
                x: &Q8Ref<'_>,
                out: &mut [f32],
            ) {
                // SAFETY: the table holding this kernel is built only when its
                // features were detected; `each_row` checked the sizes.
                each_row::<BITS, MIN>(w, x, out, |row, cols, gs, x| unsafe {
                    $row::<BITS, MIN>(row, cols, gs, x)
                })
            }
        };
    }

    /// NEON row decoder for every packed type, bit-identical to the reference
    /// like the AVX2 one (multiply, then add or subtract; never fused).
    pub fn dequant_row_neon(w: PackedRows<'_>, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), w.cols, "dequant: output length");
        let row = w.row(r);
        // SAFETY: the table holding this function is built only on aarch64
        // with NEON; `row` has the layout of `w` (PackedRows checked its size)
        // and `out` has `cols` elements.
        unsafe {
            match w.dtype {
                DType::Q4G => deq_neon::<4, false>(row, w.cols, w.group_size, out),
                DType::Q4GM => deq_neon::<4, true>(row, w.cols, w.group_size, out),
                DType::Q8G => deq_neon::<8, false>(row, w.cols, w.group_size, out),
                DType::Q3G => deq_neon::<3, false>(row, w.cols, w.group_size, out),
                DType::Q2G => deq_neon::<2, false>(row, w.cols, w.group_size, out),
                _ => dequant_row_scalar(w, r, out),
            }
        }
    }

    /// 32 codes of one sub-block as unsigned bytes (8-bit codes unflipped).
    /// SAFETY (caller): `sub_block_bytes(BITS)` readable bytes at `p`.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn unpack_u8<const BITS: u32>(p: *const u8) -> (uint8x16_t, uint8x16_t) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            if BITS == 8 {
                (vld1q_u8(p), vld1q_u8(p.add(16)))
            } else {
                // Codes < 16: the signed and unsigned bytes are the same.
                let (a, b) = unpack::<BITS>(p);
                (vreinterpretq_u8_s8(a), vreinterpretq_u8_s8(b))
            }
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn deq_neon<const BITS: u32, const MIN: bool>(
        row: &[u8],
        cols: usize,
        gs: usize,
        out: &mut [f32],
    ) {
        let sb = sub_block_bytes(BITS);
        let (mut p, mut col) = (row.as_ptr(), 0usize);
        let mut buf = [0f32; SUB_BLOCK];
        while col < cols {
            let len = gs.min(cols - col);
            // SAFETY: the group's header and ⌈len/32⌉ sub-blocks are in `row`;
            // a full sub-block is written to `out[col + j..][..32]` (j + 32 ≤
            // len), a partial one goes through `buf`.
            unsafe {
                let hdr = (p as *const u32).read_unaligned();
                let scale = vdupq_n_f32(f16::from_bits(hdr as u16).to_f32());
                let other = vdupq_n_f32(if MIN {
                    f16::from_bits((hdr >> 16) as u16).to_f32()
                } else {
                    ((hdr >> 16) & 0xFF) as f32
                });
                p = p.add(GROUP_HEADER);
                let mut j = 0;
                while j < len {
                    let (c0, c1) = unpack_u8::<BITS>(p);
                    p = p.add(sb);
                    let n = (len - j).min(SUB_BLOCK);
                    let dst = if n == SUB_BLOCK {
                        out.as_mut_ptr().add(col + j)
                    } else {
                        buf.as_mut_ptr()
                    };
                    for (h, c) in [c0, c1].into_iter().enumerate() {
                        for (k, w16) in [vmovl_u8(vget_low_u8(c)), vmovl_u8(vget_high_u8(c))]
                            .into_iter()
                            .enumerate()
                        {
                            for (m, w32) in
                                [vmovl_u16(vget_low_u16(w16)), vmovl_u16(vget_high_u16(w16))]
                                    .into_iter()
                                    .enumerate()
                            {
                                let v = vcvtq_f32_u32(w32);
                                let w = if MIN {
                                    vaddq_f32(vmulq_f32(scale, v), other)
                                } else {
                                    vmulq_f32(scale, vsubq_f32(v, other))
                                };
                                vst1q_f32(dst.add(16 * h + 8 * k + 4 * m), w);
                            }
                        }
                    }
                    if n < SUB_BLOCK {
                        out[col + j..col + j + n].copy_from_slice(&buf[..n]);
                    }
                    j += SUB_BLOCK;
                }
            }
            col += len;
        }
    }

    neon_kernel!(sub_neon, group_neon, row_neon, matvec_neon, "neon", dot16);
    neon_kernel!(
        sub_sdot,
        group_sdot,
        row_sdot,
        matvec_sdot,
        "neon,dotprod",
        dot16_sdot
    );

    pub fn vec_dot_q2g_q8_neon(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_neon::<2, false>(w, x, out)
    }
    pub fn vec_dot_q3g_q8_neon(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_neon::<3, false>(w, x, out)
    }
    pub fn vec_dot_q4g_q8_neon(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_neon::<4, false>(w, x, out)
    }
    pub fn vec_dot_q8g_q8_neon(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_neon::<8, false>(w, x, out)
    }
    pub fn vec_dot_q4gm_q8_neon(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_neon::<4, true>(w, x, out)
    }
    pub fn vec_dot_q2g_q8_neondot(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_sdot::<2, false>(w, x, out)
    }
    pub fn vec_dot_q3g_q8_neondot(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_sdot::<3, false>(w, x, out)
    }
    pub fn vec_dot_q4g_q8_neondot(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_sdot::<4, false>(w, x, out)
    }
    pub fn vec_dot_q8g_q8_neondot(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_sdot::<8, false>(w, x, out)
    }
    pub fn vec_dot_q4gm_q8_neondot(w: PackedRows<'_>, x: &Q8Ref<'_>, out: &mut [f32]) {
        matvec_sdot::<4, true>(w, x, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::q8::{quantize_q8_scalar, Q8Buf};
    use crate::kernels::test_util::{lcg, make_row};
    use crate::kernels::{Isa, Kernels};
    use nibble_format::quant::dequantize;

    /// Tolerance of a SIMD kernel against the scalar reference, relative to
    /// Σ_j |ŵ_j·x̂_j| of the row (x̂ the quantized activations): both compute
    /// the same exact integer sums, so only f32 reassociation differs.
    const TOL_QG_Q8_VS_SCALAR: f64 = 2e-6;
    /// Tolerance of the int8-activation result against the f64 dot of the
    /// dequantized row with the *float* activations, relative to Σ|ŵ·x|:
    /// the activation rounding (≤ half a step of max|x|/127 per block).
    const TOL_QG_Q8_VS_F32: f64 = 1.5e-2;

    const TYPES: [DType; 5] = [DType::Q2G, DType::Q3G, DType::Q4G, DType::Q8G, DType::Q4GM];
    const SHAPES: [(usize, usize); 9] = [
        (32, 32),
        (64, 32),
        (172, 32),
        (172, 64),
        (172, 172),
        (8, 8),
        (576, 128),
        (1536, 128),
        (576, 576),
    ];

    #[test]
    fn every_isa_matches_the_scalar_reference() {
        eprintln!("instruction sets here: {:?}", Isa::available());
        let mut seed = 21u64;
        for isa in Isa::available() {
            let k = Kernels::for_isa(isa).unwrap();
            for dtype in TYPES {
                for (cols, gs) in SHAPES {
                    let rows = 7; // odd: pairs of rows and a last single row
                    let mut data = Vec::new();
                    for r in 0..rows {
                        data.extend(make_row(dtype, cols, gs, &mut seed, r == 0));
                    }
                    let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                    let mut x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed) * 4.0).collect();
                    if cols >= 64 {
                        x[32..64].fill(0.0); // an all-zero activation block
                    }
                    let mut xq = Q8Buf::new(cols);
                    xq.quantize(quantize_q8_scalar, &x);
                    let xr = xq.as_ref();
                    let (mut want, mut got) = (vec![0f32; rows], vec![0f32; rows]);
                    let reference = Kernels::for_isa(Isa::Scalar).unwrap();
                    (reference.matvec_qg(dtype))(w, &xr, &mut want);
                    (k.matvec_qg(dtype))(w, &xr, &mut got);
                    let mut deq = vec![0f32; cols];
                    for r in 0..rows {
                        dequantize(dtype, gs, w.row(r), &mut deq);
                        let xh: Vec<f64> = (0..cols)
                            .map(|i| f64::from(xr.qs[i]) * f64::from(xr.d[i / 32]))
                            .collect();
                        let mag: f64 = deq
                            .iter()
                            .zip(&xh)
                            .map(|(a, b)| (f64::from(*a) * b).abs())
                            .sum();
                        let exact: f64 = deq.iter().zip(&xh).map(|(a, b)| f64::from(*a) * b).sum();
                        let tol = TOL_QG_Q8_VS_SCALAR * mag.max(1e-9) + 1e-6 * exact.abs();
                        assert!(
                            (f64::from(got[r]) - f64::from(want[r])).abs() <= tol.max(1e-7),
                            "{isa:?} {dtype} cols {cols} gs {gs} row {r}: {} vs {}",
                            got[r],
                            want[r]
                        );
                        // And the reference is the exact dot of what it was given.
                        assert!(
                            (f64::from(want[r]) - exact).abs()
                                <= TOL_QG_Q8_VS_SCALAR * mag.max(1e-9) * 4.0 + 1e-7,
                            "{dtype} cols {cols} gs {gs}: reference {} vs exact {exact}",
                            want[r]
                        );
                        // Against float activations: bounded by activation rounding.
                        let mag32: f64 = deq
                            .iter()
                            .zip(&x)
                            .map(|(a, b)| f64::from(a * b).abs())
                            .sum();
                        let f: f64 = deq
                            .iter()
                            .zip(&x)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        assert!(
                            (f64::from(want[r]) - f).abs()
                                <= TOL_QG_Q8_VS_F32 * mag32.max(1e-9) + 1e-6,
                            "{dtype} cols {cols} gs {gs}: q8 {} vs f32 {f}",
                            want[r]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_dequantizes_rows_bit_identically() {
        let mut seed = 33u64;
        for isa in Isa::available() {
            let k = Kernels::for_isa(isa).unwrap();
            for dtype in TYPES {
                for (cols, gs) in SHAPES {
                    let rows = 3;
                    let mut data = Vec::new();
                    for r in 0..rows {
                        data.extend(make_row(dtype, cols, gs, &mut seed, r == 1));
                    }
                    let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                    for r in 0..rows {
                        let (mut a, mut b) = (vec![0f32; cols], vec![1f32; cols]);
                        dequant_row_scalar(w, r, &mut a);
                        (k.dequant_qg(dtype))(w, r, &mut b);
                        assert!(
                            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{isa:?} {dtype} cols {cols} gs {gs} row {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn all_zero_weights_and_activations_give_zero() {
        for isa in Isa::available() {
            let k = Kernels::for_isa(isa).unwrap();
            for dtype in TYPES {
                let (cols, gs) = (172, 64);
                let bits = dtype.quant_bits().unwrap();
                let data = vec![0u8; 3 * row_bytes(bits, cols, gs)];
                let w = PackedRows::new(dtype, &data, 3, cols, gs).unwrap();
                let mut xq = Q8Buf::new(cols);
                xq.quantize(quantize_q8_scalar, &vec![1.0; cols]);
                let mut out = vec![1f32; 3];
                (k.matvec_qg(dtype))(w, &xq.as_ref(), &mut out);
                assert_eq!(out, [0.0; 3], "{isa:?} {dtype}");
                xq.quantize(quantize_q8_scalar, &vec![0.0; cols]);
                let data = make_row(dtype, cols, gs, &mut 5, false).repeat(3);
                let w = PackedRows::new(dtype, &data, 3, cols, gs).unwrap();
                (k.matvec_qg(dtype))(w, &xq.as_ref(), &mut out);
                assert_eq!(out, [0.0; 3], "{isa:?} {dtype} zero input");
            }
        }
    }

    #[test]
    fn kernels_reject_mismatched_inputs() {
        let data = vec![0u8; 2 * row_bytes(4, 64, 32)];
        assert!(PackedRows::new(DType::Q4G, &data, 3, 64, 32).is_none());
        assert!(PackedRows::new(DType::Q4G, &data, 2, 64, 48).is_none());
        assert!(PackedRows::new(DType::F16, &data, 2, 64, 32).is_none());
        let w = PackedRows::new(DType::Q4G, &data, 2, 64, 32).unwrap();
        let mut xq = Q8Buf::new(96);
        xq.quantize(quantize_q8_scalar, &[0.5; 96]);
        let r = std::panic::catch_unwind(|| {
            let mut out = [0f32; 2];
            vec_dot_q4g_q8_scalar(w, &xq.as_ref(), &mut out);
        });
        assert!(
            r.is_err(),
            "a 96-value input for 64 columns must be refused"
        );
    }
}
