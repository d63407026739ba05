#!/usr/bin/env bash
# A single-host Ceph test cluster (one mon, one mgr, one bluestore OSD on a sparse file),
# without systemd or cephadm. Runs as root; everything binds to 127.0.0.1.
# See tests/ceph/README.md.
set -uo pipefail

usage() {
    cat <<EOF
usage: $0 COMMAND [--dir DIR] [--port PORT]
  up          build and start the cluster (idempotent), pool 'rbd' ready; prints 'ceph: ready in N s'
  env         print 'export CEPH_CONF=DIR/ceph.conf'
  osd-stop    stop the OSD (SIGTERM, wait for its exit)
  osd-start   start the OSD again and wait until it is up
  status      daemons, health, pools
  down        kill the daemons and remove DIR
defaults: DIR=/tmp/nvmux-ceph PORT=6789 (mon: v1 on PORT, v2 on PORT+1;
          OSD and mgr bind in PORT+11..PORT+60)
EOF
}

HERE=$(cd "$(dirname "$0")" && pwd)
CMD=${1:-}
[ -n "$CMD" ] && shift
DIR=/tmp/nvmux-ceph
PORT=6789
while [ $# -gt 0 ]; do
    case $1 in
        --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "cluster.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
case $CMD in -h|--help|help) usage; exit 0 ;; "") usage >&2; exit 2 ;; esac
case $PORT in ''|*[!0-9]*) echo "cluster.sh: bad port $PORT" >&2; exit 2 ;; esac
mkdir -p "$(dirname "$DIR")"
DIR=$(cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")
CONF=$DIR/ceph.conf
UP_TIMEOUT=${CEPH_UP_TIMEOUT:-120}
DAEMONS=(mon mgr osd)
# the distribution's python3: it has the rados and rbd modules (a pyenv python3 does not)
PY=/usr/bin/python3

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
die() { echo "cluster.sh: $*" >&2; exit 1; }

# --- processes -------------------------------------------------------------------------
# The pid of daemon $1 (mon|mgr|osd) if it runs with this DIR's ceph.conf, else nothing.
pid_of() {
    local f=$DIR/run/$1.pid pid
    [ -f "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    case $pid in ''|*[!0-9]*) return 1 ;; esac
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-c $CONF " || return 1
    echo "$pid"
}

# Every ceph daemon whose command line names this DIR's ceph.conf (leftovers whose pid file
# is gone included).
all_pids() {
    local p
    for p in /proc/[0-9]*; do
        [ -r "$p/cmdline" ] || continue
        if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qE "^(/usr/bin/)?ceph-(mon|mgr|osd) .*-c $CONF "; then
            echo "${p#/proc/}"
        fi
    done
}

# SIGTERM, wait up to $1 s, then SIGKILL. The rest of the arguments are pids.
stop_pids() {
    local wait=$1; shift
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null
    local i p alive
    for ((i = 0; i < wait * 10; i++)); do
        alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    return 1
}

# start_daemon mon|mgr|osd: runs it in the foreground mode (-f), in its own session,
# backgrounded; output in DIR/log/NAME.out, pid in DIR/run/NAME.pid.
start_daemon() {
    local d=$1 id
    case $d in mon) id=mon0 ;; mgr) id=x ;; osd) id=0 ;; esac
    setsid "ceph-$d" -f -c "$CONF" -i "$id" >>"$DIR/log/$d.out" 2>&1 </dev/null 9>&- &
    echo $! >"$DIR/run/$d.pid"
}

# run_watched "DAEMON..." CMD...: runs CMD while watching the daemons; returns CMD's status,
# or 99 at once (CMD killed) when one of the daemons exits, so a crashed daemon fails fast
# instead of at the timeout.
run_watched() {
    local watch=$1; shift
    "$@" &
    local cpid=$! d
    while kill -0 "$cpid" 2>/dev/null; do
        for d in $watch; do
            if ! pid_of "$d" >/dev/null; then
                kill "$cpid" 2>/dev/null; wait "$cpid" 2>/dev/null
                echo "cluster.sh: ceph-$d exited" >&2
                return 99
            fi
        done
        sleep 0.2
    done
    wait "$cpid"
}

log_tail() {
    local d
    for d in "${DAEMONS[@]}"; do
        for f in "$DIR/log/$d.out" "$DIR"/log/ceph-*"$d"*.log; do
            [ -s "$f" ] || continue
            echo "--- tail of $f"; tail -n 15 "$f"
        done
    done >&2
}

fail_up() {
    echo "cluster.sh up: $*" >&2
    log_tail
    echo "cluster.sh up: FAILED (the daemons are left running for inspection; 'cluster.sh down --dir $DIR' removes them)" >&2
    exit 1
}

port_busy() { # true when something listens on 127.0.0.1:$1 or *:$1
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

rss_report() {
    local d pid rss total=0 line=""
    for d in "${DAEMONS[@]}"; do
        pid=$(pid_of "$d") || continue
        rss=$(awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$pid/status" 2>/dev/null)
        [ -n "$rss" ] || continue
        line+=" $d ${rss} MiB,"
        total=$((total + rss))
    done
    echo "ceph: RSS${line} total ${total} MiB"
}

# --- up --------------------------------------------------------------------------------
write_conf() {
    local fsid=$1
    local p2=$((PORT + 1)) lo=$((PORT + 11)) hi=$((PORT + 60))
    cat >"$CONF" <<EOF
# Written by tests/ceph/cluster.sh: a one-OSD test cluster. Not for data you want to keep.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$p2,v1:127.0.0.1:$PORT]
public network = 127.0.0.0/8
public addr = 127.0.0.1
ms bind port min = $lo
ms bind port max = $hi
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $DIR/ceph.client.admin.keyring
run dir = $DIR/run
crash dir = $DIR/crash
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
# a one-mon test cluster: commit map changes (pool create, OSD boot) without the 1 s batching
paxos propose interval = 0.1

[mon]
log file = $DIR/log/\$cluster-\$name.log
admin socket = $DIR/run/\$cluster-\$name.asok
pid file = $DIR/run/\$type.pid
mon data = $DIR/mon
keyring = $DIR/mon/keyring
mon initial members = mon0
mgr initial modules =
[mgr]
log file = $DIR/log/\$cluster-\$name.log
admin socket = $DIR/run/\$cluster-\$name.asok
pid file = $DIR/run/\$type.pid
mgr data = $DIR/mgr
keyring = $DIR/mgr/keyring
# the mgr loads only what a test cluster needs (no dashboard, telemetry, prometheus...)
mgr disabled modules = diskprediction_local

[osd]
log file = $DIR/log/\$cluster-\$name.log
admin socket = $DIR/run/\$cluster-\$name.asok
pid file = $DIR/run/\$type.pid
osd data = $DIR/osd
keyring = $DIR/osd/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 10737418240
bluestore fsck on mkfs = false
bluestore fsck on mount = false
# the sparse file is on whatever disk holds DIR: ssd settings (no deferred small writes)
bluestore debug enforce settings = ssd
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
bluestore rocksdb options = compression=kNoCompression,max_write_buffer_number=2,min_write_buffer_number_to_merge=1,recycle_log_file_num=4,write_buffer_size=33554432,writable_file_max_buffer_size=0,compaction_readahead_size=2097152,max_background_compactions=1,max_total_wal_size=134217728
osd op num shards = 2
osd op num threads per shard = 2
osd fast shutdown = true
osd fast shutdown notify mon = true
osd class load list = rbd lock
osd class default list = rbd lock
EOF
}

healthy() { # the cluster in DIR runs and serves
    [ -f "$DIR/.ready" ] || return 1
    local d
    for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || return 1; done
    timeout 15 $PY "$HERE/ceph_util.py" check "$CONF" >/dev/null 2>&1
}

cmd_up() {
    [ "$(id -u)" = 0 ] || die "up needs root"
    local t0 t
    t0=$(now)
    if healthy; then
        echo "ceph: already up in $DIR ($(grep -m1 '^mon host' "$CONF"))"
        echo "ceph: ready in 0 s"
        return 0
    fi
    # A cluster that was built completely but has daemons missing (osd-stop, a crash, a
    # reboot with DIR kept): start what is missing before rebuilding anything.
    if [ -f "$DIR/.ready" ] && [ -f "$CONF" ]; then
        local d started=0
        for d in "${DAEMONS[@]}"; do
            if ! pid_of "$d" >/dev/null; then start_daemon "$d"; started=1; fi
        done
        if [ $started = 1 ] && timeout 60 $PY "$HERE/ceph_util.py" wait-osd-up "$CONF" 50 >/dev/null 2>&1 \
            && healthy; then
            echo "ceph: restarted the missing daemons in $DIR"
            rss_report
            echo "ceph: ready in $(since "$t0" | cut -d. -f1) s"
            return 0
        fi
        echo "ceph: $DIR is not healthy; rebuilding it"
    fi
    # Leftovers: kill and remove.
    local pids
    pids=$(all_pids)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || stop_pids 2 $pids || die "cannot stop leftover daemons: $pids"
    rm -rf "$DIR"
    local p
    for p in "$PORT" $((PORT + 1)); do
        port_busy "$p" && die "port $p is in use by another process (another cluster? use --port)"
    done
    mkdir -p "$DIR"/{mon,mgr,osd,run,log,crash} || die "cannot create $DIR"

    # Keys: every daemon's key goes into the mon keyring, so 'ceph-mon --mkfs' puts them all
    # in the auth database (no 'ceph auth add' round trips).
    t=$(now)
    local fsid osd_uuid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$fsid"
    local K=$DIR/ceph.mon.keyring
    {
        ceph-authtool --create-keyring "$K" --gen-key -n mon. --cap mon 'allow *' &&
        ceph-authtool --create-keyring "$DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' &&
        ceph-authtool --create-keyring "$DIR/mgr/keyring" --gen-key -n mgr.x \
            --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' &&
        ceph-authtool --create-keyring "$DIR/osd/keyring" --gen-key -n osd.0 \
            --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' &&
        ceph-authtool "$K" --import-keyring "$DIR/ceph.client.admin.keyring" &&
        ceph-authtool "$K" --import-keyring "$DIR/mgr/keyring" &&
        ceph-authtool "$K" --import-keyring "$DIR/osd/keyring" &&
        monmaptool --create --fsid "$fsid" --addv mon0 "[v2:127.0.0.1:$((PORT + 1)),v1:127.0.0.1:$PORT]" \
            "$DIR/monmap"
    } >"$DIR/log/mkfs.out" 2>&1 || { cat "$DIR/log/mkfs.out" >&2; die "keyring/monmap creation failed"; }
    chmod 600 "$K" "$DIR/mgr/keyring" "$DIR/osd/keyring"
    chmod 644 "$DIR/ceph.client.admin.keyring"   # test cluster: other users' clients may read it
    echo "  keys, monmap: $(since "$t") s"

    # The OSD's mkfs (bluestore on a sparse file) runs while the mon is made and started.
    t=$(now)
    timeout 60 ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" --monmap "$DIR/monmap" \
        --no-mon-config >"$DIR/log/osd-mkfs.out" 2>&1 9>&- &
    local mkfs_pid=$!
    timeout 30 ceph-mon -c "$CONF" --mkfs -i mon0 --monmap "$DIR/monmap" --keyring "$K" \
        >>"$DIR/log/mkfs.out" 2>&1 || { cat "$DIR/log/mkfs.out" >&2; die "ceph-mon --mkfs failed"; }
    start_daemon mon
    start_daemon mgr
    echo "  mon mkfs + start: $(since "$t") s"
    if ! wait $mkfs_pid; then
        cat "$DIR/log/osd-mkfs.out" >&2; fail_up "ceph-osd --mkfs failed"
    fi
    echo "  osd mkfs: $(since "$t") s"
    start_daemon osd

    t=$(now)
    local left
    left=$(awk -v a="$t0" -v b="$(now)" -v T="$UP_TIMEOUT" 'BEGIN { x = T - (b - a); print (x < 5 ? 5 : int(x)) }')
    run_watched "${DAEMONS[*]}" timeout $((left + 5)) $PY "$HERE/ceph_util.py" setup "$CONF" "$osd_uuid" 16 "$left"
    case $? in
        0) ;;
        99) fail_up "a daemon exited while the cluster was starting" ;;
        *) fail_up "the cluster did not become ready within $UP_TIMEOUT s" ;;
    esac
    local d
    for d in "${DAEMONS[@]}"; do pid_of "$d" >/dev/null || fail_up "ceph-$d exited"; done

    # The pool is usable: create and remove an image with the rbd CLI.
    t=$(now)
    local img="ready-check-$$"
    CEPH_CONF=$CONF timeout 30 rbd create "rbd/$img" --size 16M >"$DIR/log/ready-check.out" 2>&1 &&
        CEPH_CONF=$CONF timeout 30 rbd rm "rbd/$img" >>"$DIR/log/ready-check.out" 2>&1 ||
        { cat "$DIR/log/ready-check.out" >&2; fail_up "rbd create/rm in pool rbd failed"; }
    echo "  rbd create+rm: $(since "$t") s"
    touch "$DIR/.ready"
    echo "ceph: $(timeout 15 $PY "$HERE/ceph_util.py" health "$CONF" 2>&1)"
    rss_report
    echo "ceph: CEPH_CONF=$CONF (mon 127.0.0.1:$PORT)"
    echo "ceph: ready in $(since "$t0" | awk '{print int($1 + 0.5)}') s"
}

# --- the rest ----------------------------------------------------------------------------
cmd_osd_stop() {
    local pid t
    pid=$(pid_of osd) || { echo "ceph: osd not running in $DIR"; return 0; }
    t=$(now)
    stop_pids 30 "$pid" || die "osd $pid does not exit"
    echo "ceph: osd stopped in $(since "$t") s"
}

cmd_osd_start() {
    [ -f "$CONF" ] || die "no cluster in $DIR"
    local t
    if pid_of osd >/dev/null; then echo "ceph: osd already running"; return 0; fi
    t=$(now)
    start_daemon osd
    run_watched osd timeout 70 $PY "$HERE/ceph_util.py" wait-osd-up "$CONF" 60 >/dev/null || {
        log_tail; die "osd not up after 60 s (or it exited)"; }
    echo "ceph: osd up in $(since "$t") s"
}

cmd_status() {
    local d pid
    echo "ceph: DIR=$DIR CEPH_CONF=$CONF"
    for d in "${DAEMONS[@]}"; do
        if pid=$(pid_of "$d"); then echo "  $d: running (pid $pid)"; else echo "  $d: not running"; fi
    done
    [ -f "$CONF" ] || { echo "  no ceph.conf: no cluster"; return 1; }
    rss_report
    timeout 20 ceph -c "$CONF" --connect-timeout 10 -s 2>&1
}

cmd_down() {
    local pids
    pids=$(all_pids)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || stop_pids 2 $pids || die "cannot stop: $pids"
    rm -rf "$DIR"
    echo "ceph: down ($DIR removed)"
}

# One command at a time per DIR (two users of a shared cluster may call 'up' together). The
# lock file lives beside DIR: DIR itself is removed and rebuilt.
case $CMD in
    up|down|osd-stop|osd-start)
        exec 9>"$DIR.lock" || die "cannot open $DIR.lock"
        flock -w 300 9 || die "$DIR.lock: another cluster.sh holds it for 300 s"
        ;;
esac

case $CMD in
    up) cmd_up ;;
    env) echo "export CEPH_CONF=$CONF" ;;
    osd-stop) cmd_osd_stop ;;
    osd-start) cmd_osd_start ;;
    status) cmd_status ;;
    down) cmd_down ;;
    *) echo "cluster.sh: unknown command $CMD" >&2; usage >&2; exit 2 ;;
esac
