//! A quantized `.nib` written back as a GGUF file that llama.cpp runs.
//!
//! The metadata (architecture keys, tokenizer, chat template) is the
//! source GGUF's, carried over verbatim with `general.file_type` set; the
//! tensors are the `.nib`'s, in the source's order and under its names:
//!
//! | `.nib` tensor | GGUF type | bytes |
//! |---|---|---|
//! | `Q4G`, groups of 32, every zero point 8 | `Q4_0` | the group without bytes 2–3 (zero and reserved): f16 scale, then the same nibble layout |
//! | `Q4G`, groups of 32, any zero points | `Q4_1` | f16 scale, f16 min = −scale·zero, the same nibbles |
//! | `Q4GM`, groups of 32 | `Q4_1` | byte for byte |
//! | `Q8G`, groups of 32, every zero point 128 | `Q8_0` | f16 scale, codes − 128 as int8 |
//! | a GGUF block type (`Q5_0`, `Q4_K`, …) | itself | byte for byte |
//! | F32 / F16 / BF16, 1-D | itself | byte for byte |
//! | float 2-D (embedding / head left float) | [`FloatMatrices`] | llama.cpp's `Q8_0` rounding, or as stored |
//!
//! Rows of the llama family's q/k weights go back to llama.cpp's rotary
//! order. Layouts that need more than a rename (fused `attn_qkv`, Phi-3's
//! gate|up, GPT-2's transposed Conv1D) and act-order permutations (`.perm`,
//! `.fold`: GGUF has none) are refused by name.

use std::collections::HashMap;
use std::io::Write;

use half::f16;

use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::families::Transform;
use crate::gguf::{GgmlType, GgufFile};
use crate::gguf_write::{GgufTensor, GgufValue};
use crate::hparams::HParams;
use crate::nib::{NibView, TensorInfo};

/// What float matrices of the `.nib` (an embedding or head it left float)
/// become in the GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatMatrices {
    /// Their stored type (F32, F16 or BF16).
    AsStored,
    /// `Q8_0` by llama.cpp's rounding (`d = max|x| / 127`, codes rounded
    /// half away from zero), what `llama-quantize` gives a head whose width
    /// is not a multiple of 256.
    Q8_0,
}

/// `general.file_type` values (llama.cpp's `llama_ftype`).
pub mod file_type {
    pub const MOSTLY_Q4_0: u32 = 2;
    pub const MOSTLY_Q4_1: u32 = 3;
    pub const MOSTLY_Q8_0: u32 = 7;
    pub const MOSTLY_Q5_0: u32 = 8;
}

fn cannot(why: String) -> FormatError {
    FormatError::CannotExport { why }
}

/// A metadata value of a GGUF being read, re-encoded for writing.
fn carry(v: &crate::gguf::GgufValue<'_>) -> GgufValue {
    use crate::gguf::GgufValue as R;
    let (ty, payload): (u32, Vec<u8>) = match *v {
        R::U8(x) => (0, vec![x]),
        R::I8(x) => (1, x.to_le_bytes().to_vec()),
        R::U16(x) => (2, x.to_le_bytes().to_vec()),
        R::I16(x) => (3, x.to_le_bytes().to_vec()),
        R::U32(x) => (4, x.to_le_bytes().to_vec()),
        R::I32(x) => (5, x.to_le_bytes().to_vec()),
        R::F32(x) => (6, x.to_le_bytes().to_vec()),
        R::Bool(x) => (7, vec![u8::from(x)]),
        R::Str(s) => {
            let mut p = (s.len() as u64).to_le_bytes().to_vec();
            p.extend_from_slice(s.as_bytes());
            (8, p)
        }
        R::U64(x) => (10, x.to_le_bytes().to_vec()),
        R::I64(x) => (11, x.to_le_bytes().to_vec()),
        R::F64(x) => (12, x.to_le_bytes().to_vec()),
        R::Array {
            elem_type,
            count,
            raw,
        } => {
            let mut p = elem_type.to_le_bytes().to_vec();
            p.extend_from_slice(&count.to_le_bytes());
            p.extend_from_slice(raw);
            (9, p)
        }
    };
    GgufValue::Raw { ty, payload }
}

/// llama.cpp's `quantize_row_q8_0_ref` on one row (a multiple of 32 wide).
pub fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
}

/// One `.nib` tensor as GGUF bytes: (ggml type, bytes).
fn encode(t: &TensorInfo<'_>, floats: FloatMatrices) -> Result<(u32, Vec<u8>)> {
    let name = t.name;
    let groups_of_32 = || -> Result<()> {
        if t.quant_param != 32 {
            return Err(cannot(format!(
                "tensor '{name}' has groups of {}; GGUF's Q4_0/Q4_1/Q8_0 blocks hold 32 \
                 (quantize with --group-size 32)",
                t.quant_param
            )));
        }
        Ok(())
    };
    Ok(match t.dtype {
        DType::Q4G => {
            groups_of_32()?;
            let groups: Vec<&[u8]> = t.data.chunks_exact(20).collect();
            if groups.iter().all(|g| g[2] == 8) {
                let mut out = Vec::with_capacity(groups.len() * 18);
                for g in groups {
                    out.extend_from_slice(&g[..2]);
                    out.extend_from_slice(&g[4..]);
                }
                (2, out)
            } else {
                let mut out = Vec::with_capacity(groups.len() * 20);
                for g in groups {
                    let s = f16::from_le_bytes([g[0], g[1]]).to_f32();
                    out.extend_from_slice(&g[..2]);
                    out.extend_from_slice(&f16::from_f32(-s * f32::from(g[2])).to_le_bytes());
                    out.extend_from_slice(&g[4..]);
                }
                (3, out)
            }
        }
        DType::Q4GM => {
            groups_of_32()?;
            (3, t.data.to_vec())
        }
        DType::Q8G => {
            groups_of_32()?;
            let mut out = Vec::with_capacity(t.data.len() / 36 * 34);
            for g in t.data.chunks_exact(36) {
                if g[2] != 128 {
                    return Err(cannot(format!(
                        "tensor '{name}' is 8-bit with zero point {} (asymmetric); GGUF's Q8_0 \
                         is symmetric (quantize with --sym)",
                        g[2]
                    )));
                }
                out.extend_from_slice(&g[..2]);
                out.extend(g[4..].iter().map(|&c| c ^ 0x80));
            }
            (8, out)
        }
        DType::F32 | DType::F16 | DType::BF16 => {
            let code = match t.dtype {
                DType::F32 => 0,
                DType::F16 => 1,
                _ => 30,
            };
            if t.shape.len() == 2 && floats == FloatMatrices::Q8_0 && t.shape[1].is_multiple_of(32)
            {
                let x = crate::dtype::decode_f32(t.dtype, t.data).expect("a float type");
                let mut out = Vec::with_capacity(x.len() / 32 * 34);
                quantize_q8_0(&x, &mut out);
                (8, out)
            } else {
                (code, t.data.to_vec())
            }
        }
        d => match GgmlType::of_block_dtype(d) {
            Some(g) => (crate::gguf::GgmlType::code(g), t.data.to_vec()),
            None => {
                return Err(cannot(format!(
                    "tensor '{name}' is {d}, which has no GGUF block type (GGUF output holds \
                     4-bit groups of 32 as Q4_0/Q4_1 and 8-bit symmetric ones as Q8_0)"
                )))
            }
        },
    })
}

/// Write the quantized `nib` as a GGUF to `out`, with the metadata of
/// `source` (the GGUF the model was imported from) and `general.file_type`
/// = `ftype`.
pub fn export_gguf(
    nib: &NibView<'_>,
    source: &GgufFile<'_>,
    ftype: u32,
    floats: FloatMatrices,
    out: &mut impl Write,
) -> Result<()> {
    let (arch, _) = crate::gguf_arch::config_from_gguf(source)?;
    let hp = HParams::read(&nib.metadata)?;
    if let Some(t) = nib
        .tensors
        .iter()
        .find(|t| t.name.ends_with(".perm") || t.name.ends_with(".fold"))
    {
        return Err(cannot(format!(
            "'{}' is an act-order permutation, which GGUF cannot hold (quantize with \
             --act-order-groups or --no-act-order)",
            t.name
        )));
    }
    // The source's name for each tensor of the .nib.
    let mut by_gguf_name: HashMap<String, &TensorInfo<'_>> = HashMap::new();
    for t in &nib.tensors {
        if t.name.starts_with("lora.") {
            continue;
        }
        let (g, transform) = crate::gguf_arch::gguf_tensor(arch, t.name);
        if transform != Transform::Plain {
            return Err(cannot(format!(
                "architecture '{}' stores '{}' as part of '{g}' ({transform:?}); writing that \
                 layout back is not supported",
                arch.name, t.name
            )));
        }
        by_gguf_name.insert(g, t);
    }
    let mut tensors = Vec::with_capacity(source.tensors.len());
    for s in &source.tensors {
        let shape: Vec<u64> = s.ne.iter().rev().copied().collect();
        let Some(t) = by_gguf_name.remove(s.name) else {
            // Not in the .nib (nothing nibble reads): carried over as it was.
            tensors.push(GgufTensor {
                name: s.name.to_string(),
                shape,
                ggml_type: s.ggml_type.code(),
                data: s.data.to_vec(),
            });
            continue;
        };
        if t.shape != shape {
            return Err(cannot(format!(
                "tensor '{}' is {:?} in the model but {shape:?} in the source GGUF",
                t.name, t.shape
            )));
        }
        let (ggml_type, mut data) = encode(t, floats)?;
        let heads = if !arch.permuted_qk {
            None
        } else if t.name.ends_with("attn_q.weight") {
            Some(hp.n_head)
        } else if t.name.ends_with("attn_k.weight") {
            Some(hp.n_head_kv)
        } else {
            None
        };
        if let Some(n_heads) = heads {
            let row_bytes = data.len() / shape[0] as usize;
            data = crate::import::permute_rotary_rows(&data, n_heads, hp.head_dim, row_bytes);
        }
        tensors.push(GgufTensor {
            name: s.name.to_string(),
            shape,
            ggml_type,
            data,
        });
    }
    if let Some(name) = by_gguf_name.keys().next() {
        return Err(cannot(format!(
            "tensor '{name}' of the model has no place in the source GGUF"
        )));
    }
    let mut kv: Vec<(String, GgufValue)> = source
        .kv
        .iter()
        .filter(|(k, _)| {
            !matches!(
                *k,
                "general.file_type" | "general.quantization_version" | "general.alignment"
            )
        })
        .map(|(k, v)| (k.to_string(), carry(v)))
        .collect();
    kv.push(("general.file_type".into(), GgufValue::U32(ftype)));
    kv.push(("general.quantization_version".into(), GgufValue::U32(2)));
    crate::gguf_write::write_gguf(out, &kv, &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_rows_round_trip_through_the_import() {
        let (heads, hd, cols) = (3, 8, 2);
        let w: Vec<u8> = (0..(heads * hd * cols) as u8).collect();
        let there = crate::import::permute_rotary_rows(&w, heads, hd, cols);
        let back = crate::import::unpermute_rotary_rows(&there, heads, hd, cols);
        assert_eq!(back, w);
        assert_ne!(there, w);
    }

    #[test]
    fn q8_0_follows_llama_cpp() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.5) * 0.1).collect();
        let mut out = Vec::new();
        quantize_q8_0(&x, &mut out);
        assert_eq!(out.len(), 68);
        let mut back = vec![0f32; 64];
        assert!(crate::gguf_blocks::dequantize_blocks(
            GgmlType::Q8_0,
            &out,
            &mut back
        ));
        let d = f16::from_le_bytes([out[0], out[1]]).to_f32();
        assert!((d - 2.05 / 127.0).abs() < 1e-5);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 0.5 * 4.35 / 127.0 + 1e-4, "{a} {b}");
        }
        // The extreme value is exactly ±127 codes.
        assert_eq!(out[2] as i8, -127);
    }
}
