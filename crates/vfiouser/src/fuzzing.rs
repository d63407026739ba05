//! Entry points of the fuzz targets `vfiouser_msg` (a client's byte stream with
//! descriptors, through a real session over a socketpair), `vfiouser_regs` (register
//! file and configuration space accesses) and `vfiouser_nvme` (the NVMe controller:
//! admin and I/O submission queue entries, doorbells, guest memory the controller reads
//! such as PRP lists and shadow doorbells), shared with the `replay_corpus` unit test.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::device::{Irqs, VfioDevice};
use crate::dma::DmaSpace;
use crate::nvme::{Doorbell, EnableParams, PciNvmeDevice, Shutdown, CC_EN, CSTS_RDY};
use crate::pci::{NvmePci, REGION_BAR0, REGION_CONFIG};
use crate::session::{Conn, Step};

/// A controller that accepts everything and does nothing.
#[derive(Default)]
pub struct NullController {
    pub doorbells: u64,
}

impl PciNvmeDevice for NullController {
    fn enable(&mut self, _p: &EnableParams) -> Result<(), String> {
        Ok(())
    }
    fn disable(&mut self) {}
    fn shutdown(&mut self, _kind: Shutdown) {}
    fn doorbell(&mut self, _db: Doorbell) {
        self.doorbells += 1;
    }
}

/// A fresh NVMe function with a null controller: 4 queues, 4 vectors.
pub fn null_function() -> NvmePci<NullController> {
    NvmePci::new(
        NullController::default(),
        Arc::new(Irqs::new(4)),
        Arc::new(DmaSpace::new()),
        4,
        255,
    )
}

fn memfd(size: i64) -> Option<OwnedFd> {
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vfiouser-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate of our own descriptor.
    unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
    Some(fd)
}

/// Send `data` with `fds` (SCM_RIGHTS) without blocking; false if nothing went out.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> bool {
    let mut cbuf = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; it points at live buffers below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        let n = fds.len().min(16);
        mh.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: pure computations; the buffer holds CMSG_SPACE(16 * 4) = 80 bytes <= 128.
        unsafe {
            mh.msg_controllen = libc::CMSG_SPACE((n * 4) as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((n * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, n);
        }
    }
    // SAFETY: mh points at live buffers.
    unsafe { libc::sendmsg(sock, &mh, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) > 0 }
}

/// A client stream: chunks of `[nfds: u8][len: u16 LE][len bytes]`; each chunk is sent
/// with `nfds % 4` descriptors (a 1 MiB memfd, so DMA_MAP can really map), then the
/// session serves what it has and the replies are drained.
pub fn fuzz_msg(data: &[u8]) {
    let Ok((client, server)) = UnixStream::pair() else {
        return;
    };
    let _ = client.set_nonblocking(true);
    let Ok(mut conn) = Conn::new(server, null_function()) else {
        return;
    };
    let mem = memfd(1 << 20);
    let mut rest = data;
    let mut sink = vec![0u8; 1 << 17];
    while rest.len() >= 3 {
        let nfds = (rest[0] % 4) as usize;
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let chunk = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let fds: Vec<RawFd> = mem
            .iter()
            .map(|m| m.as_raw_fd())
            .cycle()
            .take(nfds)
            .collect();
        if !chunk.is_empty() {
            send_with_fds(client.as_raw_fd(), chunk, &fds);
        }
        let step = conn.serve();
        while matches!((&client).read(&mut sink), Ok(n) if n > 0) {}
        if let Step::Closed(_) = step {
            break;
        }
    }
    let dev = conn.finish();
    assert_eq!(dev.dma().load().len(), 0);
}

/// Accesses: 12-byte records `[kind][len][offset: u16 LE][value: u64 LE]`: kind % 4 =
/// 0 BAR0 write, 1 BAR0 read, 2 config write, 3 config read; len % 9 bytes. Checks
/// CSTS.RDY only while CC.EN.
pub fn fuzz_regs(data: &[u8]) {
    let mut f = null_function();
    for r in data.chunks_exact(12) {
        let len = (r[1] % 9) as usize;
        let off = u16::from_le_bytes([r[2], r[3]]) as u64;
        let v = &r[4..4 + len];
        let (region, write) = match r[0] % 4 {
            0 => (REGION_BAR0, true),
            1 => (REGION_BAR0, false),
            2 => (REGION_CONFIG, true),
            _ => (REGION_CONFIG, false),
        };
        // The session's bounds check.
        let Some(info) = f.region_info(region) else {
            continue;
        };
        if off + len as u64 > info.size {
            continue;
        }
        if write {
            let _ = f.region_write(region, off, v);
        } else {
            let mut b = [0u8; 8];
            let _ = f.region_read(region, off, &mut b[..len]);
        }
        if f.regs.csts() & CSTS_RDY != 0 {
            assert!(f.regs.cc() & CC_EN != 0, "CSTS.RDY without CC.EN");
        }
    }
    f.reset();
    assert_eq!(f.regs.csts(), 0);
}

/// The NVMe controller under a hostile guest: a 1 MiB memory disk, 2 I/O queue pairs of
/// 16 entries created (with shadow doorbells when the first byte is odd), then records
/// `[kind]...`: kind % 5 = 0: an admin command (64 bytes) on the admin queue and its
/// doorbell; 1: `[qid][64 bytes]` an I/O command on queue 1 + qid % 2 and its doorbell;
/// 2: `[offset: u16 LE][value: u32 LE]` a BAR0 write (registers, doorbells, anything);
/// 3: `[offset: u16 LE][16 bytes]` guest memory written (PRP lists and data live at
/// `testkit::DATA`, the shadow doorbells at `SHADOW_DB`/`SHADOW_EI`; the offset is in
/// 16-byte units from 0); 4: the session's turn (`tick`). Ends with a controller reset:
/// nothing may panic, hang or leak a queue.
pub fn fuzz_nvme(data: &[u8]) {
    use crate::testkit::{Guest, ADMIN_ENTRIES, ASQ};
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let Ok(dev) = nvmux_backend::MemoryDevice::new(1 << 20, 512, false) else {
        return;
    };
    let mut g = Guest::new(Arc::new(dev), 2, 1);
    g.shadow = first & 1 == 1;
    g.enable();
    g.setup_io(2, 16);
    let mut atail = 0u16;
    let mut tails = [0u16; 3];
    while let Some((&kind, r)) = rest.split_first() {
        rest = r;
        match kind % 5 {
            0 => {
                let Some(e) = rest.get(..64) else { break };
                rest = &rest[64..];
                g.write_mem(ASQ + atail as u64 * 64, e);
                atail = (atail + 1) % ADMIN_ENTRIES;
                g.w32(0x1000, atail as u32);
            }
            1 => {
                let Some(e) = rest.get(..65) else { break };
                rest = &rest[65..];
                let qid = 1 + (e[0] % 2) as u16;
                let t = &mut tails[qid as usize];
                g.write_mem(crate::testkit::sq_base(qid) + *t as u64 * 64, &e[1..]);
                *t = (*t + 1) % 16;
                let v = *t;
                g.w32(0x1000 + qid as u64 * 8, v as u32);
            }
            2 => {
                let Some(e) = rest.get(..6) else { break };
                rest = &rest[6..];
                let off = u16::from_le_bytes([e[0], e[1]]) as u64 % crate::nvme::BAR0_SIZE;
                let v = u32::from_le_bytes([e[2], e[3], e[4], e[5]]);
                let _ = g.pci.region_write(REGION_BAR0, off & !3, &v.to_le_bytes());
            }
            3 => {
                let Some(e) = rest.get(..18) else { break };
                rest = &rest[18..];
                let off = u16::from_le_bytes([e[0], e[1]]) as u64 * 16;
                g.write_mem(off, &e[2..]);
            }
            _ => g.pci.tick(),
        }
    }
    g.pci.tick();
    g.disable();
    assert!(g.pci.ctrl.queue_count() == 0, "queues left after a reset");
}

/// A seed for `vfiouser_nvme`: reads and writes on both queues, an Identify, a Get Log
/// Page, a bad doorbell.
pub fn seed_nvme() -> Vec<u8> {
    use crate::testkit::{sqe, Guest, DATA};
    let mut v = vec![1u8];
    v.push(0);
    v.extend_from_slice(&sqe(0x06, 1, 0, DATA, 0, [1, 0, 0, 0, 0, 0]));
    v.push(0);
    v.extend_from_slice(&sqe(0x02, 2, 0, DATA, 0, [2 | 127 << 16, 0, 0, 0, 0, 0]));
    for k in 0..4u16 {
        let (e, _) = Guest::rw_sqe(k, k % 2 == 1, k as u64 * 8, 8, DATA + 0x1000, 0);
        v.push(1);
        v.push(k as u8);
        v.extend_from_slice(&e);
        v.push(4);
    }
    // A PRP list in guest memory, then a 12 KiB write through it.
    v.push(3);
    v.extend_from_slice(&(((DATA + 0x8000) / 16) as u16).to_le_bytes());
    v.extend_from_slice(&(DATA + 0x2000).to_le_bytes());
    v.extend_from_slice(&(DATA + 0x3000).to_le_bytes());
    let (e, _) = Guest::rw_sqe(9, true, 0, 24, DATA + 0x1000, DATA + 0x8000);
    v.push(1);
    v.push(0);
    v.extend_from_slice(&e);
    v.push(4);
    // A doorbell for a queue that does not exist.
    v.push(2);
    v.extend_from_slice(&(0x1000u16 + 3 * 8).to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.push(4);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(target: &str, f: fn(&[u8])) -> usize {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            let p = e.expect("entry").path();
            f(&std::fs::read(&p).expect("read seed"));
            n += 1;
        }
        assert!(n > 0, "empty corpus in {}", dir.display());
        n
    }

    #[test]
    fn replay_corpus() {
        assert!(replay("vfiouser_msg", fuzz_msg) >= 3);
        assert!(replay("vfiouser_regs", fuzz_regs) >= 1);
        assert!(replay("vfiouser_nvme", fuzz_nvme) >= 1);
    }

    /// Writes the seeds (run once with NVMUX_WRITE_SEEDS=1).
    #[test]
    fn write_seeds() {
        if std::env::var_os("NVMUX_WRITE_SEEDS").is_none() {
            return;
        }
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let seeds = crate::tests::seed_streams();
        std::fs::create_dir_all(base.join("vfiouser_msg")).unwrap();
        for (name, s) in seeds {
            std::fs::write(base.join("vfiouser_msg").join(format!("seed-{name}")), s).unwrap();
        }
        std::fs::create_dir_all(base.join("vfiouser_regs")).unwrap();
        std::fs::write(
            base.join("vfiouser_regs").join("seed-enable"),
            crate::tests::seed_regs(),
        )
        .unwrap();
        std::fs::create_dir_all(base.join("vfiouser_nvme")).unwrap();
        std::fs::write(base.join("vfiouser_nvme").join("seed-io"), seed_nvme()).unwrap();
    }
}
