//! Quantized models written as GGUF files (`nibble quantize --gguf TYPE`):
//! SmolLM2-135M (llama family: its q/k rows go back to llama.cpp's rotary
//! order) quantized by nibble, written as Q4_0 / Q4_1 / Q5_0 / Q8_0 blocks
//! and as K-quant mixes with the source GGUF's metadata, then imported
//! again: every block reads back as the weights nibble quantized. That
//! llama.cpp loads and runs these files is checked by
//! `scripts/bench-gptq-vs-imatrix.sh` (it needs a llama.cpp build).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use nibble::format::export_gguf::{export_gguf, file_type, FloatMatrices};
use nibble::format::gguf::{GgmlType, GgufFile};
use nibble::format::import::{import_to_memory, ImportOptions};
use nibble::format::{AlignedBytes, DType, NibFile};
use nibble::quantizer::{quantize_model, QuantizeOptions};

fn smollm2() -> PathBuf {
    shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-gguf-output-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// `q` written as a GGUF at `out` with `source`'s metadata.
fn write(q: &NibFile, source: &Path, ftype: u32, out: &Path) {
    let bytes = std::fs::read(source).unwrap();
    let g = GgufFile::parse(&bytes).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    export_gguf(&q.view().unwrap(), &g, ftype, FloatMatrices::Q8_0, &mut f).unwrap();
}

fn import_blocks(path: &Path) -> NibFile {
    import_to_memory(
        path,
        &ImportOptions {
            dtype: DType::F32,
            hash_source: false,
            keep_blocks: true,
            lora: Vec::new(),
        },
        &mut |_, _, _| {},
    )
    .unwrap()
}

/// RTN of `src` with `opts` (two threads), in memory.
fn quantize_rtn(src: &NibFile, opts: QuantizeOptions) -> NibFile {
    let (buf, _, _) = quantize_model(
        &src.view().unwrap(),
        &QuantizeOptions { threads: 2, ..opts },
        None,
        AlignedBytes::new(),
        &mut |_, _, _| {},
    )
    .unwrap();
    NibFile::from_memory(buf).unwrap()
}

/// The model read back from a written GGUF runs: a prompt gives finite logits.
fn assert_runs(back: NibFile, what: &str) {
    let model = std::sync::Arc::new(nibble::runtime::Model::from_nib(back, what.into()).unwrap());
    let ids = model
        .tokenizer()
        .unwrap()
        .encode("The capital of France is", true)
        .unwrap();
    let logits = forward_logits(&model, &ids, 2);
    assert!(logits.iter().all(|v| v.is_finite()), "{what}");
}

/// Every packed tensor of `a` decodes to the same weights in `b`, within
/// `tol` × the row's largest magnitude.
fn same_weights(a: &NibFile, b: &NibFile, tol: f32, what: &str) -> usize {
    let (va, vb) = (a.view().unwrap(), b.view().unwrap());
    let mut n = 0;
    for t in va.tensors.iter().filter(|t| t.dtype.is_quantized()) {
        let u = vb
            .tensor(t.name)
            .unwrap_or_else(|| panic!("{what}: {} missing", t.name));
        assert_eq!(u.shape, t.shape, "{what}: {}", t.name);
        let (rows, cols) = (t.shape[0] as usize, t.shape[1] as usize);
        let (ra, rb) = (t.data.len() / rows, u.data.len() / rows);
        let (mut x, mut y) = (vec![0f32; cols], vec![0f32; cols]);
        for r in 0..rows {
            nibble::format::quant::dequantize(
                t.dtype,
                t.quant_param as usize,
                &t.data[r * ra..(r + 1) * ra],
                &mut x,
            );
            nibble::format::quant::dequantize(
                u.dtype,
                u.quant_param as usize,
                &u.data[r * rb..(r + 1) * rb],
                &mut y,
            );
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= tol * amax,
                "{what}: {} row {r}: {worst} > {tol}·{amax}",
                t.name
            );
        }
        n += 1;
    }
    n
}

/// RTN at each GGUF grid, written and read back: the linear layers are
/// exactly nibble's (an integer zero point as Q4_1 within its f16 minimum),
/// the head is llama.cpp's Q8_0, norms stay F32, and the metadata (tokenizer
/// included) is the source's with the new file type. The free-minimum grid
/// on this Q4_1 source gives the source's own blocks back.
#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "slow under qemu; target-independent"
)]
fn gguf_blocks_read_back_as_quantized() {
    let src_path = smollm2();
    let src = import_f32(&src_path);
    let src_bytes = std::fs::read(&src_path).unwrap();
    let source = GgufFile::parse(&src_bytes).unwrap();
    let source_blocks = import_blocks(&src_path);
    for (bits, sym, free_min, ftype, ty, tol) in [
        (4, true, false, file_type::MOSTLY_Q4_0, GgmlType::Q4_0, 0.0),
        (
            4,
            false,
            false,
            file_type::MOSTLY_Q4_1,
            GgmlType::Q4_1,
            1e-3,
        ),
        (4, false, true, file_type::MOSTLY_Q4_1, GgmlType::Q4_1, 0.0),
        (5, true, false, file_type::MOSTLY_Q5_0, GgmlType::Q5_0, 0.0),
        (8, true, false, file_type::MOSTLY_Q8_0, GgmlType::Q8_0, 0.0),
    ] {
        let what = format!("{}{}", ty.name(), if free_min { " free min" } else { "" });
        let q = quantize_rtn(
            &src,
            QuantizeOptions {
                free_min,
                ..QuantizeOptions::rtn(bits, Some(32), sym)
            },
        );
        if free_min {
            assert_eq!(
                same_weights(&q, &source_blocks, 0.0, "free min vs the Q4_1 source"),
                210
            );
        }
        let out = tmp(&format!("smollm2-{}.gguf", what.replace(' ', "-")));
        write(&q, &src_path, ftype, &out);

        let bytes = std::fs::read(&out).unwrap();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(
            g.get("general.file_type").and_then(|v| v.as_u64()),
            Some(ftype.into())
        );
        assert_eq!(g.tensors.len(), source.tensors.len(), "{what}");
        for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
            assert_eq!(
                g.string_array(key),
                source.string_array(key),
                "{what}: {key}"
            );
        }
        assert_eq!(
            g.get("tokenizer.chat_template").and_then(|v| v.as_str()),
            source
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
        );
        for t in &g.tensors {
            let expected = if t.name == "token_embd.weight" {
                GgmlType::Q8_0
            } else if t.ne.len() == 1 {
                GgmlType::F32
            } else {
                ty
            };
            assert_eq!(t.ggml_type, expected, "{what}: {}", t.name);
        }
        // The same size as llama-quantize's file of this type.
        if ty == GgmlType::Q4_0 {
            assert_eq!(
                bytes.len(),
                91_726_912,
                "llama-quantize's Q4_0 of this model is 91,726,912 bytes"
            );
        }

        let back = import_blocks(&out);
        let n = same_weights(&q, &back, tol, &what);
        assert_eq!(n, 210, "{what}: every linear layer");
        drop(bytes);
        std::fs::remove_file(&out).unwrap();
    }
}

/// GPTQ for a GGUF `Q4_0` file: act-order within whole groups (no
/// permutation) with the weighted scale search on the signed Q4_0 grid; it
/// beats RTN on every layer; the tensors get llama-quantize's types with an
/// importance matrix (the first eighth of `ffn_down` `Q4_1`, so the file is
/// exactly the size of llama.cpp's less its imatrix metadata); it reads back
/// bit for bit and runs.
#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "slow under qemu; target-independent"
)]
fn gptq_q4_0_is_a_plain_gguf() {
    use nibble::quantizer::mix::GgufMix;
    let src_path = smollm2();
    let src = import_f32(&src_path);
    let opts = QuantizeOptions {
        sym: true,
        act_order_groups: true,
        scale_search: true,
        gguf_mix: Some(GgufMix::Q4_0),
        ..gptq_opts(4, Some(32), true, true)
    };
    let (q, reports) = quantize_in_memory(&src, &opts);
    let v = q.view().unwrap();
    assert!(v
        .tensors
        .iter()
        .all(|t| !t.name.ends_with(".perm") && !t.name.ends_with(".fold")));
    // This source is Q4_1 already: on its own grid (the Q4_1 layers) both
    // give its blocks back exactly.
    let exact = |r: &&nibble::quantizer::LayerReport| r.rel_error == 0.0;
    let worse: Vec<&str> = reports
        .iter()
        .filter(|r| r.rel_error_rtn.is_some_and(|e| r.rel_error >= e) && !exact(r))
        .map(|r| r.name.as_str())
        .collect();
    assert!(worse.is_empty(), "GPTQ lost to RTN on {worse:?}");
    let exact: Vec<&str> = reports
        .iter()
        .filter(exact)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        exact,
        [
            "blk.0.ffn_down.weight",
            "blk.1.ffn_down.weight",
            "blk.2.ffn_down.weight"
        ]
    );
    let out = tmp("smollm2-gptq-q4_0.gguf");
    write(&q, &src_path, GgufMix::Q4_0.file_type(), &out);
    let bytes = std::fs::read(&out).unwrap();
    let g = GgufFile::parse(&bytes).unwrap();
    for t in g.tensors.iter().filter(|t| t.ne.len() == 2) {
        let first_ffn_down = ["blk.0.", "blk.1.", "blk.2."]
            .iter()
            .any(|b| t.name.starts_with(b) && t.name.ends_with(".ffn_down.weight"));
        let expected = match t.name {
            "token_embd.weight" => GgmlType::Q8_0,
            _ if first_ffn_down => GgmlType::Q4_1,
            _ => GgmlType::Q4_0,
        };
        assert_eq!(t.ggml_type, expected, "{}", t.name);
    }
    assert_eq!(
        bytes.len(),
        91_726_912 + 3 * 576 * 48 * 2,
        "llama-quantize's Q4_0 plus 2 bytes per block of three ffn_down"
    );
    drop(bytes);
    let back = import_blocks(&out);
    assert_eq!(same_weights(&q, &back, 0.0, "GPTQ Q4_0"), 210);
    assert_runs(back, "gptq-q4_0.gguf");
    std::fs::remove_file(&out).unwrap();
}

/// llama.cpp's K-quant mixes by RTN (Q4_K_M and Q3_K_S): every tensor gets
/// the type `llama-quantize` gives it (this model's 576-wide inputs are not
/// whole super-blocks, so most fall back to Q5_0 / Q4_0 / Q8_0 as there; the
/// 1536-wide `ffn_down` is Q4_K / Q6_K, or Q3_K), the file is exactly the size
/// of `llama-quantize`'s, the K-quant super-blocks read back bit for bit, and
/// the model runs.
#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "slow under qemu; target-independent"
)]
fn k_quant_mixes_have_llama_cpp_types_and_read_back() {
    use nibble::quantizer::mix::GgufMix;
    let src_path = smollm2();
    let src = import_f32(&src_path);
    for (mix, size) in [(GgufMix::Q4KM, 105_454_144), (GgufMix::Q3KS, 88_201_792)] {
        let what = mix.name();
        let q = quantize_rtn(
            &src,
            QuantizeOptions {
                gguf_mix: Some(mix),
                ..QuantizeOptions::rtn(4, Some(32), true)
            },
        );
        let out = tmp(&format!("smollm2-{what}.gguf"));
        write(&q, &src_path, mix.file_type(), &out);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len(), size, "llama-quantize's {what} of this model");
        let g = GgufFile::parse(&bytes).unwrap();
        let type_of = |name: &str| {
            g.tensors
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.ggml_type)
        };
        let count = |ty| g.tensors.iter().filter(|t| t.ggml_type == ty).count();
        assert_eq!(type_of("token_embd.weight"), Some(GgmlType::Q8_0));
        assert_eq!(type_of("blk.0.attn_norm.weight"), Some(GgmlType::F32));
        if mix == GgufMix::Q4KM {
            for (name, ty) in [
                ("blk.0.attn_v.weight", GgmlType::Q8_0),
                ("blk.3.attn_v.weight", GgmlType::Q5_0),
                ("blk.3.attn_q.weight", GgmlType::Q5_0),
                ("blk.0.ffn_down.weight", GgmlType::Q6K),
                ("blk.5.ffn_down.weight", GgmlType::Q6K),
                ("blk.6.ffn_down.weight", GgmlType::Q4K),
                ("blk.29.ffn_down.weight", GgmlType::Q6K),
            ] {
                assert_eq!(type_of(name), Some(ty), "{name}");
            }
            assert_eq!(
                [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q5_0, GgmlType::Q8_0].map(count),
                [16, 14, 166, 15]
            );
        } else {
            assert_eq!(
                [GgmlType::Q3K, GgmlType::Q4_0, GgmlType::Q8_0].map(count),
                [30, 180, 1]
            );
        }
        drop(bytes);
        let back = import_blocks(&out);
        assert_eq!(same_weights(&q, &back, 0.0, what), 210);
        assert_runs(back, what);
        std::fs::remove_file(&out).unwrap();
    }

    // A model whose MLP is 172 wide has no GGUF block for its down projection.
    let stories = import_f32(&shared().join("models/stories260k"));
    let err = quantize_model(
        &stories.view().unwrap(),
        &QuantizeOptions {
            gguf_mix: Some(GgufMix::Q4KM),
            ..QuantizeOptions::rtn(4, Some(32), true)
        },
        None,
        AlignedBytes::new(),
        &mut |_, _, _| {},
    )
    .err()
    .expect("172 inputs are not whole blocks")
    .to_string();
    assert!(
        err.contains("ffn_down") && err.contains("172") && err.contains("multiple of 32"),
        "{err}"
    );
}
