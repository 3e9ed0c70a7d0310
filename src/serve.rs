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
use wharf_core::gate::ServiceGate;
use wharf_core::metrics::{self as core_metrics, ServiceLabels};
use wharf_core::net::{bind_reuseport_group, Cidr};
use wharf_core::service::DynService;
use wharf_core::shutdown::{self, Shutdown};
use wharf_core::worker::{
    self, Change, ConnOf, Control, ControlSender, Handler, SlotId, WorkerService,
};

use crate::activation::Activated;
use crate::metrics_http;
use crate::notify;
use crate::plan::{Plan, PlannedService};
use crate::registry::{BuiltService, Instance};
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
    /// `--watch-config`: the file to poll for changes, and its content as read just before the
    /// startup load (so a change made while starting is not missed).
    pub watch: Option<(PathBuf, Option<Vec<u8>>)>,
}

static EARLY_SIGHUP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once tokio's handler is in place. Tokio's handler (signal-hook-registry) also calls the
/// handler it replaced, this one, for every later SIGHUP: without this flag a SIGHUP arriving
/// during startup would be seen twice, and cause two reloads.
static SIGHUP_HANDED_OVER: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_early_sighup(_: libc::c_int) {
    use std::sync::atomic::Ordering::SeqCst;
    if !SIGHUP_HANDED_OVER.load(SeqCst) {
        EARLY_SIGHUP.store(true, SeqCst);
    }
}

/// Call first thing in `serve`: until the real handlers are installed (after the config is
/// loaded and every socket bound), a SIGHUP (`systemctl reload`, a ConfigMap watcher) would
/// otherwise kill the process. It is remembered and acted on once serving.
pub fn catch_early_sighup() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGHUP,
            on_early_sighup as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}

/// Call right after installing tokio's SIGHUP handler: from then on its stream reports every
/// SIGHUP. Returns whether one came before. (One arriving between tokio's `sigaction` and this
/// call is reported by both: a second reload of an unchanged file, which is harmless.)
fn hand_over_sighup() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    SIGHUP_HANDED_OVER.store(true, SeqCst);
    EARLY_SIGHUP.swap(false, SeqCst)
}

/// Runs the plan until SIGTERM/SIGINT and the drain that follows, reloading on SIGHUP.
pub fn run(plan: Plan, reload: ReloadSource) -> Result<(), ServeError> {
    // However serving ends (the drain, a grace that expired, a startup error after workers
    // started, a panic unwinding), no child process it started survives it.
    let _children = KillChildrenOnExit;
    let backend = resolve_backend(plan.config.server.backend)?;
    match backend {
        BackendChoice::IoUring => launch::<IoUring>(plan, reload, |b| Arc::clone(&b.io_uring)),
        _ => launch::<Epoll>(plan, reload, |b| Arc::clone(&b.epoll)),
    }
}

/// Kills every child process group still recorded ([`wharf_core::children`]) when dropped,
/// and keeps any new one from starting.
struct KillChildrenOnExit;

impl Drop for KillChildrenOnExit {
    fn drop(&mut self) {
        kill_children();
    }
}

fn kill_children() {
    let killed = wharf_core::children::kill_all();
    if killed > 0 {
        warn!(
            groups = killed,
            "killed child processes still running at exit"
        );
    }
}

/// Picks backend `B`'s instance out of a built service.
type InstanceOf<B> = fn(&BuiltService) -> Arc<dyn DynService<ConnOf<B>>>;

/// One running service, as the main thread tracks it.
#[derive(Clone)]
struct RunningService {
    key: ServiceKey,
    /// The address its socket actually has (port 0 resolved, or the activated socket's).
    bound: SocketAddr,
    slot: SlotId,
    /// The generation serving new connections.
    gate: Arc<ServiceGate>,
    /// Its socket came from systemd, which keeps its own copy open.
    activated: bool,
    /// The plugin instance of that generation, which a replacing one inherits bounds from.
    instance: Instance,
}

/// Everything the main thread needs to reload and to stop.
struct Running<B: Backend> {
    instance: InstanceOf<B>,
    workers: Vec<ControlSender<B>>,
    services: Vec<RunningService>,
    next_slot: SlotId,
    /// Generations a reload replaced, still draining (until their last connection ends).
    retired: Vec<std::sync::Weak<ServiceGate>>,
    /// The settings in effect (restart-only ones stay as started).
    config: Config,
    metrics_allow: watch::Sender<Vec<Cidr>>,
}

fn launch<B: Backend>(
    plan: Plan,
    mut reload: ReloadSource,
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
                .map_err(|e| ServeError(format!("socket activation: {}: {e}", svc.name)))
                .map(|(addr, g)| (addr, g, true))?,
            None => {
                let (addr, g) = bind_service(&plan, svc, workers)?;
                (addr, g, false)
            }
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
            core_metrics::describe();
            metrics::gauge!(core_metrics::names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            for result in ReloadResult::ALL {
                metrics::counter!(core_metrics::names::CONFIG_RELOADS, "result" => result.as_str())
                    .increment(0);
            }
            metrics::gauge!(core_metrics::names::CONFIG_LAST_RELOAD_SUCCESSFUL).set(1.0);
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
    // A SIGHUP that came while starting: the file may have changed since it was read.
    let early_sighup = hand_over_sighup();

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
        retired: Vec::new(),
        config: plan.config.clone(),
        metrics_allow,
    };
    let mut per_worker: Vec<Vec<WorkerService<B>>> = (0..workers).map(|_| Vec::new()).collect();
    for (svc, (bound, group, activated)) in plan.services.iter().zip(groups) {
        let (service, started) = running.start_service(svc, bound, group, activated);
        for (worker_services, started) in per_worker.iter_mut().zip(started) {
            worker_services.push(started);
        }
        running.services.push(service);
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
        let mut watcher = reload.watch.take().map(|(path, loaded)| {
            info!(path = %path.display(), every = ?reload::WATCH_INTERVAL, "watching the config file for changes");
            FileWatcher::new(path, loaded)
        });
        info!(config = %plan.origin, "wharf ready");
        notify::notify("READY=1");
        drop(plan);

        let mut signals = signals;
        let mut tick = tokio::time::interval(reload::WATCH_INTERVAL);
        let mut pending_hup = early_sighup;
        let signal = 'serve: loop {
            // SIGHUP (now or while a reload ran), or a change the watcher saw.
            let file_changed = if std::mem::take(&mut pending_hup) {
                false
            } else {
                tokio::select! {
                    biased;
                    signal = signals.recv() => match signal {
                        Signal::Hup => false,
                        stop => break 'serve stop,
                    },
                    _ = tick.tick(), if watcher.is_some() => {
                        let Some(w) = watcher.as_mut() else { continue };
                        let content = reload::read_config_file(w.path().to_path_buf()).await;
                        // A reported change is marked as loaded already.
                        if !w.observe(content) {
                            continue;
                        }
                        true
                    }
                }
            };
            let why = if file_changed { "config file changed" } else { "SIGHUP" };
            if let (Some(w), false) = (watcher.as_mut(), file_changed) {
                let content = reload::read_config_file(w.path().to_path_buf()).await;
                w.mark_loaded(content.ok());
            }
            notify::reloading();
            // A stop signal wins over a reload in progress (a config on a hung mount, a plugin
            // slow to build): nothing is applied before the workers are told, and after that
            // the process is stopping anyway.
            let mut job = std::pin::pin!(running.reload(why, &reload.load));
            loop {
                tokio::select! {
                    biased;
                    signal = signals.recv() => match signal {
                        Signal::Hup => pending_hup = true,
                        stop => {
                            warn!(signal = stop.name(), "stop signal during a reload: abandoning the reload");
                            break 'serve stop;
                        }
                    },
                    _ = &mut job => break,
                }
            }
            notify::notify("READY=1");
        };

        let grace = running.config.server.shutdown_grace;
        info!(signal = signal.name(), grace = ?grace, "shutting down: no new connections, draining open ones");
        notify::notify("STOPPING=1");
        readiness.set_draining();
        trigger.trigger(grace);
        running.drain_all_within(grace);
        // A second stop signal during the drain means "now": exit without waiting for the grace.
        tokio::spawn(async move {
            loop {
                match signals.recv().await {
                    Signal::Hup => info!("SIGHUP ignored: shutting down"),
                    again => {
                        warn!(signal = again.name(), "second signal: exiting without finishing the drain");
                        kill_children();
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
        metrics::counter!(core_metrics::names::CONFIG_RELOADS, "result" => self.as_str())
            .increment(1);
        let ok = matches!(self, Self::Success);
        metrics::gauge!(core_metrics::names::CONFIG_LAST_RELOAD_SUCCESSFUL).set(if ok {
            1.0
        } else {
            0.0
        });
    }
}

impl<B: Backend> Running<B> {
    /// A gate and instance for a planned service. If a service of that name is running
    /// (wherever it listens), the new generation shares its `max_connections` count, its
    /// blocking threads, and what its plugin shares across generations ([`Plugin::inherit`]:
    /// exec's process slots, output budget and auth-failure buckets).
    ///
    /// [`Plugin::inherit`]: wharf_core::Plugin::inherit
    fn new_generation(&self, svc: &PlannedService) -> Handler<worker::RawConnOf<B>> {
        let labels = ServiceLabels {
            service: svc.name.clone(),
            plugin: svc.config.plugin.clone(),
            backend: B::NAME.to_string(),
        };
        let previous = self.services.iter().find(|s| s.key.name == svc.name);
        if let Some(previous) = previous {
            svc.built.inherit_from(&previous.instance);
        }
        let gate = ServiceGate::new(
            labels,
            &svc.config,
            svc.built.outcomes,
            previous.map(|p| &*p.gate),
        );
        Handler {
            gate,
            service: (self.instance)(&svc.built),
        }
    }

    /// A number for a new listening socket.
    fn new_slot(&mut self) -> SlotId {
        self.next_slot += 1;
        self.next_slot
    }

    /// A new listening socket for `svc` (one descriptor per worker in `group`): how the main
    /// thread tracks it, and what each worker starts.
    fn start_service(
        &mut self,
        svc: &PlannedService,
        bound: SocketAddr,
        group: Vec<std::net::TcpListener>,
        activated: bool,
    ) -> (RunningService, Vec<WorkerService<B>>) {
        let (slot, handler) = (self.new_slot(), self.new_generation(svc));
        let per_worker = group
            .into_iter()
            .map(|socket| WorkerService {
                slot,
                socket,
                handler: handler.clone(),
            })
            .collect();
        let service = RunningService {
            key: ServiceKey::of(svc),
            bound,
            slot,
            gate: handler.gate,
            activated,
            instance: Arc::clone(&svc.built.instance),
        };
        (service, per_worker)
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
                Err(ApplyError::Unchanged(msg)) => {
                    error!("reload failed: {msg}; still running the previous configuration");
                    ReloadResult::Failed
                }
                Err(ApplyError::Partial(msg)) => {
                    error!("reload failed: partly applied ({msg}); some workers may not serve the new configuration: restart wharf");
                    ReloadResult::Failed
                }
            },
        };
        result.record();
    }

    /// Applies a validated plan: binds new addresses first (any failure there leaves everything
    /// as it was), then tells every worker, then retires the generations that were replaced.
    async fn apply(&mut self, plan: Plan, started: std::time::Instant) -> Result<(), ApplyError> {
        let running: Vec<ServiceKey> = self.services.iter().map(|s| s.key.clone()).collect();
        let bound: Vec<SocketAddr> = self.services.iter().map(|s| s.bound).collect();
        let new: Vec<ServiceKey> = plan.services.iter().map(ServiceKey::of).collect();
        let steps = reload::diff(&running, &bound, &new);
        let workers = self.workers.len();

        // 1. Check and bind; nothing has changed yet if this fails.
        for step in &steps {
            if let Step::Stop { running } = *step {
                let s = &self.services[running];
                if s.activated {
                    return Err(ApplyError::Unchanged(format!(
                        "service `{}` listens on {}, a socket systemd passed (socket activation): \
                         removing or moving it needs the .socket unit changed and a restart",
                        s.key.name, s.bound
                    )));
                }
            }
        }
        let mut groups = std::collections::HashMap::new();
        for step in &steps {
            if let Step::Start { new } = *step {
                let svc = &plan.services[new];
                let group = bind_service(&plan, svc, workers).map_err(|ServeError(msg)| {
                    ApplyError::Unchanged(self.explain_overlap(msg, svc.config.listen))
                })?;
                groups.insert(new, group);
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
                    next[new] = Some(self.services[running].clone());
                }
                Step::Swap { running, new } => {
                    let svc = &plan.services[new];
                    let old = &self.services[running];
                    let (slot, bound, activated) = (old.slot, old.bound, old.activated);
                    retired.push(Arc::clone(&old.gate));
                    summary.changed.push(describe_swap(&old.key, &svc.name));
                    if old.key.name != svc.name {
                        summary.listening.push(slot);
                    }
                    let handler = self.new_generation(svc);
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
                        activated,
                        instance: Arc::clone(&svc.built.instance),
                    });
                }
                Step::Start { new } => {
                    let svc = &plan.services[new];
                    let Some((bound, group)) = groups.remove(&new) else {
                        continue; // every Start was bound in step 1
                    };
                    let (service, started) = self.start_service(svc, bound, group, false);
                    for (c, started) in changes.iter_mut().zip(started) {
                        c.push(Change::Start(started));
                    }
                    summary.added.push(format!("{} ({})", svc.name, bound));
                    summary.listening.push(service.slot);
                    next[new] = Some(service);
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
        let mut failures = Vec::new();
        for (id, (control, changes)) in self.workers.iter().zip(changes).enumerate() {
            let (done, ack) = oneshot::channel();
            match control.send(Control { changes, done }) {
                Ok(()) => acks.push(ack),
                Err(_) => failures.push(format!("worker {id} is gone")),
            }
        }
        for ack in acks {
            match ack.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(_) => failures.push("a worker ended during the reload".into()),
            }
        }

        // 4. The replaced generations finish their connections; the new state is in effect.
        for gate in retired {
            gate.retire();
            self.retired.push(Arc::downgrade(&gate));
        }
        self.retired.retain(|g| g.strong_count() > 0);
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
            .filter(|s| summary.listening.contains(&s.slot))
        {
            log_listening::<B>(s, &self.config, workers);
        }
        let outcome = if failures.is_empty() {
            "configuration reloaded"
        } else {
            "configuration partly applied"
        };
        info!(
            config = %plan.origin,
            unchanged = summary.unchanged,
            changed = %summary.changed.join(", "),
            added = %summary.added.join(", "),
            removed = %summary.removed.join(", "),
            took = ?started.elapsed(),
            "{outcome}"
        );
        if !restart.is_empty() {
            warn!(
                settings = %restart.join(", "),
                "these settings changed but only take effect after a restart"
            );
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ApplyError::Partial(failures.join("; ")))
        }
    }

    /// Adds to a bind error when the address overlaps a socket of this very process (the
    /// same port on a wildcard and a specific address, or the metrics listener): that is not
    /// "another process", and only a restart can move between them.
    fn explain_overlap(&self, msg: String, wanted: SocketAddr) -> String {
        let overlaps = |have: SocketAddr| {
            have.port() == wanted.port()
                && (have.ip() == wanted.ip()
                    || have.ip().is_unspecified()
                    || wanted.ip().is_unspecified())
        };
        let ours = self
            .services
            .iter()
            .map(|s| (s.key.name.as_str(), s.bound))
            .chain(self.config.metrics.as_ref().map(|m| ("metrics", m.listen)))
            .find(|(_, have)| overlaps(*have));
        match ours {
            Some((name, have)) => format!(
                "{msg}; it overlaps `{name}` on {have} in this process: moving between \
                 overlapping addresses needs a restart"
            ),
            None => msg,
        }
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

    /// Drains every generation, current and retired, within `grace` (shutdown).
    fn drain_all_within(&self, grace: Duration) {
        for s in &self.services {
            s.gate.drain_within(grace);
        }
        for gate in self.retired.iter().filter_map(std::sync::Weak::upgrade) {
            gate.drain_within(grace);
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

/// Why a valid config could not be applied.
enum ApplyError {
    /// Found before anything changed (an address in use...).
    Unchanged(String),
    /// Some workers could not take their part; the rest is in effect.
    Partial(String),
}

/// What a reload did, for its log line.
#[derive(Default)]
struct Summary {
    unchanged: usize,
    changed: Vec<String>,
    added: Vec<String>,
    removed: Vec<String>,
    /// Slots to announce with a `listening` line (added, or serving under a new name).
    listening: Vec<SlotId>,
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

/// What a bind error says when the address is taken (`wharf bench swap` looks for it to retry
/// on another port).
pub(crate) const ADDRESS_IN_USE_HINT: &str = "(another process is listening there)";

fn bind_error(plan: &Plan, key: &str, addr: SocketAddr, e: &io::Error) -> ServeError {
    let in_use = format!(" {ADDRESS_IN_USE_HINT}");
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => in_use.as_str(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test in this binary that touches SIGHUP: the handlers are process-wide.
    #[test]
    fn each_sighup_is_reported_once_across_the_hand_over_to_tokio() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        catch_early_sighup();
        // SAFETY: raise(3) delivers to this thread, whose handler only stores to an atomic.
        let raise = || assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        raise();
        let mut hup = rt
            .block_on(async {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            })
            .unwrap();
        // Before the hand-over: reported by the early flag (tokio was not there yet).
        assert!(hand_over_sighup());
        // After it: tokio's stream reports it, the early handler (which tokio's calls too)
        // no longer does.
        raise();
        let got =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), hup.recv()).await });
        assert_eq!(got, Ok(Some(())));
        assert!(!EARLY_SIGHUP.load(std::sync::atomic::Ordering::SeqCst));
    }
}
