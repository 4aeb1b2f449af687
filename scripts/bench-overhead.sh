#!/usr/bin/env bash
# scripts/bench-overhead.sh — what the P/D path costs the proxy.
#
# nginx with set_request_id + prefill in front of instant backends (a second
# nginx answering fixed prefill/decode JSON and SSE), measured beside a plain
# single-hop proxy_pass in the same proxy, same run. The proxy's one worker is
# pinned to CPU 0; wrk and the backends share CPU 1. For every case it prints
# requests/s, latency p50/p99, the proxy worker's CPU time per request
# (utime+stime from /proc) and the ratio to the single hop.
#
#   scripts/bench-overhead.sh                 3 interleaved rounds of 10 s per case, medians
#   BENCH_DURATION=30 scripts/bench-overhead.sh
#   BENCH_PERF=pd-json scripts/bench-overhead.sh   also profile the proxy worker
#                         during that case (perf, cpu-clock) into bench-out/
#   BENCH_BASELINE=/path/to/other/dist scripts/bench-overhead.sh
#                         also run the P/D cases through a second proxy loading
#                         that build's modules (same nginx binary, also pinned to
#                         CPU 0, measured interleaved with this one): before/after
#                         figures of a change from the same run
#
# Binds 127.0.0.1 only. Needs dist/ (./build.sh) and wrk (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DUR=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-3}
# Balancers compared with round robin on both P/D upstreams (empty: skip).
# "pd_hold" in the list: round robin with pd_hold and caps it never reaches
# (what an empty queue costs on the P/D path). "pd_tokenizer": round robin
# with the test model's tokenizer on the P/D location (dist/share/test-model).
BALANCERS=${BENCH_BALANCERS-"least_total_load weighted_least_active auto_balance_controller prefill_score_balance greedy_timeout length_balance pd_score_balance prefix_cache_affinity earliest_start pd_hold"}

# The directive that turns balancer $1 on for side $2 (prefill|decode).
lb_on() {
    case $1 in
        pd_score_balance|earliest_start) echo "$1 $2;" ;;
        pd_hold|pd_tokenizer) echo "zone $1_$2 64k;" ;;
        *) echo "$1 on;" ;;
    esac
}
CONNS=${BENCH_CONNECTIONS:-"16 64"}
PORT_PROXY=${BENCH_PORT:-18480}
BASE=${BENCH_BASELINE:-}
PORT_BASE=$((PORT_PROXY + 1))
# Four prefill and four decode backend ports (one backend nginx).
P_PORTS="$((PORT_PROXY + 10)) $((PORT_PROXY + 11)) $((PORT_PROXY + 12)) $((PORT_PROXY + 13))"
D_PORTS="$((PORT_PROXY + 20)) $((PORT_PROXY + 21)) $((PORT_PROXY + 22)) $((PORT_PROXY + 23))"

. scripts/ensure-debs.sh
. scripts/lib/bench-backends.sh
ensure_debs wrk
[ -x dist/sbin/nginx ] || ./build.sh
NGINX="$ROOT/dist/sbin/nginx"
W=$(mktemp -d /tmp/pdgate-bench.XXXXXX)
chmod 755 "$W"   # nginx workers (nobody) must reach their temp dirs
mkdir -p "$W/proxy/logs" "$W/back/logs" "$W/base/logs"
cleanup() {
    "$NGINX" -p "$W/proxy" -c nginx.conf -s stop 2>/dev/null || true
    [ -z "$BASE" ] || "$NGINX" -p "$W/base" -c nginx.conf -s stop 2>/dev/null || true
    "$NGINX" -p "$W/back" -c nginx.conf -s stop 2>/dev/null || true
    sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT

# --- the backends: fixed answers shaped like vLLM's --------------------------
backends_conf "$P_PORTS" "$D_PORTS" > "$W/back/nginx.conf"

LB_LOADS=""; LB_UPSTREAMS=""; LB_LOCATIONS=""
for lb in $BALANCERS; do
    hold=""
    if [ "$lb" = pd_hold ]; then
        hold="pd_hold prefill=prefill_$lb:1000000 decode=decode_$lb:1000000;"
    elif [ "$lb" = pd_tokenizer ]; then
        hold="pd_tokenizer $ROOT/dist/share/test-model;"
    else
        LB_LOADS+="load_module $ROOT/dist/modules/ngx_http_upstream_${lb}_module.so;"$'\n'
    fi
    LB_UPSTREAMS+="    upstream prefill_$lb { $(servers "$P_PORTS") $(lb_on "$lb" prefill) keepalive 128; keepalive_requests 1000000; }"$'\n'
    LB_UPSTREAMS+="    upstream decode_$lb { $(servers "$D_PORTS") $(lb_on "$lb" decode) keepalive 128; keepalive_requests 1000000; }"$'\n'
    LB_LOCATIONS+="        location /pd-$lb/ { prefill /prefill_$lb; $hold proxy_pass http://decode_$lb/; }"$'\n'
    LB_LOCATIONS+="        location /prefill_$lb/ { internal; rewrite ^/prefill_$lb/[^/]+(/.*)\$ \$1 break; proxy_pass http://prefill_$lb; subrequest_output_buffer_size 16k; }"$'\n'
done

# proxy_conf <modules dir> <port> <balancer loads>
proxy_conf() {
    local MODS=$1 PORT=$2 LOADS=$3
    cat <<CONF
load_module $MODS/ngx_http_set_request_id_module.so;
load_module $MODS/ngx_http_prefill_module.so;
$LOADS
worker_processes 1;
worker_cpu_affinity 01;
error_log logs/error.log error;
pid logs/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream prefill_servers { $(servers "$P_PORTS") keepalive 128; keepalive_requests 1000000; }
    upstream decode_servers { $(servers "$D_PORTS") keepalive 128; keepalive_requests 1000000; }
$( [ -n "$LOADS" ] && printf '%s' "$LB_UPSTREAMS" )
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    client_body_buffer_size 64k;
    server {
        listen 127.0.0.1:$PORT;
        set_request_id on;
        # P/D, non-streaming and streaming
        location /pd/ {
            prefill /prefill_internal;
            proxy_pass http://decode_servers/;
        }
        location /pd-stream/ {
            prefill /prefill_internal;
            proxy_buffering off;
            proxy_pass http://decode_servers/stream/;
        }
        location /prefill_internal/ {
            internal;
            rewrite ^/prefill_internal/[^/]+(/.*)\$ \$1 break;
            proxy_pass http://prefill_servers;
            subrequest_output_buffer_size 16k;
        }
$( [ -n "$LOADS" ] && printf '%s' "$LB_LOCATIONS" )
        # the baseline: one plain hop to the same decode backend
        location /hop/ {
            set_request_id off;
            proxy_pass http://decode_servers/;
        }
        location /hop-stream/ {
            set_request_id off;
            proxy_buffering off;
            proxy_pass http://decode_servers/stream/;
        }
    }
}
CONF
}
proxy_conf "$ROOT/dist/modules" "$PORT_PROXY" "$LB_LOADS" > "$W/proxy/nginx.conf"
[ -z "$BASE" ] || proxy_conf "$BASE/modules" "$PORT_BASE" "" > "$W/base/nginx.conf"

"$NGINX" -p "$W/back" -c nginx.conf
"$NGINX" -p "$W/proxy" -c nginx.conf
[ -z "$BASE" ] || "$NGINX" -p "$W/base" -c nginx.conf
sleep 0.5
WORKER=$(pgrep -P "$(cat "$W/proxy/logs/nginx.pid")" | head -n1)
BWORKER=""
[ -z "$BASE" ] || BWORKER=$(pgrep -P "$(cat "$W/base/logs/nginx.pid")" | head -n1)

# A 1 KB chat request, as in the figures we compare with.
mkbody() { chat_body "$1"; }
for s in false true; do wrk_lua "$W/body-$s.lua" "$s"; done
echo "body: $(mkbody false | wc -c) bytes; proxy worker pid $WORKER on CPU 0; $ROUNDS x ${DUR}s per case" >&2

# Sanity: both paths answer 200 with the expected shape before measuring.
curl -sf "http://127.0.0.1:$PORT_PROXY/pd/v1/chat/completions" -d "$(mkbody false)" | grep -q '"finish_reason":"stop"'
curl -sfN "http://127.0.0.1:$PORT_PROXY/pd-stream/v1/chat/completions" -d "$(mkbody true)" | grep -q 'data: \[DONE\]'
for lb in $BALANCERS; do
    curl -sf "http://127.0.0.1:$PORT_PROXY/pd-$lb/v1/chat/completions" -d "$(mkbody false)" | grep -q '"finish_reason":"stop"' \
        || { echo "bench-overhead: /pd-$lb/ does not answer a P/D request" >&2; exit 1; }
done

ticks() { awk '{print $14 + $15}' "/proc/${RUN_WORKER:-$WORKER}/stat"; }
HZ=$(getconf CLK_TCK)

# wrk prints 250.00us / 1.50ms / 1.20s
to_ms() { awk '{v=$1; if (v ~ /us$/) v=v/1000; else if (v ~ /ms$/) v=v+0; else if (v ~ /s$/) v=v*1000; print v}'; }

# run <path> <stream> <conns> -> "rps p50_ms p99_ms cpu_us errors"
run() {
    local t0 t1 out rps p50 p99 reqs errs
    t0=$(ticks)
    if [ "${BENCH_PERF:-}" = "$4" ]; then
        mkdir -p "$ROOT/bench-out"
        perf record -q -e cpu-clock -g -p "$WORKER" -o "$ROOT/bench-out/perf-$4-$3.data" -- sleep "$DUR" 2>/dev/null &
    fi
    out=$(taskset -c 1 wrk -t1 -c"$3" -d"${DUR}s" --latency -s "$W/body-$2.lua" \
        "http://127.0.0.1:${RUN_PORT:-$PORT_PROXY}/$1/v1/chat/completions")
    t1=$(ticks)
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out" | to_ms)
    p99=$(awk '$1=="99%" {print $2}' <<<"$out" | to_ms)
    errs=$(awk '/Non-2xx/ {n+=$NF} /Socket errors/ {gsub(",", ""); n+=$4+$6+$8+$10} END {print n+0}' <<<"$out")
    awk -v r="$rps" -v p50="$p50" -v p99="$p99" -v dt=$((t1 - t0)) -v n="$reqs" -v hz="$HZ" -v e="$errs" \
        'BEGIN { printf "%s %s %s %.1f %d\n", r, p50, p99, dt * 1e6 / hz / n, e }'
}

# col <n> <lines>: the median of column n
col() { awk -v n="$1" '{print $n}' <<<"$2" | median; }

printf '\n%-10s %5s | %10s %9s %9s %11s %6s | %8s %12s\n' \
    case conns req/s "p50 ms" "p99 ms" "cpu us/req" errors "x hop" "1-core cap"
for stream in false true; do
    for c in $CONNS; do
        if [ "$stream" = true ]; then pd=pd-stream; hop=hop-stream; else pd=pd; hop=hop; fi
        label=$([ "$stream" = true ] && echo stream || echo json)
        H=""; P=""; B=""
        for _ in $(seq "$ROUNDS"); do    # interleaved, so drift hits both alike
            H+="$(run "$hop" "$stream" "$c" "hop-$label")"$'\n'
            P+="$(run "$pd" "$stream" "$c" "pd-$label")"$'\n'
            if [ -n "$BASE" ]; then
                B+="$(RUN_PORT=$PORT_BASE RUN_WORKER=$BWORKER run "$pd" "$stream" "$c" "base-$label")"$'\n'
            fi
        done
        H=$(sed '/^$/d' <<<"$H"); P=$(sed '/^$/d' <<<"$P"); B=$(sed '/^$/d' <<<"$B")
        hrps=$(col 1 "$H"); hcpu=$(col 4 "$H"); rps=$(col 1 "$P"); cpu=$(col 4 "$P")
        printf '%-10s %5s | %10.0f %9.3f %9.3f %11.1f %6d | %8s %12.0f\n' "hop-$label" "$c" \
            "$hrps" "$(col 2 "$H")" "$(col 3 "$H")" "$hcpu" "$(awk '{n+=$5} END {print n+0}' <<<"$H")" \
            "1.00" "$(awk -v u="$hcpu" 'BEGIN{print 1e6/u}')"
        printf '%-10s %5s | %10.0f %9.3f %9.3f %11.1f %6d | %8.2f %12.0f\n' "pd-$label" "$c" \
            "$rps" "$(col 2 "$P")" "$(col 3 "$P")" "$cpu" "$(awk '{n+=$5} END {print n+0}' <<<"$P")" \
            "$(awk -v a="$rps" -v b="$hrps" 'BEGIN{print a/b}')" "$(awk -v u="$cpu" 'BEGIN{print 1e6/u}')"
        if [ -n "$BASE" ]; then
            brps=$(col 1 "$B"); bcpu=$(col 4 "$B")
            printf '%-10s %5s | %10.0f %9.3f %9.3f %11.1f %6d | %8.2f %12.0f   this/baseline cpu %.3f\n' "base-$label" "$c" \
                "$brps" "$(col 2 "$B")" "$(col 3 "$B")" "$bcpu" "$(awk '{n+=$5} END {print n+0}' <<<"$B")" \
                "$(awk -v a="$brps" -v b="$hrps" 'BEGIN{print a/b}')" "$(awk -v u="$bcpu" 'BEGIN{print 1e6/u}')" \
                "$(awk -v a="$cpu" -v b="$bcpu" 'BEGIN{print a/b}')"
        fi
    done
done
if [ -n "$BALANCERS" ]; then
    c=16
    printf '\nP/D with a balancer on both upstreams (4 prefill + 4 decode servers),\n'
    printf 'json, %s connections, vs round robin in the same run\n' "$c"
    printf '%-26s | %10s %9s %11s | %8s\n' balancer req/s "p99 ms" "cpu us/req" "x rr"
    R=""
    declare -A L
    for _ in $(seq "$ROUNDS"); do
        R+="$(run pd false "$c" rr)"$'\n'
        for lb in $BALANCERS; do L[$lb]+="$(run "pd-$lb" false "$c" "$lb")"$'\n'; done
    done
    R=$(sed '/^$/d' <<<"$R")
    rrps=$(col 1 "$R")
    printf '%-26s | %10.0f %9.3f %11.1f | %8s\n' round_robin "$rrps" "$(col 3 "$R")" "$(col 4 "$R")" 1.00
    for lb in $BALANCERS; do
        X=$(sed '/^$/d' <<<"${L[$lb]}")
        printf '%-26s | %10.0f %9.3f %11.1f | %8.2f\n' "$lb" "$(col 1 "$X")" "$(col 3 "$X")" "$(col 4 "$X")" \
            "$(awk -v a="$(col 1 "$X")" -v b="$rrps" 'BEGIN{print a/b}')"
    done
fi

echo
echo "req/s: measured with wrk and the backends sharing CPU 1; 1-core cap = 1e6 / (proxy CPU us per request):"
echo "the P/D requests per second one fully busy proxy core sustains (a P/D request is two upstream legs)."
wait
[ -n "${BENCH_PERF:-}" ] && echo "profile: perf report -i bench-out/perf-$BENCH_PERF-*.data --no-children"
exit 0
