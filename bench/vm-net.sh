#!/usr/bin/env bash
# In-guest virtio-net throughput and ping latency: our device (the daemon,
# attached with vfio-user-pci) beside QEMU's built-in virtio-net-pci
# (-netdev tap,vhost=off), on the same TAP, the same guest and the same TCG
# settings, alternating, ROUNDS rounds each; prints every run and the
# medians. Needs root and the VM environment (ch-integration/vmm-env).
#
#   bash bench/vm-net.sh [ROUNDS] [MIB]      (defaults 5 and 16)
#
# Everything runs in a network namespace made here and removed at the end;
# traffic goes only to addresses inside it. QEMU is pinned to CPU 0, the
# daemon to CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
mib=${2:-16}
bytes=$((mib << 20))

env_dir=$(bash ch-integration/vmm-env/setup.sh | tail -n 1)
busybox=$env_dir/rootfs/usr/bin/busybox
cargo build --release -q -p ch-integration --bin vfio-user-device
daemon_bin=$(pwd)/target/release/vfio-user-device

ns=vfu-bench-$$
work=$(mktemp -d /tmp/vfu-bench-net.XXXXXX)
cleanup() {
    pkill -f "$work/net.sock" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$ns"
ip -n "$ns" link set lo up
ip netns exec "$ns" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip -n "$ns" tuntap add dev vtap0 mode tap
ip -n "$ns" addr add 10.77.0.1/24 dev vtap0
ip -n "$ns" link set vtap0 up
head -c "$bytes" /dev/urandom > "$work/to-guest.bin"

mac=52:54:00:77:00:02
append="vmtest=net vt.timeout=300 vt.ip=10.77.0.2/24 vt.peer=10.77.0.1 vt.bytes=$bytes vt.pings=${PINGS:-10}"

# run MODE: one boot; prints "ping_ms rx_MBps tx_MBps"
run() {
    local mode=$1 out=$work/console.$1 qemu_pid listener daemon_pid=
    # Waits and kills of our own children fail by design.
    set +e
    local -a dev
    if [[ $mode == ours ]]; then
        ip netns exec "$ns" taskset -c 1 "$daemon_bin" virtio-net --tap vtap0 --mac "$mac" \
            --socket "$work/net.sock" > "$work/daemon.out" 2> "$work/daemon.err" &
        daemon_pid=$!
        while [[ ! -S $work/net.sock ]]; do sleep 0.05; done
        dev=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$work/net.sock\"}}")
    else
        dev=(-netdev tap,id=n0,ifname=vtap0,script=no,downscript=no,vhost=off
            -device "virtio-net-pci,netdev=n0,mac=$mac")
    fi
    # The guest sends to port 5002; nc's stdin stays open until it is done.
    ip netns exec "$ns" "$busybox" nc -l -p 5002 < <(sleep 600) > "$work/from-guest.bin" &
    listener=$!
    VMTEST_APPEND="$append" ip netns exec "$ns" taskset -c 0 \
        bash ch-integration/vmm-env/run-qemu.sh "$env_dir" -- "${dev[@]}" > "$out" 2>&1 &
    qemu_pid=$!
    until grep -q 'VMTEST-RESULT listening=' "$out"; do
        kill -0 "$qemu_pid" 2> /dev/null || { cat "$out" >&2; echo "QEMU died" >&2; exit 1; }
        sleep 0.2
    done
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        ip netns exec "$ns" "$busybox" nc 10.77.0.2 5001 < "$work/to-guest.bin" > /dev/null && break
        sleep 0.5
    done
    wait "$qemu_pid"
    wait "$listener" 2> /dev/null
    if [[ -n $daemon_pid ]]; then
        kill "$daemon_pid"
        wait "$daemon_pid"
    fi
    set -e
    local get
    get() { sed -n "s/^VMTEST-RESULT $1=\([^\r]*\).*/\1/p" "$out" | head -n 1; }
    [[ $(get rx_sha256) == $(sha256sum < "$work/to-guest.bin" | cut -d' ' -f1) ]] ||
        { echo "$mode: data to the guest corrupted" >&2; exit 1; }
    [[ $(get tx_sha256) == $(sha256sum < "$work/from-guest.bin" | cut -d' ' -f1) ]] ||
        { echo "$mode: data from the guest corrupted" >&2; exit 1; }
    echo "$mode ping times: $(get ping_times)" >&2
    awk -v p="$(get ping_avg_ms)" -v rx="$(get rx_cs)" -v tx="$(get tx_cs)" -v b="$bytes" \
        'BEGIN { printf "%s %.2f %.2f\n", p, b / 1048576 / (rx / 100), b / 1048576 / (tx / 100) }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

echo "round mode ping_ms to_guest_MiB/s from_guest_MiB/s ($mib MiB each way)"
: > "$work/results"
for r in $(seq 1 "$rounds"); do
    for mode in ours builtin; do
        run "$mode" > "$work/line"
        echo "$r $mode $(cat "$work/line")"
        echo "$mode $(cat "$work/line")" >> "$work/results"
    done
done
echo "medians over $rounds rounds:"
for mode in ours builtin; do
    for col in 2 3 4; do
        grep "^$mode " "$work/results" | cut -d' ' -f"$col" | median
    done | paste -sd' ' | sed "s/^/$mode /"
done
