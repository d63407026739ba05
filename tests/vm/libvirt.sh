#!/usr/bin/env bash
# libvirt scenario of the VM stage: Debian's libvirt (libvirt-daemon-system) runs QEMU as
# the user libvirt-qemu. A <disk type='vhostuser'> domain (memfd shared memory,
# <reconnect enabled='yes'/>) boots the test initramfs and passes fio --verify on an
# nvmux export created with --owner libvirt-qemu. Nothing in this test chowns or chmods
# the socket: the export alone must make it connectable by libvirt's QEMU.
#
# Usage: libvirt.sh --nvmux-bin BIN --api API_SOCKET --initrd BASE.cpio --work DIR
#                   [--timeout SECS] [--smp N]
#   API_SOCKET   a running nvmux daemon's API socket (run.sh's server)
#   DIR          logs: libvirt-domain.xml, libvirt.log (guest console), libvirtd.log
#
# What it sets up, and undoes at the end:
#   - virtlogd and libvirtd, started here (in the foreground, as jobs of this script) if
#     they are not running; there is no systemd on the test machines. Stopped at the end
#     only if this script started them.
#   - a directory /tmp/nvmux-libvirt.XXXXXX, mode 0755 (libvirt-qemu must be able to
#     traverse every directory on the socket's path; QEMU's kernel and initrd are copied
#     there too, so that libvirt's own chown of them touches only these copies);
#   - a file disk and its vhost-user-blk export (--owner libvirt-qemu) on the daemon;
#   - a persistent domain (virsh define, start; destroy and undefine at the end).
# libvirt needs no configuration change here: Debian's defaults (DAC security driver,
# user and group libvirt-qemu) are what is being tested, and libvirt skips cgroups it
# cannot use (no systemd) by itself.
#
# Exit status: 0 pass; 1 the guest ran and its test failed, or QEMU was not libvirt-qemu;
# 2 setup failure or timeout. One line "libvirt: ..." says why.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
nvmux= api= initrd= work= timeout_s=300 smp=2
while (($#)); do
    case $1 in
        --nvmux-bin) nvmux=$2; shift 2 ;;
        --api) api=$2; shift 2 ;;
        --initrd) initrd=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "libvirt: unknown argument $1" >&2; exit 2 ;;
    esac
done
die() { echo "libvirt: $*" >&2; exit 2; }
[[ -x $nvmux && -S $api && -r $initrd && -n $work ]] || die "--nvmux-bin, --api, --initrd and --work are required"
for t in virsh libvirtd virtlogd; do
    command -v "$t" >/dev/null || die "'$t' not found (apt-get install --no-install-recommends libvirt-daemon-system libvirt-clients)"
done
id libvirt-qemu >/dev/null 2>&1 || die "no user libvirt-qemu (apt-get install libvirt-daemon-system)"
kernel=$(cat "$initrd.kernel" 2>/dev/null || true)
[[ -r $kernel ]] || kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
[[ -r $kernel ]] || die "no guest kernel"
mkdir -p "$work"

virsh=(virsh -q -c qemu:///system)
name=nvmux-libvirt-$$
disk=lv$$
dir=
started=()
cleanup() {
    set +e
    if "${virsh[@]}" dominfo "$name" >/dev/null 2>&1; then
        "${virsh[@]}" destroy "$name" >/dev/null 2>&1
        "${virsh[@]}" undefine "$name" >/dev/null 2>&1
    fi
    "$nvmux" --api "$api" export remove "$disk" >/dev/null 2>&1
    "$nvmux" --api "$api" disk delete "$disk" >/dev/null 2>&1
    local pid
    # Stop what this script started, newest first, and wait for it.
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        pid=${started[$i]}
        kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    [[ -n $dir ]] && rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- libvirt's daemons ----------------------------------------------------------------
t0=$(date +%s)
mkdir -p /run/libvirt
if ! pgrep -x virtlogd >/dev/null; then
    virtlogd >> "$work/libvirtd.log" 2>&1 &
    started+=($!)
fi
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd >> "$work/libvirtd.log" 2>&1 &
    started+=($!)
fi
for ((i = 0; i < 100; i++)); do
    "${virsh[@]}" version >/dev/null 2>&1 && break
    sleep 0.2
done
"${virsh[@]}" version >/dev/null 2>&1 || die "libvirtd does not answer (log: $work/libvirtd.log)"
echo "libvirt: libvirtd up$( ((${#started[@]})) && echo " (started here: pids ${started[*]})") after $(($(date +%s) - t0)) s"

# --- the export: owned by libvirt-qemu, in a directory it can traverse ------------------
dir=$(mktemp -d /tmp/nvmux-libvirt.XXXXXX)
chmod 0755 "$dir"   # the directory only; the socket's owner and mode come from nvmux
sock=$dir/vhost.sock
img=$work/libvirt-disk.img
rm -f "$img"
"$nvmux" --api "$api" disk create "$disk" --backend file --path "$img" --size 64M >/dev/null
"$nvmux" --api "$api" export add "$disk" --socket "$sock" --queues "$smp" --owner libvirt-qemu
ls -l "$sock"

# The guest: the base initramfs + the fio-verify script, and the kernel, in $dir.
mkdir -p "$dir/extra"
install -m 755 "$here/guest-fio-verify.sh" "$dir/extra/test.sh"
printf "export EXPECT_QUEUES='%s'\nexport VERIFY_ONLY='0'\n" "$smp" > "$dir/extra/test.env"
cp "$initrd" "$dir/initrd.cpio"
size=$(stat -c %s "$dir/initrd.cpio")
pad=$(( (4 - size % 4) % 4 ))
((pad == 0)) || head -c "$pad" /dev/zero >> "$dir/initrd.cpio"
(cd "$dir/extra" && printf '%s\n' test.sh test.env | cpio --quiet -o -H newc -R 0:0) >> "$dir/initrd.cpio"
cp "$kernel" "$dir/kernel"

console=$dir/console.log
cat > "$work/libvirt-domain.xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>512</memory>
  <vcpu>$smp</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$dir/kernel</kernel>
    <initrd>$dir/initrd.cpio</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='maximum' migratable='off'/>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='$smp'/>
      <source type='unix' path='$sock'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='$console'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
"${virsh[@]}" define "$work/libvirt-domain.xml" >/dev/null
t1=$(date +%s)
# virsh start returns once QEMU has connected its vhost-user chardev; with reconnect, a
# QEMU that cannot connect (a socket it may not use) keeps trying, so bound the wait.
src=0
timeout -k 5 120 "${virsh[@]}" start "$name" > "$work/libvirt-start.out" 2>&1 || src=$?
if ((src != 0)); then
    cat "$work/libvirt-start.out"
    tail -n 5 "/var/log/libvirt/qemu/$name.log" 2>/dev/null || true
    if ((src == 124 || src == 137)); then
        echo "libvirt: FAIL: virsh start did not return within 120 s (QEMU could not connect to $sock?)"
    else
        echo "libvirt: FAIL: virsh start failed"
    fi
    exit 1
fi

# QEMU must run as libvirt-qemu: that is the point of --owner.
qpid=$(cat "/run/libvirt/qemu/$name.pid" 2>/dev/null || true)
quser=$( [[ -n $qpid ]] && ps -o user= -p "$qpid" 2>/dev/null || true)
echo "libvirt: domain $name started; QEMU pid ${qpid:-?} runs as ${quser:-?}"

# Wait for the guest's marker and for the domain to power off (ACPI: the guest's
# poweroff -f; on_poweroff destroys it). A guest that printed its marker but does not
# power off within 30 s is destroyed by the cleanup; the marker decides.
rc=2 why="timeout after ${timeout_s} s"
marked=
while (($(date +%s) - t1 < timeout_s)); do
    state=$("${virsh[@]}" domstate "$name" 2>/dev/null || echo gone)
    if [[ -z $marked ]] && grep -q '^NVMUX-TEST-RESULT' <(tr -d '\r' < "$console" 2>/dev/null); then
        marked=$(date +%s)
    fi
    if [[ $state != running ]]; then
        [[ -n $marked ]] || why="domain is '$state' without a result marker"
        break
    fi
    if [[ -n $marked ]] && (($(date +%s) - marked > 30)); then
        echo "libvirt: the guest printed its result but did not power off within 30 s"
        break
    fi
    sleep 0.5
done
tr -d '\r' < "$console" > "$work/libvirt.log" 2>/dev/null || true
grep '^test: ' "$work/libvirt.log" || true
if grep -q '^NVMUX-TEST-RESULT: PASS' "$work/libvirt.log"; then
    rc=0 why="guest fio --verify passed"
elif marker=$(grep -m1 '^NVMUX-TEST-RESULT: FAIL' "$work/libvirt.log"); then
    rc=1 why="guest: ${marker#NVMUX-TEST-RESULT: }"
fi
if ((rc == 0)) && [[ $quser != libvirt-qemu ]]; then
    rc=1 why="QEMU ran as '${quser:-?}', not libvirt-qemu"
fi
# The socket is still the export's: owned by libvirt-qemu, mode 0600.
perm=$(stat -c '%U %a' "$sock" 2>/dev/null || echo missing)
if ((rc == 0)) && [[ $perm != "libvirt-qemu 600" ]]; then
    rc=1 why="socket is '$perm' after the run"
fi
echo "libvirt: $( ((rc == 0)) && echo PASS || echo FAIL): $why; boot to poweroff $(($(date +%s) - t1)) s, scenario $(($(date +%s) - t0)) s (console: $work/libvirt.log)"
((rc == 0)) || tail -n 30 "$work/libvirt.log" 2>/dev/null || true
exit "$rc"
