//! The Hessian diagonal as llama.cpp's importance matrix.
//!
//! GPTQ's Hessian of a linear layer is H = 2/n Σ x·xᵀ over the calibration
//! tokens, so half its diagonal is the mean square of each input: exactly
//! the statistic `llama-imatrix` collects (`in_sum2` / `counts` per weight)
//! and `llama-quantize --imatrix` weights its rounding error by. Writing it
//! in llama.cpp's GGUF imatrix format lets users of `llama-quantize` use the
//! calibration nibble already ran. With true-sequential GPTQ the statistics
//! of later sub-layers are taken on the already-quantized block's inputs,
//! the inputs the quantized model will really give them.
//!
//! Read back ([`read_imatrix`]), a file made by `llama-imatrix` (or by
//! nibble) stands in for the calibration: each layer's Hessian becomes the
//! diagonal matrix of its inputs' mean squares ([`diagonal_hessian`]), so
//! GPTQ's error compensation has nothing to spread (the off-diagonal terms
//! are zero) and what remains is the grid search weighted by those mean
//! squares, with no forward pass at all.

use nibble_format::gguf::{GgmlType, GgufFile};
use nibble_format::gguf_write::{GgufTensor, GgufValue};

use crate::error::{QuantError, Result};
use crate::model::LayerReport;

/// One weight's statistics: the sum of squares of each input over `count`
/// calibration tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct ImatrixEntry {
    /// The weight's tensor name (`blk.0.attn_q.weight`), as llama.cpp names it.
    pub name: String,
    pub sum_sq: Vec<f32>,
    pub count: u64,
}

/// The entries of the layers GPTQ calibrated, `tokens` calibration tokens
/// each (windows × tokens per window), sorted by name like llama.cpp's.
pub fn imatrix_entries(reports: &[LayerReport], tokens: u64) -> Vec<ImatrixEntry> {
    let mut out: Vec<ImatrixEntry> = reports
        .iter()
        .filter_map(|r| {
            let m = r.input_mean_sq.as_ref()?;
            Some(ImatrixEntry {
                name: r.name.clone(),
                sum_sq: m.iter().map(|&v| v * tokens as f32).collect(),
                count: tokens,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The metadata and tensors of a GGUF imatrix file (llama.cpp's
/// `save_imatrix`: `general.type` = `imatrix`, `imatrix.datasets`,
/// `imatrix.chunk_count`, `imatrix.chunk_size`, and per weight
/// `<name>.in_sum2` `[1, n_in]` and `<name>.counts` `[1, 1]`, both F32).
pub fn imatrix_gguf(
    entries: &[ImatrixEntry],
    dataset: &str,
    chunk_count: u32,
    chunk_size: u32,
) -> (Vec<(String, GgufValue)>, Vec<GgufTensor>) {
    let kv = vec![
        ("general.type".to_string(), GgufValue::Str("imatrix".into())),
        (
            "imatrix.datasets".to_string(),
            GgufValue::ArrStr(vec![dataset.to_string()]),
        ),
        (
            "imatrix.chunk_count".to_string(),
            GgufValue::U32(chunk_count),
        ),
        ("imatrix.chunk_size".to_string(), GgufValue::U32(chunk_size)),
    ];
    let mut tensors = Vec::with_capacity(entries.len() * 2);
    for e in entries {
        tensors.push(GgufTensor::f32(
            &format!("{}.in_sum2", e.name),
            &[1, e.sum_sq.len() as u64],
            &e.sum_sq,
        ));
        tensors.push(GgufTensor::f32(
            &format!("{}.counts", e.name),
            &[1, 1],
            &[e.count as f32],
        ));
    }
    (kv, tensors)
}

/// The entries of a GGUF imatrix file (`<name>.in_sum2` and `<name>.counts`
/// per weight, F32), sorted by name. Malformed files are errors naming what
/// is wrong; the caller adds the file's name.
pub fn read_imatrix(bytes: &[u8]) -> Result<Vec<ImatrixEntry>> {
    let bad = |why: String| QuantError::Calibration(format!("importance matrix: {why}"));
    let g = GgufFile::parse(bytes).map_err(|e| bad(e.to_string()))?;
    let f32s = |t: &nibble_format::gguf::GgufTensor<'_>| -> Result<Vec<f32>> {
        if t.ggml_type != GgmlType::F32 || t.data.len() as u64 != 4 * t.n_elements() {
            return Err(bad(format!("tensor '{}' is not F32", t.name)));
        }
        Ok(t.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mut out = Vec::new();
    for t in &g.tensors {
        let Some(name) = t.name.strip_suffix(".in_sum2") else {
            continue;
        };
        let counts = g
            .tensor(&format!("{name}.counts"))
            .ok_or_else(|| bad(format!("'{name}' has sums of squares but no counts")))?;
        let count = f32s(counts)?;
        let sum_sq = f32s(t)?;
        // llama.cpp counts per expert; a dense weight has one count.
        let (&[count], false) = (&count[..], sum_sq.is_empty()) else {
            return Err(bad(format!("'{name}': expected one count and some sums")));
        };
        if !(count.is_finite() && count >= 1.0) || sum_sq.iter().any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(bad(format!("'{name}': counts or sums out of range")));
        }
        out.push(ImatrixEntry {
            name: name.to_string(),
            sum_sq,
            count: count as u64,
        });
    }
    if out.is_empty() {
        return Err(bad(
            "no `<weight>.in_sum2` tensors (not an imatrix file?)".into()
        ));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The `[n, n]` Hessian GPTQ's statistics would give a layer whose inputs
/// have these sums of squares over `count` tokens, keeping only its
/// diagonal: `2 · sum_sq / count` (H = 2/n Σ x·xᵀ).
pub fn diagonal_hessian(e: &ImatrixEntry) -> Vec<f32> {
    let n = e.sum_sq.len();
    let mut h = vec![0f32; n * n];
    for (i, &s) in e.sum_sq.iter().enumerate() {
        h[i * n + i] = 2.0 * s / e.count as f32;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use nibble_format::gguf::GgufFile;

    #[test]
    fn entries_scale_means_by_tokens_and_read_back() {
        let rep = |name: &str, m: Option<Vec<f32>>| LayerReport {
            name: name.into(),
            rows: 2,
            cols: 3,
            rel_error: 0.0,
            rel_error_rtn: None,
            input_mean_sq: m,
        };
        let reports = [
            rep("blk.1.ffn_up.weight", Some(vec![0.5, 1.0, 2.0])),
            rep("token_embd.weight", None),
            rep("blk.0.attn_q.weight", Some(vec![0.25, 0.0, 4.0])),
        ];
        let e = imatrix_entries(&reports, 8);
        assert_eq!(e.len(), 2, "RTN layers have no statistics");
        assert_eq!(e[0].name, "blk.0.attn_q.weight", "sorted by name");
        assert_eq!(e[0].sum_sq, vec![2.0, 0.0, 32.0]);
        let (kv, t) = imatrix_gguf(&e, "calib.txt", 4, 2);
        let mut bytes = Vec::new();
        nibble_format::gguf_write::write_gguf(&mut bytes, &kv, &t).unwrap();
        let g = GgufFile::parse(&bytes).unwrap();
        assert_eq!(
            g.get("general.type").and_then(|v| v.as_str()),
            Some("imatrix")
        );
        let s = g.tensor("blk.1.ffn_up.weight.in_sum2").unwrap();
        assert_eq!(s.ne, vec![3, 1]);
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!(f32s(s.data), [4.0, 8.0, 16.0]);
        let c = g.tensor("blk.1.ffn_up.weight.counts").unwrap();
        assert_eq!(f32s(c.data), [8.0]);
        // Read back: the same entries; the diagonal Hessian is twice the mean square.
        let back = read_imatrix(&bytes).unwrap();
        assert_eq!(back, e);
        let h = diagonal_hessian(&back[1]);
        assert_eq!(h, [1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 4.0]);
    }

    /// Files that are not imatrices, or whose statistics are damaged, are
    /// errors that say so.
    #[test]
    fn malformed_imatrices_are_refused() {
        let write = |t: Vec<GgufTensor>| {
            let mut b = Vec::new();
            nibble_format::gguf_write::write_gguf(&mut b, &[], &t).unwrap();
            b
        };
        let err = |b: &[u8]| read_imatrix(b).unwrap_err().to_string();
        assert!(err(b"not a gguf").contains("importance matrix"));
        assert!(err(&write(vec![])).contains("no `<weight>.in_sum2`"));
        let sums = || GgufTensor::f32("w.in_sum2", &[1, 2], &[1.0, 2.0]);
        assert!(err(&write(vec![sums()])).contains("no counts"));
        let neg = GgufTensor::f32("w.in_sum2", &[1, 2], &[1.0, -2.0]);
        let one = || GgufTensor::f32("w.counts", &[1, 1], &[4.0]);
        assert!(err(&write(vec![neg, one()])).contains("out of range"));
        let zero = GgufTensor::f32("w.counts", &[1, 1], &[0.0]);
        assert!(err(&write(vec![sums(), zero])).contains("out of range"));
        let two = GgufTensor::f32("w.counts", &[1, 2], &[4.0, 4.0]);
        assert!(err(&write(vec![sums(), two])).contains("one count"));
        assert_eq!(
            read_imatrix(&write(vec![sums(), one()])).unwrap()[0].count,
            4
        );
    }
}
