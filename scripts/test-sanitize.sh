#!/usr/bin/env bash
# scripts/test-sanitize.sh — the Test::Nginx (.t) suites with nginx and every
# module under valgrind memcheck. Too slow for CI; run by hand (see the README,
# "Sanitizer run").
#
#   scripts/test-sanitize.sh                        every Test::Nginx tests/*.t
#   scripts/test-sanitize.sh tests/002-prefill-legs.t ...   only these
#
# Builds its own nginx and modules in target/sanitize (the release dist/ is
# not touched): nginx --with-debug and -DNGX_DEBUG_PALLOC=1, so every pool
# allocation is its own malloc() and valgrind sees use-after-free of pool
# memory; modules release-optimised without LTO, with line tables.
#
# Each nginx started by a test runs as
#   valgrind -q --leak-check=full --show-leak-kinds=definite
#            --errors-for-leak-kinds=definite --gen-suppressions=all
#            --suppressions=tests/valgrind.supp --log-file=... nginx
# (-q: a log file stays empty unless valgrind found something). Every memory
# error counts (invalid read/write/free, uninitialised values, mismatched
# free); of the leaks only "definitely lost" ones: the tests run nginx with
# master_process off, and on QUIT ngx_single_process_cycle() exits without
# closing the connections still open (the test client's keepalive ones, those
# to the mock backends), whose pools hang off the connection array nginx never
# frees. With NGX_DEBUG_PALLOC each of their allocations is its own block, all
# "possibly lost": hundreds per nginx, none ours to fix. Per .t file the
# logs go to target/sanitize/valgrind/<file>/; the script prints every
# non-empty one and exits 1 when there is any, or when a .t file fails.
#
# Environment: SANITIZE_OUT (where valgrind/ and servroot/ go, default
# target/sanitize; set it and TEST_NGINX_PORT to run two at once),
# TEST_NGINX_PORT (default 1984), TEST_NGINX_TIMEOUT (default 20:
# valgrind makes nginx far slower), VALGRIND_EXTRA (more valgrind options).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# shellcheck source=scripts/ensure-debs.sh
. "$ROOT/scripts/ensure-debs.sh"
ensure_debs valgrind libtest-base-perl libtext-diff-perl libtest-longstring-perl \
    libwww-perl libhttp-message-perl liburi-perl libclang-dev libpcre2-dev libssl-dev \
    zlib1g-dev pkg-config make gcc

# --- build -----------------------------------------------------------------
step "build nginx (--with-debug, NGX_DEBUG_PALLOC) and modules in target/sanitize"
export CARGO_TARGET_DIR="$ROOT/target/sanitize"
export NGX_CONFIGURE_ARGS="--with-debug"
export NGX_CFLAGS="-g -O1 -DNGX_DEBUG_PALLOC=1"
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
MODULES=$(sed -n 's/^MODULES="\(.*\)"/\1/p' build.sh)
pkgs=()
for m in $MODULES; do pkgs+=(-p "$m"); done
start=$(date +%s)
cargo build --release --locked "${pkgs[@]}" --message-format=json-render-diagnostics \
    > "$CARGO_TARGET_DIR.build.json"
out=$(grep '"reason":"build-script-executed"' "$CARGO_TARGET_DIR.build.json" \
    | grep '"package_id":"[^"]*nginx-sys' | sed 's/.*"out_dir":"\([^"]*\)".*/\1/' | tail -n1)
rm -f "$CARGO_TARGET_DIR.build.json"
NGINX="$out/objs/nginx"
[ -x "$NGINX" ] || { echo "test-sanitize.sh: nginx binary not found in $out/objs" >&2; exit 1; }
echo "built in $(( $(date +%s) - start ))s: $NGINX"

# --- run -------------------------------------------------------------------
if [ $# -eq 0 ]; then
    # Every Test::Nginx suite; 030-032 are plain Test::More scripts that run
    # dist/sbin/nginx (and global_proxy.sh) themselves, not the nginx here.
    for t in tests/*.t; do
        case "$t" in tests/03[0-2]-*) ;; *) set -- "$@" "$t" ;; esac
    done
fi
OUT="${SANITIZE_OUT:-$CARGO_TARGET_DIR}"
LOGS="$OUT/valgrind"
rm -rf "$LOGS"
mods=()
for m in $MODULES; do mods+=("$CARGO_TARGET_DIR/release/lib$m.so"); done
export TEST_NGINX_LOAD_MODULES="${mods[*]}"
export TEST_NGINX_SERVROOT="$OUT/servroot"
export TEST_NGINX_TIMEOUT="${TEST_NGINX_TIMEOUT:-20}"
export TEST_NGINX_SLEEP="${TEST_NGINX_SLEEP:-0.3}"

failed=()
dirty=()
run_start=$(date +%s)
for t in "$@"; do
    name=$(basename "$t" .t)
    mkdir -p "$LOGS/$name"
    step "$t under valgrind"
    # The runner splits TEST_NGINX_BINARY on spaces and runs it as the nginx
    # command (Util.pm, nginx_command), so valgrind wraps every nginx start,
    # and follows nginx's fork() into the daemon and its worker by itself.
    # shellcheck disable=SC2086 # VALGRIND_EXTRA is a list of options
    TEST_NGINX_BINARY="valgrind -q --leak-check=full --show-leak-kinds=definite \
--errors-for-leak-kinds=definite --gen-suppressions=all --num-callers=30 \
--suppressions=$ROOT/tests/valgrind.supp \
--log-file=$LOGS/$name/vg.%p.log ${VALGRIND_EXTRA:-} $NGINX" \
        prove -I tests/lib "$t" || failed+=("$t")
    for f in "$LOGS/$name"/vg.*.log; do
        [ -s "$f" ] || { rm -f "$f"; continue; }
        dirty+=("$f")
        printf '\n--- %s\n' "$f"
        cat "$f"
    done
done
secs=$(( $(date +%s) - run_start ))

step "summary"
echo "$# file(s) in ${secs}s"
echo "failed .t files: ${#failed[@]} ${failed[*]:-}"
echo "valgrind logs with findings: ${#dirty[@]}"
printf '  %s\n' "${dirty[@]:-}"
[ ${#failed[@]} -eq 0 ] && [ ${#dirty[@]} -eq 0 ]
