# Basic sanity check of the guest environment.
# Parameters: none.
# Results:
#   kernel=<uname -r>             uname=<uname -a>
#   cmdline=<kernel command line>
#   mem_total_kb=<N>
#   pci=<BDF> <VENDOR:DEVICE> class=<0xCCSSPP> driver=<name|none>   (one per PCI device)
#   partition=<major> <minor> <1K-blocks> <name>                    (one per /proc/partitions entry)
#   block=<name> size_sectors=<N> ro=<0|1>                          (one per /sys/block entry)
. /tests/lib.sh

result kernel "$(uname -r)"
result uname "$(uname -a)"
result cmdline "$(cat /proc/cmdline)"
result mem_total_kb "$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"

for d in /sys/bus/pci/devices/*; do
    [ -e "$d/uevent" ] || continue
    id=$(sed -n 's/^PCI_ID=//p' "$d/uevent")
    class=$(cat "$d/class")
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    result pci "${d##*/} $id class=$class driver=$drv"
done

tail -n +3 /proc/partitions | while read -r major minor blocks name; do
    [ -n "$name" ] && result partition "$major $minor $blocks $name"
done

for b in /sys/block/*; do
    [ -e "$b/size" ] || continue
    result block "${b##*/} size_sectors=$(cat "$b/size") ro=$(cat "$b/ro")"
done

exit 0
