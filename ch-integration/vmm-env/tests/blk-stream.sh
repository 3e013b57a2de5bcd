# Writes random 64 KiB blocks with O_DIRECT and reads each back at once, checking
# its SHA-256, in a loop, for tests that change the vfio-user server under the
# guest (an upgrade of the daemon). At the end every block is read again and
# checked against its last write, and the kernel log is searched for what a
# stalled or lost device leaves there. Every write and read is bounded by
# vt.io_timeout: one that hangs is reported, not waited for.
# Parameters:
#   vt.dev=NAME (default vda)  vt.wait=SECS (default 15)
#   vt.seconds=SECS      how long to loop (default 60)
#   vt.blocks=N          blocks of 64 KiB written in turn (default 64)
#   vt.first=N           the first block (in 64 KiB units, default 16)
#   vt.io_timeout=SECS   per-command limit (default 10)
# Results:
#   io_ready=1                 the first block was written and verified
#   io_ok=N                    every 20 verified blocks
#   io_error=<N> <message>     a write or read failed
#   io_mismatch=<N> <block>    a block read back differs from what was written
#   io_hung=<N>                a command did not finish within vt.io_timeout (the loop ends)
#   writes=N                   blocks written and verified in the loop
#   final_checked=N, final_bad=N   blocks read again at the end, and those that differ
#   final_sha256=HEX           SHA-256 of the whole region (vt.blocks blocks from vt.first)
#   kernel_problems=N          new kernel log lines about timeouts, resets or I/O errors
#   kernel_problem=<line>      each of them (at most 20)
. /tests/lib.sh

dev=${VT_DEV:-vda}
secs=$(num "${VT_SECONDS:-60}") || exit 1
blocks=$(num "${VT_BLOCKS:-64}") || exit 1
first=$(num "${VT_FIRST:-16}") || exit 1
io_to=$(num "${VT_IO_TIMEOUT:-10}") || exit 1
if ! wait_for "/sys/block/$dev/size" "${VT_WAIT:-15}" || ! wait_for "/dev/$dev" 5; then
    fail "block device $dev did not appear"
    exit 1
fi
sectors=$(cat "/sys/block/$dev/size")
if [ $(((first + blocks) * 128)) -gt "$sectors" ]; then
    fail "device too small for $blocks blocks from block $first"
    exit 1
fi
dmesg > /tmp/dmesg.before
mkdir -p /tmp/sums

# bounded CMD...: runs CMD, at most io_to seconds; 0 = done, 1 = failed, 2 = hung.
bounded() {
    "$@" 2>/tmp/cmd.err &
    _pid=$!
    _t=$((io_to * 50))
    while kill -0 "$_pid" 2>/dev/null && [ "$_t" -gt 0 ]; do
        _t=$((_t - 1))
        usleep 20000
    done
    if kill -0 "$_pid" 2>/dev/null; then
        return 2
    fi
    wait "$_pid" || return 1
    return 0
}

# step RC N WHAT: reports a failed or hung command; returns 1 if the loop must end.
step() {
    case "$1" in
        0) return 0 ;;
        2) result io_hung "$2"; return 1 ;;
        *) result io_error "$2 $3: $(grep -m1 'dd:' /tmp/cmd.err || head -n1 /tmp/cmd.err)"
           fail "$3 failed"
           return 0 ;;
    esac
}

i=0
ok=0
end=$(($(cut -d. -f1 /proc/uptime) + secs))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    i=$((i + 1))
    blk=$((i % blocks))
    head -c 65536 /dev/urandom > /tmp/w
    sum=$(sha256 /tmp/w)
    bounded dd if=/tmp/w of="/dev/$dev" bs=65536 seek=$((first + blk)) count=1 \
        oflag=direct conv=fsync,notrunc
    rc=$?
    step "$rc" "$i" "write of block $blk" || break
    [ "$rc" = 0 ] || continue
    echo "$sum" > "/tmp/sums/$blk"
    bounded dd if="/dev/$dev" of=/tmp/r bs=65536 skip=$((first + blk)) count=1 iflag=direct
    rc=$?
    step "$rc" "$i" "read of block $blk" || break
    [ "$rc" = 0 ] || continue
    if [ "$(sha256 /tmp/r)" != "$sum" ]; then
        result io_mismatch "$i $blk"
        fail "block $blk read back wrong"
        continue
    fi
    ok=$((ok + 1))
    [ "$ok" = 1 ] && result io_ready 1
    [ $((ok % 20)) = 0 ] && result io_ok "$ok"
done
result writes "$ok"

checked=0
bad=0
for f in /tmp/sums/*; do
    [ -e "$f" ] || continue
    blk=${f##*/}
    if ! bounded dd if="/dev/$dev" of=/tmp/r bs=65536 skip=$((first + blk)) count=1 iflag=direct; then
        fail "final read of block $blk failed"
        bad=$((bad + 1))
        continue
    fi
    checked=$((checked + 1))
    if [ "$(sha256 /tmp/r)" != "$(cat "$f")" ]; then
        fail "block $blk lost its last write"
        bad=$((bad + 1))
    fi
done
result final_checked "$checked"
result final_bad "$bad"
if bounded dd if="/dev/$dev" of=/tmp/region bs=65536 skip="$first" count="$blocks" iflag=direct; then
    result final_sha256 "$(sha256 /tmp/region)"
else
    fail "final read of the region failed"
fi

# What the kernel said meanwhile: a device that stalled or went away shows here.
dmesg > /tmp/dmesg.after
before=$(wc -l < /tmp/dmesg.before)
tail -n +$((before + 1)) /tmp/dmesg.after | grep -iE 'timeout|timed out|reset|i/o error|blk_update|buffer i/o|hung' > /tmp/problems
n=$(wc -l < /tmp/problems)
result kernel_problems "$n"
head -n 20 /tmp/problems | while read -r line; do
    result kernel_problem "$line"
done
[ "$n" = 0 ] || fail "the kernel logged $n problem(s)"
exit "$VMTEST_FAILED"
