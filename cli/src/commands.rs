//! The `convert`, `run`, `chat`, `perplexity` and `inspect` commands.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nibble_format::import::{import_to_file, ImportOptions};
use nibble_format::lora::LoraSpec;
use nibble_format::{keys, DType, NibFile, Value};
use nibble_runtime::{
    render_chat, ChatMessage, GenerateParams, Model, Sampler, SamplerParams, Session,
    SessionParams, StopReason,
};
use rayon::prelude::*;

use crate::ModelArgs;

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta} left) {prefix}",
        )
        .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}

/// `--dtype`: `auto` (the default; `native` is the same) keeps a GGUF's
/// quantized blocks, a GPTQ checkpoint's codes and their float tensors'
/// types as they are and converts a plain Hugging Face folder to `hf_float`;
/// `f32`, `f16` or `bf16` convert every linear and embedding weight to that
/// type (quantized weights dequantized exactly).
pub fn import_options(s: &str, hash_source: bool, hf_float: DType) -> Result<ImportOptions> {
    let keep = s.eq_ignore_ascii_case("auto") || s.eq_ignore_ascii_case("native");
    let dtype = if keep {
        hf_float
    } else {
        DType::parse(s)
            .with_context(|| format!("unknown dtype '{s}' (use auto, f32, f16 or bf16)"))?
    };
    Ok(ImportOptions {
        dtype,
        hash_source,
        keep_blocks: keep,
        lora: Vec::new(),
    })
}

/// Load any supported model path, with a progress bar while converting.
pub fn load_model(a: &ModelArgs) -> Result<Arc<Model>> {
    let opts = import_options(&a.dtype, false, DType::F32)?;
    let pb = bar(0, "loading");
    let model = Model::load_with(&a.model, &opts, &mut |done, total, name| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_prefix(name.to_string());
    })
    .with_context(|| format!("cannot load model {}", a.model.display()))?;
    pb.finish_and_clear();
    Ok(Arc::new(model))
}

pub fn new_session(model: &Arc<Model>, a: &ModelArgs) -> Result<Session> {
    let mut s = Session::new(
        Arc::clone(model),
        &SessionParams {
            n_ctx: a.ctx_size,
            n_threads: crate::threads_for(a.threads),
            kv: a.kv_type(),
            ..Default::default()
        },
    )?;
    attach_loras(&mut s, &a.lora)?;
    Ok(s)
}

/// Attach `--lora` adapters to a session, named after their folders.
pub fn attach_loras(s: &mut Session, lora: &[LoraSpec]) -> Result<()> {
    for (i, spec) in lora.iter().enumerate() {
        let name = format!("{i}:{}", spec.path.display());
        s.add_lora(&name, spec)
            .with_context(|| format!("cannot apply the LoRA adapter {}", spec.path.display()))?;
    }
    Ok(())
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Source: a GGUF file or a Hugging Face model folder (float or a GPTQ
    /// checkpoint).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Output .nib file (written atomically: it appears only when complete).
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Weight type of the linear and embedding weights: auto (a GGUF's
    /// blocks and a GPTQ checkpoint's codes kept as they are, losslessly, a
    /// float Hugging Face folder as f16),
    /// or f16, f32, bf16 for every such weight; norms stay f32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Merge a PEFT LoRA adapter folder into the weights it targets
    /// (W + SCALE · alpha/r · B·A; SCALE defaults to 1); repeatable. The
    /// merged weights are stored as --dtype (f16 for auto).
    #[arg(long = "lora", value_name = "ADAPTER[:SCALE]", value_parser = parse_lora)]
    lora: Vec<LoraSpec>,
    /// Store a PEFT LoRA adapter folder in the output beside the weights,
    /// unmerged, as NAME: `run --lora NAME` then applies it at run time
    /// (SCALE, default 1, multiplies the run-time scale). Repeatable; the
    /// source may also be a .nib (e.g. one `nibble quantize` wrote).
    #[arg(long = "lora-store", value_name = "NAME=ADAPTER[:SCALE]", value_parser = parse_lora_store)]
    lora_store: Vec<(String, LoraSpec)>,
}

/// `--lora-store NAME=ADAPTER[:SCALE]`.
fn parse_lora_store(s: &str) -> std::result::Result<(String, LoraSpec), String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': use NAME=ADAPTER[:SCALE]"))?;
    if !nibble_format::lora::valid_stored_name(name) {
        return Err(format!(
            "'{name}': an adapter name is letters, digits, '_' and '-'"
        ));
    }
    Ok((name.to_string(), LoraSpec::parse(rest)?))
}

/// `--lora ADAPTER[:SCALE]`.
pub fn parse_lora(s: &str) -> std::result::Result<LoraSpec, String> {
    LoraSpec::parse(s)
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let mut opts = import_options(&a.dtype, true, DType::F16)?;
    opts.lora = a.lora.clone();
    if !a.lora_store.is_empty() {
        return convert_storing_loras(&a, &opts);
    }
    let t0 = Instant::now();
    let pb = bar(0, "converting");
    import_to_file(&a.model, &a.output, &opts, &mut |done, total, name| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_prefix(name.to_string());
    })
    .with_context(|| format!("cannot convert {}", a.model.display()))?;
    pb.finish_and_clear();
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    note!(
        "wrote {} ({:.1} MB, {}) in {:.1}s",
        a.output.display(),
        size as f64 / 1e6,
        if opts.keep_blocks {
            "quantized weights and float types kept".to_string()
        } else {
            opts.dtype.to_string()
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sampling options shared by `run` and `chat`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.8)]
    temp: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below min-p × p(best) (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty on recently generated tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repetition penalty considers.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (sampling is deterministic for a given seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this (non-empty) string is generated (repeatable).
    #[arg(long = "stop", value_parser = non_empty)]
    stop: Vec<String>,
}

/// A `--stop` string: an empty one would stop before the first token.
fn non_empty(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() {
        Err("an empty stop string would stop before the first token".into())
    } else {
        Ok(s.to_string())
    }
}

impl SamplingArgs {
    fn params(&self) -> SamplerParams {
        SamplerParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

/// `convert --lora-store`: the model (imported, or a `.nib` as it is) copied
/// with the adapters beside its weights.
fn convert_storing_loras(a: &ConvertArgs, opts: &ImportOptions) -> Result<()> {
    let t0 = Instant::now();
    let pb = bar(0, "loading");
    let file = nibble_format::import::open_any(&a.model, opts, &mut |done, total, name| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
        pb.set_prefix(name.to_string());
    })
    .with_context(|| format!("cannot load {}", a.model.display()))?;
    pb.finish_and_clear();
    nibble_format::lora::store_in_nib(&file, &a.model, &a.output, &a.lora_store)
        .with_context(|| format!("cannot store the adapters in {}", a.output.display()))?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    let names: Vec<&str> = a.lora_store.iter().map(|(n, _)| n.as_str()).collect();
    note!(
        "wrote {} ({:.1} MB) with the adapters {} stored (apply with `--lora NAME`) in {:.1}s",
        a.output.display(),
        size as f64 / 1e6,
        names.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text (empty = start from BOS).
    #[arg(short = 'p', long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Leave out the timing line (prompt and generation tokens/s) that
    /// ends the output on stderr.
    #[arg(long)]
    no_timings: bool,
    /// Kept for scripts: the timing line is printed by default.
    #[arg(long, hide = true)]
    stats: bool,
}

/// The timing line that ends `run` and `chat` output on stderr, as
/// llama.cpp's `llama_perf_context_print` does.
fn print_stats(out: &nibble_runtime::GenerationStats) {
    let ms = |s: f64, n: usize| 1e3 * s / (n.max(1) as f64);
    note!(
        "\nprompt: {} tokens in {:.0} ms ({:.2} ms/token, {:.1} tok/s) | generation: {} tokens in {:.0} ms ({:.2} ms/token, {:.1} tok/s) | stop: {:?}",
        out.prompt_tokens,
        1e3 * out.prompt_seconds,
        ms(out.prompt_seconds, out.prompt_tokens),
        out.prompt_tokens as f64 / out.prompt_seconds.max(1e-9),
        out.generated_tokens,
        1e3 * out.generate_seconds,
        ms(out.generate_seconds, out.generated_tokens),
        out.generated_tokens as f64 / out.generate_seconds.max(1e-9),
        out.stop
    );
}

pub fn run(a: RunArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = model.tokenizer()?;
    let mut prompt = tok.encode(&a.prompt, true)?;
    if prompt.is_empty() || (a.prompt.is_empty() && model.bos_id.is_some_and(|b| prompt[0] != b)) {
        let bos = model
            .bos_id
            .context("empty prompt and the model defines no BOS token: give a prompt with -p")?;
        prompt.insert(0, bos);
    }
    let mut session = new_session(&model, &a.model)?;
    if prompt.len() >= session.n_ctx() {
        bail!(
            "the prompt has {} tokens but the context holds {} (raise -c)",
            prompt.len(),
            session.n_ctx()
        );
    }
    let mut sampler = Sampler::new(a.sampling.params(), model.hparams.n_vocab)?;
    let params = GenerateParams {
        max_tokens: a.n_predict,
        stop_strings: a.sampling.stop.clone(),
        ignore_eos: a.ignore_eos,
    };
    out!("{}", a.prompt)?;
    generate_to_stdout(&mut session, &prompt, &params, &mut sampler, !a.no_timings)?;
    Ok(())
}

/// Generate, streaming text to stdout as it comes (stopping if stdout is
/// closed), then a newline and, with `stats`, the timings on stderr.
fn generate_to_stdout(
    session: &mut Session,
    prompt: &[u32],
    params: &GenerateParams,
    sampler: &mut Sampler,
    stats: bool,
) -> Result<nibble_runtime::GenerationStats> {
    let mut failed = None;
    let out = session.generate(prompt, params, sampler, |_, text| match out!("{text}") {
        Ok(()) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    outln!()?;
    if stats {
        print_stats(&out);
    }
    Ok(out)
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// One-shot: answer this message and exit (otherwise interactive).
    #[arg(short = 'p', long)]
    prompt: Option<String>,
    /// System message (default: whatever the chat template uses).
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens per answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Leave out the timing line (prompt and generation tokens/s) printed
    /// to stderr after each answer.
    #[arg(long)]
    no_timings: bool,
    /// Kept for scripts: the timing line is printed by default.
    #[arg(long, hide = true)]
    stats: bool,
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = model.tokenizer()?;
    let template = model.chat_template.clone().with_context(|| {
        format!(
            "{} has no chat template; use `nibble run`",
            a.model.model.display()
        )
    })?;
    if let Some(family) = &model.chat_template_fallback {
        note!(
            "{} carries no chat template: using the known {family} template",
            a.model.model.display()
        );
    }
    let token_text = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let bos = token_text(model.bos_id);
    let eos = token_text(model.eos_ids.first().copied());
    let mut session = new_session(&model, &a.model)?;
    let mut sampler = Sampler::new(a.sampling.params(), model.hparams.n_vocab)?;
    let mut messages: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let interactive = a.prompt.is_none();
    let stdin = std::io::stdin();
    let mut pending = a.prompt.clone();
    loop {
        let user = match pending.take() {
            Some(p) => p,
            None if interactive => {
                note_part!("> ");
                let _ = std::io::stderr().flush();
                let mut line = String::new();
                let n = stdin.lock().read_line(&mut line).context(
                    "cannot read the message from standard input (it must be UTF-8 text)",
                )?;
                if n == 0 {
                    break;
                }
                let line = line.trim_end_matches(['\n', '\r']).to_string();
                if line == "/exit" || line == "/quit" {
                    break;
                }
                if line.is_empty() {
                    continue;
                }
                line
            }
            None => break,
        };
        messages.push(ChatMessage {
            role: "user".into(),
            content: user,
        });
        let text = render_chat(&template, &messages, true, &bos, &eos)?;
        let ids = tok.encode(&text, false)?;
        // Reuse the cached prefix of the conversation; evaluate only what is new.
        let common = session
            .tokens()
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(1));
        session.truncate(common);
        if ids.len() >= session.n_ctx() {
            bail!(
                "the conversation has {} tokens but the context holds {} (raise -c)",
                ids.len(),
                session.n_ctx()
            );
        }
        let params = GenerateParams {
            max_tokens: a.n_predict.min(session.n_ctx() - ids.len()),
            stop_strings: a.sampling.stop.clone(),
            ignore_eos: false,
        };
        let out = generate_to_stdout(
            &mut session,
            &ids[common..],
            &params,
            &mut sampler,
            !a.no_timings,
        )?;
        if out.stop == StopReason::ContextFull {
            note!("(context full: conversation ends)");
            break;
        }
        messages.push(ChatMessage {
            role: "assistant".into(),
            content: out.text.trim().to_string(),
        });
        if !interactive {
            break;
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to evaluate (e.g. wikitext-2-test.txt).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Evaluate only the first N windows (0 = all).
    #[arg(long, default_value_t = 0)]
    chunks: usize,
    /// Tokens evaluated together as one matrix-matrix batch.
    #[arg(short = 'b', long, default_value_t = 512)]
    batch_size: usize,
    /// What is scored. `full`: every predicted token of non-overlapping
    /// windows of -c tokens (the GPTQ papers' protocol). `llama.cpp`: what
    /// llama-perplexity computes — the text tokenized with the model's BOS,
    /// each window's first token replaced by BOS where the model adds one, and
    /// only the second half of each window scored.
    #[arg(long, default_value = "full", value_parser = ["full", "llama.cpp"])]
    protocol: String,
}

pub fn perplexity(mut a: PerplexityArgs) -> Result<()> {
    if a.model.ctx_size == 1 {
        bail!("-c 1: perplexity needs windows of at least 2 tokens (one to predict from)");
    }
    let model = load_model(&a.model)?;
    if a.model.ctx_size == 0 {
        // The model's context, capped as every session's default is.
        a.model.ctx_size = model.hparams.n_ctx_train.clamp(2, 4096);
    }
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let llama_cpp = a.protocol == "llama.cpp";
    if llama_cpp && a.model.ctx_size < 4 {
        bail!(
            "-c {}: the llama.cpp protocol scores the second half of each window; use -c 4 or more",
            a.model.ctx_size
        );
    }
    let tok = model.tokenizer()?;
    let ids = tok.encode(&text, llama_cpp)?;
    // llama.cpp puts BOS first in every window when the tokenizer adds one.
    let bos_first = match model.bos_id {
        Some(b) if llama_cpp => tok.encode("x", true)?.first() == Some(&b),
        _ => false,
    };
    let n_ctx = a.model.ctx_size;
    // llama.cpp scores the second half of each window only.
    let score_from = if llama_cpp { n_ctx / 2 } else { 0 };
    let n_vocab = model.hparams.n_vocab;
    let mut n_windows = ids.len() / n_ctx;
    if n_windows == 0 {
        bail!(
            "{} has {} tokens, fewer than one window of {n_ctx} (lower -c)",
            a.file.display(),
            ids.len()
        );
    }
    if a.chunks > 0 {
        n_windows = n_windows.min(a.chunks);
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut session = Session::new(
        Arc::clone(&model),
        &SessionParams {
            n_ctx,
            n_threads: crate::threads_for(a.model.threads),
            n_batch: a.batch_size,
            kv: a.model.kv_type(),
            ..Default::default()
        },
    )?;
    attach_loras(&mut session, &a.model.lora)?;
    let pb = bar((n_windows * n_ctx) as u64, "perplexity");
    let t0 = Instant::now();
    let mut nll = 0f64;
    let mut count = 0usize;
    let mut window = vec![0u32; n_ctx];
    for w in 0..n_windows {
        window.copy_from_slice(&ids[w * n_ctx..(w + 1) * n_ctx]);
        if let (true, Some(b)) = (bos_first, model.bos_id) {
            window[0] = b;
        }
        let window = &window[..];
        session.reset();
        session.eval_batches(window, |first, logits| {
            // Each row's log-softmax is independent: score the batch's rows in
            // parallel, then add them in order (the same sum as one by one).
            // Row i is position first + i; it predicts window[first + i + 1].
            let rows = logits.len() / n_vocab;
            let from = score_from.saturating_sub(first).min(rows);
            let to = rows.min(window.len() - 1 - first);
            if to > from {
                let nlls: Vec<f64> = logits[from * n_vocab..to * n_vocab]
                    .par_chunks_exact(n_vocab)
                    .enumerate()
                    .map(|(i, row)| nll_of(row, window[first + from + i + 1]))
                    .collect();
                for v in nlls {
                    nll += v;
                }
                count += to - from;
            }
            pb.inc(rows as u64);
        })?;
        pb.set_position(((w + 1) * n_ctx) as u64);
        pb.set_prefix(format!("ppl {:.4}", (nll / count.max(1) as f64).exp()));
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    outln!(
        "perplexity: {:.4} over {count} predicted tokens ({n_windows} windows of {n_ctx}, protocol {}); {:.1} tok/s, {:.1}s",
        (nll / count as f64).exp(),
        a.protocol,
        (n_windows * n_ctx) as f64 / secs,
        secs
    )?;
    Ok(())
}

/// `−log softmax(logits)[target]`, in f64.
pub fn nll_of(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    f64::from(max) + sum.ln() - f64::from(logits[target as usize])
}

#[derive(Args)]
pub struct InspectArgs {
    /// A .nib file, or a GGUF file (its metadata and tensor types, as stored).
    file: PathBuf,
    /// Recompute every tensor's checksum (.nib files; GGUF files carry none).
    #[arg(long)]
    verify: bool,
    /// List every tensor (default: a summary by type).
    #[arg(long)]
    tensors: bool,
}

/// A string shown whole when short, else its first 60 bytes and its length.
fn shown_str(s: &str) -> String {
    if s.len() > 80 {
        format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(60)], s.len())
    } else {
        format!("{s:?}")
    }
}

/// The closing summary of `inspect`: totals, then tensors by type
/// (`(type, elements, bytes)` per tensor).
fn type_summary<'a>(
    out: &mut impl Write,
    tensors: impl Iterator<Item = (&'a str, u64, u64)>,
) -> Result<()> {
    let mut by_type: std::collections::BTreeMap<&str, (usize, u64, u64)> = Default::default();
    let (mut n_tensors, mut n_params, mut n_bytes) = (0usize, 0u64, 0u64);
    for (ty, elems, bytes) in tensors {
        let e = by_type.entry(ty).or_default();
        (e.0, e.1, e.2) = (e.0 + 1, e.1 + elems, e.2 + bytes);
        (n_tensors, n_params, n_bytes) = (n_tensors + 1, n_params + elems, n_bytes + bytes);
    }
    writeln!(
        out,
        "summary: {n_tensors} tensors, {n_params} parameters, {:.2} MB of tensor data, {:.2} bits per weight",
        n_bytes as f64 / 1e6,
        n_bytes as f64 * 8.0 / n_params.max(1) as f64
    )?;
    for (ty, (n, p, b)) in by_type {
        writeln!(
            out,
            "  {ty:6} {n:5} tensors {p:>12} params {:>10.2} MB",
            b as f64 / 1e6
        )?;
    }
    Ok(())
}

/// Whether `path` starts with GGUF's magic (false where it cannot be read:
/// the .nib path then reports the error).
fn is_gguf(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).is_ok_and(|mut f| f.read_exact(&mut magic).is_ok())
        && &magic == b"GGUF"
}

/// `inspect` of a GGUF file: its metadata (arrays by length), its tensors
/// and their block types, as stored.
fn inspect_gguf(a: &InspectArgs) -> Result<()> {
    use nibble_format::gguf::{GgufFile, GgufValue};
    if a.verify {
        bail!(
            "{}: a GGUF file carries no checksums to verify (--verify checks .nib files)",
            a.file.display()
        );
    }
    let t0 = Instant::now();
    let map = nibble_format::storage::mmap_file(&a.file)?;
    let g = GgufFile::parse(&map)
        .with_context(|| format!("{}: not a valid GGUF file", a.file.display()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "file: {} ({} bytes, GGUF v{}, parsed in {:.2} ms; `nibble convert` makes a .nib of it)",
        a.file.display(),
        map.len(),
        g.version,
        t0.elapsed().as_secs_f64() * 1e3
    )?;
    writeln!(out, "metadata:")?;
    for (k, v) in &g.kv {
        let shown = match *v {
            GgufValue::Str(s) => shown_str(s),
            GgufValue::Array { count, .. } => format!("<array of {count}>"),
            GgufValue::Bool(b) => b.to_string(),
            GgufValue::F32(x) => x.to_string(),
            GgufValue::F64(x) => x.to_string(),
            GgufValue::I8(x) => x.to_string(),
            GgufValue::I16(x) => x.to_string(),
            GgufValue::I32(x) => x.to_string(),
            GgufValue::I64(x) => x.to_string(),
            _ => v
                .as_u64()
                .map_or_else(|| format!("{v:?}"), |x| x.to_string()),
        };
        writeln!(out, "  {k:40} {shown}")?;
    }
    if a.tensors {
        writeln!(
            out,
            "tensors (shapes in GGUF order, contiguous dimension first):"
        )?;
        writeln!(
            out,
            "  {:40} {:6} {:>20} {:>12}",
            "name", "type", "shape", "bytes"
        )?;
        for t in &g.tensors {
            writeln!(
                out,
                "  {:40} {:6} {:>20} {:>12}",
                t.name,
                t.ggml_type.name(),
                format!("{:?}", t.ne),
                t.data.len()
            )?;
        }
    }
    type_summary(
        &mut out,
        g.tensors
            .iter()
            .map(|t| (t.ggml_type.name(), t.n_elements(), t.data.len() as u64)),
    )
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    if is_gguf(&a.file) {
        return inspect_gguf(&a);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let t0 = Instant::now();
    let file = NibFile::open(&a.file)?;
    let view = file.view()?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    writeln!(
        out,
        "file: {} ({} bytes, .nib v{}, opened and validated in {load_ms:.2} ms)",
        a.file.display(),
        file.bytes().len(),
        view.version
    )?;
    writeln!(out, "metadata:")?;
    for (k, v) in &view.metadata.entries {
        let shown = match v {
            Value::U64(x) => x.to_string(),
            Value::I64(x) => x.to_string(),
            Value::F64(x) => format!("{x}"),
            Value::Bool(x) => x.to_string(),
            Value::Str(s) => shown_str(s),
            Value::Bytes(b) => format!("<{} bytes>", b.len()),
            Value::U64Array(_) => format!("{:?}", v.u64_array().collect::<Vec<_>>()),
        };
        writeln!(out, "  {k:32} {shown}")?;
    }
    if a.tensors {
        writeln!(out, "tensors:")?;
        writeln!(
            out,
            "  {:40} {:6} {:>20} {:>12} {:>10}",
            "name", "dtype", "shape", "bytes", "offset"
        )?;
    }
    for t in view.tensors.iter().filter(|_| a.tensors) {
        writeln!(
            out,
            "  {:40} {:6} {:>20} {:>12} {:>10}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            t.data.len(),
            t.offset
        )?;
    }
    type_summary(
        &mut out,
        view.tensors
            .iter()
            .map(|t| (t.dtype.name(), t.n_elements(), t.data.len() as u64)),
    )?;
    if let Ok(Some(src)) = view.metadata.opt_str(keys::PROV_SOURCE) {
        writeln!(out, "source: {src}")?;
    }
    if a.verify {
        let t1 = Instant::now();
        view.verify_checksums()
            .with_context(|| format!("{}: checksum verification failed", a.file.display()))?;
        writeln!(
            out,
            "verify: {}all {} tensor checksums OK ({:.0} ms)",
            if view.version >= 2 {
                "metadata and directory checksums OK, "
            } else {
                "(format version 1: no metadata or directory checksums) "
            },
            view.tensors.len(),
            t1.elapsed().as_secs_f64() * 1e3
        )?;
    }
    Ok(())
}
