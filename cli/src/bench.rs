//! `nibble bench`: prompt-processing (pp) and token-generation (tg) speed,
//! llama-bench style, plus a memory-bandwidth probe that turns generation
//! speed into a fraction of the bandwidth bound.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use nibble_runtime::kernels::{Isa, Kernels};
use nibble_runtime::{argmax, Model, PoolKind, PrefillKind, Session, SessionParams};
use rayon::prelude::*;

use crate::commands::load_model;
use crate::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    /// Model: a .nib file, a GGUF file, or a Hugging Face model folder.
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    model: std::path::PathBuf,
    /// Weight type when a GGUF/HF model is loaded: auto (a GGUF's blocks as
    /// they are, a Hugging Face folder in f32), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Apply a PEFT LoRA adapter at run time in every measured session
    /// (repeatable): its cost is the difference to a run without.
    #[arg(long = "lora", value_name = "ADAPTER[:SCALE]", value_parser = crate::commands::parse_lora)]
    lora: Vec<nibble_format::lora::LoraSpec>,
    /// Prompt lengths to measure (comma-separated; 0 skips).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_prompt: Vec<usize>,
    /// Generation lengths to measure (comma-separated; 0 skips).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "64"
    )]
    n_gen: Vec<usize>,
    /// Thread counts to measure (comma-separated; 0 = one per physical core;
    /// at most the CPUs this process may use).
    #[arg(
        short = 't',
        long = "threads",
        value_delimiter = ',',
        default_value = "1"
    )]
    thread_list: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    /// Skip the memory-bandwidth probe.
    #[arg(long)]
    no_bandwidth: bool,
    /// Kernel instruction sets to measure, comma-separated (scalar, avx2,
    /// avx512, neon, neondot), or `all` for every one this CPU runs. Default: the one
    /// chosen at load (the best, or NIBBLE_ISA).
    #[arg(long, value_delimiter = ',')]
    isa: Vec<String>,
    /// Thread pools of the per-token products to measure, comma-separated:
    /// spin (persistent spin/park pool, the default) and/or rayon.
    #[arg(long, value_delimiter = ',', default_value = "spin")]
    pool: Vec<String>,
    /// How prompts multiply packed weights, comma-separated: auto (the
    /// default: the interleaved int8 kernel for 4-bit and GGUF Q5_0 weights
    /// and the batched int8 kernels of Q4_K/Q5_K/Q6_K where the CPU has
    /// them, decoded tiles otherwise), tiles (rows decoded to f32 for
    /// gemm) and/or int8 (row-by-row int8 kernels, AVX2 / AVX-512; elsewhere
    /// the same as tiles). Only the pp rows depend on it.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    prefill: Vec<String>,
    /// KV cache element type: f16 (the default) or f32.
    #[arg(long = "kv-cache", default_value = "f16", value_parser = ["f16", "f32"])]
    kv_cache: String,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Read a 1 GiB buffer with `threads` threads
/// ([`nibble_runtime::kernels::probe::stream_sum`]:
/// SIMD loads with the decoding kernels' prefetch); returns the best of 3 in
/// GB/s.
pub fn bandwidth_probe(threads: usize) -> Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let n = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let s: u64 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(nibble_runtime::kernels::probe::stream_sum)
                .reduce(|| 0, u64::wrapping_add)
        });
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / secs / 1e9);
    }
    Ok(best)
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        bail!("-r must be at least 1");
    }
    let pools: Vec<PoolKind> = a
        .pool
        .iter()
        .map(|p| match p.trim() {
            "spin" => Ok(PoolKind::Spin),
            "rayon" => Ok(PoolKind::Rayon),
            other => Err(anyhow::anyhow!("--pool {other}: use spin or rayon")),
        })
        .collect::<Result<_>>()?;
    let prefills: Vec<(PrefillKind, &str)> = a
        .prefill
        .iter()
        .map(|p| match p.trim() {
            "auto" => Ok((PrefillKind::Auto, "auto")),
            "tiles" => Ok((PrefillKind::Tiles, "tiles")),
            "int8" => Ok((PrefillKind::Int8, "int8")),
            other => Err(anyhow::anyhow!(
                "--prefill {other}: use auto, tiles or int8"
            )),
        })
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    let mut model: Arc<Model> = load_model(&ModelArgs {
        model: a.model.clone(),
        dtype: a.dtype.clone(),
        threads: 1,
        ctx_size: 0,
        kv_cache: a.kv_cache.clone(),
        lora: Vec::new(),
    })?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let kernels: Vec<&'static Kernels> = if a.isa.is_empty() {
        vec![model.kernels()]
    } else if a.isa.len() == 1 && a.isa[0] == "all" {
        Isa::available()
            .into_iter()
            .filter_map(Kernels::for_isa)
            .collect()
    } else {
        a.isa
            .iter()
            .map(|n| Kernels::named(n).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?
    };
    let bytes_per_token = model.weight_bytes();
    let max_len = a
        .n_prompt
        .iter()
        .chain(&a.n_gen)
        .copied()
        .max()
        .unwrap_or(0)
        + 1;
    outln!(
        "model: {} | {:.1} MB of weights read per token | load {:.1} ms",
        a.model.display(),
        bytes_per_token as f64 / 1e6,
        load_ms
    )?;
    outln!(
        "| isa | pool | prefill | threads | test | tokens/s (mean ± sd, {} reps) | bandwidth bound | % of bound |",
        a.repetitions
    )?;
    outln!("|--|--|--|--:|--|--:|--:|--:|")?;
    let n_vocab = model.hparams.n_vocab as u32;
    let trained = model.hparams.n_ctx_train;
    if trained > 0 && max_len > trained {
        bail!(
            "-p/-n {max_len} exceed the context of {} ({trained} tokens)",
            a.model.display()
        );
    }
    let mut probes: Vec<(usize, f64)> = vec![];
    let thread_list: Vec<usize> = a
        .thread_list
        .iter()
        .map(|&t| crate::threads_for(t))
        .collect();
    for (&threads, &k, &pool) in thread_list
        .iter()
        .flat_map(|t| kernels.iter().map(move |k| (t, k)))
        .flat_map(|(t, k)| pools.iter().map(move |p| (t, k, p)))
    {
        Arc::get_mut(&mut model)
            .expect("no session alive between runs")
            .set_kernels(k);
        let isa = k.isa;
        let pool_name = match pool {
            PoolKind::Spin => "spin",
            PoolKind::Rayon => "rayon",
        };
        let bw = if a.no_bandwidth {
            None
        } else if let Some(&(_, bw)) = probes.iter().find(|(t, _)| *t == threads) {
            Some(bw)
        } else {
            let bw = bandwidth_probe(threads)?;
            probes.push((threads, bw));
            Some(bw)
        };
        // Deterministic pseudo-random prompt tokens.
        let tokens: Vec<u32> = (0..max_len as u32)
            .map(|i| (i * 7919 + 13) % n_vocab)
            .collect();
        let session = |prefill: PrefillKind| -> Result<Session> {
            let mut s = Session::new(
                Arc::clone(&model),
                &SessionParams {
                    n_ctx: max_len.max(16),
                    n_threads: threads,
                    pool,
                    prefill,
                    kv: crate::kv_type(&a.kv_cache),
                    ..Default::default()
                },
            )?;
            crate::commands::attach_loras(&mut s, &a.lora)?;
            Ok(s)
        };
        // One untimed session first: the first one measured otherwise reads
        // ~12 % slower than the same kind measured again after it (
        // 8-bit SmolLM2, pp128), whatever the kind, even after its own
        // warm-up run.
        if let Some(&n) = a.n_prompt.iter().max().filter(|&&n| n > 0) {
            session(PrefillKind::default())?.eval(&tokens[..n])?;
        }
        for &(prefill, prefill_name) in &prefills {
            let mut s = session(prefill)?;
            for &n in a.n_prompt.iter().filter(|&&n| n > 0) {
                s.reset();
                // Warm-up with the whole prompt: the first batched call
                // allocates the batch buffers and faults their pages in.
                s.eval(&tokens[..n])?;
                let mut rates = vec![];
                for _ in 0..a.repetitions {
                    s.reset();
                    let t = Instant::now();
                    s.eval(&tokens[..n])?;
                    rates.push(n as f64 / t.elapsed().as_secs_f64());
                }
                let (m, sd) = mean_sd(&rates);
                outln!(
                    "| {isa} | {pool_name} | {prefill_name} | {threads} | pp{n} | {m:.1} ± {sd:.1} | | |"
                )?;
            }
        }
        let mut s = session(PrefillKind::default())?;
        for &n in a.n_gen.iter().filter(|&&n| n > 0) {
            let mut rates = vec![];
            for rep in 0..=a.repetitions {
                s.reset();
                let mut next = model.bos_id.unwrap_or(0);
                let t = Instant::now();
                for _ in 0..n {
                    next = argmax(s.eval(&[next])?);
                }
                if rep > 0 {
                    // rep 0 is the warm-up
                    rates.push(n as f64 / t.elapsed().as_secs_f64());
                }
            }
            let (m, sd) = mean_sd(&rates);
            match bw {
                Some(bw) => {
                    let bound = bw * 1e9 / bytes_per_token as f64;
                    outln!(
                        "| {isa} | {pool_name} | - | {threads} | tg{n} | {m:.1} ± {sd:.1} | {bound:.0} tok/s ({bw:.1} GB/s) | {:.0}% |",
                        100.0 * m / bound
                    )?;
                }
                None => {
                    outln!(
                        "| {isa} | {pool_name} | - | {threads} | tg{n} | {m:.1} ± {sd:.1} | | |"
                    )?;
                }
            }
        }
    }
    Ok(())
}
