//! Compute kernels and the table that picks them once per process.
//!
//! Decoding a token streams every weight once, so the matrix-vector products
//! decide generation speed. Each kernel exists as a portable scalar
//! reference and, where it pays, as AVX2, AVX-512 (VNNI) and NEON versions
//! with the same signature in the same module ([`float`], [`q8`], [`qg`]).
//! [`Kernels`] is a table of function pointers for one instruction set,
//! chosen at model load from the CPU's features ([`Isa::detect`]) or forced
//! with `NIBBLE_ISA=scalar|avx2|avx512|neon|neondot`, so tests and benchmarks can
//! run every path side by side. A table for an instruction set the CPU lacks
//! cannot be obtained ([`Kernels::for_isa`] returns `None`): that is what
//! makes calling the `#[target_feature]` code behind the safe wrappers sound.

pub mod act;
pub mod attn;
pub mod float;
mod gemm;
pub mod gguf;
pub mod pool;
pub mod probe;
pub mod q8;
pub mod qg;
pub mod qg_f32;
pub mod qg_mm;
pub mod qg_x8;
pub mod qk_x8;

use std::sync::OnceLock;

use half::f16;
use nibble_format::DType;

pub use act::{CausalSoftmaxFn, SwigluFn};
pub use attn::{Attend, AttendF32Fn, AttendFn, KvElem};
pub use float::{dot_bf16, dot_f16, dot_f32, FloatMatvecFn};
pub use gemm::{matmul, matmul_f64, MatF64, MatMut, MatRef};
pub use q8::{Q8Batch, Q8BatchRef};
pub use q8::{Q8Buf, Q8Kind, Q8Ref, QuantizeQ8Fn};
pub use qg::{DequantRowFn, PackedRows, QgMatvecFn};
pub use qg_f32::QgF32MatvecFn;
pub use qg_mm::QgMatmulFn;
pub use qg_x8::{X8MatmulFn, X8MatvecFn, X8Rows};
pub use qk_x8::{X8KMatmulFn, X8KMatvecFn, X8KRows};

/// How far ahead of the bytes they read the one-token interleaved kernels
/// prefetch weights ([`qg_x8`], [`qk_x8`]): the hardware prefetcher alone
/// left a core's decoding stalled on loads (docs/gguf.md, "Prefetching").
pub const PREFETCH_AHEAD: usize = 4096;

/// Elements per packed sub-block and per activation block.
pub use nibble_format::dtype::SUB_BLOCK;

/// An instruction set with its own kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust; the reference for every other path.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ + VNNI (`vpdpbusd`), on top of AVX2.
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
    /// aarch64 Advanced SIMD with the dot-product extension (`sdot`).
    NeonDot,
}

impl Isa {
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon, Isa::NeonDot];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "neondot",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the instruction set.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every instruction set this CPU can run, scalar first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest available instruction set.
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2, Isa::NeonDot, Isa::Neon]
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The kernels of one instruction set.
#[derive(Debug)]
pub struct Kernels {
    pub isa: Isa,
    /// f32 → int8 activation blocks.
    pub quantize_q8: QuantizeQ8Fn,
    /// Packed groups × int8 activations, by type: Q2G, Q3G, Q4G, Q8G, Q4GM.
    qg: [QgMatvecFn; 5],
    /// GGUF block types run as stored × int8 activations, in
    /// [`DType::GGUF_BLOCKS`] order ([`gguf`]).
    gguf: [QgMatvecFn; 8],
    /// Packed rows decoded to f32 (prompt tiles), by type as `qg`.
    dequant: [DequantRowFn; 5],
    /// Packed groups × f32 activations (the float-activation variant), by type as `qg`.
    qg_f32: [QgF32MatvecFn; 5],
    /// Packed groups × int8 blocks of many tokens (prompts), by type as `qg`;
    /// `None` where no batched kernel beats decoded tiles fed to `gemm`
    /// (scalar, NEON), which the prompt path then uses.
    qg_mm: Option<[QgMatmulFn; 5]>,
    /// Whether `qg_mm` beats decoded tiles + `gemm` for weights without an
    /// interleaved copy (the 8-bit ones, and a GGUF's Q8_0 head), so that
    /// `PrefillKind::Auto` takes it. Measured on SmolLM2 (one thread):
    /// with VNNI, 8-bit g128 prompts of 128 tokens 500 against 394 tok/s
    /// and 16 calibration sequences in lockstep 39.7 against 46.6 ms per step;
    /// AVX2's `maddubs` loses at 128 tokens (327 against 380 tok/s).
    pub qg_mm_beats_tiles: bool,
    /// GGUF rows × the int8 blocks of many tokens in their weight type's
    /// flavour ([`Q8Kind::for_dtype`]; prompts: each block unpacked once for
    /// four or eight tokens), by type as `gguf`; `None` where no such kernel beats
    /// decoded tiles fed to `gemm`. AVX-512, Q4_K_M files' pp128: see
    /// docs/BENCHMARKS.md.
    gguf_mm: gguf::GgufMatmulTable,
    /// Packed weights interleaved by eight rows ([`qg_x8`]) × int8
    /// activations; `None` where there is no such kernel (the models then
    /// keep no interleaved copy).
    pub matvec_x8: Option<X8MatvecFn>,
    /// The same for many tokens (prompts), where the table has it.
    pub matmul_x8: Option<X8MatmulFn>,
    /// GGUF `Q4_K` / `Q6_K` rows interleaved by eight ([`qk_x8`]) × super-256 int8
    /// activations; `None` where there is no such kernel (the models then
    /// keep no such copy and run the row kernels).
    pub matvec_x8k: Option<X8KMatvecFn>,
    /// The same for many tokens (prompts).
    pub matmul_x8k: Option<X8KMatmulFn>,
    pub matvec_f32: FloatMatvecFn<f32>,
    pub matvec_f16: FloatMatvecFn<f16>,
    pub matvec_bf16: FloatMatvecFn<half::bf16>,
    /// One-token attention of the query heads sharing a KV head ([`attn`]),
    /// over an f16 and over an f32 cache.
    pub attend: AttendFn,
    pub attend_f32: AttendF32Fn,
    /// SwiGLU's `gate ← silu(gate)·up` ([`act`]).
    pub swiglu: SwigluFn,
    /// GeGLU's `gate ← gelu_tanh(gate)·up` ([`act`]).
    pub geglu: SwigluFn,
    /// Activations of MLPs without a gate, in place ([`act`]).
    pub gelu_tanh: act::UnaryFn,
    pub gelu_erf: act::UnaryFn,
    pub relu: act::UnaryFn,
    /// One causal attention row's softmax ([`act`]).
    pub causal_softmax: CausalSoftmaxFn,
}

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    quantize_q8: q8::quantize_q8_scalar,
    qg: [
        qg::vec_dot_q2g_q8_scalar,
        qg::vec_dot_q3g_q8_scalar,
        qg::vec_dot_q4g_q8_scalar,
        qg::vec_dot_q8g_q8_scalar,
        qg::vec_dot_q4gm_q8_scalar,
    ],
    gguf: gguf::SCALAR,
    dequant: [qg::dequant_row_scalar; 5],
    qg_f32: [
        qg_f32::vec_dot_q2g_f32_scalar,
        qg_f32::vec_dot_q3g_f32_scalar,
        qg_f32::vec_dot_q4g_f32_scalar,
        qg_f32::vec_dot_q8g_f32_scalar,
        qg_f32::vec_dot_q4gm_f32_scalar,
    ],
    qg_mm: None,
    qg_mm_beats_tiles: false,
    gguf_mm: [None; 8],
    matvec_x8: None,
    matmul_x8: None,
    matvec_x8k: None,
    matmul_x8k: None,
    matvec_f32: float::matvec_f32_scalar,
    matvec_f16: float::matvec_f16_scalar,
    matvec_bf16: float::matvec_bf16_scalar,
    attend: attn::attend_group_scalar,
    attend_f32: attn::attend_group_f32_scalar,
    swiglu: act::swiglu_scalar,
    geglu: act::geglu_scalar,
    gelu_tanh: act::gelu_tanh_scalar,
    gelu_erf: act::gelu_erf_scalar,
    relu: act::relu_scalar,
    causal_softmax: act::causal_softmax_scalar,
};

#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = Kernels {
    isa: Isa::Avx2,
    quantize_q8: q8::avx2::quantize_q8_avx2,
    qg: [
        qg::x86::vec_dot_q2g_q8_avx2,
        qg::x86::vec_dot_q3g_q8_avx2,
        qg::x86::vec_dot_q4g_q8_avx2,
        qg::x86::vec_dot_q8g_q8_avx2,
        qg::x86::vec_dot_q4gm_q8_avx2,
    ],
    gguf: gguf::x86::AVX2,
    dequant: [qg::x86::dequant_row_avx2; 5],
    qg_f32: [
        qg_f32::x86::vec_dot_q2g_f32_avx2,
        qg_f32::x86::vec_dot_q3g_f32_avx2,
        qg_f32::x86::vec_dot_q4g_f32_avx2,
        qg_f32::x86::vec_dot_q8g_f32_avx2,
        qg_f32::x86::vec_dot_q4gm_f32_avx2,
    ],
    qg_mm: Some(qg_mm::x86::AVX2),
    qg_mm_beats_tiles: false,
    gguf_mm: gguf::x86::MATMUL_AVX2,
    matvec_x8: Some(qg_x8::x86::vec_dot_x8_q8_avx2),
    matmul_x8: Some(qg_x8::x86::matmul_x8_q8_avx2),
    matvec_x8k: Some(qk_x8::x86::vec_dot_x8k_q8_avx2),
    matmul_x8k: Some(qk_x8::x86::matmul_x8k_q8_avx2),
    matvec_f32: float::avx2::matvec_f32_avx2,
    matvec_f16: float::avx2::matvec_f16_avx2,
    matvec_bf16: float::matvec_bf16_scalar,
    attend: attn::x86::attend_group_avx2,
    attend_f32: attn::x86::attend_group_f32_avx2,
    swiglu: act::x86::swiglu_avx2,
    geglu: act::x86::geglu_avx2,
    gelu_tanh: act::x86::gelu_tanh_avx2,
    gelu_erf: act::x86::gelu_erf_avx2,
    relu: act::x86::relu_avx2,
    causal_softmax: act::x86::causal_softmax_avx2,
};

#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = Kernels {
    isa: Isa::Avx512,
    quantize_q8: q8::avx2::quantize_q8_avx2,
    qg: [
        qg::x86::vec_dot_q2g_q8_avx512,
        qg::x86::vec_dot_q3g_q8_avx512,
        qg::x86::vec_dot_q4g_q8_avx512,
        qg::x86::vec_dot_q8g_q8_avx512,
        qg::x86::vec_dot_q4gm_q8_avx512,
    ],
    gguf: gguf::x86::AVX512,
    dequant: [qg::x86::dequant_row_avx2; 5],
    qg_f32: [
        qg_f32::x86::vec_dot_q2g_f32_avx2,
        qg_f32::x86::vec_dot_q3g_f32_avx2,
        qg_f32::x86::vec_dot_q4g_f32_avx2,
        qg_f32::x86::vec_dot_q8g_f32_avx2,
        qg_f32::x86::vec_dot_q4gm_f32_avx2,
    ],
    qg_mm: Some(qg_mm::x86::AVX512),
    qg_mm_beats_tiles: true,
    gguf_mm: gguf::x86::MATMUL_AVX512,
    matvec_x8: Some(qg_x8::x86::vec_dot_x8_q8_avx512),
    matmul_x8: Some(qg_x8::x86::matmul_x8_q8_avx512),
    matvec_x8k: Some(qk_x8::x86::vec_dot_x8k_q8_avx512),
    matmul_x8k: Some(qk_x8::x86::matmul_x8k_q8_avx512),
    matvec_f32: float::avx2::matvec_f32_avx2,
    matvec_f16: float::avx2::matvec_f16_avx2,
    matvec_bf16: float::matvec_bf16_scalar,
    attend: attn::x86::attend_group_avx512,
    attend_f32: attn::x86::attend_group_f32_avx512,
    swiglu: act::x86::swiglu_avx512,
    geglu: act::x86::geglu_avx512,
    gelu_tanh: act::x86::gelu_tanh_avx512,
    gelu_erf: act::x86::gelu_erf_avx512,
    relu: act::x86::relu_avx512,
    causal_softmax: act::x86::causal_softmax_avx512,
};

#[cfg(target_arch = "aarch64")]
static NEON: Kernels = NEON_TABLE;

#[cfg(target_arch = "aarch64")]
const NEON_TABLE: Kernels = Kernels {
    isa: Isa::Neon,
    quantize_q8: q8::neon::quantize_q8_neon,
    qg: [
        qg::neon::vec_dot_q2g_q8_neon,
        qg::neon::vec_dot_q3g_q8_neon,
        qg::neon::vec_dot_q4g_q8_neon,
        qg::neon::vec_dot_q8g_q8_neon,
        qg::neon::vec_dot_q4gm_q8_neon,
    ],
    gguf: gguf::neon::NEON,
    dequant: [qg::neon::dequant_row_neon; 5],
    qg_f32: [
        qg_f32::neon::vec_dot_q2g_f32_neon,
        qg_f32::neon::vec_dot_q3g_f32_neon,
        qg_f32::neon::vec_dot_q4g_f32_neon,
        qg_f32::neon::vec_dot_q8g_f32_neon,
        qg_f32::neon::vec_dot_q4gm_f32_neon,
    ],
    qg_mm: None,
    qg_mm_beats_tiles: false,
    gguf_mm: [None; 8],
    matvec_x8: Some(qg_x8::neon::vec_dot_x8_q8_neon),
    matmul_x8: Some(qg_x8::neon::matmul_x8_q8_neon),
    matvec_x8k: None,
    matmul_x8k: None,
    matvec_f32: float::neon::matvec_f32_neon,
    matvec_f16: float::matvec_f16_scalar,
    matvec_bf16: float::matvec_bf16_scalar,
    attend: attn::attend_group_scalar,
    attend_f32: attn::attend_group_f32_scalar,
    swiglu: act::swiglu_scalar,
    geglu: act::geglu_scalar,
    gelu_tanh: act::gelu_tanh_scalar,
    gelu_erf: act::gelu_erf_scalar,
    relu: act::relu_scalar,
    causal_softmax: act::causal_softmax_scalar,
};

#[cfg(target_arch = "aarch64")]
static NEONDOT: Kernels = Kernels {
    isa: Isa::NeonDot,
    qg: [
        qg::neon::vec_dot_q2g_q8_neondot,
        qg::neon::vec_dot_q3g_q8_neondot,
        qg::neon::vec_dot_q4g_q8_neondot,
        qg::neon::vec_dot_q8g_q8_neondot,
        qg::neon::vec_dot_q4gm_q8_neondot,
    ],
    gguf: gguf::neon::NEONDOT,
    matvec_x8: Some(qg_x8::neon::vec_dot_x8_q8_neondot),
    matmul_x8: Some(qg_x8::neon::matmul_x8_q8_neondot),
    matvec_x8k: None,
    matmul_x8k: None,
    ..NEON_TABLE
};

impl Kernels {
    /// The table of `isa`, or `None` when this CPU cannot run it.
    pub fn for_isa(isa: Isa) -> Option<&'static Kernels> {
        if !isa.is_available() {
            return None;
        }
        match isa {
            Isa::Scalar => Some(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(&AVX2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(&AVX512),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Some(&NEON),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => Some(&NEONDOT),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The table named by `NIBBLE_ISA`, else the best for this CPU; decided
    /// once per process. An unknown or unavailable `NIBBLE_ISA` is an error.
    pub fn from_env() -> Result<&'static Kernels, String> {
        static CHOICE: OnceLock<Result<&'static Kernels, String>> = OnceLock::new();
        CHOICE
            .get_or_init(|| match std::env::var("NIBBLE_ISA") {
                Ok(v) if !v.trim().is_empty() => Self::named(&v),
                _ => Ok(Self::for_isa(Isa::detect()).expect("detected ISA is available")),
            })
            .clone()
    }

    /// The table for an instruction-set name (`scalar`, `avx2`, `avx512`, `neon`, `neondot`).
    pub fn named(name: &str) -> Result<&'static Kernels, String> {
        let isa = Isa::parse(name).ok_or_else(|| {
            format!("NIBBLE_ISA={name:?} is not one of scalar, avx2, avx512, neon, neondot")
        })?;
        Self::for_isa(isa).ok_or_else(|| {
            let have: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
            format!(
                "NIBBLE_ISA={name}: this CPU cannot run {isa} (available: {})",
                have.join(", ")
            )
        })
    }

    /// The packed kernel for a packed `dtype` (group or GGUF block type).
    pub fn matvec_qg(&self, dtype: DType) -> QgMatvecFn {
        match gguf_index(dtype) {
            Some(i) => self.gguf[i],
            None => self.qg[packed_index(dtype)],
        }
    }

    /// The float-activation kernel for a packed `dtype`.
    pub fn matvec_qg_f32(&self, dtype: DType) -> QgF32MatvecFn {
        self.qg_f32[packed_index(dtype)]
    }

    /// The batched (prompt) kernel for a packed `dtype`, where this
    /// instruction set has one.
    pub fn matmul_qg(&self, dtype: DType) -> Option<QgMatmulFn> {
        if gguf_index(dtype).is_some() {
            // GGUF block types: their own batched kernels
            // (`matmul_gguf`), decoded tiles for the others.
            return None;
        }
        self.qg_mm.map(|t| t[packed_index(dtype)])
    }

    /// The batched (prompt) kernel for GGUF rows of `dtype`, where this
    /// instruction set has one.
    pub fn matmul_gguf(&self, dtype: DType) -> Option<gguf::GgufMatmulFn> {
        gguf_index(dtype).and_then(|i| self.gguf_mm[i])
    }

    /// The row decoder for a packed `dtype` (GGUF block types: the
    /// reference decoders of `nibble_format::gguf_blocks`).
    pub fn dequant_qg(&self, dtype: DType) -> DequantRowFn {
        match gguf_index(dtype) {
            Some(_) => qg::dequant_row_scalar,
            None => self.dequant[packed_index(dtype)],
        }
    }
}

/// Position of a GGUF block type in [`DType::GGUF_BLOCKS`].
fn gguf_index(dtype: DType) -> Option<usize> {
    DType::GGUF_BLOCKS.iter().position(|&d| d == dtype)
}

pub(crate) fn packed_index(dtype: DType) -> usize {
    match dtype {
        DType::Q2G => 0,
        DType::Q3G => 1,
        DType::Q4G => 2,
        DType::Q8G => 3,
        DType::Q4GM => 4,
        other => panic!("{other} is not a packed group type"),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use half::f16;
    use nibble_format::dtype::DType;
    use nibble_format::quant::{pack_row, pack_row_q4gm};

    /// A seeded uniform value in [-1, 1).
    pub fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `rows` rows of `cols` weights of `dtype`: random bytes with finite
    /// f16 scales written where each layout keeps them; `zero` zeroes the
    /// scales of the first block.
    pub fn make_gguf_rows(
        dtype: DType,
        rows: usize,
        cols: usize,
        seed: &mut u64,
        zero: bool,
    ) -> Vec<u8> {
        let (block, bytes) = dtype.gguf_block().unwrap();
        let n = rows * cols / block;
        let mut data: Vec<u8> = (0..n * bytes)
            .map(|_| ((lcg(seed) + 1.0) * 127.9) as u8)
            .collect();
        let f16_offsets: &[usize] = match dtype {
            DType::Q5_0 | DType::IQ4NL | DType::IQ4XS => &[0],
            DType::Q4K | DType::Q5K => &[0, 2],
            DType::Q2K => &[80, 82],
            DType::Q3K => &[108],
            DType::Q6K => &[208],
            _ => unreachable!(),
        };
        for (i, b) in data.chunks_exact_mut(bytes).enumerate() {
            for &o in f16_offsets {
                let v = if zero && i == 0 {
                    0.0
                } else {
                    lcg(seed) * 0.05
                };
                b[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        data
    }

    /// One packed row of `dtype` with seeded codes and scales, zero points at
    /// both extremes; `zero_group` makes group 0's scale zero.
    pub fn make_row(
        dtype: DType,
        cols: usize,
        gs: usize,
        seed: &mut u64,
        zero_group: bool,
    ) -> Vec<u8> {
        let bits = dtype.quant_bits().unwrap();
        let maxq = (1u32 << bits) - 1;
        let n_groups = cols.div_ceil(gs);
        let codes: Vec<u8> = (0..cols)
            .map(|_| (((lcg(seed) + 1.0) * 0.5 * (maxq as f32 + 0.99)) as u32).min(maxq) as u8)
            .collect();
        let mut scales: Vec<f32> = (0..n_groups)
            .map(|_| lcg(seed).abs() * 0.1 + 1e-3)
            .collect();
        if zero_group {
            scales[0] = 0.0;
        }
        let mut row = Vec::new();
        if dtype == DType::Q4GM {
            let mins: Vec<f32> = (0..n_groups).map(|_| lcg(seed) * 0.2).collect();
            pack_row_q4gm(gs, &codes, &scales, &mins, &mut row);
        } else {
            // Zero points across the whole range, extremes included.
            let zeros: Vec<u8> = (0..n_groups)
                .map(|g| match g % 3 {
                    0 => 0,
                    1 => maxq as u8,
                    _ => (lcg(seed).abs() * maxq as f32) as u8,
                })
                .collect();
            pack_row(bits, gs, &codes, &scales, &zeros, &mut row);
        }
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_is_always_available_and_names_round_trip() {
        assert!(Kernels::for_isa(Isa::Scalar).is_some());
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            assert_eq!(Kernels::for_isa(isa).is_some(), isa.is_available());
        }
        assert!(Kernels::named("sse9").unwrap_err().contains("not one of"));
        assert!(Isa::available().contains(&Isa::detect()));
    }

    #[test]
    fn unavailable_isa_is_refused_with_the_list_of_available_ones() {
        let missing = Isa::ALL.into_iter().find(|i| !i.is_available());
        if let Some(isa) = missing {
            let e = Kernels::named(isa.name()).unwrap_err();
            assert!(e.contains("cannot run") && e.contains("scalar"), "{e}");
        }
    }
}
