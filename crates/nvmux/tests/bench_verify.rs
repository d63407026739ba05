//! `nvmux bench verify` against the real daemon over vhost-user-blk (libblkio): a clean
//! run passes, its --verify-only re-read passes, and the re-read catches a damaged block
//! and stale (older-generation) data written behind the daemon's back.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn nvmux() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nvmux"))
}

/// The numbers of the summary line: (writes, reads, errors, mismatches).
fn summary(out: &str) -> (u64, u64, u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("verify: ") && l.contains(" writes, "))
        .unwrap_or_else(|| panic!("no summary line in: {out}"));
    let n: Vec<u64> = line
        .split([' ', ','])
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(n.len() >= 6, "summary line {line:?}");
    assert!(line.contains(" ms, longest stall "), "{line}");
    (n[0], n[1], n[2], n[3])
}

fn verify(sock: &Path, args: &[&str]) -> Command {
    let mut c = nvmux();
    c.args(["bench", "verify", "--socket"]).arg(sock).args(args);
    c
}

fn overwrite(img: &Path, off: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open image");
    f.seek(SeekFrom::Start(off)).expect("seek");
    f.write_all(data).expect("write image");
    f.sync_all().expect("sync image");
}

#[test]
fn verify_passes_and_its_reread_catches_damage_and_stale_data() {
    watchdog(240);
    let d = TestDaemon::start("bench-verify");
    let (img, sock) = d.disk_and_export("v", 16 * MIB, 2, json!({}));
    let map = d.dir.join("v.map");
    let map_s = map.to_str().expect("utf-8 path");

    // A clean run on 2 queues with two sizes, then the re-read against its map.
    let out = ok(&mut verify(
        &sock,
        &[
            "--seconds",
            "2",
            "--queues",
            "2",
            "--qd",
            "8",
            "--bs",
            "4k,64k",
            "--seed",
            "3",
            "--map",
            map_s,
        ],
    ));
    let (w, r, e, m) = summary(&out);
    assert!(w > 0 && r > 0, "{out}");
    assert_eq!((e, m), (0, 0), "{out}");
    let out = ok(&mut verify(
        &sock,
        &["--verify-only", "--seed", "3", "--map", map_s],
    ));
    let (w, r, e, m) = summary(&out);
    assert_eq!((w, e, m), (0, 0, 0), "{out}");
    // The whole 16 MiB in 64 KiB reads.
    assert_eq!(r, 16 * MIB / (64 << 10), "{out}");

    // Without the map, every block must still be zeros or a well-formed block of this
    // seed; another seed's check fails on every written block.
    ok(&mut verify(&sock, &["--verify-only", "--seed", "3"]));
    let out = fails(&mut verify(&sock, &["--verify-only", "--seed", "4"]));
    assert!(summary(&out).3 > 0, "{out}");

    // One damaged 4 KiB block: exactly one mismatch, and exit status 1.
    let saved = std::fs::read(&img).expect("read image");
    overwrite(&img, MIB, &pattern(99, 4096));
    let out = fails(&mut verify(
        &sock,
        &["--verify-only", "--seed", "3", "--map", map_s],
    ));
    assert_eq!(summary(&out).3, 1, "{out}");
    assert!(out.contains("MISMATCH at offset 1048576"), "{out}");
    overwrite(&img, 0, &saved);
    ok(&mut verify(
        &sock,
        &["--verify-only", "--seed", "3", "--map", map_s],
    ));

    // Stale data: a second run (newer generations, same map file), then the image as it
    // was before it. Well-formed blocks of the right offset and seed, but old ones.
    ok(&mut verify(
        &sock,
        &[
            "--passes", "1", "--bs", "4k,16k", "--seed", "3", "--map", map_s,
        ],
    ));
    ok(&mut verify(
        &sock,
        &["--verify-only", "--seed", "3", "--map", map_s],
    ));
    overwrite(&img, 0, &saved);
    let out = fails(&mut verify(
        &sock,
        &["--verify-only", "--seed", "3", "--map", map_s],
    ));
    assert!(summary(&out).3 > 0, "{out}");
    assert!(out.contains("wanted generation"), "{out}");
    d.stop();
}

#[test]
fn passes_write_the_disk_size_and_bad_options_are_refused() {
    watchdog(120);
    let d = TestDaemon::start("bench-verify-passes");
    let (_img, sock) = d.disk_and_export("p", 8 * MIB, 1, json!({}));
    let out = ok(&mut verify(
        &sock,
        &["--passes", "2", "--bs", "8k", "--qd", "4"],
    ));
    let (w, r, e, m) = summary(&out);
    assert!(w >= 2 * 8 * MIB / (8 << 10), "{out}");
    // the mixed reads, then the read-back of everything written
    assert!(r >= 8 * MIB / (8 << 10), "{out}");
    assert_eq!((e, m), (0, 0), "{out}");
    let out = fails(&mut verify(&sock, &["--bs", "3k"]));
    assert!(out.contains("multiples of 4096"), "{out}");
    let out = fails(&mut verify(&sock, &["--qd", "0"]));
    assert!(out.contains("--qd"), "{out}");
    let out = fails(&mut verify(
        &sock,
        &["--verify-only", "--map", "/nonexistent/map"],
    ));
    assert!(out.contains("/nonexistent/map"), "{out}");
    d.stop();
}

#[test]
fn a_server_that_stops_answering_fails_the_run_instead_of_hanging_it() {
    watchdog(120);
    let d = TestDaemon::start("bench-verify-stall");
    let (_img, sock) = d.disk_and_export("s", 8 * MIB, 1, json!({}));
    let child = verify(&sock, &["--seconds", "60", "--io-timeout", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start bench verify");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let pid = d.pid().to_string();
    ok(Command::new("kill").args(["-STOP", &pid]));
    let out = child.wait_with_output().expect("bench verify");
    ok(Command::new("kill").args(["-CONT", &pid]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("none completed for 2 s: giving up"), "{text}");
    let (_, _, e, m) = summary(&text);
    assert!(e >= 1 && m == 0, "{text}");
    let stall: u64 = text
        .split("longest stall ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stall in {text}"));
    assert!(stall >= 2000, "the give-up stall is in the summary: {text}");
    d.stop();
}
