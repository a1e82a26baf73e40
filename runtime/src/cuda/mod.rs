//! The CUDA path (cargo feature `cuda`, off by default): nibble's kernels
//! in CUDA C (`kernels/*.cu`), compiled at load by NVRTC for the device
//! found, and launched through `cudarc` with the driver loaded dynamically,
//! so a binary built with the feature starts on a machine without a driver
//! and says that CUDA is unavailable instead of failing to link.
//!
//! Why NVRTC rather than nvcc at build time: the build then needs no CUDA
//! toolkit, and each device gets code for its own architecture. Why no
//! headers: NVRTC compiles the programs alone (`kernels/common.cuh` is
//! prepended to each), so CI can compile every kernel to PTX with only
//! NVIDIA's NVRTC library (`scripts/nvrtc.sh`), on a machine without a GPU.
//!
//! What runs here: [`Gpu`] opens a device, compiles and loads the programs,
//! uploads weights once and launches each kernel on device buffers. Every
//! kernel has a CPU counterpart it is tested against (`tests` below, run on
//! a GPU by `scripts/test-cuda.sh`): the packed dequant-GEMV and the tile
//! dequantizer against the format's reference decoder, the norms, RoPE,
//! activations and the one-token attention against the runtime's scalar
//! code.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use nibble_format::dtype::DType;

use crate::kernels::qg::PackedRows;

/// Prepended to every program: f16 conversions, warp and block reductions.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// One NVRTC program: a kernel source file and the kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

impl Program {
    /// The text NVRTC compiles: [`COMMON`], then the file.
    pub fn text(&self) -> String {
        format!("{COMMON}\n{}", self.source)
    }
}

/// Every program the runtime loads.
pub const PROGRAMS: [Program; 4] = [
    Program {
        name: "gemv.cu",
        source: include_str!("kernels/gemv.cu"),
        kernels: &[
            "gemv_q2g",
            "gemv_q3g",
            "gemv_q4g",
            "gemv_q8g",
            "gemv_q4gm",
            "dequant_q2g",
            "dequant_q3g",
            "dequant_q4g",
            "dequant_q8g",
            "dequant_q4gm",
            "gemv_f32",
            "gemv_f16",
        ],
    },
    Program {
        name: "norm.cu",
        source: include_str!("kernels/norm.cu"),
        kernels: &["rmsnorm_f32", "layernorm_f32"],
    },
    Program {
        name: "elementwise.cu",
        source: include_str!("kernels/elementwise.cu"),
        kernels: &["rope_f32", "glu_f32", "act_f32", "add_f32", "store_f16"],
    },
    Program {
        name: "attention.cu",
        source: include_str!("kernels/attention.cu"),
        kernels: &["attend_f16"],
    },
];

/// The CUDA path's typed error.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("CUDA is unavailable: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NVRTC could not compile {program}: {log}")]
    Compile { program: &'static str, log: String },
    #[error("CUDA: {0}")]
    Invalid(String),
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Is NVIDIA's runtime compiler (`libnvrtc.so`) loadable?
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Is the CUDA driver (`libcuda.so`) loadable?
pub fn driver_available() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// NVRTC's name of a virtual architecture (`compute_XY`), where it knows it.
pub fn arch_name(major: i32, minor: i32) -> Option<&'static str> {
    const ARCHES: [(i32, i32, &str); 14] = [
        (5, 0, "compute_50"),
        (5, 2, "compute_52"),
        (5, 3, "compute_53"),
        (6, 0, "compute_60"),
        (6, 1, "compute_61"),
        (6, 2, "compute_62"),
        (7, 0, "compute_70"),
        (7, 2, "compute_72"),
        (7, 5, "compute_75"),
        (8, 0, "compute_80"),
        (8, 6, "compute_86"),
        (8, 7, "compute_87"),
        (8, 9, "compute_89"),
        (9, 0, "compute_90"),
    ];
    ARCHES
        .iter()
        .find(|a| a.0 == major && a.1 == minor)
        .map(|a| a.2)
}

/// `program` compiled to PTX for `arch` (NVRTC's default when `None`).
/// Needs only NVRTC, no driver or device.
pub fn compile(program: &Program, arch: Option<&'static str>) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(CudaError::Unavailable(
            "NVIDIA's runtime compiler (libnvrtc.so) was not found; install the CUDA toolkit or \
             the nvidia-cuda-nvrtc-cu12 Python package and put its lib folder on LD_LIBRARY_PATH \
             (scripts/nvrtc.sh prints one)"
                .into(),
        ));
    }
    let options = CompileOptions {
        arch,
        name: Some(program.name.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(program.text(), options).map_err(|e| CudaError::Compile {
        program: program.name,
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => other.to_string(),
        },
    })
}

/// Threads per block of the per-row kernels (norms, attention).
const ROW_THREADS: u32 = 256;
/// Rows per block of the GEMV kernels (one warp each).
const GEMV_ROWS: u32 = 4;
/// Threads per block of the element-wise kernels.
const ELEM_THREADS: u32 = 256;

fn elems(n: usize) -> Result<LaunchConfig> {
    let n = u32::try_from(n).map_err(|_| CudaError::Invalid(format!("{n} elements")))?;
    Ok(LaunchConfig {
        grid_dim: (n.div_ceil(ELEM_THREADS).max(1), 1, 1),
        block_dim: (ELEM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::Invalid(format!("{what} {v} exceeds i32")))
}

/// A packed weight uploaded once: its bytes on the device and its shape.
pub struct DevicePacked {
    pub bytes: CudaSlice<u8>,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub row_bytes: usize,
}

/// The MLP activation of a gated MLP (`gate ← act(gate) · up`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glu {
    Silu = 0,
    GeluTanh = 1,
}

/// An activation in place (MLPs without a gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    GeluTanh = 0,
    GeluErf = 1,
    Relu = 2,
}

/// One token's attention over an f16 cache (see `kernels/attention.cu`).
pub struct AttendArgs<'a> {
    /// `[n_head, head_dim]` queries.
    pub q: &'a CudaSlice<f32>,
    /// `[n_ctx, n_head_kv, head_dim]` f16 bits.
    pub keys: &'a CudaSlice<u16>,
    pub values: &'a CudaSlice<u16>,
    /// `[n_head, n_ctx]` scratch.
    pub scores: &'a mut CudaSlice<f32>,
    /// `[n_head, head_dim]` outputs.
    pub out: &'a mut CudaSlice<f32>,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ctx: usize,
    /// Positions attended.
    pub range: std::ops::Range<usize>,
    pub scale: f32,
    /// cap·tanh(s/cap) on each score; 0 = none.
    pub softcap: f32,
}

/// An open device with nibble's kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Vec<(&'static str, CudaFunction)>,
    _modules: Vec<Arc<CudaModule>>,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
}

impl Gpu {
    /// Open device `ordinal`, compile every program for its architecture
    /// and load it. A clear [`CudaError::Unavailable`] where there is no
    /// driver, no NVRTC or no such device.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_available() {
            return Err(CudaError::Unavailable(
                "no NVIDIA driver (libcuda.so) on this machine".into(),
            ));
        }
        let count = CudaContext::device_count()?;
        if ordinal >= count as usize {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} requested, {count} found"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let compute_capability = ctx.compute_capability()?;
        let arch = arch_name(compute_capability.0, compute_capability.1);
        let mut functions = Vec::new();
        let mut modules = Vec::new();
        for p in &PROGRAMS {
            let module = ctx.load_module(compile(p, arch)?)?;
            for &k in p.kernels {
                functions.push((k, module.load_function(k)?));
            }
            modules.push(module);
        }
        Ok(Gpu {
            name: ctx.name()?,
            total_mem: ctx.total_mem()?,
            ctx,
            stream,
            functions,
            _modules: modules,
            compute_capability,
        })
    }

    fn function(&self, name: &str) -> &CudaFunction {
        &self
            .functions
            .iter()
            .find(|f| f.0 == name)
            .expect("every kernel of PROGRAMS is loaded")
            .1
    }

    /// The device memory's peak bandwidth in bytes/s (2 transfers per
    /// memory clock × bus width): the bound a GEMV that reads its weights
    /// once can approach.
    pub fn bandwidth_bound(&self) -> Result<f64> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let clock_khz = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)?;
        let bus_bits = self
            .ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?;
        Ok(2.0 * f64::from(clock_khz) * 1e3 * f64::from(bus_bits) / 8.0)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Wait for every launched kernel.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// `w`'s bytes uploaded once.
    pub fn upload_packed(&self, w: PackedRows<'_>) -> Result<DevicePacked> {
        if w.dtype().quant_bits().is_none() || w.dtype().gguf_block().is_some() {
            return Err(CudaError::Invalid(format!(
                "no CUDA kernel for {} weights yet",
                w.dtype()
            )));
        }
        Ok(DevicePacked {
            bytes: self.stream.clone_htod(w.data())?,
            dtype: w.dtype(),
            rows: w.rows(),
            cols: w.cols(),
            group_size: w.group_size(),
            row_bytes: w.row_bytes(),
        })
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(v)?)
    }

    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(n)?)
    }

    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        v: &CudaSlice<T>,
        out: &mut [T],
    ) -> Result<()> {
        self.stream.memcpy_dtoh(v, out)?;
        Ok(self.stream.synchronize()?)
    }

    fn packed_kernel(&self, prefix: &str, dtype: DType) -> Result<&CudaFunction> {
        let suffix = match dtype {
            DType::Q2G => "q2g",
            DType::Q3G => "q3g",
            DType::Q4G => "q4g",
            DType::Q8G => "q8g",
            DType::Q4GM => "q4gm",
            d => return Err(CudaError::Invalid(format!("no CUDA kernel for {d}"))),
        };
        Ok(self.function(&format!("{prefix}_{suffix}")))
    }

    /// `y[r] = Σ_c ŵ[r, c]·x[c]` (the decode path's linear layer).
    pub fn gemv(&self, w: &DevicePacked, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        if w.rows == 0 || x.len() < w.cols || y.len() < w.rows {
            return Err(CudaError::Invalid(format!(
                "gemv: {}×{} weight, x of {}, y of {}",
                w.rows,
                w.cols,
                x.len(),
                y.len()
            )));
        }
        let f = self.packed_kernel("gemv", w.dtype)?;
        let (rows, cols, gs) = (
            int(w.rows, "rows")?,
            int(w.cols, "cols")?,
            int(w.group_size, "group size")?,
        );
        let row_bytes = w.row_bytes as i64;
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(GEMV_ROWS), 1, 1),
            block_dim: (32, GEMV_ROWS, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.bytes)
            .arg(x)
            .arg(y)
            .arg(&rows)
            .arg(&cols)
            .arg(&gs)
            .arg(&row_bytes);
        // SAFETY: the kernel reads `rows × row_bytes` bytes of `w.bytes` (its
        // upload of a validated PackedRows), `cols` floats of x and writes
        // `rows` floats of y, both checked above; the argument list matches
        // gemv_* in kernels/gemv.cu.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out[r·cols + c] = ŵ[r, c]` (the prompt path's tiles).
    pub fn dequant(&self, w: &DevicePacked, out: &mut CudaSlice<f32>) -> Result<()> {
        let n = w.rows * w.cols;
        if n == 0 || out.len() < n {
            return Err(CudaError::Invalid(format!(
                "dequant: {n} weights, output of {}",
                out.len()
            )));
        }
        let f = self.packed_kernel("dequant", w.dtype)?;
        let (rows, cols, gs) = (
            int(w.rows, "rows")?,
            int(w.cols, "cols")?,
            int(w.group_size, "group size")?,
        );
        let row_bytes = w.row_bytes as i64;
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.bytes)
            .arg(out)
            .arg(&rows)
            .arg(&cols)
            .arg(&gs)
            .arg(&row_bytes);
        // SAFETY: reads within the uploaded rows, writes rows·cols floats of
        // `out` (checked); the arguments match dequant_* in kernels/gemv.cu.
        unsafe { b.launch(elems(n)?) }?;
        Ok(())
    }

    /// `out[r] = w ⊙ x[r] / rms(x[r])` for `rows` rows of `n`.
    pub fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        if x.len() < rows * n || out.len() < rows * n || weight.len() < n {
            return Err(CudaError::Invalid("rmsnorm: buffer sizes".into()));
        }
        let n_i = int(n, "width")?;
        let mut b = self.stream.launch_builder(self.function("rmsnorm_f32"));
        b.arg(x).arg(weight).arg(out).arg(&n_i).arg(&eps);
        // SAFETY: one block per row reads/writes n floats of rows·n (checked).
        unsafe { b.launch(per_row(rows)?) }?;
        Ok(())
    }

    /// LayerNorm of `rows` rows of `n`: `(weight, optional bias)`.
    pub fn layernorm(
        &self,
        x: &CudaSlice<f32>,
        (weight, bias): (&CudaSlice<f32>, Option<&CudaSlice<f32>>),
        out: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        if x.len() < rows * n || out.len() < rows * n || weight.len() < n {
            return Err(CudaError::Invalid("layernorm: buffer sizes".into()));
        }
        if bias.is_some_and(|b| b.len() < n) {
            return Err(CudaError::Invalid("layernorm: bias size".into()));
        }
        let n_i = int(n, "width")?;
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.function("layernorm_f32"));
        b.arg(x).arg(weight);
        optional_arg(&mut b, bias, &null);
        b.arg(out).arg(&n_i).arg(&eps);
        // SAFETY: as rmsnorm; a null bias pointer is checked in the kernel.
        unsafe { b.launch(per_row(rows)?) }?;
        Ok(())
    }

    /// Rotate-half RoPE on `n_heads` slices of `head_dim` of `v`, with this
    /// position's `cos`/`sin` tables (`half` values each).
    pub fn rope(
        &self,
        v: &mut CudaSlice<f32>,
        n_heads: usize,
        head_dim: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        half: usize,
    ) -> Result<()> {
        if v.len() < n_heads * head_dim
            || 2 * half > head_dim
            || cos.len() < half
            || sin.len() < half
        {
            return Err(CudaError::Invalid("rope: buffer sizes".into()));
        }
        let (nh, hd, hf) = (
            int(n_heads, "heads")?,
            int(head_dim, "head dim")?,
            int(half, "half")?,
        );
        let mut b = self.stream.launch_builder(self.function("rope_f32"));
        b.arg(v).arg(&nh).arg(&hd).arg(&hf).arg(cos).arg(sin);
        // SAFETY: one thread per rotated pair within n_heads·head_dim (checked).
        unsafe { b.launch(elems(n_heads * half)?) }?;
        Ok(())
    }

    /// `gate ← act(gate) · up` over `n` values.
    pub fn glu(
        &self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
        act: Glu,
    ) -> Result<()> {
        if gate.len() < n || up.len() < n {
            return Err(CudaError::Invalid("glu: buffer sizes".into()));
        }
        let (n_i, a) = (int(n, "width")?, act as i32);
        let mut b = self.stream.launch_builder(self.function("glu_f32"));
        b.arg(gate).arg(up).arg(&n_i).arg(&a);
        // SAFETY: one thread per element below n (checked).
        unsafe { b.launch(elems(n)?) }?;
        Ok(())
    }

    /// `x ← act(x)` over `n` values.
    pub fn act(&self, x: &mut CudaSlice<f32>, n: usize, act: Act) -> Result<()> {
        if x.len() < n {
            return Err(CudaError::Invalid("act: buffer size".into()));
        }
        let (n_i, a) = (int(n, "width")?, act as i32);
        let mut b = self.stream.launch_builder(self.function("act_f32"));
        b.arg(x).arg(&n_i).arg(&a);
        // SAFETY: one thread per element below n (checked).
        unsafe { b.launch(elems(n)?) }?;
        Ok(())
    }

    /// `x ← x + y (+ bias)` over `n` values.
    pub fn add(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        n: usize,
    ) -> Result<()> {
        if x.len() < n || y.len() < n || bias.is_some_and(|b| b.len() < n) {
            return Err(CudaError::Invalid("add: buffer sizes".into()));
        }
        let n_i = int(n, "width")?;
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.function("add_f32"));
        b.arg(x).arg(y);
        optional_arg(&mut b, bias, &null);
        b.arg(&n_i);
        // SAFETY: one thread per element below n (checked); null bias checked in the kernel.
        unsafe { b.launch(elems(n)?) }?;
        Ok(())
    }

    /// `dst[i] = f16(src[i])` for `n` values (a position into the KV cache).
    pub fn store_f16(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<u16>,
        n: usize,
    ) -> Result<()> {
        if src.len() < n || dst.len() < n {
            return Err(CudaError::Invalid("store_f16: buffer sizes".into()));
        }
        let n_i = int(n, "width")?;
        let mut b = self.stream.launch_builder(self.function("store_f16"));
        b.arg(src).arg(dst).arg(&n_i);
        // SAFETY: one thread per element below n (checked).
        unsafe { b.launch(elems(n)?) }?;
        Ok(())
    }

    /// One token's attention over the f16 cache.
    pub fn attend(&self, a: AttendArgs<'_>) -> Result<()> {
        let kv_stride = a.n_head_kv * a.head_dim;
        let ok = a.n_head_kv > 0
            && a.head_dim > 0
            && a.n_head.is_multiple_of(a.n_head_kv)
            && a.range.start < a.range.end
            && a.range.end <= a.n_ctx
            && a.q.len() >= a.n_head * a.head_dim
            && a.out.len() >= a.n_head * a.head_dim
            && a.keys.len() >= a.n_ctx * kv_stride
            && a.values.len() >= a.n_ctx * kv_stride
            && a.scores.len() >= a.n_head * a.n_ctx;
        if !ok {
            return Err(CudaError::Invalid("attend: shapes".into()));
        }
        let hd = int(a.head_dim, "head dim")?;
        let group = int(a.n_head / a.n_head_kv, "group")?;
        let stride = int(kv_stride, "kv stride")?;
        let (start, end) = (int(a.range.start, "start")?, int(a.range.end, "end")?);
        let score_stride = int(a.n_ctx, "context")?;
        let mut b = self.stream.launch_builder(self.function("attend_f16"));
        b.arg(a.q)
            .arg(a.keys)
            .arg(a.values)
            .arg(a.scores)
            .arg(a.out)
            .arg(&hd)
            .arg(&group)
            .arg(&stride)
            .arg(&start)
            .arg(&end)
            .arg(&score_stride)
            .arg(&a.scale)
            .arg(&a.softcap);
        let cfg = LaunchConfig {
            grid_dim: (a.n_head as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every read and write is within the buffers checked above
        // (positions < n_ctx, heads < n_head, KV head = head / group);
        // the arguments match attend_f16 in kernels/attention.cu.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// Push `v`, or the null device pointer `null` (0) where it is absent (the
/// kernels test their optional inputs, biases, against null).
fn optional_arg<'a>(
    b: &mut cudarc::driver::LaunchArgs<'a>,
    v: Option<&'a CudaSlice<f32>>,
    null: &'a u64,
) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(null),
    };
}

/// One block per row; no rows is an error (a grid cannot be empty).
fn per_row(rows: usize) -> Result<LaunchConfig> {
    let rows = u32::try_from(rows)
        .ok()
        .filter(|&r| r > 0)
        .ok_or_else(|| CudaError::Invalid(format!("{rows} rows")))?;
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests;
