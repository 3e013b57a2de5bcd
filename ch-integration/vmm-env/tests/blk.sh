# Block device I/O check, verified from the host side via the printed hashes.
# Parameters (kernel command line, all optional):
#   vt.dev=NAME          block device under /dev (default vda; "auto" = first of vd*, sd*, nvme*n*)
#   vt.wait=SECS         how long to wait for the device to appear (default 15)
#   vt.read_offset=BYTES offset of the initial read (default 0)
#   vt.read_len=BYTES    length of the initial read (default 4096)
#   vt.pattern=BYTE|random
#                        if given, write vt.count bytes at vt.offset: every byte = BYTE
#                        (decimal or 0x hex), or random data; then read it back with O_DIRECT
#   vt.offset=BYTES      write offset (default 0)
#   vt.count=BYTES       write length (default 4096)
#   vt.odirect=1         also write with oflag=direct (default: page cache + conv=fsync)
#   vt.expect_ro=0|1     fail unless the device's ro flag matches
# Offsets/lengths must be multiples of the device's logical block size.
# Results:
#   dev=<name> size_sectors=<N, 512-byte units> ro=<0|1> logical_block_size=<N>
#   nr_hw_queues=<N> queue_depth=<N>  (blk-mq hardware queues and tags per queue, from sysfs)
#   read_sha256=<sha256 of the initial read>
#   pattern_sha256=<sha256 of the data written>       (if vt.pattern)
#   write_rc=<dd exit code>                             (if vt.pattern and ro=0)
#   readback_sha256=<sha256 of the O_DIRECT read-back>  (if vt.pattern and ro=0)
#   readback_match=<0|1>                                (if vt.pattern and ro=0)
#   ro_write_rejected=<0|1> ro_data_unchanged=<0|1>     (if ro=1)
#   msi_vectors=<N>       MSI/MSI-X vectors of virtio devices (/proc/interrupts)
#   intx_interrupts=<N>   interrupts taken on the legacy (INTx) lines of virtio devices
# Exit code 0 only if every check passed.
. /tests/lib.sh

dev=${VT_DEV:-vda}
wait_s=${VT_WAIT:-15}
if [ "$dev" = auto ]; then
    n=$((wait_s * 10))
    dev=
    while [ -z "$dev" ] && [ "$n" -gt 0 ]; do
        for b in /sys/block/vd* /sys/block/sd* /sys/block/nvme*n*; do
            [ -e "$b/size" ] && { dev=${b##*/}; break; }
        done
        [ -n "$dev" ] || { usleep 100000; n=$((n - 1)); }
    done
    [ -n "$dev" ] || { fail "no block device appeared"; exit 1; }
fi
if ! wait_for "/sys/block/$dev/size" "$wait_s" || ! wait_for "/dev/$dev" 5; then
    fail "block device $dev did not appear within ${wait_s}s"
    ls /sys/block
    exit 1
fi

size=$(cat "/sys/block/$dev/size")
ro=$(cat "/sys/block/$dev/ro")
lbs=$(cat "/sys/block/$dev/queue/logical_block_size")
result dev "$dev"
result size_sectors "$size"
result ro "$ro"
result logical_block_size "$lbs"
result nr_hw_queues "$(ls -d "/sys/block/$dev/mq/"* 2>/dev/null | wc -l)"
result queue_depth "$(cat "/sys/block/$dev/mq/0/nr_tags" 2>/dev/null || echo unknown)"

if [ -n "${VT_EXPECT_RO:-}" ] && [ "$VT_EXPECT_RO" != "$ro" ]; then
    fail "ro=$ro but vt.expect_ro=$VT_EXPECT_RO"
fi

# bs_for OFFSET LEN : largest convenient block size dividing both (at least lbs)
bs_for() {
    for b in 1048576 65536 4096 "$lbs"; do
        [ "$b" -ge "$lbs" ] || continue
        if [ $(($1 % b)) -eq 0 ] && [ $(($2 % b)) -eq 0 ]; then echo "$b"; return; fi
    done
    echo 0
}

# read_hash VAR OFFSET LEN : VAR := sha256 of LEN bytes at OFFSET, read with O_DIRECT
read_hash() {
    _bs=$(bs_for "$2" "$3")
    if ! dd if="/dev/$dev" of=/tmp/read.bin iflag=direct bs="$_bs" skip=$(($2 / _bs)) count=$(($3 / _bs)) 2>/tmp/dd.err; then
        fail "read of $3 bytes at $2 failed: $(grep -m1 "dd:" /tmp/dd.err || head -n1 /tmp/dd.err)"
        eval "$1=read-error"
        return 1
    fi
    _got=$(stat -c %s /tmp/read.bin)
    if [ "$_got" != "$3" ]; then
        fail "short read: $_got of $3 bytes at $2"
    fi
    eval "$1=$(sha256 /tmp/read.bin)"
    rm -f /tmp/read.bin
}

check_range() { # OFFSET LEN WHAT
    if [ "$(bs_for "$1" "$2")" = 0 ] || [ "$2" -le 0 ]; then
        fail "$3: offset $1 / length $2 not multiples of logical block size $lbs"; exit 1
    fi
    if [ $((($1 + $2) / 512)) -gt "$size" ]; then
        fail "$3: range $1+$2 beyond end of device ($size sectors)"; exit 1
    fi
}

r_off=$(num "${VT_READ_OFFSET:-0}") || exit 1
r_len=$(num "${VT_READ_LEN:-4096}") || exit 1
check_range "$r_off" "$r_len" read
read_hash initial "$r_off" "$r_len"
result read_sha256 "$initial"

if [ -n "${VT_PATTERN:-}" ]; then
    off=$(num "${VT_OFFSET:-0}") || exit 1
    cnt=$(num "${VT_COUNT:-4096}") || exit 1
    check_range "$off" "$cnt" write
    if [ "$VT_PATTERN" = random ]; then
        head -c "$cnt" /dev/urandom > /tmp/pattern
    else
        byte=$(num "$VT_PATTERN") || exit 1
        [ "$byte" -ge 0 ] && [ "$byte" -le 255 ] || { fail "vt.pattern out of range: $VT_PATTERN"; exit 1; }
        head -c "$cnt" /dev/zero | tr '\000' "\\$(printf '%03o' "$byte")" > /tmp/pattern
    fi
    pat=$(sha256 /tmp/pattern)
    result pattern_sha256 "$pat"
    bs=$(bs_for "$off" "$cnt")
    oflag=
    [ "${VT_ODIRECT:-0}" = 1 ] && oflag=oflag=direct
    if [ "$ro" = 1 ]; then
        # shellcheck disable=SC2086
        if dd if=/tmp/pattern of="/dev/$dev" bs="$bs" seek=$((off / bs)) conv=fsync $oflag 2>/tmp/dd.err; then
            result ro_write_rejected 0
            fail "write to read-only device $dev succeeded"
        else
            result ro_write_rejected 1
            result ro_write_error "$(grep -m1 "dd:" /tmp/dd.err || head -n1 /tmp/dd.err)"
        fi
        read_hash after "$r_off" "$r_len"
        if [ "$after" = "$initial" ]; then
            result ro_data_unchanged 1
        else
            result ro_data_unchanged 0
            fail "data of read-only device $dev changed"
        fi
    else
        # shellcheck disable=SC2086
        dd if=/tmp/pattern of="/dev/$dev" bs="$bs" seek=$((off / bs)) conv=fsync $oflag 2>/tmp/dd.err
        wrc=$?
        result write_rc "$wrc"
        [ "$wrc" = 0 ] || fail "write failed: $(grep -m1 "dd:" /tmp/dd.err || head -n1 /tmp/dd.err)"
        read_hash back "$off" "$cnt"
        result readback_sha256 "$back"
        if [ "$back" = "$pat" ]; then
            result readback_match 1
        else
            result readback_match 0
            fail "read-back data differs from what was written"
        fi
    fi
fi

# How the device interrupted: MSI-X vectors, or the INTx line (pci=nomsi).
result msi_vectors "$(grep virtio /proc/interrupts | grep -c MSI)"
result intx_interrupts "$(grep virtio /proc/interrupts | grep -v MSI |
    awk '{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }')"

exit "$VMTEST_FAILED"
