//! The Llama forward pass for one token, over a [`RunState`] sized once from
//! the model config: embedding → n_layer × (RMSNorm, GQA attention with RoPE
//! and a KV cache, SwiGLU MLP) → RMSNorm → output head.
//!
//! Nothing here allocates: every buffer, the KV cache and the RoPE tables
//! live in the run state, and the thread pool is created with the session.

use rayon::prelude::*;

use crate::kernels::{dot_bf16, dot_f16, dot_f32, dot_qg_f32};
use crate::model::{Model, Weight, WeightData};

/// Every buffer a forward pass needs, sized once from the config and `n_ctx`.
pub struct RunState {
    pub n_ctx: usize,
    /// `[n_embd]` residual stream.
    pub x: Vec<f32>,
    /// `[n_embd]` normalized input of a sub-layer.
    pub xb: Vec<f32>,
    /// `[n_embd]` sub-layer output.
    pub xb2: Vec<f32>,
    /// `[n_head·head_dim]` queries.
    pub q: Vec<f32>,
    /// `[n_head·head_dim]` attention output (all heads).
    pub att_out: Vec<f32>,
    /// `[n_head, n_ctx]` attention scores.
    pub scores: Vec<f32>,
    /// `[n_ff]` gate activations.
    pub hb: Vec<f32>,
    /// `[n_ff]` up activations.
    pub hb2: Vec<f32>,
    /// `[n_vocab]` output logits.
    pub logits: Vec<f32>,
    /// `[max input width]` input gathered through an act-order permutation.
    xperm: Vec<f32>,
    /// `[n_layer, n_ctx, n_head_kv·head_dim]` keys (after RoPE).
    pub key_cache: Vec<f32>,
    /// `[n_layer, n_ctx, n_head_kv·head_dim]` values.
    pub value_cache: Vec<f32>,
    /// `[n_ctx, head_dim/2]` RoPE cosines and sines.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

impl RunState {
    pub fn new(model: &Model, n_ctx: usize) -> RunState {
        let hp = &model.hparams;
        let q_dim = hp.n_head * hp.head_dim;
        let kv_dim = hp.n_head_kv * hp.head_dim;
        let (rope_cos, rope_sin) = rope_tables(hp.rope_theta, hp.head_dim, n_ctx);
        RunState {
            n_ctx,
            x: vec![0.0; hp.n_embd],
            xb: vec![0.0; hp.n_embd],
            xb2: vec![0.0; hp.n_embd],
            q: vec![0.0; q_dim],
            att_out: vec![0.0; q_dim],
            scores: vec![0.0; hp.n_head * n_ctx],
            hb: vec![0.0; hp.n_ff],
            hb2: vec![0.0; hp.n_ff],
            logits: vec![0.0; hp.n_vocab],
            xperm: vec![0.0; hp.n_embd.max(hp.n_ff).max(q_dim)],
            key_cache: vec![0.0; hp.n_layer * n_ctx * kv_dim],
            value_cache: vec![0.0; hp.n_layer * n_ctx * kv_dim],
            rope_cos,
            rope_sin,
        }
    }

    /// Bytes held by this state (KV cache included).
    pub fn bytes(&self) -> usize {
        4 * (self.x.len()
            + self.xb.len()
            + self.xb2.len()
            + self.q.len()
            + self.att_out.len()
            + self.scores.len()
            + self.hb.len()
            + self.hb2.len()
            + self.logits.len()
            + self.xperm.len()
            + self.key_cache.len()
            + self.value_cache.len()
            + self.rope_cos.len()
            + self.rope_sin.len())
    }
}

/// Dot product of row `r` of a weight with `x` (already permuted if the
/// weight has an act-order permutation).
fn row_dot(data: &WeightData<'_>, r: usize, cols: usize, x: &[f32]) -> f32 {
    let span = r * cols..(r + 1) * cols;
    match data {
        WeightData::F32(d) => dot_f32(&d[span], x),
        WeightData::F16(d) => dot_f16(&d[span], x),
        WeightData::BF16(d) => dot_bf16(&d[span], x),
        WeightData::Packed {
            bits,
            group_size,
            row_bytes,
            data,
        } => dot_qg_f32(
            *bits,
            *group_size,
            &data[r * row_bytes..(r + 1) * row_bytes],
            x,
        ),
    }
}

/// Decode row `r` of a weight to f32 in stored column order.
pub fn decode_row(data: &WeightData<'_>, r: usize, cols: usize, out: &mut [f32]) {
    let span = r * cols..(r + 1) * cols;
    match data {
        WeightData::F32(d) => out.copy_from_slice(&d[span]),
        WeightData::F16(d) => {
            use half::slice::HalfFloatSliceExt;
            d[span].convert_to_f32_slice(out);
        }
        WeightData::BF16(d) => {
            for (o, v) in out.iter_mut().zip(&d[span]) {
                *o = v.to_f32();
            }
        }
        WeightData::Packed {
            bits,
            group_size,
            row_bytes,
            data,
        } => nibble_format::quant::dequantize_row(
            *bits,
            *group_size,
            &data[r * row_bytes..(r + 1) * row_bytes],
            out,
        ),
    }
}

/// out = W · x for a `[rows, cols]` weight, rows split across the current
/// rayon pool when `parallel` (no allocation either way). `xperm` is scratch
/// for weights stored with an act-order permutation (gathered once here).
pub fn matvec(
    model: &Model,
    w: &Weight,
    x: &[f32],
    out: &mut [f32],
    xperm: &mut [f32],
    parallel: bool,
) {
    debug_assert_eq!(x.len(), w.cols);
    debug_assert_eq!(out.len(), w.rows);
    let cols = w.cols;
    let x: &[f32] = match model.perm(w) {
        Some(perm) => {
            let xp = &mut xperm[..cols];
            for (o, &p) in xp.iter_mut().zip(perm) {
                *o = x[p as usize];
            }
            xp
        }
        None => x,
    };
    let data = model.data(w);
    if parallel && w.rows >= 64 {
        let chunk = w.rows.div_ceil(rayon::current_num_threads() * 4).max(16);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            for (i, v) in o.iter_mut().enumerate() {
                *v = row_dot(&data, c * chunk + i, cols, x);
            }
        });
    } else {
        for (r, v) in out.iter_mut().enumerate() {
            *v = row_dot(&data, r, cols, x);
        }
    }
}

/// out = x / rms(x) · weight, as Hugging Face's LlamaRMSNorm (f32 in/out).
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f64) {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + eps).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * scale);
    }
}

/// RoPE tables `[n_ctx, head_dim/2]` (cos, sin), as Hugging Face computes
/// them: inv_freq_i = 1 / theta^(2i/d) in f32, angle = pos · inv_freq in f32.
pub fn rope_tables(theta: f64, head_dim: usize, n_ctx: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = vec![0f32; n_ctx * half];
    let mut sin = vec![0f32; n_ctx * half];
    for i in 0..half {
        let inv_freq = (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32;
        for pos in 0..n_ctx {
            let angle = f64::from(pos as f32 * inv_freq);
            cos[pos * half + i] = angle.cos() as f32;
            sin[pos * half + i] = angle.sin() as f32;
        }
    }
    (cos, sin)
}

/// Rotate-half RoPE on each `head_dim` slice of `v`, with one position's
/// `cos`/`sin` rows (`head_dim/2` each).
pub fn rope(v: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in v.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// Causal (and sliding-window) softmax of one attention row in place: the
/// entries `lo..=pos` become probabilities, every other entry 0.
pub fn causal_softmax_row(row: &mut [f32], lo: usize, pos: usize) {
    let max = row[lo..=pos]
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in &mut row[lo..=pos] {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in &mut row[lo..=pos] {
        *v *= inv;
    }
    row[..lo].fill(0.0);
    row[pos + 1..].fill(0.0);
}

fn embed(model: &Model, token: u32, out: &mut [f32]) {
    let w = &model.token_embd;
    decode_row(&model.data(w), token as usize, w.cols, out);
}

/// Run one token at position `pos` (< n_ctx, checked by the caller), filling
/// the KV cache row `pos`; computes `s.logits` when `want_logits`.
pub fn forward(
    model: &Model,
    s: &mut RunState,
    token: u32,
    pos: usize,
    want_logits: bool,
    parallel: bool,
) {
    let hp = &model.hparams;
    let (hd, n_head, n_kv) = (hp.head_dim, hp.n_head, hp.n_head_kv);
    let kv_dim = n_kv * hd;
    let group = n_head / n_kv;
    let half = hd / 2;
    let n_ctx = s.n_ctx;
    let inv_sqrt_hd = 1.0 / (hd as f32).sqrt();
    let start = if hp.sliding_window > 0 {
        (pos + 1).saturating_sub(hp.sliding_window)
    } else {
        0
    };

    embed(model, token, &mut s.x);
    let cos = &s.rope_cos[pos * half..(pos + 1) * half];
    let sin = &s.rope_sin[pos * half..(pos + 1) * half];

    for (l, lw) in model.layers.iter().enumerate() {
        rmsnorm(
            &mut s.xb,
            &s.x,
            model.vector(&lw.attn_norm),
            hp.rms_norm_eps,
        );
        let cache_row = (l * n_ctx + pos) * kv_dim;
        let layer_base = l * n_ctx * kv_dim;
        matvec(model, &lw.attn_q, &s.xb, &mut s.q, &mut s.xperm, parallel);
        {
            let k = &mut s.key_cache[cache_row..cache_row + kv_dim];
            matvec(model, &lw.attn_k, &s.xb, k, &mut s.xperm, parallel);
            rope(k, hd, cos, sin);
        }
        matvec(
            model,
            &lw.attn_v,
            &s.xb,
            &mut s.value_cache[cache_row..cache_row + kv_dim],
            &mut s.xperm,
            parallel,
        );
        rope(&mut s.q, hd, cos, sin);

        // Attention, head by head (GQA: `group` query heads share a KV head).
        for h in 0..n_head {
            let kvh = h / group;
            let q = &s.q[h * hd..(h + 1) * hd];
            let scores = &mut s.scores[h * n_ctx + start..h * n_ctx + pos + 1];
            let mut max = f32::NEG_INFINITY;
            for (t, sc) in (start..=pos).zip(scores.iter_mut()) {
                let k = &s.key_cache[layer_base + t * kv_dim + kvh * hd..][..hd];
                *sc = dot_f32(q, k) * inv_sqrt_hd;
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            let out = &mut s.att_out[h * hd..(h + 1) * hd];
            out.fill(0.0);
            for (t, &p) in (start..=pos).zip(scores.iter()) {
                let v = &s.value_cache[layer_base + t * kv_dim + kvh * hd..][..hd];
                let a = p * inv;
                for (o, &vv) in out.iter_mut().zip(v) {
                    *o += a * vv;
                }
            }
        }
        matvec(
            model,
            &lw.attn_output,
            &s.att_out,
            &mut s.xb2,
            &mut s.xperm,
            parallel,
        );
        for (x, d) in s.x.iter_mut().zip(&s.xb2) {
            *x += d;
        }

        rmsnorm(&mut s.xb, &s.x, model.vector(&lw.ffn_norm), hp.rms_norm_eps);
        matvec(
            model,
            &lw.ffn_gate,
            &s.xb,
            &mut s.hb,
            &mut s.xperm,
            parallel,
        );
        matvec(model, &lw.ffn_up, &s.xb, &mut s.hb2, &mut s.xperm, parallel);
        for (g, &u) in s.hb.iter_mut().zip(&s.hb2) {
            let silu = *g / (1.0 + (-*g).exp());
            *g = silu * u;
        }
        matvec(
            model,
            &lw.ffn_down,
            &s.hb,
            &mut s.xb2,
            &mut s.xperm,
            parallel,
        );
        for (x, d) in s.x.iter_mut().zip(&s.xb2) {
            *x += d;
        }
    }

    if want_logits {
        rmsnorm(
            &mut s.xb,
            &s.x,
            model.vector(&model.output_norm),
            hp.rms_norm_eps,
        );
        matvec(
            model,
            &model.output,
            &s.xb,
            &mut s.logits,
            &mut s.xperm,
            parallel,
        );
    }
}

/// Rows of a F16/BF16 weight converted to f32 at a time for the batched path.
const WEIGHT_TILE_ROWS: usize = 256;

/// Buffers of the batched (prompt) path: `n_batch` tokens at a time as
/// matrix-matrix products. Allocated once, on the first multi-token call.
pub struct BatchState {
    pub n_batch: usize,
    /// `[n_batch, n_embd]` residual stream rows.
    x: Vec<f32>,
    /// `[n_batch, n_embd]` normalized rows.
    xb: Vec<f32>,
    /// `[n_batch, n_embd]` sub-layer outputs.
    xb2: Vec<f32>,
    /// `[n_batch, n_head·head_dim]` queries.
    q: Vec<f32>,
    /// `[n_batch, n_head·head_dim]` attention outputs.
    att_out: Vec<f32>,
    /// `[n_batch, n_ctx]` one head's attention scores.
    scores: Vec<f32>,
    /// `[n_batch, n_ff]` gate / up activations.
    hb: Vec<f32>,
    hb2: Vec<f32>,
    /// `[n_batch, n_vocab]` logits of every row (only when requested).
    pub logits: Vec<f32>,
    /// `[WEIGHT_TILE_ROWS, max(n_embd, n_ff, q_dim)]` f32 copy of a weight tile.
    wtile: Vec<f32>,
}

impl BatchState {
    pub fn new(model: &Model, n_ctx: usize, n_batch: usize) -> BatchState {
        let hp = &model.hparams;
        let q_dim = hp.n_head * hp.head_dim;
        let max_in = hp.n_embd.max(hp.n_ff).max(q_dim);
        BatchState {
            n_batch,
            x: vec![0.0; n_batch * hp.n_embd],
            xb: vec![0.0; n_batch * hp.n_embd],
            xb2: vec![0.0; n_batch * hp.n_embd],
            q: vec![0.0; n_batch * q_dim],
            att_out: vec![0.0; n_batch * q_dim],
            scores: vec![0.0; n_batch * n_ctx],
            hb: vec![0.0; n_batch * hp.n_ff],
            hb2: vec![0.0; n_batch * hp.n_ff],
            logits: Vec::new(),
            // A tile of decoded rows plus one row of scratch.
            wtile: vec![0.0; (WEIGHT_TILE_ROWS + 1) * max_in],
        }
    }
}

use crate::kernels::{matmul, MatMut, MatRef};

/// `out[i, :] = W · x[i, :]` for `b` rows; `out` rows are `out_rs` apart.
/// F16/BF16 weights are converted tile by tile into `wtile` and fed to gemm.
#[allow(clippy::too_many_arguments)]
fn linear_batch(
    model: &Model,
    w: &Weight,
    x: &[f32],
    b: usize,
    out: &mut [f32],
    out_rs: usize,
    wtile: &mut [f32],
    threads: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    let lhs = MatRef {
        data: x,
        rows: b,
        cols,
        rs: cols,
        cs: 1,
    };
    let emit = |r0: usize, n: usize, wdata: &[f32], out: &mut [f32]| {
        matmul(
            MatMut {
                data: &mut out[r0..],
                rows: b,
                cols: n,
                rs: out_rs,
                cs: 1,
            },
            lhs,
            MatRef {
                data: wdata,
                rows: cols,
                cols: n,
                rs: 1,
                cs: cols,
            },
            1.0,
            false,
            threads,
        );
    };
    let data = model.data(w);
    let perm = model.perm(w);
    if let (WeightData::F32(d), None) = (&data, perm) {
        return emit(0, rows, d, out);
    }
    // Other types: decode a tile of rows to f32 (scattering columns back to
    // input order when the weight is stored act-order permuted), then gemm.
    for r0 in (0..rows).step_by(WEIGHT_TILE_ROWS) {
        let n = WEIGHT_TILE_ROWS.min(rows - r0);
        let (tile, rowbuf) = wtile.split_at_mut(WEIGHT_TILE_ROWS * cols);
        for r in 0..n {
            let dst = &mut tile[r * cols..(r + 1) * cols];
            match perm {
                None => decode_row(&data, r0 + r, cols, dst),
                Some(perm) => {
                    let tmp = &mut rowbuf[..cols];
                    decode_row(&data, r0 + r, cols, tmp);
                    for (&p, &v) in perm.iter().zip(tmp.iter()) {
                        dst[p as usize] = v;
                    }
                }
            }
        }
        emit(r0, n, &tile[..n * cols], out);
    }
}

/// Run `tokens` (≤ n_batch) at positions `start..start + len` as one batch,
/// filling those KV cache rows. `logits`: `None` computes no logits, `Some(false)`
/// only the last row's (into `s.logits`), `Some(true)` every row's (into `bs.logits`).
pub fn forward_batch(
    model: &Model,
    s: &mut RunState,
    bs: &mut BatchState,
    tokens: &[u32],
    start: usize,
    logits: Option<bool>,
    threads: usize,
) {
    let hp = &model.hparams;
    let b = tokens.len();
    assert!(b > 0 && b <= bs.n_batch && start + b <= s.n_ctx);
    let (e, hd, n_head, n_kv) = (hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv);
    let (q_dim, kv_dim, group, half) = (n_head * hd, n_kv * hd, n_head / n_kv, hd / 2);
    let n_ctx = s.n_ctx;
    let n_keys = start + b;
    let inv_sqrt_hd = 1.0 / (hd as f32).sqrt();

    for (i, &t) in tokens.iter().enumerate() {
        embed(model, t, &mut bs.x[i * e..(i + 1) * e]);
    }
    for (l, lw) in model.layers.iter().enumerate() {
        let norm = model.vector(&lw.attn_norm);
        for i in 0..b {
            rmsnorm(
                &mut bs.xb[i * e..(i + 1) * e],
                &bs.x[i * e..(i + 1) * e],
                norm,
                hp.rms_norm_eps,
            );
        }
        let lbase = l * n_ctx * kv_dim;
        let rows = lbase + start * kv_dim..lbase + n_keys * kv_dim;
        linear_batch(
            model,
            &lw.attn_q,
            &bs.xb,
            b,
            &mut bs.q,
            q_dim,
            &mut bs.wtile,
            threads,
        );
        linear_batch(
            model,
            &lw.attn_k,
            &bs.xb,
            b,
            &mut s.key_cache[rows.clone()],
            kv_dim,
            &mut bs.wtile,
            threads,
        );
        linear_batch(
            model,
            &lw.attn_v,
            &bs.xb,
            b,
            &mut s.value_cache[rows.clone()],
            kv_dim,
            &mut bs.wtile,
            threads,
        );
        for i in 0..b {
            let pos = start + i;
            let (cos, sin) = (
                &s.rope_cos[pos * half..(pos + 1) * half],
                &s.rope_sin[pos * half..(pos + 1) * half],
            );
            rope(&mut bs.q[i * q_dim..(i + 1) * q_dim], hd, cos, sin);
            let k0 = lbase + pos * kv_dim;
            rope(&mut s.key_cache[k0..k0 + kv_dim], hd, cos, sin);
        }

        // Attention per query head: S = Q·Kᵀ/√d over all cached keys, causal
        // (and sliding-window) mask, softmax per row, then O = S·V.
        for h in 0..n_head {
            let g = h / group;
            matmul(
                MatMut {
                    data: &mut bs.scores,
                    rows: b,
                    cols: n_keys,
                    rs: n_keys,
                    cs: 1,
                },
                MatRef {
                    data: &bs.q[h * hd..],
                    rows: b,
                    cols: hd,
                    rs: q_dim,
                    cs: 1,
                },
                MatRef {
                    data: &s.key_cache[lbase + g * hd..],
                    rows: hd,
                    cols: n_keys,
                    rs: 1,
                    cs: kv_dim,
                },
                inv_sqrt_hd,
                false,
                threads,
            );
            for i in 0..b {
                let pos = start + i;
                let lo = if hp.sliding_window > 0 {
                    (pos + 1).saturating_sub(hp.sliding_window)
                } else {
                    0
                };
                causal_softmax_row(&mut bs.scores[i * n_keys..(i + 1) * n_keys], lo, pos);
            }
            matmul(
                MatMut {
                    data: &mut bs.att_out[h * hd..],
                    rows: b,
                    cols: hd,
                    rs: q_dim,
                    cs: 1,
                },
                MatRef {
                    data: &bs.scores,
                    rows: b,
                    cols: n_keys,
                    rs: n_keys,
                    cs: 1,
                },
                MatRef {
                    data: &s.value_cache[lbase + g * hd..],
                    rows: n_keys,
                    cols: hd,
                    rs: kv_dim,
                    cs: 1,
                },
                1.0,
                false,
                threads,
            );
        }
        linear_batch(
            model,
            &lw.attn_output,
            &bs.att_out,
            b,
            &mut bs.xb2,
            e,
            &mut bs.wtile,
            threads,
        );
        for (x, d) in bs.x[..b * e].iter_mut().zip(&bs.xb2) {
            *x += d;
        }

        let norm = model.vector(&lw.ffn_norm);
        for i in 0..b {
            rmsnorm(
                &mut bs.xb[i * e..(i + 1) * e],
                &bs.x[i * e..(i + 1) * e],
                norm,
                hp.rms_norm_eps,
            );
        }
        let n_ff = hp.n_ff;
        linear_batch(
            model,
            &lw.ffn_gate,
            &bs.xb,
            b,
            &mut bs.hb,
            n_ff,
            &mut bs.wtile,
            threads,
        );
        linear_batch(
            model,
            &lw.ffn_up,
            &bs.xb,
            b,
            &mut bs.hb2,
            n_ff,
            &mut bs.wtile,
            threads,
        );
        for (g, &u) in bs.hb[..b * n_ff].iter_mut().zip(&bs.hb2) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        linear_batch(
            model,
            &lw.ffn_down,
            &bs.hb,
            b,
            &mut bs.xb2,
            e,
            &mut bs.wtile,
            threads,
        );
        for (x, d) in bs.x[..b * e].iter_mut().zip(&bs.xb2) {
            *x += d;
        }
    }

    let norm = model.vector(&model.output_norm);
    match logits {
        None => {}
        Some(false) => {
            let last = &bs.x[(b - 1) * e..b * e];
            rmsnorm(&mut s.xb, last, norm, hp.rms_norm_eps);
            matvec(
                model,
                &model.output,
                &s.xb,
                &mut s.logits,
                &mut s.xperm,
                threads > 1,
            );
        }
        Some(true) => {
            for i in 0..b {
                rmsnorm(
                    &mut bs.xb[i * e..(i + 1) * e],
                    &bs.x[i * e..(i + 1) * e],
                    norm,
                    hp.rms_norm_eps,
                );
            }
            let n_vocab = hp.n_vocab;
            if bs.logits.len() < bs.n_batch * n_vocab {
                bs.logits = vec![0.0; bs.n_batch * n_vocab];
            }
            linear_batch(
                model,
                &model.output,
                &bs.xb,
                b,
                &mut bs.logits,
                n_vocab,
                &mut bs.wtile,
                threads,
            );
        }
    }
}
