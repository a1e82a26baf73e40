//! The quantizer's typed error.

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("unsupported bit width {0} (supported: 2, 3, 4, 5, 8)")]
    UnsupportedBits(u32),
    #[error("5-bit layers are GGUF Q5_0 blocks: symmetric groups of 32 (got {})", if *.sym { format!("groups of {:?}", .group_size) } else { "an asymmetric grid".into() })]
    FiveBit {
        sym: bool,
        group_size: Option<usize>,
    },
    #[error("invalid group size {group_size} for a row of {cols} columns (use 32, 64, 128, or none for one group per row)")]
    BadGroupSize { group_size: usize, cols: usize },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("non-finite value in {what} at index {index}")]
    NonFinite { what: &'static str, index: usize },
    #[error("the Hessian is not positive definite even after raising the damping to {damp:e}")]
    NotPositiveDefinite { damp: f64 },
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Format(#[from] nibble_format::FormatError),
    #[error("generating calibration text with the model: {0}")]
    Runtime(#[from] nibble_runtime::RuntimeError),
    #[error("a free minimum (Q4GM) needs 4-bit asymmetric groups; got {bits} bits, {}, {}", if *.sym { "symmetric" } else { "asymmetric" }, match .group_size { Some(g) => format!("groups of {g}"), None => "one group per row".into() })]
    FreeMin {
        bits: u32,
        sym: bool,
        group_size: Option<usize>,
    },
    #[error("invalid damping {0} (must be > 0 and finite)")]
    BadDamp(f64),
}

pub type Result<T, E = QuantError> = std::result::Result<T, E>;
