//! Phase 4 of `wharf serve`: the drain, after a stop signal (or a dead worker, see
//! [`super::serving`]). New connections stop at once (the accept loops end and their sockets
//! close), open ones may finish within `server.shutdown_grace`, then are closed; `/readyz`
//! says 503 and systemd hears `STOPPING=1` meanwhile. A second stop signal exits at once.
//! The metrics endpoint keeps answering until the last worker is joined.

use std::io;
use std::thread::JoinHandle;

use tracing::{info, warn};
use wharf_core::shutdown::ShutdownTrigger;

use super::reopen_access_log;
use super::running::Running;
use super::signals::{Signal, Signals};
use super::{kill_children, ServeError};
use crate::backends::CompiledBackend;
use crate::metrics_http::Readiness;
use crate::notify;

/// Why serving ended.
pub(super) enum Stop {
    /// SIGTERM or SIGINT.
    Signal(Signal),
    /// A worker ended on its own (the reason is in the log and on `/readyz`).
    WorkerDied,
}

/// Drains everything within the grace in effect and joins the worker threads; an error if
/// one of them failed or a worker had died.
pub(super) async fn drain<B: CompiledBackend>(
    why: Stop,
    running: &Running<B>,
    mut signals: Signals,
    trigger: &ShutdownTrigger,
    threads: Vec<JoinHandle<io::Result<()>>>,
    readiness: &Readiness,
) -> Result<(), ServeError> {
    let grace = running.config.server.shutdown_grace;
    let cause = match &why {
        Stop::Signal(signal) => signal.name(),
        Stop::WorkerDied => "a worker died",
    };
    info!(signal = cause, grace = ?grace, "shutting down: no new connections, draining open ones");
    notify::notify("STOPPING=1");
    readiness.set_draining();
    running.status.set_draining(grace);
    trigger.trigger(grace);
    running.drain_all_within(grace);
    // A second stop signal during the drain means "now": exit without waiting for the grace.
    let access_log = running.access_log.clone();
    tokio::spawn(async move {
        loop {
            match signals.recv().await {
                Signal::Hup => info!("SIGHUP ignored: shutting down"),
                Signal::Usr1 => reopen_access_log(access_log.as_ref()),
                again => {
                    warn!(
                        signal = again.name(),
                        "second signal: exiting without finishing the drain"
                    );
                    kill_children();
                    std::process::exit(wharf_core::exit_status::FAILURE);
                }
            }
        }
    });
    // Joined off the runtime so the metrics endpoint keeps answering while they drain.
    let failed = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| t.join())
            .filter(|r| !matches!(r, Ok(Ok(()))))
            .count()
    })
    .await
    .unwrap_or(1);
    if let Stop::WorkerDied = why {
        return Err(ServeError::failure(
            "stopped because a worker died (see the log above)",
        ));
    }
    if failed > 0 {
        return Err(ServeError::failure(format!(
            "{failed} worker(s) ended with an error or a panic"
        )));
    }
    info!("stopped");
    Ok(())
}
