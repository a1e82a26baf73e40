//! GGUF `Q4_K` and `Q6_K` rows interleaved by eight (`vec_dot_x8k_q8`,
//! `matmul_x8k_q8`): an in-memory copy, built once at load, of the block
//! types that make up a Q4_K_M file's large matrices (all of
//! Qwen2.5-Coder-1.5B's), in which one 32-byte vector holds four
//! consecutive codes of each of eight rows.
//!
//! Why: the row kernels ([`super::gguf`]) reduce each row's super-block to
//! one number per token, so a prompt pays a horizontal reduction per row and
//! token, and a token's products are one chain per row. With eight rows side
//! by side, lane `r` of every integer product belongs to row `r`: the
//! activation side is a broadcast of four int8 values, the sub-block scales
//! multiply eight rows' integer sums at once, and the super-block ends in one
//! float multiply-add for eight rows. This is the layout [`super::qg_x8`]
//! gave `Q4_0`/`Q5_0` (2× on prompts there), with the K-quants' two-level
//! scales kept exactly: `Q4_K`'s weights are `d·sc_j·c − dmin·m_j` with f16
//! `d`, `dmin` per super-block of 256 and 6-bit `sc_j`, `m_j` per sub-block
//! of 32; `d·sc_j` needs 17 significant bits, so folding it into one f16
//! scale per sub-block (the `Q4GM` copy) would round the weights.
//!
//! `Q4_K` layout of [`X8KRows`], per tile of rows `8t..8t+8`, per
//! super-block (1184 bytes for 8 × 256 weights, 2.8 % more than the
//! file's 8 × 144):
//! - 16 bytes: the eight rows' `d` (f16, row order);
//! - 16 bytes: their `dmin`;
//! - 64 bytes: the 6-bit scales as bytes, `sc_j` of row `r` at `8j + r`
//!   (unpacked from the file's 12-byte form so that a kernel loads a
//!   sub-block's eight scales as one vector);
//! - 64 bytes: the minimums `m_j`, the same way;
//! - 1024 bytes of codes: per 64 columns `i` (the file's 32 bytes of
//!   nibbles, low = sub-block `2i`, high = sub-block `2i + 1`), 8 chunks of
//!   32 bytes; chunk `c` holds bytes `4c..4c+4` of each row's 32 (row `r`
//!   at `4r`), so its low nibbles are columns `64i + 4c..` and its high
//!   nibbles columns `64i + 32 + 4c..`.
//!
//! `Q6_K` (weights `d·sc_j·(c − 32)`, f16 `d` per 256, i8 `sc_j` per 16,
//! 6-bit codes as a low nibble in `ql` and two high bits in `qh`) per tile
//! super-block, 1680 bytes, exactly the file's 8 × 210:
//! - 16 bytes: the eight rows' `d` (f16);
//! - 128 bytes: the scales, `sc_j` of row `r` at `8j + r`;
//! - per half `n` (128 columns) 768 bytes: the file's `ql[64n..64n + 32]`
//!   (run A), `ql[64n + 32..64n + 64]` (run B) and `qh[32n..32n + 32]`, each
//!   in 8 chunks of four bytes per row as above. Byte `l = 4c + b` of a
//!   chunk gives columns `128n + l` (A low, `qh` bits 0–1), `+ 32` (B low,
//!   bits 2–3), `+ 64` (A high, bits 4–5) and `+ 96` (B high, bits 6–7).
//!
//! The kernels sum `c·q` in integers with unsigned codes and take the
//! offset out per 16 columns as `32·Σq` ([`Q8Ref::bsums`]) before the
//! scale multiplies.
//!
//! The activations are the [`Q8Kind::Super256`] blocks the row kernels
//! use (one scale per 256, as llama.cpp's `Q8_K`), so a super-block's
//! eight scaled integer sums add up in i32 before one conversion. Only
//! whole tiles are interleaved (rows % 8 = 0; GGUF rows are whole
//! super-blocks); other weights keep the row kernels.
//!
//! The one-token and the batched kernels have AVX2 (`vpmaddubsw` into i16,
//! eight chunks at most 8 · 3810 < 2^15, then `vpmaddwd` by the scales) and
//! AVX-512 VNNI (`vpdpbusd` into i32, then `vpmulld` by the scales)
//! versions (`Q6_K`: codes ≤ 63, so AVX2 sums two chunks per i16). The
//! scalar reference rebuilds each row in the file's layout and
//! runs [`super::gguf`]'s reference on it, so its results are that
//! reference's bit for bit. NEON keeps the row kernels for now.
//!
//! [`Q8Kind::Super256`]: super::q8::Q8Kind::Super256

use nibble_format::gguf_blocks::scales_mins_k4;
use nibble_format::DType;

use super::q8::Q8Ref;
use super::qg::PackedRows;
use super::SUB_BLOCK;

/// Rows per interleaved tile (the row-range loop is [`super::qg_x8`]'s).
pub const TILE: usize = super::qg_x8::TILE;
/// Weights per K-quant super-block.
const SUPER: usize = 256;
/// Bytes of a GGUF `Q4_K` block: d, dmin, 12 bytes of scales, 128 of nibbles.
const Q4K_BLOCK: usize = 144;
/// Offsets inside one `Q4_K` tile super-block (module docs).
const DMIN_AT: usize = 2 * TILE;
const SCALES_AT: usize = 4 * TILE;
const MINS_AT: usize = SCALES_AT + 8 * TILE;
const CODES_AT: usize = MINS_AT + 8 * TILE;
/// Bytes of one `Q4_K` tile super-block.
const TILE_SUPER: usize = CODES_AT + TILE * 128;
/// Bytes of a GGUF `Q6_K` block: ql[128], qh[64], scales[16], d.
const Q6K_BLOCK: usize = 210;
/// Offsets inside one `Q6_K` tile super-block (module docs).
const Q6_SCALES_AT: usize = 2 * TILE;
const Q6_CODES_AT: usize = Q6_SCALES_AT + 16 * TILE;
/// Bytes of one `Q6_K` tile half (128 columns): runs A and B, then `qh`.
const Q6_HALF: usize = 3 * 32 * TILE;
/// Bytes of one `Q6_K` tile super-block.
const Q6_TILE_SUPER: usize = Q6_CODES_AT + 2 * Q6_HALF;

/// GGUF `Q4_K` or `Q6_K` rows interleaved by eight (layouts above).
#[derive(Clone, Debug)]
pub struct X8KRows {
    /// `[rows / 8, cols / 256, 1184 or 1680]` bytes.
    data: Vec<u8>,
    rows: usize,
    cols: usize,
    /// `Q4K` or `Q6K`.
    dtype: DType,
}

/// Bytes of one tile super-block of `dtype`.
const fn tile_super(dtype: DType) -> usize {
    match dtype {
        DType::Q6K => Q6_TILE_SUPER,
        _ => TILE_SUPER,
    }
}

impl X8KRows {
    /// The interleaved copy of `w`, or `None` when `w` is not `Q4_K` or
    /// `Q6_K` or its rows are not a multiple of 8.
    pub fn interleave(w: PackedRows<'_>) -> Option<X8KRows> {
        Self::interleave_by_parts(w, |_| {})
    }

    /// [`X8KRows::interleave`], calling `done(rows)` after each part of
    /// [`super::qg_x8::PART_TILES`] tiles with the source rows it has copied,
    /// so that a caller can release their pages while the copy goes on (a
    /// tied head of 190 MB would otherwise be held twice at its end).
    pub fn interleave_by_parts(
        w: PackedRows<'_>,
        mut done: impl FnMut(std::ops::Range<usize>),
    ) -> Option<X8KRows> {
        let (rows, cols) = (w.rows(), w.cols());
        if !matches!(w.dtype(), DType::Q4K | DType::Q6K)
            || rows == 0
            || !rows.is_multiple_of(TILE)
            || !cols.is_multiple_of(SUPER)
        {
            return None;
        }
        if w.dtype() == DType::Q6K {
            return Some(Self::interleave_q6k(w, done));
        }
        let n_super = cols / SUPER;
        let mut data = Vec::with_capacity(rows / TILE * n_super * TILE_SUPER);
        for t in 0..rows / TILE {
            let tile: [&[u8]; TILE] = std::array::from_fn(|r| w.row(t * TILE + r));
            for s in 0..n_super {
                let blocks = tile.map(|row| &row[s * Q4K_BLOCK..(s + 1) * Q4K_BLOCK]);
                for b in &blocks {
                    data.extend_from_slice(&b[..2]);
                }
                for b in &blocks {
                    data.extend_from_slice(&b[2..4]);
                }
                let sm = blocks.map(|b| scales_mins_k4(&b[4..16]));
                for pick in [|p: (u64, u64)| p.0, |p: (u64, u64)| p.1] {
                    for j in 0..8 {
                        for &p in &sm {
                            data.push((pick(p) >> (8 * j)) as u8);
                        }
                    }
                }
                for i in 0..4 {
                    for c in 0..8 {
                        for b in &blocks {
                            let at = 16 + 32 * i + 4 * c;
                            data.extend_from_slice(&b[at..at + 4]);
                        }
                    }
                }
            }
            super::qg_x8::part_done(t, rows / TILE, &mut done);
        }
        debug_assert_eq!(data.len(), rows / TILE * n_super * TILE_SUPER);
        Some(X8KRows {
            data,
            rows,
            cols,
            dtype: DType::Q4K,
        })
    }

    /// The `Q6_K` copy (module docs): whole tiles and super-blocks, checked
    /// by [`X8KRows::interleave`].
    fn interleave_q6k(w: PackedRows<'_>, mut done: impl FnMut(std::ops::Range<usize>)) -> X8KRows {
        let (rows, cols) = (w.rows(), w.cols());
        let n_super = cols / SUPER;
        let mut data = Vec::with_capacity(rows / TILE * n_super * Q6_TILE_SUPER);
        for t in 0..rows / TILE {
            let tile: [&[u8]; TILE] = std::array::from_fn(|r| w.row(t * TILE + r));
            for s in 0..n_super {
                let blocks = tile.map(|row| &row[s * Q6K_BLOCK..(s + 1) * Q6K_BLOCK]);
                for b in &blocks {
                    data.extend_from_slice(&b[208..210]);
                }
                for j in 0..16 {
                    for b in &blocks {
                        data.push(b[192 + j]);
                    }
                }
                for n in 0..2 {
                    for run in q6k_runs(n) {
                        for c in 0..8 {
                            for b in &blocks {
                                data.extend_from_slice(&b[run + 4 * c..run + 4 * c + 4]);
                            }
                        }
                    }
                }
            }
            super::qg_x8::part_done(t, rows / TILE, &mut done);
        }
        debug_assert_eq!(data.len(), rows / TILE * n_super * Q6_TILE_SUPER);
        X8KRows {
            data,
            rows,
            cols,
            dtype: DType::Q6K,
        }
    }

    /// The block type copied: `Q4K` or `Q6K`.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes held, which decoding reads per product.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
    fn tile_bytes(&self) -> usize {
        self.cols / SUPER * tile_super(self.dtype)
    }
    fn tile(&self, t: usize) -> &[u8] {
        let tb = self.tile_bytes();
        &self.data[t * tb..(t + 1) * tb]
    }

    /// Row `r` back in the file's layout (the reference and tests).
    pub fn row_in_format(&self, r: usize, out: &mut Vec<u8>) {
        out.clear();
        let lane = r % TILE;
        if self.dtype == DType::Q6K {
            for blk in self.tile(r / TILE).chunks_exact(Q6_TILE_SUPER) {
                let mut b = [0u8; Q6K_BLOCK];
                for n in 0..2 {
                    let half = Q6_CODES_AT + n * Q6_HALF;
                    for (k, run) in q6k_runs(n).into_iter().enumerate() {
                        for c in 0..8 {
                            let at = half + 256 * k + 32 * c + 4 * lane;
                            b[run + 4 * c..run + 4 * c + 4].copy_from_slice(&blk[at..at + 4]);
                        }
                    }
                }
                for j in 0..16 {
                    b[192 + j] = blk[Q6_SCALES_AT + 8 * j + lane];
                }
                b[208..].copy_from_slice(&blk[2 * lane..2 * lane + 2]);
                out.extend_from_slice(&b);
            }
            return;
        }
        for blk in self.tile(r / TILE).chunks_exact(TILE_SUPER) {
            out.extend_from_slice(&blk[2 * lane..2 * lane + 2]);
            out.extend_from_slice(&blk[DMIN_AT + 2 * lane..DMIN_AT + 2 * lane + 2]);
            let sc: [u8; 8] = std::array::from_fn(|j| blk[SCALES_AT + 8 * j + lane]);
            let m: [u8; 8] = std::array::from_fn(|j| blk[MINS_AT + 8 * j + lane]);
            out.extend_from_slice(&pack_scales_mins_k4(&sc, &m));
            for i in 0..4 {
                for c in 0..8 {
                    let at = CODES_AT + 256 * i + 32 * c + 4 * lane;
                    out.extend_from_slice(&blk[at..at + 4]);
                }
            }
        }
    }
}

/// Where half `n`'s runs A, B and its `qh` start in a `Q6_K` block.
const fn q6k_runs(n: usize) -> [usize; 3] {
    [64 * n, 64 * n + 32, 128 + 32 * n]
}

/// The file's 12-byte form of eight 6-bit scales and minimums (the inverse
/// of [`scales_mins_k4`]): bytes 0–3 hold `sc_0..3` with the top two bits
/// of `sc_4..7`, bytes 4–7 the same for the minimums, bytes 8–11 the low
/// nibbles of `sc_4..7` and `m_4..7`.
fn pack_scales_mins_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | (sc[j + 4] >> 4) << 6;
        q[j + 4] = (m[j] & 63) | (m[j + 4] >> 4) << 6;
        q[j + 8] = (sc[j + 4] & 15) | (m[j + 4] & 15) << 4;
    }
    q
}

/// `out[i] = Σ_c ŵ[r0 + i, c] · x[c]` for `i < out.len()` (any row range:
/// tiles cut by the range are computed whole and the needed rows kept);
/// `x` in [`Q8Ref::super256`] blocks with their [`Q8Ref::bsums`].
pub type X8KMatvecFn = fn(w: &X8KRows, r0: usize, x: &Q8Ref<'_>, out: &mut [f32]);

/// Batched (prompt) product of rows `r0..r0 + n_rows` (whole tiles) with
/// the `x.len / cols` tokens back to back in `x` ([`Q8Ref::super256`]
/// blocks): `out[t·out_rs + r − r0] = Σ_c ŵ[r, c] · x_t[c]`; other entries
/// of `out` are left as they are. Each tile's codes are unpacked once per
/// group of four (AVX2) or eight (AVX-512) tokens.
pub type X8KMatmulFn =
    fn(w: &X8KRows, r0: usize, n_rows: usize, x: &Q8Ref<'_>, out: &mut [f32], out_rs: usize);

fn check(w: &X8KRows, r0: usize, x: &Q8Ref<'_>, out: &[f32]) {
    assert!(r0 + out.len() <= w.rows, "x8k kernel: rows out of range");
    check_tokens(w, x, 1);
}

/// `x` holds `n_tok` tokens of `w.cols` super-256 activations.
fn check_tokens(w: &X8KRows, x: &Q8Ref<'_>, n_tok: usize) {
    let nb = w.cols / SUB_BLOCK;
    assert!(
        x.super256
            && x.len == n_tok * w.cols
            && x.bsums.len() == n_tok * w.cols / 16
            && x.d.len() == n_tok * nb
            && x.ds.len() == n_tok * nb
            && x.qs.len() == n_tok * w.cols,
        "x8k kernel: activation blocks do not match {n_tok} tokens of {} super-256 columns",
        w.cols
    );
}

/// The preconditions of an [`X8KMatmulFn`]; the number of tokens.
fn check_batch(
    w: &X8KRows,
    r0: usize,
    n_rows: usize,
    x: &Q8Ref<'_>,
    out: &[f32],
    out_rs: usize,
) -> usize {
    assert!(
        r0.is_multiple_of(TILE) && n_rows.is_multiple_of(TILE) && r0 + n_rows <= w.rows,
        "x8k matmul: rows {r0}..{} are not whole tiles of {}",
        r0 + n_rows,
        w.rows
    );
    let n_tok = x.len / w.cols.max(1);
    check_tokens(w, x, n_tok);
    assert!(
        out_rs >= n_rows,
        "x8k matmul: output row stride below the row count"
    );
    assert!(
        n_tok == 0 || out.len() >= (n_tok - 1) * out_rs + n_rows,
        "x8k matmul: output too short"
    );
    n_tok
}

/// Scalar reference: each row rebuilt in the file's layout, then the GGUF
/// one-token reference. Allocates a row buffer: it is the reference, not a
/// decoding path.
pub fn vec_dot_x8k_q8_scalar(w: &X8KRows, r0: usize, x: &Q8Ref<'_>, out: &mut [f32]) {
    check(w, r0, x, out);
    let reference = match w.dtype {
        DType::Q6K => super::gguf::vec_dot_q6k_q8_scalar,
        _ => super::gguf::vec_dot_q4k_q8_scalar,
    };
    let mut row = Vec::new();
    for (i, o) in out.iter_mut().enumerate() {
        w.row_in_format(r0 + i, &mut row);
        let one = PackedRows::new(w.dtype, &row, 1, w.cols, SUPER).expect("one row");
        reference(one, x, std::slice::from_mut(o));
    }
}

/// Scalar reference of [`X8KMatmulFn`]: the one-token reference per token.
pub fn matmul_x8k_q8_scalar(
    w: &X8KRows,
    r0: usize,
    n_rows: usize,
    x: &Q8Ref<'_>,
    out: &mut [f32],
    out_rs: usize,
) {
    let n_tok = check_batch(w, r0, n_rows, x, out, out_rs);
    for t in 0..n_tok {
        let o = &mut out[t * out_rs..t * out_rs + n_rows];
        vec_dot_x8k_q8_scalar(w, r0, &x.tokens(w.cols, t, 1), o);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// The eight rows' d·(integer sum) of one super-block for `NT` tokens,
    /// from their sums `isum` (lane `r` = row `r`), added to `acc`: all of
    /// `Q6_K`'s, `Q4_K`'s before its minimums ([`finish_q4k`]). SAFETY
    /// (caller): `blk` is a whole tile super-block (`d` first); `d` points
    /// at each token's first block of it, the tokens `nb` blocks apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn finish_q6k<const NT: usize>(
        blk: *const u8,
        isum: &[__m256i; NT],
        d: *const f32,
        _ds: *const f32,
        nb: usize,
        acc: &mut [__m256; NT],
    ) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            for (t, (a, s)) in acc.iter_mut().zip(isum).enumerate() {
                let f = _mm256_mul_ps(dv, _mm256_set1_ps(*d.add(t * nb)));
                *a = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(*s), *a);
            }
        }
    }

    /// [`finish_q6k`], then `Q4_K`'s minimums: − dmin·Σ_j m_j·ds_j per row
    /// (`ds` as `d`). SAFETY (caller): as [`finish_q6k`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn finish_q4k<const NT: usize>(
        blk: *const u8,
        isum: &[__m256i; NT],
        d: *const f32,
        ds: *const f32,
        nb: usize,
        acc: &mut [__m256; NT],
    ) {
        // SAFETY: guaranteed by the caller.
        unsafe {
            finish_q6k(blk, isum, d, ds, nb, acc);
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(DMIN_AT) as *const __m128i));
            let m: [__m256; 8] = std::array::from_fn(|j| {
                let b = _mm_loadl_epi64(blk.add(MINS_AT + 8 * j) as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))
            });
            for (t, a) in acc.iter_mut().enumerate() {
                let dst = ds.add(t * nb);
                let mut ms = _mm256_mul_ps(m[0], _mm256_set1_ps(*dst));
                for (j, mj) in m.iter().enumerate().skip(1) {
                    ms = _mm256_fmadd_ps(*mj, _mm256_set1_ps(*dst.add(j)), ms);
                }
                *a = _mm256_fnmadd_ps(dmin, ms, *a);
            }
        }
    }

    /// The 6-bit codes of kind `k` (0: run A low nibbles with `qh` bits
    /// 0–1, 1: run B low with bits 2–3, 2: A high with 4–5, 3: B high with
    /// 6–7) of chunk `c` of the `Q6_K` tile half at `half`. SAFETY
    /// (caller): a whole tile half at `half`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn q6k_codes(half: *const u8, k: usize, c: usize) -> __m256i {
        let nib = _mm256_set1_epi8(0x0F);
        // SAFETY: guaranteed by the caller.
        unsafe {
            let v = _mm256_loadu_si256(half.add(256 * (k & 1) + 32 * c) as *const __m256i);
            let h = _mm256_loadu_si256(half.add(512 + 32 * c) as *const __m256i);
            let low = if k < 2 {
                _mm256_and_si256(v, nib)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)
            };
            // Bits 2k, 2k + 1 of each `qh` byte to bits 4–5 (16-bit
            // shifts: the mask drops what crosses from the next byte).
            let high = match k {
                0 => _mm256_slli_epi16(h, 4),
                1 => _mm256_slli_epi16(h, 2),
                2 => h,
                _ => _mm256_srli_epi16(h, 2),
            };
            _mm256_or_si256(low, _mm256_and_si256(high, _mm256_set1_epi8(0x30)))
        }
    }

    /// One `Q6_K` tile super-block `blk` against `NT` tokens (token `t`'s
    /// 256 activations at `q + t·cols`, its 16 sums per 16 at
    /// `bs + t·cols/16`), AVX2: per 16 columns `vpmaddubsw` into two i16
    /// sums of two chunks each (codes ≤ 63 against |q| ≤ 127: 2 · 16002 <
    /// 2^15), `vpmaddwd` by the scale, and the offset as `vpmaddwd` of the
    /// scale by −16·Σq (|16·Σq| ≤ 32512).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn super_q6k_avx2<const NT: usize>(
        blk: *const u8,
        q: *const i8,
        cols: usize,
        bs: *const i16,
        isum: &mut [__m256i; NT],
    ) {
        // SAFETY: a whole tile super-block at `blk`, 256 activations and 16
        // sums of every token (caller).
        unsafe {
            for n in 0..2 {
                let half = blk.add(Q6_CODES_AT + n * Q6_HALF);
                for k in 0..4 {
                    for g in 0..2 {
                        let mut acc16 = [[_mm256_setzero_si256(); 2]; NT];
                        for c in 4 * g..4 * g + 4 {
                            let code = q6k_codes(half, k, c);
                            for (t, a) in acc16.iter_mut().enumerate() {
                                let at = 128 * n + 32 * k + 4 * c;
                                let p = _mm256_maddubs_epi16(code, dword(q.add(t * cols), at));
                                a[c & 1] = _mm256_add_epi16(a[c & 1], p);
                            }
                        }
                        let j = 8 * n + 2 * k + g;
                        let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            blk.add(Q6_SCALES_AT + 8 * j) as *const __m128i,
                        ));
                        let sc16 = _mm256_or_si256(
                            _mm256_and_si256(sc, _mm256_set1_epi32(0xFFFF)),
                            _mm256_slli_epi32(sc, 16),
                        );
                        for (t, a) in acc16.iter().enumerate() {
                            let off = _mm256_set1_epi16(-16 * *bs.add(t * cols / 16 + j));
                            let s = _mm256_add_epi32(
                                _mm256_madd_epi16(a[0], sc16),
                                _mm256_madd_epi16(a[1], sc16),
                            );
                            let s = _mm256_add_epi32(s, _mm256_madd_epi16(sc16, off));
                            isum[t] = _mm256_add_epi32(isum[t], s);
                        }
                    }
                }
            }
        }
    }

    /// `(a & 0x0F) | (b & 0xF0)` per byte in one `vpternlogd` (0xE4: the
    /// constant's bits pick `a`, the others `b`).
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    #[inline]
    unsafe fn low_nibble_or(a: __m256i, b: __m256i) -> __m256i {
        _mm256_ternarylogic_epi32::<0xE4>(a, b, _mm256_set1_epi8(0x0F))
    }

    /// [`q6k_codes`] of all four kinds of chunk `c` with AVX-512VL: the
    /// `qh` bytes split once into `e = qh & 0x33` (kinds 0 and 2 at bits
    /// 0–1 and 4–5) and `o = (qh >> 2) & 0x33` (kinds 1 and 3), so that a
    /// code is one `vpternlogd` of its nibble source and `e` or `o` (shifted
    /// by 4 for kinds 0 and 1): bits 6–7 are zero there, and what 16-bit
    /// shifts carry in from the next byte lands in bits the ternary op
    /// ignores. A caller that takes one kind leaves the others' work to the
    /// compiler to drop. SAFETY (caller): a whole tile half at `half`.
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    #[inline]
    unsafe fn q6k_codes4_vl(half: *const u8, c: usize) -> [__m256i; 4] {
        let m33 = _mm256_set1_epi8(0x33);
        // SAFETY: guaranteed by the caller.
        unsafe {
            let va = _mm256_loadu_si256(half.add(32 * c) as *const __m256i);
            let vb = _mm256_loadu_si256(half.add(256 + 32 * c) as *const __m256i);
            let h = _mm256_loadu_si256(half.add(512 + 32 * c) as *const __m256i);
            let e = _mm256_and_si256(h, m33);
            let o = _mm256_and_si256(_mm256_srli_epi16(h, 2), m33);
            [
                low_nibble_or(va, _mm256_slli_epi16(e, 4)),
                low_nibble_or(vb, _mm256_slli_epi16(o, 4)),
                low_nibble_or(_mm256_srli_epi16(va, 4), e),
                low_nibble_or(_mm256_srli_epi16(vb, 4), o),
            ]
        }
    }

    /// [`super_q6k_avx2`] with AVX-512 VNNI: `vpdpbusd` per chunk into i32,
    /// the offset 32·Σq subtracted, then `vpmulld` by the scale. One or two
    /// tokens build a chunk's four codes at once and keep one sum per
    /// 16-column sub-block (four independent chains); more tokens take one
    /// kind at a time, so that their sums stay in registers.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn super_q6k_vnni<const NT: usize>(
        blk: *const u8,
        q: *const i8,
        cols: usize,
        bs: *const i16,
        isum: &mut [__m256i; NT],
    ) {
        // Adds sub-block `j`'s sums `dot` of token `t`, less 32·Σq, times
        // the eight rows' scales.
        let scaled = |isum: &mut __m256i, dot: __m256i, j: usize, t: usize| {
            // SAFETY: as below.
            unsafe {
                let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                    blk.add(Q6_SCALES_AT + 8 * j) as *const __m128i
                ));
                let off = _mm256_set1_epi32(32 * i32::from(*bs.add(t * cols / 16 + j)));
                let s = _mm256_mullo_epi32(_mm256_sub_epi32(dot, off), sc);
                *isum = _mm256_add_epi32(*isum, s);
            }
        };
        // SAFETY: as in `super_q6k_avx2`.
        unsafe {
            for n in 0..2 {
                let half = blk.add(Q6_CODES_AT + n * Q6_HALF);
                for g in 0..2 {
                    if NT <= 2 {
                        let mut acc = [[_mm256_setzero_si256(); 4]; NT];
                        for c in 4 * g..4 * g + 4 {
                            let codes = q6k_codes4_vl(half, c);
                            for (t, a) in acc.iter_mut().enumerate() {
                                let qt = q.add(t * cols + 128 * n + 4 * c);
                                for (k, code) in codes.into_iter().enumerate() {
                                    a[k] = _mm256_dpbusd_epi32(a[k], code, dword(qt, 32 * k));
                                }
                            }
                        }
                        for (t, a) in acc.iter().enumerate() {
                            for (k, &dot) in a.iter().enumerate() {
                                scaled(&mut isum[t], dot, 8 * n + 2 * k + g, t);
                            }
                        }
                    } else {
                        for k in 0..4 {
                            let mut acc = [_mm256_setzero_si256(); NT];
                            for c in 4 * g..4 * g + 4 {
                                let code = q6k_codes4_vl(half, c)[k];
                                for (t, a) in acc.iter_mut().enumerate() {
                                    let at = 128 * n + 32 * k + 4 * c;
                                    *a = _mm256_dpbusd_epi32(*a, code, dword(q.add(t * cols), at));
                                }
                            }
                            for (t, &dot) in acc.iter().enumerate() {
                                scaled(&mut isum[t], dot, 8 * n + 2 * k + g, t);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Eight 6-bit scales (bytes at `p`) as i32 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scales32(p: *const u8) -> __m256i {
        // SAFETY: 8 bytes at `p` (caller).
        unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)) }
    }

    /// Four activations of token `t` at column offset `at`, broadcast.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dword(q: *const i8, at: usize) -> __m256i {
        // SAFETY: 4 bytes at `q + at` (caller).
        unsafe { _mm256_set1_epi32((q.add(at) as *const i32).read_unaligned()) }
    }

    macro_rules! tile_kernel {
        ($tile:ident, $features:literal, $super:ident, $finish:ident, $stride:expr) => {
            /// The dot products of one tile (eight rows) with `NT` tokens
            /// from `t0` of `x`. SAFETY (caller): `p` is a whole tile of a
            /// copy of `cols` columns; `x` holds tokens `t0..t0 + NT`.
            #[target_feature(enable = $features)]
            unsafe fn $tile<const NT: usize>(
                p: *const u8,
                cols: usize,
                x: &Q8Ref<'_>,
                t0: usize,
            ) -> [[f32; TILE]; NT] {
                let nb = cols / SUB_BLOCK;
                let mut acc = [_mm256_setzero_ps(); NT];
                // SAFETY: the tile holds cols / 256 super-blocks from `p`;
                // each token's blocks and sums are whole (caller).
                unsafe {
                    let q0 = x.qs.as_ptr().add(t0 * cols);
                    let bs0 = x.bsums.as_ptr().add(t0 * cols / 16);
                    for s in 0..cols / SUPER {
                        let blk = p.add(s * $stride);
                        if NT == 1 {
                            // Into the next tile at a tile's end; a
                            // prefetch never faults, so past the copy's end
                            // it is only a wasted hint.
                            let ahead = blk.wrapping_add(crate::kernels::PREFETCH_AHEAD);
                            for line in (0..$stride).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                            }
                        }
                        let mut isum = [_mm256_setzero_si256(); NT];
                        $super::<NT>(blk, q0.add(s * SUPER), cols, bs0.add(16 * s), &mut isum);
                        let e = t0 * nb + s * (SUPER / SUB_BLOCK);
                        let (d, ds) = (x.d.as_ptr().add(e), x.ds.as_ptr().add(e));
                        $finish::<NT>(blk, &isum, d, ds, nb, &mut acc);
                    }
                    std::array::from_fn(|t| {
                        let mut v = [0f32; TILE];
                        _mm256_storeu_ps(v.as_mut_ptr(), acc[t]);
                        v
                    })
                }
            }
        };
    }

    /// 64 columns `i` of a tile super-block `blk` against `NT` tokens
    /// (token `t`'s 64 activations at `q + t·cols`), AVX2: per chunk
    /// `vpmaddubsw` into i16 (eight chunks of codes ≤ 15 against |q| ≤ 127
    /// stay below 8 · 3810 < 2^15), then `vpmaddwd` by the sub-block's
    /// scales (both i16 halves of a row's lane) into `isum`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn pair_avx2<const NT: usize>(
        blk: *const u8,
        i: usize,
        q: *const i8,
        cols: usize,
        isum: &mut [__m256i; NT],
    ) {
        let nib = _mm256_set1_epi8(0x0F);
        // SAFETY: a whole tile super-block at `blk`, 64 activations of
        // every token at `q` (caller).
        unsafe {
            let mut lo16 = [_mm256_setzero_si256(); NT];
            let mut hi16 = [_mm256_setzero_si256(); NT];
            let codes = blk.add(CODES_AT + 256 * i);
            for c in 0..8 {
                let v = _mm256_loadu_si256(codes.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(v, nib);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                for t in 0..NT {
                    let qt = q.add(t * cols);
                    let pl = _mm256_maddubs_epi16(lo, dword(qt, 4 * c));
                    let ph = _mm256_maddubs_epi16(hi, dword(qt, 32 + 4 * c));
                    lo16[t] = _mm256_add_epi16(lo16[t], pl);
                    hi16[t] = _mm256_add_epi16(hi16[t], ph);
                }
            }
            let both = |v: __m256i| _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
            let sc_lo = both(scales32(blk.add(SCALES_AT + 16 * i)));
            let sc_hi = both(scales32(blk.add(SCALES_AT + 16 * i + 8)));
            for t in 0..NT {
                let s = _mm256_add_epi32(
                    _mm256_madd_epi16(lo16[t], sc_lo),
                    _mm256_madd_epi16(hi16[t], sc_hi),
                );
                isum[t] = _mm256_add_epi32(isum[t], s);
            }
        }
    }

    /// [`pair_avx2`] with AVX-512 VNNI: `vpdpbusd` (u8 × i8 → i32, four
    /// products per lane) per chunk, then `vpmulld` by the scales. One or two
    /// tokens run two chains per half so that the `vpdpbusd` latencies
    /// overlap.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn pair_vnni<const NT: usize>(
        blk: *const u8,
        i: usize,
        q: *const i8,
        cols: usize,
        isum: &mut [__m256i; NT],
    ) {
        let nib = _mm256_set1_epi8(0x0F);
        let split = NT <= 2;
        // SAFETY: as in `pair_avx2`.
        unsafe {
            let mut lo32 = [[_mm256_setzero_si256(); 2]; NT];
            let mut hi32 = [[_mm256_setzero_si256(); 2]; NT];
            let codes = blk.add(CODES_AT + 256 * i);
            for c in 0..8 {
                let v = _mm256_loadu_si256(codes.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(v, nib);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                let k = if split { c & 1 } else { 0 };
                for t in 0..NT {
                    let qt = q.add(t * cols);
                    lo32[t][k] = _mm256_dpbusd_epi32(lo32[t][k], lo, dword(qt, 4 * c));
                    hi32[t][k] = _mm256_dpbusd_epi32(hi32[t][k], hi, dword(qt, 32 + 4 * c));
                }
            }
            let sc_lo = scales32(blk.add(SCALES_AT + 16 * i));
            let sc_hi = scales32(blk.add(SCALES_AT + 16 * i + 8));
            for t in 0..NT {
                let mut lo = lo32[t][0];
                let mut hi = hi32[t][0];
                if split {
                    lo = _mm256_add_epi32(lo, lo32[t][1]);
                    hi = _mm256_add_epi32(hi, hi32[t][1]);
                }
                let s =
                    _mm256_add_epi32(_mm256_mullo_epi32(lo, sc_lo), _mm256_mullo_epi32(hi, sc_hi));
                isum[t] = _mm256_add_epi32(isum[t], s);
            }
        }
    }

    /// A `Q4_K` tile super-block as four runs of 64 columns (`$pair`), in
    /// the signature of [`super_q6k_avx2`].
    macro_rules! super_q4k {
        ($name:ident, $features:literal, $pair:ident) => {
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $name<const NT: usize>(
                blk: *const u8,
                q: *const i8,
                cols: usize,
                _bs: *const i16,
                isum: &mut [__m256i; NT],
            ) {
                for i in 0..4 {
                    // SAFETY: a whole tile super-block at `blk`, 256
                    // activations of every token at `q` (caller).
                    unsafe { $pair::<NT>(blk, i, q.add(64 * i), cols, isum) };
                }
            }
        };
    }

    super_q4k!(super_q4k_avx2, "avx2,fma,f16c", pair_avx2);
    super_q4k!(
        super_q4k_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
        pair_vnni
    );
    tile_kernel!(
        tile_q4k_avx2,
        "avx2,fma,f16c",
        super_q4k_avx2,
        finish_q4k,
        TILE_SUPER
    );
    tile_kernel!(
        tile_q6k_avx2,
        "avx2,fma,f16c",
        super_q6k_avx2,
        finish_q6k,
        Q6_TILE_SUPER
    );
    tile_kernel!(
        tile_q4k_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
        super_q4k_vnni,
        finish_q4k,
        TILE_SUPER
    );
    tile_kernel!(
        tile_q6k_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
        super_q6k_vnni,
        finish_q6k,
        Q6_TILE_SUPER
    );

    /// The entry points of one instruction set: `$matvec` ([`X8KMatvecFn`])
    /// and `$matmul` ([`X8KMatmulFn`], `$g` tokens per unpacked chunk, the
    /// rest by four, two and one), on the tile kernels `$q4k` and `$q6k`.
    macro_rules! entry_points {
        ($matvec:ident, $matmul:ident, $q4k:ident, $q6k:ident, $g:literal) => {
            pub fn $matvec(w: &X8KRows, r0: usize, x: &Q8Ref<'_>, out: &mut [f32]) {
                check(w, r0, x, out);
                let tile = match w.dtype {
                    DType::Q6K => $q6k::<1>,
                    _ => $q4k::<1>,
                };
                super::super::qg_x8::for_each_tile(&w.data, w.tile_bytes(), r0, out, |t| {
                    // SAFETY: the table holding this kernel is built only
                    // when its features were detected; `t` is one whole
                    // tile and `check` verified the activation blocks.
                    unsafe { tile(t.as_ptr(), w.cols, x, 0)[0] }
                });
            }

            pub fn $matmul(
                w: &X8KRows,
                r0: usize,
                n_rows: usize,
                x: &Q8Ref<'_>,
                out: &mut [f32],
                out_rs: usize,
            ) {
                let n_tok = check_batch(w, r0, n_rows, x, out, out_rs);
                macro_rules! tile {
                    ($nt:literal, $p:expr, $t0:expr) => {
                        match w.dtype {
                            DType::Q6K => $q6k::<$nt>($p, w.cols, x, $t0),
                            _ => $q4k::<$nt>($p, w.cols, x, $t0),
                        }
                    };
                }
                fn put<const NT: usize>(
                    v: [[f32; TILE]; NT],
                    out: &mut [f32],
                    t0: usize,
                    out_rs: usize,
                    at: usize,
                ) {
                    for (t, vals) in v.iter().enumerate() {
                        let o = (t0 + t) * out_rs + at;
                        out[o..o + TILE].copy_from_slice(vals);
                    }
                }
                for tile in r0 / TILE..(r0 + n_rows) / TILE {
                    let p = w.tile(tile).as_ptr();
                    let at = tile * TILE - r0;
                    let mut t0 = 0;
                    // SAFETY: as in `$matvec`; `check_batch` verified the
                    // tokens t0..t0 + NT of every call.
                    unsafe {
                        while n_tok - t0 >= $g {
                            put(tile!($g, p, t0), out, t0, out_rs, at);
                            t0 += $g;
                        }
                        if n_tok - t0 >= 4 && $g > 4 {
                            put(tile!(4, p, t0), out, t0, out_rs, at);
                            t0 += 4;
                        }
                        if n_tok - t0 >= 2 {
                            put(tile!(2, p, t0), out, t0, out_rs, at);
                            t0 += 2;
                        }
                        if n_tok > t0 {
                            put(tile!(1, p, t0), out, t0, out_rs, at);
                        }
                    }
                }
            }
        };
    }

    entry_points!(
        vec_dot_x8k_q8_avx2,
        matmul_x8k_q8_avx2,
        tile_q4k_avx2,
        tile_q6k_avx2,
        4
    );
    entry_points!(
        vec_dot_x8k_q8_avx512,
        matmul_x8k_q8_avx512,
        tile_q4k_vnni,
        tile_q6k_vnni,
        8
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::q8::{quantize_q8_super256, Q8Buf, Q8Kind};
    use crate::kernels::test_util::{lcg, make_gguf_rows};
    use crate::kernels::{Isa, Kernels};

    /// SIMD against the reference, relative to Σ |ŵ·x̂| of the row: exact
    /// integer sums, f32 reassociation only.
    const TOL_X8K_VS_SCALAR: f32 = 2e-6;

    /// The block types copied.
    const DTYPES: [DType; 2] = [DType::Q4K, DType::Q6K];

    /// Rows of seeded blocks; row 3's first block has a zero `d`, row 5's
    /// blocks the largest codes (15 or 63) and scales (63; `Q6_K`: 127 and
    /// −128 in turn): the largest products, so AVX2's i16 sums against
    /// activations of 127 must not saturate. `Q6_K`'s row 6 has codes 0
    /// (weights −32·d·sc: the offset alone).
    fn weight(dtype: DType, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        let mut data = make_gguf_rows(dtype, rows, cols, seed, false);
        let block = if dtype == DType::Q6K {
            Q6K_BLOCK
        } else {
            Q4K_BLOCK
        };
        let per_row = cols / SUPER * block;
        let d_at = if dtype == DType::Q6K { 208 } else { 0 };
        if rows > 3 {
            data[3 * per_row + d_at..3 * per_row + d_at + 2].fill(0);
        }
        if rows > 6 {
            for b in data[5 * per_row..6 * per_row].chunks_exact_mut(block) {
                if dtype == DType::Q6K {
                    b[..192].fill(0xFF);
                    for (j, sc) in b[192..208].iter_mut().enumerate() {
                        *sc = if j % 2 == 0 { 127 } else { 0x80 };
                    }
                } else {
                    b[4..16].copy_from_slice(&pack_scales_mins_k4(&[63; 8], &[63; 8]));
                    b[16..].fill(0xFF);
                }
            }
            if dtype == DType::Q6K {
                for b in data[6 * per_row..7 * per_row].chunks_exact_mut(block) {
                    b[..192].fill(0);
                }
            }
        }
        data
    }

    /// Σ_c |ŵ[r, c] · x̂[c]| of row `r`: the scale of a float-order error.
    fn magnitude(w: PackedRows<'_>, r: usize, x: &Q8Ref<'_>) -> f32 {
        let mut deq = vec![0f32; w.cols()];
        let mut xd = vec![0f32; w.cols()];
        nibble_format::quant::dequantize(w.dtype(), SUPER, w.row(r), &mut deq);
        x.dequantize_into(&mut xd);
        deq.iter().zip(&xd).map(|(a, b)| (a * b).abs()).sum()
    }

    #[test]
    fn pack_scales_mins_inverts_the_files_form() {
        let mut seed = 3u64;
        for _ in 0..200 {
            let q: [u8; 12] = std::array::from_fn(|_| ((lcg(&mut seed) + 1.0) * 127.9) as u8);
            let (sc, m) = scales_mins_k4(&q);
            assert_eq!(pack_scales_mins_k4(&sc.to_le_bytes(), &m.to_le_bytes()), q);
        }
    }

    #[test]
    fn the_copy_keeps_every_block_byte_for_byte() {
        let mut seed = 11u64;
        for dtype in DTYPES {
            for (rows, cols) in [(8, 256), (16, 768), (24, 1536)] {
                let data = weight(dtype, rows, cols, &mut seed);
                let w = PackedRows::new(dtype, &data, rows, cols, SUPER).unwrap();
                let x8 = X8KRows::interleave(w).unwrap();
                assert_eq!(x8.dtype(), dtype);
                assert_eq!(x8.bytes(), rows / TILE * cols / SUPER * tile_super(dtype));
                let mut row = Vec::new();
                for r in 0..rows {
                    x8.row_in_format(r, &mut row);
                    assert_eq!(&row[..], w.row(r), "{dtype} row {r} of {rows}×{cols}");
                }
            }
            // Rows not whole tiles: no copy.
            let data = weight(dtype, 9, 256, &mut seed);
            let w = PackedRows::new(dtype, &data, 9, 256, SUPER).unwrap();
            assert!(X8KRows::interleave(w).is_none());
        }
        // Q6_K's copy is the file's size; Q4_K's adds the unpacked scales.
        assert_eq!(Q6_TILE_SUPER, TILE * Q6K_BLOCK);
        assert_eq!(TILE_SUPER, TILE * Q4K_BLOCK + 32);
    }

    /// The copy made part by part reports every source row once, in order,
    /// in parts of `PART_TILES` tiles, and is the same copy.
    #[test]
    fn parts_report_every_row_once() {
        let mut seed = 13u64;
        let part = super::super::qg_x8::PART_TILES * TILE;
        let (rows, cols) = (part + 16, 256);
        for dtype in DTYPES {
            let data = weight(dtype, rows, cols, &mut seed);
            let w = PackedRows::new(dtype, &data, rows, cols, SUPER).unwrap();
            let mut seen = Vec::new();
            let x8 = X8KRows::interleave_by_parts(w, |r| seen.push(r)).unwrap();
            assert_eq!(seen, vec![0..part, part..rows], "{dtype}");
            assert_eq!(x8.data, X8KRows::interleave(w).unwrap().data, "{dtype}");
        }
    }

    /// Activations of `n_tok` tokens, super-256 blocks; the first
    /// super-block of token 0 all 127 after quantization (against row 5).
    fn activations(n_tok: usize, cols: usize, seed: &mut u64) -> Q8Buf {
        let mut xs: Vec<f32> = (0..n_tok * cols).map(|_| lcg(seed) * 3.0).collect();
        xs[..SUPER].fill(2.0);
        let mut xq = Q8Buf::new(n_tok * cols);
        xq.quantize_as(Q8Kind::Super256, quantize_q8_super256, &xs);
        xq
    }

    #[test]
    fn every_isa_matches_the_scalar_reference() {
        let mut seed = 5u64;
        for dtype in DTYPES {
            for (rows, cols) in [(8, 256), (16, 512), (24, 1536), (16, 2048)] {
                let data = weight(dtype, rows, cols, &mut seed);
                let w = PackedRows::new(dtype, &data, rows, cols, SUPER).unwrap();
                let x8 = X8KRows::interleave(w).unwrap();
                let xq = activations(1, cols, &mut seed);
                let x = xq.as_ref();
                // The reference equals the row kernels' reference exactly.
                let mut want = vec![0f32; rows];
                vec_dot_x8k_q8_scalar(&x8, 0, &x, &mut want);
                let mut rows_ref = vec![0f32; rows];
                Kernels::for_isa(Isa::Scalar).unwrap().matvec_qg(dtype)(w, &x, &mut rows_ref);
                assert_eq!(want, rows_ref, "{dtype}");
                for isa in Isa::available() {
                    let Some(f) = Kernels::for_isa(isa).unwrap().matvec_x8k else {
                        continue;
                    };
                    // Every row range, tiles cut included.
                    for (r0, n) in [(0, rows), (1, rows - 1), (3, rows - 4), (rows - 1, 1)] {
                        let mut got = vec![f32::NAN; n];
                        f(&x8, r0, &x, &mut got);
                        for (i, g) in got.iter().enumerate() {
                            let r = r0 + i;
                            let tol = TOL_X8K_VS_SCALAR * magnitude(w, r, &x).max(1e-12);
                            assert!(
                                (g - want[r]).abs() <= tol,
                                "{dtype} {isa} {rows}×{cols} row {r}: {g} vs {}",
                                want[r]
                            );
                        }
                    }
                }
            }
        }
    }

    /// The batched kernels against the reference: 1 to 19 tokens (groups
    /// of eight and four and the rest), a row range of whole tiles, output
    /// rows wider than the range; entries outside it untouched.
    #[test]
    fn batched_kernels_match_the_scalar_reference() {
        let mut seed = 9u64;
        let (rows, cols) = (24, 512);
        for dtype in DTYPES {
            let data = weight(dtype, rows, cols, &mut seed);
            let w = PackedRows::new(dtype, &data, rows, cols, SUPER).unwrap();
            let x8 = X8KRows::interleave(w).unwrap();
            for n_tok in [1, 2, 3, 5, 7, 8, 12, 19] {
                let xq = activations(n_tok, cols, &mut seed);
                let x = xq.as_ref();
                let (r0, n_rows, out_rs) = (0, 16, 18);
                let mut want = vec![f32::NAN; n_tok * out_rs];
                matmul_x8k_q8_scalar(&x8, r0, n_rows, &x, &mut want, out_rs);
                for t in 0..n_tok {
                    let mut one = vec![0f32; n_rows];
                    vec_dot_x8k_q8_scalar(&x8, r0, &x.tokens(cols, t, 1), &mut one);
                    assert_eq!(&want[t * out_rs..t * out_rs + n_rows], &one[..]);
                }
                for isa in Isa::available() {
                    let Some(mm) = Kernels::for_isa(isa).unwrap().matmul_x8k else {
                        continue;
                    };
                    for r0 in [0, 8] {
                        let mut want = vec![f32::NAN; n_tok * out_rs];
                        matmul_x8k_q8_scalar(&x8, r0, n_rows, &x, &mut want, out_rs);
                        let mut got = vec![f32::NAN; n_tok * out_rs];
                        mm(&x8, r0, n_rows, &x, &mut got, out_rs);
                        for t in 0..n_tok {
                            let xt = x.tokens(cols, t, 1);
                            for i in 0..out_rs {
                                let (g, e) = (got[t * out_rs + i], want[t * out_rs + i]);
                                if i >= n_rows {
                                    assert!(g.is_nan(), "{dtype} {isa}: wrote outside the rows");
                                    continue;
                                }
                                let tol = TOL_X8K_VS_SCALAR * magnitude(w, r0 + i, &xt).max(1e-12);
                                assert!(
                                    (g - e).abs() <= tol,
                                    "{dtype} {isa} {n_tok} tokens, token {t} row {}: {g} vs {e}",
                                    r0 + i
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
