//! A hostile external function: it attaches to a disk's function socket like any function,
//! and when the daemon hands it a ring it tries to pull the ring's memory away (shrink and
//! grow the memfd, add F_SEAL_WRITE so the daemon's stores would fault), reports what the
//! kernel answered on its standard output, and exits with the daemon's commands in flight.
//!
//! It runs as a separate process: the test binary re-executes itself, running only the
//! ignored test [`CHILD_TEST`], which a test binary that uses this module must define:
//!
//! ```ignore
//! #[test]
//! #[ignore = "entry point of the hostile function process (run by other tests)"]
//! fn hostile_function_process() {
//!     common::hostile_fn::child_main();
//! }
//! ```
//!
//! Used by `extfn_hostile.rs` and the attacker suite.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nvmux_extfn::proto;

/// The name of the ignored test that is the hostile function's entry point.
pub const CHILD_TEST: &str = "hostile_function_process";
const ENV_SOCKET: &str = "NVMUX_HOSTILE_FN_SOCKET";

/// What the hostile function tried, and the errno each attempt got (0: it worked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// F_GET_SEALS of the ring memfd.
    pub seals: i32,
    pub shrink: i32,
    pub grow: i32,
    pub seal_write: i32,
}

fn errno_of(r: libc::c_int) -> i32 {
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// The child's body: runs only in the process [`spawn`] starts.
pub fn child_main() {
    let Ok(sock) = std::env::var(ENV_SOCKET) else {
        return;
    };
    match attack(Path::new(&sock)) {
        Ok(r) => {
            println!(
                "HOSTILE seals={} shrink={} grow={} seal_write={}",
                r.seals, r.shrink, r.grow, r.seal_write
            );
            let _ = std::io::stdout().flush();
            // Exit with the daemon's commands in flight: it must fail them over.
            std::process::exit(0);
        }
        Err(e) => {
            println!("HOSTILE error {e}");
            let _ = std::io::stdout().flush();
            std::process::exit(2);
        }
    }
}

fn attack(sock: &Path) -> std::io::Result<Report> {
    let mut s = UnixStream::connect(sock)?;
    s.write_all(
        &proto::Hello {
            version: proto::VERSION,
            name: "hostile".into(),
        }
        .encode(),
    )?;
    let mut b = [0u8; proto::MSG_SIZE];
    s.read_exact(&mut b)?;
    match proto::Welcome::decode(&b) {
        Some(w) if w.status == proto::WELCOME_OK => {}
        _ => {
            return Err(std::io::Error::other(
                "the daemon refused the hostile function",
            ))
        }
    }
    loop {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 1000) };
        let (n, fds) = match nvmux_extfn::sock::recv_with_fds(s.as_raw_fd(), &mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => r?,
        };
        if n == 0 {
            return Err(std::io::Error::other("the daemon closed the connection"));
        }
        let Some(m) = proto::RingMsg::decode(&b) else {
            continue;
        };
        if m.kind != proto::MSG_ADD_RING || fds.is_empty() {
            continue;
        }
        let fd = fds[0].as_raw_fd();
        // SAFETY: fcntl and ftruncate on a descriptor we received and hold.
        let r = unsafe {
            Report {
                seals: libc::fcntl(fd, libc::F_GET_SEALS),
                shrink: errno_of(libc::ftruncate(fd, 0)),
                grow: errno_of(libc::ftruncate(fd, (m.size * 2) as libc::off_t)),
                seal_write: errno_of(libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE)),
            }
        };
        return Ok(r);
    }
}

/// Start the hostile function on `socket` (as `uid`, if given).
pub fn spawn(socket: &Path, uid: Option<u32>) -> Child {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    if let Some(u) = uid {
        cmd.uid(u).gid(u);
    }
    cmd.args([
        CHILD_TEST,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ENV_SOCKET, socket)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn the hostile function")
}

/// Wait for the hostile function and parse its report.
pub fn report(child: Child) -> Result<Report, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("HOSTILE ").map(|(_, r)| r))
        .ok_or_else(|| format!("no report from the hostile function: {text}"))?;
    let field = |k: &str| -> Result<i32, String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("hostile function: {line}"))
    };
    Ok(Report {
        seals: field("seals")?,
        shrink: field("shrink")?,
        grow: field("grow")?,
        seal_write: field("seal_write")?,
    })
}

/// Compile a classifier (examples/classifiers/NAME.c or tests/classifiers/NAME.c) into
/// `out_dir` with clang.
pub fn compile_classifier(out_dir: &Path, name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ex = manifest.join("../../examples/classifiers");
    let src = [
        ex.join(format!("{name}.c")),
        manifest.join(format!("tests/classifiers/{name}.c")),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("no classifier {name}"));
    let out = out_dir.join(format!("{name}.o"));
    let st = Command::new("clang")
        .args(["-O2", "-target", "bpf", "-I"])
        .arg(&ex)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run clang (install clang: scripts/test.sh does)");
    assert!(st.success(), "clang failed on {}", src.display());
    out
}
