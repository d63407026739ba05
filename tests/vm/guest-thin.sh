#!/bin/sh
# Guest side (runs as /test.sh) of the thin-volume scenario, on a fresh thin disk of
# SIZE_MIB that the host grows to NEW_MIB while this script waits:
#   1. the whole fresh disk reads as zeros;
#   2. fio writes and crc32c-verifies 16 MiB at offset 0;
#   3. 1 MiB written with dd, then discarded with blkdiscard, reads as zeros again;
#   4. prints NVMUX-RESIZE-READY; the host runs `nvmux disk resize`; the guest sees the
#      new size with no rescan command (the config-change interrupt updates it);
#   5. the first 16 MiB still verify, and 16 MiB past the old end write and verify;
#      the last MiB, never written, reads as zeros.
# Exit status: 0, fio's status, or 20-26 (see the messages).
set -eu
dev=/dev/vda
blk=/sys/block/vda
old=${SIZE_MIB:?}
new=${NEW_MIB:?}

i=0
while [ ! -b "$dev" ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || { echo "test: $dev did not appear"; exit 20; }
    sleep 0.1
done

mib() { echo $(($(cat "$blk/size") / 2048)); }
# Non-zero bytes in COUNT MiB from MiB offset SKIP, read with O_DIRECT.
nonzero() { dd if="$dev" bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | tr -d '\000' | wc -c; }

echo "test: thin disk $(mib) MiB"
[ "$(mib)" -eq "$old" ] || { echo "test: expected $old MiB"; exit 21; }
[ "$(nonzero 0 "$old")" -eq 0 ] || { echo "test: a fresh thin disk is not all zeros"; exit 22; }
echo "test: fresh disk reads as zeros"

verify() { # OFFSET_MIB [--verify_only]
    fio --name=thin --filename="$dev" --rw=randwrite --bs=4k --size=16M --offset="$1M" \
        --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=1 --verify=crc32c \
        --do_verify=1 --verify_fatal=1 --eta=never --minimal ${2:-} > /tmp/fio.out 2>&1 || {
        rc=$?
        cat /tmp/fio.out
        exit "$rc"
    }
    echo "test: fio ${2:-write+verify} at ${1} MiB: ok"
}
verify 0

dd if=/dev/urandom of="$dev" bs=1M seek=20 count=1 oflag=direct 2>/dev/null
[ "$(nonzero 20 1)" -gt 0 ] || { echo "test: written MiB reads as zeros"; exit 23; }
blkdiscard -o $((20 << 20)) -l $((1 << 20)) "$dev"
[ "$(nonzero 20 1)" -eq 0 ] || { echo "test: discarded MiB does not read as zeros"; exit 24; }
echo "test: discarded range reads as zeros"

echo "NVMUX-RESIZE-READY"
i=0
while [ "$(mib)" -ne "$new" ]; do
    i=$((i + 1))
    [ "$i" -le 1200 ] || { echo "test: size still $(mib) MiB after 120 s, wanted $new"; exit 25; }
    sleep 0.1
done
echo "test: guest sees $(mib) MiB after the resize"
dmesg | grep -m1 'new size' || true

verify 0 --verify_only
verify "$old"
[ "$(nonzero $((new - 1)) 1)" -eq 0 ] || { echo "test: the grown tail is not zeros"; exit 26; }
echo "test: grown tail reads as zeros"
