# Shared by the bench-vs-llama scripts: one line per test, "threads test
# mean ± sd" (nibble adds its bandwidth bound), from llama-bench on a GGUF and
# from `nibble bench` on a .nib. Needs $LLAMA, $N (the nibble binary), $REPS.

llama() { # GGUF: lines "threads test mean sd"
    "$LLAMA/llama-bench" -m "$1" -p 128 -n 64 -t 1,2 -r "$REPS" -o csv 2>/dev/null |
        python3 -c '
import csv, sys
for r in csv.DictReader(sys.stdin):
    t = "pp%s" % r["n_prompt"] if int(r["n_prompt"]) > 0 else "tg%s" % r["n_gen"]
    print(r["n_threads"], t, "%.1f ± %.1f" % (float(r["avg_ts"]), float(r["stddev_ts"])))'
}
nibble() { # .nib: the same lines, plus the bandwidth bound
    "$N" bench -m "$1" -p 128 -n 64 -t 1,2 -r "$REPS" 2>/dev/null |
        awk -F'|' '/ pp128 | tg64 / {for (i = 6; i <= 9; i++) gsub(/^ +| +$/, "", $i);
            print $5+0, $6, $7, ($8 == "" ? "" : "(bound " $8 ", " $9 ")")}'
}
