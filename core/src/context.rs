//! The per-connection context: what the framework knows about one connection, and what it
//! offers the plugin serving it.
//!
//! [`Service::serve`](crate::Service::serve) receives the connection twice over: the
//! transport ([`Conn`]: bytes in and out) and this [`Context`]: who the client is, the drain
//! signal, request metrics and the service's blocking threads. The split follows pingora's
//! `process_new(stream, &ShutdownWatch)`: a transport can be wrapped or replaced (TLS later)
//! without the facts about the connection moving with it.
//!
//! The client's identity ([`Context::identity`]) is what a verified TLS client certificate
//! names; plugins authorize with it. The client itself is a [`Peer`]: an IP address, or on a
//! Unix-domain socket the connecting process's credentials ([`Context::peer_credentials`]).
//! Behind a load balancer with `proxy_protocol`, [`Context::peer`] is the client its PROXY
//! header named, and [`Context::proxy`] the balancer.
//!
//! With the access log on for the service, the context also carries the connection's line
//! ([`crate::access_log`]): written when the context drops, with the outcome the worker set
//! (or `cut` when a drain's deadline dropped it first), and request lines from
//! [`Context::record_request`] and [`Context::record_request_with`].
//!
//! A context is built once per connection by the worker ([`crate::worker`]), inside the
//! connection's task: no allocation of its own. Outside a server (unit tests, tools), a
//! [`Detached`] context stands in ([`Context::detached`], or the pipes of [`crate::testing`]).

use std::cell::{Cell, OnceCell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::access_log::{ClientFields, ConnBytes, ConnOutcome, Fields, ServiceLog, Who};
use crate::conn::{BufResult, Conn};
use crate::gate::Ticket;
use crate::peer::{Peer, PeerCredentials};
use crate::shutdown::{self, Shutdown, ShutdownTrigger};

/// How a connection came through a proxy: the proxy (the TCP peer) and the destination its
/// PROXY header named.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proxied {
    pub(crate) by: Peer,
    pub(crate) destination: Option<SocketAddr>,
}

/// How long a request took, as [`Context::record_request`] takes it: a [`Duration`] the plugin
/// measured, or [`Elapsed::since`] the request's start, which reads the clock once for both
/// the duration and the time of the request's access log line (which then reads no clock of
/// its own). A plugin that answers several requests at once measures once for all of them.
#[derive(Debug, Clone, Copy)]
pub struct Elapsed {
    duration: Duration,
    /// When the request ended, when read for the duration.
    ended: Option<Instant>,
}

impl Elapsed {
    /// From `started` until now.
    #[inline]
    pub fn since(started: Instant) -> Elapsed {
        let ended = Instant::now();
        Elapsed {
            duration: ended.saturating_duration_since(started),
            ended: Some(ended),
        }
    }

    /// How long it took.
    pub fn duration(self) -> Duration {
        self.duration
    }

    /// When it ended, when that was read ([`Elapsed::since`]).
    pub fn ended(self) -> Option<Instant> {
        self.ended
    }
}

impl From<Duration> for Elapsed {
    fn from(duration: Duration) -> Elapsed {
        Elapsed {
            duration,
            ended: None,
        }
    }
}

/// What the framework knows about one connection and offers to the plugin serving it.
pub struct Context {
    peer: Peer,
    /// The connected peer when it is a proxy whose PROXY header named `peer`.
    proxy: Option<Peer>,
    /// The address the client connected to on the proxy, as its PROXY header named it.
    destination: Option<SocketAddr>,
    scope: Scope,
    /// The drain signal of the connection's service generation. Behind a `RefCell` so the
    /// `&self` methods can wait on it without a receiver of their own per wait.
    drain: RefCell<Shutdown>,
    /// The authenticated client identity, set once (by the TLS layer after a verified
    /// handshake, or by a test).
    identity: OnceCell<Box<str>>,
    /// The access log, when the service writes one.
    log: Option<ConnLog>,
}

/// A served connection's access log state: its line is written when the context drops.
pub(crate) struct ConnLog {
    service: ServiceLog,
    opened: tokio::time::Instant,
    bytes: Rc<ConnBytes>,
    outcome: Cell<Option<ConnOutcome>>,
    /// Client, proxy and identity, formatted at the first line for all the others.
    who: OnceCell<ClientFields>,
}

impl ConnLog {
    /// The log of a connection accepted at `opened`, whose transport counts into `bytes`.
    pub(crate) fn new(
        service: ServiceLog,
        opened: tokio::time::Instant,
        bytes: Rc<ConnBytes>,
    ) -> Self {
        ConnLog {
            service,
            opened,
            bytes,
            outcome: Cell::new(None),
            who: OnceCell::new(),
        }
    }
}

enum Scope {
    /// Admitted by a service gate: its metrics, blocking threads and drain signal. The ticket
    /// keeps the connection counted as open until the context drops.
    Served(Ticket),
    /// Outside a server.
    Detached(Detached),
}

impl Context {
    /// The context of a connection admitted with `ticket`, from `peer`, through `proxy` when
    /// a PROXY header named `peer`.
    /// `log` is its access log state, when the service writes one.
    pub(crate) fn served(
        peer: Peer,
        proxied: Option<Proxied>,
        ticket: Ticket,
        log: Option<ConnLog>,
    ) -> Context {
        let drain = RefCell::new(ticket.gate().retirement());
        Context {
            peer,
            proxy: proxied.map(|p| p.by),
            destination: proxied.and_then(|p| p.destination),
            scope: Scope::Served(ticket),
            drain,
            identity: OnceCell::new(),
            log,
        }
    }

    /// How the connection ended, for its access log line (written when the context drops;
    /// without this call the line says `cut`).
    pub(crate) fn set_outcome(&self, outcome: ConnOutcome) {
        if let Some(log) = &self.log {
            log.outcome.set(Some(outcome));
        }
    }

    /// The client's fields of `log`'s lines, formatted once (the identity, if any, is set
    /// by the TLS handshake before the plugin runs, so before any line).
    fn who<'a>(&self, log: &'a ConnLog) -> &'a ClientFields {
        log.who.get_or_init(|| {
            log.service.who(&Who {
                client: self.peer,
                proxy: self.proxy,
                identity: self.identity(),
            })
        })
    }

    /// A context outside any server, for a client at `peer`: never stopping, requests
    /// recorded nowhere, blocking jobs on tokio's blocking pool. To stop it or read what was
    /// recorded, make it from a [`Detached`] instead.
    pub fn detached(peer: impl Into<Peer>) -> Context {
        Detached::new().context(peer)
    }

    /// The client: the connected peer (a TCP address, or a Unix peer's credentials), or, on
    /// a service with `proxy_protocol`, the address the trusted proxy's header named. Every
    /// framework decision (`allow_from`, `allow_uids`, per-source limits, logs) uses this one.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// The client's IP address and port ([`Context::peer`] when it is an IP client); `None`
    /// for a local process on a Unix socket, which has no address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.socket_addr()
    }

    /// The credentials of the process at the other end of a Unix-domain socket
    /// (`SO_PEERCRED`, taken at accept): the client, or the proxy when a PROXY header named
    /// the client. `None` on TCP.
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.proxy.unwrap_or(self.peer).credentials()
    }

    /// The proxy the connection came through (the connected peer) when a PROXY header named
    /// the client; `None` for a direct connection.
    pub fn proxy(&self) -> Option<Peer> {
        self.proxy
    }

    /// The proxy's IP address, when the connection came through one over TCP.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy.and_then(|p| p.socket_addr())
    }

    /// The address the client connected to on the proxy, when a PROXY header named it (what
    /// the client sees as the server's address); `None` for a direct connection, whose local
    /// address is [`Conn::local_addr`].
    pub fn proxied_destination(&self) -> Option<SocketAddr> {
        self.destination
    }

    /// The client's authenticated identity: the name its verified TLS client certificate
    /// carries (see the TLS section of the README for the rule), or `None` when the client
    /// presented no certificate or the service has no TLS. Never a name the client merely
    /// claimed.
    pub fn identity(&self) -> Option<&str> {
        self.identity.get().map(|id| &**id)
    }

    /// Records the client's authenticated identity. The first call wins: an identity, once
    /// established for a connection, cannot be replaced by anything later on it. For the
    /// framework's TLS layer and for tests ([`crate::testing::MemConn::with_identity`]).
    pub fn set_identity(&self, identity: impl Into<Box<str>>) {
        let _ = self.identity.set(identity.into());
    }

    /// The TLS series of the connection's service generation (`None` outside a server, or
    /// for a plaintext service): for the TLS layer.
    pub(crate) fn tls_series(&self) -> Option<&crate::metrics::TlsSeries> {
        match &self.scope {
            Scope::Served(ticket) => ticket.gate().metrics().tls.as_ref(),
            Scope::Detached(_) => None,
        }
    }

    /// The service's `idle_timeout` (`None` when it is `0s`, or outside a server): for a
    /// plugin that also moves bytes the connection does not see (a program's pipes) and so
    /// must end an idle session itself.
    pub fn idle_timeout(&self) -> Option<Duration> {
        match &self.scope {
            Scope::Served(ticket) => ticket.gate().idle_timeout(),
            Scope::Detached(_) => None,
        }
    }

    /// The service's config name (`"detached"` outside a server).
    pub fn service(&self) -> &str {
        match &self.scope {
            Scope::Served(ticket) => ticket.gate().service(),
            Scope::Detached(_) => "detached",
        }
    }

    /// Counts one finished request in `wharf_requests_total{outcome}` and
    /// `wharf_request_duration_seconds`. `outcome` is one of the plugin's
    /// [`Plugin::OUTCOMES`](crate::Plugin::OUTCOMES); other values are ignored. The handles
    /// were registered once per service, so this costs a short scan and two atomic updates.
    /// `elapsed` is a [`Duration`], or an [`Elapsed`] measured since the request started.
    ///
    /// With the access log on for the service, it also writes the request's line (without
    /// fields of the plugin's own: see [`Context::record_request_with`]).
    pub fn record_request(&self, outcome: &'static str, elapsed: impl Into<Elapsed>) {
        self.record_request_with(outcome, elapsed, |_| {});
    }

    /// [`Context::record_request`], with the plugin's own fields on the request's access log
    /// line: `fields` adds them (`f.str("method", m); f.u64("status", 200)`), escaped by the
    /// log. It runs only when the service writes an access log, so it costs nothing
    /// otherwise; work needed only to fill it belongs inside it, or behind
    /// [`Context::logs_requests`]. Never add a secret (a token, a command's arguments).
    #[inline]
    pub fn record_request_with(
        &self,
        outcome: &'static str,
        elapsed: impl Into<Elapsed>,
        fields: impl FnOnce(&mut Fields<'_>),
    ) {
        let elapsed = elapsed.into();
        match &self.scope {
            Scope::Served(ticket) => ticket
                .gate()
                .metrics()
                .record_request(outcome, elapsed.duration),
            Scope::Detached(d) => d.0.requests.borrow_mut().push(outcome),
        }
        if let Some(log) = &self.log {
            log.service.request(self.who(log), outcome, elapsed, fields);
        }
    }

    /// Whether request lines are written for this connection (the service has the access
    /// log on): for plugins that must keep something from a request's start to fill its
    /// fields when it ends.
    pub fn logs_requests(&self) -> bool {
        self.log.is_some()
    }

    /// Whether the server is stopping (SIGTERM/SIGINT): finish what is under way and end the
    /// connection at the next point between requests. A config reload that retires the
    /// service's generation is not a stop: established sessions keep working under the
    /// settings they started with until they end or idle out.
    pub fn is_stopping(&self) -> bool {
        match self.drain.try_borrow() {
            Ok(drain) => drain.is_stopping(),
            Err(_) => self.subscribe().is_stopping(),
        }
    }

    /// Completes once the server is stopping (see [`Context::is_stopping`]).
    #[allow(
        clippy::await_holding_refcell_ref,
        reason = "a second waiter finds it borrowed and waits on a receiver of its own"
    )]
    pub async fn stopping(&self) {
        match self.drain.try_borrow_mut() {
            Ok(mut drain) => drain.stopping().await,
            Err(_) => self.subscribe().stopping().await,
        }
    }

    /// A [`Conn::read`] at a point where the protocol is between requests, so ending the
    /// connection loses nothing: once the server is stopping it returns `Ok(0)` (end of
    /// stream) at once, so idle keep-alive and command connections let the drain finish
    /// instead of holding it for the whole `shutdown_grace`. A request the client had already
    /// sent when the stop came is still read. Mid-request, use a plain [`Conn::read`].
    ///
    /// The framing helpers ([`crate::framing`]) call it whenever no partial frame is
    /// buffered, so a plugin written with them drains at once without calling it itself.
    pub async fn read_idle<C: Conn>(&self, conn: &mut C, buf: Vec<u8>) -> BufResult<usize> {
        if self.is_stopping() {
            return drain_read(conn, buf);
        }
        tokio::select! {
            biased;
            done = conn.read(buf) => done,
            // Stopping while nothing has arrived: end the connection like a client that
            // closed. No second read here: on io_uring the dropped read may still be armed in
            // the kernel and would take whatever arrives next.
            _ = self.stopping() => (Ok(0), Vec::new()),
        }
    }

    /// Runs `job` (blocking work: a file open, one bounded step of a computation) off the
    /// worker and returns its result. On a served connection it runs on the service's own
    /// `max_blocking` threads (see [`crate::blocking`]); outside a server, on tokio's blocking
    /// pool. Keep jobs short: never wait for a client inside one.
    ///
    /// If `conn`'s peer has already reset the connection, the job does not run (no thread is
    /// spent on a client that asked and left) and the error is a `ConnectionReset`. Other errors
    /// mean the job panicked or no thread could be started.
    pub async fn blocking<C: Conn, R: Send + 'static>(
        &self,
        conn: &C,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> io::Result<R> {
        if conn.peer_closed() {
            return Err(peer_reset());
        }
        match &self.scope {
            Scope::Served(ticket) => ticket.gate().blocking().run(job).await,
            Scope::Detached(_) => tokio::task::spawn_blocking(job)
                .await
                .map_err(|e| io::Error::other(format!("blocking job failed: {e}"))),
        }
    }

    /// A fresh receiver of the drain signal, for a wait that finds the shared one in use.
    fn subscribe(&self) -> Shutdown {
        match &self.scope {
            Scope::Served(ticket) => ticket.gate().retirement(),
            Scope::Detached(d) => d.0.stop.subscribe(),
        }
    }
}

impl Drop for Context {
    /// Writes the connection's access log line.
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            log.service.connection(
                self.who(log),
                log.outcome.get().unwrap_or(ConnOutcome::Cut),
                log.opened.elapsed(),
                log.bytes.received.get(),
                log.bytes.sent.get(),
            );
        }
    }
}

/// A read between requests once the server is stopping (no read of ours is pending): a
/// request the client already sent is still served; a silent connection ends now, like a
/// client that closed.
fn drain_read<C: Conn>(conn: &mut C, mut buf: Vec<u8>) -> BufResult<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(crate::buffer::IDLE);
    }
    match conn.try_read(&mut buf) {
        Ok(Some(n)) => (Ok(n), buf),
        Ok(None) => (Ok(0), buf),
        Err(e) => (Err(e), buf),
    }
}

/// The error [`Context::blocking`] returns, without running its job, when the peer already
/// reset the connection: what the next write would meet.
pub(crate) fn peer_reset() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "the client reset the connection",
    )
}

/// The framework's side of contexts outside a server: what a test uses to stop them and to
/// read the requests they recorded. Clones share one state.
#[derive(Clone)]
pub struct Detached(Rc<DetachedState>);

struct DetachedState {
    stop: ShutdownTrigger,
    requests: RefCell<Vec<&'static str>>,
}

impl Default for Detached {
    fn default() -> Self {
        Self::new()
    }
}

impl Detached {
    /// A new state: not stopping, nothing recorded.
    pub fn new() -> Detached {
        Detached(Rc::new(DetachedState {
            stop: shutdown::channel().0,
            requests: RefCell::new(Vec::new()),
        }))
    }

    /// A context for a client at `peer` that reports here.
    pub fn context(&self, peer: impl Into<Peer>) -> Context {
        Context {
            peer: peer.into(),
            proxy: None,
            destination: None,
            drain: RefCell::new(self.0.stop.subscribe()),
            scope: Scope::Detached(self.clone()),
            identity: OnceCell::new(),
            log: None,
        }
    }

    /// Stops like SIGTERM stops a server: [`Context::is_stopping`] turns true, and idle reads
    /// ([`Context::read_idle`]) end at once.
    pub fn stop(&self) {
        // No task waits for the deadline outside a server; it only marks "stopping".
        self.0.stop.trigger(Duration::from_secs(3600));
    }

    /// The outcomes passed to [`Context::record_request`], in order.
    pub fn recorded_requests(&self) -> Vec<&'static str> {
        self.0.requests.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn an_idle_read_ends_at_once_on_stop_but_a_sent_request_is_still_read() {
        testing::block_on(async {
            let detached = Detached::new();
            let cx = detached.context(SocketAddr::from(([127, 0, 0, 1], 1)));
            let (mut conn, client) = testing::pipe();
            let read = cx.read_idle(&mut conn, Vec::with_capacity(16));
            let stop = async {
                testing::yield_now().await;
                detached.stop();
            };
            let ((res, _), ()) = tokio::join!(read, stop);
            assert_eq!(
                res.unwrap(),
                0,
                "an idle read ends like a client that closed"
            );
            assert!(cx.is_stopping());

            client.write_all(b"late").await.unwrap();
            let (res, buf) = cx.read_idle(&mut conn, Vec::with_capacity(16)).await;
            assert_eq!((res.unwrap(), &buf[..]), (4, &b"late"[..]));
        });
    }

    #[test]
    fn blocking_jobs_run_unless_the_peer_reset() {
        testing::block_on(async {
            let cx = Context::detached(SocketAddr::from(([127, 0, 0, 1], 1)));
            let (conn, client) = testing::pipe();
            assert_eq!(cx.blocking(&conn, || 7).await.unwrap(), 7);
            drop(client);
            let err = cx.blocking(&conn, || 8).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        });
    }
}
