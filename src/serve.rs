//! `wharf serve`: bind everything, start the workers, wait for a signal, drain, exit.
//!
//! Order matters for a clean failure: the backend is resolved and every socket (services and
//! metrics) is bound on the main thread before any worker starts, so a refused io_uring or an
//! address in use is a one-line error and nothing half-runs. Signal handlers are installed
//! before workers start, so an early SIGTERM still drains instead of killing.

use std::io;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use tracing::{info, warn};
use wharf_backend_epoll::Epoll;
use wharf_backend_uring::IoUring;
use wharf_core::backend::Backend;
use wharf_core::config::BackendChoice;
use wharf_core::gate::{self, ServiceGate, ServiceLabels};
use wharf_core::net::bind_reuseport_group;
use wharf_core::service::DynService;
use wharf_core::shutdown::{self, Shutdown};
use wharf_core::worker::{self, ConnOf, WorkerService};

use crate::activation::Activated;
use crate::metrics_http;
use crate::plan::Plan;
use crate::registry::BuiltService;

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

/// Runs the plan until SIGTERM/SIGINT and the drain that follows.
pub fn run(plan: Plan) -> Result<(), ServeError> {
    let backend = resolve_backend(plan.config.server.backend)?;
    match backend {
        BackendChoice::IoUring => launch::<IoUring>(plan, |b| Arc::clone(&b.io_uring)),
        _ => launch::<Epoll>(plan, |b| Arc::clone(&b.epoll)),
    }
}

fn launch<B: Backend>(
    plan: Plan,
    instance: fn(&BuiltService) -> Arc<dyn DynService<ConnOf<B>>>,
) -> Result<(), ServeError> {
    let server = &plan.config.server;
    let workers = match server.workers {
        0 => thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    // Bind everything first (or take the sockets systemd passed).
    let mut activated = Activated::from_env().map_err(ServeError)?;
    let mut sockets = Vec::with_capacity(plan.services.len());
    let mut bound = Vec::with_capacity(plan.services.len());
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
            None => bind_reuseport_group(svc.config.listen, workers)
                .and_then(|g| Ok((g[0].local_addr()?, g)))
                .map_err(|e| {
                    let key = format!("services.{}.listen", svc.name);
                    bind_error(&plan, &key, svc.config.listen, &e)
                })?,
        };
        bound.push(group.0);
        sockets.push(group.1);
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
            Some(handle)
        }
        None => None,
    };

    let gates: Vec<Arc<ServiceGate>> = plan
        .services
        .iter()
        .map(|svc| {
            let labels = ServiceLabels {
                service: svc.name.clone(),
                plugin: svc.config.plugin.clone(),
                backend: B::NAME.to_string(),
            };
            ServiceGate::new(labels, &svc.config, svc.built.outcomes)
        })
        .collect();

    let main_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServeError(format!("cannot start the main runtime: {e}")))?;
    let signals = main_rt
        .block_on(async { Signals::install() })
        .map_err(|e| ServeError(format!("cannot install signal handlers: {e}")))?;

    // One set of sockets per worker.
    let (trigger, stop) = shutdown::channel();
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let mut per_worker: Vec<Vec<WorkerService<B>>> = (0..workers).map(|_| Vec::new()).collect();
    for ((svc, group), gate) in plan.services.iter().zip(sockets).zip(&gates) {
        for (worker_services, socket) in per_worker.iter_mut().zip(group) {
            worker_services.push(WorkerService {
                socket,
                gate: Arc::clone(gate),
                service: instance(&svc.built),
            });
        }
    }
    let grace = server.shutdown_grace;
    let mut threads = Vec::with_capacity(workers);
    for (id, services) in per_worker.into_iter().enumerate() {
        let stop: Shutdown = stop.clone();
        let ready = ready_tx.clone();
        let handle = thread::Builder::new()
            .name(format!("wharf-worker-{id}"))
            .spawn(move || {
                worker::run::<B>(id, services, stop, grace, move |r| {
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
                trigger.trigger();
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

    for (svc, addr) in plan.services.iter().zip(&bound) {
        info!(
            service = %svc.name,
            plugin = %svc.config.plugin,
            listen = %addr,
            backend = %B::NAME,
            workers,
            "listening"
        );
    }

    main_rt.block_on(async move {
        let allow_from = plan.config.metrics.as_ref().map(|m| m.allow_from.clone()).unwrap_or_default();
        // Every service is listening by now: /readyz says so until the drain begins.
        let readiness = metrics_http::Readiness::default();
        readiness.set_ready();
        let metrics_task = match (metrics_socket, prometheus) {
            (Some(socket), Some(handle)) => {
                info!(listen = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint listening at /metrics, /healthz, /readyz");
                let serve = metrics_http::serve(socket, handle, allow_from, readiness.clone());
                Some(tokio::spawn(serve))
            }
            _ => None,
        };
        info!(config = %plan.origin, "wharf ready");
        let mut signals = signals;
        let signal = signals.recv().await;
        info!(signal, grace = ?grace, "shutting down: no new connections, draining open ones");
        readiness.set_draining();
        trigger.trigger();
        // A second signal during the drain means "now": exit without waiting for the grace.
        tokio::spawn(async move {
            let again = signals.recv().await;
            warn!(signal = again, "second signal: exiting without finishing the drain");
            std::process::exit(1);
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

/// SIGTERM and SIGINT, installed before workers start.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
