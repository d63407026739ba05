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

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub use nvmux_bench::attack::local::{extfn_resize_ring, FnReport as Report};

/// The name of the ignored test that is the hostile function's entry point.
pub const CHILD_TEST: &str = "hostile_function_process";
const ENV_SOCKET: &str = "NVMUX_HOSTILE_FN_SOCKET";

/// The child's body: runs only in the process [`spawn`] starts.
pub fn child_main() {
    let Ok(sock) = std::env::var(ENV_SOCKET) else {
        return;
    };
    match extfn_resize_ring(Path::new(&sock)) {
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
