#!/usr/bin/env bash
# VM end-to-end stage: serve a 64 MiB file-backed disk over vhost-user-blk
# (2 queues) and let a QEMU/TCG guest check it with fio.
#
# Usage: tests/vm/run.sh [--server nvmux|qsd] [--nvmux-bin PATH] [--only NAME[,NAME...]]
#   --server nvmux   the server under test (default); binary from --nvmux-bin,
#                    $NVMUX_BIN, or target/{release,debug}/nvmux
#   --server qsd     qemu-storage-daemon, the reference (validates the harness)
#   --only LIST      run only these scenarios (comma separated; the fio-verify group runs
#                    whole when any of its three is named)
#   --skip LIST      do not run these scenarios (scripts/test.sh runs migrate-qemu11,
#                    vfio-user and vfio-user-nvme as a stage of its own, vm-qemu11)
# Env: NVMUX_VM_WORKDIR (default target/vm/run-<server>: image, logs),
#      VM_SMP (guest vCPUs, default 2: blk-mq uses one queue per CPU, so a
#      1-vCPU guest would only ever see/use one queue), VM_TIMEOUT (per boot, 300 s).
#
# Scenarios, each printing "PASS name" or "FAIL name":
#   fio-verify           write + crc32c-verify 2x16 MiB with 2 jobs on 2 queues
#   reconnect            a second VM against the same, still running server:
#                        fio --verify_only of the data the first VM wrote
#   corruption-detected  overwrite 4 KiB at 1 MiB of the image on the host;
#                        verify_only must now fail (with a clean guest poweroff)
#   thin-resize          (nvmux only) a thin disk in a pool: zeros when fresh, fio
#                        write+verify, discard reads zeros, then the host grows the
#                        disk while the guest runs and the guest sees the new size
#   classifier           (nvmux only) examples/classifiers/guard.c guards the disk's
#                        first MiB: the guest's writes there fail, fio verifies outside
#                        it; the host removes the classifier live and the write succeeds
#   crash-snapshots      (nvmux only) a thin disk on 2 queues: guest fio --verify and
#                        numbered flushed rounds (guest-crash-snapshots.sh) while the
#                        host snapshots every second and kills the daemon with SIGKILL
#                        twice (QEMU reconnects); then the live volume and every
#                        snapshot, read over NBD, must hold every round done before it
#   nvmf, nvmf-restart   (nvmux only) NVMe/TCP with the guest kernel's initiator
#   libvirt              (nvmux only) Debian's libvirtd (started here if not running)
#                        runs QEMU as libvirt-qemu; a <disk type='vhostuser'> domain
#                        boots and passes fio --verify on an export created with
#                        --owner libvirt-qemu, with no chown or chmod of the socket
#                        (tests/vm/libvirt.sh)
#   nvmf-auth            (nvmux only) DH-HMAC-CHAP with the guest kernel's initiator:
#                        right, wrong and missing secrets, bidirectional, the discovery
#                        allow-list, then discovery closed. Debian 12's Linux 6.1 has no
#                        in-band authentication (CONFIG_NVME_AUTH is off), so this guest
#                        boots Debian 12's Linux 6.12 (linux-image-6.12.*+deb12-amd64-
#                        unsigned from bookworm-security, fetched with apt-get download
#                        into target/vm/linux-6.12 once; VM_AUTH_KERNEL_DEB=FILE uses a
#                        given package)
#   dm-crypt             (nvmux only) three encrypted disks (sector_size 512; 4096 with
#                        IVs in 512-byte units; 4096 with iv_large_sectors) served by a
#                        second daemon with a KEK; the guest kernel's dm-crypt
#                        (cryptsetup open --type plain --cipher aes-xts-plain64
#                        --key-size 512 [--sector-size 4096 [--iv-large-sectors]]) on the
#                        raw images reads what nvmux wrote and writes what nvmux reads
#                        (tests/vm/guest-dm-crypt.sh); needs cryptsetup on the host
#                        (apt-get install cryptsetup-bin) and python3-cryptography
#   kill9-inflight       (nvmux only) vhost-user inflight tracking: fio randwrite QD16
#                        --verify for 60 s on a second daemon whose completions are
#                        delayed 0-30 ms (test fault vhost-complete-delay); the daemon is
#                        killed with SIGKILL 3 times and restarted (QEMU reconnect=1); fio
#                        must pass with no I/O error in the guest's dmesg
#                        (tests/vm/guest-kill9.sh)
#   kill9-no-inflight    (nvmux only) negative control: the same with INFLIGHT_SHMFD
#                        switched off (test fault vhost-no-inflight); passes when the
#                        guest fails (fio hangs, or a verify or I/O error)
#   migrate              (nvmux only) live migration on one host: a disk with a migration
#                        pair of exports (export add --migration-peer), a QEMU 7.2 guest
#                        running fio --verify rounds and a --verify_only reader (whose
#                        buffers only the device writes: it catches a broken dirty log)
#                        migrates over a Unix socket (QMP migrate, -incoming) back and
#                        forth twice; pass = every round and the reader verified, no I/O
#                        error in dmesg, and the daemon shows overlaps 0 (rings never ran
#                        on both exports at once) (tests/vm/migrate.sh)
#   migrate-qemu11       (nvmux only) the same with QEMU 11 from a Debian sid chroot
#                        (scripts/sid-qemu.sh builds it once: ~1 min, ~350 MB)
#   vfio-user            (nvmux only) QEMU 11 from the sid chroot attaches the vfio-user
#                        PCI NVMe function of nvmux-vfiouser-probe (next to the nvmux
#                        binary, or $NVMUX_VFIOUSER_PROBE); two VMs, one after the other:
#                        negotiation, guest RAM mapped, MSI-X eventfds, CC.EN -> CSTS.RDY,
#                        Identify read from guest memory; the guest sees class 0x010802
#                        (tests/vm/vfio-user.sh)
#   vfio-user-nvme       (nvmux only) the daemon's vfio-user export with QEMU 11 from the
#                        sid chroot: the guest's nvme driver on nvmux's PCI NVMe
#                        controller (identity, queues, fio --verify, discard, resize, a
#                        second VM on the socket) (tests/vm/vfio-user-nvme.sh)
#   upgrade              (nvmux only) the guest runs fio write+verify rounds (random
#                        writes, QD16, crc32c) for UPGRADE_RUNTIME s (default 60) while
#                        the host runs `nvmux upgrade --binary COPY` 3 times (copies of
#                        the binary at other paths): 0 fio errors, no I/O error in the
#                        guest's dmesg, QEMU logs no vhost-user disconnect or reconnect
#                        (its chardev has reconnect=1 and never needs it), the daemon logs
#                        no client (dis)connect after the first, and each upgrade changed
#                        the daemon's pid (tests/vm/guest-upgrade.sh)
#   nvmf-backend         (nvmux only) a disk on a remote NVMe/TCP namespace (--backend
#                        nvmf, two paths) served by the guest kernel's nvmet-tcp in a
#                        target VM (tests/vm/guest-nvmet-target.sh, ports forwarded with
#                        boot.sh --hostfwd); nvmux bench verify over vhost-user, then a
#                        20 s verify run while port 1 is unlinked in the target 5 s in:
#                        0 errors, prints the failover time (disk show's last_failover_ms
#                        and the client's longest stall), failovers >= 1, active path P2
#   mirror-net           (nvmux only) a mirror leg on a second daemon over NVMe/TCP; the
#                        guest's fio --verify runs on while that daemon is killed -9 and
#                        restarted; the leg faults, resyncs only dirty regions
#                        (0 < resynced_regions < regions); cmp of the two files at the end
#   disk-move            (nvmux only) nvmux disk move to a second daemon's namespace under
#                        the guest's fio --verify; then a second boot's --verify_only
#                        reads the data back from the remote
#   rbd                  (nvmux only; "SKIP rbd (no Ceph: CEPH_CONF unset)" without a
#                        cluster: the Ceph CI stage exports CEPH_CONF, see
#                        tests/ceph/cluster.sh) a daemon of its own with `disk create r
#                        --backend rbd --image rbd/vm-PID --size 256M`, exported over
#                        vhost-user (2 queues), as namespace 1 of an NVMe/TCP subsystem and
#                        over NBD. The guest (tests/vm/guest-rbd.sh): fio write + crc32c
#                        verify of region 1 (32 MiB at 0) on /dev/vda; the kernel's nvme-tcp
#                        connects and fio writes + verifies region 2 (at 64 MiB), then
#                        re-verifies region 1 through NVMe/TCP. The host: fio's nbd engine
#                        writes + verifies region 3 (at 128 MiB), --verify_only of regions 1
#                        and 2 over NBD, a negative control (verify_only of an unwritten
#                        region must fail), `rbd info` shows the 256 MiB image; the image is
#                        removed with `rbd rm` at the end (nvmux never removes one)
#   rbd-outage           (skipped without CEPH_CONF like rbd; with --server qsd the disk is
#                        QEMU's own librbd driver in qemu-storage-daemon) a cluster of its
#                        own (cluster.sh up --dir /tmp/nvmux-ceph-vm --port 6889, or
#                        $NVMUX_VM_CEPH_DIR / $NVMUX_VM_CEPH_PORT; torn down at the end), so
#                        the shared cluster's OSD is never touched. The guest
#                        (tests/vm/guest-rbd-outage.sh) runs fio randwrite QD16
#                        --verify=crc32c for 40 s on a vhost-user export of an RBD disk;
#                        10 s in the host runs `cluster.sh osd-stop`, 10 s after that
#                        `osd-start`. Passes when fio reports 0 errors and the guest's dmesg
#                        has no I/O error; prints "rbd-outage: OSD down D s, longest guest
#                        stall S s, E errors" (the stall: the longest gap between two
#                        completions in fio's --write_lat_log, reads and writes).
#                        RBD_OUTAGE_OP_TIMEOUT_MS=N gives the daemon [rbd] op_timeout_ms = N:
#                        below the outage, librbd fails the stalled requests (ETIMEDOUT)
#                        and the scenario must FAIL (a negative control, run by hand)
# Last line: "vm: N passed, N failed"; the exit status is nonzero on any failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

server=nvmux
only=
skip=
while (($#)); do
    case $1 in
        --server) server=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --skip) skip=$2; shift 2 ;;
        --nvmux-bin) NVMUX_BIN=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case $server in qsd|nvmux) ;; *) echo "run.sh: --server must be qsd or nvmux" >&2; exit 2 ;; esac

work=${NVMUX_VM_WORKDIR:-$repo/target/vm/run-$server}
smp=${VM_SMP:-2}
boot_timeout=${VM_TIMEOUT:-300}
queues=2
initrd=$repo/target/vm/initramfs.cpio

need() { command -v "$1" >/dev/null || { echo "run.sh: '$1' not found (${2:-})" >&2; exit 2; }; }
# want NAME: the scenario is selected (no --only, or named in it).
want() { [[ ",$skip," != *",$1,"* ]] && [[ -z $only || ",$only," == *",$1,"* ]]; }
need qemu-system-x86_64 "apt-get install qemu-system-x86"
need fio "apt-get install fio"
need busybox "apt-get install busybox-static"
need cpio
if [[ $server == qsd ]]; then
    need qemu-storage-daemon "apt-get install qemu-utils"
else
    if [[ -z ${NVMUX_BIN:-} ]]; then
        for b in "$repo/target/release/nvmux" "$repo/target/debug/nvmux"; do
            [[ -x $b ]] && { NVMUX_BIN=$b; break; }
        done
    fi
    [[ -x ${NVMUX_BIN:-} ]] || { echo "run.sh: no nvmux binary (set NVMUX_BIN or build it)" >&2; exit 2; }
fi

# Image and logs live in $work (kept for post-mortems); sockets in a short
# /tmp path (sun_path is limited to 108 bytes).
mkdir -p "$work"
rm -f "$work"/disk.img "$work"/*.log "$work"/*.out   # results of an earlier run
sockdir=$(mktemp -d /tmp/nvmux-vm.XXXXXX)
img=$work/disk.img
sock=$sockdir/vhost.sock
SERVER_PID=

passed=0 failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+ ($2)}"; failed=$((failed + 1)); }

# --- server control ------------------------------------------------------------------

wait_for_socket() {   # PATH: wait up to 30 s while the server is alive
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -S $1 ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "run.sh: server exited before creating $1" >&2; return 1; }
        sleep 0.1
    done
    echo "run.sh: timed out waiting for $1" >&2
    return 1
}

start_qsd_server() {   # IMG SOCK
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$1,cache.direct=on,aio=io_uring" \
        --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$2,writable=on,num-queues=$queues" \
        >> "$work/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for_socket "$2"
}

# ==== nvmux server: the CLI interface this stage is written against ====================
#   nvmux serve --data-dir DIR                  (API socket appears at DIR/nvmux.sock)
#   nvmux --api API disk create NAME --backend file --path IMG --size 64M
#   nvmux --api API export add NAME --socket SOCK --queues N
# Stopped with SIGTERM by stop_server.
start_nvmux_server() {   # IMG SOCK
    local img=$1 vsock=$2 dir=$sockdir/nvmux-data
    local api=$dir/nvmux.sock
    mkdir -p "$dir"
    "$NVMUX_BIN" serve --data-dir "$dir" >> "$work/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for_socket "$api" || return 1
    "$NVMUX_BIN" --api "$api" disk create vm1 --backend file --path "$img" --size 64M || return 1
    "$NVMUX_BIN" --api "$api" export add vm1 --socket "$vsock" --queues "$queues" || return 1
    wait_for_socket "$vsock"
}
# ========================================================================================

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    local pid=$SERVER_PID i rc=0
    SERVER_PID=
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "run.sh: WARNING: server (pid $pid) still running 10 s after SIGTERM, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || rc=$?
    echo "run.sh: server stopped (exit status $rc; log: $work/server.log)"
}

OUTAGE_CLUSTER=   # rbd-outage's Ceph cluster directory while it is up
cleanup() {
    stop_server
    [[ -z $OUTAGE_CLUSTER ]] || "$repo/tests/ceph/cluster.sh" down --dir "$OUTAGE_CLUSTER" > /dev/null 2>&1 || true
    rm -rf "$sockdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- guest boots -------------------------------------------------------------------------

# boot NAME GUEST_SCRIPT: boot one VM; returns boot.sh's status
# (0 guest PASS, 1 guest FAIL with clean poweroff, 2 timeout/crash/no marker).
boot() { # name verify_only(0|1)
    local name=$1 verify_only=$2 rc=0
    "$here/boot.sh" --initrd "$initrd" --script "$here/guest-fio-verify.sh" --log "$work/$name.log" \
        --vhost-sock "$sock" --queues "$queues" --env "EXPECT_QUEUES=$queues" \
        --env "VERIFY_ONLY=$verify_only" \
        --smp "$smp" --timeout "$boot_timeout" > "$work/$name.out" 2>&1 || rc=$?
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "run.sh: the server died during $name" >&2
        rc=3
    fi
    return "$rc"
}

t0=$(date +%s)
echo "== vm stage: server=$server smp=$smp queues=$queues work=$work"
"$here/build-initramfs.sh" "$initrd"
dd if=/dev/zero of="$img" bs=1M count=64 status=none

if ! "start_${server}_server" "$img" "$sock"; then
    fail server-start "see $work/server.log"
    stop_server
    tail -n 20 "$work/server.log" 2>/dev/null || true
    echo "vm: $passed passed, $failed failed"
    exit 1
fi
echo "== server up (pid $SERVER_PID, socket $sock)"

if want fio-verify || want reconnect || want corruption-detected; then
# a. fio-verify: write + verify through both queues.
rc=0; boot fio-verify 0 || rc=$?
cat "$work/fio-verify.out"
grep '^test: ' "$work/fio-verify.log" || true
if ((rc == 0)); then pass fio-verify; else fail fio-verify "boot status $rc, log $work/fio-verify.log"; fi
written=$rc

# c. reconnect: a new VM on the same server socket re-reads the first VM's data
#    (verify_only on intact data: must pass, and is the baseline for b.).
rc=0; boot reconnect 1 || rc=$?
cat "$work/reconnect.out"
if ((written != 0)); then
    fail reconnect "skipped: fio-verify did not write the data"
elif ((rc == 0)); then
    pass reconnect
else
    fail reconnect "boot status $rc, log $work/reconnect.log"
fi
intact=$rc

# b. corruption-detected: change 4 KiB on the host behind the server's back;
#    the next verify_only must fail on exactly that block, and the guest must
#    still shut down cleanly (boot status 1, not a timeout or crash).
if ((written != 0 || intact != 0)); then
    fail corruption-detected "skipped: needs fio-verify and an intact verify_only pass"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail corruption-detected "server is not running"
else
    dd if=/dev/urandom of="$img" bs=4k seek=256 count=1 conv=notrunc oflag=direct status=none
    echo "== corrupted 4 KiB at offset 1 MiB of $img"
    rc=0; boot corruption-detected 1 || rc=$?
    # e.g. "verify: bad magic header 3943, wanted acca at file /dev/vda offset 1048576, length 4096 ..."
    verr=$(grep -m1 -o 'verify: .* offset 1048576, length 4096.*' "$work/corruption-detected.log" || true)
    if ((rc == 1)) && [[ -n $verr ]]; then
        head -n1 "$work/corruption-detected.out"   # boot.sh's reason line
        echo "   guest fio: $verr"
        pass corruption-detected
    else
        cat "$work/corruption-detected.out"
        case $rc in
            0) fail corruption-detected "verify_only passed on corrupted data" ;;
            1) fail corruption-detected "guest failed, but not with a verify error at offset 1048576" ;;
            *) fail corruption-detected "boot status $rc (timeout, crash or server death)" ;;
        esac
    fi
fi

else
    echo "SKIP fio-verify, reconnect, corruption-detected (--only)"
fi

# d. thin-resize (nvmux only): a thin disk in a pool. The guest checks zeros on a fresh
#    disk, fio write+verify, discard; the host grows the disk while the guest runs, and
#    the guest must see the new size (config-change interrupt), keep its data and use
#    the new space.
if ! want thin-resize; then
    echo "SKIP thin-resize (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP thin-resize (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail thin-resize "server is not running"
else
    api=$sockdir/nvmux-data/nvmux.sock tsock=$sockdir/thin.sock
    rm -f "$work/pool.img"
    if ! { "$NVMUX_BIN" --api "$api" pool create vmpool --path "$work/pool.img" --size 256M &&
           "$NVMUX_BIN" --api "$api" disk create thin1 --pool vmpool --size 64M &&
           "$NVMUX_BIN" --api "$api" export add thin1 --socket "$tsock" --queues 1; } > "$work/thin-setup.out" 2>&1; then
        cat "$work/thin-setup.out"
        fail thin-resize "could not create the pool disk"
    else
        rc=0
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-thin.sh" --log "$work/thin-resize.log" \
            --vhost-sock "$tsock" --env SIZE_MIB=64 --env NEW_MIB=96 \
            --smp "$smp" --timeout "$boot_timeout" > "$work/thin-resize.out" 2>&1 &
        bpid=$!
        resized=no
        while kill -0 "$bpid" 2>/dev/null; do
            if [[ $resized == no ]] && grep -q '^NVMUX-RESIZE-READY' "$work/thin-resize.log" 2>/dev/null; then
                "$NVMUX_BIN" --api "$api" disk resize thin1 96M && resized=yes || resized=failed
                echo "== host: nvmux disk resize thin1 96M: $resized"
            fi
            sleep 0.5
        done
        wait "$bpid" || rc=$?
        cat "$work/thin-resize.out"
        grep '^test: \|new size' "$work/thin-resize.log" || true
        if ((rc == 0)) && [[ $resized == yes ]]; then
            pass thin-resize
        else
            fail thin-resize "boot status $rc, resize $resized, log $work/thin-resize.log"
        fi
    fi
fi

# d2. classifier (nvmux only): the guard classifier, compiled here with clang, on a new
#     disk; the guest checks the refusal and fio outside the range; at its marker the
#     host removes the classifier from the running disk and the guest's write goes through.
if ! want classifier; then
    echo "SKIP classifier (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP classifier (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail classifier "server is not running"
elif ! command -v clang >/dev/null; then
    fail classifier "clang not found (apt-get install clang)"
else
    api=$sockdir/nvmux-data/nvmux.sock gsock=$sockdir/guard.sock
    rm -f "$work/guard.img"
    if ! { clang -O2 -target bpf -I "$repo/examples/classifiers" -c "$repo/examples/classifiers/guard.c" -o "$work/guard.o" &&
           "$NVMUX_BIN" --api "$api" disk create guard1 --backend file --path "$work/guard.img" --size 64M &&
           "$NVMUX_BIN" --api "$api" disk set-classifier guard1 "$work/guard.o" --map range:0=0,2048 &&
           "$NVMUX_BIN" --api "$api" export add guard1 --socket "$gsock" --queues 1; } > "$work/classifier-setup.out" 2>&1; then
        cat "$work/classifier-setup.out"
        fail classifier "could not set up the guarded disk"
    else
        rc=0
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-classifier.sh" --log "$work/classifier.log"             --vhost-sock "$gsock" --smp "$smp" --timeout "$boot_timeout" > "$work/classifier.out" 2>&1 &
        bpid=$!
        swapped=no
        while kill -0 "$bpid" 2>/dev/null; do
            if [[ $swapped == no ]] && grep -q '^NVMUX-READY-UNGUARD' "$work/classifier.log" 2>/dev/null; then
                refused=$("$NVMUX_BIN" --api "$api" --json disk classifier guard1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["program"]["maps"][1]["values"][0]["words"][0])' 2>/dev/null || echo 0)
                "$NVMUX_BIN" --api "$api" disk set-classifier guard1 --none > /dev/null && swapped=yes || swapped=failed
                echo "== host: guard refused $refused writes; nvmux disk set-classifier guard1 --none: $swapped"
            fi
            sleep 0.3
        done
        wait "$bpid" || rc=$?
        cat "$work/classifier.out"
        grep '^test: ' "$work/classifier.log" || true
        if ((rc == 0)) && [[ $swapped == yes ]] && ((${refused:-0} >= 1)); then
            pass classifier
        else
            fail classifier "boot status $rc, swap $swapped, refused ${refused:-0}, log $work/classifier.log"
        fi
    fi
fi

# d3. crash-snapshots (nvmux only): a thin disk over vhost-user-blk (2 queues; QEMU's
#     chardev has reconnect=1). The guest runs fio --verify (verify_backlog) and numbered,
#     flushed rounds (tests/vm/guest-crash-snapshots.sh); the host takes a snapshot every
#     second and kills the daemon with SIGKILL twice, restarting it at once. Afterwards the
#     live volume and every snapshot are read over NBD and checked (crash_verify below).
#
#     The pool (1 GiB) holds what ~40 snapshots keep of the 8 MiB fio region and the 2 MiB
#     of rounds; with 256 MiB it filled up after 17 and writes failed with EIO.
#
#     Why one request at a time per virtqueue: nvmux has no INFLIGHT_SHMFD, so when the
#     backend dies QEMU rewinds each queue's avail index to its used index and the new
#     backend redoes the requests past it. That is exact when at most one request per queue
#     is in flight (a redone write or flush is harmless); with several, one completed out
#     of order would make QEMU skip an unfinished one and the guest would wait for ever.
#     So each guest writer is pinned to its own vCPU (= its own queue) at iodepth 1.
crash_restart() {   # SIGKILL the daemon, start it again on the same data directory
    local dir=$sockdir/nvmux-data pid=$SERVER_PID
    kill -KILL "$pid" 2>/dev/null || return 1
    wait "$pid" 2>/dev/null || true
    "$NVMUX_BIN" serve --data-dir "$dir" >> "$work/server.log" 2>&1 &
    SERVER_PID=$!
    wait_for_socket "$dir/nvmux.sock"
}

# crash_verify SLOTS END SNAPLIST RAWDIR: the live image (RAWDIR/live.raw) must hold, in
# every slot, exactly the last round written there (END rounds completed in all); a
# snapshot taken when round D was the last the host had seen done must hold, in every
# slot, a round at least as new as the last one <= D written there (a newer one is fine:
# it may have been in flight or done but not yet printed). Every 4 KiB block must be a
# whole block of the round and slot it claims, or zero where no round ever wrote.
crash_verify() {
    python3 - "$@" <<'PY'
import os, sys
slots, end, snaplist, rawdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

def blk(r, s, b):
    h = b"NVMUX-ROUND %010d SLOT %04d BLOCK %04d" % (r, s, b)
    return (h + b" " * 20 + b"\n") * 64

def last_round(s, upto):   # the last round <= upto that writes slot s (rounds start at 1)
    r = upto - ((upto - s) % slots)
    return r if r >= 1 else 0

def check(name, data, upto, exact):
    errs = []
    for s in range(slots):
        want = last_round(s, upto)
        for b in range(16):
            off = (s * 16 + b) * 4096
            got = data[off:off + 4096]
            if got == bytes(4096):
                if want:
                    errs.append(f"slot {s} block {b}: zeros, wanted round >= {want}")
                continue
            try:
                r = int(got[12:22])
            except ValueError:
                errs.append(f"slot {s} block {b}: not a round block: {got[:48]!r}")
                continue
            if got != blk(r, s, b):
                errs.append(f"slot {s} block {b}: damaged block claiming round {r}: {got[:48]!r}")
            elif r % slots != s or r > end:
                errs.append(f"slot {s} block {b}: round {r} cannot be in slot {s} (rounds 1..{end})")
            elif (exact and r != want) or r < want:
                errs.append(f"slot {s} block {b}: round {r}, wanted {'' if exact else '>= '}{want}")
    return errs

bad = 0
live = open(os.path.join(rawdir, "live.raw"), "rb").read()
e = check("live", live, end, True)
print(f"crash-verify: live volume, {end} rounds: {'ok' if not e else 'LOST DATA'}")
for x in e[:10]: print("   ", x)
bad += bool(e)
n = 0
for line in open(snaplist):
    name, upto = line.split()
    data = open(os.path.join(rawdir, name + ".raw"), "rb").read()
    e = check(name, data, int(upto), False)
    n += 1
    print(f"crash-verify: {name} (taken after round {upto} was done): {'ok' if not e else 'LOST DATA'}")
    for x in e[:10]: print("   ", x)
    bad += bool(e)
print(f"crash-verify: {n} snapshots, {bad} image(s) failed")
sys.exit(1 if bad else 0)
PY
}

if ! want crash-snapshots; then
    echo "SKIP crash-snapshots (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP crash-snapshots (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail crash-snapshots "server is not running"
else
    api=$sockdir/nvmux-data/nvmux.sock csock=$sockdir/crash.sock nsock=$sockdir/crash-nbd.sock
    slots=32
    rm -rf "$work/crash.pool" "$work/crash"
    mkdir -p "$work/crash"
    if ! { "$NVMUX_BIN" --api "$api" pool create crashpool --path "$work/crash.pool" --size 1G &&
           "$NVMUX_BIN" --api "$api" disk create crash1 --pool crashpool --size 48M &&
           "$NVMUX_BIN" --api "$api" export add crash1 --socket "$csock" --queues 2; } > "$work/crash-setup.out" 2>&1; then
        cat "$work/crash-setup.out"
        fail crash-snapshots "could not create the pool disk"
    else
        rc=0
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-crash-snapshots.sh" \
            --log "$work/crash-snapshots.log" --vhost-sock "$csock" --queues 2 --reconnect 1 \
            --env "SLOTS=$slots" --env RUNTIME=40 \
            --smp 2 --timeout "$boot_timeout" > "$work/crash-snapshots.out" 2>&1 &
        bpid=$!
        snaps=$work/crash/snapshots.txt
        : > "$snaps"
        crash_t0= kills=0 k=0 tries=0 crash_err=
        while kill -0 "$bpid" 2>/dev/null; do
            if [[ -z $crash_t0 ]]; then
                grep -q '^NVMUX-READY-CRASH' "$work/crash-snapshots.log" 2>/dev/null && crash_t0=$(date +%s)
                sleep 0.3
                continue
            fi
            # The last round the guest reported done, read before the snapshot is asked
            # for: the snapshot must hold at least that much.
            upto=$(grep -ao '^NVMUX-ROUND-DONE [0-9]*' "$work/crash-snapshots.log" | tail -n1 | cut -d' ' -f2 || true)
            tries=$((tries + 1))
            if "$NVMUX_BIN" --api "$api" disk snapshot crash1 "crash-snap-$k" > /dev/null 2>> "$work/crash/snapshot-errors.txt"; then
                echo "crash-snap-$k ${upto:-0}" >> "$snaps"
                k=$((k + 1))
            fi
            el=$(($(date +%s) - crash_t0))
            if { ((kills == 0 && el >= 8)) || ((kills == 1 && el >= 20)); }; then
                if crash_restart; then
                    kills=$((kills + 1))
                    echo "== host: kill -9 and restart $kills at ${el}s (after round ${upto:-0}; new pid $SERVER_PID)"
                else
                    crash_err="restart $((kills + 1)) failed"
                    break
                fi
            fi
            sleep 1
        done
        wait "$bpid" || rc=$?
        cat "$work/crash-snapshots.out"
        grep -a '^test: \|^NVMUX-ROUNDS-END' "$work/crash-snapshots.log" || true
        end=$(grep -ao '^NVMUX-ROUNDS-END [0-9]*' "$work/crash-snapshots.log" | cut -d' ' -f2 || true)
        echo "== host: $k snapshots of $tries tries, $kills kills, ${end:-?} rounds"
        # Every snapshot keeps the clusters overwritten after it: a full pool fails writes
        # (Capacity Exceeded, EIO in the guest), which is not what this scenario tests.
        "$NVMUX_BIN" --api "$api" pool show crashpool 2>&1 | head -n 3 || true
        # Read the live volume and every snapshot back over NBD (snapshots read-only).
        vrc=1
        if ((rc == 0)) && [[ -n $end && -z $crash_err ]] &&
           "$NVMUX_BIN" --api "$api" export add crash1 --type nbd --socket "$nsock" --name crash1-nbd --read-only > /dev/null &&
           qemu-img dd -f raw -O raw "if=nbd+unix:///crash1-nbd?socket=$nsock" "of=$work/crash/live.raw" bs=64k "count=$slots"; then
            ok=yes
            while read -r name _; do
                { "$NVMUX_BIN" --api "$api" disk create "$name-ro" --pool crashpool --volume "$name" &&
                  "$NVMUX_BIN" --api "$api" export add "$name-ro" --type nbd --socket "$nsock" &&
                  qemu-img dd -f raw -O raw "if=nbd+unix:///$name-ro?socket=$nsock" "of=$work/crash/$name.raw" bs=64k "count=$slots"; } > /dev/null ||
                    { ok=no; echo "== host: could not read $name"; }
            done < "$snaps"
            # (A failing check must not end run.sh under set -e: it is recorded below.)
            if [[ $ok == yes ]]; then
                vrc=0
                crash_verify "$slots" "$end" "$snaps" "$work/crash" | tee "$work/crash/verify.txt" || vrc=$?
            fi
            # Negative control: the checker must see that the first snapshot lacks the
            # rounds written after it (pretend it was taken after the last one).
            if ((vrc == 0)); then
                head -n1 "$snaps" | awk -v e="$end" '{ print $1, e }' > "$work/crash/control.txt"
                if crash_verify "$slots" "$end" "$work/crash/control.txt" "$work/crash" > "$work/crash/control.out"; then
                    echo "== host: the checker's negative control passed: it cannot detect lost rounds"
                    vrc=1
                else
                    echo "== host: negative control: $(grep -m1 -A1 'LOST DATA' "$work/crash/control.out" | tr -s ' ' | paste -sd' ')"
                fi
            fi
        fi
        if ((rc == 0 && vrc == 0 && kills == 2 && k >= 10)); then
            pass crash-snapshots
        else
            fail crash-snapshots "boot status $rc, kills $kills, snapshots $k, verify status $vrc${crash_err:+, $crash_err}, log $work/crash-snapshots.log"
        fi
    fi
fi

# e. nvmf / nvmf-restart (nvmux only): NVMe/TCP with the guest kernel's initiator.
#    Contract: nvmux subsystem create NQN --listen ADDR:PORT --serial SN;
#    subsystem allow-host NQN HOST; subsystem add-ns NQN DISK [--nsid N] (--json: nguid,
#    size); disk resize; the daemon restores subsystems from state.json at start.
nqn=nqn.2026-11.io.nvmux:vm-test
hostnqn=nqn.2014-08.org.nvmexpress:uuid:6e766d75-7800-4000-8000-000000000001
hostid=6e766d75-7800-4000-8000-000000000001
denied=nqn.2014-08.org.nvmexpress:uuid:6e766d75-7800-4000-8000-0000000000ff
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# boot_watch NAME SCRIPT ENV...: boot in the background; run the host action for each
# marker the guest prints (actions: marker_<MARKER>); sets rc and ACTIONS.
boot_watch() {
    local name=$1 script=$2; shift 2
    local envs=() e
    for e in "$@"; do envs+=(--env "$e"); done
    "$here/boot.sh" --initrd "${BOOT_INITRD:-$initrd}" --script "$here/$script" --log "$work/$name.log" --net \
        "${envs[@]}" --smp "$smp" --timeout "$boot_timeout" > "$work/$name.out" 2>&1 &
    local bpid=$! m
    local done_markers=" "
    ACTIONS=""
    while kill -0 "$bpid" 2>/dev/null; do
        for m in $(grep -o '^NVMUX-READY-[A-Z]*' "$work/$name.log" 2>/dev/null || true); do
            [[ $done_markers == *" $m "* ]] && continue
            done_markers+="$m "
            if "marker_${m#NVMUX-READY-}"; then ACTIONS+="${m#NVMUX-READY-}:ok "; else ACTIONS+="${m#NVMUX-READY-}:failed "; fi
        done
        sleep 0.3
    done
    rc=0
    wait "$bpid" || rc=$?
    cat "$work/$name.out"
    grep '^test: ' "$work/$name.log" || true
}

if ! want nvmf && ! want nvmf-restart; then
    echo "SKIP nvmf, nvmf-restart (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP nvmf, nvmf-restart (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail nvmf "server is not running"
    fail nvmf-restart "server is not running"
else
    api=$sockdir/nvmux-data/nvmux.sock
    port=$(free_port)
    rm -f "$work/ns1.img"
    # ns2 lives in thin-resize's pool; make it when that scenario was not run (--only).
    if ! "$NVMUX_BIN" --api "$api" pool show vmpool > /dev/null 2>&1; then
        rm -f "$work/pool.img"
        "$NVMUX_BIN" --api "$api" pool create vmpool --path "$work/pool.img" --size 256M > /dev/null || true
    fi
    if ! { "$NVMUX_BIN" --api "$api" disk create ns1 --backend file --path "$work/ns1.img" --size 64M &&
           "$NVMUX_BIN" --api "$api" disk create ns2 --pool vmpool --size 32M &&
           "$NVMUX_BIN" --api "$api" subsystem create "$nqn" --listen "127.0.0.1:$port" --serial NVMUXVM01 &&
           "$NVMUX_BIN" --api "$api" subsystem allow-host "$nqn" "$hostnqn" &&
           "$NVMUX_BIN" --api "$api" --json subsystem add-ns "$nqn" ns1 --nsid 1 > "$work/ns1.json"; } > "$work/nvmf-setup.out" 2>&1; then
        cat "$work/nvmf-setup.out" "$work/ns1.json"
        fail nvmf "could not create the subsystem"
        fail nvmf-restart "could not create the subsystem"
    else
        marker_ADD() { "$NVMUX_BIN" --api "$api" subsystem add-ns "$nqn" ns2 --nsid 2; }
        marker_RESIZE() { "$NVMUX_BIN" --api "$api" disk resize ns2 48M; }
        boot_watch nvmf guest-nvmf.sh TARGET_IP=10.0.2.2 "PORT=$port" "NQN=$nqn" \
            "HOSTNQN=$hostnqn" "HOSTID=$hostid" "DENIED_HOSTNQN=$denied" \
            "SIZE_BYTES=$(json_field size < "$work/ns1.json")" "NGUID=$(json_field nguid < "$work/ns1.json")" \
            SERIAL=NVMUXVM01 MODEL=nvmux NS2_SIZE_BYTES=$((32 << 20)) NS2_NEW_SIZE_BYTES=$((48 << 20))
        echo "== host actions: $ACTIONS"
        if ! grep -q "$denied" "$work/server.log"; then
            fail nvmf "the daemon log does not mention the refused host $denied"
        elif ((rc == 0)) && [[ $ACTIONS == "ADD:ok RESIZE:ok " ]]; then
            pass nvmf
        else
            fail nvmf "boot status $rc, host actions '$ACTIONS', log $work/nvmf.log"
        fi

        # The restart: SIGTERM, then the same data directory again (state.json brings
        # the subsystem, its port and its namespaces back).
        marker_RESTART() {
            local dir=$sockdir/nvmux-data
            stop_server
            "$NVMUX_BIN" serve --data-dir "$dir" >> "$work/server.log" 2>&1 &
            SERVER_PID=$!
            wait_for_socket "$dir/nvmux.sock"
        }
        boot_watch nvmf-restart guest-nvmf-restart.sh TARGET_IP=10.0.2.2 "PORT=$port" "NQN=$nqn" \
            "HOSTNQN=$hostnqn" "HOSTID=$hostid"
        echo "== host actions: $ACTIONS"
        if ((rc == 0)) && [[ $ACTIONS == "RESTART:ok " ]]; then
            pass nvmf-restart
        else
            fail nvmf-restart "boot status $rc, host actions '$ACTIONS', log $work/nvmf-restart.log"
        fi
    fi
fi

# f. libvirt (nvmux only): the socket's owner comes from the export alone.
if ! want libvirt; then
    echo "SKIP libvirt (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP libvirt (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail libvirt "server is not running"
else
    rc=0
    "$here/libvirt.sh" --nvmux-bin "$NVMUX_BIN" --api "$sockdir/nvmux-data/nvmux.sock" \
        --initrd "$initrd" --work "$work" --smp "$smp" --timeout "$boot_timeout" || rc=$?
    if ((rc == 0)); then pass libvirt; else fail libvirt "status $rc, console $work/libvirt.log"; fi
fi

# g. nvmf-auth (nvmux only): DH-HMAC-CHAP with the guest kernel's initiator (Linux 6.12).
auth_kernel() {   # prints KROOT KVER of an unpacked Debian 12 Linux 6.12 package
    local dir=$repo/target/vm/linux-6.12 deb pkg
    if [[ ! -d $dir/root/boot ]]; then
        mkdir -p "$dir"
        deb=${VM_AUTH_KERNEL_DEB:-}
        if [[ -z $deb ]]; then
            pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' |
                  awk '{ print $1 }' | sort -V | tail -n1)
            [[ -n $pkg ]] || { echo "run.sh: no linux-image-6.12.*+deb12-amd64-unsigned package (apt-get update? bookworm-security in sources?)" >&2; return 1; }
            (cd "$dir" && apt-get download "$pkg" > /dev/null 2>&1) || { echo "run.sh: apt-get download $pkg failed" >&2; return 1; }
            deb=$(ls "$dir"/linux-image-6.12*.deb | tail -n1)
        fi
        rm -rf "$dir/root.tmp"
        dpkg-deb -x "$deb" "$dir/root.tmp" && mv "$dir/root.tmp" "$dir/root"
        rm -f "$dir"/linux-image-6.12*.deb
    fi
    echo "$dir/root $(ls "$dir/root/lib/modules" | sort -V | tail -n1)"
}

if ! want nvmf-auth; then
    echo "SKIP nvmf-auth (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP nvmf-auth (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail nvmf-auth "server is not running"
elif ! kinfo=$(auth_kernel); then
    fail nvmf-auth "could not get the Linux 6.12 kernel package"
else
    read -r kroot kver <<< "$kinfo"
    auth_initrd=$repo/target/vm/initramfs-auth.cpio
    KROOT=$kroot KVER=$kver "$here/build-initramfs.sh" "$auth_initrd"
    api=$sockdir/nvmux-data/nvmux.sock
    anqn=nqn.2026-11.io.nvmux:vm-auth
    ahost=nqn.2014-08.org.nvmexpress:uuid:6e766d75-7800-4000-8000-0000000000a1
    ahostid=6e766d75-7800-4000-8000-0000000000a1
    strangerid=6e766d75-7800-4000-8000-0000000000ee
    stranger=nqn.2014-08.org.nvmexpress:uuid:$strangerid
    aport=$(free_port)
    secret=$("$NVMUX_BIN" subsystem gen-secret --hmac sha256)
    ctrl_secret=$("$NVMUX_BIN" subsystem gen-secret --hmac sha384 --length 48)
    wrong=$("$NVMUX_BIN" subsystem gen-secret --hmac sha256)
    rm -f "$work/auth.img"
    if ! { "$NVMUX_BIN" --api "$api" disk create authns --backend file --path "$work/auth.img" --size 64M &&
           "$NVMUX_BIN" --api "$api" subsystem create "$anqn" --listen "127.0.0.1:$aport" --require-auth &&
           "$NVMUX_BIN" --api "$api" subsystem allow-host "$anqn" "$ahost" \
               --dhchap-secret "$secret" --dhchap-ctrl-secret "$ctrl_secret" &&
           "$NVMUX_BIN" --api "$api" subsystem add-ns "$anqn" authns; } > "$work/nvmf-auth-setup.out" 2>&1; then
        cat "$work/nvmf-auth-setup.out"
        fail nvmf-auth "could not create the subsystem"
    else
        marker_CLOSE() {
            local dir=$sockdir/nvmux-data
            printf '[nvmf]\ndiscovery = "closed"\n' > "$work/closed.toml"
            stop_server
            "$NVMUX_BIN" serve --data-dir "$dir" --config "$work/closed.toml" >> "$work/server.log" 2>&1 &
            SERVER_PID=$!
            wait_for_socket "$dir/nvmux.sock"
        }
        BOOT_INITRD=$auth_initrd boot_watch nvmf-auth guest-nvmf-auth.sh TARGET_IP=10.0.2.2 "PORT=$aport" \
            "NQN=$anqn" "HOSTNQN=$ahost" "HOSTID=$ahostid" "STRANGER=$stranger" "STRANGER_ID=$strangerid" \
            "SECRET=$secret" "CTRL_SECRET=$ctrl_secret" "WRONG_SECRET=$wrong"
        echo "== host actions: $ACTIONS"
        # What the daemon saw: each kind of line once (hash and DH group of the successes).
        sed 's/\x1b\[[0-9;]*m//g' "$work/server.log" |
            grep -oE 'DH-HMAC-CHAP (failed: .*|authentication succeeded.*(hash="?[a-z0-9]+"? dhgroup="?[a-z0-9]+"? bidirectional=[a-z]+))' |
            sed 's/ peer=[^ ]*//; s/ host=[^ ]*//; s/ qid=[0-9]*//' | sort | uniq -c || true
        if ! grep -q 'DH-HMAC-CHAP failed' "$work/server.log"; then
            fail nvmf-auth "the daemon log does not show the refused secret"
        elif ((rc == 0)) && [[ $ACTIONS == "CLOSE:ok " ]]; then
            pass nvmf-auth
        else
            fail nvmf-auth "boot status $rc, host actions '$ACTIONS', log $work/nvmf-auth.log"
        fi
    fi
fi

# h. dm-crypt (nvmux only): nvmux's encrypted layouts against the guest kernel's dm-crypt.
if ! want dm-crypt; then
    echo "SKIP dm-crypt (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP dm-crypt (nvmux only)"
elif ! command -v cryptsetup >/dev/null; then
    fail dm-crypt "cryptsetup not found on the host, so not in the guest image (apt-get install cryptsetup-bin)"
else
    cdir=$sockdir/crypt-data
    mkdir -p "$cdir"
    (umask 077 && head -c 32 /dev/urandom > "$work/kek")
    "$NVMUX_BIN" serve --data-dir "$cdir" --kek-file "$work/kek" >> "$work/crypt-server.log" 2>&1 &
    cpid=$!
    capi=$cdir/nvmux.sock
    csetup() {
        local i
        for ((i = 0; i < 300; i++)); do [[ -S $capi ]] && break; sleep 0.1; done
        # name MiB block-size extra-options...
        while read -r n mib bs extra; do
            rm -f "$work/crypt-$n.img"
            # shellcheck disable=SC2086
            "$NVMUX_BIN" --api "$capi" disk create "c$n" --backend file --path "$work/crypt-$n.img"                 --size "${mib}M" --block-size "$bs" --encrypt $extra &&
            "$NVMUX_BIN" --api "$capi" export add "c$n" --socket "$sockdir/crypt-$n.sock" --queues 1 &&
            python3 "$repo/tests/interop/xts_decrypt.py" "$cdir" "c$n" "$work/kek" "$work/crypt-$n.img"                 0 4096 /dev/null --key-out "$work/crypt-$n.key" || return 1
        done <<< "512 16 512
4k 20 4096 --sector-size 4096
4kl 24 4096 --sector-size 4096 --iv-large-sectors"
    }
    if ! csetup > "$work/dm-crypt-setup.out" 2>&1; then
        cat "$work/dm-crypt-setup.out"
        fail dm-crypt "could not create the encrypted disks (log $work/crypt-server.log)"
    else
        rc=0
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-dm-crypt.sh" --log "$work/dm-crypt.log"             --vhost-sock "$sockdir/crypt-512.sock" --vhost-sock "$sockdir/crypt-4k.sock"             --vhost-sock "$sockdir/crypt-4kl.sock"             --raw-disk "$work/crypt-512.img:raw512" --raw-disk "$work/crypt-4k.img:raw4k"             --raw-disk "$work/crypt-4kl.img:raw4kl"             --env "KEY512=$(cat "$work/crypt-512.key")" --env "KEY4K=$(cat "$work/crypt-4k.key")"             --env "KEY4KL=$(cat "$work/crypt-4kl.key")"             --smp "$smp" --timeout "$boot_timeout" > "$work/dm-crypt.out" 2>&1 || rc=$?
        cat "$work/dm-crypt.out"
        grep '^test: ' "$work/dm-crypt.log" || true
        if ((rc == 0)); then pass dm-crypt; else fail dm-crypt "boot status $rc, log $work/dm-crypt.log"; fi
    fi
    rm -f "$work"/crypt-*.key "$work/kek"
    kill -TERM "$cpid" 2>/dev/null || true
    wait "$cpid" 2>/dev/null || true
fi

# k. kill9-inflight / kill9-no-inflight (nvmux only): vhost-user inflight tracking
#    (INFLIGHT_SHMFD). A second daemon (its own data directory) serves a 64 MiB file
#    disk on 2 queues with the test fault vhost-complete-delay (every completion held
#    0-30 ms, so requests complete out of order and are in flight whenever the daemon
#    dies). The guest (QEMU 7.2, chardev reconnect=1) runs fio randwrite QD16
#    --verify=crc32c for 60 s (tests/vm/guest-kill9.sh); the host kills the daemon with
#    SIGKILL 3 times (10, 25 and 40 s in) and restarts it at once.
#    kill9-inflight passes when fio reports no error, the verify passes, the guest's
#    dmesg has no I/O error, and the daemon resubmitted in-flight requests after the
#    restarts (its log says so).
#    kill9-no-inflight is the negative control: the same load with the fault
#    vhost-no-inflight (INFLIGHT_SHMFD not offered, so QEMU restarts each ring at its
#    used index). It passes when the guest FAILS: fio hangs (a request is never
#    completed; the guest gives up GRACE s after the runtime), or a verify or I/O error.
kill9_wait_api() {   # API PID
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -S $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
# kill9_run NAME FAULTS: sets K9_RC (boot status), K9_KILLS, K9_ERR.
kill9_run() {
    local name=$1 faults=$2 dir=$sockdir/k9-$1 ksock=$sockdir/$1.sock
    local api=$dir/nvmux.sock kpid bpid t0= el
    K9_RC=2 K9_KILLS=0 K9_ERR=
    rm -rf "$dir"
    mkdir -p "$dir"
    : > "$work/$name-server.log"
    dd if=/dev/zero of="$work/$name.img" bs=1M count=64 status=none
    NVMUX_TEST_FAULTS=$faults "$NVMUX_BIN" serve --data-dir "$dir" >> "$work/$name-server.log" 2>&1 &
    kpid=$!
    if ! { kill9_wait_api "$api" "$kpid" &&
           "$NVMUX_BIN" --api "$api" disk create "$name" --backend file --path "$work/$name.img" --size 64M &&
           "$NVMUX_BIN" --api "$api" export add "$name" --socket "$ksock" --queues 2; } > "$work/$name-setup.out" 2>&1; then
        cat "$work/$name-setup.out"
        K9_ERR="daemon setup failed (log $work/$name-server.log)"
        kill -KILL "$kpid" 2>/dev/null || true
        wait "$kpid" 2>/dev/null || true
        return
    fi
    "$here/boot.sh" --initrd "$initrd" --script "$here/guest-kill9.sh" --log "$work/$name.log" \
        --vhost-sock "$ksock" --queues 2 --reconnect 1 --env RUNTIME=60 --env GRACE=60 \
        --smp 2 --timeout "$boot_timeout" > "$work/$name.out" 2>&1 &
    bpid=$!
    while kill -0 "$bpid" 2>/dev/null; do
        if [[ -z $t0 ]]; then
            grep -q '^NVMUX-READY-KILL9' "$work/$name.log" 2>/dev/null && t0=$(date +%s)
            sleep 0.2
            continue
        fi
        el=$(($(date +%s) - t0))
        if ((K9_KILLS < 3 && el >= 10 + 15 * K9_KILLS)); then
            kill -KILL "$kpid" 2>/dev/null || true
            wait "$kpid" 2>/dev/null || true
            NVMUX_TEST_FAULTS=$faults "$NVMUX_BIN" serve --data-dir "$dir" >> "$work/$name-server.log" 2>&1 &
            kpid=$!
            if ! kill9_wait_api "$api" "$kpid"; then
                K9_ERR="restart $((K9_KILLS + 1)) failed"
                break
            fi
            K9_KILLS=$((K9_KILLS + 1))
            echo "== host: $name: kill -9 and restart $K9_KILLS at ${el}s (new pid $kpid)"
        fi
        sleep 0.5
    done
    K9_RC=0
    wait "$bpid" || K9_RC=$?
    cat "$work/$name.out"
    grep -a '^test: ' "$work/$name.log" || true
    kill -TERM "$kpid" 2>/dev/null || true
    wait "$kpid" 2>/dev/null || true
    rm -f "$work/$name.img"
}

if ! want kill9-inflight; then
    echo "SKIP kill9-inflight (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP kill9-inflight (nvmux only)"
else
    kill9_run kill9-inflight "vhost-complete-delay:kill9-inflight.sock"
    # (tracing colours its fields: strip the escapes first)
    sed 's/\x1b\[[0-9;]*m//g' "$work/kill9-inflight-server.log" > "$work/kill9-inflight-server.txt"
    resub=$(grep -c 'resubmitting requests that were in flight' "$work/kill9-inflight-server.txt" || true)
    nreq=$(grep -o 'resubmit=[0-9]*' "$work/kill9-inflight-server.txt" | awk -F= '{ s += $2 } END { print s + 0 }')
    echo "== host: kill9-inflight: $K9_KILLS kills; $resub queue restarts resubmitted $nreq in-flight requests in all"
    if ((K9_RC == 0 && K9_KILLS == 3 && resub >= 1)) && [[ -z $K9_ERR ]]; then
        pass kill9-inflight
    else
        fail kill9-inflight "boot status $K9_RC, kills $K9_KILLS, resubmitting restarts $resub${K9_ERR:+, $K9_ERR}, log $work/kill9-inflight.log"
    fi
fi

if ! want kill9-no-inflight; then
    echo "SKIP kill9-no-inflight (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP kill9-no-inflight (nvmux only)"
else
    n=kill9-no-inflight
    kill9_run "$n" "vhost-complete-delay:$n.sock,vhost-no-inflight:$n.sock"
    how=$(grep -a -m1 -oE 'test: fio hung.*|verify: bad.*|test: I/O errors.*|test: fio failed.*' "$work/$n.log" || true)
    [[ -z $how && $K9_RC == 2 ]] && how="boot timed out (guest hung)"
    tracked=$(grep -c 'inflight region' "$work/$n-server.log" || true)
    echo "== host: $n (negative control): $K9_KILLS kills, boot status $K9_RC: ${how:-no failure seen}"
    if ((K9_KILLS == 3 && K9_RC != 0 && tracked == 0)) && [[ -n $how && -z $K9_ERR ]]; then
        pass "$n"
    elif ((K9_RC == 0)); then
        fail "$n" "the guest passed without inflight tracking: the test cannot tell the difference"
    else
        fail "$n" "boot status $K9_RC, kills $K9_KILLS, inflight lines $tracked${K9_ERR:+, $K9_ERR}, log $work/$n.log"
    fi
fi

# m. migrate, migrate-qemu11 (nvmux only): live migration on one host over a migration
#    pair of exports of one disk, back and forth twice, while the guest runs fio --verify
#    (tests/vm/migrate.sh). migrate-qemu11 runs QEMU 11 from the Debian sid chroot that
#    scripts/sid-qemu.sh builds once (cached in $NVMUX_SID_ROOT, default
#    /var/cache/nvmux/sid-qemu).
for mscen in migrate migrate-qemu11; do
    if ! want "$mscen"; then
        echo "SKIP $mscen (--only)"
    elif [[ $server != nvmux ]]; then
        echo "SKIP $mscen (nvmux only)"
    elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
        fail "$mscen" "server is not running"
    else
        margs=()
        if [[ $mscen == migrate-qemu11 ]]; then
            sid_root=${NVMUX_SID_ROOT:-/var/cache/nvmux/sid-qemu}
            if ! "$repo/scripts/sid-qemu.sh" "$sid_root" > "$work/sid-qemu.out" 2>&1; then
                cat "$work/sid-qemu.out"
                fail "$mscen" "no QEMU 11 chroot (scripts/sid-qemu.sh)"
                continue
            fi
            margs=(--qemu-root "$sid_root")
        fi
        rc=0
        "$here/migrate.sh" --nvmux-bin "$NVMUX_BIN" --api "$sockdir/nvmux-data/nvmux.sock" \
            --initrd "$initrd" --work "$work" --sockdir "$sockdir" --name "${mscen//-/}" \
            --smp "$smp" --timeout "$boot_timeout" "${margs[@]}" > "$work/$mscen.out" 2>&1 || rc=$?
        cat "$work/$mscen.out"
        if ((rc == 0)); then pass "$mscen"; else fail "$mscen" "see $work/$mscen.out"; fi
    fi
done


# v. vfio-user (nvmux only): QEMU 11 from the sid chroot with -device vfio-user-pci on
#    the socket of nvmux-vfiouser-probe (tests/vm/vfio-user.sh). No daemon export yet: the
#    probe is the crate's test server.
if ! want vfio-user; then
    echo "SKIP vfio-user (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP vfio-user (nvmux only)"
else
    probe=${NVMUX_VFIOUSER_PROBE:-$(dirname "$NVMUX_BIN")/nvmux-vfiouser-probe}
    sid_root=${NVMUX_SID_ROOT:-/var/cache/nvmux/sid-qemu}
    if [[ ! -x $probe ]]; then
        fail vfio-user "no $probe (cargo build --release -p nvmux-vfiouser)"
    elif ! "$repo/scripts/sid-qemu.sh" "$sid_root" > "$work/sid-qemu.out" 2>&1; then
        cat "$work/sid-qemu.out"
        fail vfio-user "no QEMU 11 chroot (scripts/sid-qemu.sh)"
    else
        rc=0
        "$here/vfio-user.sh" --probe-bin "$probe" --initrd "$initrd" --work "$work/vfio-user" \
            --qemu-root "$sid_root" --timeout "$boot_timeout" > "$work/vfio-user.out" 2>&1 || rc=$?
        cat "$work/vfio-user.out"
        if ((rc == 0)); then pass vfio-user; else fail vfio-user "see $work/vfio-user.out"; fi
    fi
fi

# w. vfio-user-nvme (nvmux only): the daemon's vfio-user export (a PCI NVMe controller)
#    attached by QEMU 11 from the sid chroot to the Debian 12 guest's nvme driver: nvme-cli
#    identity, >= 2 I/O queues, fio --verify QD32 x 2 jobs, blkdiscard, a resize through the
#    CLI seen by the guest, poweroff and a second VM on the same socket reading the first
#    one's data (tests/vm/vfio-user-nvme.sh).
if ! want vfio-user-nvme; then
    echo "SKIP vfio-user-nvme (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP vfio-user-nvme (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail vfio-user-nvme "server is not running"
else
    sid_root=${NVMUX_SID_ROOT:-/var/cache/nvmux/sid-qemu}
    if ! "$repo/scripts/sid-qemu.sh" "$sid_root" > "$work/sid-qemu.out" 2>&1; then
        cat "$work/sid-qemu.out"
        fail vfio-user-nvme "no QEMU 11 chroot (scripts/sid-qemu.sh)"
    else
        rc=0
        "$here/vfio-user-nvme.sh" --nvmux-bin "$NVMUX_BIN" --api "$sockdir/nvmux-data/nvmux.sock" \
            --server-pid "$SERVER_PID" --server-log "$work/server.log" --initrd "$initrd" \
            --work "$work" --sockdir "$sockdir" --qemu-root "$sid_root" --smp "$smp" \
            --timeout "$boot_timeout" > "$work/vfio-user-nvme.out" 2>&1 || rc=$?
        cat "$work/vfio-user-nvme.out"
        if ((rc == 0)); then pass vfio-user-nvme; else fail vfio-user-nvme "see $work/vfio-user-nvme.out"; fi
    fi
fi

# upgrade: `nvmux upgrade` three times under a guest's fio write+verify.
alive_pid() {   # PID: runs and is not a zombie
    [[ -r /proc/$1/stat ]] && ! awk '{ sub(/.*\) /, ""); exit ($1 == "Z" ? 0 : 1) }' "/proc/$1/stat"
}
if ! want upgrade; then
    echo "SKIP upgrade (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP upgrade (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail upgrade "server is not running"
else
    api=$sockdir/nvmux-data/nvmux.sock
    bins=("$sockdir/nvmux-next-a" "$sockdir/nvmux-next-b" "$sockdir/nvmux-next-a")
    cp "$NVMUX_BIN" "${bins[0]}"
    cp "$NVMUX_BIN" "${bins[1]}"
    log_lines_before=$(wc -l < "$work/server.log")
    rc=0
    "$here/boot.sh" --initrd "$initrd" --script "$here/guest-upgrade.sh" --log "$work/upgrade.log" \
        --vhost-sock "$sock" --queues "$queues" --reconnect 1 \
        --env "RUNTIME=${UPGRADE_RUNTIME:-60}" \
        --smp "$smp" --timeout "$boot_timeout" > "$work/upgrade.out" 2>&1 &
    bpid=$!
    for ((i = 0; i < 1200; i++)); do
        grep -q '^test: round 1 start' "$work/upgrade.log" 2>/dev/null && break
        kill -0 "$bpid" 2>/dev/null || break
        sleep 0.1
    done
    why=
    pids=("$SERVER_PID")
    for n in 0 1 2; do
        sleep 10
        kill -0 "$bpid" 2>/dev/null || { why="the guest finished before upgrade $((n + 1))"; break; }
        old=$SERVER_PID
        if ! out=$("$NVMUX_BIN" --api "$api" --json upgrade --binary "${bins[$n]}" --timeout 30s 2>&1); then
            why="upgrade $((n + 1)) failed: $out"
            break
        fi
        new=$(printf '%s' "$out" | json_field pid)
        pause=$(printf '%s' "$out" | json_field pause_ms)
        sessions=$(printf '%s' "$out" | json_field sessions)
        echo "== upgrade $((n + 1)): pid $old -> $new (${bins[$n]}), $sessions vhost-user session(s), pause ${pause} ms"
        for ((i = 0; i < 100; i++)); do alive_pid "$old" || break; sleep 0.1; done
        if alive_pid "$old"; then why="the old daemon (pid $old) still runs after upgrade $((n + 1))"; break; fi
        wait "$old" 2>/dev/null || true
        SERVER_PID=$new
        pids+=("$new")
        ((sessions == 1)) || { why="upgrade $((n + 1)) handed over $sessions sessions, not 1"; break; }
    done
    wait "$bpid" || rc=$?
    cat "$work/upgrade.out"
    grep '^test: ' "$work/upgrade.log" | tail -n 3 || true
    qemu_vhost=$(grep -v '^# ' "$work/upgrade.log" | grep -iE 'vhost|disconnect|reconnect' || true)
    # The daemons' view of the guest's connection, in order: connected once, resumed by
    # each new process, and (at the guest's poweroff, after the last upgrade) closed.
    seq=$(tail -n +"$((log_lines_before + 1))" "$work/server.log" |
        grep -oE 'vhost-user client (connected|disconnected|resumed after a takeover)' |
        awk '{ print $3 }' | tr '\n' ' ')
    if [[ -n $why ]]; then
        fail upgrade "$why"
    elif ((rc != 0)); then
        fail upgrade "boot status $rc, log $work/upgrade.log"
    elif [[ -n $qemu_vhost ]]; then
        fail upgrade "QEMU logged: $(printf '%s' "$qemu_vhost" | head -n 3 | tr '\n' ' ')"
    elif [[ $seq != "connected resumed resumed resumed " && $seq != "connected resumed resumed resumed disconnected " ]]; then
        fail upgrade "the daemons saw the guest's connection go: $seq(want connected, resumed x3, then at most the poweroff's disconnect)"
    else
        echo "== 3 upgrades (pids ${pids[*]}), the guest's vhost-user connection never closed"
        pass upgrade
    fi
fi

# --- remote backends and mirrors (issue 20) ---------------------------------------------
# Helpers shared by nvmf-backend, mirror-net and disk-move.

# json_path FILE EXPR: a value from a JSON file; EXPR is Python on the parsed document d,
# where find(x, KEY) is the first value of KEY anywhere in x (depth first), so that the
# checks do not depend on where the API nests "remote" (prints nothing when it fails).
json_path() {
    python3 -c 'import json, sys
def find(x, key):
    if isinstance(x, dict):
        if key in x:
            return x[key]
        x = list(x.values())
    if isinstance(x, list):
        for v in x:
            r = find(v, key)
            if r is not None:
                return r
    return None
try:
    d = json.load(open(sys.argv[1]))
    print(eval(sys.argv[2]))
except Exception:
    pass' "$1" "$2"
}

# side_daemon DIR LOG [SERVE OPTION...]: start a daemon of its own on DIR (its API socket
# DIR/nvmux.sock); sets SIDE_PID.
side_daemon() {
    local dir=$1 log=$2; shift 2
    mkdir -p "$dir"
    "$NVMUX_BIN" serve --data-dir "$dir" "$@" >> "$log" 2>&1 &
    SIDE_PID=$!
    kill9_wait_api "$dir/nvmux.sock" "$SIDE_PID"
}

# stop_pid PID: SIGTERM, then SIGKILL after 10 s; returns the exit status.
stop_pid() {
    local i rc=0
    [[ -n $1 ]] || return 0
    kill -TERM "$1" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || rc=$?
    return "$rc"
}

# remote_target API NAME IMG NQN PORT: a 64 MiB file disk NAME on IMG served as namespace
# 1 of subsystem NQN on 127.0.0.1:PORT to any host (the remote end of a mirror leg or a
# move), checked with the bench crate's initiator (nvmf-probe, read-only).
remote_target() {
    rm -f "$3"
    "$NVMUX_BIN" --api "$1" disk create "$2" --backend file --path "$3" --size 64M &&
    "$NVMUX_BIN" --api "$1" subsystem create "$4" --listen "127.0.0.1:$5" --allow-any-host &&
    "$NVMUX_BIN" --api "$1" subsystem add-ns "$4" "$2" --nsid 1 &&
    timeout 30 "$NVMUX_BIN" bench nvmf-probe --remote "$4@127.0.0.1:$5" --read-only
}

# target_cmd CTLPORT LOG COMMAND...: send one command to guest-nvmet-target.sh and wait
# (up to 20 s, resending every 3 s while the guest's listener is not up) for its
# acknowledgement on the console.
target_cmd() {
    local port=$1 log=$2; shift 2
    local cmd="$*" before failed n i try
    # (QEMU's console lines end in CR until boot.sh cleans the log up)
    acks() { tr -d '\r' < "$log" | grep -c -x -F "NVMUX-CMD-$1 $cmd" || true; }
    before=$(acks DONE) failed=$(acks FAILED)
    for ((try = 0; try < 7; try++)); do
        (printf '%s\n' "$cmd" > "/dev/tcp/127.0.0.1/$port") 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            n=$(acks DONE)
            ((n > before)) && return 0
            (($(acks FAILED) > failed)) && return 1
            sleep 0.1
        done
    done
    return 1
}

# wait_marker LOG MARKER PID SECS: wait for a console line while the boot PID runs.
wait_marker() {
    local i
    for ((i = 0; i < $4 * 5; i++)); do
        grep -q "^$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}

# n. nvmf-backend (nvmux only): a disk whose backend is a remote NVMe/TCP namespace,
#    served by an independent target: the guest kernel's nvmet-tcp (tests/vm/guest-nvmet-
#    target.sh: a 64 MiB RAM-disk namespace behind two ports, port 2 ANA non-optimized),
#    reached through QEMU hostfwd ports P1 (-> 4420) and P2 (-> 4421); a third forwarded
#    port carries the host's commands to the target guest.
#    1. `nvmux bench nvmf-probe` checks the target on both ports (identify, ANA log, one
#       block written and read back on P1) with the bench crate's own initiator;
#    2. `nvmux disk create r --backend nvmf --remote NQN@127.0.0.1:P1,127.0.0.1:P2`, exported
#       over vhost-user; `nvmux bench verify` (5 s) passes;
#    3. `nvmux bench verify` for 20 s while, 5 s in, the target guest unlinks the
#       subsystem from port 1: the run must see 0 errors and 0 mismatches; prints
#       `disk show --json`'s failovers, last_failover_ms and the active path, and the
#       verify tool's longest stall (the failover as the client sees it); asserts
#       failovers >= 1, the active path is P2 and nvmf-probe on P1 now fails (the fault
#       really happened); a --verify-only re-read against the run's map passes.
if ! want nvmf-backend; then
    echo "SKIP nvmf-backend (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP nvmf-backend (nvmux only)"
elif [[ -z $SERVER_PID ]] || ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail nvmf-backend "server is not running"
else
    api=$sockdir/nvmux-data/nvmux.sock rsock=$sockdir/nvmf-backend.sock
    tnqn=nqn.2026-12.io.nvmux:guest-target
    p1=$(free_port) p2=$(free_port) pc=$(free_port)
    tlog=$work/nvmf-backend-target.log
    "$here/boot.sh" --initrd "$initrd" --script "$here/guest-nvmet-target.sh" --log "$tlog" \
        --hostfwd "$p1:4420" --hostfwd "$p2:4421" --hostfwd "$pc:5000" \
        --env "NQN=$tnqn" --env SIZE_MIB=64 --env SERIAL=NVMUXGUESTTGT \
        --smp 1 --timeout "$boot_timeout" > "$work/nvmf-backend-target.out" 2>&1 &
    tpid=$!
    why=
    if ! wait_marker "$tlog" NVMUX-READY-TARGET "$tpid" 120; then
        why="the target guest did not come up (log $tlog)"
    fi
    grep '^test: ' "$tlog" || true
    # 1. The target, seen by the bench crate's initiator on both ports.
    if [[ -z $why ]]; then
        for p in "$p1" "$p2"; do
            ro=; [[ $p == "$p2" ]] && ro=--read-only
            if ! timeout 60 "$NVMUX_BIN" bench nvmf-probe --remote "$tnqn@127.0.0.1:$p" $ro > "$work/nvmf-backend-probe-$p.out" 2>&1; then
                cat "$work/nvmf-backend-probe-$p.out"
                why="nvmf-probe of the target on port $p failed"
                break
            fi
            sed "s/^/   [port $p] /" "$work/nvmf-backend-probe-$p.out"
        done
    fi
    # 2. The disk on the remote namespace, and a first verify run.
    if [[ -z $why ]]; then
        if ! { "$NVMUX_BIN" --api "$api" disk create r --backend nvmf \
                   --remote "$tnqn@127.0.0.1:$p1,127.0.0.1:$p2" &&
               "$NVMUX_BIN" --api "$api" export add r --socket "$rsock" --queues 1; } > "$work/nvmf-backend-setup.out" 2>&1; then
            cat "$work/nvmf-backend-setup.out"
            why="could not create the nvmf disk (nvmux disk create --backend nvmf)"
        elif ! timeout 120 "$NVMUX_BIN" bench verify --socket "$rsock" --seconds 5 --seed 11 \
                   > "$work/nvmf-backend-verify1.out" 2>&1; then
            cat "$work/nvmf-backend-verify1.out"
            why="the first verify run failed"
        else
            tail -n1 "$work/nvmf-backend-verify1.out"
        fi
    fi
    # 3. Port 1 goes away 5 s into a 20 s verify run. (The same seed as the first run: a
    #    block only that run wrote is then still a well-formed block for the re-read.)
    if [[ -z $why ]]; then
        timeout 120 "$NVMUX_BIN" bench verify --socket "$rsock" --seconds 20 --seed 11 \
            --map "$work/nvmf-backend.map" > "$work/nvmf-backend-verify2.out" 2>&1 &
        vpid=$!
        sleep 5
        unlinked=yes
        target_cmd "$pc" "$tlog" unlink 1 || unlinked=no
        echo "== host: target guest: unlink port 1: $unlinked"
        vrc=0
        wait "$vpid" || vrc=$?
        vline=$(grep '^verify: [0-9]' "$work/nvmf-backend-verify2.out" | tail -n1)
        echo "   $vline"
        "$NVMUX_BIN" --api "$api" --json disk show r > "$work/nvmf-backend-show.json" 2> "$work/nvmf-backend-show.err" || true
        rem='find(d, "remote")'
        failovers=$(json_path "$work/nvmf-backend-show.json" "$rem[\"failovers\"]")
        fo_ms=$(json_path "$work/nvmf-backend-show.json" "$rem[\"last_failover_ms\"]")
        active=$(json_path "$work/nvmf-backend-show.json" "[p[\"addr\"] for p in $rem[\"paths\"] if p.get(\"active\")][0]")
        paths=$(json_path "$work/nvmf-backend-show.json" "\"; \".join(f'{p[\"addr\"]} {p.get(\"state\")} ana={p.get(\"ana\")}{\" active\" if p.get(\"active\") else \"\"}' for p in $rem[\"paths\"])")
        stall=$(sed -n 's/.*longest stall \([0-9]*\) ms.*/\1/p' <<< "$vline")
        echo "== failover: disk show: failovers ${failovers:-?}, last_failover_ms ${fo_ms:-?}, active path ${active:-?} (paths: ${paths:-?}); the client's longest stall ${stall:-?} ms"
        if [[ $unlinked != yes ]]; then
            why="the target guest did not unlink port 1"
        elif ((vrc != 0)) || [[ $vline != *" 0 errors, 0 mismatches,"* ]]; then
            cat "$work/nvmf-backend-verify2.out"
            why="the verify run across the path failure failed (status $vrc)"
        elif ! [[ $failovers =~ ^[0-9]+$ ]] || ((failovers < 1)); then
            cat "$work/nvmf-backend-show.json" "$work/nvmf-backend-show.err"
            why="disk show reports failovers '${failovers:-none}', want >= 1"
        elif [[ $active != "127.0.0.1:$p2" ]]; then
            why="the active path is '${active:-none}', want 127.0.0.1:$p2"
        elif timeout 30 "$NVMUX_BIN" bench nvmf-probe --remote "$tnqn@127.0.0.1:$p1" --read-only \
                 > "$work/nvmf-backend-probe-after.out" 2>&1; then
            why="port 1 still serves the subsystem after the unlink (the fault was not injected)"
        elif ! timeout 120 "$NVMUX_BIN" bench verify --socket "$rsock" --verify-only --seed 11 \
                   --map "$work/nvmf-backend.map" > "$work/nvmf-backend-verify3.out" 2>&1; then
            cat "$work/nvmf-backend-verify3.out"
            why="the re-read after the failover failed"
        else
            echo "   re-read: $(tail -n1 "$work/nvmf-backend-verify3.out")"
        fi
    fi
    "$NVMUX_BIN" --api "$api" export remove r > /dev/null 2>&1 || true
    "$NVMUX_BIN" --api "$api" disk delete r > /dev/null 2>&1 || true
    if kill -0 "$tpid" 2>/dev/null; then
        target_cmd "$pc" "$tlog" stop || kill -TERM "$tpid" 2>/dev/null || true
    fi
    trc=0
    wait "$tpid" || trc=$?
    if [[ -z $why ]] && ((trc != 0)); then
        cat "$work/nvmf-backend-target.out"
        why="the target guest failed (boot status $trc, log $tlog)"
    fi
    if [[ -z $why ]]; then pass nvmf-backend; else fail nvmf-backend "$why"; fi
fi

# o. mirror-net (nvmux only): a mirror leg on a remote nvmux over NVMe/TCP that dies and
#    comes back under load. A remote daemon (its own data directory) serves a 64 MiB file
#    disk as namespace 1 of a subsystem; a local daemon (its own data directory) has a
#    64 MiB file disk, `disk mirror add D --remote NQN@127.0.0.1:P --wait`, exported over
#    vhost-user (2 queues) to a guest running fio randwrite QD16 --verify=crc32c for 60 s
#    (tests/vm/guest-kill9.sh). 15 s in, the remote daemon is killed with SIGKILL; the leg
#    must become faulted (mirror status) while the guest sees no error; 5 s later the
#    remote daemon restarts on the same data directory (its state brings the subsystem
#    back); the leg must resync and be healthy again with 0 < resynced_regions < regions
#    (printed). fio must pass; then both daemons stop (SIGTERM, the local one first) and
#    the two disk files must be equal byte for byte (cmp).
if ! want mirror-net; then
    echo "SKIP mirror-net (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP mirror-net (nvmux only)"
else
    ldir=$sockdir/mirror-local rdir=$sockdir/mirror-remote
    lapi=$ldir/nvmux.sock rapi=$rdir/nvmux.sock msock=$sockdir/mirror.sock
    mnqn=nqn.2026-12.io.nvmux:mirror-leg
    mport=$(free_port)
    rm -rf "$ldir" "$rdir"
    : > "$work/mirror-local.log"; : > "$work/mirror-remote.log"
    rm -f "$work/mirror-primary.img"
    lpid= rpid= why=
    status_json() { "$NVMUX_BIN" --api "$lapi" --json disk mirror status mir > "$work/mirror-status.json" 2>/dev/null; }
    leg_field() { json_path "$work/mirror-status.json" "[l for l in d[\"legs\"] if l[\"name\"] == \"leg1\"][0][\"$1\"]"; }
    if ! { side_daemon "$rdir" "$work/mirror-remote.log" && rpid=$SIDE_PID &&
           remote_target "$rapi" leg "$work/mirror-leg.img" "$mnqn" "$mport" &&
           side_daemon "$ldir" "$work/mirror-local.log" && lpid=$SIDE_PID &&
           "$NVMUX_BIN" --api "$lapi" disk create mir --backend file --path "$work/mirror-primary.img" --size 64M &&
           timeout 120 "$NVMUX_BIN" --api "$lapi" disk mirror add mir --remote "$mnqn@127.0.0.1:$mport" --name leg1 --wait &&
           "$NVMUX_BIN" --api "$lapi" export add mir --socket "$msock" --queues 2; } > "$work/mirror-setup.out" 2>&1; then
        cat "$work/mirror-setup.out"
        why="setup failed (remote pid ${rpid:-none}, local pid ${lpid:-none}; logs $work/mirror-*.log)"
    else
        status_json && echo "== mirror added: legs $(json_path "$work/mirror-status.json" "[(l[\"name\"], l[\"state\"]) for l in d[\"legs\"]]")"
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-kill9.sh" --log "$work/mirror-net.log" \
            --vhost-sock "$msock" --queues 2 --env RUNTIME=60 --env GRACE=60 \
            --smp 2 --timeout "$boot_timeout" > "$work/mirror-net.out" 2>&1 &
        bpid=$!
        t0= killed= faulted= restarted= healthy=
        while kill -0 "$bpid" 2>/dev/null; do
            if [[ -z $t0 ]]; then
                grep -q '^NVMUX-READY-KILL9' "$work/mirror-net.log" 2>/dev/null && t0=$(date +%s)
                sleep 0.2
                continue
            fi
            el=$(($(date +%s) - t0))
            if [[ -z $killed ]] && ((el >= 15)); then
                kill -KILL "$rpid" 2>/dev/null || true
                wait "$rpid" 2>/dev/null || true
                killed=$el
                echo "== host: kill -9 of the remote daemon at ${el}s"
            elif [[ -n $killed && -z $faulted ]]; then
                status_json && [[ $(leg_field state) == faulted ]] && { faulted=$el; echo "== host: leg1 faulted at ${el}s: $(leg_field errors) errors"; }
                ((el - killed > 20)) && [[ -z $faulted ]] && { why="leg1 not faulted 20 s after the kill ($(leg_field state))"; break; }
            elif [[ -n $faulted && -z $restarted ]] && ((el >= faulted + 5)); then
                if side_daemon "$rdir" "$work/mirror-remote.log"; then
                    rpid=$SIDE_PID restarted=$el
                    echo "== host: remote daemon restarted at ${el}s (pid $rpid)"
                else
                    why="the remote daemon did not restart"; break
                fi
            elif [[ -n $restarted && -z $healthy ]]; then
                if status_json && [[ $(leg_field state) == healthy ]]; then
                    healthy=$el
                    echo "== host: leg1 healthy again at ${el}s"
                fi
            fi
            sleep 0.5
        done
        rc=0
        wait "$bpid" || rc=$?
        cat "$work/mirror-net.out"
        grep -a '^test: ' "$work/mirror-net.log" || true
        # The resync may end after the guest: give it up to 60 s more.
        if [[ -z $why && -n $restarted && -z $healthy ]]; then
            for ((i = 0; i < 120; i++)); do
                status_json && [[ $(leg_field state) == healthy ]] && { healthy=late; break; }
                sleep 0.5
            done
        fi
        status_json || true
        regions=$(json_path "$work/mirror-status.json" 'd["regions"]')
        resynced=$(json_path "$work/mirror-status.json" 'd["resynced_regions"]')
        full=$(json_path "$work/mirror-status.json" 'd["full_copies"]')
        echo "== mirror status: regions ${regions:-?} of $(json_path "$work/mirror-status.json" 'd["region_size"]') bytes, resynced_regions ${resynced:-?}, dirty_regions $(json_path "$work/mirror-status.json" 'd["dirty_regions"]'), full_copies ${full:-?}; leg1 $(leg_field state)"
        if [[ -n $why ]]; then
            :
        elif ((rc != 0)); then
            why="the guest failed (boot status $rc, log $work/mirror-net.log)"
        elif [[ -z $killed || -z $faulted || -z $restarted ]]; then
            why="kill '${killed}', faulted '${faulted}', restarted '${restarted}': the sequence did not complete"
        elif [[ -z $healthy ]]; then
            why="leg1 did not become healthy again after the restart ($(leg_field state))"
        elif ! [[ $regions =~ ^[0-9]+$ && $resynced =~ ^[0-9]+$ ]] || ((resynced <= 0 || resynced >= regions)); then
            why="resynced_regions ${resynced:-?} of ${regions:-?}: want 0 < resynced < regions (a dirty-region resync, not a full copy)"
        fi
        # Stop the local daemon first (it flushes both legs), then the remote one.
        stop_pid "$lpid" || echo "== host: the local daemon exited with status $?"
        lpid=
        stop_pid "$rpid" || echo "== host: the remote daemon exited with status $?"
        rpid=
        if [[ -z $why ]]; then
            if cmp "$work/mirror-primary.img" "$work/mirror-leg.img"; then
                echo "== cmp: the primary and the remote leg are identical ($(stat -c %s "$work/mirror-primary.img") bytes)"
            else
                why="the primary and the remote leg differ"
            fi
        fi
    fi
    stop_pid "$lpid" || true
    stop_pid "$rpid" || true
    if [[ -z $why ]]; then pass mirror-net; else fail mirror-net "$why"; fi
fi

# p. disk-move (nvmux only): a live move of a disk's data to a remote nvmux namespace.
#    A local daemon (its own data directory) exports a 64 MiB file disk over vhost-user (2
#    queues); a remote daemon serves a 64 MiB file disk as namespace 1 of a subsystem. The
#    guest (tests/vm/guest-disk-move.sh) runs fio: random writes with crc32c verify on the
#    first 32 MiB for 40 s, and a rate-limited sequential write + verify of the second
#    32 MiB; 8 s in, `nvmux disk move D --to NQN@127.0.0.1:P` must complete (exit 0), and
#    `disk show` must then name the remote as the disk's backend; fio must pass. A second
#    boot reads the second 32 MiB back with fio --verify_only, now from the remote
#    namespace.
if ! want disk-move; then
    echo "SKIP disk-move (--only)"
elif [[ $server != nvmux ]]; then
    echo "SKIP disk-move (nvmux only)"
else
    ldir=$sockdir/move-local rdir=$sockdir/move-remote
    lapi=$ldir/nvmux.sock rapi=$rdir/nvmux.sock vsock2=$sockdir/move.sock
    vnqn=nqn.2026-12.io.nvmux:move-target
    vport=$(free_port)
    rm -rf "$ldir" "$rdir"
    : > "$work/move-local.log"; : > "$work/move-remote.log"
    rm -f "$work/move-src.img"
    lpid= rpid= why=
    if ! { side_daemon "$rdir" "$work/move-remote.log" && rpid=$SIDE_PID &&
           remote_target "$rapi" dst "$work/move-dst.img" "$vnqn" "$vport" &&
           side_daemon "$ldir" "$work/move-local.log" && lpid=$SIDE_PID &&
           "$NVMUX_BIN" --api "$lapi" disk create mv --backend file --path "$work/move-src.img" --size 64M &&
           "$NVMUX_BIN" --api "$lapi" export add mv --socket "$vsock2" --queues 2; } > "$work/move-setup.out" 2>&1; then
        cat "$work/move-setup.out"
        why="setup failed (logs $work/move-*.log)"
    else
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-disk-move.sh" --log "$work/disk-move.log" \
            --vhost-sock "$vsock2" --queues 2 --env RUNTIME=40 --env RATE=1m \
            --smp 2 --timeout "$boot_timeout" > "$work/disk-move.out" 2>&1 &
        bpid=$!
        moved=
        if wait_marker "$work/disk-move.log" NVMUX-READY-MOVE "$bpid" 120; then
            sleep 8
            mt0=$(date +%s.%N)
            mrc=0
            timeout 600 "$NVMUX_BIN" --api "$lapi" disk move mv --to "$vnqn@127.0.0.1:$vport" \
                > "$work/move-cmd.out" 2>&1 || mrc=$?
            mel=$(awk -v a="$mt0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
            # (the progress bar redraws with \r: show the last state)
            tr '\r' '\n' < "$work/move-cmd.out" | grep -v '^$' | tail -n 3 | sed 's/^/   move: /'
            echo "== host: nvmux disk move: exit status $mrc after ${mel}s"
            ((mrc == 0)) && moved=yes || why="disk move failed (exit status $mrc)"
        else
            why="the guest did not start fio (log $work/disk-move.log)"
        fi
        rc=0
        wait "$bpid" || rc=$?
        cat "$work/disk-move.out"
        grep -a '^test: ' "$work/disk-move.log" || true
        "$NVMUX_BIN" --api "$lapi" --json disk show mv > "$work/move-show.json" 2>&1 || true
        backend=$(json_path "$work/move-show.json" '(lambda b: b.get("type") if isinstance(b, dict) else b)(find(d, "backend"))')
        echo "== disk show mv: backend ${backend:-?}; remote paths $(json_path "$work/move-show.json" '[p["addr"] for p in find(d, "remote")["paths"]]')"
        if [[ -z $why ]] && ((rc != 0)); then
            why="the guest failed during the move (boot status $rc, log $work/disk-move.log)"
        elif [[ -z $why ]] && ! grep -q "127.0.0.1:$vport" "$work/move-show.json"; then
            cat "$work/move-show.json"
            why="disk show does not name the remote (127.0.0.1:$vport) after the move"
        elif [[ -z $why && $backend != *nvmf* ]]; then
            why="disk show: backend '${backend:-?}', want nvmf"
        fi
        if [[ -z $why ]]; then
            rc=0
            "$here/boot.sh" --initrd "$initrd" --script "$here/guest-disk-move.sh" --log "$work/disk-move-verify.log" \
                --vhost-sock "$vsock2" --queues 2 --env VERIFY_ONLY=1 --env RATE=1m \
                --smp 2 --timeout "$boot_timeout" > "$work/disk-move-verify.out" 2>&1 || rc=$?
            cat "$work/disk-move-verify.out"
            grep -a '^test: ' "$work/disk-move-verify.log" || true
            ((rc == 0)) || why="the verify_only boot after the move failed (boot status $rc, log $work/disk-move-verify.log)"
        fi
    fi
    stop_pid "$lpid" || true
    stop_pid "$rpid" || true
    if [[ -z $why ]]; then pass disk-move; else fail disk-move "$why"; fi
fi

# q. rbd, rbd-outage (nvmux only; skipped without Ceph: $CEPH_CONF unset). A Ceph RBD image
#    as a disk (tests/ceph/cluster.sh makes the test cluster; the Ceph CI stage exports
#    CEPH_CONF).
# rbd_fio NAME URI OFFSET [FIO OPTION...]: host-side fio over NBD (fio's nbd engine) with the
#    job parameters of guest-rbd.sh's region_fio (they must match for --verify_only).
rbd_fio() {
    local name=$1 uri=$2 off=$3; shift 3
    fio --name="$name" --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --offset="$off" \
        --size=32M --iodepth=16 --randrepeat=1 --verify=crc32c --verify_fatal=1 --eta=never \
        --verify_state_save=0 "$@"
}
if ! want rbd; then
    echo "SKIP rbd (--only)"
elif [[ -z ${CEPH_CONF:-} ]]; then
    echo "SKIP rbd (no Ceph: CEPH_CONF unset)"
elif [[ $server != nvmux ]]; then
    echo "SKIP rbd (nvmux only)"
else
    rdir=$sockdir/rbd-d rapi=$sockdir/rbd-d/nvmux.sock rsock=$sockdir/rbd.sock
    rimg=rbd/vm-$$ rnqn=nqn.2026-12.io.nvmux:rbd-vm
    rport=$(free_port) nport=$(free_port)
    nuri=nbd://127.0.0.1:$nport/r-nbd
    rm -rf "$rdir"
    : > "$work/rbd-server.log"
    rpid= why=
    if ! { side_daemon "$rdir" "$work/rbd-server.log" && rpid=$SIDE_PID &&
           "$NVMUX_BIN" --api "$rapi" disk create r --backend rbd --image "$rimg" --size 256M &&
           "$NVMUX_BIN" --api "$rapi" export add r --socket "$rsock" --queues 2 &&
           "$NVMUX_BIN" --api "$rapi" subsystem create "$rnqn" --listen "127.0.0.1:$rport" --allow-any-host &&
           "$NVMUX_BIN" --api "$rapi" subsystem add-ns "$rnqn" r --nsid 1 &&
           "$NVMUX_BIN" --api "$rapi" export add r --name r-nbd --type nbd --listen "127.0.0.1:$nport"; } > "$work/rbd-setup.out" 2>&1; then
        cat "$work/rbd-setup.out"
        why="setup failed (CEPH_CONF=$CEPH_CONF, log $work/rbd-server.log)"
    else
        "$NVMUX_BIN" --api "$rapi" --json disk show r > "$work/rbd-show.json" 2>&1 || true
        echo "== disk r: backend $(json_path "$work/rbd-show.json" 'find(d, "backend")')"
        # 1-2. the guest: region 1 over vhost-user, region 2 over NVMe/TCP
        rc=0
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-rbd.sh" --log "$work/rbd.log" \
            --vhost-sock "$rsock" --queues 2 --net --env TARGET_IP=10.0.2.2 --env "PORT=$rport" \
            --env "NQN=$rnqn" --env "HOSTNQN=$hostnqn" --env "HOSTID=$hostid" \
            --smp 2 --timeout "$boot_timeout" > "$work/rbd.out" 2>&1 || rc=$?
        cat "$work/rbd.out"
        grep -a '^test: ' "$work/rbd.log" || true
        ((rc == 0)) || why="the guest failed (boot status $rc, log $work/rbd.log)"
        # 3. region 3 over NBD from the host; then regions 1 and 2 read back over NBD
        if [[ -z $why ]]; then
            if rbd_fio region3 "$nuri" 128M --do_verify=1 > "$work/rbd-nbd3.out" 2>&1; then
                echo "== host: region 3: fio nbd engine randwrite 32 MiB QD16 + crc32c verify passed: $(grep -m1 -o 'write: IOPS=[^,]*' "$work/rbd-nbd3.out")"
            else
                cat "$work/rbd-nbd3.out"
                why="fio over NBD (region 3) failed"
            fi
        fi
        if [[ -z $why ]]; then
            for r in region1:0 region2:64M; do
                if rbd_fio "${r%%:*}" "$nuri" "${r#*:}" --verify_only > "$work/rbd-nbd-${r%%:*}.out" 2>&1; then
                    echo "== host: ${r%%:*} (written by the guest) verified over NBD: $(grep -m1 -o 'read: IOPS=[^,]*' "$work/rbd-nbd-${r%%:*}.out")"
                else
                    cat "$work/rbd-nbd-${r%%:*}.out"
                    why="${r%%:*}, written by the guest, fails verify over NBD"
                    break
                fi
            done
        fi
        # Negative control: verify_only where nothing was written must fail.
        if [[ -z $why ]]; then
            if rbd_fio region1 "$nuri" 192M --verify_only > "$work/rbd-nbd-control.out" 2>&1; then
                why="negative control: verify_only of a never written region passed"
            else
                echo "== host: negative control: $(grep -a -m1 -o 'verify: bad.*' "$work/rbd-nbd-control.out" | cut -c1-100)"
            fi
        fi
        # 4. the image, seen by Ceph's own tools
        if [[ -z $why ]]; then
            if rbd info "$rimg" > "$work/rbd-info.out" 2>&1 && grep -q 'size 256 MiB' "$work/rbd-info.out"; then
                echo "== host: rbd info $rimg: $(grep -m1 'size' "$work/rbd-info.out" | sed 's/^[[:space:]]*//')"
            else
                cat "$work/rbd-info.out"
                why="rbd info $rimg does not show a 256 MiB image"
            fi
        fi
    fi
    stop_pid "$rpid" || echo "== host: the rbd daemon exited with status $?"
    # nvmux never removes an RBD image: the test does.
    rbd rm --no-progress "$rimg" > /dev/null 2>&1 || true
    if [[ -z $why ]]; then pass rbd; else fail rbd "$why"; fi
fi

# rbd-outage: its own cluster (never the shared one's OSD).
if ! want rbd-outage; then
    echo "SKIP rbd-outage (--only)"
elif [[ -z ${CEPH_CONF:-} ]]; then
    echo "SKIP rbd-outage (no Ceph: CEPH_CONF unset)"
else
    cdir=${NVMUX_VM_CEPH_DIR:-/tmp/nvmux-ceph-vm} cport=${NVMUX_VM_CEPH_PORT:-6889}
    cluster() { "$repo/tests/ceph/cluster.sh" "$@" --dir "$cdir"; }
    odir=$sockdir/outage-d oapi=$sockdir/outage-d/nvmux.sock osock=$sockdir/outage.sock
    oimg=rbd/outage-$$
    rm -rf "$odir"
    : > "$work/rbd-outage-server.log"
    opid= why= stopped= started= t_stop0= t_stop1= t_start1=
    OUTAGE_CLUSTER=$cdir
    if ! cluster up --port "$cport" > "$work/rbd-outage-cluster.out" 2>&1; then
        cat "$work/rbd-outage-cluster.out"
        why="cluster.sh up --dir $cdir --port $cport failed"
    elif [[ $server == qsd ]] && ! {
             # the reference: QEMU's own librbd driver behind qemu-storage-daemon
             # (QSD in braces of its own: `A && B &` would background the whole list, and
             # $! would be a subshell whose death leaves qemu-storage-daemon running)
             CEPH_CONF=$cdir/ceph.conf rbd create --size 256M "$oimg" && {
                 qemu-storage-daemon \
                     --blockdev "driver=rbd,node-name=r,pool=${oimg%%/*},image=${oimg#*/},conf=$cdir/ceph.conf,cache.direct=on" \
                     --export "type=vhost-user-blk,id=e,node-name=r,addr.type=unix,addr.path=$osock,writable=on,num-queues=2" \
                     >> "$work/rbd-outage-server.log" 2>&1 &
                 opid=$!
             } && SERVER_PID=$opid wait_for_socket "$osock"; } > "$work/rbd-outage-setup.out" 2>&1; then
        cat "$work/rbd-outage-setup.out"
        why="setup failed (log $work/rbd-outage-server.log)"
    elif [[ $server == nvmux ]] && ! {
             oconf=()
             if [[ -n ${RBD_OUTAGE_OP_TIMEOUT_MS:-} ]]; then
                 printf '[rbd]\nop_timeout_ms = %s\n' "$RBD_OUTAGE_OP_TIMEOUT_MS" > "$work/rbd-outage.toml"
                 oconf=(--config "$work/rbd-outage.toml")
                 echo "== rbd-outage: the daemon's [rbd] op_timeout_ms = $RBD_OUTAGE_OP_TIMEOUT_MS"
             fi
             CEPH_CONF=$cdir/ceph.conf side_daemon "$odir" "$work/rbd-outage-server.log" "${oconf[@]}" && opid=$SIDE_PID &&
             "$NVMUX_BIN" --api "$oapi" disk create o --backend rbd --image "$oimg" --size 256M &&
             "$NVMUX_BIN" --api "$oapi" export add o --socket "$osock" --queues 2; } > "$work/rbd-outage-setup.out" 2>&1; then
        cat "$work/rbd-outage-setup.out"
        why="setup failed (log $work/rbd-outage-server.log)"
    else
        echo "== $(tail -n1 "$work/rbd-outage-cluster.out")"
        "$here/boot.sh" --initrd "$initrd" --script "$here/guest-rbd-outage.sh" --log "$work/rbd-outage.log" \
            --vhost-sock "$osock" --queues 2 --env RUNTIME=40 --env GRACE=90 \
            --smp 2 --timeout "$boot_timeout" > "$work/rbd-outage.out" 2>&1 &
        bpid=$!
        if wait_marker "$work/rbd-outage.log" NVMUX-READY-OUTAGE "$bpid" 120; then
            sleep 10
            t_stop0=$(date +%s.%N)
            cluster osd-stop > "$work/rbd-outage-osd.out" 2>&1 && stopped=yes || why="cluster.sh osd-stop failed"
            t_stop1=$(date +%s.%N)
            echo "== host: OSD stopped ($(tail -n1 "$work/rbd-outage-osd.out"))"
            sleep 10
            cluster osd-start >> "$work/rbd-outage-osd.out" 2>&1 && started=yes || why=${why:-"cluster.sh osd-start failed"}
            t_start1=$(date +%s.%N)
            echo "== host: OSD started ($(tail -n1 "$work/rbd-outage-osd.out"))"
        else
            why="the guest did not start fio (log $work/rbd-outage.log)"
        fi
        rc=0
        wait "$bpid" || rc=$?
        cat "$work/rbd-outage.out"
        grep -a '^test: ' "$work/rbd-outage.log" || true
        down=$(awk -v a="$t_stop1" -v b="$t_start1" 'BEGIN { if (a != "" && b != "") printf "%.1f", b - a; else print "?" }')
        stall=$(grep -a -m1 -o 'longest completion gap [0-9.]*' "$work/rbd-outage.log" | awk '{ print $4 }')
        ferr=$(grep -a -m1 -o 'test: errors: fio err=[0-9]*' "$work/rbd-outage.log" | tr -dc '0-9')
        kerr=$(grep -a -m1 -o 'kernel I/O error lines [0-9]*' "$work/rbd-outage.log" | tr -dc '0-9')
        echo "rbd-outage: OSD down $down s (osd-stop returned to osd-start returned; stop took $(awk -v a="$t_stop0" -v b="$t_stop1" 'BEGIN { printf "%.1f", b - a }') s), longest guest stall ${stall:-?} s, ${kerr:-?} errors (guest kernel I/O error lines; fio err=${ferr:-?})"
        if [[ -z $why ]] && ((rc != 0)); then
            why="the guest failed across the outage (boot status $rc, log $work/rbd-outage.log)"
        elif [[ -z $why && -z $stall ]]; then
            why="no stall figure from the guest"
        fi
        grep -a -iE 'rbd|rados|error' "$work/rbd-outage-server.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n 5 | sed 's/^/   daemon: /' || true
    fi
    stop_pid "$opid" || echo "== host: the outage daemon exited with status $?"
    cluster down > /dev/null 2>&1 || echo "== host: cluster.sh down --dir $cdir failed"
    OUTAGE_CLUSTER=
    if [[ -z $why ]]; then pass rbd-outage; else fail rbd-outage "$why"; fi
fi


stop_server
echo "== vm stage took $(($(date +%s) - t0)) s; logs in $work"
echo "vm: $passed passed, $failed failed"
((failed == 0))
