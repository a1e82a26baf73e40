//! `nibble-quantizer`: offline weight quantization, GPTQ with RTN as the
//! baseline.
//!
//! Status: the per-layer algorithms are implemented and checked against the
//! GPTQ authors' reference implementation (`tests/gptq_reference.rs`):
//! [`gptq::gptq`] (act-order, static groups, dead inputs, damping with
//! automatic increase, lazy block updates) and [`gptq::rtn`], on the grids of
//! [`grid::Grid`] (2/3/4/8 bits, symmetric or asymmetric, per-channel or
//! grouped). [`model::quantize_model`] quantizes a whole model into the
//! `.nib` integer group types with RTN, or with GPTQ block by block over
//! calibration windows ([`calib`]).

pub mod calib;
pub mod error;
pub mod gptq;
pub mod grid;
pub mod imatrix;
pub mod kquant;
pub mod linalg;
pub mod mix;
/// The vectorisable exp, softmax sum and SiLU, shared with the runtime.
pub use nibble_runtime::math;
pub mod model;
#[cfg(test)]
mod test_util;

pub use error::{QuantError, Result};
pub use gptq::{gptq, rtn, GptqConfig, QuantizedLayer, SearchWeight};
pub use grid::Grid;
pub use model::{quantize_model, CalibInfo, LayerReport, Method, QuantizeOptions, Timings};
