//! The vhost-user side of a takeover (see [`crate::handover`]): freeze a session into a
//! [`SessionState`], thaw it when the takeover fails, and adopt a handed-over session in
//! the new process.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::BackendReqHandler;

use crate::handover::{InflightState, RegionState, SessionState, VringState};
use crate::mem::{self, Memory, RegionDesc};
use crate::{BlkBackend, RegionInfo};

/// Sessions handed over to this process, by export socket path, until their export
/// starts (see [`stash_session`]).
static SESSIONS: Mutex<Option<HashMap<PathBuf, SessionState<OwnedFd>>>> = Mutex::new(None);

/// Keep a handed-over session until the export on `s.socket` starts and adopts it.
pub fn stash_session(s: SessionState<OwnedFd>) {
    let mut g = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(HashMap::new)
        .insert(s.socket.clone(), s);
}

pub(crate) fn take_session(socket: &Path) -> Option<SessionState<OwnedFd>> {
    let mut g = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
    g.as_mut()?.remove(socket)
}

/// Sessions stashed but never adopted (their export was not restored): closed, so the
/// front-end sees its connection end and reconnects.
pub fn drop_unclaimed_sessions() -> Vec<PathBuf> {
    let mut g = SESSIONS.lock().unwrap_or_else(|e| e.into_inner());
    g.take()
        .map(|m| m.into_keys().collect())
        .unwrap_or_default()
}

fn fd(f: &File) -> std::io::Result<OwnedFd> {
    Ok(OwnedFd::from(f.try_clone()?))
}

impl BlkBackend {
    /// Every ring is stopped (drained, `base` recorded): the session as it stands, with
    /// duplicates of its descriptors. `conn` and `backend_req` are the caller's.
    pub(crate) fn snapshot(
        &self,
        socket: &Path,
        conn: OwnedFd,
        backend_req: Option<OwnedFd>,
        running: &[bool],
    ) -> std::io::Result<SessionState<OwnedFd>> {
        // The dirty log lives in the front-end's memory and the source QEMU reads it
        // until the migration ends; a new process would have to map it anew mid-way.
        // Not worth the risk of a missed page: the upgrade waits for the migration.
        if self.acked_features & crate::log::VHOST_F_LOG_ALL != 0 && self.log_map.is_some() {
            return Err(std::io::Error::other(format!(
                "export {} is being live-migrated (dirty logging on); upgrade after the migration completes",
                self.name
            )));
        }
        let m = self.mem.load();
        let mut regions = Vec::new();
        for (gpa, size, offset, file) in m.region_files() {
            let uaddr = self
                .regions
                .iter()
                .find(|r| r.gpa == gpa)
                .map(|r| r.uaddr)
                .ok_or_else(|| std::io::Error::other("a mapped region is not in the table"))?;
            regions.push((
                RegionState {
                    gpa,
                    size,
                    uaddr,
                    offset,
                },
                OwnedFd::from(file?),
            ));
        }
        let mut vrings = Vec::with_capacity(self.vrings.len());
        for (i, v) in self.vrings.iter().enumerate() {
            vrings.push(VringState {
                size: v.size,
                addrs: v.addrs,
                base: v.base,
                enabled: v.enabled,
                running: running.get(i).copied().unwrap_or(false),
                kick: v.kick.as_ref().map(fd).transpose()?,
                call: v.call.as_ref().map(fd).transpose()?,
            });
        }
        Ok(SessionState {
            socket: socket.to_path_buf(),
            features: self.acked_features,
            protocol: self.acked_protocol,
            conn,
            backend_req,
            regions,
            vrings,
            inflight: self
                .inflight
                .as_ref()
                .map(|r| {
                    Ok::<_, std::io::Error>(InflightState {
                        num_queues: r.num_queues(),
                        queue_size: r.queue_size(),
                        mmap_size: r.mmap_size(),
                        mmap_offset: r.mmap_offset(),
                        fd: fd(r.file())?,
                    })
                })
                .transpose()?,
        })
    }

    /// The takeover did not happen: start again the rings that ran before the freeze,
    /// each at the `base` it stopped at.
    pub(crate) fn thaw(&mut self, running: &[bool]) {
        for (i, r) in running.iter().enumerate() {
            if *r {
                if let Err(e) = self.try_start(i) {
                    tracing::error!(export = %self.name, queue = i, "virtqueue could not be restarted after the takeover was abandoned: {e}");
                }
            }
        }
    }

    /// Take over a session's state (memory mapped anew from the same files, rings as
    /// they were). The rings are started by [`BlkBackend::start_adopted`].
    pub(crate) fn adopt(&mut self, s: &mut SessionState<OwnedFd>) -> Result<(), String> {
        if s.vrings.len() != self.vrings.len() {
            return Err(format!(
                "the session has {} vrings, the export {}",
                s.vrings.len(),
                self.vrings.len()
            ));
        }
        self.acked_features = s.features;
        self.acked_protocol = s.protocol;
        let regions = std::mem::take(&mut s.regions);
        let descs: Vec<RegionDesc> = regions
            .iter()
            .map(|(r, _)| RegionDesc {
                gpa: r.gpa,
                size: r.size,
                uaddr: r.uaddr,
                offset: r.offset,
            })
            .collect();
        let infos: Vec<RegionInfo> = descs
            .iter()
            .map(|d| RegionInfo {
                gpa: d.gpa,
                size: d.size,
                uaddr: d.uaddr,
            })
            .collect();
        Self::check_uaddrs(&infos)?;
        mem::check_table_size(descs.iter().map(|d| d.size))?;
        let flag = Arc::new(AtomicBool::new(false));
        let mut parts = Vec::with_capacity(descs.len());
        for (d, (_, f)) in descs.iter().zip(regions) {
            parts.push(mem::map_region(d, File::from(f), &flag)?);
        }
        let m = Memory::new(parts, flag)?;
        // The inflight region: the same file range, so tracking goes on where the old
        // process left it (the rings drained, so recovery finds nothing in flight).
        let inflight = match s.inflight.take() {
            Some(i) => Some(
                crate::inflight::Region::open(
                    i.num_queues,
                    i.queue_size,
                    i.mmap_size,
                    i.mmap_offset,
                    File::from(i.fd),
                )
                .map_err(|e| format!("the session's {e}"))?,
            ),
            None => None,
        };
        self.install_memory(m, infos);
        self.inflight = inflight;
        for (v, st) in self.vrings.iter_mut().zip(s.vrings.iter_mut()) {
            v.size = st.size;
            v.addrs = st.addrs;
            v.base = st.base;
            v.enabled = st.enabled;
            v.kick = st.kick.take().map(File::from);
            v.call = st.call.take().map(File::from);
        }
        Ok(())
    }

    pub(crate) fn start_adopted(&mut self, running: &[bool]) {
        self.thaw(running);
    }
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn header(req: u32, size: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&req.to_le_bytes());
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;

/// A request handler for a handed-over connection, in the state the negotiation left.
///
/// The `vhost` crate's handler keeps the negotiated features (which decide whether it
/// answers REPLY_ACK and which requests it admits) in private fields with no setter. So
/// it is built on one end of a socket pair and primed by replaying the negotiation on
/// the other end: GET_FEATURES, SET_FEATURES and SET_PROTOCOL_FEATURES with the values
/// the front-end acked. Then `dup2` puts the front-end's connection on the handler's
/// descriptor number: it reads its next message from the front-end, which never knew.
/// The handler keeps no bytes between messages, and the old process stopped reading
/// at a message boundary, so the stream continues exactly where it left off.
pub(crate) fn prime_handler(
    conn: OwnedFd,
    backend: Arc<Mutex<BlkBackend>>,
    features: u64,
    protocol: u64,
) -> std::io::Result<BackendReqHandler<Mutex<BlkBackend>>> {
    let (a, mut b) = UnixStream::pair()?;
    let a_fd = a.as_raw_fd();
    let mut h = BackendReqHandler::from_stream(a, backend);
    let vu = |e: vhost::vhost_user::Error| std::io::Error::other(format!("priming: {e}"));
    b.write_all(&header(GET_FEATURES, 0))?;
    h.handle_request().map_err(vu)?;
    let mut reply = [0u8; 20];
    b.read_exact(&mut reply)?;
    for (req, v) in [(SET_FEATURES, features), (SET_PROTOCOL_FEATURES, protocol)] {
        b.write_all(&header(req, 8))?;
        b.write_all(&v.to_le_bytes())?;
        h.handle_request().map_err(vu)?;
    }
    // SAFETY: dup3 onto a descriptor the handler owns; it atomically replaces the socket
    // pair's end with the front-end's connection (our `conn` copy is closed below), and
    // keeps it close-on-exec.
    if unsafe { libc::dup3(conn.as_raw_fd(), a_fd, libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(conn);
    Ok(h)
}
