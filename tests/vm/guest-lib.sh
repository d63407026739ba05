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

# disk_queues DEV: how many queues (blk-mq hardware contexts) DEV has.
disk_queues() {
    ls "/sys/block/${1#/dev/}/mq" | wc -l
}
