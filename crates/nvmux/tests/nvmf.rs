//! NVMe/TCP target against a real daemon over real TCP sockets, with the independent
//! initiator in nvmux-bench: discovery, connect, identify, I/O with in-capsule data and
//! R2T, digests, deallocate, the host allow-list, namespace events, and bad PDUs.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use common::{pattern, watchdog, TestDaemon};
use nvmux_bench::nvmf::{Host, Queue, Sqe, DISCOVERY_NQN};
use serde_json::{json, Value};

const NQN: &str = "nqn.2026-11.io.nvmux:it";
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-000000000002";

/// A daemon with a 64 MiB file disk as namespace 1 of NQN on an ephemeral port,
/// HOST_A allowed. Returns the listener address and the namespace's API view.
fn setup(tag: &str) -> (TestDaemon, SocketAddr, Value) {
    let d = TestDaemon::start(tag);
    let img = d.dir.join("d1.img");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "d1", "path": img, "size": 64u64 << 20}),
        )
        .expect("disk");
    let v = d
        .api
        .post(
            "/v1/subsystems",
            &json!({"nqn": NQN, "listen": "127.0.0.1:0", "serial": "NVMUXIT01"}),
        )
        .expect("subsystem");
    let addr: SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(addr.port(), 0, "the bound port is reported");
    d.api
        .post(
            &format!("/v1/subsystems/{NQN}/hosts"),
            &json!({"host": HOST_A}),
        )
        .expect("allow host");
    let ns = d
        .api
        .post(
            &format!("/v1/subsystems/{NQN}/namespaces"),
            &json!({"disk": "d1"}),
        )
        .expect("namespace");
    (d, addr, ns)
}

fn io(h: &mut Host, q: usize, sqe: Sqe, data: Option<&[u8]>, read_len: usize) -> (u16, Vec<u8>) {
    let (c, d) = h.io[q].cmd(sqe, data, read_len).expect("I/O command");
    (c.status, d)
}

fn check_io(h: &mut Host) {
    // 4 KiB in the capsule, 64 KiB via R2T/H2CData, on both queues.
    for (q, lba, n) in [(0, 0u64, 8u32), (1, 1000, 128)] {
        let data = pattern(lba + 7, n as usize * 512);
        assert_eq!(io(h, q, Sqe::write(1, lba, n), Some(&data), 0).0, 0);
        let (st, back) = io(h, 1 - q, Sqe::read(1, lba, n), None, data.len());
        assert_eq!(st, 0);
        assert!(back == data, "read back what was written at LBA {lba}");
    }
}

#[test]
fn discover_connect_identify_io_and_events() {
    watchdog(120);
    let (d, addr, ns) = setup("nvmf-main");
    let nguid = ns["nguid"].as_str().unwrap().to_string();
    assert_eq!(ns["size"], 64u64 << 20);

    // Discovery lists the subsystem for an allowed host, and nothing for another.
    let mut disc = Host::connect(addr, DISCOVERY_NQN, HOST_A, 0, 0, false).expect("discovery");
    let id = disc.identify(1, 0).unwrap();
    assert_eq!(id[111], 2, "discovery controller type");
    let log = disc.discovery_log().unwrap();
    assert_eq!(
        log,
        vec![(
            NQN.to_string(),
            "127.0.0.1".to_string(),
            addr.port().to_string()
        )]
    );
    disc.shutdown().unwrap();
    // The default discovery policy (allow-list): a host on no allow-list is refused.
    let e = Host::connect(addr, DISCOVERY_NQN, HOST_B, 0, 0, false)
        .err()
        .expect("discovery refused");
    assert!(e.contains("sct 0x1 sc 0x84"), "{e}");

    // A host not on the allow-list: Connect Invalid Host (SCT 1, SC 0x84), logged.
    let e = Host::connect(addr, NQN, HOST_B, 1, 32, false)
        .err()
        .expect("refused");
    assert!(e.contains("sct 0x1 sc 0x84"), "{e}");
    assert!(
        d.log().contains(HOST_B),
        "the refusal is logged: {}",
        d.log()
    );

    // Allowed host, two I/O queues, with and without digests.
    for digests in [false, true] {
        let mut h = Host::connect(addr, NQN, HOST_A, 2, 128, digests).expect("connect");
        assert_eq!(h.io.len(), 2);
        let c = h.identify(1, 0).unwrap();
        assert_eq!(&c[4..24], b"NVMUXIT01           ");
        assert_eq!(String::from_utf8_lossy(&c[24..64]).trim(), "nvmux");
        assert_eq!(c[111], 1);
        let n = h.identify(0, 1).unwrap();
        assert_eq!(
            u64::from_le_bytes(n[0..8].try_into().unwrap()),
            (64 << 20) / 512
        );
        let got: String = n[104..120].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, nguid, "NGUID matches the API");
        check_io(&mut h);
        // Errors: LBA out of range, unknown namespace, unknown opcode.
        let blocks = (64u64 << 20) / 512;
        assert_eq!(
            io(&mut h, 0, Sqe::read(1, blocks - 1, 2), None, 1024).0,
            0x80
        );
        assert_eq!(io(&mut h, 0, Sqe::read(9, 0, 1), None, 512).0, 0x0b);
        assert_eq!(io(&mut h, 0, Sqe::new(0x7e, 1), None, 0).0, 0x01);
        h.shutdown().unwrap();
    }

    // Deallocate (two ranges) reads back zeros; write zeroes too.
    let mut h = Host::connect(addr, NQN, HOST_A, 1, 64, false).expect("connect");
    let data = pattern(1, 64 << 10);
    assert_eq!(io(&mut h, 0, Sqe::write(1, 2048, 128), Some(&data), 0).0, 0);
    // Two ranges in a page-sized buffer, as Linux sends them.
    let mut ranges = vec![0u8; 4096];
    ranges[4..8].copy_from_slice(&64u32.to_le_bytes());
    ranges[8..16].copy_from_slice(&2048u64.to_le_bytes());
    ranges[20..24].copy_from_slice(&32u32.to_le_bytes());
    ranges[24..32].copy_from_slice(&2112u64.to_le_bytes());
    let dsm = Sqe::new(0x09, 1).cdw(10, 1).cdw(11, 1 << 2);
    assert_eq!(io(&mut h, 0, dsm, Some(&ranges), 0).0, 0);
    let zeroes = Sqe::new(0x08, 1).cdw(10, 2144).cdw(12, 31);
    assert_eq!(io(&mut h, 0, zeroes, None, 0).0, 0);
    let (_, back) = io(&mut h, 0, Sqe::read(1, 2048, 128), None, 64 << 10);
    assert!(
        back.iter().all(|&b| b == 0),
        "deallocated and zeroed blocks read zeros"
    );

    // Namespace events: enable them, hold an AER, hot-add a namespace, grow it.
    let (c, _) = h
        .admin
        .cmd(Sqe::new(0x09, 0).cdw(10, 0x0b).cdw(11, 1 << 8), None, 0)
        .unwrap();
    assert!(c.ok());
    let aer = h.admin.send_cmd(Sqe::new(0x0c, 0), None, 0).unwrap();
    d.api
        .post(
            "/v1/pools",
            &json!({"name": "p", "path": d.dir.join("p.img"), "size": 256u64 << 20}),
        )
        .expect("pool");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "t1", "pool": "p", "size": 32u64 << 20}),
        )
        .expect("thin disk");
    let v = d
        .api
        .post(
            &format!("/v1/subsystems/{NQN}/namespaces"),
            &json!({"disk": "t1", "nsid": 2}),
        )
        .expect("hot-add");
    assert_eq!(v["nsid"], 2);
    let (c, _) = h.admin.next_completion().unwrap();
    assert_eq!(
        (c.cid, c.dw0),
        (aer, 0x0004_0002),
        "namespace attribute notice"
    );
    let log = h
        .admin
        .admin_read(Sqe::new(0x02, 0).cdw(10, 0x04 | 1023 << 16), 4096)
        .unwrap();
    assert_eq!(&log[..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
    let list = h.identify(2, 0).unwrap();
    assert_eq!(&list[..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    let aer = h.admin.send_cmd(Sqe::new(0x0c, 0), None, 0).unwrap();
    d.api
        .post("/v1/disks/t1/resize", &json!({"size": 48u64 << 20}))
        .expect("resize");
    let (c, _) = h.admin.next_completion().unwrap();
    assert_eq!((c.cid, c.dw0), (aer, 0x0004_0002));
    let n = h.identify(0, 2).unwrap();
    assert_eq!(
        u64::from_le_bytes(n[0..8].try_into().unwrap()),
        (48 << 20) / 512
    );
    // The grown tail is usable at once on the existing queue.
    let data = pattern(9, 4096);
    let lba = (40u64 << 20) / 512;
    assert_eq!(io(&mut h, 0, Sqe::write(2, lba, 8), Some(&data), 0).0, 0);
    assert_eq!(io(&mut h, 0, Sqe::read(2, lba, 8), None, 4096).1, data);

    // A disk that is a namespace cannot be deleted; the subsystem survives a restart.
    let e = d.api.delete("/v1/disks/d1").expect_err("busy");
    assert!(e.to_string().contains("namespace 1"), "{e}");
    h.shutdown().unwrap();
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let mut h = Host::connect(addr, NQN, HOST_A, 2, 128, false).expect("reconnect after restart");
    let n = h.identify(0, 1).unwrap();
    let got: String = n[104..120].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got, nguid, "NGUID is persisted");
    check_io(&mut h);
    drop(d);
}

/// Expect the controller to end this connection: a C2HTermReq and/or EOF.
fn expect_terminated(q: &mut Queue, what: &str) {
    let mut s = q.stream().try_clone().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        // Closed while our bytes were unread: a reset (the C2HTermReq may be lost).
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: connection not closed: {e}"),
    }
    assert!(
        buf.is_empty() || buf[0] == 0x03,
        "{what}: expected C2HTermReq or close, got {:?}",
        &buf[..buf.len().min(16)]
    );
}

fn cmd_header(plen: u32, pdo: u8, hlen: u8) -> Vec<u8> {
    let mut b = vec![0x04, 0, hlen, pdo];
    b.extend_from_slice(&plen.to_le_bytes());
    b
}

#[test]
fn bad_pdus_end_only_their_own_connection() {
    watchdog(120);
    let (d, addr, _) = setup("nvmf-bad");
    let mut good = Host::connect(addr, NQN, HOST_A, 2, 128, false).expect("connect");
    check_io(&mut good);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown PDU type", {
            let mut b = vec![0x0f, 0, 24, 0];
            b.extend_from_slice(&24u32.to_le_bytes());
            b.resize(24, 0);
            b
        }),
        ("PDU length shorter than its header", {
            let mut b = cmd_header(40, 0, 72);
            b.resize(72, 0);
            b
        }),
        ("wrong header length", {
            let mut b = cmd_header(80, 0, 80);
            b.resize(80, 0);
            b
        }),
        ("data offset past the PDU", {
            let mut b = cmd_header(100, 200, 72);
            b.resize(100, 0);
            b
        }),
        ("truncated command capsule then close", {
            let mut b = cmd_header(72 + 4096, 72, 72);
            b.resize(100, 0);
            b
        }),
        ("absurd PDU length", {
            let mut b = cmd_header(u32::MAX, 72, 72);
            b.resize(72, 0);
            b
        }),
    ];
    for (what, bytes) in cases {
        let mut q = Queue::open(addr, false, false).expect("open");
        let c = q.connect(0, 32, NQN, HOST_A, 0xffff).expect("connect");
        assert!(c.ok());
        q.raw(&bytes).unwrap();
        if what.starts_with("truncated") {
            q.stream().shutdown(std::net::Shutdown::Write).unwrap();
        }
        expect_terminated(&mut q, what);
        check_io(&mut good);
    }

    // Before ICReq: a command capsule is a sequence error.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::Write;
    let mut b = cmd_header(72, 0, 72);
    b.resize(72, 0);
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert_eq!(buf.first(), Some(&0x03), "C2HTermReq before ICReq");

    // H2CData outside the R2T's range, on an I/O queue of the good controller's host.
    let mut q = Queue::open(addr, false, false).unwrap();
    let c = q.connect(0, 32, NQN, HOST_A, 0xffff).unwrap();
    assert!(c.ok());
    q.prop_set(0x14, 1).unwrap();
    let n = 0u32;
    q.cmd(Sqe::new(0x09, 0).cdw(10, 7).cdw(11, n), None, 0)
        .unwrap();
    let cntlid = c.dw0 as u16;
    let mut io_q = Queue::open(addr, false, false).unwrap();
    assert!(io_q.connect(1, 32, NQN, HOST_A, cntlid).unwrap().ok());
    // A 64 KiB write: wait for its R2T, then answer past the requested range.
    let mut sqe = Sqe::write(1, 0, 128);
    sqe.0[2] = 0x55;
    sqe.0[32..36].copy_from_slice(&(64u32 << 10).to_le_bytes());
    sqe.0[39] = 0x5a;
    let mut pdu = vec![0x04, 0, 72, 0];
    pdu.extend_from_slice(&72u32.to_le_bytes());
    pdu.extend_from_slice(&sqe.0);
    io_q.raw(&pdu).unwrap();
    let r2t = io_q.recv().unwrap();
    assert_eq!(r2t.ty, 0x09);
    let ttag = u16::from_le_bytes([r2t.hdr[2], r2t.hdr[3]]);
    let mut h2c = vec![0x06, 0x04, 24, 24];
    h2c.extend_from_slice(&(24u32 + 4096).to_le_bytes());
    h2c.extend_from_slice(&0x55u16.to_le_bytes());
    h2c.extend_from_slice(&ttag.to_le_bytes());
    h2c.extend_from_slice(&(63u32 << 10).to_le_bytes()); // 63 KiB + 4 KiB > 64 KiB
    h2c.extend_from_slice(&4096u32.to_le_bytes());
    h2c.extend_from_slice(&[0; 4]);
    h2c.resize(24 + 4096, 0xab);
    io_q.raw(&h2c).unwrap();
    expect_terminated(&mut io_q, "H2CData past the R2T range");
    check_io(&mut good);
    assert!(d.log().contains("terminated"), "protocol errors are logged");
    good.shutdown().unwrap();
}
