//! Guest memory a hostile vhost-user front-end pulls away, against the real daemon.
//!
//! * A region larger than its file is refused at SET_MEM_TABLE; nothing is mapped.
//! * A front-end whose memfd is not sealed shrinks it under a running queue and kicks:
//!   the daemon survives the SIGBUS, fails that device (log, API, metrics), refuses to
//!   start a queue on that memory table again, and a new table (a reconnect) works. A
//!   second disk under steady libblkio I/O sees no error throughout.
//! * SET_VRING_CALL sent 10000 times on a running queue does not grow the daemon's fds.

mod common;

use std::time::Duration;

use common::*;
use nvmux_bench::attack::{self, Victim};
use nvmux_bench::vufront::*;
use serde_json::{json, Value};
use vhost::VhostBackend;

fn export_memory(d: &TestDaemon, name: &str) -> Value {
    let v = d.api.get("/v1/exports").expect("list exports");
    let list = v
        .get("exports")
        .cloned()
        .unwrap_or(v)
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.into_iter()
        .find(|e| e["name"] == name)
        .map(|e| e["guest_memory"].clone())
        .unwrap_or_else(|| panic!("no export {name}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fd_count(pid: u32) -> usize {
    attack::fd_count(pid).expect("the daemon's descriptors")
}

#[test]
fn a_region_past_the_end_of_its_file_is_refused() {
    watchdog(120);
    let mut d = TestDaemon::start("shm-short");
    let (_img, sock) = d.disk_and_export("s", 4 << 20, 1, json!({}));
    let r = Guest::setup_with(
        &sock,
        GuestOpts {
            mem: MEM,
            file_size: Some(MEM as u64 / 2),
            reply_ack: true,
            ..GuestOpts::default()
        },
    );
    let e = r
        .err()
        .expect("a region larger than its file must be refused");
    assert!(e.starts_with("set_mem_table"), "{e}");
    assert!(
        d.log().contains("reaches past the file's end"),
        "{}",
        d.log()
    );
    let m = export_memory(&d, "s");
    assert_eq!(m["regions_refused"], 1, "{m}");
    assert_eq!(m["regions"], 0, "{m}");
    // The export serves a proper front-end afterwards; a sealed memfd is reported.
    let mut g = Guest::setup_with(
        &sock,
        GuestOpts {
            seal: true,
            ..GuestOpts::default()
        },
    )
    .expect("setup");
    assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
    let m = export_memory(&d, "s");
    assert_eq!(
        (m["regions"].as_u64(), m["regions_sealed"].as_u64()),
        (Some(1), Some(1)),
        "{m}"
    );
    assert!(d.healthy());
    drop(g);
    d.stop();
}

#[test]
fn a_shrinking_front_end_fails_only_its_own_device() {
    watchdog(180);
    let mut d = TestDaemon::start("shm-shrink");
    let (_vimg, vsock) = d.disk_and_export("victim", 8 << 20, 1, json!({}));
    let (_img, sock) = d.disk_and_export("evil", 4 << 20, 1, json!({}));
    let victim = Victim::vhost(&vsock).expect("victim I/O");

    // 1. The rings themselves go away: truncate the memfd to 0 and kick. The daemon's
    // next look at the available ring (on the kick, or right away if its worker is busy
    // polling) touches a lost page.
    let mut g = Guest::setup(&sock);
    assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
    assert_eq!(export_memory(&d, "evil")["device_failed"], false);
    g.resize_memory(0).expect("truncate guest memory");
    g.kick.write(1).expect("kick");
    wait_for("the device is failed", || {
        export_memory(&d, "evil")["device_failed"] == true
    });
    let m = export_memory(&d, "evil");
    assert_eq!(m["faults"], 1, "{m}");
    assert!(d.healthy(), "the daemon died: {}", d.log());
    assert!(
        d.log().contains("guest memory shrank under the device"),
        "{}",
        d.log()
    );
    let (_, metrics) = d.api.call_raw("GET", "/metrics", None).expect("metrics");
    assert!(
        metrics.contains("nvmux_export_guest_memory_faults_total{export=\"evil\",disk=\"evil\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nvmux_export_device_failed{export=\"evil\",disk=\"evil\"} 1"),
        "{metrics}"
    );
    // More kicks change nothing; the victim keeps going without an error.
    for _ in 0..10 {
        g.kick.write(1).expect("kick");
    }
    assert!(
        victim.progresses(50, Duration::from_secs(20)),
        "the victim stalled"
    );
    // No queue starts on that memory table again.
    let _ = g.front.get_vring_base(0);
    let _ = g.front.set_vring_kick(0, &g.kick);
    wait_for("the restart is refused", || {
        d.log()
            .contains("queue not started (the front-end must send a new memory table)")
    });
    assert!(d.healthy());
    drop(g);

    // 2. A reconnecting front-end with a new table gets a fresh start. This time only
    // the data area goes (the rings stay): GET_ID copies the serial into the lost pages.
    let mut g = Guest::setup(&sock);
    wait_for("a new table clears the failure", || {
        export_memory(&d, "evil")["device_failed"] == false
    });
    assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
    std::thread::sleep(Duration::from_millis(100));
    g.resize_memory(DATA).expect("shrink guest memory");
    const FAR: u64 = 0x80000; // past the new end of the file
    g.header(HDR, 8, 0); // GET_ID
    g.w(STATUS, 0xaau8);
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, FAR, 20, F_WRITE | F_NEXT, 2);
    g.desc(2, STATUS, 1, F_WRITE, 0);
    g.publish(0);
    g.kick.write(1).expect("kick");
    wait_for("the device is failed again", || {
        export_memory(&d, "evil")["device_failed"] == true
    });
    assert_eq!(export_memory(&d, "evil")["faults"], 2);
    // The device serves nothing more on this table.
    g.w(STATUS, 0xaau8);
    g.desc(1, DATA, 4096, F_WRITE | F_NEXT, 2);
    g.header(HDR, 0, 0);
    let used_before = g.r::<u16>(USED + 2);
    g.publish(0);
    g.kick.write(1).expect("kick");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        g.r::<u16>(USED + 2),
        used_before,
        "a failed device served a request"
    );
    assert!(d.healthy(), "the daemon died: {}", d.log());
    drop(g);

    let n = victim.finish().expect("the victim's I/O saw an error");
    assert!(n > 50);
    d.stop();
}

#[test]
fn replacing_the_call_fd_does_not_leak_descriptors() {
    watchdog(180);
    let mut d = TestDaemon::start("shm-call");
    let (_img, sock) = d.disk_and_export("c", 4 << 20, 1, json!({}));
    let mut g = Guest::setup(&sock);
    assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
    let before = fd_count(d.pid());
    for i in 0..10_000u32 {
        let call = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        g.front.set_vring_call(0, &call).expect("set_vring_call");
        if i % 1000 == 0 {
            // The queue keeps working, and signals the newest call fd.
            assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
        }
        g.call = call;
    }
    assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
    let after = fd_count(d.pid());
    // The current call fd plus at most two replaced ones waiting for the worker.
    assert!(
        after <= before + 3,
        "the daemon's descriptors grew from {before} to {after}"
    );
    assert!(d.healthy());
    drop(g);
    d.stop();
}

#[test]
fn added_regions_are_checked_and_served() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostUserMemoryRegionInfo;
    watchdog(120);
    let mut d = TestDaemon::start("shm-add");
    let (img, sock) = d.disk_and_export("r", 4 << 20, 1, json!({}));
    std::fs::write(&img, pattern(3, 4 << 20)).expect("fill image");
    // A front-end with REPLY_ACK and memory slots (ADD/REM_MEM_REG).
    let setup = || {
        Guest::setup_with(
            &sock,
            GuestOpts {
                reply_ack: true,
                mem_slots: true,
                ..GuestOpts::default()
            },
        )
        .expect("setup")
    };
    let mut g = setup();
    const GPA: u64 = 0x1000_0000;
    const UA: u64 = 0x7e00_0000_0000; // front-end address (never dereferenced here)
    let region = |f: &std::fs::File, size: u64, gpa: u64, ua: u64| VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: ua,
        mmap_offset: 0,
        mmap_handle: f.as_raw_fd(),
    };
    // A region past the end of its file is refused, and the connection with it.
    let short = memfd(64 << 10);
    assert!(g
        .front
        .add_mem_region(&region(&short, 1 << 20, GPA, UA))
        .is_err());
    assert_eq!(export_memory(&d, "r")["regions_refused"], 1);
    drop(g);
    let mut g = setup();
    // Overlapping the first region (guest addresses) is refused too.
    let extra = memfd(1 << 20);
    assert!(g
        .front
        .add_mem_region(&region(&extra, 1 << 20, 0x8000, UA))
        .is_err());
    assert_eq!(export_memory(&d, "r")["regions_refused"], 2);
    drop(g);
    let mut g = setup();
    // A proper region is added, and a read lands in it.
    g.front
        .add_mem_region(&region(&extra, 1 << 20, GPA, UA))
        .expect("add_mem_region");
    assert_eq!(export_memory(&d, "r")["regions"], 2);
    assert_eq!(request(&mut g, 0, GPA + 4096, 8192), (8193, 0));
    let mut got = vec![0u8; 8192];
    extra.read_exact_at(&mut got, 4096).expect("read region");
    assert_eq!(got, pattern(3, 8192));
    // Shrinking the added region's file fails the device like the first one's (GET_ID:
    // the daemon itself writes the serial there; a read would only get EFAULT from the
    // kernel, which fails that request alone).
    std::thread::sleep(Duration::from_millis(100));
    extra.set_len(0).expect("truncate");
    g.header(HDR, 8, 0);
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, GPA, 20, F_WRITE | F_NEXT, 2);
    g.desc(2, STATUS, 1, F_WRITE, 0);
    g.publish(0);
    g.kick.write(1).expect("kick");
    wait_for("the device is failed", || {
        export_memory(&d, "r")["device_failed"] == true
    });
    assert!(d.healthy(), "{}", d.log());
    // Removing the region works; the table stays failed until a new one.
    g.front
        .remove_mem_region(&region(&extra, 1 << 20, GPA, UA))
        .expect("remove_mem_region");
    assert_eq!(export_memory(&d, "r")["regions"], 1);
    assert!(d.healthy());
    drop(g);
    d.stop();
}
