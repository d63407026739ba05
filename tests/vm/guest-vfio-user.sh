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
: "${SIZE_BYTES:?}" "${RESIZE_BYTES:?}"
modprobe nvme 2>/dev/null || true

wait_for() {
    i=0
    while ! eval "$1"; do
        i=$((i + 1))
        [ "$i" -le $(($2 * 5)) ] || return 1
        sleep 0.2
    done
}
bytes() { echo $(($(cat "/sys/block/$1/size") * 512)); }
nonzero() { dd if=/dev/nvme0n1 bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | tr -d '\000' | wc -c; }
field() { sed -n "s/^$1 *: *//p" | sed 's/ *$//' | head -n1; }

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

# 3. data
fio --name=small --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=8M --offset_increment=8M \
    --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --iodepth=32 --ioengine=libaio \
    --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --minimal > /tmp/fio1.out 2>&1 ||
    { rc=$?; cat /tmp/fio1.out; exit "$rc"; }
fio --name=big --filename=/dev/nvme0n1 --rw=randwrite --bs=64k --size=8M --offset=16M --iodepth=8 \
    --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never \
    --minimal > /tmp/fio2.out 2>&1 || { rc=$?; cat /tmp/fio2.out; exit "$rc"; }
echo "test: fio crc32c verify passed (2 jobs x 8 MiB of 4 KiB at QD32, 8 MiB of 64 KiB)"
iops=$(fio --name=perf --filename=/dev/nvme0n1 --rw=randread --bs=4k --size=32M --ioengine=libaio \
    --direct=1 --iodepth=32 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --time_based --runtime=3 --group_reporting --minimal | awk -F';' '{ print $8 }')
echo "test: TCG guest vfio-user nvme 4K randread QD32 x 2 jobs: $iops IOPS"

# 4. discard
dd if=/dev/urandom of=/dev/nvme0n1 bs=1M seek=24 count=1 oflag=direct 2>/dev/null
[ "$(nonzero 24 1)" -gt 0 ] || { echo "test: written MiB reads as zeros"; exit 41; }
blkdiscard -o $((24 << 20)) -l $((1 << 20)) /dev/nvme0n1
[ "$(nonzero 24 1)" -eq 0 ] || { echo "test: discarded MiB does not read as zeros"; exit 42; }
echo "test: blkdiscard then read returns zeros"

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
