//! Scalar reference decoders of ggml's block types, one function per type.
//!
//! Each block decodes to exactly the f32 values llama.cpp's reference
//! `dequantize_row_*` gives (the same operations in the same order), so a
//! GGUF imported to f32 holds the weights llama.cpp's own float path sees.
//! The layouts are ggml's (`ggml-common.h`); a test checks every type
//! against the gguf Python package's `gguf.quants.dequantize` on seeded
//! blocks (`scripts/gguf-dequant-vectors.py` made the vectors).

use half::{bf16, f16};

use crate::gguf::GgmlType;

/// Weights per K-quant super-block.
const QK_K: usize = 256;

/// The 16 values of the non-linear 4-bit grid of IQ4_NL and IQ4_XS.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decode `data` (whole blocks of `ty`) into `out` (`out.len()` weights).
/// Returns false for a type without a decoder here (the caller names it).
pub fn dequantize_blocks(ty: GgmlType, data: &[u8], out: &mut [f32]) -> bool {
    let (block, bytes) = ty.block();
    let (block, bytes) = (block as usize, bytes as usize);
    let blocks = out.chunks_exact_mut(block).zip(data.chunks_exact(bytes));
    let decode: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => {
            for (o, c) in blocks {
                o[0] = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            return true;
        }
        GgmlType::F16 => {
            for (o, c) in blocks {
                o[0] = f16_at(c, 0);
            }
            return true;
        }
        GgmlType::BF16 => {
            for (o, c) in blocks {
                o[0] = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
            return true;
        }
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q2K => dequant_q2_k,
        GgmlType::Q3K => dequant_q3_k,
        GgmlType::Q4K => dequant_q4_k,
        GgmlType::Q5K => dequant_q5_k,
        GgmlType::Q6K => dequant_q6_k,
        GgmlType::IQ4NL => dequant_iq4_nl,
        GgmlType::IQ4XS => dequant_iq4_xs,
        GgmlType::Q8_1 | GgmlType::Q8K => return false,
    };
    for (o, b) in blocks {
        decode(b, o);
    }
    true
}

/// Q4_0: f16 scale, 16 bytes of 4-bit codes (low nibbles first), offset 8.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = (i32::from(q & 0x0f) - 8) as f32 * d;
        y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

/// Q4_1: f16 scale and minimum, 16 bytes of 4-bit codes.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = f32::from(q & 0x0f) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// The 5th bits of a Q5 block: bit `j` of the little-endian `u32` at `at`.
fn high_bits(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Q5_0: f16 scale, 32 fifth bits, 16 bytes of low nibbles, offset 16.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = high_bits(b, 2);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = ((u32::from(q & 0x0f) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = ((u32::from(q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 scale and minimum, 32 fifth bits, 16 bytes of low nibbles.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = high_bits(b, 4);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (u32::from(q & 0x0f) | h0) as f32 * d + m;
        y[j + 16] = (u32::from(q >> 4) | h1) as f32 * d + m;
    }
}

/// Q8_0: f16 scale, 32 signed bytes.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = f32::from(b[2 + j] as i8) * d;
    }
}

/// Q2_K: 16 sub-blocks of 16 with 4-bit scales and mins (`scales[16]`),
/// 2-bit codes (`qs[64]`), f16 super-block scale and minimum scale.
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    for n in 0..QK_K / 128 {
        let q = &qs[32 * n..32 * n + 32];
        let y = &mut y[128 * n..128 * n + 128];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0xf);
                let ml = dmin * f32::from(sc >> 4);
                for l in 0..16 {
                    let code = (q[l + 16 * half] >> shift) & 3;
                    y[32 * j + 16 * half + l] = dl * f32::from(code) - ml;
                }
            }
        }
    }
}

/// Q3_K: high bits (`hmask[32]`), 2-bit low codes (`qs[64]`), 16 6-bit
/// signed scales packed in 12 bytes, f16 super-block scale.
fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = f16_at(b, 108);
    let scales = q3k_scales(packed);
    let mut m = 1u8;
    let mut is = 0;
    for n in 0..QK_K / 128 {
        let q = &qs[32 * n..32 * n + 32];
        let y = &mut y[128 * n..128 * n + 128];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d_all * f32::from(scales[is] - 32);
                is += 1;
                for l in 0..16 {
                    let i = l + 16 * half;
                    let low = i32::from((q[i] >> shift) & 3);
                    let high = if hmask[i] & m != 0 { 0 } else { 4 };
                    y[32 * j + i] = dl * (low - high) as f32;
                }
            }
            m <<= 1;
        }
    }
}

/// The 16 6-bit scales of a Q3_K block (biased by 32): low 4 bits from the
/// first 8 bytes (low then high nibbles), high 2 bits from the last 4.
pub fn q3k_scales(p: &[u8]) -> [i8; 16] {
    let mut s = [0i8; 16];
    for (i, v) in s.iter_mut().enumerate() {
        let low = if i < 8 { p[i] & 0xf } else { p[i - 8] >> 4 };
        let high = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        *v = (low | (high << 4)) as i8;
    }
    s
}

/// Scale and minimum `j` (6 bits each) of a Q4_K / Q5_K block's 12 bytes.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All eight (scale, minimum) pairs of [`scale_min_k4`] at once, as two
/// little-endian words of eight bytes each (`scales`, `minimums`): the
/// 12 bytes read as three u32 words `w0, w1, w2`, the low four of each
/// are `w0 & 0x3f…`, `w1 & 0x3f…`; the high four join `w2`'s nibbles with
/// the top two bits of `w0` / `w1`. A handful of word operations where the
/// per-pair form takes sixteen byte extractions (kernels decode it once
/// per super-block).
#[inline]
pub fn scales_mins_k4(q: &[u8]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const NIB: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let sc_lo = w0 & LOW6;
    let mn_lo = w1 & LOW6;
    let sc_hi = (w2 & NIB) | (((w0 >> 6) & TOP2) << 4);
    let mn_hi = ((w2 >> 4) & NIB) | (((w1 >> 6) & TOP2) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// The (scale, minimum) of sub-blocks `2n` and `2n + 1` of a Q4_K / Q5_K
/// block: the 6-bit values times the super-block's scale and minimum scale.
fn pair_scales(n: usize, scales: &[u8], d: f32, min: f32) -> [(f32, f32); 2] {
    [2 * n, 2 * n + 1].map(|j| {
        let (sc, m) = scale_min_k4(j, scales);
        (d * f32::from(sc), min * f32::from(m))
    })
}

/// Q4_K: f16 scale and minimum scale, 8 sub-blocks of 32 with 6-bit scales
/// and mins (12 bytes), 4-bit codes (`qs[128]`).
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (n, y) in y.chunks_exact_mut(64).enumerate() {
        let q = &qs[32 * n..32 * n + 32];
        let [(d1, m1), (d2, m2)] = pair_scales(n, scales, d, min);
        for l in 0..32 {
            y[l] = d1 * f32::from(q[l] & 0xf) - m1;
            y[l + 32] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// Q5_K: as Q4_K plus a fifth bit per weight (`qh[32]`).
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (n, y) in y.chunks_exact_mut(64).enumerate() {
        let ql = &qs[32 * n..32 * n + 32];
        let (u1, u2) = (1u8 << (2 * n), 2u8 << (2 * n));
        let [(d1, m1), (d2, m2)] = pair_scales(n, scales, d, min);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * f32::from((ql[l] & 0xf) + h1) - m1;
            y[l + 32] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
        }
    }
}

/// Q6_K: low 4 bits (`ql[128]`), high 2 bits (`qh[64]`), 16 signed 8-bit
/// scales, f16 super-block scale; codes offset by 32.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for n in 0..QK_K / 128 {
        let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
        let sc = &sc[8 * n..8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let code = |low: u8, shift: u32| i32::from(low | (((qh[l] >> shift) & 3) << 4)) - 32;
            let q1 = code(ql[l] & 0xf, 0);
            let q2 = code(ql[l + 32] & 0xf, 2);
            let q3 = code(ql[l] >> 4, 4);
            let q4 = code(ql[l + 32] >> 4, 6);
            let s = |k: usize| f32::from(sc[is + k] as i8);
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

/// IQ4_NL: f16 scale, 16 bytes of 4-bit indices into [`KVALUES_IQ4NL`].
fn dequant_iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * f32::from(KVALUES_IQ4NL[usize::from(q & 0xf)]);
        y[j + 16] = d * f32::from(KVALUES_IQ4NL[usize::from(q >> 4)]);
    }
}

/// The signed 6-bit scale of sub-block `ib` of an IQ4_XS block `b` (high 2
/// bits in `scales_h`, low 4 in `scales_l`), minus its bias of 32.
pub fn iq4xs_scale(b: &[u8], ib: usize) -> i16 {
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
    let high = ((scales_h >> (2 * ib)) & 3) as u8;
    i16::from(low | (high << 4)) - 32
}

/// IQ4_XS: f16 scale, 8 sub-blocks of 32 with 6-bit scales (high 2 bits in
/// `scales_h`, low 4 in `scales_l[4]`), 4-bit indices into [`KVALUES_IQ4NL`].
fn dequant_iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[8..136];
    for (ib, y) in y.chunks_exact_mut(32).enumerate() {
        let dl = d * f32::from(iq4xs_scale(b, ib));
        let q = &qs[16 * ib..16 * ib + 16];
        for j in 0..16 {
            y[j] = dl * f32::from(KVALUES_IQ4NL[usize::from(q[j] & 0xf)]);
            y[j + 16] = dl * f32::from(KVALUES_IQ4NL[usize::from(q[j] >> 4)]);
        }
    }
}

/// One sub-block of 32 weights of a block in integer form: weight `j` is
/// `a·w1[j] + b·w2[j]`. The integer dot products of the runtime's kernels
/// work on this form (`Σ w·q` exact in i32, then two float multiplies), and
/// it is their scalar reference's view of every block type: Q4_K's
/// `d·sc·q − dmin·m` is `a = d, w1 = sc·q, b = −dmin, w2 = m`; Q6_K's two
/// 16-weight scales fold into `w1 = sc·(q − 32)`.
#[derive(Clone, Copy, Debug)]
pub struct IntSub {
    pub a: f32,
    pub w1: [i16; 32],
    pub b: f32,
    pub w2: [i16; 32],
}

impl IntSub {
    pub const ZERO: IntSub = IntSub {
        a: 0.0,
        w1: [0; 32],
        b: 0.0,
        w2: [0; 32],
    };
}

/// Unpack one block of a native block type into `out` (at least 8
/// entries); returns the number of sub-blocks of 32 (1 or 8), or `None`
/// for a type without an integer form here.
pub fn unpack_int(ty: GgmlType, b: &[u8], out: &mut [IntSub]) -> Option<usize> {
    let nibbles = |q: &[u8], j: usize| if j < 16 { q[j] & 0xf } else { q[j - 16] >> 4 };
    match ty {
        GgmlType::Q5_0 => {
            let qh = high_bits(b, 2);
            let s = &mut out[0];
            (s.a, s.b) = (f16_at(b, 0), 0.0);
            for j in 0..32 {
                let h = ((qh >> j) & 1) as u8;
                s.w1[j] = i16::from(nibbles(&b[6..22], j) | (h << 4)) - 16;
                s.w2[j] = 0;
            }
            Some(1)
        }
        GgmlType::IQ4NL => {
            let s = &mut out[0];
            (s.a, s.b) = (f16_at(b, 0), 0.0);
            for j in 0..32 {
                s.w1[j] = i16::from(KVALUES_IQ4NL[usize::from(nibbles(&b[2..18], j))]);
                s.w2[j] = 0;
            }
            Some(1)
        }
        GgmlType::IQ4XS => {
            let d = f16_at(b, 0);
            for (ib, s) in out[..8].iter_mut().enumerate() {
                let ls = iq4xs_scale(b, ib);
                let q = &b[8 + 16 * ib..24 + 16 * ib];
                (s.a, s.b) = (d, 0.0);
                for j in 0..32 {
                    s.w1[j] = ls * i16::from(KVALUES_IQ4NL[usize::from(nibbles(q, j))]);
                    s.w2[j] = 0;
                }
            }
            Some(8)
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let five = ty == GgmlType::Q5K;
            let qs = if five { &b[48..176] } else { &b[16..144] };
            for (j, s) in out[..8].iter_mut().enumerate() {
                let (sc, m) = scale_min_k4(j, scales);
                let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                (s.a, s.b) = (d, -dmin);
                for l in 0..32 {
                    let mut code = if j % 2 == 0 { q[l] & 0xf } else { q[l] >> 4 };
                    if five && b[16 + l] & (1 << j) != 0 {
                        code += 16;
                    }
                    s.w1[l] = i16::from(sc) * i16::from(code);
                    s.w2[l] = i16::from(m);
                }
            }
            Some(8)
        }
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for (k, s) in out[..8].iter_mut().enumerate() {
                let (n, part) = (k / 4, k % 4);
                let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
                (s.a, s.b) = (d, 0.0);
                for l in 0..32 {
                    let low = match part {
                        0 => ql[l] & 0xf,
                        1 => ql[l + 32] & 0xf,
                        2 => ql[l] >> 4,
                        _ => ql[l + 32] >> 4,
                    };
                    let code = i16::from(low | (((qh[l] >> (2 * part)) & 3) << 4)) - 32;
                    let scale = i16::from(sc[8 * n + 2 * part + l / 16] as i8);
                    s.w1[l] = scale * code;
                    s.w2[l] = 0;
                }
            }
            Some(8)
        }
        GgmlType::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (k, s) in out[..8].iter_mut().enumerate() {
                let (n, j) = (k / 4, k % 4);
                let q = &qs[32 * n..32 * n + 32];
                (s.a, s.b) = (d, -dmin);
                for i in 0..32 {
                    let sc = scales[8 * n + 2 * j + i / 16];
                    let code = (q[i] >> (2 * j)) & 3;
                    s.w1[i] = i16::from(sc & 0xf) * i16::from(code);
                    s.w2[i] = i16::from(sc >> 4);
                }
            }
            Some(8)
        }
        GgmlType::Q3K => {
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            let scales = q3k_scales(&b[96..108]);
            let d = f16_at(b, 108);
            for (k, s) in out[..8].iter_mut().enumerate() {
                let (n, j) = (k / 4, k % 4);
                let q = &qs[32 * n..32 * n + 32];
                let m = 1u8 << (4 * n + j);
                (s.a, s.b) = (d, 0.0);
                for i in 0..32 {
                    let low = i16::from((q[i] >> (2 * j)) & 3);
                    let high = if hmask[i] & m != 0 { 0 } else { 4 };
                    let scale = i16::from(scales[8 * n + 2 * j + i / 16]) - 32;
                    s.w1[i] = scale * (low - high);
                    s.w2[i] = 0;
                }
            }
            Some(8)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from `scripts/gguf-dequant-vectors.py`: per type, seeded
    /// random blocks (finite f16 scales) and what `gguf.quants.dequantize`
    /// made of them.
    const VECTORS: &str = include_str!("../tests/data/gguf_dequant_vectors.json");

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The word form of the K-quant scales equals the per-pair form on
    /// every bit pattern of each byte position (a seeded walk over 12 bytes
    /// plus all-ones and all-zeros).
    #[test]
    fn scales_mins_word_form_equals_the_pair_form() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut cases: Vec<[u8; 12]> = vec![[0; 12], [0xff; 12]];
        for _ in 0..2000 {
            cases.push(std::array::from_fn(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            }));
        }
        for q in cases {
            let (sc, mn) = scales_mins_k4(&q);
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &q);
                assert_eq!((sc >> (8 * j)) as u8, s, "scale {j} of {q:?}");
                assert_eq!((mn >> (8 * j)) as u8, m, "minimum {j} of {q:?}");
            }
        }
    }

    /// Every decoder equals the gguf package's to float rounding: ggml and
    /// numpy may group a scale product differently (d·sc·q against
    /// (d·sc)·q), at most a few ulps of the block's largest value.
    #[test]
    fn every_block_type_decodes_as_the_gguf_package_does() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let mut seen = Vec::new();
        for case in v.as_array().unwrap() {
            let name = case["type"].as_str().unwrap();
            let code = case["code"].as_u64().unwrap() as u32;
            let ty = GgmlType::from_code(code).unwrap();
            assert_eq!(ty.name(), name);
            let data = hex(case["bytes"].as_str().unwrap());
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let mut got = vec![f32::NAN; want.len()];
            assert!(dequantize_blocks(ty, &data, &mut got), "{name}");
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * scale,
                    "{name} element {i}: {g} vs {w}"
                );
            }
            seen.push(name.to_string());
        }
        for t in [
            "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
            "IQ4_NL", "IQ4_XS",
        ] {
            assert!(seen.iter().any(|s| s == t), "no vectors for {t}");
        }
    }

    /// The integer form of every native block type decodes to the same
    /// weights as the float decoders (which equal the gguf package's).
    #[test]
    fn integer_form_decodes_as_the_float_decoders() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let mut checked = 0;
        for case in v.as_array().unwrap() {
            let ty = GgmlType::from_code(case["code"].as_u64().unwrap() as u32).unwrap();
            if ty.block_dtype().is_none() {
                continue;
            }
            let data = hex(case["bytes"].as_str().unwrap());
            let (block, bytes) = ty.block();
            let mut want = vec![0f32; data.len() / bytes as usize * block as usize];
            assert!(dequantize_blocks(ty, &data, &mut want));
            let mut subs = [IntSub::ZERO; 8];
            let mut got = Vec::new();
            for b in data.chunks_exact(bytes as usize) {
                let n = unpack_int(ty, b, &mut subs).unwrap();
                for s in &subs[..n] {
                    got.extend(
                        (0..32).map(|j| s.a * f32::from(s.w1[j]) + s.b * f32::from(s.w2[j])),
                    );
                }
            }
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 4.0 * f32::EPSILON * scale,
                    "{} element {i}: {g} vs {w}",
                    ty.name()
                );
            }
            checked += 1;
        }
        assert!(checked >= 8, "{checked} types checked");
    }

    /// The Q3_K scale unpacking equals ggml's word-wise formulation.
    #[test]
    fn q3k_scales_match_the_word_wise_unpacking() {
        let mut state = 7u32;
        for _ in 0..100 {
            let p: Vec<u8> = (0..12)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (state >> 24) as u8
                })
                .collect();
            let w =
                |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
            let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
            let (a0, a1, tmp) = (w(0), w(1), w(2));
            let aux = [
                (a0 & k2) | ((tmp & k1) << 4),
                (a1 & k2) | (((tmp >> 2) & k1) << 4),
                ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
            ];
            let want: Vec<i8> = aux
                .iter()
                .flat_map(|a| a.to_le_bytes())
                .map(|b| b as i8)
                .collect();
            assert_eq!(q3k_scales(&p).to_vec(), want);
        }
    }
}
