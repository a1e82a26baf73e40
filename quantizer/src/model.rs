//! Whole-model quantization into the `.nib` integer group types.
//!
//! * RTN: every linear weight rounded on its own; no calibration.
//! * GPTQ: block by block. The calibration windows' hidden states enter a
//!   block; the inputs of each linear layer are collected into Hessians
//!   H = 2/N · Σ x·xᵀ; GPTQ quantizes the layer; then the *quantized* block
//!   produces the next block's inputs. With `true_sequential`, q/k/v are
//!   quantized first, then o sees inputs produced by the quantized q/k/v,
//!   then gate/up, then down; the inputs each sub-layer sees are then already
//!   the quantized block's, so one forward pass per block suffices (without
//!   it: the float block for the Hessians, then the quantized block). Only
//!   one block's activations live at a time.
//!
//! Norms stay F32; the embedding and output head are stored as F16.
//! Act-order with dynamic groups stores columns in processing order (groups
//! contiguous) plus the permutation as `<name>.perm`, applied by the runtime
//! once per input; static groups are contiguous in the original order, so
//! they need no permutation at run time.

use std::io::{Seek, Write};
use std::time::Instant;

use nibble_format::import::encode;
use nibble_format::quant::{pack_row, pack_row_q4gm, pack_row_q5_0};
use nibble_format::{
    keys, DType, HParams, MetadataBuilder, NibView, NibWriter, OwnedValue, TensorInfo,
};

use nibble_runtime::block::{boundary_width, finish_embedding, BlockBufs, Lin, Rope, Stage};

use crate::calib::{linear, CalibExec};
use crate::error::{QuantError, Result};
use crate::gptq::{
    gptq_prepared, prepare_hessian_in, rtn, rtn_kquant, ColumnOrder, GptqConfig, PreparedHessian,
    QuantizedLayer,
};
use crate::grid::Grid;
use crate::kquant::KQuant;
use crate::mix::{BlockType, GgufMix};

/// Quantization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Gptq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
        }
    }
}

/// Where the calibration windows came from (recorded as provenance).
#[derive(Clone, Debug, Default)]
pub struct CalibInfo {
    pub file: String,
    pub sha256: String,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

/// Settings of `nibble quantize`.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub method: Method,
    pub bits: u32,
    /// Columns per group; `None` = one group per row.
    pub group_size: Option<usize>,
    pub sym: bool,
    /// GPTQ: columns by decreasing diag H, stored permuted (`nibble
    /// quantize`'s default; the down projection's order is folded into the
    /// gate/up rows, so it has no `.perm`).
    pub act_order: bool,
    pub static_groups: bool,
    /// With `act_order`: keep each stored group's columns together
    /// ([`crate::gptq::ColumnOrder::ActByGroup`]), so no permutation is stored.
    pub act_order_groups: bool,
    pub true_sequential: bool,
    /// GPTQ: each group's grid by a weighted search ([`crate::Grid::search_params`]).
    pub scale_search: bool,
    /// What that search weights each squared error by.
    pub search_weight: crate::gptq::SearchWeight,
    /// Each group's minimum stored as an f16 value instead of an integer
    /// zero point (`Q4GM`, GGUF's Q4_1 grid; 4-bit asymmetric groups only).
    pub free_min: bool,
    /// GPTQ damping as a fraction of mean(diag H).
    pub damp: f64,
    /// Threads for the matrix products (the caller's rayon pool).
    pub threads: usize,
    pub calib: Option<CalibInfo>,
    /// GPTQ without calibration text: each layer's Hessian is the diagonal
    /// of these input statistics (a `llama-imatrix` file,
    /// [`crate::imatrix::read_imatrix`]), so only the weighted grid search
    /// acts ([`crate::imatrix::diagonal_hessian`]).
    pub imatrix: Option<Vec<crate::imatrix::ImatrixEntry>>,
    /// Store the token embedding and output head as RTN groups of 32 at
    /// these bits (4 or 8) instead of F16. On small models they are a large
    /// share of each token's bytes (SmolLM2: 49152 × 576 of ~135 M weights).
    pub head_bits: Option<u32>,
    /// A GGUF file type: each tensor's block type by llama.cpp's rules
    /// ([`GgufMix`]) instead of `bits` / `group_size` / `sym`, K-quant
    /// layers on their super-block grids ([`crate::kquant`]). Needs
    /// `act_order_groups` when `act_order` is set.
    pub gguf_mix: Option<GgufMix>,
}

/// Group size of a quantized embedding / output head.
pub const HEAD_GROUP_SIZE: usize = 32;

impl QuantizeOptions {
    pub fn rtn(bits: u32, group_size: Option<usize>, sym: bool) -> QuantizeOptions {
        QuantizeOptions {
            method: Method::Rtn,
            bits,
            group_size,
            sym,
            act_order: false,
            static_groups: false,
            act_order_groups: false,
            true_sequential: false,
            scale_search: false,
            search_weight: crate::gptq::SearchWeight::Importance,
            free_min: false,
            damp: 0.01,
            threads: 1,
            calib: None,
            imatrix: None,
            head_bits: None,
            gguf_mix: None,
        }
    }
}

/// Per-layer outcome for the report.
#[derive(Clone, Debug)]
pub struct LayerReport {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// GPTQ: ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs. RTN: ‖W − Ŵ‖² / ‖W‖².
    pub rel_error: f64,
    /// GPTQ only: RTN's relative output error on the same inputs.
    pub rel_error_rtn: Option<f64>,
    /// GPTQ only: the mean square of each input over the calibration
    /// tokens (diag H / 2), the statistics of an importance matrix.
    pub input_mean_sq: Option<Vec<f32>>,
}

/// Where the time went (seconds).
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub forward: f64,
    pub hessian: f64,
    pub gptq: f64,
    pub write: f64,
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
        && LINEAR
            .iter()
            .any(|l| name.ends_with(&format!(".{l}.weight")))
}

/// Is this the bias of an MLP layer that produces the down projection's
/// input (`ffn_gate` / `ffn_up`)?
fn is_producer_bias(name: &str) -> bool {
    name.starts_with("blk.") && (name.ends_with(".ffn_gate.bias") || name.ends_with(".ffn_up.bias"))
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
    nibble_format::dtype::decode_f32(t.dtype, t.data).ok_or_else(|| {
        QuantError::Shape(format!(
            "tensor '{}' is already {}; quantize from a float model",
            t.name, t.dtype
        ))
    })
}

/// The stored type of layers quantized on `grid` (validated bits).
fn layer_dtype(grid: &Grid) -> DType {
    if grid.free_min {
        DType::Q4GM
    } else if grid.bits == 5 {
        DType::Q5_0
    } else {
        DType::from_quant_bits(grid.bits).expect("validated")
    }
}

/// How one layer is quantized and stored.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LayerFormat {
    grid: Grid,
    group_size: usize,
    kquant: Option<KQuant>,
    dtype: DType,
}

impl LayerFormat {
    fn of_block(t: BlockType) -> LayerFormat {
        let group = |grid: Grid| LayerFormat {
            grid,
            group_size: 32,
            kquant: None,
            dtype: layer_dtype(&grid),
        };
        let signed = |bits| Grid::new(bits, true).expect("4, 5 and 8 bits are grids");
        match t {
            BlockType::K(kq) => LayerFormat {
                grid: kq.grid(),
                group_size: kq.group_size(),
                kquant: Some(kq),
                dtype: kq.dtype(),
            },
            BlockType::Q4_0 => group(signed(4)),
            BlockType::Q4_1 => group(Grid::free_min_4bit()),
            BlockType::Q5_0 => group(signed(5)),
            BlockType::Q8_0 => group(signed(8)),
        }
    }

    /// The stored tensor's quant parameter: the group size, or a GGUF
    /// block type's block (256 for the K-quants).
    fn quant_param(&self) -> usize {
        if self.kquant.is_some() {
            crate::kquant::SUPER_BLOCK
        } else {
            self.group_size
        }
    }

    /// RTN of a `[rows, cols]` weight in this format.
    fn rtn(&self, w: &[f32], rows: usize, cols: usize) -> Result<QuantizedLayer> {
        match self.kquant {
            Some(kq) => rtn_kquant(w, rows, cols, kq),
            None => rtn(w, rows, cols, self.grid, Some(self.group_size)),
        }
    }

    /// Pack `q` (quantized in this format); `order` as for [`pack_layer`].
    fn pack(&self, q: &QuantizedLayer, order: Option<&[usize]>) -> Vec<u8> {
        let Some(kq) = self.kquant else {
            return pack_layer(q, self.grid.bits, self.group_size, order);
        };
        let (n_groups, n_super) = (q.n_groups, q.super_scales.len() / q.rows);
        let mut out = Vec::new();
        for r in 0..q.rows {
            kq.pack_row(
                &q.codes[r * q.cols..(r + 1) * q.cols],
                &q.scales[r * n_groups..(r + 1) * n_groups],
                &q.zeros[r * n_groups..(r + 1) * n_groups],
                &q.super_scales[r * n_super..(r + 1) * n_super],
                &mut out,
            );
        }
        out
    }
}

/// Pack a quantized layer's rows (`Q4GM` when it has free minima, GGUF
/// `Q5_0` blocks at 5 bits); `order` lists original columns in storage order.
pub fn pack_layer(
    q: &QuantizedLayer,
    bits: u32,
    group_size: usize,
    order: Option<&[usize]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        q.rows
            * match bits {
                5 => q.cols / 32 * 22,
                _ => nibble_format::dtype::row_bytes(bits, q.cols, group_size),
            },
    );
    let mut zeros = vec![0u8; q.n_groups];
    let mut codes = vec![0u8; q.cols];
    for r in 0..q.rows {
        let g = r * q.n_groups..(r + 1) * q.n_groups;
        if !q.free_min {
            for (z, &v) in zeros.iter_mut().zip(&q.zeros[g.clone()]) {
                *z = v as u8;
            }
        }
        let row = &q.codes[r * q.cols..(r + 1) * q.cols];
        match order {
            Some(order) => {
                for (c, &o) in codes.iter_mut().zip(order) {
                    *c = row[o];
                }
            }
            None => codes.copy_from_slice(row),
        }
        if q.free_min {
            pack_row_q4gm(
                group_size,
                &codes,
                &q.scales[g.clone()],
                &q.zeros[g],
                &mut out,
            );
        } else if bits == 5 {
            pack_row_q5_0(&codes, &q.scales[g], &mut out);
        } else {
            pack_row(bits, group_size, &codes, &q.scales[g], &zeros, &mut out);
        }
    }
    out
}

/// Σ_r δ_r·H·δ_rᵀ / Σ_r w_r·H·w_rᵀ with δ = W − Ŵ: the relative output error
/// on the inputs that built H (H's scale cancels), for each of `quantized`
/// (the denominator is computed once).
fn rel_output_errors<const K: usize>(
    w: &[f32],
    quantized: [&[f32]; K],
    h: &[f32],
    rows: usize,
    cols: usize,
    threads: usize,
) -> [f64; K] {
    let mut mh = vec![0f32; rows * cols];
    let mut quad = |m: &[f32]| {
        linear(m, h, rows, cols, cols, &mut mh, threads);
        m.iter()
            .zip(&mh)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum::<f64>()
    };
    let den = quad(w);
    quantized.map(|wq| {
        let delta: Vec<f32> = w.iter().zip(wq).map(|(a, b)| a - b).collect();
        if den > 0.0 {
            quad(&delta) / den
        } else {
            0.0
        }
    })
}

/// Where a layer stands in folding an act-order permutation into the
/// layers that produce its input. The down projection's input is the SwiGLU
/// of the gate and up projections' outputs, element by element: storing
/// gate's and up's rows in the order down's columns are processed makes
/// that input come out already permuted, so down needs no `.perm` tensor and
/// the runtime no gather for it ("folds it into the producer").
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// Written as it is, with its `.perm` tensor if it has one.
    No,
    /// Its packed rows wait for the consumer's processing order
    /// ([`Ctx::held`]); its own `.perm` (of its input) is written.
    Producer,
    /// Its processing order becomes the held producers' row order instead
    /// of a `.perm` tensor; then the producers are written.
    Consumer,
}

/// A packed weight waiting for its row order ([`Fold::Producer`]).
struct HeldRows {
    name: String,
    /// The layer's bias (F32), whose entries follow its rows.
    bias: Option<Vec<f32>>,
    dtype: DType,
    group_size: usize,
    rows: usize,
    cols: usize,
    packed: Vec<u8>,
}

struct Ctx<'a, 'p, W: Write + Seek> {
    src: &'a NibView<'a>,
    progress: &'p mut dyn FnMut(usize, usize, &str),
    opts: &'a QuantizeOptions,
    grid: Grid,
    n_layer: usize,
    writer: NibWriter<W>,
    reports: Vec<LayerReport>,
    timings: Timings,
    done: usize,
    total: usize,
    /// Producers of the next [`Fold::Consumer`]'s input, not yet written.
    held: Vec<HeldRows>,
    /// The current Hessian prepared in each column order its layers need
    /// (cleared when the next Hessian comes).
    prepared: Vec<(ColumnOrder, PreparedHessian)>,
}

impl<W: Write + Seek> Ctx<'_, '_, W> {
    /// The format of linear weight `name` with `cols` inputs.
    fn format_of(&self, name: &str, cols: usize) -> LayerFormat {
        match self.opts.gguf_mix {
            Some(mix) => LayerFormat::of_block(mix.layer_type(
                name,
                self.n_layer,
                cols,
                self.opts.method == Method::Gptq,
            )),
            None => LayerFormat {
                grid: self.grid,
                group_size: effective_group_size(self.opts.group_size, cols),
                kquant: None,
                dtype: layer_dtype(&self.grid),
            },
        }
    }

    /// The current Hessian `h` damped, inverted and factored in the order
    /// format `f` needs, once for all the layers that share it.
    fn prepare(&mut self, h: &[f32], cols: usize, f: &LayerFormat) -> Result<usize> {
        let o = self.opts;
        let order = match (o.act_order, o.act_order_groups, f.kquant) {
            (false, _, _) => ColumnOrder::Stored,
            (true, _, Some(kq)) => ColumnOrder::ActBySuperBlock(kq.group_size()),
            (true, false, None) => ColumnOrder::Act,
            (true, true, None) => ColumnOrder::ActByGroup(f.group_size),
        };
        if let Some(i) = self.prepared.iter().position(|(o, _)| *o == order) {
            return Ok(i);
        }
        let t = Instant::now();
        let p = prepare_hessian_in(h, cols, order, o.damp)?;
        self.timings.gptq += t.elapsed().as_secs_f64();
        self.prepared.push((order, p));
        Ok(self.prepared.len() - 1)
    }

    fn report(&mut self, what: &str) {
        (self.progress)(self.done, self.total, what);
    }

    fn tensor(&self, name: &str) -> Result<&TensorInfo<'_>> {
        self.src
            .tensor(name)
            .ok_or_else(|| QuantError::Shape(format!("missing tensor '{name}'")))
    }

    /// Quantize one linear weight (with Hessian `h` for GPTQ), write it, and
    /// return the dequantized weights in original column order.
    fn quantize_one(
        &mut self,
        name: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        h: Option<&[f32]>,
        fold: Fold,
    ) -> Result<Vec<f32>> {
        self.report(name);
        let o = self.opts;
        let f = self.format_of(name, cols);
        let gs = f.group_size;
        let t0 = Instant::now();
        let (mut q, report) = match h {
            None => {
                let q = f.rtn(w, rows, cols)?;
                let deq = q.dequantize();
                let (num, den) = w.iter().zip(&deq).fold((0f64, 0f64), |(n, d), (a, b)| {
                    (n + f64::from(a - b).powi(2), d + f64::from(*a).powi(2))
                });
                let rel = if den > 0.0 { num / den } else { 0.0 };
                (q, (rel, None))
            }
            Some(h) => {
                let cfg = GptqConfig {
                    grid: f.grid,
                    group_size: Some(gs),
                    act_order: o.act_order,
                    static_groups: o.static_groups,
                    damp: o.damp,
                    block_size: 128,
                    threads: o.threads,
                    scale_search: o.scale_search || f.kquant.is_some(),
                    search_weight: o.search_weight,
                    kquant: f.kquant,
                };
                let i = self.prepare(h, cols, &f)?;
                let q = gptq_prepared(w, &self.prepared[i].1, rows, cols, &cfg)?;
                let rtn_q = f.rtn(w, rows, cols)?.dequantize();
                let [e, e_rtn] =
                    rel_output_errors(w, [&q.dequantize(), &rtn_q], h, rows, cols, o.threads);
                (q, (e, Some(e_rtn)))
            }
        };
        self.timings.gptq += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let permuted = o.act_order && !o.static_groups && !o.act_order_groups && h.is_some();
        if permuted {
            // Each group's columns in input order: the order within a group
            // changes no code, and a GPTQ checkpoint's g_idx does not record
            // it, so export → import gives this file back bit for bit.
            let g_idx = &q.g_idx;
            q.perm.sort_unstable_by_key(|&c| (g_idx[c], c));
        }
        let packed = f.pack(&q, permuted.then_some(&q.perm[..]));
        let dtype = f.dtype;
        if fold == Fold::Producer {
            let bias = match self.src.tensor(&name.replace(".weight", ".bias")) {
                Some(t) => Some(tensor_f32(t)?),
                None => None,
            };
            self.held.push(HeldRows {
                name: name.to_string(),
                bias,
                dtype,
                group_size: f.quant_param(),
                rows,
                cols,
                packed,
            });
        } else {
            self.writer.add_tensor_q(
                name,
                dtype,
                f.quant_param() as u32,
                &[rows as u64, cols as u64],
                &packed,
            )?;
        }
        if fold == Fold::Consumer && permuted {
            // The folded order itself, for what is given in the original
            // order of the hidden units (LoRA adapters at run time).
            let order: Vec<u8> = q
                .perm
                .iter()
                .flat_map(|&p| (p as u32).to_le_bytes())
                .collect();
            self.writer.add_tensor(
                &name.replace(".weight", ".fold"),
                DType::U32,
                &[cols as u64],
                &order,
            )?;
        }
        if fold == Fold::Consumer {
            // Producer row j is original row perm[j] (identity if this layer
            // kept its column order).
            for held in std::mem::take(&mut self.held) {
                let row_bytes = held.packed.len() / held.rows;
                let rows: Vec<u8> = if permuted {
                    q.perm
                        .iter()
                        .flat_map(|&r| &held.packed[r * row_bytes..(r + 1) * row_bytes])
                        .copied()
                        .collect()
                } else {
                    held.packed
                };
                self.writer.add_tensor_q(
                    &held.name,
                    held.dtype,
                    held.group_size as u32,
                    &[held.rows as u64, held.cols as u64],
                    &rows,
                )?;
                if let Some(bias) = held.bias {
                    let bias: Vec<f32> = if permuted {
                        q.perm.iter().map(|&r| bias[r]).collect()
                    } else {
                        bias
                    };
                    self.writer.add_tensor(
                        &held.name.replace(".weight", ".bias"),
                        DType::F32,
                        &[held.rows as u64],
                        &encode(&bias, DType::F32),
                    )?;
                }
            }
        } else if permuted {
            let perm: Vec<u8> = q
                .perm
                .iter()
                .flat_map(|&p| (p as u32).to_le_bytes())
                .collect();
            self.writer.add_tensor(
                &name.replace(".weight", ".perm"),
                DType::U32,
                &[cols as u64],
                &perm,
            )?;
        }
        self.timings.write += t1.elapsed().as_secs_f64();
        self.reports.push(LayerReport {
            name: name.to_string(),
            rows,
            cols,
            rel_error: report.0,
            rel_error_rtn: report.1,
            input_mean_sq: h.map(|h| (0..cols).map(|i| h[i * cols + i] / 2.0).collect()),
        });
        self.done += 1;
        Ok(q.dequantize())
    }
}

/// Quantize every linear weight of `src` into `out`; GPTQ needs `calib`
/// (equal-length token windows). `progress(done, total, what)` counts layers.
pub fn quantize_model<W: Write + Seek>(
    src: &NibView<'_>,
    opts: &QuantizeOptions,
    calib: Option<&[Vec<u32>]>,
    out: W,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(W, Vec<LayerReport>, Timings)> {
    let grid = if opts.free_min {
        if opts.bits != 4 || opts.sym || opts.group_size.is_none() {
            return Err(QuantError::FreeMin {
                bits: opts.bits,
                sym: opts.sym,
                group_size: opts.group_size,
            });
        }
        Grid::free_min_4bit()
    } else if opts.bits == 5 && !(opts.sym && opts.group_size == Some(32)) {
        return Err(QuantError::FiveBit {
            sym: opts.sym,
            group_size: opts.group_size,
        });
    } else {
        Grid::new(opts.bits, opts.sym)?
    };
    let head_grid = match opts.head_bits {
        None => None,
        Some(b @ (4 | 8)) => Some(Grid::new(b, false)?),
        Some(b) => {
            return Err(QuantError::Shape(format!(
                "head bits {b}: the embedding / output head can be stored at 4 or 8 bits"
            )))
        }
    };
    if let Some(g) = opts.group_size {
        if g == 0 || g % 32 != 0 {
            return Err(QuantError::BadGroupSize {
                group_size: g,
                cols: 0,
            });
        }
    }
    if !(opts.damp.is_finite() && opts.damp > 0.0) {
        return Err(QuantError::BadDamp(opts.damp));
    }
    if opts.gguf_mix.is_some() {
        let permuted = opts.method == Method::Gptq
            && opts.act_order
            && !opts.static_groups
            && !opts.act_order_groups;
        if permuted || opts.head_bits.is_some() || opts.free_min {
            return Err(QuantError::Shape(
                "a GGUF mix fixes every tensor's type and keeps groups whole: no scattered act-order, head bits or free minimum".into(),
            ));
        }
    }
    let hp = HParams::read(&src.metadata)?;
    // Everything is checked before any heavy work.
    for t in src
        .tensors
        .iter()
        .filter(|t| is_linear(t.name) || t.name == "token_embd.weight")
    {
        let blocks_of_32 = opts.bits == 5 || opts.gguf_mix.is_some();
        if blocks_of_32 && is_linear(t.name) && t.shape.get(1).is_some_and(|c| c % 32 != 0) {
            return Err(QuantError::Shape(format!(
                "tensor '{}' has {} inputs; GGUF blocks need a multiple of 32",
                t.name, t.shape[1]
            )));
        }
        let v = tensor_f32(t)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(QuantError::NonFinite {
                what: "weights",
                index: i,
            })
            .map_err(|e| QuantError::Shape(format!("tensor '{}': {e}", t.name)));
        }
    }
    if let Some(entries) = &opts.imatrix {
        if opts.method != Method::Gptq || calib.is_some() {
            return Err(QuantError::Calibration(
                "an importance matrix replaces the calibration text of GPTQ: give one or the other"
                    .into(),
            ));
        }
        // Every linear layer needs its statistics, of its own width.
        for t in src.tensors.iter().filter(|t| is_linear(t.name)) {
            let cols = t.shape.get(1).copied().unwrap_or(0) as usize;
            match entries.iter().find(|e| e.name == t.name) {
                Some(e) if e.sum_sq.len() == cols => {}
                Some(e) => {
                    return Err(QuantError::Calibration(format!(
                        "the importance matrix has {} inputs for '{}', the model {cols}",
                        e.sum_sq.len(),
                        t.name
                    )))
                }
                None => {
                    return Err(QuantError::Calibration(format!(
                        "the importance matrix has no entry for '{}' (made for another model?)",
                        t.name
                    )))
                }
            }
        }
    }
    let windows = match (opts.method, calib) {
        (Method::Rtn, _) => None,
        (Method::Gptq, None) if opts.imatrix.is_some() => None,
        (Method::Gptq, None) => {
            return Err(QuantError::Calibration(
                "GPTQ needs calibration text".into(),
            ))
        }
        (Method::Gptq, Some(w)) => {
            let len = w.first().map_or(0, Vec::len);
            if w.is_empty() || len == 0 || w.iter().any(|s| s.len() != len) {
                return Err(QuantError::Calibration(
                    "windows must be non-empty and of equal length".into(),
                ));
            }
            if let Some(&t) = w.iter().flatten().find(|&&t| t as usize >= hp.n_vocab) {
                return Err(QuantError::Calibration(format!(
                    "token id {t} outside the vocabulary"
                )));
            }
            Some(w)
        }
    };

    let mut meta = MetadataBuilder::from(&src.metadata);
    meta.set(
        keys::QUANT_METHOD,
        OwnedValue::Str(opts.method.name().into()),
    );
    let (dtype_name, bits) = match opts.gguf_mix {
        Some(mix) => (mix.name(), mix.bits()),
        None => (layer_dtype(&grid).name(), opts.bits),
    };
    meta.set(keys::QUANT_DTYPE, OwnedValue::Str(dtype_name.into()));
    meta.set(keys::QUANT_BITS, OwnedValue::U64(bits.into()));
    meta.set(
        keys::QUANT_GROUP_SIZE,
        OwnedValue::U64(opts.group_size.unwrap_or(0) as u64),
    );
    meta.set(keys::QUANT_SYM, OwnedValue::Bool(opts.sym));
    if let Some(b) = opts.head_bits {
        meta.set(keys::QUANT_HEAD_BITS, OwnedValue::U64(b.into()));
    }
    if opts.method == Method::Gptq {
        meta.set(keys::QUANT_ACT_ORDER, OwnedValue::Bool(opts.act_order));
        meta.set(
            keys::QUANT_STATIC_GROUPS,
            OwnedValue::Bool(opts.static_groups),
        );
        meta.set(
            keys::QUANT_TRUE_SEQUENTIAL,
            OwnedValue::Bool(opts.true_sequential),
        );
        meta.set(keys::QUANT_DAMP, OwnedValue::F64(opts.damp));
    }
    if let Some(c) = &opts.calib {
        meta.set(keys::QUANT_CALIB_FILE, OwnedValue::Str(c.file.clone()));
        meta.set(keys::QUANT_CALIB_SHA256, OwnedValue::Str(c.sha256.clone()));
        meta.set(keys::QUANT_NSAMPLES, OwnedValue::U64(c.nsamples as u64));
        meta.set(keys::QUANT_SEQLEN, OwnedValue::U64(c.seqlen as u64));
        meta.set(keys::QUANT_SEED, OwnedValue::U64(c.seed));
    }
    meta.set(
        keys::PROV_TOOL,
        OwnedValue::Str(format!("nibble-quantizer {}", env!("CARGO_PKG_VERSION"))),
    );
    meta.set(
        keys::PROV_CREATED,
        OwnedValue::Str(nibble_format::hparams::utc_now_rfc3339()),
    );
    let mut ctx = Ctx {
        src,
        progress,
        opts,
        grid,
        n_layer: hp.n_layer,
        writer: NibWriter::new(out, &meta)?,
        reports: Vec::new(),
        timings: Timings::default(),
        done: 0,
        total: src.tensors.iter().filter(|t| is_linear(t.name)).count(),
        held: Vec::new(),
        prepared: Vec::new(),
    };

    // Tensors that are not quantized: norms as they are, 2-D floats as F16
    // (or the embedding / head as RTN groups with `head_bits`).
    for t in &src.tensors {
        if is_linear(t.name) || (windows.is_some() && is_producer_bias(t.name)) {
            // GPTQ writes the biases of the layers that produce the down
            // projection's input with their (possibly permuted) rows.
            continue;
        }
        let is_head = matches!(t.name, "token_embd.weight" | "output.weight");
        if let (true, Some(mix), [rows, cols]) = (is_head, opts.gguf_mix, &t.shape[..]) {
            // llama.cpp's types: the head's (a tied embedding is the head),
            // else the mix's base type; a head left float is written as
            // llama.cpp's Q8_0 by the GGUF export.
            let (rows, cols) = (*rows as usize, *cols as usize);
            let tied = src.tensor("output.weight").is_none();
            let ty = if t.name == "output.weight" || tied {
                mix.head_type(cols)
            } else {
                Some(mix.embedding_type(cols))
            };
            if let Some(ty) = ty {
                let f = LayerFormat::of_block(ty);
                let q = f.rtn(&tensor_f32(t)?, rows, cols)?;
                ctx.writer.add_tensor_q(
                    t.name,
                    f.dtype,
                    f.quant_param() as u32,
                    &t.shape,
                    &f.pack(&q, None),
                )?;
                continue;
            }
        }
        if let (true, Some(hg), [rows, cols]) = (is_head, head_grid, &t.shape[..]) {
            let (rows, cols) = (*rows as usize, *cols as usize);
            let v = tensor_f32(t)?;
            let gs = HEAD_GROUP_SIZE.min(cols);
            let gs = if nibble_format::dtype::valid_group_size(gs as u64, cols as u64) {
                gs
            } else {
                cols
            };
            let q = rtn(&v, rows, cols, hg, Some(gs))?;
            let packed = pack_layer(&q, hg.bits, gs, None);
            let dtype = DType::from_quant_bits(hg.bits).expect("4 or 8");
            ctx.writer
                .add_tensor_q(t.name, dtype, gs as u32, &t.shape, &packed)?;
            continue;
        }
        if t.shape.len() == 2 && t.dtype == DType::F32 {
            let v = tensor_f32(t)?;
            ctx.writer
                .add_tensor(t.name, DType::F16, &t.shape, &encode(&v, DType::F16))?;
        } else {
            ctx.writer
                .add_tensor_q(t.name, t.dtype, t.quant_param, &t.shape, t.data)?;
        }
    }

    match windows {
        None => {
            for t in &src.tensors {
                if !is_linear(t.name) {
                    continue;
                }
                let [rows, cols] = t.shape[..] else {
                    return Err(QuantError::Shape(format!("'{}' is not 2-D", t.name)));
                };
                let (rows, cols) = (rows as usize, cols as usize);
                let w = tensor_f32(t)?;
                let entry = opts
                    .imatrix
                    .as_ref()
                    .and_then(|m| m.iter().find(|e| e.name == t.name));
                match entry {
                    Some(e) => {
                        let h = crate::imatrix::diagonal_hessian(e);
                        ctx.prepared.clear();
                        ctx.quantize_one(t.name, &w, rows, cols, Some(&h), Fold::No)?;
                    }
                    None => {
                        ctx.quantize_one(t.name, &w, rows, cols, None, Fold::No)?;
                    }
                }
            }
        }
        Some(windows) => gptq_blocks(&mut ctx, &hp, windows)?,
    }
    ctx.done = ctx.total;
    ctx.report("");
    let Ctx {
        writer,
        reports,
        mut timings,
        ..
    } = ctx;
    let t = Instant::now();
    let w = writer.finish()?;
    timings.write += t.elapsed().as_secs_f64();
    Ok((w, reports, timings))
}

/// What the progress line says while stage `s` of a block runs.
fn stage_label(s: Stage) -> &'static str {
    match s {
        Stage::AttnInput => "q/k/v inputs",
        Stage::Attention => "attention",
        Stage::FfnInput => "MLP inputs",
        Stage::FfnHidden => "MLP activations",
        Stage::FfnOutput => "block output",
    }
}

/// GPTQ of the linear layers that read the input stage `s` ends with, on
/// its Hessian `h`; their dequantized weights replace the float ones in
/// `exec`. The MLP's first layers (gate/up, or up alone) are the producers
/// of the down projection's input, element by element through the
/// activation, so down's act-order permutation is folded into their rows.
fn quantize_group<W: Write + Seek>(
    ctx: &mut Ctx<'_, '_, W>,
    exec: &mut CalibExec,
    l: usize,
    s: Stage,
    h: &[f32],
    gated: bool,
) -> Result<()> {
    let cols = (h.len() as f64).sqrt() as usize;
    ctx.prepared.clear();
    for &w in s.consumers(gated) {
        let name = format!("blk.{l}.{}.weight", w.role());
        let weights = exec.weight(w).to_vec();
        let rows = weights.len() / cols;
        let fold = match w {
            Lin::Gate | Lin::Up => Fold::Producer,
            Lin::Down => Fold::Consumer,
            _ => Fold::No,
        };
        let deq = ctx.quantize_one(&name, &weights, rows, cols, Some(h), fold)?;
        exec.set_weight(w, deq);
    }
    Ok(())
}

/// GPTQ block by block through the runtime's own block ([`block_stage`] via
/// [`CalibExec`]), its hook collecting each linear group's inputs.
///
/// With true-sequential the block runs one [`Stage`] at a time over every
/// window: a stage first multiplies by the group the previous stage's
/// Hessian has just quantized, then ends at the next group's input, which
/// the hook adds to that group's Hessian. So every group sees inputs made by
/// the already quantized layers before it, in one pass per block; between
/// stages each window keeps its residual stream (`x`) and the stage's
/// output (`act`, the widest stage boundary). Without it: the float block
/// collects all four Hessians, then the quantized block makes the next
/// block's inputs.
fn gptq_blocks<W: Write + Seek>(
    ctx: &mut Ctx<'_, '_, W>,
    hp: &HParams,
    windows: &[Vec<u32>],
) -> Result<()> {
    let threads = ctx.opts.threads;
    let seqlen = windows[0].len();
    let n_seq = windows.len();
    let n = n_seq * seqlen;
    let e = hp.n_embd;
    let gated = hp.desc.activation.gated();
    let mut exec = CalibExec::new(hp, seqlen, threads)?;
    let rope = Rope::new(hp, seqlen);
    let mut b = BlockBufs::new(hp, seqlen);

    // Block 0's inputs: the embeddings of every calibration token.
    let t0 = Instant::now();
    let mut x = vec![0f32; n * e];
    {
        let embd = tensor_f32(ctx.tensor("token_embd.weight")?)?;
        let pos = match ctx.src.tensor("pos_embd.weight") {
            Some(t) => {
                let p = tensor_f32(t)?;
                if p.len() < seqlen * e {
                    return Err(QuantError::Calibration(format!(
                        "windows of {seqlen} tokens exceed the model's {} learned positions",
                        p.len() / e
                    )));
                }
                Some(p)
            }
            None => None,
        };
        for (i, (row, &tok)) in x
            .chunks_exact_mut(e)
            .zip(windows.iter().flatten())
            .enumerate()
        {
            let tok = tok as usize;
            row.copy_from_slice(&embd[tok * e..(tok + 1) * e]);
            let p = i % seqlen;
            finish_embedding(&hp.desc, row, pos.as_ref().map(|v| &v[p * e..(p + 1) * e]));
        }
    }
    ctx.timings.forward += t0.elapsed().as_secs_f64();
    let ts = ctx.opts.true_sequential;
    let width = if ts {
        Stage::ALL
            .iter()
            .map(|&s| boundary_width(hp, s))
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let mut act = vec![0f32; n * width];
    let rows_e = seqlen * e;

    for l in 0..hp.n_layer {
        exec.load_layer(ctx.src, l)?;
        if ts {
            let mut prev: Option<Stage> = None;
            for s in Stage::ALL {
                ctx.report(&format!("block {l}: {}", stage_label(s)));
                exec.collect(s);
                let (t, h0) = (Instant::now(), exec.hessian_secs);
                let reads_x = matches!(s, Stage::AttnInput | Stage::FfnInput | Stage::FfnOutput);
                let writes_x = matches!(s, Stage::FfnInput | Stage::FfnOutput);
                for w in 0..n_seq {
                    let xs = &mut x[w * rows_e..(w + 1) * rows_e];
                    let slot = &mut act[w * seqlen * width..(w + 1) * seqlen * width];
                    if reads_x {
                        b.x[..rows_e].copy_from_slice(xs);
                    }
                    if let Some(p) = prev {
                        let len = seqlen * boundary_width(hp, p);
                        b.boundary_mut(p)[..len].copy_from_slice(&slot[..len]);
                    }
                    exec.run(l, &mut b, &rope, s);
                    if writes_x {
                        xs.copy_from_slice(&b.x[..rows_e]);
                    }
                    if s != Stage::FfnOutput {
                        let len = seqlen * boundary_width(hp, s);
                        slot[..len].copy_from_slice(&b.boundary(s)[..len]);
                    }
                }
                let hes = exec.hessian_secs - h0;
                ctx.timings.hessian += hes;
                ctx.timings.forward += t.elapsed().as_secs_f64() - hes;
                if let Some(h) = exec.take_hessian(s, n) {
                    quantize_group(ctx, &mut exec, l, s, &h, gated)?;
                }
                prev = Some(s);
            }
        } else {
            // The float block collects every Hessian …
            ctx.report(&format!("block {l}: float forward"));
            for s in Stage::ALL {
                exec.collect(s);
            }
            let (t, h0) = (Instant::now(), exec.hessian_secs);
            for xs in x.chunks_exact(rows_e) {
                b.x[..rows_e].copy_from_slice(xs);
                for s in Stage::ALL {
                    exec.run(l, &mut b, &rope, s);
                }
            }
            let hes = exec.hessian_secs - h0;
            ctx.timings.hessian += hes;
            ctx.timings.forward += t.elapsed().as_secs_f64() - hes;
            for s in Stage::ALL {
                if let Some(h) = exec.take_hessian(s, n) {
                    quantize_group(ctx, &mut exec, l, s, &h, gated)?;
                }
            }
            // … then the quantized block makes the next block's inputs.
            ctx.report(&format!("block {l}: quantized forward"));
            let t = Instant::now();
            for xs in x.chunks_exact_mut(rows_e) {
                b.x[..rows_e].copy_from_slice(xs);
                for s in Stage::ALL {
                    exec.run(l, &mut b, &rope, s);
                }
                xs.copy_from_slice(&b.x[..rows_e]);
            }
            ctx.timings.forward += t.elapsed().as_secs_f64();
        }
    }
    Ok(())
}
