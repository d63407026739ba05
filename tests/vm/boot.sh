#!/usr/bin/env bash
# Boot one test guest under QEMU (TCG) and report the guest test's result.
#
# Usage:
#   boot.sh --initrd BASE.cpio --script GUEST_TEST.sh --log LOG
#           [--vhost-sock SOCK [--queues N]]...   (each --queues applies to the
#                                                  preceding --vhost-sock; default 1)
#           [--raw-disk FILE:SERIAL]...            (a virtio-blk disk on FILE, raw, O_DIRECT
#                                                   (cache=none), no image locking; the
#                                                   guest sees SERIAL in /sys/block/vdX/serial)
#           [--raw-aio MODE]                       (QEMU's aio= for every --raw-disk, e.g.
#                                                   io_uring; default: QEMU's, threads)
#           [--env KEY=VAL]...                     (written to /test.env, sourced by /init)
#           [--reconnect SECS]                     (vhost-user chardevs reconnect after
#                                                   SECS when the backend goes away)
#           [--net]                                (virtio-net with QEMU user networking: the
#                                                   guest is 10.0.2.15/24, the host's
#                                                   127.0.0.1:PORT is 10.0.2.2:PORT)
#           [--hostfwd HOSTPORT:GUESTPORT]...      (implies --net: the host's 127.0.0.1:HOSTPORT
#                                                   is forwarded to the guest's TCP GUESTPORT)
#           [--timeout SECS]                       (default 300)
#           [--smp N]                              (guest vCPUs, default 1)
#           [--vfio-user SOCK]...                  (a vfio-user-pci device on SOCK: QEMU 10.1+,
#                                                   see --qemu-root; guest RAM in a shared memfd)
#           [--qemu-root ROOT]                     (run QEMU as `chroot ROOT
#                                                   /usr/bin/qemu-system-x86_64`, the Debian sid
#                                                   chroot of scripts/sid-qemu.sh; the kernel's,
#                                                   the sockets' and the temporary directories
#                                                   are bind-mounted at the same paths inside)
#           [--kernel KERNEL]                      (default: the image named in BASE.cpio.kernel,
#                                                   an extracted PVH vmlinux; else
#                                                   the newest /boot/vmlinuz-*-amd64)
#
# The script becomes /test.sh (mode 755), with tests/vm/guest-lib.sh (helpers the
# guest scripts share) as /guest-lib.sh, in a second cpio appended to a copy
# of BASE (zero-padded to a multiple of 4 bytes first, or the kernel rejects
# the second archive with "invalid magic").
#
# Exit status:
#   0  guest printed "NVMUX-TEST-RESULT: PASS" and QEMU exited 0 by itself
#   1  guest printed "NVMUX-TEST-RESULT: FAIL ..." and QEMU exited 0 by itself
#      (the guest test failed, but the guest shut down cleanly)
#   2  anything else: timeout, QEMU error, kernel panic, no marker, bad usage
set -euo pipefail

die() { echo "boot.sh: $*" >&2; exit 2; }

initrd= script= log= kernel= timeout_s=300 smp=1 net= reconnect= raw_aio= qroot=
socks=() queues=() envs=() raws=() vfus=() fwds=()
while (($#)); do
    case $1 in
        --initrd) initrd=$2; shift 2 ;;
        --script) script=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --kernel) kernel=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --net) net=1; shift ;;
        --hostfwd)
            [[ $2 =~ ^[0-9]+:[0-9]+$ ]] || die "--hostfwd wants HOSTPORT:GUESTPORT"
            net=1; fwds+=(",hostfwd=tcp:127.0.0.1:${2%%:*}-:${2##*:}"); shift 2 ;;
        --reconnect) reconnect=",reconnect=$2"; shift 2 ;;
        --vhost-sock) socks+=("$2"); queues+=(1); shift 2 ;;
        --queues)
            ((${#socks[@]})) || die "--queues must follow --vhost-sock"
            queues[${#queues[@]}-1]=$2; shift 2 ;;
        --vfio-user) vfus+=("$(readlink -f "$2")"); shift 2 ;;
        --qemu-root) qroot=$2; shift 2 ;;
        --env) [[ $2 == *=* ]] || die "--env wants KEY=VAL"; envs+=("$2"); shift 2 ;;
        --raw-aio) raw_aio=",aio=$2"; shift 2 ;;
        --raw-disk) [[ $2 == *:* ]] || die "--raw-disk wants FILE:SERIAL"; raws+=("$2"); shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
[[ -n $initrd && -n $script && -n $log ]] || die "--initrd, --script and --log are required"
[[ -r $initrd ]] || die "no initrd $initrd"
[[ -r $script ]] || die "no script $script"
if [[ -z $kernel ]]; then
    if [[ -s $initrd.kernel ]]; then kernel=$(cat "$initrd.kernel")
    else kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n1 || true); fi
fi
[[ -r $kernel ]] || die "no kernel ($kernel)"
for s in "${socks[@]}"; do [[ -S $s ]] || die "vhost socket $s does not exist"; done

for s in "${vfus[@]}"; do [[ -S $s ]] || die "vfio-user socket $s does not exist"; done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nvmux-boot.XXXXXX")
mounts=()
cleanup() {
    local m
    for ((m = ${#mounts[@]} - 1; m >= 0; m--)); do
        umount "${mounts[$m]}" 2>/dev/null || umount -l "${mounts[$m]}" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# --- initrd = BASE + zero padding to 4 bytes + cpio{test.sh, test.env} -----------
mkdir -p "$tmp/extra"
install -m 755 "$script" "$tmp/extra/test.sh"
install -m 644 "$(dirname "$0")/guest-lib.sh" "$tmp/extra/guest-lib.sh"
: > "$tmp/extra/test.env"
for kv in "${envs[@]}"; do
    # Values are single-quoted so they reach the guest verbatim.
    printf "export %s='%s'\n" "${kv%%=*}" "$(printf %s "${kv#*=}" | sed "s/'/'\\\\''/g")" >> "$tmp/extra/test.env"
done
cp "$initrd" "$tmp/initrd.cpio"
size=$(stat -c %s "$tmp/initrd.cpio")
pad=$(( (4 - size % 4) % 4 ))
((pad == 0)) || head -c "$pad" /dev/zero >> "$tmp/initrd.cpio"
(cd "$tmp/extra" && printf '%s\n' test.sh test.env guest-lib.sh | cpio --quiet -o -H newc -R 0:0) >> "$tmp/initrd.cpio"

# --- QEMU command line -----------------------------------------------------------------
qemu=(qemu-system-x86_64)
if [[ -n $qroot ]]; then
    [[ -x $qroot/usr/bin/qemu-system-x86_64 ]] || die "no QEMU in $qroot (run scripts/sid-qemu.sh)"
    kernel=$(readlink -f "$kernel") tmp=$(readlink -f "$tmp")
    dirs=("$tmp" "$(dirname "$kernel")")
    for s in "${socks[@]}" "${vfus[@]}"; do dirs+=("$(dirname "$(readlink -f "$s")")"); done
    for d in "${dirs[@]}"; do
        mountpoint -q "$qroot$d" && continue
        mkdir -p "$qroot$d"
        mount --bind "$d" "$qroot$d"
        mounts+=("$qroot$d")
    done
    qemu=(chroot "$qroot" /usr/bin/qemu-system-x86_64)
fi
qemu+=(-accel tcg -cpu max -m 512M -smp "$smp"
      -nographic -no-reboot -nodefaults -serial stdio
      -kernel "$kernel" -initrd "$tmp/initrd.cpio"
      -append "console=ttyS0 panic=-1 quiet")
if ((${#socks[@]} + ${#vfus[@]})); then
    # vhost-user and vfio-user need guest RAM in a shared memfd (without share=on a
    # vhost-user device silently fails to start and the guest hangs; vfio-user sends
    # DMA_MAP without a descriptor and the server cannot reach guest memory).
    qemu+=(-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem)
    for i in "${!socks[@]}"; do
        qemu+=(-chardev "socket,id=c$i,path=${socks[$i]}$reconnect"
               -device "vhost-user-blk-pci,chardev=c$i,num-queues=${queues[$i]}")
    done
fi

for i in "${!vfus[@]}"; do
    qemu+=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"${vfus[$i]}\"}}")
done

for i in "${!raws[@]}"; do
    qemu+=(-drive "file=${raws[$i]%:*},if=none,id=raw$i,format=raw,cache=none$raw_aio,file.locking=off"
           -device "virtio-blk-pci,drive=raw$i,serial=${raws[$i]##*:}")
done

if [[ -n $net ]]; then
    fwd=$(printf %s "${fwds[@]}")
    qemu+=(-netdev "user,id=n$fwd" -device virtio-net-pci,netdev=n,romfile=)
fi

mkdir -p "$(dirname "$log")"
{ echo "# $(date -Is) ${qemu[*]}"; } > "$log"
start=$(date +%s.%N)
set +e
timeout -k 10 "$timeout_s" "${qemu[@]}" < /dev/null >> "$log" 2>&1
qrc=$?
echo >> "$log"   # the last console line has no newline
set -e
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
# The serial console emits CRLF; normalise so grep/tail output stays clean.
sed -i 's/\r$//' "$log"

fail() {
    echo "boot.sh: FAILED after ${elapsed}s: $1 (log: $log)" >&2
    echo "----- last 40 lines of $log -----" >&2
    tail -n 40 "$log" >&2
    echo "-----" >&2
    exit "$2"
}

if ((qrc == 124 || qrc == 137)); then
    if grep -q SeaBIOS "$log"; then
        fail "timeout after ${timeout_s}s (guest hung?)" 2
    else
        # QEMU connects to vhost-user backends before the firmware starts.
        fail "timeout after ${timeout_s}s before the guest started (vhost-user handshake stuck?)" 2
    fi
elif ((qrc != 0)); then
    fail "qemu exited with status $qrc" 2
elif grep -q 'Kernel panic' "$log"; then
    fail "guest kernel panicked" 2
elif grep -q '^NVMUX-TEST-RESULT: PASS' "$log"; then
    echo "boot.sh: guest PASS, clean poweroff, ${elapsed}s"
    exit 0
elif marker=$(grep -m1 '^NVMUX-TEST-RESULT: FAIL' "$log"); then
    fail "guest test failed (${marker#NVMUX-TEST-RESULT: }), clean poweroff" 1
else
    fail "no NVMUX-TEST-RESULT marker in the log" 2
fi
