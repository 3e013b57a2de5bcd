# virtio-net check: the interface, ping, and data both ways through nc,
# against a host in a network namespace the test made.
# Parameters (kernel command line, all optional):
#   vt.ip=CIDR        the guest's address (default 10.77.0.2/24)
#   vt.peer=IP        the host's address on the TAP (default 10.77.0.1)
#   vt.bytes=N        bytes to send each way (default 4194304)
#   vt.wait=SECS      how long to wait for the interface (default 15)
#   vt.pings=N        pings sent (default 3)
#   vt.flap=1         after the first ping, say flap_ready=1 and wait for
#                     the link to go down and come back (the host flaps
#                     the TAP), then ping again
#   vt.hold=1         at the end, wait (for a reset from the host) instead
#                     of powering off
# The host sends vt.bytes to port 5001 once listening=5001 is printed, and
# listens on port 5002 for the guest's data.
# Results:
#   iface=<name> mac=<address> mtu=<N> features=<bits, bit 0 first>
#   rx_queues=<N> (receive queues the driver uses)
#   carrier=1 ping_rc=<rc> ping_avg_ms=<avg> ping_times=<ms ms ...>
#   listening=5001 rx_bytes=<N> rx_sha256=<hex> rx_cs=<centiseconds>
#   flap_ready=1 link_down_seen=1 link_up_seen=1 ping2_rc=<rc>  (vt.flap)
#   tx_sha256=<hex> tx_rc=<nc exit code> tx_cs=<centiseconds>
. /tests/lib.sh

ip_addr=${VT_IP:-10.77.0.2/24}
peer=${VT_PEER:-10.77.0.1}
bytes=${VT_BYTES:-4194304}
wait_s=${VT_WAIT:-15}

# centiseconds since boot
now_cs() {
    read -r up _ < /proc/uptime
    echo "${up%.*}${up#*.}" | sed 's/^0*//;s/^$/0/'
}

# wait_carrier 0|1 SECONDS
wait_carrier() {
    _n=$(($2 * 10))
    while [ "$(cat "/sys/class/net/$iface/carrier" 2>/dev/null)" != "$1" ]; do
        [ "$_n" -le 0 ] && return 1
        _n=$((_n - 1))
        usleep 100000
    done
}

iface=
n=$((wait_s * 10))
while [ -z "$iface" ] && [ "$n" -gt 0 ]; do
    for d in /sys/class/net/*; do
        drv=$(readlink "$d/device/driver" 2>/dev/null)
        [ "${drv##*/}" = virtio_net ] && { iface=${d##*/}; break; }
    done
    [ -n "$iface" ] || { usleep 100000; n=$((n - 1)); }
done
[ -n "$iface" ] || { fail "no virtio-net interface appeared"; ls /sys/class/net; exit 1; }
virtio=$(readlink "/sys/class/net/$iface/device")
result iface "$iface"
result mac "$(cat "/sys/class/net/$iface/address")"
result mtu "$(cat "/sys/class/net/$iface/mtu")"
result features "$(cat "/sys/bus/virtio/devices/${virtio##*/}/features")"
result rx_queues "$(ls -d "/sys/class/net/$iface/queues/rx-"* | wc -l)"

ip link set "$iface" up
ip addr add "$ip_addr" dev "$iface"
wait_carrier 1 10 || fail "no carrier"
result carrier "$(cat "/sys/class/net/$iface/carrier")"

ping_out=$(ping -c "${VT_PINGS:-3}" -W 5 "$peer" 2>&1)
rc=$?
result ping_rc "$rc"
[ "$rc" = 0 ] || { fail "ping $peer failed"; echo "$ping_out"; }
avg=$(echo "$ping_out" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
result ping_avg_ms "${avg:-none}"
result ping_times "$(echo "$ping_out" | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | tr '\n' ' ')"

# host -> guest: nc's stdin is a fifo kept open (a busybox nc whose stdin
# is at EOF stops after its first read); it ends when the host closes.
mkfifo /tmp/hold
sleep 600 > /tmp/hold &
holder=$!
nc -l -p 5001 < /tmp/hold > /tmp/in &
listener=$!
# Listening once port 5001 (0x1389) is in state LISTEN (0A).
n=50
while ! grep -q ':1389 00000000:0000 0A' /proc/net/tcp && [ "$n" -gt 0 ]; do
    usleep 100000
    n=$((n - 1))
done
result listening 5001
t0=$(now_cs)
wait "$listener"
t1=$(now_cs)
result rx_bytes "$(wc -c < /tmp/in)"
result rx_sha256 "$(sha256 /tmp/in)"
result rx_cs $((t1 - t0))
rm -f /tmp/in

if [ "${VT_FLAP:-0}" = 1 ]; then
    result flap_ready 1
    wait_carrier 0 30 && result link_down_seen 1 || fail "the link never went down"
    wait_carrier 1 30 && result link_up_seen 1 || fail "the link never came back"
    ping -c 3 -W 5 "$peer" > /dev/null 2>&1
    rc=$?
    result ping2_rc "$rc"
    [ "$rc" = 0 ] || fail "no ping after the link came back"
fi

# guest -> host
dd if=/dev/urandom of=/tmp/out bs=65536 count=$((bytes / 65536)) 2> /dev/null
result tx_sha256 "$(sha256 /tmp/out)"
t0=$(now_cs)
tries=0
while :; do
    nc "$peer" 5002 < /tmp/out
    rc=$?
    [ "$rc" = 0 ] || [ "$tries" -ge 20 ] && break
    tries=$((tries + 1))
    usleep 500000
done
t1=$(now_cs)
result tx_rc "$rc"
result tx_cs $((t1 - t0))
[ "$rc" = 0 ] || fail "sending to $peer failed"
kill "$holder" 2> /dev/null

if [ "${VT_HOLD:-0}" = 1 ]; then
    result holding 1
    sleep 600
fi
exit "$VMTEST_FAILED"
