//! systemd socket activation: listening sockets passed by the service manager.
//!
//! With a `.socket` unit, systemd binds the addresses itself (before wharf starts, with its own
//! privileges) and hands the sockets over as descriptors 3, 4, ... with `LISTEN_PID` (who they
//! are for), `LISTEN_FDS` (how many) and `LISTEN_FDNAMES` (their `FileDescriptorName=`), as
//! sd_listen_fds(3) describes. A service uses the passed socket named like the service, or else
//! the one bound to its `listen` address (one `wharf.socket` unit listing every address names all
//! its sockets `wharf.socket`), instead of binding; likewise `metrics` for the metrics endpoint.
//! TCP sockets (`ListenStream=127.0.0.1:7000`) and Unix-domain stream sockets
//! (`ListenStream=/run/wharf/x.sock`, matched by path, or `@name`) are taken; systemd owns a Unix
//! socket's file (wharf neither replaces nor removes it).
//! The variables are removed once read so that no child inherits them.
//!
//! The bind phase of `wharf serve` ([`crate::server`]'s `bootstrap`) takes sockets from here
//! before binding anything itself.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use wharf_core::listen::{Listen, ListenSocket};

/// First descriptor passed (SD_LISTEN_FDS_START).
const FIRST_FD: RawFd = 3;

/// The sockets passed to this process: name, socket, the address it is bound to.
#[derive(Default)]
pub struct Activated {
    sockets: Vec<(String, ListenSocket, Option<Listen>)>,
}

impl Activated {
    /// Takes the sockets systemd passed to this process (none when not socket-activated).
    /// A socket that is not a listening TCP or Unix-domain stream socket is an error.
    pub fn from_env() -> Result<Activated, String> {
        let pid = std::env::var("LISTEN_PID").ok();
        let count = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        let (Some(pid), Some(count)) = (pid, count) else {
            return Ok(Activated::default());
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            // Meant for another process (we inherited the environment): not ours to touch.
            return Ok(Activated::default());
        }
        let count: RawFd = count
            .parse()
            .map_err(|_| format!("socket activation: LISTEN_FDS={count:?} is not a number"))?;
        let names: Vec<String> = names
            .map(|n| n.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let mut sockets = Vec::new();
        for i in 0..count {
            let fd = FIRST_FD + i;
            // Unnamed sockets (no LISTEN_FDNAMES) are matched by address only.
            let name = names
                .get(i as usize)
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            let domain = check_listening_stream(fd)
                .map_err(|e| format!("socket activation: {name} (fd {fd}): {e}"))?;
            // SAFETY: systemd passed this descriptor to us (LISTEN_PID is our pid) and nothing
            // else in the process owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl on a descriptor we own; children must not inherit it.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            let socket = if domain == libc::AF_UNIX {
                ListenSocket::Unix(UnixListener::from(owned))
            } else {
                ListenSocket::Tcp(TcpListener::from(owned))
            };
            let addr = socket.local_listen().ok();
            sockets.push((name, socket, addr));
        }
        Ok(Activated { sockets })
    }

    /// The socket named `name`, or else the one bound to `addr` (a TCP address, a Unix
    /// socket's path or abstract name); each is taken once.
    pub fn take(&mut self, name: &str, addr: Option<&Listen>) -> Option<ListenSocket> {
        let at = self
            .sockets
            .iter()
            .position(|(n, _, _)| n == name)
            .or_else(|| {
                self.sockets
                    .iter()
                    .position(|(_, _, a)| a.is_some() && a.as_ref() == addr)
            })?;
        Some(self.sockets.remove(at).1)
    }

    /// The sockets no service took, as `name (address)`.
    pub fn leftover(&self) -> Vec<String> {
        self.sockets
            .iter()
            .map(|(name, _, addr)| match addr {
                Some(a) => format!("{name} ({a})"),
                None => name.clone(),
            })
            .collect()
    }
}

/// An error unless `fd` is a listening stream socket, TCP/IP or Unix-domain; its domain.
fn check_listening_stream(fd: RawFd) -> Result<libc::c_int, String> {
    let get = |option| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one c_int into `value`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    };
    if get(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a stream socket".into());
    }
    let domain = get(libc::SO_DOMAIN)?;
    if !matches!(domain, libc::AF_INET | libc::AF_INET6 | libc::AF_UNIX) {
        return Err("neither a TCP/IP nor a Unix-domain socket".into());
    }
    if get(libc::SO_ACCEPTCONN)? != 1 {
        return Err("not a listening socket".into());
    }
    Ok(domain)
}
