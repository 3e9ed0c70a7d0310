//! Every metric the framework records: names, HELP text, labels and the per-service handles.
//!
//! Series are registered once per service generation ([`ServiceMetrics::register`],
//! [`BlockingSeries::register`]), so the data path updates handles and never hashes a metric
//! key. Who records what: [`crate::gate`] counts admissions and open connections,
//! [`crate::metered`] counts bytes, [`crate::context`] counts requests and
//! [`crate::blocking`] counts blocking-pool jobs, all through the handles defined here.
//! The names and labels are what dashboards and tests query: do not change them. Process-level
//! series (build info, config reloads) belong to the binary: `src/server/process_metrics.rs`.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

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
    /// Counter, label `outcome`: finished requests (plugins with requests only).
    pub const REQUESTS: &str = "wharf_requests_total";
    /// Histogram: request latency (plugins with requests only).
    pub const REQUEST_DURATION: &str = "wharf_request_duration_seconds";
    /// Gauge: blocking-pool jobs of a service running now (at most `max_blocking`).
    pub const BLOCKING_RUNNING: &str = "wharf_blocking_jobs_running";
    /// Counter: blocking-pool jobs that found the service's budget full and waited in line.
    pub const BLOCKING_QUEUED: &str = "wharf_blocking_jobs_queued_total";
    /// Histogram: time a blocking-pool job waited for a permit of its service's budget.
    pub const BLOCKING_QUEUE_DURATION: &str = "wharf_blocking_queue_duration_seconds";
    /// Counter, label `result` ([`super::handshake`]): TLS handshakes finished or abandoned
    /// (TLS services only).
    pub const TLS_HANDSHAKES: &str = "wharf_tls_handshakes_total";
    /// Histogram: time from accept to an established TLS session (TLS services only).
    pub const TLS_HANDSHAKE_DURATION: &str = "wharf_tls_handshake_duration_seconds";
    /// Counter: datagrams a UDP service received (dropped ones included).
    pub const DATAGRAMS_RECEIVED: &str = "wharf_datagrams_received_total";
    /// Counter: datagrams a UDP service sent (replies).
    pub const DATAGRAMS_SENT: &str = "wharf_datagrams_sent_total";
    /// Counter, label `reason` ([`super::dropped`]): datagrams not answered, or replies not
    /// sent.
    pub const DATAGRAMS_DROPPED: &str = "wharf_datagrams_dropped_total";
}

/// Registers HELP text and units for the framework's metrics. Call once after installing a
/// recorder.
pub fn describe() {
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
    describe_counter!(names::REQUESTS, "Finished requests, by outcome.");
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
    describe_counter!(
        names::TLS_HANDSHAKES,
        "TLS handshakes by result: ok, or why the connection was closed before the session \
         was established."
    );
    describe_histogram!(
        names::TLS_HANDSHAKE_DURATION,
        Unit::Seconds,
        "Time from accept to an established TLS session (waiting for a handshake slot \
         included), for successful handshakes."
    );
    describe_counter!(
        names::DATAGRAMS_RECEIVED,
        "Datagrams a UDP service received, dropped ones included (their bytes count in \
         wharf_received_bytes_total)."
    );
    describe_counter!(
        names::DATAGRAMS_SENT,
        "Datagrams a UDP service sent (their bytes count in wharf_sent_bytes_total)."
    );
    describe_counter!(
        names::DATAGRAMS_DROPPED,
        "Datagrams a UDP service did not answer, and replies it did not send, by reason."
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

/// The `reason` label values of `wharf_connections_rejected_total`.
pub mod rejected {
    /// The peer is outside `allow_from`.
    pub const NOT_ALLOWED: &str = "allow_from";
    /// The service already has `max_connections` open.
    pub const TOO_MANY: &str = "max_connections";
    /// The client's TLS identity is not in `allow_identities` (counted after the handshake).
    pub const IDENTITY: &str = "identity";
    /// PROXY protocol on: the peer is not a trusted proxy, or its header is missing,
    /// malformed, oversized, of the wrong version or late.
    pub const PROXY_PROTOCOL: &str = "proxy_protocol";
    /// The client's source already has `max_connections_per_source` open.
    pub const PER_SOURCE: &str = "max_connections_per_source";
    /// The service is over `max_connection_rate`.
    pub const RATE: &str = "max_connection_rate";
    /// The client's source is over `max_connection_rate_per_source`.
    pub const RATE_PER_SOURCE: &str = "max_connection_rate_per_source";
    /// A Unix-domain peer whose uid is outside `allow_uids` and gid outside `allow_gids`.
    pub const CREDENTIALS: &str = "allow_uids";
    /// The reasons of [`crate::gate::Rejection`], in its order: registered for every service.
    pub const ADMISSION: [&str; 7] = [
        NOT_ALLOWED,
        TOO_MANY,
        PROXY_PROTOCOL,
        PER_SOURCE,
        RATE,
        RATE_PER_SOURCE,
        CREDENTIALS,
    ];
}

/// The `result` label values of `wharf_tls_handshakes_total`: a fixed set, whatever the
/// client sends.
pub mod handshake {
    /// The session is established.
    pub const OK: &str = "ok";
    /// Not finished within `tls.handshake_timeout` of accept (a silent or slow client, or one
    /// that waited too long for a handshake slot).
    pub const TIMEOUT: &str = "timeout";
    /// The client closed or reset the connection before the handshake finished.
    pub const CLOSED: &str = "closed";
    /// The server began stopping (SIGTERM) before the handshake finished.
    pub const CANCELLED: &str = "cancelled";
    /// A client certificate is required and none was presented.
    pub const NO_CERTIFICATE: &str = "no_certificate";
    /// The client's certificate did not verify (unknown issuer, expired, wrong usage...).
    pub const BAD_CERTIFICATE: &str = "bad_certificate";
    /// No TLS version in common (e.g. a TLS 1.2 client and `min_version = "1.3"`).
    pub const VERSION: &str = "version";
    /// The client aborted with an alert (often: it does not trust the server's certificate).
    pub const ALERT: &str = "alert";
    /// Not TLS, malformed TLS, or nothing in common but the version (cipher suites, groups).
    pub const PROTOCOL: &str = "protocol";
    /// Anything else (an IO error on the socket).
    pub const OTHER: &str = "other";
    /// Every value, registered at startup so each series exists from the first scrape.
    pub const ALL: [&str; 10] = [
        OK,
        TIMEOUT,
        CLOSED,
        CANCELLED,
        NO_CERTIFICATE,
        BAD_CERTIFICATE,
        VERSION,
        ALERT,
        PROTOCOL,
        OTHER,
    ];
}

/// The `reason` label values of `wharf_datagrams_dropped_total`: a fixed set.
pub mod dropped {
    /// The sender is outside `allow_from`.
    pub const NOT_ALLOWED: &str = "allow_from";
    /// The sender's port is 0 or a well-known service port (reflection loops), or its address
    /// cannot send (unspecified, broadcast, multicast).
    pub const REFLECTION: &str = "reflection";
    /// The sender's source is over `max_datagram_rate_per_source`.
    pub const RATE_PER_SOURCE: &str = "max_datagram_rate_per_source";
    /// The service is over `max_datagram_rate`.
    pub const RATE: &str = "max_datagram_rate";
    /// Larger than `max_datagram_size`.
    pub const OVERSIZED: &str = "max_datagram_size";
    /// A reply the plugin tried that was larger than the datagram (or one too many).
    pub const AMPLIFICATION: &str = "amplification";
    /// A reply the socket refused to send.
    pub const SEND_ERROR: &str = "send_error";
    /// Every value, registered at startup so each series exists from the first scrape.
    pub const ALL: [&str; 7] = [
        NOT_ALLOWED,
        REFLECTION,
        RATE_PER_SOURCE,
        RATE,
        OVERSIZED,
        AMPLIFICATION,
        SEND_ERROR,
    ];
}

/// Handles for one UDP service generation's datagram series (its bytes go to the service's
/// `wharf_received_bytes_total` and `wharf_sent_bytes_total`, like a stream service's).
pub struct DatagramSeries {
    /// `wharf_datagrams_received_total`.
    pub received: Counter,
    /// `wharf_datagrams_sent_total`.
    pub sent: Counter,
    /// `wharf_datagrams_dropped_total{reason}`, in [`dropped::ALL`] order.
    pub dropped: [Counter; dropped::ALL.len()],
}

impl DatagramSeries {
    /// Registers (and zeroes) the datagram series of the service labelled `labels`.
    pub fn register(labels: &ServiceLabels) -> Self {
        let series = DatagramSeries {
            received: metrics::counter!(names::DATAGRAMS_RECEIVED, labels.with(&[])),
            sent: metrics::counter!(names::DATAGRAMS_SENT, labels.with(&[])),
            dropped: dropped::ALL.map(|reason| {
                metrics::counter!(names::DATAGRAMS_DROPPED, labels.with(&[("reason", reason)]))
            }),
        };
        for c in [&series.received, &series.sent]
            .into_iter()
            .chain(&series.dropped)
        {
            c.increment(0);
        }
        series
    }
}

/// Handles for one service generation's connection, byte and request series.
pub struct ServiceMetrics {
    /// `wharf_received_bytes_total`.
    pub(crate) received: Counter,
    /// `wharf_sent_bytes_total`.
    pub(crate) sent: Counter,
    /// `wharf_connections_accepted_total`.
    pub(crate) accepted: Counter,
    /// `wharf_connections_rejected_total{reason}` per [`rejected::ADMISSION`] reason.
    rejected: [Counter; rejected::ADMISSION.len()],
    /// `wharf_connections_active`.
    pub active: Gauge,
    /// `wharf_connection_duration_seconds`.
    pub duration: Histogram,
    /// `wharf_requests_total` per declared outcome.
    requests: Vec<(&'static str, Counter)>,
    /// Only for plugins that declare outcomes: no empty histograms for echo.
    request_duration: Option<Histogram>,
    /// Only for services with `[tls]`.
    pub(crate) tls: Option<TlsSeries>,
}

/// Handles for one TLS service generation's handshake series, and its identity refusals.
pub struct TlsSeries {
    /// `wharf_tls_handshakes_total` per [`handshake`] result, in [`handshake::ALL`] order.
    handshakes: [Counter; handshake::ALL.len()],
    /// `wharf_tls_handshake_duration_seconds`.
    duration: Histogram,
    /// `wharf_connections_rejected_total{reason="identity"}`.
    pub(crate) rejected_identity: Counter,
}

impl TlsSeries {
    fn register(labels: &ServiceLabels) -> Self {
        let handshakes = handshake::ALL.map(|result| {
            let c = metrics::counter!(names::TLS_HANDSHAKES, labels.with(&[("result", result)]));
            c.increment(0);
            c
        });
        let rejected_identity = metrics::counter!(
            names::REJECTED,
            labels.with(&[("reason", rejected::IDENTITY)])
        );
        rejected_identity.increment(0);
        TlsSeries {
            handshakes,
            duration: metrics::histogram!(names::TLS_HANDSHAKE_DURATION, labels.with(&[])),
            rejected_identity,
        }
    }

    /// Counts one handshake under `result` (one of [`handshake::ALL`]), and its duration when
    /// it succeeded.
    pub(crate) fn record_handshake(&self, result: &'static str, elapsed: Duration) {
        if let Some(i) = handshake::ALL.iter().position(|r| *r == result) {
            self.handshakes[i].increment(1);
        }
        if result == handshake::OK {
            self.duration.record(elapsed.as_secs_f64());
        }
    }
}

impl ServiceMetrics {
    /// Registers the series of a service whose plugin declares `outcomes`
    /// ([`crate::Plugin::OUTCOMES`]), with the TLS series if it speaks `tls`, and touches each
    /// so a scrape shows zeros, not nothing.
    pub fn register(labels: &ServiceLabels, outcomes: &'static [&'static str], tls: bool) -> Self {
        let l = |extra: &[(&str, &'static str)]| labels.with(extra);
        let requests: Vec<(&'static str, Counter)> = outcomes
            .iter()
            .map(|&o| (o, metrics::counter!(names::REQUESTS, l(&[("outcome", o)]))))
            .collect();
        let m = ServiceMetrics {
            received: metrics::counter!(names::RECEIVED_BYTES, l(&[])),
            sent: metrics::counter!(names::SENT_BYTES, l(&[])),
            accepted: metrics::counter!(names::ACCEPTED, l(&[])),
            rejected: rejected::ADMISSION
                .map(|reason| metrics::counter!(names::REJECTED, l(&[("reason", reason)]))),
            active: metrics::gauge!(names::ACTIVE, l(&[])),
            duration: metrics::histogram!(names::CONNECTION_DURATION, l(&[])),
            request_duration: (!outcomes.is_empty())
                .then(|| metrics::histogram!(names::REQUEST_DURATION, l(&[]))),
            requests,
            tls: tls.then(|| TlsSeries::register(labels)),
        };
        for c in [&m.received, &m.sent, &m.accepted]
            .into_iter()
            .chain(&m.rejected)
        {
            c.increment(0);
        }
        for (_, c) in &m.requests {
            c.increment(0);
        }
        // Not `set(0)`: a new generation shares the series with the one it replaces, whose
        // connections are still counted in it.
        m.active.increment(0.0);
        m
    }

    /// Counts one connection refused for `reason`.
    pub(crate) fn record_rejection(&self, reason: crate::gate::Rejection) {
        self.rejected[reason as usize].increment(1);
    }

    /// Counts one finished request under `outcome` (one of the declared outcomes; others are
    /// ignored) and its latency.
    pub(crate) fn record_request(&self, outcome: &'static str, elapsed: Duration) {
        // Same static string: pointer comparison first, content as the fallback.
        let found = self
            .requests
            .iter()
            .find(|(o, _)| std::ptr::eq(*o, outcome) || *o == outcome);
        if let Some((_, counter)) = found {
            counter.increment(1);
            if let Some(h) = &self.request_duration {
                h.record(elapsed.as_secs_f64());
            }
        }
    }
}

/// Handles for one service's blocking-pool series.
pub struct BlockingSeries {
    /// `wharf_blocking_jobs_running`.
    pub running: Gauge,
    /// `wharf_blocking_jobs_queued_total`.
    pub queued: Counter,
    /// `wharf_blocking_queue_duration_seconds`.
    pub queue_time: Histogram,
}

impl BlockingSeries {
    /// Registers (and zeroes) the blocking-pool series of the service labelled `labels`.
    pub fn register(labels: &ServiceLabels) -> Self {
        let l = labels.with(&[]);
        let series = BlockingSeries {
            running: metrics::gauge!(names::BLOCKING_RUNNING, l.clone()),
            queued: metrics::counter!(names::BLOCKING_QUEUED, l.clone()),
            queue_time: metrics::histogram!(names::BLOCKING_QUEUE_DURATION, l),
        };
        series.queued.increment(0);
        series.running.increment(0.0);
        series
    }
}
