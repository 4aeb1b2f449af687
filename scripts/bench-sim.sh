#!/usr/bin/env bash
# scripts/bench-sim.sh — how many requests one engine-sim process serves on
# one core when the model is instant (the simulator's own overhead, so that
# it is never the bottleneck of a measurement).
#
# engine-sim --instant is pinned to CPU 0, wrk to CPU 1; 1-token and
# 16-token completions, non-streaming and streaming. Prints req/s and the
# simulator's CPU time per request. Binds 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${BENCH_DURATION:-5}
PORT=${BENCH_PORT:-18390}
. scripts/ensure-debs.sh
ensure_debs wrk
[ -x dist/bin/engine-sim ] || ./build.sh
W=$(mktemp -d /tmp/pdgate-bench-sim.XXXXXX)
taskset -c 0 dist/bin/engine-sim --instant --quiet --port "$PORT" --kv-port 0 2>"$W/sim.log" &
SIM=$!
trap 'kill $SIM 2>/dev/null; rm -rf "$W"' EXIT
for _ in $(seq 50); do curl -sf "127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done

ticks() { awk '{print $14 + $15}' "/proc/$SIM/stat"; }
HZ=$(getconf CLK_TCK)
printf '%-28s %10s %12s\n' case req/s "cpu us/req"
for c in "1 false" "16 false" "16 true"; do
    set -- $c
    cat > "$W/body.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"m","prompt":"$(head -c 1000 /dev/zero | tr '\0' 'w')","max_tokens":$1,"ignore_eos":true,"stream":$2}'
LUA
    t0=$(ticks)
    out=$(taskset -c 1 wrk -t1 -c16 -d"${DUR}s" -s "$W/body.lua" "http://127.0.0.1:$PORT/v1/completions")
    t1=$(ticks)
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    printf '%-28s %10.0f %12.1f\n' "max_tokens=$1 stream=$2" "$rps" "$(awk -v d=$((t1 - t0)) -v n="$n" -v hz="$HZ" 'BEGIN{print d*1e6/hz/n}')"
done
