//! GPTQ checkpoints saved by the real GPTQModel library
//! (`../shared/fixtures/gptq-checkpoint`, four settings of stories260k):
//! imported losslessly into nibble's integer groups, their weights equal the
//! library's own dequantization bit for bit, the float model's logits and
//! greedy text equal the library's, and unreadable checkpoints are refused
//! with an error naming the file and the tensor or setting.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use nibble::format::gptq_checkpoint::{GptqLinear, GptqTensors};
use nibble::format::import::{import_to_memory, ImportOptions};
use nibble::format::{DType, NibFile};
use nibble::Model;

const FOLDERS: [&str; 4] = [
    "stories260k-gptq-4bit-g32",
    "stories260k-gptq-4bit-g32-noact",
    "stories260k-gptq-4bit-g32-v2",
    "stories260k-gptq-4bit-g32-asym",
];

/// Float activations against the library's float32 forward pass: what a
/// correct f32 implementation reaches (the fixture's README: ~1e-4).
const TOL_F32_LOGITS: f64 = 1e-4;
/// The packed weights with int8 activation blocks (the runtime's default):
/// the int8 rounding of the activations, measured at ≤ 1.5e-2 over the four
/// folders and both paths (docs/correctness.md lists the same effect on SmolLM2).
const TOL_INT8_LOGITS: f64 = 3e-2;

fn folder(name: &str) -> PathBuf {
    shared().join("fixtures/gptq-checkpoint").join(name)
}

fn import(dir: &Path, keep_blocks: bool) -> NibFile {
    import_to_memory(
        dir,
        &ImportOptions {
            dtype: DType::F32,
            hash_source: false,
            keep_blocks,
            lora: Vec::new(),
        },
        &mut |_, _, _| {},
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A weight of a `.nib` as f32 `[rows, cols]` in input order: packed rows
/// decoded by the format's reference decoder, its act-order permutation undone.
fn weight_f32(file: &NibFile, name: &str) -> (Vec<f32>, DType) {
    let view = file.view().unwrap();
    let t = view.tensor(name).unwrap_or_else(|| panic!("{name}"));
    let (rows, cols) = (t.shape[0] as usize, t.shape[1] as usize);
    if !t.dtype.is_quantized() {
        return (
            nibble::format::dtype::decode_f32(t.dtype, t.data).unwrap(),
            t.dtype,
        );
    }
    let perm: Option<Vec<usize>> = view.tensor(&name.replace(".weight", ".perm")).map(|p| {
        p.data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect()
    });
    let row_bytes = t.data.len() / rows;
    let mut out = vec![0f32; rows * cols];
    let mut dec = vec![0f32; cols];
    for r in 0..rows {
        nibble::format::quant::dequantize(
            t.dtype,
            t.quant_param as usize,
            &t.data[r * row_bytes..(r + 1) * row_bytes],
            &mut dec,
        );
        for (j, &v) in dec.iter().enumerate() {
            out[r * cols + perm.as_ref().map_or(j, |p| p[j])] = v;
        }
    }
    (out, t.dtype)
}

#[test]
fn imported_weights_are_the_librarys_dequantized_weights_bit_for_bit() {
    for f in FOLDERS {
        let dir = folder(f);
        let reference = dir.join("reference.safetensors");
        let packed = import(&dir, true);
        let float = import(&dir, false);
        for (canonical, hf) in [
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj"),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj"),
        ] {
            let want = read_ref(&reference, &format!("dequant_weights.{hf}")).f32;
            let (got, dtype) = weight_f32(&packed, canonical);
            assert_eq!(dtype, DType::Q4G, "{f} {canonical}");
            assert_eq!(got.len(), want.len());
            let bad = got
                .iter()
                .zip(&want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(
                bad, None,
                "{f} {canonical}: packed groups differ from the library"
            );
            let (got, dtype) = weight_f32(&float, canonical);
            assert_eq!(dtype, DType::F32);
            assert_eq!(got, want, "{f} {canonical}: --dtype f32 import");
        }
        // Act-order checkpoints carry permutations; the others need none.
        let view = packed.view().unwrap();
        let has_perm = view.tensor("blk.0.attn_q.perm").is_some();
        assert_eq!(has_perm, !f.ends_with("noact"), "{f}");
        // The float tensors keep the checkpoint's F16.
        assert_eq!(
            view.tensor("token_embd.weight").unwrap().dtype,
            DType::F16,
            "{f}"
        );
        let method = view.metadata.get("quant.method");
        assert!(
            matches!(method, Some(nibble::format::Value::Str("gptq-checkpoint"))),
            "{f}: {method:?}"
        );
    }
}

#[test]
fn v1_and_v2_checkpoints_import_to_identical_files() {
    let v1 = import(&folder(FOLDERS[0]), true);
    let v2 = import(&folder(FOLDERS[2]), true);
    let (a, b) = (v1.view().unwrap(), v2.view().unwrap());
    let mut n = 0;
    for t in &a.tensors {
        let u = b.tensor(t.name).unwrap();
        assert_eq!((t.dtype, &t.shape), (u.dtype, &u.shape), "{}", t.name);
        assert!(
            t.data == u.data,
            "{} differs between the v1 and v2 imports",
            t.name
        );
        n += 1;
    }
    assert_eq!(n, b.tensors.len());
}

/// Every fixture folder imported with its codes kept or dequantized: the
/// logits of both paths within `tol` of GPTQModel's, and its greedy tokens
/// (the reference's smallest top-1/top-2 gap over them is ≥ 0.19: the int8
/// rounding of the activations flips none).
fn check_against_gptqmodel(keep_blocks: bool, threads: usize, tol: f64) {
    for f in FOLDERS {
        let dir = folder(f);
        let reference = dir.join("reference.safetensors");
        let ids = ref_ids(&reference, "input_ids");
        let want = read_ref(&reference, "logits").f32;
        let model = Arc::new(Model::from_nib(import(&dir, keep_blocks), f.into()).unwrap());
        for (path, got) in [
            ("batched", forward_logits_batched(&model, &ids, threads, 7)),
            (
                "sequential",
                forward_logits_sequential(&model, &ids, threads),
            ),
        ] {
            let e = rel_err(&got, &want);
            eprintln!("{f} {path} (codes kept: {keep_blocks}): logits rel err {e:.3e}");
            assert!(e <= tol, "{f} {path}: logits rel err {e:.3e} > {tol:e}");
        }
        let want_greedy = ref_ids(&reference, "greedy_ids");
        let got = greedy_from_bos(&model, want_greedy.len());
        assert_eq!(got, want_greedy, "{f}: greedy ids");
    }
}

#[test]
fn float_logits_and_greedy_text_equal_gptqmodels() {
    check_against_gptqmodel(false, 1, TOL_F32_LOGITS);
}

#[test]
fn packed_checkpoint_runs_with_int8_activations_and_tells_the_same_story() {
    check_against_gptqmodel(true, 2, TOL_INT8_LOGITS);
}

// ------------------------------------------------------------------ edited copies

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the main checkpoint with its config's `quantization_config`
/// edited by `edit_config` and its tensors by `edit_tensors`.
fn edited_checkpoint(
    name: &str,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Tensors),
) -> PathBuf {
    let src = folder(FOLDERS[0]);
    let d = tmpdir(name);
    std::fs::copy(src.join("tokenizer.json"), d.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut cfg["quantization_config"]);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit_tensors(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("model.safetensors")).unwrap();
    d
}

/// The error of importing `d` with its codes kept (`keep_blocks`) or
/// dequantized; it must name the folder.
fn import_error_with(d: &Path, keep_blocks: bool) -> String {
    let r = import_to_memory(
        d,
        &ImportOptions {
            dtype: DType::F32,
            hash_source: false,
            keep_blocks,
            lora: Vec::new(),
        },
        &mut |_, _, _| {},
    );
    let msg = r.err().map(|e| e.to_string());
    let msg = msg.unwrap_or_else(|| panic!("{} imported (keep_blocks {keep_blocks})", d.display()));
    assert!(
        msg.contains(&d.display().to_string()),
        "no file named: {msg}"
    );
    msg
}

/// Refused both ways: nothing in the checkpoint can be read exactly.
fn import_error(d: &Path) -> String {
    let dequantizing = import_error_with(d, false);
    let packed = import_error_with(d, true);
    assert_eq!(packed, dequantizing);
    packed
}

type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Layer `stem` of `t` unpacked (4-bit g32 v1, as the main fixture).
fn unpack_layer(t: &Tensors, stem: &str) -> GptqLinear {
    let get = |s: &str| t.iter().find(|e| e.0 == format!("{stem}.{s}")).unwrap();
    let u64s = |v: &[usize]| v.iter().map(|&d| d as u64).collect::<Vec<u64>>();
    let (qw, qz, sc, gi) = (get("qweight"), get("qzeros"), get("scales"), get("g_idx"));
    let scales: Vec<f32> =
        sc.3.chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
    let g_idx: Vec<i64> =
        gi.3.chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap())))
            .collect();
    let tensors = GptqTensors {
        name: stem,
        qweight: (&qw.3, u64s(&qw.2)),
        qzeros: (&qz.3, u64s(&qz.2)),
        scales: (scales, DType::F16, u64s(&sc.2)),
        g_idx: Some((g_idx, u64s(&gi.2))),
    };
    GptqLinear::unpack(&tensors, qw.2[1], gi.2[0], 4, Some(32), true).unwrap()
}

/// Replace layer `stem`'s GPTQ tensors by `lin` packed as v1.
fn replace_layer(t: &mut Tensors, stem: &str, lin: &GptqLinear) {
    t.retain(|e| !e.0.starts_with(&format!("{stem}.")));
    let (qweight, qzeros, scales, g_idx) = lin.pack(true);
    let n_groups = lin.scales.len() / lin.rows;
    use safetensors::Dtype as S;
    t.push((
        format!("{stem}.qweight"),
        S::I32,
        vec![qweight.len() / 4 / lin.rows, lin.rows],
        qweight,
    ));
    t.push((
        format!("{stem}.qzeros"),
        S::I32,
        vec![n_groups, qzeros.len() / 4 / n_groups],
        qzeros,
    ));
    t.push((
        format!("{stem}.scales"),
        S::F16,
        vec![n_groups, lin.rows],
        scales,
    ));
    t.push((format!("{stem}.g_idx"), S::I32, vec![lin.cols], g_idx));
}

#[test]
fn dynamic_overrides_give_modules_other_bits_or_leave_them_in_float() {
    // Layer 1's q_proj re-stored as 8-bit codes (code + 120, zero + 120: the
    // same weights) under a `dynamic` bits override, and layer 2's down_proj
    // as a float weight under a `-:` rule: the model must compute exactly
    // what the original checkpoint computes.
    let q8 = "model.layers.1.self_attn.q_proj";
    let down = "model.layers.2.mlp.down_proj";
    let d = edited_checkpoint(
        "gptq-dynamic",
        |q| {
            q["dynamic"] = serde_json::json!({
                format!("+:{}", q8.replace('.', "\\.")): { "bits": 8 },
                format!("-:{}", down.replace('.', "\\.")): {},
            });
        },
        |t| {
            let mut lin = unpack_layer(t, q8);
            lin.bits = 8;
            lin.codes.iter_mut().for_each(|c| *c += 120);
            lin.zeros.iter_mut().for_each(|z| *z += 120);
            replace_layer(t, q8, &lin);
            let w = unpack_layer(t, down).dequantize();
            t.retain(|e| !e.0.starts_with(&format!("{down}.")));
            let bytes = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            t.push((
                format!("{down}.weight"),
                safetensors::Dtype::F32,
                vec![64, 172],
                bytes,
            ));
        },
    );
    let packed = import(&d, true);
    let view = packed.view().unwrap();
    assert_eq!(
        view.tensor("blk.1.attn_q.weight").unwrap().dtype,
        DType::Q8G
    );
    assert_eq!(
        view.tensor("blk.1.attn_k.weight").unwrap().dtype,
        DType::Q4G
    );
    assert_eq!(
        view.tensor("blk.2.ffn_down.weight").unwrap().dtype,
        DType::F32
    );
    let original = import(&folder(FOLDERS[0]), true);
    for name in ["blk.1.attn_q.weight", "blk.2.ffn_down.weight"] {
        assert_eq!(
            weight_f32(&packed, name).0,
            weight_f32(&original, name).0,
            "{name}"
        );
    }
    let ids = ref_ids(
        &folder(FOLDERS[0]).join("reference.safetensors"),
        "input_ids",
    );
    let a = Arc::new(Model::from_nib(import(&d, false), "edited".into()).unwrap());
    let b =
        Arc::new(Model::from_nib(import(&folder(FOLDERS[0]), false), "original".into()).unwrap());
    assert_eq!(
        forward_logits_sequential(&a, &ids, 1),
        forward_logits_sequential(&b, &ids, 1)
    );
}

#[test]
fn unsupported_quantization_configs_are_refused_by_name() {
    type EditConfig<'a> = &'a dyn Fn(&mut serde_json::Value);
    let cases: [(&str, EditConfig, &str); 7] = [
        (
            "gptq-awq",
            &|q| q["quant_method"] = "awq".into(),
            "quant_method 'awq'",
        ),
        (
            "gptq-bnb",
            &|q| q["quant_method"] = "bitsandbytes".into(),
            "quant_method 'bitsandbytes'",
        ),
        (
            "gptq-marlin",
            &|q| q["checkpoint_format"] = "marlin".into(),
            "checkpoint_format 'marlin'",
        ),
        ("gptq-bits5", &|q| q["bits"] = 5.into(), "bits = 5"),
        (
            "gptq-gs16",
            &|q| q["group_size"] = 16.into(),
            "group_size = 16",
        ),
        (
            "gptq-int16",
            &|q| q["pack_dtype"] = "int16".into(),
            "pack_dtype 'int16'",
        ),
        (
            "gptq-dynamic-skip",
            &|q| {
                q["dynamic"] = serde_json::json!({ "-:model\\.layers\\.1\\..*": {} });
            },
            "model.layers.1.self_attn.q_proj.qweight",
        ),
    ];
    for (name, edit, want) in cases {
        let d = edited_checkpoint(name, edit, |_| {});
        let msg = import_error(&d);
        assert!(msg.contains(want), "{name}: {msg}");
    }
}

#[test]
fn shapes_that_disagree_with_bits_or_group_size_name_the_tensor() {
    // bits 8 in the config: qweight [8, 64] is a 4-bit layout.
    let d = edited_checkpoint("gptq-bits8", |q| q["bits"] = 8.into(), |_| {});
    let msg = import_error(&d);
    assert!(
        msg.contains("model.layers.0.self_attn.q_proj.qweight") && msg.contains("[16, 64]"),
        "{msg}"
    );
    // group_size 64: a 64-input layer then has one group, but its files
    // hold two (groups of 32).
    let d = edited_checkpoint("gptq-gs64", |q| q["group_size"] = 64.into(), |_| {});
    let msg = import_error(&d);
    assert!(
        msg.contains(".qzeros") && msg.contains("groups of 64"),
        "{msg}"
    );
    // A truncated qweight.
    let d = edited_checkpoint(
        "gptq-short",
        |_| {},
        |t| {
            let e = t
                .iter_mut()
                .find(|e| e.0 == "model.layers.2.mlp.up_proj.qweight")
                .unwrap();
            e.2[0] -= 1;
            let n = e.2.iter().product::<usize>() * 4;
            e.3.truncate(n);
        },
    );
    let msg = import_error(&d);
    assert!(msg.contains("model.layers.2.mlp.up_proj.qweight"), "{msg}");
}

#[test]
fn invalid_g_idx_and_missing_tensors_are_named() {
    let set_g_idx = |name: &'static str, f: fn(&mut [i32])| {
        move |t: &mut Tensors| {
            let e = t.iter_mut().find(|e| e.0 == name).unwrap();
            let mut v: Vec<i32> =
                e.3.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
            f(&mut v);
            e.3 = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
    };
    // Two inputs moved into one group: group sizes no longer add up.
    let d = edited_checkpoint(
        "gptq-gidx-count",
        |_| {},
        set_g_idx("model.layers.1.self_attn.k_proj.g_idx", |v| {
            let g = v[0];
            let other = v.iter().position(|&x| x != g).unwrap();
            v[other] = g;
        }),
    );
    // Such a layer still dequantizes exactly (`--dtype f32`), but nibble's
    // groups are contiguous and equal, so keeping its codes is refused.
    let msg = import_error_with(&d, true);
    assert!(
        msg.contains("model.layers.1.self_attn.k_proj.g_idx")
            && msg.contains("not a valid group assignment"),
        "{msg}"
    );
    // A group index outside `scales`.
    let d = edited_checkpoint(
        "gptq-gidx-range",
        |_| {},
        set_g_idx("model.layers.3.mlp.down_proj.g_idx", |v| v[5] = 99),
    );
    let msg = import_error(&d);
    assert!(
        msg.contains("model.layers.3.mlp.down_proj.g_idx") && msg.contains("group 99"),
        "{msg}"
    );
    // qzeros missing.
    let d = edited_checkpoint(
        "gptq-no-qzeros",
        |_| {},
        |t| t.retain(|e| e.0 != "model.layers.4.self_attn.o_proj.qzeros"),
    );
    let msg = import_error(&d);
    assert!(
        msg.contains("model.layers.4.self_attn.o_proj.qzeros"),
        "{msg}"
    );
}

// ------------------------------------------------------------------ export

use nibble::format::export_gptq::{export_gptq, CheckpointFormat, ExportOptions};

fn export(file: &NibFile, dir: &Path, opts: &ExportOptions) -> nibble::format::Result<()> {
    export_gptq(file, dir, opts, &mut |_, _, _| {}).map(|_| ())
}

/// The tensors of a safetensors file: name → (dtype, shape, bytes).
fn safetensors_of(
    path: &Path,
) -> std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

#[test]
fn re_exporting_gptqmodels_checkpoints_reproduces_their_tensors_byte_for_byte() {
    for f in FOLDERS {
        let dir = folder(f);
        let out = tmpdir(&format!("reexport-{f}")).join("out");
        // The fixtures' own formats (the asymmetric one is v1).
        let checkpoint_format = if f.ends_with("v2") {
            CheckpointFormat::GptqV2
        } else {
            CheckpointFormat::Gptq
        };
        let opts = ExportOptions {
            checkpoint_format,
            ..Default::default()
        };
        export(&import(&dir, true), &out, &opts).unwrap();
        let want = safetensors_of(&dir.join("model.safetensors"));
        let got = safetensors_of(&out.join("model.safetensors"));
        assert_eq!(got.len(), want.len(), "{f}");
        for (name, w) in &want {
            assert!(
                got.get(name) == Some(w),
                "{f}: {name} differs from GPTQModel's"
            );
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let q = &cfg["quantization_config"];
        let src: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        for k in [
            "bits",
            "group_size",
            "sym",
            "checkpoint_format",
            "quant_method",
            "lm_head",
        ] {
            assert_eq!(
                q[k], src["quantization_config"][k],
                "{f}: quantization_config.{k}"
            );
        }
        // desc_act says whether g_idx is a permutation (noact's GAR order is not).
        assert_eq!(
            q["desc_act"],
            serde_json::json!(!f.ends_with("noact")),
            "{f}"
        );
        for k in [
            "model_type",
            "hidden_size",
            "num_key_value_heads",
            "head_dim",
            "tie_word_embeddings",
        ] {
            assert_eq!(cfg[k], src[k], "{f}: {k}");
        }
    }
}

fn quantize_stories(opts: &nibble::quantizer::QuantizeOptions) -> NibFile {
    quantize_in_memory(
        &common::import_f32(&shared().join("models/stories260k")),
        opts,
    )
    .0
}

fn gptq(
    bits: u32,
    group_size: Option<usize>,
    act_order: bool,
    sym: bool,
) -> nibble::quantizer::QuantizeOptions {
    nibble::quantizer::QuantizeOptions {
        sym,
        ..gptq_opts(bits, group_size, act_order, true)
    }
}

/// A packed weight of a `.nib` as a GPTQ layer (codes, scales, zeros and
/// groups per input) in the model's original order, whatever its stored
/// column order or folded hidden-unit order (`blk.N.ffn_down.fold`).
fn as_gptq(file: &NibFile, name: &str) -> GptqLinear {
    let view = file.view().unwrap();
    let t = view.tensor(name).unwrap();
    let u32s = |n: &str| -> Option<Vec<u32>> {
        view.tensor(n).map(|p| {
            p.data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
    };
    let stem = name.trim_end_matches(".weight");
    let perm = u32s(&format!("{stem}.perm")).or_else(|| u32s(&format!("{stem}.fold")));
    let lin = GptqLinear::from_groups(
        name,
        t.dtype,
        t.quant_param as usize,
        (t.shape[0] as usize, t.shape[1] as usize),
        t.data,
        perm.as_deref(),
    )
    .unwrap();
    let layer = stem.split('.').nth(1).unwrap_or("");
    match u32s(&format!("blk.{layer}.ffn_down.fold")) {
        Some(fold) if stem.ends_with("ffn_gate") || stem.ends_with("ffn_up") => {
            lin.select_rows(&nibble::format::export_gptq::inverse_permutation(&fold).unwrap())
        }
        _ => lin,
    }
}

#[test]
fn quantize_export_import_round_trips_codes_scales_zeros_and_logits() {
    // 4-bit g32 asym act-order (the groups are the activation blocks, so
    // even the int8 path is bit-identical), 8-bit per row without act-order,
    // 2-bit g64 sym act-order (last group of 44 columns).
    for (bits, gs, act, sym) in [
        (4, Some(32), true, false),
        (8, None, false, false),
        (2, Some(64), true, true),
    ] {
        let what = format!("{bits}-bit gs {gs:?} act-order {act} sym {sym}");
        let nib = quantize_stories(&gptq(bits, gs, act, sym));
        let out = tmpdir(&format!("roundtrip-{bits}-{act}")).join("gptq");
        export(&nib, &out, &ExportOptions::default()).unwrap();
        let back = import(&out, true);
        let (a, b) = (nib.view().unwrap(), back.view().unwrap());
        let mut packed = 0;
        for t in &a.tensors {
            if t.name.ends_with(".perm") || t.name.ends_with(".fold") {
                continue;
            }
            let u = b
                .tensor(t.name)
                .unwrap_or_else(|| panic!("{what}: {} lost", t.name));
            assert_eq!(
                (t.dtype, t.quant_param, &t.shape),
                (u.dtype, u.quant_param, &u.shape),
                "{what}: {}",
                t.name
            );
            if t.dtype.is_quantized() {
                let same = as_gptq(&nib, t.name) == as_gptq(&back, t.name);
                assert!(same, "{what}: {} differs after the round trip", t.name);
                packed += 1;
            } else {
                let (x, y) = (
                    nibble::format::dtype::decode_f32(t.dtype, t.data).unwrap(),
                    nibble::format::dtype::decode_f32(u.dtype, u.data).unwrap(),
                );
                assert_eq!(x, y, "{what}: {}", t.name);
            }
        }
        assert_eq!(packed, 35, "{what}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let q = &cfg["quantization_config"];
        let want_gs = gs.map_or(-1, |g| g as i64);
        assert_eq!(
            (q["bits"].as_u64(), q["group_size"].as_i64()),
            (Some(u64::from(bits)), Some(want_gs)),
            "{what}"
        );
        assert_eq!(
            (q["desc_act"].as_bool(), q["sym"].as_bool()),
            (Some(act), Some(sym)),
            "{what}"
        );
        assert_eq!(
            q["meta"]["true_sequential"],
            serde_json::json!(true),
            "{what}"
        );
        // Equal codes, scales and zeros per weight make the dequantized
        // models equal; the packed int8 path gives identical logits where the
        // stored column order is the same (no act-order) or does not matter
        // (groups of 32 are the activation blocks); with larger act-order
        // groups the import stores a group's columns in input order, so the
        // activation blocks differ: within the int8 tolerance.
        let ids = ref_ids(
            &folder(FOLDERS[0]).join("reference.safetensors"),
            "input_ids",
        );
        let m_nib = Arc::new(Model::from_nib(nib, "nib".into()).unwrap());
        let m_back = Arc::new(Model::from_nib(back, "back".into()).unwrap());
        let (la, lb) = (
            forward_logits_sequential(&m_nib, &ids, 1),
            forward_logits_sequential(&m_back, &ids, 1),
        );
        if gs == Some(32) || !act {
            let e = rel_err(&lb, &la);
            assert!(la == lb, "{what}: packed logits differ (rel err {e:.3e})");
        } else {
            let e = rel_err(&lb, &la);
            assert!(
                e <= TOL_INT8_LOGITS,
                "{what}: packed logits rel err {e:.3e}"
            );
        }
    }
}

#[test]
fn exports_the_gptq_layout_cannot_say_are_refused_and_leave_nothing() {
    let rtn = |bits| {
        let src = common::import_f32(&shared().join("models/stories260k"));
        let (buf, _, _) = nibble::quantizer::quantize_model(
            &src.view().unwrap(),
            &nibble::quantizer::QuantizeOptions::rtn(bits, Some(32), false),
            None,
            nibble::format::AlignedBytes::new(),
            &mut |_, _, _| {},
        )
        .unwrap();
        NibFile::from_memory(buf).unwrap()
    };
    let gguf = shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let cases: [(&str, NibFile, &str); 3] = [
        (
            "export-3bit",
            rtn(3),
            "3-bit: GPTQ packs 3-bit codes 32 to 3 words",
        ),
        (
            "export-float",
            common::import_f32(&shared().join("models/stories260k")),
            "no linear weight is quantized",
        ),
        (
            "export-q4gm",
            import(&gguf, true),
            "'blk.0.attn_q.weight' is Q4GM",
        ),
    ];
    for (name, file, want) in cases {
        let parent = tmpdir(name);
        let out = parent.join("out");
        let e = export(&file, &out, &ExportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
        let left: Vec<_> = std::fs::read_dir(&parent).unwrap().collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
    }
    // An existing folder with files is not touched.
    let parent = tmpdir("export-exists");
    let out = parent.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = export(&rtn(4), &out, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already exists") && e.contains(&out.display().to_string()),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn sharded_export_loads_back_identically() {
    let file = import(&folder(FOLDERS[0]), true);
    let out = tmpdir("export-shards").join("out");
    let opts = ExportOptions {
        max_shard_bytes: 40_000,
        ..Default::default()
    };
    export(&file, &out, &opts).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() >= 5, "{shards:?}");
    assert!(!out.join("model.safetensors").exists());
    let back = import(&out, true);
    let (a, b) = (file.view().unwrap(), back.view().unwrap());
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &a.tensors {
        assert!(b.tensor(t.name).unwrap().data == t.data, "{}", t.name);
    }
}
