//! Listening sockets and address rules.
//!
//! Every worker owns its own listening socket for each service, all bound to the same address
//! with `SO_REUSEPORT`, so the kernel spreads connections over workers and no accept is shared
//! across threads. Binding happens on the main thread before any worker starts, so an address in
//! use is a startup error, never a half-started server.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog for every service socket.
pub(crate) const BACKLOG: i32 = 1024;

/// Binds `count` listening sockets to `addr` with `SO_REUSEPORT`.
///
/// `SO_REUSEPORT` alone would let a second wharf (same user) silently share a port with the
/// first, so a given port is first probed with a plain exclusive bind: if anything holds it, the
/// bind fails with "address in use" as a user expects. A port of 0 is not probed: the first
/// socket binds it, and the kernel never hands an in-use port to an automatic bind, whereas a
/// probe's port, once released, could be picked by another process (two servers sharing one
/// port, each getting some of the other's connections).
pub fn bind_reuseport_group(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    bind_group(addr, count, new_socket)
}

/// Binds `count` UDP sockets to `addr` with `SO_REUSEPORT` (the kernel spreads datagrams over
/// them by source address and port), probing a given port first like
/// [`bind_reuseport_group`].
pub fn bind_reuseport_udp_group(addr: SocketAddr, count: usize) -> io::Result<Vec<UdpSocket>> {
    bind_group(addr, count, new_udp_socket)
}

/// The shared body of the two: probe, bind every socket to the port the first one got, listen
/// (streams), non-blocking.
fn bind_group<T: From<Socket>>(
    addr: SocketAddr,
    count: usize,
    new: fn(SocketAddr) -> io::Result<Socket>,
) -> io::Result<Vec<T>> {
    if addr.port() != 0 {
        let probe = new(addr)?;
        probe.bind(&addr.into())?;
    }
    let mut addr = addr;
    (0..count.max(1))
        .map(|_| {
            let socket = new(addr)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            // The first socket resolves port 0; the others join the port it got.
            addr = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
            if socket.r#type()? == Type::STREAM {
                socket.listen(BACKLOG)?;
            }
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })
        .collect()
}

fn new_udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    new_socket_of(addr, Type::DGRAM, Protocol::UDP)
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    new_socket_of(addr, Type::STREAM, Protocol::TCP)
}

fn new_socket_of(addr: SocketAddr, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))?;
    // TCP: rebinding past TIME_WAIT. On UDP, SO_REUSEADDR would let any other socket that
    // sets it share the port (and the exclusive probe would always pass): never there.
    if kind == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    if addr.is_ipv6() {
        // `[::]` means IPv6 only; dual-stack surprises nobody when it is explicit.
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// The client a peer address counts as, for limits kept per client (exec's auth failures, the
/// metrics endpoint's connections per peer, the per-source limits of [`crate::sources`]): an
/// IPv4 address (IPv4-mapped IPv6 too), or an IPv6 prefix, /64 unless configured otherwise
/// (what one host is usually given), so a host cannot dodge a limit by rotating addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address.
    V4(u32),
    /// An IPv6 address with the bits past its prefix cleared.
    V6(u128),
    /// A local user on a Unix-domain socket, by uid: every process of one user is one source.
    User(u32),
}

impl Source {
    /// The source `ip` counts as, IPv6 grouped by /64.
    pub fn of(ip: IpAddr) -> Source {
        Source::with_prefix_v6(ip, 64)
    }

    /// The source a peer counts as: its IP address's (IPv6 grouped by /64), or a Unix peer's
    /// user.
    pub fn of_peer(peer: &crate::peer::Peer) -> Source {
        match peer {
            crate::peer::Peer::Ip(addr) => Source::of(addr.ip()),
            crate::peer::Peer::Unix(credentials) => Source::User(credentials.uid),
        }
    }

    /// The source `ip` counts as, IPv6 grouped by its first `prefix_v6` bits (0 groups every
    /// IPv6 address into one source; 128 or more keeps each apart).
    pub fn with_prefix_v6(ip: IpAddr, prefix_v6: u8) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => {
                    let mask = u128::MAX
                        .checked_shl(128 - u32::from(prefix_v6.min(128)))
                        .unwrap_or(0);
                    Source::V6(u128::from(v6) & mask)
                }
            },
        }
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`); a bare address means one host.
///
/// IPv4 rules also match IPv4-mapped IPv6 peers (`::ffff:10.1.2.3`), which is how an IPv4 client
/// appears on a dual-stack socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_match(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_match(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn prefix_match(net: u128, ip: u128, prefix: u8, bits: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = u32::from(bits - prefix);
    (net >> shift) == (ip >> shift)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}`: prefix length must be 0..={max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_matching() {
        let lan = cidr("10.0.0.0/8");
        assert!(lan.contains("10.200.3.4".parse().unwrap()));
        assert!(!lan.contains("11.0.0.1".parse().unwrap()));
        assert!(lan.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(cidr("127.0.0.1").contains("127.0.0.1".parse().unwrap()));
        assert!(!cidr("127.0.0.1").contains("127.0.0.2".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(cidr("::1").contains("::1".parse().unwrap()));
        assert!(!cidr("::1").contains("127.0.0.1".parse().unwrap()));
        assert!(cidr("fd00::/8").contains("fd12::1".parse().unwrap()));
        assert!(cidr("::/0").contains("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        let of = |s: &str| Source::of(s.parse().unwrap());
        assert_eq!(of("2001:db8:1:2::1"), of("2001:db8:1:2:ffff::9"));
        assert_ne!(of("2001:db8:1:2::1"), of("2001:db8:1:3::1"));
        assert_eq!(of("::ffff:127.0.0.1"), of("127.0.0.1"));
        assert_ne!(of("127.0.0.1"), of("127.0.0.2"));
        let with = |s: &str, bits| Source::with_prefix_v6(s.parse().unwrap(), bits);
        assert_eq!(with("2001:db8:1:2::1", 48), with("2001:db8:1:3::1", 48));
        assert_ne!(with("2001:db8:1:2::1", 48), with("2001:db8:2:2::1", 48));
        assert_ne!(with("2001:db8::1", 128), with("2001:db8::2", 128));
        assert_eq!(with("2001:db8::1", 0), with("fe80::1", 0));
        assert_eq!(with("::ffff:10.0.0.1", 8), with("10.0.0.1", 128));
        assert_eq!(with("2001:db8:1:2:3::", 64), of("2001:db8:1:2::"));
    }

    #[test]
    fn cidr_parse_errors() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
        assert!("::1/129".parse::<Cidr>().is_err());
        assert_eq!(cidr("10.1.0.0/16").to_string(), "10.1.0.0/16");
    }

    #[test]
    fn reuseport_group_shares_one_port_and_detects_conflicts() {
        let group = bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(group.iter().all(|l| l.local_addr().unwrap().port() == port));
        let again = bind_reuseport_group(group[0].local_addr().unwrap(), 1);
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn udp_reuseport_group_shares_one_port_and_detects_conflicts() {
        let group = bind_reuseport_udp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert!(group.iter().all(|s| s.local_addr().unwrap() == addr));
        let again = bind_reuseport_udp_group(addr, 1);
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AddrInUse);
    }
}
