# Prints what the guest sees of its PCI, virtio and block devices (for docs and
# debugging; always passes). Parameters: vt.bars=all prints the resources of every
# PCI function (default: virtio functions only).
# Results:
#   pci=<BDF> vendor=<0x....> device=<0x....> subsystem=<0x....:0x....> class=<0x......> driver=<name|none>
#   pci_bar=<BDF> <start> <end> <flags>            (one per non-empty resource)
#   virtio=<name> device_id=<0x....> vendor=<0x....> driver=<name|none> features=<bit string>
#   block=<name> size_sectors=<N> ro=<0|1> logical_block_size=<N> physical_block_size=<N>
#         nr_hw_queues=<N> queue_depth=<N> serial=<...> rotational=<0|1> discard_max_bytes=<N>
#         write_zeroes_max_bytes=<N> write_cache=<...>
. /tests/lib.sh

for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    bdf=${d##*/}
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    result pci "$bdf vendor=$(cat "$d/vendor") device=$(cat "$d/device") subsystem=$(cat "$d/subsystem_vendor"):$(cat "$d/subsystem_device") class=$(cat "$d/class") driver=$drv"
    [ "${VT_BARS:-virtio}" = all ] || [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
    while read -r start end flags; do
        [ "$start" = 0x0000000000000000 ] && [ "$end" = 0x0000000000000000 ] && continue
        result pci_bar "$bdf $start $end $flags"
    done < "$d/resource"
done

for v in /sys/bus/virtio/devices/*; do
    [ -e "$v/device" ] || continue
    drv=none
    [ -e "$v/driver" ] && drv=$(basename "$(readlink "$v/driver")")
    result virtio "${v##*/} device_id=$(cat "$v/device") vendor=$(cat "$v/vendor") driver=$drv features=$(cat "$v/features")"
done

for b in /sys/block/*; do
    [ -e "$b/size" ] || continue
    q=$b/queue
    result block "${b##*/} size_sectors=$(cat "$b/size") ro=$(cat "$b/ro") logical_block_size=$(cat "$q/logical_block_size") physical_block_size=$(cat "$q/physical_block_size") nr_hw_queues=$(ls -d "$b/mq/"* 2>/dev/null | wc -l) queue_depth=$(cat "$b/mq/0/nr_tags" 2>/dev/null) serial=$(cat "$b/serial" 2>/dev/null) rotational=$(cat "$q/rotational") discard_max_bytes=$(cat "$q/discard_max_bytes") write_zeroes_max_bytes=$(cat "$q/write_zeroes_max_bytes") write_cache=$(cat "$q/write_cache" | tr ' ' _)"
done
exit 0
