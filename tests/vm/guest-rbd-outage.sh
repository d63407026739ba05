#!/bin/sh
# Guest side of the rbd-outage scenario: fio random writes at queue depth 16 with
# --verify=crc32c (verify_backlog: it re-reads and checks what it wrote as it goes) on
# /dev/vda, an RBD-backed disk over vhost-user, for RUNTIME seconds, while the host stops
# the cluster's only OSD and starts it again. Every completion is logged
# (--write_lat_log, --log_avg_msec=0); the longest time without any completion is the
# stall the guest saw: "test: longest completion gap G s (from T s)".
#
# Markers: NVMUX-READY-OUTAGE (fio started). Results on the console: "test: fio hung"
# (still running GRACE s after its runtime), fio's error and verify lines, I/O errors from
# the kernel log, and the gap line.
# Exit status: 0 (fio passed, no I/O error in dmesg), 70 (hung), 71 (I/O error in dmesg),
# 72 (no latency log), 90 (no disk), or fio's status.
set -u
. /guest-lib.sh
dev=/dev/vda
runtime=${RUNTIME:-40}
grace=${GRACE:-90}

wait_disk "$dev" 90

fio --name=outage --filename="$dev" --rw=randwrite --bs=4k --size=32M \
    --ioengine=libaio --direct=1 --iodepth=16 --randrepeat=1 --verify=crc32c \
    --verify_backlog=64 --verify_fatal=1 --time_based --runtime="$runtime" \
    --write_lat_log=/tmp/outage --log_avg_msec=0 --eta=never > /tmp/fio.out 2>&1 &
fpid=$!
sleep 1
echo NVMUX-READY-OUTAGE

fio_wait "$fpid" $((runtime + grace))
rc=0
wait "$fpid" || rc=$?
grep -E 'err=|verify|IOPS|crc|bad|clat \(' /tmp/fio.out || true
# The clat log: "msec since the job started, latency, direction, block size[, offset]"
# per completion, reads (the verify) and writes alike.
if [ -s /tmp/outage_clat.1.log ]; then
    n=$(wc -l < /tmp/outage_clat.1.log)
    awk -F, '{ print $1 + 0 }' /tmp/outage_clat.1.log | sort -n |
        awk -v n="$n" 'NR > 1 && $1 - p > g { g = $1 - p; at = p } { p = $1 }
            END { printf "test: longest completion gap %.1f s (from %.1f s), %d completions\n", g / 1000, at / 1000, n }'
else
    echo "test: no completion latency log"
    [ "$rc" -ne 0 ] || rc=72
fi
ioerr=$(io_errors)
# fio's err= is the errno of its first error (0: none); the kernel logs each failed request.
echo "test: errors: fio err=$(grep -m1 -o 'err= *[0-9]*' /tmp/fio.out | tr -dc '0-9'), kernel I/O error lines $(printf '%s' "$ioerr" | grep -c .)"
fio_verdict "$rc" "$ioerr" "the OSD outage"
echo "test: fio randwrite QD16 + verify passed across the OSD outage, 0 errors, no I/O error in dmesg"
