//! nvmux benchmarks: the building blocks (a libblkio vhost-user-blk client, random-I/O
//! workloads, baseline servers such as qemu-storage-daemon and fio, CPU accounting, an
//! NVMe/TCP initiator, the attacker library) and what `nvmux bench` runs with them: the
//! default run (`run`), the evaluation suite (`suite`, with its `plots`), the other suites
//! (`suites`), the daemon process they drive (`daemon`) and their reports (`report`).
//! The `nvmux` binary only parses the command line and calls [`run::run`].

pub mod attack;
pub mod client;
pub mod daemon;
pub mod dbbench;
pub mod guestio;
pub mod nvmf;
pub mod plots;
pub mod procs;
pub mod report;
pub mod run;
pub mod scale;
pub mod suite;
pub mod suites;
pub mod tls;
pub mod verify;
pub mod vufront;
pub mod workload;

pub use client::{BlkioClient, Op};
pub use workload::{Measured, Workload};
