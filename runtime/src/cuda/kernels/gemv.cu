// Packed integer groups (nibble's Q2G, Q3G, Q4G, Q8G and Q4GM; format/FORMAT.md) times an f32
// vector, the weights read once with the dequantization fused: the decode path's linear layers.
// A row is groups of `group_size` columns (the last may be shorter), each a 4-byte header (f16
// scale, then a u8 zero point and a reserved byte, or for Q4GM an f16 minimum) and its codes in
// sub-blocks of 32 (format/src/quant.rs: `pack_sub_block`).

// Bytes of one sub-block of 32 codes.
template <int BITS>
__device__ __forceinline__ int sub_block_bytes() {
    return BITS == 3 ? 12 : BITS * 4;
}

// Code `j` (0..32) of the sub-block at `b`.
template <int BITS>
__device__ __forceinline__ int sub_code(const u8* b, int j) {
    if (BITS == 8) return b[j];
    if (BITS == 4) return j < 16 ? (b[j] & 15) : (b[j - 16] >> 4);
    const int low = (b[j & 7] >> (2 * (j >> 3))) & 3;
    if (BITS == 2) return low;
    const u32 high = (u32)b[8] | ((u32)b[9] << 8) | ((u32)b[10] << 16) | ((u32)b[11] << 24);
    return low | (int)(((high >> j) & 1u) << 2);
}

// Weight `code` of a group: scale·(code − zero), or scale·code + min (MIN).
template <bool MIN>
__device__ __forceinline__ float weight(int code, float scale, float zero_or_min) {
    return MIN ? scale * (float)code + zero_or_min : scale * ((float)code - zero_or_min);
}

// Group `g`'s header and codes start here: every group but the last is whole.
template <int BITS>
__device__ __forceinline__ const u8* group_at(const u8* row, int g, int group_size) {
    const i64 group_bytes = 4 + (i64)((group_size + 31) / 32) * sub_block_bytes<BITS>();
    return row + (i64)g * group_bytes;
}

// y[r] = Σ_c ŵ[r, c]·x[c]: one warp per row (blockDim = 32 × rows per block), lane j takes
// column j of every sub-block, so a warp reads its row's bytes in order.
template <int BITS, bool MIN>
__device__ void gemv_packed(const u8* w, const float* x, float* y, int rows, int cols,
                            int group_size, i64 row_bytes) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const int lane = threadIdx.x;
    const u8* r = w + (i64)row * row_bytes;
    const int n_groups = (cols + group_size - 1) / group_size;
    float acc = 0.0f;
    for (int g = 0; g < n_groups; ++g) {
        const u8* grp = group_at<BITS>(r, g, group_size);
        const float scale = f16_to_f32(load_u16(grp));
        const float zm = MIN ? f16_to_f32(load_u16(grp + 2)) : (float)grp[2];
        const int c0 = g * group_size;
        const int len = min(group_size, cols - c0);
        for (int s = 0; s * 32 < len; ++s) {
            const int c = s * 32 + lane;
            if (c < len) {
                const int code = sub_code<BITS>(grp + 4 + s * sub_block_bytes<BITS>(), lane);
                acc += weight<MIN>(code, scale, zm) * x[c0 + c];
            }
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

// out[r, c] = ŵ[r, c] in f32: the prompt path's tiles, multiplied by cuBLAS. One thread per
// weight.
template <int BITS, bool MIN>
__device__ void dequant_packed(const u8* w, float* out, int rows, int cols, int group_size,
                               i64 row_bytes) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (i64)rows * cols) return;
    const int row = (int)(i / cols), col = (int)(i % cols);
    const int g = col / group_size, in_group = col % group_size;
    const u8* grp = group_at<BITS>(w + (i64)row * row_bytes, g, group_size);
    const float scale = f16_to_f32(load_u16(grp));
    const float zm = MIN ? f16_to_f32(load_u16(grp + 2)) : (float)grp[2];
    const int code = sub_code<BITS>(grp + 4 + (in_group / 32) * sub_block_bytes<BITS>(),
                                    in_group % 32);
    out[i] = weight<MIN>(code, scale, zm);
}

#define NIBBLE_PACKED(NAME, BITS, MIN)                                                          \
    extern "C" __global__ void gemv_##NAME(const u8* w, const float* x, float* y, int rows,    \
                                           int cols, int group_size, i64 row_bytes) {         \
        gemv_packed<BITS, MIN>(w, x, y, rows, cols, group_size, row_bytes);                   \
    }                                                                                          \
    extern "C" __global__ void dequant_##NAME(const u8* w, float* out, int rows, int cols,    \
                                              int group_size, i64 row_bytes) {                \
        dequant_packed<BITS, MIN>(w, out, rows, cols, group_size, row_bytes);                 \
    }

NIBBLE_PACKED(q2g, 2, false)
NIBBLE_PACKED(q3g, 3, false)
NIBBLE_PACKED(q4g, 4, false)
NIBBLE_PACKED(q8g, 8, false)
NIBBLE_PACKED(q4gm, 4, true)

// y[r] = Σ_c w[r, c]·x[c] for f32 rows (norm-free float layers, an F32 head).
extern "C" __global__ void gemv_f32(const float* w, const float* x, float* y, int rows, int cols) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const float* r = w + (i64)row * cols;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 32) acc += r[c] * x[c];
    acc = warp_sum(acc);
    if (threadIdx.x == 0) y[row] = acc;
}

// The same for f16 rows (an F16 embedding used as the head).
extern "C" __global__ void gemv_f16(const u16* w, const float* x, float* y, int rows, int cols) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const u16* r = w + (i64)row * cols;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 32) acc += f16_to_f32(r[c]) * x[c];
    acc = warp_sum(acc);
    if (threadIdx.x == 0) y[row] = acc;
}
