//! `wharf serve`: bind everything, start the workers, serve until a signal, drain, exit; and
//! reload the config on SIGHUP or when the file changes (`--watch-config`).
//!
//! Order matters for a clean failure: the backend is resolved and every socket (services and
//! metrics) is bound on the main thread before any worker starts, so a refused io_uring or an
//! address in use is a one-line error and nothing half-runs. Signal handlers are installed
//! before workers start, so an early SIGTERM still drains and an early SIGHUP still reloads.
//!
//! A reload is a transaction on [`Running`]: the new config is loaded and validated, every new
//! address is bound, and only then are the workers told (see [`crate::reload`] for what is kept,
//! swapped, started and stopped). Any failure before that point leaves the running services
//! untouched.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};
use wharf_backend_epoll::Epoll;
use wharf_backend_uring::IoUring;
use wharf_core::backend::Backend;
use wharf_core::config::{BackendChoice, Config, ConfigError};
use wharf_core::gate::{self, ServiceGate, ServiceLabels};
use wharf_core::net::{bind_reuseport_group, Cidr};
use wharf_core::service::DynService;
use wharf_core::shutdown::{self, Shutdown};
use wharf_core::worker::{
    self, Change, ConnOf, Control, ControlSender, Handler, SlotId, WorkerService,
};

use crate::activation::Activated;
use crate::metrics_http;
use crate::plan::{Plan, PlannedService};
use crate::registry::BuiltService;
use crate::reload::{self, FileWatcher, ServiceKey, Step};

/// A failure that stops `wharf serve`, already worded for the user.
#[derive(Debug)]
pub struct ServeError(pub String);

/// Which backend the workers will run, with the reason when it was chosen automatically.
fn resolve_backend(choice: BackendChoice) -> Result<BackendChoice, ServeError> {
    match choice {
        BackendChoice::Epoll => Ok(BackendChoice::Epoll),
        BackendChoice::IoUring => match wharf_backend_uring::probe() {
            Ok(()) => Ok(BackendChoice::IoUring),
            Err(why) => Err(ServeError(format!(
                "server.backend = \"io_uring\" but {why}; use backend = \"epoll\" or \"auto\""
            ))),
        },
        BackendChoice::Auto => match wharf_backend_uring::probe() {
            Ok(()) => {
                info!("backend auto: using io_uring (the kernel allows io_uring rings)");
                Ok(BackendChoice::IoUring)
            }
            Err(why) => {
                info!("backend auto: using epoll because {why}");
                Ok(BackendChoice::Epoll)
            }
        },
    }
}

/// Where a reload gets its configuration from.
pub struct ReloadSource {
    /// Loads and validates the config again (same file, same command-line overrides).
    pub load: Arc<dyn Fn() -> Result<Plan, Vec<ConfigError>> + Send + Sync>,
    /// `--watch-config`: the file to poll for changes.
    pub watch: Option<PathBuf>,
}

/// Runs the plan until SIGTERM/SIGINT and the drain that follows, reloading on SIGHUP.
pub fn run(plan: Plan, reload: ReloadSource) -> Result<(), ServeError> {
    let backend = resolve_backend(plan.config.server.backend)?;
    match backend {
        BackendChoice::IoUring => launch::<IoUring>(plan, reload, |b| Arc::clone(&b.io_uring)),
        _ => launch::<Epoll>(plan, reload, |b| Arc::clone(&b.epoll)),
    }
}

/// Picks backend `B`'s instance out of a built service.
type InstanceOf<B> = fn(&BuiltService) -> Arc<dyn DynService<ConnOf<B>>>;

/// One running service, as the main thread tracks it.
struct RunningService {
    key: ServiceKey,
    /// The address its socket actually has (port 0 resolved, or the activated socket's).
    bound: SocketAddr,
    slot: SlotId,
    /// The generation serving new connections.
    gate: Arc<ServiceGate>,
}

/// Everything the main thread needs to reload and to stop.
struct Running<B: Backend> {
    instance: InstanceOf<B>,
    workers: Vec<ControlSender<B>>,
    services: Vec<RunningService>,
    next_slot: SlotId,
    /// The settings in effect (restart-only ones stay as started).
    config: Config,
    metrics_allow: watch::Sender<Vec<Cidr>>,
}

fn launch<B: Backend>(
    plan: Plan,
    reload: ReloadSource,
    instance: InstanceOf<B>,
) -> Result<(), ServeError> {
    let server = &plan.config.server;
    let workers = match server.workers {
        0 => thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    // Bind everything first (or take the sockets systemd passed).
    let mut activated = Activated::from_env().map_err(ServeError)?;
    let mut groups = Vec::with_capacity(plan.services.len());
    for svc in &plan.services {
        let group = match activated.take(&svc.name, Some(svc.config.listen)) {
            // One socket shared by every worker (each accepts on its own descriptor of it).
            Some(socket) => (0..workers)
                .map(|_| socket.try_clone())
                .collect::<io::Result<Vec<_>>>()
                .and_then(|g| {
                    g.iter().try_for_each(|s| s.set_nonblocking(true))?;
                    Ok((socket.local_addr()?, g))
                })
                .map_err(|e| ServeError(format!("socket activation: {}: {e}", svc.name)))?,
            None => bind_service(&plan, svc, workers)?,
        };
        groups.push(group);
    }
    let metrics_addr = plan.config.metrics.as_ref().map(|m| m.listen);
    let metrics_socket = match (
        &plan.config.metrics,
        activated.take("metrics", metrics_addr),
    ) {
        (Some(_), Some(socket)) => {
            socket
                .set_nonblocking(true)
                .map_err(|e| ServeError(format!("socket activation: metrics: {e}")))?;
            Some(socket)
        }
        (Some(m), None) => Some(
            bind_metrics(m.listen)
                .map_err(|e| bind_error(&plan, "metrics.listen", m.listen, &e))?,
        ),
        (None, Some(_)) => return Err(ServeError(
            "socket activation passed a `metrics` socket but the config has no [metrics] section"
                .into(),
        )),
        (None, None) => None,
    };
    let unused = activated.leftover();
    if !unused.is_empty() {
        return Err(ServeError(format!(
            "socket activation passed sockets {} that match no service by name or listen \
             address (services: {})",
            unused.join(", "),
            plan.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    // Metrics recorder before any handle is registered.
    let prometheus = match &metrics_socket {
        Some(_) => {
            let handle = metrics_http::install_recorder().map_err(ServeError)?;
            gate::describe_metrics();
            metrics::gauge!(gate::names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            for result in ReloadResult::ALL {
                metrics::counter!(gate::names::CONFIG_RELOADS, "result" => result.as_str())
                    .increment(0);
            }
            metrics::gauge!(gate::names::CONFIG_LAST_RELOAD_SUCCESSFUL).set(1.0);
            Some(handle)
        }
        None => None,
    };

    let main_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError(format!("cannot start the main runtime: {e}")))?;
    let signals = main_rt
        .block_on(async { Signals::install() })
        .map_err(|e| ServeError(format!("cannot install signal handlers: {e}")))?;

    // One set of sockets per worker.
    let (metrics_allow, metrics_allow_rx) = watch::channel(
        plan.config
            .metrics
            .as_ref()
            .map(|m| m.allow_from.clone())
            .unwrap_or_default(),
    );
    let mut running = Running::<B> {
        instance,
        workers: Vec::with_capacity(workers),
        services: Vec::with_capacity(plan.services.len()),
        next_slot: 0,
        config: plan.config.clone(),
        metrics_allow,
    };
    let mut per_worker: Vec<Vec<WorkerService<B>>> = (0..workers).map(|_| Vec::new()).collect();
    for (svc, (bound, group)) in plan.services.iter().zip(groups) {
        let (slot, handler) = running.new_generation(svc, None);
        for (worker_services, socket) in per_worker.iter_mut().zip(group) {
            worker_services.push(WorkerService {
                slot,
                socket,
                handler: handler.clone(),
            });
        }
        running.services.push(RunningService {
            key: ServiceKey::of(svc),
            bound,
            slot,
            gate: handler.gate,
        });
    }

    let (trigger, stop) = shutdown::channel();
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let mut threads = Vec::with_capacity(workers);
    for (id, services) in per_worker.into_iter().enumerate() {
        let stop: Shutdown = stop.clone();
        let ready = ready_tx.clone();
        let (control, control_rx) = worker::control_channel::<B>();
        running.workers.push(control);
        let handle = thread::Builder::new()
            .name(format!("wharf-worker-{id}"))
            .spawn(move || {
                worker::run::<B>(id, services, control_rx, stop, move |r| {
                    let _ = ready.send(r);
                })
            })
            .map_err(|e| ServeError(format!("cannot start worker thread: {e}")))?;
        threads.push(handle);
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                trigger.trigger(Duration::ZERO);
                return Err(ServeError(format!(
                    "{} backend failed to start: {e}",
                    B::NAME
                )));
            }
            Err(_) => {
                return Err(ServeError(format!(
                    "{} worker died during startup",
                    B::NAME
                )));
            }
        }
    }

    for s in &running.services {
        log_listening::<B>(s, &running.config, workers);
    }

    main_rt.block_on(async move {
        // Every service is listening by now: /readyz says so until the drain begins.
        let readiness = metrics_http::Readiness::default();
        readiness.set_ready();
        let metrics_task = match (metrics_socket, prometheus) {
            (Some(socket), Some(handle)) => {
                info!(listen = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint listening at /metrics, /healthz, /readyz");
                let serve = metrics_http::serve(socket, handle, metrics_allow_rx, readiness.clone());
                Some(tokio::spawn(serve))
            }
            _ => None,
        };
        let mut watcher = reload.watch.clone().map(|path| {
            info!(path = %path.display(), every = ?reload::WATCH_INTERVAL, "watching the config file for changes");
            FileWatcher::new(path)
        });
        info!(config = %plan.origin, "wharf ready");
        drop(plan);

        let mut signals = signals;
        let mut tick = tokio::time::interval(reload::WATCH_INTERVAL);
        let signal = loop {
            let why = tokio::select! {
                signal = signals.recv() => match signal {
                    Signal::Hup => "SIGHUP",
                    stop => break stop,
                },
                _ = tick.tick(), if watcher.is_some() => {
                    if !watcher.as_mut().is_some_and(FileWatcher::poll) {
                        continue;
                    }
                    "config file changed"
                }
            };
            if let Some(w) = watcher.as_mut() {
                w.mark_loaded();
            }
            running.reload(why, &reload.load).await;
        };

        let grace = running.config.server.shutdown_grace;
        info!(signal = signal.name(), grace = ?grace, "shutting down: no new connections, draining open ones");
        readiness.set_draining();
        trigger.trigger(grace);
        running.retire_all(grace);
        // A second stop signal during the drain means "now": exit without waiting for the grace.
        tokio::spawn(async move {
            loop {
                match signals.recv().await {
                    Signal::Hup => info!("SIGHUP ignored: shutting down"),
                    again => {
                        warn!(signal = again.name(), "second signal: exiting without finishing the drain");
                        std::process::exit(1);
                    }
                }
            }
        });
        // Join workers off the runtime so the metrics endpoint keeps answering while they drain.
        let failed = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|t| t.join())
                .filter(|r| !matches!(r, Ok(Ok(()))))
                .count()
        })
        .await
        .unwrap_or(1);
        if let Some(task) = metrics_task {
            task.abort();
        }
        if failed > 0 {
            return Err(ServeError(format!("{failed} worker(s) ended with an error or a panic")));
        }
        info!("stopped");
        Ok(())
    })
}

fn log_listening<B: Backend>(s: &RunningService, config: &Config, workers: usize) {
    let plugin = config
        .services
        .get(&s.key.name)
        .map_or("", |c| c.plugin.as_str());
    info!(
        service = %s.key.name,
        plugin = %plugin,
        listen = %s.bound,
        backend = %B::NAME,
        workers,
        "listening"
    );
}

/// The outcomes `wharf_config_reloads_total{result}` counts.
#[derive(Clone, Copy)]
enum ReloadResult {
    /// Applied.
    Success,
    /// The new config has errors; nothing changed.
    Invalid,
    /// Valid, but could not be applied (an address in use...); nothing changed.
    Failed,
}

impl ReloadResult {
    const ALL: [ReloadResult; 3] = [Self::Success, Self::Invalid, Self::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }

    fn record(self) {
        metrics::counter!(gate::names::CONFIG_RELOADS, "result" => self.as_str()).increment(1);
        let ok = matches!(self, Self::Success);
        metrics::gauge!(gate::names::CONFIG_LAST_RELOAD_SUCCESSFUL).set(if ok { 1.0 } else { 0.0 });
    }
}

impl<B: Backend> Running<B> {
    /// A gate and instance for a planned service, on a fresh slot. `previous` is the generation
    /// it replaces, if it is the same service (same name): they share `max_connections`.
    fn new_generation(
        &mut self,
        svc: &PlannedService,
        previous: Option<&ServiceGate>,
    ) -> (SlotId, Handler<worker::RawConnOf<B>>) {
        let labels = ServiceLabels {
            service: svc.name.clone(),
            plugin: svc.config.plugin.clone(),
            backend: B::NAME.to_string(),
        };
        let gate = ServiceGate::new(labels, &svc.config, svc.built.outcomes, previous);
        let handler = Handler {
            gate,
            service: (self.instance)(&svc.built),
        };
        let slot = self.next_slot;
        self.next_slot += 1;
        (slot, handler)
    }

    /// The generation now serving the service called `name`, if one is running.
    fn generation_of(&self, name: &str) -> Option<Arc<ServiceGate>> {
        self.services
            .iter()
            .find(|s| s.key.name == name)
            .map(|s| Arc::clone(&s.gate))
    }

    /// Loads the config again and applies it; logs and counts the outcome. Never stops the
    /// server: whatever goes wrong, the running configuration stays.
    async fn reload(
        &mut self,
        why: &str,
        load: &Arc<dyn Fn() -> Result<Plan, Vec<ConfigError>> + Send + Sync>,
    ) {
        info!(trigger = why, "reloading the configuration");
        let started = std::time::Instant::now();
        let load = Arc::clone(load);
        let loaded = tokio::task::spawn_blocking(move || load())
            .await
            .unwrap_or_else(|e| {
                Err(vec![ConfigError {
                    origin: "reload".into(),
                    key: String::new(),
                    message: format!("loading the config panicked: {e}"),
                }])
            });
        let result = match loaded {
            Err(errors) => {
                for e in &errors {
                    error!("config error: {e}");
                }
                warn!(
                    errors = errors.len(),
                    "reload rejected: the configuration is invalid; still running the previous one"
                );
                ReloadResult::Invalid
            }
            Ok(plan) => match self.apply(plan, started).await {
                Ok(()) => ReloadResult::Success,
                Err(ServeError(msg)) => {
                    error!("reload failed: {msg}; still running the previous configuration");
                    ReloadResult::Failed
                }
            },
        };
        result.record();
    }

    /// Applies a validated plan: binds new addresses first (any failure leaves everything as it
    /// was), then tells every worker, then retires the generations that were replaced.
    async fn apply(&mut self, plan: Plan, started: std::time::Instant) -> Result<(), ServeError> {
        let running: Vec<ServiceKey> = self.services.iter().map(|s| s.key.clone()).collect();
        let new: Vec<ServiceKey> = plan.services.iter().map(ServiceKey::of).collect();
        let steps = reload::diff(&running, &new);
        let workers = self.workers.len();

        // 1. Bind every new address; nothing has changed yet if one fails.
        let mut groups = Vec::new();
        for step in &steps {
            if let Step::Start { new } = *step {
                groups.push((new, bind_service(&plan, &plan.services[new], workers)?));
            }
        }

        // 2. The changes, per worker, and the state that results.
        let mut changes: Vec<Vec<Change<B>>> = (0..workers).map(|_| Vec::new()).collect();
        let mut next: Vec<Option<RunningService>> = (0..new.len()).map(|_| None).collect();
        let mut retired = Vec::new();
        let mut summary = Summary::default();
        for step in &steps {
            match *step {
                Step::Keep { running, new } => {
                    let s = &self.services[running];
                    next[new] = Some(RunningService {
                        key: s.key.clone(),
                        bound: s.bound,
                        slot: s.slot,
                        gate: Arc::clone(&s.gate),
                    });
                }
                Step::Swap { running, new } => {
                    let svc = &plan.services[new];
                    let old = &self.services[running];
                    let same = (old.key.name == svc.name).then(|| Arc::clone(&old.gate));
                    let (slot, bound) = (old.slot, old.bound);
                    retired.push(Arc::clone(&old.gate));
                    summary.changed.push(describe_swap(&old.key, &svc.name));
                    let (_, handler) = self.new_generation(svc, same.as_deref());
                    for c in &mut changes {
                        c.push(Change::Swap {
                            slot,
                            handler: handler.clone(),
                        });
                    }
                    next[new] = Some(RunningService {
                        key: ServiceKey::of(svc),
                        bound,
                        slot,
                        gate: handler.gate,
                    });
                }
                Step::Start { new } => {
                    let svc = &plan.services[new];
                    let (_, (bound, group)) = groups
                        .iter_mut()
                        .find(|(n, _)| *n == new)
                        .expect("bound above");
                    // Same name on a new address: still one service for `max_connections`.
                    let same = self.generation_of(&svc.name);
                    let (slot, handler) = self.new_generation(svc, same.as_deref());
                    for (c, socket) in changes.iter_mut().zip(group.drain(..)) {
                        c.push(Change::Start(WorkerService {
                            slot,
                            socket,
                            handler: handler.clone(),
                        }));
                    }
                    summary.added.push(format!("{} ({})", svc.name, bound));
                    summary.started.push(slot);
                    next[new] = Some(RunningService {
                        key: ServiceKey::of(svc),
                        bound: *bound,
                        slot,
                        gate: handler.gate,
                    });
                }
                Step::Stop { running } => {
                    let old = &self.services[running];
                    for c in &mut changes {
                        c.push(Change::Stop(old.slot));
                    }
                    retired.push(Arc::clone(&old.gate));
                    summary
                        .removed
                        .push(format!("{} ({})", old.key.name, old.bound));
                }
            }
        }

        // 3. Every worker applies its batch; wait until all have.
        let mut acks = Vec::with_capacity(workers);
        for (control, changes) in self.workers.iter().zip(changes) {
            let (done, ack) = oneshot::channel();
            if control.send(Control { changes, done }).is_ok() {
                acks.push(ack);
            }
        }
        let mut failures = Vec::new();
        for ack in acks {
            match ack.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(_) => failures.push("a worker is gone".into()),
            }
        }

        // 4. The replaced generations drain under the new grace period.
        let grace = plan.config.server.shutdown_grace;
        for gate in retired {
            gate.retire(grace);
        }
        summary.unchanged = steps
            .iter()
            .filter(|s| matches!(s, Step::Keep { .. }))
            .count();
        self.services = next.into_iter().flatten().collect();
        let restart = reload::restart_only(&self.config, &plan.config);
        self.adopt_settings(&plan.config);
        for s in self
            .services
            .iter()
            .filter(|s| summary.started.contains(&s.slot))
        {
            log_listening::<B>(s, &self.config, workers);
        }
        if !failures.is_empty() {
            return Err(ServeError(format!(
                "partly applied: {}",
                failures.join("; ")
            )));
        }
        info!(
            config = %plan.origin,
            unchanged = summary.unchanged,
            changed = %summary.changed.join(", "),
            added = %summary.added.join(", "),
            removed = %summary.removed.join(", "),
            took = ?started.elapsed(),
            "configuration reloaded"
        );
        if !restart.is_empty() {
            warn!(
                settings = %restart.join(", "),
                "these settings changed but only take effect after a restart"
            );
        }
        Ok(())
    }

    /// Takes the reloadable settings of `new`; restart-only ones stay as started.
    fn adopt_settings(&mut self, new: &Config) {
        self.config.server.shutdown_grace = new.server.shutdown_grace;
        self.config.services = new.services.clone();
        if let (Some(running), Some(new)) = (self.config.metrics.as_mut(), new.metrics.as_ref()) {
            running.allow_from = new.allow_from.clone();
            self.metrics_allow.send_replace(new.allow_from.clone());
        }
    }

    /// Starts the drain of every service generation (shutdown).
    fn retire_all(&self, grace: Duration) {
        for s in &self.services {
            s.gate.retire(grace);
        }
    }
}

fn describe_swap(old: &ServiceKey, new_name: &str) -> String {
    if old.name == new_name {
        old.name.clone()
    } else {
        format!("{} (was {})", new_name, old.name)
    }
}

/// What a reload did, for its log line.
#[derive(Default)]
struct Summary {
    unchanged: usize,
    changed: Vec<String>,
    added: Vec<String>,
    removed: Vec<String>,
    /// Slots of the added services.
    started: Vec<SlotId>,
}

/// Binds `svc`'s address for every worker; errors name the config key.
fn bind_service(
    plan: &Plan,
    svc: &PlannedService,
    workers: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), ServeError> {
    bind_reuseport_group(svc.config.listen, workers)
        .and_then(|g| Ok((g[0].local_addr()?, g)))
        .map_err(|e| {
            let key = format!("services.{}.listen", svc.name);
            bind_error(plan, &key, svc.config.listen, &e)
        })
}

fn bind_metrics(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn bind_error(plan: &Plan, key: &str, addr: SocketAddr, e: &io::Error) -> ServeError {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => " (another process is listening there)",
        io::ErrorKind::AddrNotAvailable => " (no local interface has that address)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
        _ => "",
    };
    let located = plan
        .source
        .error_at(key, format!("cannot listen on {addr}: {e}{hint}"));
    ServeError(located.to_string())
}

/// The signals `serve` acts on.
#[derive(Clone, Copy)]
enum Signal {
    Term,
    Int,
    Hup,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
        }
    }
}

/// SIGTERM, SIGINT (stop) and SIGHUP (reload), installed before workers start.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Term,
            _ = self.int.recv() => Signal::Int,
            _ = self.hup.recv() => Signal::Hup,
        }
    }
}
