# scripts/lib/bench-backends.sh — sourced by the instant-backend benchmarks
# (bench-overhead.sh, bench-tail.sh): the backends' configuration and the
# helpers both scripts use.
#
# backends_conf "<prefill ports>" "<decode ports>" ["<SSE decode ports>"]
#   prints an nginx.conf for one backend nginx on CPU 1 answering fixed
#   vLLM-shaped answers at once: a chat completion with kv_transfer_params
#   (16 block ids) on the prefill ports; a chat completion on the decode
#   ports, or, under /stream/ there and at / on the SSE ports, three SSE
#   chunks and [DONE].
# chat_body <stream: true|false>   a 1,049-byte chat request
# wrk_lua <file> <stream>          a wrk script POSTing chat_body, whose
#                                  done() prints "pct <p> <microseconds>" for
#                                  p50 p90 p99 p99.9 and max
# median                           the median of the numbers on stdin
# servers "<ports>" / listens "<ports>"   nginx `server 127.0.0.1:P;` /
#                                  `listen 127.0.0.1:P;` for each port
# addr_list "<ports>"              127.0.0.1:P1,127.0.0.1:P2,… (generator lists)
# gp_round_robin <checkout> <dir> <port> <workers> "<prefill ports>" "<decode ports>" [flags…]
#                                  writes <dir>/nginx.conf with that checkout's
#                                  scripts/global_proxy.sh and dist/modules (this
#                                  checkout's nginx), round robin on both pools

servers() { for p in $1; do printf 'server 127.0.0.1:%s; ' "$p"; done; }
listens() { for p in $1; do printf 'listen 127.0.0.1:%s; ' "$p"; done; }
addr_list() { for p in $1; do printf '127.0.0.1:%s,' "$p"; done | sed 's/,$//'; }

gp_round_robin() {
    local co=$1 dir=$2 port=$3 workers=$4 pports=$5 dports=$6
    shift 6
    mkdir -p "$dir/logs"
    "$co/scripts/global_proxy.sh" --dry-run -f "$dir/nginx.conf" --prefix "$dir" \
        --nginx-bin "$ROOT/dist/sbin/nginx" --modules-dir "$co/dist/modules" \
        --listen-address 127.0.0.1 -p "$port" -c "$workers" -s 0 \
        --prefill-servers-list "$(addr_list "$pports")" --decode-servers-list "$(addr_list "$dports")" \
        --prefill-lb-sdk round_robin --decode-lb-sdk round_robin "$@" >/dev/null 2>&1
}
_bb_esc() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }

backends_conf() {
    local kv prefill decode ev sse
    kv='{"do_remote_prefill":true,"do_remote_decode":false,"remote_engine_id":"e0-1a2b","remote_block_ids":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16],"remote_host":"127.0.0.1","remote_port":5600,"tp_size":1}'
    prefill='{"id":"chatcmpl-0","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"A"},"finish_reason":"length"}],"usage":{"prompt_tokens":256,"completion_tokens":1,"total_tokens":257},"kv_transfer_params":'"$kv"'}'
    decode='{"id":"chatcmpl-0","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"A short answer."},"finish_reason":"stop"}],"usage":{"prompt_tokens":256,"completion_tokens":4,"total_tokens":260}}'
    ev='data: {"id":"chatcmpl-0","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
    sse="$ev$ev$ev"'data: [DONE]\n\n'
    cat <<CONF
worker_processes 1;
worker_cpu_affinity 10;
error_log logs/error.log error;
pid logs/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        $(listens "$1")
        location / { default_type application/json; return 200 "$(_bb_esc "$prefill")"; }
    }
    server {
        $(listens "$2")
        location / { default_type application/json; return 200 "$(_bb_esc "$decode")"; }
        location /stream/ { default_type text/event-stream; return 200 "$(printf '%s' "$sse" | sed 's/"/\\"/g')"; }
    }
$([ -z "${3:-}" ] || printf '    server {\n        %s\n        location / { default_type text/event-stream; return 200 "%s"; }\n    }' \
    "$(listens "$3")" "$(printf '%s' "$sse" | sed 's/"/\\"/g')")
}
CONF
}

chat_body() {
    local content
    content=$(head -c 900 /dev/zero | tr '\0' 'x')
    printf '{"model":"m","messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"%s"}],"max_tokens":64,"stream":%s,"temperature":0}' "$content" "$1"
}

wrk_lua() {
    cat > "$1" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$(chat_body "$2")'
function done(summary, latency, requests)
    for _, p in ipairs({50, 90, 99, 99.9}) do
        io.write(string.format("pct %g %d\n", p, latency:percentile(p)))
    end
    io.write(string.format("pct max %d\n", latency.max))
end
LUA
}

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
