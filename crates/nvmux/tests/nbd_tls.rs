//! NBD over TLS against the real daemon with GnuTLS clients: qemu-img (`--object
//! tls-creds-psk` / `tls-creds-x509`) and nbdinfo (`nbds://` URIs) connect with a
//! pre-shared key and with X.509 certificates, and move data bit-exactly; plaintext, a
//! wrong key, an unknown identity and a missing client certificate are refused; TLS
//! settings are checked, shared per address, persisted and restored.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{fails, ok, pattern, psk_file, read_file_at, run, watchdog, x509, TestDaemon};
use nvmux_bench::attack::{nbd, time_to_close};
use serde_json::{json, Value};

fn port_of(v: &Value) -> u16 {
    v["listen"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("a bound port")
}

/// `qemu-img` with a TLS object and an NBD target as image options.
fn qemu_img(object: &str, args: &[&str]) -> Command {
    let mut c = Command::new("qemu-img");
    c.arg(args[0]).args(["--object", object]).args(&args[1..]);
    c
}

fn export_of(d: &TestDaemon, name: &str) -> Value {
    d.api
        .get("/v1/exports")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no export {name}"))
}

fn listener<'a>(v: &'a Value, address: &str) -> &'a Value {
    v["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["address"] == address))
        .unwrap_or_else(|| panic!("no listener {address} in {v}"))
}

#[test]
fn tls_psk_with_qemu_img_and_nbdinfo() {
    watchdog(240);
    let mut d = TestDaemon::start("nbd-tls-psk");
    d.file_disk("alpha", 32 << 20);
    let qdir = d.dir.join("qemu-psk");
    let psk = psk_file(&qdir, "alice");
    // Any address is allowed with TLS: this one listens on every interface.
    let v = d.nbd_export(json!({"disk": "alpha", "listen": "0.0.0.0:0", "tls": {"psk_file": psk}}));
    let port = port_of(&v);
    assert!(v["address"].as_str().unwrap().starts_with("nbds://"), "{v}");
    let uri = |user: &str, file: &Path| {
        format!(
            "nbds://{user}@127.0.0.1:{port}/alpha?tls-psk-file={}",
            file.display()
        )
    };
    // nbdinfo (libnbd, GnuTLS).
    let out = ok(Command::new("nbdinfo").arg(uri("alice", &psk)));
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("export-size: 33554432"), "{out}");
    // qemu-img in and out, bit-exact.
    let obj = format!(
        "tls-creds-psk,id=tls0,dir={},endpoint=client,username=alice",
        qdir.display()
    );
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=alpha,tls-creds=tls0"
    );
    let data = pattern(31, 8 << 20);
    let src = d.dir.join("src.raw");
    std::fs::write(&src, &data).unwrap();
    ok(qemu_img(&obj, &["convert", "-n", "--target-image-opts"])
        .arg(&src)
        .arg(&opts));
    assert!(read_file_at(&d.dir.join("alpha.img"), 0, 8 << 20) == data);
    let back = d.dir.join("back.raw");
    ok(qemu_img(&obj, &["convert", "-O", "raw", "--image-opts"])
        .arg(&opts)
        .arg(&back));
    let b = std::fs::read(&back).unwrap();
    assert_eq!(b.len(), 32 << 20);
    assert!(b[..8 << 20] == data[..], "qemu-img read back what it wrote");
    // Plaintext is refused: by the tools, and by the protocol (TLS_REQD for GO, the
    // session ended for EXPORT_NAME).
    fails(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/alpha")));
    let out = fails(
        Command::new("qemu-img")
            .args(["info", "--image-opts"])
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=alpha"
            )),
    );
    assert!(out.contains("TLS"), "{out}");
    let t = nbd::Target::Tcp(format!("127.0.0.1:{port}").parse().unwrap());
    let mut s = t.connect().unwrap();
    assert!(nbd::greeting(&mut s, std::time::Duration::from_secs(10)));
    std::io::Write::write_all(&mut s, &nbd::go_bytes("alpha")).unwrap();
    let (kind, msg) = nbd::option_reply(&mut s).unwrap();
    assert_eq!(kind, (1 << 31) + 5, "NBD_REP_ERR_TLS_REQD");
    assert!(String::from_utf8_lossy(&msg).contains("STARTTLS"));
    let mut s = t.connect().unwrap();
    assert!(nbd::greeting(&mut s, std::time::Duration::from_secs(10)));
    let mut v = 1u32.to_be_bytes().to_vec();
    v.extend(nbd::option(nbd::OPT_EXPORT_NAME, b"alpha"));
    std::io::Write::write_all(&mut s, &v).unwrap();
    assert!(time_to_close(&mut s, std::time::Duration::from_secs(10)).is_some());
    // A wrong key, and an identity the server does not know, are refused.
    let wrong = psk_file(&d.dir.join("wrong"), "alice");
    fails(Command::new("nbdinfo").arg(uri("alice", &wrong)));
    let bob = psk_file(&d.dir.join("bob"), "bob");
    fails(Command::new("nbdinfo").arg(uri("bob", &bob)));
    let wdir = d.dir.join("wrong");
    fails(
        qemu_img(
            &format!(
                "tls-creds-psk,id=tls0,dir={},endpoint=client,username=alice",
                wdir.display()
            ),
            &["info", "--image-opts"],
        )
        .arg(&opts),
    );
    // The client may exit before the listener has finished with its connection: wait
    // (up to 10 s) until the three refusals are counted.
    let t0 = std::time::Instant::now();
    let l = loop {
        let nv = d.api.get("/v1/nbd").unwrap();
        let l = listener(&nv, &format!("0.0.0.0:{port}")).clone();
        if l["tls_failures"].as_u64() >= Some(3) || t0.elapsed() > Duration::from_secs(10) {
            break l;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(l["tls_failures"].as_u64() >= Some(3), "{l}");
    assert_eq!(l["tls"]["psk_file"], json!(psk), "{l}");
    assert!(d.healthy());
    d.stop();
}

#[test]
fn tls_x509_with_and_without_client_certificates() {
    watchdog(240);
    let d = TestDaemon::start("nbd-tls-x509");
    d.file_disk("beta", 16 << 20);
    let pki = x509(&d.dir.join("pki"));
    // A Unix socket that requires a client certificate.
    let sock = d.dir.join("x509.sock");
    let v = d.nbd_export(json!({"disk": "beta", "socket": sock, "tls": {"x509_dir": pki.server, "verify_peer": true}}),
    );
    assert!(
        v["address"].as_str().unwrap().starts_with("nbds+unix://"),
        "{v}"
    );
    let uri = |certs: &Path| {
        format!(
            "nbds+unix:///beta?socket={}&tls-certificates={}",
            sock.display(),
            certs.display()
        )
    };
    let out = ok(Command::new("nbdinfo").arg("--size").arg(uri(&pki.client)));
    assert_eq!(out.trim(), (16u64 << 20).to_string());
    let obj = |dir: &Path| {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        )
    };
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=beta,tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    );
    let data = pattern(41, 4 << 20);
    let src = d.dir.join("src.raw");
    std::fs::write(&src, &data).unwrap();
    ok(
        qemu_img(&obj(&pki.client), &["convert", "-n", "--target-image-opts"])
            .arg(&src)
            .arg(&opts),
    );
    let back = d.dir.join("back.raw");
    ok(
        qemu_img(&obj(&pki.client), &["convert", "-O", "raw", "--image-opts"])
            .arg(&opts)
            .arg(&back),
    );
    assert!(std::fs::read(&back).unwrap()[..4 << 20] == data[..]);
    assert!(read_file_at(&d.dir.join("beta.img"), 0, 4 << 20) == data);
    // Without a client certificate: refused (TLS fails), by both tools.
    fails(Command::new("nbdinfo").arg(uri(&pki.ca_only)));
    fails(qemu_img(&obj(&pki.ca_only), &["info", "--image-opts"]).arg(&opts));
    // Plaintext: refused.
    fails(Command::new("nbdinfo").arg(format!("nbd+unix:///beta?socket={}", sock.display())));
    // On TCP without verify_peer, a client with the CA alone gets in (it checks the
    // server's certificate for 127.0.0.1).
    let v = d.nbd_export(json!({"disk": "beta", "name": "beta-tcp", "listen": "127.0.0.1:0", "tls": {"x509_dir": pki.server}}),
    );
    let port = port_of(&v);
    let out = ok(Command::new("nbdinfo").arg("--size").arg(format!(
        "nbds://127.0.0.1:{port}/beta-tcp?tls-certificates={}",
        pki.ca_only.display()
    )));
    assert_eq!(out.trim(), (16u64 << 20).to_string());
    // The connection log names the certificate's subject.
    assert!(d.log().contains("CN=client1"), "{}", d.log());
    d.stop();
}

#[test]
fn tls_settings_are_checked_shared_per_address_persisted_and_restored() {
    watchdog(240);
    let d = TestDaemon::start("nbd-tls-cfg");
    d.file_disk("gamma", 8 << 20);
    let psk = psk_file(&d.dir.join("psk"), "alice");
    let post = |b: Value| {
        let mut body = json!({"type": "nbd", "disk": "gamma"});
        for (k, v) in b.as_object().cloned().unwrap_or_default() {
            body[k] = v;
        }
        d.api.post("/v1/exports", &body)
    };
    let e = |b: Value| post(b).unwrap_err().to_string();
    // Non-loopback without TLS is refused; the message says how to get it.
    let m = e(json!({"name": "open", "listen": "0.0.0.0:0"}));
    assert!(m.contains("loopback") && m.contains("tls"), "{m}");
    // Settings that cannot work.
    let m = e(json!({"name": "x", "listen": "127.0.0.1:0", "tls": {}}));
    assert!(m.contains("exactly one of psk_file"), "{m}");
    let m = e(
        json!({"name": "x", "listen": "127.0.0.1:0", "tls": {"psk_file": psk, "verify_peer": true}}),
    );
    assert!(m.contains("verify_peer is for X.509"), "{m}");
    let m = e(
        json!({"name": "x", "listen": "127.0.0.1:0", "tls": {"psk_file": d.dir.join("nope.psk")}}),
    );
    assert!(m.contains("nope.psk"), "{m}");
    let loose = d.dir.join("loose.psk");
    std::fs::copy(&psk, &loose).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let m = e(json!({"name": "x", "listen": "127.0.0.1:0", "tls": {"psk_file": loose}}));
    assert!(m.contains("chmod o-rwx"), "{m}");
    let bad = d.dir.join("bad.psk");
    std::fs::write(&bad, "alice:0011\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let m = e(json!({"name": "x", "listen": "127.0.0.1:0", "tls": {"psk_file": bad}}));
    assert!(m.contains("bad.psk") && m.contains("line 1"), "{m}");
    let m = e(json!({"name": "x", "listen": "127.0.0.1:0", "tls": {"x509_dir": d.dir}}));
    assert!(m.contains("server-cert.pem"), "{m}");
    // Exports on one address share its TLS: a mismatch is refused, the same settings join.
    let sock = d.dir.join("shared.sock");
    post(json!({"name": "s1", "socket": sock, "tls": {"psk_file": psk}})).expect("s1");
    let m = e(json!({"name": "s2", "socket": sock}));
    assert!(m.contains("share its TLS settings"), "{m}");
    post(json!({"name": "s3", "socket": sock, "export_name": "third", "tls": {"psk_file": psk}}))
        .expect("s3 joins");
    let list = ok(Command::new("nbdinfo").arg("--list").arg(format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        sock.display(),
        psk.display()
    )));
    assert!(list.contains("s1") && list.contains("third"), "{list}");
    // The CLI takes the same settings.
    let (okd, out) = run(Command::new(env!("CARGO_BIN_EXE_nvmux"))
        .arg("--api")
        .arg(d.dir.join("nvmux.sock"))
        .args(["export", "add", "gamma", "--name", "cli", "--type", "nbd"])
        .args(["--listen", "127.0.0.1:0", "--tls-psk-file"])
        .arg(&psk));
    assert!(okd && out.contains("TLS-PSK required"), "{out}");
    // Persisted and restored: state.json holds the settings; after a restart the
    // listener requires TLS again.
    let state = std::fs::read_to_string(d.dir.join("state.json")).unwrap();
    assert!(state.contains("psk_file"), "{state}");
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let v = export_of(&d, "s1");
    assert_eq!(v["status"], "ok", "{v}");
    fails(Command::new("nbdinfo").arg(format!("nbd+unix:///s1?socket={}", sock.display())));
    ok(Command::new("nbdinfo").arg("--size").arg(format!(
        "nbds+unix://alice@/s1?socket={}&tls-psk-file={}",
        sock.display(),
        psk.display()
    )));
    // A credentials file gone at restart: that export comes up with an error status.
    std::fs::remove_file(&psk).unwrap();
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let s1 = export_of(&d, "s1");
    assert!(s1["status"].as_str().unwrap().contains("keys.psk"), "{s1}");
    d.stop();
}
