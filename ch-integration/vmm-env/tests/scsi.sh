# SCSI disks behind a host bus adapter (megaraid_sas, virtio_scsi): what the
# guest sees, and direct I/O on each disk, checked from the host via the hashes.
# Parameters (kernel command line, all optional):
#   vt.disks=N           SCSI disks to wait for (default 1)
#   vt.wait=SECS         how long to wait for them (default 90)
#   vt.io=0|1            write, read back and compare on every disk (default 1)
#   vt.count=BYTES       bytes per pass (default 8 MiB)
#   vt.offset1=BYTES     where the 1 MiB-block pass writes (default 1 MiB)
#   vt.offset2=BYTES     where the 4 KiB-block pass writes (default 12 MiB + 4 KiB)
#   vt.expect_ro=0|1     fail unless every disk's ro flag matches; on a
#                        read-only disk the writes must fail and the data stay
# Results, per disk DEV (sda, sdb, ...):
#   scsi=<H:C:T:L> <DEV> <vendor> <model>   like lsscsi, from /sys/class/scsi_disk
#   proc_name=<driver of the SCSI host>
#   size_DEV=<512-byte sectors>  ro_DEV=<0|1>  cache_DEV=<cache_type>
#   read_DEV=<sha256 of the first 4 KiB>
#   pattern_DEV_1m= / readback_DEV_1m= / match_DEV_1m=   the 1 MiB-block pass
#   pattern_DEV_4k= / readback_DEV_4k= / match_DEV_4k=   the 4 KiB-block pass
#   ro_rejected_DEV=<0|1> ro_unchanged_DEV=<0|1>         on read-only disks
#   init_done=<0|1>        "INIT adapter done" in dmesg (megaraid_sas)
#   msix_vectors=<N> intx_interrupts=<N>   interrupts of the adapter
#   dmesg_problem=<line>   every kernel line about SCSI/megasas with an error
#   dmesg_problems=<N>
# Exit code 0 only if every check passed.
. /tests/lib.sh

want=${VT_DISKS:-1}
wait_s=${VT_WAIT:-90}
count=$(num "${VT_COUNT:-8388608}") || exit 1
off1=$(num "${VT_OFFSET1:-1048576}") || exit 1
off2=$(num "${VT_OFFSET2:-12587008}") || exit 1

disks() {
    for d in /sys/class/scsi_disk/*; do
        [ -e "$d/device/block" ] || continue
        for b in "$d"/device/block/*; do
            [ -e "$b" ] && echo "${d##*/} ${b##*/}"
        done
    done
}

n=$((wait_s * 10))
while [ "$(disks | wc -l)" -lt "$want" ] && [ "$n" -gt 0 ]; do
    usleep 100000
    n=$((n - 1))
done
got=$(disks | wc -l)
if [ "$got" -lt "$want" ]; then
    fail "$got SCSI disk(s) after ${wait_s}s, expected $want"
fi

# sha_of DEV OFFSET LEN BS : sha256 of LEN bytes at OFFSET, read with O_DIRECT
sha_of() {
    if dd if="/dev/$1" of=/tmp/rb iflag=direct bs="$4" skip=$(($2 / $4)) count=$(($3 / $4)) 2>/tmp/dd.err; then
        sha256 /tmp/rb
    else
        echo "read-error:$(grep -m1 'dd:' /tmp/dd.err || head -n1 /tmp/dd.err)"
    fi
    rm -f /tmp/rb
}

# pass DEV NAME OFFSET BS : random data written with O_DIRECT in BS blocks, read back
pass() {
    head -c "$count" /dev/urandom > /tmp/pat
    p=$(sha256 /tmp/pat)
    result "pattern_$1_$2" "$p"
    if ! dd if=/tmp/pat of="/dev/$1" oflag=direct bs="$4" seek=$(($3 / $4)) 2>/tmp/dd.err; then
        fail "$1: write of $count bytes at $3 in $4-byte blocks: $(grep -m1 'dd:' /tmp/dd.err)"
    fi
    b=$(sha_of "$1" "$3" "$count" "$4")
    result "readback_$1_$2" "$b"
    if [ "$b" = "$p" ]; then
        result "match_$1_$2" 1
    else
        result "match_$1_$2" 0
        fail "$1: data read back at $3 differs from what was written"
    fi
}

for host in /sys/class/scsi_host/*; do
    [ -e "$host/proc_name" ] && result proc_name "$(cat "$host/proc_name")"
done

disks | while read -r hctl dev; do
    d=/sys/class/scsi_disk/$hctl/device
    result scsi "$hctl $dev $(cat "$d/vendor" 2>/dev/null | tr -d ' ') $(cat "$d/model" 2>/dev/null | tr ' ' _)"
done

for dev in $(disks | cut -d' ' -f2); do
    size=$(cat "/sys/block/$dev/size")
    ro=$(cat "/sys/block/$dev/ro")
    result "size_$dev" "$size"
    result "ro_$dev" "$ro"
    for c in /sys/class/scsi_disk/*/device/block/"$dev"; do
        hctl=${c%/device/block/*}
        result "cache_$dev" "$(cat "$hctl/cache_type" | tr ' ' _)"
    done
    wait_for "/dev/$dev" 5 || fail "/dev/$dev missing"
    result "read_$dev" "$(sha_of "$dev" 0 4096 4096)"
    if [ -n "${VT_EXPECT_RO:-}" ] && [ "$VT_EXPECT_RO" != "$ro" ]; then
        fail "$dev: ro=$ro but vt.expect_ro=$VT_EXPECT_RO"
    fi
    [ "${VT_IO:-1}" = 1 ] || continue
    if [ $(((off2 + count) / 512)) -gt "$size" ]; then
        fail "$dev: $size sectors are too few for the writes"
        continue
    fi
    if [ "$ro" = 1 ]; then
        before=$(sha_of "$dev" "$off1" "$count" 1048576)
        head -c 1048576 /dev/urandom > /tmp/pat
        if dd if=/tmp/pat of="/dev/$dev" oflag=direct bs=1048576 seek=$((off1 / 1048576)) 2>/tmp/dd.err; then
            result "ro_rejected_$dev" 0
            fail "$dev: write to a read-only disk succeeded"
        else
            result "ro_rejected_$dev" 1
        fi
        after=$(sha_of "$dev" "$off1" "$count" 1048576)
        if [ "$after" = "$before" ]; then
            result "ro_unchanged_$dev" 1
        else
            result "ro_unchanged_$dev" 0
            fail "$dev: data of a read-only disk changed"
        fi
        continue
    fi
    pass "$dev" 1m "$off1" 1048576
    pass "$dev" 4k "$off2" 4096
done

if dmesg | grep -q "INIT adapter done"; then
    result init_done 1
else
    result init_done 0
fi
result msix_vectors "$(grep -i megasas /proc/interrupts | grep -c MSI)"
result intx_interrupts "$(grep -i megasas /proc/interrupts | grep -v MSI |
    awk '{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }')"
problems=0
# Whole words only ("default" is no fault), and not the driver's own
# banner lines about its reset and abort support.
dmesg | grep -iE 'megaraid|megasas|scsi|sd[a-z]* ' | grep -vi 'command line' |
    grep -iE '\<(error|errors|fail|failed|failure|timed out|timeout|not ready|abort|aborted|aborting|reset|resetting|kill|killing|fault|unexpected)\>' |
    grep -vE 'Online Controller Reset|TaskAbort/Reset timeout' > /tmp/problems
while read -r line; do
    result dmesg_problem "$line"
    problems=$((problems + 1))
done < /tmp/problems
result dmesg_problems "$problems"

exit "$VMTEST_FAILED"
