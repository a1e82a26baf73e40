//! The tokenizer a real GGUF carries in its metadata, rebuilt by nibble
//! (`format::gguf_tokenizer`), against llama.cpp's own `llama-tokenize` ids
//! (`../shared/fixtures/gguf-reference/<model>/tokens.json`: texts (a)–(g),
//! BOS where the file asks for it, special tokens parsed in (f)); decoding
//! the ids gives the text back.

mod common;

use common::*;
use nibble::format::gguf::GgufFile;
use nibble::format::gguf_tokenizer;
use nibble::runtime::tokenizer::Tokenizer;

fn check(file: &str, fixture: &str, expect_bos: bool) {
    let path = real_model(file);
    let bytes = std::fs::read(&path).unwrap();
    let gguf = GgufFile::parse(&bytes).expect("parse");
    let built = gguf_tokenizer::from_gguf(&gguf)
        .expect("tokenizer builds")
        .expect("the file carries a tokenizer");
    let tok = Tokenizer::from_bytes(&built.json).expect("tokenizers loads it");
    let fx: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            shared()
                .join("fixtures/gguf-reference")
                .join(fixture)
                .join("tokens.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(fx["add_bos"].as_bool(), Some(expect_bos));
    let texts = fx["texts"].as_array().unwrap();
    let ids = fx["ids"].as_array().unwrap();
    assert_eq!(texts.len(), 7);
    for (i, (text, want)) in texts.iter().zip(ids).enumerate() {
        let text = text.as_str().unwrap();
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap();
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            panic!(
                "{file} text {i}: ids differ from llama.cpp's (first at {first:?}; {} vs {} ids)\n got  {:?}\n want {:?}",
                got.len(),
                want.len(),
                &got[..got.len().min(40)],
                &want[..want.len().min(40)]
            );
        }
        let body = if expect_bos { &got[1..] } else { &got[..] };
        assert_eq!(
            tok.decode(body, false).unwrap(),
            text,
            "{file} text {i}: round trip"
        );
    }
    eprintln!("{file}: 7/7 texts equal llama.cpp's ids and round-trip");
}

#[test]
fn gemma3_spm_tokenizer_equals_llama_cpp() {
    check("gemma-3-270m-q4_k_m.gguf", "gemma-3-270m", true);
}

#[test]
fn qwen2_bpe_tokenizer_equals_llama_cpp() {
    check(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-0.5b",
        false,
    );
}

/// SmolLM2's GGUF (`gpt2` model, `smollm` pre-tokenizer: digits split
/// first) against the Hugging Face `tokenizer.json` shipped beside it, on the
/// fixture texts: the same ids, so a lone copy of the file tokenizes as the
/// folder did.
#[test]
fn smollm_bpe_tokenizer_equals_its_tokenizer_json() {
    let dir = shared().join("models/smollm2-135m-instruct");
    let bytes = std::fs::read(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let gguf = GgufFile::parse(&bytes).expect("parse");
    let built = gguf_tokenizer::from_gguf(&gguf).unwrap().unwrap();
    let ours = Tokenizer::from_bytes(&built.json).unwrap();
    let theirs =
        Tokenizer::from_bytes(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let fx: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared().join("fixtures/gguf-reference/qwen2.5-coder-0.5b/tokens.json"))
            .unwrap(),
    )
    .unwrap();
    let mut texts: Vec<String> = fx["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    texts.push("<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n".into());
    for (i, text) in texts.iter().enumerate() {
        let a = ours.encode(text, true).unwrap();
        let b = theirs.encode(text, true).unwrap();
        assert_eq!(a, b, "text {i}: {text:?}");
        assert_eq!(
            ours.decode(&a, false).unwrap(),
            *text,
            "text {i}: round trip"
        );
    }
    assert_eq!(built.bos_id, Some(1));
    assert!(built.eos_ids.contains(&2), "{:?}", built.eos_ids);
}
