//! Where GPTQ puts the value projection's error, by position.
//!
//! Every sequence's first position is an attention sink in SmolLM2: most
//! later tokens put most of their attention on it, so an error in its value
//! vector reaches nearly every token. GPTQ weighs it as one token of
//! `seqlen`. This prints, for each block's `attn_v`, the mean squared output
//! error ‖(W − Ŵ)x‖² at position 0 and at the other positions of the
//! calibration windows, for RTN, GPTQ and GPTQ with act-order (Hessians from
//! the float model's block inputs, 4-bit asymmetric), and how much attention
//! the later positions put on position 0.
//!
//! `cargo run --release -p nibble-quantizer --example first_position_error -- MODEL self|TEXT [NSAMPLES] [GROUP]`
//! (GROUP 0 = one group per row, the default).

use std::path::Path;
use std::sync::Arc;

use nibble_format::import::{open_any, ImportOptions};
use nibble_format::{keys, DType, HParams};
use nibble_quantizer::calib::{
    accumulate_xtx, calibration_windows, linear, mirror_lower, self_generated_calibration,
    CalibExec,
};
use nibble_quantizer::gptq::{gptq, rtn, GptqConfig};
use nibble_quantizer::grid::Grid;
use nibble_quantizer::model::tensor_f32;
use nibble_runtime::block::{norm_rows, BlockBufs, Lin, Stage};

const SEQLEN: usize = 512;
const THREADS: usize = 2;
const BITS: u32 = 4;
/// Windows over which the attention on position 0 is averaged.
const ATTN_WINDOWS: usize = 4;

/// `xn · wᵀ` (`[SEQLEN, rows]`) with rotary embedding applied per position.
fn rotated(hp: &HParams, xn: &[f32], w: &[f32], rope: &nibble_runtime::block::Rope) -> Vec<f32> {
    let rows = w.len() / hp.n_embd;
    let mut out = vec![0f32; SEQLEN * rows];
    linear(xn, w, SEQLEN, rows, hp.n_embd, &mut out, THREADS);
    for (p, v) in out.chunks_exact_mut(rows).enumerate() {
        let (c, s) = rope.at(false, p);
        nibble_runtime::block::rope(v, hp.head_dim, c, s);
    }
    out
}

fn import(dtype: DType, keep_blocks: bool) -> ImportOptions {
    ImportOptions {
        dtype,
        hash_source: false,
        keep_blocks,
        lora: Vec::new(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: first_position_error MODEL self|TEXT [NSAMPLES] [GROUP]".into());
    }
    let (model_path, calib) = (&args[1], &args[2]);
    let nsamples: usize = args.get(3).map_or(Ok(128), |s| s.parse())?;
    let group: usize = args.get(4).map_or(Ok(0), |s| s.parse())?;
    let group_size = (group != 0).then_some(group);

    let src = open_any(
        Path::new(model_path),
        &import(DType::F32, false),
        &mut |_, _, _| {},
    )?;
    let view = src.view()?;
    let hp = HParams::read(&view.metadata)?;
    let windows = if calib == "self" {
        let model = Arc::new(nibble_runtime::Model::load_with(
            Path::new(model_path),
            &import(DType::F16, true),
            &mut |_, _, _| {},
        )?);
        self_generated_calibration(&model, nsamples, SEQLEN, 0, THREADS, &|_| {})?
    } else {
        let json = view
            .metadata
            .opt_bytes(keys::TOKENIZER_JSON)?
            .ok_or("the model has no tokenizer")?;
        let ids = nibble_runtime::Tokenizer::from_bytes(json)?
            .encode(&std::fs::read_to_string(calib)?, false)?;
        calibration_windows(&ids, nsamples, SEQLEN, 0)?
    };

    let e = hp.n_embd;
    let mut exec = CalibExec::new(&hp, SEQLEN, THREADS)?;
    let mut bufs = BlockBufs::new(&hp, SEQLEN);
    let rope = nibble_runtime::block::Rope::new(&hp, SEQLEN);
    let kv_dim = hp.n_head_kv * hp.head_dim;
    let embd = tensor_f32(view.tensor("token_embd.weight").ok_or("no token_embd")?)?;
    let mut x: Vec<f32> = windows
        .iter()
        .flatten()
        .flat_map(|&t| embd[t as usize * e..(t as usize + 1) * e].iter().copied())
        .collect();
    let n_win = windows.len() as f64;
    let grid = Grid::new(BITS, false)?;
    let sq = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
    };

    println!("mean squared error of attn_v's output, 4-bit, group {group} (0 = per row), calibration {calib}");
    println!("block\tattention on pos 0\t|v|² pos 0\tRTN pos 0\tGPTQ pos 0\tact-order pos 0\t|v|² rest\tRTN rest\tGPTQ rest\tact-order rest");
    let mut xn = vec![0f32; SEQLEN * e];
    for l in 0..hp.n_layer {
        exec.load_layer(&view, l)?;
        let attn_norm = tensor_f32(
            view.tensor(&format!("blk.{l}.attn_norm.weight"))
                .ok_or("no attn_norm")?,
        )?;
        let norm = |xs: &[f32], xn: &mut [f32]| {
            norm_rows(hp.desc.norm, hp.norm_eps, xs, xn, &attn_norm, None)
        };
        let (wq, wk, wv) = (
            exec.weight(Lin::Q).to_vec(),
            exec.weight(Lin::K).to_vec(),
            exec.weight(Lin::V).to_vec(),
        );
        // H of the q/k/v input over all windows.
        let mut h = vec![0f64; e * e];
        let mut scratch = Vec::new();
        for xs in x.chunks_exact(SEQLEN * e) {
            norm(xs, &mut xn);
            accumulate_xtx(&mut h, &xn, SEQLEN, e, &mut scratch, THREADS);
        }
        mirror_lower(&mut h, e);
        let h: Vec<f32> = h
            .iter()
            .map(|&v| (v * 2.0 / (n_win * SEQLEN as f64)) as f32)
            .collect();
        let mut cfg = GptqConfig::new(BITS, group_size, false)?;
        cfg.threads = THREADS;
        let plain = gptq(&wv, &h, kv_dim, e, &cfg)?.dequantize();
        cfg.act_order = true;
        let ordered = gptq(&wv, &h, kv_dim, e, &cfg)?.dequantize();
        let round = rtn(&wv, kv_dim, e, grid, group_size)?.dequantize();

        // Mean attention probability that queries at positions 1.. put on
        // position 0 (every head, the first ATTN_WINDOWS windows).
        let mut mass = (0f64, 0usize);
        for xs in x.chunks_exact(SEQLEN * e).take(ATTN_WINDOWS) {
            norm(xs, &mut xn);
            let (q, k) = (rotated(&hp, &xn, &wq, &rope), rotated(&hp, &xn, &wk, &rope));
            let (hd, q_dim) = (hp.head_dim, hp.n_head * hp.head_dim);
            let scale = 1.0 / (hd as f64).sqrt();
            for head in 0..hp.n_head {
                let g = head / (hp.n_head / hp.n_head_kv);
                let key = |j: usize| &k[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd];
                for i in 1..SEQLEN {
                    let qi = &q[i * q_dim + head * hd..i * q_dim + (head + 1) * hd];
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let d: f32 = qi.iter().zip(key(j)).map(|(a, b)| a * b).sum();
                            f64::from(d) * scale
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    mass.0 += (scores[0] - m).exp() / z;
                    mass.1 += 1;
                }
            }
        }

        // [position 0, the rest] × [|v|², RTN, GPTQ, act-order]
        let mut acc = [[0f64; 4]; 2];
        let mut outs = vec![vec![0f32; SEQLEN * kv_dim]; 4];
        for xs in x.chunks_exact(SEQLEN * e) {
            norm(xs, &mut xn);
            for (m, o) in [&wv, &round, &plain, &ordered].iter().zip(outs.iter_mut()) {
                linear(&xn, m, SEQLEN, kv_dim, e, o, THREADS);
            }
            for p in 0..SEQLEN {
                let r = p * kv_dim..(p + 1) * kv_dim;
                let a = &mut acc[usize::from(p != 0)];
                a[0] += outs[0][r.clone()]
                    .iter()
                    .map(|v| f64::from(*v).powi(2))
                    .sum::<f64>();
                for k in 1..4 {
                    a[k] += sq(&outs[0][r.clone()], &outs[k][r.clone()]);
                }
            }
        }
        let (n0, n1) = (n_win, n_win * (SEQLEN - 1) as f64);
        println!(
            "{l}\t{:.3}\t{}\t{}",
            mass.0 / mass.1 as f64,
            acc[0].map(|v| format!("{:.3e}", v / n0)).join("\t"),
            acc[1].map(|v| format!("{:.3e}", v / n1)).join("\t")
        );
        for xs in x.chunks_exact_mut(SEQLEN * e) {
            bufs.x.copy_from_slice(xs);
            for s in Stage::ALL {
                exec.run(l, &mut bufs, &rope, s);
            }
            xs.copy_from_slice(&bufs.x);
        }
    }
    Ok(())
}
