//! The CUDA packed GEMV's throughput against the device's bandwidth bound
//! (`scripts/test-cuda.sh` runs it): a 4096 × 4096 and an 8192 × 8192 weight
//! in each 4- and 8-bit type, the median of 9 runs of 100 launches.
//!
//! `cargo run --release -p nibble-runtime --features cuda --example cuda_gemv_bench`

use std::time::Instant;

use nibble_format::dtype::DType;
use nibble_format::quant::{pack_row, pack_row_q4gm};
use nibble_runtime::cuda::Gpu;
use nibble_runtime::kernels::qg::PackedRows;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let g = Gpu::open(0)?;
    let bound = g.bandwidth_bound()?;
    println!(
        "{} (compute {}.{}, {:.1} GiB), bandwidth bound {:.0} GB/s",
        g.name,
        g.compute_capability.0,
        g.compute_capability.1,
        g.total_mem as f64 / (1u64 << 30) as f64,
        bound / 1e9
    );
    let mut seed = 0x2545_f491u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (dtype, gs) in [(DType::Q4G, 128), (DType::Q4GM, 32), (DType::Q8G, 32)] {
        for n in [4096usize, 8192] {
            let bits = dtype.quant_bits().expect("packed");
            let n_groups = n.div_ceil(gs);
            let mut data = Vec::new();
            for _ in 0..n {
                let codes: Vec<u8> = (0..n).map(|_| (next() % (1 << bits)) as u8).collect();
                let scales: Vec<f32> = (0..n_groups).map(|_| 0.01).collect();
                if dtype == DType::Q4GM {
                    pack_row_q4gm(gs, &codes, &scales, &vec![-0.08; n_groups], &mut data);
                } else {
                    let zeros = vec![1u8 << (bits - 1); n_groups];
                    pack_row(bits, gs, &codes, &scales, &zeros, &mut data);
                }
            }
            let w = PackedRows::new(dtype, &data, n, n, gs).ok_or("bad packed rows")?;
            let dw = g.upload_packed(w)?;
            let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1).collect();
            let dx = g.upload(&x)?;
            let mut dy = g.zeros::<f32>(n)?;
            g.gemv(&dw, &dx, &mut dy)?;
            g.synchronize()?;
            let mut times = Vec::new();
            for _ in 0..9 {
                let t = Instant::now();
                for _ in 0..100 {
                    g.gemv(&dw, &dx, &mut dy)?;
                }
                g.synchronize()?;
                times.push(t.elapsed().as_secs_f64() / 100.0);
            }
            times.sort_by(f64::total_cmp);
            let t = times[times.len() / 2];
            let bytes = (data.len() + 4 * n * 2) as f64;
            println!(
                "{dtype} g{gs} {n}×{n}: {:.1} µs, {:.0} GB/s, {:.0} % of the bound",
                t * 1e6,
                bytes / t / 1e9,
                100.0 * bytes / t / bound
            );
        }
    }
    Ok(())
}
