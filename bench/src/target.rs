//! What `wharf bench` loads: a TCP address, or a Unix-domain socket (`unix:/path`,
//! `unix:@name`, written as `wharf serve`'s `listen` writes them).

use std::fmt;
use std::net::SocketAddr;

use wharf_core::listen::{Listen, UnixName};

/// The server under load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain stream socket.
    Unix(UnixName),
}

/// A connected stream to a [`Target`].
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Target {
    /// Connects (with `TCP_NODELAY` on TCP).
    pub async fn connect(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Target::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                let _ = stream.set_nodelay(true);
                Stream::Tcp(stream)
            }
            Target::Unix(UnixName::Path(path)) => {
                Stream::Unix(tokio::net::UnixStream::connect(path).await?)
            }
            Target::Unix(UnixName::Abstract(name)) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                let stream = std::os::unix::net::UnixStream::connect_addr(&addr)?;
                stream.set_nonblocking(true)?;
                Stream::Unix(tokio::net::UnixStream::from_std(stream)?)
            }
        })
    }

    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Target::Tcp(addr) => Some(*addr),
            Target::Unix(_) => None,
        }
    }

    /// The processes listening there (for the server CPU figures).
    pub fn listening_pids(&self) -> Vec<u32> {
        match self {
            Target::Tcp(addr) => crate::procstat::listening_pids(*addr),
            Target::Unix(name) => crate::procstat::unix_listening_pids(&name.to_string()),
        }
    }

    /// A `unix:` address, parsed; `None` when `addr` is not one.
    pub fn parse_unix(addr: &str) -> Option<Result<Target, String>> {
        addr.starts_with("unix:")
            .then(|| match addr.parse::<Listen>()? {
                Listen::Unix(name) => Ok(Target::Unix(name)),
                _ => Err(format!("{addr}: not a Unix socket address")),
            })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => write!(f, "{addr}"),
            Target::Unix(name) => write!(f, "unix:{name}"),
        }
    }
}
