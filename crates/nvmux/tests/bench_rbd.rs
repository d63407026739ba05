//! `nvmux bench --rbd` without a Ceph cluster: it fails early, with a message that says
//! what is missing, and never hangs (CEPH_CONF unset; a cluster that does not answer; an
//! image name the suite cannot use). The runs with a cluster are the suite itself.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run `nvmux bench --rbd ARGS` with `CEPH_CONF` set to `conf` (or unset); killed after
/// `limit` (the test then fails: the bench must not hang).
fn bench_rbd(conf: Option<&Path>, args: &[&str], out: &Path, limit: Duration) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvmux"));
    c.args(["bench", "--rbd", "--seconds", "1", "--rounds", "1", "--out"])
        .arg(out)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match conf {
        Some(p) => c.env("CEPH_CONF", p),
        None => c.env_remove("CEPH_CONF"),
    };
    let mut child = c.spawn().expect("start nvmux");
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().expect("wait");
            panic!(
                "nvmux bench --rbd still running after {limit:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nvmux-bench-rbd-test-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

#[test]
fn without_ceph_conf_it_says_so() {
    let d = tmp("noconf");
    let o = bench_rbd(None, &[], &d.join("out"), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "succeeded without a cluster: {err}");
    assert!(err.contains("CEPH_CONF is not set"), "{err}");
    assert!(!d.join("out").join("rbd.md").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_cluster_that_does_not_answer_fails_early() {
    let d = tmp("nomon");
    // Nothing listens on port 1: every monitor connection is refused.
    let conf = d.join("ceph.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = 127.0.0.1:1\nauth client required = none\n",
    )
    .expect("conf");
    let o = bench_rbd(Some(&conf), &[], &d.join("out"), Duration::from_secs(120));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "succeeded without a cluster: {err}");
    assert!(
        err.contains("no Ceph cluster reachable through CEPH_CONF=") && err.contains("ceph.conf"),
        "{err}"
    );
    assert!(!d.join("out").join("rbd.md").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn images_it_cannot_use_are_refused_before_the_cluster_is_asked() {
    let d = tmp("badimg");
    let conf = d.join("ceph.conf");
    std::fs::write(&conf, "[global]\nmon host = 127.0.0.1:1\n").expect("conf");
    for bad in ["rbd/ns/img", "rbd/img@snap", "img"] {
        let o = bench_rbd(
            Some(&conf),
            &["--image", bad],
            &d.join("out"),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{bad}: {err}");
        assert!(err.contains("want POOL/IMAGE"), "{bad}: {err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
