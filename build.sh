#!/usr/bin/env bash
# build.sh — build pdgate's nginx modules (and, by default, nginx itself) and
# the engine simulator and load generator, and stage them in dist/.
#
#   ./build.sh            nginx 1.28 from the source vendored in the ngx crate
#                         + every module, release; stages dist/
#   ./build.sh --debug    the same with nginx configured --with-debug
#                         (debug log lines); separate target dir
#   NGINX_SOURCE_DIR=/path/to/nginx-1.2x  [NGINX_BUILD_DIR=/path/objs] ./build.sh
#                         modules only, against an existing *configured*
#                         nginx or OpenResty tree (nginx >= 1.22); load them
#                         into the nginx built from that tree
#
# Installs missing Debian build dependencies with apt-get. Re-running after a
# code change only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

DEBUG=0
for arg in "$@"; do
    case "$arg" in
        --debug) DEBUG=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument \"$arg\" (see --help)" >&2; exit 2 ;;
    esac
done
[ "${PDGATE_DEBUG:-0}" = 1 ] && DEBUG=1

MODULES="ngx_http_prefill_module ngx_http_prefill_refactor_module ngx_http_set_request_id_module ngx_http_pdgate_echo_module ngx_http_upstream_least_total_load_module ngx_http_upstream_weighted_least_active_module ngx_http_upstream_auto_balance_controller_module ngx_http_upstream_prefill_score_balance_module ngx_http_upstream_greedy_timeout_module ngx_http_upstream_length_balance_module ngx_http_upstream_pd_score_balance_module ngx_http_upstream_prefix_cache_affinity_module ngx_http_dynamic_bucket_module ngx_http_upstream_pd_health_module ngx_http_upstream_earliest_start_module"

log() { printf '\033[1m[build]\033[0m %s\n' "$*"; }

# --- system packages -------------------------------------------------------
# shellcheck source=scripts/ensure-debs.sh
. "$ROOT/scripts/ensure-debs.sh"
ensure_debs libclang-dev libpcre2-dev libssl-dev zlib1g-dev pkg-config make gcc g++
command -v cargo >/dev/null || { echo "build.sh: cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

# --- cargo build -----------------------------------------------------------
features=()
external=0
if [ -n "${NGINX_SOURCE_DIR:-}${NGINX_BUILD_DIR:-}" ]; then
    external=1
    features=(--no-default-features)
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/external}"
    log "building modules against ${NGINX_BUILD_DIR:-$NGINX_SOURCE_DIR/objs}"
elif [ "$DEBUG" = 1 ]; then
    export NGX_CONFIGURE_ARGS="${NGX_CONFIGURE_ARGS:-} --with-debug"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/debug-nginx}"
    log "building nginx (--with-debug) and modules"
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    log "building nginx and modules"
fi
start=$(date +%s)
pkgs=(-p pdgate-sim)
for m in $MODULES; do pkgs+=(-p "$m"); done
cargo build --release --locked "${features[@]}" "${pkgs[@]}" --message-format=json-render-diagnostics \
    > "$CARGO_TARGET_DIR.build.json"
secs=$(( $(date +%s) - start ))

# --- stage dist/ -----------------------------------------------------------
DIST="$ROOT/dist"
mkdir -p "$DIST/modules" "$DIST/sbin" "$DIST/bin" "$DIST/conf" "$DIST/logs"
for m in $MODULES; do
    install -m 0755 "$CARGO_TARGET_DIR/release/lib$m.so" "$DIST/modules/$m.so"
done
BINS=""
for b in engine-sim pd-bench balance-bench; do
    if [ -x "$CARGO_TARGET_DIR/release/$b" ]; then
        install -m 0755 "$CARGO_TARGET_DIR/release/$b" "$DIST/bin/$b"
        BINS="$BINS $b"
    fi
done
# A small model (a BPE trained on the repository's own text, with a chat
# template) for pd_tokenizer's tests and demos: no model hub needed.
if [ -x "$DIST/bin/engine-sim" ]; then
    "$DIST/bin/engine-sim" --write-test-tokenizer "$DIST/share/test-model" >/dev/null
fi
if [ "$external" = 0 ]; then
    # The nginx binary nginx-sys built for this very build (its build script
    # reports its out dir).
    out=$(grep '"reason":"build-script-executed"' "$CARGO_TARGET_DIR.build.json" \
        | grep '"package_id":"[^"]*nginx-sys' | sed 's/.*"out_dir":"\([^"]*\)".*/\1/' | tail -n1)
    [ -x "$out/objs/nginx" ] || { echo "build.sh: nginx binary not found in $out/objs" >&2; exit 1; }
    install -m 0755 "$out/objs/nginx" "$DIST/sbin/nginx"
    # Sample configuration: the self-contained demo, with absolute module paths.
    sed "s|@DIST@|$DIST|g" "$ROOT/nginx-conf/pdgate-demo.conf" > "$DIST/conf/nginx.conf"
    # Every other sample too (tests/032-nginx-conf-samples.t checks them all).
    for c in "$ROOT"/nginx-conf/*.conf; do
        c=$(basename "$c" .conf)
        [ "$c" = pdgate-demo ] && continue
        sed "s|@DIST@|$DIST|g" "$ROOT/nginx-conf/$c.conf" > "$DIST/conf/$c.conf"
    done
    for c in pdgate-vllm pdgate-2p2d; do
        "$DIST/sbin/nginx" -p "$DIST" -c "conf/$c.conf" -t -q
    done
    "$DIST/sbin/nginx" -p "$DIST" -c conf/nginx.conf -t -q
fi
rm -f "$CARGO_TARGET_DIR.build.json"

log "built in ${secs}s"
[ "$external" = 0 ] && log "nginx:   $DIST/sbin/nginx ($("$DIST/sbin/nginx" -v 2>&1 | sed 's/.*: //'))"
for m in $MODULES; do
    log "module:  $DIST/modules/$m.so ($(du -k "$DIST/modules/$m.so" | cut -f1) KiB)"
done
for b in $BINS; do log "tool:    $DIST/bin/$b"; done
[ "$external" = 0 ] && log "config:  $DIST/conf/nginx.conf (run: $DIST/sbin/nginx -p $DIST -c conf/nginx.conf)"
exit 0
