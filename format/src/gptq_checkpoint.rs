//! GPTQ checkpoints as AutoGPTQ, GPTQModel and transformers' `GPTQConfig`
//! save them: `config.json` with a `quantization_config`, and per quantized
//! linear layer the tensors `qweight`, `qzeros`, `scales` and `g_idx`.
//!
//! Why a separate reader: the Hub holds thousands of these, and their codes,
//! scales and zero points map one to one onto nibble's integer groups
//! (`Q2G`/`Q3G`/`Q4G`/`Q8G`, weight = scale · (code − zero)), so nibble runs
//! exactly the weights the checkpoint holds, with no dequantize/requantize.
//!
//! On-disk layout (`in` input features, `out` output features, `G` groups):
//!
//! * `qweight` int32 `[⌈in·bits/32⌉, out]`, packed along the input: the codes
//!   of one output column form a little-endian bit stream over the words of
//!   that column, input `i` at bit `i·bits` (3-bit codes cross words; the
//!   last word's unused bits are padding).
//! * `qzeros` int32 `[G, ⌈out·bits/32⌉]`, packed the same way along the output.
//!   `checkpoint_format` "gptq" (v1) stores zero − 1 by subtracting a word
//!   constant with one 1 per field from each whole word (borrows included);
//!   reading adds it back to the whole word. "gptq_v2" stores the zeros.
//! * `scales` f16 (or bf16/f32) `[G, out]`.
//! * `g_idx` int32 `[in]`: the group of each input. Without act-order it is
//!   `i / group_size`; with act-order (`desc_act`) a permutation of that.
//!
//! Import reorders the input columns once (a stable sort by `g_idx`), which
//! makes every group contiguous as nibble stores them, and records the
//! order as the tensor's act-order permutation (`FORMAT.md`). Export does
//! the reverse for nibble's own GPTQ output ([`GptqLinear::from_groups`],
//! [`GptqLinear::pack`]).

use half::f16;
use serde_json::Value as Json;

use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// The `quantization_config` of a GPTQ checkpoint, checked to be one nibble
/// reads exactly.
#[derive(Clone, Debug)]
pub struct GptqConfig {
    pub bits: u32,
    /// Columns per group; `None` = one group per row (`group_size: -1`).
    pub group_size: Option<usize>,
    pub desc_act: bool,
    pub sym: bool,
    /// `checkpoint_format` "gptq": zeros stored as zero − 1.
    pub zeros_minus_one: bool,
    /// The `checkpoint_format` as written ("gptq" or "gptq_v2").
    pub checkpoint_format: String,
    dynamic: Vec<DynamicRule>,
}

/// One of GPTQModel's `dynamic` per-module overrides: a regular expression
/// (`+:` or no prefix: these settings; `-:`: left unquantized), matched at
/// the start of the module name as Python's `re.match` does.
#[derive(Clone, Debug)]
struct DynamicRule {
    pattern: regex::Regex,
    skip: bool,
    bits: Option<u32>,
    group_size: Option<Option<usize>>,
}

/// How one module is stored, after the `dynamic` overrides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleQuant {
    /// Left in float by a `-:` rule.
    Float,
    Quantized {
        bits: u32,
        group_size: Option<usize>,
    },
}

fn unsupported(what: impl Into<String>) -> FormatError {
    FormatError::UnsupportedQuantization { what: what.into() }
}

fn parse_bits(v: &Json, key: &str) -> Result<u32> {
    match v.as_u64() {
        Some(b @ (2 | 3 | 4 | 8)) => Ok(b as u32),
        _ => Err(unsupported(format!(
            "{key} = {v}: nibble reads GPTQ codes of 2, 3, 4 or 8 bits"
        ))),
    }
}

fn parse_group_size(v: &Json, key: &str) -> Result<Option<usize>> {
    match v.as_i64() {
        Some(-1) | Some(0) => Ok(None),
        Some(g) if g > 0 && g % 32 == 0 => Ok(Some(g as usize)),
        _ => Err(unsupported(format!(
            "{key} = {v}: nibble's groups are whole multiples of 32 columns (or -1, one group per row)"
        ))),
    }
}

impl GptqConfig {
    /// The checkpoint's quantization, from `config.json`
    /// (`quantization_config`) or a legacy `quantize_config.json` object;
    /// `None` when the model is not quantized. Every setting nibble cannot
    /// read exactly is an error naming it.
    pub fn from_config(config: &Json, legacy: Option<&Json>) -> Result<Option<GptqConfig>> {
        let Some(q) = config.get("quantization_config").or(legacy) else {
            return Ok(None);
        };
        let s = |k: &str| q.get(k).and_then(Json::as_str);
        let method = s("quant_method")
            .or_else(|| s("method"))
            .unwrap_or("gptq")
            .to_ascii_lowercase();
        if method != "gptq" {
            let hint = match method.as_str() {
                "awq" => " (AWQ's GEMM layout packs codes in another order)",
                "bitsandbytes" => " (bitsandbytes NF4/int8 weights)",
                _ => "",
            };
            return Err(unsupported(format!(
                "quant_method '{method}'{hint}: nibble imports GPTQ checkpoints (quant_method \"gptq\"); \
                 load the float model instead and quantize it with `nibble quantize`"
            )));
        }
        let format = s("checkpoint_format")
            .or_else(|| s("format"))
            .unwrap_or("gptq")
            .to_ascii_lowercase();
        let zeros_minus_one = match format.as_str() {
            "gptq" => true,
            "gptq_v2" => false,
            other => {
                return Err(unsupported(format!(
                    "checkpoint_format '{other}': only the plain GPTQ layouts \"gptq\" and \"gptq_v2\" \
                     are read (Marlin, BitBLAS, QQQ and other kernel-repacked layouts are not)"
                )))
            }
        };
        if q.get("is_marlin_format").and_then(Json::as_bool) == Some(true) {
            return Err(unsupported(
                "is_marlin_format = true: Marlin-repacked weights are not read",
            ));
        }
        if let Some(p) = s("pack_dtype") {
            if p != "int32" && p != "torch.int32" {
                return Err(unsupported(format!(
                    "pack_dtype '{p}': only int32 words are read"
                )));
            }
        }
        let bits = parse_bits(q.get("bits").unwrap_or(&Json::Null), "bits")?;
        let group_size = match q.get("group_size") {
            Some(v) => parse_group_size(v, "group_size")?,
            None => Some(128),
        };
        let flag = |k: &str, default: bool| q.get(k).and_then(Json::as_bool).unwrap_or(default);
        let mut dynamic = Vec::new();
        if let Some(rules) = q.get("dynamic").and_then(Json::as_object) {
            for (key, over) in rules {
                let (skip, pat) = if let Some(p) = key.strip_prefix("-:") {
                    (true, p)
                } else {
                    (false, key.strip_prefix("+:").unwrap_or(key))
                };
                let pattern = regex::Regex::new(&format!("^(?:{pat})")).map_err(|e| {
                    unsupported(format!(
                        "dynamic rule '{key}' is not a regular expression nibble reads: {e}"
                    ))
                })?;
                let bits = over.get("bits").map(|v| parse_bits(v, key)).transpose()?;
                let group_size = over
                    .get("group_size")
                    .map(|v| parse_group_size(v, key))
                    .transpose()?;
                dynamic.push(DynamicRule {
                    pattern,
                    skip,
                    bits,
                    group_size,
                });
            }
        }
        Ok(Some(GptqConfig {
            bits,
            group_size,
            desc_act: flag("desc_act", false),
            sym: flag("sym", true),
            zeros_minus_one,
            checkpoint_format: format,
            dynamic,
        }))
    }

    /// The settings of module `name` (e.g. `model.layers.0.mlp.down_proj`):
    /// GPTQModel applies the first matching `dynamic` rule.
    pub fn module(&self, name: &str) -> ModuleQuant {
        for r in &self.dynamic {
            if r.pattern.is_match(name) {
                if r.skip {
                    return ModuleQuant::Float;
                }
                return ModuleQuant::Quantized {
                    bits: r.bits.unwrap_or(self.bits),
                    group_size: r.group_size.unwrap_or(self.group_size),
                };
            }
        }
        ModuleQuant::Quantized {
            bits: self.bits,
            group_size: self.group_size,
        }
    }
}

/// The word constant with a 1 in the lowest bit of every field of a 2-,
/// 4- or 8-bit stream: GPTQ v1 stores zero − 1 by subtracting it from each
/// whole word (borrows included) and reads by adding it back (GPTQModel's
/// `convert_gptq_v{1,2}_format`). 3-bit fields cross words, so GPTQModel
/// shifts each field modulo 8 instead ([`v1_zero`]).
fn word_ones(bits: u32) -> u32 {
    match bits {
        2 => 0x5555_5555,
        4 => 0x1111_1111,
        8 => 0x0101_0101,
        _ => 0,
    }
}

/// A 3-bit v1 zero field read back (`stored + 1` modulo 8); other widths
/// were corrected word by word before unpacking.
fn v1_zero(bits: u32, stored: u32) -> u32 {
    if bits == 3 {
        (stored + 1) & 7
    } else {
        stored
    }
}

/// Field `k` (`bits` wide) of a little-endian bit stream held in `words`
/// (`stride` apart, starting at `base`).
fn stream_field(words: &[u32], base: usize, stride: usize, bits: u32, k: usize) -> u32 {
    let p = k * bits as usize;
    let (w, s) = (p / 32, (p % 32) as u32);
    let lo = u64::from(words[base + w * stride]);
    let hi = if s + bits > 32 {
        u64::from(words[base + (w + 1) * stride])
    } else {
        0
    };
    (((hi << 32 | lo) >> s) & ((1u64 << bits) - 1)) as u32
}

/// Words of a stream of `n` fields of `bits`.
pub fn packed_words(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// One GPTQ linear layer, unpacked: codes in the checkpoint's input order.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqLinear {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    pub bits: u32,
    /// Columns per group (`cols` for one group per row).
    pub group_size: usize,
    /// `codes[r·cols + i]`.
    pub codes: Vec<u8>,
    /// `scales[g·rows + r]`, each exactly an f16 value.
    pub scales: Vec<f32>,
    /// `zeros[g·rows + r]`.
    pub zeros: Vec<u8>,
    /// The group of each input column.
    pub g_idx: Vec<u32>,
}

/// A weight as nibble stores it: packed groups, row after row, and the
/// act-order permutation (stored column `j` multiplies input `perm[j]`).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupedWeight {
    pub dtype: DType,
    /// The tensor's `quant_param`.
    pub group_size: u32,
    pub bytes: Vec<u8>,
    pub perm: Option<Vec<u32>>,
}

/// The raw tensors of one GPTQ layer, as read from safetensors.
pub struct GptqTensors<'a> {
    /// The layer's name (errors name its tensors).
    pub name: &'a str,
    pub qweight: (&'a [u8], Vec<u64>),
    pub qzeros: (&'a [u8], Vec<u64>),
    /// Scales decoded to f32, their stored type, and their shape.
    pub scales: (Vec<f32>, DType, Vec<u64>),
    /// `g_idx` values and shape, when stored.
    pub g_idx: Option<(Vec<i64>, Vec<u64>)>,
}

impl GptqLinear {
    /// Unpack a layer of `rows` × `cols` (from the model's configuration)
    /// with `bits` and `group_size`, checking every shape and value.
    pub fn unpack(
        t: &GptqTensors<'_>,
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: Option<usize>,
        zeros_minus_one: bool,
    ) -> Result<GptqLinear> {
        // Groups wider than the row are one group per row.
        let gs = group_size.unwrap_or(cols).min(cols);
        let n_groups = cols.div_ceil(gs);
        let shape_err = |tensor: &str, shape: &[u64], want: Vec<u64>| FormatError::BadShape {
            name: format!("{}.{tensor}", t.name),
            shape: shape.to_vec(),
            why: format!(
                "expected {want:?} for {bits}-bit codes in groups of {} of a {rows}×{cols} layer \
                 (bits and group_size from quantization_config)",
                group_size.map_or("a whole row".to_string(), |g| g.to_string())
            ),
        };
        let want_qw = vec![packed_words(cols, bits) as u64, rows as u64];
        if t.qweight.1 != want_qw {
            return Err(shape_err("qweight", &t.qweight.1, want_qw));
        }
        let want_qz = vec![n_groups as u64, packed_words(rows, bits) as u64];
        if t.qzeros.1 != want_qz {
            return Err(shape_err("qzeros", &t.qzeros.1, want_qz));
        }
        let want_sc = vec![n_groups as u64, rows as u64];
        if t.scales.2 != want_sc {
            return Err(shape_err("scales", &t.scales.2, want_sc));
        }
        let words = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let qweight = words(t.qweight.0);
        let mut qzeros = words(t.qzeros.0);
        if zeros_minus_one {
            let per_row = want_qz[1] as usize;
            for row in qzeros.chunks_mut(per_row) {
                for v in row.iter_mut() {
                    *v = v.wrapping_add(word_ones(bits));
                }
            }
        }
        let g_idx: Vec<u32> = match &t.g_idx {
            None => (0..cols).map(|i| (i / gs) as u32).collect(),
            Some((v, shape)) => {
                if shape != &[cols as u64] {
                    return Err(shape_err("g_idx", shape, vec![cols as u64]));
                }
                if let Some((i, g)) = v
                    .iter()
                    .enumerate()
                    .find(|(_, &g)| g < 0 || g >= n_groups as i64)
                {
                    return Err(FormatError::BadValue {
                        key: format!("{}.g_idx", t.name),
                        why: format!(
                            "input {i} is assigned to group {g}, outside the {n_groups} groups of `scales`"
                        ),
                    });
                }
                v.iter().map(|&g| g as u32).collect()
            }
        };
        for (k, &s) in t.scales.0.iter().enumerate() {
            let exact = f16::from_f32(s).to_f32() == s;
            if !s.is_finite() || !exact {
                return Err(FormatError::BadValue {
                    key: format!("{}.scales", t.name),
                    why: format!(
                        "scale {s} (group {}, output {}) is {} an f16 value, which nibble's groups hold \
                         ({} scales); --dtype f32 imports the dequantized weights instead",
                        k / rows,
                        k % rows,
                        if s.is_finite() { "not exactly" } else { "not" },
                        t.scales.1
                    ),
                });
            }
        }
        let mut codes = vec![0u8; rows * cols];
        for (r, row) in codes.chunks_exact_mut(cols).enumerate() {
            for (i, c) in row.iter_mut().enumerate() {
                *c = stream_field(&qweight, r, rows, bits, i) as u8;
            }
        }
        let per_row = want_qz[1] as usize;
        let mut zeros = vec![0u8; n_groups * rows];
        for (g, z) in zeros.chunks_exact_mut(rows).enumerate() {
            for (r, v) in z.iter_mut().enumerate() {
                let z = stream_field(&qzeros, g * per_row, 1, bits, r);
                *v = if zeros_minus_one { v1_zero(bits, z) } else { z } as u8;
            }
        }
        Ok(GptqLinear {
            rows,
            cols,
            bits,
            group_size: gs,
            codes,
            scales: t.scales.0.clone(),
            zeros,
            g_idx,
        })
    }

    /// The weights `[rows, cols]` as the checkpoint's own dequantizer
    /// computes them: `scale · (code − zero)` in f32 (exact).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        for (r, row) in w.chunks_exact_mut(self.cols).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                let g = self.g_idx[i] as usize * self.rows + r;
                let q = f32::from(self.codes[r * self.cols + i]) - f32::from(self.zeros[g]);
                *v = self.scales[g] * q;
            }
        }
        w
    }

    /// The layer restricted to output rows `keep` (a fused projection's part).
    pub fn select_rows(&self, keep: &[usize]) -> GptqLinear {
        let n_groups = self.scales.len() / self.rows;
        let per_group = |v: &[f32]| -> Vec<f32> {
            (0..n_groups)
                .flat_map(|g| keep.iter().map(move |&r| v[g * self.rows + r]))
                .collect()
        };
        let zeros = (0..n_groups)
            .flat_map(|g| keep.iter().map(move |&r| self.zeros[g * self.rows + r]))
            .collect();
        GptqLinear {
            rows: keep.len(),
            cols: self.cols,
            bits: self.bits,
            group_size: self.group_size,
            codes: keep
                .iter()
                .flat_map(|&r| {
                    self.codes[r * self.cols..(r + 1) * self.cols]
                        .iter()
                        .copied()
                })
                .collect(),
            scales: per_group(&self.scales),
            zeros,
            g_idx: self.g_idx.clone(),
        }
    }

    /// The layer as nibble's packed groups. Columns are stored sorted by
    /// group (stable), so group `g` is stored columns `g·gs..`; stored
    /// column `j` multiplies input `perm[j]` (`None` when the order is the
    /// identity). A `g_idx` that does not give every group exactly its
    /// size is an error: nibble's groups are contiguous and equal.
    pub fn to_groups(&self, name: &str) -> Result<GroupedWeight> {
        let gs = self.group_size;
        let mut perm: Vec<u32> = (0..self.cols as u32).collect();
        perm.sort_by_key(|&i| self.g_idx[i as usize]);
        for (j, &i) in perm.iter().enumerate() {
            if self.g_idx[i as usize] as usize != j / gs {
                let g = j / gs;
                let want = gs.min(self.cols - g * gs);
                let have = self.g_idx.iter().filter(|&&x| x as usize == g).count();
                return Err(FormatError::BadValue {
                    key: format!("{name}.g_idx"),
                    why: format!(
                        "is not a valid group assignment: group {g} has {have} inputs where groups of \
                         {gs} over {} inputs give it {want}",
                        self.cols
                    ),
                });
            }
        }
        let identity = perm.iter().enumerate().all(|(j, &i)| j == i as usize);
        let dtype = DType::from_quant_bits(self.bits).expect("bits checked at unpack");
        let n_groups = self.cols.div_ceil(gs);
        let mut bytes =
            Vec::with_capacity(self.rows * crate::dtype::row_bytes(self.bits, self.cols, gs));
        let mut row_codes = vec![0u8; self.cols];
        let (mut sc, mut zs) = (vec![0f32; n_groups], vec![0u8; n_groups]);
        for r in 0..self.rows {
            let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
            for (c, &i) in row_codes.iter_mut().zip(&perm) {
                *c = codes[i as usize];
            }
            for g in 0..n_groups {
                sc[g] = self.scales[g * self.rows + r];
                zs[g] = self.zeros[g * self.rows + r];
            }
            crate::quant::pack_row(self.bits, gs, &row_codes, &sc, &zs, &mut bytes);
        }
        Ok(GroupedWeight {
            dtype,
            group_size: gs as u32,
            bytes,
            perm: (!identity).then_some(perm),
        })
    }

    /// The inverse of [`GptqLinear::to_groups`]: a nibble packed integer
    /// weight (`dtype`, `group_size`, rows of bytes) with its optional
    /// act-order permutation, as a GPTQ layer in input order.
    pub fn from_groups(
        name: &str,
        dtype: DType,
        group_size: usize,
        shape: (usize, usize),
        bytes: &[u8],
        perm: Option<&[u32]>,
    ) -> Result<GptqLinear> {
        let (rows, cols) = shape;
        let bits = match dtype {
            DType::Q2G | DType::Q3G | DType::Q4G | DType::Q8G => {
                dtype.quant_bits().expect("packed")
            }
            other => {
                return Err(unsupported(format!(
                    "tensor '{name}' is {other}: GPTQ stores integer groups with zero points \
                     (nibble's Q2G/Q3G/Q4G/Q8G)"
                )))
            }
        };
        let gs = group_size;
        let n_groups = cols.div_ceil(gs);
        let row_bytes = crate::dtype::row_bytes(bits, cols, gs);
        let sb = crate::dtype::sub_block_bytes(bits);
        let mut lin = GptqLinear {
            rows,
            cols,
            bits,
            group_size: gs,
            codes: vec![0; rows * cols],
            scales: vec![0.0; n_groups * rows],
            zeros: vec![0; n_groups * rows],
            g_idx: vec![0; cols],
        };
        let input_of = |j: usize| perm.map_or(j, |p| p[j] as usize);
        for j in 0..cols {
            lin.g_idx[input_of(j)] = (j / gs) as u32;
        }
        let mut sub = [0u8; crate::dtype::SUB_BLOCK];
        for (r, row) in bytes.chunks_exact(row_bytes).enumerate() {
            let mut p = 0;
            for g in 0..n_groups {
                lin.scales[g * rows + r] = f16::from_le_bytes([row[p], row[p + 1]]).to_f32();
                lin.zeros[g * rows + r] = row[p + 2];
                p += crate::dtype::GROUP_HEADER;
                let len = gs.min(cols - g * gs);
                for s in 0..len.div_ceil(32) {
                    crate::quant::unpack_sub_block(bits, &row[p..p + sb], &mut sub);
                    p += sb;
                    for (k, &code) in sub.iter().enumerate().take(len - s * 32) {
                        let j = g * gs + s * 32 + k;
                        lin.codes[r * cols + input_of(j)] = code;
                    }
                }
            }
        }
        Ok(lin)
    }

    /// The layer in GPTQ's on-disk form: `(qweight, qzeros, scales as f16,
    /// g_idx)` as little-endian bytes, zeros stored as zero − 1 when
    /// `zeros_minus_one` ("gptq" v1) or as they are ("gptq_v2").
    pub fn pack(&self, zeros_minus_one: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
        let (rows, cols, bits) = (self.rows, self.cols, self.bits);
        let n_groups = self.scales.len() / rows;
        let qw_rows = packed_words(cols, bits);
        let mut qweight = vec![0u32; qw_rows * rows];
        for r in 0..rows {
            for i in 0..cols {
                put_field(
                    &mut qweight,
                    r,
                    rows,
                    bits,
                    i,
                    u32::from(self.codes[r * cols + i]),
                );
            }
        }
        let per_row = packed_words(rows, bits);
        let mut qzeros = vec![0u32; n_groups * per_row];
        for g in 0..n_groups {
            for r in 0..rows {
                let z = u32::from(self.zeros[g * rows + r]);
                let stored = if zeros_minus_one && bits == 3 {
                    z.wrapping_sub(1) & 7
                } else {
                    z
                };
                put_field(&mut qzeros, g * per_row, 1, bits, r, stored);
            }
            if zeros_minus_one {
                for v in &mut qzeros[g * per_row..(g + 1) * per_row] {
                    *v = v.wrapping_sub(word_ones(bits));
                }
            }
        }
        let le = |v: &[u32]| v.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        let scales = self
            .scales
            .iter()
            .flat_map(|&s| f16::from_f32(s).to_le_bytes())
            .collect();
        let g_idx = self
            .g_idx
            .iter()
            .flat_map(|&g| (g as i32).to_le_bytes())
            .collect();
        (le(&qweight), le(&qzeros), scales, g_idx)
    }
}

/// Write field `k` of a bit stream (the inverse of [`stream_field`]).
fn put_field(words: &mut [u32], base: usize, stride: usize, bits: u32, k: usize, v: u32) {
    let p = k * bits as usize;
    let (w, s) = (p / 32, (p % 32) as u32);
    let wide = u64::from(v) << s;
    words[base + w * stride] |= wide as u32;
    if s + bits > 32 {
        words[base + (w + 1) * stride] |= (wide >> 32) as u32;
    }
}

/// Decode a safetensors float tensor (scales) to f32 with its type.
pub fn float_values(dtype: safetensors::Dtype, data: &[u8]) -> Option<(Vec<f32>, DType)> {
    use safetensors::Dtype as S;
    let d = match dtype {
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F32 => DType::F32,
        _ => return None,
    };
    Some((crate::dtype::decode_f32(d, data)?, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// A seeded layer with act-order groups, 172 inputs (a short last group)
    /// and zero points at both ends of the range (0 borrows in v1).
    fn layer(bits: u32, gs: usize) -> GptqLinear {
        let (rows, cols) = (12usize, 172usize);
        let mut seed = u64::from(bits) * 31 + gs as u64;
        let n_groups = cols.div_ceil(gs);
        let max = (1u32 << bits) - 1;
        let mut order: Vec<usize> = (0..cols).collect();
        for i in (1..cols).rev() {
            order.swap(i, lcg(&mut seed) as usize % (i + 1));
        }
        let mut g_idx = vec![0u32; cols];
        for (j, &i) in order.iter().enumerate() {
            g_idx[i] = (j / gs) as u32;
        }
        GptqLinear {
            rows,
            cols,
            bits,
            group_size: gs,
            codes: (0..rows * cols)
                .map(|_| (lcg(&mut seed) % (max + 1)) as u8)
                .collect(),
            scales: (0..n_groups * rows)
                .map(|_| f16::from_f32((lcg(&mut seed) % 1000 + 1) as f32 * 1e-4).to_f32())
                .collect(),
            zeros: (0..n_groups * rows)
                .map(|k| match k % 5 {
                    0 => 0,
                    1 => max as u8,
                    _ => (lcg(&mut seed) % (max + 1)) as u8,
                })
                .collect(),
            g_idx,
        }
    }

    fn tensors<'a>(
        name: &'a str,
        l: &GptqLinear,
        packed: &'a (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>),
    ) -> GptqTensors<'a> {
        let n_groups = l.scales.len() / l.rows;
        GptqTensors {
            name,
            qweight: (
                &packed.0,
                vec![packed_words(l.cols, l.bits) as u64, l.rows as u64],
            ),
            qzeros: (
                &packed.1,
                vec![n_groups as u64, packed_words(l.rows, l.bits) as u64],
            ),
            scales: (
                l.scales.clone(),
                DType::F16,
                vec![n_groups as u64, l.rows as u64],
            ),
            g_idx: Some((
                l.g_idx.iter().map(|&g| i64::from(g)).collect(),
                vec![l.cols as u64],
            )),
        }
    }

    #[test]
    fn pack_unpack_round_trips_every_width_and_format() {
        for bits in [2, 3, 4, 8] {
            for gs in [32, 64, 172] {
                for v1 in [true, false] {
                    let l = layer(bits, gs);
                    let packed = l.pack(v1);
                    let t = tensors("x", &l, &packed);
                    let gs_opt = (gs != l.cols).then_some(gs);
                    let back = GptqLinear::unpack(&t, l.rows, l.cols, bits, gs_opt, v1).unwrap();
                    assert_eq!(back, l, "bits {bits} gs {gs} v1 {v1}");
                    // Through nibble's groups and back.
                    let GroupedWeight {
                        dtype,
                        group_size: g,
                        bytes,
                        perm,
                    } = l.to_groups("x").unwrap();
                    let again = GptqLinear::from_groups(
                        "x",
                        dtype,
                        g as usize,
                        (l.rows, l.cols),
                        &bytes,
                        perm.as_deref(),
                    )
                    .unwrap();
                    assert_eq!(again, l, "groups: bits {bits} gs {gs}");
                    // The groups decode to the same weights.
                    let w = l.dequantize();
                    let row_bytes = bytes.len() / l.rows;
                    let mut dec = vec![0f32; l.cols];
                    for r in 0..l.rows {
                        crate::quant::dequantize(
                            dtype,
                            g as usize,
                            &bytes[r * row_bytes..][..row_bytes],
                            &mut dec,
                        );
                        for (j, &v) in dec.iter().enumerate() {
                            let i = perm.as_ref().map_or(j, |p| p[j] as usize);
                            assert_eq!(v, w[r * l.cols + i], "bits {bits} gs {gs} row {r} col {i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn v1_zero_words_match_gptqmodel_constants() {
        // GPTQModel stores v1 zeros as the v2 word minus these constants.
        // A zero point of 0 borrows from the next field in 4-bit v1 (the
        // fixture's README: sym zeros 8 are stored as 0x77777777).
        let mut w = [0u32; 1];
        put_field(&mut w, 0, 1, 4, 0, 0);
        put_field(&mut w, 0, 1, 4, 1, 8);
        let v1 = w[0].wrapping_sub(word_ones(4));
        assert_eq!(v1 & 0xff, 0x6f);
        assert_eq!(stream_field(&[v1.wrapping_add(0x1111_1111)], 0, 1, 4, 0), 0);
        let mut w = [0u32; 1];
        for k in 0..8 {
            put_field(&mut w, 0, 1, 4, k, 8);
        }
        assert_eq!(w[0].wrapping_sub(word_ones(4)), 0x7777_7777);
        // 3-bit fields shift modulo 8, field by field, across words.
        let l = GptqLinear {
            rows: 32,
            cols: 32,
            bits: 3,
            group_size: 32,
            codes: vec![0; 32 * 32],
            scales: vec![1.0; 32],
            zeros: (0..32).map(|r| (r % 8) as u8).collect(),
            g_idx: vec![0; 32],
        };
        let (_, qz, _, _) = l.pack(true);
        let words: Vec<u32> = qz
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for r in 0..32 {
            assert_eq!(stream_field(&words, 0, 1, 3, r), ((r + 7) % 8) as u32);
        }
    }

    #[test]
    fn bad_g_idx_is_named() {
        let mut l = layer(4, 32);
        l.g_idx[0] = (l.g_idx[0] + 1) % 6;
        let e = l.to_groups("blk.q").unwrap_err().to_string();
        assert!(
            e.contains("blk.q.g_idx") && e.contains("not a valid group assignment"),
            "{e}"
        );
    }
}
