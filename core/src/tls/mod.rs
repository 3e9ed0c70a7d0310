//! TLS on any service: rustls over the owned-buffer [`Conn`](crate::Conn).
//!
//! - [`files`]: reading and checking a service's certificate, key and client CA files into a
//!   rustls server config (what `wharf check` and every reload run).

pub mod files;
