#!/usr/bin/env bash
# Quantization benchmarks on SmolLM2-135M-Instruct (numbers in docs/BENCHMARKS.md).
#   scripts/bench-quant.sh time       # wall time + peak RSS of GPTQ 4-bit g128 at 128 × 512, calibrated on
#                                     # Shakespeare, at the defaults (true-sequential, act-order), then
#                                     # --no-true-sequential, then --no-act-order
#   scripts/bench-quant.sh time-self  # the same with the default calibration (the model's own text)
#   scripts/bench-quant.sh table      # wikitext-2 perplexity of float / RTN / GPTQ settings
# Environment: CHUNKS (windows of 2048 evaluated, default 20; 0 = the whole file), NSAMPLES (GPTQ
# calibration windows for the table, default 32), CALIB (a calibration file for the table's GPTQ rows;
# default: the model's own text), GPTQ_FLAGS (extra flags for the table's GPTQ rows), THREADS (default 2),
# NIBBLE_BIN (the binary to measure; default target/release/nibble, rebuilt first).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${NIBBLE_SHARED:-../shared}
N=${NIBBLE_BIN:-target/release/nibble}
G=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
SHAKESPEARE=$SHARED/data/tinyshakespeare.txt
WIKI=$SHARED/data/wikitext-2-test.txt
OUT=${OUT:-target/bench-quant}
CHUNKS=${CHUNKS:-20}
NSAMPLES=${NSAMPLES:-32}
THREADS=${THREADS:-2}
CALIB=${CALIB:-self}
GPTQ_FLAGS=${GPTQ_FLAGS:-}
mkdir -p "$OUT"
cargo build --release -p nibble-cli >/dev/null

ppl() { "$N" perplexity -m "$1" -f "$WIKI" -c 2048 --chunks "$CHUNKS" -t "$THREADS" | awk '{print $2}'; }
size_bpw() { # overall bits per weight of a .nib (all tensors, embedding included)
    "$N" inspect "$1" | awk '/^summary:/ {print $(NF-3)}'
}
timed() { # one GPTQ run at the issue's settings: the summary lines and peak RSS
    /usr/bin/time -v "$N" quantize -m "$G" -o "$OUT/gptq-q4g128.nib" --method gptq --bits 4 --group-size 128 \
        --nsamples 128 --seqlen 512 -t "$THREADS" "$@" 2>&1 | tr '\r' '\n' |
        grep -E "generated|wrote|GPTQ vs|time:|Maximum resident|Elapsed"
}

case "${1:-table}" in
time)
    echo "== defaults (true-sequential, act-order)"; timed --calib "$SHAKESPEARE"
    echo "== --no-true-sequential"; timed --calib "$SHAKESPEARE" --no-true-sequential
    echo "== --no-act-order"; timed --calib "$SHAKESPEARE" --no-act-order
    ;;
time-self)
    timed
    ;;
table)
    echo "| model | bits/weight (file) | wikitext-2 ppl ($CHUNKS × 2048 tokens; 0 = all) |"
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
        for ao in --no-act-order --act-order; do
            f="$OUT/gptq-$bits-$gs$ao.nib"
            # shellcheck disable=SC2086
            "$N" quantize -m "$G" -o "$f" --method gptq --bits "$bits" --group-size "$gs" $ao $GPTQ_FLAGS \
                --calib "$CALIB" --nsamples "$NSAMPLES" --seqlen 512 -t "$THREADS" 2>/dev/null
            echo "| GPTQ $label $ao $GPTQ_FLAGS (calibration: $CALIB) | $(size_bpw "$f") | $(ppl "$f") |"
        done
    done
    ;;
*) echo "usage: $0 time|time-self|table" >&2; exit 2 ;;
esac
