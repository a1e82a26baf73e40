//! GGUF architectures as data: which `general.architecture` values nibble
//! reads, how their `{arch}.*` keys map onto the Hugging Face config keys
//! that [`crate::families::hparams_from_config`] understands (so a family
//! is described once, whichever file it comes from), what llama.cpp fixes
//! in code rather than metadata, and how its tensor names map onto the
//! canonical ones.

use serde_json::{json, Map, Value as Json};

use crate::error::{FormatError, Result};
use crate::families::Transform;
use crate::gguf::{GgufFile, GgufValue};

/// One GGUF architecture nibble reads.
#[derive(Debug)]
pub struct GgufArch {
    /// `general.architecture`.
    pub name: &'static str,
    /// The Hugging Face `model_type` of the same block.
    pub model_type: &'static str,
    /// llama.cpp's converter stored q/k rows in the interleaved RoPE order
    /// (its llama-family converter only): undone at import.
    pub permuted_qk: bool,
    /// Config keys llama.cpp fixes in code for this architecture (not in
    /// the metadata), as `hparams_from_config` reads them.
    pub fixed: fn(&GgufFile<'_>, &mut Map<String, Json>),
    /// Canonical roles stored under another llama.cpp name or fused with
    /// others: (canonical role, llama.cpp role, how to get it back). Roles
    /// not listed are stored under their canonical name, as they are.
    pub roles: &'static [(&'static str, &'static str, Transform)],
}

/// llama.cpp's fused `attn_qkv` (rows q | k | v; its GPT-NeoX converter
/// already reorders the per-head interleaved rows this way).
const FUSED_QKV: [(&str, &str, Transform); 3] = [
    ("attn_q", "attn_qkv", Transform::FusedQkv(0)),
    ("attn_k", "attn_qkv", Transform::FusedQkv(1)),
    ("attn_v", "attn_qkv", Transform::FusedQkv(2)),
];

/// Phi-3: fused qkv, and `ffn_up` holding gate | up.
const PHI3_ROLES: [(&str, &str, Transform); 5] = [
    FUSED_QKV[0],
    FUSED_QKV[1],
    FUSED_QKV[2],
    ("ffn_gate", "ffn_up", Transform::FusedGateUp(0)),
    ("ffn_up", "ffn_up", Transform::FusedGateUp(1)),
];

/// GPT-2: fused qkv and a learned position table named `position_embd`.
const GPT2_ROLES: [(&str, &str, Transform); 4] = [
    FUSED_QKV[0],
    FUSED_QKV[1],
    FUSED_QKV[2],
    ("pos_embd", "position_embd", Transform::Plain),
];

/// GPT-NeoX: the residual layout is a boolean key.
fn gptneox_fixed(f: &GgufFile<'_>, c: &mut Map<String, Json>) {
    if let Some(GgufValue::Bool(b)) = f.get("gptneox.use_parallel_residual") {
        c.insert("use_parallel_residual".into(), json!(b));
    }
}

/// GPT-2's MLP is the tanh GELU (`gelu_new`), not in the metadata.
fn gpt2_fixed(_: &GgufFile<'_>, c: &mut Map<String, Json>) {
    c.insert("activation_function".into(), json!("gelu_new"));
}

fn no_fixed(_: &GgufFile<'_>, _: &mut Map<String, Json>) {}

/// Gemma's MLP is GeGLU with the tanh GELU (not in the metadata).
fn gemma_fixed(_: &GgufFile<'_>, c: &mut Map<String, Json>) {
    c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
}

/// Gemma 2 and 3 scale queries by 1/√(n_embd / n_head) in their 27B models
/// and by 1/√head_dim otherwise; llama.cpp tells the 27B ones by their
/// layer count (46 for Gemma 2, 62 for Gemma 3).
fn gemma_query_scale(c: &mut Map<String, Json>, layers_27b: u64) {
    let get = |k: &str| c.get(k).and_then(Json::as_u64);
    let (n_layer, n_embd, n_head) = (
        get("num_hidden_layers"),
        get("hidden_size"),
        get("num_attention_heads"),
    );
    let scalar = match (n_layer, n_embd, n_head) {
        (Some(l), Some(e), Some(h)) if l == layers_27b && h > 0 => Some(e / h),
        _ => get("head_dim"),
    };
    if let Some(s) = scalar {
        c.insert("query_pre_attn_scalar".into(), json!(s));
    }
}

fn gemma2_fixed(f: &GgufFile<'_>, c: &mut Map<String, Json>) {
    gemma_fixed(f, c);
    gemma_query_scale(c, 46);
}

/// Gemma 3 (llama.cpp `LLM_ARCH_GEMMA3`): 5 sliding-window layers to 1
/// global, the local layers' RoPE base 10 000.
fn gemma3_fixed(f: &GgufFile<'_>, c: &mut Map<String, Json>) {
    gemma_fixed(f, c);
    gemma_query_scale(c, 62);
    c.insert("sliding_window_pattern".into(), json!(6));
    c.insert("rope_local_base_freq".into(), json!(10000.0));
}

/// Every GGUF architecture nibble reads.
pub const GGUF_ARCHS: &[GgufArch] = &[
    GgufArch {
        name: "llama",
        model_type: "llama",
        permuted_qk: true,
        fixed: no_fixed,
        roles: &[],
    },
    GgufArch {
        name: "qwen2",
        model_type: "qwen2",
        permuted_qk: false,
        fixed: no_fixed,
        roles: &[],
    },
    GgufArch {
        name: "qwen3",
        model_type: "qwen3",
        permuted_qk: false,
        fixed: no_fixed,
        roles: &[],
    },
    GgufArch {
        name: "gemma",
        model_type: "gemma",
        permuted_qk: false,
        fixed: gemma_fixed,
        roles: &[],
    },
    GgufArch {
        name: "gemma2",
        model_type: "gemma2",
        permuted_qk: false,
        fixed: gemma2_fixed,
        roles: &[],
    },
    GgufArch {
        name: "gemma3",
        model_type: "gemma3_text",
        permuted_qk: false,
        fixed: gemma3_fixed,
        roles: &[],
    },
    GgufArch {
        name: "phi3",
        model_type: "phi3",
        permuted_qk: false,
        fixed: no_fixed,
        roles: &PHI3_ROLES,
    },
    GgufArch {
        name: "gpt2",
        model_type: "gpt2",
        permuted_qk: false,
        fixed: gpt2_fixed,
        roles: &GPT2_ROLES,
    },
    GgufArch {
        name: "gptneox",
        model_type: "gpt_neox",
        permuted_qk: false,
        fixed: gptneox_fixed,
        roles: &FUSED_QKV,
    },
];

/// `{arch}.*` metadata → config key, for the keys that carry a number.
const KEYS: &[(&str, &str)] = &[
    ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.key_length", "head_dim"),
    ("feed_forward_length", "intermediate_size"),
    ("context_length", "max_position_embeddings"),
    ("rope.freq_base", "rope_theta"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("attention.layer_norm_epsilon", "layer_norm_eps"),
    ("attention.sliding_window", "sliding_window"),
    ("attn_logit_softcapping", "attn_logit_softcapping"),
    ("final_logit_softcapping", "final_logit_softcapping"),
];

/// Metadata that changes the numbers and that nibble does not implement
/// for GGUF input, with what it is.
const REFUSED: &[(&str, &str)] = &[
    (
        "rope.scaling.original_context_length",
        "long-context RoPE factors (LongRoPE) are not supported",
    ),
    (
        "expert_count",
        "mixture-of-experts models are not supported",
    ),
    (
        "rope.scaling.attn_factor",
        "RoPE attention factor (YaRN) is not supported",
    ),
];

/// Where llama.cpp keeps the canonical tensor `canonical` in a file of
/// `arch`: its name there, and how the canonical tensor is taken from it.
pub fn gguf_tensor(arch: &GgufArch, canonical: &str) -> (String, Transform) {
    let renamed = || {
        canonical
            .replace(".attn_post_norm.", ".post_attention_norm.")
            .replace(".ffn_post_norm.", ".post_ffw_norm.")
    };
    let Some((stem, kind)) = canonical.rsplit_once('.') else {
        return (renamed(), Transform::Plain);
    };
    let (prefix, role) = match stem.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
        Some((i, role)) => (format!("blk.{i}."), role),
        None => (String::new(), stem),
    };
    match arch.roles.iter().find(|(c, _, _)| *c == role) {
        Some(&(_, stored, t)) => (format!("{prefix}{stored}.{kind}"), t),
        None => (renamed(), Transform::Plain),
    }
}

/// The architecture of `file` and a Hugging Face config describing its
/// block, built from its metadata.
pub fn config_from_gguf(file: &GgufFile<'_>) -> Result<(&'static GgufArch, Json)> {
    let name = file
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| FormatError::MissingKey {
            key: "general.architecture".into(),
        })?;
    let arch = GGUF_ARCHS
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| FormatError::UnsupportedArchitecture { arch: name.into() })?;
    let mut c = Map::new();
    c.insert("model_type".into(), json!(arch.model_type));
    for &(key, why) in REFUSED {
        let k = format!("{name}.{key}");
        if file
            .get(&k)
            .is_some_and(|v| v.as_f64().is_none_or(|x| x != 0.0))
        {
            return Err(FormatError::BadConfig {
                why: format!("'{k}': {why}"),
            });
        }
    }
    for &(key, hf) in KEYS {
        let k = format!("{name}.{key}");
        match file.get(&k) {
            None => {}
            Some(GgufValue::Array { .. }) => {
                return Err(FormatError::BadConfig {
                    why: format!("'{k}' varies per layer, which nibble does not implement"),
                })
            }
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| FormatError::BadValue {
                    key: k.clone(),
                    why: format!("{v:?} is not a number"),
                })?;
                let n = if x.fract() == 0.0 && x >= 0.0 && !hf.contains("eps") && hf != "rope_theta"
                {
                    json!(x as u64)
                } else {
                    json!(x)
                };
                c.insert(hf.into(), n);
            }
        }
    }
    for key in [
        "embedding_length",
        "block_count",
        "attention.head_count",
        "feed_forward_length",
    ] {
        if file.get(&format!("{name}.{key}")).is_none() {
            return Err(FormatError::MissingKey {
                key: format!("{name}.{key}"),
            });
        }
    }
    // Partial rotary: fewer rotated dimensions than the head has.
    let head_dim = match (
        c.get("head_dim"),
        c.get("hidden_size"),
        c.get("num_attention_heads"),
    ) {
        (Some(h), _, _) => h.as_u64(),
        (None, Some(e), Some(h)) => e
            .as_u64()
            .zip(h.as_u64())
            .and_then(|(e, h)| e.checked_div(h)),
        _ => None,
    };
    if let (Some(rd), Some(hd)) = (
        file.get(&format!("{name}.rope.dimension_count"))
            .and_then(|v| v.as_u64()),
        head_dim,
    ) {
        if rd != hd && hd > 0 {
            c.insert("partial_rotary_factor".into(), json!(rd as f64 / hd as f64));
        }
    }
    // RoPE scaling written as metadata; llama.cpp's `rope_freqs` tensor
    // (Llama 3.1's per-frequency factors) is not read.
    if let Some(t) = file
        .get(&format!("{name}.rope.scaling.type"))
        .and_then(|v| v.as_str())
    {
        if t != "none" {
            let factor = file
                .get(&format!("{name}.rope.scaling.factor"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1.0);
            c.insert(
                "rope_scaling".into(),
                json!({ "rope_type": t, "factor": factor }),
            );
        }
    }
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(FormatError::BadConfig {
            why: "tensor 'rope_freqs.weight' (per-frequency RoPE factors, e.g. Llama 3.1's \
                  scaling) is not supported for GGUF input; import the Hugging Face folder"
                .into(),
        });
    }
    let vocab = match file
        .get(&format!("{name}.vocab_size"))
        .and_then(|v| v.as_u64())
    {
        Some(v) => Some(v),
        None => file
            .tensor("token_embd.weight")
            .and_then(|t| t.ne.get(1).copied()),
    };
    if let Some(v) = vocab {
        c.insert("vocab_size".into(), json!(v));
    }
    c.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor("output.weight").is_none()),
    );
    (arch.fixed)(file, &mut c);
    Ok((arch, Json::Object(c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{Activation, Positions};
    use crate::families::hparams_from_config;
    use crate::gguf::{GgmlType, GgufTensor};

    fn file<'a>(arch: &'a str, extra: &[(&'a str, GgufValue<'a>)]) -> GgufFile<'a> {
        let mut kv = vec![
            ("general.architecture", GgufValue::Str(arch)),
            ("A.embedding_length", GgufValue::U32(640)),
            ("A.block_count", GgufValue::U32(18)),
            ("A.attention.head_count", GgufValue::U32(4)),
            ("A.attention.head_count_kv", GgufValue::U32(1)),
            ("A.attention.key_length", GgufValue::U32(256)),
            ("A.feed_forward_length", GgufValue::U32(2048)),
            ("A.context_length", GgufValue::U32(32768)),
            ("A.rope.freq_base", GgufValue::F32(1e6)),
            ("A.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-6)),
            ("A.attention.sliding_window", GgufValue::U32(512)),
        ];
        for &(k, v) in extra {
            match kv.iter_mut().find(|(have, _)| *have == k) {
                Some(slot) => slot.1 = v,
                None => kv.push((k, v)),
            }
        }
        // Keys are written with the architecture's name in place of "A".
        let kv = kv
            .into_iter()
            .map(|(k, v)| {
                let k: &'a str = match k.strip_prefix("A.") {
                    Some(rest) => Box::leak(format!("{arch}.{rest}").into_boxed_str()),
                    None => k,
                };
                (k, v)
            })
            .collect();
        let embd = GgufTensor {
            name: "token_embd.weight",
            ggml_type: GgmlType::F32,
            ne: vec![640, 1000],
            data: &[],
        };
        GgufFile {
            version: 3,
            kv,
            tensors: vec![embd],
            alignment: 32,
        }
    }

    /// Gemma 3 as llama.cpp runs it: 5 local (window 512, RoPE base 10 000)
    /// to 1 global layer (base 10⁶), queries scaled by 1/√256, GeGLU with the
    /// tanh GELU, tied head, q/k not permuted.
    #[test]
    fn gemma3_gets_what_llama_cpp_fixes_in_code() {
        let (arch, c) = config_from_gguf(&file("gemma3", &[])).unwrap();
        assert!(!arch.permuted_qk);
        let (hp, _) = hparams_from_config(&c).unwrap();
        let d = &hp.desc;
        let windows: Vec<usize> = d.layers.iter().map(|l| l.window).collect();
        assert_eq!(&windows[..6], &[512, 512, 512, 512, 512, 0]);
        assert!(d.layers[0].local_rope && !d.layers[5].local_rope);
        assert_eq!((hp.rope_theta, d.rope_theta_local), (1e6, 10000.0));
        assert_eq!(d.attn_scale, 1.0 / 16.0);
        assert_eq!(d.activation, Activation::GeGluTanh);
        assert_eq!(d.positions, Positions::Rope);
        assert!(d.qk_norm && d.post_norms && hp.tie_embeddings);
        assert_eq!((hp.n_vocab, hp.head_dim, hp.n_head_kv), (1000, 256, 1));
    }

    #[test]
    fn llama_is_permuted_and_qwen2_has_biases() {
        let (arch, _) = config_from_gguf(&file("llama", &[])).unwrap();
        assert!(arch.permuted_qk);
        let (arch, c) = config_from_gguf(&file("qwen2", &[])).unwrap();
        assert!(!arch.permuted_qk);
        let (hp, _) = hparams_from_config(&c).unwrap();
        assert!(hp.desc.attn_bias && hp.desc.activation == Activation::SwiGlu);
    }

    /// What nibble cannot run is an error naming it, never a default.
    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let err = |f: GgufFile<'_>| config_from_gguf(&f).unwrap_err().to_string();
        assert!(err(file("phi2", &[])).contains("'phi2'"));
        let moe = err(file("qwen2", &[("A.expert_count", GgufValue::U32(8))]));
        assert!(
            moe.contains("qwen2.expert_count") && moe.contains("mixture-of-experts"),
            "{moe}"
        );
        let per_layer = err(file(
            "llama",
            &[(
                "A.attention.head_count",
                GgufValue::Array {
                    elem_type: 4,
                    count: 0,
                    raw: &[],
                },
            )],
        ));
        assert!(per_layer.contains("varies per layer"), "{per_layer}");
        let mut f = file("llama", &[]);
        f.tensors.push(GgufTensor {
            name: "rope_freqs.weight",
            ggml_type: GgmlType::F32,
            ne: vec![64],
            data: &[],
        });
        assert!(err(f).contains("rope_freqs"));
        let mut f = file("llama", &[]);
        f.kv.retain(|(k, _)| *k != "llama.feed_forward_length");
        assert!(err(f).contains("llama.feed_forward_length"));
    }
}
