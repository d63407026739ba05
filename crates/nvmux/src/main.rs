//! The nvmux command line: `serve` runs the daemon; the other commands are thin clients
//! of its HTTP/JSON API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nvmux_daemon::client::ApiClient;
use serde_json::{json, Value};

mod bench;
mod demo;

#[derive(Parser)]
#[command(
    name = "nvmux",
    version,
    about = "Share NVMe drives and files among VMs as fast virtual disks"
)]
struct Cli {
    /// API socket of the daemon.
    #[arg(
        long,
        global = true,
        env = "NVMUX_API",
        default_value = "./nvmux-data/nvmux.sock"
    )]
    api: PathBuf,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (until SIGINT or SIGTERM).
    Serve(ServeArgs),
    /// Create, list, show and delete disks.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Serve disks to VMs and tools.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Per-disk I/O statistics and per-worker load.
    Stats {
        /// Only this disk.
        disk: Option<String>,
    },
    /// Print the Prometheus metrics text.
    Metrics,
    /// Benchmark nvmux against qemu-storage-daemon and bare-metal fio (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Start a daemon on the embedded default, export a disk and drive it with libblkio.
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (default: the embedded default; see docs/config.md).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override the data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override the API socket path (default <data-dir>/nvmux.sock).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Override the number of worker threads.
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Create a disk.
    Create {
        name: String,
        /// file, null or memory.
        #[arg(long, default_value = "file")]
        backend: String,
        /// File or block device (file backend). Default: <data-dir>/disks/<name>.img.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Size, e.g. 10G. Required unless an existing file gives it.
        #[arg(long)]
        size: Option<String>,
        /// Logical block size: 512 or 4096 (default: the device's own, else 512).
        #[arg(long)]
        block_size: Option<u32>,
        #[arg(long)]
        read_only: bool,
        /// Use buffered I/O instead of O_DIRECT.
        #[arg(long)]
        buffered: bool,
    },
    /// List disks.
    List,
    /// Show one disk.
    Show { name: String },
    /// Delete a disk (it must not be exported). A file nvmux created is removed too.
    Delete { name: String },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Export a disk over vhost-user-blk on a Unix socket.
    Add {
        disk: String,
        /// Socket path QEMU / Cloud Hypervisor / libblkio connect to.
        #[arg(long)]
        socket: PathBuf,
        /// Number of virtqueues.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Export name (default: the disk's name).
        #[arg(long)]
        name: Option<String>,
        /// Export type.
        #[arg(long = "type", default_value = "vhost-user-blk")]
        kind: String,
    },
    /// List exports.
    List,
    /// Remove an export (disconnects its client).
    Remove { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("NVMUX_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn run(cli: Cli) -> Res {
    let api = ApiClient::new(&cli.api);
    let show = |v: &Value, table: &dyn Fn(&Value)| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            table(v);
        }
    };
    match cli.cmd {
        Cmd::Serve(a) => {
            let mut cfg = nvmux_daemon::Config::load(a.config.as_deref())?;
            if let Some(d) = a.data_dir {
                cfg.data_dir = d;
            }
            if let Some(s) = a.api_socket {
                cfg.api_socket = Some(s);
            }
            if let Some(w) = a.workers {
                cfg.workers.threads = w;
            }
            nvmux_daemon::serve(cfg)?;
        }
        Cmd::Disk(DiskCmd::Create {
            name,
            backend,
            path,
            size,
            block_size,
            read_only,
            buffered,
        }) => {
            let size = size.map(|s| nvmux_core::parse_size(&s)).transpose()?;
            // The daemon may run in another directory: send absolute paths.
            let path = path.map(|p| std::path::absolute(&p).unwrap_or(p));
            let v = api.post(
                "/v1/disks",
                &json!({"name": name, "backend": backend, "path": path, "size": size,
                        "block_size": block_size, "read_only": read_only, "direct": !buffered}),
            )?;
            show(&v, &|v| {
                println!(
                    "created disk {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    describe_disk(v)
                )
            });
        }
        Cmd::Disk(DiskCmd::List) => {
            let v = api.get("/v1/disks")?;
            show(&v, &|v| {
                disk_table(v.as_array().map(|a| a.as_slice()).unwrap_or(&[]))
            });
        }
        Cmd::Disk(DiskCmd::Show { name }) => {
            let v = api.get(&format!("/v1/disks/{name}"))?;
            show(&v, &|v| {
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!("{k:>12}: {}", compact(val));
                }
            });
        }
        Cmd::Disk(DiskCmd::Delete { name }) => {
            let v = api.delete(&format!("/v1/disks/{name}"))?;
            show(&v, &|_| println!("deleted disk {name}"));
        }
        Cmd::Export(ExportCmd::Add {
            disk,
            socket,
            queues,
            name,
            kind,
        }) => {
            let socket = std::path::absolute(&socket).unwrap_or(socket);
            let v = api.post(
                "/v1/exports",
                &json!({"name": name, "disk": disk, "type": kind, "socket": socket, "num_queues": queues}),
            )?;
            show(&v, &|v| {
                println!(
                    "exported disk {} as {} on {} ({} queues)",
                    v["disk"].as_str().unwrap_or(""),
                    v["type"].as_str().unwrap_or(""),
                    v["socket"].as_str().unwrap_or(""),
                    v["num_queues"]
                )
            });
        }
        Cmd::Export(ExportCmd::List) => {
            let v = api.get("/v1/exports")?;
            show(&v, &|v| {
                println!(
                    "{:<16} {:<16} {:<16} {:>6} {:<9} SOCKET",
                    "NAME", "DISK", "TYPE", "QUEUES", "CLIENT"
                );
                for e in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {:<16} {:<16} {:>6} {:<9} {}",
                        e["name"].as_str().unwrap_or(""),
                        e["disk"].as_str().unwrap_or(""),
                        e["type"].as_str().unwrap_or(""),
                        compact(&e["num_queues"]),
                        if e["connected"].as_bool() == Some(true) {
                            "connected"
                        } else {
                            "-"
                        },
                        e["socket"].as_str().unwrap_or("")
                    );
                }
            });
        }
        Cmd::Export(ExportCmd::Remove { name }) => {
            let v = api.delete(&format!("/v1/exports/{name}"))?;
            show(&v, &|_| println!("removed export {name}"));
        }
        Cmd::Stats { disk } => {
            let v = api.get("/v1/stats")?;
            show(&v, &|v| stats_table(v, disk.as_deref()));
        }
        Cmd::Metrics => {
            let (code, text) = api.call_raw("GET", "/metrics", None)?;
            if code != 200 {
                return Err(format!("metrics: HTTP {code}").into());
            }
            print!("{text}");
        }
        Cmd::Bench(a) => bench::run(a)?,
        Cmd::Demo(a) => demo::run(a)?,
    }
    Ok(())
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn describe_disk(v: &Value) -> String {
    let size = v["size"]
        .as_u64()
        .map(nvmux_core::format_size)
        .unwrap_or_default();
    format!(
        "{}, {size}, {}-byte blocks",
        v["device"].as_str().unwrap_or(""),
        v["block_size"]
    )
}

fn disk_table(disks: &[Value]) {
    println!(
        "{:<16} {:<8} {:>10} {:>6} {:<4} {:<12} DEVICE",
        "NAME", "BACKEND", "SIZE", "BS", "RO", "EXPORTS"
    );
    for d in disks {
        println!(
            "{:<16} {:<8} {:>10} {:>6} {:<4} {:<12} {}{}",
            d["name"].as_str().unwrap_or(""),
            d["backend"]["type"].as_str().unwrap_or(""),
            d["size"]
                .as_u64()
                .map(nvmux_core::format_size)
                .unwrap_or_default(),
            compact(&d["block_size"]),
            if d["read_only"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            d["exports"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            d["device"].as_str().unwrap_or(""),
            match d["status"].as_str() {
                Some("ok") | None => String::new(),
                Some(s) => format!("  [{s}]"),
            }
        );
    }
}

fn stats_table(v: &Value, only: Option<&str>) {
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8}",
        "DISK", "READS", "READ BYTES", "WRITES", "WRITE BYTES", "R p99 µs", "W p99 µs", "ERRORS"
    );
    for (name, d) in v["disks"].as_object().into_iter().flatten() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let errors = ["read", "write", "other"]
            .iter()
            .map(|k| d[k]["errors"].as_u64().unwrap_or(0))
            .sum::<u64>();
        println!(
            "{:<16} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8}",
            name,
            compact(&d["read"]["ops"]),
            nvmux_core::format_size(d["read"]["bytes"].as_u64().unwrap_or(0)),
            compact(&d["write"]["ops"]),
            nvmux_core::format_size(d["write"]["bytes"].as_u64().unwrap_or(0)),
            compact(&d["read"]["p99_us"]),
            compact(&d["write"]["p99_us"]),
            errors
        );
    }
    if only.is_none() {
        for (i, w) in v["workers"].as_array().into_iter().flatten().enumerate() {
            println!(
                "worker {i}: busy {:.3} s, idle-poll {:.3} s, {} sleeps, {} queues",
                w["busy_s"].as_f64().unwrap_or(0.0),
                w["idle_poll_s"].as_f64().unwrap_or(0.0),
                w["sleeps"],
                w["sources"]
            );
        }
    }
}
