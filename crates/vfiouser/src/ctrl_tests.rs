//! The NVMe controller driven as a guest driver would, through BAR0 and guest memory (a
//! memfd mapped as the client's DMA space), on a real memory disk and real worker
//! threads.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmux_core::BlockDevice;

use crate::device::VfioDevice;
use crate::nvme::{CSTS_CFS, CSTS_RDY};
use crate::testkit::*;

fn disk(mib: u64) -> Arc<dyn BlockDevice> {
    Arc::new(nvmux_backend::MemoryDevice::new(mib << 20, 512, false).unwrap())
}

fn ok(c: Completion) {
    assert_eq!((c.sct, c.sc), (0, 0), "{c:?}");
}

fn identify(g: &mut Guest, cns: u32, nsid: u32) -> (Completion, Vec<u8>) {
    let c = g.admin(&sqe(0x06, 9, nsid, DATA, 0, [cns, 0, 0, 0, 0, 0]));
    let mut b = vec![0u8; 4096];
    g.read_mem(DATA, &mut b);
    (c, b)
}

#[test]
fn identify_features_logs() {
    let mut g = Guest::new(disk(8), 4, 1);
    g.enable();
    assert_eq!(g.csts() & CSTS_RDY, CSTS_RDY);
    let (c, b) = identify(&mut g, 1, 0);
    ok(c);
    assert_eq!(&b[24..29], b"nvmux", "model");
    assert_eq!(&b[4..15], b"test-serial");
    assert_eq!(
        u16::from_le_bytes([b[256], b[257]]) & (1 << 8),
        1 << 8,
        "OACS DBBC"
    );
    assert_eq!(b[77], 5, "MDTS");
    assert_eq!(
        u32::from_le_bytes([b[516], b[517], b[518], b[519]]),
        1,
        "NN"
    );
    let (c, b) = identify(&mut g, 0, 1);
    ok(c);
    assert_eq!(
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    let (c, b) = identify(&mut g, 2, 0);
    ok(c);
    assert_eq!(&b[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    let (c, b) = identify(&mut g, 3, 1);
    ok(c);
    assert_eq!(b[0], 2, "NGUID descriptor");
    assert_eq!(identify(&mut g, 0, 7).0.sc, 0x0b, "invalid namespace");
    assert_eq!(identify(&mut g, 0x55, 0).0.sc, 0x02, "unknown CNS");
    // Number of queues: 8 asked, 4 granted.
    let c = g.admin(&sqe(0x09, 1, 0, 0, 0, [0x07, 7 << 16 | 7, 0, 0, 0, 0]));
    ok(c);
    assert_eq!(c.dw0, 3 << 16 | 3);
    // Features Linux sets.
    for (fid, v) in [(0x08u32, 0x0a01u32), (0x06, 1), (0x0b, 1 << 8), (0x04, 300)] {
        ok(g.admin(&sqe(0x09, 2, 0, 0, 0, [fid, v, 0, 0, 0, 0])));
        let c = g.admin(&sqe(0x0a, 3, 0, 0, 0, [fid, 0, 0, 0, 0, 0]));
        ok(c);
        assert_eq!(c.dw0, v, "feature {fid:#x}");
    }
    assert_eq!(
        g.admin(&sqe(0x09, 2, 0, 0, 0, [0x7e, 0, 0, 0, 0, 0])).sc,
        0x02
    );
    // Log pages: SMART, firmware, error, changed namespaces; an unknown one.
    for lid in [1u32, 2, 3, 4] {
        ok(g.admin(&sqe(
            0x02,
            4,
            0xffff_ffff,
            DATA,
            0,
            [lid | 127 << 16, 0, 0, 0, 0, 0],
        )));
    }
    let c = g.admin(&sqe(0x02, 4, 0, DATA, 0, [0x42 | 127 << 16, 0, 0, 0, 0, 0]));
    assert_eq!((c.sct, c.sc), (1, 0x09));
    // Abort, Keep Alive, an unknown opcode.
    assert_eq!(g.admin(&sqe(0x08, 5, 0, 0, 0, [0; 6])).dw0, 1);
    ok(g.admin(&sqe(0x18, 5, 0, 0, 0, [0; 6])));
    assert_eq!(g.admin(&sqe(0xee, 5, 0, 0, 0, [0; 6])).sc, 0x01);
    // An Identify whose buffer is outside the DMA: Data Transfer Error, counted.
    let c = g.admin(&sqe(0x06, 6, 0, MEM + 0x1000, 0, [1, 0, 0, 0, 0, 0]));
    assert_eq!(c.sc, 0x04);
    assert_eq!(g.shared.counters.bad_prps.load(Ordering::Relaxed), 1);
    assert_eq!(g.csts() & CSTS_CFS, 0);
}

/// The view's DMA region count follows the client: the regions an enabled controller sees,
/// none once the client (its controller) is gone.
#[test]
fn dma_region_count_ends_with_the_client() {
    let mut g = Guest::new(disk(1), 1, 1);
    g.enable();
    let shared = g.shared.clone();
    assert_eq!(shared.counters.dma_regions.load(Ordering::Relaxed), 1);
    drop(g);
    assert_eq!(shared.counters.dma_regions.load(Ordering::Relaxed), 0);
    assert!(!shared.connected());
}

#[test]
fn queue_creation_bounds() {
    let mut g = Guest::new(disk(8), 2, 1);
    g.enable();
    ok(g.admin(&sqe(0x09, 1, 0, 0, 0, [0x07, 1 << 16 | 1, 0, 0, 0, 0])));
    // qid past the granted queues, size 1, size past MQES + 1.
    assert_eq!(g.create_cq(3, 16, 1).sc, 0x01);
    assert_eq!(g.create_cq(1, 1, 1).sc, 0x02);
    assert_eq!(g.create_cq(1, 2048, 1).sc, 0x02);
    // A vector the function does not have.
    assert_eq!(
        (g.create_cq(1, 16, 9).sct, g.create_cq(1, 16, 9).sc),
        (1, 0x08)
    );
    // CQ memory outside the DMA.
    let c = g.admin(&sqe(
        0x05,
        3,
        0,
        MEM - 0x1000,
        0,
        [1023 << 16 | 1, 1 << 16 | 3, 0, 0, 0, 0],
    ));
    assert_eq!(c.sc, 0x04);
    ok(g.create_cq(1, 16, 1));
    assert_eq!(g.create_cq(1, 16, 1).sc, 0x01, "exists");
    // SQ on a CQ that does not exist, then twice on the same CQ.
    assert_eq!(
        (g.create_sq(1, 16, 2).sct, g.create_sq(1, 16, 2).sc),
        (1, 0x00)
    );
    ok(g.create_sq(1, 16, 1));
    ok(g.create_cq(2, 16, 2));
    assert_eq!(g.create_sq(2, 16, 1).sct, 1, "CQ 1 already has an SQ");
    // A CQ with an SQ cannot go; the SQ first.
    assert_eq!(g.admin(&sqe(0x04, 7, 0, 0, 0, [1, 0, 0, 0, 0, 0])).sc, 0x0c);
    ok(g.admin(&sqe(0x00, 7, 0, 0, 0, [1, 0, 0, 0, 0, 0])));
    // A CQ serves one SQ in its life.
    assert_eq!(g.create_sq(1, 16, 1).sct, 1, "CQ 1 served an SQ already");
    ok(g.admin(&sqe(0x04, 7, 0, 0, 0, [1, 0, 0, 0, 0, 0])));
    assert_eq!(g.admin(&sqe(0x00, 7, 0, 0, 0, [1, 0, 0, 0, 0, 0])).sc, 0x01);
    assert_eq!(g.csts() & CSTS_CFS, 0);
}

/// Writes then reads back through PRP1, PRP1+PRP2 and PRP lists on every queue, with
/// and without shadow doorbells; flush, write zeroes, deallocate.
fn data_path(shadow: bool) {
    let mut g = Guest::new(disk(16), 2, 2);
    g.shadow = shadow;
    g.enable();
    g.setup_io(2, 64);
    let list = DATA + 0x3f_0000;
    for (i, nlb) in [1u32, 8, 9, 16, 100, 256].iter().enumerate() {
        let qid = 1 + (i % 2) as u16;
        let slba = i as u64 * 512;
        // An odd offset in the first page (dword aligned) for some of them.
        let buf = DATA + 0x10_0000 + if i % 3 == 1 { 0x200 } else { 0 };
        let pattern: Vec<u8> = (0..*nlb as usize * 512)
            .map(|k| (k * 7 + i) as u8)
            .collect();
        g.write_mem(buf, &pattern);
        let (e, pages) = Guest::rw_sqe(10 + i as u16, true, slba, *nlb, buf, list);
        g.write_list(list, &pages);
        let c = g.io(qid, &e);
        ok(c);
        assert_eq!(c.cid, 10 + i as u16);
        assert_eq!(c.sqid, qid);
        let rbuf = DATA + 0x20_0000;
        g.write_mem(rbuf, &vec![0u8; pattern.len()]);
        let (e, pages) = Guest::rw_sqe(20, false, slba, *nlb, rbuf, list);
        g.write_list(list, &pages);
        ok(g.io(qid, &e));
        let mut back = vec![0u8; pattern.len()];
        g.read_mem(rbuf, &mut back);
        assert!(back == pattern, "read back {nlb} blocks on queue {qid}");
    }
    // Flush (nsid 1 and every namespace).
    ok(g.io(1, &sqe(0x00, 30, 1, 0, 0, [0; 6])));
    ok(g.io(1, &sqe(0x00, 31, 0xffff_ffff, 0, 0, [0; 6])));
    // Write Zeroes over the first block, read zeros.
    ok(g.io(2, &sqe(0x08, 32, 1, 0, 0, [0, 0, 0, 0, 0, 0])));
    let (e, _) = Guest::rw_sqe(33, false, 0, 1, DATA, list);
    ok(g.io(2, &e));
    let mut b = [1u8; 512];
    g.read_mem(DATA, &mut b);
    assert!(b.iter().all(|&x| x == 0));
    // Deallocate a range of 8 blocks at 512.
    let mut r = [0u8; 16];
    r[4..8].copy_from_slice(&8u32.to_le_bytes());
    r[8..16].copy_from_slice(&512u64.to_le_bytes());
    g.write_mem(DATA, &r);
    ok(g.io(1, &sqe(0x09, 34, 1, DATA, 0, [0, 1 << 2, 0, 0, 0, 0])));
    // A wrong namespace, an unknown opcode, a range past the end.
    assert_eq!(g.io(1, &sqe(0x02, 35, 2, DATA, 0, [0; 6])).sc, 0x0b);
    assert_eq!(g.io(1, &sqe(0x7e, 36, 1, DATA, 0, [0; 6])).sc, 0x01);
    let (e, _) = Guest::rw_sqe(37, false, (16 << 20) / 512, 1, DATA, list);
    assert_eq!(g.io(1, &e).sc, 0x80);
    // Many commands at once (more than fit one poll round), all completed.
    for k in 0..40u16 {
        let (e, _) = Guest::rw_sqe(100 + k, false, k as u64, 1, DATA + k as u64 * 4096, list);
        g.submit(1, &e);
    }
    let mut seen = 0u64;
    for _ in 0..40 {
        let c = g.reap(1).expect("completion");
        ok(c);
        seen |= 1 << (c.cid - 100);
    }
    assert_eq!(seen, (1 << 40) - 1);
    assert_eq!(g.csts() & CSTS_CFS, 0);
    assert!(g.shared.counters.io_commands.load(Ordering::Relaxed) >= 50);
    assert!(g.shared.counters.interrupts.load(Ordering::Relaxed) > 0);
}

#[test]
fn data_path_mmio_doorbells() {
    data_path(false);
}

#[test]
fn data_path_shadow_doorbells() {
    data_path(true);
}

#[test]
fn shadow_doorbells_set_after_queues_exist() {
    let mut g = Guest::new(disk(8), 1, 1);
    g.enable();
    g.setup_io(1, 16);
    let (e, _) = Guest::rw_sqe(1, false, 0, 1, DATA, 0);
    ok(g.io(1, &e));
    // Linux may send Doorbell Buffer Config after it created its queues.
    g.write_mem(SHADOW_DB, &[0u8; 4096]);
    g.write_mem(SHADOW_EI, &[0u8; 4096]);
    ok(g.admin(&sqe(0x7c, 2, 0, SHADOW_DB, SHADOW_EI, [0; 6])));
    // The controller copied its view of the doorbells into the shadow buffer.
    let mut b = [0u8; 8];
    g.read_mem(SHADOW_DB + 8, &mut b);
    assert_eq!(
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        1,
        "SQ1 tail"
    );
    g.shadow = true;
    for k in 0..50 {
        let (e, _) = Guest::rw_sqe(2 + k, false, k as u64, 1, DATA, 0);
        ok(g.io(1, &e));
    }
}

#[test]
fn bad_prps_fail_the_command() {
    let mut g = Guest::new(disk(8), 1, 1);
    g.enable();
    g.setup_io(1, 16);
    // Data page outside the DMA.
    let (e, _) = Guest::rw_sqe(1, false, 0, 8, MEM, 0);
    assert_eq!(g.io(1, &e).sc, 0x04);
    // PRP2 outside, and a PRP list entry outside.
    let e = sqe(0x01, 2, 1, DATA, MEM + 0x1000, [0, 0, 15, 0, 0, 0]);
    assert_eq!(g.io(1, &e).sc, 0x04, "PRP2 outside the DMA");
    let list = DATA + 0x10_0000;
    g.write_list(list, &[DATA + 0x1000, MEM + 0x8000]);
    let (e, _) = Guest::rw_sqe(3, true, 0, 24, DATA, list);
    assert_eq!(g.io(1, &e).sc, 0x04);
    // A list entry with an offset, PRP1 not dword aligned.
    g.write_list(list, &[DATA + 0x1000, DATA + 0x2010]);
    let (e, _) = Guest::rw_sqe(4, true, 0, 24, DATA, list);
    assert_eq!(g.io(1, &e).sc, 0x13);
    let (e, _) = Guest::rw_sqe(5, true, 0, 1, DATA + 2, 0);
    assert_eq!(g.io(1, &e).sc, 0x13);
    // A transfer past MDTS.
    let (e, _) = Guest::rw_sqe(6, true, 0, 257, DATA, list);
    assert_eq!(g.io(1, &e).sc, 0x02);
    assert!(g.shared.counters.bad_prps.load(Ordering::Relaxed) >= 2);
    // The queue goes on.
    let (e, _) = Guest::rw_sqe(7, false, 0, 1, DATA, 0);
    ok(g.io(1, &e));
    assert_eq!(g.csts() & CSTS_CFS, 0);
}

/// A bad doorbell write puts this controller in the fatal status; a reset brings it
/// back.
#[test]
fn bad_doorbells_are_fatal_for_the_controller_only() {
    for case in 0..5 {
        let mut g = Guest::new(disk(8), 2, 1);
        g.enable();
        g.setup_io(1, 16);
        match case {
            0 => g.w32(0x1000 + 2 * 8, 1),            // SQ 2 does not exist
            1 => g.w32(0x1000 + 8, 16),               // SQ 1 tail past its 16 entries
            2 => g.w32(0x1004 + 8, 99),               // CQ 1 head past its size
            3 => g.w32(0x1000, ADMIN_ENTRIES as u32), // admin SQ tail past its size
            _ => {
                let _ = g
                    .pci
                    .region_write(crate::pci::REGION_BAR0, 0x1000 + 8, &[1, 0]);
            }
        }
        assert_eq!(g.csts() & CSTS_CFS, CSTS_CFS, "case {case}");
        assert!(g.shared.counters.bad_doorbells.load(Ordering::Relaxed) >= 1);
        // Reset and start again: the controller works.
        g.disable();
        assert_eq!(g.csts(), 0);
        g.enable();
        g.setup_io(1, 16);
        let (e, _) = Guest::rw_sqe(1, false, 0, 1, DATA, 0);
        ok(g.io(1, &e));
    }
}

/// A shadow doorbell value past the queue's size (written where the worker reads it)
/// makes the controller fatal on the worker's side.
#[test]
fn bad_shadow_doorbell_is_fatal() {
    let mut g = Guest::new(disk(8), 1, 1);
    g.shadow = true;
    g.enable();
    g.setup_io(1, 16);
    g.write_mem(SHADOW_DB + 8, &500u32.to_le_bytes());
    g.w32(0x1000 + 8, 3); // wake it through BAR0 too
    let t = std::time::Instant::now();
    while g.csts() & CSTS_CFS == 0 && t.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(g.csts() & CSTS_CFS, CSTS_CFS);
}

#[test]
fn async_event_on_resize() {
    let mut g = Guest::new(disk(8), 1, 1);
    g.enable();
    ok(g.admin(&sqe(0x09, 1, 0, 0, 0, [0x0b, 1 << 8, 0, 0, 0, 0])));
    g.submit(0, &sqe(0x0c, 77, 0, 0, 0, [0; 6]));
    g.pci.tick();
    g.shared.capacity_changed();
    let c = g.reap(0).expect("AER completion");
    assert_eq!(c.cid, 77);
    assert_eq!(c.dw0, nvmux_nvmf::model::AEN_NS_CHANGED);
    // The changed namespace list names namespace 1.
    ok(g.admin(&sqe(
        0x02,
        5,
        0,
        DATA,
        0,
        [0x04 | 1023 << 16, 0, 0, 0, 0, 0],
    )));
    let mut b = [0u8; 8];
    g.read_mem(DATA, &mut b);
    assert_eq!(&b, &[1, 0, 0, 0, 0, 0, 0, 0]);
    // More AERs than the limit: the fifth fails.
    for k in 0..4 {
        g.submit(0, &sqe(0x0c, 80 + k, 0, 0, 0, [0; 6]));
    }
    let c = g.admin(&sqe(0x0c, 90, 0, 0, 0, [0; 6]));
    assert_eq!((c.cid, c.sct, c.sc), (90, 1, 0x05));
}

/// DMA_UNMAP of the memory the queues live in: the queues quiesce first; afterwards the
/// controller fails (CSTS.CFS) instead of touching the memory; the process lives on.
#[test]
fn unmap_under_the_queues() {
    let mut g = Guest::new(disk(8), 1, 1);
    g.enable();
    g.setup_io(1, 16);
    let (e, _) = Guest::rw_sqe(1, false, 0, 1, DATA, 0);
    ok(g.io(1, &e));
    g.pci.before_unmap(0, MEM, true);
    g.dma.unmap(0, MEM, true).unwrap();
    g.pci.after_unmap();
    g.w32(0x1000 + 8, 2);
    let t = std::time::Instant::now();
    while g.csts() & CSTS_CFS == 0 && t.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(g.csts() & CSTS_CFS, CSTS_CFS);
    g.disable();
}

/// Shutdown (CC.SHN) with queues in place completes; disabling stops the workers' queues.
#[test]
fn shutdown_and_reset() {
    let mut g = Guest::new(disk(8), 2, 2);
    g.enable();
    g.setup_io(2, 32);
    assert_eq!(g.pci.ctrl.io_sqs().len(), 2);
    let cc = g.r32(crate::nvme::reg::CC);
    g.w32(crate::nvme::reg::CC, cc | 1 << 14);
    assert_eq!(g.csts() & (3 << 2), 2 << 2, "shutdown complete");
    assert!(g.pci.ctrl.io_sqs().is_empty());
    g.disable();
    // The workers dropped the queues.
    let t = std::time::Instant::now();
    while g
        .pool
        .workers()
        .iter()
        .any(|w| w.stats().sources.load(Ordering::Relaxed) > 0)
        && t.elapsed().as_secs() < 5
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(g
        .pool
        .workers()
        .iter()
        .all(|w| w.stats().sources.load(Ordering::Relaxed) == 0));
}

/// The export: a client connects (VERSION), leaves; `connected` and the session count
/// follow, and the socket goes at `stop`.
#[test]
fn export_connected_follows_the_client() {
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("nvmux-vfu-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vfu.sock");
    let pool = nvmux_core::worker::WorkerPool::new(&Default::default()).unwrap();
    let exp = crate::VfioUserExport::start(
        disk(4),
        crate::ExportConfig {
            socket: sock.clone(),
            perms: Default::default(),
            num_queues: 2,
            serial: "exp".into(),
            read_only: false,
        },
        pool.workers().to_vec(),
        Arc::new(nvmux_core::stats::DiskStats::default()),
    )
    .unwrap();
    let wait = |f: &dyn Fn() -> bool| {
        let t = std::time::Instant::now();
        while !f() && t.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        f()
    };
    for round in 1..=2u64 {
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        c.write_all(&crate::tests::version_msg(1)).unwrap();
        assert!(wait(&|| exp.connected()), "round {round}: connected");
        drop(c);
        assert!(wait(&|| !exp.connected()), "round {round}: disconnected");
        assert_eq!(exp.status().sessions_total, round);
    }
    exp.stop();
    assert!(!sock.exists());
}

/// An idle queue sleeps (no CPU): the worker's sleep count stops moving, and with shadow
/// doorbells the event index asks the guest to trap on its next submission, which wakes
/// the worker.
#[test]
fn idle_queues_sleep_and_wake_on_the_doorbell() {
    let mut g = Guest::new(disk(8), 1, 1);
    g.shadow = true;
    g.enable();
    g.setup_io(1, 16);
    for round in 0..3u16 {
        let (e, _) = Guest::rw_sqe(round, false, 0, 1, DATA, 0);
        ok(g.io(1, &e));
        std::thread::sleep(std::time::Duration::from_millis(100));
        let w = &g.pool.workers()[0];
        let sleeps = w.stats().sleeps.load(Ordering::Relaxed);
        let busy = w.stats().busy_ns.load(Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            w.stats().sleeps.load(Ordering::Relaxed),
            sleeps,
            "the worker woke while idle"
        );
        assert_eq!(w.stats().busy_ns.load(Ordering::Relaxed), busy);
        // Asleep: the SQ event index equals the tail it has seen (the guest will trap).
        let mut b = [0u8; 4];
        g.read_mem(SHADOW_EI + 8, &mut b);
        assert_eq!(u32::from_le_bytes(b), (round as u32 + 1) % 16);
    }
}
