#!/usr/bin/env bash
# Decoding speed alone and beside a competing CPU-bound process, for two
# nibble binaries side by side (issue 24: the spin pool on a busy machine).
#
#   scripts/bench-busy.sh OLD_BIN NEW_BIN MODEL [ROUNDS]
#
# For each round, each binary (alternating) and each thread setting (-t 1,
# -t 2: on a 2-core machine both binaries' default), `nibble bench -p 0 -n 32 -r 2
# --no-bandwidth` runs once on the idle machine and once while a busy loop
# (`yes > /dev/null`) occupies one core. Prints one line per measurement:
# round, binary, load, threads, tok/s.
set -euo pipefail
OLD=$1 NEW=$2 MODEL=$3 ROUNDS=${4:-3}
tg() { "$1" bench -m "$MODEL" --dtype native -p 0 -n 32 -r 2 --no-bandwidth -t "$2" 2>/dev/null |
       awk -F'|' '/tg32/ { gsub(/ /, "", $7); split($7, a, "±"); print a[1] }'; }
for r in $(seq 1 "$ROUNDS"); do
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    for load in idle busy; do
      pid=""
      if [ "$load" = busy ]; then yes > /dev/null & pid=$!; sleep 0.5; fi
      for t in 1 2; do
        echo "$r $which $load t=$t $(tg "$bin" "$t")"
      done
      [ -n "$pid" ] && kill "$pid" && wait "$pid" 2>/dev/null || true
    done
  done
done
