//! Encrypted disks through the real daemon and libblkio: standard ciphertext (checked by
//! an independent implementation) in 512- and 4096-byte sectors, crypto-erase that
//! leaves no usable wrapped copy of the key in any file, KEK rotation against backups,
//! the migration of keys out of `state.json`, and clear errors for key problems.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn kek_bytes(byte: u8) -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = i as u8 ^ byte;
    }
    k
}

fn kek_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    // Hex form, as an operator would write it; mode 0600, as the daemon demands.
    let hex: String = kek_bytes(byte).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&p, hex + "\n").expect("write KEK");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod KEK");
    p
}

/// Every data key that any file under `dir` (recursively, every regular file) holds in a
/// wrapped form that `kek` unwraps: each 72-byte window of the raw bytes, and of the
/// bytes that every run of hex digits decodes to (both alignments). RFC 3394's integrity
/// value makes a chance match impossible in practice (2^-64 per window).
fn wrapped_keys_in(
    dir: &Path,
    kek: &[u8; 32],
    skip: &dyn Fn(&Path) -> bool,
) -> Vec<(PathBuf, [u8; 64])> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            if !ft.is_file() || skip(&p) {
                continue;
            }
            let raw = std::fs::read(&p).expect("read file");
            let mut views = vec![raw.clone()];
            let mut run = Vec::new();
            for &b in raw.iter().chain(std::iter::once(&b' ')) {
                if b.is_ascii_hexdigit() {
                    run.push(b);
                    continue;
                }
                if run.len() >= 144 {
                    for start in [0, 1] {
                        let h = std::str::from_utf8(&run[start..]).unwrap_or("");
                        let even = &h[..h.len() / 2 * 2];
                        if let Some(v) = nvmux_func::keys::from_hex(even) {
                            views.push(v);
                        }
                    }
                }
                run.clear();
            }
            for v in &views {
                for w in v.windows(72) {
                    if let Some(k) = nvmux_func::keywrap::unwrap(kek, w) {
                        found.push((p.clone(), *k));
                    }
                }
            }
        }
    }
    found
}

/// A disk's data key, read from its keystore slot as format.md describes it.
fn data_key(dir: &Path, disk: &str, kek: &[u8; 32]) -> [u8; 64] {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state"))
            .expect("json");
    let c = st["disks"]
        .as_array()
        .expect("disks")
        .iter()
        .find(|d| d["name"] == disk)
        .expect("disk in state")["crypt"]
        .clone();
    assert!(
        c.get("wrapped_key").is_none(),
        "state.json holds a wrapped key: {c}"
    );
    let slot = c["slot"].as_u64().expect("slot") as usize;
    let ks = std::fs::read(dir.join("keystore")).expect("keystore");
    let s = &ks[256 * (1 + slot)..256 * (2 + slot)];
    assert_eq!(&s[..4], b"NVKY");
    assert_eq!(
        nvmux_func::keys::to_hex(&s[8..24]),
        c["key_id"].as_str().expect("key_id")
    );
    *nvmux_func::keywrap::unwrap(kek, &s[32..104]).expect("unwrap the slot")
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
    watchdog(180);
    let (d, kek) = start("crypt-interop", Some("default"));
    // dm-crypt's three layouts: 512-byte sectors; 4096-byte sectors with IVs in 512-byte
    // units (plain mode's default); 4096-byte sectors with iv_large_sectors (LUKS2's).
    for (name, extra) in [
        ("c", json!({"encrypt": true})),
        (
            "c4k",
            json!({"encrypt": true, "block_size": 4096, "sector_size": 4096}),
        ),
        (
            "c4kl",
            json!({"encrypt": true, "block_size": 4096, "sector_size": 4096, "iv_large_sectors": true}),
        ),
    ] {
        let (img, sock) = d.disk_and_export(name, 16 * MIB, 1, extra.clone());
        let v = d.api.get(&format!("/v1/disks/{name}")).expect("disk");
        assert_eq!(v["crypt"]["cipher"], "aes-xts-plain64");
        assert_eq!(
            v["crypt"]["sector_size"],
            extra.get("sector_size").cloned().unwrap_or(json!(null))
        );
        assert!(v["crypt"].get("wrapped_key").is_none(), "{v}");
        let mut c = BlkioClient::connect(&sock, 1, false, 2 * MIB as usize).expect("connect");
        let off = 2 * MIB + 4096;
        let plain = pattern(11, MIB as usize);
        write_flushed(&mut c, off, &plain);
        assert!(
            read(&mut c, off, plain.len()) == plain,
            "{name}: read back through nvmux"
        );
        drop(c);

        // The image holds no plaintext: no 64-byte run of the pattern appears anywhere.
        let raw = std::fs::read(&img).expect("image");
        for at in [0usize, 4096, 500_000] {
            assert!(
                !contains(&raw, &plain[at..at + 64]),
                "{name}: plaintext at pattern offset {at} found in the image"
            );
        }
        // Python's `cryptography` (OpenSSL) unwraps the key from the keystore with the
        // KEK and decrypts the sectors as aes-xts-plain64 in the disk's layout.
        let out = d.dir.join("decrypted.bin");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/xts_decrypt.py");
        let st = Command::new("python3")
            .arg(&script)
            .arg(&d.dir)
            .arg(name)
            .arg(&kek)
            .arg(&img)
            .arg(off.to_string())
            .arg(plain.len().to_string())
            .arg(&out)
            .status()
            .expect("run python3 (apt-get install python3-cryptography)");
        assert!(st.success(), "{name}: xts_decrypt.py failed");
        let dec = std::fs::read(&out).expect("decrypted");
        assert!(
            dec == plain,
            "{name}: OpenSSL's XTS decryption of nvmux's ciphertext"
        );
    }
    // Layout options are checked.
    for (body, want) in [
        (json!({"sector_size": 4096}), "encryption options"),
        (
            json!({"encrypt": true, "sector_size": 1024}),
            "1024 is not supported",
        ),
        (
            json!({"encrypt": true, "sector_size": 4096}),
            "--block-size 4096",
        ),
        (
            json!({"encrypt": true, "iv_large_sectors": true}),
            "needs sector_size 4096",
        ),
    ] {
        let mut b = json!({"name": "bad", "backend": "memory", "size": MIB});
        if let (Some(o), Some(e)) = (b.as_object_mut(), body.as_object()) {
            o.extend(e.clone());
        }
        let e = d.api.post("/v1/disks", &b).expect_err("bad layout");
        assert!(e.to_string().contains(want), "{body}: {e}");
    }
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
        write_flushed(&mut c, off, &plain);
    }
    drop(c);
    let kek = kek_bytes(0x5a);
    let old_key = data_key(&d.dir, "big", &kek);
    let keystore = || std::fs::read(d.dir.join("keystore")).expect("keystore");
    let wrapped_before = keystore();

    // Refused while exported; nothing changes.
    let e = d
        .api
        .post("/v1/disks/big/crypto-erase", &json!({}))
        .expect_err("exported");
    assert_eq!(e.status, 409, "{e}");
    assert!(
        keystore() == wrapped_before,
        "a refused erase changed the keystore"
    );
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

    // The old key is in no file of the data directory in any wrapped form the KEK
    // unwraps (the 10 GiB sparse image aside: erase_leaves_no_wrapped_copy_anywhere scans
    // images too); the disk's new key is (a control that the scan finds keys).
    let sparse_img = d.dir.join("big.img");
    let found = wrapped_keys_in(&d.dir, &kek, &|p| p == sparse_img);
    assert!(
        !found.iter().any(|(_, k)| *k == old_key),
        "old key still unwraps from {:?}",
        found
            .iter()
            .filter(|(_, k)| *k == old_key)
            .map(|(p, _)| p)
            .collect::<Vec<_>>()
    );
    let new_key = data_key(&d.dir, "big", &kek);
    assert!(
        found.iter().any(|(_, k)| *k == new_key),
        "the scan found no key"
    );
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
    write_flushed(&mut c, 4096, &plain[..8192]);
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
    write_flushed(&mut c, 0, &pattern(5, 65536));
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
    write_flushed(&mut c, 8192, &plain);
    drop(c);
    let image = std::fs::read(&img).expect("image");
    let check_before = d.api.get("/v1/disks/r").expect("disk")["crypt"]["kek_check"].clone();

    // A KEK file that is not a KEK: refused, nothing changes.
    let junk = d.dir.join("junk");
    std::fs::write(&junk, "not a key").expect("write");
    std::fs::set_permissions(&junk, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
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
    write_flushed(&mut c, 4096, &plain);
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
    assert_eq!(v["functions"], json!(["qos", "crypt", "mirror"]));

    // Restart: chains are part of the persisted disk.
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_with(
        dir.clone(),
        &["--kek-file", dir.join("kek").to_str().unwrap_or("")],
    );
    assert_eq!(
        d.api.get("/v1/disks/c").expect("c")["functions"],
        json!(["qos", "crypt", "mirror"])
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

/// Copy every regular file under `from` to `to` (a backup of the data directory).
fn backup(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir backup");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let ft = e.file_type().expect("file type");
        if ft.is_dir() {
            backup(&e.path(), &to.join(e.file_name()));
        } else if ft.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// The forensic guarantees, every file of the data directory scanned (state, its old and
/// temporary copies, the keystore, the images):
/// 1. a `state.json` of the format before the keystore (wrapped keys inside), and a
///    leftover `state.json.tmp` with the same, are migrated at start: afterwards the key
///    unwraps from the keystore only;
/// 2. after `disk erase --crypto`, no file holds the old key in any wrapped form;
/// 3. after `keys rotate`, no file holds a key the old KEK unwraps, and a backup of the
///    data directory taken before the rotation unwraps nothing with the new KEK.
#[test]
fn erase_leaves_no_wrapped_copy_anywhere() {
    watchdog(300);
    let (d, kek_path) = start("crypt-forensic", Some("default"));
    let kek = kek_bytes(0x5a);
    let (_, sock_m) = d.disk_and_export("m", MIB, 1, json!({"encrypt": true}));
    let (_, sock_e) = d.disk_and_export("e", MIB, 1, json!({"encrypt": true}));
    let plain = pattern(8, 65536);
    for s in [&sock_m, &sock_e] {
        let mut c = BlkioClient::connect(s, 1, false, MIB as usize).expect("connect");
        write_flushed(&mut c, 4096, &plain);
        drop(c);
    }
    let key_m = data_key(&d.dir, "m", &kek);
    let key_e = data_key(&d.dir, "e", &kek);
    let dir = d.dir.clone();
    d.stop();

    // 1. Rewrite the data directory as the nvmux before the keystore left it: the wrapped
    //    keys in state.json (hex), no keystore, plus a leftover state.json.tmp.
    let mut st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state"))
            .expect("json");
    let ks = std::fs::read(dir.join("keystore")).expect("keystore");
    for disk in st["disks"].as_array_mut().expect("disks") {
        let slot = disk["crypt"]["slot"].as_u64().expect("slot") as usize;
        let s = &ks[256 * (1 + slot)..256 * (2 + slot)];
        disk["crypt"] = json!({
            "cipher": "aes-xts-plain64",
            "wrapped_key": nvmux_func::keys::to_hex(&s[32..104]),
            "kek_check": nvmux_func::keys::to_hex(&s[24..32]),
        });
    }
    let legacy = serde_json::to_vec_pretty(&st).expect("json");
    std::fs::write(dir.join("state.json"), &legacy).expect("write");
    std::fs::write(dir.join("state.json.tmp"), &legacy).expect("write");
    // And a migration cut by a crash right after its first step: state.json.old is a
    // second name of state.json itself (only the name may go, not the bytes).
    std::fs::hard_link(dir.join("state.json"), dir.join("state.json.old")).expect("link");
    std::fs::remove_file(dir.join("keystore")).expect("rm keystore");
    assert_eq!(
        wrapped_keys_in(&dir, &kek, &|_| false).len(),
        6,
        "the legacy files hold both keys three times"
    );

    let d = TestDaemon::start_with(
        dir.clone(),
        &["--kek-file", kek_path.to_str().unwrap_or("")],
    );
    for (n, s) in [("m", &sock_m), ("e", &sock_e)] {
        assert_eq!(
            d.api.get(&format!("/v1/disks/{n}")).expect("disk")["status"],
            "ok"
        );
        let mut c = BlkioClient::connect(s, 1, false, MIB as usize).expect("connect");
        assert!(
            read(&mut c, 4096, plain.len()) == plain,
            "{n}: data after migration"
        );
        drop(c);
    }
    assert!(
        !dir.join("state.json.tmp").exists(),
        "leftover state copy kept"
    );
    assert!(!dir.join("state.json.old").exists(), "old state copy kept");
    let found = wrapped_keys_in(&dir, &kek, &|_| false);
    let mut files: Vec<_> = found.iter().map(|(p, _)| p.clone()).collect();
    files.dedup();
    assert_eq!(
        files,
        vec![dir.join("keystore")],
        "keys outside the keystore: {found:?}"
    );
    assert_eq!(found.len(), 2);
    assert_eq!(data_key(&dir, "m", &kek), key_m, "migrated, not replaced");
    assert_eq!(data_key(&dir, "e", &kek), key_e);

    // 2. Crypto-erase m: its old key unwraps from no file; e's key still does.
    d.api.delete("/v1/exports/m").expect("unexport");
    d.api
        .post("/v1/disks/m/crypto-erase", &json!({}))
        .expect("crypto-erase");
    let found = wrapped_keys_in(&dir, &kek, &|_| false);
    assert!(
        !found.iter().any(|(_, k)| *k == key_m),
        "the erased key unwraps from {:?}",
        found
            .iter()
            .filter(|(_, k)| *k == key_m)
            .map(|(p, _)| p)
            .collect::<Vec<_>>()
    );
    assert!(found.iter().any(|(_, k)| *k == key_e), "e's key is gone");
    let new_m = data_key(&dir, "m", &kek);
    assert!(
        found.iter().any(|(_, k)| *k == new_m),
        "m's new key is not stored"
    );

    // 3. A backup of the data directory, then a KEK rotation.
    let saved = unique_dir("crypt-forensic-backup");
    backup(&dir, &saved);
    let new_path = kek_file(&dir, "new-kek", 0x77);
    let new_kek = kek_bytes(0x77);
    let v = d
        .api
        .post("/v1/keys/rotate", &json!({"kek_file": new_path}))
        .expect("rotate");
    assert_eq!(v["rewrapped"], 2);
    let live_old = wrapped_keys_in(&dir, &kek, &|_| false);
    assert!(
        live_old.is_empty(),
        "the old KEK still unwraps {live_old:?}"
    );
    let live_new = wrapped_keys_in(&dir, &new_kek, &|_| false);
    assert_eq!(live_new.len(), 2, "{live_new:?}");
    let saved_new = wrapped_keys_in(&saved, &new_kek, &|_| false);
    assert!(
        saved_new.is_empty(),
        "the backup unwraps with the new KEK: {saved_new:?}"
    );
    // The backup is a real one: with the old KEK (which the operator now destroys) it
    // still unwraps both keys. That is what the rotation protects against.
    assert_eq!(wrapped_keys_in(&saved, &kek, &|_| false).len(), 2);

    // 4. Deleting an encrypted disk destroys its key the same way.
    let new_m = data_key(&dir, "m", &new_kek);
    d.api.delete("/v1/disks/m").expect("delete m");
    let left = wrapped_keys_in(&dir, &new_kek, &|_| false);
    assert!(
        !left.iter().any(|(_, k)| *k == new_m),
        "a deleted disk's key unwraps"
    );
    assert_eq!(left.len(), 1, "{left:?}");
    d.stop();
    let d = TestDaemon::start_with(dir, &["--kek-file", new_path.to_str().unwrap_or("")]);
    let mut c = BlkioClient::connect(&sock_e, 1, false, MIB as usize).expect("connect");
    assert!(read(&mut c, 4096, plain.len()) == plain, "e after rotation");
    drop(c);
    d.stop();
    let _ = std::fs::remove_dir_all(saved);
}

/// A KEK file its group or others may read is refused, by name, with the fix.
#[test]
fn kek_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    watchdog(120);
    let dir = unique_dir("crypt-kekperm");
    let k = kek_file(&dir, "kek", 0x11);
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let d = TestDaemon::start_with(dir, &["--kek-file", k.to_str().unwrap_or("")]);
    let e = d
        .api
        .post(
            "/v1/disks",
            &json!({"name": "x", "backend": "memory", "size": MIB, "encrypt": true}),
        )
        .expect_err("world-readable KEK");
    assert!(
        e.to_string()
            .contains("accessible by group or others (mode 0644)")
            && e.to_string().contains("chmod 600"),
        "{e}"
    );
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "x", "backend": "memory", "size": MIB, "encrypt": true}),
        )
        .expect("KEK with mode 0600");
    let other = kek_file(&d.dir, "other", 0x22);
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let e = d
        .api
        .post("/v1/keys/rotate", &json!({"kek_file": other}))
        .expect_err("group-readable new KEK");
    assert!(e.to_string().contains("mode 0640"), "{e}");
    d.stop();
}

/// A rotation cut by a crash (some slots re-wrapped, some not) completes when run again
/// with the old KEK still configured: slots already under the new KEK are skipped.
#[test]
fn interrupted_rotation_completes_when_run_again() {
    watchdog(120);
    let (d, old) = start("crypt-rotate-crash", Some("default"));
    for n in ["a", "b"] {
        d.api
            .post(
                "/v1/disks",
                &json!({"name": n, "backend": "memory", "size": MIB, "encrypt": true}),
            )
            .expect("create");
    }
    let ks = d.dir.join("keystore");
    let before = std::fs::read(&ks).expect("keystore");
    let new = kek_file(&d.dir, "new-kek", 0x77);
    let v = d
        .api
        .post("/v1/keys/rotate", &json!({"kek_file": new}))
        .expect("rotate");
    assert_eq!(v["rewrapped"], 2);
    let dir = d.dir.clone();
    d.stop();
    // The crash: slot 0 re-wrapped, slot 1 still under the old KEK.
    let mut after = std::fs::read(&ks).expect("keystore");
    after[2 * 256..3 * 256].copy_from_slice(&before[2 * 256..3 * 256]);
    std::fs::write(&ks, &after).expect("write keystore");

    let d = TestDaemon::start_with(dir.clone(), &["--kek-file", old.to_str().unwrap_or("")]);
    let status = |d: &TestDaemon, n: &str| {
        d.api.get(&format!("/v1/disks/{n}")).expect("disk")["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let (sa, sb) = (status(&d, "a"), status(&d, "b"));
    // Slot order follows creation: a is slot 0 (re-wrapped), b is slot 1 (not).
    assert!(sa.contains("not the KEK"), "{sa}");
    assert_eq!(sb, "ok");
    let v = d
        .api
        .post("/v1/keys/rotate", &json!({"kek_file": new}))
        .expect("rotate again");
    assert_eq!(v["rewrapped"], 1, "only the slot the crash left behind");
    d.stop();
    let d = TestDaemon::start_with(dir, &["--kek-file", new.to_str().unwrap_or("")]);
    assert_eq!(status(&d, "a"), "ok");
    assert_eq!(status(&d, "b"), "ok");
    assert!(
        wrapped_keys_in(&d.dir, &kek_bytes(0x5a), &|_| false).is_empty(),
        "a key still unwraps with the old KEK"
    );
    d.stop();
}
