#!/bin/sh
# Guest side (runs as /test.sh) of the vfio-user scenario: QEMU 11 attached nvmux's
# vfio-user PCI NVMe function (nvmux-vfiouser-probe on the host: a memory disk of
# SIZE_BYTES served by the crate's VfioUserExport).
#   1. a PCI function of class 0x010802 (NVMe) with nvmux's ids is on the bus, the nvme
#      driver binds and /dev/nvme0n1 appears with SIZE_BYTES;
#   2. nvme list shows the model "nvmux"; id-ctrl and id-ns are sane (sn, mn, oacs with
#      Doorbell Buffer Config, nsze); the controller has at least 2 I/O queues;
#   3. fio random write + crc32c verify at QD32 on 2 jobs pinned to 2 CPUs (so 2 queues),
#      4 KiB and 64 KiB (PRP lists);
#   4. 1 MiB written, blkdiscard, reads zeros;
#   5. RESIZE_BYTES > 0: prints NVMUX-READY-RESIZE; the host grows the disk and the
#      guest sees the new size (Namespace Attribute Changed event);
#   6. the nvme driver is unbound (a clean controller shutdown: CC.SHN, queues deleted).
# Exit status: 0, fio's status, or 30-49 (see the messages).
set -eu
. /guest-lib.sh
: "${SIZE_BYTES:?}" "${RESIZE_BYTES:?}"
modprobe nvme 2>/dev/null || true

# 1. the function and the driver
found=
for d in /sys/bus/pci/devices/*; do
    c=$(cat "$d/class")
    if [ "$c" = 0x010802 ]; then found=$d; fi
done
[ -n "$found" ] || { echo "test: no PCI function of class 0x010802"; exit 30; }
[ "$(cat "$found/vendor")" = 0x4e56 ] || { echo "test: the NVMe function is not nvmux's"; exit 31; }
echo "test: NVMe function ${found##*/}: $(cat "$found/vendor"):$(cat "$found/device")"
wait_for '[ -b /dev/nvme0n1 ]' 90 || { dmesg | grep -i nvme; echo "test: /dev/nvme0n1 did not appear"; exit 32; }
echo "test: driver $(basename "$(readlink "$found/driver")") bound, /dev/nvme0n1 is there"
[ "$(bytes nvme0n1)" -eq "$SIZE_BYTES" ] || { echo "test: size $(bytes nvme0n1), expected $SIZE_BYTES"; exit 33; }

# 2. identity
nvme list > /tmp/list.out 2>&1 || { cat /tmp/list.out; echo "test: nvme list failed"; exit 34; }
sed 's/^/test: nvme list: /' /tmp/list.out
grep -q ' nvmux ' /tmp/list.out || { echo "test: nvme list does not show the nvmux model"; exit 35; }
nvme id-ctrl /dev/nvme0 > /tmp/idctrl.out
nvme id-ns /dev/nvme0n1 > /tmp/idns.out
for kv in "sn=probe0" "mn=nvmux" "vid=0x4e56" "nn=1" "mdts=5" "oacs=0x100" "sqes=0x66" "cqes=0x44"; do
    got=$(field "${kv%%=*}" < /tmp/idctrl.out)
    [ "$got" = "${kv#*=}" ] || { cat /tmp/idctrl.out; echo "test: id-ctrl ${kv%%=*} is '$got', expected '${kv#*=}'"; exit 36; }
done
nsze=$(field nsze < /tmp/idns.out)
[ "$((nsze))" -eq $((SIZE_BYTES / 512)) ] || { cat /tmp/idns.out; echo "test: nsze $nsze"; exit 37; }
echo "test: id-ctrl sn probe0 mn nvmux vid 0x4e56 oacs 0x100 (doorbell buffer config); id-ns nsze $nsze"
nq=$(($(cat /sys/class/nvme/nvme0/queue_count) - 1))
[ "$nq" -ge 2 ] || { echo "test: $nq I/O queues, expected 2"; exit 38; }
echo "test: $nq I/O queues"

# 3-4. data and discard
nvme_data_checks 32 "vfio-user nvme"

# 5. resize
if [ "$RESIZE_BYTES" -gt 0 ]; then
    echo NVMUX-READY-RESIZE
    wait_for '[ "$(bytes nvme0n1)" -eq "$RESIZE_BYTES" ]' 30 ||
        { dmesg | tail; echo "test: nvme0n1 still $(bytes nvme0n1) bytes"; exit 45; }
    echo "test: resize seen: nvme0n1 $((RESIZE_BYTES >> 20)) MiB"
fi

# 6. clean shutdown of the controller
echo "${found##*/}" > /sys/bus/pci/drivers/nvme/unbind
wait_for '[ ! -e /dev/nvme0n1 ]' 10 || { echo "test: /dev/nvme0n1 still there after unbind"; exit 46; }
echo "test: nvme driver unbound (controller shut down)"
dmesg | grep -iE 'nvme|vfio' | sed 's/^/test: dmesg: /' | tail -n 20 || true
exit 0
