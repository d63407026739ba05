#!/bin/bash
# Profile an encrypted file disk against the same disk unencrypted: `nvmux serve` (one
# worker on CPU 0) with two 1 GiB file disks on /tmp, one with `encrypt`, each exported
# over vhost-user and driven in turn by `nvmux bench --socket` (libblkio on CPU 1);
# `perf record -a --call-graph dwarf` for 2 s mid-run of each, then a flame graph each.
#   flock /tmp/nvmux-cargo.lock scripts/profile-crypt.sh "randwrite QD32" /tmp/cw
# Writes OUT_PREFIX-{plain,enc}.{data,folded,svg} and prints the IOPS of both (PERF=0:
# no profile; ROUNDS=N: N alternating rounds).
set -e
WL=${1:?workload, e.g. "randwrite QD32"}; OUT=${2:?output prefix}; SECS=${SECS:-6}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/nvmux}
D=$(mktemp -d /tmp/nvmux-prof.XXXXXX)
head -c 32 /dev/urandom > "$D/kek"; chmod 600 "$D/kek"
cat > "$D/cfg.toml" <<C
data_dir = "$D"
[workers]
threads = 1
cpus = [0]
[keys]
kek_file = "$D/kek"
C
taskset -c 0 "$BIN" serve --data-dir "$D" --config "$D/cfg.toml" > "$D/daemon.log" 2>&1 &
DP=$!
trap 'kill $DP 2>/dev/null; wait $DP 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do [ -S "$D/nvmux.sock" ] && break; sleep 0.1; done
api() { curl -sf --unix-socket "$D/nvmux.sock" -XPOST -H 'content-type: application/json' "http://x$1" -d "$2" >/dev/null; }
for n in plain enc; do
  dd if=/dev/zero of="$D/$n.img" bs=1M count=1024 oflag=direct status=none
  enc=false; [ $n = enc ] && enc=true
  api /v1/disks "{\"name\":\"$n\",\"backend\":\"file\",\"path\":\"$D/$n.img\",\"encrypt\":$enc}"
  api /v1/exports "{\"disk\":\"$n\",\"socket\":\"$D/$n.sock\",\"num_queues\":1}"
done
# ROUNDS=N (default 1): measure plain and enc alternately N times; perf on the first.
for r in $(seq "${ROUNDS:-1}"); do
for n in plain enc; do
  taskset -c 1 "$BIN" bench --socket "$D/$n.sock" --only "$WL" --seconds "$SECS" > "$D/$n.out" 2>&1 &
  BP=$!
  if [ "$r" = 1 ] && [ "${PERF:-1}" = 1 ]; then
    sleep 2
    perf record -F 1999 -a --call-graph dwarf,32768 -o "$OUT-$n.data" -- sleep 2 2>/dev/null
  fi
  wait $BP
  echo "== $n round $r"; grep -i "$WL" "$D/$n.out" | tail -1
  if [ "$r" = 1 ] && [ "${PERF:-1}" = 1 ]; then
    perf script -i "$OUT-$n.data" 2>/dev/null | "$ROOT/scripts/flamegraph.py" \
        --title "nvmux $n file disk on /tmp, 4 KiB $WL (worker nvmux-w0)" \
        --comm nvmux-w0 --folded "$OUT-$n.folded" > "$OUT-$n.svg"
  fi
done
done
