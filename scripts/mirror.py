#!/usr/bin/env python3
"""mirror: pdgate's routing against the peer routers on one simulated cluster.

Run by scripts/bench-mirror.sh (which builds, installs the peer routers into
.venv-bench/ and documents the knobs); Python 3 standard library only.

For every scenario (a workload, an arrival process and a cluster), every
router in the run meets the same seeded requests on a fresh engine-sim
cluster (xPyD, vLLM NIXL or SGLang bootstrap protocol, whichever the router
speaks), run slower than real time so that the simulated cluster and not the
2-core host is the limit. Rates are set against the capacity the engine
profile predicts for the workload (`pd-bench --predict-capacity`). Every
figure is in model time (real time x the time scale), so it reads as on the
GPUs the profile describes. Writes one pd-bench JSON per run, runs.json (the
figures, the engines' counters, the host's CPU) and the report (report.md,
plots) to the output directory.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(ROOT, "dist")
VENV = os.path.join(ROOT, ".venv-bench", "bin")
P_BASE, D_BASE, SIDE_OFFSET, ROUTER_PORT = 18710, 18730, 1000, 18790
# A prefill engine's KV event ports (tokenized scenarios): its HTTP port
# plus these (PUB, ROUTER for replays).
KV_EVENTS_OFFSET, KV_REPLAY_OFFSET = 40, 50
# The model of the tokenized scenarios (./build.sh writes it): a BPE trained
# on the repository's docs and a ChatML template.
MODEL_DIR = os.path.join(DIST, "share", "test-model")

# --- the routers ------------------------------------------------------------

PDGATE_LBS = ["round_robin", "least_conn", "least_total_load", "weighted_least_active",
              "auto_balance_controller", "prefill_score_balance", "greedy_timeout",
              "length_balance", "pd_score_balance", "prefix_cache_affinity", "earliest_start"]
# pdgate-blind/<lb>: the same without the engines' /metrics (--engine-metrics
# off), pdgate's balancers as they were before issue 13: what reading the
# engines adds. pdgate-hold/<lb>: the same with requests held in the proxy
# (pd_hold, issue 14) while every engine of a pool has its MIRROR_HOLD_SEQS
# ("prefill decode" requests in flight, default "16 256"), answered 503
# after MIRROR_HOLD_TIMEOUT of real time (default 1s), released in
# MIRROR_HOLD_ORDER (fifo or spf, default fifo).
# pdgate-tok/<lb>: the proxy counts and keys prompts in the model's tokens
# (--tokenizer: pd_tokenizer); prefix_cache_affinity's own index is then
# keyed on token blocks. pdgate-kv/<lb>: the same plus the prefill engines'
# KV cache events (--kv-events: pd_kv_events), so prefix_cache_affinity
# routes on what each engine reports holding. Both only in scenarios whose
# engines tokenize (options "tokenizer"): otherwise the proxy's tokens are
# not the engines'.
TOKENIZED_FAMILIES = ("pdgate-tok", "pdgate-kv")
# prefill_refactor's choices (SGLang mode); least_active is its default.
PDGATE_SGLANG = ["least_active", "least_total_load", "weighted_least_active",
                 "auto_balance_controller", "prefill_score_balance", "pd_score_balance"]
# kv_aware needs the engines' KV events (issue 15; engine-sim publishes none yet).
VLLM_ROUTER = ["round_robin", "random", "power_of_two", "cache_aware", "consistent_hash",
               "sticky_least_loaded"]
# manual needs routing keys from the client; bucket is a prefill-only policy.
SGLANG_ROUTER = ["round_robin", "random", "power_of_two", "cache_aware", "bucket"]


def all_routers():
    return ([f"pdgate/{x}" for x in PDGATE_LBS] + [f"pdgate-blind/{x}" for x in PDGATE_LBS]
            + [f"pdgate-hold/{x}" for x in PDGATE_LBS]
            + [f"{f}/{x}" for f in TOKENIZED_FAMILIES for x in PDGATE_LBS]
            + [f"pdgate-sglang/{x}" for x in PDGATE_SGLANG]
            + [f"vllm-router/{x}" for x in VLLM_ROUTER]
            + [f"sglang-router/{x}" for x in SGLANG_ROUTER])


def engine_of(router):
    """The P/D protocol the router speaks."""
    return "sglang" if router.split("/")[0] in ("pdgate-sglang", "sglang-router") else "vllm"


def is_baseline(router):
    return router == "pdgate/round_robin"


def kind_of(router):
    return "pdgate" if router.startswith("pdgate") else "peer"

# --- the scenarios ----------------------------------------------------------

SHAREGPT = ["--lengths", "sharegpt", "--output-len", "100", "--output-max", "256"]
SCENARIOS = {
    # name: (description, pd-bench workload flags, load (fraction of the
    #        predicted capacity), options)
    "a50": ("ShareGPT-like chat at 50 % of capacity", SHAREGPT, 0.50, {}),
    "a80": ("ShareGPT-like chat at 80 %", SHAREGPT, 0.80, {}),
    "a95": ("ShareGPT-like chat at 95 %", SHAREGPT, 0.95, {}),
    "a110": ("ShareGPT-like chat at 110 % (overload)", SHAREGPT, 1.10, {}),
    "a100": ("ShareGPT-like chat at 100 %", SHAREGPT, 1.00, {}),
    "a120": ("ShareGPT-like chat at 120 % (overload)", SHAREGPT, 1.20, {}),
    "a150": ("ShareGPT-like chat at 150 % (overload)", SHAREGPT, 1.50, {}),
    "b": ("long-tailed prompts (10 % of 8k-16k tokens) at 90 %",
          ["--lengths", "longtail", "--output-len", "100", "--output-max", "256"], 0.90, {}),
    "c": ("prefix-heavy: 16 system prompts of 1-4k tokens, 16 users each, 4-turn "
          "conversations, at 80 % of the capacity with a perfect prefix cache",
          SHAREGPT + ["--prefix-groups", "16", "--users-per-group", "16", "--turns", "4",
                      "--prefix-tokens", "1024", "--prefix-tokens-max", "4096"],
          0.80, {"cached": True}),
    # c as the model sees it: every engine of every run counts prompts with
    # the model's tokenizer and chat template (engine-sim --tokenizer), the
    # prefills publish their KV events (each with its own random hash seed,
    # as vLLM without PYTHONHASHSEED), and the load is set from the
    # tokenized lengths (pd-bench --predict-capacity --tokenizer). A
    # scenario of its own so that c's recorded figures stay comparable.
    "ct": ("prefix-heavy as c, prompts in the model's tokens (test model: BPE + ChatML), "
           "at 80 % of the capacity with a perfect prefix cache",
           SHAREGPT + ["--prefix-groups", "16", "--users-per-group", "16", "--turns", "4",
                       "--prefix-tokens", "1024", "--prefix-tokens-max", "4096"],
           0.80, {"cached": True, "tokenizer": True}),
    "d": ("heterogeneous: one prefill and one decode 2.5x slower, at 90 %",
          SHAREGPT, 0.90, {"slow": 0.4}),
    "e": ("bursty: on/off arrivals (on 4 s, off 4 s of real time), 70 % on average",
          SHAREGPT, 0.70, {"on_off": "4,4"}),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def predict(flags, prefills, decodes, slow, tokenized=False):
    """Predicted capacity (req/s, model time) of the cluster for `flags`
    (prompts counted with the model's tokenizer when `tokenized`)."""
    tok = ["--tokenizer", MODEL_DIR] if tokenized else []
    out = subprocess.run([f"{DIST}/bin/pd-bench", "--predict-capacity", *flags, *tok],
                         check=True, capture_output=True, text=True).stdout
    p = json.loads(out)
    # Engine speeds: the first of each role at `slow` of the others'.
    speed = lambda n: n - 1 + slow if slow else n
    return p, speed(prefills), speed(decodes)


def capacity(p, pspeed, dspeed, cached):
    pre = pspeed * (p["prefill"]["rps_cached"] if cached else p["prefill"]["rps"])
    return min(pre, dspeed * p["decode"]["rps"]), pre, dspeed * p["decode"]["rps"]

# --- processes --------------------------------------------------------------


class Run:
    """The processes of one run, stopped together."""

    def __init__(self, work):
        self.work, self.procs, self.nginx_dirs = work, [], []

    def spawn(self, args, log_name, env=None):
        f = open(os.path.join(self.work, log_name), "ab")
        self.procs.append(subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True, env=env))
        f.close()

    def stop(self):
        for d in self.nginx_dirs:
            subprocess.run([f"{DIST}/sbin/nginx", "-p", d, "-c", "nginx.conf", "-s", "stop"],
                           capture_output=True)
            for _ in range(50):
                if not os.path.exists(os.path.join(d, "logs", "nginx.pid")):
                    break
                time.sleep(0.1)
        self.nginx_dirs = []
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []


def get(url, timeout=1.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


def wait_http(url, seconds=30):
    end = time.time() + seconds
    while time.time() < end:
        try:
            if get(url)[0] == 200:
                return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


def ports(n, base):
    return [base + i for i in range(n)]


def start_cluster(run, engine, prefills, decodes, scale, slow, tokenized=False):
    """`tokenized`: every engine counts prompts with the model's tokenizer,
    and the prefills publish their KV cache events (whoever listens)."""
    # No PYTHONHASHSEED: each engine hashes its blocks from a seed of its
    # own, unknown to the proxy, as vLLM does without it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    for role, base, n in (("prefill", P_BASE, prefills), ("decode", D_BASE, decodes)):
        for i, port in enumerate(ports(n, base)):
            s = scale * slow if (slow and i == 0) else scale
            args = [f"{DIST}/bin/engine-sim", "--role", role, "--engine", engine,
                    "--port", str(port), "--kv-port", str(port + SIDE_OFFSET),
                    "--time-scale", f"{s:.6g}", "--kv-hold-ms", "600000",
                    "--bootstrap-timeout-ms", "600000", "--quiet"]
            if tokenized:
                args += ["--tokenizer", MODEL_DIR]
                if role == "prefill":
                    args += ["--kv-events-port", str(port + KV_EVENTS_OFFSET),
                             "--kv-replay-port", str(port + KV_REPLAY_OFFSET)]
            run.spawn(args, "engines.log", env)
    for port in ports(prefills, P_BASE) + ports(decodes, D_BASE):
        if not wait_http(f"http://127.0.0.1:{port}/health"):
            raise RuntimeError(f"engine-sim on {port} did not come up")


def addr_list(ps):
    return ",".join(f"127.0.0.1:{p}" for p in ps)


def start_router(run, router, prefills, decodes, workers, proxies=1):
    """Starts the router; pdgate as `proxies` nginx instances that share
    nothing but the engines and the listening port (reuseport: the kernel
    spreads the clients' connections over them)."""
    family, policy = router.split("/", 1)
    pp, dp = ports(prefills, P_BASE), ports(decodes, D_BASE)
    for k in range(proxies if family.startswith("pdgate") else 1):
        start_one(run, family, policy, pp, dp, workers, k)
    if not wait_http(f"http://127.0.0.1:{ROUTER_PORT}/v1/models", 60):
        raise RuntimeError(f"{router} did not come up (see {run.work}/router.log)")
    if family.startswith("pdgate"):
        # Every instance ready (its engines passed their first health
        # checks): the port answers from any of them, so ask until a run
        # of answers in a row says ready.
        deadline, ok = time.time() + 30, 0
        while ok < 20 and time.time() < deadline:
            try:
                ok = ok + 1 if get(f"http://127.0.0.1:{ROUTER_PORT}/health")[0] == 200 else 0
            except OSError:
                ok = 0
            time.sleep(0.02)


def start_one(run, family, policy, pp, dp, workers, k):
    if family in ("pdgate", "pdgate-blind", "pdgate-hold", "pdgate-sglang") + TOKENIZED_FAMILIES:
        d = os.path.join(run.work, f"nginx{k or ''}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(d, "logs"))
        args = [f"{ROOT}/scripts/global_proxy.sh", "--dry-run", "-f", f"{d}/nginx.conf",
                "--prefix", d, "--nginx-bin", f"{DIST}/sbin/nginx", "--modules-dir",
                f"{DIST}/modules", "--listen-address", "127.0.0.1", "-p", str(ROUTER_PORT),
                "-c", str(workers), "-s", "0", "--prefill-servers-list", addr_list(pp),
                "--decode-servers-list", addr_list(dp)]
        if family in ("pdgate", "pdgate-blind", "pdgate-hold") + TOKENIZED_FAMILIES:
            args += ["--prefill-lb-sdk", policy, "--decode-lb-sdk", policy]
            if family in TOKENIZED_FAMILIES:
                args += ["--tokenizer", MODEL_DIR]
            if family == "pdgate-kv":
                args += ["--kv-events",
                         f"port=+{KV_EVENTS_OFFSET} replay_port=+{KV_REPLAY_OFFSET}"]
            if family == "pdgate-blind":
                args += ["--engine-metrics", "off"]
            if family == "pdgate-hold":
                pseqs, dseqs = os.environ.get("MIRROR_HOLD_SEQS", "16 256").split()
                args += ["--enable-internal-metrics", "--hold", "on", "--prefill-max-num-seqs", pseqs,
                         "--decode-max-num-seqs", dseqs,
                         "--hold-timeout", os.environ.get("MIRROR_HOLD_TIMEOUT", "1s"),
                         "--hold-order", os.environ.get("MIRROR_HOLD_ORDER", "fifo")]
        else:
            args += ["--engine-type", "sglang",
                     "--bootstrap-port", ",".join(str(p + SIDE_OFFSET) for p in pp)]
            if policy != "least_active":
                args += ["--prefill-lb-sdk", policy, "--decode-lb-sdk", policy]
            else:
                args += ["--decode-lb-sdk", "least_conn"]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"global_proxy.sh: {r.stdout}{r.stderr}")
        subprocess.run([f"{DIST}/sbin/nginx", "-p", d, "-c", "nginx.conf"], check=True)
        run.nginx_dirs.append(d)
    elif family == "vllm-router":
        args = [f"{VENV}/vllm-router", "--host", "127.0.0.1", "--port", str(ROUTER_PORT),
                "--vllm-pd-disaggregation", "--policy", policy, "--log-level", "warning"]
        for p in pp:
            args += ["--prefill", f"http://127.0.0.1:{p}"]
        for p in dp:
            args += ["--decode", f"http://127.0.0.1:{p}"]
        run.spawn(args, "router.log")
    elif family == "sglang-router":
        args = [f"{VENV}/python", "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(ROUTER_PORT), "--pd-disaggregation", "--log-level", "warn"]
        if policy == "bucket":
            args += ["--prefill-policy", "bucket", "--decode-policy", "round_robin"]
        else:
            args += ["--policy", policy]
        for p in pp:
            args += ["--prefill", f"http://127.0.0.1:{p}", str(p + SIDE_OFFSET)]
        for p in dp:
            args += ["--decode", f"http://127.0.0.1:{p}"]
        run.spawn(args, "router.log")
    else:
        raise ValueError(f"unknown router family {family}")


def hold_figures():
    """pd_hold's own figures from the proxy's /internal/metrics (a
    pdgate-hold run has them): releases and their mean wake-up delay (ms of
    real time, from a release by any worker to the holder's resume)."""
    try:
        text = get(f"http://127.0.0.1:{ROUTER_PORT}/internal/metrics")[1]
    except OSError:
        return None
    val = {}
    for line in text.splitlines():
        for name in ("pdgate_hold_wake_delay_seconds_sum", "pdgate_hold_wake_delay_seconds_count"):
            if line.startswith(name + "{"):
                val[name] = val.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    n = val.get("pdgate_hold_wake_delay_seconds_count", 0.0)
    s = val.get("pdgate_hold_wake_delay_seconds_sum", 0.0)
    return {"hold_releases": n, "hold_wake_ms": 1000 * s / n if n else None}


def engine_counters(prefills, decodes):
    """Sums of the engines' counters, per role."""
    want = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
            "engine_sim:kv_recompute_total", "engine_sim:kv_transfers_total",
            "vllm:num_preemptions_total", "vllm:prompt_tokens_total")
    out = {}
    for role, ps in (("prefill", ports(prefills, P_BASE)), ("decode", ports(decodes, D_BASE))):
        sums = dict.fromkeys(want, 0.0)
        for p in ps:
            _, text = get(f"http://127.0.0.1:{p}/metrics", 5)
            for line in text.splitlines():
                if line.startswith("#"):
                    continue
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in sums:
                    sums[name] += float(line.rsplit(" ", 1)[1])
        out[role] = sums
    return out


def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle

# --- figures ----------------------------------------------------------------


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    rank = p / 100 * (len(sorted_vals) - 1)
    lo, hi = int(rank), min(int(rank) + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (rank - lo)


def goodput(doc, scale, slo_ttft, slo_tpot, arrival_s):
    """Requests per second of model time that met both SLOs."""
    good = 0
    for r in doc["requests"]:
        if r["status"] != 200 or r["error"] or r["ttft_ms"] is None:
            continue
        if r["ttft_ms"] * scale <= slo_ttft and (r["tpot_ms"] is None or r["tpot_ms"] * scale <= slo_tpot):
            good += 1
    return good / (arrival_s * scale) if arrival_s else None


def completion_rate(doc, scale, arrival_s):
    """Requests finished per second of model time during the second half of
    the arrival window: the cluster's throughput once its batches filled;
    under overload, its capacity."""
    lo, hi = arrival_s * 500, arrival_s * 1000
    n = sum(1 for r in doc["requests"]
            if r["e2e_ms"] is not None and lo <= r["start_ms"] + r["e2e_ms"] < hi)
    return n / (arrival_s / 2 * scale) if arrival_s else None


def figures(doc, scale, slo_ttft, slo_tpot, arrival_s, slo_tight=None):
    """Model-time figures of one pd-bench JSON."""
    reqs = doc["requests"]
    ok = [r for r in reqs if r["status"] == 200 and not r["error"] and r["ttft_ms"] is not None]
    ms = lambda r, k: r[k] * scale if r[k] is not None else None
    ttft = sorted(ms(r, "ttft_ms") for r in ok)
    tpot = sorted(ms(r, "tpot_ms") for r in ok if r["tpot_ms"] is not None)
    e2e = sorted(ms(r, "e2e_ms") for r in ok if r["e2e_ms"] is not None)
    good = sum(1 for r in ok if ms(r, "ttft_ms") <= slo_ttft
               and (r["tpot_ms"] is None or ms(r, "tpot_ms") <= slo_tpot))
    model_s = arrival_s * scale
    f = {"requests": len(reqs), "ok": len(ok), "errors": len(reqs) - len(ok),
         "ttft_mean": sum(ttft) / len(ttft) if ttft else None,
         "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
         "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99), "e2e_p99": pct(e2e, 99),
         "good": good, "goodput": good / model_s if model_s else None,
         "throughput": len(ok) / model_s if model_s else None}
    errs = {}
    for r in reqs:
        if r not in ok:
            key = str(r["status"] or r["error"] or "no first token")[:60]
            errs[key] = errs.get(key, 0) + 1
    f["error_kinds"] = errs
    if slo_tight is not None:
        f["goodput_tight"] = goodput(doc, scale, slo_tight, slo_tpot, arrival_s)
    f["completion_rate"] = completion_rate(doc, scale, arrival_s)
    return f

# --- main -------------------------------------------------------------------


def env_list(name, default):
    v = os.environ.get(name)
    return v.split() if v else default


def main():
    quick = os.environ.get("QUICK") == "1"
    out = os.path.join(ROOT, os.environ.get("MIRROR_OUT",
                                            "bench-out/mirror-quick" if quick else "bench-out/mirror"))
    prefills = int(os.environ.get("MIRROR_PREFILLS", "4"))
    decodes = int(os.environ.get("MIRROR_DECODES", "4"))
    workers = int(os.environ.get("MIRROR_WORKERS", "2"))
    host_rps = float(os.environ.get("MIRROR_HOST_RPS", "200"))
    seconds = float(os.environ.get("MIRROR_SECONDS", "10" if quick else "25"))
    seeds = env_list("MIRROR_SEEDS", ["7"])
    slo_ttft = float(os.environ.get("MIRROR_SLO_TTFT_MS", "1000"))
    slo_tpot = float(os.environ.get("MIRROR_SLO_TPOT_MS", "50"))
    slo_tight = float(os.environ.get("MIRROR_SLO_TIGHT_TTFT_MS", "300"))
    # pdgate as this many nginx instances (the peers stay one process).
    proxies = int(os.environ.get("MIRROR_PROXIES", "1"))
    core = ["pdgate/round_robin", "pdgate/least_total_load", "pdgate-blind/least_total_load",
            "pdgate/pd_score_balance", "pdgate/earliest_start", "pdgate/prefix_cache_affinity",
            "vllm-router/round_robin", "vllm-router/cache_aware", "sglang-router/cache_aware"]
    if quick:
        plan = {"a95": ["pdgate/round_robin", "pdgate/least_total_load",
                        "vllm-router/round_robin", "sglang-router/round_robin"],
                "c": ["pdgate/round_robin", "pdgate/prefix_cache_affinity",
                      "vllm-router/cache_aware", "sglang-router/cache_aware"]}
    else:
        # Every router at a95; of the pdgate-blind ones, the core's.
        plan = {"a95": [r for r in all_routers()
                        if not r.startswith(("pdgate-blind/", "pdgate-hold/", "pdgate-tok/",
                                             "pdgate-kv/")) or r in core]}
        for s in ("a50", "a80", "a110", "b", "c", "d", "e"):
            plan[s] = core
        # The tokenized twin of c: the core, and prefix_cache_affinity
        # keyed on tokens, then on the engines' KV events.
        plan["ct"] = core + ["pdgate-tok/prefix_cache_affinity", "pdgate-kv/prefix_cache_affinity"]
    if os.environ.get("MIRROR_SCENARIOS"):
        names = os.environ["MIRROR_SCENARIOS"].split()
        plan = {s: plan.get(s, core) for s in names}
    if os.environ.get("MIRROR_ROUTERS"):
        rs = os.environ["MIRROR_ROUTERS"].split()
        rs = all_routers() if rs == ["all"] else rs
        plan = {s: rs for s in plan}
    for s, rs in plan.items():
        if s not in SCENARIOS:
            sys.exit(f"mirror: unknown scenario {s} (known: {' '.join(SCENARIOS)})")
        for r in rs:
            if r not in all_routers():
                sys.exit(f"mirror: unknown router {r} (known: {' '.join(all_routers())})")
            if r.split("/")[0] in TOKENIZED_FAMILIES and not SCENARIOS[s][3].get("tokenizer"):
                sys.exit(f"mirror: {r} needs engines that tokenize, scenario {s} has none "
                         f"(tokenized: {' '.join(k for k, v in SCENARIOS.items() if v[3].get('tokenizer'))})")
        if not is_baseline(rs[0]) and "pdgate/round_robin" not in rs:
            rs.insert(0, "pdgate/round_robin")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    work = os.path.join(out, "work")
    os.makedirs(work)
    n_runs = sum(len(v) for v in plan.values()) * len(seeds)
    log(f"mirror: {prefills}P{decodes}D, {n_runs} runs of {seconds:g} s of arrivals "
        f"(about {n_runs * (seconds + 25) / 60:.0f} min), output {out}")
    started = time.time()
    results = {"config": {"prefills": prefills, "decodes": decodes, "workers": workers,
                          "seconds": seconds, "seeds": seeds, "slo_ttft_ms": slo_ttft,
                          "slo_tpot_ms": slo_tpot, "slo_tight_ttft_ms": slo_tight, "host_rps": host_rps, "quick": quick,
                          "proxies": proxies,
                          "versions": versions(), "command": command_line()},
               "scenarios": {}, "runs": []}
    k = 0
    for name, routers in plan.items():
        desc, flags, load, opt = SCENARIOS[name]
        slow = opt.get("slow")
        tokenized = bool(opt.get("tokenizer"))
        p, pspeed, dspeed = predict(flags, prefills, decodes, slow, tokenized)
        cap, pre_cap, dec_cap = capacity(p, pspeed, dspeed, opt.get("cached"))
        rate_model = load * cap
        # The time scale puts the cluster's capacity at host_rps of real time
        # (never faster than real time: the proxies' own latency stays real).
        scale = min(1.0, host_rps / cap)
        rate = rate_model * scale
        results["scenarios"][name] = {
            "description": desc, "flags": flags, "load": load, "prediction": p,
            "capacity": cap, "prefill_capacity": pre_cap, "decode_capacity": dec_cap,
            "rate_model": rate_model, "time_scale": scale, "rate_real": rate,
            "routers": routers, "tokenized": tokenized}
        log(f"\n{name}: {desc}\n  predicted capacity {cap:.1f} req/s (prefill {pre_cap:.1f}, "
            f"decode {dec_cap:.1f}); {rate_model:.1f} req/s of model time; time scale "
            f"{scale:.4g}, {rate:.2f} req/s real")
        for seed in seeds:
            for router in routers:
                k += 1
                run = Run(work)
                label = f"{name}-{router.replace('/', '-')}-s{seed}"
                try:
                    start_cluster(run, engine_of(router), prefills, decodes, scale, slow,
                                  tokenized)
                    start_router(run, router, prefills, decodes, workers, proxies)
                    bench = [f"{DIST}/bin/pd-bench", "--url", f"http://127.0.0.1:{ROUTER_PORT}",
                             "--rate", f"{rate:.6g}", "--duration", f"{seconds:g}",
                             "--seed", seed, "--quiet", "--max-conns", "4000",
                             "--timeout", "900", "--json", f"{out}/{label}.json",
                             "--label", f"{router} @ {name}", *flags]
                    if opt.get("on_off"):
                        bench += ["--on-off", opt["on_off"]]
                    t0, i0 = cpu_times()
                    w0 = time.time()
                    subprocess.run(bench, check=True, capture_output=True)
                    wall = time.time() - w0
                    t1, i1 = cpu_times()
                    counters = engine_counters(prefills, decodes)
                    hold = hold_figures() if router.startswith("pdgate-hold/") else None
                finally:
                    run.stop()
                with open(f"{out}/{label}.json") as f:
                    doc = json.load(f)
                fig = figures(doc, scale, slo_ttft, slo_tpot, seconds, slo_tight)
                pre = counters["prefill"]
                q = pre["vllm:prefix_cache_queries_total"]
                fig["prefix_hit_rate"] = pre["vllm:prefix_cache_hits_total"] / q if q else None
                fig["kv_recompute"] = counters["decode"]["engine_sim:kv_recompute_total"]
                fig["preemptions"] = counters["decode"]["vllm:num_preemptions_total"]
                fig["host_cpu"] = 1 - (i1 - i0) / (t1 - t0) if t1 > t0 else None
                fig["wall_s"] = wall
                if hold:
                    fig.update(hold)
                results["runs"].append({"scenario": name, "router": router, "seed": seed,
                                        "json": f"{label}.json", **fig})
                log(f"  [{k}/{n_runs}] {router:34s} TTFT mean {fmt(fig['ttft_mean'])} "
                    f"p99 {fmt(fig['ttft_p99'])} ms, TPOT p99 {fmt(fig['tpot_p99'])} ms, "
                    f"goodput {fmt(fig['goodput'])} req/s, hit {fmt(fig['prefix_hit_rate'], 3)}, "
                    f"errors {fig['errors']}, recompute {fig['kv_recompute']:.0f}, "
                    f"cpu {fmt(100 * fig['host_cpu'], 0)} %"
                    + (f", hold wake-up {fmt(hold['hold_wake_ms'], 2)} ms real over "
                       f"{hold['hold_releases']:.0f} releases" if hold else ""))
                with open(f"{out}/runs.json", "w") as f:
                    json.dump(results, f, indent=1)
    results["config"]["elapsed_s"] = time.time() - started
    with open(f"{out}/runs.json", "w") as f:
        json.dump(results, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)
    log(f"\nmirror: {n_runs} runs in {results['config']['elapsed_s'] / 60:.1f} min; "
        f"report: scripts/mirror-report.py {os.path.relpath(out, ROOT)}")


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def versions():
    v = {}
    for pkg in ("vllm-router", "sglang-router"):
        try:
            r = subprocess.run([f"{VENV}/pip", "show", pkg], capture_output=True, text=True)
            v[pkg] = next((ln.split()[1] for ln in r.stdout.splitlines()
                           if ln.startswith("Version:")), None)
        except OSError:
            v[pkg] = None
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    v["pdgate"] = r.stdout.strip()
    return v


def command_line():
    keys = sorted(k for k in os.environ if k.startswith("MIRROR_") or k == "QUICK")
    env = " ".join(f"{k}={os.environ[k]!r}" for k in keys)
    return (env + " " if env else "") + "scripts/bench-mirror.sh"


if __name__ == "__main__":
    main()
