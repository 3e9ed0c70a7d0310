//! The worker: what every backend runs on each of its threads.
//!
//! One worker runs one accept loop per listener *slot* on its own `SO_REUSEPORT` socket, or its
//! own descriptor of a shared one (a Unix-domain socket, a socket systemd passed) (a slot is
//! one service's listening address; the main thread numbers them). An accepted connection is
//! admitted by the slot's current [`Handler`] (a service generation's gate and instance), wrapped
//! in [`Metered`], given its [`Context`], and served on a local task.
//!
//! A config reload reaches the worker as a [`Control`] message: start a slot (a new address),
//! swap a slot's handler (changed settings, same socket: nothing is closed or re-bound) or stop
//! a slot (its socket closes). Connections are never moved: each stays with the generation that
//! accepted it until it ends or that generation's drain deadline closes it.
//!
//! With the access log on for a service, the worker gives each connection's context its log
//! state ([`crate::access_log`]): the transport counts the connection's bytes, the worker sets
//! its outcome, and refused connections get a line of their own. Each worker also runs the
//! local task that hands its batched lines to the writer.
//!
//! On shutdown the accept loops end at once (their sockets close), then the worker waits for its
//! connections up to the drain deadline.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::access_log::{self, ConnBytes, ConnOutcome, ServiceLog, Who};
use crate::backend::{Backend, Listener};
use crate::context::{ConnLog, Context, Proxied};
use crate::datagram::DatagramService;
use crate::gate::{Rejection, ServiceGate};
use crate::listen::ListenSocket;
use crate::metered::Metered;
use crate::peer::Peer;
use crate::proxy::{self, Header};
use crate::service::DynService;
use crate::shutdown::{ConnTracker, Shutdown};

/// The connection type a backend's listener accepts, before metering.
pub type RawConnOf<B> = <<B as Backend>::Listener as Listener>::Conn;

/// The connection type plugins see on backend `B`.
pub type ConnOf<B> = Metered<RawConnOf<B>>;

/// Names one listening address across all workers (assigned by the caller, never reused).
pub type SlotId = u64;

/// What serves a slot's new connections: one generation of a service.
pub struct Handler<C> {
    /// Admission, metrics and the drain signal, shared with the service's other workers.
    pub gate: Arc<ServiceGate>,
    /// The protocol.
    pub service: Arc<dyn DynService<Metered<C>>>,
    /// The access log, when the service writes one.
    pub access_log: Option<ServiceLog>,
    /// What answers a UDP service's datagrams ([`crate::udp`]); `None` for stream services.
    pub datagrams: Option<Arc<dyn DatagramService>>,
}

impl<C> Clone for Handler<C> {
    fn clone(&self) -> Self {
        Handler {
            gate: Arc::clone(&self.gate),
            service: Arc::clone(&self.service),
            access_log: self.access_log.clone(),
            datagrams: self.datagrams.clone(),
        }
    }
}

/// A handler for backend `B`'s connections.
pub type HandlerOf<B> = Handler<RawConnOf<B>>;

/// One service's listening socket as one worker runs it.
pub struct WorkerService<B: Backend> {
    /// Which slot the socket belongs to.
    pub slot: SlotId,
    /// This worker's socket for the slot (bound, listening and non-blocking already).
    pub socket: ListenSocket,
    /// What serves it.
    pub handler: HandlerOf<B>,
}

/// One change to a worker's slots.
pub enum Change<B: Backend> {
    /// Start accepting on a new socket.
    Start(WorkerService<B>),
    /// New connections of `slot` go to `handler` from now on; open ones stay where they are.
    Swap {
        /// The slot to change.
        slot: SlotId,
        /// Its new handler.
        handler: HandlerOf<B>,
    },
    /// Stop accepting on `slot` and close its socket.
    Stop(SlotId),
}

/// A batch of changes, applied in order; `done` reports listeners that could not be adopted.
pub struct Control<B: Backend> {
    /// The changes.
    pub changes: Vec<Change<B>>,
    /// Answered once every change is in effect on this worker.
    pub done: oneshot::Sender<io::Result<()>>,
}

/// The sending side of a worker's control channel.
pub type ControlSender<B> = mpsc::UnboundedSender<Control<B>>;

/// A new control channel for one worker.
pub fn control_channel<B: Backend>() -> (ControlSender<B>, mpsc::UnboundedReceiver<Control<B>>) {
    mpsc::unbounded_channel()
}

/// Runs one worker on the current thread until shutdown and drain are done.
///
/// `ready` is called once every listener has been adopted, so the caller can report startup.
pub fn run<B: Backend>(
    id: usize,
    services: Vec<WorkerService<B>>,
    mut control: mpsc::UnboundedReceiver<Control<B>>,
    shutdown: Shutdown,
    ready: impl FnOnce(io::Result<()>),
) -> io::Result<()> {
    let mut ready = Some(ready);
    let result = B::block_on(async {
        let mut slots = Slots::<B> {
            id,
            handlers: HashMap::new(),
            loops: Vec::new(),
            tracker: ConnTracker::default(),
            shutdown: shutdown.clone(),
        };
        // Hands this worker's batched access log lines to the writer while it serves.
        let flusher = tokio::task::spawn_local(access_log::flush_batches());
        let started = services.into_iter().try_for_each(|s| slots.start(s));
        let failed = started.is_err();
        (ready.take().unwrap())(started);
        if failed {
            return;
        }

        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = stop.wait() => break,
                message = control.recv() => match message {
                    Some(Control { changes, done }) => {
                        let _ = done.send(slots.apply(changes));
                    }
                    // The main thread is gone: nothing will change any more.
                    None => {
                        stop.wait().await;
                        break;
                    }
                },
            }
        }

        for l in std::mem::take(&mut slots.loops) {
            let _ = l.await;
        }
        let tracker = &slots.tracker;
        let open = tracker.open();
        if open > 0 {
            debug!(worker = id, open, "draining connections");
            tracker.drain(shutdown).await;
        }
        // Only a shutdown sets drain deadlines (a reload does not), so every cut is this
        // drain's, even one that happened while the accept loops were still finishing. Add
        // any the worker's own deadline caught first.
        let cut = tracker.cut() + tracker.open();
        if cut > 0 {
            info!(
                worker = id,
                closed = cut,
                "grace period over, closed the connections still open"
            );
        }
        flusher.abort();
        access_log::flush_thread();
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

/// A worker's accept loops, by slot.
struct Slots<B: Backend> {
    id: usize,
    handlers: HashMap<SlotId, watch::Sender<Option<HandlerOf<B>>>>,
    loops: Vec<tokio::task::JoinHandle<()>>,
    tracker: ConnTracker,
    shutdown: Shutdown,
}

impl<B: Backend> Slots<B> {
    fn start(&mut self, s: WorkerService<B>) -> io::Result<()> {
        let adopt_error = |e: io::Error| {
            let msg = format!("worker {}: cannot adopt listening socket: {e}", self.id);
            io::Error::new(e.kind(), msg)
        };
        let (tx, rx) = watch::channel(Some(s.handler));
        let (tracker, shutdown) = (self.tracker.clone(), self.shutdown.clone());
        let accept =
            |listener, rx| tokio::task::spawn_local(accept_loop(listener, rx, tracker, shutdown));
        let task = match s.socket {
            ListenSocket::Tcp(socket) => accept(B::listener(socket).map_err(adopt_error)?, rx),
            ListenSocket::Unix(socket) => {
                accept(B::unix_listener(socket).map_err(adopt_error)?, rx)
            }
            ListenSocket::Udp(socket) => {
                let socket = B::datagram_socket(socket).map_err(adopt_error)?;
                let datagrams = crate::udp::datagram_loop(socket, rx, self.shutdown.clone());
                tokio::task::spawn_local(datagrams)
            }
        };
        self.handlers.insert(s.slot, tx);
        self.loops.push(task);
        Ok(())
    }

    fn apply(&mut self, changes: Vec<Change<B>>) -> io::Result<()> {
        let mut result = Ok(());
        for change in changes {
            match change {
                Change::Start(s) => {
                    if let Err(e) = self.start(s) {
                        result = Err(e);
                    }
                }
                Change::Swap { slot, handler } => {
                    if let Some(tx) = self.handlers.get(&slot) {
                        tx.send_replace(Some(handler));
                    }
                }
                // The accept loop sees `None`, ends, and drops (closes) its socket.
                Change::Stop(slot) => {
                    if let Some(tx) = self.handlers.remove(&slot) {
                        tx.send_replace(None);
                    }
                }
            }
        }
        self.loops.retain(|l| !l.is_finished());
        result
    }
}

/// Accepts connections for one slot until shutdown or until the slot is stopped.
async fn accept_loop<L: Listener>(
    listener: L,
    mut handler: watch::Receiver<Option<Handler<L::Conn>>>,
    tracker: ConnTracker,
    mut shutdown: Shutdown,
) {
    let mut backoff = AcceptBackoff::default();
    let Some(mut current) = handler.borrow().clone() else {
        return;
    };
    let mut admitted = Admitted::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            changed = handler.changed() => {
                let next = handler.borrow_and_update().clone();
                match (changed, next) {
                    (Ok(()), Some(next)) => {
                        current = next;
                        admitted = Admitted::default();
                        continue;
                    }
                    // Stopped by a reload: serve the connections the kernel already completed
                    // (closing the socket would reset them), then close it.
                    _ => {
                        while let Ok(Ok((conn, peer))) =
                            tokio::time::timeout(Duration::ZERO, listener.accept()).await
                        {
                            serve(&current, &admitted, conn, peer, &tracker);
                        }
                        break;
                    }
                }
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((conn, peer)) => {
                backoff.reset();
                // The handler in effect when the connection was accepted serves it to the end.
                serve(&current, &admitted, conn, peer, &tracker);
            }
            Err(e) => {
                let service = current.gate.service();
                if let Some(pause) = backoff.on_error(&e, service) {
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// Admits an accepted connection through `handler`'s gate and serves it on a local task until
/// it ends or its generation's drain deadline closes it (through `admitted`).
///
/// Admission's first step runs here, at accept. Without PROXY protocol the second runs here
/// too, so a refused connection costs no task; with it, the task first reads the header within
/// its deadline, then admits the client the header names.
fn serve<C: crate::conn::Conn + 'static>(
    handler: &Handler<C>,
    admitted: &Admitted,
    conn: C,
    peer: Peer,
    tracker: &ConnTracker,
) {
    let gate = &handler.gate;
    let log = handler.access_log.as_ref();
    let mut ticket = match gate.admit(&peer) {
        Ok(ticket) => ticket,
        Err(reason) => return refused(gate, log, peer, None, reason),
    };
    let proxied = gate.proxy().is_some();
    if !proxied {
        if let Err(reason) = ticket.admit_client(&peer) {
            return refused(gate, log, peer, None, reason);
        }
    }
    let accepted = tokio::time::Instant::now();
    let mut conn = Metered::new(conn, Arc::clone(gate.metrics()), gate.idle_timeout());
    // The connection's own byte counts, for its line; nothing when the service logs nothing.
    let log = log.map(|log| {
        let bytes = std::rc::Rc::new(ConnBytes::default());
        conn.count_into(std::rc::Rc::clone(&bytes));
        (log.clone(), bytes)
    });
    let gate = Arc::clone(gate);
    let service = Arc::clone(&handler.service);
    let tracked = tracker.track();
    let registration = admitted.register(&gate, tracker);
    let task = tokio::task::spawn_local(async move {
        // Declared first so it is dropped last, after the context: the entry leaves the
        // generation's set once the connection is closed.
        let _registration = registration;
        let service_log = log.as_ref().map(|(log, _)| log);
        let (client, proxy) = match gate.proxy() {
            None => (peer, None),
            Some(settings) => match proxy::read_header(&mut conn, settings, accepted).await {
                Ok(header) => {
                    let (client, destination) = match header {
                        Header::Proxied {
                            client,
                            destination,
                        } => (Peer::Ip(client), Some(destination)),
                        // The proxy's own health check: served as itself.
                        Header::Local => (peer, None),
                    };
                    if let Err(reason) = ticket.admit_client(&client) {
                        return refused(&gate, service_log, client, Some(peer), reason);
                    }
                    let by = peer;
                    (client, Some(Proxied { by, destination }))
                }
                Err(e) => {
                    debug!(service = gate.service(), %peer, error = %e, "PROXY header refused");
                    if let Some(log) = service_log {
                        log.refused(&who(peer, None), Rejection::ProxyProtocol.as_str());
                    }
                    return ticket.refuse(Rejection::ProxyProtocol);
                }
            },
        };
        let conn_log = log.map(|(log, bytes)| ConnLog::new(log, accepted, bytes));
        // Built inside the task: it lives in the task's one allocation, and holds the ticket
        // (the connection counts as open) until the task ends.
        let cx = Context::served(client, proxy, ticket, conn_log);
        let result = service.serve_dyn(conn, &cx).await;
        cx.set_outcome(ConnOutcome::of(&result));
        if let Err(e) = result {
            log_conn_error(&client, &e);
        }
        // Closed (its ticket released, its access log line written) before the worker may
        // count it gone.
        drop(cx);
        drop(tracked);
    });
    // The task has not run yet (same thread): it is in the set before it can end.
    admitted.insert(task.abort_handle());
}

/// A connection refused at admission (already counted by the gate): closed, with an access
/// log line when the service writes one.
fn refused(
    gate: &ServiceGate,
    log: Option<&ServiceLog>,
    client: Peer,
    proxy: Option<Peer>,
    reason: Rejection,
) {
    debug!(service = gate.service(), %client, reason = reason.as_str(), "connection rejected");
    if let Some(log) = log {
        log.refused(&who(client, proxy), reason.as_str());
    }
}

/// The facts of a connection that has no context (refused).
fn who(client: Peer, proxy: Option<Peer>) -> Who<'static> {
    Who {
        client,
        proxy,
        identity: None,
    }
}

/// The connections one accept loop admitted under one handler (a service generation) that are
/// still open, so that the generation's drain deadline closes them all from one watcher task.
/// (Each connection watching the deadline itself would cost every wakeup of every connection a
/// poll of the drain signal.)
#[derive(Clone, Default)]
struct Admitted(Rc<RefCell<AdmittedInner>>);

#[derive(Default)]
struct AdmittedInner {
    /// Open connections' tasks, by registration number.
    tasks: HashMap<u64, AbortHandle>,
    next: u64,
    /// Whether a watcher task waits for this generation's deadline.
    watched: bool,
    /// Notified when `tasks` becomes empty, so a retired generation's watcher can end.
    emptied: Rc<Notify>,
}

/// A connection's place in its generation's set; dropping it (when the task ends, or is
/// aborted) takes the connection out.
struct Registration {
    admitted: Admitted,
    id: u64,
}

impl Admitted {
    /// Reserves a place for a connection about to be spawned, and makes sure a watcher closes
    /// this generation's connections at its drain deadline.
    fn register(&self, gate: &ServiceGate, tracker: &ConnTracker) -> Registration {
        let mut inner = self.0.borrow_mut();
        if !inner.watched {
            inner.watched = true;
            tokio::task::spawn_local(self.clone().watch(gate.retirement(), tracker.clone()));
        }
        let id = inner.next;
        inner.next += 1;
        Registration {
            admitted: self.clone(),
            id,
        }
    }

    /// Records the task of the connection registered last.
    fn insert(&self, task: AbortHandle) {
        let mut inner = self.0.borrow_mut();
        let id = inner.next - 1;
        inner.tasks.insert(id, task);
    }

    /// Waits for the generation's drain deadline and closes (aborts) its connections still
    /// open then; ends early once the generation is retired and has no connection left.
    async fn watch(self, mut drain: Shutdown, tracker: ConnTracker) {
        let mut retired = drain.clone();
        let emptied = Rc::clone(&self.0.borrow().emptied);
        let finished = async {
            retired.wait().await;
            loop {
                let notified = emptied.notified();
                if self.0.borrow().tasks.is_empty() {
                    return;
                }
                notified.await;
            }
        };
        tokio::select! {
            _ = drain.deadline() => {
                let cut: Vec<AbortHandle> =
                    self.0.borrow_mut().tasks.drain().map(|(_, task)| task).collect();
                if !cut.is_empty() {
                    debug!(closed = cut.len(), "closed connections still open at the end of the drain");
                    tracker.record_cut(cut.len());
                }
                // Aborted tasks drop their futures (closing the connections) at the next tick.
                for task in cut {
                    task.abort();
                }
            }
            _ = finished => {}
        }
        // A connection admitted after this (the handler had not been swapped yet) starts a
        // new watcher.
        self.0.borrow_mut().watched = false;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.admitted.0.borrow_mut();
        if inner.tasks.remove(&self.id).is_some() && inner.tasks.is_empty() {
            inner.emptied.notify_waiters();
        }
    }
}

fn log_conn_error(peer: &Peer, e: &io::Error) {
    // Clients vanishing or idling out are everyday events, not server problems.
    debug!(%peer, error = %e, "connection ended with an error");
}

/// Exponential backoff for accept errors that mean "out of resources" (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM): retrying at once would spin. Per-connection errors (the peer reset before we
/// accepted) are retried immediately.
#[derive(Default)]
pub(crate) struct AcceptBackoff {
    current: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub(crate) fn reset(&mut self) {
        self.current = None;
    }

    pub(crate) fn on_error(&mut self, e: &io::Error, service: &str) -> Option<Duration> {
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
