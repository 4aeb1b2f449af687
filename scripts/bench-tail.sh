#!/usr/bin/env bash
# scripts/bench-tail.sh — pdgate's latency tail on instant backends, with the
# configuration a user runs: scripts/global_proxy.sh's output (round robin on
# both pools, its JSON access log, its events and keepalive settings), beside
# a plain one-hop nginx proxy to the same decode backends, and optionally
# another build (before/after of a change), all in the same run.
#
# Backends: one nginx answering fixed vLLM-shaped answers at once (prefill:
# a completion with kv_transfer_params; decode: a completion, or on its own
# ports three SSE chunks and [DONE]) on CPU 1, with wrk (1 thread). Each
# proxy runs BENCH_WORKERS workers from CPU 0 (default 1: the proxy core).
# Cases: JSON and streamed answers at each of BENCH_CONNECTIONS, interleaved
# rounds; prints the medians over rounds of p50, p90, p99, p99.9 and max
# latency, req/s, and the p99 ratios.
#
#   scripts/bench-tail.sh                       5 rounds x 5 s per case
#   BENCH_BASELINE=/path/to/other/checkout scripts/bench-tail.sh
#                  also run that checkout's generator and dist/modules (same
#                  nginx binary): "base" rows and this/base p99
#   BENCH_GEN_FLAGS="--access-log-file off"     extra global_proxy.sh flags
#                  for this build's proxy (and the baseline's)
#   BENCH_WORKERS=2 BENCH_CONNECTIONS="16 64" BENCH_ROUNDS=5 BENCH_DURATION=5
#
# Binds 127.0.0.1 only (ports BENCH_PORT.. +40, default 18540). Needs dist/
# (./build.sh) and wrk (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DUR=${BENCH_DURATION:-5}
ROUNDS=${BENCH_ROUNDS:-5}
CONNS=${BENCH_CONNECTIONS:-"16 64"}
WORKERS=${BENCH_WORKERS:-1}
BASE=${BENCH_BASELINE:-}
GEN_FLAGS=${BENCH_GEN_FLAGS:-}
PORT=${BENCH_PORT:-18540}
P_PORTS="$((PORT + 10)) $((PORT + 11)) $((PORT + 12)) $((PORT + 13))"
D_PORTS="$((PORT + 20)) $((PORT + 21)) $((PORT + 22)) $((PORT + 23))"
S_PORTS="$((PORT + 30)) $((PORT + 31)) $((PORT + 32)) $((PORT + 33))"

. scripts/ensure-debs.sh
. scripts/lib/bench-backends.sh
ensure_debs wrk
[ -x dist/sbin/nginx ] || ./build.sh
[ -z "$BASE" ] || { [ -x "$BASE/scripts/global_proxy.sh" ] && [ -d "$BASE/dist/modules" ]; } \
    || { echo "bench-tail.sh: BENCH_BASELINE=$BASE needs scripts/global_proxy.sh and dist/modules" >&2; exit 2; }
NGINX="$ROOT/dist/sbin/nginx"
W=$(mktemp -d /tmp/pdgate-tail.XXXXXX)
chmod 755 "$W"
STARTED=()
cleanup() {
    for d in "${STARTED[@]}"; do "$NGINX" -p "$d" -c nginx.conf -s stop 2>/dev/null || true; done
    sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT
start() { mkdir -p "$1/logs"; "$NGINX" -p "$1" -c nginx.conf; STARTED+=("$1"); }

# Backends: the decode ports answer JSON, the S ports SSE.
mkdir -p "$W/back"
backends_conf "$P_PORTS" "$D_PORTS" "$S_PORTS" > "$W/back/nginx.conf"
start "$W/back"

# gen <name> <checkout> <port> <decode ports>: a proxy from that checkout's generator.
gen() {
    # shellcheck disable=SC2086
    gp_round_robin "$2" "$W/$1" "$3" "$WORKERS" "$P_PORTS" "$4" $GEN_FLAGS
    start "$W/$1"
}
gen this-json "$ROOT" $((PORT + 1)) "$D_PORTS"
gen this-stream "$ROOT" $((PORT + 2)) "$S_PORTS"
if [ -n "$BASE" ]; then
    gen base-json "$BASE" $((PORT + 3)) "$D_PORTS"
    gen base-stream "$BASE" $((PORT + 4)) "$S_PORTS"
fi
# The plain hop: the generator's http settings that matter (keepalive to the
# backends, HTTP/1.1, unbuffered), one worker set as the proxies'.
mkdir -p "$W/hop"
cat > "$W/hop/nginx.conf" <<CONF
worker_processes $WORKERS;
worker_cpu_affinity $(for i in $(seq 0 $((WORKERS - 1))); do printf '1%s ' "$(printf "%${i}s" "" | tr ' ' 0)"; done);
error_log logs/error.log error;
pid logs/nginx.pid;
events { use epoll; accept_mutex off; multi_accept on; worker_connections 102400; }
http {
    access_log off;
    keepalive_requests 20000;
    tcp_nodelay on;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    upstream decode_servers { $(servers "$D_PORTS") keepalive 2048; keepalive_requests 20000; }
    upstream sse_servers { $(servers "$S_PORTS") keepalive 2048; keepalive_requests 20000; }
    server {
        listen 127.0.0.1:$((PORT + 5)) reuseport;
        location / { proxy_buffering off; proxy_pass http://decode_servers; }
    }
    server {
        listen 127.0.0.1:$((PORT + 6)) reuseport;
        location / { proxy_buffering off; proxy_pass http://sse_servers; }
    }
}
CONF
start "$W/hop"
sleep 0.5

wrk_lua "$W/json.lua" false
wrk_lua "$W/stream.lua" true
URL=/v1/chat/completions
# Sanity: each proxy answers before anything is measured.
for p in $((PORT + 1)) $((PORT + 5)) ${BASE:+$((PORT + 3))}; do
    curl -sf "http://127.0.0.1:$p$URL" -d "$(chat_body false)" | grep -q '"finish_reason":"stop"'
done
for p in $((PORT + 2)) $((PORT + 6)) ${BASE:+$((PORT + 4))}; do
    curl -sfN "http://127.0.0.1:$p$URL" -d "$(chat_body true)" | grep -q 'data: \[DONE\]'
done

# run <port> <json|stream> <conns> -> "rps p50 p90 p99 p99.9 max errors" (ms)
run() {
    local out
    out=$(taskset -c 1 wrk -t1 -c"$3" -d"${DUR}s" -s "$W/$2.lua" "http://127.0.0.1:$1$URL")
    awk '/^Requests\/sec/ {r=$2} /^pct/ {v[$2]=$3/1000}
         /Non-2xx/ {e+=$NF} /Socket errors/ {gsub(",", ""); e+=$4+$6+$8+$10}
         END {printf "%s %.3f %.3f %.3f %.3f %.3f %d\n", r, v["50"], v["90"], v["99"], v["99.9"], v["max"], e}' <<<"$out"
}
col() { awk -v n="$1" '{print $n}' <<<"$2" | median; }

echo "proxies: global_proxy.sh, round robin, $WORKERS worker(s) from CPU 0${GEN_FLAGS:+, flags: $GEN_FLAGS}; $ROUNDS x ${DUR}s per case, medians" >&2
printf '\n%-12s %5s | %8s %8s %8s %8s %8s %8s %6s | %s\n' case conns req/s "p50 ms" "p90 ms" "p99 ms" "p99.9" "max" errors "p99 ratios"
for kind in json stream; do
    if [ "$kind" = json ]; then tp=$((PORT + 1)); hp=$((PORT + 5)); bp=$((PORT + 3)); else tp=$((PORT + 2)); hp=$((PORT + 6)); bp=$((PORT + 4)); fi
    for c in $CONNS; do
        H=""; T=""; B=""
        for _ in $(seq "$ROUNDS"); do
            H+="$(run "$hp" "$kind" "$c")"$'\n'
            T+="$(run "$tp" "$kind" "$c")"$'\n'
            [ -z "$BASE" ] || B+="$(run "$bp" "$kind" "$c")"$'\n'
        done
        row() { # row <label> <lines> <ratios>
            printf '%-12s %5s | %8.0f %8.3f %8.3f %8.3f %8.3f %8.3f %6d | %s\n' "$1" "$c" \
                "$(col 1 "$2")" "$(col 2 "$2")" "$(col 3 "$2")" "$(col 4 "$2")" "$(col 5 "$2")" "$(col 6 "$2")" \
                "$(awk '{n+=$7} END {print n+0}' <<<"$2")" "$3"
        }
        H=$(sed '/^$/d' <<<"$H"); T=$(sed '/^$/d' <<<"$T"); B=$(sed '/^$/d' <<<"$B")
        row "hop-$kind" "$H" ""
        row "pd-$kind" "$T" "$(awk -v a="$(col 4 "$T")" -v b="$(col 4 "$H")" 'BEGIN{printf "x hop %.2f", a/b}')"
        [ -z "$BASE" ] || row "base-$kind" "$B" "$(awk -v a="$(col 4 "$T")" -v b="$(col 4 "$B")" -v h="$(col 4 "$H")" \
            'BEGIN{printf "x hop %.2f   this/base %.3f", b/h, a/b}')"
    done
done
