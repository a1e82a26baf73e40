//! Model hyper-parameters and tokenizer settings as stored in `.nib`
//! metadata. The importers write them, the runtime reads them back: this
//! module is the single definition of those keys (listed in `FORMAT.md`).

use crate::arch::{Architecture, NormKind, Positions};
use crate::error::{FormatError, Result};
use crate::nib::{Metadata, MetadataBuilder, OwnedValue};

pub mod keys {
    pub const ARCH: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    pub const N_VOCAB: &str = "model.n_vocab";
    pub const N_EMBD: &str = "model.n_embd";
    pub const N_LAYER: &str = "model.n_layer";
    pub const N_HEAD: &str = "model.n_head";
    pub const N_HEAD_KV: &str = "model.n_head_kv";
    pub const HEAD_DIM: &str = "model.head_dim";
    pub const N_FF: &str = "model.n_ff";
    pub const N_CTX_TRAIN: &str = "model.n_ctx_train";
    pub const ROPE_THETA: &str = "model.rope_theta";
    pub const RMS_NORM_EPS: &str = "model.rms_norm_eps";
    pub const TIE_EMBEDDINGS: &str = "model.tie_embeddings";
    pub const SLIDING_WINDOW: &str = "model.sliding_window";
    pub const TOKENIZER_JSON: &str = "tokenizer.json";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
    /// The family whose known chat template stands in for a missing one.
    pub const CHAT_TEMPLATE_FALLBACK: &str = "tokenizer.chat_template_fallback";
    pub const BOS_ID: &str = "tokenizer.bos_id";
    pub const EOS_IDS: &str = "tokenizer.eos_ids";
    pub const QUANT_METHOD: &str = "quant.method";
    pub const QUANT_DTYPE: &str = "quant.dtype";
    pub const QUANT_BITS: &str = "quant.bits";
    /// Bits of the token embedding / output head (absent: F16).
    pub const QUANT_HEAD_BITS: &str = "quant.head_bits";
    pub const QUANT_GROUP_SIZE: &str = "quant.group_size";
    pub const QUANT_SYM: &str = "quant.sym";
    /// A GPTQ checkpoint's `checkpoint_format` ("gptq" or "gptq_v2").
    pub const QUANT_CHECKPOINT_FORMAT: &str = "quant.checkpoint_format";
    pub const QUANT_ACT_ORDER: &str = "quant.act_order";
    pub const QUANT_STATIC_GROUPS: &str = "quant.static_groups";
    pub const QUANT_TRUE_SEQUENTIAL: &str = "quant.true_sequential";
    pub const QUANT_DAMP: &str = "quant.damp";
    pub const QUANT_CALIB_FILE: &str = "quant.calib_file";
    pub const QUANT_CALIB_SHA256: &str = "quant.calib_sha256";
    pub const QUANT_NSAMPLES: &str = "quant.nsamples";
    pub const QUANT_SEQLEN: &str = "quant.seqlen";
    pub const QUANT_SEED: &str = "quant.seed";
    pub const PROV_SOURCE: &str = "provenance.source";
    pub const PROV_SOURCE_SHA256: &str = "provenance.source_sha256";
    pub const PROV_TOOL: &str = "provenance.tool";
    /// LoRA adapters merged at import, one line each: `<sha256> <scale> <folder>`.
    pub const PROV_LORA: &str = "provenance.lora";
    pub const PROV_CREATED: &str = "provenance.created";
}

/// Shapes and settings of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct HParams {
    /// The family's name as its config gives it ("llama", "qwen2", "gemma3", …),
    /// for display and provenance only: what the block does is `desc`.
    pub arch: String,
    pub n_vocab: usize,
    /// Residual stream width.
    pub n_embd: usize,
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention: n_head % n_head_kv == 0).
    pub n_head_kv: usize,
    /// Per-head dimension (may differ from n_embd / n_head).
    pub head_dim: usize,
    /// MLP hidden width.
    pub n_ff: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    /// RoPE base of the layers that do not use the local one.
    pub rope_theta: f64,
    /// Epsilon of every norm (RMSNorm or LayerNorm, as `desc.norm` says).
    pub norm_eps: f64,
    /// The output head reuses the token embedding matrix.
    pub tie_embeddings: bool,
    /// Sliding attention window in tokens of a model whose layers all share
    /// one (0 = none); per-layer windows are in `desc.layers`.
    pub sliding_window: usize,
    /// What the block does (norms, activation, positions, biases, …).
    pub desc: Architecture,
}

impl HParams {
    /// Reject values no real model has and that would break size arithmetic.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(FormatError::BadConfig { why });
        let caps: [(&str, usize, usize); 8] = [
            ("n_vocab", self.n_vocab, 1 << 24),
            ("n_embd", self.n_embd, 1 << 16),
            ("n_layer", self.n_layer, 1024),
            ("n_head", self.n_head, 1024),
            ("n_head_kv", self.n_head_kv, 1024),
            ("head_dim", self.head_dim, 4096),
            ("n_ff", self.n_ff, 1 << 18),
            ("n_ctx_train", self.n_ctx_train, 1 << 24),
        ];
        for (name, v, max) in caps {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} (must be 1..={max})"));
            }
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "n_head {} is not a multiple of n_head_kv {}",
                self.n_head, self.n_head_kv
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return bad(format!("norm epsilon {} out of range", self.norm_eps));
        }
        self.desc.validate(self.n_layer, self.head_dim)
    }

    pub fn write(&self, m: &mut MetadataBuilder) {
        use keys::*;
        m.set(ARCH, OwnedValue::Str(self.arch.clone()));
        for (k, v) in [
            (N_VOCAB, self.n_vocab),
            (N_EMBD, self.n_embd),
            (N_LAYER, self.n_layer),
            (N_HEAD, self.n_head),
            (N_HEAD_KV, self.n_head_kv),
            (HEAD_DIM, self.head_dim),
            (N_FF, self.n_ff),
            (N_CTX_TRAIN, self.n_ctx_train),
            (SLIDING_WINDOW, self.sliding_window),
        ] {
            m.set(k, OwnedValue::U64(v as u64));
        }
        m.set(ROPE_THETA, OwnedValue::F64(self.rope_theta));
        m.set(RMS_NORM_EPS, OwnedValue::F64(self.norm_eps));
        m.set(TIE_EMBEDDINGS, OwnedValue::Bool(self.tie_embeddings));
        self.desc.write(m);
    }

    pub fn read(m: &Metadata<'_>) -> Result<HParams> {
        use keys::*;
        let us = |k: &str| -> Result<usize> {
            let v = m.u64(k)?;
            usize::try_from(v).map_err(|_| FormatError::BadValue {
                key: k.into(),
                why: format!("{v} does not fit in usize"),
            })
        };
        let (n_layer, head_dim, sliding_window) =
            (us(N_LAYER)?, us(HEAD_DIM)?, us(SLIDING_WINDOW)?);
        // Bound the per-layer tables before they are sized from n_layer.
        if n_layer == 0 || n_layer > 1024 || head_dim > 4096 {
            return Err(FormatError::BadConfig {
                why: format!("n_layer {n_layer} / head_dim {head_dim} out of range"),
            });
        }
        let hp = HParams {
            arch: m.str(ARCH)?.to_string(),
            n_vocab: us(N_VOCAB)?,
            n_embd: us(N_EMBD)?,
            n_layer,
            n_head: us(N_HEAD)?,
            n_head_kv: us(N_HEAD_KV)?,
            head_dim,
            n_ff: us(N_FF)?,
            n_ctx_train: us(N_CTX_TRAIN)?,
            rope_theta: m.f64(ROPE_THETA)?,
            norm_eps: m.f64(RMS_NORM_EPS)?,
            tie_embeddings: m.bool(TIE_EMBEDDINGS)?,
            sliding_window,
            desc: Architecture::read(m, n_layer, head_dim, sliding_window)?,
        };
        hp.validate()?;
        Ok(hp)
    }

    /// Canonical `.nib` tensor names and row-major shapes for this model:
    /// which tensors exist follows from `desc` (biases, q/k norms, post-norms,
    /// the gate of gated MLPs, learned positions).
    pub fn tensor_specs(&self) -> Vec<(String, Vec<u64>)> {
        let d = &self.desc;
        let (e, q, kv, ff, hd) = (
            self.n_embd as u64,
            (self.n_head * self.head_dim) as u64,
            (self.n_head_kv * self.head_dim) as u64,
            self.n_ff as u64,
            self.head_dim as u64,
        );
        let mut v = vec![(
            "token_embd.weight".to_string(),
            vec![self.n_vocab as u64, e],
        )];
        if d.positions == Positions::Learned {
            v.push(("pos_embd.weight".into(), vec![self.n_ctx_train as u64, e]));
        }
        let norm_bias = d.norm == NormKind::Layer;
        for i in 0..self.n_layer {
            let mut t = |s: &str, shape: Vec<u64>, bias: bool| {
                if bias {
                    v.push((format!("blk.{i}.{s}.bias"), vec![shape[0]]));
                }
                v.push((format!("blk.{i}.{s}.weight"), shape));
            };
            t("attn_norm", vec![e], norm_bias);
            t("attn_q", vec![q, e], d.attn_bias);
            t("attn_k", vec![kv, e], d.attn_bias);
            t("attn_v", vec![kv, e], d.attn_bias);
            if d.qk_norm {
                t("attn_q_norm", vec![hd], false);
                t("attn_k_norm", vec![hd], false);
            }
            t("attn_output", vec![e, q], d.attn_out_bias);
            if d.post_norms {
                t("attn_post_norm", vec![e], false);
            }
            t("ffn_norm", vec![e], norm_bias);
            if d.activation.gated() {
                t("ffn_gate", vec![ff, e], d.ffn_bias);
            }
            t("ffn_up", vec![ff, e], d.ffn_bias);
            t("ffn_down", vec![e, ff], d.ffn_bias);
            if d.post_norms {
                t("ffn_post_norm", vec![e], false);
            }
        }
        if norm_bias {
            v.push(("output_norm.bias".into(), vec![e]));
        }
        v.push(("output_norm.weight".into(), vec![e]));
        if !self.tie_embeddings {
            v.push(("output.weight".into(), vec![self.n_vocab as u64, e]));
        }
        v
    }
}

/// Tokenizer material embedded in a `.nib`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerInfo {
    /// The Hugging Face `tokenizer.json` bytes, verbatim.
    pub json: Option<Vec<u8>>,
    /// Jinja chat template (from tokenizer_config.json or GGUF).
    pub chat_template: Option<String>,
    /// Set when `chat_template` is a family's known template standing in
    /// for one the source lacks: that family's name.
    pub chat_template_fallback: Option<String>,
    pub bos_id: Option<u64>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u64>,
}

impl TokenizerInfo {
    pub fn write(&self, m: &mut MetadataBuilder) {
        use keys::*;
        if let Some(j) = &self.json {
            m.set(TOKENIZER_JSON, OwnedValue::Bytes(j.clone()));
        }
        if let Some(t) = &self.chat_template {
            m.set(CHAT_TEMPLATE, OwnedValue::Str(t.clone()));
        }
        if let Some(f) = &self.chat_template_fallback {
            m.set(CHAT_TEMPLATE_FALLBACK, OwnedValue::Str(f.clone()));
        }
        if let Some(b) = self.bos_id {
            m.set(BOS_ID, OwnedValue::U64(b));
        }
        m.set(EOS_IDS, OwnedValue::U64Array(self.eos_ids.clone()));
    }
}

/// Today's UTC date and time as `YYYY-MM-DDTHH:MM:SSZ` (no external crate).
pub fn utc_now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
