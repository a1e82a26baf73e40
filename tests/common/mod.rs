//! Shared helpers for the end-to-end tests: locating `../shared` and reading
//! the Hugging Face reference fixtures.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use nibble::{Model, Session, SessionParams};

/// `$NIBBLE_SHARED`, or `../shared` beside the checkout.
pub fn shared() -> PathBuf {
    match std::env::var_os("NIBBLE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    }
}

pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

/// Read one tensor of a reference `.safetensors` file (F32 or I64).
pub fn read_ref(path: &std::path::Path, name: &str) -> RefTensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{name} in {}", path.display()));
    let d = t.data();
    let mut r = RefTensor {
        shape: t.shape().to_vec(),
        f32: vec![],
        i64: vec![],
    };
    match t.dtype() {
        safetensors::Dtype::F32 => {
            r.f32 = d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        }
        safetensors::Dtype::I64 => {
            r.i64 = d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        }
        other => panic!("unexpected dtype {other:?}"),
    }
    r
}

/// max |a − b| / max |b|: the normwise relative error used for logits.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut num = 0f64;
    let mut den = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        num = num.max(f64::from(x - y).abs());
        den = den.max(f64::from(y).abs());
    }
    num / den
}

pub fn session(model: &Arc<Model>, n_ctx: usize, threads: usize) -> Session {
    Session::new(
        Arc::clone(model),
        &SessionParams {
            n_ctx,
            n_threads: threads,
            ..Default::default()
        },
    )
    .expect("session")
}

/// Logits at every position of `ids` from a fresh session: `[len, n_vocab]`,
/// through the batched (matrix-matrix) path.
pub fn forward_logits(model: &Arc<Model>, ids: &[u32], threads: usize) -> Vec<f32> {
    forward_logits_batched(model, ids, threads, 128)
}

/// As [`forward_logits`], in chunks of `n_batch` tokens.
pub fn forward_logits_batched(
    model: &Arc<Model>,
    ids: &[u32],
    threads: usize,
    n_batch: usize,
) -> Vec<f32> {
    let mut s = Session::new(
        Arc::clone(model),
        &SessionParams {
            n_ctx: ids.len().max(8),
            n_threads: threads,
            n_batch,
        },
    )
    .expect("session");
    let mut out = Vec::with_capacity(ids.len() * model.hparams.n_vocab);
    s.eval_each(ids, |_, l| out.extend_from_slice(l))
        .expect("eval");
    out
}

/// The same through the one-token (matrix-vector) path.
pub fn forward_logits_sequential(model: &Arc<Model>, ids: &[u32], threads: usize) -> Vec<f32> {
    let mut s = session(model, ids.len().max(8), threads);
    let mut out = Vec::with_capacity(ids.len() * model.hparams.n_vocab);
    s.eval_each_sequential(ids, |_, l| out.extend_from_slice(l))
        .expect("eval");
    out
}

/// The check every architecture fixture of `hf-reference/` goes through:
/// logits of both prompt rows, then 16 greedy tokens with their step logits.
pub fn check_hf_reference(model_dir: &std::path::Path, reference: &std::path::Path, tol: f64) {
    let model = Arc::new(Model::load(model_dir).expect("load model"));
    let ids = read_ref(reference, "input_ids");
    let logits = read_ref(reference, "logits");
    let (rows, len) = (ids.shape[0], ids.shape[1]);
    let n_vocab = model.hparams.n_vocab;
    for r in 0..rows {
        let row: Vec<u32> = ids.i64[r * len..(r + 1) * len]
            .iter()
            .map(|&v| v as u32)
            .collect();
        let want = &logits.f32[r * len * n_vocab..(r + 1) * len * n_vocab];
        // The batched path with a chunk size that leaves a ragged last chunk,
        // and the one-token path.
        for (path, got) in [
            ("batched", forward_logits_batched(&model, &row, 1, 7)),
            ("sequential", forward_logits_sequential(&model, &row, 1)),
        ] {
            let e = rel_err(&got, want);
            assert!(
                e <= tol,
                "{}: row {r} {path} logits rel err {e:.3e} > {tol:.0e}",
                model_dir.display()
            );
        }
    }
    let greedy = read_ref(reference, "greedy_ids");
    let steps = read_ref(reference, "greedy_step_logits");
    let prompt: Vec<u32> = ids.i64[..len].iter().map(|&v| v as u32).collect();
    let mut s = session(&model, len + greedy.i64.len() + 1, 1);
    s.eval(&prompt).unwrap();
    for (t, &want_id) in greedy.i64.iter().enumerate() {
        let l = s.logits().to_vec();
        let e = rel_err(&l, &steps.f32[t * n_vocab..(t + 1) * n_vocab]);
        assert!(
            e <= tol,
            "{}: greedy step {t} rel err {e:.3e}",
            model_dir.display()
        );
        let next = nibble::runtime::argmax(&l);
        assert_eq!(
            next as i64,
            want_id,
            "{}: greedy token {t}",
            model_dir.display()
        );
        s.eval(&[next]).unwrap();
    }
}

/// A model file converted to an F32 `.nib` image in memory.
pub fn import_f32(path: &std::path::Path) -> nibble::format::NibFile {
    nibble::format::import::import_to_memory(
        path,
        &nibble::format::import::ImportOptions {
            dtype: nibble::format::DType::F32,
            hash_source: false,
        },
        &mut |_, _, _| {},
    )
    .expect("import")
}
