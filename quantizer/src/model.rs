//! Whole-model quantization: every linear weight of a `.nib` image is
//! quantized and packed into the format's integer group types; norms stay
//! F32 and the embedding / output head are stored as F16.
//!
//! Implemented: RTN (needs no calibration). GPTQ over a whole model
//! (calibration, block-by-block Hessians) is not implemented yet; the
//! per-layer algorithm it will call is [`crate::gptq::gptq`].

use std::io::{Seek, Write};

use nibble_format::import::encode;
use nibble_format::quant::pack_row;
use nibble_format::{keys, DType, MetadataBuilder, NibView, NibWriter, OwnedValue, TensorInfo};

use crate::error::{QuantError, Result};
use crate::gptq::{rtn, QuantizedLayer};
use crate::grid::Grid;

/// Quantization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Gptq,
}

/// Settings of `nibble quantize`.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub method: Method,
    pub bits: u32,
    /// Columns per group; `None` = one group per row.
    pub group_size: Option<usize>,
    pub sym: bool,
}

/// Per-layer outcome for the report.
#[derive(Clone, Debug)]
pub struct LayerReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// ‖W − Ŵ‖² / ‖W‖² (weight space: RTN has no calibration inputs).
    pub rel_weight_error: f64,
}

/// Is this tensor a linear weight that gets quantized?
pub fn is_linear(name: &str) -> bool {
    const LINEAR: [&str; 7] = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    name.starts_with("blk.")
        && name.ends_with(".weight")
        && LINEAR
            .iter()
            .any(|l| name.ends_with(&format!(".{l}.weight")))
}

/// Effective group size for a row of `cols`: one group per row when
/// `group_size` is `None` or does not fit the row.
pub fn effective_group_size(group_size: Option<usize>, cols: usize) -> usize {
    match group_size {
        Some(g) if g < cols => g,
        _ => cols,
    }
}

/// A float tensor's values as f32.
pub fn tensor_f32(t: &TensorInfo<'_>) -> Result<Vec<f32>> {
    use half::{bf16, f16};
    let d = t.data;
    Ok(match t.dtype {
        DType::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => d
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => d
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(QuantError::Shape(format!(
                "tensor '{}' is already {other}; quantize from a float model",
                t.name
            )))
        }
    })
}

/// Pack a quantized layer's rows in the `.nib` layout.
pub fn pack_layer(q: &QuantizedLayer, bits: u32, group_size: usize) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(q.rows * nibble_format::dtype::row_bytes(bits, q.cols, group_size));
    let mut zeros = vec![0u8; q.n_groups];
    for r in 0..q.rows {
        let g = r * q.n_groups..(r + 1) * q.n_groups;
        for (z, &v) in zeros.iter_mut().zip(&q.zeros[g.clone()]) {
            *z = v as u8;
        }
        pack_row(
            bits,
            group_size,
            &q.codes[r * q.cols..(r + 1) * q.cols],
            &q.scales[g],
            &zeros,
            &mut out,
        );
    }
    out
}

/// Quantize every linear weight of `src` into `out`. `progress(done, total, name)`.
pub fn quantize_model<W: Write + Seek>(
    src: &NibView<'_>,
    opts: &QuantizeOptions,
    out: W,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(W, Vec<LayerReport>)> {
    let grid = Grid::new(opts.bits, opts.sym)?;
    if let Some(g) = opts.group_size {
        if g == 0 || g % 32 != 0 {
            return Err(QuantError::BadGroupSize {
                group_size: g,
                cols: 0,
            });
        }
    }
    if opts.method == Method::Gptq {
        return Err(QuantError::Shape(
            "GPTQ over a whole model is not implemented yet (use --method rtn)".into(),
        ));
    }
    // Check every linear weight before any heavy work.
    for t in src.tensors.iter().filter(|t| is_linear(t.name)) {
        let v = tensor_f32(t)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(QuantError::NonFinite {
                what: "weights",
                index: i,
            });
        }
    }
    let mut meta = MetadataBuilder::from(&src.metadata);
    meta.set(keys::QUANT_METHOD, OwnedValue::Str("rtn".into()));
    meta.set(
        keys::QUANT_DTYPE,
        OwnedValue::Str(
            DType::from_quant_bits(opts.bits)
                .expect("validated")
                .name()
                .into(),
        ),
    );
    meta.set(keys::QUANT_BITS, OwnedValue::U64(opts.bits.into()));
    meta.set(
        keys::QUANT_GROUP_SIZE,
        OwnedValue::U64(opts.group_size.unwrap_or(0) as u64),
    );
    meta.set(keys::QUANT_SYM, OwnedValue::Bool(opts.sym));
    meta.set(keys::QUANT_ACT_ORDER, OwnedValue::Bool(false));
    meta.set(
        keys::PROV_TOOL,
        OwnedValue::Str(format!("nibble-quantizer {}", env!("CARGO_PKG_VERSION"))),
    );
    meta.set(
        keys::PROV_CREATED,
        OwnedValue::Str(nibble_format::hparams::utc_now_rfc3339()),
    );
    let io = |e: std::io::Error| QuantError::Shape(format!("writing the output: {e}"));
    let mut w = NibWriter::new(out, &meta).map_err(io)?;
    let mut reports = Vec::new();
    let total = src.tensors.len();
    for (i, t) in src.tensors.iter().enumerate() {
        progress(i, total, t.name);
        if is_linear(t.name) {
            let [rows, cols] = t.shape[..] else {
                return Err(QuantError::Shape(format!("'{}' is not 2-D", t.name)));
            };
            let (rows, cols) = (rows as usize, cols as usize);
            let wf = tensor_f32(t)?;
            let gs = effective_group_size(opts.group_size, cols);
            let q = rtn(&wf, rows, cols, grid, Some(gs))?;
            let deq = q.dequantize();
            let (mut num, mut den) = (0f64, 0f64);
            for (a, b) in wf.iter().zip(&deq) {
                num += f64::from(a - b).powi(2);
                den += f64::from(*a).powi(2);
            }
            reports.push(LayerReport {
                name: t.name.to_string(),
                rows,
                cols,
                rel_weight_error: if den > 0.0 { num / den } else { 0.0 },
            });
            let packed = pack_layer(&q, opts.bits, gs);
            let dtype = DType::from_quant_bits(opts.bits).expect("validated");
            w.add_tensor_q(t.name, dtype, gs as u32, &t.shape, &packed)
                .map_err(io)?;
        } else if t.shape.len() == 2 && t.dtype == DType::F32 {
            // Embedding / output head: F16.
            let v = tensor_f32(t)?;
            w.add_tensor(t.name, DType::F16, &t.shape, &encode(&v, DType::F16))
                .map_err(io)?;
        } else {
            w.add_tensor_q(t.name, t.dtype, t.quant_param, &t.shape, t.data)
                .map_err(io)?;
        }
    }
    progress(total, total, "");
    Ok((w.finish().map_err(io)?, reports))
}
