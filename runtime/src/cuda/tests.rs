//! The CUDA kernels against their CPU counterparts.
//!
//! `every_program_compiles_to_ptx` and `a_syntax_error_is_reported` need
//! only NVRTC (CI installs it: `scripts/nvrtc.sh`); the rest need an NVIDIA
//! GPU and are run by `scripts/test-cuda.sh` (`--ignored`).

use super::*;
use crate::kernels::test_util::{lcg, make_row};

/// Relative tolerance of a float reduction computed in another order
/// (warp partial sums instead of the CPU's chains), against Σ|terms|.
const SUM_TOL: f64 = 1e-5;
/// Element-wise functions: the device's expf/tanhf/erff against Rust's.
const ELEM_TOL: f32 = 2e-6;

fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n).map(|_| lcg(seed)).collect()
}

#[test]
fn every_program_compiles_to_ptx() {
    for arch in [
        None,
        Some("compute_70"),
        Some("compute_80"),
        Some("compute_90"),
    ] {
        for p in &PROGRAMS {
            let ptx = compile(p, arch)
                .unwrap_or_else(|e| panic!("{} for {arch:?}: {e}", p.name))
                .to_src();
            for k in p.kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{}: no entry point {k} in the PTX for {arch:?}",
                    p.name
                );
            }
        }
    }
}

#[test]
fn a_syntax_error_is_reported() {
    let broken = Program {
        name: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        kernels: &["k"],
    };
    match compile(&broken, None) {
        Err(CudaError::Compile { program, log }) => {
            assert_eq!(program, "broken.cu");
            assert!(log.contains("undefined_name"), "{log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

/// Without a driver, opening a device is a clear error, not a panic or a
/// link failure; with one, device 0 opens with every kernel loaded.
#[test]
fn opening_says_whether_cuda_is_available() {
    match Gpu::open(0) {
        Ok(g) => {
            assert!(driver_available());
            assert!(g.compute_capability.0 >= 5 && g.total_mem > 0, "{}", g.name);
        }
        Err(CudaError::Unavailable(why)) => {
            assert!(!driver_available() || why.contains("device"), "{why}");
            eprintln!("CUDA unavailable here: {why}");
        }
        Err(e) => panic!("{e}"),
    }
    assert!(matches!(Gpu::open(1 << 20), Err(CudaError::Unavailable(_))));
}

fn gpu() -> Gpu {
    Gpu::open(0).unwrap_or_else(|e| panic!("{e}"))
}

/// The packed GEMV and the tile dequantizer against the format's decoder,
/// every packed type, whole and ragged groups, a zero-scale group.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/test-cuda.sh)"]
fn packed_gemv_and_dequant_match_the_reference() {
    let g = gpu();
    let mut seed = 0x5eed_0001u64;
    for dtype in [DType::Q2G, DType::Q3G, DType::Q4G, DType::Q8G, DType::Q4GM] {
        for (rows, cols, gs) in [(7, 96, 32), (5, 200, 64), (3, 80, 80), (9, 256, 128)] {
            if dtype == DType::Q4GM && gs % 32 != 0 {
                continue;
            }
            let data: Vec<u8> = (0..rows)
                .flat_map(|r| make_row(dtype, cols, gs, &mut seed, r == 0))
                .collect();
            let w = PackedRows::new(dtype, &data, rows, cols, gs).expect("valid rows");
            let x = rand_vec(cols, &mut seed);
            let dw = g.upload_packed(w).unwrap();
            let dx = g.upload(&x).unwrap();
            let mut dy = g.zeros::<f32>(rows).unwrap();
            g.gemv(&dw, &dx, &mut dy).unwrap();
            let mut y = vec![0f32; rows];
            g.download(&dy, &mut y).unwrap();
            let mut deq = g.zeros::<f32>(rows * cols).unwrap();
            g.dequant(&dw, &mut deq).unwrap();
            let mut tiles = vec![0f32; rows * cols];
            g.download(&deq, &mut tiles).unwrap();
            let mut wr = vec![0f32; cols];
            for r in 0..rows {
                crate::kernels::qg::dequant_row_scalar(w, r, &mut wr);
                let what = format!("{dtype} {rows}×{cols} g{gs} row {r}");
                for (c, (&a, &b)) in tiles[r * cols..(r + 1) * cols].iter().zip(&wr).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                        "{what} col {c}: {a} vs {b}"
                    );
                }
                let exact: f64 = wr
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let mag: f64 = wr
                    .iter()
                    .zip(&x)
                    .map(|(&a, &b)| f64::from((a * b).abs()))
                    .sum();
                assert!(
                    (f64::from(y[r]) - exact).abs() <= SUM_TOL * mag.max(1e-6),
                    "{what}: {} vs {exact}",
                    y[r]
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/test-cuda.sh)"]
fn norms_match_the_block() {
    let g = gpu();
    let mut seed = 0x5eed_0002u64;
    for n in [64, 576, 1000] {
        let rows = 3;
        let x = rand_vec(rows * n, &mut seed);
        let w = rand_vec(n, &mut seed);
        let b = rand_vec(n, &mut seed);
        let (dx, dw, db) = (
            g.upload(&x).unwrap(),
            g.upload(&w).unwrap(),
            g.upload(&b).unwrap(),
        );
        let mut dout = g.zeros::<f32>(rows * n).unwrap();
        let mut got = vec![0f32; rows * n];
        let mut want = vec![0f32; n];
        g.rmsnorm(&dx, &dw, &mut dout, rows, n, 1e-5).unwrap();
        g.download(&dout, &mut got).unwrap();
        for r in 0..rows {
            crate::block::rmsnorm(&mut want, &x[r * n..(r + 1) * n], &w, 1e-5);
            close(
                &got[r * n..(r + 1) * n],
                &want,
                1e-5,
                &format!("rmsnorm {n}"),
            );
        }
        for bias in [None, Some(&db)] {
            g.layernorm(&dx, (&dw, bias), &mut dout, rows, n, 1e-5)
                .unwrap();
            g.download(&dout, &mut got).unwrap();
            let zero = vec![0f32; n];
            for r in 0..rows {
                let bb = if bias.is_some() { &b } else { &zero };
                crate::block::layernorm(&mut want, &x[r * n..(r + 1) * n], &w, bb, 1e-5);
                close(
                    &got[r * n..(r + 1) * n],
                    &want,
                    1e-5,
                    &format!("layernorm {n}"),
                );
            }
        }
    }
}

/// |a − b| ≤ tol · max(1, |b|) element by element.
fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/test-cuda.sh)"]
fn elementwise_kernels_match_the_cpu() {
    use crate::kernels::act;
    let g = gpu();
    let mut seed = 0x5eed_0003u64;
    // RoPE, full and partial rotary.
    for (n_heads, head_dim, half) in [(9, 64, 32), (4, 80, 16)] {
        let v = rand_vec(n_heads * head_dim, &mut seed);
        let cos = rand_vec(half, &mut seed);
        let sin = rand_vec(half, &mut seed);
        let mut dv = g.upload(&v).unwrap();
        g.rope(
            &mut dv,
            n_heads,
            head_dim,
            &g.upload(&cos).unwrap(),
            &g.upload(&sin).unwrap(),
            half,
        )
        .unwrap();
        let mut got = vec![0f32; v.len()];
        g.download(&dv, &mut got).unwrap();
        let mut want = v.clone();
        crate::block::rope(&mut want, head_dim, &cos, &sin);
        close(&got, &want, ELEM_TOL, "rope");
    }
    let n = 1537;
    let x: Vec<f32> = rand_vec(n, &mut seed).iter().map(|v| v * 8.0).collect();
    let up = rand_vec(n, &mut seed);
    let dup = g.upload(&up).unwrap();
    let mut got = vec![0f32; n];
    for (glu, reference) in [
        (Glu::Silu, act::swiglu_scalar as fn(&mut [f32], &[f32])),
        (Glu::GeluTanh, act::geglu_scalar),
    ] {
        let mut dg = g.upload(&x).unwrap();
        g.glu(&mut dg, &dup, n, glu).unwrap();
        g.download(&dg, &mut got).unwrap();
        let mut want = x.clone();
        reference(&mut want, &up);
        close(&got, &want, ELEM_TOL * 4.0, &format!("{glu:?}"));
    }
    for (a, reference) in [
        (Act::GeluTanh, act::gelu_tanh_scalar as fn(&mut [f32])),
        (Act::GeluErf, act::gelu_erf_scalar),
        (Act::Relu, act::relu_scalar),
    ] {
        let mut dx = g.upload(&x).unwrap();
        g.act(&mut dx, n, a).unwrap();
        g.download(&dx, &mut got).unwrap();
        let mut want = x.clone();
        reference(&mut want);
        close(&got, &want, ELEM_TOL * 4.0, &format!("{a:?}"));
    }
    // The residual add, with and without a bias: exact.
    let bias = rand_vec(n, &mut seed);
    for with_bias in [false, true] {
        let mut dx = g.upload(&x).unwrap();
        let db = g.upload(&bias).unwrap();
        g.add(&mut dx, &dup, with_bias.then_some(&db), n).unwrap();
        g.download(&dx, &mut got).unwrap();
        let want: Vec<f32> = (0..n)
            .map(|i| x[i] + if with_bias { up[i] + bias[i] } else { up[i] })
            .collect();
        close(&got, &want, 0.0, "add");
    }
    // The f16 store rounds as the CPU does: exact.
    let mut dh = g.zeros::<u16>(n).unwrap();
    g.store_f16(&g.upload(&x).unwrap(), &mut dh, n).unwrap();
    let mut bits = vec![0u16; n];
    g.download(&dh, &mut bits).unwrap();
    let want: Vec<u16> = x.iter().map(|&v| crate::math::f32_to_f16(v)).collect();
    assert_eq!(bits, want, "store_f16");
}

#[test]
#[ignore = "needs an NVIDIA GPU (scripts/test-cuda.sh)"]
fn attention_matches_the_cpu() {
    use crate::kernels::attn::{attend_group_scalar, Attend};
    let g = gpu();
    let mut seed = 0x5eed_0004u64;
    for (n_head, n_head_kv, head_dim, n_ctx, range, softcap) in [
        (9, 3, 64, 40, 0..40, 0.0),
        (4, 1, 256, 300, 17..300, 50.0),
        (2, 2, 80, 5, 4..5, 0.0),
    ] {
        let stride = n_head_kv * head_dim;
        let q = rand_vec(n_head * head_dim, &mut seed);
        let k: Vec<u16> = rand_vec(n_ctx * stride, &mut seed)
            .iter()
            .map(|&v| crate::math::f32_to_f16(v * 3.0))
            .collect();
        let v: Vec<u16> = rand_vec(n_ctx * stride, &mut seed)
            .iter()
            .map(|&v| crate::math::f32_to_f16(v))
            .collect();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (dq, dk, dv) = (
            g.upload(&q).unwrap(),
            g.upload(&k).unwrap(),
            g.upload(&v).unwrap(),
        );
        let mut dscores = g.zeros::<f32>(n_head * n_ctx).unwrap();
        let mut dout = g.zeros::<f32>(n_head * head_dim).unwrap();
        g.attend(AttendArgs {
            q: &dq,
            keys: &dk,
            values: &dv,
            scores: &mut dscores,
            out: &mut dout,
            n_head,
            n_head_kv,
            head_dim,
            n_ctx,
            range: range.clone(),
            scale,
            softcap,
        })
        .unwrap();
        let mut got = vec![0f32; n_head * head_dim];
        g.download(&dout, &mut got).unwrap();
        let group = n_head / n_head_kv;
        let mut want = vec![0f32; n_head * head_dim];
        let mut scores = vec![0f32; group * n_ctx];
        for kv in 0..n_head_kv {
            let heads = kv * group * head_dim..(kv + 1) * group * head_dim;
            attend_group_scalar(Attend {
                qs: &q[heads.clone()],
                keys: &k[kv * head_dim..],
                values: &v[kv * head_dim..],
                stride,
                range: range.clone(),
                scores: &mut scores,
                score_stride: n_ctx,
                out: &mut want[heads],
                head_dim,
                scale,
                softcap,
            });
        }
        close(
            &got,
            &want,
            1e-5,
            &format!("attention {n_head}/{n_head_kv}×{head_dim}, {range:?}"),
        );
    }
}

/// Shapes the kernels cannot take are errors, not launches.
#[test]
#[ignore = "needs an NVIDIA GPU (scripts/test-cuda.sh)"]
fn bad_shapes_are_refused() {
    let g = gpu();
    let mut seed = 0x5eed_0005u64;
    let data = make_row(DType::Q4G, 64, 32, &mut seed, false);
    let w = g
        .upload_packed(PackedRows::new(DType::Q4G, &data, 1, 64, 32).unwrap())
        .unwrap();
    let short = g.zeros::<f32>(63).unwrap();
    let mut y = g.zeros::<f32>(1).unwrap();
    assert!(matches!(
        g.gemv(&w, &short, &mut y),
        Err(CudaError::Invalid(_))
    ));
    let x = g.zeros::<f32>(8).unwrap();
    let mut out = g.zeros::<f32>(8).unwrap();
    assert!(g.rmsnorm(&x, &x, &mut out, 2, 8, 1e-5).is_err());
}
