#!/usr/bin/env bash
# nibble against llama.cpp on the same bytes: SmolLM2-135M-Instruct's Q4_0
# file (made by llama-quantize from the shared Q4_1 GGUF) and the shared Q4_1
# GGUF itself, each imported losslessly by nibble (`convert --dtype native`),
# plus nibble's own RTN 4-bit g128 model with an 8-bit head. Rounds alternate
# llama-bench and `nibble bench` so the machine's noise hits both alike.
#
#   LLAMA=/path/to/llama.cpp/build/bin scripts/bench-vs-llama.sh [ROUNDS] [REPS]
#
# llama.cpp is not part of this repository: build it yourself (docs/BENCHMARKS.md
# says how). Output: one line per round, model,
# program, threads and test, in tok/s (mean ± sd over REPS runs).
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA=${LLAMA:?set LLAMA to the folder holding llama-bench and llama-quantize}
ROUNDS=${1:-3}
REPS=${2:-5}
SHARED=${NIBBLE_SHARED:-../shared}
Q41=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-target/bench-llama}
N=target/release/nibble
mkdir -p "$OUT"
cargo build --release -q -p nibble-cli
[ -f "$OUT/smollm2-q4_0.gguf" ] ||
    "$LLAMA/llama-quantize" --allow-requantize "$Q41" "$OUT/smollm2-q4_0.gguf" Q4_0 >/dev/null 2>&1
[ -f "$OUT/native-q4_0.nib" ] || "$N" convert -m "$OUT/smollm2-q4_0.gguf" -o "$OUT/native-q4_0.nib" --dtype native
[ -f "$OUT/native.nib" ] || "$N" convert -m "$Q41" -o "$OUT/native.nib" --dtype native
[ -f "$OUT/rtn4g128-h8.nib" ] ||
    "$N" quantize -m "$Q41" -o "$OUT/rtn4g128-h8.nib" --method rtn --bits 4 --group-size 128 --head-bits 8 2>/dev/null

. scripts/bench-lib.sh
for r in $(seq 1 "$ROUNDS"); do
    llama "$OUT/smollm2-q4_0.gguf" | sed "s/^/round $r Q4_0 llama.cpp /"
    nibble "$OUT/native-q4_0.nib" | sed "s/^/round $r Q4_0 nibble /"
    llama "$Q41" | sed "s/^/round $r Q4_1 llama.cpp /"
    nibble "$OUT/native.nib" | sed "s/^/round $r Q4_1 nibble /"
    nibble "$OUT/rtn4g128-h8.nib" | sed "s/^/round $r rtn4g128-h8 nibble /"
done
