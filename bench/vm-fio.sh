#!/usr/bin/env bash
# fio in the guest against our storage device (the daemon, attached with
# vfio-user-pci) and against QEMU's built-in device of the same kind, on the same
# image, in the same TCG guest, alternating, in two host cache modes:
#
#   page cache:  ours by default          vs  QEMU cache=writeback (aio=threads)
#   direct:      ours --direct            vs  QEMU cache=none,aio=io_uring
#
# Each boot runs every job once, for a fixed time, with O_DIRECT in the guest
# (fio's io_uring engine, or libaio where the guest cannot do io_uring). Prints
# every run and a table of medians with the ratio ours / built-in (above 1:
# ours is faster). Needs root and the VM environment (ch-integration/vmm-env).
#
#   bash bench/vm-fio.sh [--kind virtio-blk|megasas] [--rounds N] [--runtime S]
#                        [--ramp S] [--modes page,direct] [--jobs LIST]
#                        [--size-mib N] [--dir DIR] [--aio MODE]
#                        [--builtin-page CACHE] [--builtin-direct CACHE]
#                        [--daemon-args "ARGS"]
#
# Defaults: virtio-blk, 5 rounds, 5 s per job after 1 s of ramp, both modes, the
# jobs randread-4k-qd1, randwrite-4k-qd1, randread-4k-qd32, randwrite-4k-qd32,
# read-1m-qd8, write-1m-qd8 (RW-BS-qdN), a 256 MiB image of random bytes in
# $TMPDIR (default /tmp; it must allow O_DIRECT), the daemon's default --aio.
# --builtin-page/--builtin-direct replace QEMU's cache options of a mode, e.g.
# writethrough and directsync to compare with a device that writes through
# (megasas with --daemon-args --write-through: each write durable on completion).
# --daemon-args adds options (split at spaces) to our daemon in both modes.
# megasas compares with QEMU's megasas + scsi-hd. A default run boots 20 guests
# and takes about 20 minutes; --rounds 1 --runtime 2 is a smoke run of a few.
# Nothing is pinned: QEMU's vCPU thread takes one CPU, and the device (our daemon,
# or QEMU's own I/O threads) whatever the scheduler gives it.
set -euo pipefail
cd "$(dirname "$0")/.."

kind=virtio-blk
rounds=5
runtime=5
ramp=1
modes=page,direct
jobs=randread-4k-qd1,randwrite-4k-qd1,randread-4k-qd32,randwrite-4k-qd32,read-1m-qd8,write-1m-qd8
size_mib=256
dir=${TMPDIR:-/tmp}
aio=
builtin_page=cache=writeback,aio=threads
builtin_direct=cache=none,aio=io_uring
daemon_args=
while (($#)); do
    case $1 in
        --kind) kind=$2 ;;
        --rounds) rounds=$2 ;;
        --runtime) runtime=$2 ;;
        --ramp) ramp=$2 ;;
        --modes) modes=$2 ;;
        --jobs) jobs=$2 ;;
        --size-mib) size_mib=$2 ;;
        --dir) dir=$2 ;;
        --aio) aio=$2 ;;
        --builtin-page) builtin_page=$2 ;;
        --builtin-direct) builtin_direct=$2 ;;
        --daemon-args) daemon_args=$2 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift 2
done
case $kind in
    virtio-blk | megasas) ;;
    *) echo "--kind must be virtio-blk or megasas" >&2; exit 2 ;;
esac

env_dir=$(bash ch-integration/vmm-env/setup.sh | tail -n 1)
cargo build --release -q -p ch-integration --bin vfio-user-device
daemon_bin=${CARGO_TARGET_DIR:-$(pwd)/target}/release/vfio-user-device

work=$(mktemp -d "$dir/vfu-bench-fio.XXXXXX")
daemon_pid=
cleanup() {
    [[ -n $daemon_pid ]] && kill "$daemon_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
img=$work/disk.img
head -c $((size_mib << 20)) /dev/urandom >"$img"
sync

# CPU time (user + system) of this shell's children that have exited, in ms.
children_cpu_ms() {
    # (times in a pipeline would run in a subshell, which has no children)
    times >"$work/times"
    awk 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); t += p[1] * 60000 + p[2] * 1000 }
        printf "%d\n", t
    }' "$work/times"
}

# run SIDE MODE: one boot; prints "JOB IOPS KiB/s LAT_us" lines
run() {
    local side=$1 mode=$2 out=$work/console
    local -a dev
    if [[ $side == ours ]]; then
        local -a opts=(--disk "$img")
        [[ $mode == direct ]] && opts+=(--direct)
        [[ -n $aio ]] && opts+=(--aio "$aio")
        local -a extra=()
        [[ -n $daemon_args ]] && read -ra extra <<<"$daemon_args" && opts+=("${extra[@]}")
        rm -f "$work/dev.sock"
        "$daemon_bin" "$kind" --socket "$work/dev.sock" "${opts[@]}" \
            >"$work/daemon.out" 2>"$work/daemon.err" &
        daemon_pid=$!
        while [[ ! -S $work/dev.sock ]]; do
            kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/daemon.err" >&2; exit 1; }
            sleep 0.05
        done
        head -n 1 "$work/daemon.out" | sed 's/^/  /' >&2
        dev=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$work/dev.sock\"}}")
    else
        local cache=$builtin_page
        [[ $mode == direct ]] && cache=$builtin_direct
        dev=(-drive "file=$img,if=none,id=d0,format=raw,$cache")
        if [[ $kind == virtio-blk ]]; then
            dev+=(-device virtio-blk-pci,drive=d0)
        else
            dev+=(-device megasas,id=hba -device scsi-hd,drive=d0,bus=hba.0)
        fi
    fi
    local before
    children_cpu_ms >"$work/before"
    before=$(<"$work/before")
    VMTEST_FIO=1 VMTEST_APPEND="vmtest=fio vt.timeout=1200 vt.jobs=$jobs vt.runtime=$runtime vt.ramp=$ramp" \
        timeout 1500 bash ch-integration/vmm-env/run-qemu.sh "$env_dir" -- "${dev[@]}" >"$out" 2>&1 || true
    children_cpu_ms >"$work/after"
    echo "  QEMU CPU over the boot ($side): $(($(<"$work/after") - before)) ms" >&2
    if [[ -n $daemon_pid ]]; then
        # The daemon's CPU time over the boot (utime + stime, in clock ticks),
        # to tell its share of a request from the transport's and QEMU's.
        if read -r -a st <"/proc/$daemon_pid/stat" 2>/dev/null; then
            echo "  daemon CPU over the boot: $(((st[13] + st[14]) * 1000 / $(getconf CLK_TCK))) ms" >&2
        fi
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
        daemon_pid=
    fi
    tr -d '\r' <"$out" >"$out.txt"
    if ! grep -q '^VMTEST-DONE rc=0' "$out.txt"; then
        grep -a '^VMTEST-' "$out.txt" >&2 || tail -n 20 "$out.txt" >&2
        echo "$side $mode: the guest run failed" >&2
        exit 1
    fi
    sed -n 's/^VMTEST-RESULT engine=//p' "$out.txt" >"$work/engine"
    sed -n 's/^VMTEST-RESULT job_\([^=]*\)=/\1 /p' "$out.txt"
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
began=$SECONDS
: >"$work/results"
echo "round mode side job IOPS KiB/s mean_lat_us"
for r in $(seq 1 "$rounds"); do
    for mode in ${modes//,/ }; do
        if ((r % 2)); then order="ours builtin"; else order="builtin ours"; fi
        for side in $order; do
            run "$side" "$mode" >"$work/lines"
            while read -r job iops bw lat; do
                echo "$r $mode $side $job $iops $bw $lat"
                echo "$mode $side $job $iops $bw" >>"$work/results"
            done <"$work/lines"
        done
    done
done

echo
echo "fio in the guest ($(cat "$work/engine"), O_DIRECT, ${runtime} s per job after ${ramp} s), $kind," \
    "our daemon vs QEMU's built-in device, $rounds round(s), $(nproc) CPUs," \
    "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)," \
    "load average $load_start at start, $(cut -d' ' -f1-3 /proc/loadavg) at end, $((SECONDS - began)) s"
echo
echo "| host cache | job | ours | built-in | ours / built-in |"
echo "|---|---|---:|---:|---:|"
for mode in ${modes//,/ }; do
    for job in ${jobs//,/ }; do
        # 4 KiB jobs in IOPS, larger blocks in MiB/s.
        if [[ $job == *-4k-* ]]; then col=4 unit=IOPS; else col=5 unit=MiB/s; fi
        o=$(awk -v m="$mode" -v j="$job" -v c="$col" '$1 == m && $2 == "ours" && $3 == j { print $c }' "$work/results" | median)
        b=$(awk -v m="$mode" -v j="$job" -v c="$col" '$1 == m && $2 == "builtin" && $3 == j { print $c }' "$work/results" | median)
        [[ -z $o || -z $b ]] && continue
        ours_page=${daemon_args:-default}
        what=$([[ $mode == page ]] && echo "page cache (ours $ours_page / $builtin_page)" ||
            echo "direct (ours --direct${daemon_args:+ $daemon_args} / $builtin_direct)")
        awk -v w="$what" -v j="$job" -v o="$o" -v b="$b" -v u="$unit" 'BEGIN {
            d = (u == "IOPS") ? 1 : 1024
            printf "| %s | %s | %.0f %s | %.0f %s | %.2f |\n", w, j, o / d, u, b / d, u, (b > 0) ? o / b : 0
        }'
    done
done
