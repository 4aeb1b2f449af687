#!/bin/sh
# Parse cost and peak RSS of the top-level JSON scanner per body shape and
# size, all in one run (each case in its own process so each peak is its own).
# Usage: scripts/bench-parse.sh [sizes in MB...]   (default: 1 10 60)
set -eu
cd "$(dirname "$0")/.."
cargo build --release -q -p pdgate-sim --bin parse-bench
sizes=${*:-1 10 60}
for mb in $sizes; do
    for shape in plain tiny escaped bounded-escaped deep; do
        target/release/parse-bench "$shape" "$mb"
    done
done
