//! `nibble-quantizer`: offline weight quantization (GPTQ, with RTN as the
//! baseline) into the packed integer group types of the `.nib` format.
//!
//! Status: not implemented yet. The packed group types, calibration, Hessian
//! accumulation and the GPTQ sweep are tracked by the quantizer issue; this
//! crate currently only reserves its place in the workspace so that the
//! layout, CI and the facade are stable. Nothing here claims to quantize.
