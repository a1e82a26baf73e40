//! Packing of GGUF's K-quant super-blocks (`Q3_K`, `Q4_K`, `Q5_K`,
//! `Q6_K`) for writers: the quantizer chooses the integer codes and the
//! per-sub-block integer scales; these functions only lay the bytes out as
//! llama.cpp's `block_q3_K` … `block_q6_K` (decoded by
//! [`crate::gguf_blocks`]).
//!
//! * `Q4_K` (144 bytes per 256 weights): f16 `d`, f16 `dmin`, 12 bytes of
//!   eight 6-bit scales and eight 6-bit minimums, 128 bytes of 4-bit codes.
//!   Weight `i` of sub-block `j` (32 wide) = `d·sc[j]·q − dmin·m[j]`.
//!   Code bytes: 64 weights per 32 bytes, the first 32 in the low nibbles.
//! * `Q5_K` (176 bytes): as `Q4_K` with 5-bit codes, the fifth bits in
//!   32 bytes (`qh`) before the low nibbles: bit `2n` of byte `l` is that of
//!   weight `64n + l`, bit `2n + 1` that of weight `64n + 32 + l`.
//! * `Q3_K` (110 bytes): high bits (32 bytes), 2-bit low codes (64 bytes),
//!   sixteen 6-bit scales biased by 32 (12 bytes), f16 `d`. Weight `i` =
//!   `d·(sc[i/16] − 32)·(q − 4)`, `q` in 0..=7; weight `128n + 32j + l`
//!   keeps its low bits at shift `2j` of byte `32n + l` and its high bit as
//!   bit `4n + j` of byte `l`.
//! * `Q6_K` (210 bytes per 256 weights): low 4 bits (128 bytes), high 2 bits
//!   (64 bytes), sixteen int8 scales, f16 `d`. Weight `i` =
//!   `d·sc[i/16]·(q − 32)`, `q` in 0..=63.

use half::f16;

/// Weights per super-block.
pub const QK_K: usize = 256;

/// Super-block scales of one `Q4_K` or `Q5_K` block: `d`, `dmin`
/// (f16-representable), and the 6-bit sub-block scales and minimums.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Q4kScales {
    pub d: f32,
    pub dmin: f32,
    pub sc: [u8; 8],
    pub m: [u8; 8],
}

/// The 12 bytes holding eight 6-bit scales and minimums (the inverse of
/// [`crate::gguf_blocks::scale_min_k4`]): sub-blocks 0–3 in the low 6 bits
/// of bytes 0–3 (scales) and 4–7 (minimums); sub-blocks 4–7 as nibbles of
/// bytes 8–11 with their top two bits in the spare bits of bytes 0–7.
fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        debug_assert!(sc[j] < 64 && m[j] < 64);
        if j < 4 {
            q[j] |= sc[j] & 63;
            q[j + 4] |= m[j] & 63;
        } else {
            q[j + 4] = (sc[j] & 0xf) | ((m[j] & 0xf) << 4);
            q[j - 4] |= (sc[j] >> 4) << 6;
            q[j] |= (m[j] >> 4) << 6;
        }
    }
    q
}

/// Pack one row as `Q4_K` blocks: `codes[cols]` in 0..=15 (`cols` a multiple
/// of 256) and one [`Q4kScales`] per super-block.
pub fn pack_row_q4_k(codes: &[u8], scales: &[Q4kScales], out: &mut Vec<u8>) {
    assert!(
        codes.len().is_multiple_of(QK_K) && codes.len() / QK_K == scales.len(),
        "Q4_K rows are whole super-blocks of 256, one scale set each"
    );
    for (c, s) in codes.chunks_exact(QK_K).zip(scales) {
        out.extend_from_slice(&f16::from_f32(s.d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(s.dmin).to_le_bytes());
        out.extend_from_slice(&pack_scales_k4(&s.sc, &s.m));
        for c64 in c.chunks_exact(64) {
            out.extend((0..32).map(|l| (c64[l] & 15) | (c64[l + 32] & 15) << 4));
        }
    }
}

/// Pack one row as `Q5_K` blocks: `codes[cols]` in 0..=31 (`cols` a multiple
/// of 256) and one [`Q4kScales`] per super-block.
pub fn pack_row_q5_k(codes: &[u8], scales: &[Q4kScales], out: &mut Vec<u8>) {
    assert!(
        codes.len().is_multiple_of(QK_K) && codes.len() / QK_K == scales.len(),
        "Q5_K rows are whole super-blocks of 256, one scale set each"
    );
    for (c, s) in codes.chunks_exact(QK_K).zip(scales) {
        out.extend_from_slice(&f16::from_f32(s.d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(s.dmin).to_le_bytes());
        out.extend_from_slice(&pack_scales_k4(&s.sc, &s.m));
        let mut qh = [0u8; 32];
        for (n, c64) in c.chunks_exact(64).enumerate() {
            for (l, h) in qh.iter_mut().enumerate() {
                *h |= (c64[l] >> 4 & 1) << (2 * n) | (c64[l + 32] >> 4 & 1) << (2 * n + 1);
            }
        }
        out.extend_from_slice(&qh);
        for c64 in c.chunks_exact(64) {
            out.extend((0..32).map(|l| (c64[l] & 15) | (c64[l + 32] & 15) << 4));
        }
    }
}

/// Pack one row as `Q3_K` blocks: `codes[cols]` in 0..=7 (`cols` a multiple
/// of 256), sixteen scales in −32..=31 and one f16-representable `d` per
/// super-block.
pub fn pack_row_q3_k(codes: &[u8], scales: &[[i8; 16]], d: &[f32], out: &mut Vec<u8>) {
    assert!(
        codes.len().is_multiple_of(QK_K)
            && codes.len() / QK_K == scales.len()
            && scales.len() == d.len(),
        "Q3_K rows are whole super-blocks of 256, one scale set each"
    );
    for ((c, sc), &d) in codes.chunks_exact(QK_K).zip(scales).zip(d) {
        let (mut hmask, mut qs, mut packed) = ([0u8; 32], [0u8; 64], [0u8; 12]);
        for n in 0..2 {
            for j in 0..4 {
                for l in 0..32 {
                    let q = c[128 * n + 32 * j + l];
                    qs[32 * n + l] |= (q & 3) << (2 * j);
                    hmask[l] |= (q >> 2 & 1) << (4 * n + j);
                }
            }
        }
        for (i, &s) in sc.iter().enumerate() {
            debug_assert!((-32..32).contains(&s));
            let biased = (i16::from(s) + 32) as u8;
            if i < 8 {
                packed[i] |= biased & 0xf;
            } else {
                packed[i - 8] |= (biased & 0xf) << 4;
            }
            packed[8 + i % 4] |= (biased >> 4 & 3) << (2 * (i / 4));
        }
        out.extend_from_slice(&hmask);
        out.extend_from_slice(&qs);
        out.extend_from_slice(&packed);
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    }
}

/// Pack one row as `Q6_K` blocks: `codes[cols]` in 0..=63 (`cols` a
/// multiple of 256), sixteen int8 scales and one f16-representable `d` per
/// super-block.
pub fn pack_row_q6_k(codes: &[u8], scales: &[[i8; 16]], d: &[f32], out: &mut Vec<u8>) {
    assert!(
        codes.len().is_multiple_of(QK_K)
            && codes.len() / QK_K == scales.len()
            && scales.len() == d.len(),
        "Q6_K rows are whole super-blocks of 256, one scale set each"
    );
    for ((c, sc), &d) in codes.chunks_exact(QK_K).zip(scales).zip(d) {
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for n in 0..2 {
            let c = &c[128 * n..128 * n + 128];
            for l in 0..32 {
                let q = [c[l], c[l + 32], c[l + 64], c[l + 96]];
                ql[64 * n + l] = (q[0] & 0xf) | (q[2] & 0xf) << 4;
                ql[64 * n + l + 32] = (q[1] & 0xf) | (q[3] & 0xf) << 4;
                qh[32 * n + l] = (q[0] >> 4 & 3)
                    | (q[1] >> 4 & 3) << 2
                    | (q[2] >> 4 & 3) << 4
                    | (q[3] >> 4 & 3) << 6;
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;
    use crate::gguf_blocks::dequantize_blocks;

    /// Every 6-bit scale and minimum at every position, and every code,
    /// decode through the GGUF reference decoder (checked against the gguf
    /// package) to d·sc·q − dmin·m, for Q4_K and Q5_K.
    #[test]
    fn q4_k_and_q5_k_blocks_decode_to_their_codes_and_scales() {
        let cols = 2 * QK_K;
        let scales: Vec<Q4kScales> = (0..2)
            .map(|b| Q4kScales {
                d: 0.5 + b as f32,
                dmin: -0.25 * (b as f32 + 1.0),
                sc: std::array::from_fn(|j| (j * 9 + 63 * b) as u8 % 64),
                m: std::array::from_fn(|j| (63 - j * 8 - b) as u8 % 64),
            })
            .collect();
        type Pack = fn(&[u8], &[Q4kScales], &mut Vec<u8>);
        let kinds: [(Pack, GgmlType, usize, usize); 2] = [
            (pack_row_q4_k, GgmlType::Q4K, 16, 144),
            (pack_row_q5_k, GgmlType::Q5K, 32, 176),
        ];
        for (pack, ty, levels, bytes) in kinds {
            let codes: Vec<u8> = (0..cols)
                .map(|i| ((i * 11 + i / 64) % levels) as u8)
                .collect();
            let mut packed = Vec::new();
            pack(&codes, &scales, &mut packed);
            assert_eq!(packed.len(), 2 * bytes);
            let mut out = vec![0f32; cols];
            assert!(dequantize_blocks(ty, &packed, &mut out));
            for (i, v) in out.iter().enumerate() {
                let (s, j) = (&scales[i / QK_K], i % QK_K / 32);
                let want =
                    s.d * f32::from(s.sc[j]) * f32::from(codes[i]) - s.dmin * f32::from(s.m[j]);
                assert_eq!(*v, want, "{} {i}", ty.name());
            }
        }
    }

    /// Q3_K (scales −32..=31, codes 0..=7) and Q6_K (int8 scales, codes
    /// 0..=63) decode to d·sc·(q − offset).
    #[test]
    fn q3_k_and_q6_k_blocks_decode_to_their_codes_and_scales() {
        let cols = 2 * QK_K;
        type Pack = fn(&[u8], &[[i8; 16]], &[f32], &mut Vec<u8>);
        let kinds: [(Pack, GgmlType, usize, i32, i32, usize); 2] = [
            (pack_row_q3_k, GgmlType::Q3K, 8, 4, -32, 110),
            (pack_row_q6_k, GgmlType::Q6K, 64, 17, -128, 210),
        ];
        for (pack, ty, levels, step, lo, bytes) in kinds {
            let codes: Vec<u8> = (0..cols)
                .map(|i| ((i * 5 + i / 32) % levels) as u8)
                .collect();
            let scales: Vec<[i8; 16]> = (0..2)
                .map(|b| std::array::from_fn(|j| (j as i32 * step + lo + b * 3) as i8))
                .collect();
            let d = [0.5f32, -0.125];
            let mut packed = Vec::new();
            pack(&codes, &scales, &d, &mut packed);
            assert_eq!(packed.len(), 2 * bytes);
            let mut out = vec![0f32; cols];
            assert!(dequantize_blocks(ty, &packed, &mut out));
            let offset = (levels / 2) as f32;
            for (i, v) in out.iter().enumerate() {
                let (b, j) = (i / QK_K, i % QK_K / 16);
                let want = d[b] * f32::from(scales[b][j]) * (f32::from(codes[i]) - offset);
                assert_eq!(*v, want, "{} {i}", ty.name());
            }
        }
    }
}
