//! # nibble
//!
//! Run large language models well on ordinary CPUs. This facade re-exports
//! the workspace crates:
//!
//! * `format` ([`nibble_format`]) — the `.nib` single-file format and the GGUF / Hugging Face importers;
//! * `runtime` ([`nibble_runtime`]) — the runtime: [`Model`], [`Session`], [`Sampler`];
//! * `quantizer` ([`nibble_quantizer`]) — GPTQ and RTN over whole models into packed integer groups;
//! * [`capi`] — the C API declared in `include/nibble.h` (this crate also
//!   builds as `libnibble.a` / `libnibble.so`).
//!
//! The examples below run for real on the models in `../shared/models`
//! (`$NIBBLE_SHARED` overrides the location).
//!
//! ## Load and generate
//!
//! A model is loaded once (a `.nib` is memory-mapped; a Hugging Face folder
//! or GGUF file is converted in memory) and shared through an [`Arc`](std::sync::Arc)
//! by any number of [`Session`]s, each holding its own KV cache.
//!
//! ```
//! use std::sync::Arc;
//! use nibble::{GenerateParams, Model, Sampler, SamplerParams, Session, SessionParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let shared = std::env::var("NIBBLE_SHARED").unwrap_or_else(|_| "../shared".into());
//! let model = Arc::new(Model::load(format!("{shared}/models/stories260k"))?);
//! let params = SessionParams { n_ctx: 256, n_threads: 1, ..Default::default() };
//! let mut session = Session::new(model.clone(), &params)?;
//! let prompt = model.tokenizer()?.encode("Once upon a time", true)?;
//! let mut sampler = Sampler::new(SamplerParams::greedy(), model.hparams.n_vocab)?;
//! let gen = GenerateParams { max_tokens: 20, ..Default::default() };
//! let out = session.generate(&prompt, &gen, &mut sampler, |_, _| true)?;
//! assert!(out.text.starts_with(", there was a little girl named Lily"));
//! assert_eq!(out.generated_tokens, 20);
//! # Ok(())
//! # }
//! ```
//!
//! ## Stream, stop, sample
//!
//! The callback receives each token's text as soon as it is complete UTF-8
//! (and cannot still turn into a stop string); returning `false` stops.
//! Sampling is seeded, so a run is reproducible.
//!
//! ```
//! use std::sync::Arc;
//! use nibble::{GenerateParams, Model, Sampler, SamplerParams, Session, SessionParams, StopReason};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let shared = std::env::var("NIBBLE_SHARED").unwrap_or_else(|_| "../shared".into());
//! let model = Arc::new(Model::load(format!("{shared}/models/stories260k"))?);
//! let mut session = Session::new(model.clone(), &SessionParams { n_threads: 1, ..Default::default() })?;
//! let sampling = SamplerParams { temperature: 0.8, top_k: 40, seed: 7, ..Default::default() };
//! let mut sampler = Sampler::new(sampling, model.hparams.n_vocab)?;
//! let gen = GenerateParams {
//!     max_tokens: 200,
//!     stop_strings: vec![".".into()], // stop at the end of the first sentence
//!     ..Default::default()
//! };
//! let mut streamed = String::new();
//! let bos = model.bos_id.expect("stories260k has BOS");
//! let out = session.generate(&[bos], &gen, &mut sampler, |_token, text| {
//!     streamed.push_str(text); // e.g. print!("{text}")
//!     true
//! })?;
//! assert_eq!(out.stop, StopReason::StopString);
//! assert_eq!(streamed, out.text);
//! assert!(!out.text.contains('.'));
//! # Ok(())
//! # }
//! ```
//!
//! ## Quantize
//!
//! RTN needs no calibration; GPTQ (`Method::Gptq`) takes calibration windows
//! ([`quantizer::calib::calibration_windows`]). The output is written to a
//! temporary file and renamed only when complete.
//!
//! ```
//! use std::sync::Arc;
//! use nibble::format::import::{open_any, ImportOptions};
//! use nibble::format::AtomicFile;
//! use nibble::quantizer::{quantize_model, QuantizeOptions};
//! use nibble::{Model, Session, SessionParams};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let shared = std::env::var("NIBBLE_SHARED").unwrap_or_else(|_| "../shared".into());
//! # let dir = std::env::temp_dir().join(format!("nibble-doctest-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let float = open_any(
//!     format!("{shared}/models/stories260k").as_ref(),
//!     &ImportOptions::default(),
//!     &mut |_, _, _| {},
//! )?;
//! let opts = QuantizeOptions::rtn(4, Some(32), false); // 4-bit, groups of 32, asymmetric
//! let out_path = dir.join("stories260k-q4.nib");
//! let out = AtomicFile::create(&out_path)?;
//! let (out, reports, _timings) =
//!     quantize_model(&float.view()?, &opts, None, out, &mut |_done, _total, _layer| {})?;
//! out.commit()?;
//! assert_eq!(reports.len(), 5 * 7); // every linear layer of the 5 blocks
//!
//! let model = Arc::new(Model::load(&out_path)?);
//! let mut session = Session::new(model.clone(), &SessionParams { n_threads: 1, ..Default::default() })?;
//! let logits = session.eval(&[model.bos_id.unwrap()])?;
//! assert_eq!(logits.len(), model.hparams.n_vocab);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

pub mod capi;

pub use nibble_format as format;
pub use nibble_quantizer as quantizer;
pub use nibble_runtime as runtime;
pub use nibble_runtime::{
    ChatMessage, GenerateParams, GenerationStats, KvType, Model, PoolKind, PrefillKind,
    RuntimeError, Sampler, SamplerParams, Session, SessionParams, StopReason,
};
