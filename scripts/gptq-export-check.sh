#!/usr/bin/env bash
# Export nibble's GPTQ of SmolLM2 as a GPTQ checkpoint and check that the
# Python ecosystem (GPTQModel, transformers) loads it unchanged and computes
# the perplexity nibble computes (wikitext-2, first 10 windows of 2048, every
# token scored), within 0.5 %. Not run in CI (it installs torch and GPTQModel,
# ~3 GB, and takes ~15 min on 2 cores); docs/gptq-checkpoints.md has its output.
#
# Usage: scripts/gptq-export-check.sh [MODEL.nib]
#   MODEL.nib  a nibble GPTQ model to export (default: SmolLM2-135M-Instruct
#              quantized here, 4-bit g128 act-order, on tinyshakespeare).
# Environment: VENV (default ~/.cache/nibble/venv-gptq), WORK (default
# target/gptq-export-check), NIBBLE_SHARED (default ../shared),
# LOADERS (default "gptqmodel transformers").
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${NIBBLE_SHARED:-../shared}
VENV=${VENV:-$HOME/.cache/nibble/venv-gptq}
WORK=${WORK:-target/gptq-export-check}
LOADERS=${LOADERS:-gptqmodel transformers}
TEXT=$SHARED/data/wikitext-2-test.txt
mkdir -p "$WORK"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import gptqmodel, optimum" 2>/dev/null; then
    echo "== Python environment in $VENV (torch, gptqmodel 7.7.0, optimum 2.3.0, transformers 5.25.0)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch gptqmodel==7.7.0 optimum==2.3.0 transformers==5.25.0
fi

cargo build --release -q -p nibble-cli
NIBBLE=target/release/nibble
MODEL=${1:-}
if [ -z "$MODEL" ]; then
    MODEL=$WORK/smollm2-gptq.nib
    if [ ! -f "$MODEL" ]; then
        echo "== nibble quantize (4-bit g128, act-order, 128 x 512 tokens of tinyshakespeare)"
        $NIBBLE quantize -m "$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" \
            -o "$MODEL" --bits 4 --group-size 128 --calib "$SHARED/data/tinyshakespeare.txt"
    fi
fi
OUT=$WORK/export
rm -rf "$OUT"
echo "== nibble export"
$NIBBLE export -m "$MODEL" -o "$OUT"

echo "== nibble perplexity (the .nib: int8 activations; the exported folder with --dtype f32: float activations)"
nib_ppl() {
    $NIBBLE perplexity "$@" -f "$TEXT" -c 2048 --chunks 10 > "$WORK/nibble-ppl.txt"
    cat "$WORK/nibble-ppl.txt" >&2
    sed -n 's/^perplexity: \([0-9.]*\) .*/\1/p' "$WORK/nibble-ppl.txt"
}
P_NIB=$(nib_ppl -m "$MODEL")
P_F32=$(nib_ppl -m "$OUT" --dtype f32)
[ -n "$P_NIB" ] && [ -n "$P_F32" ] || { echo "no perplexity in nibble's output" >&2; exit 1; }
echo "nibble .nib ppl $P_NIB"
echo "nibble export --dtype f32 ppl $P_F32"

echo "== Python loaders: $LOADERS"
# GPTQModel logs to standard output too: keep only the result lines.
"$VENV/bin/python" scripts/gptq_export_ppl.py "$OUT" "$TEXT" 2048 10 $LOADERS | tee "$WORK/python.log"
grep -aE '^(gptqmodel|transformers) ppl ' "$WORK/python.log" > "$WORK/python.txt"

status=0
while read -r loader _ ppl _; do
    for ref in "nibble:$P_NIB" "nibble-f32:$P_F32"; do
        name=${ref%%:*}; p=${ref#*:}
        rel=$(python3 -c "print('%.3f' % (abs($ppl / $p - 1) * 100))")
        ok=$(python3 -c "print('ok' if abs($ppl / $p - 1) <= 0.005 else 'FAIL')")
        echo "$loader $ppl vs $name $p: $rel % ($ok, limit 0.5 %)"
        [ "$ok" = ok ] || status=1
    done
done < "$WORK/python.txt"
exit $status
