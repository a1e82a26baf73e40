//! Uniform integer grids, exactly as the GPTQ authors' `quant.py`:
//! `q = clamp(round(w / scale) + zero, 0, maxq)`, `ŵ = scale · (q − zero)`,
//! with round-half-to-even (torch.round), not Rust's half-away-from-zero.

use crate::error::{QuantError, Result};

/// Bits and symmetry of a grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub bits: u32,
    /// Symmetric: zero point fixed at (maxq + 1) / 2.
    pub sym: bool,
}

impl Grid {
    pub fn new(bits: u32, sym: bool) -> Result<Grid> {
        match bits {
            2 | 3 | 4 | 8 => Ok(Grid { bits, sym }),
            b => Err(QuantError::UnsupportedBits(b)),
        }
    }

    /// Largest code: 2^bits − 1.
    pub fn maxq(&self) -> f64 {
        f64::from((1u32 << self.bits) - 1)
    }

    /// (scale, zero) for one row's values `x` (quant.py `find_params`, per channel).
    pub fn find_params(&self, x: impl Iterator<Item = f64>) -> (f64, f64) {
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

    /// The integer code of `w` on (scale, zero).
    pub fn code(&self, w: f64, scale: f64, zero: f64) -> f64 {
        ((w / scale).round_ties_even() + zero).clamp(0.0, self.maxq())
    }

    /// The code of an f32 weight computed in f32 arithmetic, exactly as
    /// torch does for an unmodified weight (used by RTN).
    pub fn code_f32(&self, w: f32, scale: f32, zero: f32) -> f64 {
        f64::from(((w / scale).round_ties_even() + zero).clamp(0.0, self.maxq() as f32))
    }

    /// Dequantized value of a code, in f32 as the reference computes it.
    pub fn dequant(code: f64, scale: f64, zero: f64) -> f32 {
        scale as f32 * (code as f32 - zero as f32)
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
        assert!(Grid::new(5, false).is_err());
    }
}
