#!/usr/bin/env python3
"""Perplexity of a GPTQ checkpoint folder as the Python ecosystem loads it.

Usage: gptq_export_ppl.py FOLDER TEXT CTX CHUNKS [gptqmodel|transformers ...]

Protocol (the same as `nibble perplexity --protocol full`): TEXT tokenized
with the folder's tokenizer.json without special tokens, non-overlapping
windows of CTX tokens, the first CHUNKS of them, every predicted token
scored (CTX - 1 per window). Loaders:

  gptqmodel     GPTQModel.load(FOLDER, backend=GPTQ_TORCH, dtype=float16),
                then model.float(): its TorchLinear dequantizes
                scale * (q - zero) in float32, every matmul in float32.
  transformers  AutoModelForCausalLM.from_pretrained(FOLDER, dtype=float32)
                through optimum + GPTQModel's kernel selection (on CPU the
                ATen int4 kernel, which does not compute in plain float32).

Prints one line per loader: `<loader> ppl <value> tokens <n> seconds <s>`.
"""
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import math
import sys
import time

import torch
from tokenizers import Tokenizer


def load(loader, folder):
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        m = GPTQModel.load(folder, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
        m.model.float()
        return m.model
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    raise SystemExit(f"unknown loader {loader}")


def main():
    folder, text, ctx, chunks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    loaders = sys.argv[5:] or ["gptqmodel"]
    torch.set_num_threads(os.cpu_count() or 1)
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ids = tok.encode(open(text, encoding="utf-8").read(), add_special_tokens=False).ids
    n_windows = min(chunks, len(ids) // ctx)
    for loader in loaders:
        model = load(loader, folder)
        model.eval()
        t0 = time.time()
        nll, n = 0.0, 0
        with torch.no_grad():
            for w in range(n_windows):
                x = torch.tensor([ids[w * ctx:(w + 1) * ctx]])
                logits = model(input_ids=x, use_cache=False).logits[0].float()
                lp = torch.log_softmax(logits[:-1], dim=-1)
                nll -= lp.gather(1, x[0, 1:].unsqueeze(1)).double().sum().item()
                n += ctx - 1
                print(f"  {loader} window {w + 1}/{n_windows}: running ppl {math.exp(nll / n):.4f}", file=sys.stderr)
        print(f"{loader} ppl {math.exp(nll / n):.4f} tokens {n} seconds {time.time() - t0:.0f}", flush=True)
        del model


if __name__ == "__main__":
    main()
