#!/usr/bin/env python3
"""Monitor-side steps of tests/ceph/cluster.sh, in one process (the `ceph` CLI costs about
0.4 s of Python start-up per call). Every call is bounded by a timeout.

  ceph_util.py setup CONF OSD_UUID PG_NUM TIMEOUT   register osd.0, create pool rbd, wait for
                                                    osd.0 up+in, `rbd pool init`, health
                                                    OK or WARN
  ceph_util.py wait-osd-up CONF TIMEOUT              until osd.0 is up (prints the seconds)
  ceph_util.py check CONF                            exit 0 if osd.0 is up+in and pool rbd exists
  ceph_util.py health CONF                           prints the health status line
"""
import json
import sys
import time

import rados
import rbd

OP_TIMEOUT = "10"


def connect(conf, timeout=10):
    cluster = rados.Rados(
        conffile=conf,
        conf={
            "client_mount_timeout": str(int(timeout)),
            "rados_mon_op_timeout": OP_TIMEOUT,
            "rados_osd_op_timeout": OP_TIMEOUT,
        },
    )
    cluster.connect(timeout=timeout)
    return cluster


def mon(cluster, prefix, **args):
    cmd = dict(args, prefix=prefix, format="json")
    ret, out, err = cluster.mon_command(json.dumps(cmd), b"", timeout=int(OP_TIMEOUT))
    if ret != 0:
        raise RuntimeError(f"mon command {prefix} {args}: {ret} {err}")
    return json.loads(out) if out else None


def osd0(cluster):
    for o in mon(cluster, "osd dump")["osds"]:
        if o["osd"] == 0:
            return o
    return None


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except (rados.Error, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def setup(conf, osd_uuid, pg_num, timeout):
    t0 = time.monotonic()
    deadline = t0 + timeout
    cluster = connect(conf, timeout)
    try:
        mon(cluster, "osd new", uuid=osd_uuid, id=0)
        mon(cluster, "osd pool create", pool="rbd", pg_num=pg_num, pgp_num=pg_num,
            autoscale_mode="off")
        mon(cluster, "osd pool application enable", pool="rbd", app="rbd")
        print(f"  pool rbd created: {time.monotonic() - t0:.1f} s", flush=True)

        def up_in():
            o = osd0(cluster)
            return o is not None and o["up"] == 1 and o["in"] == 1
        wait_until(up_in, max(1, deadline - time.monotonic()), "osd.0 up+in")
        print(f"  osd.0 up+in: {time.monotonic() - t0:.1f} s", flush=True)

        # rbd pool init writes to the pool: it succeeds once the PGs are active.
        ioctx = cluster.open_ioctx("rbd")
        try:
            def init():
                rbd.RBD().pool_init(ioctx, True)
                return True
            wait_until(init, max(1, deadline - time.monotonic()), "rbd pool init")
        finally:
            ioctx.close()
        print(f"  rbd pool init: {time.monotonic() - t0:.1f} s", flush=True)

        def ok_or_warn():
            return mon(cluster, "health")["status"] in ("HEALTH_OK", "HEALTH_WARN")
        wait_until(ok_or_warn, max(1, deadline - time.monotonic()), "HEALTH_OK or HEALTH_WARN")
    finally:
        cluster.shutdown()


def wait_osd_up(conf, timeout):
    t0 = time.monotonic()
    cluster = connect(conf, timeout)
    try:
        def up():
            o = osd0(cluster)
            return o is not None and o["up"] == 1
        wait_until(up, timeout, "osd.0 up")
        print(f"{time.monotonic() - t0:.1f}")
    finally:
        cluster.shutdown()


def check(conf):
    cluster = connect(conf, 5)
    try:
        o = osd0(cluster)
        if o is None or o["up"] != 1 or o["in"] != 1:
            return 1
        # (health is not asked: a shared cluster in HEALTH_ERR for a crashed mgr module
        # still serves, and rebuilding it would remove everyone's images)
        return 0 if "rbd" in cluster.list_pools() else 1
    finally:
        cluster.shutdown()


def health(conf):
    cluster = connect(conf, 5)
    try:
        h = mon(cluster, "health")
        checks = ", ".join(f"{k}: {v['summary']['message']}" for k, v in h.get("checks", {}).items())
        print(h["status"] + (f" ({checks})" if checks else ""))
    finally:
        cluster.shutdown()


def main(argv):
    try:
        if argv[1] == "setup":
            setup(argv[2], argv[3], int(argv[4]), float(argv[5]))
        elif argv[1] == "wait-osd-up":
            wait_osd_up(argv[2], float(argv[3]))
        elif argv[1] == "check":
            return check(argv[2])
        elif argv[1] == "health":
            health(argv[2])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (rados.Error, RuntimeError) as e:
        print(f"ceph_util {argv[1]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
