//! Phase 3 of `wharf serve`: serve until a stop signal. The workers accept on their own; the
//! main thread's runtime runs the metrics endpoint and this loop, which waits for
//!
//! - SIGHUP, or a change of the config file or of a service's TLS files seen by
//!   `--watch-config`: a reload ([`super::reload`]);
//! - SIGUSR1: the access log is reopened (logrotate renamed it), and the loop goes on;
//! - SIGTERM or SIGINT: the end of the loop, then the drain ([`super::drain`]);
//! - a worker that died ([`super::workers::WorkerDeaths`]): `/readyz` turns 503 with the
//!   reason and the server stops as on SIGTERM (see [`serve_until_stop`] for why).

use tracing::{error, info};

use super::drain::Stop;
use super::reload::reload_unless_stopped;
use super::running::Running;
use super::signals::{Signal, Signals};
use super::workers::WorkerDeaths;
use super::LoadPlan;
use crate::backends::CompiledBackend;
use crate::metrics_http::Readiness;
use crate::reload::{self, FileWatcher};

/// Serves until a stop signal or a worker's death; returns why it stopped.
///
/// A dead worker stops the server. Its sockets closed with it (connections waiting in their
/// accept queues were reset), reloads can no longer reach every worker, and a thread cannot be
/// restarted with the state it had: only a new process serves the configuration fully again,
/// and systemd (`Restart=on-failure`: the exit status is 1) or Kubernetes restarts it. The
/// drain lets the other workers finish their connections first, and `/readyz` already says
/// 503 so a load balancer stops sending new ones.
pub(super) async fn serve_until_stop<B: CompiledBackend>(
    running: &mut Running<B>,
    signals: &mut Signals,
    load: &LoadPlan,
    mut watcher: Option<FileWatcher>,
    deaths: &WorkerDeaths,
    readiness: &Readiness,
    early_sighup: bool,
) -> Stop {
    let mut tick = tokio::time::interval(reload::WATCH_INTERVAL);
    let mut pending_hup = early_sighup;
    if let Some(w) = watcher.as_mut() {
        w.watch_services(running.services.iter().map(|s| &s.key));
    }
    loop {
        // SIGHUP (now or while a reload ran), or a change the watcher saw.
        let file_changed = if std::mem::take(&mut pending_hup) {
            None
        } else {
            tokio::select! {
                biased;
                signal = signals.recv() => match signal {
                    Signal::Hup => None,
                    Signal::Usr1 => {
                        super::reopen_access_log(running.access_log.as_ref());
                        continue;
                    }
                    stop => return Stop::Signal(stop),
                },
                reason = deaths.wait() => {
                    error!("{reason}; not ready any more, stopping (a restart serves everything again)");
                    readiness.set_failed(reason);
                    return Stop::WorkerDied;
                }
                _ = tick.tick(), if watcher.is_some() => {
                    let Some(w) = watcher.as_mut() else { continue };
                    let digests = reload::read_watched(w.paths()).await;
                    // A reported change is marked as loaded already.
                    match w.observe(digests) {
                        Some(why) => Some(why),
                        None => continue,
                    }
                }
            }
        };
        if let (Some(w), None) = (watcher.as_mut(), &file_changed) {
            let digests = reload::read_watched(w.paths()).await;
            w.mark_loaded(digests.ok());
        }
        let why = file_changed.as_deref().unwrap_or("SIGHUP");
        if let Some(stop) =
            reload_unless_stopped(running, why, load, signals, &mut pending_hup).await
        {
            return Stop::Signal(stop);
        }
        // The services' TLS files may be others now.
        if let Some(w) = watcher.as_mut() {
            w.watch_services(running.services.iter().map(|s| &s.key));
        }
    }
}

/// Logs where `--watch-config` looks, and makes its watcher.
pub(super) fn watcher(watch: Option<(std::path::PathBuf, Option<Vec<u8>>)>) -> Option<FileWatcher> {
    watch.map(|(path, loaded)| {
        info!(path = %path.display(), every = ?reload::WATCH_INTERVAL, "watching the config file (and the TLS files it names) for changes");
        FileWatcher::new(path, loaded)
    })
}
