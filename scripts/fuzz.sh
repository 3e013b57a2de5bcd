#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 60) on the
# stable toolchain, after replaying the regression inputs of
# fuzz/regressions/<target>/. Exits non-zero on any crash, leak, timeout or
# out-of-memory; crashing inputs are left in fuzz/artifacts/<target>/.
#
#   bash scripts/fuzz.sh [SECONDS]
#
# Environment:
#   FUZZ_JOBS     targets run at once (default: 2, or 1 on a 1-core machine)
#   FUZZ_TARGETS  space-separated subset of targets (default: all)
#   FUZZ_KEEP     directory to keep the inputs found (default: a temporary
#                 directory, deleted at the end); fuzz/corpus is only read
#
# cargo-fuzz and libfuzzer-sys use nightly-only flags (-Zsanitizer=address,
# -Zsanitizer coverage options); RUSTC_BOOTSTRAP=1 lets the stable rustc
# accept them. Needs a C++ compiler for libFuzzer (g++ is installed with
# apt-get when missing and running as root).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${1:-60}
case "$seconds" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS]" >&2
    exit 2
    ;;
esac

export RUSTC_BOOTSTRAP=1

# A C++ toolchain for libFuzzer (built by libfuzzer-sys's build script).
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "fuzz.sh: need a C++ compiler (g++); run as root to install it" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ make >/dev/null
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

all_targets="wire_decode server_stream virtio_blk_queue virtio_net_queue pci_config megasas_frames scsi_cdb"
targets=${FUZZ_TARGETS:-$all_targets}
jobs=${FUZZ_JOBS:-$(($(nproc) >= 2 ? 2 : 1))}

cd fuzz
echo "fuzz.sh: building ($(cargo fuzz --version), $(rustc --version))"
cargo fuzz build
# Run the binaries just built (what `cargo fuzz run` would run, without
# building again before each run).
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="${CARGO_TARGET_DIR:-$root/fuzz/target}/$host/release"

if [ -n "${FUZZ_KEEP:-}" ]; then
    work=$(mkdir -p "$FUZZ_KEEP" && cd "$FUZZ_KEEP" && pwd)
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work/logs"

fuzz_args=(-rss_limit_mb=2048 -timeout=10)
status=0

# Regressions: every input that once crashed must run cleanly.
for t in $targets; do
    dir="$root/fuzz/regressions/$t"
    [ -d "$dir" ] || continue
    files=("$dir"/*)
    [ -e "${files[0]}" ] || continue
    mkdir -p "$root/fuzz/artifacts/$t"
    if "$bin_dir/$t" -artifact_prefix="$root/fuzz/artifacts/$t/" "${fuzz_args[@]}" \
        "${files[@]}" >"$work/logs/$t.regressions.log" 2>&1; then
        echo "$t: ${#files[@]} regression input(s) pass"
    else
        echo "$t: REGRESSION FAILED" >&2
        tail -n 40 "$work/logs/$t.regressions.log" >&2
        status=1
    fi
done

run_target() {
    local t=$1 rc=0
    mkdir -p "$work/$t"
    # New inputs go to the work directory; fuzz/corpus/$t is only read.
    mkdir -p "$root/fuzz/artifacts/$t"
    "$bin_dir/$t" -artifact_prefix="$root/fuzz/artifacts/$t/" "${fuzz_args[@]}" \
        -max_total_time="$seconds" -print_final_stats=1 \
        "$work/$t" "$root/fuzz/corpus/$t" >"$work/logs/$t.log" 2>&1 || rc=$?
    echo "$rc" >"$work/logs/$t.rc"
}

for t in $targets; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        sleep 1
    done
    echo "fuzz.sh: $t for ${seconds}s"
    run_target "$t" &
done
wait

for t in $targets; do
    log="$work/logs/$t.log"
    rc=$(cat "$work/logs/$t.rc" 2>/dev/null || echo 1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
    if [ "$rc" -ne 0 ]; then
        echo "$t: FAILED (exit $rc); inputs in fuzz/artifacts/$t/" >&2
        grep -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY|Test unit written' "$log" >&2 || true
        tail -n 60 "$log" >&2
        status=1
    else
        echo "$t: ${done_line:-no final stats} (${runs:-?} execs)"
    fi
done

if [ "$status" -ne 0 ]; then
    echo "fuzz.sh: FAILED" >&2
else
    echo "fuzz.sh: all targets ran ${seconds}s without a crash"
fi
exit "$status"
