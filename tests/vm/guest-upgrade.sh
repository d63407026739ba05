#!/bin/sh
# Guest side of the upgrade scenario (runs as /test.sh): fio write+verify rounds
# (crc32c, 4 KiB random writes at QD16 over 32 MiB, a new seed each round) on /dev/vda
# for RUNTIME seconds (default 60) while the host runs `nvmux upgrade` under it. Any fio
# error or an I/O error in the kernel log fails the test.
set -eu
dev=/dev/vda
i=0
while [ ! -b "$dev" ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || { echo "test: $dev did not appear"; exit 10; }
    sleep 0.1
done
end=$(($(date +%s) + ${RUNTIME:-60}))
round=0
while [ "$(date +%s)" -lt "$end" ]; do
    round=$((round + 1))
    echo "test: round $round start"
    set +e
    fio --name=upgrade --filename="$dev" --rw=randwrite --bs=4k --size=32M \
        --ioengine=libaio --direct=1 --iodepth=16 --randseed="$round" \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never \
        --output=/tmp/fio.out
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        cat /tmp/fio.out
        echo "test: round $round: fio exit status $rc"
        exit 1
    fi
    grep -q 'err= 0' /tmp/fio.out || { cat /tmp/fio.out; echo "test: round $round: fio reported errors"; exit 1; }
done
if dmesg | grep -iE 'i/o error|blk_update_request|buffer i/o|virtio_blk.*error'; then
    echo "test: the guest kernel logged I/O errors"
    exit 1
fi
echo "test: $round rounds of fio write+verify, 0 errors, no kernel I/O error"
