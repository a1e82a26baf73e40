//! Fuzz the `.nib` reader: any input must parse or give an error, never
//! panic; every view a successful parse hands out must be in bounds.
//! Run: `cargo +nightly fuzz run nib_parse` (seeds: the malformed corpus
//! the format tests write to target/tmp/nib-corpus).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nibble_format::NibView;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = NibView::parse(data) {
        let _ = v.verify_checksums();
        for t in &v.tensors {
            assert_eq!(Some(t.data.len() as u64), nibble_format::dtype::tensor_bytes(t.dtype, &t.shape, t.quant_param));
        }
        for (k, _) in &v.metadata.entries {
            assert!(v.metadata.get(k).is_some());
        }
    }
});
