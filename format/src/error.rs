//! The format crate's typed error. Every variant names what was being read so
//! that a user can tell which part of which file is wrong.

use std::path::PathBuf;

/// Errors from parsing, validating, writing or importing model files.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An error inside a specific file; wraps the underlying problem.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<FormatError>,
    },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {why}", path.display())]
    BadOutput { path: PathBuf, why: String },
    #[error("not a {expected} file (bad magic bytes {found:02x?})")]
    BadMagic {
        expected: &'static str,
        found: Vec<u8>,
    },
    #[error("unsupported {what} version {found} (this build reads {supported})")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: &'static str,
    },
    #[error("file truncated while reading {what}: needed {need} bytes at offset {offset}, only {have} available")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        have: u64,
    },
    #[error("{what} count {count} exceeds the limit of {max}")]
    CountTooLarge { what: String, count: u64, max: u64 },
    #[error("{what} (offset {offset}, length {len}) lies outside its region of {limit} bytes")]
    OutOfBounds {
        what: String,
        offset: u64,
        len: u64,
        limit: u64,
    },
    #[error("{a} overlaps {b}")]
    Overlap { a: String, b: String },
    #[error("{what} at offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        what: String,
        offset: u64,
        align: u64,
    },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: String },
    #[error("tensor '{name}' has unknown dtype code {code}")]
    UnknownDtype { name: String, code: u32 },
    #[error("tensor '{name}': shape {shape:?} of dtype {dtype} needs {expected} bytes but the directory says {found}")]
    ShapeMismatch {
        name: String,
        shape: Vec<u64>,
        dtype: String,
        expected: u64,
        found: u64,
    },
    #[error("tensor '{name}' has an invalid shape {shape:?}: {why}")]
    BadShape {
        name: String,
        shape: Vec<u64>,
        why: String,
    },
    #[error("duplicate {what} '{name}'")]
    Duplicate { what: &'static str, name: String },
    #[error("metadata key '{key}' has unknown value type {code}")]
    UnknownValueType { key: String, code: u32 },
    #[error("invalid value for '{key}': {why}")]
    BadValue { key: String, why: String },
    #[error("{what}: {len} unexpected trailing bytes")]
    TrailingBytes { what: String, len: u64 },
    #[error("checksum mismatch in tensor '{name}': stored {stored:08x}, computed {computed:08x}")]
    ChecksumMismatch {
        name: String,
        stored: u32,
        computed: u32,
    },
    #[error("checksum mismatch in the {section}: stored {stored:08x}, computed {computed:08x}")]
    SectionChecksumMismatch {
        section: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("missing metadata key '{key}'")]
    MissingKey { key: String },
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("missing tensor '{name}'")]
    MissingTensor { name: String },
    #[error("unsupported architecture '{arch}' (supported: llama, mistral)")]
    UnsupportedArchitecture { arch: String },
    #[error("unsupported tensor type {what} for tensor '{name}'")]
    UnsupportedTensorType { name: String, what: String },
    #[error("LoRA adapter: {why}")]
    BadLora { why: String },
    #[error("cannot export: {why}")]
    CannotExport { why: String },
    #[error("unsupported quantization: {what}")]
    UnsupportedQuantization { what: String },
    #[error("bad model config: {why}")]
    BadConfig { why: String },
    #[error("safetensors error: {0}")]
    SafeTensors(#[from] safetensors::SafeTensorError),
    #[error("JSON error in {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("this build only supports little-endian hosts")]
    BigEndianHost,
    #[error(
        "not a model: expected a .nib file (first bytes 89 4e 49 42 = \\x89NIB), a GGUF file \
         (47 47 55 46 = GGUF) or a Hugging Face model folder; {found}"
    )]
    UnknownInput { found: String },
}

impl FormatError {
    /// Attach the file path to an error (idempotent for already-attributed errors).
    pub fn in_file(self, path: impl Into<PathBuf>) -> FormatError {
        match self {
            e @ (FormatError::InFile { .. }
            | FormatError::Io { .. }
            | FormatError::BadOutput { .. }) => e,
            e => FormatError::InFile {
                path: path.into(),
                source: Box::new(e),
            },
        }
    }

    /// The innermost error (skipping `InFile` wrappers), for matching in tests and callers.
    pub fn root(&self) -> &FormatError {
        match self {
            FormatError::InFile { source, .. } => source.root(),
            e => e,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> FormatError {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;
