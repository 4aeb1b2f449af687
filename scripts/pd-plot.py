#!/usr/bin/env python3
"""pd-plot: compare pd-bench runs in one picture.

Reads the --json files of several pd-bench runs and draws four panels of
bars, one group per run: TTFT p50/p99, TPOT p50/p99 (ms), output token
throughput (tok/s), and request throughput with goodput (req/s). Writes SVG;
a name ending in .png is converted with rsvg-convert (Debian: librsvg2-bin).
Python 3 standard library only.

    scripts/pd-plot.py -o rr.svg rr.json least-load.json
    scripts/pd-plot.py -o cmp.png --label "round robin" --label "least load" a.json b.json

A run is labelled by --label (in file order), else the label it was run with
(pd-bench --label), else its file name.

With --lines, runs labelled "NAME @ X" (X a number, e.g. "60%" or "50/s")
become point X of the line NAME, in four panels: TTFT p50, TTFT p99, TPOT
p50 and output token throughput against X. Runs with the same label (several
seeds) are averaged.

    scripts/pd-plot.py --lines -o loads.svg bench-out/balancers/*-seed*.json
"""

import argparse
import html
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

# Colours per series (Okabe-Ito, readable by colour-blind people).
COLOURS = ["#56B4E9", "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00"]
# --lines: the Okabe-Ito colours but yellow (too pale on white), then the same dashed.
LINE_COLOURS = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7"]
PANEL_W, PANEL_H = 520, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 50, 80


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"pd-plot: {path}: {e}")
    if not isinstance(doc, dict) or "summary" not in doc:
        sys.exit(f"pd-plot: {path}: not a pd-bench --json file")
    return doc


def pick(summary, *keys):
    v = summary
    for k in keys:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v if isinstance(v, (int, float)) else None


def nice_ceiling(x):
    """A round axis maximum >= x, and its tick step."""
    if not x or x <= 0:
        return 1.0, 0.2
    raw = x / 5
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if step * 5 >= x:
            break
    top = step * math.ceil(x / step - 1e-9)
    return top, step


def fmt(v):
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def text(x, y, s, size=12, anchor="middle", weight="normal", rotate=None, fill="#222"):
    tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}" fill="{fill}"{tr}>{html.escape(str(s))}</text>'
    )


def panel(ox, oy, title, unit, labels, series):
    """One bar panel at (ox, oy). series: [(name, [value per run])]."""
    out = [f'<g transform="translate({ox},{oy})">']
    out.append(text(PANEL_W / 2, 22, title, size=15, weight="bold"))
    pw = PANEL_W - MARGIN_L - MARGIN_R
    ph = PANEL_H - MARGIN_T - MARGIN_B
    x0, y0 = MARGIN_L, MARGIN_T + ph
    vals = [v for _, vs in series for v in vs if v is not None]
    top, step = nice_ceiling(max(vals) if vals else 0)
    # Grid and y axis.
    t = 0.0
    while t <= top + step / 2:
        y = y0 - ph * t / top
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(text(x0 - 6, y + 4, fmt(t), size=11, anchor="end"))
        t += step
    out.append(text(16, MARGIN_T + ph / 2, unit, size=12, rotate=-90))
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0 + pw}" y2="{y0}" stroke="#444"/>')
    # Bars: a group per run, a bar per series.
    n_runs, n_ser = len(labels), len(series)
    group_w = pw / max(n_runs, 1)
    bar_w = min(48, group_w * 0.8 / n_ser)
    for i, label in enumerate(labels):
        gx = x0 + group_w * i + (group_w - bar_w * n_ser) / 2
        for j, (_, vs) in enumerate(series):
            v = vs[i]
            bx = gx + j * bar_w
            if v is None:
                out.append(text(bx + bar_w / 2, y0 - 4, "n/a", size=10, fill="#888"))
                continue
            h = ph * v / top if top else 0
            out.append(
                f'<rect x="{bx + 1:.1f}" y="{y0 - h:.1f}" width="{bar_w - 2:.1f}" '
                f'height="{h:.1f}" fill="{COLOURS[j % len(COLOURS)]}"/>'
            )
            out.append(text(bx + bar_w / 2, y0 - h - 4, fmt(v), size=10))
        cx = x0 + group_w * (i + 0.5)
        short = label if len(label) <= 22 else label[:21] + "…"
        if n_runs > 3 or len(short) > max(4, group_w / 7):
            out.append(text(cx, y0 + 16, short, size=11, anchor="end", rotate=-25))
        else:
            out.append(text(cx, y0 + 18, short, size=11))
    # Legend.
    if n_ser > 1:
        lx = x0 + pw
        for j, (name, _) in reversed(list(enumerate(series))):
            w = 7 * len(name) + 22
            lx -= w
            out.append(
                f'<rect x="{lx:.1f}" y="32" width="12" height="12" '
                f'fill="{COLOURS[j % len(COLOURS)]}"/>'
            )
            out.append(text(lx + 16, 42, name, size=11, anchor="start"))
    out.append("</g>")
    return out


def svg(labels, docs, title):
    s = [d["summary"] for d in docs]
    col = lambda *k: [pick(x, *k) for x in s]
    panels = [
        ("TTFT", "ms", [("p50", col("ttft_ms", "p50")), ("p99", col("ttft_ms", "p99"))]),
        ("TPOT", "ms", [("p50", col("tpot_ms", "p50")), ("p99", col("tpot_ms", "p99"))]),
        ("Output token throughput", "tokens/s", [("output", col("output_throughput"))]),
        (
            "Request throughput",
            "requests/s",
            [("all ok", col("request_throughput"))]
            + ([("goodput", col("goodput"))] if any(v is not None for v in col("goodput")) else []),
        ),
    ]
    head = 40 if title else 0
    width, height = 2 * PANEL_W, 2 * PANEL_H + head
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(text(width / 2, 28, title, size=18, weight="bold"))
    for k, (name, unit, series) in enumerate(panels):
        out += panel((k % 2) * PANEL_W, head + (k // 2) * PANEL_H, name, unit, labels, series)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def leading_number(s):
    """The number a string starts with ("60%" -> 60.0), or None."""
    digits = ""
    for c in s.strip():
        if c.isdigit() or (c in ".-" and not digits.count(c)):
            digits += c
        else:
            break
    try:
        return float(digits)
    except ValueError:
        return None


def lines_svg(labels, docs, title):
    """One line per series across x values, from labels "NAME @ X"."""
    series, xs = {}, {}
    for label, d in zip(labels, docs):
        name, at, x = label.rpartition("@")
        xv = leading_number(x)
        if not at or not name.strip() or xv is None:
            sys.exit(f'pd-plot: --lines needs labels "NAME @ X" with X a number, not "{label}"')
        xs[xv] = x.strip()
        series.setdefault(name.strip(), {}).setdefault(xv, []).append(d["summary"])
    xvals = sorted(xs)

    def mean_of(summaries, *keys):
        vals = [v for v in (pick(s, *keys) for s in summaries) if v is not None]
        return sum(vals) / len(vals) if vals else None

    panels = [
        ("TTFT p50", "ms", ("ttft_ms", "p50")),
        ("TTFT p99", "ms", ("ttft_ms", "p99")),
        ("TPOT p50", "ms", ("tpot_ms", "p50")),
        ("Output token throughput", "tokens/s", ("output_throughput",)),
    ]
    names = list(series)
    per_row = 4
    legend_h = 24 * math.ceil(len(names) / per_row) + 10
    head = 40 if title else 0
    width, height = 2 * PANEL_W, 2 * PANEL_H + head + legend_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(text(width / 2, 28, title, size=18, weight="bold"))

    def style(j):
        dash = ' stroke-dasharray="6 4"' if j >= len(LINE_COLOURS) else ""
        return LINE_COLOURS[j % len(LINE_COLOURS)], dash

    for k, (pname, unit, keys) in enumerate(panels):
        ox, oy = (k % 2) * PANEL_W, head + (k // 2) * PANEL_H
        out.append(f'<g transform="translate({ox},{oy})">')
        out.append(text(PANEL_W / 2, 22, pname, size=15, weight="bold"))
        pw, ph = PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B
        x0, y0 = MARGIN_L, MARGIN_T + ph
        vals = {n: [mean_of(series[n].get(x, []), *keys) for x in xvals] for n in names}
        top, step = nice_ceiling(max([v for vs in vals.values() for v in vs if v is not None], default=0))
        t = 0.0
        while t <= top + step / 2:
            y = y0 - ph * t / top
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(text(x0 - 6, y + 4, fmt(t), size=11, anchor="end"))
            t += step
        out.append(text(16, MARGIN_T + ph / 2, unit, size=12, rotate=-90))
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0 + pw}" y2="{y0}" stroke="#444"/>')
        lo, hi = xvals[0], xvals[-1]

        def px(x):
            return x0 + pw / 2 if hi == lo else x0 + 20 + (pw - 40) * (x - lo) / (hi - lo)

        for x in xvals:
            out.append(text(px(x), y0 + 18, xs[x], size=11))
        for j, n in enumerate(names):
            colour, dash = style(j)
            pts = [(px(x), y0 - ph * v / top) for x, v in zip(xvals, vals[n]) if v is not None]
            if len(pts) > 1:
                path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
                out.append(
                    f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
                )
            for a, b in pts:
                out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>')
        out.append("</g>")
    # Legend under the panels.
    ly0 = head + 2 * PANEL_H
    col_w = width / per_row
    for j, n in enumerate(names):
        colour, dash = style(j)
        lx, ly = 20 + col_w * (j % per_row), ly0 + 14 + 24 * (j // per_row)
        out.append(
            f'<line x1="{lx:.1f}" y1="{ly:.1f}" x2="{lx + 28:.1f}" y2="{ly:.1f}" '
            f'stroke="{colour}" stroke-width="3"{dash}/>'
        )
        out.append(text(lx + 34, ly + 4, n, size=12, anchor="start"))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(
        description="Draw pd-bench --json results side by side (SVG, or PNG via rsvg-convert)."
    )
    ap.add_argument("files", nargs="+", metavar="FILE.json", help="pd-bench --json outputs")
    ap.add_argument(
        "-o", "--output", default="pd-plot.svg", help="output .svg or .png [pd-plot.svg]"
    )
    ap.add_argument(
        "--label", action="append", default=[], help="a run's name, in file order (repeat)"
    )
    ap.add_argument("--title", default="", help="a title above the panels")
    ap.add_argument(
        "--lines",
        action="store_true",
        help='lines across loads: runs labelled "NAME @ X" are point X of line NAME',
    )
    a = ap.parse_args()
    if len(a.label) > len(a.files):
        ap.error("more --label than files")
    docs = [load(f) for f in a.files]
    labels = []
    for i, (f, d) in enumerate(zip(a.files, docs)):
        if i < len(a.label):
            labels.append(a.label[i])
        elif d.get("label"):
            labels.append(str(d["label"]))
        else:
            labels.append(os.path.splitext(os.path.basename(f))[0])
    doc = lines_svg(labels, docs, a.title) if a.lines else svg(labels, docs, a.title)
    if a.output.endswith(".png"):
        conv = shutil.which("rsvg-convert")
        if not conv:
            sys.exit(
                "pd-plot: PNG needs rsvg-convert (apt-get install librsvg2-bin); write .svg instead"
            )
        with tempfile.NamedTemporaryFile("w", suffix=".svg", delete=False, encoding="utf-8") as t:
            t.write(doc)
        try:
            subprocess.run([conv, "-o", a.output, t.name], check=True)
        finally:
            os.unlink(t.name)
    else:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(doc)
    print(f"pd-plot: wrote {a.output} ({len(docs)} runs)")


if __name__ == "__main__":
    main()
