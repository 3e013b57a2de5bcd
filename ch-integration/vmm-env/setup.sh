#!/usr/bin/env bash
# Build (or find in the cache) the VMM test environment: a Debian sid chroot with
# QEMU (>= 10.1, with -device vfio-user-pci), a Debian kernel and a busybox
# initramfs that runs the guest test scripts in tests/.  See README.md.
#
# Usage: setup.sh            (must run as root; prints the env dir as the last stdout line)
# Exit codes: 0 ok, 3 Debian package archive unreachable (tests: skip), other: error.
# Environment:
#   XDG_CACHE_HOME   cache root (default ~/.cache); env goes to .../vfio-user-server/vmm-env-<key>
#   VMM_ENV_MIRROR   Debian mirror URL (default: the first .../debian URI in the host's apt sources)
#   VMM_ENV_VERBOSE=1  stream the build log to stderr
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SELF")
SUITE=sid
QEMU_MIN_VERSION=10.1
# Kernel modules for the initramfs; their dependencies are added automatically.
MODULES=(virtio_pci virtio_blk virtio_net virtio_scsi megaraid_sas sd_mod nvme)
# Packages installed into the chroot on top of minbase (fio: staged into the
# fio initramfs with the shared libraries it needs, see stage_fio).
CHROOT_PACKAGES=(qemu-system-x86 kmod busybox-static xz-utils zstd fio)
EXIT_UNREACHABLE=3

log() { printf 'vmm-env: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------
# helpers shared by the outer script and the in-namespace build

# safe_rm DIR: rm -rf, but never through a mount point.
safe_rm() {
    local d=$1
    [[ -e $d || -L $d ]] || return 0
    d=$(readlink -f "$d")
    if awk -v d="$d/" '{ if (index($2 "/", d) == 1) found = 1 } END { exit !found }' /proc/self/mounts; then
        die "refusing to remove $d: something is mounted below it (see /proc/self/mounts)"
    fi
    rm -rf --one-file-system "$d"
}

# inchroot ROOT CMD...: run CMD in the chroot with a clean environment.
inchroot() {
    local root=$1
    shift
    chroot "$root" /usr/bin/env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
        "$@"
}

# check_qemu ROOT: verify the chroot's QEMU version and vfio-user-pci support.
check_qemu() {
    local root=$1 ver
    ver=$(inchroot "$root" qemu-system-x86_64 --version | sed -n '1s/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p')
    [[ -n $ver ]] || die "cannot determine the QEMU version in $root"
    if [[ $(printf '%s\n%s\n' "$QEMU_MIN_VERSION" "$ver" | sort -V | head -n1) != "$QEMU_MIN_VERSION" ]]; then
        die "QEMU $ver in the chroot is older than $QEMU_MIN_VERSION"
    fi
    inchroot "$root" qemu-system-x86_64 -device help | grep -q '"vfio-user-pci"' ||
        die "QEMU $ver in the chroot has no -device vfio-user-pci"
    inchroot "$root" qemu-system-x86_64 -device vfio-user-pci,help >/dev/null ||
        die "qemu-system-x86_64 -device vfio-user-pci,help failed"
    echo "$ver"
}

# ---------------------------------------------------------------------------
# The network-using part of the build.  Runs in a private mount namespace
# (see main), so every mount made here disappears with the namespace.
inner_build() {
    local B=$1
    local R=$B/rootfs
    local K=/opt/vmm-kernel       # unpacked kernel packages, inside the chroot
    local S=/opt/vmm-initramfs    # initramfs staging tree, inside the chroot
    local t0=$SECONDS

    step() { log "[$((SECONDS - t0))s] $*"; }

    step "debootstrap --variant=minbase $SUITE from $MIRROR"
    local include=()
    [[ $MIRROR == https:* ]] && include=(--include=ca-certificates)
    debootstrap --variant=minbase "${include[@]}" "$SUITE" "$R" "$MIRROR"

    mount --bind /dev "$R/dev"
    mount -t proc proc "$R/proc"

    # apt/dpkg configuration of the chroot
    cat >"$R/etc/apt/apt.conf.d/90vmm-env" <<'EOF'
// sid's Release file may be past its Valid-Until when this runs
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
// downloads go to directories _apt cannot write to
APT::Sandbox::User "root";
EOF
    cat >"$R/etc/dpkg/dpkg.cfg.d/90vmm-env-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
    printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
    chmod 755 "$R/usr/sbin/policy-rc.d"
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$R/etc/apt/sources.list"

    step "apt-get install ${CHROOT_PACKAGES[*]}"
    inchroot "$R" apt-get -o Acquire::Check-Valid-Until=false update
    inchroot "$R" apt-get install -y "${CHROOT_PACKAGES[@]}"

    # --- kernel: download and unpack the packages behind linux-image-amd64 ---
    local kpkg
    kpkg=$(inchroot "$R" apt-cache depends linux-image-amd64 |
        sed -n 's/^ *Depends: \(linux-image-[^ <>]*-amd64\)$/\1/p' | head -n1)
    [[ -n $kpkg ]] || die "cannot resolve linux-image-amd64 to a versioned kernel package"
    local kabi=${kpkg#linux-image-}
    # The versioned package may be split (linux-binary-*, linux-modules-*, ...):
    # take the closure of its dependencies that carry the same ABI name.
    local -a pkgs=("$kpkg") queue=("$kpkg")
    while ((${#queue[@]})); do
        local p=${queue[0]} d
        queue=("${queue[@]:1}")
        for d in $(inchroot "$R" apt-cache depends "$p" |
            sed -n "s/^ *Depends: \(linux-[^ <>]*$(printf '%s' "$kabi" | sed 's/[.]/\\./g')\)\$/\1/p"); do
            if [[ " ${pkgs[*]} " != *" $d "* ]]; then
                pkgs+=("$d")
                queue+=("$d")
            fi
        done
    done
    step "downloading kernel packages: ${pkgs[*]}"
    mkdir -p "$R/var/cache/vmm-kernel" "$R$K"
    inchroot "$R" sh -c 'cd /var/cache/vmm-kernel && apt-get download "$@"' sh "${pkgs[@]}"
    local deb
    for deb in "$R"/var/cache/vmm-kernel/*.deb; do
        inchroot "$R" dpkg-deb -x "/var/cache/vmm-kernel/${deb##*/}" "$K"
    done
    rm -rf "$R/var/cache/vmm-kernel"
    # depmod/modprobe -d look in BASE/lib/modules: make both layouts work
    if [[ ! -e $R$K/lib && -d $R$K/usr/lib/modules ]]; then
        ln -s usr/lib "$R$K/lib"
    fi
    local kver kmoddir
    kmoddir=$(find "$R$K/lib/modules/" -mindepth 1 -maxdepth 1 -type d | head -n1)
    [[ -n $kmoddir ]] || die "no lib/modules/<version> in the kernel packages ${pkgs[*]}"
    kver=${kmoddir##*/}
    local vmlinuz
    for vmlinuz in "$kmoddir/vmlinuz" "$R$K/boot/vmlinuz-$kver" ""; do
        [[ -z $vmlinuz || -f $vmlinuz ]] && break
    done
    [[ -n $vmlinuz ]] || die "no vmlinuz for kernel $kver"
    cp "$vmlinuz" "$B/vmlinuz"
    for f in "$kmoddir/config" "$R$K/boot/config-$kver"; do
        [[ -f $f ]] && { cp "$f" "$B/kernel-config"; break; }
    done
    echo "$kver" >"$B/kernel-version"

    step "resolving modules for kernel $kver: ${MODULES[*]}"
    inchroot "$R" depmod -b "$K" "$kver"
    local -a order=()
    local m line path
    for m in "${MODULES[@]}"; do
        local deps
        deps=$(inchroot "$R" modprobe -d "$K" -S "$kver" --show-depends "$m") ||
            die "modprobe --show-depends $m failed"
        while read -r line; do
            case $line in
                "insmod "*)
                    path=${line#insmod }
                    path=${path%% *}
                    [[ " ${order[*]} " == *" $path "* ]] || order+=("$path")
                    ;;
                "builtin "*) ;;
                *) [[ -z $line ]] || log "note: modprobe --show-depends $m: $line" ;;
            esac
        done <<<"$deps"
    done

    step "staging initramfs (busybox + ${#order[@]} modules)"
    mkdir -p "$R$S"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,tests}
    mkdir -p "$R$S/lib/modules/$kver"
    cp "$R/usr/bin/busybox" "$R$S/bin/busybox"
    inchroot "$R" "$S/bin/busybox" --list-full | while read -r applet; do
        [[ -e $R$S/$applet || -L $R$S/$applet ]] || ln -s /bin/busybox "$R$S/$applet"
    done
    : >"$R$S/modules.order"
    for path in "${order[@]}"; do
        local rel=${path#"$K"/lib/modules/"$kver"/}
        [[ $rel != /* ]] || die "unexpected module path $path"
        local dst=$S/lib/modules/$kver/${rel%.*}
        [[ $rel == *.ko ]] && dst=$S/lib/modules/$kver/$rel
        mkdir -p "$R${dst%/*}"
        case $rel in
            *.ko.xz) inchroot "$R" sh -c 'xz -dc "$1" >"$2"' sh "$path" "$dst" ;;
            *.ko.zst) inchroot "$R" sh -c 'zstd -q -dc "$1" >"$2"' sh "$path" "$dst" ;;
            *.ko.gz) inchroot "$R" sh -c 'gzip -dc "$1" >"$2"' sh "$path" "$dst" ;;
            *.ko) cp "$R$path" "$R$dst" ;;
            *) die "unexpected module file $path" ;;
        esac
        echo "${dst#"$S"/}" >>"$R$S/modules.order"
    done
    for f in modules.builtin modules.builtin.modinfo; do
        [[ -f $kmoddir/$f ]] && cp "$kmoddir/$f" "$R$S/lib/modules/$kver/"
    done
    # modules.dep & co so that busybox modprobe (and the kernel's request_module) work too
    inchroot "$R" depmod -b "$S" "$kver"
    mkdir -p "$B/initramfs-root"
    cp -a "$R$S/." "$B/initramfs-root/"
    rm -rf "${R:?}$S" "${R:?}$K"

    step "staging fio and its shared libraries"
    stage_fio "$B" "$R"

    step "cleaning the chroot"
    inchroot "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/* "$R"/tmp/* "$R"/var/tmp/*

    umount "$R/proc"
    umount "$R/dev"
    step "done with the chroot"
}

# ---------------------------------------------------------------------------
# stage_fio ENVDIR ROOT: fio-root/ = /usr/bin/fio of the chroot ROOT, every shared
# library ldd finds for it (at the path ldd names, links resolved) and the dynamic
# loader; the fio initramfs is the base one with this tree added.
stage_fio() {
    local B=$1 R=$2 F=$1/fio-root lib
    mkdir -p "$F/usr/bin"
    cp -L "$R/usr/bin/fio" "$F/usr/bin/fio"
    # "libx.so.1 => /lib/x86_64-linux-gnu/libx.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
    for lib in $(inchroot "$R" ldd /usr/bin/fio | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p' | sort -u); do
        mkdir -p "$F${lib%/*}"
        cp -L "$R$lib" "$F$lib"
    done
    [[ -n $(find "$F" -name 'ld-linux*') ]] || die "no dynamic loader among fio's libraries"
    # sid is merged-/usr: /lib and /lib64 are links into /usr there, but /lib is a
    # real directory in the initramfs (it holds the modules); keep the files where
    # ldd found them and also link the usual multiarch directory.
    if [[ -d $F/usr/lib/x86_64-linux-gnu && ! -e $F/lib/x86_64-linux-gnu ]]; then
        mkdir -p "$F/lib"
        ln -s ../usr/lib/x86_64-linux-gnu "$F/lib/x86_64-linux-gnu"
    fi
    inchroot "$R" fio --version >"$B/fio-version"
}

# ---------------------------------------------------------------------------
# pack_initramfs ENVDIR: initramfs-root + guest-init.sh + tests -> initramfs.cpio.gz,
# and that plus fio-root -> initramfs-fio.cpio.gz (the kernel unpacks concatenated
# archives in turn)
pack_initramfs() {
    local B=$1 stage
    stage=$B/.initramfs-stage
    rm -rf "$stage"
    cp -a "$B/initramfs-root" "$stage"
    install -m 755 "$HERE/guest-init.sh" "$stage/init"
    mkdir -p "$stage/tests"
    install -m 644 "$HERE"/tests/*.sh "$stage/tests/"
    [[ -e $stage/dev/console ]] || mknod -m 600 "$stage/dev/console" c 5 1
    [[ -e $stage/dev/null ]] || mknod -m 666 "$stage/dev/null" c 1 3
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        "$B/rootfs/usr/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) |
        gzip -6n >"$B/initramfs.cpio.gz.tmp"
    mv "$B/initramfs.cpio.gz.tmp" "$B/initramfs.cpio.gz"
    rm -rf "$stage"
    (cd "$B/fio-root" && find . -mindepth 1 | LC_ALL=C sort |
        "$B/rootfs/usr/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) |
        gzip -6n | cat "$B/initramfs.cpio.gz" - >"$B/initramfs-fio.cpio.gz.tmp"
    mv "$B/initramfs-fio.cpio.gz.tmp" "$B/initramfs-fio.cpio.gz"
}

# mirror_from_host_sources: the first ".../debian" archive URI in the host's apt sources
mirror_from_host_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        awk '
            /^[ \t]*#/ { next }
            /^[ \t]*deb[ \t]/ { sub(/\[[^]]*\]/, ""); print $2; next }
            /^URIs:/ { for (i = 2; i <= NF; i++) print $i }
        ' "$f"
    done | grep -E '^https?://[^ ]+/debian/?$' | head -n1 | sed 's:/*$::'
}

# archive_reachable URL: can we fetch URL/dists/SUITE/InRelease?
archive_reachable() {
    local url="$1/dists/$SUITE/InRelease"
    if command -v curl >/dev/null; then
        curl -fsS --max-time 30 -o /dev/null "$url" 2>/dev/null
    elif command -v wget >/dev/null; then
        wget -q -T 30 -t 1 -O /dev/null "$url"
    elif [[ $url =~ ^http://([^/:]+)(:([0-9]+))?(/.*)$ ]]; then
        local host=${BASH_REMATCH[1]} port=${BASH_REMATCH[3]:-80} path=${BASH_REMATCH[4]}
        timeout 30 bash -c '
            exec 5<>"/dev/tcp/$1/$2" || exit 1
            printf "HEAD %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$3" "$1" >&5
            head -n1 <&5 | grep -q " 200 "' _ "$host" "$port" "$path"
    else
        return 0 # cannot tell; let the build find out
    fi
}

unreachable() {
    log "Debian package archive $MIRROR is unreachable; cannot build the VMM test environment (exit $EXIT_UNREACHABLE = skip)"
    exit "$EXIT_UNREACHABLE"
}

# ---------------------------------------------------------------------------
if [[ ${1:-} == --inner-build ]]; then
    inner_build "$2"
    exit 0
fi

main() {
    [[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, mount namespaces)"
    local key base_key cache env repo_root f
    key=$(
        cd "$HERE"
        for f in setup.sh guest-init.sh tests/*.sh; do
            printf '%s\0' "$f"
            cat "$f"
        done | sha256sum | cut -c1-12
    )
    base_key=$(sha256sum "$SELF" | cut -c1-12)
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/vfio-user-server
    env=$cache/vmm-env-$key
    repo_root=$(cd "$HERE/../.." && pwd)

    link_env() {
        mkdir -p "$repo_root/target" 2>/dev/null &&
            ln -sfn "$env" "$repo_root/target/vmm-env.tmp.$$" &&
            mv -T "$repo_root/target/vmm-env.tmp.$$" "$repo_root/target/vmm-env" ||
            log "warning: could not update $repo_root/target/vmm-env"
    }

    if [[ -f $env/.complete ]]; then
        link_env
        log "up to date: $env"
        echo "$env"
        return 0
    fi

    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    if ! flock -n 9; then
        log "waiting for another setup.sh to finish ($cache/.lock)"
        flock 9
    fi
    if [[ -f $env/.complete ]]; then
        link_env
        log "up to date: $env"
        echo "$env"
        return 0
    fi
    # Under the lock, any build directory is a leftover of an interrupted run.
    for f in "$cache"/.build-*; do
        [[ -e $f ]] || continue
        log "removing leftover $f"
        safe_rm "$f"
    done
    safe_rm "$env"

    local B=$cache/.build-$key.$$
    trap 'safe_rm "$B"' EXIT
    mkdir -p "$B"
    local t0=$SECONDS

    # Reuse the chroot, kernel and modules of an env built by this same setup.sh
    # (only guest-init.sh or tests/ differ): no network needed, takes seconds.
    local donor=
    for f in "$cache"/vmm-env-*/.base-key; do
        [[ -f $f && -f ${f%/*}/.complete && $(cat "$f") == "$base_key" ]] || continue
        donor=${f%/*}
        break
    done

    if [[ -n $donor ]]; then
        log "reusing rootfs/kernel of $donor (same setup.sh), repacking the initramfs"
        cp -al "$donor/rootfs" "$B/rootfs"
        cp -a "$donor/initramfs-root" "$B/initramfs-root"
        cp -a "$donor/fio-root" "$B/fio-root"
        cp -a "$donor/vmlinuz" "$donor/kernel-version" "$donor/fio-version" "$B/"
        [[ -f $donor/kernel-config ]] && cp -a "$donor/kernel-config" "$B/"
    else
        MIRROR=${VMM_ENV_MIRROR:-$(mirror_from_host_sources)}
        MIRROR=${MIRROR:-http://deb.debian.org/debian}
        export MIRROR
        archive_reachable "$MIRROR" || unreachable
        if ! command -v debootstrap >/dev/null; then
            log "installing debootstrap on the host"
            if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } >"$B/host-apt.log" 2>&1; then
                archive_reachable "$MIRROR" || unreachable
                tail -n 20 "$B/host-apt.log" >&2
                die "apt-get install debootstrap failed"
            fi
        fi
        log "building $env (log: $B/build.log; takes a few minutes)"
        local rc=0
        if [[ ${VMM_ENV_VERBOSE:-0} == 1 ]]; then
            unshare --mount --propagation private --fork --kill-child \
                bash "$SELF" --inner-build "$B" 2>&1 | tee "$B/build.log" >&2 || rc=$?
        else
            # full log to build.log, progress lines live to stderr
            unshare --mount --propagation private --fork --kill-child \
                bash "$SELF" --inner-build "$B" 2>&1 | tee "$B/build.log" |
                { grep --line-buffered '^vmm-env: ' >&2 || true; } || rc=$?
        fi
        if ((rc != 0)); then
            archive_reachable "$MIRROR" || unreachable
            log "build failed (rc=$rc); last lines of the log:"
            tail -n 40 "$B/build.log" >&2
            exit 1
        fi
    fi

    pack_initramfs "$B"
    local qver
    qver=$(check_qemu "$B/rootfs")
    echo "$base_key" >"$B/.base-key"
    {
        echo "key=$key"
        echo "base_key=$base_key"
        echo "suite=$SUITE"
        echo "qemu_version=$qver"
        echo "kernel_version=$(cat "$B/kernel-version")"
        echo "fio_version=$(cat "$B/fio-version")"
        echo "modules=$(tr '\n' ' ' <"$B/initramfs-root/modules.order")"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "build_seconds=$((SECONDS - t0))"
    } >"$B/info"
    touch "$B/.complete"
    mv -T "$B" "$env"
    trap - EXIT
    link_env
    log "built $env in $((SECONDS - t0))s (QEMU $qver, kernel $(cat "$env/kernel-version"))"
    echo "$env"
}

main "$@"
