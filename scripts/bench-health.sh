#!/usr/bin/env bash
# scripts/bench-health.sh — what pd_health_check (or, with
# BENCH_KIND=metrics, pd_engine_metrics) costs the proxy: the CPU of the one
# nginx worker that probes, per probe or scrape, against the same worker
# with the same upstream and neither, in the same run.
#
# With BENCH_KIND=metrics the backends answer GET /metrics with a vLLM-like
# Prometheus page of BENCH_METRICS_KB (default 40) KB — gauges, counters and
# histograms as a vLLM engine serves them — which each scrape reads whole
# and parses.
#
# A backend nginx (CPU 1) answers GET /health with 200 on BENCH_PEERS ports;
# the proxy nginx (one worker on CPU 0) has one upstream of those peers with
# `pd_health_check interval=BENCH_INTERVAL timeout=...`, so the worker makes
# BENCH_PEERS / interval probes a second (64 peers every 100 ms: 640/s, far
# more than a real cluster asks for). The worker's CPU time (/proc/<pid>/schedstat,
# ns) over BENCH_SECONDS, and the probes counted on /internal/health,
# give the CPU per probe; the idle worker without health checks is the
# baseline. Requests take no part: the request path does not run the
# health code (it only meets round robin's `down` flags, as with any
# `server ... down`).
#
#   scripts/bench-health.sh
#   BENCH_PEERS=64 BENCH_INTERVAL=100ms BENCH_SECONDS=10 BENCH_ROUNDS=3 scripts/bench-health.sh
#   BENCH_KIND=metrics scripts/bench-health.sh
#
# Binds 127.0.0.1 only (ports BENCH_PORT.. +BENCH_PEERS+1, default 18800).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS=${BENCH_PEERS:-64}
INTERVAL=${BENCH_INTERVAL:-100ms}
SECS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
PORT=${BENCH_PORT:-18800}
KIND=${BENCH_KIND:-health}
METRICS_KB=${BENCH_METRICS_KB:-40}
case "$KIND" in health|metrics) ;; *) echo "BENCH_KIND=$KIND: health or metrics" >&2; exit 2 ;; esac
[ -x dist/sbin/nginx ] && [ -f dist/modules/ngx_http_upstream_pd_health_module.so ] || ./build.sh
NGINX=$ROOT/dist/sbin/nginx
W=$(mktemp -d /tmp/pdgate-bench-health.XXXXXX)
chmod 755 "$W"
trap '"$NGINX" -p "$W/b" -c nginx.conf -s stop 2>/dev/null || true
      "$NGINX" -p "$W/p" -c nginx.conf -s stop 2>/dev/null || true; sleep 0.3; rm -rf "$W"' EXIT
mkdir -p "$W/b/logs" "$W/p/logs"
# A vLLM-like /metrics page: the load gauges and counters routing reads,
# then TTFT/TPOT/E2E-style histograms until the page has METRICS_KB KB.
{
    l='engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"'
    echo "# HELP vllm:num_requests_running Number of requests in model execution batches."
    echo "# TYPE vllm:num_requests_running gauge"
    echo "vllm:num_requests_running{$l} 12.0"
    echo "vllm:num_requests_waiting{$l} 3.0"
    echo "vllm:kv_cache_usage_perc{$l} 0.41"
    echo "vllm:prefix_cache_queries_total{$l} 1.2e+06"
    echo "vllm:prefix_cache_hits_total{$l} 300000.0"
    echo "vllm:prompt_tokens_total{$l} 5.2e+06"
    echo "vllm:request_success_total{finished_reason=\"stop\",$l} 4242.0"
    h=0
    while :; do
        echo "# HELP vllm:histogram_$h A latency histogram."
        echo "# TYPE vllm:histogram_$h histogram"
        for le in 0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0 80.0 +Inf; do
            echo "vllm:histogram_${h}_bucket{$l,le=\"$le\"} 4242.0"
        done
        echo "vllm:histogram_${h}_sum{$l} 1234.5678"
        echo "vllm:histogram_${h}_count{$l} 4242.0"
        h=$((h + 1))
        [ "$h" -lt $((METRICS_KB * 1024 / 2300 + 1)) ] || break
    done
} > "$W/b/metrics.txt"
peer_ports=$(seq $((PORT + 1)) $((PORT + PEERS)))
{
    echo "worker_processes 1; worker_cpu_affinity 10; pid logs/nginx.pid; error_log logs/error.log error;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; server {"
    for p in $peer_ports; do echo "    listen 127.0.0.1:$p;"; done
    echo "    location = /health { return 200; }"
    echo "    location = /metrics { default_type text/plain; alias $W/b/metrics.txt; } } }"
} > "$W/b/nginx.conf"
"$NGINX" -p "$W/b" -c nginx.conf

proxy_conf() { # proxy_conf <with health: 1|0>
    echo "load_module $ROOT/dist/modules/ngx_http_upstream_pd_health_module.so;"
    echo "worker_processes 1; worker_cpu_affinity 01; pid logs/nginx.pid; error_log logs/error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off;"
    echo "  upstream engines { zone engines 256k;"
    for p in $peer_ports; do echo "    server 127.0.0.1:$p;"; done
    if [ "$1" = 1 ]; then
        if [ "$KIND" = health ]; then
            echo "    pd_health_check interval=$INTERVAL timeout=$INTERVAL;"
        else
            echo "    pd_engine_metrics interval=$INTERVAL timeout=$INTERVAL;"
        fi
    fi
    echo "  }"
    echo "  server { listen 127.0.0.1:$PORT;"
    echo "    location / { proxy_pass http://engines; }"
    [ "$1" = 0 ] || echo "    location = /internal/health { pd_health_status; }"
    echo "  } }"
}
worker_pid() { pgrep -P "$(cat "$W/p/logs/nginx.pid")" | head -1; }
# CPU time of a process in ns (the scheduler's own count, finer than ticks).
cpu_ns() { awk '{print $1}' "/proc/$1/schedstat"; }
# Probes (or scrapes) ended so far, summed over the peers.
probes() {
    local field=probes
    [ "$KIND" = health ] || field=scrapes
    curl -sf "http://127.0.0.1:$PORT/internal/health" \
        | sed -n "s/.* $field=\([0-9]*\) .*/\1/p" | awk '{s += $1} END {print s + 0}'
}

measure() { # measure <with health> -> "cpu_ns probes"
    proxy_conf "$1" > "$W/p/nginx.conf"
    taskset -c 0 "$NGINX" -p "$W/p" -c nginx.conf
    sleep 1.5
    local w t0 t1 p0=0 p1=0
    w=$(worker_pid)
    [ "$1" = 0 ] || p0=$(probes)
    t0=$(cpu_ns "$w")
    sleep "$SECS"
    t1=$(cpu_ns "$w")
    [ "$1" = 0 ] || p1=$(probes)
    "$NGINX" -p "$W/p" -c nginx.conf -s stop
    while [ -f "$W/p/logs/nginx.pid" ]; do sleep 0.1; done
    echo "$((t1 - t0)) $((p1 - p0))"
}

if [ "$KIND" = health ]; then
    echo "pd_health_check cost: $PEERS peers, interval $INTERVAL, ${SECS}s per case, $ROUNDS rounds, one proxy worker on CPU 0" >&2
    printf '%-6s %10s %12s %12s %12s %14s\n' round probes/s "cpu% health" "cpu% idle" "net cpu%" "us per probe"
else
    echo "pd_engine_metrics cost: $PEERS peers, interval $INTERVAL, a $(( $(wc -c < "$W/b/metrics.txt") / 1024 )) KB page, ${SECS}s per case, $ROUNDS rounds, one proxy worker on CPU 0" >&2
    printf '%-6s %10s %12s %12s %12s %14s\n' round scrapes/s "cpu% scrape" "cpu% idle" "net cpu%" "us per scrape"
fi
for r in $(seq "$ROUNDS"); do
    read -r th np <<< "$(measure 1)"
    read -r ti _ <<< "$(measure 0)"
    awk -v r="$r" -v th="$th" -v ti="$ti" -v np="$np" -v s="$SECS" 'BEGIN {
        ch = th / 1e9; ci = ti / 1e9; net = ch - ci; if (net < 0) net = 0
        printf "%-6s %10.0f %12.2f %12.2f %12.2f %14.2f\n", r, np / s, 100 * ch / s, 100 * ci / s, 100 * net / s, (np ? 1e6 * net / np : 0) }'
done
