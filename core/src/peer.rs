//! Who is at the other end of a connection: an IP address, or a local process on a Unix socket.
//!
//! A TCP client is known by its address. A Unix-domain client has no address worth the name
//! (an unbound client socket has none at all); what the kernel does know is the process that
//! connected, as `SO_PEERCRED` reports it at accept: its user, group and process IDs. That is
//! what [`Peer::Unix`] carries, what `allow_uids`/`allow_gids` check, what the access log
//! writes (`client=unix uid=... gid=... pid=...`) and what the process plugin hands a program
//! (UCSPI's `UNIXREMOTEUID`, `UNIXREMOTEGID`, `UNIXREMOTEPID`).
//!
//! Behind a load balancer speaking the PROXY protocol over a Unix socket, the client is the IP
//! address its header names and the Unix peer is the balancer
//! ([`Context::proxy`](crate::Context::proxy)).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client (or the client a PROXY header named).
    Ip(SocketAddr),
    /// A process connected to a Unix-domain socket.
    Unix(PeerCredentials),
}

/// A Unix-domain peer's credentials, as the kernel recorded them when it connected
/// (`SO_PEERCRED`): its effective user and group IDs and its process ID. The group is the
/// primary (effective) one only, not the supplementary groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Effective user ID.
    pub uid: u32,
    /// Effective group ID.
    pub gid: u32,
    /// Process ID; `None` when the process lives in a PID namespace this one cannot see into.
    pub pid: Option<u32>,
}

impl Peer {
    /// The IP socket address, for an IP peer.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Peer::Ip(addr) => Some(*addr),
            Peer::Unix(_) => None,
        }
    }

    /// The IP address, for an IP peer.
    pub fn ip(&self) -> Option<IpAddr> {
        self.socket_addr().map(|a| a.ip())
    }

    /// The credentials, for a Unix peer.
    pub fn credentials(&self) -> Option<PeerCredentials> {
        match self {
            Peer::Ip(_) => None,
            Peer::Unix(credentials) => Some(*credentials),
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        Peer::Ip(addr)
    }
}

/// `ip:port`, or `unix(uid=1000,gid=1000,pid=42)` (`pid=?` when it is not visible).
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Ip(addr) => write!(f, "{addr}"),
            Peer::Unix(c) => write!(f, "unix({c})"),
        }
    }
}

impl fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={},gid={},pid=", self.uid, self.gid)?;
        match self.pid {
            Some(pid) => write!(f, "{pid}"),
            None => f.write_str("?"),
        }
    }
}

/// The credentials of the process connected to the Unix socket `fd` (`SO_PEERCRED`).
pub fn peer_credentials(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<PeerCredentials> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        uid: cred.uid,
        gid: cred.gid,
        // 0: the peer is in a PID namespace we cannot see (or it has no process any more).
        pid: u32::try_from(cred.pid).ok().filter(|&p| p != 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_unix_peer_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = peer_credentials(a.as_fd()).unwrap();
        // SAFETY: no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((c.uid, c.gid, c.pid), (uid, gid, Some(std::process::id())));
        assert_eq!(
            Peer::Unix(c).to_string(),
            format!("unix(uid={uid},gid={gid},pid={})", std::process::id())
        );
        assert_eq!(Peer::Unix(c).ip(), None);
    }
}
