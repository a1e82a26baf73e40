//! Tokens per second of `forward_slots` (independent sequences decoded in
//! lockstep, as the quantizer's self-generated calibration does) on a model,
//! for each batched product path:
//!
//! ```sh
//! cargo run --release --example decode_slots -- MODEL [THREADS] [ROWS] [STEPS] [auto|int8|tiles]
//! ```
//!
//! MODEL is anything `Model::load_with` opens; GGUF Q4_0/Q4_1/Q8_0 blocks run
//! as stored (as the quantizer generates with them). Defaults: 2 threads,
//! 16 rows, 64 steps, every path (name one to time only it, e.g. under
//! `perf`).

use std::time::Instant;

use nibble::format::import::ImportOptions;
use nibble::format::DType;
use nibble::runtime::forward::{forward_slots, BatchState, RunState};
use nibble::{Model, PrefillKind};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = args
        .first()
        .ok_or("usage: decode_slots MODEL [THREADS] [ROWS] [STEPS] [auto|int8|tiles]")?;
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (threads, rows, steps) = (arg(1, 2)?, arg(2, 16)?, arg(3, 64)?);
    let opts = ImportOptions {
        dtype: DType::F16,
        hash_source: false,
        keep_blocks: true,
        lora: Vec::new(),
    };
    let model = Model::load_with(model_path, &opts, &mut |_, _, _| {})?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let n_vocab = model.hparams.n_vocab as u32;
    let tokens: Vec<u32> = (0..rows as u32).map(|i| (100 + i) % n_vocab).collect();
    let only = args.get(4).map(|s| s.to_lowercase());
    for kind in [PrefillKind::Auto, PrefillKind::Int8, PrefillKind::Tiles] {
        if only
            .as_deref()
            .is_some_and(|o| o != format!("{kind:?}").to_lowercase())
        {
            continue;
        }
        let mut state = RunState::new(&model, rows * steps);
        let mut bs = BatchState::for_slots(&model, steps, rows, kind);
        let t = Instant::now();
        for pos in 0..steps {
            pool.install(|| {
                forward_slots(&model, &mut state, &mut bs, &tokens, pos, steps, threads)
            });
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{kind:?}: {rows} rows × {steps} steps, {threads} threads: {:.1} ms/step, {:.0} tok/s",
            secs * 1e3 / steps as f64,
            (rows * steps) as f64 / secs
        );
    }
    Ok(())
}
