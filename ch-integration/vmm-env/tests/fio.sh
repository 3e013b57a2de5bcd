# fio against a disk, the way storage people measure: each job runs for a fixed time
# on the raw device. Needs the fio initramfs (run-qemu.sh with VMTEST_FIO=1).
#
# Parameters:
#   vt.dev      device name (default auto: the first vd*, sd* or nvme*n*)
#   vt.wait     seconds to wait for it (default 15)
#   vt.jobs     comma-separated jobs RW-BS-qdN, RW one of randread, randwrite, read,
#               write (default randread-4k-qd1,randwrite-4k-qd1,randread-4k-qd32,
#               randwrite-4k-qd32,read-1m-qd8,write-1m-qd8)
#   vt.runtime  seconds per job (default 5), after vt.ramp seconds not counted (default 1)
#   vt.engine   io_uring (default; libaio if io_uring does not work here) or libaio
#   vt.direct   1 (default): O_DIRECT; 0: through the guest's page cache
#   vt.size_mib the region of the disk the jobs use, from its start (default: all of it)
#   vt.verify=1 first write a pattern with vt.engine and read it back with fio's
#               verification at QD 32 (a correctness check, not a measurement)
#
# Results: dev, engine, fio_version, then per job job_<name>=<IOPS> <KiB/s> <mean latency
# in us>, and verify_rc with vt.verify=1.
. /tests/lib.sh

export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
dev=${VT_DEV:-auto}
jobs=${VT_JOBS:-randread-4k-qd1,randwrite-4k-qd1,randread-4k-qd32,randwrite-4k-qd32,read-1m-qd8,write-1m-qd8}
runtime=${VT_RUNTIME:-5}
ramp=${VT_RAMP:-1}
engine=${VT_ENGINE:-io_uring}
direct=${VT_DIRECT:-1}

find_dev() {
    for d in /sys/block/vd* /sys/block/sd* /sys/block/nvme*n*; do
        [ -e "$d" ] && { echo "${d##*/}"; return 0; }
    done
    return 1
}
n=$((${VT_WAIT:-15} * 10))
while :; do
    if [ "$dev" = auto ]; then
        d=$(find_dev) && break
    elif [ -e "/sys/block/$dev" ]; then
        d=$dev
        break
    fi
    [ "$n" -le 0 ] && { fail "no disk appeared"; exit 1; }
    n=$((n - 1))
    usleep 100000
done
[ -e "/dev/$d" ] || mknod "/dev/$d" b $(tr ':' ' ' < "/sys/block/$d/dev")
result dev "$d"
result fio_version "$(fio --version)"
sectors=$(cat "/sys/block/$d/size")
size=$((sectors * 512))
[ -n "${VT_SIZE_MIB:-}" ] && size=$((VT_SIZE_MIB << 20))

# fio JOB RW BS QD [extra...]: one job, terse output on stdout
run_fio() {
    _name=$1 _rw=$2 _bs=$3 _qd=$4
    shift 4
    # --thread: no shared memory segment (the initramfs has no /dev/shm).
    fio --thread --name="$_name" --filename="/dev/$d" --rw="$_rw" --bs="$_bs" \
        --iodepth="$_qd" --ioengine="$engine" --direct="$direct" --size="$size" \
        --norandommap --randrepeat=0 --output-format=terse --terse-version=3 "$@"
}

# io_uring may be off in this kernel: fall back to libaio, and say so.
if [ "$engine" = io_uring ] &&
    ! run_fio probe read 4k 1 --size=1m --io_size=4k >/dev/null 2>/tmp/probe.err; then
    echo "io_uring does not work here: $(head -n 1 /tmp/probe.err); using libaio"
    engine=libaio
fi
result engine "$engine"

if [ "${VT_VERIFY:-0}" = 1 ]; then
    vsize=$((size < 16 << 20 ? size : 16 << 20))
    run_fio verify randwrite 4k 32 --size="$vsize" --verify=crc32c --do_verify=1 \
        --verify_fatal=1 >/tmp/verify.out 2>&1
    rc=$?
    result verify_rc "$rc"
    [ "$rc" = 0 ] || { tail -n 5 /tmp/verify.out; fail "fio verify failed"; }
fi

for job in $(echo "$jobs" | tr ',' ' '); do
    rw=${job%%-*}
    rest=${job#*-}
    bs=${rest%%-*}
    qd=${rest#*-qd}
    case $rw in
        randread | read) col=7 ;;
        randwrite | write) col=48 ;;
        *) fail "bad job $job"; continue ;;
    esac
    if ! out=$(run_fio "$job" "$rw" "$bs" "$qd" --time_based --runtime="$runtime" \
        --ramp_time="$ramp" 2>/tmp/fio.err); then
        fail "fio $job: $(head -n 3 /tmp/fio.err)"
        continue
    fi
    # terse v3: read bw KiB/s, IOPS and total-latency mean (us) at 7, 8, 40;
    # writes at 48, 49, 81
    result "job_$job" "$(echo "$out" | awk -F';' -v c="$col" '{ printf "%s %s %s", $(c + 1), $c, $(c + 33) }')"
done
exit "$VMTEST_FAILED"
