//! `wharf serve`: the server's lifecycle, one phase per module.
//!
//! [`run`] resolves the backend ([`crate::backends`]) and runs these phases on it:
//!
//! 1. [`bootstrap`]: bind every socket (services, metrics), or take the ones systemd passed
//!    (socket activation), on the main thread before anything starts, so a busy port or a
//!    refused io_uring is a one-line error and nothing half-runs.
//! 2. [`workers`]: start the worker threads and wait until each is accepting; watch them
//!    for the rest of the run.
//! 3. [`serving`]: serve until a signal, the main loop. Signal handling is in [`signals`]
//!    (installed before the workers start, so an early SIGTERM still drains and an early
//!    SIGHUP still reloads).
//! 4. [`reload`]: **what happens on SIGHUP** (or a changed file with `--watch-config`), from
//!    the signal to the log line. [`running`] is the state it changes.
//! 5. [`drain`]: stop accepting, let open connections finish within the grace, exit.
//!
//! Process-level metrics (build info, reloads) are defined in [`process_metrics`]; the
//! `/metrics`, `/healthz` and `/readyz` endpoint is [`crate::metrics_http`], which also serves
//! the status page from the facts these phases put on a [`crate::status::Board`].

mod bootstrap;
mod drain;
pub mod process_metrics;
pub(crate) mod reload;
mod running;
mod serving;
mod signals;
pub mod workers;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};
use wharf_core::access_log::AccessLog;
use wharf_core::config::ConfigError;
use wharf_core::exit_status;
use wharf_core::shutdown;
use wharf_core::worker::WorkerService;

pub use signals::catch_early_sighup;

use crate::backends::{self, CompiledBackend, OnBackend};
use crate::metrics_http;
use crate::notify;
use crate::plan::Plan;
use crate::status;
use running::Running;

/// A failure that stops `wharf serve`, already worded for the user, with the exit status it
/// means ([`wharf_core::exit_status`]).
#[derive(Debug)]
pub struct ServeError {
    message: String,
    status: i32,
}

impl ServeError {
    /// A runtime failure: exit status [`exit_status::FAILURE`].
    pub fn failure(message: impl Into<String>) -> Self {
        ServeError {
            message: message.into(),
            status: exit_status::FAILURE,
        }
    }

    /// A listen address is taken: exit status [`exit_status::ADDRESS_IN_USE`].
    pub fn address_in_use(message: impl Into<String>) -> Self {
        ServeError {
            message: message.into(),
            status: exit_status::ADDRESS_IN_USE,
        }
    }

    /// The exit status `wharf serve` ends with.
    pub fn exit_status(&self) -> i32 {
        self.status
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

/// Loads and validates the config again (same file, same command-line overrides).
pub type LoadPlan = Arc<dyn Fn() -> Result<Plan, Vec<ConfigError>> + Send + Sync>;

/// Where a reload gets its configuration from.
pub struct ReloadSource {
    /// Loads and validates the config again.
    pub load: LoadPlan,
    /// `--watch-config`: the file to poll for changes, and its content as read just before the
    /// startup load (so a change made while starting is not missed).
    pub watch: Option<(PathBuf, Option<Vec<u8>>)>,
}

/// Runs the plan until SIGTERM/SIGINT and the drain that follows, reloading on SIGHUP.
pub fn run(plan: Plan, reload: ReloadSource) -> Result<(), ServeError> {
    // However serving ends (the drain, a grace that expired, a startup error after workers
    // started, a panic unwinding), no child process it started survives it.
    let _children = KillChildrenOnExit;
    let backend = backends::resolve(plan.config.server.backend).map_err(ServeError::failure)?;
    struct Launch(Plan, ReloadSource, String);
    impl OnBackend for Launch {
        type Output = Result<(), ServeError>;
        fn run<B: CompiledBackend>(self) -> Self::Output {
            launch::<B>(self.0, self.1, self.2)
        }
    }
    backends::dispatch(backend.kind, Launch(plan, reload, backend.why))
}

/// The phases, in order, on backend `B` (chosen for `why_backend`).
fn launch<B: CompiledBackend>(
    mut plan: Plan,
    reload: ReloadSource,
    why_backend: String,
) -> Result<(), ServeError> {
    let worker_count = match plan.config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // What the status page shows; the phases below keep it current.
    let board = status::Board::new(B::NAME, why_backend, worker_count);

    // 1. Bind.
    let bound = bootstrap::bind_all(&plan, worker_count)?;
    // Metrics recorder before any handle is registered.
    let prometheus = match &bound.metrics {
        Some(_) => {
            let handle = metrics_http::install_recorder().map_err(ServeError::failure)?;
            wharf_core::metrics::describe();
            wharf_core::access_log::describe();
            process_metrics::register();
            Some(handle)
        }
        None => None,
    };
    // The file was opened (created) when the plan was built, before anything was bound.
    let access_log = match &plan.config.access_log {
        Some(config) => Some(
            AccessLog::start(config, plan.access_log_file.take())
                .map_err(|e| ServeError::failure(format!("cannot start the access log: {e}")))?,
        ),
        None => None,
    };
    let main_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError::failure(format!("cannot start the main runtime: {e}")))?;
    let mut signals = main_rt
        .block_on(async { signals::Signals::install() })
        .map_err(|e| ServeError::failure(format!("cannot install signal handlers: {e}")))?;
    // A SIGHUP that came while starting: the file may have changed since it was read.
    let early_sighup = signals::hand_over_sighup();
    if signals::early_sigusr1() {
        reopen_access_log(access_log.as_ref());
    }

    // 2. Start the workers, each with its descriptor of every service's socket.
    let mut running = Running::<B>::new(plan.config.clone(), board.clone(), access_log.clone());
    let mut per_worker: Vec<Vec<WorkerService<B>>> =
        (0..worker_count).map(|_| Vec::new()).collect();
    for (svc, socket) in plan.services.iter().zip(bound.services) {
        let (service, started) = running.start_service(svc, socket);
        for (worker_services, started) in per_worker.iter_mut().zip(started) {
            worker_services.push(started);
        }
        running.services.push(service);
    }
    let (trigger, stop) = shutdown::channel();
    let workers = workers::start::<B>(per_worker, &stop, &trigger)?;
    running.workers = workers.controls;
    for s in &running.services {
        running.log_listening(s);
    }
    running.publish_services();

    main_rt.block_on(async move {
        // 3. Serve until a signal. Every service is listening by now: /readyz says so until
        // the drain begins.
        let readiness = metrics_http::Readiness::default();
        readiness.set_ready();
        let metrics_task = match (bound.metrics, prometheus) {
            (Some(socket), Some(handle)) => {
                info!(listen = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint listening at /metrics, /status (the status page at /), /healthz, /readyz");
                let allow = running.metrics_allow.subscribe();
                let status = status::Status::new(board, readiness.clone());
                let serve = metrics_http::serve(socket, handle, allow, readiness.clone(), status);
                Some(tokio::spawn(serve))
            }
            _ => None,
        };
        let watcher = serving::watcher(reload.watch);
        info!(config = %plan.origin, "wharf ready");
        notify::notify("READY=1");
        drop(plan);
        let why = serving::serve_until_stop(
            &mut running,
            &mut signals,
            &reload.load,
            watcher,
            &workers.deaths,
            &readiness,
            early_sighup,
        )
        .await;

        // 5. Drain.
        let result = drain::drain(why, &running, signals, &trigger, workers.threads, &readiness).await;
        if let Some(task) = metrics_task {
            task.abort();
        }
        // Every worker has ended (and handed its lines over): write them out.
        if let Some(log) = &access_log {
            log.stop(ACCESS_LOG_FINISH);
        }
        result
    })
}

/// SIGUSR1: the access log's writer reopens its file (logrotate renamed it).
fn reopen_access_log(log: Option<&AccessLog>) {
    match log {
        Some(log) => {
            info!("SIGUSR1: reopening the access log");
            log.reopen();
        }
        None => info!("SIGUSR1 ignored: no [access_log] is configured"),
    }
}

/// How long the end of `serve` waits for the access log's last lines to be written (a writer
/// stuck on a pipe nobody reads is left behind).
const ACCESS_LOG_FINISH: std::time::Duration = std::time::Duration::from_secs(2);

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
