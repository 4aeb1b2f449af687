#!/usr/bin/env bash
# scripts/bench-balancers.sh — which balancer wins where, on a simulated
# cluster: 4 prefill + 4 decode engine-sims (default profile, Llama-3.1-8B
# on an H100, real time, fresh engines for every run), nginx with pdgate's
# prefill module, the same balancer on both pools, and pd-bench with Poisson
# arrivals and ShareGPT-like lengths. One run, all balancers, same seeds.
#
# First it measures the cluster's capacity under round robin (the highest
# Poisson rate it sustains, see "Capacity" below), then runs every balancer
# at 60, 80 and 95 % of it, nginx's round robin and least_conn included as
# baselines. Prints a table as it goes; writes the pd-bench JSON, a markdown
# report (results.md) and an SVG plot (balancers.svg) to bench-out/balancers/
# (QUICK: bench-out/balancers-quick/),
# and with BENCH_DOCS=1 (the default for a full run) copies the report and the
# plot to docs/balancers-cluster.{md,svg}.
#
#   scripts/bench-balancers.sh                    full run, ~35 min for 7 balancers on
#                                                 2 cores (it prints its estimate)
#   QUICK=1 scripts/bench-balancers.sh            smoke run, ~3 min: 4 s runs, 60 and
#                                                 95 %, short answers, no docs/
#   BENCH_RATES="50 100" scripts/bench-balancers.sh
#                                                 fixed rates in req/s, no capacity probe
#
# Knobs (environment):
#   BENCH_LBS          balancers [round_robin least_conn + every pdgate balancer
#                      whose .so is in dist/modules]
#   BENCH_LOADS        loads in % of capacity [60 80 95]
#   BENCH_RATES        fixed rates in req/s instead of BENCH_LOADS (skips the probe)
#   BENCH_SECONDS      seconds of arrivals per run [30; QUICK 4]
#   BENCH_SEEDS        workload seeds; figures are their means [7 8; QUICK 7]
#   BENCH_CAPACITY     capacity in req/s: skips the probe
#   BENCH_CAP_START    first probe rate, req/s [40]
#   BENCH_CAP_SECONDS  seconds of arrivals per probe step [20; QUICK 4]
#   BENCH_CAP_BISECT   bisection steps after the first unsustained rate [3; QUICK 1]
#   BENCH_TIME_SCALE   engine-sim --time-scale (below 1 slows the engines, for
#                      hosts too small to drive the cluster to its capacity) [1]
#   BENCH_SLOW         heterogeneous cluster: the first BENCH_SLOW_COUNT [1]
#                      engines of each role run at this fraction of the
#                      others' speed (e.g. 0.33) [unset: identical engines]
#   BENCH_WORKLOAD     extra pd-bench workload flags, e.g. shared prefixes for
#                      prefix_cache_affinity: "--prefix-groups 16 --turns 3"
#   BENCH_OUTPUT_LEN   median output tokens of the ShareGPT-like mix [150; QUICK 60]
#   BENCH_DOCS         1: copy the report and plot to docs/ [1; 0 with QUICK or BENCH_RATES]
#   BENCH_OUT          output directory, emptied first [bench-out/balancers; QUICK
#                      bench-out/balancers-quick]
#
# Capacity: a probe step runs round robin at a Poisson rate for
# BENCH_CAP_SECONDS. The rate is sustained when (1) the requests that finished
# during the second half of the arrival window number at least 95 % of those
# that arrived in it (throughput keeps up), and (2) TTFT does not grow during
# the run: the p50 TTFT of the last quarter of arrivals is at most 2x that of
# the second quarter (+5 ms). From BENCH_CAP_START the rate goes up (or down)
# by 1.5x until the verdict changes, then BENCH_CAP_BISECT bisections between
# the highest sustained and the lowest unsustained rate; the capacity is the
# highest sustained rate seen.
#
# Binds 127.0.0.1 only (ports 18700-18799 and 19700-19799).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    d_seconds=4 d_seeds=7 d_loads="60 95" d_cap_seconds=4 d_bisect=1 d_outlen=60
else
    d_seconds=30 d_seeds="7 8" d_loads="60 80 95" d_cap_seconds=20 d_bisect=3 d_outlen=150
fi
SECONDS_PER=${BENCH_SECONDS:-$d_seconds}
SEEDS=${BENCH_SEEDS:-$d_seeds}
LOADS=${BENCH_LOADS:-$d_loads}
RATES=${BENCH_RATES:-}
CAPACITY=${BENCH_CAPACITY:-}
CAP_START=${BENCH_CAP_START:-40}
CAP_SECONDS=${BENCH_CAP_SECONDS:-$d_cap_seconds}
CAP_BISECT=${BENCH_CAP_BISECT:-$d_bisect}
TIME_SCALE=${BENCH_TIME_SCALE:-1}
SLOW=${BENCH_SLOW:-}
SLOW_COUNT=${BENCH_SLOW_COUNT:-1}
OUTPUT_LEN=${BENCH_OUTPUT_LEN:-$d_outlen}
if [ "$QUICK" = 1 ] || [ -n "$RATES" ]; then d_docs=0; else d_docs=1; fi
DOCS=${BENCH_DOCS:-$d_docs}

[ -x dist/bin/engine-sim ] && [ -x dist/bin/pd-bench ] && [ -x dist/sbin/nginx ] || ./build.sh

# Balancers: nginx's two baselines, then every pdgate balancer that is built.
if [ -n "${BENCH_LBS:-}" ]; then
    LBS=$BENCH_LBS
else
    LBS="round_robin least_conn"
    known="least_total_load weighted_least_active auto_balance_controller prefill_score_balance greedy_timeout length_balance pd_score_balance prefix_cache_affinity"
    for lb in $known; do
        [ -f "dist/modules/ngx_http_upstream_${lb}_module.so" ] && LBS+=" $lb"
    done
    for so in dist/modules/ngx_http_upstream_*_module.so; do
        [ -f "$so" ] || continue
        lb=${so#dist/modules/ngx_http_upstream_}
        lb=${lb%_module.so}
        case " $LBS " in *" $lb "*) ;; *) LBS+=" $lb" ;; esac
    done
fi

if [ "$QUICK" = 1 ]; then d_out=bench-out/balancers-quick; else d_out=bench-out/balancers; fi
OUT="$ROOT/${BENCH_OUT:-$d_out}"
rm -rf "$OUT"   # runs.tsv, the report and the plot describe this run only
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
    local scale
    for i in 0 1 2 3; do
        # A heterogeneous cluster: the first BENCH_SLOW_COUNT engines of each
        # role run BENCH_SLOW times the speed of the others.
        scale=$TIME_SCALE
        if [ -n "$SLOW" ] && [ "$i" -lt "$SLOW_COUNT" ]; then
            scale=$(awk -v a="$TIME_SCALE" -v b="$SLOW" 'BEGIN { print a * b }')
        fi
        dist/bin/engine-sim --role prefill --port $((18710 + i)) --kv-port $((19710 + i)) \
            --time-scale "$scale" --quiet 2>>"$W/logs/sims.log" &
        PIDS+=($!)
        dist/bin/engine-sim --role decode --port $((18720 + i)) --kv-port $((19720 + i)) \
            --time-scale "$scale" --quiet 2>>"$W/logs/sims.log" &
        PIDS+=($!)
    done
    for p in 18710 18711 18712 18713 18720 18721 18722 18723; do
        for _ in $(seq 50); do curl -sf "127.0.0.1:$p/health" >/dev/null && break; sleep 0.1; done
    done
}
stop_sims() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }

# The balancer's directive in each pool, and its module.
directive() { # directive <balancer> prefill|decode
    case $1 in
        round_robin) echo "" ;;
        least_conn) echo "least_conn;" ;;
        pd_score_balance) echo "pd_score_balance $2;" ;;
        *) echo "$1 on;" ;;
    esac
}

conf() { # conf <balancer>
    local lb=$1 load=""
    local so="$ROOT/dist/modules/ngx_http_upstream_${lb}_module.so"
    [ -f "$so" ] && load="load_module $so;"
    cat > "$W/nginx.conf" <<CONF
load_module $ROOT/dist/modules/ngx_http_set_request_id_module.so;
load_module $ROOT/dist/modules/ngx_http_prefill_module.so;
$load
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
events { worker_connections 8192; }
http {
    access_log off;
    upstream prefill_servers { server 127.0.0.1:18710; server 127.0.0.1:18711; server 127.0.0.1:18712; server 127.0.0.1:18713; $(directive "$lb" prefill) keepalive 256; }
    upstream decode_servers { server 127.0.0.1:18720; server 127.0.0.1:18721; server 127.0.0.1:18722; server 127.0.0.1:18723; $(directive "$lb" decode) keepalive 256; }
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

cpu_ticks() { # busy and total jiffies of the whole host
    awk '/^cpu /{ idle = $5 + $6; t = 0; for (i = 2; i <= NF; i++) t += $i; print t - idle, t }' /proc/stat
}

REPORT=(python3 "$ROOT/scripts/bench-balancers-report.py")
printf 'kind\tbalancer\tload\trate\tseed\tseconds\tcpu\tjson\n' > "$OUT/runs.tsv"

# run_one <kind> <balancer> <load label> <rate> <seed> <seconds> <json>: one
# pd-bench run on fresh engines; appends to runs.tsv.
run_one() {
    local kind=$1 lb=$2 load=$3 rate=$4 seed=$5 secs=$6 json=$7
    start_sims
    conf "$lb"
    "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf
    NGX_UP=1
    read -r b0 t0 < <(cpu_ticks)
    dist/bin/pd-bench --url http://127.0.0.1:18700 --endpoint chat --rate "$rate" --duration "$secs" \
        --lengths sharegpt --output-len "$OUTPUT_LEN" --seed "$seed" --quiet --json "$json" \
        --label "$lb @ $load" ${BENCH_WORKLOAD:+$BENCH_WORKLOAD} >/dev/null
    read -r b1 t1 < <(cpu_ticks)
    "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf -s stop
    NGX_UP=0
    sleep 0.3
    stop_sims
    local cpu=$(( (b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1) ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$lb" "$load" "$rate" "$seed" "$secs" "$cpu" "$json" >> "$OUT/runs.tsv"
    LAST_CPU=$cpu
}

# Every balancer's configuration must pass nginx -t before the long part.
for lb in $LBS; do
    conf "$lb"
    if ! "$ROOT/dist/sbin/nginx" -p "$W" -c nginx.conf -t -q 2>"$W/logs/t.log"; then
        echo "bench-balancers.sh: nginx rejects the configuration of $lb:" >&2
        cat "$W/logs/t.log" >&2
        echo "(its directives come from directive() in this script)" >&2
        exit 1
    fi
done

nlb=$(wc -w <<<"$LBS")
npoints=$(wc -w <<<"${RATES:-$LOADS}")
nseeds=$(wc -w <<<"$SEEDS")
echo "balancers: $LBS"
nruns=$((nlb * npoints * nseeds))
# On top of its arrivals a run waits for the answers' tail and fresh engines:
# ~8 s (median output 150 tokens; ~4 s at QUICK's 60).
over=$((OUTPUT_LEN >= 100 ? 8 : 4))
est=$((nruns * (SECONDS_PER + over)))
[ -z "$RATES" ] && [ -z "$CAPACITY" ] && est=$((est + 7 * (CAP_SECONDS + over)))
echo "runs: $nlb balancers x $npoints loads x $nseeds seeds of ${SECONDS_PER}s; estimate ~$(( (est + 59) / 60 )) min"
t_start=$(date +%s)

# --- capacity ------------------------------------------------------------------
first_seed=${SEEDS%% *}
if [ -z "$RATES" ] && [ -z "$CAPACITY" ]; then
    echo
    echo "capacity probe: round_robin, ${CAP_SECONDS}s per step, seed $first_seed"
    printf '%-10s | %9s %9s %9s | %5s | %s\n' "rate" "finished" "ttft grow" "ttft p50" "cpu%" "sustained"
    ok_rate=0 bad_rate=0 bisected=0 steps=0 rate=$CAP_START
    while :; do
        json="$OUT/probe-rate$rate.json"
        run_one probe round_robin "$rate/s" "$rate" "$first_seed" "$CAP_SECONDS" "$json"
        read -r verdict finished grow p50 < <("${REPORT[@]}" probe "$json")
        printf '%-10s | %9s %9s %9s | %5s | %s\n' "$rate" "$finished" "$grow" "$p50" "$LAST_CPU" "$verdict"
        steps=$((steps + 1))
        read -r ok_rate bad_rate rate < <("${REPORT[@]}" next "$ok_rate" "$bad_rate" "$rate" "$verdict" \
            "$bisected" "$CAP_BISECT" "$steps")
        [ "$rate" = stop ] && break
        [ "$ok_rate" != 0 ] && [ "$bad_rate" != 0 ] && bisected=$((bisected + 1))
    done
    [ "$ok_rate" != 0 ] || { echo "bench-balancers.sh: no probe rate was sustained (down to $rate req/s)" >&2; exit 1; }
    CAPACITY=$ok_rate
    echo "capacity: $CAPACITY req/s (highest sustained probe rate)"
fi

# --- balancers -----------------------------------------------------------------
if [ -n "$RATES" ]; then
    points=$RATES
else
    points=$LOADS
fi
echo
printf '%-24s %6s %7s %4s | %9s %9s %9s %9s | %9s %9s | %6s %4s\n' balancer load rate seed \
    "ttft p50" "ttft p99" "tpot p50" "tpot p99" "tok/s" "req/s" errors cpu%
block=0
for seed in $SEEDS; do
    for point in $points; do
        if [ -n "$RATES" ]; then
            rate=$point load="$point/s"
        else
            rate=$(python3 -c "print(f'{$CAPACITY * $point / 100:.4g}')") load="$point%"
        fi
        # Rotate the order from block to block so that no balancer always
        # runs first (or right after the probe).
        read -ra order <<<"$LBS"
        rot=$((block % ${#order[@]}))
        block=$((block + 1))
        for lb in "${order[@]:rot}" "${order[@]:0:rot}"; do
            json="$OUT/$lb-${point}-seed$seed.json"
            run_one run "$lb" "$load" "$rate" "$seed" "$SECONDS_PER" "$json"
            "${REPORT[@]}" row "$json" "$lb" "$load" "$rate" "$seed" "$LAST_CPU"
        done
    done
done
t_end=$(date +%s)

# --- report --------------------------------------------------------------------
cmd="scripts/bench-balancers.sh"
for v in QUICK BENCH_LBS BENCH_LOADS BENCH_RATES BENCH_SECONDS BENCH_SEEDS BENCH_CAPACITY BENCH_CAP_START \
    BENCH_CAP_SECONDS BENCH_CAP_BISECT BENCH_TIME_SCALE BENCH_OUTPUT_LEN BENCH_DOCS; do
    [ -n "${!v:-}" ] && cmd="$v=\"${!v}\" $cmd"
done
"${REPORT[@]}" report "$OUT" --capacity "${CAPACITY:-}" --command "$cmd" --elapsed $((t_end - t_start)) \
    --time-scale "$TIME_SCALE" --output-len "$OUTPUT_LEN" > "$OUT/results.md"
plot=(python3 scripts/pd-plot.py --lines --title "pdgate balancers, 4P4D simulated cluster" -o "$OUT/balancers.svg")
# shellcheck disable=SC2046
"${plot[@]}" $(awk -F'\t' '$1 == "run" { print $8 }' "$OUT/runs.tsv") >/dev/null
if [ "$DOCS" = 1 ]; then
    cp "$OUT/results.md" docs/balancers-cluster.md
    cp "$OUT/balancers.svg" docs/balancers-cluster.svg
    echo "report and plot: docs/balancers-cluster.md, docs/balancers-cluster.svg"
fi
echo "took $((t_end - t_start)) s; JSON, report and plot: $OUT"
