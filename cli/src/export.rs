//! `nibble export`: a quantized model written in another ecosystem's layout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use nibble_format::export_gptq::{export_gptq, CheckpointFormat, ExportOptions};
use nibble_format::import::open_any;

use crate::commands::{bar, import_options};

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    nibble quantize -m SmolLM2-135M-Instruct-f16.gguf --bits 4 --group-size 128 -o smollm2-gptq.nib\n  \
    nibble export -m smollm2-gptq.nib -o smollm2-gptq --format gptq\n\n\
    The folder loads in transformers (with optimum + GPTQModel) and in GPTQModel as it is:\n  \
    AutoModelForCausalLM.from_pretrained(\"smollm2-gptq\")  /  GPTQModel.load(\"smollm2-gptq\")")]
pub struct ExportArgs {
    /// The quantized model: a .nib from `nibble quantize` (integer groups),
    /// or a GPTQ checkpoint folder (re-exported as it is).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Output folder (created; it must not exist or must be empty). Written
    /// into a temporary folder renamed into place when complete.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Layout to write: gptq (a Hugging Face GPTQ checkpoint: config.json
    /// with quantization_config, model.safetensors with qweight / qzeros /
    /// scales / g_idx per linear layer, tokenizer files).
    #[arg(long, default_value = "gptq", value_parser = ["gptq"])]
    format: String,
    /// checkpoint_format: gptq (v1, zero points stored minus one: the
    /// layout every GPTQ loader reads), gptq_v2 (zero points as they are), or
    /// auto: gptq for a symmetric model, gptq_v2 for an asymmetric one
    /// (GPTQModel refuses asymmetric v1 files it did not write itself).
    #[arg(long = "checkpoint-format", default_value = "auto", value_parser = ["auto", "gptq", "gptq_v2"])]
    checkpoint_format: String,
    /// Largest safetensors shard in MB; bigger models are split into
    /// model-0000i-of-0000n.safetensors with an index.
    #[arg(long = "max-shard-mb", default_value_t = 4096)]
    max_shard_mb: u64,
}

pub fn export(a: ExportArgs) -> Result<()> {
    if a.max_shard_mb == 0 {
        bail!("--max-shard-mb must be at least 1");
    }
    let t0 = Instant::now();
    let opts = import_options("auto", false, nibble_format::DType::F16)?;
    let file = open_any(&a.model, &opts, &mut |_, _, _| {})
        .with_context(|| format!("cannot load model {}", a.model.display()))?;
    let pb = bar(0, "exporting");
    let report = export_gptq(
        &file,
        &a.output,
        &ExportOptions {
            max_shard_bytes: a.max_shard_mb << 20,
            checkpoint_format: match a.checkpoint_format.as_str() {
                "gptq" => CheckpointFormat::Gptq,
                "gptq_v2" => CheckpointFormat::GptqV2,
                _ => CheckpointFormat::Auto,
            },
        },
        &mut |done, total, name| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            pb.set_prefix(name.to_string());
        },
    )
    .with_context(|| {
        format!(
            "cannot export {} to {}",
            a.model.display(),
            a.output.display()
        )
    })?;
    pb.finish_and_clear();
    let q = &report.quantization_config;
    note!(
        "wrote {} ({} GPTQ layers: {}-bit, group size {}, desc_act {}, sym {}, checkpoint_format {}; \
         {} float tensors; {:.1} MB of weights in {}) in {:.1}s",
        a.output.display(),
        report.quantized,
        q["bits"],
        q["group_size"],
        q["desc_act"],
        q["sym"],
        q["checkpoint_format"],
        report.float,
        report.weight_bytes as f64 / 1e6,
        report.files.join(", "),
        t0.elapsed().as_secs_f64()
    );
    if let Some(d) = q.get("dynamic") {
        note!("per-module overrides (quantization_config.dynamic): {d}");
    }
    Ok(())
}
