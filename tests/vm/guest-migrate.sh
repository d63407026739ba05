#!/bin/sh
# Guest side of the migrate scenarios (runs as /test.sh, see tests/vm/migrate.sh), while the
# host live-migrates this VM between two QEMU processes:
# - rounds of fio write + crc32c verify (random writes, QD16, 2 jobs over 0-32 MiB,
#   verify_backlog so that reads check data while writes go on), back to back;
# - beside them, the whole time, a reader: fio --verify_only passes (QD16) over 32-48 MiB,
#   written once at the start. Its buffers are written by the device only, never by the
#   guest's CPU, so when the dirty log misses read data, the reads completed at the
#   switch-over reach the destination as stale buffers and fail verification (the write
#   rounds' buffers are also dirtied by the CPU, which QEMU tracks itself).
# Before each new round the guest looks for the host's stop marker ("STOP" in the 4 KiB
# block at 63 MiB, written on the host when the migrations are done); then it checks the
# reader and dmesg.
# Prints "NVMUX-ROUND N" as each round starts. Exit: fio's status, 10 no disk, 20 no stop
# marker within MAX_S seconds (default 900), 21 I/O errors in dmesg, 22 the reader failed.
set -eu
dev=/dev/vda
max_s=${MAX_S:-900}
i=0
while [ ! -b "$dev" ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || { echo "test: $dev did not appear"; exit 10; }
    sleep 0.1
done
cpus=$(grep -c ^processor /proc/cpuinfo)
pin=""
[ "$cpus" -lt 2 ] || pin="--cpus_allowed=0-$((cpus - 1)) --cpus_allowed_policy=split"
echo "test: $dev $(($(cat /sys/block/vda/size) / 2048)) MiB, $(ls /sys/block/vda/mq | wc -l) queue(s), $cpus cpu(s)"
up() { cut -d. -f1 /proc/uptime; }
static="--filename=$dev --rw=write --bs=4k --offset=32M --size=16M --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c"
# shellcheck disable=SC2086
fio --name=static $static --do_verify=0 > /tmp/static.out 2>&1 || { cat /tmp/static.out; exit 30; }
# shellcheck disable=SC2086
fio --name=reader $static --verify_only --verify_fatal=1 --loops=1000000 > /tmp/reader.out 2>&1 &
reader=$!
start=$(up)
round=0
while :; do
    round=$((round + 1))
    echo "NVMUX-ROUND $round"
    set +e
    # shellcheck disable=SC2086
    fio --name=mig --filename="$dev" --rw=randwrite --bs=4k --size=16M \
        --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 --offset_increment=16M \
        --randrepeat=0 --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=256 \
        --group_reporting --eta=never $pin > /tmp/fio.out 2>&1
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        cat /tmp/fio.out
        echo "test: round $round: fio exit status $rc"
        exit "$rc"
    fi
    echo "test: round $round passed ($(grep -o 'err= *[0-9]*' /tmp/fio.out | tr -d ' ' | sort -u | tr '\n' ' '))"
    echo 3 > /proc/sys/vm/drop_caches
    marker=$(dd if="$dev" bs=4096 skip=$((63 * 256)) count=1 2>/dev/null | head -c 4)
    [ "$marker" != STOP ] || break
    [ $(($(up) - start)) -lt "$max_s" ] || { echo "test: no stop marker after $max_s s"; exit 20; }
done
echo "test: $round rounds of fio write+verify passed in $(($(up) - start)) s"
if kill -0 "$reader" 2>/dev/null; then
    kill -INT "$reader"
    wait "$reader" || true
    if grep -qi 'verify: \|bad magic\|verify failed' /tmp/reader.out; then
        cat /tmp/reader.out; echo "test: the reader saw bad data"; exit 22
    fi
    echo "test: reader: $(grep -o 'READ: bw=[^,]*, [^,]*, io=[^,]*' /tmp/reader.out | head -1) verified, no error"
else
    rc=0; wait "$reader" || rc=$?
    cat /tmp/reader.out
    echo "test: the reader (fio --verify_only) ended early with status $rc"
    exit 22
fi
if dmesg | grep -iE 'I/O error|blk_update_request|buffer I/O'; then
    echo "test: I/O errors in dmesg"
    exit 21
fi
echo "test: no I/O error in dmesg"
