#!/usr/bin/env bash
# Quantization benchmarks on SmolLM2-135M-Instruct (numbers in the README).
#   scripts/bench-quant.sh time    # wall time + peak RSS of one GPTQ run at the default calibration
#   scripts/bench-quant.sh table   # wikitext-2 perplexity of float / RTN / GPTQ settings
#                                  # (GPTQ on Shakespeare and on the model's own text)
# Environment: CHUNKS (windows of 2048 evaluated, default 20), NSAMPLES (GPTQ
# calibration windows for the table, default 32), THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${NIBBLE_SHARED:-../shared}
N=target/release/nibble
G=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
CALIB=$SHARED/data/tinyshakespeare.txt
WIKI=$SHARED/data/wikitext-2-test.txt
OUT=${OUT:-target/bench-quant}
CHUNKS=${CHUNKS:-20}
NSAMPLES=${NSAMPLES:-32}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
cargo build --release -p nibble-cli >/dev/null

ppl() { "$N" perplexity -m "$1" -f "$WIKI" -c 2048 --chunks "$CHUNKS" -t "$THREADS" | awk '{print $2}'; }
size_bpw() { # overall bits per weight of a .nib (all tensors, embedding included)
    "$N" inspect "$1" | awk '/^summary:/ {print $(NF-3)}'
}

case "${1:-table}" in
time)
    /usr/bin/time -v "$N" quantize -m "$G" -o "$OUT/gptq-q4g128.nib" --method gptq --bits 4 --group-size 128 \
        --calib "$CALIB" --nsamples 128 --seqlen 512 -t "$THREADS" 2>&1 |
        grep -E "wrote|GPTQ vs|time:|Maximum resident|Elapsed"
    ;;
table)
    echo "| model | bits/weight (file) | wikitext-2 ppl (first $CHUNKS × 2048 tokens) |"
    echo "|---|--:|--:|"
    "$N" convert -m "$G" -o "$OUT/f32.nib" --dtype f32 2>/dev/null
    echo "| float32 | $(size_bpw "$OUT/f32.nib") | $(ppl "$OUT/f32.nib") |"
    for cfg in "4 128" "4 0" "3 128"; do
        set -- $cfg
        bits=$1 gs=$2
        label="${bits}-bit $([ "$gs" = 0 ] && echo per-row || echo "g$gs")"
        f="$OUT/rtn-$bits-$gs.nib"
        "$N" quantize -m "$G" -o "$f" --method rtn --bits "$bits" --group-size "$gs" -t "$THREADS" 2>/dev/null
        echo "| RTN $label | $(size_bpw "$f") | $(ppl "$f") |"
        for ao in "" "--act-order"; do
            f="$OUT/gptq-$bits-$gs$ao.nib"
            "$N" quantize -m "$G" -o "$f" --method gptq --bits "$bits" --group-size "$gs" $ao \
                --calib "$CALIB" --nsamples "$NSAMPLES" --seqlen 512 -t "$THREADS" 2>/dev/null
            echo "| GPTQ $label $ao | $(size_bpw "$f") | $(ppl "$f") |"
            f="$OUT/gptq-self-$bits-$gs$ao.nib"   # the default: self-generated calibration
            "$N" quantize -m "$G" -o "$f" --method gptq --bits "$bits" --group-size "$gs" $ao \
                --nsamples "$NSAMPLES" --seqlen 512 -t "$THREADS" 2>/dev/null
            echo "| GPTQ $label $ao, self-generated calibration | $(size_bpw "$f") | $(ppl "$f") |"
        done
    done
    ;;
*) echo "usage: $0 time|table" >&2; exit 2 ;;
esac
