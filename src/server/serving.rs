//! Phase 3 of `wharf serve`: serve until a stop signal. The workers accept on their own; the
//! main thread's runtime runs the metrics endpoint and this loop, which waits for
//!
//! - SIGHUP, or a config file change seen by `--watch-config`: a reload ([`super::reload`]);
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
    loop {
        // SIGHUP (now or while a reload ran), or a change the watcher saw.
        let file_changed = if std::mem::take(&mut pending_hup) {
            false
        } else {
            tokio::select! {
                biased;
                signal = signals.recv() => match signal {
                    Signal::Hup => false,
                    stop => return Stop::Signal(stop),
                },
                reason = deaths.wait() => {
                    error!("{reason}; not ready any more, stopping (a restart serves everything again)");
                    readiness.set_failed(reason);
                    return Stop::WorkerDied;
                }
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
        let why = if file_changed {
            "config file changed"
        } else {
            "SIGHUP"
        };
        if let (Some(w), false) = (watcher.as_mut(), file_changed) {
            let content = reload::read_config_file(w.path().to_path_buf()).await;
            w.mark_loaded(content.ok());
        }
        if let Some(stop) =
            reload_unless_stopped(running, why, load, signals, &mut pending_hup).await
        {
            return Stop::Signal(stop);
        }
    }
}

/// Logs where `--watch-config` looks, and makes its watcher.
pub(super) fn watcher(watch: Option<(std::path::PathBuf, Option<Vec<u8>>)>) -> Option<FileWatcher> {
    watch.map(|(path, loaded)| {
        info!(path = %path.display(), every = ?reload::WATCH_INTERVAL, "watching the config file for changes");
        FileWatcher::new(path, loaded)
    })
}
