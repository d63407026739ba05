//! nvmux benchmark building blocks: a libblkio vhost-user-blk client, random-I/O
//! workloads, baseline servers (qemu-storage-daemon, fio) and CPU accounting.
//! The `nvmux bench` command (in the binary) composes them into runs and reports.

pub mod attack;
pub mod client;
pub mod nvmf;
pub mod procs;
pub mod scale;
pub mod tls;
pub mod vufront;
pub mod workload;

pub use client::{BlkioClient, Op};
pub use workload::{Measured, Workload};
