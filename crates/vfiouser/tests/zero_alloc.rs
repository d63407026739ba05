//! No allocation per I/O on the vfio-user NVMe path: the controller's I/O queues run on
//! real worker threads whose allocations this binary counts (the counting allocator the
//! daemon installs); after a warm-up, 20 000 reads and writes through PRP lists, with and
//! without shadow doorbells, must not move the workers' count. The guest is the crate's
//! test kit (guest memory in a memfd mapped as the client's DMA space, BAR0 accesses as
//! the session makes them); the disk is a real memory disk.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nvmux_core::alloc_count::CountingAlloc;
use nvmux_vfiouser::testkit::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const QD: u16 = 16;

/// The workers' allocation count, once they are asleep (a worker publishes its count
/// before it sleeps).
fn worker_allocs(g: &Guest) -> u64 {
    std::thread::sleep(Duration::from_millis(200));
    g.pool
        .workers()
        .iter()
        .map(|w| w.stats().allocs.load(Ordering::Relaxed))
        .sum()
}

/// `n` commands at QD16 on queue 1: 8-block (4 KiB) reads and 24-block writes (PRP
/// list), alternating.
fn drive(g: &mut Guest, n: u32) {
    let list = DATA + 0x30_0000;
    let mut issued = 0u32;
    let mut done = 0u32;
    let issue = |g: &mut Guest, issued: &mut u32| {
        let k = *issued;
        let slot = (k % QD as u32) as u64;
        let buf = DATA + slot * 0x4000;
        let (write, nlb) = if k.is_multiple_of(2) {
            (false, 8)
        } else {
            (true, 24)
        };
        let slba = (k as u64 * 97) % 4096 * 8;
        let my_list = list + slot * 64;
        let (e, pages) = Guest::rw_sqe(k as u16, write, slba, nlb, buf, my_list);
        g.write_list(my_list, &pages);
        g.submit(1, &e);
        *issued += 1;
    };
    for _ in 0..QD - 1 {
        issue(g, &mut issued);
    }
    while done < issued {
        let c = g.reap(1).expect("completion");
        assert_eq!((c.sct, c.sc), (0, 0), "{c:?}");
        done += 1;
        if issued < n {
            issue(g, &mut issued);
        }
    }
}

fn no_allocations(shadow: bool) {
    let dev = Arc::new(nvmux_backend::MemoryDevice::new(64 << 20, 512, false).expect("disk"));
    let mut g = Guest::new(dev, 1, 1);
    g.shadow = shadow;
    g.enable();
    g.setup_io(1, 64);
    drive(&mut g, 5_000);
    let before = worker_allocs(&g);
    assert!(before > 0, "the workers' allocations are not counted");
    drive(&mut g, 20_000);
    let after = worker_allocs(&g);
    assert_eq!(
        after - before,
        0,
        "the worker allocated {} times for 20000 commands (shadow doorbells {shadow})",
        after - before
    );
}

#[test]
fn no_allocation_per_io_mmio_doorbells() {
    no_allocations(false);
}

#[test]
fn no_allocation_per_io_shadow_doorbells() {
    no_allocations(true);
}
