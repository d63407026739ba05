//! Encrypted disks through the real daemon and libblkio: standard ciphertext (checked by
//! an independent implementation), crypto-erase, and clear errors for key problems.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn kek_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    // Hex form, as an operator would write it.
    let hex: String = (0..32u8).map(|i| format!("{:02x}", i ^ byte)).collect();
    std::fs::write(&p, hex + "\n").expect("write KEK");
    p
}

fn start(tag: &str, kek: Option<&str>) -> (TestDaemon, PathBuf) {
    let dir = unique_dir(tag);
    let k = kek_file(&dir, "kek", 0x5a);
    let d = match kek {
        Some("default") => TestDaemon::start_with(dir, &["--kek-file", k.to_str().unwrap_or("")]),
        Some(other) => TestDaemon::start_with(dir, &["--kek-file", other]),
        None => TestDaemon::start_in(dir),
    };
    (d, k)
}

fn write(c: &mut BlkioClient, off: u64, data: &[u8]) {
    c.buf()[..data.len()].copy_from_slice(data);
    c.io_ok(0, Op::Write, off, data.len(), 0, ReqFlags::empty())
        .expect("write");
    c.io_ok(0, Op::Flush, 0, 0, 0, ReqFlags::empty())
        .expect("flush");
}

fn read(c: &mut BlkioClient, off: u64, len: usize) -> Vec<u8> {
    c.io_ok(0, Op::Read, off, len, 0, ReqFlags::empty())
        .expect("read");
    c.buf()[..len].to_vec()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn ciphertext_is_aes_xts_plain64_that_an_independent_tool_decrypts() {
    watchdog(120);
    let (d, kek) = start("crypt-interop", Some("default"));
    let (img, sock) = d.disk_and_export("c", 16 * MIB, 1, json!({"encrypt": true}));
    let v = d.api.get("/v1/disks/c").expect("disk");
    assert_eq!(v["crypt"]["cipher"], "aes-xts-plain64");
    let mut c = BlkioClient::connect(&sock, 1, false, 2 * MIB as usize).expect("connect");
    let off = 2 * MIB + 4096;
    let plain = pattern(11, MIB as usize);
    write(&mut c, off, &plain);
    assert!(
        read(&mut c, off, plain.len()) == plain,
        "read back through nvmux"
    );
    drop(c);

    // The image holds no plaintext: no 64-byte run of the pattern appears anywhere.
    let raw = std::fs::read(&img).expect("image");
    for at in [0usize, 4096, 500_000] {
        assert!(
            !contains(&raw, &plain[at..at + 64]),
            "plaintext at pattern offset {at} found in the image"
        );
    }
    // Python's `cryptography` (OpenSSL) unwraps the key from state.json with the KEK
    // and decrypts the sectors as aes-xts-plain64.
    let out = d.dir.join("decrypted.bin");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/xts_decrypt.py");
    let st = Command::new("python3")
        .arg(&script)
        .arg(d.dir.join("state.json"))
        .arg("c")
        .arg(&kek)
        .arg(&img)
        .arg(off.to_string())
        .arg(plain.len().to_string())
        .arg(&out)
        .status()
        .expect("run python3 (apt-get install python3-cryptography)");
    assert!(st.success(), "xts_decrypt.py failed");
    let dec = std::fs::read(&out).expect("decrypted");
    assert!(
        dec == plain,
        "OpenSSL's XTS decryption of nvmux's ciphertext"
    );
    d.stop();
}

#[test]
fn crypto_erase_destroys_the_key_and_the_old_data() {
    watchdog(120);
    let (d, _) = start("crypt-erase", Some("default"));
    let size = 10 << 30;
    let (_img, sock) = d.disk_and_export("big", size, 1, json!({"encrypt": true}));
    let mut c = BlkioClient::connect(&sock, 1, false, MIB as usize).expect("connect");
    let plain = pattern(3, MIB as usize);
    for off in [0, 5 << 30, size - MIB] {
        write(&mut c, off, &plain);
    }
    drop(c);
    let state = || std::fs::read_to_string(d.dir.join("state.json")).expect("state");
    let before: serde_json::Value = serde_json::from_str(&state()).expect("json");
    let old_key = before["disks"][0]["crypt"]["wrapped_key"]
        .as_str()
        .expect("wrapped key")
        .to_string();
    assert_eq!(old_key.len(), 144);

    // Refused while exported; nothing changes.
    let e = d
        .api
        .post("/v1/disks/big/crypto-erase", &json!({}))
        .expect_err("exported");
    assert_eq!(e.status, 409, "{e}");
    assert!(state().contains(&old_key));
    d.api.delete("/v1/exports/big").expect("unexport");

    let o = Command::new(env!("CARGO_BIN_EXE_nvmux"))
        .args(["--api"])
        .arg(d.dir.join("nvmux.sock"))
        .args(["disk", "erase", "big", "--crypto"])
        .output()
        .expect("nvmux disk erase");
    let msg = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{msg}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // e.g. "crypto-erased disk big: data key destroyed and replaced in 0.004 s"
    println!("10 GiB disk: {msg}");
    assert!(msg.contains("data key destroyed"), "{msg}");

    // The wrapped key is in no file of the data directory (images aside: they hold
    // only ciphertext, which the key check below covers).
    for f in std::fs::read_dir(&d.dir).expect("dir").flatten() {
        let p = f.path();
        if p.extension().is_some_and(|e| e == "img") || !p.is_file() {
            continue;
        }
        let b = std::fs::read(&p).unwrap_or_default();
        assert!(
            !contains(&b, old_key.as_bytes()),
            "old wrapped key still in {}",
            p.display()
        );
    }
    // Through nvmux the old data is gone, also after a restart.
    let sock2 = d.dir.join("big2.sock");
    d.api
        .post("/v1/exports", &json!({"disk": "big", "socket": sock2}))
        .expect("export");
    let mut c = BlkioClient::connect(&sock2, 1, false, MIB as usize).expect("connect");
    for off in [0, 5 << 30, size - MIB] {
        let r = read(&mut c, off, MIB as usize);
        assert!(r != plain, "old data readable at {off}");
        assert!(!contains(&r, &plain[..64]));
    }
    // The disk is usable again with its new key.
    write(&mut c, 4096, &plain[..8192]);
    assert!(read(&mut c, 4096, 8192) == plain[..8192]);
    drop(c);
    d.stop();
}

#[test]
fn key_problems_give_clear_errors_and_touch_nothing() {
    watchdog(120);
    // No KEK configured: creating an encrypted disk fails and leaves no image behind.
    let (d, _) = start("crypt-nokek", None);
    let img = d.dir.join("x.img");
    let e = d
        .api
        .post(
            "/v1/disks",
            &json!({"name": "x", "backend": "file", "path": img, "size": MIB, "encrypt": true}),
        )
        .expect_err("no KEK");
    assert!(e.to_string().contains("NVMUX_KEK"), "{e}");
    assert!(!img.exists(), "an image was left behind");
    assert!(d.api.get("/v1/disks/x").is_err());
    let e = d
        .api
        .post(
            "/v1/disks",
            &json!({"name": "y", "backend": "memory", "size": MIB, "crypt": "yes"}),
        )
        .expect_err("unknown field");
    assert!(e.to_string().contains("crypt"), "{e}");
    d.stop();

    // A disk encrypted under one KEK, daemon restarted with another: the disk is marked
    // unusable with a message naming the mismatch, and its image is untouched.
    let (d, _) = start("crypt-wrongkek", Some("default"));
    let (img, sock) = d.disk_and_export("w", 4 * MIB, 1, json!({"encrypt": true}));
    let mut c = BlkioClient::connect(&sock, 1, false, MIB as usize).expect("connect");
    write(&mut c, 0, &pattern(5, 65536));
    drop(c);
    let dir = d.dir.clone();
    d.stop();
    let image_before = std::fs::read(&img).expect("image");
    let other = kek_file(&dir, "other-kek", 0x33);
    let d = TestDaemon::start_with(dir.clone(), &["--kek-file", other.to_str().unwrap_or("")]);
    let v = d.api.get("/v1/disks/w").expect("disk");
    let status = v["status"].as_str().unwrap_or("").to_string();
    assert!(status.contains("not the KEK"), "{status}");
    // Its persisted export is not served: no socket to write through.
    let ex = d.api.get("/v1/exports").expect("exports");
    let st = ex[0]["status"].as_str().unwrap_or("").to_string();
    assert!(st.starts_with("error"), "{st}");
    assert!(
        !sock.exists(),
        "the export of a disk without its key is listening"
    );
    d.stop();
    assert!(
        std::fs::read(&img).expect("image") == image_before,
        "image changed"
    );
}

#[test]
fn kek_rotation_rewraps_keys_without_touching_data() {
    watchdog(120);
    let (d, old) = start("crypt-rotate", Some("default"));
    let (img, sock) = d.disk_and_export("r", 4 * MIB, 1, json!({"encrypt": true}));
    let mut c = BlkioClient::connect(&sock, 1, false, MIB as usize).expect("connect");
    let plain = pattern(21, 65536);
    write(&mut c, 8192, &plain);
    drop(c);
    let image = std::fs::read(&img).expect("image");
    let check_before = d.api.get("/v1/disks/r").expect("disk")["crypt"]["kek_check"].clone();

    // A KEK file that is not a KEK: refused, nothing changes.
    let junk = d.dir.join("junk");
    std::fs::write(&junk, "not a key").expect("write");
    let e = d
        .api
        .post("/v1/keys/rotate", &json!({"kek_file": junk}))
        .expect_err("junk KEK");
    assert!(e.to_string().contains("64 hex digits"), "{e}");
    assert_eq!(
        d.api.get("/v1/disks/r").expect("disk")["crypt"]["kek_check"],
        check_before
    );

    let new = kek_file(&d.dir, "new-kek", 0x77);
    let v = d
        .api
        .post("/v1/keys/rotate", &json!({"kek_file": new}))
        .expect("rotate");
    assert_eq!(v["rewrapped"], 1);
    assert_ne!(
        d.api.get("/v1/disks/r").expect("disk")["crypt"]["kek_check"],
        check_before
    );
    assert!(
        std::fs::read(&img).expect("image") == image,
        "rotation touched data"
    );
    // The disk still reads its data, and new encrypted disks use the new KEK.
    let mut c = BlkioClient::connect(&sock, 1, false, MIB as usize).expect("connect");
    assert!(read(&mut c, 8192, plain.len()) == plain);
    drop(c);
    let dir = d.dir.clone();
    d.stop();
    // Restarted with the old KEK: the disk is refused by name; with the new one it works.
    let d = TestDaemon::start_with(dir.clone(), &["--kek-file", old.to_str().unwrap_or("")]);
    let st = d.api.get("/v1/disks/r").expect("disk")["status"].clone();
    assert!(st.as_str().unwrap_or("").contains("not the KEK"), "{st}");
    d.stop();
    let d = TestDaemon::start_with(dir, &["--kek-file", new.to_str().unwrap_or("")]);
    assert_eq!(d.api.get("/v1/disks/r").expect("disk")["status"], "ok");
    let mut c = BlkioClient::connect(&sock, 1, false, MIB as usize).expect("connect");
    assert!(read(&mut c, 8192, plain.len()) == plain);
    drop(c);
    d.stop();
}

/// Function chains: the order is the operator's, the rules are enforced with clear
/// errors, and a chain survives a restart.
#[test]
fn function_chain_order_rules_and_persistence() {
    watchdog(120);
    let (d, _kek) = start("chain", Some("default"));
    // crypt outside qos: still encrypted on disk, still plaintext to the client.
    let (img, sock) = d.disk_and_export(
        "c",
        8 * MIB,
        1,
        json!({"encrypt": true, "chain": ["crypt", "qos"], "qos": {"iops_total": 100000}}),
    );
    let v = d.api.get("/v1/disks/c").expect("disk");
    assert_eq!(v["functions"], json!(["crypt", "qos"]));
    let mut c = BlkioClient::connect(&sock, 1, false, MIB as usize).expect("connect");
    let plain = pattern(5, 256 * 1024);
    write(&mut c, 4096, &plain);
    assert!(read(&mut c, 4096, plain.len()) == plain);
    drop(c);
    let raw = std::fs::read(&img).expect("image");
    assert!(!contains(&raw, &plain[..64]), "plaintext in the image");

    let bad = |body: serde_json::Value, want: &str| {
        let e = d.api.post("/v1/disks", &body).expect_err("refused");
        assert_eq!(e.status, 400, "{e}");
        assert!(e.to_string().contains(want), "{e}");
    };
    bad(
        json!({"name": "x", "size": MIB, "encrypt": true, "chain": ["qos"]}),
        "an encrypted disk's chain must hold crypt",
    );
    bad(
        json!({"name": "x", "size": MIB, "chain": ["crypt"]}),
        "crypt in the chain needs an encrypted disk",
    );
    bad(
        json!({"name": "x", "size": MIB, "chain": ["qos", "qos"]}),
        "names qos twice",
    );
    bad(json!({"name": "x", "size": MIB, "chain": ["zip"]}), "zip");
    assert!(d.api.get("/v1/disks/x").is_err(), "nothing left behind");

    // An exported disk keeps its chain; a chain change needs the export gone.
    let e = d
        .api
        .post("/v1/disks/c/chain", &json!({"chain": ["qos", "crypt"]}))
        .expect_err("exported");
    assert_eq!(e.status, 409, "{e}");
    // A plain disk with no functions: the fast path; it takes no qos settings.
    let (_p, _ps) = d.disk_and_export("p", 8 * MIB, 1, json!({"chain": []}));
    assert_eq!(d.api.get("/v1/disks/p").expect("p")["functions"], json!([]));
    let e = d
        .api
        .post("/v1/disks/p/qos", &json!({"iops_total": 10}))
        .expect_err("no qos function");
    assert!(e.to_string().contains("no qos function"), "{e}");
    assert!(
        !d.api.get("/v1/stats").expect("stats")["disks"]["p"]
            .as_object()
            .is_some_and(|o| o.contains_key("fair")),
        "a disk without qos takes no part in fair sharing"
    );
    d.api.delete("/v1/exports/c").expect("unexport");
    let e = d
        .api
        .post("/v1/disks/c/chain", &json!({"chain": ["crypt"]}))
        .expect_err("qos settings would be lost");
    assert!(e.to_string().contains("has qos settings"), "{e}");
    let v = d
        .api
        .post("/v1/disks/c/chain", &json!({"chain": null}))
        .expect("back to the default");
    assert_eq!(v["functions"], json!(["qos", "crypt"]));

    // Restart: chains are part of the persisted disk.
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_with(
        dir.clone(),
        &["--kek-file", dir.join("kek").to_str().unwrap_or("")],
    );
    assert_eq!(
        d.api.get("/v1/disks/c").expect("c")["functions"],
        json!(["qos", "crypt"])
    );
    assert_eq!(d.api.get("/v1/disks/p").expect("p")["functions"], json!([]));
    let sock = d.dir.join("c2.sock");
    d.api
        .post("/v1/exports", &json!({"disk": "c", "socket": sock}))
        .expect("export");
    let mut c = BlkioClient::connect(&sock, 1, false, MIB as usize).expect("connect");
    assert!(
        read(&mut c, 4096, plain.len()) == plain,
        "same key, same data"
    );
    drop(c);
    d.stop();
}
