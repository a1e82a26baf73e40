#!/usr/bin/env python3
"""Each quantized GGUF's importance-weighted squared error against the float source, by tensor role.

    scripts/imatrix-weighted-error.py SOURCE.gguf IMATRIX.gguf FILE.gguf [FILE.gguf ...]

For every weight with an importance-matrix entry: sum over rows and inputs of imatrix[j] * (w - w_q)^2,
imatrix[j] = in_sum2[j] / counts (llama-imatrix's GGUF layout), for each FILE relative to the first.
Also checks that every FILE has the first one's tensor types. Needs `pip install gguf numpy`.
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

src, imat_file, files = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2]), sys.argv[3:]
readers = [GGUFReader(p) for p in files]
sums = {t.name[: -len(".in_sum2")]: np.asarray(t.data, np.float64).ravel()
        for t in imat_file.tensors if t.name.endswith(".in_sum2")}
counts = {t.name[: -len(".counts")]: float(np.asarray(t.data).ravel()[0])
          for t in imat_file.tensors if t.name.endswith(".counts")}
imat = {k: v / max(counts.get(k, 1.0), 1.0) for k, v in sums.items()}
tensors = [{t.name: t for t in r.tensors} for r in readers]
for path, ts in zip(files[1:], tensors[1:]):
    differ = [n for n, t in tensors[0].items() if ts[n].tensor_type != t.tensor_type]
    print(f"{path}: {'the same tensor types' if not differ else f'types differ: {differ[:8]}'}")


def rows(t):
    return np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(-1, int(t.shape[0]))


by_role = {}
for t in src.tensors:
    if len(t.shape) < 2 or t.name not in imat:
        continue
    w, q = rows(t), imat[t.name]
    errs = np.array([float((((rows(ts[t.name]) - w) ** 2) * q[None, :]).sum()) for ts in tensors])
    role = t.name.split(".")[-2]
    by_role[role] = by_role.get(role, 0) + errs
print("weighted error relative to " + files[0] + ": " + ", ".join(files[1:]))
total = sum(by_role.values())
for role, e in list(by_role.items()) + [("all", total)]:
    print(f"  {role:12s} " + "  ".join(f"{x:.4f}" for x in e[1:] / e[0]))
