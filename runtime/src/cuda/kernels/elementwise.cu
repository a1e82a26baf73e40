// Element-wise steps of the block: rotary positions, the MLP activations, the residual add and
// the KV cache's f16 store. One thread per element (or per rotated pair).

// Rotate-half RoPE on the first 2·half dimensions of each of `n_heads` slices of `head_dim` in
// `v`, with this position's tables cos[half], sin[half] (runtime/src/block.rs: `rope`).
extern "C" __global__ void rope_f32(float* v, int n_heads, int head_dim, int half,
                                    const float* cos_t, const float* sin_t) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_heads * half) return;
    const int h = i / half, k = i % half;
    float* a = v + (i64)h * head_dim;
    const float x0 = a[k], x1 = a[k + half];
    a[k] = x0 * cos_t[k] - x1 * sin_t[k];
    a[k + half] = x0 * sin_t[k] + x1 * cos_t[k];
}

__device__ __forceinline__ float silu(float x) {
    return x / (1.0f + expf(-x));
}

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // √(2/π)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

// gate ← act(gate)·up (act: 0 SiLU, 1 GELU-tanh), the gated MLPs.
extern "C" __global__ void glu_f32(float* gate, const float* up, int n, int act) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    gate[i] = (act == 0 ? silu(g) : gelu_tanh(g)) * up[i];
}

// x ← act(x) (act: 0 GELU-tanh, 1 GELU-erf, 2 ReLU), the MLPs without a gate.
extern "C" __global__ void act_f32(float* x, int n, int act) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];
    x[i] = act == 0 ? gelu_tanh(v) : act == 1 ? gelu_erf(v) : fmaxf(v, 0.0f);
}

// x ← x + y (the residual stream), or x ← x + y + bias when `bias` is not null.
extern "C" __global__ void add_f32(float* x, const float* y, const float* bias, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] += bias ? y[i] + bias[i] : y[i];
}

// dst[i] = f16(src[i]): this position's keys or values into the cache.
extern "C" __global__ void store_f16(const float* src, u16* dst, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dst[i] = f32_to_f16(src[i]);
}
