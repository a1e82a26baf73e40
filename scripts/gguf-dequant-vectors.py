#!/usr/bin/env python3
"""Test vectors for nibble's GGUF block decoders (format/src/gguf_blocks.rs).

For each ggml block type: seeded random blocks (random bytes, with every f16
scale / minimum field overwritten by a finite value) and the f32 values that
the gguf Python package's reference decoder (`gguf.quants.dequantize`) makes
of them, written as JSON to format/tests/data/gguf_dequant_vectors.json.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install gguf numpy
    /tmp/venv/bin/python scripts/gguf-dequant-vectors.py
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T, quants

# type: byte offsets of its f16 fields within one block.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ4_NL: [0], T.IQ4_XS: [0],
}
BLOCKS = 3

rng = np.random.default_rng(20261206)
cases = []
for ty, fields in F16_FIELDS.items():
    block, nbytes = quants.GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(BLOCKS, nbytes), dtype=np.uint8)
    for b in range(BLOCKS):
        for off in fields:
            v = np.float16(rng.uniform(-0.05, 0.05) if off == 0 or ty in (T.Q2_K, T.Q3_K, T.Q6_K) else rng.uniform(-0.5, 0.5))
            raw[b, off:off + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
    values = quants.dequantize(raw.reshape(-1), ty).reshape(-1).astype(np.float32)
    assert values.size == BLOCKS * block and np.isfinite(values).all()
    cases.append({
        "type": ty.name,
        "code": int(ty),
        "bytes": raw.tobytes().hex(),
        "values": [float(x) for x in values],
    })

out = pathlib.Path(__file__).resolve().parent.parent / "format/tests/data/gguf_dequant_vectors.json"
out.write_text(json.dumps(cases, separators=(",", ":")) + "\n")
print(f"{out}: {len(cases)} types, {out.stat().st_size} bytes")
