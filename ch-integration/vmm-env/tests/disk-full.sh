# A write to a disk whose storage may fail it (a full disk on the host),
# then reads that show whether the device still serves. The host decides
# what the guest should see: an I/O error (vt.expect_write=error), or a
# write that waits for the host to make room and then completes
# (vt.expect_write=ok).
# Parameters (kernel command line):
#   vt.dev=NAME            block device under /dev (default vda)
#   vt.wait=SECS           how long to wait for the device to appear (default 15)
#   vt.offset=BYTES        where to write (default 8388608)
#   vt.count=BYTES         how much: random data, 64 KiB per O_DIRECT write (default 262144)
#   vt.read_offset=BYTES   a region read after the write (default 0)
#   vt.read_len=BYTES      its length (default 65536)
#   vt.expect_write=ok|error  fail unless the write ends so (default: either)
# Offsets and lengths must be multiples of 64 KiB.
# Results:
#   dev=<name> size_sectors=<N>
#   pattern_sha256=<sha256 of the data written>
#   writing=1              printed just before the write starts
#   write_rc=<dd exit code> write_error=<dd's message, if it failed>
#   io_errors=<N>          "I/O error" lines in the kernel log
#   io_error=<the first of them, if any>
#   read_rc=<dd exit code> read_sha256=<sha256 of the region read>
#   readback_rc=<dd exit code> readback_sha256=<sha256 of the written region, read back>
#   readback_match=<0|1>
. /tests/lib.sh

dev=${VT_DEV:-vda}
wait_s=${VT_WAIT:-15}
if ! wait_for "/sys/block/$dev/size" "$wait_s" || ! wait_for "/dev/$dev" 5; then
    fail "block device $dev did not appear within ${wait_s}s"
    exit 1
fi
result dev "$dev"
result size_sectors "$(cat "/sys/block/$dev/size")"

bs=65536
off=$(num "${VT_OFFSET:-8388608}") || exit 1
cnt=$(num "${VT_COUNT:-262144}") || exit 1
r_off=$(num "${VT_READ_OFFSET:-0}") || exit 1
r_len=$(num "${VT_READ_LEN:-65536}") || exit 1
for v in "$off" "$cnt" "$r_off" "$r_len"; do
    [ $((v % bs)) -eq 0 ] || { fail "$v is not a multiple of $bs"; exit 1; }
done

head -c "$cnt" /dev/urandom > /tmp/pattern
pat=$(sha256 /tmp/pattern)
result pattern_sha256 "$pat"

# O_DIRECT: the error (or the wait) is the write's own, not a later
# writeback's.
result writing 1
dd if=/tmp/pattern of="/dev/$dev" bs=$bs seek=$((off / bs)) oflag=direct conv=fsync 2>/tmp/dd.err
wrc=$?
result write_rc "$wrc"
if [ "$wrc" != 0 ]; then
    result write_error "$(grep -m1 "dd:" /tmp/dd.err || head -n1 /tmp/dd.err)"
fi
case "${VT_EXPECT_WRITE:-}" in
    ok) [ "$wrc" = 0 ] || fail "the write failed" ;;
    error) [ "$wrc" != 0 ] || fail "the write succeeded" ;;
esac

result io_errors "$(dmesg | grep -c "I/O error")"
line=$(dmesg | grep -m1 "I/O error")
[ -n "$line" ] && result io_error "${line#*] }"

# The device still serves.
dd if="/dev/$dev" of=/tmp/read.bin bs=$bs skip=$((r_off / bs)) count=$((r_len / bs)) iflag=direct 2>/tmp/dd.err
rrc=$?
result read_rc "$rrc"
[ "$rrc" = 0 ] || fail "read after the write failed: $(grep -m1 "dd:" /tmp/dd.err || head -n1 /tmp/dd.err)"
result read_sha256 "$(sha256 /tmp/read.bin)"

dd if="/dev/$dev" of=/tmp/back.bin bs=$bs skip=$((off / bs)) count=$((cnt / bs)) iflag=direct 2>/tmp/dd.err
brc=$?
result readback_rc "$brc"
[ "$brc" = 0 ] || fail "read-back failed: $(grep -m1 "dd:" /tmp/dd.err || head -n1 /tmp/dd.err)"
back=$(sha256 /tmp/back.bin)
result readback_sha256 "$back"
if [ "$back" = "$pat" ]; then
    result readback_match 1
else
    result readback_match 0
    [ "${VT_EXPECT_WRITE:-}" = ok ] && fail "read-back data differs from what was written"
fi

exit "$VMTEST_FAILED"
