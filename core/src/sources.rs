//! Per-source limits: `max_connections_per_source`, `max_connection_rate` and
//! `max_connection_rate_per_source`, in memory bounded whatever the number of sources.
//!
//! SEAM (to be written): the table, the token buckets and their tests. What the gate relies on
//! is fixed here: [`SourceLimits::admit_service`] at accept, [`SourceLimits::admit_source`]
//! once the client's address is known, and [`SourceHold`], which releases the client's open
//! connection when dropped.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::ServiceConfig;
use crate::gate::Rejection;

/// One service's per-source and rate limits, shared by its workers and generations.
pub struct SourceLimits {}

impl SourceLimits {
    /// The limits of `config`; `previous` is the generation this one replaces, whose counts
    /// carry over.
    pub fn new(config: &ServiceConfig, previous: Option<&Arc<SourceLimits>>) -> Arc<Self> {
        let _ = (config, previous);
        Arc::new(SourceLimits {})
    }

    /// At accept: whether the service is under `max_connection_rate` (taking a token).
    pub fn admit_service(&self) -> Result<(), Rejection> {
        Ok(())
    }

    /// Once the client is known: whether its source is under its rate and open-connection
    /// limits. `Some(hold)` keeps one connection counted against the source until dropped.
    pub fn admit_source(&self, client: IpAddr) -> Result<Option<SourceHold>, Rejection> {
        let _ = client;
        Ok(None)
    }
}

/// One open connection counted against its source.
pub struct SourceHold {}
