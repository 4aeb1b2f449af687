#!/bin/sh
# Runs every cargo-fuzz target for SECONDS each (default 60) from the seed
# corpus in fuzz/corpus/<target>/ (new inputs go to a scratch copy, so the
# committed corpus stays small). Needs a nightly toolchain; installs
# cargo-fuzz when it is missing. Crashes land in fuzz/artifacts/<target>/.
# Usage: scripts/fuzz.sh [seconds-per-target] [target...]
# FUZZ_RUNS=N runs N inputs a target instead (no time limit).
set -eu
cd "$(dirname "$0")/.."
secs=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-json rewrite bootstrap encode prom health_status usage_scanner cached_tokens kv_events prompt}
rustup toolchain list 2>/dev/null | grep -q nightly || { echo "fuzz: no nightly toolchain" >&2; exit 1; }
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for t in $targets; do
    work=$(mktemp -d)
    cp fuzz/corpus/"$t"/* "$work"/
    echo "== $t, $secs s"
    if [ -n "${FUZZ_RUNS:-}" ]; then limit="-runs=$FUZZ_RUNS"; else limit="-max_total_time=$secs"; fi
    cargo +nightly fuzz run --release "$t" "$work" -- "$limit" -max_len=4096 2>&1 |
        grep -E "^(Done|#[0-9]+ +DONE)|ERROR|panicked|SUMMARY|Test unit written" || true
    rm -rf "$work"
    [ -z "$(ls fuzz/artifacts/"$t" 2>/dev/null)" ] || { echo "fuzz: $t found a crash" >&2; exit 1; }
done
