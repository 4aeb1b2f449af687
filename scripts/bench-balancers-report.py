#!/usr/bin/env python3
"""bench-balancers-report: the arithmetic of scripts/bench-balancers.sh.

    probe FILE.json          the capacity verdict of one probe step:
                             "yes|no <finished ratio> <ttft growth> <ttft p50 ms>"
    next OK BAD RATE VERDICT BISECTED MAX STEPS
                             the probe's next step: "<ok> <bad> <next rate|stop>"
    row FILE.json LB LOAD RATE SEED CPU
                             one line of the live table
    report DIR [--capacity R] [--command C] [--elapsed S] [--time-scale X] [--output-len N]
                             the markdown report of DIR/runs.tsv (stdout)

A probe rate is sustained when (1) the requests that finished during the
second half of the arrival window number at least 95 % of those that
arrived in it, and (2) the p50 TTFT of the last quarter of arrivals is at
most 2x that of the second quarter, plus 5 ms. Python 3 standard library only.
"""

import csv
import json
import math
import os
import statistics
import sys

KEEP_UP = 0.95
TTFT_GROWTH = 2.0
TTFT_SLACK_MS = 5.0


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pct(values, p):
    """numpy's default (linear) percentile, as pd-bench reports."""
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def probe(doc):
    """(sustained, finished ratio, ttft growth, ttft p50) of a probe run."""
    span = doc["config"].get("duration_s") or 0
    reqs = [r for r in doc["requests"] if r.get("scheduled_ms") is not None]
    if not span and reqs:
        span = max(r["scheduled_ms"] for r in reqs) / 1e3
    lo, hi = span * 500.0, span * 1000.0  # ms: the second half
    arrived = sum(1 for r in reqs if lo <= r["scheduled_ms"] < hi)
    finished = sum(
        1
        for r in reqs
        if r.get("status") and 200 <= r["status"] < 300 and r.get("e2e_ms") is not None
        and lo <= r["start_ms"] + r["e2e_ms"] < hi
    )
    ratio = finished / arrived if arrived else 0.0

    def ttft_p50(a, b):
        return pct(
            [
                r["ttft_ms"]
                for r in reqs
                if r.get("ttft_ms") is not None and a * span * 1e3 <= r["scheduled_ms"] < b * span * 1e3
            ],
            50,
        )

    q2, q4 = ttft_p50(0.25, 0.5), ttft_p50(0.75, 1.0)
    growth = q4 / q2 if q2 and not math.isnan(q2) else math.inf
    ok = ratio >= KEEP_UP and not math.isnan(q4) and q4 <= TTFT_GROWTH * q2 + TTFT_SLACK_MS
    all_p50 = (doc["summary"].get("ttft_ms") or {}).get("p50", math.nan)
    return ok, ratio, growth, all_p50


def next_rate(ok, bad, rate, verdict, bisected, max_bisect, steps):
    """Up or down by 1.5x until both bounds are known, then bisect."""
    if verdict == "yes":
        ok = max(ok, rate)
    else:
        bad = min(bad, rate) if bad else rate
    if steps >= 12:
        return ok, bad, "stop"
    if not bad:
        return ok, bad, f"{ok * 1.5:.4g}"
    if not ok:
        return ok, bad, f"{bad / 1.5:.4g}" if bad / 1.5 >= 0.5 else "stop"
    if ok > bad or bisected >= max_bisect:
        return ok, bad, "stop"
    return ok, bad, f"{(ok + bad) / 2:.4g}"


def figures(doc):
    s = doc["summary"]

    def g(k, p):
        v = s.get(k)
        return v.get(p, math.nan) if isinstance(v, dict) else math.nan

    return {
        "ttft_p50": g("ttft_ms", "p50"),
        "ttft_p99": g("ttft_ms", "p99"),
        "tpot_p50": g("tpot_ms", "p50"),
        "tpot_p99": g("tpot_ms", "p99"),
        "tok_s": s.get("output_throughput", math.nan),
        "req_s": s.get("request_throughput", math.nan),
        "errors": s.get("failed", 0),
        "requests": s.get("requests", 0),
    }


def row(doc, lb, load, rate, seed, cpu):
    f = figures(doc)
    return "%-24s %6s %7s %4s | %9.1f %9.1f %9.2f %9.2f | %9.0f %9.2f | %6d %4s" % (
        lb, load, rate, seed, f["ttft_p50"], f["ttft_p99"], f["tpot_p50"], f["tpot_p99"],
        f["tok_s"], f["req_s"], f["errors"], cpu,
    )


def mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else math.nan


def to_model(f, scale):
    """Wall-clock figures of a run whose engines ran `scale` times faster
    than real time, in the engines' model time."""
    if scale == 1:
        return f
    g = dict(f)
    for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
        g[k] = f[k] * scale
    for k in ("tok_s", "req_s"):
        g[k] = f[k] / scale
    return g


def report(out, capacity, command, elapsed, time_scale, output_len):
    scale = float(time_scale or 1)
    with open(os.path.join(out, "runs.tsv"), encoding="utf-8") as f:
        runs = list(csv.DictReader(f, delimiter="\t"))
    probes = [r for r in runs if r["kind"] == "probe"]
    main = [r for r in runs if r["kind"] == "run"]
    seeds = sorted({r["seed"] for r in main}, key=int)
    seconds = sorted({r["seconds"] for r in main})
    lines = ["# Balancers on a simulated 4P4D cluster", ""]
    lines += [
        "Four prefill and four decode `engine-sim`s (default profile: Llama-3.1-8B on an H100, "
        + ("real time" if float(time_scale) == 1 else f"time scale {time_scale}")
        + ", fresh engines for every run), nginx (one worker) with `set_request_id` + `prefill` and "
        "the same balancer on both pools, `pd-bench --endpoint chat --lengths sharegpt "
        f"--output-len {output_len}` (Poisson arrivals, streaming) for {', '.join(seconds)} s of "
        f"arrivals per run, seeds {', '.join(seeds)}; every figure is the mean over the seeds. "
        "Everything (8 simulators, nginx, pd-bench) shares one host, whose CPU use during each run "
        "(all processes, ours or not) is the `cpu %` column: near 100 %, the host rather than the "
        "simulated cluster is the limit.",
        "",
    ]
    if scale != 1:
        lines += [
            f"The engines ran at time scale {time_scale} (`engine-sim --time-scale`): times below are "
            f"model times (measured x {time_scale}), rates and throughputs model rates (measured / "
            f"{time_scale}).",
            "",
        ]
    lines += [
        f"Command: `{command}` ({elapsed} s in all). JSON per run: `{os.path.relpath(out)}/`.",
        "",
    ]
    if probes:
        lines += [
            "## Capacity (round robin)",
            "",
            "A rate is sustained when the requests that finished in the second half of the arrival "
            f"window are at least {KEEP_UP:.0%} of those that arrived in it, and the p50 TTFT of the "
            f"last quarter of arrivals is at most {TTFT_GROWTH:g}x that of the second quarter "
            f"(+{TTFT_SLACK_MS:g} ms). Rates go up or down by 1.5x, then bisect; the capacity is the "
            "highest sustained rate.",
            "",
            "| rate (req/s) | finished / arrived | TTFT p50 growth | TTFT p50 (ms) | cpu % | sustained |",
            "|---:|---:|---:|---:|---:|:---|",
        ]
        cap_cpu = None
        for r in probes:
            ok, ratio, growth, p50 = probe(load(r["json"]))
            if capacity and float(r["rate"]) == float(capacity):
                cap_cpu = float(r["cpu"])
            lines.append(
                f"| {float(r['rate']) / scale:g} | {ratio:.3f} | {growth:.2f} | {p50 * scale:.1f} | "
                f"{r['cpu']} | {'yes' if ok else 'no'} |"
            )
        lines += ["", f"**Capacity: {float(capacity) / scale:g} req/s.**" if capacity else "", ""]
        if cap_cpu is not None and cap_cpu >= 90:
            lines += [
                f"The host was {cap_cpu:.0f} % busy at that rate: this capacity is (at least partly) "
                "the host's, not the simulated cluster's. `BENCH_TIME_SCALE` below 1 slows the "
                "engines so that the host keeps up.",
                "",
            ]
    elif capacity:
        lines += [f"Capacity: {float(capacity) / scale:g} req/s (given, `BENCH_CAPACITY`).", ""]
    # Mean over seeds per (load, balancer), in run order.
    groups = {}
    for r in main:
        groups.setdefault((r["load"], r["balancer"]), []).append(r)
    lines += [
        "## Balancers" + (f" at {', '.join(dict.fromkeys(r['load'] for r in main))} of capacity" if probes or capacity else ""),
        "",
        "| balancer | load | rate (req/s) | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) "
        "| output tok/s | errors | TTFT p99 ÷ rr | cpu % |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    agg = {}
    for (ld, lb), rs in groups.items():
        fs = [to_model(figures(load(r["json"])), scale) for r in rs]
        agg[(ld, lb)] = {k: mean([f[k] for f in fs]) for k in fs[0]}
        p99s = [f["ttft_p99"] for f in fs]
        agg[(ld, lb)]["p99_spread"] = (max(p99s) - min(p99s)) / 2 if len(p99s) > 1 else None
        agg[(ld, lb)]["errors"] = sum(f["errors"] for f in fs)
        agg[(ld, lb)]["cpu"] = mean([float(r["cpu"]) for r in rs])
        agg[(ld, lb)]["rate"] = f"{float(rs[0]['rate']) / scale:g}"
    # Rows by load, then balancer, each in order of first appearance (the
    # script rotates the balancers' order from block to block).
    lb_order = list(dict.fromkeys(r["balancer"] for r in main))
    ld_order = list(dict.fromkeys(r["load"] for r in main))
    keys = sorted(agg, key=lambda k: (ld_order.index(k[0]), lb_order.index(k[1])))
    for ld, lb in keys:
        a = agg[(ld, lb)]
        rr = agg.get((ld, "round_robin"), {}).get("ttft_p99")
        vs = f"{a['ttft_p99'] / rr:.2f}" if rr else "n/a"
        p99 = f"{a['ttft_p99']:.1f}"
        if a["p99_spread"] is not None:
            p99 += f" ± {a['p99_spread']:.1f}"
        lines.append(
            f"| {lb} | {ld} | {a['rate']} | {a['ttft_p50']:.1f} | {p99} | "
            f"{a['tpot_p50']:.2f} | {a['tpot_p99']:.2f} | {a['tok_s']:.0f} | {a['errors']} | {vs} | "
            f"{a['cpu']:.0f} |"
        )
    lines += [""]
    if len(seeds) > 1:
        lines += ["TTFT p99: mean ± half the range over the seeds.", ""]
    lines += ["Plot: [balancers-cluster.svg](balancers-cluster.svg).", ""]
    return "\n".join(lines)


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "probe":
        ok, ratio, growth, p50 = probe(load(args[0]))
        print("yes" if ok else "no", f"{ratio:.3f}", f"{growth:.2f}", f"{p50:.1f}")
    elif cmd == "next":
        ok, bad, rate = float(args[0]), float(args[1]), float(args[2])
        o, b, n = next_rate(ok, bad, rate, args[3], int(args[4]), int(args[5]), int(args[6]))
        print(f"{o:g}", f"{b:g}", n)
    elif cmd == "row":
        print(row(load(args[0]), *args[1:6]))
    elif cmd == "report":
        opts = {"--capacity": "", "--command": "", "--elapsed": "", "--time-scale": "1", "--output-len": ""}
        it = iter(args[1:])
        for a in it:
            if a not in opts:
                sys.exit(f"bench-balancers-report: unknown option {a}")
            opts[a] = next(it, "")
        print(
            report(
                args[0], opts["--capacity"], opts["--command"], opts["--elapsed"],
                opts["--time-scale"], opts["--output-len"],
            )
        )
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
