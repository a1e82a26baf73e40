//! Decoder families as data: how each Hugging Face `model_type` names its
//! settings and tensors, and how its tensors turn into the one canonical
//! layout the runtime runs (`HParams::tensor_specs`).
//!
//! A family is a row of [`FAMILIES`]: its block description (read from the
//! config by [`hparams_from_config`]) and its tensor table (canonical role →
//! Hugging Face name and the [`Transform`] applied once, at import). Fused
//! projections are split, GPT-2's transposed Conv1D weights are transposed,
//! OPT's position offset is dropped, Gemma's `(1 + w)` norms are stored as
//! `w + 1`: the runtime never sees a family's storage quirks.

use serde_json::Value as Json;

use crate::arch::{Activation, Architecture, LayerDesc, NormKind, Positions, RopeScaling};
use crate::error::{FormatError, Result};
use crate::hparams::HParams;

/// How a canonical tensor is made from the stored one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// As stored.
    Plain,
    /// Stored `[in, out]` (GPT-2's Conv1D): transposed to `[out, in]`.
    Transposed,
    /// Gemma's `(1 + w)` norm weight: stored `w`, canonical `w + 1`.
    PlusOne,
    /// Rows `[q | k | v]` of a fused projection, part `0..3`.
    FusedQkv(usize),
    /// Rows `[gate | up]` of a fused projection, part `0..2`.
    FusedGateUp(usize),
    /// GPT-2's fused `c_attn` (`[in, 3·out]`): transposed, then part `0..3`.
    TransposedQkv(usize),
    /// GPT-NeoX's fused qkv, rows `[head, 3, head_dim]`: part `0..3`.
    HeadInterleavedQkv(usize),
    /// The learned position table without its first rows (OPT's offset 2).
    SkipRows(usize),
}

/// One canonical tensor role (its name without `.weight`/`.bias`, and
/// without the `blk.{i}.` prefix for per-layer roles) and where it is stored.
#[derive(Clone, Copy, Debug)]
pub struct Role {
    pub canonical: &'static str,
    /// The stored name without `.weight`/`.bias` (and without the layer prefix).
    pub hf: &'static str,
    pub transform: Transform,
}

const fn r(canonical: &'static str, hf: &'static str, transform: Transform) -> Role {
    Role {
        canonical,
        hf,
        transform,
    }
}

use Transform::*;

/// A family's config and tensor conventions.
pub struct Family {
    /// `model_type` values of `config.json`.
    pub model_types: &'static [&'static str],
    /// Prefix of layer `i`'s tensors, before `{i}.`.
    pub layer_prefix: &'static str,
    pub globals: &'static [Role],
    pub layer: &'static [Role],
    /// The MLP has a gate projection.
    pub gated: bool,
    pub norm: NormKind,
    /// Gemma: norms stored as `w` for `(1 + w)`, embedding scaled by √n_embd.
    pub gemma_style: bool,
    pub parallel_residual: bool,
    pub post_norms: bool,
    pub qk_norm: bool,
    pub positions: Positions,
}

const LLAMA_GLOBALS: &[Role] = &[
    r("token_embd", "model.embed_tokens", Plain),
    r("output_norm", "model.norm", Plain),
    r("output", "lm_head", Plain),
];
const GEMMA_GLOBALS: &[Role] = &[
    r("token_embd", "model.embed_tokens", Plain),
    r("output_norm", "model.norm", PlusOne),
    r("output", "lm_head", Plain),
];
const LLAMA_LAYER: &[Role] = &[
    r("attn_norm", "input_layernorm", Plain),
    r("attn_q", "self_attn.q_proj", Plain),
    r("attn_k", "self_attn.k_proj", Plain),
    r("attn_v", "self_attn.v_proj", Plain),
    r("attn_q_norm", "self_attn.q_norm", Plain),
    r("attn_k_norm", "self_attn.k_norm", Plain),
    r("attn_output", "self_attn.o_proj", Plain),
    r("ffn_norm", "post_attention_layernorm", Plain),
    r("ffn_gate", "mlp.gate_proj", Plain),
    r("ffn_up", "mlp.up_proj", Plain),
    r("ffn_down", "mlp.down_proj", Plain),
];
const GEMMA_LAYER: &[Role] = &[
    r("attn_norm", "input_layernorm", PlusOne),
    r("attn_q", "self_attn.q_proj", Plain),
    r("attn_k", "self_attn.k_proj", Plain),
    r("attn_v", "self_attn.v_proj", Plain),
    r("attn_q_norm", "self_attn.q_norm", PlusOne),
    r("attn_k_norm", "self_attn.k_norm", PlusOne),
    r("attn_output", "self_attn.o_proj", Plain),
    r("ffn_norm", "post_attention_layernorm", PlusOne),
    r("ffn_gate", "mlp.gate_proj", Plain),
    r("ffn_up", "mlp.up_proj", Plain),
    r("ffn_down", "mlp.down_proj", Plain),
];
/// Gemma 2/3: four norms per layer.
const GEMMA2_LAYER: &[Role] = &[
    r("attn_norm", "input_layernorm", PlusOne),
    r("attn_q", "self_attn.q_proj", Plain),
    r("attn_k", "self_attn.k_proj", Plain),
    r("attn_v", "self_attn.v_proj", Plain),
    r("attn_q_norm", "self_attn.q_norm", PlusOne),
    r("attn_k_norm", "self_attn.k_norm", PlusOne),
    r("attn_output", "self_attn.o_proj", Plain),
    r("attn_post_norm", "post_attention_layernorm", PlusOne),
    r("ffn_norm", "pre_feedforward_layernorm", PlusOne),
    r("ffn_gate", "mlp.gate_proj", Plain),
    r("ffn_up", "mlp.up_proj", Plain),
    r("ffn_down", "mlp.down_proj", Plain),
    r("ffn_post_norm", "post_feedforward_layernorm", PlusOne),
];
const PHI3_LAYER: &[Role] = &[
    r("attn_norm", "input_layernorm", Plain),
    r("attn_q", "self_attn.qkv_proj", FusedQkv(0)),
    r("attn_k", "self_attn.qkv_proj", FusedQkv(1)),
    r("attn_v", "self_attn.qkv_proj", FusedQkv(2)),
    r("attn_output", "self_attn.o_proj", Plain),
    r("ffn_norm", "post_attention_layernorm", Plain),
    r("ffn_gate", "mlp.gate_up_proj", FusedGateUp(0)),
    r("ffn_up", "mlp.gate_up_proj", FusedGateUp(1)),
    r("ffn_down", "mlp.down_proj", Plain),
];
const OPT_GLOBALS: &[Role] = &[
    r("token_embd", "model.decoder.embed_tokens", Plain),
    r("pos_embd", "model.decoder.embed_positions", SkipRows(2)),
    r("output_norm", "model.decoder.final_layer_norm", Plain),
    r("output", "lm_head", Plain),
];
const OPT_LAYER: &[Role] = &[
    r("attn_norm", "self_attn_layer_norm", Plain),
    r("attn_q", "self_attn.q_proj", Plain),
    r("attn_k", "self_attn.k_proj", Plain),
    r("attn_v", "self_attn.v_proj", Plain),
    r("attn_output", "self_attn.out_proj", Plain),
    r("ffn_norm", "final_layer_norm", Plain),
    r("ffn_up", "fc1", Plain),
    r("ffn_down", "fc2", Plain),
];
const GPT2_GLOBALS: &[Role] = &[
    r("token_embd", "transformer.wte", Plain),
    r("pos_embd", "transformer.wpe", Plain),
    r("output_norm", "transformer.ln_f", Plain),
    r("output", "lm_head", Plain),
];
const GPT2_LAYER: &[Role] = &[
    r("attn_norm", "ln_1", Plain),
    r("attn_q", "attn.c_attn", TransposedQkv(0)),
    r("attn_k", "attn.c_attn", TransposedQkv(1)),
    r("attn_v", "attn.c_attn", TransposedQkv(2)),
    r("attn_output", "attn.c_proj", Transposed),
    r("ffn_norm", "ln_2", Plain),
    r("ffn_up", "mlp.c_fc", Transposed),
    r("ffn_down", "mlp.c_proj", Transposed),
];
const NEOX_GLOBALS: &[Role] = &[
    r("token_embd", "gpt_neox.embed_in", Plain),
    r("output_norm", "gpt_neox.final_layer_norm", Plain),
    r("output", "embed_out", Plain),
];
const NEOX_LAYER: &[Role] = &[
    r("attn_norm", "input_layernorm", Plain),
    r("attn_q", "attention.query_key_value", HeadInterleavedQkv(0)),
    r("attn_k", "attention.query_key_value", HeadInterleavedQkv(1)),
    r("attn_v", "attention.query_key_value", HeadInterleavedQkv(2)),
    r("attn_output", "attention.dense", Plain),
    r("ffn_norm", "post_attention_layernorm", Plain),
    r("ffn_up", "mlp.dense_h_to_4h", Plain),
    r("ffn_down", "mlp.dense_4h_to_h", Plain),
];

const fn llama_like(model_types: &'static [&'static str], qk_norm: bool) -> Family {
    Family {
        model_types,
        layer_prefix: "model.layers.",
        globals: LLAMA_GLOBALS,
        layer: LLAMA_LAYER,
        gated: true,
        norm: NormKind::Rms,
        gemma_style: false,
        parallel_residual: false,
        post_norms: false,
        qk_norm,
        positions: Positions::Rope,
    }
}

/// Every family nibble imports from a Hugging Face folder.
pub const FAMILIES: &[Family] = &[
    llama_like(&["llama", "mistral", "qwen2"], false),
    llama_like(&["qwen3"], true),
    Family {
        layer: PHI3_LAYER,
        ..llama_like(&["phi3"], false)
    },
    Family {
        model_types: &["gemma"],
        globals: GEMMA_GLOBALS,
        layer: GEMMA_LAYER,
        gemma_style: true,
        ..llama_like(&[], false)
    },
    Family {
        model_types: &["gemma2"],
        globals: GEMMA_GLOBALS,
        layer: GEMMA2_LAYER,
        gemma_style: true,
        post_norms: true,
        ..llama_like(&[], false)
    },
    Family {
        model_types: &["gemma3_text"],
        globals: GEMMA_GLOBALS,
        layer: GEMMA2_LAYER,
        gemma_style: true,
        post_norms: true,
        qk_norm: true,
        ..llama_like(&[], false)
    },
    Family {
        model_types: &["opt"],
        layer_prefix: "model.decoder.layers.",
        globals: OPT_GLOBALS,
        layer: OPT_LAYER,
        gated: false,
        norm: NormKind::Layer,
        gemma_style: false,
        parallel_residual: false,
        post_norms: false,
        qk_norm: false,
        positions: Positions::Learned,
    },
    Family {
        model_types: &["gpt2"],
        layer_prefix: "transformer.h.",
        globals: GPT2_GLOBALS,
        layer: GPT2_LAYER,
        gated: false,
        norm: NormKind::Layer,
        gemma_style: false,
        parallel_residual: false,
        post_norms: false,
        qk_norm: false,
        positions: Positions::Learned,
    },
    Family {
        model_types: &["gpt_neox"],
        layer_prefix: "gpt_neox.layers.",
        globals: NEOX_GLOBALS,
        layer: NEOX_LAYER,
        gated: false,
        norm: NormKind::Layer,
        gemma_style: false,
        parallel_residual: true,
        post_norms: false,
        qk_norm: false,
        positions: Positions::Rope,
    },
];

/// The family of a `model_type`.
pub fn family(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&model_type))
}

/// Where a canonical tensor (`token_embd.weight`, `blk.3.attn_q.bias`, …)
/// is stored: the stored name and the transform.
pub fn locate(f: &Family, canonical: &str) -> Option<(String, Transform)> {
    let (stem, kind) = canonical.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (i, role) = rest.split_once('.')?;
        let role = f.layer.iter().find(|r| r.canonical == role)?;
        Some((
            format!("{}{i}.{}.{kind}", f.layer_prefix, role.hf),
            role.transform,
        ))
    } else {
        let role = f.globals.iter().find(|r| r.canonical == stem)?;
        Some((format!("{}.{kind}", role.hf), role.transform))
    }
}

/// Apply `t` to a stored tensor of `shape` (row-major, `[rows, cols]` or
/// `[len]`), giving the canonical tensor of `want` elements.
pub fn apply(t: Transform, hp: &HParams, data: Vec<f32>, shape: &[u64]) -> Vec<f32> {
    let (q, kv, ff) = (hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_ff);
    let cols = if shape.len() == 2 {
        shape[1] as usize
    } else {
        1
    };
    let rows_of = |d: &[f32], r0: usize, n: usize| d[r0 * cols..(r0 + n) * cols].to_vec();
    match t {
        Plain => data,
        PlusOne => data.into_iter().map(|w| w + 1.0).collect(),
        Transposed if shape.len() == 2 => transpose(&data, shape),
        Transposed => data,
        FusedQkv(p) => {
            let (r0, n) = [(0, q), (q, kv), (q + kv, kv)][p];
            rows_of(&data, r0, n)
        }
        FusedGateUp(p) => rows_of(&data, p * ff, ff),
        TransposedQkv(p) => {
            let d = if shape.len() == 2 {
                transpose(&data, shape)
            } else {
                data
            };
            let n = d.len() / 3;
            d[p * n..(p + 1) * n].to_vec()
        }
        HeadInterleavedQkv(p) => {
            let hd = hp.head_dim;
            let mut out = Vec::with_capacity(data.len() / 3);
            for h in 0..hp.n_head {
                let r0 = (h * 3 + p) * hd;
                out.extend_from_slice(&data[r0 * cols..(r0 + hd) * cols]);
            }
            out
        }
        SkipRows(n) => data[n * cols..].to_vec(),
    }
}

/// The stored rows a row-only transform takes, in canonical order (a fused
/// projection's part), for tensors held as rows of codes rather than
/// floats; `None` for transforms that move columns or change values.
pub fn row_sources(t: Transform, hp: &HParams, stored: &[u64]) -> Option<Vec<usize>> {
    match t {
        Plain | FusedQkv(_) | FusedGateUp(_) | HeadInterleavedQkv(_) | SkipRows(_) => {
            // Row indices (exact in f32 below 2^24) through the float transform.
            let rows: Vec<f32> = (0..stored[0]).map(|r| r as f32).collect();
            let picked = apply(t, hp, rows, &[stored[0], 1]);
            Some(picked.into_iter().map(|r| r as usize).collect())
        }
        Transposed | TransposedQkv(_) | PlusOne => None,
    }
}

/// The stored shape a canonical `want` shape comes from under `t`.
pub fn stored_shape(t: Transform, hp: &HParams, want: &[u64]) -> Vec<u64> {
    let (q, kv, ff) = (
        (hp.n_head * hp.head_dim) as u64,
        (hp.n_head_kv * hp.head_dim) as u64,
        hp.n_ff as u64,
    );
    let tail = &want[1..];
    let with_rows = |rows: u64| [&[rows][..], tail].concat();
    match t {
        Plain | PlusOne => want.to_vec(),
        Transposed => want.iter().rev().copied().collect(),
        FusedQkv(_) => with_rows(q + 2 * kv),
        FusedGateUp(_) => with_rows(2 * ff),
        TransposedQkv(_) => {
            if want.len() == 2 {
                vec![want[1], 3 * want[0]]
            } else {
                vec![3 * want[0]]
            }
        }
        HeadInterleavedQkv(_) => with_rows(3 * want[0]),
        SkipRows(n) => with_rows(want[0] + n as u64),
    }
}

fn transpose(data: &[f32], shape: &[u64]) -> Vec<f32> {
    let (r, c) = (shape[0] as usize, shape[1] as usize);
    let mut out = vec![0f32; data.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = data[i * c + j];
        }
    }
    out
}

// ------------------------------------------------------------------ config

fn bad(why: String) -> FormatError {
    FormatError::BadConfig { why }
}

/// The first of `keys` present and not null.
fn first<'a>(c: &'a Json, keys: &[&str]) -> Option<(&'a Json, String)> {
    keys.iter().find_map(|k| match c.get(*k) {
        None | Some(Json::Null) => None,
        Some(v) => Some((v, (*k).to_string())),
    })
}

fn opt_usize(c: &Json, keys: &[&str]) -> Result<Option<usize>> {
    match first(c, keys) {
        None => Ok(None),
        Some((v, k)) => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| bad(format!("'{k}' = {v} is not a non-negative integer"))),
    }
}

fn req_usize(c: &Json, keys: &[&str]) -> Result<usize> {
    opt_usize(c, keys)?.ok_or_else(|| bad(format!("missing '{}'", keys[0])))
}

fn opt_f64(c: &Json, keys: &[&str]) -> Result<Option<f64>> {
    match first(c, keys) {
        None => Ok(None),
        Some((v, k)) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(format!("'{k}' = {v} is not a number"))),
    }
}

fn opt_bool(c: &Json, key: &str) -> Result<Option<bool>> {
    match c.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad(format!("'{key}' = {v} is not true/false"))),
    }
}

fn opt_str<'a>(c: &'a Json, keys: &[&str]) -> Result<Option<&'a str>> {
    match first(c, keys) {
        None => Ok(None),
        Some((v, k)) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| bad(format!("'{k}' = {v} is not a string"))),
    }
}

/// A RoPE parameter object (`rope_scaling` of transformers 4, or one entry of
/// transformers 5's `rope_parameters`): its base (if given) and scaling.
fn rope_params(v: &Json, what: &str) -> Result<(Option<f64>, RopeScaling)> {
    let theta = opt_f64(v, &["rope_theta"])?;
    let kind = opt_str(v, &["rope_type", "type"])?.unwrap_or("default");
    let f = |k: &str| -> Result<f64> {
        opt_f64(v, &[k])?.ok_or_else(|| bad(format!("{what}: rope type '{kind}' needs '{k}'")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: f("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_ctx: opt_usize(v, &["original_max_position_embeddings"])?.ok_or_else(
                || {
                    bad(format!(
                        "{what}: llama3 rope needs 'original_max_position_embeddings'"
                    ))
                },
            )?,
        },
        other => {
            return Err(bad(format!(
                "{what}: rope type '{other}' is not supported (default, linear, llama3)"
            )))
        }
    };
    Ok((theta, scaling))
}

/// The MLP activation from the config's name for it.
fn activation(f: &Family, c: &Json) -> Result<Activation> {
    // Gemma reads `hidden_activation` first (its `hidden_act` is legacy).
    let keys: &[&str] = if f.gemma_style {
        &["hidden_activation", "hidden_act"]
    } else {
        &["hidden_act", "activation_function"]
    };
    let name = opt_str(c, keys)?.unwrap_or(if f.gated { "silu" } else { "gelu" });
    let act = match (f.gated, name) {
        (true, "silu" | "swish") => Activation::SwiGlu,
        (true, "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new") => Activation::GeGluTanh,
        // Gemma's modelling code uses the tanh form whatever the legacy key says.
        (true, "gelu") if f.gemma_style => Activation::GeGluTanh,
        (false, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_tanh") => {
            Activation::GeluTanh
        }
        (false, "gelu") => Activation::GeluErf,
        (false, "relu") => Activation::Relu,
        (_, other) => {
            return Err(bad(format!(
                "activation '{other}' is not supported for this family's {} MLP",
                if f.gated { "gated" } else { "plain" }
            )))
        }
    };
    Ok(act)
}

/// Settings that change the numbers in ways nibble does not implement.
fn refuse_unsupported(model_type: &str, c: &Json) -> Result<()> {
    for k in [
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "moe_intermediate_size",
    ] {
        if opt_usize(c, &[k]).ok().flatten().is_some_and(|n| n > 0) {
            return Err(bad(format!(
                "'{k}': mixture-of-experts models are not supported"
            )));
        }
    }
    let refuse_true = |k: &str, why: &str| -> Result<()> {
        if opt_bool(c, k)? == Some(true) {
            return Err(bad(format!("'{k}: true' ({why}) is not supported")));
        }
        Ok(())
    };
    refuse_true("use_bidirectional_attention", "bidirectional attention")?;
    match model_type {
        "gpt2" => {
            refuse_true(
                "scale_attn_by_inverse_layer_idx",
                "per-layer attention scale",
            )?;
            refuse_true("reorder_and_upcast_attn", "reordered attention")?;
            if opt_bool(c, "scale_attn_weights")? == Some(false) {
                return Err(bad("'scale_attn_weights: false' is not supported".into()));
            }
        }
        "opt" => {
            if opt_bool(c, "do_layer_norm_before")? == Some(false) {
                return Err(bad(
                    "'do_layer_norm_before: false' (post-LN OPT, e.g. opt-350m) is not supported"
                        .into(),
                ));
            }
            refuse_true("_remove_final_layer_norm", "no final layer norm")?;
            if let (Some(p), Some(h)) = (
                opt_usize(c, &["word_embed_proj_dim"])?,
                opt_usize(c, &["hidden_size"])?,
            ) {
                if p != h {
                    return Err(bad(format!(
                        "word_embed_proj_dim {p} ≠ hidden_size {h} (projected embeddings) is not supported"
                    )));
                }
            }
            if opt_bool(c, "layer_norm_elementwise_affine")? == Some(false) {
                return Err(bad(
                    "'layer_norm_elementwise_affine: false' is not supported".into(),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Hyper-parameters and block description of a Hugging Face `config.json`.
pub fn hparams_from_config(c: &Json) -> Result<(HParams, &'static Family)> {
    let model_type = c
        .get("model_type")
        .and_then(Json::as_str)
        .ok_or_else(|| bad("config.json is missing 'model_type'".into()))?;
    let f = family(model_type).ok_or_else(|| FormatError::UnsupportedArchitecture {
        arch: model_type.into(),
    })?;
    refuse_unsupported(model_type, c)?;

    let n_embd = req_usize(c, &["hidden_size", "n_embd"])?;
    let n_head = req_usize(c, &["num_attention_heads", "n_head"])?;
    if n_head == 0 {
        return Err(bad("num_attention_heads is 0".into()));
    }
    let n_layer = req_usize(c, &["num_hidden_layers", "n_layer"])?;
    if n_layer == 0 || n_layer > 1024 {
        return Err(bad(format!("num_hidden_layers {n_layer} out of range")));
    }
    let head_dim = opt_usize(c, &["head_dim"])?.unwrap_or(n_embd / n_head);
    let n_ff = match opt_usize(c, &["intermediate_size", "n_inner", "ffn_dim"])? {
        Some(v) => v,
        None if model_type == "gpt2" => 4 * n_embd,
        None => return Err(bad("missing 'intermediate_size'".into())),
    };
    let n_ctx_train = opt_usize(c, &["max_position_embeddings", "n_positions"])?.unwrap_or(2048);
    let norm_eps = opt_f64(c, &["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"])?
        .unwrap_or(if f.norm == NormKind::Rms { 1e-6 } else { 1e-5 });
    let tie = opt_bool(c, "tie_word_embeddings")?.unwrap_or(match model_type {
        // transformers' defaults for these families.
        "gpt2" | "opt" | "gemma" | "gemma2" | "gemma3_text" => true,
        _ => false,
    });

    // RoPE: transformers 5's `rope_parameters` (flat, or per layer type), else
    // 4.x's `rope_theta` + `rope_scaling`.
    let mut rope_theta = opt_f64(c, &["rope_theta", "rotary_emb_base"])?;
    let mut scaling = RopeScaling::None;
    let mut rope_theta_local = opt_f64(c, &["rope_local_base_freq"])?;
    if let Some(p) = c.get("rope_parameters").filter(|v| !v.is_null()) {
        if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() {
            if let Some(full) = p.get("full_attention") {
                let (t, s) = rope_params(full, "rope_parameters.full_attention")?;
                rope_theta = t.or(rope_theta);
                scaling = s;
            }
            if let Some(local) = p.get("sliding_attention") {
                let (t, s) = rope_params(local, "rope_parameters.sliding_attention")?;
                if s != RopeScaling::None {
                    return Err(bad(
                        "rope scaling on sliding-attention layers is not supported".into(),
                    ));
                }
                rope_theta_local = t.or(rope_theta_local);
            }
        } else {
            let (t, s) = rope_params(p, "rope_parameters")?;
            rope_theta = t.or(rope_theta);
            scaling = s;
        }
    } else if let Some(s) = c.get("rope_scaling").filter(|v| !v.is_null()) {
        scaling = rope_params(s, "rope_scaling")?.1;
    }
    let rope_theta = rope_theta.unwrap_or(10000.0);
    let rope_dim = match (
        f.positions,
        opt_f64(c, &["partial_rotary_factor", "rotary_pct"])?,
    ) {
        (Positions::Learned, _) => head_dim,
        (_, Some(p)) => {
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad(format!("partial rotary factor {p} out of (0, 1]")));
            }
            (head_dim as f64 * p) as usize
        }
        (_, None) => head_dim,
    };

    // Attention windows per layer.
    let window = opt_usize(c, &["sliding_window"])?.unwrap_or(0);
    let layer_types: Option<Vec<String>> = match c.get("layer_types") {
        None | Some(Json::Null) => None,
        Some(Json::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("layer_types entry {v} is not a string")))
                })
                .collect::<Result<_>>()?,
        ),
        Some(v) => return Err(bad(format!("layer_types = {v} is not a list"))),
    };
    let sliding: Vec<bool> = match &layer_types {
        Some(t) => {
            if t.len() != n_layer {
                return Err(bad(format!(
                    "layer_types has {} entries for {n_layer} layers",
                    t.len()
                )));
            }
            t.iter()
                .map(|s| match s.as_str() {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    o => Err(bad(format!("layer type '{o}' is not supported"))),
                })
                .collect::<Result<_>>()?
        }
        None => (0..n_layer)
            .map(|i| match model_type {
                "qwen2" | "qwen3" => {
                    opt_bool(c, "use_sliding_window").ok().flatten() == Some(true)
                        && i >= opt_usize(c, &["max_window_layers"])
                            .ok()
                            .flatten()
                            .unwrap_or(0)
                }
                "gemma2" => i % 2 == 0,
                "gemma3_text" => {
                    let p = opt_usize(c, &["sliding_window_pattern", "_sliding_window_pattern"])
                        .ok()
                        .flatten()
                        .unwrap_or(6);
                    p > 0 && (i + 1) % p != 0
                }
                "gemma" | "opt" | "gpt2" | "gpt_neox" => false,
                _ => window > 0,
            })
            .collect(),
    };
    if sliding.iter().any(|&s| s) && window == 0 {
        return Err(bad(
            "sliding-attention layers without a 'sliding_window' size".into(),
        ));
    }
    // Gemma 3's local layers have their own RoPE base.
    let local_rope = f.gemma_style && rope_theta_local.is_some();
    let layers = sliding
        .iter()
        .map(|&s| LayerDesc {
            window: if s { window } else { 0 },
            local_rope: local_rope && s,
        })
        .collect();

    let attn_scale = match opt_f64(c, &["query_pre_attn_scalar"])? {
        Some(s) if f.gemma_style && model_type != "gemma" => (1.0 / s.sqrt()) as f32,
        _ => 1.0 / (head_dim as f32).sqrt(),
    };
    let bias = |k: &str, default: bool| -> Result<bool> { Ok(opt_bool(c, k)?.unwrap_or(default)) };
    let (attn_bias, attn_out_bias, ffn_bias) = match model_type {
        "qwen2" => (true, false, false),
        "opt" => {
            let b = bias("enable_bias", true)?;
            (b, b, b)
        }
        "gpt2" => (true, true, true),
        "gpt_neox" => {
            let b = bias("attention_bias", true)?;
            (b, b, true)
        }
        _ => {
            let a = bias("attention_bias", false)?;
            (a, a, bias("mlp_bias", false)?)
        }
    };
    let desc = Architecture {
        norm: f.norm,
        activation: activation(f, c)?,
        positions: f.positions,
        // GPT-NeoX configs choose (Pythia: parallel; some fine-tunes: not).
        parallel_residual: opt_bool(c, "use_parallel_residual")?.unwrap_or(f.parallel_residual),
        post_norms: f.post_norms,
        qk_norm: f.qk_norm,
        attn_bias,
        attn_out_bias,
        ffn_bias,
        // torch.tensor(hidden_size ** 0.5, dtype=float32).
        embd_scale: if f.gemma_style {
            (n_embd as f64).sqrt() as f32
        } else {
            1.0
        },
        attn_scale,
        attn_softcap: opt_f64(c, &["attn_logit_softcapping"])?.unwrap_or(0.0) as f32,
        final_softcap: opt_f64(c, &["final_logit_softcapping"])?.unwrap_or(0.0) as f32,
        rope_dim,
        rope_scaling: scaling,
        rope_theta_local: rope_theta_local.unwrap_or(rope_theta),
        layers,
    };
    let hp = HParams {
        arch: model_type.to_string(),
        n_vocab: req_usize(c, &["vocab_size"])?,
        n_embd,
        n_layer,
        n_head,
        n_head_kv: opt_usize(c, &["num_key_value_heads"])?.unwrap_or(n_head),
        head_dim,
        n_ff,
        n_ctx_train,
        rope_theta,
        norm_eps,
        tie_embeddings: tie,
        sliding_window: if sliding.iter().all(|&s| s) {
            window
        } else {
            0
        },
        desc,
    };
    hp.validate()?;
    Ok((hp, f))
}
