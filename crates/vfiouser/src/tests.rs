//! A hand-written client over a socketpair, for every message type and for malformed
//! messages; and the fuzz seeds built from the same requests.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use nvmux_core::eventfd::EventFd;

use crate::device::{Irqs, VfioDevice, IRQ_MSIX};
use crate::dma::DmaSpace;
use crate::fuzzing::send_with_fds;
use crate::nvme::tests::Recorder;
use crate::nvme::{reg, CC_EN, CSTS_RDY};
use crate::pci::{NvmePci, CLASS_NVME, REGION_BAR0, REGION_CONFIG, VENDOR_ID};
use crate::proto::*;
use crate::session::{Conn, Step};

const QEMU_CAPS: &[u8] = br#"{"capabilities": {"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, "max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": true}}"#;

/// A VERSION request as QEMU sends it, with id `id`.
pub(crate) fn version_msg(id: u16) -> Vec<u8> {
    request(id, cmd::VERSION, 0, &version_body())
}

fn version_body() -> Vec<u8> {
    let mut b = vec![0, 0, 0, 0];
    b.extend_from_slice(QEMU_CAPS);
    b.push(0);
    b
}

fn dma_map_body(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    let mut b = Vec::new();
    put_u32(&mut b, 32);
    put_u32(&mut b, flags);
    put_u64(&mut b, offset);
    put_u64(&mut b, iova);
    put_u64(&mut b, size);
    b
}

fn dma_unmap_body(flags: u32, iova: u64, size: u64) -> Vec<u8> {
    let mut b = Vec::new();
    put_u32(&mut b, 24);
    put_u32(&mut b, flags);
    put_u64(&mut b, iova);
    put_u64(&mut b, size);
    b
}

fn info_body(index: u32, argsz: u32, len: usize) -> Vec<u8> {
    let mut b = Vec::new();
    put_u32(&mut b, argsz);
    put_u32(&mut b, 0);
    put_u32(&mut b, index);
    b.resize(len, 0);
    b
}

fn rw_body(region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    put_u64(&mut b, offset);
    put_u32(&mut b, region);
    put_u32(&mut b, count);
    b.extend_from_slice(data);
    b
}

fn set_irqs_body(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut b = Vec::new();
    put_u32(&mut b, 20);
    put_u32(&mut b, flags);
    put_u32(&mut b, index);
    put_u32(&mut b, start);
    put_u32(&mut b, count);
    b
}

fn memfd(size: i64) -> OwnedFd {
    crate::dma::tests_memfd(size as u64)
}

struct Client {
    s: UnixStream,
    conn: Conn<NvmePci<Recorder>>,
    id: u16,
    closed: Option<Option<String>>,
}

impl Client {
    fn new() -> Client {
        let (s, server) = UnixStream::pair().unwrap();
        let dev = NvmePci::new(
            Recorder::default(),
            Arc::new(Irqs::new(4)),
            Arc::new(DmaSpace::new()),
            4,
            255,
        );
        Client {
            s,
            conn: Conn::new(server, dev).unwrap(),
            id: 0,
            closed: None,
        }
    }

    fn serve(&mut self) -> Step {
        let st = self.conn.serve();
        if let Step::Closed(w) = &st {
            self.closed = Some(w.clone());
        }
        st
    }

    fn send(&mut self, command: u16, flags: u32, body: &[u8], fds: &[RawFd]) {
        self.id = self.id.wrapping_add(1);
        let m = request(self.id, command, flags, body);
        if fds.is_empty() {
            self.s.write_all(&m).unwrap();
        } else {
            assert!(send_with_fds(self.s.as_raw_fd(), &m, fds));
        }
    }

    /// The reply waiting on the client side, if any.
    fn reply(&mut self) -> Option<(Header, Vec<u8>)> {
        self.s.set_nonblocking(true).unwrap();
        let mut h = [0u8; HDR];
        let r = self.s.read(&mut h);
        self.s.set_nonblocking(false).unwrap();
        match r {
            Ok(HDR) => {}
            Ok(0) | Err(_) => return None,
            Ok(n) => panic!("a short reply header of {n} bytes"),
        }
        let h = Header::parse(&h).unwrap();
        let mut body = vec![0u8; h.size as usize - HDR];
        self.s.read_exact(&mut body).unwrap();
        assert_eq!(h.flags & FLAG_TYPE_MASK, TYPE_REPLY);
        Some((h, body))
    }

    fn call_fds(&mut self, command: u16, body: &[u8], fds: &[RawFd]) -> (Header, Vec<u8>) {
        self.send(command, 0, body, fds);
        self.serve();
        let r = self.reply().expect("a reply");
        assert_eq!(r.0.id, self.id);
        assert_eq!(r.0.command, command);
        r
    }

    fn call(&mut self, command: u16, body: &[u8]) -> (Header, Vec<u8>) {
        self.call_fds(command, body, &[])
    }

    fn ok(&mut self, command: u16, body: &[u8]) -> Vec<u8> {
        let (h, b) = self.call(command, body);
        assert_eq!(
            h.flags & FLAG_ERROR,
            0,
            "{} failed with errno {}",
            command_name(command),
            h.error
        );
        b
    }

    fn err(&mut self, command: u16, body: &[u8]) -> Errno {
        let (h, _) = self.call(command, body);
        assert_ne!(
            h.flags & FLAG_ERROR,
            0,
            "{} succeeded",
            command_name(command)
        );
        h.error
    }

    fn negotiated() -> Client {
        let mut c = Client::new();
        let b = c.ok(cmd::VERSION, &version_body());
        assert_eq!(&b[..4], &[0, 0, 0, 0]);
        assert_eq!(b.last(), Some(&0));
        let caps = parse_caps(&b[4..b.len() - 1]).unwrap();
        assert_eq!(caps.max_msg_fds, MAX_MSG_FDS as u64);
        // QEMU receives the reply into its request's buffer.
        assert!(b.len() <= version_body().len());
        c
    }

    fn read_region(&mut self, region: u32, off: u64, n: u32) -> Vec<u8> {
        let b = self.ok(cmd::REGION_READ, &rw_body(region, off, n, &[]));
        assert_eq!(b.len(), 16 + n as usize);
        b[16..].to_vec()
    }

    fn write_region(&mut self, region: u32, off: u64, data: &[u8]) {
        self.ok(
            cmd::REGION_WRITE,
            &rw_body(region, off, data.len() as u32, data),
        );
    }
}

fn u32le(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

#[test]
fn every_message_type() {
    let mut c = Client::negotiated();
    // DEVICE_GET_INFO
    let b = c.ok(cmd::DEVICE_GET_INFO, &info_body(0, 16, 16));
    assert_eq!(u32le(&b[4..]), DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
    assert_eq!(u32le(&b[8..]), 9);
    assert_eq!(u32le(&b[12..]), 5);
    // DEVICE_GET_REGION_INFO: BAR0, BAR1 (absent), config; an unknown index.
    let b = c.ok(cmd::DEVICE_GET_REGION_INFO, &info_body(REGION_BAR0, 32, 32));
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0x4000);
    assert_eq!(u32le(&b[4..]), REGION_READ | REGION_WRITE);
    let b = c.ok(cmd::DEVICE_GET_REGION_INFO, &info_body(1, 32, 32));
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 0);
    let b = c.ok(
        cmd::DEVICE_GET_REGION_INFO,
        &info_body(REGION_CONFIG, 32, 32),
    );
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 4096);
    assert_eq!(
        c.err(cmd::DEVICE_GET_REGION_INFO, &info_body(99, 32, 32)),
        EINVAL
    );
    // DEVICE_GET_IRQ_INFO
    let b = c.ok(cmd::DEVICE_GET_IRQ_INFO, &info_body(IRQ_MSIX, 16, 16));
    assert_eq!(u32le(&b[12..]), 4);
    assert_eq!(
        c.err(cmd::DEVICE_GET_IRQ_INFO, &info_body(7, 16, 16)),
        EINVAL
    );
    // REGION_READ of the config space: vendor and class.
    let cfg = c.read_region(REGION_CONFIG, 0, 64);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), VENDOR_ID);
    assert_eq!(u32le(&cfg[8..]) >> 8, CLASS_NVME);
    // DMA_MAP with a memfd, read and written through the table.
    let m = memfd(0x10000);
    let (h, _) = c.call_fds(
        cmd::DMA_MAP,
        &dma_map_body(3, 0, 0x100000, 0x10000),
        &[m.as_raw_fd()],
    );
    assert_eq!(h.flags & FLAG_ERROR, 0);
    let t = c.conn.device().dma().load();
    t.translate(0x100000, 4, true).unwrap().write_from(b"nvmx");
    let mut got = [0u8; 4];
    // SAFETY: pread into a live buffer from our memfd.
    assert_eq!(
        unsafe { libc::pread(m.as_raw_fd(), got.as_mut_ptr().cast(), 4, 0) },
        4
    );
    assert_eq!(&got, b"nvmx");
    // REGION_WRITE to BAR0: admin queues, CC.EN → CSTS.RDY.
    c.write_region(REGION_BAR0, reg::AQA, &0x001f_001fu32.to_le_bytes());
    c.write_region(REGION_BAR0, reg::ASQ, &0x100000u64.to_le_bytes());
    c.write_region(REGION_BAR0, reg::ACQ, &0x101000u64.to_le_bytes());
    c.write_region(
        REGION_BAR0,
        reg::CC,
        &((6 << 16) | (4 << 20) | CC_EN).to_le_bytes(),
    );
    assert_eq!(
        u32le(&c.read_region(REGION_BAR0, reg::CSTS, 4)) & CSTS_RDY,
        CSTS_RDY
    );
    // A posted doorbell write (NO_REPLY) gets no reply.
    c.send(
        cmd::REGION_WRITE,
        FLAG_NO_REPLY,
        &rw_body(REGION_BAR0, 0x1000, 4, &1u32.to_le_bytes()),
        &[],
    );
    c.serve();
    assert!(c.reply().is_none());
    let ev = &c.conn.device().ctrl.events;
    assert_eq!(
        ev.last().map(String::as_str),
        Some("SqTail { qid: 0, tail: 1 }")
    );
    // DEVICE_SET_IRQS: two MSI-X eventfds, then a loopback trigger of vector 1.
    let (e0, e1) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    let (h, _) = c.call_fds(
        cmd::DEVICE_SET_IRQS,
        &set_irqs_body(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            IRQ_MSIX,
            0,
            2,
        ),
        &[e0.as_raw_fd(), e1.as_raw_fd()],
    );
    assert_eq!(h.flags & FLAG_ERROR, 0);
    c.ok(
        cmd::DEVICE_SET_IRQS,
        &set_irqs_body(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_MSIX, 1, 1),
    );
    assert_eq!(e1.drain(), 1);
    assert!(c.conn.device().irqs().signal_msix(0));
    assert_eq!(e0.drain(), 1);
    // DMA_UNMAP: an unmapped range unmaps nothing; a cut is refused; then the mapping.
    c.ok(cmd::DMA_UNMAP, &dma_unmap_body(0, 0x900000, 0x1000));
    assert_eq!(
        c.err(cmd::DMA_UNMAP, &dma_unmap_body(0, 0x101000, 0x1000)),
        EINVAL
    );
    c.ok(cmd::DMA_UNMAP, &dma_unmap_body(0, 0x100000, 0x10000));
    assert!(c.conn.device().dma().load().is_empty());
    // The table taken before the unmap still reads its memory.
    t.translate(0x100000, 4, false).unwrap().read_to(&mut got);
    assert_eq!(&got, b"nvmx");
    // DEVICE_RESET: the controller is disabled, the interrupts forgotten.
    c.ok(cmd::DEVICE_RESET, &[]);
    assert_eq!(u32le(&c.read_region(REGION_BAR0, reg::CSTS, 4)), 0);
    assert_eq!(c.conn.device().irqs().msix_set(), 0);
    assert_eq!(
        c.conn.device().ctrl.events.last().map(String::as_str),
        Some("disable")
    );
    assert!(c.closed.is_none());
}

#[test]
fn refused_requests_keep_the_connection() {
    let mut c = Client::negotiated();
    // REGION_READ past the region, of an absent region, at a wrapping offset.
    assert_eq!(
        c.err(cmd::REGION_READ, &rw_body(REGION_CONFIG, 4094, 4, &[])),
        EINVAL
    );
    assert_eq!(c.err(cmd::REGION_READ, &rw_body(3, 0, 4, &[])), EINVAL);
    assert_eq!(
        c.err(
            cmd::REGION_READ,
            &rw_body(REGION_BAR0, u64::MAX - 1, 4, &[])
        ),
        EINVAL
    );
    assert_eq!(
        c.err(cmd::REGION_WRITE, &rw_body(REGION_BAR0, 0x4000, 4, &[0; 4])),
        EINVAL
    );
    // DMA_MAP overlap, misalignment, too many maps.
    c.ok(cmd::DMA_MAP, &dma_map_body(3, 0, 0, 0x2000));
    assert_eq!(
        c.err(cmd::DMA_MAP, &dma_map_body(3, 0, 0x1000, 0x2000)),
        EEXIST
    );
    assert_eq!(
        c.err(cmd::DMA_MAP, &dma_map_body(3, 0, 0x10001, 0x1000)),
        EINVAL
    );
    for i in 1..MAX_DMA_MAPS as u64 {
        c.send(
            cmd::DMA_MAP,
            0,
            &dma_map_body(3, 0, 0x10000 + i * 0x1000, 0x1000),
            &[],
        );
        if i % 16 == 0 {
            c.serve();
            while c.reply().is_some() {}
        }
    }
    c.serve();
    while c.reply().is_some() {}
    assert_eq!(c.conn.device().dma().load().len(), MAX_DMA_MAPS);
    assert_eq!(
        c.err(cmd::DMA_MAP, &dma_map_body(3, 0, 1 << 40, 0x1000)),
        ENOSPC
    );
    // An unknown command and an unsupported one.
    assert_eq!(c.err(200, &[]), ENOSYS);
    assert_eq!(c.err(cmd::DMA_READ, &[0; 16]), ENOSYS);
    // Still served.
    c.ok(cmd::DEVICE_GET_INFO, &info_body(0, 16, 16));
    assert!(c.closed.is_none());
}

/// A malformed message: an error reply (if the header is whole), then the end.
fn malformed(send: impl FnOnce(&mut Client), errno: Option<Errno>) -> String {
    let mut c = Client::negotiated();
    send(&mut c);
    let st = c.serve();
    let Step::Closed(Some(why)) = st else {
        panic!("the connection was not cut: {st:?}")
    };
    if let Some(e) = errno {
        let (h, _) = c.reply().expect("an error reply");
        assert_ne!(h.flags & FLAG_ERROR, 0);
        assert_eq!(h.error, e);
    }
    // The device was reset and the DMA space emptied when the connection ended.
    let dev = c.conn.finish();
    assert!(dev.dma().load().is_empty());
    why
}

#[test]
fn malformed_messages_end_the_connection() {
    // message_size overflow and a size smaller than the header.
    let w = malformed(
        |c| {
            let mut m = request(9, cmd::REGION_WRITE, 0, &[0; 16]);
            m[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
            c.s.write_all(&m).unwrap();
        },
        Some(EINVAL),
    );
    assert!(w.contains("exceeds"), "{w}");
    malformed(
        |c| {
            let mut m = request(9, cmd::DEVICE_GET_INFO, 0, &[]);
            m[4..8].copy_from_slice(&8u32.to_le_bytes());
            c.s.write_all(&m).unwrap();
        },
        Some(EINVAL),
    );
    // Too many descriptors: 9 eventfds with a SET_IRQS.
    let efs: Vec<EventFd> = (0..9).map(|_| EventFd::new().unwrap()).collect();
    let raw: Vec<RawFd> = efs.iter().map(|e| e.as_raw_fd()).collect();
    let w = malformed(
        |c| {
            c.send(
                cmd::DEVICE_SET_IRQS,
                0,
                &set_irqs_body(
                    IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                    IRQ_MSIX,
                    0,
                    9,
                ),
                &raw,
            )
        },
        None,
    );
    assert!(w.contains("descriptors"), "{w}");
    // A descriptor with a REGION_READ.
    let m = memfd(4096);
    malformed(
        |c| {
            c.send(
                cmd::REGION_READ,
                0,
                &rw_body(REGION_CONFIG, 0, 4, &[]),
                &[m.as_raw_fd()],
            )
        },
        Some(EINVAL),
    );
    // A short payload; a REGION_WRITE whose count disagrees with its data.
    malformed(|c| c.send(cmd::DMA_MAP, 0, &[0; 8], &[]), Some(EINVAL));
    malformed(
        |c| {
            c.send(
                cmd::REGION_WRITE,
                0,
                &rw_body(REGION_BAR0, 0, 8, &[0; 4]),
                &[],
            )
        },
        Some(EINVAL),
    );
    // A reply from the client; a second VERSION.
    malformed(
        |c| c.send(cmd::DEVICE_GET_INFO, TYPE_REPLY, &info_body(0, 16, 16), &[]),
        None,
    );
    malformed(
        |c| c.send(cmd::VERSION, 0, &version_body(), &[]),
        Some(EINVAL),
    );
    // Anything before VERSION.
    let mut c = Client::new();
    c.send(cmd::DEVICE_GET_INFO, 0, &info_body(0, 16, 16), &[]);
    assert!(matches!(c.serve(), Step::Closed(Some(_))));
    assert_eq!(c.reply().map(|r| r.0.error), Some(EINVAL));
    // Descriptors that came with a refused message are closed: the memfd's only
    // other reference is `m`.
    drop(efs);
}

#[test]
fn partial_messages_wait_then_time_out() {
    let mut c = Client::negotiated();
    let m = request(5, cmd::DEVICE_GET_INFO, 0, &info_body(0, 16, 16));
    // A short header, then the rest of the header, then the body.
    c.s.write_all(&m[..7]).unwrap();
    assert!(matches!(c.serve(), Step::Wait { deadline: Some(_) }));
    c.s.write_all(&m[7..20]).unwrap();
    assert!(matches!(c.serve(), Step::Wait { deadline: Some(_) }));
    assert!(c.reply().is_none());
    c.s.write_all(&m[20..]).unwrap();
    assert!(matches!(c.serve(), Step::Wait { deadline: None }));
    assert!(c.reply().is_some());
    // The deadline is MESSAGE_TIMEOUT after the first partial byte.
    c.s.write_all(&m[..3]).unwrap();
    let t0 = std::time::Instant::now();
    let Step::Wait { deadline: Some(d) } = c.serve() else {
        panic!("not waiting")
    };
    assert!(d <= t0 + crate::session::MESSAGE_TIMEOUT + std::time::Duration::from_millis(50));
    // The client hangs up mid-message.
    drop(c.s);
    assert!(matches!(
        c.conn.serve(),
        Step::Closed(_) | Step::Wait { .. }
    ));
}

#[test]
fn server_task_serves_one_client_after_another() {
    use crate::session::ServerTask;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = std::env::temp_dir().join(format!("nvmux-vfiouser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let task = ServerTask::new(l, path.clone(), crate::fuzzing::null_function, stop.clone());
    let sessions = task.sessions.clone();
    let h = nvmux_core::ctlpoll::global().unwrap().add(Box::new(task));
    for round in 0..2 {
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(&request(1, cmd::VERSION, 0, &version_body()))
            .unwrap();
        let mut hb = [0u8; HDR];
        s.read_exact(&mut hb).unwrap();
        let hd = Header::parse(&hb).unwrap();
        assert_eq!(hd.flags & FLAG_ERROR, 0, "round {round}");
        let mut body = vec![0u8; hd.size as usize - HDR];
        s.read_exact(&mut body).unwrap();
        s.write_all(&request(
            2,
            cmd::REGION_READ,
            0,
            &rw_body(REGION_CONFIG, 0, 4, &[]),
        ))
        .unwrap();
        s.read_exact(&mut hb).unwrap();
        let hd = Header::parse(&hb).unwrap();
        let mut body = vec![0u8; hd.size as usize - HDR];
        s.read_exact(&mut body).unwrap();
        assert_eq!(u16::from_le_bytes([body[16], body[17]]), VENDOR_ID);
    }
    assert_eq!(sessions.load(Ordering::Relaxed), 2);
    stop.store(true, Ordering::Release);
    h.wake();
    assert!(h.wait_done_for(std::time::Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fuzz seeds: client streams in the `fuzz_msg` framing.
pub(crate) fn seed_streams() -> Vec<(&'static str, Vec<u8>)> {
    fn chunk(out: &mut Vec<u8>, nfds: u8, m: &[u8]) {
        out.push(nfds);
        out.extend_from_slice(&(m.len() as u16).to_le_bytes());
        out.extend_from_slice(m);
    }
    let v = request(1, cmd::VERSION, 0, &version_body());
    let mut hs = Vec::new();
    chunk(&mut hs, 0, &v);
    chunk(
        &mut hs,
        0,
        &request(2, cmd::DEVICE_GET_INFO, 0, &info_body(0, 16, 16)),
    );
    chunk(
        &mut hs,
        0,
        &request(3, cmd::DEVICE_GET_REGION_INFO, 0, &info_body(0, 32, 32)),
    );
    chunk(
        &mut hs,
        0,
        &request(4, cmd::DEVICE_GET_REGION_INFO, 0, &info_body(7, 32, 32)),
    );
    chunk(
        &mut hs,
        0,
        &request(5, cmd::DEVICE_GET_IRQ_INFO, 0, &info_body(2, 16, 16)),
    );
    chunk(
        &mut hs,
        0,
        &request(6, cmd::REGION_READ, 0, &rw_body(7, 0, 256, &[])),
    );
    let mut dma = Vec::new();
    chunk(&mut dma, 0, &v);
    chunk(
        &mut dma,
        1,
        &request(2, cmd::DMA_MAP, 0, &dma_map_body(3, 0, 0x100000, 0x100000)),
    );
    chunk(
        &mut dma,
        0,
        &request(3, cmd::DMA_MAP, 0, &dma_map_body(1, 0, 0xfee00000, 0x1000)),
    );
    chunk(
        &mut dma,
        0,
        &request(4, cmd::DMA_UNMAP, 0, &dma_unmap_body(0, 0x100000, 0x100000)),
    );
    chunk(
        &mut dma,
        0,
        &request(5, cmd::DMA_UNMAP, 0, &dma_unmap_body(DMA_UNMAP_ALL, 0, 0)),
    );
    let mut en = Vec::new();
    chunk(&mut en, 0, &v);
    chunk(
        &mut en,
        1,
        &request(2, cmd::DMA_MAP, 0, &dma_map_body(3, 0, 0, 0x100000)),
    );
    chunk(
        &mut en,
        0,
        &request(
            3,
            cmd::REGION_WRITE,
            0,
            &rw_body(0, 0x24, 4, &0x001f001fu32.to_le_bytes()),
        ),
    );
    chunk(
        &mut en,
        0,
        &request(
            4,
            cmd::REGION_WRITE,
            0,
            &rw_body(0, 0x28, 8, &0x1000u64.to_le_bytes()),
        ),
    );
    chunk(
        &mut en,
        0,
        &request(
            5,
            cmd::REGION_WRITE,
            0,
            &rw_body(0, 0x30, 8, &0x2000u64.to_le_bytes()),
        ),
    );
    chunk(
        &mut en,
        0,
        &request(
            6,
            cmd::REGION_WRITE,
            0,
            &rw_body(0, 0x14, 4, &0x00460001u32.to_le_bytes()),
        ),
    );
    chunk(
        &mut en,
        0,
        &request(
            7,
            cmd::REGION_WRITE,
            FLAG_NO_REPLY,
            &rw_body(0, 0x1000, 4, &1u32.to_le_bytes()),
        ),
    );
    chunk(
        &mut en,
        0,
        &request(8, cmd::REGION_WRITE, 0, &rw_body(7, 4, 2, &[6, 0])),
    );
    chunk(&mut en, 0, &request(9, cmd::DEVICE_RESET, 0, &[]));
    let mut irq = Vec::new();
    chunk(&mut irq, 0, &v);
    chunk(
        &mut irq,
        2,
        &request(
            2,
            cmd::DEVICE_SET_IRQS,
            0,
            &set_irqs_body(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 2, 0, 2),
        ),
    );
    chunk(
        &mut irq,
        1,
        &request(
            3,
            cmd::DEVICE_SET_IRQS,
            0,
            &set_irqs_body(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 0, 1),
        ),
    );
    chunk(
        &mut irq,
        0,
        &request(
            4,
            cmd::DEVICE_SET_IRQS,
            0,
            &set_irqs_body(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 0, 1),
        ),
    );
    chunk(
        &mut irq,
        0,
        &request(
            5,
            cmd::DEVICE_SET_IRQS,
            0,
            &set_irqs_body(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 2, 0, 0),
        ),
    );
    let mut bad = Vec::new();
    chunk(&mut bad, 0, &v);
    let mut m = request(2, cmd::REGION_WRITE, 0, &[0; 16]);
    m[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    chunk(&mut bad, 0, &m);
    vec![
        ("handshake", hs),
        ("dma", dma),
        ("enable", en),
        ("irqs", irq),
        ("bad-size", bad),
    ]
}

/// A register-file seed in the `fuzz_regs` framing: enable, doorbells, config writes.
pub(crate) fn seed_regs() -> Vec<u8> {
    let mut out = Vec::new();
    let mut op = |kind: u8, len: u8, off: u16, v: u64| {
        out.push(kind);
        out.push(len);
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    };
    op(0, 4, 0x24, 0x001f001f);
    op(0, 8, 0x28, 0x1000);
    op(0, 8, 0x30, 0x2000);
    op(0, 4, 0x14, 0x00460001);
    op(1, 4, 0x1c, 0);
    op(0, 4, 0x1000, 3);
    op(0, 4, 0x1004, 1);
    op(0, 4, 0x1ffc, 1);
    op(0, 4, 0x14, 0x00464001);
    op(2, 4, 0x10, 0xffff_ffff);
    op(3, 4, 0x10, 0);
    op(2, 2, 0x52, 0xc000);
    op(0, 4, 0x14, 0);
    out
}

#[test]
fn seeds_replay_through_the_fuzz_entry() {
    for (_, s) in seed_streams() {
        crate::fuzzing::fuzz_msg(&s);
    }
    crate::fuzzing::fuzz_regs(&seed_regs());
    // The eventfd of a set vector is an fd the session owns: nothing else leaks.
    let _ = EventFd::new().unwrap().as_fd();
}

/// A pipe's read end reads EOF only once every copy of its write end is closed: send
/// the write end with messages the session refuses, drop ours, and the read end must see
/// EOF (the session closed the received descriptor).
#[test]
fn refused_descriptors_are_closed() {
    use std::os::fd::FromRawFd;
    let refuse: [fn(&mut Client, RawFd); 3] = [
        // a descriptor with a REGION_READ (malformed: the connection ends)
        |c, fd| {
            c.send(
                cmd::REGION_READ,
                0,
                &rw_body(REGION_CONFIG, 0, 4, &[]),
                &[fd],
            )
        },
        // a DMA_MAP of a pipe (not a regular file: refused, the connection goes on)
        |c, fd| c.send(cmd::DMA_MAP, 0, &dma_map_body(3, 0, 0, 0x1000), &[fd]),
        // an MSI-X eventfd for a vector past the table (refused)
        |c, fd| {
            c.send(
                cmd::DEVICE_SET_IRQS,
                0,
                &set_irqs_body(
                    IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                    IRQ_MSIX,
                    7,
                    1,
                ),
                &[fd],
            )
        },
    ];
    for (i, f) in refuse.iter().enumerate() {
        let mut p = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `p`.
        assert_eq!(
            unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) },
            0
        );
        // SAFETY: fresh descriptors owned here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let mut c = Client::negotiated();
        f(&mut c, w.as_raw_fd());
        drop(w);
        c.serve();
        let mut b = [0u8; 1];
        // SAFETY: read into a live one-byte buffer.
        let n = unsafe { libc::read(r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        assert_eq!(
            n, 0,
            "case {i}: the session still holds the pipe's write end"
        );
    }
}

/// Through the control threads: a client that stalls mid-message is cut after
/// MESSAGE_TIMEOUT (its socket reads EOF).
#[test]
fn stalled_client_is_cut() {
    use crate::session::{ServerTask, MESSAGE_TIMEOUT};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("nvmux-vfiouser-stall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let task = ServerTask::new(l, path.clone(), crate::fuzzing::null_function, stop.clone());
    let h = nvmux_core::ctlpoll::global().unwrap().add(Box::new(task));
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(&request(1, cmd::VERSION, 0, &version_body()))
        .unwrap();
    let mut hb = [0u8; HDR];
    s.read_exact(&mut hb).unwrap();
    let mut body = vec![0u8; Header::parse(&hb).unwrap().size as usize - HDR];
    s.read_exact(&mut body).unwrap();
    // Half a header, then nothing.
    let t0 = Instant::now();
    s.write_all(&request(2, cmd::DEVICE_GET_INFO, 0, &info_body(0, 16, 16))[..7])
        .unwrap();
    s.set_read_timeout(Some(MESSAGE_TIMEOUT + Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    // EOF, or a reset (the server closed with our half header unread).
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("the server did not cut the stalled client: {r:?}"),
    }
    assert!(t0.elapsed() >= MESSAGE_TIMEOUT - Duration::from_millis(100));
    stop.store(true, Ordering::Release);
    h.wake();
    assert!(h.wait_done_for(Duration::from_secs(10)));
    let _ = std::fs::remove_dir_all(&dir);
}
