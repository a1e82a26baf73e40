//! `nibble-format`: the `.nib` single-file model format and the importers
//! that produce it.
//!
//! A `.nib` file holds everything needed to run a model — hyper-parameters,
//! the tokenizer, the chat template, quantization settings, provenance, and
//! the tensors — in one little-endian file whose tensor data is 64-byte
//! aligned, so it can be memory-mapped and used in place. `FORMAT.md` in this
//! crate specifies every byte.
//!
//! * [`NibView::parse`] validates a `&[u8]` and returns zero-copy views.
//! * [`NibWriter`] streams a file; [`AtomicFile`] makes the write crash-safe.
//! * [`NibFile`] owns a memory map (or an aligned buffer) and hands out views.
//! * [`gguf`] parses llama.cpp's GGUF; [`import`] converts GGUF or Hugging Face
//!   folders into `.nib`.

pub mod arch;
mod bytes;
pub mod dtype;
pub mod error;
pub mod export_gguf;
pub mod export_gptq;
pub mod families;
pub mod gguf;
pub mod gguf_arch;
pub mod gguf_blocks;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod gptq_checkpoint;
pub mod hparams;
pub mod import;
pub mod kquant_pack;
pub mod lora;
pub mod nib;
pub mod quant;
pub mod storage;

pub use arch::Architecture;
pub use dtype::DType;
pub use error::{FormatError, Result};
pub use hparams::{keys, HParams, TokenizerInfo};
pub use nib::{Metadata, MetadataBuilder, NibView, NibWriter, OwnedValue, TensorInfo, Value};
pub use storage::{AlignedBytes, AtomicFile, NibFile};
