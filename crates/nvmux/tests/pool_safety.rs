//! Pool data safety against the real daemon with real clients (qemu-io over NBD): no
//! command waits for ever, snapshots of a live volume lose no acknowledged write, and
//! errors are sticky.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// A pool `p` of `size` bytes in the daemon's directory.
fn pool(d: &TestDaemon, size: u64) -> PathBuf {
    let path = d.dir.join("p.pool");
    d.api
        .post(
            "/v1/pools",
            &json!({"name": "p", "path": path, "size": size}),
        )
        .expect("create pool");
    path
}

/// A thin volume `name` of pool `p`, exported over NBD on `nbd.sock`.
fn thin_nbd(d: &TestDaemon, name: &str, size: u64) -> PathBuf {
    d.api
        .post(
            "/v1/disks",
            &json!({"name": name, "pool": "p", "size": size}),
        )
        .expect("create thin disk");
    let sock = d.dir.join("nbd.sock");
    d.nbd_export(json!({"disk": name, "socket": sock}));
    sock
}

/// qemu-io on export `name` with `cmds`, under `timeout 60` as a hang detector: (exited
/// by itself, succeeded, output).
fn qemu_io(sock: &Path, name: &str, cmds: &[String]) -> (bool, bool, String) {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", "60", "qemu-io", "-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri(sock, name));
    let o = c.output().expect("run timeout qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // SIGKILL from timeout: no exit code.
    let finished = o.status.code().is_some();
    // qemu-io exits 0 even when a command fails: a failure prints "failed".
    let good = o.status.success() && !text.contains("failed") && !text.contains("error");
    (finished, good, text)
}

/// The reproduction: a 256 MiB pool, a 200 MiB volume, 32 MiB writes at 0, 32,
/// 64, ... MiB. Before the fix the write at 96 MiB waited for claimed clusters for ever.
#[test]
fn large_allocating_writes_on_a_small_pool_complete_or_fail() {
    watchdog(600);
    let d = TestDaemon::start("pool-small");
    pool(&d, 256 * MIB);
    let sock = thin_nbd(&d, "t", 200 * MIB);
    let mut off = 0;
    while off < 200 * MIB {
        let len = (200 * MIB - off).min(32 * MIB);
        let (finished, good, out) = qemu_io(
            &sock,
            "t",
            &[format!("write -P {} {off} {len}", (off / MIB) as u8 | 1)],
        );
        assert!(
            finished,
            "the {len}-byte write at {off} hung (killed after 60 s): {out}\n{}",
            d.log()
        );
        // The volume fits the pool: every write must succeed (ENOSPC would be allowed
        // only for a volume larger than the free space).
        assert!(good, "the write at {off} failed: {out}");
        off += len;
    }
    // Everything reads back.
    let mut off = 0;
    while off < 200 * MIB {
        let len = (200 * MIB - off).min(32 * MIB);
        let (finished, good, out) = qemu_io(
            &sock,
            "t",
            &[format!("read -P {} {off} {len}", (off / MIB) as u8 | 1)],
        );
        assert!(finished && good, "read back at {off}: {out}");
        off += len;
    }
    d.stop();
}

/// A volume larger than the pool: writes past the free space fail (ENOSPC), none hangs.
#[test]
fn writes_past_the_free_space_fail_instead_of_hanging() {
    watchdog(600);
    let d = TestDaemon::start("pool-full");
    pool(&d, 128 * MIB);
    let sock = thin_nbd(&d, "big", 256 * MIB);
    let mut failed = 0;
    let mut off = 0;
    while off < 256 * MIB {
        let (finished, good, out) =
            qemu_io(&sock, "big", &[format!("write -P 7 {off} {}", 32 * MIB)]);
        assert!(
            finished,
            "the write at {off} hung (killed after 60 s): {out}\n{}",
            d.log()
        );
        if !good {
            failed += 1;
            assert!(
                out.contains("No space left") || out.contains("Input/output error"),
                "the write at {off} failed, but not with ENOSPC: {out}"
            );
        }
        off += 32 * MIB;
    }
    assert!(failed > 0, "a 256 MiB volume cannot fit a 128 MiB pool");
    d.stop();
}
