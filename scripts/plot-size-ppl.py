#!/usr/bin/env python3
"""File size against perplexity, as an SVG (no dependencies beyond Python 3).

    scripts/plot-size-ppl.py [CSV] [SVG]      (defaults: docs/size-ppl.csv, docs/size-ppl.svg)

CSV columns: program (llama.cpp | nibble), variant (a short label: "Q4_0 + imatrix"), mb (file size,
10^6 bytes), ppl (wikitext-2 perplexity by `nibble perplexity`, 10 windows of 2048, every token scored)
and ppl_llama (`llama-perplexity -c 512 --chunks 20`; empty where not measured); a row of program
"float" is drawn as a dashed line at its perplexity (its size is off the chart). The rows are what
scripts/bench-gptq-vs-imatrix.sh prints (SmolLM2-135M-Instruct, Shakespeare calibration); the plot shows
`ppl` against `mb`, one marker per file, lower-left is better.
"""
import csv
import html
import math
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "docs/size-ppl.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else "docs/size-ppl.svg"

with open(src, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["mb"] and r["ppl"]]
if not rows:
    sys.exit(f"{src}: no rows with a size and a perplexity")
for r in rows:
    r["mb"], r["ppl"] = float(r["mb"]), float(r["ppl"])
floats = [r for r in rows if r["program"] == "float"]
rows = [r for r in rows if r["program"] != "float"]

W, H = 760, 640
left, right, top, bottom = 70, 230, 40, 60
pw, ph = W - left - right, H - top - bottom


def span(values, pad):
    lo, hi = min(values), max(values)
    d = (hi - lo) or 1.0
    return lo - pad * d, hi + pad * d


x0, x1 = span([r["mb"] for r in rows], 0.08)
y0, y1 = span([r["ppl"] for r in rows + floats], 0.10)
# Room below the lowest points for the labels pushed down there.
y0 -= 0.25 * (y1 - y0)


def px(v):
    return left + (v - x0) / (x1 - x0) * pw


def py(v):
    return top + (1 - (v - y0) / (y1 - y0)) * ph


def ticks(lo, hi, n=8):
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi:
        out.append(round(t, 10))
        t += step
    return out


style = {
    ("llama.cpp", False): ("#888888", "circle"),
    ("llama.cpp", True): ("#d62728", "circle"),
    ("nibble", False): ("#1f77b4", "square"),
}
svg = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
    f'font-size="12">',
    f'<rect width="{W}" height="{H}" fill="white"/>',
    f'<text x="{left + pw / 2}" y="22" text-anchor="middle" font-size="14">SmolLM2-135M-Instruct: '
    "file size against wikitext-2 perplexity (lower left is better)</text>",
]
for t in ticks(x0, x1):
    x = px(t)
    svg.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#eeeeee"/>')
    svg.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{t:g}</text>')
for t in ticks(y0, y1):
    y = py(t)
    svg.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eeeeee"/>')
    svg.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
svg.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
svg.append(
    f'<text x="{left + pw / 2}" y="{H - 18}" text-anchor="middle">file size (MB)</text>'
)
svg.append(
    f'<text transform="translate(20,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
    "perplexity (nibble perplexity, 10 × 2048)</text>"
)
for r in floats:
    y = py(r["ppl"])
    svg.append(
        f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="black" '
        'stroke-dasharray="4 4"/>'
    )
    svg.append(f'<text x="{left + 6}" y="{y - 5:.1f}" font-size="10">float ({r["ppl"]:.2f})</text>')
placed = []
for r in sorted(rows, key=lambda r: (-r["ppl"], r["mb"])):
    imat = "imatrix" in r["variant"]
    color, shape = style.get((r["program"], imat), style[(r["program"], False)])
    x, y = px(r["mb"]), py(r["ppl"])
    if shape == "circle":
        svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"/>')
    else:
        svg.append(f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{color}"/>')
    label = html.escape(f'{r["program"]} {r["variant"]} ({r["ppl"]:.2f})')
    # Labels of nearby points are moved down until they no longer overlap, with a leader line.
    ly = y
    while any(abs(x - px_) < 170 and abs(ly - py_) < 12 for px_, py_ in placed):
        ly += 12
    placed.append((x, ly))
    if ly != y:
        svg.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 7:.1f}" y2="{ly:.1f}" stroke="#aaaaaa"/>')
    svg.append(f'<text x="{x + 8:.1f}" y="{ly + 4:.1f}" font-size="10">{label}</text>')
legend = [
    ("llama.cpp, plain rounding", style[("llama.cpp", False)]),
    ("llama.cpp, importance matrix", style[("llama.cpp", True)]),
    ("nibble GPTQ", style[("nibble", False)]),
]
for i, (name, (color, shape)) in enumerate(legend):
    x, y = left + pw + 20, top + 20 + 20 * i
    if shape == "circle":
        svg.append(f'<circle cx="{x}" cy="{y - 4}" r="5" fill="{color}"/>')
    else:
        svg.append(f'<rect x="{x - 5}" y="{y - 9}" width="10" height="10" fill="{color}"/>')
    svg.append(f'<text x="{x + 10}" y="{y}">{name}</text>')
svg.append("</svg>")
with open(dst, "w") as f:
    f.write("\n".join(svg) + "\n")
print(f"{dst}: {len(rows)} points")
