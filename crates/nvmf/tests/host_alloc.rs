//! Zero heap allocations per I/O in the NVMe/TCP host's queue: the thread that drives a
//! `RemoteDevice` queue (submit, kick, poll, with reads and writes of 4 KiB to 128 KiB,
//! in-capsule and R2T writes) allocates nothing over 10 000 I/Os after a warm-up. The
//! counting allocator counts per thread, so the target's worker threads do not count.

mod hostkit;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hostkit::*;
use nvmux_core::alloc_count::{thread_allocs, CountingAlloc};
use nvmux_core::{AlignedBuf, BlockDevice, IoCommand, Opcode, SgList, Status};
use nvmux_nvmf::host::{RemoteDevice, RemoteSpec};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const QD: usize = 32;

#[test]
fn no_allocation_per_io() {
    let t = target();
    let dev = RemoteDevice::connect(RemoteSpec::new(NQN, vec![t.addr], HOSTNQN)).expect("connect");
    let mut q = dev.open_queue(QD as u32).expect("queue");
    let bufs: Vec<AlignedBuf> = (0..QD).map(|_| AlignedBuf::new(128 << 10)).collect();
    let mut free: VecDeque<IoCommand> = (0..QD)
        .map(|i| IoCommand::new(Opcode::Read, 0, 1, i as u64, SgList::with_capacity(4)))
        .collect();
    let mut done: Vec<(IoCommand, Status)> = Vec::with_capacity(QD * 2);
    let mut rng = Rng(99);
    let blocks = DEV_SIZE / 4096;
    let mut run = |n: usize, q: &mut dyn nvmux_core::BlockQueue| -> usize {
        let (mut issued, mut completed, mut failed) = (0, 0, 0);
        let t0 = Instant::now();
        while completed < n {
            assert!(t0.elapsed() < Duration::from_secs(120), "stuck");
            while issued < n {
                let Some(mut c) = free.pop_front() else { break };
                let nlb = 1 + (rng.next() % 32) as u32;
                c.opcode = if rng.next().is_multiple_of(2) {
                    Opcode::Write
                } else {
                    Opcode::Read
                };
                c.nlb = nlb;
                c.slba = rng.next() % (blocks - 32);
                c.sg.clear();
                c.sg.push(bufs[c.tag as usize].as_mut_ptr(), nlb as usize * 4096);
                q.submit(c);
                issued += 1;
            }
            wait_poll(q, &mut |c, s| done.push((c, s)));
            for (c, s) in done.drain(..) {
                if !s.is_ok() {
                    failed += 1;
                }
                completed += 1;
                free.push_back(c);
            }
        }
        failed
    };
    assert_eq!(run(3000, &mut *q), 0);
    let before = thread_allocs();
    assert_eq!(run(10_000, &mut *q), 0);
    let allocs = thread_allocs() - before;
    assert_eq!(allocs, 0, "allocations over 10 000 I/Os");
    // The counter does count on this thread.
    let b = thread_allocs();
    let v = std::hint::black_box(vec![1u8; 64]);
    assert!(thread_allocs() > b && v.len() == 64);
}
