//! Packed rows interleaved by eight for decoding (`vec_dot_x8_q8`): an
//! in-memory copy of `Q4G` / `Q4GM` / `Q8G` weights, built once at load, in
//! which one 32-byte vector holds four consecutive codes of each of eight
//! rows. `Q3G` / `Q2G` weights are copied too, their codes widened to 4-bit
//! nibbles (same scales and zero points, so the same Ŵ): the copy reads 4
//! bits per weight instead of 3 or 2, but the 4-bit kernels run 3.5–4.6×
//! more weights per second than the 2- and 3-bit row kernels (criterion,
//! AVX-512; docs/BENCHMARKS.md.
//!
//! Why: the row-by-row kernels ([`super::qg`]) reduce each 32-weight
//! sub-block of one row to one number, so per 32 weights they pay an unpack,
//! a horizontal integer widening, an i32 → f32 conversion and a multiply-add
//! by the block scale; that keeps a core at about half the memory bandwidth
//! (docs/runtime-performance.md). With eight rows side by side, lane `r` of every
//! integer product belongs to row `r`: the sums never cross lanes, the
//! i16 products of a whole sub-block accumulate before one widening, and
//! the conversion, the block scale, the group scale and the zero-point /
//! minimum correction are each one instruction for eight rows. The
//! activation side is a broadcast of four int8 values per instruction.
//! (8-bit codes can saturate `vpmaddubsw`'s i16 pairs, so they widen to
//! i32 per chunk, as in the row kernels.)
//!
//! Layout of [`X8Rows`], per tile of rows `8t..8t+8`, per group `g`:
//! 16 bytes of eight f16 scales (row order), 16 bytes of eight f16
//! "others" (the `Q4GM` minimum; the `Q4G` zero point `z`, or `z − 128` for
//! `Q8G`, as exact f16 integers; left out when the weight is *symmetric*,
//! every zero point the grid's middle 2^(bits−1), as for GGUF `Q4_0` and
//! `Q8_0` blocks: then the copy reads 2 bytes per group and row fewer than
//! the file, 18 instead of 20 per 32 weights for `Q4_0`, as llama.cpp
//! does), then per 32-column sub-block the rows'
//! sub-block bytes in chunks of four: chunk `j` (32 bytes) holds bytes
//! `4j..4j+4` of each row's sub-block (row `r` at `4r`); 4 chunks for 4-bit
//! (each byte keeps the format's nibbles, low = column `i`, high = column
//! `i + 16`, so chunk `j` gives columns `4j..` and `16+4j..`), 8 for 8-bit
//! (columns `4j..4j+4`, stored as signed `c − 128` so that the AVX2 kernel
//! can use `vpmaddubsw`'s sign form without flipping them per token).
//! The last group may be shorter (SmolLM2's 576 columns are 4 groups of 128
//! and one of 64), but only whole tiles and whole sub-blocks are
//! interleaved (rows % 8 = 0, cols % 32 = 0); other weights keep the
//! row-by-row kernels.
//!
//! GGUF `Q5_0` blocks (scale `d`, weights `d·(c − 16)` with 5-bit codes
//! `c`) are copied as 5-bit tiles: the symmetric 4-bit layout of their low
//! nibbles (the same nibble order), each tile sub-block followed by 32
//! bytes of fifth bits, one 32-bit mask per chunk (chunk order as the
//! kernels read them: `k < 4` the low nibbles of chunk `k`, `k ≥ 4` the
//! high nibbles of chunk `k − 4`; bit `4r + i` belongs to byte `4r + i` of
//! that chunk, row `r`). The copy is exactly the file's 22 bytes per 32
//! weights and row; a kernel ORs the bits in as 16 (AVX-512: a byte-masked
//! add, AVX2 and NEON: bits spread to bytes), then runs the 4-bit
//! arithmetic with the zero point 16. Without the copy a `Q5_0` row kernel
//! pays a float conversion and multiply-add per 32 weights and token, as
//! the module docs say, which left Qwen2.5-Coder-0.5B Q4_K_M prompts (half
//! of its weights are `Q5_0`) at 0.71–0.82× llama.cpp (docs/gguf.md).
//!
//! The copy costs the weights' size again in memory; decoding then reads
//! only the copy. The one-token kernel has AVX2, AVX-512 VNNI (`vpdpbusd`
//! on 256-bit vectors), NEON and NEON dot-product (`sdot`) versions; so has
//! the batched (4- and 5-bit) kernel. The scalar reference rebuilds each row in the
//! format's layout and runs the one-token reference on it, so its results
//! are those of [`super::qg`]'s reference bit for bit.

use half::f16;
use nibble_format::dtype::{row_bytes, sub_block_bytes, DType, GROUP_HEADER};
use nibble_format::quant::unpack_sub_block;

use super::q8::{Q8BatchRef, Q8Ref};
use super::qg::PackedRows;
use super::SUB_BLOCK;

/// Rows per interleaved tile.
pub const TILE: usize = 8;
/// Tiles per part of a copy after which `interleave_by_parts` reports the
/// source rows done (4096 rows: a few MB of a large matrix).
pub const PART_TILES: usize = 512;

/// The end of a copy's tile `t`: every [`PART_TILES`] tiles and at the
/// last one, `done` gets the source rows copied since the last call.
pub(super) fn part_done(t: usize, n_tiles: usize, done: &mut impl FnMut(std::ops::Range<usize>)) {
    if (t + 1).is_multiple_of(PART_TILES) || t + 1 == n_tiles {
        let first = t / PART_TILES * PART_TILES;
        done(first * TILE..(t + 1) * TILE);
    }
}
/// Bytes of one tile's group header: eight f16 scales, eight f16 others.
const TILE_HEADER: usize = 2 * 2 * TILE;
/// Bytes of one tile's group header when the weight is symmetric: the scales.
const TILE_HEADER_SYM: usize = 2 * TILE;

/// Bytes per row and sub-block of 32 in the copy: the codes, and for 5-bit
/// ones the 4 bytes of fifth bits.
const fn code_bytes(bits: u32) -> usize {
    match bits {
        5 => 16 + 4,
        8 => 32,
        _ => 16,
    }
}

/// Bytes of a GGUF `Q5_0` block: f16 scale, 32 fifth bits, 16 bytes of nibbles.
const Q5_0_BLOCK: usize = 22;

/// The first of the four columns whose codes chunk `chunk` (0..8) of a
/// 5-bit tile holds: low nibbles of bytes `4·chunk..` for `chunk < 4`,
/// else high nibbles of bytes `4·(chunk − 4)..`, columns 16 further on.
const fn chunk_first_column(chunk: usize) -> usize {
    if chunk < 4 {
        4 * chunk
    } else {
        16 + 4 * (chunk - 4)
    }
}

/// A packed weight interleaved by eight rows (layout above; 3- and 2-bit
/// codes widened to 4).
#[derive(Clone, Debug)]
pub struct X8Rows {
    /// `[rows / 8, n_groups, 32 + nsb·128]` bytes.
    data: Vec<u8>,
    rows: usize,
    cols: usize,
    group_size: usize,
    /// 4, 5 (GGUF `Q5_0`) or 8.
    bits: u32,
    /// The header holds an f16 minimum (`Q4GM`), else a zero point.
    min: bool,
    /// Every zero point is 2^(bits−1): the header holds only the scales.
    sym: bool,
}

impl X8Rows {
    /// The interleaved copy of `w`, or `None` when `w` is not a packed
    /// type, its rows are not a multiple of 8 or its columns not a multiple
    /// of 32.
    pub fn interleave(w: PackedRows<'_>) -> Option<X8Rows> {
        Self::interleave_by_parts(w, |_| {})
    }

    /// [`X8Rows::interleave`], calling `done(rows)` after each part of
    /// [`PART_TILES`] tiles with the source rows it has copied, so that a
    /// caller can release their pages while the copy goes on.
    pub fn interleave_by_parts(
        w: PackedRows<'_>,
        mut done: impl FnMut(std::ops::Range<usize>),
    ) -> Option<X8Rows> {
        if w.dtype() == DType::Q5_0 {
            return Self::interleave_q5_0(w, done);
        }
        // `Q3G` / `Q2G` codes are widened to 4-bit nibbles (same scales and
        // zero points, so the same Ŵ): they then run through the 4-bit
        // kernels, 3.5–4.6× faster per weight than their row kernels, and
        // read 4 bits per weight instead of 3 or 2.
        let (src_bits, bits, min) = match w.dtype() {
            DType::Q2G => (2, 4, false),
            DType::Q3G => (3, 4, false),
            DType::Q4G => (4, 4, false),
            DType::Q4GM => (4, 4, true),
            DType::Q8G => (8, 8, false),
            _ => return None,
        };
        let src_sb_bytes = sub_block_bytes(src_bits);
        let sb_bytes = sub_block_bytes(bits);
        let flip = if bits == 8 { 0x80u8 } else { 0 };
        let (rows, cols, gs) = (w.rows(), w.cols(), w.group_size());
        if rows == 0 || !rows.is_multiple_of(TILE) || !cols.is_multiple_of(SUB_BLOCK) {
            return None;
        }
        let mid = 1u8 << (bits - 1);
        let sym = !min
            && (0..rows).all(|r| {
                let row = w.row(r);
                let mut h = 0;
                group_sub_blocks(cols, gs).all(|nsb| {
                    let z = row[h + 2];
                    h += GROUP_HEADER + nsb * src_sb_bytes;
                    z == mid
                })
            });
        // One sub-block of a row in the copy's code layout (4- or 8-bit).
        let sub_block = |row: &[u8], at: usize, out: &mut [u8; SUB_BLOCK]| {
            if src_bits == bits {
                out[..sb_bytes].copy_from_slice(&row[at..at + sb_bytes]);
            } else {
                let mut c = [0u8; SUB_BLOCK];
                unpack_sub_block(src_bits, &row[at..at + src_sb_bytes], &mut c);
                for j in 0..SUB_BLOCK / 2 {
                    out[j] = c[j] | c[j + SUB_BLOCK / 2] << 4;
                }
            }
        };
        let n_groups = cols.div_ceil(gs);
        let size = rows * row_bytes(bits, cols, gs) - if sym { rows * n_groups * 2 } else { 0 };
        let mut data = Vec::with_capacity(size);
        let mut put = |b: &[u8]| data.extend_from_slice(b);
        for t in 0..rows / TILE {
            let tile: [&[u8]; TILE] = std::array::from_fn(|r| w.row(t * TILE + r));
            let mut h = 0;
            for nsb in group_sub_blocks(cols, gs) {
                for row in &tile {
                    put(&row[h..h + 2]);
                }
                if !sym {
                    for row in &tile {
                        if min {
                            put(&row[h + 2..h + 4]);
                        } else {
                            let z = f32::from(row[h + 2]) - f32::from(flip);
                            put(&f16::from_f32(z).to_le_bytes());
                        }
                    }
                }
                for k in 0..nsb {
                    let at = h + GROUP_HEADER + k * src_sb_bytes;
                    let mut sbs = [[0u8; SUB_BLOCK]; TILE];
                    for (row, sb) in tile.iter().zip(&mut sbs) {
                        sub_block(row, at, sb);
                    }
                    for j in 0..sb_bytes / 4 {
                        for sb in &sbs {
                            let c = &sb[4 * j..4 * j + 4];
                            put(&[c[0] ^ flip, c[1] ^ flip, c[2] ^ flip, c[3] ^ flip]);
                        }
                    }
                }
                h += GROUP_HEADER + nsb * src_sb_bytes;
            }
            part_done(t, rows / TILE, &mut done);
        }
        debug_assert_eq!(data.len(), size);
        Some(X8Rows {
            data,
            rows,
            cols,
            group_size: gs,
            bits,
            min,
            sym,
        })
    }

    /// The 5-bit copy of GGUF `Q5_0` rows (module docs): per tile and
    /// block the eight scales, the eight rows' nibbles in chunks of four
    /// bytes, then the fifth bits regrouped as one mask per chunk.
    fn interleave_q5_0(
        w: PackedRows<'_>,
        mut done: impl FnMut(std::ops::Range<usize>),
    ) -> Option<X8Rows> {
        let (rows, cols) = (w.rows(), w.cols());
        if rows == 0 || !rows.is_multiple_of(TILE) || !cols.is_multiple_of(SUB_BLOCK) {
            return None;
        }
        let nb = cols / SUB_BLOCK;
        let mut data = Vec::with_capacity(rows * nb * Q5_0_BLOCK);
        for t in 0..rows / TILE {
            let tile: [&[u8]; TILE] = std::array::from_fn(|r| w.row(t * TILE + r));
            for k in 0..nb {
                let blocks = tile.map(|row| &row[k * Q5_0_BLOCK..(k + 1) * Q5_0_BLOCK]);
                for b in &blocks {
                    data.extend_from_slice(&b[..2]);
                }
                for j in 0..4 {
                    for b in &blocks {
                        data.extend_from_slice(&b[6 + 4 * j..10 + 4 * j]);
                    }
                }
                let qh = blocks.map(|b| u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
                for chunk in 0..8 {
                    let first = chunk_first_column(chunk);
                    let mask = qh
                        .iter()
                        .enumerate()
                        .fold(0u32, |m, (r, &h)| m | ((h >> first) & 0xF) << (4 * r));
                    data.extend_from_slice(&mask.to_le_bytes());
                }
            }
            part_done(t, rows / TILE, &mut done);
        }
        debug_assert_eq!(data.len(), rows * nb * Q5_0_BLOCK);
        Some(X8Rows {
            data,
            rows,
            cols,
            group_size: SUB_BLOCK,
            bits: 5,
            min: false,
            sym: true,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bits per code (4, 5 or 8).
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Every zero point is the grid's middle, so the copy keeps no zero
    /// points (module docs).
    pub fn is_symmetric(&self) -> bool {
        self.sym
    }
    /// Bytes held, which decoding reads per product: the size of the
    /// weight it copies, less 2 bytes per group and row when symmetric.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
    fn tile_header(&self) -> usize {
        if self.sym {
            TILE_HEADER_SYM
        } else {
            TILE_HEADER
        }
    }
    fn tile_bytes(&self) -> usize {
        let n_groups = self.cols.div_ceil(self.group_size);
        let codes = TILE * (self.cols / SUB_BLOCK) * code_bytes(self.bits);
        n_groups * self.tile_header() + codes
    }

    /// Row `r` back in the format's layout (the reference and tests).
    pub fn row_in_format(&self, r: usize, out: &mut Vec<u8>) {
        out.clear();
        let (t, lane) = (r / TILE, r % TILE);
        let tile = &self.data[t * self.tile_bytes()..(t + 1) * self.tile_bytes()];
        if self.bits == 5 {
            // GGUF Q5_0 blocks: scale, fifth bits, nibbles.
            let per = TILE_HEADER_SYM + TILE * code_bytes(5);
            for blk in tile.chunks_exact(per) {
                out.extend_from_slice(&blk[2 * lane..2 * lane + 2]);
                let masks = &blk[TILE_HEADER_SYM + TILE * 16..];
                let mut qh = 0u32;
                for chunk in 0..8 {
                    let m = u32::from_le_bytes(masks[4 * chunk..4 * chunk + 4].try_into().unwrap());
                    qh |= ((m >> (4 * lane)) & 0xF) << chunk_first_column(chunk);
                }
                out.extend_from_slice(&qh.to_le_bytes());
                for j in 0..4 {
                    let c = TILE_HEADER_SYM + 32 * j + 4 * lane;
                    out.extend_from_slice(&blk[c..c + 4]);
                }
            }
            return;
        }
        let sb_bytes = sub_block_bytes(self.bits);
        let flip = if self.bits == 8 { 0x80u8 } else { 0 };
        let header = self.tile_header();
        let mut p = 0;
        for nsb in group_sub_blocks(self.cols, self.group_size) {
            out.extend_from_slice(&tile[p + 2 * lane..p + 2 * lane + 2]);
            if self.sym {
                out.extend_from_slice(&[1 << (self.bits - 1), 0]);
            } else {
                let o = &tile[p + 16 + 2 * lane..p + 16 + 2 * lane + 2];
                if self.min {
                    out.extend_from_slice(o);
                } else {
                    let z = f16::from_le_bytes([o[0], o[1]]).to_f32() + f32::from(flip);
                    out.extend_from_slice(&[z as u8, 0]);
                }
            }
            for k in 0..nsb {
                let s = p + header + k * TILE * sb_bytes;
                for j in 0..sb_bytes / 4 {
                    let c = s + 32 * j + 4 * lane;
                    out.extend(tile[c..c + 4].iter().map(|&b| b ^ flip));
                }
            }
            p += header + nsb * TILE * sb_bytes;
        }
    }
}

/// The "other" a symmetric tile leaves out: z = 2^(bits−1) for 4-bit,
/// z − 128 = 0 for 8-bit (whose codes are stored signed).
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
const fn sym_other(bits: u32) -> f32 {
    if bits == 8 {
        0.0
    } else {
        (1u32 << (bits - 1)) as f32
    }
}

/// Runs `tile_dots` on every tile (`tb` bytes each in `data`) that rows
/// `r0..r0 + out.len()` touch and keeps the rows asked for (the SIMD
/// one-token kernels' row-range loop, here and in [`super::qk_x8`]).
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(super) fn for_each_tile(
    data: &[u8],
    tb: usize,
    r0: usize,
    out: &mut [f32],
    mut tile_dots: impl FnMut(&[u8]) -> [f32; TILE],
) {
    let r1 = r0 + out.len();
    let mut r = r0;
    while r < r1 {
        let t = r / TILE;
        let v = tile_dots(&data[t * tb..(t + 1) * tb]);
        let (lo, hi) = (r - t * TILE, (r1 - t * TILE).min(TILE));
        let dst = &mut out[r - r0..r - r0 + hi - lo];
        match <&mut [f32; TILE]>::try_from(&mut *dst) {
            // A whole tile: a fixed-size copy (two vector moves), not a
            // call to memcpy per tile (1.4 % of decoding in a profile).
            Ok(whole) => *whole = v,
            Err(_) => dst.copy_from_slice(&v[lo..hi]),
        }
        r += hi - lo;
    }
}

/// The one-token entry point `$matvec` ([`X8MatvecFn`]) of a SIMD tile
/// kernel `$tile::<BITS, MIN, SYM>(p, cols, gs, x) -> [f32; TILE]`, which
/// must have been compiled for features the table holding `$matvec` checks.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! x8_matvec {
    ($matvec:ident, $tile:ident) => {
        pub fn $matvec(w: &X8Rows, r0: usize, x: &Q8Ref<'_>, out: &mut [f32]) {
            check(w, r0, x, out);
            for_each_tile(&w.data, w.tile_bytes(), r0, out, |tile| {
                // SAFETY: the table holding this kernel is built only when
                // its features were detected; `tile` is one whole tile and
                // `check` verified the activation blocks.
                unsafe {
                    let (p, cols, gs) = (tile.as_ptr(), w.cols, w.group_size);
                    match (w.bits, w.min, w.sym) {
                        (5, _, _) => $tile::<5, false, true>(p, cols, gs, x),
                        (8, _, true) => $tile::<8, false, true>(p, cols, gs, x),
                        (8, _, false) => $tile::<8, false, false>(p, cols, gs, x),
                        (_, true, _) => $tile::<4, true, false>(p, cols, gs, x),
                        (_, _, true) => $tile::<4, false, true>(p, cols, gs, x),
                        _ => $tile::<4, false, false>(p, cols, gs, x),
                    }
                }
            });
        }
    };
}

/// Runs `tile_quad(tile, e)` on every pair of a tile and a quad of tokens
/// (`e`: the quad's first entry in the batch's `d` / `ds`, see
/// [`Q8BatchRef`]) and writes the rows of the quad's real tokens (the SIMD
/// batched kernels' loop).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn for_each_tile_quad(
    w: &X8Rows,
    x: &Q8BatchRef<'_>,
    out: &mut [f32],
    out_rs: usize,
    mut tile_quad: impl FnMut(&[u8], usize) -> [[f32; TILE]; super::q8::QUAD],
) {
    use super::q8::QUAD;
    let tb = w.tile_bytes();
    let per_quad = x.n_blocks() * QUAD;
    for t in 0..w.rows / TILE {
        let tile = &w.data[t * tb..(t + 1) * tb];
        for qd in 0..x.n_quads() {
            let v = tile_quad(tile, qd * per_quad);
            let here = (x.n_tok - qd * QUAD).min(QUAD);
            for (k, vals) in v[..here].iter().enumerate() {
                let o = (qd * QUAD + k) * out_rs + t * TILE;
                out[o..o + TILE].copy_from_slice(vals);
            }
        }
    }
}

/// The batched entry point `$matmul` ([`X8MatmulFn`]) of a SIMD quad kernel
/// `$tile_quad::<BITS, MIN, SYM>(p, cols, gs, qs, d, ds) -> [[f32; TILE]; QUAD]`
/// for 4- and 5-bit rows (8-bit ones go through the reference's arithmetic
/// per token: they are output heads, which prompts need only for perplexity).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! x8_matmul {
    ($matmul:ident, $tile_quad:ident) => {
        pub fn $matmul(w: &X8Rows, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize) {
            check_batch(w, x, out, out_rs);
            if w.bits == 8 {
                return matmul_x8_q8_scalar(w, x, out, out_rs);
            }
            for_each_tile_quad(w, x, out, out_rs, |tile, e| {
                // SAFETY: the table holding this kernel is built only when
                // its features were detected; `tile` is one whole tile and
                // `check_batch` verified the quad's entries from `e`.
                unsafe {
                    let (qs, d, ds) = (
                        x.qs.as_ptr().add(e * SUB_BLOCK),
                        x.d.as_ptr().add(e),
                        x.ds.as_ptr().add(e),
                    );
                    let (p, cols, gs) = (tile.as_ptr(), w.cols, w.group_size);
                    match (w.bits, w.min, w.sym) {
                        (5, _, _) => $tile_quad::<5, false, true>(p, cols, gs, qs, d, ds),
                        (_, true, _) => $tile_quad::<4, true, false>(p, cols, gs, qs, d, ds),
                        (_, _, true) => $tile_quad::<4, false, true>(p, cols, gs, qs, d, ds),
                        _ => $tile_quad::<4, false, false>(p, cols, gs, qs, d, ds),
                    }
                }
            });
        }
    };
}

/// Sub-blocks of each group of a row of `cols` (a multiple of 32) columns:
/// full groups of `gs`, then a shorter last one if `gs` does not divide `cols`.
fn group_sub_blocks(cols: usize, gs: usize) -> impl Iterator<Item = usize> {
    (0..cols.div_ceil(gs)).map(move |g| (gs.min(cols - g * gs)) / SUB_BLOCK)
}

/// `out[i] = Σ_c ŵ[r0 + i, c] · x[c]` for `i < out.len()` (any row range:
/// tiles cut by the range are computed whole and the needed rows kept).
pub type X8MatvecFn = fn(w: &X8Rows, r0: usize, x: &Q8Ref<'_>, out: &mut [f32]);

fn check(w: &X8Rows, r0: usize, x: &Q8Ref<'_>, out: &[f32]) {
    assert!(r0 + out.len() <= w.rows, "x8 kernel: rows out of range");
    let nb = w.cols / SUB_BLOCK;
    assert!(
        x.len == w.cols && x.d.len() == nb && x.ds.len() == nb && x.qs.len() == nb * SUB_BLOCK,
        "x8 kernel: activation blocks do not match {} columns",
        w.cols
    );
}

/// Scalar reference: each row rebuilt in the format's layout, then the
/// one-token reference (so the same bits as [`super::qg`]'s reference).
/// Allocates a row buffer: it is the reference, not a decoding path.
pub fn vec_dot_x8_q8_scalar(w: &X8Rows, r0: usize, x: &Q8Ref<'_>, out: &mut [f32]) {
    check(w, r0, x, out);
    let (dtype, reference): (DType, super::QgMatvecFn) = match (w.bits, w.min) {
        (5, _) => (DType::Q5_0, super::gguf::vec_dot_q5_0_q8_scalar),
        (8, _) => (DType::Q8G, super::qg::vec_dot_q8g_q8_scalar),
        (_, true) => (DType::Q4GM, super::qg::vec_dot_q4gm_q8_scalar),
        _ => (DType::Q4G, super::qg::vec_dot_q4g_q8_scalar),
    };
    let mut row = Vec::new();
    for (i, o) in out.iter_mut().enumerate() {
        w.row_in_format(r0 + i, &mut row);
        let one = PackedRows::new(dtype, &row, 1, w.cols, w.group_size).expect("one row");
        reference(one, x, std::slice::from_mut(o));
    }
}

/// Batched (prompt) product on the interleaved rows:
/// `out[t·out_rs + r] = Σ_c ŵ[r, c] · x_t[c]` for every token `t` of `x`
/// and row `r`; other entries of `out` are left as they are. Each tile's
/// codes are unpacked once per quad of four tokens.
pub type X8MatmulFn = fn(w: &X8Rows, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize);

fn check_batch(w: &X8Rows, x: &Q8BatchRef<'_>, out: &[f32], out_rs: usize) {
    assert!(
        x.len == w.cols && x.is_consistent(),
        "x8 matmul: activation blocks do not match {} columns",
        w.cols
    );
    assert!(
        out_rs >= w.rows,
        "x8 matmul: output row stride below the row count"
    );
    assert!(
        x.n_tok == 0 || out.len() >= (x.n_tok - 1) * out_rs + w.rows,
        "x8 matmul: output too short"
    );
}

/// Scalar reference of [`X8MatmulFn`]: the batched one-token reference
/// (`qg_mm`) on each row rebuilt in the format's layout.
pub fn matmul_x8_q8_scalar(w: &X8Rows, x: &Q8BatchRef<'_>, out: &mut [f32], out_rs: usize) {
    check_batch(w, x, out, out_rs);
    if w.bits == 5 {
        // GGUF Q5_0 has no quad-layout reference: the one-token reference
        // per token, on that token's blocks gathered out of the quads.
        let nb = w.cols / SUB_BLOCK;
        let (mut qs, mut d, mut ds) = (vec![0i8; w.cols], vec![0f32; nb], vec![0f32; nb]);
        let mut one = vec![0f32; w.rows];
        for t in 0..x.n_tok {
            for k in 0..nb {
                let i = x.index(t, k);
                qs[k * SUB_BLOCK..(k + 1) * SUB_BLOCK]
                    .copy_from_slice(&x.qs[i * SUB_BLOCK..(i + 1) * SUB_BLOCK]);
                (d[k], ds[k]) = (x.d[i], x.ds[i]);
            }
            let xt = Q8Ref {
                qs: &qs,
                d: &d,
                ds: &ds,
                bsums: &[],
                len: w.cols,
                super256: false,
            };
            vec_dot_x8_q8_scalar(w, 0, &xt, &mut one);
            out[t * out_rs..t * out_rs + w.rows].copy_from_slice(&one);
        }
        return;
    }
    let (dtype, reference): (DType, super::QgMatmulFn) = match (w.bits, w.min) {
        (8, _) => (DType::Q8G, super::qg_mm::matmul_q8g_q8_scalar),
        (_, true) => (DType::Q4GM, super::qg_mm::matmul_q4gm_q8_scalar),
        _ => (DType::Q4G, super::qg_mm::matmul_q4g_q8_scalar),
    };
    let mut row = Vec::new();
    for r in 0..w.rows {
        w.row_in_format(r, &mut row);
        let one = PackedRows::new(dtype, &row, 1, w.cols, w.group_size).expect("one row");
        reference(one, x, &mut out[r..], out_rs);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::*;
    use crate::kernels::gguf::x86::bytes_from_bits;
    use crate::kernels::q8::QUAD;
    use std::arch::x86_64::*;

    /// Loads a group's eight scales and eight others at `p` and returns
    /// them with the pointer past the group header. SAFETY (caller): `p`
    /// points at a group header of a tile of this layout.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_header<const BITS: u32, const SYM: bool>(
        p: *const u8,
    ) -> (__m256, __m256, *const u8) {
        // SAFETY: the header holds 16 bytes of scales, then (unless
        // symmetric) 16 bytes of others.
        unsafe {
            let scale = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            if SYM {
                (
                    scale,
                    _mm256_set1_ps(sym_other(BITS)),
                    p.add(TILE_HEADER_SYM),
                )
            } else {
                let other = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
                (scale, other, p.add(TILE_HEADER))
            }
        }
    }

    /// A 5-bit tile sub-block at `p`: chunk `k`'s codes `c` (low nibbles)
    /// with their fifth bits (mask `k` after the 128 bytes of nibbles) added
    /// as 16, AVX2. SAFETY (caller): a whole 5-bit tile sub-block at `p`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn fifth_bits_avx2(c: __m256i, p: *const u8, k: usize) -> __m256i {
        // SAFETY: guaranteed by the caller.
        let m = unsafe { (p.add(TILE * 16 + 4 * k) as *const u32).read_unaligned() };
        let high = _mm256_and_si256(bytes_from_bits(m), _mm256_set1_epi8(0x10));
        _mm256_or_si256(c, high)
    }

    /// [`fifth_bits_avx2`] with AVX-512BW: the mask is a byte mask of an add.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn fifth_bits_avx512(c: __m256i, p: *const u8, k: usize) -> __m256i {
        // SAFETY: guaranteed by the caller.
        let m = unsafe { (p.add(TILE * 16 + 4 * k) as *const u32).read_unaligned() };
        _mm256_mask_add_epi8(c, m, c, _mm256_set1_epi8(0x10))
    }

    /// The eight rows' integer dot products of one sub-block of a tile at
    /// `p` with the activation block at `q` (lane `r` = row `r`), AVX2.
    /// SAFETY (caller): a whole tile sub-block is readable at `p`, 32
    /// activations at `q`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub_block_avx2<const BITS: u32>(p: *const u8, q: *const i8) -> __m256i {
        let nib = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        // SAFETY: guaranteed by the caller.
        unsafe {
            let dword = |k: usize| _mm256_set1_epi32((q.add(4 * k) as *const i32).read_unaligned());
            if BITS == 4 {
                // Codes ≤ 15 and |q| ≤ 127: each vpmaddubsw lane is at most
                // 3810 in size, eight of them 30480 < 2^15.
                let mut s16 = _mm256_setzero_si256();
                for j in 0..4 {
                    let v = _mm256_loadu_si256(p.add(32 * j) as *const __m256i);
                    let lo = _mm256_and_si256(v, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo, dword(j)));
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi, dword(4 + j)));
                }
                _mm256_madd_epi16(s16, ones)
            } else if BITS == 5 {
                // Codes ≤ 31: a vpmaddubsw lane is at most 7874 in size,
                // four of them 31496 < 2^15, so low and high nibbles sum
                // in separate i16 lanes.
                let (mut s_lo, mut s_hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for j in 0..4 {
                    let v = _mm256_loadu_si256(p.add(32 * j) as *const __m256i);
                    let lo = fifth_bits_avx2(_mm256_and_si256(v, nib), p, j);
                    let hi =
                        fifth_bits_avx2(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib), p, 4 + j);
                    s_lo = _mm256_add_epi16(s_lo, _mm256_maddubs_epi16(lo, dword(j)));
                    s_hi = _mm256_add_epi16(s_hi, _mm256_maddubs_epi16(hi, dword(4 + j)));
                }
                _mm256_add_epi32(_mm256_madd_epi16(s_lo, ones), _mm256_madd_epi16(s_hi, ones))
            } else {
                // Signed codes s = c − 128: |s|·(q with the sign of s), each
                // pair at most 2·128·127 = 32512, widened to i32 per chunk.
                let mut s32 = _mm256_setzero_si256();
                for j in 0..8 {
                    let s = _mm256_loadu_si256(p.add(32 * j) as *const __m256i);
                    let pr =
                        _mm256_maddubs_epi16(_mm256_sign_epi8(s, s), _mm256_sign_epi8(dword(j), s));
                    s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(pr, ones));
                }
                s32
            }
        }
    }

    /// [`sub_block_avx2`] with AVX-512 VNNI: one `vpdpbusd` (u8 × i8 → i32,
    /// four products per lane) per 32 bytes, no i16 stage.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn sub_block_vnni<const BITS: u32>(p: *const u8, q: *const i8) -> __m256i {
        let nib = _mm256_set1_epi8(0x0F);
        // SAFETY: guaranteed by the caller.
        unsafe {
            let dword = |k: usize| _mm256_set1_epi32((q.add(4 * k) as *const i32).read_unaligned());
            let mut s32 = _mm256_setzero_si256();
            if BITS != 8 {
                // Two chains of four `vpdpbusd`, so that their latencies
                // overlap (+5–10 % in criterion on Zen 4; four chains of two
                // were slower again).
                let mut s_hi = _mm256_setzero_si256();
                for j in 0..4 {
                    let v = _mm256_loadu_si256(p.add(32 * j) as *const __m256i);
                    let mut lo = _mm256_and_si256(v, nib);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                    if BITS == 5 {
                        lo = fifth_bits_avx512(lo, p, j);
                        hi = fifth_bits_avx512(hi, p, 4 + j);
                    }
                    s32 = _mm256_dpbusd_epi32(s32, lo, dword(j));
                    s_hi = _mm256_dpbusd_epi32(s_hi, hi, dword(4 + j));
                }
                s32 = _mm256_add_epi32(s32, s_hi);
            } else {
                // |s| ≤ 128 is a valid u8; the sign moves to the activation.
                for j in 0..8 {
                    let s = _mm256_loadu_si256(p.add(32 * j) as *const __m256i);
                    s32 = _mm256_dpbusd_epi32(
                        s32,
                        _mm256_sign_epi8(s, s),
                        _mm256_sign_epi8(dword(j), s),
                    );
                }
            }
            s32
        }
    }

    macro_rules! x86_x8 {
        ($tile:ident, $matvec:ident, $features:literal, $sub_block:ident) => {
            /// The eight dot products of one tile starting at `p`. SAFETY
            /// (caller): `p` points at a whole tile of a `BITS`-bit weight
            /// of `cols` columns in groups of `gs`, and `x` has `cols / 32`
            /// blocks.
            #[target_feature(enable = $features)]
            unsafe fn $tile<const BITS: u32, const MIN: bool, const SYM: bool>(
                p: *const u8,
                cols: usize,
                gs: usize,
                x: &Q8Ref<'_>,
            ) -> [f32; TILE] {
                let (qs, d, ds) = (x.qs.as_ptr(), x.d.as_ptr(), x.ds.as_ptr());
                let tile_sub_block = TILE * code_bytes(BITS);
                let (mut acc, mut corr) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let (mut p, mut blk) = (p, 0usize);
                // SAFETY: the tile is one group header and its sub-blocks
                // per group from `p`, and block `blk` < cols/32 of `x`
                // exists for every one.
                unsafe {
                    for nsb in group_sub_blocks(cols, gs) {
                        let (scale, other, next) = group_header::<BITS, SYM>(p);
                        p = next;
                        let mut gacc = _mm256_setzero_ps();
                        let mut accs = 0f32;
                        for _ in 0..nsb {
                            // A prefetch never faults: past the copy's end
                            // it is only a wasted hint.
                            let ahead = p.wrapping_add(crate::kernels::PREFETCH_AHEAD);
                            for line in (0..tile_sub_block).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                            }
                            let i = $sub_block::<BITS>(p, qs.add(blk * SUB_BLOCK));
                            p = p.add(tile_sub_block);
                            gacc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(i),
                                _mm256_set1_ps(*d.add(blk)),
                                gacc,
                            );
                            accs += *ds.add(blk);
                            blk += 1;
                        }
                        acc = _mm256_fmadd_ps(gacc, scale, acc);
                        let f = if MIN {
                            other
                        } else {
                            _mm256_mul_ps(scale, other)
                        };
                        corr = _mm256_fmadd_ps(f, _mm256_set1_ps(accs), corr);
                    }
                    let sum = if MIN {
                        _mm256_add_ps(acc, corr)
                    } else {
                        _mm256_sub_ps(acc, corr)
                    };
                    let mut out = [0f32; TILE];
                    _mm256_storeu_ps(out.as_mut_ptr(), sum);
                    out
                }
            }

            x8_matvec!($matvec, $tile);
        };
    }

    x86_x8!(
        tile_avx2,
        vec_dot_x8_q8_avx2,
        "avx2,fma,f16c",
        sub_block_avx2
    );
    x86_x8!(
        tile_vnni,
        vec_dot_x8_q8_avx512,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
        sub_block_vnni
    );

    /// The eight rows' integer dot products of one unpacked 4-bit sub-block
    /// `c` (chunk `k`: four codes of each row, columns `4k..` for `k < 4`,
    /// `16 + 4(k − 4)..` after) with the 32 activations at `q`, AVX2.
    /// SAFETY (caller): 32 activations are readable at `q`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot8_avx2<const BITS: u32>(c: &[__m256i; 8], q: *const i8) -> __m256i {
        // SAFETY: guaranteed by the caller.
        unsafe {
            // Eight vpmaddubsw lanes of codes ≤ 15 fit i16, four of codes
            // ≤ 31 (see `sub_block_avx2`).
            let ones = _mm256_set1_epi16(1);
            let mut s16 = [_mm256_setzero_si256(); 2];
            for (k, ck) in c.iter().enumerate() {
                let xk = _mm256_set1_epi32((q.add(4 * k) as *const i32).read_unaligned());
                let h = if BITS == 5 { k / 4 } else { 0 };
                s16[h] = _mm256_add_epi16(s16[h], _mm256_maddubs_epi16(*ck, xk));
            }
            let s = _mm256_madd_epi16(s16[0], ones);
            if BITS == 5 {
                _mm256_add_epi32(s, _mm256_madd_epi16(s16[1], ones))
            } else {
                s
            }
        }
    }

    /// [`dot8_avx2`] with AVX-512 VNNI: one `vpdpbusd` per chunk.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn dot8_vnni<const BITS: u32>(c: &[__m256i; 8], q: *const i8) -> __m256i {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let mut s32 = _mm256_setzero_si256();
            for (k, ck) in c.iter().enumerate() {
                let xk = _mm256_set1_epi32((q.add(4 * k) as *const i32).read_unaligned());
                s32 = _mm256_dpbusd_epi32(s32, *ck, xk);
            }
            s32
        }
    }

    macro_rules! x86_x8_quad {
        ($tile_quad:ident, $matmul:ident, $features:literal, $dot8:ident, $fifth:ident) => {
            /// One tile of a 4- or 5-bit weight against one quad of tokens:
            /// the 4 × 8 dot products, token-major. SAFETY (caller): `p`
            /// points at a whole tile, `qs`/`d`/`ds` at the quad's
            /// `cols/32 · 4` entries.
            #[target_feature(enable = $features)]
            unsafe fn $tile_quad<const BITS: u32, const MIN: bool, const SYM: bool>(
                p: *const u8,
                cols: usize,
                gs: usize,
                qs: *const i8,
                d: *const f32,
                ds: *const f32,
            ) -> [[f32; TILE]; QUAD] {
                let nib = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); QUAD];
                let mut corr = [_mm256_setzero_ps(); QUAD];
                let (mut p, mut blk) = (p, 0usize);
                // SAFETY: as for the one-token tile kernels, with one entry
                // per (block, token) of the quad at `qs`/`d`/`ds` (the
                // caller's guarantee).
                unsafe {
                    for nsb in group_sub_blocks(cols, gs) {
                        let (scale, other, next) = group_header::<BITS, SYM>(p);
                        p = next;
                        let mut gacc = [_mm256_setzero_ps(); QUAD];
                        let mut accs = _mm_setzero_ps();
                        for _ in 0..nsb {
                            let c: [__m256i; 8] = std::array::from_fn(|k| {
                                let v = _mm256_loadu_si256(p.add(32 * (k % 4)) as *const __m256i);
                                let v = if k < 4 { v } else { _mm256_srli_epi16(v, 4) };
                                let c = _mm256_and_si256(v, nib);
                                if BITS == 5 {
                                    $fifth(c, p, k)
                                } else {
                                    c
                                }
                            });
                            p = p.add(TILE * code_bytes(BITS));
                            let e = blk * QUAD;
                            for (t, g) in gacc.iter_mut().enumerate() {
                                let i = $dot8::<BITS>(&c, qs.add((e + t) * SUB_BLOCK));
                                *g = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(i),
                                    _mm256_set1_ps(*d.add(e + t)),
                                    *g,
                                );
                            }
                            accs = _mm_add_ps(accs, _mm_loadu_ps(ds.add(e)));
                            blk += 1;
                        }
                        let f = if MIN {
                            other
                        } else {
                            _mm256_mul_ps(scale, other)
                        };
                        let mut a4 = [0f32; QUAD];
                        _mm_storeu_ps(a4.as_mut_ptr(), accs);
                        for t in 0..QUAD {
                            acc[t] = _mm256_fmadd_ps(gacc[t], scale, acc[t]);
                            corr[t] = _mm256_fmadd_ps(f, _mm256_set1_ps(a4[t]), corr[t]);
                        }
                    }
                    let mut out = [[0f32; TILE]; QUAD];
                    for t in 0..QUAD {
                        let sum = if MIN {
                            _mm256_add_ps(acc[t], corr[t])
                        } else {
                            _mm256_sub_ps(acc[t], corr[t])
                        };
                        _mm256_storeu_ps(out[t].as_mut_ptr(), sum);
                    }
                    out
                }
            }

            x8_matmul!($matmul, $tile_quad);
        };
    }

    // The batched kernels for 4- and 5-bit interleaved rows.
    x86_x8_quad!(
        tile_quad_avx2,
        matmul_x8_q8_avx2,
        "avx2,fma,f16c",
        dot8_avx2,
        fifth_bits_avx2
    );
    x86_x8_quad!(
        tile_quad_vnni,
        matmul_x8_q8_avx512,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni",
        dot8_vnni,
        fifth_bits_avx512
    );
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    //! The one-token kernel on NEON. A 32-byte chunk of a tile is two
    //! 16-byte registers, rows 0–3 and 4–7, four bytes per row: a product
    //! that sums each 32-bit lane's four byte products (`sdot` with the
    //! dot-product extension; `smull` + two pairwise adds without it) leaves
    //! row `r`'s partial sum in lane `r % 4`, as on AVX2.
    use super::*;
    use crate::kernels::q8::QUAD;
    use crate::kernels::qg::neon::dot16_sdot;
    use std::arch::aarch64::*;

    /// Lane `k` = Σ of the byte products `4k..4k+4` of `c · q` (|c| ≤ 128,
    /// |q| ≤ 127: each pair fits i16).
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot_lanes(c: int8x16_t, q: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(c), vget_low_s8(q));
        let hi = vmull_high_s8(c, q);
        vpaddlq_s16(vpaddq_s16(lo, hi))
    }

    /// Half `h` (rows `4h..4h + 4`) of chunk `k` of a 5-bit tile sub-block
    /// at `p`: codes `c` with their fifth bits (mask `k`, its 16 bits of
    /// half `h`) added as 16. SAFETY (caller): a whole 5-bit tile sub-block
    /// at `p`.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn fifth_bits(c: uint8x16_t, p: *const u8, k: usize, h: usize) -> uint8x16_t {
        const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        // SAFETY: guaranteed by the caller; `BIT` holds 16 bytes.
        unsafe {
            let m = (p.add(TILE * 16 + 4 * k) as *const u32).read_unaligned() >> (16 * h);
            let v = vcombine_u8(vdup_n_u8(m as u8), vdup_n_u8((m >> 8) as u8));
            let set = vtstq_u8(v, vld1q_u8(BIT.as_ptr()));
            vorrq_u8(c, vandq_u8(set, vdupq_n_u8(0x10)))
        }
    }

    /// Eight f16 at `p` as two f32 vectors (rows 0–3, 4–7). SAFETY
    /// (caller): 16 bytes are readable at `p`.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn f16x8(p: *const u8) -> [float32x4_t; 2] {
        // SAFETY: guaranteed by the caller.
        let h: [u8; 16] = unsafe { std::ptr::read_unaligned(p as *const [u8; 16]) };
        let f: [f32; TILE] =
            std::array::from_fn(|i| f16::from_le_bytes([h[2 * i], h[2 * i + 1]]).to_f32());
        // SAFETY: `f` holds eight floats.
        unsafe { [vld1q_f32(f.as_ptr()), vld1q_f32(f.as_ptr().add(4))] }
    }

    macro_rules! neon_x8 {
        ($tile:ident, $matvec:ident, $tile_quad:ident, $matmul:ident, $features:literal, $dot:ident) => {
            /// The eight dot products of one tile starting at `p` (as
            /// `tile_avx2`). SAFETY (caller): `p` points at a whole tile of
            /// a `BITS`-bit weight of `cols` columns in groups of `gs`, and
            /// `x` has `cols / 32` blocks.
            #[target_feature(enable = $features)]
            unsafe fn $tile<const BITS: u32, const MIN: bool, const SYM: bool>(
                p: *const u8,
                cols: usize,
                gs: usize,
                x: &Q8Ref<'_>,
            ) -> [f32; TILE] {
                let (qs, d, ds) = (x.qs.as_ptr(), x.d.as_ptr(), x.ds.as_ptr());
                let tile_sub_block = TILE * code_bytes(BITS);
                let nib = vdupq_n_u8(0x0F);
                let zero = vdupq_n_f32(0.0);
                let (mut acc, mut corr) = ([zero; 2], [zero; 2]);
                let (mut p, mut blk) = (p, 0usize);
                // SAFETY: the tile is one group header and its sub-blocks
                // per group from `p`, and block `blk` < cols/32 of `x`
                // exists for every one.
                unsafe {
                    for nsb in group_sub_blocks(cols, gs) {
                        let scale = f16x8(p);
                        let other = if SYM {
                            [vdupq_n_f32(sym_other(BITS)); 2]
                        } else {
                            f16x8(p.add(16))
                        };
                        p = p.add(if SYM { TILE_HEADER_SYM } else { TILE_HEADER });
                        let mut gacc = [zero; 2];
                        let mut accs = 0f32;
                        for _ in 0..nsb {
                            let q = qs.add(blk * SUB_BLOCK);
                            let dword = |k: usize| {
                                let v = (q.add(4 * k) as *const i32).read_unaligned();
                                vreinterpretq_s8_s32(vdupq_n_s32(v))
                            };
                            let mut i = [vdupq_n_s32(0); 2];
                            if BITS != 8 {
                                for j in 0..4 {
                                    let (xl, xh) = (dword(j), dword(4 + j));
                                    for (h, ih) in i.iter_mut().enumerate() {
                                        let v = vld1q_u8(p.add(32 * j + 16 * h));
                                        let (mut lo, mut hi) = (vandq_u8(v, nib), vshrq_n_u8(v, 4));
                                        if BITS == 5 {
                                            lo = fifth_bits(lo, p, j, h);
                                            hi = fifth_bits(hi, p, 4 + j, h);
                                        }
                                        let (lo, hi) =
                                            (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                                        *ih = vaddq_s32(*ih, $dot(lo, xl));
                                        *ih = vaddq_s32(*ih, $dot(hi, xh));
                                    }
                                }
                            } else {
                                // Codes stored signed (c − 128).
                                for j in 0..8 {
                                    let xj = dword(j);
                                    for (h, ih) in i.iter_mut().enumerate() {
                                        let c = vld1q_s8(p.add(32 * j + 16 * h) as *const i8);
                                        *ih = vaddq_s32(*ih, $dot(c, xj));
                                    }
                                }
                            }
                            p = p.add(tile_sub_block);
                            let db = vdupq_n_f32(*d.add(blk));
                            for (g, ih) in gacc.iter_mut().zip(i) {
                                *g = vfmaq_f32(*g, vcvtq_f32_s32(ih), db);
                            }
                            accs += *ds.add(blk);
                            blk += 1;
                        }
                        let a = vdupq_n_f32(accs);
                        for h in 0..2 {
                            acc[h] = vfmaq_f32(acc[h], gacc[h], scale[h]);
                            let f = if MIN {
                                other[h]
                            } else {
                                vmulq_f32(scale[h], other[h])
                            };
                            corr[h] = vfmaq_f32(corr[h], f, a);
                        }
                    }
                    let mut out = [0f32; TILE];
                    for h in 0..2 {
                        let s = if MIN {
                            vaddq_f32(acc[h], corr[h])
                        } else {
                            vsubq_f32(acc[h], corr[h])
                        };
                        vst1q_f32(out.as_mut_ptr().add(4 * h), s);
                    }
                    out
                }
            }

            x8_matvec!($matvec, $tile);

            /// One tile of a 4- or 5-bit weight against one quad of tokens
            /// (as `tile_quad_avx2`): each chunk is unpacked once for the
            /// four tokens, and every token's sums are formed in the order
            /// of the one-token kernel. SAFETY (caller): `p` points at a
            /// whole tile, `qs`/`d`/`ds` at the quad's `cols/32 · 4` entries.
            #[target_feature(enable = $features)]
            unsafe fn $tile_quad<const BITS: u32, const MIN: bool, const SYM: bool>(
                p: *const u8,
                cols: usize,
                gs: usize,
                qs: *const i8,
                d: *const f32,
                ds: *const f32,
            ) -> [[f32; TILE]; QUAD] {
                let nib = vdupq_n_u8(0x0F);
                let zero = vdupq_n_f32(0.0);
                let mut acc = [[zero; 2]; QUAD];
                let mut corr = [[zero; 2]; QUAD];
                let (mut p, mut blk) = (p, 0usize);
                // SAFETY: as for the one-token kernel, with one entry per
                // (block, token) of the quad at `qs`/`d`/`ds` (the caller's
                // guarantee).
                unsafe {
                    for nsb in group_sub_blocks(cols, gs) {
                        let scale = f16x8(p);
                        let other = if SYM {
                            [vdupq_n_f32(sym_other(BITS)); 2]
                        } else {
                            f16x8(p.add(16))
                        };
                        p = p.add(if SYM { TILE_HEADER_SYM } else { TILE_HEADER });
                        let mut gacc = [[zero; 2]; QUAD];
                        let mut accs = zero;
                        for _ in 0..nsb {
                            let e = blk * QUAD;
                            let mut i = [[vdupq_n_s32(0); 2]; QUAD];
                            // Chunk k < 4: low nibbles of bytes 4k..; k ≥ 4:
                            // high nibbles of bytes 4(k − 4)..; activations 4k...
                            for k in 0..8 {
                                let c: [int8x16_t; 2] = std::array::from_fn(|h| {
                                    let v = vld1q_u8(p.add(32 * (k % 4) + 16 * h));
                                    let v = if k < 4 {
                                        vandq_u8(v, nib)
                                    } else {
                                        vshrq_n_u8(v, 4)
                                    };
                                    let v = if BITS == 5 { fifth_bits(v, p, k, h) } else { v };
                                    vreinterpretq_s8_u8(v)
                                });
                                for (t, it) in i.iter_mut().enumerate() {
                                    let q = qs.add((e + t) * SUB_BLOCK + 4 * k);
                                    let xk = vreinterpretq_s8_s32(vdupq_n_s32(
                                        (q as *const i32).read_unaligned(),
                                    ));
                                    for (ih, &ch) in it.iter_mut().zip(&c) {
                                        *ih = vaddq_s32(*ih, $dot(ch, xk));
                                    }
                                }
                            }
                            p = p.add(TILE * code_bytes(BITS));
                            for (t, (g, it)) in gacc.iter_mut().zip(i).enumerate() {
                                let dt = vdupq_n_f32(*d.add(e + t));
                                for (gh, ih) in g.iter_mut().zip(it) {
                                    *gh = vfmaq_f32(*gh, vcvtq_f32_s32(ih), dt);
                                }
                            }
                            accs = vaddq_f32(accs, vld1q_f32(ds.add(e)));
                            blk += 1;
                        }
                        let mut a4 = [0f32; QUAD];
                        vst1q_f32(a4.as_mut_ptr(), accs);
                        for t in 0..QUAD {
                            let a = vdupq_n_f32(a4[t]);
                            for h in 0..2 {
                                acc[t][h] = vfmaq_f32(acc[t][h], gacc[t][h], scale[h]);
                                let f = if MIN {
                                    other[h]
                                } else {
                                    vmulq_f32(scale[h], other[h])
                                };
                                corr[t][h] = vfmaq_f32(corr[t][h], f, a);
                            }
                        }
                    }
                    let mut out = [[0f32; TILE]; QUAD];
                    for t in 0..QUAD {
                        for h in 0..2 {
                            let s = if MIN {
                                vaddq_f32(acc[t][h], corr[t][h])
                            } else {
                                vsubq_f32(acc[t][h], corr[t][h])
                            };
                            vst1q_f32(out[t].as_mut_ptr().add(4 * h), s);
                        }
                    }
                    out
                }
            }

            x8_matmul!($matmul, $tile_quad);
        };
    }

    neon_x8!(
        tile_neon,
        vec_dot_x8_q8_neon,
        tile_quad_neon,
        matmul_x8_q8_neon,
        "neon",
        dot_lanes
    );
    neon_x8!(
        tile_neondot,
        vec_dot_x8_q8_neondot,
        tile_quad_neondot,
        matmul_x8_q8_neondot,
        "neon,dotprod",
        dot16_sdot
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::q8::{quantize_q8_scalar, Q8Buf};
    use crate::kernels::test_util::{lcg, make_row};
    use crate::kernels::{Isa, Kernels};

    /// Tolerance of the SIMD kernel against the reference, relative to
    /// Σ_j |ŵ_j·x̂_j| of the row: exact integer sums, f32 reassociation only.
    const TOL_X8_VS_SCALAR: f64 = 2e-6;

    /// (rows, cols, group size): GGUF groups of 32, GPTQ groups of 128 with
    /// a short last group (576 = 4·128 + 64), whole rows, a group of 64.
    const SHAPES: [(usize, usize, usize); 7] = [
        (8, 32, 32),
        (16, 576, 32),
        (16, 576, 128),
        (24, 576, 128),
        (24, 1536, 128),
        (8, 576, 576),
        (8, 96, 64),
    ];

    /// The weights tested: each type, and `Q4G` / `Q8G` also symmetric
    /// (every zero point 2^(bits−1), the GGUF `Q4_0` / `Q8_0` imports),
    /// whose copy keeps no zero points. `Q3G` / `Q2G` are widened to 4-bit
    /// codes with their zero points kept. GGUF `Q5_0` (always symmetric,
    /// blocks of 32: its shapes take groups of 32, [`shape_of`]).
    const KINDS: [(DType, bool); 8] = [
        (DType::Q5_0, true),
        (DType::Q4G, false),
        (DType::Q4G, true),
        (DType::Q4GM, false),
        (DType::Q8G, false),
        (DType::Q8G, true),
        (DType::Q3G, false),
        (DType::Q2G, false),
    ];

    /// 3- and 2-bit weights are copied as 4-bit codes.
    fn widened(dtype: DType) -> bool {
        matches!(dtype, DType::Q3G | DType::Q2G)
    }

    /// The shape a kind is tested at: GGUF `Q5_0` has groups of 32.
    fn shape_of(dtype: DType, (rows, cols, gs): (usize, usize, usize)) -> (usize, usize, usize) {
        (
            rows,
            cols,
            if dtype == DType::Q5_0 { SUB_BLOCK } else { gs },
        )
    }

    fn weight(dtype: DType, rows: usize, cols: usize, gs: usize, seed: &mut u64) -> Vec<u8> {
        if dtype == DType::Q5_0 {
            // Random codes and fifth bits, finite scales; row 3's first
            // block has a zero scale, row 5's codes are all 31 (the largest
            // products: against a block of activations 127, four i16 pair
            // sums of AVX2 fit, eight would not).
            let nb = rows * cols / SUB_BLOCK;
            let mut data: Vec<u8> = (0..nb * Q5_0_BLOCK)
                .map(|_| ((lcg(seed) + 1.0) * 127.9) as u8)
                .collect();
            for (i, b) in data.chunks_exact_mut(Q5_0_BLOCK).enumerate() {
                let d = if i == 3 * cols / SUB_BLOCK {
                    0.0
                } else {
                    lcg(seed) * 0.05
                };
                b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                if i / (cols / SUB_BLOCK) == 5 {
                    b[2..].fill(0xFF);
                }
            }
            return data;
        }
        let mut data = Vec::new();
        for r in 0..rows {
            data.extend(make_row(dtype, cols, gs, seed, r == 3));
        }
        data
    }

    /// A seeded weight of kind `(dtype, sym)`: symmetric ones get every
    /// zero point set to 2^(bits−1) (columns are whole sub-blocks here, so
    /// no padding codes depend on it).
    fn weight_of(
        (dtype, sym): (DType, bool),
        rows: usize,
        cols: usize,
        gs: usize,
        seed: &mut u64,
    ) -> Vec<u8> {
        let mut data = weight(dtype, rows, cols, gs, seed);
        if sym && dtype != DType::Q5_0 {
            let bits = dtype.quant_bits().unwrap();
            let row_len = row_bytes(bits, cols, gs);
            for row in data.chunks_mut(row_len) {
                let mut h = 0;
                for nsb in group_sub_blocks(cols, gs) {
                    row[h + 2] = 1 << (bits - 1);
                    h += GROUP_HEADER + nsb * sub_block_bytes(bits);
                }
            }
        }
        data
    }

    #[test]
    fn interleaving_round_trips_and_refuses_what_it_cannot_hold() {
        let mut seed = 4u64;
        for kind @ (dtype, sym) in KINDS {
            for shape in SHAPES {
                let (rows, cols, gs) = shape_of(dtype, shape);
                let data = weight_of(kind, rows, cols, gs, &mut seed);
                let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                let x8 =
                    X8Rows::interleave(w).unwrap_or_else(|| panic!("{dtype} {rows}x{cols} g{gs}"));
                assert_eq!(x8.is_symmetric(), sym, "{dtype} {rows}x{cols} g{gs}");
                let mut row = Vec::new();
                if dtype == DType::Q5_0 {
                    // The file's bytes exactly, rebuilt block for block.
                    assert_eq!((x8.bits(), x8.bytes()), (5, data.len()));
                    for r in 0..rows {
                        x8.row_in_format(r, &mut row);
                        assert_eq!(row, w.row(r), "{dtype} {rows}x{cols} row {r}");
                    }
                    continue;
                }
                if widened(dtype) {
                    // The same Ŵ, rebuilt as Q4G rows.
                    assert_eq!(x8.bits(), 4);
                    assert_eq!(x8.bytes(), rows * row_bytes(4, cols, gs));
                    let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                    for r in 0..rows {
                        x8.row_in_format(r, &mut row);
                        nibble_format::quant::dequantize(DType::Q4G, gs, &row, &mut a);
                        nibble_format::quant::dequantize(dtype, gs, w.row(r), &mut b);
                        assert_eq!(a, b, "{dtype} {rows}x{cols} g{gs} row {r}");
                    }
                    continue;
                }
                let dropped = if sym { rows * cols.div_ceil(gs) * 2 } else { 0 };
                assert_eq!(x8.bytes(), data.len() - dropped);
                for r in 0..rows {
                    x8.row_in_format(r, &mut row);
                    // The zero point's pad byte is not kept; compare what the format reads.
                    let mut want = w.row(r).to_vec();
                    if dtype != DType::Q4GM {
                        let mut h = 0;
                        for nsb in group_sub_blocks(cols, gs) {
                            want[h + 3] = 0;
                            h += 4 + nsb * sub_block_bytes(dtype.quant_bits().unwrap());
                        }
                    }
                    assert_eq!(row, want, "{dtype} {rows}x{cols} g{gs} row {r}");
                }
            }
        }
        let refuse = |dtype, rows, cols, gs, seed: &mut u64| {
            let data = weight(dtype, rows, cols, gs, seed);
            X8Rows::interleave(PackedRows::new(dtype, &data, rows, cols, gs).unwrap()).is_none()
        };
        assert!(
            refuse(DType::Q4G, 12, 64, 32, &mut seed),
            "rows not a multiple of 8"
        );
        assert!(
            refuse(DType::Q4G, 8, 172, 32, &mut seed),
            "ragged last sub-block"
        );
        assert!(
            refuse(DType::Q3G, 8, 80, 32, &mut seed),
            "3-bit, ragged last sub-block"
        );
        assert!(
            refuse(DType::Q5_0, 12, 64, 32, &mut seed),
            "Q5_0, rows not a multiple of 8"
        );
    }

    #[test]
    fn every_isa_matches_the_one_token_reference_on_any_row_range() {
        let mut seed = 31u64;
        let scalar = Kernels::for_isa(Isa::Scalar).unwrap();
        for kind @ (dtype, sym) in KINDS {
            for shape in SHAPES {
                let (rows, cols, gs) = shape_of(dtype, shape);
                let data = weight_of(kind, rows, cols, gs, &mut seed);
                let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                let x8 = X8Rows::interleave(w).unwrap();
                assert_eq!(x8.is_symmetric(), sym);
                let mut xv: Vec<f32> = (0..cols).map(|_| lcg(&mut seed) * 4.0).collect();
                if cols >= 64 {
                    xv[32..64].fill(0.0); // an all-zero activation block
                }
                if cols >= 96 {
                    xv[64..96].fill(3.0); // a block of codes 127
                }
                let mut xq = Q8Buf::new(cols);
                xq.quantize(quantize_q8_scalar, &xv);
                let x = xq.as_ref();
                let mut want = vec![0f32; rows];
                (scalar.matvec_qg(dtype))(w, &x, &mut want);
                let mut deq = vec![0f32; cols];
                let mags: Vec<f64> = (0..rows)
                    .map(|r| {
                        nibble_format::quant::dequantize(dtype, gs, w.row(r), &mut deq);
                        deq.iter()
                            .enumerate()
                            .map(|(i, &a)| {
                                (f64::from(a) * f64::from(x.qs[i]) * f64::from(x.d[i / 32])).abs()
                            })
                            .sum()
                    })
                    .collect();
                let mut reference = vec![0f32; rows];
                vec_dot_x8_q8_scalar(&x8, 0, &x, &mut reference);
                assert_eq!(
                    reference, want,
                    "reference = one-token reference, bit for bit"
                );
                for isa in Isa::available() {
                    let Some(f) = Kernels::for_isa(isa).unwrap().matvec_x8 else {
                        continue;
                    };
                    for (r0, n) in [(0, rows), (3, rows - 5), (5, 1), (rows - 1, 1), (6, 2)] {
                        let mut got = vec![f32::NAN; n];
                        f(&x8, r0, &x, &mut got);
                        for (i, &g) in got.iter().enumerate() {
                            let e = want[r0 + i];
                            let tol = (TOL_X8_VS_SCALAR * mags[r0 + i]).max(1e-7);
                            assert!(
                                (f64::from(g) - f64::from(e)).abs() <= tol,
                                "{isa:?} {dtype} sym {sym} {rows}x{cols} g{gs} rows {r0}+{n}, row {}: {g} vs {e}",
                                r0 + i
                            );
                        }
                    }
                }
            }
        }
    }

    /// The batched kernel against the batched reference (= the one-token
    /// reference per token), partial quads and a row stride above the row
    /// count included.
    #[test]
    fn batched_kernel_matches_the_reference() {
        use crate::kernels::q8::Q8Batch;
        let mut seed = 57u64;
        for kind @ (dtype, sym) in KINDS {
            for shape in SHAPES {
                let (rows, cols, gs) = shape_of(dtype, shape);
                let data = weight_of(kind, rows, cols, gs, &mut seed);
                let w = PackedRows::new(dtype, &data, rows, cols, gs).unwrap();
                let x8 = X8Rows::interleave(w).unwrap();
                assert_eq!(x8.is_symmetric(), sym);
                for n_tok in [1usize, 4, 6, 9] {
                    let mut xv: Vec<f32> =
                        (0..n_tok * cols).map(|_| lcg(&mut seed) * 4.0).collect();
                    if cols >= 64 {
                        xv[32..64].fill(0.0);
                    }
                    if cols >= 96 {
                        xv[64..96].fill(3.0);
                    }
                    let mut batch = Q8Batch::new(12, cols);
                    batch.quantize(quantize_q8_scalar, &xv, n_tok, cols, None);
                    let xb = batch.as_ref();
                    let out_rs = rows + 3;
                    let mut want = vec![f32::NAN; n_tok * out_rs];
                    if dtype == DType::Q5_0 {
                        // GGUF's batched reference, on the tokens back to back.
                        let mut xq = Q8Buf::new(n_tok * cols);
                        xq.quantize(quantize_q8_scalar, &xv);
                        crate::kernels::gguf::matmul_gguf_scalar(
                            w,
                            &xq.as_ref(),
                            &mut want,
                            out_rs,
                        );
                    } else {
                        crate::kernels::qg_mm::SCALAR[crate::kernels::packed_index(dtype)](
                            w, &xb, &mut want, out_rs,
                        );
                    }
                    let mut reference = vec![f32::NAN; n_tok * out_rs];
                    matmul_x8_q8_scalar(&x8, &xb, &mut reference, out_rs);
                    assert_eq!(
                        reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                    for isa in Isa::available() {
                        let Some(f) = Kernels::for_isa(isa).unwrap().matmul_x8 else {
                            continue;
                        };
                        let mut got = vec![f32::NAN; n_tok * out_rs];
                        f(&x8, &xb, &mut got, out_rs);
                        let mut deq = vec![0f32; cols];
                        for t in 0..n_tok {
                            for r in 0..rows {
                                let (g, e) = (got[t * out_rs + r], want[t * out_rs + r]);
                                // Σ|ŵ·x̂| of this row and token: the scale of
                                // the reassociation error (as in the one-token test).
                                nibble_format::quant::dequantize(dtype, gs, w.row(r), &mut deq);
                                let mag: f64 = (0..cols)
                                    .map(|c| {
                                        let i = xb.index(t, c / 32);
                                        (f64::from(deq[c])
                                            * f64::from(xb.qs[i * 32 + c % 32])
                                            * f64::from(xb.d[i]))
                                        .abs()
                                    })
                                    .sum();
                                assert!(
                                    (f64::from(g) - f64::from(e)).abs()
                                        <= (TOL_X8_VS_SCALAR * mag).max(1e-7),
                                    "{isa:?} {dtype} sym {sym} {rows}x{cols} g{gs} tokens {n_tok}: t {t} r {r}: {g} vs {e}"
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

    #[test]
    #[should_panic(expected = "rows out of range")]
    fn kernel_refuses_rows_beyond_the_weight() {
        let mut seed = 2u64;
        let data = weight(DType::Q4G, 8, 32, 32, &mut seed);
        let x8 =
            X8Rows::interleave(PackedRows::new(DType::Q4G, &data, 8, 32, 32).unwrap()).unwrap();
        let mut xq = Q8Buf::new(32);
        xq.quantize(quantize_q8_scalar, &[0.5; 32]);
        vec_dot_x8_q8_scalar(&x8, 4, &xq.as_ref(), &mut [0.0; 5]);
    }
}
