#!/bin/sh
# Guest side of the daemon-restart scenario: connect with a 1 s reconnect delay, run a
# rate-limited fio write + crc32c verify, print NVMUX-READY-RESTART while it runs (the
# host restarts the daemon then), and require that fio finishes without an error and
# that the kernel reconnected by itself.
# Exit status: 0, fio's status, or 50-53.
set -eu
: "${TARGET_IP:?}" "${PORT:?}" "${NQN:?}" "${HOSTNQN:?}" "${HOSTID:?}"
modprobe virtio_net
modprobe nvme_tcp
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0

nvme connect -t tcp -a "$TARGET_IP" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" \
    -i 2 --reconnect-delay=1 --ctrl-loss-tmo=60 || { echo "test: nvme connect failed"; exit 50; }
i=0
while [ ! -b /dev/nvme0n1 ]; do
    i=$((i + 1)); [ "$i" -le 50 ] || { echo "test: /dev/nvme0n1 did not appear"; exit 51; }
    sleep 0.2
done
# About 11 s of writes at 1500 IOPS, then the verify pass.
fio --name=restart --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=16M --iodepth=8 \
    --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --rate_iops=1500 --eta=never > /tmp/fio.out 2>&1 &
pid=$!
sleep 1
echo NVMUX-READY-RESTART
rc=0
wait "$pid" || rc=$?
grep -E 'err=|verify|IOPS' /tmp/fio.out || true
dmesg | grep -E 'nvme|nvme0n1' | grep -v 'requeuing I/O' | tail -n 12
[ "$rc" -eq 0 ] || { cat /tmp/fio.out; echo "test: fio failed across the restart (rc $rc)"; exit "$rc"; }
dmesg | grep -q 'Successfully reconnected' || { echo "test: no reconnect in the kernel log"; exit 52; }
echo "test: fio verify passed across the daemon restart; $(dmesg | grep -o 'Successfully reconnected.*' | tail -n1)"
nvme disconnect -n "$NQN" > /dev/null || { echo "test: disconnect failed"; exit 53; }
