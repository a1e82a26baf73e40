//! Bad input anywhere gives a clear error naming the file and the problem:
//! broken configs, unsupported architectures, missing or mis-shaped tensors,
//! non-finite weights, context overflow, and mutated model files.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::shared;
use nibble::format::import::{import_to_memory, ImportOptions};
use nibble::format::{AlignedBytes, DType, MetadataBuilder, NibFile, NibWriter, OwnedValue};
use nibble::{Model, RuntimeError};

fn tmpdir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of stories260k's folder with config.json edited by `f`.
fn stories_with_config(name: &str, f: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = shared().join("models/stories260k");
    let d = tmpdir(name);
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(file), d.join(file)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    f(&mut cfg);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    d
}

fn load_err(p: &Path) -> String {
    match Model::load(p) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_config_key_is_named() {
    let d = stories_with_config("cfg-missing", |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let msg = load_err(&d);
    assert!(
        msg.contains("hidden_size") && msg.contains("cfg-missing"),
        "{msg}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let d = stories_with_config("cfg-arch", |c| c["model_type"] = "mamba".into());
    let msg = load_err(&d);
    assert!(msg.contains("unsupported architecture 'mamba'"), "{msg}");
    assert!(msg.contains("cfg-arch"), "{msg}");
}

/// SmolLM2's GGUF with one metadata string value replaced in place (same
/// length): `key`'s value `from` becomes `to`.
fn smollm2_gguf_with(name: &str, key: &str, from: &str, to: &str) -> PathBuf {
    assert_eq!(from.len(), to.len());
    let src = shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut bytes = std::fs::read(src).unwrap();
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    pat.extend_from_slice(&8u32.to_le_bytes());
    pat.extend_from_slice(&(from.len() as u64).to_le_bytes());
    pat.extend_from_slice(from.as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("key with that value");
    let v = at + pat.len() - from.len();
    bytes[v..v + to.len()].copy_from_slice(to.as_bytes());
    let p = tmpdir(name).join("model.gguf");
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A GGUF of an architecture nibble does not read is refused by name, with
/// the file named.
#[test]
fn unsupported_gguf_architecture_is_named() {
    let p = smollm2_gguf_with("gguf-arch", "general.architecture", "llama", "mamba");
    let msg = load_err(&p);
    assert!(msg.contains("unsupported architecture 'mamba'"), "{msg}");
    assert!(msg.contains("gguf-arch"), "{msg}");
}

/// A GGUF whose tokenizer model or pre-tokenizer nibble does not implement
/// is refused naming the key, the value and the file (not run with a wrong
/// tokenizer).
#[test]
fn unimplemented_gguf_tokenizers_are_named() {
    let p = smollm2_gguf_with("gguf-tok-model", "tokenizer.ggml.model", "gpt2", "bert");
    let msg = load_err(&p);
    assert!(
        msg.contains("tokenizer.ggml.model") && msg.contains("\"bert\" is not implemented"),
        "{msg}"
    );
    assert!(msg.contains("gguf-tok-model"), "{msg}");
    let p = smollm2_gguf_with("gguf-tok-pre", "tokenizer.ggml.pre", "smollm", "klingo");
    let msg = load_err(&p);
    assert!(
        msg.contains("tokenizer.ggml.pre") && msg.contains("\"klingo\""),
        "{msg}"
    );
}

/// A real GGUF cut short (its first 199 MB, as an interrupted download
/// leaves it) is an error naming the file; `convert` writes nothing.
#[test]
fn truncated_real_gguf_is_an_error_and_writes_nothing() {
    let src = common::real_model("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    let d = tmpdir("gguf-truncated");
    let cut = d.join("cut.gguf");
    {
        use std::io::{Read, Write};
        let mut f = std::fs::File::open(&src).unwrap();
        let mut buf = vec![0u8; 199 << 20];
        f.read_exact(&mut buf).unwrap();
        std::fs::File::create(&cut)
            .unwrap()
            .write_all(&buf)
            .unwrap();
    }
    let msg = load_err(&cut);
    assert!(msg.contains("cut.gguf"), "{msg}");
    assert!(
        msg.contains("truncat") || msg.contains("beyond") || msg.contains("end of"),
        "{msg}"
    );
    let out = d.join("out.nib");
    let e = nibble::format::import::import_to_file(
        &cut,
        &out,
        &ImportOptions {
            dtype: DType::F16,
            hash_source: true,
            keep_blocks: true,
            lora: Vec::new(),
        },
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("cut.gguf"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("cut.gguf")], "debris");
}

/// Settings that change the numbers and that nibble does not implement are
/// errors naming the setting and the file, never silently ignored.
#[test]
fn unimplemented_family_features_are_named() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 5] = [
        (
            "cfg-yarn",
            |c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "rope type 'yarn'",
        ),
        (
            "cfg-moe",
            |c| c["num_local_experts"] = 8.into(),
            "mixture-of-experts",
        ),
        (
            "cfg-layer-type",
            |c| {
                c["layer_types"] = serde_json::json!([
                    "full_attention",
                    "chunked_attention",
                    "full_attention",
                    "full_attention",
                    "full_attention"
                ])
            },
            "layer type 'chunked_attention'",
        ),
        (
            "cfg-act",
            |c| c["hidden_act"] = "relu2".into(),
            "activation 'relu2'",
        ),
        (
            "cfg-v5-rope",
            |c| {
                c.as_object_mut().unwrap().remove("rope_theta");
                c["rope_parameters"] =
                    serde_json::json!({"rope_type": "longrope", "rope_theta": 1e4});
            },
            "rope type 'longrope'",
        ),
    ];
    for (name, edit, want) in cases {
        let d = stories_with_config(name, edit);
        let msg = load_err(&d);
        assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
    }
}

/// A fused tensor of the wrong size is named, with the size config.json implies.
#[test]
fn fused_tensor_with_unexpected_shape_is_named() {
    let src = shared().join("fixtures/hf-reference/phi3");
    let d = tmpdir("phi3-shape");
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    cfg["num_key_value_heads"] = 4.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let msg = load_err(&d);
    assert!(
        msg.contains("qkv_proj") && msg.contains("[240, 80]") && msg.contains("phi3-shape"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_in_config_is_named() {
    let d = stories_with_config("cfg-shape", |c| c["intermediate_size"] = 200.into());
    let msg = load_err(&d);
    assert!(
        msg.contains("mlp.gate_proj") && msg.contains("200"),
        "{msg}"
    );
}

#[test]
fn inconsistent_heads_are_rejected() {
    let d = stories_with_config("cfg-heads", |c| c["num_key_value_heads"] = 3.into());
    let msg = load_err(&d);
    assert!(msg.contains("n_head_kv"), "{msg}");
}

#[test]
fn nan_weight_is_rejected_before_writing() {
    let d = tmpdir("nan-weights");
    let src = shared().join("fixtures/hf-reference/llama");
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec(), t.shape().to_vec()))
        .collect();
    let victim = owned
        .iter_mut()
        .find(|(n, _, _)| n == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    victim.1[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("model.safetensors")).unwrap();
    let msg = load_err(&d);
    assert!(
        msg.contains("non-finite") && msg.contains("blk.1.ffn_up"),
        "{msg}"
    );
}

/// stories260k as an in-memory .nib, rebuilt with `edit` applied to each tensor
/// (return None to drop it) and `meta` applied to the metadata.
fn rebuilt(
    edit: impl Fn(&str, &[u64]) -> Option<Vec<u64>>,
    meta: impl Fn(&mut MetadataBuilder),
) -> nibble::format::Result<NibFile> {
    let f = common::import_f32(&shared().join("models/stories260k"));
    let v = f.view().unwrap();
    let mut m = MetadataBuilder::from(&v.metadata);
    meta(&mut m);
    let mut w = NibWriter::new(AlignedBytes::new(), &m).unwrap();
    for t in &v.tensors {
        if let Some(shape) = edit(t.name, &t.shape) {
            let n: u64 = shape.iter().product();
            let mut data = t.data.to_vec();
            data.resize((n * 4) as usize, 0);
            w.add_tensor(t.name, t.dtype, &shape, &data).unwrap();
        }
    }
    NibFile::from_memory(w.finish().unwrap())
}

#[test]
fn missing_tensor_is_named() {
    let f = rebuilt(
        |n, s| (n != "blk.3.attn_v.weight").then(|| s.to_vec()),
        |_| {},
    )
    .unwrap();
    match Model::from_nib(f, "stories.nib".into()) {
        Err(RuntimeError::MissingTensor { model, name }) => {
            assert_eq!(
                (model.as_str(), name.as_str()),
                ("stories.nib", "blk.3.attn_v.weight")
            )
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn mis_shaped_tensor_is_named() {
    let f = rebuilt(
        |n, s| {
            Some(if n == "blk.0.ffn_up.weight" {
                vec![171, 64]
            } else {
                s.to_vec()
            })
        },
        |_| {},
    )
    .unwrap();
    let e = Model::from_nib(f, "m.nib".into())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("blk.0.ffn_up.weight") && e.contains("171"),
        "{e}"
    );
}

#[test]
fn missing_metadata_key_is_named() {
    let f = rebuilt(
        |_, s| Some(s.to_vec()),
        |m| {
            m.set("model.n_head", OwnedValue::Str("eight".into()));
        },
    )
    .unwrap();
    let e = Model::from_nib(f, "m.nib".into())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.n_head") && e.contains("m.nib"), "{e}");
}

/// A context beyond the model's is refused with the limit; one whose KV
/// cache cannot fit in the memory there is, too (a model that claims a
/// context of 2⁴⁰ tokens), before anything is allocated.
#[test]
fn contexts_beyond_the_model_or_the_machine_are_refused() {
    let model = Arc::new(Model::load(shared().join("models/stories260k")).unwrap());
    let params = |n_ctx| nibble::SessionParams {
        n_ctx,
        ..Default::default()
    };
    let e = nibble::Session::new(model, &params(100_000))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("exceeds the model's 512"), "{e}");
    let f = rebuilt(
        |_, s| Some(s.to_vec()),
        |m| {
            m.set("model.n_ctx_train", OwnedValue::U64(1 << 24));
        },
    )
    .unwrap();
    let huge = Arc::new(Model::from_nib(f, "huge.nib".into()).unwrap());
    let hp = &huge.hparams;
    let n_ctx = 1usize << 24;
    let f32_kv = nibble::SessionParams {
        n_ctx,
        kv: nibble::KvType::F32,
        ..Default::default()
    };
    let needed = 2 * 4 * (hp.n_layer * n_ctx * hp.n_head_kv * hp.head_dim) as u64;
    // Asserted where the machine has less memory available than that (it
    // would otherwise be a valid, if large, context).
    if nibble::runtime::cpu::available_memory().is_some_and(|m| m < needed) {
        let e = nibble::Session::new(huge, &f32_kv)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("of memory available"), "{e}");
    }
}

#[test]
fn context_overflow_and_bad_token_are_errors() {
    let model = Arc::new(Model::load(shared().join("models/stories260k")).unwrap());
    let mut s = common::session(&model, 8, 1);
    match s.eval(&[1; 9]) {
        Err(RuntimeError::ContextOverflow {
            needed: 9,
            n_ctx: 8,
        }) => {}
        other => panic!("{:?}", other.err()),
    }
    assert!(s.tokens().is_empty(), "a rejected batch evaluates nothing");
    match s.eval(&[1, 512]) {
        Err(RuntimeError::BadToken {
            id: 512,
            n_vocab: 512,
        }) => {}
        other => panic!("{:?}", other.err()),
    }
    s.eval(&[1; 8]).unwrap();
    assert!(matches!(
        s.eval(&[1]),
        Err(RuntimeError::ContextOverflow { .. })
    ));
}

#[test]
fn mutated_model_files_never_panic_the_loader_or_forward_pass() {
    // Mutate the header, metadata and directory of a real (tiny) model and
    // load + run whatever still validates.
    let f = import_to_memory(
        &shared().join("fixtures/hf-reference/llama_tied_hd8"),
        &ImportOptions {
            dtype: DType::F16,
            hash_source: false,
            keep_blocks: false,
            lora: Vec::new(),
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    let good = f.bytes().to_vec();
    let v = f.view().unwrap();
    let data_start = v.tensors.iter().map(|t| t.offset).min().unwrap() as usize;
    let data_end = v
        .tensors
        .iter()
        .map(|t| t.offset as usize + t.data.len())
        .max()
        .unwrap();
    drop(v);
    let mut rng = 0x1234_5678_9ABC_DEF1u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut loaded, mut rejected) = (0, 0);
    for _ in 0..3000 {
        let mut b = AlignedBytes::from_slice(&good);
        let mut bytes = b.as_slice().to_vec();
        for _ in 0..1 + next() % 3 {
            // Target the structural regions: header + metadata, or the directory.
            let i = if next() % 2 == 0 {
                (next() as usize) % data_start
            } else {
                data_end + (next() as usize) % (bytes.len() - data_end)
            };
            bytes[i] = match next() % 3 {
                0 => bytes[i] ^ (1 << (next() % 8)),
                1 => next() as u8,
                _ => 0xff,
            };
        }
        b = AlignedBytes::from_slice(&bytes);
        match NibFile::from_memory(b)
            .map_err(RuntimeError::from)
            .and_then(|f| Model::from_nib(f, "m".into()))
        {
            Ok(m) => {
                loaded += 1;
                let m = Arc::new(m);
                let mut s = common::session(&m, 4, 1);
                let _ = s.eval(&[5, 6]);
            }
            Err(e) => {
                rejected += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    eprintln!("runtime mutation test: {loaded} loaded and ran, {rejected} rejected");
    assert!(rejected > 1000);
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let src = shared().join("models/stories260k");
    let d = tmpdir("sharded");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &d.join(shard)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let ids = [1u32, 403, 407, 261, 378];
    let one = Arc::new(Model::load(&src).unwrap());
    let two = Arc::new(Model::load(&d).unwrap());
    assert_eq!(
        common::forward_logits(&one, &ids, 1),
        common::forward_logits(&two, &ids, 1)
    );

    // A shard that the index names but that is missing is an error naming it.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let msg = load_err(&d);
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}
