//! A loaded model: the `.nib` image (memory-mapped or in memory), its
//! hyper-parameters, a table of weight locations, and the tokenizer.
//!
//! Weights are not copied at load: [`Weight`] records where a tensor lives
//! in the image and [`Model::data`] hands out zero-copy typed slices, so
//! the resident memory is the mapped file. The one exception is chosen for
//! speed: on CPUs with the interleaved kernels, packed group matrices and GGUF
//! `Q5_0`/`Q8_0` blocks ([`Model::x8`]) and `Q4_K`/`Q6_K` blocks
//! ([`Model::x8k`]) are also kept interleaved by eight rows (`NIBBLE_X8=0`
//! turns it off).

use std::path::Path;

use rayon::prelude::*;

use half::{bf16, f16};
use nibble_format::import::{open_any, ImportOptions, Progress};
use nibble_format::{keys, DType, HParams, NibFile, TensorInfo};

use crate::block::{Lin, Vector};
use crate::error::{Result, RuntimeError};
use crate::kernels::{Kernels, PackedRows, X8KRows, X8Rows};
use crate::tokenizer::Tokenizer;

/// Location and type of one weight matrix (or vector) inside the image.
#[derive(Clone, Copy, Debug)]
pub struct Weight {
    pub dtype: DType,
    /// Output dimension (1 for vectors).
    pub rows: usize,
    /// Input dimension (contiguous).
    pub cols: usize,
    /// Group size of packed integer types (0 for float types).
    pub group_size: usize,
    offset: usize,
    nbytes: usize,
    /// Act-order permutation `(offset, len)`: stored column j multiplies
    /// input `perm[j]`. Applied once per input vector, never per group.
    perm: Option<(usize, usize)>,
    /// Index of this weight's rows interleaved by eight in `Model::x8`
    /// (packed weights, on CPUs with the kernel).
    x8: Option<usize>,
}

impl Weight {
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }
    pub fn has_perm(&self) -> bool {
        self.perm.is_some()
    }
    /// Identifies the permutation (its offset in the image): weights that
    /// share an input and a permutation share its gathered input.
    pub fn perm_key(&self) -> usize {
        self.perm.map_or(usize::MAX, |(off, _)| off)
    }
}

/// Weights that read one input (q/k/v; gate/up) and carry equal act-order
/// permutations (GPTQ prepares their shared Hessian once, so it writes the
/// same order for each) take the first one's: equal [`Weight::perm_key`]s,
/// so the input is gathered and quantized once for all of them rather than
/// once per weight.
fn share_equal_perms(bytes: &[u8], group: &mut [&mut Weight]) {
    for i in 1..group.len() {
        let Some((off, len)) = group[i].perm else {
            continue;
        };
        let same = group[..i].iter().find_map(|w| {
            w.perm
                .filter(|&(o, l)| l == len && bytes[o..o + l] == bytes[off..off + len])
        });
        if same.is_some() {
            group[i].perm = same;
        }
    }
}

/// Typed, zero-copy rows of a weight: `rows × cols`, row-major.
pub enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Packed integer groups (`format::quant` layout), validated rows.
    Packed(PackedRows<'a>),
}

/// Weights of one decoder block. Shapes are `[rows, cols]` = `[out, in]`;
/// q/k rows in the rotate-half RoPE layout.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `[n_head·head_dim, n_embd]`.
    pub attn_q: Weight,
    /// `[n_head_kv·head_dim, n_embd]`.
    pub attn_k: Weight,
    /// `[n_head_kv·head_dim, n_embd]`.
    pub attn_v: Weight,
    /// `[n_embd, n_head·head_dim]`.
    pub attn_output: Weight,
    /// `[n_ff, n_embd]`, in gated MLPs.
    pub ffn_gate: Option<Weight>,
    /// `[n_ff, n_embd]`.
    pub ffn_up: Weight,
    /// `[n_embd, n_ff]`.
    pub ffn_down: Weight,
    /// Norm weights and biases (F32), by [`Vector`]; `None` where the
    /// model's block has no such tensor.
    pub vectors: [Option<Weight>; Vector::COUNT],
}

impl LayerWeights {
    /// The linear weight `w` (a gate only exists in gated MLPs: the block
    /// asks for it only then).
    pub fn linear(&self, w: Lin) -> &Weight {
        match w {
            Lin::Q => &self.attn_q,
            Lin::K => &self.attn_k,
            Lin::V => &self.attn_v,
            Lin::Out => &self.attn_output,
            Lin::Gate => self
                .ffn_gate
                .as_ref()
                .expect("a gated MLP's gate is checked at load"),
            Lin::Up => &self.ffn_up,
            Lin::Down => &self.ffn_down,
        }
    }

    /// Every linear weight of the block, mutably.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Weight> {
        [
            Some(&mut self.attn_q),
            Some(&mut self.attn_k),
            Some(&mut self.attn_v),
            Some(&mut self.attn_output),
            self.ffn_gate.as_mut(),
            Some(&mut self.ffn_up),
            Some(&mut self.ffn_down),
        ]
        .into_iter()
        .flatten()
    }
}

/// A model ready to run: shared read-only by any number of sessions.
pub struct Model {
    file: NibFile,
    name: String,
    pub hparams: HParams,
    /// `[n_vocab, n_embd]`.
    pub token_embd: Weight,
    /// `[n_ctx_train, n_embd]` learned positions (GPT-2, OPT).
    pub pos_embd: Option<Weight>,
    pub layers: Vec<LayerWeights>,
    /// `[n_embd]` final norm (F32), and its bias for LayerNorm.
    pub output_norm: Weight,
    pub output_norm_bias: Option<Weight>,
    /// `[n_vocab, n_embd]`; the same location as `token_embd` when tied.
    pub output: Weight,
    /// `(offset, len)` of the embedded tokenizer.json inside the image.
    tokenizer_json: Option<(usize, usize)>,
    /// Parsed on first use, so that loading stays O(metadata): building a
    /// 50k-token BPE takes ~100 ms, far more than mapping the file.
    tokenizer: std::sync::OnceLock<std::result::Result<Tokenizer, String>>,
    pub chat_template: Option<String>,
    /// Set when `chat_template` is the family's known template standing in
    /// for one the source lacked: that family's name.
    pub chat_template_fallback: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    /// The kernels chosen at load (CPU features or `NIBBLE_ISA`).
    kernels: &'static Kernels,
    /// Packed matrices interleaved by eight rows for the decoding kernels
    /// (`kernels::qg_x8`, `kernels::qk_x8`), built at load when this CPU
    /// has those kernels.
    x8: Vec<Interleaved>,
    /// Bytes of the mapped file whose pages were released after the copies
    /// ([`NibFile::release_pages`]).
    x8_released: usize,
}

/// A weight's copy interleaved by eight rows.
#[derive(Debug)]
enum Interleaved {
    /// Packed groups and GGUF `Q4_0`/`Q5_0`/`Q8_0` blocks ([`X8Rows`]).
    Groups(X8Rows),
    /// GGUF `Q4_K` / `Q6_K` super-blocks ([`X8KRows`]).
    KQuant(X8KRows),
}

impl Interleaved {
    fn bytes(&self) -> usize {
        match self {
            Interleaved::Groups(c) => c.bytes(),
            Interleaved::KQuant(c) => c.bytes(),
        }
    }
}

/// Interleave every packed matrix the decoding products read (the layers
/// and the output head) when this CPU's best kernel table has the
/// interleaved kernel and `NIBBLE_X8` is not `0`: the copy costs their size
/// in memory and makes the 4-bit products ~3× faster per weight (docs/runtime-performance.md,
/// "Rows interleaved by eight"); 3- and 2-bit codes are widened to 4 bits in the copy, so they
/// run at the 4-bit kernels' speed. GGUF `Q4_K` and `Q6_K` blocks get their
/// own copies where the table has those kernels (`kernels::qk_x8`, docs/gguf.md).
/// The embedding lookup keeps reading the file's rows.
///
/// Each copied matrix's pages of a memory-mapped file are then released
/// ([`NibFile::release_pages`]), so the copy does not make the process hold
/// the model's bytes twice: resident memory stays near the file's size. A
/// tied embedding is released too: its lookups then fault in only the pages
/// of the rows they read. Returns the copies and the bytes released.
fn interleave_for_decoding(
    file: &NibFile,
    layers: &mut [LayerWeights],
    output: &mut Weight,
) -> (Vec<Interleaved>, usize) {
    let best = Kernels::for_isa(crate::kernels::Isa::detect());
    let enabled = std::env::var("NIBBLE_X8").map_or(true, |v| v.trim() != "0");
    let groups = enabled && best.is_some_and(|k| k.matvec_x8.is_some());
    let kquant = enabled && best.is_some_and(|k| k.matvec_x8k.is_some());
    let mut out = Vec::new();
    if !groups && !kquant {
        return (out, 0);
    }
    let mut weights: Vec<&mut Weight> = layers
        .iter_mut()
        .flat_map(LayerWeights::linears_mut)
        .chain(std::iter::once(output))
        .filter(|w| match w.dtype {
            DType::Q2G | DType::Q3G | DType::Q4G | DType::Q4GM | DType::Q8G | DType::Q5_0 => groups,
            DType::Q4K | DType::Q6K => kquant,
            _ => false,
        })
        .collect();
    // In parallel: SmolLM2's ~90 MB of packed weights take ~100 ms on one core.
    // Released part by part during each copy (a few MB at a time), so
    // resident memory never holds both copies of a matrix: Qwen2.5-Coder-1.5B's
    // tied Q6_K head alone is 190 MB.
    let copies: Vec<(Option<Interleaved>, usize)> = weights
        .par_iter()
        .map(|w| {
            let bytes = &file.bytes()[w.offset..w.offset + w.nbytes];
            let rows = PackedRows::new(w.dtype, bytes, w.rows, w.cols, w.group_size)
                .expect("packed sizes are checked at load");
            let row_bytes = rows.row_bytes();
            let release = |r: std::ops::Range<usize>| {
                file.release_pages(w.offset + r.start * row_bytes, r.len() * row_bytes);
            };
            let copy = match w.dtype {
                DType::Q4K | DType::Q6K => {
                    X8KRows::interleave_by_parts(rows, release).map(Interleaved::KQuant)
                }
                _ => X8Rows::interleave_by_parts(rows, release).map(Interleaved::Groups),
            };
            let released = if copy.is_some() {
                file.release_pages(w.offset, w.nbytes)
            } else {
                0
            };
            (copy, released)
        })
        .collect();
    let mut released = 0;
    for (w, (copy, r)) in weights.iter_mut().zip(copies) {
        released += r;
        if let Some(x8) = copy {
            w.x8 = Some(out.len());
            out.push(x8);
        }
    }
    (out, released)
}

impl Model {
    /// Load a `.nib` (memory-mapped), or convert an HF folder / GGUF file in
    /// memory (F32 by default, so results match the float reference).
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let opts = ImportOptions {
            dtype: DType::F32,
            hash_source: false,
            keep_blocks: false,
            lora: Vec::new(),
        };
        Self::load_with(path, &opts, &mut |_, _, _| {})
    }

    /// As [`Model::load`], with import options and a progress callback.
    pub fn load_with(
        path: impl AsRef<Path>,
        opts: &ImportOptions,
        progress: Progress<'_>,
    ) -> Result<Model> {
        let path = path.as_ref();
        let file = open_any(path, opts, progress)?;
        Self::from_nib(file, path.display().to_string())
    }

    /// Build a model over an already validated image.
    pub fn from_nib(file: NibFile, name: String) -> Result<Model> {
        let view = file.view()?;
        let in_file = |e: nibble_format::FormatError| RuntimeError::Format(e.in_file(&name));
        let hp = HParams::read(&view.metadata).map_err(in_file)?;
        let find = |tname: &str, shape: &[u64], float_only: bool| -> Result<Weight> {
            let t: &TensorInfo = view
                .tensor(tname)
                .ok_or_else(|| RuntimeError::MissingTensor {
                    model: name.clone(),
                    name: tname.into(),
                })?;
            if t.shape != shape {
                return Err(RuntimeError::TensorShape {
                    model: name.clone(),
                    name: tname.into(),
                    expected: shape.to_vec(),
                    found: t.shape.clone(),
                });
            }
            if float_only && t.dtype != DType::F32 {
                return Err(RuntimeError::TensorDtype {
                    model: name.clone(),
                    name: tname.into(),
                    expected: "F32",
                    found: t.dtype.to_string(),
                });
            }
            let (rows, cols) = match *shape {
                [c] => (1, c as usize),
                [r, c] => (r as usize, c as usize),
                _ => unreachable!("model tensors are 1-D or 2-D"),
            };
            if matches!(t.dtype, DType::U32) {
                return Err(RuntimeError::TensorDtype {
                    model: name.clone(),
                    name: tname.into(),
                    expected: "a float or packed integer type",
                    found: t.dtype.to_string(),
                });
            }
            let perm_name = format!("{}.perm", tname.trim_end_matches(".weight"));
            let perm = match view.tensor(&perm_name) {
                None => None,
                Some(p) => {
                    let bad = |why: &str| RuntimeError::TensorShape {
                        model: name.clone(),
                        name: format!("{perm_name} ({why})"),
                        expected: vec![cols as u64],
                        found: p.shape.clone(),
                    };
                    if p.dtype != DType::U32 || p.shape != [cols as u64] {
                        return Err(bad("must be U32 of the weight's input width"));
                    }
                    let mut seen = vec![false; cols];
                    for c in p.data.chunks_exact(4) {
                        let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
                        if v >= cols || std::mem::replace(&mut seen[v], true) {
                            return Err(bad("not a permutation"));
                        }
                    }
                    Some((p.offset as usize, p.data.len()))
                }
            };
            Ok(Weight {
                dtype: t.dtype,
                rows,
                cols,
                group_size: t.quant_param as usize,
                offset: t.offset as usize,
                nbytes: t.data.len(),
                perm,
                x8: None,
            })
        };
        let specs = hp.tensor_specs();
        let shape_of = |n: &str| {
            specs
                .iter()
                .find(|(s, _)| s == n)
                .map(|(_, sh)| sh.clone())
                .expect("canonical name")
        };
        let get = |n: &str| find(n, &shape_of(n), false);
        let norm = |n: &str| find(n, &shape_of(n), true);
        let has = |n: &str| specs.iter().any(|(s, _)| s == n);
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let b = |s: &str| format!("blk.{i}.{s}.weight");
            let mut vectors = [None; Vector::COUNT];
            for (slot, v) in vectors.iter_mut().zip(Vector::ALL) {
                let n = format!("blk.{i}.{}", v.name());
                if has(&n) {
                    *slot = Some(norm(&n)?);
                }
            }
            let gate = b("ffn_gate");
            let mut lw = LayerWeights {
                attn_q: get(&b("attn_q"))?,
                attn_k: get(&b("attn_k"))?,
                attn_v: get(&b("attn_v"))?,
                attn_output: get(&b("attn_output"))?,
                ffn_gate: if has(&gate) { Some(get(&gate)?) } else { None },
                ffn_up: get(&b("ffn_up"))?,
                ffn_down: get(&b("ffn_down"))?,
                vectors,
            };
            let bytes = file.bytes();
            share_equal_perms(bytes, &mut [&mut lw.attn_q, &mut lw.attn_k, &mut lw.attn_v]);
            if let Some(g) = lw.ffn_gate.as_mut() {
                share_equal_perms(bytes, &mut [g, &mut lw.ffn_up]);
            }
            layers.push(lw);
        }
        let token_embd = get("token_embd.weight")?;
        let pos_embd = if has("pos_embd.weight") {
            Some(get("pos_embd.weight")?)
        } else {
            None
        };
        let output_norm_bias = if has("output_norm.bias") {
            Some(norm("output_norm.bias")?)
        } else {
            None
        };
        let mut output = if hp.tie_embeddings {
            token_embd
        } else {
            get("output.weight")?
        };
        let output_norm = norm("output_norm.weight")?;

        let md = &view.metadata;
        let base = file.bytes().as_ptr() as usize;
        let tokenizer_json = md
            .opt_bytes(keys::TOKENIZER_JSON)
            .map_err(in_file)?
            .map(|json| (json.as_ptr() as usize - base, json.len()));
        let chat_template = md
            .opt_str(keys::CHAT_TEMPLATE)
            .map_err(in_file)?
            .map(str::to_string);
        let chat_template_fallback = md
            .opt_str(keys::CHAT_TEMPLATE_FALLBACK)
            .map_err(in_file)?
            .map(str::to_string);
        let to_id = |v: u64| -> Result<u32> {
            u32::try_from(v)
                .ok()
                .filter(|&id| (id as usize) < hp.n_vocab)
                .ok_or_else(|| {
                    in_file(nibble_format::FormatError::BadValue {
                        key: "special token id".into(),
                        why: format!("{v} is outside the vocabulary of {}", hp.n_vocab),
                    })
                })
        };
        let bos_id = md
            .opt_u64(keys::BOS_ID)
            .map_err(in_file)?
            .map(to_id)
            .transpose()?;
        let eos_ids = md
            .opt_u64_array(keys::EOS_IDS)
            .map_err(in_file)?
            .unwrap_or_default()
            .into_iter()
            .map(to_id)
            .collect::<Result<Vec<u32>>>()?;
        drop(view);
        let kernels = Kernels::from_env().map_err(RuntimeError::InvalidParam)?;
        let (x8, x8_released) = interleave_for_decoding(&file, &mut layers, &mut output);
        Ok(Model {
            file,
            name,
            hparams: hp,
            token_embd,
            pos_embd,
            layers,
            output_norm,
            output_norm_bias,
            output,
            tokenizer_json,
            tokenizer: std::sync::OnceLock::new(),
            chat_template,
            chat_template_fallback,
            bos_id,
            eos_ids,
            kernels,
            x8,
            x8_released,
        })
    }

    /// `w`'s rows interleaved by eight, if the model keeps such a copy.
    pub fn x8(&self, w: &Weight) -> Option<&X8Rows> {
        match w.x8.map(|i| &self.x8[i]) {
            Some(Interleaved::Groups(c)) => Some(c),
            _ => None,
        }
    }

    /// `w`'s `Q4_K` / `Q6_K` rows interleaved by eight, if the model keeps
    /// such a copy.
    pub fn x8k(&self, w: &Weight) -> Option<&X8KRows> {
        match w.x8.map(|i| &self.x8[i]) {
            Some(Interleaved::KQuant(c)) => Some(c),
            _ => None,
        }
    }

    /// Bytes of the interleaved copies ([`Model::x8`]).
    pub fn x8_bytes(&self) -> usize {
        self.x8.iter().map(Interleaved::bytes).sum()
    }

    /// Bytes of the memory-mapped file released from resident memory once
    /// interleaved ([`NibFile::release_pages`]; 0 for a model converted in
    /// memory). Reading them again (e.g. through a kernel table without the
    /// interleaved kernel) faults them back in from the file, unchanged.
    pub fn x8_released_bytes(&self) -> usize {
        self.x8_released
    }

    /// The kernel table this model runs with.
    pub fn kernels(&self) -> &'static Kernels {
        self.kernels
    }

    /// Use another kernel table (benchmarks and tests compare paths).
    pub fn set_kernels(&mut self, kernels: &'static Kernels) {
        self.kernels = kernels;
    }

    /// Display name (the path it was loaded from).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &NibFile {
        &self.file
    }

    /// The tokenizer, or a clear error if the model has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        let (off, len) = self
            .tokenizer_json
            .ok_or_else(|| RuntimeError::NoTokenizer {
                model: self.name.clone(),
            })?;
        let parsed = self.tokenizer.get_or_init(|| {
            Tokenizer::from_bytes(&self.file.bytes()[off..off + len]).map_err(|e| e.to_string())
        });
        parsed.as_ref().map_err(|e| {
            RuntimeError::Tokenizer(format!("{}: embedded tokenizer.json: {e}", self.name))
        })
    }

    /// Whether the model embeds a tokenizer.
    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer_json.is_some()
    }

    /// Zero-copy typed view of a weight's data.
    pub fn data(&self, w: &Weight) -> WeightData<'_> {
        let bytes = &self.file.bytes()[w.offset..w.offset + w.nbytes];
        // Offsets are 64-aligned within a 64-aligned (or page-aligned) image
        // and lengths were checked against shape × dtype at load.
        match w.dtype {
            DType::F32 => WeightData::F32(bytemuck::cast_slice(bytes)),
            DType::F16 => WeightData::F16(bytemuck::cast_slice(bytes)),
            DType::BF16 => WeightData::BF16(bytemuck::cast_slice(bytes)),
            DType::U32 => unreachable!("rejected at load"),
            _ => WeightData::Packed(
                PackedRows::new(w.dtype, bytes, w.rows, w.cols, w.group_size)
                    .expect("packed sizes are checked at load"),
            ),
        }
    }

    /// The act-order permutation of a weight, if any.
    pub fn perm(&self, w: &Weight) -> Option<&[u32]> {
        w.perm
            .map(|(off, len)| bytemuck::cast_slice(&self.file.bytes()[off..off + len]))
    }

    /// Vector `v` of layer `layer`, if the model has it.
    pub fn layer_vector(&self, layer: usize, v: Vector) -> Option<&[f32]> {
        self.layers[layer].vectors[v as usize]
            .as_ref()
            .map(|w| self.vector(w))
    }

    /// An F32 vector weight (norms).
    pub fn vector(&self, w: &Weight) -> &[f32] {
        match self.data(w) {
            WeightData::F32(v) => v,
            _ => unreachable!("norm weights are checked to be F32 at load"),
        }
    }

    /// Total bytes of weights streamed per decoded token: every matrix
    /// once, from its interleaved copy where it has one ([`Model::x8`]:
    /// symmetric copies are smaller than the file's rows), plus the one
    /// embedding row looked up when the head is a separate matrix.
    pub fn weight_bytes(&self) -> usize {
        let read = |w: &Weight| w.x8.map_or(w.nbytes, |i| self.x8[i].bytes());
        let mut n = read(&self.output) + self.output_norm.nbytes;
        if !self.hparams.tie_embeddings {
            n += self.token_embd.nbytes / self.token_embd.rows.max(1);
        }
        for l in &self.layers {
            for w in Lin::ALL
                .iter()
                .filter(|&&w| w != Lin::Gate || l.ffn_gate.is_some())
            {
                n += read(l.linear(*w));
            }
            n += l.vectors.iter().flatten().map(|v| v.nbytes).sum::<usize>();
        }
        n
    }
}
