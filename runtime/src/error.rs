//! The runtime's typed error.

use nibble_format::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{model}: tensor '{name}' has shape {found:?}, expected {expected:?}")]
    TensorShape {
        model: String,
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("{model}: tensor '{name}' has dtype {found}, expected {expected}")]
    TensorDtype {
        model: String,
        name: String,
        expected: &'static str,
        found: String,
    },
    #[error("{model}: missing tensor '{name}'")]
    MissingTensor { model: String, name: String },
    #[error("context overflow: {needed} tokens do not fit in the context of {n_ctx} tokens")]
    ContextOverflow { needed: usize, n_ctx: usize },
    #[error("token id {id} is out of range (vocabulary has {n_vocab} tokens)")]
    BadToken { id: u32, n_vocab: usize },
    #[error(
        "{model}: no tokenizer: a .nib carries the tokenizer.json of the folder it was \
         converted from, and a GGUF file reads the tokenizer.json beside it"
    )]
    NoTokenizer { model: String },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("{model}: this model has no chat template")]
    NoChatTemplate { model: String },
    #[error("chat template error: {0}")]
    Template(#[from] minijinja::Error),
    #[error(
        "{model}: the model produced non-finite logits (NaN or infinity) at position {pos}; \
         its weights are probably damaged (check the file with `nibble inspect --verify`)"
    )]
    NonFiniteLogits { model: String, pos: usize },
    #[error("LoRA adapter: {0}")]
    Lora(String),
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    #[error("could not start the thread pool: {0}")]
    ThreadPool(#[from] rayon::ThreadPoolBuildError),
    #[error("cannot start the worker threads: {0}")]
    Threads(#[source] std::io::Error),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
