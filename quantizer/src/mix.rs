//! Which block type each tensor gets in a GGUF K-quant mix (`Q4_K_M`,
//! `Q6_K`): llama.cpp's rules (`llama_tensor_get_type` in
//! `llama-quant.cpp`), so that a nibble file has the same types, hence the
//! same size, as `llama-quantize`'s and the two differ only in how each
//! block was rounded.
//!
//! `Q4_K_M`: `Q4_K` everywhere except `attn_v` and `ffn_down` in the layers
//! [`use_more_bits`] picks (`Q6_K`) and the output head (`Q6_K`; a tied
//! embedding is the head). A K-quant needs inputs in whole super-blocks of
//! 256; a tensor whose width is not falls back as llama.cpp's does:
//! `Q4_K` → `Q5_0`, `Q6_K` → `Q8_0` (the head: `Q8_0`).

use crate::kquant::{KQuant, SUPER_BLOCK};

/// A GGUF K-quant mix `quantize --gguf` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufMix {
    Q4KM,
    Q6K,
}

/// One tensor's block type in a mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockType {
    K(KQuant),
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
            GgufMix::Q4KM => 15,
            GgufMix::Q6K => 18,
        }
    }

    /// llama.cpp's name of the mix.
    pub fn name(self) -> &'static str {
        match self {
            GgufMix::Q4KM => "Q4_K_M",
            GgufMix::Q6K => "Q6_K",
        }
    }

    /// The bits of its base type.
    pub fn bits(self) -> u32 {
        match self {
            GgufMix::Q4KM => 4,
            GgufMix::Q6K => 6,
        }
    }

    /// The type of linear weight `name` (`blk.{i}.{role}.weight`) with
    /// `cols` inputs in a model of `n_layer` blocks.
    pub fn layer_type(self, name: &str, n_layer: usize, cols: usize) -> BlockType {
        let wanted = match self {
            GgufMix::Q6K => KQuant::Q6K,
            GgufMix::Q4KM => {
                let more = layer_of(name).is_some_and(|i| use_more_bits(i, n_layer));
                let role_gets_more =
                    name.ends_with(".attn_v.weight") || name.ends_with(".ffn_down.weight");
                if more && role_gets_more {
                    KQuant::Q6K
                } else {
                    KQuant::Q4K
                }
            }
        };
        fallback(wanted, cols)
    }

    /// The type of the output head (or of a tied token embedding, which is
    /// the head); `None`: left float, written as llama.cpp's `Q8_0`.
    pub fn head_type(self, cols: usize) -> Option<BlockType> {
        cols.is_multiple_of(SUPER_BLOCK)
            .then_some(BlockType::K(KQuant::Q6K))
    }

    /// The type of an untied token embedding (the mix's base type).
    pub fn embedding_type(self, cols: usize) -> BlockType {
        match self {
            GgufMix::Q4KM => fallback(KQuant::Q4K, cols),
            GgufMix::Q6K => fallback(KQuant::Q6K, cols),
        }
    }
}

fn fallback(kq: KQuant, cols: usize) -> BlockType {
    if cols.is_multiple_of(SUPER_BLOCK) {
        BlockType::K(kq)
    } else {
        match kq {
            KQuant::Q4K => BlockType::Q5_0,
            KQuant::Q6K => BlockType::Q8_0,
        }
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
        assert_eq!(m.layer_type("blk.0.attn_v.weight", 30, 1536), k6);
        assert_eq!(m.layer_type("blk.3.attn_v.weight", 30, 1536), k4);
        assert_eq!(m.layer_type("blk.0.attn_q.weight", 30, 1536), k4);
        assert_eq!(m.layer_type("blk.5.ffn_down.weight", 30, 1536), k6);
        assert_eq!(m.layer_type("blk.6.ffn_down.weight", 30, 1536), k4);
        // Widths that are not whole super-blocks (SmolLM2's 576).
        assert_eq!(
            m.layer_type("blk.0.attn_v.weight", 30, 576),
            BlockType::Q8_0
        );
        assert_eq!(
            m.layer_type("blk.3.attn_q.weight", 30, 576),
            BlockType::Q5_0
        );
        assert_eq!(m.head_type(576), None);
        assert_eq!(m.head_type(2048), Some(k6));
        assert_eq!(m.embedding_type(2048), k4);
        assert_eq!(
            GgufMix::Q6K.layer_type("blk.3.attn_q.weight", 30, 576),
            BlockType::Q8_0
        );
    }
}
