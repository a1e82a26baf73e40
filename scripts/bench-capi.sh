#!/usr/bin/env bash
# C API overhead: tokens/s of examples/c/generate (C API, streaming callback)
# against `nibble bench` (Rust API, no text output) and `nibble run --stats`
# (Rust API, streaming to stdout), on the same model and thread count,
# interleaved so that the machine's noise hits all three alike.
#
#   scripts/bench-capi.sh MODEL [THREADS] [REPS] [N_GEN]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/bench-capi.sh MODEL [THREADS] [REPS] [N_GEN]}
THREADS=${2:-1}
REPS=${3:-5}
N=${4:-64}
PROMPT="Once upon a time"
cargo build --release -q -p nibble -p nibble-cli
make -s -C examples/c generate >/dev/null
for r in $(seq 1 "$REPS"); do
    c=$(examples/c/generate "$MODEL" "$PROMPT" "$N" "$THREADS" 2>&1 >/dev/null |
        sed -n 's/.*generated \([0-9]*\) tokens in .* (\([0-9.]*\) tok\/s).*/\2/p')
    b=$(target/release/nibble bench -m "$MODEL" -p 0 -n "$N" -t "$THREADS" -r 1 --no-bandwidth 2>/dev/null |
        sed -n 's/.*| tg'"$N"' | \([0-9.]*\) ±.*/\1/p')
    s=$(target/release/nibble run -m "$MODEL" -p "$PROMPT" -n "$N" --temp 0 -t "$THREADS" --stats 2>&1 >/dev/null |
        sed -n 's/.*generation: [0-9]* tokens, \([0-9.]*\) tok\/s.*/\1/p')
    echo "rep $r: C API generate.c $c tok/s | nibble bench tg$N $b tok/s | nibble run $s tok/s"
done
