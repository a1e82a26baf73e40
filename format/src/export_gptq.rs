//! Export a `.nib` quantized with integer groups (nibble's GPTQ or RTN) as a
//! GPTQ checkpoint folder that transformers + GPTQModel load unchanged:
//! `config.json` with its `quantization_config`, `model.safetensors`
//! (sharded above a size), tokenizer files and chat template.
//!
//! Why: GPTQ is second-order work a CPU can do (nibble's quantizer), while
//! GPU servers (vLLM, transformers) read this checkpoint layout. Only what
//! the layout says exactly is written: codes, scales and zero points are
//! taken over as they are ([`GptqLinear::from_groups`]), act-order becomes
//! `g_idx`, per-module bit widths and group sizes become GPTQModel's
//! `dynamic` rules, and a linear weight left in float gets a `-:` rule.
//! A packed type GPTQ has no form for (a GGUF block, `Q4GM`) is an error.
//! The architecture is written as a `config.json` that is read back and must
//! give exactly the model's hyper-parameters, or the export is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use crate::arch::RopeScaling;
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::families::Transform;
use crate::gptq_checkpoint::GptqLinear;
use crate::hparams::{keys, HParams};
use crate::storage::NibFile;

/// How zero points are stored (`checkpoint_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// "gptq" for a symmetric model (every zero the middle code: the layout
    /// every GPTQ loader reads), "gptq_v2" for an asymmetric one: GPTQModel
    /// refuses asymmetric v1 files it did not write itself, because old
    /// AutoGPTQ's v1 packing corrupted zero points of 0.
    Auto,
    /// "gptq" (v1): zeros stored minus one.
    Gptq,
    /// "gptq_v2": zeros stored as they are.
    GptqV2,
}

/// Options of [`export_gptq`].
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Start a new `model-0000i-of-0000n.safetensors` shard when a shard
    /// would grow past this many bytes.
    pub max_shard_bytes: u64,
    pub checkpoint_format: CheckpointFormat,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            max_shard_bytes: 4 << 30,
            checkpoint_format: CheckpointFormat::Auto,
        }
    }
}

/// Whether every group header of a packed integer tensor holds the middle
/// code as its zero point (a symmetric grid).
fn symmetric(dtype: DType, group_size: usize, cols: usize, data: &[u8]) -> bool {
    let Some(bits) = dtype.quant_bits() else {
        return false;
    };
    let mid = 1u8 << (bits - 1);
    let group = |n: usize| {
        crate::dtype::GROUP_HEADER + n.div_ceil(32) * crate::dtype::sub_block_bytes(bits)
    };
    let row_bytes = crate::dtype::row_bytes(bits, cols, group_size);
    data.chunks_exact(row_bytes).all(|row| {
        let mut p = 0;
        (0..cols.div_ceil(group_size)).all(|g| {
            let z = row[p + 2];
            p += group(group_size.min(cols - g * group_size));
            z == mid
        })
    })
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    /// Linear layers written as GPTQ tensors.
    pub quantized: usize,
    /// Tensors written in float.
    pub float: usize,
    /// Files written, in the output folder.
    pub files: Vec<String>,
    /// Bytes of the safetensors shards.
    pub weight_bytes: u64,
    /// The `quantization_config` written.
    pub quantization_config: Json,
}

fn cannot(why: impl Into<String>) -> FormatError {
    FormatError::CannotExport { why: why.into() }
}

/// The `config.json` of a llama-like model (llama, mistral, qwen2, qwen3)
/// with the hyper-parameters `hp`, checked by reading it back.
pub fn hf_config(hp: &HParams, bos: Option<u64>, eos: &[u64]) -> Result<Json> {
    let class = match hp.arch.as_str() {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        other => {
            return Err(cannot(format!(
                "architecture '{other}': GPTQ export writes the config.json of llama, mistral, qwen2 and qwen3 models"
            )))
        }
    };
    let d = &hp.desc;
    let mut c = json!({
        "architectures": [class],
        "model_type": hp.arch,
        "vocab_size": hp.n_vocab,
        "hidden_size": hp.n_embd,
        "intermediate_size": hp.n_ff,
        "num_hidden_layers": hp.n_layer,
        "num_attention_heads": hp.n_head,
        "num_key_value_heads": hp.n_head_kv,
        "head_dim": hp.head_dim,
        "max_position_embeddings": hp.n_ctx_train,
        "rms_norm_eps": hp.norm_eps,
        "rope_theta": hp.rope_theta,
        "tie_word_embeddings": hp.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float16",
        "dtype": "float16",
        "use_cache": true,
    });
    if hp.arch != "qwen2" {
        c["attention_bias"] = json!(d.attn_bias);
    }
    if hp.arch == "llama" {
        c["mlp_bias"] = json!(d.ffn_bias);
    }
    match d.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            c["rope_scaling"] = json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_ctx,
        } => {
            c["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_ctx,
            })
        }
    }
    let windows: Vec<usize> = d.layers.iter().map(|l| l.window).collect();
    if let Some(&w) = windows.iter().find(|&&w| w > 0) {
        c["sliding_window"] = json!(w);
        if hp.arch.starts_with("qwen") {
            c["use_sliding_window"] = json!(true);
            c["max_window_layers"] = json!(windows.iter().position(|&x| x > 0).unwrap_or(0));
        }
        if windows.contains(&0) && !hp.arch.starts_with("qwen") {
            c["layer_types"] = json!(windows
                .iter()
                .map(|&x| if x > 0 {
                    "sliding_attention"
                } else {
                    "full_attention"
                })
                .collect::<Vec<_>>());
        }
    } else if hp.arch.starts_with("qwen") {
        c["use_sliding_window"] = json!(false);
    }
    if let Some(b) = bos {
        c["bos_token_id"] = json!(b);
    }
    match eos {
        [] => {}
        [e] => c["eos_token_id"] = json!(e),
        many => c["eos_token_id"] = json!(many),
    }
    let (back, _) = crate::families::hparams_from_config(&c)?;
    if &back != hp {
        return Err(cannot(format!(
            "this model's hyper-parameters have no exact config.json of model_type '{}' \
             (read back: {back:?}; the model: {hp:?})",
            hp.arch
        )));
    }
    Ok(c)
}

/// One tensor to write: name, safetensors type, shape, bytes.
struct Out {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    }
}

/// A U32 tensor's values.
fn u32_tensor(view: &crate::nib::NibView<'_>, name: &str) -> Option<Vec<u32>> {
    view.tensor(name).map(|p| {
        p.data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// For `ffn_gate`/`ffn_up` tensors (weights, biases) of a layer whose
/// hidden units nibble stores in `ffn_down`'s act-order (`blk.N.ffn_down.fold`,
/// stored unit j = original unit `fold[j]`): the stored row of each
/// original unit, so the checkpoint lists them in the original order and
/// adapters or tools made for the original model fit it.
fn unfolded_rows(view: &crate::nib::NibView<'_>, name: &str) -> Result<Option<Vec<usize>>> {
    let Some((layer, role)) = name.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
        return Ok(None);
    };
    if !(role.starts_with("ffn_gate.") || role.starts_with("ffn_up.")) {
        return Ok(None);
    }
    let fold_name = format!("blk.{layer}.ffn_down.fold");
    let Some(fold) = u32_tensor(view, &fold_name) else {
        return Ok(None);
    };
    Ok(Some(inverse_permutation(&fold).ok_or_else(|| {
        FormatError::BadValue {
            key: fold_name,
            why: "is not a permutation".into(),
        }
    })?))
}

/// `inv[p[j]] = j`, or `None` when `p` is not a permutation of `0..len`.
pub fn inverse_permutation(p: &[u32]) -> Option<Vec<usize>> {
    let mut inv = vec![usize::MAX; p.len()];
    for (j, &u) in p.iter().enumerate() {
        let slot = inv.get_mut(u as usize)?;
        if *slot != usize::MAX {
            return None;
        }
        *slot = j;
    }
    Some(inv)
}

/// A float tensor's bytes for the checkpoint: F32 values (nibble keeps
/// norms in F32) as F16 where every value is exactly an f16 (the
/// checkpoint's `torch_dtype`), else as they are.
fn narrowest_exact(dtype: DType, data: &[u8]) -> (safetensors::Dtype, Vec<u8>) {
    if dtype == DType::F32 {
        let values: Vec<f32> = crate::dtype::decode_f32(dtype, data).expect("float");
        let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        if halves.iter().zip(&values).all(|(h, &v)| h.to_f32() == v) {
            let bytes = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
            return (safetensors::Dtype::F16, bytes);
        }
    }
    (st_dtype(dtype), data.to_vec())
}

/// The bits and group size (`-1`: a whole row) of one exported module.
type Scheme = (u32, i64);

/// Whether groups of `a` and of `b` columns (`-1`: a whole row) cut a row of
/// `cols` the same way.
fn same_groups(a: i64, b: i64, cols: usize) -> bool {
    let whole = |g: i64| g < 0 || g as usize >= cols;
    a == b || (whole(a) && whole(b))
}

/// Write `file` as a GPTQ checkpoint folder `out` (created; it must not
/// exist, or be an empty folder). Files are written into a sibling
/// temporary folder renamed into place at the end, so a failed export
/// leaves nothing behind.
pub fn export_gptq(
    file: &NibFile,
    out: &Path,
    opts: &ExportOptions,
    progress: crate::import::Progress<'_>,
) -> Result<ExportReport> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| FormatError::io(out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(FormatError::BadOutput {
                path: out.to_path_buf(),
                why: "already exists (the export writes a new folder; remove it or name another)"
                    .into(),
            });
        }
    }
    let view = file.view()?;
    let m = &view.metadata;
    let hp = HParams::read(m)?;
    let family = crate::families::family(&hp.arch)
        .ok_or_else(|| cannot(format!("architecture '{}'", hp.arch)))?;
    let bos = m.opt_u64(keys::BOS_ID)?;
    let eos = m.opt_u64_array(keys::EOS_IDS)?.unwrap_or_default();
    let mut config = hf_config(&hp, bos, &eos)?;
    let specs = hp.tensor_specs();
    let v1 = match opts.checkpoint_format {
        CheckpointFormat::Gptq => true,
        CheckpointFormat::GptqV2 => false,
        CheckpointFormat::Auto => specs.iter().all(|(name, shape)| {
            view.tensor(name).is_none_or(|t| {
                !matches!(t.dtype, DType::Q2G | DType::Q3G | DType::Q4G | DType::Q8G)
                    || shape.len() != 2
                    || symmetric(t.dtype, t.quant_param as usize, shape[1] as usize, t.data)
            })
        }),
    };

    // Tensors, each checked and converted.
    let mut tensors = Vec::new();
    // Per exported module: its scheme and its input width.
    let mut schemes: BTreeMap<String, (Scheme, usize)> = BTreeMap::new();
    let mut float_linears = Vec::new();
    let (mut sym, mut act_order) = (true, false);
    for (i, (name, shape)) in specs.iter().enumerate() {
        progress(i, specs.len(), name);
        let t = view
            .tensor(name)
            .ok_or_else(|| FormatError::MissingTensor { name: name.clone() })?;
        let (hf, transform) = crate::families::locate(family, name)
            .ok_or_else(|| cannot(format!("no Hugging Face name for '{name}'")))?;
        if transform != Transform::Plain {
            return Err(cannot(format!(
                "'{name}' is stored {transform:?} in this family's checkpoints"
            )));
        }
        let stem = hf.trim_end_matches(".weight").to_string();
        let is_linear = shape.len() == 2 && name != "token_embd.weight";
        match t.dtype {
            DType::Q2G | DType::Q3G | DType::Q4G | DType::Q8G if is_linear => {
                let stem_name = name.trim_end_matches(".weight");
                // A folded ffn_down reads its hidden units in `.fold` order:
                // that order is its input permutation in the checkpoint.
                let perm = u32_tensor(&view, &format!("{stem_name}.perm"))
                    .or_else(|| u32_tensor(&view, &format!("{stem_name}.fold")));
                let (rows, cols) = (shape[0] as usize, shape[1] as usize);
                let gs = t.quant_param as usize;
                let mut lin = GptqLinear::from_groups(
                    name,
                    t.dtype,
                    gs,
                    (rows, cols),
                    t.data,
                    perm.as_deref(),
                )?;
                if let Some(inverse) = unfolded_rows(&view, name)? {
                    lin = lin.select_rows(&inverse);
                }
                if lin.bits == 3 && (rows % 32 != 0 || cols % 32 != 0) {
                    return Err(cannot(format!(
                        "'{name}' ({rows}×{cols}) is 3-bit: GPTQ packs 3-bit codes 32 to 3 words, so both \
                         dimensions must be multiples of 32"
                    )));
                }
                let mid = 1u8 << (lin.bits - 1);
                sym &= lin.zeros.iter().all(|&z| z == mid);
                act_order |= perm.is_some();
                let group = if gs >= cols { -1 } else { gs as i64 };
                schemes.insert(stem.clone(), ((lin.bits, group), cols));
                let n_groups = lin.scales.len() / rows;
                let (qweight, qzeros, scales, g_idx) = lin.pack(v1);
                use safetensors::Dtype as S;
                let qw_rows = qweight.len() / 4 / rows;
                let qz_cols = qzeros.len() / 4 / n_groups;
                for (suffix, dtype, shape, bytes) in [
                    ("qweight", S::I32, vec![qw_rows, rows], qweight),
                    ("qzeros", S::I32, vec![n_groups, qz_cols], qzeros),
                    ("scales", S::F16, vec![n_groups, rows], scales),
                    ("g_idx", S::I32, vec![cols], g_idx),
                ] {
                    tensors.push(Out {
                        name: format!("{stem}.{suffix}"),
                        dtype,
                        shape,
                        bytes,
                    });
                }
            }
            DType::F32 | DType::F16 | DType::BF16 => {
                if is_linear {
                    float_linears.push(stem.clone());
                }
                let (dtype, mut bytes) = narrowest_exact(t.dtype, t.data);
                if let Some(inverse) = unfolded_rows(&view, name)? {
                    let row = bytes.len() / shape[0] as usize;
                    bytes = inverse
                        .iter()
                        .flat_map(|&j| bytes[j * row..(j + 1) * row].to_vec())
                        .collect();
                }
                tensors.push(Out {
                    name: hf,
                    dtype,
                    shape: shape.iter().map(|&d| d as usize).collect(),
                    bytes,
                });
            }
            DType::Q2G | DType::Q3G | DType::Q4G | DType::Q8G => {
                // The token embedding: GPTQ does not quantize it; its exact
                // dequantized values (scale · small integer) as f32.
                let (rows, cols) = (shape[0] as usize, shape[1] as usize);
                let row_bytes = t.data.len() / rows;
                let mut w = vec![0f32; rows * cols];
                for (r, out) in w.chunks_exact_mut(cols).enumerate() {
                    crate::quant::dequantize(
                        t.dtype,
                        t.quant_param as usize,
                        &t.data[r * row_bytes..(r + 1) * row_bytes],
                        out,
                    );
                }
                tensors.push(Out {
                    name: hf,
                    dtype: safetensors::Dtype::F32,
                    shape: vec![rows, cols],
                    bytes: bytemuck::cast_slice(&w).to_vec(),
                });
            }
            other => {
                return Err(cannot(format!(
                    "'{name}' is {other}: GPTQ checkpoints hold integer groups with zero points \
                     (nibble's Q2G/Q3G/Q4G/Q8G, from `nibble quantize`), not this type"
                )))
            }
        }
    }
    progress(specs.len(), specs.len(), "");
    if schemes.is_empty() {
        return Err(cannot(
            "no linear weight is quantized: quantize the model with `nibble quantize` first",
        ));
    }

    // The global scheme: what `nibble quantize` recorded, else the most
    // common one; modules it does not describe get `dynamic` rules.
    let recorded = match (
        m.opt_u64(keys::QUANT_BITS)?,
        m.opt_u64(keys::QUANT_GROUP_SIZE)?,
    ) {
        (Some(b), Some(g)) => Some((b as u32, if g == 0 { -1 } else { g as i64 })),
        _ => None,
    };
    let mut counts: BTreeMap<Scheme, usize> = BTreeMap::new();
    for (k, (s, _)) in &schemes {
        if k != "lm_head" {
            *counts.entry(*s).or_default() += 1;
        }
    }
    let (bits, group_size) = recorded
        .filter(|(b, _)| counts.keys().any(|(x, _)| x == b))
        .or_else(|| counts.iter().max_by_key(|(_, &n)| n).map(|(s, _)| *s))
        .unwrap_or(schemes.values().next().expect("non-empty").0);
    let escape = |s: &str| format!("^{}$", regex::escape(s));
    let mut dynamic = serde_json::Map::new();
    for (stem, &((b, g), cols)) in &schemes {
        if b != bits || !same_groups(g, group_size, cols) {
            dynamic.insert(
                format!("+:{}", escape(stem)),
                json!({"bits": b, "group_size": g}),
            );
        }
    }
    for stem in &float_linears {
        if stem != "lm_head" {
            dynamic.insert(format!("-:{}", escape(stem)), json!({}));
        }
    }
    // What nibble knows of how the codes were made (absent keys: unknown,
    // e.g. a re-exported checkpoint).
    let mut meta = json!({
        "quantizer": [format!("nibble:{}", env!("CARGO_PKG_VERSION"))],
    });
    if let Some(method) = m.opt_str(keys::QUANT_METHOD)? {
        meta["nibble_method"] = json!(method);
    }
    for (key, name) in [
        (keys::QUANT_STATIC_GROUPS, "static_groups"),
        (keys::QUANT_TRUE_SEQUENTIAL, "true_sequential"),
    ] {
        if let Some(v) = m.opt_bool(key)? {
            meta[name] = json!(v);
        }
    }
    if let Some(d) = m.opt_f64(keys::QUANT_DAMP)? {
        meta["damp_percent"] = json!(d);
    }
    for (key, name) in [
        (keys::QUANT_CALIB_FILE, "calibration_file"),
        (keys::QUANT_CALIB_SHA256, "calibration_sha256"),
    ] {
        if let Some(v) = m.opt_str(key)? {
            meta[name] = json!(v);
        }
    }
    for (key, name) in [
        (keys::QUANT_NSAMPLES, "calibration_samples"),
        (keys::QUANT_SEQLEN, "calibration_seqlen"),
    ] {
        if let Some(v) = m.opt_u64(key)? {
            meta[name] = json!(v);
        }
    }
    let format = if v1 { "gptq" } else { "gptq_v2" };
    let mut q = json!({
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "lm_head": schemes.contains_key("lm_head"),
        "quant_method": "gptq",
        "checkpoint_format": format,
        "format": format,
        "method": "gptq",
        "pack_dtype": "int32",
    });
    for k in ["true_sequential", "static_groups"] {
        if let Some(v) = meta.get(k) {
            q[k] = v.clone();
        }
    }
    q["meta"] = meta;
    if let Some(d) = m.opt_f64(keys::QUANT_DAMP)? {
        q["damp_percent"] = json!(d);
    }
    if !dynamic.is_empty() {
        q["dynamic"] = Json::Object(dynamic);
    }
    config["quantization_config"] = q.clone();

    // Write everything into a temporary sibling, then rename it into place.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let tmp = parent.join(format!(".{base}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
    let result = write_folder(&tmp, &config, &q, tensors, m, hp.n_ctx_train, opts).and_then(
        |(files, weight_bytes)| {
            if out.exists() {
                std::fs::remove_dir(out).map_err(|e| FormatError::io(out, e))?;
            }
            std::fs::rename(&tmp, out).map_err(|e| FormatError::io(out, e))?;
            Ok((files, weight_bytes))
        },
    );
    let (files, weight_bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    Ok(ExportReport {
        quantized: schemes.len(),
        float: specs.len() - schemes.len(),
        files,
        weight_bytes,
        quantization_config: q,
    })
}

/// The files of the folder, written into `dir`: (names, weight bytes).
fn write_folder(
    dir: &Path,
    config: &Json,
    quant: &Json,
    tensors: Vec<Out>,
    m: &crate::nib::Metadata<'_>,
    n_ctx: usize,
    opts: &ExportOptions,
) -> Result<(Vec<String>, u64)> {
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| FormatError::BadOutput {
            path: p.clone(),
            why: e.to_string(),
        })?;
        Ok(p)
    };
    let pretty = |v: &Json| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    let mut files = vec![
        "config.json".to_string(),
        "quantize_config.json".to_string(),
    ];
    write("config.json", &pretty(config))?;
    write("quantize_config.json", &pretty(quant))?;

    // Shards.
    let mut shards: Vec<Vec<Out>> = vec![Vec::new()];
    let mut size = 0u64;
    let total: u64 = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    for t in tensors {
        let n = t.bytes.len() as u64;
        if size > 0 && size + n > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard").push(t);
    }
    let n_shards = shards.len();
    let mut weight_map = serde_json::Map::new();
    let st_meta: Option<std::collections::HashMap<String, String>> =
        Some([("format".to_string(), "pt".to_string())].into());
    for (k, shard) in shards.iter().enumerate() {
        let fname = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", k + 1)
        };
        let views = shard
            .iter()
            .map(|t| {
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                    .map(|v| (t.name.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let path = dir.join(&fname);
        safetensors::serialize_to_file(views, st_meta.clone(), &path).map_err(|e| {
            FormatError::BadOutput {
                path: path.clone(),
                why: e.to_string(),
            }
        })?;
        // The same permissions as the other files (the writer may create it 0600).
        if let Ok(md) = std::fs::metadata(dir.join("config.json")) {
            let _ = std::fs::set_permissions(&path, md.permissions());
        }
        for t in shard {
            weight_map.insert(t.name.clone(), json!(fname));
        }
        files.push(fname);
    }
    if n_shards > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write("model.safetensors.index.json", &pretty(&index))?;
        files.push("model.safetensors.index.json".into());
    }

    // Tokenizer, chat template, generation settings.
    let bos = m.opt_u64(keys::BOS_ID)?;
    let eos = m.opt_u64_array(keys::EOS_IDS)?.unwrap_or_default();
    let mut tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": n_ctx,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(json) = m.opt_bytes(keys::TOKENIZER_JSON)? {
        write("tokenizer.json", json)?;
        files.push("tokenizer.json".into());
        let tok = tokenizers::Tokenizer::from_bytes(json).map_err(|e| FormatError::BadValue {
            key: keys::TOKENIZER_JSON.into(),
            why: format!("does not load: {e}"),
        })?;
        let token = |id: u64| u32::try_from(id).ok().and_then(|i| tok.id_to_token(i));
        if let Some(b) = bos.and_then(token) {
            tok_config["bos_token"] = json!(b);
        }
        if let Some(e) = eos.first().copied().and_then(token) {
            tok_config["eos_token"] = json!(e);
        }
    }
    if let Some(t) = m.opt_str(keys::CHAT_TEMPLATE)? {
        tok_config["chat_template"] = json!(t);
    }
    write("tokenizer_config.json", &pretty(&tok_config))?;
    files.push("tokenizer_config.json".into());
    let mut gen = json!({});
    if let Some(b) = bos {
        gen["bos_token_id"] = json!(b);
    }
    if !eos.is_empty() {
        gen["eos_token_id"] = json!(eos);
    }
    write("generation_config.json", &pretty(&gen))?;
    files.push("generation_config.json".into());
    let weight_bytes = files
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|md| md.len())
        .sum();
    Ok((files, weight_bytes))
}
