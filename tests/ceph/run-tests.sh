#!/usr/bin/env bash
# The Ceph tests: run against the cluster named by $CEPH_CONF (tests/ceph/cluster.sh up;
# eval "$(tests/ceph/cluster.sh env)"). Each test is a function test_NAME below, listed in
# TESTS; a test passes when its function returns 0. Output of each test goes to
# $CEPH_TEST_LOGDIR/NAME.log (default target/ceph-tests); a failing test's tail is printed.
# The last line is "ceph-tests: N passed, N failed".
#   tests/ceph/run-tests.sh [--only a,b] [--skip a,b] [--list]
set -uo pipefail
cd "$(dirname "$0")/../.."

TESTS=(rbd-cli fio-rbd-verify rust-rbd vm-rbd bench-rbd)

: "${CEPH_CONF:?CEPH_CONF is not set (eval \"\$(tests/ceph/cluster.sh env)\")}"
[ -r "$CEPH_CONF" ] || { echo "run-tests.sh: cannot read CEPH_CONF=$CEPH_CONF" >&2; exit 1; }
export CEPH_CONF
LOGDIR=${CEPH_TEST_LOGDIR:-target/ceph-tests}
mkdir -p "$LOGDIR"
# A per-run prefix for image names, so runs against a shared cluster do not collide.
RUN_ID="t$$-$(date +%s)"

# --- helpers -----------------------------------------------------------------------------
rbd_() { timeout 60 rbd "$@"; }
# Removes an image if it exists (cleanup, never fails).
rbd_rm_quiet() { timeout 60 rbd rm "$1" >/dev/null 2>&1 || true; }

# --- tests -------------------------------------------------------------------------------
# The rbd CLI: create, info (the size is what was asked), resize, ls, rm.
test_rbd-cli() {
    local img=rbd/$RUN_ID-cli
    # shellcheck disable=SC2064
    trap "rbd_rm_quiet $img" RETURN
    rbd_ create "$img" --size 64M || return 1
    rbd_ info "$img" --format json | tee /dev/stderr \
        | python3 -c 'import json, sys; d = json.load(sys.stdin); assert d["size"] == 64 << 20, d["size"]' || return 1
    rbd_ resize "$img" --size 128M || return 1
    rbd_ info "$img" --format json \
        | python3 -c 'import json, sys; d = json.load(sys.stdin); assert d["size"] == 128 << 20, d["size"]' || return 1
    rbd_ ls rbd | grep -qx "${img#rbd/}" || { echo "$img not in 'rbd ls rbd'"; return 1; }
    rbd_ rm "$img" || return 1
    if rbd_ info "$img" >/dev/null 2>&1; then echo "$img still exists after rbd rm"; return 1; fi
}

# fio's rbd engine: 4k random writes with crc32c checksums over 32 MiB (every block once,
# a few seconds), then every block read back and verified.
test_fio-rbd-verify() {
    local name=$RUN_ID-fio
    # shellcheck disable=SC2064
    trap "rbd_rm_quiet rbd/$name" RETURN
    rbd_ create "rbd/$name" --size 64M || return 1
    timeout 120 fio --name=verify --ioengine=rbd --clientname=admin --pool=rbd --rbdname="$name" \
        --rw=randwrite --bs=4k --iodepth=16 --size=32M \
        --verify=crc32c --verify_fatal=1 --verify_state_save=0 --output-format=json --output="$LOGDIR/fio-rbd-verify.json" \
        || return 1
    # The verify pass read the blocks back, and nothing failed.
    python3 - "$LOGDIR/fio-rbd-verify.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]   # fio may put warnings before the JSON
print(f"write {j['write']['iops']:.0f} IOPS, verify read {j['read']['io_bytes']} bytes, error {j['error']}")
assert j["error"] == 0, j["error"]
assert j["write"]["io_bytes"] > 0, "nothing written"
assert j["read"]["io_bytes"] == j["write"]["io_bytes"] == 32 << 20, "not every block written and read back" 
PY
}

# The Rust tests that need a cluster: the backend's (crates/backend/tests/rbd.rs) and the
# daemon's through the CLI (crates/nvmux/tests/rbd.rs). They skip themselves without
# NVMUX_CEPH_CONF: here every one of them must have run.
test_rust-rbd() {
    local out=$LOGDIR/rust-rbd.out
    NVMUX_CEPH_CONF=$CEPH_CONF timeout 900 cargo test --release -p nvmux-backend -p nvmux --test rbd \
        -- --nocapture 2>&1 | tee "$out"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    if grep -q 'skipped: NVMUX_CEPH_CONF' "$out"; then echo "a test skipped itself"; return 1; fi
    grep -E '^test result: ok\. [1-9]' "$out" | wc -l | grep -qx 2 || { echo "not both test binaries ran"; return 1; }
}

# The VM scenarios on RBD disks (tests/vm/run.sh): rbd (guest fio over vhost-user and the
# kernel's nvme-tcp, host fio over NBD) and rbd-outage (an OSD stopped for 10 s under the
# guest's fio --verify, on a cluster of its own).
test_vm-rbd() {
    timeout 1200 tests/vm/run.sh --only rbd,rbd-outage || return 1
}

# nvmux bench --rbd, short: it must produce its table (figures are not judged here).
test_bench-rbd() {
    local out=$LOGDIR/bench-rbd
    rm -rf "$out"
    timeout 900 target/release/nvmux bench --rbd --seconds 2 --rounds 1 --out "$out" || return 1
    ls "$out"/*.md >/dev/null 2>&1 || { echo "no report in $out"; return 1; }
    cat "$out"/*.md
}

# --- runner ------------------------------------------------------------------------------
only="" skip=""
while [ $# -gt 0 ]; do
    case $1 in
        --only) only=,$2,; shift 2 ;;
        --skip) skip=,$2,; shift 2 ;;
        --list) printf '%s\n' "${TESTS[@]}"; exit 0 ;;
        *) echo "usage: $0 [--only a,b] [--skip a,b] [--list]" >&2; exit 2 ;;
    esac
done

pass=0 fail=0
for t in "${TESTS[@]}"; do
    [ -n "$only" ] && [[ $only != *",$t,"* ]] && continue
    [[ $skip == *",$t,"* ]] && continue
    t0=$SECONDS
    if "test_$t" >"$LOGDIR/$t.log" 2>&1; then
        echo "PASS $t ($((SECONDS - t0)) s)"; pass=$((pass + 1))
    else
        echo "FAIL $t ($((SECONDS - t0)) s), log $LOGDIR/$t.log:"; tail -n 20 "$LOGDIR/$t.log" | sed 's/^/    /'
        fail=$((fail + 1))
    fi
done
echo "ceph-tests: $pass passed, $fail failed"
[ "$fail" = 0 ]
