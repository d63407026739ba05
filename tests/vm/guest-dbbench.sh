#!/bin/sh
# Guest side (runs as /test.sh) of `nvmux bench suite`'s db_bench stage
# (crates/bench/src/dbbench.rs): RocksDB's db_bench on ext4 on the disk under test.
#   DEV_KIND=virtio   the one virtio-blk disk, /dev/vda (vhost-user-blk or QEMU's own)
#   DEV_KIND=nvmf     the kernel's NVMe/TCP initiator: connect to NQN on TARGET_IP:PORT as
#                     HOSTNQN/HOSTID, then /dev/nvme0n1
#   DEV_KIND=nvme     a PCI NVMe controller (nvmux's vfio-user export): /dev/nvme0n1
# Then: mke2fs -t ext4 (inode tables and journal written now, not lazily during the run,
# no discard), mount, and db_bench's fillrandom, then readrandom and readwhilewriting on
# the same database, with NUM keys of VALUE_SIZE bytes, READS reads, direct reads and
# direct flush/compaction (so reads reach the disk: the block cache is 8 MiB and the page
# cache is bypassed), the writer of readwhilewriting limited to WRITE_RATE bytes/s. db_bench's report (ops/s and
# the latency percentiles per benchmark) goes to the console between
# NVMUX-DBBENCH-BEGIN and NVMUX-DBBENCH-END for the host to parse.
# Exit status: 0, db_bench's status, or 50-59 (see the messages).
set -eu
. /guest-lib.sh
: "${DEV_KIND:?}" "${NUM:?}" "${READS:?}" "${VALUE_SIZE:?}" "${WRITE_RATE:?}"

command -v db_bench >/dev/null || { echo "test: no db_bench in the image (apt-get install rocksdb-tools on the host, then rebuild it)"; exit 50; }
modprobe ext4 || { echo "test: modprobe ext4 failed"; exit 51; }

case $DEV_KIND in
    virtio)
        dev=/dev/vda
        wait_for '[ -b /dev/vda ]' 10 || { echo "test: /dev/vda did not appear"; exit 52; }
        ;;
    nvmf)
        nvmf_attach_one_queue
        dev=/dev/nvme0n1
        ;;
    nvme)
        modprobe nvme 2>/dev/null || true
        dev=/dev/nvme0n1
        wait_for '[ -b /dev/nvme0n1 ]' 90 || { echo "test: /dev/nvme0n1 did not appear"; exit 54; }
        ;;
    *) echo "test: DEV_KIND must be virtio, nvmf or nvme"; exit 55 ;;
esac

# By its path: busybox sh would run its own mke2fs applet, which has no ext4.
mke2fs=$(readlink -f /sbin/mke2fs)
[ "$mke2fs" != /bin/busybox ] || mke2fs=/usr/sbin/mke2fs
"$mke2fs" -q -F -t ext4 -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$dev" ||
    { echo "test: mke2fs on $dev failed"; exit 56; }
mkdir -p /mnt
mount -t ext4 -o noatime "$dev" /mnt || { echo "test: mount $dev failed"; exit 57; }
echo "test: ext4 on $dev ($(($(cat /sys/block/${dev#/dev/}/size) / 2048)) MiB)"

echo NVMUX-DBBENCH-BEGIN
rc=0
# Two runs on one database: db_bench's write rate limit is global, so fillrandom runs
# unlimited first, then readrandom and readwhilewriting (its writer limited) reopen it.
# db_bench's progress lines ("... finished N ops") go to stderr: kept in a file.
common="--db=/mnt/db --num=$NUM --reads=$READS --key_size=16 --value_size=$VALUE_SIZE
    --compression_type=none --cache_size=8388608 --use_direct_reads=1
    --use_direct_io_for_flush_and_compaction=1 --write_buffer_size=4194304
    --target_file_size_base=4194304 --max_bytes_for_level_base=16777216
    --histogram=1 --seed=1 --threads=1"
# shellcheck disable=SC2086 # $common is a list of flags
db_bench $common --benchmarks=fillrandom 2>/tmp/dbbench.err || rc=$?
if [ "$rc" -eq 0 ]; then
    # shellcheck disable=SC2086
    db_bench $common --use_existing_db=1 --benchmarks=readrandom,readwhilewriting \
        --benchmark_write_rate_limit="$WRITE_RATE" 2>>/tmp/dbbench.err || rc=$?
fi
echo NVMUX-DBBENCH-END
[ "$rc" -eq 0 ] || { tail -n 20 /tmp/dbbench.err; echo "test: db_bench failed ($rc)"; exit "$rc"; }

umount /mnt || { echo "test: umount failed"; exit 58; }
if [ "$DEV_KIND" = nvmf ]; then
    nvme disconnect -n "$NQN" >/dev/null || { echo "test: nvme disconnect failed"; exit 59; }
fi
