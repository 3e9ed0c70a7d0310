//! Per-service admission: what a service generation shares across its workers.
//!
//! A [`ServiceGate`] is shared by all workers of one service. It applies the framework-level
//! limits every plugin gets, counts the outcome, and hands out a [`Ticket`] that keeps the
//! connection counted as active until it is dropped. Admission has two steps, because behind a
//! load balancer the client's address is known only once its PROXY header is read:
//! [`ServiceGate::admit`] at accept, on the connected peer (trusted proxy or `allow_from`, or
//! a Unix peer's credentials against `allow_uids`/`allow_gids`; `max_connection_rate`,
//! `max_connections`), then [`Ticket::admit_client`] on the client's address (`allow_from`
//! behind a proxy, the per-source limits of [`crate::sources`]; a Unix client has no source
//! address, so per-source limits do not apply to it).
//! Without PROXY protocol both run at accept, before any task is spawned. It also owns the generation's metric handles ([`crate::metrics`]), blocking
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
use crate::peer::{Peer, PeerCredentials};
use crate::proxy::ProxySettings;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};
use crate::sources::{SourceHold, SourceLimits};
use crate::udp::DatagramLimits;

/// Why a connection was refused; the value of the `reason` label. The order is that of
/// [`rejected::ADMISSION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Rejection {
    /// The client is outside `allow_from`.
    NotAllowed,
    /// The service already has `max_connections` open.
    TooManyConnections,
    /// PROXY protocol: an untrusted peer, or no valid header in time.
    ProxyProtocol,
    /// The client's source already has `max_connections_per_source` open.
    PerSource,
    /// The service is over `max_connection_rate`.
    Rate,
    /// The client's source is over `max_connection_rate_per_source`.
    RatePerSource,
    /// A Unix-domain peer outside `allow_uids` and `allow_gids`.
    Credentials,
}

impl Rejection {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        rejected::ADMISSION[self as usize]
    }
}

/// Admission control and metrics for one service, shared by all its workers.
pub struct ServiceGate {
    labels: ServiceLabels,
    allow_from: Vec<Cidr>,
    /// Unix-domain peers admitted by user and group ID (both empty: every peer).
    allow_uids: Vec<u32>,
    allow_gids: Vec<u32>,
    /// PROXY protocol: who may send a header, which versions, how fast.
    proxy: Option<ProxySettings>,
    max_connections: usize,
    /// Per-source and rate limits, shared across generations like `open`.
    sources: Arc<SourceLimits>,
    idle_timeout: Option<Duration>,
    /// Open connections across all workers and generations, for `max_connections`.
    open: Arc<AtomicUsize>,
    /// Pulled when this generation is retired (reload or shutdown): its connections drain.
    retire: ShutdownTrigger,
    metrics: Arc<ServiceMetrics>,
    /// Blocking-pool jobs of this service, bounded by `max_blocking`.
    blocking: BlockingBudget,
    /// A UDP service's datagram limits and series ([`crate::udp`]); `None` for streams.
    datagrams: Option<DatagramLimits>,
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
        let datagrams = (!config.listen.is_stream()).then(|| {
            let previous = previous.and_then(|p| p.datagrams.as_ref());
            DatagramLimits::new(&labels, config, previous)
        });
        Arc::new(ServiceGate {
            labels,
            allow_from: config.allow_from.clone(),
            allow_uids: config.allow_uids.clone(),
            allow_gids: config.allow_gids.clone(),
            proxy: ProxySettings::of(config),
            max_connections: config.max_connections,
            sources: SourceLimits::new(config, previous.map(|p| &p.sources)),
            idle_timeout: Some(config.idle_timeout).filter(|d| !d.is_zero()),
            open: previous.map_or_else(Default::default, |p| Arc::clone(&p.open)),
            retire: shutdown::channel().0,
            metrics,
            blocking,
            datagrams,
        })
    }

    /// A UDP service's datagram limits; `None` for a stream service.
    pub fn datagrams(&self) -> Option<&DatagramLimits> {
        self.datagrams.as_ref()
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

    /// The PROXY protocol settings, when the service takes a header on each connection.
    pub fn proxy(&self) -> Option<&ProxySettings> {
        self.proxy.as_ref()
    }

    /// Admission, first step, at accept: whether a connection from the connected `peer` may
    /// be held open at all. Checks, in order: a TCP peer is a trusted proxy (PROXY protocol
    /// on) or inside `allow_from` (off), a Unix peer's credentials are allowed (and it may
    /// then send a PROXY header: the socket's permissions and `allow_uids` say who can
    /// connect); then `max_connection_rate`, `max_connections`. The ticket counts the
    /// connection as open; [`Ticket::admit_client`] is the second step, once the client is
    /// known.
    pub fn admit(self: &Arc<Self>, peer: &Peer) -> Result<Ticket, Rejection> {
        let result = self.check_peer(peer).and_then(|()| {
            self.sources.admit_service()?;
            self.open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_connections).then_some(n + 1)
                })
                .map_err(|_| Rejection::TooManyConnections)
        });
        match result {
            Err(r) => {
                self.metrics.record_rejection(r);
                Err(r)
            }
            Ok(_) => {
                self.metrics.active.increment(1.0);
                Ok(Ticket {
                    gate: Arc::clone(self),
                    opened: Instant::now(),
                    source: None,
                    admitted: false,
                })
            }
        }
    }

    fn check_peer(&self, peer: &Peer) -> Result<(), Rejection> {
        let peer = match peer {
            Peer::Ip(addr) => addr.ip(),
            Peer::Unix(credentials) => return self.check_credentials(credentials),
        };
        match &self.proxy {
            Some(proxy) if !proxy.trusts(peer) => Err(Rejection::ProxyProtocol),
            Some(_) => Ok(()),
            None => self.check_allowed(peer),
        }
    }

    /// `allow_uids`/`allow_gids`: a peer whose uid is in one or whose gid is in the other
    /// passes; with both empty, every peer does.
    fn check_credentials(&self, peer: &PeerCredentials) -> Result<(), Rejection> {
        let open = self.allow_uids.is_empty() && self.allow_gids.is_empty();
        if open || self.allow_uids.contains(&peer.uid) || self.allow_gids.contains(&peer.gid) {
            Ok(())
        } else {
            Err(Rejection::Credentials)
        }
    }

    pub(crate) fn check_allowed(&self, client: IpAddr) -> Result<(), Rejection> {
        if self.allow_from.is_empty() || self.allow_from.iter().any(|net| net.contains(client)) {
            Ok(())
        } else {
            Err(Rejection::NotAllowed)
        }
    }
}

/// Proof of admission: while it lives, its connection counts as open (and, once its client
/// is admitted, against its source's limits).
pub struct Ticket {
    gate: Arc<ServiceGate>,
    opened: Instant,
    /// The client's place in the per-source table, once admitted.
    source: Option<SourceHold>,
    /// Whether [`Ticket::admit_client`] passed.
    admitted: bool,
}

impl Ticket {
    /// The gate that admitted the connection.
    pub(crate) fn gate(&self) -> &ServiceGate {
        &self.gate
    }

    /// Admission, second step: whether `client` (the connected peer, or the address a PROXY
    /// header named) may be served. Checks `allow_from` (if the first step did not already,
    /// on the same address), `max_connection_rate_per_source` and
    /// `max_connections_per_source` (an IP client only: a Unix peer has no source address),
    /// then counts the connection as accepted. On `Err` the rejection is counted; drop the
    /// ticket.
    pub fn admit_client(&mut self, client: &Peer) -> Result<(), Rejection> {
        let gate = &self.gate;
        let result = match client.ip() {
            None => Ok(None),
            Some(ip) => match gate.proxy {
                Some(_) => gate.check_allowed(ip),
                None => Ok(()),
            }
            .and_then(|()| gate.sources.admit_source(ip)),
        };
        match result {
            Ok(hold) => {
                self.source = hold;
                self.admitted = true;
                gate.metrics.accepted.increment(1);
                Ok(())
            }
            Err(r) => {
                gate.sources.refund_service();
                gate.metrics.record_rejection(r);
                Err(r)
            }
        }
    }

    /// Refuses the connection for `reason` before its client was admitted (a bad PROXY
    /// header): counts it and closes the ticket.
    pub fn refuse(self, reason: Rejection) {
        self.gate.metrics.record_rejection(reason);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let m = &self.gate.metrics;
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        m.active.decrement(1.0);
        if self.admitted {
            m.duration.record(self.opened.elapsed().as_secs_f64());
        }
    }
}
