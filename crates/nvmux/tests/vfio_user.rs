//! vfio-user exports through the real daemon and its CLI: create (API and `nvmux export
//! add --type vfio-user`), the view and metrics, persistence across a restart, delete;
//! socket checks and bad arguments; and hostile clients on the socket (garbage, a huge
//! header, a silent client) that lose their own connection while the daemon and another
//! export serve on. The protocol and the controller have their own tests in
//! `nvmux-vfiouser`; the guest side is `tests/vm/vfio-user-nvme.sh`.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{fails, ok, watchdog, TestDaemon};
use nvmux_vfiouser::proto;
use serde_json::{json, Value};

fn vfio_export(d: &TestDaemon, body: Value) -> Result<Value, String> {
    let mut b = json!({"type": "vfio-user"});
    for (k, v) in body.as_object().cloned().unwrap_or_default() {
        b[k] = v;
    }
    d.api.post("/v1/exports", &b).map_err(|e| e.to_string())
}

fn export_named(d: &TestDaemon, name: &str) -> Value {
    let v = d.api.get("/v1/exports").expect("list exports");
    v.as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no export {name} in {v}"))
}

fn metrics(d: &TestDaemon) -> String {
    d.api.call_raw("GET", "/metrics", None).expect("metrics").1
}

fn nvmux(d: &TestDaemon) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvmux"));
    c.arg("--api").arg(d.dir.join("nvmux.sock"));
    c
}

fn mode(p: &Path) -> u32 {
    let m = std::fs::symlink_metadata(p).expect("socket");
    assert!(m.file_type().is_socket(), "{} is not a socket", p.display());
    m.permissions().mode() & 0o7777
}

/// A VERSION request as QEMU sends it (protocol 0.0, a few capabilities).
fn version_request(id: u16) -> Vec<u8> {
    let mut body = vec![0u8, 0, 0, 0];
    body.extend_from_slice(br#"{"capabilities":{"max_msg_fds":16,"pgsizes":4096}}"#);
    body.push(0);
    proto::request(id, proto::cmd::VERSION, proto::TYPE_REQUEST, &body)
}

/// Connect, negotiate the version, and return the reply's header fields (id, command,
/// flags), with the connection still open.
fn handshake(sock: &Path) -> (UnixStream, u16, u16, u32) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&version_request(7)).expect("send VERSION");
    let mut h = [0u8; proto::HDR];
    s.read_exact(&mut h).expect("VERSION reply header");
    let id = u16::from_le_bytes([h[0], h[1]]);
    let cmd = u16::from_le_bytes([h[2], h[3]]);
    let size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let flags = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    assert!(
        (proto::HDR..=proto::HDR + proto::MAX_CAPS_JSON + 4).contains(&size),
        "reply size {size}"
    );
    let mut body = vec![0u8; size - proto::HDR];
    s.read_exact(&mut body).expect("VERSION reply body");
    (s, id, cmd, flags)
}

/// True once the server closed `s` (read returns 0 or a reset) within `secs`.
fn closed_by_server(s: &mut UnixStream, secs: u64) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_secs(secs) {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an error reply first is fine
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn create_view_metrics_persist_restore_delete() {
    watchdog(120);
    let d = TestDaemon::start("vfu-life");
    d.file_disk("d1", 64 << 20);
    d.file_disk("d2", 32 << 20);
    let s1 = d.dir.join("d1.vfu");
    let v = vfio_export(
        &d,
        json!({"disk": "d1", "socket": s1, "num_queues": 2, "mode": "0660"}),
    )
    .expect("create vfio-user export");
    assert_eq!(v["type"], "vfio-user", "{v}");
    assert_eq!(v["name"], "d1");
    assert_eq!(v["num_queues"], 2);
    assert_eq!(v["mode"], "0660");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["connected"], false);
    assert_eq!(v["address"], s1.to_str().unwrap());
    assert_eq!(v["vfio_user"]["io_queues_max"], 2, "{v}");
    assert_eq!(v["vfio_user"]["sessions_total"], 0, "{v}");
    assert!(
        v["guest_memory"].is_null() && v["migration"].is_null(),
        "{v}"
    );
    assert_eq!(mode(&s1), 0o660);

    // The CLI, with the default queue count.
    let s2 = d.dir.join("d2.vfu");
    let out = ok(nvmux(&d)
        .args(["export", "add", "d2", "--type", "vfio-user", "--socket"])
        .arg(&s2));
    assert!(
        out.contains("as vfio-user on") && out.contains("(4 queues)"),
        "{out}"
    );
    assert_eq!(export_named(&d, "d2")["num_queues"], 4);
    assert_eq!(mode(&s2), 0o600);
    let list = ok(nvmux(&d).args(["export", "list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("d2 ") && l.contains("vfio-user") && l.contains(" 4 ")),
        "{list}"
    );

    // A client connects: the view and the metrics show it.
    let (conn, id, cmd, flags) = handshake(&s1);
    assert_eq!((id, cmd), (7, proto::cmd::VERSION));
    assert_eq!(flags & proto::FLAG_TYPE_MASK, proto::TYPE_REPLY);
    assert_eq!(flags & proto::FLAG_ERROR, 0, "VERSION refused");
    wait_until(10, "the export shows its client", || {
        export_named(&d, "d1")["connected"] == true
    });
    let m = metrics(&d);
    for line in [
        "nvmux_vfio_user_connected{export=\"d1\",disk=\"d1\"} 1",
        "nvmux_vfio_user_connected{export=\"d2\",disk=\"d2\"} 0",
        "nvmux_vfio_user_sessions_total{export=\"d1\",disk=\"d1\"} ",
        "nvmux_vfio_user_bad_prps_total{export=\"d1\",disk=\"d1\"} 0",
        "# TYPE nvmux_vfio_user_io_commands_total counter",
    ] {
        assert!(m.contains(line), "metrics lack {line:?}:\n{m}");
    }
    drop(conn);
    wait_until(10, "the export sees its client go", || {
        let e = export_named(&d, "d1");
        e["connected"] == false && e["vfio_user"]["sessions_total"] == 1
    });

    // Persisted, restored at start with socket, queues and mode.
    let state = std::fs::read_to_string(d.dir.join("state.json")).expect("state.json");
    let st: Value = serde_json::from_str(&state).unwrap();
    let kinds: Vec<&Value> = st["exports"].as_array().unwrap().iter().collect();
    assert!(
        kinds.iter().any(|e| e["type"] == "vfio-user"
            && e["name"] == "d1"
            && e["num_queues"] == 2
            && e["socket"] == s1.to_str().unwrap()),
        "{state}"
    );
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let e = export_named(&d, "d1");
    assert_eq!(e["status"], "ok", "{e}");
    assert_eq!(e["type"], "vfio-user");
    assert_eq!(e["num_queues"], 2);
    assert_eq!(mode(&s1), 0o660);
    let (conn, _, _, flags) = handshake(&s1);
    assert_eq!(flags & proto::FLAG_ERROR, 0);
    drop(conn);
    assert_eq!(export_named(&d, "d2")["status"], "ok");

    // Delete: the socket goes, and so does the state entry.
    d.api.delete("/v1/exports/d1").expect("delete");
    assert!(!s1.exists(), "socket left behind");
    ok(nvmux(&d).args(["export", "remove", "d2"]));
    assert!(!s2.exists(), "socket left behind");
    let state = std::fs::read_to_string(d.dir.join("state.json")).unwrap();
    assert!(!state.contains("vfio-user"), "{state}");
    assert!(!d.log().contains("panicked"), "{}", d.log());
    d.stop();
}

#[test]
fn bad_arguments_and_sockets_are_refused_clearly() {
    watchdog(120);
    let d = TestDaemon::start("vfu-bad");
    d.file_disk("d1", 16 << 20);
    let (_, vsock) = d.disk_and_export("v1", 16 << 20, 1, json!({}));
    let sock = d.dir.join("d1.vfu");
    let refused = |body: Value, want: &str| {
        let e = vfio_export(&d, body.clone()).expect_err("must be refused");
        assert!(e.contains(want), "{body}: {e:?} lacks {want:?}");
        assert!(!sock.exists(), "a refused export left its socket");
    };
    refused(
        json!({"disk": "d1", "socket": sock, "num_queues": 0}),
        "num_queues 0 is out of range: a vfio-user export offers 1 to 64",
    );
    refused(
        json!({"disk": "d1", "socket": sock, "num_queues": 65}),
        "num_queues 65 is out of range",
    );
    refused(json!({"disk": "d1"}), "a vfio-user export needs a socket");
    refused(
        json!({"disk": "d1", "socket": d.dir.join("nvmux.sock")}),
        "is the API socket",
    );
    let e = vfio_export(&d, json!({"disk": "d1", "socket": vsock})).unwrap_err();
    // Another export's live socket (checked as for vhost-user: a live server first).
    assert!(e.contains("is in use by a running server"), "{e}");
    let file = d.dir.join("plain-file");
    std::fs::write(&file, b"data").unwrap();
    let e = vfio_export(&d, json!({"disk": "d1", "socket": file})).unwrap_err();
    assert!(e.contains("exists and is not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    refused(
        json!({"disk": "d1", "socket": sock, "listen": "127.0.0.1:0"}),
        "are for nbd exports",
    );
    refused(
        json!({"disk": "d1", "socket": sock, "read_only": true}),
        "read-only when its disk is",
    );
    refused(
        json!({"disk": "d1", "socket": sock, "migration_peer": "v1"}),
        "migration_peer for vhost-user-blk",
    );
    refused(
        json!({"disk": "nope", "socket": sock}),
        "disk \"nope\" does not exist",
    );
    refused(
        json!({"disk": "d1", "socket": sock, "mode": "9999"}),
        "mode",
    );
    // A vhost-user-blk export may not pair with a vfio-user export.
    vfio_export(&d, json!({"disk": "d1", "socket": sock, "name": "f1"})).expect("create");
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"name": "v2", "disk": "d1", "socket": d.dir.join("v2.sock"), "migration_peer": "f1"}),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("must be a vhost-user-blk export") && e.contains("vfio-user"),
        "{e}"
    );
    // The CLI passes the errors on and exits non-zero.
    let out = fails(
        nvmux(&d)
            .args(["export", "add", "d1", "--name", "f2", "--type", "vfio-user"])
            .args(["--queues", "65", "--socket"])
            .arg(d.dir.join("f2.vfu")),
    );
    assert!(out.contains("num_queues 65 is out of range"), "{out}");
    let out = fails(nvmux(&d).args([
        "export", "add", "d1", "--type", "vfio-usr", "--socket", "/tmp/x",
    ]));
    assert!(
        out.contains("use vhost-user-blk, nbd or vfio-user"),
        "{out}"
    );
    // Nothing refused reached state.json.
    let state = std::fs::read_to_string(d.dir.join("state.json")).unwrap();
    assert_eq!(state.matches("\"vfio-user\"").count(), 1, "{state}");
    d.stop();
}

#[test]
fn hostile_clients_lose_their_connection_only() {
    watchdog(120);
    let mut d = TestDaemon::start("vfu-hostile");
    d.file_disk("a", 16 << 20);
    d.file_disk("b", 16 << 20);
    let sa = d.dir.join("a.vfu");
    let sb = d.dir.join("b.vfu");
    vfio_export(&d, json!({"disk": "a", "socket": sa})).expect("export a");
    vfio_export(&d, json!({"disk": "b", "socket": sb})).expect("export b");
    // Export b has a client throughout.
    let (mut keep, ..) = handshake(&sb);

    // 1. Garbage bytes.
    let mut s = UnixStream::connect(&sa).unwrap();
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&junk);
    assert!(closed_by_server(&mut s, 10), "garbage: connection kept");
    // 2. A header announcing a 4 GiB message: refused before anything is reserved.
    let mut s = UnixStream::connect(&sa).unwrap();
    let mut h = proto::request(1, proto::cmd::DMA_MAP, 0, &[]);
    h[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let _ = s.write_all(&h);
    assert!(closed_by_server(&mut s, 10), "huge header: connection kept");
    // 3. A reply where a request belongs, and a VERSION of a later major.
    let mut s = UnixStream::connect(&sa).unwrap();
    let mut body = vec![9u8, 0, 0, 0];
    body.extend_from_slice(b"{}\0");
    let _ = s.write_all(&proto::request(
        2,
        proto::cmd::VERSION,
        proto::TYPE_REQUEST,
        &body,
    ));
    assert!(closed_by_server(&mut s, 10), "bad version: connection kept");
    // 4. A client that connects and goes away without a word.
    drop(UnixStream::connect(&sa).unwrap());

    // The daemon serves on: a proper client gets its VERSION on a, b's client is intact.
    assert!(d.healthy(), "daemon died: {}", d.log());
    let (c, _, _, flags) = handshake(&sa);
    assert_eq!(flags & proto::FLAG_ERROR, 0);
    drop(c);
    keep.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut one = [0u8; 1];
    match keep.read(&mut one) {
        Ok(0) => panic!("export b's client was disconnected"),
        Ok(_) => panic!("export b's client got an unasked message"),
        Err(_) => {}
    }
    assert_eq!(export_named(&d, "b")["connected"], true);
    let a = export_named(&d, "a");
    assert!(
        a["vfio_user"]["sessions_failed"].as_u64().unwrap_or(0) >= 2,
        "protocol errors not counted: {a}"
    );
    assert!(!d.log().contains("panicked"), "{}", d.log());
    drop(keep);
    d.stop();
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn resize_reaches_the_export_and_upgrade_recreates_it() {
    watchdog(240);
    let d = TestDaemon::start("vfu-upgrade");
    d.pool("p", 256 << 20);
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "t", "pool": "p", "size": 32 << 20}),
        )
        .expect("pool disk");
    let sock = d.dir.join("t.vfu");
    vfio_export(&d, json!({"disk": "t", "socket": sock, "mode": "0660"})).expect("export");
    // A resize tells the controller (the guest side is the VM test's).
    let v = d
        .api
        .post("/v1/disks/t/resize", &json!({"size": 48 << 20}))
        .expect("resize");
    assert_eq!(v["size"], 48 << 20, "{v}");
    wait_until(5, "the resize is logged for the export", || {
        d.log()
            .contains("vfio-user controller told of the new size")
    });

    // Upgrade with a client connected: its connection is closed (no session takeover),
    // the new process serves the export again on the same path with the same mode.
    let (mut conn, ..) = handshake(&sock);
    let bin = d.dir.join("nvmux-next");
    std::fs::copy(env!("CARGO_BIN_EXE_nvmux"), &bin).expect("copy the binary");
    let v = d
        .api
        .post("/v1/upgrade", &json!({"binary": bin}))
        .unwrap_or_else(|e| panic!("upgrade: {e}\n{}", d.log()));
    let pid = v["pid"].as_u64().expect("pid") as u32;
    assert_eq!(v["sessions"], 0, "{v}");
    assert_eq!(v["closed_connections"], 1, "the vfio-user client: {v}");
    assert!(
        closed_by_server(&mut conn, 10),
        "the old connection is still open"
    );
    assert!(
        d.log().contains("a vfio-user session is not handed over"),
        "{}",
        d.log()
    );
    let e = export_named(&d, "t");
    assert_eq!(e["status"], "ok", "{e}");
    assert_eq!(e["vfio_user"]["sessions_total"], 0, "a new export: {e}");
    assert_eq!(mode(&sock), 0o660);
    let (c, _, _, flags) = handshake(&sock);
    assert_eq!(flags & proto::FLAG_ERROR, 0);
    drop(c);
    // SAFETY: signalling the upgraded daemon this test started (indirectly).
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "pid {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.wait_killed();
}
