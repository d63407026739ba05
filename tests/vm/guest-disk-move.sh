#!/bin/sh
# Guest side of the disk-move scenario (/dev/vda, at least 64 MiB), two boots:
#
# VERIFY_ONLY=0 (first boot, while the host runs `nvmux disk move`): two fio jobs at once,
#   "churn": random 4 KiB writes at QD16 with --verify=crc32c (verify_backlog: re-read and
#            checked as it goes) on the first 32 MiB for RUNTIME s (default 40);
#   "keep":  a sequential write of the second 32 MiB in 64 KiB blocks, rate-limited to
#            RATE (default 1m, so it spans the move), then verified (--do_verify).
#   Marker NVMUX-READY-MOVE when both run. Fails on any fio error or an I/O error in dmesg.
# VERIFY_ONLY=1 (second boot, after the move): "keep" again with --verify_only: every
#   block the first boot wrote there is read back (now from the disk's new backend) and
#   checked.
# Exit status: 0, fio's status, 60 (no disk), 70 (fio hung), 71 (I/O error in dmesg).
set -u
. /guest-lib.sh
dev=/dev/vda
runtime=${RUNTIME:-40}
rate=${RATE:-1m}
grace=${GRACE:-120}

wait_disk "$dev" 60

keep() {   # extra fio options
    fio --name=keep --filename="$dev" --rw=write --bs=64k --offset=32M --size=32M \
        --ioengine=libaio --direct=1 --iodepth=4 --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --rate="$rate" --eta=never "$@"
}

check_dmesg() {
    ioerr=$(dmesg | grep -iE 'I/O error|blk_update_request|print_req_error|critical medium|virtio.*(error|broken)' || true)
    if [ -n "$ioerr" ]; then
        echo "$ioerr" | sed 's/^/test: dmesg: /' | tail -n 8
        echo "test: I/O errors in the kernel log"
        exit 71
    fi
}

if [ "${VERIFY_ONLY:-0}" = 1 ]; then
    keep --verify_only > /tmp/keep.out 2>&1
    rc=$?
    grep -E 'err=|verify|bad|crc' /tmp/keep.out || true
    [ "$rc" -eq 0 ] || { cat /tmp/keep.out; echo "test: verify_only of the kept 32 MiB failed (rc $rc)"; exit "$rc"; }
    check_dmesg
    echo "test: verify_only: the 32 MiB written before and during the move read back intact"
    exit 0
fi

fio --name=churn --filename="$dev" --rw=randwrite --bs=4k --size=32M \
    --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=1 --verify=crc32c \
    --verify_backlog=64 --verify_fatal=1 --time_based --runtime="$runtime" \
    --eta=never > /tmp/churn.out 2>&1 &
cpid=$!
keep > /tmp/keep.out 2>&1 &
kpid=$!
sleep 1
echo NVMUX-READY-MOVE

t=0
while kill -0 "$cpid" 2>/dev/null || kill -0 "$kpid" 2>/dev/null; do
    if [ "$t" -ge $((runtime + grace)) ]; then
        echo "test: fio hung: still running ${t}s after it started"
        exit 70
    fi
    sleep 1
    t=$((t + 1))
done
crc=0 krc=0
wait "$cpid" || crc=$?
wait "$kpid" || krc=$?
grep -E 'err=|verify|bad|crc' /tmp/churn.out /tmp/keep.out || true
[ "$crc" -eq 0 ] || { cat /tmp/churn.out; echo "test: churn fio failed (rc $crc)"; exit "$crc"; }
[ "$krc" -eq 0 ] || { cat /tmp/keep.out; echo "test: keep fio failed (rc $krc)"; exit "$krc"; }
check_dmesg
echo "test: churn (random writes + verify, ${runtime}s) and keep (32 MiB sequential + verify) passed, no I/O error in dmesg"
