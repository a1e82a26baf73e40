//! `nibble-quantizer`: offline weight quantization, GPTQ with RTN as the
//! baseline.
//!
//! Status: the per-layer algorithms are implemented and checked against the
//! GPTQ authors' reference implementation (`tests/gptq_reference.rs`):
//! [`gptq::gptq`] (act-order, static groups, dead inputs, damping with
//! automatic increase, lazy block updates) and [`gptq::rtn`], on the grids of
//! [`grid::Grid`] (2/3/4/8 bits, symmetric or asymmetric, per-channel or
//! grouped). Not yet: the packed `.nib` group types, calibration and
//! block-by-block Hessian collection over a whole model, and `nibble quantize`.

pub mod error;
pub mod gptq;
pub mod grid;
pub mod linalg;

pub use error::{QuantError, Result};
pub use gptq::{gptq, rtn, GptqConfig, QuantizedLayer};
pub use grid::Grid;
