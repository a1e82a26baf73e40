//! Matrix-matrix products through the `gemm` crate (prompt processing,
//! batched attention, the quantizer's calibration and GPTQ updates), behind
//! views whose bounds are checked before the one `unsafe` call.

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
