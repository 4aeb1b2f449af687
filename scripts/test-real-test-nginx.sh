#!/usr/bin/env bash
# scripts/test-real-test-nginx.sh — run tests/*.t under OpenResty's own
# Test::Nginx (instead of the compatible runner in tests/lib), against the
# nginx and modules in dist/ (./build.sh first).
#
#   scripts/test-real-test-nginx.sh [FILE.t…]     default: tests/*.t
#
# Where Test::Nginx comes from, first found:
#   TEST_NGINX_LIB=/path/to/test-nginx/lib   a checkout of
#                 https://github.com/openresty/test-nginx (its lib/ directory)
#   an installed Test::Nginx::Socket (perl -MTest::Nginx::Socket -e1)
#   .test-nginx/ in this checkout, installed by cpanm (cpanm -L .test-nginx
#                 Test::Nginx) when cpanm is there and CPAN is reachable
# Otherwise it prints these ways and exits 2.
#
# Every module in dist/modules is loaded (tests/common/Pdgate/TestEnv.pm sets
# TEST_NGINX_BINARY and TEST_NGINX_LOAD_MODULES unless they are set), and the
# server root is a fresh temporary directory (Test::Nginx's default,
# t/servroot, has no t/ to live in here). Blocks that cannot run under
# TEST_NGINX_USE_HUP=1 carry "--- skip_eval: N: $ENV{TEST_NGINX_USE_HUP}",
# which both runners honour.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Test::Nginx's dependencies that tests/lib does not need.
. scripts/ensure-debs.sh
ensure_debs liblist-moreutils-perl libipc-run-perl libtest-base-perl libtest-longstring-perl libtext-diff-perl liburi-perl libhttp-message-perl libwww-perl

[ -x dist/sbin/nginx ] || { echo "test-real-test-nginx.sh: no dist/sbin/nginx: run ./build.sh first" >&2; exit 1; }

lib=""
if [ -n "${TEST_NGINX_LIB:-}" ]; then
    [ -f "$TEST_NGINX_LIB/Test/Nginx/Socket.pm" ] \
        || { echo "test-real-test-nginx.sh: TEST_NGINX_LIB=$TEST_NGINX_LIB has no Test/Nginx/Socket.pm" >&2; exit 2; }
    lib=$TEST_NGINX_LIB
elif perl -MTest::Nginx::Socket -e1 2>/dev/null; then
    lib=""    # installed system-wide
elif [ -f "$ROOT/.test-nginx/lib/perl5/Test/Nginx/Socket.pm" ]; then
    lib=$ROOT/.test-nginx/lib/perl5
elif command -v cpanm >/dev/null && cpanm -L "$ROOT/.test-nginx" --notest Test::Nginx; then
    lib=$ROOT/.test-nginx/lib/perl5
else
    cat >&2 <<'MSG'
test-real-test-nginx.sh: Test::Nginx not found. One of:
  git clone https://github.com/openresty/test-nginx /tmp/test-nginx
  TEST_NGINX_LIB=/tmp/test-nginx/lib scripts/test-real-test-nginx.sh
or (CPAN reachable)
  apt-get install cpanminus && cpanm -L .test-nginx Test::Nginx
  scripts/test-real-test-nginx.sh
MSG
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export TEST_NGINX_SERVROOT="$tmp/servroot"
[ $# -gt 0 ] || set -- tests/*.t
# Test::Nginx's own dependencies (Test::Base, Text::Diff, …) are Debian's,
# as for tests/lib; .test-nginx/lib/perl5 also holds cpanm's copies.
exec prove ${lib:+-I "$lib"} -I tests/common "$@"
