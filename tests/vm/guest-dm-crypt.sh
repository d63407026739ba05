#!/bin/sh
# Guest side (runs as /test.sh) of the dm-crypt interop scenario. The host serves three
# encrypted nvmux disks over vhost-user-blk (the plaintext view) and attaches their image
# files as raw virtio-blk disks with serials raw512, raw4k, raw4kl (the ciphertext):
#   512   sector_size 512                        16 MiB  KEY512
#   4k    sector_size 4096, IVs in 512-byte units 20 MiB  KEY4K
#   4kl   sector_size 4096, iv_large_sectors      24 MiB  KEY4KL
# (the keys are the disks' data keys as hex, unwrapped on the host). For each layout:
#   1. 1 MiB of random data written through nvmux reads back identical through the
#      kernel's dm-crypt (`cryptsetup open --type plain --cipher aes-xts-plain64
#      --key-size 512 [--sector-size 4096 [--iv-large-sectors]]`) on the raw image;
#   2. 1 MiB written through dm-crypt reads back identical through nvmux;
#   3. control: dm-crypt opened with the other layout does not read the data.
# Exit status: 0, or 30-39 (see the messages).
set -eu
export DM_DISABLE_UDEV=1
for m in dm_crypt xts ecb aesni_intel algif_skcipher; do modprobe "$m" 2>/dev/null || true; done
command -v cryptsetup >/dev/null || { echo "test: cryptsetup missing from the image (apt-get install cryptsetup-bin on the host)"; exit 30; }
grep -q '^name *: xts(aes)' /proc/crypto || modprobe xts 2>/dev/null || true
mkdir -p /run/cryptsetup

# The disk with serial $1; the nvmux disk (serial not raw*) of $1 MiB.
by_serial() {
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${b##*/}"; return 0; }
    done
    return 1
}
by_size() {
    for b in /sys/block/vd*; do
        case "$(cat "$b/serial" 2>/dev/null)" in raw*) continue ;; esac
        [ "$(cat "$b/size")" -eq $(($1 * 2048)) ] && { echo "/dev/${b##*/}"; return 0; }
    done
    return 1
}
i=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt 6 ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || { echo "test: expected 6 disks, have: $(ls /sys/block)"; exit 31; }
    sleep 0.1
done

hex2bin() { # HEX FILE: 64 bytes of key material
    printf '%s' "$1" | sed 's/../\\x&/g' | xargs -0 printf > "$2"
    [ "$(wc -c < "$2")" -eq 64 ] || { echo "test: key is not 64 bytes"; exit 32; }
}

# open NAME RAWDEV KEYFILE OPTIONS...
open() {
    n=$1 dev=$2 key=$3
    shift 3
    cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --hash plain \
        --key-file "$key" --keyfile-size 64 "$@" "$dev" "$n"
}

check() { # LABEL MIB RAWSERIAL KEYHEX OPTIONS... -- WRONG-OPTIONS...
    label=$1 mib=$2 serial=$3 keyhex=$4
    shift 4
    opts= wrong= seen=
    for a in "$@"; do
        if [ "$a" = -- ]; then seen=1; elif [ -z "$seen" ]; then opts="$opts $a"; else wrong="$wrong $a"; fi
    done
    plain=$(by_size "$mib") || {
        echo "test: $label: no nvmux disk of $mib MiB"
        for b in /sys/block/vd*; do echo "test:   ${b##*/}: $(cat "$b/size") sectors, serial '$(cat "$b/serial" 2>/dev/null)'"; done
        exit 33
    }
    raw=$(by_serial "$serial") || { echo "test: $label: no disk with serial $serial"; exit 33; }
    hex2bin "$keyhex" /tmp/key
    echo "test: $label: nvmux $plain ($(cat /sys/block/${plain#/dev/}/queue/logical_block_size)-byte blocks), image $raw, cryptsetup$opts"

    # 1. nvmux writes, dm-crypt reads.
    dd if=/dev/urandom of=/tmp/a bs=1M count=1 2>/dev/null
    dd if=/tmp/a of="$plain" bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null
    # shellcheck disable=SC2086
    open "c$label" "$raw" /tmp/key $opts || { echo "test: $label: cryptsetup open failed"; exit 34; }
    cryptsetup status "c$label" | grep -E 'cipher|sector size|keysize' | sed "s/^/test: $label:   /"
    dd if="/dev/mapper/c$label" of=/tmp/b bs=64k skip=16 count=16 iflag=direct 2>/dev/null
    cmp -s /tmp/a /tmp/b || { echo "test: $label: dm-crypt does not read what nvmux wrote"; exit 35; }
    echo "test: $label: dm-crypt reads what nvmux wrote: ok"

    # 2. dm-crypt writes, nvmux reads.
    dd if=/dev/urandom of=/tmp/c bs=1M count=1 2>/dev/null
    dd if=/tmp/c of="/dev/mapper/c$label" bs=64k seek=64 oflag=direct conv=fsync 2>/dev/null
    cryptsetup close "c$label"
    dd if="$plain" of=/tmp/d bs=64k skip=64 count=16 iflag=direct 2>/dev/null
    cmp -s /tmp/c /tmp/d || { echo "test: $label: nvmux does not read what dm-crypt wrote"; exit 36; }
    echo "test: $label: nvmux reads what dm-crypt wrote: ok"

    # 3. Control: the other layout does not decrypt it.
    # shellcheck disable=SC2086
    open "w$label" "$raw" /tmp/key $wrong || { echo "test: $label: cryptsetup open (control) failed"; exit 37; }
    dd if="/dev/mapper/w$label" of=/tmp/e bs=64k skip=16 count=16 iflag=direct 2>/dev/null
    cryptsetup close "w$label"
    if cmp -s /tmp/a /tmp/e; then echo "test: $label: control: the wrong layout ($wrong) reads the data"; exit 38; fi
    echo "test: $label: control: cryptsetup$wrong reads noise: ok"
}

check 512 16 raw512 "${KEY512:?}" -- --sector-size 4096
check 4k 20 raw4k "${KEY4K:?}" --sector-size 4096 -- --sector-size 4096 --iv-large-sectors
check 4kl 24 raw4kl "${KEY4KL:?}" --sector-size 4096 --iv-large-sectors -- --sector-size 4096
echo "test: dm-crypt interop: all three layouts ok"
