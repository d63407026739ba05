#!/bin/bash
# Profile the vhost-user null path: `nvmux serve` (one worker on CPU 0, one null disk
# exported over vhost-user) driven by `nvmux bench --socket` (libblkio on CPU 1) at one
# queue depth; `perf record -a --call-graph dwarf` for 2 s mid-run, then a flame graph.
#   scripts/profile-vhost-null.sh QD OUT_PREFIX      (run it under the build lock:
#   flock /tmp/nvmux-cargo.lock scripts/profile-vhost-null.sh 32 /tmp/qd32)
# Writes OUT_PREFIX.data, OUT_PREFIX.folded and OUT_PREFIX.svg.
set -e
QD=${1:?queue depth}; OUT=${2:?output prefix}; SECS=${SECS:-6}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/nvmux}
D=$(mktemp -d /tmp/nvmux-prof.XXXXXX)
cat > "$D/cfg.toml" <<C
data_dir = "$D"
[workers]
threads = 1
poll_idle_us = 50
cpus = [0]
C
taskset -c 0 "$BIN" serve --data-dir "$D" --config "$D/cfg.toml" > "$D/daemon.log" 2>&1 &
DP=$!
trap 'kill $DP 2>/dev/null; wait $DP 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do [ -S "$D/nvmux.sock" ] && break; sleep 0.1; done
api() { curl -sf --unix-socket "$D/nvmux.sock" -XPOST -H 'content-type: application/json' "http://x$1" -d "$2" >/dev/null; }
api /v1/disks '{"name":"null","backend":"null","size":1073741824}'
api /v1/exports "{\"disk\":\"null\",\"socket\":\"$D/null.sock\",\"num_queues\":1}"
taskset -c 1 "$BIN" bench --socket "$D/null.sock" --only "randread QD$QD" --seconds "$SECS" &
BP=$!
sleep 2
perf record -F 1999 -a --call-graph dwarf,32768 -o "$OUT.data" -- sleep 2 2>/dev/null
wait $BP
perf script -i "$OUT.data" 2>/dev/null | "$ROOT/scripts/flamegraph.py" \
    --title "nvmux null, 4 KiB randread QD$QD (worker nvmux-w0, libblkio client nvmux)" \
    --comm nvmux-w0 --comm nvmux --folded "$OUT.folded" > "$OUT.svg"
echo "$OUT.svg"
