//! Where a service takes its clients: a `listen` address of one of three kinds.
//!
//! A service listens on a TCP address (`127.0.0.1:7000`, `[::1]:7000`, or `tcp:` before
//! either), a Unix-domain stream socket (`unix:/run/wharf/echo.sock`, or `unix:@name` in
//! Linux's abstract namespace) or a UDP address (`udp:127.0.0.1:6969`). The kind decides the
//! transport: stream plugins serve TCP and Unix connections alike through
//! [`Conn`](crate::Conn); UDP services answer datagrams.
//!
//! The written form round-trips ([`Listen`]'s `Display` and `FromStr` agree), so configs,
//! logs, `wharf check` and the reload diff all name an address the same way.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A service's `listen` address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Listen {
    /// A TCP address (`IP:port`; port 0 picks a free port).
    Tcp(SocketAddr),
    /// A Unix-domain stream socket.
    Unix(UnixName),
    /// A UDP address (`udp:IP:port`).
    Udp(SocketAddr),
}

/// The name of a Unix-domain socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UnixName {
    /// A file in the file system (`unix:/run/wharf/x.sock`).
    Path(PathBuf),
    /// A name in Linux's abstract namespace (`unix:@name`): no file, gone with the socket.
    Abstract(String),
}

/// What every `listen` parse error says is accepted.
pub const LISTEN_FORMS: &str = "expected an IP address with port, like \"127.0.0.1:7000\", or \
     unix:/path/to.sock, unix:@name, udp:IP:port";

/// Longest Unix socket path (`sun_path` holds 108 bytes, the last one a NUL).
pub const MAX_UNIX_PATH: usize = 107;

impl Listen {
    /// The IP socket address of a TCP or UDP listener; `None` for Unix.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Listen::Tcp(a) | Listen::Udp(a) => Some(*a),
            Listen::Unix(_) => None,
        }
    }

    /// Whether the operating system picks the port when it binds (TCP or UDP port 0): such an
    /// address names no particular socket until then.
    pub fn is_ephemeral(&self) -> bool {
        self.socket_addr().is_some_and(|a| a.port() == 0)
    }

    /// Whether only this machine can reach it: a loopback IP, or any Unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Tcp(a) | Listen::Udp(a) => a.ip().is_loopback(),
            Listen::Unix(_) => true,
        }
    }

    /// Whether clients connect (TCP, Unix) rather than send datagrams (UDP).
    pub fn is_stream(&self) -> bool {
        !matches!(self, Listen::Udp(_))
    }
}

/// A bound socket one worker takes clients from, of the kind its [`Listen`] names (bound,
/// listening where that applies, and non-blocking).
#[derive(Debug)]
pub enum ListenSocket {
    /// A TCP listener (one per worker, `SO_REUSEPORT`).
    Tcp(std::net::TcpListener),
    /// A UDP socket (one per worker, `SO_REUSEPORT`).
    Udp(std::net::UdpSocket),
    /// A Unix-domain stream listener (every worker has a descriptor of the same socket).
    Unix(std::os::unix::net::UnixListener),
}

impl ListenSocket {
    /// The address it is bound to.
    pub fn local_listen(&self) -> std::io::Result<Listen> {
        match self {
            ListenSocket::Tcp(s) => s.local_addr().map(Listen::Tcp),
            ListenSocket::Udp(s) => s.local_addr().map(Listen::Udp),
            ListenSocket::Unix(s) => crate::unix::listen_of(&s.local_addr()?),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(name) => write!(f, "unix:{name}"),
            Listen::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

impl fmt::Display for UnixName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixName::Path(p) => write!(f, "{}", p.display()),
            UnixName::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let ip = |rest: &str| {
            rest.parse::<SocketAddr>()
                .map_err(|_| format!("{LISTEN_FORMS} (`{rest}` is not an IP address with port)"))
        };
        if let Some(rest) = s.strip_prefix("unix:") {
            return parse_unix(rest).map(Listen::Unix);
        }
        if let Some(rest) = s.strip_prefix("udp:") {
            return ip(rest).map(Listen::Udp);
        }
        let rest = s.strip_prefix("tcp:").unwrap_or(s);
        rest.parse::<SocketAddr>()
            .map(Listen::Tcp)
            .map_err(|_| LISTEN_FORMS.to_string())
    }
}

fn parse_unix(rest: &str) -> Result<UnixName, String> {
    if let Some(name) = rest.strip_prefix('@') {
        if name.is_empty() {
            return Err("`unix:@` needs a name after the `@`".into());
        }
        if name.contains('\0') || name.len() > MAX_UNIX_PATH - 1 {
            return Err(format!(
                "an abstract socket name is at most {} bytes and has no NUL",
                MAX_UNIX_PATH - 1
            ));
        }
        return Ok(UnixName::Abstract(name.to_string()));
    }
    if rest.is_empty() {
        return Err("`unix:` needs a socket path (unix:/run/wharf/x.sock) or @name".into());
    }
    if rest.contains('\0') {
        return Err("a socket path has no NUL byte".into());
    }
    if rest.len() > MAX_UNIX_PATH {
        return Err(format!(
            "a Unix socket path is at most {MAX_UNIX_PATH} bytes (this one is {})",
            rest.len()
        ));
    }
    if rest.ends_with('/') {
        return Err("a socket path names a file, not a directory".into());
    }
    Ok(UnixName::Path(PathBuf::from(rest)))
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_parses_and_prints_back() {
        for text in [
            "127.0.0.1:7000",
            "[::1]:0",
            "unix:/run/wharf/echo.sock",
            "unix:relative.sock",
            "unix:@wharf-echo",
            "udp:127.0.0.1:6969",
            "udp:[::1]:6969",
        ] {
            let listen: Listen = text.parse().unwrap();
            assert_eq!(listen.to_string(), text);
        }
        assert_eq!(
            "tcp:127.0.0.1:1".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:1".parse().unwrap())
        );
    }

    #[test]
    fn kinds_answer_what_callers_ask() {
        let tcp: Listen = "127.0.0.1:0".parse().unwrap();
        assert!(tcp.is_ephemeral() && tcp.is_local() && tcp.is_stream());
        let udp: Listen = "udp:0.0.0.0:53".parse().unwrap();
        assert!(!udp.is_ephemeral() && !udp.is_local() && !udp.is_stream());
        let unix: Listen = "unix:@x".parse().unwrap();
        assert!(unix.is_local() && unix.is_stream() && !unix.is_ephemeral());
        assert_eq!(unix.socket_addr(), None);
    }

    #[test]
    fn bad_addresses_say_what_is_accepted() {
        for (text, expect) in [
            ("nowhere", LISTEN_FORMS),
            ("udp:nowhere", "`nowhere` is not an IP address with port"),
            ("unix:", "needs a socket path"),
            ("unix:@", "needs a name"),
            ("unix:/tmp/", "names a file"),
            ("unix:/a\0b", "no NUL"),
        ] {
            let err = text.parse::<Listen>().unwrap_err();
            assert!(err.contains(expect), "{text}: {err}");
        }
        let long = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH));
        assert!(long
            .parse::<Listen>()
            .unwrap_err()
            .contains("at most 107 bytes"));
    }
}
