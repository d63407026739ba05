//! DH-HMAC-CHAP against a real daemon, with the host side of the independent initiator
//! (`nvmux_bench::nvmf::auth`): the right secret works (each hash, null and FFDHE groups,
//! bidirectional), a wrong secret and a missing one are refused, a host that skips
//! authentication cannot do anything else, `require_auth` refuses hosts without a secret,
//! secrets survive a restart and are never returned by the API, and state.json is 0600.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{watchdog, TestDaemon};
use nvmux_bench::attack::time_to_close;
use nvmux_bench::nvmf::{DhchapHost, Host, HostOpts, Queue, Sqe};
use serde_json::json;

const NQN: &str = "nqn.2026-11.io.nvmux:auth";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-0000000000a1";
const OPEN_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-0000000000b2";

fn gen_secret(d: &TestDaemon, hmac: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvmux"))
        .args(["--api", d.dir.join("nvmux.sock").to_str().unwrap()])
        .args(["subsystem", "gen-secret", "--hmac", hmac])
        .output()
        .expect("nvmux subsystem gen-secret");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn setup(tag: &str) -> (TestDaemon, SocketAddr, String, String) {
    let d = TestDaemon::start(tag);
    d.file_disk("d1", 64 << 20);
    let addr = d.nvmf_subsystem(NQN, &[OPEN_HOST], &["d1"]);
    let host = gen_secret(&d, "sha256");
    let ctrl = gen_secret(&d, "none");
    d.api
        .post(
            &format!("/v1/subsystems/{NQN}/hosts"),
            &json!({"host": HOST, "dhchap_secret": host, "dhchap_ctrl_secret": ctrl}),
        )
        .expect("allow host with secrets");
    (d, addr, host, ctrl)
}

fn opts(auth: Option<DhchapHost>) -> HostOpts {
    HostOpts {
        nr_io: 2,
        entries: 32,
        auth,
        ..Default::default()
    }
}

fn io_works(h: &mut Host) {
    let data = common::pattern(5, 64 << 10);
    for q in 0..h.io.len() {
        let (c, _) = h.io[q]
            .cmd(Sqe::write(1, 100, 128), Some(&data), 0)
            .unwrap();
        assert!(c.ok(), "write on queue {q}");
        let (c, back) = h.io[q]
            .cmd(Sqe::read(1, 100, 128), None, data.len())
            .unwrap();
        assert!(c.ok() && back == data, "read back on queue {q}");
    }
}

#[test]
fn right_secret_authenticates_every_queue() {
    watchdog(180);
    let (d, addr, host, ctrl) = setup("nvmf-auth-ok");
    // Default policy against a host offering everything: SHA-256 and ffdhe2048.
    let mut h = Host::connect_with(addr, NQN, HOST, &opts(Some(DhchapHost::new(&host))))
        .expect("authenticated connect");
    let n = h.auth.expect("authenticated");
    assert_eq!((n.hash, n.dhgroup, n.bidirectional), (1, 1, false));
    io_works(&mut h);
    // Bidirectional.
    let mut h = Host::connect_with(
        addr,
        NQN,
        HOST,
        &opts(Some(DhchapHost::new(&host).bidirectional(&ctrl))),
    )
    .expect("bidirectional connect");
    assert!(h.auth.unwrap().bidirectional);
    io_works(&mut h);
    // Each hash and the groups this host offers, chosen by the host's offer.
    for (hashes, groups, want) in [
        (vec![3u8], vec![0u8], (3u8, 0u8)),
        (vec![2], vec![3], (2, 3)),
        (vec![1, 2], vec![2, 3], (1, 2)),
    ] {
        let mut a = DhchapHost::new(&host).bidirectional(&ctrl);
        a.hashes = hashes;
        a.dhgroups = groups;
        let mut h = Host::connect_with(addr, NQN, HOST, &opts(Some(a))).expect("connect");
        let n = h.auth.unwrap();
        assert_eq!((n.hash, n.dhgroup), want);
        io_works(&mut h);
    }
    // A host without a secret on the same subsystem needs none.
    let mut h = Host::connect_with(addr, NQN, OPEN_HOST, &opts(None)).expect("open host");
    assert!(h.auth.is_none());
    io_works(&mut h);
    let s = d.api.get("/v1/stats").unwrap();
    assert!(
        s["nvmf"]["auth_succeeded"].as_u64().unwrap() >= 5 * 3,
        "{s}"
    );
    assert!(d.log().contains("DH-HMAC-CHAP authentication succeeded"));
}

#[test]
fn wrong_or_missing_secrets_are_refused() {
    watchdog(180);
    let (d, addr, host, ctrl) = setup("nvmf-auth-bad");
    let wrong = gen_secret(&d, "sha256");
    let e = Host::connect_with(addr, NQN, HOST, &opts(Some(DhchapHost::new(&wrong))))
        .err()
        .expect("wrong secret refused");
    assert!(e.contains("Failure1"), "{e}");
    // No secret where one is required.
    let e = Host::connect_with(addr, NQN, HOST, &opts(None))
        .err()
        .expect("missing secret refused");
    assert!(e.contains("requires authentication"), "{e}");
    // The wrong controller secret on the host side: the host refuses the controller.
    let e = Host::connect_with(
        addr,
        NQN,
        HOST,
        &opts(Some(DhchapHost::new(&host).bidirectional(&wrong))),
    )
    .err()
    .expect("controller not trusted");
    assert!(e.contains("controller's response"), "{e}");
    // A host without a controller secret configured asks for bidirectional: refused.
    let e = Host::connect_with(
        addr,
        NQN,
        OPEN_HOST,
        &opts(Some(DhchapHost::new(&host).bidirectional(&ctrl))),
    );
    assert!(
        e.is_ok(),
        "no ATR for a host without secret: it never authenticates"
    );
    // A host that skips authentication: Connect succeeds with ATR, then nothing else.
    let mut q = Queue::open(addr, false, false).unwrap();
    let c = q.connect(0, 32, NQN, HOST, 0xffff).unwrap();
    assert!(c.ok() && c.dw0 & (1 << 17) != 0, "ATR set: {:#x}", c.dw0);
    let (c, _) = q.cmd(Sqe::new(0x06, 0).cdw(10, 1), None, 4096).unwrap();
    assert_eq!(c.sct_sc(), (1, 0x91), "authentication required");
    assert!(time_to_close(&mut q.stream(), Duration::from_secs(10)).is_some());
    // Nor can it bring up an I/O queue (the controller is never enabled).
    let mut q = Queue::open(addr, false, false).unwrap();
    let c = q.connect(0, 32, NQN, HOST, 0xffff).unwrap();
    let cntlid = c.dw0 as u16;
    let mut io = Queue::open(addr, false, false).unwrap();
    let c = io.connect(1, 32, NQN, HOST, cntlid).unwrap();
    assert!(!c.ok(), "I/O queue of an unauthenticated controller");
    let s = d.api.get("/v1/stats").unwrap();
    assert!(s["nvmf"]["auth_failed"].as_u64().unwrap() >= 2, "{s}");
    assert!(d.log().contains("DH-HMAC-CHAP failed"), "{}", d.log());
    // And a correct host still works afterwards.
    let mut h = Host::connect_with(addr, NQN, HOST, &opts(Some(DhchapHost::new(&host)))).unwrap();
    io_works(&mut h);
}

#[test]
fn require_auth_policy_persistence_and_secrecy() {
    watchdog(180);
    let (d, addr, host, ctrl) = setup("nvmf-auth-policy");
    // require_auth: a host without a secret is refused at Connect.
    let v = d
        .api
        .post(
            &format!("/v1/subsystems/{NQN}/auth"),
            &json!({"require_auth": true, "dhchap_dhgroups": ["ffdhe3072", "null"]}),
        )
        .expect("require auth");
    assert_eq!(v["require_auth"], true);
    assert_eq!(v["dhchap_dhgroups"], json!(["ffdhe3072", "null"]));
    let e = Host::connect_with(addr, NQN, OPEN_HOST, &opts(None))
        .err()
        .expect("refused");
    assert!(e.contains("sc 0x84"), "{e}");
    assert!(d.log().contains("requires authentication"));
    // `any` cannot be allowed while authentication is required.
    assert!(d
        .api
        .post(
            &format!("/v1/subsystems/{NQN}/hosts"),
            &json!({"host": "any"})
        )
        .is_err());
    // The group preference applies: ffdhe3072 for a host that offers 2048 and 3072.
    let h = Host::connect_with(addr, NQN, HOST, &opts(Some(DhchapHost::new(&host)))).unwrap();
    assert_eq!(h.auth.unwrap().dhgroup, 2);
    // Secrets are never returned, only whether they are set.
    let v = d.api.get(&format!("/v1/subsystems/{NQN}")).unwrap();
    let text = v.to_string();
    assert!(!text.contains("DHHC-1"), "{text}");
    assert_eq!(
        v["host_auth"],
        json!([{"host": HOST, "dhchap": true, "bidirectional": true}])
    );
    // Bad secrets are refused with a reason.
    let e = d
        .api
        .post(
            &format!("/v1/subsystems/{NQN}/hosts"),
            &json!({"host": OPEN_HOST, "dhchap_secret": "DHHC-1:00:AAAA:"}),
        )
        .expect_err("bad secret");
    assert!(
        e.to_string().contains("not a valid DH-HMAC-CHAP secret"),
        "{e}"
    );
    let e = d
        .api
        .post(
            &format!("/v1/subsystems/{NQN}/hosts"),
            &json!({"host": OPEN_HOST, "dhchap_secret": host, "dhchap_ctrl_secret": host}),
        )
        .expect_err("same secret twice");
    assert!(e.to_string().contains("must differ"), "{e}");
    // state.json: 0600, holds the secrets; they survive a restart.
    let state = d.dir.join("state.json");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&state).unwrap().contains(&host));
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let mut h = Host::connect_with(
        addr,
        NQN,
        HOST,
        &opts(Some(DhchapHost::new(&host).bidirectional(&ctrl))),
    )
    .expect("after restart");
    io_works(&mut h);
    assert!(Host::connect_with(addr, NQN, OPEN_HOST, &opts(None)).is_err());
    // Removing the host's secret while authentication is required is refused; lifting
    // the requirement and removing it lets the host in without one.
    assert!(d
        .api
        .post(
            &format!("/v1/subsystems/{NQN}/hosts"),
            &json!({"host": HOST, "remove_dhchap": true}),
        )
        .is_err());
    d.api
        .post(
            &format!("/v1/subsystems/{NQN}/auth"),
            &json!({"require_auth": false}),
        )
        .unwrap();
    d.api
        .post(
            &format!("/v1/subsystems/{NQN}/hosts"),
            &json!({"host": HOST, "remove_dhchap": true}),
        )
        .unwrap();
    let h = Host::connect_with(addr, NQN, HOST, &opts(None)).expect("no secret any more");
    assert!(h.auth.is_none());
}
