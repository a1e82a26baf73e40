#!/usr/bin/env bash
# nibble's GPTQ against llama.cpp's importance-matrix quantization at equal size (docs/BENCHMARKS.md,
# docs/quantization.md): SmolLM2-135M-Instruct, the same float weights for both (the shared GGUF
# dequantized to F32 by llama-quantize), the same calibration text (128 windows of 512 tokens of
# tinyshakespeare: llama-imatrix -c 512 --chunks 128, nibble --nsamples 128 --seqlen 512), the same
# output files (GGUF Q4_0 / Q4_1 / Q5_0 / Q8_0 / Q6_K and the Q4_K_M mix), and two metrics: `nibble perplexity` (first 10 windows of
# 2048 of wikitext-2, every token scored) and llama.cpp's own `llama-perplexity` on the GGUF files
# (-c 512, first 20 chunks, second half of each window scored).
#
#   scripts/bench-gptq-vs-imatrix.sh [TYPES]     (default TYPES: "q4_0 q4_1 q5_0 q8_0 q4_k_m q6_k")
#
# The rows also go to $OUT/size-ppl.csv, plotted by scripts/plot-size-ppl.py (docs/size-ppl.csv and
# docs/size-ppl.svg hold the last measurement). Also: nibble's Hessian diagonal written as an imatrix (--imatrix-out) and used by llama-quantize,
# and a llama.cpp generation from each of nibble's files (llama-completion or llama-cli if built).
# Environment: LLAMA_BIN (llama.cpp's bin folder; default: scripts/build-llama-cpp.sh's), OUT
# (default target/bench-imatrix), THREADS (default 2), NIBBLE_BIN (default target/release/nibble,
# rebuilt first).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${NIBBLE_SHARED:-../shared}
G=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
CALIB=$SHARED/data/tinyshakespeare.txt
WIKI=$SHARED/data/wikitext-2-test.txt
OUT=${OUT:-target/bench-imatrix}
THREADS=${THREADS:-2}
TYPES=${1:-q4_0 q4_1 q5_0 q8_0 q4_k_m q6_k}
N=${NIBBLE_BIN:-target/release/nibble}
[ -n "${NIBBLE_BIN:-}" ] || cargo build --release -p nibble-cli >/dev/null
B=${LLAMA_BIN:-$(scripts/build-llama-cpp.sh)}
export LD_LIBRARY_PATH=$B${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$OUT"

upper() { echo "$1" | tr a-z A-Z; }
ppl_nibble() { "$N" perplexity -m "$1" -f "$WIKI" -c 2048 --chunks 10 -t "$THREADS" 2>/dev/null | awk '{print $2}'; }
ppl_llama() {
    "$B/llama-perplexity" -m "$1" -f "$WIKI" -c 512 --chunks 20 -t "$THREADS" 2>&1 |
        sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p'
}
mb() { awk -v b="$(stat -c %s "$1")" 'BEGIN {printf "%.1f", b / 1e6}'; }
CSV=$OUT/size-ppl.csv
# row PROGRAM VARIANT FILE: a markdown row on stdout and a CSV row for the plot.
row() {
    local m p l
    m=$(mb "$3")
    p=$(ppl_nibble "$3")
    l=$(ppl_llama "$3")
    echo "| $1 $2 | $m | $p | $l |"
    echo "$1,$2,$m,$p,$l" >> "$CSV"
}

[ -f "$OUT/f32.gguf" ] || "$B/llama-quantize" --allow-requantize "$G" "$OUT/f32.gguf" F32 >/dev/null 2>&1
[ -f "$OUT/imatrix-llama.gguf" ] ||
    "$B/llama-imatrix" -m "$OUT/f32.gguf" -f "$CALIB" -c 512 --chunks 128 -o "$OUT/imatrix-llama.gguf" \
        -t "$THREADS" >/dev/null 2>&1

echo "program,variant,mb,ppl,ppl_llama" > "$CSV"
echo "| model | file MB | nibble perplexity (10 × 2048, every token) | llama-perplexity (20 × 512, second halves) |"
echo "|---|--:|--:|--:|"
row float F32 "$OUT/f32.gguf"
for t in $TYPES; do
    T=$(upper "$t")
    "$B/llama-quantize" "$OUT/f32.gguf" "$OUT/llama-$t.gguf" "$T" "$THREADS" >/dev/null 2>&1
    row llama.cpp "$T" "$OUT/llama-$t.gguf"
    "$B/llama-quantize" --imatrix "$OUT/imatrix-llama.gguf" "$OUT/f32.gguf" "$OUT/llama-$t-imat.gguf" "$T" \
        "$THREADS" >/dev/null 2>&1
    row llama.cpp "$T + imatrix" "$OUT/llama-$t-imat.gguf"
    "$N" quantize -m "$G" -o "$OUT/nibble-gptq-$t.gguf" --gguf "$t" --calib "$CALIB" --nsamples 128 \
        --seqlen 512 -t "$THREADS" --imatrix-out "$OUT/imatrix-nibble-$t.gguf" 2>/dev/null
    row nibble "--gguf $t" "$OUT/nibble-gptq-$t.gguf"
    "$B/llama-quantize" --imatrix "$OUT/imatrix-nibble-$t.gguf" "$OUT/f32.gguf" \
        "$OUT/llama-$t-nibble-imat.gguf" "$T" "$THREADS" >/dev/null 2>&1
    row llama.cpp "$T + nibble's imatrix" "$OUT/llama-$t-nibble-imat.gguf"
done

python3 scripts/plot-size-ppl.py "$CSV" "$OUT/size-ppl.svg"

# llama.cpp generates from nibble's files.
for tool in llama-completion llama-cli; do
    if [ -x "$B/$tool" ]; then
        for t in $TYPES; do
            echo
            echo "\`$tool -m nibble-gptq-$t.gguf -p 'The capital of France is' -n 16 --temp 0\`:"
            "$B/$tool" -m "$OUT/nibble-gptq-$t.gguf" -p "The capital of France is" -n 16 --temp 0 \
                -no-cnv 2>/dev/null </dev/null | head -3
        done
        break
    fi
done
