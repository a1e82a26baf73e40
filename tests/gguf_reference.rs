//! Real GGUF files as users download them (Q4_K_M mixes of Q4_K, Q5_0,
//! Q6_K and Q8_0), fetched by `../shared/scripts/fetch-models.sh`:
//! imported to f32 (every block decoded exactly), nibble's logits on the 32
//! reference ids match transformers' float32 forward of the same file
//! (`../shared/fixtures/gguf-reference/<model>/reference.safetensors`), and
//! the 16 greedy tokens are transformers'.

mod common;

use std::sync::Arc;

use common::*;
use nibble::Model;

/// Against `logits` (stored as F16: up to 0.0078 of rounding at |logit| ≤
/// 26.5, i.e. 3e-4 of the largest logit) on every position.
const TOL_ALL_POSITIONS: f64 = 1e-3;
/// Against the last position's F32 `logits_last`.
const TOL_LAST: f64 = 1e-4;

fn check(file: &str, fixture: &str) {
    let path = real_model(file);
    let reference = shared()
        .join("fixtures/gguf-reference")
        .join(fixture)
        .join("reference.safetensors");
    let model = Arc::new(Model::from_nib(import_f32(&path), file.into()).expect("load"));
    let ids = reference_ids(&reference);
    let n_vocab = model.hparams.n_vocab;
    let all = read_ref(&reference, "logits");
    let last = read_ref(&reference, "logits_last");
    assert_eq!(
        all.f32.len(),
        ids.len() * n_vocab,
        "{file}: vocabulary size"
    );
    for (path_name, got) in [
        ("batched", forward_logits_batched(&model, &ids, 2, 32)),
        ("one-token", forward_logits_sequential(&model, &ids, 2)),
    ] {
        let e_all = rel_err(&got, &all.f32);
        let e_last = rel_err(&got[(ids.len() - 1) * n_vocab..], &last.f32);
        eprintln!("{file} {path_name}: all positions {e_all:.2e}, last {e_last:.2e}");
        assert!(
            e_all <= TOL_ALL_POSITIONS,
            "{file} {path_name}: logits rel err {e_all:.3e}"
        );
        assert!(
            e_last <= TOL_LAST,
            "{file} {path_name}: last logits rel err {e_last:.3e}"
        );
    }
    let greedy = read_ref(&reference, "greedy_ids");
    let mut s = session(&model, ids.len() + greedy.i64.len() + 1, 2);
    s.eval(&ids).unwrap();
    let mut got = vec![];
    for _ in 0..greedy.i64.len() {
        let next = nibble::runtime::argmax(s.logits());
        got.push(i64::from(next));
        s.eval(&[next]).unwrap();
    }
    assert_eq!(got, greedy.i64, "{file}: greedy tokens");
}

/// Skipped under qemu (aarch64): about 20 minutes of emulated f32 products
/// there, while the block decoders and architecture tables are the same
/// code on every target and the NEON kernels are covered by the fixtures.
#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "slow under qemu; target-independent"
)]
fn gemma3_270m_q4_k_m_matches_transformers() {
    check("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m");
}

#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "slow under qemu; target-independent"
)]
fn qwen2_5_coder_0_5b_q4_k_m_matches_transformers() {
    check(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-0.5b",
    );
}

/// The file's own blocks run natively (Q4_K, Q5_0, Q6_K kernels, Q8_0 as
/// Q8G; int8 activations as llama.cpp's kernels use): compared on the last
/// position with transformers' float32 logits and llama.cpp's, whose own
/// distance from transformers (`logits_compare.json`: max |Δ| 0.60 for
/// gemma, 0.36 for qwen on that position) sets the scale. The bound is the
/// normwise relative error llama.cpp itself has against transformers on
/// that position, times `margin`; argmax must agree with both.
///
/// The margin is the spread that float order alone gives on that model.
/// Qwen's is small: 1.5. Gemma 3 270M's one position moves between 2.4e-2
/// and 4.9e-2 from transformers (llama.cpp: 2.5e-2) when only the order of
/// float additions changes, with the same integer sums: AVX2 against
/// AVX-512 kernels, row kernels against the interleaved copies
/// (`kernels::qk_x8`), the batched against the one-token path. So its
/// margin is 2.5.
fn check_native(file: &str, fixture: &str, margin: f64) {
    let path = real_model(file);
    let dir = shared().join("fixtures/gguf-reference").join(fixture);
    let nib = nibble::format::import::import_to_memory(
        &path,
        &nibble::format::import::ImportOptions {
            dtype: nibble::format::DType::F32,
            hash_source: false,
            keep_blocks: true,
            lora: Vec::new(),
        },
        &mut |_, _, _| {},
    )
    .expect("import");
    let model = Arc::new(Model::from_nib(nib, file.into()).expect("load"));
    let lin = &model.layers[0].ffn_down;
    assert!(
        lin.dtype.gguf_block().is_some(),
        "{file}: kept blocks, got {}",
        lin.dtype
    );
    let reference = dir.join("reference.safetensors");
    let ids = reference_ids(&reference);
    let n_vocab = model.hparams.n_vocab;
    let hf = read_ref(&reference, "logits_last");
    let lc = read_ref(&dir.join("llamacpp_logits.safetensors"), "logits_last");
    let llama_vs_hf = rel_err(&lc.f32, &hf.f32);
    let argmax = |v: &[f32]| nibble::runtime::argmax(v);
    for (path_name, got) in [
        ("batched", forward_logits_batched(&model, &ids, 2, 32)),
        ("one-token", forward_logits_sequential(&model, &ids, 2)),
    ] {
        let last = &got[(ids.len() - 1) * n_vocab..];
        let (e_hf, e_lc) = (rel_err(last, &hf.f32), rel_err(last, &lc.f32));
        eprintln!(
            "{file} native {path_name}: vs transformers {e_hf:.2e}, vs llama.cpp {e_lc:.2e} (llama.cpp vs transformers {llama_vs_hf:.2e})"
        );
        assert!(
            e_hf <= margin * llama_vs_hf,
            "{file} {path_name}: {e_hf:.3e} from transformers"
        );
        assert_eq!(argmax(last), argmax(&hf.f32), "{file} {path_name}: argmax");
        assert_eq!(
            argmax(last),
            argmax(&lc.f32),
            "{file} {path_name}: argmax vs llama.cpp"
        );
    }
}

#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "slow under qemu; the kernels are covered by their unit tests"
)]
fn gemma3_270m_q4_k_m_native_blocks_match_the_references() {
    check_native("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m", 2.5);
}

#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "slow under qemu; the kernels are covered by their unit tests"
)]
fn qwen2_5_coder_0_5b_q4_k_m_native_blocks_match_the_references() {
    check_native(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-0.5b",
        1.5,
    );
}
