//! The Llama forward pass for one token, over a [`RunState`] sized once from
//! the model config: embedding → n_layer × (RMSNorm, GQA attention with RoPE
//! and a KV cache, SwiGLU MLP) → RMSNorm → output head.
//!
//! Nothing here allocates: every buffer, the KV cache and the RoPE tables
//! live in the run state, and the thread pool is created with the session.

use rayon::prelude::*;

use crate::kernels::{dot_bf16, dot_f16, dot_f32};
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
        let half = hp.head_dim / 2;
        let mut rope_cos = vec![0f32; n_ctx * half];
        let mut rope_sin = vec![0f32; n_ctx * half];
        // As Hugging Face: inv_freq_i = 1 / theta^(2i/d) in f32, angle = pos · inv_freq in f32.
        for i in 0..half {
            let inv_freq = (1.0 / hp.rope_theta.powf(2.0 * i as f64 / hp.head_dim as f64)) as f32;
            for pos in 0..n_ctx {
                let angle = f64::from(pos as f32 * inv_freq);
                rope_cos[pos * half + i] = angle.cos() as f32;
                rope_sin[pos * half + i] = angle.sin() as f32;
            }
        }
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
            + self.key_cache.len()
            + self.value_cache.len()
            + self.rope_cos.len()
            + self.rope_sin.len())
    }
}

/// out = W · x for a `[rows, cols]` weight, rows split across the current
/// rayon pool when `parallel` (no allocation either way).
pub fn matvec(model: &Model, w: &Weight, x: &[f32], out: &mut [f32], parallel: bool) {
    debug_assert_eq!(x.len(), w.cols);
    debug_assert_eq!(out.len(), w.rows);
    let cols = w.cols;
    let data = model.data(w);
    let row_dot = |r: usize| -> f32 {
        let span = r * cols..(r + 1) * cols;
        match &data {
            WeightData::F32(d) => dot_f32(&d[span], x),
            WeightData::F16(d) => dot_f16(&d[span], x),
            WeightData::BF16(d) => dot_bf16(&d[span], x),
        }
    };
    if parallel && w.rows >= 64 {
        let chunk = w.rows.div_ceil(rayon::current_num_threads() * 4).max(16);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            for (i, v) in o.iter_mut().enumerate() {
                *v = row_dot(c * chunk + i);
            }
        });
    } else {
        for (r, v) in out.iter_mut().enumerate() {
            *v = row_dot(r);
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

/// Rotate-half RoPE on each `head_dim` slice of `v` at table row `pos`.
fn rope(v: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
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

fn embed(model: &Model, token: u32, out: &mut [f32]) {
    let w = &model.token_embd;
    let span = token as usize * w.cols..(token as usize + 1) * w.cols;
    match model.data(w) {
        WeightData::F32(d) => out.copy_from_slice(&d[span]),
        WeightData::F16(d) => {
            for (o, v) in out.iter_mut().zip(&d[span]) {
                *o = v.to_f32();
            }
        }
        WeightData::BF16(d) => {
            for (o, v) in out.iter_mut().zip(&d[span]) {
                *o = v.to_f32();
            }
        }
    }
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
        matvec(model, &lw.attn_q, &s.xb, &mut s.q, parallel);
        {
            let k = &mut s.key_cache[cache_row..cache_row + kv_dim];
            matvec(model, &lw.attn_k, &s.xb, k, parallel);
            rope(k, hd, cos, sin);
        }
        matvec(
            model,
            &lw.attn_v,
            &s.xb,
            &mut s.value_cache[cache_row..cache_row + kv_dim],
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
        matvec(model, &lw.attn_output, &s.att_out, &mut s.xb2, parallel);
        for (x, d) in s.x.iter_mut().zip(&s.xb2) {
            *x += d;
        }

        rmsnorm(&mut s.xb, &s.x, model.vector(&lw.ffn_norm), hp.rms_norm_eps);
        matvec(model, &lw.ffn_gate, &s.xb, &mut s.hb, parallel);
        matvec(model, &lw.ffn_up, &s.xb, &mut s.hb2, parallel);
        for (g, &u) in s.hb.iter_mut().zip(&s.hb2) {
            let silu = *g / (1.0 + (-*g).exp());
            *g = silu * u;
        }
        matvec(model, &lw.ffn_down, &s.hb, &mut s.xb2, parallel);
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
        matvec(model, &model.output, &s.xb, &mut s.logits, parallel);
    }
}
