//! PROXY protocol (HAProxy's v1 text and v2 binary headers): behind a load balancer, the
//! client's real address.
//!
//! A load balancer in TCP mode (HAProxy `send-proxy`/`send-proxy-v2`, AWS NLB, nginx
//! `proxy_protocol on`) opens its own connection to wharf, so the TCP peer is the balancer. With
//! `proxy_protocol` on, it starts that connection with a header naming the client it accepted;
//! [`read_header`] reads and checks it, and the worker admits that client instead
//! ([`crate::gate`]: only `trusted_proxies` may send one). It runs inside the connection's
//! task, before admission's second step and before TLS.
//!
//! Two halves:
//!
//! - [`parse`]: a pure function over the bytes received so far: a header, "need more" (and
//!   how many at least), or a terminal error. The framing (where a header ends, the size
//!   bounds, which versions a service takes, refusing early what can no longer become a valid
//!   header) is ours; the contents of a complete header are parsed by the `ppp` crate (the
//!   Rust PROXY protocol parser most projects use: both versions, no `unsafe`, bounds-checked
//!   slicing, no panic on hostile input, which our fuzz target `proxy_header` keeps checking).
//!   We hand `ppp` only complete, bounded headers, so its own heuristics for partial input
//!   never decide anything.
//! - [`read_header`]: reads with owned buffers through the connection's
//!   [`Metered`] transport until [`parse`] is done, within `proxy_header_timeout` of accept
//!   (one deadline for the whole header, not per read: a peer trickling a byte a second does
//!   not get more time), and hands what it read past the header back to the connection
//!   (`Metered::unread`), so the plugin (or TLS) sees the client's first bytes intact. A
//!   header normally arrives in one segment: one read, into a buffer sized for a v1 header or a
//!   v2 header with a few TLVs, grown once to a v2 header's announced length if that is more.
//!
//! Bounds: a v1 header is at most 107 bytes (the spec's own bound); a v2 header may announce up
//! to 64 KiB of addresses and TLVs, and we refuse more than [`MAX_V2_PAYLOAD`] as soon as its
//! length field arrives, without reading the rest.
//!
//! v2 TLVs are walked (each must fit inside the header, or the header is refused) and ignored.
//! Worth using one day: `PP2_TYPE_UNIQUE_ID` (0x05, HAProxy's `unique-id`) would let an
//! access-log line be matched with the balancer's own log line. Deliberately not used:
//! `PP2_TYPE_SSL` (0x20) and its client-certificate fields describe TLS the *balancer*
//! terminated; wharf's identities (`allow_identities`) come only from TLS it verifies itself,
//! so a balancer misconfiguration cannot grant one. `PP2_TYPE_AUTHORITY` (SNI), `ALPN` and
//! `NETNS` describe the balancer's side; `CRC32C` guards bytes TCP already checksums (the spec
//! makes checking it optional).
//!
//! Which header means what: v1 `TCP4`/`TCP6` and v2 `PROXY` over `AF_INET`/`AF_INET6` +
//! `STREAM` name a client ([`Header::Proxied`]). v2 `LOCAL` (HAProxy's health checks), v1
//! `UNKNOWN`, and v2 `PROXY` with `AF_UNSPEC` (the spec's "unknown protocol", v1 `UNKNOWN`'s
//! twin) mean the connection is the proxy's own: it is served as the proxy's address
//! ([`Header::Local`]). `DGRAM` (UDP) and `AF_UNIX` are refused: wharf serves TCP clients, and
//! a Unix socket path is no address `allow_from` could match.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2::{Command, Protocol};
use tokio::time::Instant;

use crate::config::{ProxyProtocol, ServiceConfig};
use crate::conn::Conn;
use crate::metered::Metered;
use crate::net::Cidr;

/// Longest v1 header, `PROXY` to `\r\n` (the spec's bound: a TCP6 header with the longest
/// addresses and ports).
pub const MAX_V1_HEADER: usize = 107;

/// Most bytes of addresses and TLVs a v2 header may carry (its length field); longer headers
/// are refused as oversized. HAProxy's largest (IPv6 addresses plus every TLV it can send:
/// SSL with certificate CN, cipher and algorithms, authority, unique ID, CRC) stays under
/// 600 bytes; AWS and GCP balancers send one short TLV. The field allows 64 KiB, which no
/// connection needs to make us buffer.
pub const MAX_V2_PAYLOAD: usize = 1024;

/// The v2 header's fixed part: signature, version and command, family and protocol, length.
const V2_FIXED: usize = 16;

/// Longest v2 header accepted.
pub const MAX_V2_HEADER: usize = V2_FIXED + MAX_V2_PAYLOAD;

/// How a v2 header starts.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// How a v1 header starts.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// The first read's buffer: a whole v1 header, or a v2 header with IPv6 addresses and a few
/// TLVs, fits; more is read (once) only when a v2 header announces more.
const FIRST_READ: usize = 256;

/// A service's PROXY protocol settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Which header versions are accepted.
    pub versions: ProxyProtocol,
    /// Peers allowed to send a header.
    pub trusted: Vec<Cidr>,
    /// From accept to the end of the header.
    pub timeout: Duration,
}

impl ProxySettings {
    /// The settings of `config`, or `None` when its `proxy_protocol` is off.
    pub(crate) fn of(config: &ServiceConfig) -> Option<Self> {
        config.proxy_protocol.map(|versions| ProxySettings {
            versions,
            trusted: config.trusted_proxies.clone(),
            timeout: config.proxy_header_timeout,
        })
    }

    /// Whether `peer` may send a header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(peer))
    }
}

/// What a valid header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection (`TCP4`/`TCP6`, v2 `PROXY`): the client's address, and the address
    /// it connected to on the proxy.
    Proxied {
        /// The client, as the proxy saw it.
        client: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// The proxy's own connection (v2 `LOCAL`, v1 `UNKNOWN`): a health check.
    Local,
}

/// Why a header was refused (logged at debug; counted as `reason="proxy_protocol"`).
#[derive(Debug)]
pub struct HeaderError(pub String);

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl HeaderError {
    fn new(message: impl Into<String>) -> Self {
        HeaderError(message.into())
    }
}

/// What [`parse`] made of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header, the first `len` bytes of the input; the rest is the client's.
    Header {
        /// What it said.
        header: Header,
        /// Its length in bytes.
        len: usize,
    },
    /// Valid so far, but not finished: at least `total` bytes in all are needed (more than
    /// were given, at most [`MAX_V2_HEADER`]).
    NeedMore {
        /// The fewest bytes the whole header can have, given what arrived.
        total: usize,
    },
}

/// Parses the PROXY header at the start of `input` (everything received so far), accepting
/// the `versions` a service takes. An error is final: no further bytes can make the header
/// valid.
pub fn parse(input: &[u8], versions: ProxyProtocol) -> Result<Parsed, HeaderError> {
    let Some(&first) = input.first() else {
        return Ok(Parsed::NeedMore { total: 1 });
    };
    // The first byte tells the versions apart (`\r` against `P`).
    let (v2, prefix) = match first {
        b'\r' => (true, &V2_SIGNATURE[..]),
        _ => (false, &V1_PREFIX[..]),
    };
    let seen = input.len().min(prefix.len());
    if input[..seen] != prefix[..seen] {
        return Err(HeaderError::new("not a PROXY protocol header"));
    }
    match (v2, versions) {
        (true, ProxyProtocol::V1) => Err(HeaderError::new(
            "a v2 (binary) header, but this service takes v1 only",
        )),
        (false, ProxyProtocol::V2) => Err(HeaderError::new(
            "a v1 (text) header, but this service takes v2 only",
        )),
        (true, _) => parse_v2(input),
        (false, _) => parse_v1(input),
    }
}

/// A v1 header: one line of at most [`MAX_V1_HEADER`] bytes ending in `\r\n`.
fn parse_v1(input: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &input[..input.len().min(MAX_V1_HEADER)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if input.len() >= MAX_V1_HEADER {
            Err(HeaderError::new(format!(
                "v1 header: no \\r\\n within {MAX_V1_HEADER} bytes"
            )))
        } else {
            Ok(Parsed::NeedMore {
                total: input.len() + 1,
            })
        };
    };
    let len = cr + 2;
    if len > MAX_V1_HEADER {
        return Err(HeaderError::new(format!(
            "v1 header: longer than {MAX_V1_HEADER} bytes"
        )));
    }
    match input.get(cr + 1) {
        None => return Ok(Parsed::NeedMore { total: len }),
        Some(b'\n') => {}
        Some(_) => return Err(HeaderError::new("v1 header: \\r not followed by \\n")),
    }
    let parsed = ppp::v1::Header::try_from(&input[..len])
        .map_err(|e| HeaderError::new(format!("v1 header: {}", without_period(&e))))?;
    let header = match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => Header::Proxied {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        ppp::v1::Addresses::Tcp6(a) => Header::Proxied {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        ppp::v1::Addresses::Unknown => Header::Local,
    };
    Ok(Parsed::Header { header, len })
}

/// A v2 header: the 16-byte fixed part, then as many bytes of addresses and TLVs as its
/// length field says (at most [`MAX_V2_PAYLOAD`]).
fn parse_v2(input: &[u8]) -> Result<Parsed, HeaderError> {
    if input.len() < V2_FIXED {
        return Ok(Parsed::NeedMore { total: V2_FIXED });
    }
    let payload = usize::from(u16::from_be_bytes([input[14], input[15]]));
    if payload > MAX_V2_PAYLOAD {
        return Err(HeaderError::new(format!(
            "v2 header: {payload} bytes of addresses and TLVs, over the limit of \
             {MAX_V2_PAYLOAD}"
        )));
    }
    let len = V2_FIXED + payload;
    // Checks the fixed part now (version, command, family, protocol, room for the
    // addresses), so a bad header is refused before its body arrives.
    let complete = &input[..input.len().min(len)];
    let parsed = match ppp::v2::Header::try_from(complete) {
        Err(ppp::v2::ParseError::Partial(..)) => return Ok(Parsed::NeedMore { total: len }),
        Err(e) => {
            return Err(HeaderError::new(format!(
                "v2 header: {}",
                without_period(&e)
            )))
        }
        Ok(parsed) => parsed,
    };
    for tlv in parsed.tlvs() {
        tlv.map_err(|e| HeaderError::new(format!("v2 header TLVs: {}", without_period(&e))))?;
    }
    let header = match (parsed.command, parsed.addresses) {
        // A LOCAL header's addresses are to be ignored, whatever they are.
        (Command::Local, _) => Header::Local,
        (Command::Proxy, ppp::v2::Addresses::Unspecified) => Header::Local,
        (Command::Proxy, _) if parsed.protocol == Protocol::Datagram => {
            return Err(HeaderError::new(
                "v2 header: a UDP (DGRAM) connection; only TCP (STREAM) is served",
            ))
        }
        (Command::Proxy, _) if parsed.protocol != Protocol::Stream => {
            return Err(HeaderError::new(
                "v2 header: an IP family with an unspecified protocol; only TCP (STREAM) is \
                 served",
            ))
        }
        (Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Header::Proxied {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        (Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Header::Proxied {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        },
        (Command::Proxy, ppp::v2::Addresses::Unix(_)) => {
            return Err(HeaderError::new(
                "v2 header: AF_UNIX addresses; only IPv4 and IPv6 clients are served",
            ))
        }
    };
    Ok(Parsed::Header { header, len })
}

/// `ppp`'s messages are sentences; ours are clauses after a colon.
fn without_period(e: &impl fmt::Display) -> String {
    let text = e.to_string();
    text.strip_suffix('.').unwrap_or(&text).to_string()
}

/// Reads the PROXY header a connection must start with, within `settings.timeout` of
/// `accepted`; bytes read past its end are handed back to `conn` (`Metered::unread`).
///
/// The header's bytes count as received (`wharf_bytes_received_total`): they are on the wire.
pub async fn read_header<C: Conn>(
    conn: &mut Metered<C>,
    settings: &ProxySettings,
    accepted: Instant,
) -> Result<Header, HeaderError> {
    let read = read_until_parsed(conn, settings.versions);
    match tokio::time::timeout_at(accepted + settings.timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(HeaderError::new(format!(
            "no complete PROXY header within {:?} (proxy_header_timeout)",
            settings.timeout
        ))),
    }
}

/// Reads until [`parse`] has a header or an error; see [`read_header`].
async fn read_until_parsed<C: Conn>(
    conn: &mut Metered<C>,
    versions: ProxyProtocol,
) -> Result<Header, HeaderError> {
    let mut buf = Vec::with_capacity(FIRST_READ);
    loop {
        let total = match parse(&buf, versions)? {
            Parsed::Header { header, len } => {
                conn.unread(&buf[len..]);
                return Ok(header);
            }
            Parsed::NeedMore { total } => total,
        };
        // `total` is more than `buf.len()`: there is room for at least one byte.
        buf.reserve_exact(total.saturating_sub(buf.len()));
        let (res, returned) = conn.read(buf).await;
        buf = returned;
        match res {
            Ok(0) if buf.is_empty() => {
                return Err(HeaderError::new(
                    "connection closed before sending a PROXY header",
                ))
            }
            Ok(0) => {
                return Err(HeaderError::new(format!(
                    "connection closed after {} bytes of a PROXY header",
                    buf.len()
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(HeaderError::new(format!("reading the PROXY header: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::testing::{Client, MemConn};

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn settings(versions: ProxyProtocol) -> ProxySettings {
        ProxySettings {
            versions,
            trusted: vec!["127.0.0.1/32".parse().unwrap()],
            timeout: TIMEOUT,
        }
    }

    /// A metered pipe whose idle timeout is longer than the header's: the header deadline is
    /// what is tested.
    fn paused(test: impl AsyncFnOnce(Metered<MemConn>, Client)) {
        crate::metered::paused_pipe(Duration::from_secs(60), test);
    }

    /// Writes `bytes` (one write), then reads the header with `versions`.
    fn header_of(bytes: &[u8], versions: ProxyProtocol) -> Result<Header, HeaderError> {
        let mut out = None;
        paused(async |mut conn, client| {
            client.write_all(bytes).await.unwrap();
            client.close_write();
            out = Some(read_header(&mut conn, &settings(versions), Instant::now()).await);
        });
        out.unwrap()
    }

    fn v2(command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family_protocol);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    /// A v2 `PROXY` header over TCP/IPv4 from 192.0.2.7:51000 to 198.51.100.1:443, then `tlvs`.
    fn v2_tcp4(tlvs: &[u8]) -> Vec<u8> {
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1];
        body.extend_from_slice(&51000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    fn proxied(client: &str, destination: &str) -> Header {
        Header::Proxied {
            client: client.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    fn refused(bytes: &[u8], versions: ProxyProtocol, why: &str) {
        let err = header_of(bytes, versions).unwrap_err();
        assert!(err.0.contains(why), "want `{why}`, got `{err}`");
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let any = ProxyProtocol::Any;
        let h = header_of(b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n", any);
        assert_eq!(h.unwrap(), proxied("192.0.2.7:51000", "198.51.100.1:443"));
        let h = header_of(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n", any);
        assert_eq!(
            h.unwrap(),
            proxied("[2001:db8::7]:51000", "[2001:db8::1]:443")
        );
        assert_eq!(header_of(b"PROXY UNKNOWN\r\n", any).unwrap(), Header::Local);
        // UNKNOWN may carry addresses, which the receiver ignores.
        let h = header_of(b"PROXY UNKNOWN ::1 ::1 1 2\r\n", ProxyProtocol::V1);
        assert_eq!(h.unwrap(), Header::Local);
    }

    #[test]
    fn v1_of_the_longest_lengths() {
        let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {ip} {ip} 65535 65535\r\n");
        let h = header_of(line.as_bytes(), ProxyProtocol::V1).unwrap();
        let client = SocketAddr::from((ip.parse::<Ipv6Addr>().unwrap(), 65535));
        let destination = client;
        assert_eq!(
            h,
            Header::Proxied {
                client,
                destination
            }
        );
        // The spec's 107 bytes: UNKNOWN with the longest addresses.
        let line = format!("PROXY UNKNOWN {ip} {ip} 65535 65535\r\n");
        assert_eq!(line.len(), MAX_V1_HEADER);
        let h = header_of(line.as_bytes(), ProxyProtocol::V1).unwrap();
        assert_eq!(h, Header::Local);
    }

    #[test]
    fn v2_tcp4_tcp6_local_and_unspec() {
        let any = ProxyProtocol::Any;
        let h = header_of(&v2_tcp4(&[]), ProxyProtocol::V2).unwrap();
        assert_eq!(h, proxied("192.0.2.7:51000", "198.51.100.1:443"));
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&[0xC7, 0x38, 0x01, 0xBB]);
        let h = header_of(&v2(1, 0x21, &body), any).unwrap();
        assert_eq!(h, proxied("[2001:db8::7]:51000", "[::1]:443"));
        // LOCAL (HAProxy's health checks): no addresses, or addresses to ignore.
        assert_eq!(header_of(&v2(0, 0x00, &[]), any).unwrap(), Header::Local);
        let mut local = v2_tcp4(&[]);
        local[12] = 0x20;
        assert_eq!(header_of(&local, any).unwrap(), Header::Local);
        // PROXY over AF_UNSPEC: an unknown protocol, served as the proxy (v1 UNKNOWN's twin).
        assert_eq!(header_of(&v2(1, 0x00, &[]), any).unwrap(), Header::Local);
    }

    #[test]
    fn v2_tlvs_are_walked_and_ignored_but_must_fit() {
        // PP2_TYPE_ALPN "h2", PP2_TYPE_UNIQUE_ID of 4 bytes, a NOOP with no value.
        let tlvs = [1, 0, 2, b'h', b'2', 5, 0, 4, 1, 2, 3, 4, 4, 0, 0];
        let h = header_of(&v2_tcp4(&tlvs), ProxyProtocol::V2).unwrap();
        assert_eq!(h, proxied("192.0.2.7:51000", "198.51.100.1:443"));
        // A TLV announcing more bytes than the header has, and a stub too short for a TLV.
        refused(&v2_tcp4(&[5, 0, 9, 1]), ProxyProtocol::V2, "TLV");
        refused(&v2_tcp4(&[5, 0]), ProxyProtocol::V2, "TLV");
    }

    #[test]
    fn payload_in_the_same_write_as_the_header_comes_next_intact() {
        for header in [
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n".to_vec(),
            v2_tcp4(&[4, 0, 1, 0]),
        ] {
            paused(async |mut conn, client| {
                // More than one read's worth, so some of it is read with the header and some
                // is still in the pipe.
                let payload = (0..5000u32).map(|i| i as u8).collect::<Vec<_>>();
                let mut wire = header.clone();
                wire.extend_from_slice(&payload);
                client.write_all(&wire).await.unwrap();
                client.close_write();
                let settings = settings(ProxyProtocol::Any);
                let h = read_header(&mut conn, &settings, Instant::now()).await;
                assert_eq!(h.unwrap(), proxied("192.0.2.7:51000", "198.51.100.1:443"));
                let mut got = Vec::new();
                loop {
                    let (res, buf) = conn.read(Vec::with_capacity(1000)).await;
                    match res.unwrap() {
                        0 => break,
                        _ => got.extend_from_slice(&buf),
                    }
                }
                assert_eq!(got, payload);
            });
        }
    }

    #[test]
    fn a_header_split_over_many_writes_is_read_whole() {
        let mut tlvs = vec![0x05, 0x01, 0x00];
        tlvs.extend_from_slice(&[7u8; 256]); // a 256-byte unique ID: more than the first read
        for header in [
            b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n".to_vec(),
            v2_tcp4(&tlvs),
        ] {
            for chunk in [1, 2, 5, 13] {
                paused(async |mut conn, client| {
                    let mut wire = header.clone();
                    wire.extend_from_slice(b"after");
                    let writer = tokio::task::spawn_local(async move {
                        for piece in wire.chunks(chunk) {
                            client.write_all(piece).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        client
                    });
                    let settings = settings(ProxyProtocol::Any);
                    let h = read_header(&mut conn, &settings, Instant::now()).await;
                    assert!(
                        matches!(h, Ok(Header::Proxied { .. })),
                        "{h:?} in {chunk}-byte pieces"
                    );
                    let client = writer.await.unwrap();
                    client.close_write();
                    let mut got = Vec::new();
                    while let (Ok(n @ 1..), buf) = conn.read(Vec::with_capacity(64)).await {
                        got.extend_from_slice(&buf[..n]);
                    }
                    assert_eq!(got, b"after");
                });
            }
        }
    }

    #[test]
    fn a_header_arriving_whole_takes_one_read() {
        for header in [
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n".to_vec(),
            v2_tcp4(&[4, 0, 1, 0]),
        ] {
            paused(async |mut conn, client| {
                let mut wire = header.clone();
                wire.extend_from_slice(&[b'x'; 1000]);
                client.write_all(&wire).await.unwrap();
                let settings = settings(ProxyProtocol::Any);
                let h = read_header(&mut conn, &settings, Instant::now()).await;
                assert!(matches!(h, Ok(Header::Proxied { .. })), "{h:?}");
                // Exactly one read, of the first buffer's size, was taken from the pipe.
                assert_eq!(client.unread_by_service(), wire.len() - FIRST_READ);
            });
        }
    }

    #[test]
    fn malformed_v1_headers_are_refused() {
        let v1 = ProxyProtocol::V1;
        for (bytes, why) in [
            (
                &b"GET / HTTP/1.1\r\n\r\n"[..],
                "not a PROXY protocol header",
            ),
            (b"PROXY", "closed after 5 bytes"),
            (b"PROXY TCP4 192.0.2.7", "closed after"),
            (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not a PROXY"),
            (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "protocol"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "closed after"),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX",
                "\\r not followed by \\n",
            ),
            (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "v1 header:"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", "v1 header:"),
            (b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", "source"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "source"),
            (b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n", "source"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "port"),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "v1 header:"),
            (b"PROXY \xff\xfe 1.2.3.4 1.2.3.4 1 2\r\n", "v1 header:"),
        ] {
            refused(bytes, v1, why);
        }
    }

    #[test]
    fn a_v1_header_without_an_end_is_refused_at_107_bytes() {
        let mut line = b"PROXY TCP6 ".to_vec();
        line.resize(300, b'1');
        refused(&line, ProxyProtocol::V1, "no \\r\\n within 107 bytes");
        // One byte too long, ending properly.
        let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY UNKNOWN {ip}  {ip} 65535 65535\r\n");
        assert_eq!(line.len(), MAX_V1_HEADER + 1);
        refused(line.as_bytes(), ProxyProtocol::V1, "107");
    }

    #[test]
    fn malformed_v2_headers_are_refused() {
        let v2only = ProxyProtocol::V2;
        let good = v2_tcp4(&[]);
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            h
        };
        for (bytes, why) in [
            (with(3, b'X'), "not a PROXY protocol header"),
            (with(12, 0x11), "version"),
            (with(12, 0x31), "version"),
            (with(12, 0x22), "command"),
            (with(13, 0x41), "Address Family"),
            (with(13, 0x13), "protocol"),
            (with(13, 0x12), "UDP"),
            (with(13, 0x10), "unspecified protocol"),
            (v2(1, 0x31, &[0; 216]), "AF_UNIX"),
            (v2(1, 0x21, &[0; 12]), "address family"), // IPv6 needs 36 bytes
            (good[..20].to_vec(), "closed after 20 bytes"),
            (good[..9].to_vec(), "closed after 9 bytes"),
        ] {
            refused(&bytes, v2only, why);
        }
    }

    #[test]
    fn an_oversized_v2_header_is_refused_from_its_length_field() {
        // The largest accepted: one NOOP TLV filling the limit.
        let mut body = vec![4u8];
        body.extend_from_slice(&(MAX_V2_PAYLOAD as u16 - 3).to_be_bytes());
        body.resize(MAX_V2_PAYLOAD, 0);
        let h = header_of(&v2(0, 0x00, &body), ProxyProtocol::V2);
        assert_eq!(h.unwrap(), Header::Local);
        paused(async |mut conn, client| {
            // Only the fixed part is sent: the length field alone gets it refused, at once.
            let header = v2(0, 0x00, &vec![0u8; MAX_V2_PAYLOAD + 1]);
            client.write_all(&header[..V2_FIXED]).await.unwrap();
            let started = Instant::now();
            let settings = settings(ProxyProtocol::V2);
            let err = read_header(&mut conn, &settings, started)
                .await
                .unwrap_err();
            assert!(err.0.contains("over the limit of 1024"), "{err}");
            assert_eq!(started.elapsed(), Duration::ZERO);
        });
    }

    #[test]
    fn a_version_the_service_does_not_take_is_refused() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n";
        refused(
            v1,
            ProxyProtocol::V2,
            "a v1 (text) header, but this service takes v2 only",
        );
        refused(
            &v2_tcp4(&[]),
            ProxyProtocol::V1,
            "a v2 (binary) header, but this service takes v1 only",
        );
        // Decided from the first byte, before the rest arrives.
        assert!(parse(b"P", ProxyProtocol::V2).is_err());
        assert!(parse(b"\r", ProxyProtocol::V1).is_err());
    }

    #[test]
    fn no_header_at_all_is_refused_at_once() {
        paused(async |mut conn, client| {
            client.write_all(b"hello\n").await.unwrap();
            let started = Instant::now();
            let settings = settings(ProxyProtocol::Any);
            let err = read_header(&mut conn, &settings, started)
                .await
                .unwrap_err();
            assert_eq!(err.0, "not a PROXY protocol header");
            assert_eq!(started.elapsed(), Duration::ZERO);
        });
        refused(
            b"",
            ProxyProtocol::Any,
            "closed before sending a PROXY header",
        );
    }

    #[test]
    fn a_silent_peer_times_out_at_the_deadline_from_accept() {
        paused(async |mut conn, _client| {
            // Accepted two seconds ago: three are left.
            let accepted = Instant::now() - Duration::from_secs(2);
            let settings = settings(ProxyProtocol::Any);
            let err = read_header(&mut conn, &settings, accepted)
                .await
                .unwrap_err();
            assert!(
                err.0.contains("no complete PROXY header within 5s"),
                "{err}"
            );
            assert_eq!(accepted.elapsed(), TIMEOUT);
        });
    }

    #[test]
    fn a_slow_peer_making_progress_still_times_out_at_the_deadline() {
        paused(async |mut conn, client| {
            let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n";
            let _writer = tokio::task::spawn_local(async move {
                // A byte every 200 ms: 9 s for the header, each read making progress.
                for b in header {
                    client.write_all(&[*b]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                client
            });
            let accepted = Instant::now();
            let settings = settings(ProxyProtocol::Any);
            let err = read_header(&mut conn, &settings, accepted)
                .await
                .unwrap_err();
            assert!(err.0.contains("within 5s"), "{err}");
            assert_eq!(accepted.elapsed(), TIMEOUT);
        });
    }

    #[test]
    fn header_bytes_are_not_handed_back_and_the_rest_is() {
        // A v1 header followed by what looks like another header: the second is payload.
        let mut wire = b"PROXY UNKNOWN\r\n".to_vec();
        wire.extend_from_slice(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n");
        paused(async |mut conn, client| {
            client.write_all(&wire).await.unwrap();
            client.close_write();
            let settings = settings(ProxyProtocol::V1);
            let h = read_header(&mut conn, &settings, Instant::now()).await;
            assert_eq!(h.unwrap(), Header::Local);
            let (res, buf) = conn.read(Vec::with_capacity(100)).await;
            assert_eq!(res.unwrap(), wire.len() - 15);
            assert_eq!(&buf[..], &wire[15..]);
        });
    }

    #[test]
    fn parse_needs_more_until_the_last_byte_and_never_asks_past_the_bounds() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n".to_vec();
        let v2 = v2_tcp4(&[4, 0, 3, 1, 2, 3]);
        for wire in [v1, v2] {
            for end in 0..wire.len() {
                match parse(&wire[..end], ProxyProtocol::Any) {
                    Ok(Parsed::NeedMore { total }) => {
                        assert!(total > end && total <= wire.len(), "{end}: {total}")
                    }
                    other => panic!("{end} bytes: {other:?}"),
                }
            }
            let done = parse(&wire, ProxyProtocol::Any).unwrap();
            assert!(matches!(done, Parsed::Header { len, .. } if len == wire.len()));
        }
        // A \r as the 107th byte: the line would be 108 bytes, refused without waiting.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_HEADER - 1, b'1');
        long.push(b'\r');
        assert!(parse(&long, ProxyProtocol::V1).is_err());
        let ipv4 = Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(
            proxied("192.0.2.7:51000", "198.51.100.1:443"),
            Header::Proxied {
                client: SocketAddr::from((ipv4, 51000)),
                destination: "198.51.100.1:443".parse().unwrap()
            }
        );
    }
}
