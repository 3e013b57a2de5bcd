#!/usr/bin/env bash
# Host packages the tests need. Idempotent; needs root (as on our machines
# and in CI).
set -euo pipefail
need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
# Network namespaces and TAPs for the virtio-net tests.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install: ${need[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
