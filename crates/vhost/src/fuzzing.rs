//! Fuzz harness for request parsing (used by `fuzz/` and by the corpus replay test).
//!
//! The input becomes 64 KiB of guest memory at guest address 0 holding a virtqueue
//! (descriptor table at 0x0, available ring at 0x1000, used ring at 0x2000, 16 entries)
//! whose chains are walked by [`SplitQueue`] and parsed by [`blk::parse`]. Whatever the bytes,
//! nothing may panic, and every accepted request must stay inside guest memory and match
//! its block count; so must the ranges the dirty log would mark for it.

use nvmux_core::{DeviceInfo, Opcode, SgList};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::blk::{self, Kind};
use crate::split::{RingAddrs, SplitQueue};
use crate::vring::MemView;

const MEM: usize = 64 << 10;

pub fn fuzz_one(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let info = DeviceInfo {
        block_size: if data[0] & 1 == 0 { 512 } else { 4096 },
        num_blocks: 1 << 20,
        read_only: data[0] & 2 != 0,
        discard: true,
        write_zeroes: true,
        volatile_cache: true,
        max_transfer: 1 << 20,
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let bytes = &data[1..];
    let n = bytes.len().min(MEM);
    use vm_memory::Bytes;
    if mem.write_slice(&bytes[..n], GuestAddress(0)).is_err() {
        return;
    }
    let view = MemView(&mem);
    let addrs = RingAddrs {
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
    };
    let Some(mut q) = SplitQueue::new(&view, 16, addrs, data[0] & 4 != 0) else {
        return;
    };
    let base = mem_base(&mem);
    let inside = |p: usize, len: usize| p >= base && p + len <= base + MEM;
    let mut sg = SgList::default();
    let mut segs = Vec::new();
    let mut ranges = Vec::new();
    for _ in 0..32 {
        let Ok(Some((head, chain))) = q.pop(&view, &mut segs) else {
            break;
        };
        if chain.is_ok() {
            if let Ok(r) = blk::parse(&segs, &view, &info, &mut sg) {
                assert!(
                    inside(r.status as usize, 1),
                    "status byte outside guest memory"
                );
                for v in sg.segments() {
                    assert!(
                        inside(v.iov_base as usize, v.iov_len),
                        "data segment outside guest memory"
                    );
                }
                // What the dirty log would mark for this request: bounded, and inside
                // guest memory (the payload and status byte parse checked).
                crate::log::record_writes(&segs, r.used_len.saturating_sub(1) as u64, &mut ranges);
                assert!(ranges.len() <= crate::log::MAX_WRITE_RANGES);
                for &(gpa, len) in &ranges {
                    assert!(
                        len > 0 && gpa.checked_add(len).is_some_and(|e| e <= MEM as u64),
                        "dirty-log range {gpa:#x}+{len:#x} outside guest memory"
                    );
                }
                if r.error.is_none() {
                    if let Kind::Io(op @ (Opcode::Read | Opcode::Write)) = r.kind {
                        assert_eq!(
                            sg.len(),
                            r.blocks as u64 * info.block_size as u64,
                            "{op:?} length"
                        );
                        assert!(sg.len() <= blk::MAX_REQUEST_BYTES);
                    }
                }
            }
        }
        q.add_used(head, 1);
    }
    q.publish();
    let _ = q.needs_notification();
    let _ = q.enable_notification();
}

/// Fuzz the recovery of a hostile inflight region (`inflight::recover`), then the tracker
/// on what it left. Input: `[cap_lo, cap_hi, vring, used_lo, used_hi, avail_lo, avail_hi,
/// region bytes...]`. Whatever the bytes: no panic, resubmitted heads inside the ring,
/// distinct, oldest first and no more than the guest made available; a second recovery
/// finds the region consistent.
pub fn fuzz_inflight(data: &[u8]) {
    use crate::inflight::{queue_bytes, recover, QueueMem, Tracker};
    if data.len() < 7 {
        return;
    }
    let cap = (u16::from_le_bytes([data[0], data[1]]) % crate::MAX_QUEUE_SIZE) + 1;
    let vring = (data[2] as u16 % cap) + 1;
    let used = u16::from_le_bytes([data[3], data[4]]);
    let avail = u16::from_le_bytes([data[5], data[6]]);
    let mut buf = vec![0u64; queue_bytes(cap) / 8];
    {
        // SAFETY: viewing our own u64 buffer as bytes.
        let bytes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len() * 8) };
        let src = &data[7..];
        let n = src.len().min(bytes.len());
        bytes[..n].copy_from_slice(&src[..n]);
    }
    // SAFETY: the buffer holds queue_bytes(cap) bytes, 8-aligned, and outlives `q`.
    let q = unsafe { QueueMem::new(buf.as_mut_ptr().cast(), cap) };
    let r = recover(&q, vring, used, avail);
    let counter_of = |h: u16| buf[(16 + 16 * h as usize + 8) / 8];
    let mut seen = vec![false; cap as usize];
    let mut last = 0u64;
    for (k, &h) in r.resubmit.iter().enumerate() {
        assert!(h < vring, "head {h} beyond the ring ({vring})");
        assert!(!seen[h as usize], "head {h} twice");
        seen[h as usize] = true;
        let c = u64::from_le(counter_of(h));
        assert!(k == 0 || c >= last, "not oldest first");
        last = c;
    }
    assert!(r.resubmit.len() <= avail.wrapping_sub(used) as usize);
    match r.next_avail {
        Some(n) => assert_eq!(n, used.wrapping_add(r.resubmit.len() as u16)),
        None => assert!(r.resubmit.is_empty()),
    }
    let again = recover(&q, vring, used, avail);
    assert!(!again.fresh && again.unknown_version.is_none() && again.batch_fixed == 0);
    assert_eq!(again.resubmit, r.resubmit);
    // The tracker on what recovery left: complete the resubmitted heads.
    let mut t = Tracker::new(q, vring, r.counter, None);
    for &h in &r.resubmit {
        t.used(h);
    }
    let done = used.wrapping_add(r.resubmit.len() as u16);
    t.published(done);
    let after = recover(&q, vring, done, avail);
    assert!(after.resubmit.is_empty() && after.batch_fixed == 0);
}

fn mem_base(mem: &GuestMemoryMmap) -> usize {
    use crate::blk::GuestMem;
    MemView(mem).host_ptr(0, 1).map_or(0, |p| p as usize)
}

#[cfg(test)]
mod tests {
    /// Replay the checked-in fuzz corpus on stable Rust, so a target cannot rot.
    #[test]
    fn replay_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/virtio_blk_request");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            let p = e.expect("entry").path();
            super::fuzz_one(&std::fs::read(&p).expect("read seed"));
            n += 1;
        }
        assert!(n > 0, "empty corpus in {}", dir.display());
    }

    #[test]
    fn replay_inflight_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/inflight_recover");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            let p = e.expect("entry").path();
            super::fuzz_inflight(&std::fs::read(&p).expect("read seed"));
            n += 1;
        }
        assert!(n > 0, "empty corpus in {}", dir.display());
    }

    #[test]
    fn random_inflight_regions() {
        let mut x = 0x0bad_cafe_f00d_1234u64;
        for len in [7usize, 40, 300, 2200, 17000] {
            for _ in 0..100 {
                let v: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Mostly small bytes, so flags of 0 and 1 and short lists occur.
                        if x & 0x300 == 0 {
                            x as u8
                        } else {
                            (x as u8) & 1
                        }
                    })
                    .collect();
                super::fuzz_inflight(&v);
            }
        }
    }

    #[test]
    fn random_inputs() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in [2usize, 16, 300, 5000, 70000] {
            for _ in 0..50 {
                let v: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                super::fuzz_one(&v);
            }
        }
    }
}
