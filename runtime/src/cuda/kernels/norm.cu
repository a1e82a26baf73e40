// Normalisations of the residual stream, one block per row of `n` values (blockDim a multiple of
// 32): RMSNorm as Hugging Face computes it (out = w · x / rms(x)) and LayerNorm with an optional
// bias. Gemma's (1 + w) is folded into w at import, as on the CPU.

extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* out, int n,
                                       float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * n;
    float* o = out + (i64)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = w[i] * (xr[i] * scale);
}

// `b` may be null (no bias).
extern "C" __global__ void layernorm_f32(const float* x, const float* w, const float* b,
                                         float* out, int n, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (i64)blockIdx.x * n;
    float* o = out + (i64)blockIdx.x * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, scratch) / (float)n;
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = xr[i] - mean;
        v += d * d;
    }
    const float rstd = 1.0f / sqrtf(block_sum(v, scratch) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float y = (xr[i] - mean) * rstd * w[i];
        o[i] = b ? y + b[i] : y;
    }
}
