//! Fuzz the GGUF reader and the dequantizers.
//! Run: `cargo +nightly fuzz run gguf_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble_format::gguf::{dequantize, GgufFile};

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = GgufFile::parse(data) {
        for t in &g.tensors {
            if t.n_elements() <= 1 << 20 {
                let mut out = vec![0f32; t.n_elements() as usize];
                let _ = dequantize(t, &mut out);
            }
        }
        for (k, _) in &g.kv {
            let _ = g.string_array(k);
        }
    }
});
