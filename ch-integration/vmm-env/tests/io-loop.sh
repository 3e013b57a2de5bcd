# Keeps reading the disk with O_DIRECT, for tests that break the device under the guest
# (e.g. kill the vfio-user server). Every read is bounded by vt.io_timeout: a read that
# hangs is reported, not waited for.
# Parameters:
#   vt.dev=NAME (default vda)  vt.wait=SECS (default 15)
#   vt.seconds=SECS      how long to loop (default 60)
#   vt.io_timeout=SECS   per-read limit (default 10)
# Results:
#   io_ready=1           the first read succeeded (the host may now break the device)
#   io_ok=N              every 20 successful reads
#   io_error=<N> <message>   a read failed
#   io_hung=<N>          a read did not finish within vt.io_timeout (the test then ends)
#   io_reads=<N>         successful reads, at the end
. /tests/lib.sh

dev=${VT_DEV:-vda}
secs=$(num "${VT_SECONDS:-60}") || exit 1
io_to=$(num "${VT_IO_TIMEOUT:-10}") || exit 1
if ! wait_for "/sys/block/$dev/size" "${VT_WAIT:-15}" || ! wait_for "/dev/$dev" 5; then
    fail "block device $dev did not appear"
    exit 1
fi
sectors=$(cat "/sys/block/$dev/size")
blocks=$((sectors / 8))
[ "$blocks" -gt 0 ] || { fail "device too small"; exit 1; }

i=0
ok=0
end=$(($(cut -d. -f1 /proc/uptime) + secs))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    i=$((i + 1))
    blk=$(((i * 97) % blocks))
    dd if="/dev/$dev" of=/dev/null iflag=direct bs=4096 skip="$blk" count=1 2>/tmp/dd.err &
    pid=$!
    t=$((io_to * 10))
    while kill -0 "$pid" 2>/dev/null && [ "$t" -gt 0 ]; do
        t=$((t - 1))
        usleep 100000
    done
    if kill -0 "$pid" 2>/dev/null; then
        result io_hung "$i"
        result io_reads "$ok"
        exit 0
    fi
    if wait "$pid"; then
        ok=$((ok + 1))
        [ "$ok" = 1 ] && result io_ready 1
        [ $((ok % 20)) = 0 ] && result io_ok "$ok"
    else
        result io_error "$i $(grep -m1 'dd:' /tmp/dd.err || head -n1 /tmp/dd.err)"
        [ "$ok" = 0 ] && { fail "first read failed"; exit 1; }
    fi
    usleep 100000
done
result io_reads "$ok"
exit "$VMTEST_FAILED"
