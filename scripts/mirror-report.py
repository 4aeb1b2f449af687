#!/usr/bin/env python3
"""mirror-report: the mirror's report from its runs.json (scripts/mirror.py).

    scripts/mirror-report.py bench-out/mirror [--docs]

Writes report.md and one SVG per scenario (horizontal bars per router: TTFT
p99, TTFT mean, goodput, prefix-cache hit rate) plus loads.svg (TTFT p99
against the load, workload a) into the directory; with --docs also copies
them to docs/mirror.md and docs/mirror-*.svg. Python 3 standard library only.
"""

import html
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror  # noqa: E402  (the same figures as the runs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "pdgate/round_robin"
COLOURS = {"pdgate": "#0072B2", "pdgate-blind": "#7FA7C9", "pdgate-hold": "#CC79A7",
           "pdgate-tok": "#D55E00", "pdgate-kv": "#8B0000",
           "pdgate-sglang": "#56B4E9", "vllm-router": "#E69F00", "sglang-router": "#009E73"}


# Scenarios in reading order (scripts/mirror.py's SCENARIOS).
ORDER = ["a50", "a80", "a95", "a100", "a110", "a120", "a150", "b", "c", "ct", "d", "e"]


def run_doc(d, run):
    """The run's pd-bench JSON, None when it is gone."""
    try:
        with open(os.path.join(d, run["json"])) as f:
            return json.load(f)
    except OSError:
        return None


def late_figures(d, run, scale, tight, tpot, seconds):
    """The figures runs.json may predate (goodput at the tight SLO, the
    finished rate), computed as scripts/mirror.py computes them."""
    need = [k for k in ("goodput_tight", "completion_rate") if run.get(k) is None]
    doc = run_doc(d, run) if need else None
    if doc is not None:
        run.setdefault("goodput_tight", None)
        run.setdefault("completion_rate", None)
        if run["goodput_tight"] is None:
            run["goodput_tight"] = mirror.goodput(doc, scale, tight, tpot, seconds)
        if run["completion_rate"] is None:
            run["completion_rate"] = mirror.completion_rate(doc, scale, seconds)


def family(router):
    return router.split("/")[0]


def is_peer(router):
    return family(router) in ("vllm-router", "sglang-router")


def fmt(x, nd=1):
    return "–" if x is None else f"{x:,.{nd}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def mean_runs(runs):
    """Per (scenario, router): the mean of every numeric figure over seeds."""
    acc = {}
    for r in runs:
        acc.setdefault((r["scenario"], r["router"]), []).append(r)
    out = {}
    for key, rs in acc.items():
        m = {}
        for k, v in rs[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals = [x[k] for x in rs if x.get(k) is not None]
                m[k] = sum(vals) / len(vals) if vals else None
            else:
                m[k] = v
        m["seeds"] = len(rs)
        out[key] = m
    return out


def best(rows, pred, key="ttft_p99"):
    cands = [r for r in rows if pred(r["router"]) and r.get(key) is not None]
    return min(cands, key=lambda r: r[key]) if cands else None


# --- SVG ----------------------------------------------------------------------

def bars_svg(title, rows, panels):
    """Horizontal bars: one panel per (key, label, better) in `panels`."""
    name_w, bar_w, row_h, top, gap = 250, 240, 18, 58, 70
    w = name_w + len(panels) * (bar_w + gap) + 20
    h = top + row_h * len(rows) + 40
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
         f'font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(title)}</text>']
    for i, r in enumerate(rows):
        y = top + i * row_h
        o.append(f'<text x="{name_w - 6}" y="{y + 13}" text-anchor="end">'
                 f'{html.escape(r["router"])}</text>')
    for j, (key, label, better) in enumerate(panels):
        x0 = name_w + j * (bar_w + gap)
        vals = [r.get(key) for r in rows]
        vmax = max([v for v in vals if v is not None] or [1]) or 1
        o.append(f'<text x="{x0}" y="{top - 10}" font-weight="bold">'
                 f'{html.escape(label)} ({better} is better)</text>')
        for i, (r, v) in enumerate(zip(rows, vals)):
            y = top + i * row_h
            if v is None:
                o.append(f'<text x="{x0 + 2}" y="{y + 13}">n/a</text>')
                continue
            bw = max(1.0, v / vmax * (bar_w - 60))
            col = COLOURS.get(family(r["router"]), "#999")
            if r["router"] == BASE:
                col = "#000000"
            o.append(f'<rect x="{x0}" y="{y + 2}" width="{bw:.1f}" height="{row_h - 5}" '
                     f'fill="{col}"/>')
            nd = 3 if key == "prefix_hit_rate" else (0 if v >= 100 else 1)
            o.append(f'<text x="{x0 + bw + 4:.1f}" y="{y + 13}">{fmt(v, nd)}</text>')
    legend = [("pdgate round robin (baseline)", "#000000")] + [
        (f, c) for f, c in COLOURS.items()]
    x = 10
    for name, col in legend:
        o.append(f'<rect x="{x}" y="{h - 22}" width="12" height="12" fill="{col}"/>')
        o.append(f'<text x="{x + 16}" y="{h - 12}">{html.escape(name)}</text>')
        x += 30 + 7 * len(name)
    o.append("</svg>")
    return "\n".join(o)


def lines_svg(title, series, xlabel, ylabel):
    """series: {name: [(x, y), ...]}."""
    w, h, l, r, t, b = 760, 420, 70, 230, 40, 50
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if not pts:
        return None
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymax = max(p[1] for p in pts) * 1.05 or 1
    sx = lambda x: l + (x - xmin) / ((xmax - xmin) or 1) * (w - l - r)
    sy = lambda y: h - b - y / ymax * (h - t - b)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
         f'font-family="sans-serif" font-size="12">', f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(title)}</text>',
         f'<line x1="{l}" y1="{h - b}" x2="{w - r}" y2="{h - b}" stroke="black"/>',
         f'<line x1="{l}" y1="{t}" x2="{l}" y2="{h - b}" stroke="black"/>',
         f'<text x="{(l + w - r) / 2}" y="{h - 12}" text-anchor="middle">{html.escape(xlabel)}</text>',
         f'<text x="14" y="{(t + h - b) / 2}" transform="rotate(-90 14 {(t + h - b) / 2})" '
         f'text-anchor="middle">{html.escape(ylabel)}</text>']
    for k in range(5):
        yv = ymax * k / 4
        o.append(f'<text x="{l - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:,.0f}</text>')
        o.append(f'<line x1="{l}" y1="{sy(yv):.1f}" x2="{w - r}" y2="{sy(yv):.1f}" stroke="#ddd"/>')
    for xv in sorted({p[0] for p in pts}):
        o.append(f'<text x="{sx(xv):.1f}" y="{h - b + 16}" text-anchor="middle">{xv:g}</text>')
    palette = ["#000000", "#0072B2", "#56B4E9", "#CC79A7", "#D55E00", "#E69F00", "#009E73",
               "#F0E442", "#999999"]
    for i, (name, s) in enumerate(series.items()):
        col = palette[i % len(palette)]
        dash = ' stroke-dasharray="5,3"' if is_peer(name) else ""
        s = [p for p in sorted(s) if p[1] is not None]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        o.append(f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2"{dash}/>')
        for x, y in s:
            o.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{col}"/>')
        ly = t + 14 + i * 18
        o.append(f'<line x1="{w - r + 10}" y1="{ly - 4}" x2="{w - r + 34}" y2="{ly - 4}" '
                 f'stroke="{col}" stroke-width="2"{dash}/>')
        o.append(f'<text x="{w - r + 40}" y="{ly}">{html.escape(name)}</text>')
    o.append("</svg>")
    return "\n".join(o)


# --- the report -----------------------------------------------------------------

def order(rows):
    def key(r):
        f = family(r["router"])
        return (r["router"] != BASE, ["pdgate", "pdgate-blind", "pdgate-hold", "pdgate-tok", "pdgate-kv",
                                      "pdgate-sglang", "vllm-router", "sglang-router"].index(f),
                r["router"])
    return sorted(rows, key=key)


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    d = argv[0]
    docs = "--docs" in argv[1:]
    with open(os.path.join(d, "runs.json")) as f:
        res = json.load(f)
    cfg, scen = res["config"], res["scenarios"]
    scen = {k: scen[k] for k in sorted(scen, key=lambda k: ORDER.index(k) if k in ORDER else 99)}
    tight = cfg.get("slo_tight_ttft_ms", 300)
    for r in res["runs"]:
        s = scen[r["scenario"]]
        late_figures(d, r, s["time_scale"], tight, cfg["slo_tpot_ms"], cfg["seconds"])
    means = mean_runs(res["runs"])
    v = cfg["versions"]
    slo = f"TTFT ≤ {cfg['slo_ttft_ms']:g} ms and TPOT ≤ {cfg['slo_tpot_ms']:g} ms"
    md = ["# The mirror: pdgate against the peer routers on a simulated cluster", "",
          f"{cfg['prefills']}P{cfg['decodes']}D `engine-sim` (default profile: Llama-3.1-8B on an H100, "
          f"see [engine-sim.md](engine-sim.md)), fresh engines for every run, each speaking the P/D "
          f"protocol its router expects (vLLM NIXL-style for pdgate and vllm-router, SGLang bootstrap "
          f"for pdgate's SGLang mode and SGLang's router). pdgate: nginx configured by "
          f"`scripts/global_proxy.sh` ({cfg['workers']} workers"
          + (f"; {cfg['proxies']} nginx instances on one port (reuseport), sharing nothing but "
             f"the engines" if cfg.get("proxies", 1) > 1 else "")
          + "), the named balancer on both pools (`pdgate-blind/`: without the engines' "
          "`/metrics`, `--engine-metrics off`; `pdgate-tok/`: prompts counted and keyed in the model's "
          "tokens, `--tokenizer`; `pdgate-kv/`: that and the prefill engines' KV cache events, "
          "`--kv-events`, in the scenarios whose engines tokenize). "
          f"vllm-router {v.get('vllm-router')} and sglang-router {v.get('sglang-router')} from PyPI, "
          f"P/D mode, the named policy on both pools; pdgate at {v.get('pdgate')}. The same seeded "
          f"requests (pd-bench, streaming chat, seeds {', '.join(cfg['seeds'])}) for every router, "
          f"{cfg['seconds']:g} s of real time of Poisson arrivals per run.", "",
          "**Time.** The engines run slower than real time: for each scenario the time scale puts the "
          "capacity the profile predicts (`pd-bench --predict-capacity`, from the step formula) at "
          f"{cfg['host_rps']:g} requests/s of real time, which the 2-core host drives (its CPU during "
          "each run is in the tables). **Every figure is in model time** (real × the time scale), so "
          "it reads as on the GPUs the profile describes. Goodput: requests per second of model time "
          f"that met {slo}; goodput@{tight:g} the same with TTFT ≤ {tight:g} ms. Hit rate: the prefill engines' prefix-cache hits ÷ queries (their "
          "`/metrics`). Recompute: decodes that had to recompute a prompt (KV not handed over); "
          "0 everywhere means every router really hands the KV over.", "",
          f"Command: `{cfg['command']}` ({cfg.get('elapsed_s', 0) / 60:.0f} min). Raw runs: "
          "`runs.json` and one pd-bench JSON per run in the output directory.", "",
          "## Scenarios and capacity", "",
          "| scenario | predicted capacity (req/s) | prefill / decode limit | time scale | rate (req/s, model) "
          "| finished (req/s), most / least | host CPU max |",
          "|:---|---:|---:|---:|---:|---:|---:|"]
    for name, s in scen.items():
        rows = [m for (sn, _), m in means.items() if sn == name]
        done = [r["completion_rate"] for r in rows if r.get("completion_rate") is not None]
        cpu = max((r["host_cpu"] or 0) for r in rows) if rows else None
        md.append(f"| **{name}**: {s['description']} | {s['capacity']:.0f} | "
                  f"{s['prefill_capacity']:.0f} / {s['decode_capacity']:.0f} | {s['time_scale']:.3g} | "
                  f"{s['rate_model']:.0f} | {fmt(max(done) if done else None, 0)} / "
                  f"{fmt(min(done) if done else None, 0)} | {fmt(100 * cpu if cpu else None, 0)} % |")
    md += ["", "Finished: requests completed per second of model time during the second half of the "
           "arrival window (the batches filled), the most and the least over the routers. Below "
           "capacity it follows the offered rate; at 110 % it is the capacity the cluster reaches, "
           "beside the one the profile predicts.", ""]

    summary = []
    loads = {}
    for name, s in scen.items():
        rows = order([m for (sn, _), m in means.items() if sn == name])
        base = next((r for r in rows if r["router"] == BASE), None)
        peer = best(rows, is_peer)
        ours = best(rows, lambda x: not is_peer(x) and x != BASE)
        md += [f"## {name}: {s['description']}", "",
               f"Rate {s['rate_model']:.0f} req/s of model time ({s['rate_real']:.1f} real, time scale "
               f"{s['time_scale']:.3g}). Ratios: against pdgate's round robin (÷ rr) and against the "
               f"best peer policy of this scenario by TTFT p99 (÷ peer: "
               f"{peer['router'] if peer else 'none run'}).", "",
               f"| router | TTFT mean | p50 | p99 | TPOT p99 | E2E p99 | goodput | goodput@{tight:g} | hit rate "
               "| errors | recompute | p99 ÷ rr | p99 ÷ peer | goodput@ ÷ rr | CPU |",
               "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            md.append(
                f"| {r['router']} | {fmt(r['ttft_mean'])} | {fmt(r['ttft_p50'])} | "
                f"{fmt(r['ttft_p99'])} | {fmt(r['tpot_p99'])} | {fmt(r['e2e_p99'], 0)} | "
                f"{fmt(r['goodput'])} | {fmt(r['goodput_tight'])} | {fmt(r['prefix_hit_rate'], 3)} | "
                f"{r['errors']:.0f} | "
                f"{r['kv_recompute']:.0f} | {fmt(ratio(r['ttft_p99'], base and base['ttft_p99']), 2)} | "
                f"{fmt(ratio(r['ttft_p99'], peer and peer['ttft_p99']), 2)} | "
                f"{fmt(ratio(r['goodput_tight'], base and base['goodput_tight']), 2)} | "
                f"{fmt(100 * r['host_cpu'] if r['host_cpu'] is not None else None, 0)} % |")
        errs = {}
        for r in res["runs"]:
            if r["scenario"] == name:
                for k, n in r["error_kinds"].items():
                    errs.setdefault(r["router"], []).append(f"{n} × {k}")
        if errs:
            md += ["", "Errors: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in errs.items()) + "."]
        svg = bars_svg(f"{name}: {s['description']}", rows,
                       [("ttft_p99", "TTFT p99, ms", "shorter"), ("ttft_mean", "TTFT mean, ms", "shorter"),
                        ("goodput_tight", f"goodput@{tight:g}, req/s", "longer"),
                        ("prefix_hit_rate", "prefix hit rate", "longer")])
        with open(os.path.join(d, f"mirror-{name}.svg"), "w") as f:
            f.write(svg)
        md += ["", f"![{name}](mirror-{name}.svg)", ""]
        if base and ours:
            summary.append((name, ours, base, peer))
        if name.startswith("a") and name[1:].isdigit():
            for r in rows:
                loads.setdefault(r["router"], []).append((int(name[1:]), r["ttft_p99"]))
    multi = {k: v for k, v in loads.items() if len(v) > 1}
    if multi:
        svg = lines_svg("Workload a: TTFT p99 (ms, model time) against the load", multi,
                        "load, % of predicted capacity", "TTFT p99, ms")
        with open(os.path.join(d, "mirror-loads.svg"), "w") as f:
            f.write(svg)
        md += ["## Workload a against the load", "", "![loads](mirror-loads.svg)", ""]
    if summary:
        md += ["## Where pdgate stands", "",
               "pdgate's best policy per scenario (lowest TTFT p99 but round robin) against round robin "
               "and the best peer policy:", "",
               "| scenario | pdgate's best | TTFT p99 ÷ rr | ÷ best peer | mean TTFT ÷ rr | goodput ÷ rr "
               f"| goodput@{tight:g} ÷ rr | hit rate ÷ rr |", "|:---|:---|---:|---:|---:|---:|---:|---:|"]
        for name, ours, base, peer in summary:
            md.append(f"| {name} | {ours['router']} | {fmt(ratio(ours['ttft_p99'], base['ttft_p99']), 2)} | "
                      f"{fmt(ratio(ours['ttft_p99'], peer and peer['ttft_p99']), 2)} | "
                      f"{fmt(ratio(ours['ttft_mean'], base['ttft_mean']), 2)} | "
                      f"{fmt(ratio(ours['goodput'], base['goodput']), 2)} | "
                      f"{fmt(ratio(ours['goodput_tight'], base['goodput_tight']), 2)} | "
                      f"{fmt(ratio(ours['prefix_hit_rate'], base['prefix_hit_rate']), 2)} |")
        md.append("")
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(os.path.join(d, "report.md"))
    if docs:
        with open(os.path.join(ROOT, "docs", "mirror.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        for fn in os.listdir(d):
            if fn.startswith("mirror-") and fn.endswith(".svg"):
                shutil.copy(os.path.join(d, fn), os.path.join(ROOT, "docs", fn))
        print("docs/mirror.md")


if __name__ == "__main__":
    main(sys.argv[1:])
