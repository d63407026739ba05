#!/usr/bin/env bash
# The vfio-user scenario: QEMU 11.1 from the Debian sid chroot attaches nvmux's
# vfio-user PCI NVMe function (the test server nvmux-vfiouser-probe) and boots the
# Debian 12 guest twice on the same socket (a second VM attaches after the first).
# Checked on the server's log: version negotiation, DMA_MAP of guest RAM with a
# descriptor, SET_IRQS of MSI-X eventfds, CC.EN -> CSTS.RDY, the first admin SQ
# doorbell and the admin command read from guest memory through the DMA mapping; in the
# guest: a function of class 0x010802 with nvmux's ids and the nvme driver bound.
#
# Usage: vfio-user.sh --probe-bin BIN --initrd BASE.cpio --work DIR [--qemu-root ROOT]
#                     [--smp N] [--timeout S]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin= initrd= work= root=${NVMUX_SID_ROOT:-/var/cache/nvmux/sid-qemu} smp=1 timeout_s=300
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
"$bin" --socket "$sock" --vectors 8 > "$slog" 2>&1 &
pid=$!
for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { cat "$slog"; result "FAIL the server did not listen"; exit 1; }
echo "== vfio-user: $(chroot "$root" /usr/bin/qemu-system-x86_64 --version | head -1)"

why=
for vm in 1 2; do
    rc=0
    "$here/boot.sh" --initrd "$initrd" --script "$here/guest-vfio-user.sh" --log "$work/vfio-user-vm$vm.log" \
        --vfio-user "$sock" --qemu-root "$root" --smp "$smp" --timeout "$timeout_s" || rc=$?
    grep '^test: ' "$work/vfio-user-vm$vm.log" || true
    if ((rc != 0)); then why="VM $vm: boot.sh status $rc (log $work/vfio-user-vm$vm.log)"; break; fi
    for ((i = 0; i < 50; i++)); do
        (($(grep -c 'client disconnected' "$slog") >= vm)) && break
        sleep 0.1
    done
done
kill -0 "$pid" 2>/dev/null || why=${why:-"the server died"}
echo "----- server log (first lines of interest) -----"
grep -E 'client (connected|disconnected)|client version|DMA_MAP|SET_IRQS|CC.EN|doorbell SqTail \{ qid: 0|admin SQ entry|shutdown|connection closed' "$slog" | head -n 40 || true
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
check 'SET_IRQS index 2 start 0 count [0-9]+ flags 0x24 \([1-9]' 2 "MSI-X eventfds set"
check 'CC.EN=1: admin SQ' 2 "the guest driver enabled the controller"
check 'doorbell SqTail \{ qid: 0, tail: 1 \}' 2 "the first admin SQ doorbell"
check 'admin SQ entry 0: opcode 0x06' 2 "Identify read from guest memory"
grep -q 'connection closed' "$slog" && why=${why:-"a connection was cut: $(grep -m1 'connection closed' "$slog")"}
if [[ -n $why ]]; then result "FAIL $why"; exit 1; fi
result PASS
