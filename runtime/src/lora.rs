//! LoRA adapters applied at run time beside the base weights:
//! `out = W·x + Σ scale · B·(A·x)` for every adapted linear layer.
//!
//! Why beside and not merged: the base stays as it is stored (packed, shared
//! by every session through one memory map), and a session can load, rescale
//! or remove adapters between requests without touching it — several
//! fine-tunes on one quantized base, as llama.cpp's `--lora` gives. The
//! low-rank products run in f32 through the kernel table's float
//! matrix-vector kernel, on the same rows the block hands its linear layer
//! (one token or a batch), through one hook of the one decoder block
//! ([`crate::block::BlockExec::adapt`]). Everything they need is sized when
//! the adapters change, so a token allocates nothing.

use std::sync::Arc;

use nibble_format::lora::{LoraAdapter, LoraSpec};

use crate::block::Lin;
use crate::error::{Result, RuntimeError};
use crate::kernels::Kernels;
use crate::model::Model;

/// One adapted linear weight of one adapter: `ΔW = scaling · B·A` in the
/// order the base stores its rows and columns.
#[derive(Clone, Debug)]
struct Delta {
    layer: usize,
    lin: Lin,
    /// `[r, cols]`.
    a: Arc<[f32]>,
    /// `[rows, r]`.
    b: Arc<[f32]>,
    r: usize,
    /// `alpha / r` (rsLoRA `alpha / √r`).
    scaling: f32,
}

/// An adapter attached to a session.
#[derive(Clone, Debug)]
pub struct Attached {
    pub name: String,
    /// The user's scale (PEFT's `rescale_adapter_scale`); 0 switches it off.
    pub scale: f32,
    /// The adapter folder and its SHA-256.
    pub source: String,
    deltas: Vec<Delta>,
}

impl Attached {
    /// Read adapter `spec` for `model`, checked against it: a PEFT folder,
    /// or (when `spec.path` is no folder) the name of an adapter the model's
    /// file stores. Its terms are put in the model's stored orders (a nibble
    /// GPTQ file stores the feed-forward hidden units in `ffn_down`'s
    /// act-order: `.fold`).
    pub fn load(model: &Model, name: &str, spec: &LoraSpec) -> Result<Attached> {
        let hp = &model.hparams;
        let view = model.file().view()?;
        let stored = nibble_format::lora::stored_names(&view);
        let stored_name = spec.path.to_str().filter(|p| stored.iter().any(|n| n == p));
        let (adapter, source) = match stored_name {
            Some(n) if !spec.path.is_dir() => {
                let a = LoraAdapter::from_nib(&view, n, hp, Some(1.0))?;
                let source = format!("stored in {} as '{n}' ({})", model.name(), a.path.display());
                (a, source)
            }
            _ => {
                if !spec.path.is_dir() && !stored.is_empty() {
                    return Err(RuntimeError::Lora(format!(
                        "'{}' is neither a PEFT adapter folder nor an adapter stored in {} (it stores: {})",
                        spec.path.display(),
                        model.name(),
                        stored.join(", ")
                    )));
                }
                let family = nibble_format::families::family(&hp.arch).ok_or_else(|| {
                    RuntimeError::Lora(format!(
                        "no Hugging Face module names for architecture '{}'",
                        hp.arch
                    ))
                })?;
                let unit = LoraSpec {
                    path: spec.path.clone(),
                    scale: 1.0,
                };
                let a = LoraAdapter::load(&unit, hp, family)?;
                let source = format!("{} (sha256 {})", spec.path.display(), a.sha256);
                (a, source)
            }
        };
        let fold = |layer: usize| -> Result<Option<Vec<usize>>> {
            let name = format!("blk.{layer}.ffn_down.fold");
            let Some(t) = view.tensor(&name) else {
                return Ok(None);
            };
            let order: Vec<u32> = t
                .data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if order.len() != hp.n_ff
                || nibble_format::export_gptq::inverse_permutation(&order).is_none()
            {
                return Err(RuntimeError::Lora(format!(
                    "{}: tensor '{name}' is not a permutation of the {} hidden units",
                    model.name(),
                    hp.n_ff
                )));
            }
            Ok(Some(order.into_iter().map(|u| u as usize).collect()))
        };
        let mut deltas = Vec::new();
        for (canonical, m) in &adapter.modules {
            let target = canonical
                .strip_prefix("blk.")
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(i, role)| {
                    let lin = Lin::ALL
                        .into_iter()
                        .find(|l| role == format!("{}.weight", l.role()))?;
                    Some((i.parse::<usize>().ok()?, lin))
                });
            let Some((layer, lin)) = target else {
                return Err(RuntimeError::Lora(format!(
                    "{}: '{canonical}' is not a linear layer of the decoder block; merge this \
                     adapter instead (nibble convert --lora)",
                    spec.path.display()
                )));
            };
            let w = model.layers[layer].linear(lin);
            let (mut a, mut b) = (m.a.clone(), m.b.clone());
            // Hidden units stored in another order: gate/up rows, down columns.
            if let Some(order) = fold(layer)? {
                match lin {
                    Lin::Gate | Lin::Up => {
                        b = order
                            .iter()
                            .flat_map(|&u| m.b[u * m.r..(u + 1) * m.r].iter().copied())
                            .collect();
                    }
                    Lin::Down => {
                        for k in 0..m.r {
                            let row = &m.a[k * w.cols..(k + 1) * w.cols];
                            let dst = &mut a[k * w.cols..(k + 1) * w.cols];
                            for (d, &u) in dst.iter_mut().zip(&order) {
                                *d = row[u];
                            }
                        }
                    }
                    _ => {}
                }
            }
            debug_assert_eq!((a.len(), b.len()), (m.r * w.cols, w.rows * m.r));
            deltas.push(Delta {
                layer,
                lin,
                a: a.into(),
                b: b.into(),
                r: m.r,
                scaling: m.scaling,
            });
        }
        Ok(Attached {
            name: name.to_string(),
            scale: spec.scale,
            source,
            deltas,
        })
    }
}

/// One term the block adds to a linear layer's output.
#[derive(Clone, Debug)]
struct Term {
    /// `[r, cols]`: `A·x` is r dot products of a row's length.
    a: Arc<[f32]>,
    /// `Bᵀ`, `[r, rows]`: `B·(A·x)` is r contiguous axpy's of the output's
    /// length (B's rows are only r long: a dot product per output would be
    /// all overhead).
    bt: Arc<[f32]>,
    r: usize,
    /// Adapter scale × its `alpha / r`.
    coef: f32,
}

/// The terms of the attached adapters by layer and linear layer, with the
/// scratch their products need, built when the adapters change.
#[derive(Clone, Debug, Default)]
pub struct LoraRun {
    /// `[layer][Lin as usize]`; empty when no adapter is attached.
    table: Vec<[Vec<Term>; 7]>,
    /// `A·x` of one row (the largest rank).
    ax: Vec<f32>,
    /// `X·Aᵀ` of a batch, `[max_rows, largest rank]`.
    xa: Vec<f32>,
}

impl LoraRun {
    /// The terms of `adapters` (those with a non-zero scale) for a model of
    /// `n_layer` layers, for batches of up to `max_rows` rows.
    pub fn build(adapters: &[Attached], n_layer: usize, max_rows: usize) -> LoraRun {
        let mut run = LoraRun::default();
        let live: Vec<&Attached> = adapters.iter().filter(|a| a.scale != 0.0).collect();
        if live.is_empty() {
            return run;
        }
        run.table = (0..n_layer).map(|_| Default::default()).collect();
        let mut max_r = 0;
        for ad in live {
            for d in &ad.deltas {
                max_r = max_r.max(d.r);
                let rows = d.b.len() / d.r;
                let mut bt = vec![0f32; d.b.len()];
                for (i, row) in d.b.chunks_exact(d.r).enumerate() {
                    for (k, &v) in row.iter().enumerate() {
                        bt[k * rows + i] = v;
                    }
                }
                run.table[d.layer][d.lin as usize].push(Term {
                    a: Arc::clone(&d.a),
                    bt: bt.into(),
                    r: d.r,
                    coef: ad.scale * d.scaling,
                });
            }
        }
        run.ax = vec![0.0; max_r];
        run.xa = vec![0.0; max_rows * max_r];
        run
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// `out[rows, w_rows] += Σ coef · B·(A·x)` for linear `lin` of `layer`
    /// (`x` is `[rows, cols]`): one row through the matrix-vector kernel and
    /// axpy's, a batch as two products on `threads`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        k: &Kernels,
        layer: usize,
        lin: Lin,
        x: &[f32],
        rows: usize,
        cols: usize,
        out: &mut [f32],
        threads: usize,
    ) {
        if rows > 1 && rows * self.ax.len() <= self.xa.len() {
            return self.apply_batch(layer, lin, x, rows, cols, out, threads);
        }
        let LoraRun { table, ax, .. } = self;
        let Some(terms) = table.get(layer).map(|t| &t[lin as usize]) else {
            return;
        };
        if terms.is_empty() {
            return;
        }
        let out_w = out.len() / rows;
        for t in terms {
            let ax = &mut ax[..t.r];
            for (xr, or) in x
                .chunks_exact(cols)
                .zip(out.chunks_exact_mut(out_w))
                .take(rows)
            {
                (k.matvec_f32)(&t.a, cols, xr, ax);
                for (&a, b) in ax.iter().zip(t.bt.chunks_exact(out_w)) {
                    let c = t.coef * a;
                    for (o, &v) in or.iter_mut().zip(b) {
                        *o += c * v;
                    }
                }
            }
        }
    }

    /// The batched form of [`LoraRun::apply`]: `XA = X·Aᵀ`, then
    /// `out += coef · XA·Bᵀ`, each one `gemm` product.
    #[allow(clippy::too_many_arguments)]
    fn apply_batch(
        &mut self,
        layer: usize,
        lin: Lin,
        x: &[f32],
        rows: usize,
        cols: usize,
        out: &mut [f32],
        threads: usize,
    ) {
        use crate::kernels::{matmul, MatMut, MatRef};
        let LoraRun { table, xa, .. } = self;
        let Some(terms) = table.get(layer).map(|t| &t[lin as usize]) else {
            return;
        };
        let out_w = out.len() / rows;
        for t in terms {
            let xa = &mut xa[..rows * t.r];
            let x = MatRef {
                data: &x[..rows * cols],
                rows,
                cols,
                rs: cols,
                cs: 1,
            };
            // Aᵀ: A is [r, cols] row-major.
            let a_t = MatRef {
                data: &t.a,
                rows: cols,
                cols: t.r,
                rs: 1,
                cs: cols,
            };
            matmul(
                MatMut {
                    data: xa,
                    rows,
                    cols: t.r,
                    rs: t.r,
                    cs: 1,
                },
                x,
                a_t,
                1.0,
                false,
                threads,
            );
            let bt = MatRef {
                data: &t.bt,
                rows: t.r,
                cols: out_w,
                rs: out_w,
                cs: 1,
            };
            let xa = MatRef {
                data: xa,
                rows,
                cols: t.r,
                rs: t.r,
                cs: 1,
            };
            matmul(
                MatMut {
                    data: &mut out[..rows * out_w],
                    rows,
                    cols: out_w,
                    rs: out_w,
                    cs: 1,
                },
                xa,
                bt,
                t.coef,
                true,
                threads,
            );
        }
    }
}
