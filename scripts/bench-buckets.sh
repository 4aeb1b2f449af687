#!/usr/bin/env bash
# scripts/bench-buckets.sh — length buckets on a simulated cluster: 4
# prefill + 4 decode engine-sims (default profile, real time), nginx with
# pdgate's prefill module and least_total_load inside every pool, pd-bench
# with Poisson arrivals and ShareGPT-like lengths. Three ways to place the
# prefill leg, same seeds:
#   single   one pool of the 4 prefill engines
#   static   2 + 2 engines, a fixed 12000-byte map (the sample's)
#   dynamic  2 + 2 engines, dynamic_bucket (equal token load per bucket)
# Prints a table (and the dynamic bucket's status page) and writes JSON to
# bench-out/buckets/.
#
#   scripts/bench-buckets.sh                          loads 30 60 req/s, 20 s each
#   BENCH_RATES="60" BENCH_SECONDS=30 BENCH_INPUT_LEN=600 scripts/bench-buckets.sh
#
# Binds 127.0.0.1 only (ports 18800-18899 and 19800-19899).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RATES=${BENCH_RATES:-"30 60"}
SECONDS_PER=${BENCH_SECONDS:-20}
INPUT_LEN=${BENCH_INPUT_LEN:-600}
[ -x dist/bin/engine-sim ] && [ -x dist/bin/pd-bench ] || ./build.sh
OUT="$ROOT/bench-out/buckets"
mkdir -p "$OUT"
W=$(mktemp -d /tmp/pdgate-bench-buckets.XXXXXX)
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
        dist/bin/engine-sim --role prefill --port $((18810 + i)) --kv-port $((19810 + i)) --quiet 2>>"$W/logs/sims.log" &
        PIDS+=($!)
        dist/bin/engine-sim --role decode --port $((18820 + i)) --kv-port $((19820 + i)) --quiet 2>>"$W/logs/sims.log" &
        PIDS+=($!)
    done
    for p in 18810 18811 18812 18813 18820 18821 18822 18823; do
        for _ in $(seq 50); do curl -sf "127.0.0.1:$p/health" >/dev/null && break; sleep 0.1; done
    done
}
stop_sims() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }

conf() { # conf single|static|dynamic
    local head="" pass="http://prefill_all"
    case $1 in
        static) head='map $http_content_length $pb { default p_short; "~^0*(1[2-9][0-9]{3}|[2-9][0-9]{4}|[1-9][0-9]{5,})$" p_long; }'
                pass='http://$pb' ;;
        dynamic) head='dynamic_bucket $pb zone=bench_buckets:64k alpha=0.1 window=32 p_short p_long;'
                 pass='http://$pb' ;;
    esac
    cat > "$W/nginx.conf" <<CONF
load_module $ROOT/dist/modules/ngx_http_set_request_id_module.so;
load_module $ROOT/dist/modules/ngx_http_prefill_module.so;
load_module $ROOT/dist/modules/ngx_http_upstream_least_total_load_module.so;
load_module $ROOT/dist/modules/ngx_http_dynamic_bucket_module.so;
worker_processes 2;
error_log logs/error.log warn;
pid logs/nginx.pid;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_buffer_size 1m;
    $head
    upstream prefill_all { server 127.0.0.1:18810; server 127.0.0.1:18811; server 127.0.0.1:18812; server 127.0.0.1:18813; least_total_load on; keepalive 64; }
    upstream p_short { server 127.0.0.1:18810; server 127.0.0.1:18811; least_total_load on; keepalive 64; }
    upstream p_long { server 127.0.0.1:18812; server 127.0.0.1:18813; least_total_load on; keepalive 64; }
    upstream decode_servers { server 127.0.0.1:18820; server 127.0.0.1:18821; server 127.0.0.1:18822; server 127.0.0.1:18823; least_total_load on; keepalive 64; }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_read_timeout 600s;
    server {
        listen 127.0.0.1:18800;
        set_request_id on;
        location ~ ^/v1/(chat/)?completions\$ { prefill /prefill_internal; proxy_buffering off; proxy_pass http://decode_servers; }
        location /prefill_internal/ { internal; rewrite ^/prefill_internal(/.*)\$ \$1 break; proxy_pass $pass; subrequest_output_buffer_size 256k; }
        location = /bucket_status { dynamic_bucket_status; }
    }
}
CONF
}

printf '%-8s %5s | %9s %9s %9s | %8s %8s | %7s %6s\n' prefill rate "ttft p50" "ttft p90" "ttft p99" "slow p50" "slow p99" "req/s" errors
for rate in $RATES; do
    for mode in single static dynamic; do
        start_sims
        conf "$mode"
        "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf
        NGX_UP=1
        json="$OUT/$mode-rate$rate.json"
        dist/bin/pd-bench --url http://127.0.0.1:18800 --endpoint chat --rate "$rate" --duration "$SECONDS_PER" \
            --warmup 64 --lengths sharegpt --input-len "$INPUT_LEN" --seed 7 --quiet --json "$json" \
            --label "$mode @$rate" >/dev/null
        [ "$mode" = dynamic ] && status=$(curl -s 127.0.0.1:18800/bucket_status)
        "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf -s stop
        NGX_UP=0
        sleep 0.3
        stop_sims
        python3 - "$json" "$mode" "$rate" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
def g(k, p):
    v = s.get(k, {})
    return v.get(p, float("nan")) if isinstance(v, dict) else float("nan")
print("%-8s %5s | %9.1f %9.1f %9.1f | %8.2f %8.2f | %7.2f %6d" % (
    sys.argv[2], sys.argv[3], g("ttft_ms", "p50"), g("ttft_ms", "p90"), g("ttft_ms", "p99"),
    g("slowdown", "p50"), g("slowdown", "p99"), s.get("request_throughput", float("nan")), s.get("failed", 0)))
PY
        [ "$mode" = dynamic ] && printf '%s\n' "$status" | sed -n '2,5s/^/           /p'
    done
done
echo "JSON: $OUT"
