#!/usr/bin/env bash
# scripts/global_proxy.sh — write an nginx configuration that makes nginx +
# pdgate's modules the global proxy of a prefill/decode cluster, check it with
# `nginx -t`, and start (or reload) that nginx. The same command line as
# omni-infer's global_proxy.sh; see --help, and README.md for the differences.
#
#   scripts/global_proxy.sh --prefill-servers-list 10.0.0.1:8100,10.0.0.2:8100 \
#       --decode-servers-list 10.0.0.3:8200 \
#       --prefill-lb-sdk least_total_load --decode-lb-sdk weighted_least_active
#   scripts/global_proxy.sh --stop        # stops the nginx started from that config
#
# Exit status: 0 done, 1 nginx refused or failed, 2 bad flags (nothing written).
set -euo pipefail

PROG=global_proxy.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# --- what this build can do: the one table to edit when a module lands ------
#
# feature               module (.so in --modules-dir)                  directive it must define
# A feature is available when its module file exists and defines the
# directive (its name as a NUL-terminated string in the .so, as nginx's
# command table holds it). The generator emits one load_module line per
# distinct module among the features a configuration uses, in this table's
# order. A build without stream_ops or pd_metrics (older modules) refuses
# --stream-ops and --enable-internal-metrics by this table.
FEATURE_TABLE='
request_id              ngx_http_set_request_id_module                 set_request_id
prefill                 ngx_http_prefill_module                        prefill
stream_ops              ngx_http_prefill_module                        stream_ops
internal_metrics        ngx_http_prefill_module                        pd_metrics
sglang                  ngx_http_prefill_refactor_module               prefill_refactor
sglang_balance          ngx_http_prefill_refactor_module               prefill_refactor_balance
sglang_health           ngx_http_prefill_refactor_module               prefill_refactor_health
sglang_upstream         ngx_http_prefill_refactor_module               prefill_servers_upstream
encode                  ngx_http_prefill_module                        prefill_encode
fallback                ngx_http_prefill_module                        prefill_fallback
hold                    ngx_http_prefill_module                        pd_hold
sglang_hold             ngx_http_prefill_refactor_module               prefill_refactor_hold
health                  ngx_http_upstream_pd_health_module             pd_health_check
engine_metrics          ngx_http_upstream_pd_health_module             pd_engine_metrics
kv_events               ngx_http_upstream_pd_health_module             pd_kv_events
tokenizer               ngx_http_prefill_module                        pd_tokenizer
sglang_tokenizer        ngx_http_prefill_refactor_module               prefill_refactor_tokenizer
lb:least_total_load     ngx_http_upstream_least_total_load_module      least_total_load
lb:weighted_least_active ngx_http_upstream_weighted_least_active_module weighted_least_active
lb:auto_balance_controller ngx_http_upstream_auto_balance_controller_module auto_balance_controller
lb:prefill_score_balance ngx_http_upstream_prefill_score_balance_module prefill_score_balance
lb:greedy_timeout       ngx_http_upstream_greedy_timeout_module        greedy_timeout
lb:length_balance       ngx_http_upstream_length_balance_module        length_balance
lb:pd_score_balance     ngx_http_upstream_pd_score_balance_module      pd_score_balance
lb:prefix_cache_affinity ngx_http_upstream_prefix_cache_affinity_module prefix_cache_affinity
lb:earliest_start       ngx_http_upstream_earliest_start_module        earliest_start
'
# The policies prefill_refactor_balance runs (SGLang mode's prefill choice).
SGLANG_POLICIES="least_total_load weighted_least_active auto_balance_controller prefill_score_balance pd_score_balance"
SGLANG_BALANCE=""
# Balancers built into nginx: no module, always available.
BUILTIN_LBS="round_robin least_conn"
# The encoder upstream takes only these (the P/D balancers model prefill or
# decode load, not one-token encoder requests).
ENCODE_LBS="round_robin least_conn"
# Whether render() has lines for the metrics directives.
METRICS_TEMPLATE=1
# --- defaults (the original's where they are sane; see usage) --------------
CONF_FILE="$ROOT/dist/conf/global_proxy.conf"
PREFIX="$ROOT/dist"
MODULES_DIR="$ROOT/dist/modules"
NGINX_BIN="$ROOT/dist/sbin/nginx"
START_CORE=0
CORE_NUM=4
LISTEN_PORT=8080
LISTEN_ADDRESS=""
PREFILL_LIST=""
DECODE_LIST=""
METRICS_LIST=""
ENCODE_LIST=""
PREFILL_LB=pd_score_balance
DECODE_LB=pd_score_balance
ENCODE_LB=""
PREFILL_LB_GIVEN=""
PREFILL_MAX_SEQS=16
DECODE_MAX_SEQS=32
DECODE_SEQS_GIVEN=""
PREFILL_SEQS_GIVEN=""
# Holding requests in the proxy (pd_hold): auto = on when a
# --prefill/--decode-max-num-seqs is given.
HOLD=auto
HOLD_QUEUE=1024
HOLD_TIMEOUT=30s
HOLD_STATUS=503
HOLD_ORDER=fifo
ENGINE=vllm
BOOTSTRAP_PORTS=""
METRICS_SIZE=""
METRICS_ALLOW=""
AFD=0
ATTENTION_NUM=""
STREAM_OPS=off
BODY_BUFFER=1024K
LOG_FILE=""
LOG_LEVEL=""
ACCESS_LOG=""
ACCESS_LOG_BUFFER=64k
# pd_health_check's parameters on every engine pool ("off": none).
HEALTH_DEFAULT="interval=2s timeout=1s fails=2 passes=1 uri=/health"
HEALTH=$HEALTH_DEFAULT
HEALTH_GIVEN=""
# pd_engine_metrics's parameters on every engine pool ("off": none).
ENGINE_METRICS_DEFAULT="interval=1s timeout=1s uri=/metrics"
ENGINE_METRICS=$ENGINE_METRICS_DEFAULT
ENGINE_METRICS_GIVEN=""
# pd_tokenizer (prefill_refactor_tokenizer): the model directory and its
# block hashing parameters; pd_kv_events's parameters on the prefill pool.
TOKENIZER=""
TOKENIZER_PARAMS=""
KV_EVENTS=off
KV_EVENTS_ON=""
FALLBACK=off
DRY_RUN=0
STOP=0
ROLLBACK=0

usage() {
    cat <<EOF
Usage: $PROG --prefill-servers-list H:P[,H:P…] --decode-servers-list H:P[,H:P…] [options]
       $PROG --stop [-f FILE]        $PROG --rollback [-f FILE]

Writes an nginx configuration for a P/D cluster (pdgate's prefill and
set_request_id modules, one balancer per side; prefill_refactor with
--engine-type sglang; an encoder stage with --encode-servers-list), checks it
with nginx -t and starts nginx with it, or reloads the nginx already running
from it.

Servers and balancing
  --prefill-servers-list LIST   prefill servers, host:port[,host:port…] (required)
  --decode-servers-list LIST    decode servers (required)
  --metrics-servers-list LIST   upstream metrics_servers behind location /metrics
  --encode-servers-list LIST    E/P/D: encoder servers (upstream encode_servers); each
                                media item of a chat request is encoded there first
                                (prefill_encode), then the P/D legs run (vllm only)
  --prefill-lb-sdk NAME         prefill balancer (default pd_score_balance; not
                                used with sglang: prefill_refactor chooses)
  --decode-lb-sdk NAME          decode balancer (default pd_score_balance)
        NAME: least_total_load weighted_least_active auto_balance_controller
              prefill_score_balance greedy_timeout length_balance
              pd_score_balance prefix_cache_affinity earliest_start
              round_robin least_conn
  --encode-lb-sdk round_robin|least_conn
                                encoder balancer (default round_robin)
  --prefill-max-num-seqs N      pd_score_balance_max_num_seqs on P (default 16);
                                given, it also turns holding on (--hold)
  --decode-max-num-seqs N       pd_score_balance_max_num_seqs on D (default 32;
                                earliest_start_max_num_seqs on D when given);
                                given, it also turns holding on (--hold)
  --hold on|off|auto            pd_hold: a request waits in the proxy while every
                                prefill or every decode server has its
                                max-num-seqs requests, and goes to the first that
                                frees (default auto: on when a max-num-seqs flag
                                is given)
  --hold-queue N                requests held at most (default 1024); beyond, the
                                answer is --hold-status at once
  --hold-timeout TIME           a request held this long is answered
                                --hold-status (default 30s)
  --hold-status 429|503         the answer of a full queue or a timeout, JSON with
                                Retry-After (default 503)
  --hold-order fifo|spf         which held request goes first: the oldest (default),
                                or the shortest prompt, aged 1000 tokens a second
  --enable-attention-ffn-disaggregation
                                keep only the last --attention-num decode servers
  --attention-num N             attention servers with AFD (required with it)

Engines and request handling
  --engine-type vllm|sglang     default vllm; sglang: SGLang's bootstrap P/D
                                (prefill_refactor, both legs at once)
  --bootstrap-port P[,P…]       sglang: one port, or one per prefill server
                                (default: the module's, 8998)
  --stream-ops add|set_opt|off  stream_ops in the completions location (default off;
                                vllm only; needs a prefill module with stream_ops)
  --enable-internal-metrics [SIZE]
                                P/D metrics in a shared zone of SIZE (default 128k),
                                served as Prometheus text at /internal/metrics
                                (vllm only); local clients only (127.0.0.1, ::1)
  --metrics-allow ADDR[,ADDR…]  also allow these addresses or CIDRs to read
                                /internal/metrics (nginx "allow" syntax)
  --client-body-buffer-size SIZE  default 1024K
  --prefill-fallback decode|off when the prefill fails (no prefill server
                                answers, or 5xx), send the request to the decode
                                alone, which computes the prompt (prefill_fallback;
                                vllm only; default off: the client gets 502 JSON)
  --health-check PARAMS|off     active health checks of every engine pool
                                (pd_health_check PARAMS; default "interval=2s
                                timeout=1s fails=2 passes=1 uri=/health"): only
                                engines that pass take traffic, /health answers
                                the proxy's readiness (200, or 503 JSON while a
                                pool has no healthy engine), /internal/health
                                shows each engine (local clients only); off: none
                                of it (/health answers 404)
  --engine-metrics PARAMS|off   scrape every engine's Prometheus /metrics
                                (pd_engine_metrics PARAMS; default "interval=1s
                                timeout=1s uri=/metrics"): every balancer adds
                                the engine's own queue and KV pressure to what it
                                counts, earliest_start predicts from it; off: none
  --tokenizer DIR               the model's tokenizer and chat template in the proxy
                                (pd_tokenizer DIR; prefill_refactor_tokenizer with
                                sglang): prompts are counted in the model's tokens
                                for every balancer and hold, and keyed in its
                                blocks for prefix_cache_affinity; DIR holds
                                tokenizer.json and tokenizer_config.json
  --tokenizer-params PARAMS     with --tokenizer: how blocks are keyed, as the
                                engines do (vLLM --block-size,
                                --prefix-caching-hash-algo, PYTHONHASHSEED), e.g.
                                "block_size=16 hash=sha256_cbor seed=0
                                max_blocks=8192" (default: the directive's, those)
  --kv-events PARAMS|on|off     subscribe to the prefill engines' KV cache events
                                (vLLM --kv-events-config, ZeroMQ): pd_kv_events
                                PARAMS in the prefill pool, e.g. "port=+1
                                replay_port=+2" (the engine's HTTP port plus N) or
                                "port=5557 topic=kv blocks=1m"; on: the defaults
                                (port 5557); prefix_cache_affinity then routes on
                                what each engine holds, as prefill_refactor does with
                                sglang (its prefill servers become prefill_servers'
                                peers: prefill_servers_upstream); needs --tokenizer,
                                whose block_size, hash and seed it takes (default off)

nginx process
  -f, --nginx-conf-file FILE    the file written (default dist/conf/global_proxy.conf);
                                the first time it replaces a file, that file is
                                kept as FILE_bak
      --prefix DIR              nginx prefix (-p): pid file DIR/logs/<name>.pid,
                                logs, temp files (default dist/)
      --nginx-bin PATH          nginx binary (default dist/sbin/nginx)
      --modules-dir DIR         the .so files (default dist/modules)
  -s, --start-core-index N      first CPU of worker_cpu_affinity (default 0)
  -c, --core-num N              worker processes, one per CPU (default 4)
  -p, --listen-port PORT        default 8080
      --listen-address ADDR     default: every address
  -l, --log-file FILE           error log (default PREFIX/logs/error.log)
      --log-level LEVEL         debug|info|notice|warn|error|crit|alert|emerg (default error)
      --access-log-file FILE    JSON access log (default PREFIX/logs/access.log; off: none)
      --access-log-buffer SIZE  lines are written SIZE at a time, and at least every
                                second (default 64k; off: one write per request)
  -d, --dry-run                 write the configuration and exit (no nginx -t, no start)
  -S, --stop                    stop the nginx running from FILE (its pid file only)
  -R, --rollback                stop it as --stop does, then restore FILE_bak
  -h, --help                    this text

Flags take their value as the next argument or after '='. Exit status: 0 done,
1 nginx refused the configuration or did not start/stop, 2 bad flags (nothing
written).
EOF
}

# --- messages ---------------------------------------------------------------
# A bad flag: one line naming it and its value, exit 2, nothing written.
bad() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit 2
}
fail() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit 1
}
say() { printf '%s: %s\n' "$PROG" "$*"; }

# --- flag parsing -----------------------------------------------------------
parse_args() {
    local arg val inline
    while [ $# -gt 0 ]; do
        arg=$1
        inline=0
        shift
        case "$arg" in
            --*=*) val=${arg#*=}; arg=${arg%%=*}; inline=1; set -- "$val" "$@" ;;
        esac
        case "$arg" in
            --enable-attention-ffn-disaggregation|-d|--dry-run|-S|--stop|-R|--rollback|-h|--help)
                [ "$inline" = 0 ] || bad "$arg: takes no value" ;;
        esac
        case "$arg" in
            -f|--nginx-conf-file) need_value "$arg" "$@"; CONF_FILE=$1; shift ;;
            --prefix) need_value "$arg" "$@"; PREFIX=$1; shift ;;
            --nginx-bin) need_value "$arg" "$@"; NGINX_BIN=$1; shift ;;
            --modules-dir) need_value "$arg" "$@"; MODULES_DIR=$1; shift ;;
            -s|--start-core-index) need_value "$arg" "$@"; START_CORE=$1; shift ;;
            -c|--core-num) need_value "$arg" "$@"; CORE_NUM=$1; shift ;;
            -p|--listen-port) need_value "$arg" "$@"; LISTEN_PORT=$1; shift ;;
            --listen-address) need_value "$arg" "$@"; LISTEN_ADDRESS=$1; shift ;;
            --prefill-servers-list) need_value "$arg" "$@"; PREFILL_LIST=$1; shift ;;
            --decode-servers-list) need_value "$arg" "$@"; DECODE_LIST=$1; shift ;;
            --metrics-servers-list) need_value "$arg" "$@"; METRICS_LIST=$1; shift ;;
            --encode-servers-list) need_value "$arg" "$@"; ENCODE_LIST=$1; shift ;;
            --prefill-lb-sdk) need_value "$arg" "$@"; PREFILL_LB=$1; PREFILL_LB_GIVEN=1; shift ;;
            --decode-lb-sdk) need_value "$arg" "$@"; DECODE_LB=$1; shift ;;
            --encode-lb-sdk) need_value "$arg" "$@"; ENCODE_LB=$1; shift ;;
            --prefill-max-num-seqs) need_value "$arg" "$@"; PREFILL_MAX_SEQS=$1; PREFILL_SEQS_GIVEN=1; shift ;;
            --hold) need_value "$arg" "$@"; HOLD=$1; shift ;;
            --hold-queue) need_value "$arg" "$@"; HOLD_QUEUE=$1; shift ;;
            --hold-timeout) need_value "$arg" "$@"; HOLD_TIMEOUT=$1; shift ;;
            --hold-status) need_value "$arg" "$@"; HOLD_STATUS=$1; shift ;;
            --hold-order) need_value "$arg" "$@"; HOLD_ORDER=$1; shift ;;
            --decode-max-num-seqs) need_value "$arg" "$@"; DECODE_MAX_SEQS=$1; DECODE_SEQS_GIVEN=1; shift ;;
            --engine-type) need_value "$arg" "$@"; ENGINE=$1; shift ;;
            --bootstrap-port) need_value "$arg" "$@"; BOOTSTRAP_PORTS=$1; shift ;;
            --enable-internal-metrics)
                # The size is optional: take the next argument only when it
                # is not a flag.
                METRICS_SIZE=128k
                if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then METRICS_SIZE=$1; shift; fi ;;
            --metrics-allow) need_value "$arg" "$@"; METRICS_ALLOW=$1; shift ;;
            --enable-attention-ffn-disaggregation) AFD=1 ;;
            --attention-num) need_value "$arg" "$@"; ATTENTION_NUM=$1; shift ;;
            --stream-ops) need_value "$arg" "$@"; STREAM_OPS=$1; shift ;;
            --client-body-buffer-size) need_value "$arg" "$@"; BODY_BUFFER=$1; shift ;;
            --health-check) need_value "$arg" "$@"; HEALTH=$1; HEALTH_GIVEN=1; shift ;;
            --engine-metrics) need_value "$arg" "$@"; ENGINE_METRICS=$1; ENGINE_METRICS_GIVEN=1; shift ;;
            --tokenizer) need_value "$arg" "$@"; TOKENIZER=$1; shift ;;
            --tokenizer-params) need_value "$arg" "$@"; TOKENIZER_PARAMS=$1; shift ;;
            --kv-events) need_value "$arg" "$@"; KV_EVENTS=$1; shift ;;
            --prefill-fallback) need_value "$arg" "$@"; FALLBACK=$1; shift ;;
            -l|--log-file) need_value "$arg" "$@"; LOG_FILE=$1; shift ;;
            --log-level) need_value "$arg" "$@"; LOG_LEVEL=$1; shift ;;
            --access-log-file) need_value "$arg" "$@"; ACCESS_LOG=$1; shift ;;
            --access-log-buffer) need_value "$arg" "$@"; ACCESS_LOG_BUFFER=$1; shift ;;
            -d|--dry-run) DRY_RUN=1 ;;
            -S|--stop) STOP=1 ;;
            -R|--rollback) ROLLBACK=1 ;;
            -h|--help) usage; exit 0 ;;
            *) bad "unknown flag \"$arg\" (see --help)" ;;
        esac
    done
}

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then bad "$1: missing value"; fi
}

# --- validation (before anything is written) --------------------------------
is_uint() { [[ $1 =~ ^[0-9]+$ ]] && [ ${#1} -le 9 ]; }
is_port() { is_uint "$1" && [ "$((10#$1))" -ge 1 ] && [ "$((10#$1))" -le 65535 ]; }
is_size() { [[ $1 =~ ^[0-9]+[kKmMgG]?$ ]] && [ ${#1} -le 12 ]; }

# parse_servers FLAG LIST ARRAY: every entry host:port, no duplicates; the
# entries (whitespace around commas dropped) go into ARRAY.
parse_servers() {
    local flag=$1 list=$2 entry host port
    local -n into=$3
    local -A seen=()
    into=()
    [ -n "$list" ] || bad "$flag: empty list"
    [[ $list != *, && $list != ,* && $list != *,,* ]] || bad "$flag $list: empty entry"
    local entries
    IFS=, read -r -a entries <<< "$list"
    for entry in "${entries[@]}"; do
        entry=${entry//[[:space:]]/}
        if [[ $entry =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):([^:]*)$ ]]; then
            host=${BASH_REMATCH[1]}
            port=${BASH_REMATCH[3]}
        else
            bad "$flag $list: \"$entry\" is not host:port"
        fi
        is_port "$port" || bad "$flag $list: port \"$port\" of \"$entry\" is not in 1-65535"
        [ -z "${seen[$entry]:-}" ] || bad "$flag $list: \"$entry\" is listed twice"
        seen[$entry]=1
        into+=("$host:$((10#$port))")
    done
}

# Lines of FEATURE_TABLE as "feature module directive".
feature_row() {
    local name=$1 f m d
    while read -r f m d; do
        [ "$f" = "$name" ] && { printf '%s %s\n' "$m" "$d"; return 0; }
    done <<< "$FEATURE_TABLE"
    return 1
}

is_lb_name() {
    local n=$1
    [[ " $BUILTIN_LBS " == *" $n "* ]] && return 0
    feature_row "lb:$n" > /dev/null
}

# require_feature NAME FLAG VALUE: exit 2 unless the module of NAME is in
# MODULES_DIR and defines its directive.
require_feature() {
    local name=$1 flag=$2 value=$3 row module directive so
    row=$(feature_row "$name") || bad "internal: no feature \"$name\""
    module=${row% *}
    directive=${row#* }
    so="$MODULES_DIR/$module.so"
    [ -f "$so" ] || bad "$flag $value: not available in this build ($so not found)"
    has_directive "$so" "$directive" \
        || bad "$flag $value: not available in this build ($module.so has no \"$directive\" directive)"
}

# feature_available NAME: whether the module of NAME is there and defines its
# directive.
feature_available() {
    local row module directive
    row=$(feature_row "$1") || return 1
    module=${row% *}
    directive=${row#* }
    [ -f "$MODULES_DIR/$module.so" ] && has_directive "$MODULES_DIR/$module.so" "$directive"
}

# has_directive SO NAME: whether SO holds NAME as a whole NUL-terminated
# string, as a directive's name sits in the module's command table (a
# substring would also find "prefill" in "prefill_encode" or in a file name).
has_directive() {
    LC_ALL=C grep -qaxF -- "$2" < <(tr '\0' '\n' < "$1")
}

validate() {
    local n
    [ -n "$PREFILL_LIST" ] || bad "--prefill-servers-list: required"
    [ -n "$DECODE_LIST" ] || bad "--decode-servers-list: required"
    parse_servers --prefill-servers-list "$PREFILL_LIST" PREFILL
    parse_servers --decode-servers-list "$DECODE_LIST" DECODE
    METRICS=()
    [ -z "$METRICS_LIST" ] || parse_servers --metrics-servers-list "$METRICS_LIST" METRICS
    ENCODE=()
    [ -z "$ENCODE_LIST" ] || parse_servers --encode-servers-list "$ENCODE_LIST" ENCODE

    is_uint "$START_CORE" || bad "--start-core-index $START_CORE: not a non-negative integer"
    { is_uint "$CORE_NUM" && [ "$((10#$CORE_NUM))" -ge 1 ]; } \
        || bad "--core-num $CORE_NUM: not a positive integer"
    START_CORE=$((10#$START_CORE))
    CORE_NUM=$((10#$CORE_NUM))
    [ $((START_CORE + CORE_NUM)) -le 64 ] \
        || bad "--core-num $CORE_NUM: CPUs $START_CORE-$((START_CORE + CORE_NUM - 1)) exceed worker_cpu_affinity's 64"
    is_port "$LISTEN_PORT" || bad "--listen-port $LISTEN_PORT: not a port in 1-65535"
    LISTEN_PORT=$((10#$LISTEN_PORT))
    if [ -n "$LISTEN_ADDRESS" ]; then
        [[ $LISTEN_ADDRESS =~ ^(\*|[0-9.]+|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)$ ]] \
            || bad "--listen-address $LISTEN_ADDRESS: not an address"
        if [[ $LISTEN_ADDRESS == *:* && $LISTEN_ADDRESS != \[* ]]; then
            LISTEN_ADDRESS="[$LISTEN_ADDRESS]"     # IPv6, as nginx writes it
        fi
    fi

    is_lb_name "$PREFILL_LB" || bad "--prefill-lb-sdk $PREFILL_LB: unknown balancer (see --help)"
    is_lb_name "$DECODE_LB" || bad "--decode-lb-sdk $DECODE_LB: unknown balancer (see --help)"
    for n in PREFILL_MAX_SEQS:--prefill-max-num-seqs DECODE_MAX_SEQS:--decode-max-num-seqs; do
        local var=${n%%:*} flag=${n#*:}
        { is_uint "${!var}" && [ "$((10#${!var}))" -ge 1 ]; } || bad "$flag ${!var}: not a positive integer"
        printf -v "$var" '%d' "$((10#${!var}))"
    done

    if [ -n "$ENCODE_LB" ]; then
        [ -n "$ENCODE_LIST" ] || bad "--encode-lb-sdk $ENCODE_LB: only with --encode-servers-list"
        [[ " $ENCODE_LBS " == *" $ENCODE_LB "* ]] || bad "--encode-lb-sdk $ENCODE_LB: not round_robin or least_conn"
    fi
    ENCODE_LB=${ENCODE_LB:-round_robin}

    case "$ENGINE" in
        vllm|sglang) ;;
        *) bad "--engine-type $ENGINE: not vllm or sglang" ;;
    esac
    if [ "$ENGINE" = sglang ]; then
        # The encoder stage and stream_ops are the vLLM prefill module's:
        # prefill_refactor does not run them.
        [ -z "$ENCODE_LIST" ] \
            || bad "--encode-servers-list $ENCODE_LIST: only with --engine-type vllm (the encoder stage is the prefill module's, not prefill_refactor's)"
        [ "$STREAM_OPS" = off ] \
            || bad "--stream-ops $STREAM_OPS: only with --engine-type vllm (stream_ops is the prefill module's, not prefill_refactor's)"
        # The internal prefill location proxies to $prefill_server: nginx
        # would need a resolver for a name there (it has none), so IPs only.
        for n in "${PREFILL[@]}"; do
            [[ ${n%:*} =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$|^\[.*\]$ ]] \
                || bad "--prefill-servers-list $PREFILL_LIST: \"$n\" is not an IP address (with --engine-type sglang nginx connects to the chosen prefill server by variable, without a resolver)"
        done
    fi
    BOOTSTRAP=()
    if [ -n "$BOOTSTRAP_PORTS" ]; then
        [ "$ENGINE" = sglang ] || bad "--bootstrap-port $BOOTSTRAP_PORTS: only with --engine-type sglang"
        [[ $BOOTSTRAP_PORTS != *, && $BOOTSTRAP_PORTS != ,* && $BOOTSTRAP_PORTS != *,,* ]] \
            || bad "--bootstrap-port $BOOTSTRAP_PORTS: empty entry"
        IFS=, read -r -a BOOTSTRAP <<< "${BOOTSTRAP_PORTS//[[:space:]]/}"
        for n in "${!BOOTSTRAP[@]}"; do
            is_port "${BOOTSTRAP[n]}" || bad "--bootstrap-port $BOOTSTRAP_PORTS: \"${BOOTSTRAP[n]}\" is not a port in 1-65535"
            BOOTSTRAP[n]=$((10#${BOOTSTRAP[n]}))
        done
        [ ${#BOOTSTRAP[@]} -eq 1 ] || [ ${#BOOTSTRAP[@]} -eq ${#PREFILL[@]} ] \
            || bad "--bootstrap-port $BOOTSTRAP_PORTS: ${#BOOTSTRAP[@]} ports for ${#PREFILL[@]} prefill servers (give 1 or ${#PREFILL[@]})"
    fi

    if [ -n "$METRICS_SIZE" ]; then
        is_size "$METRICS_SIZE" || bad "--enable-internal-metrics $METRICS_SIZE: not a size (e.g. 128k, 1m)"
    fi
    METRICS_ALLOWS=()
    if [ -n "$METRICS_ALLOW" ]; then
        [ -n "$METRICS_SIZE" ] || bad "--metrics-allow $METRICS_ALLOW: only with --enable-internal-metrics"
        [[ $METRICS_ALLOW != *, && $METRICS_ALLOW != ,* && $METRICS_ALLOW != *,,* ]] \
            || bad "--metrics-allow $METRICS_ALLOW: empty entry"
        IFS=, read -r -a METRICS_ALLOWS <<< "${METRICS_ALLOW//[[:space:]]/}"
        for n in "${METRICS_ALLOWS[@]}"; do
            # An IPv4 or IPv6 address, optionally with a /prefix length;
            # nginx -t checks the rest.
            [[ $n =~ ^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$ ]] \
                || bad "--metrics-allow $METRICS_ALLOW: \"$n\" is not an address or CIDR"
        done
    fi
    if [ "$AFD" = 1 ]; then
        [ -n "$ATTENTION_NUM" ] || bad "--enable-attention-ffn-disaggregation: needs --attention-num"
        { is_uint "$ATTENTION_NUM" && [ "$((10#$ATTENTION_NUM))" -ge 1 ]; } \
            || bad "--attention-num $ATTENTION_NUM: not a positive integer"
        ATTENTION_NUM=$((10#$ATTENTION_NUM))
        [ "$ATTENTION_NUM" -le ${#DECODE[@]} ] \
            || bad "--attention-num $ATTENTION_NUM: more than the ${#DECODE[@]} decode servers"
        DECODE=("${DECODE[@]: -$ATTENTION_NUM}")
    elif [ -n "$ATTENTION_NUM" ]; then
        bad "--attention-num $ATTENTION_NUM: only with --enable-attention-ffn-disaggregation"
    fi
    case "$STREAM_OPS" in
        add|set_opt|off) ;;
        *) bad "--stream-ops $STREAM_OPS: not add, set_opt or off" ;;
    esac
    is_size "$BODY_BUFFER" || bad "--client-body-buffer-size $BODY_BUFFER: not a size (e.g. 1024K, 1m)"
    [ "$ACCESS_LOG_BUFFER" = off ] || is_size "$ACCESS_LOG_BUFFER" \
        || bad "--access-log-buffer $ACCESS_LOG_BUFFER: not a size (e.g. 64k) or off"
    case "$LOG_LEVEL" in
        ""|debug|info|notice|warn|error|crit|alert|emerg) ;;
        *) bad "--log-level $LOG_LEVEL: not debug, info, notice, warn, error, crit, alert or emerg" ;;
    esac
    [ -d "$CONF_FILE" ] && bad "--nginx-conf-file $CONF_FILE: is a directory"

    # The build: nginx, the modules, then each optional feature in use.
    [ -x "$NGINX_BIN" ] || bad "--nginx-bin $NGINX_BIN: not an executable (run ./build.sh?)"
    [ -d "$MODULES_DIR" ] || bad "--modules-dir $MODULES_DIR: not a directory (run ./build.sh?)"
    require_feature request_id --modules-dir "$MODULES_DIR"
    if [ "$ENGINE" = vllm ]; then
        require_feature prefill --modules-dir "$MODULES_DIR"
    else
        require_feature sglang --engine-type "$ENGINE"
    fi
    [ "$STREAM_OPS" = off ] || require_feature stream_ops --stream-ops "$STREAM_OPS"
    case $FALLBACK in
        off) ;;
        decode)
            [ "$ENGINE" = vllm ] || bad "--prefill-fallback decode: only with --engine-type vllm (the SGLang mode runs both legs at once)"
            require_feature fallback --prefill-fallback "$FALLBACK" ;;
        *) bad "--prefill-fallback $FALLBACK: not decode or off" ;;
    esac
    if [ -n "$METRICS_SIZE" ]; then
        [ "$ENGINE" = vllm ] \
            || bad "--enable-internal-metrics $METRICS_SIZE: the SGLang mode (prefill_refactor) keeps no P/D metrics yet; use the engines' /metrics"
        require_feature internal_metrics --enable-internal-metrics "$METRICS_SIZE"
        [ "$METRICS_TEMPLATE" = 1 ] \
            || bad "--enable-internal-metrics $METRICS_SIZE: this script cannot write pd_metrics yet (the module has it; the template does not)"
    fi
    [ -z "$ENCODE_LIST" ] || require_feature encode --encode-servers-list "$ENCODE_LIST"
    if [ "$HEALTH" != off ]; then
        local t
        for t in $HEALTH; do
            [[ $t =~ ^(interval|timeout)=[0-9]+(ms|s|m)?$ || $t =~ ^(fails|passes)=[0-9]+$ \
                || $t =~ ^uri=/[^[:space:]\;\'\"]*$ || $t =~ ^port=[0-9]+$ ]] \
                || bad "--health-check \"$HEALTH\": \"$t\" is not interval=, timeout=, fails=, passes=, uri= or port= (see pd_health_check in README.md), or off"
        done
        if [ -n "$HEALTH_GIVEN" ]; then
            require_feature health --health-check "$HEALTH"
        elif ! feature_available health; then
            printf '%s: warning: this build has no pd_health_check (ngx_http_upstream_pd_health_module.so): no health checks, /health answers 404\n' "$PROG" >&2
            HEALTH=off
        fi
        if [ "$HEALTH" != off ] && [ "$ENGINE" = sglang ]; then
            require_feature sglang_health --health-check "$HEALTH"
        fi
    fi
    case $HOLD in
        auto) if [ -n "$PREFILL_SEQS_GIVEN$DECODE_SEQS_GIVEN" ]; then HOLD=on; else HOLD=off; fi ;;
        on|off) ;;
        *) bad "--hold $HOLD: not on, off or auto" ;;
    esac
    { is_uint "$HOLD_QUEUE" && [ "$((10#$HOLD_QUEUE))" -ge 1 ] && [ "$((10#$HOLD_QUEUE))" -le 4096 ]; } \
        || bad "--hold-queue $HOLD_QUEUE: not a number from 1 to 4096"
    if [[ ! $HOLD_TIMEOUT =~ ^[0-9]+(ms|s|m)?$ || $HOLD_TIMEOUT =~ ^0+(ms|s|m)?$ ]]; then
        bad "--hold-timeout $HOLD_TIMEOUT: not a positive time such as 500ms or 30s"
    fi
    case $HOLD_STATUS in 429|503) ;; *) bad "--hold-status $HOLD_STATUS: not 429 or 503" ;; esac
    case $HOLD_ORDER in fifo|spf) ;; *) bad "--hold-order $HOLD_ORDER: not fifo or spf" ;; esac
    if [ "$HOLD" = on ]; then
        if [ "$ENGINE" = vllm ]; then
            require_feature hold --hold "$HOLD"
        else
            require_feature sglang_hold --hold "$HOLD"
        fi
    fi
    if [ "$ENGINE_METRICS" != off ]; then
        local t
        for t in $ENGINE_METRICS; do
            [[ $t =~ ^(interval|timeout)=[0-9]+(ms|s|m)?$ || $t =~ ^kv_high=[0-9]+$ \
                || $t =~ ^uri=/[^[:space:]\;\'\"]*$ || $t =~ ^port=[0-9]+$ \
                || $t =~ ^model=[^[:space:]\;\'\"]+$ ]] \
                || bad "--engine-metrics \"$ENGINE_METRICS\": \"$t\" is not interval=, timeout=, uri=, port=, model= or kv_high= (see pd_engine_metrics in README.md), or off"
        done
        if [ -n "$ENGINE_METRICS_GIVEN" ]; then
            require_feature engine_metrics --engine-metrics "$ENGINE_METRICS"
        elif ! feature_available engine_metrics; then
            ENGINE_METRICS=off
        fi
    fi
    validate_tokenizer
    # With sglang the prefill upstream only serves /v1 (round robin): the
    # completions' prefill server is prefill_refactor's choice.
    if [ "$ENGINE" = vllm ]; then
        is_builtin_lb "$PREFILL_LB" || require_feature "lb:$PREFILL_LB" --prefill-lb-sdk "$PREFILL_LB"
    elif [ -n "$PREFILL_LB_GIVEN" ]; then
        # prefill_refactor chooses the prefill server itself; it runs the
        # balancers' policies by name (prefill_refactor_balance).
        if [[ " $SGLANG_POLICIES " == *" $PREFILL_LB "* ]]; then
            require_feature sglang_balance --prefill-lb-sdk "$PREFILL_LB"
            SGLANG_BALANCE=$PREFILL_LB
        else
            printf '%s: warning: --prefill-lb-sdk %s has no prefill_refactor policy: the SGLang prefill is the server with the fewest requests in flight\n' \
                "$PROG" "$PREFILL_LB" >&2
        fi
    fi
    is_builtin_lb "$DECODE_LB" || require_feature "lb:$DECODE_LB" --decode-lb-sdk "$DECODE_LB"

    # Not an error: the file may be meant for a bigger machine.
    local cpus
    cpus=$(nproc 2> /dev/null || echo 0)
    if [ "$cpus" -gt 0 ] && [ $((START_CORE + CORE_NUM)) -gt "$cpus" ]; then
        printf '%s: warning: workers pinned to CPUs %d-%d, this machine has %d (nginx will log an alert for each missing one)\n' \
            "$PROG" "$START_CORE" $((START_CORE + CORE_NUM - 1)) "$cpus" >&2
    fi
    return 0
}

is_builtin_lb() { [[ " $BUILTIN_LBS " == *" $1 "* ]]; }

# --tokenizer, --tokenizer-params and --kv-events. pd_kv_events keys the
# engines' blocks as pd_tokenizer keys the prompt's (the balancer ignores the
# index otherwise), so its block_size, hash and seed are the tokenizer's:
# given once, in --tokenizer-params.
validate_tokenizer() {
    local t
    if [ -n "$TOKENIZER_PARAMS" ]; then
        [ -n "$TOKENIZER" ] || bad "--tokenizer-params \"$TOKENIZER_PARAMS\": only with --tokenizer"
        for t in $TOKENIZER_PARAMS; do
            [[ $t =~ ^block_size=[0-9]{1,4}$ || $t =~ ^hash=(sha256_cbor|xxhash_cbor)$ \
                || $t =~ ^seed=[^[:space:]\;\'\"]{1,64}$ || $t =~ ^max_blocks=[0-9]{1,7}$ ]] \
                || bad "--tokenizer-params \"$TOKENIZER_PARAMS\": \"$t\" is not block_size=, hash=sha256_cbor|xxhash_cbor, seed= or max_blocks= (see pd_tokenizer in README.md)"
        done
    fi
    if [ -n "$TOKENIZER" ]; then
        [ -d "$TOKENIZER" ] || bad "--tokenizer $TOKENIZER: not a directory"
        [ -f "$TOKENIZER/tokenizer.json" ] || bad "--tokenizer $TOKENIZER: no tokenizer.json in it (a Hugging Face model directory)"
        if [ "$ENGINE" = vllm ]; then
            require_feature tokenizer --tokenizer "$TOKENIZER"
        else
            require_feature sglang_tokenizer --tokenizer "$TOKENIZER"
        fi
    fi
    case $KV_EVENTS in
        off) return 0 ;;
        on) KV_EVENTS="" ;;
        *)
            for t in $KV_EVENTS; do
                if [[ $t =~ ^(block_size|hash|seed)= ]]; then
                    bad "--kv-events \"$KV_EVENTS\": \"$t\" belongs in --tokenizer-params (pd_tokenizer and pd_kv_events must key blocks alike)"
                fi
                [[ $t =~ ^(port|replay_port)=\+?[0-9]{1,5}$ || $t =~ ^topic=[^[:space:]\;\'\"]{1,256}$ \
                    || $t =~ ^blocks=[0-9]{1,8}[kKmM]?$ ]] \
                    || bad "--kv-events \"$KV_EVENTS\": \"$t\" is not port=, replay_port=, topic= or blocks= (see pd_kv_events in README.md), on or off"
            done ;;
    esac
    [ -n "$TOKENIZER" ] \
        || bad "--kv-events ${KV_EVENTS:-on}: needs --tokenizer (the engines' blocks are matched against the prompt's tokens)"
    require_feature kv_events --kv-events "${KV_EVENTS:-on}"
    [ "$ENGINE" = vllm ] || require_feature sglang_upstream --kv-events "${KV_EVENTS:-on}"
    for t in $TOKENIZER_PARAMS; do
        [[ $t == max_blocks=* ]] || KV_EVENTS+="${KV_EVENTS:+ }$t"
    done
    if [ "$ENGINE" = sglang ] && [ ${#BOOTSTRAP[@]} -gt 1 ]; then
        # prefill_servers_upstream finds a server's bootstrap port by its
        # host in the bootstrap= upstream.
        local -A hosts=()
        for t in "${PREFILL[@]}"; do
            [ -z "${hosts[${t%:*}]:-}" ] \
                || bad "--kv-events ${KV_EVENTS:-on}: with --engine-type sglang and a bootstrap port per prefill server, the prefill servers need hosts of their own (\"${t%:*}\" is listed twice; prefill_servers_upstream finds a bootstrap port by host)"
            hosts[${t%:*}]=1
        done
    fi
    if [ "$ENGINE" = vllm ] && [ "$PREFILL_LB" != prefix_cache_affinity ]; then
        printf "%s: warning: --kv-events: only prefix_cache_affinity routes on the engines' KV index, not --prefill-lb-sdk %s (the index is kept and shown by /internal/health)\n" \
            "$PROG" "$PREFILL_LB" >&2
    fi
    KV_EVENTS_ON=1
}

# Paths become absolute (the configuration must not depend on the directory
# nginx is started from); no characters that would need nginx quoting.
check_path_value() {
    local flag=$1 value=$2
    [ -z "$value" ] && return 0
    [[ $value =~ ^[A-Za-z0-9._/@+=,-]+$ ]] || bad "$flag $value: path has characters other than A-Z a-z 0-9 . _ / @ + = , -"
}

abs_path() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$(pwd)" "$1" ;;
    esac
}

# --- the configuration ------------------------------------------------------
# Every line the generated file has is below; nothing is edited in place.

# The modules the configuration uses, in FEATURE_TABLE order, each once.
used_modules() {
    local -A used=()
    local f m d
    used[request_id]=1
    if [ "$ENGINE" = vllm ]; then
        used[prefill]=1
        used[lb:$PREFILL_LB]=1
    else
        used[sglang]=1
    fi
    [ "$STREAM_OPS" = off ] || used[stream_ops]=1
    [ -z "$METRICS_SIZE" ] || used[internal_metrics]=1
    [ -z "$ENCODE_LIST" ] || used[encode]=1
    [ "$HEALTH" = off ] || used[health]=1
    if [ "$HOLD" = on ]; then
        if [ "$ENGINE" = vllm ]; then used[hold]=1; else used[sglang_hold]=1; fi
    fi
    [ "$ENGINE_METRICS" = off ] || used[engine_metrics]=1
    [ -z "$KV_EVENTS_ON" ] || used[kv_events]=1
    if [ -n "$TOKENIZER" ]; then
        if [ "$ENGINE" = vllm ]; then used[tokenizer]=1; else used[sglang_tokenizer]=1; fi
    fi
    used[lb:$DECODE_LB]=1
    local -A emitted=()
    while read -r f m d; do
        if [ -z "$f" ] || [ -z "${used[$f]:-}" ] || [ -n "${emitted[$m]:-}" ]; then continue; fi
        emitted[$m]=1
        printf '%s\n' "$m"
    done <<< "$FEATURE_TABLE"
}

# worker_cpu_affinity: worker i on CPU start+i, masks of equal width.
cpu_masks() {
    local width=$((START_CORE + CORE_NUM)) i bit masks="" mask
    for ((i = 0; i < CORE_NUM; i++)); do
        mask=""
        for ((bit = width - 1; bit >= 0; bit--)); do
            if [ "$bit" -eq $((START_CORE + i)) ]; then mask+=1; else mask+=0; fi
        done
        masks+=" $mask"
    done
    printf '%s\n' "${masks# }"
}

# lb_lines NAME SIDE: the balancer's lines inside upstream{} (SIDE prefill|decode).
lb_lines() {
    local name=$1 side=$2 seqs
    [ "$side" = prefill ] && seqs=$PREFILL_MAX_SEQS || seqs=$DECODE_MAX_SEQS
    case "$name" in
        round_robin) echo "        # round robin (nginx's default balancer)" ;;
        least_conn) echo "        least_conn;" ;;
        least_total_load)
            echo "        least_total_load on;"
            echo "        least_total_load_batch_size 16;" ;;
        auto_balance_controller)
            echo "        auto_balance_controller on;"
            echo "        auto_balance_controller_batch_size 32;" ;;
        prefix_cache_affinity)
            echo "        prefix_cache_affinity on;"
            echo "        prefix_cache_affinity_block_size 640;" ;;
        pd_score_balance)
            echo "        pd_score_balance $side;"
            echo "        pd_score_balance_max_num_seqs $seqs;" ;;
        earliest_start)
            echo "        earliest_start $side;"
            # The engine's own batch limit (vLLM's 256 unless given).
            if [ "$side" = decode ] && [ -n "$DECODE_SEQS_GIVEN" ]; then
                echo "        earliest_start_max_num_seqs $seqs;"
            fi ;;
        length_balance) echo "        length_balance;" ;;
        *) echo "        $name on;" ;;
    esac
}

# upstream_block NAME LB SIDE SERVER…: a shared zone, the balancer (nginx
# wants it before keepalive), then servers, then connection reuse.
#
# The zone makes the upstream's state one for all workers: round robin's
# turn, least_conn's counts and max_fails are shared, so N workers balance
# as one (without it each worker runs its own round robin, and their picks
# bunch up on one engine while another idles: +28 % TTFT p99 with 4
# workers on a saturated cluster, docs/latency-tail.md).
upstream_block() {
    local name=$1 lb=$2 side=$3 s
    shift 3
    echo "    upstream $name {"
    echo "        zone $name $(( 64 + 2 * $# ))k;"
    [ -n "$lb" ] && lb_lines "$lb" "$side"
    if [ "$HEALTH" != off ] && [ "$side" != metrics ]; then
        echo "        # Only engines that pass take traffic (a new or loading one too)."
        echo "        pd_health_check $HEALTH;"
    fi
    if [ "$ENGINE_METRICS" != off ] && [ "$side" != metrics ]; then
        echo "        # The engine's own queue and KV use, scraped once for every worker."
        echo "        pd_engine_metrics $ENGINE_METRICS;"
    fi
    if [ -n "$KV_EVENTS_ON" ] && [ "$side" = prefill ]; then
        echo "        # The blocks each engine holds, from its KV cache events (one subscriber)."
        echo "        pd_kv_events${KV_EVENTS:+ $KV_EVENTS};"
    fi
    for s in "$@"; do
        echo "        server $s max_fails=3 fail_timeout=10s;"
    done
    echo "        keepalive 2048;"
    echo "        keepalive_timeout 110s;"
    echo "        keepalive_requests 20000;"
    echo "    }"
    echo
}

render() {
    local m pid_file error_log access_log listen
    pid_file="$PREFIX/logs/$(conf_name).pid"
    error_log=${LOG_FILE:-$PREFIX/logs/error.log}
    access_log=${ACCESS_LOG:-$PREFIX/logs/access.log}
    # Buffered: one write per SIZE of lines (at least every second), not
    # one per request in the worker's event loop.
    local access_buffer=""
    [ "$ACCESS_LOG_BUFFER" = off ] || access_buffer=" buffer=$ACCESS_LOG_BUFFER flush=1s"
    listen=${LISTEN_ADDRESS:+$LISTEN_ADDRESS:}$LISTEN_PORT

    local pside="prefill_servers: $PREFILL_LB" legs="Both legs"
    [ "$ENGINE" = vllm ] || pside="prefill: prefill_refactor"
    [ -z "$ENCODE_LIST" ] || legs="Every leg"
    cat <<EOF
# Written by scripts/global_proxy.sh; re-run it to change this file.
# engine $ENGINE; $pside over ${#PREFILL[@]}; decode_servers: $DECODE_LB over ${#DECODE[@]}${ENCODE_LIST:+; encode_servers: $ENCODE_LB over ${#ENCODE[@]}}

EOF
    for m in $(used_modules); do
        echo "load_module $MODULES_DIR/$m.so;"
    done
    cat <<EOF

pid $pid_file;
error_log $error_log ${LOG_LEVEL:-error};
worker_processes $CORE_NUM;
worker_cpu_affinity $(cpu_masks);
worker_rlimit_nofile 102400;

events {
    use epoll;
    accept_mutex off;
    multi_accept on;
    worker_connections 102400;
}

http {
EOF
    [ ${#METRICS[@]} -eq 0 ] || upstream_block metrics_servers "" metrics "${METRICS[@]}"
    [ ${#ENCODE[@]} -eq 0 ] || upstream_block encode_servers "$ENCODE_LB" encode "${ENCODE[@]}"
    if [ "$ENGINE" = vllm ]; then
        upstream_block prefill_servers "$PREFILL_LB" prefill "${PREFILL[@]}"
    elif [ -n "$KV_EVENTS_ON" ]; then
        echo "    # prefill_refactor (location below) chooses among these peers, weighing"
        echo "    # the prompt's blocks each engine holds (pd_kv_events) against load;"
        echo "    # /v1 (models, …) uses the upstream itself."
        upstream_block prefill_servers round_robin prefill "${PREFILL[@]}"
        if [ ${#BOOTSTRAP[@]} -gt 1 ]; then
            local i
            echo "    # Each prefill server's bootstrap port, by host (prefill_servers_upstream)."
            echo "    upstream prefill_bootstrap {"
            for i in "${!PREFILL[@]}"; do
                echo "        server ${PREFILL[i]%:*}:${BOOTSTRAP[i]};"
            done
            echo "    }"
            echo
        fi
    else
        echo "    # Only /v1 (models, …) uses this upstream: the completions' prefill"
        echo "    # server is chosen by prefill_refactor (location below)."
        upstream_block prefill_servers round_robin prefill "${PREFILL[@]}"
    fi
    upstream_block decode_servers "$DECODE_LB" decode "${DECODE[@]}"
    if [ -n "$METRICS_SIZE" ]; then
        cat <<EOF
    # P/D metrics shared by all workers (served at /internal/metrics).
    pd_metrics_zone $METRICS_SIZE;

EOF
    fi
    cat <<EOF
    # $legs: HTTP/1.1 with keepalive to the engines.
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_connect_timeout 10s;
    proxy_send_timeout 300s;
    proxy_read_timeout 14400s;

    # Prompts are read whole before the prefill; larger ones spill to disk.
    client_max_body_size 100m;
    client_body_buffer_size $BODY_BUFFER;
    client_header_buffer_size 512k;
    large_client_header_buffers 4 512k;
    keepalive_requests 20000;
    tcp_nodelay on;

EOF
    # Fixed text: a quoted here-document, no expansion.
    cat <<'EOF'
    # nginx's own errors on the completions location (decode unreachable,
    # no live decode server or timing out, a body over client_max_body_size,
    # limit_req, a method other than POST) are answered by @pd_error below as
    # OpenAI-style JSON, in the shape of the modules' own errors. The key is
    # the status error_page keeps.
    map $status $pd_error_json {
        404     '{"error":{"code":404,"message":"no such route on this proxy","param":null,"type":"NotFoundError"}}';
        405     '{"error":{"code":405,"message":"method not allowed, use POST","param":null,"type":"BadRequestError"}}';
        413     '{"error":{"code":413,"message":"request body is larger than client_max_body_size","param":null,"type":"RequestEntityTooLargeError"}}';
        429     '{"error":{"code":429,"message":"too many requests, retry later","param":null,"type":"RateLimitError"}}';
        502     '{"error":{"code":502,"message":"decode upstream is unreachable or sent an invalid response","param":null,"type":"BadGatewayError"}}';
        503     '{"error":{"code":503,"message":"service unavailable, retry later","param":null,"type":"ServiceUnavailableError"}}';
        504     '{"error":{"code":504,"message":"decode upstream timed out","param":null,"type":"GatewayTimeoutError"}}';
        default '{"error":{"code":500,"message":"internal server error","param":null,"type":"InternalServerError"}}';
    }
    map $status $pd_error_allow {
        405     POST;
        default "";
    }
    # A limit_req added to the completions location answers 429, not 503.
    limit_req_status 429;

EOF
    if [ "$access_log" = off ]; then
        echo "    access_log off;"
    else
        # One JSON object per request. $http_x_request_id is the id both
        # engines saw; upstream_* are the decode leg's.
        cat <<'EOF'
    log_format pdgate_json escape=json '{"time":"$time_iso8601",'
        '"request_id":"$http_x_request_id",'
        '"remote_addr":"$remote_addr",'
        '"request":"$request",'
        '"status":"$status",'
        '"request_length":"$request_length",'
        '"body_bytes_sent":"$body_bytes_sent",'
        '"request_time":"$request_time",'
        '"upstream_addr":"$upstream_addr",'
        '"upstream_status":"$upstream_status",'
        '"upstream_connect_time":"$upstream_connect_time",'
        '"upstream_header_time":"$upstream_header_time",'
        '"upstream_response_time":"$upstream_response_time",'
        '"upstream_bytes_received":"$upstream_bytes_received",'
EOF
        if [ "$ENGINE" = sglang ]; then
            # The prefill server and room both legs carried.
            cat <<'EOF'
        '"prefill_server":"$prefill_server",'
        '"bootstrap_room":"$bootstrap_room",'
EOF
        fi
        if [ "$ENGINE" = vllm ]; then
            # The prefill module's per-request P/D figures (seconds; "-"
            # when a stage did not run).
            cat <<'EOF'
        '"pd_outcome":"$pd_outcome",'
        '"pd_failed_stage":"$pd_failed_stage",'
        '"prefill_status":"$pd_prefill_status",'
        '"prefill_addr":"$pd_prefill_addr",'
        '"prefill_time":"$pd_prefill_time",'
        '"pd_gap_time":"$pd_gap_time",'
        '"ttft":"$pd_ttft",'
        '"tpot":"$pd_tpot",'
        '"e2e":"$pd_e2e",'
        '"prompt_tokens":"$pd_prompt_tokens",'
        '"completion_tokens":"$pd_completion_tokens",'
EOF
        fi
        cat <<'EOF'
        '"connection":"$connection",'
        '"connection_requests":"$connection_requests"'
EOF
        cat <<EOF
        '}';
    access_log $access_log pdgate_json$access_buffer;
EOF
    fi
    cat <<EOF

    server {
        listen $listen reuseport;

EOF
    if [ "$ENGINE" = vllm ]; then
        cat <<'EOF'
        # Bodies sent to an engine outside the P/D flow lose the keys only the
        # proxy may set (kv_transfer_params, bootstrap_*, …), whatever the route.
        pd_strip_reserved on;

EOF
        completions_vllm
    else
        completions_sglang
    fi
    cat <<'EOF'

        # The JSON error answers of the completions location. error_page
        # (without "=") keeps the error's status, which replaces the 500 of
        # `return`; set_request_id gives an id to requests refused before
        # the completions location ran its own (a 413).
        location @pd_error {
            set_request_id on;
            default_type application/json;
            add_header X-Request-Id $http_x_request_id always;
            add_header Allow $pd_error_allow always;
            return 500 $pd_error_json;
        }
EOF
    cat <<EOF

        # Everything else under /v1: GETs (/v1/models, …) are answered by a
        # prefill server; any other POST is no route of this proxy (404 JSON),
        # so no body reaches an engine around the P/D flow.
        location /v1 {
            if (\$request_method = POST) {
                return 404;
            }
            error_page 404 @pd_error;
            proxy_pass http://prefill_servers;
        }
EOF
    if [ ${#METRICS[@]} -gt 0 ]; then
        cat <<EOF

        location /metrics {
            proxy_pass http://metrics_servers;
        }
EOF
    fi
    if [ -n "$METRICS_SIZE" ]; then
        cat <<EOF

        # P/D metrics of all workers, Prometheus text (the original's path);
        # local clients only, plus --metrics-allow.
        location = /internal/metrics {
            allow 127.0.0.1;
            allow ::1;
EOF
        for n in "${METRICS_ALLOWS[@]}"; do
            echo "            allow $n;"
        done
        cat <<EOF
            deny all;
            pd_metrics;
        }
EOF
    fi
    if [ "$HEALTH" != off ]; then
        local pools="prefill_servers decode_servers"
        [ ${#ENCODE[@]} -eq 0 ] || pools+=" encode_servers"
        cat <<EOF

        # The proxy's readiness: 200 while every pool has an engine that
        # passes its health checks, else 503 JSON naming the pool.
        location = /health {
            pd_health_ready $pools;
        }

        # Each engine's health and the worker that probes; local clients only.
        location = /internal/health {
            allow 127.0.0.1;
            allow ::1;
            deny all;
            pd_health_status;
        }
EOF
    fi
    cat <<EOF

        location / {
            error_page 404 @pd_error;
            return 404;
        }
    }
}
EOF
}

# The end of the completions location in both modes: POST only, every
# answer with the request's X-Request-Id (an engine's echo of it replaced by
# the same id), nginx's own errors as JSON from @pd_error (status kept).
completions_errors() {
    cat <<'EOF'
            # POST only; X-Request-Id on every answer; errors as JSON (@pd_error).
            if ($request_method != POST) {
                return 405;
            }
            error_page 405 413 429 500 502 503 504 @pd_error;
            proxy_hide_header X-Request-Id;
            add_header X-Request-Id $http_x_request_id always;
EOF
}

# The completions location and its internal locations, vLLM's P/D flow
# (prefill module): [encoder stage,] prefill, then this location's decode.
completions_vllm() {
    # Each prefill server once, at most 3 (a leg's retries stay bounded).
    local PREFILL_TRIES=${#PREFILL[@]}
    [ "$PREFILL_TRIES" -le 3 ] || PREFILL_TRIES=3
    if [ -n "$ENCODE_LIST" ]; then
        cat <<EOF
        # Chat and text completions: each media item to the encoders first
        # (/encode_internal below, all at once), then the prefill
        # (/prefill_internal below), then this location's proxy_pass sends
        # the decode request.
EOF
    else
        cat <<EOF
        # Chat and text completions: prefill first (the internal location
        # below), then this location's proxy_pass sends the decode request.
EOF
    fi
    cat <<EOF
        location ~ ^/v1(/chat)?/completions\$ {
            set_request_id on;
            set_trace_headers_force off;
EOF
    [ "$STREAM_OPS" = off ] || echo "            stream_ops $STREAM_OPS;"
    [ "$FALLBACK" = off ] || echo "            prefill_fallback decode;   # a failed prefill: the decode computes the prompt"
    hold_line pd_hold
    tokenizer_line pd_tokenizer
    [ -z "$ENCODE_LIST" ] || echo "            prefill_encode /encode_internal;"
    echo "            prefill /prefill_internal;"
    cat <<EOF
            proxy_pass http://decode_servers;
            proxy_buffering off;        # stream tokens as they come
EOF
    completions_errors
    cat <<EOF
        }

EOF
    if [ -n "$ENCODE_LIST" ]; then
        cat <<EOF
        # One request per media item; only its status is used (the encoder
        # hands the embedding to the prefill through its cache).
        location /encode_internal/ {
            internal;
            rewrite ^/encode_internal(/.*)\$ \$1 break;
            proxy_pass http://encode_servers;
            proxy_read_timeout 600s;            # a large image or long audio clip
            subrequest_output_buffer_size 16k;  # the answer is not used
            client_max_body_size 0;             # checked on the client's body; this leg adds keys
        }

EOF
    fi
    cat <<EOF
        location /prefill_internal/ {
            internal;
            rewrite ^/prefill_internal(/.*)\$ \$1 break;
            proxy_pass http://prefill_servers;
            # A prefill has no side effect worth protecting: one that fails
            # before answering (refused, reset, timed out) is sent to another
            # prefill server, POST included (non_idempotent), a bounded
            # number of times.
            proxy_next_upstream error timeout non_idempotent;
            proxy_next_upstream_tries $PREFILL_TRIES;
            proxy_next_upstream_timeout 30s;
            subrequest_output_buffer_size 2m;   # the prefill answer, read in memory
            client_max_body_size 0;             # checked on the client's body; this leg adds keys
        }
EOF
}

# hold_line DIRECTIVE: the completions location's holding, when on.
hold_line() {
    [ "$HOLD" = on ] || return 0
    echo "            # Wait in the proxy while every prefill or every decode server has"
    echo "            # its max-num-seqs requests; the first to free takes the oldest."
    local order=""
    [ "$HOLD_ORDER" = fifo ] || order=" order=$HOLD_ORDER"
    echo "            $1 prefill=prefill_servers:$PREFILL_MAX_SEQS decode=decode_servers:$DECODE_MAX_SEQS queue=$HOLD_QUEUE timeout=$HOLD_TIMEOUT status=$HOLD_STATUS$order;"
}

# tokenizer_line DIRECTIVE: the completions location's tokenizer, when given.
tokenizer_line() {
    [ -n "$TOKENIZER" ] || return 0
    echo "            # Prompts in the model's tokens (its tokenizer and chat template):"
    echo "            # their lengths for the balancers, their blocks' keys for prefix routing."
    echo "            $1 $TOKENIZER${TOKENIZER_PARAMS:+ $TOKENIZER_PARAMS};"
}

# The same for SGLang's bootstrap P/D (prefill_refactor): the module chooses
# the prefill server (its host and bootstrap port go into both bodies, with
# a room), and both legs run at once.
completions_sglang() {
    local plist ports=""
    plist=$(IFS=,; printf '%s' "${PREFILL[*]}")
    [ ${#BOOTSTRAP[@]} -eq 0 ] || ports=$(IFS=,; printf '%s' "${BOOTSTRAP[*]}")
    cat <<EOF
        # Chat and text completions, SGLang bootstrap mode: prefill_refactor
        # chooses the prefill server (fewest requests in flight, all workers)
        # and adds its bootstrap_host and bootstrap_port and a bootstrap_room
        # to the body; the prefill (/prefill_internal below) and the decode
        # (this location's proxy_pass) are sent at once.
        location ~ ^/v1(/chat)?/completions\$ {
            set_request_id on;
            set_trace_headers_force off;
            prefill_refactor /prefill_internal;
EOF
    if [ -n "$KV_EVENTS_ON" ]; then
        local boot=""
        [ ${#BOOTSTRAP[@]} -le 1 ] || { boot=" bootstrap=prefill_bootstrap"; ports=""; }
        echo "            # The prefill servers are prefill_servers' peers, chosen where the"
        echo "            # engines' KV events say the prompt is cached, weighed against load."
        echo "            prefill_servers_upstream prefill_servers$boot;"
    else
        echo "            prefill_servers_list $plist;"
    fi
    if [ -n "$ports" ]; then
        echo "            bootstrap_ports_list $ports;"
    elif [ ${#BOOTSTRAP[@]} -eq 0 ]; then
        echo "            # bootstrap port: the module's default, 8998, on every prefill server"
    fi
    [ -z "$SGLANG_BALANCE" ] || echo "            prefill_refactor_balance $SGLANG_BALANCE;"
    [ "$HEALTH" = off ] || echo "            prefill_refactor_health prefill_servers;   # its health checks pick the prefill too"
    hold_line prefill_refactor_hold
    tokenizer_line prefill_refactor_tokenizer
    cat <<EOF
            pd_backend sglang;
            pd_distribution pd_together;
            proxy_pass http://decode_servers;
            proxy_buffering off;        # stream tokens as they come
EOF
    completions_errors
    cat <<EOF
        }

        location /prefill_internal/ {
            internal;
            rewrite ^/prefill_internal(/.*)\$ \$1 break;
            proxy_pass http://\$prefill_server;         # prefill_refactor's choice
            subrequest_output_buffer_size 64k;  # the answer is only checked
            client_max_body_size 0;             # checked on the client's body; this leg adds keys
        }
EOF
}

# --- files and processes ----------------------------------------------------

# The configuration's name without directory and .conf: names the pid file.
conf_name() {
    local n
    n=$(basename "$CONF_FILE")
    printf '%s\n' "${n%.conf}"
}

# The pid file a configuration file names (empty when none).
conf_pid_file() {
    [ -f "$1" ] || return 0
    sed -n 's/^[[:space:]]*pid[[:space:]]\{1,\}\([^;[:space:]]*\)[[:space:]]*;.*/\1/p' "$1" | head -n 1
}

# running_pid CONF: the pid of the nginx master started from CONF, from the
# pid file CONF names, when that process is alive and is an nginx master
# whose command line names CONF. Never looks at any other process.
running_pid() {
    local conf=$1 pid_file pid cmdline
    pid_file=$(conf_pid_file "$conf")
    [ -n "$pid_file" ] && [ -s "$pid_file" ] || return 1
    pid=$(head -c 32 "$pid_file" | tr -dc 0-9)
    [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null || return 1
    cmdline=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null) || return 1
    [[ $cmdline == *"nginx: master process"* && $cmdline == *" -c $conf"* ]] || return 1
    printf '%s\n' "$pid"
}

# Stop the nginx of CONF_FILE: graceful (QUIT), then fast (TERM).
stop_nginx() {
    local pid sig waited
    if ! pid=$(running_pid "$CONF_FILE"); then
        say "no nginx is running from $CONF_FILE"
        return 0
    fi
    for sig in QUIT TERM; do
        kill -s "$sig" "$pid" 2> /dev/null || true
        for ((waited = 0; waited < 100; waited++)); do
            kill -0 "$pid" 2> /dev/null || { say "stopped nginx $pid ($CONF_FILE)"; return 0; }
            sleep 0.1
        done
    done
    fail "nginx $pid ($CONF_FILE) is still running after QUIT and TERM"
}

rollback() {
    local backup="${CONF_FILE}_bak"
    [ -f "$backup" ] || fail "--rollback: no backup $backup (the file did not exist before this script first wrote it)"
    stop_nginx
    cp -p "$backup" "$CONF_FILE"
    say "restored $CONF_FILE from $backup"
}

# same_content CONTENT: whether CONF_FILE already holds exactly CONTENT.
same_content() {
    [ -f "$CONF_FILE" ] && [ "$(cat "$CONF_FILE"; printf x)" = "${1}x" ]
}

# stage_conf CONTENT: write CONTENT next to CONF_FILE; prints that path.
stage_conf() {
    local tmp
    mkdir -p "$(dirname "$CONF_FILE")"
    tmp=$(mktemp "$CONF_FILE.XXXXXX")
    printf '%s' "$1" > "$tmp"
    chmod 644 "$tmp"
    printf '%s\n' "$tmp"
}

# install_conf STAGED: move STAGED over CONF_FILE, keeping the first file it
# replaces as FILE_bak (later runs never overwrite that backup).
install_conf() {
    if [ -f "$CONF_FILE" ] && [ ! -e "${CONF_FILE}_bak" ]; then
        cp -p "$CONF_FILE" "${CONF_FILE}_bak"
        say "kept the previous $CONF_FILE as ${CONF_FILE}_bak"
    fi
    mv -f "$1" "$CONF_FILE"
}

# nginx_test FILE: nginx -t on FILE (its paths are absolute, so a staged copy
# tests exactly what CONF_FILE will be); nginx's message and status 1 when
# it refuses.
nginx_test() {
    local out
    if ! out=$("$NGINX_BIN" -t -q -p "$PREFIX/" -c "$1" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
    [ -z "$out" ] || printf '%s\n' "$out" >&2
}

# start_or_reload CHANGED RUNNING_PID: reload the nginx already running from
# CONF_FILE when the file changed, else start one.
start_or_reload() {
    local changed=$1 pid=$2 waited
    if [ -n "$pid" ]; then
        if [ "$changed" = 0 ]; then
            say "nginx $pid is already running from $CONF_FILE (unchanged)"
        else
            kill -HUP "$pid"
            say "reloaded nginx $pid with $CONF_FILE"
        fi
        return 0
    fi
    "$NGINX_BIN" -p "$PREFIX/" -c "$CONF_FILE" || fail "nginx did not start (see $(error_log_of))"
    for ((waited = 0; waited < 50; waited++)); do
        if pid=$(running_pid "$CONF_FILE"); then
            say "started nginx $pid: $CONF_FILE, listening on ${LISTEN_ADDRESS:-*}:$LISTEN_PORT"
            [ "$HEALTH" = off ] || wait_ready
            return 0
        fi
        sleep 0.1
    done
    fail "nginx did not write its pid file $(conf_pid_file "$CONF_FILE") (see $(error_log_of))"
}

# ready_line: the status line and body of the proxy's GET /health (empty
# when nothing answers), over bash's /dev/tcp.
ready_line() {
    local host=${LISTEN_ADDRESS:-127.0.0.1} answer
    [ "$host" != "0.0.0.0" ] || host=127.0.0.1
    [ "$host" != "[::]" ] || host=::1
    host=${host#[}; host=${host%]}
    answer=$( { exec 3<>"/dev/tcp/$host/$LISTEN_PORT" \
        && printf 'GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3 \
        && timeout 2 cat <&3; } 2>/dev/null ) || true
    printf '%s\n' "$answer" | tr -d '\r' | sed -n '1p;$p'
}

# wait_ready: after a start, up to 3 s for every engine pool to have an
# engine that passed its health checks; says which it is.
wait_ready() {
    local i out
    for ((i = 0; i < 30; i++)); do
        out=$(ready_line)
        case $out in
            *" 200 "*) say "ready: every engine pool has a healthy engine (GET /health)"; return 0 ;;
        esac
        sleep 0.1
    done
    out=$(printf '%s\n' "$out" | sed -n 's/.*"message":"\([^"]*\)".*/\1/p')
    say "not ready yet: ${out:-/health does not answer}; nginx sends no request to an engine until its health checks pass (GET /health, /internal/health)"
}

error_log_of() { printf '%s\n' "${LOG_FILE:-$PREFIX/logs/error.log}"; }

# Directories nginx writes into: created here, readable by its workers.
make_runtime_dirs() {
    local d
    for d in "$PREFIX/logs" "$(dirname "$(error_log_of)")" \
        "$(dirname "${ACCESS_LOG:-$PREFIX/logs/access.log}")"; do
        [ -d "$d" ] || { mkdir -p "$d"; chmod 755 "$d"; }
    done
}

main() {
    parse_args "$@"
    check_path_value --nginx-conf-file "$CONF_FILE"
    check_path_value --prefix "$PREFIX"
    check_path_value --nginx-bin "$NGINX_BIN"
    check_path_value --modules-dir "$MODULES_DIR"
    check_path_value --log-file "$LOG_FILE"
    check_path_value --access-log-file "$ACCESS_LOG"
    check_path_value --tokenizer "$TOKENIZER"
    CONF_FILE=$(abs_path "$CONF_FILE")
    if [ "$STOP" = 1 ] || [ "$ROLLBACK" = 1 ]; then
        if [ "$ROLLBACK" = 1 ]; then rollback; else stop_nginx; fi
        return 0
    fi
    PREFIX=$(abs_path "$PREFIX")
    PREFIX=${PREFIX%/}
    MODULES_DIR=$(abs_path "$MODULES_DIR")
    NGINX_BIN=$(abs_path "$NGINX_BIN")
    [ -z "$LOG_FILE" ] || LOG_FILE=$(abs_path "$LOG_FILE")
    [ -z "$ACCESS_LOG" ] || [ "$ACCESS_LOG" = off ] || ACCESS_LOG=$(abs_path "$ACCESS_LOG")
    [ -z "$TOKENIZER" ] || TOKENIZER=$(abs_path "$TOKENIZER")
    TOKENIZER=${TOKENIZER%/}
    validate

    local content staged running
    content=$(render)$'\n'
    if same_content "$content"; then
        say "$CONF_FILE unchanged"
        [ "$DRY_RUN" = 1 ] && return 0
        running=$(running_pid "$CONF_FILE") || running=""
        if [ -z "$running" ]; then
            make_runtime_dirs
            nginx_test "$CONF_FILE" || fail "nginx -t refused $CONF_FILE (message above)"
        fi
        start_or_reload 0 "$running"
        return 0
    fi
    staged=$(stage_conf "$content")
    STAGED=$staged
    trap 'rm -f "$STAGED"' EXIT     # a no-op once it is moved into place
    if [ "$DRY_RUN" = 1 ]; then
        install_conf "$staged"
        say "wrote $CONF_FILE (dry run: not tested, nothing started)"
        return 0
    fi
    # The nginx running from the file as it is now, before it changes.
    running=$(running_pid "$CONF_FILE") || running=""
    make_runtime_dirs
    if ! nginx_test "$staged"; then
        mv -f "$staged" "$CONF_FILE.rejected"
        fail "nginx -t refused the new configuration (message above); it is $CONF_FILE.rejected, $CONF_FILE is unchanged"
    fi
    install_conf "$staged"
    say "wrote $CONF_FILE"
    start_or_reload 1 "$running"
}

main "$@"
