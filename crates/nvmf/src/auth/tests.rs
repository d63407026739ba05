//! Known-answer vectors computed independently of this code, with Python's `hmac` and
//! `hashlib` (the snippets are in the comments) and with nvme-cli 2.3
//! (`nvme gen-dhchap-key`), then a whole exchange against a host simulated with BigNum.

use super::*;

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6e766d75-7800-4000-8000-000000000001";
const SUBNQN: &str = "nqn.2026-11.io.nvmux:auth";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

#[test]
fn secrets_parse_as_nvme_cli_writes_them() {
    // nvme gen-dhchap-key -s 000102...1f -m 0
    let s = Secret::parse("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:").unwrap();
    assert_eq!(s.transform(), 0);
    assert_eq!(s.key.as_slice(), (0..32).collect::<Vec<u8>>());
    assert_eq!(
        s.encode(),
        "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"
    );
    // nvme gen-dhchap-key -m 3 -l 64 (random): 64 bytes, padded base64.
    let s = Secret::parse("DHHC-1:03:ZNL7Qeh9uhQAxF99BTHEuLvIEl3AQmF+byBgTfNx3o884nRrx87n1ekxpbPBtC+H/WU3ISWoQ45TzHZyGMFkrjSh6m8=:").unwrap();
    assert_eq!((s.transform(), s.key_len()), (3, 64));
    // Without the trailing colon too (the kernel accepts both).
    assert!(Secret::parse("DHHC-1:01:WulleCBkG4oCs0iIC3Cit9gBDCLWiZ9PNXuhqytWkBIZkvGy").is_ok());
    for bad in [
        "",
        "DHHC-2:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
        "DHHC-1:04:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
        "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaS:", // CRC
        "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+K:",     // short
        "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+Kf!aR:", // alphabet
        "DHHC-1:00:",
    ] {
        assert!(Secret::parse(bad).is_err(), "{bad:?} accepted");
    }
    for (t, l) in [(0u8, 32usize), (1, 32), (2, 48), (3, 64)] {
        let g = Secret::generate(t, l).unwrap();
        let back = Secret::parse(&g.encode()).unwrap();
        assert_eq!(
            (back.transform(), back.key.as_slice()),
            (t, g.key.as_slice())
        );
    }
    assert!(Secret::generate(4, 32).is_err());
    assert!(Secret::generate(1, 33).is_err());
}

#[test]
fn key_transform_and_responses_match_python() {
    let key: Vec<u8> = (0..32).collect();
    let s0 = Secret {
        transform: 0,
        key: SecretBytes::new(key.clone()),
    };
    let s1 = Secret {
        transform: 1,
        key: SecretBytes::new(key.clone()),
    };
    let s2 = Secret {
        transform: 2,
        key: SecretBytes::new(key.clone()),
    };
    // hmac.new(key, hostnqn + b"NVMe-over-Fabrics", hashlib.sha256 / sha384).hexdigest()
    assert_eq!(
        s1.transformed(HOSTNQN).unwrap().as_slice(),
        hex("101bfb56014fbea90402ee6c5033c5ff4d6164c1f194fa946aa7bd25b1a0be96")
    );
    assert_eq!(
        s2.transformed(HOSTNQN).unwrap().as_slice(),
        hex("25a4d6c40a6b8ab91ad8a366eb5bf4eeeba5f1ef734e428ff0e58a39239b54e1fe00e98281bbedd21035223acba727f6")
    );
    assert_eq!(s0.transformed(HOSTNQN).unwrap().as_slice(), &key[..]);
    // hmac.new(k, c1 + s1.to_bytes(4,'little') + tid.to_bytes(2,'little') + b"\0" +
    //          b"HostHost" + hostnqn + b"\0" + subnqn, hashlib.sha256)
    let c1 = [0xc1u8; 32];
    let r = |k: &[u8], ks: Option<&[u8]>| {
        response(
            HashFn::Sha256,
            k,
            &c1,
            ks,
            0x0102_0304,
            0x0506,
            b"HostHost",
            HOSTNQN,
            SUBNQN,
        )
        .unwrap()
    };
    assert_eq!(
        r(&key, None),
        hex("154a2eaa78589576db38c946a60e5591b0e91e5665167b24a04afc8780d83631")
    );
    assert_eq!(
        r(s1.transformed(HOSTNQN).unwrap().as_slice(), None),
        hex("275be6bbaf55d6ca2d7b044d56dda1237ec00fe5837600b18282263669377c3c")
    );
    // Augmented challenge: hmac.new(sha256(ks).digest(), c1, sha256), ks = 256 x 0x55.
    assert_eq!(
        r(&key, Some(&[0x55; 256])),
        hex("298e48f3a265a6bb0265e6a6935d2ede9596d3cc32f032cc59c7dba56f43ca95")
    );
    // The controller's response with SHA-384: "Controller", NQNc then NQNh.
    let kc: Vec<u8> = (100..132).collect();
    assert_eq!(
        response(
            HashFn::Sha384,
            &kc,
            &[0xc2; 48],
            None,
            7,
            0x0506,
            b"Controller",
            SUBNQN,
            HOSTNQN
        )
        .unwrap(),
        hex("146e5fd0f02ed3fb4eeb84de17dcd97525e4c3e794aff0173f0914e5c89449d70c5e92e70e0d49a31cf433a4bf30333f")
    );
}

#[test]
fn ffdhe_primes_are_rfc7919s() {
    for g in &DhGroup::ALL[1..] {
        let p = g.prime().unwrap();
        assert_eq!(p.num_bytes() as usize, g.bytes(), "{}", g.name());
        let v = p.to_vec();
        assert!(v[..8].iter().all(|&b| b == 0xff) && v[v.len() - 8..].iter().all(|&b| b == 0xff));
        // Against OpenSSL's own copy, where the command exists.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl genpkey -genparam -algorithm DH -pkeyopt group:{} | openssl asn1parse",
                g.name()
            ))
            .output();
        if let Ok(o) = out {
            let text = String::from_utf8_lossy(&o.stdout).to_lowercase();
            if o.status.success() && text.contains("integer") {
                let mut hexp = String::new();
                for b in &v {
                    hexp.push_str(&format!("{b:02x}"));
                }
                assert!(text.contains(&hexp), "{} differs from OpenSSL's", g.name());
            }
        }
    }
}

/// A host, simulated with the same primitives but driven from the test: it builds the
/// messages byte by byte as section 8.13.5 lays them out.
struct Host {
    key: Vec<u8>,
    ctrl_key: Option<Vec<u8>>,
    y: Option<BigNum>,
}

fn negotiate(tid: u16, hashes: &[u8], groups: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 8 + 64];
    m[1] = 0x00;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[7] = 1;
    m[8] = 1;
    m[10] = hashes.len() as u8;
    m[11] = groups.len() as u8;
    m[12..12 + hashes.len()].copy_from_slice(hashes);
    m[42..42 + groups.len()].copy_from_slice(groups);
    m
}

impl Host {
    /// The Reply to `ch` (a Challenge), with a controller challenge when `bidi`.
    fn reply(&mut self, ch: &[u8], bidi: bool) -> (Vec<u8>, Vec<u8>, Option<Vec<u8>>) {
        let hl = ch[6] as usize;
        let h = HashFn::from_id(ch[8]).unwrap();
        let g = DhGroup::from_id(ch[9]).unwrap();
        let dhvlen = le16(ch, 10) as usize;
        let s1 = le32(ch, 12);
        let tid = le16(ch, 4);
        let c1 = &ch[16..16 + hl];
        let gx = &ch[16 + hl..16 + hl + dhvlen];
        let mut ks = None;
        let mut gy = Vec::new();
        if g != DhGroup::Null {
            let p = g.prime().unwrap();
            let mut ctx = BigNumContext::new().unwrap();
            let mut y = BigNum::new().unwrap();
            y.rand(256, MsbOption::MAYBE_ZERO, false).unwrap();
            let mut v = BigNum::new().unwrap();
            v.mod_exp(&BigNum::from_u32(2).unwrap(), &y, &p, &mut ctx)
                .unwrap();
            gy = v.to_vec_padded(g.bytes() as i32).unwrap();
            let mut k = BigNum::new().unwrap();
            k.mod_exp(&BigNum::from_slice(gx).unwrap(), &y, &p, &mut ctx)
                .unwrap();
            ks = Some(k.to_vec_padded(g.bytes() as i32).unwrap());
            self.y = Some(y);
        }
        let r1 = response(
            h,
            &self.key,
            c1,
            ks.as_deref(),
            s1,
            tid,
            b"HostHost",
            HOSTNQN,
            SUBNQN,
        )
        .unwrap();
        let c2 = vec![0x77u8; hl];
        let mut m = vec![0u8; 16];
        m[0] = 1;
        m[1] = 2;
        m[4..6].copy_from_slice(&tid.to_le_bytes());
        m[6] = hl as u8;
        m[8] = bidi as u8;
        m[10..12].copy_from_slice(&(gy.len() as u16).to_le_bytes());
        m[12..16].copy_from_slice(&(if bidi { 9u32 } else { 0 }).to_le_bytes());
        m.extend_from_slice(&r1);
        m.extend_from_slice(&c2);
        m.extend_from_slice(&gy);
        let r2 = match (&self.ctrl_key, bidi) {
            (Some(k), true) => Some(
                response(
                    h,
                    k,
                    &c2,
                    ks.as_deref(),
                    9,
                    tid,
                    b"Controller",
                    SUBNQN,
                    HOSTNQN,
                )
                .unwrap(),
            ),
            _ => None,
        };
        (m, c2, r2)
    }
}

fn keys(host: &[u8], ctrl: Option<&[u8]>) -> Arc<HostKeys> {
    Arc::new(HostKeys {
        host: Secret {
            transform: 0,
            key: SecretBytes::new(host.to_vec()),
        },
        ctrl: ctrl.map(|k| Secret {
            transform: 0,
            key: SecretBytes::new(k.to_vec()),
        }),
    })
}

fn run(
    policy: Policy,
    offer: (&[u8], &[u8]),
    host_key: &[u8],
    ctrl_key: Option<&[u8]>,
    bidi: bool,
) -> (Dhchap, Vec<u8>) {
    let mut d = Dhchap::new(
        keys(&[1; 32], Some(&[2; 32])),
        Arc::new(policy),
        HOSTNQN,
        SUBNQN,
    );
    let mut host = Host {
        key: host_key.to_vec(),
        ctrl_key: ctrl_key.map(|k| k.to_vec()),
        y: None,
    };
    assert_eq!(d.send(&negotiate(3, offer.0, offer.1)), Sent::Ok);
    let mut out = Vec::new();
    assert!(!d.receive(4096, &mut out), "challenge");
    assert_eq!((out[0], out[1]), (1, 1));
    let (reply, _c2, r2) = host.reply(&out, bidi);
    assert_eq!(d.send(&reply), Sent::Ok);
    let end = d.receive(4096, &mut out);
    if end {
        return (d, out);
    }
    assert_eq!((out[0], out[1]), (1, 3), "success1");
    if bidi {
        assert_eq!(out[8], 1, "rvalid");
        let hl = out[6] as usize;
        assert_eq!(Some(out[16..16 + hl].to_vec()), r2, "controller response");
        assert!(!d.authenticated(), "waits for Success2");
        let mut s2 = vec![0u8; 16];
        s2[0] = 1;
        s2[1] = 4;
        s2[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(d.send(&s2), Sent::Ok);
    }
    (d, out)
}

#[test]
fn exchanges_succeed_and_fail_as_they_should() {
    // Null group, each hash.
    for h in HashFn::ALL {
        let p = Policy {
            hashes: vec![h],
            dhgroups: vec![DhGroup::Null],
        };
        let (d, _) = run(p, (&[1, 2, 3], &[0, 1, 2]), &[1; 32], None, false);
        assert!(d.authenticated(), "{}", h.name());
        assert_eq!(d.negotiated().0, h);
    }
    // Default policy against a host offering everything: SHA-256 and ffdhe2048,
    // bidirectional.
    let (d, _) = run(
        Policy::default(),
        (&[1, 2, 3], &[0, 1, 2, 3, 4, 5]),
        &[1; 32],
        Some(&[2; 32]),
        true,
    );
    assert!(d.authenticated());
    assert_eq!(d.negotiated(), (HashFn::Sha256, DhGroup::Ffdhe2048, true));
    // ffdhe3072 when the host offers no smaller group.
    let (d, _) = run(Policy::default(), (&[2], &[2]), &[1; 32], None, false);
    assert_eq!(d.negotiated().1, DhGroup::Ffdhe3072);
    assert!(d.authenticated());
    // Wrong host secret: Failure1 (reason: failed), not authenticated.
    let (d, out) = run(Policy::default(), (&[1], &[0, 1]), &[9; 32], None, false);
    assert!(!d.authenticated());
    assert_eq!((out[1], out[6], out[7]), (FAILURE1, 1, reason::FAILED));
    assert!(d.why().unwrap().contains("wrong"));
    // Bidirectional without a controller secret for the host.
    let mut d = Dhchap::new(
        keys(&[1; 32], None),
        Arc::new(Policy::default()),
        HOSTNQN,
        SUBNQN,
    );
    d.send(&negotiate(1, &[1], &[0]));
    let mut out = Vec::new();
    d.receive(4096, &mut out);
    let mut host = Host {
        key: vec![1; 32],
        ctrl_key: None,
        y: None,
    };
    let (reply, _, _) = host.reply(&out, true);
    d.send(&reply);
    assert!(d.receive(4096, &mut out), "Failure1 ends the connection");
    // No common hash or group.
    let p = Policy {
        hashes: vec![HashFn::Sha512],
        dhgroups: vec![DhGroup::Ffdhe8192],
    };
    for (offer, why) in [
        ((&[1u8][..], &[5u8][..]), reason::HASH_UNUSABLE),
        ((&[3u8][..], &[0u8, 1][..]), reason::DHGROUP_UNUSABLE),
    ] {
        let mut d = Dhchap::new(keys(&[1; 32], None), Arc::new(p.clone()), HOSTNQN, SUBNQN);
        d.send(&negotiate(1, offer.0, offer.1));
        assert!(d.receive(4096, &mut out));
        assert_eq!(out[7], why);
    }
}

#[test]
fn protocol_violations_fail_cleanly() {
    let mut out = Vec::new();
    let fresh = || {
        Dhchap::new(
            keys(&[1; 32], None),
            Arc::new(Policy::default()),
            HOSTNQN,
            SUBNQN,
        )
    };
    // Reply before Negotiate, receive before anything, short messages, secure channel.
    let mut d = fresh();
    let mut reply = vec![0u8; 16 + 64];
    reply[0] = 1;
    reply[1] = 2;
    reply[6] = 32;
    d.send(&reply);
    assert!(d.receive(4096, &mut out));
    let mut d = fresh();
    assert!(d.receive(4096, &mut out));
    let mut d = fresh();
    d.send(&[0, 0, 0]);
    assert!(d.receive(4096, &mut out));
    assert_eq!(out[7], reason::INCORRECT_PAYLOAD);
    let mut d = fresh();
    let mut n = negotiate(1, &[1], &[0]);
    n[6] = 1;
    d.send(&n);
    assert!(d.receive(4096, &mut out));
    assert_eq!(out[7], reason::CONCAT_MISMATCH);
    // A DH value outside 2..p-2 (here 1 and p-1) is refused.
    for bad in [vec![1u8], {
        let mut p = DhGroup::Ffdhe2048.prime().unwrap().to_vec();
        let last = p.len() - 1;
        p[last] -= 1;
        p
    }] {
        let mut d = fresh();
        d.send(&negotiate(2, &[1], &[1]));
        d.receive(4096, &mut out);
        let mut m = vec![0u8; 16];
        m[0] = 1;
        m[1] = 2;
        m[4..6].copy_from_slice(&2u16.to_le_bytes());
        m[6] = 32;
        m[10..12].copy_from_slice(&(bad.len() as u16).to_le_bytes());
        m.extend_from_slice(&[0; 64]);
        m.extend_from_slice(&bad);
        d.send(&m);
        assert!(d.receive(4096, &mut out));
        assert_eq!(out[7], reason::DHGROUP_UNUSABLE);
    }
    // A Reply whose lengths run past the message.
    let mut d = fresh();
    d.send(&negotiate(2, &[1], &[0]));
    d.receive(4096, &mut out);
    let mut m = vec![0u8; 16];
    m[0] = 1;
    m[1] = 2;
    m[4..6].copy_from_slice(&2u16.to_le_bytes());
    m[6] = 32;
    m[10..12].copy_from_slice(&0xffffu16.to_le_bytes());
    d.send(&m);
    assert!(d.receive(4096, &mut out));
    // AUTH_Receive too small for the Challenge.
    let mut d = fresh();
    d.send(&negotiate(2, &[1], &[1]));
    assert!(d.receive(64, &mut out));
    // Failure2 from the host.
    let mut d = fresh();
    let f2 = [0u8, 0xf0, 0, 0, 0, 0, 1, 4];
    assert_eq!(d.send(&f2), Sent::HostFailed(4));
    // Command fields.
    let mut sqe = [0u8; 64];
    sqe[41] = 1;
    sqe[42] = 1;
    sqe[43] = 0xe9;
    sqe[44..48].copy_from_slice(&72u32.to_le_bytes());
    assert_eq!(command_len(&sqe, MAX_SEND), Some(72));
    sqe[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(command_len(&sqe, MAX_SEND), None);
    sqe[44..48].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(command_len(&sqe, MAX_SEND), None);
    sqe[44..48].copy_from_slice(&72u32.to_le_bytes());
    sqe[43] = 0xea;
    assert_eq!(command_len(&sqe, MAX_SEND), None);
}
