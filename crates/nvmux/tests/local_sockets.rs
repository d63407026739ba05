//! Local sockets against the real daemon, with clients running as other users (through
//! `setpriv`): the API socket's mode and peer-credential allow-list, and export sockets
//! created with an owner and a mode (vhost-user-blk with a libblkio client, NBD with
//! nbdinfo), a planted symlink that is replaced and not followed, and a restart that
//! brings owner and mode back. Needs root (to run clients as other users); skipped
//! otherwise.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{unique_dir, watchdog, TestDaemon};
use serde_json::{json, Value};

const NOBODY: u32 = 65534;
/// A user and group with no passwd entry: "another unprivileged user".
const STRANGER: u32 = 12345;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A test directory every user may traverse (the sockets inside carry the policy).
fn open_dir(tag: &str) -> PathBuf {
    let d = unique_dir(tag);
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// `prog args...` as `uid`/`gid` with exactly the supplementary `groups`.
fn as_user(uid: u32, gid: u32, groups: &[u32], prog: &str, args: &[&str]) -> (bool, String) {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.arg(format!("--groups={}", g.join(",")));
    }
    let o = c
        .arg("--")
        .arg(prog)
        .args(args)
        .output()
        .expect("run setpriv (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn nvmux_as(uid: u32, api: &Path, args: &[&str]) -> (bool, String) {
    let api = api.to_str().unwrap();
    let mut a = vec!["--api", api];
    a.extend_from_slice(args);
    as_user(uid, uid, &[], env!("CARGO_BIN_EXE_nvmux"), &a)
}

fn mode_of(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    assert!(m.file_type().is_socket(), "{} is not a socket", p.display());
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

fn start_with_config(dir: PathBuf, toml: &str) -> TestDaemon {
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, toml).unwrap();
    TestDaemon::start_with(dir, &["--config", cfg.to_str().unwrap()])
}

#[test]
fn api_socket_refuses_nobody_unless_allowed() {
    if !root() {
        eprintln!("skipped: needs root to run clients as other users");
        return;
    }
    watchdog(120);

    // Default: mode 0600, owned by the daemon's user; the file mode alone refuses nobody.
    let d = TestDaemon::start_in(open_dir("api-default"));
    let api = d.dir.join("nvmux.sock");
    assert_eq!(mode_of(&api), (0o600, 0, 0));
    let (ok, out) = nvmux_as(NOBODY, &api, &["disk", "list"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("permission denied connecting to the nvmux API socket")
            && out.contains("mode 0600")
            && out.contains("uid 65534"),
        "{out}"
    );
    d.stop();

    // Mode 0666 lets anyone connect: the peer-credential check refuses nobody, before
    // its request is read (the disk is not created).
    let d = start_with_config(open_dir("api-0666"), "[api]\nmode = \"0666\"\n");
    let api = d.dir.join("nvmux.sock");
    assert_eq!(mode_of(&api).0, 0o666);
    let (ok, out) = nvmux_as(
        NOBODY,
        &api,
        &[
            "disk",
            "create",
            "evil",
            "--backend",
            "null",
            "--size",
            "1M",
        ],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("refused this client")
            && out.contains("uid 65534")
            && out.contains("allow_uids"),
        "{out}"
    );
    let (ok, out) = as_user(
        NOBODY,
        NOBODY,
        &[],
        "curl",
        &[
            "-sS",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            api.to_str().unwrap(),
            "-X",
            "POST",
            "-d",
            r#"{"name":"evil2","backend":"null","size":1048576}"#,
            "http://localhost/v1/disks",
        ],
    );
    assert!(ok, "{out}");
    let (body, code) = out.trim_end().rsplit_once('\n').expect("body and code");
    assert_eq!(code, "403", "{out}");
    let v: Value = serde_json::from_str(body).expect("a JSON error");
    assert_eq!(v["kind"], "permission_denied");
    assert!(v["error"].as_str().unwrap().contains("uid 65534"), "{v}");
    assert!(d
        .api
        .get("/v1/disks")
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    // One log line per refusal, with the peer's pid, uid and gid (the log may be coloured).
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("API connection refused")
            && l.contains("pid")
            && l.contains("65534")),
        "{log}"
    );
    // Root (the daemon's user) is still served.
    assert!(d.api.get("/v1/health").is_ok());
    d.stop();

    // Allowed by uid: served.
    let d = start_with_config(
        open_dir("api-allow"),
        "[api]\nmode = \"0666\"\nallow_uids = [65534]\n",
    );
    let api = d.dir.join("nvmux.sock");
    let (ok, out) = nvmux_as(
        NOBODY,
        &api,
        &["disk", "create", "nb", "--backend", "null", "--size", "1M"],
    );
    assert!(ok, "{out}");
    assert_eq!(d.api.get("/v1/disks/nb").unwrap()["name"], "nb");
    d.stop();

    // A group: mode 0660 and group ownership; a member through a supplementary group is
    // served (SO_PEERGROUPS), a non-member cannot even connect.
    let d = start_with_config(open_dir("api-group"), "[api]\ngroup = \"nogroup\"\n");
    let api = d.dir.join("nvmux.sock");
    assert_eq!(mode_of(&api), (0o660, 0, NOBODY));
    let a = api.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_nvmux");
    let (ok, out) = as_user(
        STRANGER,
        STRANGER,
        &[NOBODY],
        bin,
        &["--api", a, "disk", "list"],
    );
    assert!(ok, "{out}");
    let (ok, out) = as_user(STRANGER, STRANGER, &[], bin, &["--api", a, "disk", "list"]);
    assert!(!ok && out.contains("permission denied connecting"), "{out}");
    d.stop();
}

/// `nvmux bench --socket` (libblkio, a real vhost-user client) as `uid`, briefly.
fn blkio_as(uid: u32, groups: &[u32], sock: &Path) -> (bool, String) {
    as_user(
        uid,
        uid,
        groups,
        "timeout",
        &[
            "60",
            env!("CARGO_BIN_EXE_nvmux"),
            "bench",
            "--socket",
            sock.to_str().unwrap(),
            "--seconds",
            "1",
            "--only",
            "randread QD1",
        ],
    )
}

fn nbdinfo_as(uid: u32, groups: &[u32], sock: &Path, name: &str) -> (bool, String) {
    let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
    as_user(uid, uid, groups, "nbdinfo", &["--size", &uri])
}

#[test]
fn export_sockets_take_owner_and_mode_and_keep_them_across_restart() {
    if !root() {
        eprintln!("skipped: needs root to run clients as other users");
        return;
    }
    watchdog(240);
    let dir = open_dir("export-owner");
    let d = TestDaemon::start_in(dir.clone());
    for n in ["v", "n"] {
        d.api
            .post(
                "/v1/disks",
                &json!({"name": n, "backend": "memory", "size": 16 << 20}),
            )
            .expect("disk");
    }

    // vhost-user-blk given to nobody: 0600 nobody:root. nobody's libblkio client is
    // served; another unprivileged user is refused by the mode.
    let vsock = dir.join("v.sock");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvmux"))
        .args(["--api", dir.join("nvmux.sock").to_str().unwrap()])
        .args(["export", "add", "v", "--socket", vsock.to_str().unwrap()])
        .args(["--owner", "nobody"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("socket owner nobody, mode 0600"), "{text}");
    assert_eq!(mode_of(&vsock), (0o600, NOBODY, 0));
    let (ok, out) = blkio_as(NOBODY, &[], &vsock);
    assert!(ok && out.contains("IOPS"), "{out}");
    let (ok, out) = blkio_as(STRANGER, &[], &vsock);
    assert!(!ok, "{out}");
    assert!(
        out.contains("Permission denied") || out.contains("permission denied"),
        "{out}"
    );

    // NBD given to nobody:nogroup: 0660 by default, so a member of the group may connect.
    let nsock = dir.join("n.sock");
    let v = d
        .api
        .post(
            "/v1/exports",
            &json!({"disk": "n", "type": "nbd", "socket": nsock, "owner": "nobody:nogroup"}),
        )
        .expect("nbd export");
    assert_eq!(
        (v["owner"].as_str(), v["mode"].as_str()),
        (Some("nobody:nogroup"), Some("0660"))
    );
    assert_eq!(mode_of(&nsock), (0o660, NOBODY, NOBODY));
    let (ok, out) = nbdinfo_as(NOBODY, &[], &nsock, "n");
    assert!(ok && out.trim() == (16u64 << 20).to_string(), "{out}");
    let (ok, out) = nbdinfo_as(STRANGER, &[NOBODY], &nsock, "n");
    assert!(ok, "group member: {out}");
    let (ok, out) = nbdinfo_as(STRANGER, &[], &nsock, "n");
    assert!(!ok, "{out}");
    // A second export on the shared socket keeps its owner and mode; other ones are refused.
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"name": "n2", "disk": "n", "type": "nbd", "socket": nsock, "export_name": "n2", "mode": "0600"}),
        )
        .unwrap_err();
    assert_eq!(e.status, 400, "{e}");
    let v = d
        .api
        .post(
            "/v1/exports",
            &json!({"name": "n2", "disk": "n", "type": "nbd", "socket": nsock, "export_name": "n2"}),
        )
        .expect("second export on the socket");
    assert_eq!(v["mode"], "0660");
    // Owner and mode are for Unix sockets; names are checked.
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"name": "t", "disk": "n", "type": "nbd", "listen": "127.0.0.1:0", "owner": "nobody"}),
        )
        .unwrap_err();
    assert_eq!(e.status, 400, "{e}");
    for (owner, mode) in [("no-such-user-nvmux", "0600"), ("nobody", "0999")] {
        let e = d
            .api
            .post(
                "/v1/exports",
                &json!({"name": "x", "disk": "n", "type": "nbd", "socket": dir.join("x.sock"), "owner": owner, "mode": mode}),
            )
            .unwrap_err();
        assert!(e.message.contains(owner) || e.message.contains(mode), "{e}");
    }
    assert!(!dir.join("x.sock").exists());

    // A symlink planted at the socket path is replaced, not followed.
    let victim = dir.join("victim");
    std::fs::write(&victim, b"do not touch").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let lsock = dir.join("l.sock");
    std::os::unix::fs::symlink(&victim, &lsock).unwrap();
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "l", "backend": "memory", "size": 8 << 20}),
        )
        .unwrap();
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": "l", "socket": lsock, "owner": "nobody", "mode": "0600"}),
        )
        .expect("export over a symlink");
    assert_eq!(mode_of(&lsock), (0o600, NOBODY, 0));
    let vm = std::fs::metadata(&victim).unwrap();
    assert_eq!(
        (vm.permissions().mode() & 0o7777, vm.uid(), vm.gid()),
        (0o644, 0, 0)
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
    // A regular file is still refused.
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"name": "f", "disk": "l", "socket": victim}),
        )
        .unwrap_err();
    assert_eq!(e.status, 409, "{e}");
    // No private bind directories are left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".nvmux-bind-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The external-function socket uses the same function.
    let fsock = dir.join("fn.sock");
    let v = d
        .api
        .post(
            "/v1/disks/v/external",
            &json!({"socket": fsock, "owner": "nobody", "mode": "0600"}),
        )
        .expect("external");
    assert_eq!(v["external"]["mode"], "0600");
    assert_eq!(mode_of(&fsock), (0o600, NOBODY, 0));

    // Restart: state.json brings every socket back with its owner and mode.
    d.stop();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    let ex = state["exports"].as_array().unwrap();
    assert!(
        ex.iter()
            .any(|e| e["name"] == "v" && e["owner"] == "nobody" && e["mode"] == "0600"),
        "{state}"
    );
    for p in [&vsock, &nsock, &lsock, &fsock] {
        assert!(!p.exists(), "{} left after stop", p.display());
    }
    let d = TestDaemon::start_in(dir.clone());
    assert_eq!(mode_of(&vsock), (0o600, NOBODY, 0));
    assert_eq!(mode_of(&nsock), (0o660, NOBODY, NOBODY));
    assert_eq!(mode_of(&lsock), (0o600, NOBODY, 0));
    assert_eq!(mode_of(&fsock), (0o600, NOBODY, 0));
    let list = d.api.get("/v1/exports").unwrap();
    let v = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "v")
        .unwrap();
    assert_eq!(
        (v["owner"].as_str(), v["mode"].as_str()),
        (Some("nobody"), Some("0600"))
    );
    let (ok, out) = blkio_as(NOBODY, &[], &vsock);
    assert!(ok && out.contains("IOPS"), "after restart: {out}");
    let (ok, out) = nbdinfo_as(NOBODY, &[], &nsock, "n2");
    assert!(ok, "after restart: {out}");
    d.stop();
}
