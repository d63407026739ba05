#!/bin/sh
# Guest side (runs as /test.sh) of the NVMe/TCP scenario. The host serves subsystem NQN
# on TARGET_IP:PORT with namespace 1 (SIZE_BYTES, NGUID) and HOSTNQN on its allow-list.
#   1. nvme discover lists NQN;
#   2. DENIED_HOSTNQN cannot connect;
#   3. nvme connect (2 I/O queues): /dev/nvme0n1 appears with SIZE_BYTES and NGUID, and
#      id-ctrl / id-ns show SERIAL, MODEL, NQN and the size;
#   4. fio random write + crc32c verify: 2 jobs pinned to 2 CPUs (so 2 queues), 4 KiB
#      (in-capsule data) and 64 KiB (R2T + H2CData) writes;
#   5. 1 MiB written, blkdiscard, reads zeros;
#   6. prints NVMUX-READY-ADD; the host adds namespace 2 (NS2_SIZE_BYTES): /dev/nvme0n2
#      appears through the namespace-changed event;
#   7. prints NVMUX-READY-RESIZE; the host grows namespace 2 to NS2_NEW_SIZE_BYTES and the
#      guest sees the new size;
#   8. nvme disconnect is clean.
# Exit status: 0, fio's status, or 30-49 (see the messages).
set -eu
. /guest-lib.sh
: "${TARGET_IP:?}" "${PORT:?}" "${NQN:?}" "${HOSTNQN:?}" "${HOSTID:?}" "${DENIED_HOSTNQN:?}"
: "${SIZE_BYTES:?}" "${NGUID:?}" "${SERIAL:?}" "${MODEL:?}" "${NS2_SIZE_BYTES:?}" "${NS2_NEW_SIZE_BYTES:?}"

modprobe virtio_net
modprobe nvme_tcp
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0

# 1. discovery
nvme discover -t tcp -a "$TARGET_IP" -s "$PORT" --hostnqn="$HOSTNQN" --hostid="$HOSTID" > /tmp/disc.out 2>&1 ||
    { cat /tmp/disc.out; echo "test: nvme discover failed"; exit 30; }
grep -q "subnqn: *$NQN\$" /tmp/disc.out || { cat /tmp/disc.out; echo "test: discovery does not list $NQN"; exit 31; }
echo "test: nvme discover lists $NQN"

# 2. a host NQN not on the allow-list
if nvme connect -t tcp -a "$TARGET_IP" -s "$PORT" -n "$NQN" --hostnqn="$DENIED_HOSTNQN" \
        --hostid=00000000-0000-4000-8000-00000000dead > /tmp/deny.out 2>&1; then
    cat /tmp/deny.out; echo "test: a host not on the allow-list connected"; exit 32
fi
[ ! -e /dev/nvme0n1 ] || { echo "test: a namespace appeared for the denied host"; exit 33; }
echo "test: denied host refused: $(head -n1 /tmp/deny.out)"

# 3. connect, identity
nvme connect -t tcp -a "$TARGET_IP" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" -i 2 ||
    { echo "test: nvme connect failed"; exit 34; }
wait_for '[ -b /dev/nvme0n1 ]' 10 || { echo "test: /dev/nvme0n1 did not appear"; exit 35; }
[ "$(bytes nvme0n1)" -eq "$SIZE_BYTES" ] || { echo "test: size $(bytes nvme0n1), expected $SIZE_BYTES"; exit 36; }
nvme id-ns /dev/nvme0n1 > /tmp/idns.out
nvme id-ctrl /dev/nvme0 > /tmp/idctrl.out
nguid=$(field nguid < /tmp/idns.out)
[ "$nguid" = "$NGUID" ] || { echo "test: nguid $nguid, expected $NGUID"; exit 37; }
nsze=$(field nsze < /tmp/idns.out)
[ "$((nsze))" -eq $((SIZE_BYTES / 512)) ] || { echo "test: nsze $nsze"; exit 38; }
for kv in "sn=$SERIAL" "mn=$MODEL" "subnqn=$NQN" "cntrltype=1"; do
    got=$(field "${kv%%=*}" < /tmp/idctrl.out)
    [ "$got" = "${kv#*=}" ] || { echo "test: id-ctrl ${kv%%=*} is '$got', expected '${kv#*=}'"; exit 39; }
done
# /dev/nvme0n1 is the multipath head (bio based, no mq directory): count the
# controller's queues instead (admin + I/O).
nq=$(($(cat /sys/class/nvme/nvme0/queue_count) - 1))
[ "$nq" -ge 2 ] || { echo "test: $nq I/O queues, expected 2"; exit 40; }
echo "test: /dev/nvme0n1 $((SIZE_BYTES >> 20)) MiB, nguid $nguid, sn $SERIAL, $nq I/O queues"

# 4-5. data and discard
nvme_data_checks 16 "nvme-tcp"

# 6. hot-add
echo NVMUX-READY-ADD
wait_for '[ -b /dev/nvme0n2 ]' 30 || { dmesg | tail; echo "test: /dev/nvme0n2 did not appear"; exit 43; }
[ "$(bytes nvme0n2)" -eq "$NS2_SIZE_BYTES" ] || { echo "test: nvme0n2 size $(bytes nvme0n2)"; exit 44; }
echo "test: hot-added namespace seen: nvme0n2 $((NS2_SIZE_BYTES >> 20)) MiB"

# 7. resize
echo NVMUX-READY-RESIZE
wait_for '[ "$(bytes nvme0n2)" -eq "$NS2_NEW_SIZE_BYTES" ]' 30 ||
    { dmesg | tail; echo "test: nvme0n2 still $(bytes nvme0n2) bytes"; exit 45; }
nvme list
echo "test: resize seen: nvme0n2 $((NS2_NEW_SIZE_BYTES >> 20)) MiB"

# 8. disconnect
nvme disconnect -n "$NQN" > /tmp/disc2.out 2>&1 || { cat /tmp/disc2.out; echo "test: disconnect failed"; exit 46; }
grep -q "disconnected 1 controller" /tmp/disc2.out || { cat /tmp/disc2.out; exit 47; }
wait_for '[ ! -e /dev/nvme0n1 ]' 5 || { echo "test: /dev/nvme0n1 still there"; exit 48; }
echo "test: nvme disconnect clean"
