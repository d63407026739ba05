#!/bin/sh
# Guest side (runs as /test.sh) of `nvmux bench suite --only vfio-user`
# (crates/bench/src/guestio.rs): fio 4 KiB random reads at QD32 on the disk under test,
# one job, for RUNTIME seconds, after a 1 s warm-up.
#   DEV_KIND=virtio   the one virtio-blk disk, /dev/vda (vhost-user-blk)
#   DEV_KIND=nvme     a PCI NVMe controller (nvmux's vfio-user export), /dev/nvme0n1
#   DEV_KIND=nvmf     the kernel's NVMe/TCP initiator: connect to NQN on TARGET_IP:PORT as
#                     HOSTNQN/HOSTID (one I/O queue), then /dev/nvme0n1
# The host samples CPU times at NVMUX-FIO-BEGIN and NVMUX-FIO-END; fio's terse line
# follows as "NVMUX-FIO: ..." (field 6: KiB read, 8: IOPS, 9: runtime in ms).
# Exit status: 0, fio's status, or 50-59 (see the messages).
set -eu
. /guest-lib.sh
: "${DEV_KIND:?}" "${RUNTIME:?}"
case $DEV_KIND in
    virtio)
        dev=/dev/vda
        wait_for '[ -b /dev/vda ]' 10 || { echo "test: /dev/vda did not appear"; exit 52; }
        ;;
    nvme)
        modprobe nvme 2>/dev/null || true
        dev=/dev/nvme0n1
        wait_for '[ -b /dev/nvme0n1 ] || dmesg | grep -q "Removing after probe failure"' 90
        [ -b /dev/nvme0n1 ] || { dmesg | grep -i nvme | tail -n 5; echo "test: /dev/nvme0n1 did not appear"; exit 54; }
        ;;
    nvmf)
        nvmf_attach_one_queue
        dev=/dev/nvme0n1
        ;;
    *) echo "test: DEV_KIND must be virtio, nvme or nvmf"; exit 55 ;;
esac
echo "test: $DEV_KIND disk $dev, $(($(cat /sys/block/${dev#/dev/}/size) / 2048)) MiB"
job() { # RUNTIME
    fio --name=rr --filename="$dev" --rw=randread --bs=4k --iodepth=32 --numjobs=1 \
        --ioengine=libaio --direct=1 --time_based --runtime="$1" --size=128M \
        --randrepeat=0 --norandommap --eta=never --minimal
}
job 1 > /dev/null 2>&1 || true
echo NVMUX-FIO-BEGIN
rc=0
out=$(job "$RUNTIME" 2>&1) || rc=$?
echo NVMUX-FIO-END
echo "NVMUX-FIO: $out"
exit "$rc"
