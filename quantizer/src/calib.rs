//! Calibration for GPTQ: random token windows from a text, and a dense f32
//! forward of one decoder block over them that exposes the inputs of each
//! linear layer (to accumulate Hessians) — one block at a time, never the
//! whole model's activations.

use nibble_format::HParams;
use nibble_runtime::forward::{causal_softmax_row, rmsnorm, rope, rope_tables};
use nibble_runtime::kernels::{matmul, MatMut, MatRef};

use crate::error::{QuantError, Result};

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

/// How [`self_generated_windows`] samples: temperature 1 with nucleus 0.95,
/// the model's own distribution minus its least likely tail.
pub const SELF_CALIB_TEMPERATURE: f32 = 1.0;
pub const SELF_CALIB_TOP_P: f32 = 0.95;

/// Calibration windows written by the model itself, the default when no
/// calibration text is given ("data-free" calibration): `nsamples`
/// sequences of `seqlen` tokens, each BOS (when the model has one) followed
/// by tokens sampled from the model at [`SELF_CALIB_TEMPERATURE`] and
/// [`SELF_CALIB_TOP_P`], with end-of-sequence tokens kept and generation
/// continued past them. Sample `i` uses seed `seed + i`, so the windows do
/// not depend on `threads`. `threads` sequences are generated at once, each
/// on one thread; `progress(done)` is called after each sequence.
pub fn self_generated_windows(
    model: &std::sync::Arc<nibble_runtime::Model>,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<u32>>> {
    use nibble_runtime::{GenerateParams, Sampler, SamplerParams, Session, SessionParams};
    use std::sync::atomic::{AtomicUsize, Ordering};
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
    let threads = threads.clamp(1, nsamples);
    let done = AtomicUsize::new(0);
    // (sample index, window) pairs of one thread.
    type Numbered = Vec<(usize, Vec<u32>)>;
    let generate = |t: usize| -> Result<Numbered> {
        let sp = SessionParams {
            n_ctx: seqlen,
            n_threads: 1,
            ..SessionParams::default()
        };
        let mut session = Session::new(std::sync::Arc::clone(model), &sp)?;
        let params = GenerateParams {
            max_tokens: seqlen - 1,
            stop_strings: Vec::new(),
            ignore_eos: true,
        };
        let mut out = Vec::new();
        for i in (t..nsamples).step_by(threads) {
            session.reset();
            let mut sampler = Sampler::new(
                SamplerParams {
                    temperature: SELF_CALIB_TEMPERATURE,
                    top_k: 0,
                    top_p: SELF_CALIB_TOP_P,
                    min_p: 0.0,
                    repeat_penalty: 1.0,
                    repeat_last_n: 0,
                    seed: seed.wrapping_add(i as u64),
                },
                model.hparams.n_vocab,
            )?;
            let stats = session.generate(&[first], &params, &mut sampler, |_, _| true)?;
            let mut w = Vec::with_capacity(seqlen);
            w.push(first);
            w.extend_from_slice(&stats.tokens);
            if w.len() != seqlen {
                return Err(QuantError::Calibration(format!(
                    "self-generated sample {i} has {} tokens, not {seqlen}",
                    w.len()
                )));
            }
            out.push((i, w));
            progress(done.fetch_add(1, Ordering::Relaxed) + 1);
        }
        Ok(out)
    };
    let parts: Vec<Result<Numbered>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|t| s.spawn(move || generate(t))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(QuantError::Calibration(
                        "a generation thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut windows = vec![Vec::new(); nsamples];
    for part in parts {
        for (i, w) in part? {
            windows[i] = w;
        }
    }
    Ok(windows)
}

/// Dense f32 weights of one block (`[rows, cols]` row-major, HF rotate-half q/k).
#[derive(Clone)]
pub struct BlockWeights {
    pub attn_norm: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub o: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

/// Shapes and tables shared by every block forward.
pub struct BlockCtx<'a> {
    pub hp: &'a HParams,
    pub seqlen: usize,
    pub threads: usize,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
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

/// `h[cols, cols] += xᵀ·x` for `x[n, cols]` (f32 product per call, f64 sum).
pub fn accumulate_xtx(
    h: &mut [f64],
    x: &[f32],
    n: usize,
    cols: usize,
    scratch: &mut Vec<f32>,
    threads: usize,
) {
    scratch.resize(cols * cols, 0.0);
    matmul(
        MatMut {
            data: scratch,
            rows: cols,
            cols,
            rs: cols,
            cs: 1,
        },
        MatRef {
            data: x,
            rows: cols,
            cols: n,
            rs: 1,
            cs: cols,
        },
        MatRef {
            data: x,
            rows: n,
            cols,
            rs: cols,
            cs: 1,
        },
        1.0,
        false,
        threads,
    );
    for (a, &b) in h.iter_mut().zip(scratch.iter()) {
        *a += f64::from(b);
    }
}

impl<'a> BlockCtx<'a> {
    pub fn new(hp: &'a HParams, seqlen: usize, threads: usize) -> BlockCtx<'a> {
        let (rope_cos, rope_sin) = rope_tables(hp.rope_theta, hp.head_dim, seqlen);
        BlockCtx {
            hp,
            seqlen,
            threads,
            rope_cos,
            rope_sin,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.hp.n_head * self.hp.head_dim
    }

    /// RMSNorm of every row of `x[n, n_embd]` into `out`.
    pub fn norm_rows(&self, x: &[f32], weight: &[f32], out: &mut [f32]) {
        let e = self.hp.n_embd;
        for (o, r) in out.chunks_exact_mut(e).zip(x.chunks_exact(e)) {
            rmsnorm(o, r, weight, self.hp.rms_norm_eps);
        }
    }

    /// Causal self-attention of one sequence: `xn[seqlen, n_embd]` (normalized)
    /// → `att[seqlen, q_dim]` (the input of the output projection).
    pub fn attention(&self, w: &BlockWeights, xn: &[f32], att: &mut [f32]) {
        let hp = self.hp;
        let (l, e, hd) = (self.seqlen, hp.n_embd, hp.head_dim);
        let (q_dim, kv_dim) = (self.q_dim(), hp.n_head_kv * hd);
        let group = hp.n_head / hp.n_head_kv;
        let half = hd / 2;
        let mut q = vec![0f32; l * q_dim];
        let mut k = vec![0f32; l * kv_dim];
        let mut v = vec![0f32; l * kv_dim];
        linear(xn, &w.q, l, q_dim, e, &mut q, self.threads);
        linear(xn, &w.k, l, kv_dim, e, &mut k, self.threads);
        linear(xn, &w.v, l, kv_dim, e, &mut v, self.threads);
        for p in 0..l {
            let (c, s) = (
                &self.rope_cos[p * half..(p + 1) * half],
                &self.rope_sin[p * half..(p + 1) * half],
            );
            rope(&mut q[p * q_dim..(p + 1) * q_dim], hd, c, s);
            rope(&mut k[p * kv_dim..(p + 1) * kv_dim], hd, c, s);
        }
        let mut scores = vec![0f32; l * l];
        for h in 0..hp.n_head {
            let g = h / group;
            matmul(
                MatMut {
                    data: &mut scores,
                    rows: l,
                    cols: l,
                    rs: l,
                    cs: 1,
                },
                MatRef {
                    data: &q[h * hd..],
                    rows: l,
                    cols: hd,
                    rs: q_dim,
                    cs: 1,
                },
                MatRef {
                    data: &k[g * hd..],
                    rows: hd,
                    cols: l,
                    rs: 1,
                    cs: kv_dim,
                },
                1.0 / (hd as f32).sqrt(),
                false,
                self.threads,
            );
            for i in 0..l {
                let lo = if hp.sliding_window > 0 {
                    (i + 1).saturating_sub(hp.sliding_window)
                } else {
                    0
                };
                causal_softmax_row(&mut scores[i * l..(i + 1) * l], lo, i);
            }
            matmul(
                MatMut {
                    data: &mut att[h * hd..],
                    rows: l,
                    cols: hd,
                    rs: q_dim,
                    cs: 1,
                },
                MatRef {
                    data: &scores,
                    rows: l,
                    cols: l,
                    rs: l,
                    cs: 1,
                },
                MatRef {
                    data: &v[g * hd..],
                    rows: l,
                    cols: hd,
                    rs: kv_dim,
                    cs: 1,
                },
                1.0,
                false,
                self.threads,
            );
        }
    }

    /// One whole block over `n_seq` sequences in place: `x[n_seq·seqlen, n_embd]`
    /// becomes the block's output (the residual stream after the MLP).
    pub fn block_forward(&self, w: &BlockWeights, x: &mut [f32]) {
        let hp = self.hp;
        let (l, e, f, q_dim) = (self.seqlen, hp.n_embd, hp.n_ff, self.q_dim());
        let mut xn = vec![0f32; l * e];
        let mut att = vec![0f32; l * q_dim];
        let mut o = vec![0f32; l * e];
        let mut hidden = vec![0f32; l * f];
        for xs in x.chunks_exact_mut(l * e) {
            self.norm_rows(xs, &w.attn_norm, &mut xn);
            self.attention(w, &xn, &mut att);
            linear(&att, &w.o, l, e, q_dim, &mut o, self.threads);
            for (a, b) in xs.iter_mut().zip(&o) {
                *a += b;
            }
            self.norm_rows(xs, &w.ffn_norm, &mut xn);
            self.mlp_hidden(w, &xn, l, &mut hidden);
            linear(&hidden, &w.down, l, e, f, &mut o, self.threads);
            for (a, b) in xs.iter_mut().zip(&o) {
                *a += b;
            }
        }
    }

    /// SwiGLU input of the down projection: `h = silu(xn2·gateᵀ) ⊙ (xn2·upᵀ)`.
    pub fn mlp_hidden(&self, w: &BlockWeights, xn2: &[f32], n: usize, h: &mut [f32]) {
        let (e, f) = (self.hp.n_embd, self.hp.n_ff);
        let mut u = vec![0f32; n * f];
        linear(xn2, &w.gate, n, f, e, h, self.threads);
        linear(xn2, &w.up, n, f, e, &mut u, self.threads);
        for (g, &uv) in h.iter_mut().zip(&u) {
            *g = *g / (1.0 + (-*g).exp()) * uv;
        }
    }
}
