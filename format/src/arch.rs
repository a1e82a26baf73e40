//! The decoder block as data: everything that distinguishes one family of
//! decoder-only transformers from another (norm kind, activation, positions,
//! residual layout, biases, scales, soft-caps, per-layer attention window and
//! RoPE base, q/k norms), stored in `.nib` metadata under `arch.*`.
//!
//! Why data: the runtime has one block ([`nibble-runtime`'s `block`
//! module]) that reads these switches; the importers turn each family's
//! config and tensor names into this one description and one canonical
//! tensor layout ([`crate::families`]), so no code path matches on a family's
//! name. A `.nib` written before these keys existed has none of them and
//! reads as a Llama block (the defaults of [`Architecture::llama`]).

use crate::error::{FormatError, Result};
use crate::nib::{Metadata, MetadataBuilder, OwnedValue};

/// Metadata keys of the block description (listed in `FORMAT.md`).
pub mod keys {
    pub const NORM: &str = "arch.norm";
    pub const ACTIVATION: &str = "arch.activation";
    pub const POSITIONS: &str = "arch.positions";
    pub const PARALLEL_RESIDUAL: &str = "arch.parallel_residual";
    pub const POST_NORMS: &str = "arch.post_norms";
    pub const QK_NORM: &str = "arch.qk_norm";
    pub const ATTN_BIAS: &str = "arch.attn_bias";
    pub const ATTN_OUT_BIAS: &str = "arch.attn_out_bias";
    pub const FFN_BIAS: &str = "arch.ffn_bias";
    pub const EMBD_SCALE: &str = "arch.embd_scale";
    pub const ATTN_SCALE: &str = "arch.attn_scale";
    pub const ATTN_SOFTCAP: &str = "arch.attn_softcap";
    pub const FINAL_SOFTCAP: &str = "arch.final_softcap";
    pub const ROPE_DIM: &str = "arch.rope_dim";
    pub const ROPE_SCALING: &str = "arch.rope_scaling";
    pub const ROPE_FACTOR: &str = "arch.rope_factor";
    pub const ROPE_LOW_FREQ_FACTOR: &str = "arch.rope_low_freq_factor";
    pub const ROPE_HIGH_FREQ_FACTOR: &str = "arch.rope_high_freq_factor";
    pub const ROPE_ORIGINAL_CTX: &str = "arch.rope_original_ctx";
    pub const ROPE_THETA_LOCAL: &str = "arch.rope_theta_local";
    pub const LAYER_WINDOW: &str = "arch.layer_window";
    pub const LAYER_LOCAL_ROPE: &str = "arch.layer_local_rope";
}

/// How a sub-layer's input is normalized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// x / rms(x) · w (Llama, Qwen, Gemma with its +1 folded into w at import).
    Rms,
    /// (x − mean) / std · w + b (GPT-2, OPT, GPT-NeoX).
    Layer,
}

/// The MLP's non-linearity. Gated ones multiply `act(gate·x)` by `up·x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate) · up (Llama, Qwen, Mistral, Phi-3).
    SwiGlu,
    /// gelu_tanh(gate) · up (Gemma).
    GeGluTanh,
    /// gelu with the tanh approximation, not gated (GPT-2 `gelu_new`).
    GeluTanh,
    /// exact gelu (erf), not gated (GPT-NeoX `gelu`).
    GeluErf,
    /// relu, not gated (OPT).
    Relu,
}

impl Activation {
    /// Has a gate projection (`ffn_gate`).
    pub fn gated(self) -> bool {
        matches!(self, Activation::SwiGlu | Activation::GeGluTanh)
    }
}

/// How positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Rotary embedding of q and k (rotate-half pairs).
    Rope,
    /// A learned table added to the token embedding (`pos_embd.weight`).
    Learned,
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_ctx: usize,
    },
}

/// One layer's attention settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerDesc {
    /// Sliding attention window in tokens (a query sees itself and the
    /// `window − 1` keys before it); 0 = full causal attention.
    pub window: usize,
    /// Uses the local RoPE base (`rope_theta_local`, no scaling) instead of
    /// the model's (`rope_theta` with `rope_scaling`).
    pub local_rope: bool,
}

/// The description of a decoder block and its embedding / head.
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    pub norm: NormKind,
    pub activation: Activation,
    pub positions: Positions,
    /// x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX) instead of two
    /// sequential residual steps.
    pub parallel_residual: bool,
    /// RMSNorm of each sub-layer's output before the residual add (Gemma 2/3).
    pub post_norms: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Biases on q, k, v.
    pub attn_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    /// Biases on the MLP projections.
    pub ffn_bias: bool,
    /// Factor on the token embedding (Gemma: √n_embd, rounded to f32).
    pub embd_scale: f32,
    /// Factor on q·k (usually 1/√head_dim; Gemma 2/3: query_pre_attn_scalar^-½).
    pub attn_scale: f32,
    /// cap·tanh(s/cap) on attention scores; 0 = none.
    pub attn_softcap: f32,
    /// cap·tanh(l/cap) on the logits; 0 = none.
    pub final_softcap: f32,
    /// Rotated dimensions of each head (partial rotary: < head_dim).
    pub rope_dim: usize,
    pub rope_scaling: RopeScaling,
    /// RoPE base of layers with `local_rope`.
    pub rope_theta_local: f64,
    /// Per-layer attention settings, `[n_layer]`.
    pub layers: Vec<LayerDesc>,
}

impl Architecture {
    /// The Llama block: RMSNorm, SwiGLU, full RoPE, no biases, 1/√head_dim,
    /// every layer alike with `sliding_window` (0 = none).
    pub fn llama(n_layer: usize, head_dim: usize, sliding_window: usize) -> Architecture {
        Architecture {
            norm: NormKind::Rms,
            activation: Activation::SwiGlu,
            positions: Positions::Rope,
            parallel_residual: false,
            post_norms: false,
            qk_norm: false,
            attn_bias: false,
            attn_out_bias: false,
            ffn_bias: false,
            embd_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: 0.0,
            final_softcap: 0.0,
            rope_dim: head_dim,
            rope_scaling: RopeScaling::None,
            rope_theta_local: 10000.0,
            layers: vec![
                LayerDesc {
                    window: sliding_window,
                    local_rope: false,
                };
                n_layer
            ],
        }
    }

    /// The norm layers carry a bias (LayerNorm).
    pub fn norm_bias(&self) -> bool {
        self.norm == NormKind::Layer
    }

    /// Every layer's window set to `window` (0 = none).
    pub fn set_sliding_window(&mut self, window: usize) {
        for l in &mut self.layers {
            l.window = window;
        }
    }

    /// Reject settings no block can run (called with the shapes they apply to).
    pub fn validate(&self, n_layer: usize, head_dim: usize) -> Result<()> {
        let bad = |why: String| Err(FormatError::BadConfig { why });
        if self.layers.len() != n_layer {
            return bad(format!(
                "{} per-layer attention settings for {n_layer} layers",
                self.layers.len()
            ));
        }
        if self.positions == Positions::Rope
            && (self.rope_dim == 0 || self.rope_dim > head_dim || !self.rope_dim.is_multiple_of(2))
        {
            return bad(format!(
                "rotary dimensions {} must be even and in 2..={head_dim}",
                self.rope_dim
            ));
        }
        for (what, v) in [
            ("embedding scale", self.embd_scale),
            ("attention scale", self.attn_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{what} {v} must be positive"));
            }
        }
        for (what, v) in [
            ("attention soft-cap", self.attn_softcap),
            ("final soft-cap", self.final_softcap),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{what} {v} must be 0 (none) or positive"));
            }
        }
        if !(self.rope_theta_local.is_finite() && self.rope_theta_local > 0.0) {
            return bad(format!(
                "local rope theta {} must be positive",
                self.rope_theta_local
            ));
        }
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor >= 1.0) {
                    return bad(format!("rope scaling factor {factor} must be ≥ 1"));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_ctx,
            } => {
                let ok = factor.is_finite()
                    && factor >= 1.0
                    && low_freq_factor.is_finite()
                    && low_freq_factor > 0.0
                    && high_freq_factor.is_finite()
                    && high_freq_factor > low_freq_factor
                    && original_ctx > 0;
                if !ok {
                    return bad(format!(
                        "llama3 rope scaling (factor {factor}, low {low_freq_factor}, high \
                         {high_freq_factor}, original context {original_ctx}) is inconsistent"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn write(&self, m: &mut MetadataBuilder) {
        use keys::*;
        let s = |v: &str| OwnedValue::Str(v.into());
        m.set(
            NORM,
            s(match self.norm {
                NormKind::Rms => "rms",
                NormKind::Layer => "layer",
            }),
        );
        m.set(
            ACTIVATION,
            s(match self.activation {
                Activation::SwiGlu => "swiglu",
                Activation::GeGluTanh => "geglu_tanh",
                Activation::GeluTanh => "gelu_tanh",
                Activation::GeluErf => "gelu_erf",
                Activation::Relu => "relu",
            }),
        );
        m.set(
            POSITIONS,
            s(match self.positions {
                Positions::Rope => "rope",
                Positions::Learned => "learned",
            }),
        );
        for (k, v) in [
            (PARALLEL_RESIDUAL, self.parallel_residual),
            (POST_NORMS, self.post_norms),
            (QK_NORM, self.qk_norm),
            (ATTN_BIAS, self.attn_bias),
            (ATTN_OUT_BIAS, self.attn_out_bias),
            (FFN_BIAS, self.ffn_bias),
        ] {
            m.set(k, OwnedValue::Bool(v));
        }
        for (k, v) in [
            (EMBD_SCALE, self.embd_scale),
            (ATTN_SCALE, self.attn_scale),
            (ATTN_SOFTCAP, self.attn_softcap),
            (FINAL_SOFTCAP, self.final_softcap),
        ] {
            m.set(k, OwnedValue::F64(f64::from(v)));
        }
        m.set(ROPE_DIM, OwnedValue::U64(self.rope_dim as u64));
        m.set(ROPE_THETA_LOCAL, OwnedValue::F64(self.rope_theta_local));
        match self.rope_scaling {
            RopeScaling::None => {
                m.set(ROPE_SCALING, s("none"));
            }
            RopeScaling::Linear { factor } => {
                m.set(ROPE_SCALING, s("linear"));
                m.set(ROPE_FACTOR, OwnedValue::F64(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_ctx,
            } => {
                m.set(ROPE_SCALING, s("llama3"));
                m.set(ROPE_FACTOR, OwnedValue::F64(factor));
                m.set(ROPE_LOW_FREQ_FACTOR, OwnedValue::F64(low_freq_factor));
                m.set(ROPE_HIGH_FREQ_FACTOR, OwnedValue::F64(high_freq_factor));
                m.set(ROPE_ORIGINAL_CTX, OwnedValue::U64(original_ctx as u64));
            }
        }
        m.set(
            LAYER_WINDOW,
            OwnedValue::U64Array(self.layers.iter().map(|l| l.window as u64).collect()),
        );
        m.set(
            LAYER_LOCAL_ROPE,
            OwnedValue::U64Array(
                self.layers
                    .iter()
                    .map(|l| u64::from(l.local_rope))
                    .collect(),
            ),
        );
    }

    /// Read the description back; a file without `arch.*` keys (written
    /// before they existed) is a Llama block with `sliding_window` on every
    /// layer. An unknown value of a known key is an error.
    pub fn read(
        m: &Metadata<'_>,
        n_layer: usize,
        head_dim: usize,
        sliding_window: usize,
    ) -> Result<Architecture> {
        use keys::*;
        let mut a = Architecture::llama(n_layer, head_dim, sliding_window);
        let bad = |key: &str, why: String| FormatError::BadValue {
            key: key.into(),
            why,
        };
        if let Some(v) = m.opt_str(NORM)? {
            a.norm = match v {
                "rms" => NormKind::Rms,
                "layer" => NormKind::Layer,
                o => return Err(bad(NORM, format!("unknown norm '{o}' (rms, layer)"))),
            };
        }
        if let Some(v) = m.opt_str(ACTIVATION)? {
            a.activation = match v {
                "swiglu" => Activation::SwiGlu,
                "geglu_tanh" => Activation::GeGluTanh,
                "gelu_tanh" => Activation::GeluTanh,
                "gelu_erf" => Activation::GeluErf,
                "relu" => Activation::Relu,
                o => {
                    return Err(bad(
                        ACTIVATION,
                        format!(
                        "unknown activation '{o}' (swiglu, geglu_tanh, gelu_tanh, gelu_erf, relu)"
                    ),
                    ))
                }
            };
        }
        if let Some(v) = m.opt_str(POSITIONS)? {
            a.positions = match v {
                "rope" => Positions::Rope,
                "learned" => Positions::Learned,
                o => {
                    return Err(bad(
                        POSITIONS,
                        format!("unknown positions '{o}' (rope, learned)"),
                    ))
                }
            };
        }
        for (k, f) in [
            (PARALLEL_RESIDUAL, &mut a.parallel_residual),
            (POST_NORMS, &mut a.post_norms),
            (QK_NORM, &mut a.qk_norm),
            (ATTN_BIAS, &mut a.attn_bias),
            (ATTN_OUT_BIAS, &mut a.attn_out_bias),
            (FFN_BIAS, &mut a.ffn_bias),
        ] {
            if let Some(v) = m.opt_bool(k)? {
                *f = v;
            }
        }
        for (k, f) in [
            (EMBD_SCALE, &mut a.embd_scale),
            (ATTN_SCALE, &mut a.attn_scale),
            (ATTN_SOFTCAP, &mut a.attn_softcap),
            (FINAL_SOFTCAP, &mut a.final_softcap),
        ] {
            if let Some(v) = m.opt_f64(k)? {
                *f = v as f32;
            }
        }
        if let Some(v) = m.opt_u64(ROPE_DIM)? {
            a.rope_dim = usize::try_from(v).map_err(|_| bad(ROPE_DIM, format!("{v} too large")))?;
        }
        if let Some(v) = m.opt_f64(ROPE_THETA_LOCAL)? {
            a.rope_theta_local = v;
        }
        let f = |k: &str| m.f64(k);
        a.rope_scaling = match m.opt_str(ROPE_SCALING)? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: f(ROPE_FACTOR)?,
            },
            Some("llama3") => RopeScaling::Llama3 {
                factor: f(ROPE_FACTOR)?,
                low_freq_factor: f(ROPE_LOW_FREQ_FACTOR)?,
                high_freq_factor: f(ROPE_HIGH_FREQ_FACTOR)?,
                original_ctx: m.u64(ROPE_ORIGINAL_CTX)?.min(1 << 32) as usize,
            },
            Some(o) => {
                return Err(bad(
                    ROPE_SCALING,
                    format!("unknown rope scaling '{o}' (none, linear, llama3)"),
                ))
            }
        };
        let per_layer = |k: &str| -> Result<Option<Vec<u64>>> {
            match m.opt_u64_array(k)? {
                Some(v) if v.len() != n_layer => {
                    Err(bad(k, format!("{} entries for {n_layer} layers", v.len())))
                }
                o => Ok(o),
            }
        };
        if let Some(w) = per_layer(LAYER_WINDOW)? {
            for (l, w) in a.layers.iter_mut().zip(w) {
                l.window = w.min(1 << 32) as usize;
            }
        }
        if let Some(r) = per_layer(LAYER_LOCAL_ROPE)? {
            for (l, r) in a.layers.iter_mut().zip(r) {
                l.local_rope = match r {
                    0 => false,
                    1 => true,
                    o => return Err(bad(LAYER_LOCAL_ROPE, format!("entry {o} is not 0 or 1"))),
                };
            }
        }
        a.validate(n_layer, head_dim)?;
        Ok(a)
    }
}

/// RoPE inverse frequencies `[rope_dim/2]` for base `theta`, rescaled by
/// `scaling` (computed in f64, rounded to f32 once).
pub fn rope_inv_freq(theta: f64, rope_dim: usize, scaling: RopeScaling) -> Vec<f32> {
    let half = rope_dim / 2;
    (0..half)
        .map(|i| {
            let inv = 1.0 / theta.powf(2.0 * i as f64 / rope_dim as f64);
            let scaled = match scaling {
                RopeScaling::None => inv,
                RopeScaling::Linear { factor } => inv / factor,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: lo,
                    high_freq_factor: hi,
                    original_ctx,
                } => {
                    let orig = original_ctx as f64;
                    let (low_wavelen, high_wavelen) = (orig / lo, orig / hi);
                    let wavelen = 2.0 * std::f64::consts::PI / inv;
                    if wavelen < high_wavelen {
                        inv
                    } else if wavelen > low_wavelen {
                        inv / factor
                    } else {
                        let smooth = (orig / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * inv / factor + smooth * inv
                    }
                }
            };
            scaled as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nib::{NibView, NibWriter};

    fn metadata_round_trip(m: &MetadataBuilder, f: impl FnOnce(&Metadata<'_>)) {
        let w = NibWriter::new(std::io::Cursor::new(Vec::new()), m).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let view = NibView::parse(&bytes).unwrap();
        f(&view.metadata);
    }

    /// A file without `arch.*` keys (written before they existed) reads as
    /// the Llama block with its one sliding window; a written description
    /// reads back equal; an unknown value is an error naming the key.
    #[test]
    fn old_files_read_as_llama_and_descriptions_round_trip() {
        metadata_round_trip(&MetadataBuilder::new(), |m| {
            assert_eq!(
                Architecture::read(m, 3, 16, 7).unwrap(),
                Architecture::llama(3, 16, 7)
            );
        });
        let mut a = Architecture::llama(3, 16, 0);
        a.norm = NormKind::Layer;
        a.activation = Activation::GeluErf;
        a.parallel_residual = true;
        a.rope_dim = 4;
        a.attn_softcap = 50.0;
        a.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_ctx: 64,
        };
        a.layers[1] = LayerDesc {
            window: 16,
            local_rope: true,
        };
        let mut m = MetadataBuilder::new();
        a.write(&mut m);
        metadata_round_trip(&m, |md| {
            assert_eq!(Architecture::read(md, 3, 16, 0).unwrap(), a)
        });
        m.set(keys::ACTIVATION, OwnedValue::Str("swish2".into()));
        metadata_round_trip(&m, |md| {
            let e = Architecture::read(md, 3, 16, 0).unwrap_err().to_string();
            assert!(e.contains("arch.activation") && e.contains("swish2"), "{e}");
        });
    }
}
