//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`,
//! as `PeftModel.save_pretrained` writes them), read against a base model
//! and merged into its float weights: `W + s · (alpha / r) · B · A`.
//!
//! Why at import: the GPTQ literature's recipe is fine-tune, merge, then
//! quantize, so `nibble quantize --lora` must hand GPTQ the merged float
//! weights; merging where the source's tensors become canonical makes every
//! source (Hugging Face folder, GGUF) and every family the same case, fused
//! projections included (a fused layer's LoRA `B` rows are cut like its
//! weight's rows; `A` is shared).
//!
//! Everything an adapter holds is checked against the base before any work:
//! each target module must be a linear layer of the base with the adapter's
//! shapes, and PEFT features nibble does not implement (DoRA,
//! `modules_to_save`, embedding LoRA, trained biases, …) are refused by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use sha2::Digest;

use crate::error::{FormatError, Result};
use crate::families::Family;
use crate::hparams::HParams;

/// An adapter to apply: its folder and the user's scale (`ADAPTER[:scale]`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f32,
}

impl LoraSpec {
    /// `FOLDER` or `FOLDER:SCALE` (a trailing `:number`; a folder whose name
    /// ends so is named with an explicit `:1`).
    pub fn parse(s: &str) -> std::result::Result<LoraSpec, String> {
        if let Some((path, scale)) = s.rsplit_once(':') {
            if let Ok(v) = scale.parse::<f32>() {
                if !v.is_finite() {
                    return Err(format!("'{s}': the scale {v} is not finite"));
                }
                return Ok(LoraSpec {
                    path: PathBuf::from(path),
                    scale: v,
                });
            }
        }
        Ok(LoraSpec {
            path: PathBuf::from(s),
            scale: 1.0,
        })
    }
}

/// One adapted linear weight: `ΔW = scaling · B · A` in canonical rows.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// Rank.
    pub r: usize,
    /// `[r, cols]`.
    pub a: Vec<f32>,
    /// `[rows, r]` (a fused projection's part already cut out).
    pub b: Vec<f32>,
    /// `alpha / r` (rsLoRA: `alpha / √r`) times the user's scale.
    pub scaling: f32,
}

impl LoraModule {
    /// Add `ΔW` to `w` (`[rows, cols]`, row-major).
    pub fn merge_into(&self, w: &mut [f32], cols: usize) {
        for (i, row) in w.chunks_exact_mut(cols).enumerate() {
            let b = &self.b[i * self.r..(i + 1) * self.r];
            for (k, &bk) in b.iter().enumerate() {
                let coef = self.scaling * bk;
                if coef == 0.0 {
                    continue;
                }
                for (wv, &av) in row.iter_mut().zip(&self.a[k * cols..(k + 1) * cols]) {
                    *wv += coef * av;
                }
            }
        }
    }
}

/// A PEFT LoRA adapter read against a base model.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub path: PathBuf,
    /// SHA-256 of `adapter_config.json` then `adapter_model.safetensors`.
    pub sha256: String,
    pub scale: f32,
    /// Canonical weight name (`blk.3.attn_q.weight`) → its update.
    pub modules: BTreeMap<String, LoraModule>,
}

fn bad(path: &Path, why: impl Into<String>) -> FormatError {
    FormatError::BadLora { why: why.into() }.in_file(path)
}

/// PEFT's pattern match (`rank_pattern`, `alpha_pattern`): the key matches
/// the module name or a dotted suffix of it.
fn pattern_value(patterns: Option<&Json>, module: &str) -> Option<f64> {
    let map = patterns?.as_object()?;
    map.iter().find_map(|(key, v)| {
        let re = regex::Regex::new(&format!("^(.*\\.)?(?:{key})$")).ok()?;
        re.is_match(module).then(|| v.as_f64()).flatten()
    })
}

impl LoraAdapter {
    /// Read the adapter in folder `spec.path` for a base model `hp` of
    /// `family`, checking every module against the base.
    pub fn load(spec: &LoraSpec, hp: &HParams, family: &Family) -> Result<LoraAdapter> {
        let dir = &spec.path;
        let cfg_path = dir.join("adapter_config.json");
        let st_path = dir.join("adapter_model.safetensors");
        if !cfg_path.is_file() {
            let why = if dir.join("adapter_model.bin").is_file() {
                "holds adapter_model.bin (a pickle): nibble reads adapter_model.safetensors \
                 (save with safe_serialization=True)"
            } else {
                "is not a PEFT adapter folder (no adapter_config.json)"
            };
            return Err(bad(dir, why));
        }
        let cfg_text = std::fs::read(&cfg_path).map_err(|e| FormatError::io(&cfg_path, e))?;
        let cfg: Json = serde_json::from_slice(&cfg_text).map_err(|e| FormatError::Json {
            what: cfg_path.display().to_string(),
            source: e,
        })?;
        let refuse = |why: String| Err(bad(&cfg_path, why));
        let s = |k: &str| cfg.get(k).and_then(Json::as_str);
        let flag = |k: &str| cfg.get(k).and_then(Json::as_bool).unwrap_or(false);
        let present = |k: &str| match cfg.get(k) {
            None | Some(Json::Null) => false,
            Some(Json::Array(a)) => !a.is_empty(),
            Some(Json::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        match s("peft_type") {
            Some("LORA") => {}
            other => {
                return refuse(format!(
                    "peft_type {other:?}: nibble applies LoRA adapters (peft_type \"LORA\")"
                ))
            }
        }
        for (key, what) in [
            ("use_dora", "DoRA (weight-decomposed LoRA)"),
            ("use_qalora", "QA-LoRA"),
            ("lora_bias", "trained LoRA biases"),
            ("fan_in_fan_out", "fan_in_fan_out weights (GPT-2's Conv1D)"),
        ] {
            if flag(key) {
                return refuse(format!("'{key}: true' ({what}) is not supported"));
            }
        }
        for (key, what) in [
            (
                "modules_to_save",
                "fully trained modules saved beside the adapter",
            ),
            ("layer_replication", "replicated layers"),
            ("alora_invocation_tokens", "activated LoRA"),
            (
                "target_parameters",
                "LoRA on parameters rather than modules",
            ),
            ("trainable_token_indices", "trained token embeddings"),
        ] {
            if present(key) {
                return refuse(format!("'{key}' ({what}) is not supported"));
            }
        }
        if let Some(b) = s("bias").filter(|b| *b != "none") {
            return refuse(format!(
                "'bias: {b}' (trained biases) is not supported; only bias \"none\""
            ));
        }
        let r_default = cfg.get("r").and_then(Json::as_f64).unwrap_or(8.0);
        let alpha_default = cfg
            .get("lora_alpha")
            .and_then(Json::as_f64)
            .unwrap_or(r_default);
        let rslora = flag("use_rslora");

        // The base's linear layers by their Hugging Face module path.
        let mut linears: BTreeMap<String, Vec<(String, crate::families::Transform, Vec<u64>)>> =
            BTreeMap::new();
        for (name, shape) in hp.tensor_specs() {
            if shape.len() != 2 || name == "token_embd.weight" || name == "pos_embd.weight" {
                continue;
            }
            if let Some((hf, t)) = crate::families::locate(family, &name) {
                if let Some(stem) = hf.strip_suffix(".weight") {
                    linears
                        .entry(stem.to_string())
                        .or_default()
                        .push((name, t, shape));
                }
            }
        }

        let bytes = std::fs::read(&st_path).map_err(|e| FormatError::io(&st_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| FormatError::from(e).in_file(&st_path))?;
        // module path → (A, B) views.
        let mut pairs: BTreeMap<String, [Option<safetensors::tensor::TensorView<'_>>; 2]> =
            BTreeMap::new();
        for (name, view) in st.tensors() {
            let stem = name.strip_prefix("base_model.model.").unwrap_or(&name);
            let (module, which) = if let Some(m) = stem.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = stem.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                let what = if stem.contains("lora_embedding_") {
                    "LoRA on an embedding"
                } else if stem.contains("lora_magnitude_vector") {
                    "DoRA magnitudes"
                } else if stem.ends_with(".bias") {
                    "a trained bias"
                } else {
                    "not a LoRA A/B matrix"
                };
                return Err(bad(
                    &st_path,
                    format!("tensor '{name}' ({what}) is not supported"),
                ));
            };
            pairs.entry(module.to_string()).or_default()[which] = Some(view);
        }
        if pairs.is_empty() {
            return Err(bad(&st_path, "holds no LoRA tensors"));
        }

        let mut modules = BTreeMap::new();
        for (module, [a, b]) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(bad(
                    &st_path,
                    format!("module '{module}' has only one of lora_A / lora_B"),
                ));
            };
            let Some(targets) = linears.get(&module) else {
                return Err(bad(
                    &st_path,
                    format!(
                        "target module '{module}' is not a linear layer of this {} model \
                         (an adapter for another base?)",
                        hp.arch
                    ),
                ));
            };
            let decode =
                |v: &safetensors::tensor::TensorView<'_>, which: &str| -> Result<Vec<f32>> {
                    let d = match v.dtype() {
                        safetensors::Dtype::F32 => crate::dtype::DType::F32,
                        safetensors::Dtype::F16 => crate::dtype::DType::F16,
                        safetensors::Dtype::BF16 => crate::dtype::DType::BF16,
                        other => {
                            return Err(bad(
                                &st_path,
                                format!(
                                    "{module}.{which} is {other:?}; LoRA matrices are F32/F16/BF16"
                                ),
                            ))
                        }
                    };
                    Ok(crate::dtype::decode_f32(d, v.data()).expect("float"))
                };
            let (ash, bsh) = (a.shape(), b.shape());
            let (_, transform, canon_shape) = &targets[0];
            let stored = crate::families::stored_shape(*transform, hp, canon_shape);
            let (rows, cols) = (stored[0] as usize, stored[1] as usize);
            let r = ash.first().copied().unwrap_or(0);
            if ash.len() != 2 || bsh.len() != 2 || r == 0 || ash[1] != cols || bsh != [rows, r] {
                return Err(bad(
                    &st_path,
                    format!(
                        "module '{module}': lora_A {ash:?} and lora_B {bsh:?} do not fit the base's \
                         {rows}×{cols} weight (want A [r, {cols}], B [{rows}, r]): an adapter for another base?"
                    ),
                ));
            }
            let r_cfg = pattern_value(cfg.get("rank_pattern"), &module).unwrap_or(r_default);
            if r_cfg as usize != r {
                return Err(bad(
                    &st_path,
                    format!(
                        "module '{module}': rank {r} in the file, {r_cfg} in adapter_config.json"
                    ),
                ));
            }
            let alpha = pattern_value(cfg.get("alpha_pattern"), &module).unwrap_or(alpha_default);
            let scaling = if rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            };
            let a = decode(&a, "lora_A")?;
            let b = decode(&b, "lora_B")?;
            if let Some(i) = a.iter().chain(&b).position(|v| !v.is_finite()) {
                return Err(bad(
                    &st_path,
                    format!("module '{module}': non-finite value at element {i}"),
                ));
            }
            for (canonical, t, _) in targets {
                let keep = crate::families::row_sources(*t, hp, &stored).ok_or_else(|| {
                    bad(
                        &st_path,
                        format!("module '{module}' is stored {t:?}, not supported"),
                    )
                })?;
                let b_rows: Vec<f32> = keep
                    .iter()
                    .flat_map(|&row| b[row * r..(row + 1) * r].iter().copied())
                    .collect();
                modules.insert(
                    canonical.clone(),
                    LoraModule {
                        r,
                        a: a.clone(),
                        b: b_rows,
                        scaling: (scaling * f64::from(spec.scale)) as f32,
                    },
                );
            }
        }
        let mut h = sha2::Sha256::new();
        h.update(&cfg_text);
        h.update(&bytes);
        Ok(LoraAdapter {
            path: dir.clone(),
            sha256: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
            scale: spec.scale,
            modules,
        })
    }
}

// ------------------------------------------------------------ stored in a .nib

/// Adapters stored in a `.nib` beside the base (FORMAT.md, "LoRA adapters"):
/// metadata `lora.names` lists them (one per line); adapter `N` has
/// `lora.N.scale` (f64, its default scale), `lora.N.source` (string: the
/// folder's SHA-256 and path), and per adapted weight `lora.N.<stem>.lora_a`
/// (F32 `[r, cols]`) and `lora.N.<stem>.lora_b` (F32 `[rows, r]`, its
/// `alpha / r` folded in), in the original order of rows and columns.
pub const STORED_NAMES: &str = "lora.names";

/// Whether `name` can name a stored adapter (`[A-Za-z0-9_-]+`).
pub fn valid_stored_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The adapters a `.nib` stores.
pub fn stored_names(view: &crate::nib::NibView<'_>) -> Vec<String> {
    match view.metadata.get(STORED_NAMES) {
        Some(crate::nib::Value::Str(s)) => s
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

impl LoraAdapter {
    /// Adapter `name` stored in `view` (a model of `hp`), checked like a
    /// folder's: every weight it adapts exists with matching shapes. Its
    /// scale is the one it was stored with times `scale`.
    pub fn from_nib(
        view: &crate::nib::NibView<'_>,
        name: &str,
        hp: &HParams,
        scale: Option<f32>,
    ) -> Result<LoraAdapter> {
        let bad = |why: String| FormatError::BadLora { why };
        if !stored_names(view).iter().any(|n| n == name) {
            return Err(bad(format!("this model stores no adapter named '{name}'")));
        }
        let prefix = format!("lora.{name}.");
        let default_scale = view
            .metadata
            .opt_f64(&format!("{prefix}scale"))?
            .unwrap_or(1.0) as f32;
        let source = view
            .metadata
            .opt_str(&format!("{prefix}source"))?
            .unwrap_or("")
            .to_string();
        let shapes: BTreeMap<String, Vec<u64>> = hp.tensor_specs().into_iter().collect();
        let mut modules = BTreeMap::new();
        for t in &view.tensors {
            let Some(stem) = t
                .name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".lora_a"))
            else {
                continue;
            };
            let canonical = format!("{stem}.weight");
            let b_name = format!("{prefix}{stem}.lora_b");
            let b = view
                .tensor(&b_name)
                .ok_or_else(|| bad(format!("'{}' has no '{b_name}'", t.name)))?;
            let shape = shapes
                .get(&canonical)
                .filter(|s| s.len() == 2)
                .ok_or_else(|| {
                    bad(format!(
                        "'{}' adapts '{canonical}', not a weight of this model",
                        t.name
                    ))
                })?;
            let (rows, cols) = (shape[0], shape[1]);
            let r = t.shape.first().copied().unwrap_or(0);
            if t.dtype != crate::dtype::DType::F32
                || b.dtype != crate::dtype::DType::F32
                || t.shape != [r, cols]
                || b.shape != [rows, r]
                || r == 0
            {
                return Err(bad(format!(
                    "'{}' {:?} / '{b_name}' {:?} do not fit '{canonical}' {shape:?} (F32 [r, {cols}] and [{rows}, r])",
                    t.name, t.shape, b.shape
                )));
            }
            let f = |d: &[u8]| crate::dtype::decode_f32(crate::dtype::DType::F32, d).expect("F32");
            modules.insert(
                canonical,
                LoraModule {
                    r: r as usize,
                    a: f(t.data),
                    b: f(b.data),
                    scaling: 1.0,
                },
            );
        }
        if modules.is_empty() {
            return Err(bad(format!("the stored adapter '{name}' has no tensors")));
        }
        let scale = default_scale * scale.unwrap_or(1.0);
        for m in modules.values_mut() {
            m.scaling = scale;
        }
        Ok(LoraAdapter {
            path: PathBuf::from(source),
            sha256: String::new(),
            scale,
            modules,
        })
    }
}

/// Copy the `.nib` `src` to `dest` with `adapters` (name, folder and default
/// scale) stored beside its weights, each read and checked against the
/// model first; `dest` appears only when complete.
pub fn store_in_nib(
    src: &crate::storage::NibFile,
    src_path: &Path,
    dest: &Path,
    adapters: &[(String, LoraSpec)],
) -> Result<()> {
    use crate::nib::{MetadataBuilder, NibWriter, OwnedValue};
    let view = src.view()?;
    let hp = HParams::read(&view.metadata)?;
    let family = crate::families::family(&hp.arch).ok_or_else(|| FormatError::BadLora {
        why: format!(
            "no Hugging Face module names for architecture '{}'",
            hp.arch
        ),
    })?;
    let mut names = stored_names(&view);
    let mut loaded = Vec::new();
    for (name, spec) in adapters {
        if !valid_stored_name(name) {
            return Err(FormatError::BadLora {
                why: format!(
                    "'{name}' cannot name a stored adapter (letters, digits, '_' and '-')"
                ),
            });
        }
        if names.contains(name) {
            return Err(FormatError::BadLora {
                why: format!("an adapter named '{name}' is already stored"),
            });
        }
        names.push(name.clone());
        let unit = LoraSpec {
            path: spec.path.clone(),
            scale: 1.0,
        };
        loaded.push((name, spec.scale, LoraAdapter::load(&unit, &hp, family)?));
    }
    let mut meta = MetadataBuilder::new();
    for (k, v) in &view.metadata.entries {
        meta.set(k, OwnedValue::from(*v));
    }
    meta.set(STORED_NAMES, OwnedValue::Str(names.join("\n")));
    for (name, scale, a) in &loaded {
        meta.set(
            &format!("lora.{name}.scale"),
            OwnedValue::F64(f64::from(*scale)),
        );
        meta.set(
            &format!("lora.{name}.source"),
            OwnedValue::Str(format!("{} {}", a.sha256, a.path.display())),
        );
    }
    let io = |e: std::io::Error| FormatError::BadOutput {
        path: dest.to_path_buf(),
        why: e.to_string(),
    };
    let file = crate::storage::AtomicFile::create_checked(dest, &[src_path])?;
    let mut w = NibWriter::new(file, &meta).map_err(io)?;
    for t in &view.tensors {
        w.add_tensor_q(t.name, t.dtype, t.quant_param, &t.shape, t.data)
            .map_err(io)?;
    }
    for (name, _, a) in &loaded {
        for (canonical, m) in &a.modules {
            let stem = canonical.trim_end_matches(".weight");
            let cols = m.a.len() / m.r;
            let rows = m.b.len() / m.r;
            let b: Vec<f32> = m.b.iter().map(|v| v * m.scaling).collect();
            w.add_tensor(
                &format!("lora.{name}.{stem}.lora_a"),
                crate::dtype::DType::F32,
                &[m.r as u64, cols as u64],
                bytemuck::cast_slice(&m.a),
            )
            .map_err(io)?;
            w.add_tensor(
                &format!("lora.{name}.{stem}.lora_b"),
                crate::dtype::DType::F32,
                &[rows as u64, m.r as u64],
                bytemuck::cast_slice(&b),
            )
            .map_err(io)?;
        }
    }
    w.finish().map_err(io)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_an_optional_scale() {
        let p = |s: &str| LoraSpec::parse(s).unwrap();
        assert_eq!(p("ad").scale, 1.0);
        assert_eq!(
            p("dir/ad:0.5"),
            LoraSpec {
                path: "dir/ad".into(),
                scale: 0.5
            }
        );
        assert_eq!(p("a:b").path, PathBuf::from("a:b"));
        assert!(LoraSpec::parse("ad:inf").is_err());
    }

    #[test]
    fn merge_adds_scaled_b_times_a() {
        let m = LoraModule {
            r: 2,
            a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            b: vec![1.0, 0.0, 0.0, 1.0],
            scaling: 0.5,
        };
        let mut w = vec![0.0; 6];
        m.merge_into(&mut w, 3);
        assert_eq!(w, vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
    }

    #[test]
    fn patterns_match_dotted_suffixes() {
        let p = serde_json::json!({"q_proj": 16, "layers\\.1\\.mlp\\.down_proj": 4});
        assert_eq!(
            pattern_value(Some(&p), "model.layers.0.self_attn.q_proj"),
            Some(16.0)
        );
        assert_eq!(
            pattern_value(Some(&p), "model.layers.1.mlp.down_proj"),
            Some(4.0)
        );
        assert_eq!(
            pattern_value(Some(&p), "model.layers.2.mlp.down_proj"),
            None
        );
    }
}
