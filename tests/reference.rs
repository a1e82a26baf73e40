//! The float32 runtime against independent references computed by Hugging
//! Face transformers (`../shared/fixtures/hf-reference`).

mod common;

use std::sync::Arc;

use common::*;
use nibble::{GenerateParams, Model, Sampler, SamplerParams};

/// Normwise relative tolerance for float32 logits (issue: ≤ 1e-4).
const LOGIT_TOL: f64 = 1e-4;

#[test]
fn tiny_llama_matches_transformers() {
    let d = shared().join("fixtures/hf-reference/llama");
    check_hf_reference(&d, &d.join("reference.safetensors"), LOGIT_TOL);
}

#[test]
fn tiny_llama_tied_head_dim_8_matches_transformers() {
    let d = shared().join("fixtures/hf-reference/llama_tied_hd8");
    check_hf_reference(&d, &d.join("reference.safetensors"), LOGIT_TOL);
}

#[test]
fn tiny_mistral_matches_transformers() {
    let d = shared().join("fixtures/hf-reference/mistral");
    check_hf_reference(&d, &d.join("reference.safetensors"), LOGIT_TOL);
}

#[test]
fn stories260k_logits_and_64_greedy_tokens_match_transformers() {
    let model = Arc::new(Model::load(shared().join("models/stories260k")).unwrap());
    let r = shared().join("fixtures/hf-reference/stories260k/reference.safetensors");
    let ids: Vec<u32> = read_ref(&r, "input_ids")
        .i64
        .iter()
        .map(|&v| v as u32)
        .collect();
    // Our tokenizer must produce the same ids as the reference.
    let enc = model
        .tokenizer()
        .unwrap()
        .encode(
            "Once upon a time, there was a little girl named Lily.",
            true,
        )
        .unwrap();
    assert_eq!(enc, ids);
    let got = forward_logits(&model, &ids, 1);
    let e = rel_err(&got, &read_ref(&r, "logits").f32);
    assert!(e <= LOGIT_TOL, "prompt logits rel err {e:.3e}");

    let want: Vec<u32> = read_ref(&r, "greedy_ids")
        .i64
        .iter()
        .map(|&v| v as u32)
        .collect();
    let steps = read_ref(&r, "greedy_step_logits").f32;
    let n_vocab = model.hparams.n_vocab;
    let mut s = session(&model, 128, 1);
    s.eval(&[1]).unwrap();
    let mut got_ids = vec![];
    for t in 0..want.len() {
        let e = rel_err(s.logits(), &steps[t * n_vocab..(t + 1) * n_vocab]);
        assert!(e <= LOGIT_TOL, "step {t} rel err {e:.3e}");
        let next = nibble::runtime::argmax(s.logits());
        got_ids.push(next);
        s.eval(&[next]).unwrap();
    }
    assert_eq!(got_ids, want);
}

#[test]
fn stories260k_greedy_story_from_bos() {
    let model = Arc::new(Model::load(shared().join("models/stories260k")).unwrap());
    let mut s = session(&model, 256, 2);
    let mut sampler = Sampler::new(SamplerParams::greedy(), model.hparams.n_vocab).unwrap();
    let params = GenerateParams {
        max_tokens: 40,
        ..Default::default()
    };
    let mut streamed = String::new();
    let out = s
        .generate(&[model.bos_id.unwrap()], &params, &mut sampler, |_, t| {
            streamed.push_str(t);
            true
        })
        .unwrap();
    assert_eq!(streamed, out.text, "streamed text equals the final text");
    let want = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park";
    assert!(out.text.starts_with(want), "got: {:?}", out.text);
}

#[test]
fn smollm2_gguf_logits_match_transformers() {
    let model = Arc::new(
        Model::load(shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
            .unwrap(),
    );
    let r = shared().join("fixtures/hf-reference/smollm2-135m-instruct/reference.safetensors");
    let ids: Vec<u32> = read_ref(&r, "input_ids")
        .i64
        .iter()
        .map(|&v| v as u32)
        .collect();
    let got = forward_logits(&model, &ids, 2);
    let e = rel_err(&got, &read_ref(&r, "logits").f32);
    assert!(e <= LOGIT_TOL, "SmolLM2 logits rel err {e:.3e}");
}

#[test]
fn batched_and_sequential_paths_agree_with_a_sliding_window() {
    // No reference covers an active window, so check the two implementations
    // against each other, and that the window really changes the result.
    let dir = shared().join("fixtures/hf-reference/mistral");
    let ids: Vec<u32> = (0..40u32).map(|i| 4 + (i * 37) % 500).collect();
    let full = Arc::new(Model::load(&dir).unwrap());
    let mut windowed = Model::load(&dir).unwrap();
    windowed.hparams.sliding_window = 6;
    let windowed = Arc::new(windowed);
    let a = forward_logits_batched(&windowed, &ids, 2, 16);
    let b = forward_logits_sequential(&windowed, &ids, 1);
    let e = rel_err(&a, &b);
    assert!(e <= 1e-5, "batched vs sequential with window: {e:.3e}");
    let f = forward_logits_sequential(&full, &ids, 1);
    assert!(rel_err(&f, &b) > 1e-2, "the window must matter");
    let n_vocab = full.hparams.n_vocab;
    // Positions inside the window see the same keys either way.
    assert!(rel_err(&f[..6 * n_vocab], &b[..6 * n_vocab]) <= 1e-5);
}
