#!/usr/bin/env bash
# Runs every test of the workspace: unit, socket-level, daemon and VM tests.
# The VM tests build (once) and reuse the cached QEMU + guest environment
# from ch-integration/vmm-env/setup.sh, and say clearly when they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --workspace "$@"
