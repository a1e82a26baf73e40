//! The runtime's forward passes over a [`RunState`] sized once from the
//! model config: one token ([`forward`]), a batched prompt
//! ([`forward_batch`]) and sequences in lockstep ([`forward_slots`]). Each
//! runs the one decoder block ([`crate::block::block`]) through its own
//! [`BlockExec`]: how a linear layer is multiplied and where attention finds
//! its keys.
//!
//! Nothing here allocates per token: every buffer, the KV cache and the RoPE
//! tables live in the run state, and the thread pool is created with the
//! session.
//!
//! Packed weights multiply int8 activation blocks: each layer input is
//! quantized once ([`LayerInput`]) and shared by the matrices that read it
//! (q/k/v, gate/up), through the kernel table chosen at load.

use rayon::prelude::*;

use crate::block::{
    block, finish_embedding, norm_rows, softcap_logits, AttnParams, BlockBufs, BlockExec, Lin,
    Rope, Vector,
};
use crate::kernels::pool::SpinPool;
use crate::kernels::{Attend, Kernels, Q8Buf, Q8Kind, Q8Ref};
use crate::lora::LoraRun;
use crate::model::{Model, Weight, WeightData};
use crate::session::PrefillKind;

/// How the matrix-vector products of one token are spread over threads.
#[derive(Clone, Copy)]
pub enum Par<'a> {
    /// On the calling thread.
    Serial,
    /// On a persistent spin/park pool (the default).
    Spin(&'a SpinPool),
    /// On the current rayon pool (for comparison: `nibble bench --pool rayon`).
    Rayon,
}

impl Par<'_> {
    fn threads(&self) -> usize {
        match self {
            Par::Serial => 1,
            Par::Spin(p) => p.n_threads(),
            Par::Rayon => rayon::current_num_threads(),
        }
    }

    /// Run `f(first_row, out_rows)` over `out` split into row ranges (one
    /// per thread on the spin pool, work-stolen chunks on rayon).
    fn rows(&self, out: &mut [f32], f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        if self.threads() <= 1 || out.len() < 64 {
            return f(0, out);
        }
        match self {
            Par::Spin(p) => p.split_mut(out, f),
            _ => {
                let chunk = out.len().div_ceil(self.threads() * 8).max(16);
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(c, o)| f(c * chunk, o))
            }
        }
    }
}

/// One layer input as the kernels need it: int8 blocks of the vector as
/// given, and of the vector gathered through an act-order permutation.
/// Quantized once per input and reused by every matrix that reads it;
/// [`LayerInput::reset`] marks a new input.
pub struct LayerInput {
    /// `[max input width]` input gathered through a permutation.
    xperm: Vec<f32>,
    /// Which permutation (its offset in the image) `xperm` holds.
    xperm_key: Option<usize>,
    /// Int8 blocks of the input as given.
    q8: Q8Buf,
    q8_valid: bool,
    /// The same with one scale per 256 ([`Q8Kind::Super256`], K-quants).
    q8k: Q8Buf,
    q8k_valid: bool,
    /// Int8 blocks of the permuted input, and which permutation.
    q8p: Q8Buf,
    q8p_key: Option<usize>,
}

impl LayerInput {
    pub fn new(max_in: usize) -> LayerInput {
        LayerInput {
            xperm: vec![0.0; max_in],
            xperm_key: None,
            q8: Q8Buf::new(max_in),
            q8_valid: false,
            q8k: Q8Buf::new(max_in),
            q8k_valid: false,
            q8p: Q8Buf::new(max_in),
            q8p_key: None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * self.xperm.len() + self.q8.bytes() + self.q8k.bytes() + self.q8p.bytes()
    }

    /// The input vector changed: forget what was derived from it.
    pub fn reset(&mut self) {
        self.xperm_key = None;
        self.q8_valid = false;
        self.q8k_valid = false;
        self.q8p_key = None;
    }

    fn gather(&mut self, x: &[f32], perm: &[u32], key: usize) {
        if self.xperm_key != Some(key) {
            for (o, &p) in self.xperm[..x.len()].iter_mut().zip(perm) {
                *o = x[p as usize];
            }
            self.xperm_key = Some(key);
        }
    }

    fn permuted<'s>(&'s mut self, x: &'s [f32], perm: Option<(&[u32], usize)>) -> &'s [f32] {
        match perm {
            None => x,
            Some((perm, key)) => {
                self.gather(x, perm, key);
                &self.xperm[..x.len()]
            }
        }
    }

    /// The int8 blocks of `x` (gathered through `perm`) in the flavour
    /// `kind`; a permuted input takes blocks of 32 (no K-quant weight has
    /// an act-order permutation).
    fn quantized(
        &mut self,
        k: &Kernels,
        kind: Q8Kind,
        x: &[f32],
        perm: Option<(&[u32], usize)>,
    ) -> Q8Ref<'_> {
        match perm {
            None if kind == Q8Kind::Super256 => {
                if !self.q8k_valid {
                    self.q8k.quantize_as(kind, k.quantize_q8, x);
                    self.q8k_valid = true;
                }
                self.q8k.as_ref()
            }
            None => {
                if !self.q8_valid {
                    self.q8.quantize(k.quantize_q8, x);
                    self.q8_valid = true;
                }
                self.q8.as_ref()
            }
            Some((perm, key)) => {
                if self.q8p_key != Some(key) {
                    self.gather(x, perm, key);
                    self.q8p.quantize(k.quantize_q8, &self.xperm[..x.len()]);
                    self.q8p_key = Some(key);
                }
                self.q8p.as_ref()
            }
        }
    }
}

/// Every buffer a one-token forward pass needs, sized once from the config
/// and `n_ctx`.
pub struct RunState {
    pub n_ctx: usize,
    /// The block's activations for one row (`bufs.x` is the residual stream).
    pub bufs: BlockBufs,
    /// `[n_head, n_ctx]` attention scores.
    pub scores: Vec<f32>,
    /// `[n_vocab]` output logits.
    pub logits: Vec<f32>,
    /// The current layer input, quantized / permuted once for its readers.
    pub inp: LayerInput,
    /// Keys and values of every layer and position.
    pub kv: KvCache,
    /// RoPE tables of positions `0..n_ctx`.
    rope: Rope,
    /// Run-time LoRA adapters' terms (empty: none), set by the session.
    pub lora: LoraRun,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// IEEE half precision (llama.cpp's default): half the memory, and half
    /// the bytes each token streams from a long context (SmolLM2
    /// native Q4_0 blocks, one thread: tg512 170–177 → 195–200 tok/s; 16
    /// self-generated calibration sequences at 384 positions 54.6 → 45.5 ms
    /// per step). With float weights the logits then differ from an f32
    /// cache by ~5e-4, normwise relative (`tests/reference.rs`).
    #[default]
    F16,
    /// f32: the reference arithmetic (the tests against transformers use it).
    F32,
}

/// The KV cache: `[n_layer, n_ctx, n_head_kv·head_dim]` keys (after RoPE)
/// and values, in the [`KvType`] chosen when the state was made.
pub enum KvCache {
    /// f16 bits ([`crate::math::f16_to_f32`]).
    F16 {
        keys: Vec<u16>,
        values: Vec<u16>,
    },
    F32 {
        keys: Vec<f32>,
        values: Vec<f32>,
    },
}

impl KvCache {
    fn new(kind: KvType, len: usize) -> KvCache {
        match kind {
            KvType::F16 => KvCache::F16 {
                keys: vec![0; len],
                values: vec![0; len],
            },
            KvType::F32 => KvCache::F32 {
                keys: vec![0.0; len],
                values: vec![0.0; len],
            },
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvCache::F16 { keys, values } => 2 * (keys.len() + values.len()),
            KvCache::F32 { keys, values } => 4 * (keys.len() + values.len()),
        }
    }

    /// Keys `k` and values `v` into the cache from element `at` on.
    fn store(&mut self, at: usize, k: &[f32], v: &[f32]) {
        fn put<T: KvElem>(dst: &mut [T], src: &[f32]) {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = T::from_f32(x);
            }
        }
        match self {
            KvCache::F16 { keys, values } => {
                put(&mut keys[at..at + k.len()], k);
                put(&mut values[at..at + v.len()], v);
            }
            KvCache::F32 { keys, values } => {
                put(&mut keys[at..at + k.len()], k);
                put(&mut values[at..at + v.len()], v);
            }
        }
    }
}

impl RunState {
    /// A state for contexts of up to `n_ctx` tokens with an f16 KV cache.
    pub fn new(model: &Model, n_ctx: usize) -> RunState {
        RunState::with_kv(model, n_ctx, KvType::default())
    }

    /// A state with a KV cache of `kv` elements.
    pub fn with_kv(model: &Model, n_ctx: usize, kv: KvType) -> RunState {
        let hp = &model.hparams;
        let q_dim = hp.n_head * hp.head_dim;
        let kv_dim = hp.n_head_kv * hp.head_dim;
        RunState {
            n_ctx,
            bufs: BlockBufs::new(hp, 1),
            scores: vec![0.0; hp.n_head * n_ctx],
            logits: vec![0.0; hp.n_vocab],
            inp: LayerInput::new(hp.n_embd.max(hp.n_ff).max(q_dim)),
            kv: KvCache::new(kv, hp.n_layer * n_ctx * kv_dim),
            rope: Rope::new(hp, n_ctx),
            lora: LoraRun::default(),
        }
    }

    /// Bytes held by this state (KV cache included).
    pub fn bytes(&self) -> usize {
        self.bufs.bytes()
            + 4 * (self.scores.len() + self.logits.len())
            + self.inp.bytes()
            + self.rope.bytes()
            + self.kv.bytes()
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
        WeightData::Packed(p) => {
            nibble_format::quant::dequantize(p.dtype(), p.group_size(), p.row(r), out)
        }
    }
}

/// out = W · x for a `[rows, cols]` weight, rows split over `par` (no
/// allocation either way). `inp` holds `x`'s derived forms (int8 blocks,
/// act-order gather), computed on first use after [`LayerInput::reset`].
pub fn matvec(
    model: &Model,
    w: &Weight,
    x: &[f32],
    out: &mut [f32],
    inp: &mut LayerInput,
    par: Par<'_>,
) {
    assert_eq!(x.len(), w.cols, "matvec: input width");
    assert_eq!(out.len(), w.rows, "matvec: output height");
    let k = model.kernels();
    let cols = w.cols;
    let perm = model.perm(w).map(|p| (p, w.perm_key()));
    match model.data(w) {
        WeightData::Packed(p) => {
            let xq = inp.quantized(k, Q8Kind::for_dtype(p.dtype()), x, perm);
            match (k.matvec_x8, model.x8(w), k.matvec_x8k, model.x8k(w)) {
                (Some(f), Some(x8), ..) => par.rows(out, &|r0, o| f(x8, r0, &xq, o)),
                (.., Some(f), Some(copy)) => par.rows(out, &|r0, o| f(copy, r0, &xq, o)),
                _ => {
                    let f = k.matvec_qg(p.dtype());
                    par.rows(out, &|r0, o| f(p.slice(r0, o.len()), &xq, o));
                }
            }
        }
        WeightData::F32(d) => float_rows(par, d, cols, inp.permuted(x, perm), out, k.matvec_f32),
        WeightData::F16(d) => float_rows(par, d, cols, inp.permuted(x, perm), out, k.matvec_f16),
        WeightData::BF16(d) => float_rows(par, d, cols, inp.permuted(x, perm), out, k.matvec_bf16),
    }
}

/// A float weight's rows `[out.len(), cols]` times `x`, split over `par`.
fn float_rows<T: Sync>(
    par: Par<'_>,
    d: &[T],
    cols: usize,
    x: &[f32],
    out: &mut [f32],
    f: crate::kernels::FloatMatvecFn<T>,
) {
    par.rows(out, &|r0, o| {
        f(&d[r0 * cols..(r0 + o.len()) * cols], cols, x, o)
    });
}

/// out = x / rms(x) · weight, as Hugging Face's LlamaRMSNorm (f32 in/out).
/// The sum of squares is taken in f64, in eight partial sums (so it runs as
/// One token's attention, KV head by KV head, each for its `group` query
/// heads (GQA), through the kernel `attend`: queries `q` `[n_head·head_dim]`,
/// the layer's (or slot's) cache from `base`, positions `range`, head `j`'s
/// scores at `scores[j·score_stride..]`, outputs `[n_head·head_dim]` to `out`.
#[allow(clippy::too_many_arguments)]
fn attend_token<T: KvElem>(
    attend: fn(Attend<'_, T>),
    (keys, values, base): (&[T], &[T], usize),
    hp: &nibble_format::HParams,
    q: &[f32],
    range: std::ops::Range<usize>,
    (scores, score_stride): (&mut [f32], usize),
    out: &mut [f32],
    p: AttnParams,
) {
    let hd = hp.head_dim;
    let kv_dim = hp.n_head_kv * hd;
    let group = hp.n_head / hp.n_head_kv;
    for kvh in 0..hp.n_head_kv {
        let kv = base + kvh * hd;
        let heads = kvh * group * hd..(kvh + 1) * group * hd;
        attend(Attend {
            qs: &q[heads.clone()],
            keys: &keys[kv..],
            values: &values[kv..],
            stride: kv_dim,
            range: range.clone(),
            scores: &mut scores[kvh * group * score_stride..],
            score_stride,
            out: &mut out[heads],
            head_dim: hd,
            scale: p.scale,
            softcap: p.softcap,
        });
    }
}

/// [`attend_token`] over whichever element type the cache holds.
#[allow(clippy::too_many_arguments)]
fn attend_cache(
    k: &Kernels,
    kv: &KvCache,
    base: usize,
    hp: &nibble_format::HParams,
    q: &[f32],
    range: std::ops::Range<usize>,
    scores: (&mut [f32], usize),
    out: &mut [f32],
    p: AttnParams,
) {
    match kv {
        KvCache::F16 { keys, values } => {
            let cache = (&keys[..], &values[..], base);
            attend_token(k.attend, cache, hp, q, range, scores, out, p)
        }
        KvCache::F32 { keys, values } => {
            let cache = (&keys[..], &values[..], base);
            attend_token(k.attend_f32, cache, hp, q, range, scores, out, p)
        }
    }
}

/// `dst[t·head_dim ..][..head_dim] ← src[t·stride ..][..head_dim]` widened to
/// f32, for positions `0..n` of one KV head (`gemm`'s operand in the prompt
/// path).
fn widen_head(dst: &mut [f32], src: &[u16], stride: usize, head_dim: usize, n: usize) {
    for (d, t) in dst.chunks_exact_mut(head_dim).zip(0..n) {
        for (d, &h) in d.iter_mut().zip(&src[t * stride..][..head_dim]) {
            *d = crate::math::f16_to_f32(h);
        }
    }
}

/// Token `token` at position `pos` embedded into `out` (scaled, plus its
/// learned position where the model has them; `tmp` is `n_embd` scratch).
fn embed(model: &Model, token: u32, pos: usize, out: &mut [f32], tmp: &mut [f32]) {
    let w = &model.token_embd;
    decode_row(&model.data(w), token as usize, w.cols, out);
    let pos_row = model.pos_embd.as_ref().map(|p| {
        decode_row(&model.data(p), pos, p.cols, tmp);
        &*tmp
    });
    finish_embedding(&model.hparams.desc, out, pos_row);
}

/// The final norm of the residual rows `x` into `out`.
fn output_norm(model: &Model, x: &[f32], out: &mut [f32]) {
    let hp = &model.hparams;
    norm_rows(
        hp.desc.norm,
        hp.norm_eps,
        x,
        out,
        model.vector(&model.output_norm),
        model.output_norm_bias.as_ref().map(|b| model.vector(b)),
    );
}

/// The one-token path: matrix-vector products on `par`, attention over the
/// KV cache at `pos`.
struct TokenExec<'a> {
    model: &'a Model,
    inp: &'a mut LayerInput,
    kv: &'a mut KvCache,
    scores: &'a mut [f32],
    n_ctx: usize,
    pos: usize,
    par: Par<'a>,
    lora: &'a mut LoraRun,
}

impl BlockExec for TokenExec<'_> {
    fn vector(&self, layer: usize, v: Vector) -> Option<&[f32]> {
        self.model.layer_vector(layer, v)
    }
    fn input(&mut self, _layer: usize, _first: Lin, _x: &[f32], _rows: usize) {
        self.inp.reset();
    }
    fn linear(&mut self, layer: usize, w: Lin, x: &[f32], _rows: usize, out: &mut [f32]) {
        let w = self.model.layers[layer].linear(w);
        matvec(self.model, w, x, out, self.inp, self.par);
    }
    fn adapt(&mut self, layer: usize, w: Lin, x: &[f32], rows: usize, out: &mut [f32]) {
        let cols = self.model.layers[layer].linear(w).cols;
        self.lora
            .apply(self.model.kernels(), layer, w, x, rows, cols, out, 1);
    }
    fn position(&self, _row: usize) -> usize {
        self.pos
    }
    fn attend(
        &mut self,
        l: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        _rows: usize,
        out: &mut [f32],
        p: AttnParams,
    ) {
        let hp = &self.model.hparams;
        let kv_dim = hp.n_head_kv * hp.head_dim;
        let (n_ctx, pos) = (self.n_ctx, self.pos);
        self.kv.store((l * n_ctx + pos) * kv_dim, k, v);
        let base = l * n_ctx * kv_dim;
        let range = p.first_key(pos)..pos + 1;
        let kern = self.model.kernels();
        attend_cache(
            kern,
            self.kv,
            base,
            hp,
            q,
            range,
            (self.scores, n_ctx),
            out,
            p,
        );
    }
    fn kernels(&self) -> &'static Kernels {
        self.model.kernels()
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
    par: Par<'_>,
) {
    let hp = &model.hparams;
    let RunState {
        n_ctx,
        bufs,
        scores,
        logits,
        inp,
        kv,
        rope,
        lora,
    } = s;
    embed(model, token, pos, &mut bufs.x, &mut bufs.xn);
    let mut e = TokenExec {
        model,
        inp,
        kv,
        scores,
        n_ctx: *n_ctx,
        pos,
        par,
        lora,
    };
    for l in 0..hp.n_layer {
        block(hp, l, &mut e, bufs, rope, 1);
    }
    if want_logits {
        output_norm(model, &bufs.x, &mut bufs.xn);
        e.inp.reset();
        matvec(model, &model.output, &bufs.xn, logits, e.inp, par);
        softcap_logits(&hp.desc, logits);
    }
}

/// Rows of a F16/BF16 weight converted to f32 at a time for the batched path.
const WEIGHT_TILE_ROWS: usize = 1024;
/// Buffers of the batched (prompt) path: `n_batch` tokens at a time as
/// matrix-matrix products. Allocated once, on the first multi-token call.
pub struct BatchState {
    pub n_batch: usize,
    /// The block's activations for `n_batch` rows.
    bufs: BlockBufs,
    /// `[n_batch, n_ctx]` one head's attention scores (prompts), or
    /// `[n_batch, n_head·slot_len]` every head's (slots).
    scores: Vec<f32>,
    /// `[2, n_ctx, head_dim]` one KV head's cached keys and values widened
    /// to f32 for `gemm` ([`forward_batch`] over an f16 cache; empty for an
    /// f32 cache and for slots).
    kv_f32: Vec<f32>,
    /// `[n_batch, n_vocab]` logits of every row (only when requested).
    pub logits: Vec<f32>,
    scratch: BatchScratch,
}

/// Scratch of [`linear_batch`].
struct BatchScratch {
    /// `[WEIGHT_TILE_ROWS + 1, max_in]`: a tile of decoded weight rows plus one row.
    wtile: Vec<f32>,
    /// `[n_batch, max_in]`: activations rounded through int8 blocks.
    xhat: Vec<f32>,
    q8: Q8Buf,
    /// `[n_batch·max_in]` the current input's rows, one after another, as
    /// int8 blocks of each flavour (by `Q8Kind as usize`) for the batched
    /// GGUF kernels ([`gguf_batch`]; K-quant widths are whole super-blocks,
    /// so no super-block spans two rows); whether each holds the current
    /// input.
    q8g: [Q8Buf; 2],
    q8g_valid: [bool; 2],
    /// `[n_batch, max_in]` int8 blocks of the current input for the batched
    /// kernels, shared by the matrices that read it (q/k/v, gate/up).
    q8b: Q8Batch,
    /// Which permutation `q8b` was gathered through (`Weight::perm_key`);
    /// `None` after [`BatchScratch::new_input`].
    q8b_key: Option<usize>,
    /// Which kernels multiply packed weights.
    prefill: PrefillKind,
}

impl BatchScratch {
    /// The input of the next `linear_batch` calls changed.
    fn new_input(&mut self) {
        self.q8b_key = None;
        self.q8g_valid = [false; 2];
    }
}

impl BatchState {
    /// Buffers for [`forward_slots`]: `n_rows` sequences of up to `slot_len`
    /// tokens (attention scores for every head of every row).
    pub fn for_slots(
        model: &Model,
        slot_len: usize,
        n_rows: usize,
        prefill: PrefillKind,
    ) -> BatchState {
        BatchState::alloc(model, model.hparams.n_head * slot_len, 0, n_rows, prefill)
    }

    /// Buffers for [`forward_batch`] over `state`'s cache (its positions; the
    /// f32 widening buffer only for an f16 cache).
    pub fn new(
        model: &Model,
        state: &RunState,
        n_batch: usize,
        prefill: PrefillKind,
    ) -> BatchState {
        let widened = match state.kv {
            KvCache::F16 { .. } => state.n_ctx,
            KvCache::F32 { .. } => 0,
        };
        BatchState::alloc(model, state.n_ctx, widened, n_batch, prefill)
    }

    /// `score_cols` scores per row, `kv_positions` positions of widened keys
    /// and values.
    fn alloc(
        model: &Model,
        score_cols: usize,
        kv_positions: usize,
        n_batch: usize,
        prefill: PrefillKind,
    ) -> BatchState {
        let hp = &model.hparams;
        let q_dim = hp.n_head * hp.head_dim;
        let max_in = hp.n_embd.max(hp.n_ff).max(q_dim);
        BatchState {
            n_batch,
            bufs: BlockBufs::new(hp, n_batch),
            scores: vec![0.0; n_batch * score_cols],
            kv_f32: vec![0.0; 2 * kv_positions * hp.head_dim],
            logits: Vec::new(),
            scratch: BatchScratch {
                wtile: vec![0.0; (WEIGHT_TILE_ROWS + 1) * max_in],
                xhat: vec![0.0; n_batch * max_in],
                q8: Q8Buf::new(max_in),
                q8g: [Q8Buf::new(n_batch * max_in), Q8Buf::new(n_batch * max_in)],
                q8g_valid: [false; 2],
                q8b: Q8Batch::new(n_batch, max_in),
                q8b_key: None,
                prefill,
            },
        }
    }
}

use crate::kernels::q8::QUAD;
use crate::kernels::{matmul, KvElem, MatMut, MatRef, Q8Batch, Q8BatchRef};

/// Bytes of weight rows one pass of [`gguf_batch`] multiplies by every
/// token of its share (L1-sized, so the rows are read from memory once).
const GGUF_CHUNK_BYTES: usize = 16 << 10;

/// The batched kernel a GGUF weight runs: the row kernel on the file's
/// blocks, or the kernel of its copy interleaved by eight rows.
#[derive(Clone, Copy)]
enum GgufMatmul<'a> {
    Rows(crate::kernels::gguf::GgufMatmulFn),
    X8K(crate::kernels::X8KMatmulFn, &'a crate::kernels::X8KRows),
}

/// GGUF weights times `b` rows: the rows' int8 blocks in the weight type's
/// flavour ([`Q8Kind::for_dtype`], quantized once per input and flavour)
/// through the batched kernel `mm`, a chunk of weight rows at a time (whole
/// tiles of an interleaved copy) for every token of a thread's share, the
/// tokens split over the threads. No tile is decoded; prompt and decode
/// compute the same integer sums.
#[allow(clippy::too_many_arguments)]
fn gguf_batch(
    mm: GgufMatmul<'_>,
    k: &Kernels,
    p: &crate::kernels::PackedRows<'_>,
    x: &[f32],
    b: usize,
    out: &mut [f32],
    out_rs: usize,
    scratch: &mut BatchScratch,
    threads: usize,
) {
    let (rows, cols) = (p.rows(), p.cols());
    let kind = Q8Kind::for_dtype(p.dtype());
    let slot = kind as usize;
    if !scratch.q8g_valid[slot] {
        scratch.q8g[slot].quantize_as(kind, k.quantize_q8, &x[..b * cols]);
        scratch.q8g_valid[slot] = true;
    }
    let xq = scratch.q8g[slot].as_ref();
    let mut chunk = (GGUF_CHUNK_BYTES / p.row_bytes().max(1)).max(1);
    if let GgufMatmul::X8K(..) = mm {
        chunk = chunk.next_multiple_of(crate::kernels::qk_x8::TILE);
    }
    // Tokens t0.. into `o` (their output rows, `out_rs` apart).
    let run = |t0: usize, o: &mut [f32]| {
        let n_tok = (o.len() - rows) / out_rs + 1;
        let x = xq.tokens(cols, t0, n_tok);
        for r0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - r0);
            match mm {
                GgufMatmul::Rows(f) => f(p.slice(r0, n), &x, &mut o[r0..], out_rs),
                GgufMatmul::X8K(f, copy) => f(copy, r0, n, &x, &mut o[r0..], out_rs),
            }
        }
    };
    let out = &mut out[..(b - 1) * out_rs + rows];
    let parts = threads.clamp(1, b);
    let per = b.div_ceil(parts);
    if parts == 1 {
        run(0, out);
    } else {
        out.par_chunks_mut(per * out_rs)
            .enumerate()
            .for_each(|(i, o)| run(i * per, o));
    }
}

/// `out[i, :] = W · x[i, :]` for `b` rows; `out` rows are `out_rs` apart.
/// Packed weights with an interleaved 4- or 5-bit copy ([`Model::x8`]) multiply
/// the int8 blocks of the rows (quantized once per input,
/// [`BatchScratch::new_input`]) through [`Kernels::matmul_x8`], the quads of
/// tokens split over the threads ([`PrefillKind::Auto`]; `Int8` uses the
/// row-by-row [`Kernels::matmul_qg`] instead). Otherwise non-F32 weights are
/// decoded tile by tile to f32 and fed to gemm, packed ones against the
/// activations rounded through the same int8 blocks. Either way, prompt and decode
/// compute the same Ŵ·x̂ and differ only by float reassociation.
#[allow(clippy::too_many_arguments)]
fn linear_batch(
    model: &Model,
    w: &Weight,
    x: &[f32],
    b: usize,
    out: &mut [f32],
    out_rs: usize,
    scratch: &mut BatchScratch,
    threads: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    let data = model.data(w);
    let perm = model.perm(w);
    if let WeightData::Packed(p) = &data {
        let k = model.kernels();
        // Auto: the interleaved 4-/5-bit rows where the model keeps them, else
        // the row-by-row batched kernel where it beats tiles (VNNI); Int8:
        // the row-by-row batched kernels; otherwise decoded tiles.
        let x8 = match (scratch.prefill, k.matmul_x8, model.x8(w)) {
            (PrefillKind::Auto, Some(f), Some(x8)) if x8.bits() != 8 => Some((f, x8)),
            _ => None,
        };
        let rowwise = match scratch.prefill {
            PrefillKind::Int8 => k.matmul_qg(p.dtype()),
            PrefillKind::Auto if x8.is_none() && k.qg_mm_beats_tiles => k.matmul_qg(p.dtype()),
            _ => None,
        };
        let gguf = match (scratch.prefill, k.matmul_x8k, model.x8k(w)) {
            (PrefillKind::Auto, Some(f), Some(copy)) => Some(GgufMatmul::X8K(f, copy)),
            (PrefillKind::Auto | PrefillKind::Int8, ..) => {
                k.matmul_gguf(p.dtype()).map(GgufMatmul::Rows)
            }
            (PrefillKind::Tiles, ..) => None,
        };
        if let (Some(mm), None, None) = (gguf, perm, x8) {
            gguf_batch(mm, k, p, x, b, out, out_rs, scratch, threads);
            return;
        }
        if x8.is_some() || rowwise.is_some() {
            if scratch.q8b_key != Some(w.perm_key()) {
                scratch.q8b.quantize(k.quantize_q8, x, b, cols, perm);
                scratch.q8b_key = Some(w.perm_key());
            }
            let xb = scratch.q8b.as_ref();
            let run = |xb: &Q8BatchRef<'_>, o: &mut [f32]| match (x8, rowwise) {
                (Some((f, x8)), _) => f(x8, xb, o, out_rs),
                (None, Some(mm)) => mm(*p, xb, o, out_rs),
                (None, None) => unreachable!(),
            };
            let n_quads = xb.n_quads();
            let parts = threads.clamp(1, n_quads);
            let per = n_quads.div_ceil(parts);
            let out = &mut out[..(b - 1) * out_rs + rows];
            if parts == 1 {
                run(&xb, out);
            } else {
                out.par_chunks_mut(per * QUAD * out_rs)
                    .enumerate()
                    .for_each(|(i, o)| {
                        let q0 = i * per;
                        run(&xb.quads(q0, per.min(n_quads - q0)), o)
                    });
            }
            return;
        }
    }
    let BatchScratch {
        wtile, xhat, q8, ..
    } = scratch;
    let x: &[f32] = if let WeightData::Packed(p) = data {
        let quantize = model.kernels().quantize_q8;
        let kind = Q8Kind::for_dtype(p.dtype());
        let (tmp, tmp2) = wtile.split_at_mut(cols);
        for i in 0..b {
            let row = &x[i * cols..(i + 1) * cols];
            let dst = &mut xhat[i * cols..(i + 1) * cols];
            match perm {
                None => {
                    q8.quantize_as(kind, quantize, row);
                    q8.as_ref().dequantize_into(dst);
                }
                Some(perm) => {
                    let (g, back) = (&mut tmp[..cols], &mut tmp2[..cols]);
                    for (o, &p) in g.iter_mut().zip(perm) {
                        *o = row[p as usize];
                    }
                    q8.quantize(quantize, g);
                    q8.as_ref().dequantize_into(back);
                    for (&p, &v) in perm.iter().zip(back.iter()) {
                        dst[p as usize] = v;
                    }
                }
            }
        }
        &xhat[..b * cols]
    } else {
        x
    };
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
    if let (WeightData::F32(d), None) = (&data, perm) {
        return emit(0, rows, d, out);
    }
    // Other types: decode a tile of rows to f32 (scattering columns back to
    // input order when the weight is stored act-order permuted), then gemm.
    let dequant = match &data {
        WeightData::Packed(p) => Some(model.kernels().dequant_qg(p.dtype())),
        _ => None,
    };
    for r0 in (0..rows).step_by(WEIGHT_TILE_ROWS) {
        let n = WEIGHT_TILE_ROWS.min(rows - r0);
        let (tile, rowbuf) = wtile.split_at_mut(WEIGHT_TILE_ROWS * cols);
        let decode = |r: usize, dst: &mut [f32]| match (&data, dequant) {
            (WeightData::Packed(p), Some(f)) => f(*p, r, dst),
            _ => decode_row(&data, r, cols, dst),
        };
        match perm {
            None if threads > 1 => tile[..n * cols]
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(r, dst)| decode(r0 + r, dst)),
            None => {
                for (r, dst) in tile[..n * cols].chunks_exact_mut(cols).enumerate() {
                    decode(r0 + r, dst);
                }
            }
            Some(perm) => {
                for r in 0..n {
                    let dst = &mut tile[r * cols..(r + 1) * cols];
                    let tmp = &mut rowbuf[..cols];
                    decode(r0 + r, tmp);
                    for (&p, &v) in perm.iter().zip(tmp.iter()) {
                        dst[p as usize] = v;
                    }
                }
            }
        }
        emit(r0, n, &tile[..n * cols], out);
    }
}

/// Where the rows of a batched step sit.
enum BatchRows<'a> {
    /// A prompt: rows at positions `start..`, attention per query head as
    /// two `gemm` products over the layer's cached keys (each KV head's
    /// keys and values widened to f32 once, into `kv_f32`).
    Prompt { kv_f32: &'a mut [f32], start: usize },
    /// Sequences in lockstep: row `i` is the sequence of slot `i` of the KV
    /// cache (`slot_len` rows each), every row at position `pos`; per row
    /// the one-token attention kernel over its own slot.
    Slots { pos: usize, slot_len: usize },
}

/// The batched paths (a prompt, sequences in lockstep): batched products
/// ([`linear_batch`]) over rows laid out as [`BatchRows`] says.
struct BatchExec<'a> {
    model: &'a Model,
    kv: &'a mut KvCache,
    scores: &'a mut [f32],
    scratch: &'a mut BatchScratch,
    rows: BatchRows<'a>,
    n_ctx: usize,
    threads: usize,
    lora: &'a mut LoraRun,
}

impl BlockExec for BatchExec<'_> {
    fn vector(&self, layer: usize, v: Vector) -> Option<&[f32]> {
        self.model.layer_vector(layer, v)
    }
    fn input(&mut self, _layer: usize, _first: Lin, _x: &[f32], _rows: usize) {
        self.scratch.new_input();
    }
    fn adapt(&mut self, layer: usize, w: Lin, x: &[f32], rows: usize, out: &mut [f32]) {
        let cols = self.model.layers[layer].linear(w).cols;
        let threads = self.threads;
        self.lora
            .apply(self.model.kernels(), layer, w, x, rows, cols, out, threads);
    }
    fn linear(&mut self, layer: usize, w: Lin, x: &[f32], rows: usize, out: &mut [f32]) {
        let w = self.model.layers[layer].linear(w);
        linear_batch(
            self.model,
            w,
            x,
            rows,
            out,
            w.rows,
            self.scratch,
            self.threads,
        );
    }
    fn position(&self, row: usize) -> usize {
        match self.rows {
            BatchRows::Prompt { start, .. } => start + row,
            BatchRows::Slots { pos, .. } => pos,
        }
    }
    fn attend(
        &mut self,
        l: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        out: &mut [f32],
        p: AttnParams,
    ) {
        match self.rows {
            BatchRows::Prompt {
                ref mut kv_f32,
                start,
            } => {
                let kv_f32: &mut [f32] = kv_f32;
                let hp = &self.model.hparams;
                let (hd, n_kv) = (hp.head_dim, hp.n_head_kv);
                let (q_dim, kv_dim, group) = (hp.n_head * hd, n_kv * hd, hp.n_head / n_kv);
                let (start, n_keys) = (start, start + b);
                let lbase = l * self.n_ctx * kv_dim;
                self.kv.store(lbase + start * kv_dim, k, v);
                // Attention per query head: S = Q·Kᵀ·scale over all cached keys,
                // causal (and sliding-window) mask, softmax per row, then O = S·V;
                // the KV head's keys and values widened to f32 once for its query
                // heads.
                for kvh in 0..n_kv {
                    let kv = lbase + kvh * hd;
                    let per = kv_f32.len() / 2;
                    let (kf, vf) = kv_f32.split_at_mut(per);
                    let (keys, values, stride): (&[f32], &[f32], usize) = match &*self.kv {
                        KvCache::F32 { keys, values } => (&keys[kv..], &values[kv..], kv_dim),
                        KvCache::F16 { keys, values } => {
                            widen_head(kf, &keys[kv..], kv_dim, hd, n_keys);
                            widen_head(vf, &values[kv..], kv_dim, hd, n_keys);
                            (kf, vf, hd)
                        }
                    };
                    for h in kvh * group..(kvh + 1) * group {
                        attend_rows(
                            (&q[h * hd..], b, q_dim),
                            (keys, values, stride),
                            n_keys,
                            (self.scores, n_keys),
                            &mut out[h * hd..],
                            (hd, p, self.threads),
                            self.model.kernels().causal_softmax,
                            |i| (p.first_key(start + i), start + i),
                        );
                    }
                }
            }
            BatchRows::Slots { pos, slot_len } => {
                let hp = &self.model.hparams;
                let (q_dim, kv_dim) = (hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim);
                let lbase = l * self.n_ctx * kv_dim;
                for i in 0..b {
                    let row = lbase + (i * slot_len + pos) * kv_dim;
                    let r = i * kv_dim..(i + 1) * kv_dim;
                    self.kv.store(row, &k[r.clone()], &v[r]);
                }
                // Per row and KV head, the `group` query heads that share it: one
                // query per head, so the one-token attention kernel (each cached key
                // and value read once for the group), not `gemm` on 3-row products,
                // whose set-up cost dominated at these sizes.
                let kern = self.model.kernels();
                let kv = &*self.kv;
                let lo = p.first_key(pos);
                let attend = |(i, (att, scores)): (usize, (&mut [f32], &mut [f32]))| {
                    let slot = lbase + i * slot_len * kv_dim;
                    let q = &q[i * q_dim..(i + 1) * q_dim];
                    attend_cache(
                        kern,
                        kv,
                        slot,
                        hp,
                        q,
                        lo..pos + 1,
                        (scores, slot_len),
                        att,
                        p,
                    );
                };
                let att_rows = &mut out[..b * q_dim];
                let per_row = hp.n_head * slot_len;
                if self.threads > 1 {
                    att_rows
                        .par_chunks_mut(q_dim)
                        .zip(self.scores.par_chunks_mut(per_row))
                        .enumerate()
                        .for_each(attend);
                } else {
                    att_rows
                        .chunks_mut(q_dim)
                        .zip(self.scores.chunks_mut(per_row))
                        .enumerate()
                        .for_each(attend);
                }
            }
        }
    }
    fn kernels(&self) -> &'static Kernels {
        self.model.kernels()
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
    let e = hp.n_embd;
    embed_rows(model, tokens, |i| start + i, &mut bs.bufs);
    let mut ex = BatchExec {
        model,
        kv: &mut s.kv,
        scores: &mut bs.scores,
        scratch: &mut bs.scratch,
        rows: BatchRows::Prompt {
            kv_f32: &mut bs.kv_f32,
            start,
        },
        n_ctx: s.n_ctx,
        threads,
        lora: &mut s.lora,
    };
    for l in 0..hp.n_layer {
        block(hp, l, &mut ex, &mut bs.bufs, &s.rope, b);
    }

    match logits {
        None => {}
        Some(false) => {
            let last = &bs.bufs.x[(b - 1) * e..b * e];
            output_norm(model, last, &mut s.bufs.xn);
            s.inp.reset();
            let par = if threads > 1 { Par::Rayon } else { Par::Serial };
            matvec(
                model,
                &model.output,
                &s.bufs.xn,
                &mut s.logits,
                &mut s.inp,
                par,
            );
            softcap_logits(&hp.desc, &mut s.logits);
        }
        Some(true) => logits_batch(model, bs, b, threads),
    }
}

/// The first `tokens.len()` rows of `bufs.x` ← the tokens' embeddings, row
/// `i` at position `pos(i)`.
fn embed_rows(model: &Model, tokens: &[u32], pos: impl Fn(usize) -> usize, bufs: &mut BlockBufs) {
    let e = model.hparams.n_embd;
    for (i, &t) in tokens.iter().enumerate() {
        let row = &mut bufs.x[i * e..(i + 1) * e];
        embed(model, t, pos(i), row, &mut bufs.xn[..e]);
    }
}

/// One decoding step of `b = tokens.len()` independent sequences at once
/// (e.g. the quantizer's self-generated calibration text): row `i` is the
/// sequence kept in slot `i` of the KV cache (cache rows `i·slot_len ..
/// (i+1)·slot_len`, so `s` needs `n_ctx ≥ b·slot_len`; `bs` comes from
/// [`BatchState::for_slots`]), every row at position `pos`. The linear
/// layers run as one batch, so each weight is streamed once for all rows
/// instead of once per sequence; attention runs
/// per row over its own slot (rows spread over the rayon pool when
/// `threads > 1`). The logits of every row go to `bs.logits`
/// (`[n_batch, n_vocab]`). Each row gets the arithmetic of a prompt row of
/// [`forward_batch`] (the same batched kernels) up to float reassociation:
/// `gemm` may order a row's sums differently for another number of rows.
pub fn forward_slots(
    model: &Model,
    s: &mut RunState,
    bs: &mut BatchState,
    tokens: &[u32],
    pos: usize,
    slot_len: usize,
    threads: usize,
) {
    let hp = &model.hparams;
    let b = tokens.len();
    assert!(b > 0 && b <= bs.n_batch, "forward_slots: 1..=n_batch rows");
    assert!(
        pos < slot_len && b * slot_len <= s.n_ctx,
        "forward_slots: slots exceed the cache"
    );
    assert!(
        bs.scores.len() >= b * hp.n_head * slot_len,
        "forward_slots: make `bs` with BatchState::for_slots"
    );
    embed_rows(model, tokens, |_| pos, &mut bs.bufs);
    let mut ex = BatchExec {
        model,
        kv: &mut s.kv,
        scores: &mut bs.scores,
        scratch: &mut bs.scratch,
        rows: BatchRows::Slots { pos, slot_len },
        n_ctx: s.n_ctx,
        threads,
        lora: &mut s.lora,
    };
    for l in 0..hp.n_layer {
        block(hp, l, &mut ex, &mut bs.bufs, &s.rope, b);
    }
    logits_batch(model, bs, b, threads);
}

/// Attention of `rows` queries against one KV head's cached positions
/// `0..n_keys` as two products: `scores = Q·Kᵀ·scale` (row `r` at
/// `scores[r·scores_rs..]`), a softmax of row `r` over the positions
/// `window(r) = (lo, pos)` (the rest zeroed), then `out = P·V`. `q` is
/// `(data, rows, row stride)` with `head_dim` columns; `out` has the same
/// row stride; `keys`/`values` start at the head's element of position 0,
/// rows `kv_stride` apart; `softmax` is the kernel table's
/// [`causal_softmax`](crate::kernels::Kernels::causal_softmax). Used by
/// [`forward_batch`] for a head's prompt rows.
#[allow(clippy::too_many_arguments)]
fn attend_rows(
    (q, rows, q_rs): (&[f32], usize, usize),
    (keys, values, kv_stride): (&[f32], &[f32], usize),
    n_keys: usize,
    (scores, scores_rs): (&mut [f32], usize),
    out: &mut [f32],
    (head_dim, p, threads): (usize, AttnParams, usize),
    softmax: crate::kernels::CausalSoftmaxFn,
    window: impl Fn(usize) -> (usize, usize),
) {
    let hd = head_dim;
    matmul(
        MatMut {
            data: scores,
            rows,
            cols: n_keys,
            rs: scores_rs,
            cs: 1,
        },
        MatRef {
            data: q,
            rows,
            cols: hd,
            rs: q_rs,
            cs: 1,
        },
        MatRef {
            data: keys,
            rows: hd,
            cols: n_keys,
            rs: 1,
            cs: kv_stride,
        },
        p.scale,
        false,
        threads,
    );
    for r in 0..rows {
        let (lo, pos) = window(r);
        let row = &mut scores[r * scores_rs..r * scores_rs + n_keys];
        if p.softcap > 0.0 {
            let cap = p.softcap;
            for v in &mut row[lo..=pos] {
                *v = cap * (*v / cap).tanh();
            }
        }
        softmax(row, lo, pos);
    }
    matmul(
        MatMut {
            data: out,
            rows,
            cols: hd,
            rs: q_rs,
            cs: 1,
        },
        MatRef {
            data: scores,
            rows,
            cols: n_keys,
            rs: scores_rs,
            cs: 1,
        },
        MatRef {
            data: values,
            rows: n_keys,
            cols: hd,
            rs: kv_stride,
            cs: 1,
        },
        1.0,
        false,
        threads,
    );
}

/// Logits of all `b` rows of `bs.bufs.x` into `bs.logits` (`[n_batch, n_vocab]`).
fn logits_batch(model: &Model, bs: &mut BatchState, b: usize, threads: usize) {
    let hp = &model.hparams;
    let e = hp.n_embd;
    output_norm(model, &bs.bufs.x[..b * e], &mut bs.bufs.xn[..b * e]);
    let n_vocab = hp.n_vocab;
    if bs.logits.len() < bs.n_batch * n_vocab {
        bs.logits = vec![0.0; bs.n_batch * n_vocab];
    }
    bs.scratch.new_input();
    linear_batch(
        model,
        &model.output,
        &bs.bufs.xn,
        b,
        &mut bs.logits,
        n_vocab,
        &mut bs.scratch,
        threads,
    );
    softcap_logits(&hp.desc, &mut bs.logits[..b * n_vocab]);
}
