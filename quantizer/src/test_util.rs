//! Seeded inputs for the unit tests: one xorshift generator, not a copy per test.

/// xorshift64 from `seed` (non-zero).
pub fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Uniform f32 in [−0.5, 0.5) from `seed`.
pub fn centered_f32(seed: u64) -> impl FnMut() -> f32 {
    let mut next = xorshift(seed);
    move || (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// Uniform f64 in [0, 1) from `seed`.
pub fn unit_f64(seed: u64) -> impl FnMut() -> f64 {
    let mut next = xorshift(seed);
    move || (next() >> 11) as f64 / (1u64 << 53) as f64
}

/// H = Xᵀ·X of `k` rows of `cols` inputs (`x` row-major).
pub fn gram(x: &[f32], k: usize, cols: usize) -> Vec<f32> {
    let mut h = vec![0f32; cols * cols];
    for i in 0..cols {
        for j in 0..cols {
            h[i * cols + j] = (0..k).map(|t| x[t * cols + i] * x[t * cols + j]).sum();
        }
    }
    h
}
