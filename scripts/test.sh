#!/usr/bin/env bash
# Set up this machine and run the whole nvmux test suite:
#   packages -> fmt -> clippy -> unit+integration tests -> fuzz build+corpus replay -> VM tests
#   -> VM test with QEMU 11 (vm-qemu11: a Debian sid chroot, built once)
#   -> ceph (a single-host Ceph 16 cluster from tests/ceph/cluster.sh, up in ~5 s: the RBD
#      backend's Rust tests, the rbd and rbd-outage VM scenarios, a short bench --rbd) -> demo
#   -> bench (the quick evaluation suite: its outputs exist and hold every path, the db_bench
#      stage included; no timing asserts)
# Each stage prints one summary line ("<stage>: N passed, N failed"); the last line sums them.
# .ci/run calls exactly this script. Runs as root on Debian 12 (see ../shared/TESTBED.md).
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

total_pass=0
total_fail=0
record() { # stage passed failed
    echo "$1: $2 passed, $3 failed"
    total_pass=$((total_pass + $2))
    total_fail=$((total_fail + $3))
}
run_stage() { # name command...  (a stage that is one check)
    local name=$1; shift
    local t0=$SECONDS
    if "$@"; then record "$name" 1 0; else record "$name" 0 1; fi
    echo "   ($name took $((SECONDS - t0)) s)"
}

install_packages() {
    local pkgs=(qemu-system-x86 qemu-utils fio busybox-static linux-image-amd64 nbdkit libnbd-bin nvme-cli clang llvm python3-cryptography cryptsetup-bin fonts-dejavu-core libssl-dev pkg-config zstd rocksdb-tools
        ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra)
    # libvirt for the VM stage's libvirt scenario, without its recommends (dnsmasq,
    # parted, mdevctl...: nothing the test uses).
    local norec=(libvirt-daemon-system libvirt-clients)
    local missing=()
    for p in "${pkgs[@]}" "${norec[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    # qemu-utils must match qemu-system-x86 (a newer backported qemu-utils blocks it).
    local sysv utilv
    sysv=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
    utilv=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ ${#missing[@]} -eq 0 ] && [ -n "$sysv" ] && [ "$sysv" = "$utilv" ]; then
        echo "packages: all present"; return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "packages missing (${missing[*]}) and cannot install (need root and apt-get)"; return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || return 1
    local cand
    cand=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    apt-get install -y -qq --allow-downgrades "${pkgs[@]/qemu-utils/qemu-utils=$cand}" >/tmp/nvmux-apt.log 2>&1 \
        || { tail -20 /tmp/nvmux-apt.log; return 1; }
    apt-get install -y -qq --no-install-recommends "${norec[@]}" >>/tmp/nvmux-apt.log 2>&1 \
        || { tail -20 /tmp/nvmux-apt.log; return 1; }
    echo "packages: installed"
}

cargo_tests() {
    local log=target/test-output.txt
    mkdir -p target
    cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local p f
    read -r p f < <(grep -E '^test result:' "$log" \
        | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/' \
        | awk '{p += $1; f += $2} END {print p + 0, f + 0}')
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then f=1; fi   # a build failure counts as a failure
    record tests "$p" "$f"
}

fuzz_stage() {
    if ! rustup toolchain list | grep -q nightly; then
        echo "fuzz: no nightly toolchain; corpus replayed by the stable test replay_corpus only"
        record fuzz 0 0; return
    fi
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        cargo install --locked cargo-fuzz >/tmp/nvmux-cargo-fuzz.log 2>&1 || { tail -5 /tmp/nvmux-cargo-fuzz.log; record fuzz 0 1; return; }
    fi
    local p=0 f=0
    for t in $(cd fuzz && cargo +nightly fuzz list); do
        if (cd fuzz && cargo +nightly fuzz build "$t" && cargo +nightly fuzz run "$t" "corpus/$t" -- -runs=0) >"target/fuzz-$t.log" 2>&1; then
            p=$((p + 1))
        else
            tail -20 "target/fuzz-$t.log"; f=$((f + 1))
        fi
    done
    record fuzz "$p" "$f"
}

vm_stage() {
    local log=target/vm-output.txt
    NVMUX_BIN=target/release/nvmux tests/vm/run.sh --server nvmux --skip migrate-qemu11,vfio-user,vfio-user-nvme 2>&1 | tee "$log"
    local line
    line=$(grep -E '^vm: [0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
    if [ -z "$line" ]; then record vm 0 1; return; fi
    record vm "$(echo "$line" | awk '{print $2}')" "$(echo "$line" | awk '{print $4}')"
}

# Live migration and vfio-user with QEMU 11 from a Debian sid chroot (tests/vm/run.sh
# --only migrate-qemu11,vfio-user,vfio-user-nvme). scripts/sid-qemu.sh builds the chroot once (debootstrap + qemu-system-x86:
# about 1 min and 350 MB, cached in /var/cache/nvmux/sid-qemu) and then only checks it.
vm_qemu11_stage() {
    local log=target/vm-qemu11-output.txt
    if ! scripts/sid-qemu.sh >"$log" 2>&1; then
        tail -20 "$log"; record vm-qemu11 0 1; return
    fi
    # vfio-user's test server (the protocol-level scenario; vfio-user-nvme uses the daemon).
    cargo build --release -p nvmux-vfiouser >>"$log" 2>&1 || { tail -20 "$log"; record vm-qemu11 0 1; return; }
    NVMUX_BIN=target/release/nvmux NVMUX_VM_WORKDIR=target/vm/run-qemu11 \
        tests/vm/run.sh --server nvmux --only migrate-qemu11,vfio-user,vfio-user-nvme 2>&1 | tee -a "$log"
    local line
    line=$(grep -E '^vm: [0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
    if [ -z "$line" ]; then record vm-qemu11 0 1; return; fi
    record vm-qemu11 "$(echo "$line" | awk '{print $2}')" "$(echo "$line" | awk '{print $4}')"
}

# The Ceph RBD tests (tests/ceph/run-tests.sh) against a throw-away single-host cluster
# (tests/ceph/cluster.sh: one mon, mgr and OSD; about 5-10 s to start, about 400 MB RSS).
# Its own DIR and ports (7089/7090, 7100-7149), so a development cluster on the default
# 6789 or the OSD-outage cluster on 6889 can run beside it. Torn down on any exit.
ceph_stage() {
    local log=target/ceph-output.txt dir=/tmp/nvmux-ceph-ci port=7089 t0=$SECONDS
    mkdir -p target
    (
        trap 'tests/ceph/cluster.sh down --dir "$dir" >/dev/null 2>&1' EXIT
        trap 'exit 130' INT TERM
        tests/ceph/cluster.sh up --dir "$dir" --port "$port" || exit 1
        eval "$(tests/ceph/cluster.sh env --dir "$dir")"
        CEPH_TEST_LOGDIR=target/ceph-tests tests/ceph/run-tests.sh
    ) 2>&1 | tee "$log"
    local line
    line=$(grep -E '^ceph-tests: [0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
    if [ -z "$line" ]; then
        record ceph 0 1   # the cluster did not come up (see target/ceph-output.txt)
    else
        record ceph "$(echo "$line" | awk '{print $2}')" "$(echo "$line" | awk '{print $4}')"
    fi
    echo "   (ceph took $((SECONDS - t0)) s)"
}

bench_stage() {
    # The quick evaluation suite must produce its JSON (with rows for every path), its
    # markdown and its plots. Figures are not judged here: timing is the benchmark's to
    # report, never a test's to assert.
    local out=target/ci-bench
    rm -rf "$out"
    target/release/nvmux bench suite --quick --out "$out" >target/bench-output.txt 2>&1 || { tail -20 target/bench-output.txt; return 1; }
    python3 - "$out/suite-quick" <<'PY'
import json, os, sys
d = sys.argv[1]
r = json.load(open(os.path.join(d, "report.json")))
paths = {row["path"] for row in r["rows"]}
want = {"bare", "nvmux-vhost", "qsd-vhost", "nvmux-nbd", "qemu-nbd", "nbdkit", "nvmux-nvmf"}
assert want <= paths, f"paths missing from the report: {sorted(want - paths)}"
assert any(row["sweep"] == "multi-vm" and row["disks"] == 32 for row in r["rows"]), "no 32-disk row"
assert all(row["iops"] > 0 for row in r["rows"]), "a run did no I/O"
# The db_bench stage: RocksDB in a guest on all four paths, every benchmark measured.
db = r.get("dbbench")
assert db, "no db_bench stage in the report (see target/bench-output.txt)"
dpaths = {(s["path"], s["bench"]) for s in db["summary"] if s["ops_per_s"] > 0}
dwant = {(p, b) for p in ("nvmux-vhost", "qsd-vhost", "nvmux-nvmf", "virtio-blk")
         for b in ("fillrandom", "readrandom", "readwhilewriting")}
assert dwant <= dpaths, f"db_bench results missing: {sorted(dwant - dpaths)}; failures: {db['failures']}"
pngs = [f for f in os.listdir(d) if f.endswith(".png")]
assert len(pngs) >= 3, f"only {len(pngs)} plots"
for f in pngs:
    assert open(os.path.join(d, f), "rb").read(8) == b"\x89PNG\r\n\x1a\n", f"{f} is not a PNG"
md = open(os.path.join(d, "report.md")).read()
assert "## Targets" in md and "## db_bench" in md
print(f"bench: {len(r['rows'])} rows, {len(pngs)} plots, db_bench {db['wall_seconds']:.0f} s, {r['wall_seconds']:.0f} s in all")
PY
}

t_all=$SECONDS
run_stage packages install_packages
run_stage fmt cargo fmt --all --check
run_stage clippy cargo clippy --all-targets --release -- -D warnings
cargo_tests
fuzz_stage
vm_stage
vm_qemu11_stage
ceph_stage
run_stage demo cargo run --release -- demo --seconds 1
run_stage bench bench_stage
echo "suite took $((SECONDS - t_all)) s"
echo "all: $total_pass passed, $total_fail failed"
[ "$total_fail" = 0 ]
