//! The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata,
//! rebuilt as a Hugging Face `tokenizer.json` so the runtime's one tokenizer
//! engine (the `tokenizers` crate) runs it and the `.nib` embeds it like any
//! other tokenizer.
//!
//! Both models llama.cpp reads are mapped onto the `tokenizers` BPE model so
//! that the merge order is llama.cpp's:
//!
//! * **`llama`** (SentencePiece-style): llama.cpp repeatedly merges the
//!   adjacent pair whose concatenation is in the vocabulary with the highest
//!   score. That is BPE whose merges are every split `(l, r)` of a normal
//!   token into two vocabulary tokens, ranked by the token's score. Spaces
//!   become `▁` (a normalizer; `add_space_prefix` prepends one), characters
//!   outside the vocabulary fall back to `<0xXX>` byte tokens.
//! * **`gpt2`** (byte-level BPE): the file's merges, bytes mapped to
//!   printable characters, and the pre-tokenizer llama.cpp selects by
//!   `tokenizer.ggml.pre`: its split regexes, applied in sequence
//!   ([`pre_tokenizer_regexes`]).
//!
//! Control tokens become special added tokens and user-defined ones (such as
//! Gemma's runs of spaces and newlines) plain added tokens: both are matched
//! in the raw text before the model runs, as llama.cpp's partition does.
//! `add_bos_token` / `add_eos_token` become the post-processor.
//!
//! Where the file has no chat template, [`fallback_chat_template`] gives the
//! family's known one, as llama.cpp falls back on built-in templates.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use crate::error::{FormatError, Result};
use crate::gguf::{GgufFile, GgufValue};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_BYTE: i32 = 6;

/// Token texts llama.cpp treats as end of generation wherever they occur
/// (its `special_eog_ids` heuristics), besides the ids the file names.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<|eom_id|>",
    "<|return|>",
];

/// What the GGUF's tokenizer metadata turns into.
#[derive(Debug)]
pub struct GgufTokenizer {
    /// A `tokenizer.json` the `tokenizers` crate loads.
    pub json: Vec<u8>,
    pub bos_id: Option<u64>,
    /// Every id that ends generation: EOS, EOT, EOM and the known end-of-turn
    /// tokens of the vocabulary.
    pub eos_ids: Vec<u64>,
}

fn bad(key: &str, why: impl Into<String>) -> FormatError {
    FormatError::BadValue {
        key: key.into(),
        why: why.into(),
    }
}

/// The split regexes llama.cpp applies, in order, for a `tokenizer.ggml.pre`
/// value; `None` for a pre-tokenizer nibble does not implement.
pub fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => &[LLAMA3],
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "hunyuan" => &[QWEN2],
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "phi-2" => &[GPT2],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" => {
            &[r"\p{N}", GPT2]
        }
        "default" => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        _ => return None,
    })
}

/// An array of 4-byte little-endian numbers of GGUF type `elem_type`
/// (5: i32, 6: f32), decoded by `from_le`.
fn array4<T>(
    file: &GgufFile<'_>,
    key: &str,
    elem_type: u32,
    from_le: fn([u8; 4]) -> T,
) -> Result<Option<Vec<T>>> {
    match file.get(key) {
        None => Ok(None),
        Some(GgufValue::Array {
            elem_type: t, raw, ..
        }) if t == elem_type => Ok(Some(
            raw.chunks_exact(4)
                .map(|c| from_le([c[0], c[1], c[2], c[3]]))
                .collect(),
        )),
        Some(_) => Err(bad(
            key,
            if elem_type == 5 {
                "must be an array of i32"
            } else {
                "must be an array of f32"
            },
        )),
    }
}

fn flag(file: &GgufFile<'_>, key: &str) -> Option<bool> {
    match file.get(key)? {
        GgufValue::Bool(b) => Some(b),
        v => v.as_u64().map(|v| v != 0),
    }
}

/// Build the tokenizer of `file`, or `None` when it carries none
/// (`tokenizer.ggml.model` absent). A model or pre-tokenizer nibble does
/// not implement, or inconsistent arrays, are errors naming the key.
pub fn from_gguf(file: &GgufFile<'_>) -> Result<Option<GgufTokenizer>> {
    let Some(model) = file.get("tokenizer.ggml.model") else {
        return Ok(None);
    };
    let model = model
        .as_str()
        .ok_or_else(|| bad("tokenizer.ggml.model", "must be a string"))?;
    let tokens = file.string_array("tokenizer.ggml.tokens").ok_or_else(|| {
        bad(
            "tokenizer.ggml.tokens",
            "missing or not an array of strings",
        )
    })?;
    let n = tokens.len();
    if n == 0 {
        return Err(bad("tokenizer.ggml.tokens", "is empty"));
    }
    let types = array4(file, "tokenizer.ggml.token_type", 5, i32::from_le_bytes)?
        .unwrap_or_else(|| vec![TOKEN_NORMAL; n]);
    if types.len() != n {
        return Err(bad(
            "tokenizer.ggml.token_type",
            format!("has {} entries for {n} tokens", types.len()),
        ));
    }
    let id = |key: &str| -> Result<Option<u64>> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(i) if (i as usize) < n => Ok(Some(i)),
                // llama.cpp writes -1 (as u32::MAX) for "none".
                Some(i) if i == u64::from(u32::MAX) => Ok(None),
                _ => Err(bad(key, format!("is not a token id below {n}"))),
            },
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;

    let (model_json, normalizer, pre_tokenizer, decoder, default_add_bos) = match model {
        "llama" => {
            let scores =
                array4(file, "tokenizer.ggml.scores", 6, f32::from_le_bytes)?.ok_or_else(|| {
                    bad(
                        "tokenizer.ggml.scores",
                        "missing (needed by the llama model)",
                    )
                })?;
            if scores.len() != n {
                return Err(bad(
                    "tokenizer.ggml.scores",
                    format!("has {} entries for {n} tokens", scores.len()),
                ));
            }
            let prefix = flag(file, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let (model, normalizer, decoder) = spm_model(&tokens, &types, &scores, unk, prefix);
            (model, normalizer, Json::Null, decoder, true)
        }
        "gpt2" => {
            let pre = file
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let regexes = pre_tokenizer_regexes(pre).ok_or_else(|| {
                bad(
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer {pre:?} is not implemented by nibble"),
                )
            })?;
            let merges = file.string_array("tokenizer.ggml.merges").ok_or_else(|| {
                bad(
                    "tokenizer.ggml.merges",
                    "missing (needed by the gpt2 model)",
                )
            })?;
            let mut vocab = serde_json::Map::with_capacity(n);
            for (i, t) in tokens.iter().enumerate() {
                vocab.insert((*t).to_string(), json!(i));
            }
            let model = json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            });
            let mut pre_toks: Vec<Json> = regexes
                .iter()
                .map(|r| {
                    json!({"type": "Split", "pattern": {"Regex": r},
                           "behavior": "Isolated", "invert": false})
                })
                .collect();
            pre_toks.push(json!({"type": "ByteLevel", "add_prefix_space": false,
                                 "trim_offsets": false, "use_regex": false}));
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": false,
                                 "trim_offsets": false, "use_regex": false});
            (
                model,
                Json::Null,
                json!({"type": "Sequence", "pretokenizers": pre_toks}),
                decoder,
                false,
            )
        }
        other => {
            return Err(bad(
                "tokenizer.ggml.model",
                format!(
                    "tokenizer model {other:?} is not implemented by nibble (only llama and gpt2)"
                ),
            ))
        }
    };

    let added: Vec<Json> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t == TOKEN_CONTROL})
        })
        .collect();

    let add_bos =
        flag(file, "tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos) && bos.is_some();
    let add_eos = flag(file, "tokenizer.ggml.add_eos_token").unwrap_or(false) && eos.is_some();
    let post = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut special = serde_json::Map::new();
        let mut push = |id: u64, out: &mut Vec<Json>| {
            let t = tokens[id as usize];
            out.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
            special.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
        };
        if add_bos {
            push(bos.unwrap_or(0), &mut single);
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if add_eos {
            push(eos.unwrap_or(0), &mut single);
        }
        let mut pair = single.clone();
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        json!({"type": "TemplateProcessing", "single": single, "pair": pair,
               "special_tokens": special})
    } else {
        Json::Null
    };

    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "model": model_json,
        "post_processor": post,
        "decoder": decoder,
    });
    let json = serde_json::to_vec(&tj).map_err(|e| bad("tokenizer.ggml", e.to_string()))?;

    let mut eos_ids: Vec<u64> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(i) = id(key)? {
            eos_ids.push(i);
        }
    }
    for (i, t) in tokens.iter().enumerate() {
        if types[i] == TOKEN_CONTROL && EOG_TEXTS.contains(t) {
            eos_ids.push(i as u64);
        }
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
    Ok(Some(GgufTokenizer {
        json,
        bos_id: bos,
        eos_ids,
    }))
}

/// The SentencePiece-style vocabulary as a BPE model whose merges follow
/// llama.cpp's order: every split of a normal token into two vocabulary
/// tokens, ranked by the merged token's score (highest first; ties by the
/// halves' ids). Returns the model, the normalizer and the decoder.
fn spm_model(
    tokens: &[&str],
    types: &[i32],
    scores: &[f32],
    unk: Option<u64>,
    add_space_prefix: bool,
) -> (Json, Json, Json) {
    let normal: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TOKEN_NORMAL)
        .map(|(i, t)| (*t, i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if types[i] != TOKEN_NORMAL {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (normal.get(&t[..k]), normal.get(&t[k..])) {
                merges.push((scores[i], i, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges: Vec<Json> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect();
    // Every token stays in the vocabulary (byte tokens for the fallback,
    // control tokens for decoding); duplicate texts keep their first id.
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if !vocab.contains_key(*t) {
            vocab.insert((*t).to_string(), json!(i));
        }
    }
    let has_bytes = types.contains(&TOKEN_BYTE);
    let model = json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": unk.map(|u| tokens[u as usize]),
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": true,
        "byte_fallback": has_bytes,
        "ignore_merges": false,
        "vocab": vocab,
        "merges": merges,
    });
    let mut norms = Vec::new();
    if add_space_prefix {
        norms.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    norms.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    (
        model,
        json!({"type": "Sequence", "normalizers": norms}),
        json!({"type": "Sequence", "decoders": decoders}),
    )
}

/// The chat template llama.cpp would use for a family whose file carries
/// none, with the family's name; `None` where no template is known.
pub fn fallback_chat_template(arch: &str) -> Option<(&'static str, &'static str)> {
    const GEMMA: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";
    const CHATML: &str = "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}";
    const PHI3: &str = "{%- for message in messages -%}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}";
    match arch {
        "gemma" | "gemma2" | "gemma3" => Some(("gemma", GEMMA)),
        "qwen2" | "qwen3" => Some(("chatml", CHATML)),
        "phi3" => Some(("phi3", PHI3)),
        _ => None,
    }
}
