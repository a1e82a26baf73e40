//! Self-generated calibration (the default of `nibble quantize`): the model
//! writes its own windows, reproducibly and independently of the threads.

use std::path::PathBuf;
use std::sync::Arc;

use nibble_quantizer::calib::self_generated_windows;
use nibble_runtime::Model;

fn shared() -> PathBuf {
    match std::env::var_os("NIBBLE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

#[test]
fn windows_are_seeded_start_with_bos_and_do_not_depend_on_threads() {
    let model = Arc::new(Model::load(shared().join("models/stories260k")).unwrap());
    let bos = model.bos_id.unwrap();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let last = std::sync::atomic::AtomicUsize::new(0);
    let count = |t| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(
            t > last.swap(t, std::sync::atomic::Ordering::Relaxed),
            "progress goes forward"
        );
    };
    let one = self_generated_windows(&model, 5, 48, 7, 1, &count).unwrap();
    let two = self_generated_windows(&model, 5, 48, 7, 2, &|_| {}).unwrap();
    assert_eq!(
        calls.into_inner(),
        47,
        "one progress call per decoding step"
    );
    assert_eq!(
        last.into_inner(),
        5 * 48,
        "progress ends at every token written"
    );
    assert_eq!(one, two, "the windows must not depend on the thread count");
    assert_eq!(one.len(), 5);
    for w in &one {
        assert_eq!(w.len(), 48);
        assert_eq!(w[0], bos);
        assert!(w.iter().all(|&t| (t as usize) < model.hparams.n_vocab));
    }
    assert_ne!(one[0], one[1], "each sequence has its own seed");
    let other = self_generated_windows(&model, 5, 48, 8, 2, &|_| {}).unwrap();
    assert_ne!(one, other, "another seed gives other text");
    // The model's own text, decoded: TinyStories-like words, not noise.
    let text = model
        .tokenizer()
        .unwrap()
        .decode(&one[0][1..], true)
        .unwrap();
    assert!(text.split_whitespace().count() >= 8, "{text:?}");

    let e = self_generated_windows(&model, 2, 1, 0, 1, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("--seqlen"), "{e}");
    let e = self_generated_windows(&model, 2, 100_000, 0, 1, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
}

/// Sequences decoded side by side keep their own seeds and state: sample i
/// of a batch (and of the next batch) is the text the single sample with
/// seed `seed + i` writes. (The logits of a row may differ from those of the
/// row alone by float reassociation, which moves a sampled token only at a
/// draw within rounding of a boundary.)
#[test]
fn batched_sequences_do_not_depend_on_their_neighbours() {
    let model = Arc::new(Model::load(shared().join("models/stories260k")).unwrap());
    let n = nibble_quantizer::calib::SELF_CALIB_BATCH + 2;
    let all = self_generated_windows(&model, n, 40, 11, 2, &|_| {}).unwrap();
    for i in [0, 3, n - 1] {
        let alone = self_generated_windows(&model, 1, 40, 11 + i as u64, 1, &|_| {}).unwrap();
        assert_eq!(alone[0], all[i], "sample {i}");
    }
}
