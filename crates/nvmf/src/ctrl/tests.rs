use super::*;
use nvmux_backend::MemoryDevice;
use nvmux_core::Opcode;

const NQN: &str = "nqn.2026-11.io.nvmux:test";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

struct R(Arc<Subsystem>);
impl Resolver for R {
    fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        (nqn == self.0.nqn).then(|| self.0.clone())
    }
    fn discovery_log(&self, _: &str, _: std::net::SocketAddr) -> (u64, Vec<DiscoveryEntry>) {
        (1, Vec::new())
    }
    fn refused(&self, _: &str) {}
}

fn ns(nsid: u32, mib: u64) -> Namespace {
    Namespace {
        nsid,
        disk: format!("d{nsid}"),
        dev: Arc::new(MemoryDevice::new(mib << 20, 512, false).unwrap()),
        stats: Arc::new(DiskStats::default()),
        nguid: [nsid as u8; 16],
    }
}

fn sqe(op: u8, nsid: u32, cdw10: u32, cdw11: u32) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0] = op;
    put32(&mut b, 4, nsid);
    put32(&mut b, 40, cdw10);
    put32(&mut b, 44, cdw11);
    b
}

fn connect_cmd(qid: u16, entries: u16, host: &str, cntlid: u16) -> ([u8; 64], Vec<u8>) {
    let mut b = [0u8; 64];
    b[0] = 0x7f;
    b[4] = 0x01;
    put16(&mut b, 42, qid);
    put16(&mut b, 44, entries - 1);
    let mut d = vec![0u8; 1024];
    d[0] = 9;
    put16(&mut d, 16, cntlid);
    put_str(&mut d, 256, 256, NQN);
    put_str(&mut d, 512, 256, host);
    (b, d)
}

fn at() -> Where {
    let a: std::net::SocketAddr = ([127, 0, 0, 1], 4420).into();
    Where {
        listen: a,
        local: a,
    }
}

fn enabled(r: &R) -> Arc<Controller> {
    let (c, d) = connect_cmd(0, 32, HOST, 0xffff);
    let ctrl = connect(r, Sqe(&c), &d, "test").ok().unwrap().ctrl;
    let mut p = [0u8; 64];
    p[0] = 0x7f;
    p[4] = 0x00;
    put32(&mut p, 44, 0x14);
    put64(&mut p, 48, 1);
    let mut out = Vec::new();
    assert_eq!(
        ctrl.admin(r, at(), Sqe(&p), &mut out, 0),
        Outcome::Done(Cqe::ok(0))
    );
    assert!(ctrl.enabled());
    ctrl
}

#[test]
fn connect_checks_the_allow_list() {
    let sub = Subsystem::new(NQN, "SN1");
    let r = R(sub.clone());
    let (c, d) = connect_cmd(0, 32, HOST, 0xffff);
    let e = connect(&r, Sqe(&c), &d, "test").err().unwrap();
    assert_eq!(e.status, sc::CONNECT_INVALID_HOST);
    sub.set_hosts(false, [HOST.to_string()].into());
    assert!(connect(&r, Sqe(&c), &d, "test").is_ok());
    // Unknown subsystem: invalid parameter, pointing at SUBNQN in the data.
    let mut d2 = d.clone();
    d2[256..512].fill(0);
    put_str(&mut d2, 256, 256, "nqn.x:nope");
    let e = connect(&r, Sqe(&c), &d2, "test").err().unwrap();
    assert_eq!(
        (e.status, e.dw0),
        (sc::CONNECT_INVALID_PARAM, 1 << 16 | 256)
    );
}

#[test]
fn identify_and_io_queue_connect() {
    let sub = Subsystem::new(NQN, "SN1");
    sub.set_hosts(true, Default::default());
    sub.add_namespace(ns(1, 8)).unwrap();
    sub.add_namespace(ns(3, 4)).unwrap();
    let r = R(sub.clone());
    let ctrl = enabled(&r);
    let mut out = Vec::new();
    let s = sqe(0x06, 0, 1, 0);
    assert_eq!(
        ctrl.admin(&r, at(), Sqe(&s), &mut out, 0),
        Outcome::Done(Cqe::ok(0))
    );
    assert_eq!(&out[4..7], b"SN1");
    assert_eq!(&out[24..29], b"nvmux");
    assert_eq!(out[111], 1);
    assert_eq!(get_str(&out[768..1024]), NQN);
    // Active namespace list, identify namespace, descriptors.
    let s = sqe(0x06, 0, 2, 0);
    ctrl.admin(&r, at(), Sqe(&s), &mut out, 0);
    assert_eq!((le32(&out, 0), le32(&out, 4), le32(&out, 8)), (1, 3, 0));
    let s = sqe(0x06, 3, 0, 0);
    ctrl.admin(&r, at(), Sqe(&s), &mut out, 0);
    assert_eq!(le64(&out, 0), 4 << 11);
    assert_eq!(&out[104..120], &[3u8; 16]);
    assert_eq!(out[130], 9);
    let s = sqe(0x06, 2, 3, 0);
    assert_eq!(
        ctrl.admin(&r, at(), Sqe(&s), &mut out, 0),
        Outcome::Done(Cqe::err(Status::INVALID_NAMESPACE))
    );
    // Unsupported opcode and log page.
    let s = sqe(0x80, 0, 0, 0);
    assert_eq!(
        ctrl.admin(&r, at(), Sqe(&s), &mut out, 0),
        Outcome::Done(Cqe::err(Status::INVALID_OPCODE))
    );
    let s = sqe(0x02, 0, 0x00ff_0042, 0);
    assert_eq!(
        ctrl.admin(&r, at(), Sqe(&s), &mut out, 0),
        Outcome::Done(Cqe::err(sc::INVALID_LOG_PAGE))
    );
    // Number of queues, then I/O queue connect within and beyond the grant.
    let s = sqe(0x09, 0, 0x07, 0x0003_0003);
    assert_eq!(
        ctrl.admin(&r, at(), Sqe(&s), &mut out, 0),
        Outcome::Done(Cqe::ok(0x0003_0003))
    );
    let (c, d) = connect_cmd(2, 128, HOST, ctrl.cntlid);
    assert!(connect(&r, Sqe(&c), &d, "t").is_ok());
    let (c, d) = connect_cmd(5, 128, HOST, ctrl.cntlid);
    assert_eq!(
        connect(&r, Sqe(&c), &d, "t").err().unwrap().status,
        sc::CONNECT_INVALID_PARAM
    );
    let (c, d) = connect_cmd(1, 129, HOST, ctrl.cntlid);
    assert_eq!(
        connect(&r, Sqe(&c), &d, "t").err().unwrap().status,
        sc::CONNECT_INVALID_PARAM
    );
}

#[test]
fn namespace_changes_raise_one_event_until_the_log_is_read() {
    let sub = Subsystem::new(NQN, "SN1");
    sub.set_hosts(true, Default::default());
    let r = R(sub.clone());
    let ctrl = enabled(&r);
    let mut out = Vec::new();
    // Not enabled by the host yet: no event.
    sub.add_namespace(ns(1, 1)).unwrap();
    assert_eq!(ctrl.take_event(), None);
    let s = sqe(0x09, 0, 0x0b, 1 << 8);
    ctrl.admin(&r, at(), Sqe(&s), &mut out, 0);
    let aer = sqe(0x0c, 0, 0, 0);
    assert_eq!(ctrl.admin(&r, at(), Sqe(&aer), &mut out, 0), Outcome::Held);
    assert_eq!(
        ctrl.admin(&r, at(), Sqe(&aer), &mut out, MAX_AERS),
        Outcome::Done(Cqe::err(sc::AER_LIMIT))
    );
    sub.add_namespace(ns(2, 1)).unwrap();
    sub.ns_changed(1);
    assert_eq!(ctrl.take_event(), Some(0x0004_0002));
    sub.ns_changed(2);
    assert_eq!(ctrl.take_event(), None, "masked until the log page is read");
    // Changed namespace list: 1 and 2; reading it (RAE clear) unmasks.
    let s = sqe(0x02, 0, (1023 << 16) | 0x04, 0);
    ctrl.admin(&r, at(), Sqe(&s), &mut out, 0);
    assert_eq!((le32(&out, 0), le32(&out, 4), le32(&out, 8)), (1, 2, 0));
    sub.remove_namespace(1);
    assert_eq!(ctrl.take_event(), Some(0x0004_0002));
}

#[test]
fn io_commands_map_to_io_plans() {
    let mut s = sqe(0x02, 1, 10, 0);
    put32(&mut s, 48, 7 | 1 << 30);
    assert_eq!(
        parse_io(Sqe(&s), 512, false),
        Ok(IoPlan::One {
            op: Opcode::Read,
            slba: 10,
            nlb: 8,
            fua: true
        })
    );
    // The range and the read-only flag are the engine's to check (see `nvm`).
    let s = sqe(0x01, 1, 0, 0);
    assert!(matches!(
        parse_io(Sqe(&s), 512, true),
        Ok(IoPlan::One {
            op: Opcode::Write,
            ..
        })
    ));
    let s = sqe(0x09, 1, 2, 4);
    assert_eq!(
        parse_io(Sqe(&s), 512, false),
        Ok(IoPlan::Dsm {
            ranges: 3,
            deallocate: true
        })
    );
    let mut s = sqe(0x02, 1, 0, 0);
    put32(&mut s, 48, 0xffff);
    assert_eq!(parse_io(Sqe(&s), 4096, false), Err(Status::INVALID_FIELD));
    let s = sqe(0x05, 1, 0, 0);
    assert_eq!(parse_io(Sqe(&s), 512, false), Err(Status::INVALID_OPCODE));
}

#[test]
fn controller_ids_run_out_without_spinning() {
    let sub = Subsystem::new(NQN, "s");
    sub.set_hosts(true, Default::default());
    let r = R(sub.clone());
    let (c, d) = connect_cmd(0, 32, HOST, 0xffff);
    let mut keep = Vec::new();
    for _ in 0..MAX_CNTLID {
        keep.push(connect(&r, Sqe(&c), &d, "t").expect("connect").ctrl);
    }
    let ids: BTreeSet<u16> = keep.iter().map(|c| c.cntlid).collect();
    assert_eq!(ids.len(), MAX_CNTLID as usize);
    assert_eq!((ids.first(), ids.last()), (Some(&1), Some(&MAX_CNTLID)));
    // Every id in use: Connect Controller Busy, at once.
    let t = std::time::Instant::now();
    let e = connect(&r, Sqe(&c), &d, "t").err().expect("busy");
    assert_eq!(e.status, sc::CONNECT_CTRL_BUSY);
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    // One goes away: its id is free again.
    let gone = keep.swap_remove(1234);
    let id = gone.cntlid;
    drop(gone);
    let c2 = connect(&r, Sqe(&c), &d, "t").expect("connect").ctrl;
    assert_eq!(c2.cntlid, id);
}
