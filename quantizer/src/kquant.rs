//! GGUF's K-quant grids (`Q3_K`, `Q4_K`, `Q5_K`, `Q6_K`) for GPTQ and RTN.
//!
//! A K-quant super-block covers 256 consecutive inputs of a row: its
//! sub-blocks (8 of 32 for `Q4_K`/`Q5_K`, 16 of 16 for `Q3_K`/`Q6_K`) each have their own
//! grid, but a sub-block's scale (and minimum) is stored as a small integer
//! times the super-block's f16 scale (`d`, and `dmin` for the minimums).
//! So the grids of all sub-blocks must be fixed together: GPTQ chooses them
//! when it reaches a super-block's first column, from the super-block's
//! current (error-updated) weights, each input's error weighted by the
//! Hessian diagonal (llama.cpp's importance matrix), then quantizes the
//! columns one by one on those fixed grids, compensating as usual.
//!
//! Choosing one super-block:
//! 1. each sub-block's best free grid by the weighted search
//!    ([`Grid::search_params`]: `Q4_K`/`Q5_K` a free minimum kept ≤ 0,
//!    `Q3_K`/`Q6_K` a signed grid);
//! 2. `d` (and `dmin`) by a search over candidate super-scales minimising
//!    the importance-weighted error of the integer sub-block scales
//!    (llama.cpp's `make_qp_quants` idea), rounded to f16;
//! 3. each sub-block's integer scale (and minimum) refined among its
//!    neighbours by the weighted error of the sub-block's own weights on
//!    the grid it gives, which llama.cpp does not do: the rounding of the
//!    scales is chosen for the weights, not for the scales.

use nibble_format::kquant_pack::{
    pack_row_q3_k, pack_row_q4_k, pack_row_q5_k, pack_row_q6_k, Q4kScales, QK_K,
};
use nibble_format::DType;

use crate::grid::Grid;

/// A K-quant block type GPTQ can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KQuant {
    /// 3-bit signed codes, 6-bit signed sub-block scales.
    Q3K,
    /// 4-bit codes, free minimum ≤ 0, 6-bit sub-block scales and minimums.
    Q4K,
    /// 5-bit codes, otherwise as `Q4_K`.
    Q5K,
    /// 6-bit signed codes, int8 sub-block scales.
    Q6K,
}

/// Weights per super-block.
pub const SUPER_BLOCK: usize = QK_K;

impl KQuant {
    /// Inputs per sub-block (each with its own grid).
    pub fn group_size(self) -> usize {
        match self {
            KQuant::Q4K | KQuant::Q5K => 32,
            KQuant::Q3K | KQuant::Q6K => 16,
        }
    }

    /// The grid each sub-block's codes are on.
    pub fn grid(self) -> Grid {
        let signed = |bits| Grid {
            bits,
            sym: true,
            free_min: false,
        };
        match self {
            KQuant::Q3K => signed(3),
            KQuant::Q4K => Grid::free_min_of(4),
            KQuant::Q5K => Grid::free_min_of(5),
            KQuant::Q6K => signed(6),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            KQuant::Q3K => DType::Q3K,
            KQuant::Q4K => DType::Q4K,
            KQuant::Q5K => DType::Q5K,
            KQuant::Q6K => DType::Q6K,
        }
    }

    /// The range of a signed grid's integer sub-block scales.
    fn signed_scales(self) -> (i32, i32) {
        match self {
            KQuant::Q3K => (-32, 31),
            _ => (-128, 127),
        }
    }

    /// Choose the grids of one super-block of one row: `x` its 256 current
    /// values, sub-block by sub-block (in any order within a sub-block), `wt`
    /// what each value's squared error costs. Writes each sub-block's
    /// `(scale, zero)` on [`KQuant::grid`] into `out` and returns the
    /// super-block's `[d, dmin]` (f16 values; `dmin` is 0 for the signed grids).
    pub fn choose(self, x: &[f64], wt: &[f64], out: &mut [(f64, f64)]) -> [f32; 2] {
        debug_assert!(x.len() == SUPER_BLOCK && wt.len() == SUPER_BLOCK);
        let gs = self.group_size();
        debug_assert_eq!(out.len(), SUPER_BLOCK / gs);
        let grid = self.grid();
        let subs = || x.chunks_exact(gs).zip(wt.chunks_exact(gs));
        // Each sub-block's cost weight: its total importance (never all zero).
        let sw: Vec<f64> = wt
            .chunks_exact(gs)
            .map(|w| w.iter().sum::<f64>() + 1e-30)
            .collect();
        match self {
            KQuant::Q4K | KQuant::Q5K => {
                let asym = Grid {
                    bits: grid.bits,
                    sym: false,
                    free_min: false,
                };
                // 1. free grids; a minimum above 0 cannot be stored (dmin·m ≥ 0
                //    is subtracted): such a sub-block gets the best grid through 0.
                let (scales, negmins): (Vec<f64>, Vec<f64>) = subs()
                    .map(|(x, w)| {
                        let (s, mn) = grid.search_params(x, w);
                        if mn <= 0.0 {
                            (s.max(0.0), -mn)
                        } else {
                            (asym.search_params(x, w).0.max(0.0), 0.0)
                        }
                    })
                    .unzip();
                // 2. super-scales.
                let d = f16_round(super_scale(&scales, &sw, 0, 63));
                let dmin = f16_round(super_scale(&negmins, &sw, 0, 63));
                // 3. integer scales and minimums by the weights' own error.
                for (k, (x, w)) in subs().enumerate() {
                    let sc0 = int_near(scales[k], d, 0, 63);
                    let m0 = int_near(negmins[k], dmin, 0, 63);
                    let mut best = (f64::INFINITY, (0.0, 0.0));
                    for sc in (sc0 - 1).max(0)..=(sc0 + 1).min(63) {
                        for m in (m0 - 1).max(0)..=(m0 + 1).min(63) {
                            let p = (f64::from(d * sc as f32), -f64::from(dmin * m as f32));
                            let e = error_on(grid, x, w, p);
                            if e < best.0 {
                                best = (e, p);
                            }
                        }
                    }
                    out[k] = best.1;
                }
                [d, dmin]
            }
            KQuant::Q3K | KQuant::Q6K => {
                let zero = (grid.maxq() + 1.0) / 2.0;
                let (lo, hi) = self.signed_scales();
                let scales: Vec<f64> = subs().map(|(x, w)| grid.search_params(x, w).0).collect();
                let d = f16_round(super_scale(&scales, &sw, lo, hi));
                for (k, (x, w)) in subs().enumerate() {
                    let sc0 = int_near(scales[k], d, lo, hi);
                    let mut best = (f64::INFINITY, (0.0, zero));
                    for sc in (sc0 - 2).max(lo)..=(sc0 + 2).min(hi) {
                        let p = (f64::from(d * sc as f32), zero);
                        let e = error_on(grid, x, w, p);
                        if e < best.0 {
                            best = (e, p);
                        }
                    }
                    out[k] = best.1;
                }
                [d, 0.0]
            }
        }
    }

    /// Pack one row: `codes[cols]` on [`KQuant::grid`], each sub-block's
    /// `(scale, zero)` as [`KQuant::choose`] gave them, each super-block's
    /// `[d, dmin]`. The integer sub-block scales are recovered exactly
    /// (`d·sc` of an f16 `d` and a 6- or 8-bit `sc` is exact in f32).
    ///
    /// # Panics
    /// If `codes` is not whole super-blocks with their scales.
    pub fn pack_row(
        self,
        codes: &[u8],
        scales: &[f32],
        zeros: &[f32],
        supers: &[[f32; 2]],
        out: &mut Vec<u8>,
    ) {
        let n_sub = SUPER_BLOCK / self.group_size();
        match self {
            KQuant::Q4K | KQuant::Q5K => {
                let blocks: Vec<Q4kScales> = supers
                    .iter()
                    .enumerate()
                    .map(|(b, &[d, dmin])| {
                        let g = b * n_sub..(b + 1) * n_sub;
                        let int = |v: f32, unit: f32| {
                            if unit == 0.0 {
                                0
                            } else {
                                (v / unit).round().clamp(0.0, 63.0) as u8
                            }
                        };
                        let (s, z) = (&scales[g.clone()], &zeros[g]);
                        Q4kScales {
                            d,
                            dmin,
                            sc: std::array::from_fn(|j| int(s[j], d)),
                            m: std::array::from_fn(|j| int(-z[j], dmin)),
                        }
                    })
                    .collect();
                if self == KQuant::Q4K {
                    pack_row_q4_k(codes, &blocks, out);
                } else {
                    pack_row_q5_k(codes, &blocks, out);
                }
            }
            KQuant::Q3K | KQuant::Q6K => {
                let (lo, hi) = self.signed_scales();
                let sc: Vec<[i8; 16]> = supers
                    .iter()
                    .enumerate()
                    .map(|(b, &[d, _])| {
                        std::array::from_fn(|j| {
                            if d == 0.0 {
                                0
                            } else {
                                (scales[b * n_sub + j] / d)
                                    .round()
                                    .clamp(lo as f32, hi as f32)
                                    as i8
                            }
                        })
                    })
                    .collect();
                let d: Vec<f32> = supers.iter().map(|s| s[0]).collect();
                if self == KQuant::Q3K {
                    pack_row_q3_k(codes, &sc, &d, out);
                } else {
                    pack_row_q6_k(codes, &sc, &d, out);
                }
            }
        }
    }
}

fn f16_round(v: f64) -> f32 {
    half::f16::from_f64(v).to_f32()
}

/// The integer nearest `v / unit` in `lo..=hi` (0 for a zero unit).
fn int_near(v: f64, unit: f32, lo: i32, hi: i32) -> i32 {
    if unit == 0.0 {
        return 0;
    }
    (v / f64::from(unit))
        .round()
        .clamp(f64::from(lo), f64::from(hi)) as i32
}

/// A super-scale `u` for the values `v` (integers `lo..=hi` times `u`)
/// minimising Σ sw·(v − u·round(v/u))²: candidates map the largest
/// magnitude to each end of the range and slightly inside it, each refitted
/// by weighted least squares on its integers.
fn super_scale(v: &[f64], sw: &[f64], lo: i32, hi: i32) -> f64 {
    let amax = v
        .iter()
        .fold(0f64, |a, &x| if x.abs() > a.abs() { x } else { a });
    if amax == 0.0 {
        return 0.0;
    }
    let err = |u: f64| -> f64 {
        v.iter()
            .zip(sw)
            .map(|(&x, &w)| {
                let q = (x / u).round().clamp(f64::from(lo), f64::from(hi));
                w * (x - u * q).powi(2)
            })
            .sum()
    };
    let refit = |u: f64| -> f64 {
        let (mut num, mut den) = (0f64, 0f64);
        for (&x, &w) in v.iter().zip(sw) {
            let q = (x / u).round().clamp(f64::from(lo), f64::from(hi));
            num += w * x * q;
            den += w * q * q;
        }
        if den > 0.0 {
            num / den
        } else {
            u
        }
    };
    let mut best = (f64::INFINITY, 0.0);
    for end in [f64::from(hi), f64::from(lo)] {
        if end == 0.0 {
            continue;
        }
        for step in 0..=8 {
            // Toward the middle: |end| − 0, 0.25, …, 2.
            let n = end - end.signum() * f64::from(step) * 0.25;
            let u = amax / n;
            for u in [u, refit(u)] {
                if u.is_finite() && u != 0.0 {
                    let e = err(u);
                    if e < best.0 {
                        best = (e, u);
                    }
                }
            }
        }
    }
    best.1
}

/// Σ wt·(x − x̂)² of `x` on `grid` with `(scale, zero)`; a zero scale
/// decodes every code to the minimum (free minimum) or to 0.
fn error_on(grid: Grid, x: &[f64], wt: &[f64], (s, z): (f64, f64)) -> f64 {
    x.iter()
        .zip(wt)
        .map(|(&v, &w)| {
            let q = if s == 0.0 {
                if grid.free_min {
                    z
                } else {
                    0.0
                }
            } else {
                f64::from(grid.dequant(grid.code(v, s, z), s, z))
            };
            w * (v - q).powi(2)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::centered_f32;
    use nibble_format::gguf::GgmlType;
    use nibble_format::gguf_blocks::dequantize_blocks;

    fn block(seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut next = centered_f32(seed);
        let x: Vec<f64> = (0..SUPER_BLOCK).map(|_| f64::from(next())).collect();
        let wt: Vec<f64> = (0..SUPER_BLOCK)
            .map(|_| f64::from(next()).abs() * 4.0 + 0.01)
            .collect();
        (x, wt)
    }

    /// Quantize a super-block on the chosen grids, pack it, decode it with
    /// the GGUF reference decoder: the decoded values are the grids' own
    /// dequantized values (the packing loses nothing), and the weighted
    /// error is below plain rounding on llama.cpp-style unweighted
    /// super-scales (d = max scale / 63 or / −128, integer scales rounded).
    #[test]
    fn chosen_grids_pack_exactly_and_beat_plain_rounding() {
        for kq in [KQuant::Q3K, KQuant::Q4K, KQuant::Q5K, KQuant::Q6K] {
            let grid = kq.grid();
            let gs = kq.group_size();
            let mut total = [0f64; 2];
            for seed in 0..20u64 {
                let (mut x, wt) = block(0x5eed_0000 + seed);
                if seed == 3 {
                    // A zero sub-block and an all-positive one.
                    x[..gs].iter_mut().for_each(|v| *v = 0.0);
                    x[gs..2 * gs].iter_mut().for_each(|v| *v = v.abs() + 0.5);
                }
                let mut p = vec![(0.0, 0.0); SUPER_BLOCK / gs];
                let sup = kq.choose(&x, &wt, &mut p);
                let codes: Vec<u8> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let (s, z) = p[i / gs];
                        grid.code_f32(v as f32, s as f32, z as f32) as u8
                    })
                    .collect();
                let (scales, zeros): (Vec<f32>, Vec<f32>) =
                    p.iter().map(|&(s, z)| (s as f32, z as f32)).unzip();
                let mut packed = Vec::new();
                kq.pack_row(&codes, &scales, &zeros, &[sup], &mut packed);
                let mut dec = vec![0f32; SUPER_BLOCK];
                let ty = GgmlType::of_block_dtype(kq.dtype()).unwrap();
                assert!(dequantize_blocks(ty, &packed, &mut dec));
                for i in 0..SUPER_BLOCK {
                    let (s, z) = (scales[i / gs], zeros[i / gs]);
                    let want = if s == 0.0 && !grid.free_min {
                        0.0
                    } else {
                        grid.dequant(f64::from(codes[i]), f64::from(s), f64::from(z))
                    };
                    assert!(
                        (dec[i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                        "{kq:?} seed {seed} weight {i}: decoded {} vs {want}",
                        dec[i]
                    );
                    total[0] += wt[i] * (x[i] - f64::from(dec[i])).powi(2);
                }
                total[1] += plain(kq, &x, &wt);
            }
            assert!(
                total[0] < total[1] * 0.85,
                "{kq:?}: chosen {} vs plain {}",
                total[0],
                total[1]
            );
        }
    }

    /// Min/max sub-block grids (the minimum taken ≤ 0, the signed grid's
    /// largest magnitude at the top code), super-scale from the largest sub-scale,
    /// integer scales rounded: the weighted error of that baseline.
    fn plain(kq: KQuant, x: &[f64], wt: &[f64]) -> f64 {
        let grid = kq.grid();
        let gs = kq.group_size();
        let params: Vec<(f64, f64)> = x
            .chunks_exact(gs)
            .map(|c| {
                let lo = c.iter().fold(0f64, |a, &v| a.min(v));
                let hi = c.iter().fold(lo, |a, &v| a.max(v));
                let amax = c.iter().fold(0f64, |a, &v| a.max(v.abs()));
                let zero = (grid.maxq() + 1.0) / 2.0;
                if grid.free_min {
                    ((hi - lo) / grid.maxq(), lo)
                } else {
                    (amax / (zero - 1.0), zero)
                }
            })
            .collect();
        let smax = params.iter().map(|p| p.0).fold(0f64, f64::max);
        let mmax = params.iter().map(|p| -p.1).fold(0f64, f64::max);
        let (lo, hi) = kq.signed_scales();
        let (d, dmin) = if grid.free_min {
            (f16_round(smax / 63.0), f16_round(mmax / 63.0))
        } else {
            (f16_round(smax / f64::from(hi)), 0.0)
        };
        x.chunks_exact(gs)
            .zip(wt.chunks_exact(gs))
            .zip(&params)
            .map(|((c, w), &(s, z))| {
                let p = if grid.free_min {
                    (
                        f64::from(d * int_near(s, d, 0, 63) as f32),
                        -f64::from(dmin * int_near(-z, dmin, 0, 63) as f32),
                    )
                } else {
                    (f64::from(d * int_near(s, d, lo, hi) as f32), z)
                };
                error_on(grid, c, w, p)
            })
            .sum()
    }
}
