//! `nibble quantize`: compress a model's linear weights into packed integer
//! groups with GPTQ (calibrated) or RTN.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use nibble_format::import::{open_any, ImportOptions};
use nibble_format::{keys, AtomicFile, DType};
use nibble_quantizer::calib::calibration_windows;
use nibble_quantizer::{quantize_model, CalibInfo, Method, QuantizeOptions};
use sha2::Digest;

use crate::commands::bar;

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// GPTQ: second-order, uses calibration text (--calib FILE, or text the model writes itself).
    Gptq,
    /// Round to nearest: fast, needs no calibration; the baseline.
    Rtn,
}

/// `--search-weight`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SearchWeightArg {
    Importance,
    LlamaCpp,
}

/// GGUF block types `quantize --gguf` writes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GgufOutArg {
    /// 4-bit symmetric groups of 32 with an f16 scale (4.5 bits per weight).
    #[value(name = "q4_0", alias = "Q4_0")]
    Q4_0,
    /// 4-bit groups of 32 with an f16 scale and a free f16 minimum (5 bits per weight).
    #[value(name = "q4_1", alias = "Q4_1")]
    Q4_1,
    /// 5-bit symmetric groups of 32 with an f16 scale (5.5 bits per weight).
    #[value(name = "q5_0", alias = "Q5_0")]
    Q5_0,
    /// 8-bit symmetric groups of 32 with an f16 scale (8.5 bits per weight).
    #[value(name = "q8_0", alias = "Q8_0")]
    Q8_0,
    /// llama.cpp's Q3_K_S mix: Q3_K super-blocks (3.44 bits) everywhere, the head Q6_K.
    #[value(name = "q3_k_s", alias = "Q3_K_S")]
    Q3KS,
    /// llama.cpp's Q3_K_M mix: Q3_K, with attn_v in the first two layers and
    /// ffn_down in the first sixteenth Q5_K, the rest of attn_v, ffn_down and
    /// attn_output Q4_K.
    #[value(name = "q3_k_m", alias = "Q3_K_M")]
    Q3KM,
    /// llama.cpp's Q4_K_S mix: Q4_K super-blocks (4.5 bits), attn_v in the
    /// first four layers and ffn_down in the first eighth Q5_K.
    #[value(name = "q4_k_s", alias = "Q4_K_S")]
    Q4KS,
    /// llama.cpp's Q4_K_M mix: Q4_K, with attn_v and ffn_down Q6_K in the
    /// first and last eighth of the layers and every third between.
    #[value(name = "q4_k_m", alias = "Q4_K_M")]
    Q4KM,
    /// llama.cpp's Q5_K_S mix: Q5_K super-blocks (5.5 bits) everywhere.
    #[value(name = "q5_k_s", alias = "Q5_K_S")]
    Q5KS,
    /// llama.cpp's Q5_K_M mix: Q5_K, attn_v and ffn_down as in Q4_K_M (Q6_K).
    #[value(name = "q5_k_m", alias = "Q5_K_M")]
    Q5KM,
    /// Q6_K super-blocks everywhere (6.56 bits).
    #[value(name = "q6_k", alias = "Q6_K")]
    Q6K,
}

impl GgufOutArg {
    fn mix(self) -> nibble_quantizer::mix::GgufMix {
        use nibble_quantizer::mix::GgufMix;
        match self {
            GgufOutArg::Q4_0 => GgufMix::Q4_0,
            GgufOutArg::Q4_1 => GgufMix::Q4_1,
            GgufOutArg::Q5_0 => GgufMix::Q5_0,
            GgufOutArg::Q8_0 => GgufMix::Q8_0,
            GgufOutArg::Q3KS => GgufMix::Q3KS,
            GgufOutArg::Q3KM => GgufMix::Q3KM,
            GgufOutArg::Q4KS => GgufMix::Q4KS,
            GgufOutArg::Q4KM => GgufMix::Q4KM,
            GgufOutArg::Q5KS => GgufMix::Q5KS,
            GgufOutArg::Q5KM => GgufMix::Q5KM,
            GgufOutArg::Q6K => GgufMix::Q6K,
        }
    }
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    nibble quantize -m model.gguf -o model-q4.nib --method gptq --bits 4 --group-size 128 --calib my-text.txt\n  \
    nibble quantize -m hf-folder -o model-q8.nib --method rtn --bits 8 --group-size 32")]
pub struct QuantizeArgs {
    /// Source model: a Hugging Face folder, a GGUF file or a float .nib.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Output .nib (appears only when quantization completes); a report is
    /// written beside it as `<output>.report.json`.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Write a GGUF file that llama.cpp runs instead of a .nib: GPTQ with the
    /// block type's own grid (groups of 32; Q4_0, Q5_0 and Q8_0 symmetric with
    /// the extra negative level, Q4_1 with a free f16 minimum; K-quant
    /// super-blocks with all their sub-block scales chosen together), act-order
    /// within whole groups (GGUF has no permutations). Every tensor gets the
    /// type llama-quantize gives it: the head Q6_K where its width is a
    /// multiple of 256 (Q8_0 otherwise, and in a Q8_0 file), an untied token
    /// embedding the file's base type, in Q4_0 files quantized by GPTQ the
    /// first eighth of ffn_down Q4_1 (llama.cpp's guard when it has an
    /// importance matrix), and in the K mixes more bits where listed below;
    /// where a width is not a multiple of 256, a K-quant falls back as there
    /// (Q3_K → Q4_0, Q4_K → Q5_0, Q6_K → Q8_0; Q5_K → Q5_0, where llama.cpp
    /// writes Q5_1, which nibble does not run; for the same reason Q5_0 files
    /// keep Q5_0 where llama.cpp's guard writes Q5_1). Norms stay F32; the
    /// source GGUF's metadata, tokenizer and chat template are carried over.
    /// Damping defaults to 1000 here (the importance-weighted grid search
    /// without GPTQ's error compensation: it measured better at these
    /// groups of 32; see --damp). The source must be a GGUF file (-m model.gguf).
    #[arg(long, value_enum, value_name = "TYPE", conflicts_with_all = ["bits", "group_size", "sym", "free_min", "head_bits"])]
    gguf: Option<GgufOutArg>,
    #[arg(long, value_enum, default_value = "gptq")]
    method: MethodArg,
    /// Bits per weight: 2, 3, 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Columns per group: a multiple of 32, or 0 for one group per row.
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Symmetric grid (zero point fixed at the middle code).
    #[arg(long)]
    sym: bool,
    /// 4-bit asymmetric groups whose minimum is any f16 value instead of an
    /// integer zero point (`Q4GM`, GGUF's Q4_1 grid): a group whose weights
    /// all sit away from 0 keeps all 16 levels on them. Same size as the
    /// integer zero point (4 bytes per group).
    #[arg(long, conflicts_with = "sym")]
    free_min: bool,
    /// Also store the token embedding / output head as integer groups of 32
    /// (RTN) at 4 or 8 bits, instead of F16. On small models the head is a
    /// large share of the bytes read per token (SmolLM2: 28 M of 135 M weights).
    #[arg(long, value_name = "BITS")]
    head_bits: Option<u32>,
    /// GPTQ: process columns by decreasing Hessian diagonal (stored permuted:
    /// the runtime gathers an input once for the weights that read it, never
    /// per group, and the down projection's order is folded into gate/up).
    /// The default: on SmolLM2 it beat GPTQ without it at every setting
    /// measured, for 2-6 % of prompt speed (docs/quantization.md, "Why act-order is the
    /// default").
    #[arg(long, conflicts_with = "no_act_order")]
    act_order: bool,
    /// GPTQ: process columns in their stored order (the reference code's
    /// default). On SmolLM2 this put 8-29× RTN's squared error on the value
    /// vector of each sequence's first position in blocks 12-23 (blocks
    /// 12-29 put 31-64 % of all attention on that position), and lost to RTN
    /// at 4 bits (docs/quantization.md).
    #[arg(long)]
    no_act_order: bool,
    /// GPTQ with act-order: keep each group's columns together (groups by
    /// their largest Hessian diagonal, columns within a group by theirs), so
    /// groups stay contiguous and the file needs no permutation.
    #[arg(long, conflicts_with_all = ["no_act_order", "static_groups"])]
    act_order_groups: bool,
    /// GPTQ with act-order: fix each group's grid up front on contiguous columns.
    #[arg(long)]
    static_groups: bool,
    /// GPTQ: quantize q/k/v, then o, then gate/up, then down, each seeing inputs
    /// produced by the already-quantized sub-layers. The default: it is both
    /// more accurate and faster (one forward pass per block instead of two).
    #[arg(long, conflicts_with = "no_true_sequential")]
    true_sequential: bool,
    /// GPTQ: take every sub-layer's inputs from the float block instead (the
    /// GPTQ reference code's default); costs a second forward pass per block.
    #[arg(long)]
    no_true_sequential: bool,
    /// GPTQ: choose each group's scale (and zero) when the group begins by
    /// trying candidate grids on its current weights, each weight's error
    /// weighted by its input's mean square (the Hessian diagonal), refitting the scale
    /// by weighted least squares; symmetric grids become Q4_0's signed ones
    /// (the largest weight may take the extra negative level). The default:
    /// on SmolLM2 written as GGUF Q4_0 it took wikitext-2 perplexity from
    /// 28.07 to 22.93 (docs/quantization.md, "GPTQ against llama.cpp's
    /// importance matrix").
    #[arg(long, conflicts_with = "no_scale_search")]
    scale_search: bool,
    /// GPTQ: each group's grid from the min and max of its weights, as the
    /// GPTQ reference code does (its codes, exactly).
    #[arg(long)]
    no_scale_search: bool,
    /// GPTQ: what the grid search weights each weight's squared error by:
    /// `importance`, its input's mean square (the Hessian diagonal), or
    /// `llama-cpp`, that times √(σ² + w²) as llama-quantize does with an
    /// importance matrix (σ² the row's mean square, twice the super-block's
    /// in Q3_K–Q5_K). Applies to groups chosen as GPTQ reaches them and to
    /// K-quant super-blocks. Default: `llama-cpp` with --gguf (with
    /// Shakespeare statistics, Qwen2.5-Coder-0.5B Q4_0 read 45.94 against
    /// 48.31 by importance; SmolLM2 22.17 against 21.83, both ahead of
    /// llama.cpp's 22.28), `importance` for .nib files, where GPTQ's
    /// compensation acts (SmolLM2: 22.76 against 23.34; docs/quantization.md).
    #[arg(long, value_enum, value_name = "WEIGHT")]
    search_weight: Option<SearchWeightArg>,
    /// GPTQ calibration text (plain UTF-8): text like what the model will see (a
    /// few hundred KB is plenty), never your evaluation text. It matters
    /// most with --no-act-order (docs/quantization.md, "Calibration text matters"). Default, or
    /// `--calib self`: the model writes its own calibration text (⌈nsamples/8⌉
    /// sequences, at least 16, of seqlen tokens sampled from BOS at
    /// temperature 1, no top-p cut, seeded) and the windows are drawn from
    /// it as from a file; it needs no data but costs those decoded tokens
    /// before quantization starts (16 × 512 tokens: about 15 s on two cores
    /// for SmolLM2-135M).
    #[arg(long, value_name = "FILE|self")]
    calib: Option<PathBuf>,
    /// GPTQ: number of calibration windows.
    #[arg(long, default_value_t = 128)]
    nsamples: usize,
    /// GPTQ: tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    seqlen: usize,
    /// GPTQ: damping as a fraction of the mean Hessian diagonal (raised
    /// automatically if needed). Larger values trust the calibration text
    /// less; at 1000 GPTQ's error compensation vanishes and only the grid
    /// search weighted by each input's mean square is left. Default 0.01
    /// (the GPTQ reference's), and 1000 with --gguf: measured on SmolLM2
    /// (wikitext-2), compensation is what makes 3-bit groups of 128 work
    /// (40.7 against 59.5 without) but at GGUF's 4-bit groups of 32 it fits
    /// the calibration text and loses (Q4_0: 22.89 against 21.99 calibrated on
    /// the model's own text, 22.93 against 22.04 on Shakespeare;
    /// docs/quantization.md).
    #[arg(long)]
    damp: Option<f64>,
    /// Seed of the calibration window sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0 = one per physical core; at most the CPUs this
    /// process may use).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// Merge a PEFT LoRA adapter folder into the float weights before
    /// calibration (W + SCALE · alpha/r · B·A), so GPTQ quantizes the merged
    /// model: fine-tune, merge, quantize in one command. Repeatable; the
    /// adapters and their SHA-256 are recorded in the file's provenance.
    #[arg(long = "lora", value_name = "ADAPTER[:SCALE]", value_parser = crate::commands::parse_lora)]
    lora: Vec<nibble_format::lora::LoraSpec>,
    /// GPTQ: also write the calibration's importance matrix (each linear
    /// input's mean square, half the Hessian diagonal) as a llama.cpp GGUF
    /// imatrix file, for `llama-quantize --imatrix FILE`.
    #[arg(long, value_name = "FILE")]
    imatrix_out: Option<PathBuf>,
    /// GPTQ without calibration text or forward passes: read each linear
    /// input's mean square from an importance-matrix file (`llama-imatrix
    /// -o FILE`, or nibble's --imatrix-out) and quantize with the grid search
    /// weighted by it (each layer's Hessian taken as that diagonal, so there
    /// is no error compensation; groups keep their columns together).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["calib", "imatrix_out", "static_groups", "no_true_sequential"])]
    imatrix: Option<PathBuf>,
}

/// GPTQ's damping by default: the reference's.
const DEFAULT_DAMP: f64 = 0.01;
/// ... and for the GGUF block types (groups of 32): large enough that the
/// error compensation vanishes (see `--damp`'s help for the measurements).
const GGUF_DAMP: f64 = 1000.0;

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    // Every setting is checked before any heavy work.
    if ![2, 3, 4, 8].contains(&a.bits) {
        bail!("--bits {} is not supported (use 2, 3, 4 or 8)", a.bits);
    }
    if let Some(b) = a.head_bits.filter(|b| ![4, 8].contains(b)) {
        bail!("--head-bits {b} is not supported (use 4 or 8)");
    }
    if a.group_size != 0 && !a.group_size.is_multiple_of(32) {
        bail!(
            "--group-size {} must be a multiple of 32 (or 0 for one group per row)",
            a.group_size
        );
    }
    if a.free_min && (a.bits != 4 || a.group_size == 0) {
        bail!(
            "--free-min is a 4-bit grouped grid (Q4GM); got --bits {} --group-size {}",
            a.bits,
            a.group_size
        );
    }
    let search_weight = a.search_weight.unwrap_or(if a.gguf.is_some() {
        SearchWeightArg::LlamaCpp
    } else {
        SearchWeightArg::Importance
    });
    let damp = a.damp.unwrap_or(if a.gguf.is_some() {
        GGUF_DAMP
    } else {
        DEFAULT_DAMP
    });
    if !(damp.is_finite() && damp > 0.0) {
        bail!("--damp {damp} must be a positive number");
    }
    let method = match a.method {
        MethodArg::Gptq => Method::Gptq,
        MethodArg::Rtn => Method::Rtn,
    };
    if method == Method::Rtn
        && (a.act_order
            || a.no_act_order
            || a.static_groups
            || a.act_order_groups
            || a.true_sequential
            || a.no_true_sequential
            || a.calib.is_some())
    {
        bail!("--[no-]act-order, --static-groups, --[no-]true-sequential and --calib only apply to --method gptq");
    }
    // A GGUF output sets each tensor's type (llama.cpp's rules: the grid
    // given here is unused) and keeps each group's columns together.
    let (bits, group_size, sym, free_min, head_bits) = match a.gguf {
        None => (a.bits, a.group_size, a.sym, a.free_min, a.head_bits),
        Some(_) => (4, 32, true, false, None),
    };
    let gguf_source = match a.gguf {
        None => None,
        Some(_) => {
            let p = nibble_format::import::resolve_model_path(&a.model)?;
            if nibble_format::import::detect(&p)? != nibble_format::import::InputKind::Gguf {
                bail!(
                    "--gguf needs a GGUF source for the output's metadata and tokenizer; {} is not one",
                    a.model.display()
                );
            }
            Some(p)
        }
    };
    let true_sequential = method == Method::Gptq && !a.no_true_sequential;
    let act_order = method == Method::Gptq && !a.no_act_order;
    if a.static_groups && !act_order {
        bail!("--static-groups only makes sense with act-order (drop --no-act-order)");
    }
    if a.imatrix.is_some() && method != Method::Gptq {
        bail!("--imatrix needs --method gptq (it replaces GPTQ's calibration text)");
    }
    let self_calib = method == Method::Gptq
        && a.imatrix.is_none()
        && a.calib.as_ref().is_none_or(|p| p.as_os_str() == "self");
    let calib_text = match (&a.calib, method) {
        (Some(p), Method::Gptq) if !self_calib => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read calibration text {}", p.display()))?,
        ),
        _ => None,
    };
    if self_calib && (a.nsamples == 0 || a.seqlen < 2) {
        bail!("--nsamples must be at least 1 and --seqlen at least 2");
    }
    let threads = crate::threads_for(a.threads);

    // The output must not be an input (or a device, a folder) before any work.
    let mut inputs = vec![a.model.as_path()];
    inputs.extend(a.calib.as_deref().filter(|_| !self_calib));
    inputs.extend(a.imatrix.as_deref());
    let imatrix = match &a.imatrix {
        Some(p) => {
            let bytes = std::fs::read(p)
                .with_context(|| format!("cannot read importance matrix {}", p.display()))?;
            Some(
                nibble_quantizer::imatrix::read_imatrix(&bytes)
                    .with_context(|| format!("importance matrix {}", p.display()))?,
            )
        }
        None => None,
    };
    nibble_format::storage::check_output(&a.output, &inputs)?;
    let mut report_path = a.output.clone().into_os_string();
    report_path.push(".report.json");
    let report_path = PathBuf::from(report_path);
    nibble_format::storage::check_output(&report_path, &inputs)?;
    if let Some(p) = &a.imatrix_out {
        if method != Method::Gptq {
            bail!("--imatrix-out needs --method gptq (RTN collects no statistics)");
        }
        if p == &a.output || p == &report_path {
            bail!(
                "--imatrix-out {} is also the model or report output",
                p.display()
            );
        }
        nibble_format::storage::check_output(p, &inputs)?;
    }

    let t0 = Instant::now();
    let pb = bar(0, "loading");
    let src = open_any(
        &a.model,
        &ImportOptions {
            dtype: DType::F32,
            hash_source: true,
            keep_blocks: false,
            lora: a.lora.clone(),
        },
        &mut |d, t, n| {
            pb.set_length(t as u64);
            pb.set_position(d as u64);
            pb.set_prefix(n.to_string());
        },
    )
    .with_context(|| format!("cannot load {}", a.model.display()))?;
    pb.finish_and_clear();
    let view = src.view()?;
    let hp = nibble_format::HParams::read(&view.metadata)?;
    if method == Method::Gptq && hp.n_ctx_train > 0 && a.seqlen > hp.n_ctx_train {
        bail!(
            "--seqlen {} exceeds the context of {} ({} tokens)",
            a.seqlen,
            a.model.display(),
            hp.n_ctx_train
        );
    }

    let (windows, calib_info) = match (&calib_text, &a.calib) {
        (Some(text), Some(path)) => {
            let json = view
                .metadata
                .opt_bytes(keys::TOKENIZER_JSON)?
                .with_context(|| {
                    format!(
                        "{} has no tokenizer to read the calibration text",
                        a.model.display()
                    )
                })?;
            let tok = nibble_runtime::Tokenizer::from_bytes(json)?;
            let ids = tok.encode(text, false)?;
            let windows = calibration_windows(&ids, a.nsamples, a.seqlen, a.seed)
                .with_context(|| format!("calibration text {}", path.display()))?;
            let sha: String = sha2::Sha256::digest(text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let info = CalibInfo {
                file: path.display().to_string(),
                sha256: sha,
                nsamples: a.nsamples,
                seqlen: a.seqlen,
                seed: a.seed,
            };
            (Some(windows), Some(info))
        }
        _ if self_calib => {
            // The text is written by the model as it is stored: a GGUF's own
            // Q4_0/Q4_1/Q8_0 blocks run as they are (lossless, the fastest
            // path), every other float weight as F16.
            let model = std::sync::Arc::new(
                nibble_runtime::Model::load_with(
                    &a.model,
                    &ImportOptions {
                        dtype: DType::F16,
                        hash_source: false,
                        keep_blocks: true,
                        lora: a.lora.clone(),
                    },
                    &mut |_, _, _| {},
                )
                .with_context(|| {
                    format!(
                        "cannot load {} to generate calibration text",
                        a.model.display()
                    )
                })?,
            );
            let n_seq = nibble_quantizer::calib::self_calib_sequences(a.nsamples);
            note!(
                "no --calib FILE: the model writes its own calibration text ({n_seq} sequences × {} tokens, seed {}) for {} windows; pass --calib FILE to calibrate on text from your domain",
                a.seqlen, a.seed, a.nsamples
            );
            let tg = Instant::now();
            let pb = bar((n_seq * a.seqlen) as u64, "calibration");
            pb.set_prefix("self-generated tokens");
            let windows = nibble_quantizer::calib::self_generated_calibration(
                &model,
                a.nsamples,
                a.seqlen,
                a.seed,
                threads,
                &|done| pb.set_position(done as u64),
            )
            .with_context(|| format!("generating calibration text with {}", a.model.display()))?;
            pb.finish_and_clear();
            note!(
                "generated {} calibration tokens in {:.1}s",
                n_seq * a.seqlen,
                tg.elapsed().as_secs_f64()
            );
            let mut h = sha2::Sha256::new();
            for w in &windows {
                for t in w {
                    h.update(t.to_le_bytes());
                }
            }
            let info = CalibInfo {
                file: format!(
                    "self-generated ({n_seq} sequences, temperature {}, top-p {})",
                    nibble_quantizer::calib::SELF_CALIB_TEMPERATURE,
                    nibble_quantizer::calib::SELF_CALIB_TOP_P
                ),
                sha256: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
                nsamples: a.nsamples,
                seqlen: a.seqlen,
                seed: a.seed,
            };
            (Some(windows), Some(info))
        }
        _ => (None, None),
    };

    let opts = QuantizeOptions {
        method,
        bits,
        group_size: (group_size != 0).then_some(group_size),
        sym,
        act_order,
        static_groups: a.static_groups,
        act_order_groups: a.act_order_groups
            || (a.gguf.is_some() && !a.static_groups)
            || imatrix.is_some(),
        true_sequential,
        scale_search: method == Method::Gptq && (a.scale_search || !a.no_scale_search),
        search_weight: match search_weight {
            SearchWeightArg::Importance => nibble_quantizer::SearchWeight::Importance,
            SearchWeightArg::LlamaCpp => nibble_quantizer::SearchWeight::LlamaCpp,
        },
        free_min,
        damp,
        threads,
        calib: calib_info,
        imatrix,
        head_bits,
        gguf_mix: a.gguf.map(GgufOutArg::mix),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let pb = bar(0, "quantizing");
    fn quantize_into<W: std::io::Write + std::io::Seek + Send>(
        pool: &rayon::ThreadPool,
        view: &nibble_format::NibView<'_>,
        opts: &QuantizeOptions,
        windows: Option<&[Vec<u32>]>,
        out: W,
        pb: &indicatif::ProgressBar,
    ) -> Result<(
        W,
        Vec<nibble_quantizer::LayerReport>,
        nibble_quantizer::Timings,
    )> {
        Ok(pool.install(|| {
            quantize_model(view, opts, windows, out, &mut |d, t, n| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
                pb.set_prefix(n.to_string());
            })
        })?)
    }
    let (reports, timings) = match (&gguf_source, a.gguf) {
        (Some(src), Some(ty)) => {
            // The .nib in memory, then written as GGUF blocks.
            let (nib, reports, timings) = quantize_into(
                &pool,
                &view,
                &opts,
                windows.as_deref(),
                nibble_format::AlignedBytes::new(),
                &pb,
            )
            .with_context(|| match &a.imatrix {
                Some(m) => format!("cannot quantize {} with {}", a.model.display(), m.display()),
                None => format!("cannot quantize {}", a.model.display()),
            })?;
            let out = AtomicFile::create_checked(&a.output, &inputs)?;
            pb.finish_and_clear();
            let nib = nibble_format::NibFile::from_memory(nib)?;
            let map = nibble_format::storage::mmap_file(src)?;
            let g = nibble_format::gguf::GgufFile::parse(&map)
                .with_context(|| format!("cannot read {}", src.display()))?;
            use nibble_format::export_gguf::{export_gguf, FloatMatrices};
            let mut out = out;
            let ftype = ty.mix().file_type();
            export_gguf(&nib.view()?, &g, ftype, FloatMatrices::Q8_0, &mut out)
                .with_context(|| format!("cannot write {}", a.output.display()))?;
            out.commit()?;
            (reports, timings)
        }
        _ => {
            let out = AtomicFile::create_checked(&a.output, &inputs)?;
            let (out, reports, timings) =
                quantize_into(&pool, &view, &opts, windows.as_deref(), out, &pb).with_context(
                    || match &a.imatrix {
                        Some(m) => {
                            format!("cannot quantize {} with {}", a.model.display(), m.display())
                        }
                        None => format!("cannot quantize {}", a.model.display()),
                    },
                )?;
            pb.finish_and_clear();
            out.commit()?;
            (reports, timings)
        }
    };

    let secs = t0.elapsed().as_secs_f64();
    let size = std::fs::metadata(&a.output)?.len();
    let n_params: u64 = view.tensors.iter().map(|t| t.n_elements()).sum();
    let mean = |f: &dyn Fn(&nibble_quantizer::LayerReport) -> f64| {
        reports.iter().map(f).sum::<f64>() / reports.len().max(1) as f64
    };
    let what = if method == Method::Gptq {
        "relative output error"
    } else {
        "relative weight error"
    };
    note!(
        "wrote {} ({:.1} MB, {:.2} bits per weight overall) in {secs:.1}s: {} layers, mean {what} {:.3e}",
        a.output.display(),
        size as f64 / 1e6,
        size as f64 * 8.0 / n_params as f64,
        reports.len(),
        mean(&|r| r.rel_error),
    );
    if method == Method::Gptq {
        let better = reports
            .iter()
            .filter(|r| r.rel_error_rtn.is_some_and(|e| r.rel_error < e))
            .count();
        note!(
            "GPTQ vs RTN on the calibration inputs: mean {:.3e} vs {:.3e}; GPTQ better on {better}/{} layers",
            mean(&|r| r.rel_error),
            mean(&|r| r.rel_error_rtn.unwrap_or(0.0)),
            reports.len()
        );
        note!(
            "time: forward passes {:.1}s, Hessians {:.1}s, GPTQ (Cholesky + sweep + report) {:.1}s, writing {:.1}s",
            timings.forward, timings.hessian, timings.gptq, timings.write
        );
    }
    let report = serde_json::json!({
        "source": a.model.display().to_string(),
        "output": a.output.display().to_string(),
        "method": method.name(),
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "gguf": a.gguf.map(|t| t.to_possible_value().map(|v| v.get_name().to_string())),
        "act_order": act_order,
        "static_groups": a.static_groups,
        "act_order_groups": a.act_order_groups,
        "true_sequential": true_sequential,
        "scale_search": opts.scale_search,
        "search_weight": search_weight.to_possible_value().map(|v| v.get_name().to_string()),
        "damp": damp,
        "calib": opts.calib.as_ref().map(|c| c.file.clone()),
        "calib_sha256": opts.calib.as_ref().map(|c| c.sha256.clone()),
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "seed": a.seed,
        "threads": threads,
        "seconds": { "total": secs, "forward": timings.forward, "hessian": timings.hessian, "gptq": timings.gptq, "write": timings.write },
        "layers": reports.iter().map(|r| serde_json::json!({
            "name": r.name, "rows": r.rows, "cols": r.cols,
            "rel_error": r.rel_error, "rel_error_rtn": r.rel_error_rtn,
        })).collect::<Vec<_>>(),
    });
    if let (Some(p), Some(info)) = (&a.imatrix_out, &opts.calib) {
        let entries = nibble_quantizer::imatrix::imatrix_entries(
            &reports,
            (info.nsamples * info.seqlen) as u64,
        );
        let (kv, tensors) = nibble_quantizer::imatrix::imatrix_gguf(
            &entries,
            &info.file,
            info.nsamples as u32,
            info.seqlen as u32,
        );
        let mut f = AtomicFile::create_checked(p, &inputs)?;
        nibble_format::gguf_write::write_gguf(&mut f, &kv, &tensors)
            .with_context(|| format!("cannot write {}", p.display()))?;
        f.commit()?;
        note!(
            "wrote {} ({} weights' importance statistics, llama.cpp's GGUF imatrix format)",
            p.display(),
            entries.len()
        );
    }
    let mut f = AtomicFile::create_checked(&report_path, &inputs)?;
    f.write_all(serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("cannot write {}", report_path.display()))?;
    f.commit()?;
    Ok(())
}
