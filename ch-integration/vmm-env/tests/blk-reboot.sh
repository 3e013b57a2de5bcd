# Device survives a guest reboot (QEMU without -no-reboot resets the machine and so
# the vfio-user device). Needs a writable disk; checked from the host via the hashes.
# Boot 1 (no marker on the disk): writes vt.count random bytes at vt.offset, then a
#   512-byte marker sector at vt.marker holding that data's sha256, and reboots (reboot -f).
# Boot 2 (marker found): checks the boot-1 data against the marker, writes new random
#   data at vt.offset2, reads it back with O_DIRECT, and exits (init powers off).
# Parameters:
#   vt.dev=NAME (default vda)   vt.wait=SECS (default 15)
#   vt.offset=BYTES (default 1 MiB)  vt.offset2=BYTES (default 2 MiB)  vt.count=BYTES (default 64 KiB)
#   vt.marker=BYTES (default 0, a multiple of 512)
# Results (the boot number prefixes every key):
#   boot1_pattern_sha256=  boot1_write_rc=  boot1_readback_match=  boot1_rebooting=1
#   boot2_size_sectors=  boot2_marker_found=1  boot2_boot1_sha256=  boot2_boot1_match=0|1
#   boot2_pattern_sha256=  boot2_write_rc=  boot2_readback_sha256=  boot2_readback_match=0|1
. /tests/lib.sh

dev=${VT_DEV:-vda}
off=$(num "${VT_OFFSET:-1048576}") || exit 1
off2=$(num "${VT_OFFSET2:-2097152}") || exit 1
cnt=$(num "${VT_COUNT:-65536}") || exit 1
marker_off=$(num "${VT_MARKER:-0}") || exit 1
MAGIC=VMTEST-REBOOT-MARKER

if ! wait_for "/sys/block/$dev/size" "${VT_WAIT:-15}" || ! wait_for "/dev/$dev" 5; then
    fail "block device $dev did not appear"
    exit 1
fi

# read_region FILE OFFSET LEN: O_DIRECT read into FILE (OFFSET, LEN multiples of 512)
read_region() {
    dd if="/dev/$dev" of="$1" iflag=direct,skip_bytes,count_bytes bs=65536 skip="$2" count="$3" 2>/tmp/dd.err
}
# write_region FILE OFFSET: write FILE at OFFSET with conv=fsync
write_region() {
    dd if="$1" of="/dev/$dev" oflag=seek_bytes bs=65536 seek="$2" conv=fsync 2>/tmp/dd.err
}

if ! read_region /tmp/marker "$marker_off" 512; then
    fail "marker read failed: $(head -n1 /tmp/dd.err)"
    exit 1
fi
first=$(head -c ${#MAGIC} /tmp/marker)

if [ "$first" != "$MAGIC" ]; then
    # ---- boot 1
    head -c "$cnt" /dev/urandom >/tmp/pattern
    pat=$(sha256 /tmp/pattern)
    result boot1_pattern_sha256 "$pat"
    write_region /tmp/pattern "$off"
    wrc=$?
    result boot1_write_rc "$wrc"
    [ "$wrc" = 0 ] || { fail "boot1 write failed: $(head -n1 /tmp/dd.err)"; exit 1; }
    read_region /tmp/back "$off" "$cnt" || { fail "boot1 read-back failed"; exit 1; }
    if [ "$(sha256 /tmp/back)" = "$pat" ]; then
        result boot1_readback_match 1
    else
        result boot1_readback_match 0
        fail "boot1 read-back differs"
        exit 1
    fi
    { printf '%s %s\n' "$MAGIC" "$pat"; head -c 512 /dev/zero; } | head -c 512 >/tmp/marker
    write_region /tmp/marker "$marker_off" || { fail "marker write failed: $(head -n1 /tmp/dd.err)"; exit 1; }
    result boot1_rebooting 1
    sync
    reboot -f
    sleep 30
    fail "reboot -f did not reboot"
    exit 1
fi

# ---- boot 2
result boot2_size_sectors "$(cat "/sys/block/$dev/size")"
result boot2_marker_found 1
want=$(head -n1 /tmp/marker | cut -d' ' -f2)
read_region /tmp/old "$off" "$cnt" || { fail "boot2 read of boot-1 data failed"; exit 1; }
got=$(sha256 /tmp/old)
result boot2_boot1_sha256 "$got"
if [ "$got" = "$want" ]; then
    result boot2_boot1_match 1
else
    result boot2_boot1_match 0
    fail "boot-1 data lost over the reboot"
fi
head -c "$cnt" /dev/urandom >/tmp/pattern
pat=$(sha256 /tmp/pattern)
result boot2_pattern_sha256 "$pat"
write_region /tmp/pattern "$off2"
wrc=$?
result boot2_write_rc "$wrc"
[ "$wrc" = 0 ] || fail "boot2 write failed: $(head -n1 /tmp/dd.err)"
read_region /tmp/back "$off2" "$cnt" || fail "boot2 read-back failed"
back=$(sha256 /tmp/back)
result boot2_readback_sha256 "$back"
if [ "$back" = "$pat" ]; then
    result boot2_readback_match 1
else
    result boot2_readback_match 0
    fail "boot2 read-back differs"
fi
exit "$VMTEST_FAILED"
