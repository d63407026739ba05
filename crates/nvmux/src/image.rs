//! `nvmux disk import` and `nvmux disk export`: move images (raw, qcow2, or anything
//! qemu-img reads) into and out of nvmux disks. The CLI exports the disk over NBD on a
//! private socket for the duration (read-only for an export to a file) and lets
//! `qemu-img convert` do the conversion, drawing its progress as a bar on a terminal.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nvmux_daemon::client::ApiClient;
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A temporary NBD export of a disk, removed when dropped.
struct TempExport<'a> {
    api: &'a ApiClient,
    name: String,
    socket: PathBuf,
}

impl<'a> TempExport<'a> {
    fn new(api: &'a ApiClient, disk: &str, read_only: bool) -> Res<TempExport<'a>> {
        let name = format!("image-{}", std::process::id());
        let socket = std::env::temp_dir().join(format!("nvmux-{name}.sock"));
        api.post(
            "/v1/exports",
            &json!({"name": name, "disk": disk, "type": "nbd", "socket": socket, "read_only": read_only}),
        )?;
        Ok(TempExport { api, name, socket })
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.name, self.socket.display())
    }
}

impl Drop for TempExport<'_> {
    fn drop(&mut self) {
        let _ = self.api.delete(&format!("/v1/exports/{}", self.name));
    }
}

/// `qemu-img info`: (virtual size, detected format).
fn info(src: &str) -> Res<(u64, String)> {
    let o = Command::new("qemu-img")
        .args(["info", "--output=json", src])
        .output()
        .map_err(|e| format!("qemu-img: {e} (install qemu-utils)"))?;
    if !o.status.success() {
        return Err(format!(
            "qemu-img info {src}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )
        .into());
    }
    let v: Value = serde_json::from_slice(&o.stdout)?;
    let size = v["virtual-size"]
        .as_u64()
        .ok_or("qemu-img info gave no virtual size")?;
    let fmt = v["format"].as_str().unwrap_or("raw").to_string();
    Ok((size, fmt))
}

/// Run `qemu-img convert -p ARGS`, drawing its progress against `total` bytes.
fn convert(args: &[&str], total: u64, label: &str) -> Res<()> {
    let mut c = Command::new("qemu-img")
        .arg("convert")
        .arg("-p")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("qemu-img: {e} (install qemu-utils)"))?;
    let tty = std::io::stderr().is_terminal();
    let mut out = c.stdout.take().ok_or("qemu-img stdout")?;
    let mut field = Vec::new();
    let mut b = [0u8; 256];
    loop {
        let n = out.read(&mut b)?;
        if n == 0 {
            break;
        }
        for &ch in &b[..n] {
            if ch == b'\r' || ch == b'\n' {
                // "    (12.50/100%)"
                let s = String::from_utf8_lossy(&field).to_string();
                if let Some(p) = s.trim().strip_prefix('(').and_then(|r| r.split('/').next()) {
                    if let (Ok(pct), true) = (p.parse::<f64>(), tty) {
                        nvmux_bench::report::draw_bar(
                            label,
                            (pct / 100.0 * total as f64) as u64,
                            total,
                        );
                    }
                }
                field.clear();
            } else {
                field.push(ch);
            }
        }
    }
    let mut err = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let st = c.wait()?;
    if tty {
        eprint!("\r\x1b[K");
    }
    if !st.success() {
        return Err(format!("qemu-img convert failed: {}", err.trim()).into());
    }
    Ok(())
}

/// Copy an image into a disk (created if it does not exist: a file disk, or a thin
/// volume with `pool`, sized to the image).
pub fn import(
    api: &ApiClient,
    disk: &str,
    src: &str,
    format: Option<&str>,
    pool: Option<&str>,
    size: Option<u64>,
) -> Res<String> {
    let local = !src.contains("://");
    if local && !Path::new(src).exists() {
        return Err(format!("{src} does not exist").into());
    }
    let (vsize, detected) = info(src)?;
    let fmt = format.unwrap_or(&detected).to_string();
    let want = size.unwrap_or(vsize).next_multiple_of(512);
    let created = match api.get(&format!("/v1/disks/{disk}")) {
        Ok(d) => {
            let have = d["size"].as_u64().unwrap_or(0);
            if have < vsize {
                return Err(format!(
                    "disk {disk:?} has {} and the image needs {}; resize the disk or import into a new one",
                    nvmux_core::format_size(have),
                    nvmux_core::format_size(vsize)
                )
                .into());
            }
            false
        }
        Err(e) if e.status == 404 => {
            if want < vsize {
                return Err(
                    format!("--size {want} is smaller than the image ({vsize} bytes)").into(),
                );
            }
            let mut body = json!({"name": disk, "size": want});
            if let Some(p) = pool {
                body["pool"] = json!(p);
            }
            api.post("/v1/disks", &body)?;
            true
        }
        Err(e) => return Err(e.into()),
    };
    let run = || -> Res<()> {
        let t = TempExport::new(api, disk, false)?;
        convert(
            &["-n", "-f", &fmt, "-O", "raw", src, &t.uri()],
            vsize,
            &format!("importing {disk}"),
        )
    };
    if let Err(e) = run() {
        if created {
            let _ = api.delete(&format!("/v1/disks/{disk}"));
        }
        return Err(e);
    }
    Ok(format!(
        "imported {src} ({fmt}, {}) into disk {disk}{}",
        nvmux_core::format_size(vsize),
        if created { " (created)" } else { "" }
    ))
}

/// Copy a disk out to an image file in `format` (raw, qcow2, or what qemu-img writes).
pub fn export(api: &ApiClient, disk: &str, dst: &Path, format: &str, force: bool) -> Res<String> {
    if dst.exists() && !force {
        return Err(format!("{} exists; give --force to overwrite it", dst.display()).into());
    }
    let d = api.get(&format!("/v1/disks/{disk}"))?;
    let size = d["size"].as_u64().unwrap_or(0);
    let t = TempExport::new(api, disk, true)?;
    // Written beside the destination and renamed over it once complete: a failed export
    // leaves neither a half-written image nor a damaged old one.
    let mut part = dst.as_os_str().to_owned();
    part.push(".nvmux-partial");
    let part = PathBuf::from(part);
    let part_s = part.to_string_lossy();
    let done = convert(
        &["-f", "raw", "-O", format, &t.uri(), &part_s],
        size,
        &format!("exporting {disk}"),
    )
    .and_then(|()| {
        std::fs::rename(&part, dst).map_err(|e| format!("{}: {e}", dst.display()).into())
    });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    Ok(format!(
        "exported disk {disk} ({}) to {} ({format})",
        nvmux_core::format_size(size),
        dst.display()
    ))
}
