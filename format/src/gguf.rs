//! A zero-copy, validating GGUF (v2/v3) parser and dequantizers.
//!
//! GGUF is llama.cpp's container. We read it only to import models; the
//! parser is as defensive as the `.nib` reader (checked arithmetic, caps,
//! bounds, alignment, UTF-8) because GGUF files come from the internet.
//! Shapes are reported in GGUF's order (`ne[0]` is the contiguous dimension).

use std::collections::HashSet;

use crate::bytes::{add, align_up, mul, Cursor};
use crate::error::{FormatError, Result};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const MAX_TENSORS: u64 = 65536;
pub const MAX_KV: u64 = 65536;
pub const MAX_DIMS: u32 = 4;
pub const MAX_ARRAY_LEN: u64 = 1 << 26;

/// ggml tensor types nibble knows the size of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ4NL,
    IQ4XS,
    BF16,
}

impl GgmlType {
    pub fn from_code(code: u32) -> Option<GgmlType> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            20 => GgmlType::IQ4NL,
            23 => GgmlType::IQ4XS,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The type's id in a GGUF file (the inverse of [`GgmlType::from_code`]).
    pub fn code(self) -> u32 {
        (0..=30)
            .find(|&c| GgmlType::from_code(c) == Some(self))
            .expect("every type has a code")
    }

    /// (elements per block, bytes per block)
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q8_1 => (32, 36),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Q8K => (256, 292),
            GgmlType::IQ4NL => (32, 18),
            GgmlType::IQ4XS => (256, 136),
        }
    }

    /// The `.nib` type that stores this block type verbatim, if any.
    pub fn block_dtype(self) -> Option<crate::DType> {
        use crate::DType;
        Some(match self {
            GgmlType::Q5_0 => DType::Q5_0,
            GgmlType::Q2K => DType::Q2K,
            GgmlType::Q3K => DType::Q3K,
            GgmlType::Q4K => DType::Q4K,
            GgmlType::Q5K => DType::Q5K,
            GgmlType::Q6K => DType::Q6K,
            GgmlType::IQ4NL => DType::IQ4NL,
            GgmlType::IQ4XS => DType::IQ4XS,
            _ => return None,
        })
    }

    /// The inverse of [`GgmlType::block_dtype`].
    pub fn of_block_dtype(dtype: crate::DType) -> Option<GgmlType> {
        [
            GgmlType::Q5_0,
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::IQ4NL,
            GgmlType::IQ4XS,
        ]
        .into_iter()
        .find(|t| t.block_dtype() == Some(dtype))
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::IQ4NL => "IQ4_NL",
            GgmlType::IQ4XS => "IQ4_XS",
            GgmlType::BF16 => "BF16",
        }
    }
}

/// A GGUF metadata value, borrowing strings and arrays from the file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GgufValue<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(&'a str),
    U64(u64),
    I64(i64),
    F64(f64),
    /// An array of scalars or strings (validated at parse time).
    Array {
        elem_type: u32,
        count: u64,
        raw: &'a [u8],
    },
}

impl<'a> GgufValue<'a> {
    /// Integer value of any integer type (and bool), if non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Number of elements for arrays.
    pub fn array_len(&self) -> Option<u64> {
        match *self {
            GgufValue::Array { count, .. } => Some(count),
            _ => None,
        }
    }
}

/// One tensor info, with its bytes borrowed from the file.
#[derive(Clone, Debug)]
pub struct GgufTensor<'a> {
    pub name: &'a str,
    pub ggml_type: GgmlType,
    /// GGUF order: `ne[0]` is contiguous (a linear weight is `[n_in, n_out]`).
    pub ne: Vec<u64>,
    pub data: &'a [u8],
}

impl GgufTensor<'_> {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// A validated, zero-copy view of a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufFile<'a> {
    pub version: u32,
    pub kv: Vec<(&'a str, GgufValue<'a>)>,
    pub tensors: Vec<GgufTensor<'a>>,
    pub alignment: u64,
}

fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn read_string<'a>(c: &mut Cursor<'a>, what: &dyn Fn() -> String) -> Result<&'a str> {
    let n = c.u64(what)?;
    c.str(n, what)
}

fn read_value<'a>(c: &mut Cursor<'a>, ty: u32, key: &str) -> Result<GgufValue<'a>> {
    let what = || format!("GGUF value of '{key}'");
    Ok(match ty {
        0 => GgufValue::U8(c.u8(&what)?),
        1 => GgufValue::I8(c.u8(&what)? as i8),
        2 => GgufValue::U16(c.u16(&what)?),
        3 => GgufValue::I16(c.u16(&what)? as i16),
        4 => GgufValue::U32(c.u32(&what)?),
        5 => GgufValue::I32(c.u32(&what)? as i32),
        6 => GgufValue::F32(f32::from_bits(c.u32(&what)?)),
        7 => match c.u8(&what)? {
            0 => GgufValue::Bool(false),
            1 => GgufValue::Bool(true),
            b => {
                return Err(FormatError::BadValue {
                    key: key.into(),
                    why: format!("bool byte {b}"),
                })
            }
        },
        8 => GgufValue::Str(read_string(c, &what)?),
        9 => {
            let elem_type = c.u32(&what)?;
            let count = c.u64(&what)?;
            if count > MAX_ARRAY_LEN {
                return Err(FormatError::CountTooLarge {
                    what: format!("GGUF array '{key}'"),
                    count,
                    max: MAX_ARRAY_LEN,
                });
            }
            let start = c.pos();
            if let Some(sz) = scalar_size(elem_type) {
                c.take(mul(count, sz, &what)?, &what)?;
            } else if elem_type == 8 {
                for _ in 0..count {
                    read_string(c, &what)?;
                }
            } else {
                return Err(FormatError::UnknownValueType {
                    key: key.into(),
                    code: elem_type,
                });
            }
            let end = c.pos();
            // Re-borrow the validated range from a fresh cursor view.
            let raw = c.raw_range(start, end);
            GgufValue::Array {
                elem_type,
                count,
                raw,
            }
        }
        10 => GgufValue::U64(c.u64(&what)?),
        11 => GgufValue::I64(c.u64(&what)? as i64),
        12 => GgufValue::F64(f64::from_bits(c.u64(&what)?)),
        code => {
            return Err(FormatError::UnknownValueType {
                key: key.into(),
                code,
            })
        }
    })
}

impl<'a> GgufFile<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<GgufFile<'a>> {
        if cfg!(target_endian = "big") {
            return Err(FormatError::BigEndianHost);
        }
        let mut c = Cursor::new(bytes, 0);
        let magic = c.take(4, &|| "GGUF magic".into())?;
        if magic != GGUF_MAGIC {
            return Err(FormatError::BadMagic {
                expected: "GGUF",
                found: magic.to_vec(),
            });
        }
        let version = c.u32(&|| "GGUF version".into())?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion {
                what: "GGUF",
                found: version,
                supported: "2 and 3",
            });
        }
        let n_tensors = c.u64(&|| "GGUF tensor count".into())?;
        let n_kv = c.u64(&|| "GGUF metadata count".into())?;
        if n_tensors > MAX_TENSORS {
            return Err(FormatError::CountTooLarge {
                what: "GGUF tensor".into(),
                count: n_tensors,
                max: MAX_TENSORS,
            });
        }
        if n_kv > MAX_KV {
            return Err(FormatError::CountTooLarge {
                what: "GGUF metadata entry".into(),
                count: n_kv,
                max: MAX_KV,
            });
        }
        let mut kv = Vec::new();
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let key = read_string(&mut c, &|| format!("GGUF metadata key {i}"))?;
            let ty = c.u32(&|| format!("GGUF type of '{key}'"))?;
            let v = read_value(&mut c, ty, key)?;
            if !keys.insert(key) {
                return Err(FormatError::Duplicate {
                    what: "GGUF metadata key",
                    name: key.into(),
                });
            }
            kv.push((key, v));
        }
        let alignment = match kv.iter().find(|(k, _)| *k == "general.alignment") {
            None => 32,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(FormatError::BadValue {
                        key: "general.alignment".into(),
                        why: format!("{v:?} is not a power of two ≤ 65536"),
                    })
                }
            },
        };
        struct Info<'a> {
            name: &'a str,
            ty: GgmlType,
            ne: Vec<u64>,
            offset: u64,
            nbytes: u64,
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        let mut names = HashSet::new();
        for i in 0..n_tensors {
            let name = read_string(&mut c, &|| format!("GGUF tensor {i} name"))?;
            let w = || format!("GGUF tensor '{name}' info");
            let n_dims = c.u32(&w)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(FormatError::BadShape {
                    name: name.into(),
                    shape: vec![],
                    why: format!("{n_dims} dimensions"),
                });
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(c.u64(&w)?);
            }
            let code = c.u32(&w)?;
            let ty = GgmlType::from_code(code).ok_or_else(|| FormatError::UnknownDtype {
                name: name.into(),
                code,
            })?;
            let offset = c.u64(&w)?;
            if ne.contains(&0) {
                return Err(FormatError::BadShape {
                    name: name.into(),
                    shape: ne,
                    why: "zero-sized dimension".into(),
                });
            }
            let mut n = 1u64;
            for &d in &ne {
                n = mul(n, d, &w)?;
            }
            let (blk, blk_bytes) = ty.block();
            if ne[0] % blk != 0 {
                return Err(FormatError::BadShape {
                    name: name.into(),
                    shape: ne,
                    why: format!(
                        "row length not a multiple of the {} block ({blk})",
                        ty.name()
                    ),
                });
            }
            let nbytes = mul(n / blk, blk_bytes, &w)?;
            if offset % alignment != 0 {
                return Err(FormatError::Misaligned {
                    what: format!("GGUF tensor '{name}'"),
                    offset,
                    align: alignment,
                });
            }
            if !names.insert(name) {
                return Err(FormatError::Duplicate {
                    what: "GGUF tensor name",
                    name: name.into(),
                });
            }
            infos.push(Info {
                name,
                ty,
                ne,
                offset,
                nbytes,
            });
        }
        let data_start = align_up(c.pos() as u64, alignment).ok_or(FormatError::BadValue {
            key: "GGUF data offset".into(),
            why: "overflow".into(),
        })?;
        let file_len = bytes.len() as u64;
        // A file cut short (an interrupted download) ends before its last
        // tensor: say so once, with the sizes, rather than naming a tensor.
        let need = infos
            .iter()
            .filter_map(|i| data_start.checked_add(i.offset)?.checked_add(i.nbytes))
            .max()
            .unwrap_or(data_start);
        if need > file_len {
            return Err(FormatError::Truncated {
                what: format!(
                    "the tensor data ({} tensors; the file is incomplete, e.g. an interrupted download)",
                    infos.len()
                ),
                offset: 0,
                need,
                have: file_len,
            });
        }
        let mut tensors = Vec::with_capacity(infos.len());
        for info in &infos {
            let w = || format!("GGUF tensor '{}'", info.name);
            let start = add(data_start, info.offset, &w)?;
            let end = add(start, info.nbytes, &w)?;
            if end > file_len {
                return Err(FormatError::OutOfBounds {
                    what: w(),
                    offset: start,
                    len: info.nbytes,
                    limit: file_len,
                });
            }
            tensors.push(GgufTensor {
                name: info.name,
                ggml_type: info.ty,
                ne: info.ne.clone(),
                data: &bytes[start as usize..end as usize],
            });
        }
        let mut order: Vec<usize> = (0..infos.len()).collect();
        order.sort_by_key(|&i| infos[i].offset);
        for p in order.windows(2) {
            let (a, b) = (&infos[p[0]], &infos[p[1]]);
            if a.offset + a.nbytes > b.offset {
                return Err(FormatError::Overlap {
                    a: format!("GGUF tensor '{}'", a.name),
                    b: format!("GGUF tensor '{}'", b.name),
                });
            }
        }
        Ok(GgufFile {
            version,
            kv,
            tensors,
            alignment,
        })
    }

    pub fn get(&self, key: &str) -> Option<GgufValue<'a>> {
        self.kv.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The strings of a string-array value (e.g. `tokenizer.ggml.tokens`).
    pub fn string_array(&self, key: &str) -> Option<Vec<&'a str>> {
        match self.get(key)? {
            GgufValue::Array {
                elem_type: 8,
                count,
                raw,
            } => {
                let mut c = Cursor::new(raw, 0);
                let mut out = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    // Validated at parse time, so this cannot fail.
                    out.push(read_string(&mut c, &|| key.into()).ok()?);
                }
                Some(out)
            }
            _ => None,
        }
    }
}

/// Dequantize a whole tensor into `out` (`out.len()` = element count).
pub fn dequantize(t: &GgufTensor<'_>, out: &mut [f32]) -> Result<()> {
    let n = t.n_elements();
    if out.len() as u64 != n {
        return Err(FormatError::BadValue {
            key: t.name.into(),
            why: format!("output has {} elements, tensor {n}", out.len()),
        });
    }
    if !crate::gguf_blocks::dequantize_blocks(t.ggml_type, t.data, out) {
        return Err(FormatError::UnsupportedTensorType {
            name: t.name.into(),
            what: format!("{} (no decoder in nibble)", t.ggml_type.name()),
        });
    }
    Ok(())
}

/// Transcode a 2-D tensor of GGUF `Q4_0`, `Q4_1` or `Q8_0` blocks into
/// nibble's packed groups of 32, losslessly (every weight decodes to the
/// same f32 as [`dequantize`]): `Q4_0` → `Q4G` with zero point 8 (the codes
/// and their nibble order are the same), `Q4_1` → `Q4GM` (byte for byte),
/// `Q8_0` → `Q8G` with zero point 128 (codes shifted by 128). The other
/// block types nibble runs natively (`Q5_0`, K-quants, IQ4) are kept verbatim
/// as their [`GgmlType::block_dtype`]. Returns the type and the bytes in
/// nibble's row layout, or `None` for other types.
pub fn transcode_blocks(t: &GgufTensor<'_>) -> Option<(crate::DType, Vec<u8>)> {
    use crate::DType;
    if let Some(dtype) = t.ggml_type.block_dtype() {
        // Stored verbatim: the kernels run llama.cpp's own block layout.
        let (block, _) = dtype.gguf_block()?;
        return (t.ne.len() == 2 && t.ne[0].is_multiple_of(block as u64))
            .then(|| (dtype, t.data.to_vec()));
    }
    let (block, bytes) = t.ggml_type.block();
    if t.ne.len() != 2 || block != 32 || !t.ne[0].is_multiple_of(32) {
        return None;
    }
    let n_blocks = t.data.len() / bytes as usize;
    let mut out = Vec::with_capacity(n_blocks * (4 + 32));
    let dtype = match t.ggml_type {
        GgmlType::Q4_0 => {
            for b in t.data.chunks_exact(18) {
                out.extend_from_slice(&[b[0], b[1], 8, 0]);
                out.extend_from_slice(&b[2..18]);
            }
            DType::Q4G
        }
        GgmlType::Q4_1 => {
            out.extend_from_slice(t.data);
            DType::Q4GM
        }
        GgmlType::Q8_0 => {
            for b in t.data.chunks_exact(34) {
                out.extend_from_slice(&[b[0], b[1], 128, 0]);
                out.extend(b[2..34].iter().map(|&q| (q as i8 as i16 + 128) as u8));
            }
            DType::Q8G
        }
        _ => return None,
    };
    Some((dtype, out))
}
