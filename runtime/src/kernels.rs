//! Float dot-product kernels used by the matrix-vector products.
//!
//! These are the portable scalar references: written so the compiler can
//! auto-vectorize them (16 independent accumulators) but without any
//! instruction-set-specific code. The quantized-weight kernels and their
//! AVX2 / AVX-512 / NEON versions (each beside its scalar reference, picked
//! once at load) belong to the SIMD work and will share this module's shape.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use nibble_format::dtype::{sub_block_bytes, GROUP_HEADER, SUB_BLOCK};
use nibble_format::quant::unpack_sub_block;

const LANES: usize = 16;

/// `Σ a[i]·b[i]` in f32 with 16 independent partial sums.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction of the partial sums.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// `Σ w[i]·x[i]` with f16 weights, converted in 64-element tiles on the stack.
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut tile = [0f32; 64];
    let mut sum = 0f32;
    for (wc, xc) in w.chunks(64).zip(x.chunks(64)) {
        let t = &mut tile[..wc.len()];
        wc.convert_to_f32_slice(t);
        sum += dot_f32(t, xc);
    }
    sum
}

/// `Σ w[i]·x[i]` with bf16 weights.
pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut tile = [0f32; 64];
    let mut sum = 0f32;
    for (wc, xc) in w.chunks(64).zip(x.chunks(64)) {
        let t = &mut tile[..wc.len()];
        for (o, v) in t.iter_mut().zip(wc) {
            *o = v.to_f32();
        }
        sum += dot_f32(t, xc);
    }
    sum
}

/// `Σ ŵ[i]·x[i]` over one packed row (`format::quant` layout) with f32
/// activations: per group, scale · (Σ code·x − zero · Σ x). Scalar reference
/// for the SIMD dequant-dot kernels. `x.len()` is the row's column count.
pub fn dot_qg_f32(bits: u32, group_size: usize, row: &[u8], x: &[f32]) -> f32 {
    let sb = sub_block_bytes(bits);
    let mut codes = [0u8; SUB_BLOCK];
    let mut p = 0;
    let mut sum = 0f32;
    for xg in x.chunks(group_size) {
        let scale = f16::from_le_bytes([row[p], row[p + 1]]).to_f32();
        let zero = f32::from(row[p + 2]);
        p += GROUP_HEADER;
        let (mut acc, mut xsum) = (0f32, 0f32);
        for xs in xg.chunks(SUB_BLOCK) {
            unpack_sub_block(bits, &row[p..p + sb], &mut codes);
            p += sb;
            for (&c, &xv) in codes.iter().zip(xs) {
                acc += f32::from(c) * xv;
                xsum += xv;
            }
        }
        sum += scale * (acc - zero * xsum);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_qg_matches_dequantized_dot_on_ragged_rows_and_zero_groups() {
        // Named tolerance for packed groups with f32 activations: relative to Σ|ŵ·x|.
        const TOL_QG_F32: f64 = 1e-5;
        let mut seed = 11u64;
        for bits in [2u32, 3, 4, 8] {
            let maxq = (1u32 << bits) - 1;
            for (cols, gs) in [
                (32usize, 32usize),
                (172, 32),
                (172, 64),
                (172, 172),
                (8, 8),
                (576, 128),
                (1536, 128),
            ] {
                let n_groups = cols.div_ceil(gs);
                let codes: Vec<u8> = (0..cols)
                    .map(|_| ((lcg(&mut seed) + 1.0) * 0.5 * (maxq as f32 + 0.99)) as u8)
                    .collect();
                let mut scales: Vec<f32> = (0..n_groups)
                    .map(|_| lcg(&mut seed).abs() * 0.1 + 1e-3)
                    .collect();
                let zeros: Vec<u8> = (0..n_groups)
                    .map(|g| (g as u32 * 3 % (maxq + 1)) as u8)
                    .collect();
                scales[0] = 0.0; // an all-zero group
                let x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed)).collect();
                let mut row = Vec::new();
                nibble_format::quant::pack_row(bits, gs, &codes, &scales, &zeros, &mut row);
                let mut w = vec![0f32; cols];
                nibble_format::quant::dequantize_row(bits, gs, &row, &mut w);
                let want: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let mag: f64 = w
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs())
                    .sum();
                let got = f64::from(dot_qg_f32(bits, gs, &row, &x));
                assert!(
                    (got - want).abs() <= TOL_QG_F32 * mag.max(1e-6),
                    "bits {bits} cols {cols} gs {gs}: {got} vs {want}"
                );
            }
        }
    }

    fn reference(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn dot_kernels_match_f64_reference_on_ragged_lengths() {
        let mut seed = 7;
        for n in [0usize, 1, 7, 15, 16, 17, 63, 64, 65, 172, 576, 1000] {
            let a: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let r = reference(&a, &b);
            let tol = 1e-5 * (n as f64).max(1.0);
            assert!((f64::from(dot_f32(&a, &b)) - r).abs() < tol, "f32 n={n}");
            let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let a16f: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            let r16 = reference(&a16f, &b);
            assert!(
                (f64::from(dot_f16(&a16, &b)) - r16).abs() < tol,
                "f16 n={n}"
            );
            let abf: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let abff: Vec<f32> = abf.iter().map(|v| v.to_f32()).collect();
            let rbf = reference(&abff, &b);
            assert!(
                (f64::from(dot_bf16(&abf, &b)) - rbf).abs() < tol,
                "bf16 n={n}"
            );
        }
    }
}

/// A strided f32 matrix: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A mutable strided f32 matrix (see [`MatRef`]).
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0
        || cols == 0
        || (rows - 1)
            .checked_mul(rs)
            .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)))
            .is_some_and(|last| {
                last < len && rs <= isize::MAX as usize && cs <= isize::MAX as usize
            })
}

/// `dst = (accumulate ? dst : 0) + scale · lhs · rhs` through the `gemm`
/// crate (runtime-dispatched SIMD micro-kernels), on the current rayon pool
/// when `threads > 1`. Panics if any view does not fit its slice, so the
/// unsafe call below never reads or writes out of bounds.
pub fn matmul(
    dst: MatMut<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    gemm_checked(
        (dst.data, dst.rows, dst.cols, dst.rs, dst.cs),
        (lhs.data, lhs.rows, lhs.cols, lhs.rs, lhs.cs),
        (rhs.data, rhs.rows, rhs.cols, rhs.rs, rhs.cs),
        1.0,
        scale,
        accumulate,
        threads,
    );
}

/// A strided f64 matrix view: `(data, rows, cols, row stride, column stride)`.
pub type MatF64<'a> = (&'a [f64], usize, usize, usize, usize);

/// The f64 version of [`matmul`] (used by the quantizer's GPTQ updates).
pub fn matmul_f64(
    dst: (&mut [f64], usize, usize, usize, usize),
    lhs: MatF64<'_>,
    rhs: MatF64<'_>,
    scale: f64,
    accumulate: bool,
    threads: usize,
) {
    gemm_checked(dst, lhs, rhs, 1.0, scale, accumulate, threads);
}

#[allow(clippy::type_complexity)]
fn gemm_checked<T: Copy + 'static>(
    (dst, m, n, drs, dcs): (&mut [T], usize, usize, usize, usize),
    (lhs, lm, lk, lrs, lcs): (&[T], usize, usize, usize, usize),
    (rhs, rk, rn, rrs, rcs): (&[T], usize, usize, usize, usize),
    one: T,
    scale: T,
    accumulate: bool,
    threads: usize,
) {
    assert!(
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            || std::any::TypeId::of::<T>() == std::any::TypeId::of::<f64>(),
        "matmul: f32 or f64 only"
    );
    assert_eq!(m, lm, "matmul: dst/lhs rows");
    assert_eq!(n, rn, "matmul: dst/rhs cols");
    assert_eq!(lk, rk, "matmul: inner dimension");
    assert!(fits(dst.len(), m, n, drs, dcs), "matmul: dst out of bounds");
    assert!(
        fits(lhs.len(), lm, lk, lrs, lcs),
        "matmul: lhs out of bounds"
    );
    assert!(
        fits(rhs.len(), rk, rn, rrs, rcs),
        "matmul: rhs out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: T is f32 or f64 (asserted), the element types gemm dispatches
    // to. Every element the call touches, (r, c) for r < rows, c < cols of
    // each operand, lies inside its slice (checked by `fits` above, with
    // strides ≤ isize::MAX). `dst` is a unique borrow, so it cannot alias
    // `lhs` or `rhs`. gemm reads `dst` only when `read_dst` (accumulate) is
    // set, and all of it is initialized.
    unsafe {
        gemm::gemm(
            m,
            n,
            lk,
            dst.as_mut_ptr(),
            dcs as isize,
            drs as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            one,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod matmul_tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_with_strides_and_accumulation() {
        let (m, n, k) = (5, 7, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        // rhs given transposed: b_t is [n, k], we multiply by b = b_t^T.
        let b_t: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        for threads in [1, 2] {
            let mut c = vec![1.0f32; m * n + 3];
            matmul(
                MatMut {
                    data: &mut c[3..],
                    rows: m,
                    cols: n,
                    rs: n,
                    cs: 1,
                },
                MatRef {
                    data: &a,
                    rows: m,
                    cols: k,
                    rs: k,
                    cs: 1,
                },
                MatRef {
                    data: &b_t,
                    rows: k,
                    cols: n,
                    rs: 1,
                    cs: k,
                },
                0.5,
                true,
                threads,
            );
            for i in 0..m {
                for j in 0..n {
                    let want: f32 =
                        1.0 + 0.5 * (0..k).map(|p| a[i * k + p] * b_t[j * k + p]).sum::<f32>();
                    assert!((c[3 + i * n + j] - want).abs() < 1e-5);
                }
            }
            assert_eq!(&c[..3], &[1.0; 3]);
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn matmul_rejects_views_that_do_not_fit() {
        let mut c = vec![0f32; 4];
        let a = vec![0f32; 4];
        matmul(
            MatMut {
                data: &mut c,
                rows: 2,
                cols: 3,
                rs: 3,
                cs: 1,
            },
            MatRef {
                data: &a,
                rows: 2,
                cols: 2,
                rs: 2,
                cs: 1,
            },
            MatRef {
                data: &a,
                rows: 2,
                cols: 3,
                rs: 3,
                cs: 1,
            },
            1.0,
            false,
            1,
        );
    }
}
