# Helpers shared by the guest test scripts that tests/vm/boot.sh runs: boot.sh installs
# this file as /guest-lib.sh next to /test.sh, and a script sources it with
# `. /guest-lib.sh`. (Scripts booted by migrate.sh or libvirt.sh, which build their own
# initrd, do not get it.)

# wait_disk DEV CODE: wait up to 10 s for the block device DEV to appear, then print its
# size and queue count ("test: /dev/vda 64 MiB, 2 queues"); exit CODE if it never does.
wait_disk() {
    _i=0
    while [ ! -b "$1" ]; do
        _i=$((_i + 1))
        [ "$_i" -le 100 ] || { echo "test: $1 did not appear"; exit "$2"; }
        sleep 0.1
    done
    _b=/sys/block/${1#/dev/}
    echo "test: $1 $(($(cat "$_b/size") / 2048)) MiB, $(ls "$_b/mq" | wc -l) queues, $(grep -c ^processor /proc/cpuinfo) cpus"
}

# fio_wait PID LIMIT: wait for the fio run PID (its output in /tmp/fio.out); if it still
# runs LIMIT s after this call (a request the device never completes leaves it waiting
# for ever), print "test: fio hung", its error lines and the kernel's, and exit 70.
fio_wait() {
    _t=0
    while kill -0 "$1" 2>/dev/null; do
        if [ "$_t" -ge "$2" ]; then
            echo "test: fio hung: still running ${_t}s after it started (a request never completed)"
            grep -E 'err=|verify' /tmp/fio.out || true
            dmesg | grep -iE 'virtio|vda|I/O error|blk_update|hung' | tail -n 8 || true
            exit 70
        fi
        sleep 1
        _t=$((_t + 1))
    done
}

# io_errors: the kernel log's lines about failed block requests (none: empty).
io_errors() {
    dmesg | grep -iE 'I/O error|blk_update_request|print_req_error|critical medium|virtio.*(error|broken)|id [0-9]+ is not a head' || true
}

# fio_verdict RC IOERR WHAT: exit RC (printing /tmp/fio.out) if fio failed, 71 if the
# kernel logged I/O errors (IOERR, from io_errors); return if neither. WHAT names what
# the run went through ("the kills").
fio_verdict() {
    if [ "$1" -ne 0 ]; then
        cat /tmp/fio.out
        [ -z "$2" ] || echo "$2" | sed 's/^/test: dmesg: /' | tail -n 8
        echo "test: fio failed across $3 (rc $1)"
        exit "$1"
    fi
    if [ -n "$2" ]; then
        echo "$2" | sed 's/^/test: dmesg: /' | tail -n 8
        echo "test: I/O errors in the kernel log"
        exit 71
    fi
}

# disk_queues DEV: how many queues (blk-mq hardware contexts) DEV has.
disk_queues() {
    ls "/sys/block/${1#/dev/}/mq" | wc -l
}

# wait_for COND_CMD SECONDS: poll the shell condition every 0.2 s; fails after SECONDS.
wait_for() {
    _w=0
    while ! eval "$1"; do
        _w=$((_w + 1))
        [ "$_w" -le $(($2 * 5)) ] || return 1
        sleep 0.2
    done
}

# bytes DEV: the size of /sys/block/DEV in bytes.
bytes() { echo $(($(cat "/sys/block/$1/size") * 512)); }

# nonzero SKIP_MIB COUNT_MIB: how many non-zero bytes /dev/nvme0n1 holds there.
nonzero() { dd if=/dev/nvme0n1 bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | tr -d '\000' | wc -c; }

# field NAME: the value of "NAME : value" in nvme-cli's id-ctrl / id-ns output (stdin).
field() { sed -n "s/^$1 *: *//p" | sed 's/ *$//' | head -n1; }

# nvme_data_checks QD LABEL: on /dev/nvme0n1 (at least 25 MiB), fio random write with
# crc32c verify on 2 jobs pinned to 2 CPUs (so 2 queues) at queue depth QD, 4 KiB and
# 64 KiB; a TCG-bound 4 KiB QD32 random-read figure labelled LABEL; 1 MiB written,
# blkdiscard, reads zeros. Exit status: fio's, or 41/42.
nvme_data_checks() {
    fio --name=small --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=8M --offset_increment=8M \
        --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --iodepth="$1" --ioengine=libaio \
        --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --minimal > /tmp/fio1.out 2>&1 ||
        { rc=$?; cat /tmp/fio1.out; exit "$rc"; }
    fio --name=big --filename=/dev/nvme0n1 --rw=randwrite --bs=64k --size=8M --offset=16M --iodepth=8 \
        --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never \
        --minimal > /tmp/fio2.out 2>&1 || { rc=$?; cat /tmp/fio2.out; exit "$rc"; }
    echo "test: fio crc32c verify passed (2 jobs x 8 MiB of 4 KiB at QD$1, 8 MiB of 64 KiB)"
    _iops=$(fio --name=perf --filename=/dev/nvme0n1 --rw=randread --bs=4k --size=32M --ioengine=libaio \
        --direct=1 --iodepth=32 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --time_based --runtime=3 --group_reporting --minimal | awk -F';' '{ print $8 }')
    echo "test: TCG guest $2 4K randread QD32 x 2 jobs: $_iops IOPS"
    dd if=/dev/urandom of=/dev/nvme0n1 bs=1M seek=24 count=1 oflag=direct 2>/dev/null
    [ "$(nonzero 24 1)" -gt 0 ] || { echo "test: written MiB reads as zeros"; exit 41; }
    blkdiscard -o $((24 << 20)) -l $((1 << 20)) /dev/nvme0n1
    [ "$(nonzero 24 1)" -eq 0 ] || { echo "test: discarded MiB does not read as zeros"; exit 42; }
    echo "test: blkdiscard then read returns zeros"
}

# nvmf_attach_one_queue: bring up the user-mode network (QEMU slirp, guest 10.0.2.15) and
# connect to NQN on TARGET_IP:PORT as HOSTNQN/HOSTID with one I/O queue; /dev/nvme0n1
# appears within 10 s, else exit 53 (connect) or 54 (no device).
nvmf_attach_one_queue() {
    : "${TARGET_IP:?}" "${PORT:?}" "${NQN:?}" "${HOSTNQN:?}" "${HOSTID:?}"
    modprobe virtio_net
    modprobe nvme_tcp
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    nvme connect -t tcp -a "$TARGET_IP" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" \
        --hostid="$HOSTID" -i 1 || { echo "test: nvme connect failed"; exit 53; }
    wait_for '[ -b /dev/nvme0n1 ]' 10 || { echo "test: /dev/nvme0n1 did not appear"; exit 54; }
}
