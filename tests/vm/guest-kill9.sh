#!/bin/sh
# Guest side of the kill9-inflight and kill9-no-inflight scenarios: fio random writes at
# queue depth 16 with --verify=crc32c (verify_backlog: it re-reads and checks what it wrote
# as it goes) on /dev/vda for RUNTIME seconds, while the host kills the daemon with SIGKILL
# and restarts it (QEMU's chardev reconnects) and the daemon holds every completion for a
# random 0-30 ms (test fault vhost-complete-delay), so requests are in flight, completing
# out of order, whenever it dies.
#
# Markers: NVMUX-READY-KILL9 (fio started). Results on the console:
#   "test: fio hung" (a request never completed: fio still running GRACE s after its
#   runtime), fio's own error and verify lines, and I/O errors from the kernel log.
# Exit status: 0 (fio passed, no I/O error in dmesg), 70 (hung), 71 (I/O error in dmesg),
# 60 (no disk), or fio's status.
set -u
. /guest-lib.sh
dev=/dev/vda
runtime=${RUNTIME:-60}
grace=${GRACE:-60}

wait_disk "$dev" 60

fio --name=kill9 --filename="$dev" --rw=randwrite --bs=4k --size=32M \
    --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=1 --verify=crc32c \
    --verify_backlog=64 --verify_fatal=1 --time_based --runtime="$runtime" \
    --eta=never > /tmp/fio.out 2>&1 &
fpid=$!
sleep 1
echo NVMUX-READY-KILL9

# fio must end within its runtime plus a grace period: a request the device never
# completes leaves it waiting for ever.
fio_wait "$fpid" $((runtime + grace))
rc=0
wait "$fpid" || rc=$?
grep -E 'err=|verify|IOPS|crc|bad' /tmp/fio.out || true
ioerr=$(io_errors)
fio_verdict "$rc" "$ioerr" "the kills"
echo "test: fio randwrite QD16 + verify passed across the kills, no I/O error in dmesg"
