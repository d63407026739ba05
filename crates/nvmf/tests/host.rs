//! The NVMe/TCP host backend (`nvmux_nvmf::host`) against nvmux's own target over real
//! sockets: data integrity, multipath failover through cuttable TCP proxies, the loss
//! timeout, and a hostile controller.

mod hostkit;

use std::time::{Duration, Instant};

use hostkit::*;
use nvmux_core::{AlignedBuf, BlockDevice, IoCommand, Opcode};
use nvmux_nvmf::host::{parse_remote, PathState, RemoteDevice, RemoteSpec, PATH_ERROR};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn write_read_verify_flush_zeroes_discard() {
    let t = target();
    let spec = RemoteSpec::new(NQN, vec![t.addr], HOSTNQN);
    let dev = RemoteDevice::connect(spec).expect("connect");
    let info = dev.info().clone();
    assert_eq!(info.block_size, 4096);
    assert_eq!(info.num_blocks * 4096, DEV_SIZE);
    assert_eq!(dev.capacity_bytes(), DEV_SIZE);
    assert_eq!(info.max_transfer, 128 << 10);
    let mut q = dev.open_queue(32).expect("queue");
    let mut shadow = vec![0u8; DEV_SIZE as usize];
    let failed = verify_workload(&mut *q, &mut shadow, 3000, 32, 42, LIMIT, &mut |_| {});
    assert_eq!(failed, 0);
    // Flush, write zeroes, discard; then the ranges read back as zeros.
    assert!(run_one(
        &mut *q,
        IoCommand::new(Opcode::Flush, 0, 0, 1, Default::default()),
        LIMIT
    )
    .is_ok());
    for op in [Opcode::WriteZeroes, Opcode::Deallocate] {
        let slba = if op == Opcode::WriteZeroes { 10 } else { 200 };
        let buf = AlignedBuf::new(16 * 4096);
        buf.as_slice();
        let mut w = AlignedBuf::new(16 * 4096);
        w.as_mut_slice().fill(0xa5);
        assert!(run_one(&mut *q, io(Opcode::Write, slba, &w, 2), LIMIT).is_ok());
        let st = run_one(
            &mut *q,
            IoCommand::new(op, slba, 16, 3, Default::default()),
            LIMIT,
        );
        assert!(st.is_ok(), "{op:?}: {st}");
        assert!(run_one(&mut *q, io(Opcode::Read, slba, &buf, 4), LIMIT).is_ok());
        assert!(buf.as_slice().iter().all(|&b| b == 0), "{op:?} left data");
    }
    // A write larger than the in-capsule limit with FUA goes through R2T.
    let mut w = AlignedBuf::new(128 << 10);
    w.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 7) as u8);
    let mut c = io(Opcode::Write, 1000, &w, 5);
    c.fua = true;
    assert!(run_one(&mut *q, c, LIMIT).is_ok());
    let r = AlignedBuf::new(128 << 10);
    assert!(run_one(&mut *q, io(Opcode::Read, 1000, &r, 6), LIMIT).is_ok());
    assert!(r.as_slice() == w.as_slice());
    let st = dev.status();
    assert!(st.connected);
    assert_eq!(
        (st.failovers, st.commands_failed, st.commands_retried),
        (0, 0, 0)
    );
    drop(q);
    dev.shutdown();
    assert!(!dev.status().connected);
}

#[test]
fn digests_and_two_queues() {
    let t = target();
    let mut spec = RemoteSpec::new(NQN, vec![t.addr], HOSTNQN);
    spec.hdgst = true;
    spec.ddgst = true;
    let dev = RemoteDevice::connect(spec).expect("connect");
    let mut q1 = dev.open_queue(16).expect("queue 1");
    let mut q2 = dev.open_queue(16).expect("queue 2");
    let mut shadow = vec![0u8; DEV_SIZE as usize];
    assert_eq!(
        verify_workload(&mut *q1, &mut shadow, 500, 16, 1, LIMIT, &mut |_| {}),
        0
    );
    assert_eq!(
        verify_workload(&mut *q2, &mut shadow, 500, 16, 2, LIMIT, &mut |_| {}),
        0
    );
}

#[test]
fn failover_to_the_second_path_loses_nothing() {
    let t = target();
    let p1 = Proxy::start("127.0.0.1:0".parse().unwrap(), t.addr);
    let p2 = Proxy::start("127.0.0.1:0".parse().unwrap(), t.addr);
    let s = format!("{NQN}@{},{}", p1.addr, p2.addr);
    let (nqn, paths) = parse_remote(&s).unwrap();
    let mut spec = RemoteSpec::new(&nqn, paths, HOSTNQN);
    spec.loss_timeout = Duration::from_secs(30);
    let dev = RemoteDevice::connect(spec).expect("connect");
    assert!(dev.status().paths[0].active);
    let mut q = dev.open_queue(32).expect("queue");
    let mut shadow = vec![0u8; DEV_SIZE as usize];
    let mut cut = false;
    let failed = verify_workload(&mut *q, &mut shadow, 3000, 32, 7, LIMIT, &mut |n| {
        if n == 1000 && !cut {
            cut = true;
            p1.cut();
        }
    });
    assert_eq!(failed, 0);
    let st = dev.status();
    assert_eq!(st.failovers, 1, "{st:?}");
    assert!(st.last_failover_ms.is_some(), "{st:?}");
    assert!(st.connected);
    assert!(
        st.paths[1].active && st.paths[1].state == PathState::Live,
        "{st:?}"
    );
    assert_eq!(st.paths[0].state, PathState::Down);
    assert_eq!(st.commands_failed, 0);
    assert!(
        st.commands_retried > 0,
        "the cut came with commands in flight: {st:?}"
    );
}

#[test]
fn loss_timeout_fails_commands_then_a_path_comes_back() {
    let t = target();
    let p = Proxy::start("127.0.0.1:0".parse().unwrap(), t.addr);
    let addr = p.addr;
    let mut spec = RemoteSpec::new(NQN, vec![addr], HOSTNQN);
    spec.loss_timeout = Duration::from_secs(1);
    let dev = RemoteDevice::connect(spec).expect("connect");
    let mut q = dev.open_queue(8).expect("queue");
    let buf = AlignedBuf::new(8192);
    assert!(run_one(&mut *q, io(Opcode::Read, 0, &buf, 1), LIMIT).is_ok());
    p.cut();
    drop(p);
    // Commands issued after the loss wait for a path, then fail with a path error.
    let t0 = Instant::now();
    let st = run_one(
        &mut *q,
        io(Opcode::Read, 0, &buf, 2),
        Duration::from_secs(30),
    );
    assert_eq!(st, PATH_ERROR);
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "failed before the loss timeout"
    );
    // While still disconnected, new commands fail at once (well within the timeout).
    let st = run_one(
        &mut *q,
        io(Opcode::Read, 0, &buf, 3),
        Duration::from_secs(30),
    );
    assert_eq!(st, PATH_ERROR);
    assert!(dev.status().commands_failed >= 2);
    assert!(!dev.status().connected);
    // The path comes back: the controller thread reconnects and commands succeed again.
    let _p = Proxy::start(addr, t.addr);
    let t1 = Instant::now();
    loop {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "no reconnect: {:?}",
            dev.status()
        );
        if run_one(
            &mut *q,
            io(Opcode::Read, 0, &buf, 4),
            Duration::from_secs(30),
        )
        .is_ok()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = dev.status();
    assert!(st.connected && st.reconnects >= 1, "{st:?}");
    assert_eq!(st.failovers, 0, "same path: {st:?}");
}

#[test]
fn connect_errors_are_clear() {
    let t = target();
    let mut spec = RemoteSpec::new(NQN, vec![t.addr], HOSTNQN);
    spec.nsid = 9;
    let e = RemoteDevice::connect(spec)
        .err()
        .expect("no namespace 9")
        .to_string();
    assert!(e.contains("namespace 9"), "{e}");
    let spec = RemoteSpec::new("nqn.2026-12.io.nvmux:nope", vec![t.addr], HOSTNQN);
    assert!(RemoteDevice::connect(spec).is_err());
    // Nothing listens there.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    let spec = RemoteSpec::new(NQN, vec![a], HOSTNQN);
    let e = RemoteDevice::connect(spec)
        .err()
        .expect("nothing listens")
        .to_string();
    assert!(e.contains("no path works"), "{e}");
}

#[test]
fn dhchap_against_a_target_that_requires_it() {
    use nvmux_nvmf::auth::{HostKeys, Policy, Secret};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    let t = target();
    let host = Secret::generate(1, 32).unwrap();
    let ctrl = Secret::generate(0, 48).unwrap();
    let mut keys = BTreeMap::new();
    keys.insert(
        HOSTNQN.to_string(),
        Arc::new(HostKeys {
            host: Secret::parse(&host.encode()).unwrap(),
            ctrl: Some(Secret::parse(&ctrl.encode()).unwrap()),
        }),
    );
    t.sub.set_host_keys(keys);
    t.sub.set_auth(true, Policy::default());
    // No secret: refused with a clear error.
    let e = RemoteDevice::connect(RemoteSpec::new(NQN, vec![t.addr], HOSTNQN))
        .err()
        .expect("no secret")
        .to_string();
    assert!(e.contains("no host secret"), "{e}");
    // A wrong host secret.
    let mut spec = RemoteSpec::new(NQN, vec![t.addr], HOSTNQN);
    spec.dhchap_secret = Some(Secret::generate(1, 32).unwrap().encode());
    let e = RemoteDevice::connect(spec)
        .err()
        .expect("wrong secret")
        .to_string();
    assert!(e.contains("authentication failed"), "{e}");
    // The right host secret with a wrong controller secret: the host refuses the controller.
    let mut spec = RemoteSpec::new(NQN, vec![t.addr], HOSTNQN);
    spec.dhchap_secret = Some(host.encode());
    spec.dhchap_ctrl_secret = Some(Secret::generate(0, 48).unwrap().encode());
    let e = RemoteDevice::connect(spec)
        .err()
        .expect("wrong controller secret")
        .to_string();
    assert!(e.contains("does not match"), "{e}");
    // Both right: bidirectional authentication on the admin and the I/O queues.
    let mut spec = RemoteSpec::new(NQN, vec![t.addr], HOSTNQN);
    spec.dhchap_secret = Some(host.encode());
    spec.dhchap_ctrl_secret = Some(ctrl.encode());
    let dev = RemoteDevice::connect(spec).expect("authenticated connect");
    let mut q = dev.open_queue(8).expect("queue");
    let mut shadow = vec![0u8; DEV_SIZE as usize];
    assert_eq!(
        verify_workload(&mut *q, &mut shadow, 200, 8, 3, LIMIT, &mut |_| {}),
        0
    );
    assert!(t.target.stats().auth_ok >= 2);
}

/// A RemoteDevice served again by a second nvmux target: its queues run on the target's
/// worker threads (the worker sleeps on the queue's wait_fds), and a host reads and
/// writes through both hops.
#[test]
fn remote_device_as_a_target_namespace() {
    use nvmux_core::stats::DiskStats;
    use nvmux_core::worker::{WorkerConfig, WorkerPool};
    use nvmux_nvmf::{Namespace, Subsystem, Target, TargetConfig};
    use std::sync::Arc;
    let a = target();
    let remote =
        RemoteDevice::connect(RemoteSpec::new(NQN, vec![a.addr], HOSTNQN)).expect("connect");
    let pool = WorkerPool::new(&WorkerConfig {
        threads: 2,
        ..WorkerConfig::default()
    })
    .unwrap();
    let b = Target::new(pool.placement(), TargetConfig::default());
    let nqn_b = "nqn.2026-12.io.nvmux:second-hop";
    let sub = Subsystem::new(nqn_b, "hop");
    sub.set_hosts(true, Default::default());
    sub.add_namespace(Namespace {
        nsid: 1,
        disk: "remote".into(),
        dev: remote.clone() as Arc<dyn BlockDevice>,
        stats: Arc::new(DiskStats::default()),
        nguid: [9; 16],
    })
    .unwrap();
    let addr_b = b.add(sub, "127.0.0.1:0".parse().unwrap()).unwrap();
    let dev = RemoteDevice::connect(RemoteSpec::new(nqn_b, vec![addr_b], HOSTNQN))
        .expect("connect to the second hop");
    assert_eq!(dev.info().num_blocks, remote.info().num_blocks);
    let mut q = dev.open_queue(16).expect("queue");
    let mut shadow = vec![0u8; DEV_SIZE as usize];
    assert_eq!(
        verify_workload(&mut *q, &mut shadow, 1000, 16, 11, LIMIT, &mut |_| {}),
        0
    );
    // What went through the second hop is in the first target's memory device.
    let mut q1 = remote.open_queue(4).expect("direct queue");
    let buf = AlignedBuf::new(128 << 10);
    for chunk in [0u64, 17, 300] {
        let slba = chunk * 32;
        assert!(run_one(&mut *q1, io(Opcode::Read, slba, &buf, 1), LIMIT).is_ok());
        let o = (slba * 4096) as usize;
        assert!(buf.as_slice() == &shadow[o..o + buf.len()]);
    }
    drop(q);
    drop(q1);
    dev.shutdown();
    b.shutdown();
}
