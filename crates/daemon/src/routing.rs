//! The router's control plane: a disk's classifier (load, swap, clear, maps) and its
//! external function (socket, failure policy). The data path is `nvmux_router`.
//!
//! A classifier object is copied into `<data_dir>/classifiers/<disk>.o` when it loads, so
//! the disk does not depend on the operator's file afterwards. Map values the operator
//! sets are kept in `state.json` and set again after every load. A disk whose classifier
//! does not load at start is not served (fail closed: it may be a guard).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvmux_core::{Error, ErrorKind, Result};
use nvmux_router::{External, ExternalConfig, OnFailure, Program, Route};
use serde::{Deserialize, Serialize};

use crate::state::write_atomic;
use crate::{err, Daemon, Disk, Inner};

/// A disk's classifier, as persisted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClassifierSpec {
    /// The daemon's copy of the object.
    pub object: PathBuf,
    /// The file it was loaded from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    pub section: String,
    /// Map values set by the operator, set again after each load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<MapSetting>,
}

/// One map value: `value` is hex, `value_size` bytes at most.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapSetting {
    pub map: String,
    pub key: u32,
    pub value: String,
}

/// A disk's external function, as persisted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExternalSpec {
    pub socket: PathBuf,
    /// `USER[:GROUP]` (names or numbers) the socket is given to, so that a function
    /// running as that user may attach (absent: the daemon's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The socket's mode, four octal digits. Absent (a state.json from before modes):
    /// 0600, or 0660 when `owner` names a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `fail` or `chain`.
    pub on_failure: String,
    pub depth: u32,
    pub max_io: u32,
}

/// `POST /v1/disks/{name}/classifier` body.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClassifierLoad {
    /// An ELF object from `clang -O2 -target bpf -c`.
    pub object: PathBuf,
    /// The program's section (default: the object's only program).
    #[serde(default)]
    pub section: Option<String>,
    /// Map values to set before the program takes over.
    #[serde(default)]
    pub maps: Vec<MapWrite>,
}

/// A map value to set: `words` (little-endian u64s) or `hex`.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MapWrite {
    /// In a classifier load; the map route names it in its path.
    #[serde(default)]
    pub map: Option<String>,
    pub key: u32,
    #[serde(default)]
    pub words: Option<Vec<u64>>,
    #[serde(default)]
    pub hex: Option<String>,
}

/// `POST /v1/disks/{name}/external` body.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExternalSet {
    pub socket: PathBuf,
    /// `USER[:GROUP]` (names or numbers) the socket is given to, so that an unprivileged
    /// function may attach.
    #[serde(default)]
    pub owner: Option<String>,
    /// The socket's mode, octal (default 0600, or 0660 when `owner` names a group).
    #[serde(default)]
    pub mode: Option<String>,
    /// `fail` (default) or `chain`.
    #[serde(default)]
    pub on_failure: Option<String>,
    /// Ring entries per disk queue (default 64).
    #[serde(default)]
    pub depth: Option<u32>,
    /// Bytes of data per command (default 1 MiB).
    #[serde(default)]
    pub max_io: Option<u32>,
}

pub const DEFAULT_DEPTH: u32 = 64;
pub const DEFAULT_MAX_IO: u32 = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapValueView {
    pub key: u32,
    pub words: Vec<u64>,
    pub hex: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Entries that are not all zero (at most 256 are shown).
    pub values: Vec<MapValueView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramView {
    /// The daemon's copy of the object.
    pub object: PathBuf,
    /// The file it was loaded from.
    pub source: Option<PathBuf>,
    pub section: String,
    pub instructions: usize,
    pub jit: bool,
    pub maps: Vec<MapView>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoutesView {
    pub chain: u64,
    pub fast: u64,
    pub external: u64,
    pub complete: u64,
    pub hooks: u64,
    pub rewrites: u64,
    pub errors: u64,
    pub fallbacks: u64,
    /// FLUSHes a program completed (or a function acknowledged) before the device had
    /// flushed, sent down the chain because the disk does not allow that.
    pub flushes_forced: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExternalView {
    #[serde(flatten)]
    pub spec: ExternalSpec,
    /// `attached`, `waiting` (listening, no process) or `error: ...`.
    pub status: String,
    pub function: String,
    pub pid: i32,
    pub attaches: u64,
    pub detaches: u64,
}

/// `GET /v1/disks/{name}/classifier`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoutingView {
    pub disk: String,
    pub program: Option<ProgramView>,
    /// Route decisions since the daemon started (commands of a disk with no program are
    /// not counted: they all take the chain).
    pub routes: RoutesView,
    pub external: Option<ExternalView>,
    /// The operator's opt-in: a FLUSH may be acknowledged without the device flushing.
    pub allow_flush_complete: bool,
}

/// `POST /v1/disks/{name}/flush-policy` body.
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FlushPolicy {
    pub allow_flush_complete: bool,
}

fn invalid(msg: impl Into<String>) -> Error {
    err(ErrorKind::InvalidArgument, msg)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn map_bytes(w: &MapWrite) -> Result<Vec<u8>> {
    match (&w.words, &w.hex) {
        (Some(words), None) => Ok(words.iter().flat_map(|x| x.to_le_bytes()).collect()),
        (None, Some(h)) => unhex(h).ok_or_else(|| invalid(format!("map value {h:?} is not hex"))),
        _ => Err(invalid(
            "give a map value as either words (u64 numbers) or hex",
        )),
    }
}

/// An external function socket's owner and mode.
fn external_perms(spec: &ExternalSpec) -> Result<nvmux_core::unixsock::SocketPerms> {
    nvmux_core::unixsock::SocketPerms::parse(spec.owner.as_deref(), spec.mode.as_deref())
}

pub(crate) fn on_failure(s: &str) -> Result<OnFailure> {
    match s {
        "fail" => Ok(OnFailure::Fail),
        "chain" => Ok(OnFailure::Chain),
        o => Err(invalid(format!(
            "on_failure {o:?} is unknown (use fail or chain)"
        ))),
    }
}

/// Read an object file, but not more than the loader accepts (plus one byte, so that it
/// can say the file is too large).
fn read_object(p: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| {
            f.take(nvmux_router::elf::MAX_OBJECT_BYTES as u64 + 1)
                .read_to_end(&mut v)
        })
        .map_err(|e| Error::io(format!("classifier object {}", p.display()), e))?;
    Ok(v)
}

/// Load a classifier spec's object and set its map values.
pub(crate) fn load_program(spec: &ClassifierSpec) -> Result<Arc<Program>> {
    let bytes = read_object(&spec.object)?;
    let p = Program::load(&bytes, Some(&spec.section))?;
    for m in &spec.maps {
        let map = p
            .map(&m.map)
            .ok_or_else(|| invalid(format!("the program has no map {:?}", m.map)))?;
        let v =
            unhex(&m.value).ok_or_else(|| invalid(format!("map {:?}: value is not hex", m.map)))?;
        map.write(m.key, &v)?;
    }
    Ok(Arc::new(p))
}

/// Start serving a disk's external function socket.
pub(crate) fn start_external(
    disk: &str,
    spec: &ExternalSpec,
    block_size: u32,
    num_blocks: u64,
) -> Result<Arc<External>> {
    crate::claim_socket(&spec.socket)?;
    // Owner and mode are set before the socket appears at its path (no link followed).
    let listener = nvmux_core::unixsock::bind(&spec.socket, &external_perms(spec)?)?;
    let cfg = ExternalConfig {
        socket: spec.socket.clone(),
        on_failure: on_failure(&spec.on_failure)?,
        depth: spec.depth,
        max_io: spec.max_io,
    };
    External::start(cfg, listener, disk, block_size, num_blocks).map_err(|e| {
        let _ = std::fs::remove_file(&spec.socket);
        invalid(format!("disk {disk:?}: external function: {e}"))
    })
}

fn disk<'a>(g: &'a Inner, name: &str) -> Result<&'a Disk> {
    g.disks
        .get(name)
        .ok_or_else(|| err(ErrorKind::NotFound, format!("disk {name:?} does not exist")))
}

impl Daemon {
    fn classifier_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("classifiers")
    }

    pub(crate) fn routing_view(d: &Disk) -> RoutingView {
        let t = d.router.totals();
        let program = match (&d.spec.classifier, d.router.program()) {
            (Some(spec), Some(p)) => Some(ProgramView {
                object: spec.object.clone(),
                source: spec.source.clone(),
                section: spec.section.clone(),
                instructions: p.info.instructions,
                jit: p.info.jit,
                maps: p
                    .maps()
                    .iter()
                    .map(|m| MapView {
                        name: m.def.name.clone(),
                        kind: "array".into(),
                        key_size: m.def.key_size,
                        value_size: m.def.value_size,
                        max_entries: m.def.max_entries,
                        values: m
                            .nonzero_keys()
                            .take(256)
                            .filter_map(|k| {
                                let v = m.read(k).ok()?;
                                Some(MapValueView {
                                    key: k,
                                    words: v
                                        .chunks(8)
                                        .map(|c| {
                                            let mut a = [0u8; 8];
                                            a[..c.len()].copy_from_slice(c);
                                            u64::from_le_bytes(a)
                                        })
                                        .collect(),
                                    hex: hex(&v),
                                })
                            })
                            .collect(),
                    })
                    .collect(),
            }),
            _ => None,
        };
        let external = d.spec.external.as_ref().map(|spec| {
            let st = d.router.external().map(|e| e.status());
            ExternalView {
                spec: spec.clone(),
                status: match &st {
                    Some(s) if s.attached => "attached".into(),
                    Some(_) => "waiting".into(),
                    None => "error: not listening (see the daemon log)".into(),
                },
                function: st.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                pid: st.as_ref().map_or(0, |s| s.pid),
                attaches: st.as_ref().map_or(0, |s| s.attaches),
                detaches: st.as_ref().map_or(0, |s| s.detaches),
            }
        });
        RoutingView {
            disk: d.spec.name.clone(),
            program,
            routes: RoutesView {
                chain: t.routed[Route::Chain as usize],
                fast: t.routed[Route::Fast as usize],
                external: t.routed[Route::External as usize],
                complete: t.routed[Route::Complete as usize],
                hooks: t.hooks,
                rewrites: t.rewrites,
                errors: t.errors,
                fallbacks: t.fallbacks,
                flushes_forced: t.flushes_forced,
            },
            external,
            allow_flush_complete: d.spec.allow_flush_complete,
        }
    }

    pub fn classifier(&self, name: &str) -> Result<RoutingView> {
        let g = self.lock();
        Ok(Self::routing_view(disk(&g, name)?))
    }

    /// Load a classifier into a disk, replacing its program on the fly. Nothing changes
    /// if the object does not load or verify.
    pub fn set_classifier(&self, name: &str, req: ClassifierLoad) -> Result<RoutingView> {
        let mut g = self.lock();
        disk(&g, name)?;
        let bytes = read_object(&req.object)?;
        let named = |e: Error| {
            err(
                e.kind,
                format!(
                    "disk {name:?}: classifier {} refused: {}",
                    req.object.display(),
                    e.msg
                ),
            )
        };
        let prog = Program::load(&bytes, req.section.as_deref()).map_err(named)?;
        let mut maps = Vec::new();
        for w in &req.maps {
            let Some(m) = &w.map else {
                return Err(invalid("each map value needs the map's name"));
            };
            let v = map_bytes(w)?;
            prog.map(m)
                .ok_or_else(|| invalid(format!("the program has no map {m:?}")))?
                .write(w.key, &v)
                .map_err(named)?;
            maps.retain(|s: &MapSetting| !(s.map == *m && s.key == w.key));
            maps.push(MapSetting {
                map: m.clone(),
                key: w.key,
                value: hex(&v),
            });
        }
        let dir = self.classifier_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let object = dir.join(format!("{name}.o"));
        let spec = ClassifierSpec {
            object: object.clone(),
            source: Some(req.object.clone()),
            section: prog.info.section.clone(),
            maps,
        };
        // Keep the old object until the new state is saved.
        let old_bytes = std::fs::read(&object).ok();
        write_atomic(&object, &bytes, 0o644)?;
        let Some(d) = g.disks.get_mut(name) else {
            return Err(err(ErrorKind::NotFound, format!("disk {name:?} vanished")));
        };
        let old = d.spec.classifier.replace(spec);
        if let Err(e) = self.persist(&g) {
            match old_bytes {
                Some(b) => {
                    let _ = write_atomic(&object, &b, 0o644);
                }
                None => {
                    let _ = std::fs::remove_file(&object);
                }
            }
            if let Some(d) = g.disks.get_mut(name) {
                d.spec.classifier = old;
            }
            return Err(e);
        }
        let d = &g.disks[name];
        tracing::info!(disk = name, object = %req.object.display(), section = %prog.info.section, instructions = prog.info.instructions, jit = prog.info.jit, "classifier loaded");
        d.router.set_program(Some(Arc::new(prog)));
        Ok(Self::routing_view(d))
    }

    /// Allow or forbid a disk's classifier (and external function) to complete a FLUSH
    /// the device has not flushed. Persisted; takes effect at the next command.
    pub fn set_flush_policy(&self, name: &str, p: FlushPolicy) -> Result<RoutingView> {
        let mut g = self.lock();
        let d = g
            .disks
            .get_mut(name)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("disk {name:?} does not exist")))?;
        let old = std::mem::replace(&mut d.spec.allow_flush_complete, p.allow_flush_complete);
        if let Err(e) = self.persist(&g) {
            if let Some(d) = g.disks.get_mut(name) {
                d.spec.allow_flush_complete = old;
            }
            return Err(e);
        }
        let d = &g.disks[name];
        d.router.set_allow_flush_complete(p.allow_flush_complete);
        if p.allow_flush_complete {
            tracing::warn!(disk = name, "a classifier may now complete FLUSH without the device: acknowledged flushes are no longer durable on this disk");
        } else {
            tracing::info!(disk = name, "FLUSH always reaches the device again");
        }
        Ok(Self::routing_view(d))
    }

    /// Remove a disk's classifier: every command takes the chain again.
    pub fn clear_classifier(&self, name: &str) -> Result<RoutingView> {
        let mut g = self.lock();
        let d = g
            .disks
            .get_mut(name)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("disk {name:?} does not exist")))?;
        let Some(old) = d.spec.classifier.take() else {
            return Ok(Self::routing_view(d));
        };
        if let Err(e) = self.persist(&g) {
            if let Some(d) = g.disks.get_mut(name) {
                d.spec.classifier = Some(old);
            }
            return Err(e);
        }
        let _ = std::fs::remove_file(&old.object);
        let d = &g.disks[name];
        d.router.set_program(None);
        tracing::info!(disk = name, "classifier removed");
        Ok(Self::routing_view(d))
    }

    /// Set one value of a map of a disk's classifier, live; kept for the next start.
    pub fn set_map(&self, name: &str, map: &str, w: MapWrite) -> Result<RoutingView> {
        let mut g = self.lock();
        let d = disk(&g, name)?;
        let (Some(_), Some(p)) = (&d.spec.classifier, d.router.program()) else {
            return Err(invalid(format!("disk {name:?} has no classifier")));
        };
        let m = p
            .map(map)
            .ok_or_else(|| {
                err(
                    ErrorKind::NotFound,
                    format!("disk {name:?}: the classifier has no map {map:?}"),
                )
            })?
            .clone();
        let v = map_bytes(&w)?;
        let before = m
            .read(w.key)
            .map_err(|e| invalid(format!("disk {name:?}: {}", e.msg)))?;
        m.write(w.key, &v)
            .map_err(|e| invalid(format!("disk {name:?}: {}", e.msg)))?;
        let Some(spec) = g
            .disks
            .get_mut(name)
            .and_then(|d| d.spec.classifier.as_mut())
        else {
            return Err(invalid(format!("disk {name:?} has no classifier")));
        };
        let saved = spec.maps.clone();
        spec.maps.retain(|s| !(s.map == map && s.key == w.key));
        spec.maps.push(MapSetting {
            map: map.to_string(),
            key: w.key,
            value: hex(&v),
        });
        if let Err(e) = self.persist(&g) {
            let _ = m.write(w.key, &before);
            if let Some(spec) = g
                .disks
                .get_mut(name)
                .and_then(|d| d.spec.classifier.as_mut())
            {
                spec.maps = saved;
            }
            return Err(e);
        }
        tracing::info!(disk = name, map, key = w.key, value = %hex(&v), "classifier map value set");
        Ok(Self::routing_view(&g.disks[name]))
    }

    /// Give a disk an external function socket (`None`: remove it). Commands the
    /// classifier sends to the function while none is attached fail or take the chain,
    /// as `on_failure` says.
    pub fn set_external(&self, name: &str, req: Option<ExternalSet>) -> Result<RoutingView> {
        let mut g = self.lock();
        let d = disk(&g, name)?;
        let (bs, blocks) = match &d.dev {
            Ok(dev) => (
                dev.info().block_size,
                dev.capacity_bytes() / dev.info().block_size as u64,
            ),
            Err(e) => {
                return Err(err(
                    ErrorKind::Io,
                    format!("disk {name:?} is unavailable: {e}"),
                ))
            }
        };
        let spec = match &req {
            Some(r) => {
                let perms = nvmux_core::unixsock::SocketPerms::parse(
                    r.owner.as_deref(),
                    r.mode.as_deref(),
                )?;
                let spec = ExternalSpec {
                    socket: r.socket.clone(),
                    owner: r.owner.clone(),
                    mode: Some(nvmux_core::unixsock::format_mode(perms.mode)),
                    on_failure: r.on_failure.clone().unwrap_or_else(|| "fail".into()),
                    depth: r.depth.unwrap_or(DEFAULT_DEPTH),
                    max_io: r.max_io.unwrap_or(DEFAULT_MAX_IO),
                };
                on_failure(&spec.on_failure)?;
                let same = d
                    .spec
                    .external
                    .as_ref()
                    .is_some_and(|o| o.socket == spec.socket);
                if !same {
                    crate::check_export_socket(&spec.socket, &self.cfg.api_socket())?;
                    self.socket_in_use(&g, &spec.socket)?;
                }
                Some(spec)
            }
            None => None,
        };
        // Stop the old endpoint first (it may own the same socket path).
        if let Some(old) = d.router.set_external(None) {
            old.stop();
        }
        let started = match &spec {
            Some(s) => match start_external(name, s, bs, blocks) {
                Ok(e) => Some(e),
                Err(e) => {
                    // Put the old one back if there was one.
                    if let Some(o) = &d.spec.external {
                        if let Ok(e) = start_external(name, o, bs, blocks) {
                            d.router.set_external(Some(e));
                        }
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        d.router.set_external(started);
        let Some(d) = g.disks.get_mut(name) else {
            return Err(err(ErrorKind::NotFound, format!("disk {name:?} vanished")));
        };
        let old = std::mem::replace(&mut d.spec.external, spec);
        if let Err(e) = self.persist(&g) {
            if let Some(d) = g.disks.get_mut(name) {
                d.spec.external = old;
            }
            return Err(e);
        }
        let d = &g.disks[name];
        match &d.spec.external {
            Some(s) => {
                tracing::info!(disk = name, socket = %s.socket.display(), on_failure = %s.on_failure, "external function socket set")
            }
            None => tracing::info!(disk = name, "external function removed"),
        }
        Ok(Self::routing_view(d))
    }

    /// Refuse a socket path that an export or another disk's function already uses.
    fn socket_in_use(&self, g: &Inner, path: &Path) -> Result<()> {
        for e in g.exports.values() {
            if e.spec.kind.socket().map(|p| p.as_path()) == Some(path) {
                return Err(err(
                    ErrorKind::AlreadyExists,
                    format!("socket {} is export {:?}", path.display(), e.spec.name),
                ));
            }
        }
        for d in g.disks.values() {
            if d.spec.external.as_ref().is_some_and(|x| x.socket == path) {
                return Err(err(
                    ErrorKind::AlreadyExists,
                    format!(
                        "socket {} is the external function socket of disk {:?}",
                        path.display(),
                        d.spec.name
                    ),
                ));
            }
        }
        Ok(())
    }
}
