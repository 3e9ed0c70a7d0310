//! UDP services: the datagram loop every backend runs on a `udp:` listen address, its
//! admission rules, and what a backend's UDP socket must provide ([`DatagramSocket`]).
//!
//! Each worker has its own `SO_REUSEPORT` UDP socket per UDP service (bound by the main thread
//! with [`crate::net::bind_reuseport_udp_group`]), so the kernel spreads datagrams over the
//! workers by source address and port. The loop (`datagram_loop`) receives a *batch*
//! (everything queued, up to [`BATCH`] datagrams, per wakeup), admits each datagram, has the
//! plugin answer the admitted ones ([`crate::datagram`]: one dynamic call per batch), and
//! sends the replies as a batch. Memory is fixed per socket: two sets of [`BATCH`] buffers of
//! `max_datagram_size` bytes, allocated when the loop starts; nothing is allocated per
//! datagram.
//!
//! # Admission, and why its defaults are strict
//!
//! A datagram's source address is whatever its sender wrote: an open UDP echo answers whoever
//! an attacker names, so it is a reflection tool (and, for protocols whose answers are larger
//! than their questions, an amplifier). Every UDP service therefore gets, in this order:
//!
//! 1. `max_datagram_size` (default [`DEFAULT_MAX_DATAGRAM_SIZE`] bytes): larger datagrams are
//!    dropped, not truncated.
//! 2. Reflection: datagrams from port 0, from a well-known service port
//!    ([`reflection_risk`]: every port below 1024, and the UDP reflectors above it, SSDP,
//!    WS-Discovery, mDNS, memcached), or from an address that cannot send (unspecified,
//!    broadcast, multicast) are dropped: an echo answering chargen (19) or another echo (7)
//!    starts a loop between two servers that a single spoofed datagram ignites.
//! 3. `allow_from`, as for stream services (silently dropped: UDP has no refusal to send).
//! 4. `max_datagram_rate_per_source` (default [`DEFAULT_MAX_DATAGRAM_RATE_PER_SOURCE`] per
//!    second, burst of as many), then `max_datagram_rate` (default: no bound): what one victim
//!    can be sent through this service is bounded whatever an attacker sends.
//!
//! Replies may never hold more bytes than the datagram they answer (enforced by
//! [`crate::datagram::Replies`]), so the service is never an amplifier. Every drop is counted in
//! `wharf_datagrams_dropped_total{reason}`; nothing is logged per datagram (no access log
//! lines either: a line per datagram would cost more than answering it).
//!
//! # Stopping
//!
//! Shutdown and a reload that removes the address end the loop at once: the socket is shut
//! down for reading first ([`stop_receiving`]), which completes a receive still in flight in an
//! io_uring ring (tokio-uring 0.5 cannot cancel one, and it would hold the socket open), then
//! closed. A reload that changes the service swaps the handler between batches: datagrams
//! already received are answered by the generation that was current when they arrived.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::error;

use crate::config::{ConfigError, ConfigSource, ServiceConfig};
use crate::datagram::{AnswerBatch, DatagramService, Packets};
use crate::metrics::{dropped, DatagramSeries, ServiceLabels};
use crate::shutdown::Shutdown;
use crate::sources::{DatagramRates, RateExceeded};
use crate::worker::{AcceptBackoff, Handler};

/// Datagrams received (and replies sent) per batch, at most.
pub const BATCH: usize = 32;

/// Default `max_datagram_size`: a datagram that fits an Ethernet frame with room to spare, and
/// the common DNS/EDNS payload limit. Larger datagrams are fragmented on the way, rare, and
/// cost `2 × BATCH ×` this much memory per worker and socket.
pub const DEFAULT_MAX_DATAGRAM_SIZE: usize = 4096;

/// Largest `max_datagram_size`: the largest UDP payload over IPv4.
pub const MAX_DATAGRAM_SIZE: usize = 65_507;

/// Default `max_datagram_rate_per_source`: ample for a person or a monitoring probe, and a
/// bound on what a spoofed victim receives (at most this many replies per second, none larger
/// than the datagram it answers).
pub const DEFAULT_MAX_DATAGRAM_RATE_PER_SOURCE: u32 = 100;

/// Source ports above 1024 of well-known UDP reflectors: SSDP (1900), WS-Discovery (3702), mDNS
/// (5353), memcached (11211).
const REFLECTOR_PORTS: [u16; 4] = [1900, 3702, 5353, 11211];

/// The serde default of `max_datagram_size`.
pub fn default_max_datagram_size() -> usize {
    DEFAULT_MAX_DATAGRAM_SIZE
}

/// The serde default of `max_datagram_rate_per_source`.
pub fn default_max_datagram_rate_per_source() -> u32 {
    DEFAULT_MAX_DATAGRAM_RATE_PER_SOURCE
}

/// The UDP checks of every service: datagram limits in range, and no stream-only feature (TLS,
/// PROXY protocol) on a `udp:` address.
pub(crate) fn check_config(
    source: &ConfigSource,
    services: &std::collections::BTreeMap<String, ServiceConfig>,
) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (name, svc) in services {
        let key = |k: &str| format!("services.{name}.{k}");
        if !(1..=MAX_DATAGRAM_SIZE).contains(&svc.max_datagram_size) {
            let message = format!("must be 1..={MAX_DATAGRAM_SIZE} (bytes)");
            errors.push(source.value_error_at(&key("max_datagram_size"), message));
        }
        if svc.max_datagram_rate == Some(0) {
            let message = "must be at least 1 (leave it out for no bound)".into();
            errors.push(source.value_error_at(&key("max_datagram_rate"), message));
        }
        if svc.listen.is_stream() {
            continue;
        }
        if svc.tls.is_some() {
            errors.push(source.error_at(
                &key("tls"),
                "a UDP service cannot speak TLS (DTLS is not supported)".into(),
            ));
        }
        if svc.proxy_protocol.is_some() {
            errors.push(source.error_at(
                &key("proxy_protocol"),
                "the PROXY protocol is for stream connections, not UDP datagrams".into(),
            ));
        }
    }
    errors
}

/// Whether answering `peer` risks a reflection loop or a reply to an address that cannot have
/// sent anything; see the module doc.
pub fn reflection_risk(peer: SocketAddr) -> bool {
    let port = peer.port();
    if port < 1024 || REFLECTOR_PORTS.contains(&port) {
        return true;
    }
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    }
}

/// One UDP service generation's datagram limits and series (kept by its
/// [`ServiceGate`](crate::gate::ServiceGate)).
pub struct DatagramLimits {
    max_size: usize,
    rates: DatagramRates,
    series: DatagramSeries,
}

impl DatagramLimits {
    /// The limits of `config`; `previous` is the generation this one replaces (its rate cells
    /// carry over).
    pub fn new(
        labels: &ServiceLabels,
        config: &ServiceConfig,
        previous: Option<&DatagramLimits>,
    ) -> Self {
        let per_source = Some(config.max_datagram_rate_per_source).filter(|&r| r > 0);
        DatagramLimits {
            max_size: config.max_datagram_size,
            rates: DatagramRates::new(
                config.max_datagram_rate,
                per_source,
                config.source_prefix_v6,
                previous.map(|p| &p.rates),
            ),
            series: DatagramSeries::register(labels),
        }
    }

    /// `max_datagram_size`.
    pub fn max_size(&self) -> usize {
        self.max_size
    }
}

/// A backend's UDP socket, adopted by one worker.
#[allow(async_fn_in_trait)] // worker-local futures, never sent across threads
pub trait DatagramSocket: 'static {
    /// Waits for at least one datagram, then receives what else is queued without waiting,
    /// into `into`'s free buffers (filled with [`Packets::next_free`] and
    /// [`Packets::commit`]). A datagram larger than a buffer is truncated to the buffer's
    /// size (the loop drops datagrams that fill their buffer). On `Ok`, at least one is in.
    async fn recv_batch(&mut self, into: &mut Packets) -> io::Result<()>;

    /// Sends every filled packet of `from` to its peer; returns how many were sent and their
    /// bytes (a datagram the socket refuses is skipped, not retried). A backend may lend the
    /// buffers out (to the kernel) but must put them back.
    async fn send_batch(&mut self, from: &mut Packets) -> (usize, u64);

    /// The socket's descriptor (for [`stop_receiving`]).
    fn raw_fd(&self) -> RawFd;
}

/// Shuts `fd` down for reading: a receive in flight completes (with nothing), so a backend
/// whose pending operations hold the socket (io_uring) lets it close.
pub fn stop_receiving(fd: RawFd) {
    // SAFETY: `fd` is the loop's socket, still open. On an unconnected UDP socket this
    // reports ENOTCONN but still marks the socket shut and wakes its readers.
    unsafe { libc::shutdown(fd, libc::SHUT_RD) };
}

/// The per-batch state of a loop: buffers and verdicts, allocated once.
struct Buffers {
    incoming: Packets,
    outgoing: Packets,
    admitted: Vec<bool>,
}

impl Buffers {
    fn for_size(max_size: usize) -> Self {
        Buffers {
            // One byte more than the largest datagram answered: one that fills it is too big.
            incoming: Packets::new(BATCH, max_size + 1),
            outgoing: Packets::new(BATCH, max_size),
            admitted: Vec::with_capacity(BATCH),
        }
    }
}

/// Answers datagrams on `socket` until shutdown or until the slot is stopped.
pub(crate) async fn datagram_loop<S: DatagramSocket, C>(
    mut socket: S,
    mut handler: watch::Receiver<Option<Handler<C>>>,
    mut shutdown: Shutdown,
) {
    let Some(mut current) = handler.borrow().clone() else {
        return;
    };
    let fd = socket.raw_fd();
    let mut buffers = match current.gate.datagrams() {
        Some(limits) => Buffers::for_size(limits.max_size),
        None => return error!(service = current.gate.service(), "not a UDP service"),
    };
    let mut backoff = AcceptBackoff::default();
    loop {
        let received = {
            let recv = socket.recv_batch(&mut buffers.incoming);
            tokio::pin!(recv);
            // The receive stays pending across handler swaps (an io_uring receive cannot be
            // cancelled without losing its datagram).
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => return stop_receiving(fd),
                    changed = handler.changed() => {
                        let next = handler.borrow_and_update().clone();
                        match (changed, next) {
                            (Ok(()), Some(next)) => current = next,
                            _ => return stop_receiving(fd),
                        }
                    }
                    received = &mut recv => break received,
                }
            }
        };
        if let Err(e) = received {
            if let Some(pause) = backoff.on_error(&e, current.gate.service()) {
                tokio::select! {
                    _ = shutdown.wait() => return stop_receiving(fd),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            continue;
        }
        backoff.reset();
        let (Some(service), Some(limits)) = (&current.datagrams, current.gate.datagrams()) else {
            error!(
                service = current.gate.service(),
                "a UDP slot got a handler without a datagram service"
            );
            return stop_receiving(fd);
        };
        answer(&current, service, limits, &mut buffers);
        if !buffers.outgoing.is_empty() {
            let (sent, bytes) = tokio::select! {
                _ = shutdown.wait() => return stop_receiving(fd),
                sent = socket.send_batch(&mut buffers.outgoing) => sent,
            };
            let failed = buffers.outgoing.len() - sent;
            limits.series.sent.increment(sent as u64);
            current.gate.metrics().sent.increment(bytes);
            if failed > 0 {
                limits.series.dropped[drop_index(dropped::SEND_ERROR)].increment(failed as u64);
            }
        }
        buffers.incoming.clear();
        buffers.outgoing.clear();
        if limits.max_size + 1 != buffers.incoming.buffer_size() {
            // A reload changed max_datagram_size.
            buffers = Buffers::for_size(limits.max_size);
        }
    }
}

/// Admits each datagram of the batch and has the service answer the admitted ones.
fn answer<C>(
    handler: &Handler<C>,
    service: &Arc<dyn DatagramService>,
    limits: &DatagramLimits,
    buffers: &mut Buffers,
) {
    let gate = &handler.gate;
    let now = limits.rates.now();
    let mut drops = [0u64; dropped::ALL.len()];
    let mut bytes = 0u64;
    buffers.admitted.clear();
    for packet in buffers.incoming.filled() {
        bytes += packet.buf.len() as u64;
        let size = packet.buf.len();
        let verdict = if size > limits.max_size || size >= buffers.incoming.buffer_size() {
            Err(dropped::OVERSIZED)
        } else if reflection_risk(packet.peer) {
            Err(dropped::REFLECTION)
        } else if gate.check_allowed(packet.peer.ip()).is_err() {
            Err(dropped::NOT_ALLOWED)
        } else {
            limits
                .rates
                .admit_at(packet.peer.ip(), now)
                .map_err(|e| match e {
                    RateExceeded::PerSource => dropped::RATE_PER_SOURCE,
                    RateExceeded::Service => dropped::RATE,
                })
        };
        if let Err(reason) = verdict {
            drops[drop_index(reason)] += 1;
        }
        buffers.admitted.push(verdict.is_ok());
    }
    let received = buffers.incoming.len() as u64;
    limits.series.received.increment(received);
    gate.metrics().received.increment(bytes);
    if buffers.admitted.iter().any(|&a| a) {
        let mut batch = AnswerBatch {
            incoming: buffers.incoming.filled(),
            admitted: &buffers.admitted,
            outgoing: &mut buffers.outgoing,
            refused: 0,
        };
        service.answer_batch(&mut batch);
        drops[drop_index(dropped::AMPLIFICATION)] += batch.refused;
    }
    for (counter, n) in limits.series.dropped.iter().zip(drops) {
        if n > 0 {
            counter.increment(n);
        }
    }
}

fn drop_index(reason: &str) -> usize {
    dropped::ALL
        .iter()
        .position(|r| std::ptr::eq(*r, reason) || *r == reason)
        .unwrap_or(dropped::ALL.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_ports_and_unsendable_addresses_are_reflection_risks() {
        let risky = |s: &str| reflection_risk(s.parse().unwrap());
        for peer in [
            "192.0.2.1:0",
            "192.0.2.1:7",
            "192.0.2.1:19",
            "192.0.2.1:53",
            "192.0.2.1:123",
            "192.0.2.1:1023",
            "192.0.2.1:11211",
            "255.255.255.255:40000",
            "224.0.0.1:40000",
            "0.0.0.0:40000",
            "[::ffff:255.255.255.255]:40000",
            "[ff02::1]:40000",
        ] {
            assert!(risky(peer), "{peer}");
        }
        for peer in ["192.0.2.1:1024", "127.0.0.1:54321", "[::1]:40000"] {
            assert!(!risky(peer), "{peer}");
        }
    }
}
