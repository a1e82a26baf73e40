//! Matrix-vector kernels on the real SmolLM2-135M shapes, for every weight
//! type and every instruction set this CPU runs (scalar included), reporting
//! bytes of weights streamed per second (criterion `Throughput`). One
//! single-threaded call is one full matrix-vector product, activation
//! quantization included for the packed types (as in decoding).
//!
//! A second group, `prefill`, times the prompt products (128 tokens) both
//! ways the batched path can run them.
//!
//! Run: `cargo bench --bench kernels` (add `-- --quick` for a fast pass, or a
//! filter such as `-- "Q4GM g32"`). `NIBBLE_BENCH_ISA=avx2,scalar` limits the
//! instruction sets.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use nibble::format::quant::{pack_row, pack_row_q4gm};
use nibble::format::DType;
use nibble::runtime::kernels::{Isa, Kernels, PackedRows, Q8Buf, X8Rows};

/// (rows = outputs, cols = inputs) of SmolLM2's linear layers and output head.
const SHAPES: [(usize, usize, &str); 5] = [
    (576, 576, "q/o 576x576"),
    (192, 576, "k/v 192x576"),
    (1536, 576, "gate/up 1536x576"),
    (576, 1536, "down 576x1536"),
    (49152, 576, "head 49152x576"),
];

/// Packed types as they occur: GGUF imports (Q4GM/Q4G/Q8G in groups of 32),
/// GPTQ outputs (groups of 128).
const PACKED: [(DType, usize); 6] = [
    (DType::Q4GM, 32),
    (DType::Q4G, 128),
    (DType::Q8G, 32),
    (DType::Q4G, 32),
    (DType::Q3G, 128),
    (DType::Q2G, 128),
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

fn packed(rows: usize, cols: usize, dtype: DType, gs: usize) -> Vec<u8> {
    let bits = dtype.quant_bits().unwrap();
    let maxq = (1u32 << bits) - 1;
    let codes: Vec<u8> = seeded(cols, 3)
        .iter()
        .map(|v| ((v + 1.0) * 0.5 * maxq as f32) as u8)
        .collect();
    let n_groups = cols.div_ceil(gs);
    let scales = vec![0.01f32; n_groups];
    let mut row = Vec::new();
    if dtype == DType::Q4GM {
        pack_row_q4gm(gs, &codes, &scales, &vec![-0.08; n_groups], &mut row);
    } else {
        pack_row(
            bits,
            gs,
            &codes,
            &scales,
            &vec![(maxq / 2) as u8; n_groups],
            &mut row,
        );
    }
    row.repeat(rows)
}

fn isas() -> Vec<&'static Kernels> {
    match std::env::var("NIBBLE_BENCH_ISA") {
        Ok(list) => list
            .split(',')
            .map(|n| Kernels::named(n).expect("NIBBLE_BENCH_ISA"))
            .collect(),
        Err(_) => Isa::available()
            .into_iter()
            .filter_map(Kernels::for_isa)
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    g.sample_size(10);
    let kernels = isas();
    for (rows, cols, label) in SHAPES {
        let x = seeded(cols, 1);
        let mut out = vec![0f32; rows];
        let w32 = seeded(rows * cols, 2);
        let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        for k in &kernels {
            let isa = k.isa;
            g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
            g.bench_function(BenchmarkId::new(format!("F32 {isa}"), label), |b| {
                b.iter(|| (k.matvec_f32)(black_box(&w32), cols, &x, &mut out))
            });
            g.throughput(Throughput::Bytes((rows * cols * 2) as u64));
            g.bench_function(BenchmarkId::new(format!("F16 {isa}"), label), |b| {
                b.iter(|| (k.matvec_f16)(black_box(&w16), cols, &x, &mut out))
            });
            let mut xq = Q8Buf::new(cols);
            for (dtype, gs) in PACKED {
                let w = packed(rows, cols, dtype, gs);
                let view = PackedRows::new(dtype, &w, rows, cols, gs).unwrap();
                let f = k.matvec_qg(dtype);
                g.throughput(Throughput::Bytes(w.len() as u64));
                g.bench_function(
                    BenchmarkId::new(format!("{dtype} g{gs} {isa}"), label),
                    |b| {
                        b.iter(|| {
                            xq.quantize(k.quantize_q8, black_box(&x));
                            f(view, &xq.as_ref(), &mut out);
                            black_box(&out);
                        })
                    },
                );
                // The same weights interleaved by eight rows, as decoding
                // uses them where the table has the kernel (4-bit types).
                if let (Some(f8), Some(x8)) = (k.matvec_x8, X8Rows::interleave(view)) {
                    g.bench_function(
                        BenchmarkId::new(format!("{dtype} g{gs} x8 {isa}"), label),
                        |b| {
                            b.iter(|| {
                                xq.quantize(k.quantize_q8, black_box(&x));
                                f8(&x8, 0, &xq.as_ref(), &mut out);
                                black_box(&out);
                            })
                        },
                    );
                }
                // The float-activation variant (decode to f32 + FMA, no
                // activation rounding) on the same weights, for comparison.
                let f32_act = k.matvec_qg_f32(dtype);
                g.bench_function(
                    BenchmarkId::new(format!("{dtype} g{gs} f32-act {isa}"), label),
                    |b| {
                        b.iter(|| {
                            f32_act(view, black_box(&x), &mut out);
                            black_box(&out);
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

/// Prompt products: 128 tokens against one matrix, the two ways the batched
/// path can run them: int8 activation blocks against the packed rows
/// (`matmul_qg`, single-threaded) and rows decoded to f32 then `gemm` (one
/// thread), activation quantization included in both. Throughput counts
/// multiply-adds (rows × cols × tokens). The head is left out (one call
/// takes ~0.2 s); its shape adds nothing the others lack.
fn bench_prefill(c: &mut Criterion) {
    use nibble::runtime::kernels::{matmul, MatMut, MatRef, Q8Batch};
    const N_TOK: usize = 128;
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10);
    let kernels = isas();
    for (rows, cols, label) in &SHAPES[..4] {
        let (rows, cols) = (*rows, *cols);
        let x = seeded(N_TOK * cols, 4);
        let mut out = vec![0f32; N_TOK * rows];
        let mut batch = Q8Batch::new(N_TOK, cols);
        let mut xq = Q8Buf::new(cols);
        let mut xhat = vec![0f32; N_TOK * cols];
        let mut tile = vec![0f32; rows * cols];
        for k in &kernels {
            let isa = k.isa;
            for (dtype, gs) in [(DType::Q4GM, 32), (DType::Q4G, 128)] {
                let w = packed(rows, cols, dtype, gs);
                let view = PackedRows::new(dtype, &w, rows, cols, gs).unwrap();
                g.throughput(Throughput::Elements((rows * cols * N_TOK) as u64));
                if let Some(mm) = k.matmul_qg(dtype) {
                    g.bench_function(
                        BenchmarkId::new(format!("{dtype} g{gs} int8 {isa}"), label),
                        |b| {
                            b.iter(|| {
                                batch.quantize(k.quantize_q8, black_box(&x), N_TOK, cols, None);
                                mm(view, &batch.as_ref(), &mut out, rows);
                                black_box(&out);
                            })
                        },
                    );
                }
                if let (Some(mx), Some(x8)) = (k.matmul_x8, X8Rows::interleave(view)) {
                    g.bench_function(
                        BenchmarkId::new(format!("{dtype} g{gs} x8 {isa}"), label),
                        |b| {
                            b.iter(|| {
                                batch.quantize(k.quantize_q8, black_box(&x), N_TOK, cols, None);
                                mx(&x8, &batch.as_ref(), &mut out, rows);
                                black_box(&out);
                            })
                        },
                    );
                }
                let deq = k.dequant_qg(dtype);
                g.bench_function(
                    BenchmarkId::new(format!("{dtype} g{gs} tiles+gemm {isa}"), label),
                    |b| {
                        b.iter(|| {
                            for (t, dst) in xhat.chunks_exact_mut(cols).enumerate() {
                                xq.quantize(k.quantize_q8, black_box(&x[t * cols..(t + 1) * cols]));
                                xq.as_ref().dequantize_into(dst);
                            }
                            for (r, dst) in tile.chunks_exact_mut(cols).enumerate() {
                                deq(view, r, dst);
                            }
                            matmul(
                                MatMut {
                                    data: &mut out,
                                    rows: N_TOK,
                                    cols: rows,
                                    rs: rows,
                                    cs: 1,
                                },
                                MatRef {
                                    data: &xhat,
                                    rows: N_TOK,
                                    cols,
                                    rs: cols,
                                    cs: 1,
                                },
                                MatRef {
                                    data: &tile,
                                    rows: cols,
                                    cols: rows,
                                    rs: 1,
                                    cs: cols,
                                },
                                1.0,
                                false,
                                1,
                            );
                            black_box(&out);
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench, bench_prefill);
criterion_main!(benches);
