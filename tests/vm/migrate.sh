#!/usr/bin/env bash
# Live migration on one host with an nvmux disk (run.sh scenarios migrate, migrate-qemu11).
#
# One disk, two vhost-user-blk exports of it: NAME-a, and NAME-b created with
# --migration-peer NAME-a. A guest (tests/vm/guest-migrate.sh: fio write+verify rounds, QD16,
# back to back) boots on a QEMU attached to NAME-a. Then, MIGRATIONS times (default 4:
# a->b, b->a, a->b, b->a, i.e. back and forth twice), a destination QEMU starts with
# `-incoming unix:...` on the other export, the source migrates to it over that Unix socket
# (QMP `migrate`) and quits; the guest must start a new fio round on the destination before
# the next migration. Then the host writes the stop marker, the guest finishes its round,
# checks dmesg and powers off.
#
# Pass: every migration completed, the guest's fio verified every round (0 errors) and saw
# no I/O error, and the daemon's API shows for both exports `migration.overlaps == 0`
# (rings never ran on both exports at once, as the workers count it),
# `migration.refused == 0`, at least MIGRATIONS hand-overs, and dirty logs mapped.
#
# Usage: migrate.sh --nvmux-bin BIN --api API --initrd BASE.cpio --work DIR --sockdir DIR
#                   --name NAME [--qemu-root ROOT] [--migrations N] [--smp N] [--timeout S]
#   --qemu-root ROOT  run QEMU as `chroot ROOT /usr/bin/qemu-system-x86_64` (the Debian sid
#                     chroot of scripts/sid-qemu.sh); the work, socket and kernel
#                     directories are bind-mounted at the same paths inside ROOT and
#                     unmounted at exit.
# Last line: "migrate NAME: PASS" or "migrate NAME: FAIL <why>"; exit status 0 on PASS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

bin= api= initrd= work= sockdir= name= root= migrations=4 smp=2 timeout_s=900
while (($#)); do
    case $1 in
        --nvmux-bin) bin=$2; shift 2 ;;
        --api) api=$2; shift 2 ;;
        --initrd) initrd=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --sockdir) sockdir=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --qemu-root) root=$2; shift 2 ;;
        --migrations) migrations=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --timeout) timeout_s=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "migrate.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -x $bin && -S $api && -r $initrd && -d $work && -d $sockdir && -n $name ]] \
    || { echo "migrate.sh: --nvmux-bin, --api, --initrd, --work, --sockdir and --name are required" >&2; exit 2; }

# Absolute paths: QEMU may run in a chroot, and the daemon resolves paths itself.
work=$(readlink -f "$work") sockdir=$(readlink -f "$sockdir") initrd=$(readlink -f "$initrd")
nv() { "$bin" --api "$api" "$@"; }
result() { echo "migrate $name: $1"; [[ $1 == PASS ]]; }
kernel=$(cat "$initrd.kernel")
img=$work/$name.img
pids=() mounts=()
cleanup() {
    local p m
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    for ((m = ${#mounts[@]} - 1; m >= 0; m--)); do umount "${mounts[$m]}" 2>/dev/null || umount -l "${mounts[$m]}" 2>/dev/null || true; done
    nv export remove "$name-b" >/dev/null 2>&1 || true
    nv export remove "$name-a" >/dev/null 2>&1 || true
    nv disk delete "$name" >/dev/null 2>&1 || true
    rm -f "$img" "$work/$name.initrd"
}
trap cleanup EXIT

qemu=(qemu-system-x86_64)
if [[ -n $root ]]; then
    [[ -x $root/usr/bin/qemu-system-x86_64 ]] || { result "FAIL no QEMU in $root (run scripts/sid-qemu.sh)"; exit 1; }
    for d in "$work" "$sockdir" "$(dirname "$kernel")" "$(dirname "$initrd")"; do
        d=$(readlink -f "$d")
        mountpoint -q "$root$d" && continue
        mkdir -p "$root$d"
        mount --bind "$d" "$root$d"
        mounts+=("$root$d")
    done
    qemu=(chroot "$root" /usr/bin/qemu-system-x86_64)
fi
echo "== migrate $name: $("${qemu[@]}" --version | head -1)"

# --- the disk and its two exports ---------------------------------------------------
rm -f "$img"
sa=$sockdir/$name-a.sock sb=$sockdir/$name-b.sock
if ! { nv disk create "$name" --backend file --path "$img" --size 64M &&
       nv export add "$name" --name "$name-a" --socket "$sa" --queues 2 &&
       nv export add "$name" --name "$name-b" --socket "$sb" --queues 2 --migration-peer "$name-a"; } \
       > "$work/$name-setup.out" 2>&1; then
    cat "$work/$name-setup.out"
    result "FAIL could not create the disk and its exports"; exit 1
fi
cat "$work/$name-setup.out"

# --- the guest's initrd: base + test script (see boot.sh) ----------------------------------
tmp=$(mktemp -d "$sockdir/initrd.XXXXXX")
install -m 755 "$here/guest-migrate.sh" "$tmp/test.sh"
echo "export MAX_S='$timeout_s'" > "$tmp/test.env"
cp "$initrd" "$work/$name.initrd"
size=$(stat -c %s "$work/$name.initrd")
pad=$(( (4 - size % 4) % 4 ))
((pad == 0)) || head -c "$pad" /dev/zero >> "$work/$name.initrd"
(cd "$tmp" && printf '%s\n' test.sh test.env | cpio --quiet -o -H newc -R 0:0) >> "$work/$name.initrd"
rm -rf "$tmp"

# start_qemu IDX SOCK [MIGSOCK]: a QEMU on export socket SOCK (incoming from MIGSOCK).
start_qemu() {
    local i=$1 vs=$2 mig=${3:-}
    local args=(-accel tcg -cpu max -m 512M -smp "$smp" -nographic -no-reboot -nodefaults
        -serial stdio -kernel "$kernel" -initrd "$work/$name.initrd"
        -append "console=ttyS0 panic=-1 quiet"
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
        -chardev "socket,id=c0,path=$vs" -device vhost-user-blk-pci,chardev=c0,num-queues=2
        -qmp "unix:$sockdir/$name-q$i.qmp,server=on,wait=off")
    [[ -z $mig ]] || args+=(-incoming "unix:$mig")
    rm -f "$sockdir/$name-q$i.qmp"
    echo "# ${qemu[*]} ${args[*]}" > "$work/$name-q$i.log"
    "${qemu[@]}" "${args[@]}" < /dev/null >> "$work/$name-q$i.log" 2>&1 &
    pids+=($!)
    QPID=$!
}

# wait_for PATTERN FILE SECS PID: until PATTERN is in FILE (false if PID exits or time is up)
wait_for() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q "$1" "$2" 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || { grep -q "$1" "$2" 2>/dev/null; return; }
        sleep 0.1
    done
    return 1
}

t0=$SECONDS
start_qemu 0 "$sa"
cur=0 cur_pid=$QPID
if ! wait_for '^NVMUX-ROUND 1' "$work/$name-q0.log" 300 "$cur_pid"; then
    tail -20 "$work/$name-q0.log"
    result "FAIL the guest did not start fio on the source"; exit 1
fi
echo "== guest booted and runs fio ($((SECONDS - t0)) s)"

socks=("$sa" "$sb") ends=(a b)
for ((m = 1; m <= migrations; m++)); do
    next=$m
    to=$((m % 2))          # 1: to export b, 0: back to export a
    mig=$sockdir/$name-mig$m.sock
    rm -f "$mig"
    start_qemu "$next" "${socks[$to]}" "$mig"
    dst_pid=$QPID
    for ((i = 0; i < 300; i++)); do [[ -S $mig ]] && break; kill -0 "$dst_pid" 2>/dev/null || break; sleep 0.1; done
    if [[ ! -S $mig ]]; then
        tail -20 "$work/$name-q$next.log"
        result "FAIL migration $m: the destination QEMU did not listen"; exit 1
    fi
    from=${ends[$(((to + 1) % 2))]}
    if ! out=$(python3 "$here/qmp.py" "$sockdir/$name-q$cur.qmp" migrate "unix:$mig" 300); then
        echo "$out"; tail -20 "$work/$name-q$next.log"
        result "FAIL migration $m ($from -> ${ends[$to]}): $out"; exit 1
    fi
    echo "migration $m: export $name-$from -> $name-${ends[$to]}: $out"
    python3 "$here/qmp.py" "$sockdir/$name-q$cur.qmp" quit || true
    wait "$cur_pid" 2>/dev/null || true
    cur=$next cur_pid=$dst_pid
    # The guest goes on on the destination: a new fio round must start there.
    if ! wait_for '^NVMUX-ROUND' "$work/$name-q$cur.log" 300 "$cur_pid"; then
        tail -20 "$work/$name-q$cur.log"
        result "FAIL migration $m: the guest did not start a new fio round on the destination"; exit 1
    fi
    echo "   guest: $(grep '^test: round' "$work/$name-q$cur.log" | tail -1 || true) $(grep '^NVMUX-ROUND' "$work/$name-q$cur.log" | tail -1)"
done

# Stop marker at 63 MiB; the guest ends its round, checks, powers off.
printf 'STOP' | dd of="$img" bs=4096 seek=$((63 * 256)) conv=notrunc,sync oflag=direct status=none
if ! wait_for '^NVMUX-TEST-RESULT' "$work/$name-q$cur.log" 600 "$cur_pid"; then
    tail -20 "$work/$name-q$cur.log"
    result "FAIL the guest did not finish after the stop marker"; exit 1
fi
wait "$cur_pid" 2>/dev/null || true
grep -h '^test: ' "$work/$name"-q*.log | grep -v '^test: round' || true
echo "   guest rounds: $(cat "$work/$name"-q*.log | grep -c '^test: round .* passed') passed, each fio err=0"

# --- the daemon's view ------------------------------------------------------------------
nv --json export list > "$work/$name-exports.json"
verdict=$(python3 - "$work/$name-exports.json" "$name" "$migrations" <<'EOF'
import json, sys
exports = {e["name"]: e for e in json.load(open(sys.argv[1]))}
name, n = sys.argv[2], int(sys.argv[3])
bad = []
for side in ("a", "b"):
    e = exports.get(f"{name}-{side}")
    if e is None or "migration" not in e:
        bad.append(f"{name}-{side}: no migration view")
        continue
    m = e["migration"]
    print(f"   export {name}-{side}: side {m['side']}, paired {m['paired_exports']}, handoffs {m['handoffs']}, "
          f"waits {m['waits']}, refused {m['refused']}, overlaps {m['overlaps']}, "
          f"dirty logs set {m['dirty_logs_set']} (refused {m['dirty_logs_refused']}, faults {m['dirty_log_faults']})")
    if m["overlaps"] != 0:
        bad.append(f"{name}-{side}: rings ran on both exports at once ({m['overlaps']})")
    if m["refused"] != 0:
        bad.append(f"{name}-{side}: {m['refused']} ring starts refused")
    if m["handoffs"] < n:
        bad.append(f"{name}-{side}: {m['handoffs']} hand-overs, expected >= {n}")
    if m["dirty_logs_set"] < 1 or m["dirty_logs_refused"] or m["dirty_log_faults"]:
        bad.append(f"{name}-{side}: dirty logs set {m['dirty_logs_set']}, refused {m['dirty_logs_refused']}, faults {m['dirty_log_faults']}")
print("OK" if not bad else "; ".join(bad))
EOF
)
echo "$verdict" | sed '$d'
last=$(echo "$verdict" | tail -1)
if ! grep -q '^NVMUX-TEST-RESULT: PASS' "$work/$name-q$cur.log"; then
    grep -h '^test: \|verify\|NVMUX-TEST-RESULT' "$work/$name-q$cur.log" | tail -20
    result "FAIL the guest's fio or dmesg check failed (log $work/$name-q$cur.log)"; exit 1
fi
[[ $last == OK ]] || { result "FAIL $last"; exit 1; }
echo "   $migrations migrations in $((SECONDS - t0)) s"
result PASS
