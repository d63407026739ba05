#!/bin/sh
# Guest side (runs as /test.sh): write a crc32c-verified random pattern to
# /dev/vda with fio, read it back and verify it. With VERIFY_ONLY=1, only
# re-read and verify what an earlier boot wrote (fio --verify_only issues no
# writes), so any change of the data on the host in between must fail.
# Exit status: fio's, or 10-13 when the device is missing or has fewer queues
# than expected.
# Env (from /test.env, see boot.sh --env): EXPECT_QUEUES (default 1): the disk
# must expose, and fio must actually use, at least that many virtqueues;
# VERIFY_ONLY (default 0).
set -eu
dev=/dev/vda
blk=/sys/block/vda
expect=${EXPECT_QUEUES:-1}

i=0
while [ ! -b "$dev" ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || { echo "test: $dev did not appear"; exit 10; }
    sleep 0.1
done

sectors=$(cat "$blk/size")
nq=$(ls "$blk/mq" | wc -l)
cpus=$(grep -c ^processor /proc/cpuinfo)
echo "test: $dev size=$((sectors / 2048))MiB ($sectors sectors) mq-queues=$nq cpus=$cpus expect-queues=$expect"
[ "$nq" -ge "$expect" ] || { echo "test: expected >= $expect queues, guest sees $nq (boot with --smp >= queues)"; exit 11; }
# 2 jobs x 16 MiB at offsets 0 and 16 MiB.
[ "$sectors" -ge $((32 * 2048)) ] || { echo "test: disk smaller than 32 MiB"; exit 12; }

# Completions per request virtqueue, summed over CPUs (one MSI-X vector each).
irqs() { awk '/virtio[0-9]+-req\./ { s = 0; for (i = 2; $i ~ /^[0-9]+$/; i++) s += $i; print $NF, s }' /proc/interrupts; }
irqs > /tmp/irq.before

# blk-mq picks the queue from the submitting CPU: pin job N to CPU N so that
# both jobs (and so both queues) are busy.
pin=""
[ "$cpus" -lt 2 ] || pin="--cpus_allowed=0-$((cpus - 1)) --cpus_allowed_policy=split"

only=""
[ "${VERIFY_ONLY:-0}" != 1 ] || only="--verify_only"

set +e
# shellcheck disable=SC2086
fio --name=verify --filename="$dev" --rw=randwrite --bs=4k --size=16M \
    --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 --offset_increment=16M \
    --randrepeat=1 --verify=crc32c --do_verify=1 --verify_fatal=1 $only \
    --group_reporting --eta=never $pin
rc=$?
set -e
echo "test: fio exit status $rc"
[ "$rc" -eq 0 ] || exit "$rc"

irqs > /tmp/irq.after
awk 'NR == FNR { b[$1] = $2; next } { print "test: queue", $1, "completions", $2 - b[$1] }' \
    /tmp/irq.before /tmp/irq.after
used=$(awk 'NR == FNR { b[$1] = $2; next } $2 > b[$1] { n++ } END { print n + 0 }' /tmp/irq.before /tmp/irq.after)
echo "test: $used queue(s) carried I/O"
[ "$used" -ge "$expect" ] || { echo "test: expected I/O on >= $expect queues"; exit 13; }

# A TCG-bound throughput figure, for comparison with the NVMe/TCP scenario's.
if [ "${VERIFY_ONLY:-0}" != 1 ]; then
    # shellcheck disable=SC2086
    iops=$(fio --name=perf --filename="$dev" --rw=randread --bs=4k --size=32M --ioengine=libaio \
        --direct=1 --iodepth=32 --numjobs=2 --time_based --runtime=3 --group_reporting \
        --minimal $pin | awk -F';' '{ print $8 }')
    echo "test: TCG guest virtio-blk 4K randread QD32 x 2 jobs: $iops IOPS"
fi
