//! Prometheus text exposition of per-disk and per-worker metrics.
//!
//! Rates (IOPS, bandwidth) are `rate()` of the `_total` counters, as usual in Prometheus.

use std::fmt::Write;

use nvmux_core::stats::{ClassSnapshot, LAT_BUCKETS};

use crate::{Daemon, WorkerView};

pub fn render(d: &Daemon) -> String {
    let mut o = String::new();
    let mut disks = Vec::new();
    d.for_each_disk_stats(|name, s| disks.push((name.to_string(), s.clone())));
    let classes = |s: &nvmux_core::stats::Snapshot| -> [(&'static str, ClassSnapshot); 3] {
        [
            ("read", s.read.clone()),
            ("write", s.write.clone()),
            ("other", s.other.clone()),
        ]
    };
    for (metric, help, get) in [
        (
            "nvmux_disk_ops_total",
            "Completed commands.",
            (|c: &ClassSnapshot| c.ops) as fn(&ClassSnapshot) -> u64,
        ),
        (
            "nvmux_disk_bytes_total",
            "Bytes transferred by completed commands.",
            |c| c.bytes,
        ),
        (
            "nvmux_disk_errors_total",
            "Commands completed with an error status.",
            |c| c.errors,
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for (name, s) in &disks {
            for (op, c) in classes(s) {
                let _ = writeln!(o, "{metric}{{disk=\"{name}\",op=\"{op}\"}} {}", get(&c));
            }
        }
    }
    let _ = writeln!(
        o,
        "# HELP nvmux_disk_failed 1 while the disk's file or pool is failed after an I/O error (writes and flushes fail until the daemon restarts).\n# TYPE nvmux_disk_failed gauge"
    );
    for (name, failed) in d.disk_failures() {
        let _ = writeln!(o, "nvmux_disk_failed{{disk=\"{name}\"}} {}", failed as u8);
    }
    let pools: Vec<(String, nvmux_volume::PoolUsage)> = d
        .pools()
        .into_iter()
        .filter_map(|p| Some((p.name, p.usage?)))
        .collect();
    let _ = writeln!(
        o,
        "# HELP nvmux_pool_failed 1 while the pool is failed after an I/O error (writes and flushes fail until it is reopened).\n# TYPE nvmux_pool_failed gauge"
    );
    for (name, u) in &pools {
        let _ = writeln!(
            o,
            "nvmux_pool_failed{{pool=\"{name}\"}} {}",
            u.failed.is_some() as u8
        );
    }
    let _ = writeln!(
        o,
        "# HELP nvmux_pool_commands_timed_out_total Commands failed because they waited in the pool longer than pool.command_timeout_ms.\n# TYPE nvmux_pool_commands_timed_out_total counter"
    );
    for (name, u) in &pools {
        let _ = writeln!(
            o,
            "nvmux_pool_commands_timed_out_total{{pool=\"{name}\"}} {}",
            u.commands_timed_out
        );
    }
    let _ = writeln!(
        o,
        "# HELP nvmux_disk_in_flight Commands in flight.\n# TYPE nvmux_disk_in_flight gauge"
    );
    for (name, s) in &disks {
        let _ = writeln!(o, "nvmux_disk_in_flight{{disk=\"{name}\"}} {}", s.in_flight);
    }
    let m = "nvmux_disk_latency_seconds";
    let _ = writeln!(
        o,
        "# HELP {m} Command latency, from request arrival to completion.\n# TYPE {m} histogram"
    );
    for (name, s) in &disks {
        for (op, c) in classes(s) {
            let mut acc = 0;
            for i in 0..LAT_BUCKETS {
                acc += c.lat[i];
                let le = ClassSnapshot::bucket_le_seconds(i)
                    .map_or("+Inf".to_string(), |v| format!("{v}"));
                let _ = writeln!(
                    o,
                    "{m}_bucket{{disk=\"{name}\",op=\"{op}\",le=\"{le}\"}} {acc}"
                );
            }
            let _ = writeln!(
                o,
                "{m}_sum{{disk=\"{name}\",op=\"{op}\"}} {}",
                c.lat_sum_ns as f64 / 1e9
            );
            let _ = writeln!(o, "{m}_count{{disk=\"{name}\",op=\"{op}\"}} {acc}");
        }
    }
    let routes = d.route_totals();
    let m = "nvmux_route_commands_total";
    let _ = writeln!(
        o,
        "# HELP {m} Classifier decisions, by route (disks with a classifier).\n# TYPE {m} counter"
    );
    for (name, t) in &routes {
        for r in nvmux_router::Route::ALL {
            let _ = writeln!(
                o,
                "{m}{{disk=\"{name}\",route=\"{}\"}} {}",
                r.name(),
                t.routed[r as usize]
            );
        }
    }
    for (metric, help, get) in [
        (
            "nvmux_route_hooks_total",
            "Completion hooks run.",
            (|t: &nvmux_router::RouteTotals| t.hooks) as fn(&nvmux_router::RouteTotals) -> u64,
        ),
        (
            "nvmux_route_rewrites_total",
            "Commands whose range or FUA a classifier rewrote.",
            |t| t.rewrites,
        ),
        (
            "nvmux_route_errors_total",
            "Bad verdicts, rewrites outside the disk and hop-limit failures.",
            |t| t.errors,
        ),
        (
            "nvmux_route_fallbacks_total",
            "Commands for an external function that failed or took the chain instead.",
            |t| t.fallbacks,
        ),
        (
            "nvmux_route_flushes_forced_total",
            "FLUSHes a classifier or function tried to acknowledge without the device, sent to the device instead (the disk does not allow_flush_complete).",
            |t| t.flushes_forced,
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for (name, t) in &routes {
            let _ = writeln!(o, "{metric}{{disk=\"{name}\"}} {}", get(t));
        }
    }
    let net = d.network_view();
    for (metric, kind, help, v) in [
        (
            "nvmux_net_memory_budget_bytes",
            "gauge",
            "Buffers the network frontends may hold together (network.memory_budget).",
            net.memory_budget,
        ),
        (
            "nvmux_net_memory_used_bytes",
            "gauge",
            "Buffers the network frontends' connections hold now.",
            net.memory_used,
        ),
        (
            "nvmux_net_memory_waits_total",
            "counter",
            "Buffer reservations that had to wait because the budget was full.",
            net.memory_waits,
        ),
    ] {
        let _ = writeln!(
            o,
            "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {v}"
        );
    }
    let nv = d.nvmf_stats();
    let m = "nvmux_nvmf_connections";
    let _ = writeln!(
        o,
        "# HELP {m} NVMe/TCP connections open, per listener.\n# TYPE {m} gauge"
    );
    for l in &nv.listeners {
        let _ = writeln!(o, "{m}{{listener=\"{}\"}} {}", l.listen, l.connections);
    }
    let m = "nvmux_nvmf_connections_refused_total";
    let _ = writeln!(
        o,
        "# HELP {m} NVMe/TCP connections refused by the listener's limits.\n# TYPE {m} counter"
    );
    for l in &nv.listeners {
        let _ = writeln!(o, "{m}{{listener=\"{}\"}} {}", l.listen, l.refused);
    }
    for (metric, help, v) in [
        (
            "nvmux_nvmf_handshake_timeouts_total",
            "Connections closed for not completing Connect (and authentication) in time.",
            nv.handshake_timeouts,
        ),
        (
            "nvmux_nvmf_stall_timeouts_total",
            "Connections closed because a PDU, an R2T's data or the host's reading stalled.",
            nv.stall_timeouts,
        ),
        (
            "nvmux_nvmf_kato_expired_total",
            "Controllers torn down by their keep-alive timeout.",
            nv.kato_expired,
        ),
        (
            "nvmux_nvmf_protocol_errors_total",
            "Connections terminated for breaking the protocol or a limit.",
            nv.protocol_errors,
        ),
        (
            "nvmux_nvmf_memory_waits_total",
            "Times an NVMe/TCP connection waited for buffer memory.",
            nv.memory_waits,
        ),
    ] {
        let _ = writeln!(
            o,
            "# HELP {metric} {help}\n# TYPE {metric} counter\n{metric} {v}"
        );
    }
    let m = "nvmux_nvmf_auth_total";
    let _ = writeln!(
        o,
        "# HELP {m} DH-HMAC-CHAP exchanges by result.\n# TYPE {m} counter\n{m}{{result=\"ok\"}} {}\n{m}{{result=\"failed\"}} {}",
        nv.auth_succeeded, nv.auth_failed
    );
    let exports: Vec<(String, String, crate::GuestMemoryView)> = d
        .exports()
        .into_iter()
        .filter_map(|e| Some((e.spec.name, e.spec.disk, e.guest_memory?)))
        .collect();
    for (metric, kind, help, get) in [
        (
            "nvmux_export_guest_memory_faults_total",
            "counter",
            "vhost-user memory tables whose backing shrank under the device (each failed the device).",
            (|m: &crate::GuestMemoryView| m.faults) as fn(&crate::GuestMemoryView) -> u64,
        ),
        (
            "nvmux_export_guest_memory_regions_refused_total",
            "counter",
            "vhost-user memory regions refused (past the end of their file, empty, overlapping).",
            |m| m.regions_refused,
        ),
        (
            "nvmux_export_device_failed",
            "gauge",
            "1 while the export's device is failed because its guest memory shrank.",
            |m| m.device_failed as u64,
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (name, disk, m) in &exports {
            let _ = writeln!(o, "{metric}{{export=\"{name}\",disk=\"{disk}\"}} {}", get(m));
        }
    }
    let migr: Vec<(String, String, crate::MigrationView)> = d
        .exports()
        .into_iter()
        .filter_map(|e| Some((e.spec.name, e.spec.disk, e.migration?)))
        .collect();
    for (metric, kind, help, get) in [
        (
            "nvmux_export_ring_overlaps_total",
            "counter",
            "vhost-user rings started while a ring of the other export of the migration pair ran (always 0).",
            (|m: &crate::MigrationView| m.overlaps) as fn(&crate::MigrationView) -> u64,
        ),
        (
            "nvmux_export_ring_handoffs_total",
            "counter",
            "Times the right to run the disk's rings moved from one vhost-user connection to another.",
            |m| m.handoffs,
        ),
        (
            "nvmux_export_ring_start_refused_total",
            "counter",
            "Ring starts refused because the migration peer's rings did not stop in time.",
            |m| m.refused,
        ),
        (
            "nvmux_export_dirty_log_active",
            "gauge",
            "1 while the front-end has dirty logging on (a live migration runs).",
            |m| m.dirty_log_active as u64,
        ),
        (
            "nvmux_export_dirty_log_faults_total",
            "counter",
            "Dirty logs whose file shrank under the device.",
            |m| m.dirty_log_faults,
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (name, disk, m) in &migr {
            let _ = writeln!(o, "{metric}{{export=\"{name}\",disk=\"{disk}\"}} {}", get(m));
        }
    }
    nbd(&mut o, d);
    vfio_user(&mut o, d);
    mirrors(&mut o, d);
    let workers: Vec<WorkerView> = d.worker_handles().iter().map(WorkerView::from).collect();
    for (metric, kind, help, get) in [
        (
            "nvmux_worker_busy_seconds_total",
            "counter",
            "Time in loop iterations that found work.",
            (|w: &WorkerView| w.busy_s) as fn(&WorkerView) -> f64,
        ),
        (
            "nvmux_worker_idle_poll_seconds_total",
            "counter",
            "Time polling without work before sleeping.",
            |w| w.idle_poll_s,
        ),
        (
            "nvmux_worker_sleeps_total",
            "counter",
            "Times the worker went to sleep.",
            |w| w.sleeps as f64,
        ),
        (
            "nvmux_worker_sources",
            "gauge",
            "Queues attached to the worker.",
            |w| w.sources as f64,
        ),
        (
            "nvmux_worker_panics_total",
            "counter",
            "Queues and connections closed because serving them panicked.",
            |w| w.panics as f64,
        ),
        (
            "nvmux_worker_allocations_total",
            "counter",
            "Heap allocations made on the worker thread (serving I/O makes none).",
            |w| w.allocs as f64,
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (i, w) in workers.iter().enumerate() {
            let _ = writeln!(o, "{metric}{{worker=\"{i}\"}} {}", get(w));
        }
    }
    let _ = writeln!(
        o,
        "# HELP nvmux_io_leaked_commands_total Commands a dropped io_uring queue left in the kernel; their buffers are kept forever.\n# TYPE nvmux_io_leaked_commands_total counter\nnvmux_io_leaked_commands_total {}",
        nvmux_backend::leaked_commands()
    );
    o
}

/// The NBD listeners' limits and counters.
fn nbd(o: &mut String, d: &Daemon) {
    let v = d.nbd_view();
    type Get = fn(&crate::nbd::NbdListenerView) -> u64;
    let rows: [(&str, &str, &str, Get); 8] = [
        (
            "nvmux_nbd_connections",
            "gauge",
            "NBD connections a listener holds now, negotiating or transmitting.",
            |l| l.connections,
        ),
        (
            "nvmux_nbd_negotiating",
            "gauge",
            "NBD connections still negotiating.",
            |l| l.negotiating,
        ),
        (
            "nvmux_nbd_connections_refused_total",
            "counter",
            "NBD connections closed at accept (max_connections, max_connections_per_host).",
            |l| l.refused,
        ),
        (
            "nvmux_nbd_handshake_timeouts_total",
            "counter",
            "NBD negotiations cut at handshake_timeout_ms.",
            |l| l.handshake_timeouts,
        ),
        (
            "nvmux_nbd_negotiation_errors_total",
            "counter",
            "NBD negotiations that broke the protocol.",
            |l| l.negotiation_errors,
        ),
        (
            "nvmux_nbd_tls_failures_total",
            "counter",
            "Failed TLS handshakes on NBD listeners.",
            |l| l.tls_failures,
        ),
        (
            "nvmux_nbd_stalls_total",
            "counter",
            "NBD connections ended by stall_timeout_ms.",
            |l| l.stalls,
        ),
        (
            "nvmux_nbd_memory_waits_total",
            "counter",
            "Times an NBD connection waited for buffer memory.",
            |l| l.memory_waits,
        ),
    ];
    for (metric, kind, help, get) in rows {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for l in &v.listeners {
            let _ = writeln!(
                o,
                "{metric}{{listener=\"{}\"}} {}",
                l.address.replace('\\', "\\\\").replace('"', "\\\""),
                get(l)
            );
        }
    }
}

/// The vfio-user exports' controller counters (the disks' I/O is in `nvmux_disk_*`).
fn vfio_user(o: &mut String, d: &Daemon) {
    let exports: Vec<(String, String, crate::VfioUserView)> = d
        .exports()
        .into_iter()
        .filter_map(|e| Some((e.spec.name, e.spec.disk, e.vfio_user?)))
        .collect();
    type Get = fn(&crate::VfioUserView) -> u64;
    let rows: [(&str, &str, &str, Get); 10] = [
        (
            "nvmux_vfio_user_sessions_total",
            "counter",
            "vfio-user clients (QEMU) served.",
            |v| v.sessions_total,
        ),
        (
            "nvmux_vfio_user_sessions_failed_total",
            "counter",
            "vfio-user connections ended on a protocol error (malformed message, stalled client).",
            |v| v.sessions_failed,
        ),
        (
            "nvmux_vfio_user_io_queues",
            "gauge",
            "NVMe I/O queue pairs the guest created.",
            |v| v.io_queues,
        ),
        (
            "nvmux_vfio_user_bad_prps_total",
            "counter",
            "NVMe commands failed because a PRP lay outside the guest's DMA mappings.",
            |v| v.bad_prps,
        ),
        (
            "nvmux_vfio_user_bad_doorbells_total",
            "counter",
            "Doorbell writes refused (no such queue, past the queue size).",
            |v| v.bad_doorbells,
        ),
        (
            "nvmux_vfio_user_admin_commands_total",
            "counter",
            "NVMe admin commands completed.",
            |v| v.admin_commands,
        ),
        (
            "nvmux_vfio_user_io_commands_total",
            "counter",
            "NVMe I/O commands completed.",
            |v| v.io_commands,
        ),
        (
            "nvmux_vfio_user_interrupts_total",
            "counter",
            "Interrupts signalled to the guest (MSI-X or INTx).",
            |v| v.interrupts,
        ),
        (
            "nvmux_vfio_user_async_events_total",
            "counter",
            "NVMe asynchronous events delivered (namespace attribute changed).",
            |v| v.async_events,
        ),
        (
            "nvmux_vfio_user_fatal_errors_total",
            "counter",
            "Times the guest's controller entered the fatal status (CSTS.CFS).",
            |v| v.fatal_errors,
        ),
    ];
    for (metric, kind, help, get) in rows {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (name, disk, v) in &exports {
            let _ = writeln!(
                o,
                "{metric}{{export=\"{name}\",disk=\"{disk}\"}} {}",
                get(v)
            );
        }
    }
    let m = "nvmux_vfio_user_connected";
    let _ = writeln!(
        o,
        "# HELP {m} 1 while a vfio-user client is connected.\n# TYPE {m} gauge"
    );
    for e in d.exports() {
        if e.vfio_user.is_some() {
            let _ = writeln!(
                o,
                "{m}{{export=\"{}\",disk=\"{}\"}} {}",
                e.spec.name, e.spec.disk, e.connected as u8
            );
        }
    }
}

/// Mirrors (per disk and leg) and remote initiators (per disk, leg and path).
fn mirrors(o: &mut String, d: &Daemon) {
    let views: Vec<crate::DiskView> = d.disks();
    let mirrors: Vec<&crate::MirrorView> = views
        .iter()
        .filter_map(|v| v.mirror_status.as_ref())
        .collect();
    type Get = fn(&crate::MirrorView) -> u64;
    let rows: [(&str, &str, &str, Get); 5] = [
        (
            "nvmux_mirror_dirty_regions",
            "gauge",
            "Regions set in the write-intent bitmap (the legs may differ there).",
            |m| m.dirty_regions,
        ),
        (
            "nvmux_mirror_resynced_regions_total",
            "counter",
            "Regions copied by resyncs of returning legs (dirty regions only).",
            |m| m.resynced_regions,
        ),
        (
            "nvmux_mirror_full_copies_total",
            "counter",
            "Full copies finished (new legs).",
            |m| m.full_copies,
        ),
        (
            "nvmux_mirror_read_repairs_total",
            "counter",
            "Reads that failed on one leg, were served by another and written back.",
            |m| m.read_repairs,
        ),
        (
            "nvmux_mirror_bitmap_writes_total",
            "counter",
            "Write-intent bitmap writes (each synced before the writes it covers).",
            |m| m.bitmap_writes,
        ),
    ];
    for (metric, kind, help, get) in rows {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for m in &mirrors {
            let _ = writeln!(o, "{metric}{{disk=\"{}\"}} {}", m.disk, get(m));
        }
    }
    let _ = writeln!(
        o,
        "# HELP nvmux_mirror_leg_state The leg's state: 0 healthy, 1 syncing, 2 faulted.\n# TYPE nvmux_mirror_leg_state gauge"
    );
    for m in &mirrors {
        for l in &m.legs {
            let s = match l.state.as_str() {
                "healthy" => 0,
                "syncing" => 1,
                _ => 2,
            };
            let _ = writeln!(
                o,
                "nvmux_mirror_leg_state{{disk=\"{}\",leg=\"{}\"}} {s}",
                m.disk, l.name
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP nvmux_mirror_leg_sync_bytes Bytes copied and to copy by the leg's running copy.\n# TYPE nvmux_mirror_leg_sync_bytes gauge"
    );
    for m in &mirrors {
        for l in &m.legs {
            let _ = writeln!(
                o,
                "nvmux_mirror_leg_sync_bytes{{disk=\"{}\",leg=\"{}\",kind=\"done\"}} {}",
                m.disk, l.name, l.sync_done
            );
            let _ = writeln!(
                o,
                "nvmux_mirror_leg_sync_bytes{{disk=\"{}\",leg=\"{}\",kind=\"total\"}} {}",
                m.disk, l.name, l.sync_total
            );
        }
    }
    // Remote initiators: the backend's and the remote legs'.
    let mut remotes: Vec<(&str, &str, &crate::RemoteView)> = Vec::new();
    for v in &views {
        // A mirrored disk shows its backend's initiator as one of its legs.
        if let (Some(r), None) = (&v.remote, &v.mirror_status) {
            remotes.push((&v.spec.name, "backend", r));
        }
        for l in v.mirror_status.iter().flat_map(|m| &m.legs) {
            if let Some(r) = &l.remote {
                remotes.push((&v.spec.name, &l.name, r));
            }
        }
    }
    type RGet = fn(&crate::RemoteView) -> u64;
    let rows: [(&str, &str, &str, RGet); 4] = [
        (
            "nvmux_remote_failovers_total",
            "counter",
            "Times the active path to the remote namespace changed.",
            |r| r.failovers,
        ),
        (
            "nvmux_remote_reconnects_total",
            "counter",
            "Reconnections to the remote controller.",
            |r| r.reconnects,
        ),
        (
            "nvmux_remote_commands_failed_total",
            "counter",
            "Commands failed because no path came back within the loss timeout.",
            |r| r.commands_failed,
        ),
        (
            "nvmux_remote_commands_retried_total",
            "counter",
            "Commands sent again after a connection was lost.",
            |r| r.commands_retried,
        ),
    ];
    for (metric, kind, help, get) in rows {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (disk, leg, r) in &remotes {
            let _ = writeln!(o, "{metric}{{disk=\"{disk}\",leg=\"{leg}\"}} {}", get(r));
        }
    }
    let _ = writeln!(
        o,
        "# HELP nvmux_remote_path_up 1 while the path's connection is live.\n# TYPE nvmux_remote_path_up gauge"
    );
    for (disk, leg, r) in &remotes {
        for p in &r.paths {
            let _ = writeln!(
                o,
                "nvmux_remote_path_up{{disk=\"{disk}\",leg=\"{leg}\",path=\"{}\",active=\"{}\"}} {}",
                p.addr,
                p.active,
                (p.state == "live") as u8
            );
        }
    }
}
