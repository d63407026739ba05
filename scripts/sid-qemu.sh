#!/usr/bin/env bash
# Build (once) and check a minimal Debian sid chroot holding a current QEMU (11.x), for the
# VM scenarios that need a newer QEMU than Debian 12's 7.2 (tests/vm/run.sh migrate-qemu11).
# Nothing on the host changes but the chroot directory. See ../shared/TESTBED.md.
#
# Usage: scripts/sid-qemu.sh [ROOT]     (default $NVMUX_SID_ROOT or /var/cache/nvmux/sid-qemu)
# Prints the chroot's QEMU version on its last line. Cost measured on a 2-core Debian 12 host:
# about 1.5 min and 500 MB the first time; later calls only check it (under a second).
# A failed build leaves nothing behind (built in ROOT.tmp, renamed when complete).
set -euo pipefail
root=${1:-${NVMUX_SID_ROOT:-/var/cache/nvmux/sid-qemu}}
qemu=/usr/bin/qemu-system-x86_64
if [ ! -x "$root$qemu" ]; then
    [ "$(id -u)" = 0 ] || { echo "sid-qemu: building the chroot needs root" >&2; exit 2; }
    command -v debootstrap >/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    mkdir -p "$(dirname "$root")"
    tmp=$root.tmp
    rm -rf "$tmp"
    t0=$SECONDS
    debootstrap --variant=minbase sid "$tmp" >"$root.build.log" 2>&1 \
        || { tail -20 "$root.build.log" >&2; rm -rf "$tmp"; exit 1; }
    chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 >>"$root.build.log" 2>&1 \
        || { tail -20 "$root.build.log" >&2; rm -rf "$tmp"; exit 1; }
    chroot "$tmp" apt-get clean >/dev/null 2>&1 || true
    mv "$tmp" "$root"
    echo "sid-qemu: built $root in $((SECONDS - t0)) s, $(du -sh "$root" | cut -f1)"
fi
chroot "$root" "$qemu" --version | head -1
