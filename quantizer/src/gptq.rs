//! GPTQ (Frantar et al., 2022) and round-to-nearest on one linear layer,
//! following the authors' reference `fasterquant` step for step (the
//! conventions are listed in `../shared/fixtures/gptq-reference/README.md`,
//! whose six cases the tests reproduce).
//!
//! Work is in f64 (weights, Hessian, inverse); grids and dequantized values
//! are reported in f32 like the reference. Shapes: `w` is `[rows, cols]`
//! row-major (`rows` = outputs, `cols` = inputs), `h` is `[cols, cols]`.

use crate::error::{QuantError, Result};
use crate::grid::Grid;
use crate::kquant::{KQuant, SUPER_BLOCK};
use crate::linalg::upper_factor_of_inverse;
use rayon::prelude::*;

/// GPTQ settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqConfig {
    pub grid: Grid,
    /// Columns per group; `None` = one group per row (per channel).
    pub group_size: Option<usize>,
    /// Process columns by descending Hessian diagonal.
    pub act_order: bool,
    /// With act-order: groups are fixed contiguous original columns, computed up front.
    pub static_groups: bool,
    /// Damping as a fraction of mean(diag H).
    pub damp: f64,
    /// Columns per lazy-update block.
    pub block_size: usize,
    /// Threads for the lazy block updates (the caller's rayon pool).
    pub threads: usize,
    /// Choose each group's (scale, zero) by [`Grid::search_params`] on the
    /// group's current (error-updated) weights, each column's error weighted
    /// by its Hessian diagonal (the mean square of its input, what llama.cpp
    /// calls the importance matrix), instead of the reference's min/max of
    /// the weights as they were when the lazy-update block began.
    ///
    /// Measured on SmolLM2 (Q4_0 grid, Shakespeare calibration, wikitext-2):
    /// weighting by diag H gave 22.76, by GPTQ's own per-column cost
    /// 1 / [H⁻¹]ⱼⱼ² 23.44, by llama.cpp's diag H · √(σ² + w²) 23.34.
    pub scale_search: bool,
    /// What the search weights each squared error by.
    pub search_weight: SearchWeight,
    /// Sub-block grids of a GGUF K-quant ([`KQuant`]): `grid` and
    /// `group_size` must be its own, the columns a multiple of 256, and the
    /// order [`ColumnOrder::Stored`] or [`ColumnOrder::ActBySuperBlock`].
    /// Each super-block's grids are chosen together ([`KQuant::choose`])
    /// when its first column is reached, on the current weights, weighted by
    /// diag H.
    pub kquant: Option<KQuant>,
}

/// The weight of each value's squared error in the grid search
/// ([`GptqConfig::scale_search`], K-quant super-blocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SearchWeight {
    /// Its column's Hessian diagonal (the importance): nibble's default.
    #[default]
    Importance,
    /// llama.cpp's with an importance matrix: importance · √(σ² + w²), σ²
    /// the mean square of the row (Q4_0, Q4_1, Q5_0 groups) or twice that
    /// of the super-block (Q3_K, Q4_K, Q5_K; Q6_K uses the importance
    /// alone, as llama.cpp does). Static and per-channel groups keep the
    /// importance.
    LlamaCpp,
}

impl SearchWeight {
    /// The search weights of values `x` whose columns have importance
    /// `imp`, with `sigma2` as above (computed only when used); `buf` holds
    /// them when computed.
    fn of<'a>(
        self,
        x: &[f64],
        imp: &'a [f64],
        sigma2: impl FnOnce() -> f64,
        buf: &'a mut [f64],
    ) -> &'a [f64] {
        match self {
            SearchWeight::Importance => imp,
            SearchWeight::LlamaCpp => {
                let sigma2 = sigma2();
                let buf = &mut buf[..x.len()];
                for ((o, &i), &v) in buf.iter_mut().zip(imp).zip(x) {
                    *o = i * (sigma2 + v * v).sqrt();
                }
                buf
            }
        }
    }
}

impl GptqConfig {
    pub fn new(bits: u32, group_size: Option<usize>, sym: bool) -> Result<GptqConfig> {
        Ok(GptqConfig {
            grid: Grid::new(bits, sym)?,
            group_size,
            act_order: false,
            static_groups: false,
            damp: 0.01,
            block_size: 128,
            threads: 1,
            scale_search: false,
            search_weight: SearchWeight::Importance,
            kquant: None,
        })
    }

    /// GPTQ onto a K-quant's own grids (scale search on, its sub-blocks as groups).
    pub fn kquant(kq: KQuant) -> GptqConfig {
        GptqConfig {
            grid: kq.grid(),
            group_size: Some(kq.group_size()),
            act_order: false,
            static_groups: false,
            damp: 0.01,
            block_size: 128,
            threads: 1,
            scale_search: true,
            search_weight: SearchWeight::Importance,
            kquant: Some(kq),
        }
    }
}

/// A quantized layer.
#[derive(Clone, Debug)]
pub struct QuantizedLayer {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]` integer codes in 0..=maxq, original column order.
    pub codes: Vec<u8>,
    /// `[rows, n_groups]` scales; group k is the k-th in processing order.
    pub scales: Vec<f32>,
    /// `[rows, n_groups]` zero points (integers, as f32); with
    /// [`QuantizedLayer::free_min`], each group's minimum.
    pub zeros: Vec<f32>,
    /// Quantized on the free-minimum grid ([`Grid::free_min`]):
    /// ŵ = scale · code + min.
    pub free_min: bool,
    pub n_groups: usize,
    /// For each original column, its group (column of `scales`).
    pub g_idx: Vec<u32>,
    /// Processing order: position `j` handled original column `perm[j]`.
    pub perm: Vec<usize>,
    /// Damping actually added to diag H (after any automatic increase).
    pub damp_added: f64,
    /// The reference's printed error: ½ Σ (w − q)² / `Hinv[i,i]`².
    pub error: f64,
    /// K-quants: `[rows, cols / 256]` super-block `[d, dmin]`, stored order
    /// (empty otherwise); `scales` and `zeros` hold each sub-block's
    /// effective `d·sc` and `−dmin·m`.
    pub super_scales: Vec<[f32; 2]>,
}

impl QuantizedLayer {
    /// A zeroed layer of contiguous groups of `gs` columns in stored order
    /// (what RTN fills), with `n_super` K-quant super-blocks per row.
    fn stored_groups(
        rows: usize,
        cols: usize,
        gs: usize,
        free_min: bool,
        n_super: usize,
    ) -> QuantizedLayer {
        let n_groups = cols.div_ceil(gs);
        QuantizedLayer {
            rows,
            cols,
            codes: vec![0; rows * cols],
            scales: vec![0.0; rows * n_groups],
            zeros: vec![0.0; rows * n_groups],
            free_min,
            n_groups,
            g_idx: (0..cols).map(|c| (c / gs) as u32).collect(),
            perm: (0..cols).collect(),
            damp_added: 0.0,
            error: 0.0,
            super_scales: vec![[0.0; 2]; rows * n_super],
        }
    }

    /// Dequantized `[rows, cols]` weights, original column order.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let g = self.g_idx[c] as usize;
                let (s, z) = (
                    self.scales[r * self.n_groups + g],
                    self.zeros[r * self.n_groups + g],
                );
                let code = f32::from(self.codes[r * self.cols + c]);
                out[r * self.cols + c] = if self.free_min {
                    s * code + z
                } else {
                    s * (code - z)
                };
            }
        }
        out
    }
}

fn check_inputs(w: &[f32], rows: usize, cols: usize, group_size: Option<usize>) -> Result<()> {
    if rows == 0 || cols == 0 || w.len() != rows * cols {
        return Err(QuantError::Shape(format!(
            "weight has {} values, expected {rows}×{cols}",
            w.len()
        )));
    }
    if let Some(g) = group_size {
        if g == 0 || g > cols {
            return Err(QuantError::BadGroupSize {
                group_size: g,
                cols,
            });
        }
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            what: "weights",
            index: i,
        });
    }
    Ok(())
}

/// Per-row (scale, zero) of columns `cols_of` of the row-major `w` (`n` wide).
fn row_params(
    grid: &Grid,
    w: &[f64],
    n: usize,
    rows: usize,
    cols_of: impl Iterator<Item = usize> + Clone,
) -> Vec<(f64, f64)> {
    (0..rows)
        .map(|r| {
            let (s, z) = grid.find_params(cols_of.clone().map(|c| w[r * n + c]));
            // The reference's grids stay unrounded; a free minimum is f16 by nature.
            if grid.free_min {
                grid.stored(s, z)
            } else {
                (s, z)
            }
        })
        .collect()
}

/// Round-to-nearest with the same grids: contiguous groups of original columns.
pub fn rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    grid: Grid,
    group_size: Option<usize>,
) -> Result<QuantizedLayer> {
    check_inputs(w, rows, cols, group_size)?;
    let gs = group_size.unwrap_or(cols);
    let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    let mut layer = QuantizedLayer::stored_groups(rows, cols, gs, grid.free_min, 0);
    let n_groups = layer.n_groups;
    for g in 0..n_groups {
        let span = g * gs..((g + 1) * gs).min(cols);
        let params = row_params(&grid, &w64, cols, rows, span.clone());
        for (r, &(s, z)) in params.iter().enumerate() {
            layer.scales[r * n_groups + g] = s as f32;
            layer.zeros[r * n_groups + g] = z as f32;
            for c in span.clone() {
                layer.codes[r * cols + c] =
                    grid.code_f32(w[r * cols + c], s as f32, z as f32) as u8;
            }
        }
    }
    Ok(layer)
}

/// Round-to-nearest onto a K-quant's grids: each super-block's grids
/// chosen by [`KQuant::choose`] with every weight's error counting alike.
pub fn rtn_kquant(w: &[f32], rows: usize, cols: usize, kq: KQuant) -> Result<QuantizedLayer> {
    let gs = kq.group_size();
    check_inputs(w, rows, cols, Some(gs))?;
    check_kquant_cols(kq, cols)?;
    let grid = kq.grid();
    let (n_groups, n_super) = (cols / gs, cols / SUPER_BLOCK);
    let mut layer = QuantizedLayer::stored_groups(rows, cols, gs, grid.free_min, n_super);
    let ones = [1f64; SUPER_BLOCK];
    let mut params = vec![(0f64, 0f64); SUPER_BLOCK / gs];
    for r in 0..rows {
        for b in 0..n_super {
            let span = r * cols + b * SUPER_BLOCK..r * cols + (b + 1) * SUPER_BLOCK;
            let x: Vec<f64> = w[span.clone()].iter().map(|&v| f64::from(v)).collect();
            layer.super_scales[r * n_super + b] = kq.choose(&x, &ones, &mut params);
            for (k, &(s, z)) in params.iter().enumerate() {
                let g = r * n_groups + b * params.len() + k;
                layer.scales[g] = s as f32;
                layer.zeros[g] = z as f32;
            }
            for (i, c) in span.enumerate() {
                let (s, z) = params[i % SUPER_BLOCK / gs];
                layer.codes[c] = grid.code_f32(w[c], s as f32, z as f32) as u8;
            }
        }
    }
    Ok(layer)
}

fn check_kquant_cols(kq: KQuant, cols: usize) -> Result<()> {
    if !cols.is_multiple_of(SUPER_BLOCK) {
        return Err(QuantError::Shape(format!(
            "{kq:?} needs inputs in whole super-blocks of {SUPER_BLOCK}; this layer has {cols}"
        )));
    }
    Ok(())
}

/// A Hessian made ready for GPTQ: dead inputs handled, act-order
/// permutation chosen, damped, inverted and factored. Layers that share an
/// input (q/k/v; gate/up) share one.
#[derive(Clone, Debug)]
pub struct PreparedHessian {
    pub cols: usize,
    /// Upper Cholesky factor of (H + λI)⁻¹ in processing order, `[cols, cols]`.
    hinv: Vec<f64>,
    /// diag H (undamped) in processing order: how much each input's
    /// squared error costs, for the grid search.
    diag: Vec<f64>,
    /// Processing order: position `j` handles original column `perm[j]`.
    pub perm: Vec<usize>,
    /// Inputs with H[d,d] = 0: their weights are zeroed.
    dead: Vec<usize>,
    /// Damping actually added to the diagonal.
    pub damp_added: f64,
    /// `Some(gs)`: the order keeps each group of `gs` original columns
    /// together ([`ColumnOrder::ActByGroup`]).
    pub whole_groups: Option<usize>,
    /// The order also keeps each K-quant super-block together
    /// ([`ColumnOrder::ActBySuperBlock`]).
    pub whole_super_blocks: bool,
}

/// The order GPTQ processes a layer's columns in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnOrder {
    /// As stored (the reference's default).
    Stored,
    /// By decreasing Hessian diagonal (the reference's `act_order`): each
    /// group is the next `gs` columns in that order, scattered over the
    /// input, so the runtime must gather inputs through a permutation.
    Act,
    /// Act-order that keeps each contiguous group of `gs` original columns
    /// together (GPTQModel's group-aware reordering): groups by decreasing
    /// largest diagonal, columns within a group by decreasing diagonal (a
    /// ragged last group stays last). The groups are the stored ones, so the
    /// result needs no permutation at run time and fits block formats such
    /// as GGUF's Q4_0.
    ActByGroup(usize),
    /// [`ColumnOrder::ActByGroup`] one level up, for K-quants: super-blocks
    /// of 256 by decreasing largest diagonal, their groups of `gs` likewise,
    /// columns within a group by decreasing diagonal. Every super-block is
    /// then processed whole, so its grids can be chosen together.
    ActBySuperBlock(usize),
}

/// Prepare `h` (`[cols, cols]`, any positive scale) for GPTQ.
pub fn prepare_hessian(
    h: &[f32],
    cols: usize,
    act_order: bool,
    damp: f64,
) -> Result<PreparedHessian> {
    let order = if act_order {
        ColumnOrder::Act
    } else {
        ColumnOrder::Stored
    };
    prepare_hessian_in(h, cols, order, damp)
}

/// [`prepare_hessian`] with any [`ColumnOrder`].
pub fn prepare_hessian_in(
    h: &[f32],
    cols: usize,
    order: ColumnOrder,
    damp: f64,
) -> Result<PreparedHessian> {
    let n = cols;
    if h.len() != n * n {
        return Err(QuantError::Shape(format!(
            "Hessian has {} values, expected {n}×{n}",
            h.len()
        )));
    }
    if let Some(i) = h.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            what: "Hessian",
            index: i,
        });
    }
    if !(damp.is_finite() && damp > 0.0) {
        return Err(QuantError::BadDamp(damp));
    }
    let mut hk: Vec<f64> = h.iter().map(|&v| f64::from(v)).collect();
    let mut dead = Vec::new();
    for d in 0..n {
        if hk[d * n + d] == 0.0 {
            hk[d * n + d] = 1.0;
            dead.push(d);
        }
    }
    let diag = |c: usize| hk[c * n + c];
    let perm: Vec<usize> = match order {
        ColumnOrder::Stored => (0..n).collect(),
        ColumnOrder::Act => {
            let mut p: Vec<usize> = (0..n).collect();
            // Descending diag H; stable for ties.
            p.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
            p
        }
        ColumnOrder::ActByGroup(gs) => {
            let gs = gs.clamp(1, n);
            let full = n / gs;
            let top = |g: usize| {
                (g * gs..((g + 1) * gs).min(n))
                    .map(diag)
                    .fold(f64::MIN, f64::max)
            };
            let mut groups: Vec<usize> = (0..full).collect();
            groups.sort_by(|&a, &b| top(b).total_cmp(&top(a)));
            if full * gs < n {
                groups.push(full);
            }
            groups
                .into_iter()
                .flat_map(|g| {
                    let mut cols: Vec<usize> = (g * gs..((g + 1) * gs).min(n)).collect();
                    cols.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
                    cols
                })
                .collect()
        }
        ColumnOrder::ActBySuperBlock(gs) => {
            if !n.is_multiple_of(SUPER_BLOCK) || gs == 0 || !SUPER_BLOCK.is_multiple_of(gs) {
                return Err(QuantError::Shape(format!(
                    "super-block order needs {n} inputs in super-blocks of {SUPER_BLOCK} and groups of {gs} dividing them"
                )));
            }
            let top = |cols: &[usize]| cols.iter().map(|&c| diag(c)).fold(f64::MIN, f64::max);
            let by_top = |mut parts: Vec<Vec<usize>>| {
                parts.sort_by(|a, b| top(b).total_cmp(&top(a)));
                parts
            };
            let supers: Vec<Vec<usize>> = (0..n)
                .step_by(SUPER_BLOCK)
                .map(|s0| (s0..s0 + SUPER_BLOCK).collect())
                .collect();
            by_top(supers)
                .into_iter()
                .flat_map(|sb| {
                    let groups = sb.chunks(gs).map(<[usize]>::to_vec).collect();
                    by_top(groups).into_iter().flat_map(|mut g| {
                        g.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
                        g
                    })
                })
                .collect()
        }
    };
    let hp: Vec<f64> = (0..n * n)
        .map(|i| hk[perm[i / n] * n + perm[i % n]])
        .collect();
    drop(hk);
    let mean_diag = (0..n).map(|i| hp[i * n + i]).sum::<f64>() / n as f64;
    let diag: Vec<f64> = (0..n).map(|i| hp[i * n + i]).collect();
    let mut lambda = damp * mean_diag;
    let hinv = loop {
        let mut a = hp.clone();
        for i in 0..n {
            a[i * n + i] += lambda;
        }
        if let Some(u) = upper_factor_of_inverse(&a, n) {
            break u;
        }
        if lambda > mean_diag * 1e3 || !lambda.is_finite() || lambda == 0.0 {
            return Err(QuantError::NotPositiveDefinite { damp: lambda });
        }
        eprintln!(
            "warning: Hessian not positive definite with damping {lambda:e}; raising it tenfold"
        );
        lambda *= 10.0;
    };
    Ok(PreparedHessian {
        cols: n,
        hinv,
        diag,
        perm,
        dead,
        damp_added: lambda,
        whole_groups: match order {
            ColumnOrder::ActByGroup(gs) => Some(gs.clamp(1, n)),
            ColumnOrder::ActBySuperBlock(gs) => Some(gs),
            _ => None,
        },
        whole_super_blocks: matches!(order, ColumnOrder::ActBySuperBlock(_)),
    })
}

/// GPTQ on one layer given its Hessian `h` = 2/n Σ x·xᵀ (any positive scale).
pub fn gptq(
    w: &[f32],
    h: &[f32],
    rows: usize,
    cols: usize,
    cfg: &GptqConfig,
) -> Result<QuantizedLayer> {
    check_inputs(w, rows, cols, cfg.group_size)?;
    let prep = prepare_hessian(h, cols, cfg.act_order, cfg.damp)?;
    gptq_prepared(w, &prep, rows, cols, cfg)
}

/// GPTQ on one layer with a [`PreparedHessian`] (prepared with the same
/// `act_order` and `damp` as `cfg`).
///
/// Rows are independent in GPTQ (each row's rounding errors are spread over
/// its own later columns through the shared H⁻¹ factor), so with
/// `cfg.threads > 1` the rows are cut into one contiguous part per thread and
/// swept in parallel on the caller's rayon pool. The codes, scales and zero
/// points are the same as one sweep over all rows; only the order in which
/// the reported `error` is summed differs.
pub fn gptq_prepared(
    w: &[f32],
    prep: &PreparedHessian,
    rows: usize,
    cols: usize,
    cfg: &GptqConfig,
) -> Result<QuantizedLayer> {
    check_inputs(w, rows, cols, cfg.group_size)?;
    if prep.cols != cols {
        return Err(QuantError::Shape(format!(
            "Hessian is for {} inputs, weight has {cols}",
            prep.cols
        )));
    }
    if let Some(kq) = cfg.kquant {
        check_kquant_cols(kq, cols)?;
        let in_order = prep.perm.iter().enumerate().all(|(j, &c)| j == c)
            || (prep.whole_super_blocks && prep.whole_groups == Some(kq.group_size()));
        if !in_order || cfg.grid != kq.grid() || cfg.group_size != Some(kq.group_size()) {
            return Err(QuantError::Shape(format!(
                "{kq:?} needs its own grid, groups of {} and an order that keeps super-blocks whole",
                kq.group_size()
            )));
        }
    }
    let parts = cfg.threads.clamp(1, rows);
    if parts == 1 {
        return Ok(sweep_rows(w, prep, rows, cfg));
    }
    let per_part = rows.div_ceil(parts);
    let one_thread = GptqConfig {
        threads: 1,
        ..cfg.clone()
    };
    let layers: Vec<QuantizedLayer> = w
        .par_chunks(per_part * cols)
        .map(|part| sweep_rows(part, prep, part.len() / cols, &one_thread))
        .collect();
    let mut out = QuantizedLayer {
        rows,
        cols,
        codes: Vec::with_capacity(rows * cols),
        scales: Vec::with_capacity(rows * layers[0].n_groups),
        zeros: Vec::with_capacity(rows * layers[0].n_groups),
        free_min: cfg.grid.free_min,
        n_groups: layers[0].n_groups,
        g_idx: layers[0].g_idx.clone(),
        perm: prep.perm.clone(),
        damp_added: prep.damp_added,
        error: 0.0,
        super_scales: Vec::new(),
    };
    for part in layers {
        out.codes.extend_from_slice(&part.codes);
        out.scales.extend_from_slice(&part.scales);
        out.zeros.extend_from_slice(&part.zeros);
        out.super_scales.extend_from_slice(&part.super_scales);
        out.error += part.error;
    }
    Ok(out)
}

/// The GPTQ sweep over all `rows` of `w` (checked by the caller), the
/// reference's `fasterquant` loop.
fn sweep_rows(w: &[f32], prep: &PreparedHessian, rows: usize, cfg: &GptqConfig) -> QuantizedLayer {
    let cols = prep.cols;
    let grid = cfg.grid;
    let n = cols;
    let mut wk: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();

    let perm = &prep.perm;
    let hinv = &prep.hinv;
    // The cost per unit of squared error of each original column, for the search.
    let col_weight: Vec<f64> = if cfg.scale_search {
        let mut cw = vec![0f64; n];
        for (j, &c) in perm.iter().enumerate() {
            cw[c] = prep.diag[j];
        }
        cw
    } else {
        Vec::new()
    };
    let params_of = |w: &[f64], span: std::ops::Range<usize>| -> Vec<(f64, f64)> {
        if cfg.scale_search {
            (0..rows)
                .map(|r| {
                    let (s, z) = grid.search_params(
                        &w[r * n + span.start..r * n + span.end],
                        &col_weight[span.clone()],
                    );
                    if grid.free_min {
                        grid.stored(s, z)
                    } else {
                        (s, z)
                    }
                })
                .collect()
        } else {
            row_params(&grid, w, n, rows, span.clone())
        }
    };
    // llama.cpp's weighting: each row's mean square, and room for weights.
    let row_ms: Vec<f64> = match cfg.search_weight {
        SearchWeight::Importance => Vec::new(),
        SearchWeight::LlamaCpp => (0..rows)
            .map(|r| wk[r * n..(r + 1) * n].iter().map(|v| v * v).sum::<f64>() / n as f64)
            .collect(),
    };
    let mut wt_buf = vec![0f64; SUPER_BLOCK.max(cfg.group_size.unwrap_or(0))];
    // Per-channel params come from the whole original W (before dead-column zeroing).
    let per_channel = cfg.group_size.is_none().then(|| params_of(&wk, 0..n));
    for &d in &prep.dead {
        for r in 0..rows {
            wk[r * n + d] = 0.0;
        }
    }
    let gs = cfg.group_size.unwrap_or(n);
    // Static groups: contiguous original columns of the zeroed W, fixed up front.
    let static_params: Option<Vec<Vec<(f64, f64)>>> =
        (cfg.group_size.is_some() && cfg.static_groups && cfg.kquant.is_none()).then(|| {
            (0..n)
                .step_by(gs)
                .map(|c0| params_of(&wk, c0..(c0 + gs).min(n)))
                .collect()
        });
    // W's columns in processing order.
    let mut wk: Vec<f64> = (0..rows * n)
        .map(|i| wk[(i / n) * n + perm[i % n]])
        .collect();

    // Groups in processing order: dynamic groups are (scale, zero) per row,
    // set when their first column is reached.
    let n_groups = n.div_ceil(gs);
    let mut scales = vec![0f32; rows * n_groups];
    let mut zeros = vec![0f32; rows * n_groups];
    let mut g_idx = vec![0u32; n];
    let mut codes_p = vec![0u8; rows * n];
    let mut error = 0.0;
    let mut cur: Vec<(f64, f64)> = per_channel.clone().unwrap_or_default();
    // K-quants: the current super-block's sub-block grids, [rows, n_sub],
    // and every super-block's [d, dmin] in stored order.
    let n_sub = SUPER_BLOCK / gs;
    let mut super_cur = vec![
        (0f64, 0f64);
        if cfg.kquant.is_some() {
            rows * n_sub
        } else {
            0
        }
    ];
    let n_super = n / SUPER_BLOCK;
    let mut super_scales = vec![
        [0f32; 2];
        if cfg.kquant.is_some() {
            rows * n_super
        } else {
            0
        }
    ];
    // The search reads a group's current values from the block's working
    // copy, so blocks hold whole groups (the block size changes no result).
    let bs = if cfg.kquant.is_some() {
        SUPER_BLOCK * (cfg.block_size / SUPER_BLOCK).max(1)
    } else if cfg.scale_search && cfg.group_size.is_some() {
        gs * (cfg.block_size / gs).max(1)
    } else {
        cfg.block_size.max(1)
    };

    for i1 in (0..n).step_by(bs) {
        let i2 = (i1 + bs).min(n);
        let count = i2 - i1;
        // W1 = W[:, i1:i2] (working copy of this block), Err1 for the lazy update.
        let mut w1: Vec<f64> = (0..rows * count)
            .map(|k| wk[(k / count) * n + i1 + k % count])
            .collect();
        let mut err1 = vec![0f64; rows * count];
        for i in 0..count {
            let j = i1 + i; // processing position
            let group = match (&static_params, cfg.group_size) {
                (Some(sp), _) => {
                    let g = perm[j] / gs;
                    cur.clone_from(&sp[g]);
                    g
                }
                (None, Some(_)) => {
                    if let (Some(kq), true) = (cfg.kquant, j % gs == 0) {
                        if j % SUPER_BLOCK == 0 {
                            // The whole super-block is in this lazy block (bs is a
                            // multiple of 256): its grids from its current values.
                            let imp = &prep.diag[j..j + SUPER_BLOCK];
                            let b = perm[j] / SUPER_BLOCK;
                            let sw = match kq {
                                KQuant::Q6K => SearchWeight::Importance,
                                _ => cfg.search_weight,
                            };
                            for r in 0..rows {
                                let at = r * count + (j - i1);
                                let x = &w1[at..at + SUPER_BLOCK];
                                let sigma2 = || {
                                    2.0 * x.iter().map(|v| v * v).sum::<f64>() / SUPER_BLOCK as f64
                                };
                                super_scales[r * n_super + b] = kq.choose(
                                    x,
                                    sw.of(x, imp, sigma2, &mut wt_buf),
                                    &mut super_cur[r * n_sub..(r + 1) * n_sub],
                                );
                            }
                        }
                        let k = j % SUPER_BLOCK / gs;
                        cur = (0..rows).map(|r| super_cur[r * n_sub + k]).collect();
                    } else if j % gs == 0 && cfg.scale_search {
                        // The group's current values, weighted in processing order.
                        let end = (j + gs).min(n);
                        let imp = &prep.diag[j..end];
                        cur = (0..rows)
                            .map(|r| {
                                let at = r * count + (j - i1);
                                let x = &w1[at..at + (end - j)];
                                let wt = cfg.search_weight.of(x, imp, || row_ms[r], &mut wt_buf);
                                let (s, z) = grid.search_params(x, wt);
                                // Code on the scale (and minimum) the file will hold (f16).
                                grid.stored(s, z)
                            })
                            .collect();
                    } else if j % gs == 0 {
                        // Quirk of the reference: params from the outer W, i.e. these
                        // columns as they were at the start of this block.
                        cur = row_params(&grid, &wk, n, rows, j..(j + gs).min(n));
                    }
                    j / gs
                }
                (None, None) => 0,
            };
            g_idx[perm[j]] = group as u32;
            if j % gs == 0 || static_params.is_some() {
                for (r, &(s, z)) in cur.iter().enumerate() {
                    scales[r * n_groups + group] = s as f32;
                    zeros[r * n_groups + group] = z as f32;
                }
            }
            let d = hinv[j * n + j];
            for r in 0..rows {
                let wv = w1[r * count + i];
                let (s, z) = cur[r];
                // Round in f32 like the reference (updates accumulate in f64).
                let code = grid.code_f32(wv as f32, s as f32, z as f32);
                codes_p[r * n + j] = code as u8;
                let q = f64::from(grid.dequant(code, s, z));
                error += (wv - q) * (wv - q) / (d * d) / 2.0;
                let e = (wv - q) / d;
                err1[r * count + i] = e;
                let row = &mut w1[r * count + i..(r + 1) * count];
                let h_row = &hinv[j * n + i1 + i..j * n + i1 + count];
                for (x, &hv) in row.iter_mut().zip(h_row) {
                    *x -= e * hv;
                }
            }
        }
        // Lazy batched update of every later column: W[:, i2:] -= Err1 · Hinv[i1:i2, i2:].
        if i2 < n {
            nibble_runtime::kernels::matmul_f64(
                (&mut wk[i2..], rows, n - i2, n, 1),
                (&err1, rows, count, count, 1),
                (&hinv[i1 * n + i2..], count, n - i2, n, 1),
                -1.0,
                true,
                cfg.threads,
            );
        }
    }

    // Codes back to original column order.
    let mut codes = vec![0u8; rows * n];
    for r in 0..rows {
        for (j, &c) in perm.iter().enumerate() {
            codes[r * n + c] = codes_p[r * n + j];
        }
    }
    if prep.whole_groups.is_some() && prep.whole_groups == cfg.group_size && static_params.is_none()
    {
        // The k-th group processed is the stored group perm[k·gs] / gs:
        // scales and zeros in stored order make a plain grouped layer.
        let (mut s2, mut z2) = (vec![0f32; scales.len()], vec![0f32; zeros.len()]);
        for k in 0..n_groups {
            let og = perm[k * gs] / gs;
            for r in 0..rows {
                s2[r * n_groups + og] = scales[r * n_groups + k];
                z2[r * n_groups + og] = zeros[r * n_groups + k];
            }
        }
        scales = s2;
        zeros = z2;
        for (c, g) in g_idx.iter_mut().enumerate() {
            *g = (c / gs) as u32;
        }
    }
    QuantizedLayer {
        rows,
        cols: n,
        codes,
        scales,
        zeros,
        free_min: grid.free_min,
        n_groups,
        g_idx,
        perm: perm.clone(),
        damp_added: prep.damp_added,
        error,
        super_scales,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splitting the rows over threads gives the same codes, scales and
    /// zero points as one sweep, in every grouping mode, with ragged parts.
    #[test]
    fn row_parallel_sweep_equals_one_sweep() {
        let (rows, cols, k) = (37, 96, 120);
        let mut next = crate::test_util::centered_f32(0x1234_5678_9abc_def1);
        let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let x: Vec<f32> = (0..k * cols).map(|_| next()).collect();
        let h = crate::test_util::gram(&x, k, cols);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (gs, act_order, static_groups) in [
            (None, false, false),
            (Some(32), false, false),
            (Some(32), true, false),
            (Some(64), true, true),
        ] {
            let mut cfg = GptqConfig::new(3, gs, false).unwrap();
            cfg.act_order = act_order;
            cfg.static_groups = static_groups;
            cfg.block_size = 40;
            let one = gptq(&w, &h, rows, cols, &cfg).unwrap();
            for threads in [2, 3, 64] {
                cfg.threads = threads;
                let par = pool.install(|| gptq(&w, &h, rows, cols, &cfg)).unwrap();
                let what = format!(
                    "gs {gs:?} act_order {act_order} static {static_groups} threads {threads}"
                );
                assert_eq!(par.codes, one.codes, "{what}");
                assert_eq!(par.scales, one.scales, "{what}");
                assert_eq!(par.zeros, one.zeros, "{what}");
                assert_eq!(par.g_idx, one.g_idx, "{what}");
                assert!((par.error - one.error).abs() <= 1e-9 * one.error, "{what}");
            }
        }
    }

    /// Group-aware act-order keeps each stored group together (a ragged
    /// last group last) and gives a plain grouped layer; the weighted scale
    /// search lowers the output error tr(δ·H·δᵀ) on every grid tried, the
    /// free-minimum one included.
    #[test]
    fn group_order_and_scale_search() {
        let mut next = crate::test_util::centered_f32(0x0bad_cafe_1234_5678);
        for (rows, cols) in [(24, 96), (24, 80)] {
            let k = 150;
            let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            // Inputs with uneven scales, as real activations have.
            let x: Vec<f32> = (0..k * cols)
                .map(|i| next() * (1.0 + (i % cols) as f32 / 8.0))
                .collect();
            let h = crate::test_util::gram(&x, k, cols);
            let out_err = |q: &QuantizedLayer| output_error(&w, q, &h);
            let gs = 32;
            let prep = prepare_hessian_in(&h, cols, ColumnOrder::ActByGroup(gs), 0.01).unwrap();
            for chunk in prep.perm.chunks(gs) {
                assert!(chunk.iter().all(|&c| c / gs == chunk[0] / gs), "{chunk:?}");
            }
            if cols % gs != 0 {
                assert_eq!(prep.perm[cols - 1] / gs, cols / gs, "ragged group last");
            }
            let grids = [(4, true), (4, false), (5, true), (3, false), (2, true)]
                .map(|(bits, sym)| Grid::new(bits, sym).unwrap())
                .into_iter()
                .chain([Grid::free_min_4bit()]);
            for grid in grids {
                let (bits, sym) = (grid.bits, grid.sym);
                let mut cfg = GptqConfig::new(bits, Some(gs), sym).unwrap();
                cfg.grid = grid;
                cfg.act_order = true;
                let plain = gptq_prepared(&w, &prep, rows, cols, &cfg).unwrap();
                cfg.scale_search = true;
                let searched = gptq_prepared(&w, &prep, rows, cols, &cfg).unwrap();
                for q in [&plain, &searched] {
                    assert!(q
                        .g_idx
                        .iter()
                        .enumerate()
                        .all(|(c, &g)| g as usize == c / gs));
                }
                cfg.search_weight = SearchWeight::LlamaCpp;
                let llama = gptq_prepared(&w, &prep, rows, cols, &cfg).unwrap();
                let (e0, e1, e2) = (out_err(&plain), out_err(&searched), out_err(&llama));
                let what = format!(
                    "{cols} cols {bits}-bit sym {sym} free min {}",
                    grid.free_min
                );
                eprintln!(
                    "{what}: output error {e0:.4e} → {e1:.4e} (llama.cpp's weights {e2:.4e})"
                );
                assert!(e1 < e0, "{what}: {e1} ≥ {e0}");
                assert!(e2 < e0, "{what}: llama.cpp's weights {e2} ≥ {e0}");
                assert_ne!(llama.scales, searched.scales, "{what}: the weights act");
            }
        }
    }

    /// llama.cpp's weights: importance · √(σ² + w²); the importance alone by default.
    #[test]
    fn search_weights() {
        let (x, imp, mut buf) = ([3.0, -4.0, 0.0], [2.0, 0.5, 1.0], [0f64; 4]);
        assert_eq!(
            SearchWeight::Importance.of(&x, &imp, || unreachable!(), &mut buf),
            &imp
        );
        assert_eq!(
            SearchWeight::LlamaCpp.of(&x, &imp, || 16.0, &mut buf),
            &[10.0, 0.5 * 32f64.sqrt(), 4.0]
        );
    }

    /// Σ_r δ_r·H·δ_rᵀ with δ = W − Ŵ: the output error on H's inputs.
    fn output_error(w: &[f32], q: &QuantizedLayer, h: &[f32]) -> f64 {
        let (rows, cols) = (q.rows, q.cols);
        let d: Vec<f64> = w
            .iter()
            .zip(q.dequantize())
            .map(|(&a, b)| f64::from(a - b))
            .collect();
        (0..rows)
            .map(|r| {
                let dr = &d[r * cols..(r + 1) * cols];
                (0..cols)
                    .map(|i| {
                        dr[i]
                            * (0..cols)
                                .map(|j| f64::from(h[i * cols + j]) * dr[j])
                                .sum::<f64>()
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    /// GPTQ onto K-quant super-blocks: in stored order and in the
    /// super-block act-order, with any number of threads, the layer packs
    /// into GGUF blocks that decode to its own dequantized weights, and its
    /// output error is below RTN's on the same grids. An order that scatters
    /// a super-block, or a width that is not whole super-blocks, is refused.
    #[test]
    fn kquant_super_blocks() {
        let mut next = crate::test_util::centered_f32(0x4b51_7561_6e74_0001);
        let (rows, cols, k) = (12, 512, 600);
        let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let x: Vec<f32> = (0..k * cols)
            .map(|i| next() * (1.0 + (i % cols % 37) as f32 / 6.0))
            .collect();
        let h = crate::test_util::gram(&x, k, cols);
        for kq in [KQuant::Q3K, KQuant::Q4K, KQuant::Q5K, KQuant::Q6K] {
            let gs = kq.group_size();
            let rtn_err = output_error(&w, &rtn_kquant(&w, rows, cols, kq).unwrap(), &h);
            for order in [ColumnOrder::Stored, ColumnOrder::ActBySuperBlock(gs)] {
                let prep = prepare_hessian_in(&h, cols, order, 0.01).unwrap();
                for chunk in prep.perm.chunks(SUPER_BLOCK) {
                    assert!(chunk
                        .iter()
                        .all(|&c| c / SUPER_BLOCK == chunk[0] / SUPER_BLOCK));
                }
                let mut cfg = GptqConfig::kquant(kq);
                cfg.act_order = order != ColumnOrder::Stored;
                let q = gptq_prepared(&w, &prep, rows, cols, &cfg).unwrap();
                cfg.threads = 3;
                let q3 = gptq_prepared(&w, &prep, rows, cols, &cfg).unwrap();
                assert_eq!(q.codes, q3.codes);
                assert_eq!(q.super_scales, q3.super_scales);
                let deq = q.dequantize();
                let mut packed = Vec::new();
                for r in 0..rows {
                    let (g, n) = (q.n_groups, cols / SUPER_BLOCK);
                    kq.pack_row(
                        &q.codes[r * cols..(r + 1) * cols],
                        &q.scales[r * g..(r + 1) * g],
                        &q.zeros[r * g..(r + 1) * g],
                        &q.super_scales[r * n..(r + 1) * n],
                        &mut packed,
                    );
                }
                let mut decoded = vec![0f32; rows * cols];
                let ty = nibble_format::gguf::GgmlType::of_block_dtype(kq.dtype()).unwrap();
                assert!(nibble_format::gguf_blocks::dequantize_blocks(
                    ty,
                    &packed,
                    &mut decoded
                ));
                for (i, (a, b)) in deq.iter().zip(&decoded).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * a.abs().max(1e-3),
                        "{kq:?} {i}: {a} vs {b}"
                    );
                }
                let e = output_error(&w, &q, &h);
                eprintln!("{kq:?} {order:?}: output error RTN {rtn_err:.4e} → GPTQ {e:.4e}");
                assert!(e < 0.9 * rtn_err, "{kq:?} {order:?}: {e} vs RTN {rtn_err}");
                // llama.cpp's weighting: another choice but for Q6_K, where
                // llama.cpp weights by the importance alone too.
                cfg.threads = 1;
                cfg.search_weight = SearchWeight::LlamaCpp;
                let ql = gptq_prepared(&w, &prep, rows, cols, &cfg).unwrap();
                let el = output_error(&w, &ql, &h);
                assert!(
                    el < 0.9 * rtn_err,
                    "{kq:?} {order:?}: {el} vs RTN {rtn_err}"
                );
                assert_eq!(
                    ql.super_scales == q.super_scales,
                    kq == KQuant::Q6K,
                    "{kq:?}"
                );
            }
            let scattered = prepare_hessian_in(&h, cols, ColumnOrder::Act, 0.01).unwrap();
            let mut cfg = GptqConfig::kquant(kq);
            cfg.act_order = true;
            assert!(gptq_prepared(&w, &scattered, rows, cols, &cfg).is_err());
            let narrow = &w[..rows * 480];
            let h480 = crate::test_util::gram(&x[..k * 480], k, 480);
            let prep = prepare_hessian_in(&h480, 480, ColumnOrder::Stored, 0.01).unwrap();
            assert!(gptq_prepared(narrow, &prep, rows, 480, &GptqConfig::kquant(kq)).is_err());
            assert!(rtn_kquant(narrow, rows, 480, kq).is_err());
        }
    }
}
