#!/usr/bin/env python3
"""Write a PEFT-format LoRA adapter of random values for a Hugging Face
config, to measure what a run-time adapter costs (`nibble bench --lora`):
the cost depends on the shapes, not the values. Not a trained adapter.

Usage: make-random-lora.py CONFIG.json OUT_DIR [RANK]
Needs numpy. All seven linear layers of every block, F32, alpha = 2 * rank.
"""
import json
import os
import struct
import sys

import numpy as np


def main():
    cfg = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    r = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    e, ff = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or e // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    shapes = {
        "self_attn.q_proj": (q, e), "self_attn.k_proj": (kv, e), "self_attn.v_proj": (kv, e),
        "self_attn.o_proj": (e, q), "mlp.gate_proj": (ff, e), "mlp.up_proj": (ff, e), "mlp.down_proj": (e, ff),
    }
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for m, (rows, cols) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{m}"
            tensors[p + ".lora_A.weight"] = (rng.standard_normal((r, cols)) / cols**0.5).astype(np.float32)
            tensors[p + ".lora_B.weight"] = (rng.standard_normal((rows, r)) * 1e-3).astype(np.float32)
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [m.split(".")[1] for m in shapes],
               "bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None},
              open(os.path.join(out, "adapter_config.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
