#!/usr/bin/env bash
# scripts/bench-mirror.sh — the mirror: pdgate's balancers against the peer
# routers (vllm-router, SGLang's router: each of their P/D policies) on the
# same simulated cluster, the same seeded requests, in one run.
#
#   scripts/bench-mirror.sh             full matrix, ~50 min on 2 cores: every
#                                       router at 95 % (workload a), the core
#                                       routers on every other scenario
#   QUICK=1 scripts/bench-mirror.sh     a few minutes: 4 routers on a95 and c
#
# The cluster: MIRROR_PREFILLS x MIRROR_DECODES engine-sims [4 x 4, default
# profile Llama-3.1-8B on an H100], fresh for every run, speaking the P/D
# protocol the router expects (vLLM NIXL-style for pdgate and vllm-router,
# SGLang bootstrap for pdgate's SGLang mode and SGLang's router). They run
# slower than real time: the time scale puts the capacity the profile predicts
# for the workload (pd-bench --predict-capacity) at MIRROR_HOST_RPS requests/s
# of real time [200], well within what 2 cores drive (the report shows the
# host's CPU for every run). Every figure is in model time.
#
# Scenarios (scripts/mirror.py, SCENARIOS): a50 a80 a95 a110 ShareGPT-like
# chat at 50-110 % of capacity; b long-tailed prompts; c prefix-heavy
# (multi-turn, long shared system prompts); ct the same with prompts in the
# model's tokens (every engine runs engine-sim --tokenizer with the test model
# ./build.sh writes, the prefills publish KV cache events, the rate comes from
# the tokenized lengths: docs/prefix-routing.md); d heterogeneous engines; e
# bursty.
#
# Router families: pdgate/<lb>, pdgate-blind/<lb> (no engine /metrics),
# pdgate-hold/<lb> (pd_hold), pdgate-sglang/<policy>, and in ct only
# pdgate-tok/<lb> (--tokenizer: pd_tokenizer) and pdgate-kv/<lb> (--tokenizer
# and --kv-events: pd_kv_events); vllm-router/<policy>, sglang-router/<policy>.
#
# Knobs: MIRROR_SCENARIOS ("a95 c"), MIRROR_ROUTERS ("pdgate/round_robin
# vllm-router/cache_aware ..." or "all"), MIRROR_SECONDS of arrivals per run
# [25; QUICK 10], MIRROR_SEEDS ["7"], MIRROR_SLO_TTFT_MS [1000],
# MIRROR_SLO_TPOT_MS [50], MIRROR_WORKERS (nginx workers) [2], MIRROR_PROXIES
# (pdgate as that many nginx instances on one port, sharing only the
# engines; the peers stay one process) [1],
# MIRROR_PREFILLS/MIRROR_DECODES [4/4], MIRROR_HOST_RPS [200], MIRROR_OUT
# [bench-out/mirror, QUICK bench-out/mirror-quick], MIRROR_DOCS=1 (copies the
# report and plots to docs/mirror*), VLLM_ROUTER_VERSION [0.1.17],
# SGLANG_ROUTER_VERSION [0.3.2]. Binds 127.0.0.1 only (18710-18799,
# 19710-19799).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x dist/bin/engine-sim ] && [ -x dist/bin/pd-bench ] && [ -x dist/sbin/nginx ] || ./build.sh
VR=${VLLM_ROUTER_VERSION:-0.1.17}
SR=${SGLANG_ROUTER_VERSION:-0.3.2}
if [ ! -x .venv-bench/bin/python ]; then
    . scripts/ensure-debs.sh
    ensure_debs python3-venv
    python3 -m venv .venv-bench
fi
have() { [ "$(.venv-bench/bin/pip show "$1" 2>/dev/null | awk '/^Version/ {print $2}')" = "$2" ]; }
have vllm-router "$VR" || .venv-bench/bin/pip install -q "vllm-router==$VR"
have sglang-router "$SR" || .venv-bench/bin/pip install -q "sglang-router==$SR"
echo "vllm-router $VR, sglang-router $SR, pdgate $(git rev-parse --short HEAD)" >&2
python3 scripts/mirror.py
out=${MIRROR_OUT:-bench-out/mirror$([ "${QUICK:-0}" = 1 ] && echo -quick)}
python3 scripts/mirror-report.py "$out" ${MIRROR_DOCS:+--docs}
