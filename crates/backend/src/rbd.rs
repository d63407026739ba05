//! Ceph RBD images through librbd.
//!
//! librbd and librados are loaded at run time (`dlopen` of `librbd.so.1` and
//! `librados.so.2`), so nvmux builds and runs on hosts without Ceph; opening an rbd disk
//! there fails with [`ErrorKind::Unsupported`] ("librbd not found (install librbd1)").
//! Only the functions used are declared, in [`Lib`].
//!
//! * [`RbdCluster`]: one rados connection (`rados_create2` + `rados_connect`, bounded by
//!   `client_mount_timeout` = 10 s; `rados_osd_op_timeout` / `rados_mon_op_timeout` from
//!   [`RbdConfig::op_timeout`]). It caches one ioctx per (pool, namespace) and runs the
//!   admin operations (create, resize, snapshot + protect, clone, remove, info). librbd's
//!   `-errno` maps to error kinds: ENOENT → `NotFound`, EEXIST → `AlreadyExists`, EBUSY and
//!   ENOTEMPTY → `Busy`, EINVAL → `InvalidArgument`, anything else → `Io`. The connection
//!   is shut down when the last handle to it goes (every open image holds one).
//! * [`RbdDevice`]: one `rbd_image_t` per device (several opens of one image in one
//!   process would bounce the exclusive lock between them), shared by all its queues.
//!   A snapshot (`@snap`) is opened read-only.
//!
//! **I/O mapping.** Read → `rbd_aio_readv`, Write → `rbd_aio_writev` (the command's own
//! iovec array, which stays in its slot until completion), Flush → `rbd_aio_flush`,
//! FUA write → write, then flush, then complete; Deallocate and Write Zeroes →
//! `rbd_aio_write_zeroes` (it discards whole objects and zeroes the rest; `rbd_aio_discard`
//! silently skips pieces smaller than `rbd_discard_granularity_bytes`, so a deallocated
//! range would not read back as zeros). A negative return value maps to a status:
//! ETIMEDOUT, EAGAIN, ESHUTDOWN (= Ceph's EBLOCKLISTED), ENOTCONN, ECONNRESET, ECANCELED
//! → [`RETRYABLE`] (a path error without DNR: the host retries); EROFS → write protected;
//! EINVAL → invalid field; others as [`Status::from_errno`]. A read shorter than asked is
//! an unrecovered read error.
//!
//! **Threading rule: no Rust code runs on librbd's threads.** Completions are created
//! with a NULL callback; librbd queues them on the image and signals the image's eventfd
//! (`rbd_set_image_notification`, `EVENT_TYPE_EVENTFD`), and the worker threads collect
//! them with `rbd_poll_io_events`. Because the image (and its eventfd) is shared by the
//! device's queues, whichever queue takes the image's reap lock first collects every
//! completion; each completion's argument is (queue id << 32 | slot), and completions of
//! other queues go to that queue's inbox (reserved for its depth: no allocation) and
//! wake its eventfd. A queue's `completion_fd` is an epoll descriptor over its own
//! eventfd and the image's, so a worker that sleeps on it wakes for either.
//!
//! librbd itself allocates (in C++) per request; the Rust side allocates nothing per I/O
//! once a queue is open.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nvmux_core::eventfd::EventFd;
use nvmux_core::{
    BlockDevice, BlockQueue, DeviceInfo, Error, ErrorKind, IoCommand, Opcode, Result, Status,
};

/// Largest transfer of one command (bytes).
pub const RBD_MAX_TRANSFER: u32 = 4 << 20;

/// The status of a command that failed for a reason that may pass (a timeout, a lost
/// connection, a blocklisted client): the NVMe path-related status nvmux's NVMe/TCP host
/// uses for a lost path (SCT 3), without DNR, so hosts retry it.
pub const RETRYABLE: Status = Status::new(3, 0x71);

/// How long a queue being dropped waits for librbd to hand back its commands.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// Most segments one command may have (librbd refuses more than IOV_MAX).
const MAX_SEGMENTS: usize = 1024;

/// The Ceph default features: layering, exclusive-lock, object-map, fast-diff,
/// deep-flatten.
const DEFAULT_FEATURES: u64 = 1 | 4 | 8 | 16 | 32;
const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
const EVENT_TYPE_EVENTFD: c_int = 2;

// ---------------------------------------------------------------------------------------
// FFI

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type OptsT = *mut c_void;
type CompT = *mut c_void;
type RbdCallback = Option<unsafe extern "C" fn(CompT, *mut c_void)>;

#[repr(C)]
struct RbdImageInfoT {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

#[repr(C)]
struct RbdLinkedImageSpecT {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

#[repr(C)]
struct RbdSnapSpecT {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

#[repr(C)]
struct RbdSnapInfoT {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// The librados and librbd functions nvmux uses, resolved once.
struct Lib {
    rados_create2: unsafe extern "C" fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int,
    rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    rados_shutdown: unsafe extern "C" fn(RadosT),
    rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),
    rados_ioctx_set_namespace: unsafe extern "C" fn(IoctxT, *const c_char),
    rbd_version: unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int),
    rbd_image_options_create: unsafe extern "C" fn(*mut OptsT),
    rbd_image_options_destroy: unsafe extern "C" fn(OptsT),
    rbd_image_options_set_uint64: unsafe extern "C" fn(OptsT, c_int, u64) -> c_int,
    rbd_create4: unsafe extern "C" fn(IoctxT, *const c_char, u64, OptsT) -> c_int,
    rbd_clone3: unsafe extern "C" fn(
        IoctxT,
        *const c_char,
        *const c_char,
        IoctxT,
        *const c_char,
        OptsT,
    ) -> c_int,
    rbd_remove: unsafe extern "C" fn(IoctxT, *const c_char) -> c_int,
    rbd_open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_open_read_only:
        unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    rbd_resize: unsafe extern "C" fn(ImageT, u64) -> c_int,
    rbd_stat: unsafe extern "C" fn(ImageT, *mut RbdImageInfoT, usize) -> c_int,
    rbd_get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_get_features: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    rbd_get_parent:
        unsafe extern "C" fn(ImageT, *mut RbdLinkedImageSpecT, *mut RbdSnapSpecT) -> c_int,
    rbd_linked_image_spec_cleanup: unsafe extern "C" fn(*mut RbdLinkedImageSpecT),
    rbd_snap_spec_cleanup: unsafe extern "C" fn(*mut RbdSnapSpecT),
    rbd_snap_list: unsafe extern "C" fn(ImageT, *mut RbdSnapInfoT, *mut c_int) -> c_int,
    rbd_snap_list_end: unsafe extern "C" fn(*mut RbdSnapInfoT),
    rbd_snap_create: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_snap_protect: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_snap_unprotect: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_snap_remove: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    rbd_aio_create_completion: unsafe extern "C" fn(*mut c_void, RbdCallback, *mut CompT) -> c_int,
    rbd_aio_readv: unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompT) -> c_int,
    rbd_aio_writev: unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompT) -> c_int,
    rbd_aio_write_zeroes: unsafe extern "C" fn(ImageT, u64, usize, CompT, c_int, c_int) -> c_int,
    rbd_aio_flush: unsafe extern "C" fn(ImageT, CompT) -> c_int,
    rbd_aio_get_return_value: unsafe extern "C" fn(CompT) -> isize,
    rbd_aio_get_arg: unsafe extern "C" fn(CompT) -> *mut c_void,
    rbd_aio_release: unsafe extern "C" fn(CompT),
    rbd_set_image_notification: unsafe extern "C" fn(ImageT, c_int, c_int) -> c_int,
    rbd_poll_io_events: unsafe extern "C" fn(ImageT, *mut CompT, c_int) -> c_int,
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, read at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-NULL, NUL-terminated (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn dlopen(name: &CStr) -> std::result::Result<*mut c_void, String> {
    // SAFETY: a valid NUL-terminated name; the handle is checked and never closed.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        Err(dlerror())
    } else {
        Ok(h)
    }
}

/// Resolve `name` in `h` as a function pointer of type `T`.
///
/// # Safety
/// `T` must be the `unsafe extern "C" fn` type matching the C declaration of `name`.
unsafe fn sym<T: Copy>(h: *mut c_void, name: &CStr) -> std::result::Result<T, String> {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: a valid handle from dlopen and a NUL-terminated name.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "symbol {} missing: {}",
            name.to_string_lossy(),
            dlerror()
        ));
    }
    // SAFETY: T is a function pointer type of pointer size (asserted) matching the symbol
    // (the caller's contract).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl Lib {
    fn load() -> std::result::Result<Lib, String> {
        let rados = dlopen(c"librados.so.2")?;
        let rbd = dlopen(c"librbd.so.1")?;
        macro_rules! s {
            ($h:expr, $n:ident) => {
                // SAFETY: the field's type is the C declaration of the symbol of its name
                // (from rados/librados.h and rbd/librbd.h, Ceph 16).
                unsafe {
                    sym(
                        $h,
                        &CString::new(stringify!($n)).map_err(|e| e.to_string())?,
                    )?
                }
            };
        }
        Ok(Lib {
            rados_create2: s!(rados, rados_create2),
            rados_conf_read_file: s!(rados, rados_conf_read_file),
            rados_conf_set: s!(rados, rados_conf_set),
            rados_connect: s!(rados, rados_connect),
            rados_shutdown: s!(rados, rados_shutdown),
            rados_ioctx_create: s!(rados, rados_ioctx_create),
            rados_ioctx_destroy: s!(rados, rados_ioctx_destroy),
            rados_ioctx_set_namespace: s!(rados, rados_ioctx_set_namespace),
            rbd_version: s!(rbd, rbd_version),
            rbd_image_options_create: s!(rbd, rbd_image_options_create),
            rbd_image_options_destroy: s!(rbd, rbd_image_options_destroy),
            rbd_image_options_set_uint64: s!(rbd, rbd_image_options_set_uint64),
            rbd_create4: s!(rbd, rbd_create4),
            rbd_clone3: s!(rbd, rbd_clone3),
            rbd_remove: s!(rbd, rbd_remove),
            rbd_open: s!(rbd, rbd_open),
            rbd_open_read_only: s!(rbd, rbd_open_read_only),
            rbd_close: s!(rbd, rbd_close),
            rbd_resize: s!(rbd, rbd_resize),
            rbd_stat: s!(rbd, rbd_stat),
            rbd_get_size: s!(rbd, rbd_get_size),
            rbd_get_features: s!(rbd, rbd_get_features),
            rbd_get_parent: s!(rbd, rbd_get_parent),
            rbd_linked_image_spec_cleanup: s!(rbd, rbd_linked_image_spec_cleanup),
            rbd_snap_spec_cleanup: s!(rbd, rbd_snap_spec_cleanup),
            rbd_snap_list: s!(rbd, rbd_snap_list),
            rbd_snap_list_end: s!(rbd, rbd_snap_list_end),
            rbd_snap_create: s!(rbd, rbd_snap_create),
            rbd_snap_protect: s!(rbd, rbd_snap_protect),
            rbd_snap_unprotect: s!(rbd, rbd_snap_unprotect),
            rbd_snap_remove: s!(rbd, rbd_snap_remove),
            rbd_aio_create_completion: s!(rbd, rbd_aio_create_completion),
            rbd_aio_readv: s!(rbd, rbd_aio_readv),
            rbd_aio_writev: s!(rbd, rbd_aio_writev),
            rbd_aio_write_zeroes: s!(rbd, rbd_aio_write_zeroes),
            rbd_aio_flush: s!(rbd, rbd_aio_flush),
            rbd_aio_get_return_value: s!(rbd, rbd_aio_get_return_value),
            rbd_aio_get_arg: s!(rbd, rbd_aio_get_arg),
            rbd_aio_release: s!(rbd, rbd_aio_release),
            rbd_set_image_notification: s!(rbd, rbd_set_image_notification),
            rbd_poll_io_events: s!(rbd, rbd_poll_io_events),
        })
    }
}

/// librbd and librados, loaded on first use.
fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    match LIB.get_or_init(Lib::load) {
        Ok(l) => Ok(l),
        Err(e) => Err(Error::new(
            ErrorKind::Unsupported,
            format!("librbd not found (install librbd1): {e}"),
        )),
    }
}

/// librbd's version, e.g. "1.16.0", if the library loads.
pub fn librbd_version() -> Result<String> {
    let l = lib()?;
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: three valid out pointers.
    unsafe { (l.rbd_version)(&mut a, &mut b, &mut c) };
    Ok(format!("{a}.{b}.{c}"))
}

/// An error from a librbd/librados call that returned `r` (a negative errno).
fn rbd_error(r: i64, what: impl fmt::Display) -> Error {
    let errno = r.unsigned_abs().min(i32::MAX as u64) as i32;
    let kind = match errno {
        libc::ENOENT => ErrorKind::NotFound,
        libc::EEXIST => ErrorKind::AlreadyExists,
        libc::EBUSY | libc::ENOTEMPTY => ErrorKind::Busy,
        libc::EINVAL => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    let e = std::io::Error::from_raw_os_error(errno);
    Error {
        kind,
        msg: format!("{what}: {e}"),
        source: Some(e),
    }
}

fn check(r: c_int, what: impl fmt::Display) -> Result<()> {
    if r < 0 {
        Err(rbd_error(r as i64, what))
    } else {
        Ok(())
    }
}

fn cstr(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: the caller's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

// ---------------------------------------------------------------------------------------
// Configuration and names

/// How to reach the cluster.
#[derive(Clone, Debug)]
pub struct RbdConfig {
    /// ceph.conf; `None`: librados' defaults ($CEPH_CONF, /etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    /// The client id: `admin` connects as `client.admin`.
    pub client_id: String,
    pub keyring: Option<PathBuf>,
    pub mon_host: Option<String>,
    /// `rados_osd_op_timeout` and `rados_mon_op_timeout`; zero: librados' default
    /// (wait forever).
    pub op_timeout: Duration,
}

impl Default for RbdConfig {
    fn default() -> Self {
        RbdConfig {
            conf: None,
            client_id: "admin".into(),
            keyring: None,
            mon_host: None,
            op_timeout: Duration::from_secs(60),
        }
    }
}

/// An image: `pool[/namespace]/image`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub pool: String,
    /// "" for the default namespace.
    pub namespace: String,
    pub image: String,
}

impl ImageRef {
    /// Parse `pool[/namespace]/image[@snap]`.
    pub fn parse(s: &str) -> Result<(ImageRef, Option<String>)> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("rbd image {s:?}: {why} (expected POOL[/NAMESPACE]/IMAGE[@SNAP])"),
            )
        };
        if s.contains('\0') {
            return Err(bad("NUL byte"));
        }
        let (path, snap) = match s.split_once('@') {
            Some((p, sn)) => {
                if sn.is_empty() || sn.contains(['@', '/']) {
                    return Err(bad("bad snapshot name"));
                }
                (p, Some(sn.to_string()))
            }
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (pool, namespace, image) = match parts.as_slice() {
            [p, i] => (*p, "", *i),
            [p, n, i] => (*p, *n, *i),
            _ => return Err(bad("wrong number of components")),
        };
        if pool.is_empty() || image.is_empty() || (parts.len() == 3 && namespace.is_empty()) {
            return Err(bad("empty component"));
        }
        Ok((
            ImageRef {
                pool: pool.into(),
                namespace: namespace.into(),
                image: image.into(),
            },
            snap,
        ))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.pool, self.image)
        } else {
            write!(f, "{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }
}

/// What `RbdCluster::image_info` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub size: u64,
    pub object_size: u64,
    pub features: u64,
    /// The clone's parent: `pool[/ns]/image@snap`.
    pub parent: Option<String>,
    pub snapshots: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// The cluster connection

struct Ioctx(IoctxT);
// SAFETY: a librados ioctx may be used from any thread; its namespace is set once, before
// it is shared.
unsafe impl Send for Ioctx {}

/// One rados connection. Send + Sync.
pub struct RbdCluster {
    lib: &'static Lib,
    rados: RadosT,
    ioctxs: Mutex<std::collections::HashMap<(String, String), Ioctx>>,
    client: String,
}

// SAFETY: a connected rados_t is thread-safe (librados serialises internally); the ioctx
// cache is behind a Mutex.
unsafe impl Send for RbdCluster {}
// SAFETY: as above.
unsafe impl Sync for RbdCluster {}

impl fmt::Debug for RbdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RbdCluster({})", self.client)
    }
}

/// A closed-on-drop image handle for admin operations.
struct AdminImage<'a> {
    lib: &'a Lib,
    h: ImageT,
}

impl Drop for AdminImage<'_> {
    fn drop(&mut self) {
        // SAFETY: an open handle, closed once.
        let r = unsafe { (self.lib.rbd_close)(self.h) };
        if r < 0 {
            tracing::warn!("rbd_close: {}", std::io::Error::from_raw_os_error(-r));
        }
    }
}

/// Image options (format 2, the default features), destroyed on drop.
struct Opts<'a> {
    lib: &'a Lib,
    o: OptsT,
}

impl<'a> Opts<'a> {
    fn new(lib: &'a Lib) -> Result<Opts<'a>> {
        let mut o: OptsT = std::ptr::null_mut();
        // SAFETY: a valid out pointer.
        unsafe { (lib.rbd_image_options_create)(&mut o) };
        let opts = Opts { lib, o };
        // SAFETY: a valid options handle.
        check(
            unsafe { (lib.rbd_image_options_set_uint64)(o, RBD_IMAGE_OPTION_FORMAT, 2) },
            "rbd image options: format",
        )?;
        // SAFETY: as above.
        check(
            unsafe {
                (lib.rbd_image_options_set_uint64)(o, RBD_IMAGE_OPTION_FEATURES, DEFAULT_FEATURES)
            },
            "rbd image options: features",
        )?;
        Ok(opts)
    }
}

impl Drop for Opts<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { (self.lib.rbd_image_options_destroy)(self.o) };
    }
}

impl RbdCluster {
    /// Connect (bounded by `client_mount_timeout`, 10 s).
    pub fn connect(cfg: &RbdConfig) -> Result<Arc<RbdCluster>> {
        let lib = lib()?;
        let client = format!("client.{}", cfg.client_id);
        let name = cstr(&client, "rbd client id")?;
        let mut rados: RadosT = std::ptr::null_mut();
        // SAFETY: valid out pointer and NUL-terminated strings.
        let r = unsafe { (lib.rados_create2)(&mut rados, c"ceph".as_ptr(), name.as_ptr(), 0) };
        check(r, format_args!("rados_create2 ({client})"))?;
        // From here on, dropping `c` shuts the handle down.
        let c = RbdCluster {
            lib,
            rados,
            ioctxs: Mutex::new(Default::default()),
            client: client.clone(),
        };
        match &cfg.conf {
            Some(p) => {
                let path = cstr(&p.to_string_lossy(), "ceph conf path")?;
                // SAFETY: a created handle and a NUL-terminated path.
                let r = unsafe { (lib.rados_conf_read_file)(rados, path.as_ptr()) };
                check(r, format_args!("reading ceph config {}", p.display()))?;
            }
            None => {
                // SAFETY: NULL reads librados' default search ($CEPH_CONF, /etc/ceph).
                let r = unsafe { (lib.rados_conf_read_file)(rados, std::ptr::null()) };
                if r < 0 && cfg.mon_host.is_none() {
                    return Err(rbd_error(
                        r as i64,
                        "no ceph config found ($CEPH_CONF, /etc/ceph/ceph.conf) and no mon_host given",
                    ));
                }
            }
        }
        let set = |k: &CStr, v: &str| -> Result<()> {
            let val = cstr(v, "ceph option value")?;
            // SAFETY: a created handle and NUL-terminated strings.
            let r = unsafe { (lib.rados_conf_set)(rados, k.as_ptr(), val.as_ptr()) };
            check(r, format_args!("ceph option {}={v}", k.to_string_lossy()))
        };
        if let Some(k) = &cfg.keyring {
            set(c"keyring", &k.to_string_lossy())?;
        }
        if let Some(m) = &cfg.mon_host {
            set(c"mon_host", m)?;
        }
        set(c"client_mount_timeout", "10")?;
        if !cfg.op_timeout.is_zero() {
            let secs = cfg.op_timeout.as_secs_f64().ceil().max(1.0) as u64;
            set(c"rados_osd_op_timeout", &secs.to_string())?;
            set(c"rados_mon_op_timeout", &secs.to_string())?;
        }
        // SAFETY: a configured handle.
        let r = unsafe { (lib.rados_connect)(rados) };
        check(
            r,
            format_args!("connecting to the ceph cluster as {client}"),
        )?;
        Ok(Arc::new(c))
    }

    /// The ioctx of (pool, namespace), created on first use.
    fn ioctx(&self, img: &ImageRef) -> Result<IoctxT> {
        let key = (img.pool.clone(), img.namespace.clone());
        let mut m = self.ioctxs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(io) = m.get(&key) {
            return Ok(io.0);
        }
        let pool = cstr(&img.pool, "pool name")?;
        let ns = cstr(&img.namespace, "namespace")?;
        let mut io: IoctxT = std::ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated name, a valid out pointer.
        let r = unsafe { (self.lib.rados_ioctx_create)(self.rados, pool.as_ptr(), &mut io) };
        check(r, format_args!("rbd pool {}", img.pool))?;
        // SAFETY: a fresh ioctx nobody else uses yet; "" is the default namespace.
        unsafe { (self.lib.rados_ioctx_set_namespace)(io, ns.as_ptr()) };
        m.insert(key, Ioctx(io));
        Ok(io)
    }

    fn open_admin(&self, img: &ImageRef, read_only: bool) -> Result<AdminImage<'_>> {
        let io = self.ioctx(img)?;
        let name = cstr(&img.image, "image name")?;
        let mut h: ImageT = std::ptr::null_mut();
        let f = if read_only {
            self.lib.rbd_open_read_only
        } else {
            self.lib.rbd_open
        };
        // SAFETY: a valid ioctx, NUL-terminated name, valid out pointer, no snapshot.
        let r = unsafe { f(io, name.as_ptr(), &mut h, std::ptr::null()) };
        check(r, format_args!("rbd image {img}"))?;
        Ok(AdminImage { lib: self.lib, h })
    }

    /// Size, features, parent and snapshots of an image; `None` if there is no such
    /// image.
    pub fn image_info(&self, img: &ImageRef) -> Result<Option<ImageInfo>> {
        let im = match self.open_admin(img, true) {
            Ok(i) => i,
            Err(e) if e.kind == ErrorKind::NotFound && self.ioctx(img).is_ok() => return Ok(None),
            Err(e) => return Err(e),
        };
        let l = self.lib;
        // SAFETY: plain data; rbd_stat fills it.
        let mut st: RbdImageInfoT = unsafe { std::mem::zeroed() };
        // SAFETY: an open image and an out struct of the size passed.
        let r = unsafe { (l.rbd_stat)(im.h, &mut st, std::mem::size_of::<RbdImageInfoT>()) };
        check(r, format_args!("rbd stat {img}"))?;
        let mut features = 0u64;
        // SAFETY: an open image, a valid out pointer.
        check(
            unsafe { (l.rbd_get_features)(im.h, &mut features) },
            format_args!("rbd features of {img}"),
        )?;
        // SAFETY: plain data (NULL pointers) that rbd_get_parent fills.
        let mut ps: RbdLinkedImageSpecT = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut ss: RbdSnapSpecT = unsafe { std::mem::zeroed() };
        // SAFETY: an open image and valid out structs.
        let r = unsafe { (l.rbd_get_parent)(im.h, &mut ps, &mut ss) };
        let parent = if r == -libc::ENOENT {
            None
        } else {
            check(r, format_args!("rbd parent of {img}"))?;
            // SAFETY: filled by librbd with NUL-terminated strings (or NULL).
            let (pool, ns, name, snap) = unsafe {
                (
                    owned(ps.pool_name),
                    owned(ps.pool_namespace),
                    owned(ps.image_name),
                    owned(ss.name),
                )
            };
            // SAFETY: filled by rbd_get_parent, cleaned once.
            unsafe {
                (l.rbd_linked_image_spec_cleanup)(&mut ps);
                (l.rbd_snap_spec_cleanup)(&mut ss);
            }
            let r = ImageRef {
                pool,
                namespace: ns,
                image: name,
            };
            Some(format!("{r}@{snap}"))
        };
        let snapshots = self.snap_names(&im, img)?;
        Ok(Some(ImageInfo {
            size: st.size,
            object_size: st.obj_size,
            features,
            parent,
            snapshots,
        }))
    }

    fn snap_names(&self, im: &AdminImage<'_>, img: &ImageRef) -> Result<Vec<String>> {
        let l = self.lib;
        let mut max: c_int = 16;
        for _ in 0..8 {
            let n = max.clamp(1, 1 << 16) as usize;
            let mut v: Vec<RbdSnapInfoT> = (0..n + 1)
                .map(|_| RbdSnapInfoT {
                    id: 0,
                    size: 0,
                    name: std::ptr::null(),
                })
                .collect();
            let mut m = n as c_int;
            // SAFETY: an open image, an array of `m` (+1) entries and its length.
            let r = unsafe { (l.rbd_snap_list)(im.h, v.as_mut_ptr(), &mut m) };
            if r == -libc::ERANGE {
                max = m.max(max.saturating_mul(2));
                continue;
            }
            check(r, format_args!("rbd snapshots of {img}"))?;
            let cnt = (r as usize).min(n);
            // SAFETY: librbd filled `cnt` entries with NUL-terminated names.
            let names = v[..cnt].iter().map(|s| unsafe { owned(s.name) }).collect();
            // SAFETY: frees the names rbd_snap_list filled, once.
            unsafe { (l.rbd_snap_list_end)(v.as_mut_ptr()) };
            return Ok(names);
        }
        Err(Error::new(
            ErrorKind::Io,
            format!("rbd snapshots of {img}: the list kept growing"),
        ))
    }

    /// Create a format-2 image with the Ceph default features.
    pub fn create_image(&self, img: &ImageRef, size: u64) -> Result<()> {
        let io = self.ioctx(img)?;
        let name = cstr(&img.image, "image name")?;
        let opts = Opts::new(self.lib)?;
        // SAFETY: a valid ioctx, NUL-terminated name, valid options.
        let r = unsafe { (self.lib.rbd_create4)(io, name.as_ptr(), size, opts.o) };
        check(r, format_args!("creating rbd image {img}"))
    }

    /// Resize an image that is not open here (see [`RbdDevice::resize`] for one that is).
    pub fn resize_image(&self, img: &ImageRef, size: u64) -> Result<()> {
        let im = self.open_admin(img, false)?;
        // SAFETY: an open image.
        let r = unsafe { (self.lib.rbd_resize)(im.h, size) };
        check(r, format_args!("resizing rbd image {img} to {size} bytes"))
    }

    /// Create the snapshot `img@snap` and protect it (so it can be cloned).
    pub fn create_snapshot(&self, img: &ImageRef, snap: &str) -> Result<()> {
        let s = cstr(snap, "snapshot name")?;
        let im = self.open_admin(img, false)?;
        // SAFETY: an open image and a NUL-terminated name.
        let r = unsafe { (self.lib.rbd_snap_create)(im.h, s.as_ptr()) };
        check(r, format_args!("creating snapshot {img}@{snap}"))?;
        // SAFETY: as above.
        let r = unsafe { (self.lib.rbd_snap_protect)(im.h, s.as_ptr()) };
        check(r, format_args!("protecting snapshot {img}@{snap}"))
    }

    /// Unprotect (if protected) and remove `img@snap`. Busy while clones use it.
    pub fn remove_snapshot(&self, img: &ImageRef, snap: &str) -> Result<()> {
        let s = cstr(snap, "snapshot name")?;
        let im = self.open_admin(img, false)?;
        // SAFETY: an open image and a NUL-terminated name.
        let r = unsafe { (self.lib.rbd_snap_unprotect)(im.h, s.as_ptr()) };
        // EINVAL: it was not protected.
        if r != -libc::EINVAL {
            check(r, format_args!("unprotecting snapshot {img}@{snap}"))?;
        }
        // SAFETY: as above.
        let r = unsafe { (self.lib.rbd_snap_remove)(im.h, s.as_ptr()) };
        check(r, format_args!("removing snapshot {img}@{snap}"))
    }

    /// Clone `parent@snap` (a protected snapshot) as `child`.
    pub fn clone_image(&self, parent: &ImageRef, snap: &str, child: &ImageRef) -> Result<()> {
        let pio = self.ioctx(parent)?;
        let cio = self.ioctx(child)?;
        let pname = cstr(&parent.image, "image name")?;
        let s = cstr(snap, "snapshot name")?;
        let cname = cstr(&child.image, "image name")?;
        let opts = Opts::new(self.lib)?;
        // SAFETY: valid ioctxs, NUL-terminated names and valid options.
        let r = unsafe {
            (self.lib.rbd_clone3)(pio, pname.as_ptr(), s.as_ptr(), cio, cname.as_ptr(), opts.o)
        };
        check(r, format_args!("cloning {parent}@{snap} as {child}"))
    }

    /// Remove an image (Busy while it has snapshots or is open elsewhere).
    pub fn remove_image(&self, img: &ImageRef) -> Result<()> {
        let io = self.ioctx(img)?;
        let name = cstr(&img.image, "image name")?;
        // SAFETY: a valid ioctx and a NUL-terminated name.
        let r = unsafe { (self.lib.rbd_remove)(io, name.as_ptr()) };
        check(r, format_args!("removing rbd image {img}"))
    }
}

impl Drop for RbdCluster {
    fn drop(&mut self) {
        let m = std::mem::take(self.ioctxs.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (_, io) in m {
            // SAFETY: created by rados_ioctx_create, destroyed once; every image opened
            // through it is closed (images hold an Arc of the cluster).
            unsafe { (self.lib.rados_ioctx_destroy)(io.0) };
        }
        // SAFETY: created by rados_create2, shut down once, after everything above.
        unsafe { (self.lib.rados_shutdown)(self.rados) };
    }
}

// ---------------------------------------------------------------------------------------
// The device

/// How to open an image as a device.
#[derive(Clone, Debug)]
pub struct RbdOptions {
    pub read_only: bool,
    /// Open this snapshot (read-only).
    pub snapshot: Option<String>,
    /// 512 or 4096.
    pub block_size: u32,
}

impl Default for RbdOptions {
    fn default() -> Self {
        RbdOptions {
            read_only: false,
            snapshot: None,
            block_size: 512,
        }
    }
}

/// Completions collected from librbd, handed to the queue they belong to.
struct Inbox {
    /// (slot, return value), reserved for the queue's depth.
    done: Mutex<VecDeque<(u32, isize)>>,
    /// The queue's own eventfd: signalled when another queue delivered here.
    efd: EventFd,
    /// Set while `efd` is (or is about to be) signalled, so a burst signals once.
    signalled: AtomicBool,
}

impl Inbox {
    fn wake(&self) {
        if !self.signalled.swap(true, Ordering::AcqRel) {
            self.efd.signal();
        }
    }
}

/// The collector's state (under `ImageState::reap`): the batch buffer, and when the image's
/// eventfd was last drained.
struct CompBuf {
    buf: Vec<CompT>,
    /// Completions were collected since the last drain of the eventfd.
    collected: bool,
    /// Passes that found nothing since the last drain.
    empty: u32,
}
// SAFETY: completion pointers are handed between threads only as opaque values; librbd
// completions may be reaped and released on any thread.
unsafe impl Send for CompBuf {}

/// Drain the image's eventfd at least every this many passes that collect nothing (see
/// `ImageState::reap`). A pass of an idle-polling worker takes tens of nanoseconds: this
/// is a read every 100 µs or so, against one per pass.
const DRAIN_EVERY: u32 = 4096;

/// Collect completions this many at a time.
const REAP_BATCH: usize = 64;

/// An open image, shared by the device and its queues.
struct ImageState {
    lib: &'static Lib,
    h: ImageT,
    /// The image's notification eventfd (librbd writes it when completions are ready).
    efd: EventFd,
    /// Held by the queue collecting completions; holds the batch buffer.
    reap: Mutex<CompBuf>,
    /// Inboxes of the open queues, by queue id.
    inboxes: Mutex<Vec<(u32, Arc<Inbox>)>>,
    next_qid: AtomicU32,
    /// Live size in bytes.
    size: AtomicU64,
    name: String,
    /// Closed after the image (field order: after `Drop::drop` closes the handle).
    _cluster: Arc<RbdCluster>,
}

// SAFETY: librbd image handles are thread-safe for aio submission, resize and
// rbd_poll_io_events (which is serialised by `reap` anyway).
unsafe impl Send for ImageState {}
// SAFETY: as above.
unsafe impl Sync for ImageState {}

impl ImageState {
    /// Collect librbd's finished completions and deliver them to their queues' inboxes.
    /// Only one thread at a time collects; the others return at once. `me` is the calling
    /// queue (its inbox is not woken: it reads it right after).
    ///
    /// A worker calls this on every pass of its polling spell, so a pass that finds
    /// nothing must not cost a system call: `rbd_poll_io_events` is a locked queue pop in
    /// librbd, while draining the eventfd is a `read`. librbd queues a completion, then
    /// signals the eventfd (one write per completion), so the eventfd is drained on the
    /// first empty pass after collecting (and collected again, for what came in between),
    /// and at least every `DRAIN_EVERY` empty passes: a signal that lands after that
    /// drain (with its completion collected already) wakes a sleeping worker for at most
    /// that many passes.
    fn reap(&self, me: u32) {
        let Ok(mut st) = self.reap.try_lock() else {
            return;
        };
        if self.collect(&mut st.buf, me) > 0 {
            st.collected = true;
            st.empty = 0;
            return;
        }
        st.empty += 1;
        if st.collected || st.empty >= DRAIN_EVERY {
            self.efd.drain();
            st.collected = false;
            st.empty = 0;
            // Anything queued before its signal was drained.
            if self.collect(&mut st.buf, me) > 0 {
                st.collected = true;
            }
        }
    }

    /// Pop every finished completion librbd has queued and deliver it; how many.
    fn collect(&self, buf: &mut [CompT], me: u32) -> usize {
        let mut total = 0;
        loop {
            // SAFETY: an open image and a buffer of `len` completion slots.
            let n = unsafe {
                (self.lib.rbd_poll_io_events)(self.h, buf.as_mut_ptr(), buf.len() as c_int)
            };
            if n <= 0 {
                return total;
            }
            let n = (n as usize).min(buf.len());
            total += n;
            let boxes = self.inboxes.lock().unwrap_or_else(|e| e.into_inner());
            for &c in &buf[..n] {
                // SAFETY: a completion librbd handed back finished; released once, here.
                let (arg, ret) = unsafe {
                    let a = (self.lib.rbd_aio_get_arg)(c) as usize as u64;
                    let r = (self.lib.rbd_aio_get_return_value)(c);
                    (self.lib.rbd_aio_release)(c);
                    (a, r)
                };
                let (qid, slot) = ((arg >> 32) as u32, arg as u32);
                match boxes.iter().find(|(q, _)| *q == qid) {
                    Some((_, ib)) => {
                        ib.done
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_back((slot, ret));
                        if qid != me {
                            ib.wake();
                        }
                    }
                    None => tracing::warn!(
                        image = %self.name,
                        "rbd completion of a queue that is gone (it gave up waiting for it)"
                    ),
                }
            }
        }
    }
}

impl Drop for ImageState {
    fn drop(&mut self) {
        // SAFETY: the open handle, closed once; every queue (and its commands) is gone.
        let r = unsafe { (self.lib.rbd_close)(self.h) };
        if r < 0 {
            tracing::warn!(image = %self.name, "rbd_close: {}", std::io::Error::from_raw_os_error(-r));
        }
    }
}

/// An RBD image (or snapshot) as a block device.
pub struct RbdDevice {
    img: Arc<ImageState>,
    info: DeviceInfo,
    read_only: bool,
}

impl fmt::Debug for RbdDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RbdDevice({})", self.img.name)
    }
}

impl RbdDevice {
    /// Open `img` (its snapshot `opts.snapshot`, read-only, if given).
    pub fn open(cluster: &Arc<RbdCluster>, img: &ImageRef, opts: &RbdOptions) -> Result<RbdDevice> {
        let lib = cluster.lib;
        let bs = opts.block_size;
        if bs != 512 && bs != 4096 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("block size {bs} is not supported (use 512 or 4096)"),
            ));
        }
        let display = match &opts.snapshot {
            Some(s) => format!("{img}@{s}"),
            None => img.to_string(),
        };
        let io = cluster.ioctx(img)?;
        let name = cstr(&img.image, "image name")?;
        let snap = opts
            .snapshot
            .as_deref()
            .map(|s| cstr(s, "snapshot name"))
            .transpose()?;
        let read_only = opts.read_only || opts.snapshot.is_some();
        let efd = EventFd::new().map_err(|e| Error::io("rbd notification eventfd", e))?;
        let f = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        let mut h: ImageT = std::ptr::null_mut();
        // SAFETY: a valid ioctx, NUL-terminated names (snapshot or NULL), valid out pointer.
        let r = unsafe {
            f(
                io,
                name.as_ptr(),
                &mut h,
                snap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            )
        };
        check(r, format_args!("opening rbd image {display}"))?;
        let mut buf = Vec::with_capacity(REAP_BATCH);
        buf.resize(REAP_BATCH, std::ptr::null_mut());
        // From here on, dropping `st` closes the image.
        let st = ImageState {
            lib,
            h,
            efd,
            reap: Mutex::new(CompBuf {
                buf,
                collected: false,
                empty: 0,
            }),
            inboxes: Mutex::new(Vec::with_capacity(8)),
            next_qid: AtomicU32::new(0),
            size: AtomicU64::new(0),
            name: display.clone(),
            _cluster: cluster.clone(),
        };
        // SAFETY: an open image and our eventfd, which outlives the handle (`st` closes
        // the image before its fields are dropped).
        let r =
            unsafe { (lib.rbd_set_image_notification)(h, st.efd.as_raw_fd(), EVENT_TYPE_EVENTFD) };
        check(r, format_args!("rbd image {display}: event notification"))?;
        let mut size = 0u64;
        // SAFETY: an open image and a valid out pointer.
        check(
            unsafe { (lib.rbd_get_size)(h, &mut size) },
            format_args!("size of rbd image {display}"),
        )?;
        let num_blocks = size / bs as u64;
        if num_blocks == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("rbd image {display} is {size} bytes, smaller than one {bs}-byte block"),
            ));
        }
        st.size.store(size, Ordering::Release);
        Ok(RbdDevice {
            img: Arc::new(st),
            info: DeviceInfo {
                block_size: bs,
                num_blocks,
                read_only,
                discard: !read_only,
                write_zeroes: !read_only,
                volatile_cache: true,
                max_transfer: RBD_MAX_TRANSFER,
            },
            read_only,
        })
    }

    /// Resize the open image (`rbd_resize`); [`BlockDevice::capacity_bytes`] follows.
    pub fn resize(&self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("rbd image {} is open read-only", self.img.name),
            ));
        }
        let bs = self.info.block_size as u64;
        if size == 0 || !size.is_multiple_of(bs) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "rbd image {}: size {size} is not a positive multiple of the block size {bs}",
                    self.img.name
                ),
            ));
        }
        // SAFETY: an open image.
        let r = unsafe { (self.img.lib.rbd_resize)(self.img.h, size) };
        check(
            r,
            format_args!("resizing rbd image {} to {size} bytes", self.img.name),
        )?;
        self.img.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Take the image's size as librbd knows it now (`rbd_get_size`, which re-reads the
    /// image header when another client changed it) as the live size. Returns the new
    /// size when it changed: a resize made outside nvmux (`rbd resize`). It may wait for
    /// the cluster, up to the op timeout: not for a worker thread, nor under a lock.
    pub fn refresh_size(&self) -> Result<Option<u64>> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out pointer.
        let r = unsafe { (self.img.lib.rbd_get_size)(self.img.h, &mut size) };
        check(r, format_args!("size of rbd image {}", self.img.name))?;
        let old = self.img.size.swap(size, Ordering::AcqRel);
        Ok((old != size).then_some(size))
    }
}

impl BlockDevice for RbdDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        Ok(Box::new(RbdQueue::new(
            self.img.clone(),
            self.info.block_size,
            depth,
        )?))
    }
    fn describe(&self) -> String {
        format!(
            "rbd {}{} (librbd {})",
            self.img.name,
            if self.read_only { ", read-only" } else { "" },
            librbd_version().unwrap_or_default()
        )
    }
    fn capacity_bytes(&self) -> u64 {
        let s = self.img.size.load(Ordering::Acquire);
        s - s % self.info.block_size as u64
    }
}

// ---------------------------------------------------------------------------------------
// Queues

#[derive(Default)]
struct Slot {
    cmd: Option<IoCommand>,
    /// A FUA write whose data is written: its flush is in flight.
    flushing: bool,
}

struct RbdQueue {
    img: Arc<ImageState>,
    qid: u32,
    inbox: Arc<Inbox>,
    /// epoll over the inbox's eventfd and the image's: the queue's completion_fd.
    epfd: OwnedFd,
    bs: u32,
    slots: Vec<Slot>,
    free: Vec<u32>,
    backlog: VecDeque<IoCommand>,
    /// Commands failed without reaching librbd, handed back by the next `poll`.
    failed: VecDeque<(IoCommand, Status)>,
    /// Completions taken from the inbox, reused.
    scratch: VecDeque<(u32, isize)>,
    in_flight: usize,
}

fn epoll_add(ep: RawFd, fd: RawFd) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: valid descriptors and a valid event struct.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The status for a librbd error `errno` on `op`.
fn status_of(errno: i32, op: Opcode) -> Status {
    match errno {
        libc::ETIMEDOUT
        | libc::EAGAIN
        | libc::ESHUTDOWN
        | libc::ENOTCONN
        | libc::ECONNRESET
        | libc::ECANCELED => RETRYABLE,
        libc::EROFS => Status::WRITE_PROTECTED,
        libc::EINVAL => Status::INVALID_FIELD,
        e => Status::from_errno(e, op),
    }
}

impl RbdQueue {
    fn new(img: Arc<ImageState>, bs: u32, depth: u32) -> Result<RbdQueue> {
        let depth = depth.clamp(1, 4096) as usize;
        let efd = EventFd::new().map_err(|e| Error::io("rbd queue eventfd", e))?;
        // SAFETY: no pointers; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(Error::io(
                "rbd queue epoll",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh descriptor we own.
        let epfd = unsafe { OwnedFd::from_raw_fd(ep) };
        epoll_add(ep, efd.as_raw_fd()).map_err(|e| Error::io("rbd queue epoll", e))?;
        epoll_add(ep, img.efd.as_raw_fd()).map_err(|e| Error::io("rbd queue epoll", e))?;
        let inbox = Arc::new(Inbox {
            done: Mutex::new(VecDeque::with_capacity(depth)),
            efd,
            signalled: AtomicBool::new(false),
        });
        let qid = img.next_qid.fetch_add(1, Ordering::Relaxed);
        img.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((qid, inbox.clone()));
        let mut slots = Vec::with_capacity(depth);
        slots.resize_with(depth, Slot::default);
        Ok(RbdQueue {
            img,
            qid,
            inbox,
            epfd,
            bs,
            slots,
            free: (0..depth as u32).rev().collect(),
            backlog: VecDeque::with_capacity(depth * 2),
            failed: VecDeque::with_capacity(depth),
            scratch: VecDeque::with_capacity(depth),
            in_flight: 0,
        })
    }

    fn fail(&mut self, cmd: IoCommand, s: Status) {
        self.failed.push_back((cmd, s));
        // Wake a worker that sleeps right after submitting.
        self.inbox.wake();
    }

    /// Check `cmd` against what only the backend knows, and start it or queue it.
    fn start(&mut self, cmd: IoCommand) {
        let op = cmd.opcode;
        if op != Opcode::Flush {
            let size = self.img.size.load(Ordering::Acquire);
            let end = (cmd.slba as u128 + cmd.nlb as u128) * self.bs as u128;
            if end > size as u128 {
                return self.fail(cmd, Status::LBA_OUT_OF_RANGE);
            }
        }
        if op.has_data() {
            if cmd.sg.len() != cmd.byte_len(self.bs) {
                return self.fail(cmd, Status::DATA_TRANSFER_ERROR);
            }
            if cmd.sg.segments().len() > MAX_SEGMENTS {
                return self.fail(cmd, Status::INVALID_FIELD);
            }
        }
        let Some(i) = self.free.pop() else {
            self.backlog.push_back(cmd);
            return;
        };
        self.slots[i as usize] = Slot {
            cmd: Some(cmd),
            flushing: false,
        };
        self.in_flight += 1;
        if let Err(s) = self.issue(i) {
            self.finish_failed(i, s);
        }
    }

    /// Hand slot `i`'s command (or its FUA flush) to librbd.
    fn issue(&mut self, i: u32) -> std::result::Result<(), Status> {
        let lib = self.img.lib;
        let h = self.img.h;
        let slot = &self.slots[i as usize];
        let Some(cmd) = slot.cmd.as_ref() else {
            return Err(Status::INTERNAL_ERROR);
        };
        let arg = ((self.qid as u64) << 32 | i as u64) as usize as *mut c_void;
        let mut c: CompT = std::ptr::null_mut();
        // SAFETY: a valid out pointer; a NULL callback: completions are collected with
        // rbd_poll_io_events on our own threads.
        let r = unsafe { (lib.rbd_aio_create_completion)(arg, None, &mut c) };
        if r < 0 {
            return Err(Status::INTERNAL_ERROR);
        }
        let off = cmd.byte_offset(self.bs);
        let len = cmd.byte_len(self.bs);
        let segs = cmd.sg.segments();
        // SAFETY: an open image and a fresh completion. For reads and writes the iovec
        // array belongs to the command in slot `i` and the buffers to its owner (kept
        // alive by its keepalive); both stay in place until the completion is reaped.
        let r = unsafe {
            match cmd.opcode {
                _ if slot.flushing => (lib.rbd_aio_flush)(h, c),
                Opcode::Read => (lib.rbd_aio_readv)(h, segs.as_ptr(), segs.len() as c_int, off, c),
                Opcode::Write => {
                    (lib.rbd_aio_writev)(h, segs.as_ptr(), segs.len() as c_int, off, c)
                }
                Opcode::Flush => (lib.rbd_aio_flush)(h, c),
                // Both must read back as zeros: rbd_aio_discard skips the parts of a range
                // smaller than rbd_discard_granularity_bytes (64 KiB), so deallocate is a
                // write zeroes too, which discards whole objects and zeroes the rest.
                Opcode::Deallocate | Opcode::WriteZeroes => {
                    (lib.rbd_aio_write_zeroes)(h, off, len as usize, c, 0, 0)
                }
            }
        };
        if r < 0 {
            // SAFETY: librbd did not take the completion; released once.
            unsafe { (lib.rbd_aio_release)(c) };
            return Err(status_of(-r, cmd.opcode));
        }
        Ok(())
    }

    /// Free slot `i`; the command it held.
    fn release(&mut self, i: u32) -> Option<IoCommand> {
        let slot = std::mem::take(&mut self.slots[i as usize]);
        self.free.push(i);
        self.in_flight -= 1;
        slot.cmd
    }

    fn finish_failed(&mut self, i: u32, s: Status) {
        if let Some(c) = self.release(i) {
            self.fail(c, s);
        }
    }

    /// Slot `i`'s request finished with `ret`. The finished command, or None if a FUA
    /// write goes on to its flush.
    fn complete(&mut self, i: u32, ret: isize) -> Option<(IoCommand, Status)> {
        let bs = self.bs;
        let slot = self.slots.get_mut(i as usize)?;
        let cmd = slot.cmd.as_ref()?;
        let op = cmd.opcode;
        let status = if ret < 0 {
            status_of(ret.unsigned_abs().min(i32::MAX as usize) as i32, op)
        } else if op == Opcode::Read && ret as u64 != cmd.byte_len(bs) {
            Status::UNRECOVERED_READ
        } else if op == Opcode::Write && cmd.fua && !slot.flushing {
            slot.flushing = true;
            match self.issue(i) {
                Ok(()) => return None,
                Err(s) => s,
            }
        } else {
            Status::SUCCESS
        };
        Some((self.release(i)?, status))
    }

    /// Collect completions (ours, and others' for their inboxes) and hand ours to `done`.
    fn pump(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        // Always, even with nothing of ours in flight: librbd may signal the image's
        // eventfd for a completion already collected (it queues, then signals), and
        // `reap`'s periodic drain keeps a worker watching it (level-triggered) from
        // spinning on that signal.
        self.img.reap(self.qid);
        if self.inbox.signalled.load(Ordering::Acquire) {
            self.inbox.efd.drain();
            self.inbox.signalled.swap(false, Ordering::AcqRel);
        }
        {
            let mut ib = self.inbox.done.lock().unwrap_or_else(|e| e.into_inner());
            if ib.is_empty() {
                return 0;
            }
            self.scratch.extend(ib.drain(..));
        }
        let mut n = 0;
        while let Some((i, ret)) = self.scratch.pop_front() {
            if let Some((c, s)) = self.complete(i, ret) {
                done(c, s);
                n += 1;
            }
        }
        n
    }

    fn drain_failed(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        while let Some((c, s)) = self.failed.pop_front() {
            done(c, s);
            n += 1;
        }
        n
    }
}

impl BlockQueue for RbdQueue {
    fn submit(&mut self, cmd: IoCommand) {
        self.start(cmd);
    }

    fn kick(&mut self) {
        // librbd sends each request when it is submitted.
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = self.drain_failed(done);
        n += self.pump(done);
        while !self.free.is_empty() {
            let Some(c) = self.backlog.pop_front() else {
                break;
            };
            self.start(c);
        }
        n + self.drain_failed(done)
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.backlog.len() + self.failed.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.epfd.as_raw_fd())
    }

    /// No: a command takes an OSD round trip, and its completion comes from librbd's
    /// threads, which a spinning worker would keep from the CPU.
    fn busy_poll(&self) -> bool {
        false
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        self.backlog.clear();
        self.failed.clear();
        let deadline = Instant::now() + DRAIN_WAIT;
        let mut warned = false;
        while self.in_flight > 0 {
            self.pump(&mut |_, _| {});
            if self.in_flight == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                // librbd still owns these commands' buffers and iovec arrays: keep them
                // allocated forever rather than let it write into freed memory.
                tracing::error!(
                    image = %self.img.name,
                    commands = self.in_flight,
                    "rbd queue dropped with commands still in librbd after {DRAIN_WAIT:?}; their buffers are leaked on purpose"
                );
                std::mem::forget(std::mem::take(&mut self.slots));
                break;
            }
            if !warned && deadline - now < DRAIN_WAIT - Duration::from_secs(5) {
                warned = true;
                tracing::warn!(
                    image = %self.img.name,
                    commands = self.in_flight,
                    "rbd queue closing: waiting for commands in flight"
                );
            }
            let mut p = libc::pollfd {
                fd: self.epfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack.
            unsafe { libc::poll(&mut p, 1, 10) };
        }
        self.img
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(q, _)| *q != self.qid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librbd_errors_map_to_statuses() {
        for e in [
            libc::ETIMEDOUT,
            libc::EAGAIN,
            libc::ESHUTDOWN,
            libc::ENOTCONN,
            libc::ECONNRESET,
            libc::ECANCELED,
        ] {
            assert_eq!(status_of(e, Opcode::Write), RETRYABLE, "errno {e}");
            assert_eq!(status_of(e, Opcode::Read), RETRYABLE, "errno {e}");
        }
        // No DNR bit is ever set by a Status; a path error is what hosts retry.
        assert_eq!(RETRYABLE.sct, 3);
        assert_eq!(
            status_of(libc::EROFS, Opcode::Write),
            Status::WRITE_PROTECTED
        );
        assert_eq!(status_of(libc::EINVAL, Opcode::Read), Status::INVALID_FIELD);
        assert_eq!(status_of(libc::EIO, Opcode::Read), Status::UNRECOVERED_READ);
        assert_eq!(status_of(libc::EIO, Opcode::Write), Status::WRITE_FAULT);
        assert_eq!(status_of(libc::EIO, Opcode::Flush), Status::INTERNAL_ERROR);
        assert_eq!(
            status_of(libc::ENOSPC, Opcode::Write),
            Status::CAPACITY_EXCEEDED
        );
    }

    #[test]
    fn admin_errors_map_to_kinds() {
        let img = ImageRef {
            pool: "rbd".into(),
            namespace: String::new(),
            image: "x1".into(),
        };
        for (r, k) in [
            (-libc::ENOENT, ErrorKind::NotFound),
            (-libc::EEXIST, ErrorKind::AlreadyExists),
            (-libc::EBUSY, ErrorKind::Busy),
            (-libc::ENOTEMPTY, ErrorKind::Busy),
            (-libc::EINVAL, ErrorKind::InvalidArgument),
            (-libc::EIO, ErrorKind::Io),
            (i32::MIN, ErrorKind::Io),
        ] {
            let e = check(r, format_args!("creating rbd image {img}")).unwrap_err();
            assert_eq!(e.kind, k, "{r}");
            assert!(e.msg.contains("rbd/x1"), "{e}");
        }
        assert!(check(0, "x").is_ok());
    }
}
