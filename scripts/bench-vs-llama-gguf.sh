#!/usr/bin/env bash
# nibble against llama.cpp on real Q4_K_M files as users download them (the
# three fetched by ../shared/scripts/fetch-models.sh), the same bytes for both:
# nibble runs the `.nib` that `nibble convert` makes of each GGUF (its blocks
# kept as they are). Rounds alternate llama-bench and `nibble bench`, so the
# machine's noise hits both alike.
#
#   LLAMA=/path/to/llama.cpp/build/bin scripts/bench-vs-llama-gguf.sh [ROUNDS] [REPS]
#
# scripts/build-llama-cpp.sh builds llama.cpp. Output: one line per round,
# model, program, threads and test, in tok/s (mean ± sd over REPS runs), then
# the bandwidth bound of nibble's probe.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA=${LLAMA:?set LLAMA to the folder holding llama-bench}
ROUNDS=${1:-3}
REPS=${2:-3}
MODELS=${NIBBLE_MODELS:-$HOME/.cache/nibble/models}
OUT=${OUT:-target/bench-llama-gguf}
N=target/release/nibble
mkdir -p "$OUT"
cargo build --release -q -p nibble-cli
FILES="gemma-3-270m-q4_k_m qwen2.5-coder-0.5b-instruct-q4_k_m qwen2.5-coder-1.5b-instruct-q4_k_m"
for f in $FILES; do
    [ -f "$MODELS/$f.gguf" ] || { echo "missing $MODELS/$f.gguf: run ../shared/scripts/fetch-models.sh all" >&2; exit 1; }
    [ -f "$OUT/$f.nib" ] || "$N" convert -m "$MODELS/$f.gguf" -o "$OUT/$f.nib" >/dev/null
done

. scripts/bench-lib.sh
for r in $(seq 1 "$ROUNDS"); do
    for f in $FILES; do
        llama "$MODELS/$f.gguf" | sed "s/^/round $r $f llama.cpp /"
        nibble "$OUT/$f.nib" | sed "s/^/round $r $f nibble /"
    done
done
