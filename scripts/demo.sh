#!/usr/bin/env bash
# scripts/demo.sh — pdgate end to end, on this machine, without GPUs.
#
# Builds (if needed), starts 2 prefill + 2 decode engine simulators
# (dist/bin/engine-sim, timing model of Llama-3.1-8B on an H100), starts nginx
# with pdgate's modules in front of them (dist/conf/pdgate-2p2d.conf), sends a
# streaming chat request with the official `openai` Python client (installed
# into .venv-demo), shows that the KV went from prefill to decode, runs a
# 30-second pd-bench load, and stops everything it started.
#
#   scripts/demo.sh                 DEMO_BENCH_SECONDS=10 scripts/demo.sh
#
# Listens on 127.0.0.1 only: proxy 8080, prefill 8101-8102 (+ side channels
# 9101-9102), decode 8201-8202 (9201-9202).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIST="$ROOT/dist"
BENCH_SECONDS=${DEMO_BENCH_SECONDS:-30}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "build"
./build.sh

PIDS=()
NGINX_STARTED=0
cleanup() {
    [ "$NGINX_STARTED" = 1 ] && "$DIST/sbin/nginx" -p "$DIST" -c conf/pdgate-2p2d.conf -s stop 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

for port in 8080 8101 8102 8201 8202 9101 9102 9201 9202; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "demo: 127.0.0.1:$port is already in use; stop what listens there first" >&2
        exit 1
    fi
done

say "start 2 prefill + 2 decode simulators"
for port in 8101 8102; do
    "$DIST/bin/engine-sim" --role prefill --port "$port" --model demo-llama-3-8b \
        2>"$DIST/logs/sim-prefill-$port.log" &
    PIDS+=($!)
done
for port in 8201 8202; do
    "$DIST/bin/engine-sim" --role decode --port "$port" --model demo-llama-3-8b \
        2>"$DIST/logs/sim-decode-$port.log" &
    PIDS+=($!)
done
for port in 8101 8102 8201 8202; do
    for _ in $(seq 50); do curl -sf "127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
    echo "  127.0.0.1:$port $(curl -sf "127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
done

say "start nginx with pdgate (dist/conf/pdgate-2p2d.conf)"
"$DIST/sbin/nginx" -p "$DIST" -c conf/pdgate-2p2d.conf
NGINX_STARTED=1
echo "  proxy on 127.0.0.1:8080, pid $(cat "$DIST/logs/demo-nginx.pid")"
# Engines take traffic once their health checks pass (pd_health_check):
# /health says when every pool has one.
for _ in $(seq 50); do curl -sf 127.0.0.1:8080/health >/dev/null && break; sleep 0.1; done
echo "  ready: $(curl -s 127.0.0.1:8080/health)"

say "install the openai client into .venv-demo (first run only)"
if [ ! -x .venv-demo/bin/python ] || ! .venv-demo/bin/python -c 'import openai' 2>/dev/null; then
    python3 -m venv .venv-demo
    .venv-demo/bin/pip install -q --disable-pip-version-check openai
fi
.venv-demo/bin/python -c 'import openai; print("  openai", openai.__version__)'

say "a streaming chat completion through the proxy"
.venv-demo/bin/python - <<'PY'
import time
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none")
t0 = time.time()
first = None
chunks = 0
stream = client.chat.completions.create(
    model="demo-llama-3-8b",
    messages=[{"role": "user", "content": "Tell me about prefill/decode disaggregation. " * 20}],
    max_tokens=48,
    stream=True,
    stream_options={"include_usage": True},
    extra_headers={"X-Request-Id": "demo-request-1"},
)
print("  answer: ", end="", flush=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        if first is None:
            first = time.time() - t0
        chunks += 1
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        usage = chunk.usage
print()
print(f"  {chunks} content chunks, TTFT {first * 1000:.1f} ms, total {(time.time() - t0) * 1000:.1f} ms, "
      f"usage: prompt {usage.prompt_tokens}, completion {usage.completion_tokens}")
PY

say "what the engines saw (request demo-request-1)"
grep -h "demo-request-1" "$DIST"/logs/sim-*.log | sed 's/^/  /' || true
sleep 0.2
for port in 8201 8202; do
    echo "  decode $port: $(curl -s "127.0.0.1:$port/metrics" | grep -E '^engine_sim:kv_(transfers|recompute)_total' | sed 's/{[^}]*}//' | tr '\n' ' ')"
done

if [ -x "$DIST/bin/pd-bench" ]; then
    say "pd-bench: ${BENCH_SECONDS}s, Poisson 8 req/s, ShareGPT-like lengths, streaming"
    "$DIST/bin/pd-bench" --url http://127.0.0.1:8080 --endpoint chat --model demo-llama-3-8b \
        --rate 8 --duration "$BENCH_SECONDS" --lengths sharegpt --seed 1
    for port in 8201 8202; do
        echo "  decode $port: $(curl -s "127.0.0.1:$port/metrics" | grep -E '^engine_sim:kv_(transfers|recompute)_total' | sed 's/{[^}]*}//' | tr '\n' ' ')"
    done
fi

say "stop everything"
