// Prepended to every kernel source (runtime/src/cuda/mod.rs, scripts/cuda-ptx-check.py). NVRTC
// compiles these programs with no headers at all, so the f16 conversions are PTX instructions and
// the few types are spelled out here.
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// IEEE half bits to f32, exactly (as the CPU's f16_to_f32).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 to IEEE half bits, rounded to nearest even (as the CPU's f32_to_f16).
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// A little-endian u16 at any byte address (group headers are 2-byte aligned only by layout).
__device__ __forceinline__ u16 load_u16(const u8* p) {
    return (u16)p[0] | (u16)((u16)p[1] << 8);
}

__device__ __forceinline__ float neg_infinity() {
    return __int_as_float(0xff800000);
}

// The two reductions the kernels need: a sum and a maximum, with their identities.
struct Sum {
    __device__ __forceinline__ static float apply(float a, float b) { return a + b; }
    __device__ __forceinline__ static float identity() { return 0.0f; }
};
struct Max {
    __device__ __forceinline__ static float apply(float a, float b) { return fmaxf(a, b); }
    __device__ __forceinline__ static float identity() { return neg_infinity(); }
};

// Reduce over the 32 lanes of a warp; every lane gets the result.
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v) {
    for (int o = 16; o > 0; o >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduce over a block whose size is a multiple of 32 (≤ 1024), through `scratch[32]` in shared
// memory; every thread gets the result.
template <typename Op>
__device__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_reduce<Op>(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : Op::identity();
    return warp_reduce<Op>(v);
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<Sum>(v); }
__device__ __forceinline__ float block_sum(float v, float* s) { return block_reduce<Sum>(v, s); }
__device__ __forceinline__ float block_max(float v, float* s) { return block_reduce<Max>(v, s); }
