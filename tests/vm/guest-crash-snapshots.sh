#!/bin/sh
# Guest side of the crash-snapshots scenario: a thin volume over vhost-user-blk (2 queues,
# QEMU's chardev reconnects), while the host snapshots it every second and kills the
# daemon with SIGKILL twice (restarting it each time).
#
# Two writers run at once, each pinned to its own vCPU (so each uses its own virtqueue
# with one request at a time; see run.sh for why that matters across a backend restart):
#   * CPU 0: fio randwrite with --verify=crc32c --verify_backlog (it re-reads and checks
#     what it wrote as it goes) over [16 MiB, 24 MiB), for RUNTIME seconds;
#   * CPU 1: numbered rounds over the first SLOTS x 64 KiB. Round r (from 1) writes slot
#     r % SLOTS: 16 blocks of 4 KiB, each its 64-byte header
#     "NVMUX-ROUND <r> SLOT <s> BLOCK <b>" repeated, with O_DIRECT, then fsync (a FLUSH).
#     Only after the fsync returns does it print "NVMUX-ROUND-DONE r": a round the host
#     has seen done was acknowledged and flushed before anything the host does next.
# The host checks the live volume and every snapshot against those markers once the
# guest is off. Markers: NVMUX-READY-CRASH (writers started), NVMUX-ROUNDS-END n.
# Exit status: 0, fio's status, or 60-62.
set -eu
. /guest-lib.sh
dev=/dev/vda
slots=${SLOTS:-32}
runtime=${RUNTIME:-40}

wait_disk "$dev" 60
nq=$(disk_queues "$dev")
[ "$nq" -ge 2 ] || { echo "test: need 2 queues (one per writer)"; exit 61; }

# The rounds writer, as its own script so that taskset can pin it.
cat > /tmp/rounds.sh <<'EOS'
dev=$1 slots=$2
# One 4 KiB block of round $1, slot $2, block $3 on stdout.
block() {
    # 43 bytes + 20 spaces + newline = 64; 64 of them = 4096.
    h=$(printf 'NVMUX-ROUND %010d SLOT %04d BLOCK %04d%20s' "$1" "$2" "$3" "")
    b="$h
"
    for _ in 1 2 3 4 5 6; do b="$b$b"; done
    printf '%s' "$b"
}
r=0
while [ ! -e /tmp/stop ]; do
    r=$((r + 1))
    s=$((r % slots))
    : > /tmp/round
    for b in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do block "$r" "$s" "$b" >> /tmp/round; done
    # bs=4k: one request at a time; conv=fsync: a FLUSH once the 16 writes completed.
    if ! dd if=/tmp/round of="$dev" bs=4k seek=$((s * 16)) count=16 oflag=direct conv=fsync,notrunc 2>/tmp/dd.err; then
        cat /tmp/dd.err
        echo "test: round $r failed"
        exit 1
    fi
    echo "NVMUX-ROUND-DONE $r"
done
echo "$r" > /tmp/rounds.done
EOS
taskset 2 sh /tmp/rounds.sh "$dev" "$slots" &
rpid=$!

taskset 1 fio --name=crash --filename="$dev" --rw=randwrite --bs=4k --offset=16M --size=8M \
    --ioengine=libaio --direct=1 --iodepth=1 --randrepeat=1 --verify=crc32c \
    --verify_backlog=256 --verify_fatal=1 --time_based --runtime="$runtime" \
    --eta=never > /tmp/fio.out 2>&1 &
fpid=$!
sleep 1
echo NVMUX-READY-CRASH

rc=0
wait "$fpid" || rc=$?
touch /tmp/stop
rrc=0
wait "$rpid" || rrc=$?
grep -E 'err=|verify|IOPS|crc' /tmp/fio.out || true
dmesg | grep -iE 'virtio|vda|I/O error|blk_update' | tail -n 8 || true
[ "$rc" -eq 0 ] || { cat /tmp/fio.out; echo "test: fio failed across the crashes (rc $rc)"; exit "$rc"; }
echo "test: fio write + verify_backlog passed across the crashes"
[ "$rrc" -eq 0 ] && [ -s /tmp/rounds.done ] || { echo "test: the rounds writer failed"; exit 62; }
echo "NVMUX-ROUNDS-END $(cat /tmp/rounds.done)"
sync
