#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target in fuzz/ for SECONDS each, all at once (default 1200 s).
# Installs what is missing: cargo-fuzz into bench/.tools (not in git) and the nightly
# toolchain (minimal profile) only when none is installed. Prints one line per target:
# executions, corpus size, crashes. Exits non-zero when any target found a crash, a
# timeout or an out-of-memory input (the inputs are kept in fuzz/artifacts/run-*/).
#
#   bench/fuzz.sh [SECONDS]        e.g. bench/fuzz.sh 60 for a smoke run
#   FUZZ_TARGETS="config changes" bench/fuzz.sh 1200   a subset
set -euo pipefail

seconds=${1:-1200}
root=$(cd "$(dirname "$0")/.." && pwd)
tools=$root/bench/.tools
targets=(${FUZZ_TARGETS:-webhook config answer template changes})
export PATH=$tools/bin:$PATH

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --root "$tools"
fi

cd "$root/fuzz"
# No sanitizer: the crate forbids unsafe code, and ASan halves the executions; overflow
# checks and debug assertions stay on (cargo-fuzz's default).
cargo +nightly fuzz build -s none
bin=$root/fuzz/target/x86_64-unknown-linux-gnu/release
run=$root/fuzz/artifacts/run-$(date -u +%Y%m%dT%H%M%SZ)

pids=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "$run/$target"
    # -timeout: an input taking 10 s is a hang (a FIFO or device named as a secret file);
    # -rss_limit_mb: an input that makes the process grow past 2 GiB is a crash.
    "$bin/$target" "corpus/$target" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
        -print_final_stats=1 -artifact_prefix="$run/$target/" \
        >"$run/$target.log" 2>&1 &
    pids+=($!)
done
status=0
for index in "${!targets[@]}"; do
    wait "${pids[$index]}" || status=1
done

printf '%-9s %14s %8s %8s\n' target executions corpus crashes
for target in "${targets[@]}"; do
    executions=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$run/$target.log" | awk '{print $2}' | tail -1)
    corpus=$(find "corpus/$target" -type f | wc -l)
    crashes=$(find "$run/$target" -type f | wc -l)
    [ "$crashes" -eq 0 ] || status=1
    printf '%-9s %14s %8s %8s\n' "$target" "${executions:-?}" "$corpus" "$crashes"
done
echo "logs and any crashing inputs: $run"
exit "$status"
