//! Unix sockets the daemon listens on: bound with their owner and mode set before anyone
//! can reach them, without following links, and peer credentials of accepted
//! connections.
//!
//! Every listening Unix socket of nvmux (the API socket, vhost-user-blk and NBD exports,
//! external-function sockets) is created by [`bind`]:
//!
//! ```text
//!  parent dir of PATH (opened once: dirfd)
//!    mkdirat(dirfd, ".nvmux-bind-<random>", 0700)   private: only the daemon can enter
//!    bind  /proc/self/fd/<privfd>/s                 (the socket is unreachable by others)
//!    fchownat(privfd, "s", uid, gid, AT_SYMLINK_NOFOLLOW)
//!    fchmodat(privfd, "s", mode)                    (nothing but our socket can be "s")
//!    renameat(privfd, "s", dirfd, NAME)             atomic; replaces a stale socket or a
//!                                                   planted symlink, never follows it
//!    unlinkat(dirfd, ".nvmux-bind-<random>", AT_REMOVEDIR)
//! ```
//!
//! So the socket never exists at PATH with the wrong owner or mode, and a symlink that
//! someone placed at PATH is replaced, not followed (its target is untouched). Every error
//! path removes the socket and the private directory. Callers keep their own checks on
//! what PATH may replace (not a regular file, not a live server's socket).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::{Error, ErrorKind, Result};

/// The mode of a socket when none is given: only its owner may connect.
pub const DEFAULT_MODE: u32 = 0o600;
/// The default mode when a group is given: its members may connect too.
pub const GROUP_MODE: u32 = 0o660;
/// Longest socket path a client can connect to (`sun_path` is 108 bytes with its NUL).
pub const MAX_PATH: usize = 107;

/// Who a socket belongs to and its mode. `uid`/`gid` `None`: left as created (the
/// daemon's user and group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPerms {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: u32,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms {
            uid: None,
            gid: None,
            mode: DEFAULT_MODE,
        }
    }
}

impl SocketPerms {
    /// From an owner `USER[:GROUP]` (names or numbers, see [`parse_owner`]) and a mode
    /// (octal, see [`parse_mode`]). The default mode is [`DEFAULT_MODE`], or
    /// [`GROUP_MODE`] when a group is given.
    pub fn parse(owner: Option<&str>, mode: Option<&str>) -> Result<SocketPerms> {
        let (uid, gid) = match owner {
            Some(o) => parse_owner(o)?,
            None => (None, None),
        };
        let mode = match mode {
            Some(m) => parse_mode(m)?,
            None if gid.is_some() => GROUP_MODE,
            None => DEFAULT_MODE,
        };
        Ok(SocketPerms { uid, gid, mode })
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// An octal mode: `600`, `0660`, `0o660`. Only permission bits (at most `0777`).
pub fn parse_mode(s: &str) -> Result<u32> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    let bad = || {
        invalid(format!(
            "mode {s:?} is not an octal permission mode such as 0600 or 0660 (at most 0777)"
        ))
    };
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(bad());
    }
    let m = u32::from_str_radix(digits, 8).map_err(|_| bad())?;
    if m > 0o777 {
        return Err(bad());
    }
    Ok(m)
}

/// A mode as the API and state.json show it: four octal digits, e.g. `0660`.
pub fn format_mode(m: u32) -> String {
    format!("{m:04o}")
}

/// `USER`, `USER:GROUP` or `:GROUP`, each a name or a number. Names are resolved now
/// (getpwnam_r / getgrnam_r). `USER` alone leaves the group as created.
pub fn parse_owner(s: &str) -> Result<(Option<u32>, Option<u32>)> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u.trim(), Some(g.trim())),
        None => (s.trim(), None),
    };
    if u.is_empty() && g.is_none_or(str::is_empty) {
        return Err(invalid(format!(
            "owner {s:?}: give USER, USER:GROUP or :GROUP (names or numbers)"
        )));
    }
    let uid = (!u.is_empty()).then(|| user_id(u)).transpose()?;
    let gid = match g {
        Some("") => {
            return Err(invalid(format!(
                "owner {s:?}: the group after ':' is empty"
            )))
        }
        Some(g) => Some(group_id(g)?),
        None => None,
    };
    Ok((uid, gid))
}

fn numeric(s: &str) -> Option<u32> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok().filter(|&n| n != u32::MAX)
    } else {
        None
    }
}

/// Buffer size for the `get*_r` functions, grown on ERANGE up to this.
const MAX_PW_BUF: usize = 1 << 20;

/// A user's uid: a number as is, a name through getpwnam_r.
pub fn user_id(name: &str) -> Result<u32> {
    if let Some(n) = numeric(name) {
        return Ok(n);
    }
    // SAFETY: passwd is plain old data; zeroed is a valid value for it.
    let pw: libc::passwd = unsafe { std::mem::zeroed() };
    // SAFETY: every pointer is valid for the call: the name is NUL-terminated, the entry
    // and `out` are the caller's locals, and the buffer is `len` writable bytes.
    lookup_id(
        "user",
        "uid",
        name,
        pw,
        |c, pw: &mut libc::passwd, buf, len, out| unsafe { libc::getpwnam_r(c, pw, buf, len, out) },
    )
    .map(|pw| pw.pw_uid)
}

/// A group's gid: a number as is, a name through getgrnam_r.
pub fn group_id(name: &str) -> Result<u32> {
    if let Some(n) = numeric(name) {
        return Ok(n);
    }
    // SAFETY: group is plain old data; zeroed is a valid value for it.
    let gr: libc::group = unsafe { std::mem::zeroed() };
    // SAFETY: as in user_id: a valid name, the caller's locals, `len` writable bytes.
    lookup_id(
        "group",
        "gid",
        name,
        gr,
        |c, gr: &mut libc::group, buf, len, out| unsafe { libc::getgrnam_r(c, gr, buf, len, out) },
    )
    .map(|gr| gr.gr_gid)
}

/// The entry for a name through a `get*nam_r` call (`entry` is its zeroed storage),
/// growing the call's buffer on ERANGE.
fn lookup_id<T: Copy>(
    what: &str,
    id: &str,
    name: &str,
    mut entry: T,
    mut call: impl FnMut(
        *const libc::c_char,
        &mut T,
        *mut libc::c_char,
        usize,
        &mut *mut T,
    ) -> libc::c_int,
) -> Result<T> {
    let c = CString::new(name).map_err(|_| invalid(format!("{what} {name:?}: contains NUL")))?;
    let mut buf = vec![0u8; 1024];
    loop {
        let mut out: *mut T = std::ptr::null_mut();
        let r = call(
            c.as_ptr(),
            &mut entry,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        );
        if r == libc::ERANGE && buf.len() < MAX_PW_BUF {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(Error::io(
                format!("look up {what} {name:?}"),
                std::io::Error::from_raw_os_error(r),
            ));
        }
        if out.is_null() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{what} {name:?} does not exist (give a known {what} name or a numeric {id})"
                ),
            ));
        }
        return Ok(entry);
    }
}

/// A uid's user name, for messages (`None` when it has no passwd entry).
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain old data; zeroed is a valid value for it.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: locals and `buf.len()` writable bytes.
        let r =
            unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
        if r == libc::ERANGE && buf.len() < MAX_PW_BUF {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 || out.is_null() || pw.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
        return Some(
            unsafe { CStr::from_ptr(pw.pw_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
}

/// A gid's group name, for messages.
pub fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: group is plain old data; zeroed is a valid value for it.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: locals and `buf.len()` writable bytes.
        let r =
            unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
        if r == libc::ERANGE && buf.len() < MAX_PW_BUF {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 || out.is_null() || gr.gr_name.is_null() {
            return None;
        }
        // SAFETY: on success gr_name points to a NUL-terminated string inside `buf`.
        return Some(
            unsafe { CStr::from_ptr(gr.gr_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
}

/// `uid 65534 (nobody)`, or `uid 1234` without a passwd entry.
pub fn describe_uid(uid: u32) -> String {
    match user_name(uid) {
        Some(n) => format!("uid {uid} ({n})"),
        None => format!("uid {uid}"),
    }
}

/// `gid 65534 (nogroup)`, or `gid 1234` without a group entry.
pub fn describe_gid(gid: u32) -> String {
    match group_name(gid) {
        Some(n) => format!("gid {gid} ({n})"),
        None => format!("gid {gid}"),
    }
}

fn cpath(p: &OsStr) -> std::io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Open a directory (following links in its path: the operator chose it).
fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    let c = cpath(dir.as_os_str())?;
    // SAFETY: a NUL-terminated path; the flags make no use of a mode argument.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into our buffer. A short or failed
    // read leaves zeros, which only makes the name easier to guess; mkdirat still refuses
    // an existing name, and we then try again.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut s = String::new();
    for (i, x) in b.iter().enumerate() {
        s.push_str(&format!("{:02x}", x ^ (t >> (i * 5)) as u8));
    }
    s
}

/// Create a private directory (mode 0700, ours) in `dir`; returns its name and an open
/// descriptor of it.
fn private_dir(dir: &OwnedFd) -> std::io::Result<(CString, OwnedFd)> {
    for _ in 0..16 {
        let name = cpath(OsStr::new(&format!(".nvmux-bind-{}", random_suffix())))?;
        // SAFETY: dirfd is open; the name is NUL-terminated.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                continue;
            }
            return Err(e);
        }
        let opened = (|| {
            // SAFETY: dirfd is open; the name is NUL-terminated. O_NOFOLLOW: if someone
            // swapped our directory for a link, this fails.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            check(fd)?;
            // SAFETY: openat returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: stat is plain old data; fstat fills it from our descriptor.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fd is open; st is a valid out-pointer.
            check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
            // SAFETY: geteuid has no preconditions.
            if st.st_uid != unsafe { libc::geteuid() } || st.st_mode & libc::S_IFMT != libc::S_IFDIR
            {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            // The umask may have taken bits we need; nobody else gets any.
            // SAFETY: fchmod on our own descriptor.
            check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) })?;
            Ok(fd)
        })();
        match opened {
            Ok(fd) => return Ok((name, fd)),
            Err(e) => {
                // SAFETY: removing the (empty) directory we just made, by name in dirfd.
                unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
                return Err(e);
            }
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EEXIST))
}

/// The socket's name inside the private directory.
const INNER: &CStr = c"s";

/// Bind and listen on a Unix socket at `path` whose owner and mode are `perms` from the
/// moment it appears there. See the module documentation for the steps. Whatever is at
/// `path` (a stale socket, a symlink) is replaced atomically; callers refuse paths that
/// must not be replaced before calling this.
pub fn bind(path: &Path, perms: &SocketPerms) -> Result<UnixListener> {
    let what = || format!("socket {}", path.display());
    // After a takeover the old process's listening socket is already at `path`.
    if let Some(fd) = take_inherited(&unix_key(path)) {
        return Ok(UnixListener::from(fd));
    }
    let name = path
        .file_name()
        .ok_or_else(|| invalid(format!("{}: the path names no file", what())))?;
    if path.as_os_str().len() > MAX_PATH {
        return Err(invalid(format!(
            "{}: the path is {} bytes long; Unix socket paths are limited to {MAX_PATH} bytes, choose a shorter one",
            what(),
            path.as_os_str().len()
        )));
    }
    if perms.mode > 0o777 {
        return Err(invalid(format!(
            "{}: mode {:o} is not a permission mode",
            what(),
            perms.mode
        )));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = open_dir(parent).map_err(|e| {
        let kind = if e.raw_os_error() == Some(libc::ENOENT) {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        Error {
            kind,
            msg: format!("{}: directory {}: {e}", what(), parent.display()),
            source: Some(e),
        }
    })?;
    let (priv_name, priv_fd) = private_dir(&dir).map_err(|e| {
        Error::io(
            format!(
                "{}: cannot create a private directory in {} to bind in",
                what(),
                parent.display()
            ),
            e,
        )
    })?;
    let name_c = cpath(name).map_err(|e| Error::io(what(), e))?;
    let r = bind_inside(&dir, &priv_fd, &name_c, perms, parent, &priv_name);
    if r.is_err() {
        // SAFETY: removing our socket (if bind got that far) from our private directory.
        unsafe { libc::unlinkat(priv_fd.as_raw_fd(), INNER.as_ptr(), 0) };
    }
    // SAFETY: removing our private directory (now empty) by name in dirfd.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), priv_name.as_ptr(), libc::AT_REMOVEDIR) } < 0 {
        tracing::warn!(
            "could not remove {}/{}: {}",
            parent.display(),
            priv_name.to_string_lossy(),
            std::io::Error::last_os_error()
        );
    }
    r.map_err(|(step, e)| {
        let hint = match (step, e.raw_os_error()) {
            ("chown", Some(libc::EPERM)) => format!(
                " (only root can give a socket to another user; the daemon runs as {})",
                // SAFETY: geteuid has no preconditions.
                describe_uid(unsafe { libc::geteuid() })
            ),
            _ => String::new(),
        };
        Error::io(format!("{}: {step}{hint}", what()), e)
    })
}

/// The steps inside the private directory; on error, which step failed.
fn bind_inside(
    dir: &OwnedFd,
    priv_fd: &OwnedFd,
    name: &CStr,
    perms: &SocketPerms,
    parent: &Path,
    priv_name: &CStr,
) -> std::result::Result<UnixListener, (&'static str, std::io::Error)> {
    // Bind through /proc/self/fd: the path is short whatever the directory's length, and
    // it names our open directory even if someone renamed it. Without /proc, the full path.
    let via_proc = PathBuf::from(format!("/proc/self/fd/{}/s", priv_fd.as_raw_fd()));
    let full = parent
        .join(OsStr::from_bytes(priv_name.to_bytes()))
        .join("s");
    let listener = match UnixListener::bind(&via_proc) {
        Ok(l) => l,
        Err(e)
            if e.raw_os_error() == Some(libc::ENOENT) && !Path::new("/proc/self/fd").exists() =>
        {
            UnixListener::bind(&full).map_err(|e| ("bind", e))?
        }
        Err(e) => return Err(("bind", e)),
    };
    let pfd: RawFd = priv_fd.as_raw_fd();
    if perms.uid.is_some() || perms.gid.is_some() {
        let uid = perms.uid.unwrap_or(u32::MAX); // -1: unchanged
        let gid = perms.gid.unwrap_or(u32::MAX);
        // SAFETY: our private directory's descriptor and a NUL-terminated name;
        // AT_SYMLINK_NOFOLLOW changes the entry itself, never a link's target.
        check(unsafe { libc::fchownat(pfd, INNER.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
            .map_err(|e| ("chown", e))?;
    }
    // SAFETY: as above. Only the daemon can write the private directory (0700), so "s" is
    // the socket we just bound, not a link (fchmodat cannot refuse links before Linux 6.6).
    check(unsafe { libc::fchmodat(pfd, INNER.as_ptr(), perms.mode as libc::mode_t, 0) })
        .map_err(|e| ("chmod", e))?;
    // SAFETY: both descriptors are open directories, both names NUL-terminated. rename
    // replaces the destination entry itself (a stale socket or a symlink), atomically.
    check(unsafe { libc::renameat(pfd, INNER.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
        .map_err(|e| ("rename into place", e))?;
    Ok(listener)
}

/// What waits on a non-blocking stream socket, looked at without taking it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// Nothing.
    Empty,
    /// End of stream, or a socket error.
    Closed,
    /// The first `copied` queued bytes are in the caller's buffer (a message header, say);
    /// `total` bytes wait in all.
    Bytes { copied: usize, total: usize },
}

/// Peek at what waits on the stream socket `fd`: copy up to `head.len()` bytes into `head`
/// and count what is queued, leaving everything (descriptors included) in the socket. A
/// session on the control threads uses it to take a request only once it is whole.
pub fn peek_queued(fd: RawFd, head: &mut [u8]) -> Queued {
    let copied = loop {
        // SAFETY: `head` is writable for its length; without a control buffer a peek
        // installs no descriptors (they stay queued with the bytes).
        let n = unsafe {
            libc::recv(
                fd,
                head.as_mut_ptr().cast(),
                head.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            break n as usize;
        }
        if n == 0 {
            return Queued::Closed;
        }
        match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Queued::Empty,
            _ => return Queued::Closed,
        }
    };
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the live `avail`.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } < 0 {
        return Queued::Closed;
    }
    Queued::Bytes {
        copied,
        total: (avail.max(0) as usize).max(copied),
    }
}

/// The credentials of a connected Unix socket's peer (as of its `connect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected Unix socket.
pub fn peer_cred(fd: RawFd) -> std::io::Result<PeerCred> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `c`, a local of that size.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(PeerCred {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}

/// Most supplementary groups read with `SO_PEERGROUPS` (Linux's NGROUPS_MAX).
const MAX_PEER_GROUPS: usize = 65536;

/// The peer's supplementary groups (`SO_PEERGROUPS`, Linux 4.13 and later), as of its
/// `connect`.
pub fn peer_groups(fd: RawFd) -> std::io::Result<Vec<u32>> {
    let mut v: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (v.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the vector's buffer, which
        // holds exactly that many.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                v.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ERANGE: `len` now says how much room is needed.
            if e.raw_os_error() == Some(libc::ERANGE) && n > v.len() && n <= MAX_PEER_GROUPS {
                v.resize(n, 0);
                continue;
            }
            return Err(e);
        }
        v.truncate(n.min(v.len()));
        return Ok(v);
    }
}

/// Listening sockets handed over by the daemon process this one took over from (`nvmux
/// upgrade`), until the code that would bind them takes them ([`bind`],
/// [`tcp_listener`]). Keys are [`unix_key`] and [`tcp_key`].
static INHERITED: std::sync::Mutex<Option<std::collections::HashMap<String, OwnedFd>>> =
    std::sync::Mutex::new(None);

/// The registry key of a Unix socket path.
pub fn unix_key(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// The registry key of a TCP listening address.
pub fn tcp_key(addr: &std::net::SocketAddr) -> String {
    format!("tcp:{addr}")
}

/// Keep a listening socket handed over by the old process under `key`.
pub fn inherit(key: String, fd: OwnedFd) {
    let mut g = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(Default::default).insert(key, fd);
}

/// Take the inherited socket under `key`, if there is one.
pub fn take_inherited(key: &str) -> Option<OwnedFd> {
    let mut g = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    g.as_mut()?.remove(key)
}

/// Is a socket inherited under `key` (not yet taken)?
pub fn is_inherited(key: &str) -> bool {
    let g = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().is_some_and(|m| m.contains_key(key))
}

/// The inherited sockets no one took (their export or listener is gone from the state):
/// closed by the caller.
pub fn take_all_inherited() -> Vec<(String, OwnedFd)> {
    let mut g = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    g.take()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default()
}

/// A TCP listener on `addr`: the one inherited from the old process if there is one,
/// else a new one.
pub fn tcp_listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    if addr.port() != 0 {
        if let Some(fd) = take_inherited(&tcp_key(&addr)) {
            return Ok(std::net::TcpListener::from(fd));
        }
    }
    std::net::TcpListener::bind(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nvmux-unixsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn leftovers(d: &Path) -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".nvmux-bind-"))
            .collect()
    }

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert_eq!(parse_mode("0o640").unwrap(), 0o640);
        for bad in ["", "8", "0x1", "1777", "07777", "-1", "0o", "66a", "00660"] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_mode(0o600), "0600");
        assert_eq!(format_mode(0o7), "0007");
    }

    #[test]
    fn owners() {
        assert_eq!(parse_owner("0").unwrap(), (Some(0), None));
        assert_eq!(
            parse_owner("65534:65534").unwrap(),
            (Some(65534), Some(65534))
        );
        assert_eq!(parse_owner("root:root").unwrap(), (Some(0), Some(0)));
        assert_eq!(parse_owner(":0").unwrap(), (None, Some(0)));
        assert!(parse_owner("").is_err());
        assert!(parse_owner(":").is_err());
        assert!(parse_owner("0:").is_err());
        assert!(parse_owner("no-such-user-nvmux").is_err());
        assert!(parse_owner("0:no-such-group-nvmux").is_err());
        assert!(
            parse_owner("4294967295").is_err(),
            "-1 is 'unchanged', not a uid"
        );
        assert_eq!(
            SocketPerms::parse(Some("1:2"), None).unwrap().mode,
            GROUP_MODE
        );
        assert_eq!(
            SocketPerms::parse(Some("1"), None).unwrap().mode,
            DEFAULT_MODE
        );
        assert_eq!(SocketPerms::parse(None, Some("0666")).unwrap().mode, 0o666);
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn binds_with_mode_and_cleans_up() {
        let d = tmpdir("mode");
        let p = d.join("a.sock");
        let l = bind(&p, &SocketPerms::parse(None, Some("0640")).unwrap()).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert!(leftovers(&d).is_empty());
        // It listens.
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let (_s, _) = l.accept().unwrap();
        // A stale socket is replaced.
        drop(l);
        let _l2 = bind(&p, &SocketPerms::default()).unwrap();
        assert_eq!(
            std::fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn owner_is_set_without_following_a_planted_symlink() {
        let d = tmpdir("link");
        let target = d.join("victim");
        std::fs::write(&target, b"keep me").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = d.join("b.sock");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let perms = if root() {
            SocketPerms::parse(Some("65534:65534"), Some("0660")).unwrap()
        } else {
            SocketPerms::parse(None, Some("0660")).unwrap()
        };
        let _l = bind(&p, &perms).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket(), "the link was replaced");
        assert_eq!(m.permissions().mode() & 0o7777, 0o660);
        if root() {
            assert_eq!((m.uid(), m.gid()), (65534, 65534));
        }
        let t = std::fs::metadata(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert_eq!(t.permissions().mode() & 0o7777, 0o644);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(t.uid(), unsafe { libc::geteuid() });
        assert!(leftovers(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_leave_nothing_behind() {
        let d = tmpdir("err");
        // A directory at the path: rename cannot replace it.
        let p = d.join("c.sock");
        std::fs::create_dir(&p).unwrap();
        assert!(bind(&p, &SocketPerms::default()).is_err());
        assert!(std::fs::metadata(&p).unwrap().is_dir());
        assert!(leftovers(&d).is_empty());
        // A missing directory.
        let e = bind(&d.join("nope/x.sock"), &SocketPerms::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        // Too long for sun_path.
        let long = d.join("x".repeat(120));
        assert!(bind(&long, &SocketPerms::default()).is_err());
        assert!(leftovers(&d).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn long_directory_binds_through_proc() {
        // The private directory adds ~20 bytes; a path close to the limit still binds.
        let d = tmpdir("long");
        let room = MAX_PATH - d.as_os_str().len() - 1;
        let p = d.join("y".repeat(room));
        assert_eq!(p.as_os_str().len(), MAX_PATH);
        let l = bind(&p, &SocketPerms::default()).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        drop(l);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn peer_credentials() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = peer_cred(a.as_raw_fd()).unwrap();
        // SAFETY: getuid/getpid have no preconditions.
        assert_eq!(c.uid, unsafe { libc::getuid() });
        assert_eq!(c.pid, std::process::id() as i32);
        let g = peer_groups(a.as_raw_fd()).unwrap();
        let mut mine = vec![0 as libc::gid_t; 256];
        // SAFETY: getgroups writes at most 256 entries into our buffer.
        let n = unsafe { libc::getgroups(256, mine.as_mut_ptr()) };
        mine.truncate(n.max(0) as usize);
        let (mut g, mut mine) = (g, mine);
        g.sort();
        mine.sort();
        assert_eq!(g, mine);
    }

    #[test]
    fn inherited_sockets_are_handed_back_instead_of_bound() {
        let dir = std::env::temp_dir().join(format!("nvmux-inherit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        let l = bind(&p, &SocketPerms::default()).unwrap();
        let ino = std::fs::metadata(&p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        inherit(unix_key(&p), OwnedFd::from(l));
        assert!(is_inherited(&unix_key(&p)));
        // bind() takes the inherited socket: the file at the path is the same one.
        let l2 = bind(&p, &SocketPerms::default()).unwrap();
        assert!(!is_inherited(&unix_key(&p)));
        assert_eq!(
            std::fs::metadata(&p)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                .ok(),
            ino.ok()
        );
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        assert!(l2.accept().is_ok());
        // TCP: the inherited listener under its address.
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = t.local_addr().unwrap();
        inherit(tcp_key(&a), OwnedFd::from(t));
        let t2 = tcp_listener(a).unwrap();
        assert_eq!(t2.local_addr().unwrap(), a);
        assert!(take_all_inherited().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
