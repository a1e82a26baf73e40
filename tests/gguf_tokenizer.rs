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
