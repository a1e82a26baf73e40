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
        })
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
}

impl QuantizedLayer {
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
    let n_groups = cols.div_ceil(gs);
    let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
    let mut layer = QuantizedLayer {
        rows,
        cols,
        codes: vec![0; rows * cols],
        scales: vec![0.0; rows * n_groups],
        zeros: vec![0.0; rows * n_groups],
        free_min: grid.free_min,
        n_groups,
        g_idx: (0..cols).map(|c| (c / gs) as u32).collect(),
        perm: (0..cols).collect(),
        damp_added: 0.0,
        error: 0.0,
    };
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
            _ => None,
        },
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
    };
    for part in layers {
        out.codes.extend_from_slice(&part.codes);
        out.scales.extend_from_slice(&part.scales);
        out.zeros.extend_from_slice(&part.zeros);
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
        (cfg.group_size.is_some() && cfg.static_groups).then(|| {
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
    // The search reads a group's current values from the block's working
    // copy, so blocks hold whole groups (the block size changes no result).
    let bs = if cfg.scale_search && cfg.group_size.is_some() {
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
                    if j % gs == 0 && cfg.scale_search {
                        // The group's current values, weighted in processing order.
                        let end = (j + gs).min(n);
                        let wt = &prep.diag[j..end];
                        cur = (0..rows)
                            .map(|r| {
                                let at = r * count + (j - i1);
                                let (s, z) = grid.search_params(&w1[at..at + (end - j)], wt);
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
            let out_err = |q: &QuantizedLayer| -> f64 {
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
            };
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
                let (e0, e1) = (out_err(&plain), out_err(&searched));
                let what = format!(
                    "{cols} cols {bits}-bit sym {sym} free min {}",
                    grid.free_min
                );
                eprintln!("{what}: output error {e0:.4e} → {e1:.4e}");
                assert!(e1 < e0, "{what}: {e1} ≥ {e0}");
            }
        }
    }
}
