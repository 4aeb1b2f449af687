#!/usr/bin/env bash
# scripts/test.sh — everything CI runs: formatting, lints, the core unit
# tests, the build, and the Test::Nginx (.t) suites against the built nginx.
# Installs what it needs (Debian packages) when missing.
#
#   scripts/test.sh            all of it
#   scripts/test.sh tests/002-prefill-legs.t   build, then only these .t files
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Perl modules the Test::Nginx-format runner (tests/lib) uses: all Debian's.
need=()
for p in libtest-base-perl libtext-diff-perl libtest-longstring-perl libwww-perl \
         libhttp-message-perl libipc-run-perl liburi-perl liblist-moreutils-perl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    step "installing ${need[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ $# -eq 0 ]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check

    step "build (nginx + modules, release) and stage dist/"
    ./build.sh

    step "cargo clippy -D warnings"
    cargo clippy --release --locked --workspace --all-targets -- -D warnings

    step "core unit tests"
    cargo test --locked -p pdgate-core -p pdgate-sim

    set -- tests/*.t tests/selftest/*.t
else
    step "build (nginx + modules, release) and stage dist/"
    ./build.sh
fi

step "Test::Nginx suites"
export TEST_NGINX_BINARY="$ROOT/dist/sbin/nginx"
export TEST_NGINX_LOAD_MODULES="$ROOT/dist/modules/ngx_http_set_request_id_module.so $ROOT/dist/modules/ngx_http_prefill_module.so $ROOT/dist/modules/ngx_http_pdgate_echo_module.so"
export TEST_NGINX_SERVROOT="$ROOT/t/servroot"
prove -I tests/lib "$@"
