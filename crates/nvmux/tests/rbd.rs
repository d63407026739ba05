//! RBD disks through the real daemon and CLI against a real Ceph cluster
//! (tests/ceph/cluster.sh): create, libblkio write/verify over vhost-user, the storage
//! functions on top (encryption, QoS, a mirror leg), resize, snapshot and clone, each
//! confirmed with Ceph's own `rbd` tool.
//!
//! The cluster comes from `NVMUX_CEPH_CONF` (a ceph.conf whose admin keyring it names);
//! the CI's Ceph stage sets it. Without it these tests print that they were skipped.

mod common;

use std::path::Path;
use std::process::Command;

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn ceph_conf() -> Option<String> {
    let c = std::env::var("NVMUX_CEPH_CONF")
        .ok()
        .filter(|c| !c.is_empty());
    if c.is_none() {
        eprintln!("skipped: NVMUX_CEPH_CONF not set (tests/ceph/cluster.sh up, then export NVMUX_CEPH_CONF=<dir>/ceph.conf)");
    }
    c
}

/// The `rbd` tool against the test cluster.
fn rbd(conf: &str, args: &[&str]) -> Command {
    let mut c = Command::new("rbd");
    c.arg("-c").arg(conf).args(args);
    c
}

/// `rbd info --format json` of an image (or image@snap).
fn rbd_info(conf: &str, spec: &str) -> serde_json::Value {
    let out = ok(&mut rbd(conf, &["info", "--format", "json", spec]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rbd info {spec}: {e}: {out}"))
}

/// Images and snapshots a test made, removed when it ends (also when it fails).
struct Cleanup {
    conf: String,
    images: Vec<String>,
    snaps: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Clones first: a protected snapshot with children cannot go.
        for i in self.images.iter().rev() {
            let _ = rbd(&self.conf, &["rm", "--no-progress", i]).output();
        }
        for s in &self.snaps {
            let _ = rbd(&self.conf, &["snap", "unprotect", s]).output();
            let _ = rbd(&self.conf, &["snap", "rm", "--no-progress", s]).output();
        }
        for i in self.images.iter().rev() {
            let _ = rbd(&self.conf, &["rm", "--no-progress", i]).output();
        }
    }
}

fn cli(d: &TestDaemon, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvmux"));
    c.arg("--api").arg(d.dir.join("nvmux.sock")).args(args);
    c
}

fn export(d: &TestDaemon, disk: &str) -> std::path::PathBuf {
    let sock = d.dir.join(format!("{disk}.sock"));
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": disk, "socket": sock, "num_queues": 2}),
        )
        .expect("export");
    sock
}

fn verify(d: &TestDaemon, sock: &Path, seed: &str) -> String {
    ok(&mut cli(
        d,
        &[
            "bench",
            "verify",
            "--socket",
            sock.to_str().unwrap(),
            "--seconds",
            "3",
            "--qd",
            "16",
            "--seed",
            seed,
        ],
    ))
}

fn read(c: &mut BlkioClient, off: u64, len: usize) -> Vec<u8> {
    c.buf()[..len].fill(0xee);
    c.io_ok(0, Op::Read, off, len, 0, ReqFlags::empty())
        .expect("read");
    c.buf()[..len].to_vec()
}

#[test]
fn rbd_disk_create_verify_resize_snapshot_clone_through_the_cli() {
    let Some(conf) = ceph_conf() else { return };
    watchdog(300);
    let img = format!("rbd/it-{}", std::process::id());
    let clone = format!("{img}-clone");
    let _cleanup = Cleanup {
        conf: conf.clone(),
        images: vec![img.clone(), clone.clone()],
        snaps: vec![format!("{img}@s1")],
    };
    let d = TestDaemon::start_with_env(unique_dir("rbd"), &[], &[("CEPH_CONF", &conf)]);

    // A missing image without a size is refused, and nothing is created.
    let out = fails(&mut cli(
        &d,
        &["disk", "create", "r", "--backend", "rbd", "--image", &img],
    ));
    assert!(out.contains("does not exist"), "{out}");
    assert!(!rbd(&conf, &["info", &img])
        .output()
        .unwrap()
        .status
        .success());

    // Create: the image appears with the size asked for.
    ok(&mut cli(
        &d,
        &[
            "disk",
            "create",
            "r",
            "--backend",
            "rbd",
            "--image",
            &img,
            "--size",
            "64M",
        ],
    ));
    assert_eq!(rbd_info(&conf, &img)["size"], 64 * MIB);
    let v = d.api.get("/v1/disks/r").expect("disk");
    assert_eq!(v["backend"]["type"], "rbd", "{v}");
    assert_eq!(v["size"], 64 * MIB, "{v}");
    assert_eq!(v["status"], "ok", "{v}");
    // A second disk on the same image is refused.
    let out = fails(&mut cli(
        &d,
        &["disk", "create", "r2", "--backend", "rbd", "--image", &img],
    ));
    assert!(out.contains("already disk"), "{out}");

    // libblkio write/verify over vhost-user.
    let sock = export(&d, "r");
    let out = verify(&d, &sock, "7");
    assert!(out.contains(" 0 errors, 0 mismatches"), "{out}");
    // The workers serve only this RBD disk, so they never busy-poll: an idle spell would
    // find nothing for hundreds of microseconds and take the CPU librbd's threads need.
    let (_, m) = d.api.call_raw("GET", "/metrics", None).expect("metrics");
    let spun: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("nvmux_worker_idle_poll_seconds_total"))
        .collect();
    assert!(!spun.is_empty(), "{m}");
    for l in &spun {
        assert!(l.ends_with(" 0"), "a worker busy-polled: {l}");
    }

    // Known data before the snapshot, other data after it.
    let before = pattern(1, 64 << 10);
    let after = pattern(2, 64 << 10);
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("libblkio");
    write_flushed(&mut c, 8 * MIB, &before);
    ok(&mut cli(&d, &["disk", "snapshot", "r", "s1"]));
    let snaps = ok(&mut rbd(&conf, &["snap", "ls", "--format", "json", &img]));
    assert!(snaps.contains("\"s1\""), "rbd snap ls: {snaps}");
    assert_eq!(
        rbd_info(&conf, &format!("{img}@s1"))["protected"],
        "true",
        "the snapshot is protected, so it can be cloned"
    );
    write_flushed(&mut c, 8 * MIB, &after);
    assert_eq!(read(&mut c, 8 * MIB, after.len()), after);

    // Resize: `rbd info` and the disk follow, and the client reaches the new end.
    ok(&mut cli(&d, &["disk", "resize", "r", "128M"]));
    assert_eq!(rbd_info(&conf, &img)["size"], 128 * MIB);
    assert_eq!(d.api.get("/v1/disks/r").unwrap()["size"], 128 * MIB);
    drop(c);
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("libblkio after resize");
    write_flushed(&mut c, 120 * MIB, &after);
    assert_eq!(read(&mut c, 120 * MIB, after.len()), after);
    // Shrinking needs --force.
    let out = fails(&mut cli(&d, &["disk", "resize", "r", "32M"]));
    assert!(out.contains("--force"), "{out}");
    drop(c);

    // A resize made outside nvmux (`rbd resize`): the disk follows within seconds, and a
    // client reaches the new end.
    let r = rbd(&conf, &["resize", "--no-progress", "--size", "160M", &img])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let t0 = std::time::Instant::now();
    while d.api.get("/v1/disks/r").unwrap()["size"] != 160 * MIB
        && t0.elapsed() < std::time::Duration::from_secs(20)
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(d.api.get("/v1/disks/r").unwrap()["size"], 160 * MIB);
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("libblkio");
    assert_eq!(c.capacity(), 160 * MIB);
    write_flushed(&mut c, 150 * MIB, &after);
    assert_eq!(read(&mut c, 150 * MIB, after.len()), after);
    drop(c);

    // Clone: a new image whose parent is the snapshot, holding the snapshot's data.
    ok(&mut cli(
        &d,
        &[
            "disk",
            "clone",
            &format!("{img}@s1"),
            "c",
            "--image",
            &clone,
        ],
    ));
    let ci = rbd_info(&conf, &clone);
    assert_eq!(
        ci["parent"]["image"],
        img.trim_start_matches("rbd/"),
        "{ci}"
    );
    assert_eq!(ci["parent"]["snapshot"], "s1", "{ci}");
    let csock = export(&d, "c");
    let mut cc = BlkioClient::connect(&csock, 1, false, 1 << 20).expect("libblkio clone");
    assert_eq!(
        read(&mut cc, 8 * MIB, before.len()),
        before,
        "the clone reads the snapshot"
    );
    write_flushed(&mut cc, 8 * MIB, &after);
    assert_eq!(
        read(&mut cc, 8 * MIB, after.len()),
        after,
        "and writes its own"
    );
    drop(cc);

    // The snapshot as a disk: read-only, the old data.
    ok(&mut cli(
        &d,
        &[
            "disk",
            "create",
            "snap",
            "--backend",
            "rbd",
            "--image",
            &format!("{img}@s1"),
        ],
    ));
    let v = d.api.get("/v1/disks/snap").unwrap();
    assert_eq!(v["read_only"], true, "{v}");
    let ssock = export(&d, "snap");
    // libblkio starts on a read-only device only as a read-only client.
    let mut sc =
        BlkioClient::connect_opts(&ssock, 1, false, 1 << 20, true).expect("libblkio snapshot");
    assert_eq!(read(&mut sc, 8 * MIB, before.len()), before);
    drop(sc);

    // Deleting the disks leaves the images in the cluster.
    for disk in ["snap", "c", "r"] {
        ok(&mut cli(&d, &["export", "remove", disk]));
        ok(&mut cli(&d, &["disk", "delete", disk]));
    }
    assert_eq!(rbd_info(&conf, &img)["size"], 160 * MIB);
    d.stop();
}

#[test]
fn storage_functions_work_on_an_rbd_disk() {
    let Some(conf) = ceph_conf() else { return };
    watchdog(300);
    let img = format!("rbd/it-fn-{}", std::process::id());
    let _cleanup = Cleanup {
        conf: conf.clone(),
        images: vec![img.clone()],
        snaps: vec![],
    };
    let dir = unique_dir("rbd-fn");
    let kek = dir.join("kek");
    std::fs::write(&kek, "07".repeat(32) + "\n").expect("kek");
    std::fs::set_permissions(&kek, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("kek mode");
    let d = TestDaemon::start_with_env(
        dir,
        &["--kek-file", kek.to_str().unwrap()],
        &[("CEPH_CONF", &conf)],
    );
    // Encrypted, with a QoS limit, and a mirror leg on a local file.
    ok(&mut cli(
        &d,
        &[
            "disk",
            "create",
            "e",
            "--backend",
            "rbd",
            "--image",
            &img,
            "--size",
            "32M",
            "--encrypt",
        ],
    ));
    let v = d.api.get("/v1/disks/e").unwrap();
    assert_eq!(
        v["functions"],
        json!(["qos", "crypt", "mirror"]),
        "the default chain on an rbd disk: {v}"
    );
    ok(&mut cli(&d, &["disk", "qos", "e", "--iops", "20000"]));
    let sock = export(&d, "e");
    let out = verify(&d, &sock, "11");
    assert!(out.contains(" 0 errors, 0 mismatches"), "{out}");

    // What reaches the cluster is ciphertext: the pattern is not in the image.
    let plain = pattern(5, 64 << 10);
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("libblkio");
    write_flushed(&mut c, 4 * MIB, &plain);
    let raw = d.dir.join("raw");
    ok(&mut rbd(
        &conf,
        &["export", "--no-progress", &img, raw.to_str().unwrap()],
    ));
    let on_disk = read_file_at(&raw, 4 * MIB, plain.len());
    assert_ne!(on_disk, plain, "the image holds ciphertext");
    assert_eq!(read(&mut c, 4 * MIB, plain.len()), plain);
    drop(c);

    // A mirror leg on a local file: copied, then healthy, holding what the image holds.
    let leg = d.dir.join("leg.img");
    ok(&mut cli(
        &d,
        &[
            "disk",
            "mirror",
            "add",
            "e",
            "--file",
            leg.to_str().unwrap(),
            "--wait",
        ],
    ));
    let m = d.api.get("/v1/disks/e/mirror").unwrap();
    assert!(
        m["legs"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|l| l["state"] == "healthy")),
        "{m}"
    );
    // The file leg holds the same ciphertext as the image.
    assert_eq!(read_file_at(&leg, 4 * MIB, plain.len()), on_disk);
    let out = verify(&d, &sock, "12");
    assert!(out.contains(" 0 errors, 0 mismatches"), "{out}");
    d.stop();
}
