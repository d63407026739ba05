#!/bin/sh
# Guest side (runs as /test.sh) of the rbd scenario: one RBD-backed disk, exported by the
# host daemon over vhost-user-blk (2 queues, /dev/vda) AND as namespace 1 of an NVMe/TCP
# subsystem (NQN on TARGET_IP:PORT).
#   1. /dev/vda: fio random write + crc32c verify of region 1 (32 MiB at 0);
#   2. the kernel's nvme-tcp connects (2 I/O queues): /dev/nvme0n1 has the size of
#      /dev/vda; fio random write + crc32c verify of region 2 (32 MiB at 64 MiB);
#   3. nvme disconnect; no I/O error in the kernel log.
# The host then re-reads both regions over NBD with fio --verify_only and the SAME job
# parameters (region_fio below and rbd_fio in run.sh must stay identical: fio's verify
# headers carry the offset, length and random seed of each block).
# Exit status: 0, fio's status, or 80-87 (see the messages).
set -u
. /guest-lib.sh
: "${TARGET_IP:?}" "${PORT:?}" "${NQN:?}" "${HOSTNQN:?}" "${HOSTID:?}"

# region_fio NAME DEV OFFSET: 32 MiB of 4 KiB random writes at QD16, crc32c verified.
region_fio() {
    fio --name="$1" --filename="$2" --rw=randwrite --bs=4k --offset="$3" --size=32M \
        --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=1 --verify=crc32c \
        --do_verify=1 --verify_fatal=1 --eta=never > "/tmp/$1.out" 2>&1
}

wait_disk /dev/vda 80
vda_bytes=$(bytes vda)
[ "$vda_bytes" -ge $((192 << 20)) ] || { echo "test: /dev/vda is $vda_bytes bytes, want >= 192 MiB"; exit 81; }

rc=0
region_fio region1 /dev/vda 0 || rc=$?
grep -E 'err=|verify|IOPS' /tmp/region1.out || true
[ "$rc" -eq 0 ] || { cat /tmp/region1.out; echo "test: region 1 (vhost-user) fio failed (rc $rc)"; exit "$rc"; }
echo "test: region 1: fio randwrite 32 MiB QD16 + crc32c verify over vhost-user passed"

modprobe virtio_net
modprobe nvme_tcp
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
nvme connect -t tcp -a "$TARGET_IP" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" -i 2 ||
    { echo "test: nvme connect failed"; exit 82; }
wait_for '[ -b /dev/nvme0n1 ]' 10 || { echo "test: /dev/nvme0n1 did not appear"; exit 83; }
[ "$(bytes nvme0n1)" -eq "$vda_bytes" ] ||
    { echo "test: nvme0n1 is $(bytes nvme0n1) bytes, vda $vda_bytes: not the same disk?"; exit 84; }
nq=$(($(cat /sys/class/nvme/nvme0/queue_count) - 1))
echo "test: /dev/nvme0n1 over NVMe/TCP: $((vda_bytes >> 20)) MiB, $nq I/O queues"

rc=0
region_fio region2 /dev/nvme0n1 64M || rc=$?
grep -E 'err=|verify|IOPS' /tmp/region2.out || true
[ "$rc" -eq 0 ] || { cat /tmp/region2.out; echo "test: region 2 (NVMe/TCP) fio failed (rc $rc)"; exit "$rc"; }
echo "test: region 2: fio randwrite 32 MiB QD16 + crc32c verify over NVMe/TCP (kernel initiator) passed"

# Region 1 once more through the NVMe/TCP path: what vhost-user wrote, nvme-tcp reads.
rc=0
fio --name=region1 --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --offset=0 --size=32M \
    --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=1 --verify=crc32c \
    --verify_only --verify_fatal=1 --eta=never > /tmp/region1-nvme.out 2>&1 || rc=$?
[ "$rc" -eq 0 ] || { cat /tmp/region1-nvme.out; echo "test: region 1 read back over NVMe/TCP failed verify (rc $rc)"; exit 85; }
echo "test: region 1 (written over vhost-user) verified over NVMe/TCP"

nvme disconnect -n "$NQN" > /tmp/disc.out 2>&1 || { cat /tmp/disc.out; echo "test: nvme disconnect failed"; exit 86; }
ioerr=$(dmesg | grep -iE 'I/O error|blk_update_request|print_req_error|critical medium|virtio.*(error|broken)' || true)
if [ -n "$ioerr" ]; then
    echo "$ioerr" | sed 's/^/test: dmesg: /' | tail -n 8
    echo "test: I/O errors in the kernel log"
    exit 87
fi
echo "test: no I/O error in the kernel log"
