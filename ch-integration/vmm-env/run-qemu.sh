#!/usr/bin/env bash
# Run the vmm-env's QEMU (from its Debian sid chroot) on the env's kernel + initramfs.
#
# Usage: run-qemu.sh ENV_DIR [--] [EXTRA QEMU ARGS...]
#   ENV_DIR: the directory printed by setup.sh (or target/vmm-env).
#
# Environment:
#   VMTEST_APPEND      appended to the kernel command line "console=ttyS0 panic=-1",
#                      e.g. "vmtest=blk vt.pattern=0xab vt.count=8192"
#   VMTEST_SHARE_DIR   colon-separated host directories bind-mounted at the SAME path
#                      inside the chroot (for vfio-user sockets, QMP sockets, images...)
#   VMTEST_AUTO_SHARE  1 (default): also share the directory of every absolute path found
#                      in the extra args (file=/x, socket=/x, path=/x, unix:/x, /x); 0: don't
#   VMTEST_MEM_MB      guest RAM in MiB (default 512), a shared memfd backend
#                      (share=on, as vfio-user needs)
#   VMTEST_NO_REBOOT   1 (default): pass -no-reboot, so a guest reboot makes QEMU exit;
#                      0: leave it out, so the guest really reboots (QEMU resets the machine
#                      and its devices, vfio-user ones included)
#   VMTEST_FIO=1       boot the initramfs that also holds fio (and its libraries); it is
#                      larger, so only the tests that run fio use it
#   VMTEST_DRY_RUN=1   print the QEMU command line and exit
#
# QEMU runs in a private mount namespace (unshare --mount --propagation private) on a
# throw-away tmpfs root into which the chroot's /usr, /etc, /var are bind-mounted
# read-only: no mount leaks out, and the cached env is never written to.  Without
# --fork, so this script's PID ends up being QEMU's: signals sent to it reach QEMU.
# Always TCG: /dev/kvm on our machines hangs stock kernels.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")

die() { printf 'run-qemu: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Second stage, inside the private mount namespace: build the root, exec QEMU.
if [[ ${1:-} == --in-namespace ]]; then
    shift
    ENV_DIR=$1
    shift
    NR=$ENV_DIR/.run-root
    R=$ENV_DIR/rootfs
    mount -t tmpfs -o mode=0755 vmm-env-root "$NR"
    ro_bind() { # SRC DST
        mkdir -p "$2"
        mount --bind "$1" "$2"
        mount -o remount,bind,ro "$2"
    }
    for d in usr etc var opt; do
        [[ -d $R/$d ]] && ro_bind "$R/$d" "$NR/$d"
    done
    for l in bin sbin lib lib64 lib32 libx32; do
        if [[ -L $R/$l ]]; then
            ln -s "$(readlink "$R/$l")" "$NR/$l"
        elif [[ -d $R/$l ]]; then
            ro_bind "$R/$l" "$NR/$l"
        fi
    done
    mkdir -p "$NR"/{dev,proc,sys,tmp,run,root,vmm-env}
    mount --rbind /dev "$NR/dev"
    mount -t proc proc "$NR/proc"
    mount -t sysfs sysfs "$NR/sys"
    mount -t tmpfs -o mode=1777 tmpfs "$NR/tmp"
    mount -t tmpfs -o mode=0755 tmpfs "$NR/run"
    mount -t tmpfs -o mode=1777 tmpfs "$NR/var/tmp"
    ro_bind "$ENV_DIR" "$NR/vmm-env"
    # shared host directories, parents first
    while IFS= read -r d; do
        [[ -n $d ]] || continue
        mkdir -p "$NR$d" || die "cannot create mount point for shared dir $d"
        mount --bind "$d" "$NR$d"
    done < <(printf '%s\n' "${VMTEST_SHARED_DIRS_RESOLVED:-}" | tr ':' '\n' | awk '{ print length($0) "\t" $0 }' | sort -n | cut -f2-)
    cwd=/
    [[ -d $NR$PWD ]] && cwd=$PWD
    exec chroot "$NR" /usr/bin/env -i -C "$cwd" \
        PATH=/usr/sbin:/usr/bin HOME=/root TMPDIR=/tmp LC_ALL=C.UTF-8 TERM="${TERM:-dumb}" \
        qemu-system-x86_64 "$@"
fi

# ---------------------------------------------------------------------------
[[ $# -ge 1 ]] || die "usage: run-qemu.sh ENV_DIR [--] [extra qemu args...]"
ENV_DIR=$(readlink -f "$1")
shift
[[ ${1:-} == -- ]] && shift
[[ -f $ENV_DIR/.complete ]] || die "$ENV_DIR is not a complete vmm-env (run setup.sh)"
[[ $(id -u) == 0 ]] || die "must run as root (mount namespace + chroot)"

mem=${VMTEST_MEM_MB:-512}
[[ $mem =~ ^[0-9]+$ ]] || die "VMTEST_MEM_MB must be a number of MiB"
case ${VMTEST_NO_REBOOT:-1} in
    1) no_reboot=(-no-reboot) ;;
    0) no_reboot=() ;;
    *) die "VMTEST_NO_REBOOT must be 0 or 1" ;;
esac
append="console=ttyS0 panic=-1${VMTEST_APPEND:+ $VMTEST_APPEND}"
case ${VMTEST_FIO:-0} in
    0) initrd=/vmm-env/initramfs.cpio.gz ;;
    1) initrd=/vmm-env/initramfs-fio.cpio.gz ;;
    *) die "VMTEST_FIO must be 0 or 1" ;;
esac

args=(
    -machine q35 -accel tcg
    -m "$mem"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on"
    -numa node,memdev=mem
    -nographic "${no_reboot[@]}" -nodefaults
    -serial stdio
    -kernel /vmm-env/vmlinuz
    -initrd "$initrd"
    -append "$append"
    "$@"
)

# Directories to share at the same path inside the chroot.
declare -a shares=()
add_share() {
    local d=$1
    [[ -n $d ]] || return 0
    [[ $d == /* ]] || die "shared dir must be absolute: $d"
    [[ -d $d ]] || die "shared dir does not exist: $d"
    d=$(readlink -f "$d")
    case $d in
        / | /usr | /usr/* | /etc | /etc/* | /var | /proc | /proc/* | /sys | /sys/* | /dev | /dev/*)
            printf 'run-qemu: warning: not sharing %s\n' "$d" >&2
            return 0
            ;;
    esac
    [[ " ${shares[*]-} " == *" $d "* ]] || shares+=("$d")
}
if [[ -n ${VMTEST_SHARE_DIR:-} ]]; then
    IFS=: read -r -a _dirs <<<"$VMTEST_SHARE_DIR"
    for d in "${_dirs[@]}"; do add_share "$d"; done
fi
if [[ ${VMTEST_AUTO_SHARE:-1} == 1 ]]; then
    for a in "$@"; do
        if [[ $a == '{'* ]]; then
            # JSON syntax, e.g. -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/x/s.sock"}}'
            mapfile -t toks < <(grep -o '"/[^"]*"' <<<"$a" | tr -d '"')
        else
            IFS=, read -r -a toks <<<"$a"
        fi
        for t in "${toks[@]}"; do
            p=
            case $t in
                /*) p=$t ;;
                unix:/*) p=${t#unix:} ;;
                *=/*) p=${t#*=} ;;
                *=unix:/*) p=${t#*=unix:} ;;
            esac
            [[ -n $p ]] || continue
            if [[ -d $p ]]; then
                add_share "$p"
            elif [[ -d ${p%/*}/ ]]; then
                add_share "${p%/*}/"
            fi
        done
    done
fi
for d in "${shares[@]}"; do
    [[ $d != *:* ]] || die "shared dir path must not contain ':': $d"
done
VMTEST_SHARED_DIRS_RESOLVED=$(IFS=:; echo "${shares[*]-}")
export VMTEST_SHARED_DIRS_RESOLVED

if [[ ${VMTEST_DRY_RUN:-0} == 1 ]]; then
    printf 'shared dirs: %s\n' "${VMTEST_SHARED_DIRS_RESOLVED:-(none)}"
    printf 'qemu-system-x86_64'
    printf ' %q' "${args[@]}"
    printf '\n'
    exit 0
fi

mkdir -p "$ENV_DIR/.run-root"
exec unshare --mount --propagation private bash "$SELF" --in-namespace "$ENV_DIR" "${args[@]}"
