//! Matrix-vector kernels on the real SmolLM2-135M shapes, per weight type,
//! reporting bytes of weights streamed per second (criterion `Throughput`).
//!
//! Run: `cargo bench --bench kernels` (add `-- --quick` for a fast pass).
//! Only the scalar reference kernels exist so far; the SIMD kernels will be
//! added to this sweep as one more axis (instruction set) when they land.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use nibble::runtime::kernels::{dot_f16, dot_f32, dot_qg_f32};

/// (rows = outputs, cols = inputs) of SmolLM2's linear layers and output head.
const SHAPES: [(usize, usize, &str); 5] = [
    (576, 576, "q/o 576x576"),
    (192, 576, "k/v 192x576"),
    (1536, 576, "gate/up 1536x576"),
    (576, 1536, "down 576x1536"),
    (49152, 576, "head 49152x576"),
];

fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn packed(rows: usize, cols: usize, bits: u32, gs: usize) -> Vec<u8> {
    let maxq = (1u32 << bits) - 1;
    let codes: Vec<u8> = seeded(cols, 3)
        .iter()
        .map(|v| ((v + 1.0) * 0.5 * maxq as f32) as u8)
        .collect();
    let n_groups = cols.div_ceil(gs);
    let scales = vec![0.01f32; n_groups];
    let zeros = vec![(maxq / 2) as u8; n_groups];
    let mut row = Vec::new();
    nibble::format::quant::pack_row(bits, gs, &codes, &scales, &zeros, &mut row);
    row.repeat(rows)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    g.sample_size(10);
    for (rows, cols, label) in SHAPES {
        let x = seeded(cols, 1);
        let mut out = vec![0f32; rows];
        let w32 = seeded(rows * cols, 2);
        g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
        g.bench_function(BenchmarkId::new("F32 scalar", label), |b| {
            b.iter(|| {
                for (r, o) in out.iter_mut().enumerate() {
                    *o = dot_f32(&w32[r * cols..(r + 1) * cols], &x);
                }
                black_box(&out);
            })
        });
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        g.throughput(Throughput::Bytes((rows * cols * 2) as u64));
        g.bench_function(BenchmarkId::new("F16 scalar", label), |b| {
            b.iter(|| {
                for (r, o) in out.iter_mut().enumerate() {
                    *o = dot_f16(&w16[r * cols..(r + 1) * cols], &x);
                }
                black_box(&out);
            })
        });
        for (bits, gs) in [(4u32, 32usize), (4, 128), (8, 32), (3, 128), (2, 128)] {
            let w = packed(rows, cols, bits, gs);
            let rb = w.len() / rows;
            g.throughput(Throughput::Bytes(w.len() as u64));
            g.bench_function(
                BenchmarkId::new(format!("Q{bits}G g{gs} scalar"), label),
                |b| {
                    b.iter(|| {
                        for (r, o) in out.iter_mut().enumerate() {
                            *o = dot_qg_f32(bits, gs, &w[r * rb..(r + 1) * rb], &x);
                        }
                        black_box(&out);
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
