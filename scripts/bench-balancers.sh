#!/usr/bin/env bash
# scripts/bench-balancers.sh — which balancer wins where, on a simulated
# cluster: 4 prefill + 4 decode engine-sims (default profile, Llama-3.1-8B
# on an H100, real time), nginx with pdgate's prefill module, the same
# balancer on both pools, and pd-bench with Poisson arrivals and
# ShareGPT-like lengths at several loads. One run, all balancers, same
# seeds; prints a table and writes JSON + an SVG plot to bench-out/.
#
#   scripts/bench-balancers.sh                      loads 40 60 80 req/s, 20 s each
#   BENCH_RATES="60" BENCH_SECONDS=30 scripts/bench-balancers.sh
#
# Binds 127.0.0.1 only (ports 18700-18799 and 19700-19799).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RATES=${BENCH_RATES:-"40 60 80"}
SECONDS_PER=${BENCH_SECONDS:-20}
LBS=${BENCH_LBS:-"round_robin least_conn least_total_load weighted_least_active auto_balance_controller prefill_score_balance greedy_timeout"}
[ -x dist/bin/engine-sim ] && [ -x dist/bin/pd-bench ] || ./build.sh
OUT="$ROOT/bench-out/balancers"
mkdir -p "$OUT"
W=$(mktemp -d /tmp/pdgate-bench-lb.XXXXXX)
chmod 755 "$W"   # nginx workers (nobody) write request-body temp files below it
mkdir -p "$W/logs"
PIDS=()
NGX_UP=0
cleanup() {
    [ "$NGX_UP" = 1 ] && "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf -s stop 2>/dev/null || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

start_sims() {
    PIDS=()
    for i in 0 1 2 3; do
        dist/bin/engine-sim --role prefill --port $((18710 + i)) --kv-port $((19710 + i)) --quiet 2>>"$W/logs/sims.log" &
        PIDS+=($!)
        dist/bin/engine-sim --role decode --port $((18720 + i)) --kv-port $((19720 + i)) --quiet 2>>"$W/logs/sims.log" &
        PIDS+=($!)
    done
    for p in 18710 18711 18712 18713 18720 18721 18722 18723; do
        for _ in $(seq 50); do curl -sf "127.0.0.1:$p/health" >/dev/null && break; sleep 0.1; done
    done
}
stop_sims() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }

conf() { # conf <balancer>
    local lb=$1 dir=""
    case $lb in
        round_robin) dir="" ;;
        least_conn) dir="least_conn;" ;;
        *) dir="$lb on;" ;;
    esac
    local loads=""
    for m in "$ROOT"/dist/modules/ngx_http_upstream_*_module.so; do loads+="load_module $m;"$'\n'; done
    cat > "$W/nginx.conf" <<CONF
load_module $ROOT/dist/modules/ngx_http_set_request_id_module.so;
load_module $ROOT/dist/modules/ngx_http_prefill_module.so;
$loads
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
events { worker_connections 8192; }
http {
    access_log off;
    upstream prefill_servers { server 127.0.0.1:18710; server 127.0.0.1:18711; server 127.0.0.1:18712; server 127.0.0.1:18713; $dir keepalive 256; }
    upstream decode_servers { server 127.0.0.1:18720; server 127.0.0.1:18721; server 127.0.0.1:18722; server 127.0.0.1:18723; $dir keepalive 256; }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_read_timeout 600s;
    server {
        listen 127.0.0.1:18700;
        set_request_id on;
        location ~ ^/v1/(chat/)?completions\$ { prefill /prefill_internal; proxy_buffering off; proxy_pass http://decode_servers; }
        location /prefill_internal/ { internal; rewrite ^/prefill_internal(/.*)\$ \$1 break; proxy_pass http://prefill_servers; subrequest_output_buffer_size 256k; }
    }
}
CONF
}

printf '%-24s %6s | %9s %9s %9s %9s | %9s %9s | %6s\n' balancer rate "ttft p50" "ttft p99" "tpot p50" "tpot p99" "tok/s" "req/s" errors
for rate in $RATES; do
    for lb in $LBS; do
        # Fresh engines per run: empty queues and prefix caches.
        start_sims
        conf "$lb"
        "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf
        NGX_UP=1
        json="$OUT/$lb-rate$rate.json"
        dist/bin/pd-bench --url http://127.0.0.1:18700 --endpoint chat --rate "$rate" --duration "$SECONDS_PER" \
            --lengths sharegpt --seed 7 --quiet --json "$json" --label "$lb @$rate" >/dev/null
        "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf -s stop
        NGX_UP=0
        sleep 0.3
        stop_sims
        python3 - "$json" "$lb" "$rate" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]
def g(k, p):
    v = s.get(k, {})
    return v.get(p, float("nan")) if isinstance(v, dict) else float("nan")
print("%-24s %6s | %9.1f %9.1f %9.2f %9.2f | %9.0f %9.2f | %6d" % (
    sys.argv[2], sys.argv[3], g("ttft_ms", "p50"), g("ttft_ms", "p99"), g("tpot_ms", "p50"), g("tpot_ms", "p99"),
    s.get("output_throughput", float("nan")), s.get("request_throughput", float("nan")), s.get("failed", 0)))
PY
    done
done
python3 scripts/pd-plot.py "$OUT"/*.json -o "$OUT/balancers.svg" --title "pdgate balancers, 4P4D simulated" >/dev/null 2>&1 || true
echo "JSON and plot: $OUT"
