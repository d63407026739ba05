#!/bin/sh
# Guest side (runs as /test.sh) of the vfio-user-nvme scenario (tests/vm/vfio-user-nvme.sh):
# QEMU 11 attached the nvmux daemon's vfio-user export (a PCI NVMe controller) and the
# guest's own nvme driver binds to it.
#   PHASE=write (the first VM):
#     1. `nvme list` shows the controller with the nvmux model string;
#     2. id-ctrl: mn nvmux, sn SERIAL, nn 1; id-ns: nsze = SIZE_BYTES / LBA size, the LBA
#        format in use is 512 B or 4 KiB;
#     3. the driver uses at least 2 I/O queues (the controller's queue_count, and the
#        block device's blk-mq hardware contexts);
#     4. fio --verify=crc32c, random read/write at QD32 with 2 jobs;
#     5. blkdiscard of a written MiB, which then reads as zeros if id-ns says deallocated
#        blocks read as zeros (DLFEAT);
#     6. NVMUX-READY-RESIZE: the host grows the disk to NEW_SIZE_BYTES through the daemon's
#        CLI; the guest must see the new size with no rescan command (the Namespace
#        Attribute Changed event);
#     7. 8 MiB written sequentially at DATA_MIB with crc32c headers, for the second VM.
#   PHASE=verify (the second VM, on the same socket after the first powered off):
#     the controller is there with the grown namespace, and the 8 MiB at DATA_MIB verify.
# Every check prints "test: ok ..." or "test: FAILED ..." and the script goes on where it
# can, so one run tells which assertions hold; the exit status is 0 only if all did
# (else the number of failed checks, or 90 if no NVMe namespace appeared at all).
set -u
. /guest-lib.sh
: "${PHASE:?}" "${SERIAL:?}" "${SIZE_BYTES:?}" "${NEW_SIZE_BYTES:?}" "${DATA_MIB:?}"
failed=0
ok() { echo "test: ok $*"; }
bad() { echo "test: FAILED $*"; failed=$((failed + 1)); }
check() { # WHAT CONDITION...
    _what=$1; shift
    if "$@"; then ok "$_what"; else bad "$_what"; fi
}
# field NAME: an id-ctrl/id-ns value, NAME compared with spaces removed (overrides
# guest-lib.sh's).
field() { awk -F: -v k="$1" '{ g = $1; gsub(/ /, "", g) } g == k { v = $2; sub(/^ */, "", v); sub(/ *$/, "", v); print v; exit }'; }
# A decimal or 0x number as decimal; -1 for anything else (empty, garbage).
num() { case ${1:-} in '' | *[!0-9a-fA-Fx]*) echo -1 ;; *) echo $(($1)) ;; esac; }

modprobe nvme 2>/dev/null || true
# TCG: the driver's probe (reset, Identify, queue creation) takes a few seconds.
# Stop waiting early once the driver gave up on the controller.
if ! wait_for '[ -b /dev/nvme0n1 ] || dmesg | grep -q "Removing after probe failure"' 90 ||
    [ ! -b /dev/nvme0n1 ]; then
    bad "/dev/nvme0n1 appeared (nvme driver bound to the vfio-user controller)"
    dmesg | grep -i nvme | tail -n 20 | sed 's/^/test: dmesg: /'
    exit 90
fi
ok "/dev/nvme0n1 appeared ($(bytes nvme0n1) bytes)"

# 1. nvme list
nvme list > /tmp/list.out 2>&1
sed 's/^/test: nvme list: /' /tmp/list.out
check "nvme list shows /dev/nvme0n1 with model nvmux" grep -Eq '^/dev/nvme0n1 .* nvmux ' /tmp/list.out

# 2. identify
nvme id-ctrl /dev/nvme0 > /tmp/idctrl.out 2>&1 || bad "nvme id-ctrl /dev/nvme0 ran: $(head -n1 /tmp/idctrl.out)"
nvme id-ns /dev/nvme0n1 > /tmp/idns.out 2>&1 || bad "nvme id-ns /dev/nvme0n1 ran: $(head -n1 /tmp/idns.out)"
mn=$(field mn < /tmp/idctrl.out) sn=$(field sn < /tmp/idctrl.out) nn=$(field nn < /tmp/idctrl.out)
check "id-ctrl mn is nvmux (got '$mn')" [ "$mn" = nvmux ]
check "id-ctrl sn is $SERIAL (got '$sn')" [ "$sn" = "$SERIAL" ]
check "id-ctrl nn is 1 (got '$nn')" [ "$(num "$nn")" -eq 1 ]
# "lbaf  0 : ms:0   lbads:9  rp:0 (in use)"
lbads=$(sed -n 's/^lbaf *[0-9]* *: *ms:0 *lbads:\([0-9]*\).*(in use).*/\1/p' /tmp/idns.out | head -n1)
check "id-ns: the LBA format in use has no metadata and 512 B or 4 KiB blocks (lbads '$lbads')" \
    [ "${lbads:-0}" -eq 9 -o "${lbads:-0}" -eq 12 ]
lba=$((1 << ${lbads:-9}))
nsze=$(field nsze < /tmp/idns.out) ncap=$(field ncap < /tmp/idns.out)
want_size=$SIZE_BYTES
[ "$PHASE" = verify ] && want_size=$NEW_SIZE_BYTES
check "id-ns nsze = $want_size / $lba (got '$nsze')" [ "$(num "$nsze")" -eq $((want_size / lba)) ]
check "id-ns ncap = nsze (got '$ncap')" [ "$(num "$ncap")" -eq "$(num "$nsze")" ]
check "the block device is $want_size bytes (got $(bytes nvme0n1))" [ "$(bytes nvme0n1)" -eq "$want_size" ]

# 3. queues: the controller's (admin + I/O), and blk-mq's hardware contexts.
nq=$(($(num "$(cat /sys/class/nvme/nvme0/queue_count 2>/dev/null)") - 1))
hw=$(ls /sys/block/nvme0n1/mq 2>/dev/null | wc -l)
check "the driver uses >= 2 I/O queues (queue_count-1 = $nq, blk-mq contexts $hw)" [ "$nq" -ge 2 -a "$hw" -ge 2 ]
nvme get-feature /dev/nvme0 -f 7 -H 2>&1 | sed 's/^/test: get-feature 7: /'

if [ "$PHASE" = write ]; then
    # 4. fio: random read/write with verification at QD32 on 2 jobs (one 16 MiB region
    #    each, so the jobs never verify each other's blocks).
    if fio --name=rw --filename=/dev/nvme0n1 --rw=randrw --rwmixread=50 --bs=4k --size=16M \
        --offset_increment=16M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --iodepth=32 --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --randrepeat=1 --eta=never --minimal > /tmp/fio.out 2>&1; then
        ok "fio randrw QD32 x 2 jobs with --verify=crc32c"
    else
        tail -n 20 /tmp/fio.out | sed 's/^/test: fio: /'
        bad "fio randrw QD32 x 2 jobs with --verify=crc32c"
    fi
    nvme smart-log /dev/nvme0 2>/dev/null | grep -E 'data_units|host_(read|write)' | sed 's/^/test: smart-log: /'

    # 5. discard (1 MiB at 40 MiB)
    dlfeat=$(field dlfeat < /tmp/idns.out)
    dd if=/dev/urandom of=/dev/nvme0n1 bs=1M seek=40 count=1 oflag=direct 2>/dev/null
    check "a written MiB reads back non-zero" [ "$(nonzero 40 1)" -gt 0 ]
    if blkdiscard -o $((40 << 20)) -l $((1 << 20)) /dev/nvme0n1 2> /tmp/discard.out; then
        ok "blkdiscard of 1 MiB (discard_max_bytes $(cat /sys/block/nvme0n1/queue/discard_max_bytes))"
        if [ $(($(num "$dlfeat") & 7)) -eq 1 ]; then
            check "the discarded MiB reads as zeros (dlfeat $dlfeat)" [ "$(nonzero 40 1)" -eq 0 ]
        else
            echo "test: dlfeat $dlfeat: deallocated blocks are not promised to read as zeros (not checked)"
        fi
    else
        bad "blkdiscard of 1 MiB: $(cat /tmp/discard.out)"
    fi

    # 6. resize through the daemon while the guest runs
    echo NVMUX-READY-RESIZE
    if wait_for '[ "$(bytes nvme0n1)" -eq "$NEW_SIZE_BYTES" ]' 120; then
        ok "the guest sees the resize: /dev/nvme0n1 $(bytes nvme0n1) bytes"
        dmesg | grep -iE 'nvme0n1: detected capacity change|rescan|AEN' | tail -n 3 | sed 's/^/test: dmesg: /'
        nsze=$(nvme id-ns /dev/nvme0n1 2>/dev/null | field nsze)
        check "id-ns nsze after the resize = $NEW_SIZE_BYTES / $lba (got '$nsze')" [ "$(num "$nsze")" -eq $((NEW_SIZE_BYTES / lba)) ]
    else
        bad "the guest sees the resize within 120 s (still $(bytes nvme0n1) bytes, wanted $NEW_SIZE_BYTES)"
        dmesg | grep -i nvme | tail -n 5 | sed 's/^/test: dmesg: /'
    fi
fi

# 7. data for (or from) the other VM: 8 MiB at DATA_MIB, crc32c headers.
vflag=
[ "$PHASE" = verify ] && vflag=--verify_only
if fio --name=handover --filename=/dev/nvme0n1 --rw=write --bs=64k --size=8M --offset="${DATA_MIB}M" \
    --ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never --minimal $vflag > /tmp/fio2.out 2>&1; then
    ok "fio ${vflag:-write+verify} of the 8 MiB at $DATA_MIB MiB"
else
    tail -n 20 /tmp/fio2.out | sed 's/^/test: fio: /'
    bad "fio ${vflag:-write+verify} of the 8 MiB at $DATA_MIB MiB"
fi

echo "test: $failed failed check(s) in phase $PHASE"
exit "$failed"
