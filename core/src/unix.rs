//! Unix-domain stream listeners: binding the socket file safely, its permissions, its removal,
//! and the config rules that only make sense for them.
//!
//! A `unix:/path` listener is one socket shared by every worker (`SO_REUSEPORT` does not apply:
//! each worker accepts on its own duplicate of the descriptor, as with socket activation). At
//! start, the path is made ready with care, because a socket file outlives the process that
//! bound it:
//!
//! - nothing there: bind;
//! - a socket nobody listens on (a connect is refused: a previous run that did not clean up):
//!   removed, then bind;
//! - a socket something answers on: an address in use, like a busy TCP port;
//! - anything that is not a socket: never deleted; an error names it.
//!
//! The socket is bound, given its mode (`socket_mode`, default [`DEFAULT_SOCKET_MODE`]) and
//! group (`socket_group`), and only then listens, so no client can connect through wider
//! permissions in between. The [`SocketFile`] guard removes the file when the listener is
//! dropped for good (at exit, or when a reload removes or moves the service), and only if the
//! file there is still the one this process bound (same device and inode): a newer server's
//! socket at the same path is left alone. `unix:@name` (Linux's abstract namespace) has no
//! file, no permissions (anyone in the network namespace may connect: use `allow_uids`), and
//! vanishes with the socket.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::ServiceConfig;
use crate::listen::{Listen, UnixName, MAX_UNIX_PATH};

/// The mode a socket file gets without `socket_mode`: the owner and the group may connect
/// (connecting needs write permission), others may not.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

/// `socket_mode`: permission bits written in octal (`"0660"`, `"660"` or `"0o660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl std::str::FromStr for SocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 && !digits.is_empty() => Ok(SocketMode(mode)),
            _ => Err(format!(
                "`{s}` is not a permission mode: expected octal digits up to 0777, like \"0660\""
            )),
        }
    }
}

impl Serialize for SocketMode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Makes a relative socket path relative to `dir` (the config file's directory), like the
/// other file paths of a config, and absolute: logs, `wharf check` and the status page then
/// name the file wherever they are read, and `wharf bench` finds the server by it.
pub fn resolve_path(listen: &mut Listen, dir: &Path) {
    if let Listen::Unix(UnixName::Path(path)) = listen {
        if path.is_relative() {
            let joined = dir.join(&*path);
            *path = std::path::absolute(&joined).unwrap_or(joined);
        }
    }
}

/// The Unix-only keys used where they cannot apply, and the IP-only keys used where no IP
/// address exists: `(key under the service, message)` pairs.
pub fn check_service(svc: &ServiceConfig) -> Vec<(&'static str, String)> {
    let mut errors = Vec::new();
    let Listen::Unix(name) = &svc.listen else {
        let unix_only = [
            ("socket_mode", svc.socket_mode.is_some()),
            ("socket_group", svc.socket_group.is_some()),
            ("allow_uids", !svc.allow_uids.is_empty()),
            ("allow_gids", !svc.allow_gids.is_empty()),
        ];
        for (key, set) in unix_only {
            if set {
                let message = format!(
                    "applies to Unix-domain listeners only (listen = \"unix:/path\"), not to {}",
                    svc.listen
                );
                errors.push((key, message));
            }
        }
        return errors;
    };
    match name {
        UnixName::Abstract(_) => {
            for (key, set) in [
                ("socket_mode", svc.socket_mode.is_some()),
                ("socket_group", svc.socket_group.is_some()),
            ] {
                if set {
                    let message = "an abstract socket (unix:@name) has no file and no \
                                   permissions: anyone in the network namespace can connect; \
                                   restrict it with allow_uids/allow_gids"
                        .to_string();
                    errors.push((key, message));
                }
            }
        }
        UnixName::Path(path) => {
            let len = path.as_os_str().len();
            if len > MAX_UNIX_PATH {
                let message = format!(
                    "the socket path, made absolute ({}), is {len} bytes: at most \
                     {MAX_UNIX_PATH} fit in a socket address",
                    path.display()
                );
                errors.push(("listen", message));
            }
        }
    }
    if let Some(group) = &svc.socket_group {
        if let Err(e) = crate::program::lookup_group(group) {
            errors.push(("socket_group", e));
        }
    }
    if !svc.trusted_proxies.is_empty() {
        errors.push((
            "trusted_proxies",
            "a Unix-domain peer has no IP address: with proxy_protocol on a Unix socket, every \
             peer that may connect (socket_mode, socket_group, allow_uids) may send a header"
                .into(),
        ));
    }
    // Without a PROXY header, a Unix client has no IP address for these to apply to.
    if svc.proxy_protocol.is_none() {
        let ip_only = [
            ("allow_from", !svc.allow_from.is_empty()),
            (
                "max_connections_per_source",
                svc.max_connections_per_source.is_some(),
            ),
            (
                "max_connection_rate_per_source",
                svc.max_connection_rate_per_source.is_some(),
            ),
        ];
        for (key, set) in ip_only {
            if set {
                let message = "a Unix-domain client has no IP address (it applies only behind \
                               a proxy, with proxy_protocol); restrict local clients with \
                               socket_mode, socket_group or allow_uids/allow_gids"
                    .to_string();
                errors.push((key, message));
            }
        }
    }
    errors
}

/// The `listen` address a bound Unix socket has (`unix:/path` or `unix:@name`).
pub fn listen_of(addr: &std::os::unix::net::SocketAddr) -> io::Result<Listen> {
    use std::os::linux::net::SocketAddrExt;
    if let Some(path) = addr.as_pathname() {
        return Ok(Listen::Unix(UnixName::Path(path.to_path_buf())));
    }
    match addr.as_abstract_name() {
        Some(name) => Ok(Listen::Unix(UnixName::Abstract(
            String::from_utf8_lossy(name).into_owned(),
        ))),
        None => Err(io::Error::other("the Unix socket has no name")),
    }
}

/// One line on a Unix service's socket and peers for `wharf check` (`None` for other kinds).
pub fn describe(svc: &ServiceConfig) -> Option<String> {
    let Listen::Unix(name) = &svc.listen else {
        return None;
    };
    let ids = |ids: &[u32]| match ids {
        [] => "any".to_string(),
        ids => ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let file = match name {
        UnixName::Abstract(_) => "abstract (no file, no permissions)".to_string(),
        UnixName::Path(_) => format!(
            "mode {}, group {}",
            svc.socket_mode.unwrap_or(SocketMode(DEFAULT_SOCKET_MODE)),
            svc.socket_group.as_deref().unwrap_or("(wharf's own)")
        ),
    };
    let peers = if svc.allow_uids.is_empty() && svc.allow_gids.is_empty() {
        "any peer that can connect".to_string()
    } else {
        format!(
            "allow_uids = {}, allow_gids = {}",
            ids(&svc.allow_uids),
            ids(&svc.allow_gids)
        )
    };
    Some(format!("unix socket: {file}; peers: {peers}"))
}

/// A bound Unix-domain listener and, for a file-system socket, the guard that removes its file.
pub struct BoundUnix {
    /// Listening and non-blocking.
    pub listener: UnixListener,
    /// The socket file, removed when the last holder drops it; `None` for an abstract name.
    pub file: Option<SocketFile>,
}

/// How a Unix listener's file is set up.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileSettings {
    /// Permission bits (`None`: [`DEFAULT_SOCKET_MODE`]).
    pub mode: Option<SocketMode>,
    /// Group ID the file is given (`None`: the process's).
    pub gid: Option<u32>,
}

/// Binds a listening, non-blocking Unix-domain stream socket at `name`, replacing a stale
/// socket file (see the module doc). A live socket is an `AddrInUse` error; a path that is not
/// a socket, `AlreadyExists`.
pub fn bind(name: &UnixName, settings: FileSettings) -> io::Result<BoundUnix> {
    let path = match name {
        UnixName::Path(path) => path,
        UnixName::Abstract(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            let listener = UnixListener::bind_addr(&addr)?;
            listener.set_nonblocking(true)?;
            return Ok(BoundUnix {
                listener,
                file: None,
            });
        }
    };
    clear_stale(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    // From here on the file is ours: removed again if anything below fails.
    let file = SocketFile::of(path)?;
    apply_settings(path, settings)?;
    socket.listen(crate::net::BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(BoundUnix {
        listener: UnixListener::from(OwnedFd::from(socket)),
        file: Some(file),
    })
}

/// Gives the socket file at `path` the mode and group of `settings`.
fn apply_settings(path: &Path, settings: FileSettings) -> io::Result<()> {
    let mode = settings.mode.map_or(DEFAULT_SOCKET_MODE, |m| m.0);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = settings.gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot give it group {gid}: {e}")))?;
    }
    Ok(())
}

/// Makes `path` free for a bind: removes a stale socket, refuses anything else.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket: not removing it (remove it yourself or \
             choose another path)",
        ));
    }
    // A non-blocking connect: a live listener with a full backlog says EAGAIN instead of
    // making us wait, and is just as alive.
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale socket file nobody listens on");
            std::fs::remove_file(path)
        }
        Ok(()) => Err(in_use()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(in_use()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("a socket file is there and cannot be probed: {e}"),
        )),
    }
}

fn in_use() -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        "a socket file is there and a process answers on it",
    )
}

/// A socket file this process bound: removed on drop if the file at its path is still that one.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The socket file just bound at `path`.
    fn of(path: &Path) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the file the mode and group of `settings` (a reload that keeps the socket but
    /// changes `socket_mode` or `socket_group`), if the file at the path is still this one.
    pub fn apply(&self, settings: FileSettings) -> io::Result<()> {
        if !self.is_ours() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the socket file was removed or replaced since it was bound",
            ));
        }
        apply_settings(&self.path, settings)
    }

    /// Whether the file at the path is still the one bound.
    pub fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wharf-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn modes_parse_in_octal_and_print_back() {
        assert_eq!("0660".parse::<SocketMode>().unwrap(), SocketMode(0o660));
        assert_eq!("0o600".parse::<SocketMode>().unwrap(), SocketMode(0o600));
        assert_eq!(SocketMode(0o660).to_string(), "0660");
        for bad in ["", "0888", "1777", "rw", "0o"] {
            assert!(bad.parse::<SocketMode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_refused_a_file_kept() {
        let path = temp_path("stale.sock");
        let name = UnixName::Path(path.clone());
        // Stale: bound, never listening, closed.
        drop(UnixListener::bind(&path).unwrap());
        let bound = bind(&name, FileSettings::default()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, DEFAULT_SOCKET_MODE);
        UnixStream::connect(&path).unwrap();

        // Live: refused, and the file stays the live one's.
        let err = bind(&name, FileSettings::default()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(bound.file.as_ref().unwrap().is_ours());

        // Dropped: the file goes with it.
        drop(bound);
        assert!(!path.exists());

        // Not a socket: untouched.
        std::fs::write(&path, "keep me").unwrap();
        let err = bind(&name, FileSettings::default()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_replaced_file_is_not_removed_by_the_old_owner() {
        let path = temp_path("replaced.sock");
        let name = UnixName::Path(path.clone());
        let settings = FileSettings {
            mode: Some(SocketMode(0o600)),
            gid: None,
        };
        let first = bind(&name, settings).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_file(&path).unwrap();
        let second = bind(&name, settings).unwrap();
        drop(first);
        assert!(path.exists(), "the second server's socket stays");
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn an_abstract_name_binds_without_a_file() {
        let name = UnixName::Abstract(format!("wharf-test-{}", std::process::id()));
        let bound = bind(&name, FileSettings::default()).unwrap();
        assert!(bound.file.is_none());
        let addr = bound.listener.local_addr().unwrap();
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(
            addr.as_abstract_name().unwrap(),
            format!("wharf-test-{}", std::process::id()).as_bytes()
        );
        let again = bind(&name, FileSettings::default()).err().unwrap();
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
    }
}
