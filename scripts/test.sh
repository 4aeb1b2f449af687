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
. scripts/ensure-debs.sh
ensure_debs libtest-base-perl libtext-diff-perl libtest-longstring-perl libwww-perl \
    libhttp-message-perl liburi-perl shellcheck

if [ $# -eq 0 ]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check

    step "shellcheck scripts/global_proxy.sh"
    shellcheck scripts/global_proxy.sh

    step "build (nginx + modules, release) and stage dist/"
    ./build.sh

    step "cargo clippy -D warnings"
    cargo clippy --release --locked --workspace --all-targets -- -D warnings

    step "unit tests and end-to-end tests (core, simulator + nginx)"
    cargo test --locked -p pdgate-core -p pdgate-sim

    # The seed corpus always replays through core's fuzzcheck test (above);
    # the fuzzers themselves need nightly + cargo-fuzz, so only when present.
    if rustup toolchain list 2>/dev/null | grep -q nightly && command -v cargo-fuzz >/dev/null; then
        step "fuzz smoke (15 s a target)"
        scripts/fuzz.sh 15
    fi

    set -- tests/*.t tests/selftest/*.t
else
    step "build (nginx + modules, release) and stage dist/"
    ./build.sh
fi

step "Test::Nginx suites"
export TEST_NGINX_BINARY="$ROOT/dist/sbin/nginx"
TEST_NGINX_LOAD_MODULES=$(echo "$ROOT"/dist/modules/*.so)
export TEST_NGINX_LOAD_MODULES
export TEST_NGINX_SERVROOT="$ROOT/t/servroot"
prove -I tests/lib "$@"
