//! `nibble-runtime`: runs decoder-only language models (every family the
//! block description covers) from `.nib` images.
//!
//! * [`Model`] maps the file and records where every weight lives; weights
//!   are used in place: F16/BF16 converted inside the dot products, packed
//!   integer groups (Q2G/Q3G/Q4G/Q8G/Q4GM) multiplied by int8 activation
//!   blocks in integer arithmetic, act-order permutations applied once per
//!   input. The kernels (scalar, AVX2, AVX-512 VNNI, NEON) are picked once at
//!   load ([`kernels::Kernels`], `NIBBLE_ISA`).
//! * Prompts run as matrix-matrix products through `gemm`
//!   ([`forward::forward_batch`]); single tokens as matrix-vector products
//!   split by rows over a persistent spin/park pool ([`forward::forward`]);
//!   several independent sequences decode in lockstep as one batch
//!   ([`forward::forward_slots`], the quantizer's self-generated calibration).
//! * [`Session`] owns a run state sized once from the config (KV cache
//!   included): evaluating or decoding a token allocates nothing.
//! * [`Sampler`] implements greedy, temperature, top-k, top-p, min-p and a
//!   repetition penalty with a seed.

pub mod block;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod forward;
pub mod kernels;
pub mod lora;
pub mod math;
pub mod model;
pub mod sampler;
pub mod session;
pub mod tokenizer;

pub use error::{Result, RuntimeError};
pub use forward::KvType;
pub use model::Model;
pub use sampler::{argmax, Sampler, SamplerParams};
pub use session::{
    GenerateParams, GenerationStats, PoolKind, PrefillKind, Session, SessionParams, StopReason,
};
pub use tokenizer::{render_chat, ChatMessage, TextStream, Tokenizer};
