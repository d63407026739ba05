//! TLS credentials for tests and benchmarks of NBD over TLS: a psktool-format key file and
//! X.509 directories laid out as qemu's `tls-creds-x509` and nbdkit's
//! `--tls-certificates` want them, made with the `openssl` command in a directory of the
//! caller's.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub type Res<T> = std::result::Result<T, String>;

fn random_hex(n: usize) -> Res<String> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn chmod(p: &Path, mode: u32) -> Res<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", p.display()))
}

/// `dir/keys.psk` (the name qemu's `tls-creds-psk,dir=DIR` reads) with one random 32-byte
/// key for `identity`, mode 0600.
pub fn psk_file(dir: &Path, identity: &str) -> Res<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let p = dir.join("keys.psk");
    std::fs::write(&p, format!("{identity}:{}\n", random_hex(32)?))
        .map_err(|e| format!("{}: {e}", p.display()))?;
    chmod(&p, 0o600)?;
    Ok(p)
}

/// X.509 credentials: `server` holds `ca-cert.pem`, `server-cert.pem` and
/// `server-key.pem` (for 127.0.0.1 and localhost); `client` holds `ca-cert.pem`,
/// `client-cert.pem` and `client-key.pem` (subject `O=tenant, CN=client1`); `ca_only`
/// holds the CA certificate alone (a client without a certificate of its own).
pub struct X509 {
    pub server: PathBuf,
    pub client: PathBuf,
    pub ca_only: PathBuf,
}

fn openssl(args: &[&str], cwd: &Path) -> Res<()> {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .map_err(|e| format!("the openssl command: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// Make a CA, a server certificate and a client certificate under `dir` (2 days valid).
pub fn x509(dir: &Path) -> Res<X509> {
    let (server, client, ca_only) = (dir.join("server"), dir.join("client"), dir.join("ca"));
    for d in [dir, &server, &client, &ca_only] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let days = ["-days", "2"];
    openssl(
        &[
            &["req", "-x509", "-newkey", "rsa:2048", "-nodes"][..],
            &["-keyout", "ca-key.pem", "-out", "ca-cert.pem"],
            &["-subj", "/CN=nvmux test CA"],
            &days,
        ]
        .concat(),
        dir,
    )?;
    for (who, subject, ext) in [
        (
            "server",
            "/CN=localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "/O=tenant/CN=client1",
            "extendedKeyUsage=clientAuth\n",
        ),
    ] {
        let key = format!("{who}/{who}-key.pem");
        let cert = format!("{who}/{who}-cert.pem");
        let csr = format!("{who}.csr");
        let extfile = format!("{who}.ext");
        openssl(
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                subject,
            ],
            dir,
        )?;
        std::fs::write(dir.join(&extfile), ext).map_err(|e| format!("{extfile}: {e}"))?;
        openssl(
            &[
                &["x509", "-req", "-in", &csr, "-CA", "ca-cert.pem"][..],
                &["-CAkey", "ca-key.pem", "-CAcreateserial", "-out", &cert],
                &["-extfile", &extfile],
                &days,
            ]
            .concat(),
            dir,
        )?;
        chmod(&dir.join(&key), 0o600)?;
    }
    for d in [&server, &client, &ca_only] {
        std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem"))
            .map_err(|e| format!("copy ca-cert.pem: {e}"))?;
    }
    Ok(X509 {
        server,
        client,
        ca_only,
    })
}
