//! The quantizer's calibration forward (which produces the inputs GPTQ
//! builds its Hessians from) must be the model's forward: run every block
//! through the quantizer's executor ([`CalibExec`], the one GPTQ calls) one
//! stage at a time, as true-sequential GPTQ does, and compare the logits
//! with the runtime's, for SmolLM2, stories260k and every family fixture.

mod common;

use std::sync::Arc;

use common::*;
use nibble::format::HParams;
use nibble::quantizer::calib::{linear, CalibExec};
use nibble::quantizer::model::tensor_f32;
use nibble::runtime::block::{finish_embedding, norm_rows, softcap_logits, BlockBufs, Rope, Stage};
use nibble::Model;

/// Runtime and calibration forward must agree to float reassociation
/// (`gemm` against the runtime's kernels).
const TOL: f64 = 1e-4;

fn check(model_path: &std::path::Path, windows: &[Vec<u32>]) {
    let f = import_f32(model_path);
    let v = f.view().unwrap();
    let hp = HParams::read(&v.metadata).unwrap();
    let t = |n: &str| tensor_f32(v.tensor(n).unwrap()).unwrap();
    let opt = |n: &str| v.tensor(n).map(|t| tensor_f32(t).unwrap());
    let model = Arc::new(Model::load(model_path).unwrap());
    let seqlen = windows[0].len();
    let e = hp.n_embd;
    let embd = t("token_embd.weight");
    let pos = opt("pos_embd.weight");
    let mut x = vec![0f32; windows.len() * seqlen * e];
    for (i, (row, &tok)) in x
        .chunks_exact_mut(e)
        .zip(windows.iter().flatten())
        .enumerate()
    {
        row.copy_from_slice(&embd[tok as usize * e..(tok as usize + 1) * e]);
        let p = i % seqlen;
        finish_embedding(&hp.desc, row, pos.as_ref().map(|v| &v[p * e..(p + 1) * e]));
    }
    let mut exec = CalibExec::new(&hp, seqlen, 2).unwrap();
    let rope = Rope::new(&hp, seqlen);
    let mut b = BlockBufs::new(&hp, seqlen);
    for l in 0..hp.n_layer {
        exec.load_layer(&v, l).unwrap();
        for xs in x.chunks_exact_mut(seqlen * e) {
            b.x.copy_from_slice(xs);
            for s in Stage::ALL {
                exec.run(l, &mut b, &rope, s);
            }
            xs.copy_from_slice(&b.x);
        }
    }
    let mut xn = vec![0f32; x.len()];
    let bias = opt("output_norm.bias");
    norm_rows(
        hp.desc.norm,
        hp.norm_eps,
        &x,
        &mut xn,
        &t("output_norm.weight"),
        bias.as_deref(),
    );
    let head = if hp.tie_embeddings {
        embd
    } else {
        t("output.weight")
    };
    let n = windows.len() * seqlen;
    let mut logits = vec![0f32; n * hp.n_vocab];
    linear(&xn, &head, n, hp.n_vocab, e, &mut logits, 2);
    softcap_logits(&hp.desc, &mut logits);
    for (i, w) in windows.iter().enumerate() {
        let want = forward_logits(&model, w, 1);
        let got = &logits[i * seqlen * hp.n_vocab..(i + 1) * seqlen * hp.n_vocab];
        let err = rel_err(got, &want);
        assert!(
            err < TOL,
            "{}: window {i}: calibration forward vs runtime {err:.2e}",
            model_path.display()
        );
    }
}

fn text_windows(model_path: &std::path::Path, seqlen: usize) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let model = Model::load(model_path).unwrap();
    let ids = model
        .tokenizer()
        .unwrap()
        .encode(&text[..20_000], false)
        .unwrap();
    vec![ids[..seqlen].to_vec(), ids[1000..1000 + seqlen].to_vec()]
}

#[test]
fn calibration_forward_equals_the_runtime_on_stories260k() {
    let path = shared().join("models/stories260k");
    check(&path, &text_windows(&path, 64));
}

#[test]
fn calibration_forward_equals_the_runtime_on_smollm2() {
    let path = shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    check(&path, &text_windows(&path, 32));
}

/// Every family: norms, biases, q/k norms, soft-caps, sliding windows
/// (windows longer than the fixtures' sliding window where they have one),
/// local RoPE bases, partial rotary, learned positions, parallel residual.
#[test]
fn calibration_forward_equals_the_runtime_on_every_family() {
    for family in FAMILIES {
        let dir = shared().join("fixtures/hf-reference").join(family);
        let seqlen = 40;
        let windows: Vec<Vec<u32>> = (0..2u32)
            .map(|w| {
                (0..seqlen as u32)
                    .map(|i| 4 + (i * 37 + w * 101) % 500)
                    .collect()
            })
            .collect();
        check(&dir, &windows);
    }
}
