//! PEFT LoRA adapters trained on stories260k (`../shared/fixtures/lora`):
//! merged at import, they give PEFT's logits and greedy texts (one adapter,
//! a scaled one, another, two at once), PEFT's `merge_and_unload` weights,
//! and a merged-then-GPTQ model that tells the adapted story; adapters
//! that do not fit are refused before any work.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use nibble::format::import::{import_to_file, import_to_memory, ImportOptions};
use nibble::format::lora::LoraSpec;
use nibble::format::{DType, NibFile};
use nibble::Model;

/// Merged float model against PEFT's unmerged float32 forward pass
/// (normwise): PEFT's own merged and unmerged paths differ by 2.2e-5
/// absolute (README of the fixture), logits reach ~16.
const TOL_LOGITS: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures/lora").join(name)
}

fn base() -> PathBuf {
    shared().join("models/stories260k")
}

fn spec(name: &str, scale: f32) -> LoraSpec {
    LoraSpec {
        path: fixture(name),
        scale,
    }
}

fn merged(src: &Path, lora: Vec<LoraSpec>) -> NibFile {
    import_to_memory(
        src,
        &ImportOptions {
            dtype: DType::F32,
            hash_source: false,
            keep_blocks: false,
            lora,
        },
        &mut |_, _, _| {},
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn ids(name: &str) -> Vec<u32> {
    ref_ids(&fixture("reference.safetensors"), name)
}

#[test]
fn merged_adapters_give_pefts_logits_and_greedy_texts() {
    let input = ids("input_ids");
    let cases = [
        ("base", vec![], "logits_base", "greedy_base"),
        ("max", vec![spec("max-r8", 1.0)], "logits_max", "greedy_max"),
        (
            "max ×0.5",
            vec![spec("max-r8", 0.5)],
            "logits_max_half",
            "greedy_max_half",
        ),
        (
            "tom",
            vec![spec("max-r4-qv", 1.0)],
            "logits_tom",
            "greedy_tom",
        ),
        (
            "max + tom",
            vec![spec("max-r8", 1.0), spec("max-r4-qv", 1.0)],
            "logits_both",
            "greedy_both",
        ),
    ];
    for (what, lora, logits, greedy_ids) in cases {
        let model = Arc::new(Model::from_nib(merged(&base(), lora), what.into()).unwrap());
        let want = read_ref(&fixture("reference.safetensors"), logits).f32;
        for (path, got) in [
            ("batched", forward_logits_batched(&model, &input, 1, 5)),
            ("sequential", forward_logits_sequential(&model, &input, 1)),
        ] {
            let e = rel_err(&got, &want);
            assert!(e <= TOL_LOGITS, "{what} {path}: logits rel err {e:.3e}");
        }
        let want_ids = ids(greedy_ids);
        assert_eq!(
            greedy_from_bos(&model, want_ids.len()),
            want_ids,
            "{what}: greedy text"
        );
    }
}

#[test]
fn merged_weights_equal_pefts_merge_and_unload() {
    let ours = merged(&base(), vec![spec("max-r8", 1.0)]);
    let peft = merged(&fixture("max-r8-merged"), vec![]);
    let (a, b) = (ours.view().unwrap(), peft.view().unwrap());
    let mut adapted = 0;
    for t in &a.tensors {
        let u = b.tensor(t.name).unwrap();
        let x = nibble::format::dtype::decode_f32(t.dtype, t.data).unwrap();
        let y = nibble::format::dtype::decode_f32(u.dtype, u.data).unwrap();
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_diff = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        // PEFT computes scaling · (B @ A) then adds; the sums round differently.
        assert!(max_diff <= 1e-6 * scale, "{}: max |Δ| {max_diff:e}", t.name);
        let base_t = merged(&base(), vec![]);
        let base_v = base_t.view().unwrap();
        let orig = nibble::format::dtype::decode_f32(t.dtype, base_v.tensor(t.name).unwrap().data)
            .unwrap();
        adapted += usize::from(orig != x);
    }
    assert_eq!(adapted, 35, "5 layers × 7 adapted linear weights");
    // Provenance names the adapter, its hash and its scale.
    let prov = a.metadata.get("provenance.lora");
    match prov {
        Some(nibble::format::Value::Str(s)) => {
            assert!(
                s.contains("max-r8") && s.split(' ').next().unwrap().len() == 64,
                "{s}"
            )
        }
        other => panic!("provenance.lora: {other:?}"),
    }
}

#[test]
fn merge_then_gptq_tells_the_adapted_story_and_beats_rtn() {
    let src = merged(&base(), vec![spec("max-r8", 1.0)]);
    let (q, reports) = quantize_in_memory(&src, &gptq_opts(4, Some(32), true, true));
    assert_eq!(reports.len(), 35);
    for r in &reports {
        let rtn = r.rel_error_rtn.unwrap();
        assert!(
            r.rel_error < rtn,
            "{}: GPTQ {:.3e} ≥ RTN {rtn:.3e}",
            r.name,
            r.rel_error
        );
    }
    let q = Arc::new(Model::from_nib(q, "q".into()).unwrap());
    let story = q
        .tokenizer()
        .unwrap()
        .decode(&greedy_from_bos(&q, 24), true)
        .unwrap();
    eprintln!("merged then GPTQ 4-bit: {story}");
    assert!(story.contains("little dog named Max"), "{story}");
}

// ------------------------------------------------------------------ bad input

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of max-r8 with its config and tensors edited.
fn edited_adapter(
    name: &str,
    edit_config: impl FnOnce(&mut serde_json::Value),
    rename: impl Fn(&str) -> String,
) -> PathBuf {
    let src = fixture("max-r8");
    let d = tmpdir(name);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit_config(&mut cfg);
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (rename(&n), v))
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("adapter_model.safetensors")).unwrap();
    d
}

/// The error of merging `adapter` into `model`; nothing is written.
fn merge_error(model: &Path, adapter: &Path, case: &str) -> String {
    let out = tmpdir(&format!("lora-out-{case}")).join("out.nib");
    let opts = ImportOptions {
        dtype: DType::F32,
        hash_source: false,
        keep_blocks: false,
        lora: vec![LoraSpec {
            path: adapter.to_path_buf(),
            scale: 1.0,
        }],
    };
    let e = import_to_file(model, &out, &opts, &mut |_, _, _| {})
        .err()
        .unwrap_or_else(|| panic!("{case}: merged"))
        .to_string();
    assert!(!out.exists(), "{case}: an output was written");
    let dir = out.parent().unwrap();
    assert_eq!(
        std::fs::read_dir(dir).unwrap().count(),
        0,
        "{case}: leftovers"
    );
    e
}

#[test]
fn adapters_that_do_not_fit_are_refused_before_any_work() {
    let keep = |n: &str| n.to_string();
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "other-base",
            fixture("max-r8"),
            "do not fit the base's 576×1536 weight",
        ),
        (
            "missing-module",
            edited_adapter(
                "lora-missing-module",
                |_| {},
                |n| n.replace("q_proj", "x_proj"),
            ),
            "target module 'model.layers.0.self_attn.x_proj' is not a linear layer",
        ),
        (
            "ia3",
            edited_adapter("lora-ia3", |c| c["peft_type"] = "IA3".into(), keep),
            "peft_type Some(\"IA3\")",
        ),
        (
            "dora",
            edited_adapter("lora-dora", |c| c["use_dora"] = true.into(), keep),
            "DoRA",
        ),
        (
            "modules-to-save",
            edited_adapter(
                "lora-save",
                |c| c["modules_to_save"] = serde_json::json!(["lm_head"]),
                keep,
            ),
            "modules_to_save",
        ),
        (
            "embedding",
            edited_adapter(
                "lora-embedding",
                |_| {},
                |n| {
                    n.replace(
                        "layers.0.mlp.down_proj.lora_A.weight",
                        "embed_tokens.lora_embedding_A",
                    )
                },
            ),
            "LoRA on an embedding",
        ),
        ("not-an-adapter", base(), "no adapter_config.json"),
    ];
    let smollm = shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    for (case, adapter, want) in cases {
        let model = if case == "other-base" {
            smollm.clone()
        } else {
            base()
        };
        let e = merge_error(&model, &adapter, case);
        assert!(e.contains(want), "{case}: {e}");
        assert!(
            e.contains(&adapter.display().to_string()),
            "{case}: no file named: {e}"
        );
    }
}

// ------------------------------------------------------------------ at run time

fn session_with(model: &Arc<Model>, n_ctx: usize) -> nibble::Session {
    session(model, n_ctx, 1)
}

fn logits_both_paths(s_model: &Arc<Model>, adapters: &[(&str, f32)]) -> [Vec<f32>; 2] {
    let input = ids("input_ids");
    let mut out = [Vec::new(), Vec::new()];
    for (k, batched) in [false, true].into_iter().enumerate() {
        let mut s = session_with(s_model, 32);
        for (name, scale) in adapters {
            s.add_lora(name, &spec(name, *scale)).unwrap();
        }
        let mut all = Vec::new();
        if batched {
            s.eval_each(&input, |_, l| all.extend_from_slice(l))
                .unwrap();
        } else {
            s.eval_each_sequential(&input, |_, l| all.extend_from_slice(l))
                .unwrap();
        }
        out[k] = all;
    }
    out
}

#[test]
fn runtime_adapters_on_the_float_base_give_pefts_logits_and_texts() {
    let model = Arc::new(Model::from_nib(merged(&base(), vec![]), "base".into()).unwrap());
    type Adapters<'a> = &'a [(&'a str, f32)];
    let cases: [(Adapters, &str, &str); 4] = [
        (&[("max-r8", 1.0)], "logits_max", "greedy_max"),
        (&[("max-r8", 0.5)], "logits_max_half", "greedy_max_half"),
        (&[("max-r4-qv", 1.0)], "logits_tom", "greedy_tom"),
        (
            &[("max-r8", 1.0), ("max-r4-qv", 1.0)],
            "logits_both",
            "greedy_both",
        ),
    ];
    for (adapters, logits, greedy_ids) in cases {
        let want = read_ref(&fixture("reference.safetensors"), logits).f32;
        for (path, got) in ["sequential", "batched"]
            .iter()
            .zip(logits_both_paths(&model, adapters))
        {
            let e = rel_err(&got, &want);
            assert!(
                e <= TOL_LOGITS,
                "{adapters:?} {path}: logits rel err {e:.3e}"
            );
        }
        let mut s = session_with(&model, 64);
        for (name, scale) in adapters {
            s.add_lora(name, &spec(name, *scale)).unwrap();
        }
        let want_ids = ids(greedy_ids);
        s.eval(&[1]).unwrap();
        let mut got = Vec::new();
        for _ in 0..want_ids.len() {
            let next = nibble::runtime::argmax(s.logits());
            got.push(next);
            s.eval(&[next]).unwrap();
        }
        assert_eq!(got, want_ids, "{adapters:?}: greedy text");
    }
}

#[test]
fn adapters_swap_rescale_and_detach_on_a_live_session() {
    let model = Arc::new(Model::from_nib(merged(&base(), vec![]), "base".into()).unwrap());
    let input = ids("input_ids");
    let reference = |name: &str| read_ref(&fixture("reference.safetensors"), name).f32;
    let mut s = session_with(&model, 32);
    let run = |s: &mut nibble::Session| {
        s.reset();
        let mut all = Vec::new();
        s.eval_each(&input, |_, l| all.extend_from_slice(l))
            .unwrap();
        all
    };
    let check = |got: &[f32], want: &str| {
        let e = rel_err(got, &reference(want));
        assert!(e <= TOL_LOGITS, "{want}: rel err {e:.3e}");
    };
    check(&run(&mut s), "logits_base");
    s.add_lora("max", &spec("max-r8", 1.0)).unwrap();
    check(&run(&mut s), "logits_max");
    s.set_lora_scale("max", 0.5).unwrap();
    check(&run(&mut s), "logits_max_half");
    s.add_lora("tom", &spec("max-r4-qv", 1.0)).unwrap();
    s.set_lora_scale("max", 0.0).unwrap();
    check(&run(&mut s), "logits_tom");
    s.set_lora_scale("max", 1.0).unwrap();
    check(&run(&mut s), "logits_both");
    s.remove_lora("tom").unwrap();
    check(&run(&mut s), "logits_max");
    s.remove_lora("max").unwrap();
    check(&run(&mut s), "logits_base");
    assert_eq!(s.loras().count(), 0);
    // Errors leave the session as it was.
    let e = s.remove_lora("max").unwrap_err().to_string();
    assert!(e.contains("no adapter named 'max'"), "{e}");
    s.add_lora("max", &spec("max-r8", 1.0)).unwrap();
    let e = s
        .add_lora("max", &spec("max-r4-qv", 1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already attached"), "{e}");
    let bad = edited_adapter(
        "lora-live-dora",
        |c| c["use_dora"] = true.into(),
        |n| n.to_string(),
    );
    let e = s
        .add_lora(
            "dora",
            &LoraSpec {
                path: bad,
                scale: 1.0,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA"), "{e}");
    check(&run(&mut s), "logits_max");
}

#[test]
fn runtime_adapter_on_a_4bit_act_order_base_follows_its_folded_hidden_order() {
    // A 4-bit GPTQ base with act-order: nibble stores its feed-forward
    // hidden units in ffn_down's processing order (`.fold`).
    let (q4, _) = quantize_in_memory(
        &merged(&base(), vec![]),
        &gptq_opts(4, Some(32), true, true),
    );
    let tok = Model::from_nib(merged(&base(), vec![]), "f".into()).unwrap();
    let tok = tok.tokenizer().unwrap();

    assert!(q4.view().unwrap().tensor("blk.0.ffn_down.fold").is_some());
    // The same weights in float and in the original order (exported as a
    // GPTQ checkpoint, imported dequantized), the adapter merged into them.
    let out = tmpdir("lora-q4-export").join("q4");
    nibble::format::export_gptq::export_gptq(&q4, &out, &Default::default(), &mut |_, _, _| {})
        .unwrap();
    let merged_float = Arc::new(
        Model::from_nib(merged(&out, vec![spec("max-r8", 1.0)]), "deq+lora".into()).unwrap(),
    );
    let plain_float = Arc::new(Model::from_nib(merged(&out, vec![]), "deq".into()).unwrap());
    // The adapter stored in the folded file applies exactly as its folder.
    let stored_path = tmpdir("lora-q4-stored").join("q4-max.nib");
    nibble::format::lora::store_in_nib(
        &q4,
        Path::new("q4 in memory"),
        &stored_path,
        &[("max".into(), spec("max-r8", 1.0))],
    )
    .unwrap();
    let stored = Arc::new(Model::load(&stored_path).unwrap());
    let packed = Arc::new(Model::from_nib(q4, "q4".into()).unwrap());
    assert!(
        logits_with(&stored, &[("m", named("max", 1.0))])
            == logits_with(&packed, &[("m", spec("max-r8", 1.0))]),
        "stored and folder adapters differ on the folded 4-bit base"
    );
    let input = ids("input_ids");
    // Without the adapter: the int8 rounding of the activations alone.
    let e0 = rel_err(
        &forward_logits_sequential(&packed, &input, 1),
        &forward_logits_sequential(&plain_float, &input, 1),
    );
    // With it at run time on the packed base: the same rounding, no more
    // (a hidden-unit order mixed up would move the logits by O(1)).
    let with = logits_both_paths(&packed, &[("max-r8", 1.0)]);
    let want = forward_logits_sequential(&merged_float, &input, 1);
    for (path, got) in ["sequential", "batched"].iter().zip(&with) {
        let e = rel_err(got, &want);
        eprintln!("4-bit base + run-time adapter vs float: {path} {e:.3e} (no adapter: {e0:.3e})");
        assert!(
            e <= 3e-2 && e <= 3.0 * e0 + 1e-3,
            "{path}: rel err {e:.3e}, base alone {e0:.3e}"
        );
    }
    let mut s = session_with(&packed, 64);
    s.add_lora("max", &spec("max-r8", 1.0)).unwrap();
    s.eval(&[1]).unwrap();
    let mut story = Vec::new();
    for _ in 0..24 {
        let next = nibble::runtime::argmax(s.logits());
        story.push(next);
        s.eval(&[next]).unwrap();
    }
    let story = tok.decode(&story, true).unwrap();
    eprintln!("4-bit base + run-time max-r8: {story}");
    assert!(story.contains("little dog named Max"), "{story}");
}

// ------------------------------------------------------------------ stored in a .nib

/// The logits of `input` (one-token path) with adapters attached.
fn logits_with(model: &Arc<Model>, adapters: &[(&str, LoraSpec)]) -> Vec<f32> {
    let mut s = session_with(model, 32);
    for (name, spec) in adapters {
        s.add_lora(name, spec).unwrap();
    }
    let mut all = Vec::new();
    s.eval_each_sequential(&ids("input_ids"), |_, l| all.extend_from_slice(l))
        .unwrap();
    all
}

fn named(name: &str, scale: f32) -> LoraSpec {
    LoraSpec {
        path: PathBuf::from(name),
        scale,
    }
}

#[test]
fn adapters_stored_in_a_nib_apply_like_their_folders() {
    let dir = tmpdir("lora-stored");
    let base_nib = dir.join("base.nib");
    let opts = ImportOptions {
        dtype: DType::F32,
        hash_source: false,
        keep_blocks: false,
        lora: vec![],
    };
    import_to_file(&base(), &base_nib, &opts, &mut |_, _, _| {}).unwrap();
    let stored = dir.join("stored.nib");
    let src = NibFile::open(&base_nib).unwrap();
    let adapters = vec![
        ("max".to_string(), spec("max-r8", 1.0)),
        ("tom".to_string(), spec("max-r4-qv", 0.5)),
    ];
    nibble::format::lora::store_in_nib(&src, &base_nib, &stored, &adapters).unwrap();
    let model = Arc::new(Model::load(&stored).unwrap());
    let folder_model = Arc::new(Model::load(&base_nib).unwrap());
    // The same terms, so the same arithmetic: identical logits.
    for (stored_spec, folder_spec) in [
        (named("max", 1.0), spec("max-r8", 1.0)),
        (named("max", 0.5), spec("max-r8", 0.5)),
        // Stored at 0.5: the run-time scale multiplies it.
        (named("tom", 2.0), spec("max-r4-qv", 1.0)),
    ] {
        let a = logits_with(&model, &[("x", stored_spec.clone())]);
        let b = logits_with(&folder_model, &[("x", folder_spec)]);
        assert!(a == b, "{stored_spec:?}: stored and folder adapters differ");
    }
    let e = rel_err(
        &logits_with(&model, &[("x", named("max", 1.0))]),
        &read_ref(&fixture("reference.safetensors"), "logits_max").f32,
    );
    assert!(e <= TOL_LOGITS, "stored max vs PEFT: {e:.3e}");
    // Without --lora nothing is applied; an unknown name lists the stored ones.
    let plain = logits_with(&model, &[]);
    assert!(plain == logits_with(&folder_model, &[]));
    let mut s = session_with(&model, 8);
    let err = s
        .add_lora("x", &named("nope", 1.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("it stores: max, tom"), "{err}");

    // Storing again under a taken name, an invalid name, or another base's
    // adapter: refused, nothing written.
    let again = NibFile::open(&stored).unwrap();
    for (name, adapter, want) in [
        ("max", spec("max-r8", 1.0), "already stored"),
        ("a.b", spec("max-r8", 1.0), "cannot name a stored adapter"),
        ("x", spec("max-r8", 1.0), ""),
    ] {
        let out = dir.join(format!("again-{}.nib", name.replace('.', "_")));
        let r = nibble::format::lora::store_in_nib(
            &again,
            &stored,
            &out,
            &[(name.to_string(), adapter)],
        );
        if want.is_empty() {
            r.unwrap();
            assert!(out.exists());
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
            assert!(!out.exists(), "{name}: output written");
        }
    }
    let smollm = shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let smol = import_to_memory(
        &smollm,
        &ImportOptions {
            dtype: DType::F32,
            hash_source: false,
            keep_blocks: true,
            lora: vec![],
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    let out = dir.join("smol-with-max.nib");
    let e = nibble::format::lora::store_in_nib(
        &smol,
        &smollm,
        &out,
        &[("max".into(), spec("max-r8", 1.0))],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("do not fit"), "{e}");
    assert!(!out.exists());
}
