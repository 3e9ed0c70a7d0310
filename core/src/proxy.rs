//! PROXY protocol (HAProxy's v1 text and v2 binary headers): behind a load balancer, the
//! client's real address.
//!
//! SEAM (to be written): parsing, the read with its deadline, and the tests. What the rest of
//! the framework relies on is fixed here: [`ProxySettings`] (built from the service config,
//! consulted by [`crate::gate`] at accept) and [`read_header`] (run by the worker inside the
//! connection's task, before admission's second step and before TLS).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{ProxyProtocol, ServiceConfig};
use crate::conn::Conn;
use crate::metered::Metered;
use crate::net::Cidr;

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

/// Reads the PROXY header a connection must start with, within `settings.timeout` of
/// `accepted`; bytes read past its end are handed back to `conn` ([`Metered::unread`]).
pub async fn read_header<C: Conn>(
    conn: &mut Metered<C>,
    settings: &ProxySettings,
    accepted: Instant,
) -> Result<Header, HeaderError> {
    let _ = (conn, settings, accepted);
    Err(HeaderError("PROXY protocol is not implemented yet".into()))
}
