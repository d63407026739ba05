//! nvmux-fn-audit: an example external function. It attaches to a disk's function socket
//! and, for each command the disk's classifier sends it:
//!
//! * appends one line per write (and write zeroes, deallocate) to an audit log: time, disk,
//!   LBA, blocks, bytes and the CRC32C of the data. The lines of a batch are written before
//!   any of its commands completes, so a completed write is always in the log; an FUA
//!   write or a flush also makes the log durable (fdatasync);
//! * with `--mirror FILE`, also writes the data to FILE at the same offset (a write
//!   mirror), and serves reads from it;
//! * with `--null`, does nothing and completes every command at once (reads return
//!   zeroes): the cost of the external-function path itself.
//!
//! It uses only the nvmux-extfn SDK, as a third party's function would. Run it as any user
//! that may connect to the socket; it needs no other privilege.
//!
//!     nvmux disk set-external vm1 --socket /run/nvmux/vm1-fn.sock
//!     nvmux disk set-classifier vm1 examples/classifiers/audit_writes.o
//!     nvmux-fn-audit --socket /run/nvmux/vm1-fn.sock --log /var/log/vm1-writes.log

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nvmux_extfn::{DiskInfo, Function, Reply, Request};

#[derive(Parser)]
#[command(
    name = "nvmux-fn-audit",
    version,
    about = "Example nvmux external function: audit log of writes, optional write mirror"
)]
struct Args {
    /// The disk's function socket (`nvmux disk set-external DISK --socket PATH`).
    #[arg(long)]
    socket: PathBuf,
    /// Append one line per write here (default: standard output).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Also write the data to this file, at the same offset, and serve reads from it.
    #[arg(long)]
    mirror: Option<PathBuf>,
    /// Complete every command at once without doing anything (reads return zeroes).
    #[arg(long, conflicts_with_all = ["log", "mirror"])]
    null: bool,
    /// Name shown in the daemon's log and API.
    #[arg(long, default_value = "nvmux-fn-audit")]
    name: String,
}

struct Audit {
    disk: String,
    block_size: u64,
    log: Box<dyn Write>,
    log_file: Option<File>,
    mirror: Option<File>,
    null: bool,
    batch: Vec<u8>,
    sync: bool,
    writes: u64,
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl Function for Audit {
    fn attached(&mut self, d: &DiskInfo) {
        eprintln!(
            "nvmux-fn-audit: attached to disk {} ({} blocks of {} bytes, up to {} bytes per command)",
            d.name, d.num_blocks, d.block_size, d.max_io
        );
        self.disk = d.name.clone();
        self.block_size = d.block_size as u64;
    }

    fn handle(&mut self, req: Request<'_>) -> Reply {
        if self.null {
            if req.opcode == nvmux_extfn::OP_READ {
                req.data.fill(0);
            }
            return Reply::ok(req.cookie);
        }
        let off = req.slba * self.block_size;
        let op = match req.opcode {
            nvmux_extfn::OP_WRITE => "write",
            nvmux_extfn::OP_WRITE_ZEROES => "write-zeroes",
            nvmux_extfn::OP_DEALLOCATE => "deallocate",
            nvmux_extfn::OP_FLUSH => {
                self.sync = true;
                if let Some(m) = &self.mirror {
                    if m.sync_data().is_err() {
                        return Reply::error(nvmux_extfn::STATUS_WRITE_FAULT, req.cookie);
                    }
                }
                return Reply::ok(req.cookie);
            }
            nvmux_extfn::OP_READ => {
                let Some(m) = &self.mirror else {
                    // Nothing to serve reads from: the classifier should not send them.
                    return Reply::error(nvmux_extfn::STATUS_INVALID_OPCODE, req.cookie);
                };
                return match m.read_exact_at(req.data, off) {
                    Ok(()) => Reply::ok(req.cookie),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        // Past the mirror's end: never written, reads as zeroes.
                        let _ = m.read_at(req.data, off);
                        Reply::ok(req.cookie)
                    }
                    Err(_) => Reply::error(nvmux_extfn::STATUS_UNRECOVERED_READ, req.cookie),
                };
            }
            _ => return Reply::error(nvmux_extfn::STATUS_INVALID_OPCODE, req.cookie),
        };
        let crc = nvmux_core::crc32c::crc32c(req.data);
        let _ = writeln!(
            self.batch,
            "{} {} {op} slba={} nlb={} bytes={} crc32c={crc:08x}{}",
            now_ns(),
            self.disk,
            req.slba,
            req.nlb,
            req.data.len(),
            if req.fua { " fua" } else { "" }
        );
        self.sync |= req.fua;
        self.writes += 1;
        if let Some(m) = &self.mirror {
            let r = match req.opcode {
                nvmux_extfn::OP_WRITE => m.write_all_at(req.data, off),
                _ => m.write_all_at(&vec![0u8; (req.nlb as u64 * self.block_size) as usize], off),
            };
            if r.is_err() {
                return Reply::error(nvmux_extfn::STATUS_WRITE_FAULT, req.cookie);
            }
        }
        Reply::ok(req.cookie)
    }

    fn end_batch(&mut self) -> std::io::Result<()> {
        if !self.batch.is_empty() {
            self.log.write_all(&self.batch)?;
            self.log.flush()?;
            self.batch.clear();
        }
        if std::mem::take(&mut self.sync) {
            if let Some(f) = &self.log_file {
                f.sync_data()?;
            }
            if let Some(m) = &self.mirror {
                m.sync_data()?;
            }
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    let open_append = |p: &PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    };
    let (log, log_file): (Box<dyn Write>, Option<File>) = match &a.log {
        Some(p) => match open_append(p).and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((w, f)) => (Box::new(w), Some(f)),
            Err(e) => {
                eprintln!("nvmux-fn-audit: cannot open log {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => (Box::new(std::io::stdout()), None),
    };
    let mirror = match &a.mirror {
        Some(p) => match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(p)
        {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("nvmux-fn-audit: cannot open mirror {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut f = Audit {
        disk: String::new(),
        block_size: 512,
        log,
        log_file,
        mirror,
        null: a.null,
        batch: Vec::with_capacity(64 << 10),
        sync: false,
        writes: 0,
    };
    match nvmux_extfn::serve(&a.socket, &a.name, &mut f) {
        Ok(()) => {
            eprintln!(
                "nvmux-fn-audit: the daemon closed the connection after {} writes",
                f.writes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nvmux-fn-audit: {}: {e}", a.socket.display());
            ExitCode::FAILURE
        }
    }
}
