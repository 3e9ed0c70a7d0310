//! TLS on any service: rustls over the owned-buffer [`Conn`](crate::Conn), run by the
//! framework so no plugin knows about it.
//!
//! - [`conn`]: [`TlsConn`], a TLS session over any connection that is itself a connection
//!   (server side for services, client side for tests and tools).
//! - [`accept`]: [`Tls`], the [`Service`](crate::Service) adapter a TLS service's plugin is
//!   wrapped in: bounded and timed handshakes, their metrics, the client identity and
//!   `allow_identities`.
//! - [`identity`]: which name a verified client certificate gives its connection.
//! - [`files`]: reading and checking a service's certificate, key and client CA files into a
//!   rustls server config (what `wharf check` and every reload run).
//!
//! The binary wraps each TLS service's plugin in [`Tls`] per service generation
//! (`src/registry.rs`, `src/server/running.rs`), so a reload with new files serves new
//! connections with the new certificate while open ones keep theirs. Metrics names live in
//! [`crate::metrics`]; the in-memory pipe speaks TLS through [`crate::testing::spawn_tls`] and
//! [`crate::testing::tls_connect`].

pub mod accept;
pub mod conn;
pub mod files;
pub mod identity;
#[cfg(test)]
mod tests;

pub use accept::{Tls, TlsSettings};
pub use conn::{TlsConn, TlsError};
