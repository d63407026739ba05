#!/bin/sh
# Guest side (runs as /test.sh) of the vfio-user scenario: QEMU 11 attached nvmux's
# vfio-user PCI NVMe function (nvmux-vfiouser-probe on the host).
#   1. a PCI function of class 0x010802 (NVMe) with nvmux's ids is on the bus;
#   2. the nvme driver probes it and enables the controller; the host side logs the
#      admin commands it reads from guest memory (the controller does not complete
#      them yet: the driver waits, which this test does not).
# Exit status: 0, or 30-39 (see the messages).
set -eu
modprobe nvme 2>/dev/null || true
found=
for d in /sys/bus/pci/devices/*; do
    c=$(cat "$d/class") v=$(cat "$d/vendor") i=$(cat "$d/device")
    echo "test: pci ${d##*/} class $c vendor $v device $i"
    if [ "$c" = 0x010802 ]; then found=$d; fi
done
[ -n "$found" ] || { echo "test: no PCI function of class 0x010802"; exit 30; }
[ "$(cat "$found/vendor")" = 0x4e56 ] || { echo "test: the NVMe function is not nvmux's"; exit 31; }
echo "test: NVMe function ${found##*/}: $(cat "$found/vendor"):$(cat "$found/device")"
# The driver enables the controller and submits Identify, which the host logs (the
# controller does not complete it yet: Linux 6.1 probes asynchronously and gives up
# after its 60 s admin timeout, so the driver is not bound yet).
sleep 5
if [ -L "$found/driver" ]; then
    echo "test: driver $(basename "$(readlink "$found/driver")") bound to ${found##*/}"
fi
dmesg | grep -i nvme | sed 's/^/test: dmesg: /' || true
exit 0
