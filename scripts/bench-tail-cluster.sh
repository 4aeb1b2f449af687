#!/usr/bin/env bash
# scripts/bench-tail-cluster.sh — TTFT tail of round robin on a saturated
# simulated cluster: pdgate configured by scripts/global_proxy.sh (as a user
# would, BENCH_WORKERS workers) against vllm-router's round robin, same
# engine-sim cluster (4 prefill + 4 decode, vLLM NIXL mode, fresh engines for
# every run), same seeded shared-prefix workload (pd-bench), runs interleaved.
#
#   scripts/bench-tail-cluster.sh
#   BENCH_BASELINE=/path/to/other/checkout scripts/bench-tail-cluster.sh
#                  also pdgate from that checkout's generator and dist/
#
# Knobs: BENCH_RATE (Poisson req/s) [20], BENCH_SECONDS [30], BENCH_SEEDS
# ["7 8 9"], BENCH_TIME_SCALE (engine-sim, below 1 is slower than real time,
# so that the cluster and not the host saturates) [0.25], BENCH_WORKERS [4,
# the generator's default], BENCH_ROUTERS ["pdgate vllm-router", plus
# "base" with a baseline], BENCH_WORKLOAD (pd-bench flags) [16 system prompts
# of 1024 tokens x 8 users x 3 turns, ShareGPT-like lengths, 100 output].
# vllm-router (PyPI vllm-router) is installed into .venv-bench/ when missing.
# Prints TTFT mean/p50/p90/p99/max per router and seed, then the means over
# seeds and the ratios to vllm-router. Binds 127.0.0.1 only (18710-18799,
# 19710-19799).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RATE=${BENCH_RATE:-20}
SECS=${BENCH_SECONDS:-30}
SEEDS=${BENCH_SEEDS:-"7 8 9"}
SCALE=${BENCH_TIME_SCALE:-0.25}
WORKERS=${BENCH_WORKERS:-4}
BASE=${BENCH_BASELINE:-}
ROUTERS=${BENCH_ROUTERS:-"pdgate ${BASE:+base }vllm-router"}
WORKLOAD=${BENCH_WORKLOAD:-"--prefix-groups 16 --users-per-group 8 --turns 3 --prefix-tokens 1024 --lengths sharegpt --output-len 100"}
VR_VERSION=${BENCH_VLLM_ROUTER:-0.1.17}
P_PORTS="18710 18711 18712 18713"
D_PORTS="18720 18721 18722 18723"
PORT=18790

. scripts/lib/bench-backends.sh
[ -x dist/bin/engine-sim ] && [ -x dist/bin/pd-bench ] && [ -x dist/sbin/nginx ] || ./build.sh
case " $ROUTERS " in *" vllm-router "*)
    if [ ! -x .venv-bench/bin/vllm-router ]; then
        . scripts/ensure-debs.sh
        ensure_debs python3-venv
        python3 -m venv .venv-bench
        .venv-bench/bin/pip install -q "vllm-router==$VR_VERSION"
    fi ;;
esac
W=$(mktemp -d /tmp/pdgate-tail-cluster.XXXXXX)
chmod 755 "$W"
mkdir -p "$W/logs"
SIMS=(); ROUTER=""
stop_all() {
    [ -z "$ROUTER" ] || kill "$ROUTER" 2>/dev/null || true
    [ ! -f "$W/gp/nginx.conf" ] || "$ROOT/dist/sbin/nginx" -p "$W/gp" -c nginx.conf -s stop 2>/dev/null || true
    for p in "${SIMS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ROUTER=""; SIMS=(); rm -rf "$W/gp"
}
trap 'stop_all; rm -rf "$W"' EXIT
wait_http() { for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1$2" >/dev/null && return 0; sleep 0.1; done; return 1; }

start_sims() {
    for p in $P_PORTS; do
        dist/bin/engine-sim --role prefill --port "$p" --kv-port $((p + 1000)) --time-scale "$SCALE" --quiet 2>>"$W/logs/sims.log" &
        SIMS+=($!)
    done
    for p in $D_PORTS; do
        dist/bin/engine-sim --role decode --port "$p" --kv-port $((p + 1000)) --time-scale "$SCALE" --quiet 2>>"$W/logs/sims.log" &
        SIMS+=($!)
    done
    for p in $P_PORTS $D_PORTS; do wait_http "$p" /health; done
}

start_router() { # start_router <name>
    case $1 in
        pdgate | base)
            local co=$ROOT
            [ "$1" = base ] && co=$BASE
            gp_round_robin "$co" "$W/gp" "$PORT" "$WORKERS" "$P_PORTS" "$D_PORTS"
            "$ROOT/dist/sbin/nginx" -p "$W/gp" -c nginx.conf 2>>"$W/logs/nginx.log" ;;
        vllm-router)
            local args=()
            for p in $P_PORTS; do args+=(--prefill "http://127.0.0.1:$p"); done
            for p in $D_PORTS; do args+=(--decode "http://127.0.0.1:$p"); done
            .venv-bench/bin/vllm-router --host 127.0.0.1 --port "$PORT" --vllm-pd-disaggregation \
                "${args[@]}" --policy round_robin --log-level warning >>"$W/logs/vllm-router.log" 2>&1 &
            ROUTER=$! ;;
    esac
    wait_http "$PORT" /v1/models || { echo "bench-tail-cluster.sh: $1 did not come up" >&2; exit 1; }
}

echo "4P4D engine-sim at time scale $SCALE; $RATE req/s Poisson for ${SECS}s; seeds $SEEDS; pdgate: global_proxy.sh, round robin, $WORKERS workers" >&2
[ ! -x .venv-bench/bin/vllm-router ] || echo "vllm-router $(.venv-bench/bin/pip show vllm-router 2>/dev/null | awk '/^Version/ {print $2}')" >&2
printf '\n%-12s %5s | %9s %9s %9s %9s %9s | %6s\n' router seed "mean ms" "p50" "p90" "p99" "max" failed
: > "$W/all.tsv"
for seed in $SEEDS; do
    for r in $ROUTERS; do
        start_sims
        start_router "$r"
        # shellcheck disable=SC2086
        dist/bin/pd-bench --url "http://127.0.0.1:$PORT" --rate "$RATE" --duration "$SECS" --seed "$seed" \
            --warmup 20 --quiet $WORKLOAD > "$W/out.txt" 2>&1 || true
        stop_all
        line=$(awk '/^TTFT \(ms\)/ {print $3, $4, $5, $6, $7}' "$W/out.txt")
        failed=$(awk '/^requests/ {print $6}' "$W/out.txt")
        [ -n "$line" ] || { echo "bench-tail-cluster.sh: $r seed $seed: no result" >&2; cat "$W/out.txt" >&2; exit 1; }
        echo "$r $seed $line $failed" >> "$W/all.tsv"
        set -- $line
        printf '%-12s %5s | %9.1f %9.1f %9.1f %9.1f %9.1f | %6s\n' "$r" "$seed" "$1" "$2" "$3" "$4" "$5" "$failed"
    done
done
echo
echo "means over seeds (TTFT ms), and ratios to vllm-router's round robin:"
awk '{n[$1]++; m[$1]+=$3; p50[$1]+=$4; p99[$1]+=$6; mx[$1]+=$7; if (!($1 in seen)) {seen[$1]=1; order[++k]=$1}}
     END {
        for (i = 1; i <= k; i++) { r = order[i]; m[r]/=n[r]; p50[r]/=n[r]; p99[r]/=n[r]; mx[r]/=n[r] }
        for (i = 1; i <= k; i++) { r = order[i];
            printf "%-12s mean %7.1f  p50 %7.1f  p99 %7.1f  max %7.1f", r, m[r], p50[r], p99[r], mx[r]
            if ("vllm-router" in m && r != "vllm-router")
                printf "   | x vllm-router: mean %.3f  p99 %.3f", m[r]/m["vllm-router"], p99[r]/p99["vllm-router"]
            printf "\n" } }' "$W/all.tsv"
