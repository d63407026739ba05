#!/bin/sh
# Guest side (runs as /test.sh) of the classifier scenario. The host loaded
# examples/classifiers/guard.c into this disk, guarding blocks [0, 2048): the first MiB.
#   1. an O_DIRECT write into the first MiB fails (the guard completes it with Write
#      Protected; virtio-blk reports an I/O error), and reading it works;
#   2. fio writes and crc32c-verifies 16 MiB from offset 1 MiB (outside the range);
#   3. prints NVMUX-READY-UNGUARD; the host removes the classifier while the guest runs;
#      the same write into the first MiB then succeeds, with no reattach.
# Exit status: 0, fio's status, or 30-33 (see the messages).
set -eu
dev=/dev/vda

i=0
while [ ! -b "$dev" ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || { echo "test: $dev did not appear"; exit 30; }
    sleep 0.1
done

if dd if=/dev/urandom of="$dev" bs=4k seek=16 count=1 oflag=direct 2>/tmp/dd.err; then
    echo "test: a write into the guarded range succeeded"
    exit 31
fi
echo "test: write into the guarded range refused: $(head -n1 /tmp/dd.err)"
dd if="$dev" of=/dev/null bs=1M count=1 iflag=direct 2>/dev/null || { echo "test: reading the guarded range failed"; exit 32; }
echo "test: reading the guarded range works"

fio --name=outside --filename="$dev" --rw=randwrite --bs=4k --size=16M --offset=1M \
    --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=1 --verify=crc32c \
    --do_verify=1 --verify_fatal=1 --eta=never --minimal > /tmp/fio.out 2>&1 || {
    rc=$?
    cat /tmp/fio.out
    exit "$rc"
}
echo "test: fio write+verify of 16 MiB outside the range: ok"

echo "NVMUX-READY-UNGUARD"
i=0
until dd if=/dev/urandom of="$dev" bs=4k seek=16 count=1 oflag=direct 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -le 300 ] || { echo "test: the guarded range is still refused 60 s after the host's swap"; exit 33; }
    sleep 0.2
done
echo "test: after the host removed the classifier, the write succeeds"
