// One token's attention over the f16 KV cache (runtime/src/kernels/attn.rs on the CPU): one block
// per query head; the heads of a GQA group read the same KV head. Keys and values of position t
// and KV head h start at (t·kv_stride + h·head_dim); positions [start, end) are attended (a
// sliding window moves `start`). `scores` is scratch, [n_head, score_stride] floats.

extern "C" __global__ void attend_f16(const float* q, const u16* keys, const u16* values,
                                      float* scores, float* out, int head_dim, int group,
                                      int kv_stride, int start, int end, int score_stride,
                                      float scale, float softcap) {
    __shared__ float scratch[32];
    const int h = blockIdx.x, kv = h / group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const float* qh = q + (i64)h * head_dim;
    float* sc = scores + (i64)h * score_stride;
    // Scores: one warp per position.
    for (int t = start + warp; t < end; t += n_warps) {
        const u16* k = keys + (i64)t * kv_stride + (i64)kv * head_dim;
        float d = 0.0f;
        for (int i = lane; i < head_dim; i += 32) d += qh[i] * f16_to_f32(k[i]);
        d = warp_sum(d);
        if (lane == 0) {
            float s = d * scale;
            if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
            sc[t] = s;
        }
    }
    __syncthreads();
    // Softmax over [start, end).
    float m = neg_infinity();
    for (int t = start + threadIdx.x; t < end; t += blockDim.x) m = fmaxf(m, sc[t]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int t = start + threadIdx.x; t < end; t += blockDim.x) {
        const float e = expf(sc[t] - m);
        sc[t] = e;
        sum += e;
    }
    const float inv = 1.0f / block_sum(sum, scratch);
    // block_sum synchronised the block: every probability is written.
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
        const u16* v = values + (i64)kv * head_dim + i;
        float acc = 0.0f;
        for (int t = start; t < end; ++t) acc += sc[t] * f16_to_f32(v[(i64)t * kv_stride]);
        out[(i64)h * head_dim + i] = acc * inv;
    }
}
