#!/usr/bin/env bash
# The vfio-user scenario: QEMU 11.1 from the Debian sid chroot attaches nvmux's
# vfio-user PCI NVMe function (the test server nvmux-vfiouser-probe) and boots the
# Debian 12 guest twice on the same socket (a second VM attaches after the first).
# The probe serves a 64 MiB memory disk through the crate's VfioUserExport (the NVMe
# controller); the guest (tests/vm/guest-vfio-user.sh) binds its nvme driver, checks
# nvme list / id-ctrl / id-ns, 2 I/O queues, fio verify at QD32 on 2 jobs, blkdiscard,
# a resize to 96 MiB (SIGUSR1 to the probe when the guest prints NVMUX-READY-RESIZE),
# and unbinds the driver (controller shutdown). Checked on the server's log: version
# negotiation, DMA_MAP of guest RAM with a descriptor, the resize and its asynchronous
# event, no cut connection, no fatal controller status.
#
# Usage: vfio-user.sh --probe-bin BIN --initrd BASE.cpio --work DIR [--qemu-root ROOT]
#                     [--smp N] [--timeout S]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin= initrd= work= root=${NVMUX_SID_ROOT:-/var/cache/nvmux/sid-qemu} smp=2 timeout_s=300
while (($#)); do
    case $1 in
        --probe-bin) bin=$2; shift 2 ;;
        --initrd) initrd=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --qemu-root) root=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        *) echo "vfio-user.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -x $bin && -r $initrd && -n $work ]] || { echo "vfio-user.sh: --probe-bin, --initrd and --work are required" >&2; exit 2; }
mkdir -p "$work"
work=$(readlink -f "$work")
sock=$work/vfu.sock slog=$work/vfio-user-server.log
result() { echo "vfio-user: $1"; [[ $1 == PASS ]]; }

pid=
cleanup() { [[ -n $pid ]] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; }
trap cleanup EXIT
rm -f "$sock"
mib=64 grow=96
"$bin" --socket "$sock" --mem "$mib" --grow-to "$grow" --queues 4 --workers 2 > "$slog" 2>&1 &
pid=$!
for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { cat "$slog"; result "FAIL the server did not listen"; exit 1; }
echo "== vfio-user: $(chroot "$root" /usr/bin/qemu-system-x86_64 --version | head -1)"

why=
for vm in 1 2; do
    rc=0
    log=$work/vfio-user-vm$vm.log
    if ((vm == 1)); then env=(--env "SIZE_BYTES=$((mib << 20))" --env "RESIZE_BYTES=$((grow << 20))")
    else env=(--env "SIZE_BYTES=$((grow << 20))" --env "RESIZE_BYTES=0"); fi
    rm -f "$log"
    "$here/boot.sh" --initrd "$initrd" --script "$here/guest-vfio-user.sh" --log "$log" \
        --vfio-user "$sock" --qemu-root "$root" --smp "$smp" --timeout "$timeout_s" "${env[@]}" &
    bpid=$!
    if ((vm == 1)); then
        while kill -0 "$bpid" 2>/dev/null; do
            if grep -q NVMUX-READY-RESIZE "$log" 2>/dev/null; then kill -USR1 "$pid"; break; fi
            sleep 0.2
        done
    fi
    wait "$bpid" || rc=$?
    grep '^test: ' "$log" || true
    if ((rc != 0)); then why="VM $vm: boot.sh status $rc (log $log)"; break; fi
    for ((i = 0; i < 50; i++)); do
        (($(grep -c 'client disconnected' "$slog") >= vm)) && break
        sleep 0.1
    done
done
# The last client's guest memory is unmapped after its disconnect is logged: let the
# status settle before asking for it.
sleep 0.5
kill -USR2 "$pid" 2>/dev/null || true
sleep 0.3
kill -0 "$pid" 2>/dev/null || why=${why:-"the server died"}
echo "----- server log (lines of interest) -----"
grep -E 'client (connected|disconnected)|client version|DMA_MAP iova 0x0|fatal|probe:|connection closed|WARN|ERROR' "$slog" | head -n 40 || true
echo "-----"
check() {   # PATTERN MIN WHAT
    local n
    n=$(grep -cE "$1" "$slog" || true)
    ((n >= $2)) || why=${why:-"$3 ($n times in $slog, $2 expected)"}
}
check 'client connected' 2 "two VMs connected"
check 'client disconnected' 2 "two VMs disconnected cleanly"
check 'client version 0\.0' 2 "version negotiated"
check 'DMA_MAP iova 0x0 size 0x[0-9a-f]+ offset 0x0 flags 0x3$' 2 "guest RAM mapped with its memfd"
check 'probe: disk grown' 1 "the disk was grown"
check 'async_events: [1-9]' 1 "a namespace attribute event was delivered"
grep -q 'connection closed' "$slog" && why=${why:-"a connection was cut: $(grep -m1 'connection closed' "$slog")"}
grep -q 'fatal status' "$slog" && why=${why:-"the controller went fatal: $(grep -m1 'fatal status' "$slog")"}
if [[ -n $why ]]; then result "FAIL $why"; exit 1; fi
result PASS
