//! Writing GGUF v3 files: key–value metadata and tensors, laid out as
//! llama.cpp's `gguf.c` reads them (little-endian; tensor data at offsets
//! that are multiples of `general.alignment`, 32 unless set).
//!
//! Used for what nibble hands to llama.cpp users: importance matrices
//! (`nibble quantize --imatrix-out`) and the GGUF writer of the tests.
//! Tensors are given as raw bytes with their ggml type id, so any block
//! type can be written; the caller is responsible for the bytes matching
//! the type and shape (checked: the byte length).

use std::io::Write;

use crate::error::{FormatError, Result};
use crate::gguf::GgmlType;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrU32(Vec<u32>),
    ArrI32(Vec<i32>),
    ArrF32(Vec<f32>),
    ArrStr(Vec<String>),
    /// A value already encoded: its GGUF type id and payload (what a
    /// metadata entry carried over from another file holds).
    Raw {
        ty: u32,
        payload: Vec<u8>,
    },
}

/// GGUF's type ids (`gguf_type`).
mod ty {
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STR: u32 = 8;
    pub const ARR: u32 = 9;
    pub const U64: u32 = 10;
}

/// A tensor to write: `shape` outermost first (row-major, as nibble
/// stores it; GGUF's `ne` is written innermost first).
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    pub shape: Vec<u64>,
    /// ggml type id (0 = F32, 1 = F16, 2 = Q4_0, …).
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

impl GgufTensor {
    /// An F32 tensor.
    pub fn f32(name: &str, shape: &[u64], values: &[f32]) -> GgufTensor {
        GgufTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            ggml_type: 0,
            data: bytemuck::cast_slice(values).to_vec(),
        }
    }
}

const ALIGNMENT: u64 = 32;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    let arr = |out: &mut Vec<u8>, t: u32, n: usize| {
        out.extend_from_slice(&ty::ARR.to_le_bytes());
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        GgufValue::U32(x) => {
            out.extend_from_slice(&ty::U32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        GgufValue::I32(x) => {
            out.extend_from_slice(&ty::I32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        GgufValue::U64(x) => {
            out.extend_from_slice(&ty::U64.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        GgufValue::F32(x) => {
            out.extend_from_slice(&ty::F32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        GgufValue::Bool(x) => {
            out.extend_from_slice(&ty::BOOL.to_le_bytes());
            out.push(u8::from(*x));
        }
        GgufValue::Str(x) => {
            out.extend_from_slice(&ty::STR.to_le_bytes());
            put_str(out, x);
        }
        GgufValue::ArrU32(xs) => {
            arr(out, ty::U32, xs.len());
            xs.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        GgufValue::ArrI32(xs) => {
            arr(out, ty::I32, xs.len());
            xs.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        GgufValue::ArrF32(xs) => {
            arr(out, ty::F32, xs.len());
            xs.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        GgufValue::ArrStr(xs) => {
            arr(out, ty::STR, xs.len());
            xs.iter().for_each(|x| put_str(out, x));
        }
        GgufValue::Raw { ty, payload } => {
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(payload);
        }
    }
}

/// The byte length a ggml type needs for `shape`, where nibble knows the
/// type (`Some(None)`: rows not whole blocks).
fn expected_bytes(ggml_type: u32, shape: &[u64]) -> Option<Option<u64>> {
    let (block, bytes) = GgmlType::from_code(ggml_type)?.block();
    let n: u64 = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    let cols = *shape.last()?;
    Some((cols % block == 0).then(|| n / block * bytes))
}

/// Write a GGUF v3 file of `kv` and `tensors` to `out`. Refuses a tensor
/// whose bytes do not match its type and shape (where the type is known).
pub fn write_gguf(
    out: &mut impl Write,
    kv: &[(String, GgufValue)],
    tensors: &[GgufTensor],
) -> Result<()> {
    let mut head = b"GGUF".to_vec();
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut head, k);
        put_value(&mut head, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        if let Some(n) = expected_bytes(t.ggml_type, &t.shape) {
            if n != Some(t.data.len() as u64) {
                return Err(FormatError::ShapeMismatch {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: format!("ggml type {}", t.ggml_type),
                    expected: n.unwrap_or(0),
                    found: t.data.len() as u64,
                });
            }
        }
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    head.resize(
        (head.len() as u64).div_ceil(ALIGNMENT) as usize * ALIGNMENT as usize,
        0,
    );
    let io = |source| FormatError::Io {
        path: "GGUF output".into(),
        source,
    };
    out.write_all(&head).map_err(io)?;
    let zeros = [0u8; ALIGNMENT as usize];
    for t in tensors {
        out.write_all(&t.data).map_err(io)?;
        let pad = (ALIGNMENT - t.data.len() as u64 % ALIGNMENT) % ALIGNMENT;
        out.write_all(&zeros[..pad as usize]).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgmlType, GgufFile};

    /// What is written reads back through nibble's GGUF parser: every key,
    /// every tensor's shape, type and bytes.
    #[test]
    fn written_file_parses_back() {
        let kv = vec![
            (
                "general.architecture".to_string(),
                GgufValue::Str("llama".into()),
            ),
            ("a.u32".to_string(), GgufValue::U32(7)),
            ("a.f32".to_string(), GgufValue::F32(0.5)),
            ("a.bool".to_string(), GgufValue::Bool(true)),
            (
                "a.strs".to_string(),
                GgufValue::ArrStr(vec!["x".into(), "yz".into()]),
            ),
            ("a.i32s".to_string(), GgufValue::ArrI32(vec![-1, 2])),
        ];
        let t1 = GgufTensor::f32(
            "t.a",
            &[3, 5],
            &(0..15).map(|i| i as f32).collect::<Vec<_>>(),
        );
        let t2 = GgufTensor {
            name: "t.q".into(),
            shape: vec![2, 32],
            ggml_type: 8, // Q8_0: 34 bytes per 32
            data: (0..68u8).collect(),
        };
        let mut bytes = Vec::new();
        write_gguf(&mut bytes, &kv, &[t1.clone(), t2.clone()]).unwrap();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(g.get("a.u32").and_then(|v| v.as_u64()), Some(7));
        assert_eq!(g.get("a.f32").and_then(|v| v.as_f64()), Some(0.5));
        assert_eq!(
            g.get("general.architecture").and_then(|v| v.as_str()),
            Some("llama")
        );
        assert_eq!(g.string_array("a.strs").unwrap(), vec!["x", "yz"]);
        assert_eq!(g.get("a.i32s").and_then(|v| v.array_len()), Some(2));
        for t in [&t1, &t2] {
            let info = g.tensor(&t.name).unwrap();
            let ne: Vec<u64> = t.shape.iter().rev().copied().collect();
            assert_eq!(info.ne, ne, "{}", t.name);
            assert_eq!(Some(info.ggml_type), GgmlType::from_code(t.ggml_type));
            assert_eq!(info.data, &t.data[..]);
        }
        let bad = GgufTensor {
            data: vec![0; 67],
            ..t2
        };
        let err = write_gguf(&mut Vec::new(), &kv, &[bad]).unwrap_err();
        assert!(err.to_string().contains("t.q"), "{err}");
    }
}
