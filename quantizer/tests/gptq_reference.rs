//! GPTQ and RTN against the GPTQ authors' reference implementation
//! (`../shared/fixtures/gptq-reference`: a real-shaped layer in six settings).

use std::path::PathBuf;

use nibble_quantizer::{gptq, rtn, GptqConfig, Grid};

fn fixtures() -> PathBuf {
    match std::env::var_os("NIBBLE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
    .join("fixtures/gptq-reference")
}

struct Tensors(Vec<u8>);

impl Tensors {
    fn open(name: &str) -> Tensors {
        Tensors(std::fs::read(fixtures().join(name)).expect("fixture"))
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn int(&self, name: &str) -> Vec<i64> {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        match t.dtype() {
            safetensors::Dtype::I32 => t
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()).into())
                .collect(),
            safetensors::Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            d => panic!("{name}: {d:?}"),
        }
    }
}

const ROWS: usize = 96;
const COLS: usize = 160;

/// ‖(W − Q)·Xᵀ‖² / ‖W·Xᵀ‖² in f64.
fn rel_output_error(w: &[f32], q: &[f32], x: &[f32]) -> f64 {
    let n = x.len() / COLS;
    let (mut num, mut den) = (0f64, 0f64);
    for r in 0..ROWS {
        for t in 0..n {
            let (mut a, mut b) = (0f64, 0f64);
            for c in 0..COLS {
                let xv = f64::from(x[t * COLS + c]);
                a += f64::from(w[r * COLS + c]) * xv;
                b += f64::from(q[r * COLS + c]) * xv;
            }
            num += (a - b) * (a - b);
            den += a * a;
        }
    }
    num / den
}

fn config(case: &serde_json::Value) -> GptqConfig {
    let gs = case["groupsize"].as_i64().unwrap();
    let mut cfg = GptqConfig::new(
        case["bits"].as_u64().unwrap() as u32,
        (gs > 0).then_some(gs as usize),
        case["sym"].as_bool().unwrap(),
    )
    .unwrap();
    cfg.act_order = case["actorder"].as_bool().unwrap();
    cfg.static_groups = case["static_groups"].as_bool().unwrap();
    cfg.damp = case["percdamp"].as_f64().unwrap();
    cfg.block_size = case["blocksize"].as_u64().unwrap() as usize;
    cfg
}

#[test]
fn gptq_reproduces_the_reference_in_all_six_cases() {
    let x = Tensors::open("inputs.safetensors").f32("X");
    for n in 1..=6 {
        let case: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("case_{n}.json"))).unwrap(),
        )
        .unwrap();
        let t = Tensors::open(&format!("case_{n}.safetensors"));
        let (w, h) = (t.f32("W"), t.f32("H"));
        let cfg = config(&case);
        let got = gptq(&w, &h, ROWS, COLS, &cfg).unwrap();

        // Integer codes: ≥ 99.5% identical, the rest one step off.
        let want_codes = t.int("qweight");
        let mut same = 0;
        for (g, &r) in got.codes.iter().zip(&want_codes) {
            let d = (i64::from(*g) - r).abs();
            assert!(d <= 1, "case {n}: code off by {d}");
            same += usize::from(d == 0);
        }
        let frac = same as f64 / want_codes.len() as f64;
        assert!(
            frac >= 0.995,
            "case {n}: only {:.2}% of codes identical",
            100.0 * frac
        );

        // Permutation and group index.
        let perm: Vec<usize> = t.int("perm").iter().map(|&v| v as usize).collect();
        assert_eq!(got.perm, perm, "case {n}: act-order permutation");
        let g_idx: Vec<u32> = t.int("g_idx").iter().map(|&v| v as u32).collect();
        assert_eq!(got.g_idx, g_idx, "case {n}: g_idx");

        // Grids and the dequantized result.
        let (scale, zero) = (t.f32("scale"), t.f32("zero"));
        assert_eq!(got.scales.len(), scale.len());
        for (a, b) in got.scales.iter().zip(&scale) {
            // f64 vs the reference's f32 accumulation of updates: ~1e-6 relative.
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1e-3),
                "case {n}: scale {a} vs {b}"
            );
        }
        assert_eq!(got.zeros, zero, "case {n}: zeros");
        let q = got.dequantize();
        let q_ref = t.f32("Q");
        let max_dq = q
            .iter()
            .zip(&q_ref)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if frac == 1.0 {
            assert!(max_dq < 1e-5, "case {n}: max |ΔQ| {max_dq}");
        }

        // Output error and the printed error within 1%.
        let e = rel_output_error(&w, &q, &x);
        let e_ref = case["rel_output_error_gptq"].as_f64().unwrap();
        assert!(
            (e / e_ref - 1.0).abs() < 0.01,
            "case {n}: rel output error {e:.5e} vs {e_ref:.5e}"
        );
        let err_ref = case["reference_reported_error"].as_f64().unwrap();
        assert!(
            (got.error / err_ref - 1.0).abs() < 0.01,
            "case {n}: error {} vs {err_ref}",
            got.error
        );
        let damp_ref = case["damp_added_to_diag"].as_f64().unwrap();
        assert!((got.damp_added / damp_ref - 1.0).abs() < 1e-5);

        // RTN baseline: same grids as the reference's, and GPTQ clearly better.
        let r = rtn(&w, ROWS, COLS, cfg.grid, cfg.group_size).unwrap();
        let q_rtn = r.dequantize();
        let q_rtn_ref = t.f32("Q_rtn");
        let max_drtn = q_rtn
            .iter()
            .zip(&q_rtn_ref)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_drtn < 1e-5, "case {n}: RTN max |ΔQ| {max_drtn}");
        let e_rtn = rel_output_error(&w, &q_rtn, &x);
        let e_rtn_ref = case["rel_output_error_rtn"].as_f64().unwrap();
        assert!(
            (e_rtn / e_rtn_ref - 1.0).abs() < 0.01,
            "case {n}: RTN error {e_rtn:.5e} vs {e_rtn_ref:.5e}"
        );
        assert!(e < e_rtn, "case {n}: GPTQ must beat RTN");
        eprintln!("case {n}: codes identical {:.2}%, max|ΔQ| {max_dq:.1e}, e {e:.4e} (ref {e_ref:.4e}), RTN {e_rtn:.4e}", 100.0 * frac);
    }
}

#[test]
fn gptq_with_identity_hessian_equals_rtn() {
    let w = Tensors::open("inputs.safetensors").f32("W");
    let mut h = vec![0f32; COLS * COLS];
    for i in 0..COLS {
        h[i * COLS + i] = 1.0;
    }
    for (bits, gs, sym) in [
        (4, None, false),
        (4, Some(32), true),
        (3, Some(64), false),
        (2, Some(32), false),
        (8, None, true),
    ] {
        let mut cfg = GptqConfig::new(bits, gs, sym).unwrap();
        for act_order in [false, true] {
            cfg.act_order = act_order;
            let g = gptq(&w, &h, ROWS, COLS, &cfg).unwrap();
            let r = rtn(&w, ROWS, COLS, Grid::new(bits, sym).unwrap(), gs).unwrap();
            assert_eq!(
                g.codes, r.codes,
                "bits {bits} gs {gs:?} act_order {act_order}"
            );
            assert_eq!(g.dequantize(), r.dequantize());
        }
    }
}

#[test]
fn bad_inputs_are_rejected_before_work() {
    let w = vec![0.5f32; 8 * 16];
    let h = vec![0f32; 16 * 16];
    assert!(GptqConfig::new(6, None, false).is_err());
    let cfg = GptqConfig::new(4, Some(32), false).unwrap();
    assert!(matches!(
        gptq(&w, &h, 8, 16, &cfg),
        Err(nibble_quantizer::QuantError::BadGroupSize { .. })
    ));
    let mut bad = w.clone();
    bad[5] = f32::NAN;
    let cfg = GptqConfig::new(4, None, false).unwrap();
    assert!(matches!(
        gptq(&bad, &h, 8, 16, &cfg),
        Err(nibble_quantizer::QuantError::NonFinite { index: 5, .. })
    ));
    assert!(matches!(
        gptq(&w, &h[..10], 8, 16, &cfg),
        Err(nibble_quantizer::QuantError::Shape(_))
    ));
}
