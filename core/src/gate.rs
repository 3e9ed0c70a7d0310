//! Per-service admission: what a service generation shares across its workers.
//!
//! A [`ServiceGate`] is shared by all workers of one service. At accept it applies the
//! framework-level limits every plugin gets (`allow_from`, `max_connections`), counts the
//! outcome, and hands out a [`Ticket`] that keeps the connection counted as active until it is
//! dropped. It also owns the generation's metric handles ([`crate::metrics`]), blocking
//! threads ([`crate::blocking`]) and drain signal, which the connection's
//! [`Context`](crate::Context) and [`Metered`](crate::metered::Metered) transport use.
//!
//! A gate is one *generation* of a service: a config reload that changes the service makes a
//! new gate for new connections and retires the old one, whose connections then finish under
//! the old settings (see [`crate::shutdown`]). The two share the open-connection count, so
//! `max_connections` still bounds the service as a whole.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::blocking::BlockingBudget;
use crate::config::ServiceConfig;
use crate::metrics::{rejected, ServiceLabels, ServiceMetrics};
use crate::net::Cidr;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};

/// Why a connection was closed at accept; the value of the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The peer is outside `allow_from`.
    NotAllowed,
    /// The service already has `max_connections` open.
    TooManyConnections,
}

impl Rejection {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::NotAllowed => rejected::NOT_ALLOWED,
            Rejection::TooManyConnections => rejected::TOO_MANY,
        }
    }
}

/// Admission control and metrics for one service, shared by all its workers.
pub struct ServiceGate {
    labels: ServiceLabels,
    allow_from: Vec<Cidr>,
    max_connections: usize,
    idle_timeout: Option<Duration>,
    /// Open connections across all workers and generations, for `max_connections`.
    open: Arc<AtomicUsize>,
    /// Pulled when this generation is retired (reload or shutdown): its connections drain.
    retire: ShutdownTrigger,
    metrics: Arc<ServiceMetrics>,
    /// Blocking-pool jobs of this service, bounded by `max_blocking`.
    blocking: BlockingBudget,
}

impl ServiceGate {
    /// Registers the service's metric handles and takes its limits from `config`.
    /// `outcomes` are the plugin's request outcomes ([`crate::Plugin::OUTCOMES`]).
    /// `previous` is the generation this one replaces, if any: its open connections keep
    /// counting against `max_connections`.
    pub fn new(
        labels: ServiceLabels,
        config: &ServiceConfig,
        outcomes: &'static [&'static str],
        previous: Option<&ServiceGate>,
    ) -> Arc<Self> {
        let metrics = Arc::new(ServiceMetrics::register(
            &labels,
            outcomes,
            config.tls.is_some(),
        ));
        let blocking =
            BlockingBudget::new(config.max_blocking, &labels, previous.map(|p| &p.blocking));
        Arc::new(ServiceGate {
            labels,
            allow_from: config.allow_from.clone(),
            max_connections: config.max_connections,
            idle_timeout: Some(config.idle_timeout).filter(|d| !d.is_zero()),
            open: previous.map_or_else(Default::default, |p| Arc::clone(&p.open)),
            retire: shutdown::channel().0,
            metrics,
            blocking,
        })
    }

    /// Retires this generation (a reload replaced or removed it): its connections finish what
    /// they are doing and end on their own, or by their idle timeout. No deadline.
    pub fn retire(&self) {
        self.retire.trigger_without_deadline();
    }

    /// Drains this generation with a deadline (shutdown): connections still open after `grace`
    /// are closed. An earlier deadline stands.
    pub fn drain_within(&self, grace: Duration) {
        self.retire.trigger(grace);
    }

    /// The drain signal of this generation, as its connections see it.
    pub fn retirement(&self) -> Shutdown {
        self.retire.subscribe()
    }

    /// The service's budget of concurrent blocking-pool jobs.
    pub fn blocking(&self) -> &BlockingBudget {
        &self.blocking
    }

    /// The service's config name.
    pub fn service(&self) -> &str {
        &self.labels.service
    }

    /// The generation's metric handles (shared with its connections' [`Metered`] transports).
    ///
    /// [`Metered`]: crate::metered::Metered
    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }

    /// The idle timeout of its connections (`None`: none).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// Decides whether a connection from `peer` may proceed.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Rejection> {
        let rejection = if !self.allow_from.is_empty()
            && !self.allow_from.iter().any(|net| net.contains(peer))
        {
            Some(Rejection::NotAllowed)
        } else if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .is_err()
        {
            Some(Rejection::TooManyConnections)
        } else {
            None
        };
        match rejection {
            Some(r) => {
                match r {
                    Rejection::NotAllowed => self.metrics.rejected_not_allowed.increment(1),
                    Rejection::TooManyConnections => self.metrics.rejected_too_many.increment(1),
                }
                Err(r)
            }
            None => {
                self.metrics.accepted.increment(1);
                self.metrics.active.increment(1.0);
                Ok(Ticket {
                    gate: Arc::clone(self),
                    opened: Instant::now(),
                })
            }
        }
    }
}

/// Proof of admission: while it lives, its connection counts as open.
pub struct Ticket {
    gate: Arc<ServiceGate>,
    opened: Instant,
}

impl Ticket {
    /// The gate that admitted the connection.
    pub(crate) fn gate(&self) -> &ServiceGate {
        &self.gate
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let m = &self.gate.metrics;
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        m.active.decrement(1.0);
        m.duration.record(self.opened.elapsed().as_secs_f64());
    }
}
