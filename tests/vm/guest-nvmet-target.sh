#!/bin/sh
# Guest side of the nvmf-backend scenario: the guest kernel's NVMe/TCP target (nvmet-tcp,
# configured through configfs) as an independent implementation for nvmux's initiator.
#
#   subsystem NQN (attr_allow_any_host=1), namespace 1 = a RAM disk of SIZE_MIB (brd,
#   default 64), two ports, both tcp/ipv4 on 0.0.0.0: port 1 on 4420, port 2 on 4421,
#   port 2's ANA group 1 non-optimized (so an initiator prefers port 1).
#
# The host reaches the ports through QEMU hostfwd (boot.sh --hostfwd P1:4420 --hostfwd
# P2:4421) and controls the target through a third forwarded port, CTL_PORT (default 5000):
# it connects, sends one command line and closes. Commands (each acknowledged on the
# console with "NVMUX-CMD-DONE <command>" or "NVMUX-CMD-FAILED <command>"):
#   unlink PORT            rm ports/PORT/subsystems/NQN (the port stops serving NQN; the
#                          kernel drops that port's connections of the subsystem)
#   link PORT              link it again
#   ana PORT STATE         ports/PORT/ana_groups/1/ana_state = STATE (optimized,
#                          non-optimized, inaccessible, ...)
#   stop                   tear down the configuration and finish (PASS)
# Markers: NVMUX-READY-TARGET (configured and listening). The guest gives up after
# TARGET_TIME seconds (default 900) without a stop (exit 80).
set -u
: "${NQN:?}"
size_mib=${SIZE_MIB:-64}
ctl=${CTL_PORT:-5000}
limit=${TARGET_TIME:-900}
cfg=/sys/kernel/config/nvmet

modprobe virtio_net
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

modprobe configfs 2>/dev/null
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config ||
    { echo "test: cannot mount configfs"; exit 81; }
modprobe nvmet_tcp || { echo "test: modprobe nvmet_tcp failed (initramfs without nvmet?)"; exit 82; }
modprobe brd rd_nr=1 rd_size=$((size_mib * 1024)) max_part=0 ||
    { echo "test: modprobe brd failed"; exit 83; }
[ -b /dev/ram0 ] || { echo "test: no /dev/ram0"; exit 83; }

set -e
mkdir "$cfg/subsystems/$NQN"
echo 1 > "$cfg/subsystems/$NQN/attr_allow_any_host"
[ -z "${SERIAL:-}" ] || echo "$SERIAL" > "$cfg/subsystems/$NQN/attr_serial"
mkdir "$cfg/subsystems/$NQN/namespaces/1"
echo /dev/ram0 > "$cfg/subsystems/$NQN/namespaces/1/device_path"
echo 1 > "$cfg/subsystems/$NQN/namespaces/1/enable"
for p in 1 2; do
    mkdir "$cfg/ports/$p"
    echo 0.0.0.0 > "$cfg/ports/$p/addr_traddr"
    echo tcp > "$cfg/ports/$p/addr_trtype"
    echo ipv4 > "$cfg/ports/$p/addr_adrfam"
    echo $((4419 + p)) > "$cfg/ports/$p/addr_trsvcid"
done
echo non-optimized > "$cfg/ports/2/ana_groups/1/ana_state"
for p in 1 2; do
    ln -s "$cfg/subsystems/$NQN" "$cfg/ports/$p/subsystems/$NQN"
done
set +e
echo "test: nvmet-tcp target $NQN: namespace 1 = /dev/ram0 ($size_mib MiB); port 1 :4420 $(cat "$cfg/ports/1/ana_groups/1/ana_state"), port 2 :4421 $(cat "$cfg/ports/2/ana_groups/1/ana_state")"
echo NVMUX-READY-TARGET

teardown() {
    # What the target saw (connects, errors), for the host's post-mortem.
    dmesg | grep -iE 'nvmet' | tail -n 30 | sed 's/^/test: dmesg: /'
    for p in 1 2; do
        rm -f "$cfg/ports/$p/subsystems/$NQN"
        rmdir "$cfg/ports/$p" 2>/dev/null
    done
    echo 0 > "$cfg/subsystems/$NQN/namespaces/1/enable"
    rmdir "$cfg/subsystems/$NQN/namespaces/1" "$cfg/subsystems/$NQN" 2>/dev/null
}

valid_port() { [ "$1" = 1 ] || [ "$1" = 2 ]; }

start=$(date +%s)
while :; do
    left=$((start + limit - $(date +%s)))
    if [ "$left" -le 0 ]; then
        echo "test: no stop command within ${limit}s"
        teardown
        exit 80
    fi
    # One connection, one command line. (nc returns when the host closes.)
    line=$(timeout "$left" nc -l -p "$ctl" 2>/dev/null | head -n1 | tr -d '\r')
    [ -n "$line" ] || continue
    set -- $line
    ok=0
    case ${1:-} in
        unlink) valid_port "${2:-}" && rm "$cfg/ports/$2/subsystems/$NQN" && ok=1 ;;
        link) valid_port "${2:-}" && ln -s "$cfg/subsystems/$NQN" "$cfg/ports/$2/subsystems/$NQN" && ok=1 ;;
        ana) valid_port "${2:-}" && [ -n "${3:-}" ] && echo "$3" > "$cfg/ports/$2/ana_groups/1/ana_state" && ok=1 ;;
        stop)
            echo "NVMUX-CMD-DONE $line"
            teardown
            echo "test: stopped by the host"
            exit 0 ;;
    esac
    if [ "$ok" = 1 ]; then echo "NVMUX-CMD-DONE $line"; else echo "NVMUX-CMD-FAILED $line"; fi
done
