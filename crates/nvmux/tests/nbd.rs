//! NBD exports against the real daemon with real clients: nbdinfo, qemu-img, nbdcopy and
//! fio's nbd engine, plus a raw client written here for what the tools never send (writes
//! to a read-only export, malformed negotiations), each of which may end only its own
//! connection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{ok, pattern, read_file_at, run, watchdog, TestDaemon};
use serde_json::{json, Value};

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Two disks of different sizes on one NBD socket, plus a read-only export of the first.
fn setup(tag: &str) -> (TestDaemon, PathBuf) {
    let d = TestDaemon::start(tag);
    for (n, size) in [("alpha", 32u64 << 20), ("beta", 48 << 20)] {
        d.file_disk(n, size);
    }
    let sock = d.dir.join("nbd.sock");
    d.nbd_export(json!({"disk": "alpha", "socket": sock}));
    d.nbd_export(json!({"disk": "beta", "socket": sock}));
    d.nbd_export(json!({"disk": "alpha", "socket": sock, "name": "alpha-ro", "read_only": true}));
    (d, sock)
}

#[test]
fn nbdinfo_lists_the_exports_with_their_sizes() {
    watchdog(120);
    let (d, sock) = setup("nbd-info");
    let out = ok(Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(uri(&sock, "")));
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}: {out}"));
    let mut seen: Vec<(String, u64, bool)> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap_or("").to_string(),
                e["export-size"].as_u64().unwrap_or(0),
                e["is_read_only"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("alpha".into(), 32 << 20, false),
            ("alpha-ro".into(), 32 << 20, true),
            ("beta".into(), 48 << 20, false)
        ]
    );
    // One export by name, with its block sizes.
    let out = ok(Command::new("nbdinfo")
        .arg("--json")
        .arg(uri(&sock, "beta")));
    let v: Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(48 << 20));
    assert_eq!(e["block_size_minimum"].as_u64(), Some(512));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20));
    assert_eq!(e["can_trim"], true);
    assert_eq!(v["protocol"], "newstyle-fixed");
    // The TCP listener: loopback only, port 0 becomes the bound port.
    let v = d.nbd_export(json!({"disk": "beta", "listen": "127.0.0.1:0", "name": "beta-tcp"}));
    let listen = v["listen"].as_str().expect("bound address").to_string();
    assert!(!listen.ends_with(":0"), "{v}");
    let out = ok(Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd://{listen}/beta-tcp")));
    assert_eq!(out.trim(), (48u64 << 20).to_string());
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"disk": "beta", "type": "nbd", "listen": "0.0.0.0:10809", "name": "open"}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("loopback"), "{e}");
    d.stop();
}

#[test]
fn qemu_img_and_nbdcopy_move_images_in_and_out_bit_exactly() {
    watchdog(240);
    let (d, sock) = setup("nbd-copy");
    let src = d.dir.join("src.raw");
    let data = pattern(7, 32 << 20);
    std::fs::write(&src, &data).unwrap();
    // qemu-img in (from a qcow2 made of the raw image) and out.
    let qcow = d.dir.join("src.qcow2");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&src)
        .arg(&qcow));
    ok(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow)
        .arg(uri(&sock, "alpha")));
    assert!(
        read_file_at(&d.dir.join("alpha.img"), 0, 32 << 20) == data,
        "the disk holds the image"
    );
    let back = d.dir.join("back.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri(&sock, "alpha"))
        .arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "qemu-img out is bit-exact"
    );
    // nbdcopy: disk to disk over NBD, and out to a file.
    ok(Command::new("nbdcopy")
        .arg(uri(&sock, "alpha"))
        .arg(uri(&sock, "beta")));
    let out = d.dir.join("nbdcopy.raw");
    ok(Command::new("nbdcopy").arg(uri(&sock, "beta")).arg(&out));
    let b = std::fs::read(&out).unwrap();
    assert_eq!(b.len(), 48 << 20);
    assert!(b[..32 << 20] == data[..], "nbdcopy copied the data");
    d.stop();
}

#[test]
fn fio_verifies_and_two_clients_on_two_exports_do_not_interfere() {
    watchdog(240);
    let (d, sock) = setup("nbd-fio");
    let fio = |name: &str, seed: &str, bs: &str| {
        let mut c = Command::new("fio");
        c.args([
            "--name=v",
            "--ioengine=nbd",
            "--rw=randwrite",
            bs,
            "--size=16M",
            "--iodepth=16",
        ])
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--minimal",
        ])
        .arg(format!("--randseed={seed}"))
        .arg(format!("--uri={}", uri(&sock, name)))
        .stdout(std::process::Stdio::piped());
        c.spawn().expect("fio")
    };
    // Both at once, on different exports (different disks), with different data: 4 KiB
    // blocks on one, 16 KiB to 1 MiB on the other (reads sent from their buffers).
    let (a, b) = (
        fio("alpha", "1", "--bs=4k"),
        fio("beta", "2", "--bsrange=16k-1m"),
    );
    for (n, c) in [("alpha", a), ("beta", b)] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "fio verify on {n} failed");
    }
    // And a raw check that one export's writes do not reach the other.
    let mut x = Client::go(&sock, "alpha");
    let mut y = Client::go(&sock, "beta");
    let pa = pattern(11, 4096);
    let pb = pattern(12, 4096);
    assert_eq!(x.write(1 << 20, &pa), 0);
    assert_eq!(y.write(1 << 20, &pb), 0);
    assert_eq!(x.read(1 << 20, 4096), (0, pa));
    assert_eq!(y.read(1 << 20, 4096), (0, pb));
    d.stop();
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    watchdog(120);
    let (d, sock) = setup("nbd-ro");
    // fio through libnbd.
    let (okd, out) = run(Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            "--rw=write",
            "--bs=4k",
            "--size=1M",
        ])
        .arg(format!("--uri={}", uri(&sock, "alpha-ro"))));
    assert!(!okd && out.contains("Operation not permitted"), "{out}");
    // The server itself refuses, also for a client that ignores the read-only flag.
    let mut c = Client::go(&sock, "alpha-ro");
    assert_eq!(c.write(0, &[1u8; 4096]), 1, "EPERM");
    assert_eq!(c.trim(0, 4096), 1, "EPERM");
    assert_eq!(c.read(0, 512).0, 0, "reads work");
    assert_eq!(
        read_file_at(&d.dir.join("alpha.img"), 0, 4096),
        vec![0u8; 4096]
    );
    d.stop();
}

#[test]
fn malformed_negotiations_and_requests_end_only_their_own_connection() {
    watchdog(120);
    let (d, sock) = setup("nbd-bad");
    let mut good = Client::go(&sock, "alpha");
    assert_eq!(good.write(0, &pattern(1, 4096)), 0);
    let flags = 3u32.to_be_bytes();
    let opt = |o: u32, len: u32| {
        let mut v = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no fixed-newstyle flag", vec![0, 0, 0, 0]),
        (
            "unknown client flags",
            0xffff_ffffu32.to_be_bytes().to_vec(),
        ),
        (
            "option without IHAVEOPT",
            [flags.to_vec(), vec![0x55; 16]].concat(),
        ),
        (
            "absurd option length",
            [flags.to_vec(), opt(7, 0x7fff_ffff)].concat(),
        ),
        (
            "truncated option",
            [flags.to_vec(), opt(7, 100), vec![0; 10]].concat(),
        ),
        (
            "export name that does not exist",
            [flags.to_vec(), opt(1, 4), b"nope".to_vec()].concat(),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // the server closes: EOF, not a hang
                                          // The good connection keeps working after each.
        assert_eq!(good.read(0, 4096), (0, pattern(1, 4096)), "after: {what}");
    }
    // A bad request magic after a successful GO ends that connection only.
    let mut bad = Client::go(&sock, "beta");
    bad.s.write_all(&[0xab; 28]).unwrap();
    let mut rest = Vec::new();
    let _ = bad.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing answers a broken stream");
    // A write larger than the maximum block size: the stream cannot be trusted; closed.
    let mut big = Client::go(&sock, "beta");
    big.send_req(1, 0, 7, 0, 64 << 20);
    let mut rest = Vec::new();
    let _ = big.s.read_to_end(&mut rest);
    // Out of range and unaligned requests get errors, and the connection stays.
    assert_eq!(good.read(64 << 20, 512).0, 22, "EINVAL past the end");
    assert_eq!(good.write(64 << 20, &[0; 512]), 28, "ENOSPC past the end");
    assert_eq!(good.read(100, 512).0, 22, "EINVAL unaligned");
    assert_eq!(good.read(0, 4096), (0, pattern(1, 4096)));
    // NBD_OPT_STARTTLS is refused with a policy error and the negotiation goes on.
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&flags).unwrap();
    s.write_all(&opt(5, 0)).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        (1 << 31) + 2,
        "NBD_REP_ERR_POLICY"
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).unwrap();
    assert!(String::from_utf8_lossy(&msg).contains("TLS"));
    assert!(d.api.get("/v1/health").is_ok());
    drop(good);
    d.stop();
}

#[test]
fn nbd_exports_come_back_after_a_restart_and_can_be_removed() {
    watchdog(120);
    let (d, sock) = setup("nbd-restart");
    let mut c = Client::go(&sock, "beta");
    assert_eq!(c.write(4096, &pattern(5, 4096)), 0);
    drop(c);
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let mut c = Client::go(&sock, "beta");
    assert_eq!(c.read(4096, 4096), (0, pattern(5, 4096)));
    // Removing an export closes its connections; the socket's other exports stay.
    d.api.delete("/v1/exports/beta").expect("remove");
    let mut rest = Vec::new();
    c.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.s.read_to_end(&mut rest);
    let out = ok(Command::new("nbdinfo").arg("--list").arg(uri(&sock, "")));
    assert!(
        out.contains("alpha") && !out.contains("export=\"beta\""),
        "{out}"
    );
    // The last export on the socket takes the listener with it.
    d.api.delete("/v1/exports/alpha").unwrap();
    d.api.delete("/v1/exports/alpha-ro").unwrap();
    assert!(UnixStream::connect(&sock).is_err());
    d.stop();
}

/// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies.
struct Client {
    s: UnixStream,
    cookie: u64,
}

impl Client {
    fn go(sock: &Path, name: &str) -> Client {
        let mut s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut o = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        o.extend_from_slice(&7u32.to_be_bytes());
        o.extend_from_slice(&(d.len() as u32).to_be_bytes());
        o.extend_from_slice(&d);
        s.write_all(&o).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            assert!(
                kind < (1 << 31),
                "GO {name} refused: {kind:#x} {}",
                String::from_utf8_lossy(&body)
            );
            if kind == 1 {
                break; // ACK
            }
        }
        Client { s, cookie: 0 }
    }

    fn send_req(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&r).unwrap();
    }

    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reply");
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn write(&mut self, off: u64, data: &[u8]) -> u32 {
        self.cookie += 1;
        self.send_req(1, 0, self.cookie, off, data.len() as u32);
        self.s.write_all(data).unwrap();
        let (e, c) = self.reply();
        assert_eq!(c, self.cookie);
        e
    }

    fn trim(&mut self, off: u64, len: u32) -> u32 {
        self.cookie += 1;
        self.send_req(4, 0, self.cookie, off, len);
        self.reply().0
    }

    fn read(&mut self, off: u64, len: usize) -> (u32, Vec<u8>) {
        self.cookie += 1;
        self.send_req(0, 0, self.cookie, off, len as u32);
        let (e, c) = self.reply();
        assert_eq!(c, self.cookie);
        let mut b = vec![0u8; if e == 0 { len } else { 0 }];
        self.s.read_exact(&mut b).unwrap();
        (e, b)
    }
}

#[test]
fn disk_import_and_export_move_images_through_nbd() {
    watchdog(240);
    let d = TestDaemon::start("nbd-image");
    let cli = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_nvmux"))
            .arg("--api")
            .arg(d.dir.join("nvmux.sock"))
            .args(args)
            .output()
            .expect("nvmux");
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let raw = d.dir.join("img.raw");
    let data = pattern(21, 24 << 20);
    std::fs::write(&raw, &data).unwrap();
    let qcow = d.dir.join("img.qcow2");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    // Import a qcow2 into a new disk: created at the image's virtual size, bit-exact.
    let (s, out) = cli(&["disk", "import", "vm1", qcow.to_str().unwrap()]);
    assert!(s, "{out}");
    assert!(
        out.contains("(qcow2, 24 MiB) into disk vm1 (created)"),
        "{out}"
    );
    let v = d.api.get("/v1/disks/vm1").unwrap();
    assert_eq!(v["size"].as_u64(), Some(24 << 20));
    let img = v["backend"]["path"].as_str().unwrap().to_string();
    assert!(read_file_at(Path::new(&img), 0, 24 << 20) == data);
    // Export it as qcow2 and raw; both compare identical to the source.
    let out_q = d.dir.join("out.qcow2");
    let (s, out) = cli(&[
        "disk",
        "export",
        "vm1",
        out_q.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert!(s, "{out}");
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(&out_q));
    let (s, out) = cli(&["disk", "export", "vm1", out_q.to_str().unwrap()]);
    assert!(
        !s && out.contains("--force"),
        "an existing file is not overwritten: {out}"
    );
    // A failed export (a format qemu-img cannot write) leaves the old file as it was and
    // no partial image beside it.
    let before = std::fs::read(&out_q).unwrap();
    let (s, out) = cli(&[
        "disk",
        "export",
        "vm1",
        out_q.to_str().unwrap(),
        "--force",
        "--format",
        "bogus",
    ]);
    assert!(!s && out.contains("bogus"), "{out}");
    assert!(
        std::fs::read(&out_q).unwrap() == before,
        "the old image is untouched"
    );
    assert!(!d.dir.join("out.qcow2.nvmux-partial").exists());
    // Errors change nothing: an image larger than the disk, a missing source.
    let big = d.dir.join("big.raw");
    std::fs::write(&big, pattern(22, 32 << 20)).unwrap();
    let (s, out) = cli(&["disk", "import", "vm1", big.to_str().unwrap()]);
    assert!(!s && out.contains("the image needs 32 MiB"), "{out}");
    assert!(
        read_file_at(Path::new(&img), 0, 24 << 20) == data,
        "the disk is untouched"
    );
    let (s, out) = cli(&["disk", "import", "vm2", "/nonexistent.qcow2"]);
    assert!(!s && out.contains("does not exist"), "{out}");
    assert!(
        d.api.get("/v1/disks/vm2").is_err(),
        "no disk was left behind"
    );
    // The temporary exports are gone.
    assert_eq!(d.api.get("/v1/exports").unwrap(), json!([]));
    d.stop();
}
