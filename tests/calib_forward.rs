//! The quantizer's calibration forward (which produces the inputs GPTQ
//! builds its Hessians from) must be the model's forward: run every block on
//! real windows and compare the logits with the runtime's.

mod common;

use std::sync::Arc;

use common::*;
use nibble::format::HParams;
use nibble::quantizer::calib::{linear, BlockCtx, BlockWeights};
use nibble::quantizer::model::tensor_f32;
use nibble::Model;

fn check(model_path: &std::path::Path, seqlen: usize) {
    let f = import_f32(model_path);
    let v = f.view().unwrap();
    let hp = HParams::read(&v.metadata).unwrap();
    let t = |n: &str| tensor_f32(v.tensor(n).unwrap()).unwrap();
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let model = Arc::new(Model::load(model_path).unwrap());
    let ids = model
        .tokenizer()
        .unwrap()
        .encode(&text[..20_000], false)
        .unwrap();
    let windows = [&ids[..seqlen], &ids[1000..1000 + seqlen]];
    let e = hp.n_embd;
    let embd = t("token_embd.weight");
    let mut x: Vec<f32> = windows
        .iter()
        .flat_map(|w| w.iter())
        .flat_map(|&tok| embd[tok as usize * e..(tok as usize + 1) * e].to_vec())
        .collect();
    let bc = BlockCtx::new(&hp, seqlen, 2).unwrap();
    for l in 0..hp.n_layer {
        let b = |s: &str| t(&format!("blk.{l}.{s}.weight"));
        let w = BlockWeights {
            attn_norm: b("attn_norm"),
            q: b("attn_q"),
            k: b("attn_k"),
            v: b("attn_v"),
            o: b("attn_output"),
            ffn_norm: b("ffn_norm"),
            gate: b("ffn_gate"),
            up: b("ffn_up"),
            down: b("ffn_down"),
        };
        bc.block_forward(&w, &mut x);
    }
    let mut xn = vec![0f32; x.len()];
    bc.norm_rows(&x, &t("output_norm.weight"), &mut xn);
    let head = if hp.tie_embeddings {
        embd
    } else {
        t("output.weight")
    };
    let n = windows.len() * seqlen;
    let mut logits = vec![0f32; n * hp.n_vocab];
    linear(&xn, &head, n, hp.n_vocab, e, &mut logits, 2);
    for (i, w) in windows.iter().enumerate() {
        let want = forward_logits(&model, w, 1);
        let got = &logits[i * seqlen * hp.n_vocab..(i + 1) * seqlen * hp.n_vocab];
        let err = rel_err(got, &want);
        assert!(
            err < 1e-4,
            "{}: window {i}: calibration forward vs runtime {err:.2e}",
            model_path.display()
        );
    }
}

#[test]
fn calibration_forward_equals_the_runtime_on_stories260k() {
    check(&shared().join("models/stories260k"), 64);
}

#[test]
fn calibration_forward_equals_the_runtime_on_smollm2() {
    check(
        &shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        32,
    );
}
