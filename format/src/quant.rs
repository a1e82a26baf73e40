//! Byte layout of the packed integer group types (`Q2G`, `Q3G`, `Q4G`,
//! `Q8G`): packing for writers and a scalar decoder that serves as the
//! reference for the runtime's dequant-dot kernels.
//!
//! A row of `cols` weights is split into groups of `group_size` columns (the
//! last may be shorter). A group is a 4-byte header — f16 scale, u8 zero
//! point, u8 reserved (0) — followed by its codes in sub-blocks of 32; the
//! last sub-block is padded with the zero point, so padding decodes to 0.
//! Weight = scale · (code − zero). Within a sub-block of codes c[0..32]:
//!
//! * 8-bit: byte `j` = `c[j]`;
//! * 4-bit: byte `j` (0..16) = `c[j] | c[j+16] << 4` — one AND and one shift give
//!   two 16-lane halves;
//! * 2-bit: byte `j` (0..8) = `c[j] | c[j+8] << 2 | c[j+16] << 4 | c[j+24] << 6`;
//! * 3-bit: the 2-bit layout of the low two bits (8 bytes), then a
//!   little-endian u32 whose bit `j` is bit 2 of `c[j]` (4 bytes).
//!
//! `Q4GM` has the 4-bit code layout with a header of two f16 values, scale
//! and minimum (weight = scale · code + min), so a GGUF `Q4_1` block is a
//! `Q4GM` group of 32 byte for byte.

use half::f16;

use crate::dtype::{sub_block_bytes, DType, GROUP_HEADER, SUB_BLOCK};

/// Pack one sub-block of ≤ 32 codes (padded with `pad`) into `out`.
pub fn pack_sub_block(bits: u32, codes: &[u8], pad: u8, out: &mut Vec<u8>) {
    let mut c = [pad; SUB_BLOCK];
    c[..codes.len()].copy_from_slice(codes);
    match bits {
        8 => out.extend_from_slice(&c),
        4 => out.extend((0..16).map(|j| (c[j] & 15) | (c[j + 16] & 15) << 4)),
        2 => out.extend((0..8).map(|j| {
            (c[j] & 3) | (c[j + 8] & 3) << 2 | (c[j + 16] & 3) << 4 | (c[j + 24] & 3) << 6
        })),
        3 => {
            out.extend((0..8).map(|j| {
                (c[j] & 3) | (c[j + 8] & 3) << 2 | (c[j + 16] & 3) << 4 | (c[j + 24] & 3) << 6
            }));
            let high = (0..32).fold(0u32, |acc, j| acc | (u32::from(c[j] >> 2) & 1) << j);
            out.extend_from_slice(&high.to_le_bytes());
        }
        _ => panic!("unsupported bit width {bits}"),
    }
}

/// Unpack one sub-block into 32 codes.
pub fn unpack_sub_block(bits: u32, b: &[u8], out: &mut [u8; SUB_BLOCK]) {
    match bits {
        8 => out.copy_from_slice(&b[..32]),
        4 => {
            for j in 0..16 {
                out[j] = b[j] & 15;
                out[j + 16] = b[j] >> 4;
            }
        }
        2 | 3 => {
            for j in 0..8 {
                out[j] = b[j] & 3;
                out[j + 8] = (b[j] >> 2) & 3;
                out[j + 16] = (b[j] >> 4) & 3;
                out[j + 24] = b[j] >> 6;
            }
            if bits == 3 {
                let high = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
                for (j, o) in out.iter_mut().enumerate() {
                    *o |= (((high >> j) & 1) as u8) << 2;
                }
            }
        }
        _ => panic!("unsupported bit width {bits}"),
    }
}

/// Pack one row: `codes[cols]`, per-group `scales` and `zeros`.
pub fn pack_row(
    bits: u32,
    group_size: usize,
    codes: &[u8],
    scales: &[f32],
    zeros: &[u8],
    out: &mut Vec<u8>,
) {
    for (g, chunk) in codes.chunks(group_size).enumerate() {
        out.extend_from_slice(&f16::from_f32(scales[g]).to_le_bytes());
        out.push(zeros[g]);
        out.push(0);
        for sub in chunk.chunks(SUB_BLOCK) {
            pack_sub_block(bits, sub, zeros[g], out);
        }
    }
}

/// Pack one `Q4GM` row: `codes[cols]` (0..=15), per-group `scales` and `mins`.
pub fn pack_row_q4gm(
    group_size: usize,
    codes: &[u8],
    scales: &[f32],
    mins: &[f32],
    out: &mut Vec<u8>,
) {
    for (g, chunk) in codes.chunks(group_size).enumerate() {
        out.extend_from_slice(&f16::from_f32(scales[g]).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(mins[g]).to_le_bytes());
        for sub in chunk.chunks(SUB_BLOCK) {
            pack_sub_block(4, sub, 0, out);
        }
    }
}

/// Pack one row as GGUF `Q5_0` blocks: `codes[cols]` (0..=31, `cols` a
/// multiple of 32) and one scale per block of 32, weight = scale · (code − 16).
/// A block: f16 scale, a little-endian u32 whose bit `j` is bit 4 of code
/// `j`, then byte `j` (0..16) = low nibbles of codes `j` and `j + 16`.
pub fn pack_row_q5_0(codes: &[u8], scales: &[f32], out: &mut Vec<u8>) {
    assert!(
        codes.len().is_multiple_of(32),
        "Q5_0 rows are whole blocks of 32"
    );
    for (c, &s) in codes.chunks_exact(32).zip(scales) {
        out.extend_from_slice(&f16::from_f32(s).to_le_bytes());
        let high = (0..32).fold(0u32, |acc, j| acc | (u32::from(c[j] >> 4) & 1) << j);
        out.extend_from_slice(&high.to_le_bytes());
        out.extend((0..16).map(|j| (c[j] & 15) | (c[j + 16] & 15) << 4));
    }
}

/// Decode one packed row of any packed type into `out[cols]`.
pub fn dequantize(dtype: DType, group_size: usize, row: &[u8], out: &mut [f32]) {
    if let Some(ty) = crate::gguf::GgmlType::of_block_dtype(dtype) {
        // The GGUF reference decoders (checked against the gguf package).
        assert!(crate::gguf_blocks::dequantize_blocks(ty, row, out));
        return;
    }
    match dtype {
        DType::Q4GM => dequantize_row_q4gm(group_size, row, out),
        d => dequantize_row(d.quant_bits().expect("a packed type"), group_size, row, out),
    }
}

/// Decode one `Q4GM` row into `out[cols]`.
pub fn dequantize_row_q4gm(group_size: usize, row: &[u8], out: &mut [f32]) {
    let mut p = 0;
    let mut codes = [0u8; SUB_BLOCK];
    for chunk in out.chunks_mut(group_size) {
        let scale = f16::from_le_bytes([row[p], row[p + 1]]).to_f32();
        let min = f16::from_le_bytes([row[p + 2], row[p + 3]]).to_f32();
        p += GROUP_HEADER;
        for sub in chunk.chunks_mut(SUB_BLOCK) {
            unpack_sub_block(4, &row[p..p + 16], &mut codes);
            p += 16;
            for (o, &c) in sub.iter_mut().zip(&codes) {
                *o = scale * f32::from(c) + min;
            }
        }
    }
}

/// Decode one packed row (integer zero points) into `out[cols]` (the scalar reference).
pub fn dequantize_row(bits: u32, group_size: usize, row: &[u8], out: &mut [f32]) {
    let sb = sub_block_bytes(bits);
    let mut p = 0;
    let mut codes = [0u8; SUB_BLOCK];
    for chunk in out.chunks_mut(group_size) {
        let scale = f16::from_le_bytes([row[p], row[p + 1]]).to_f32();
        let zero = f32::from(row[p + 2]);
        p += GROUP_HEADER;
        for sub in chunk.chunks_mut(SUB_BLOCK) {
            unpack_sub_block(bits, &row[p..p + sb], &mut codes);
            p += sb;
            for (o, &c) in sub.iter_mut().zip(&codes) {
                *o = scale * (f32::from(c) - zero);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::row_bytes;

    #[test]
    fn pack_unpack_round_trips_every_width_and_ragged_rows() {
        for bits in [2u32, 3, 4, 8] {
            let maxq = (1u32 << bits) - 1;
            for (cols, gs) in [
                (32usize, 32usize),
                (64, 32),
                (172, 32),
                (172, 64),
                (172, 172),
                (8, 8),
                (576, 128),
            ] {
                let codes: Vec<u8> = (0..cols)
                    .map(|i| ((i * 7 + 3) as u32 % (maxq + 1)) as u8)
                    .collect();
                let n_groups = cols.div_ceil(gs);
                let scales: Vec<f32> = (0..n_groups).map(|g| 0.5 + g as f32 * 0.25).collect();
                let zeros: Vec<u8> = (0..n_groups)
                    .map(|g| (g as u32 % (maxq + 1)) as u8)
                    .collect();
                let mut packed = Vec::new();
                pack_row(bits, gs, &codes, &scales, &zeros, &mut packed);
                assert_eq!(
                    packed.len(),
                    row_bytes(bits, cols, gs),
                    "bits {bits} cols {cols} gs {gs}"
                );
                let mut out = vec![0f32; cols];
                dequantize_row(bits, gs, &packed, &mut out);
                for (i, v) in out.iter().enumerate() {
                    let g = i / gs;
                    let want = scales[g] * (f32::from(codes[i]) - f32::from(zeros[g]));
                    assert_eq!(*v, want, "bits {bits} cols {cols} gs {gs} i {i}");
                }
            }
        }
    }

    #[test]
    fn q4gm_round_trips_with_ragged_tail() {
        let cols = 172;
        let codes: Vec<u8> = (0..cols).map(|i| (i * 5 % 16) as u8).collect();
        let (scales, mins) = ([0.5f32, 0.25], [-1.0f32, 2.0]);
        let mut packed = Vec::new();
        pack_row_q4gm(128, &codes, &scales, &mins, &mut packed);
        assert_eq!(packed.len(), row_bytes(4, cols, 128));
        let mut out = vec![0f32; cols];
        dequantize(DType::Q4GM, 128, &packed, &mut out);
        for (i, v) in out.iter().enumerate() {
            let g = i / 128;
            assert_eq!(*v, scales[g] * f32::from(codes[i]) + mins[g]);
        }
    }

    /// Packed Q5_0 blocks decode, through the GGUF reference decoder (itself
    /// checked against the gguf package), to scale · (code − 16).
    #[test]
    fn q5_0_blocks_decode_to_their_codes() {
        let cols = 96;
        let codes: Vec<u8> = (0..cols).map(|i| (i * 7 % 32) as u8).collect();
        let scales = [0.5f32, -0.25, 0.0];
        let mut packed = Vec::new();
        pack_row_q5_0(&codes, &scales, &mut packed);
        assert_eq!(packed.len(), 3 * 22);
        let mut out = vec![0f32; cols];
        dequantize(DType::Q5_0, 32, &packed, &mut out);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, scales[i / 32] * (f32::from(codes[i]) - 16.0), "{i}");
        }
    }

    #[test]
    fn q4_layout_is_low_then_high_nibbles() {
        let codes: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
        let mut out = Vec::new();
        pack_sub_block(4, &codes, 0, &mut out);
        assert_eq!(out[0], codes[0] | codes[16] << 4);
        assert_eq!(out[15], codes[15] | codes[31] << 4);
    }
}
