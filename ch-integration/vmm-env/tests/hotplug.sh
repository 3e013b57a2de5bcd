# Hot-plug check: boots with no test disk, waits for one to be hot-added (e.g. QMP
# device_add of a vfio-user-pci behind a pcie-root-port), runs /tests/blk.sh on it,
# then waits for it to be hot-removed (QMP device_del).
# Parameters:
#   vt.plug_wait=SECS    how long to wait for the disk to appear (default 120)
#   vt.unplug_wait=SECS  how long to wait for it to disappear (default 120)
#   every vt.* parameter of blk.sh (vt.pattern, vt.offset, vt.count, ...), except vt.dev
# Results:
#   waiting_for_disk=1                 printed once the guest is ready for the device_add
#   plugged=<name>                     the disk that appeared (first vd*, sd*, nvme*n*)
#   pci=<BDF> <VENDOR:DEVICE>          the PCI function(s) that appeared with it
#   everything blk.sh prints, then blk_rc=<its exit code>
#   waiting_for_unplug=1               I/O is done; the host may device_del now
#   unplugged=1                        the disk and its PCI function are gone
. /tests/lib.sh

plug_wait=$(num "${VT_PLUG_WAIT:-120}") || exit 1
unplug_wait=$(num "${VT_UNPLUG_WAIT:-120}") || exit 1

first_disk() {
    for b in /sys/block/vd* /sys/block/sd* /sys/block/nvme*n*; do
        [ -e "$b/size" ] && { echo "${b##*/}"; return 0; }
    done
    return 1
}

if d=$(first_disk); then
    fail "a disk ($d) is already present at boot; expected none"
    exit 1
fi
ls /sys/bus/pci/devices >/tmp/pci.before
result waiting_for_disk 1

n=$((plug_wait * 10))
dev=
while ! dev=$(first_disk); do
    [ "$n" -le 0 ] && { fail "no disk was hot-plugged within ${plug_wait}s"; exit 1; }
    n=$((n - 1))
    usleep 100000
done
result plugged "$dev"
ls /sys/bus/pci/devices >/tmp/pci.after
for bdf in $(grep -vxF -f /tmp/pci.before /tmp/pci.after); do
    result pci "$bdf $(sed -n 's/^PCI_ID=//p' "/sys/bus/pci/devices/$bdf/uevent")"
done
pci_new=$(grep -vxF -f /tmp/pci.before /tmp/pci.after)

VT_DEV=$dev sh /tests/blk.sh
rc=$?
result blk_rc "$rc"
[ "$rc" = 0 ] || VMTEST_FAILED=1

result waiting_for_unplug 1
n=$((unplug_wait * 10))
while [ -e "/sys/block/$dev" ]; do
    [ "$n" -le 0 ] && { fail "$dev was not removed within ${unplug_wait}s"; exit 1; }
    n=$((n - 1))
    usleep 100000
done
for bdf in $pci_new; do
    wait_for_gone=$((10 * 10))
    while [ -e "/sys/bus/pci/devices/$bdf" ] && [ "$wait_for_gone" -gt 0 ]; do
        wait_for_gone=$((wait_for_gone - 1))
        usleep 100000
    done
    [ -e "/sys/bus/pci/devices/$bdf" ] && fail "PCI function $bdf still present after the disk went"
done
result unplugged 1
exit "$VMTEST_FAILED"
