#!/bin/sh
# /init of the vmm-env test initramfs (run by busybox sh as PID 1).
#
# Kernel command line understood here:
#   vmtest=NAME      run /tests/NAME.sh (vmtest=shell: interactive shell on the console)
#   vt.KEY=VALUE     test parameter; exported as VT_KEY (upper-cased, '.'/'-' -> '_')
#                    and also passed to the test as the argument "KEY=VALUE".
#                    Values cannot contain spaces.
#   vt.timeout=SECS  guest-side watchdog for the test (default 600, 0 = none):
#                    on expiry prints "VMTEST-DONE rc=124" and powers off.
#   vt.action=reboot end with "reboot -f" instead of "poweroff -f" (with QEMU's
#                    -no-reboot both simply make QEMU exit).
#   vt.printk=N      console log level while the test runs (default 4: errors and worse).
#
# Console markers (one per line, always at the start of the line; the serial
# console ends lines with \r\n):
#   VMTEST-INIT key=value     boot information from this script
#   VMTEST-ERROR message      something went wrong outside the test proper
#   VMTEST-START test=NAME    the test script is about to run
#   VMTEST-RESULT key=value   printed by test scripts (see /tests/lib.sh);
#                             key is up to the first '=', value is the rest of the line
#   VMTEST-DONE rc=N          the test finished with exit code N; then poweroff -f
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=${TERM:-linux}
umask 022

mkdir -p /proc /sys /dev /tmp /run /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs -o mode=0755 dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

marker() { echo "$*"; }

finish() {
    # $1 = rc; $2 = "nosync" to skip sync (e.g. I/O may be hung)
    marker "VMTEST-DONE rc=$1"
    [ "$2" = nosync ] || sync
    if [ "${VT_ACTION:-poweroff}" = reboot ]; then
        reboot -f
    fi
    poweroff -f
    # not reached; if poweroff failed, exiting PID 1 panics and panic=-1 reboots
    sleep 5
    exit "$1"
}

# --- kernel command line -------------------------------------------------------
VMTEST_NAME=
VMTEST_ARGS=
VT_TIMEOUT=600
for word in $(cat /proc/cmdline); do
    case "$word" in
        vmtest=*) VMTEST_NAME=${word#vmtest=} ;;
        vt.*=*)
            kv=${word#vt.}
            key=${kv%%=*}
            val=${kv#*=}
            case "$key" in
                ''|*[!A-Za-z0-9_.-]*) marker "VMTEST-ERROR ignoring malformed parameter: $word"; continue ;;
            esac
            var=VT_$(echo "$key" | tr 'a-z.-' 'A-Z__')
            export "$var=$val"
            VMTEST_ARGS="$VMTEST_ARGS $key=$val"
            ;;
    esac
done

# --- kernel modules ------------------------------------------------------------
# /modules.order lists module files (relative to /), dependencies first.
# modparams NAME : the NAME.PARAM=VALUE words of the kernel command line, as
# PARAM=VALUE (what modprobe would pass; insmod does not look there itself).
modparams() {
    _m=$(echo "$1" | tr - _)
    for _w in $(cat /proc/cmdline); do
        case "$_w" in
            "$_m".*=*) echo "${_w#"$_m".}" ;;
        esac
    done
}
loaded=0
failed=0
if [ -f /modules.order ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        name=${mod##*/}
        name=${name%.ko}
        # already loaded (e.g. pulled in by a request_module) -> skip
        if [ -d "/sys/module/$(echo "$name" | tr - _)" ] && [ -e "/sys/module/$(echo "$name" | tr - _)/initstate" ]; then
            loaded=$((loaded + 1))
            continue
        fi
        # shellcheck disable=SC2046
        if out=$(insmod "/$mod" $(modparams "$name") 2>&1); then
            loaded=$((loaded + 1))
        else
            failed=$((failed + 1))
            marker "VMTEST-ERROR insmod $name failed: $out"
        fi
    done < /modules.order
fi
# From here on only kernel messages of level KERN_ERR or more severe reach the console, so
# that they interleave less with the test output (vt.printk=N to change).
echo "${VT_PRINTK:-4}" > /proc/sys/kernel/printk

marker "VMTEST-INIT kernel=$(uname -r)"
marker "VMTEST-INIT modules_loaded=$loaded modules_failed=$failed"
marker "VMTEST-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"

# --- run the test --------------------------------------------------------------
if [ -z "$VMTEST_NAME" ]; then
    marker "VMTEST-ERROR no vmtest=NAME on the kernel command line"
    finish 2
fi

if [ "$VMTEST_NAME" = shell ]; then
    marker "VMTEST-START test=shell"
    echo "vmm-env: interactive shell; 'exit' powers the guest off"
    setsid cttyhack sh -l
    finish $?
fi

case "$VMTEST_NAME" in
    *[!A-Za-z0-9_.-]*|.*) marker "VMTEST-ERROR bad test name: $VMTEST_NAME"; finish 2 ;;
esac
script=/tests/$VMTEST_NAME.sh
if [ ! -f "$script" ]; then
    marker "VMTEST-ERROR no such test: $VMTEST_NAME (have: $(cd /tests && ls *.sh | tr '\n' ' '))"
    finish 127
fi

marker "VMTEST-START test=$VMTEST_NAME"
cd /tmp
# shellcheck disable=SC2086
sh "$script" $VMTEST_ARGS </dev/null &
pid=$!
rc=
if [ "${VT_TIMEOUT:-0}" -gt 0 ] 2>/dev/null; then
    # poll so that a hung test cannot keep the guest alive forever
    ticks=$((VT_TIMEOUT * 5))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$ticks" -le 0 ]; then
            marker "VMTEST-ERROR test $VMTEST_NAME timed out after ${VT_TIMEOUT}s"
            kill -9 "$pid" 2>/dev/null
            finish 124 nosync
        fi
        ticks=$((ticks - 1))
        usleep 200000
    done
fi
wait "$pid"
rc=$?
finish "$rc"
