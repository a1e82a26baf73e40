//! Tensor element types of the `.nib` format and their on-disk codes.
//!
//! Float types are plain arrays. The packed integer group types (`Q2G`,
//! `Q3G`, `Q4G`, `Q8G`) store 2-D weights `[rows, cols]` as groups of
//! `group_size` consecutive input columns (the tensor's `quant_param`), each
//! with an f16 scale and an integer zero point; `FORMAT.md` gives the bytes.

use std::fmt;

/// Element type of a tensor stored in a `.nib` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Unsigned 32-bit integers (act-order permutations).
    U32,
    /// Packed 2-bit integer groups.
    Q2G,
    /// Packed 3-bit integer groups.
    Q3G,
    /// Packed 4-bit integer groups.
    Q4G,
    /// 8-bit integer groups.
    Q8G,
    /// Packed 4-bit groups with an f16 minimum instead of an integer zero
    /// point (weight = scale · code + min): GGUF `Q4_1` blocks, byte for byte.
    Q4GM,
    /// GGUF block types run as llama.cpp stores them: a row is whole blocks
    /// of [`DType::gguf_block`] weights, the file's bytes verbatim
    /// (`gguf_blocks` documents each layout).
    Q5_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ4NL,
    IQ4XS,
}

/// Elements per packed sub-block: every group is stored as whole sub-blocks.
pub const SUB_BLOCK: usize = 32;
/// Bytes of a group header: f16 scale, u8 zero point, u8 reserved (0).
pub const GROUP_HEADER: usize = 4;

impl DType {
    pub const ALL: [DType; 17] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::U32,
        DType::Q2G,
        DType::Q3G,
        DType::Q4G,
        DType::Q8G,
        DType::Q4GM,
        DType::Q5_0,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::IQ4NL,
        DType::IQ4XS,
    ];

    /// The GGUF block types, in the order of the kernel tables.
    pub const GGUF_BLOCKS: [DType; 8] = [
        DType::Q5_0,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::IQ4NL,
        DType::IQ4XS,
    ];

    pub fn code(self) -> u16 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::U32 => 3,
            DType::Q2G => 16,
            DType::Q3G => 17,
            DType::Q4G => 18,
            DType::Q8G => 19,
            DType::Q4GM => 20,
            // 32 + the ggml type id.
            DType::Q5_0 => 38,
            DType::Q2K => 42,
            DType::Q3K => 43,
            DType::Q4K => 44,
            DType::Q5K => 45,
            DType::Q6K => 46,
            DType::IQ4NL => 52,
            DType::IQ4XS => 55,
        }
    }

    /// `(weights, bytes)` of one block of a GGUF block type.
    pub fn gguf_block(self) -> Option<(usize, usize)> {
        Some(match self {
            DType::Q5_0 => (32, 22),
            DType::Q2K => (256, 84),
            DType::Q3K => (256, 110),
            DType::Q4K => (256, 144),
            DType::Q5K => (256, 176),
            DType::Q6K => (256, 210),
            DType::IQ4NL => (32, 18),
            DType::IQ4XS => (256, 136),
            _ => return None,
        })
    }

    pub fn from_code(code: u16) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }

    /// Bits per code of a packed group type.
    pub fn quant_bits(self) -> Option<u32> {
        match self {
            DType::Q2G => Some(2),
            DType::Q3G => Some(3),
            DType::Q4G | DType::Q4GM => Some(4),
            DType::Q8G => Some(8),
            _ => None,
        }
    }

    /// Whether the group header holds an f16 minimum (`Q4GM`) rather than an
    /// integer zero point.
    pub fn has_float_min(self) -> bool {
        self == DType::Q4GM
    }

    pub fn from_quant_bits(bits: u32) -> Option<DType> {
        match bits {
            2 => Some(DType::Q2G),
            3 => Some(DType::Q3G),
            4 => Some(DType::Q4G),
            8 => Some(DType::Q8G),
            _ => None,
        }
    }

    /// Packed: a group type or a GGUF block type.
    pub fn is_quantized(self) -> bool {
        self.quant_bits().is_some() || self.gguf_block().is_some()
    }

    /// Bytes per element of a plain type (panics for packed types: use [`tensor_bytes`]).
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            q => panic!("{q} has no per-element size"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U32 => "U32",
            DType::Q2G => "Q2G",
            DType::Q3G => "Q3G",
            DType::Q4G => "Q4G",
            DType::Q8G => "Q8G",
            DType::Q4GM => "Q4GM",
            DType::Q5_0 => "Q5_0",
            DType::Q2K => "Q2_K",
            DType::Q3K => "Q3_K",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
            DType::IQ4NL => "IQ4_NL",
            DType::IQ4XS => "IQ4_XS",
        }
    }

    /// Parse a float storage type name (f32, f16, bf16).
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bytes of one packed sub-block of 32 codes.
#[inline]
pub fn sub_block_bytes(bits: u32) -> usize {
    match bits {
        2 => 8,
        3 => 12,
        4 => 16,
        8 => 32,
        _ => panic!("unsupported bit width {bits}"),
    }
}

/// Bytes of one packed row of `cols` columns in groups of `group_size`.
pub fn row_bytes(bits: u32, cols: usize, group_size: usize) -> usize {
    let full = cols / group_size;
    let tail = cols % group_size;
    let group = |n: usize| GROUP_HEADER + n.div_ceil(SUB_BLOCK) * sub_block_bytes(bits);
    full * group(group_size) + if tail > 0 { group(tail) } else { 0 }
}

/// Byte length of a tensor: plain types `Π shape × size`; packed types need
/// a 2-D shape and a group size. `None` on overflow or an invalid combination.
pub fn tensor_bytes(dtype: DType, shape: &[u64], quant_param: u32) -> Option<u64> {
    if let Some((block, bytes)) = dtype.gguf_block() {
        // GGUF blocks: the quant_param is the block size, rows whole blocks.
        let [rows, cols] = *shape else { return None };
        if quant_param as usize != block || cols == 0 || !cols.is_multiple_of(block as u64) {
            return None;
        }
        return (cols / block as u64 * bytes as u64).checked_mul(rows);
    }
    match dtype.quant_bits() {
        None => {
            if quant_param != 0 {
                return None;
            }
            shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        }
        Some(bits) => {
            let [rows, cols] = *shape else { return None };
            let gs = quant_param as u64;
            if !valid_group_size(gs, cols) {
                return None;
            }
            let cols = usize::try_from(cols).ok()?;
            (row_bytes(bits, cols, gs as usize) as u64).checked_mul(rows)
        }
    }
}

/// Group sizes allowed for a row of `cols`: a multiple of 32, at most the
/// row length rounded up to 32 (one group per row).
pub fn valid_group_size(gs: u64, cols: u64) -> bool {
    (gs > 0
        && gs.is_multiple_of(SUB_BLOCK as u64)
        && gs <= cols.div_ceil(SUB_BLOCK as u64) * SUB_BLOCK as u64)
        || (gs == cols && cols > 0)
}

/// Little-endian F32/F16/BF16 bytes as f32 values; `None` for other types.
pub fn decode_f32(dtype: DType, data: &[u8]) -> Option<Vec<f32>> {
    use half::{bf16, f16};
    Some(match dtype {
        DType::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}
