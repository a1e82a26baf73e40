//! Importers: a Hugging Face model folder (config.json + safetensors, single
//! or sharded) or a GGUF file, turned into a `.nib` image.
//!
//! Both paths produce the same canonical tensor names and the Hugging Face
//! rotate-half q/k layout, so the runtime has exactly one layout: GGUF's
//! interleaved rotary rows are un-permuted here, once.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value as Json;
use sha2::Digest;

use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::families::Transform;
use crate::gguf::{dequantize, GgufFile};
use crate::gptq_checkpoint::{GptqConfig, GptqLinear, GptqTensors, GroupedWeight, ModuleQuant};
use crate::hparams::{keys, utc_now_rfc3339, HParams, TokenizerInfo};
use crate::lora::{LoraAdapter, LoraSpec};
use crate::nib::{MetadataBuilder, NibWriter, OwnedValue};
use crate::storage::{mmap_file, AlignedBytes, AtomicFile, NibFile};
use safetensors::tensor::TensorView;

/// What kind of model a path points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Nib,
    Gguf,
    HfFolder,
}

/// The model file a path names: the path itself, or — for a folder without
/// `config.json` holding exactly one `.gguf` (as a Hub GGUF repository
/// downloads) — that file. Several `.gguf` files are an error listing them.
pub fn resolve_model_path(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let rd = std::fs::read_dir(path).map_err(|e| FormatError::io(path, e))?;
    let mut ggufs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    ggufs.sort();
    match ggufs.len() {
        0 => Ok(path.to_path_buf()),
        1 => Ok(ggufs.remove(0)),
        _ => Err(FormatError::BadConfig {
            why: format!(
                "this folder holds several GGUF files ({}): name one with -m",
                ggufs
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
        .in_file(path)),
    }
}

/// Detect the input kind from the path (folder) or the file's magic bytes.
pub fn detect(path: &Path) -> Result<InputKind> {
    if path.is_dir() {
        return if path.join("config.json").is_file() {
            Ok(InputKind::HfFolder)
        } else {
            Err(FormatError::BadConfig {
                why: "this folder has no config.json and no .gguf file: a Hugging Face \
                      model folder needs config.json, the weights (*.safetensors) and \
                      tokenizer.json"
                    .into(),
            }
            .in_file(path))
        };
    }
    let mut magic = [0u8; 8];
    let mut f = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
    let n = f.read(&mut magic).map_err(|e| FormatError::io(path, e))?;
    if n >= 8 && magic == crate::nib::MAGIC {
        Ok(InputKind::Nib)
    } else if n >= 4 && magic[..4] == crate::gguf::GGUF_MAGIC {
        Ok(InputKind::Gguf)
    } else {
        let found = if n == 0 {
            "the file is empty".to_string()
        } else {
            format!(
                "its first bytes are {}",
                magic[..n]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        };
        Err(FormatError::UnknownInput { found }.in_file(path))
    }
}

/// Options for turning a source model into `.nib`.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Storage type of the linear and embedding weights (norms stay F32).
    pub dtype: DType,
    /// Hash the source files into the provenance (costs one read of them).
    pub hash_source: bool,
    /// Keep a source's quantized weights as they are stored — a GGUF's
    /// blocks (the bytes llama.cpp runs), a GPTQ checkpoint's codes as
    /// integer groups — and its float tensors in their stored type, instead
    /// of converting them to `dtype` (losslessly in both cases).
    pub keep_blocks: bool,
    /// PEFT LoRA adapters merged into the float weights they target
    /// (`W + s · alpha/r · B·A`); those weights are then stored as `dtype`.
    pub lora: Vec<LoraSpec>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            dtype: DType::F16,
            hash_source: true,
            keep_blocks: false,
            lora: Vec::new(),
        }
    }
}

/// Progress callback: (tensors done, tensors total, current tensor name).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// A model source that can hand out any canonical tensor as f32.
trait Source {
    fn hparams(&self) -> &HParams;
    /// Row-major f32 data of a canonical tensor (`expected_shape` for checks).
    fn tensor_f32(&self, name: &str, expected_shape: &[u64]) -> Result<Vec<f32>>;
    /// The tensor as packed groups when the source stores it in a block
    /// format nibble can take over losslessly.
    fn tensor_packed(&self, _name: &str, _expected_shape: &[u64]) -> Result<Option<GroupedWeight>> {
        Ok(None)
    }
    /// The float type a source stores a tensor in, where keeping it is
    /// lossless (GGUF F32/F16/BF16 tensors, a GPTQ checkpoint's float ones).
    fn stored_float(&self, _name: &str) -> Option<DType> {
        None
    }
    /// The quantization the kept blocks carry, for the metadata.
    fn quant_metadata(&self, _meta: &mut MetadataBuilder) {}
    /// The tensor has been written: a memory-mapped source may drop its
    /// pages, so an import holds the source's bytes and the output's no
    /// longer than one tensor at a time.
    fn done_with(&self, _name: &str) {}
}

/// Import `src` (HF folder or GGUF) into a `.nib` written to `out`; write
/// errors name `out_name` (the output file, or "memory").
pub fn import_to<W: Write + Seek>(
    src: &Path,
    opts: &ImportOptions,
    out: W,
    out_name: &Path,
    progress: Progress<'_>,
) -> Result<W> {
    let src = &resolve_model_path(src)?;
    let kind = detect(src)?;
    let inner = || match kind {
        InputKind::HfFolder => {
            let s = HfSource::open(src)?;
            let tok = s.tokenizer_info()?;
            let sha = opts.hash_source.then(|| s.hash()).transpose()?;
            write_nib(&s, &tok, src, sha, opts, (out, out_name), progress)
        }
        InputKind::Gguf => {
            let map = mmap_file(src)?;
            let s = GgufSource::new(&map, src)?;
            let tok = s.tokenizer_info()?;
            let sha = opts
                .hash_source
                .then(|| hex(&sha2::Sha256::digest(&map[..])));
            write_nib(&s, &tok, src, sha, opts, (out, out_name), progress)
        }
        InputKind::Nib => Err(FormatError::BadValue {
            key: "input".into(),
            why: "already a .nib file".into(),
        }),
    };
    inner().map_err(|e| e.in_file(src))
}

/// Import into an unnamed scratch file and map it (for `run -m model.gguf`):
/// the image's pages then belong to the page cache, so the process's
/// resident memory behaves as with a `.nib` on disk (the interleaved copies
/// release the pages they copied). `None` when no scratch file can be made
/// or written (no `O_TMPFILE`, a full disk): the caller builds the image in
/// memory instead. Errors of the input are errors.
pub fn import_to_scratch(
    src: &Path,
    opts: &ImportOptions,
    progress: Progress<'_>,
) -> Result<Option<NibFile>> {
    let Some(file) = crate::storage::scratch_file() else {
        return Ok(None);
    };
    let scratch = Path::new("scratch file");
    let written = match import_to(src, opts, std::io::BufWriter::new(file), scratch, progress) {
        Ok(w) => w,
        // The scratch file could not be written (a full disk): build in memory.
        Err(e) if matches!(e.root(), FormatError::BadOutput { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Ok(file) = written.into_inner() else {
        return Ok(None);
    };
    NibFile::from_scratch(&file, src)
        .map(Some)
        .map_err(|e| e.in_file(src))
}

/// Import into a 64-byte aligned in-memory image.
pub fn import_to_memory(
    src: &Path,
    opts: &ImportOptions,
    progress: Progress<'_>,
) -> Result<NibFile> {
    let src = &resolve_model_path(src)?;
    // Reserve the image's size up front so a large model is never copied by
    // buffer doubling (which would double the peak memory of the import).
    let reserve = estimate_size(src, opts).unwrap_or(0);
    let buf = import_to(
        src,
        opts,
        AlignedBytes::with_capacity(reserve),
        Path::new("memory"),
        progress,
    )?;
    NibFile::from_memory(buf)
}

/// An upper estimate of the `.nib` size an import produces (tensor bytes,
/// alignment padding, and the source's tokenizer/metadata files).
fn estimate_size(src: &Path, opts: &ImportOptions) -> Option<usize> {
    let hp = match detect(src).ok()? {
        InputKind::HfFolder => HfSource::open(src).ok()?.hp,
        InputKind::Gguf => {
            let map = mmap_file(src).ok()?;
            GgufSource::new(&map, src).ok()?.hp
        }
        InputKind::Nib => return None,
    };
    let dir = if src.is_dir() { src } else { src.parent()? };
    let side_files: u64 = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ]
    .iter()
    .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
    .map(|m| m.len())
    .sum();
    let mut total = 1 << 16;
    for (_, shape) in hp.tensor_specs() {
        let n: u64 = shape.iter().product();
        let size = if shape.len() == 1 {
            4
        } else {
            opts.dtype.size()
        };
        total += n * size + 64 + 256;
    }
    usize::try_from(total + side_files + (1 << 20)).ok()
}

/// Import into a file, atomically (temp file + fsync + rename).
pub fn import_to_file(
    src: &Path,
    dest: &Path,
    opts: &ImportOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let f = AtomicFile::create_checked(dest, &[src])?;
    let f = import_to(src, opts, f, dest, progress)?;
    f.commit()
}

/// Open any supported model path as a `.nib` image: `.nib` files are mapped,
/// HF folders and GGUF files (or a folder holding one) are converted with
/// `opts` into a mapped scratch image ([`import_to_scratch`]), else in memory.
pub fn open_any(path: &Path, opts: &ImportOptions, progress: Progress<'_>) -> Result<NibFile> {
    let path = &resolve_model_path(path)?;
    match detect(path)? {
        InputKind::Nib if !opts.lora.is_empty() => Err(FormatError::BadLora {
            why: "adapters are merged while a model is imported: give its Hugging Face folder \
                  or GGUF file, not a .nib"
                .into(),
        }
        .in_file(path)),
        InputKind::Nib => NibFile::open(path),
        _ => match import_to_scratch(path, opts, progress)? {
            Some(file) => Ok(file),
            None => import_to_memory(path, opts, progress),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_nib<W: Write + Seek>(
    s: &dyn Source,
    tok: &TokenizerInfo,
    src: &Path,
    source_sha256: Option<String>,
    opts: &ImportOptions,
    (out, out_name): (W, &Path),
    progress: Progress<'_>,
) -> Result<W> {
    let hp = s.hparams();
    hp.validate()?;
    tok.validate()?;
    // Adapters are read and checked against the base before any work.
    let adapters = if opts.lora.is_empty() {
        Vec::new()
    } else {
        let family = crate::families::family(&hp.arch).ok_or_else(|| FormatError::BadLora {
            why: format!(
                "no Hugging Face module names for architecture '{}'",
                hp.arch
            ),
        })?;
        opts.lora
            .iter()
            .map(|spec| LoraAdapter::load(spec, hp, family))
            .collect::<Result<Vec<_>>>()?
    };
    let mut meta = MetadataBuilder::new();
    hp.write(&mut meta);
    tok.write(&mut meta);
    if let Some(name) = src.file_name() {
        meta.set(
            keys::NAME,
            OwnedValue::Str(name.to_string_lossy().into_owned()),
        );
    }
    let method = if opts.keep_blocks {
        "gguf-blocks"
    } else {
        "none"
    };
    meta.set(keys::QUANT_METHOD, OwnedValue::Str(method.into()));
    meta.set(keys::QUANT_DTYPE, OwnedValue::Str(opts.dtype.name().into()));
    if opts.keep_blocks {
        s.quant_metadata(&mut meta);
    }
    meta.set(
        keys::PROV_SOURCE,
        OwnedValue::Str(src.display().to_string()),
    );
    if let Some(h) = source_sha256 {
        meta.set(keys::PROV_SOURCE_SHA256, OwnedValue::Str(h));
    }
    if !adapters.is_empty() {
        let lines: Vec<String> = adapters
            .iter()
            .map(|a| format!("{} {} {}", a.sha256, a.scale, a.path.display()))
            .collect();
        meta.set(keys::PROV_LORA, OwnedValue::Str(lines.join("\n")));
    }
    meta.set(
        keys::PROV_TOOL,
        OwnedValue::Str(format!("nibble-format {}", env!("CARGO_PKG_VERSION"))),
    );
    meta.set(keys::PROV_CREATED, OwnedValue::Str(utc_now_rfc3339()));

    let io = |e: std::io::Error| FormatError::BadOutput {
        path: out_name.to_path_buf(),
        why: e.to_string(),
    };
    let mut w = NibWriter::new(out, &meta).map_err(io)?;
    let specs = hp.tensor_specs();
    for (i, (name, shape)) in specs.iter().enumerate() {
        progress(i, specs.len(), name);
        let updates: Vec<_> = adapters
            .iter()
            .filter_map(|a| a.modules.get(name))
            .collect();
        if opts.keep_blocks && shape.len() == 2 && updates.is_empty() {
            if let Some(p) = s.tensor_packed(name, shape)? {
                w.add_tensor_q(name, p.dtype, p.group_size, shape, &p.bytes)
                    .map_err(io)?;
                if let Some(perm) = p.perm {
                    let perm_name = format!("{}.perm", name.trim_end_matches(".weight"));
                    let bytes: Vec<u8> = perm.iter().flat_map(|i| i.to_le_bytes()).collect();
                    w.add_tensor(&perm_name, DType::U32, &[shape[1]], &bytes)
                        .map_err(io)?;
                }
                s.done_with(name);
                continue;
            }
        }
        let mut data = s.tensor_f32(name, shape)?;
        for u in &updates {
            u.merge_into(&mut data, shape[1] as usize);
        }
        if let Some(pos) = data.iter().position(|v| !v.is_finite()) {
            return Err(FormatError::BadValue {
                key: name.clone(),
                why: format!("non-finite weight {} at element {pos}", data[pos]),
            });
        }
        // Norm vectors stay F32: tiny, and precision matters there.
        let dtype = if shape.len() == 1 {
            DType::F32
        } else if opts.keep_blocks && updates.is_empty() {
            s.stored_float(name).unwrap_or(opts.dtype)
        } else {
            opts.dtype
        };
        let bytes = encode(&data, dtype);
        w.add_tensor(name, dtype, shape, &bytes).map_err(io)?;
        s.done_with(name);
    }
    progress(specs.len(), specs.len(), "");
    w.finish().map_err(io)
}

/// f32 values to little-endian bytes of `dtype`.
pub fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(data).to_vec(),
        DType::F16 => data
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => data
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => panic!("encode: {other} is not a float type"),
    }
}

// ---------------------------------------------------------------- Hugging Face

struct HfSource {
    dir: PathBuf,
    config: Json,
    hp: HParams,
    family: &'static crate::families::Family,
    /// (file, map) per safetensors shard.
    shards: Vec<(PathBuf, memmap2::Mmap)>,
    /// The checkpoint's GPTQ quantization, if it has one.
    gptq: Option<GptqConfig>,
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| FormatError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| FormatError::Json {
        what: path.display().to_string(),
        source: e,
    })
}

/// Token ids from an int, a list of ints, or null.
fn json_ids(v: Option<&Json>) -> Vec<u64> {
    match v {
        Some(Json::Number(n)) => n.as_u64().into_iter().collect(),
        Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).collect(),
        _ => vec![],
    }
}

impl HfSource {
    fn open(dir: &Path) -> Result<HfSource> {
        let config = read_json(&dir.join("config.json"))?;
        let (hp, family) = crate::families::hparams_from_config(&config)
            .map_err(|e| e.in_file(dir.join("config.json")))?;
        // AutoGPTQ's own file where config.json carries no quantization_config.
        let legacy_path = dir.join("quantize_config.json");
        let legacy = if config.get("quantization_config").is_none() && legacy_path.is_file() {
            Some(read_json(&legacy_path)?)
        } else {
            None
        };
        let gptq = GptqConfig::from_config(&config, legacy.as_ref()).map_err(|e| {
            e.in_file(if legacy.is_some() {
                legacy_path.clone()
            } else {
                dir.join("config.json")
            })
        })?;

        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let idx = read_json(&index)?;
            let map = idx
                .get("weight_map")
                .and_then(Json::as_object)
                .ok_or_else(|| FormatError::BadConfig {
                    why: format!("{}: no 'weight_map' object", index.display()),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(Json::as_str).collect();
            names.sort_unstable();
            names.dedup();
            names
                .into_iter()
                .map(|n| {
                    if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                        Err(FormatError::BadConfig {
                            why: format!("{}: suspicious shard name '{n}'", index.display()),
                        })
                    } else {
                        Ok(dir.join(n))
                    }
                })
                .collect::<Result<_>>()?
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::new();
        for f in files {
            let map = mmap_file(&f)?;
            // Validate the header now so errors name the shard.
            safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| FormatError::from(e).in_file(&f))?;
            shards.push((f, map));
        }
        Ok(HfSource {
            dir: dir.to_path_buf(),
            config,
            hp,
            family,
            shards,
            gptq,
        })
    }

    /// The shard holding stored tensor `name`, and its view.
    fn find(&self, name: &str) -> Result<Option<(&Path, TensorView<'_>)>> {
        for (path, map) in &self.shards {
            let st = safetensors::SafeTensors::deserialize(map)
                .map_err(|e| FormatError::from(e).in_file(path))?;
            if let Ok(view) = st.tensor(name) {
                return Ok(Some((path.as_path(), view)));
            }
        }
        Ok(None)
    }

    /// The GPTQ layer behind canonical `name` (shape `expected`), unpacked
    /// (and, for a fused projection, cut to its rows); `None` when the
    /// source is not a GPTQ checkpoint or stores this tensor in float.
    fn gptq_linear(&self, name: &str, expected: &[u64]) -> Result<Option<(String, GptqLinear)>> {
        let Some(cfg) = &self.gptq else {
            return Ok(None);
        };
        let Some((hf, transform)) = crate::families::locate(self.family, name) else {
            return Ok(None);
        };
        let Some(stem) = hf.strip_suffix(".weight") else {
            return Ok(None);
        };
        let Some((path, qweight)) = self.find(&format!("{stem}.qweight"))? else {
            return Ok(None);
        };
        let in_file = |e: FormatError| e.in_file(path);
        let stored = crate::families::stored_shape(transform, &self.hp, expected);
        let keep = match crate::families::row_sources(transform, &self.hp, &stored) {
            Some(rows) if stored.len() == 2 => rows,
            _ => {
                return Err(in_file(FormatError::UnsupportedQuantization {
                    what: format!(
                        "{stem}: GPTQ codes of a tensor stored {transform:?} (e.g. GPT-2's Conv1D) \
                         are not read"
                    ),
                }))
            }
        };
        let (bits, group_size) = match cfg.module(stem) {
            ModuleQuant::Quantized { bits, group_size } => (bits, group_size),
            ModuleQuant::Float => {
                return Err(in_file(FormatError::BadValue {
                    key: format!("{stem}.qweight"),
                    why: "quantization_config's dynamic rules leave this module in float, \
                          but it holds GPTQ codes"
                        .into(),
                }))
            }
        };
        use safetensors::Dtype as S;
        let tensor = |suffix: &str,
                      kinds: &[S],
                      required: bool|
         -> Result<Option<TensorView<'_>>> {
            let tname = format!("{stem}.{suffix}");
            match self.find(&tname)? {
                Some((_, v)) if kinds.contains(&v.dtype()) => Ok(Some(v)),
                Some((p, v)) => Err(FormatError::UnsupportedTensorType {
                    name: tname,
                    what: format!("{:?} (GPTQ stores {kinds:?})", v.dtype()),
                }
                .in_file(p)),
                None if required => Err(FormatError::MissingTensor { name: tname }.in_file(path)),
                None => Ok(None),
            }
        };
        let words = [S::I32, S::U32];
        tensor("qweight", &words, true)?;
        let qzeros = tensor("qzeros", &words, true)?.expect("required");
        let scales = tensor("scales", &[S::F16, S::BF16, S::F32], true)?.expect("required");
        let g_idx = tensor("g_idx", &[S::I32, S::I64], false)?;
        let shape =
            |v: &TensorView<'_>| -> Vec<u64> { v.shape().iter().map(|&d| d as u64).collect() };
        let (scale_values, scale_type) =
            crate::gptq_checkpoint::float_values(scales.dtype(), scales.data()).expect("float");
        let g_idx = g_idx.map(|v| {
            let values = if v.dtype() == S::I32 {
                v.data()
                    .chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect()
            } else {
                v.data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect()
            };
            (values, shape(&v))
        });
        let t = GptqTensors {
            name: stem,
            qweight: (qweight.data(), shape(&qweight)),
            qzeros: (qzeros.data(), shape(&qzeros)),
            scales: (scale_values, scale_type, shape(&scales)),
            g_idx,
        };
        let lin = GptqLinear::unpack(
            &t,
            stored[0] as usize,
            stored[1] as usize,
            bits,
            group_size,
            cfg.zeros_minus_one,
        )
        .map_err(in_file)?;
        let lin = if transform == Transform::Plain {
            lin
        } else {
            lin.select_rows(&keep)
        };
        Ok(Some((stem.to_string(), lin)))
    }

    fn hash(&self) -> Result<String> {
        let mut h = sha2::Sha256::new();
        h.update(serde_json::to_vec(&self.config).unwrap_or_default());
        for (_, m) in &self.shards {
            h.update(&m[..]);
        }
        Ok(hex(&h.finalize()))
    }

    fn tokenizer_info(&self) -> Result<TokenizerInfo> {
        let tj = self.dir.join("tokenizer.json");
        let json = if tj.is_file() {
            Some(std::fs::read(&tj).map_err(|e| FormatError::io(&tj, e))?)
        } else {
            None
        };
        let chat_template = chat_template_from_dir(&self.dir)?;
        let mut bos = json_ids(self.config.get("bos_token_id")).first().copied();
        let mut eos = json_ids(self.config.get("eos_token_id"));
        let gc = self.dir.join("generation_config.json");
        if gc.is_file() {
            let g = read_json(&gc)?;
            if let Some(b) = json_ids(g.get("bos_token_id")).first() {
                bos = Some(*b);
            }
            let e = json_ids(g.get("eos_token_id"));
            if !e.is_empty() {
                eos = e;
            }
        }
        Ok(TokenizerInfo {
            json,
            chat_template,
            chat_template_fallback: None,
            bos_id: bos,
            eos_ids: eos,
        })
    }
}

impl TokenizerInfo {
    /// Everything that goes into the `.nib` must load: the tokenizer parses
    /// (the same crate the runtime uses), the chat template compiles, the
    /// special ids are inside the vocabulary.
    fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| FormatError::BadValue {
            key: key.into(),
            why,
        };
        if let Some(json) = &self.json {
            let t = tokenizers::Tokenizer::from_bytes(json)
                .map_err(|e| bad("tokenizer.json", format!("does not load: {e}")))?;
            let n = t.get_vocab_size(true) as u64;
            for id in self.bos_id.iter().chain(&self.eos_ids) {
                if *id >= n {
                    return Err(bad(
                        "tokenizer ids",
                        format!("special token id {id} is outside the tokenizer's {n} tokens"),
                    ));
                }
            }
        }
        if let Some(t) = &self.chat_template {
            let mut env = minijinja::Environment::new();
            env.add_template("chat", t)
                .map_err(|e| bad("chat template", format!("does not compile: {e}")))?;
        }
        Ok(())
    }
}

fn chat_template_from_dir(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| FormatError::io(&jinja, e));
    }
    let tc = dir.join("tokenizer_config.json");
    if !tc.is_file() {
        return Ok(None);
    }
    let v = read_json(&tc)?;
    Ok(match v.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        // A list of named templates: take "default".
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    })
}

impl Source for HfSource {
    fn hparams(&self) -> &HParams {
        &self.hp
    }

    fn tensor_packed(&self, name: &str, expected: &[u64]) -> Result<Option<GroupedWeight>> {
        let Some((stem, lin)) = self.gptq_linear(name, expected)? else {
            return Ok(None);
        };
        lin.to_groups(&stem).map(Some)
    }

    fn stored_float(&self, name: &str) -> Option<DType> {
        self.gptq.as_ref()?;
        let (hf, _) = crate::families::locate(self.family, name)?;
        match self.find(&hf).ok()??.1.dtype() {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    fn quant_metadata(&self, meta: &mut MetadataBuilder) {
        let Some(q) = &self.gptq else {
            return;
        };
        meta.set(
            keys::QUANT_METHOD,
            OwnedValue::Str("gptq-checkpoint".into()),
        );
        meta.set(keys::QUANT_BITS, OwnedValue::U64(q.bits.into()));
        meta.set(
            keys::QUANT_GROUP_SIZE,
            OwnedValue::U64(q.group_size.unwrap_or(0) as u64),
        );
        meta.set(keys::QUANT_SYM, OwnedValue::Bool(q.sym));
        meta.set(keys::QUANT_ACT_ORDER, OwnedValue::Bool(q.desc_act));
        meta.set(
            keys::QUANT_CHECKPOINT_FORMAT,
            OwnedValue::Str(q.checkpoint_format.clone()),
        );
    }

    fn tensor_f32(&self, name: &str, expected: &[u64]) -> Result<Vec<f32>> {
        if let Some((_, lin)) = self.gptq_linear(name, expected)? {
            return Ok(lin.dequantize());
        }
        let (hf, transform) =
            crate::families::locate(self.family, name).ok_or_else(|| FormatError::BadConfig {
                why: format!(
                    "family '{}' has no stored tensor for the canonical '{name}'",
                    self.hp.arch
                ),
            })?;
        let stored = crate::families::stored_shape(transform, &self.hp, expected);
        for (path, map) in &self.shards {
            let st = safetensors::SafeTensors::deserialize(map)
                .map_err(|e| FormatError::from(e).in_file(path))?;
            let Ok(view) = st.tensor(&hf) else { continue };
            let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            if shape != stored {
                return Err(FormatError::BadShape {
                    name: hf,
                    shape,
                    why: format!("expected {stored:?} from config.json"),
                }
                .in_file(path));
            }
            use safetensors::Dtype as S;
            let dtype = match view.dtype() {
                S::F32 => DType::F32,
                S::F16 => DType::F16,
                S::BF16 => DType::BF16,
                other => {
                    return Err(FormatError::UnsupportedTensorType {
                        name: hf,
                        what: format!("{other:?}"),
                    }
                    .in_file(path))
                }
            };
            let data = crate::dtype::decode_f32(dtype, view.data()).expect("float dtype");
            return Ok(crate::families::apply(transform, &self.hp, data, &stored));
        }
        Err(FormatError::MissingTensor { name: hf })
    }
}

// ------------------------------------------------------------------------ GGUF

struct GgufSource<'a> {
    map: &'a memmap2::Mmap,
    file: GgufFile<'a>,
    path: PathBuf,
    hp: HParams,
    arch: &'static crate::gguf_arch::GgufArch,
}

impl<'a> GgufSource<'a> {
    fn new(map: &'a memmap2::Mmap, path: &Path) -> Result<GgufSource<'a>> {
        let file = GgufFile::parse(map)?;
        let (arch, config) = crate::gguf_arch::config_from_gguf(&file)?;
        let (hp, _) = crate::families::hparams_from_config(&config)?;
        Ok(GgufSource {
            map,
            file,
            path: path.to_path_buf(),
            hp,
            arch,
        })
    }

    /// The stored tensor holding canonical `name` (row-major shape
    /// `expected`), checked to have the shape it must have, and how `name`
    /// is taken from it.
    fn checked_tensor(
        &self,
        name: &str,
        expected: &[u64],
    ) -> Result<(&crate::gguf::GgufTensor<'a>, Transform)> {
        let (gguf_name, transform) = crate::gguf_arch::gguf_tensor(self.arch, name);
        let expected = &crate::families::stored_shape(transform, &self.hp, expected)[..];
        let t = self
            .file
            .tensor(&gguf_name)
            .ok_or(FormatError::MissingTensor { name: gguf_name })?;
        let shape: Vec<u64> = t.ne.iter().rev().copied().collect();
        if shape != expected {
            return Err(FormatError::BadShape {
                name: name.into(),
                shape,
                why: format!("expected {expected:?} from the GGUF hyper-parameters"),
            });
        }
        Ok((t, transform))
    }

    /// Heads whose rows llama.cpp permuted for its rotary order (q and k).
    fn rotary_heads(&self, name: &str) -> Option<usize> {
        if !self.arch.permuted_qk {
            None
        } else if name.ends_with("attn_q.weight") {
            Some(self.hp.n_head)
        } else if name.ends_with("attn_k.weight") {
            Some(self.hp.n_head_kv)
        } else {
            None
        }
    }

    /// The GGUF's own tokenizer (`tokenizer.ggml.*`) and chat template; a
    /// `tokenizer.json` / `tokenizer_config.json` beside the file only where
    /// the GGUF lacks them; the family's known template where neither has one.
    fn tokenizer_info(&self) -> Result<TokenizerInfo> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let in_file = |e: FormatError| e.in_file(&self.path);
        let embedded = crate::gguf_tokenizer::from_gguf(&self.file).map_err(in_file)?;
        let tj = dir.join("tokenizer.json");
        let (json, mut bos_id, mut eos_ids) = match embedded {
            Some(t) => (Some(t.json), t.bos_id, t.eos_ids),
            None if tj.is_file() => (
                Some(std::fs::read(&tj).map_err(|e| FormatError::io(&tj, e))?),
                None,
                Vec::new(),
            ),
            None => (None, None, Vec::new()),
        };
        let id = |k: &str| self.file.get(k).and_then(|v| v.as_u64());
        if bos_id.is_none() {
            bos_id = id("tokenizer.ggml.bos_token_id");
        }
        if eos_ids.is_empty() {
            eos_ids = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        }
        let mut chat_template_fallback = None;
        let chat_template = match self
            .file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
        {
            Some(t) => Some(t.to_string()),
            None => match chat_template_from_dir(dir)? {
                Some(t) => Some(t),
                None => crate::gguf_tokenizer::fallback_chat_template(self.arch.name).map(
                    |(family, t)| {
                        chat_template_fallback = Some(family.to_string());
                        t.to_string()
                    },
                ),
            },
        };
        Ok(TokenizerInfo {
            json,
            chat_template,
            chat_template_fallback,
            bos_id,
            eos_ids,
        })
    }
}

impl Source for GgufSource<'_> {
    fn hparams(&self) -> &HParams {
        &self.hp
    }

    fn tensor_f32(&self, name: &str, expected: &[u64]) -> Result<Vec<f32>> {
        let (t, transform) = self.checked_tensor(name, expected)?;
        let mut data = vec![0f32; t.n_elements() as usize];
        dequantize(t, &mut data)?;
        if transform != Transform::Plain {
            let stored: Vec<u64> = t.ne.iter().rev().copied().collect();
            data = crate::families::apply(transform, &self.hp, data, &stored);
        }
        if let Some(n_heads) = self.rotary_heads(name) {
            data = unpermute_rotary_rows(&data, n_heads, self.hp.head_dim, self.hp.n_embd);
        }
        Ok(data)
    }

    fn done_with(&self, name: &str) {
        let (gguf_name, _) = crate::gguf_arch::gguf_tensor(self.arch, name);
        if let Some(t) = self.file.tensor(&gguf_name) {
            let offset = t.data.as_ptr() as usize - self.map.as_ptr() as usize;
            crate::storage::release_mapped_pages(self.map, offset, t.data.len());
        }
    }

    fn stored_float(&self, name: &str) -> Option<DType> {
        let (gguf_name, _) = crate::gguf_arch::gguf_tensor(self.arch, name);
        match self.file.tensor(&gguf_name)?.ggml_type {
            crate::gguf::GgmlType::F32 => Some(DType::F32),
            crate::gguf::GgmlType::F16 => Some(DType::F16),
            crate::gguf::GgmlType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    fn tensor_packed(&self, name: &str, expected: &[u64]) -> Result<Option<GroupedWeight>> {
        let (t, transform) = self.checked_tensor(name, expected)?;
        if transform != Transform::Plain {
            // Fused tensors are split from their decoded values.
            return Ok(None);
        }
        let Some((dtype, mut bytes)) = crate::gguf::transcode_blocks(t) else {
            return Ok(None);
        };
        let (rows, cols) = (expected[0] as usize, expected[1] as usize);
        let row_bytes = bytes.len() / rows;
        if let Some((block, _)) = dtype.gguf_block() {
            if let Some(n_heads) = self.rotary_heads(name) {
                bytes = unpermute_rotary_rows(&bytes, n_heads, self.hp.head_dim, row_bytes);
            }
            return Ok(Some(GroupedWeight {
                dtype,
                group_size: block as u32,
                bytes,
                perm: None,
            }));
        }
        // Every group header starts with an f16 scale (and Q4GM an f16 min).
        for (g, h) in bytes.chunks_exact(row_bytes / (cols / 32)).enumerate() {
            let bad = |v: f16| !v.is_finite();
            let scale = f16::from_le_bytes([h[0], h[1]]);
            let min = f16::from_le_bytes([h[2], h[3]]);
            if bad(scale) || (dtype.has_float_min() && bad(min)) {
                return Err(FormatError::BadValue {
                    key: name.into(),
                    why: format!("non-finite scale or minimum in block {g}"),
                });
            }
        }
        if let Some(n_heads) = self.rotary_heads(name) {
            bytes = unpermute_rotary_rows(&bytes, n_heads, self.hp.head_dim, row_bytes);
        }
        Ok(Some(GroupedWeight {
            dtype,
            group_size: 32,
            bytes,
            perm: None,
        }))
    }
}

/// Undo llama.cpp's q/k row permutation: GGUF row `h*hd + 2i + j` holds
/// Hugging Face row `h*hd + j*hd/2 + i` (interleaved vs. rotate-half RoPE pairs).
pub fn unpermute_rotary_rows<T: Copy + Default>(
    w: &[T],
    n_heads: usize,
    head_dim: usize,
    n_cols: usize,
) -> Vec<T> {
    move_rotary_rows(w, n_heads, head_dim, n_cols, false)
}

/// The inverse of [`unpermute_rotary_rows`]: canonical rows back to
/// llama.cpp's order (for writing GGUF files).
pub fn permute_rotary_rows<T: Copy + Default>(
    w: &[T],
    n_heads: usize,
    head_dim: usize,
    n_cols: usize,
) -> Vec<T> {
    move_rotary_rows(w, n_heads, head_dim, n_cols, true)
}

fn move_rotary_rows<T: Copy + Default>(
    w: &[T],
    n_heads: usize,
    head_dim: usize,
    n_cols: usize,
    to_gguf: bool,
) -> Vec<T> {
    let mut out = vec![T::default(); w.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = (h * head_dim + 2 * i + j) * n_cols;
                let hf = (h * head_dim + j * half + i) * n_cols;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst..dst + n_cols].copy_from_slice(&w[src..src + n_cols]);
            }
        }
    }
    out
}
