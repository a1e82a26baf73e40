//! The `.nib` container: a zero-copy reader over `&[u8]` and a streaming writer.
//!
//! Layout (all integers little-endian; `FORMAT.md` describes every byte):
//!
//! ```text
//! [header 64 B][metadata section][pad to 64][data section: tensors, each 64-aligned][directory]
//! ```
//!
//! The directory comes last so the writer can stream tensor data without
//! knowing it in advance; the header, rewritten at the end, points at all
//! three sections. The reader validates everything (bounds, overlaps,
//! alignment, counts, UTF-8, dtypes, shape × dtype = length) with checked
//! arithmetic before handing out a view, and never reads tensor bytes:
//! checksums are verified on demand (`NibView::verify_checksums`).

use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};

use crate::bytes::{add, align_up, mul, Cursor};
use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// File magic: PNG-style, so text-mode transfers and truncation are detected.
pub const MAGIC: [u8; 8] = *b"\x89NIB\r\n\x1a\n";
/// The format version this build writes (it reads 1 and 2).
pub const VERSION: u32 = 2;
/// Header length in bytes of version 2: version 1's 64 bytes, then the
/// CRC-32 of the metadata section and of the tensor directory.
pub const HEADER_LEN: u64 = 72;
/// Header length in bytes of version 1 (no section checksums).
pub const HEADER_LEN_V1: u64 = 64;
/// Alignment of the data section and of every tensor, in bytes.
pub const ALIGN: u64 = 64;

/// Caps that bound the work and memory a hostile file can cause.
pub const MAX_META_ENTRIES: u64 = 4096;
pub const MAX_KEY_LEN: u64 = 256;
pub const MAX_TENSORS: u64 = 65536;
pub const MAX_NAME_LEN: u64 = 512;
pub const MAX_DIMS: u64 = 4;
pub const MAX_ARRAY_LEN: u64 = 1 << 24;

/// A metadata value. Strings, byte blobs and arrays borrow from the file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(&'a str),
    Bytes(&'a [u8]),
    /// Raw little-endian u64 array (length is a multiple of 8).
    U64Array(&'a [u8]),
}

impl Value<'_> {
    pub fn type_code(&self) -> u8 {
        match self {
            Value::U64(_) => 1,
            Value::I64(_) => 2,
            Value::F64(_) => 3,
            Value::Bool(_) => 4,
            Value::Str(_) => 5,
            Value::Bytes(_) => 6,
            Value::U64Array(_) => 7,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::U64Array(_) => "u64 array",
        }
    }

    /// Iterate a `U64Array`'s elements (empty for other types).
    pub fn u64_array(&self) -> impl Iterator<Item = u64> + '_ {
        let raw: &[u8] = match self {
            Value::U64Array(raw) => raw,
            _ => &[],
        };
        raw.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("chunks_exact(8)")))
    }
}

/// Parsed metadata: key/value pairs in file order, keys unique.
#[derive(Clone, Debug, Default)]
pub struct Metadata<'a> {
    pub entries: Vec<(&'a str, Value<'a>)>,
}

macro_rules! typed_getter {
    ($fn:ident, $opt:ident, $variant:ident, $ty:ty, $name:literal) => {
        /// The value of `key`, which must exist with this type.
        pub fn $fn(&self, key: &str) -> Result<$ty> {
            self.$opt(key)?
                .ok_or_else(|| FormatError::MissingKey { key: key.into() })
        }
        /// The value of `key` if present; an error if present with another type.
        pub fn $opt(&self, key: &str) -> Result<Option<$ty>> {
            match self.get(key) {
                None => Ok(None),
                Some(Value::$variant(v)) => Ok(Some(v)),
                Some(other) => Err(FormatError::WrongType {
                    key: key.into(),
                    expected: $name,
                    found: other.type_name(),
                }),
            }
        }
    };
}

impl<'a> Metadata<'a> {
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
    typed_getter!(u64, opt_u64, U64, u64, "u64");
    typed_getter!(f64, opt_f64, F64, f64, "f64");
    typed_getter!(bool, opt_bool, Bool, bool, "bool");
    typed_getter!(str, opt_str, Str, &'a str, "string");
    typed_getter!(bytes, opt_bytes, Bytes, &'a [u8], "bytes");

    /// A `U64Array` value collected into a vector.
    pub fn opt_u64_array(&self, key: &str) -> Result<Option<Vec<u64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v @ Value::U64Array(_)) => Ok(Some(v.u64_array().collect())),
            Some(other) => Err(FormatError::WrongType {
                key: key.into(),
                expected: "u64 array",
                found: other.type_name(),
            }),
        }
    }
}

/// One tensor of the directory, with its bytes borrowed from the file.
#[derive(Clone, Debug)]
pub struct TensorInfo<'a> {
    pub name: &'a str,
    pub dtype: DType,
    /// Group size of packed integer types; 0 for plain types.
    pub quant_param: u32,
    /// Row-major shape, outermost first: a linear weight is `[n_out, n_in]`.
    pub shape: Vec<u64>,
    /// Absolute file offset of the first byte (a multiple of 64).
    pub offset: u64,
    pub crc32: u32,
    /// The tensor's bytes (zero-copy).
    pub data: &'a [u8],
}

impl TensorInfo<'_> {
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A validated, zero-copy view of a `.nib` image.
#[derive(Clone, Debug)]
pub struct NibView<'a> {
    pub version: u32,
    pub metadata: Metadata<'a>,
    pub tensors: Vec<TensorInfo<'a>>,
    /// Version 2: the stored CRC-32 of the metadata section and of the
    /// tensor directory, with those sections' bytes.
    sections: Option<[(&'static str, u32, &'a [u8]); 2]>,
}

struct Header {
    meta_offset: u64,
    meta_len: u64,
    dir_offset: u64,
    dir_len: u64,
    data_offset: u64,
    data_len: u64,
}

impl<'a> NibView<'a> {
    /// Parse and validate a whole `.nib` image. Reads only the header,
    /// metadata and directory: O(metadata), independent of tensor sizes.
    pub fn parse(bytes: &'a [u8]) -> Result<NibView<'a>> {
        if cfg!(target_endian = "big") {
            return Err(FormatError::BigEndianHost);
        }
        let file_len = bytes.len() as u64;
        let mut c = Cursor::new(bytes, 0);
        let magic = c.take(8, &|| "magic".into())?;
        if magic != MAGIC {
            return Err(FormatError::BadMagic {
                expected: ".nib",
                found: magic.to_vec(),
            });
        }
        let version = c.u32(&|| "version".into())?;
        let want_len = match version {
            1 => HEADER_LEN_V1,
            2 => HEADER_LEN,
            _ => {
                return Err(FormatError::UnsupportedVersion {
                    what: ".nib",
                    found: version,
                    supported: "1, 2",
                })
            }
        };
        let header_len = u64::from(c.u32(&|| "header length".into())?);
        if header_len != want_len {
            return Err(FormatError::BadValue {
                key: "header length".into(),
                why: format!("{header_len}, expected {want_len} for version {version}"),
            });
        }
        let h = Header {
            meta_offset: c.u64(&|| "header".into())?,
            meta_len: c.u64(&|| "header".into())?,
            dir_offset: c.u64(&|| "header".into())?,
            dir_len: c.u64(&|| "header".into())?,
            data_offset: c.u64(&|| "header".into())?,
            data_len: c.u64(&|| "header".into())?,
        };
        let crcs = if version >= 2 {
            Some((c.u32(&|| "header".into())?, c.u32(&|| "header".into())?))
        } else {
            None
        };

        // Sections: inside the file, after the header, not overlapping.
        let sections = [
            ("metadata section", h.meta_offset, h.meta_len),
            ("tensor directory", h.dir_offset, h.dir_len),
            ("data section", h.data_offset, h.data_len),
        ];
        for &(what, off, len) in &sections {
            let end = off.checked_add(len);
            if off < header_len || end.is_none_or(|e| e > file_len) {
                return Err(FormatError::OutOfBounds {
                    what: what.into(),
                    offset: off,
                    len,
                    limit: file_len,
                });
            }
        }
        for i in 0..sections.len() {
            for j in i + 1..sections.len() {
                let (a, ao, al) = sections[i];
                let (b, bo, bl) = sections[j];
                if al > 0 && bl > 0 && ao < bo + bl && bo < ao + al {
                    return Err(FormatError::Overlap {
                        a: a.into(),
                        b: b.into(),
                    });
                }
            }
        }
        if !h.data_offset.is_multiple_of(ALIGN) {
            return Err(FormatError::Misaligned {
                what: "data section".into(),
                offset: h.data_offset,
                align: ALIGN,
            });
        }
        // Offsets fit in usize: they are bounded by the slice length.
        let slice = |off: u64, len: u64| &bytes[off as usize..(off + len) as usize];

        let (meta_bytes, dir_bytes) = (
            slice(h.meta_offset, h.meta_len),
            slice(h.dir_offset, h.dir_len),
        );
        let metadata = parse_metadata(meta_bytes, h.meta_offset)?;
        let tensors = parse_directory(
            dir_bytes,
            h.dir_offset,
            slice(h.data_offset, h.data_len),
            h.data_offset,
        )?;
        Ok(NibView {
            version,
            metadata,
            tensors,
            sections: crcs.map(|(m, d)| {
                [
                    ("metadata section", m, meta_bytes),
                    ("tensor directory", d, dir_bytes),
                ]
            }),
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Recompute the CRC-32 of the metadata section and the directory
    /// (version 2) and of every tensor, and compare with the stored ones.
    pub fn verify_checksums(&self) -> Result<()> {
        for (section, stored, bytes) in self.sections.iter().flatten() {
            let computed = crc32fast::hash(bytes);
            if computed != *stored {
                return Err(FormatError::SectionChecksumMismatch {
                    section,
                    stored: *stored,
                    computed,
                });
            }
        }
        for t in &self.tensors {
            let computed = crc32fast::hash(t.data);
            if computed != t.crc32 {
                return Err(FormatError::ChecksumMismatch {
                    name: t.name.into(),
                    stored: t.crc32,
                    computed,
                });
            }
        }
        Ok(())
    }
}

fn parse_metadata(buf: &[u8], base: u64) -> Result<Metadata<'_>> {
    let mut c = Cursor::new(buf, base);
    let count = u64::from(c.u32(&|| "metadata entry count".into())?);
    if count > MAX_META_ENTRIES {
        return Err(FormatError::CountTooLarge {
            what: "metadata entry".into(),
            count,
            max: MAX_META_ENTRIES,
        });
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut seen = HashSet::new();
    for i in 0..count {
        let key_len = u64::from(c.u16(&|| format!("metadata entry {i} key length"))?);
        if key_len == 0 || key_len > MAX_KEY_LEN {
            return Err(FormatError::BadValue {
                key: format!("metadata entry {i}"),
                why: format!("key length {key_len} (must be 1..={MAX_KEY_LEN})"),
            });
        }
        let key = c.str(key_len, &|| format!("metadata entry {i} key"))?;
        let ty = c.u8(&|| format!("metadata '{key}' type"))?;
        let what = || format!("metadata '{key}' value");
        let value = match ty {
            1 => Value::U64(c.u64(&what)?),
            2 => Value::I64(c.u64(&what)? as i64),
            3 => Value::F64(f64::from_bits(c.u64(&what)?)),
            4 => match c.u8(&what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(FormatError::BadValue {
                        key: key.into(),
                        why: format!("bool byte {b}"),
                    })
                }
            },
            5 => {
                let n = c.u64(&what)?;
                Value::Str(c.str(n, &what)?)
            }
            6 => {
                let n = c.u64(&what)?;
                Value::Bytes(c.take(n, &what)?)
            }
            7 => {
                let n = c.u64(&what)?;
                if n > MAX_ARRAY_LEN {
                    return Err(FormatError::CountTooLarge {
                        what: format!("metadata '{key}' array"),
                        count: n,
                        max: MAX_ARRAY_LEN,
                    });
                }
                Value::U64Array(c.take(n * 8, &what)?)
            }
            code => {
                return Err(FormatError::UnknownValueType {
                    key: key.into(),
                    code: code.into(),
                })
            }
        };
        if !seen.insert(key) {
            return Err(FormatError::Duplicate {
                what: "metadata key",
                name: key.into(),
            });
        }
        entries.push((key, value));
    }
    if c.remaining() != 0 {
        return Err(FormatError::TrailingBytes {
            what: "metadata section".into(),
            len: c.remaining() as u64,
        });
    }
    Ok(Metadata { entries })
}

fn parse_directory<'a>(
    buf: &'a [u8],
    base: u64,
    data: &'a [u8],
    data_base: u64,
) -> Result<Vec<TensorInfo<'a>>> {
    let mut c = Cursor::new(buf, base);
    let count = u64::from(c.u32(&|| "tensor count".into())?);
    if count > MAX_TENSORS {
        return Err(FormatError::CountTooLarge {
            what: "tensor".into(),
            count,
            max: MAX_TENSORS,
        });
    }
    let data_len = data.len() as u64;
    let mut tensors: Vec<TensorInfo<'a>> = Vec::with_capacity(count as usize);
    let mut names = HashSet::new();
    for i in 0..count {
        let name_len = u64::from(c.u16(&|| format!("tensor {i} name length"))?);
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(FormatError::BadValue {
                key: format!("tensor {i} name"),
                why: format!("length {name_len} (must be 1..={MAX_NAME_LEN})"),
            });
        }
        let name = c.str(name_len, &|| format!("tensor {i} name"))?;
        let w = || format!("tensor '{name}' entry");
        let code = c.u16(&w)?;
        let n_dims = u64::from(c.u16(&w)?);
        let quant_param = c.u32(&w)?;
        let dtype = DType::from_code(code).ok_or_else(|| FormatError::UnknownDtype {
            name: name.into(),
            code: code.into(),
        })?;
        if !dtype.is_quantized() && quant_param != 0 {
            return Err(FormatError::BadValue {
                key: format!("tensor '{name}' quant parameter"),
                why: format!("{quant_param}, must be 0 for {dtype}"),
            });
        }
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(FormatError::BadShape {
                name: name.into(),
                shape: vec![],
                why: format!("{n_dims} dimensions (must be 1..={MAX_DIMS})"),
            });
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            shape.push(c.u64(&w)?);
        }
        let rel_offset = c.u64(&w)?;
        let nbytes = c.u64(&w)?;
        let crc32 = c.u32(&w)?;

        if shape.contains(&0) {
            return Err(FormatError::BadShape {
                name: name.into(),
                shape,
                why: "zero-sized dimension".into(),
            });
        }
        if let Some((block, _)) = dtype.gguf_block() {
            let ok = matches!(*shape, [_, cols] if quant_param as usize == block && cols.is_multiple_of(block as u64));
            if !ok {
                return Err(FormatError::BadShape {
                    name: name.into(),
                    shape,
                    why: format!("{dtype} needs a 2-D shape whose rows are whole blocks of {block} and a quant parameter of {block} (got {quant_param})"),
                });
            }
        } else if dtype.is_quantized() {
            let ok = matches!(*shape, [_, cols] if crate::dtype::valid_group_size(quant_param.into(), cols));
            if !ok {
                return Err(FormatError::BadShape {
                    name: name.into(),
                    shape,
                    why: format!("{dtype} needs a 2-D shape and a group size that is a multiple of 32 or the row length (got {quant_param})"),
                });
            }
        }
        let mut n_elements = 1u64;
        for &d in &shape {
            n_elements = mul(n_elements, d, &w)?;
        }
        let expected = crate::dtype::tensor_bytes(dtype, &shape, quant_param).ok_or_else(|| {
            FormatError::BadValue {
                key: w(),
                why: format!("byte size of shape {shape:?} overflows"),
            }
        })?;
        if expected != nbytes {
            return Err(FormatError::ShapeMismatch {
                name: name.into(),
                shape,
                dtype: dtype.name().into(),
                expected,
                found: nbytes,
            });
        }
        let end = add(rel_offset, nbytes, &w)?;
        if end > data_len {
            return Err(FormatError::OutOfBounds {
                what: format!("tensor '{name}'"),
                offset: data_base + rel_offset,
                len: nbytes,
                limit: data_len,
            });
        }
        if rel_offset % ALIGN != 0 {
            return Err(FormatError::Misaligned {
                what: format!("tensor '{name}'"),
                offset: data_base + rel_offset,
                align: ALIGN,
            });
        }
        if !names.insert(name) {
            return Err(FormatError::Duplicate {
                what: "tensor name",
                name: name.into(),
            });
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            quant_param,
            shape,
            offset: data_base + rel_offset,
            crc32,
            data: &data[rel_offset as usize..end as usize],
        });
    }
    if c.remaining() != 0 {
        return Err(FormatError::TrailingBytes {
            what: "tensor directory".into(),
            len: c.remaining() as u64,
        });
    }
    // No two tensors may share bytes.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for pair in order.windows(2) {
        let (a, b) = (&tensors[pair[0]], &tensors[pair[1]]);
        if a.offset + a.data.len() as u64 > b.offset {
            return Err(FormatError::Overlap {
                a: format!("tensor '{}'", a.name),
                b: format!("tensor '{}'", b.name),
            });
        }
    }
    Ok(tensors)
}

/// Owned metadata value used when writing.
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedValue {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
    U64Array(Vec<u64>),
}

impl From<Value<'_>> for OwnedValue {
    fn from(v: Value<'_>) -> OwnedValue {
        match v {
            Value::U64(x) => OwnedValue::U64(x),
            Value::I64(x) => OwnedValue::I64(x),
            Value::F64(x) => OwnedValue::F64(x),
            Value::Bool(x) => OwnedValue::Bool(x),
            Value::Str(s) => OwnedValue::Str(s.into()),
            Value::Bytes(b) => OwnedValue::Bytes(b.to_vec()),
            a @ Value::U64Array(_) => OwnedValue::U64Array(a.u64_array().collect()),
        }
    }
}

impl From<&Metadata<'_>> for MetadataBuilder {
    fn from(m: &Metadata<'_>) -> MetadataBuilder {
        let mut b = MetadataBuilder::new();
        for (k, v) in &m.entries {
            b.set(k, (*v).into());
        }
        b
    }
}

/// Metadata to be written, in insertion order; setting a key twice replaces it.
#[derive(Clone, Debug, Default)]
pub struct MetadataBuilder {
    entries: Vec<(String, OwnedValue)>,
}

impl MetadataBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, key: &str, value: OwnedValue) -> &mut Self {
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| k == key) {
            e.1 = value;
        } else {
            self.entries.push((key.to_string(), value));
        }
        self
    }

    pub fn get(&self, key: &str) -> Option<&OwnedValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn entries(&self) -> &[(String, OwnedValue)] {
        &self.entries
    }

    /// Serialize the metadata section.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let count = u32::try_from(self.entries.len())
            .ok()
            .filter(|&n| u64::from(n) <= MAX_META_ENTRIES)
            .ok_or_else(|| FormatError::CountTooLarge {
                what: "metadata entry".into(),
                count: self.entries.len() as u64,
                max: MAX_META_ENTRIES,
            })?;
        out.extend_from_slice(&count.to_le_bytes());
        for (key, value) in &self.entries {
            if key.is_empty() || key.len() as u64 > MAX_KEY_LEN {
                return Err(FormatError::BadValue {
                    key: key.clone(),
                    why: "key length out of range".into(),
                });
            }
            out.extend_from_slice(&(key.len() as u16).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            match value {
                OwnedValue::U64(v) => {
                    out.push(1);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                OwnedValue::I64(v) => {
                    out.push(2);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                OwnedValue::F64(v) => {
                    out.push(3);
                    out.extend_from_slice(&v.to_bits().to_le_bytes());
                }
                OwnedValue::Bool(v) => {
                    out.push(4);
                    out.push(u8::from(*v));
                }
                OwnedValue::Str(s) => {
                    out.push(5);
                    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                OwnedValue::Bytes(b) => {
                    out.push(6);
                    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
                    out.extend_from_slice(b);
                }
                OwnedValue::U64Array(a) => {
                    out.push(7);
                    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    for v in a {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }
}

struct DirEntry {
    name: String,
    dtype: DType,
    quant_param: u32,
    shape: Vec<u64>,
    rel_offset: u64,
    nbytes: u64,
    crc32: u32,
}

/// Streaming `.nib` writer over any seekable sink. Tensors are written as
/// they come; the directory and the final header are written by `finish`.
/// For files, use [`crate::AtomicFile`] so a crash never leaves a partial file.
pub struct NibWriter<W: Write + Seek> {
    out: W,
    data_offset: u64,
    /// Bytes written into the data section so far.
    data_pos: u64,
    meta_offset: u64,
    meta_len: u64,
    meta_crc32: u32,
    dir: Vec<DirEntry>,
}

impl<W: Write + Seek> NibWriter<W> {
    /// Start a file: writes a placeholder header and the metadata section.
    pub fn new(mut out: W, metadata: &MetadataBuilder) -> std::io::Result<Self> {
        let meta = metadata
            .encode()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        out.write_all(&[0u8; HEADER_LEN as usize])?;
        out.write_all(&meta)?;
        let meta_end = HEADER_LEN + meta.len() as u64;
        let data_offset = align_up(meta_end, ALIGN).expect("small");
        write_zeros(&mut out, data_offset - meta_end)?;
        Ok(NibWriter {
            out,
            data_offset,
            data_pos: 0,
            meta_offset: HEADER_LEN,
            meta_len: meta.len() as u64,
            meta_crc32: crc32fast::hash(&meta),
            dir: Vec::new(),
        })
    }

    /// Append one tensor of a plain type. `shape` is row-major, outermost first.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        data: &[u8],
    ) -> std::io::Result<()> {
        self.add_tensor_q(name, dtype, 0, shape, data)
    }

    /// Append one tensor; `quant_param` is the group size of packed types.
    pub fn add_tensor_q(
        &mut self,
        name: &str,
        dtype: DType,
        quant_param: u32,
        shape: &[u64],
        data: &[u8],
    ) -> std::io::Result<()> {
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        if name.is_empty() || name.len() as u64 > MAX_NAME_LEN {
            return Err(invalid(format!("tensor name '{name}' has a bad length")));
        }
        if self.dir.iter().any(|e| e.name == name) {
            return Err(invalid(format!("duplicate tensor name '{name}'")));
        }
        if shape.is_empty() || shape.len() as u64 > MAX_DIMS || shape.contains(&0) {
            return Err(invalid(format!("tensor '{name}': bad shape {shape:?}")));
        }
        let expected = crate::dtype::tensor_bytes(dtype, shape, quant_param);
        if expected != Some(data.len() as u64) {
            return Err(invalid(format!(
                "tensor '{name}': shape {shape:?} × {dtype} needs {expected:?} bytes, got {}",
                data.len()
            )));
        }
        let rel_offset = align_up(self.data_pos, ALIGN).expect("file size fits u64");
        write_zeros(&mut self.out, rel_offset - self.data_pos)?;
        self.out.write_all(data)?;
        self.data_pos = rel_offset + data.len() as u64;
        self.dir.push(DirEntry {
            name: name.to_string(),
            dtype,
            quant_param,
            shape: shape.to_vec(),
            rel_offset,
            nbytes: data.len() as u64,
            crc32: crc32fast::hash(data),
        });
        Ok(())
    }

    /// Write the directory and the header; returns the sink.
    pub fn finish(mut self) -> std::io::Result<W> {
        let mut dir = Vec::new();
        dir.extend_from_slice(&(self.dir.len() as u32).to_le_bytes());
        for e in &self.dir {
            dir.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            dir.extend_from_slice(e.name.as_bytes());
            dir.extend_from_slice(&e.dtype.code().to_le_bytes());
            dir.extend_from_slice(&(e.shape.len() as u16).to_le_bytes());
            dir.extend_from_slice(&e.quant_param.to_le_bytes());
            for d in &e.shape {
                dir.extend_from_slice(&d.to_le_bytes());
            }
            dir.extend_from_slice(&e.rel_offset.to_le_bytes());
            dir.extend_from_slice(&e.nbytes.to_le_bytes());
            dir.extend_from_slice(&e.crc32.to_le_bytes());
        }
        let data_len = self.data_pos;
        let dir_offset = self.data_offset + data_len;
        self.out.write_all(&dir)?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        for v in [
            self.meta_offset,
            self.meta_len,
            dir_offset,
            dir.len() as u64,
            self.data_offset,
            data_len,
        ] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        header.extend_from_slice(&self.meta_crc32.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&dir).to_le_bytes());
        debug_assert_eq!(header.len() as u64, HEADER_LEN);
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&header)?;
        self.out.seek(SeekFrom::End(0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn write_zeros(out: &mut impl Write, n: u64) -> std::io::Result<()> {
    const Z: [u8; 64] = [0; 64];
    let mut left = n;
    while left > 0 {
        let k = left.min(64) as usize;
        out.write_all(&Z[..k])?;
        left -= k as u64;
    }
    Ok(())
}
