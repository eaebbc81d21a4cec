#!/usr/bin/env bash
# Build one cargo-fuzz target and run it for N seconds.
#   fuzz/run.sh <target> <seconds> [extra libFuzzer args...]
# Uses the nightly toolchain when rustup has one, else the default toolchain with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z flags). Installs cargo-fuzz when it is missing.
# Exit status: 0 when the run ended without a crash, non-zero otherwise (the crashing input
# is left in fuzz/artifacts/<target>/).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 <target> <seconds> [libFuzzer args...]" >&2
    exit 2
fi
target=$1
seconds=$2
shift 2
case $seconds in
    ''|*[!0-9]*) echo "seconds must be a whole number: $seconds" >&2; exit 2 ;;
esac

cd "$(dirname "$0")"
if [ ! -f "fuzz_targets/$target.rs" ]; then
    echo "no such target: $target (have: $(ls fuzz_targets | sed 's/\.rs$//' | tr '\n' ' '))" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

corpus="corpus/$target"
mkdir -p "$corpus"
seeds=()
if [ -d "seeds/$target" ]; then
    seeds=("seeds/$target")
fi

# One job on the shared machines; the rest of the arguments go to libFuzzer.
cargo "${toolchain[@]}" fuzz build "$target"
cargo "${toolchain[@]}" fuzz run "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 "$@"
