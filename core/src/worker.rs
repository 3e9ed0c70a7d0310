//! The worker: what every backend runs on each of its threads.
//!
//! One worker runs one accept loop per service on its own `SO_REUSEPORT` socket. An accepted
//! connection is admitted by the service's [`ServiceGate`], wrapped in [`Metered`], and served
//! on a local task. On shutdown the accept loops end at once (their sockets close), then the
//! worker waits for its connections up to the grace period.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::backend::{Backend, Listener};
use crate::gate::ServiceGate;
use crate::metered::Metered;
use crate::service::DynService;
use crate::shutdown::{ConnTracker, Shutdown};

/// The connection type plugins see on backend `B`.
pub type ConnOf<B> = Metered<<<B as Backend>::Listener as Listener>::Conn>;

/// One service as one worker runs it.
pub struct WorkerService<B: Backend> {
    /// This worker's socket for the service (bound and listening already).
    pub socket: std::net::TcpListener,
    /// Admission and metrics, shared with the service's other workers.
    pub gate: Arc<ServiceGate>,
    /// The protocol.
    pub service: Arc<dyn DynService<ConnOf<B>>>,
}

/// Runs one worker on the current thread until shutdown and drain are done.
///
/// `ready` is called once every listener has been adopted, so the caller can report startup.
pub fn run<B: Backend>(
    id: usize,
    services: Vec<WorkerService<B>>,
    shutdown: Shutdown,
    grace: Duration,
    ready: impl FnOnce(io::Result<()>),
) -> io::Result<()> {
    let mut ready = Some(ready);
    let result = B::block_on(async {
        let mut listeners = Vec::with_capacity(services.len());
        for s in services {
            match B::listener(s.socket) {
                Ok(l) => listeners.push((l, s.gate, s.service)),
                Err(e) => {
                    let msg = format!("worker {id}: cannot adopt listening socket: {e}");
                    (ready.take().unwrap())(Err(io::Error::new(e.kind(), msg)));
                    return;
                }
            }
        }
        (ready.take().unwrap())(Ok(()));

        let tracker = ConnTracker::default();
        let loops: Vec<_> = listeners
            .into_iter()
            .map(|(listener, gate, service)| {
                let accept =
                    accept_loop(listener, gate, service, tracker.clone(), shutdown.clone());
                tokio::task::spawn_local(accept)
            })
            .collect();
        for l in loops {
            let _ = l.await;
        }
        let open = tracker.open();
        if open > 0 {
            debug!(worker = id, open, "draining connections");
            if !tracker.drain(grace).await {
                info!(
                    worker = id,
                    still_open = tracker.open(),
                    grace = ?grace,
                    "grace period over, closing remaining connections"
                );
            }
        }
    });
    if let Some(ready) = ready.take() {
        // The runtime itself could not be built.
        let err = result
            .as_ref()
            .err()
            .map(|e| io::Error::new(e.kind(), e.to_string()));
        ready(Err(err.unwrap_or_else(|| {
            io::Error::other("worker ended before start")
        })));
    }
    result
}

/// Accepts connections for one service until shutdown.
async fn accept_loop<L: Listener>(
    listener: L,
    gate: Arc<ServiceGate>,
    service: Arc<dyn DynService<Metered<L::Conn>>>,
    tracker: ConnTracker,
    mut shutdown: Shutdown,
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            accepted = listener.accept() => accepted,
        };
        let (conn, peer) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(e) => {
                if let Some(pause) = backoff.on_error(&e, gate.labels().service.as_str()) {
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                continue;
            }
        };
        match gate.admit(peer.ip()) {
            Ok(ticket) => {
                let conn = ticket.wrap(conn, shutdown.clone());
                let service = Arc::clone(&service);
                let tracked = tracker.track();
                tokio::task::spawn_local(async move {
                    let _tracked = tracked;
                    if let Err(e) = service.serve_dyn(conn).await {
                        log_conn_error(&peer, &e);
                    }
                });
            }
            Err(reason) => {
                debug!(service = %gate.labels().service, %peer, reason = reason.as_str(), "connection rejected");
                drop(conn);
            }
        }
    }
}

fn log_conn_error(peer: &SocketAddr, e: &io::Error) {
    // Clients vanishing or idling out are everyday events, not server problems.
    debug!(%peer, error = %e, "connection ended with an error");
}

/// Exponential backoff for accept errors that mean "out of resources" (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM): retrying at once would spin. Per-connection errors (the peer reset before we
/// accepted) are retried immediately.
#[derive(Default)]
struct AcceptBackoff {
    current: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn reset(&mut self) {
        self.current = None;
    }

    fn on_error(&mut self, e: &io::Error, service: &str) -> Option<Duration> {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
        ) {
            return None;
        }
        let next = match self.current {
            None => Self::FIRST,
            Some(d) => (d * 2).min(Self::MAX),
        };
        if self.current.is_none() {
            warn!(service, error = %e, "accept failed; backing off");
        }
        self.current = Some(next);
        Some(next)
    }
}
