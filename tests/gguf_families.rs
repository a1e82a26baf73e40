//! GGUF input of the families whose llama.cpp layout differs from nibble's
//! canonical one, checked against transformers: each tiny Hugging Face
//! fixture is written as a GGUF the way llama.cpp's converter lays it out
//! (fused `attn_qkv` rows q | k | v with GPT-NeoX's per-head rows already
//! regrouped, Phi-3's `ffn_up` holding gate | up, GPT-2's `position_embd`,
//! llama's q/k rows in the interleaved RoPE order, its `{arch}.*` keys),
//! then imported by nibble and compared with the fixture's transformers
//! logits through the one reference helper. The real files of the
//! llama, qwen2 and gemma3 tables are checked in `tests/gguf_reference.rs`.

mod common;

use std::path::Path;

use common::*;
use nibble::format::{HParams, NibView};
use nibble::quantizer::model::tensor_f32;

enum Kv {
    U(u32),
    F(f32),
    B(bool),
    S(String),
}

/// A GGUF v3 file of F32 tensors (`shape` row-major, outermost first),
/// through the format crate's writer.
fn write_gguf(path: &Path, kv: &[(String, Kv)], tensors: &[(String, Vec<u64>, Vec<f32>)]) {
    use nibble::format::gguf_write::{write_gguf, GgufTensor, GgufValue};
    let kv: Vec<(String, GgufValue)> = kv
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Kv::U(x) => GgufValue::U32(*x),
                Kv::F(x) => GgufValue::F32(*x),
                Kv::B(x) => GgufValue::Bool(*x),
                Kv::S(x) => GgufValue::Str(x.clone()),
            };
            (k.clone(), v)
        })
        .collect();
    let tensors: Vec<GgufTensor> = tensors
        .iter()
        .map(|(name, shape, data)| GgufTensor::f32(name, shape, data))
        .collect();
    let mut out = Vec::new();
    write_gguf(&mut out, &kv, &tensors).unwrap();
    std::fs::write(path, out).unwrap();
}

/// llama.cpp's q/k row order for its llama family: HF row `h·d + j·d/2 + i`
/// is stored at row `h·d + 2i + j`.
fn permute_rotary(w: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    let half = head_dim / 2;
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + j * half + i) * cols;
                let dst = (h * head_dim + 2 * i + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// The fixture `family` written as llama.cpp's converter would for GGUF
/// architecture `arch`.
fn fixture_as_gguf(family: &str, arch: &str, dir: &Path) -> std::path::PathBuf {
    let src = import_f32(&shared().join("fixtures/hf-reference").join(family));
    let v: NibView<'_> = src.view().unwrap();
    let hp = HParams::read(&v.metadata).unwrap();
    let get = |n: &str| {
        v.tensor(n)
            .map(|t| (t.shape.clone(), tensor_f32(t).unwrap()))
    };
    let mut tensors: Vec<(String, Vec<u64>, Vec<f32>)> = vec![];
    let fused_qkv = matches!(arch, "phi3" | "gpt2" | "gptneox");
    for t in &v.tensors {
        let (shape, mut data) = (t.shape.clone(), tensor_f32(t).unwrap());
        let name = t.name.to_string();
        let (stem, kind) = name.rsplit_once('.').unwrap();
        if fused_qkv
            && (stem.ends_with(".attn_q") || stem.ends_with(".attn_k") || stem.ends_with(".attn_v"))
        {
            if stem.ends_with(".attn_q") {
                let base = stem.trim_end_matches(".attn_q");
                let (sq, q) = get(&name).unwrap();
                let (sk, k) = get(&format!("{base}.attn_k.{kind}")).unwrap();
                let (_, vv) = get(&format!("{base}.attn_v.{kind}")).unwrap();
                let mut shape = sq.clone();
                shape[0] = sq[0] + 2 * sk[0];
                tensors.push((
                    format!("{base}.attn_qkv.{kind}"),
                    shape,
                    [q, k, vv].concat(),
                ));
            }
            continue;
        }
        if arch == "phi3" && (stem.ends_with(".ffn_gate") || stem.ends_with(".ffn_up")) {
            if stem.ends_with(".ffn_gate") {
                let base = stem.trim_end_matches(".ffn_gate");
                let (sg, g) = get(&name).unwrap();
                let (_, u) = get(&format!("{base}.ffn_up.{kind}")).unwrap();
                let mut shape = sg.clone();
                shape[0] *= 2;
                tensors.push((format!("{base}.ffn_up.{kind}"), shape, [g, u].concat()));
            }
            continue;
        }
        if arch == "llama"
            && kind == "weight"
            && (stem.ends_with(".attn_q") || stem.ends_with(".attn_k"))
        {
            let heads = if stem.ends_with(".attn_q") {
                hp.n_head
            } else {
                hp.n_head_kv
            };
            data = permute_rotary(&data, heads, hp.head_dim, shape[1] as usize);
        }
        let name = if name == "pos_embd.weight" {
            "position_embd.weight".to_string()
        } else {
            name
        };
        tensors.push((name, shape, data));
    }
    let a = |k: &str| format!("{arch}.{k}");
    let mut kv = vec![
        ("general.architecture".to_string(), Kv::S(arch.into())),
        (a("embedding_length"), Kv::U(hp.n_embd as u32)),
        (a("block_count"), Kv::U(hp.n_layer as u32)),
        (a("attention.head_count"), Kv::U(hp.n_head as u32)),
        (a("attention.head_count_kv"), Kv::U(hp.n_head_kv as u32)),
        (a("attention.key_length"), Kv::U(hp.head_dim as u32)),
        (a("feed_forward_length"), Kv::U(hp.n_ff as u32)),
        (a("context_length"), Kv::U(hp.n_ctx_train as u32)),
        (a("rope.freq_base"), Kv::F(hp.rope_theta as f32)),
        (a("rope.dimension_count"), Kv::U(hp.desc.rope_dim as u32)),
    ];
    let eps = match hp.desc.norm {
        nibble::format::arch::NormKind::Rms => "attention.layer_norm_rms_epsilon",
        nibble::format::arch::NormKind::Layer => "attention.layer_norm_epsilon",
    };
    kv.push((a(eps), Kv::F(hp.norm_eps as f32)));
    if arch == "gptneox" {
        kv.push((a("use_parallel_residual"), Kv::B(hp.desc.parallel_residual)));
    }
    let p = dir.join(format!("{family}.gguf"));
    write_gguf(&p, &kv, &tensors);
    p
}

fn check(family: &str, arch: &str) {
    let dir = tmp_dir(&format!("gguf-{family}"));
    let gguf = fixture_as_gguf(family, arch, &dir);
    let reference = shared()
        .join("fixtures/hf-reference")
        .join(family)
        .join("reference.safetensors");
    check_hf_reference(&gguf, &reference, 1e-4);
}

fn tmp_dir(name: &str) -> std::path::PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn phi3_from_gguf_matches_transformers() {
    check("phi3", "phi3");
}

#[test]
fn gpt2_from_gguf_matches_transformers() {
    check("gpt2", "gpt2");
}

#[test]
fn gpt_neox_from_gguf_matches_transformers() {
    check("gpt_neox", "gptneox");
}

#[test]
fn llama_from_gguf_matches_transformers() {
    check("llama", "llama");
}

#[test]
fn qwen3_from_gguf_matches_transformers() {
    check("qwen3", "qwen3");
}
