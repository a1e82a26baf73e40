//! `include/nibble.h` is generated from `src/capi.rs` by cbindgen and checked
//! in, so C users get it without a Rust toolchain. This test regenerates it
//! and fails when the checked-in copy differs. After changing the C API run
//! `NIBBLE_BLESS=1 cargo test --test header` to rewrite it.

use std::path::Path;

#[test]
fn header_matches_a_fresh_generation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi.rs"))
        .generate()
        .expect("cbindgen parses src/capi.rs");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = root.join("include/nibble.h");
    if std::env::var_os("NIBBLE_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/nibble.h");
        return;
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == fresh,
        "{} is stale (or missing): regenerate it with `NIBBLE_BLESS=1 cargo test --test header`",
        path.display()
    );
    // The header declares the whole documented surface.
    let text = String::from_utf8(fresh).expect("UTF-8 header");
    for f in [
        "nibble_version",
        "nibble_last_error",
        "nibble_model_load",
        "nibble_model_free",
        "nibble_model_get_info",
        "nibble_session_new",
        "nibble_session_free",
        "nibble_tokenize",
        "nibble_detokenize",
        "nibble_session_eval",
        "nibble_session_logits",
        "nibble_session_reset",
        "nibble_session_truncate",
        "nibble_sampler_new",
        "nibble_sampler_free",
        "nibble_sampler_sample",
        "nibble_generate",
    ] {
        assert!(text.contains(&format!("{f}(")), "header lacks {f}");
    }
}
