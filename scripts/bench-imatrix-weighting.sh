#!/usr/bin/env bash
# nibble against llama-quantize given the same importance matrix, on any GGUF model: both programs
# round the same F32 weights (the GGUF dequantized by llama-quantize) with llama-imatrix's statistics
# (tinyshakespeare, CHUNKS windows of 512), nibble once per search weighting (--search-weight
# importance | llama-cpp); prints each file's size, llama-perplexity (-c 512 --chunks 20) and
# `nibble perplexity` (10 × 2048, every token), and checks that the tensor types are llama.cpp's.
#
#   scripts/bench-imatrix-weighting.sh MODEL.gguf [TYPE]     (default TYPE: q4_0)
#
# Environment: LLAMA_BIN (default: scripts/build-llama-cpp.sh's), OUT (default target/bench-weighting),
# CHUNKS (default 32), THREADS (default 2), NIBBLE_BIN (default target/release/nibble, rebuilt first).
# scripts/imatrix-weighted-error.py compares the files' importance-weighted error tensor by tensor.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
TYPE=${2:-q4_0}
SHARED=${NIBBLE_SHARED:-../shared}
OUT=${OUT:-target/bench-weighting}
CHUNKS=${CHUNKS:-32}
THREADS=${THREADS:-2}
N=${NIBBLE_BIN:-target/release/nibble}
[ -n "${NIBBLE_BIN:-}" ] || cargo build --release -p nibble-cli >/dev/null
B=${LLAMA_BIN:-$(scripts/build-llama-cpp.sh)}
export LD_LIBRARY_PATH=$B${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
WIKI=$SHARED/data/wikitext-2-test.txt
mkdir -p "$OUT"
T=$(echo "$TYPE" | tr a-z A-Z)

[ -f "$OUT/f32.gguf" ] || "$B/llama-quantize" --allow-requantize "$MODEL" "$OUT/f32.gguf" F32 >/dev/null 2>&1
[ -f "$OUT/imatrix.gguf" ] ||
    "$B/llama-imatrix" -m "$OUT/f32.gguf" -f "$SHARED/data/tinyshakespeare.txt" -c 512 --chunks "$CHUNKS" \
        -o "$OUT/imatrix.gguf" -t "$THREADS" >/dev/null 2>&1
"$B/llama-quantize" --imatrix "$OUT/imatrix.gguf" "$OUT/f32.gguf" "$OUT/llama-$TYPE-imat.gguf" "$T" \
    "$THREADS" >/dev/null 2>&1
for w in importance llama-cpp; do
    "$N" quantize -m "$OUT/f32.gguf" -o "$OUT/nibble-$TYPE-$w.gguf" --gguf "$TYPE" --imatrix "$OUT/imatrix.gguf" \
        --search-weight "$w" -t "$THREADS" 2>/dev/null
done
echo "| file | bytes | llama-perplexity (20 × 512) | nibble perplexity (10 × 2048) |"
echo "|---|--:|--:|--:|"
for f in "llama-$TYPE-imat" "nibble-$TYPE-importance" "nibble-$TYPE-llama-cpp"; do
    l=$("$B/llama-perplexity" -m "$OUT/$f.gguf" -f "$WIKI" -c 512 --chunks 20 -t "$THREADS" 2>&1 |
        sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
    n=$("$N" perplexity -m "$OUT/$f.gguf" -f "$WIKI" -c 2048 --chunks 10 -t "$THREADS" 2>/dev/null | awk '{print $2}')
    echo "| $f | $(stat -c %s "$OUT/$f.gguf") | $l | $n |"
done
if python3 -c "import gguf, numpy" 2>/dev/null; then
    python3 scripts/imatrix-weighted-error.py "$OUT/f32.gguf" "$OUT/imatrix.gguf" "$OUT/llama-$TYPE-imat.gguf" \
        "$OUT/nibble-$TYPE-importance.gguf" "$OUT/nibble-$TYPE-llama-cpp.gguf"
else
    echo "(pip install gguf numpy for the per-tensor weighted errors and type check)"
fi
