//! Per-service admission and the service's metric handles.
//!
//! A [`ServiceGate`] is shared by all workers of one service. At accept it applies the
//! framework-level limits every plugin gets (`allow_from`, `max_connections`), counts the
//! outcome, and hands out a [`Ticket`] that keeps the connection counted as active until it is
//! dropped. Metric handles are registered here once per service, so the data path never hashes
//! a metric key.
//!
//! A gate is one *generation* of a service: a config reload that changes the service makes a
//! new gate for new connections and retires the old one, whose connections then finish under
//! the old settings (see [`crate::shutdown`]). The two share the open-connection count, so
//! `max_connections` still bounds the service as a whole.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::blocking::BlockingBudget;
use crate::config::ServiceConfig;
use crate::conn::Conn;
use crate::metered::Metered;
use crate::net::Cidr;
use crate::shutdown::{self, Shutdown, ShutdownTrigger};

/// Metric names, in one place so docs, tests and dashboards agree.
pub mod names {
    /// Counter: bytes read from client sockets.
    pub const RECEIVED_BYTES: &str = "wharf_received_bytes_total";
    /// Counter: bytes written to client sockets.
    pub const SENT_BYTES: &str = "wharf_sent_bytes_total";
    /// Counter: connections admitted.
    pub const ACCEPTED: &str = "wharf_connections_accepted_total";
    /// Counter, label `reason`: connections closed at accept.
    pub const REJECTED: &str = "wharf_connections_rejected_total";
    /// Gauge: connections open now.
    pub const ACTIVE: &str = "wharf_connections_active";
    /// Histogram: connection lifetimes.
    pub const CONNECTION_DURATION: &str = "wharf_connection_duration_seconds";
    /// Gauge, label `version`: always 1.
    pub const BUILD_INFO: &str = "wharf_build_info";
    /// Counter, label `outcome`: finished requests (plugins with requests only).
    pub const REQUESTS: &str = "wharf_requests_total";
    /// Histogram: request latency (plugins with requests only).
    pub const REQUEST_DURATION: &str = "wharf_request_duration_seconds";
    /// Counter, label `result` (`success`, `invalid`, `failed`): config reloads.
    pub const CONFIG_RELOADS: &str = "wharf_config_reloads_total";
    /// Gauge: 1 if the last config reload (or the start) succeeded, 0 if it did not.
    pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "wharf_config_last_reload_successful";
    /// Gauge: blocking-pool jobs of a service running now (at most `max_blocking`).
    pub const BLOCKING_RUNNING: &str = "wharf_blocking_jobs_running";
    /// Counter: blocking-pool jobs that found the service's budget full and waited in line.
    pub const BLOCKING_QUEUED: &str = "wharf_blocking_jobs_queued_total";
    /// Histogram: time a blocking-pool job waited for a permit of its service's budget.
    pub const BLOCKING_QUEUE_DURATION: &str = "wharf_blocking_queue_duration_seconds";
}

/// Registers HELP text and units for the framework's metrics. Call once after installing a
/// recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        names::RECEIVED_BYTES,
        Unit::Bytes,
        "Bytes read from client sockets."
    );
    describe_counter!(
        names::SENT_BYTES,
        Unit::Bytes,
        "Bytes written to client sockets."
    );
    describe_counter!(names::ACCEPTED, "Connections admitted to a service.");
    describe_counter!(names::REJECTED, "Connections closed at accept, by reason.");
    describe_gauge!(names::ACTIVE, "Connections currently open.");
    describe_histogram!(
        names::CONNECTION_DURATION,
        Unit::Seconds,
        "How long connections stayed open."
    );
    describe_gauge!(
        names::BUILD_INFO,
        "Build information; the value is always 1."
    );
    describe_counter!(names::REQUESTS, "Finished requests, by outcome.");
    describe_counter!(
        names::CONFIG_RELOADS,
        "Config reloads (SIGHUP, --watch-config), by result: success, invalid, failed."
    );
    describe_gauge!(
        names::CONFIG_LAST_RELOAD_SUCCESSFUL,
        "1 if the last config reload succeeded (or none was tried), 0 if it was rejected."
    );
    describe_gauge!(
        names::BLOCKING_RUNNING,
        "Blocking-pool jobs (file opens, hashing, listings) of the service running now; at most \
         services.<name>.max_blocking."
    );
    describe_counter!(
        names::BLOCKING_QUEUED,
        "Blocking-pool jobs that found the service's max_blocking budget full and waited."
    );
    describe_histogram!(
        names::BLOCKING_QUEUE_DURATION,
        Unit::Seconds,
        "Time blocking-pool jobs waited for a slot of the service's max_blocking budget."
    );
    describe_histogram!(
        names::REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to its answer."
    );
}

/// The labels every series of a service carries.
#[derive(Debug, Clone)]
pub struct ServiceLabels {
    /// The service's config name.
    pub service: String,
    /// The plugin it runs.
    pub plugin: String,
    /// The backend in use (`epoll` or `io_uring`).
    pub backend: String,
}

impl ServiceLabels {
    /// Labels as `metrics` wants them, plus any extra pairs.
    pub fn with(&self, extra: &[(&str, &'static str)]) -> Vec<metrics::Label> {
        let mut labels = vec![
            metrics::Label::new("service", self.service.clone()),
            metrics::Label::new("plugin", self.plugin.clone()),
            metrics::Label::new("backend", self.backend.clone()),
        ];
        labels.extend(
            extra
                .iter()
                .map(|(k, v)| metrics::Label::new(k.to_string(), *v)),
        );
        labels
    }
}

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
            Rejection::NotAllowed => "allow_from",
            Rejection::TooManyConnections => "max_connections",
        }
    }
}

/// Handles for one service's connection-level series.
pub(crate) struct ConnMetrics {
    pub(crate) received: Counter,
    pub(crate) sent: Counter,
    accepted: Counter,
    rejected_not_allowed: Counter,
    rejected_too_many: Counter,
    active: Gauge,
    duration: Histogram,
    /// `wharf_requests_total` per declared outcome, plus the latency histogram.
    pub(crate) requests: Vec<(&'static str, Counter)>,
    /// Only for plugins that declare outcomes: no empty histograms for echo.
    pub(crate) request_duration: Option<Histogram>,
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
    pub(crate) metrics: ConnMetrics,
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
        let l = |extra: &[(&str, &'static str)]| labels.with(extra);
        let requests: Vec<(&'static str, Counter)> = outcomes
            .iter()
            .map(|&o| (o, metrics::counter!(names::REQUESTS, l(&[("outcome", o)]))))
            .collect();
        let metrics = ConnMetrics {
            received: metrics::counter!(names::RECEIVED_BYTES, l(&[])),
            sent: metrics::counter!(names::SENT_BYTES, l(&[])),
            accepted: metrics::counter!(names::ACCEPTED, l(&[])),
            rejected_not_allowed: metrics::counter!(
                names::REJECTED,
                l(&[("reason", Rejection::NotAllowed.as_str())])
            ),
            rejected_too_many: metrics::counter!(
                names::REJECTED,
                l(&[("reason", Rejection::TooManyConnections.as_str())])
            ),
            active: metrics::gauge!(names::ACTIVE, l(&[])),
            duration: metrics::histogram!(names::CONNECTION_DURATION, l(&[])),
            request_duration: (!outcomes.is_empty())
                .then(|| metrics::histogram!(names::REQUEST_DURATION, l(&[]))),
            requests,
        };
        // Touch every series so a scrape shows zeros rather than nothing.
        for c in [
            &metrics.received,
            &metrics.sent,
            &metrics.accepted,
            &metrics.rejected_not_allowed,
            &metrics.rejected_too_many,
        ] {
            c.increment(0);
        }
        for (_, c) in &metrics.requests {
            c.increment(0);
        }
        // Not `set(0)`: a new generation shares the series with the one it replaces, whose
        // connections are still counted in it.
        metrics.active.increment(0.0);
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

    /// Connections open now across every generation of this service.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The service's budget of concurrent blocking-pool jobs.
    pub fn blocking(&self) -> &BlockingBudget {
        &self.blocking
    }

    /// The service's labels (for plugins that register their own series).
    pub fn labels(&self) -> &ServiceLabels {
        &self.labels
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
    /// Wraps the accepted connection in the metering, idle-timeout layer, which also tells the
    /// plugin when the server is stopping ([`Conn::read_idle`]; a reload retiring the generation
    /// does not end idle sessions).
    pub fn wrap<C: Conn>(self, conn: C) -> Metered<C> {
        let idle = self.gate.idle_timeout;
        let drain = self.gate.retirement();
        Metered::new(conn, self, idle, drain)
    }

    pub(crate) fn gate(&self) -> &ServiceGate {
        &self.gate
    }
}

impl ServiceGate {
    /// Counts one finished request (see [`Conn::record_request`]).
    pub(crate) fn record_request(&self, outcome: &'static str, elapsed: Duration) {
        let m = &self.metrics;
        // Same static string: pointer comparison first, content as the fallback.
        let found = m
            .requests
            .iter()
            .find(|(o, _)| std::ptr::eq(*o, outcome) || *o == outcome);
        if let Some((_, counter)) = found {
            counter.increment(1);
            if let Some(h) = &m.request_duration {
                h.record(elapsed.as_secs_f64());
            }
        }
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
