//! `nibble`: convert, run, chat with, measure and inspect language models on the CPU.

/// `print!` that returns an error instead of panicking when standard output
/// cannot be written (a closed pipe ends the program quietly in `main`; a
/// full device is an error with exit status 1).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        write!(o, $($arg)*)
            .and_then(|_| o.flush())
            .map_err(|e| anyhow::Error::new(e).context("cannot write to standard output"))
    }};
}

/// `println!` as [`out!`].
macro_rules! outln {
    () => {
        out!("\n")
    };
    ($($arg:tt)*) => {
        out!("{}\n", format_args!($($arg)*))
    };
}

/// `eprintln!` for messages about the work (progress, timings): never
/// panics, and an unwritable standard error does not stop the work.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprint!` as [`note!`], without the newline.
macro_rules! note_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr().lock();
        let _ = write!(e, $($arg)*).and_then(|_| e.flush());
    }};
}

mod bench;
mod commands;
mod export;
mod quantize;

/// The threads a command runs for `-t requested` (0 = one per physical
/// core): more than the logical CPUs this process may use could only wait
/// for each other, so they are capped there, with a warning.
pub fn threads_for(requested: usize) -> usize {
    let logical = nibble_runtime::cpu::logical_cpus();
    match requested {
        0 => nibble_runtime::cpu::physical_cores(),
        t if t > logical => {
            note!(
                "warning: -t {t} exceeds the {logical} CPUs this process may use; running {logical} threads"
            );
            logical
        }
        t => t,
    }
}

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nibble",
    version,
    about = "Run language models fast on ordinary CPUs.",
    long_about = "Run language models fast on ordinary CPUs.\n\n\
        MODEL arguments (-m) take a .nib file, a GGUF file, or a Hugging Face model folder \
        (config.json + model.safetensors + tokenizer.json). GGUF files and folders are \
        converted in memory on every start; `nibble convert` writes a .nib once so later \
        loads are a zero-copy memory map.",
    after_help = "Examples:\n  \
        nibble run -m ../shared/models/stories260k -p \"Once upon a time\" -n 64\n  \
        nibble chat -m ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf\n  \
        nibble convert -m ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2.nib\n  \
        nibble perplexity -m smollm2.nib -f ../shared/data/wikitext-2-test.txt -c 2048\n  \
        nibble bench -m smollm2.nib -p 128 -n 64 -t 1,2"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face folder or a GGUF file into a single .nib file.
    Convert(commands::ConvertArgs),
    /// Quantize a model's linear weights to 2/3/4/8-bit integer groups (GPTQ or RTN).
    Quantize(quantize::QuantizeArgs),
    /// Write a quantized model as a GPTQ checkpoint folder for transformers,
    /// GPTQModel and vLLM.
    Export(export::ExportArgs),
    /// Generate text from a prompt.
    Run(commands::RunArgs),
    /// Chat with an instruction-tuned model (interactive, or one-shot with -p).
    Chat(commands::ChatArgs),
    /// Measure perplexity on a text file (non-overlapping windows of -c tokens).
    Perplexity(commands::PerplexityArgs),
    /// Show a .nib or GGUF file's metadata, tensors and sizes; --verify checks a .nib's checksums.
    Inspect(commands::InspectArgs),
    /// Measure prompt-processing and generation speed (like llama-bench).
    Bench(bench::BenchArgs),
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a .nib file, a GGUF file, a Hugging Face model folder (float
    /// or a GPTQ checkpoint), or a folder holding one .gguf.
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model: PathBuf,
    /// Weight type when a GGUF file or a Hugging Face folder is loaded: auto
    /// runs a GGUF's quantized blocks and a GPTQ checkpoint's codes as they
    /// are (losslessly, int8 activations; no f32 copy) and a float Hugging
    /// Face folder in f32; f32, f16 or bf16 convert every linear and
    /// embedding weight to that type (quantized ones dequantized exactly).
    #[arg(long, default_value = "auto", value_name = "DTYPE")]
    pub dtype: String,
    /// Worker threads (0 = one per physical core). More than the CPUs this
    /// process may use are not started (a warning says so).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
    /// Context length in tokens (0 = the model's, capped at 4096; at most the model's).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// KV cache element type: f16 (half the memory and half the bytes read
    /// per token from a long context) or f32 (the reference arithmetic;
    /// logits differ by ~5e-4 relative on SmolLM2).
    #[arg(long = "kv-cache", default_value = "f16", value_parser = ["f16", "f32"])]
    pub kv_cache: String,
    /// Apply a PEFT LoRA adapter folder at run time (W·x + SCALE · alpha/r ·
    /// B·(A·x) beside the base, which stays as stored, packed or not;
    /// SCALE defaults to 1). Repeatable: the adapters add up.
    #[arg(long = "lora", value_name = "ADAPTER[:SCALE]", value_parser = commands::parse_lora)]
    pub lora: Vec<nibble_format::lora::LoraSpec>,
}

impl ModelArgs {
    /// `--kv-cache` as the runtime's type.
    pub fn kv_type(&self) -> nibble_runtime::KvType {
        kv_type(&self.kv_cache)
    }
}

/// `f16` or `f32` (already checked by clap) as a [`nibble_runtime::KvType`].
pub fn kv_type(s: &str) -> nibble_runtime::KvType {
    if s == "f32" {
        nibble_runtime::KvType::F32
    } else {
        nibble_runtime::KvType::F16
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(a) => commands::convert(a),
        Command::Quantize(a) => quantize::quantize(a),
        Command::Export(a) => export::export(a),
        Command::Run(a) => commands::run(a),
        Command::Chat(a) => commands::chat(a),
        Command::Perplexity(a) => commands::perplexity(a),
        Command::Inspect(a) => commands::inspect(a),
        Command::Bench(a) => bench::bench(a),
    };
    if let Err(e) = result {
        // A closed pipe (`nibble inspect x.nib | head`) is not an error.
        if e.chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            std::process::exit(0);
        }
        // Print the chain, skipping causes whose text the previous message
        // already includes (typed errors embed their source's message).
        let mut last = e.to_string();
        note!("error: {last}");
        for cause in e.chain().skip(1) {
            let msg = cause.to_string();
            if !last.contains(&msg) {
                note!("  caused by: {msg}");
            }
            last = msg;
        }
        std::process::exit(1);
    }
}
