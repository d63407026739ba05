#!/bin/sh
# Guest side (runs as /test.sh) of the NVMe/TCP DH-HMAC-CHAP scenario, with the guest
# kernel's initiator (nvme-cli 2.3; the kernel must have CONFIG_NVME_HOST_AUTH, which
# Debian 12's Linux 6.1 lacks and its Linux 6.12 has). The host serves subsystem NQN on
# TARGET_IP:PORT: HOSTNQN with secret SECRET and controller secret CTRL_SECRET; the
# discovery controller admits hosts on some allow-list.
#   1. nvme discover as HOSTNQN lists NQN; as STRANGER (on no allow-list) it fails;
#   2. nvme connect without a secret, and with WRONG_SECRET, fails (no namespace);
#   3. with SECRET: the kernel authenticates (hash and DH group in dmesg), fio verify;
#   4. with SECRET and CTRL_SECRET: bidirectional ("controller authenticated"), fio;
#   5. with SECRET and a wrong controller secret: the kernel refuses the controller;
#   6. prints NVMUX-READY-CLOSE; the host restarts the daemon with discovery "closed":
#      nvme discover as HOSTNQN now fails too.
# Exit status: 0, fio's status, or 60-79 (see the messages).
set -eu
. /guest-lib.sh
: "${TARGET_IP:?}" "${PORT:?}" "${NQN:?}" "${HOSTNQN:?}" "${HOSTID:?}" "${STRANGER:?}" "${STRANGER_ID:?}"
: "${SECRET:?}" "${CTRL_SECRET:?}" "${WRONG_SECRET:?}"

modprobe virtio_net
modprobe nvme_tcp
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "test: kernel $(uname -r)"

conn() { # extra nvme connect options...
    nvme connect -t tcp -a "$TARGET_IP" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" \
        -i 2 --ctrl-loss-tmo=1 --reconnect-delay=1 "$@"
}
disconnect() {
    nvme disconnect -n "$NQN" > /dev/null 2>&1 || true
    wait_for '[ ! -e /dev/nvme0n1 ]' 10 || { echo "test: /dev/nvme0n1 still there"; exit 79; }
}
verify() { # name
    fio --name="$1" --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --bsrange=4k-64k --size=4M \
        --iodepth=8 --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --eta=never --minimal > /tmp/fio.out 2>&1 || { rc=$?; cat /tmp/fio.out; exit "$rc"; }
}
refused() { # what, exit code, nvme connect options...
    what=$1 code=$2; shift 2
    if conn "$@" > /tmp/refused.out 2>&1; then
        cat /tmp/refused.out; echo "test: $what connected"; exit "$code"
    fi
    [ ! -e /dev/nvme0n1 ] || { echo "test: a namespace appeared ($what)"; exit "$code"; }
    echo "test: $what refused: $(head -n1 /tmp/refused.out)"
}

# 1. discovery
nvme discover -t tcp -a "$TARGET_IP" -s "$PORT" --hostnqn="$HOSTNQN" --hostid="$HOSTID" > /tmp/disc.out 2>&1 ||
    { cat /tmp/disc.out; echo "test: nvme discover failed for an allowed host"; exit 60; }
grep -q "subnqn: *$NQN\$" /tmp/disc.out || { cat /tmp/disc.out; echo "test: discovery does not list $NQN"; exit 61; }
dmesg -c > /dev/null
if nvme discover -t tcp -a "$TARGET_IP" -s "$PORT" --hostnqn="$STRANGER" --hostid="$STRANGER_ID" > /tmp/disc2.out 2>&1; then
    cat /tmp/disc2.out; echo "test: a host on no allow-list discovered"; exit 62
fi
dmesg | grep -q 'is not allowed' || { dmesg | tail -n 5; echo "test: the stranger was not refused by the controller"; exit 73; }
echo "test: allowed host discovers $NQN; unknown host refused: $(dmesg | grep -o 'Connect for subsystem.*' | tail -n1)"

# 2. no secret, wrong secret
refused "connect without a secret" 63
refused "connect with a wrong secret" 64 --dhchap-secret="$WRONG_SECRET"
dmesg | grep -i 'auth' | tail -n 4

# 3. the right secret
dmesg -c > /dev/null
conn --dhchap-secret="$SECRET" || { dmesg | tail; echo "test: connect with the right secret failed"; exit 65; }
wait_for '[ -b /dev/nvme0n1 ]' 10 || { dmesg | tail; echo "test: /dev/nvme0n1 did not appear"; exit 66; }
auth=$(dmesg | grep -o 'qid 0: authenticated.*' | tail -n1)
[ -n "$auth" ] || { dmesg | tail -n 20; echo "test: no authentication in the kernel log"; exit 67; }
nq=$(($(cat /sys/class/nvme/nvme0/queue_count) - 1))
verify auth
echo "test: DH-HMAC-CHAP: $auth; $nq I/O queues; fio verify passed"
disconnect

# 4. bidirectional
dmesg -c > /dev/null
conn --dhchap-secret="$SECRET" --dhchap-ctrl-secret="$CTRL_SECRET" ||
    { dmesg | tail; echo "test: bidirectional connect failed"; exit 68; }
wait_for '[ -b /dev/nvme0n1 ]' 10 || { echo "test: /dev/nvme0n1 did not appear"; exit 69; }
dmesg | grep -q 'qid 0: controller authenticated' || { dmesg | tail -n 20; echo "test: controller not authenticated"; exit 70; }
verify bidi
echo "test: bidirectional DH-HMAC-CHAP: $(dmesg | grep -o 'qid 0: authenticated.*' | tail -n1); controller authenticated; fio verify passed"
disconnect

# 5. a controller that does not know the controller secret the host expects
refused "bidirectional connect expecting another controller secret" 71 \
    --dhchap-secret="$SECRET" --dhchap-ctrl-secret="$WRONG_SECRET"
dmesg | grep -i 'controller authentication failed\|auth' | tail -n 2

# 6. discovery closed
echo NVMUX-READY-CLOSE
# The host restarts the daemon with discovery = "closed": retry while it restarts (the
# connection is refused), until the controller itself refuses the host.
i=0
while :; do
    i=$((i + 1)); [ "$i" -le 120 ] || { cat /tmp/disc3.out; dmesg | tail -n 5; echo "test: discovery still open"; exit 72; }
    dmesg -c > /dev/null
    if nvme discover -t tcp -a "$TARGET_IP" -s "$PORT" --hostnqn="$HOSTNQN" --hostid="$HOSTID" > /tmp/disc3.out 2>&1; then
        sleep 0.5; continue # not restarted yet
    fi
    dmesg | grep -q 'is not allowed' && break
    sleep 0.5
done
echo "test: discovery closed: allowed host refused: $(dmesg | grep -o 'Connect for subsystem.*' | tail -n1)"
