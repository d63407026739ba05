#!/usr/bin/env python3
"""A tiny QMP client for the VM tests (no dependencies).

Usage:
  qmp.py SOCK migrate URI [TIMEOUT_S]   migrate to URI at 100 MiB/s with QEMU's default
                                        downtime limit (300 ms), so that the guest runs (and
                                        its disk writes guest pages) through several pre-copy
                                        rounds; wait until completed; prints one summary
                                        line; exit 1 if it failed or timed out
  qmp.py SOCK quit                      quit QEMU
  qmp.py SOCK status                    print the run state (running, inmigrate, postmigrate...)
"""
import json
import socket
import sys
import time


class Qmp:
    def __init__(self, path, wait_s=30.0):
        t0 = time.time()
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() - t0 > wait_s:
                    raise
                time.sleep(0.1)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError("QMP connection closed")
            r = json.loads(line)
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error'].get('desc')}")
            # events are skipped


def main():
    path, what = sys.argv[1], sys.argv[2]
    q = Qmp(path)
    if what == "quit":
        try:
            q.cmd("quit")
        except EOFError:
            pass
        return 0
    if what == "status":
        print(q.cmd("query-status")["status"])
        return 0
    if what == "migrate":
        uri = sys.argv[3]
        timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 300.0
        q.cmd("migrate-set-parameters", {"max-bandwidth": 100 << 20, "downtime-limit": 300})
        t0 = time.time()
        q.cmd("migrate", {"uri": uri})
        while True:
            st = q.cmd("query-migrate")
            status = st.get("status")
            if status == "completed":
                ram = st.get("ram", {})
                print(
                    "completed in %.1f s (QEMU: total %s ms, downtime %s ms, %.1f MiB of RAM sent, %s dirty-sync rounds)"
                    % (
                        time.time() - t0,
                        st.get("total-time"),
                        st.get("downtime"),
                        ram.get("transferred", 0) / 1048576.0,
                        ram.get("dirty-sync-count"),
                    )
                )
                return 0
            if status in ("failed", "cancelled"):
                print(f"{status}: {st.get('error-desc', '')}")
                return 1
            if time.time() - t0 > timeout:
                print(f"timed out after {timeout} s in state {status}")
                try:
                    q.cmd("migrate_cancel")
                except Exception:
                    pass
                return 1
            time.sleep(0.2)
    print(f"qmp.py: unknown command {what}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
