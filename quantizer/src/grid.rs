//! Uniform integer grids, exactly as the GPTQ authors' `quant.py`:
//! `q = clamp(round(w / scale) + zero, 0, maxq)`, `ŵ = scale · (q − zero)`,
//! with round-half-to-even (torch.round), not Rust's half-away-from-zero;
//! and the free-minimum grid of GGUF's Q4_1 (nibble's `Q4GM`):
//! `q = clamp(round((w − min) / scale), 0, maxq)`, `ŵ = scale · q + min`,
//! whose minimum is any f16 rather than a multiple of the scale.

use crate::error::{QuantError, Result};

/// Bits and symmetry of a grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub bits: u32,
    /// Symmetric: zero point fixed at (maxq + 1) / 2.
    pub sym: bool,
    /// The "zero" of a (scale, zero) pair is the group's minimum, a value
    /// rather than an integer code (asymmetric 4-bit only): a group whose
    /// values all sit away from 0 keeps all 16 levels on them, where an
    /// integer zero point must reach 0 (`Q4GM`, GGUF's Q4_1).
    pub free_min: bool,
}

impl Grid {
    pub fn new(bits: u32, sym: bool) -> Result<Grid> {
        match bits {
            2 | 3 | 4 | 5 | 8 => Ok(Grid {
                bits,
                sym,
                free_min: false,
            }),
            b => Err(QuantError::UnsupportedBits(b)),
        }
    }

    /// The 4-bit free-minimum grid (`Q4GM`, GGUF's Q4_1).
    pub fn free_min_4bit() -> Grid {
        Grid::free_min_of(4)
    }

    /// The free-minimum grid of `bits` (the K-quants' sub-blocks: 4 for
    /// `Q4_K`, 5 for `Q5_K`).
    pub fn free_min_of(bits: u32) -> Grid {
        Grid {
            bits,
            sym: false,
            free_min: true,
        }
    }

    /// Largest code: 2^bits − 1.
    pub fn maxq(&self) -> f64 {
        f64::from((1u32 << self.bits) - 1)
    }

    /// (scale, zero) for one row's values `x` (quant.py `find_params`, per channel).
    /// Free minimum: (scale, min) spanning the values' own range, 0 not
    /// forced in (llama.cpp's Q4_1 rounding).
    pub fn find_params(&self, x: impl Iterator<Item = f64>) -> (f64, f64) {
        if self.free_min {
            let (lo, hi) = x.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            if !lo.is_finite() {
                return (1.0, 0.0);
            }
            let scale = (hi - lo) / self.maxq();
            return (if scale > 0.0 { scale } else { 1.0 }, lo);
        }
        let (mut xmin, mut xmax) = (0f64, 0f64);
        for v in x {
            xmin = xmin.min(v);
            xmax = xmax.max(v);
        }
        if self.sym {
            xmax = xmax.max(xmin.abs());
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            xmin = -1.0;
            xmax = 1.0;
        }
        let scale = (xmax - xmin) / self.maxq();
        let zero = if self.sym {
            (self.maxq() + 1.0) / 2.0
        } else {
            (-xmin / scale).round_ties_even()
        };
        (scale, zero)
    }

    /// (scale, zero) for `x` minimising the weighted squared error
    /// Σ wt·(x − ŵ)², where `wt` says how much each value's error costs
    /// (GPTQ passes the Hessian diagonal, each input's mean square; all ones
    /// gives the plain error).
    ///
    /// Min/max is rarely the best grid: the extreme weight is one value of
    /// the group, and a slightly smaller scale rounds all the others more
    /// finely. So candidate grids are tried and each one's scale is refitted
    /// by weighted least squares on the codes it gives, as llama.cpp's
    /// `make_qx_quants` does for its importance-weighted blocks:
    /// - symmetric: the zero stays at (maxq + 1)/2, so the codes are the
    ///   signed −(maxq+1)/2 … (maxq−1)/2 of Q4_0 and the scale may be
    ///   negative: the largest-magnitude weight goes to the longer side of
    ///   the grid (−8 at 4 bits, where min/max leaves that level unused);
    ///   21 inverse scales around each side's mapping are tried;
    /// - asymmetric: the min/max range shrunk by 1 %, …, 60 % (the GPTQ
    ///   reference's `mse` search), the integer zero rounded for each.
    ///
    /// The result is never worse than [`Grid::find_params`] on the weighted
    /// error: the min/max grid is the first candidate.
    /// - free minimum: 21 step counts from maxq − 1 to maxq + 1 over the
    ///   values' range, each one's scale *and* minimum refitted by weighted
    ///   least squares on its codes (llama.cpp's `make_qkx2_quants`).
    pub fn search_params(&self, x: &[f64], wt: &[f64]) -> (f64, f64) {
        debug_assert_eq!(x.len(), wt.len());
        if self.free_min {
            return self.search_free_min(x, wt);
        }
        let base = self.find_params(x.iter().copied());
        let err_of = |s: f64, z: f64| self.weighted_error(x, wt, s, z);
        // Weighted least-squares scale for the codes that (s, z) gives.
        let refit = |s: f64, z: f64| -> Option<f64> {
            let (mut num, mut den) = (0f64, 0f64);
            for (&v, &w) in x.iter().zip(wt) {
                let l = self.code(v, s, z) - z;
                num += w * v * l;
                den += w * l * l;
            }
            (den > 0.0 && num != 0.0).then(|| num / den)
        };
        let mut best = (err_of(base.0, base.1), base.0, base.1);
        let consider = |s: f64, z: f64, best: &mut (f64, f64, f64)| {
            if !(s.is_finite() && s != 0.0) {
                return;
            }
            for s in [Some(s), refit(s, z)].into_iter().flatten() {
                let e = err_of(s, z);
                if e < best.0 {
                    *best = (e, s, z);
                }
            }
        };
        if self.sym {
            let Some(&amax) = x.iter().max_by(|a, b| a.abs().total_cmp(&b.abs())) else {
                return base;
            };
            if amax == 0.0 {
                return base;
            }
            let z = (self.maxq() + 1.0) / 2.0;
            // The extreme weight on the negative end (−z) or the positive end (z − 1).
            for end in [-z, z - 1.0] {
                for step in -10..=10 {
                    let levels = end + f64::from(step) * 0.1 * end.signum();
                    if levels.abs() < 0.5 {
                        continue;
                    }
                    consider(amax / levels, z, &mut best);
                }
            }
        } else {
            let xmin = x.iter().fold(0f64, |m, &v| m.min(v));
            let xmax = x.iter().fold(0f64, |m, &v| m.max(v));
            if xmin == 0.0 && xmax == 0.0 {
                return base;
            }
            for i in 1..=60 {
                let p = 1.0 - f64::from(i) * 0.01;
                let (lo, hi) = (p * xmin, p * xmax);
                let s = (hi - lo) / self.maxq();
                let z = (-lo / s).round_ties_even().clamp(0.0, self.maxq());
                consider(s, z, &mut best);
            }
        }
        (best.1, best.2)
    }

    /// Σ wt·(x − ŵ)² on (scale, zero).
    fn weighted_error(&self, x: &[f64], wt: &[f64], s: f64, z: f64) -> f64 {
        x.iter()
            .zip(wt)
            .map(|(&v, &w)| {
                let d = v - self.value(self.code(v, s, z), s, z);
                w * d * d
            })
            .sum()
    }

    /// [`Grid::search_params`] for the free-minimum grid.
    fn search_free_min(&self, x: &[f64], wt: &[f64]) -> (f64, f64) {
        let base = self.find_params(x.iter().copied());
        let (lo, hi) = (base.1, base.1 + base.0 * self.maxq());
        if x.is_empty() || hi <= lo {
            return base;
        }
        // Weighted least-squares (scale, min) for the codes that (s, m) gives:
        // minimise Σ w·(x − s·l − m)² over s and m (a 2 × 2 system).
        let refit = |s: f64, m: f64| -> Option<(f64, f64)> {
            let (mut sw, mut sl, mut sll, mut sx, mut sxl) = (0f64, 0f64, 0f64, 0f64, 0f64);
            for (&v, &w) in x.iter().zip(wt) {
                let l = self.code(v, s, m);
                sw += w;
                sl += w * l;
                sll += w * l * l;
                sx += w * v;
                sxl += w * v * l;
            }
            let det = sw * sll - sl * sl;
            (det > 0.0).then(|| ((sw * sxl - sl * sx) / det, (sll * sx - sl * sxl) / det))
        };
        let mut best = (self.weighted_error(x, wt, base.0, base.1), base.0, base.1);
        for step in -10..=10 {
            let s = (hi - lo) / (self.maxq() + f64::from(step) * 0.1);
            for (s, m) in [Some((s, lo)), refit(s, lo)].into_iter().flatten() {
                if !(s.is_finite() && s > 0.0 && m.is_finite()) {
                    continue;
                }
                let e = self.weighted_error(x, wt, s, m);
                if e < best.0 {
                    best = (e, s, m);
                }
            }
        }
        (best.1, best.2)
    }

    /// The integer code of `w` on (scale, zero); with a free minimum,
    /// `zero` is the minimum.
    pub fn code(&self, w: f64, scale: f64, zero: f64) -> f64 {
        if self.free_min {
            return ((w - zero) / scale)
                .round_ties_even()
                .clamp(0.0, self.maxq());
        }
        ((w / scale).round_ties_even() + zero).clamp(0.0, self.maxq())
    }

    /// The code of an f32 weight computed in f32 arithmetic, exactly as
    /// torch does for an unmodified weight (used by RTN).
    pub fn code_f32(&self, w: f32, scale: f32, zero: f32) -> f64 {
        let maxq = self.maxq() as f32;
        if self.free_min {
            return f64::from(((w - zero) / scale).round_ties_even().clamp(0.0, maxq));
        }
        f64::from(((w / scale).round_ties_even() + zero).clamp(0.0, maxq))
    }

    /// Dequantized value of a code, in f32 as the reference computes it
    /// (free minimum: as the runtime's `Q4GM` decoder, a multiply, then an add).
    pub fn dequant(&self, code: f64, scale: f64, zero: f64) -> f32 {
        if self.free_min {
            return scale as f32 * code as f32 + zero as f32;
        }
        scale as f32 * (code as f32 - zero as f32)
    }

    /// Dequantized value in f64 (the search's arithmetic).
    fn value(&self, code: f64, scale: f64, zero: f64) -> f64 {
        if self.free_min {
            scale * code + zero
        } else {
            scale * (code - zero)
        }
    }

    /// (scale, zero) as the file stores them: scale on f16, and a free
    /// minimum on f16 too (an integer zero point is already exact).
    pub fn stored(&self, scale: f64, zero: f64) -> (f64, f64) {
        let f16 = |v: f64| f64::from(half::f16::from_f64(v));
        (f16(scale), if self.free_min { f16(zero) } else { zero })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even_like_torch() {
        let g = Grid::new(4, false).unwrap();
        assert_eq!(g.code(2.5, 1.0, 0.0), 2.0);
        assert_eq!(g.code(3.5, 1.0, 0.0), 4.0);
        assert_eq!(g.code(-0.5, 1.0, 1.0), 1.0);
        assert_eq!(g.code(100.0, 1.0, 0.0), 15.0);
    }

    #[test]
    fn params_follow_quant_py() {
        let g4s = Grid::new(4, true).unwrap();
        let (s, z) = g4s.find_params([-0.3, 0.1, 0.2].into_iter());
        assert!((s - 0.6 / 15.0).abs() < 1e-12 && z == 8.0);
        let g4 = Grid::new(4, false).unwrap();
        let (s, z) = g4.find_params([0.0, 0.0].into_iter());
        assert!((s - 2.0 / 15.0).abs() < 1e-12 && z == 8.0 && g4.code(0.0, s, z) == 8.0);
        let (s, z) = g4.find_params([0.5, 1.5].into_iter());
        assert!((s - 0.1).abs() < 1e-12 && z == 0.0, "xmin clamps to 0");
        assert!(Grid::new(6, false).is_err() && Grid::new(5, true).is_ok());
    }

    /// A group of 32 Box–Muller normals and error weights spread over two
    /// decades.
    fn gaussian_group(uniform: &mut impl FnMut() -> f64) -> (Vec<f64>, Vec<f64>) {
        let x = (0..32)
            .map(|_| {
                let (a, b) = (uniform().max(1e-12), uniform());
                (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
            })
            .collect();
        let wt = (0..32).map(|_| 10f64.powf(2.0 * uniform())).collect();
        (x, wt)
    }

    /// The search never loses to min/max on the weighted error, and on
    /// Gaussian groups it wins clearly at every width, both grids (measured:
    /// −57/−44/−36/−33 % symmetric, −37/−22/−17/−4 % asymmetric at 2/3/4/8 bits).
    #[test]
    fn search_beats_min_max() {
        let mut uniform = crate::test_util::unit_f64(0x9e37_79b9_7f4a_7c15);
        for bits in [2, 3, 4, 8] {
            for sym in [true, false] {
                let g = Grid::new(bits, sym).unwrap();
                let (mut e_mm, mut e_s) = (0f64, 0f64);
                for _ in 0..200 {
                    let (x, wt) = gaussian_group(&mut uniform);
                    let err = |(s, z): (f64, f64)| -> f64 {
                        x.iter()
                            .zip(&wt)
                            .map(|(&v, &w)| w * (v - s * (g.code(v, s, z) - z)).powi(2))
                            .sum()
                    };
                    let (mm, found) = (
                        err(g.find_params(x.iter().copied())),
                        err(g.search_params(&x, &wt)),
                    );
                    assert!(
                        found <= mm * (1.0 + 1e-12),
                        "{bits} bits sym {sym}: {found} > {mm}"
                    );
                    e_mm += mm;
                    e_s += found;
                }
                let gain = 1.0 - e_s / e_mm;
                eprintln!(
                    "{bits}-bit sym {sym}: weighted error −{:.1} %",
                    gain * 100.0
                );
                // (8-bit asymmetric: 1 % shrink steps are coarse next to 1/255 levels.)
                let floor = if bits == 8 && !sym { 0.02 } else { 0.10 };
                assert!(
                    gain > floor,
                    "{bits}-bit sym {sym}: only −{:.1} %",
                    gain * 100.0
                );
            }
        }
        // Zero and constant groups keep a usable grid.
        let g = Grid::new(4, true).unwrap();
        let (s, z) = g.search_params(&[0.0; 4], &[1.0; 4]);
        assert!(s > 0.0 && z == 8.0);
        let (s, z) = g.search_params(&[0.5; 4], &[1.0; 4]);
        assert!(
            (s * (g.code(0.5, s, z) - z) - 0.5).abs() < 1e-12,
            "constant group exact"
        );
    }

    /// The free-minimum grid: min/max reproduces a group that already lies
    /// on a Q4_1 grid; the search never loses to min/max and wins on
    /// Gaussian groups (measured: −36 % weighted error); codes and values
    /// follow `ŵ = scale · q + min`.
    #[test]
    fn free_min_grid() {
        let g = Grid::free_min_4bit();
        assert_eq!(
            g.code(2.75, 1.0, 1.25),
            2.0,
            "round((2.75 − 1.25) / 1) = round(1.5), to even"
        );
        assert_eq!(g.dequant(3.0, 0.5, -1.0), 0.5);
        // Values away from 0 keep all 16 levels: 0.3 + 0.01·q, q = 0..15.
        let x: Vec<f64> = (0..32).map(|i| 0.3 + 0.01 * f64::from(i % 16)).collect();
        let (s, m) = g.find_params(x.iter().copied());
        assert!((s - 0.01).abs() < 1e-12 && (m - 0.3).abs() < 1e-12);
        assert!(x
            .iter()
            .all(|&v| (g.value(g.code(v, s, m), s, m) - v).abs() < 1e-12));
        // An integer zero point cannot: 0 must be on its grid.
        let a = Grid::new(4, false).unwrap();
        let (sa, za) = a.search_params(&x, &[1.0; 32]);
        assert!(a.weighted_error(&x, &[1.0; 32], sa, za) > 1e-6);

        let mut uniform = crate::test_util::unit_f64(0x2545_f491_4f6c_dd1d);
        let (mut e_mm, mut e_s) = (0f64, 0f64);
        for _ in 0..200 {
            let (x, wt) = gaussian_group(&mut uniform);
            let (s0, m0) = g.find_params(x.iter().copied());
            let (s1, m1) = g.search_params(&x, &wt);
            let (mm, found) = (
                g.weighted_error(&x, &wt, s0, m0),
                g.weighted_error(&x, &wt, s1, m1),
            );
            assert!(found <= mm * (1.0 + 1e-12), "{found} > {mm}");
            e_mm += mm;
            e_s += found;
        }
        let gain = 1.0 - e_s / e_mm;
        eprintln!("free min: weighted error −{:.1} %", gain * 100.0);
        assert!(gain > 0.05, "only −{:.1} %", gain * 100.0);
        // Constant and empty groups keep a usable grid.
        let (s, m) = g.search_params(&[0.5; 4], &[1.0; 4]);
        assert!(s > 0.0 && g.value(g.code(0.5, s, m), s, m) == 0.5);
        assert_eq!(g.find_params(std::iter::empty()), (1.0, 0.0));
    }
}
