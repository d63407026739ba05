//! Classifiers and external functions against the real daemon: the example classifiers
//! (compiled here with clang) loaded through the API and checked through real clients
//! (libblkio over vhost-user, the NVMe/TCP initiator for exact statuses), refusals by the
//! verifier, a hot swap under a verify workload, and the example external function
//! (nvmux-fn-audit) as a separate process, killed mid-load.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::{compile_classifier, pattern, read_file_at, watchdog, TestDaemon};
use nvmux_bench::client::{BlkioClient, Op};
use nvmux_bench::nvmf::{Host, Sqe};
use serde_json::{json, Value};

fn load(d: &TestDaemon, disk: &str, obj: &Path, maps: Value) -> Result<Value, String> {
    d.api
        .post(
            &format!("/v1/disks/{disk}/classifier"),
            &json!({"object": obj, "maps": maps}),
        )
        .map_err(|e| e.to_string())
}

fn blkio(sock: &Path) -> BlkioClient {
    BlkioClient::connect(sock, 1, false, 4 << 20).expect("libblkio connect")
}

/// Write `data` at byte `off` through libblkio; returns libblkio's result (0 or -errno).
fn write(c: &mut BlkioClient, off: u64, data: &[u8]) -> i32 {
    c.buf()[..data.len()].copy_from_slice(data);
    c.io(0, Op::Write, off, data.len(), 0, ReqFlags::empty())
        .expect("write completes")
}

fn read(c: &mut BlkioClient, off: u64, len: usize) -> (i32, Vec<u8>) {
    let r = c
        .io(0, Op::Read, off, len, 0, ReqFlags::empty())
        .expect("read completes");
    (r, c.buf()[..len].to_vec())
}

const NQN: &str = "nqn.2026-12.io.nvmux:router";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-4000-8000-000000000003";

#[test]
fn guard_refuses_writes_in_its_range_with_the_right_status() {
    watchdog(240);
    let d = TestDaemon::start("router-guard");
    let (img, sock) = d.disk_and_export("g", 64 << 20, 1, json!({}));
    let addr = d.nvmf_subsystem(NQN, &[HOST], &["g"]);
    let obj = compile_classifier(&d.dir, "guard");
    let v = load(
        &d,
        "g",
        &obj,
        json!([{"map": "range", "key": 0, "words": [100, 200]}]),
    )
    .expect("load guard");
    assert_eq!(v["program"]["jit"], true, "{v}");

    let mut c = blkio(&sock);
    let p = pattern(1, 4096);
    // In range (blocks 150..158): refused, nothing written.
    assert_eq!(write(&mut c, 150 * 512, &p), -libc::EIO);
    assert_eq!(read_file_at(&img, 150 * 512, 4096), vec![0u8; 4096]);
    // Straddling the start of the range (96..104): refused too.
    assert_eq!(write(&mut c, 96 * 512, &p), -libc::EIO);
    // Outside: allowed.
    assert_eq!(write(&mut c, 300 * 512, &p), 0);
    assert_eq!(read_file_at(&img, 300 * 512, 4096), p);
    assert_eq!(
        write(&mut c, 200 * 512, &p),
        0,
        "the range's end is exclusive"
    );
    // Reads of the range are allowed.
    assert_eq!(read(&mut c, 150 * 512, 4096).0, 0);
    // Write zeroes and discard in range: refused.
    assert_eq!(
        c.io(0, Op::WriteZeroes, 160 * 512, 4096, 0, ReqFlags::empty())
            .unwrap(),
        -libc::EIO
    );
    assert_eq!(
        c.io(0, Op::Discard, 160 * 512, 4096, 0, ReqFlags::empty())
            .unwrap(),
        -libc::EIO
    );

    // NVMe/TCP shows the exact status: Attempted Write to Read Only Range (SCT 1, SC 0x82).
    let mut h = Host::connect(addr, NQN, HOST, 1, 32, false).expect("nvme/tcp connect");
    let (cq, _) = h.io[0]
        .cmd(Sqe::write(1, 120, 8), Some(&p), 0)
        .expect("write");
    assert_eq!(cq.sct_sc(), (1, 0x82));
    let (cq, _) = h.io[0]
        .cmd(Sqe::write(1, 400, 8), Some(&p), 0)
        .expect("write");
    assert!(cq.ok());
    let v = d.api.get("/v1/disks/g/classifier").unwrap();
    let refused = &v["program"]["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "refused")
        .unwrap()["values"][0]["words"][0];
    assert_eq!(refused.as_u64(), Some(5), "{v}");
    assert_eq!(v["routes"]["complete"].as_u64(), Some(5));

    // Move the range live: 0..10. LBA 150 is writable now, LBA 5 is not.
    d.api
        .post(
            "/v1/disks/g/classifier/maps/range",
            &json!({"key": 0, "words": [0, 10]}),
        )
        .expect("map set");
    assert_eq!(write(&mut c, 150 * 512, &p), 0);
    assert_eq!(write(&mut c, 5 * 512, &p), -libc::EIO);
    drop(h);
    drop(c);

    // The guard and its range survive a restart.
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let mut c = blkio(&sock);
    assert_eq!(write(&mut c, 5 * 512, &p), -libc::EIO);
    assert_eq!(write(&mut c, 150 * 512, &p), 0);
    let v = d.api.get("/v1/disks/g").unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["classifier"]["maps"][0]["map"], "range");
    drop(c);
    d.stop();
}

#[test]
fn remap_moves_data_where_expected_and_bounds_it() {
    watchdog(120);
    let d = TestDaemon::start("router-remap");
    let (img, sock) = d.disk_and_export("r", 64 << 20, 1, json!({}));
    let obj = compile_classifier(&d.dir, "remap");
    load(
        &d,
        "r",
        &obj,
        json!([{"map": "part", "key": 0, "words": [1000, 2000]}]),
    )
    .expect("load remap");
    let mut c = blkio(&sock);
    let p = pattern(2, 4096);
    assert_eq!(write(&mut c, 0, &p), 0);
    assert_eq!(
        read_file_at(&img, 1000 * 512, 4096),
        p,
        "guest LBA 0 is disk LBA 1000"
    );
    assert_eq!(read_file_at(&img, 0, 4096), vec![0u8; 4096]);
    assert_eq!(read(&mut c, 0, 4096), (0, p.clone()));
    // The partition's last block, and one past it.
    assert_eq!(write(&mut c, 1999 * 512, &p[..512]), 0);
    assert_eq!(read_file_at(&img, 2999 * 512, 512), p[..512].to_vec());
    assert_eq!(
        write(&mut c, 1996 * 512, &p),
        -libc::EIO,
        "crosses the partition's end"
    );
    assert_eq!(read_file_at(&img, 2996 * 512, 512), vec![0u8; 512]);
    // An offset that points past the disk: the router refuses the rewritten command.
    let blocks = (64u64 << 20) / 512;
    d.api
        .post(
            "/v1/disks/r/classifier/maps/part",
            &json!({"key": 0, "words": [blocks - 4, 100]}),
        )
        .unwrap();
    assert_eq!(write(&mut c, 0, &p), -libc::EIO);
    let v = d.api.get("/v1/disks/r/classifier").unwrap();
    assert!(v["routes"]["errors"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["routes"]["rewrites"].as_u64().unwrap() >= 3, "{v}");
    drop(c);
    d.stop();
}

#[test]
fn bad_programs_are_refused_with_a_reason_and_the_old_one_stays() {
    watchdog(120);
    let d = TestDaemon::start("router-bad");
    let (_img, sock) = d.disk_and_export("b", 16 << 20, 1, json!({}));
    let guard = compile_classifier(&d.dir, "guard");
    load(
        &d,
        "b",
        &guard,
        json!([{"map": "range", "key": 0, "words": [0, 8]}]),
    )
    .expect("load guard");
    let not_elf = d.dir.join("notes.txt");
    std::fs::write(&not_elf, "this is not an eBPF object\n").unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            compile_classifier(&d.dir, "bad_ctx"),
            "offset 64 of the context, which is 64 bytes",
        ),
        (
            compile_classifier(&d.dir, "bad_loop"),
            "loops are not allowed",
        ),
        (
            compile_classifier(&d.dir, "bad_store"),
            "\"opcode\", which is read-only",
        ),
        (
            compile_classifier(&d.dir, "bad_leak_pointer"),
            "pointers may not be copied into a map",
        ),
        (not_elf, "not an ELF object"),
        (
            PathBuf::from(env!("CARGO_BIN_EXE_nvmux")),
            "not an eBPF object: its ELF machine is x86-64",
        ),
    ];
    for (obj, why) in cases {
        let e = load(&d, "b", &obj, json!([])).expect_err("must be refused");
        assert!(e.contains(why), "{}: {e}", obj.display());
        assert!(e.contains("disk \"b\": classifier"), "{e}");
    }
    // Missing file, unknown section, unknown map.
    let e = load(&d, "b", &d.dir.join("nope.o"), json!([])).unwrap_err();
    assert!(e.contains("nope.o"), "{e}");
    let e = d
        .api
        .post(
            "/v1/disks/b/classifier",
            &json!({"object": guard, "section": "other"}),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("there is no section \"other\""), "{e}");
    let e = load(
        &d,
        "b",
        &guard,
        json!([{"map": "nomap", "key": 0, "words": [1]}]),
    )
    .unwrap_err();
    assert!(e.contains("no map \"nomap\""), "{e}");
    // The guard is still the program, with its range, and still refuses.
    let v = d.api.get("/v1/disks/b/classifier").unwrap();
    assert_eq!(v["program"]["source"].as_str(), guard.to_str(), "{v}");
    assert_eq!(v["program"]["maps"][0]["values"][0]["words"], json!([0, 8]));
    let mut c = blkio(&sock);
    assert_eq!(write(&mut c, 0, &pattern(3, 4096)), -libc::EIO);
    assert_eq!(write(&mut c, 8 * 512, &pattern(3, 4096)), 0);
    // Removing it restores the default route.
    let v = d.api.delete("/v1/disks/b/classifier").unwrap();
    assert!(v["program"].is_null());
    assert_eq!(write(&mut c, 0, &pattern(3, 4096)), 0);
    drop(c);
    d.stop();
}

/// 16 requests of 4 KiB on each of two queues (buffer slot k at disk offset
/// `region + k * 4096`), all in flight at once; each must succeed.
fn batch(c: &mut BlkioClient, op: Op, region: u64, what: &str) {
    for (q, base) in [(0usize, 0u64), (1, 16)] {
        for slot in base..base + 16 {
            let r = nvmux_bench::client::Req {
                op,
                offset: region + slot * 4096,
                len: 4096,
                buf_off: (slot * 4096) as usize,
            };
            c.enqueue(q, r, slot as usize, ReqFlags::empty());
        }
    }
    for q in 0..2 {
        let mut out = [const { std::mem::MaybeUninit::uninit() }; 16];
        let n = c
            .reap(q, &mut out, 16, Duration::from_secs(20))
            .expect("requests complete");
        assert_eq!(n, 16);
        for o in out.iter().take(n) {
            // SAFETY: reap initialised the first n completions.
            let r = unsafe { o.assume_init_read() };
            assert_eq!(r.ret, 0, "{what}");
        }
    }
}

#[test]
fn hot_swap_under_a_verify_workload_loses_no_io() {
    watchdog(300);
    let d = TestDaemon::start("router-swap");
    let (_img, sock) = d.disk_and_export("s", 64 << 20, 2, json!({}));
    let progs: Vec<PathBuf> = ["passthrough", "fast_reads", "hook_chain", "guard"]
        .iter()
        .map(|n| compile_classifier(&d.dir, n))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let (st, sw) = (stop.clone(), swaps.clone());
    let api = nvmux_daemon::client::ApiClient::new(&d.dir.join("nvmux.sock"));
    let swapper = std::thread::spawn(move || {
        let mut i = 0;
        while !st.load(Ordering::Relaxed) {
            let r = if i % 5 == 4 {
                api.delete("/v1/disks/s/classifier").map(|_| ())
            } else {
                // The guard guards an empty range here: it routes, but refuses nothing.
                api.post(
                    "/v1/disks/s/classifier",
                    &json!({"object": progs[i % 5 % 4], "maps": []}),
                )
                .map(|_| ())
            };
            r.expect("swap");
            sw.fetch_add(1, Ordering::Relaxed);
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    // Verify workload: rounds of 32 writes of 4 KiB in flight on two queues, each with its
    // own pattern, then the 32 reads back, compared.
    let mut c = BlkioClient::connect(&sock, 2, false, 32 * 4096).expect("connect");
    let t0 = Instant::now();
    let mut rounds = 0u64;
    let mut ios = 0u64;
    while t0.elapsed() < Duration::from_secs(6) || swaps.load(Ordering::Relaxed) < 40 {
        for slot in 0..32u64 {
            let p = pattern(rounds * 1000 + slot, 4096);
            c.buf()[(slot * 4096) as usize..][..4096].copy_from_slice(&p);
        }
        let region = (rounds % 64) * (1 << 20);
        batch(
            &mut c,
            Op::Write,
            region,
            &format!("a write failed during the swaps (round {rounds})"),
        );
        c.buf()[..32 * 4096].fill(0);
        batch(&mut c, Op::Read, region, "a read failed during the swaps");
        for slot in 0..32u64 {
            let want = pattern(rounds * 1000 + slot, 4096);
            assert!(
                c.buf()[(slot * 4096) as usize..][..4096] == want[..],
                "round {rounds} slot {slot}: data differs"
            );
        }
        rounds += 1;
        ios += 64;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().expect("swapper");
    let v = d.api.get("/v1/disks/s/classifier").unwrap();
    eprintln!(
        "{rounds} verify rounds ({ios} I/Os) across {} program swaps; routes {}",
        swaps.load(Ordering::Relaxed),
        v["routes"]
    );
    assert!(swaps.load(Ordering::Relaxed) >= 40);
    assert!(
        v["routes"]["hooks"].as_u64().unwrap() > 0,
        "the hook program ran: {v}"
    );
    assert!(
        v["routes"]["fast"].as_u64().unwrap() > 0,
        "the fast path ran: {v}"
    );
    assert_eq!(v["routes"]["errors"].as_u64(), Some(0));
    let st = d.api.get("/v1/stats").unwrap();
    for op in ["read", "write"] {
        assert_eq!(st["disks"]["s"][op]["errors"].as_u64(), Some(0), "{st}");
        assert_eq!(st["disks"]["s"][op]["ops"].as_u64(), Some(ios / 2), "{st}");
    }
    drop(c);
    d.stop();
}

struct Function {
    child: Child,
}

/// The user the unprivileged function runs as.
const NOBODY: u32 = 65534;

impl Function {
    fn start(socket: &Path, args: &[&str], log: &Path) -> Function {
        Self::start_as(socket, args, log, None)
    }
    fn start_as(socket: &Path, args: &[&str], log: &Path, uid: Option<u32>) -> Function {
        use std::os::unix::process::CommandExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nvmux-fn-audit"));
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        let child = cmd
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .expect("spawn nvmux-fn-audit");
        Function { child }
    }
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_attached(d: &TestDaemon, disk: &str, attaches: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let v = d.api.get(&format!("/v1/disks/{disk}/classifier")).unwrap();
        if v["external"]["status"] == "attached"
            && v["external"]["attaches"].as_u64() >= Some(attaches)
        {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "function did not attach: {v}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn external_audit_function_serves_io_and_its_death_fails_only_its_commands() {
    watchdog(300);
    let d = TestDaemon::start("router-ext");
    let (img, sock) = d.disk_and_export("a", 64 << 20, 1, json!({}));
    let (img_b, sock_b) = d.disk_and_export("other", 16 << 20, 1, json!({}));
    let fsock = d.dir.join("a-fn.sock");
    // Without an owner only root may attach: an unprivileged process is refused by the
    // socket's permissions.
    d.api
        .post(
            "/v1/disks/a/external",
            &json!({"socket": fsock, "on_failure": "fail"}),
        )
        .expect("set external");
    let denied_log = d.dir.join("fn-denied.log");
    let mut denied = Function::start_as(&fsock, &["--null"], &denied_log, Some(NOBODY));
    assert!(!denied.child.wait().unwrap().success());
    let why = std::fs::read_to_string(&denied_log).unwrap();
    assert!(why.contains("Permission denied"), "{why}");
    // Given to the unprivileged user, the socket takes it.
    let owner = format!("{NOBODY}:{NOBODY}");
    let v = d
        .api
        .post(
            "/v1/disks/a/external",
            &json!({"socket": fsock, "on_failure": "fail", "owner": owner}),
        )
        .expect("set external");
    assert_eq!(v["external"]["status"], "waiting");
    load(
        &d,
        "a",
        &compile_classifier(&d.dir, "audit_writes"),
        json!([]),
    )
    .expect("load audit_writes");
    let mut c = blkio(&sock);
    let p = pattern(4, 8192);
    // No function attached yet: writes fail (on_failure = fail); reads take the chain.
    assert_eq!(write(&mut c, 0, &p), -libc::EIO);
    assert_eq!(read(&mut c, 0, 4096).0, 0);

    let audit = d.dir.join("audit.log");
    let mirror = d.dir.join("mirror.img");
    for p in [&audit, &mirror] {
        std::fs::File::create(p).unwrap();
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // The function runs unprivileged.
    let f = Function::start_as(
        &fsock,
        &[
            "--log",
            audit.to_str().unwrap(),
            "--mirror",
            mirror.to_str().unwrap(),
        ],
        &d.dir.join("fn.log"),
        Some(NOBODY),
    );
    let v = wait_attached(&d, "a", 1);
    assert_eq!(v["external"]["function"], "nvmux-fn-audit");
    assert!(v["external"]["pid"].as_i64().unwrap() > 0);
    for i in 0..10u64 {
        assert_eq!(write(&mut c, i * 65536, &pattern(100 + i, 8192)), 0);
    }
    // The data is on the disk and in the mirror, and each write is in the log with its CRC.
    for i in 0..10u64 {
        let want = pattern(100 + i, 8192);
        assert_eq!(read_file_at(&img, i * 65536, 8192), want);
        assert_eq!(read_file_at(&mirror, i * 65536, 8192), want);
    }
    let lines = log_lines(&audit);
    assert_eq!(lines.len(), 10, "{lines:?}");
    for (i, l) in lines.iter().enumerate() {
        let crc = nvmux_core::crc32c::crc32c(&pattern(100 + i as u64, 8192));
        assert!(
            l.contains(&format!(
                "a write slba={} nlb=16 bytes=8192 crc32c={crc:08x}",
                i as u64 * 128
            )),
            "{l}"
        );
    }

    // Load: writes at QD 16 in a loop; kill -9 the function in the middle.
    let mut ok = 0;
    let mut failed = 0;
    let mut killed = false;
    let mut f = Some(f);
    let t0 = Instant::now();
    let mut other = blkio(&sock_b);
    while t0.elapsed() < Duration::from_secs(4) {
        for i in 0..16u64 {
            c.enqueue(
                0,
                nvmux_bench::client::Req {
                    op: Op::Write,
                    offset: (1 << 20) + i * 4096,
                    len: 4096,
                    buf_off: (i * 4096) as usize,
                },
                i as usize,
                ReqFlags::empty(),
            );
        }
        let mut out = [const { std::mem::MaybeUninit::uninit() }; 16];
        let n = c
            .reap(0, &mut out, 16, Duration::from_secs(20))
            .expect("writes complete (or fail), never hang");
        for o in out.iter().take(n) {
            // SAFETY: reap initialised the first n completions.
            match unsafe { o.assume_init_read() }.ret {
                0 => ok += 1,
                r => {
                    assert_eq!(r, -libc::EIO);
                    failed += 1;
                }
            }
        }
        if !killed && ok >= 2000 {
            if let Some(f) = f.take() {
                f.kill9();
            }
            killed = true;
        }
        // The other disk keeps serving throughout.
        let q = pattern(ok + failed, 4096);
        assert_eq!(write(&mut other, 4096, &q), 0);
        assert_eq!(read_file_at(&img_b, 4096, 4096), q);
    }
    assert!(killed, "the load never got going ({ok} writes)");
    assert!(ok >= 2000 && failed > 0, "ok {ok}, failed {failed}");
    assert!(d.api.get("/v1/health").is_ok(), "the daemon keeps serving");
    let v = d.api.get("/v1/disks/a/classifier").unwrap();
    assert_ne!(v["external"]["status"], "attached", "{v}");
    assert!(v["routes"]["fallbacks"].as_u64().unwrap() > 0, "{v}");
    assert!(
        d.log().contains("external function detached"),
        "{}",
        d.log()
    );
    eprintln!("kill -9 under load: {ok} writes ok, {failed} failed with EIO");

    // A new process reattaches and the writes flow again.
    let before = log_lines(&audit).len();
    let _f2 = Function::start(
        &fsock,
        &[
            "--log",
            audit.to_str().unwrap(),
            "--mirror",
            mirror.to_str().unwrap(),
        ],
        &d.dir.join("fn.log"),
    );
    wait_attached(&d, "a", 2);
    assert_eq!(write(&mut c, 0, &p), 0);
    assert_eq!(read_file_at(&img, 0, 8192), p);
    assert_eq!(log_lines(&audit).len(), before + 1);

    // With on_failure = chain, the function's death sends its writes through the chain.
    d.api
        .post(
            "/v1/disks/a/external",
            &json!({"socket": fsock, "on_failure": "chain"}),
        )
        .expect("set external");
    drop(_f2); // its connection ended with the old socket
    let f3 = Function::start(&fsock, &["--null"], &d.dir.join("fn.log"));
    wait_attached(&d, "a", 1);
    assert_eq!(write(&mut c, 65536, &p), 0);
    f3.kill9();
    for i in 0..20u64 {
        let q = pattern(200 + i, 4096);
        assert_eq!(
            write(&mut c, (4 << 20) + i * 4096, &q),
            0,
            "write {i} after the function died"
        );
        assert_eq!(read_file_at(&img, (4 << 20) + i * 4096, 4096), q);
    }
    drop(c);
    drop(other);
    d.stop();
}

#[test]
fn fast_reads_skip_qos_but_never_crypt() {
    watchdog(120);
    let dir = common::unique_dir("router-fast");
    let kek = dir.join("kek");
    std::fs::write(&kek, [0x42u8; 32]).unwrap();
    std::fs::set_permissions(&kek, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = TestDaemon::start_with(dir, &["--kek-file", kek.to_str().unwrap()]);
    // An encrypted file disk: chain qos -> crypt, in the fair-share group of /tmp's device.
    let (img, sock) = d.disk_and_export("e", 16 << 20, 1, json!({"encrypt": true}));
    let v = d.api.get("/v1/disks/e").unwrap();
    assert_eq!(v["functions"], json!(["qos", "crypt", "mirror"]));
    let mut c = blkio(&sock);
    let p = pattern(9, 65536);
    assert_eq!(write(&mut c, 0, &p), 0);
    load(
        &d,
        "e",
        &compile_classifier(&d.dir, "fast_reads"),
        json!([]),
    )
    .expect("load fast_reads");
    let started = |d: &TestDaemon| {
        d.api.get("/v1/stats").unwrap()["disks"]["e"]["fair"]["started"]
            .as_u64()
            .expect("the disk is fair-shared")
    };
    let before = started(&d);
    for _ in 0..50 {
        // The fast path still decrypts: the guest reads its plaintext.
        assert_eq!(read(&mut c, 0, 65536), (0, p.clone()));
    }
    assert_eq!(
        started(&d),
        before,
        "reads bypassed qos (and its fair sharing)"
    );
    assert_eq!(write(&mut c, 65536, &p), 0);
    assert_eq!(started(&d), before + 1, "writes still go through qos");
    // And the fast path's writes would be encrypted too: what is on disk is ciphertext.
    assert_ne!(read_file_at(&img, 0, 65536), p);
    assert_ne!(read_file_at(&img, 65536, 65536), p);
    let v = d.api.get("/v1/disks/e/classifier").unwrap();
    assert_eq!(v["routes"]["fast"].as_u64(), Some(50), "{v}");
    assert_eq!(v["routes"]["chain"].as_u64(), Some(1), "{v}");
    drop(c);
    d.stop();
}

fn flush(c: &mut BlkioClient) -> i32 {
    c.io(0, Op::Flush, 0, 0, 0, ReqFlags::empty())
        .expect("flush completes")
}

fn cli(d: &TestDaemon, args: &[&str]) -> String {
    common::ok(
        Command::new(env!("CARGO_BIN_EXE_nvmux"))
            .arg("--api")
            .arg(d.dir.join("nvmux.sock"))
            .args(args),
    )
}

/// A classifier that completes every FLUSH gets its verdict only on a disk whose operator
/// opted in: otherwise the FLUSH goes to the device (counted as forced), and the opt-in
/// is a disk setting kept in state.json.
#[test]
fn a_classifier_cannot_complete_flush_without_the_opt_in() {
    watchdog(240);
    let dir = common::unique_dir("router-flush");
    let d = TestDaemon::start_in(dir.clone());
    let (_img, sock) = d.disk_and_export("f", 64 << 20, 1, json!({}));
    let obj = compile_classifier(&d.dir, "complete_flush");
    let v = load(&d, "f", &obj, json!([])).expect("load complete_flush");
    assert_eq!(v["allow_flush_complete"], false, "{v}");

    let mut c = blkio(&sock);
    let p = pattern(7, 4096);
    for i in 0..5u64 {
        assert_eq!(write(&mut c, i * 4096, &p), 0);
        assert_eq!(flush(&mut c), 0);
    }
    let v = d.api.get("/v1/disks/f/classifier").unwrap();
    assert_eq!(
        v["routes"]["complete"], 5,
        "the program completed them: {v}"
    );
    assert_eq!(
        v["routes"]["flushes_forced"], 5,
        "every FLUSH went to the device: {v}"
    );
    let (_, m) = d.api.call_raw("GET", "/metrics", None).expect("metrics");
    assert!(
        m.contains("nvmux_route_flushes_forced_total{disk=\"f\"} 5"),
        "{m}"
    );

    // Opt in (the CLI): the program's acknowledgement stands, nothing is forced.
    let out = cli(&d, &["disk", "flush-policy", "f", "allow"]);
    assert!(out.contains("without the device"), "{out}");
    for _ in 0..3 {
        assert_eq!(flush(&mut c), 0);
    }
    let v = d.api.get("/v1/disks/f/classifier").unwrap();
    assert_eq!(v["routes"]["complete"], 8, "{v}");
    assert_eq!(v["routes"]["flushes_forced"], 5, "{v}");
    assert_eq!(v["allow_flush_complete"], true, "{v}");
    drop(c);

    // The opt-in is kept across a restart; `deny` takes it back.
    d.stop();
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(
        state.contains("\"allow_flush_complete\": true")
            || state.contains("\"allow_flush_complete\":true"),
        "{state}"
    );
    let d = TestDaemon::start_in(dir);
    let v = d.api.get("/v1/disks/f/classifier").unwrap();
    assert_eq!(v["allow_flush_complete"], true, "{v}");
    let v = d
        .api
        .post(
            "/v1/disks/f/flush-policy",
            &json!({"allow_flush_complete": false}),
        )
        .unwrap();
    assert_eq!(v["allow_flush_complete"], false, "{v}");
    let mut c = blkio(&d.dir.join("f.sock"));
    assert_eq!(flush(&mut c), 0);
    let v = d.api.get("/v1/disks/f/classifier").unwrap();
    assert_eq!(v["routes"]["flushes_forced"], 1, "{v}");
    let state = std::fs::read_to_string(d.dir.join("state.json")).unwrap();
    assert!(!state.contains("allow_flush_complete"), "{state}");
    drop(c);
    d.stop();
}
