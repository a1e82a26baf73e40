//! The C API: what `include/nibble.h` declares (generated from this file by
//! cbindgen; `tests/header.rs` fails when the checked-in header is stale).
//!
//! Why it looks the way it does: C callers cannot see Rust errors, lifetimes
//! or panics, so every function here
//! * takes plain C types (opaque handles, `#[repr(C)]` parameter structs with
//!   `nibble_*_default_params()` constructors, pointer + length buffers);
//! * returns a [`nibble_status`] and writes its result through an out-pointer
//!   (only on success);
//! * records a human-readable message, retrievable with [`nibble_last_error`]
//!   on the same thread, whenever it fails;
//! * runs its body under `catch_unwind`, so a Rust panic becomes
//!   `NIBBLE_ERR_PANIC` instead of unwinding into C (undefined behaviour).
//!
//! This module is the FFI boundary, so it is (with the kernels and the mmap
//! opener) one of the places where `unsafe` lives: every dereference of a
//! caller's pointer happens in one of the small helpers below, each with its
//! `// SAFETY:` comment relying on the contract stated in the header.
//!
//! Thread safety: a [`nibble_model`] is immutable after load and may be used
//! by any number of threads and sessions at once; a [`nibble_session`] or a
//! [`nibble_sampler`] must be used by one thread at a time (it may move
//! between threads).
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nibble_format::{keys, FormatError};
use nibble_runtime::kernels::Kernels;
use nibble_runtime::{
    GenerateParams, Model, RuntimeError, Sampler, SamplerParams, Session, SessionParams, StopReason,
};

/// What a call returned. `NIBBLE_OK` is zero; on any other value
/// `nibble_last_error()` describes the failure.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum nibble_status {
    NIBBLE_OK = 0,
    /// A null pointer where one is not allowed, an out-of-range value, a
    /// token id outside the vocabulary, or invalid UTF-8.
    NIBBLE_ERR_INVALID_ARGUMENT = 1,
    /// A file could not be opened or read (missing, permissions).
    NIBBLE_ERR_IO = 2,
    /// A file is corrupt, truncated, or not a model nibble can run.
    NIBBLE_ERR_FORMAT = 3,
    /// The tokens do not fit in the session's context.
    NIBBLE_ERR_CONTEXT_OVERFLOW = 4,
    /// The model has no tokenizer, or the tokenizer failed.
    NIBBLE_ERR_TOKENIZER = 5,
    /// An output buffer is too small; the required size was written to the
    /// size out-pointer.
    NIBBLE_ERR_BUFFER_TOO_SMALL = 6,
    /// A bug inside nibble (a Rust panic, caught at the boundary).
    NIBBLE_ERR_PANIC = 7,
    /// The operating system refused a resource (threads).
    NIBBLE_ERR_INTERNAL = 8,
}

use nibble_status::*;

/// Why `nibble_generate` stopped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum nibble_stop_reason {
    /// The model produced an end-of-sequence token (not emitted).
    NIBBLE_STOP_EOS = 0,
    /// `max_tokens` tokens were generated.
    NIBBLE_STOP_MAX_TOKENS = 1,
    /// A stop string appeared (the text before it was emitted).
    NIBBLE_STOP_STRING = 2,
    /// The context is full.
    NIBBLE_STOP_CONTEXT_FULL = 3,
    /// The callback returned false.
    NIBBLE_STOP_CALLBACK = 4,
}

/// A loaded model (opaque). Immutable: share it between threads freely.
pub struct nibble_model {
    model: Arc<Model>,
    architecture: CString,
    quantization: CString,
    name: CString,
}

/// One conversation's run state: KV cache, logits, worker threads (opaque).
/// Use from one thread at a time.
pub struct nibble_session {
    session: Session,
    /// NUL-terminated copy of the latest streamed text, reused per token.
    text: Vec<u8>,
}

/// A seeded token sampler (opaque). Use from one thread at a time.
pub struct nibble_sampler {
    sampler: Sampler,
    n_vocab: usize,
}

/// Options of `nibble_model_load`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nibble_model_params {
    /// Verify every tensor's CRC32 while loading (reads the whole file).
    pub verify_checksums: bool,
    /// Force an instruction set: "scalar", "avx2", "avx512", "neon",
    /// "neondot"; NULL = the best this CPU has (or `$NIBBLE_ISA`).
    pub isa: *const c_char,
}

/// Options of `nibble_session_new`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nibble_session_params {
    /// Context length in tokens; 0 = the model's trained context (at most 4096).
    pub n_ctx: u32,
    /// Worker threads; 0 = one per core.
    pub n_threads: u32,
    /// Prompt tokens evaluated together as matrix-matrix products (≥ 1).
    pub n_batch: u32,
}

/// Options of `nibble_sampler_new`. The defaults are greedy decoding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nibble_sampler_params {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: u32,
    /// Keep the smallest set whose probability reaches top_p (1 = off).
    pub top_p: f32,
    /// Drop tokens below min_p × p(most likely) (0 = off).
    pub min_p: f32,
    /// Penalty on recently seen tokens (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: u32,
    pub seed: u64,
}

/// Options of `nibble_generate`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nibble_generate_params {
    /// Stop after this many generated tokens.
    pub max_tokens: u32,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// `n_stop_strings` NUL-terminated UTF-8 strings (may be NULL when 0):
    /// generation stops when one appears; the text before it is emitted.
    pub stop_strings: *const *const c_char,
    pub n_stop_strings: usize,
}

/// What `nibble_generate` did.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nibble_generate_result {
    pub n_prompt_tokens: u32,
    pub n_generated_tokens: u32,
    pub stop_reason: nibble_stop_reason,
    /// Wall time of the prompt and of the generation, in seconds.
    pub prompt_seconds: f64,
    pub generate_seconds: f64,
}

/// What `nibble_model_get_info` reports. The strings belong to the model and
/// stay valid until `nibble_model_free`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nibble_model_info {
    /// "llama".
    pub architecture: *const c_char,
    /// How the weights are stored, e.g. "F32", "gguf-blocks",
    /// "gptq Q4G 4-bit g128 asym act-order".
    pub quantization: *const c_char,
    /// The path it was loaded from.
    pub name: *const c_char,
    pub n_vocab: u32,
    /// Context length the model was trained for.
    pub n_ctx_train: u32,
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ff: u32,
    /// Parameters in all tensors.
    pub n_params: u64,
    /// Bytes of weights streamed per generated token.
    pub weight_bytes: u64,
    /// Beginning-of-sequence token, or -1.
    pub bos_id: i32,
    /// First end-of-sequence token, or -1.
    pub eos_id: i32,
    /// Whether a tokenizer is embedded (needed by tokenize/detokenize/generate).
    pub has_tokenizer: bool,
    /// The instruction set the kernels use ("avx512", "avx2", "neon", ...).
    pub isa: *const c_char,
}

/// Called by `nibble_generate` once per generated token with the text it
/// completes (`text` is NUL-terminated, `text_len` bytes of UTF-8, possibly
/// empty while a multi-byte character or a possible stop string is pending;
/// valid only during the call). Return false to stop generation.
pub type nibble_token_callback = Option<
    unsafe extern "C" fn(
        token: u32,
        text: *const c_char,
        text_len: usize,
        user_data: *mut c_void,
    ) -> bool,
>;

// ---------------------------------------------------------------------------
// Errors, panics and pointer checks.

/// A failure on its way to C: the status and the message for `nibble_last_error`.
struct Failure {
    status: nibble_status,
    message: String,
}

type CResult<T> = Result<T, Failure>;

fn fail(status: nibble_status, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
    }
}

fn format_status(e: &FormatError) -> nibble_status {
    match e {
        FormatError::Io { .. } => NIBBLE_ERR_IO,
        FormatError::InFile { source, .. } => format_status(source),
        _ => NIBBLE_ERR_FORMAT,
    }
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Failure {
        let status = match &e {
            RuntimeError::Format(f) => format_status(f),
            RuntimeError::TensorShape { .. }
            | RuntimeError::TensorDtype { .. }
            | RuntimeError::MissingTensor { .. } => NIBBLE_ERR_FORMAT,
            RuntimeError::ContextOverflow { .. } => NIBBLE_ERR_CONTEXT_OVERFLOW,
            RuntimeError::BadToken { .. } | RuntimeError::InvalidParam(_) => {
                NIBBLE_ERR_INVALID_ARGUMENT
            }
            RuntimeError::NoTokenizer { .. } | RuntimeError::Tokenizer(_) => NIBBLE_ERR_TOKENIZER,
            RuntimeError::NoChatTemplate { .. } | RuntimeError::Template(_) => NIBBLE_ERR_FORMAT,
            RuntimeError::Lora(_) => NIBBLE_ERR_INVALID_ARGUMENT,
            RuntimeError::ThreadPool(_) | RuntimeError::Threads(_) => NIBBLE_ERR_INTERNAL,
            // The enum may grow: anything new is reported, not hidden.
            #[allow(unreachable_patterns)]
            _ => NIBBLE_ERR_INTERNAL,
        };
        Failure {
            status,
            message: e.to_string(),
        }
    }
}

thread_local! {
    /// The message of this thread's latest failed call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs would truncate the C string; show them instead.
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Run `body` at the boundary: its result becomes a status code, its error
/// (or panic) the thread's last error.
fn boundary(body: impl FnOnce() -> CResult<()>) -> nibble_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => NIBBLE_OK,
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "internal error (a bug in nibble, please report it): {what}"
            ));
            NIBBLE_ERR_PANIC
        }
    }
}

fn null(what: &str) -> Failure {
    fail(NIBBLE_ERR_INVALID_ARGUMENT, format!("{what} is NULL"))
}

/// Borrow a caller's object.
///
/// # Safety
/// `p` is null or points to a valid, live `T` not mutated during the borrow.
unsafe fn borrow<'a, T>(p: *const T, what: &str) -> CResult<&'a T> {
    // SAFETY: the caller's contract (header): non-null pointers are valid.
    unsafe { p.as_ref() }.ok_or_else(|| null(what))
}

/// Borrow a caller's object mutably.
///
/// # Safety
/// `p` is null or points to a valid, live `T` that nothing else uses during
/// the borrow (the header's one-thread-at-a-time rule).
unsafe fn borrow_mut<'a, T>(p: *mut T, what: &str) -> CResult<&'a mut T> {
    // SAFETY: as above, plus exclusive use per the header.
    unsafe { p.as_mut() }.ok_or_else(|| null(what))
}

/// Borrow `len` elements at `p` (`p` may be null when `len` is 0).
///
/// # Safety
/// When `len > 0`, `p` points to `len` initialized `T`s.
unsafe fn borrow_slice<'a, T>(p: *const T, len: usize, what: &str) -> CResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(fail(
            NIBBLE_ERR_INVALID_ARGUMENT,
            format!("{what}: length {len} is too large"),
        ));
    }
    // SAFETY: non-null, `len` elements per the caller's contract, size checked.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Borrow a NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
unsafe fn borrow_str<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| fail(NIBBLE_ERR_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

/// Write a result through an out-pointer.
///
/// # Safety
/// `p` is null or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, value: T, what: &str) -> CResult<()> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null and writable per the caller's contract; `write` does
    // not drop the (possibly uninitialized) old value.
    unsafe { p.write(value) };
    Ok(())
}

/// The caller's parameter struct, or `default()` when `p` is NULL.
///
/// # Safety
/// `p` is null or points to a valid `T`.
unsafe fn params_or<T: Copy>(p: *const T, default: extern "C" fn() -> T) -> CResult<T> {
    if p.is_null() {
        Ok(default())
    } else {
        // SAFETY: non-null, hence valid per the caller's contract.
        Ok(*unsafe { borrow(p, "params") }?)
    }
}

/// Move `value` to the heap and hand its pointer to the caller, who owns it
/// from now on (freed by the matching `nibble_*_free`).
///
/// # Safety
/// As [`put`]: `out` is null or valid for a write.
unsafe fn put_handle<T>(out: *mut *mut T, value: T, what: &str) -> CResult<()> {
    need(out, what)?;
    // SAFETY: `out` is non-null (checked) and writable per the contract.
    unsafe { put(out, Box::into_raw(Box::new(value)), what) }
}

/// Check an out-pointer before heavy work, so a NULL fails fast.
fn need<T>(p: *mut T, what: &str) -> CResult<()> {
    if p.is_null() {
        Err(null(what))
    } else {
        Ok(())
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// "F32", "gguf-blocks", "gptq Q4G 4-bit g128 asym act-order head 8-bit", ...
fn describe_quantization(model: &Model) -> String {
    let Ok(view) = model.file().view() else {
        return "unknown".into();
    };
    let m = &view.metadata;
    let s = |k: &str| m.opt_str(k).ok().flatten().map(str::to_string);
    let u = |k: &str| m.opt_u64(k).ok().flatten();
    let b = |k: &str| m.opt_bool(k).ok().flatten().unwrap_or(false);
    let dtype = s(keys::QUANT_DTYPE).unwrap_or_else(|| "unknown".into());
    match s(keys::QUANT_METHOD).as_deref() {
        None | Some("none") => dtype,
        Some(method @ ("rtn" | "gptq")) => {
            let mut d = format!("{method} {dtype}");
            if let Some(bits) = u(keys::QUANT_BITS) {
                d += &format!(" {bits}-bit");
            }
            match u(keys::QUANT_GROUP_SIZE) {
                Some(0) | None => d += " per-row",
                Some(g) => d += &format!(" g{g}"),
            }
            d += if b(keys::QUANT_SYM) { " sym" } else { " asym" };
            if b(keys::QUANT_ACT_ORDER) {
                d += " act-order";
            }
            if let Some(h) = u(keys::QUANT_HEAD_BITS) {
                d += &format!(" head {h}-bit");
            }
            d
        }
        Some(other) => other.to_string(),
    }
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Library.

/// The library version, e.g. "0.1.0" (static string, never freed).
#[no_mangle]
pub extern "C" fn nibble_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the latest failed call on this thread ("" if none). Valid
/// until the next failing call on this thread; never freed by the caller.
#[no_mangle]
pub extern "C" fn nibble_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A static description of a status code, e.g. "context overflow".
#[no_mangle]
pub extern "C" fn nibble_status_string(status: nibble_status) -> *const c_char {
    let s: &'static str = match status {
        NIBBLE_OK => "ok\0",
        NIBBLE_ERR_INVALID_ARGUMENT => "invalid argument\0",
        NIBBLE_ERR_IO => "I/O error\0",
        NIBBLE_ERR_FORMAT => "bad model file\0",
        NIBBLE_ERR_CONTEXT_OVERFLOW => "context overflow\0",
        NIBBLE_ERR_TOKENIZER => "tokenizer error\0",
        NIBBLE_ERR_BUFFER_TOO_SMALL => "buffer too small\0",
        NIBBLE_ERR_PANIC => "internal error (panic)\0",
        NIBBLE_ERR_INTERNAL => "internal error\0",
    };
    s.as_ptr().cast()
}

// ---------------------------------------------------------------------------
// Model.

/// Default model options: no checksum pass, the best instruction set.
#[no_mangle]
pub extern "C" fn nibble_model_default_params() -> nibble_model_params {
    nibble_model_params {
        verify_checksums: false,
        isa: std::ptr::null(),
    }
}

/// Load a model: a `.nib` file is memory-mapped (zero-copy); a Hugging Face
/// folder or a GGUF file is converted to F32 in memory. `params` may be NULL
/// (defaults). On success `*out_model` owns the model: free it with
/// `nibble_model_free`.
///
/// # Safety
/// `path` is a NUL-terminated string; `params` is NULL or valid; `out_model`
/// is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nibble_model_load(
    path: *const c_char,
    params: *const nibble_model_params,
    out_model: *mut *mut nibble_model,
) -> nibble_status {
    boundary(|| {
        // SAFETY (all helpers): per this function's contract.
        let path = unsafe { borrow_str(path, "path") }?;
        need(out_model, "out_model")?;
        let params = unsafe { params_or(params, nibble_model_default_params) }?;
        let kernels = if params.isa.is_null() {
            None
        } else {
            let isa = unsafe { borrow_str(params.isa, "params.isa") }?;
            Some(
                Kernels::named(isa)
                    .map_err(|m| fail(NIBBLE_ERR_INVALID_ARGUMENT, format!("params.isa: {m}")))?,
            )
        };
        let mut model = Model::load(path)?;
        if params.verify_checksums {
            model
                .file()
                .view()
                .and_then(|v| v.verify_checksums())
                .map_err(|e| fail(format_status(&e), format!("{path}: {e}")))?;
        }
        if let Some(k) = kernels {
            model.set_kernels(k);
        }
        let handle = nibble_model {
            architecture: cstring(&model.hparams.arch),
            quantization: cstring(&describe_quantization(&model)),
            name: cstring(model.name()),
            model: Arc::new(model),
        };
        unsafe { put_handle(out_model, handle, "out_model") }
    })
}

/// Free a model (NULL is ignored). Sessions created from it keep the weights
/// alive until they are freed too.
///
/// # Safety
/// `model` is NULL or a handle from `nibble_model_load`, not freed before
/// and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn nibble_model_free(model: *mut nibble_model) {
    if !model.is_null() {
        // SAFETY: a Box from nibble_model_load, freed once per the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// Describe a model.
///
/// # Safety
/// `model` is NULL or a live model handle; `out_info` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nibble_model_get_info(
    model: *const nibble_model,
    out_info: *mut nibble_model_info,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let h = unsafe { borrow(model, "model") }?;
        let m = &h.model;
        let hp = &m.hparams;
        let n_params = m
            .file()
            .view()
            .map(|v| v.tensors.iter().map(|t| t.n_elements()).sum())
            .unwrap_or(0);
        let id = |x: Option<u32>| x.and_then(|v| i32::try_from(v).ok()).unwrap_or(-1);
        let isa: &'static str = match m.kernels().isa.name() {
            "scalar" => "scalar\0",
            "avx2" => "avx2\0",
            "avx512" => "avx512\0",
            "neon" => "neon\0",
            "neondot" => "neondot\0",
            _ => "other\0",
        };
        let info = nibble_model_info {
            architecture: h.architecture.as_ptr(),
            quantization: h.quantization.as_ptr(),
            name: h.name.as_ptr(),
            n_vocab: u32_of(hp.n_vocab),
            n_ctx_train: u32_of(hp.n_ctx_train),
            n_embd: u32_of(hp.n_embd),
            n_layer: u32_of(hp.n_layer),
            n_head: u32_of(hp.n_head),
            n_head_kv: u32_of(hp.n_head_kv),
            n_ff: u32_of(hp.n_ff),
            n_params,
            weight_bytes: m.weight_bytes() as u64,
            bos_id: id(m.bos_id),
            eos_id: id(m.eos_ids.first().copied()),
            has_tokenizer: m.has_tokenizer(),
            isa: isa.as_ptr().cast(),
        };
        unsafe { put(out_info, info, "out_info") }
    })
}

/// Text → token ids. Writes up to `capacity` ids to `tokens` and the count
/// to `*out_n_tokens`; when `capacity` is too small, returns
/// `NIBBLE_ERR_BUFFER_TOO_SMALL` with the needed count in `*out_n_tokens`
/// (`tokens` may then be NULL: call with capacity 0 to size the buffer).
/// `add_special` adds the model's BOS token.
///
/// # Safety
/// `text` points to `text_len` bytes (or is NULL when 0); `tokens` has room
/// for `capacity` ids; `out_n_tokens` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nibble_tokenize(
    model: *const nibble_model,
    text: *const c_char,
    text_len: usize,
    add_special: bool,
    tokens: *mut u32,
    capacity: usize,
    out_n_tokens: *mut usize,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let h = unsafe { borrow(model, "model") }?;
        let bytes = unsafe { borrow_slice(text.cast::<u8>(), text_len, "text") }?;
        need(out_n_tokens, "out_n_tokens")?;
        let text = std::str::from_utf8(bytes).map_err(|e| {
            fail(
                NIBBLE_ERR_INVALID_ARGUMENT,
                format!("text is not UTF-8: {e}"),
            )
        })?;
        let ids = h.model.tokenizer()?.encode(text, add_special)?;
        unsafe { put(out_n_tokens, ids.len(), "out_n_tokens") }?;
        if ids.len() > capacity {
            return Err(fail(
                NIBBLE_ERR_BUFFER_TOO_SMALL,
                format!(
                    "the text has {} tokens but the buffer holds {capacity}",
                    ids.len()
                ),
            ));
        }
        if !ids.is_empty() {
            if tokens.is_null() {
                return Err(null("tokens"));
            }
            // SAFETY: `tokens` has room for capacity ≥ ids.len() ids.
            unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), tokens, ids.len()) };
        }
        Ok(())
    })
}

/// Token ids → UTF-8 text, NUL-terminated. Writes the text's length
/// (without the NUL) to `*out_len`; when `capacity` cannot hold it plus the
/// NUL, returns `NIBBLE_ERR_BUFFER_TOO_SMALL` with the needed length in
/// `*out_len` (`buf` may then be NULL).
///
/// # Safety
/// `tokens` points to `n_tokens` ids (or is NULL when 0); `buf` has room
/// for `capacity` bytes; `out_len` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nibble_detokenize(
    model: *const nibble_model,
    tokens: *const u32,
    n_tokens: usize,
    skip_special: bool,
    buf: *mut c_char,
    capacity: usize,
    out_len: *mut usize,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let h = unsafe { borrow(model, "model") }?;
        let ids = unsafe { borrow_slice(tokens, n_tokens, "tokens") }?;
        need(out_len, "out_len")?;
        let n_vocab = h.model.hparams.n_vocab;
        if let Some(&id) = ids.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(RuntimeError::BadToken { id, n_vocab }.into());
        }
        let text = h.model.tokenizer()?.decode(ids, skip_special)?;
        unsafe { put(out_len, text.len(), "out_len") }?;
        if text.len() >= capacity {
            return Err(fail(
                NIBBLE_ERR_BUFFER_TOO_SMALL,
                format!(
                    "the text needs {} bytes plus the NUL but the buffer holds {capacity}",
                    text.len()
                ),
            ));
        }
        if buf.is_null() {
            return Err(null("buf"));
        }
        // SAFETY: `buf` has room for capacity > text.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
            buf.add(text.len()).write(0);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Session.

/// Default session options: the trained context (≤ 4096), all cores, prompt
/// batches of 128.
#[no_mangle]
pub extern "C" fn nibble_session_default_params() -> nibble_session_params {
    let d = SessionParams::default();
    nibble_session_params {
        n_ctx: u32_of(d.n_ctx),
        n_threads: u32_of(d.n_threads),
        n_batch: u32_of(d.n_batch),
    }
}

/// Create a session (its KV cache and buffers are allocated here, once).
/// `params` may be NULL (defaults). Free it with `nibble_session_free`.
///
/// # Safety
/// `model` is NULL or a live model handle; `params` is NULL or valid;
/// `out_session` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_new(
    model: *const nibble_model,
    params: *const nibble_session_params,
    out_session: *mut *mut nibble_session,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let h = unsafe { borrow(model, "model") }?;
        need(out_session, "out_session")?;
        let p = unsafe { params_or(params, nibble_session_default_params) }?;
        let sp = SessionParams {
            n_ctx: p.n_ctx as usize,
            n_threads: p.n_threads as usize,
            n_batch: p.n_batch as usize,
            ..SessionParams::default()
        };
        let session = Session::new(Arc::clone(&h.model), &sp)?;
        let handle = nibble_session {
            session,
            text: Vec::with_capacity(256),
        };
        unsafe { put_handle(out_session, handle, "out_session") }
    })
}

/// Free a session and its worker threads (NULL is ignored).
///
/// # Safety
/// `session` is NULL or a handle from `nibble_session_new`, not freed before
/// and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_free(session: *mut nibble_session) {
    if !session.is_null() {
        // SAFETY: a Box from nibble_session_new, freed once per the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(session) })));
    }
}

/// Evaluate `n_tokens` tokens after those already in the KV cache; afterwards
/// `nibble_session_logits` gives the next-token logits. One token takes the
/// matrix-vector path (no allocation); several run as matrix-matrix products.
/// Fails with `NIBBLE_ERR_CONTEXT_OVERFLOW` (nothing evaluated) when they do
/// not fit.
///
/// # Safety
/// `session` is NULL or a live session; `tokens` points to `n_tokens` ids.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_eval(
    session: *mut nibble_session,
    tokens: *const u32,
    n_tokens: usize,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { borrow_mut(session, "session") }?;
        let ids = unsafe { borrow_slice(tokens, n_tokens, "tokens") }?;
        s.session.eval(ids)?;
        Ok(())
    })
}

/// The logits after the last evaluated token: `*out_n_vocab` floats at
/// `*out_logits`, owned by the session, valid until its next eval, generate,
/// reset or free.
///
/// # Safety
/// `session` is NULL or a live session; the out-pointers are valid for writes.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_logits(
    session: *const nibble_session,
    out_logits: *mut *const f32,
    out_n_vocab: *mut usize,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { borrow(session, "session") }?;
        need(out_logits, "out_logits")?;
        need(out_n_vocab, "out_n_vocab")?;
        if s.session.tokens().is_empty() {
            return Err(fail(
                NIBBLE_ERR_INVALID_ARGUMENT,
                "no logits yet: evaluate at least one token first",
            ));
        }
        let logits = s.session.logits();
        unsafe { put(out_logits, logits.as_ptr(), "out_logits") }?;
        unsafe { put(out_n_vocab, logits.len(), "out_n_vocab") }
    })
}

/// Tokens in the KV cache (`*out_n_past`) and its capacity (`*out_n_ctx`);
/// either out-pointer may be NULL.
///
/// # Safety
/// `session` is NULL or a live session; non-null out-pointers are writable.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_state(
    session: *const nibble_session,
    out_n_past: *mut usize,
    out_n_ctx: *mut usize,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { borrow(session, "session") }?;
        if !out_n_past.is_null() {
            unsafe { put(out_n_past, s.session.tokens().len(), "out_n_past") }?;
        }
        if !out_n_ctx.is_null() {
            unsafe { put(out_n_ctx, s.session.n_ctx(), "out_n_ctx") }?;
        }
        Ok(())
    })
}

/// Empty the KV cache (start a new conversation; nothing is freed).
///
/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_reset(session: *mut nibble_session) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { borrow_mut(session, "session") }?.session.reset();
        Ok(())
    })
}

/// Attach the PEFT LoRA adapter in folder `path` (`adapter_config.json` +
/// `adapter_model.safetensors`) to the session as `name`, at `scale` (1 =
/// as trained). Later tokens compute W·x + scale · alpha/r · B·(A·x) for
/// the layers it adapts; the model's weights are untouched and shared.
/// Checked against the model first: on error nothing changes. Tokens
/// already in the KV cache keep what they were computed with
/// (`nibble_session_reset` to recompute).
///
/// # Safety
/// `session` is NULL or a live session; `name` and `path` are NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_lora_add(
    session: *mut nibble_session,
    name: *const c_char,
    path: *const c_char,
    scale: f32,
) -> nibble_status {
    boundary(|| {
        // SAFETY (all helpers): per this function's contract.
        let s = unsafe { borrow_mut(session, "session") }?;
        let name = unsafe { borrow_str(name, "name") }?;
        let path = unsafe { borrow_str(path, "path") }?;
        let spec = nibble_format::lora::LoraSpec {
            path: path.into(),
            scale,
        };
        if !scale.is_finite() {
            return Err(fail(
                NIBBLE_ERR_INVALID_ARGUMENT,
                format!("LoRA scale {scale} is not finite"),
            ));
        }
        s.session.add_lora(name, &spec)?;
        Ok(())
    })
}

/// Set attached adapter `name`'s scale (0 switches it off, kept attached).
///
/// # Safety
/// `session` is NULL or a live session; `name` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_lora_scale(
    session: *mut nibble_session,
    name: *const c_char,
    scale: f32,
) -> nibble_status {
    boundary(|| {
        // SAFETY (all helpers): per this function's contract.
        let s = unsafe { borrow_mut(session, "session") }?;
        let name = unsafe { borrow_str(name, "name") }?;
        s.session.set_lora_scale(name, scale)?;
        Ok(())
    })
}

/// Detach adapter `name` (its memory is freed).
///
/// # Safety
/// `session` is NULL or a live session; `name` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_lora_remove(
    session: *mut nibble_session,
    name: *const c_char,
) -> nibble_status {
    boundary(|| {
        // SAFETY (all helpers): per this function's contract.
        let s = unsafe { borrow_mut(session, "session") }?;
        let name = unsafe { borrow_str(name, "name") }?;
        s.session.remove_lora(name)?;
        Ok(())
    })
}

/// Keep only the first `n_keep` tokens of the KV cache (e.g. to regenerate
/// from a point). `n_keep` larger than the cache is an error.
///
/// # Safety
/// `session` is NULL or a live session.
#[no_mangle]
pub unsafe extern "C" fn nibble_session_truncate(
    session: *mut nibble_session,
    n_keep: usize,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { borrow_mut(session, "session") }?;
        let n_past = s.session.tokens().len();
        if n_keep > n_past {
            return Err(fail(
                NIBBLE_ERR_INVALID_ARGUMENT,
                format!("cannot keep {n_keep} tokens: the cache holds {n_past}"),
            ));
        }
        s.session.truncate(n_keep);
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Sampling and generation.

/// Default sampler options: greedy (temperature 0); top-k 40, top-p 0.95,
/// min-p 0.05 once a temperature is set; no repetition penalty; seed 0.
#[no_mangle]
pub extern "C" fn nibble_sampler_default_params() -> nibble_sampler_params {
    let d = SamplerParams::default();
    nibble_sampler_params {
        temperature: d.temperature,
        top_k: u32_of(d.top_k),
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        repeat_last_n: u32_of(d.repeat_last_n),
        seed: d.seed,
    }
}

/// Create a sampler for `model`'s vocabulary (buffers allocated here, once).
/// Out-of-range parameters fail with `NIBBLE_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `model` is NULL or a live model; `params` is NULL (defaults) or valid;
/// `out_sampler` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nibble_sampler_new(
    model: *const nibble_model,
    params: *const nibble_sampler_params,
    out_sampler: *mut *mut nibble_sampler,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let h = unsafe { borrow(model, "model") }?;
        need(out_sampler, "out_sampler")?;
        let p = unsafe { params_or(params, nibble_sampler_default_params) }?;
        let n_vocab = h.model.hparams.n_vocab;
        let sampler = Sampler::new(
            SamplerParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.min_p,
                repeat_penalty: p.repeat_penalty,
                repeat_last_n: p.repeat_last_n as usize,
                seed: p.seed,
            },
            n_vocab,
        )?;
        let handle = nibble_sampler { sampler, n_vocab };
        unsafe { put_handle(out_sampler, handle, "out_sampler") }
    })
}

/// Free a sampler (NULL is ignored).
///
/// # Safety
/// `sampler` is NULL or a handle from `nibble_sampler_new`, not freed before
/// and not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn nibble_sampler_free(sampler: *mut nibble_sampler) {
    if !sampler.is_null() {
        // SAFETY: a Box from nibble_sampler_new, freed once per the contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(sampler) })));
    }
}

fn check_vocab(sampler: &nibble_sampler, session: &Session) -> CResult<()> {
    let n_vocab = session.model().hparams.n_vocab;
    if sampler.n_vocab != n_vocab {
        return Err(fail(
            NIBBLE_ERR_INVALID_ARGUMENT,
            format!(
                "the sampler was made for a vocabulary of {} tokens, the session's model has {n_vocab}",
                sampler.n_vocab
            ),
        ));
    }
    Ok(())
}

/// Pick the next token from the session's current logits (and, for the
/// repetition penalty, the tokens in its cache). Does not evaluate it.
///
/// # Safety
/// `sampler` and `session` are NULL or live handles; `out_token` is writable.
#[no_mangle]
pub unsafe extern "C" fn nibble_sampler_sample(
    sampler: *mut nibble_sampler,
    session: *const nibble_session,
    out_token: *mut u32,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let smp = unsafe { borrow_mut(sampler, "sampler") }?;
        let s = unsafe { borrow(session, "session") }?;
        need(out_token, "out_token")?;
        check_vocab(smp, &s.session)?;
        if s.session.tokens().is_empty() {
            return Err(fail(
                NIBBLE_ERR_INVALID_ARGUMENT,
                "no logits yet: evaluate at least one token first",
            ));
        }
        let t = smp.sampler.sample(s.session.logits(), s.session.tokens());
        unsafe { put(out_token, t, "out_token") }
    })
}

/// Default generation options: 256 tokens, stop at end-of-sequence, no stop strings.
#[no_mangle]
pub extern "C" fn nibble_generate_default_params() -> nibble_generate_params {
    nibble_generate_params {
        max_tokens: 256,
        ignore_eos: false,
        stop_strings: std::ptr::null(),
        n_stop_strings: 0,
    }
}

/// Evaluate `prompt` (may be empty to continue the cache), then generate
/// tokens with `sampler`, calling `callback` (may be NULL) with each
/// token's text; the callback returning false stops generation. The prompt
/// and the generated tokens stay in the KV cache, so a conversation goes on
/// with the next call (when generation stopped at the callback, a stop
/// string or a full context, the last token was not evaluated yet: pass it
/// as the next prompt's first token). `params` may be NULL (defaults);
/// `out_result` may be NULL.
///
/// # Safety
/// `session` and `sampler` are NULL or live handles; `prompt` points to
/// `n_prompt` ids; `params` is NULL or valid (with `n_stop_strings` valid
/// strings); `out_result` is NULL or writable; `callback` is NULL or safe to
/// call with `user_data`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn nibble_generate(
    session: *mut nibble_session,
    sampler: *mut nibble_sampler,
    prompt: *const u32,
    n_prompt: usize,
    params: *const nibble_generate_params,
    callback: nibble_token_callback,
    user_data: *mut c_void,
    out_result: *mut nibble_generate_result,
) -> nibble_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { borrow_mut(session, "session") }?;
        let smp = unsafe { borrow_mut(sampler, "sampler") }?;
        let prompt = unsafe { borrow_slice(prompt, n_prompt, "prompt") }?;
        let p = unsafe { params_or(params, nibble_generate_default_params) }?;
        let stops = unsafe { borrow_slice(p.stop_strings, p.n_stop_strings, "stop_strings") }?;
        let mut stop_strings = Vec::with_capacity(stops.len());
        for (i, &sp) in stops.iter().enumerate() {
            let s = unsafe { borrow_str(sp, &format!("stop_strings[{i}]")) }?;
            if s.is_empty() {
                return Err(fail(
                    NIBBLE_ERR_INVALID_ARGUMENT,
                    format!("stop_strings[{i}] is empty"),
                ));
            }
            stop_strings.push(s.to_string());
        }
        check_vocab(smp, &s.session)?;
        let gp = GenerateParams {
            max_tokens: p.max_tokens as usize,
            stop_strings,
            ignore_eos: p.ignore_eos,
        };
        let text = &mut s.text;
        let stats = s
            .session
            .generate(prompt, &gp, &mut smp.sampler, |token, delta| {
                let Some(cb) = callback else { return true };
                text.clear();
                text.extend_from_slice(delta.as_bytes());
                text.push(0);
                // SAFETY: the caller vouches for the callback; the text is a
                // NUL-terminated buffer that lives through the call.
                unsafe { cb(token, text.as_ptr().cast(), delta.len(), user_data) }
            })?;
        if !out_result.is_null() {
            let result = nibble_generate_result {
                n_prompt_tokens: u32_of(stats.prompt_tokens),
                n_generated_tokens: u32_of(stats.generated_tokens),
                stop_reason: match stats.stop {
                    StopReason::Eos => nibble_stop_reason::NIBBLE_STOP_EOS,
                    StopReason::MaxTokens => nibble_stop_reason::NIBBLE_STOP_MAX_TOKENS,
                    StopReason::StopString => nibble_stop_reason::NIBBLE_STOP_STRING,
                    StopReason::ContextFull => nibble_stop_reason::NIBBLE_STOP_CONTEXT_FULL,
                    StopReason::Callback => nibble_stop_reason::NIBBLE_STOP_CALLBACK,
                },
                prompt_seconds: stats.prompt_seconds,
                generate_seconds: stats.generate_seconds,
            };
            unsafe { put(out_result, result, "out_result") }?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads_as_documented() {
        fn shared<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shared::<nibble_model>();
        movable::<nibble_session>();
        movable::<nibble_sampler>();
    }

    #[test]
    fn panics_become_status_codes() {
        let st = boundary(|| panic!("boom"));
        assert_eq!(st, NIBBLE_ERR_PANIC);
        // SAFETY: nibble_last_error returns a valid NUL-terminated string.
        let msg = unsafe { CStr::from_ptr(nibble_last_error()) };
        assert!(msg.to_str().unwrap().contains("boom"), "{msg:?}");
    }
}
