#!/usr/bin/env bash
# The vfio-user-nvme scenario: the nvmux daemon exports a thin disk as a PCI NVMe
# controller on a vfio-user socket (`nvmux export add --type vfio-user --queues 4`), and
# QEMU 11.1 from the Debian sid chroot attaches it (-device vfio-user-pci) to the Debian 12
# guest kernel, whose nvme driver binds to it. Two VMs in turn on the same socket:
#   VM 1 (tests/vm/guest-vfio-user-nvme.sh PHASE=write): nvme list (model nvmux), id-ctrl
#        and id-ns (sn = the export's name, nn 1, nsze = size / LBA size), >= 2 I/O queues,
#        fio --verify=crc32c randrw QD32 x 2 jobs, blkdiscard, then `nvmux disk resize`
#        from the host while it runs (the guest must see the new size), 8 MiB of data
#        written for VM 2; it powers off (boot.sh: QEMU exits 0 by itself);
#   VM 2 (PHASE=verify): attaches to the same socket, sees the grown namespace and
#        verifies VM 1's data.
# Host side: the export's view between and after the VMs (sessions, asynchronous events,
# no bad PRPs or doorbells, no fatal status), the daemon alive throughout and no panic in
# its log.
#
# Usage: vfio-user-nvme.sh --nvmux-bin BIN --api API_SOCK --server-pid PID --server-log LOG
#                          --initrd BASE.cpio --work DIR --sockdir DIR [--qemu-root ROOT]
#                          [--smp N] [--timeout S]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin= api= spid= slog= initrd= work= sockdir= root=${NVMUX_SID_ROOT:-/var/cache/nvmux/sid-qemu}
smp=2 timeout_s=300
while (($#)); do
    case $1 in
        --nvmux-bin) bin=$2; shift 2 ;;
        --api) api=$2; shift 2 ;;
        --server-pid) spid=$2; shift 2 ;;
        --server-log) slog=$2; shift 2 ;;
        --initrd) initrd=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --sockdir) sockdir=$2; shift 2 ;;
        --qemu-root) root=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        *) echo "vfio-user-nvme.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -x $bin && -S $api && -n $spid && -r $initrd && -n $work && -d $sockdir ]] ||
    { echo "vfio-user-nvme.sh: --nvmux-bin, --api, --server-pid, --initrd, --work and --sockdir are required" >&2; exit 2; }
mkdir -p "$work"
work=$(readlink -f "$work")
nvmux() { "$bin" --api "$api" "$@"; }
disk=vfu1 sock=$sockdir/vfu1.sock pool_img=$work/vfu-pool.img
size=$((64 << 20)) new=$((96 << 20)) data_mib=56
fails=()
check() { # WHAT COND...: a host-side assertion
    local what=$1; shift
    if "$@"; then echo "check: ok $what"; else echo "check: FAILED $what"; fails+=("$what"); fi
}
alive() { kill -0 "$spid" 2>/dev/null; }
view() { nvmux --json export list | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["name"] == sys.argv[1]:
        print(json.dumps(e)); break' "$disk"; }
vfield() { python3 -c 'import json, sys; v = json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, {"v": v}))' "$1" "$2"; }

echo "== vfio-user-nvme: $(chroot "$root" /usr/bin/qemu-system-x86_64 --version | head -1)"
nvmux export remove "$disk" > /dev/null 2>&1 || true
nvmux disk delete "$disk" > /dev/null 2>&1 || true
nvmux pool remove vfupool > /dev/null 2>&1 || true
rm -f "$pool_img" "$sock"
if ! { nvmux pool create vfupool --path "$pool_img" --size 256M &&
       nvmux disk create "$disk" --pool vfupool --size 64M &&
       nvmux export add "$disk" --type vfio-user --socket "$sock" --queues 4; } > "$work/vfio-user-nvme-setup.out" 2>&1; then
    cat "$work/vfio-user-nvme-setup.out"
    echo "vfio-user-nvme: FAIL could not create the vfio-user export"
    exit 1
fi
cat "$work/vfio-user-nvme-setup.out"
nvmux export list | grep -E "^NAME|^$disk " || true

# boot_vm N PHASE: boot one VM on the socket; for VM 1 the host resizes the disk at the
# guest's NVMUX-READY-RESIZE. Sets rc and resized.
boot_vm() {
    local n=$1 phase=$2 log=$work/vfio-user-nvme-vm$1.log
    rm -f "$log"
    "$here/boot.sh" --initrd "$initrd" --script "$here/guest-vfio-user-nvme.sh" --log "$log" \
        --vfio-user "$sock" --qemu-root "$root" --smp "$smp" --timeout "$timeout_s" \
        --env "PHASE=$phase" --env "SERIAL=$disk" --env "SIZE_BYTES=$size" \
        --env "NEW_SIZE_BYTES=$new" --env "DATA_MIB=$data_mib" > "$work/vfio-user-nvme-vm$n.out" 2>&1 &
    local bpid=$!
    while kill -0 "$bpid" 2>/dev/null; do
        if [[ $phase == write && $resized == no ]] && grep -q '^NVMUX-READY-RESIZE' "$log" 2>/dev/null; then
            if nvmux disk resize "$disk" 96M; then resized=yes; else resized=failed; fi
            echo "== host: nvmux disk resize $disk 96M: $resized"
        fi
        sleep 0.3
    done
    rc=0
    wait "$bpid" || rc=$?
    head -n 1 "$work/vfio-user-nvme-vm$n.out"   # boot.sh's verdict (its log tail repeats the console)
    grep -E '^test: ' "$log" || true
}

resized=no
boot_vm 1 write
check "VM 1: every guest check passed, the guest powered off and QEMU exited 0 (boot.sh status $rc)" [ "$rc" -eq 0 ]
check "VM 1: the host resized the disk through the daemon's CLI ($resized)" [ "$resized" = yes ]
check "the daemon runs after VM 1" alive
v1=$(view || true)
echo "export view after VM 1: $v1"
if [[ -n $v1 ]]; then
    check "the export shows no client after VM 1's poweroff" [ "$(vfield "$v1" 'v["connected"]')" = False ]
    check "one session served" [ "$(vfield "$v1" 'v["vfio_user"]["sessions_total"]')" = 1 ]
    check "a namespace-changed event was delivered" [ "$(vfield "$v1" 'v["vfio_user"]["async_events"]')" -ge 1 ]
    check "no PRP outside the guest's DMA, no bad doorbell, no fatal status" \
        [ "$(vfield "$v1" 'v["vfio_user"]["bad_prps"] + v["vfio_user"]["bad_doorbells"] + v["vfio_user"]["fatal_errors"]')" = 0 ]
    ops=$(nvmux --json stats | python3 -c 'import json, sys; d = json.load(sys.stdin)["disks"][sys.argv[1]]; print(min(d["read"]["ops"], d["write"]["ops"]))' "$disk")
    check "the disk's stats count the guest's reads and writes ($ops of the rarer kind, 2048 at least)" [ "${ops:-0}" -ge 2048 ]
    check "the export's size is the new one" [ "$(nvmux --json disk show "$disk" | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')" = "$new" ]
fi

boot_vm 2 verify
check "VM 2 attached to the same socket, saw the grown namespace and read VM 1's data (boot.sh status $rc)" [ "$rc" -eq 0 ]
check "the daemon runs after VM 2" alive
v2=$(view || true)
echo "export view after VM 2: $v2"
[[ -n $v2 ]] && check "two sessions served" [ "$(vfield "$v2" 'v["vfio_user"]["sessions_total"]')" = 2 ]
if [[ -n $slog ]]; then
    check "no panic in the daemon's log" bash -c "! grep -q panicked '$slog'"
fi
echo "----- daemon log, vfio-user lines -----"
grep -iE 'vfio|nvme' "$slog" 2>/dev/null | tail -n 30 || true
echo "-----"
if ((${#fails[@]})); then
    echo "vfio-user-nvme: FAIL ${fails[0]} (and $((${#fails[@]} - 1)) more)"
    exit 1
fi
echo "vfio-user-nvme: PASS"
