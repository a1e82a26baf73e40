//! Activations quantized to int8 blocks of 32, once per layer input.
//!
//! Packed-weight dot products run in integer arithmetic: each input vector
//! `x` is turned into blocks of 32 signed bytes `q` with one f32 scale `d`
//! (x ≈ d·q, d = max|x| / 127), so that a sub-block of 32 weight codes `c`
//! contributes `d · Σ c·q` — one `maddubs`/`vpdpbusd`/`sdot` chain. Zero
//! points and minimums need `Σ q` per block, kept premultiplied as
//! `ds = d · Σ q`. A vector of `n` values has `⌈n/32⌉` blocks; the padding of
//! the last block is 0, so it contributes nothing whatever the codes there.
//!
//! Rounding is to nearest, ties to even, in every implementation (the x86
//! `cvtps2dq` and NEON `fcvtns` default), so all of them produce identical
//! bytes and scales.
//!
//! K-quant weights (Q2_K…Q6_K: super-blocks of 256 with integer sub-block
//! scales) take a second flavour, [`quantize_q8_super256`]: one scale per
//! 256 values, written into each of its eight blocks' `d` and flagged by
//! [`Q8Ref::super256`]. Every kernel still reads it as blocks of 32, and the
//! K-quant kernels may then sum a whole super-block in integers and apply
//! one float scale, as llama.cpp's `Q8_K` activations allow it to. The
//! flavour is chosen by the weight type alone ([`Q8Kind::for_dtype`]), never
//! by the instruction set, so every ISA computes the same products.

use crate::kernels::SUB_BLOCK;

/// `quantize(x, qs, d, ds)`: `qs.len() == 32·⌈x.len()/32⌉`, `d`/`ds` one per block.
pub type QuantizeQ8Fn = fn(x: &[f32], qs: &mut [i8], d: &mut [f32], ds: &mut [f32]);

/// Which int8 blocks a weight type takes as its activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q8Kind {
    /// A scale per 32 values ([`QuantizeQ8Fn`] of the kernel table).
    Blocks32,
    /// A scale per 256 values ([`quantize_q8_super256`]), for the K-quants.
    Super256,
}

/// Values per super-block of the [`Q8Kind::Super256`] flavour.
pub const SUPER_BLOCK: usize = 256;

impl Q8Kind {
    /// The flavour a packed `dtype` takes: `Super256` for the K-quant
    /// block types (whose rows are whole super-blocks of 256), else `Blocks32`.
    pub fn for_dtype(dtype: nibble_format::DType) -> Q8Kind {
        use nibble_format::DType;
        match dtype {
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => Q8Kind::Super256,
            _ => Q8Kind::Blocks32,
        }
    }
}

/// An owned quantized activation vector, sized once for the widest input.
#[derive(Clone, Debug, Default)]
pub struct Q8Buf {
    /// `[n_blocks·32]` codes.
    qs: Vec<i8>,
    /// `[n_blocks]` scales.
    d: Vec<f32>,
    /// `[n_blocks]` `d · Σ q`.
    ds: Vec<f32>,
    /// `[2·n_blocks]` `Σ q` per 16 values, for [`Q8Kind::Super256`] only.
    bsums: Vec<i16>,
    /// Values held (the last `quantize` input length).
    len: usize,
    /// Whether the last input was quantized as [`Q8Kind::Super256`].
    super256: bool,
}

/// A borrowed quantized activation vector of `len` values.
#[derive(Clone, Copy, Debug)]
pub struct Q8Ref<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub ds: &'a [f32],
    /// `Σ q` per 16 values (as llama.cpp's `Q8_K`) when `super256`, else
    /// empty: the offset term of `Q6_K`'s codes `c − 32` in integers.
    pub bsums: &'a [i16],
    pub len: usize,
    /// Each aligned run of 8 blocks (256 values) shares one scale `d`
    /// ([`Q8Kind::Super256`]); kernels may sum such a run in integers.
    pub super256: bool,
}

impl<'a> Q8Ref<'a> {
    /// Tokens `t0..t0 + n` of a vector holding tokens of `cols` values back
    /// to back (`cols` a multiple of 32), as one borrowed vector.
    pub fn tokens(&self, cols: usize, t0: usize, n: usize) -> Q8Ref<'a> {
        let nb = cols / SUB_BLOCK;
        Q8Ref {
            qs: &self.qs[t0 * cols..(t0 + n) * cols],
            d: &self.d[t0 * nb..(t0 + n) * nb],
            ds: &self.ds[t0 * nb..(t0 + n) * nb],
            bsums: if self.bsums.is_empty() {
                self.bsums
            } else {
                &self.bsums[2 * t0 * nb..2 * (t0 + n) * nb]
            },
            len: n * cols,
            super256: self.super256,
        }
    }

    /// The values the blocks stand for, `q · d`, into `out[len]`.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len, "Q8Ref::dequantize_into: length");
        for (o, (q, d)) in out
            .chunks_mut(SUB_BLOCK)
            .zip(self.qs.chunks_exact(SUB_BLOCK).zip(self.d))
        {
            for (v, &qi) in o.iter_mut().zip(q) {
                *v = f32::from(qi) * d;
            }
        }
    }
}

impl Q8Buf {
    /// Room for vectors of up to `max_len` values.
    pub fn new(max_len: usize) -> Q8Buf {
        let nb = max_len.div_ceil(SUB_BLOCK);
        Q8Buf {
            qs: vec![0; nb * SUB_BLOCK],
            d: vec![0.0; nb],
            ds: vec![0.0; nb],
            bsums: vec![0; 2 * nb],
            len: 0,
            super256: false,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.ds.len()) + 2 * self.bsums.len()
    }

    /// Quantize `x` (at most the capacity) with `quantize`; allocates nothing.
    pub fn quantize(&mut self, quantize: QuantizeQ8Fn, x: &[f32]) {
        let nb = x.len().div_ceil(SUB_BLOCK);
        assert!(nb <= self.d.len(), "Q8Buf: input longer than its capacity");
        quantize(
            x,
            &mut self.qs[..nb * SUB_BLOCK],
            &mut self.d[..nb],
            &mut self.ds[..nb],
        );
        self.len = x.len();
        self.super256 = false;
    }

    /// Quantize `x` in the flavour `kind`: `Blocks32` through `quantize`
    /// (the kernel table's), `Super256` through [`quantize_q8_super256`].
    pub fn quantize_as(&mut self, kind: Q8Kind, quantize: QuantizeQ8Fn, x: &[f32]) {
        match kind {
            Q8Kind::Blocks32 => self.quantize(quantize, x),
            Q8Kind::Super256 => {
                self.quantize(quantize_q8_super256, x);
                self.super256 = true;
                let n = x.len().div_ceil(SUB_BLOCK) * SUB_BLOCK;
                for (b, q) in self.bsums.iter_mut().zip(self.qs[..n].chunks_exact(16)) {
                    *b = q.iter().map(|&v| i16::from(v)).sum();
                }
            }
        }
    }

    pub fn as_ref(&self) -> Q8Ref<'_> {
        let nb = self.len.div_ceil(SUB_BLOCK);
        Q8Ref {
            qs: &self.qs[..nb * SUB_BLOCK],
            d: &self.d[..nb],
            ds: &self.ds[..nb],
            bsums: if self.super256 {
                &self.bsums[..2 * nb]
            } else {
                &[]
            },
            len: self.len,
            super256: self.super256,
        }
    }
}

/// Tokens per interleaved group of a [`Q8Batch`]: the batched kernels
/// decode each weight sub-block once and use it for this many tokens.
pub const QUAD: usize = 4;

/// The int8 blocks of several tokens (the rows of a prompt), interleaved by
/// quads of tokens so that a batched kernel reads one sequential stream:
/// block `k` of token `t` is entry `((t / 4)·nb + k)·4 + t % 4` of `d` and
/// `ds`, and its 32 codes start at 32 × that index in `qs` (`nb` blocks per
/// token). A last, partial quad is padded with zero tokens (codes, `d` and
/// `ds` all 0), which contribute nothing and whose outputs are not written.
/// Sized once for the largest batch and input width; quantizing allocates
/// nothing.
#[derive(Clone, Debug)]
pub struct Q8Batch {
    /// `[quads, nb, 4, 32]` codes.
    qs: Vec<i8>,
    /// `[quads, nb, 4]` scales.
    d: Vec<f32>,
    /// `[quads, nb, 4]` `d · Σ q`.
    ds: Vec<f32>,
    /// One token's blocks, before they are interleaved.
    one: Q8Buf,
    /// `[max_len]` one token's input gathered through a permutation.
    gathered: Vec<f32>,
    n_tok: usize,
    len: usize,
}

/// A borrowed [`Q8Batch`] (or a run of its quads): `n_tok` tokens of `len` values.
#[derive(Clone, Copy, Debug)]
pub struct Q8BatchRef<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub ds: &'a [f32],
    pub n_tok: usize,
    pub len: usize,
}

/// The quad layout of [`Q8Batch`]: entry of block `k` of token `t` with
/// `nb` blocks per token.
fn batch_index(nb: usize, t: usize, k: usize) -> usize {
    ((t / QUAD) * nb + k) * QUAD + t % QUAD
}

impl Q8BatchRef<'_> {
    /// Blocks per token.
    pub fn n_blocks(&self) -> usize {
        self.len.div_ceil(SUB_BLOCK)
    }

    /// Quads held (the last may be partial).
    pub fn n_quads(&self) -> usize {
        self.n_tok.div_ceil(QUAD)
    }

    /// Whether the arrays have exactly the size `n_tok` and `len` imply.
    pub fn is_consistent(&self) -> bool {
        let entries = self.n_quads() * self.n_blocks() * QUAD;
        self.d.len() == entries && self.ds.len() == entries && self.qs.len() == entries * SUB_BLOCK
    }

    /// Index of block `k` of token `t` in `d`/`ds` (× 32 in `qs`).
    pub fn index(&self, t: usize, k: usize) -> usize {
        batch_index(self.n_blocks(), t, k)
    }

    /// Quads `q0..q0 + n` as their own batch (tokens `4·q0..`).
    pub fn quads(&self, q0: usize, n: usize) -> Q8BatchRef<'_> {
        assert!(q0 + n <= self.n_quads(), "Q8BatchRef::quads out of range");
        let per = self.n_blocks() * QUAD;
        Q8BatchRef {
            qs: &self.qs[q0 * per * SUB_BLOCK..(q0 + n) * per * SUB_BLOCK],
            d: &self.d[q0 * per..(q0 + n) * per],
            ds: &self.ds[q0 * per..(q0 + n) * per],
            n_tok: (self.n_tok - q0 * QUAD).min(n * QUAD),
            len: self.len,
        }
    }
}

impl Q8Batch {
    /// Room for up to `max_tok` tokens of up to `max_len` values.
    pub fn new(max_tok: usize, max_len: usize) -> Q8Batch {
        let entries = max_tok.div_ceil(QUAD) * QUAD * max_len.div_ceil(SUB_BLOCK);
        Q8Batch {
            qs: vec![0; entries * SUB_BLOCK],
            d: vec![0.0; entries],
            ds: vec![0.0; entries],
            one: Q8Buf::new(max_len),
            gathered: vec![0.0; max_len],
            n_tok: 0,
            len: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.ds.len() + self.gathered.len()) + self.one.bytes()
    }

    /// Quantize `n_tok` rows of `len` values (`x` is `[n_tok, len]`), each
    /// gathered through `perm` first when given (`row[perm[j]]` becomes
    /// column `j`), with the same `quantize` as the one-token path, so both
    /// paths see the same blocks. Allocates nothing.
    pub fn quantize(
        &mut self,
        quantize: QuantizeQ8Fn,
        x: &[f32],
        n_tok: usize,
        len: usize,
        perm: Option<&[u32]>,
    ) {
        let nb = len.div_ceil(SUB_BLOCK);
        let quads = n_tok.div_ceil(QUAD);
        assert!(
            x.len() >= n_tok * len
                && quads * QUAD * nb <= self.d.len()
                && len <= self.gathered.len(),
            "Q8Batch: {n_tok} × {len} does not fit"
        );
        assert!(
            perm.is_none_or(|p| p.len() == len),
            "Q8Batch: permutation length"
        );
        (self.n_tok, self.len) = (n_tok, len);
        let entries = quads * QUAD * nb;
        for t in 0..quads * QUAD {
            if t >= n_tok {
                for k in 0..nb {
                    let i = batch_index(nb, t, k);
                    self.qs[i * SUB_BLOCK..(i + 1) * SUB_BLOCK].fill(0);
                    (self.d[i], self.ds[i]) = (0.0, 0.0);
                }
                continue;
            }
            let row = &x[t * len..(t + 1) * len];
            let row = match perm {
                None => row,
                Some(perm) => {
                    for (o, &p) in self.gathered[..len].iter_mut().zip(perm) {
                        *o = row[p as usize];
                    }
                    &self.gathered[..len]
                }
            };
            self.one.quantize(quantize, row);
            let one = self.one.as_ref();
            for k in 0..nb {
                let i = batch_index(nb, t, k);
                self.qs[i * SUB_BLOCK..(i + 1) * SUB_BLOCK]
                    .copy_from_slice(&one.qs[k * SUB_BLOCK..(k + 1) * SUB_BLOCK]);
                (self.d[i], self.ds[i]) = (one.d[k], one.ds[k]);
            }
        }
        debug_assert!(self.as_ref().is_consistent() && self.as_ref().d.len() == entries);
    }

    pub fn as_ref(&self) -> Q8BatchRef<'_> {
        let entries = self.n_tok.div_ceil(QUAD) * QUAD * self.len.div_ceil(SUB_BLOCK);
        Q8BatchRef {
            qs: &self.qs[..entries * SUB_BLOCK],
            d: &self.d[..entries],
            ds: &self.ds[..entries],
            n_tok: self.n_tok,
            len: self.len,
        }
    }
}

fn check(x: &[f32], qs: &[i8], d: &[f32], ds: &[f32]) {
    let nb = x.len().div_ceil(SUB_BLOCK);
    assert!(
        qs.len() == nb * SUB_BLOCK && d.len() == nb && ds.len() == nb,
        "quantize_q8: output sizes do not match {} inputs",
        x.len()
    );
}

/// Scalar reference of one block of ≤ 32 values (used by the SIMD tails).
fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (i, q) in qs.iter_mut().enumerate() {
        let v = x.get(i).map_or(0, |&v| (v * id).round_ties_even() as i32);
        *q = v as i8;
        sum += v;
    }
    (d, d * sum as f32)
}

/// Scalar reference.
pub fn quantize_q8_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], ds: &mut [f32]) {
    check(x, qs, d, ds);
    for (b, (xs, q)) in x
        .chunks(SUB_BLOCK)
        .zip(qs.chunks_exact_mut(SUB_BLOCK))
        .enumerate()
    {
        (d[b], ds[b]) = quantize_block(xs, q);
    }
}

/// `y.round_ties_even()` for |y| < 2²²: adding and subtracting 1.5·2²³
/// rounds to an integer in the default rounding mode (to nearest, ties to
/// even). Where the baseline target lacks SSE4.1, `round_ties_even` is a
/// libm call per value (a tenth of a prompt's time); this is two adds.
#[inline]
fn round_small(y: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    ((y + MAGIC) - MAGIC) as i32
}

/// The [`Q8Kind::Super256`] flavour: per 256 values (the last run may be
/// shorter) one scale `d = max|x| / 127`, stored in each of the run's
/// blocks, codes rounded as in [`quantize_q8_scalar`], `ds` per block of 32.
/// Scalar only: it runs once per layer input, well under 1 % of a token's
/// time, and its bytes are then the same on every instruction set.
pub fn quantize_q8_super256(x: &[f32], qs: &mut [i8], d: &mut [f32], ds: &mut [f32]) {
    check(x, qs, d, ds);
    const PER: usize = SUPER_BLOCK / SUB_BLOCK;
    for (s, xs) in x.chunks(SUPER_BLOCK).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let blocks = s * PER..(s * PER + PER).min(d.len());
        for b in blocks {
            let q = &mut qs[b * SUB_BLOCK..(b + 1) * SUB_BLOCK];
            let xb = &x[b * SUB_BLOCK..x.len().min((b + 1) * SUB_BLOCK)];
            let mut sum = 0i32;
            for (i, q) in q.iter_mut().enumerate() {
                let v = xb.get(i).map_or(0, |&v| round_small(v * id));
                *q = v as i8;
                sum += v;
            }
            (d[b], ds[b]) = (dd, dd * sum as f32);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2: full blocks in vectors, the ragged last block by the reference.
    /// Only reachable through a kernel table built after AVX2 was detected.
    pub fn quantize_q8_avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], ds: &mut [f32]) {
        check(x, qs, d, ds);
        let full = x.len() / SUB_BLOCK;
        for b in 0..full {
            let xs = &x[b * SUB_BLOCK..(b + 1) * SUB_BLOCK];
            let q = &mut qs[b * SUB_BLOCK..(b + 1) * SUB_BLOCK];
            // SAFETY: AVX2 was detected (see above); both slices hold 32.
            (d[b], ds[b]) = unsafe { block_avx2(xs, q) };
        }
        if full < d.len() {
            (d[full], ds[full]) =
                quantize_block(&x[full * SUB_BLOCK..], &mut qs[full * SUB_BLOCK..]);
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn block_avx2(x: &[f32], q: &mut [i8]) -> (f32, f32) {
        assert!(x.len() == SUB_BLOCK && q.len() == SUB_BLOCK);
        let p = x.as_ptr();
        // SAFETY: 4 × 8 floats = the 32 elements of `x`.
        let v = unsafe {
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        };
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let i: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id)));
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s4 = _mm_hadd_epi32(s4, s4);
        let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
        // packs work per 128-bit lane: fix the order with one permute.
        let p16a = _mm256_packs_epi32(i[0], i[1]);
        let p16b = _mm256_packs_epi32(i[2], i[3]);
        let p8 = _mm256_packs_epi16(p16a, p16b);
        let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `q` holds 32 bytes.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p8) };
        (d, d * sum as f32)
    }
}

#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// NEON: full blocks in vectors, the ragged last block by the reference.
    pub fn quantize_q8_neon(x: &[f32], qs: &mut [i8], d: &mut [f32], ds: &mut [f32]) {
        check(x, qs, d, ds);
        let full = x.len() / SUB_BLOCK;
        for b in 0..full {
            let xs = &x[b * SUB_BLOCK..(b + 1) * SUB_BLOCK];
            let q = &mut qs[b * SUB_BLOCK..(b + 1) * SUB_BLOCK];
            // SAFETY: NEON is baseline on aarch64; both slices hold 32.
            (d[b], ds[b]) = unsafe { block_neon(xs, q) };
        }
        if full < d.len() {
            (d[full], ds[full]) =
                quantize_block(&x[full * SUB_BLOCK..], &mut qs[full * SUB_BLOCK..]);
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn block_neon(x: &[f32], q: &mut [i8]) -> (f32, f32) {
        assert!(x.len() == SUB_BLOCK && q.len() == SUB_BLOCK);
        let p = x.as_ptr();
        // SAFETY: 8 × 4 floats = the 32 elements of `x`.
        let v: [float32x4_t; 8] = std::array::from_fn(|k| unsafe { vld1q_f32(p.add(4 * k)) });
        let mut m = vabsq_f32(v[0]);
        for vi in &v[1..] {
            m = vmaxq_f32(m, vabsq_f32(*vi));
        }
        let amax = vmaxvq_f32(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let i: [int32x4_t; 8] = std::array::from_fn(|k| vcvtnq_s32_f32(vmulq_n_f32(v[k], id)));
        let mut s = i[0];
        for ii in &i[1..] {
            s = vaddq_s32(s, *ii);
        }
        let sum = vaddvq_s32(s);
        for h in 0..2 {
            let a = vcombine_s16(vqmovn_s32(i[4 * h]), vqmovn_s32(i[4 * h + 1]));
            let b = vcombine_s16(vqmovn_s32(i[4 * h + 2]), vqmovn_s32(i[4 * h + 3]));
            let bytes = vcombine_s8(vqmovn_s16(a), vqmovn_s16(b));
            // SAFETY: `q` holds 32 bytes; this writes 16 at 16·h.
            unsafe { vst1q_s8(q.as_mut_ptr().add(16 * h), bytes) };
        }
        (d, d * sum as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{test_util::lcg, Isa, Kernels};

    /// Codes past the `n` values are 0, and each block's `ds` is `d · Σ q`.
    fn assert_padding_and_ds(r: &Q8Ref<'_>, n: usize) {
        assert!(r.qs[n..].iter().all(|&q| q == 0));
        for (blk, (&d, &ds)) in r.d.iter().zip(r.ds).enumerate() {
            let s: i32 = r.qs[blk * 32..blk * 32 + 32]
                .iter()
                .map(|&q| i32::from(q))
                .sum();
            assert_eq!(ds, d * s as f32);
        }
    }

    #[test]
    fn reference_reconstructs_within_half_a_step_and_pads_with_zero() {
        let mut seed = 3;
        for n in [1usize, 31, 32, 33, 172, 576] {
            let x: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 3.0).collect();
            let mut b = Q8Buf::new(n);
            b.quantize(quantize_q8_scalar, &x);
            let r = b.as_ref();
            for (i, &v) in x.iter().enumerate() {
                let d = r.d[i / 32];
                assert!((f32::from(r.qs[i]) * d - v).abs() <= 0.5 * d * 1.0001);
            }
            assert_padding_and_ds(&r, n);
        }
    }

    #[test]
    fn super256_shares_one_scale_per_256_and_reconstructs_within_half_a_step() {
        let mut seed = 5;
        for n in [1usize, 32, 255, 256, 257, 1536, 8960] {
            let mut x: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 3.0).collect();
            if n >= 512 {
                x[256..512].fill(0.0); // an all-zero super-block
            }
            let mut b = Q8Buf::new(n);
            b.quantize_as(Q8Kind::Super256, quantize_q8_scalar, &x);
            let r = b.as_ref();
            assert!(r.super256);
            for (s, xs) in x.chunks(256).enumerate() {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = r.d[8 * s];
                assert_eq!(d, amax / 127.0, "n {n} super-block {s}");
                let blocks = 8 * s..(8 * s + 8).min(r.d.len());
                assert!(r.d[blocks].iter().all(|&e| e == d), "n {n} super-block {s}");
                for (i, &v) in xs.iter().enumerate() {
                    let q = f32::from(r.qs[256 * s + i]);
                    assert!((q * d - v).abs() <= 0.5 * d * 1.0001, "n {n} value {i}");
                }
            }
            assert_padding_and_ds(&r, n);
            // Σq per 16 values, padding included.
            assert_eq!(r.bsums.len(), r.qs.len() / 16, "n {n}");
            for (i, (&bs, q)) in r.bsums.iter().zip(r.qs.chunks_exact(16)).enumerate() {
                let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
                assert_eq!(i32::from(bs), sum, "n {n} sum {i}");
            }
            assert_eq!(r.tokens(32, 0, 1).bsums, &r.bsums[..2], "n {n}");
            // Quantizing in the other flavour clears the flag and the sums.
            b.quantize(quantize_q8_scalar, &x);
            assert!(!b.as_ref().super256);
            assert!(b.as_ref().bsums.is_empty());
        }
    }

    #[test]
    fn round_small_is_round_ties_even() {
        let mut seed = 11;
        let mut ys: Vec<f32> = (-256..=256).map(|i| i as f32 * 0.5).collect();
        ys.extend([
            0.49999997,
            -0.49999997,
            126.49999,
            127.00001,
            -127.00001,
            0.0,
            -0.0,
        ]);
        ys.extend((0..10_000).map(|_| lcg(&mut seed) * 127.0));
        for y in ys {
            assert_eq!(round_small(y), y.round_ties_even() as i32, "{y}");
        }
    }

    /// Bit-identical across instruction sets: same rounding everywhere.
    #[test]
    fn every_isa_quantizes_bit_identically() {
        let mut seed = 9;
        for isa in Isa::available() {
            let k = Kernels::for_isa(isa).unwrap();
            for n in [1usize, 8, 31, 32, 33, 64, 100, 172, 576, 1536] {
                let mut x: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 2.5).collect();
                if n >= 64 {
                    x[32..64].fill(0.0); // an all-zero block
                    x[0] = 0.5 / 127.0 * 2.5; // a rounding tie candidate
                }
                let (mut a, mut b) = (Q8Buf::new(n), Q8Buf::new(n));
                a.quantize(quantize_q8_scalar, &x);
                b.quantize(k.quantize_q8, &x);
                let (a, b) = (a.as_ref(), b.as_ref());
                assert_eq!(a.qs, b.qs, "{isa:?} n {n}");
                assert_eq!(a.d, b.d, "{isa:?} n {n}");
                assert_eq!(a.ds, b.ds, "{isa:?} n {n}");
            }
        }
    }
}
