//! Which block type each tensor gets in a GGUF file of a given type
//! (`Q4_0`, `Q4_K_M`, `Q3_K_M`, …): llama.cpp's rules
//! (`llama_tensor_get_type` in `llama-quant.cpp`), so that a nibble file has
//! the same types, hence the same size, as `llama-quantize`'s and the two
//! differ only in how each block was rounded.
//!
//! Each file type has a base type, which an untied token embedding gets
//! too. In a `Q4_0` file quantized with calibration statistics (llama.cpp:
//! with an importance matrix; nibble: GPTQ), `ffn_down` of the first eighth
//! of the layers is `Q4_1` (llama.cpp's guard against those layers going
//! wrong); its `Q5_0` → `Q5_1` guard is not taken here (no `Q5_1` kernels).
//! In the K-quant mixes `attn_v` and `ffn_down` get more bits in some
//! layers (`_M`: those [`use_more_bits`] picks; `Q4_K_S`, `Q3_K_M`: the
//! first few), `Q3_K_M`'s `attn_output` is `Q4_K`, and the output head is
//! `Q6_K` (a tied embedding is the head). A K-quant needs inputs in whole
//! super-blocks of 256; a tensor whose width is not falls back as
//! llama.cpp's does: `Q3_K` → `Q4_0`, `Q4_K` → `Q5_0`, `Q6_K` → `Q8_0`,
//! the head → `Q8_0`, and `Q5_K` → `Q5_1` there but **`Q5_0`** here
//! (nibble has no `Q5_1` kernels): half a bit per weight less on those
//! tensors than llama-quantize's file.

use crate::kquant::{KQuant, SUPER_BLOCK};

/// A GGUF file type `quantize --gguf` writes: one block type or a K-quant mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufMix {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q3KS,
    Q3KM,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
}

/// One tensor's block type in a mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockType {
    K(KQuant),
    Q4_0,
    /// Groups of 32 with an f16 scale and a free f16 minimum.
    Q4_1,
    Q5_0,
    Q8_0,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers
/// and every third one between.
pub fn use_more_bits(i_layer: usize, n_layer: usize) -> bool {
    i_layer < n_layer / 8 || i_layer >= 7 * n_layer / 8 || (i_layer - n_layer / 8) % 3 == 2
}

/// `blk.{i}.…` → `i`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

impl GgufMix {
    /// llama.cpp's `general.file_type` (`llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufMix::Q4_0 => 2,
            GgufMix::Q4_1 => 3,
            GgufMix::Q8_0 => 7,
            GgufMix::Q5_0 => 8,
            GgufMix::Q3KS => 11,
            GgufMix::Q3KM => 12,
            GgufMix::Q4KS => 14,
            GgufMix::Q4KM => 15,
            GgufMix::Q5KS => 16,
            GgufMix::Q5KM => 17,
            GgufMix::Q6K => 18,
        }
    }

    /// llama.cpp's name of the mix.
    pub fn name(self) -> &'static str {
        match self {
            GgufMix::Q4_0 => "Q4_0",
            GgufMix::Q4_1 => "Q4_1",
            GgufMix::Q5_0 => "Q5_0",
            GgufMix::Q8_0 => "Q8_0",
            GgufMix::Q3KS => "Q3_K_S",
            GgufMix::Q3KM => "Q3_K_M",
            GgufMix::Q4KS => "Q4_K_S",
            GgufMix::Q4KM => "Q4_K_M",
            GgufMix::Q5KS => "Q5_K_S",
            GgufMix::Q5KM => "Q5_K_M",
            GgufMix::Q6K => "Q6_K",
        }
    }

    /// The type most tensors get.
    pub fn base(self) -> BlockType {
        match self {
            GgufMix::Q4_0 => BlockType::Q4_0,
            GgufMix::Q4_1 => BlockType::Q4_1,
            GgufMix::Q5_0 => BlockType::Q5_0,
            GgufMix::Q8_0 => BlockType::Q8_0,
            GgufMix::Q3KS | GgufMix::Q3KM => BlockType::K(KQuant::Q3K),
            GgufMix::Q4KS | GgufMix::Q4KM => BlockType::K(KQuant::Q4K),
            GgufMix::Q5KS | GgufMix::Q5KM => BlockType::K(KQuant::Q5K),
            GgufMix::Q6K => BlockType::K(KQuant::Q6K),
        }
    }

    /// The bits of its base type.
    pub fn bits(self) -> u32 {
        match self.base() {
            BlockType::K(KQuant::Q3K) => 3,
            BlockType::K(KQuant::Q4K) | BlockType::Q4_0 | BlockType::Q4_1 => 4,
            BlockType::K(KQuant::Q5K) | BlockType::Q5_0 => 5,
            BlockType::K(KQuant::Q6K) => 6,
            BlockType::Q8_0 => 8,
        }
    }

    /// The type of linear weight `name` (`blk.{i}.{role}.weight`) with
    /// `cols` inputs in a model of `n_layer` blocks; `calibrated`: quantized
    /// with calibration statistics (llama.cpp's "has imatrix").
    pub fn layer_type(
        self,
        name: &str,
        n_layer: usize,
        cols: usize,
        calibrated: bool,
    ) -> BlockType {
        use GgufMix::*;
        let i = layer_of(name).unwrap_or(0);
        let role = |r: &str| name.ends_with(&format!(".{r}.weight"));
        let (attn_v, ffn_down) = (role("attn_v"), role("ffn_down"));
        let k = BlockType::K;
        let q5_below = |below: usize| k(if i < below { KQuant::Q5K } else { KQuant::Q4K });
        let wanted = match self {
            Q4_0 if ffn_down && calibrated && i < n_layer / 8 => BlockType::Q4_1,
            Q3KM if attn_v => q5_below(2),
            Q3KM if ffn_down => q5_below(n_layer / 16),
            Q3KM if role("attn_output") => k(KQuant::Q4K),
            Q4KM | Q5KM if (attn_v || ffn_down) && use_more_bits(i, n_layer) => k(KQuant::Q6K),
            Q4KS if attn_v && i < 4 => k(KQuant::Q5K),
            Q4KS if ffn_down && i < n_layer / 8 => k(KQuant::Q5K),
            _ => self.base(),
        };
        fallback(wanted, cols)
    }

    /// The type of the output head (or of a tied token embedding, which is
    /// the head); `None`: left float, written as llama.cpp's `Q8_0`.
    /// (`Q6_K`, or `Q8_0` in a `Q8_0` file or where `Q6_K` does not fit).
    pub fn head_type(self, cols: usize) -> Option<BlockType> {
        (self != GgufMix::Q8_0 && cols.is_multiple_of(SUPER_BLOCK))
            .then_some(BlockType::K(KQuant::Q6K))
    }

    /// The type of an untied token embedding (the base type).
    pub fn embedding_type(self, cols: usize) -> BlockType {
        fallback(self.base(), cols)
    }
}

/// `t`, or llama.cpp's replacement when a K-quant's super-blocks do not
/// fit `cols` inputs.
fn fallback(t: BlockType, cols: usize) -> BlockType {
    match t {
        BlockType::K(kq) if !cols.is_multiple_of(SUPER_BLOCK) => match kq {
            KQuant::Q3K => BlockType::Q4_0,
            KQuant::Q4K | KQuant::Q5K => BlockType::Q5_0,
            KQuant::Q6K => BlockType::Q8_0,
        },
        t => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layers llama.cpp gives more bits in a 30- and a 24-layer model
    /// (SmolLM2-135M, Qwen2.5-0.5B), worked out from its formula by hand.
    #[test]
    fn more_bits_layers_follow_llama_cpp() {
        let picked = |n| (0..n).filter(|&i| use_more_bits(i, n)).collect::<Vec<_>>();
        assert_eq!(
            picked(30),
            [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
        assert_eq!(picked(24), [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }

    #[test]
    fn q4_k_m_types_and_fallbacks() {
        let m = GgufMix::Q4KM;
        let k4 = BlockType::K(KQuant::Q4K);
        let k6 = BlockType::K(KQuant::Q6K);
        assert_eq!(m.layer_type("blk.0.attn_v.weight", 30, 1536, false), k6);
        assert_eq!(m.layer_type("blk.3.attn_v.weight", 30, 1536, false), k4);
        assert_eq!(m.layer_type("blk.0.attn_q.weight", 30, 1536, false), k4);
        assert_eq!(m.layer_type("blk.5.ffn_down.weight", 30, 1536, false), k6);
        assert_eq!(m.layer_type("blk.6.ffn_down.weight", 30, 1536, false), k4);
        // Widths that are not whole super-blocks (SmolLM2's 576).
        assert_eq!(
            m.layer_type("blk.0.attn_v.weight", 30, 576, false),
            BlockType::Q8_0
        );
        assert_eq!(
            m.layer_type("blk.3.attn_q.weight", 30, 576, false),
            BlockType::Q5_0
        );
        assert_eq!(m.head_type(576), None);
        assert_eq!(m.head_type(2048), Some(k6));
        assert_eq!(m.embedding_type(2048), k4);
        assert_eq!(
            GgufMix::Q6K.layer_type("blk.3.attn_q.weight", 30, 576, false),
            BlockType::Q8_0
        );
    }

    #[test]
    fn the_other_mixes() {
        let k = BlockType::K;
        let (q3, q4, q5, q6) = (KQuant::Q3K, KQuant::Q4K, KQuant::Q5K, KQuant::Q6K);
        let t = |m: GgufMix, name: &str| m.layer_type(name, 32, 2048, false);
        assert_eq!(t(GgufMix::Q3KM, "blk.1.attn_v.weight"), k(q5));
        assert_eq!(t(GgufMix::Q3KM, "blk.2.attn_v.weight"), k(q4));
        assert_eq!(t(GgufMix::Q3KM, "blk.1.ffn_down.weight"), k(q5));
        assert_eq!(t(GgufMix::Q3KM, "blk.2.ffn_down.weight"), k(q4));
        assert_eq!(t(GgufMix::Q3KM, "blk.9.attn_output.weight"), k(q4));
        assert_eq!(t(GgufMix::Q3KM, "blk.9.ffn_up.weight"), k(q3));
        assert_eq!(t(GgufMix::Q3KS, "blk.0.attn_v.weight"), k(q3));
        assert_eq!(t(GgufMix::Q4KS, "blk.3.attn_v.weight"), k(q5));
        assert_eq!(t(GgufMix::Q4KS, "blk.4.attn_v.weight"), k(q4));
        assert_eq!(t(GgufMix::Q4KS, "blk.3.ffn_down.weight"), k(q5));
        assert_eq!(t(GgufMix::Q4KS, "blk.4.ffn_down.weight"), k(q4));
        assert_eq!(t(GgufMix::Q5KM, "blk.0.ffn_down.weight"), k(q6));
        assert_eq!(t(GgufMix::Q5KM, "blk.7.ffn_down.weight"), k(q5));
        assert_eq!(t(GgufMix::Q5KS, "blk.0.ffn_down.weight"), k(q5));
        // Fallbacks for 576 inputs; Q5_K's is Q5_0 here (Q5_1 in llama.cpp).
        let narrow = |m: GgufMix| m.layer_type("blk.5.attn_q.weight", 30, 576, false);
        assert_eq!(narrow(GgufMix::Q3KS), BlockType::Q4_0);
        assert_eq!(narrow(GgufMix::Q5KS), BlockType::Q5_0);
        assert_eq!(GgufMix::Q5KS.embedding_type(576), BlockType::Q5_0);
    }

    /// The single-type files: the base type everywhere but `Q4_0`'s guard
    /// on the first eighth of `ffn_down` when calibrated, an untied
    /// embedding at the base type, the head `Q6_K` where it fits (not in a
    /// `Q8_0` file). Qwen2.5-0.5B's widths (896, 24 layers) and 1.5B's (1536).
    #[test]
    fn single_type_files() {
        use BlockType as B;
        use GgufMix as M;
        let t = |m: M, name: &str, calibrated| m.layer_type(name, 24, 896, calibrated);
        assert_eq!(t(M::Q4_0, "blk.2.ffn_down.weight", true), B::Q4_1);
        assert_eq!(t(M::Q4_0, "blk.3.ffn_down.weight", true), B::Q4_0);
        assert_eq!(t(M::Q4_0, "blk.0.ffn_down.weight", false), B::Q4_0);
        assert_eq!(t(M::Q4_0, "blk.0.attn_v.weight", true), B::Q4_0);
        assert_eq!(t(M::Q5_0, "blk.0.ffn_down.weight", true), B::Q5_0);
        assert_eq!(t(M::Q4_1, "blk.0.ffn_down.weight", true), B::Q4_1);
        assert_eq!(t(M::Q8_0, "blk.0.ffn_down.weight", true), B::Q8_0);
        assert_eq!(M::Q4_0.embedding_type(896), B::Q4_0);
        assert_eq!(M::Q4_0.head_type(896), None);
        assert_eq!(M::Q4_0.head_type(1536), Some(B::K(KQuant::Q6K)));
        assert_eq!(M::Q8_0.head_type(1536), None);
        assert_eq!(
            [M::Q4_0, M::Q4_1, M::Q5_0, M::Q8_0].map(M::bits),
            [4, 4, 5, 8]
        );
    }
}
