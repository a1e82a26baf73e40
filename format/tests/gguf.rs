//! GGUF input: hand-built files (valid and broken), dequantization of the
//! block types, the rotary un-permutation, and a 100k-iteration mutation test.

use nibble_format::gguf::{dequantize, GgmlType, GgufFile, GgufValue};
use nibble_format::import::unpermute_rotary_rows;
use nibble_format::FormatError;

#[derive(Clone)]
struct RawTensor {
    name: Vec<u8>,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

#[derive(Clone)]
struct RawGguf {
    magic: [u8; 4],
    version: u32,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
    kv: Vec<Vec<u8>>,
    tensors: Vec<RawTensor>,
    data: Vec<u8>,
    alignment: u64,
}

fn gstr(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn kv(key: &[u8], ty: u32, value: &[u8]) -> Vec<u8> {
    let mut v = gstr(key);
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(value);
    v
}

/// A Q8_0 block: f16 scale then 32 int8.
fn q8_block(scale: f32, q: &[i8; 32]) -> Vec<u8> {
    let mut b = half::f16::from_f32(scale).to_le_bytes().to_vec();
    b.extend(q.iter().map(|&v| v as u8));
    b
}

impl RawGguf {
    fn valid() -> RawGguf {
        let f32s: Vec<u8> = (0..8)
            .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
            .collect();
        let mut q = [0i8; 32];
        for (i, v) in q.iter_mut().enumerate() {
            *v = i as i8 - 16;
        }
        let mut data = f32s;
        data.resize(32, 0);
        data.extend(q8_block(0.25, &q));
        let mut strings = 3u32.to_le_bytes().to_vec(); // array of strings
        strings.extend_from_slice(&2u64.to_le_bytes());
        strings.extend(gstr(b"<s>"));
        strings.extend(gstr(b"hello"));
        RawGguf {
            magic: *b"GGUF",
            version: 3,
            n_tensors: None,
            n_kv: None,
            kv: vec![
                kv(b"general.architecture", 8, &gstr(b"llama")),
                kv(b"llama.block_count", 4, &5u32.to_le_bytes()),
                kv(b"llama.rope.freq_base", 6, &10000f32.to_le_bytes()),
                kv(b"tokenizer.ggml.tokens", 9, &{
                    let mut a = 8u32.to_le_bytes().to_vec();
                    a.extend_from_slice(&strings[4..]);
                    a
                }),
            ],
            tensors: vec![
                RawTensor {
                    name: b"f.weight".to_vec(),
                    dims: vec![4, 2],
                    ty: 0,
                    offset: 0,
                },
                RawTensor {
                    name: b"q.weight".to_vec(),
                    dims: vec![32],
                    ty: 8,
                    offset: 32,
                },
            ],
            data,
            alignment: 32,
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(
            &self
                .n_tensors
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        out.extend_from_slice(&self.n_kv.unwrap_or(self.kv.len() as u64).to_le_bytes());
        for e in &self.kv {
            out.extend_from_slice(e);
        }
        for t in &self.tensors {
            out.extend(gstr(&t.name));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
        }
        let start = (out.len() as u64).div_ceil(self.alignment) * self.alignment;
        out.resize(start as usize, 0);
        out.extend_from_slice(&self.data);
        out
    }
}

#[test]
fn valid_file_parses_and_dequantizes() {
    let bytes = RawGguf::valid().build();
    let g = GgufFile::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(
        g.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    assert_eq!(g.get("llama.block_count").unwrap().as_u64(), Some(5));
    assert_eq!(
        g.string_array("tokenizer.ggml.tokens").unwrap(),
        vec!["<s>", "hello"]
    );
    let f = g.tensor("f.weight").unwrap();
    let mut out = vec![0f32; 8];
    dequantize(f, &mut out).unwrap();
    assert_eq!(out, (0..8).map(|i| i as f32 * 0.5).collect::<Vec<_>>());
    let q = g.tensor("q.weight").unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q8_0);
    let mut out = vec![0f32; 32];
    dequantize(q, &mut out).unwrap();
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, (i as f32 - 16.0) * 0.25);
    }
}

#[test]
fn q4_blocks_dequantize_like_ggml() {
    // Q4_0: d, then 16 bytes; low nibbles are elements 0..16, high 16..32.
    let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut raw = RawGguf::valid();
    raw.data.truncate(32);
    raw.data.extend(&b);
    raw.tensors[1].ty = 2;
    let bytes = raw.build();
    let g = GgufFile::parse(&bytes).unwrap();
    let mut out = vec![0f32; 32];
    dequantize(g.tensor("q.weight").unwrap(), &mut out).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
    }
    // Q4_1: d, m, then 16 bytes; x = q·d + m.
    let mut b = half::f16::from_f32(0.25).to_le_bytes().to_vec();
    b.extend(half::f16::from_f32(-1.0).to_le_bytes());
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let mut raw = RawGguf::valid();
    raw.data.truncate(32);
    raw.data.extend(&b);
    raw.tensors[1].ty = 3;
    let bytes = raw.build();
    let g = GgufFile::parse(&bytes).unwrap();
    dequantize(g.tensor("q.weight").unwrap(), &mut out).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.25 - 1.0);
        assert_eq!(out[j + 16], j as f32 * 0.25 - 1.0);
    }
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(...)
    let (n_head, hd, cols) = (3, 8, 5);
    let hf: Vec<f32> = (0..n_head * hd * cols).map(|i| i as f32).collect();
    let mut gguf = vec![0f32; hf.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = (h * hd + j * hd / 2 + i) * cols;
                let dst = (h * hd + i * 2 + j) * cols;
                gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
            }
        }
    }
    assert_ne!(gguf, hf);
    assert_eq!(unpermute_rotary_rows(&gguf, n_head, hd, cols), hf);
}

type Case = (&'static str, Vec<u8>, fn(&FormatError) -> bool);

fn corpus() -> Vec<Case> {
    let v = RawGguf::valid();
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |n, b, c| cases.push((n, b, c));
    let mut r = v.clone();
    r.magic = *b"GGML";
    add("bad magic", r.build(), |e| {
        matches!(e, FormatError::BadMagic { .. })
    });
    let mut r = v.clone();
    r.version = 1;
    add("GGUF v1", r.build(), |e| {
        matches!(e, FormatError::UnsupportedVersion { found: 1, .. })
    });
    let mut r = v.clone();
    r.version = 4;
    add("future version", r.build(), |e| {
        matches!(e, FormatError::UnsupportedVersion { found: 4, .. })
    });
    let mut r = v.clone();
    r.n_tensors = Some(u64::MAX);
    add("huge tensor count", r.build(), |e| {
        matches!(e, FormatError::CountTooLarge { .. })
    });
    let mut r = v.clone();
    r.n_kv = Some(1 << 40);
    add("huge kv count", r.build(), |e| {
        matches!(e, FormatError::CountTooLarge { .. })
    });
    let good = v.build();
    add("truncated in metadata", good[..40].to_vec(), |e| {
        matches!(e, FormatError::Truncated { .. })
    });
    add(
        "truncated in data",
        good[..good.len() - 3].to_vec(),
        |e| matches!(e, FormatError::Truncated { need, have, .. } if need > have),
    );
    let mut r = v.clone();
    r.kv[0] = kv(b"general.\xfe", 8, &gstr(b"llama"));
    add("key not UTF-8", r.build(), |e| {
        matches!(e, FormatError::BadUtf8 { .. })
    });
    let mut r = v.clone();
    r.kv.push(kv(b"x", 13, &[]));
    add("unknown value type", r.build(), |e| {
        matches!(e, FormatError::UnknownValueType { .. })
    });
    let mut r = v.clone();
    r.kv.push(kv(b"x", 9, &{
        let mut a = 9u32.to_le_bytes().to_vec();
        a.extend_from_slice(&1u64.to_le_bytes());
        a
    }));
    add("nested array", r.build(), |e| {
        matches!(e, FormatError::UnknownValueType { .. })
    });
    let mut r = v.clone();
    r.kv.push(kv(b"x", 9, &{
        let mut a = 4u32.to_le_bytes().to_vec();
        a.extend_from_slice(&(1u64 << 60).to_le_bytes());
        a
    }));
    add("huge array", r.build(), |e| {
        matches!(e, FormatError::CountTooLarge { .. })
    });
    let mut r = v.clone();
    r.kv.push(kv(b"s", 8, &(1u64 << 62).to_le_bytes()));
    add("string past end", r.build(), |e| {
        matches!(e, FormatError::Truncated { .. })
    });
    let mut r = v.clone();
    r.tensors[0].ty = 77;
    add("unknown ggml type", r.build(), |e| {
        matches!(e, FormatError::UnknownDtype { code: 77, .. })
    });
    let mut r = v.clone();
    r.tensors[1].offset = 1 << 20;
    // A tensor past the end reads as a file cut short.
    add("tensor out of bounds", r.build(), |e| {
        matches!(e, FormatError::Truncated { .. })
    });
    let mut r = v.clone();
    r.tensors[1].offset = 33;
    add("misaligned tensor", r.build(), |e| {
        matches!(e, FormatError::Misaligned { .. })
    });
    let mut r = v.clone();
    r.tensors[1].ty = 0;
    r.tensors[1].dims = vec![4];
    r.tensors[1].offset = 0;
    add("overlapping tensors", r.build(), |e| {
        matches!(e, FormatError::Overlap { .. })
    });
    let mut r = v.clone();
    r.tensors[1].name = b"f.weight".to_vec();
    add("duplicate tensor", r.build(), |e| {
        matches!(e, FormatError::Duplicate { .. })
    });
    let mut r = v.clone();
    r.kv.push(kv(b"llama.block_count", 4, &1u32.to_le_bytes()));
    add("duplicate key", r.build(), |e| {
        matches!(e, FormatError::Duplicate { .. })
    });
    let mut r = v.clone();
    r.tensors[0].dims = vec![1, 1, 1, 1, 8];
    add("too many dims", r.build(), |e| {
        matches!(e, FormatError::BadShape { .. })
    });
    let mut r = v.clone();
    r.tensors[1].dims = vec![16];
    add("row not a block multiple", r.build(), |e| {
        matches!(e, FormatError::BadShape { .. })
    });
    let mut r = v.clone();
    r.tensors[0].dims = vec![0, 2];
    add("zero dimension", r.build(), |e| {
        matches!(e, FormatError::BadShape { .. })
    });
    let mut r = v.clone();
    r.kv.push(kv(b"general.alignment", 4, &3u32.to_le_bytes()));
    add("alignment not a power of two", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    let mut r = v.clone();
    r.tensors[0].dims = vec![u64::MAX / 2, 4];
    add("element count overflows", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    cases
}

#[test]
fn malformed_gguf_corpus_gives_typed_errors() {
    let cases = corpus();
    assert!(cases.len() >= 20);
    for (name, bytes, check) in &cases {
        match GgufFile::parse(bytes) {
            Ok(_) => panic!("case '{name}' parsed"),
            Err(e) => assert!(check(&e), "case '{name}': unexpected {e:?}"),
        }
    }
}

#[test]
fn gguf_mutation_test_100k_never_panics() {
    let good = RawGguf::valid().build();
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (mut ok, mut err) = (0u32, 0u32);
    for _ in 0..100_000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 3 {
            let i = (next() % b.len() as u64) as usize;
            match next() % 4 {
                0 => b[i] ^= 1 << (next() % 8),
                1 => b[i] = next() as u8,
                2 => {
                    let v =
                        [u64::MAX, next(), next() % 64, 1 << (next() % 64)][(next() % 4) as usize];
                    for (k, byte) in v.to_le_bytes().iter().enumerate() {
                        if let Some(x) = b.get_mut(i + k) {
                            *x = *byte;
                        }
                    }
                }
                _ => b.truncate(i),
            }
            if b.is_empty() {
                break;
            }
        }
        match GgufFile::parse(&b) {
            Ok(g) => {
                ok += 1;
                for t in &g.tensors {
                    let mut out = vec![0f32; t.n_elements().min(1 << 20) as usize];
                    if out.len() as u64 == t.n_elements() {
                        let _ = dequantize(t, &mut out);
                    }
                }
                for (k, v) in &g.kv {
                    if let GgufValue::Array { elem_type: 8, .. } = v {
                        assert!(g.string_array(k).is_some());
                    }
                }
            }
            Err(_) => err += 1,
        }
    }
    eprintln!("gguf mutation test: {ok} parsed, {err} rejected");
    assert!(err > 30_000 && ok + err == 100_000);
}

/// Decode transcoded bytes row by row with nibble's own decoder.
fn decode_transcoded(
    dtype: nibble_format::DType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let rb = nibble_format::dtype::row_bytes(dtype.quant_bits().unwrap(), cols, 32);
    assert_eq!(bytes.len(), rows * rb, "{dtype} row layout");
    let mut out = vec![0f32; rows * cols];
    for (o, row) in out.chunks_exact_mut(cols).zip(bytes.chunks_exact(rb)) {
        nibble_format::quant::dequantize(dtype, 32, row, o);
    }
    out
}

#[test]
fn q4_0_q4_1_q8_0_blocks_transcode_losslessly() {
    use nibble_format::gguf::{transcode_blocks, GgufTensor};
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut byte = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 24) as u8
    };
    let (rows, cols) = (3usize, 96usize);
    for (ty, block, want) in [
        (GgmlType::Q4_0, 18usize, nibble_format::DType::Q4G),
        (GgmlType::Q4_1, 20, nibble_format::DType::Q4GM),
        (GgmlType::Q8_0, 34, nibble_format::DType::Q8G),
    ] {
        let n_blocks = rows * cols / 32;
        let mut data: Vec<u8> = (0..n_blocks * block).map(|_| byte()).collect();
        for (i, b) in data.chunks_exact_mut(block).enumerate() {
            // Finite scales (and minimums), negative ones and zero included.
            let s = [0.0f32, -0.031, 0.5, 1e-3][i % 4];
            b[..2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                b[2..4].copy_from_slice(&half::f16::from_f32(-0.7 + i as f32 * 0.1).to_le_bytes());
            }
        }
        let t = GgufTensor {
            name: "w",
            ggml_type: ty,
            ne: vec![cols as u64, rows as u64],
            data: &data,
        };
        let (dtype, bytes) = transcode_blocks(&t).unwrap();
        assert_eq!(dtype, want);
        let mut reference = vec![0f32; rows * cols];
        dequantize(&t, &mut reference).unwrap();
        let got = decode_transcoded(dtype, &bytes, rows, cols);
        assert!(
            reference
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{ty:?}: transcoded weights differ"
        );
    }
    let f32_tensor = GgufTensor {
        name: "w",
        ggml_type: GgmlType::F32,
        ne: vec![32, 1],
        data: &[0; 128],
    };
    assert!(transcode_blocks(&f32_tensor).is_none());
}

/// The real SmolLM2 GGUF (Q4_1 linear weights, Q8_0 embedding): every block
/// tensor decodes, after transcoding, to exactly the f32 values llama.cpp's
/// dequantization gives.
#[test]
fn real_gguf_block_tensors_transcode_losslessly() {
    use nibble_format::gguf::transcode_blocks;
    let shared = std::env::var_os("NIBBLE_SHARED").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
        std::path::PathBuf::from,
    );
    let path = shared.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g = GgufFile::parse(&bytes).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for t in &g.tensors {
        let Some((dtype, packed)) = transcode_blocks(t) else {
            continue;
        };
        *seen.entry(dtype.name()).or_insert(0) += 1;
        let (cols, rows) = (t.ne[0] as usize, t.ne[1] as usize);
        let mut reference = vec![0f32; rows * cols];
        dequantize(t, &mut reference).unwrap();
        let got = decode_transcoded(dtype, &packed, rows, cols);
        assert!(
            reference
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: transcoded weights differ",
            t.name
        );
    }
    assert_eq!(seen.get("Q4GM"), Some(&210), "{seen:?}");
    assert_eq!(seen.get("Q8G"), Some(&1), "{seen:?}");
}
