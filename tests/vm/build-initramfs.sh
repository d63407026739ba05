#!/usr/bin/env bash
# Build the base initramfs for the VM tests: an UNCOMPRESSED newc cpio holding
#   - busybox-static with one symlink per applet,
#   - kernel modules (virtio_pci, virtio_blk, virtio_net, nvme, nvme_tcp + deps)
#     with depmod run for the guest kernel version,
#   - fio and nvme (nvme-cli), every library `ldd` lists for them, and the dynamic loader,
#   - for the dm-crypt scenario, when present: dm_crypt, xts, ecb, aesni_intel and
#     algif_skcipher (+ deps), and cryptsetup (apt-get install cryptsetup-bin) with its
#     libraries,
#   - for the nvmf-backend scenario's target guest (tests/vm/guest-nvmet-target.sh), when
#     the kernel has them: configfs, nvmet, nvmet_tcp and brd (+ deps),
#   - for `nvmux bench suite`'s db_bench stage: ext4 (+ deps), mke2fs with its libraries
#     and /etc/mke2fs.conf, and, when present, RocksDB's db_bench (apt-get install
#     rocksdb-tools) with librocksdb and its libraries,
#   - an /init that loads the modules, runs /test.sh (appended later as a
#     second cpio by boot.sh) and prints a NVMUX-TEST-RESULT marker.
#
# Usage: build-initramfs.sh OUT.cpio
#   The guest kernel is the newest /boot/vmlinuz-*-amd64 (override: KVER=...).
#   KROOT=DIR takes the kernel and its modules from DIR/boot and DIR/lib/modules instead
#   of / (a kernel package unpacked with dpkg-deb -x, as run.sh does for Linux 6.12).
#   Compressed modules (.ko.xz) are stored decompressed (busybox insmod reads plain .ko).
#   OUT is reused when it is newer than this script and was built with the same optional
#   tools (OUT.tools lists those found on the host: cryptsetup, db_bench); installing one
#   later rebuilds it. FORCE=1 rebuilds.
#   OUT.kernel is written next to it with the matching vmlinuz path.
set -euo pipefail

out=${1:?usage: build-initramfs.sh OUT.cpio}
self=$(readlink -f "$0")

# The optional tools this host has: an image built without one of them is stale once it
# is installed (the cache key is this script's mtime plus this list).
optional_tools() {
    local t
    for t in cryptsetup db_bench; do command -v "$t" >/dev/null && printf '%s\n' "$t"; done
    return 0
}
tools=$(optional_tools)
if [[ -z ${FORCE:-} && -s $out && -s $out.kernel && $out -nt $self ]] && [[ -r $(cat "$out.kernel") ]] &&
    [[ -f $out.tools && $(cat "$out.tools") == "$tools" ]]; then
    echo "initramfs: $out is up to date (FORCE=1 to rebuild)"
    exit 0
fi

kroot=${KROOT:-}
kroot=${kroot%/}
# Newest Debian kernel, unless KVER is given.
if [[ -z ${KVER:-} ]]; then
    vmlinuz=$(ls "$kroot"/boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $vmlinuz ]] || { echo "initramfs: no $kroot/boot/vmlinuz-*-amd64 (install linux-image-amd64)" >&2; exit 1; }
    KVER=${vmlinuz#"$kroot"/boot/vmlinuz-}
fi
vmlinuz=$kroot/boot/vmlinuz-$KVER
moddir=$kroot/lib/modules/$KVER
[[ -r $vmlinuz && -d $moddir ]] || { echo "initramfs: missing $vmlinuz or $moddir" >&2; exit 1; }
# An unpacked package has no modules.dep yet.
[[ -s $moddir/modules.dep ]] || depmod -b "${kroot:-/}" "$KVER"

for tool in busybox fio nvme cpio depmod modprobe ldd; do
    command -v "$tool" >/dev/null || { echo "initramfs: '$tool' not found" >&2; exit 1; }
done
busybox=$(readlink -f "$(command -v busybox)")
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
    ldd "$busybox" 2>&1 | grep -q 'not a dynamic executable' ||
    { echo "initramfs: $busybox is not static (install busybox-static)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/nvmux-initramfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib64,root}

# --- busybox + applet symlinks ------------------------------------------------
cp "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
    [[ $applet == bin/busybox ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done

# --- kernel modules -------------------------------------------------------------
mods="virtio_pci virtio_blk virtio_net nvme nvme_tcp"
# ext4 for the db_bench stage (a file system on the disk under test).
mods="$mods ext4"
for m in $mods; do
    # Lines look like "insmod /lib/modules/<ver>/kernel/.../x.ko [params]";
    # "builtin x" lines (module compiled in) need nothing.
    modprobe -d "${kroot:-/}" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done > "$work/mods.list"
# Optional: dm-crypt and its ciphers (a kernel without them just lacks the scenario).
for m in dm_crypt xts ecb aesni_intel algif_skcipher; do
    modprobe -d "${kroot:-/}" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" { print $2 }' || true
done >> "$work/mods.list"
# Optional: the kernel's NVMe/TCP target (nvmet-tcp over configfs) with a RAM disk (brd)
# as its namespace, for the guest-as-target scenarios.
for m in configfs nvmet nvmet_tcp brd; do
    modprobe -d "${kroot:-/}" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" { print $2 }' || true
done >> "$work/mods.list"
sort -u "$work/mods.list" | while read -r ko; do
    dst=$root${ko#"$kroot"}
    mkdir -p "$(dirname "$dst")"
    case $ko in
        *.ko.xz) xz -dc "$ko" > "${dst%.xz}" ;;
        *.ko.zst) zstd -qdc "$ko" > "${dst%.zst}" ;;
        *) cp "$ko" "$dst" ;;
    esac
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f $moddir/$f ]] && cp "$moddir/$f" "$root/lib/modules/$KVER/"
done
sed -i 's/\.ko\.\(xz\|zst\)$/.ko/' "$root/lib/modules/$KVER/modules.order" 2>/dev/null || true
depmod -b "$root" "$KVER"

# --- fio + its shared libraries + loader ------------------------------------------
copy_with_libs() {
    local bin=$1 lib
    mkdir -p "$root$(dirname "$bin")"
    # A busybox applet of the same name is a symlink to /bin/busybox, which cp would follow
    # (and overwrite the host's busybox): replace the link instead.
    rm -f "$root$bin"
    cp -L "$bin" "$root$bin"
    # "libx.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"
    for lib in $(ldd "$bin" | awk '/=>/ { print $3; next } $1 ~ /^\// { print $1 }'); do
        [[ -e $root$lib ]] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    if ldd "$bin" | grep -q 'not found'; then
        echo "initramfs: unresolved libraries for $bin:" >&2
        ldd "$bin" | grep 'not found' >&2
        exit 1
    fi
}
copy_with_libs "$(readlink -f "$(command -v fio)")"
# nvme-cli for the NVMe/TCP scenarios (the scripts pass --hostnqn/--hostid themselves).
copy_with_libs "$(readlink -f "$(command -v nvme)")"
mkdir -p "$root/etc/nvme"
# cryptsetup for the dm-crypt scenario (optional: the scenario fails, naming it, without).
if command -v cryptsetup >/dev/null; then
    copy_with_libs "$(readlink -f "$(command -v cryptsetup)")"
    mkdir -p "$root/run/cryptsetup"
fi

# mke2fs for the db_bench stage's ext4 (busybox's has no ext4; the guest runs it by its
# full path, since busybox sh prefers its own applets).
copy_with_libs "$(readlink -f "$(command -v mke2fs || echo /sbin/mke2fs)")"
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$root/etc/"
# RocksDB's db_bench for the db_bench stage (optional: the stage reports it missing).
if command -v db_bench >/dev/null; then
    copy_with_libs "$(readlink -f "$(command -v db_bench)")"
fi

echo "$KVER" > "$root/etc/nvmux-kver"

# --- /init --------------------------------------------------------------------------
cat > "$root/init" <<'EOF'
#!/bin/sh
# nvmux VM test init: set up the system, run /test.sh, print the result marker.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mkdir -p /dev/pts /dev/shm && mount -t tmpfs tmpfs /dev/shm

modprobe virtio_pci || echo "init: modprobe virtio_pci failed"
modprobe virtio_blk || echo "init: modprobe virtio_blk failed"

# KEY=VAL settings written by boot.sh --env
[ -f /test.env ] && . /test.env

if [ -x /test.sh ]; then
    echo "init: running /test.sh"
    /test.sh
    rc=$?
else
    echo "init: /test.sh missing (was the test cpio appended?)"
    rc=127
fi
if [ "$rc" -eq 0 ]; then
    echo "NVMUX-TEST-RESULT: PASS"
else
    echo "NVMUX-TEST-RESULT: FAIL rc=$rc"
fi
sync
poweroff -f
# Not reached unless poweroff failed; panic=-1 + -no-reboot then ends QEMU.
sleep 1
exit 1
EOF
chmod 755 "$root/init"

# --- pack -------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$work/out.cpio"
mv "$work/out.cpio" "$out"
printf '%s\n' "$tools" | sed '/^$/d' > "$out.tools"

# --- kernel to boot ---------------------------------------------------------------
# Decompressing the xz bzImage takes ~6 s under TCG. With CONFIG_PVH, QEMU can
# boot the uncompressed ELF vmlinux directly (PVH entry), so extract it once.
# The kernel to use is recorded in OUT.kernel for boot.sh (NO_PVH=1: bzImage).
kernel=$vmlinuz
if [[ -z ${NO_PVH:-} ]] && grep -q '^CONFIG_PVH=y' "$kroot/boot/config-$KVER" 2>/dev/null; then
    # The payload is xz (Debian's 6.1) or zstd (Debian's 6.12) compressed.
    for fmt in xz zstd; do
        case $fmt in
            xz) magic='\xfd7zXZ\x00' unpack='xz -dcq' ;;
            zstd) command -v zstd > /dev/null || continue; magic='\x28\xb5\x2f\xfd' unpack='zstd -dcq' ;;
        esac
        off=$(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | head -n1 | cut -d: -f1 || true)
        [[ -n $off ]] || continue
        # The decompressor stops with "corrupt data" at the bzImage trailer; the ELF is
        # complete.
        tail -c +"$((off + 1))" "$vmlinuz" | $unpack > "$work/vmlinux" 2>/dev/null || true
        if [[ $(head -c4 "$work/vmlinux" | od -An -c | tr -d ' ') == 177ELF ]]; then
            mv "$work/vmlinux" "$out.vmlinux"
            kernel=$(readlink -f "$out.vmlinux")
            break
        fi
    done
    [[ $kernel != "$vmlinuz" ]] || echo "initramfs: could not extract vmlinux, booting $vmlinuz (slower)"
fi
echo "$kernel" > "$out.kernel"
echo "initramfs: wrote $out ($(du -h "$out" | cut -f1), kernel $KVER, boot image $kernel)"
