//! Calibration for GPTQ: random token windows from a text, and a dense f32
//! forward of one decoder block over them that exposes the inputs of each
//! linear layer (to accumulate Hessians) — one block at a time, never the
//! whole model's activations.

use std::time::Instant;

use nibble_format::{HParams, NibView};
use nibble_runtime::block::{
    block_stage, boundary_width, AttnParams, BlockBufs, BlockExec, Lin, Rope, Stage, Vector,
};
use nibble_runtime::kernels::{matmul, Kernels, MatMut, MatRef};
use rayon::prelude::*;

use crate::error::{QuantError, Result};
use crate::model::tensor_f32;

/// `nsamples` windows of `seqlen` tokens at seeded random offsets (as the
/// GPTQ authors' data loaders do).
pub fn calibration_windows(
    tokens: &[u32],
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if nsamples == 0 || seqlen == 0 {
        return Err(QuantError::Calibration(
            "--nsamples and --seqlen must be at least 1".into(),
        ));
    }
    if tokens.len() <= seqlen {
        return Err(QuantError::Calibration(format!(
            "the calibration text has {} tokens, fewer than one window of {seqlen} + 1",
            tokens.len()
        )));
    }
    let mut state = seed ^ 0x243F_6A88_85A3_08D3;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let span = (tokens.len() - seqlen) as u64;
    Ok((0..nsamples)
        .map(|_| {
            let i = (next() % span) as usize;
            tokens[i..i + seqlen].to_vec()
        })
        .collect())
}

/// How [`self_generated_windows`] samples: the model's own distribution as
/// it is (temperature 1, no nucleus cut), which needs no sort per token.
/// Measured (GPTQ 4-bit per row without act-order, wikitext-2 on 20
/// windows of 2048; RTN 37.29): with 32 × 512 windows, temperature 1
/// without a cut 35.54, with top-p 0.95 36.75, temperature 1.1 / 1.2
/// without a cut 34.85 / 35.85, temperature 0.7 with top-p 0.95 40.25, a
/// random first token after BOS 37.61; with 128 × 512 windows, 36.73
/// without a cut against 36.48 with top-p 0.95. So below
/// temperature 1 it gets worse, and the rest is within the ±1 that another
/// sample of text moves it.
pub const SELF_CALIB_TEMPERATURE: f32 = 1.0;
pub const SELF_CALIB_TOP_P: f32 = 1.0;

/// Sequences generated side by side by [`self_generated_windows`]: one
/// batched step streams the weights once for all of them. 16 keeps the KV
/// cache of a 512-token window at 16 × 512 × n_layer × 2 · kv_dim f16
/// values (189 MB for SmolLM2), and decoded the most tokens per second
/// (`cargo run --release --example decode_slots -- …Q4_1.gguf 2 R
/// 512 auto`: 524 / 613 / 555 tok/s at R = 12 / 16 / 24 rows).
pub const SELF_CALIB_BATCH: usize = 16;

/// Calibration windows written by the model itself, the default when no
/// calibration text is given ("data-free" calibration): `nsamples`
/// sequences of `seqlen` tokens, each BOS (when the model has one) followed
/// by tokens sampled from the model at [`SELF_CALIB_TEMPERATURE`] and
/// [`SELF_CALIB_TOP_P`], with end-of-sequence tokens kept and generation
/// continued past them. Sample `i` uses seed `seed + i`.
///
/// The sequences are decoded [`SELF_CALIB_BATCH`] at a time in lockstep
/// ([`nibble_runtime::forward::forward_slots`]: every linear layer is one batched product for the
/// whole group, so the weights are read once per step rather than once per
/// sequence), with `threads` threads; the windows do not depend on
/// `threads`. `progress(tokens)` reports the tokens written so far, up to
/// `nsamples × seqlen`.
pub fn self_generated_windows(
    model: &std::sync::Arc<nibble_runtime::Model>,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<u32>>> {
    use nibble_runtime::forward::{forward_slots, BatchState, RunState};
    use nibble_runtime::{PrefillKind, Sampler, SamplerParams};
    if nsamples == 0 || seqlen < 2 {
        return Err(QuantError::Calibration(
            "--nsamples must be at least 1 and --seqlen at least 2".into(),
        ));
    }
    if model.hparams.n_ctx_train > 0 && seqlen > model.hparams.n_ctx_train {
        return Err(QuantError::Calibration(format!(
            "--seqlen {seqlen} exceeds the model's context of {} tokens",
            model.hparams.n_ctx_train
        )));
    }
    let first = model.bos_id.unwrap_or(0);
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| QuantError::Calibration(format!("cannot start {threads} threads: {e}")))?;
    let n_vocab = model.hparams.n_vocab;
    let batch = SELF_CALIB_BATCH.min(nsamples);
    let mut state = RunState::new(model, batch * seqlen);
    let mut bs = BatchState::for_slots(model, seqlen, batch, PrefillKind::Auto);
    let mut windows: Vec<Vec<u32>> = Vec::with_capacity(nsamples);
    let mut tokens = Vec::with_capacity(batch);
    for b0 in (0..nsamples).step_by(batch) {
        let rows = batch.min(nsamples - b0);
        let mut samplers = (b0..b0 + rows)
            .map(|i| {
                Sampler::new(
                    SamplerParams {
                        temperature: SELF_CALIB_TEMPERATURE,
                        top_k: 0,
                        top_p: SELF_CALIB_TOP_P,
                        min_p: 0.0,
                        repeat_penalty: 1.0,
                        repeat_last_n: 0,
                        seed: seed.wrapping_add(i as u64),
                    },
                    n_vocab,
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut seqs: Vec<Vec<u32>> = (0..rows)
            .map(|_| {
                let mut w = Vec::with_capacity(seqlen);
                w.push(first);
                w
            })
            .collect();
        for pos in 0..seqlen - 1 {
            tokens.clear();
            tokens.extend(seqs.iter().map(|w| w[pos]));
            pool.install(|| {
                forward_slots(model, &mut state, &mut bs, &tokens, pos, seqlen, threads)
            });
            // Each row draws from its own logits with its own sampler, so
            // the rows sample in parallel (a softmax over the vocabulary per
            // row).
            let logits = &bs.logits;
            pool.install(|| {
                seqs.par_iter_mut()
                    .zip(samplers.par_iter_mut())
                    .enumerate()
                    .for_each(|(i, (w, sampler))| {
                        let next = sampler.sample(&logits[i * n_vocab..(i + 1) * n_vocab], w);
                        w.push(next);
                    })
            });
            progress(b0 * seqlen + rows * (pos + 2));
        }
        windows.extend(seqs);
    }
    Ok(windows)
}

/// Calibration windows per self-generated sequence in
/// [`self_generated_calibration`]: the model writes about `nsamples / 8`
/// sequences (at least one batch of [`SELF_CALIB_BATCH`]) and the windows
/// are drawn from their concatenation, as from a text file. Decoding is the
/// dear part of self-calibration (about 600 tokens/s in batches of 16 on
/// two cores, against about 430 windowed tokens/s for the whole GPTQ
/// pass), and more distinct text did not measurably help (GPTQ
/// 4-bit per row without act-order, wikitext-2 on 20 windows; RTN 37.29):
/// 128 windows from 128 sequences 36.73, from 32 sequences 36.73, from 16
/// sequences 37.82; 32 windows from 32 sequences 35.54. A second sample of
/// text moves these by about ±1.
pub const SELF_CALIB_WINDOWS_PER_SEQUENCE: usize = 8;

/// Sequences the model writes for `nsamples` self-generated windows:
/// `⌈nsamples / 8⌉` ([`SELF_CALIB_WINDOWS_PER_SEQUENCE`]), but at least
/// one batch ([`SELF_CALIB_BATCH`], which costs about what fewer rows cost
/// per step) and never more than `nsamples`.
pub fn self_calib_sequences(nsamples: usize) -> usize {
    nsamples
        .div_ceil(SELF_CALIB_WINDOWS_PER_SEQUENCE)
        .max(SELF_CALIB_BATCH)
        .min(nsamples)
}

/// The default calibration when no text is given: the model writes
/// [`self_calib_sequences`]`(nsamples)` sequences of `seqlen` tokens
/// ([`self_generated_windows`], seeds `seed`, `seed + 1`, …), and the
/// `nsamples` windows of `seqlen` tokens are drawn from their
/// concatenation at seeded random offsets ([`calibration_windows`], seed
/// `seed`), as from a calibration file; when that is one sequence per
/// window, the sequences are the windows. `progress(tokens)` counts the
/// tokens written, up to `self_calib_sequences(nsamples) × seqlen`.
pub fn self_generated_calibration(
    model: &std::sync::Arc<nibble_runtime::Model>,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<u32>>> {
    let n_seq = self_calib_sequences(nsamples);
    let sequences = self_generated_windows(model, n_seq, seqlen, seed, threads, progress)?;
    if n_seq == nsamples {
        return Ok(sequences);
    }
    calibration_windows(&sequences.concat(), nsamples, seqlen, seed)
}

/// The quantizer's [`BlockExec`]: dense f32 weights of one layer (float,
/// or dequantized once GPTQ has quantized them), `gemm` products, causal
/// attention within one calibration window, and the hook that adds each
/// linear group's inputs to its Hessian. The block itself is the runtime's
/// ([`block_stage`]), so calibration runs exactly what inference runs.
pub struct CalibExec {
    /// Shared, so that [`CalibExec::run`] can hand the block its own
    /// reference without copying the description per stage.
    hp: std::sync::Arc<HParams>,
    seqlen: usize,
    threads: usize,
    /// Softmax and activations compiled for this CPU (bit-identical to the
    /// scalar references).
    kernels: &'static Kernels,
    /// `[rows, cols]` per [`Lin`] (empty: the model has no such layer).
    weights: [Vec<f32>; 7],
    vectors: [Option<Vec<f32>>; Vector::COUNT],
    /// The lower triangles of Σ x·xᵀ being collected, per [`Stage`] whose
    /// boundary they are the input of (see [`CalibExec::collect`]).
    hessians: [Option<Vec<f64>>; 4],
    scratch: Vec<f32>,
    /// Seconds spent in the hook (accumulating Hessians).
    pub hessian_secs: f64,
}

/// The slot of a boundary stage in [`CalibExec::hessians`].
fn hessian_slot(first: Lin) -> usize {
    match first {
        Lin::Q | Lin::K | Lin::V => 0,
        Lin::Out => 1,
        Lin::Gate | Lin::Up => 2,
        Lin::Down => 3,
    }
}

impl CalibExec {
    /// An executor for `seqlen`-token windows; the softmax and activations
    /// run through the runtime's kernel table (the one the runtime chose).
    pub fn new(hp: &HParams, seqlen: usize, threads: usize) -> Result<Self> {
        let kernels = Kernels::from_env()
            .map_err(|e| QuantError::Runtime(nibble_runtime::RuntimeError::InvalidParam(e)))?;
        Ok(CalibExec {
            hp: std::sync::Arc::new(hp.clone()),
            seqlen,
            threads: threads.max(1),
            kernels,
            weights: Default::default(),
            vectors: Default::default(),
            hessians: Default::default(),
            scratch: Vec::new(),
            hessian_secs: 0.0,
        })
    }

    /// Layer `l`'s float weights and vectors from `src`.
    pub fn load_layer(&mut self, src: &NibView<'_>, l: usize) -> Result<()> {
        for w in Lin::ALL {
            let name = format!("blk.{l}.{}.weight", w.role());
            self.weights[w as usize] = match src.tensor(&name) {
                Some(t) => tensor_f32(t)?,
                None if w == Lin::Gate && !self.hp.desc.activation.gated() => Vec::new(),
                None => return Err(QuantError::Shape(format!("missing tensor '{name}'"))),
            };
        }
        for v in Vector::ALL {
            let name = format!("blk.{l}.{}", v.name());
            self.vectors[v as usize] = src.tensor(&name).map(tensor_f32).transpose()?;
        }
        Ok(())
    }

    /// Linear layer `w`'s current weights `[rows, cols]`.
    pub fn weight(&self, w: Lin) -> &[f32] {
        &self.weights[w as usize]
    }

    /// Replace linear layer `w`'s weights (by their dequantized values).
    pub fn set_weight(&mut self, w: Lin, values: Vec<f32>) {
        self.weights[w as usize] = values;
    }

    /// From now on the hook adds the input stage `s` ends with to a
    /// Hessian (`cols × cols`, lower triangle), until [`CalibExec::take_hessian`].
    pub fn collect(&mut self, s: Stage) {
        if let Some(&first) = s.consumers(self.hp.desc.activation.gated()).first() {
            let cols = boundary_width(&self.hp, s);
            self.hessians[hessian_slot(first)] = Some(vec![0f64; cols * cols]);
        }
    }

    /// H = 2/n · Σ x·xᵀ of the input stage `s` ends with, over the `n`
    /// rows seen since [`CalibExec::collect`].
    pub fn take_hessian(&mut self, s: Stage, n: usize) -> Option<Vec<f32>> {
        let first = *s.consumers(self.hp.desc.activation.gated()).first()?;
        let mut h = self.hessians[hessian_slot(first)].take()?;
        let cols = boundary_width(&self.hp, s);
        mirror_lower(&mut h, cols);
        Some(h.iter().map(|&v| (v * 2.0 / n as f64) as f32).collect())
    }

    /// Stage `s` of block `l` over one window held in `b` (positions
    /// `0..seqlen`).
    pub fn run(&mut self, l: usize, b: &mut BlockBufs, rope: &Rope, s: Stage) {
        let hp = std::sync::Arc::clone(&self.hp);
        block_stage(&hp, l, self, b, rope, self.seqlen, s);
    }
}

impl BlockExec for CalibExec {
    fn vector(&self, _layer: usize, v: Vector) -> Option<&[f32]> {
        self.vectors[v as usize].as_deref()
    }

    fn input(&mut self, _layer: usize, first: Lin, x: &[f32], rows: usize) {
        if let Some(h) = &mut self.hessians[hessian_slot(first)] {
            let t = Instant::now();
            let cols = x.len() / rows;
            accumulate_xtx(h, x, rows, cols, &mut self.scratch, self.threads);
            self.hessian_secs += t.elapsed().as_secs_f64();
        }
    }

    fn linear(&mut self, _layer: usize, w: Lin, x: &[f32], rows: usize, out: &mut [f32]) {
        let wt = &self.weights[w as usize];
        let cols = x.len() / rows;
        linear(x, wt, rows, wt.len() / cols, cols, out, self.threads);
    }

    fn position(&self, row: usize) -> usize {
        row
    }

    fn attend(
        &mut self,
        _layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rows: usize,
        out: &mut [f32],
        p: AttnParams,
    ) {
        causal_attention(&self.hp, self.kernels, q, k, v, rows, out, p, self.threads);
    }

    fn kernels(&self) -> &'static Kernels {
        self.kernels
    }
}

/// `out[n, rows] = x[n, cols] · wᵀ`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    n: usize,
    rows: usize,
    cols: usize,
    out: &mut [f32],
    threads: usize,
) {
    matmul(
        MatMut {
            data: out,
            rows: n,
            cols: rows,
            rs: rows,
            cs: 1,
        },
        MatRef {
            data: x,
            rows: n,
            cols,
            rs: cols,
            cs: 1,
        },
        MatRef {
            data: w,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        },
        1.0,
        false,
        threads,
    );
}

/// Query rows per causal attention product in [`causal_attention`].
const ATTN_CHUNK: usize = 128;

/// Column panel width of [`accumulate_xtx`]'s products.
const XTX_PANEL: usize = 128;

/// The lower triangle (j ≤ i) of `h[cols, cols]` += xᵀ·x for `x[n, cols]`
/// (f32 products per call, f64 sum); the strict upper triangle is left as
/// it is: call [`mirror_lower`] once the last rows are in. xᵀ·x is
/// symmetric, so only its lower triangle is multiplied, one product per
/// panel of `XTX_PANEL` (128) columns from the panel's diagonal down (about half
/// the multiply-adds of the full product for wide inputs).
pub fn accumulate_xtx(
    h: &mut [f64],
    x: &[f32],
    n: usize,
    cols: usize,
    scratch: &mut Vec<f32>,
    threads: usize,
) {
    assert_eq!(h.len(), cols * cols, "accumulate_xtx: h is not cols × cols");
    assert!(
        x.len() >= n * cols,
        "accumulate_xtx: x is shorter than n × cols"
    );
    if n == 0 || cols == 0 {
        return;
    }
    scratch.clear();
    scratch.resize(cols * cols, 0.0);
    for j0 in (0..cols).step_by(XTX_PANEL) {
        let j1 = (j0 + XTX_PANEL).min(cols);
        // scratch[j0.., j0..j1] = x[:, j0..]ᵀ · x[:, j0..j1].
        matmul(
            MatMut {
                data: &mut scratch[j0 * cols + j0..],
                rows: cols - j0,
                cols: j1 - j0,
                rs: cols,
                cs: 1,
            },
            MatRef {
                data: &x[j0..],
                rows: cols - j0,
                cols: n,
                rs: 1,
                cs: cols,
            },
            MatRef {
                data: &x[j0..],
                rows: n,
                cols: j1 - j0,
                rs: cols,
                cs: 1,
            },
            1.0,
            false,
            threads,
        );
    }
    for i in 0..cols {
        let (dst, src) = (
            &mut h[i * cols..=i * cols + i],
            &scratch[i * cols..=i * cols + i],
        );
        for (a, &b) in dst.iter_mut().zip(src) {
            *a += f64::from(b);
        }
    }
}

/// Copy the lower triangle of the row-major `h[cols, cols]` onto its upper
/// triangle (after [`accumulate_xtx`]).
pub fn mirror_lower(h: &mut [f64], cols: usize) {
    for i in 0..cols {
        for j in 0..i {
            h[j * cols + i] = h[i * cols + j];
        }
    }
}

/// Causal self-attention of one window: roped `q[l, n_head·head_dim]`,
/// `k`/`v[l, n_head_kv·head_dim]` → `att[l, n_head·head_dim]` with the
/// layer's window, scale and soft-cap.
#[allow(clippy::too_many_arguments)]
fn causal_attention(
    hp: &HParams,
    kernels: &Kernels,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    l: usize,
    att: &mut [f32],
    p: AttnParams,
    threads: usize,
) {
    let hd = hp.head_dim;
    let (q_dim, kv_dim) = (hp.n_head * hd, hp.n_head_kv * hd);
    let group = hp.n_head / hp.n_head_kv;
    // Causal: queries in chunks of ATTN_CHUNK rows see only the keys up
    // to their chunk's end, so the products skip most of the masked
    // upper triangle (5/8 of the full l × l work at l = 4 chunks). The
    // (head, chunk) pairs are independent tasks spread over the rayon
    // pool, each with single-threaded products: per-head products are
    // too small for gemm's own threading, and the softmax's exp, a
    // large share of the time, is then spread over the threads too.
    let n_chunks = l.div_ceil(ATTN_CHUNK);
    let tasks: Vec<(usize, usize)> = (0..hp.n_head)
        .flat_map(|h| (0..n_chunks).map(move |c| (h, c * ATTN_CHUNK)))
        .collect();
    let run = |&(h, i0): &(usize, usize)| -> Vec<f32> {
        let g = h / group;
        let i1 = (i0 + ATTN_CHUNK).min(l);
        let rows = i1 - i0;
        // scores[rows, i1] = q[i0..i1, head h] · k[0..i1, group g]ᵀ.
        let mut scores = vec![0f32; rows * i1];
        matmul(
            MatMut {
                data: &mut scores,
                rows,
                cols: i1,
                rs: i1,
                cs: 1,
            },
            MatRef {
                data: &q[i0 * q_dim + h * hd..],
                rows,
                cols: hd,
                rs: q_dim,
                cs: 1,
            },
            MatRef {
                data: &k[g * hd..],
                rows: hd,
                cols: i1,
                rs: 1,
                cs: kv_dim,
            },
            p.scale,
            false,
            1,
        );
        for (r, row) in scores.chunks_exact_mut(i1).enumerate() {
            let i = i0 + r;
            let lo = p.first_key(i);
            if p.softcap > 0.0 {
                for s in &mut row[lo..=i] {
                    *s = p.softcap * (*s / p.softcap).tanh();
                }
            }
            (kernels.causal_softmax)(row, lo, i);
        }
        // out[rows, hd] = scores · v[0..i1, group g].
        let mut out = vec![0f32; rows * hd];
        matmul(
            MatMut {
                data: &mut out,
                rows,
                cols: hd,
                rs: hd,
                cs: 1,
            },
            MatRef {
                data: &scores,
                rows,
                cols: i1,
                rs: i1,
                cs: 1,
            },
            MatRef {
                data: &v[g * hd..],
                rows: i1,
                cols: hd,
                rs: kv_dim,
                cs: 1,
            },
            1.0,
            false,
            1,
        );
        out
    };
    let outs: Vec<Vec<f32>> = if threads > 1 {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    for (&(h, i0), out) in tasks.iter().zip(&outs) {
        for (r, o) in out.chunks_exact(hd).enumerate() {
            let dst = (i0 + r) * q_dim + h * hd;
            att[dst..dst + hd].copy_from_slice(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lower-triangle product, mirrored, equals a plain f64 xᵀ·x, on
    /// widths below, at and across the panel width; the upper triangle is
    /// untouched until mirrored.
    #[test]
    fn accumulate_xtx_equals_the_full_product() {
        for (n, cols) in [
            (1, 1),
            (7, 5),
            (33, XTX_PANEL),
            (64, XTX_PANEL + 1),
            (40, 300),
        ] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let mut h = vec![0.25f64; cols * cols];
            let mut scratch = Vec::new();
            for threads in [1, 2] {
                h.fill(0.25);
                accumulate_xtx(&mut h, &x, n, cols, &mut scratch, threads);
                for i in 0..cols {
                    assert!(h[i * cols + i + 1..(i + 1) * cols]
                        .iter()
                        .all(|&v| v == 0.25));
                }
                mirror_lower(&mut h, cols);
                for i in 0..cols {
                    for j in 0..cols {
                        let want: f64 = 0.25
                            + (0..n)
                                .map(|t| f64::from(x[t * cols + i]) * f64::from(x[t * cols + j]))
                                .sum::<f64>();
                        let got = h[i * cols + j];
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "n={n} cols={cols} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
