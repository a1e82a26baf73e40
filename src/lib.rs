//! # nibble
//!
//! Run large language models well on ordinary CPUs. This facade re-exports
//! the workspace crates:
//!
//! * `format` ([`nibble_format`]) — the `.nib` single-file format and the GGUF / Hugging Face importers;
//! * `runtime` ([`nibble_runtime`]) — the Llama-family runtime: [`Model`], [`Session`], [`Sampler`];
//! * `quantizer` ([`nibble_quantizer`]) — GPTQ and RTN over whole models into packed integer groups.
//!
//! ```no_run
//! use std::sync::Arc;
//! use nibble::{Model, Session, SessionParams, Sampler, SamplerParams, GenerateParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Arc::new(Model::load("../shared/models/stories260k")?);
//! let mut session = Session::new(model.clone(), &SessionParams::default())?;
//! let prompt = model.tokenizer()?.encode("Once upon a time", true)?;
//! let mut sampler = Sampler::new(SamplerParams::greedy(), model.hparams.n_vocab)?;
//! let params = GenerateParams { max_tokens: 32, ..Default::default() };
//! let out = session.generate(&prompt, &params, &mut sampler, |_, text| {
//!     print!("{text}");
//!     true
//! })?;
//! println!("\n{} tokens", out.generated_tokens);
//! # Ok(())
//! # }
//! ```

pub mod capi;

pub use nibble_format as format;
pub use nibble_quantizer as quantizer;
pub use nibble_runtime as runtime;
pub use nibble_runtime::{
    ChatMessage, GenerateParams, GenerationStats, Model, PoolKind, RuntimeError, Sampler,
    SamplerParams, Session, SessionParams, StopReason,
};
