#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), on stable Rust (nightly
# flags through RUSTC_BOOTSTRAP=1). Installs cargo-fuzz if it is missing. A crash,
# a panic, a leak, or an input that makes a decoder allocate over the memory limit
# fails the run, and the input is left in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build --dev
mkdir -p logs
for target in $(cargo fuzz list); do
    echo "== fuzz $target for ${secs}s"
    mkdir -p "corpus/$target"
    # -malloc_limit_mb: no single allocation over 64 MiB (frames are bounded far
    # below that); -rss_limit_mb: the whole process stays under 1 GiB.
    if ! cargo fuzz run --dev "$target" "corpus/$target" -- \
        -max_total_time="$secs" -malloc_limit_mb=64 -rss_limit_mb=1024 \
        -print_final_stats=1 > "logs/$target.log" 2>&1; then
        tail -n 60 "logs/$target.log" >&2
        echo "fuzz target $target failed: the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "stat::number_of_executed_units|^Done" "logs/$target.log" || true
done
echo "== fuzz ok"
