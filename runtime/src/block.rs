//! The decoder block, written once.
//!
//! Every path that runs a model goes through [`block`]: one token
//! ([`crate::forward::forward`]), a batched prompt
//! ([`crate::forward::forward_batch`]), sequences in lockstep
//! ([`crate::forward::forward_slots`]) and the quantizer's calibration and
//! GPTQ passes. What differs between them is how a linear layer is
//! multiplied (matrix-vector on the spin pool, batched int8 or `gemm`, dense
//! f32 with a hook that collects the layer's inputs) and how attention reads
//! its keys (a KV cache, slots of one, or the window itself): those are the
//! [`BlockExec`] a path implements. What differs between model families
//! (norm kind, biases, q/k norms, activation, partial rotary, per-layer
//! window and RoPE base, soft-caps, post-norms, parallel residual) is data,
//! the [`Architecture`] in the model's metadata: the block reads its
//! switches and never a family's name.

use nibble_format::arch::{rope_inv_freq, Activation, Architecture, NormKind, Positions};
use nibble_format::HParams;

use crate::kernels::Kernels;

/// A linear layer of the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lin {
    Q,
    K,
    V,
    Out,
    Gate,
    Up,
    Down,
}

impl Lin {
    pub const ALL: [Lin; 7] = [
        Lin::Q,
        Lin::K,
        Lin::V,
        Lin::Out,
        Lin::Gate,
        Lin::Up,
        Lin::Down,
    ];

    /// The canonical tensor name's role (`blk.{i}.{role}.weight`).
    pub fn role(self) -> &'static str {
        match self {
            Lin::Q => "attn_q",
            Lin::K => "attn_k",
            Lin::V => "attn_v",
            Lin::Out => "attn_output",
            Lin::Gate => "ffn_gate",
            Lin::Up => "ffn_up",
            Lin::Down => "ffn_down",
        }
    }
}

/// A vector of the block (norm weights and biases), F32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vector {
    AttnNorm,
    AttnNormBias,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    OutBias,
    AttnPostNorm,
    FfnNorm,
    FfnNormBias,
    GateBias,
    UpBias,
    DownBias,
    FfnPostNorm,
}

impl Vector {
    pub const COUNT: usize = 15;
    pub const ALL: [Vector; Vector::COUNT] = [
        Vector::AttnNorm,
        Vector::AttnNormBias,
        Vector::QBias,
        Vector::KBias,
        Vector::VBias,
        Vector::QNorm,
        Vector::KNorm,
        Vector::OutBias,
        Vector::AttnPostNorm,
        Vector::FfnNorm,
        Vector::FfnNormBias,
        Vector::GateBias,
        Vector::UpBias,
        Vector::DownBias,
        Vector::FfnPostNorm,
    ];

    /// The canonical tensor name without the `blk.{i}.` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Vector::AttnNorm => "attn_norm.weight",
            Vector::AttnNormBias => "attn_norm.bias",
            Vector::QBias => "attn_q.bias",
            Vector::KBias => "attn_k.bias",
            Vector::VBias => "attn_v.bias",
            Vector::QNorm => "attn_q_norm.weight",
            Vector::KNorm => "attn_k_norm.weight",
            Vector::OutBias => "attn_output.bias",
            Vector::AttnPostNorm => "attn_post_norm.weight",
            Vector::FfnNorm => "ffn_norm.weight",
            Vector::FfnNormBias => "ffn_norm.bias",
            Vector::GateBias => "ffn_gate.bias",
            Vector::UpBias => "ffn_up.bias",
            Vector::DownBias => "ffn_down.bias",
            Vector::FfnPostNorm => "ffn_post_norm.weight",
        }
    }

    /// The bias added after a linear layer.
    pub fn bias_of(w: Lin) -> Vector {
        match w {
            Lin::Q => Vector::QBias,
            Lin::K => Vector::KBias,
            Lin::V => Vector::VBias,
            Lin::Out => Vector::OutBias,
            Lin::Gate => Vector::GateBias,
            Lin::Up => Vector::UpBias,
            Lin::Down => Vector::DownBias,
        }
    }
}

/// One layer's attention settings, as the block hands them to
/// [`BlockExec::attend`].
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    /// Sliding window (0 = full causal).
    pub window: usize,
    /// Factor on q·k.
    pub scale: f32,
    /// cap·tanh(s/cap) on the scores; 0 = none.
    pub softcap: f32,
}

impl AttnParams {
    /// First key position a query at `pos` sees.
    pub fn first_key(&self, pos: usize) -> usize {
        if self.window > 0 {
            (pos + 1).saturating_sub(self.window)
        } else {
            0
        }
    }
}

/// How one path runs the parts of a block that depend on where its weights
/// and keys live. Rows are tokens; every matrix is row-major `[rows, width]`.
pub trait BlockExec {
    /// A vector of layer `layer` (None when the model has no such tensor).
    fn vector(&self, layer: usize, v: Vector) -> Option<&[f32]>;
    /// The hook: `x[rows, width]` is the input the linear layers that
    /// follow read, `first` the first of them ([`Stage::consumers`]).
    /// Whatever an executor derived from the previous input (its int8
    /// blocks) is stale from here; the quantizer collects its Hessians here.
    fn input(&mut self, layer: usize, first: Lin, x: &[f32], rows: usize);
    /// `out[rows, w.rows] = x[rows, w.cols] · Wᵀ` (no bias).
    fn linear(&mut self, layer: usize, w: Lin, x: &[f32], rows: usize, out: &mut [f32]);
    /// After [`BlockExec::linear`]: add what run-time adapters add to its
    /// output (`crate::lora`); nothing by default.
    fn adapt(&mut self, _layer: usize, _w: Lin, _x: &[f32], _rows: usize, _out: &mut [f32]) {}
    /// Position of row `row` (for RoPE).
    fn position(&self, row: usize) -> usize;
    /// Keep the rows' keys (after RoPE) and values where later tokens find
    /// them, and attend: queries `q[rows, n_head·head_dim]` →
    /// `out[rows, n_head·head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rows: usize,
        out: &mut [f32],
        p: AttnParams,
    );
    /// The kernel table for the element-wise steps.
    fn kernels(&self) -> &'static Kernels;
}

/// The block's activations for up to `rows` tokens, sized once.
pub struct BlockBufs {
    pub rows: usize,
    /// `[rows, n_embd]` the residual stream (input and output of a block).
    pub x: Vec<f32>,
    /// `[rows, n_embd]` a normalized sub-layer input.
    pub xn: Vec<f32>,
    /// `[rows, n_head·head_dim]` queries.
    pub q: Vec<f32>,
    /// `[rows, n_head_kv·head_dim]` new keys and values.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// `[rows, n_head·head_dim]` attention outputs.
    pub att: Vec<f32>,
    /// `[rows, n_embd]` a sub-layer's output.
    pub o: Vec<f32>,
    /// `[rows, n_ff]` the MLP's hidden activations (gate, up).
    pub h: Vec<f32>,
    pub h2: Vec<f32>,
}

impl BlockBufs {
    pub fn new(hp: &HParams, rows: usize) -> BlockBufs {
        let q = hp.n_head * hp.head_dim;
        let kv = hp.n_head_kv * hp.head_dim;
        let z = |n: usize| vec![0f32; rows * n];
        BlockBufs {
            rows,
            x: z(hp.n_embd),
            xn: z(hp.n_embd),
            q: z(q),
            k: z(kv),
            v: z(kv),
            att: z(q),
            o: z(hp.n_embd),
            h: z(hp.n_ff),
            h2: if hp.desc.activation.gated() {
                z(hp.n_ff)
            } else {
                Vec::new()
            },
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * [
            &self.x, &self.xn, &self.q, &self.k, &self.v, &self.att, &self.o, &self.h, &self.h2,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>()
    }
}

/// RoPE tables `[n_pos, rope_dim/2]` (cos, sin) for the model's base and,
/// where some layers use one, the local base.
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    local: Option<(Vec<f32>, Vec<f32>)>,
}

impl Rope {
    pub fn new(hp: &HParams, n_pos: usize) -> Rope {
        let d = &hp.desc;
        if d.positions != Positions::Rope {
            return Rope {
                half: 0,
                cos: Vec::new(),
                sin: Vec::new(),
                local: None,
            };
        }
        let (cos, sin) = rope_tables(
            &rope_inv_freq(hp.rope_theta, d.rope_dim, d.rope_scaling),
            n_pos,
        );
        let local = d.layers.iter().any(|l| l.local_rope).then(|| {
            let inv = rope_inv_freq(
                d.rope_theta_local,
                d.rope_dim,
                nibble_format::arch::RopeScaling::None,
            );
            rope_tables(&inv, n_pos)
        });
        Rope {
            half: d.rope_dim / 2,
            cos,
            sin,
            local,
        }
    }

    /// The (cos, sin) rows of position `pos`.
    pub fn at(&self, local: bool, pos: usize) -> (&[f32], &[f32]) {
        let (c, s) = match (&self.local, local) {
            (Some((c, s)), true) => (c, s),
            _ => (&self.cos, &self.sin),
        };
        let r = pos * self.half..(pos + 1) * self.half;
        (&c[r.clone()], &s[r])
    }

    pub fn bytes(&self) -> usize {
        4 * (self.cos.len()
            + self.sin.len()
            + self.local.as_ref().map_or(0, |(c, s)| c.len() + s.len()))
    }
}

/// cos/sin tables `[n_pos, inv.len()]`: angle = pos · inv_freq in f32, as
/// Hugging Face computes it.
fn rope_tables(inv_freq: &[f32], n_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0f32; n_pos * half];
    let mut sin = vec![0f32; n_pos * half];
    for (i, &f) in inv_freq.iter().enumerate() {
        for pos in 0..n_pos {
            let angle = f64::from(pos as f32 * f);
            cos[pos * half + i] = angle.cos() as f32;
            sin[pos * half + i] = angle.sin() as f32;
        }
    }
    (cos, sin)
}

/// Rotate-half RoPE on the first `2·cos.len()` dimensions of each
/// `head_dim` slice of `v` (partial rotary leaves the rest as it is).
pub fn rope(v: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in v.chunks_exact_mut(head_dim) {
        let (a, b) = head[..2 * half].split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// out = x / rms(x) · weight, as Hugging Face's RMSNorm (f32 in/out). The
/// sum of squares is taken in f64, in eight partial sums (so it runs as
/// vector lanes rather than one chain of dependent adds).
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f64) {
    let scale = rms_scale(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * scale);
    }
}

/// 1 / √(mean(x²) + eps), the sum of squares in f64.
fn rms_scale(x: &[f32], eps: f64) -> f32 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    let ss = acc.iter().sum::<f64>() + tail;
    (1.0 / (ss / x.len() as f64 + eps).sqrt()) as f32
}

/// out = (x − mean) / √(var + eps) · weight + bias (mean and variance in f64).
pub fn layernorm(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = ((f64::from(v) - mean) * inv) as f32 * w + b;
    }
}

/// The norm of `kind` over each `width`-wide row of `x` into `out`.
pub fn norm_rows(
    kind: NormKind,
    eps: f64,
    x: &[f32],
    out: &mut [f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) {
    let width = weight.len();
    for (o, r) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
        match (kind, bias) {
            (NormKind::Layer, Some(b)) => layernorm(o, r, weight, b, eps),
            _ => rmsnorm(o, r, weight, eps),
        }
    }
}

fn add_bias(out: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(b.len()) {
            for (o, &v) in row.iter_mut().zip(b) {
                *o += v;
            }
        }
    }
}

/// `out` ← `x · Wᵀ + b` for linear `w` of layer `l`.
fn linear_bias<E: BlockExec>(e: &mut E, l: usize, w: Lin, x: &[f32], rows: usize, out: &mut [f32]) {
    e.linear(l, w, x, rows, out);
    e.adapt(l, w, x, rows, out);
    add_bias(out, e.vector(l, Vector::bias_of(w)));
}

/// The sub-layer input norm `v` (with its bias for LayerNorm) of `x` into `out`.
fn norm_into<E: BlockExec>(
    e: &E,
    hp: &HParams,
    l: usize,
    (w, b): (Vector, Vector),
    x: &[f32],
    out: &mut [f32],
) {
    let weight = e.vector(l, w).expect("norm weights are checked at load");
    norm_rows(hp.desc.norm, hp.norm_eps, x, out, weight, e.vector(l, b));
}

/// `x += o`, through the post-norm `post` first where the model has one
/// (`tmp` holds the normalized output).
fn residual_add<E: BlockExec>(
    e: &E,
    hp: &HParams,
    l: usize,
    post: Vector,
    x: &mut [f32],
    o: &[f32],
    tmp: &mut [f32],
) {
    let o = match e.vector(l, post) {
        Some(w) => {
            norm_rows(NormKind::Rms, hp.norm_eps, o, tmp, w, None);
            &*tmp
        }
        None => o,
    };
    for (x, d) in x.iter_mut().zip(o) {
        *x += d;
    }
}

/// Where [`block`] can stop and resume: each stage ends where a group of
/// linear layers reads its input, after [`BlockExec::input`] has seen it,
/// and the next stage begins by multiplying that input. The quantizer runs a
/// block one stage at a time over all its calibration windows (collecting a
/// Hessian at each boundary and quantizing the group before the next stage
/// multiplies by it: GPTQ's true-sequential order in one pass); every
/// other path runs the stages back to back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Norm of the block input → the input of q/k/v (`xn`).
    AttnInput,
    /// q/k/v, q/k norms, RoPE, attention → the input of the output projection (`att`).
    Attention,
    /// Output projection, residual (or parallel branch) → the MLP input (`xn`).
    FfnInput,
    /// Gate/up and activation → the input of the down projection (`h`).
    FfnHidden,
    /// Down projection and residual → the block output (`x`).
    FfnOutput,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::AttnInput,
        Stage::Attention,
        Stage::FfnInput,
        Stage::FfnHidden,
        Stage::FfnOutput,
    ];

    /// The linear layers that read the input this stage ends with (in the
    /// order the block multiplies them; `gated` = the MLP has a gate).
    pub fn consumers(self, gated: bool) -> &'static [Lin] {
        match self {
            Stage::AttnInput => &[Lin::Q, Lin::K, Lin::V],
            Stage::Attention => &[Lin::Out],
            Stage::FfnInput if gated => &[Lin::Gate, Lin::Up],
            Stage::FfnInput => &[Lin::Up],
            Stage::FfnHidden => &[Lin::Down],
            Stage::FfnOutput => &[],
        }
    }
}

impl BlockBufs {
    /// The buffer holding the input that stage `s` ends with (`x` for the
    /// last stage), `[rows, width]`.
    pub fn boundary(&self, s: Stage) -> &[f32] {
        match s {
            Stage::AttnInput | Stage::FfnInput => &self.xn,
            Stage::Attention => &self.att,
            Stage::FfnHidden => &self.h,
            Stage::FfnOutput => &self.x,
        }
    }

    /// [`BlockBufs::boundary`], writable (to resume a stage).
    pub fn boundary_mut(&mut self, s: Stage) -> &mut [f32] {
        match s {
            Stage::AttnInput | Stage::FfnInput => &mut self.xn,
            Stage::Attention => &mut self.att,
            Stage::FfnHidden => &mut self.h,
            Stage::FfnOutput => &mut self.x,
        }
    }
}

/// Width of the input stage `s` ends with.
pub fn boundary_width(hp: &HParams, s: Stage) -> usize {
    match s {
        Stage::AttnInput | Stage::FfnInput | Stage::FfnOutput => hp.n_embd,
        Stage::Attention => hp.n_head * hp.head_dim,
        Stage::FfnHidden => hp.n_ff,
    }
}

/// Decoder block `l` over the first `rows` rows of `b.x`, in place.
pub fn block<E: BlockExec>(
    hp: &HParams,
    l: usize,
    e: &mut E,
    b: &mut BlockBufs,
    rope_tables: &Rope,
    rows: usize,
) {
    for s in Stage::ALL {
        block_stage(hp, l, e, b, rope_tables, rows, s);
    }
}

/// Stage `s` of decoder block `l` over the first `rows` rows of `b` (which
/// hold what the previous stage left: `x` and its [`BlockBufs::boundary`]).
pub fn block_stage<E: BlockExec>(
    hp: &HParams,
    l: usize,
    e: &mut E,
    b: &mut BlockBufs,
    rope_tables: &Rope,
    rows: usize,
    s: Stage,
) {
    let d = &hp.desc;
    let (n, hd, ff) = (hp.n_embd, hp.head_dim, hp.n_ff);
    let (qd, kvd) = (hp.n_head * hd, hp.n_head_kv * hd);
    match s {
        Stage::AttnInput => {
            norm_into(
                e,
                hp,
                l,
                (Vector::AttnNorm, Vector::AttnNormBias),
                &b.x[..rows * n],
                &mut b.xn[..rows * n],
            );
            e.input(l, Lin::Q, &b.xn[..rows * n], rows);
        }
        Stage::Attention => {
            let ld = d.layers[l];
            let xn = &b.xn[..rows * n];
            let (q, k, v) = (
                &mut b.q[..rows * qd],
                &mut b.k[..rows * kvd],
                &mut b.v[..rows * kvd],
            );
            linear_bias(e, l, Lin::Q, xn, rows, q);
            linear_bias(e, l, Lin::K, xn, rows, k);
            linear_bias(e, l, Lin::V, xn, rows, v);
            if d.qk_norm {
                for (t, w) in [(&mut *q, Vector::QNorm), (&mut *k, Vector::KNorm)] {
                    let w = e.vector(l, w).expect("q/k norms are checked at load");
                    for head in t.chunks_exact_mut(hd) {
                        let scale = rms_scale(head, hp.norm_eps);
                        for (v, &w) in head.iter_mut().zip(w) {
                            *v = w * (*v * scale);
                        }
                    }
                }
            }
            if d.positions == Positions::Rope {
                for r in 0..rows {
                    let (cos, sin) = rope_tables.at(ld.local_rope, e.position(r));
                    rope(&mut q[r * qd..(r + 1) * qd], hd, cos, sin);
                    rope(&mut k[r * kvd..(r + 1) * kvd], hd, cos, sin);
                }
            }
            let p = AttnParams {
                window: ld.window,
                scale: d.attn_scale,
                softcap: d.attn_softcap,
            };
            e.attend(l, q, k, v, rows, &mut b.att[..rows * qd], p);
            e.input(l, Lin::Out, &b.att[..rows * qd], rows);
        }
        Stage::FfnInput => {
            linear_bias(
                e,
                l,
                Lin::Out,
                &b.att[..rows * qd],
                rows,
                &mut b.o[..rows * n],
            );
            let x = &mut b.x[..rows * n];
            if d.parallel_residual {
                // x + attn(norm1(x)) + mlp(norm2(x)): the MLP reads the block input.
                norm_into(
                    e,
                    hp,
                    l,
                    (Vector::FfnNorm, Vector::FfnNormBias),
                    x,
                    &mut b.xn[..rows * n],
                );
                for (x, d) in x.iter_mut().zip(&b.o[..rows * n]) {
                    *x += d;
                }
            } else {
                residual_add(
                    e,
                    hp,
                    l,
                    Vector::AttnPostNorm,
                    x,
                    &b.o[..rows * n],
                    &mut b.xn[..rows * n],
                );
                norm_into(
                    e,
                    hp,
                    l,
                    (Vector::FfnNorm, Vector::FfnNormBias),
                    x,
                    &mut b.xn[..rows * n],
                );
            }
            let first = Stage::FfnInput.consumers(d.activation.gated())[0];
            e.input(l, first, &b.xn[..rows * n], rows);
        }
        Stage::FfnHidden => {
            let k = e.kernels();
            let xn = &b.xn[..rows * n];
            let h = &mut b.h[..rows * ff];
            let act = d.activation;
            if act.gated() {
                let h2 = &mut b.h2[..rows * ff];
                linear_bias(e, l, Lin::Gate, xn, rows, h);
                linear_bias(e, l, Lin::Up, xn, rows, h2);
                match act {
                    Activation::GeGluTanh => (k.geglu)(h, h2),
                    _ => (k.swiglu)(h, h2),
                }
            } else {
                linear_bias(e, l, Lin::Up, xn, rows, h);
                match act {
                    Activation::GeluTanh => (k.gelu_tanh)(h),
                    Activation::GeluErf => (k.gelu_erf)(h),
                    _ => (k.relu)(h),
                }
            }
            e.input(l, Lin::Down, &b.h[..rows * ff], rows);
        }
        Stage::FfnOutput => {
            linear_bias(
                e,
                l,
                Lin::Down,
                &b.h[..rows * ff],
                rows,
                &mut b.o[..rows * n],
            );
            residual_add(
                e,
                hp,
                l,
                Vector::FfnPostNorm,
                &mut b.x[..rows * n],
                &b.o[..rows * n],
                &mut b.xn[..rows * n],
            );
        }
    }
}

/// The token embedding row `row` finished: scaled (Gemma) and with its
/// learned position added (`pos_row`, GPT-2 / OPT).
pub fn finish_embedding(d: &Architecture, row: &mut [f32], pos_row: Option<&[f32]>) {
    if d.embd_scale != 1.0 {
        for v in row.iter_mut() {
            *v *= d.embd_scale;
        }
    }
    if let Some(p) = pos_row {
        for (v, &q) in row.iter_mut().zip(p) {
            *v += q;
        }
    }
}

/// cap·tanh(l/cap) on the logits where the model soft-caps them.
pub fn softcap_logits(d: &Architecture, logits: &mut [f32]) {
    let cap = d.final_softcap;
    if cap > 0.0 {
        for v in logits.iter_mut() {
            *v = cap * (*v / cap).tanh();
        }
    }
}
