//! `nibble quantize`: compress a model's linear weights into packed integer groups.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use nibble_format::import::{open_any, ImportOptions};
use nibble_format::{AtomicFile, DType};
use nibble_quantizer::{quantize_model, Method, QuantizeOptions};

use crate::commands::bar;

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// Round to nearest: fast, needs no calibration text.
    Rtn,
    /// GPTQ (second-order, calibrated). Not implemented for whole models yet.
    Gptq,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Source model: a Hugging Face folder, a GGUF file or a float .nib.
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Output .nib (appears only when quantization completes).
    #[arg(short = 'o', long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "rtn")]
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
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    if ![2, 3, 4, 8].contains(&a.bits) {
        bail!("--bits {} is not supported (use 2, 3, 4 or 8)", a.bits);
    }
    if a.group_size != 0 && !a.group_size.is_multiple_of(32) {
        bail!(
            "--group-size {} must be a multiple of 32 (or 0 for one group per row)",
            a.group_size
        );
    }
    if matches!(a.method, MethodArg::Gptq) {
        bail!("--method gptq is not implemented for whole models yet (the per-layer algorithm is); use --method rtn");
    }
    let t0 = Instant::now();
    let pb = bar(0, "loading");
    let src = open_any(
        &a.model,
        &ImportOptions {
            dtype: DType::F32,
            hash_source: true,
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
    let opts = QuantizeOptions {
        method: Method::Rtn,
        bits: a.bits,
        group_size: (a.group_size != 0).then_some(a.group_size),
        sym: a.sym,
    };
    let out = AtomicFile::create(&a.output)?;
    let pb = bar(0, "quantizing");
    let (out, reports) = quantize_model(&view, &opts, out, &mut |d, t, n| {
        pb.set_length(t as u64);
        pb.set_position(d as u64);
        pb.set_prefix(n.to_string());
    })
    .with_context(|| format!("cannot quantize {}", a.model.display()))?;
    pb.finish_and_clear();
    out.commit()?;

    let size = std::fs::metadata(&a.output)?.len();
    let n_params: u64 = view.tensors.iter().map(|t| t.n_elements()).sum();
    let worst = reports
        .iter()
        .map(|r| r.rel_weight_error)
        .fold(0f64, f64::max);
    let mean =
        reports.iter().map(|r| r.rel_weight_error).sum::<f64>() / reports.len().max(1) as f64;
    eprintln!(
        "wrote {} ({:.1} MB, {:.2} bits per weight overall) in {:.1}s: {} layers, relative weight error mean {mean:.3e}, worst {worst:.3e}",
        a.output.display(),
        size as f64 / 1e6,
        size as f64 * 8.0 / n_params as f64,
        t0.elapsed().as_secs_f64(),
        reports.len()
    );
    let report = serde_json::json!({
        "source": a.model.display().to_string(),
        "output": a.output.display().to_string(),
        "method": "rtn",
        "bits": a.bits,
        "group_size": a.group_size,
        "sym": a.sym,
        "seconds": t0.elapsed().as_secs_f64(),
        "layers": reports.iter().map(|r| serde_json::json!({
            "name": r.name, "rows": r.rows, "cols": r.cols, "rel_weight_error": r.rel_weight_error,
        })).collect::<Vec<_>>(),
    });
    let mut report_path = a.output.clone().into_os_string();
    report_path.push(".report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", PathBuf::from(&report_path).display()))?;
    Ok(())
}
