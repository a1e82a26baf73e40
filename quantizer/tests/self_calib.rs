//! Self-generated calibration (the default of `nibble quantize`): the model
//! writes its own windows, reproducibly and independently of the threads.

use std::path::PathBuf;
use std::sync::Arc;

use nibble_quantizer::calib::{
    self_calib_sequences, self_generated_calibration, self_generated_windows, SELF_CALIB_BATCH,
};
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

/// The default calibration draws its windows from fewer, shared sequences:
/// every window is a slice of the concatenated text the model wrote, the
/// windows are seeded and do not depend on the threads, and when there are
/// no more windows than one batch of sequences the sequences are the
/// windows.
#[test]
fn default_calibration_draws_windows_from_the_written_text() {
    let model = Arc::new(Model::load(shared().join("models/stories260k")).unwrap());
    assert_eq!(self_calib_sequences(128), SELF_CALIB_BATCH);
    assert_eq!(self_calib_sequences(1024), 128);
    assert_eq!(self_calib_sequences(5), 5);
    let (nsamples, seqlen) = (3 * SELF_CALIB_BATCH, 24);
    let n_seq = self_calib_sequences(nsamples);
    assert!(n_seq < nsamples);
    let written = self_generated_windows(&model, n_seq, seqlen, 4, 2, &|_| {}).unwrap();
    let text = written.concat();
    let last = std::sync::atomic::AtomicUsize::new(0);
    let one = self_generated_calibration(&model, nsamples, seqlen, 4, 1, &|t| {
        last.store(t, std::sync::atomic::Ordering::Relaxed)
    })
    .unwrap();
    let two = self_generated_calibration(&model, nsamples, seqlen, 4, 2, &|_| {}).unwrap();
    assert_eq!(one, two, "the windows must not depend on the thread count");
    assert_eq!(
        last.into_inner(),
        n_seq * seqlen,
        "progress counts the written tokens"
    );
    assert_eq!(one.len(), nsamples);
    let mut starts = std::collections::HashSet::new();
    for w in &one {
        assert_eq!(w.len(), seqlen);
        let at = text
            .windows(seqlen)
            .position(|s| s == &w[..])
            .expect("every window is a slice of the written text");
        starts.insert(at);
    }
    assert!(
        starts.len() > nsamples / 2,
        "windows at many offsets: {starts:?}"
    );
    let other = self_generated_calibration(&model, nsamples, seqlen, 5, 2, &|_| {}).unwrap();
    assert_ne!(one, other, "another seed gives other windows");
    // No more windows than a batch: the written sequences themselves.
    let few = self_generated_calibration(&model, 6, seqlen, 4, 2, &|_| {}).unwrap();
    assert_eq!(
        few,
        self_generated_windows(&model, 6, seqlen, 4, 2, &|_| {}).unwrap()
    );
}
